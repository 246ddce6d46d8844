"""Whom limits count against, and the failures-per-source window the SIP side, the Voice API and the room service
share."""

from __future__ import annotations

from gateway.sources import FailureWindow, source_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_auth_failures_block_a_source_for_the_rest_of_its_window() -> None:
    clock = Clock()
    f = FailureWindow(limit=3, window=60, max_sources=100, clock=clock)
    assert [f.failed("a") for _ in range(3)] == [False, False, True]  # True once: the moment to log
    assert f.blocked("a") == 60 and f.blocked("b") is None
    clock.now += 45
    assert f.blocked("a") == 15
    clock.now += 15
    assert f.blocked("a") is None and len(f) == 0  # the window is over: forgotten
    assert f.failed("a") is False


def test_auth_failures_are_bounded_whatever_the_number_of_sources() -> None:
    clock = Clock()
    f = FailureWindow(limit=5, window=60, max_sources=1000, clock=clock)
    for i in range(50_000):
        f.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(f) == 1000
    clock.now += 61
    f.failed("192.0.2.1")
    assert len(f) == 1  # expired sources go first


def test_a_blocked_key_stays_blocked_while_failures_on_other_keys_flood_the_table() -> None:
    # a guesser spread over many keys (say meeting IDs, or addresses) cannot free the key it wants to guess
    clock = Clock()
    f = FailureWindow(limit=3, window=60, max_sources=100, clock=clock)
    for _ in range(3):
        f.failed("target")
    for i in range(10_000):
        f.failed(f"other-{i}")
    assert f.blocked("target") == 60 and len(f) <= 201
    clock.now += 60
    assert f.blocked("target") is None


def test_source_keys() -> None:
    assert source_key("192.0.2.7") == "192.0.2.7"
    assert source_key("2001:db8:1:2:aaaa::1") == source_key("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert source_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_key("2001:db8:1:2:3:4:5:6%eth0") == "2001:db8:1:2::/64"
    assert source_key(None) == "?" and source_key("/run/gw.sock") == "/run/gw.sock"
    assert source_key("x" * 500) == "x" * 64


def test_no_limit_counts_nothing() -> None:
    f = FailureWindow(limit=0, window=60)
    assert f.failed("a") is False and f.blocked("a") is None and len(f) == 0
