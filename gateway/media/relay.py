"""Relaying RTP payloads between a phone and a Janus AudioBridge plain-RTP participant, sans-I/O.

No decoding or encoding: the payload bytes go through untouched, only the RTP header is the leg's own.
Both directions are paced by the worker's 20 ms media clock, one frame per tick.

- `Restamper`: gives outgoing packets the leg's SSRC, a sequence number of its own (+1 per packet sent,
  wrapping at 2**16) and a timestamp of its own (+`samples_per_frame` per frame, wrapping at 2**32).
  `skip(frames)` advances the timestamp over frames not sent (a gap, silence) so the receiver sees the
  jump in media time, and the next packet carries the marker bit (RFC 3551 4.1: first packet of a
  talkspurt), as does the very first packet of the stream. Initial SSRC, sequence and timestamp are
  random (RFC 3550 5.1) unless given.
- `FramePacer`: the jitter-absorbing FIFO for the room -> caller direction. Packets are put at whatever
  time they arrive and keyed on their (extended) sequence number, so reordered packets come out in
  order and duplicates are dropped; `pop()` gives one payload per media-clock tick. Playing starts once
  `target` frames (2: 40 ms) are held and starts over that way after an underrun (`pop()` returns None
  when it has nothing). Holding more than `max_depth` (6) cuts back to the newest `target` frames, so a
  burst after a stall or a sender whose clock runs fast does not add delay for good. A missing packet
  whose successors are already held is not waited for: it is counted lost and skipped, and if it
  arrives after all it is dropped as late. A new SSRC or a sequence jump (RFC 3550 A.1: more than
  `max_dropout` ahead or `max_misorder` behind, confirmed by a second packet in sequence) starts over.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from gateway.media.rtp import RtpPacket

SEQ_MOD = 1 << 16
TS_MOD = 1 << 32


class Restamper:
    def __init__(self, ssrc: int | None = None, payload_type: int = 0, clock_rate: int = 8000,
                 samples_per_frame: int = 160, *, sequence: int | None = None, timestamp: int | None = None) -> None:
        if not 0 <= payload_type <= 127:
            raise ValueError(f"payload type {payload_type} out of 0-127")
        if samples_per_frame <= 0 or clock_rate <= 0:
            raise ValueError("clock_rate and samples_per_frame must be positive")
        self.ssrc = (secrets.randbits(32) if ssrc is None else ssrc) % TS_MOD
        self.payload_type = payload_type
        self.clock_rate = clock_rate
        self.samples_per_frame = samples_per_frame
        self.sequence = (secrets.randbits(16) if sequence is None else sequence) % SEQ_MOD  # of the next packet
        self.timestamp = (secrets.randbits(32) if timestamp is None else timestamp) % TS_MOD  # of the next packet
        self.packets = 0  # sent, for RTCP sender reports
        self.octets = 0  # payload octets sent
        self._gap = True  # the next packet starts a talkspurt

    @property
    def frame_duration(self) -> float:
        return self.samples_per_frame / self.clock_rate

    def stamp(self, payload: bytes, marker: bool = False) -> bytes:
        """One RTP packet carrying `payload` (one frame) with the leg's own header; advances seq and ts."""
        packet = RtpPacket(self.payload_type, self.sequence, self.timestamp, self.ssrc, bytes(payload),
                           marker or self._gap).serialize()
        self._gap = False
        self.sequence = (self.sequence + 1) % SEQ_MOD
        self.timestamp = (self.timestamp + self.samples_per_frame) % TS_MOD
        self.packets += 1
        self.octets += len(payload)
        return packet

    def skip(self, frames: int = 1) -> None:
        """Let `frames` frames of media time pass unsent: the timestamp jumps, the sequence does not."""
        if frames < 0:
            raise ValueError("cannot skip a negative number of frames")
        if frames:
            self.timestamp = (self.timestamp + frames * self.samples_per_frame) % TS_MOD
            self._gap = True


@dataclass
class PacerStats:
    received: int = 0  # packets accepted into the queue
    played: int = 0
    duplicates: int = 0  # already in the queue
    late: int = 0  # arrived after their turn (or a copy of a played packet)
    lost: int = 0  # sequence numbers skipped at playout
    dropped: int = 0  # cut from an over-full queue
    underruns: int = 0
    resets: int = 0  # a new SSRC or a sequence jump


class FramePacer:
    def __init__(self, target: int = 2, max_depth: int = 6, max_dropout: int = 3000, max_misorder: int = 100) -> None:
        if not 1 <= target <= max_depth:
            raise ValueError("need 1 <= target <= max_depth")
        self.target = target
        self.max_depth = max_depth
        self.max_dropout = max_dropout
        self.max_misorder = max_misorder
        self.stats = PacerStats()
        self._queue: dict[int, bytes] = {}  # extended sequence -> payload
        self._ssrc: int | None = None
        self._highest: int | None = None  # extended sequence of the newest packet seen
        self._next: int | None = None  # packets below this extended sequence are late
        self._bad_seq: int | None = None  # the sequence that would confirm a jump
        self.buffering = True

    @property
    def depth(self) -> int:
        return len(self._queue)

    def reset(self) -> None:
        self._queue.clear()
        self._ssrc = None
        self._highest = None
        self._next = None
        self._bad_seq = None
        self.buffering = True

    def put(self, packet: RtpPacket) -> bool:
        """Queue an arriving packet's payload; False if it was dropped (duplicate, late, stray jump)."""
        if self._ssrc is not None and packet.ssrc != self._ssrc:
            self.reset()
            self.stats.resets += 1
        self._ssrc = packet.ssrc
        seq = packet.sequence % SEQ_MOD
        if self._highest is None:
            ext = seq
        else:
            delta = (seq - self._highest + SEQ_MOD // 2) % SEQ_MOD - SEQ_MOD // 2
            ext = self._highest + delta
            if delta > self.max_dropout or delta < -self.max_misorder:
                if seq != self._bad_seq:  # one stray packet: ignore it, unless the next one follows it
                    self._bad_seq = (seq + 1) % SEQ_MOD
                    self.stats.late += 1
                    return False
                ssrc = self._ssrc
                self.reset()  # the sender restarted its sequence: follow it
                self._ssrc = ssrc
                self.stats.resets += 1
                ext = seq
        self._bad_seq = None
        if self._next is not None and ext < self._next:
            self.stats.late += 1
            return False
        if ext in self._queue:
            self.stats.duplicates += 1
            return False
        self._queue[ext] = packet.payload
        self.stats.received += 1
        if self._highest is None or ext > self._highest:
            self._highest = ext
        if len(self._queue) > self.max_depth:
            keep = sorted(self._queue)[-self.target :]
            self.stats.dropped += len(self._queue) - len(keep)
            self._queue = {k: self._queue[k] for k in keep}
            self._next = keep[0]
        return True

    def pop(self) -> bytes | None:
        """The next payload in sequence order, one per media-clock tick; None while (re)buffering."""
        if self.buffering:
            if len(self._queue) < self.target:
                return None
            self.buffering = False
        if not self._queue:
            self.stats.underruns += 1
            self.buffering = True
            return None
        ext = min(self._queue)
        if self._next is not None and ext > self._next:
            self.stats.lost += ext - self._next
        self._next = ext + 1
        self.stats.played += 1
        return self._queue.pop(ext)
