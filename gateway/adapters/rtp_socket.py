"""A bare RTP socket for a relay leg (the phone's leg to a Janus AudioBridge): one port from the allocator,
packets out to one peer, packets in only from that peer (address and port; anything else is dropped and
counted), no jitter buffer and no clock of its own: the leg paces itself on the worker's media clock.

The socket stays open for the whole leg: Janus `connect()`s its socket to ours, and a closed port makes it
drop the participant.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..media.rtp import RtpError, RtpPacket, is_rtcp
from .ports import PortAllocator, bind_datagram


class RtpSocket(asyncio.DatagramProtocol):
    def __init__(self, ports: PortAllocator, on_packet: Callable[[RtpPacket], object]) -> None:
        self.ports = ports
        self.on_packet = on_packet
        self.port = 0
        self.peer: tuple[str, int] | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.sent = 0
        self.received = 0
        self.dropped = 0  # from another source, or not RTP
        self.closed = False

    async def open(self, host: str) -> int:
        self.transport, self.port = await bind_datagram(self.ports, host, lambda: self)
        return self.port

    def send(self, data: bytes) -> None:
        if self.transport is not None and self.peer is not None and not self.closed:
            self.transport.sendto(data, self.peer)
            self.sent += 1

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        if self.peer is None or addr[:2] != self.peer:
            self.dropped += 1
            self.ports.dropped["source"] += 1  # gateway_rtp_dropped_total
            return
        if is_rtcp(data):
            self.dropped += 1
            return
        try:
            packet = RtpPacket.parse(data)
        except RtpError:
            self.dropped += 1
            self.ports.dropped["malformed"] += 1
            return
        self.received += 1
        self.on_packet(packet)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP unreachable while the peer is not (yet) listening: keep going

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.transport is not None:
            self.transport.close()
        if self.port:
            self.ports.release(self.port)
