"""DTMF from RFC 4733, SIP INFO and in-band tones (Q.24 tolerances, speech immunity), without sockets."""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import resample_poly

from gateway.media.dtmf import COLS, KEYPAD, ROWS, DigitMerger, Rfc4733Receiver, ToneDetector, parse_info


def event(code: int, end: bool = False, duration: int = 160) -> bytes:
    return bytes([code, (0x80 if end else 0) | 10]) + duration.to_bytes(2, "big")


def test_rfc4733_one_digit_per_event_dedup_on_ssrc_and_timestamp() -> None:
    rx = Rfc4733Receiver()
    got = []
    # sipp style: a new SSRC per burst with timestamps restarting at the same value
    for ssrc in (1, 2):
        for i in range(5):
            got.append(rx.receive(ssrc, 1000, event(1, duration=160 * (i + 1))))
        for _ in range(3):
            got.append(rx.receive(ssrc, 1000, event(1, end=True)))  # end packets sent three times
    assert [d for d in got if d] == ["1", "1"]


def test_rfc4733_lost_start_and_end_still_one_digit_and_high_events_ignored() -> None:
    rx = Rfc4733Receiver()
    assert rx.receive(7, 5000, event(11, duration=480)) == "#"  # no marker, first packets lost
    assert rx.receive(7, 5160, event(16)) is None  # flash and other events >= 16
    assert rx.receive(7, 5320, event(255)) is None
    assert rx.receive(7, 5480, b"\x01") is None  # truncated
    assert rx.receive(7, 5640, event(10)) == "*"


def test_info_bodies() -> None:
    assert parse_info("application/dtmf-relay", b"Signal=5\r\nDuration=160\r\n") == "5"
    assert parse_info("application/dtmf-relay", b"Signal= #\r\n") == "#"
    assert parse_info("application/dtmf-relay", b"Signal=11\r\n") == "#"
    assert parse_info("application/dtmf", b"*") == "*"
    assert parse_info("application/dtmf", b"x") is None
    assert parse_info("text/plain", b"5") is None


def tone(key: str, ms: int, amp: float = 6000, row_err: float = 0.0, col_err: float = 0.0,
         twist_db: float = 0.0) -> np.ndarray:
    r = next(i for i, row in enumerate(KEYPAD) if key in row)
    c = KEYPAD[r].index(key)
    t = np.arange(int(8 * ms)) / 8000
    col_amp = amp * 10 ** (twist_db / 20)
    return amp * np.sin(2 * np.pi * ROWS[r] * (1 + row_err) * t) + col_amp * np.sin(2 * np.pi * COLS[c] * (1 + col_err) * t)


def detect(signal: np.ndarray) -> str:
    det = ToneDetector()
    pad = (-len(signal)) % 160
    signal = np.concatenate([signal, np.zeros(pad + 320)])
    return "".join(d for i in range(0, len(signal), 160) if (d := det.feed(signal[i : i + 160].astype(np.int16))))


def sequence(keys: str, on: int = 80, off: int = 60, **kw: float) -> np.ndarray:
    parts = [np.zeros(8 * 100)]
    for k in keys:
        parts += [tone(k, on, **kw), np.zeros(8 * off)]
    return np.concatenate(parts)


def test_inband_all_keys_and_repeats() -> None:
    assert detect(sequence("0123456789*#ABCD")) == "0123456789*#ABCD"
    assert detect(sequence("112233")) == "112233"


@pytest.mark.parametrize("err", [0.015, -0.015])
def test_inband_accepts_1_5_percent(err: float) -> None:
    assert detect(sequence("159#", row_err=err, col_err=err)) == "159#"


@pytest.mark.parametrize("err", [0.035, -0.035])
def test_inband_rejects_3_5_percent(err: float) -> None:
    assert detect(sequence("159#", row_err=err, col_err=err)) == ""
    assert detect(sequence("159#", row_err=err)) == ""


def test_inband_twist_and_duration_limits() -> None:
    assert detect(sequence("5", twist_db=7)) == "5" and detect(sequence("5", twist_db=-3.5)) == "5"
    assert detect(sequence("5", twist_db=10)) == "" and detect(sequence("5", twist_db=-6)) == ""
    assert detect(sequence("5", on=20)) == ""  # shorter than 40 ms
    assert detect(sequence("5", amp=100)) == ""  # too weak


def test_inband_single_tone_and_noise_rejected() -> None:
    t = np.arange(8000) / 8000
    assert detect(6000 * np.sin(2 * np.pi * 697 * t)) == ""
    assert detect(np.random.default_rng(1).normal(0, 3000, 16000)) == ""


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng missing")
def test_inband_does_not_fire_on_speech(tmp_path: Path) -> None:
    """Speech (espeak-ng, several voices, digits read aloud) must produce no digit."""
    text = "one two three four five six seven eight nine zero star pound. Please enter your meeting number."
    total = 0.0
    for voice in ("en-us", "en-us+f3", "en-gb+m3", "de", "fr+f2"):
        path = tmp_path / "speech.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, timeout=60)
        with wave.open(str(path)) as w:
            x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(float)
            rate = w.getframerate()
        y = resample_poly(x, 8000, rate)
        y *= 12000 / (np.max(np.abs(y)) + 1)
        total += len(y) / 8000
        assert detect(y) == "", voice
    assert total > 20


def test_merger_one_press_two_sources() -> None:
    m = DigitMerger()
    assert m.accept("5", "info", 0.0)
    assert not m.accept("5", "inband", 0.05)  # the same press heard in the audio too
    assert m.accept("5", "info", 0.3)  # the same key pressed again, same source
    assert m.accept("6", "inband", 0.4)
    assert m.accept("7", "rfc4733", 1.0) and not m.accept("7", "inband", 1.06)
    assert not m.accept("8", "inband", 3.0)  # RFC 4733 seen: in-band is ignored from then on
    assert not DigitMerger(trusted=("rfc4733",)).accept("1", "info", 0.0)
