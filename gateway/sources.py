"""Whom a limit counts against, and failures per source over a window: shared by the SIP flood limits, the Voice
API and the room service (standard library only, so the sans-I/O cores may use it).

    source_key      an IPv4 address itself; an IPv6 address's /64 (one host usually owns a whole /64, so counting
                    single IPv6 addresses would let it rotate through 2**64 of them); an IPv4-mapped IPv6 address
                    as its IPv4 address.
    FailureWindow   failures per key over a fixed window that starts with the key's first failure; a key at the
                    limit is refused until its window ends. At most `max_sources` keys are kept, the least recently
                    failing forgotten first, so many addresses cannot grow memory.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache


@lru_cache(maxsize=4096)
def source_key(address: str | None) -> str:
    if not address:
        return "?"
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return address[:64]  # not an IP (a unix socket): one bucket per name, bounded in length
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))
    return str(ip)


@dataclass
class _Failures:
    start: float  # the window began with the first failure
    count: int
    last: float  # the latest failure (the order of the table)


class FailureWindow:
    """`limit` failures per key in `window` seconds (0: no limit)."""

    def __init__(self, limit: int, window: float, max_sources: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit, self.window, self.max_sources, self.clock = limit, window, max_sources, clock
        self._sources: OrderedDict[str, _Failures] = OrderedDict()  # least recently failing first
        # keys at their limit, kept apart (key -> when their window ends): failures on many other keys, which
        # push the oldest counting keys out, must not free a blocked one before its window ends
        self._blocked: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sources.keys() | self._blocked.keys())

    def count(self, key: str) -> int:
        entry = self._sources.get(key)
        return 0 if entry is None or self.clock() - entry.start >= self.window else entry.count

    def blocked(self, key: str) -> int | None:
        """Whole seconds until `key` may try again, or None while it may."""
        if self.limit <= 0:
            return None
        until = self._blocked.get(key)
        if until is None:
            return None
        now = self.clock()
        if now >= until:
            del self._blocked[key]
            entry = self._sources.get(key)
            if entry is not None and now - entry.start >= self.window:
                del self._sources[key]
            return None
        return max(1, math.ceil(until - now))

    def failed(self, key: str) -> bool:
        """Count a failure; True exactly when this one reaches the limit (log it then: once per window)."""
        if self.limit <= 0:
            return False
        now = self.clock()
        entry = self._sources.get(key)
        if entry is None or now - entry.start >= self.window:
            entry = _Failures(now, 0, now)
            self._sources[key] = entry
        entry.count += 1
        entry.last = now
        self._sources.move_to_end(key)
        if entry.count >= self.limit:
            self._blocked[key] = entry.start + self.window
            self._blocked.move_to_end(key)
        self._expire(now)
        return entry.count == self.limit

    def _expire(self, now: float) -> None:
        sources = self._sources
        while sources:  # the front failed longest ago: expired ones first, then the oldest beyond the cap
            key, oldest = next(iter(sources.items()))
            if now - oldest.last < self.window and len(sources) <= self.max_sources:
                break
            del sources[key]
        blocked = self._blocked  # ordered by when they reached the limit: the front ends first (same window)
        while blocked:
            key, until = next(iter(blocked.items()))
            if now < until and len(blocked) <= self.max_sources:
                break
            del blocked[key]
