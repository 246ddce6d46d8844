"""The shared call registry: which worker holds which call (voice_id -> worker, room, state), in Redis.

Keys (all under `gw:`):
    gw:call:{voice_id}          hash  worker, state, room_id, project          (deleted when the call ends)
    gw:worker:{name}            hash  api_url, sip, pid, state (up | draining), calls; expires unless refreshed
    gw:worker:{name}:calls      set   the voice_ids the worker holds (what a supervisor closes if it dies)
    gw:workers                  set   worker names

Writes come from the event loop through one queue and one writer task, so the loop never waits on Redis and
a call's updates stay in order. A single worker uses `LocalRegistry` (no Redis).

Redis going away never touches a call: the registry keeps its own copy of what it published (the calls this
worker holds), drops the writes it cannot send (one warning, `registry.unavailable`; counted), answers
`owner()` with "here" at once instead of waiting on a dead socket, and probes Redis with its heartbeat every
2 s. When Redis answers again (or answers without our keys: it was restarted, or flushed) it publishes the
whole copy again and removes what it published of calls that ended meanwhile (`registry.recovered`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
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

    def status(self) -> dict[str, Any]: ...

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

    def status(self) -> dict[str, Any]:
        return {"connected": True, "calls": 0, "errors": 0, "dropped": 0, "recoveries": 0}

    async def owner(self, voice_id: str) -> str | None:
        return None

    async def workers(self) -> dict[str, dict[str, str]]:
        return {self.worker: {"state": "up"}}

    async def close(self) -> None:
        return None


def client(url: str) -> Any:
    """A Redis client for a worker (the registry's, shared with the directory and the PIN limiter): short timeouts,
    and one immediate retry on a connection error, so a pooled connection that a Redis restart broke is replaced
    transparently instead of failing the first command that picks it (a dead Redis still fails at once)."""
    return aioredis.from_url(url, decode_responses=True, socket_timeout=2, socket_connect_timeout=2,
                             retry=Retry(NoBackoff(), 1), retry_on_error=[RedisConnectionError])


class RedisRegistry:
    def __init__(self, url: str, worker: str, api_url: str, sip: str) -> None:
        self.redis: Any = client(url)
        self.worker = worker
        self.info = {"api_url": api_url, "sip": sip, "pid": str(os.getpid()), "state": "up", "calls": "0"}
        self.queue: asyncio.Queue[tuple[str, str, dict[str, str]]] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []
        self.live: dict[str, dict[str, str]] = {}  # what we published of the calls we hold (republished on recovery)
        self.connected = False
        self.errors = 0  # failed Redis operations
        self.dropped = 0  # writes not sent while Redis was away (the republish covers them)
        self.recoveries = 0
        self._changes = 0  # calls updated or ended (a resync repeats a pass that saw one)

    async def start(self) -> None:
        await self._heartbeat_once()  # fails loudly at start if Redis is not there
        self.connected = True
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._writer()), loop.create_task(self._heartbeat())]
        log.event(logger, "registry.connected", worker=self.worker)

    async def _heartbeat_once(self) -> bool:
        """Refresh our worker key; True when Redis had it (False: it expired, or Redis lost it: restarted)."""
        key = f"gw:worker:{self.worker}"
        async with self.redis.pipeline(transaction=False) as p:
            p.exists(key)
            p.hset(key, mapping=self.info)
            p.expire(key, WORKER_TTL_S)
            p.sadd("gw:workers", self.worker)
            had = (await p.execute())[0]
        return bool(had)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                had = await self._heartbeat_once()
                if not self.connected or not had:
                    await self._resync("reconnected" if not self.connected else "keys_lost")
            except (RedisError, OSError) as exc:
                self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        self.errors += 1
        if self.connected:
            self.connected = False
            log.event(logger, "registry.unavailable", logging.WARNING, worker=self.worker, error=str(exc)[:200],
                      calls=len(self.live))
        while not self.queue.empty():  # republished from `live` on recovery
            self.queue.get_nowait()
            self.dropped += 1

    async def _resync(self, why: str) -> None:
        """Publish every call we hold again; remove the entries of calls that ended while Redis was away. Writes
        stay off meanwhile (the copy is what counts), and a pass is repeated if a call changed during it."""
        self.connected = False
        while not self.queue.empty():
            self.queue.get_nowait()
        members = f"gw:worker:{self.worker}:calls"
        for _ in range(3):
            mark = self._changes
            live = {voice_id: dict(fields) for voice_id, fields in self.live.items()}
            stale = set(await self.redis.smembers(members)) - set(live)
            async with self.redis.pipeline(transaction=False) as p:
                for voice_id, fields in live.items():
                    p.hset(f"gw:call:{voice_id}", mapping={"worker": self.worker, **fields})
                if live:
                    p.sadd(members, *live)
                for voice_id in stale:
                    p.delete(f"gw:call:{voice_id}")
                if stale:
                    p.srem(members, *stale)
                await p.execute()
            if self._changes == mark:
                break
        self.connected = True
        self.recoveries += 1
        log.event(logger, "registry.recovered", logging.WARNING, worker=self.worker, why=why, calls=len(live),
                  removed=len(stale), dropped_writes=self.dropped)

    async def _writer(self) -> None:
        while True:
            kind, voice_id, fields = await self.queue.get()
            batch = [(kind, voice_id, fields)]
            while not self.queue.empty() and len(batch) < 200:
                batch.append(self.queue.get_nowait())
            if not self.connected:
                self.dropped += len(batch)
                continue
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
                self.dropped += len(batch)
                self._failed(exc)

    def update(self, voice_id: str, **fields: str) -> None:
        self.live.setdefault(voice_id, {}).update(fields)
        self._changes += 1
        if self.connected:
            self.queue.put_nowait(("update", voice_id, fields))
        else:
            self.dropped += 1

    def ended(self, voice_id: str) -> None:
        self.live.pop(voice_id, None)
        self._changes += 1
        if self.connected:
            self.queue.put_nowait(("ended", voice_id, {}))
        else:
            self.dropped += 1

    def set_state(self, state: str, calls: int) -> None:
        self.info["state"], self.info["calls"] = state, str(calls)

    def status(self) -> dict[str, Any]:
        return {"connected": self.connected, "calls": len(self.live), "errors": self.errors, "dropped": self.dropped,
                "recoveries": self.recoveries}

    async def owner(self, voice_id: str) -> str | None:
        if not self.connected:  # no waiting on a dead socket: the call is looked for here
            return None
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
            if self.connected:
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
