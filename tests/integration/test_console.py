"""The operator console (/console on the worker's HTTP port) as an operator uses it: headless Chromium on a real
`gateway run`, calls placed by sipp. No WebRTC: no network namespace. Screenshots go to build/screenshots/
(console-*-desktop.png, console-*-phone.png)."""

from __future__ import annotations

import base64
import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Gateway,
    free_port,
    make_test_config,
    run_sipp,
    scenario,
    start_gateway,
    stop_gateway,
    stop_process,
    wait_until,
)
from tests.integration.browser import Browser, tone_wav
from tests.integration.test_cluster import start_cluster
from tests.integration.test_room_page import fits
from tests.integration.test_voice_api import caller_audio
from tests.integration.voice_tools import HookServer, VoiceClient, cli

ECHO_DID = "15550100001"
API_NUMBER = "15550109999"  # a project's number, route api: the application bridges the call into a room
CALLER = "15551237777"  # caller_waits.xml's From


def operator(data_dir: Path) -> str:
    """The operator's HTTP Basic header: the room service's api_user (default "demo") and api_key."""
    key = json.loads((data_dir / "room-service.json").read_text())["api_key"]
    return "Basic " + base64.b64encode(f"demo:{key}".encode()).decode()


def request(url: str, auth: str | None = None, method: str = "GET",
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method, headers={**({"Authorization": auth} if auth else {}),
                                                              **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def console_browser(tmp: Path, auth: str | None) -> Browser:
    """Chromium sending the operator's credentials with every request (what its login prompt would do); None: as
    it comes, to be given credentials in the page's URL (then cached for the page's script, style and requests
    as after the prompt)."""
    b = Browser(tmp, tone_wav(tmp / "mic.wav", 440.0, seconds=1.0))
    if auth is not None:
        b.driver.execute_cdp_cmd("Network.enable", {})
        b.driver.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {"Authorization": auth}})
    return b


def console(b: Browser) -> dict[str, Any]:
    return b.driver.execute_script("return window.gwConsole || {}") or {}


def live_rows(b: Browser) -> list[str]:
    return b.driver.execute_script("return [...document.querySelectorAll('#calls tbody tr')].map(r => r.dataset.voiceId)")


def js_fetch_text(b: Browser, path: str) -> tuple[int, str, str]:
    return tuple(b.driver.execute_async_script(  # type: ignore[return-value]
        "const done = arguments[arguments.length - 1];"
        "fetch(location.origin + arguments[0]).then(async r => done([r.status, r.headers.get('content-type'), await r.text()]),"
        " e => done([0, '', String(e)]));", path))


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path)
    yield gw
    stop_gateway(gw)


def test_every_console_route_needs_the_operator(gateway: Gateway) -> None:
    base = gateway.api_url
    auth = operator(gateway.data_dir)
    routes = ["/console", "/console/static/console.js", "/console/api/snapshot", "/console/api/live",
              "/console/api/local", "/console/api/cdr", "/console/api/cdr.csv", "/console/api/calls/abc"]
    for path in routes:
        status, headers, _ = request(base + path)
        assert status == 401 and headers["WWW-Authenticate"].startswith('Basic realm="console"'), (path, status)
    wrong = "Basic " + base64.b64encode(b"demo:not-the-key").decode()
    status, _, _ = request(base + "/console", wrong)
    assert status == 401
    status, headers, body = request(base + "/console", auth)
    assert status == 200 and headers["Cache-Control"] == "no-store"
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert b"<script src=\"/console/static/console.js\"" in body and b"<script>" not in body
    key = json.loads((gateway.data_dir / "room-service.json").read_text())
    _, _, snap = request(base + "/console/api/snapshot", auth)
    assert key["api_key"].encode() not in snap and key["secret"].encode() not in snap
    for bad in ("since=nan", "until=inf", "since=yesterday", "number=%3Cscript%3E", "page=0", "per_page=1000"):
        assert request(f"{base}/console/api/cdr?{bad}", auth)[0] == 400, bad
    # a drain needs the console's header (no cross-site form can send it) and a known worker
    status, _, _ = request(base + "/console/api/workers/w1/drain", auth, "POST")
    assert status == 403
    status, _, _ = request(base + "/console/api/workers/nope/drain", auth, "POST", {"X-Console": "drain"})
    assert status == 404
    # wrong credentials count in the Voice API's window: past api.auth_failures_per_source (20), 429
    statuses = [request(base + "/console/api/snapshot", wrong)[0] for _ in range(21)]
    assert statuses[-1] == 429, statuses
    assert request(base + "/voice/v1/calls", wrong)[0] == 429  # one window for every API


@pytest.mark.serial
@pytest.mark.timeout(180)
def test_a_sipp_call_live_then_in_the_timeline_search_and_csv(gateway: Gateway, tmp_path: Path) -> None:
    b = console_browser(tmp_path, operator(gateway.data_dir))
    try:
        b.driver.get(f"{gateway.api_url}/console")
        wait_until(lambda: console(b).get("connected") and console(b).get("snapshots", 0) >= 1, 15, "the live stream")
        since = time.time()
        result: dict[str, Any] = {}
        caller = threading.Thread(target=lambda: result.update(r=run_sipp(
            gateway.sip, "-sn", "uac", "-s", ECHO_DID, "-m", "1", "-d", "8000", timeout=60)), daemon=True)
        caller.start()
        rows = wait_until(lambda: live_rows(b), 15, "the call in the live table")
        voice_id = rows[0]
        shown = console(b)["snapshot"]["calls"][0]
        assert shown["voice_id"] == voice_id and shown["direction"] == "inbound" and shown["did"] == ECHO_DID
        assert shown["codec"] == "PCMU" and shown["worker"] == "w1"
        wait_until(lambda: b.driver.execute_script(
            "return document.querySelector('#calls tbody tr .duration').textContent") not in ("0:00", ""), 10,
            "the duration to count")
        fits(b, "console-live")
        wait_until(lambda: not live_rows(b), 30, "the call to leave the live table")
        caller.join(30)
        assert result["r"].returncode == 0, result["r"].stdout[-2000:]

        # search: this call by the DID it called, from when it started
        b.driver.execute_script(
            "const t = new Date((arguments[0] - 60) * 1000); t.setMinutes(t.getMinutes() - t.getTimezoneOffset());"
            "document.getElementById('q-since').value = t.toISOString().slice(0, 16);"
            "document.getElementById('q-number').value = arguments[1];"
            "document.getElementById('q-state').value = 'disconnected';", since, ECHO_DID)
        b.click("#q-go")
        wait_until(lambda: [c["voice_id"] for c in console(b).get("results", [])] == [voice_id], 10, "the search to find it")
        found = console(b)["results"][0]
        assert found["reason"] == "remote_bye" and found["state"] == "disconnected", found
        # the CSV export of the same search
        href = b.driver.execute_script("return document.getElementById('csv').getAttribute('href')")
        assert "number=" + ECHO_DID in href and "state=disconnected" in href
        status, ctype, text = js_fetch_text(b, href)
        assert status == 200 and ctype.startswith("text/csv"), (status, ctype)
        lines = text.strip().split("\r\n")
        assert lines[0].startswith("voice_id,direction,from,to") and len(lines) == 2 and voice_id in lines[1], lines
        assert "remote_bye" in lines[1]
        # the timeline: its CDR events in order
        b.click(f"#results tr[data-voice-id='{voice_id}'] button")
        wait_until(lambda: (console(b).get("timeline") or {}).get("call", {}).get("voice_id") == voice_id, 10, "the timeline")
        states = b.driver.execute_script("return [...document.querySelectorAll('#timeline li')].map(l => l.dataset.state)")
        assert states == ["initiated", "answered", "disconnected"], states
        times = [e["ts"] for e in console(b)["timeline"]["events"]]
        assert times == sorted(times)
        fits(b, "console-search")
    finally:
        b.driver.quit()


@pytest.mark.serial
@pytest.mark.timeout(120)
def test_drain_this_worker_from_the_console(tmp_path: Path) -> None:
    """`gateway run` alone (no supervisor): the console drains the worker serving it, which then stops (exit 0),
    as `gateway drain w1` would."""
    gw = start_gateway(tmp_path)
    b = console_browser(tmp_path, None)
    try:
        key = json.loads((gw.data_dir / "room-service.json").read_text())["api_key"]
        b.driver.get(f"http://demo:{key}@127.0.0.1:{gw.http_port}/console")  # what a person types at the prompt
        wait_until(lambda: b.driver.execute_script(
            "const b = document.querySelector('#workers tr[data-worker=\"w1\"] button.drain'); return b && !b.disabled"),
            15, "w1's drain button")
        b.click("#workers tr[data-worker='w1'] button.drain")
        assert b.driver.execute_script("return document.getElementById('confirm').open")
        b.click("#confirm-yes")
        wait_until(lambda: gw.proc.poll() is not None, 30, "the drained worker to stop")
        assert gw.proc.returncode == 0
        log = gw.log()
        assert '"console.drain"' in log and '"worker.draining"' in log and '"worker.drained"' in log
    finally:
        b.driver.quit()
        stop_gateway(gw)


@pytest.mark.serial
@pytest.mark.timeout(240)
def test_one_console_shows_the_cluster_and_drains_the_other_worker(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path, workers=2)
    try:
        w1 = f"http://127.0.0.1:{cluster.http_base}"
        b = console_browser(tmp_path, operator(cluster.data))
        try:
            b.driver.get(f"{w1}/console")

            def statuses() -> dict[str, str]:
                snap = console(b).get("snapshot") or {}
                return {w["name"]: w["status"] for w in snap.get("workers", [])}

            wait_until(lambda: statuses() == {"w1": "up", "w2": "up"}, 30, "both workers up in w1's console")
            # two calls through Kamailio (round robin: one on each worker), both live in w1's console
            result: dict[str, Any] = {}
            # a call straight to each worker's own SIP port (Kamailio's round robin is per process: two calls
            # through it may well land on the same worker)
            def call(worker: str) -> None:
                sip = json.loads((cluster.data / "workers" / f"{worker}.json").read_text())["sip"]
                result[worker] = run_sipp(sip, "-sn", "uac", "-s", ECHO_DID, "-m", "1", "-d", "6000", timeout=60)

            callers = [threading.Thread(target=call, args=(w,), daemon=True) for w in ("w1", "w2")]
            for caller in callers:
                caller.start()
            try:
                wait_until(lambda: {c["worker"] for c in (console(b).get("snapshot") or {}).get("calls", [])} ==
                           {"w1", "w2"}, 20, "a call of each worker in w1's console")
            except AssertionError:
                shown = [(c["worker"], c["voice_id"]) for c in (console(b).get("snapshot") or {}).get("calls", [])]
                held = [(r["worker"], r["voice_id"], r["state"]) for r in cluster.calls()]
                raise AssertionError(f"w1's console shows {shown}; the CDR holds {held}") from None
            assert sorted(live_rows(b)) == sorted(c["voice_id"] for c in console(b)["snapshot"]["calls"])
            fits(b, "console-cluster")
            wait_until(lambda: not live_rows(b), 30, "both calls to end")
            for caller in callers:
                caller.join(30)
            assert all(r.returncode == 0 for r in result.values()), {w: r.stdout[-1000:] for w, r in result.items()}
            w2_pid = cluster.pid(2)
            b.click("#workers tr[data-worker='w2'] button.drain")
            b.click("#confirm-yes")
            wait_until(lambda: "worker_retired" in cluster.log(), 60, "the supervisor to retire the drained w2")
            wait_until(lambda: "w2" not in statuses(), 15, "w2 to leave the console")
            assert statuses() == {"w1": "up"}
            try:
                os.kill(w2_pid, 0)
                alive = True
            except ProcessLookupError:
                alive = False
            assert not alive, "w2 still runs"
        finally:
            b.driver.quit()
    finally:
        stop_process(cluster.proc, signal.SIGINT, grace=30)


@pytest.mark.serial
@pytest.mark.timeout(180)
def test_a_phone_bridged_into_a_room_is_listed_under_it(tmp_path: Path) -> None:
    """A sipp caller to a project's API number, put into a new room through the Voice API (plain RTP on Janus:
    no WebRTC, no network namespace): the console lists the room with that phone, masked, and the call's phase."""
    hooks = HookServer(free_port())
    hooks.start()
    acme = cli(tmp_path / "data", "projects", "create", "--name", "acme", "--number", API_NUMBER,
               "--notification-url", hooks.url)
    gw = start_gateway(tmp_path, make_test_config())
    b = console_browser(tmp_path, operator(gw.data_dir))
    try:
        wait_until(lambda: '"rooms.started"' in gw.log(), 60, "the room service")
        b.driver.get(f"{gw.api_url}/console")
        sc = scenario(tmp_path, "caller_waits.xml", audio=str(caller_audio(tmp_path)))
        result: dict[str, Any] = {}
        caller = threading.Thread(target=lambda: result.update(r=run_sipp(gw.sip, "-sf", str(sc), "-s", API_NUMBER,
                                                                          "-m", "1", timeout=90)), daemon=True)
        caller.start()
        vid = hooks.first("incoming")["voice_id"]
        client = VoiceClient(gw, acme["app_id"], acme["app_key"])
        status, body, _ = client("PUT", f"/voice/v1/room/new/call/{vid}/join")
        assert status == 200 and body["state"] == "joined", body
        room_id = body["room_id"]

        def listed() -> dict[str, Any] | None:
            snap = console(b).get("snapshot") or {}
            return next((r for r in snap.get("rooms", []) if r["room_id"] == room_id), None)

        room = wait_until(listed, 15, "the room in the console")
        masked = "•" * (len(CALLER) - 4) + CALLER[-4:]
        assert room["phones"] == [{"name": masked, "voice_id": vid}] and room["browsers"] == [], room
        call = next(c for c in console(b)["snapshot"]["calls"] if c["voice_id"] == vid)
        assert call["phase"] == "in_room" and call["room_id"] == room_id and call["from"] == masked, call
        assert CALLER not in b.driver.page_source  # the whole number is nowhere in the page
        # what the console reads of the room service: every live room (browsers too), a project's own only
        mine = VoiceClient(gw, acme["app_id"], acme["app_key"])
        mine.base = gw.rooms_url
        status, live, _ = mine("GET", "/video/v1/live")
        assert status == 200 and [r["room_id"] for r in live["rooms"]] == [room_id], live
        assert [p["kind"] for p in live["rooms"][0]["participants"]] == ["phone"]
        demo = cli(gw.data_dir, "projects", "reset-key", "demo")
        theirs = VoiceClient(gw, demo["app_id"], demo["app_key"])
        theirs.base = gw.rooms_url
        assert theirs("GET", "/video/v1/live")[1] == {"rooms": []}, "another project's live rooms are not shown"
        servers = console(b)["snapshot"]["media_servers"]
        assert servers and all(s["connected"] for s in servers), servers
        fits(b, "console-room")
        assert client("DELETE", f"/voice/v1/room/{room_id}/call/{vid}")[0] == 200
        wait_until(lambda: listed() is None and not live_rows(b), 15, "the room and the call to leave the console")
        caller.join(60)
        assert result["r"].returncode == 0, result["r"].stdout[-2000:]
    finally:
        b.driver.quit()
        stop_gateway(gw)
        hooks.stop()
