"""Limits on guessing meeting IDs and PINs.

Every attempt is reserved (counted as a failure) before the caller's digits are checked and given back when it
succeeds, so calls at the same time cannot overrun a limit: `AttemptLimiter` does the check and the count with no
await in between (one event loop), `RedisLimiter` in one Lua script (atomic in Redis, across workers and hosts).

Counters, over `pin_failure_window_s`:
- per source address and per caller number (within its trunk), for each step: beyond a limit the caller is refused.
  The caller number alone proves nothing (the caller chooses it); the source address is what the network saw
  (Kamailio's pike and fail2ban key on it too). A trunk with `trust_id_inbound` (a carrier whose one address
  carries many callers and vouches for their numbers, as Asterisk's option of that name) is counted by number only.
- per meeting, for PINs: a budget, never a lock (a stranger who knows a meeting ID must not lock its participants
  out). Past the budget each PIN check waits `pin_backoff_ms`, doubling with each further failure, up to
  `pin_backoff_max_ms`: a guesser spread over many sources is slowed, the participants still get in.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from .. import log
from ..config import IvrConfig
from .services import Attempt, DirectoryUnavailable, Origin

logger = logging.getLogger("gateway.limits")
STEPS = ("meeting_id", "pin")


@dataclass(frozen=True)
class Limits:
    """Failures allowed per step and kind ("source", "caller"; 0 = no limit), the meeting's budget and back-off."""

    per: dict[tuple[str, str], int]
    meeting_budget: int
    backoff: float
    backoff_max: float
    window: float

    @classmethod
    def from_config(cls, ivr: IvrConfig) -> Limits:
        return cls({("pin", "caller"): ivr.pin_failures_per_caller, ("pin", "source"): ivr.pin_failures_per_source,
                    ("meeting_id", "caller"): ivr.meeting_id_failures_per_caller,
                    ("meeting_id", "source"): ivr.meeting_id_failures_per_source},
                   ivr.pin_failures_per_meeting, ivr.pin_backoff_ms / 1000, ivr.pin_backoff_max_ms / 1000,
                   float(ivr.pin_failure_window_s))

    def keys(self, step: str, origin: Origin) -> list[tuple[str, str, int]]:
        """(kind, counter, limit) of the limited counters of an attempt, source first."""
        if step not in STEPS:
            raise ValueError(f"unknown step {step!r}")
        found = [("source", f"{step}:s:{origin.source}", self.per[(step, "source")])] if origin.source else []
        return found + [("caller", f"{step}:c:{origin.caller}", self.per[(step, "caller")])]

    def delay(self, meeting_failures: int) -> float:
        """The wait before a PIN check when the meeting has this many failures (the attempt's own included)."""
        over = meeting_failures - self.meeting_budget
        if self.meeting_budget <= 0 or over <= 0 or self.backoff <= 0:
            return 0.0
        return min(self.backoff_max, self.backoff * 2 ** min(over - 1, 20))


def meeting_key(meeting_id: str) -> str:
    return f"pin:m:{meeting_id}"


class AttemptLimiter:
    """The counters in this process (one worker)."""

    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self._counters: dict[str, dict[str, float]] = {}  # counter -> token -> when (insertion order = time order)
        self._swept = clock()

    def _live(self, key: str, now: float) -> int:
        entries = self._counters.get(key)
        if entries is None:
            return 0
        cutoff = now - self.limits.window
        while entries and next(iter(entries.values())) <= cutoff:
            del entries[next(iter(entries))]
        if not entries:
            del self._counters[key]
        return len(entries)

    def take(self, step: str, origin: Origin, meeting_id: str = "") -> Attempt:
        """Check and count in one go: nothing can run in between (no await)."""
        now = self.clock()
        self._sweep(now)
        limited = self.limits.keys(step, origin)
        for kind, key, limit in limited:
            if limit and self._live(key, now) >= limit:
                return Attempt(step, blocked=kind)
        counted = [key for _, key, _ in limited] + ([meeting_key(meeting_id)] if step == "pin" and meeting_id else [])
        token = uuid.uuid4().hex
        for key in counted:
            self._counters.setdefault(key, {})[token] = now
        delay = self.limits.delay(self._live(meeting_key(meeting_id), now)) if step == "pin" and meeting_id else 0.0
        return Attempt(step, token, tuple(counted), "", delay)

    def give_back(self, attempt: Attempt) -> None:
        for key in attempt.keys:
            entries = self._counters.get(key)
            if entries is not None:
                entries.pop(attempt.token, None)
                if not entries:
                    del self._counters[key]

    def _sweep(self, now: float) -> None:
        """Forget expired counters now and then, so numbers and addresses seen once do not pile up."""
        if now - self._swept < min(60.0, self.limits.window):
            return
        self._swept = now
        for key in list(self._counters):
            self._live(key, now)

    def __len__(self) -> int:
        return len(self._counters)

    async def reserve(self, step: str, origin: Origin, meeting_id: str = "") -> Attempt:
        return self.take(step, origin, meeting_id)

    async def release(self, attempt: Attempt) -> None:
        self.give_back(attempt)


# KEYS: the limited counters, then (for a PIN) the meeting's. ARGV: window (ms), token, how many KEYS are limited,
# then their limits (0 = none). Returns {i, 0} when KEYS[i] is full (nothing counted), else {0, the meeting's count}.
# Redis's own clock (TIME) orders the entries, so the workers' clocks need not agree.
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local limited = tonumber(ARGV[3])
for i = 1, #KEYS do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - window)
end
for i = 1, limited do
  local limit = tonumber(ARGV[3 + i])
  if limit > 0 and redis.call('ZCARD', KEYS[i]) >= limit then
    return {i, 0}
  end
end
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], now, ARGV[2])
  redis.call('PEXPIRE', KEYS[i], window)
end
if #KEYS > limited then
  return {0, redis.call('ZCARD', KEYS[#KEYS])}
end
return {0, 0}
"""


class RedisLimiter:
    """The same counters in Redis sorted sets (gw:attempts:STEP:KIND:ID), shared by every worker, reserved by one
    Lua script (check and count are atomic)."""

    PREFIX = "gw:attempts:"

    def __init__(self, redis: Any, limits: Limits) -> None:
        self.redis = redis
        self.limits = limits
        self._reserve = redis.register_script(RESERVE)

    async def reserve(self, step: str, origin: Origin, meeting_id: str = "") -> Attempt:
        limited = self.limits.keys(step, origin)
        keys = [self.PREFIX + key for _, key, _ in limited]
        if step == "pin" and meeting_id:
            keys.append(self.PREFIX + meeting_key(meeting_id))
        token = uuid.uuid4().hex
        args = [int(self.limits.window * 1000), token, len(limited), *(limit for _, _, limit in limited)]
        try:
            full, count = await self._reserve(keys=keys, args=args)
        except (RedisError, OSError) as exc:  # no limit, no check: the caller hears "unavailable"
            raise DirectoryUnavailable(f"shared PIN limiter unreachable: {exc}") from exc
        if int(full):
            return Attempt(step, blocked=limited[int(full) - 1][0])
        return Attempt(step, token, tuple(keys), "", self.limits.delay(int(count)))

    async def release(self, attempt: Attempt) -> None:
        if not attempt.keys:
            return
        try:
            async with self.redis.pipeline(transaction=False) as p:
                for key in attempt.keys:
                    p.zrem(key, attempt.token)
                await p.execute()
        except (RedisError, OSError) as exc:  # it counts until the window passes: stricter, never looser
            log.event(logger, "limits.release_failed", logging.WARNING, step=attempt.step, error=str(exc)[:200])
