"""RTP port allocation from a configured range: even ports chosen at random, each handed out once, returned on release.

Random, not in order, so a stranger cannot predict the next call's port from the last one (RTP bleed: a
sequential allocator points an attacker at every new call). The choice comes from the OS's random source.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable

_random = random.SystemRandom()


class PortsExhausted(RuntimeError):
    pass


class PortAllocator:
    """Single-threaded (the event loop), so two calls never get one port. Allocation is O(1): a random index
    into the free list, swapped with the last entry and popped; a release appends.

    A port that another process holds is found when binding; the caller then `release`s it and asks again
    (another random pick). `dropped` tallies the RTP packets this range's sockets dropped, by reason
    (`gateway_rtp_dropped_total`).
    """

    def __init__(self, low: int, high: int) -> None:
        start = low + (low % 2)
        self._free: list[int] = list(range(start, high, 2))
        self._used: set[int] = set()
        self.size = len(self._free)
        self.dropped: Counter[str] = Counter()

    def allocate(self) -> int:
        free = self._free
        if not free:
            raise PortsExhausted("no free RTP port")
        i = _random.randrange(len(free))
        free[i], free[-1] = free[-1], free[i]
        port = free.pop()
        self._used.add(port)
        return port

    def release(self, port: int) -> None:
        if port in self._used:
            self._used.remove(port)
            self._free.append(port)

    @property
    def in_use(self) -> int:
        return len(self._used)


async def bind_datagram(ports: PortAllocator, host: str,
                        factory: Callable[[], asyncio.DatagramProtocol]) -> tuple[asyncio.DatagramTransport, int]:
    """A UDP socket on a port from the allocator; ports another process holds are skipped."""
    loop = asyncio.get_running_loop()
    for _ in range(min(ports.size, 50)):
        port = ports.allocate()
        try:
            transport, _ = await loop.create_datagram_endpoint(factory, local_addr=(host, port))
        except OSError:
            ports.release(port)
            continue
        return transport, port
    raise OSError("could not bind an RTP port")
