"""The dial-in flow, as the caller hears it:

    answer -> welcome -> "enter the meeting ID followed by #"  (3 attempts)
           -> "enter the PIN followed by #"                     (3 attempts; pin: participant, mpin: moderator)
           -> "joining" -> an order to join the room (carried out by `apps.inroom`)

Typing interrupts a prompt; "*" clears the entry; first-digit and inter-digit timeouts apply. After the last
failed attempt: the too-many-attempts prompt, then BYE. A DID with route "room" skips the meeting ID.
An order from the Voice API arriving during the prompts takes the call over where it stands.

Guessing (`apps.limits`): every attempt is reserved with the limiter before the caller types; a source address or
caller number over its limit hears "too many attempts" (`meeting_id_blocked` / `pin_blocked`); past a meeting's
budget each PIN check waits on hold (`pin_backoff`). A meeting ID resolves only within the dialled DID's project,
unless `[ivr] shared_directory` or the DID's `any_project` shares the number.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..calls.control import Order
from ..config import DidConfig
from .services import DirectoryUnavailable, Voice, call_origin

T = TypeVar("T")


class Blocked(Exception):
    """A guessing limit refused the attempt (`limit`: "source" or "caller")."""

    def __init__(self, step: str, limit: str, meeting_id: str = "") -> None:
        super().__init__(f"{step} attempts blocked by the {limit} limit")
        self.step, self.limit, self.meeting_id = step, limit, meeting_id


class DialIn:
    def __init__(self, voice: Voice, did: DidConfig | None) -> None:
        self.v = voice
        self.call = voice.call
        self.did = did
        self.attempts = voice.s.config.ivr.attempts
        self.origin = call_origin(self.call, voice.s.config)
        shared = voice.s.config.ivr.shared_directory or (did is not None and did.any_project)
        # meeting IDs resolve within the project of the dialled DID, unless the operator shares the number
        self.project: str | None = None if shared else (did.project if did is not None else
                                                          str(self.call.info.get("project", "")))

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
        except Blocked as exc:  # this source or number guessed too much: refused before typing
            self.call.record(f"{exc.step}_blocked", logging.WARNING, limit=exc.limit,
                             **({"meeting_id": exc.meeting_id} if exc.meeting_id else {}))
            await self.v.goodbye("attempts_blocked", f"{exc.step}_attempts_blocked", limit=exc.limit)
            return None
        except DirectoryUnavailable as exc:
            self.call.record("directory_unavailable", logging.ERROR, error=str(exc))
            await self.v.goodbye("service_unavailable", "directory_unavailable", error=str(exc))
            return None
        self.call.record("validated", room_id=room_id, role=role, meeting_id=meeting_id)
        self.call.info["meeting_id"] = meeting_id  # a connector may pass it on (sip_forward header templates)
        return room_id, role

    async def _attempt(self, step: str, prompt: str, meeting_id: str,
                       check: Callable[[str], Awaitable[T | None]]) -> T | None:
        """Ask for digits and check them, the attempt reserved with the limiter first (so calls at the same time
        cannot overrun a limit) and given back when it succeeds or is never checked (hang-up, directory down)."""
        limiter = self.v.s.limiter
        reserved = await limiter.reserve(step, self.origin, meeting_id)
        if reserved.blocked:
            raise Blocked(step, reserved.blocked, meeting_id)
        failed = False
        try:
            digits = await self.v.ask(prompt)
            if not digits:
                failed = True  # an empty entry or a timeout counts as a failed attempt
                return None
            if reserved.delay > 0:  # the meeting's budget is spent: wait (on hold) before checking
                self.call.record("pin_backoff", logging.INFO, delay_ms=int(reserved.delay * 1000), meeting_id=meeting_id)
                self.v.audio.hold(True)
                try:
                    await asyncio.sleep(reserved.delay)
                finally:
                    self.v.audio.hold(False)
            result = await check(digits)
            failed = result is None
            return result
        finally:
            if not failed:
                await limiter.release(reserved)

    async def meeting_id(self) -> str | None:
        s = self.v.s
        if self.did is not None and self.did.route == "room":
            room = s.rooms.get(self.did.room_id) if s.rooms is not None else None
            if room is None or not room["sip"]["meeting_id"]:
                raise DirectoryUnavailable(f"room {self.did.room_id} of DID {self.did.number} is unknown")
            return str(room["sip"]["meeting_id"])

        async def known(digits: str) -> str | None:
            return digits if await s.directory.exists(digits, self.project) else None

        for attempt in range(1, self.attempts + 1):
            found = await self._attempt("meeting_id", "enter_meeting_id", "", known)
            if found is not None:
                self.call.record("meeting_id_accepted", meeting_id=found, attempt=attempt)
                return found
            self.call.record("meeting_id_invalid", logging.INFO, attempt=attempt)
            if attempt < self.attempts:
                await self.v.say("invalid_meeting_id")
        return None

    async def pin(self, meeting_id: str) -> tuple[str, str] | None:
        s = self.v.s
        project = None if self.did is not None and self.did.route == "room" else self.project  # a fixed room: its own

        async def resolve(digits: str) -> tuple[str, str] | None:
            return await s.directory.resolve(meeting_id, digits, project)

        for attempt in range(1, self.attempts + 1):
            result = await self._attempt("pin", "enter_pin", meeting_id, resolve)
            if result is not None:
                return result
            self.call.record("pin_invalid", logging.INFO, attempt=attempt, meeting_id=meeting_id)  # never the PIN
            if attempt < self.attempts:
                await self.v.say("invalid_pin")
        await self.v.goodbye("too_many_attempts", "too_many_pin_attempts")
        return None
