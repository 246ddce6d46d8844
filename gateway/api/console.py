"""The operator console on the worker's HTTP port (issue 17, part 1).

    GET  /console                              the page (its script and style: /console/static/console.{js,css})
    GET  /console/api/live                     Server-Sent Events: the cluster's snapshot once a second
    GET  /console/api/snapshot                 the same snapshot, once (JSON)
    GET  /console/api/local                    this worker's part of it (what the other workers ask for)
    GET  /console/api/calls/{voice_id}         a call's CDR row and its events, in order (the timeline)
    GET  /console/api/cdr                      CDR search: ?since=&until= (Unix seconds) &number= &project=
                                               &state= &reason= &page= &per_page=
    GET  /console/api/cdr.csv                  the same search as CSV (every match, up to CSV_MAX rows)
    POST /console/api/workers/{name}/drain     `gateway drain NAME` (header X-Console: drain required)

Credentials: the operator's, HTTP Basic with the room service's api_user and api_key (DATA_DIR/room-service.json,
as the project API), on every route here, the page and its static files included (a browser shows its login
prompt). Failed attempts count in the Voice API's failure window per source (429 past the limit).

What it shows: calls in progress of every worker (each worker's own calls from memory: phase, codec, RTP loss and
jitter), the rooms those calls are in with the browsers the room service lists, each worker's load and health
(the pid files in DATA_DIR/workers: a worker asks the others for /console/api/local), the room service's Janus
servers, and charts of the last 10 minutes (5 s samples, kept by each worker). Numbers are masked as the room
page masks a phone (room_service.mask_digits); the CDR search matches the whole number but shows it masked.
No secret is ever sent to the page.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import math
import os
import re
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from .. import log, tls
from ..adapters.clock import MediaClock
from ..apps.services import masked_number
from ..cluster.supervisor import drain as drain_worker
from ..rooms.service.links import running_service
from ..rooms.service.security import COMMON_HEADERS
from ..store import cdr
from .voice import ApiError, VoiceApi, is_operator

if TYPE_CHECKING:
    from ..calls.call import Call

logger = logging.getLogger("gateway.console")
STATIC = Path(__file__).parent / "static"
ASSETS = {"console.js": "text/javascript", "console.css": "text/css"}
OPERATOR = web.RequestKey("console_operator", bool)
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
PAGE_HEADERS = {"Content-Security-Policy": CSP, "X-Frame-Options": "DENY", "Cache-Control": "no-store", **COMMON_HEADERS}
SAMPLE_S = 5.0  # the charts: one sample every 5 s ...
SAMPLES = 120  # ... for 10 minutes
PUSH_S = 1.0  # the live view: one snapshot a second
PEER_TIMEOUT_S = 0.8
PER_PAGE = 50
MAX_PER_PAGE = 200
CSV_MAX = 10_000
CSV_COLUMNS = ("voice_id", "direction", "from", "to", "did", "project", "worker", "state", "started_at",
               "answered_at", "ended_at", "duration_s", "sip_code", "reason", "room_id", "transport", "media_encryption")
WORKER_NAME = re.compile(r"[A-Za-z0-9_.-]{1,32}")
VOICE_ID = re.compile(r"[0-9a-fA-F-]{1,64}")
FIELD = re.compile(r"[\w .:@+-]{0,64}")  # a search field (project, state, reason, number)


class ConsoleError(ApiError):
    """The Voice API's JSON errors, with a login prompt of the console's own ("console" realm)."""

    def response(self) -> web.Response:
        r = super().response()
        if self.status == 401:
            r.headers["WWW-Authenticate"] = 'Basic realm="console", charset="UTF-8"'
        return r


def _as_console(exc: ApiError) -> ApiError:
    return exc if isinstance(exc, ConsoleError) else ConsoleError(exc.status, exc.code, exc.message, exc.field,
                                                                  exc.retry_after)


def csv_cell(value: Any) -> str:
    """A CSV cell a spreadsheet shows as text: a cell starting with = + - @ (or a tab or CR) is a formula to
    Excel and LibreOffice, so it gets a leading apostrophe (OWASP's "CSV injection")."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def to_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow([csv_cell(row.get(c)) for c in CSV_COLUMNS])
    return out.getvalue()


def _iso(ts: Any) -> str:
    return datetime.fromtimestamp(float(ts), UTC).isoformat(timespec="seconds").replace("+00:00", "Z") if ts else ""


class Console:
    def __init__(self, voice: VoiceApi, operator: tuple[str, str], name: str, clock: MediaClock,
                 cpu: Callable[[], float]) -> None:
        self.voice = voice
        self.ua = voice.ua
        self.config = voice.config
        self.operator = operator
        self.name = name
        self.clock = clock
        self.cpu = cpu
        self.data_dir = self.config.data_dir
        self.keep = self.config.room_service.mask_digits
        self.series: deque[dict[str, float]] = deque(maxlen=SAMPLES)
        self._static = {n: (STATIC / n).read_text() for n in (*ASSETS, "console.html")}
        self._tasks: list[asyncio.Task[None]] = []
        self._client: aiohttp.ClientSession | None = None
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._building: asyncio.Task[dict[str, Any]] | None = None
        self.closing = asyncio.Event()

    # -- plumbing
    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/console" and not request.path.startswith("/console/"):
            return await handler(request)  # type: ignore[no-any-return]
        return await self.voice.guarded(request, handler, OPERATOR, self._authenticate, _as_console)

    def _authenticate(self, header: str, source: str) -> bool:
        """The operator's api_user:api_key, else 401 (a browser prompts); failures count as the Voice API's."""
        self.voice.refuse_blocked(source)
        if is_operator(header, self.operator):
            return True
        failures = self.voice.auth_failures
        if header and failures.failed(source):
            log.event(logger, "api.auth_blocked", logging.WARNING, source=source, failures=failures.limit,
                      window_s=failures.window)
        error = ApiError(401, "unauthorized", "HTTP Basic credentials required: the operator's api_user and api_key")
        raise error

    def start(self) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(self._sample()))

    async def close(self) -> None:
        """Before the HTTP server stops: the live streams end (a browser reconnects to another worker)."""
        self.closing.set()
        for task in self._tasks:
            task.cancel()
        if self._client is not None:
            await self._client.close()

    def _session(self) -> aiohttp.ClientSession:
        if self._client is None:
            self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PEER_TIMEOUT_S))
        return self._client

    # -- this worker
    def _sample_now(self) -> dict[str, float]:
        return {"t": round(time.time(), 1), "calls": float(len(self.ua.calls)), "cpu": round(self.cpu(), 1),
                "lateness_p99_ms": float(self.clock.lateness_percentiles().get("p99_ms", 0.0)),
                "webhooks_queued": float(sum(len(q) for q in self.voice.notifier.lanes.values()))}

    async def _sample(self) -> None:
        while True:
            self.series.append(self._sample_now())
            await asyncio.sleep(SAMPLE_S)

    def _numbers(self, direction: str, from_: Any, to: Any) -> dict[str, str]:
        """From and to as shown: the other party's number masked, the gateway's own (the DID called, the caller ID
        dialled from) as it is."""
        if direction == "outbound":
            return {"from": str(from_ or ""), "to": self._mask(to)}
        return {"from": self._mask(from_), "to": str(to or "")}

    def _mask(self, number: Any) -> str:
        """A person's number as the room page shows a phone: its last mask_digits digits."""
        text = str(number or "")
        if not text:
            return ""
        return masked_number(text, self.keep).removeprefix("Phone").strip() or "•••"

    def _call(self, call: Call, now: float) -> dict[str, Any]:
        info = call.info
        control = call.control
        media = call.media
        row: dict[str, Any] = {
            "voice_id": call.voice_id, "worker": self.name, "direction": call.direction,
            **self._numbers(call.direction, info.get("from") or info.get("caller"), info.get("to") or info.get("did")),
            "did": str(info.get("did") or ""), "project": str(info.get("project") or ""), "state": call.state,
            "phase": str(getattr(control, "phase", "") or ""), "room_id": str(getattr(control, "room_id", "") or ""),
            "duration_s": round(max(0.0, now - call.started_at), 1), "codec": "", "loss_pct": None, "jitter_ms": None}
        if media is not None:
            row["codec"] = media.params.codec
            stats = media.jitter.stats
            heard = stats.received + stats.lost
            row["loss_pct"] = round(100.0 * stats.lost / heard, 2) if heard else 0.0
            row["jitter_ms"] = round(stats.jitter_ms, 1)
        return row

    def local(self) -> dict[str, Any]:
        """This worker: its calls in progress, its load and health, its chart samples."""
        now = time.time()
        load = self._sample_now()
        return {
            "worker": self.name, "pid": os.getpid(), "status": "up" if self.ua.accepting else "draining",
            "calls": [self._call(c, now) for c in list(self.ua.calls.values())],
            "load": load, "cdr_ok": self.ua.cdr.status()["ok"], "rtp_ports_in_use": self.ua.ports.in_use,
            "series": [*self.series, load]}  # the charts end with now

    # -- the cluster
    def _pidfiles(self) -> list[dict[str, Any]]:
        found = []
        for path in sorted((self.data_dir / "workers").glob("*.json")):
            try:
                info = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(info, dict) and WORKER_NAME.fullmatch(str(info.get("name", ""))):
                found.append(info)
        return found

    async def _peer(self, info: dict[str, Any]) -> dict[str, Any]:
        name = str(info["name"])
        try:
            async with self._session().get(f"{info['http']}/console/api/local",
                                           auth=aiohttp.BasicAuth(*self.operator),
                                           **tls.internal(self.config.http.tls_cert)) as r:
                if r.status != 200:
                    return {"worker": name, "status": f"http {r.status}", "calls": [], "series": []}
                body = await r.json()
                return body if isinstance(body, dict) else {"worker": name, "status": "unreadable", "calls": []}
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, KeyError):
            return {"worker": name, "status": "unreachable", "calls": [], "series": []}

    async def _room_service(self) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
        """The room service's Janus servers (its /healthz) and every live room's participants."""
        running = running_service(self.data_dir)
        if running is None:
            return [], {}
        base, extra = str(running.get("api", "")), tls.internal(str(running.get("tls_cert") or ""))
        session = self._session()
        servers: list[dict[str, Any]] = []
        people: dict[str, list[dict[str, Any]]] = {}
        try:
            async with session.get(f"{base}/healthz", **extra) as r:
                body = await r.json() if r.status == 200 else {}
            servers = [{"url": str(s.get("url", "")), "connected": bool(s.get("connected")),
                        "rooms": int(s.get("rooms", 0))} for s in body.get("janus", [])]
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
            servers = [{"url": base, "connected": False, "rooms": 0, "error": "room service unreachable"}]
        user, key = self.operator
        try:  # every live room, browsers included (a room with browsers only has no call to show it)
            async with session.get(f"{base}/video/v1/live", auth=aiohttp.BasicAuth(user, key), **extra) as r:
                body = await r.json() if r.status == 200 else {}
            for room in body.get("rooms", [])[:200]:
                people[str(room.get("room_id", ""))] = list(room.get("participants", []))
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError, AttributeError):
            pass
        return servers, people

    async def snapshot(self) -> dict[str, Any]:
        """The cluster as one console shows it; built at most once a second, whatever the number of viewers."""
        now = time.monotonic()
        if self._cached is not None and now - self._cached[0] < PUSH_S * 0.9:
            return self._cached[1]
        if self._building is None or self._building.done():
            self._building = asyncio.get_running_loop().create_task(self._build())
        snap = await asyncio.shield(self._building)
        self._cached = (time.monotonic(), snap)
        return snap

    async def _build(self) -> dict[str, Any]:
        others = [p for p in self._pidfiles() if p.get("name") != self.name]
        parts = [self.local(), *await asyncio.gather(*(self._peer(p) for p in others))]
        calls = sorted((c for part in parts for c in part.get("calls", [])), key=lambda c: -c.get("duration_s", 0))
        servers, people = await self._room_service()
        room_ids = sorted({c["room_id"] for c in calls if c.get("room_id")} | set(people))
        rooms = []
        for room_id in room_ids:
            phones = [{"name": c["from"] if c["direction"] == "inbound" else c["to"], "voice_id": c["voice_id"]}
                      for c in calls if c.get("room_id") == room_id]
            browsers = [{"name": str(p.get("name", "")), "role": str(p.get("role", ""))}
                        for p in people.get(room_id, []) if p.get("kind") == "browser"]
            rooms.append({"room_id": room_id, "phones": phones, "browsers": browsers})
        workers = [{"name": p.get("worker"), "status": p.get("status"), "pid": p.get("pid"),
                    "calls": len(p.get("calls", [])), "load": p.get("load"), "cdr_ok": p.get("cdr_ok"),
                    "rtp_ports_in_use": p.get("rtp_ports_in_use"), "self": p.get("worker") == self.name}
                   for p in parts]
        series = {str(p.get("worker")): p.get("series", []) for p in parts}
        return {"at": time.time(), "worker": self.name, "calls": calls, "rooms": rooms, "workers": workers,
                "media_servers": servers, "series": series}

    # -- handlers
    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=self._static["console.html"], content_type="text/html", headers=PAGE_HEADERS)

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound()
        return web.Response(text=self._static[name], content_type=ASSETS[name],
                            headers={"Cache-Control": "no-store", **COMMON_HEADERS})

    @staticmethod
    def _json(body: Any) -> web.Response:
        return web.json_response(body, headers={"Cache-Control": "no-store", **COMMON_HEADERS})

    async def get_local(self, request: web.Request) -> web.Response:
        return self._json(self.local())

    async def get_snapshot(self, request: web.Request) -> web.Response:
        return self._json(await self.snapshot())

    async def live(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                               "X-Accel-Buffering": "no", **COMMON_HEADERS})
        await response.prepare(request)
        try:
            await response.write(b"retry: 2000\n\n")
            while not self.closing.is_set():
                snap = await self.snapshot()
                await response.write(b"event: snapshot\ndata: " + json.dumps(snap).encode() + b"\n\n")
                try:
                    await asyncio.wait_for(self.closing.wait(), PUSH_S)
                except TimeoutError:
                    pass
        except ConnectionResetError:
            pass  # the browser went away
        return response

    async def timeline(self, request: web.Request) -> web.Response:
        voice_id = request.match_info["voice_id"]
        call = await asyncio.to_thread(cdr.get_call, self.data_dir, voice_id) if VOICE_ID.fullmatch(voice_id) else None
        if call is None:
            raise ApiError(404, "not_found", "no call with this voice_id")
        return self._json({"call": self._row(call), "events": [
            {"ts": e["ts"], "at": _iso(e["ts"]), "state": e["state"],
             "detail": {k: v for k, v in e.items() if k not in ("ts", "state", "from", "to")}}
            for e in call["events"]]})

    def _row(self, row: dict[str, Any]) -> dict[str, Any]:
        started, ended = row.get("started_at"), row.get("ended_at")
        end = ended or (time.time() if row.get("state") != cdr.FINAL else None)
        return {"voice_id": row["voice_id"], "direction": row.get("direction"),
                **self._numbers(str(row.get("direction")), row.get("from_number"), row.get("to_number")),
                "did": row.get("did") or "",
                "project": row.get("project") or "", "worker": row.get("worker") or "", "state": row.get("state"),
                "started_at": _iso(started), "answered_at": _iso(row.get("answered_at")), "ended_at": _iso(ended),
                "duration_s": round(end - started, 1) if started and end else None, "sip_code": row.get("sip_code"),
                "reason": row.get("reason") or "", "room_id": row.get("room_id") or "",
                "transport": row.get("transport") or "", "media_encryption": row.get("media_encryption") or ""}

    def _search_args(self, request: web.Request) -> dict[str, Any]:
        q = request.query
        args: dict[str, Any] = {}
        for key in ("since", "until"):
            value = q.get(key, "").strip()
            if value:
                try:
                    args[key] = float(value)
                except ValueError:
                    args[key] = math.nan
                if not math.isfinite(args[key]):
                    raise ApiError(400, "invalid_input", f"{key}: Unix seconds", key)
        for key in ("number", "project", "state", "reason"):
            value = q.get(key, "").strip()
            if not FIELD.fullmatch(value):
                raise ApiError(400, "invalid_input", f"{key}: at most 64 letters, digits and . : @ + -", key)
            args[key] = value
        return args

    def _int(self, request: web.Request, key: str, default: int, top: int) -> int:
        value = request.query.get(key, "")
        if not value:
            return default
        if not value.isascii() or not value.isdigit() or not 1 <= int(value) <= top:
            raise ApiError(400, "invalid_input", f"{key}: a number from 1 to {top}", key)
        return int(value)

    async def search(self, request: web.Request) -> web.Response:
        args = self._search_args(request)
        per_page = self._int(request, "per_page", PER_PAGE, MAX_PER_PAGE)
        page = self._int(request, "page", 1, 100_000)
        rows, total = await asyncio.to_thread(cdr.search_calls, self.data_dir, limit=per_page,
                                              offset=(page - 1) * per_page, **args)
        return self._json({"total": total, "page": page, "per_page": per_page, "calls": [self._row(r) for r in rows]})

    async def export(self, request: web.Request) -> web.Response:
        args = self._search_args(request)
        rows, _ = await asyncio.to_thread(cdr.search_calls, self.data_dir, limit=CSV_MAX, **args)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        return web.Response(text=to_csv([self._row(r) for r in rows]), content_type="text/csv", charset="utf-8",
                            headers={"Content-Disposition": f'attachment; filename="cdr-{stamp}.csv"',
                                     "Cache-Control": "no-store", **COMMON_HEADERS})

    async def drain(self, request: web.Request) -> web.Response:
        """`gateway drain NAME` for a worker of this host. A page of another site cannot make a browser send the
        X-Console header without a CORS preflight (never answered here): no cross-site request forgery."""
        if request.headers.get("X-Console") != "drain":
            raise ApiError(403, "forbidden", "the console's drain requests carry X-Console: drain")
        origin = request.headers.get("Origin")
        if origin is not None and origin.partition("://")[2] != request.host:
            raise ApiError(403, "forbidden", "a drain from another origin")
        name = request.match_info["name"]
        if not WORKER_NAME.fullmatch(name):
            raise ApiError(404, "not_found", "no running worker with this name")
        try:
            answer = drain_worker(self.config, name)
        except (LookupError, ProcessLookupError, ValueError, KeyError):
            raise ApiError(404, "not_found", "no running worker with this name") from None
        log.event(logger, "console.drain", logging.WARNING, worker=name, by=self.name)
        return self._json(answer)

    def routes(self, app: web.Application) -> None:
        app.middlewares.append(self.middleware)
        app.router.add_get("/console", self.page)
        app.router.add_get("/console/static/{name}", self.asset)
        app.router.add_get("/console/api/live", self.live)
        app.router.add_get("/console/api/snapshot", self.get_snapshot)
        app.router.add_get("/console/api/local", self.get_local)
        app.router.add_get("/console/api/calls/{voice_id}", self.timeline)
        app.router.add_get("/console/api/cdr", self.search)
        app.router.add_get("/console/api/cdr.csv", self.export)
        app.router.add_post("/console/api/workers/{name}/drain", self.drain)
