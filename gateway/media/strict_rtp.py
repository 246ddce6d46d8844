"""Strict RTP, sans-I/O: which source a call's RTP port accepts (the defence against RTP bleed).

Modelled on Asterisk's `strictrtp` (with pjmedia's probation): the remote source is first the address and port
the SDP gives. Within a short learning window that opens when signalling sets the remote media (the answer, a
re-INVITE or UPDATE), the first packet from that address locks the port onto it; a NAT'd caller whose SDP
address is wrong is latched instead once one address+port+SSRC has sent `probation` packets with consecutive
sequence numbers (symmetric RTP, RFC 4961), and only within the window. When the window closes the port is
locked: onto the latched source, else the SDP address. From then on only the locked address+port is accepted;
everything else is dropped and counted. A new source is accepted only through signalling (`learn`, which opens
a new window).

An SSRC change from the locked address+port is a new stream of the same peer (a phone restarting its stream;
sipp sends every RFC 4733 burst with a new SSRC), not an attack: it is accepted and counted.

Drop reasons: `source` (another address+port than the accepted one; or a candidate still on probation),
`ssrc` (a candidate on probation switched SSRC: it starts over), `malformed` (not RTP; counted by the caller).
"""

from __future__ import annotations

import ipaddress
from collections import deque
from dataclasses import dataclass

Address = tuple[str, int]

LEARNING = "learning"
LOCKED = "locked"


def normalize(host: str, port: int) -> Address | None:
    """The SDP's connection address as the socket layer reports sources (None: no media expected there)."""
    if port <= 0 or not host:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return (host, port)  # a host name in c=: only latching can find the source
    if ip.is_unspecified:
        return None  # c=0.0.0.0 (RFC 2543 hold)
    return (ip.compressed, port)


@dataclass(slots=True)
class _Candidate:
    address: Address
    ssrc: int
    seq: int
    count: int


class SourceGuard:
    """The strict-RTP state of one RTP port. Feed it `check(address, ssrc, seq, now)` for every RTP packet.

    `check` returns "" to accept the packet or the drop reason. `events` collects what a log should say
    (`locked`, `latched`, `new_ssrc`), drained by the owner.
    """

    def __init__(self, window_s: float = 2.0, probation: int = 4) -> None:
        self.window_s = window_s
        self.probation = max(1, probation)
        self.state = LOCKED
        self.expected: Address | None = None  # from the SDP
        self.source: Address | None = None  # accepted source: locked, or latched within the window
        self.ssrc: int | None = None
        self.confirmed = False  # a packet came from `source`
        self.deadline = 0.0
        self.ssrc_changes = 0
        self.events: list[tuple[str, dict[str, object]]] = []
        self._candidate: _Candidate | None = None
        self._recent: deque[int] = deque(maxlen=8)  # SSRCs of the source (a stream interleaving two is no change)

    # -- signalling
    def learn(self, expected: Address | None, now: float) -> None:
        """Signalling set the remote media: open a learning window for `expected` (the SDP address)."""
        self.state = LEARNING
        self.expected = expected
        self.source = None
        self.ssrc = None
        self.confirmed = False
        self.deadline = now + self.window_s
        self._candidate = None
        self._recent.clear()

    @property
    def learning(self) -> bool:
        return self.state == LEARNING

    @property
    def target(self) -> Address | None:
        """Where to send: the accepted source, else the SDP address."""
        return self.source if self.source is not None else self.expected

    def expire(self, now: float) -> bool:
        """Close the window when its time is up; True when it closed now."""
        if self.state != LEARNING or now < self.deadline:
            return False
        self.state = LOCKED
        self._candidate = None
        if self.source is None:
            self.source = self.expected
        self.events.append(("locked", {"source": self.source, "how": "window_closed", "confirmed": self.confirmed}))
        return True

    # -- packets
    def check(self, address: Address, ssrc: int, seq: int, now: float) -> str:
        if self.state == LEARNING:
            self.expire(now)
        if self.state == LOCKED:
            if address != self.source:
                return "source"
            self._accept(ssrc)
            return ""
        if address == self.expected and self.expected is not None:
            # The SDP's own address: the best evidence there is. Lock at once (even over a latched candidate).
            how = "sdp" if self.source in (None, address) else "sdp_over_latched"
            self._lock(address, ssrc, how)
            return ""
        if self.source is not None:  # latched within the window: only the SDP address may still take over
            if address != self.source:
                return "source"
            self._accept(ssrc)
            return ""
        if self.expected is None:
            return "source"  # no media announced (no SDP yet, or c=0.0.0.0): nothing to latch onto
        return self._probation(address, ssrc, seq)

    def _probation(self, address: Address, ssrc: int, seq: int) -> str:
        c = self._candidate
        if c is None or c.address != address:
            c = self._candidate = _Candidate(address, ssrc, seq, 1)
            reason = "source"
        elif c.ssrc != ssrc:
            c.ssrc, c.seq, c.count = ssrc, seq, 1
            return "ssrc"
        else:
            c.count = c.count + 1 if seq == (c.seq + 1) & 0xFFFF else 1
            c.seq = seq
            reason = "source"
        if c.count < self.probation:
            return reason
        self._candidate = None
        self.source = address
        self.ssrc = ssrc
        self.confirmed = True
        self._recent.append(ssrc)
        self.events.append(("latched", {"source": address, "sdp": self.expected}))
        return ""

    def _lock(self, address: Address, ssrc: int, how: str) -> None:
        self.state = LOCKED
        self.source = address
        self.ssrc = ssrc
        self.confirmed = True
        self._candidate = None
        self._recent.clear()
        self._recent.append(ssrc)
        self.events.append(("locked", {"source": address, "how": how, "confirmed": True}))

    def _accept(self, ssrc: int) -> None:
        self.confirmed = True
        if ssrc == self.ssrc:
            return
        if ssrc not in self._recent:
            if self.ssrc is not None:
                self.ssrc_changes += 1
                self.events.append(("new_ssrc", {"source": self.source, "ssrc": ssrc}))
            self._recent.append(ssrc)
        self.ssrc = ssrc
