"""SIP transactions (RFC 3261 section 17, with the RFC 6026 Accepted states) as a sans-I/O stack.

`SipStack` is fed datagrams or framed stream messages with `receive(data, source, now)` and timer
expiries with `handle_timer(now)`. It never sleeps and never touches a socket: what it wants sent comes
out of `datagrams_to_send()`, what the application must handle comes out of `next_event()`, and
`get_timer()` says when to call `handle_timer` next. The asyncio transports are thin loops around it.
"""

from __future__ import annotations

import heapq
import ipaddress
import itertools
import os
from collections import deque
from dataclasses import dataclass, field

from .message import Headers, Request, Response, SipParseError, Via, ascii_digits, make_response, parse_message

T1 = 0.5
T2 = 4.0
T4 = 5.0
MAGIC = "z9hG4bK"


@dataclass(frozen=True)
class Target:
    """Where a message goes or came from. `conn` names a stream connection (TCP, TLS) to reuse."""

    transport: str  # "udp", "tcp" or "tls"
    host: str
    port: int
    conn: int | None = None
    name: str | None = None  # the name `host` was resolved from (a proxy's): what a TLS certificate must match

    @property
    def reliable(self) -> bool:
        return self.transport != "udp"


@dataclass
class Outgoing:
    data: bytes
    target: Target


# ---------------------------------------------------------------- events


@dataclass
class RequestReceived:
    request: Request
    source: Target
    transaction: ServerTransaction | None  # None for ACK of a 2xx (no transaction)


@dataclass
class ResponseReceived:
    response: Response
    transaction: ClientTransaction


@dataclass
class CancelReceived:
    cancel: Request
    invite: ServerInviteTransaction


@dataclass
class TransactionTimedOut:
    transaction: ClientTransaction | ServerTransaction


@dataclass
class AckTimedOut:
    """A 2xx to INVITE was retransmitted for 64*T1 without an ACK (RFC 3261 section 13.3.1.4)."""

    transaction: ServerInviteTransaction


@dataclass
class MalformedMessage:
    reason: str
    source: Target
    answered: int | None  # status sent back, or None when dropped


Event = RequestReceived | ResponseReceived | CancelReceived | TransactionTimedOut | AckTimedOut | MalformedMessage


def new_branch() -> str:
    return MAGIC + os.urandom(8).hex()


def new_tag() -> str:
    return os.urandom(6).hex()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------- transactions


class _Transaction:
    state: str

    def __init__(self, stack: SipStack, request: Request, target: Target) -> None:
        self.stack = stack
        self.request = request
        self.target = target
        self.timers: dict[str, float] = {}
        self.user: object = None  # slot for the owner (call, registration) to find its way back

    @property
    def reliable(self) -> bool:
        return self.target.reliable

    def _set_timer(self, name: str, when: float) -> None:
        self.timers[name] = when
        self.stack._schedule(self, when)

    def _on_timer(self, now: float) -> None:
        for name, when in sorted(self.timers.items(), key=lambda kv: kv[1]):
            if when <= now and self.timers.get(name) == when:
                del self.timers[name]
                getattr(self, "_timer_" + name)(now)

    def _terminate(self) -> None:
        self.state = "terminated"
        self.timers.clear()
        self.stack._forget(self)


class ServerTransaction(_Transaction):
    last_response: Response | None = None

    @property
    def method(self) -> str:
        return self.request.method

    def _send(self, response: Response) -> None:
        self.last_response = response
        self.stack._send(response.serialize(), self.target)

    def _retransmitted(self, now: float) -> None:
        if self.last_response is not None and self.state != "confirmed":
            self.stack._send(self.last_response.serialize(), self.target)


class ServerInviteTransaction(ServerTransaction):
    """proceeding -> (accepted | completed -> confirmed) -> terminated."""

    def __init__(self, stack: SipStack, request: Request, target: Target, now: float) -> None:
        super().__init__(stack, request, target)
        self.state = "proceeding"
        self._g = T1
        self.ack_key = (request.call_id, request.cseq[0])
        self._send(make_response(request, 100))

    def respond(self, response: Response, now: float) -> None:
        if self.state != "proceeding":
            raise RuntimeError(f"INVITE transaction already {self.state}")
        self._send(response)
        if response.status < 200:
            return
        if response.status < 300:
            # RFC 6026 Accepted: the UAS core retransmits the 2xx until the ACK arrives.
            self.state = "accepted"
            self.stack._awaiting_ack[self.ack_key] = self
            self._set_timer("g", now + self._g)
            self._set_timer("l", now + 64 * T1)
        else:
            self.state = "completed"
            if not self.reliable:
                self._set_timer("g", now + self._g)
            self._set_timer("h", now + 64 * T1)

    def _timer_g(self, now: float) -> None:
        if self.state in ("accepted", "completed") and self.last_response is not None:
            self.stack._send(self.last_response.serialize(), self.target)
            self._g = min(2 * self._g, T2)
            self._set_timer("g", now + self._g)

    def _timer_h(self, now: float) -> None:
        if self.state == "completed":
            self.stack._events.append(TransactionTimedOut(self))
            self._terminate()

    def _timer_l(self, now: float) -> None:
        if self.state == "accepted":
            self.stack._events.append(AckTimedOut(self))
            self._terminate()

    def _timer_i(self, now: float) -> None:
        self._terminate()

    def ack_received(self, now: float, for_2xx: bool) -> None:
        if self.state == "completed" and not for_2xx:
            self.state = "confirmed"
            self.timers.clear()
            self._set_timer("i", now + (0 if self.reliable else T4))
        elif self.state == "accepted" and for_2xx:
            self._terminate()

    def _terminate(self) -> None:
        self.stack._awaiting_ack.pop(self.ack_key, None)
        super()._terminate()


class ServerNonInviteTransaction(ServerTransaction):
    """trying -> proceeding -> completed -> terminated."""

    def __init__(self, stack: SipStack, request: Request, target: Target, now: float) -> None:
        super().__init__(stack, request, target)
        self.state = "trying"

    def respond(self, response: Response, now: float) -> None:
        if self.state in ("completed", "terminated"):
            return
        self._send(response)
        if response.status < 200:
            self.state = "proceeding"
        else:
            self.state = "completed"
            self._set_timer("j", now + (0 if self.reliable else 64 * T1))

    def _timer_j(self, now: float) -> None:
        self._terminate()


class ClientTransaction(_Transaction):
    def __init__(self, stack: SipStack, request: Request, target: Target, now: float) -> None:
        super().__init__(stack, request, target)
        self.branch = request.top_via.branch or ""
        self.final: Response | None = None
        self._data = request.serialize()
        self._interval = T1
        stack._send(self._data, target)

    @property
    def method(self) -> str:
        return self.request.method


class ClientInviteTransaction(ClientTransaction):
    """calling -> proceeding -> (accepted | completed) -> terminated."""

    def __init__(self, stack: SipStack, request: Request, target: Target, now: float) -> None:
        super().__init__(stack, request, target, now)
        self.state = "calling"
        if not self.reliable:
            self._set_timer("a", now + T1)
        self._set_timer("b", now + 64 * T1)

    def _timer_a(self, now: float) -> None:
        if self.state == "calling":
            self.stack._send(self._data, self.target)
            self._interval *= 2
            self._set_timer("a", now + self._interval)

    def _timer_b(self, now: float) -> None:
        if self.state == "calling":
            self.stack._events.append(TransactionTimedOut(self))
            self._terminate()

    def _timer_d(self, now: float) -> None:
        self._terminate()

    def _timer_m(self, now: float) -> None:
        self._terminate()

    def receive(self, response: Response, now: float) -> None:
        status = response.status
        if status < 200:
            if self.state in ("calling", "proceeding"):
                self.state = "proceeding"
                self.timers.pop("a", None)
                self.timers.pop("b", None)
                self.stack._events.append(ResponseReceived(response, self))
        elif status < 300:
            if self.state in ("calling", "proceeding"):
                self.state = "accepted"
                self.final = response
                self.timers.clear()
                self._set_timer("m", now + 64 * T1)
            if self.state == "accepted":
                self.stack._events.append(ResponseReceived(response, self))  # TU ACKs every 2xx
        else:
            ack = self._ack_for(response)
            if self.state in ("calling", "proceeding"):
                self.state = "completed"
                self.final = response
                self.timers.clear()
                self._set_timer("d", now + (0 if self.reliable else 32.0))
                self.stack._events.append(ResponseReceived(response, self))
            if self.state == "completed":
                self.stack._send(ack.serialize(), self.target)

    def _ack_for(self, response: Response) -> Request:
        """ACK for a non-2xx final response: same branch, To from the response (RFC 3261 17.1.1.3)."""
        req = self.request
        h = Headers()
        h.add("Via", req.headers.get_all("via")[0])
        for route in req.headers.get_all("route"):
            h.add("Route", route)
        h.add("Max-Forwards", "70")
        h.add("From", req.headers["from"])
        h.add("To", response.headers.get("to") or req.headers["to"])
        h.add("Call-ID", req.call_id)
        h.add("CSeq", f"{req.cseq[0]} ACK")
        return Request("ACK", req.uri, h)


class ClientNonInviteTransaction(ClientTransaction):
    """trying -> proceeding -> completed -> terminated."""

    def __init__(self, stack: SipStack, request: Request, target: Target, now: float) -> None:
        super().__init__(stack, request, target, now)
        self.state = "trying"
        if not self.reliable:
            self._set_timer("e", now + T1)
        self._set_timer("f", now + 64 * T1)

    def _timer_e(self, now: float) -> None:
        if self.state in ("trying", "proceeding"):
            self.stack._send(self._data, self.target)
            self._interval = T2 if self.state == "proceeding" else min(2 * self._interval, T2)
            self._set_timer("e", now + self._interval)

    def _timer_f(self, now: float) -> None:
        if self.state in ("trying", "proceeding"):
            self.stack._events.append(TransactionTimedOut(self))
            self._terminate()

    def _timer_k(self, now: float) -> None:
        self._terminate()

    def receive(self, response: Response, now: float) -> None:
        if self.state not in ("trying", "proceeding"):
            return
        if response.status < 200:
            self.state = "proceeding"
        else:
            self.state = "completed"
            self.final = response
            self.timers.clear()
            self._set_timer("k", now + (0 if self.reliable else T4))
        self.stack._events.append(ResponseReceived(response, self))


# ---------------------------------------------------------------- the stack


@dataclass
class SipStack:
    """Transaction layer plus message parsing for one worker (all transports)."""

    local: dict[str, tuple[str, int]] = field(default_factory=dict)  # transport -> (host, port) for Via
    server_header: str = "gateway"

    def __post_init__(self) -> None:
        self._server: dict[tuple[str, ...], ServerTransaction] = {}
        self._client: dict[tuple[str, str], ClientTransaction] = {}
        self._awaiting_ack: dict[tuple[str, int], ServerInviteTransaction] = {}
        self._events: deque[Event] = deque()
        self._outgoing: list[Outgoing] = []
        self._heap: list[tuple[float, int, _Transaction]] = []
        self._seq = itertools.count()

    # -- the sans-I/O surface
    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def datagrams_to_send(self) -> list[Outgoing]:
        out, self._outgoing = self._outgoing, []
        return out

    def get_timer(self) -> float | None:
        while self._heap:
            when, _, txn = self._heap[0]
            if txn.state != "terminated" and when in txn.timers.values():
                return when
            heapq.heappop(self._heap)
        return None

    def handle_timer(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            _, _, txn = heapq.heappop(self._heap)
            if txn.state != "terminated":
                txn._on_timer(now)

    @property
    def transaction_count(self) -> int:
        return len(self._server) + len(self._client)

    def receive(self, data: bytes, source: Target, now: float) -> None:
        if not data.strip(b"\r\n"):
            return  # keep-alive
        try:
            msg = parse_message(data, stream=source.reliable)
        except SipParseError as exc:
            self._reject(exc, source)
            return
        if isinstance(msg, Request):
            self._receive_request(msg, source, now)
        else:
            self._receive_response(msg, now)

    def send_request(self, request: Request, target: Target, now: float) -> ClientTransaction | None:
        """Send a request statefully (ACK is sent statelessly and returns None)."""
        if request.method != "CANCEL" or "via" not in request.headers:
            host, port = self.local.get(target.transport, ("127.0.0.1", 5060))
            via = Via(target.transport.upper(), host, port, {"branch": new_branch(), "rport": None})
            request.headers.remove("via")
            request.headers.prepend("Via", str(via))
        if request.method == "ACK":
            self._send(request.serialize(), target)
            return None
        txn: ClientTransaction
        if request.method == "INVITE":
            txn = ClientInviteTransaction(self, request, target, now)
        else:
            txn = ClientNonInviteTransaction(self, request, target, now)
        self._client[(txn.branch, request.method)] = txn
        return txn

    def cancel(self, invite: ClientInviteTransaction, now: float) -> ClientTransaction | None:
        """CANCEL a pending INVITE (RFC 3261 section 9.1): same Via branch, same R-URI."""
        req = invite.request
        h = Headers()
        h.add("Via", req.headers.get_all("via")[0])
        for route in req.headers.get_all("route"):
            h.add("Route", route)
        h.add("Max-Forwards", "70")
        for name in ("from", "to", "call-id"):
            h.add(name, req.headers[name])
        h.add("CSeq", f"{req.cseq[0]} CANCEL")
        return self.send_request(Request("CANCEL", req.uri, h), invite.target, now)

    def send_stateless(self, message: Request | Response, target: Target) -> None:
        self._send(message.serialize(), target)

    # -- internals
    def _send(self, data: bytes, target: Target) -> None:
        self._outgoing.append(Outgoing(data, target))

    def _schedule(self, txn: _Transaction, when: float) -> None:
        heapq.heappush(self._heap, (when, next(self._seq), txn))

    def _forget(self, txn: _Transaction) -> None:
        if isinstance(txn, ServerTransaction):
            for key, value in list(self._server.items()):
                if value is txn:
                    del self._server[key]
                    break
        elif isinstance(txn, ClientTransaction):
            self._client.pop((txn.branch, txn.method), None)

    def _reject(self, exc: SipParseError, source: Target) -> None:
        partial = exc.partial
        status: int | None = None
        try:
            answerable = isinstance(partial, Request) and partial.method != "ACK" and bool(partial.headers.get_all("via"))
            response = make_response(partial, exc.status, _reason(exc)) if answerable else None  # type: ignore[arg-type]
        except SipParseError:  # the headers a response copies are unreadable too: drop it (RFC 3261 18.3)
            response = None
        if response is not None:
            assert isinstance(partial, Request)
            if exc.status == 501:
                response.headers.add("Allow", ALLOW)
            try:
                self._stamp_via(partial, source)
                target = self.response_target(partial, source)
            except SipParseError:
                target = source  # a Via we cannot read (e.g. SIP/7.0): answer where the packet came from
            self._send(response.serialize(), target)
            status = exc.status
        self._events.append(MalformedMessage(exc.reason, source, status))

    @staticmethod
    def _stamp_via(request: Request, source: Target) -> None:
        """Add received/rport to the top Via (RFC 3261 18.2.1, RFC 3581 section 4)."""
        vias = request.headers.get_all("via")
        top = Via.parse(vias[0])
        if "rport" in top.params:
            top.params["rport"] = str(source.port)
            top.params["received"] = source.host
        elif top.host != source.host:
            top.params["received"] = source.host
        request.headers.remove("via")
        for i, value in enumerate(vias):
            request.headers.add("Via", str(top) if i == 0 else value)
        # Via must come first for readability; move it to the front.
        items = list(request.headers.items())
        request.headers._items = [i for i in items if i[0] == "Via"] + [i for i in items if i[0] != "Via"]

    @staticmethod
    def response_target(request: Request, source: Target) -> Target:
        """Where responses to `request` go (RFC 3261 18.2.2, RFC 3581)."""
        if source.reliable:
            return source
        top = request.top_via
        host = top.params.get("received") or top.host
        if not _is_ip(host):
            host = source.host
        rport = top.params.get("rport")
        port = int(rport) if rport and ascii_digits(rport) else (top.port or 5060)
        return Target("udp", host, port)

    def _server_key(self, request: Request, method: str) -> tuple[str, ...]:
        top = request.top_via
        branch = top.branch or ""
        if branch.startswith(MAGIC) and len(branch) > len(MAGIC):
            return (branch, top.host, str(top.port or ""), method)
        # RFC 2543 matching (RFC 3261 17.2.3, simplified): Call-ID, CSeq number, From tag, top Via.
        return ("2543", request.call_id, str(request.cseq[0]), request.from_.tag or "", str(top), method)

    def _receive_request(self, request: Request, source: Target, now: float) -> None:
        self._stamp_via(request, source)
        reply_to = self.response_target(request, source)
        method = request.method
        if method == "ACK":
            key = self._server_key(request, "INVITE")
            txn = self._server.get(key)
            if isinstance(txn, ServerInviteTransaction) and txn.state in ("completed", "confirmed"):
                txn.ack_received(now, for_2xx=False)
                return
            pending = self._awaiting_ack.get((request.call_id, request.cseq[0]))
            if pending is not None:
                pending.ack_received(now, for_2xx=True)
            self._events.append(RequestReceived(request, source, None))
            return
        key = self._server_key(request, method)
        existing = self._server.get(key)
        if existing is not None:
            existing._retransmitted(now)
            return
        if method == "CANCEL":
            invite = self._server.get(self._server_key(request, "INVITE"))
            txn = ServerNonInviteTransaction(self, request, reply_to, now)
            self._server[key] = txn
            if isinstance(invite, ServerInviteTransaction):
                txn.respond(make_response(request, 200), now)
                if invite.state == "proceeding":
                    self._events.append(CancelReceived(request, invite))
            else:
                txn.respond(make_response(request, 481), now)
            return
        server: ServerTransaction
        if method == "INVITE":
            server = ServerInviteTransaction(self, request, reply_to, now)
        else:
            server = ServerNonInviteTransaction(self, request, reply_to, now)
        self._server[key] = server
        self._events.append(RequestReceived(request, source, server))

    def _receive_response(self, response: Response, now: float) -> None:
        vias = response.headers.get_all("via")
        if len(vias) != 1:
            return  # RFC 3261 18.1.2: more than one Via means it is not for us
        try:
            branch = Via.parse(vias[0]).branch or ""
            method = response.cseq[1]
        except SipParseError:
            return
        txn = self._client.get((branch, method))
        if isinstance(txn, (ClientInviteTransaction, ClientNonInviteTransaction)):
            txn.receive(response, now)


ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, INFO, UPDATE"


def _reason(exc: SipParseError) -> str:
    if exc.status == 400:
        return f"Bad Request ({exc.reason})"[:120]
    return ""
