"""Voice activity of a phone caller, sans-I/O: is the caller talking right now?

Janus AudioBridge raises no talking events for plain-RTP participants, so the worker decides itself from
the caller's decoded audio. `VoiceActivity.feed(frame, now)` takes one 10, 20 or 30 ms frame of 16-bit
PCM (8 kHz, or 16/32/48 kHz for wideband legs) and returns "talking" or "stopped" on a transition only.

A frame counts as voiced when its level is at or above `floor_dbfs` AND either
- Google's WebRTC VAD (the `webrtcvad` module of `webrtcvad-wheels`, a GMM speech/noise classifier)
  calls it speech, or
- its level is at or above `tone_dbfs`, whatever WebRTC says.

Why the second path: WebRTC's VAD is trained for speech and classifies steady tones inconsistently.
Measured through G.711 mu-law at aggressiveness 2, a 1 kHz or 440 Hz tone at -23 dBFS is speech in
every frame, but a 300 Hz tone at -18 dBFS or a 500 Hz tone at -18 dBFS is speech for the first four
frames only (its noise model then adapts to the tone and calls it noise). A caller holding a tone at a
normal level (-20 dBFS) is treated as a caller producing sound: the product's acceptance tests stream
a tone from a phone and expect the caller to show as speaking. The cost is that loud steady noise
(>= -35 dBFS RMS, far above any line or comfort noise) counts as talking too; WebRTC alone already
calls white noise at -30 dBFS speech in most frames, so little is lost.

Why the floor: WebRTC's VAD has no absolute level; it flags a few percent of frames of -60 dBFS noise
as speech. Comfort noise and line noise sit at -60 dBFS and below; soft syllables of a quiet talker
(speech at -40 dBFS overall) stay above -50 dBFS, so the default floor is -50 dBFS.

Levels are RMS relative to full scale (32768): a full-scale sine is -3 dBFS, and a sine of peak
amplitude 3277 (-20 dBFS peak) is -23 dBFS.

Hysteresis: "talking" once `start_frames` of the last `window` frames are voiced (3 of 5: 60 ms of
20 ms frames); "stopped" once `hang` seconds (600 ms) have passed without a voiced frame, counted in
audio fed or, when the caller's phone stops sending (silence suppression, DTX) in time given by `now`:
call `check(now)` on the media clock for that case.

The WebRTC VAD keeps a noise model that adapts over time, so feed every frame of the call to one
instance per caller, silence included.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np
import webrtcvad

RATES = (8000, 16000, 32000, 48000)
FRAME_MS = (10, 20, 30)
FULL_SCALE = 32768.0
TALKING = "talking"
STOPPED = "stopped"


def level_dbfs(samples: np.ndarray) -> float:
    """RMS level of int16 samples in dB relative to full scale; -inf for digital silence."""
    x = samples.astype(np.int64)  # exact sum of squares, no overflow
    energy = int(np.dot(x, x))
    return 10.0 * math.log10(energy / (max(1, len(x)) * FULL_SCALE * FULL_SCALE)) if energy else -math.inf


class VoiceActivity:
    def __init__(self, sample_rate: int = 8000, aggressiveness: int = 2, floor_dbfs: float = -50.0,
                 tone_dbfs: float = -35.0, start_frames: int = 3, window: int = 5, hang: float = 0.6) -> None:
        if sample_rate not in RATES:
            raise ValueError(f"sample rate {sample_rate} not supported (one of {RATES})")
        if not 0 <= aggressiveness <= 3:
            raise ValueError("aggressiveness is 0 (least) to 3 (most aggressive in rejecting non-speech)")
        if not 1 <= start_frames <= window:
            raise ValueError("need 1 <= start_frames <= window")
        self.sample_rate = sample_rate
        self.aggressiveness = aggressiveness
        self.floor_dbfs = floor_dbfs
        self.tone_dbfs = tone_dbfs
        self.start_frames = start_frames
        self.hang = hang
        self._vad = webrtcvad.Vad(aggressiveness)
        self._recent: deque[bool] = deque(maxlen=window)
        self._voiced_in_window = 0
        self._lengths = {ms * sample_rate // 1000 for ms in FRAME_MS}
        self.talking = False
        self.level = -math.inf  # level of the last frame, dBFS
        self.frames = 0
        self._unvoiced = 0.0  # seconds of audio fed since the last voiced frame
        self._last_voiced_at: float | None = None

    def _samples(self, frame: np.ndarray | bytes | bytearray | memoryview) -> np.ndarray:
        if isinstance(frame, bytes | bytearray | memoryview):
            samples = np.frombuffer(frame, dtype=np.int16)  # native byte order, what webrtcvad reads
        else:
            samples = np.asarray(frame)
            if samples.dtype != np.int16:
                if samples.dtype.kind not in "iu":
                    raise TypeError(f"frames are 16-bit integer PCM, not {samples.dtype}")
                samples = np.clip(samples, -32768, 32767).astype(np.int16)
        if len(samples) not in self._lengths:
            raise ValueError(f"a frame is 10, 20 or 30 ms: {sorted(self._lengths)} samples at {self.sample_rate} Hz, "
                             f"not {len(samples)}")
        return samples

    def is_voiced(self, frame: np.ndarray | bytes | bytearray | memoryview) -> bool:
        """The decision for one frame, before hysteresis (updates the WebRTC noise model and `level`)."""
        return self._classify(frame, self._samples(frame))

    def _classify(self, frame: np.ndarray | bytes | bytearray | memoryview, samples: np.ndarray) -> bool:
        speech = self._vad.is_speech(frame if isinstance(frame, bytes) else samples.tobytes(), self.sample_rate)
        self.level = level_dbfs(samples)
        return self.level >= self.floor_dbfs and (speech or self.level >= self.tone_dbfs)

    def feed(self, frame: np.ndarray | bytes | bytearray | memoryview, now: float) -> str | None:
        """One frame of the caller's audio at time `now` (seconds): "talking", "stopped" or None."""
        samples = self._samples(frame)
        voiced = self._classify(frame, samples)
        self.frames += 1
        if len(self._recent) == self._recent.maxlen and self._recent[0]:
            self._voiced_in_window -= 1
        self._recent.append(voiced)
        self._voiced_in_window += voiced
        if voiced:
            self._unvoiced = 0.0
            self._last_voiced_at = now
            if not self.talking and self._voiced_in_window >= self.start_frames:
                self.talking = True
                return TALKING
            return None
        self._unvoiced += len(samples) / self.sample_rate
        if self.talking and (self._unvoiced >= self.hang - 1e-9 or self._quiet_since(now)):
            return self._stop()
        return None

    def check(self, now: float) -> str | None:
        """Between frames (call it on the media clock): "stopped" when no voiced frame came for `hang`.

        For callers whose phone stops sending RTP during silence, so that `feed` is not called.
        """
        if self.talking and self._quiet_since(now):
            return self._stop()
        return None

    def reset(self) -> None:
        """Forget the hysteresis state (a new caller on the leg); the WebRTC noise model starts over too."""
        self._vad = webrtcvad.Vad(self.aggressiveness)
        self._recent.clear()
        self._voiced_in_window = 0
        self.talking = False
        self.level = -math.inf
        self._unvoiced = 0.0
        self._last_voiced_at = None

    def _quiet_since(self, now: float) -> bool:
        return self._last_voiced_at is not None and now - self._last_voiced_at >= self.hang - 1e-9

    def _stop(self) -> str:
        self.talking = False
        self._recent.clear()
        self._voiced_in_window = 0
        return STOPPED
