"""Webhook delivery when one receiver is slow or down: it delays its own events only. Two aiohttp receivers on
loopback: one that takes 30 s per request (every attempt ends at timeout_s) or refuses connections, one that
answers at once; the fast one gets its events while the slow one's calls are still retrying."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway.api.webhooks import Notifier
from gateway.config import WebhookConfig
from gateway.store.cdr import CdrStore


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _serve(port: int, delay: float, got: list[tuple[float, dict[str, str]]]) -> web.AppRunner:
    async def hook(request: web.Request) -> web.Response:
        got.append((time.monotonic(), json.loads(await request.read())))
        await asyncio.sleep(delay)
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


@pytest.mark.parametrize("trouble", ["slow", "down"])
async def test_a_slow_or_dead_receiver_does_not_hold_up_the_others(tmp_path: Path, trouble: str) -> None:
    cfg = WebhookConfig(timeout_s=1, max_backoff_s=2, max_age_s=600, concurrency=4, allow_networks=["127.0.0.0/8"])
    slow_port, fast_port = _port(), _port()
    slow_got: list[tuple[float, dict[str, str]]] = []
    fast_got: list[tuple[float, dict[str, str]]] = []
    runners = [await _serve(fast_port, 0.0, fast_got)]
    if trouble == "slow":
        runners.append(await _serve(slow_port, 30.0, slow_got))
    cdr = CdrStore(tmp_path, worker="w1")
    notifier = Notifier(cdr, cfg, lambda project: "key")
    in_flight, most = [0], [0]  # POSTs to the bad receiver at once, as the sender sees them
    post = notifier._post

    async def counted(item: Any, key: str) -> tuple[str | None, bool]:
        bad = f":{slow_port}/" in item.url
        in_flight[0] += bad
        most[0] = max(most[0], in_flight[0])
        try:
            return await post(item, key)
        finally:
            in_flight[0] -= bad

    notifier._post = counted  # type: ignore[method-assign]
    try:
        for i in range(12):  # more calls to the bad receiver than there are slots in all
            notifier.emit(f"http://127.0.0.1:{slow_port}/hook", "a", f"slow-{i}", {"state": "incoming", "voice_id": f"slow-{i}"})
        await asyncio.sleep(1.5)  # every slot the bad receiver may take is taken, and its first attempts failed
        started = time.monotonic()
        for i in range(6):
            for state in ("incoming", "answered", "disconnected"):
                notifier.emit(f"http://127.0.0.1:{fast_port}/hook", "b", f"fast-{i}", {"state": state, "voice_id": f"fast-{i}"})
        deadline = time.monotonic() + 5
        while len(fast_got) < 18 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        took = time.monotonic() - started
        assert len(fast_got) == 18, f"the healthy receiver got {len(fast_got)}/18 in {took:.1f} s"
        assert took < 3, took
        for i in range(6):
            states = [body["state"] for _, body in fast_got if body["voice_id"] == f"fast-{i}"]
            assert states == ["incoming", "answered", "disconnected"]
        assert len(notifier.tasks) == 12 and notifier.failures >= cfg.concurrency // 2
        assert most[0] == cfg.concurrency // 2  # the bad receiver had its half of the slots, never more
        assert trouble == "down" or slow_got
    finally:
        await notifier.close(grace=0.1)
        cdr.close()
        for runner in runners:
            await runner.cleanup()
