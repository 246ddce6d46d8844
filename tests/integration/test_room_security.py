"""Attacks on the room service (issue 11, findings 2, 9 and 11), over real sockets against a real Janus:
cross-origin joins, the page's headers, expired host and phone tokens, unmuting after a mute-all, a full room,
names that pass for a phone or a moderator, garbage on the WebSocket and in credentials, credential guessing
from one source (127.0.0.2 and 127.0.0.3 stand in for strangers), and the service's memory under 20,000
bad-auth requests. One browser check (Chromium in a network namespace) for what the page itself shows."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway import log
from gateway.adapters import janus_audiobridge as audiobridge
from gateway.adapters.janus import JanusClient, JanusHandle
from gateway.cluster.janus import JanusProcess
from gateway.config import ConfigError, load_config
from gateway.rooms.service import security
from gateway.rooms.service.server import host_token, phone_token
from tests.conftest import (
    ROOT,
    Gateway,
    free_port,
    make_test_config,
    start_gateway,
    stop_gateway,
    stop_process,
    wait_until,
)
from tests.integration.test_room_phones import FakeWorker, Service, until

pytestmark = pytest.mark.timeout(90)
Message = dict[str, Any]
EVIL = "https://evil.example"


@pytest.fixture
async def admin(janus: JanusProcess) -> AsyncIterator[JanusHandle]:
    async with JanusClient(janus.url, janus.secrets.api_secret, timeout=5) as client:
        session = await client.create_session()
        try:
            yield await session.attach(audiobridge.PLUGIN)
        finally:
            await session.destroy()


class Page:
    """A browser participant as its page speaks to the service (the WebSocket only: no media)."""

    def __init__(self, service: Service, room_id: str, host: str | None = None, origin: str | None = None,
                 local: str | None = None) -> None:
        self.service = service
        self.url = f"{service.url}/rooms/{room_id}/ws" + (f"?host={host}" if host is not None else "")
        self.headers = {"Origin": origin} if origin else {}
        self.local = local
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        self.reader: asyncio.Task[None] | None = None
        self.joined: Message = {}

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(local_addr=(self.local, 0)) if self.local else None
        self.http = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10))
        self.ws = await self.http.ws_connect(self.url, headers=self.headers)
        self.reader = asyncio.get_running_loop().create_task(self._read())

    async def join(self, name: Any = "Guest", kind: str = "browser", **extra: Any) -> Message:
        """open(), `join`: the first answer that is not a state (joined or error)."""
        if self.ws is None:
            await self.open()
        await self.send({"type": "join", "kind": kind, "name": name, **extra})
        answer = await self.next(lambda m: m["type"] in ("joined", "error"))
        if answer["type"] == "joined":
            self.joined = answer
        return answer

    async def send(self, message: Message) -> None:
        assert self.ws is not None
        await self.ws.send_json(message)

    async def _read(self) -> None:
        assert self.ws is not None
        async for msg in self.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                self.inbox.put_nowait(json.loads(msg.data))

    async def next(self, predicate: Any, timeout: float = 5) -> Message:
        async with asyncio.timeout(timeout):
            while True:
                message = await self.inbox.get()
                if predicate(message):
                    return message

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.reader is not None:
            await self.reader
        if self.http is not None:
            await self.http.close()


async def refused(service: Service, path: str, headers: dict[str, str] | None = None) -> tuple[int, Message]:
    """What a WebSocket upgrade to `path` gets when refused: the status, and the reason (the same URL over HTTP)."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as info:
        await service.http.ws_connect(service.url + path, headers=headers or {})
    async with service.http.get(service.url + path, headers=headers or {}) as r:
        body = await r.json(content_type=None)
        assert r.status == info.value.status
    return info.value.status, body


def host_of(service: Service, room: Message) -> str:
    return str(room["links"]["host"].split("host=")[1])


async def new_room(service: Service, **settings: Any) -> Message:
    status, room = await service.api("POST", "/video/v1/rooms", {"name": "r", "settings": settings})
    assert status == 201, room
    return dict(room)


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    text = "\n".join(log.JsonFormatter().format(r) for r in caplog.records)
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records if r.exc_info]
    assert "Traceback" not in text


# -- finding 11: the WebSocket's Origin


async def test_a_page_of_another_origin_cannot_join(service: Service) -> None:
    room = await new_room(service)
    rid, host = room["room_id"], host_of(service, room)
    path = f"/rooms/{rid}/ws?host={host}"
    # the attack: a page on evil.example opens the room's WebSocket with a leaked (or the victim's) host link
    for origin in (EVIL, "null", f"http://127.0.0.1:{service.port}.evil.example", "file://"):
        status, body = await refused(service, path, {"Origin": origin})
        assert (status, body["error"]["code"]) == (403, "forbidden_origin"), origin
    # and its forged "call a phone" POST
    async with service.http.post(f"{service.url}/rooms/{rid}/dial", json={"to": "+15551230000", "host": host},
                                 headers={"Origin": EVIL}) as r:
        assert r.status == 403 and (await r.json())["error"]["code"] == "forbidden_origin"
    # the service's own page (the Host it is reached at), a configured origin, and the worker (no Origin) may
    for origin in (f"http://127.0.0.1:{service.port}", "https://meet.example.com", None):
        page = Page(service, rid, host, origin=origin)
        try:
            assert (await page.join("Host"))["role"] == "moderator", origin
        finally:
            await page.close()
    phone = FakeWorker(service, rid, "Phone ••••0001")
    try:
        assert (await phone.connect())["type"] == "joined"
    finally:
        await phone.close()


# -- finding 11: the page's headers


async def test_the_page_is_served_with_security_headers(service: Service) -> None:
    rid = (await new_room(service))["room_id"]
    async with service.http.get(f"{service.url}/rooms/{rid}?host=x") as r:
        page, headers = await r.text(), r.headers
    csp = {d.split()[0]: d.split()[1:] for d in headers["Content-Security-Policy"].split("; ")}
    assert csp["default-src"] == ["'none'"] and csp["script-src"] == ["'self'"] and csp["style-src"] == ["'self'"]
    assert csp["frame-ancestors"] == ["'none'"] and csp["base-uri"] == ["'none'"]
    assert csp["connect-src"][0] == "'self'" and f"ws://127.0.0.1:{service.port}" in csp["connect-src"]
    assert not any("unsafe" in v for values in csp.values() for v in values)
    assert headers["Referrer-Policy"] == "no-referrer" and headers["X-Content-Type-Options"] == "nosniff"
    assert headers["X-Frame-Options"] == "DENY" and headers["Cache-Control"] == "no-store"
    # no inline code for the policy to have to allow: the script and the style are files of the service
    assert '<script src="/static/room.js"' in page and "<script>" not in page and "style=" not in page
    assert "<style" not in page and "innerHTML" not in page
    for name, kind in (("room.js", "text/javascript"), ("room.css", "text/css")):
        async with service.http.get(f"{service.url}/static/{name}") as r:
            assert r.status == 200 and r.content_type == kind and r.headers["X-Content-Type-Options"] == "nosniff"
            assert "innerHTML" not in await r.text()
    async with service.http.get(f"{service.url}/static/..%2Fserver.py") as r:
        assert r.status == 404
    async with service.http.get(f"{service.url}/video/v1/rooms/{rid}") as r:  # every answer, errors included
        assert r.status == 401 and r.headers["Referrer-Policy"] == "no-referrer"


async def test_room_info_and_the_start_pages_lookup_give_no_more_than_the_link_or_the_pins(service: Service) -> None:
    room = await new_room(service, sip={"enabled": True})
    rid, sip, url = room["room_id"], room["sip"], service.url
    host = room["links"]["host"].split("host=")[1]

    async def get(path: str) -> tuple[int, Any]:
        async with service.http.get(url + path) as r:
            return r.status, await r.json()

    status, info = await get(f"/rooms/{rid}/info")  # the link's holder: the name and the PIN, not the moderator PIN
    assert status == 200 and info["name"] == "r" and info["role"] == "participant", info
    assert info["dial_in"]["meeting_id"] == sip["meeting_id"] and info["dial_in"]["pin"] == sip["pin"]
    assert "mpin" not in info["dial_in"] and sip["mpin"] not in json.dumps(info)
    status, info = await get(f"/rooms/{rid}/info?host={host}")
    assert status == 200 and info["dial_in"]["mpin"] == sip["mpin"] and info["role"] == "moderator"
    status, err = await get(f"/rooms/{rid}/info?host=1.{'0' * 32}")
    assert status == 403 and err["error"]["code"] == "invalid_host_link"
    plain = (await new_room(service))["room_id"]
    assert (await get(f"/rooms/{plain}/info"))[1]["dial_in"] is None  # no SIP: nothing to dial
    assert (await get("/rooms/nope/info"))[0] == 404
    status, err = await get(f"/rooms/{rid}/dial/abc?host=x")  # a call's progress: moderators only
    assert status == 403 and err["error"]["code"] == "not_moderator"

    async def lookup(body: Any, headers: dict[str, str] | None = None,
                     session: aiohttp.ClientSession | None = None) -> tuple[int, Any]:
        async with (session or service.http).post(f"{url}/rooms/lookup", json=body, headers=headers) as r:
            return r.status, await r.json()

    wrong_pin = str((int(sip["pin"]) + 1) % 10 ** len(sip["pin"])).zfill(len(sip["pin"]))
    missing = await lookup({"meeting_id": "1" + sip["meeting_id"], "pin": sip["pin"]})
    wrong = await lookup({"meeting_id": sip["meeting_id"], "pin": wrong_pin})
    assert missing == wrong and wrong[0] == 404  # which part was wrong is not told
    status, found = await lookup({"meeting_id": sip["meeting_id"], "pin": sip["pin"]})
    assert status == 200 and found == {"room_id": rid, "role": "participant", "url": f"/rooms/{rid}"}
    status, found = await lookup({"meeting_id": sip["meeting_id"], "pin": sip["mpin"]})
    assert status == 200 and found["role"] == "moderator"
    assert security.verify(service.service.secret, f"host:{rid}", found["url"].split("host=")[1], time.time()) == "ok"
    for body, field in (({"meeting_id": sip["meeting_id"]}, "pin"), ({"meeting_id": "12a", "pin": "1"}, "meeting_id"),
                        ({"meeting_id": "١٢٣", "pin": "1"}, "meeting_id")):
        status, err = await lookup(body)
        assert status == 400 and err["error"]["field"] == field, (body, err)
    status, err = await lookup({"meeting_id": sip["meeting_id"], "pin": sip["pin"]}, {"Origin": EVIL})
    assert status == 403 and err["error"]["code"] == "forbidden_origin"
    # guessing the PIN of one meeting from many addresses: the meeting's own budget ends it
    budget = service.service.meeting_failures.limit
    answers = []
    for i in range(budget + 1):
        connector = aiohttp.TCPConnector(local_addr=(f"127.0.{1 + i // 250}.{2 + i % 250}", 0))
        async with aiohttp.ClientSession(connector=connector) as stranger:
            answers.append((await lookup({"meeting_id": sip["meeting_id"], "pin": wrong_pin}, session=stranger))[0])
    assert answers[-1] == 429 and 404 in answers, answers
    assert (await lookup({"meeting_id": sip["meeting_id"], "pin": sip["pin"]}))[0] == 429  # until its minute ends


async def test_a_page_joins_muted_without_camera_and_turns_its_camera_on_and_off(service: Service) -> None:
    rid = (await new_room(service))["room_id"]
    ann, bob = Page(service, rid), Page(service, rid)
    try:
        joined = await ann.join("Ann", muted=True, video=False)
        me = next(p for p in joined["state"]["participants"] if p["id"] == joined["participant_id"])
        assert me["muted"] and not me["muted_by_moderator"] and not me["video"]
        await ann.send({"type": "mute", "muted": False})  # muted by oneself: one's own to undo
        await ann.next(lambda m: m["type"] == "state" and not m["participants"][0]["muted"])
        await bob.join("Bob", video=True)
        for on in (False, True):
            await bob.send({"type": "camera", "on": on})
            await ann.next(lambda m, on=on: m["type"] == "state" and [p["video"] for p in m["participants"]] == [False, on])
        await bob.send({"type": "camera", "on": "yes"})
        assert (await bob.next(lambda m: m["type"] == "error"))["code"] == "invalid_message"
    finally:
        await ann.close()
        await bob.close()


async def test_the_start_page_and_favicon(service: Service) -> None:
    async with service.http.get(f"{service.url}/") as r:
        page = await r.text()
        assert r.status == 200 and "Content-Security-Policy" in r.headers and '<script src="/static/start.js"' in page
    for path in ("/favicon.ico", "/static/favicon.svg"):
        async with service.http.get(service.url + path) as r:
            assert r.status == 200 and r.content_type == "image/svg+xml" and (await r.text()).startswith("<svg")


# -- finding 11: tokens expire


async def test_host_and_phone_tokens_expire(service: Service) -> None:
    room = await new_room(service)
    rid, secret = room["room_id"], service.service.secret
    fresh = host_of(service, room)
    expires = int(fresh.split(".")[0])
    assert abs(expires - (time.time() + 30 * 86400)) < 60  # host_link_days = 30 by default
    expired = host_token(secret, rid, int(time.time()) - 1)
    status, body = await refused(service, f"/rooms/{rid}/ws?host={expired}")
    assert (status, body["error"]["code"]) == (403, "host_link_expired")
    other_room = (await new_room(service))["room_id"]
    for forged in (host_token(secret, other_room, expires), f"{expires + 86400}.{fresh.split('.')[1]}",
                   fresh.split(".")[1][:24], ""):  # another room's, a stretched expiry, the old format, empty
        status, body = await refused(service, f"/rooms/{rid}/ws?host={forged}")
        assert (status, body["error"]["code"]) == (403, "invalid_host_link"), forged
    async with service.http.post(f"{service.url}/rooms/{rid}/dial", json={"to": "+15551230000", "host": expired}) as r:
        assert r.status == 403 and (await r.json())["error"]["code"] == "host_link_expired"
    page = Page(service, rid, fresh)
    try:
        assert (await page.join("Host"))["role"] == "moderator"  # the fresh one works
    finally:
        await page.close()
    # the API gives a fresh link for an existing room
    status, again = await service.api("GET", f"/video/v1/rooms/{rid}")
    assert status == 200 and int(host_of(service, again).split(".")[0]) >= expires

    # the worker's phone tokens live a minute (plus 30 s for clocks apart)
    late = FakeWorker(service, rid, "Phone ••••0002", "moderator")
    stale = phone_token(secret, rid, "moderator", now=time.time() - 120)
    try:
        assert (await late.connect(token=stale))["code"] == "not_allowed"
    finally:
        await late.close()
    ok = FakeWorker(service, rid, "Phone ••••0003", "moderator")
    try:
        assert (await ok.connect(token=phone_token(secret, rid, "moderator")))["role"] == "moderator"
    finally:
        await ok.close()


# -- finding 11: a moderator's mute-all holds


async def test_a_participant_cannot_unmute_after_a_mute_all(service: Service, admin: JanusHandle) -> None:
    room = await new_room(service)
    rid = room["room_id"]
    host = Page(service, rid, host_of(service, room))
    guest = FakeWorker(service, rid, "Phone ••••0001")
    try:
        await host.join("Host")
        await guest.join()  # a phone in the AudioBridge: its mute is Janus'
        gid = guest.joined["participant_id"]
        # the attack: "unmute me" again and again from the moment the moderator asks for a mute-all, so that one
        # arrives while Janus is muting; each followed by a round trip (talking toggled: a state comes back)
        await host.send({"type": "mute_all", "muted": True})
        answers = []
        for i in range(100):
            await guest.send({"type": "mute", "muted": False})
            await guest.send({"type": "talking", "talking": i % 2 == 0})
            answer = await guest.next(lambda m, i=i: m["type"] == "error" or (  # type: ignore[misc]
                m["type"] == "state" and guest.me(m)["talking"] == (i % 2 == 0)))
            answers.append(answer["type"] if answer["type"] == "state" else answer["code"])
            if answer["type"] == "error":
                break
        assert answers[-1] == "not_allowed", answers
        await guest.send({"type": "talking", "talking": len(answers) % 2 == 1})  # everything before it is done
        state = await guest.state(lambda m: guest.me(m)["talking"] == (len(answers) % 2 == 1))
        assert guest.me(state)["muted"], answers
        listed = {p["id"]: p for p in await audiobridge.list_participants(admin, rid)}
        assert listed[guest.rtp.id]["muted"] is True  # type: ignore[union-attr]
        # the attack, again: leave and join again (a reloaded page, a phone that calls back)
        await guest.send({"type": "leave"})
        await asyncio.wait_for(guest.closed.wait(), 5)
        await guest.close()
        guest = FakeWorker(service, rid, "Phone ••••0001")
        await guest.join()
        gid = guest.joined["participant_id"]
        assert guest.me(guest.joined["state"])["muted"]
        await guest.send({"type": "mute", "muted": False})
        assert (await guest.next(lambda m: m["type"] == "error"))["code"] == "not_allowed"
        async def muted_in_janus() -> bool:  # it is muted in the AudioBridge once the worker said rtp_joined
            listed = {p["id"]: p for p in await audiobridge.list_participants(admin, rid)}
            return bool(listed.get(guest.rtp.id, {}).get("muted"))  # type: ignore[union-attr]

        await until(muted_in_janus, 5)
        # the moderator may unmute; then the participant may mute and unmute itself
        await host.send({"type": "mute_all", "muted": False})
        await guest.state(lambda m: not guest.me(m)["muted"])
        await guest.send({"type": "mute", "muted": True})
        await guest.state(lambda m: guest.me(m)["muted"])
        await guest.send({"type": "mute", "muted": False})
        await host.next(lambda m: m["type"] == "state" and any(p["id"] == gid and not p["muted"]
                                                               for p in m["participants"]))
    finally:
        await guest.close()
        await host.close()


async def test_a_room_may_allow_self_unmute(service: Service) -> None:
    room = await new_room(service, allow_self_unmute=True)
    host = Page(service, room["room_id"], host_of(service, room))
    guest = Page(service, room["room_id"])
    try:
        await host.join("Host")
        gid = (await guest.join("Guest"))["participant_id"]
        await host.send({"type": "mute_all", "muted": True})
        await host.next(lambda m: m["type"] == "state" and any(p["id"] == gid and p["muted"] for p in m["participants"]))
        await guest.send({"type": "mute", "muted": False})
        await host.next(lambda m: m["type"] == "state" and any(p["id"] == gid and not p["muted"] for p in m["participants"]))
    finally:
        await guest.close()
        await host.close()
    status, body = await service.api("POST", "/video/v1/rooms", {"name": "x", "settings": {"allow_self_unmute": 1}})
    assert status == 400 and "allow_self_unmute" in body["error"]["message"]


# -- finding 11: a cap on participants


async def test_the_51st_participant_is_refused(service: Service) -> None:
    assert service.config.room_service.max_participants == 50
    room = await new_room(service)
    rid = room["room_id"]
    phones = [FakeWorker(service, rid, f"Phone ••••{i:04d}") for i in range(50)]
    late = Page(service, rid)
    host = Page(service, rid, host_of(service, room))
    try:
        answers = await asyncio.gather(*(p.connect() for p in phones))
        assert [a["type"] for a in answers] == ["joined"] * 50
        assert (await late.join("Late"))["code"] == "room_full"
        assert (await host.join("Host"))["code"] == "room_full"  # a hard cap: moderators too
        await phones[0].send({"type": "leave"})
        await asyncio.wait_for(phones[0].closed.wait(), 5)
        assert (await late.join("Late"))["type"] == "joined"  # a place was freed
        status, listed = await service.api("GET", f"/video/v1/rooms/{rid}/participants")
        assert status == 200 and len(listed["participants"]) == 50
    finally:
        for p in phones:
            await p.close()
        await late.close()
        await host.close()


# -- finding 11: names


@pytest.mark.parametrize(("raw", "kind", "shown"), [
    ("📞 Phone ••••1234 (moderator)", "browser", "1234"),
    ("☎️ phone: 5550100 [Host]", "browser", "5550100"),
    ("Ann (you)", "browser", "Ann"),
    ("(mod(moderator)erator) Bob", "browser", "Bob"),
    ("\u202eevil\u202c Eve\u200b\u2066x\u2069", "browser", "evil Evex"),
    ("Zoë  \t Müller\n", "browser", "Zoë Müller"),
    ("Ｐｈｏｎｅ ０１２３", "browser", "0123"),  # full-width: NFKC first
    ("<img src=x onerror=alert(1)>", "browser", "<img src=x onerror=alert(1)>"),  # text: the page never parses it
    ("x" * 200, "browser", "x" * 64),
    ("\x00\x07\x1b[31m", "browser", "[31m"),
    ("Phone ••••1234", "phone", "Phone ••••1234"),  # the worker's own names stand
    ("Phone ••12(moderator)", "phone", "Phone ••12"),
    ({"a": 1}, "browser", ""),
])
def test_names_are_cleaned(raw: object, kind: str, shown: str) -> None:
    assert security.clean_name(raw, kind, 64) == shown


async def test_names_cannot_impersonate(service: Service) -> None:
    room = await new_room(service)
    rid = room["room_id"]
    host = Page(service, rid, host_of(service, room))
    fake = Page(service, rid)
    odd = Page(service, rid)
    try:
        await host.join("Host")
        fid = (await fake.join("📞 Phone ••••1234 (moderator)"))["participant_id"]
        oid = (await odd.join("\x00\u202e"))["participant_id"]
        state = await host.next(lambda m: m["type"] == "state" and len(m["participants"]) == 3)
        names = {p["id"]: (p["name"], p["kind"], p["role"]) for p in state["participants"]}
        assert names[fid] == ("1234", "browser", "participant") and names[oid] == ("Guest", "browser", "participant")
        _, listed = await service.api("GET", f"/video/v1/rooms/{rid}/participants")
        assert {p["name"] for p in listed["participants"]} == {"Host", "1234", "Guest"}
    finally:
        for p in (odd, fake, host):
            await p.close()


# -- finding 9: bad input is a 4xx (or an error message) and one log line, never a 500 or a traceback


async def raw_http(port: int, request: bytes) -> tuple[int, bytes]:
    """One request with bytes a well-behaved client would not send (non-ASCII header values)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        return int(head.split()[1]), head
    finally:
        writer.close()


async def test_bad_input_gets_4xx_and_no_traceback(service: Service, caplog: pytest.LogCaptureFixture) -> None:
    room = await new_room(service)
    rid = room["room_id"]
    statuses: list[int] = []
    b64 = base64.b64encode
    for value in (b"Basic " + b64("ünïcödé:clé".encode()), b"Basic " + b64(b"\xff\xfe:\x80"), "Basic ¹²³".encode(),
                  b"Basic !!!", b"Basic " + b64(b"no-colon"), b"Basic " + b64(b"x" * 6000 + b":k"), b"Bearer x"):
        status, _ = await raw_http(service.port, b"GET /video/v1/rooms/" + rid.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                                   b"Authorization: " + value + b"\r\nConnection: close\r\n\r\n")
        statuses.append(status)
    assert set(statuses) == {401}, statuses
    # a non-ASCII or garbage host token on the WebSocket: refused before the upgrade, not a 500
    for token in ("%C3%BC", "%FF%FE", "1.%C3%BC", "99999999999999999999.x", "%00"):
        status, body = await refused(service, f"/rooms/{rid}/ws?host={token}")
        statuses.append(status)
        assert body["error"]["code"] == "invalid_host_link", token
    async with service.http.post(f"{service.url}/rooms/{rid}/dial", json={"to": "+1555", "host": "ü"}) as r:
        statuses.append(r.status)
    for body in (b"[" * 60000, b"\xff\xfe", b'{"name": "\\ud800"}'):  # too deep, not UTF-8, a lone surrogate
        async with service.http.post(f"{service.url}/video/v1/rooms", data=body, headers=service.auth) as r:
            statuses.append(r.status)
    assert all(400 <= s < 500 for s in statuses), statuses

    # on the WebSocket: each bad message gets an error, and the socket stays usable
    phone = FakeWorker(service, rid, "Phone ••••0001")
    page = Page(service, rid)
    try:
        assert (await phone.connect(token="ü"))["code"] == "not_allowed"
        assert (await phone.connect(token=None))["type"] == "joined"  # a new socket: the right token
        pid = (await page.join({"nested": ["name"]}))["participant_id"]
        assert page.joined["state"]["participants"][-1]["name"] == "Guest"
        assert page.ws is not None
        for garbage in ("[" * 100000, '"\\ud800"', "not json", "[]", "1e999999", "9" * 5000):
            await page.ws.send_str(garbage)
            assert (await page.next(lambda m: m["type"] == "error"))["code"] == "invalid_message", garbage[:20]
        for message in ({"type": "offer", "pc": "audio", "sdp": "garbage"},
                        {"type": "offer", "pc": "video", "sdp": "v=0\r\n" + "a=x\r\n" * 1000},
                        {"type": "answer", "pc": "sub", "sdp": "garbage"},
                        {"type": "offer", "pc": "audio", "sdp": ["not", "a", "string"]},
                        {"type": "mute", "participant_id": {"x": 1}, "muted": "yes"},
                        {"type": "remove", "participant_id": ["a"]}, {"type": ["x"]}, {"type": "rtp_joined"}):
            await page.send(message)
            answer = await page.next(lambda m: m["type"] in ("error", "answer"))
            assert answer["type"] == "error" and answer["code"] != "internal_error", (message, answer)
        await page.send({"type": "mute", "muted": True})  # still usable
        await page.next(lambda m: m["type"] == "state" and any(p["id"] == pid and p["muted"] for p in m["participants"]))
    finally:
        await page.close()
        await phone.close()
    no_tracebacks(caplog)


# -- finding 2: authentication failures per source; memory


async def test_credential_guessing_is_throttled_per_source(service: Service) -> None:
    limit = service.config.room_service.auth_failures_per_minute
    url = f"{service.url}/video/v1/rooms"

    def basic(user: str, key: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))) as stranger, \
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=("127.0.0.3", 0))) as neighbour:
        statuses = []
        for i in range(limit + 5):  # the attack: guessing app_keys from one address
            async with stranger.get(url + "/x", headers=basic("demo", f"guess{i}")) as r:
                statuses.append(r.status)
                retry = r.headers.get("Retry-After")
        assert statuses == [401] * limit + [429] * 5 and retry is not None and 1 <= int(retry) <= 61
        async with stranger.post(url, json={"name": "x"}, headers=service.auth) as r:  # even the right key, for now
            assert r.status == 429 and (await r.json())["error"]["code"] == "too_many_failures"
        for session in (neighbour, service.http):  # other sources are not concerned
            async with session.post(url, json={"name": "x"}, headers=service.auth) as r:
                assert r.status == 201
        # host links guessed on the WebSocket count as well
        rid = (await new_room(service))["room_id"]
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await stranger.ws_connect(f"{service.url}/rooms/{rid}/ws?host=1.x")
        assert info.value.status == 429


def test_config_of_the_room_service() -> None:
    config = load_config(None, {})
    rs = config.room_service
    assert (rs.allowed_origins, rs.host_link_days, rs.max_participants, rs.auth_failures_per_minute) == ([], 30, 50, 20)
    for key, value in (("ALLOWED_ORIGINS", '["evil.example"]'), ("MAX_PARTICIPANTS", "0"), ("HOST_LINK_DAYS", "0")):
        with pytest.raises(ConfigError, match=f"room_service.{key.lower()}"):
            load_config(None, {f"GATEWAY_ROOM_SERVICE_{key}": value})
    assert load_config(None, {"GATEWAY_ROOM_SERVICE_ALLOWED_ORIGINS": '["https://meet.example.com:8443"]'})


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def bad_auth(port: int, count: int, per_source: int, first: int = 0) -> None:
    """`count` requests with random 5.8 KB app_ids, `per_source` of them (pipelined on one connection) from each
    of count / per_source loopback addresses (127.1.x.y, from the `first`), as many strangers."""
    async def source(n: int) -> None:
        requests = []
        for i in range(per_source):
            app_id = os.urandom(2900).hex()  # 5.8 KB
            auth = base64.b64encode(f"{app_id}:{'k' * 32}".encode())
            last = b"Connection: close\r\n" if i == per_source - 1 else b""
            requests.append(b"GET /video/v1/rooms/x HTTP/1.1\r\nHost: x\r\n" + last + b"Authorization: Basic " + auth
                            + b"\r\n\r\n")
        address = f"127.1.{n >> 8 & 255}.{n & 255}"
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))
        try:
            writer.write(b"".join(requests))
            answers = (await reader.read()).count(b"HTTP/1.1 401 ")
            assert answers == per_source, answers
        finally:
            writer.close()

    queue = iter(range(first + 1, first + 1 + count // per_source))

    async def worker() -> None:
        for n in queue:
            await source(n)

    await asyncio.gather(*(worker() for _ in range(16)))


@pytest.mark.serial  # measures memory
@pytest.mark.timeout(300)
async def test_memory_stays_flat_under_bad_auth(tmp_path: Path) -> None:
    port = free_port()
    env = {**os.environ, "GATEWAY_DATA_DIR": str(tmp_path / "data"), "GATEWAY_LOG_LEVEL": "info"}
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "rooms", "serve", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "rooms.log").open("wb"), env=env)
    try:
        async with aiohttp.ClientSession() as http:
            async def up() -> bool:
                try:
                    async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                        return r.status == 200
                except aiohttp.ClientError:
                    return False

            async with asyncio.timeout(30):
                while not await up():
                    await asyncio.sleep(0.1)
        limit = 20  # auth_failures_per_minute: each stranger stays under it, so every request is looked at
        await bad_auth(port, 2000, limit)  # warm up: the allocator's arenas, aiohttp's buffers
        before = rss_kb(proc.pid)
        started = time.monotonic()
        await bad_auth(port, 20000, limit, first=100)
        after = rss_kb(proc.pid)
        print(f"room service RSS {before / 1024:.1f} MB -> {after / 1024:.1f} MB after 20,000 bad-auth requests "
              f"with 5.8 KB app_ids from 1,000 addresses ({time.monotonic() - started:.1f} s)")
        assert after - before < 8 * 1024, (before, after)
    finally:
        stop_process(proc)
    assert "Traceback" not in (tmp_path / "rooms.log").read_text()


# -- the page itself, in Chromium (WebRTC needs a network namespace)


@pytest.fixture
def rooms_gateway(tmp_path: Path) -> Iterator[Gateway]:
    from tests.integration.netns import network_namespace

    with network_namespace():
        env = {"GATEWAY_JANUS_HTTP_PORT": str(free_port()), "GATEWAY_JANUS_WS_PORT": str(free_port()),
               "GATEWAY_JANUS_RTP_PORT_MIN": "61000", "GATEWAY_JANUS_RTP_PORT_MAX": "61999"}
        gw = start_gateway(tmp_path, make_test_config(), env)
        try:
            wait_until(lambda: all(f'"{e}"' in gw.log() for e in ("rooms.started", "janus.started")), 60,
                       "the room service and Janus")
            yield gw
        finally:
            stop_gateway(gw)


class EvilPage(BaseHTTPRequestHandler):
    """Another origin's page (evil.example, in spirit)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = b"<!doctype html><title>evil</title>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.serial  # Chromium
@pytest.mark.timeout(180)
def test_the_page_shows_names_as_text_and_refuses_other_origins(rooms_gateway: Gateway, tmp_path: Path) -> None:
    import websocket  # websocket-client (Selenium's): a stranger's socket from this thread, so in the namespace

    from tests.integration.browser import Browser, tone_wav
    from tests.integration.test_bridge import api

    _, room = api(rooms_gateway, "POST", "/video/v1/rooms", {"name": "page"})
    base = f"ws://127.0.0.1:{rooms_gateway.rooms_port}/rooms/{room['room_id']}/ws"
    strangers = []
    for name in ("<img src=x onerror=window.pwned=1>Eve", "📞 Phone ••••1234 (moderator)"):
        ws = websocket.create_connection(base, timeout=10)
        ws.send(json.dumps({"type": "join", "kind": "browser", "name": name}))
        strangers.append(ws)
    evil = ThreadingHTTPServer(("127.0.0.1", free_port()), EvilPage)  # a thread of this one: in the namespace
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    browser = Browser(tmp_path / "host", tone_wav(tmp_path / "host.wav", 440.0))
    try:
        browser.join(room["links"]["host"], "Host")  # the page's script, from its file, runs under the policy
        wait_until(lambda: len(browser.listed()) == 3, 10, "three participants listed")
        listed = {li["text"].split("\n")[0]: li for li in browser.listed()}
        assert set(listed) == {"Host (you)", "<img src=x onerror=window.pwned=1>Eve", "1234"}, listed
        assert listed["1234"]["kind"] == "browser" and listed["1234"]["role"] == "participant"
        d = browser.driver
        assert d.execute_script("return document.querySelectorAll('#people img').length") == 0
        assert d.execute_script("return window.pwned === undefined")
        # media still works under the policy: Janus answered the page's audio offer
        wait_until(lambda: d.execute_script("return !!(window.gwMedia.pcs.audio && "
                                            "window.gwMedia.pcs.audio.remoteDescription)"), 20, "Janus' answer")
        assert browser.gw()["error"] is None
        # an expired host link: the page says so (the WebSocket's refusal, asked again over HTTP)
        secret = json.loads((rooms_gateway.data_dir / "room-service.json").read_text())["secret"]
        stale = room["links"]["host"].split("host=")[0] + "host=" + host_token(secret, room["room_id"], 1)
        browser.open(stale, "Late")
        wait_until(lambda: browser.gw().get("error") == "host_link_expired", 20, "the page to say why")
        assert "expired" in d.find_element("id", "status").text
        # a page of another origin (another port) in the same browser, with the host link: its WebSocket never opens
        d.get(f"http://127.0.0.1:{evil.server_address[1]}/")
        opened = d.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            f"const ws = new WebSocket({json.dumps(base + '?host=' + room['links']['host'].split('host=')[1])});"
            "ws.onopen = () => done('open'); ws.onerror = () => done('refused');")
        assert opened == "refused"
        wait_until(lambda: '"rooms.origin_refused"' in rooms_gateway.log(), 5, "the refusal in the log")
    finally:
        browser.close()
        for ws in strangers:
            ws.close()
        evil.shutdown()
        evil.server_close()
