"""Benchmarks: N concurrent calls from sipp, each streaming audio. Prints figures; asserts only success.

Run on purpose: `make perf` (or `BENCH_CALLS=200 BENCH_SECONDS=20 .venv/bin/python -m pytest -s tests/perf`).
Figures: the gateway's CPU ms per call-second (user+system, from /proc), and the interval between
consecutive RTP packets the gateway sends on each call (p50/p99/max), measured by tshark on loopback.
- echo: the line-test DID returns the caller's audio.
- ivr: callers sit in the dial-in IVR: prompts play, every incoming frame goes through the in-band
  DTMF detector, timeouts re-prompt.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from gateway.media.rtp import RtpPacket
from tests.conftest import Gateway, run_sipp, scenario
from tests.integration.media_tools import Capture, make_signal_ulaw

CALLS = int(os.environ.get("BENCH_CALLS", "200"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "20"))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.timeout(SECONDS + 300)
def test_bench_echo_calls(gateway: Gateway, tmp_path: Path) -> None:
    bench(gateway, tmp_path, "echo", "15550100001")


@pytest.mark.timeout(SECONDS + 300)
def test_bench_ivr_calls(gateway: Gateway, tmp_path: Path) -> None:
    import time

    deadline = time.monotonic() + 60
    while '"prompts.ready"' not in gateway.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    bench(gateway, tmp_path, "ivr", "15550100000")


def bench(gateway: Gateway, tmp_path: Path, name: str, did: str) -> None:
    audio = tmp_path / "caller.ul"
    make_signal_ulaw(audio, seconds=SECONDS + 2)
    sf = scenario(tmp_path, "echo_rtp.xml", audio=str(audio), hold=str(SECONDS * 1000))
    lo, hi = gateway.rtp_range
    cap = Capture(tmp_path / "bench.pcap", f"udp and src portrange {lo}-{hi}")
    cpu0 = cpu_seconds(gateway.proc.pid)
    try:
        r = run_sipp(gateway.sip, "-sf", str(sf), "-s", did, "-m", str(CALLS), "-l", str(CALLS),
                     "-r", "50", timeout=SECONDS + 120)
    finally:
        cap.stop()
    rows = gateway.wait_calls_ended(CALLS, timeout=60)
    cpu = cpu_seconds(gateway.proc.pid) - cpu0
    assert r.returncode == 0, r.stdout[-2000:]
    call_seconds = sum(row["ended_at"] - row["answered_at"] for row in rows)

    by_stream: dict[int, list[float]] = defaultdict(list)
    for ts, src, _dst, payload in cap.udp_payloads():
        try:
            RtpPacket.parse(payload)
        except ValueError:
            continue
        by_stream[src].append(ts)
    intervals = np.concatenate([np.diff(sorted(t)) for t in by_stream.values() if len(t) > 1]) * 1000
    p50, p99, pmax = np.percentile(intervals, 50), np.percentile(intervals, 99), intervals.max()
    print(f"\n== {name} benchmark: {CALLS} concurrent calls x {SECONDS} s, sipp rtp_stream, loopback ==")
    print(f"calls completed            : {len(rows)} / {CALLS}")
    print(f"call-seconds               : {call_seconds:.0f}")
    print(f"gateway CPU                : {cpu:.2f} s  ->  {1000 * cpu / call_seconds:.2f} ms per call-second")
    print(f"RTP packets sent (captured): {sum(len(t) for t in by_stream.values())} on {len(by_stream)} streams")
    print(f"RTP send interval          : p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {pmax:.2f} ms")
    assert len(rows) == CALLS
    if name == "ivr":  # every call must have stayed in the IVR until the caller hung up
        assert all(row["reason"] == "remote_bye" for row in rows)
