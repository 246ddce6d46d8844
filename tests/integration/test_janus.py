"""The real Janus 1.1.2 on loopback: our managed process, its API secret and admin keys, two plain-RTP phones
mixed by the AudioBridge, session loss when Janus dies, restart by the supervisor, and no secret in any log."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import struct
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from gateway import log
from gateway.adapters import janus_audiobridge as audiobridge
from gateway.adapters import janus_videoroom as videoroom
from gateway.adapters.janus import JanusClient, JanusError
from gateway.adapters.janus_audiobridge import RtpEndpoint
from gateway.cluster.janus import JanusProcess
from gateway.config import Config, load_config
from tests.conftest import ROOT, free_port, port_block, stop_process, wait_until

pytestmark = pytest.mark.timeout(60)


def janus_env(tmp: Path) -> dict[str, str]:
    rtp_min = port_block(200)
    return {"GATEWAY_DATA_DIR": str(tmp / "data"),
            "GATEWAY_JANUS_HTTP_PORT": str(free_port()), "GATEWAY_JANUS_WS_PORT": str(free_port()),
            "GATEWAY_JANUS_RTP_PORT_MIN": str(rtp_min), "GATEWAY_JANUS_RTP_PORT_MAX": str(rtp_min + 199)}


def janus_config(tmp: Path) -> Config:
    return load_config(None, janus_env(tmp))


@pytest.fixture
async def client(janus: JanusProcess) -> AsyncIterator[JanusClient]:
    async with JanusClient(janus.url, janus.secrets.api_secret, timeout=5) as c:
        yield c


def assert_no_secrets(janus: JanusProcess, caplog: pytest.LogCaptureFixture) -> None:
    records = caplog.get_records("setup") + caplog.get_records("call")
    ours = "\n".join(log.JsonFormatter().format(r) for r in records)
    theirs = janus.log_path.read_text()
    assert "janus.started" in ours and "Loading plugin" in theirs  # both logs were really captured
    for secret in janus.secrets.values():
        assert secret not in ours and secret not in theirs


async def test_info_answers_and_api_secret_is_required(janus: JanusProcess, client: JanusClient) -> None:
    info = await client.info()
    assert info["api_secret"] is True and info["auth_token"] is False
    assert set(info["plugins"]) == {"janus.plugin.audiobridge", "janus.plugin.videoroom"}
    assert set(info["transports"]) == {"janus.transport.http", "janus.transport.websockets"}
    cmdline = Path(f"/proc/{janus.pid}/cmdline").read_bytes().decode()
    assert not any(s in cmdline for s in janus.secrets.values())

    for secret in ("", "wrong"):
        async with JanusClient(janus.url, secret, timeout=5) as outsider:
            with pytest.raises(JanusError) as refused:
                await outsider.create_session()
            assert refused.value.code == 403
    session = await client.create_session()
    try:  # the long poll checks the secret too
        async with aiohttp.ClientSession() as http, http.get(f"{janus.url}/{session.id}?maxev=1") as resp:
            assert resp.status == 403
    finally:
        await session.destroy()


async def test_room_creation_needs_the_admin_key(janus: JanusProcess, client: JanusClient) -> None:
    session = await client.create_session()
    try:
        ab = await session.attach(audiobridge.PLUGIN)
        with pytest.raises(JanusError) as missing:
            await ab.request({"request": "create", "room": "r1", "allow_rtp_participants": True})
        assert missing.value.code == 483  # admin_key is a required element once configured
        with pytest.raises(JanusError) as wrong:
            await audiobridge.create_room(ab, "r1", "not-the-key", "s3cret")
        assert wrong.value.code == 489
        created = await audiobridge.create_room(ab, "r1", janus.secrets.audiobridge_admin_key, "s3cret")
        assert created["audiobridge"] == "created" and created["room"] == "r1"  # string ids
        assert await audiobridge.exists(ab, "r1")
        with pytest.raises(JanusError) as bad_secret:
            await audiobridge.destroy_room(ab, "r1", "guess")
        assert bad_secret.value.code == 489
        await audiobridge.destroy_room(ab, "r1", "s3cret")
        assert not await audiobridge.exists(ab, "r1")

        vr = await session.attach(videoroom.PLUGIN)
        with pytest.raises(JanusError) as wrong_vr:
            await videoroom.create_room(vr, "v1", janus.secrets.audiobridge_admin_key, "s3cret")
        assert wrong_vr.value.code == 433  # each plugin has its own key
        created = await videoroom.create_room(vr, "v1", janus.secrets.videoroom_admin_key, "s3cret")
        assert created["videoroom"] == "created" and created["room"] == "v1"
        await videoroom.destroy_room(vr, "v1", "s3cret")
        assert not await videoroom.exists(vr, "v1")
        await vr.detach()
    finally:
        await session.destroy()


# -- two phones in one AudioBridge room, by plain RTP (PCMU) --------------------------------------------------

def ulaw_encode(samples: np.ndarray) -> bytes:
    s = samples.astype(np.int32)
    magnitude = np.minimum(np.abs(s), 32635) + 0x84
    exponent = np.clip(np.floor(np.log2(magnitude)).astype(np.int32) - 7, 0, 7)
    mantissa = (magnitude >> (exponent + 3)) & 0x0F
    return (~(((s < 0) << 7) | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()


def ulaw_decode(data: bytes) -> np.ndarray:
    u = ~np.frombuffer(data, dtype=np.uint8).astype(np.int32) & 0xFF
    magnitude = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 7)
    return np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84)


class Phone(asyncio.DatagramProtocol):
    """One plain-RTP participant: sends a tone to Janus, keeps the PCMU audio Janus sends back."""

    def __init__(self, freq: float, wanted: int = 25) -> None:
        self.freq = freq
        self.wanted = wanted
        self.loud: list[np.ndarray] = []
        self.heard = asyncio.Event()
        self.transport: asyncio.DatagramTransport | None = None
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    def on_event(self, data: dict[str, Any], jsep: dict[str, Any] | None) -> None:
        self.events.put_nowait(data)

    async def event(self, wanted: Callable[[dict[str, Any]], bool], timeout: float = 5) -> dict[str, Any]:
        """The next AudioBridge event of this participant's handle that matches `wanted`."""
        async with asyncio.timeout(timeout):
            while not wanted(event := await self.events.get()):
                pass
        return event

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) <= 12 or data[0] >> 6 != 2 or data[1] & 0x7F != 0:
            return
        start = 12 + 4 * (data[0] & 0x0F)
        if data[0] & 0x10:  # header extension
            start += 4 + 4 * struct.unpack_from("!H", data, start + 2)[0]
        pcm = ulaw_decode(data[start:])
        if np.sqrt(np.mean(pcm.astype(np.float64) ** 2)) > 1000:
            self.loud.append(pcm)
            if len(self.loud) >= self.wanted:
                self.heard.set()

    @property
    def port(self) -> int:
        assert self.transport is not None
        return int(self.transport.get_extra_info("sockname")[1])

    async def send_tone(self, janus: RtpEndpoint, stop: asyncio.Event) -> None:
        """20 ms PCMU packets paced on absolute deadlines of the loop clock, until `stop`."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        ssrc, start, n = random.getrandbits(32), loop.time(), 0
        while not stop.is_set():
            t = (np.arange(160) + 160 * n) / 8000
            payload = ulaw_encode((8000 * np.sin(2 * np.pi * self.freq * t)).astype(np.int16))
            header = struct.pack("!BBHII", 0x80, 0x80 if n == 0 else 0, n & 0xFFFF, (160 * n) & 0xFFFFFFFF, ssrc)
            self.transport.sendto(header + payload, (janus.ip, janus.port))
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, start + 0.02 * n - loop.time()))

    def dominant_frequency(self) -> float:
        pcm = np.concatenate(self.loud[-25:]).astype(np.float64)
        spectrum = np.abs(np.fft.rfft(pcm * np.hanning(len(pcm))))
        return float(np.fft.rfftfreq(len(pcm), 1 / 8000)[np.argmax(spectrum)])


async def test_two_rtp_phones_hear_each_other(janus: JanusProcess, client: JanusClient,
                                              caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    session = await client.create_session()
    phones = [Phone(440.0), Phone(1000.0)]
    stop = asyncio.Event()
    senders: list[asyncio.Task[None]] = []
    try:
        admin = await session.attach(audiobridge.PLUGIN)
        await audiobridge.create_room(admin, "call-room", janus.secrets.audiobridge_admin_key, "mod",
                                      prebuffer=janus.config.janus.prebuffer)
        joined = []
        for i, phone in enumerate(phones):
            await loop.create_datagram_endpoint(lambda p=phone: p, local_addr=("127.0.0.1", 0))  # type: ignore[misc]
            handle = await session.attach(audiobridge.PLUGIN, phone.on_event)  # one handle per RTP participant
            joined.append(await audiobridge.join_rtp(handle, "call-room", f"phone {i}", "pcmu",
                                                     RtpEndpoint("127.0.0.1", phone.port, 0)))
        assert joined[0].janus.ip == "127.0.0.1" and joined[0].janus.payload_type == 0
        assert [p["id"] for p in joined[1].participants] == [joined[0].id]
        listed = await audiobridge.list_participants(admin, "call-room")
        assert {p["id"] for p in listed} == {j.id for j in joined}

        senders = [loop.create_task(p.send_tone(j.janus, stop)) for p, j in zip(phones, joined, strict=True)]
        await asyncio.wait_for(asyncio.gather(*(p.heard.wait() for p in phones)), 10)
        # each hears the other's tone, not its own
        assert abs(phones[0].dominant_frequency() - 1000) < 40
        assert abs(phones[1].dominant_frequency() - 440) < 40

        await audiobridge.mute(admin, "call-room", "mod", joined[1].id)
        assert [p["muted"] for p in await audiobridge.list_participants(admin, "call-room")
                if p["id"] == joined[1].id] == [True]
        await audiobridge.kick(admin, "call-room", "mod", joined[1].id)
        await phones[0].event(lambda e: e.get("leaving") == joined[1].id)  # the kick completes asynchronously
        assert [p["id"] for p in await audiobridge.list_participants(admin, "call-room")] == [joined[0].id]
        await audiobridge.destroy_room(admin, "call-room", "mod")
    finally:
        stop.set()
        await asyncio.gather(*senders)
        for phone in phones:
            if phone.transport is not None:
                phone.transport.close()
        await session.destroy()
    assert_no_secrets(janus, caplog)


async def test_session_lost_when_janus_is_killed(janus: JanusProcess, client: JanusClient) -> None:
    reasons: list[str] = []
    session = await client.create_session(on_lost=reasons.append)
    handle = await session.attach(audiobridge.PLUGIN)
    pid = janus.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # the process this test started
    await asyncio.wait_for(session.lost.wait(), 5)
    assert len(reasons) == 1 and "unreachable" in reasons[0]
    with pytest.raises(JanusError) as gone:
        await handle.request({"request": "list"})
    assert gone.value.code == 458
    assert await janus.stop() == -signal.SIGKILL
    assert not Path(f"/proc/{pid}").exists()
    await session.destroy()


async def test_stop_ends_janus(janus: JanusProcess) -> None:
    pid = janus.pid
    assert await janus.stop() == 0  # SIGTERM: a clean exit
    assert janus.returncode == 0 and not Path(f"/proc/{pid}").exists()


async def test_supervisor_restarts_janus(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway")
    janus = JanusProcess(janus_config(tmp_path))
    ready: asyncio.Queue[int] = asyncio.Queue()

    async def on_ready() -> None:
        assert janus.pid is not None
        ready.put_nowait(janus.pid)

    task = asyncio.get_running_loop().create_task(janus.run_forever(on_ready))
    try:
        first = await asyncio.wait_for(ready.get(), 15)
        os.kill(first, signal.SIGKILL)
        second = await asyncio.wait_for(ready.get(), 15)
        assert second != first
        async with JanusClient(janus.url, janus.secrets.api_secret, timeout=5) as client:
            session = await client.create_session()  # the new process has the same secret
            await session.destroy()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert janus.returncode is not None and not Path(f"/proc/{second}").exists()
    events = [json.loads(log.JsonFormatter().format(r)) for r in caplog.records if r.name == "gateway.cluster.janus"]
    assert [e["event"] for e in events] == ["janus.started", "janus.exited", "janus.started", "janus.stopped"]
    assert events[1]["code"] == -signal.SIGKILL and events[1]["restart_in_s"] == 1.0
    assert_no_secrets(janus, caplog)


PARENT = """
import asyncio
from gateway.cluster.janus import JanusProcess
from gateway.config import load_config

async def main() -> None:
    janus = JanusProcess(load_config(None))
    await janus.start()
    print(janus.pid, flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


def test_janus_dies_with_its_parent(tmp_path: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **janus_env(tmp_path)})
    orphan_dies(parent, "Janus")


def orphan_dies(parent: subprocess.Popen[str], what: str) -> None:
    """`parent` prints its child's PID; SIGKILL the parent (no chance to stop the child itself): the child ends."""
    pid = 0
    try:
        assert parent.stdout is not None
        pid = int(parent.stdout.readline())  # bounded by the test timeout
        assert alive(pid)
        parent.kill()
        parent.wait(5)
        wait_until(lambda: not alive(pid), 10, f"{what} to end after its parent was killed")
    finally:
        stop_process(parent)
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)  # our grandchild, by PID


def alive(pid: int) -> bool:
    """Running (a zombie awaiting a reaper that is not us counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


STUBBORN_PARENT = """
import subprocess, sys
from gateway.cluster.janus import janus_child
child = subprocess.Popen(["sh", "-c", "trap '' TERM; while :; do sleep 1; done"], preexec_fn=janus_child)
print(child.pid, flush=True)
sys.stdin.read()
"""


def test_a_child_that_ignores_sigterm_still_dies_with_its_parent() -> None:
    """Janus 1.1.2 can hang in its shutdown: an orphan left by a killed gateway once held its ports for 90 minutes.
    Janus's preexec_fn asks for SIGKILL, not SIGTERM, when its parent dies: shown with a child that ignores TERM."""
    parent = subprocess.Popen([sys.executable, "-c", STUBBORN_PARENT], cwd=ROOT, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    orphan_dies(parent, "the child")
