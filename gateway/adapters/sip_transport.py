"""Thin asyncio transports (UDP, TCP) around the sans-I/O `SipStack`.

They only move bytes: feed what arrives into the stack with the loop's clock, send what the stack wants
sent, and keep one timer armed at `stack.get_timer()`. Nothing malformed ever raises out of here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from .. import log
from ..sip.framing import FramingError, StreamFramer
from ..sip.transaction import Outgoing, SipStack, Target

logger = logging.getLogger("gateway.sip")

MAX_TCP_CONNECTIONS = 2000
TCP_IDLE_TIMEOUT = 600.0


class SipTransport:
    def __init__(self, stack: SipStack, on_events: Callable[[], None]) -> None:
        self.stack = stack
        self.on_events = on_events  # drains stack.next_event()
        self.loop = asyncio.get_running_loop()
        self.udp: asyncio.DatagramTransport | None = None
        self.tcp_server: asyncio.Server | None = None
        self.connections: dict[int, _TcpConnection] = {}
        self.by_peer: dict[tuple[str, int], int] = {}
        self._conn_ids = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._pending_connect: dict[tuple[str, int], list[bytes]] = {}

    def now(self) -> float:
        return self.loop.time()

    async def start(self, host: str, port: int, transports: list[str]) -> None:
        if "udp" in transports:
            self.udp, _ = await self.loop.create_datagram_endpoint(lambda: _UdpProtocol(self), local_addr=(host, port))
            sock = self.udp.get_extra_info("sockname")
            port = port or sock[1]
            self.stack.local["udp"] = (host, sock[1])
        if "tcp" in transports:
            self.tcp_server = await self.loop.create_server(lambda: _TcpConnection(self), host, port)
            self.stack.local["tcp"] = (host, self.tcp_server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self._timer:
            self._timer.cancel()
        if self.udp:
            self.udp.close()
        if self.tcp_server:
            self.tcp_server.close()
        for conn in list(self.connections.values()):
            conn.transport.close()

    # -- the service loop: after any input, drain events, send, re-arm the timer
    def received(self, data: bytes, source: Target) -> None:
        try:
            self.stack.receive(data, source, self.now())
        except Exception:  # a bug must never take the transport down
            logger.exception("sip.receive_failed", extra={"fields": {"source": f"{source.host}:{source.port}"}})
        self.service()

    def service(self) -> None:
        self.on_events()
        for out in self.stack.datagrams_to_send():
            self._send(out)
        when = self.stack.get_timer()
        if when != self._timer_at:
            if self._timer:
                self._timer.cancel()
            self._timer = self.loop.call_at(when, self._fire) if when is not None else None
            self._timer_at = when

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = None
        self.stack.handle_timer(self.now())
        self.service()

    def _send(self, out: Outgoing) -> None:
        target = out.target
        if target.transport == "udp":
            if self.udp is not None:
                self.udp.sendto(out.data, (target.host, target.port))
            return
        conn_id = target.conn if target.conn in self.connections else self.by_peer.get((target.host, target.port))
        if conn_id is not None and conn_id in self.connections:
            self.connections[conn_id].transport.write(out.data)
            return
        key = (target.host, target.port)
        if key in self._pending_connect:
            self._pending_connect[key].append(out.data)
            return
        self._pending_connect[key] = [out.data]
        self.loop.create_task(self._connect(key))

    async def _connect(self, key: tuple[str, int]) -> None:
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: _TcpConnection(self), key[0], key[1]), 5.0
            )
        except (TimeoutError, OSError) as exc:
            log.event(logger, "sip.tcp_connect_failed", logging.WARNING, peer=f"{key[0]}:{key[1]}", error=str(exc))
            self._pending_connect.pop(key, None)
            return
        for data in self._pending_connect.pop(key, []):
            conn.transport.write(data)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: SipTransport) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        self.owner.received(data, Target("udp", addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.event(logger, "sip.udp_error", logging.DEBUG, error=str(exc))


class _TcpConnection(asyncio.Protocol):
    def __init__(self, owner: SipTransport) -> None:
        self.owner = owner
        self.framer = StreamFramer()
        self.id = next(owner._conn_ids)
        self.transport: asyncio.Transport
        self.peer: tuple[str, int] = ("", 0)
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1])
        if len(self.owner.connections) >= MAX_TCP_CONNECTIONS:
            log.event(logger, "sip.tcp_refused", logging.WARNING, peer=f"{peer[0]}:{peer[1]}", reason="too many connections")
            transport.close()
            return
        self.owner.connections[self.id] = self
        self.owner.by_peer[self.peer] = self.id
        self._arm_idle()

    def _arm_idle(self) -> None:
        if self._idle:
            self._idle.cancel()
        self._idle = self.owner.loop.call_later(TCP_IDLE_TIMEOUT, self.transport.close)

    def data_received(self, data: bytes) -> None:
        self._arm_idle()
        try:
            messages = self.framer.feed(data)
        except FramingError as exc:
            log.event(logger, "sip.tcp_framing_error", logging.WARNING, peer=f"{self.peer[0]}:{self.peer[1]}", error=str(exc))
            self.transport.close()
            return
        if self.framer.pongs:
            self.transport.write(b"\r\n" * self.framer.pongs)
            self.framer.pongs = 0
        for message in messages:
            self.owner.received(message, Target("tcp", self.peer[0], self.peer[1], self.id))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._idle:
            self._idle.cancel()
        self.owner.connections.pop(self.id, None)
        if self.owner.by_peer.get(self.peer) == self.id:
            del self.owner.by_peer[self.peer]
