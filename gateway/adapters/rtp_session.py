"""A call's RTP endpoint: one UDP port, strict symmetric RTP, a jitter buffer, driven by the shared clock.

Each tick the session pops one received frame from the jitter buffer and hands it to `handler`, which
returns the frame to send (or None for nothing). The handler is the call's current application: echo,
a prompt player, the bridge to a room.

Strict RTP (`media.strict_rtp.SourceGuard`): the port accepts packets from one source only, learned from the
SDP and the first packets of a short window that signalling opens (`learn`: the answer; `update`: a re-INVITE
or UPDATE that moves the media), then locked; we send to that source. Everything else is dropped and counted
(`dropped` by reason, the range's `ports.dropped` for the metric), so a stranger spraying the port range
neither hears the call nor speaks (or types digits) into it.

SRTP (`media.srtp`, keyed by SDES in the SDP): when the negotiated media carries a crypto line, every packet is
authenticated and decrypted before anything else looks at it (a packet that fails is dropped as "srtp": a
stranger cannot even latch the source), and every packet we send is protected. Our key (`local_key`) is made
once per call and goes into our SDP; the peer's comes with its SDP and may change in a re-INVITE (re-keying).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from collections.abc import Callable

from .. import log
from ..config import RtpConfig
from ..media import g711
from ..media.jitter import JitterBuffer
from ..media.rtp import RtpError, RtpPacket, is_rtcp
from ..media.srtp import SrtpContext, SrtpError, new_key
from ..media.strict_rtp import Address, SourceGuard, normalize
from ..sip.sdp import MediaParams
from .clock import MediaClock
from .ports import PortAllocator, bind_datagram

logger = logging.getLogger("gateway.media")

FrameHandler = Callable[[bytes | None], bytes | None]
FRAME = 160  # samples per 20 ms at 8 kHz
_DEFAULTS = RtpConfig()


class RtpSession(asyncio.DatagramProtocol):
    def __init__(self, clock: MediaClock, ports: PortAllocator, params: MediaParams, jitter_ms: tuple[int, int],
                 strict: tuple[int, int] = (_DEFAULTS.strict_learning_ms, _DEFAULTS.strict_learning_packets)) -> None:
        """`strict`: the learning window in ms and the packets in sequence that latch a source other than the SDP's."""
        self.clock = clock
        self.ports = ports
        self.params = params
        self.port = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.guard = SourceGuard(strict[0] / 1000, strict[1])
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
        self.dropped: Counter[str] = Counter()  # by reason: source, ssrc, malformed, srtp
        self._marker = True
        self.closed = False
        self.local_key = new_key()  # our SRTP master key and salt, offered or answered when the trunk uses SRTP
        self._key_used = False  # whether an outbound context was made with local_key
        self.srtp: SrtpContext | None = None
        self.require_srtp = False  # the trunk requires SRTP: nothing is taken before the keys are known
        self.tap: Callable[[bytes | None, bytes | None], None] | None = None  # each tick's frames, both ways
        self._key(params)

    def _key(self, params: MediaParams) -> None:
        """The SRTP context for `params`. The same suite: the outbound side goes on (our key, libsrtp's counters)
        and a new peer key replaces the inbound side. A new suite, or SRTP again after plain RTP: a new context,
        with a new key of ours if the current one already protected packets (a key never gets a second outbound
        context: its counters would restart and reuse keystream). The caller puts `local_key` in its SDP after."""
        crypto = params.crypto
        if crypto is None:
            self.srtp = None
        elif self.srtp is not None and self.srtp.suite == crypto.suite:
            if self.srtp.inbound(crypto.key):
                log.event(logger, "rtp.srtp_rekeyed", logging.INFO, port=self.port, suite=crypto.suite)
        else:
            if self._key_used:
                self.local_key = new_key()
            self.srtp = SrtpContext(crypto.suite, self.local_key, crypto.key)
            self._key_used = True

    @property
    def encryption(self) -> str:
        return "srtp" if self.srtp is not None else "none"

    @property
    def silence(self) -> bytes:
        return self.jitter.silence_frame

    @property
    def remote(self) -> Address | None:
        """Where our packets go: the locked (or latched) source, else the SDP address."""
        return self.guard.target

    @property
    def bad(self) -> int:
        return self.dropped["malformed"]

    async def open(self, host: str) -> int:
        """Bind a port from the allocator; ports another process holds are skipped."""
        self.transport, self.port = await bind_datagram(self.ports, host, lambda: self)
        self.learn(force=True)
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

    def learn(self, force: bool = False) -> None:
        """Signalling told the caller our port (the answer): open a learning window for the SDP address, unless a
        source already proved itself."""
        if force or not self.guard.confirmed:
            self.guard.learn(normalize(self.params.remote_host, self.params.remote_port), self._now())
            self._log_guard()

    def update(self, params: MediaParams) -> None:
        """A re-INVITE/UPDATE changed the media (hold, new address, codec). A new address opens a learning window
        (the only way besides the window a new source is accepted); the same address, or none (c=0.0.0.0 hold),
        keeps the lock."""
        if params.codec != self.params.codec:  # losses are filled with the new codec's silence
            self.jitter.silence_frame = bytes([g711.SILENCE[params.codec]]) * FRAME
        self.params = params
        self._key(params)
        new = normalize(params.remote_host, params.remote_port)
        if new is not None and new != self.guard.expected:
            self.learn(force=True)

    @property
    def sending(self) -> bool:
        return self.params.direction in ("sendrecv", "sendonly") and self.params.remote_host not in ("0.0.0.0", "::")

    @property
    def receiving(self) -> bool:
        return self.params.direction in ("sendrecv", "recvonly")

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    # -- network side
    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        if is_rtcp(data):
            return  # RTCP (or SRTCP) is not read
        if self.srtp is not None:
            try:
                data = self.srtp.unprotect(data)
            except SrtpError:
                self._drop("srtp", addr)  # not authentic (wrong key, a stranger, tampered) or a replay
                return
        elif self.require_srtp:
            self._drop("srtp", addr)  # before the answer gave us the peer's key
            return
        try:
            packet = RtpPacket.parse(data)
        except RtpError:
            self._drop("malformed", addr)
            return
        now = asyncio.get_running_loop().time()
        reason = self.guard.check((addr[0], addr[1]), packet.ssrc, packet.sequence, now)
        if self.guard.events:
            self._log_guard()
        if reason:
            self._drop(reason, addr)
            return
        self.received += 1
        pt = packet.payload_type
        if pt == self.params.payload_type:
            if self.receiving:
                self.jitter.put(packet.timestamp, packet.payload, now, packet.ssrc)
        elif pt == self.params.dtmf_pt and self.on_telephone_event is not None:
            self.on_telephone_event(packet)  # RFC 4733 events are RTP of the same, accepted stream

    def _drop(self, reason: str, addr: tuple[str, int]) -> None:
        self.dropped[reason] += 1
        self.ports.dropped[reason] += 1
        if self.dropped[reason] == 1:  # once per call and reason: the counters carry the rest
            level = logging.INFO if self.guard.learning else logging.WARNING  # probation is normal behind NAT
            log.event(logger, "rtp.dropped", level, port=self.port, reason=reason,
                      source=f"{addr[0]}:{addr[1]}", state=self.guard.state)

    def _log_guard(self) -> None:
        for name, fields in self.guard.events:
            if name != "new_ssrc" or self.guard.ssrc_changes <= 3:  # a peer changing SSRC all the time: 3 lines
                log.event(logger, f"rtp.{name}", logging.INFO, port=self.port,
                          **{k: f"{v[0]}:{v[1]}" if isinstance(v, tuple) else v for k, v in fields.items()})
        self.guard.events.clear()

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def error_received(self, exc: Exception) -> None:
        logger.debug("rtp.error", extra={"fields": {"port": self.port, "error": str(exc)}})

    # -- clock side
    def _tick(self) -> None:
        if self.guard.learning and self.guard.expire(self._now()):
            self._log_guard()
        frame = self.jitter.pop()
        out = self.handler(frame) if self.handler is not None else None
        self.ts = (self.ts + FRAME) & 0xFFFFFFFF
        if out is not None and self.sending:
            self.send_payload(out, self.params.payload_type, self.ts)
        if self.tap is not None:  # a recording: what the caller sent, what the caller heard
            self.tap(frame, out if self.sending else None)

    def send_payload(self, payload: bytes, pt: int, ts: int, marker: bool = False) -> None:
        target = self.guard.target
        if self.transport is None or self.closed or target is None:
            return
        self.seq = (self.seq + 1) & 0xFFFF
        packet = RtpPacket(pt, self.seq, ts, self.ssrc, payload, marker or self._marker)
        self._marker = False
        data = packet.serialize()
        self.transport.sendto(self.srtp.protect(data) if self.srtp is not None else data, target)
        self.sent += 1
