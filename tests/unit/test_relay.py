"""The re-stamping RTP relay: the leg's own SSRC, sequence and timestamps, and the room -> caller FIFO."""

from __future__ import annotations

import random

import pytest

from gateway.media.relay import FramePacer, Restamper
from gateway.media.rtp import RtpPacket


def payload(n: int) -> bytes:
    return bytes((n + i) % 256 for i in range(160))


def incoming(seq: int, ssrc: int = 0x1234, ts: int | None = None) -> RtpPacket:
    return RtpPacket(0, seq % 65536, (seq * 160 if ts is None else ts) % 2**32, ssrc, payload(seq))


# ---------------------------------------------------------------- Restamper


def test_sequence_and_timestamp_wrap_ssrc_constant_payload_untouched() -> None:
    r = Restamper(0xCAFEBABE, 8, sequence=65534, timestamp=2**32 - 320)
    packets = [RtpPacket.parse(r.stamp(payload(i))) for i in range(5)]
    assert [p.sequence for p in packets] == [65534, 65535, 0, 1, 2]
    assert [p.timestamp for p in packets] == [2**32 - 320, 2**32 - 160, 0, 160, 320]
    assert {p.ssrc for p in packets} == {0xCAFEBABE}
    assert {p.payload_type for p in packets} == {8}
    assert [p.payload for p in packets] == [payload(i) for i in range(5)]
    assert [p.marker for p in packets] == [True, False, False, False, False]  # first packet starts a talkspurt
    assert r.packets == 5 and r.octets == 5 * 160


def test_header_is_plain_rtp_v2() -> None:
    data = Restamper(1, 0, sequence=7, timestamp=9).stamp(b"\xff" * 160)
    assert len(data) == 12 + 160 and data[0] == 0x80 and data[12:] == b"\xff" * 160


def test_skip_jumps_the_timestamp_and_marks_the_next_packet() -> None:
    r = Restamper(42, 0, sequence=100, timestamp=1000)
    first = [RtpPacket.parse(r.stamp(payload(i))) for i in range(3)]
    r.skip(25)  # 500 ms of silence not sent
    after = [RtpPacket.parse(r.stamp(payload(i))) for i in range(2)]
    assert [p.timestamp for p in first] == [1000, 1160, 1320]
    assert after[0].timestamp == 1320 + 160 + 25 * 160 and after[1].timestamp == after[0].timestamp + 160
    assert [p.sequence for p in first + after] == [100, 101, 102, 103, 104]  # no hole in the sequence
    assert [p.marker for p in first + after] == [True, False, False, True, False]
    r.skip(0)
    assert not RtpPacket.parse(r.stamp(b"x")).marker
    with pytest.raises(ValueError):
        r.skip(-1)


def test_skip_wraps_the_timestamp() -> None:
    r = Restamper(1, 0, sequence=0, timestamp=2**32 - 160)
    r.skip(2)
    assert RtpPacket.parse(r.stamp(b"a")).timestamp == 160


def test_explicit_marker_and_other_frame_sizes() -> None:
    r = Restamper(5, 9, clock_rate=8000, samples_per_frame=320, sequence=1, timestamp=0)  # G.722 at 20 ms
    assert r.frame_duration == pytest.approx(0.020 * 2)
    r.stamp(b"a")
    p = RtpPacket.parse(r.stamp(b"b", marker=True))
    assert p.marker and p.timestamp == 320


def test_random_initial_values() -> None:
    legs = [Restamper() for _ in range(4)]
    assert len({(r.ssrc, r.sequence, r.timestamp) for r in legs}) == 4
    for r in legs:
        assert 0 <= r.ssrc < 2**32 and 0 <= r.sequence < 2**16 and 0 <= r.timestamp < 2**32
    with pytest.raises(ValueError):
        Restamper(1, 128)


# ---------------------------------------------------------------- FramePacer


def test_waits_for_target_then_one_per_tick_then_none_on_underrun() -> None:
    q = FramePacer()
    q.put(incoming(10))
    assert q.pop() is None and q.buffering  # priming: one frame is not yet the target of two
    q.put(incoming(11))
    assert q.pop() == payload(10) and q.pop() == payload(11)
    assert q.pop() is None and q.stats.underruns == 1
    q.put(incoming(12))
    assert q.pop() is None  # rebuffering after the underrun
    q.put(incoming(13))
    assert [q.pop(), q.pop()] == [payload(12), payload(13)]
    assert q.stats.played == 4 and q.stats.lost == 0


def test_reorders() -> None:
    q = FramePacer()
    for seq in (3, 1, 2):
        q.put(incoming(seq))
    assert [q.pop(), q.pop(), q.pop()] == [payload(1), payload(2), payload(3)]


def test_reorders_in_steady_flow() -> None:
    """Packets arrive one per tick with neighbours swapped: every one comes out, in order."""
    q = FramePacer()
    arrivals = [0, 1, 3, 2, 4, 6, 5, 7, 9, 8, 10, 11]
    out = []
    for seq in arrivals:
        q.put(incoming(seq))
        out.append(q.pop())
    out += [q.pop(), q.pop()]
    assert [p for p in out if p is not None] == [payload(s) for s in range(12)]
    assert q.stats.late == 0 and q.stats.lost == 0


def test_drops_duplicates() -> None:
    q = FramePacer()
    assert q.put(incoming(1)) and q.put(incoming(2))
    assert not q.put(incoming(1)) and q.depth == 2
    assert q.pop() == payload(1)
    assert not q.put(incoming(1))  # a copy of a played packet
    assert q.pop() == payload(2) and q.pop() is None
    assert q.stats.duplicates == 1 and q.stats.late == 1 and q.stats.played == 2


def test_bounds_its_depth() -> None:
    q = FramePacer(target=2, max_depth=6)
    depths = []
    for seq in range(20):  # a burst after a stall
        q.put(incoming(seq))
        depths.append(q.depth)
    assert max(depths) <= 6 and q.depth <= 6
    assert q.stats.dropped > 0
    played = [q.pop() for _ in range(q.depth)]
    assert played[-1] == payload(19)  # the newest audio survives; the oldest was cut
    assert [q.pop() for _ in range(3)] == [None] * 3


def test_overflow_cuts_back_to_target() -> None:
    q = FramePacer(target=2, max_depth=6)
    for seq in range(7):
        q.put(incoming(seq))
    assert q.depth == 2 and [q.pop(), q.pop()] == [payload(5), payload(6)]
    assert not q.put(incoming(4))  # cut audio does not come back


def test_sequence_wrap() -> None:
    q = FramePacer()
    order = [65533, 65535, 65534, 0, 2, 1, 3]
    out = []
    for seq in order:
        q.put(incoming(seq))
        out.append(q.pop())
    out += [q.pop() for _ in range(3)]
    expected = [payload(s) for s in (65533, 65534, 65535, 0, 1, 2, 3)]
    assert [p for p in out if p is not None] == expected


def test_loss_is_skipped_and_a_late_packet_dropped() -> None:
    q = FramePacer()
    for seq in (1, 2, 4, 5):
        q.put(incoming(seq))
    assert [q.pop(), q.pop(), q.pop()] == [payload(1), payload(2), payload(4)]
    assert q.stats.lost == 1
    assert not q.put(incoming(3)) and q.stats.late == 1
    assert q.pop() == payload(5)


def test_new_ssrc_starts_over() -> None:
    q = FramePacer()
    for seq in (100, 101, 102):
        q.put(incoming(seq, ssrc=1))
    assert q.pop() == payload(100)
    q.put(incoming(7, ssrc=2))
    assert q.stats.resets == 1 and q.depth == 1 and q.pop() is None
    q.put(incoming(8, ssrc=2))
    assert [q.pop(), q.pop()] == [payload(7), payload(8)]


def test_sequence_jump_needs_confirmation() -> None:
    q = FramePacer()
    for seq in (10, 11):
        q.put(incoming(seq))
    assert not q.put(incoming(30000))  # one stray packet far away: ignored
    assert q.depth == 2 and q.stats.resets == 0
    q.put(incoming(12))
    assert not q.put(incoming(40000)) and q.put(incoming(40001))  # the sender restarted: followed
    assert q.stats.resets == 1
    q.put(incoming(40002))
    assert [q.pop(), q.pop()] == [payload(40001), payload(40002)]


def test_bad_settings() -> None:
    with pytest.raises(ValueError):
        FramePacer(target=7, max_depth=6)


# ---------------------------------------------------------------- both together


def test_relay_with_jitter_reordering_and_loss() -> None:
    """Janus's packets arrive jittered (0-35 ms late), some swapped, one lost; the media clock drains one per
    20 ms tick and re-stamps: the caller gets a gap-free sequence, timestamps +160 per packet and +160 per
    tick over underruns, and the payloads in their original order."""
    rng = random.Random(5)
    lost = {37}
    arrivals = sorted((seq * 0.020 + rng.uniform(0.0, 0.035), seq) for seq in range(200) if seq not in lost)
    pacer = FramePacer()
    out = Restamper(0xABCDEF01, 0, sequence=65500, timestamp=2**32 - 1600)
    sent: list[tuple[int, RtpPacket]] = []
    i = 0
    for tick in range(1, 220):
        now = tick * 0.020
        while i < len(arrivals) and arrivals[i][0] <= now:
            pacer.put(incoming(arrivals[i][1], ts=0))  # the room's own timestamps play no part
            i += 1
        frame = pacer.pop()
        if frame is None:
            out.skip(1)
        else:
            sent.append((tick, RtpPacket.parse(out.stamp(frame))))
    packets = [p for _, p in sent]
    got = [p.payload for p in packets]
    assert got == [payload(s) for s in range(200) if s not in lost]  # jitter and reordering absorbed
    assert pacer.stats.lost == 1 and pacer.stats.late == 0 and pacer.stats.dropped == 0
    assert [p.sequence for p in packets] == [(65500 + k) % 65536 for k in range(len(packets))]
    assert {p.ssrc for p in packets} == {0xABCDEF01}
    for (tick_a, a), (tick_b, b) in zip(sent, sent[1:], strict=False):
        assert (b.timestamp - a.timestamp) % 2**32 == 160 * (tick_b - tick_a)  # media time follows the clock
        assert b.marker == (tick_b - tick_a > 1)
