"""Scale-out with the real parts: `gateway run --workers 2` starts Redis, Kamailio and two workers; sipp
calls through Kamailio. Spread, a worker killed with SIGKILL under load, the API of one worker acting on a
call held by the other, drain, metrics, and the autoscaler with its alarms."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.media import g711
from tests.conftest import (
    ROOT,
    free_port,
    janus_env,
    make_test_config,
    port_block,
    run_sipp,
    scenario,
    sip_tls_env,
    stop_process,
    tls_files,
    wait_until,
)
from tests.integration.ivr_tools import ivr_scenario, rfc4733
from tests.integration.voice_tools import ALLOW_LOOPBACK, HookServer, VoiceClient, cli

ECHO_DID = "15550100001"
API_NUMBER = "15550107777"


@dataclass
class Cluster:
    proc: subprocess.Popen[bytes]
    sip_port: int  # Kamailio
    http_base: int  # worker i: http_base + i
    data: Path
    log_path: Path
    tmp: Path
    rooms_port: int
    hooks: HookServer | None = None  # the demo project's webhook receiver

    @property
    def sip(self) -> str:
        return f"127.0.0.1:{self.sip_port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def health(self, worker: int) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_base + worker - 1}/healthz", timeout=2) as r:
                return json.loads(r.read())  # type: ignore[no-any-return]
        except OSError:
            return None

    def metrics(self, worker: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_base + worker - 1}/metrics", timeout=5) as r:
            return r.read().decode()

    def pid(self, worker: int) -> int:
        return int(json.loads((self.data / "workers" / f"w{worker}.json").read_text())["pid"])

    def calls(self) -> list[dict[str, Any]]:
        return cli(self.data, "calls", "--limit", "2000")  # type: ignore[no-any-return]

    def by_worker(self, since: float = 0.0) -> collections.Counter[str]:
        return collections.Counter(r["worker"] for r in self.calls() if r["started_at"] >= since)

    def sipp_routes(self, count: int, rate: float, hold_ms: int, did: str = ECHO_DID, timeout: int = 90,
                    tag: str = "") -> subprocess.CompletedProcess[str]:
        sf = scenario(self.tmp / f"routes{tag}", "uac_routes.xml", audio=str(tone(self.tmp)), hold=str(hold_ms))
        return run_sipp(self.sip, "-sf", str(sf), "-s", did, "-m", str(count), "-r", str(rate), timeout=timeout)


def tone(tmp: Path) -> Path:
    path = tmp / "tone.ul"
    if not path.exists():
        t = np.arange(8000 * 4) / 8000
        path.write_bytes(g711.encode("PCMU", (6000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)))
    return path


def start_cluster(tmp: Path, workers: int = 2, env: dict[str, str] | None = None,
                  hooks: HookServer | None = None, extra: str = "") -> Cluster:
    data = tmp / "data"
    sip, http, wsip = free_port(), free_port(count=4), free_port(count=4)
    rtp_low = port_block(2402)  # the workers' 2000 RTP ports, then Janus's 400
    cfg = tmp / "gateway.toml"
    text = make_test_config(extra)
    if hooks is not None:
        text = text.replace('notification_url = ""', f'notification_url = "{hooks.url}"', 1)
    cfg.write_text(text)
    log_path = tmp / "cluster.log"
    rooms_port = free_port()
    args = [sys.executable, "-m", "gateway", "run", "--workers", str(workers), "--config", str(cfg), "--sip-port", str(sip),
            "--http-port", str(http), "--rtp-ports", f"{rtp_low}-{rtp_low + 1999}", "--data-dir", str(data)]
    environ = {**os.environ, "GATEWAY_CLUSTER_WORKER_SIP_PORT": str(wsip), "GATEWAY_CLUSTER_REDIS_PORT": str(free_port()),
               "GATEWAY_ROOM_SERVICE_PORT": str(rooms_port), "GATEWAY_CLUSTER_MAX_WORKERS": str(workers),
               "GATEWAY_CLUSTER_DRAIN_TIMEOUT_S": "30", **janus_env(rtp_low + 2002), **ALLOW_LOOPBACK, **(env or {})}
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env=environ)
    cluster = Cluster(proc, sip, http, data, log_path, tmp, rooms_port, hooks)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"cluster exited: {cluster.log()[-3000:]}")
        return '"supervisor.started"' in cluster.log()

    try:
        wait_until(up, 90, "the supervisor to start Redis, the workers and Kamailio")
    except AssertionError:
        stop_process(proc, signal.SIGINT, grace=30)  # whatever it started goes with it
        raise
    return cluster


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("cluster")
    acme = cli(tmp / "data", "projects", "create", "--name", "acme", "--number", API_NUMBER)
    (tmp / "acme.json").write_text(json.dumps(acme))  # its app_key is shown on creation only
    hooks = HookServer(free_port())
    hooks.start()
    c = start_cluster(tmp, hooks=hooks)
    try:
        yield c
    finally:
        stop_process(c.proc, signal.SIGINT, grace=30)
        hooks.stop()
        assert c.proc.returncode == 0, c.log()[-3000:]
        leftovers = subprocess.run(["pgrep", "-f", str(c.data)], capture_output=True, text=True).stdout.split()
        assert leftovers == [], "the supervisor left processes behind"


def test_calls_spread_across_two_workers_and_all_complete(cluster: Cluster) -> None:
    since = time.time()
    result = cluster.sipp_routes(40, 10, 2000)
    assert result.returncode == 0, result.stdout[-3000:]
    spread = cluster.by_worker(since)
    assert spread["w1"] >= 8 and spread["w2"] >= 8 and sum(spread.values()) == 40, spread
    ended = [r for r in cluster.calls() if r["started_at"] >= since]
    assert all(r["state"] == "disconnected" and r["reason"] == "remote_bye" for r in ended)
    text = cluster.metrics(2)
    assert "gateway_workers 2.0" in text and 'gateway_calls_started_total{direction="inbound"}' in text
    assert "gateway_event_loop_lag_seconds_count" in text and "gateway_rtp_packets_received_total" in text


def test_api_of_one_worker_acts_on_a_call_held_by_the_other(cluster: Cluster) -> None:
    acme = json.loads((cluster.tmp / "acme.json").read_text())
    sf = scenario(cluster.tmp, "caller_waits.xml", audio=str(tone(cluster.tmp)))
    result: dict[str, Any] = {}
    caller = threading.Thread(target=lambda: result.update(r=run_sipp(cluster.sip, "-sf", str(sf), "-s", API_NUMBER,
                                                                      "-m", "1", timeout=90)), daemon=True)
    caller.start()
    row = wait_until(lambda: next((r for r in cluster.calls() if r["to_number"] == API_NUMBER and r["state"] == "answered"),
                                  None), 20, "the API number's call to be answered")
    holder = int(row["worker"][1:])
    other = 2 if holder == 1 else 1
    gw_other = type("Gw", (), {"http_port": cluster.http_base + other - 1})()
    client = VoiceClient(gw_other, acme["app_id"], acme["app_key"])  # type: ignore[arg-type]
    status, body, _ = client("PUT", f"/voice/v1/room/new/call/{row['voice_id']}/join")
    assert status == 200 and body["state"] == "joined", body
    status, body, _ = client("DELETE", f"/voice/v1/room/{body['room_id']}/call/{row['voice_id']}")
    assert status == 200 and body["state"] == "removed", body
    caller.join(60)
    assert result["r"].returncode == 0, result["r"].stdout[-2000:]
    assert f'"api.forwarded", "voice_id": "{row["voice_id"]}"' in cluster.log()
    cdr = cli(cluster.data, "cdr", row["voice_id"])
    assert cdr["worker"] == f"w{holder}" and cdr["reason"] == "removed_by_api"


def test_ivr_caller_resolves_the_meeting_through_the_shared_directory(cluster: Cluster) -> None:
    """The room service publishes the room into Redis; whichever worker takes the call resolves it there."""
    import base64

    key = json.loads((cluster.data / "room-service.json").read_text())["api_key"]
    req = urllib.request.Request(f"http://127.0.0.1:{cluster.rooms_port}/video/v1/rooms", method="POST",
                                 data=json.dumps({"name": "Shared", "settings": {"sip": {"enabled": True}}}).encode(),
                                 headers={"Content-Type": "application/json",
                                          "Authorization": "Basic " + base64.b64encode(f"demo:{key}".encode()).decode()})
    with urllib.request.urlopen(req, timeout=10) as r:
        room = json.loads(r.read())
    sip = room["sip"]
    since = time.time()
    sf = ivr_scenario(cluster.tmp / "ivr", [rfc4733(sip["meeting_id"] + "#"), rfc4733(sip["pin"] + "#")], tail=4000)
    result = run_sipp(cluster.sip, "-sf", str(sf), "-s", "15550100000", "-m", "1", timeout=90)
    assert result.returncode == 0, result.stdout[-2000:]
    (row,) = [r for r in cluster.calls() if r["started_at"] >= since]
    events = {e["state"]: e for e in cli(cluster.data, "cdr", row["voice_id"])["events"]}
    assert events["validated"]["room_id"] == room["room_id"] and events["validated"]["role"] == "participant"


def test_worker_killed_under_load(cluster: Cluster) -> None:
    load: dict[str, Any] = {}
    background = threading.Thread(target=lambda: load.update(r=cluster.sipp_routes(30, 5, 4000, tag="load")), daemon=True)
    background.start()
    wait_until(lambda: (cluster.health(2) or {}).get("active_calls", 0) >= 2, 20, "calls in progress on w2")
    os.kill(cluster.pid(2), signal.SIGKILL)
    killed = time.monotonic()
    after = cluster.sipp_routes(1, 1, 100, timeout=30, tag="after-kill")
    elapsed = time.monotonic() - killed
    print(f"\nkill -9 -> a new call completed through the balancer in {elapsed:.2f} s")
    assert after.returncode == 0 and elapsed < 3.0, (elapsed, after.stdout[-2000:])

    def lost() -> list[dict[str, Any]] | None:
        rows = [r for r in cluster.calls() if r["reason"] == "worker_lost"]
        return rows or None

    rows = wait_until(lost, 5, "the lost worker's calls closed in the CDR")
    assert all(r["worker"] == "w2" and r["state"] == "disconnected" for r in rows)
    assert '"alarm.worker_lost"' in cluster.log()
    background.join(120)
    # the supervisor starts it again; the balancer takes it back once it answers OPTIONS
    wait_until(lambda: cluster.health(2) is not None, 30, "w2 restarted")
    # the application hears of each lost call: its last webhook, delivered by w2 once it is back
    assert cluster.hooks is not None
    for row in rows:
        events = wait_until(lambda r=row: cluster.hooks.events(r["voice_id"]) or None, 20, "the lost call's webhooks")
        wait_until(lambda r=row: cluster.hooks.events(r["voice_id"])[-1].get("reason") == "worker_lost", 20,
                   "a disconnected webhook with reason worker_lost")
        assert events[0]["state"] == "incoming"


def test_hung_worker_is_killed_and_replaced(cluster: Cluster) -> None:
    wait_until(lambda: cluster.health(1) is not None, 30, "w1 up")
    pid = cluster.pid(1)
    os.kill(pid, signal.SIGSTOP)  # alive but silent: no /healthz, no OPTIONS, no heartbeat
    wait_until(lambda: '"supervisor.worker_hung", "worker": "w1"' in cluster.log(), 25, "the supervisor to see w1 hung")
    wait_until(lambda: (cluster.health(1) or {}).get("status") == "ok" and cluster.pid(1) != pid, 30, "w1 replaced")
    # callers that honour Record-Route: the worker set changes under them (w1 comes back), Call-ID hashing alone
    # would not find their worker again (see config/kamailio/kamailio.cfg.tmpl)
    after = cluster.sipp_routes(4, 4, 100, timeout=30, tag="after-hang")
    assert after.returncode == 0, after.stdout[-2000:]


def test_drain_lets_calls_finish_and_sends_new_ones_elsewhere(cluster: Cluster) -> None:
    wait_until(lambda: cluster.health(2) is not None and cluster.health(1) is not None, 30, "both workers")
    long_calls: dict[str, Any] = {}
    since = time.time()
    thread = threading.Thread(target=lambda: long_calls.update(r=cluster.sipp_routes(6, 10, 8000, tag="long")), daemon=True)
    thread.start()
    wait_until(lambda: sum((cluster.health(i) or {}).get("active_calls", 0) for i in (1, 2)) == 6, 20,
               "the six long calls in progress")
    drain_no = 1 if (cluster.health(1) or {}).get("active_calls", 0) >= 1 else 2  # a worker with calls in progress
    name, other = f"w{drain_no}", f"w{3 - drain_no}"
    drained = cli(cluster.data, "drain", name)
    assert drained["worker"] == name and drained["state"] == "draining"
    wait_until(lambda: (cluster.health(drain_no) or {}).get("status") == "draining", 10, f"{name} draining")
    after = time.time()
    short = cluster.sipp_routes(6, 6, 500, tag="short")
    assert short.returncode == 0, short.stdout[-2000:]
    assert cluster.by_worker(after) == {other: 6}
    thread.join(90)
    assert long_calls["r"].returncode == 0, long_calls["r"].stdout[-2000:]
    rows = [r for r in cluster.calls() if since <= r["started_at"] < after]
    assert any(r["worker"] == name for r in rows) and all(r["reason"] == "remote_bye" for r in rows)
    wait_until(lambda: f'"supervisor.worker_stopped", "worker": "{name}"' in cluster.log(), 20, f"{name} to exit")
    assert f'"alarm.worker_retired", "worker": "{name}"' in cluster.log()


@pytest.mark.serial  # the autoscaler reacts to the machine's load
def test_autoscaler_adds_a_worker_under_load_and_retires_it_when_idle(tmp_path: Path) -> None:
    alarms = HookServer(free_port())
    alarms.start()
    c = start_cluster(tmp_path, workers=1, env={"GATEWAY_CLUSTER_MAX_WORKERS": "2", "GATEWAY_CLUSTER_SCALE_UP_RATE": "3",
                                                "GATEWAY_CLUSTER_SCALE_IDLE_S": "3", "GATEWAY_CLUSTER_ALARM_URL": alarms.url})
    try:
        result = c.sipp_routes(60, 8, 1000)
        assert result.returncode == 0, result.stdout[-2000:]

        def events() -> list[str]:
            with alarms.lock:
                return [json.loads(body)["event"] for _, body in alarms.received]

        wait_until(lambda: "worker_started" in events(), 10, "an alarm: worker started")
        assert c.health(2) is not None or "worker_retired" in events()
        wait_until(lambda: "worker_retired" in events(), 30, "the idle extra worker retired")
        started = next(json.loads(b) for _, b in alarms.received if json.loads(b)["event"] == "worker_started")
        assert started["worker"] == "w2" and started["reason"] == "call_rate"
        assert c.by_worker()["w2"] > 0  # the added worker took calls
    finally:
        stop_process(c.proc, signal.SIGINT, grace=30)
        alarms.stop()


def test_kamailio_terminates_tls_with_mutual_tls_and_srtp_for_two_workers(tmp_path: Path) -> None:
    """`--workers 2` with tls in sip.transports: Kamailio listens for TLS (its tls module, our certificate), the
    workers stay on UDP behind it and learn the transport and the client certificate's names from Kamailio's
    headers. baresip with the trunk's client certificate calls the echo DID over TLS with SRTP and hears itself
    (the CDR says tls and srtp); without a certificate it gets 403 from the worker's per-trunk check."""
    from gateway import tls
    from tests.integration.baresip import Baresip
    from tests.integration.test_baresip import dominant_frequency, tone_wav

    cert, key = tls_files(tmp_path)
    tls.self_signed(["sbc.example"], tmp_path / "sbc.pem", tmp_path / "sbc.key")
    (tmp_path / "sbc-both.pem").write_bytes((tmp_path / "sbc.pem").read_bytes() + (tmp_path / "sbc.key").read_bytes())
    tls_port = free_port()
    trunk = ('\n[[trunks]]\nname = "sbc"\nsources = ["127.0.0.1/32"]\nmedia_encryption = "required"\n'
             'tls_client_certificate = true\ntls_client_names = ["sbc.example"]\n')
    c = start_cluster(tmp_path, extra=trunk,
                      env=sip_tls_env(tls_port, cert, key, tls_client_ca=str(tmp_path / "sbc.pem")))
    src = tmp_path / "tone.wav"
    tone_wav(src, 1000.0, 30.0)
    try:
        wait_until(lambda: c.health(1) is not None and c.health(2) is not None, 30, "both workers")
        for i, certificate in enumerate((tmp_path / "sbc-both.pem", None)):
            phone = Baresip(tmp_path / f"baresip{i}", src, ca_file=cert, certificate=certificate,
                            mediaenc="srtp-mand")
            try:
                uri = f"sip:{ECHO_DID}@127.0.0.1:{tls_port};transport=tls"
                if certificate is not None:
                    closed = phone.talk(uri, 3)
                else:
                    phone.command("dial", uri)
                    closed = phone.wait_event("CALL_CLOSED", 20)
            finally:
                phone.close()
            if certificate is None:
                assert "403" in closed.get("param", ""), closed
        rows = wait_until(lambda: [r for r in c.calls() if r["state"] == "disconnected" and r["answered_at"]], 20,
                          "the answered call's CDR closed")
        assert [(r["trunk"], r["transport"], r["media_encryption"]) for r in rows] == [("sbc", "tls", "srtp")], rows
        recorded = [p for p in (tmp_path / "baresip0" / "rec").glob("*.wav") if "dec" in p.name]
        freq, rms = dominant_frequency(recorded[0])
        assert abs(freq - 1000) < 20 and rms > 1000, (freq, rms)
        assert '"reason": "client_certificate"' in c.log(), "the refusal said in the worker's log"
    finally:
        stop_process(c.proc, signal.SIGINT, grace=30)
