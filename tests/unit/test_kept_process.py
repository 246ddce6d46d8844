"""KeptProcess: a helper (the room service, Redis, Kamailio) started again whenever it exits, until terminated;
a Popen's interface for its owner. A `sleep` stands in for the helper."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from gateway.cluster import supervisor
from gateway.cluster.supervisor import KeptProcess
from tests.conftest import wait_until


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"


def test_a_helper_that_dies_is_started_again_and_terminate_ends_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "RESTART_DELAY_S", 0.1)
    exits: list[tuple[str, int]] = []
    kept = KeptProcess("sleeper", ["sleep", "60"], on_exit=lambda name, code: exits.append((name, code)))
    try:
        first = kept.pid
        assert kept.poll() is None
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: kept.pid != first, 5, "the helper started again")
        assert exits == [("sleeper", -signal.SIGKILL)] and kept.restarts == 1 and kept.poll() is None
        assert alive(kept.pid)
    finally:
        second = kept.pid
        kept.terminate()
        assert kept.wait(5) == -signal.SIGTERM
    assert not alive(second) and kept.poll() == -signal.SIGTERM
    time.sleep(0.3)  # no restart after terminate
    assert kept.pid == second and len(exits) == 1


def test_a_helper_that_keeps_dying_waits_longer_each_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "RESTART_DELAY_S", 0.05)
    starts: list[float] = []
    kept = KeptProcess("crasher", ["false"], on_exit=lambda name, code: starts.append(time.monotonic()))
    try:
        wait_until(lambda: len(starts) >= 4, 10, "four exits")
    finally:
        kept.kill()
        try:
            kept.wait(5)
        except subprocess.TimeoutExpired:
            pass
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert gaps[-1] > gaps[0] * 2, gaps  # 0.1, 0.2, 0.4 ... s (doubling while it dies within 10 s)


def test_a_helper_with_children_takes_them_along(monkeypatch: pytest.MonkeyPatch) -> None:
    """Kamailio forks its workers: when its first process dies they would keep its ports (and outlive the gateway)."""
    monkeypatch.setattr(supervisor, "RESTART_DELAY_S", 0.1)
    kept = KeptProcess("forker", ["sh", "-c", "sleep 60 & echo $! ; wait"], group=True)
    try:
        first = kept.pid
        wait_until(lambda: children_of(first), 5, "the helper's child")
        (child,) = children_of(first)
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: not alive(child), 5, "the orphaned child killed with its parent")
        wait_until(lambda: kept.pid != first and children_of(kept.pid), 5, "the helper and its child started again")
        (second_child,) = children_of(kept.pid)
    finally:
        kept.terminate()
        kept.wait(5)
    wait_until(lambda: not alive(second_child), 5, "the child ended with the helper")


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]
