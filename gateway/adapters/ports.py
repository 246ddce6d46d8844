"""RTP port allocation from a configured range: even ports, each handed out once, returned on release."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


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
