"""An aiortc audio track fed by a clock: frames are pushed every 20 ms and pulled by the WebRTC sender."""

from __future__ import annotations

import asyncio
import fractions

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
