"""Alarm events POSTed to `cluster.alarm_url` (JSON `{event, worker, reason, workers, timestamp, ...}`), from the
supervisor (workers and helpers lost, started, retired) and from a worker itself: its CDR store refusing writes.

`StoreAlarm` is checked once a second by the worker: when the CDR store's writes start failing (disk full,
read-only, I/O errors) it posts `cdr_unwritable` with the error and what waits in memory; once the store has
caught up, `cdr_recovered` with the outage's length. The store logs the failure itself (an error line) and the
worker's /metrics and /healthz show it; this is the page for whoever watches the alarm URL. One process, or a
worker of `--workers N`: the same URL, so one receiver sees every alarm of the host.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from .. import log
from ..store.cdr import CdrStore

logger = logging.getLogger("gateway.alarms")
TIMEOUT_S = 2.0


async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> None:
    """POST one alarm; a receiver that is down or slow costs one warning line, never the caller."""
    try:
        async with http.post(url, json=body, timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as r:
            await r.read()
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        log.event(logger, "alarm.undelivered", logging.WARNING, event=body.get("event"), error=str(exc)[:200])


class StoreAlarm:
    def __init__(self, cdr: CdrStore, worker: str, url: str, workers: Callable[[], int]) -> None:
        self.cdr = cdr
        self.worker = worker
        self.url = url
        self.workers = workers
        self.raised = False
        self._since = 0.0
        self._http: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def check(self) -> None:
        status = self.cdr.status()
        if not status["ok"] and not self.raised:
            self.raised, self._since = True, time.time()
            self._raise("cdr_unwritable", reason=status["error"], buffered=status["buffered"])
        elif status["ok"] and self.raised:
            self.raised = False
            self._raise("cdr_recovered", reason="writes resumed", outage_s=round(time.time() - self._since, 1),
                        dropped=status["dropped"])

    def _raise(self, event: str, **data: Any) -> None:
        log.event(logger, f"alarm.{event}", logging.ERROR if event == "cdr_unwritable" else logging.WARNING,
                  worker=self.worker, **data)
        if not self.url:
            return
        if self._http is None:
            self._http = aiohttp.ClientSession()
        body = {"event": event, "worker": self.worker, "timestamp": time.time(), "workers": self.workers(), **data}
        task = asyncio.get_running_loop().create_task(post(self._http, self.url, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=TIMEOUT_S)
        if self._http is not None:
            await self._http.close()
