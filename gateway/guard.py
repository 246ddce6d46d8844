"""Limits on PIN guessing: failed attempts counted per caller number and per meeting over a window."""

from __future__ import annotations

from collections import defaultdict, deque


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
