"""Per-source limits against floods, in the spirit of Kamailio's pike: sans-I/O, O(1) per message, bounded.

`SourceLimiter` is a token bucket per source address: `rate` messages a second, bursts of `burst`. A
message over the limit is dropped before it is parsed, and reported once per window per source (with
how many were dropped meanwhile) instead of once per packet; `LogThrottle` does the same for other
events (refused connections). Both keep at most
`max_sources` entries (the oldest go first), so a flood from many addresses costs bounded memory.
Sources are counted by `gateway.sources.source_key` (an IPv6 address by its /64: one host holds a whole /64).
"""

from __future__ import annotations


class SourceLimiter:
    """Token buckets keyed by source: `allow(key, now)` takes one token or says no.

    Drops are counted per source; once per `log_window` s a source that dropped gets an entry in
    `reports` ((key, dropped since the last report)), which the caller turns into one log line.
    """

    def __init__(self, rate: float, burst: float, max_sources: int = 10_000, log_window: float = 10.0) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.max_sources = max_sources
        self.log_window = log_window
        # key -> [tokens, last refill, dropped since the last report, next report due]
        self._buckets: dict[str, list[float]] = {}
        self.dropped = 0  # over the limit, since start (metrics)
        self.reports: list[tuple[str, int]] = []

    def allow(self, key: str, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                del self._buckets[next(iter(self._buckets))]  # the oldest source: it starts over, full
            self._buckets[key] = [self.burst - 1.0, now, 0.0, now]
            return True
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        bucket[1] = now
        if tokens >= 1.0:
            bucket[0] = (tokens if tokens < self.burst else self.burst) - 1.0
            return True
        bucket[0] = tokens
        bucket[2] += 1
        self.dropped += 1
        if now >= bucket[3]:
            self.reports.append((key, int(bucket[2])))
            bucket[2], bucket[3] = 0.0, now + self.log_window
        return False

    def __len__(self) -> int:
        return len(self._buckets)


class LogThrottle:
    """One log line per source per `window` s: `due(key, now)` is how many events were swallowed since
    the last line plus this one when a line is due, else 0."""

    def __init__(self, window: float = 10.0, max_sources: int = 10_000) -> None:
        self.window = window
        self.max_sources = max_sources
        self._state: dict[str, list[float]] = {}  # key -> [next line due, events since the last line]

    def due(self, key: str, now: float) -> int:
        state = self._state.get(key)
        if state is None:
            if len(self._state) >= self.max_sources:
                del self._state[next(iter(self._state))]
            self._state[key] = [now + self.window, 0.0]
            return 1
        state[1] += 1
        if now < state[0]:
            return 0
        count = int(state[1])
        state[0], state[1] = now + self.window, 0.0
        return count
