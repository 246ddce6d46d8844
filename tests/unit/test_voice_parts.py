"""Voice API parts: projects, dial-out Request-URIs, orders, and the webhook outbox across a restart."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from aiohttp import web

from gateway.api.webhooks import SIGNATURE_HEADER, TIMESTAMP_HEADER, Notifier, sign, verify
from gateway.calls.control import Order, Steering
from gateway.calls.outbound import DialError, request_uri
from gateway.config import WebhookConfig
from gateway.sip.message import SipUri
from gateway.store.cdr import CdrStore
from gateway.store.projects import Number, ProjectStore, normalize_number


def test_projects_credentials_numbers_and_names(tmp_path: Path) -> None:
    store = ProjectStore(tmp_path)
    p = store.create("acme", [Number("+15550109999"), Number("15550108888", inbound=False)],
                     notification_url="http://127.0.0.1:1/h")
    assert store.authenticate(p.app_id, p.app_key) is not None
    assert store.authenticate(p.app_id, p.app_key + "x") is None and store.authenticate("nope", p.app_key) is None
    assert p.can_call_from("15550109999") and p.can_call_from("+15550108888") and not p.can_call_from("15550100000")
    assert store.by_number("15550109999").name == "acme"  # type: ignore[union-attr]
    assert store.by_number("15550108888") is None  # out only
    with pytest.raises(ValueError, match="name"):
        store.create("acme")
    assert "app_key" not in p.public() and p.public(with_key=True)["app_key"] == p.app_key
    for bad in ("12", "+1555abc0000", "1" * 16, ""):
        with pytest.raises(ValueError):
            normalize_number(bad)


def test_dial_out_request_uri() -> None:
    proxy = SipUri.parse("sip:10.0.0.1:5070")
    assert request_uri("+15551230000", proxy) == "sip:+15551230000@10.0.0.1:5070"
    assert request_uri("sip:alice@example.com", proxy) == "sip:alice@example.com"
    with pytest.raises(DialError):
        request_uri("sip:", proxy)


async def test_orders_supersede_and_abandon() -> None:
    steer = Steering()
    first, second = Order("join", "r1"), Order("join", "r2")
    steer.give(first)
    steer.give(second)
    assert first.done.result() == "superseded by a newer request"
    assert steer.changed.is_set() and steer.take() is second and not steer.changed.is_set()
    steer.give(third := Order("leave", "r2"))
    steer.abandon("remote_bye")
    assert third.done.result() == "remote_bye"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_webhook_outbox_resumes_after_a_restart_in_order_and_signed(tmp_path: Path) -> None:
    port = _port()
    url = f"http://127.0.0.1:{port}/hook"
    cfg = WebhookConfig(timeout_s=1, max_backoff_s=1, max_age_s=600, allow_networks=["127.0.0.0/8"])
    # first life: the receiver is down; three events of one call are stored, none delivered
    cdr = CdrStore(tmp_path, worker="w1")
    notifier = Notifier(cdr, cfg, lambda project: "key-1")
    for state in ("initiated", "ringing", "answered"):
        notifier.emit(url, "acme", "call-1", {"state": state, "voice_id": "call-1"})
    await notifier.close(grace=0.5)
    cdr.close()
    # second life: the receiver is up; the outbox is resumed
    got: list[tuple[bytes, str, str]] = []
    done = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        got.append((await request.read(), request.headers[TIMESTAMP_HEADER], request.headers[SIGNATURE_HEADER]))
        if len(got) == 3:
            done.set()
        return web.Response()

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    cdr = CdrStore(tmp_path, worker="w1")
    notifier = Notifier(cdr, cfg, lambda project: "key-1")
    notifier.start()
    try:
        await asyncio.wait_for(done.wait(), 10)
    finally:
        await notifier.close()
        await runner.cleanup()
    assert [json.loads(body)["state"] for body, _, _ in got] == ["initiated", "ringing", "answered"]
    assert all(verify("key-1", body, ts, sig) and sig == sign("key-1", int(ts), body) for body, ts, sig in got)
    assert cdr.outbox_pending() == []
    cdr.close()
