"""Benchmark: phone callers bridged into one room through the embedded room service. Prints figures.

BENCH_BRIDGE_CALLS (default 20) callers enter the room's meeting ID and PIN, then stream a tone for
BENCH_BRIDGE_SECONDS (default 60). Printed: CPU ms per bridged call-second for the gateway worker and for the
room service (separate processes), the worker's media-clock lateness p50/p99, and per call the room-to-caller
FIFO underruns and frames dropped (drift: frames dropped minus underruns, times 20 ms, over the call).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gateway.media import g711
from tests.conftest import Gateway, make_test_config, run_sipp, start_gateway, stop_gateway, wait_until
from tests.integration.ivr_tools import ivr_scenario, rfc4733
from tests.integration.test_bridge import api

CALLS = int(os.environ.get("BENCH_BRIDGE_CALLS", "20"))
SECONDS = int(os.environ.get("BENCH_BRIDGE_SECONDS", "60"))


def cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def room_service_pid(gw: Gateway) -> int:
    out = subprocess.run(["pgrep", "-P", str(gw.proc.pid), "-f", "rooms serve"], capture_output=True, text=True)
    return int(out.stdout.split()[0])


@pytest.mark.timeout(SECONDS + 400)
def test_bench_bridged_calls(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, make_test_config())
    try:
        wait_until(lambda: '"prompts.ready"' in gw.log() and '"rooms.started"' in gw.log(), 60, "ready")
        _, room = api(gw, "POST", "/video/v1/rooms", {"name": "bench", "settings": {"sip": {"enabled": True}}})
        tone = tmp_path / "tone.ul"
        tone.write_bytes(g711.encode("PCMU", (4000 * np.sin(2 * np.pi * 500 * np.arange(8000 * 10) / 8000)).astype(np.int16)))
        steps = [rfc4733(room["sip"]["meeting_id"] + "#"), rfc4733(room["sip"]["pin"] + "#"),
                 f'  <nop><action><exec rtp_stream="{tone},-1,0"/></action></nop>', f'  <pause milliseconds="{SECONDS * 1000}"/>']
        sf = ivr_scenario(tmp_path, steps, tail=0)
        rooms_pid = room_service_pid(gw)
        gw_cpu0, rs_cpu0 = cpu(gw.proc.pid), cpu(rooms_pid)
        r = run_sipp(gw.sip, "-sf", str(sf), "-s", "15550100000", "-m", str(CALLS), "-l", str(CALLS), "-r", "5",
                     timeout=SECONDS + 180)
        health = gw.http_get("/healthz")[1]
        gw_cpu, rs_cpu = cpu(gw.proc.pid) - gw_cpu0, cpu(rooms_pid) - rs_cpu0
        rows = gw.wait_calls_ended(CALLS, timeout=60)
        assert r.returncode == 0, r.stdout[-2000:]
        bridged = 0.0
        drift = []
        for row in rows:
            evs = gw.cdr(row["voice_id"])["events"]
            joined = next(e["ts"] for e in evs if e["state"] == "joined")
            left = next(e for e in evs if e["state"] == "left")
            bridged += left["ts"] - joined
            drift.append(((left["dropped"] - left["underruns"]) * 20, left["underruns"], left["dropped"], left["ts"] - joined))
        lat = health["media_clock"]["lateness"]
        print(f"\n== bridge benchmark: {CALLS} callers in one room x {SECONDS} s bridged, loopback ==")
        print(f"bridged call-seconds        : {bridged:.0f}")
        print(f"gateway worker CPU          : {1000 * gw_cpu / bridged:.2f} ms per bridged call-second (whole call incl. IVR)")
        print(f"room service CPU            : {1000 * rs_cpu / bridged:.2f} ms per bridged call-second")
        print(f"media clock lateness        : p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms, max {lat['max_ms']} ms; "
              f"skipped ticks {health['media_clock']['skipped']}")
        worst = max(drift, key=lambda d: abs(d[0]))
        print(f"room->caller FIFO per call  : underruns max {max(d[1] for d in drift)}, dropped max {max(d[2] for d in drift)}; "
              f"worst drift {worst[0]} ms over {worst[3]:.0f} s")
        assert len(rows) == CALLS
    finally:
        stop_gateway(gw)
