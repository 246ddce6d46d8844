"""The embedded room service: an EnableX-style Video API subset, the room page, its signalling and moderation.
It is the control plane of the rooms: the media runs on Janus (AudioBridge mixes everyone's audio, phones
included as plain-RTP participants; VideoRoom relays every camera to every browser), see `live.py`,
`janus_rooms.py` and `signalling.py`. It runs in its own process (`gateway rooms serve`; `gateway run` starts
it beside the worker).

REST (HTTP Basic: a project's app_id:app_key, which sees its own rooms only, or the service's
api_user:api_key, which sees every room and creates rooms in `project` (default: the first configured)):
    POST   /video/v1/rooms                          {name, settings: {sip: {enabled}, wait_for_moderator,
                                                     allow_self_unmute}}
    GET    /video/v1/live                           the rooms someone is in now, with their participants
    GET    /video/v1/rooms/{room_id}
    GET    /video/v1/rooms/{room_id}/participants
    DELETE /video/v1/rooms/{room_id}
    POST   /video/v1/rooms/{room_id}/recording      record the room's mix while it is live (DELETE: stop); the file
                                                     is listed and served by the Voice API (recording.py)
    Every source gets `auth_failures_per_minute` bad credentials, then 429 (Retry-After) until its minute ends.
Page and signalling (the room_id is the capability; ?host=TOKEN makes a moderator):
    GET    /                         the start page: what this is, join by link or by meeting ID and PIN
    POST   /rooms/lookup             {meeting_id, pin}: the room's link (a host link for the moderator PIN); misses
                                     count against the source and the meeting ID
    GET    /rooms/{room_id}          the web page (its script and style: /static/room.js, /static/room.css)
    GET    /rooms/{room_id}/info     ?host=: its name and dial-in details (numbers, meeting ID, PIN; mpin for hosts)
    GET    /rooms/{room_id}/ws       JSON messages, below. Refused before the upgrade: 403 forbidden_origin (a page of
                                     another origin), 403 invalid_host_link / host_link_expired, 429
    POST   /rooms/{room_id}/dial     {to, host}: a moderator calls a phone into the room (the Voice API, with the
                                     room's project's credentials and its first number with out=true)
    GET    /rooms/{room_id}/dial/{voice_id}?host=TOKEN   that call's progress (state, phase, reason, sip_code)
A host TOKEN is EXPIRES.MAC, good for `host_link_days` (fresh links: GET /video/v1/rooms/{room_id}, `gateway
rooms create`); a phone token (the worker's, one per join) is good for a minute. Only the service's own origin
(the Host it is reached at, `url`, `allowed_origins`) may open the WebSocket from a browser; clients without an
Origin (the worker) authenticate with their token.

WebSocket messages (JSON objects, `type` first):
  from a browser  join {kind: "browser", name, muted?, video?}; camera {on}; offer {pc: "audio"|"video", sdp}; answer {pc: "sub", sdp}
  from a phone    join {kind: "phone", name, token, role, media: "rtp"}; rtp_joined {janus_id}; talking {talking}
  from either     mute {participant_id?, muted}; mute_all {muted}; lock {locked}; remove {participant_id}; leave
  to a browser    joined {participant_id, role, state, ice_servers}; answer {pc, sdp};
                  offer {pc: "sub", sdp, streams: [{mid, feed, kind, active}]}
  to a phone      joined {participant_id, role, state, janus: {url, room}} (the worker joins the AudioBridge
                  there with the Janus API secret, then says rtp_joined)
  to everyone     state {participants: [{id, name, kind, role, muted, muted_by_moderator, talking, video}], locked,
                  moderator_present,
                  wait_for_moderator}; removed; room_closed; error {code, message} (room_locked, room_full,
                  not_allowed, invalid_message, media_server_error, media_server_lost: the socket is closed after
                  the last one)
Names are cleaned (`security.clean_name`); a moderator's mute holds unless the room has allow_self_unmute.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from ... import log, tls
from ...cluster.janus import JanusSecrets
from ...config import Config
from ...sources import FailureWindow, source_key
from ...store.projects import ProjectStore
from ...store.rooms import RoomStore, name_problem
from ..directory import pin_key, publish_room, unpublish_room
from . import security
from .janus_rooms import JanusPool, janus_urls
from .links import (
    check_host_token,
    check_phone_token,
    room_links,
    running_service,
    service_secrets,
    write_running,
)
from .links import host_token as host_token  # noqa: F401 - used by importers of the service
from .links import phone_token as phone_token  # noqa: F401
from .live import LiveRooms
from .recording import RecordingError, RoomRecorder

logger = logging.getLogger("gateway.rooms")
PROJECT = web.RequestKey("project", str)  # the authenticated project; absent: the service's own credentials
STATIC = Path(__file__).parent / "static"
ASSETS = {"room.js": "text/javascript", "room.css": "text/css", "start.js": "text/javascript",
          "favicon.svg": "image/svg+xml"}  # what /static/ serves
DIALS_PER_MINUTE = 10  # outbound calls one room's page may place
VOICE_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MAX_CREDENTIAL = 256  # longer Basic user names or keys are refused before any lookup


def error(status: int, code: str, message: str, field: str | None = None) -> web.Response:
    body: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        body["field"] = field
    return web.json_response({"error": body}, status=status)


def credentials(header: str) -> tuple[str, str] | None:
    """user, key of an HTTP Basic Authorization header; None for anything else (non-ASCII, not UTF-8, too long)."""
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic" or not value.isascii() or len(value) > 4 * MAX_CREDENTIAL:
        return None
    try:
        user, colon, key = base64.b64decode(value.strip(), validate=True).decode().partition(":")
    except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError
        return None
    if not colon or len(user) > MAX_CREDENTIAL or len(key) > MAX_CREDENTIAL:
        return None
    return user, key


async def json_body(request: web.Request) -> Any:
    """The request's JSON; ValueError for anything else (not JSON, not UTF-8, nested too deep)."""
    try:
        return await request.json()
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ValueError("the body must be JSON") from exc


async def json_object(request: web.Request) -> dict[str, Any] | web.Response:
    """The request's JSON object, or the 400 to answer."""
    try:
        body = await json_body(request)
    except ValueError:
        return error(400, "invalid_json", "the body must be JSON")
    if not isinstance(body, dict):
        return error(400, "invalid_body", "the body must be a JSON object")
    return body


def where(exc: BaseException) -> str:
    """file:line where `exc` was raised: what a log line keeps of a traceback."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return f"{Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno}" if tb is not None else ""


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
        self._static = {name: (STATIC / name).read_text() for name in (*ASSETS, "room.html", "start.html")}
        rs = config.room_service
        self.failures = FailureWindow(rs.auth_failures_per_minute, 60.0)
        self.meeting_failures = FailureWindow(config.ivr.pin_failures_per_meeting or 30, 60.0)  # the start page
        self.origins = {o for o in (security.origin_of(u) for u in [rs.url, *rs.allowed_origins]) if o}
        # several workers: rooms go into the shared directory in Redis as they are made and deleted
        self.redis: Any = None
        if config.cluster.redis_url:
            import redis.asyncio as aioredis

            self.redis = aioredis.from_url(config.cluster.redis_url, decode_responses=True, socket_timeout=2)
        http = config.http
        self.voice_api_url = config.room_service.voice_api_url or f"{tls.scheme(http.tls_cert)}://{http.host}:{http.port}"
        self.voice_api_tls = tls.internal(http.tls_cert)  # the gateway's Voice API serves http.tls_cert
        self.pool = JanusPool(janus_urls(config), lambda: JanusSecrets.load(config), config.janus.prebuffer,
                              on_lost=lambda server: self.live.server_lost(server))
        self.live = LiveRooms(config, self.pool,
                              lambda room_id, role, token: check_phone_token(self.secret, room_id, role, token),
                              self.redis)
        self.recorder = self.live.recorder = RoomRecorder(config, self.projects)

    def room_json(self, room: dict[str, Any]) -> dict[str, Any]:
        live = self.live.rooms.get(room["room_id"])
        out = dict(room)
        out["links"] = room_links(self.config, self.secret, room["room_id"])
        out["participants"] = len(live.participants) if live else 0
        return out

    # -- every request
    @web.middleware
    async def errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """The last resort: an unexpected exception is a 500 and one log line, never a traceback."""
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except Exception as exc:  # noqa: BLE001 - see above
            log.event(logger, "rooms.request_failed", logging.ERROR, method=request.method, path=request.path[:200],
                      error=f"{type(exc).__name__}: {exc}"[:200], at=where(exc))
            return error(500, "internal_error", "the room service failed to answer")

    async def headers(self, request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(security.COMMON_HEADERS)
        if self.config.room_service.tls_cert:  # over HTTPS: browsers keep to it
            response.headers["Strict-Transport-Security"] = tls.HSTS

    def throttled(self, request: web.Request) -> web.Response | None:
        """429 while the request's source is over its authentication failures."""
        wait = self.failures.blocked(source_key(request.remote))
        if wait is None:
            return None
        r = error(429, "too_many_failures", "too many authentication failures from this address: try again later")
        r.headers["Retry-After"] = str(wait)
        return r

    def auth_failed(self, request: web.Request, what: str) -> None:
        """Count a failure against the request's source: one line each (debug), one warning when it is throttled."""
        source = source_key(request.remote)
        log.event(logger, "rooms.auth_failed", logging.DEBUG, source=source, what=what)
        if self.failures.failed(source):
            log.event(logger, "rooms.auth_throttled", logging.WARNING, source=source, what=what,
                      limit=self.failures.limit)

    # -- REST
    @web.middleware
    async def auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/video/"):
            refused = self.throttled(request)
            if refused is not None:
                return refused
            found = await self.authenticate(request.headers.get("Authorization", ""))
            if found is None:
                self.auth_failed(request, "api")
                r = error(401, "unauthorized", "HTTP Basic credentials (app_id:app_key, or api_user:api_key) required")
                r.headers["WWW-Authenticate"] = 'Basic realm="rooms", charset="UTF-8"'
                return r
            if found:  # "": the service's own credentials, which see every room
                request[PROJECT] = found
        return await handler(request)

    async def authenticate(self, header: str) -> str | None:
        """The project the credentials are a key of, "" for the service's own, None for no one."""
        creds = credentials(header)
        if creds is None:
            return None
        user, key = creds
        rs = self.config.room_service
        if hmac.compare_digest(user.encode(), rs.api_user.encode()) and hmac.compare_digest(key.encode(),
                                                                                           self.api_key.encode()):
            return ""
        if not (user.isascii() and key.isascii()):  # app_ids and app_keys are ASCII
            return None
        project = await asyncio.to_thread(self.projects.authenticate, user, key)
        return project.name if project is not None else None

    async def create_room(self, request: web.Request) -> web.Response:
        body = await json_object(request)
        if isinstance(body, web.Response):
            return body
        name = body.get("name")
        problem = name_problem(name)  # the CLI checks the same rule
        if problem is not None or not isinstance(name, str):
            return error(400, "invalid_name", f"name: {problem}", "name")
        settings = body.get("settings", {})
        if not isinstance(settings, dict):
            return error(400, "invalid_settings", "settings: an object")
        sip = settings.get("sip", {})
        if not isinstance(sip, dict) or not isinstance(sip.get("enabled", False), bool):
            return error(400, "invalid_settings", "settings.sip.enabled: a boolean")
        wait = settings.get("wait_for_moderator", False)
        if not isinstance(wait, bool):
            return error(400, "invalid_settings", "settings.wait_for_moderator: a boolean")
        self_unmute = settings.get("allow_self_unmute", False)
        if not isinstance(self_unmute, bool):
            return error(400, "invalid_settings", "settings.allow_self_unmute: a boolean")
        project = request.get(PROJECT)
        if project is None:
            project = body.get("project", self.config.projects[0].name if self.config.projects else "")
            if not isinstance(project, str) or await asyncio.to_thread(self.projects.by_name, project) is None:
                return error(400, "invalid_project", "project: the name of an existing project")
        rooms = self.config.rooms
        room = await asyncio.to_thread(self.store.create, name, bool(sip.get("enabled")), rooms.meeting_id_digits,
                                       rooms.pin_digits, {"wait_for_moderator": wait,
                                                          "allow_self_unmute": self_unmute}, None, project)
        await self._publish(lambda redis, r: publish_room(redis, r, pin_key(self.secret)), room)  # PINs keyed
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
        project = request.get(PROJECT)
        return None if room is None or (project is not None and room["project"] != project) else room

    async def get_room(self, request: web.Request) -> web.Response:
        room = await self._visible(request)
        if room is None:
            return error(404, "room_not_found", "no room with this room_id")
        return web.json_response(self.room_json(room))

    async def live_rooms(self, request: web.Request) -> web.Response:
        """The rooms with someone in them now (the credentials' own: a project's, or all for the operator's), each
        with its participants: what the operator console shows (browsers included, which no worker knows of)."""
        project = request.get(PROJECT)
        rooms = [{"room_id": room.id, "project": room.project, "recording": room.recording is not None,
                  "locked": room.locked, "participants": [p.public() for p in room.participants.values()]}
                 for room in list(self.live.rooms.values())
                 if room.participants and (project is None or room.project == project)]
        return web.json_response({"rooms": rooms})

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

    async def recording(self, request: web.Request) -> web.Response:
        """POST: record the room's mix (the room must be live: someone in it); DELETE: stop. The file is listed and
        served by the Voice API (/voice/v1/recordings?room_id=) with the project's credentials."""
        room_id = request.match_info["room_id"]
        record = await self._visible(request)
        live = self.live.rooms.get(room_id)
        if record is None:
            return error(404, "room_not_found", "no room with this room_id")
        try:
            if request.method == "POST":
                if live is None:
                    raise RecordingError("room_not_live", "nobody is in the room: a room records while it is live")
                async with live.lock:
                    meta = await self.recorder.start(live, record["project"], "api")
                state = "recording"
            else:
                stopped = await self.recorder.stop(live, "api") if live is not None else None
                if stopped is None:
                    raise RecordingError("not_recording", "the room is not being recorded")
                meta, state = stopped, "stopped"
        except RecordingError as exc:
            return error(exc.status, exc.code, exc.message)
        return web.json_response({"state": state, "room_id": room_id, "recording_id": meta["id"]})

    async def dial(self, request: web.Request) -> web.Response:
        room_id = request.match_info["room_id"]
        body = await self.page_post(request)
        if isinstance(body, web.Response):
            return body
        if not isinstance(body.get("to"), str):
            return error(400, "invalid_input", "to: the number (E.164) or sip: URI to call", "to")
        verdict = check_host_token(self.secret, room_id, body.get("host"))
        if verdict != "ok":
            self.auth_failed(request, "dial")
            return error(403, "host_link_expired" if verdict == "expired" else "not_moderator",
                         "only the room's moderators (a valid host link) can call out", "host")
        now = asyncio.get_running_loop().time()
        for rid in [r for r, times in self._dials.items() if times[-1] <= now - 60]:  # rooms that stopped calling
            del self._dials[rid]
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
        payload = {"from": caller_id, "to": body["to"], "name": "Called from the room", "owner_ref": "room-page"}
        try:
            status, answer = await self._voice_api("POST", f"/voice/v1/room/{room_id}/join", project, payload)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return error(502, "voice_api_unreachable", f"the gateway's Voice API did not answer: {exc}")
        log.event(logger, "room.dial", room_id=room_id, status=status,
                  voice_id=answer.get("voice_id") if isinstance(answer, dict) else None)
        return web.json_response(answer, status=status)

    async def _voice_api(self, method: str, path: str, project: Any, payload: Any = None) -> tuple[int, Any]:
        """Call the gateway's Voice API as the room's project (its internal key: the app_key is not kept)."""
        auth = aiohttp.BasicAuth(project.app_id, self.projects.internal_key(project))
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.request(method, f"{self.voice_api_url}{path}", json=payload, auth=auth,
                                       **self.voice_api_tls) as r:
                return r.status, await r.json(content_type=None)

    async def dial_progress(self, request: web.Request) -> web.Response:
        """A moderator's page follows the call it placed: ringing, answered, in the room, or ended and why."""
        room_id, voice_id = request.match_info["room_id"], request.match_info["voice_id"]
        refused = self.throttled(request) or self.foreign(request)
        if refused is not None:
            return refused
        if check_host_token(self.secret, room_id, request.query.get("host")) != "ok":
            self.auth_failed(request, "dial")
            return error(403, "not_moderator", "only the room's moderators (a valid host link) follow calls", "host")
        room = await asyncio.to_thread(self.store.get, room_id)
        project = await asyncio.to_thread(self.projects.by_name, room["project"]) if room else None
        if room is None or project is None or not VOICE_ID.fullmatch(voice_id):  # a UUID: nothing else reaches the API
            return error(404, "call_not_found", "no such call from this room", "voice_id")
        try:
            status, call = await self._voice_api("GET", f"/voice/v1/calls/{voice_id}", project)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return error(502, "voice_api_unreachable", f"the gateway's Voice API did not answer: {exc}")
        if status != 200 or not isinstance(call, dict) or call.get("room_id") != room_id:  # this room's calls only
            return error(404, "call_not_found", "no such call from this room", "voice_id")
        return web.json_response({k: call.get(k) for k in ("voice_id", "state", "phase", "reason", "sip_code",
                                                            "answered_at", "ended_at")})

    # -- page
    async def page(self, request: web.Request) -> web.Response:
        room = await asyncio.to_thread(self.store.get, request.match_info["room_id"])
        if room is None:
            return web.Response(status=404, text="No such room.", content_type="text/plain")
        return web.Response(text=self.static("room.html"), content_type="text/html",
                            headers=security.page_headers(request.host))

    def dial_in_numbers(self, room: dict[str, Any]) -> list[str]:
        """The numbers that reach this room: IVR numbers of its project (or shared by every project), and
        numbers routed straight to it."""
        project = self.projects.by_name(room["project"])
        if project is not None and project.video_numbers:  # the project API's video.phone: the project's own list
            return [n.number if n.number.startswith("+") else f"+{n.number}" for n in project.video_numbers]
        out = []
        for did in self.config.dids:
            if (did.route == "ivr" and (did.any_project or did.project == room["project"])) or (
                    did.route == "room" and did.room_id == room["room_id"]):
                out.append(f"+{did.number}" if did.number.isdigit() else did.number)
        return list(dict.fromkeys(out))

    async def room_info(self, request: web.Request) -> web.Response:
        """What the page shows of its room: its name and how to dial in (the moderator PIN with a host link)."""
        refused = self.throttled(request)
        if refused is not None:
            return refused
        room = await asyncio.to_thread(self.store.get, request.match_info["room_id"])
        if room is None:
            return error(404, "room_not_found", "no room with this room_id")
        moderator = "host" in request.query
        if moderator and (refused := self.bad_host_link(request, room["room_id"])) is not None:
            return refused
        sip, dial_in = room["sip"], None
        if sip["enabled"]:
            dial_in = {"numbers": self.dial_in_numbers(room), "meeting_id": sip["meeting_id"], "pin": sip["pin"]}
            if moderator:
                dial_in["mpin"] = sip["mpin"]
        return web.json_response({"room_id": room["room_id"], "name": room["name"],
                                  "role": "moderator" if moderator else "participant", "dial_in": dial_in},
                                 headers={"Cache-Control": "no-store"})

    async def lookup(self, request: web.Request) -> web.Response:
        """The start page's "join by meeting ID": the meeting ID and its PIN (or moderator PIN) give the room's
        link, as the IVR would let a caller in. One answer for every miss (no telling which part was wrong),
        counted against the source and against the meeting ID (guessers spread over many addresses)."""
        body = await self.page_post(request)
        if isinstance(body, web.Response):
            return body
        for field in ("meeting_id", "pin"):
            value = body.get(field)
            if not isinstance(value, str) or not value.isascii() or not value.isdigit() or len(value) > 20:
                return error(400, "invalid_input", f"{field}: digits", field)
        meeting_id, pin = body["meeting_id"], body["pin"]
        if (wait := self.meeting_failures.blocked(meeting_id)) is not None:
            r = error(429, "too_many_failures", "too many wrong PINs for this meeting: try again later")
            r.headers["Retry-After"] = str(wait)
            return r
        room = await asyncio.to_thread(self.store.by_meeting, meeting_id)
        role = None
        if room is not None:
            if hmac.compare_digest(pin.encode(), (room["sip"]["mpin"] or "").encode()):
                role = "moderator"
            elif hmac.compare_digest(pin.encode(), (room["sip"]["pin"] or "").encode()):
                role = "participant"
        if room is None or role is None:
            self.auth_failed(request, "lookup")
            self.meeting_failures.failed(meeting_id)
            return error(404, "not_found", "no meeting with this meeting ID and PIN")
        url = f"/rooms/{room['room_id']}"
        if role == "moderator":
            expires = int(time.time() + self.config.room_service.host_link_days * 86400)
            url += f"?host={host_token(self.secret, room['room_id'], expires)}"
        log.event(logger, "room.lookup", room_id=room["room_id"], role=role)
        return web.json_response({"room_id": room["room_id"], "role": role, "url": url},
                                  headers={"Cache-Control": "no-store"})

    async def start_page(self, request: web.Request) -> web.Response:
        return web.Response(text=self.static("start.html"), content_type="text/html",
                            headers=security.page_headers(request.host))

    def static(self, name: str) -> str:
        """A file of the page (read once, at start: not on the event loop at each request)."""
        return self._static[name]

    async def favicon(self, request: web.Request) -> web.Response:
        return web.Response(text=self.static("favicon.svg"), content_type="image/svg+xml",
                            headers={"Cache-Control": "max-age=86400"})

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            return web.Response(status=404, text="Not found.", content_type="text/plain")
        return web.Response(text=self.static(name), content_type=ASSETS[name],
                            headers={"Cache-Control": "no-cache"})

    def foreign(self, request: web.Request) -> web.Response | None:
        """403 for a browser page of another origin (cross-site WebSocket hijacking, forged POSTs)."""
        origin = request.headers.get("Origin")
        if security.origin_allowed(origin, request.host, self.origins):
            return None
        log.event(logger, "rooms.origin_refused", logging.WARNING, origin=(origin or "")[:200], path=request.path[:200])
        return error(403, "forbidden_origin", "pages of another origin may not use this room", "Origin")

    async def page_post(self, request: web.Request) -> dict[str, Any] | web.Response:
        """A page's POST: its source not throttled, its Origin ours, its body a JSON object; else the answer."""
        refused = self.throttled(request) or self.foreign(request)
        return refused if refused is not None else await json_object(request)

    def bad_host_link(self, request: web.Request, room_id: str) -> web.Response | None:
        """The 403 for a host link (?host=) that is not good for this room, counted as a failure; None if good."""
        verdict = check_host_token(self.secret, room_id, request.query.get("host"))
        if verdict == "ok":
            return None
        self.auth_failed(request, "host_link")
        log.event(logger, "rooms.host_link_refused", room_id=room_id[:64], verdict=verdict, source=request.remote)
        if verdict == "expired":
            return error(403, "host_link_expired", "this host link has expired: ask for a new one", "host")
        return error(403, "invalid_host_link", "this host link is not valid for this room", "host")

    # -- signalling
    async def websocket(self, request: web.Request) -> web.StreamResponse:
        room_id = request.match_info["room_id"]
        refused = self.throttled(request) or self.foreign(request)
        if refused is not None:
            return refused
        moderator = "host" in request.query  # a host link: it must be good, else the page says why (not a guest)
        if moderator and (refused := self.bad_host_link(request, room_id)) is not None:
            return refused
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
                except (ValueError, RecursionError):
                    await ws.send_json({"type": "error", "code": "invalid_message", "message": "messages are JSON objects"})
                    continue
                try:
                    if joined is not None:
                        room, me = joined
                        if me.closing:
                            break
                        await self.live.command(room, me, data)
                        if data.get("type") == "leave":
                            break
                    elif data.get("type") == "join":
                        joined = await self.live.join(room_id, record.get("settings", {}), ws, data, moderator,
                                                      record.get("project", ""))
                    else:
                        await ws.send_json({"type": "error", "code": "not_joined", "message": "join first"})
                except (ConnectionError, RuntimeError) as exc:  # the socket went while we answered
                    log.event(logger, "rooms.ws_closed", logging.DEBUG, room_id=room_id, error=str(exc)[:200])
                    break
                except Exception as exc:  # noqa: BLE001 - one bad message costs one line, not the socket
                    log.event(logger, "rooms.message_failed", logging.ERROR, room_id=room_id,
                              type=str(data.get("type"))[:40], error=f"{type(exc).__name__}: {exc}"[:200],
                              at=where(exc))
                    if not ws.closed:
                        await ws.send_json({"type": "error", "code": "internal_error",
                                            "message": "the room service could not handle this message"})
        finally:
            if joined is not None:
                await self.live.leave(*joined)
        return ws

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self.errors, self.auth], client_max_size=64 * 1024)
        app.on_response_prepare.append(self.headers)
        async def healthz(request: web.Request) -> web.Response:
            servers = [{"url": s.url, "connected": s.alive, "rooms": len(s.rooms)} for s in self.pool.servers]
            return web.json_response({"status": "ok", "rooms": len(self.live.rooms), "janus": servers})

        app.router.add_get("/healthz", healthz)
        app.router.add_post("/video/v1/rooms", self.create_room)
        app.router.add_get("/video/v1/live", self.live_rooms)
        app.router.add_get("/video/v1/rooms/{room_id}", self.get_room)
        app.router.add_get("/video/v1/rooms/{room_id}/participants", self.participants)
        app.router.add_delete("/video/v1/rooms/{room_id}", self.delete_room)
        app.router.add_post("/video/v1/rooms/{room_id}/recording", self.recording)
        app.router.add_delete("/video/v1/rooms/{room_id}/recording", self.recording)
        app.router.add_get("/", self.start_page)
        app.router.add_get("/favicon.ico", self.favicon)
        app.router.add_get("/static/{name}", self.asset)
        app.router.add_post("/rooms/lookup", self.lookup)
        app.router.add_get("/rooms/{room_id}", self.page)
        app.router.add_get("/rooms/{room_id}/ws", self.websocket)
        app.router.add_get("/rooms/{room_id}/info", self.room_info)
        app.router.add_post("/rooms/{room_id}/dial", self.dial)
        app.router.add_get("/rooms/{room_id}/dial/{voice_id}", self.dial_progress)
        return app

    async def close(self) -> None:
        """After the HTTP server stopped: everyone out, Janus rooms destroyed, stores closed."""
        await self.live.close()
        await self.recorder.close()
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
        recordings = asyncio.get_running_loop().create_task(service.recorder.start_service(service.pool))
        runner = web.AppRunner(service.app(), access_log=None)
        await runner.setup()
        rs = config.room_service
        await web.TCPSite(runner, rs.host, rs.port,
                          ssl_context=tls.server_context(rs.tls_cert, rs.tls_key) if rs.tls_cert else None).start()
        running = write_running(config)
        log.event(logger, "rooms.started", http=f"{rs.host}:{rs.port}", data_dir=str(config.data_dir))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        recordings.cancel()
        await service.live.close()  # participants told first (their sockets closed), then the server stops
        await runner.cleanup()
        await service.close()
        mine = running_service(config.data_dir)
        if mine is not None and mine.get("pid") == os.getpid():  # another service may have taken the data dir since
            running.unlink(missing_ok=True)
        log.event(logger, "rooms.stopped")

    asyncio.run(main())
