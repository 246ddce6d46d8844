"""The dial-in IVR, as the caller hears it:

    answer -> welcome -> "enter the meeting ID followed by #"  (3 attempts)
           -> "enter the PIN followed by #"                     (3 attempts; pin: participant, mpin: moderator)
           -> "joining" -> the room (hold audio and the waiting prompt while a moderator is awaited)
           -> in-call keypad menu (*6 mute, *1 help, *# count; moderators *4 mute all, *5 lock, *9 unmute all)

Typing interrupts a prompt; "*" clears the entry; first-digit and inter-digit timeouts apply. After the last
failed attempt: the too-many-attempts prompt, then BYE. A DID with route "room" skips the meeting ID.

The Voice API can steer any of these calls (gateway.control): an order to join a room takes the call out of
the prompts (or out of its current room) into the named room; an order to leave hangs up or parks it.
Calls the API drives from the start (DIDs with route "api", dial-out) go straight to `hosted`: on hold until
a room is named.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

from ..audio import CallAudio
from ..bridge import RoomConnector, RoomError, RoomLeg, masked_number
from ..call import Call, CallEnded
from ..config import Config, DidConfig, MenuConfig, ProjectConfig
from ..control import Order, Steering
from ..guard import Limiter
from ..projects import ProjectStore
from ..prompts import PromptError, PromptLibrary
from ..rooms import Directory, DirectoryUnavailable, RoomStore


@dataclass
class IvrServices:
    config: Config
    prompts: PromptLibrary
    directory: Directory
    limiter: Limiter
    rooms: RoomStore | None = None
    connector: RoomConnector | None = None
    projects: ProjectStore | None = None


class DialIn:
    def __init__(self, call: Call, services: IvrServices, project: ProjectConfig, did: DidConfig | None = None) -> None:
        self.call = call
        self.s = services
        self.did = did
        self.cfg = services.config.ivr
        self.project = project
        self.steer: Steering = call.control if call.control is not None else Steering()
        call.control = self.steer
        assert call.media is not None
        trunk = next(t for t in services.config.trunks if t.name == call.info["trunk"])
        self.audio = CallAudio(call.media, trunk.dtmf, call.voice_id)
        call.audio = self.audio
        self.caller = str(call.info["caller"])

    async def say(self, key: str, interruptible: bool = True, **values: Any) -> bool:
        text = self.project.welcome_text if key == "welcome" and self.project.welcome_text else None
        audio = await self.s.prompts.encoded(self.audio.codec, key, self.project.language, self.project.voice_type,
                                             text, **values)
        self.call._check_alive()
        return await self.audio.play(audio, interruptible)

    async def ask(self, key: str) -> str | None:
        await self.say(key)
        return await self.audio.collect(self.cfg.max_digits, "#", self.cfg.first_digit_timeout_ms / 1000,
                                        self.cfg.inter_digit_timeout_ms / 1000)

    async def goodbye(self, key: str, reason: str, **cdr: Any) -> None:
        self.audio.clear_digits()
        await self.say(key, interruptible=False)
        self.call.hangup(reason, **cdr)

    async def run(self) -> None:
        """The dial-in flow; an API order arriving during the prompts takes the call over."""
        call = self.call
        await call.answer()
        self.steer.phase = "ivr"
        validation = asyncio.ensure_future(self.validate())
        ordered = asyncio.ensure_future(self.steer.changed.wait())
        try:
            await asyncio.wait({validation, ordered}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ordered.cancel()
            if not validation.done():  # the API took the call: leave the prompts where they are
                validation.cancel()
                self.audio.stop()
                await asyncio.gather(validation, return_exceptions=True)
        if validation.cancelled():
            return await self.hosted()
        result = validation.result()
        if result is None:
            return
        room_id, role = result
        await self.say("joining", interruptible=False)
        await self.hosted(Order("join", room_id, role))

    async def validate(self) -> tuple[str, str] | None:
        """Welcome, meeting ID, PIN: (room_id, role), or None after saying goodbye."""
        call = self.call
        try:
            await self.say("welcome")
            meeting_id = await self.meeting_id()
            if meeting_id is None:
                await self.goodbye("too_many_attempts", "too_many_meeting_id_attempts")
                return None
            result = await self.pin(meeting_id)
            if result is None:
                return None
            room_id, role = result
        except DirectoryUnavailable as exc:
            call.record("directory_unavailable", logging.ERROR, error=str(exc))
            await self.goodbye("service_unavailable", "directory_unavailable", error=str(exc))
            return None
        call.record("validated", room_id=room_id, role=role, meeting_id=meeting_id)
        return room_id, role

    async def hosted(self, order: Order | None = None) -> None:
        """On hold until a room is named, then in it until the call ends or an order moves or removes it."""
        call = self.call
        park_timeout = self.s.config.api.park_timeout_s
        while not call.ended.is_set():
            if order is None:
                self.steer.phase, self.steer.room_id = "parked", ""
                self.audio.hold()
                try:
                    await asyncio.wait_for(call.wait_until(self.steer.changed), park_timeout)
                except TimeoutError:
                    call.hangup("park_timeout")
                    return
                order = self.steer.take()
                continue
            if order.kind == "leave":  # nothing to leave while parked
                order.finish("not in a room")
                order = None
                continue
            self.audio.hold()  # while the WebRTC leg connects
            if self.s.connector is None:
                order.finish("no room service configured")
                await call.ended.wait()
                return
            self.steer.phase, self.steer.room_id = "joining", order.room_id
            room = InRoom(self, order.room_id, order.role)
            outcome = await room.run(order)
            order = None
            if outcome is None or call.ended.is_set():
                return
            if outcome.kind == "join":
                order = outcome
            else:
                call.record("removed", room_id=room.room_id, by="api")
                outcome.finish()
                if not outcome.park:
                    call.hangup("removed_by_api")
                    return
                call.record("parked")

    async def meeting_id(self) -> str | None:
        if self.did is not None and self.did.route == "room":
            room = self.s.rooms.get(self.did.room_id) if self.s.rooms is not None else None
            if room is None or not room["sip"]["meeting_id"]:
                raise DirectoryUnavailable(f"room {self.did.room_id} of DID {self.did.number} is unknown")
            return str(room["sip"]["meeting_id"])
        for attempt in range(1, self.cfg.attempts + 1):
            digits = await self.ask("enter_meeting_id")
            if digits and await self.s.directory.exists(digits):
                self.call.record("meeting_id_accepted", meeting_id=digits, attempt=attempt)
                return digits
            self.call.record("meeting_id_invalid", logging.INFO, attempt=attempt, entered=bool(digits))
            if attempt < self.cfg.attempts:
                await self.say("invalid_meeting_id")
        return None

    async def pin(self, meeting_id: str) -> tuple[str, str] | None:
        for attempt in range(1, self.cfg.attempts + 1):
            blocked = await self.s.limiter.check(self.caller, meeting_id)
            if blocked:
                self.call.record("pin_blocked", logging.WARNING, limit=blocked, meeting_id=meeting_id)
                await self.goodbye("attempts_blocked", "pin_attempts_blocked", limit=blocked)
                return None
            digits = await self.ask("enter_pin")
            result = await self.s.directory.resolve(meeting_id, digits) if digits else None
            if result is not None:
                return result
            await self.s.limiter.failure(self.caller, meeting_id)
            self.call.record("pin_invalid", logging.INFO, attempt=attempt, meeting_id=meeting_id)  # never the PIN
            if attempt < self.cfg.attempts:
                await self.say("invalid_pin")
        await self.goodbye("too_many_attempts", "too_many_pin_attempts")
        return None


class InRoom:
    """A validated caller in the room: bridged audio, the keypad menu, removal and closing notices."""

    def __init__(self, ivr: DialIn, room_id: str, role: str) -> None:
        self.ivr = ivr
        self.call = ivr.call
        self.audio = ivr.audio
        self.room_id = room_id
        self.role = role
        self.leg: RoomLeg | None = None
        self.moderator_here = asyncio.Event()
        self.ending: asyncio.Task[None] | None = None

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "state" and event.get("moderator_present"):
            self.moderator_here.set()
        elif kind in ("removed", "room_closed", "disconnected") and self.ending is None and not self.call.ended.is_set():
            if kind == "removed":
                self.call.record("removed", room_id=self.room_id, by="moderator")
            key, reason = {"removed": ("removed", "removed_from_room"), "room_closed": ("room_closed", "room_closed"),
                           "disconnected": ("service_unavailable", "room_disconnected")}[kind]
            self.ending = asyncio.get_running_loop().create_task(self.ivr.goodbye(key, reason))

    def me(self) -> dict[str, Any]:
        state = self.leg.state if self.leg else {}
        pid = self.leg.participant_id if self.leg else ""
        return next((p for p in state.get("participants", []) if p.get("id") == pid), {})

    async def run(self, order: Order) -> Order | None:
        """Join, bridge, stay until the call ends (None) or the API gives a new order (returned, not yet done)."""
        cfg = self.ivr.s.config
        name = masked_number(self.ivr.caller, cfg.room_service.mask_digits)
        try:
            self.leg = await self.ivr.s.connector.join(self.room_id, self.role, name, self.on_event)  # type: ignore[union-attr]
        except RoomError as exc:
            if exc.code == "room_locked":
                order.finish("room_locked")
                self.call.record("room_locked_out", logging.INFO, room_id=self.room_id)
                await self.ivr.goodbye("locked_out", "room_locked")
                return None
            order.finish(f"room join failed: {exc}")
            self.call.record("room_join_failed", logging.ERROR, room_id=self.room_id, error=str(exc))
            await self.ivr.goodbye("service_unavailable", "room_join_failed", error=str(exc))
            return None
        steer = self.ivr.steer
        steer.phase = "in_room"
        self.call.record("joined", room_id=self.room_id, role=self.role, participant_id=self.leg.participant_id)
        order.finish()
        menu = asyncio.get_running_loop().create_task(self.menu())
        try:
            state = self.leg.state
            if self.role != "moderator" and state.get("wait_for_moderator") and not state.get("moderator_present"):
                self.call.record("waiting_for_moderator", room_id=self.room_id)
                self.audio.hold(False)
                await self.ivr.say("waiting_for_moderator", interruptible=False)
                self.audio.hold()
                await self.call.wait_until(self.moderator_here)
            self.audio.hold(False)
            self.audio.bridge(self.leg)
            await self.call.wait_until(steer.changed)
        finally:
            menu.cancel()
            self.audio.leg = None
            await self.leg.leave()
            if self.call.ended.is_set() or self.ending is not None or steer.changed.is_set():
                self.call.ua.cdr.event(self.call.voice_id, "left", room_id=self.room_id, **self.leg.stats())
        if self.call.ended.is_set() or self.ending is not None:
            return None
        return steer.take()

    async def menu(self) -> None:
        keys = {getattr(self.ivr.s.config.menu, f.name): f.name for f in dataclasses.fields(MenuConfig)}
        while True:
            if await self.audio.digits.get() != "*":
                continue
            try:
                key = await asyncio.wait_for(self.audio.digits.get(), 3.0)
            except TimeoutError:
                continue
            action = keys.get(key)
            if action is None:
                continue
            try:
                await self.act(action)
            except CallEnded:
                return

    async def act(self, action: str) -> None:
        assert self.leg is not None
        if action in ("mute_all", "lock", "unmute_all") and self.role != "moderator":
            await self.ivr.say("not_allowed")
            return
        if action == "mute_self":
            muted = not self.me().get("muted", False)
            await self.leg.command({"type": "mute", "participant_id": self.leg.participant_id, "muted": muted})
            self.call.record("muted" if muted else "unmuted", room_id=self.room_id)
            await self.ivr.say("muted" if muted else "unmuted")
        elif action == "help":
            await self.ivr.say("menu_help")
        elif action == "count":
            await self.ivr.say("participant_count", count=len(self.leg.state.get("participants", [])))
        elif action in ("mute_all", "unmute_all"):
            await self.leg.command({"type": "mute_all", "muted": action == "mute_all"})
            self.call.record(action, room_id=self.room_id)
            await self.ivr.say("all_muted" if action == "mute_all" else "all_unmuted")
        elif action == "lock":
            locked = not self.leg.state.get("locked", False)
            await self.leg.command({"type": "lock", "locked": locked})
            self.call.record("room_locked" if locked else "room_unlocked", room_id=self.room_id)
            await self.ivr.say("room_locked" if locked else "room_unlocked")


def project_settings(services: IvrServices, name: str) -> ProjectConfig:
    configured = next((p for p in services.config.projects if p.name == name), None)
    if configured is not None:
        return configured
    stored = services.projects.by_name(name) if services.projects is not None else None
    return stored.settings() if stored is not None else ProjectConfig(name=name)


async def _guarded(call: Call, flow: Any) -> None:
    try:
        await flow
    except PromptError as exc:
        call.record("prompts_unavailable", logging.ERROR, error=str(exc))
        call.hangup("prompts_unavailable", error=str(exc))
    finally:
        if call.control is not None:
            call.control.abandon(call.end_reason or "call ended")


def make_dial_in(services: IvrServices):  # type: ignore[no-untyped-def]
    """Routes "ivr" and "room": the dial-in prompts."""
    async def dial_in(call: Call) -> None:
        did = services.config.did(str(call.info["did"])) or call.info.get("did_config")
        assert did is not None
        ivr = DialIn(call, services, project_settings(services, did.project), did)
        await _guarded(call, ivr.run())

    return dial_in


def make_api_route(services: IvrServices):  # type: ignore[no-untyped-def]
    """Route "api": answer, hold, and wait for the application (the `incoming` webhook) to bridge the call."""
    async def api_route(call: Call) -> None:
        ivr = DialIn(call, services, project_settings(services, str(call.info["project"])))
        await call.answer()
        await _guarded(call, ivr.hosted())

    return api_route


async def run_hosted(call: Call, services: IvrServices, order: Order) -> None:
    """A dial-out call once answered: straight into the room of `order`."""
    ivr = DialIn(call, services, project_settings(services, str(call.info["project"])))
    await _guarded(call, ivr.hosted(order))
