"""DTMF from the three places a key press can arrive, sans-I/O.

- `Rfc4733Receiver`: telephone-event packets (RFC 4733). One event is one (SSRC, timestamp): a digit is
  reported on the first packet of an event, so a missing marker bit or lost end packets still yield
  exactly one digit, and the retransmitted end packets add nothing. Event codes >= 16 are ignored.
- `parse_info`: SIP INFO bodies, `application/dtmf-relay` (Signal=5) and `application/dtmf` (5).
- `ToneDetector`: in-band tones in decoded audio (Goertzel over 40 ms windows, 20 ms hop) with ITU-T
  Q.24 tolerances: accepts +-1.5 % frequency error, rejects +-3.5 %, twist 8 dB forward / 4 dB reverse,
  40 ms minimum; speech is rejected by requiring the two tones to carry most of the signal's power.
- `DigitMerger`: one key press is one digit even when it arrives by two sources.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

EVENTS = "0123456789*#ABCD"
ROWS = (697.0, 770.0, 852.0, 941.0)
COLS = (1209.0, 1336.0, 1477.0, 1633.0)
KEYPAD = ("123A", "456B", "789C", "*0#D")
RATE = 8000


def event_digit(code: int) -> str | None:
    return EVENTS[code] if 0 <= code < len(EVENTS) else None


class Rfc4733Receiver:
    def __init__(self, memory: int = 64) -> None:
        self._seen: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._memory = memory

    def receive(self, ssrc: int, timestamp: int, payload: bytes) -> str | None:
        """The digit a telephone-event packet starts, or None (continuation, end, unknown event)."""
        if len(payload) < 4:
            return None
        digit = event_digit(payload[0])
        if digit is None:
            return None  # events >= 16 (flash, tones...) are not digits
        key = (ssrc, timestamp)
        if key in self._seen:
            return None
        self._seen[key] = None
        if len(self._seen) > self._memory:
            self._seen.popitem(last=False)
        return digit


def parse_info(content_type: str, body: bytes) -> str | None:
    """The digit in a SIP INFO body (application/dtmf-relay or application/dtmf), or None."""
    text = body.decode("utf-8", "replace").strip()
    if content_type == "application/dtmf-relay":
        for line in text.splitlines():
            name, _, value = line.partition("=")
            if name.strip().lower() == "signal":
                text = value.strip()
                break
        else:
            return None
    elif content_type != "application/dtmf":
        return None
    if text in ("10", "11"):
        return "*" if text == "10" else "#"
    text = text.upper()
    return text if len(text) == 1 and text in EVENTS else None


# ---------------------------------------------------------------- in-band detection


@dataclass(frozen=True)
class ToneLimits:
    accept: float = 0.015  # frequency error that must still be detected
    reject: float = 0.035  # frequency error that must be rejected
    forward_twist_db: float = 8.0  # high group may be this much stronger
    reverse_twist_db: float = 4.0  # low group may be this much stronger
    min_level: float = 400.0  # minimum tone amplitude (int16), about -38 dBm0
    purity: float = 0.80  # the two tones must carry this share of the power
    neighbour_db: float = 8.0  # other tones of the same group at least this much weaker


WINDOW = 320  # 40 ms
HOP = 160  # 20 ms
GATE_SHARE = 0.3  # the 8 nominal tones must hold this share of the newest frame's power to go on


def _probe_matrix(freqs: list[float], length: int) -> np.ndarray:
    n = np.arange(length)
    return np.exp(-2j * np.pi * np.asarray(freqs)[:, None] * n[None, :] / RATE)


_GATE = _probe_matrix(list(ROWS + COLS), HOP)
_PROBES: dict[ToneLimits, np.ndarray] = {}


def _probes(limits: ToneLimits) -> np.ndarray:
    """Per tone: f*(1-accept), f, f*(1+accept) (in band), f*(1-reject), f*(1+reject) (out of band)."""
    if limits not in _PROBES:
        freqs = []
        for f in ROWS + COLS:
            freqs += [f * (1 - limits.accept), f, f * (1 + limits.accept), f * (1 - limits.reject), f * (1 + limits.reject)]
        _PROBES[limits] = _probe_matrix(freqs, WINDOW)
    return _PROBES[limits]


class ToneDetector:
    """Feed 20 ms frames of int16 samples; get a digit at the start of each key press."""

    def __init__(self, limits: ToneLimits = ToneLimits()) -> None:
        self.limits = limits
        self._matrix = _probes(limits)  # shared by every detector with the same limits
        self._prev = np.zeros(HOP)
        self._candidate: str | None = None
        self._active: str | None = None

    def _gate(self, frame: np.ndarray) -> bool:
        """Cheap first look at the newest 20 ms: loud enough, and a row and a column tone stand out.

        With 50 Hz bins a tone within the accepted +-1.5 % loses at most 4 dB at its nominal probe, so the
        gate never drops a window the full analysis would accept; speech and noise mostly stop here.
        """
        total = float(frame @ frame) / HOP
        if total < (self.limits.min_level**2) / 2:
            return False
        power = np.abs(_GATE @ frame) ** 2 * (2 / (HOP * HOP))
        return float(power[:4].max() + power[4:].max()) >= GATE_SHARE * total

    def _classify(self, x: np.ndarray) -> str | None:
        lim = self.limits
        total = float(x @ x) / WINDOW
        if total < (lim.min_level**2) / 2:
            return None
        power = (np.abs(self._matrix @ x) ** 2 * (2 / (WINDOW * WINDOW))).reshape(8, 5)  # sinusoid power
        inband = power[:, :3].max(axis=1)
        outband = power[:, 3:].max(axis=1)
        rows, cols = inband[:4], inband[4:]
        r, c = int(np.argmax(rows)), int(np.argmax(cols))
        row_p, col_p = rows[r], cols[c]
        if min(row_p, col_p) < (lim.min_level**2) / 2:
            return None
        if outband[r] > row_p or outband[4 + c] > col_p:
            return None  # the energy sits off the nominal frequency: more than the accepted error
        twist = 10 * np.log10(col_p / row_p)
        if twist > lim.forward_twist_db or -twist > lim.reverse_twist_db:
            return None
        if (row_p + col_p) < lim.purity * total:
            return None  # broadband signal (speech, noise), not a dual tone
        ratio = 10 ** (lim.neighbour_db / 10)
        if np.sort(rows)[-2] * ratio > row_p or np.sort(cols)[-2] * ratio > col_p:
            return None
        return KEYPAD[r][c]

    def feed(self, frame: np.ndarray) -> str | None:
        current = frame.astype(np.float64)
        if len(current) != HOP:
            return None
        x = np.concatenate([self._prev, current])
        self._prev = current
        digit = self._classify(x) if self._gate(current) else None
        reported = None
        if digit is None:
            self._active = None  # a window without tone ends the key press
        elif digit == self._candidate and digit != self._active:
            self._active = digit  # two consecutive windows agree: at least 40 ms of tone
            reported = digit
        self._candidate = digit
        return reported


class DigitMerger:
    """Keeps one digit per key press across sources.

    A digit equal to the last accepted one, from another source, within `window` seconds, is the same key
    press seen twice (e.g. RFC 4733 plus the tone left in the audio). Once RFC 4733 events have been seen
    on a call, in-band detection is ignored altogether (the trunk signals out of band).
    """

    def __init__(self, trusted: tuple[str, ...] = ("rfc4733", "info", "inband"), window: float = 0.5) -> None:
        self.trusted = trusted
        self.window = window
        self._last: tuple[str, str, float] | None = None
        self.saw_rfc4733 = False

    def accept(self, digit: str, source: str, now: float) -> bool:
        if source not in self.trusted:
            return False
        if source == "rfc4733":
            self.saw_rfc4733 = True
        elif source == "inband" and self.saw_rfc4733:
            return False
        last = self._last
        if last is not None and last[0] == digit and last[1] != source and now - last[2] < self.window:
            return False
        self._last = (digit, source, now)
        return True
