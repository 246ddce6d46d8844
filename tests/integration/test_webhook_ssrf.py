"""Issue 11, finding 6 (webhook SSRF): webhook targets at internal addresses are refused when the URL is given
(API 400, CLI error) and when a delivery connects (literal IP, a name resolving to loopback, DNS rebinding);
webhooks are signed with the project's webhook secret and a timestamp, so a receiver refuses replays; an
event_url's credentials stay out of the CDR and the logs.

The stranger's target is a listener on 127.0.0.1 (an "internal admin port"); the application's receiver listens
on 127.0.0.2, the only loopback address the gateway's `webhooks.allow_networks` names.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDict

from gateway.api.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, Notifier, verify
from gateway.config import WebhookConfig
from gateway.store.cdr import CdrStore
from tests.conftest import (
    ROOT,
    Gateway,
    free_port,
    make_test_config,
    start_gateway,
    stop_gateway,
    wait_until,
)
from tests.integration.voice_tools import HookServer, VoiceClient, cli

RECEIVER_HOST = "127.0.0.2"  # the application's receiver (allow-listed)
ALLOW_RECEIVER = {"GATEWAY_WEBHOOKS_ALLOW_NETWORKS": f'["{RECEIVER_HOST}/32"]'}
# when these projects were made the operator allowed loopback; the running gateway no longer does
ALLOW_ALL_LOOPBACK = {"GATEWAY_WEBHOOKS_ALLOW_NETWORKS": '["127.0.0.0/8", "::1/128"]'}
NUMBERS = {"app": "15550108881", "inside": "15550108882", "named": "15550108883"}
TO = "15551230077"


@dataclass
class Setup:
    gw: Gateway
    internal: HookServer  # 127.0.0.1: what a stranger aims webhooks at
    receiver: HookServer  # 127.0.0.2: the application's receiver
    projects: dict[str, dict[str, Any]]
    rooms: dict[str, str]  # project -> room_id

    def dial(self, project: str, event_url: str | None = None) -> tuple[int, dict[str, Any]]:
        creds = self.projects[project]
        body: dict[str, Any] = {"from": NUMBERS[project], "to": TO}
        if event_url is not None:
            body["event_url"] = event_url
        status, answer, _ = VoiceClient(self.gw, creds["app_id"], creds["app_key"])(
            "POST", f"/voice/v1/room/{self.rooms[project]}/join", body)
        return status, answer

    def log_events(self, name: str, voice_id: str) -> list[dict[str, Any]]:
        out = []
        for line in self.gw.log().splitlines():
            if f'"{name}"' in line and voice_id in line:
                out.append(json.loads(line))
        return out

    def outbox(self, voice_id: str) -> list[dict[str, Any]]:
        db = sqlite3.connect(f"file:{self.gw.data_dir / 'cdr.sqlite'}?mode=ro", uri=True, timeout=10)
        try:
            rows = db.execute("SELECT status, attempts, last_error, url FROM outbox WHERE voice_id=? ORDER BY seq",
                              (voice_id,)).fetchall()
        finally:
            db.close()
        return [dict(zip(("status", "attempts", "last_error", "url"), r, strict=True)) for r in rows]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("ssrf")
    data = tmp / "data"
    internal, receiver = HookServer(free_port()), HookServer(free_port(), host=RECEIVER_HOST)
    internal.start()
    receiver.start()
    urls = {"app": receiver.url, "inside": internal.url, "named": f"http://localhost:{internal.port}/hooks"}
    projects = {name: cli(data, "projects", "create", "--name", name, "--number", NUMBERS[name],
                          "--notification-url", url, env=ALLOW_ALL_LOOPBACK) for name, url in urls.items()}
    rooms = {name: cli(data, "rooms", "create", "--name", f"Room {name}", "--project", name)["room_id"]
             for name in urls}
    trunk = f"""
[[trunks]]
name = "carrier"
sources = []
[trunks.outbound]
proxy = "sip:127.0.0.1:{free_port()}"
"""
    gw = start_gateway(tmp, make_test_config(trunk), env={**ALLOW_RECEIVER, "GATEWAY_WEBHOOKS_MAX_BACKOFF_S": "1",
                                                          "GATEWAY_API_RING_TIMEOUT_S": "5"})
    try:
        yield Setup(gw, internal, receiver, projects, rooms)
    finally:
        stop_gateway(gw)
        internal.stop()
        receiver.stop()


def test_event_urls_at_internal_addresses_are_refused_by_the_api(setup: Setup) -> None:
    port = setup.internal.port
    before = len(setup.gw.calls())
    cases = [
        (setup.internal.url, "127.0.0.1 is loopback"),
        (f"http://localhost:{port}/hooks", "localhost (127.0.0.1) is loopback"),  # after DNS
        (f"http://2130706433:{port}/hooks", "(127.0.0.1) is loopback"),  # a legacy numeric form, resolved
        (f"http://[::ffff:127.0.0.1]:{port}/hooks", "is loopback"),  # IPv4-mapped IPv6
        ("http://169.254.169.254/latest/meta-data/", "is cloud metadata"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "is cloud metadata"),
        ("http://10.0.0.7/hooks", "is private"),
        ("http://[fd12:3456::1]/hooks", "is private"),
        ("http://100.64.0.1/hooks", "is carrier-grade NAT"),
        ("http://[fe80::1]/hooks", "is link-local"),
        ("http://224.0.0.1/hooks", "is multicast"),
        ("http://0.0.0.0:8080/hooks", "is unspecified"),
        (f"gopher://{RECEIVER_HOST}:{port}/", "http:// or https://"),
    ]
    for url, why in cases:
        status, body = setup.dial("app", url)
        assert status == 400, (url, body)
        assert body["error"]["field"] == "event_url" and why in body["error"]["message"], (url, body)
    assert setup.internal.received == []
    assert len(setup.gw.calls()) == before  # nothing was dialled


def test_the_cli_refuses_a_notification_url_at_an_internal_address(setup: Setup, tmp_path: Path) -> None:
    for url in (setup.internal.url, f"http://localhost:{setup.internal.port}/hooks", "http://169.254.169.254/"):
        out = subprocess.run([sys.executable, "-m", "gateway", "projects", "create", "--name", "evil", "--number",
                              "15550108889", "--notification-url", url, "--data-dir", str(tmp_path / "data")],
                             capture_output=True, text=True, timeout=30, cwd=ROOT,
                             env={**os.environ, "GATEWAY_WEBHOOKS_ALLOW_NETWORKS": "[]"})
        assert out.returncode != 0 and "--notification-url" in out.stderr and " is " in out.stderr, out


def refused_at_delivery(setup: Setup, project: str, reason: str) -> None:
    """The project's notification_url was fine when it was set; the gateway's allow-list no longer covers
    it: every event is refused when the delivery connects, not retried, one warning each; nothing arrives."""
    status, body = setup.dial(project)
    assert status == 200, body
    vid = body["voice_id"]
    wait_until(lambda: setup.log_events("webhook.refused", vid), 20, "the initiated event refused")
    # The CDR writer commits in batches on its own thread: the log line can come before the row's new state.
    wait_until(lambda: any(r["status"] == "refused" for r in setup.outbox(vid)), 20, "the refusal in the outbox")
    rows = setup.outbox(vid)
    first = rows[0]
    assert first["status"] == "refused" and first["attempts"] == 1 and reason in first["last_error"], rows
    refused = setup.log_events("webhook.refused", vid)
    assert refused[0]["level"] == "warning" and reason in refused[0]["reason"], refused

    def one_line_per_event() -> bool:  # later events (the call failing) are refused while we look
        lines, rows = setup.log_events("webhook.refused", vid), setup.outbox(vid)
        return len(lines) == len(rows) and all(r["status"] == "refused" for r in rows)
    wait_until(one_line_per_event, 30, "every event refused, one warning each")
    assert setup.log_events("webhook.retry", vid) == []
    assert setup.internal.received == []


def test_a_loopback_notification_url_is_refused_at_connect(setup: Setup) -> None:
    refused_at_delivery(setup, "inside", "127.0.0.1 is loopback")


def test_a_name_resolving_to_loopback_is_refused_at_connect(setup: Setup) -> None:
    refused_at_delivery(setup, "named", "localhost (127.0.0.1) is loopback")


# The README's verification, run as a receiver would (README, "Verifying a webhook").
def readme_verifier() -> dict[str, Any]:
    text = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(import hashlib, hmac, time\ndef verified.*?)```", text, re.S)
    assert code is not None, "the README's webhook verification example"
    namespace: dict[str, Any] = {}
    exec(code.group(1), namespace)  # noqa: S102 - our own README's example
    return namespace


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


def test_allow_listed_receiver_gets_signed_events_and_replays_fail(setup: Setup) -> None:
    app = setup.projects["app"]
    status, body = setup.dial("app")
    assert status == 200, body
    vid = body["voice_id"]
    setup.receiver.wait_state(vid, "failed", timeout=60)
    events = setup.receiver.events(vid, app["webhook_secret"])  # every timestamp and signature checked
    assert [e["state"] for e in events] == ["initiated", "failed"]
    with setup.receiver.lock:
        received = [(h, b, t) for (h, b), t in zip(setup.receiver.received, setup.receiver.arrived, strict=True)
                    if json.loads(b)["voice_id"] == vid]
    headers, raw, arrived = received[0]
    ts, sig = headers[TIMESTAMP_HEADER.lower()], headers[SIGNATURE_HEADER.lower()]
    assert headers[EVENT_ID_HEADER.lower()] == json.loads(raw)["event_id"]
    assert abs(int(ts) - arrived) <= 5 and sig.startswith("v1=")
    assert not verify(app["app_key"], raw, ts, sig, now=arrived)  # the API key does not sign webhooks
    # the documented verification accepts it on arrival, and refuses the same POST replayed 6 minutes later,
    # or replayed with a fresh timestamp, or with a changed body
    readme = readme_verifier()
    hdrs = CIMultiDict(headers)
    readme["time"] = Clock(arrived)
    assert readme["verified"](app["webhook_secret"], hdrs, raw)
    readme["time"] = Clock(arrived + 360)
    assert not readme["verified"](app["webhook_secret"], hdrs, raw)
    assert not verify(app["webhook_secret"], raw, ts, sig, now=arrived + 360)
    fresh = CIMultiDict(hdrs)
    fresh[TIMESTAMP_HEADER] = str(int(arrived + 360))
    assert not readme["verified"](app["webhook_secret"], fresh, raw)
    readme["time"] = Clock(arrived)
    assert not readme["verified"](app["webhook_secret"], hdrs, raw.replace(b'"initiated"', b'"answered"'))


def test_event_url_credentials_stay_out_of_the_cdr_and_logs(setup: Setup) -> None:
    secret_url = f"http://hook-user:hook-s3cret@{RECEIVER_HOST}:{setup.receiver.port}/hooks"
    status, body = setup.dial("app", secret_url)
    assert status == 200, body
    vid = body["voice_id"]
    setup.receiver.wait_state(vid, "initiated")
    with setup.receiver.lock:
        headers = next(h for h, b in setup.receiver.received if json.loads(b)["voice_id"] == vid)
    assert headers["authorization"] == "Basic " + base64.b64encode(b"hook-user:hook-s3cret").decode()
    creds = setup.projects["app"]
    status, call, _ = VoiceClient(setup.gw, creds["app_id"], creds["app_key"])("GET", f"/voice/v1/calls/{vid}")
    assert status == 200
    initiated = next(e for e in call["events"] if e["state"] == "initiated")
    assert initiated["event_url"] == f"http://{RECEIVER_HOST}:{setup.receiver.port}/hooks"
    assert "hook-s3cret" not in json.dumps(setup.gw.cdr(vid)) and "hook-s3cret" not in setup.gw.log()
    assert setup.outbox(vid)[0]["url"] == secret_url  # only the outbox, which must deliver, keeps it whole


# -- in process: a DNS answer that changes between the API's check and the delivery (rebinding)
class RebindingDns(AbstractResolver):
    """The attacker's name server: a public address for the first look-up, the internal one afterwards."""

    def __init__(self, public: str, internal: str) -> None:
        self.answers = [public]
        self.internal = internal
        self.lookups = 0

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        self.lookups += 1
        address = self.answers.pop(0) if self.answers else self.internal
        return [{"hostname": host, "host": address, "port": port, "family": socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST}]

    async def close(self) -> None:
        pass


async def test_dns_rebinding_after_the_check_is_refused_when_the_delivery_connects(tmp_path: Path) -> None:
    hits: list[bytes] = []

    async def hook(request: web.Request) -> web.Response:
        hits.append(await request.read())
        return web.Response()

    app = web.Application()
    app.router.add_post("/hooks", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, RECEIVER_HOST, port).start()  # the "internal service"
    cdr = CdrStore(tmp_path, worker="w1")
    dns = RebindingDns("93.184.215.14", RECEIVER_HOST)
    notifier = Notifier(cdr, WebhookConfig(timeout_s=2, max_backoff_s=1, max_age_s=60), lambda p: "secret", dns)
    try:
        url = f"http://rebind.attacker.example:{port}/hooks"
        assert await notifier.check(url) is None  # the API's check sees a public address
        notifier.emit(url, "acme", "call-1", {"state": "initiated", "voice_id": "call-1"})
        # a literal internal IP never reaches the resolver: the socket's own check refuses it
        notifier.emit(f"http://{RECEIVER_HOST}:{port}/hooks", "acme", "call-2", {"state": "initiated",
                                                                             "voice_id": "call-2"})
        deadline = time.monotonic() + 10
        while notifier.refused < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert notifier.refused == 2 and notifier.delivered == 0 and notifier.failures == 0
        assert dns.lookups == 2 and hits == []
        cdr.flush()
        db = sqlite3.connect(tmp_path / "cdr.sqlite")
        rows = dict(db.execute("SELECT voice_id, last_error FROM outbox WHERE status='refused'").fetchall())
        db.close()
        assert f"rebind.attacker.example ({RECEIVER_HOST}) is loopback" in rows["call-1"]
        assert f"{RECEIVER_HOST} is loopback" in rows["call-2"]
    finally:
        await notifier.close()
        await runner.cleanup()
        cdr.close()
