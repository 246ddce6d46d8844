"""Benchmark: the worker's CPU per recorded call-second (issue 14: target <= 0.3 ms added) and the media clock's
lateness with 100 calls recorded. Echo calls from the asyncio caller of test_bench_srtp, plain RTP, first to an
echo DID of a project without recording, then to one of a project with `auto_record`; same worker, one run.

Run on purpose: `BENCH_CALLS=100 BENCH_SECONDS=20 .venv/bin/python -m pytest -q -s tests/perf/test_bench_recording.py`.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Gateway, make_test_config, start_gateway, stop_gateway
from tests.perf.test_bench_srtp import CALLS, SECONDS, run_calls

RECORDED_DID = "15550100019"
RECORDED = f"""
[[projects]]
name = "rec"
auto_record = true

[[dids]]
number = "{RECORDED_DID}"
route = "echo"
project = "rec"
"""


@pytest.fixture
def gateway_recording(tmp_path: Path) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path, make_test_config(RECORDED), {"GATEWAY_SIP_MAX_CALLS": str(CALLS * 2 + 10)})
    yield gw
    stop_gateway(gw)


def lateness(gw: Gateway) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.http_port}/healthz", timeout=5) as r:
        return json.loads(r.read()).get("media_clock", {})  # type: ignore[no-any-return]


@pytest.mark.timeout(2 * SECONDS + 300)
def test_bench_recorded_against_plain_echo_calls(gateway_recording: Gateway) -> None:
    gw = gateway_recording
    figures = {}
    for kind, did in (("plain", "15550100001"), ("recorded", RECORDED_DID)):
        cpu, call_seconds, legs = asyncio.run(run_calls(gw, "127.0.0.1", False, did))
        assert all(leg.received > SECONDS * 40 for leg in legs), [leg.received for leg in legs][:10]
        figures[kind] = cpu * 1000 / call_seconds
        print(f"\nBENCH recording {kind}: {CALLS} echo calls x {SECONDS} s: {cpu:.2f} s CPU, "
              f"{figures[kind]:.2f} ms CPU per call-second; media clock {lateness(gw)}")
    rows = gw.wait_calls_ended(2 * CALLS, timeout=60)
    recorded = [r for r in rows if r["did"] == RECORDED_DID]
    assert len(recorded) == CALLS
    files = list((gw.data_dir / "recordings" / "rec").glob("*.wav"))
    assert len(files) == CALLS, len(files)
    print(f"BENCH recording: +{figures['recorded'] - figures['plain']:.2f} ms CPU per recorded call-second "
          f"(target <= 0.3), {sum(f.stat().st_size for f in files) / 1e6:.0f} MB written")
