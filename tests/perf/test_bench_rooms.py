"""Benchmark: phones in rooms whose media is on Janus. Prints figures; asserts only that it could measure them.

Run on purpose, on an otherwise idle machine (the figures include the load line of /proc/loadavg):

    BENCH_ROOMS_CALLS=20,50 BENCH_ROOMS_SECONDS=30 \\
        .venv/bin/python -m pytest -q -s -p no:cacheprovider tests/perf/test_bench_rooms.py

Load steps (BENCH_ROOMS_CALLS, default 20,50,100,200): for each N a fresh `gateway run` (the worker, its room
service and its managed Janus), N/10 rooms made through the Video API, and one sipp placing N callers at
BENCH_ROOMS_RATE per second (default 5); each caller types its room's meeting ID and PIN (injected from a CSV),
then streams a 500 Hz tone until the gateway hangs up. Once every call is in its room (or has failed), a steady
window of BENCH_ROOMS_SECONDS (default 30) measures:
- CPU (user + system, /proc) of the worker, the room service and Janus, each and together, per bridged
  call-second (the calls in a room, integrated over the window);
- the worker's media-clock lateness (/healthz: percentiles of every tick since the gateway started, so the IVR
  ramp is included), the ticks it skipped in the window, and the window's event-loop lag (/metrics histogram,
  diffed: the bucket bound holding p50 / p99);
- the whole machine's CPU use and sipp's, to tell a saturated box from a slow gateway.
Then the rooms are deleted (the gateway hangs every caller up) and the CDR `left` events give the RTP counters.

Latency step (BENCH_ROOMS_PREBUFFER, default "1" = the product's `[janus] prebuffer`; a comma list compares):
two phones in one room, A streams silence with a 10 ms 2 kHz burst every second, B streams silence; tshark on
loopback records A's packets to the worker, the worker's to Janus (A's leg), Janus's to the worker (B's leg) and
the worker's to B. A click's latency is the time from its packet leaving A to its first loud packet reaching B
(plus the click's sample offset in each packet): phone -> worker -> AudioBridge -> worker -> phone, without the
phones' own jitter buffers; the same on each hop shows where the time goes.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Gateway, make_test_config, start_gateway, stop_gateway, wait_until
from tests.integration.media_tools import Capture
from tests.integration.test_bridge import api
from tests.perf.rooms_tools import (
    CallLog,
    CallRecord,
    GatewayTree,
    alive,
    bucket_bound,
    caller_scenario,
    callers_csv,
    cdr_calls,
    clicks,
    cpu_seconds,
    hop,
    load_average,
    loop_lag_buckets,
    machine_jiffies,
    silence,
    start_sipp,
    stop_sipp,
    tone,
    trace_clicks,
)

CALLS = [int(n) for n in os.environ.get("BENCH_ROOMS_CALLS", "20,50,100,200").split(",") if n.strip()]
SECONDS = int(os.environ.get("BENCH_ROOMS_SECONDS", "30"))
RATE = int(os.environ.get("BENCH_ROOMS_RATE", "5"))
PREBUFFERS = [int(p) for p in os.environ.get("BENCH_ROOMS_PREBUFFER", "1").split(",") if p.strip()]
ROOM_SIZE = 10
CLICKS = 10
# Janus's ports (WebRTC and the AudioBridge's plain-RTP participants share `rtp_port_range`; one even port per
# phone): 500 even ports, above the ephemeral range (32768-60999 here), free_port() (< 60000) and the worker's
# range (start_gateway: 1200 ports from 30000-58000, 2 even ports per bridged call: the call's and the leg's).
JANUS_RTP = (61000, 61999)
SIPP_MEDIA = 62000  # sipp 3.6.1 streams every call's RTP from this one port (latency callers: +0 and +100)
JOIN_SLACK_S = 45  # beyond the ramp (N / RATE): the IVR takes ~12 s per caller
STEP_OVERHEAD_S = 300  # start, join slack, hang-up, CDR, stop: the bound of one step beyond ramp and window
LATENCY_STEP_S = 200
TIMEOUT_S = sum(n // RATE + SECONDS + STEP_OVERHEAD_S for n in CALLS) + LATENCY_STEP_S * len(PREBUFFERS)


@dataclass
class LoadResult:
    calls: int
    rooms: int
    load_before: str = ""
    load_after: str = ""
    joined: int = 0
    in_room: tuple[int, int] = (0, 0)  # at the window's start and end
    call_seconds: float = 0.0
    window_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds in the window, per process
    sipp_cpu: float = 0.0
    machine_busy: float = 0.0  # fraction of all cores
    others_busy: float = 0.0  # fraction of all cores used by processes neither ours nor sipp (other work)
    lateness: dict[str, float] = field(default_factory=dict)  # /healthz at the window's end (since start)
    ramp_p99: float = 0.0  # /healthz p99 at the window's start (start and IVR ramp only)
    window_max_ms: str = ""
    skipped: int = 0
    lag_p50: float = 0.0
    lag_p99: float = 0.0
    underruns: tuple[int, int] = (0, 0)  # sum, max per call
    room_lost: int = 0
    to_room_pps: float = 0.0
    from_room_pps: float = 0.0
    no_left_event: int = 0  # calls that joined but have no `left` event in the CDR
    fail_reasons: dict[str, int] = field(default_factory=dict)  # CDR reason of the calls that never joined
    notes: list[str] = field(default_factory=list)
    error: str = ""

    @property
    def failed(self) -> int:
        return self.calls - self.joined

    def ms(self, *roles: str) -> float:
        return 1000 * sum(self.cpu.get(r, 0.0) for r in roles) / self.call_seconds if self.call_seconds else math.nan


@dataclass
class LatencyResult:
    prebuffer: int
    traces: list[list[float]] = field(default_factory=list)  # per click: heard at A->gw, gw->Janus, Janus->gw, gw->B
    error: str = ""

    def hop_ms(self, first: int, last: int) -> list[float]:
        return sorted(1000 * (t[last] - t[first]) for t in self.traces)


def janus_ports(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {"GATEWAY_JANUS_RTP_PORT_MIN": str(JANUS_RTP[0]), "GATEWAY_JANUS_RTP_PORT_MAX": str(JANUS_RTP[1]),
            **(extra or {})}


def bench_config() -> str:
    """The test config with the loopback trunk trusted for caller numbers: one sipp is one source address carrying
    every caller, like a carrier trunk, and per-source PIN limits would refuse the callers beyond the limit."""
    config = make_test_config()
    trunk = '[[trunks]]\nname = "local"\n'
    assert trunk in config, "the shipped config's loopback trunk moved: update bench_config()"
    return config.replace(trunk, trunk + "trust_id_inbound = true\n", 1)


def start(tmp: Path, env: dict[str, str]) -> Gateway:
    tmp.mkdir(parents=True, exist_ok=True)
    gw = start_gateway(tmp, bench_config(), env)
    try:
        wait_until(lambda: all(f'"{e}"' in gw.log() for e in ("prompts.ready", "rooms.started", "janus.started")),
                   90, "prompts, the room service and Janus")
    except AssertionError:
        stop_gateway(gw)
        raise
    return gw


def stop(gw: Gateway, tree: GatewayTree | None) -> None:
    """Stop the gateway; its room service and Janus die with it (checked, else ended by their PID)."""
    stop_gateway(gw)
    if tree is None:
        return
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in tree.pids()):
        time.sleep(0.1)
    for pid in tree.pids():
        if alive(pid):
            os.kill(pid, 9)


def create_room(gw: Gateway, name: str) -> dict[str, Any]:
    status, room = api(gw, "POST", "/video/v1/rooms", {"name": name, "settings": {"sip": {"enabled": True}}})
    assert status in (200, 201), (status, room)
    return room  # type: ignore[no-any-return]


def delete_rooms(gw: Gateway, rooms: list[dict[str, Any]]) -> None:
    for room in rooms:
        api(gw, "DELETE", f"/video/v1/rooms/{room['room_id']}")


def worker_state(gw: Gateway, timeout: float = 30) -> tuple[dict[str, Any], dict[float, float]] | None:
    """The media clock (/healthz) and the event-loop lag histogram (/metrics); None when the worker does not answer
    within `timeout` (an overloaded event loop)."""
    base = f"http://127.0.0.1:{gw.http_port}"
    try:
        with urllib.request.urlopen(f"{base}/healthz", timeout=timeout) as r:
            clock = json.loads(r.read())["media_clock"]
        with urllib.request.urlopen(f"{base}/metrics", timeout=timeout) as r:
            return clock, loop_lag_buckets(r.read().decode())
    except OSError:
        return None


def wait_cdr(gw: Gateway, count: int, timeout: float = 60, left_grace: float = 20) -> list[CallRecord]:
    """Every call of the step ended in the CDR (`count` of them, or fewer if sipp could not place some), then, for
    at most `left_grace` seconds, every call that joined has its `left` event (written after `disconnected`)."""
    def ended() -> list[CallRecord] | None:
        rows = cdr_calls(gw.data_dir)
        return rows if rows and all(r.state == "disconnected" for r in rows) else None

    rows: list[CallRecord] = wait_until(ended, timeout, "the calls to end in the CDR", interval=0.5)
    deadline = time.monotonic() + left_grace
    while any(r.joined_at is not None and r.left_at is None for r in rows) and time.monotonic() < deadline:
        time.sleep(0.5)
        rows = cdr_calls(gw.data_dir)
    return rows


def measure_window(gw: Gateway, tree: GatewayTree, sipp_pid: int, log: CallLog, result: LoadResult) -> None:
    """The steady window: CPU of each process and of the machine, the calls in a room integrated over time, the
    media clock and the event-loop lag before and after."""
    before = worker_state(gw)
    cpu0, sipp0, busy0 = tree.cpu(), cpu_seconds(sipp_pid), machine_jiffies()
    t0 = last = time.monotonic()
    in_room_start = log.in_room()
    while last < t0 + SECONDS:
        time.sleep(min(0.5, t0 + SECONDS - last))
        log.poll()
        now = time.monotonic()
        result.call_seconds += log.in_room() * (now - last)
        last = now
    cpu1, sipp1, busy1 = tree.cpu(), cpu_seconds(sipp_pid), machine_jiffies()
    after = worker_state(gw)
    result.load_after = load_average()
    assert tree.janus in GatewayTree.of(gw).pids(), "Janus restarted during the window"
    result.window_s = last - t0
    result.in_room = (in_room_start, log.in_room())
    result.cpu = {k: cpu1[k] - cpu0[k] for k in cpu0}
    result.sipp_cpu = sipp1 - sipp0
    result.machine_busy = (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
    ours = sum(result.cpu.values()) + result.sipp_cpu
    result.others_busy = max(0.0, result.machine_busy - ours / (result.window_s * (os.cpu_count() or 1)))
    if before is None or after is None:
        result.notes.append(f"the worker's /healthz or /metrics did not answer within 30 s at the window's "
                            f"{'start' if before is None else 'end'}: no media-clock figures")
        return
    (clock0, lag0), (clock1, lag1) = before, after
    result.lateness, result.ramp_p99 = clock1["lateness"], clock0["lateness"].get("p99_ms", 0.0)
    before_max, after_max = clock0["lateness"].get("max_ms", 0.0), clock1["lateness"].get("max_ms", 0.0)
    result.window_max_ms = f"{after_max:.0f}" if after_max > before_max else f"<={before_max:.0f}"
    result.skipped = clock1["skipped"] - clock0["skipped"]
    result.lag_p50, result.lag_p99 = bucket_bound(lag0, lag1, 0.5), bucket_bound(lag0, lag1, 0.99)


def add_cdr_counters(result: LoadResult, records: list[CallRecord], log: CallLog) -> None:
    """Who joined, why the others did not (CDR reason, or the INVITE refused), and the `left` events' RTP counters
    (from joined to left)."""
    in_room = [r for r in records if r.joined_at is not None]
    result.joined = len(in_room)
    result.fail_reasons = dict(Counter(str(r.reason) for r in records if r.joined_at is None))
    log.poll()
    for reason, count in log.refused.items():
        result.fail_reasons[f"INVITE refused: {reason}"] = count
    unaccounted = result.calls - len(records) - sum(log.refused.values())
    if unaccounted > 0:
        result.fail_reasons["never reached the gateway"] = unaccounted
    left = [r for r in in_room if r.left_at is not None]
    result.no_left_event = len(in_room) - len(left)
    seconds = sum((r.left_at or 0.0) - (r.joined_at or 0.0) for r in left)
    underruns = [r.left.get("underruns", 0) for r in left]
    result.underruns = (sum(underruns), max(underruns, default=0))
    result.room_lost = sum(r.left.get("room_lost", 0) for r in left)
    result.to_room_pps = sum(r.left.get("rtp_to_room", 0) for r in left) / seconds if seconds else 0.0
    result.from_room_pps = sum(r.left.get("rtp_from_room", 0) for r in left) / seconds if seconds else 0.0


def run_load_step(tmp: Path, n: int) -> LoadResult:
    rooms_count = math.ceil(n / ROOM_SIZE)
    result = LoadResult(n, rooms_count, load_before=load_average())
    gw = start(tmp, janus_ports())
    tree: GatewayTree | None = None
    sipp = None
    try:
        tree = GatewayTree.of(gw)
        rooms = [create_room(gw, f"bench-{i}") for i in range(rooms_count)]
        sip = rooms[0]["sip"]
        stay_s = n // RATE + JOIN_SLACK_S + SECONDS + 120  # callers wait for the gateway's BYE at most this long
        scenario = caller_scenario(tmp / "sipp", tone(tmp / "tone.ul"), len(sip["meeting_id"]), len(sip["pin"]),
                                   stay_s * 1000)
        csv = callers_csv(tmp / "callers.csv", rooms, ROOM_SIZE, n, 15551000000)
        log = CallLog(gw.log_path)
        sipp = start_sipp(gw, scenario, csv, n, RATE, SIPP_MEDIA, stay_s + 30, tmp / "sipp.out")

        # the ramp: until every call is in its room or has ended (or the ramp's bound)
        deadline = time.monotonic() + n / RATE + JOIN_SLACK_S
        while time.monotonic() < deadline and sipp.poll() is None:
            log.poll()
            if len(log.joined | log.ended) >= n:
                break
            time.sleep(0.5)
        assert log.in_room() > 0, f"no call in a room; sipp: {(tmp / 'sipp.out').read_text()[-1500:]}"

        measure_window(gw, tree, sipp.pid, log, result)

        # hang up: deleting the rooms makes the gateway say goodbye and BYE every caller
        delete_rooms(gw, rooms)
        sipp.wait(90)
        records = wait_cdr(gw, n)
        add_cdr_counters(result, records, log)
    finally:
        if sipp is not None:
            stop_sipp(sipp)
        stop(gw, tree)
    return result


def run_latency_step(tmp: Path, prebuffer: int) -> LatencyResult:
    result = LatencyResult(prebuffer)
    gw = start(tmp, janus_ports({"GATEWAY_JANUS_PREBUFFER": str(prebuffer)}))
    tree: GatewayTree | None = None
    sipps = []
    capture = None
    try:
        tree = GatewayTree.of(gw)
        room = create_room(gw, "latency")
        sip = room["sip"]
        ports = (SIPP_MEDIA, SIPP_MEDIA + 100)
        capture = Capture(tmp / "latency.pcap", f"udp and (port {ports[0]} or port {ports[1]} or "
                                                f"portrange {JANUS_RTP[0]}-{JANUS_RTP[1]})")
        log = CallLog(gw.log_path)
        for i, (name, audio) in enumerate((("a", clicks(tmp / "clicks.ul")), ("b", silence(tmp / "silence.ul")))):
            scenario = caller_scenario(tmp / name, audio, len(sip["meeting_id"]), len(sip["pin"]), 120_000)
            csv = callers_csv(tmp / f"{name}.csv", [room], 1, 1, 15552000001 + i)
            sipps.append(start_sipp(gw, scenario, csv, 1, 1, ports[i], 150, tmp / f"sipp-{name}.out"))

        def both_joined() -> bool:
            log.poll()
            return len(log.joined) >= 2

        wait_until(both_joined, 60, "both phones in the room")
        time.sleep(CLICKS + 1.5)  # the measurement: a click a second
        delete_rooms(gw, [room])
        for proc in sipps:
            proc.wait(30)
        capture.stop()
        records = wait_cdr(gw, 2)
        joined = [r.joined_at for r in records if r.joined_at is not None]
        assert len(joined) == 2, records
        after = max(joined) + 1.0  # the bridge is set up just after `joined`
        packets = capture.udp_payloads()
        gateway, janus = range(gw.rtp_range[0], gw.rtp_range[1] + 1), range(JANUS_RTP[0], JANUS_RTP[1] + 1)
        a, b = range(ports[0], ports[0] + 1), range(ports[1], ports[1] + 1)
        # A -> worker, worker (A's leg) -> Janus, Janus -> worker (B's leg: A hears only B's silence), worker -> B
        hops = [hop(packets, a, gateway), hop(packets, gateway, janus), hop(packets, janus, gateway),
                hop(packets, gateway, b)]
        result.traces = trace_clicks(hops, after)
    finally:
        for proc in sipps:
            stop_sipp(proc)
        if capture is not None:
            capture.stop()
        stop(gw, tree)
    return result


def print_report(loads: list[LoadResult], latencies: list[LatencyResult]) -> None:
    print(f"\n== rooms on Janus: phones in rooms of {ROOM_SIZE}, each streaming a 500 Hz tone; {SECONDS} s steady "
          f"window per step; callers placed at {RATE}/s; loopback, {os.cpu_count()} cores ==")
    print("                                              | CPU ms per bridged call-second | window: all cores busy, of "
          "which | sipp")
    print(" calls rooms joined failed in-room(start/end) | worker  rooms  janus  total | machine  other work | "
          "(1 core) | load 1/5/15 min before -> after")
    for r in loads:
        if r.error:
            print(f" {r.calls:5d} {r.rooms:5d}  FAILED: {r.error}")
            continue
        print(f" {r.calls:5d} {r.rooms:5d} {r.joined:6d} {r.failed:6d} {r.in_room[0]:8d}/{r.in_room[1]:<8d} |"
              f" {r.ms('worker'):6.2f} {r.ms('rooms'):6.2f} {r.ms('janus'):6.2f}"
              f" {r.ms('worker', 'rooms', 'janus', 'others'):6.2f} |"
              f" {100 * r.machine_busy:5.0f} %  {100 * r.others_busy:7.0f} % | {100 * r.sipp_cpu / r.window_s:5.0f} % |"
              f" {r.load_before} -> {r.load_after}")
    print("\nmedia: worker clock lateness ms (/healthz: every tick since start) | window only              | "
          "CDR `left`, per call joined -> left")
    print(" calls |  p50    p99    max  p99@ramp  max@window | skipped loop-lag p50/p99 | to room  from room "
          "underruns sum/max  room_lost")
    for r in loads:
        if r.error:
            continue
        lat = r.lateness
        clock = (f"{lat.get('p50_ms', 0):5.1f} {lat.get('p99_ms', 0):6.1f} {lat.get('max_ms', 0):6.1f}"
                 f" {r.ramp_p99:8.1f} {r.window_max_ms:>11} | {r.skipped:7d}  <={1000 * r.lag_p50:g}/<={1000 * r.lag_p99:g} ms"
                 if lat else f"{'n/a (see below)':39s} | {'n/a':24s}")
        print(f" {r.calls:5d} | {clock} | {r.to_room_pps:5.1f}/s  {r.from_room_pps:5.1f}/s"
              f" {r.underruns[0]:10d}/{r.underruns[1]:<6d} {r.room_lost:6d}")
    for r in loads:
        if r.fail_reasons or r.no_left_event:
            print(f" {r.calls} calls: never joined, by CDR reason: {r.fail_reasons}; joined without a `left` event: "
                  f"{r.no_left_event}")
        for note in r.notes:
            print(f" {r.calls} calls: {note}")
    print("\nphone -> room -> phone latency: a click from caller A's packet to caller B's, on loopback; median "
          "(min-max) ms over the clicks, and per hop")
    print(" [janus] prebuffer | clicks | A -> B total        | worker in (A -> Janus) | Janus (mix) | worker out "
          "(Janus -> B)")
    for lr in latencies:
        if lr.error or not lr.traces:
            print(f" {lr.prebuffer:17d} | FAILED: {lr.error or 'no click heard at B'}")
            continue
        cells = [f"{statistics.median(ms):5.1f} ({min(ms):.0f}-{max(ms):.0f})"
                 for ms in (lr.hop_ms(0, 3), lr.hop_ms(0, 1), lr.hop_ms(1, 2), lr.hop_ms(2, 3))]
        print(f" {lr.prebuffer:17d} | {len(lr.traces):6d} | {cells[0]:19s} | {cells[1]:22s} | {cells[2]:11s} | {cells[3]}")
        print(f"{'':20s}each click, total ms: {' '.join(f'{ms:.0f}' for ms in lr.hop_ms(0, 3))}")


@pytest.mark.perf
@pytest.mark.timeout(TIMEOUT_S)
def test_bench_rooms_on_janus(tmp_path: Path) -> None:
    loads: list[LoadResult] = []
    latencies: list[LatencyResult] = []
    for i, n in enumerate(CALLS):
        try:
            loads.append(run_load_step(tmp_path / f"load-{i}-{n}", n))
        except Exception as exc:  # report the step and go on with the next one
            loads.append(LoadResult(n, math.ceil(n / ROOM_SIZE), error=f"{type(exc).__name__}: {exc}"[:300]))
        r = loads[-1]
        print(f"\n[{n} calls: {r.error or f'{r.joined} joined, total {r.ms(*r.cpu):.2f} ms CPU per call-second'}]")
    for i, prebuffer in enumerate(PREBUFFERS):
        try:
            latencies.append(run_latency_step(tmp_path / f"latency-{i}-{prebuffer}", prebuffer))
        except Exception as exc:
            latencies.append(LatencyResult(prebuffer, error=f"{type(exc).__name__}: {exc}"[:300]))
    print_report(loads, latencies)
    assert not [r.error for r in loads if r.error], "a load step failed: see the report"
    assert all(len(lr.traces) >= CLICKS // 2 for lr in latencies), "too few clicks heard: see the report"
