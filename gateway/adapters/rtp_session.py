"""A call's RTP endpoint: one UDP port, symmetric RTP, a jitter buffer, driven by the shared clock.

Each tick the session pops one received frame from the jitter buffer and hands it to `handler`, which
returns the frame to send (or None for nothing). The handler is the call's current application: echo,
a prompt player, the bridge to a room.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

from ..media import g711
from ..media.jitter import JitterBuffer
from ..media.rtp import RtpError, RtpPacket, is_rtcp
from ..sip.sdp import MediaParams
from .clock import MediaClock
from .ports import PortAllocator, bind_datagram

logger = logging.getLogger("gateway.media")

FrameHandler = Callable[[bytes | None], bytes | None]
FRAME = 160  # samples per 20 ms at 8 kHz


class RtpSession(asyncio.DatagramProtocol):
    def __init__(self, clock: MediaClock, ports: PortAllocator, params: MediaParams, jitter_ms: tuple[int, int]) -> None:
        self.clock = clock
        self.ports = ports
        self.params = params
        self.port = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.remote: tuple[str, int] = (params.remote_host, params.remote_port)
        self.latched = False
        self.handler: FrameHandler | None = None
        self.on_telephone_event: Callable[[RtpPacket], None] | None = None
        self.jitter = JitterBuffer(
            FRAME, max(1, jitter_ms[0] // 20), max(1, jitter_ms[1] // 20), g711.SILENCE[params.codec]
        )
        self.ssrc = int.from_bytes(os.urandom(4), "big")
        self.seq = int.from_bytes(os.urandom(2), "big")
        self.ts = int.from_bytes(os.urandom(4), "big")
        self.sent = 0
        self.received = 0
        self.bad = 0
        self._marker = True
        self.closed = False

    @property
    def silence(self) -> bytes:
        return self.jitter.silence_frame

    async def open(self, host: str) -> int:
        """Bind a port from the allocator; ports another process holds are skipped."""
        self.transport, self.port = await bind_datagram(self.ports, host, lambda: self)
        self.clock.subscribe(id(self), self._tick)
        return self.port

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.clock.unsubscribe(id(self))
        if self.transport is not None:
            self.transport.close()
        if self.port:
            self.ports.release(self.port)

    def update(self, params: MediaParams) -> None:
        """A re-INVITE/UPDATE changed the media (hold, new address, codec)."""
        if (params.remote_host, params.remote_port) != (self.params.remote_host, self.params.remote_port):
            self.remote = (params.remote_host, params.remote_port)
            self.latched = False
        self.params = params

    @property
    def sending(self) -> bool:
        return self.params.direction in ("sendrecv", "sendonly") and self.params.remote_host not in ("0.0.0.0", "::")

    @property
    def receiving(self) -> bool:
        return self.params.direction in ("sendrecv", "recvonly")

    # -- network side
    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        if is_rtcp(data):
            return
        try:
            packet = RtpPacket.parse(data)
        except RtpError:
            self.bad += 1
            return
        if not self.latched or addr != self.remote:
            # Symmetric RTP (RFC 4961): answer where the caller's packets come from (NAT).
            self.remote = addr
            self.latched = True
        self.received += 1
        pt = packet.payload_type
        if pt == self.params.payload_type:
            if self.receiving:
                self.jitter.put(packet.timestamp, packet.payload, asyncio.get_running_loop().time(), packet.ssrc)
        elif pt == self.params.dtmf_pt and self.on_telephone_event is not None:
            self.on_telephone_event(packet)

    def error_received(self, exc: Exception) -> None:
        logger.debug("rtp.error", extra={"fields": {"port": self.port, "error": str(exc)}})

    # -- clock side
    def _tick(self) -> None:
        frame = self.jitter.pop()
        out = self.handler(frame) if self.handler is not None else None
        self.ts = (self.ts + FRAME) & 0xFFFFFFFF
        if out is not None and self.sending:
            self.send_payload(out, self.params.payload_type, self.ts)

    def send_payload(self, payload: bytes, pt: int, ts: int, marker: bool = False) -> None:
        if self.transport is None or self.closed:
            return
        self.seq = (self.seq + 1) & 0xFFFF
        packet = RtpPacket(pt, self.seq, ts, self.ssrc, payload, marker or self._marker)
        self._marker = False
        self.transport.sendto(packet.serialize(), self.remote)
        self.sent += 1
