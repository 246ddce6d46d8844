"""Benchmark: sustained call rate through Kamailio with 1 and with 2 workers. Prints figures; asserts only
that the lowest rate step passes.

Run on purpose: `make perf`, or
    BENCH_CLUSTER_RATES=20,40,80,120 BENCH_CLUSTER_STEP_S=10 BENCH_CLUSTER_HOLD_MS=2000 \\
        .venv/bin/python -m pytest -s tests/perf/test_bench_cluster.py
For each worker count, `gateway run --workers N` (Redis, Kamailio, N workers) takes sipp calls at each rate
in turn (each call streams audio for HOLD ms to the echo DID, honouring Record-Route); the highest rate with
zero failed calls is the sustained rate. CPU is the user+system time of the worker processes (from /proc),
per call-second of the steps that passed. sipp, Kamailio and Redis share the same cores.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest

from tests.conftest import stop_process
from tests.integration.test_cluster import ECHO_DID, Cluster, start_cluster
from tests.perf.test_bench_calls import cpu_seconds

RATES = [int(r) for r in os.environ.get("BENCH_CLUSTER_RATES", "50,100,125,150,175,200,225,250,275,300").split(",")]
STEP_S = int(os.environ.get("BENCH_CLUSTER_STEP_S", "10"))
HOLD_MS = int(os.environ.get("BENCH_CLUSTER_HOLD_MS", "2000"))


def worker_cpu(cluster: Cluster) -> float:
    total = 0.0
    for info in (cluster.data / "workers").glob("w*.json"):
        try:
            total += cpu_seconds(int(json.loads(info.read_text())["pid"]))
        except (OSError, ValueError):
            pass
    return total


def run_steps(tmp: Path, workers: int) -> dict[str, float]:
    tmp.mkdir(parents=True, exist_ok=True)
    cluster = start_cluster(tmp, workers=workers, env={"GATEWAY_SIP_MAX_CALLS": "2000"})
    sustained, cpu, call_seconds = 0, 0.0, 0.0
    try:
        for rate in RATES:
            calls = rate * STEP_S
            before = worker_cpu(cluster)
            r = cluster.sipp_routes(calls, rate, HOLD_MS, did=ECHO_DID, timeout=STEP_S + HOLD_MS // 1000 + 120,
                                    tag=f"{workers}-{rate}")
            used = worker_cpu(cluster) - before
            failed = re.search(r"Failed call\s*\|\s*\d+\s*\|\s*(\d+)", r.stdout)
            failures = int(failed.group(1)) if failed else (0 if r.returncode == 0 else calls)
            print(f"  {workers} worker(s), {rate:4d} calls/s x {STEP_S} s: {calls - failures}/{calls} ok, "
                  f"worker CPU {used:.2f} s")
            if failures or r.returncode != 0:
                break
            sustained = rate
            cpu += used
            call_seconds += calls * HOLD_MS / 1000
    finally:
        stop_process(cluster.proc, signal.SIGINT, grace=30)
    return {"rate": sustained, "cpu_ms": 1000 * cpu / call_seconds if call_seconds else float("nan")}


@pytest.mark.timeout(1800)
def test_bench_cluster_one_and_two_workers(tmp_path: Path) -> None:
    print(f"\n== cluster benchmark: echo calls of {HOLD_MS} ms with RTP through Kamailio, rates {RATES} ==")
    one = run_steps(tmp_path / "one", 1)
    two = run_steps(tmp_path / "two", 2)
    print(f"1 worker : sustained {one['rate']} calls/s with zero failures, {one['cpu_ms']:.2f} ms CPU per call-second")
    print(f"2 workers: sustained {two['rate']} calls/s with zero failures, {two['cpu_ms']:.2f} ms CPU per call-second")
    print(f"ratio 2/1: {two['rate'] / one['rate'] if one['rate'] else float('nan'):.2f}x sustained rate")
    assert one["rate"] >= RATES[0] and two["rate"] >= RATES[0]
