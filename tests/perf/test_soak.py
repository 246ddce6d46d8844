"""Soak: `gateway run --workers 2` (Kamailio, Redis, the room service, Janus, two workers) under a steady mix of calls
for BENCH_SOAK_MINUTES (default 30), then checked for leaks. Prints figures; asserts that nothing leaked and that
nothing was lost. Run on purpose (the machine should be otherwise quiet):

    BENCH_SOAK_MINUTES=30 .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/perf/test_soak.py

The load, "half the measured capacity" of the 2-core machine: the benchmarks measured, per call-second of CPU,
1.5 ms for an echo call, 2.7 ms for a caller in the IVR and 11.8 ms for a phone bridged into a room (worker 7.9 +
Janus 3.9, tests/perf/test_bench_rooms.py), plus about 6 ms per call set up through Kamailio (test_bench_cluster):
the 2 cores hold about 2000 ms per second of that. The default mix costs about 1000 ms per second, half of it
(the report prints the CPU actually used):
- BENCH_SOAK_ECHO (40) echo calls at a time, 30 s each (1.3 new calls per second);
- BENCH_SOAK_ROOM_CALLERS (48) callers in rooms at a time: IVR callers typing a meeting ID and PIN (injected,
  6 rooms of 8), staying 60 s in the room streaming a tone, then hanging up (0.8 new callers per second);
- BENCH_SOAK_DIALOUTS (6) dial-outs at a time through the Voice API into a project's room, to a sipp far phone
  echoing RTP, removed through the other worker's API after 30 s in the room;
- BENCH_SOAK_BRIDGED (4) callers to the project's API number at a time: the application (this test) hears of each
  by its `incoming` webhook, bridges it into a room (PUT, through either worker), removes it after 20 s (DELETE);
- every call's webhooks go to a receiver in the test, and are checked at the end: all delivered, in order.

Figures: RSS of every process sampled every 10 s, its growth from the end of the warm-up (BENCH_SOAK_WARMUP_MINUTES,
default 20 % of the run, at least 1.5) to the end (target < 5 %, the median of 3 samples at each end); CPU per
process over the steady window; and, quiet again after the load (against a baseline taken after a short priming
load, so lazily made things count as the baseline): calls, RTP ports, asyncio tasks, file descriptors, Janus
sessions and handles (the workers' /healthz: their legs; the room service's /healthz: its rooms), Janus threads,
Redis keys. What the issue asks of them: none left over.
"""

from __future__ import annotations

import os
import queue
import random
import re
import signal
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_test_config, scenario, stop_process, wait_until
from tests.integration.chaos_tools import (
    ACME_NUMBER,
    Receiver,
    all_delivered,
    echo_callers,
    far_phones,
    finish,
    free_port,
    honour_record_route,
    http_json,
    read_cdr,
    require_tools,
    start_cluster_with,
    start_sipp,
    tone,
    trunk_config,
)
from tests.integration.ivr_tools import ivr_scenario
from tests.integration.voice_tools import VoiceClient, cli
from tests.perf.rooms_tools import cpu_seconds, keypad

MINUTES = float(os.environ.get("BENCH_SOAK_MINUTES", "30"))
WARMUP = float(os.environ.get("BENCH_SOAK_WARMUP_MINUTES", str(max(1.5, MINUTES * 0.2))))
ECHO = int(os.environ.get("BENCH_SOAK_ECHO", "40"))
ECHO_HOLD_S = 30
ROOM_CALLERS = int(os.environ.get("BENCH_SOAK_ROOM_CALLERS", "48"))
ROOM_STAY_S = 60
ROOM_SIZE = 8
DIALOUTS = int(os.environ.get("BENCH_SOAK_DIALOUTS", "6"))
DIALOUT_HOLD_S = 30
BRIDGED = int(os.environ.get("BENCH_SOAK_BRIDGED", "4"))
BRIDGED_HOLD_S = 20
SAMPLE_S = 10
TRACE = ("-trace_err",)  # sipp writes what went wrong with a call (unexpected messages) to <scenario>_<pid>_errors.log
RSS_TARGET = 5.0  # % growth after the warm-up


# -- processes of the cluster
def pgrep(*args: str) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", *args], capture_output=True, text=True).stdout.split()]


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def processes(supervisor: int) -> dict[str, list[int]]:
    """name -> pids: the supervisor, each worker, the room service, Janus, Redis, Kamailio (all its processes)."""
    kids = pgrep("-P", str(supervisor))
    found: dict[str, list[int]] = {"supervisor": [supervisor]}
    for pid in kids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        text = b" ".join(cmd).decode(errors="replace")
        if "--cluster-child" in text:
            name = text.split("--name ", 1)[1].split()[0]
        elif "rooms serve" in text:
            name = "rooms"
        elif "redis-server" in text:
            name = "redis"
        elif text.startswith("janus") or "/janus " in text:
            name = "janus"
        elif "kamailio" in text:
            name = "kamailio"
        else:
            name = "other"
        found.setdefault(name, []).append(pid)
    if "kamailio" in found:
        found["kamailio"] += [p for k in list(found["kamailio"]) for p in pgrep("-P", str(k))]
    return found


@dataclass
class Sample:
    at: float
    rss: dict[str, int]  # kB, summed over the name's processes
    health: dict[str, dict[str, Any]]


def sample(supervisor: int, http_ports: dict[str, int], rooms_port: int) -> Sample:
    rss = {}
    for name, pids in processes(supervisor).items():
        total = 0
        for pid in pids:
            try:
                total += rss_kb(pid)
            except FileNotFoundError:
                pass
        rss[name] = total
    health = {}
    for name, port in {**http_ports, "rooms": rooms_port}.items():
        try:
            health[name] = http_json(f"http://127.0.0.1:{port}/healthz")
        except OSError:
            health[name] = {}
    return Sample(time.monotonic(), rss, health)


@dataclass
class Quiet:
    """The countable state of the cluster with no calls up: what must come back to its baseline."""

    workers: dict[str, dict[str, Any]]  # worker -> /healthz
    rooms: dict[str, Any]  # the room service's /healthz
    fds: dict[str, int]
    threads: dict[str, int]
    redis: dict[str, int]  # key pattern -> count

    def table(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name, h in sorted(self.workers.items()):
            janus = h.get("janus") or {}
            out.update({f"{name} calls": h.get("active_calls", -1), f"{name} rtp ports": h.get("rtp_ports_in_use", -1),
                        f"{name} asyncio tasks": h.get("tasks", -1), f"{name} fds": self.fds.get(name, -1),
                        f"{name} janus legs": janus.get("legs", -1), f"{name} janus sessions": janus.get("sessions", -1),
                        f"{name} janus handles": janus.get("handles", -1),
                        f"{name} webhooks queued": h.get("webhooks_queued", -1),
                        f"{name} registry calls": (h.get("registry") or {}).get("calls", -1),
                        f"{name} cdr buffered": (h.get("cdr") or {}).get("buffered", -1)})
        out["room service rooms"] = self.rooms.get("rooms", -1)
        out["room service janus rooms"] = sum(s.get("rooms", 0) for s in self.rooms.get("janus", []))
        for name in ("rooms", "janus", "redis", "kamailio", "supervisor"):
            if name in self.fds:
                out[f"{name} fds"] = self.fds[name]
        out["janus threads"] = self.threads.get("janus", -1)
        out.update({f"redis {k}": v for k, v in sorted(self.redis.items())})
        return out


REDIS_PATTERNS = ("gw:call:*", "gw:worker:*:calls", "gw:room:*", "gw:attempts:*", "gw:meeting:*", "gw:worker:*", "*")


def quiet_state(supervisor: int, http_ports: dict[str, int], rooms_port: int, redis_port: int) -> Quiet:
    procs = processes(supervisor)
    workers = {name: http_json(f"http://127.0.0.1:{port}/healthz") for name, port in http_ports.items()}
    rooms = http_json(f"http://127.0.0.1:{rooms_port}/healthz")
    fd = {name: sum(fds(p) for p in pids) for name, pids in procs.items() if name != "other"}
    th = {name: sum(threads(p) for p in pids) for name, pids in procs.items() if name != "other"}
    redis = {}
    for pattern in REDIS_PATTERNS:
        out = subprocess.run(["redis-cli", "-p", str(redis_port), "--scan", "--pattern", pattern], capture_output=True,
                             text=True, timeout=30).stdout.split()
        if pattern == "gw:worker:*:calls":  # a set per worker: count the members
            redis[pattern + " members"] = sum(int(subprocess.run(["redis-cli", "-p", str(redis_port), "scard", k],
                                                                 capture_output=True, text=True).stdout or 0) for k in out)
        else:
            redis[pattern] = len(out)
    return Quiet(workers, rooms, fd, th, redis)


# -- the application: dial-outs, bridges and removals through the Voice API
@dataclass
class ApiDriver:
    ports: list[int]  # the workers' HTTP ports
    acme: dict[str, Any]
    rooms: list[dict[str, Any]]
    until: float
    dialouts: int
    events: queue.Queue[dict[str, Any]] = field(default_factory=queue.Queue)
    placed: list[str] = field(default_factory=list)
    bridged: list[str] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)  # `incoming` calls that ended before the bridge (a failover branch)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    _next_dial: float = 0.0

    def client(self, port: int) -> VoiceClient:
        return VoiceClient(type("P", (), {"http_port": port})(), self.acme["app_id"], self.acme["app_key"])  # type: ignore[arg-type]

    def run(self) -> None:
        live: dict[str, dict[str, Any]] = {}  # voice_id -> kind, room, port, deadline (once in the room)
        self._next_dial = time.monotonic()
        while True:
            try:
                if self._step(live):
                    return
            except Exception as exc:  # noqa: BLE001 - an API request that failed (timeout, refused): noted, go on
                self.errors.append(f"{type(exc).__name__}: {exc}"[:200])
            time.sleep(0.2)

    def _step(self, live: dict[str, dict[str, Any]]) -> bool:
        """One round: dial when due, bridge the new incoming calls, remove the calls whose time is up; True: done."""
        interval = (DIALOUT_HOLD_S + 4) / max(1, self.dialouts)
        now, next_dial = time.monotonic(), self._next_dial
        if now < self.until and now >= next_dial and self.dialouts:
            self._next_dial = next_dial + interval
            port, room = random.choice(self.ports), random.choice(self.rooms)
            status, body, _ = self.client(port)("POST", f"/voice/v1/room/{room['room_id']}/join",
                                                {"name": "Soak", "owner_ref": "soak", "from": ACME_NUMBER,
                                                 "to": f"1555124{random.randrange(1000, 9999)}"})
            if status == 200:
                self.placed.append(body["voice_id"])
                live[body["voice_id"]] = {"kind": "dial", "room": room, "port": port, "deadline": None}
            else:
                self.errors.append(f"dial {status} {body}")
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                break
            vid, state = event.get("voice_id"), event.get("state")
            if state == "incoming" and event.get("to") == ACME_NUMBER:
                port, room = random.choice(self.ports), random.choice(self.rooms)
                status, body, _ = self.client(port)("PUT", f"/voice/v1/room/{room['room_id']}/call/{vid}/join")
                if status == 200:
                    self.bridged.append(str(vid))
                    live[str(vid)] = {"kind": "bridge", "room": room, "port": port,
                                      "deadline": time.monotonic() + BRIDGED_HOLD_S}
                elif status == 409 and body.get("error", {}).get("code") == "call_ended":
                    self.gone.append(str(vid))  # Kamailio cancelled this branch and sent the call elsewhere
                else:
                    self.errors.append(f"bridge {status} {body}")
            elif state == "joined" and vid in live and live[vid]["deadline"] is None:
                live[vid]["deadline"] = time.monotonic() + DIALOUT_HOLD_S
            elif state in ("disconnected", "failed") and vid in live:
                self.errors.append(f"{live.pop(vid)['kind']} {vid} ended by itself: {event.get('reason')}")
        for vid, call in list(live.items()):
            if call["deadline"] is not None and time.monotonic() >= call["deadline"]:
                other = next((p for p in self.ports if p != call["port"]), call["port"])  # the other worker
                status, body, _ = self.client(other)("DELETE", f"/voice/v1/room/{call['room']['room_id']}/call/{vid}")
                if status != 200:
                    self.errors.append(f"remove {status} {body}")
                del live[vid]
        return self.stop.is_set() and not live  # stop: set once the callers' sipp have finished


def branches(rows: list[Any]) -> list[Any]:
    """Kamailio's failover branches: an INVITE a worker did not answer within fr_timer (1 s: a busy machine) is
    CANCELled there and sent to the other worker, which takes the call; the first keeps a `cancelled` row."""
    return [r for r in rows if r.direction == "inbound" and r.reason == "cancelled" and r.answered_at is None]


def closed(data: Path, since: float, placed: int, timeout: float = 180) -> list[Any]:
    """Every call placed since `since` is closed in the CDR with a reason (failover branches come on top)."""
    def done() -> list[Any] | None:
        rows = read_cdr(data, since)
        return rows if len(rows) - len(branches(rows)) >= placed and all(r.state == "disconnected" for r in rows) else None

    try:
        rows: list[Any] = wait_until(done, timeout, f"{placed} calls closed in the CDR", interval=1)
    except AssertionError:
        rows = read_cdr(data, since)
        still = [(r.voice_id, r.to_number, r.worker, r.states[-3:]) for r in rows if r.state != "disconnected"]
        raise AssertionError(f"{len(rows)} rows ({len(branches(rows))} failover branches) for {placed} calls; "
                             f"still open: {still[:10]}") from None
    assert len(rows) - len(branches(rows)) == placed, (len(rows), len(branches(rows)), placed)
    assert all(r.reason for r in rows), "a call closed without a reason"
    return rows


def sipp_counts(log: Path) -> tuple[int, int]:
    """(successful, failed) calls from sipp's final statistics screen."""
    text = log.read_text(errors="replace")
    ok = re.findall(r"Successful call\s*\|\s*\d+\s*\|\s*(\d+)", text)
    bad = re.findall(r"Failed call\s*\|\s*\d+\s*\|\s*(\d+)", text)
    return (int(ok[-1]) if ok else -1, int(bad[-1]) if bad else -1)


def soak_config(uas_port: int, hooks_url: str) -> str:
    """The test config with the API project's trunk, the demo project's webhooks to the receiver, and the loopback
    trunk trusted for caller numbers (one sipp carries every caller, like a carrier trunk: the PIN limits count
    per caller number)."""
    text = make_test_config(trunk_config(uas_port)).replace('notification_url = ""',
                                                            f'notification_url = "{hooks_url}"', 1)
    trunk = '[[trunks]]\nname = "local"\n'
    assert trunk in text, "the shipped config's loopback trunk moved: update soak_config()"
    return text.replace(trunk, trunk + "trust_id_inbound = true\n", 1)


def room_callers(target: str, tmp: Path, rooms: list[dict[str, Any]], count: int, rate: float, tag: str) -> tuple[subprocess.Popen[bytes], Path]:
    """IVR callers typing their room's meeting ID and PIN (from a CSV, cycling over the rooms), staying ROOM_STAY_S
    in the room with a tone, then hanging up."""
    csv = tmp / f"{tag}.csv"  # SEQUENTIAL, cycling: caller i types room i % len(rooms)'s numbers, from its own number
    csv.write_text("SEQUENTIAL\n" + "".join(
        f"{rooms[i % len(rooms)]['sip']['meeting_id']};{rooms[i % len(rooms)]['sip']['pin']};{15557000000 + i};\n"
        for i in range(min(count, 5000))))
    steps = [keypad("field0", len(rooms[0]["sip"]["meeting_id"])), keypad("field1", len(rooms[0]["sip"]["pin"])),
             f'  <nop><action><exec rtp_stream="{tone(tmp / "room-tone.ul", 500.0)},-1,0"/></action></nop>']
    sf = honour_record_route(ivr_scenario(tmp / tag, steps, caller="[field2]", end="caller", tail=ROOM_STAY_S * 1000))
    log = tmp / f"{tag}.log"
    return start_sipp(target, "-sf", str(sf), "-inf", str(csv), "-s", "15550100000", "-m", str(count), "-l",
                      str(count), "-r", f"{rate:.3f}", "-rp", "1000", *TRACE, timeout_s=int(count / rate + ROOM_STAY_S + 120),
                      log=log), log


def bridged_callers(target: str, tmp: Path, count: int, rate: float, tag: str) -> tuple[subprocess.Popen[bytes], Path]:
    sf = honour_record_route(scenario(tmp / tag, "caller_waits.xml", audio=str(tone(tmp / "tone.ul"))))
    log = tmp / f"{tag}.log"
    return start_sipp(target, "-sf", str(sf), "-s", ACME_NUMBER, "-m", str(count), "-l", str(count), "-r", f"{rate:.3f}",
                      "-rp", "1000", *TRACE, timeout_s=int(count / rate + BRIDGED_HOLD_S + 120), log=log), log


def rates(minutes: float) -> dict[str, tuple[int, float]]:
    """(calls, calls per second) of each sipp, for a steady level over `minutes`."""
    seconds = minutes * 60
    echo_rate = ECHO / ECHO_HOLD_S
    room_rate = ROOM_CALLERS / ROOM_STAY_S
    bridged_rate = BRIDGED / (BRIDGED_HOLD_S + 3)
    return {"echo": (max(1, round(echo_rate * seconds)), echo_rate),
            "rooms": (max(1, round(room_rate * seconds)), room_rate),
            "bridged": (max(1, round(bridged_rate * seconds)), bridged_rate) if BRIDGED else (0, 0.0)}


@pytest.mark.timeout(int(MINUTES * 60 + 1200))
def test_soak(tmp_path: Path) -> None:
    require_tools("sipp", "redis-server", "redis-cli", "kamailio", "janus")
    data = tmp_path / "data"
    hooks = Receiver()
    hooks.set("up")
    acme = cli(data, "projects", "create", "--name", "acme", "--number", ACME_NUMBER, "--notification-url", hooks.url)
    uas_port = free_port()
    redis_port = free_port()
    cluster = start_cluster_with(tmp_path, data, soak_config(uas_port, hooks.url),
                                 {"GATEWAY_CLUSTER_REDIS_PORT": str(redis_port)})
    sup = cluster.proc.pid
    ports = {"w1": cluster.http_base, "w2": cluster.http_base + 1}
    procs: list[subprocess.Popen[bytes]] = []
    driver: ApiDriver | None = None
    samples: list[Sample] = []
    try:
        from tests.integration.test_bridge import api as rooms_api

        gw = type("G", (), {"rooms_port": cluster.rooms_port, "data_dir": data})()
        made = [rooms_api(gw, "POST", "/video/v1/rooms", {"name": f"Soak {i}", "settings": {"sip": {"enabled": True}}})
                for i in range(max(1, -(-ROOM_CALLERS // ROOM_SIZE)))]
        assert all(status == 201 for status, _ in made), made
        rooms = [room for _, room in made]
        acme_rooms = [cli(data, "rooms", "create", "--name", f"Acme {i}", "--project", "acme") for i in range(2)]
        n_dial = int(MINUTES * 60 / ((DIALOUT_HOLD_S + 4) / max(1, DIALOUTS))) + 20
        uas, uas_log = far_phones(uas_port, n_dial + 10, tmp_path, timeout_s=int(MINUTES * 60 + 900))
        procs.append(uas)

        # priming: one of each, so that what is made on first use is in the baseline
        since_priming = time.time()
        prime_driver = ApiDriver(list(ports.values()), acme, acme_rooms, time.monotonic() + 1, 1)
        hooks.on_event = prime_driver.events.put
        prime_thread = threading.Thread(target=prime_driver.run, daemon=True)
        prime_thread.start()
        p1 = echo_callers(cluster.sip, tmp_path, 2, hold_ms=3000, tag="prime-echo")
        p2 = room_callers(cluster.sip, tmp_path, rooms, 2, 1.0, "prime-rooms")
        p3 = bridged_callers(cluster.sip, tmp_path, 1, 1.0, "prime-bridged")
        for proc, _ in (p1, p2, p3):
            procs.append(proc)
        for proc, log in (p1, p2, p3):
            finish(proc, log, ROOM_STAY_S + 120)
        prime_driver.stop.set()
        prime_thread.join(DIALOUT_HOLD_S + 60)
        assert not prime_driver.errors, prime_driver.errors
        primed = closed(data, since_priming, 2 + 2 + 1 + 1)
        time.sleep(5)
        baseline = quiet_state(sup, ports, cluster.rooms_port, redis_port)

        # the soak: two halves, each followed by a quiet point; a leak grows between the quiet points (connection
        # pools and caches grow in the first half to what the load needs, and no further)
        half = MINUTES / 2
        warm_end = time.monotonic() + WARMUP * 60
        quiet: list[Quiet] = []
        rows: list[Any] = []
        sipps: dict[str, list[tuple[int, int]]] = {}
        errors: list[str] = []
        placed = bridged_calls = gone_calls = 0
        cpu_window: dict[str, float] = {}
        window = 0.0
        machine = (0, 0)
        for phase in ("a", "b"):
            counts = rates(half)
            started = time.monotonic()
            since = time.time()
            until = started + half * 60
            driver = ApiDriver(list(ports.values()), acme, acme_rooms, until, DIALOUTS)
            hooks.on_event = driver.events.put
            thread = threading.Thread(target=driver.run, daemon=True)
            thread.start()
            load = {"echo": echo_callers(cluster.sip, tmp_path, counts["echo"][0], hold_ms=ECHO_HOLD_S * 1000,
                                         rate=counts["echo"][1], tag=f"soak-{phase}-echo", extra=TRACE),
                    "rooms": room_callers(cluster.sip, tmp_path, rooms, counts["rooms"][0], counts["rooms"][1],
                                          f"soak-{phase}-rooms")}
            if BRIDGED:
                load["bridged"] = bridged_callers(cluster.sip, tmp_path, counts["bridged"][0], counts["bridged"][1],
                                                  f"soak-{phase}-bridged")
            procs += [proc for proc, _ in load.values()]
            steady_from = max(warm_end, started + ROOM_STAY_S + 20)  # CPU: once the rooms are full
            cpu_at: dict[str, float] = {}
            while time.monotonic() < until:
                samples.append(sample(sup, ports, cluster.rooms_port))
                if not cpu_at and time.monotonic() >= steady_from:
                    cpu_at, cpu_t0, machine0 = cpu_now(sup), time.monotonic(), _machine()
                time.sleep(SAMPLE_S)
            samples.append(sample(sup, ports, cluster.rooms_port))
            if cpu_at:
                cpu_end, machine1 = cpu_now(sup), _machine()
                for name, value in cpu_end.items():
                    cpu_window[name] = cpu_window.get(name, 0.0) + value - cpu_at.get(name, value)
                window += time.monotonic() - cpu_t0
                machine = (machine[0] + machine1[0] - machine0[0], machine[1] + machine1[1] - machine0[1])
            # the load stops (sipp places no more calls); everything ends and is checked
            for proc, _ in load.values():
                proc.wait(ROOM_STAY_S + 240)
            driver.stop.set()  # no more incoming: the driver removes what it still has, then returns
            thread.join(DIALOUT_HOLD_S + 120)
            total = sum(counts[k][0] for k in load) + len(driver.placed)
            phase_rows = closed(data, since, total)
            all_delivered(hooks, phase_rows, timeout=120)
            time.sleep(10)
            quiet.append(quiet_state(sup, ports, cluster.rooms_port, redis_port))
            rows += phase_rows
            for name, (_, log) in load.items():
                sipps.setdefault(name, []).append(sipp_counts(log))
            errors += driver.errors
            placed += len(driver.placed)
            bridged_calls += len(driver.bridged)
            gone_calls += len(driver.gone)
    finally:
        if driver is not None:
            driver.stop.set()
        for proc in procs:
            stop_process(proc, grace=5)
        stop_process(cluster.proc, signal.SIGINT, grace=60)
        hooks.stop()

    # -- report
    reasons: dict[str, int] = {}
    for r in rows:
        key = f"{'dial-out' if r.direction == 'outbound' else r.to_number}: {r.reason}"
        reasons[key] = reasons.get(key, 0) + 1
    failed = {name: sum(f for _, f in counts) for name, counts in sipps.items()}
    steady = [s for s in samples if s.at >= warm_end]
    names = sorted({n for s in samples for n in s.rss if n != "other"})
    print(f"\n== soak: {MINUTES:g} min in two halves, warm-up {WARMUP:g} min, `gateway run --workers 2` on "
          f"{os.cpu_count()} cores ==")
    print(f"load: {ECHO} echo calls x {ECHO_HOLD_S} s, {ROOM_CALLERS} callers in {len(rooms)} rooms x {ROOM_STAY_S} s "
          f"(IVR first), {DIALOUTS} dial-outs x {DIALOUT_HOLD_S} s, {BRIDGED} bridged API callers x {BRIDGED_HOLD_S} s")
    print(f"calls: {len(rows) - len(branches(rows))} (+{len(primed)} priming; {len(branches(rows))} Kamailio failover "
          f"branches) | sipp (ok, failed) per half: {sipps} | API: {placed} dial-outs, {bridged_calls} bridged "
          f"({gone_calls} ended before the bridge), "
          f"{len(errors)} errors {errors[:3]}")
    print(f"ended: {dict(sorted(reasons.items()))}")
    posts = sum(len(hooks.by_call.get(r.voice_id, ())) for r in rows)
    print(f"webhooks: {posts} POSTs for {sum(len(r.expected_hooks()) for r in rows)} events, all delivered in order")
    if window:
        ours = sum(v for n, v in cpu_window.items() if n != "other")
        print(f"CPU over {window / 60:.1f} min with the rooms full: ours {100 * ours / window:.0f} % of one core "
              f"({100 * ours / window / (os.cpu_count() or 1):.0f} % of the machine), machine busy "
              f"{100 * machine[0] / max(1, machine[1]):.0f} %: "
              + ", ".join(f"{n} {100 * cpu_window[n] / window:.0f} %" for n in names if n in cpu_window))
    in_room = [sum((s.health.get(w) or {}).get("janus", {}).get("legs", 0) for w in ports) for s in steady]
    active = [sum((s.health.get(w) or {}).get("active_calls", 0) for w in ports) for s in steady]
    print(f"under load after the warm-up: calls up {min(active)}-{max(active)}, in rooms {min(in_room)}-{max(in_room)}")
    print("RSS (MB)        at warm-up end -> end of load   growth   (median of 3 samples at each end)")
    growth: dict[str, float] = {}
    loaded = [s for s in steady if sum((s.health.get(w) or {}).get("active_calls", 0) for w in ports) > 0]
    for name in names:
        first = statistics.median(s.rss.get(name, 0) for s in loaded[:3]) / 1024
        last = statistics.median(s.rss.get(name, 0) for s in loaded[-3:]) / 1024
        growth[name] = 100 * (last - first) / first if first else 0.0
        print(f"  {name:12} {first:10.1f} -> {last:8.1f}   {growth[name]:+6.1f} %"
              f"{'' if growth[name] < RSS_TARGET else '   <-- above the 5 % target'}")
    print("quiet points: after priming | after the first half | after the second half | leak (second - first)")
    before, mid, after = baseline.table(), quiet[0].table(), quiet[1].table()
    for key in after:
        print(f"  {key:40} {before.get(key, 0):8} {mid.get(key, 0):8} {after[key]:8} {after[key] - mid.get(key, 0):+6}")

    # -- nothing leaked, nothing lost
    assert not errors, errors[:5]
    assert not any(failed.values()), f"sipp calls failed: {failed} (see the -trace_err files in {tmp_path})"
    end = quiet[1]
    for name in ports:
        h = end.workers[name]
        assert h["active_calls"] == 0 and h["rtp_ports_in_use"] == 0 and h["webhooks_queued"] == 0, (name, h)
        assert h["janus"]["legs"] == 0 and h["janus"]["handles"] == 0, (name, h["janus"])
        assert h["registry"]["calls"] == 0 and h["cdr"]["buffered"] == 0, (name, h)
        assert after[f"{name} asyncio tasks"] - mid[f"{name} asyncio tasks"] <= 2, "asyncio tasks leaked"
        assert after[f"{name} fds"] - mid[f"{name} fds"] <= 2, "file descriptors leaked"
    for name in ("rooms", "janus", "redis"):
        assert after[f"{name} fds"] - mid[f"{name} fds"] <= 2, f"{name}: file descriptors leaked"
    assert end.rooms["rooms"] == 0 and after["room service janus rooms"] == 0
    assert end.redis["gw:call:*"] == 0 and end.redis["gw:worker:*:calls members"] == 0 and end.redis["gw:room:*"] == 0
    assert after["redis *"] == mid["redis *"], "Redis keys leaked"
    assert after["janus threads"] - mid["janus threads"] <= 2, "Janus threads (participants) leaked"
    assert all(g < RSS_TARGET for g in growth.values()), f"RSS grew beyond {RSS_TARGET} % after the warm-up: {growth}"


def cpu_now(supervisor: int) -> dict[str, float]:
    out = {}
    for name, pids in processes(supervisor).items():
        total = 0.0
        for pid in pids:
            try:
                total += cpu_seconds(pid)
            except FileNotFoundError:
                pass
        out[name] = total
    return out


def _machine() -> tuple[int, int]:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)
