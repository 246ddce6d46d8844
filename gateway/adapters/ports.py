"""RTP port allocation from a configured range: even ports, each handed out once, returned on release."""

from __future__ import annotations

from collections import deque


class PortsExhausted(RuntimeError):
    pass


class PortAllocator:
    """Single-threaded (the event loop): allocation is one deque pop, so two calls never get one port.

    A port that another process holds is found when binding; the caller then `skip`s it (it goes to
    the back of the queue) and asks again.
    """

    def __init__(self, low: int, high: int) -> None:
        start = low + (low % 2)
        self._free: deque[int] = deque(range(start, high, 2))
        self._used: set[int] = set()
        self.size = len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise PortsExhausted("no free RTP port")
        port = self._free.popleft()
        self._used.add(port)
        return port

    def release(self, port: int) -> None:
        if port in self._used:
            self._used.remove(port)
            self._free.append(port)

    @property
    def in_use(self) -> int:
        return len(self._used)
