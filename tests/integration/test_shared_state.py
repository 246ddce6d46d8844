"""The state workers share through a real redis-server (started by this test on a free loopback port):
the call registry, the room directory (PINs never in clear) and the PIN-guessing limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gateway.apps.limits import Limits, RedisLimiter
from gateway.apps.services import Origin
from gateway.cluster.registry import RedisRegistry, forget_worker, sweep_expired, workers
from gateway.rooms.directory import SharedDirectory, pin_key, publish_room, unpublish_room
from gateway.store.rooms import RoomStore


async def test_registry_finds_the_worker_holding_a_call_and_forgets_a_lost_one(redis: Any, redis_url: str) -> None:
    w1 = RedisRegistry(redis_url, "w1", "http://127.0.0.1:1", "127.0.0.1:5070")
    w2 = RedisRegistry(redis_url, "w2", "http://127.0.0.1:2", "127.0.0.1:5071")
    await w1.start()
    await w2.start()
    try:
        w2.update("call-a", state="answered", room_id="", project="acme")
        w2.update("call-b", state="joined", room_id="r1", project="acme")
        await wait_for(lambda: redis.hget("gw:call:call-b", "room_id"), "r1")
        assert await w1.owner("call-a") == "http://127.0.0.1:2"
        assert await w2.owner("call-a") is None  # its own call: handled locally
        assert set(await workers(redis)) == {"w1", "w2"}
        w2.ended("call-a")
        await wait_for(lambda: redis.exists("gw:call:call-a"), 0)
        assert await forget_worker(redis, "w2") == ["call-b"]
        assert await w1.owner("call-b") is None and set(await workers(redis)) == {"w1"}
    finally:
        await w1.close()
        await w2.close()


async def test_a_worker_whose_heartbeat_stopped_is_swept_with_its_calls(redis: Any, redis_url: str) -> None:
    alive = RedisRegistry(redis_url, "h1-w1", "http://127.0.0.1:1", "127.0.0.1:5070")
    await alive.start()
    try:
        # another host's worker that died: its membership and calls remain, its heartbeat key expired
        await redis.sadd("gw:workers", "h2-w1")
        await redis.sadd("gw:worker:h2-w1:calls", "call-x")
        await redis.hset("gw:call:call-x", mapping={"worker": "h2-w1", "state": "joined"})
        assert await sweep_expired(redis) == {"h2-w1": ["call-x"]}
        assert not await redis.exists("gw:call:call-x") and set(await workers(redis)) == {"h1-w1"}
        assert await sweep_expired(redis) == {}
    finally:
        await alive.close()


async def wait_for(read: Any, expected: Any, tries: int = 100) -> None:
    import asyncio

    for _ in range(tries):
        if await read() == expected:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never saw {expected!r}")


async def test_shared_directory_resolves_published_rooms_without_clear_pins(redis: Any, tmp_path: Path) -> None:
    store = RoomStore(tmp_path)
    room = store.create("Board", meeting_id_digits=9, pin_digits=6)
    key = pin_key("the room service's secret")
    other_host = SharedDirectory(redis, RoomStore(tmp_path / "elsewhere"), key)  # a worker that never saw the room
    sip = room["sip"]
    assert not await other_host.exists(sip["meeting_id"])
    await publish_room(redis, room, key)
    assert await other_host.exists(sip["meeting_id"])
    assert await other_host.resolve(sip["meeting_id"], sip["mpin"]) == (room["room_id"], "moderator")
    assert await other_host.resolve(sip["meeting_id"], sip["pin"]) == (room["room_id"], "participant")
    assert await other_host.resolve(sip["meeting_id"], "000000") is None
    stored = await redis.hgetall(f"gw:meeting:{sip['meeting_id']}")
    assert sip["pin"] not in stored.values() and sip["mpin"] not in stored.values()
    await unpublish_room(redis, room)
    assert not await other_host.exists(sip["meeting_id"])
    # a room only the local store knows is published on its first lookup
    assert await SharedDirectory(redis, store, key).exists(sip["meeting_id"])
    assert await other_host.exists(sip["meeting_id"])
    store.close()


async def test_pin_limits_hold_across_workers(redis: Any) -> None:
    per = {("pin", "caller"): 2, ("pin", "source"): 3, ("meeting_id", "caller"): 2, ("meeting_id", "source"): 3}
    limits = Limits(per, meeting_budget=3, backoff=1.0, backoff_max=4.0, window=60)
    worker1, worker2 = RedisLimiter(redis, limits), RedisLimiter(redis, limits)
    alice, bob, carol = Origin("10.0.0.2", "t/alice"), Origin("10.0.0.2", "t/bob"), Origin("10.0.0.3", "t/carol")
    assert not (await worker1.reserve("pin", alice, "m1")).blocked
    assert not (await worker2.reserve("pin", alice, "m1")).blocked
    assert (await worker1.reserve("pin", alice, "m1")).blocked == "caller"  # two failures, on two workers
    assert (await worker2.reserve("pin", bob, "m1")).delay == 0
    assert (await worker1.reserve("pin", bob, "m1")).blocked == "source"  # another number, the same address
    late = await worker2.reserve("pin", carol, "m1")
    assert late.delay == 1.0  # past the meeting's budget: a wait, not a lock
    await worker1.release(late)  # it was right: it no longer counts
    assert (await worker1.reserve("pin", carol, "m1")).delay == 1.0
