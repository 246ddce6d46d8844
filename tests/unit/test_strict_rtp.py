"""Strict RTP's state machine (`media.strict_rtp.SourceGuard`) and the random RTP port allocator, without sockets."""

from __future__ import annotations

from itertools import pairwise

import pytest

from gateway.adapters.ports import PortAllocator, PortsExhausted
from gateway.media.strict_rtp import LEARNING, LOCKED, SourceGuard, normalize

SDP = ("127.0.0.1", 40000)
NAT = ("127.0.0.1", 41234)  # where a NAT'd caller's packets really come from
EVIL = ("127.0.0.2", 50000)


def guard(window: float = 2.0, probation: int = 4, expected: tuple[str, int] | None = SDP) -> SourceGuard:
    g = SourceGuard(window, probation)
    g.learn(expected, now=0.0)
    return g


def stream(g: SourceGuard, source: tuple[str, int], ssrc: int, first_seq: int, count: int, now: float = 0.1) -> list[str]:
    return [g.check(source, ssrc, (first_seq + i) & 0xFFFF, now + i * 0.02) for i in range(count)]


def test_the_sdp_address_locks_at_its_first_packet_and_strangers_are_dropped() -> None:
    g = guard()
    assert g.check(SDP, 1, 100, 0.1) == "" and g.state == LOCKED and g.source == SDP
    assert stream(g, EVIL, 9, 1, 20) == ["source"] * 20, "a locked port drops every other address, in sequence or not"
    assert g.check(("127.0.0.1", 40002), 1, 101, 0.5) == "source", "the port is part of the lock"
    assert g.check(SDP, 1, 101, 0.6) == "" and g.target == SDP
    assert g.events[0] == ("locked", {"source": SDP, "how": "sdp", "confirmed": True})


def test_nat_caller_latched_after_packets_in_sequence_within_the_window() -> None:
    g = guard()
    assert stream(g, NAT, 7, 65534, 3) == ["source"] * 3, "on probation: not yet"
    assert g.check(NAT, 7, 1, 0.2) == "", "the 4th consecutive packet (across the wrap) latches"
    assert g.state == LEARNING and g.source == NAT and g.target == NAT
    assert stream(g, EVIL, 9, 1, 10) == ["source"] * 10, "the first valid source is the one latched"
    assert g.expire(2.0) and g.state == LOCKED and g.source == NAT
    assert g.check(NAT, 7, 2, 2.1) == ""


def test_probation_restarts_on_a_gap_or_another_ssrc() -> None:
    g = guard()
    assert stream(g, NAT, 7, 10, 3) == ["source"] * 3
    assert g.check(NAT, 7, 20, 0.2) == "source", "a gap starts over"
    assert g.check(NAT, 8, 21, 0.2) == "ssrc", "one address+port+SSRC must make the sequence"
    assert stream(g, NAT, 8, 22, 3) == ["source"] * 2 + [""]


def test_the_sdp_address_takes_over_a_latched_source_within_the_window_only() -> None:
    g = guard()
    stream(g, EVIL, 9, 1, 4)
    assert g.source == EVIL, "an attacker can latch onto a silent caller's port within the window (Asterisk too)"
    assert g.check(SDP, 1, 500, 0.5) == "" and g.state == LOCKED and g.source == SDP
    assert g.check(EVIL, 9, 5, 0.6) == "source"
    late = guard()
    late.expire(2.0)
    assert late.source == SDP and late.state == LOCKED, "a silent window locks onto the SDP address"
    assert stream(late, EVIL, 9, 1, 50, now=2.1) == ["source"] * 50, "after the window nobody latches"
    assert late.check(SDP, 1, 1, 3.0) == ""


def test_ssrc_change_from_the_locked_source_is_a_new_stream() -> None:
    g = guard()
    assert g.check(SDP, 1, 100, 0.1) == ""
    assert g.check(SDP, 2, 7, 0.2) == "" and g.ssrc == 2 and g.ssrc_changes == 1, "sipp: a new SSRC per DTMF burst"
    assert [g.check(SDP, s, 8 + i, 0.3) for i, s in enumerate([1, 2, 1, 2])] == [""] * 4
    assert g.ssrc_changes == 1, "two interleaved streams (audio + a DTMF burst) are not a change per packet"
    assert g.check(EVIL, 2, 9, 0.4) == "source", "the SSRC alone opens nothing"


def test_signalling_reopens_learning_and_no_sdp_address_latches_nothing() -> None:
    g = guard()
    g.check(SDP, 1, 1, 0.1)
    moved = ("127.0.0.1", 40100)
    assert g.check(moved, 1, 2, 5.0) == "source"
    g.learn(moved, now=5.0)  # re-INVITE with the new port
    assert g.check(moved, 3, 1, 5.1) == "" and g.source == moved
    assert g.check(SDP, 1, 3, 5.2) == "source", "the old source is gone with the old SDP"
    none = guard(expected=None)  # INVITE without SDP (answer in the ACK), or c=0.0.0.0
    assert stream(none, NAT, 7, 1, 10) == ["source"] * 10 and none.source is None and none.target is None
    none.expire(2.0)
    assert none.check(NAT, 7, 11, 2.1) == "source"


def test_normalize() -> None:
    assert normalize("0.0.0.0", 4000) is None and normalize("127.0.0.1", 0) is None
    assert normalize("0:0:0:0:0:0:0:1", 4000) == ("::1", 4000)
    assert normalize("10.0.0.1", 4000) == ("10.0.0.1", 4000)


def test_port_allocator_random_even_unique_o1() -> None:
    ports = PortAllocator(20001, 20010)
    got = [ports.allocate() for _ in range(ports.size)]
    assert sorted(got) == [20002, 20004, 20006, 20008]
    with pytest.raises(PortsExhausted):
        ports.allocate()
    ports.release(20004)
    assert ports.allocate() == 20004 and ports.in_use == 4
    big = PortAllocator(20000, 40000)
    order = [big.allocate() for _ in range(big.size)]  # 10,000 allocations: O(1) each (a swap and a pop)
    assert len(set(order)) == big.size and all(p % 2 == 0 and 20000 <= p < 40000 for p in order)
    steps = [b - a for a, b in pairwise(order)]
    assert sum(1 for s in steps if s == 2) < 50, "not handed out in order"
    firsts = {PortAllocator(20000, 40000).allocate() for _ in range(200)}
    assert len(firsts) > 180, "the first port of a fresh range is not predictable"
    for p in order[:100]:
        big.release(p)
    again = [big.allocate() for _ in range(20)]
    assert again != order[:20], "a released port is not simply handed out again in the same order"
