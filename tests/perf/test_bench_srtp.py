"""Benchmark: the worker's CPU per call-second for echo calls with SRTP against plain RTP, in one run (issue 13:
target at most 1.5x). Prints figures; asserts only that every call was answered and echoed.

sipp cannot do SRTP, and baresip holds its other calls when it dials another, so the load here comes from a
small asyncio caller in this file: SIP over UDP (INVITE with an SDP offer, ACK, BYE), then 20 ms PCMU frames,
protected with libsrtp (the same pylibsrtp the gateway uses) on the SRTP calls, and the echo received back
authenticated and counted. Same caller, same calls, same worker for both kinds; only the trunk differs (its
source address: 127.0.0.1 is a plain trunk, 127.0.0.5 one with media_encryption = "required").

Run on purpose: `BENCH_CALLS=100 BENCH_SECONDS=20 .venv/bin/python -m pytest -s tests/perf/test_bench_srtp.py`.
"""

from __future__ import annotations

import asyncio
import base64
import os
import re
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.media.srtp import SrtpContext, SrtpError, new_key
from tests.conftest import Gateway, make_test_config, start_gateway, stop_gateway
from tests.perf.test_bench_calls import cpu_seconds

CALLS = int(os.environ.get("BENCH_CALLS", "100"))
SECONDS = int(os.environ.get("BENCH_SECONDS", "20"))
SUITE = "AES_CM_128_HMAC_SHA1_80"
SECURE_SOURCE = "127.0.0.5"
ECHO_DID = "15550100001"


@pytest.fixture
def srtp_gateway(tmp_path: Path) -> Iterator[Gateway]:
    trunk = f'\n[[trunks]]\nname = "secure"\nsources = ["{SECURE_SOURCE}/32"]\nmedia_encryption = "required"\n'
    gw = start_gateway(tmp_path, make_test_config(trunk), {"GATEWAY_SIP_MAX_CALLS": str(CALLS * 2 + 10)})
    yield gw
    stop_gateway(gw)


class Leg(asyncio.DatagramProtocol):
    """One call's media: sends a frame each tick, counts what comes back (one packet in ten authenticated on
    SRTP calls: libsrtp on this side competes for the same two cores as the worker being measured)."""

    def __init__(self, srtp: bool) -> None:
        self.key = new_key() if srtp else None
        self.ctx: SrtpContext | None = None
        self.transport: asyncio.DatagramTransport | None = None
        self.target: tuple[str, int] | None = None
        self.seq, self.ts, self.ssrc = 0, 0, int.from_bytes(os.urandom(4), "big")
        self.received = self.bad = 0

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        if self.ctx is not None and self.received % 10 == 0:  # one in ten checked: the caller's own CPU stays low
            try:
                self.ctx.unprotect(data)
            except SrtpError:
                self.bad += 1
                return
        self.received += 1

    def send(self, payload: bytes) -> None:
        if self.transport is None or self.target is None:
            return
        self.seq, self.ts = (self.seq + 1) & 0xFFFF, (self.ts + 160) & 0xFFFFFFFF
        packet = struct.pack("!BBHII", 0x80, 0, self.seq, self.ts, self.ssrc) + payload
        self.transport.sendto(self.ctx.protect(packet) if self.ctx is not None else packet, self.target)


class Caller(asyncio.DatagramProtocol):
    """SIP over one UDP socket for all calls of one kind; answers are matched by Call-ID."""

    def __init__(self, host: str, gw: tuple[str, int], did: str = ECHO_DID) -> None:
        self.host, self.gw, self.did = host, gw, did
        self.transport: asyncio.DatagramTransport | None = None
        self.waiting: dict[str, asyncio.Future[str]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:  # type: ignore[override]
        text = data.decode(errors="replace")
        status = text.split(" ", 2)[1] if text.startswith("SIP/2.0") else ""
        call_id = re.search(r"(?im)^(?:Call-ID|i):\s*(\S+)", text)
        if call_id and status[:1] in "23456" and status and call_id.group(1) in self.waiting:
            future = self.waiting.pop(call_id.group(1))
            if not future.done():
                future.set_result(text)

    def request(self, method: str, call_id: str, cseq: int, to: str, body: str = "") -> asyncio.Future[str]:
        port = self.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
        lines = [f"{method} sip:{self.did}@{self.gw[0]}:{self.gw[1]} SIP/2.0",
                 f"Via: SIP/2.0/UDP {self.host}:{port};rport;branch=z9hG4bK{uuid.uuid4().hex}",
                 "Max-Forwards: 70", f"From: <sip:bench@{self.host}>;tag={call_id[:8]}", f"To: {to}",
                 f"Call-ID: {call_id}", f"CSeq: {cseq} {method}", f"Contact: <sip:bench@{self.host}:{port}>"]
        if body:
            lines.append("Content-Type: application/sdp")
        message = "\r\n".join(lines + [f"Content-Length: {len(body)}", "", body])
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if method != "ACK":
            self.waiting[call_id] = future
        self.transport.sendto(message.encode(), self.gw)  # type: ignore[union-attr]
        return future


async def place(caller: Caller, leg: Leg) -> tuple[str, str]:
    loop = asyncio.get_running_loop()
    leg.transport, _ = await loop.create_datagram_endpoint(lambda: leg, local_addr=(caller.host, 0))
    port = leg.transport.get_extra_info("sockname")[1]
    proto = "RTP/SAVP" if leg.key else "RTP/AVP"
    crypto = f"a=crypto:1 {SUITE} inline:{base64.b64encode(leg.key).decode()}\r\n" if leg.key else ""
    sdp = (f"v=0\r\no=- 1 1 IN IP4 {caller.host}\r\ns=-\r\nc=IN IP4 {caller.host}\r\nt=0 0\r\n"
           f"m=audio {port} {proto} 0\r\na=rtpmap:0 PCMU/8000\r\n{crypto}a=sendrecv\r\n")
    call_id = uuid.uuid4().hex
    answer = await asyncio.wait_for(caller.request("INVITE", call_id, 1, f"<sip:{caller.did}@gw>", sdp), 30)
    assert answer.startswith("SIP/2.0 200"), answer.split("\r\n", 1)[0]
    to = re.search(r"(?im)^(?:To|t):\s*(.+?)\r$", answer).group(1)  # type: ignore[union-attr]
    media = re.search(r"(?m)^m=audio (\d+) (\S+)", answer)
    host = re.search(r"(?m)^c=IN IP4 (\S+)", answer)
    assert media and host and media.group(2) == proto, answer
    leg.target = (host.group(1), int(media.group(1)))
    if leg.key:
        theirs = re.search(r"(?m)^a=crypto:1 " + SUITE + r" inline:(\S+?)\r?$", answer)
        assert theirs, answer
        leg.ctx = SrtpContext(SUITE, leg.key, base64.b64decode(theirs.group(1)))
    caller.request("ACK", call_id, 1, to)
    return call_id, to


async def run_calls(gw: Gateway, host: str, srtp: bool, did: str = ECHO_DID) -> tuple[float, int, list[Leg]]:
    """CALLS echo calls held SECONDS; the worker's CPU seconds and the call-seconds in the measured window."""
    loop = asyncio.get_running_loop()
    gw_addr = ("127.0.0.1", gw.sip_port)
    caller = Caller(host, gw_addr, did)
    await loop.create_datagram_endpoint(lambda: caller, local_addr=(host, 0))
    legs = [Leg(srtp) for _ in range(CALLS)]
    payload = bytes([0xFF, 0x7F] * 80)
    placed: list[tuple[str, str]] = []
    for i in range(0, CALLS, 25):  # 25 calls at a time
        placed += await asyncio.gather(*(place(caller, leg) for leg in legs[i : i + 25]))

    async def pump(seconds: float) -> None:
        next_tick = loop.time()
        end = next_tick + seconds
        while next_tick < end:
            for leg in legs:
                leg.send(payload)
            next_tick += 0.020
            await asyncio.sleep(max(0.0, next_tick - loop.time()))

    await pump(2.0)  # warm-up: jitter buffers filled, sources locked
    cpu0, t0 = cpu_seconds(gw.proc.pid), loop.time()
    await pump(SECONDS)
    cpu, elapsed = cpu_seconds(gw.proc.pid) - cpu0, loop.time() - t0
    await asyncio.gather(*(asyncio.wait_for(caller.request("BYE", cid, 2, to), 30) for cid, to in placed))
    for leg in legs:
        leg.transport.close()  # type: ignore[union-attr]
    caller.transport.close()  # type: ignore[union-attr]
    return cpu, int(elapsed * CALLS), legs


@pytest.mark.timeout(2 * SECONDS + 300)
def test_bench_srtp_against_plain_echo_calls(srtp_gateway: Gateway) -> None:
    figures = {}
    for kind, host, srtp in (("plain", "127.0.0.1", False), ("srtp", SECURE_SOURCE, True)):
        cpu, call_seconds, legs = asyncio.run(run_calls(srtp_gateway, host, srtp))
        assert all(leg.received > SECONDS * 40 for leg in legs), [leg.received for leg in legs][:10]
        assert sum(leg.bad for leg in legs) == 0
        figures[kind] = cpu * 1000 / call_seconds
        print(f"\nBENCH srtp-vs-plain {kind}: {CALLS} echo calls x {SECONDS} s: {cpu:.2f} s CPU, "
              f"{figures[kind]:.2f} ms CPU per call-second")
    rows = srtp_gateway.wait_calls_ended(2 * CALLS, timeout=60)
    encryption = {r["media_encryption"] for r in rows if r["trunk"] == "secure"}
    assert encryption == {"srtp"} and sum(r["trunk"] == "secure" for r in rows) == CALLS, encryption
    print(f"BENCH srtp-vs-plain: SRTP costs {figures['srtp'] / figures['plain']:.2f}x plain (target <= 1.5x)")
