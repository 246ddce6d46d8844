"""RTP bleed (issue 11, finding 1): a stranger on another loopback address sprays the worker's RTP range and
streams into a call's port. With strict RTP it hears nothing of the call and its RFC 4733 digits reach no IVR;
a NAT'd caller is still latched within the learning window, and a re-INVITE still moves the media.

The caller is a hand-written SIP UA on a UDP socket (so the test owns its RTP: what it sends, from which port,
and every packet it gets back); the attacker is a plain UDP socket on 127.0.0.2.
"""

from __future__ import annotations

import json
import random
import re
import select
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.media.rtp import RtpPacket
from tests.conftest import ROOT, Gateway, make_test_config, start_gateway, stop_gateway, wait_until

ECHO_DID = "15550100001"
IVR_DID = "15550100000"
CALLER_AUDIO = b"\x55" * 160  # what the caller says (PCMU), recognisable in the echo
ATTACKER_AUDIO = b"\x11" * 160
EVENT_PT = 101


def udp(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.setblocking(False)
    return s


class Uac:
    """A minimal SIP caller over UDP: INVITE (+ACK), re-INVITE, BYE, and answering the gateway's BYE."""

    def __init__(self, gw: Gateway, did: str) -> None:
        self.gw, self.did = gw, did
        self.sock = udp()
        self.local = self.sock.getsockname()[1]
        self.call_id = f"{random.getrandbits(64):x}@127.0.0.1"
        self.tag = f"{random.getrandbits(32):x}"
        self.to_tag = ""
        self.cseq = 0
        self.sdp_version = 1
        self.bye_received = False

    def _headers(self, method: str, cseq: int) -> str:
        to_tag = f";tag={self.to_tag}" if self.to_tag else ""
        return (f"{method} sip:{self.did}@127.0.0.1:{self.gw.sip_port} SIP/2.0\r\n"
                f"Via: SIP/2.0/UDP 127.0.0.1:{self.local};branch=z9hG4bK{random.getrandbits(48):x};rport\r\n"
                f"From: <sip:15551230000@127.0.0.1>;tag={self.tag}\r\n"
                f"To: <sip:{self.did}@127.0.0.1>{to_tag}\r\n"
                f"Call-ID: {self.call_id}\r\nCSeq: {cseq} {method}\r\n"
                f"Contact: <sip:caller@127.0.0.1:{self.local}>\r\nMax-Forwards: 70\r\n")

    def _send(self, text: str) -> None:
        self.sock.sendto(text.encode(), ("127.0.0.1", self.gw.sip_port))

    def _recv(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.sock], [], [], timeout)
        return self.sock.recv(65535).decode() if ready else None

    def invite(self, media_port: int) -> int:
        """INVITE (or re-INVITE) offering PCMU + telephone-event at 127.0.0.1:media_port; the gateway's RTP port."""
        self.cseq += 1
        self.sdp_version += 1
        sdp = (f"v=0\r\no=caller 1 {self.sdp_version} IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
               f"m=audio {media_port} RTP/AVP 0 {EVENT_PT}\r\na=rtpmap:0 PCMU/8000\r\n"
               f"a=rtpmap:{EVENT_PT} telephone-event/8000\r\na=fmtp:{EVENT_PT} 0-15\r\n")
        self._send(self._headers("INVITE", self.cseq) + f"Content-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n{sdp}")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            msg = self._recv(deadline - time.monotonic())
            if msg is None or not msg.startswith("SIP/2.0 "):
                continue
            status = int(msg.split()[1])
            if status < 200:
                continue
            assert status == 200, msg
            self.to_tag = re.search(r"(?im)^To:.*;tag=([^;\s]+)", msg).group(1)  # type: ignore[union-attr]
            self._send(self._headers("ACK", self.cseq) + "Content-Length: 0\r\n\r\n")
            return int(re.search(r"(?m)^m=audio (\d+) ", msg).group(1))  # type: ignore[union-attr]
        raise AssertionError("no 200 to the INVITE")

    def poll(self) -> None:
        """Answer a BYE from the gateway (the IVR hangs up)."""
        while (msg := self._recv(0)) is not None:
            if msg.startswith("BYE "):
                self.bye_received = True
                keep = [ln for ln in msg.split("\r\n") if ln.split(":")[0].lower() in ("via", "from", "to", "call-id", "cseq")]
                self._send("SIP/2.0 200 OK\r\n" + "\r\n".join(keep) + "\r\nContent-Length: 0\r\n\r\n")

    def bye(self) -> None:
        self.cseq += 1
        self._send(self._headers("BYE", self.cseq) + "Content-Length: 0\r\n\r\n")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            msg = self._recv(deadline - time.monotonic())
            if msg and msg.startswith("SIP/2.0 200") and " BYE" in msg:
                return


class RtpStream:
    """One sender's RTP stream: consecutive sequence numbers and timestamps, one SSRC."""

    def __init__(self, sock: socket.socket, pt: int = 0) -> None:
        self.sock, self.pt = sock, pt
        self.ssrc = random.getrandbits(32)
        self.seq = random.getrandbits(16)
        self.ts = random.getrandbits(32)

    def send(self, to: tuple[str, int], payload: bytes, pt: int | None = None, ts: int | None = None,
             marker: bool = False) -> None:
        self.seq = (self.seq + 1) & 0xFFFF
        if ts is None:
            self.ts = (self.ts + 160) & 0xFFFFFFFF
        packet = RtpPacket(self.pt if pt is None else pt, self.seq, self.ts if ts is None else ts, self.ssrc, payload, marker)
        self.sock.sendto(packet.serialize(), to)


def drain(sock: socket.socket) -> list[tuple[bytes, tuple[str, int]]]:
    got = []
    while True:
        try:
            got.append(sock.recvfrom(2048))
        except BlockingIOError:
            return got


def paced(seconds: float, tick: Callable[[int], bool | None], socks: list[socket.socket],
          on_packet: Callable[[socket.socket, bytes, tuple[str, int]], None]) -> int:
    """Call `tick(n)` every 20 ms on absolute deadlines for `seconds` (or until it returns True), receiving in
    between; returns the ticks run."""
    start = time.monotonic()
    n = 0
    while n * 0.02 < seconds:
        if tick(n):
            return n
        n += 1
        while (left := start + n * 0.02 - time.monotonic()) > 0:
            ready, _, _ = select.select(socks, [], [], left)
            for s in ready:
                for data, addr in drain(s):
                    on_packet(s, data, addr)
    return n


def metric(gw: Gateway, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.http_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    found = re.search(rf"(?m)^{re.escape(name)} (\S+)$", text)
    return float(found.group(1)) if found else 0.0


def cdr_events(gw: Gateway) -> list[dict]:  # type: ignore[type-arg]
    row = gw.wait_calls_ended(1, timeout=30)[0]
    return gw.cdr(row["voice_id"])["events"]  # type: ignore[no-any-return]


def spray(attacker: socket.socket, gw: Gateway) -> int:
    """One RTP packet to every even port of the worker's range (finding the calls' ports)."""
    probe = RtpStream(attacker)
    lo, hi = gw.rtp_range
    sent = 0
    for port in range(lo + lo % 2, hi, 2):
        probe.send(("127.0.0.1", port), ATTACKER_AUDIO)
        sent += 1
    return sent


def test_attacker_spraying_the_range_hears_nothing_of_an_echo_call(tmp_path: Path) -> None:
    gw = start_gateway(tmp_path, make_test_config())
    caller, attacker = udp(), udp("127.0.0.2")
    try:
        uac = Uac(gw, ECHO_DID)
        port = uac.invite(caller.getsockname()[1])
        gw_rtp = ("127.0.0.1", port)
        voice = RtpStream(caller)
        heard = {"caller_echo": 0, "caller_foreign": 0, "attacker": 0}

        def on_packet(sock: socket.socket, data: bytes, addr: tuple[str, int]) -> None:
            if sock is attacker:
                heard["attacker"] += 1
                return
            payload = RtpPacket.parse(data).payload
            heard["caller_echo"] += payload == CALLER_AUDIO
            heard["caller_foreign"] += payload == ATTACKER_AUDIO

        # The caller talks until its echo comes back: the call's media is up and its source learned.
        paced(5, lambda n: voice.send(gw_rtp, CALLER_AUDIO) or heard["caller_echo"] > 0, [caller, attacker], on_packet)
        assert heard["caller_echo"], "the caller must hear its echo"
        heard["caller_echo"] = 0
        sprayed = spray(attacker, gw)
        bleed = RtpStream(attacker)

        def both_talk(n: int) -> None:
            voice.send(gw_rtp, CALLER_AUDIO)
            if n < 200:  # 4 s of the attacker's audio, in sequence, into the call's port
                bleed.send(gw_rtp, ATTACKER_AUDIO)

        paced(4.5, both_talk, [caller, attacker], on_packet)
        uac.bye()
        print(f"\nRTP bleed: attacker sprayed {sprayed} ports and streamed 200 packets into port {port}; "
              f"it received {heard['attacker']} packets; meanwhile the caller got {heard['caller_echo']} packets of its "
              f"own audio back (it sent 225) and {heard['caller_foreign']} of the attacker's")
        assert heard["attacker"] == 0, "the attacker must receive nothing of the call"
        assert heard["caller_foreign"] == 0, "the attacker's audio must not reach the call"
        assert heard["caller_echo"] >= 150, "the real caller keeps its echo throughout"
        done = cdr_events(gw)[-1]
        assert done["state"] == "disconnected" and done["rtp_dropped"] >= 201, done
        assert metric(gw, 'gateway_rtp_dropped_total{reason="source"}') >= 201
        assert '"event": "rtp.dropped"' in gw.log()
    finally:
        caller.close()
        attacker.close()
        stop_gateway(gw)


def rfc4733(stream: RtpStream, to: tuple[str, int], digit: str) -> None:
    """One key press: three event packets and three end packets with one timestamp (RFC 4733 §2.5)."""
    event = "0123456789*#".index(digit)
    stream.ts = (stream.ts + 1600) & 0xFFFFFFFF
    for i in range(6):
        end = i >= 3
        payload = bytes([event, (0x80 if end else 0) | 10]) + (160 * (i + 1)).to_bytes(2, "big")
        stream.send(to, payload, pt=EVENT_PT, ts=stream.ts, marker=i == 0)


@pytest.mark.timeout(240)  # prompts rendered at start, then the IVR's three attempts
def test_attacker_digits_do_not_reach_another_callers_ivr(tmp_path: Path) -> None:
    """The caller says nothing; a stranger types the room's meeting ID and moderator PIN into the call's port.
    The IVR hears no digit: the call ends with too many meeting-ID attempts, never validated."""
    cfg = make_test_config().replace("first_digit_timeout_ms = 10000", "first_digit_timeout_ms = 1500")
    gw = start_gateway(tmp_path, cfg)
    caller, attacker = udp(), udp("127.0.0.2")
    try:
        wait_until(lambda: '"prompts.ready"' in gw.log(), 60, "prompts rendered")
        room = json.loads(subprocess.run(
            [sys.executable, "-m", "gateway", "rooms", "create", "--json", "--name", "victim",
             "--data-dir", str(gw.data_dir)],
            capture_output=True, timeout=30, cwd=ROOT, check=True).stdout)
        keys = room["sip"]["meeting_id"] + "#" + room["sip"]["mpin"] + "#"
        uac = Uac(gw, IVR_DID)
        port = uac.invite(caller.getsockname()[1])
        gw_rtp = ("127.0.0.1", port)

        def locked() -> bool:
            return any('"rtp.locked"' in ln and f'"port": {port},' in ln for ln in gw.log().splitlines())

        wait_until(locked, 10, "the call's RTP source locked (its learning window over)")
        spray(attacker, gw)
        typist = RtpStream(attacker)
        received = {"attacker": 0}
        presses = 0

        def type_keys(n: int) -> bool:
            nonlocal presses
            uac.poll()
            if uac.bye_received or (n % 50 == 0 and '"call.meeting_id_accepted"' in gw.log()):
                return True  # hung up, or (the bleed) the attacker's meeting ID went through
            if n % 10 == 0:  # a key every 200 ms, the whole sequence over and over
                rfc4733(typist, gw_rtp, keys[presses % len(keys)])
                presses += 1
            return False

        def count(sock: socket.socket, data: bytes, addr: tuple[str, int]) -> None:
            received["attacker"] += sock is attacker

        paced(75, type_keys, [attacker], count)
        if not uac.bye_received:
            uac.bye()
        evs = cdr_events(gw)
        states = [e["state"] for e in evs]
        print(f"\nIVR digit injection: {presses} key presses ({presses * 6} RTP packets) from 127.0.0.2 into port "
              f"{port}; states {states}; attacker received {received['attacker']} packets")
        assert "meeting_id_accepted" not in states and "validated" not in states, states
        assert evs[-1]["reason"] == "too_many_meeting_id_attempts", evs[-1]
        assert sum(evs[-1]["dtmf"].values()) == 0, evs[-1]["dtmf"]
        assert evs[-1]["rtp_dropped"] >= presses * 6
        assert received["attacker"] == 0, "the attacker hears no prompt either"
    finally:
        caller.close()
        attacker.close()
        stop_gateway(gw)


def test_nat_caller_is_latched_in_the_window_and_a_reinvite_moves_the_source(tmp_path: Path) -> None:
    """Legitimate callers keep working: a caller whose SDP address is wrong (NAT) is latched by its first packets
    in sequence; a port that starts talking after the window is refused; a re-INVITE announcing it lets it in."""
    gw = start_gateway(tmp_path, make_test_config())
    announced, nat, later = udp(), udp(), udp()
    try:
        uac = Uac(gw, ECHO_DID)
        port = uac.invite(announced.getsockname()[1])
        gw_rtp = ("127.0.0.1", port)
        echoes: dict[socket.socket, int] = {announced: 0, nat: 0, later: 0}

        def on_packet(sock: socket.socket, data: bytes, addr: tuple[str, int]) -> None:
            echoes[sock] += RtpPacket.parse(data).payload == CALLER_AUDIO

        behind_nat = RtpStream(nat)
        paced(3, lambda n: behind_nat.send(gw_rtp, CALLER_AUDIO) or echoes[nat] > 0, list(echoes), on_packet)
        assert echoes[nat] > 0 and echoes[announced] == 0, "symmetric RTP: the echo goes where the packets come from"
        wait_until(lambda: '"how": "window_closed"' in gw.log(), 10, "the learning window closed")
        newcomer = RtpStream(later)
        paced(1, lambda n: newcomer.send(gw_rtp, CALLER_AUDIO) or behind_nat.send(gw_rtp, CALLER_AUDIO),
              list(echoes), on_packet)
        assert echoes[later] == 0, "after the window a new port is refused, even from the caller's address"
        uac.invite(later.getsockname()[1])  # the re-INVITE moves the media: learning again
        before = echoes[later]
        paced(3, lambda n: newcomer.send(gw_rtp, CALLER_AUDIO) or echoes[later] > before + 10, list(echoes), on_packet)
        assert echoes[later] > before + 10, "the source announced by signalling is accepted"
        nat_before = echoes[nat]
        paced(0.5, lambda n: behind_nat.send(gw_rtp, CALLER_AUDIO) or newcomer.send(gw_rtp, CALLER_AUDIO),
              list(echoes), on_packet)
        assert echoes[nat] == nat_before, "the old source is out"
        uac.bye()
        assert cdr_events(gw)[-1]["rtp_dropped"] > 0
    finally:
        for s in (announced, nat, later):
            s.close()
        stop_gateway(gw)

