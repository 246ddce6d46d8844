"""Where a phone joins a room through another SIP media gateway: the `sip_forward` connector (a B2BUA leg).

After the IVR validated the caller, the worker places a second call (a `ForwardCall`, which is an `OutboundCall`:
INVITE, digest on 401/407, CANCEL on the ring timeout) to one member of a configured pool (`[[forward_pools]]`),
with headers built from the room (`X-Room-Id: {room_id}`, `Jitsi-Conference-Room: {room_name}@{domain}`, ...),
and stays in the middle:

- Choice and failover: members are tried fewest live legs first (counted per worker; ties in configured order).
  A member that answers 408, 480, 486 or any 5xx, does not answer within `ring_timeout_s` (CANCEL, 408), or
  cannot be reached (no RTP port, a name that does not resolve) is failed over; any other final answer (403, 404,
  488, 6xx: the request itself is refused) ends the attempt. When no member answered, the join fails with
  `RoomError(code="forward_failed")`: the caller hears the service-unavailable prompt, then BYE.
- Media: the forward leg offers the caller's negotiated codec only (plus telephone-event), so payloads are
  relayed as they are, one frame per 20 ms media-clock tick each way (each leg's RTP session keeps its own
  SSRC, sequence, timestamps, strict-RTP lock and jitter buffer). A re-INVITE/UPDATE on either side is answered
  by that leg; if it moved that leg to the other G.711 law, the other leg gets a re-INVITE offering that codec
  only (`Call.reoffer`), and payloads go through untouched again once it answers. Meanwhile, and for good if it
  refuses (488, 491, no answer), frames are converted between mu-law and A-law (sample by sample, 8 kHz both):
  `forward_codec_followed` / `forward_codec_converted` in the CDR, `frames_converted` in `forward_ended`.
- RFC 4733: events are relayed as packets both ways, re-stamped into the other leg's stream (its telephone-event
  payload type, its SSRC and sequence, one timestamp per event), so durations and end bits go through; the
  caller's keypad menu still hears them. SIP INFO digits are not relayed.
- Keypad menu: `*6` mutes the caller (silence is relayed instead of the caller's audio), `*1` says the one key
  that works; the room-service keys (`*#` count, the moderator's `*4`, `*5`, `*9`) say "not available".
- Ending: the caller hanging up while the forward leg rings CANCELs it; either side's BYE ends the other side
  (the caller's reason `forward_ended`).

CDR events on the caller's voice_id (and one log line each): `forward_trying{target}`,
`forward_failed{target, code, sip_reason}`, `forward_answered{target, code, codec}`,
`forward_media_updated{target, codec, direction}` (the member's re-INVITE/UPDATE), `forward_ended{by, target}`.
The forward leg has no CDR row of its own and sends no webhooks; `/healthz` shows each pool's legs.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

from .. import log
from ..adapters.rtp_session import RtpSession
from ..apps.services import JoinContext, RoomError
from ..calls.call import Call, CallHost
from ..calls.outbound import E164, DialError, OutboundCall
from ..config import FORWARD_FIELDS, ForwardPoolConfig, OutboundConfig, TrunkConfig
from ..media import g711
from ..media.rtp import RtpPacket
from ..sip.message import Response, SipUri
from ..store.rooms import RoomStore

logger = logging.getLogger("gateway.forward")
ACTIONS = frozenset({"mute_self", "help"})  # the keypad menu actions a forwarded call carries out itself
UNSAFE = re.compile(r"[\x00-\x1f\x7f]")  # control characters: never into a header value (CR/LF would inject one)


def failover(status: int | None) -> bool:
    """Whether a member's final answer (None: none at all) sends the call to the next member."""
    return status is None or status in (408, 480, 486) or 500 <= status < 600


def render_headers(templates: dict[str, str], values: dict[str, str]) -> list[tuple[str, str]]:
    """The pool's headers with {room_id}, {role}, {room_name}, {meeting_id}, {domain} filled in (names and templates
    were checked at config load); control characters in the values (a room name is chosen by users) are dropped."""
    clean = {k: UNSAFE.sub("", str(values.get(k, ""))) for k in FORWARD_FIELDS}
    return [(name, template.format_map(clean)) for name, template in templates.items()]


def request_uri(target: str, room_id: str) -> str:
    """Where the INVITE goes: the target's own user when it has one, else the room id, at the target's host:port."""
    uri = SipUri.parse(target)
    port = f":{uri.port}" if uri.port else ""
    user = uri.user or re.sub(r"[^A-Za-z0-9\-_.!~*'()+]", "", room_id)[:64] or "room"
    return f"sip:{user}@{uri.host}{port}"


class ForwardCall(OutboundCall):
    """The leg to a pool member: an OutboundCall whose states are told to its connector, not written as a call of
    its own (the caller's voice_id carries the forward_* events)."""

    def __init__(self, ua: CallHost, via: TrunkConfig, dial_to: str, dial_from: str, parent: Call, target: str,
                 on_state: Callable[[ForwardCall, str, dict[str, Any]], None], **info: Any) -> None:
        super().__init__(ua, via, dial_to, dial_from, **info)
        self.parent = parent
        self.target = target
        self.on_state = on_state
        self.last_status: int | None = None

    def record(self, state: str, level: int = logging.INFO, **data: Any) -> None:
        self.state = state
        log.event(logger, f"forward.leg_{state}", logging.DEBUG, voice_id=self.parent.voice_id, target=self.target,
                  **data)
        self.on_state(self, state, data)

    def on_invite_response(self, response: Response | None) -> None:
        if response is not None and response.status >= 200:
            self.last_status = response.status
        super().on_invite_response(response)


class SipForwardLeg:
    """A caller relayed to a pool member (implements `apps.services.RoomLeg`)."""

    def __init__(self, connector: SipForwardConnector, room_id: str, caller: Call, far: ForwardCall,
                 on_event: Callable[[dict[str, Any]], None]) -> None:
        self.connector = connector
        self.room_id = room_id
        self.caller = caller
        self.far = far
        self.on_event = on_event
        self.participant_id = far.call_id
        self.muted = False
        self.state: dict[str, Any] = {"participants": [{"id": self.participant_id, "muted": False}]}
        self.actions = ACTIONS
        self.to_far: deque[bytes] = deque(maxlen=3)  # the caller's frames, taken by the forward leg's tick
        self.to_caller: deque[bytes] = deque(maxlen=3)  # the member's frames, taken by the caller's tick
        self.events_to_far: dict[tuple[int, int], int] = {}  # (ssrc, timestamp) of an event -> its timestamp there
        self.events_to_caller: dict[tuple[int, int], int] = {}
        self.dtmf_relayed = {"to_far": 0, "to_caller": 0}
        self.converted = 0  # frames converted between the G.711 laws (while the legs disagree)
        self.closed = False
        assert caller.media is not None and far.media is not None
        self.codec = caller.media.params.codec  # what both legs use; a leg that moves off it is followed
        self.reoffering = False  # a re-INVITE of ours is on its way to the other leg
        self.refused: tuple[str, str] | None = None  # (caller's, member's) codecs whose re-offer was refused
        self._caller_events = caller.media.on_telephone_event  # the caller's keypad (CallAudio) keeps hearing them
        caller.media.on_telephone_event = self._from_caller_event
        far.media.handler = self._far_tick
        far.media.on_telephone_event = self._from_far_event

    # -- media (the caller's side is called by CallAudio on the caller's tick, the far side by the far leg's)
    def push(self, frame: bytes | None) -> None:
        media = self.caller.media
        if self.closed or media is None:
            return
        self.to_far.append(media.silence if frame is None or self.muted else frame)

    def pull(self) -> bytes | None:
        return self.to_caller.popleft() if self.to_caller else None

    def _far_tick(self, frame: bytes | None) -> bytes | None:
        caller, far = self.caller.media, self.far.media
        if caller is None or far is None or self.closed:
            return None
        if caller.params.codec != far.params.codec:
            self.converted += 1
            if not self.reoffering and self.refused != (caller.params.codec, far.params.codec):
                self._follow(caller.params.codec, far.params.codec)
        elif not self.reoffering:
            self.codec, self.refused = caller.params.codec, None
        if frame is not None:
            self.to_caller.append(convert(frame, far.params.codec, caller.params.codec))
        out = self.to_far.popleft() if self.to_far else None
        return None if out is None else convert(out, caller.params.codec, far.params.codec)

    def _follow(self, caller_codec: str, far_codec: str) -> None:
        """One leg moved to the other G.711 law (its re-INVITE/UPDATE): re-offer that codec to the other leg, so
        payloads go through untouched again. Until it answers, and if it refuses, frames are converted."""
        other, codec = (self.caller, far_codec) if far_codec != self.codec else (self.far, caller_codec)
        self.reoffering = True

        def done(ok: bool) -> None:
            self.reoffering = False
            if ok:
                self.codec = codec
            else:
                self.refused = (caller_codec, far_codec)  # converted until either leg changes again
            if not self.closed:
                self.connector.event(self.caller, "forward_codec_followed" if ok else "forward_codec_converted",
                                     logging.INFO if ok else logging.WARNING, codec=codec,
                                     leg="caller" if other is self.caller else "far")

        if not other.reoffer((codec,), done):
            done(False)

    def _from_caller_event(self, packet: RtpPacket) -> None:
        if self._caller_events is not None:
            self._caller_events(packet)
        if not self.closed and self.far.media is not None and relay_event(packet, self.far.media, self.events_to_far):
            self.dtmf_relayed["to_far"] += 1

    def _from_far_event(self, packet: RtpPacket) -> None:
        if not self.closed and self.caller.media is not None and \
                relay_event(packet, self.caller.media, self.events_to_caller):
            self.dtmf_relayed["to_caller"] += 1

    def stats(self) -> dict[str, int]:
        far = self.far.media
        return {"rtp_to_far": far.sent if far else 0, "rtp_from_far": far.received if far else 0,
                "rtp_dropped": far.dropped_total if far else 0, "dtmf_to_far": self.dtmf_relayed["to_far"],
                "dtmf_to_caller": self.dtmf_relayed["to_caller"], "frames_converted": self.converted}

    # -- signalling
    async def command(self, message: dict[str, Any]) -> None:
        if message.get("type") == "mute" and message.get("participant_id") == self.participant_id:
            self.muted = bool(message.get("muted"))
            self.state = {"participants": [{"id": self.participant_id, "muted": self.muted}]}

    def far_ended(self, data: dict[str, Any]) -> None:
        """The member's side ended (its BYE, a failed session refresh...): end the caller's side too."""
        if self.closed:
            return
        self.closed = True
        self.connector.ended(self, by="far", reason=str(data.get("reason", "")))
        self.on_event({"type": "hangup", "reason": "forward_ended"})

    async def leave(self) -> None:
        """The caller's side is done (hung up, or moved by the API): BYE the member."""
        media = self.caller.media
        if media is not None and media.on_telephone_event == self._from_caller_event:
            media.on_telephone_event = self._caller_events
        if self.closed:
            return
        self.closed = True
        self.connector.ended(self, by="caller" if self.caller.ended.is_set() else "gateway")
        self.far.hangup("caller_gone" if self.caller.ended.is_set() else "moved")


def convert(frame: bytes, src: str, dst: str) -> bytes:
    return frame if src == dst else g711.encode(dst, g711.decode(src, frame))


def relay_event(packet: RtpPacket, out: RtpSession, events: dict[tuple[int, int], int]) -> bool:
    """Send an RFC 4733 packet on `out` (an RtpSession) with its telephone-event type and one timestamp of its own
    per event (events keyed on SSRC and timestamp, as RFC 4733 receivers do); False when `out` has no such type."""
    pt = out.params.dtmf_pt
    if pt is None or len(packet.payload) < 4:
        return False
    key = (packet.ssrc, packet.timestamp)
    first = key not in events
    if first:
        events[key] = out.ts
        while len(events) > 16:
            del events[next(iter(events))]
    out.send_payload(packet.payload, pt, events[key], marker=first)
    return True


class SipForwardConnector:
    """Rooms reached through a pool of SIP media gateways (implements `apps.services.RoomConnector`)."""

    def __init__(self, pool: ForwardPoolConfig, rooms: RoomStore | None = None) -> None:
        self.pool = pool
        self.rooms = rooms
        self.live: Counter[str] = Counter()  # legs per member, this worker's
        self.legs: set[SipForwardLeg] = set()
        self.trunks = {t: TrunkConfig(name=f"forward:{pool.name}", outbound=OutboundConfig(
            proxy=t, username=pool.username, password=pool.password)) for t in pool.targets}

    def order(self) -> list[str]:
        """The members to try, fewest live legs first (ties: as configured)."""
        return sorted(self.pool.targets, key=lambda t: (self.live[t], self.pool.targets.index(t)))

    def values(self, room_id: str, role: str, meeting_id: str) -> dict[str, str]:
        room = self.rooms.get(room_id) if self.rooms is not None else None
        name = str(room.get("name") or room_id) if room else room_id
        if not meeting_id and room:
            meeting_id = str((room.get("sip") or {}).get("meeting_id") or "")
        return {"room_id": room_id, "role": role, "room_name": name, "meeting_id": meeting_id,
                "domain": self.pool.domain}

    def event(self, caller: Call, state: str, level: int = logging.INFO, **data: Any) -> None:
        """One event of the forward leg under the caller's voice_id: the CDR and one log line."""
        caller.ua.cdr.event(caller.voice_id, state, **data)
        log.event(logger, f"call.{state}", level, voice_id=caller.voice_id, pool=self.pool.name, **data)

    async def join(self, room_id: str, role: str, name: str, on_event: Callable[[dict[str, Any]], None],
                   codec: str = "PCMU", context: JoinContext | None = None) -> SipForwardLeg:
        if context is None or context.call.media is None:
            raise RoomError("sip_forward needs the caller's call", "forward_failed")
        caller = context.call
        codec = context.call.media.params.codec
        headers = render_headers(self.pool.headers, self.values(room_id, role, context.meeting_id))
        number = str(caller.info.get("caller", ""))
        # From: the caller's number, else the dialled DID's (our INVITEs carry E.164 numbers only)
        dial_from = next((n for n in (number, str(caller.info.get("did", ""))) if E164.fullmatch(n)), "0000000")
        legs: dict[int, SipForwardLeg] = {}

        def on_state(call: ForwardCall, state: str, data: dict[str, Any]) -> None:
            leg = legs.get(id(call))
            if state == "disconnected" and leg is not None:
                leg.far_ended(data)
            elif state == "media_updated":  # the member's re-INVITE/UPDATE (hold, codec, address), maybe right away
                self.event(caller, "forward_media_updated", target=call.target,
                           **{k: data[k] for k in ("codec", "direction", "method") if k in data})

        for target in self.order():
            try:
                far = ForwardCall(caller.ua, self.trunks[target], request_uri(target, room_id), dial_from, caller,
                                  target, on_state, project=caller.info.get("project", ""), caller=number)
            except DialError as exc:  # a target our dial-out rules refuse (e.g. a host name they do not take)
                self.event(caller, "forward_failed", logging.ERROR, target=target, code=None, error=str(exc))
                continue
            far.offer_codecs = (codec,)
            far.extra_headers = headers
            self.live[target] += 1
            self.event(caller, "forward_trying", target=target)
            placing = asyncio.ensure_future(far.place(self.pool.ring_timeout_s))
            gone = asyncio.ensure_future(caller.ended.wait())
            try:
                await asyncio.wait({placing, gone}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                gone.cancel()
            if caller.ended.is_set() and not placing.done():
                far.hangup("cancelled")  # still ringing: CANCEL
            answered = await placing
            if answered and caller.ended.is_set():  # the caller went as the member answered
                far.hangup("caller_gone")
            if caller.ended.is_set():
                self.live[target] -= 1
                self.event(caller, "forward_failed", target=target, code=far.final_status or 487,
                           sip_reason="caller hung up")
                raise RoomError("the caller hung up while the forward leg rang", "cancelled")
            if answered:
                assert far.media is not None
                leg = legs[id(far)] = SipForwardLeg(self, room_id, caller, far, on_event)
                self.legs.add(leg)
                self.event(caller, "forward_answered", target=target, code=far.last_status or 200,
                           codec=far.media.params.codec, participant_id=leg.participant_id)
                if far.ended.is_set():  # it hung up at once
                    leg.far_ended({})
                return leg
            self.live[target] -= 1
            self.event(caller, "forward_failed", logging.WARNING, target=target, code=far.final_status,
                       sip_reason=far.final_reason)
            if not failover(far.final_status):
                break
        raise RoomError(f"no member of forward pool {self.pool.name} answered", "forward_failed")

    def ended(self, leg: SipForwardLeg, by: str, reason: str = "") -> None:
        if leg in self.legs:
            self.legs.discard(leg)
            self.live[leg.far.target] -= 1
            extra: dict[str, Any] = {"reason": reason} if reason else {}
            self.event(leg.caller, "forward_ended", by=by, target=leg.far.target, **extra, **leg.stats())

    def stats(self) -> dict[str, Any]:
        """For /healthz (leak checks): forwarded legs up, and legs per member (ringing ones too)."""
        return {"legs": len(self.legs), "live": {t: self.live[t] for t in self.pool.targets}}

    def hang_up_all(self, reason: str = "shutdown") -> None:
        """BYE every member leg now (the worker stops: its SIP transport closes right after)."""
        for leg in list(self.legs):
            if not leg.closed:
                leg.closed = True
                self.ended(leg, by="gateway", reason=reason)
                leg.far.hangup(reason)
