"""The call registry when Redis goes away: writes never raise into the calls, `owner()` answers at once, and when
Redis is back the registry is whole again: restarted empty (every live call published again) or frozen and
thawed (the entries of calls that ended meanwhile removed). A real redis-server, killed and stopped by PID."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.cluster.registry import HEARTBEAT_S, RedisRegistry, client
from tests.conftest import free_port, stop_process, wait_until


class RedisServer:
    def __init__(self, tmp: Path) -> None:
        self.port, self.tmp = free_port(), tmp
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                      "--appendonly", "no", "--dir", str(self.tmp)], stdout=subprocess.DEVNULL)
        wait_until(lambda: subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True,
                                          text=True).stdout.strip() == "PONG", 10, "redis-server")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGCONT)
            stop_process(self.proc)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path)
    s.start()
    yield s
    s.stop()


async def until(check: Callable[[], Awaitable[Any]], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = await check()
        except Exception:  # noqa: BLE001 - Redis still away
            value = None
        if value:
            return value
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def test_redis_restarted_empty_gets_every_live_call_back(server: RedisServer) -> None:
    w1 = RedisRegistry(server.url, "w1", "http://127.0.0.1:1", "127.0.0.1:5070")
    w2 = RedisRegistry(server.url, "w2", "http://127.0.0.1:2", "127.0.0.1:5071")
    probe = client(server.url)
    await w1.start()
    await w2.start()
    try:
        for i in range(5):
            w2.update(f"call-{i}", state="answered", room_id="", project="acme")
        await until(lambda: probe.exists("gw:call:call-4"), 5, "the calls published")
        server.kill()
        started = time.monotonic()
        w2.update("call-0", state="joined", room_id="r1", project="acme")  # while Redis is away: never raises
        w2.ended("call-1")
        w2.update("call-5", state="answered", room_id="", project="acme")
        assert await w1.owner("call-0") is None or not w1.connected
        await until(lambda: asyncio.sleep(0, result=not w2.connected), HEARTBEAT_S * 3, "w2 to notice")
        answered = time.monotonic()
        assert await w1.owner("call-2") is None  # at once, not after a socket timeout
        assert time.monotonic() - answered < 0.5 and w2.dropped >= 1
        server.start()  # empty: no persistence
        await until(lambda: asyncio.sleep(0, result=w1.connected and w2.connected), HEARTBEAT_S * 4, "recovery")
        print(f"\nRedis killed -> registries whole again in {time.monotonic() - started:.1f} s")
        assert set(await probe.smembers("gw:worker:w2:calls")) == {"call-0", "call-2", "call-3", "call-4", "call-5"}
        assert await probe.hgetall("gw:call:call-0") == {"worker": "w2", "state": "joined", "room_id": "r1",
                                                         "project": "acme"}
        assert not await probe.exists("gw:call:call-1")
        assert await w1.owner("call-5") == "http://127.0.0.1:2"
        assert set(await probe.smembers("gw:workers")) == {"w1", "w2"} and w2.recoveries == 1
    finally:
        await w1.close()
        await w2.close()
        await probe.aclose()


async def test_redis_frozen_then_thawed_loses_the_calls_that_ended_meanwhile(server: RedisServer) -> None:
    w1 = RedisRegistry(server.url, "w1", "http://127.0.0.1:1", "127.0.0.1:5070")
    probe = client(server.url)
    await w1.start()
    try:
        w1.update("a", state="answered", room_id="", project="acme")
        w1.update("b", state="answered", room_id="", project="acme")
        await until(lambda: probe.exists("gw:call:b"), 5, "the calls published")
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)  # alive, silent: every request times out
        try:
            await until(lambda: asyncio.sleep(0, result=not w1.connected), HEARTBEAT_S * 4, "w1 to notice")
            w1.ended("a")
            w1.update("b", state="joined", room_id="r9", project="acme")
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        await until(lambda: asyncio.sleep(0, result=w1.connected), HEARTBEAT_S * 5, "recovery")
        assert not await probe.exists("gw:call:a") and await probe.smembers("gw:worker:w1:calls") == {"b"}
        assert (await probe.hgetall("gw:call:b"))["room_id"] == "r9"
    finally:
        await w1.close()
        await probe.aclose()
