"""aiortc audio tracks: one fed by a clock (pushed every 20 ms, pulled by the WebRTC sender), and received
tracks read as fixed-size PCM frames."""

from __future__ import annotations

import asyncio
import fractions
from collections.abc import AsyncIterator

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError


class PushTrack(MediaStreamTrack):
    """Mono s16 audio at `rate`; when the sender falls behind, the oldest frames are dropped."""

    kind = "audio"

    def __init__(self, rate: int, depth: int = 10) -> None:
        super().__init__()
        self.rate = rate
        self.time_base = fractions.Fraction(1, rate)
        self.queue: asyncio.Queue[av.AudioFrame] = asyncio.Queue(maxsize=depth)
        self._pts = 0

    def push(self, samples: np.ndarray) -> None:
        frame = av.AudioFrame.from_ndarray(samples.astype(np.int16).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._pts
        frame.time_base = self.time_base
        self._pts += len(samples)
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(frame)

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        return await self.queue.get()


async def pcm_frames(track: MediaStreamTrack, rate: int, size: int) -> AsyncIterator[np.ndarray]:
    """A received audio track as mono int16 frames of `size` samples at `rate` (resampled once, statefully).

    Ends when the track ends.
    """
    resampler = av.AudioResampler(format="s16", layout="mono", rate=rate)
    pending = np.zeros(0, dtype=np.int16)
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return
        for out in resampler.resample(frame):  # type: ignore[arg-type]
            pending = np.concatenate([pending, out.to_ndarray().reshape(-1)])
        while len(pending) >= size:
            yield pending[:size]
            pending = pending[size:]
