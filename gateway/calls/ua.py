"""The worker's user agent: admits inbound calls (trunks, DIDs, limits), dispatches SIP events to calls.

Admission of an INVITE, in order: capacity (503), trunk allow-list or digest (401/403; 400 when the
digest `uri` is not the Request-URI), Request-URI scheme (416), Require (420), body type (415), DID (404),
session interval (422), SDP (488), RTP port (503).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable

from .. import log, tls
from ..adapters.clock import MediaClock
from ..adapters.ports import PortAllocator, PortsExhausted
from ..adapters.rtp_session import RtpSession
from ..adapters.sip_transport import SipTransport
from ..config import Config, DidConfig, TrunkConfig
from ..media.dtmf import parse_info
from ..sip.auth import DigestServer
from ..sip.message import KNOWN_METHODS, Request, Response, SipParseError, SipUri, ascii_digits, make_response
from ..sip.sdp import MediaParams, SdpError
from ..sip.transaction import (
    ALLOW,
    AckTimedOut,
    CancelReceived,
    ClientTransaction,
    MalformedMessage,
    RequestReceived,
    ResponseReceived,
    ServerInviteTransaction,
    ServerTransaction,
    SipStack,
    Target,
    TransactionTimedOut,
    _is_ip,
    new_tag,
)
from ..store.cdr import CdrStore
from .call import Call

logger = logging.getLogger("gateway.ua")
RECENTLY_ENDED = 2000  # how many ended calls the API can still name as ended (not unknown)
LISTS_READ_LATER = ("supported", "allow")  # comma-list headers a call reads after it exists

App = Callable[[Call], Awaitable[None]]
AUTH_FAILURE_LIMIT = 10  # failed digest attempts per source address ...
AUTH_FAILURE_WINDOW = 60.0  # ... per this many seconds, then 403 without a challenge
AUTH_FAILURE_SOURCES = 10_000  # addresses whose failures are remembered at most (the oldest are forgotten)


class UserAgent:
    def __init__(self, config: Config, cdr: CdrStore, clock: MediaClock, apps: dict[str, App]) -> None:
        self.config = config
        self.cdr = cdr
        self.clock = clock
        self.apps = apps
        self.stack = SipStack(server_header=config.sip.user_agent)
        self.transport: SipTransport | None = None
        self.ports = PortAllocator(config.rtp.port_min, config.rtp.port_max)
        self.calls: dict[str, Call] = {}  # voice_id -> call
        self.dialogs: dict[tuple[str, str, str], Call] = {}
        self.pending: dict[int, Call] = {}  # id(invite txn) -> call not yet answered
        self.digest = DigestServer(realm=config.trunks[0].realm if config.trunks else "gateway",
                                   algorithms=tuple(config.sip.digest_algorithms),
                                   lifetime=float(config.sip.digest_nonce_lifetime_s))
        self._auth_failures: dict[str, list[float]] = {}
        self.accepting = True
        self.allow = ALLOW
        self.media_host = config.sip.public_host or config.sip.host  # in Contact and SDP; sockets bind to sip.host
        self.trusted_sources: dict[str, TrunkConfig] = {}  # registrar addresses (REGISTER client)
        self.find_did: Callable[[str], DidConfig | None] = config.did  # the worker adds the projects' numbers
        self.listener: Callable[[Call, str, dict[str, object]], None] | None = None  # webhooks, metrics, registry
        self.calls_started = 0  # calls admitted since start (the supervisor's call rate)
        # calls that ended lately: voice_id -> (project, reason), so the API can tell "ended" from "never was"
        self.recently_ended: OrderedDict[str, tuple[str, str]] = OrderedDict()
        self.refused: Counter[str] = Counter()  # INVITEs refused at admission, by reason (metrics)
        self.overloaded: Callable[[], bool] = lambda: False  # the worker's CPU check
        self.lb_sources = set(config.cluster.lb_sources)  # a balancer in front: its X-Gateway-Source is trusted
        self._trunk_networks = [net for t in config.trunks for net in t.networks()]
        self._proxies = {p for t in config.trunks if t.outbound for p in [_literal_host(t.outbound.proxy)] if p}
        self._trusted_cache: dict[str, bool] = {}

    def on_call_event(self, call: Call, state: str, data: dict[str, object]) -> None:
        if self.listener is not None:
            try:
                self.listener(call, state, data)
            except Exception:
                logger.exception("call.listener_failed", extra={"fields": {"voice_id": call.voice_id}})

    async def start(self) -> None:
        self.transport = SipTransport(self.stack, self._drain_events, self.config.sip, self.trusted_source)
        sip = self.config.sip
        secure = "tls" in sip.transports
        tls_server = tls.server_context(sip.tls_cert, sip.tls_key, http=False, client_ca=sip.tls_client_ca) \
            if secure else None
        ours = (sip.tls_cert, sip.tls_key) if secure and tls.for_clients(sip.tls_cert) else ()  # shown if asked
        await self.transport.start(sip.host, sip.port, sip.transports, sip.tls_port, tls_server,
                                   tls.client_context(sip.tls_ca, *ours))

    def close(self) -> None:
        for call in list(self.calls.values()):
            call.hangup("shutdown")
        if self.transport:
            self.transport.service()
            self.transport.close()

    def now(self) -> float:
        assert self.transport is not None
        return self.transport.now()

    def contact(self, transport: str, sips: bool = False) -> str:
        """Our Contact for `transport`; `sips`: the dialog was set up for a sips: Request-URI over TLS, so the
        Contact is a sips: URI too (RFC 3261 12.1.1; RFC 5630: no transport=tls with sips)."""
        host, port = self.stack.local.get(transport, (self.config.sip.host, self.config.sip.port))
        host = self.config.sip.public_host or host
        h = f"[{host}]" if ":" in host else host
        if sips and transport == "tls":
            return f"<sips:gateway@{h}:{port}>"
        suffix = f";transport={transport}" if transport in ("tcp", "tls") else ""
        return f"<sip:gateway@{h}:{port}{suffix}>"

    # -- sending
    def respond(self, txn: ServerTransaction, response: Response) -> None:
        if "server" not in response.headers:
            response.headers.add("Server", self.config.sip.user_agent)
        txn.respond(response, self.now())  # type: ignore[attr-defined]
        self.flush()

    def flush(self) -> None:
        if self.transport is not None:
            self.transport.service()

    def request(self, request: Request, target: Target) -> asyncio.Future[Response | None]:
        """Send an out-of-dialog request; the future gets its final response (None on timeout)."""
        fut: asyncio.Future[Response | None] = asyncio.get_running_loop().create_future()

        def done(response: Response | None) -> None:
            if not fut.done():
                fut.set_result(response)

        txn = self.stack.send_request(request, target, self.now())
        if txn is not None:
            txn.user = (None, done)
        self.flush()
        return fut

    def in_dialog_target(self, call: Call) -> Target:
        assert call.dialog is not None
        target = call.dialog.destination()
        if not _is_ip(target.host):
            target = Target(target.transport, call.source.host, call.source.port)
        if target.transport == call.source.transport and call.source.reliable:  # the caller's TCP/TLS connection
            target = Target(target.transport, target.host, target.port, call.source.conn)
        return target

    def send_in_dialog(self, call: Call, request: Request, on_final: Callable[[Response | None], None] | None = None) -> None:
        txn = self.stack.send_request(request, self.in_dialog_target(call), self.now())
        if txn is not None:
            txn.user = (call, on_final)
        self.flush()

    # -- events from the stack
    def _drain_events(self) -> None:
        while (ev := self.stack.next_event()) is not None:
            try:
                self._handle(ev)
            except Exception:
                logger.exception("sip.event_failed", extra={"fields": {"event": type(ev).__name__}})

    def _handle(self, ev: object) -> None:
        if isinstance(ev, RequestReceived):
            try:
                self._on_request(ev.request, ev.transaction, ev.source)
            except SipParseError as e:  # a header parsed lazily, on first use, was malformed
                self._refuse_malformed(ev.request, ev.transaction, ev.source, str(e))
        elif isinstance(ev, CancelReceived):
            call = self.pending.get(id(ev.invite))
            if call is not None:
                call.reject(487, why="cancelled", by="caller")
        elif isinstance(ev, ResponseReceived):
            self._on_response(ev.response, ev.transaction)
        elif isinstance(ev, AckTimedOut):
            call = self.dialogs.get(self._dialog_key_from_invite(ev.transaction.request))
            if call is not None:
                call.hangup("ack_timeout")
        elif isinstance(ev, TransactionTimedOut):
            user = ev.transaction.user
            if isinstance(user, tuple):
                call, on_final = user
                if on_final:
                    on_final(None)
        elif isinstance(ev, MalformedMessage):
            log.event(logger, "sip.malformed", logging.WARNING, source=f"{ev.source.host}:{ev.source.port}",
                      reason=ev.reason, answered=ev.answered)

    def _refuse_malformed(self, request: Request, txn: ServerTransaction | None, source: Target, reason: str) -> None:
        answered = None
        if txn is not None and (txn.last_response is None or txn.last_response.status < 200):
            try:
                self.respond(txn, make_response(request, 400, "Bad Request"))
                answered = 400
            except SipParseError:
                pass  # not even a response can be built from it: dropped
        log.event(logger, "sip.malformed", logging.WARNING, source=f"{source.host}:{source.port}", reason=reason,
                  answered=answered)

    def _dialog_key_from_invite(self, invite: Request) -> tuple[str, str, str]:
        for call in self.calls.values():
            if call.invite is invite and call.dialog is not None:
                return call.dialog.id
        return ("", "", "")

    def _on_response(self, response: Response, txn: ClientTransaction) -> None:
        user = txn.user
        if not isinstance(user, tuple):
            return
        call, on_final = user
        if call is not None and txn is getattr(call, "client_invite", None):
            on_final(response)  # a dial-out INVITE: its call sees every response, provisional too
            return
        if txn.method == "INVITE" and 200 <= response.status < 300 and call is not None and call.dialog is not None:
            ack = call.dialog.create_ack(response.cseq[0])
            self.stack.send_request(ack, txn.target, self.now())
        if response.status >= 200 and on_final is not None:
            on_final(response)

    def _on_request(self, request: Request, txn: ServerTransaction | None, source: Target) -> None:
        to_tag = request.to.tag
        if to_tag:
            key = (request.call_id, to_tag, request.from_.tag or "")
            call = self.dialogs.get(key)
            if call is not None:
                call.handle_request(request, txn)
            elif txn is not None:
                if request.method == "OPTIONS":
                    self._answer_options(request, txn)
                else:
                    self.respond(txn, make_response(request, 481))
            return
        if txn is None:
            return  # a stray ACK
        method = request.method
        refusal = self._precheck(request)
        if refusal is not None:
            self.respond(txn, refusal)
            return
        if method == "INVITE":
            assert isinstance(txn, ServerInviteTransaction)
            self._on_invite(request, txn, source)
        elif method == "OPTIONS":
            self._answer_options(request, txn)
        elif method in ("BYE", "INFO", "UPDATE"):
            self.respond(txn, make_response(request, 481))
        else:  # a method we know but do not serve (REGISTER: we are not a registrar)
            r = make_response(request, 405)
            r.headers.add("Allow", self.allow)
            self.respond(txn, r)

    def _precheck(self, request: Request) -> Response | None:
        """Checks every out-of-dialog request passes (RFC 3261 8.2.1-8.2.3, RFC 4475 3.3)."""
        if request.method not in KNOWN_METHODS:
            r = make_response(request, 501)
            r.headers.add("Allow", self.allow)
            return r
        if request.ruri.scheme not in ("sip", "sips"):
            return make_response(request, 416)
        for name in LISTS_READ_LATER:  # split now, so a malformed one is a 400 here and not an error mid-call
            request.headers.get_all(name)
        unsupported = [o for o in request.headers.get_all("require") if o.lower() != "timer"]
        if unsupported:
            r = make_response(request, 420)
            r.headers.add("Unsupported", ", ".join(unsupported))
            return r
        accept = [a.split(";")[0].strip().lower() for a in request.headers.get_all("accept")]
        if request.method == "INVITE" and accept and not {"application/sdp", "application/*", "*/*"} & set(accept):
            r = make_response(request, 406)
            r.headers.add("Accept", "application/sdp")
            r.headers.add("Warning", '399 gateway "only application/sdp bodies are supported"')
            return r
        return None

    def _answer_options(self, request: Request, txn: ServerTransaction) -> None:
        status = 200 if self.accepting else 503
        r = make_response(request, status)
        r.headers.add("Allow", self.allow)
        r.headers.add("Accept", "application/sdp")
        r.headers.add("Supported", "timer")
        self.respond(txn, r)

    def trusted_source(self, host: str) -> bool:
        """Whether the flood limits leave `host` alone: a trunk's allow-list, a registrar or outbound proxy
        of ours, or the balancer in front (Kamailio's advice for pike: never limit trusted peers). O(1)."""
        if host in self.lb_sources or host in self.trusted_sources or host in self._proxies:
            return True
        known = self._trusted_cache.get(host)
        if known is None:
            try:
                addr = ipaddress.ip_address(host)
            except ValueError:
                return False
            known = any(addr in net for net in self._trunk_networks)
            if len(self._trusted_cache) >= 4096:
                self._trusted_cache.clear()
            self._trusted_cache[host] = known
        return known

    # -- admission of new calls
    def peer(self, request: Request, source: Target) -> str:
        """The caller's address: the packet's source, or what the balancer in front says it was."""
        forwarded = request.headers.get("x-gateway-source") if source.host in self.lb_sources else None
        return forwarded.strip() if forwarded else source.host

    def edge(self, request: Request, source: Target) -> tuple[str, list[str]]:
        """The transport a request came in on and the names of its verified TLS client certificate: what our
        balancer says (X-Gateway-Transport, X-Gateway-Client-Names: Kamailio ends TLS) when it came through one
        (cluster.lb_sources), else our own connection's."""
        if self.config.cluster.lb_tls_headers and source.host in self.lb_sources:
            said = (request.headers.get("x-gateway-transport") or "").strip().lower()
            if said in ("udp", "tcp", "tls"):
                names = [tls.name_key(n) for n in (request.headers.get("x-gateway-client-names") or "").split(",")]
                return said, [n for n in names if n and n != "<null>"] if said == "tls" else []
        names = self.transport.peer_names(source) if self.transport is not None and source.transport == "tls" else []
        return source.transport, names

    @staticmethod
    def _client_certified(trunk: TrunkConfig, transport: str, names: list[str]) -> bool:
        """Mutual TLS: the call came over TLS with a client certificate verified against sip.tls_client_ca (the
        handshake refused a bad one) naming one of the trunk's tls_client_names (any name when none are set)."""
        wanted = {tls.name_key(n) for n in trunk.tls_client_names}
        return transport == "tls" and bool(names) and (not wanted or bool(wanted & set(names)))

    def _trunk_for(self, request: Request, source: Target) -> tuple[TrunkConfig | None, int, str]:
        """The trunk a call comes from, or (None, status, why): 401 (challenge; why "stale" when the
        credentials were right but the nonce may not be used again), 400 (digest uri is not the
        Request-URI) or 403."""
        host = self.peer(request, source)
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            return None, 403, ""
        matches = [(net.prefixlen, -i, trunk) for i, trunk in enumerate(self.config.trunks) for net in trunk.networks()
                   if addr in net]
        if matches:  # the most specific network wins (a /32 trunk inside a /8 one), then the first listed
            return max(matches, key=lambda m: m[:2])[2], 0, ""
        if host in self.trusted_sources:
            return self.trusted_sources[host], 0, ""
        users = {t.username: t for t in self.config.trunks if t.username}
        if not users:
            return None, 403, ""
        now = time.time()
        failures = [t for t in self._auth_failures.pop(host, []) if t > now - AUTH_FAILURE_WINDOW]
        if failures:  # kept only while failures are recent, and for AUTH_FAILURE_SOURCES addresses at most
            self._auth_failures[host] = failures
        if len(failures) >= AUTH_FAILURE_LIMIT:
            return None, 403, ""
        authorization = request.headers.get("authorization")
        if not authorization:
            return None, 401, ""
        result = self.digest.check(authorization, request.method, {u: t.password for u, t in users.items()},
                                   source=host, request_uri=request.uri)
        if result.user is not None:
            return users[result.user], 0, ""
        if not result.stale:
            failures.append(now)
            self._auth_failures[host] = failures
            if len(self._auth_failures) > AUTH_FAILURE_SOURCES:
                del self._auth_failures[next(iter(self._auth_failures))]
        return None, result.status, "stale" if result.stale else result.reason

    def _reject(self, request: Request, txn: ServerInviteTransaction, status: int, reason: str = "", **extra: str) -> None:
        r = make_response(request, status, reason, to_tag=new_tag())
        for name, value in extra.items():
            r.headers.add(name.replace("_", "-"), value)
        self.respond(txn, r)

    def _on_invite(self, request: Request, txn: ServerInviteTransaction, source: Target) -> None:
        transport, names = self.edge(request, source)
        fields = {"source": f"{self.peer(request, source)}:{source.port}", "transport": transport,
                  "call_id": request.call_id}
        busy = "draining" if not self.accepting else "at_capacity" if len(self.calls) >= self.config.sip.max_calls \
            else "cpu_overload" if self.overloaded() else ""
        if busy:
            self._reject(request, txn, 503, "Service Unavailable", Retry_After="5")
            self.refused[busy] += 1
            log.event(logger, "call.refused", logging.WARNING, reason=busy, **fields)
            return
        trunk, status, why = self._trunk_for(request, source)
        if trunk is None:
            if status == 401:
                r = make_response(request, 401, to_tag=new_tag())
                for challenge in self.digest.challenges(source=self.peer(request, source), stale=why == "stale"):
                    r.headers.add("WWW-Authenticate", challenge)
                self.respond(txn, r)
                failed = "authorization" in request.headers and why != "stale"
                log.event(logger, "call.auth_failed" if failed else "call.challenged",
                          logging.WARNING if failed else logging.INFO, **({"why": why} if why else {}), **fields)
            elif status == 400:
                self._reject(request, txn, 400, "Bad Request",
                             Warning='399 gateway "the digest uri is not the Request-URI"')
                self.refused["auth_failed"] += 1
                log.event(logger, "call.auth_failed", logging.WARNING, why=why, **fields)
            else:
                self._reject(request, txn, 403, "Forbidden")
                self.refused["source_not_allowed"] += 1
                log.event(logger, "call.refused", logging.WARNING, reason="source_not_allowed", **fields)
            return
        if (trunk.tls_client_certificate or trunk.tls_client_names) and not self._client_certified(trunk, transport, names):
            self._reject(request, txn, 403, "Forbidden")  # as any refusal: no hint that a password was right
            self.refused["client_certificate"] += 1
            log.event(logger, "call.refused", logging.WARNING, reason="client_certificate", trunk=trunk.name,
                      names=",".join(names), **fields)
            return
        ruri = request.ruri
        if request.body and request.content_type != "application/sdp":
            self._reject(request, txn, 415, "Unsupported Media Type", Accept="application/sdp")
            return
        number = (ruri.user or "").split(";")[0]
        did = self.find_did(number)
        if did is None and request.to.uri.user:  # delivered to our registered contact: the DID is in To
            number = request.to.uri.user.split(";")[0]
            did = self.find_did(number)
        if did is not None and did.route == "off":  # the project takes no inbound calls (voice.in = false)
            self._reject(request, txn, 403, "Forbidden")
            self.refused["inbound_disabled"] += 1
            log.event(logger, "call.refused", logging.INFO, reason="inbound_disabled", did=number, project=did.project,
                      **fields)
            return
        if did is None or did.route not in self.apps:
            self._reject(request, txn, 404, "Not Found")
            self.refused["unknown_did"] += 1
            log.event(logger, "call.refused", logging.INFO, reason="unknown_did", did=number, **fields)
            return
        se = request.headers.get("session-expires")
        if se:
            value = se.split(";")[0].strip()
            if not ascii_digits(value) or int(value) < self.config.sip.min_se:
                self._reject(request, txn, 422, "Session Interval Too Small", Min_SE=str(self.config.sip.min_se))
                return
        self._start_call(request, txn, source, trunk, did, transport)

    def _start_call(self, request: Request, txn: ServerInviteTransaction, source: Target, trunk: TrunkConfig,
                    did: DidConfig, transport: str) -> None:
        from_ = request.from_
        caller = from_.uri.user or from_.uri.host
        call = Call(self, request, txn, source, trunk=trunk.name, did=did.number, project=did.project, caller=caller,
                    route=did.route)
        call.encryption = trunk.media_encryption
        call.edge_transport = transport
        self.calls[call.voice_id] = call
        self.calls_started += 1
        call.pending_key = id(txn)
        self.pending[id(txn)] = call
        self.cdr.open_call(call.voice_id, "inbound", **{"from": caller, "to": did.number, "did": did.number,
                           "trunk": trunk.name, "project": did.project, "source": f"{source.host}:{source.port}",
                           "transport": transport, "call_id": request.call_id, "route": did.route})
        log.event(logger, "call.initiated", voice_id=call.voice_id, did=did.number, trunk=trunk.name,
                  caller=caller, route=did.route, transport=transport)
        self.on_call_event(call, "initiated", {"from": caller, "to": did.number, "route": did.route})
        try:
            if request.body:
                params = call.negotiate_offer(request.body)
            else:
                params = MediaParams(source.host, 0, self.config.rtp.codecs[0], 0 if self.config.rtp.codecs[0] == "PCMU" else 8,
                                     self.config.rtp.telephone_event_pt, "sendrecv")
        except SdpError as exc:
            r = call._response(488)
            r.headers.add("Warning", f'304 gateway "{exc}"')
            self.respond(txn, r)
            call.invite_txn = None
            call._end("incompatible_sdp", 488, error=str(exc))
            return
        call._negotiate_session_timer(request)
        call.task = asyncio.get_running_loop().create_task(self._run_call(call, params, did))

    async def _run_call(self, call: Call, params: MediaParams, did: DidConfig) -> None:
        rtp = self.config.rtp
        media = RtpSession(self.clock, self.ports, params, (rtp.jitter_min_ms, rtp.jitter_max_ms),
                           (rtp.strict_learning_ms, rtp.strict_learning_packets))
        media.require_srtp = call.encryption == "required"
        try:
            await media.open(self.config.sip.host)  # the SDP says media_host (public_host behind a NAT)
        except (OSError, PortsExhausted) as exc:
            call.reject(503, "Service Unavailable", why="no_rtp_port", error=str(exc))
            return
        call.media = media
        if call.ended.is_set():  # cancelled while we were binding
            media.close()
            return
        await call.supervise(self._answer_and_run(call, did))

    async def _answer_and_run(self, call: Call, did: DidConfig) -> None:
        if did.answer_after_ms > 0:
            await call.ring()
            try:
                await asyncio.wait_for(call.ended.wait(), did.answer_after_ms / 1000)
            except TimeoutError:
                pass
        await self.apps[did.route](call)

    def register_dialog(self, call: Call) -> None:
        assert call.dialog is not None
        self.dialogs[call.dialog.id] = call
        self.pending.pop(call.pending_key, None)

    def forget(self, call: Call) -> None:
        if self.calls.pop(call.voice_id, None) is not None:
            self.recently_ended[call.voice_id] = (str(call.info.get("project", "")), call.end_reason or call.state)
            while len(self.recently_ended) > RECENTLY_ENDED:
                self.recently_ended.popitem(last=False)
        if call.dialog is not None:
            self.dialogs.pop(call.dialog.id, None)
        self.pending.pop(call.pending_key, None)
        self.flush()

    def on_info(self, call: Call, request: Request) -> None:
        digit = parse_info(request.content_type, request.body)
        if digit is not None and call.audio is not None:
            call.audio.digit(digit, "info")


def _literal_host(uri: str) -> str:
    """The host of a sip: URI when it is an IP address (a name resolves later, per call), else ""."""
    try:
        host = SipUri.parse(uri).host
        ipaddress.ip_address(host)
    except ValueError:  # SipParseError is one
        return ""
    return host
