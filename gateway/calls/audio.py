"""A call's audio for the IVR: plays prompts and hold audio, hears DTMF from RTP events, SIP INFO and tones.

It is the RTP session's frame handler (called once per 20 ms tick from the shared clock), so playing costs
one slice per tick and there is no per-call timer. Typing interrupts an interruptible prompt.

    await audio.play(prompt_bytes)                 # returns early when a digit arrives
    digits = await audio.collect(max_digits=10)    # "*" clears, "#" ends, timeouts apply
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from .. import log
from ..adapters.rtp_session import FRAME, RtpSession
from ..media import g711
from ..media.dtmf import DigitMerger, Rfc4733Receiver, ToneDetector
from ..media.rtp import RtpPacket

logger = logging.getLogger("gateway.audio")


def hold_music(seconds: float = 4.0) -> np.ndarray:
    """A soft four-note loop (int16, 8 kHz): what a validated caller hears while waiting."""
    notes = (523.25, 659.25, 783.99, 659.25)
    per = int(8000 * seconds / len(notes))
    t = np.arange(per) / 8000
    env = np.minimum(1.0, np.minimum(t / 0.05, (t[-1] - t) / 0.3))
    parts = [2500 * env * (np.sin(2 * np.pi * f * t) + 0.3 * np.sin(4 * np.pi * f * t)) for f in notes]
    return np.concatenate(parts).astype(np.int16)


_HOLD = hold_music()


class CallAudio:
    def __init__(self, media: RtpSession, trusted: list[str], voice_id: str) -> None:
        self.media = media
        self.voice_id = voice_id
        self.loop = asyncio.get_running_loop()
        self.detector = ToneDetector() if "inband" in trusted else None
        self.rfc4733 = Rfc4733Receiver()
        self.merger = DigitMerger(tuple(trusted))
        self.digits: asyncio.Queue[str] = asyncio.Queue()
        self._audio = b""
        self._pos = 0
        self._done: asyncio.Future[bool] | None = None
        self._interruptible = True
        self._hold: bytes | None = None
        self._hold_pos = 0
        self._notice: bytes | None = None  # `announce`: ahead of everything, a prompt paused meanwhile
        self._notice_pos = 0
        self.digit_count = {"rfc4733": 0, "info": 0, "inband": 0}
        self.leg: Any = None  # the room leg once bridged (apps.services.RoomLeg)
        media.handler = self
        media.on_telephone_event = self.on_telephone_event

    @property
    def codec(self) -> str:
        """The call's codec now: prompts and hold audio are encoded for it (a re-INVITE may have changed it)."""
        return self.media.params.codec

    @property
    def silence(self) -> bytes:
        return self.media.silence

    # -- input
    def on_telephone_event(self, packet: RtpPacket) -> None:
        digit = self.rfc4733.receive(packet.ssrc, packet.timestamp, packet.payload)
        if digit is not None:
            self.digit(digit, "rfc4733")

    def digit(self, digit: str, source: str) -> None:
        if not self.merger.accept(digit, source, self.loop.time()):
            return
        self.digit_count[source] += 1
        log.event(logger, "dtmf.received", logging.DEBUG, voice_id=self.voice_id, source=source)  # never the digit
        self.digits.put_nowait(digit)
        if self._done is not None and self._interruptible:
            self._finish(interrupted=True)

    # -- the frame handler (called by the media clock)
    def __call__(self, frame: bytes | None) -> bytes:
        if frame is not None and self.detector is not None and not self.merger.saw_rfc4733:
            digit = self.detector.feed(g711.decode(self.codec, frame))  # decoded only for the tone detector
            if digit is not None:
                self.digit(digit, "inband")
        room = None
        if self.leg is not None:  # packets relayed as they are, both ways
            self.leg.push(frame)
            room = self.leg.pull()
        if self._notice is not None:
            chunk = self._notice[self._notice_pos : self._notice_pos + FRAME]
            self._notice_pos += FRAME
            if self._notice_pos >= len(self._notice):
                self._notice = None
            return chunk + self.silence[: FRAME - len(chunk)]
        if self._done is not None:
            chunk = self._audio[self._pos : self._pos + FRAME]
            self._pos += FRAME
            if self._pos >= len(self._audio):
                self._finish(interrupted=False)
            if len(chunk) == FRAME:
                return chunk
            return chunk + self.silence[: FRAME - len(chunk)]
        if self._hold is not None:
            chunk = self._hold[self._hold_pos : self._hold_pos + FRAME]
            self._hold_pos = (self._hold_pos + FRAME) % (len(self._hold) - len(self._hold) % FRAME)
            return chunk
        return room if room is not None else self.silence

    def bridge(self, leg: Any) -> None:
        """From now on the caller hears the room (when no prompt or hold audio plays) and the room the caller."""
        self.leg = leg

    # -- output
    def _finish(self, interrupted: bool) -> None:
        done, self._done = self._done, None
        if done is not None and not done.done():
            done.set_result(interrupted)

    async def play(self, audio: bytes, interruptible: bool = True) -> bool:
        """Play encoded audio to the end; True if a digit interrupted it."""
        if interruptible and not self.digits.empty():
            return True  # the caller already typed ahead
        self._finish(interrupted=True)
        self._audio, self._pos, self._interruptible = audio, 0, interruptible
        self._done = self.loop.create_future()
        return await self._done

    def stop(self) -> None:
        self._finish(interrupted=True)

    def announce(self, audio: bytes) -> None:
        """Play encoded `audio` now, ahead of anything else: a prompt playing is paused (it goes on afterwards, not
        cut), hold audio and the room wait. For what a caller must hear whatever the flow is doing (the recording
        notice)."""
        self._notice, self._notice_pos = (audio, 0) if audio else (None, 0)

    def hold(self, on: bool = True) -> None:
        self._hold = g711.encode(self.codec, _HOLD) if on else None
        self._hold_pos = 0

    def clear_digits(self) -> None:
        while not self.digits.empty():
            self.digits.get_nowait()

    async def collect(self, max_digits: int, terminator: str = "#", first_timeout: float = 10.0,
                      inter_timeout: float = 5.0) -> str | None:
        """Digits up to `terminator` or `max_digits`; "*" clears. None if nothing was typed in time."""
        typed = ""
        timeout = first_timeout
        while True:
            try:
                digit = await asyncio.wait_for(self.digits.get(), timeout)
            except TimeoutError:
                return typed or None  # the inter-digit timeout submits what was typed
            timeout = inter_timeout
            if digit == terminator:
                return typed  # "" when only the terminator was pressed
            if digit == "*":
                typed = ""
                continue
            typed += digit
            if len(typed) >= max_digits:
                return typed
