"""One shared 20 ms media clock per worker, on absolute deadlines.

Every call's media work for a tick runs from here, so a worker has one timer instead of one sleep loop
per call. Tick n is due at start + n * interval; a late tick does not push the next ones back (no drift).
If the loop stalls for longer than `max_catch_up` ticks, the missed ticks are counted and skipped.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

logger = logging.getLogger("gateway.media")


class MediaClock:
    def __init__(self, interval: float = 0.020, max_catch_up: int = 5) -> None:
        self.interval = interval
        self.max_catch_up = max_catch_up
        self._subscribers: dict[int, Callable[[], None]] = {}
        self._task: asyncio.Task[None] | None = None
        self.ticks = 0
        self.skipped = 0
        self.lateness: deque[float] = deque(maxlen=50_000)  # seconds past each tick's deadline

    def subscribe(self, key: int, callback: Callable[[], None]) -> None:
        self._subscribers[key] = callback

    def unsubscribe(self, key: int) -> None:
        self._subscribers.pop(key, None)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="media-clock")

    def stop(self) -> None:
        if self._task:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        n = 0
        while True:
            n += 1
            deadline = start + n * self.interval
            delay = deadline - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now = loop.time()
            late = now - deadline
            if late > self.max_catch_up * self.interval:
                missed = int(late / self.interval)
                self.skipped += missed
                n += missed
                logger.warning("media.clock_stall", extra={"fields": {"late_ms": round(late * 1000, 1), "skipped": missed}})
            self.lateness.append(max(0.0, late))
            self.ticks += 1
            for callback in list(self._subscribers.values()):
                try:
                    callback()
                except Exception:
                    logger.exception("media.tick_failed")

    def lateness_percentiles(self) -> dict[str, float]:
        if not self.lateness:
            return {"p50_ms": 0.0, "p99_ms": 0.0}
        values = sorted(self.lateness)
        pick = lambda q: values[min(len(values) - 1, int(q * len(values)))] * 1000  # noqa: E731
        return {"p50_ms": round(pick(0.50), 3), "p99_ms": round(pick(0.99), 3), "max_ms": round(values[-1] * 1000, 3)}
