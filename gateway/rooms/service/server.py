"""The embedded room service: an EnableX-style Video API subset, the room page, its signalling and moderation.
It is the control plane of the rooms: the media runs on Janus (AudioBridge mixes everyone's audio, phones
included as plain-RTP participants; VideoRoom relays every camera to every browser), see `live.py`,
`janus_rooms.py` and `signalling.py`. It runs in its own process (`gateway rooms serve`; `gateway run` starts
it beside the worker).

REST (HTTP Basic: a project's app_id:app_key, which sees its own rooms only, or the service's
api_user:api_key, which sees every room and creates rooms in `project` (default: the first configured)):
    POST   /video/v1/rooms                          {name, settings: {sip: {enabled}, wait_for_moderator}}
    GET    /video/v1/rooms/{room_id}
    GET    /video/v1/rooms/{room_id}/participants
    DELETE /video/v1/rooms/{room_id}
Page and signalling (the room_id is the capability; ?host=TOKEN makes a moderator):
    GET    /rooms/{room_id}          the web page
    GET    /rooms/{room_id}/ws       JSON messages, below
    POST   /rooms/{room_id}/dial     {to, host}: a moderator calls a phone into the room (the Voice API, with the
                                     room's project's credentials and its first number with out=true)

WebSocket messages (JSON objects, `type` first):
  from a browser  join {kind: "browser", name}; offer {pc: "audio"|"video", sdp}; answer {pc: "sub", sdp}
  from a phone    join {kind: "phone", name, token, role, media: "rtp"}; rtp_joined {janus_id}; talking {talking}
  from either     mute {participant_id?, muted}; mute_all {muted}; lock {locked}; remove {participant_id}; leave
  to a browser    joined {participant_id, role, state, ice_servers}; answer {pc, sdp};
                  offer {pc: "sub", sdp, streams: [{mid, feed, kind, active}]}
  to a phone      joined {participant_id, role, state, janus: {url, room}} (the worker joins the AudioBridge
                  there with the Janus API secret, then says rtp_joined)
  to everyone     state {participants: [{id, name, kind, role, muted, talking}], locked, moderator_present,
                  wait_for_moderator}; removed; room_closed; error {code, message} (room_locked, not_allowed,
                  media_server_error, media_server_lost: the socket is closed after it)
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from ... import log
from ...cluster.janus import JanusSecrets
from ...config import Config
from ...store.projects import ProjectStore
from ...store.rooms import RoomStore
from ..directory import publish_room, unpublish_room
from .janus_rooms import JanusPool, janus_urls
from .live import MAX_NAME, LiveRooms

logger = logging.getLogger("gateway.rooms")
PAGE = Path(__file__).parent / "static" / "room.html"
DIALS_PER_MINUTE = 10  # outbound calls one room's page may place


def service_secrets(config: Config) -> dict[str, str]:
    """The API key and the gateway<->service secret: from config, else generated once into the data dir."""
    rs = config.room_service
    path = config.data_dir / "room-service.json"
    stored: dict[str, str] = {}
    if path.exists():
        stored = json.loads(path.read_text())
    changed = False
    for key in ("api_key", "secret"):
        if getattr(rs, key):
            stored[key] = getattr(rs, key)
        elif key not in stored:
            stored[key] = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
            changed = True
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(stored, f)
    return stored


def host_token(secret: str, room_id: str) -> str:
    return hmac.new(secret.encode(), f"host:{room_id}".encode(), hashlib.sha256).hexdigest()[:24]


def phone_token(secret: str, room_id: str, role: str) -> str:
    return hmac.new(secret.encode(), f"phone:{room_id}:{role}".encode(), hashlib.sha256).hexdigest()


def room_links(config: Config, secret: str, room_id: str) -> dict[str, str]:
    """The page for participants, and the moderator (host) page."""
    rs = config.room_service
    base = rs.url or f"http://{rs.host}:{rs.port}"
    return {"join": f"{base}/rooms/{room_id}", "host": f"{base}/rooms/{room_id}?host={host_token(secret, room_id)}"}


def error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": {"code": code, "message": message}}, status=status)


class RoomService:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = RoomStore(config.data_dir)
        self.projects = ProjectStore(config.data_dir)
        for project in config.projects:
            self.projects.ensure(project)
        secrets = service_secrets(config)
        self.api_key, self.secret = secrets["api_key"], secrets["secret"]
        self._dials: dict[str, list[float]] = {}
        # several workers: rooms go into the shared directory in Redis as they are made and deleted
        self.redis: Any = None
        if config.cluster.redis_url:
            import redis.asyncio as aioredis

            self.redis = aioredis.from_url(config.cluster.redis_url, decode_responses=True, socket_timeout=2)
        self.voice_api_url = config.room_service.voice_api_url or f"http://{config.http.host}:{config.http.port}"
        self.pool = JanusPool(janus_urls(config), lambda: JanusSecrets.load(config), config.janus.prebuffer,
                              on_lost=lambda server: self.live.server_lost(server))
        self.live = LiveRooms(config, self.pool, lambda room_id, role: phone_token(self.secret, room_id, role),
                              lambda room_id: host_token(self.secret, room_id), self.redis)

    def room_json(self, room: dict[str, Any]) -> dict[str, Any]:
        live = self.live.rooms.get(room["room_id"])
        out = dict(room)
        out["links"] = room_links(self.config, self.secret, room["room_id"])
        out["participants"] = len(live.participants) if live else 0
        return out

    # -- REST
    @web.middleware
    async def auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/video/"):
            header = request.headers.get("Authorization", "")
            ok = False
            if header.startswith("Basic "):
                try:
                    user, _, key = base64.b64decode(header[6:]).decode().partition(":")
                    ok = hmac.compare_digest(user, self.config.room_service.api_user) and hmac.compare_digest(key, self.api_key)
                    request["project"] = None  # the service's own credentials: every room
                    if not ok:
                        project = await asyncio.to_thread(self.projects.authenticate, user, key)
                        ok = project is not None
                        request["project"] = project.name if project else None
                except (ValueError, UnicodeDecodeError):
                    ok = False
            if not ok:
                r = error(401, "unauthorized", "HTTP Basic credentials (app_id:app_key, or api_user:api_key) required")
                r.headers["WWW-Authenticate"] = 'Basic realm="rooms"'
                return r
        return await handler(request)

    async def create_room(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return error(400, "invalid_json", "the body must be JSON")
        if not isinstance(body, dict):
            return error(400, "invalid_body", "the body must be a JSON object")
        name = body.get("name")
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            return error(400, "invalid_name", f"name: a string of 1-{MAX_NAME} characters")
        settings = body.get("settings", {})
        if not isinstance(settings, dict):
            return error(400, "invalid_settings", "settings: an object")
        sip = settings.get("sip", {})
        if not isinstance(sip, dict) or not isinstance(sip.get("enabled", False), bool):
            return error(400, "invalid_settings", "settings.sip.enabled: a boolean")
        wait = settings.get("wait_for_moderator", False)
        if not isinstance(wait, bool):
            return error(400, "invalid_settings", "settings.wait_for_moderator: a boolean")
        project = request.get("project")
        if project is None:
            project = body.get("project", self.config.projects[0].name if self.config.projects else "")
            if not isinstance(project, str) or await asyncio.to_thread(self.projects.by_name, project) is None:
                return error(400, "invalid_project", "project: the name of an existing project")
        rooms = self.config.rooms
        room = await asyncio.to_thread(self.store.create, name, bool(sip.get("enabled")), rooms.meeting_id_digits,
                                       rooms.pin_digits, {"wait_for_moderator": wait}, None, project)
        await self._publish(publish_room, room)
        log.event(logger, "room.created", room_id=room["room_id"], sip=bool(sip.get("enabled")), project=project)
        return web.json_response(self.room_json(room), status=201)

    async def _publish(self, action: Any, room: dict[str, Any]) -> None:
        if self.redis is None:
            return
        try:
            await action(self.redis, room)
        except Exception as exc:  # noqa: BLE001 - the room exists; a worker publishes it on first lookup
            log.event(logger, "room.publish_failed", logging.WARNING, room_id=room["room_id"], error=str(exc)[:200])

    async def _visible(self, request: web.Request) -> dict[str, Any] | None:
        """The room named in the path, if it exists and the credentials may see it."""
        room = await asyncio.to_thread(self.store.get, request.match_info["room_id"])
        project = request.get("project")
        return None if room is None or (project is not None and room["project"] != project) else room

    async def get_room(self, request: web.Request) -> web.Response:
        room = await self._visible(request)
        if room is None:
            return error(404, "room_not_found", "no room with this room_id")
        return web.json_response(self.room_json(room))

    async def participants(self, request: web.Request) -> web.Response:
        room_id = request.match_info["room_id"]
        if await self._visible(request) is None:
            return error(404, "room_not_found", "no room with this room_id")
        live = self.live.rooms.get(room_id)
        return web.json_response({"room_id": room_id, "participants": [p.public() for p in live.participants.values()] if live else []})

    async def delete_room(self, request: web.Request) -> web.Response:
        room_id = request.match_info["room_id"]
        room = await self._visible(request)
        if room is None or not await asyncio.to_thread(self.store.delete, room_id):
            return error(404, "room_not_found", "no room with this room_id")
        await self._publish(unpublish_room, room)
        await self.live.delete(room_id)
        log.event(logger, "room.deleted", room_id=room_id)
        return web.json_response({"room_id": room_id, "state": "deleted"})

    async def dial(self, request: web.Request) -> web.Response:
        room_id = request.match_info["room_id"]
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            return error(400, "invalid_json", "the body must be JSON")
        if not isinstance(body, dict) or not isinstance(body.get("to"), str):
            return error(400, "invalid_input", "to: the number (E.164) or sip: URI to call")
        if not hmac.compare_digest(str(body.get("host", "")), host_token(self.secret, room_id)):
            return error(403, "not_moderator", "only the room's moderators (the host link) can call out")
        now = asyncio.get_running_loop().time()
        recent = [t for t in self._dials.get(room_id, []) if t > now - 60]
        if len(recent) >= DIALS_PER_MINUTE:  # a leaked host link must not become a toll-fraud tool
            return error(429, "too_many_calls", f"at most {DIALS_PER_MINUTE} calls per minute from one room")
        self._dials[room_id] = recent + [now]
        room = await asyncio.to_thread(self.store.get, room_id)
        if room is None:
            return error(404, "room_not_found", "no room with this room_id")
        project = await asyncio.to_thread(self.projects.by_name, room["project"])
        caller_id = next((n.number for n in project.numbers if n.outbound), None) if project else None
        if project is None or caller_id is None:
            return error(409, "no_caller_id", f"project {room['project']!r} has no number with out=true to call from")
        url = f"{self.voice_api_url}/voice/v1/room/{room_id}/join"
        payload = {"from": caller_id, "to": body["to"], "name": "Called from the room", "owner_ref": "room-page"}
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                async with session.post(url, json=payload, auth=aiohttp.BasicAuth(project.app_id, project.app_key)) as r:
                    answer = await r.json(content_type=None)
                    status = r.status
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return error(502, "voice_api_unreachable", f"the gateway's Voice API did not answer: {exc}")
        log.event(logger, "room.dial", room_id=room_id, status=status, voice_id=(answer or {}).get("voice_id"))
        return web.json_response(answer, status=status)

    # -- page
    async def page(self, request: web.Request) -> web.Response:
        room = await asyncio.to_thread(self.store.get, request.match_info["room_id"])
        if room is None:
            return web.Response(status=404, text="No such room.", content_type="text/plain")
        return web.Response(text=PAGE.read_text(), content_type="text/html")

    # -- signalling
    async def websocket(self, request: web.Request) -> web.StreamResponse:
        room_id = request.match_info["room_id"]
        record = await asyncio.to_thread(self.store.get, room_id)
        if record is None:
            return error(404, "room_not_found", "no room with this room_id")
        ws = web.WebSocketResponse(heartbeat=20, max_msg_size=256 * 1024)
        await ws.prepare(request)
        joined = None
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                try:
                    data = json.loads(msg.data)
                    if not isinstance(data, dict):
                        raise ValueError
                except ValueError:
                    await ws.send_json({"type": "error", "code": "invalid_message", "message": "messages are JSON objects"})
                    continue
                if joined is not None:
                    room, me = joined
                    if me.closing:
                        break
                    await self.live.command(room, me, data)
                    if data.get("type") == "leave":
                        break
                elif data.get("type") == "join":
                    joined = await self.live.join(room_id, record.get("settings", {}), ws, data,
                                                  request.query.get("host", ""))
                else:
                    await ws.send_json({"type": "error", "code": "not_joined", "message": "join first"})
        finally:
            if joined is not None:
                await self.live.leave(*joined)
        return ws

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.auth], client_max_size=64 * 1024)
        async def healthz(request: web.Request) -> web.Response:
            servers = [{"url": s.url, "connected": s.alive, "rooms": len(s.rooms)} for s in self.pool.servers]
            return web.json_response({"status": "ok", "rooms": len(self.live.rooms), "janus": servers})

        app.router.add_get("/healthz", healthz)
        app.router.add_post("/video/v1/rooms", self.create_room)
        app.router.add_get("/video/v1/rooms/{room_id}", self.get_room)
        app.router.add_get("/video/v1/rooms/{room_id}/participants", self.participants)
        app.router.add_delete("/video/v1/rooms/{room_id}", self.delete_room)
        app.router.add_get("/rooms/{room_id}", self.page)
        app.router.add_get("/rooms/{room_id}/ws", self.websocket)
        app.router.add_post("/rooms/{room_id}/dial", self.dial)
        return app

    async def close(self) -> None:
        """After the HTTP server stopped: everyone out, Janus rooms destroyed, stores closed."""
        await self.live.close()
        await self.pool.close()
        self.store.close()
        self.projects.close()
        if self.redis is not None:
            await self.redis.aclose()


def serve(config: Config) -> None:
    """Run until SIGTERM/SIGINT. `rooms.started` is logged once the port is bound (listening)."""
    import signal

    async def main() -> None:
        service = RoomService(config)
        runner = web.AppRunner(service.app(), access_log=None)
        await runner.setup()
        rs = config.room_service
        await web.TCPSite(runner, rs.host, rs.port).start()
        log.event(logger, "rooms.started", http=f"{rs.host}:{rs.port}", data_dir=str(config.data_dir))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await service.live.close()  # participants told first (their sockets closed), then the server stops
        await runner.cleanup()
        await service.close()
        log.event(logger, "rooms.stopped")

    asyncio.run(main())
