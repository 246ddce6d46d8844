"""A call: one SIP dialog plus one RTP session, with a linear API for applications.

    await call.answer()
    call.media.handler = lambda frame: frame      # echo
    await call.ended.wait()

Every state change is recorded in the CDR and logged with the call's voice_id.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .. import log
from ..adapters.clock import MediaClock
from ..adapters.ports import PortAllocator
from ..adapters.rtp_session import RtpSession
from ..config import Config
from ..sip.dialog import Dialog
from ..sip.message import Request, Response, ascii_digits, make_response
from ..sip.sdp import SUITES, Crypto, MediaParams, OurOffer, SdpError, SessionDescription, build_sdp, negotiate
from ..sip.transaction import ServerInviteTransaction, ServerTransaction, SipStack, Target, new_tag
from ..store.cdr import CdrStore

logger = logging.getLogger("gateway.call")


class CallEnded(Exception):
    """The call is over (hang-up, cancel, failure); raised into the application's flow."""


class CallHost(Protocol):
    """The user agent as a call sees it (`calls.ua.UserAgent` implements it): calls depend on this, not on the UA."""

    config: Config
    cdr: CdrStore
    clock: MediaClock
    ports: PortAllocator
    stack: SipStack
    allow: str
    media_host: str
    dialogs: dict[tuple[str, str, str], Any]

    def now(self) -> float: ...

    def contact(self, transport: str, sips: bool = False) -> str: ...

    def respond(self, txn: ServerTransaction, response: Response) -> None: ...

    def flush(self) -> None:
        """Hand what the SIP stack queued to the transport."""

    def in_dialog_target(self, call: Call) -> Target: ...

    def send_in_dialog(self, call: Call, request: Request,
                       on_final: Callable[[Response | None], None] | None = None) -> None: ...

    def register_dialog(self, call: Call) -> None: ...

    def forget(self, call: Call) -> None: ...

    def on_call_event(self, call: Call, state: str, data: dict[str, object]) -> None: ...

    def on_info(self, call: Call, request: Request) -> None: ...


@dataclass
class SessionTimer:
    interval: int
    refresher: str  # "uac" (the caller refreshes) or "uas" (we do)


class Call:
    direction = "inbound"
    encryption = "none"  # the trunk's media_encryption: none | optional | required (SRTP with SDES)
    edge_transport = ""  # the transport the call reached the gateway on (TLS ends at Kamailio with --workers)

    def __init__(self, ua: CallHost, invite: Request, txn: ServerInviteTransaction | None, source: Target,
                 **info: Any) -> None:
        self.ua = ua
        self.voice_id = str(uuid.uuid4())
        self.started_at = time.time()  # wall clock, as the CDR's started_at (the console shows the duration)
        self.invite = invite
        self.invite_txn: ServerInviteTransaction | None = txn
        self.source = source
        self.info = info  # from, to, did, trunk, project
        self.local_tag = new_tag()
        self.dialog: Dialog | None = None
        self.media: RtpSession | None = None
        self.state = "initiated"
        self.ended = asyncio.Event()
        self.answered = asyncio.Event()
        self.confirmed = asyncio.Event()  # ACK received
        self.session_timer: SessionTimer | None = None
        self._refresh_handle: asyncio.TimerHandle | None = None
        self._sdp_version = 1
        self._sdp_session = int(uuid.UUID(self.voice_id).int % 10**9)
        self._awaiting_ack_answer = False
        self.end_reason = ""
        self.task: asyncio.Task[None] | None = None
        self.pending_key = 0
        self.audio: Any = None  # the IVR's CallAudio once an application sets it up
        self.control: Any = None  # the API's handle on the call (gateway.control.Steering) once it has one

    @property
    def contact(self) -> str:
        return self.ua.contact(self.source.transport, sips=self.invite.ruri.scheme == "sips")

    # -- recording
    def record(self, state: str, level: int = logging.INFO, **data: Any) -> None:
        self.state = state
        self.ua.cdr.event(self.voice_id, state, **data)
        log.event(logger, f"call.{state}", level, voice_id=self.voice_id, **data)
        self.ua.on_call_event(self, state, data)

    # -- the application API
    async def ring(self) -> None:
        self._check_alive()
        if self.invite_txn is not None and self.invite_txn.state == "proceeding":
            self.ua.respond(self.invite_txn, self._response(180))
            self.record("ringing")

    async def answer(self) -> None:
        """Send 200 OK with our SDP (answer to the caller's offer, or our offer) and wait for the ACK."""
        self._check_alive()
        txn = self.invite_txn
        assert txn is not None and self.media is not None
        response = self._response(200)
        response.headers.add("Contact", self.contact)
        response.headers.add("Allow", self.ua.allow)
        response.headers.add("Supported", "timer")
        self._add_session_timer(response)
        response.headers.add("Content-Type", "application/sdp")
        response.body = self.local_sdp()
        self._awaiting_ack_answer = not self.invite.body
        self.dialog = Dialog.as_uas(self.invite, self.local_tag, self.contact, self.source.transport)
        self.ua.register_dialog(self)
        self.media.learn()  # strict RTP: the caller learns our port now; its source is learned in the next window
        self.ua.respond(txn, response)
        self.invite_txn = None
        self.answered.set()
        self.record("answered", codec=self.media.params.codec, rtp_port=self.media.port,
                    remote_rtp=f"{self.media.params.remote_host}:{self.media.params.remote_port}",
                    **self.media_security())
        self._arm_session_timer()
        try:
            await asyncio.wait_for(self.wait_until(self.confirmed), 64 * 0.5)
        except TimeoutError:
            pass  # AckTimedOut ends the call through the transaction layer
        self._check_alive()

    async def wait_until(self, event: asyncio.Event) -> None:
        """Wait for `event`, or for the call to end, whichever comes first."""
        ended = asyncio.ensure_future(self.ended.wait())
        other = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait({ended, other}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            other.cancel()

    async def supervise(self, flow: Any) -> None:
        """Run the call's application: a hang-up (CallEnded) ends it quietly, a failure ends the call cleanly
        (BYE, reason internal_error in the CDR), and a flow that returns with the call up hangs it up."""
        try:
            await flow
        except CallEnded:
            pass
        except Exception as exc:
            logger.exception("call.app_failed", extra={"fields": {"voice_id": self.voice_id}})
            self.hangup("internal_error", error=str(exc))
        finally:
            if not self.ended.is_set():
                self.hangup("app_finished")

    def _check_alive(self) -> None:
        if self.ended.is_set():
            raise CallEnded(self.end_reason)

    def reject(self, status: int, reason: str = "", **cdr: Any) -> None:
        """Final non-2xx answer to the INVITE; ends the call."""
        if self.invite_txn is not None and self.invite_txn.state == "proceeding":
            self.ua.respond(self.invite_txn, self._response(status, reason))
            self.invite_txn = None
        self._end(cdr.pop("why", reason or "rejected"), status, **cdr)

    def hangup(self, reason: str = "gateway_hangup", **cdr: Any) -> None:
        """BYE an answered call (or 480 one still ringing)."""
        if self.ended.is_set():
            return
        if self.dialog is None:
            self.reject(480, "Temporarily Unavailable", why=reason, **cdr)
            return
        bye = self.dialog.create_request("BYE")
        bye.headers.add("Reason", f'Q.850;cause=16;text="{reason}"')
        self.ua.send_in_dialog(self, bye)
        self._end(reason, None, by="gateway", **cdr)

    def _end(self, reason: str, code: int | None, **data: Any) -> None:
        if self.ended.is_set():
            return
        self.end_reason = reason
        if self._refresh_handle:
            self._refresh_handle.cancel()
        if self.media is not None:
            data.setdefault("rtp_sent", self.media.sent)
            data.setdefault("rtp_received", self.media.received)
            data.setdefault("rtp_lost", self.media.jitter.stats.lost)
            data.setdefault("rtp_dropped", self.media.dropped_total)  # strict RTP: not from the call's source, or not RTP
            self.media.close()
        if self.audio is not None:
            data.setdefault("dtmf", dict(self.audio.digit_count))  # digits by source (rfc4733, info, inband)
        self.record("disconnected", reason=reason, code=code, **data)
        self.ended.set()
        self.ua.forget(self)

    # -- SDP
    def negotiate_offer(self, body: bytes) -> MediaParams:
        offer = SessionDescription.parse(body)
        return negotiate(offer, tuple(self.ua.config.rtp.codecs), self.encryption)

    def negotiate_answer(self, body: bytes) -> MediaParams:
        """The peer's answer to our offer: our transport, and one of the crypto lines we offered (if any)."""
        return negotiate(SessionDescription.parse(body), tuple(self.ua.config.rtp.codecs), self.encryption,
                         self._our_offer)

    def offer_crypto(self) -> tuple[str, tuple[Crypto, ...]]:
        """The m= transport and the crypto lines of an offer we make, as the trunk's media_encryption says:
        required offers RTP/SAVP; optional offers RTP/AVP with crypto lines (best-effort SDES, RFC 4568 s. 5.1.1);
        none offers plain RTP. One line per suite, tags 1 and 2, our one key."""
        if self.encryption == "none":
            return "RTP/AVP", ()
        assert self.media is not None
        lines = tuple(Crypto(tag, suite, self.media.local_key) for tag, suite in enumerate(SUITES, 1))
        return ("RTP/SAVP" if self.encryption == "required" else "RTP/AVP"), lines

    def local_sdp(self) -> bytes:
        assert self.media is not None
        if not (self.invite.body or self._answered_once):
            return self.offer_sdp()  # an INVITE without SDP: we make the offer
        p = self.media.params  # else what was negotiated (an answer, or the SDP of a re-INVITE without one)
        crypto = () if p.crypto is None else (Crypto(p.crypto.tag, p.crypto.suite, self.media.local_key),)
        self._our_offer = OurOffer(p.proto, crypto)  # what an answer to this SDP (if it is an offer) must match
        return build_sdp(self.ua.media_host, self.media.port, [(p.codec, p.payload_type)], p.dtmf_pt, p.direction,
                         self._sdp_session, self._sdp_version, proto=p.proto, crypto=crypto)

    def offer_sdp(self) -> bytes:
        """An offer of ours: every configured codec (or `offer_codecs`), telephone-event, the transport and keys the
        trunk says."""
        assert self.media is not None
        rtp = self.ua.config.rtp
        proto, crypto = self.offer_crypto()
        self._our_offer = OurOffer(proto, crypto)  # the answer must keep the transport and pick one of the lines
        codecs = self.offer_codecs or tuple(rtp.codecs)
        dtmf_pt = self.media.params.dtmf_pt  # the peer's own telephone-event type once it said one (a re-offer)
        return build_sdp(self.ua.media_host, self.media.port, [(c, 0 if c == "PCMU" else 8) for c in codecs],
                         rtp.telephone_event_pt if dtmf_pt is None else dtmf_pt, self.media.params.direction,
                         self._sdp_session, self._sdp_version, proto=proto, crypto=crypto)

    def media_security(self) -> dict[str, Any]:
        """For the CDR and logs: the signalling transport and the media encryption (never a key)."""
        assert self.media is not None
        crypto = self.media.params.crypto
        return {"transport": self.edge_transport or self.source.transport, "media_encryption": self.media.encryption,
                **({"srtp_suite": crypto.suite} if crypto is not None else {})}

    _our_offer = OurOffer()  # the transport and crypto lines of the SDP we sent last
    offer_codecs: tuple[str, ...] = ()  # the codecs our offers name; () = rtp.codecs (a forwarded leg: the caller's)

    _answered_once = False

    def _response(self, status: int, reason: str = "") -> Response:
        r = make_response(self.invite, status, reason, self.local_tag)
        r.headers.add("Server", self.ua.config.sip.user_agent)
        return r

    # -- in-dialog requests
    def handle_request(self, request: Request, txn: ServerTransaction | None) -> None:
        method = request.method
        if method == "ACK":
            self._on_ack(request)
            return
        assert txn is not None and self.dialog is not None
        if not self.dialog.accept_remote_cseq(request.cseq[0]):
            self.ua.respond(txn, make_response(request, 500, "CSeq out of order", self.local_tag))
            return
        if method == "BYE":
            self.ua.respond(txn, make_response(request, 200, "", self.local_tag))
            reason = request.headers.get("reason")
            self._end("remote_bye", 200, by="caller", **({"sip_reason": reason} if reason else {}))
        elif method in ("INVITE", "UPDATE"):
            self._on_modify(request, txn)
        elif method in ("INFO", "OPTIONS"):
            response = make_response(request, 200, "", self.local_tag)
            if method == "OPTIONS":
                response.headers.add("Allow", self.ua.allow)
            self.ua.respond(txn, response)
            if method == "INFO":
                self.ua.on_info(self, request)
        else:
            response = make_response(request, 501, "", self.local_tag)
            response.headers.add("Allow", self.ua.allow)
            self.ua.respond(txn, response)

    def _on_ack(self, request: Request) -> None:
        if self._awaiting_ack_answer and request.body:
            self._awaiting_ack_answer = False
            try:
                media = self.negotiate_answer(request.body)
            except SdpError as exc:
                self.record("media_failed", logging.WARNING, error=str(exc))
                self.hangup("bad_sdp_in_ack")
                return
            assert self.media is not None
            self.media.update(media)
            self.record("media_updated", codec=media.codec, direction=media.direction,
                        media_encryption=media.encryption)
        self._answered_once = True
        self.confirmed.set()

    def _on_modify(self, request: Request, txn: ServerTransaction) -> None:
        """re-INVITE or UPDATE: new SDP (hold, resume, new address) and/or a session refresh."""
        assert self.media is not None
        response = make_response(request, 200, "", self.local_tag)
        response.headers.add("Contact", self.contact)
        response.headers.add("Allow", self.ua.allow)
        if request.body:
            if request.content_type != "application/sdp":
                self.ua.respond(txn, make_response(request, 415, "", self.local_tag))
                return
            try:
                params = self.negotiate_offer(request.body)
            except SdpError as exc:
                bad = make_response(request, 488, "", self.local_tag)
                bad.headers.add("Warning", f'304 gateway "{exc}"')
                self.ua.respond(txn, bad)
                return
            self.media.update(params)
            self._sdp_version += 1
            self.record("media_updated", codec=params.codec, direction=params.direction, method=request.method,
                        media_encryption=params.encryption)
        elif request.method == "INVITE":
            self._awaiting_ack_answer = True  # offer in our 200, answer in the ACK
        if request.method == "INVITE" or request.body:
            response.headers.add("Content-Type", "application/sdp")
            response.body = self.local_sdp()
        self._answered_once = True
        if "session-expires" in request.headers:
            self._negotiate_session_timer(request)
        if self.session_timer:
            self._add_session_timer(response)
            self._arm_session_timer()
        self.ua.respond(txn, response)

    # -- session timers (RFC 4028)
    def _negotiate_session_timer(self, request: Request) -> None:
        se = request.headers.get("session-expires")
        supported = "timer" in [s.lower() for s in request.headers.get_all("supported")]
        cfg = self.ua.config.sip
        if se:
            value, _, params = se.partition(";")
            interval = max(int(value.strip()), cfg.min_se) if ascii_digits(value.strip()) else cfg.session_expires
            refresher = "uas" if "refresher=uas" in params.replace(" ", "").lower() else "uac"
            if not supported and "refresher=" not in params.lower():
                refresher = "uas"
            self.session_timer = SessionTimer(interval, refresher)
        elif supported and self.session_timer is None:
            self.session_timer = SessionTimer(cfg.session_expires, "uac")

    def _add_session_timer(self, response: Response) -> None:
        st = self.session_timer
        if st is None:
            return
        response.headers.add("Session-Expires", f"{st.interval};refresher={st.refresher}")
        if st.refresher == "uac" or "timer" in [s.lower() for s in self.invite.headers.get_all("supported")]:
            response.headers.add("Require", "timer")

    def _arm_session_timer(self) -> None:
        st = self.session_timer
        if st is None or self.ended.is_set():
            return
        if self._refresh_handle:
            self._refresh_handle.cancel()
        loop = asyncio.get_running_loop()
        if st.refresher == "uas":
            self._refresh_handle = loop.call_later(st.interval / 2, self._send_refresh)
        else:
            self._refresh_handle = loop.call_later(st.interval - min(32, st.interval / 3), self._session_expired)

    def _session_expired(self) -> None:
        self.hangup("session_expired")

    def _send_refresh(self) -> None:
        if self.dialog is None or self.ended.is_set():
            return
        method = "UPDATE" if "UPDATE" in self.peer_allow() else "INVITE"
        body = self.local_sdp() if method == "INVITE" else b""
        req = self.dialog.create_request(method, body, "application/sdp" if body else None)
        st = self.session_timer
        assert st is not None
        req.headers.add("Session-Expires", f"{st.interval};refresher={'uac' if self.direction == 'outbound' else 'uas'}")
        req.headers.add("Supported", "timer")
        self.ua.send_in_dialog(self, req, on_final=self._refresh_done)
        self._arm_session_timer()

    def reoffer(self, codecs: tuple[str, ...], on_done: Callable[[bool], None] | None = None) -> bool:
        """A re-INVITE of ours offering only `codecs` (a B2BUA following its other leg's codec change); `on_done`
        hears whether the answer moved the media. False when there is no confirmed dialog to send it in."""
        if self.dialog is None or self.ended.is_set() or self.media is None or not self.confirmed.is_set():
            return False
        self.offer_codecs = codecs
        self._sdp_version += 1
        req = self.dialog.create_request("INVITE", self.offer_sdp(), "application/sdp")
        req.headers.add("Allow", self.ua.allow)

        def answered(response: Response | None) -> None:
            moved = False
            if response is not None and 200 <= response.status < 300 and response.body and self.media is not None \
                    and not self.ended.is_set():
                try:
                    params = self.negotiate_answer(response.body)
                except SdpError as exc:
                    self.record("media_failed", logging.WARNING, error=str(exc))
                else:
                    self.media.update(params)
                    moved = params.codec in codecs
                    self.record("media_updated", codec=params.codec, direction=params.direction, method="reoffer",
                                media_encryption=params.encryption)
            if on_done is not None:
                on_done(moved)

        self.ua.send_in_dialog(self, req, on_final=answered)
        return True

    def peer_allow(self) -> list[str]:
        """The methods the other side allows (from its INVITE; a dial-out call reads them off the 2xx)."""
        return [a.strip().upper() for v in self.invite.headers.get_all("allow") for a in v.split(",")]

    def _refresh_done(self, response: Response | None) -> None:
        if response is None or response.status in (408, 481):
            self.hangup("session_refresh_failed", refresh_status=None if response is None else response.status)
        elif 200 <= response.status < 300 and response.body and self.media is not None and not self.ended.is_set():
            try:  # the answer to our refresh's SDP: the peer may move its media or change its SRTP key
                params = self.negotiate_answer(response.body)
            except SdpError as exc:
                self.record("media_failed", logging.WARNING, error=str(exc))
                self.hangup("incompatible_sdp", error=str(exc))
                return
            if params != self.media.params:
                self.media.update(params)
                self.record("media_updated", codec=params.codec, direction=params.direction, method="refresh",
                            media_encryption=params.encryption)
