"""Helpers of the chaos tests (test_chaos.py) and the soak (tests/perf/test_soak.py): a webhook receiver that can
be slow or down, a mixed call load (echo callers, IVR callers into a room, dial-outs through the Voice API to a
sipp far phone), the CDR read straight from SQLite (read-only: it works while the gateway's disk refuses writes),
and the "nothing lost" checks: every call closed with a reason, every webhook delivered once in order."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.api.webhooks import EVENT_ID_HEADER, SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from gateway.media import g711
from tests.conftest import ROOT, free_port, janus_env, media_block, port_block, scenario, stop_process, wait_until
from tests.integration.ivr_tools import ivr_scenario, rfc4733
from tests.integration.test_cluster import Cluster
from tests.integration.voice_tools import ALLOW_LOOPBACK

ECHO_DID = "15550100001"
IVR_DID = "15550100000"
ACME_NUMBER = "15550109999"  # the API project's number (in: route api; out: caller ID of dial-outs)
HOOK_STATES = {"ringing", "answered", "joined", "removed"}  # CDR events that are also webhooks (api/voice.py)


def require(condition: bool, reason: str) -> None:
    """Skip when `condition` fails, with the reason; on CI (CI=true) fail instead: CI must run every test."""
    if not condition:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI cannot run this test: {reason}")
        pytest.skip(reason)


def require_tools(*names: str) -> None:
    import shutil

    missing = [n for n in names if shutil.which(n) is None]
    require(not missing, f"needs {', '.join(missing)} (make install)")


_handed_out: set[int] = set()


def media_port() -> int:
    """An even port for sipp's media (it binds it and the next three: audio, video, and their RTCP), above the
    ranges the gateways, Janus and free_port() hand out; never one this process handed out before (a sipp started
    a moment ago may not have bound its ports yet)."""
    for _ in range(200):
        port = media_block()
        if port in _handed_out:
            continue
        try:
            for p in (port, port + 1, port + 2, port + 3):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind(("127.0.0.1", p))
            _handed_out.add(port)
            return port
        except OSError:
            continue
    raise RuntimeError("no free media port")


def tone(path: Path, freq: float = 440.0, seconds: int = 4) -> Path:
    if not path.exists():
        t = np.arange(8000 * seconds) / 8000
        path.write_bytes(g711.encode("PCMU", (6000 * np.sin(2 * np.pi * freq * t)).astype(np.int16)))
    return path


# -- a webhook receiver that can be slow or down
class Receiver:
    """Records every POST on arrival (headers, raw body, time). Modes: "up" answers 200 at once; "slow" answers
    after `slow_s` (the sender's attempt times out first; the receiver has the body all the same, as a real one
    does); "down" closes the listening socket (connections refused). Switching mode wakes the slow requests."""

    def __init__(self, port: int | None = None, slow_s: float = 30.0) -> None:
        self.port = port or free_port()
        self.slow_s = slow_s
        self.mode = "down"
        self.received: list[tuple[dict[str, str], bytes, float, str]] = []
        self.by_call: dict[str, list[tuple[dict[str, str], bytes, float]]] = {}  # voice_id -> its POSTs, in order
        self.on_event: Any = None  # called with each POSTed event (from the receiver's threads)
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._wake = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    def set(self, mode: str) -> None:
        assert mode in ("up", "slow", "down")
        previous, self.mode = self.mode, mode
        self._wake.set()
        self._wake = threading.Event()
        if mode == "down" and self._server is not None:
            server, self._server = self._server, None
            server.shutdown()
            server.server_close()
        elif mode != "down" and previous == "down":
            self._listen()

    def _listen(self) -> None:
        hooks = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                mode = hooks.mode
                headers, now = {k.lower(): v for k, v in self.headers.items()}, time.time()
                try:
                    event = json.loads(body)
                except ValueError:
                    event = {}
                with hooks.lock:
                    hooks.received.append((headers, body, now, mode))
                    if isinstance(event, dict) and "voice_id" in event:
                        hooks.by_call.setdefault(str(event["voice_id"]), []).append((headers, body, now))
                if hooks.on_event is not None and isinstance(event, dict):
                    hooks.on_event(event)
                if mode == "slow":
                    hooks._wake.wait(hooks.slow_s)
                try:
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:  # the sender gave up on us (its timeout)
                    pass

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self._server = server

    def stop(self) -> None:
        self.set("down")

    def events(self, voice_id: str, secret: str | None = None) -> list[dict[str, Any]]:
        """This call's events in order of first arrival, duplicates (at-least-once) removed; with `secret`, each
        signature is checked against the time the POST arrived."""
        out, seen = [], set()
        with self.lock:
            received = list(self.by_call.get(voice_id, ()))
        for headers, body, arrived in received:
            event = json.loads(body)
            if event["event_id"] in seen:
                continue
            assert headers.get(EVENT_ID_HEADER.lower()) == event["event_id"]
            if secret is not None:
                assert verify(secret, body, headers[TIMESTAMP_HEADER.lower()], headers[SIGNATURE_HEADER.lower()],
                              now=arrived), "bad webhook signature"
            seen.add(event["event_id"])
            out.append(event)
        return out

    def states(self, voice_id: str) -> list[str]:
        return [e["state"] for e in self.events(voice_id)]

    def count(self, mode: str | None = None) -> int:
        with self.lock:
            return sum(1 for r in self.received if mode is None or r[3] == mode)


# -- the CDR, read-only
@dataclass
class Cdr:
    voice_id: str
    direction: str
    state: str
    reason: str | None
    worker: str
    project: str | None
    to_number: str | None
    answered_at: float | None
    started_at: float
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def states(self) -> list[str]:
        return [e["state"] for e in self.events]

    def expected_hooks(self) -> list[str]:
        """The webhooks this call must have produced, from its CDR (api/voice.py VoiceApi.on_call_event)."""
        first = "initiated" if self.direction == "outbound" else "incoming"
        last = "failed" if self.direction == "outbound" and self.answered_at is None else "disconnected"
        return [first] + [s for s in self.states if s in HOOK_STATES] + [last]


def read_cdr(data_dir: Path, since: float = 0.0) -> list[Cdr]:
    path = data_dir / "cdr.sqlite"
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        calls = {row[0]: Cdr(*row) for row in db.execute(
            "SELECT voice_id, direction, state, reason, worker, project, to_number, answered_at, started_at FROM calls"
            " WHERE started_at >= ? ORDER BY started_at", (since,))}
        for vid, ts, state, data in db.execute("SELECT voice_id, ts, state, data FROM events ORDER BY id"):
            if vid in calls:
                calls[vid].events.append({"ts": ts, "state": state, **json.loads(data)})
    finally:
        db.close()
    return list(calls.values())


def joined(data_dir: Path, since: float, to: str | None = None) -> list[Cdr]:
    """Calls in a room now: a `joined` event and not ended."""
    return [c for c in read_cdr(data_dir, since) if "joined" in c.states and c.state != "disconnected"
            and (to is None or c.to_number == to)]


# -- load
def start_sipp(target: str, *args: str, timeout_s: int, log: Path) -> subprocess.Popen[bytes]:
    """sipp in the background (the test waits for it, or stops it by PID); exit 0 = every call went as scripted."""
    cmd = ["sipp", target, "-i", "127.0.0.1", "-p", str(free_port()), "-mp", str(media_port()), "-nostdin",
           "-timeout", f"{timeout_s}s", "-timeout_error", *args]
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def finish(proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc, grace=5)
        raise AssertionError(f"sipp did not finish in {timeout:.0f} s: {log.read_text()[-2000:]}") from None
    assert proc.returncode == 0, f"sipp exit {proc.returncode}: {log.read_text()[-3000:]}"


def echo_callers(target: str, tmp: Path, count: int, hold_ms: int, rate: float = 5, tag: str = "echo",
                 did: str = ECHO_DID, extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen[bytes], Path]:
    sf = scenario(tmp / tag, "uac_routes.xml", audio=str(tone(tmp / "tone.ul")), hold=str(hold_ms))
    log = tmp / f"{tag}.log"
    timeout = int(hold_ms / 1000 + count / rate + 60)
    return start_sipp(target, "-sf", str(sf), "-s", did, "-m", str(count), "-l", str(count), "-r", f"{rate:.3f}",
                      "-rp", "1000", *extra, timeout_s=timeout, log=log), log


def honour_record_route(path: Path) -> Path:
    """Make a caller scenario follow the dialog's route set (as a real UA does, and Kamailio expects): the 2xx to
    the INVITE records it, in-dialog requests go to [next_url] with [routes]. Without it they reach Kamailio with
    no Route and are dispatched by Call-ID hash, which after a failover (a worker slower than fr_timer on a busy
    machine) names another worker than the one holding the call."""
    text = path.read_text()
    at = text.index("<scenario")  # the INVITE's 2xx (the header comment may quote a scenario of its own)
    text = text[:at] + text[at:].replace('<recv response="200"/>', '<recv response="200" rrs="true"/>', 1)
    text = text[:at] + re.sub(r"^(ACK|BYE|INFO) sip:\S+ SIP/2.0\n(Via: [^\n]*\n)", r"\1 [next_url] SIP/2.0\n\2[routes]\n",
                              text[at:], flags=re.MULTILINE)
    path.write_text(text)
    return path


def ivr_callers(target: str, tmp: Path, room: dict[str, Any], count: int, stay_ms: int, end: str = "caller",
                rate: float = 2, tag: str = "ivr") -> tuple[subprocess.Popen[bytes], Path]:
    """IVR callers typing the room's meeting ID and PIN, then streaming a tone in the room for `stay_ms`: then they
    hang up (end="caller"), or they wait that long for the gateway to hang up (end="gateway")."""
    sip = room["sip"]
    steps = [rfc4733(sip["meeting_id"] + "#"), rfc4733(sip["pin"] + "#"),
             f'  <nop><action><exec rtp_stream="{tone(tmp / "ivr-tone.ul", 500.0)},-1,0"/></action></nop>']
    sf = honour_record_route(ivr_scenario(tmp / tag, steps, end=end, tail=stay_ms))
    log = tmp / f"{tag}.log"
    timeout = int(stay_ms / 1000 + count / rate + 90)
    return start_sipp(target, "-sf", str(sf), "-s", IVR_DID, "-m", str(count), "-l", str(count), "-r", str(rate),
                      timeout_s=timeout, log=log), log


def far_phones(port: int, count: int, tmp: Path, timeout_s: int = 300, tag: str = "uas") -> tuple[subprocess.Popen[bytes], Path]:
    """sipp's built-in UAS as the trunk and far phone of `count` dial-outs: answers, echoes RTP, waits for BYE."""
    log = tmp / f"{tag}.log"
    cmd = ["sipp", "-sn", "uas", "-i", "127.0.0.1", "-p", str(port), "-mi", "127.0.0.1", "-mp", str(media_port()),
           "-rtp_echo", "-m", str(count), "-nostdin", "-timeout", f"{timeout_s}s", "-timeout_error"]
    return subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL), log


def trunk_config(uas_port: int, params: str = "") -> str:
    """A trunk "carrier" whose outbound proxy is the far phone at `uas_port` (`params`: e.g. ";transport=tls")."""
    return f"""
[[trunks]]
name = "carrier"
sources = []
[trunks.outbound]
proxy = "sip:127.0.0.1:{uas_port}{params}"
"""


# -- nothing lost
def all_closed(data_dir: Path, since: float, count: int, timeout: float = 60) -> list[Cdr]:
    """Wait until `count` calls started since `since` are all disconnected in the CDR, each with a reason."""
    def done() -> list[Cdr] | None:
        rows = read_cdr(data_dir, since)
        return rows if len(rows) >= count and all(r.state == "disconnected" for r in rows) else None

    try:
        rows: list[Cdr] = wait_until(done, timeout, f"{count} calls closed in the CDR", interval=0.5)
    except AssertionError:
        rows = read_cdr(data_dir, since)
        open_ = [(r.voice_id, r.to_number, r.state, r.states[-3:]) for r in rows if r.state != "disconnected"]
        raise AssertionError(f"{len(rows)} calls in the CDR (expected {count}); still open: {open_}") from None
    assert len(rows) == count, f"{len(rows)} calls in the CDR, {count} placed"
    missing = [r.voice_id for r in rows if not r.reason]
    assert not missing, f"calls closed without a reason: {missing}"
    return rows


def all_delivered(receiver: Receiver, calls: Iterable[Cdr], secret: str | None = None, timeout: float = 60) -> None:
    """Every call's webhooks arrived (each at least once), in order, exactly the states its CDR implies."""
    calls = list(calls)

    def complete() -> bool:
        return all(receiver.states(c.voice_id) == c.expected_hooks() for c in calls)

    try:
        wait_until(complete, timeout, "every webhook delivered", interval=0.5)
    except AssertionError:
        wrong = [(c.voice_id[:8], c.expected_hooks(), receiver.states(c.voice_id)) for c in calls
                 if receiver.states(c.voice_id) != c.expected_hooks()]
        raise AssertionError(f"webhooks missing or out of order for {len(wrong)} calls: {wrong[:5]}") from None
    if secret is not None:
        for c in calls:
            receiver.events(c.voice_id, secret)


def log_lines(path: Path, event: str) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if f'"{event}"' in line:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def children(pid: int, pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid), "-f", pattern], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def descendants(pid: int) -> list[int]:
    found = [int(p) for p in subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()]
    for child in list(found):
        found += descendants(child)
    return found


def http_json(url: str, timeout: float = 5) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def when(predicate: Any, timeout: float, what: str) -> float:
    """wait_until, returning how long it took."""
    started = time.monotonic()
    wait_until(predicate, timeout, what, interval=0.1)
    return time.monotonic() - started


def start_cluster_with(tmp: Path, data: Path, config_text: str, env: dict[str, str], workers: int = 2) -> Cluster:
    """`gateway run --workers N` (Redis, Kamailio, the room service, Janus, N workers) with this config; returns once
    the supervisor has started and the prompts are rendered."""
    sip, http, wsip = free_port(), free_port(count=4), free_port(count=4)
    rtp_low = port_block(2402)
    cfg = tmp / "gateway.toml"
    cfg.write_text(config_text)
    log_path = tmp / "cluster.log"
    rooms_port = free_port()
    args = [sys.executable, "-m", "gateway", "run", "--workers", str(workers), "--config", str(cfg), "--sip-port",
            str(sip), "--http-port", str(http), "--rtp-ports", f"{rtp_low}-{rtp_low + 1999}", "--data-dir", str(data)]
    environ = {**os.environ, "GATEWAY_CLUSTER_WORKER_SIP_PORT": str(wsip), "GATEWAY_ROOM_SERVICE_PORT": str(rooms_port),
               "GATEWAY_CLUSTER_MAX_WORKERS": str(workers), "GATEWAY_CLUSTER_DRAIN_TIMEOUT_S": "30",
               **janus_env(rtp_low + 2002), **ALLOW_LOOPBACK, **env}
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, env=environ)
    cluster = Cluster(proc, sip, http, data, log_path, tmp, rooms_port)

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"cluster exited: {cluster.log()[-3000:]}")
        return '"supervisor.started"' in cluster.log() and '"prompts.ready"' in cluster.log()

    try:
        wait_until(up, 120, "the supervisor to start Redis, the workers, Kamailio; prompts rendered")
    except AssertionError:
        stop_process(proc, signal.SIGINT, grace=30)
        raise
    return cluster


def no_leftovers(data: Path, timeout: float = 15) -> None:
    """Every process of the gateway (room service, Janus, helpers) ended with it: none names its data dir."""
    def gone() -> bool:
        return not subprocess.run(["pgrep", "-f", str(data)], capture_output=True, text=True).stdout.split()

    wait_until(gone, timeout, f"the processes of {data} to end")
