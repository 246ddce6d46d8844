"""Thin asyncio transports (UDP, TCP, TLS) around the sans-I/O `SipStack`.

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
import ssl
from collections.abc import Callable
from typing import Any

from .. import log, tls
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
        self.tls_server: asyncio.Server | None = None
        self.tls_client: ssl.SSLContext | None = None
        self.tls_context: ssl.SSLContext | None = None
        self.tls_refused = 0  # TLS handshakes that failed (plain text, old versions, no common cipher), since start
        self.connections: dict[int, _TcpConnection] = {}
        self.by_peer: dict[tuple[str, str, int], int] = {}  # (transport, host, port) -> connection
        self.per_source: dict[str, int] = {}  # untrusted inbound TCP connections by source key
        self._conn_ids = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._pending_connect: dict[tuple[str, str, int], list[bytes]] = {}
        rate = self.config.rate_limit_per_source
        self.limiter = SourceLimiter(rate, self.config.rate_limit_burst, log_window=LOG_WINDOW) if rate > 0 else None
        self._refusals = LogThrottle(LOG_WINDOW)
        self.refused_connections = 0  # TCP connections refused by the caps, since start (metrics)

    def now(self) -> float:
        return self.loop.time()

    async def start(self, host: str, port: int, transports: list[str], tls_port: int = 0,
                    tls_server: ssl.SSLContext | None = None, tls_client: ssl.SSLContext | None = None) -> None:
        """Listen on `transports` ("udp", "tcp" on `port`; "tls" on `tls_port` with `tls_server`); `tls_client`
        verifies the peers of the TLS connections we open."""
        self.tls_client = tls_client
        self.tls_context = tls_server
        if "udp" in transports:
            self.udp, _ = await self.loop.create_datagram_endpoint(lambda: _UdpProtocol(self), local_addr=(host, port))
            sock = self.udp.get_extra_info("sockname")
            port = port or sock[1]
            self.stack.local["udp"] = (host, sock[1])
        if "tcp" in transports:
            self.tcp_server = await self.loop.create_server(lambda: _TcpConnection(self), host, port, backlog=1024)
            self.stack.local["tcp"] = (host, self.tcp_server.sockets[0].getsockname()[1])
        if "tls" in transports and tls_server is not None:
            # plain TCP first: the connection caps apply before any handshake work, then TLS (`_TcpConnection`)
            self.tls_server = await self.loop.create_server(lambda: _TcpConnection(self, name="tls"), host, tls_port,
                                                            backlog=1024)
            self.stack.local["tls"] = (host, self.tls_server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if self._timer:
            self._timer.cancel()
        if self.udp:
            self.udp.close()
        if self.tcp_server:
            self.tcp_server.close()
        if self.tls_server:
            self.tls_server.close()
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
        key = (target.transport, target.host, target.port)
        conn_id = target.conn if target.conn in self.connections else self.by_peer.get(key)
        if conn_id is not None and conn_id in self.connections and self.connections[conn_id].name == target.transport:
            self.connections[conn_id].send(out.data)
            return
        if key in self._pending_connect:
            self._pending_connect[key].append(out.data)
            return
        self._pending_connect[key] = [out.data]
        self.loop.create_task(self._connect(key, target.name))

    async def _connect(self, key: tuple[str, str, int], name: str | None) -> None:
        # TLS: the peer's certificate verified against the system's CAs and sip.tls_ca, for the name the address
        # was resolved from (a proxy's), else for the address itself (IP subjectAltNames)
        transport, host, port = key
        secure: dict[str, Any] = {}
        if transport == "tls":
            secure = {"ssl": self.tls_client or ssl.create_default_context(), "server_hostname": name or host}
        try:
            _, conn = await asyncio.wait_for(
                self.loop.create_connection(lambda: _TcpConnection(self, outbound=True, name=transport), host, port,
                                            **secure), 5.0)
        except (TimeoutError, OSError) as exc:  # ssl.SSLError (a certificate refused) is an OSError
            log.event(logger, "sip.tcp_connect_failed", logging.WARNING, peer=f"{host}:{port}", transport=transport,
                      server_name=name or "", error=str(exc))
            self._pending_connect.pop(key, None)
            return
        for data in self._pending_connect.pop(key, []):
            conn.send(data)

    def peer_names(self, source: Target) -> list[str]:
        """The names of the verified certificate of the TLS peer `source` came from: a client's that connected to
        us, or the server's we connected to (verified for its name: e.g. a trunk we registered with over TLS,
        whose INVITEs come back on that connection); [] when there is none, or the message did not come over TLS."""
        conn = self.connections.get(source.conn) if source.conn is not None else None
        return conn.peer_names if conn is not None and conn.name == "tls" else []

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
        self.by_peer[(conn.name, *conn.peer)] = conn.id
        return True

    def refused_tls(self, conn: _TcpConnection, exc: BaseException) -> None:
        """A handshake that failed (plain text, an old TLS version, no shared cipher): one line per source per
        LOG_WINDOW. A peer that says nothing is closed by the first-message deadline."""
        self.tls_refused += 1
        key = conn.key or source_key(conn.peer[0])
        count = self._refusals.due(f"tls:{key}", self.loop.time())
        if count:
            reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else type(exc).__name__
            log.event(logger, "sip.tls_refused", logging.WARNING, source=key, reason=str(reason)[:120], refused=count,
                      window_s=LOG_WINDOW)

    def _closed(self, conn: _TcpConnection) -> None:
        if self.connections.pop(conn.id, None) is None:
            return
        if self.by_peer.get((conn.name, *conn.peer)) == conn.id:
            del self.by_peer[(conn.name, *conn.peer)]
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
    def __init__(self, owner: SipTransport, outbound: bool = False, name: str = "tcp") -> None:
        self.owner = owner
        self.outbound = outbound  # we opened it: the peer owes us no first message
        self.name = name  # "tcp", or "tls" (asyncio's SSL layer below: we see the plain text, after the handshake)
        self.framer = StreamFramer()
        self.id = next(owner._conn_ids)
        self.transport: asyncio.Transport
        self.peer: tuple[str, int] = ("", 0)
        self.key = ""  # the source key it counts against (untrusted inbound connections only)
        self._deadline: asyncio.TimerHandle | None = None
        self._last_message = 0.0
        self._seen = False  # a complete message (or a keep-alive ping) has arrived on this connection
        self._open = False
        # inbound TLS: the session in memory (asyncio's SSL transports would do the handshake before the caps
        # and tell no one of a failed one; uvloop reads before a pause in connection_made could stop it)
        self._tls: ssl.SSLObject | None = None
        self.peer_names: list[str] = []  # TLS: the names of the peer's verified certificate, if any
        self._in: ssl.MemoryBIO | None = None
        self._out: ssl.MemoryBIO | None = None
        self._secured = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = (peer[0], peer[1])
        if self.outbound and self.name == "tls":  # asyncio ran the handshake: the server's verified certificate
            self.peer_names = tls.peer_names(transport.get_extra_info("peercert"))
        if not self.owner._open(self):
            self.transport.abort()
            return
        self._open = True
        cfg = self.owner.config
        self._last_message = self.owner.loop.time()
        if self.name == "tls" and not self.outbound:  # accepted in plain TCP: TLS in memory, on this connection
            if not self.owner.admit(self.peer[0], "tls"):  # a handshake costs a signature: a token of the source's
                self.transport.abort()
                return
            context = self.owner.tls_context
            assert context is not None
            self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self._tls = context.wrap_bio(self._in, self._out, server_side=True)
        if self.outbound:
            self._arm(cfg.tcp_idle_s)
        else:
            self._arm(cfg.tcp_first_message_s)

    def send(self, data: bytes) -> None:
        if self._tls is None:
            self.transport.write(data)
            return
        if not self._secured:  # nothing of ours goes before the handshake (and write() would try to run it)
            log.event(logger, "sip.tls_not_ready", logging.DEBUG, peer=f"{self.peer[0]}:{self.peer[1]}")
            return
        try:
            self._tls.write(data)
        except ssl.SSLError:  # the session is closing (the peer's close_notify came)
            return
        self._flush()

    def _flush(self) -> None:
        assert self._out is not None
        pending = self._out.read()
        if pending:
            self.transport.write(pending)

    def _goodbye(self) -> None:
        """The peer ended the session: our close_notify back, then the connection closes (after what came with
        the peer's is handled)."""
        assert self._tls is not None
        try:
            self._tls.unwrap()
        except ssl.SSLError:
            pass
        self._flush()
        self.owner.loop.call_soon(self.transport.close)

    def _decrypt(self, data: bytes) -> bytes | None:
        """Inbound TLS: the plain text in `data` (b"" while the handshake goes on), None once the connection is
        done (a refused handshake). The peer's close_notify: what came before it, then the connection closes."""
        assert self._tls is not None and self._in is not None
        self._in.write(data)
        chunks: list[bytes] = []
        try:
            if not self._secured:
                self._tls.do_handshake()
                self._secured = True
                self.peer_names = tls.peer_names(self._tls.getpeercert())  # a verified client certificate's
            while chunk := self._tls.read(65536):
                chunks.append(chunk)
            # b"": the peer's close_notify (read() says so by returning nothing, not by raising)
            self._goodbye()
            return b"".join(chunks)
        except ssl.SSLWantReadError:
            self._flush()
            return b"".join(chunks)
        except ssl.SSLZeroReturnError:
            self._goodbye()
            return b"".join(chunks)
        except ssl.SSLError as exc:
            self._flush()  # our alert, if any
            self.transport.close()
            if not self._secured:
                self.owner.refused_tls(self, exc)
                return None
            log.event(logger, "sip.tls_error", logging.DEBUG, peer=f"{self.peer[0]}:{self.peer[1]}", error=str(exc))
            return b"".join(chunks)  # what was whole before the bad record

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
        self.transport.abort()  # not close(): a peer that stops reading would keep its slot while our buffer waits

    def data_received(self, data: bytes) -> None:
        if not self._open:
            return
        if self._tls is not None:
            plain = self._decrypt(data)
            if not plain:
                return
            data = plain
        try:
            messages = self.framer.feed(data)
        except FramingError as exc:
            log.event(logger, "sip.tcp_framing_error", logging.WARNING, peer=f"{self.peer[0]}:{self.peer[1]}", error=str(exc))
            self.transport.close()
            return
        if self.framer.pongs:
            self.send(b"\r\n" * self.framer.pongs)
            self.framer.pongs = 0
            self._activity()
        for message in messages:
            self._activity()
            if self.owner.admit(self.peer[0], self.name):
                self.owner.received(message, Target(self.name, self.peer[0], self.peer[1], self.id))

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
