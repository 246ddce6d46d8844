"""An adaptive jitter buffer for 8 kHz G.711 streams, sans-I/O.

Packets go in with their RTP timestamp and arrival time; every 20 ms tick the caller pops exactly one
frame of `frame` samples (bytes, one per sample in G.711). The playout delay follows the measured
inter-arrival jitter (RFC 3550 A.8) between `min_frames` and `max_frames`: it grows on underrun and is
cut back by skipping audio when the buffer holds more than the target (a sender whose clock runs fast).
"""

from __future__ import annotations

from dataclasses import dataclass

RATE = 8000


@dataclass
class JitterStats:
    received: int = 0
    late: int = 0  # arrived after their playout time
    lost: int = 0  # frames played as silence
    skipped: int = 0  # frames dropped to cut the delay
    underruns: int = 0
    jitter_ms: float = 0.0


class JitterBuffer:
    def __init__(self, frame: int = 160, min_frames: int = 1, max_frames: int = 10, silence: int = 0xFF) -> None:
        self.frame = frame
        self.min_delay = min_frames * frame
        self.max_delay = max_frames * frame
        self.silence_frame = bytes([silence]) * frame
        self.stats = JitterStats()
        self._packets: dict[int, bytes] = {}
        self._ssrc: int | None = None
        self._ext_last: int | None = None  # last extended (unwrapped) timestamp
        self._play: int | None = None  # extended timestamp of the next sample to play
        self._newest = 0
        self._transit: float | None = None
        self._jitter = 0.0  # in samples
        self._buffering = True

    @property
    def target(self) -> int:
        want = int(3 * self._jitter) + self.frame
        return max(self.min_delay, min(self.max_delay, want))

    @property
    def depth(self) -> int:
        return 0 if self._play is None else max(0, self._newest - self._play)

    def _unwrap(self, ts: int) -> int:
        if self._ext_last is None:
            return ts
        delta = (ts - self._ext_last) & 0xFFFFFFFF
        if delta >= 0x80000000:
            delta -= 0x100000000
        return self._ext_last + delta

    def put(self, timestamp: int, payload: bytes, arrival: float, ssrc: int = 0) -> None:
        if ssrc != self._ssrc:  # a new source: start over
            self._reset()
            self._ssrc = ssrc
        ext = self._unwrap(timestamp)
        if self._play is not None and abs(ext - self._play) > 10 * RATE:
            self._reset()  # a timestamp jump (sender restarted): resynchronise
            self._ssrc = ssrc
            ext = timestamp
        self._ext_last = ext if self._ext_last is None else max(self._ext_last, ext)
        self.stats.received += 1
        transit = arrival * RATE - ext
        if self._transit is not None:
            d = abs(transit - self._transit)
            self._jitter += (d - self._jitter) / 16
            self.stats.jitter_ms = self._jitter / RATE * 1000
        self._transit = transit
        if self._play is not None and ext + len(payload) <= self._play:
            self.stats.late += 1
            return
        self._packets[ext] = payload
        self._newest = max(self._newest, ext + len(payload))
        if self._play is None:
            self._play = ext

    def _reset(self) -> None:
        self._packets.clear()
        self._ext_last = None
        self._play = None
        self._newest = 0
        self._transit = None
        self._buffering = True

    def pop(self) -> bytes | None:
        """One frame, or None while (re)buffering or when the source went quiet."""
        if self._play is None:
            return None
        available = self._newest - self._play
        if self._buffering:
            if available < self.target:
                return None
            self._buffering = False
        elif available <= 0:
            self.stats.underruns += 1
            self._buffering = True  # the delay grows: wait for `target` again
            return None
        excess = available - self.target - 2 * self.frame
        if excess > 0:  # too much delay: skip whole frames
            skip = (excess // self.frame + 1) * self.frame
            self.stats.skipped += skip // self.frame
            self._drop_before(self._play + skip)
            self._play += skip
        start = self._play
        self._play += self.frame
        payload = self._packets.pop(start, None)
        if payload is not None and len(payload) == self.frame:
            return payload
        return self._assemble(start, payload)

    def _assemble(self, start: int, first: bytes | None) -> bytes:
        """General path: packets of another size or misaligned timestamps, and losses."""
        if first is not None:
            self._packets[start] = first
        out = bytearray(self.silence_frame)
        end = start + self.frame
        filled = 0
        for ts in sorted(self._packets):
            if ts >= end:
                break
            payload = self._packets[ts]
            lo, hi = max(ts, start), min(ts + len(payload), end)
            if hi > lo:
                out[lo - start : hi - start] = payload[lo - ts : hi - ts]
                filled += hi - lo
            if ts + len(payload) <= end:
                del self._packets[ts]
            else:  # keep the rest of a long packet for the next frame
                del self._packets[ts]
                self._packets[end] = payload[end - ts :]
        if filled == 0:
            self.stats.lost += 1
        return bytes(out)

    def _drop_before(self, ext: int) -> None:
        for ts in [t for t in self._packets if t + len(self._packets[t]) <= ext]:
            del self._packets[ts]
