"""Mutated SIP at a running worker over real sockets: 100,000 datagrams and 1,000 TCP streams (seeded from the
RFC 4475 torture messages and a normal INVITE, mutated by byte flips, insertions, deletions, splices and
truncation, from a fixed seed so a failure can be replayed), sent from strangers' loopback addresses. Afterwards
the worker still answers a normal call and its log holds no unhandled exception."""

from __future__ import annotations

import random
import socket
import time
from pathlib import Path

import pytest

from tests.conftest import Gateway, run_sipp

SEEDS = Path(__file__).resolve().parents[1] / "fuzz" / "seeds" / "sip"
TORTURE = Path(__file__).resolve().parents[3] / "shared" / "rfc4475"
DATAGRAMS = 100_000
STREAMS = 1_000
RATE = 10_000  # datagrams per second: paced, so the kernel's socket buffer does not drop most of them unseen


def seeds() -> list[bytes]:
    found = [p.read_bytes() for p in SEEDS.iterdir()]
    if TORTURE.is_dir():
        found += [p.read_bytes() for p in sorted(TORTURE.glob("*.dat"))]
    return found


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(6)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:
            buf[pos:pos] = bytes(rng.choice(b"\r\n:;,<>\"@ =\x00\xff0123456789") for _ in range(rng.randint(1, 4)))
        elif op == 2:
            del buf[pos : pos + rng.randint(1, 16)]
        elif op == 3:
            other = rng.choice(pool)
            start = rng.randrange(len(other) + 1)
            buf[pos:pos] = other[start : start + rng.randint(1, 64)]
        elif op == 4:
            del buf[pos:]
        else:
            line = rng.choice([b"Via: SIP/2.0/UDP 127.0.0.2;branch=z9hG4bK" + bytes(rng.randint(1, 4) * b"\"",),
                               b"Content-Length: " + str(rng.randint(-5, 99999)).encode(), b"CSeq: 1 INVITE" * 3,
                               b"From: \"" * rng.randint(1, 3)])
            buf[pos:pos] = b"\r\n" + line + b"\r\n"
    return bytes(buf[:8000])


def stranger(i: int) -> str:
    return f"127.0.{(i // 250) % 250 + 1}.{i % 250 + 2}"


@pytest.mark.serial  # 10,000 datagrams a second
def test_mutated_datagrams_and_streams_leave_the_worker_answering(gateway: Gateway) -> None:
    rng = random.Random(4475)
    pool = seeds()
    sockets = {}
    start = time.monotonic()
    for i in range(DATAGRAMS):
        src = stranger(i % 500)
        sock = sockets.get(src)
        if sock is None:
            sock = sockets[src] = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((src, 0))
        sock.sendto(mutate(rng, rng.choice(pool), pool), ("127.0.0.1", gateway.sip_port))
        if i % 1000 == 999:  # pace on absolute deadlines
            ahead = start + (i + 1) / RATE - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
    for sock in sockets.values():
        sock.close()
    for i in range(STREAMS):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as conn:
            conn.bind((stranger(i), 0))
            conn.settimeout(2)
            try:
                conn.connect(("127.0.0.1", gateway.sip_port))
                conn.sendall(b"".join(mutate(rng, rng.choice(pool), pool) for _ in range(rng.randint(1, 3))))
            except OSError:
                pass  # refused or reset by the worker: its right
    # a normal call still works
    result = run_sipp(gateway.sip, "-sn", "uac", "-s", "15550100001", "-m", "1", "-d", "500", timeout=60)
    assert result.returncode == 0, result.stdout[-2000:]
    log = gateway.log()
    assert "Traceback" not in log, log[log.index("Traceback") - 500 : log.index("Traceback") + 2500]
    assert '"sip.receive_failed"' not in log and '"sip.event_failed"' not in log
