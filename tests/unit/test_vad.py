"""Voice activity of phone callers: tones, espeak-ng speech, silence and line noise, through G.711 mu-law."""

from __future__ import annotations

import os
import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import resample_poly

from gateway.media import g711
from gateway.media.vad import VoiceActivity, level_dbfs

RATE = 8000
FRAME = 160
TICK = 0.020


def over_the_phone(x: np.ndarray) -> np.ndarray:
    """What the worker sees: the caller's audio mu-law encoded by the phone, decoded by the worker."""
    return g711.decode("PCMU", g711.encode("PCMU", np.clip(x, -32768, 32767).astype(np.int16)))


def tone(freq: float, amp: float, seconds: float, rate: int = RATE) -> np.ndarray:
    return amp * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


def noise(dbfs: float, seconds: float, seed: int = 7) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(int(RATE * seconds)) * 32768 * 10 ** (dbfs / 20)


def run(vad: VoiceActivity, x: np.ndarray, frame: int = FRAME, t0: float = 0.0) -> list[tuple[str, float]]:
    """Feed `x` frame by frame; the events with the time of the end of the frame that raised them."""
    events = []
    step = frame / vad.sample_rate
    for i in range(len(x) // frame):
        now = t0 + (i + 1) * step
        event = vad.feed(x[i * frame : (i + 1) * frame], now)
        if event:
            events.append((event, now))
    return events


@pytest.mark.parametrize("freq", [300.0, 440.0, 500.0, 1000.0, 2000.0])
@pytest.mark.parametrize("amp", [3277.0, 6000.0, 10000.0])  # -20 dBFS peak (-23 dBFS RMS) up to -10 dBFS peak
def test_tone_talks_fast_and_stops(freq: float, amp: float) -> None:
    """Webrtcvad alone calls a 300 or 500 Hz tone at -18 dBFS noise after 80 ms: the energy path must carry it."""
    lead, on, tail = 0.5, 3.0, 1.5
    x = over_the_phone(np.concatenate([np.zeros(int(RATE * lead)), tone(freq, amp, on), np.zeros(int(RATE * tail))]))
    events = run(VoiceActivity(), x)
    assert [e for e, _ in events] == ["talking", "stopped"]
    assert lead < events[0][1] <= lead + 0.100
    assert lead + on + 0.3 < events[1][1] <= lead + on + 1.0


def test_tone_onset_mid_frame_and_repeated() -> None:
    vad = VoiceActivity()
    burst = np.concatenate([np.zeros(RATE + 80), tone(1000.0, 3277.0, 1.0)])  # onset 80 samples into a frame
    x = over_the_phone(np.concatenate([burst, burst, np.zeros(2 * RATE)]))
    events = run(vad, x)
    assert [e for e, _ in events] == ["talking", "stopped", "talking", "stopped"]
    onsets = [1.01, 3.02]
    ends = [2.01, 4.02]
    for (_, talk), (_, stop), onset, end in zip(events[::2], events[1::2], onsets, ends, strict=True):
        assert onset < talk <= onset + 0.100
        assert end < stop <= end + 1.0


@pytest.mark.parametrize("kind", ["zeros", "ulaw-idle", "noise-60", "noise-55", "tone-60", "hum-55"])
def test_never_talks_on_silence_or_line_noise(kind: str) -> None:
    seconds = 20.0
    x = {
        "zeros": np.zeros(int(RATE * seconds)),
        "ulaw-idle": g711.decode("PCMU", bytes([0xFF]) * int(RATE * seconds)).astype(float),
        "noise-60": noise(-60.0, seconds),
        "noise-55": noise(-55.0, seconds, seed=3),
        "tone-60": tone(1000.0, 32768 * 10 ** (-57 / 20), seconds),  # -60 dBFS RMS
        "hum-55": tone(50.0, 32768 * 10 ** (-52 / 20), seconds) + noise(-65.0, seconds),
    }[kind]
    vad = VoiceActivity()
    assert run(vad, over_the_phone(x)) == []
    assert not vad.talking


def test_low_noise_between_tones_does_not_hold_talking() -> None:
    """Line noise at -60 dBFS after the caller stops must let "stopped" come."""
    x = over_the_phone(np.concatenate([noise(-60.0, 1.0), tone(440.0, 6000.0, 1.0) + noise(-60.0, 1.0, 2), noise(-60.0, 3.0, 4)]))
    events = run(VoiceActivity(), x)
    assert [e for e, _ in events] == ["talking", "stopped"]
    assert events[1][1] <= 3.0


def speech(tmp_path: Path, text: str, voice: str = "en-us") -> np.ndarray:
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True, timeout=60)
    with wave.open(str(path)) as w:
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(float)
        rate = w.getframerate()
    return resample_poly(x, RATE, rate)


def active_span(x: np.ndarray, dbfs: float = -40.0) -> tuple[float, float]:
    """Start and end (seconds) of the frames of `x` at or above `dbfs`."""
    levels = [level_dbfs(x[i : i + FRAME].astype(np.int16)) for i in range(0, len(x) - FRAME + 1, FRAME)]
    loud = [i for i, lv in enumerate(levels) if lv >= dbfs]
    return loud[0] * TICK, (loud[-1] + 1) * TICK


needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None and not os.environ.get("CI"),
                                  reason="espeak-ng missing (make install brings it; CI fails instead)")


@needs_espeak
@pytest.mark.parametrize("voice", ["en-us", "en-gb+m3", "de", "fr+f2"])
@pytest.mark.parametrize("gain_db", [0.0, -20.0])
def test_detects_espeak_speech(tmp_path: Path, voice: str, gain_db: float) -> None:
    """Speech at espeak's level (~-21 dBFS) and 20 dB quieter (~-41 dBFS, mostly below the energy path's
    -35 dBFS: there the WebRTC VAD decides): talking soon after the first syllable, stopped within 1 s of the last."""
    s = speech(tmp_path, "Hello, this is a caller speaking to the meeting room. Can you hear me?", voice)
    s = s * 10 ** (gain_db / 20)
    lead = 1.0
    x = over_the_phone(np.concatenate([np.zeros(int(RATE * lead)), s, np.zeros(2 * RATE)]))
    start, end = active_span(x, dbfs=-40.0 + gain_db)
    events = run(VoiceActivity(), x)
    kinds = [e for e, _ in events]
    assert kinds and kinds[0] == "talking" and kinds[-1] == "stopped", events
    assert start < events[0][1] <= start + 0.200, (start, events)
    assert end < events[-1][1] <= end + 1.0, (end, events)
    talking = sum(b - a for (_, a), (_, b) in zip(events[::2], events[1::2], strict=True))
    assert talking >= 0.8 * (end - start)  # one utterance: no long drop-outs between words


@needs_espeak
def test_quiet_speech_is_webrtcs_call(tmp_path: Path) -> None:
    """Speech 20 dB down: most of its voiced frames are below the energy path's level, so WebRTC finds them."""
    s = speech(tmp_path, "Hello, this is a caller speaking to the meeting room.") * 0.1
    x = over_the_phone(np.concatenate([np.zeros(RATE), s, np.zeros(RATE)]))
    vad = VoiceActivity()
    start, end = active_span(x, dbfs=-60.0)
    frames = [x[i : i + FRAME] for i in range(int(start * RATE), int(end * RATE), FRAME)]
    voiced = [vad.is_voiced(f) for f in frames]
    by_energy = [level_dbfs(f) >= vad.tone_dbfs for f in frames]
    assert sum(by_energy) < 0.3 * len(frames)
    assert sum(v and not e for v, e in zip(voiced, by_energy, strict=True)) > 0.3 * len(frames)


def test_check_stops_a_caller_whose_phone_goes_quiet() -> None:
    """Silence suppression: the phone stops sending RTP, so no frame comes; the media clock calls check()."""
    vad = VoiceActivity()
    events = run(vad, over_the_phone(tone(1000.0, 6000.0, 0.5)))
    assert [e for e, _ in events] == ["talking"]
    assert vad.check(0.5 + 0.5) is None
    assert vad.check(0.5 + 0.6) == "stopped"
    assert vad.check(0.5 + 0.7) is None and not vad.talking


def test_frame_after_long_gap_stops_at_once() -> None:
    vad = VoiceActivity()
    run(vad, over_the_phone(tone(1000.0, 6000.0, 0.5)))
    assert vad.talking
    assert vad.feed(np.zeros(FRAME, dtype=np.int16), 5.0) == "stopped"


def test_accepts_bytes_arrays_and_wideband() -> None:
    x = over_the_phone(np.concatenate([np.zeros(RATE // 2), tone(1000.0, 6000.0, 0.5)]))
    as_bytes = VoiceActivity()
    events = [(as_bytes.feed(x[i : i + FRAME].tobytes(), i / RATE), i / RATE) for i in range(0, len(x), FRAME)]
    assert [e for e, _ in events if e] == ["talking"]
    wide = VoiceActivity(sample_rate=16000)
    y = np.concatenate([np.zeros(8000), tone(1000.0, 6000.0, 0.5, rate=16000)]).astype(np.int16)
    assert [e for e, _ in run(wide, y, frame=320)] == ["talking"]
    assert run(VoiceActivity(), x.astype(np.int32), frame=240)[0][0] == "talking"  # 30 ms frames, int32 samples


@pytest.mark.parametrize("bad", [np.zeros(100, dtype=np.int16), b"\0" * 100, np.zeros(160, dtype=np.float32)])
def test_rejects_malformed_frames(bad: np.ndarray | bytes) -> None:
    with pytest.raises((ValueError, TypeError)):
        VoiceActivity().feed(bad, 0.0)


def test_rejects_bad_settings() -> None:
    for kwargs in ({"sample_rate": 11025}, {"aggressiveness": 4}, {"start_frames": 6, "window": 5}):
        with pytest.raises(ValueError):
            VoiceActivity(**kwargs)


def test_aggressiveness_is_configurable() -> None:
    assert VoiceActivity().aggressiveness == 2
    vad = VoiceActivity(aggressiveness=0)
    assert run(vad, over_the_phone(tone(440.0, 6000.0, 0.3)))[0][0] == "talking"
