"""The room service as the control plane of rooms on a real Janus, seen from the worker's side: fake workers
(the WebSocket protocol + a plain-RTP leg joined through our Janus client) join rooms as phones; the service
creates and destroys the Janus rooms, places rooms on the least-loaded server, enforces moderation in the
AudioBridge and tells everyone when Janus is lost. Loopback only: no WebRTC here (see test_bridge.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway import log
from gateway.adapters import janus_audiobridge as audiobridge
from gateway.adapters import janus_videoroom as videoroom
from gateway.adapters.janus import JanusClient, JanusHandle, JanusSession
from gateway.adapters.janus_audiobridge import RtpEndpoint
from gateway.cluster.janus import JanusProcess, JanusSecrets
from gateway.config import Config
from gateway.rooms.service.server import RoomService, phone_token
from tests.conftest import free_port
from tests.integration.test_janus import Phone, janus_config

pytestmark = pytest.mark.timeout(60)
Message = dict[str, Any]


class Service:
    """The room service in this process, on a free port."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.service = RoomService(config)
        self.runner = web.AppRunner(self.service.app(), access_log=None)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        user_key = f"{config.room_service.api_user}:{self.service.api_key}".encode()
        self.auth = {"Authorization": "Basic " + base64.b64encode(user_key).decode()}

    async def start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        await self.service.live.close()
        await self.runner.cleanup()
        await self.service.close()
        await self.http.close()

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.http.request(method, self.url + path, json=body, headers=self.auth) as r:
            return r.status, await r.json(content_type=None)

    async def room(self, name: str = "r", **settings: Any) -> str:
        status, room = await self.api("POST", "/video/v1/rooms", {"name": name, "settings": settings})
        assert status == 201, room
        return str(room["room_id"])


class FakeWorker:
    """A phone in a room as the worker does it: join over the WebSocket, the plain-RTP leg on the Janus server
    the service names (our own AudioBridge handle, with the API secret), then `rtp_joined`."""

    def __init__(self, service: Service, room_id: str, name: str, role: str = "participant", freq: float = 440.0) -> None:
        self.service = service
        self.room_id = room_id
        self.name = name
        self.role = role
        self.phone = Phone(freq)
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.seen: list[Message] = []
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.reader: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.joined: Message = {}
        self.janus: JanusClient | None = None
        self.session: JanusSession | None = None
        self.handle: JanusHandle | None = None
        self.rtp: audiobridge.RtpParticipant | None = None
        self.stop_tone = asyncio.Event()
        self.sender: asyncio.Task[None] | None = None

    async def connect(self, token: str | None = None) -> Message:
        """Send `join`; the first answer that is not a state (joined or error)."""
        self.ws = await self.service.http.ws_connect(f"{self.service.url}/rooms/{self.room_id}/ws")
        self.reader = asyncio.get_running_loop().create_task(self._read())
        secret = self.service.service.secret
        await self.send({"type": "join", "kind": "phone", "name": self.name, "role": self.role, "media": "rtp",
                         "token": token if token is not None else phone_token(secret, self.room_id, self.role)})
        answer = await self.next(lambda m: m["type"] in ("joined", "error"))
        if answer["type"] == "joined":
            self.joined = answer
        return answer

    async def join(self) -> None:
        """connect(), then the RTP leg in the AudioBridge, `rtp_joined`, and our tone toward the room."""
        answer = await self.connect()
        assert answer["type"] == "joined", answer
        janus = answer["janus"]
        secrets = JanusSecrets.load(self.service.config)
        self.janus = JanusClient(janus["url"], secrets.api_secret, timeout=5)
        self.session = await self.janus.create_session()
        self.handle = await self.session.attach(audiobridge.PLUGIN)
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self.phone, local_addr=("127.0.0.1", 0))
        self.rtp = await audiobridge.join_rtp(self.handle, janus["room"], self.name, "pcmu",
                                              RtpEndpoint("127.0.0.1", self.phone.port, 0))
        await self.send({"type": "rtp_joined", "janus_id": self.rtp.id})
        self.sender = loop.create_task(self.phone.send_tone(self.rtp.janus, self.stop_tone))

    async def send(self, message: Message) -> None:
        assert self.ws is not None
        await self.ws.send_json(message)

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                data = json.loads(msg.data)
                self.seen.append(data)
                self.inbox.put_nowait(data)
        self.closed.set()

    async def next(self, predicate: Callable[[Message], bool], timeout: float = 5) -> Message:
        async with asyncio.timeout(timeout):
            while True:
                message = await self.inbox.get()
                if predicate(message):
                    return message

    async def state(self, predicate: Callable[[Message], bool], timeout: float = 5) -> Message:
        return await self.next(lambda m: m["type"] == "state" and predicate(m), timeout)

    def me(self, state: Message, pid: str | None = None) -> Message:
        pid = pid or self.joined["participant_id"]
        return next(p for p in state["participants"] if p["id"] == pid)

    async def hears(self, freq: float, timeout: float = 10) -> None:
        """Until the last half second of what Janus sends us is dominated by `freq`."""
        self.phone.loud.clear()
        self.phone.heard.clear()
        await asyncio.wait_for(self.phone.heard.wait(), timeout)
        assert abs(self.phone.dominant_frequency() - freq) < 40, self.phone.dominant_frequency()

    async def close(self) -> None:
        self.stop_tone.set()
        if self.sender is not None:
            await self.sender
        if self.phone.transport is not None:
            self.phone.transport.close()
        if self.session is not None:
            await self.session.destroy()
        if self.janus is not None:
            await self.janus.close()
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            await self.reader


async def until(predicate: Callable[[], Awaitable[bool]], timeout: float) -> None:
    """Poll a state with a deadline (Janus sends no event to an outsider when a room goes)."""
    async with asyncio.timeout(timeout):
        while not await predicate():
            await asyncio.sleep(0.05)


@pytest.fixture
async def admin(janus: JanusProcess) -> AsyncIterator[tuple[JanusHandle, JanusHandle]]:
    """Our own look into Janus (both plugins), to check what the service did there."""
    async with JanusClient(janus.url, janus.secrets.api_secret, timeout=5) as client:
        session = await client.create_session()
        try:
            yield await session.attach(audiobridge.PLUGIN), await session.attach(videoroom.PLUGIN)
        finally:
            await session.destroy()


def assert_no_secrets(service: Service, janus: JanusProcess, caplog: pytest.LogCaptureFixture,
                      workers: list[FakeWorker]) -> None:
    lines = "\n".join(log.JsonFormatter().format(r) for r in caplog.records)
    told = json.dumps([w.seen for w in workers])
    for secret in janus.secrets.values():
        assert secret not in lines and secret not in told
    for room in (r for s in service.service.pool.servers for r in s.rooms.values()):
        assert room.secret not in lines and room.secret not in told


async def test_phones_in_a_room_on_janus(service: Service, janus: JanusProcess, admin: tuple[JanusHandle, JanusHandle],
                                         caplog: pytest.LogCaptureFixture) -> None:
    ab, vr = admin
    rid = await service.room("phones")
    host = FakeWorker(service, rid, "…0001", "moderator", freq=440.0)
    guest = FakeWorker(service, rid, "…0002", freq=1000.0)
    late = FakeWorker(service, rid, "…0003")
    intruder = FakeWorker(service, rid, "…0004", "moderator")
    workers = [host, guest, late, intruder]
    try:
        assert (await intruder.connect(token="forged"))["code"] == "not_allowed"
        await host.join()
        assert host.joined["janus"] == {"url": janus.url, "room": rid} and host.joined["role"] == "moderator"
        assert await audiobridge.exists(ab, rid) and await videoroom.exists(vr, rid)  # made on the first join
        await guest.join()
        state = await host.state(lambda s: len(s["participants"]) == 2)
        assert {p["kind"] for p in state["participants"]} == {"phone"} and state["moderator_present"]
        assert set(host.me(state)) == {"id", "name", "kind", "role", "muted", "muted_by_moderator", "talking", "video"}
        # the AudioBridge mixes them: each hears the other
        await asyncio.gather(host.hears(1000.0), guest.hears(440.0))

        # the worker's voice-activity detector -> talking in the state
        await guest.send({"type": "talking", "talking": True})
        await host.state(lambda s: host.me(s, guest.joined["participant_id"])["talking"])

        # a moderator's mute holds in Janus: the host no longer hears the guest, who cannot unmute itself
        gid = guest.joined["participant_id"]
        await host.send({"type": "mute", "participant_id": gid, "muted": True})
        await host.state(lambda s: host.me(s, gid)["muted"])
        listed = {p["id"]: p for p in await audiobridge.list_participants(ab, rid)}
        assert listed[guest.rtp.id]["muted"] is True  # type: ignore[union-attr]
        await guest.send({"type": "mute", "participant_id": gid, "muted": False})
        assert (await guest.next(lambda m: m["type"] == "error"))["code"] == "not_allowed"
        with pytest.raises(TimeoutError):
            await host.state(lambda s: not host.me(s, gid)["muted"], timeout=0.5)
        await host.send({"type": "mute_all", "muted": False})  # *9
        await host.state(lambda s: not host.me(s, gid)["muted"])
        await host.hears(1000.0)

        # a non-moderator may not lock; the moderator's lock refuses a new phone
        await guest.send({"type": "lock", "locked": True})
        assert (await guest.next(lambda m: m["type"] == "error"))["code"] == "not_allowed"
        await host.send({"type": "lock", "locked": True})
        await host.state(lambda s: s["locked"])
        assert (await late.connect())["code"] == "room_locked"

        # removal: the notice, then out of the AudioBridge and the room
        await host.send({"type": "remove", "participant_id": gid})
        await guest.next(lambda m: m["type"] == "removed")
        await asyncio.wait_for(guest.closed.wait(), 5)
        await host.state(lambda s: len(s["participants"]) == 1)
        async def only_host() -> bool:  # the kick is asynchronous in Janus (the handle is hung up)
            return [p["id"] for p in await audiobridge.list_participants(ab, rid)] == [host.rtp.id]  # type: ignore[union-attr]

        await until(only_host, 5)

        # the last one out: both Janus rooms destroyed
        await host.send({"type": "leave"})
        await asyncio.wait_for(host.closed.wait(), 5)
        await until(lambda: _gone(ab, vr, rid), 5)
    finally:
        for w in workers:
            await w.close()
    assert_no_secrets(service, janus, caplog, workers)


async def _gone(ab: JanusHandle, vr: JanusHandle, rid: str) -> bool:
    return not await audiobridge.exists(ab, rid) and not await videoroom.exists(vr, rid)


async def test_deleting_the_room_closes_it_everywhere(service: Service, admin: tuple[JanusHandle, JanusHandle]) -> None:
    ab, vr = admin
    rid = await service.room("doomed", wait_for_moderator=True)
    phone = FakeWorker(service, rid, "…0001")
    try:
        await phone.join()
        assert phone.joined["state"]["wait_for_moderator"] and not phone.joined["state"]["moderator_present"]
        status, _ = await service.api("DELETE", f"/video/v1/rooms/{rid}")
        assert status == 200
        await phone.next(lambda m: m["type"] == "room_closed")
        await asyncio.wait_for(phone.closed.wait(), 5)
        assert await _gone(ab, vr, rid)
        assert (await service.api("GET", f"/video/v1/rooms/{rid}"))[0] == 404
    finally:
        await phone.close()


async def test_janus_lost_then_back(service: Service, janus: JanusProcess) -> None:
    rid = await service.room("fragile")
    phones = [FakeWorker(service, rid, "…0001"), FakeWorker(service, rid, "…0002")]
    again = FakeWorker(service, rid, "…0003")
    try:
        for p in phones:
            await p.join()
        assert janus.pid is not None
        os.kill(janus.pid, signal.SIGKILL)  # the Janus this test started
        for p in phones:
            lost = await p.next(lambda m: m["type"] == "error", timeout=10)
            assert lost["code"] == "media_server_lost"
            await asyncio.wait_for(p.closed.wait(), 5)
        assert rid not in service.service.live.rooms
        assert (await service.api("GET", f"/video/v1/rooms/{rid}/participants"))[1]["participants"] == []
        await janus.stop()
        await janus.start()  # what the supervisor does; the service reconnects on the next join
        await again.join()
        await again.state(lambda s: len(s["participants"]) == 1)
    finally:
        for p in [*phones, again]:
            await p.close()


async def test_no_media_server_is_an_error(tmp_path: Path) -> None:
    config = janus_config(tmp_path)  # nothing listens on its Janus port
    s = Service(config)
    await s.start()
    phone = FakeWorker(s, await s.room("nowhere"), "…0001")
    try:
        answer = await phone.connect()
        assert answer["type"] == "error" and answer["code"] == "media_server_error"
        assert not s.service.live.rooms
    finally:
        await phone.close()
        await s.stop()


async def test_rooms_go_to_the_least_loaded_janus(tmp_path: Path, janus: JanusProcess) -> None:
    second = JanusProcess(janus_config(tmp_path / "second"), janus.secrets)  # one set of secrets for the pool
    await second.start()
    config = janus.config
    config.janus.urls = [janus.url, second.url]
    s = Service(config)
    await s.start()
    rooms = [await s.room(f"r{i}") for i in range(3)]
    workers = [FakeWorker(s, rooms[0], "a"), FakeWorker(s, rooms[0], "b"), FakeWorker(s, rooms[1], "c"),
               FakeWorker(s, rooms[2], "d")]
    try:
        urls = []
        for w in workers:
            answer = await w.connect()
            assert answer["type"] == "joined", answer
            urls.append(answer["janus"]["url"])
        # room 0 (2 phones) on the first, room 1 on the empty second, room 2 on the second (1 < 2)
        assert urls == [janus.url, janus.url, second.url, second.url]
        health = await (await s.http.get(f"{s.url}/healthz")).json()
        assert [(h["url"], h["rooms"]) for h in health["janus"]] == [(janus.url, 1), (second.url, 2)]
        assert "secret" not in json.dumps(health)
    finally:
        for w in workers:
            await w.close()
        await s.stop()
        await second.stop()

