"""Thin asyncio transports (UDP, TCP) around the sans-I/O `SipStack`.

They only move bytes: feed what arrives into the stack with the loop's clock, send what the stack wants
sent, and keep one timer armed at `stack.get_timer()`. Nothing malformed ever raises out of here.

Floods are stopped here, before anything is parsed (the model is Kamailio's pike and its advice to leave
trusted peers alone): every message from a source outside the trunks' allow-lists takes a token from
that source's bucket (`sip.rate_limit_per_source` a second, bursts of `sip.rate_limit_burst`) and is
dropped silently when there is none, one log line per source per 10 s. TCP: at most
`sip.max_connections` (the last tenth kept for trusted sources) and `sip.max_connections_per_source`
from one untrusted address; a new connection must deliver a complete message within
`sip.tcp_first_message_s`, and one idle for `sip.tcp_idle_s` is closed, where only complete messages
(and RFC 5626 keep-alive pings) count as activity: a trickle of bytes keeps nothing open.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from .. import log
from ..config import SipConfig
from ..sip.flood import LogThrottle, SourceLimiter
from ..sip.framing import FramingError, StreamFramer
from ..sip.transaction import Outgoing, SipStack, Target
from ..sources import source_key

logger = logging.getLogger("gateway.sip")

LOG_WINDOW = 10.0  # seconds between two log lines about the same source's drops or refusals


class SipTransport:
    def __init__(self, stack: SipStack, on_events: Callable[[], None], config: SipConfig | None = None,
                 trusted: Callable[[str], bool] | None = None) -> None:
        self.stack = stack
        self.on_events = on_events  # drains stack.next_event()
        self.config = config or SipConfig()
        self.trusted = trusted or (lambda host: False)  # sources no limit applies to (trunks, balancer)
        self.loop = asyncio.get_running_loop()
        self.udp: asyncio.DatagramTransport | None = None
        self.tcp_server: asyncio.Server | None = None
        self.connections: dict[int, _TcpConnection] = {}
        self.by_peer: dict[tuple[str, int], int] = {}
        self.per_source: dict[str, int] = {}  # untrusted inbound TCP connections by source key
        self._conn_ids = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._pending_connect: dict[tuple[str, int], list[bytes]] = {}
        rate = self.config.rate_limit_per_source
        self.limiter = SourceLimiter(rate, self.config.rate_limit_burst, log_window=LOG_WINDOW) if rate > 0 else None
        self._refusals = LogThrottle(LOG_WINDOW)
        self.refused_connections = 0  # TCP connections refused by the caps, since start (metrics)

    def now(self) -> float:
        return self.loop.time()

    async def start(self, host: str, port: int, transports: list[str]) -> None:
        if "udp" in transports:
            self.udp, _ = await self.loop.create_datagram_endpoint(lambda: _UdpProtocol(self), local_addr=(host, port))
            sock = self.udp.get_extra_info("sockname")
            port = port or sock[1]
            self.stack.local["udp"] = (host, sock[1])
        if "tcp" in transports:
            self.tcp_server = await self.loop.create_server(lambda: _TcpConnection(self), host, port, backlog=1024)
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

    # -- flood limits: O(1) per message, nothing parsed, nothing logged per packet
    def admit(self, host: str, transport: str) -> bool:
        """Whether a message from `host` may go on to the stack (its source's bucket has a token)."""
        limiter = self.limiter
        if limiter is None or self.trusted(host):
            return True
        if limiter.allow(source_key(host), self.loop.time()):
            return True
        while limiter.reports:  # at most one per source per LOG_WINDOW
            key, count = limiter.reports.pop()
            log.event(logger, "sip.rate_limited", logging.WARNING, source=key, transport=transport, dropped=count,
                      window_s=LOG_WINDOW, rate=limiter.rate, burst=limiter.burst)
        return False

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
                self.loop.create_connection(lambda: _TcpConnection(self, outbound=True), key[0], key[1]), 5.0
            )
        except (TimeoutError, OSError) as exc:
            log.event(logger, "sip.tcp_connect_failed", logging.WARNING, peer=f"{key[0]}:{key[1]}", error=str(exc))
            self._pending_connect.pop(key, None)
            return
        for data in self._pending_connect.pop(key, []):
            conn.transport.write(data)

    # -- TCP connection caps
    def _open(self, conn: _TcpConnection) -> bool:
        """Count a new connection in, or say why it must be refused (then it is not counted)."""
        host = conn.peer[0]
        total = len(self.connections)
        cfg = self.config
        if conn.outbound or self.trusted(host):
            why = "too many connections" if total >= cfg.max_connections else ""
        else:
            conn.key = source_key(host)
            why = ("too many connections" if total >= cfg.max_connections - cfg.max_connections // 10
                   else "too many connections from this source"
                   if self.per_source.get(conn.key, 0) >= cfg.max_connections_per_source else "")
        if why:
            self.refused_connections += 1
            count = self._refusals.due(conn.key or host, self.loop.time())
            if count:  # one line per source per LOG_WINDOW
                log.event(logger, "sip.tcp_refused", logging.WARNING, source=conn.key or host, reason=why,
                          refused=count, window_s=LOG_WINDOW)
            conn.key = ""
            return False
        if conn.key:
            self.per_source[conn.key] = self.per_source.get(conn.key, 0) + 1
        self.connections[conn.id] = conn
        self.by_peer[conn.peer] = conn.id
        return True

    def _closed(self, conn: _TcpConnection) -> None:
        if self.connections.pop(conn.id, None) is None:
            return
        if self.by_peer.get(conn.peer) == conn.id:
            del self.by_peer[conn.peer]
        if conn.key:
            left = self.per_source.get(conn.key, 1) - 1
            if left > 0:
                self.per_source[conn.key] = left
            else:
                self.per_source.pop(conn.key, None)


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, owner: SipTransport) -> None:
        self.owner = owner

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        if self.owner.admit(addr[0], "udp"):
            self.owner.received(data, Target("udp", addr[0], addr[1]))

    def error_received(self, exc: Exception) -> None:
        log.event(logger, "sip.udp_error", logging.DEBUG, error=str(exc))


class _TcpConnection(asyncio.Protocol):
    def __init__(self, owner: SipTransport, outbound: bool = False) -> None:
        self.owner = owner
        self.outbound = outbound  # we opened it: the peer owes us no first message
        self.framer = StreamFramer()
        self.id = next(owner._conn_ids)
        self.transport: asyncio.Transport
        self.peer: tuple[str, int] = ("", 0)
        self.key = ""  # the source key it counts against (untrusted inbound connections only)
        self._deadline: asyncio.TimerHandle | None = None
        self._last_message = 0.0
        self._seen = False  # a complete message (or a keep-alive ping) has arrived on this connection
        self._open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1])
        if not self.owner._open(self):
            self.transport.abort()
            return
        self._open = True
        cfg = self.owner.config
        self._last_message = self.owner.loop.time()
        if self.outbound:
            self._arm(cfg.tcp_idle_s)
        else:
            self._arm(cfg.tcp_first_message_s)

    def _arm(self, delay: float) -> None:
        if self._deadline:
            self._deadline.cancel()
        self._deadline = self.owner.loop.call_later(delay, self._expired)

    def _expired(self) -> None:
        """The first-message deadline or the idle timer ran out: close, unless a message came meanwhile."""
        self._deadline = None
        now = self.owner.loop.time()
        if self._seen or self.outbound:
            idle_until = self._last_message + self.owner.config.tcp_idle_s
            if now < idle_until:
                self._arm(idle_until - now)
                return
            reason = "idle"
        else:
            reason = "no_first_message"
        log.event(logger, "sip.tcp_closed", logging.DEBUG, peer=f"{self.peer[0]}:{self.peer[1]}", reason=reason)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if not self._open:
            return
        try:
            messages = self.framer.feed(data)
        except FramingError as exc:
            log.event(logger, "sip.tcp_framing_error", logging.WARNING, peer=f"{self.peer[0]}:{self.peer[1]}", error=str(exc))
            self.transport.close()
            return
        if self.framer.pongs:
            self.transport.write(b"\r\n" * self.framer.pongs)
            self.framer.pongs = 0
            self._activity()
        for message in messages:
            self._activity()
            if self.owner.admit(self.peer[0], "tcp"):
                self.owner.received(message, Target("tcp", self.peer[0], self.peer[1], self.id))

    def _activity(self) -> None:
        """A complete unit arrived: the idle timer restarts from now (lazily: no timer churn per message)."""
        self._last_message = self.owner.loop.time()
        if not self._seen:
            self._seen = True
            self._arm(self.owner.config.tcp_idle_s)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline:
            self._deadline.cancel()
            self._deadline = None
        if self._open:
            self._open = False
            self.owner._closed(self)
