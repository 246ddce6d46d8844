"""baresip, a real softphone, calls the gateway."""

from __future__ import annotations

import time
import wave
from pathlib import Path

import numpy as np

from tests.conftest import Gateway
from tests.integration.baresip import Baresip


def tone_wav(path: Path, freq: float, seconds: float, rate: int = 8000) -> None:
    t = np.arange(int(rate * seconds)) / rate
    data = (10000 * np.sin(2 * np.pi * freq * t)).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.tobytes())


def dominant_frequency(path: Path) -> tuple[float, float]:
    with wave.open(str(path)) as w:
        rate = w.getframerate()
        x = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(float)
    x = x[rate:]  # skip the first second (jitter buffer fill, start-up)
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    freqs = np.fft.rfftfreq(len(x), 1 / rate)
    return float(freqs[int(np.argmax(spectrum))]), float(np.sqrt(np.mean(x**2)))


def test_baresip_calls_echo_stays_5s_and_hears_itself(gateway: Gateway, tmp_path: Path) -> None:
    src = tmp_path / "tone.wav"
    tone_wav(src, 1000.0, 30.0)  # longer than the call: aufile ends the call when the file ends
    phone = Baresip(tmp_path / "baresip", src)
    try:
        phone.command("dial", f"sip:15550100001@{gateway.sip}")
        phone.wait_event("CALL_ESTABLISHED")
        time.sleep(5)  # the scenario itself: stay in the call for 5 s
        phone.command("hangup")
        phone.wait_event("CALL_CLOSED")
    finally:
        phone.close()
    rows = gateway.wait_calls_ended(1)
    assert rows[0]["reason"] == "remote_bye" and rows[0]["answered_at"]
    assert rows[0]["ended_at"] - rows[0]["answered_at"] >= 5
    recorded = [p for p in (tmp_path / "baresip" / "rec").glob("*.wav") if "dec" in p.name]
    assert recorded, "baresip recorded nothing"
    freq, rms = dominant_frequency(recorded[0])
    assert abs(freq - 1000) < 20 and rms > 1000, (freq, rms)
