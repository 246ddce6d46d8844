"""RTP (RFC 3550) fixed header: the small, hot subset a G.711 leg needs, with struct for speed."""

from __future__ import annotations

import struct
from dataclasses import dataclass

_HEADER = struct.Struct("!BBHII")


class RtpError(ValueError):
    pass


@dataclass(slots=True)
class RtpPacket:
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    marker: bool = False

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket:
        if len(data) < 12:
            raise RtpError("packet shorter than an RTP header")
        b0, b1, seq, ts, ssrc = _HEADER.unpack_from(data)
        if b0 >> 6 != 2:
            raise RtpError("not RTP version 2")
        offset = 12 + 4 * (b0 & 0x0F)
        if b0 & 0x10:  # header extension
            if len(data) < offset + 4:
                raise RtpError("truncated header extension")
            (length,) = struct.unpack_from("!H", data, offset + 2)
            offset += 4 + 4 * length
        end = len(data)
        if b0 & 0x20:  # padding
            end -= data[-1]
        if offset > end:
            raise RtpError("truncated RTP packet")
        return cls(b1 & 0x7F, seq, ts, ssrc, data[offset:end], bool(b1 & 0x80))

    def serialize(self) -> bytes:
        return _HEADER.pack(0x80, (0x80 if self.marker else 0) | self.payload_type, self.sequence, self.timestamp, self.ssrc) + self.payload


def is_rtcp(data: bytes) -> bool:
    """RTCP multiplexed on the RTP port (RFC 5761): packet types 192-223."""
    return len(data) >= 2 and 192 <= data[1] <= 223
