"""Limits on PIN guessing: failed attempts counted per caller number and per meeting over a window.

`AttemptLimiter` counts in this process (one worker); `RedisLimiter` counts in Redis, so a caller cannot
get more tries by landing on another worker. Both are used through the async `Limiter` interface.
"""

from __future__ import annotations

import time
import uuid
from collections import defaultdict, deque
from typing import Any

from redis.exceptions import RedisError

from .services import DirectoryUnavailable


class AttemptLimiter:
    def __init__(self, per_caller: int, per_meeting: int, window: float) -> None:
        self.per_caller = per_caller
        self.per_meeting = per_meeting
        self.window = window
        self._failures: dict[str, deque[float]] = defaultdict(deque)

    def _count(self, key: str, now: float) -> int:
        q = self._failures[key]
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self._failures[key]
            return 0
        return len(q)

    def blocked(self, caller: str, meeting_id: str, now: float) -> str | None:
        """Which limit is reached ("caller" or "meeting"), or None while attempts are allowed."""
        if self._count(f"c:{caller}", now) >= self.per_caller:
            return "caller"
        if self._count(f"m:{meeting_id}", now) >= self.per_meeting:
            return "meeting"
        return None

    def failed(self, caller: str, meeting_id: str, now: float) -> None:
        self._failures[f"c:{caller}"].append(now)
        self._failures[f"m:{meeting_id}"].append(now)

    async def check(self, caller: str, meeting_id: str) -> str | None:
        return self.blocked(caller, meeting_id, time.monotonic())

    async def failure(self, caller: str, meeting_id: str) -> None:
        self.failed(caller, meeting_id, time.monotonic())


class RedisLimiter:
    """The same limits over a sliding window kept in Redis sorted sets (gw:pinfail:c:CALLER, gw:pinfail:m:ID)."""

    def __init__(self, redis: Any, per_caller: int, per_meeting: int, window: float) -> None:
        self.redis = redis
        self.limits = {"c": per_caller, "m": per_meeting}
        self.window = window

    async def check(self, caller: str, meeting_id: str) -> str | None:
        now = time.time()
        try:
            async with self.redis.pipeline(transaction=False) as p:
                for kind, key in (("c", caller), ("m", meeting_id)):
                    p.zremrangebyscore(f"gw:pinfail:{kind}:{key}", "-inf", now - self.window)
                    p.zcard(f"gw:pinfail:{kind}:{key}")
                _, callers, _, meetings = await p.execute()
        except (RedisError, OSError) as exc:  # no limit check, no PIN check: the caller hears "unavailable"
            raise DirectoryUnavailable(f"shared PIN limiter unreachable: {exc}") from exc
        if callers >= self.limits["c"]:
            return "caller"
        return "meeting" if meetings >= self.limits["m"] else None

    async def failure(self, caller: str, meeting_id: str) -> None:
        now = time.time()
        try:
            async with self.redis.pipeline(transaction=False) as p:
                for kind, key in (("c", caller), ("m", meeting_id)):
                    p.zadd(f"gw:pinfail:{kind}:{key}", {uuid.uuid4().hex: now})
                    p.expire(f"gw:pinfail:{kind}:{key}", int(self.window) + 1)
                await p.execute()
        except (RedisError, OSError) as exc:
            raise DirectoryUnavailable(f"shared PIN limiter unreachable: {exc}") from exc
