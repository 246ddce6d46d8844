"""Dial-out: a call we place through a trunk (we are the UAC).

    call = OutboundCall(ua, trunk, to="+15551230000", from_="15550100000", ...)
    if await call.place(ring_timeout):     # INVITE (digest on 401/407), 18x -> ringing, 2xx -> ACK + media
        ...                                # then the same Call API as an inbound call

Our INVITE carries the SDP offer (PCMU/PCMA, or `offer_codecs`, + telephone-event) and any `extra_headers`; the
2xx carries the answer. A far end that answers non-2xx ends the call with its status and reason; no answer within
the ring timeout sends CANCEL (state failed, code 408). Hanging up before the answer sends CANCEL; a 2xx that crosses our CANCEL gets
ACK then BYE.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ..adapters.ports import PortsExhausted
from ..adapters.rtp_session import RtpSession
from ..config import TrunkConfig
from ..sip.auth import Credentials, DigestClient
from ..sip.dialog import Dialog
from ..sip.message import Headers, Request, Response, SipUri, ascii_digits
from ..sip.sdp import MediaParams, SdpError
from ..sip.transaction import ClientInviteTransaction, Target, _is_ip
from .call import Call, CallHost, SessionTimer

logger = logging.getLogger("gateway.outbound")
MAX_AUTH_ROUNDS = 2


class DialError(ValueError):
    """The destination cannot be dialled (malformed, no route): the API answers 400 with it."""


class DestinationDenied(DialError):
    """A well-formed destination the project may not call (a denied prefix, sip: not enabled): the API answers 403."""


E164 = re.compile(r"\+?[0-9]{6,15}")  # ASCII digits only: str.isdigit() would also pass "١٥٥٥" and "¹"
# sip:user@host[:port] and nothing else: no parameters (maddr=, transport=, lr), no headers (?X-Evil=1), no
# password, no %-escapes; the user is RFC 3261 `unreserved` plus `+` (a number, an extension, a name).
SIP_TARGET = re.compile(
    r"sip:(?P<user>[A-Za-z0-9\-_.!~*'()+]{1,64})"
    r"@(?P<host>[A-Za-z0-9](?:[A-Za-z0-9\-.]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\])"
    r"(?::(?P<port>[0-9]{1,5}))?")
VISUAL_SEPARATORS = re.compile(r"[-.()]")  # RFC 3966 visual separators a sip: user may carry in a number
NUMBER = re.compile(r"\+?[0-9]+")  # a sip: user that is a number meets the prefix rules too


@dataclass(frozen=True)
class DialRules:
    """Where a project may call: `allow_prefixes` / `deny_prefixes` are E.164 prefixes (`+` and digits); the
    longest matching prefix decides; a number no prefix matches is allowed when `allow_prefixes` is empty."""

    allow_sip_uri: bool = False
    allow_prefixes: tuple[str, ...] = ()
    deny_prefixes: tuple[str, ...] = ()

    def refusal(self, digits: str) -> str | None:
        """Why `digits` (an E.164 number without +) may not be called, or None when it may."""
        best, denied_by = -1, ""
        for prefix in self.allow_prefixes:
            p = prefix.lstrip("+")
            if digits.startswith(p) and len(p) > best:
                best, denied_by = len(p), ""
        for prefix in self.deny_prefixes:
            p = prefix.lstrip("+")
            if digits.startswith(p) and len(p) >= best:  # a deny as specific as an allow wins
                best, denied_by = len(p), prefix
        if denied_by:
            return f"the destination matches the denied prefix {denied_by}"
        if best < 0 and self.allow_prefixes:
            return "the destination matches none of the allowed prefixes"
        return None


def check_destination(to: str, rules: DialRules) -> None:
    """Raise DialError (malformed: 400) or DestinationDenied (policy: 403) for `to`, an E.164 number (ASCII,
    optional +) or, where the project allows them, sip:user@host[:port]. Numbers in a sip: user are checked
    against the prefix rules too."""
    if to[:4].lower() in ("sip:", "sips"):
        match = _sip_target(to)
        if not rules.allow_sip_uri:
            raise DestinationDenied("to: sip: URIs are not enabled for this project (api.allow_sip_uri): "
                                    "dial an E.164 number")
        number = VISUAL_SEPARATORS.sub("", match["user"])
        digits = number.lstrip("+") if NUMBER.fullmatch(number) else ""
    elif E164.fullmatch(to):
        digits = to.lstrip("+")
    else:
        raise DialError("to: must be an E.164 number: optional +, then 6 to 15 ASCII digits (or a sip: URI)")
    if digits and (why := rules.refusal(digits)) is not None:
        raise DestinationDenied(f"to: {why} (api.allow_prefixes / api.deny_prefixes)")


def _sip_target(to: str) -> re.Match[str]:
    match = SIP_TARGET.fullmatch(to)
    if match is None or (match["port"] and not 1 <= int(match["port"]) <= 65535):
        raise DialError("to: a sip: URI must be sip:user@host[:port], without parameters (;...), headers (?...) "
                        "or escapes")
    if match["host"].startswith("["):
        try:
            ipaddress.IPv6Address(match["host"][1:-1])
        except ValueError:
            raise DialError("to: a sip: URI with a malformed IPv6 host") from None
    return match


def request_uri(to: str, proxy: SipUri) -> str:
    """sip:NUMBER@proxy for an E.164 number; sip:user@host[:port] as given (still sent via the trunk's proxy).
    Anything else (parameters, headers, non-ASCII digits) raises DialError: nothing reaches the trunk unchecked."""
    if to[:4].lower() in ("sip:", "sips"):
        _sip_target(to)
        return to
    if not E164.fullmatch(to):
        raise DialError("to: an E.164 number (ASCII digits, optional +) or sip:user@host[:port]")
    port = f":{proxy.port}" if proxy.port else ""
    return f"{'sips' if proxy.scheme == 'sips' else 'sip'}:{to}@{proxy.host}{port}"  # sips: TLS all the way


class OutboundCall(Call):
    def __init__(self, ua: CallHost, via: TrunkConfig, dial_to: str, dial_from: str, **info: Any) -> None:
        if via.outbound is None:
            raise DialError(f"trunk {via.name} has no [trunks.outbound] section")
        self.via = via
        self.encryption = via.media_encryption
        out = via.outbound
        self.proxy = SipUri.parse(out.proxy)
        self.ruri = request_uri(dial_to, self.proxy)
        if not E164.fullmatch(dial_from):
            raise DialError("from: an E.164 number (ASCII digits, optional +)")
        transport = self.proxy.transport if self.proxy.transport in ("udp", "tcp", "tls") else "udp"
        target = Target(transport, self.proxy.host, self.proxy.port or (5061 if transport == "tls" else 5060))
        super().__init__(ua, Request("INVITE", self.ruri), None, target, **info)  # type: ignore[arg-type]
        self.direction = "outbound"
        self.call_id = f"{uuid.uuid4().hex}@{ua.media_host}"
        self.from_uri = f"sip:{dial_from}@{out.from_domain or self.proxy.host}"
        self.cseq = 0
        self.client_invite: ClientInviteTransaction | None = None
        self.digest = DigestClient(Credentials(out.username, out.password)) if out.username else None
        self.auth_rounds = 0
        self.final_status: int | None = None
        self.final_reason = ""
        self.remote_allow: list[str] = []
        self.failed = asyncio.Event()
        self.rang = False
        self.extra_headers: list[tuple[str, str]] = []  # added to our INVITE (checked by whoever sets them)

    # -- placing the call
    async def place(self, ring_timeout: float) -> bool:
        """Send the INVITE and wait for the answer; False when the call failed (its CDR is closed)."""
        cfg = self.ua.config.rtp
        codec = (self.offer_codecs or tuple(cfg.codecs))[0]
        params = MediaParams(self.source.host, 0, codec, 0 if codec == "PCMU" else 8, cfg.telephone_event_pt, "sendrecv")
        media = RtpSession(self.ua.clock, self.ua.ports, params, (cfg.jitter_min_ms, cfg.jitter_max_ms),
                           (cfg.strict_learning_ms, cfg.strict_learning_packets))
        media.require_srtp = self.encryption == "required"
        try:
            await media.open(self.ua.config.sip.host)  # bound to sip.host; the SDP says media_host
        except (OSError, PortsExhausted) as exc:
            self._fail(503, "no RTP port", error=str(exc))
            return False
        self.media = media
        if not _is_ip(self.source.host):
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(self.source.host, self.source.port)
                self.source = Target(self.source.transport, str(infos[0][4][0]), self.source.port,
                                     name=self.source.host)
            except OSError as exc:
                self._fail(503, "trunk unresolvable", error=str(exc))
                return False
        self._send_invite(None)
        try:
            await asyncio.wait_for(self.wait_until(self.answered), ring_timeout)
        except TimeoutError:
            self._cancel("no_answer", 408, "Request Timeout")
        return self.answered.is_set() and not self.ended.is_set()

    def _send_invite(self, authorization: tuple[str, str] | None) -> None:
        self.cseq += 1
        h = Headers()
        h.add("Max-Forwards", "70")
        h.add("From", f"<{self.from_uri}>;tag={self.local_tag}")
        h.add("To", f"<{self.ruri}>")
        h.add("Call-ID", self.call_id)
        h.add("CSeq", f"{self.cseq} INVITE")
        h.add("Contact", self.contact)
        h.add("Allow", self.ua.allow)
        h.add("Supported", "timer")
        h.add("User-Agent", self.ua.config.sip.user_agent)
        if authorization:
            h.add(*authorization)
        for name, value in self.extra_headers:
            h.add(name, value)
        h.add("Content-Type", "application/sdp")
        self.invite = Request("INVITE", self.ruri, h, self.offer_sdp())
        txn = self.ua.stack.send_request(self.invite, self.source, self.ua.now())
        assert isinstance(txn, ClientInviteTransaction)
        txn.user = (self, self.on_invite_response)
        self.client_invite = txn
        self.ua.flush()

    # -- responses to our INVITE (every one, provisional too; None = no answer at all)
    def on_invite_response(self, response: Response | None) -> None:
        if response is None:
            if not self.ended.is_set():
                self._fail(408, "Request Timeout", error="no response from the trunk")
            return
        status = response.status
        if status < 200:
            if status in (180, 183) and not self.rang and not self.ended.is_set():
                self.rang = True
                self.record("ringing", code=status)
        elif status < 300:
            self._on_2xx(response)
        elif self.ended.is_set():
            pass  # e.g. the 487 for our CANCEL
        elif status in (401, 407) and self.digest is not None and self.auth_rounds < MAX_AUTH_ROUNDS:
            self._authenticate(response)
        else:
            self._fail(status, response.reason)

    def _authenticate(self, response: Response) -> None:
        assert self.digest is not None
        header = "www-authenticate" if response.status == 401 else "proxy-authenticate"
        challenges = response.headers.get_all(header)
        self.auth_rounds += 1
        for challenge in challenges:  # the first one we can answer (algorithm MD5 / SHA-256, qop auth)
            try:
                value = self.digest.authorization(challenge, "INVITE", self.ruri)
            except ValueError:
                continue
            self.record("auth_challenged", code=response.status, round=self.auth_rounds)  # never the credentials
            self._send_invite(("Authorization" if response.status == 401 else "Proxy-Authorization", value))
            return
        self._fail(response.status, response.reason, error="no challenge we can answer")

    def _on_2xx(self, response: Response) -> None:
        txn = self.client_invite
        assert txn is not None
        if self.dialog is not None:  # a retransmitted 2xx: ACK it again
            self._ack(response)
            return
        self.dialog = Dialog.as_uac(self.invite, response, self.source.transport)
        self.dialog.contact = self.contact
        self.ua.register_dialog(self)
        self._ack(response)
        if self.ended.is_set():  # answered after we gave up (CANCEL crossed the 2xx): hang up at once
            bye = self.dialog.create_request("BYE")
            self.ua.send_in_dialog(self, bye)
            self.ua.dialogs.pop(self.dialog.id, None)  # the call is already forgotten: no dialog left behind
            return
        self.remote_allow = [a.strip().upper() for v in response.headers.get_all("allow") for a in v.split(",")]
        try:
            params = self.negotiate_answer(response.body)
        except SdpError as exc:
            self.answered.set()
            self.record("media_failed", logging.WARNING, error=str(exc))
            self.hangup("incompatible_sdp", error=str(exc))
            return
        assert self.media is not None
        self.media.update(params)
        self._answered_once = True
        self._negotiate_uac_timer(response)
        self.answered.set()
        self.confirmed.set()
        self.record("answered", codec=params.codec, rtp_port=self.media.port,
                    remote_rtp=f"{params.remote_host}:{params.remote_port}", **self.media_security())
        self._arm_session_timer()

    def _ack(self, response: Response) -> None:
        assert self.dialog is not None
        ack = self.dialog.create_ack(response.cseq[0])
        self.ua.stack.send_request(ack, self.ua.in_dialog_target(self), self.ua.now())
        self.ua.flush()

    def _negotiate_uac_timer(self, response: Response) -> None:
        """RFC 4028 from the UAC side: the 2xx says who refreshes; "uac" is us."""
        se = response.headers.get("session-expires")
        if not se:
            return
        value, _, params = se.partition(";")
        if ascii_digits(value.strip()):
            ours = "refresher=uac" in params.replace(" ", "").lower()
            self.session_timer = SessionTimer(int(value.strip()), "uas" if ours else "uac")

    def peer_allow(self) -> list[str]:
        return self.remote_allow

    # -- ending
    def _fail(self, status: int, reason: str, **data: Any) -> None:
        self.final_status, self.final_reason = status, reason
        self.failed.set()
        self._end("failed", status, sip_reason=reason, **data)

    def _cancel(self, why: str, status: int, reason: str) -> None:
        txn = self.client_invite
        if txn is not None and txn.state in ("calling", "proceeding"):
            self.ua.stack.cancel(txn, self.ua.now())
            self.ua.flush()
        if why == "no_answer":
            self._fail(status, reason, error="no answer within the ring timeout")
        else:
            self._end(why, None, by="gateway")

    def hangup(self, reason: str = "gateway_hangup", **cdr: Any) -> None:
        if self.ended.is_set():
            return
        if self.dialog is None:
            self._cancel(reason, 487, "Request Terminated")
            return
        super().hangup(reason, **cdr)
