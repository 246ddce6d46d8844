"""Content-Length framing of SIP over a byte stream (RFC 3261 section 18.3), sans-I/O."""

from __future__ import annotations

from .message import COMPACT_FORMS, MAX_MESSAGE_SIZE


class FramingError(ValueError):
    """The stream cannot be framed any more: the connection must be closed."""


class StreamFramer:
    """Feed bytes as they arrive; take out whole messages (bytes) as they complete.

    CRLF keep-alives (RFC 5626 section 3.5.1) between messages are skipped; `pongs` counts the
    double-CRLF pings so the transport can answer them with a single CRLF. The search for the end of
    the header section goes on from where the last one stopped, so bytes trickled in one at a time cost
    linear work, not quadratic.
    """

    def __init__(self, max_size: int = MAX_MESSAGE_SIZE) -> None:
        self._buf = bytearray()
        self._max = max_size
        self._scanned = 0  # bytes of _buf already searched for the blank line (less the last 3)
        self.pongs = 0

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while True:
            while self._buf[:2] == b"\r\n":
                self._scanned = 0
                if self._buf[:4] == b"\r\n\r\n":
                    self.pongs += 1
                    del self._buf[:4]
                else:
                    del self._buf[:2]
            end = self._buf.find(b"\r\n\r\n", max(0, self._scanned - 3))
            if end < 0:
                if len(self._buf) > self._max:
                    raise FramingError("header section too large")
                self._scanned = len(self._buf)
                return out
            length = _content_length(bytes(self._buf[:end]))
            total = end + 4 + length
            if total > self._max:
                raise FramingError("message too large")
            if len(self._buf) < total:
                return out
            out.append(bytes(self._buf[:total]))
            del self._buf[:total]
            self._scanned = 0


def _content_length(head: bytes) -> int:
    values = []
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = name.strip().lower().decode("latin-1")
        if COMPACT_FORMS.get(key, key) == "content-length":
            values.append(value.strip())
    if not values:
        return 0  # RFC 3261 requires it on streams; treat a missing one as an empty body
    if len(values) > 1 or not values[0].isdigit():
        raise FramingError("bad Content-Length on a stream")
    return int(values[0])
