"""The shared call registry: which worker holds which call (voice_id -> worker, room, state), in Redis.

Keys (all under `gw:`):
    gw:call:{voice_id}          hash  worker, state, room_id, project          (deleted when the call ends)
    gw:worker:{name}            hash  api_url, sip, pid, state (up | draining), calls; expires unless refreshed
    gw:worker:{name}:calls      set   the voice_ids the worker holds (what a supervisor closes if it dies)
    gw:workers                  set   worker names

Writes come from the event loop through one queue and one writer task, so the loop never waits on Redis and
a call's updates stay in order. A single worker uses `LocalRegistry` (no Redis).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .. import log

logger = logging.getLogger("gateway.registry")
HEARTBEAT_S = 2.0
WORKER_TTL_S = 10


class CallRegistry(Protocol):
    async def start(self) -> None: ...

    def update(self, voice_id: str, **fields: str) -> None: ...

    def ended(self, voice_id: str) -> None: ...

    def set_state(self, state: str, calls: int) -> None: ...

    async def owner(self, voice_id: str) -> str | None:
        """The API URL of the worker holding `voice_id`, when it is another worker."""
        ...

    async def workers(self) -> dict[str, dict[str, str]]: ...

    async def close(self) -> None: ...


class LocalRegistry:
    """One worker: every call is local."""

    def __init__(self, worker: str) -> None:
        self.worker = worker

    async def start(self) -> None:
        return None

    def update(self, voice_id: str, **fields: str) -> None:
        return None

    def ended(self, voice_id: str) -> None:
        return None

    def set_state(self, state: str, calls: int) -> None:
        return None

    async def owner(self, voice_id: str) -> str | None:
        return None

    async def workers(self) -> dict[str, dict[str, str]]:
        return {self.worker: {"state": "up"}}

    async def close(self) -> None:
        return None


class RedisRegistry:
    def __init__(self, url: str, worker: str, api_url: str, sip: str) -> None:
        self.redis: Any = aioredis.from_url(url, decode_responses=True, socket_timeout=2, socket_connect_timeout=2)
        self.worker = worker
        self.info = {"api_url": api_url, "sip": sip, "pid": str(os.getpid()), "state": "up", "calls": "0"}
        self.queue: asyncio.Queue[tuple[str, str, dict[str, str]]] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []
        self.errors = 0

    async def start(self) -> None:
        await self._heartbeat_once()  # fails loudly at start if Redis is not there
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._writer()), loop.create_task(self._heartbeat())]
        log.event(logger, "registry.connected", worker=self.worker)

    async def _heartbeat_once(self) -> None:
        key = f"gw:worker:{self.worker}"
        async with self.redis.pipeline(transaction=False) as p:
            p.hset(key, mapping=self.info)
            p.expire(key, WORKER_TTL_S)
            p.sadd("gw:workers", self.worker)
            await p.execute()

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await self._heartbeat_once()
            except (RedisError, OSError) as exc:
                self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        log.event(logger, "registry.error", logging.WARNING, worker=self.worker, error=str(exc)[:200])

    async def _writer(self) -> None:
        while True:
            kind, voice_id, fields = await self.queue.get()
            batch = [(kind, voice_id, fields)]
            while not self.queue.empty() and len(batch) < 200:
                batch.append(self.queue.get_nowait())
            try:
                async with self.redis.pipeline(transaction=False) as p:
                    for kind, voice_id, fields in batch:
                        key = f"gw:call:{voice_id}"
                        if kind == "update":
                            p.hset(key, mapping={"worker": self.worker, **fields})
                            p.sadd(f"gw:worker:{self.worker}:calls", voice_id)
                        else:
                            p.delete(key)
                            p.srem(f"gw:worker:{self.worker}:calls", voice_id)
                    await p.execute()
            except (RedisError, OSError) as exc:
                self._failed(exc)

    def update(self, voice_id: str, **fields: str) -> None:
        self.queue.put_nowait(("update", voice_id, fields))

    def ended(self, voice_id: str) -> None:
        self.queue.put_nowait(("ended", voice_id, {}))

    def set_state(self, state: str, calls: int) -> None:
        self.info["state"], self.info["calls"] = state, str(calls)

    async def owner(self, voice_id: str) -> str | None:
        try:
            worker = await self.redis.hget(f"gw:call:{voice_id}", "worker")
            if worker is None or worker == self.worker:
                return None
            url = await self.redis.hget(f"gw:worker:{worker}", "api_url")
            return str(url) if url else None
        except (RedisError, OSError) as exc:
            self._failed(exc)
            return None

    async def workers(self) -> dict[str, dict[str, str]]:
        return await workers(self.redis)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        try:
            while not self.queue.empty():  # what is still queued (the calls ended at shutdown)
                kind, voice_id, fields = self.queue.get_nowait()
                if kind == "ended":
                    await self.redis.delete(f"gw:call:{voice_id}")
                    await self.redis.srem(f"gw:worker:{self.worker}:calls", voice_id)
            await self.redis.delete(f"gw:worker:{self.worker}")
            await self.redis.srem("gw:workers", self.worker)
        except (RedisError, OSError) as exc:
            self._failed(exc)
        await self.redis.aclose()


async def workers(redis: Any) -> dict[str, dict[str, str]]:
    """Live workers (their heartbeat key still exists) and what they say of themselves."""
    out = {}
    for name in sorted(await redis.smembers("gw:workers")):
        info = await redis.hgetall(f"gw:worker:{name}")
        if info:
            out[name] = info
    return out


async def forget_worker(redis: Any, worker: str) -> list[str]:
    """A worker is gone: drop its calls from the registry; returns their voice_ids."""
    calls = sorted(await redis.smembers(f"gw:worker:{worker}:calls"))
    async with redis.pipeline(transaction=False) as p:
        for voice_id in calls:
            p.delete(f"gw:call:{voice_id}")
        p.delete(f"gw:worker:{worker}:calls", f"gw:worker:{worker}")
        p.srem("gw:workers", worker)
        await p.execute()
    return calls


async def sweep_expired(redis: Any) -> dict[str, list[str]]:
    """Workers whose heartbeat stopped (another host's worker died, or hangs): forget them and their calls.
    Returns {worker: [voice_id, ...]}."""
    gone = {}
    for name in sorted(await redis.smembers("gw:workers")):
        if not await redis.exists(f"gw:worker:{name}"):
            gone[name] = await forget_worker(redis, name)
    return gone
