"""Shared fixtures: a real gateway process on loopback, and helpers to run real peers against it."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "tests" / "integration" / "scenarios"


def _handed_out_ports() -> tuple[int, int]:
    """The ports tests hand out: from 10000 up to where the kernel's ephemeral ports begin (32768 by default), so a
    port a client socket (chromedriver, Chromium, sipp, urllib) got from the kernel is never one a test handed to
    a gateway a moment later."""
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    return 10000, max(ephemeral, 20000)


PORTS = _handed_out_ports()  # split between pytest-xdist workers, so parallel tests never share one


def worker_ports() -> tuple[int, int]:
    """This pytest process's share of PORTS (all of it when the suite runs in one process)."""
    count = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    index = int(worker) % count if worker.isdigit() else 0
    span = (PORTS[1] - PORTS[0]) // count
    return PORTS[0] + index * span, PORTS[0] + (index + 1) * span


# The share is cut in three, so that a port handed to one use never falls inside another's: single ports (SIP,
# HTTP, Redis: free_port), sipp's media ports (media_block), and RTP ranges of gateways and Janus (port_block),
# which bind ports of their range as calls come and go.
PARTS = {"single": (0.0, 0.25), "media": (0.25, 0.4), "range": (0.4, 1.0)}


def port_share(part: str) -> tuple[int, int]:
    low, high = worker_ports()
    start, end = PARTS[part]
    return low + int((high - low) * start), low + int((high - low) * end)


def port_block(size: int) -> int:
    """The even first port of `size` ports for an RTP range (a gateway's, Janus's): whoever binds them copes with
    one taken (the gateway and Janus skip it)."""
    low, high = port_share("range")
    if high - size <= low:
        raise RuntimeError(f"{size} ports do not fit in this process's share {low}-{high}: fewer TEST_JOBS")
    return random.randrange(low, high - size, 2)


def media_block() -> int:
    """An even port for sipp's media (it binds it and the next three: audio, video, and their RTCP)."""
    low, high = port_share("media")
    return random.randrange(low, high - 4, 2)


def free_port(kind: str = "both", count: int = 1) -> int:
    """A port free for UDP and TCP on 127.0.0.1 (random within this process's share); with `count`,
    the first of that many consecutive free ports."""
    low, high = port_share("single")
    for _ in range(200):
        base = random.randint(low, high - count)
        if any(port in _HANDED for port in range(base, base + count)):
            continue  # given out already: free now, but two of a test's ports must never be the same one
        try:
            for port in range(base, base + count):
                for typ in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    with socket.socket(socket.AF_INET, typ) as s:
                        s.bind(("127.0.0.1", port))
            for port in range(base, base + count):
                _HANDED[port] = None
                while len(_HANDED) > HANDED_KEPT:
                    del _HANDED[next(iter(_HANDED))]
            return base
        except OSError:
            continue
    raise RuntimeError("no free port")


HANDED_KEPT = 500  # the ports free_port gave out last in this process, never given again while kept: a test's
_HANDED: dict[int, None] = {}  # ports (a few dozen at most) must differ, and the share holds thousands


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):  # type: ignore[no-untyped-def]
    """Poll a condition with a deadline (synchronisation on a state, never a bare sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    sip_port: int
    http_port: int
    rtp_range: tuple[int, int]
    data_dir: Path
    log_path: Path
    rooms_port: int = 0
    tls: ssl.SSLContext | None = None  # HTTPS on both listeners: a client context pinned to their certificate
    spki: str = ""  # that certificate's SPKI hash, for Chromium to trust it

    @property
    def sip(self) -> str:
        return f"127.0.0.1:{self.sip_port}"

    @property
    def api_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.http_port}"

    @property
    def rooms_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.rooms_port}"

    def http_get(self, path: str) -> tuple[int, dict]:  # type: ignore[type-arg]
        try:
            with urllib.request.urlopen(f"{self.api_url}{path}", timeout=5, context=self.tls) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def cli(self, *args: str) -> dict | list:  # type: ignore[type-arg]
        out = subprocess.run([sys.executable, "-m", "gateway", *args, "--json", "--data-dir", str(self.data_dir)],
                             capture_output=True, timeout=30, cwd=ROOT, check=True)
        return json.loads(out.stdout)

    def calls(self) -> list[dict]:  # type: ignore[type-arg]
        return self.cli("calls", "--limit", "1000")  # type: ignore[return-value]

    def cdr(self, voice_id: str) -> dict:  # type: ignore[type-arg]
        return self.cli("cdr", voice_id)  # type: ignore[return-value]

    def wait_calls_ended(self, count: int, timeout: float = 20) -> list[dict]:  # type: ignore[type-arg]
        def done() -> list[dict] | None:  # type: ignore[type-arg]
            rows = self.calls()
            ended = [r for r in rows if r["state"] == "disconnected"]
            return rows if len(rows) >= count and len(ended) == len(rows) else None
        return wait_until(done, timeout, f"{count} calls to end in the CDR", interval=0.2)

    def log(self) -> str:
        return self.log_path.read_text()


def janus_env(rtp_low: int) -> dict[str, str]:
    """The managed Janus of a test gateway on ports of its own (HTTP, WebSocket, 400 RTP ports from rtp_low)."""
    return {"GATEWAY_JANUS_HTTP_PORT": str(free_port()), "GATEWAY_JANUS_WS_PORT": str(free_port()),
            "GATEWAY_JANUS_RTP_PORT_MIN": str(rtp_low), "GATEWAY_JANUS_RTP_PORT_MAX": str(rtp_low + 400)}


def tls_files(tmp: Path, *names: str) -> tuple[Path, Path]:
    """A self-signed certificate (as `gateway certs self-signed` makes it) for 127.0.0.1 and `names`."""
    from gateway import tls

    cert, key = tmp / "tls" / "cert.pem", tmp / "tls" / "key.pem"
    if not cert.exists():
        tls.self_signed(["127.0.0.1", *names], cert, key)
    return cert, key


def sip_tls_env(port: int, cert: Path, key: Path, transports: str = '["udp", "tcp", "tls"]',
                **extra: str) -> dict[str, str]:
    """The environment of a gateway taking SIP over TLS on `port` with `cert`/`key` (`extra`: more GATEWAY_SIP_*
    settings by their lower-case suffix, e.g. tls_ca=..., tls_client_ca=...)."""
    return {"GATEWAY_SIP_TRANSPORTS": transports, "GATEWAY_SIP_TLS_PORT": str(port), "GATEWAY_SIP_TLS_CERT": str(cert),
            "GATEWAY_SIP_TLS_KEY": str(key), **{f"GATEWAY_SIP_{k.upper()}": v for k, v in extra.items()}}


def spki_hash(cert: Path) -> str:
    """base64 SHA-256 of the certificate's public key (Chromium's --ignore-certificate-errors-spki-list)."""
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    key = x509.load_pem_x509_certificate(cert.read_bytes()).public_key()
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


# Prompts rendered by earlier test gateways (the cache is content-addressed and written atomically, so any number
# of processes share it): a new gateway starts with them instead of running espeak-ng 22 times (about 2 s of CPU
# each, 100 gateways a run). A test about rendering itself asks for fresh_prompts.
SHARED_PROMPTS = ROOT / "build" / "test-prompt-cache"


def _seed_prompts(data: Path) -> None:
    if SHARED_PROMPTS.is_dir():
        data.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.copytree(SHARED_PROMPTS, data / "prompts-cache", dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.tmp", "*.raw.wav"))


def _keep_prompts(data: Path) -> None:
    for src in (data / "prompts-cache").rglob("*.wav"):
        dst = SHARED_PROMPTS / src.relative_to(data / "prompts-cache")
        if ".raw." in src.name or dst.exists():
            continue
        dst.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")
        try:
            shutil.copy2(src, tmp)
            os.replace(tmp, dst)
        except OSError:  # a file going away under a stopping gateway: the next one keeps it
            tmp.unlink(missing_ok=True)


def start_gateway(tmp: Path, config_text: str | None = None, env: dict[str, str] | None = None,
                  https: bool = False, fresh_prompts: bool = False) -> Gateway:
    """`gateway run` on ports of its own; `https`: the Voice API and the room service over HTTPS (a self-signed
    certificate made here); `fresh_prompts`: render every prompt (else those of earlier gateways are copied in)."""
    sip_port, http_port, rooms_port = free_port(), free_port(), free_port()
    rtp_low = port_block(1602)  # the worker's 1200 RTP ports, then Janus's 400
    rtp = (rtp_low, rtp_low + 1200)
    data = tmp / "data"
    if not fresh_prompts:
        _seed_prompts(data)
    args = [sys.executable, "-m", "gateway", "run", "--sip-host", "127.0.0.1", "--sip-port", str(sip_port),
            "--http-port", str(http_port), "--rtp-ports", f"{rtp[0]}-{rtp[1]}", "--data-dir", str(data)]
    if config_text is not None:
        cfg = tmp / "gateway.toml"
        cfg.write_text(config_text)
        args += ["--config", str(cfg)]
    log_path = tmp / "gateway.log"
    secure: dict[str, str] = {}
    if https:
        cert, key = tls_files(tmp)
        secure = {f"GATEWAY_{section}_TLS_{part}": str(path) for section in ("HTTP", "ROOM_SERVICE")
                  for part, path in (("CERT", cert), ("KEY", key))}
    proc = subprocess.Popen(args, cwd=ROOT, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
                            env={**os.environ, "GATEWAY_ROOM_SERVICE_PORT": str(rooms_port),
                                 "GATEWAY_CLUSTER_DRAIN_TIMEOUT_S": "5", **janus_env(rtp[1] + 2),
                                 "GATEWAY_WEBHOOKS_ALLOW_NETWORKS": '["127.0.0.0/8"]', **secure, **(env or {})})
    gw = Gateway(proc, sip_port, http_port, rtp, data, log_path, rooms_port)
    if https:
        from gateway import tls

        gw.tls, gw.spki = tls.internal(str(cert))["ssl"], spki_hash(cert)

    def healthy() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"gateway exited: {gw.log()}")
        try:
            return gw.http_get("/healthz")[0] == 200
        except OSError:
            return False

    try:
        wait_until(healthy, 20, "gateway /healthz")
    except AssertionError:
        stop_process(proc)
        raise
    return gw


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 10) -> None:  # type: ignore[type-arg]
    """End a process this test started, by its PID: `sig`, then SIGKILL after `grace` seconds."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def stop_gateway(gw: Gateway) -> None:
    stop_process(gw.proc)
    _keep_prompts(gw.data_dir)


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path)
    yield gw
    stop_gateway(gw)


def run_sipp(gw_sip: str, *args: str, timeout: float = 60, cwd: Path | None = None,
             media_port: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run sipp to completion (bounded in time); the caller asserts on returncode/stdout."""
    port = free_port()
    media = media_port or media_block()
    cmd = ["sipp", gw_sip, "-i", "127.0.0.1", "-p", str(port), "-mp", str(media), "-nostdin",
           "-timeout", f"{int(timeout) - 5}s", "-timeout_error", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def sipp_ok(result: subprocess.CompletedProcess[str]) -> bool:
    return result.returncode == 0


# The shipped config plus DIDs the tests need: one that rings before answering (CANCEL, retransmission).
TEST_DIDS = """
[[dids]]
number = "15550100002"
route = "echo"
project = "demo"
answer_after_ms = 2500  # midway between sipp's INVITE retransmissions (0.5, 1.5, 3.5 s), never racing one
"""


def make_test_config(extra: str = "") -> str:
    return (ROOT / "config" / "gateway.toml").read_text() + TEST_DIDS + extra


def scenario(tmp: Path, name: str, **subs: str) -> Path:
    """A copy of a sipp scenario with %KEY% placeholders filled in."""
    text = (SCENARIOS / name).read_text()
    for key, value in subs.items():
        text = text.replace(f"%{key.upper()}%", value)
    path = tmp / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def test_gateway(tmp_path: Path) -> Iterator[Gateway]:
    gw = start_gateway(tmp_path, make_test_config())
    yield gw
    stop_gateway(gw)


# A Redis of the test's own (module-wide), and a client on an emptied database per test.
@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly",
                             "no", "--dir", str(tmp_path_factory.mktemp("redis"))], stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True,
                                          text=True).stdout.strip() == "PONG", 10, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_process(proc)


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Any]:
    client = aioredis.from_url(redis_url, decode_responses=True)
    await client.flushdb()
    yield client
    await client.aclose()
