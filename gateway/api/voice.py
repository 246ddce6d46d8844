"""The Voice API (EnableX Voice Server shape) on the worker's HTTP port, and the webhooks of every call.

    POST   /voice/v1/room/{room_id}/join                    dial a number out and bridge it into the room
    PUT    /voice/v1/room/{room_id}/call/{voice_id}/join    bridge a live call into a room ("new": a new room)
    DELETE /voice/v1/room/{room_id}/call/{voice_id}         take it out of the room: hang up (or ?park=true)
    GET    /voice/v1/calls, /voice/v1/calls/{voice_id}      the project's calls, one call with its CDR events
    GET    /voice/v1/openapi.json                           this API as OpenAPI 3

HTTP Basic with a project's app_id:app_key on every /voice route; a project sees and acts on its own calls
and rooms only (another project's voice_id or room_id is "not found"). Missing or wrong credentials give
401 with WWW-Authenticate (the EnableX table says 407, which HTTP reserves for proxies); a client address
with more than api.auth_failures_per_source wrong credentials in api.auth_failure_window_s gets 429 with
Retry-After for every request until the window ends (guards.py). Errors are JSON:
{"error": {"code", "message", "field"?}}; each 4xx is one log line (api.rejected), never a traceback.

Dial-out is limited per project: `to` is an E.164 number (ASCII digits) or, where allowed, a plain
sip:user@host[:port]; premium-rate prefixes are denied (403); concurrent calls and calls per minute are
capped (429). See api.* in config/gateway.toml.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import re
import unicodedata
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from .. import log, tls
from ..apps.routes import run_hosted
from ..apps.services import IvrServices
from ..calls.call import Call
from ..calls.control import BRIDGEABLE, Order, Steering
from ..calls.outbound import E164, DestinationDenied, DialError, OutboundCall, check_destination
from ..cluster.registry import CallRegistry
from ..config import TrunkConfig
from ..rooms.directory import SharedDirectory
from ..sources import FailureWindow, source_key
from ..store import cdr
from ..store.projects import Project, ProjectStore
from ..store.rooms import RoomStore
from .guards import DialLimits, client_source, networks, quiet_malformed_http
from .openapi import OPENAPI
from .webhooks import Notifier, timestamp

if TYPE_CHECKING:
    from ..calls.ua import UserAgent

logger = logging.getLogger("gateway.api")
PROJECT = web.RequestKey("project", Project)  # the project whose credentials the request carried
MAX_TEXT = 128
MAX_URL = 2048
JOIN_WAIT_S = 20.0  # PUT join answers once the call is in the room (or the join failed)
SETTLE_S = 3.0  # PUT join waits this long for a call that is being answered to become bridgeable
WEBHOOK_STATES = {"ringing", "answered", "joined", "removed"}
FORWARDED = "X-Gateway-Forwarded"  # set on a request one worker passes to the worker holding the call
# Credentials that cannot be a project's are refused before the projects store is asked: app_ids are 32 hex
# digits and app_keys 32 URL-safe base64 characters today; these bounds leave room and keep garbage out.
APP_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
APP_KEY = re.compile(r"[!-~]{1,128}")  # printable ASCII
MAX_AUTHORIZATION = 512
LIMIT = re.compile(r"[0-9]{1,4}")  # ASCII digits: str.isdigit() passes "¹", which int() then refuses


def basic_credentials(header: str) -> tuple[str, str] | None:
    """(user, key) of an HTTP Basic header that could be a project's app_id:app_key; None for anything else (the
    store never sees garbage)."""
    if len(header) > MAX_AUTHORIZATION or header[:6].lower() != "basic ":
        return None
    try:  # the header may hold any bytes (aiohttp passes them on as surrogates): ASCII base64, then UTF-8
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode()
    except (ValueError, UnicodeDecodeError):  # binascii.Error is a ValueError; so is non-ASCII input
        return None
    user, sep, key = decoded.partition(":")
    if not sep or not APP_ID.fullmatch(user) or not APP_KEY.fullmatch(key):
        return None
    return user, key


def is_operator(header: str, operator: tuple[str, str]) -> bool:
    """The Basic header carries the operator's (user, key), compared in constant time; never for an empty key."""
    creds = basic_credentials(header) if header else None
    user, key = operator
    return creds is not None and bool(key) and hmac.compare_digest(creds[0].encode(), user.encode()) and \
        hmac.compare_digest(creds[1].encode(), key.encode())


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.retry_after = retry_after

    def response(self) -> web.Response:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field:
            err["field"] = self.field
        r = web.json_response({"error": err}, status=self.status)
        if self.status == 401:
            r.headers["WWW-Authenticate"] = 'Basic realm="voice", charset="UTF-8"'
        if self.retry_after is not None:
            r.headers["Retry-After"] = str(self.retry_after)
        return r


def _text(body: dict[str, Any], key: str, required: bool = False, limit: int = MAX_TEXT) -> str:
    value = body.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value) or len(value) > limit:
        need = "a non-empty string" if required else "a string"
        raise ApiError(400, "invalid_input", f"{key}: {need} of at most {limit} characters", key)
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value):  # control characters, lone surrogates
        raise ApiError(400, "invalid_input", f"{key}: control characters and unpaired surrogates are not allowed", key)
    return value


class VoiceApi:
    def __init__(self, ua: UserAgent, projects: ProjectStore, rooms: RoomStore, services: IvrServices,
                 notifier: Notifier, registry: CallRegistry | None = None) -> None:
        self.ua = ua
        self.config = ua.config
        self.projects = projects
        self.rooms = rooms
        self.services = services
        self.notifier = notifier
        self.registry = registry
        self._client: aiohttp.ClientSession | None = None
        api = self.config.api
        self.trusted_proxies = networks(api.trusted_proxies)
        self.auth_failures = FailureWindow(api.auth_failures_per_source, api.auth_failure_window_s,
                                          api.auth_failure_max_sources)
        self.dial_limits = DialLimits(api)

    # -- plumbing
    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith("/voice/"):
            return await handler(request)  # type: ignore[no-any-return]
        return await self.guarded(request, handler, PROJECT, self._authenticate)

    async def guarded(self, request: web.Request, handler: Any, key: web.RequestKey[Any],
                      authenticate: Callable[[str, str], Any],
                      shape: Callable[[ApiError], ApiError] = lambda e: e) -> web.StreamResponse:
        """Authenticate (the result under `key`), run the handler, and answer every failure as JSON in the API's
        shape (`shape` turns an ApiError into another API's): a refusal is one log line, never a traceback."""
        source = source_key(client_source(request, self.trusted_proxies))
        allow = None
        try:
            request[key] = authenticate(request.headers.get("Authorization", ""), source)
            return await handler(request)  # type: ignore[no-any-return]
        except ApiError as exc:
            error = shape(exc)
        except web.HTTPException as exc:  # unknown route, wrong method, body too large: JSON too
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}.get(exc.status, "http_error")
            error = shape(ApiError(exc.status, code, exc.reason))
            allow = exc.headers.get("Allow") if exc.status == 405 else None
        except Exception:
            logger.exception("api.failed", extra={"fields": {"path": request.path[:200], "method": request.method}})
            return shape(ApiError(500, "internal_error", "the gateway failed to handle this request (logged)")).response()
        self._rejected(request, source, error)
        r = error.response()
        if allow:
            r.headers["Allow"] = allow
        return r

    def refuse_blocked(self, source: str) -> None:
        """429 for a source past its failed authentications, whatever credentials it sends now (every API here
        counts in this one window)."""
        retry = self.auth_failures.blocked(source)
        if retry is not None:
            raise ApiError(429, "too_many_auth_failures", "too many failed authentications from this address; "
                           f"retry after {retry} s", retry_after=retry)

    def _authenticate(self, header: str, source: str) -> Project:
        """The project whose app_id:app_key the Basic credentials carry. A source past its failure limit gets 429
        whatever it sends (the right key too: otherwise the limit would not stop guessing); a missing header is not
        a failure (clients that wait for the challenge send one), wrong or malformed credentials are."""
        self.refuse_blocked(source)
        if header:
            project = self._project(header)
            if project is not None:
                return project
            if self.auth_failures.failed(source):  # this failure reached the limit: one line per source and window
                log.event(logger, "api.auth_blocked", logging.WARNING, source=source,
                          failures=self.auth_failures.limit, window_s=self.auth_failures.window)
        raise ApiError(401, "unauthorized", "HTTP Basic credentials required: the project's app_id and app_key")

    def _project(self, header: str) -> Project | None:
        creds = basic_credentials(header)
        return None if creds is None else self.projects.authenticate(*creds)

    def _rejected(self, request: web.Request, source: str, error: ApiError) -> None:
        """One line per refused request, at info: wrong credentials too (at most auth_failures_per_source per source
        and window), a request without credentials only at debug (not counted, so not bounded), the 429s of a
        blocked source not at all (its api.auth_blocked warning said it once)."""
        if error.code == "too_many_auth_failures":
            return
        project = request.get(PROJECT)
        quiet = error.status == 401 and "Authorization" not in request.headers
        log.event(logger, "api.rejected", logging.DEBUG if quiet else logging.INFO,
                  status=error.status, code=error.code, field=error.field, method=request.method,
                  path=request.path[:200], source=source, project=project.name if project is not None else None)

    @staticmethod
    async def _body(request: web.Request) -> dict[str, Any]:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: "[[[[..." nested too deep
            raise ApiError(400, "invalid_json", "the body must be a JSON object") from None
        if not isinstance(body, dict):
            raise ApiError(400, "invalid_json", "the body must be a JSON object")
        return body

    async def _forward(self, request: web.Request) -> web.Response | None:
        """A call held by another worker (the shared registry says which): pass the request on, unchanged,
        and answer with what that worker answers. None when the call is here, unknown, or already forwarded."""
        voice_id = request.match_info.get("voice_id", "")
        if voice_id in self.ua.calls or self.registry is None or FORWARDED in request.headers:
            return None
        url = await self.registry.owner(voice_id)
        if url is None:
            return None
        cert = self.config.http.tls_cert  # the other workers serve the same certificate (this host's, or its name's)
        if cert and not url.startswith("https://"):  # never the project's credentials in clear
            raise ApiError(503, "worker_unreachable", "the worker holding this call has no HTTPS")
        if self._client is None:
            self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=JOIN_WAIT_S + 10))
        headers = {"Authorization": request.headers.get("Authorization", ""), FORWARDED: "1",
                   "Content-Type": request.headers.get("Content-Type", "application/json")}
        try:
            async with self._client.request(request.method, url + request.path_qs, data=await request.read() or None,
                                            headers=headers, **tls.internal(cert)) as r:
                body = await r.read()
                log.event(logger, "api.forwarded", voice_id=voice_id, to=url, status=r.status)
                return web.Response(body=body, status=r.status, content_type="application/json")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ApiError(503, "worker_unreachable", f"the worker holding this call did not answer: {exc}") from None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()

    def _room(self, room_id: str, project: Project) -> dict[str, Any]:
        room = self.rooms.get(room_id) if len(room_id) <= 64 else None
        if room is None or room["project"] != project.name:
            raise ApiError(404, "room_not_found", f"no room {room_id[:64]!r} in this project", "room_id")
        return room

    def _call(self, voice_id: str, project: Project) -> Call:
        call = self.ua.calls.get(voice_id)
        if call is None or call.info.get("project") != project.name:
            ended = self.ua.recently_ended.get(voice_id)
            if ended is not None and ended[0] == project.name:  # e.g. the caller hung up before the bridge came
                raise ApiError(409, "call_ended", f"the call has ended ({ended[1]})", "voice_id")
            raise ApiError(404, "call_not_found", "no live call with this voice_id in this project", "voice_id")
        return call

    def _capacity(self) -> None:
        if not self.ua.accepting:
            raise ApiError(503, "draining", "this worker is draining: no new calls")
        if len(self.ua.calls) >= self.config.sip.max_calls:
            raise ApiError(503, "at_capacity", f"at capacity ({self.config.sip.max_calls} calls)")

    def _trunk(self, project: Project) -> TrunkConfig:
        trunks = [t for t in self.config.trunks if t.outbound is not None]
        wanted = project.trunk or (trunks[0].name if trunks else "")
        trunk = next((t for t in trunks if t.name == wanted), None)
        if trunk is None:
            raise ApiError(500, "outbound_call_failed", "no outbound trunk configured for this project ([trunks.outbound])")
        return trunk

    # -- routes
    async def dial(self, request: web.Request) -> web.Response:
        project = request[PROJECT]
        if not project.voice_out:
            raise ApiError(403, "outbound_disabled", "the project's outbound calls are off (voice.out = false in the "
                           "project API)")
        room_id = request.match_info["room_id"]
        body = await self._body(request)
        from_ = _text(body, "from", required=True)
        to = _text(body, "to", required=True, limit=256)
        name, owner_ref = _text(body, "name"), _text(body, "owner_ref")
        event_url = _text(body, "event_url", limit=MAX_URL)
        if not E164.fullmatch(from_):
            raise ApiError(400, "invalid_input", "from: must be an E.164 number: optional +, then 6 to 15 ASCII digits",
                           "from")
        if not project.can_call_from(from_):
            raise ApiError(400, "invalid_input", "from: not one of the project's numbers with out=true", "from")
        try:
            check_destination(to, self.dial_limits.rules(project.name))
        except DestinationDenied as exc:
            raise ApiError(403, "destination_not_allowed", str(exc), "to") from None
        except DialError as exc:
            raise ApiError(400, "invalid_input", str(exc), "to") from None
        if event_url and (unsafe := await self.notifier.check(event_url)) is not None:  # SSRF: after DNS too
            raise ApiError(400, "invalid_input", f"event_url: {unsafe}", "event_url")
        self._room(room_id, project)
        live = sum(1 for c in self.ua.calls.values()
                   if c.direction == "outbound" and c.info.get("project") == project.name and not c.ended.is_set())
        refused = self.dial_limits.refused(project.name, live)  # no await from here to the call's registration
        if refused is not None:
            code, message, retry = refused
            raise ApiError(429, code, message, retry_after=retry)
        self._capacity()
        trunk = self._trunk(project)
        try:
            call = OutboundCall(self.ua, trunk, to, from_, trunk=trunk.name, project=project.name, caller=to,
                                room_id=room_id, event_url=event_url, owner_ref=owner_ref, name=name,
                                **{"from": from_, "to": to})
        except DialError as exc:
            raise ApiError(400, "invalid_input", str(exc), "to") from None
        call.control = Steering()
        self.ua.calls[call.voice_id] = call
        self.dial_limits.placed(project.name)
        self.ua.cdr.open_call(call.voice_id, "outbound", **{"from": from_, "to": to, "trunk": trunk.name,
                              "project": project.name, "room_id": room_id, "name": name, "owner_ref": owner_ref,
                              "event_url": event_url, "call_id": call.call_id, "transport": call.source.transport})
        log.event(logger, "call.dialling", voice_id=call.voice_id, room_id=room_id, trunk=trunk.name, project=project.name)
        self.ua.on_call_event(call, "initiated", {"room_id": room_id})  # webhooks, metrics, registry
        call.task = asyncio.get_running_loop().create_task(self._run_outbound(call, room_id))
        return web.json_response({"state": "initiated", "voice_id": call.voice_id, "room_id": room_id,
                                  "timestamp": timestamp()})

    async def _run_outbound(self, call: OutboundCall, room_id: str) -> None:
        async def flow() -> None:
            if await call.place(self.config.api.ring_timeout_s):
                await run_hosted(call, self.services, Order("join", room_id))

        await call.supervise(flow())

    async def bridge(self, request: web.Request) -> web.Response:
        project = request[PROJECT]
        room_id, voice_id = request.match_info["room_id"], request.match_info["voice_id"]
        if (forwarded := await self._forward(request)) is not None:
            return forwarded
        call = self._call(voice_id, project)
        # a call still being answered (an api number's, right after its `incoming` webhook) is bridgeable a moment
        # later: wait for that rather than answer 409
        loop, deadline = asyncio.get_running_loop(), asyncio.get_running_loop().time() + SETTLE_S
        while (call.control is None or call.control.phase not in BRIDGEABLE or not call.answered.is_set()) \
                and not call.ended.is_set() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        steer: Steering | None = call.control
        if steer is None or steer.phase not in BRIDGEABLE or not call.answered.is_set():
            phase = steer.phase if steer is not None else call.state
            raise ApiError(409, "call_not_bridgeable", f"the call is {phase}; it can join a room once answered "
                           "(in the IVR, parked, or in another room)", "voice_id")
        if room_id == "new":
            rooms = self.config.rooms
            room = await asyncio.to_thread(self.rooms.create, f"Call {voice_id[:8]}", True, rooms.meeting_id_digits,
                                           rooms.pin_digits, {}, None, project.name)
            room_id = room["room_id"]
            if isinstance(self.services.directory, SharedDirectory):  # several workers: into Redis, PINs keyed
                await self.services.directory.publish(room)
            log.event(logger, "room.created", room_id=room_id, project=project.name, voice_id=voice_id)
        else:
            self._room(room_id, project)
        if steer.phase == "in_room" and steer.room_id == room_id:
            raise ApiError(409, "already_in_room", "the call is already in this room", "room_id")
        order = Order("join", room_id)
        steer.give(order)
        error = await self._outcome(order, JOIN_WAIT_S)
        if error is not None:
            raise ApiError(500, "room_join_failed", error, "room_id")
        return web.json_response({"state": "joined", "voice_id": voice_id, "room_id": room_id, "timestamp": timestamp()})

    async def remove(self, request: web.Request) -> web.Response:
        project = request[PROJECT]
        room_id, voice_id = request.match_info["room_id"], request.match_info["voice_id"]
        park = request.query.get("park", "false").lower()
        if park not in ("true", "false"):
            raise ApiError(400, "invalid_input", "park: true or false", "park")
        if (forwarded := await self._forward(request)) is not None:
            return forwarded
        call = self._call(voice_id, project)
        steer: Steering | None = call.control
        if steer is None or steer.room_id != room_id or steer.phase not in ("joining", "in_room"):
            raise ApiError(409, "not_in_room", "the call is not in this room", "room_id")
        order = Order("leave", room_id, park=park == "true")
        steer.give(order)
        error = await self._outcome(order, 10.0)
        if error is not None and not call.ended.is_set():
            raise ApiError(500, "remove_failed", error)
        return web.json_response({"state": "removed", "voice_id": voice_id, "room_id": room_id, "timestamp": timestamp()})

    @staticmethod
    async def _outcome(order: Order, timeout: float) -> str | None:
        try:
            return await asyncio.wait_for(asyncio.shield(order.done), timeout)
        except TimeoutError:
            return f"no outcome within {timeout:.0f} s"

    async def list_calls(self, request: web.Request) -> web.Response:
        project = request[PROJECT]
        raw = request.query.get("limit", "100")
        if not LIMIT.fullmatch(raw) or not 1 <= int(raw) <= 1000:
            raise ApiError(400, "invalid_input", "limit: an integer from 1 to 1000", "limit")
        active = request.query.get("active", "false").lower()
        if active not in ("true", "false"):
            raise ApiError(400, "invalid_input", "active: true or false", "active")
        rows = await asyncio.to_thread(cdr.list_calls, self.config.data_dir, int(raw), active == "true", project.name)
        return web.json_response({"calls": [self._public(r) for r in rows]})

    async def get_call(self, request: web.Request) -> web.Response:
        project = request[PROJECT]
        voice_id = request.match_info["voice_id"]
        if (forwarded := await self._forward(request)) is not None:
            return forwarded
        row = await asyncio.to_thread(cdr.get_call, self.config.data_dir, voice_id) if len(voice_id) <= 64 else None
        if row is None or row.get("project") != project.name:
            raise ApiError(404, "call_not_found", "no call with this voice_id in this project", "voice_id")
        out = self._public(row)
        out["events"] = row["events"]
        live = self.ua.calls.get(voice_id)
        if live is not None and live.control is not None:
            out["phase"] = live.control.phase
            out["room_id"] = live.control.room_id or out["room_id"]
        return web.json_response(out)

    @staticmethod
    def _public(row: dict[str, Any]) -> dict[str, Any]:
        return {"voice_id": row["voice_id"], "direction": row["direction"], "from": row["from_number"],
                "to": row["to_number"], "state": row["state"], "room_id": row["room_id"], "reason": row["reason"],
                "sip_code": row["sip_code"], "started_at": row["started_at"], "answered_at": row["answered_at"],
                "ended_at": row["ended_at"]}

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    def routes(self, app: web.Application) -> None:
        quiet_malformed_http()
        app.middlewares.append(self.middleware)
        app.router.add_get("/voice/v1/openapi.json", self.openapi)
        app.router.add_post("/voice/v1/room/{room_id}/join", self.dial)
        app.router.add_put("/voice/v1/room/{room_id}/call/{voice_id}/join", self.bridge)
        app.router.add_delete("/voice/v1/room/{room_id}/call/{voice_id}", self.remove)
        app.router.add_get("/voice/v1/calls", self.list_calls)
        app.router.add_get("/voice/v1/calls/{voice_id}", self.get_call)

    # -- webhooks: the call's events, as the application sees them
    def on_call_event(self, call: Call, state: str, data: dict[str, Any]) -> None:
        info = call.info
        project = self.projects.by_name(str(info.get("project", "")))
        url = info.get("event_url") or (project.event_url(call.direction) if project else "")
        if not url or project is None:
            return
        if state == "initiated":
            state = "initiated" if call.direction == "outbound" else "incoming"
        elif state == "disconnected":
            state = "failed" if call.direction == "outbound" and not call.answered.is_set() else "disconnected"
        elif state not in WEBHOOK_STATES:
            return
        steer = call.control
        payload: dict[str, Any] = {
            "state": state, "voice_id": call.voice_id,
            "room_id": data.get("room_id") or (steer.room_id if steer is not None else "") or info.get("room_id") or None,
            "timestamp": timestamp(), "direction": call.direction,
            "from": info.get("from") or info.get("caller"), "to": info.get("to") or info.get("did"),
        }
        for key in ("name", "owner_ref"):
            if info.get(key):
                payload[key] = info[key]
        if state in ("failed", "disconnected"):
            payload["code"] = data.get("code")
            payload["reason"] = data.get("sip_reason") or data.get("reason")
        self.notifier.emit(str(url), project.name, call.voice_id, payload)
