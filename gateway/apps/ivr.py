"""The dial-in IVR, as the caller hears it:

    answer -> welcome -> "enter the meeting ID followed by #"  (3 attempts)
           -> "enter the PIN followed by #"                     (3 attempts; pin: participant, mpin: moderator)
           -> "joining" -> the room (hold audio until the bridge takes over)

Typing interrupts a prompt; "*" clears the entry; first-digit and inter-digit timeouts apply. After the last
failed attempt: the too-many-attempts prompt, then BYE. A DID with route "room" skips the meeting ID.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..audio import CallAudio
from ..call import Call
from ..config import Config, DidConfig, ProjectConfig
from ..guard import AttemptLimiter
from ..prompts import PromptError, PromptLibrary
from ..rooms import Directory, DirectoryUnavailable, RoomStore


@dataclass
class IvrServices:
    config: Config
    prompts: PromptLibrary
    directory: Directory
    limiter: AttemptLimiter
    rooms: RoomStore | None = None


class DialIn:
    def __init__(self, call: Call, services: IvrServices, did: DidConfig) -> None:
        self.call = call
        self.s = services
        self.did = did
        self.cfg = services.config.ivr
        project = next((p for p in services.config.projects if p.name == did.project), ProjectConfig(name=did.project))
        self.project = project
        assert call.media is not None
        trunk = next(t for t in services.config.trunks if t.name == call.info["trunk"])
        self.audio = CallAudio(call.media, trunk.dtmf, call.voice_id)
        call.audio = self.audio
        self.caller = str(call.info.get("from", ""))

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
        call = self.call
        await call.answer()
        try:
            await self.say("welcome")
            meeting_id = await self.meeting_id()
            if meeting_id is None:
                return await self.goodbye("too_many_attempts", "too_many_meeting_id_attempts")
            result = await self.pin(meeting_id)
            if result is None:
                return
            room_id, role = result
        except DirectoryUnavailable as exc:
            call.record("directory_unavailable", logging.ERROR, error=str(exc))
            return await self.goodbye("service_unavailable", "directory_unavailable", error=str(exc))
        call.record("validated", room_id=room_id, role=role, meeting_id=meeting_id)
        await self.say("joining", interruptible=False)
        self.audio.hold()  # until the bridge to the room takes the media over
        await call.ended.wait()

    async def meeting_id(self) -> str | None:
        if self.did.route == "room":
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
        loop = self.call.ua.now
        for attempt in range(1, self.cfg.attempts + 1):
            blocked = self.s.limiter.blocked(self.caller, meeting_id, loop())
            if blocked:
                self.call.record("pin_blocked", logging.WARNING, limit=blocked, meeting_id=meeting_id)
                await self.goodbye("attempts_blocked", "pin_attempts_blocked", limit=blocked)
                return None
            digits = await self.ask("enter_pin")
            result = await self.s.directory.resolve(meeting_id, digits) if digits else None
            if result is not None:
                return result
            self.s.limiter.failed(self.caller, meeting_id, loop())
            self.call.record("pin_invalid", logging.INFO, attempt=attempt, meeting_id=meeting_id)  # never the PIN
            if attempt < self.cfg.attempts:
                await self.say("invalid_pin")
        await self.goodbye("too_many_attempts", "too_many_pin_attempts")
        return None


def make_dial_in(services: IvrServices):  # type: ignore[no-untyped-def]
    async def dial_in(call: Call) -> None:
        did = services.config.did(str(call.info["did"]))
        assert did is not None
        try:
            await DialIn(call, services, did).run()
        except PromptError as exc:
            call.record("prompts_unavailable", logging.ERROR, error=str(exc))
            call.hangup("prompts_unavailable", error=str(exc))

    return dial_in
