"""Measurement helpers for the rooms benchmark (tests/perf/test_bench_rooms.py): CPU of the `gateway run` process
tree from /proc, the calls in rooms from the gateway's log, the worker's event-loop lag histogram, the CDR read
straight from SQLite, sipp callers with injected meeting IDs and PINs, and click latency from a loopback capture."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gateway.media import g711
from gateway.media.rtp import RtpPacket
from tests.conftest import Gateway, free_port, stop_process
from tests.integration.ivr_tools import ivr_scenario

IVR_DID = "15550100000"
RATE = 8000


# -- CPU from /proc

def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int, name: str | None = None) -> list[int]:
    cmd = ["pgrep", "-P", str(pid)] + (["-f", name] if name else [])
    return [int(p) for p in subprocess.run(cmd, capture_output=True, text=True).stdout.split()]


def descendants(pid: int) -> list[int]:
    found = children(pid)
    for child in list(found):
        found += descendants(child)
    return found


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs from /proc/stat (iowait counts as idle)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


@dataclass
class GatewayTree:
    """The processes of one `gateway run`: the worker itself, its room service and its Janus (and anything else)."""

    worker: int
    rooms: int
    janus: int
    others: list[int]

    @classmethod
    def of(cls, gw: Gateway) -> GatewayTree:
        pid = gw.proc.pid
        rooms, janus = children(pid, "rooms serve"), children(pid, "^janus ")
        assert len(rooms) == 1 and len(janus) == 1, f"room service {rooms}, janus {janus}: expected one of each"
        others = [p for p in descendants(pid) if p not in (rooms[0], janus[0])]
        return cls(pid, rooms[0], janus[0], others)

    def cpu(self) -> dict[str, float]:
        others = 0.0
        for pid in self.others:
            try:
                others += cpu_seconds(pid)
            except FileNotFoundError:
                pass
        return {"worker": cpu_seconds(self.worker), "rooms": cpu_seconds(self.rooms),
                "janus": cpu_seconds(self.janus), "others": others}

    def pids(self) -> list[int]:
        return [self.worker, self.rooms, self.janus, *self.others]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


# -- the gateway's log: which calls are in a room

@dataclass
class CallLog:
    """Reads the gateway's JSON log incrementally: calls joined to a room, calls ended, INVITEs refused."""

    path: Path
    joined: set[str] = field(default_factory=set)
    ended: set[str] = field(default_factory=set)
    refused: Counter[str] = field(default_factory=Counter)  # by reason (admission: capacity, cpu_overload, ...)
    _offset: int = 0
    _partial: bytes = b""

    def poll(self) -> None:
        with self.path.open("rb") as f:
            f.seek(self._offset)
            data = f.read()
        self._offset += len(data)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            for event, ids in ((b'"call.joined"', self.joined), (b'"call.disconnected"', self.ended)):
                if event in line:
                    try:
                        ids.add(json.loads(line)["voice_id"])
                    except (ValueError, KeyError):
                        pass
            if b'"call.refused"' in line:
                try:
                    self.refused[str(json.loads(line).get("reason"))] += 1
                except ValueError:
                    pass

    def in_room(self) -> int:
        return len(self.joined - self.ended)


# -- the worker's event-loop lag histogram (/metrics), diffed over a window

def loop_lag_buckets(metrics: str) -> dict[float, float]:
    """Cumulative counts per upper bound (seconds) of gateway_event_loop_lag_seconds."""
    buckets: dict[float, float] = {}
    for line in metrics.splitlines():
        if line.startswith("gateway_event_loop_lag_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[math.inf if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    return buckets


def bucket_bound(before: dict[float, float], after: dict[float, float], q: float) -> float:
    """The smallest bucket bound holding the q-quantile of the samples taken between the two scrapes."""
    total = after[math.inf] - before.get(math.inf, 0.0)
    for le in sorted(after):
        if after[le] - before.get(le, 0.0) >= q * total:
            return le
    return math.inf


# -- the CDR, read-only from its SQLite file

@dataclass
class CallRecord:
    voice_id: str
    state: str
    reason: str | None
    joined_at: float | None = None
    left_at: float | None = None
    left: dict[str, int] = field(default_factory=dict)


def cdr_calls(data_dir: Path) -> list[CallRecord]:
    db = sqlite3.connect(f"file:{data_dir / 'cdr.sqlite'}?mode=ro", uri=True, timeout=10)
    try:
        calls = {vid: CallRecord(vid, state, reason)
                 for vid, state, reason in db.execute("SELECT voice_id, state, reason FROM calls")}
        for vid, ts, state, data in db.execute(
                "SELECT voice_id, ts, state, data FROM events WHERE state IN ('joined', 'left') ORDER BY id"):
            call = calls.get(vid)
            if call is None:
                continue
            if state == "joined":
                call.joined_at = ts
            else:
                call.left_at, call.left = ts, json.loads(data)
    finally:
        db.close()
    return list(calls.values())


# -- sipp callers

def ulaw(path: Path, samples: np.ndarray) -> Path:
    path.write_bytes(g711.encode("PCMU", np.clip(samples, -32000, 32000).astype(np.int16)))
    return path


def tone(path: Path, freq: float = 500.0, amplitude: float = 3000.0) -> Path:
    """One second of a tone (a whole number of periods, so it loops without a click)."""
    return ulaw(path, amplitude * np.sin(2 * np.pi * freq * np.arange(RATE) / RATE))


def silence(path: Path) -> Path:
    return ulaw(path, np.zeros(RATE))


def clicks(path: Path, at_ms: int = 500, burst_ms: int = 10, freq: float = 2000.0, amplitude: float = 12000.0) -> Path:
    """One second of silence with a short loud burst at `at_ms`: looped, a click every second."""
    samples = np.zeros(RATE)
    start, n = at_ms * RATE // 1000, burst_ms * RATE // 1000
    samples[start : start + n] = amplitude * np.sin(2 * np.pi * freq * np.arange(n) / RATE)
    return ulaw(path, samples)


def keypad(field_name: str, digits: int) -> str:
    """play_dtmf of an injected field then '#', and a pause as long as the burst (400 ms + 600 ms per key)."""
    return (f'  <nop><action><exec play_dtmf="[{field_name}]#"/></action></nop>\n'
            f'  <pause milliseconds="{600 * (digits + 1) + 800}"/>')


def caller_scenario(tmp: Path, audio: Path, meeting_digits: int, pin_digits: int, stay_ms: int) -> Path:
    """An IVR caller whose meeting ID, PIN and caller number come from the -inf CSV (field0, field1, field2); it
    streams `audio` in a loop once the PIN is typed and stays until the gateway hangs up (or `stay_ms` passes)."""
    tmp.mkdir(parents=True, exist_ok=True)
    steps = [keypad("field0", meeting_digits), keypad("field1", pin_digits),
             f'  <nop><action><exec rtp_stream="{audio},-1,0"/></action></nop>']
    return ivr_scenario(tmp, steps, caller="[field2]", end="gateway", tail=stay_ms)


def callers_csv(path: Path, rooms: list[dict], per_room: int, count: int, first_number: int) -> Path:  # type: ignore[type-arg]
    """SEQUENTIAL injection file: call i gets room i // per_room's meeting ID and PIN, and its own number."""
    lines = ["SEQUENTIAL"]
    for i in range(count):
        sip = rooms[i // per_room]["sip"]
        lines.append(f"{sip['meeting_id']};{sip['pin']};{first_number + i};")
    path.write_text("\n".join(lines) + "\n")
    return path


def start_sipp(gw: Gateway, scenario: Path, csv: Path, calls: int, rate: int, media_port: int, timeout_s: int,
               out: Path) -> subprocess.Popen[bytes]:
    """sipp placing `calls` calls at `rate` per second, all at once in flight; stopped by the caller, by PID.
    sipp 3.6.1 streams every call's RTP from one socket bound on `media_port` (and offers it in every SDP)."""
    cmd = ["sipp", gw.sip, "-sf", str(scenario), "-inf", str(csv), "-s", IVR_DID, "-i", "127.0.0.1",
           "-p", str(free_port()), "-mp", str(media_port), "-m", str(calls), "-l", str(calls), "-r", str(rate),
           "-nostdin", "-timeout", f"{timeout_s}s", "-timeout_error"]
    return subprocess.Popen(cmd, stdout=out.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def stop_sipp(proc: subprocess.Popen[bytes]) -> None:
    stop_process(proc, grace=5)


# -- click latency from a capture

def loud(payload: bytes, threshold: float = 1500.0) -> int | None:
    """Index of the first sample above `threshold` in a PCMU payload, or None."""
    samples = np.abs(g711.decode("PCMU", payload).astype(float))
    above = np.flatnonzero(samples > threshold)
    return int(above[0]) if len(above) else None


def hop(packets: list[tuple[float, int, int, bytes]], src: range, dst: range) -> list[tuple[float, bytes]]:
    """(time, PCMU payload) of the RTP packets captured from a port in `src` to a port in `dst`."""
    found = []
    for ts, sport, dport, data in packets:
        if sport in src and dport in dst:
            try:
                rtp = RtpPacket.parse(data)
            except ValueError:
                continue
            if rtp.payload_type == 0:
                found.append((ts, rtp.payload))
    return found


def trace_clicks(hops: list[list[tuple[float, bytes]]], after: float, max_delay: float = 0.9) -> list[list[float]]:
    """For each click sent on hops[0] after `after`, when it is first heard on every hop in turn: the capture time
    of the first loud packet (after the previous hop's) plus the click's sample offset in it. Clicks must be
    further apart than `max_delay`; a click not heard on every hop within `max_delay` of the previous is left out."""
    heard = [[(ts, ts + onset / RATE) for ts, payload in packets if (onset := loud(payload)) is not None]
             for packets in hops]
    traces = []
    previous = -1.0
    for ts, click in heard[0]:
        if ts < after or ts - previous < 0.1:  # before both joined, or the tail of a click split over two packets
            previous = ts
            continue
        previous = ts
        trace = [(ts, click)]
        for later in heard[1:]:
            last = trace[-1][0]
            nxt = next(((t, c) for t, c in later if last < t < last + max_delay), None)
            if nxt is None:
                break
            trace.append(nxt)
        if len(trace) == len(hops):
            traces.append([c for _, c in trace])
    return traces
