"""The dial-in flow, as the caller hears it:

    answer -> welcome -> "enter the meeting ID followed by #"  (3 attempts)
           -> "enter the PIN followed by #"                     (3 attempts; pin: participant, mpin: moderator)
           -> "joining" -> an order to join the room (carried out by `apps.inroom`)

Typing interrupts a prompt; "*" clears the entry; first-digit and inter-digit timeouts apply. After the last
failed attempt: the too-many-attempts prompt, then BYE. A DID with route "room" skips the meeting ID.
An order from the Voice API arriving during the prompts takes the call over where it stands.
"""

from __future__ import annotations

import asyncio
import logging

from ..calls.control import Order
from ..config import DidConfig
from .services import DirectoryUnavailable, Voice


class DialIn:
    def __init__(self, voice: Voice, did: DidConfig | None) -> None:
        self.v = voice
        self.call = voice.call
        self.did = did
        self.attempts = voice.s.config.ivr.attempts

    async def run(self) -> Order | None:
        """Answer and validate: the order to carry out (join the validated room, or the API's), or None when
        the caller was sent away."""
        await self.call.answer()
        self.v.steer.phase = "ivr"
        validation = asyncio.ensure_future(self.validate())
        ordered = asyncio.ensure_future(self.v.steer.changed.wait())
        try:
            await asyncio.wait({validation, ordered}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ordered.cancel()
            if not validation.done():  # the API took the call: leave the prompts where they are
                validation.cancel()
                self.v.audio.stop()
                await asyncio.gather(validation, return_exceptions=True)
        if validation.cancelled():
            return self.v.steer.take()
        result = validation.result()
        if result is None:
            return None
        room_id, role = result
        await self.v.say("joining", interruptible=False)
        return Order("join", room_id, role)

    async def validate(self) -> tuple[str, str] | None:
        """Welcome, meeting ID, PIN: (room_id, role), or None after saying goodbye."""
        try:
            await self.v.say("welcome")
            meeting_id = await self.meeting_id()
            if meeting_id is None:
                await self.v.goodbye("too_many_attempts", "too_many_meeting_id_attempts")
                return None
            result = await self.pin(meeting_id)
            if result is None:
                return None
            room_id, role = result
        except DirectoryUnavailable as exc:
            self.call.record("directory_unavailable", logging.ERROR, error=str(exc))
            await self.v.goodbye("service_unavailable", "directory_unavailable", error=str(exc))
            return None
        self.call.record("validated", room_id=room_id, role=role, meeting_id=meeting_id)
        return room_id, role

    async def meeting_id(self) -> str | None:
        s = self.v.s
        if self.did is not None and self.did.route == "room":
            room = s.rooms.get(self.did.room_id) if s.rooms is not None else None
            if room is None or not room["sip"]["meeting_id"]:
                raise DirectoryUnavailable(f"room {self.did.room_id} of DID {self.did.number} is unknown")
            return str(room["sip"]["meeting_id"])
        for attempt in range(1, self.attempts + 1):
            digits = await self.v.ask("enter_meeting_id")
            if digits and await s.directory.exists(digits):
                self.call.record("meeting_id_accepted", meeting_id=digits, attempt=attempt)
                return digits
            self.call.record("meeting_id_invalid", logging.INFO, attempt=attempt, entered=bool(digits))
            if attempt < self.attempts:
                await self.v.say("invalid_meeting_id")
        return None

    async def pin(self, meeting_id: str) -> tuple[str, str] | None:
        s, caller = self.v.s, self.v.caller
        for attempt in range(1, self.attempts + 1):
            blocked = await s.limiter.check(caller, meeting_id)
            if blocked:
                self.call.record("pin_blocked", logging.WARNING, limit=blocked, meeting_id=meeting_id)
                await self.v.goodbye("attempts_blocked", "pin_attempts_blocked", limit=blocked)
                return None
            digits = await self.v.ask("enter_pin")
            result = await s.directory.resolve(meeting_id, digits) if digits else None
            if result is not None:
                return result
            await s.limiter.failure(caller, meeting_id)
            self.call.record("pin_invalid", logging.INFO, attempt=attempt, meeting_id=meeting_id)  # never the PIN
            if attempt < self.attempts:
                await self.v.say("invalid_pin")
        await self.v.goodbye("too_many_attempts", "too_many_pin_attempts")
        return None
