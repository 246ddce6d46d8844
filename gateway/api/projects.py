"""The CPaaS project API (the EnableX "Projects" document) on the worker's HTTP port: application developers
configure voice on their project over HTTP.

    GET    /cpaas/openapi.json               the OpenAPI document (as /voice/v1/openapi.json)
    GET    /cpaas/projects                   ?page=N&per_page=&order=asc|desc&app_name=&category_id=  (+ "search")
    POST   /cpaas/projects                   create {app_name, category_id, short_desc, description, services_incl}
    GET    /cpaas/projects/{app_id}
    POST   /cpaas/projects/{app_id}          edit (the same fields, each optional)
    POST   /cpaas/projects/{app_id}/reset_key    a new app_key; the old one stops at once in every process
    PATCH  /cpaas/projects/{app_id}/voice    {in, out, inbound: {event_url, welcome_text, voice_type, language,
                                              auto_record}, phone: [{phone, in, out, country, country_code}],
                                              notification_url}
    PATCH  /cpaas/projects/{app_id}/video    {notification_url, phone: [...]}

Answers are the document's shape: {"result": 1, ...}, or {"result": 0, "error": <code>, "desc": ..., "field"?}
with the HTTP status that fits (`CODES`). Credentials (HTTP Basic): the operator's (the room service's api_user
and api_key, DATA_DIR/room-service.json) see and change every project and alone create them; a project's own
app_id:app_key sees and changes only itself. Failed authentications count with the Voice API's (one window per
source). A change is in the shared store at once: the next call on every worker uses it (SQLite's data_version
empties every process's project cache); a new welcome text, voice or language renders in the background on the
worker that took the PATCH, and on the others at their next call, while the previous prompts go on playing.

A project declared in the configuration file ([[projects]]) keeps what the file says: its welcome text, voice,
language, auto_record and notification_url are refused here (1011, 409). What the product has no use for is
refused with a clear error rather than silently stored (1012): services other than voice and video (SMS),
recording delivery (FTP/S3: recordings are fetched through /voice/v1/recordings), video embedding settings.
"""

from __future__ import annotations

import hmac
import logging
import re
import unicodedata
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from .. import log
from ..apps.prompts import ProjectVoices
from ..store.projects import Number, Project, check_notification_url, normalize_number
from .openapi import OPENAPI
from .voice import ApiError, VoiceApi, is_operator

logger = logging.getLogger("gateway.api")
OPERATOR = web.RequestKey("operator", bool)
CALLER = web.RequestKey("caller", object)  # the authenticated project, or None for the operator
CATEGORIES = {1: "Education", 2: "Healthcare", 3: "Business", 4: "Customer support", 5: "Entertainment",
              6: "Government", 7: "Other"}
SERVICES = ("voice", "video")
VOICE_TYPES = ("female", "male")
PER_PAGE = 20
MAX_PER_PAGE = 100
MAX_NUMBERS = 100
LIMITS = {"app_name": 64, "short_desc": 128, "description": 1024, "welcome_text": 500, "country": 64}
# the document's codes, and this gateway's own for what it does not say (1001-1006, 1010-1013)
CODES = {"unauthorized": (401, 1001), "forbidden": (403, 1002), "too_many_auth_failures": (429, 1003),
         "invalid_json": (400, 1004), "body_too_large": (413, 1004), "invalid_input": (400, 1005),
         "not_found": (404, 1006), "method_not_allowed": (405, 1006), "invalid_app_id": (404, 1007),
         "invalid_category": (400, 1008), "no_service": (400, 1009), "number_taken": (409, 1010),
         "configured": (409, 1011), "not_supported": (400, 1012), "name_taken": (409, 1013),
         "invalid_page": (400, 1101), "page_out_of_range": (400, 1102), "invalid_order": (400, 1105),
         "internal_error": (500, 1000)}
VOICE_KEYS = {"in", "out", "inbound", "phone", "notification_url", "forward_pool"}
INBOUND_KEYS = {"event_url", "welcome_text", "voice_type", "language", "auto_record"}
VIDEO_KEYS = {"notification_url", "phone"}
PROJECT_KEYS = {"app_name", "category_id", "short_desc", "description", "services_incl"}
CONFIGURED = {"welcome_text", "voice_type", "language", "auto_record", "notification_url"}  # the file's, if declared
UNSUPPORTED = {"sms": "SMS is not provided by this gateway", "recording": "recordings are not delivered to FTP/S3: "
               "fetch them with GET /voice/v1/recordings", "embed": "video embedding is not provided by this gateway"}
COUNTRY_CODE = re.compile(r"\+?[0-9]{1,4}")
INTEGER = re.compile(r"[0-9]{1,6}")


class CpaasError(ApiError):
    """An error in the document's shape; `code` is one of CODES."""

    def __init__(self, code: str, message: str, field: str | None = None, retry_after: int | None = None) -> None:
        super().__init__(CODES[code][0], code, message, field, retry_after)

    def response(self) -> web.Response:
        body: dict[str, Any] = {"result": 0, "error": CODES.get(self.code, (0, 1000))[1], "desc": self.message}
        if self.field:
            body["field"] = self.field
        r = web.json_response(body, status=self.status)
        if self.status == 401:
            r.headers["WWW-Authenticate"] = 'Basic realm="cpaas", charset="UTF-8"'
        if self.retry_after is not None:
            r.headers["Retry-After"] = str(self.retry_after)
        return r


def _as_cpaas(exc: ApiError) -> CpaasError:
    if isinstance(exc, CpaasError):
        return exc
    code = exc.code if exc.code in CODES else "internal_error" if exc.status >= 500 else "invalid_input"
    # (a 4xx of aiohttp's own, "http_error", keeps its status under 1005)
    error = CpaasError(code, exc.message, exc.field, exc.retry_after)
    error.status = exc.status
    return error


def _text(body: dict[str, Any], key: str, prefix: str = "", required: bool = False) -> str | None:
    """A string of at most LIMITS[key] characters without control characters; None when absent (and allowed)."""
    value = body.get(key)
    name = prefix + key
    if value is None and not required:
        return None
    limit = LIMITS.get(key, 2048)
    if not isinstance(value, str) or (required and not value.strip()) or len(value) > limit:
        raise CpaasError("invalid_input", f"{name}: {'a non-empty string' if required else 'a string'} of at most "
                         f"{limit} characters", name)
    if any(unicodedata.category(ch) in ("Cc", "Cs") for ch in value):
        raise CpaasError("invalid_input", f"{name}: control characters and unpaired surrogates are not allowed", name)
    return value


def _bool(body: dict[str, Any], key: str, prefix: str = "") -> bool | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, bool):
        raise CpaasError("invalid_input", f"{prefix}{key}: true or false", prefix + key)
    return value


def _object(body: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise CpaasError("invalid_input", f"{key}: an object", key)
    return value


def _known(body: dict[str, Any], allowed: set[str], prefix: str = "") -> None:
    """Every key is one this gateway acts on; the others are refused by name (1012), never silently dropped."""
    for key in body:
        if key not in allowed:
            why = UNSUPPORTED.get(key, f"not a setting this gateway has (it takes: {', '.join(sorted(allowed))})")
            raise CpaasError("not_supported", f"{prefix}{key}: {why}", prefix + str(key)[:64])


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z") if ts else ""


class CpaasApi:
    def __init__(self, voice: VoiceApi, operator: tuple[str, str], voices: ProjectVoices | None,
                 languages: list[str]) -> None:
        self.voice = voice
        self.projects = voice.projects
        self.config = voice.config
        self.operator = operator
        self.voices = voices
        self.languages = languages

    # -- plumbing
    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.path.startswith("/cpaas/"):
            return await handler(request)  # type: ignore[no-any-return]
        return await self.voice.guarded(request, handler, CALLER, self._authenticate, _as_cpaas)

    def _authenticate(self, header: str, source: str) -> Project | None:
        """The project whose credentials these are, or None for the operator's; 401/429 as the Voice API."""
        self.voice.refuse_blocked(source)  # 429, in the document's shape through _as_cpaas
        if is_operator(header, self.operator):
            return None
        try:
            return self.voice._authenticate(header, source)
        except ApiError as exc:
            if exc.status == 401:
                raise CpaasError("unauthorized", "HTTP Basic credentials required: the operator's api_user:api_key, "
                                 "or the project's app_id:app_key") from None
            raise

    @staticmethod
    def _caller(request: web.Request) -> Project | None:
        caller = request[CALLER]
        return caller if isinstance(caller, Project) else None

    def _project(self, request: web.Request) -> Project:
        """The project of the path, if the credentials may see it (a project sees only itself)."""
        app_id = request.match_info["app_id"]
        caller = self._caller(request)
        if caller is not None and not hmac.compare_digest(caller.app_id.encode(), app_id[:64].encode()):
            raise CpaasError("forbidden", "a project's credentials see and change only that project", "app_id")
        project = self.projects.get(app_id) if len(app_id) <= 64 else None
        if project is None:
            raise CpaasError("invalid_app_id", "no project with this app_id", "app_id")
        return project

    def _configured(self, project: Project) -> bool:
        return any(p.name == project.name for p in self.config.projects)

    def public(self, project: Project) -> dict[str, Any]:
        def phones(numbers: list[Number]) -> list[dict[str, Any]]:
            return [{"phone": n.number, "in": n.inbound, "out": n.outbound, "country": n.country,
                     "country_code": n.country_code, **({"route": n.route} if n is not None and numbers is project.numbers
                                                         else {})} for n in numbers]

        voice = (project.language, project.voice_type, project.welcome_text)
        return {
            "app_id": project.app_id, "app_name": project.app_name or project.name, "name": project.name,
            "category_id": project.category_id or None, "category": CATEGORIES.get(project.category_id),
            "short_desc": project.short_desc, "description": project.description,
            "services_incl": project.services, "created": _iso(project.created_at),
            "app_key_fingerprint": project.key_fingerprint,
            "managed_by": "config" if self._configured(project) else "api",
            "voice": {"in": project.voice_in, "out": project.voice_out,
                      "inbound": {"event_url": project.inbound_event_url, "welcome_text": project.welcome_text,
                                  "voice_type": project.voice_type, "language": project.language,
                                  "auto_record": project.auto_record,
                                  "prompts": self.voices.status(voice) if self.voices is not None else "pending"},
                      "phone": phones(project.numbers), "notification_url": project.notification_url,
                      "forward_pool": project.forward_pool},
            "video": {"notification_url": project.video_notification_url, "phone": phones(project.video_numbers)},
        }

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            return await self.voice._body(request)
        except ApiError as exc:
            raise _as_cpaas(exc) from None

    async def _url(self, value: str | None, name: str) -> str | None:
        if value is None or value == "":
            return value
        try:
            check_notification_url(value)
        except ValueError as exc:
            raise CpaasError("invalid_input", f"{name}: {str(exc).partition(': ')[2] or exc}", name) from None
        if (unsafe := await self.voice.notifier.check(value)) is not None:  # SSRF: after DNS too
            raise CpaasError("invalid_input", f"{name}: {unsafe}", name)
        return value

    # -- the project itself
    def _details(self, body: dict[str, Any], project: Project | None) -> dict[str, Any]:
        """The create/edit fields, checked; only those given (all of them required to create)."""
        creating = project is None
        _known(body, PROJECT_KEYS)
        out: dict[str, Any] = {}
        name = _text(body, "app_name", required=creating)
        if name is not None:
            if not name.strip():
                raise CpaasError("invalid_input", "app_name: a non-empty string", "app_name")
            out["app_name"] = name.strip()
        for key in ("short_desc", "description"):
            if (text := _text(body, key)) is not None:
                out[key] = text
        category = body.get("category_id")
        if category is not None or creating:
            if isinstance(category, str) and INTEGER.fullmatch(category):
                category = int(category)
            if not isinstance(category, int) or isinstance(category, bool) or category not in CATEGORIES:
                raise CpaasError("invalid_category", "category_id: one of "
                                 + ", ".join(f"{k} ({v})" for k, v in CATEGORIES.items()), "category_id")
            out["category_id"] = category
        services = body.get("services_incl")
        if services is not None or creating:
            if not isinstance(services, list) or not services:
                raise CpaasError("no_service", "services_incl: a list naming at least one service: "
                                 + ", ".join(SERVICES), "services_incl")
            for service in services:
                if service not in SERVICES:
                    why = UNSUPPORTED.get(str(service).lower(), f"{str(service)[:32]!r} is not a service of this gateway")
                    raise CpaasError("no_service", f"services_incl: {why} (it provides {', '.join(SERVICES)})",
                                     "services_incl")
            out["services"] = list(dict.fromkeys(services))
        return out

    async def list_projects(self, request: web.Request) -> web.Response:
        q = request.query
        page_text, per_text = q.get("page", "1"), q.get("per_page", str(PER_PAGE))
        if not INTEGER.fullmatch(page_text) or int(page_text) < 1:
            raise CpaasError("invalid_page", "page: a whole number from 1", "page")
        if not INTEGER.fullmatch(per_text) or not 1 <= int(per_text) <= MAX_PER_PAGE:
            raise CpaasError("invalid_page", f"per_page: a whole number from 1 to {MAX_PER_PAGE}", "per_page")
        order = q.get("order", "asc").lower()
        if order not in ("asc", "desc"):
            raise CpaasError("invalid_order", "order: asc or desc (by creation time)", "order")
        search: dict[str, Any] = {}
        wanted = q.get("app_name", "")
        if len(wanted) > LIMITS["app_name"]:
            raise CpaasError("invalid_input", f"app_name: at most {LIMITS['app_name']} characters", "app_name")
        category = q.get("category_id")
        if category is not None and (not INTEGER.fullmatch(category) or int(category) not in CATEGORIES):
            raise CpaasError("invalid_category", "category_id: one of " + ", ".join(map(str, CATEGORIES)), "category_id")
        caller = self._caller(request)
        projects = [caller] if caller is not None else self.projects.list()
        if wanted:
            search["app_name"] = wanted
            projects = [p for p in projects if wanted.casefold() in (p.app_name or p.name).casefold()]
        if category is not None:
            search["category_id"] = int(category)
            projects = [p for p in projects if p.category_id == int(category)]
        projects.sort(key=lambda p: p.created_at, reverse=order == "desc")
        page, per_page = int(page_text), int(per_text)
        pages = max(1, -(-len(projects) // per_page))
        if page > pages:
            raise CpaasError("page_out_of_range", f"page: there are {pages} page(s)", "page")
        shown = projects[(page - 1) * per_page: page * per_page]
        return web.json_response({"result": 1, "projects": [self.public(p) for p in shown],
                                  "search": {**search, "page": page, "per_page": per_page, "order": order,
                                             "total": len(projects), "total_pages": pages}})

    async def create(self, request: web.Request) -> web.Response:
        if self._caller(request) is not None:
            raise CpaasError("forbidden", "only the operator's credentials create projects")
        details = self._details(await self._body(request), None)
        name = details["app_name"]
        try:
            project = self.projects.create(name, **details)
        except ValueError:
            raise CpaasError("name_taken", f"app_name: a project named {name!r} exists", "app_name") from None
        if self.voices is not None:
            self.voices.prepare((project.language, project.voice_type, project.welcome_text), project.name)
        log.event(logger, "project.created", project=project.name, app_id=project.app_id, by="api")
        return web.json_response({"result": 1, "app_id": project.app_id, "app_key": project.app_key,
                                  "webhook_secret": project.webhook_secret, "project": self.public(project)},
                                 status=201)

    async def get(self, request: web.Request) -> web.Response:
        return web.json_response({"result": 1, "project": self.public(self._project(request))})

    async def edit(self, request: web.Request) -> web.Response:
        project = self._project(request)
        details = self._details(await self._body(request), project)
        for key, value in details.items():
            setattr(project, key, value)
        self.projects.update(project)
        self._changed(request, project, sorted(details))
        return web.json_response({"result": 1, "project": self.public(project)})

    async def reset_key(self, request: web.Request) -> web.Response:
        project = self._project(request)
        reset = self.projects.reset_key(project.name, webhook_secret=False)
        if reset is None:  # removed between the two reads
            raise CpaasError("invalid_app_id", "no project with this app_id", "app_id")
        return web.json_response({"result": 1, "app_id": reset.app_id, "app_key": reset.app_key})

    # -- voice and video
    def _phones(self, value: Any, name: str, project: Project, owned: bool) -> list[Number]:
        """A phone list; `owned`: each number belongs to this project alone (409 when another has it)."""
        if not isinstance(value, list) or len(value) > MAX_NUMBERS:
            raise CpaasError("invalid_input", f"{name}: a list of at most {MAX_NUMBERS} objects", name)
        numbers: list[Number] = []
        seen: set[str] = set()
        for i, entry in enumerate(value):
            where = f"{name}[{i}]"
            if not isinstance(entry, dict):
                raise CpaasError("invalid_input", f"{where}: an object", where)
            _known(entry, {"phone", "in", "out", "country", "country_code", "route"}, where + ".")
            route = entry.get("route", "api")
            if route not in ("api", "ivr") or (route != "api" and not owned):
                raise CpaasError("invalid_input", f"{where}.route: \"api\" (answered and held for the application) or "
                                 "\"ivr\" (the dial-in prompts: meeting ID and PIN of this project's rooms)"
                                 if owned else f"{where}.route: only voice numbers have a route", f"{where}.route")
            phone = entry.get("phone")
            try:
                number = normalize_number(phone if isinstance(phone, str) else "")
            except ValueError as exc:
                raise CpaasError("invalid_input", f"{where}.phone: {exc}", f"{where}.phone") from None
            digits = number.lstrip("+")
            if digits in seen:
                raise CpaasError("invalid_input", f"{where}.phone: listed twice", f"{where}.phone")
            seen.add(digits)
            code = entry.get("country_code", "")
            if code not in ("", None) and not (isinstance(code, str) and COUNTRY_CODE.fullmatch(code)):
                raise CpaasError("invalid_input", f"{where}.country_code: 1 to 4 digits, e.g. \"44\"",
                                 f"{where}.country_code")
            inbound, outbound = _bool(entry, "in", where + "."), _bool(entry, "out", where + ".")
            numbers.append(Number(number, True if inbound is None else inbound, True if outbound is None else outbound,
                                  _text(entry, "country", where + ".") or "", (code or "").lstrip("+"), route))
            if owned:
                other = self.projects.number_owner(number)
                did = self.config.did(digits) or self.config.did(number)
                if (other is not None and other.app_id != project.app_id) or (did is not None and did.project != project.name):
                    raise CpaasError("number_taken", f"{where}.phone: {number} belongs to another project",
                                     f"{where}.phone")
        return numbers

    async def patch_voice(self, request: web.Request) -> web.Response:
        project = self._project(request)
        body = await self._body(request)
        _known(body, VOICE_KEYS)
        inbound = _object(body, "inbound") or {}
        _known(inbound, INBOUND_KEYS, "inbound.")
        if self._configured(project):
            for key in sorted(CONFIGURED):
                if key in inbound or (key == "notification_url" and key in body):
                    field = key if key == "notification_url" else f"inbound.{key}"
                    raise CpaasError("configured", f"{field}: project {project.name!r} is declared in the "
                                     "configuration file ([[projects]]), which sets this; change it there", field)
        changes: dict[str, Any] = {}
        for key, attr in (("in", "voice_in"), ("out", "voice_out")):
            if (flag := _bool(body, key)) is not None:
                changes[attr] = flag
        if "notification_url" in body:
            changes["notification_url"] = await self._url(_text(body, "notification_url"), "notification_url")
        if "event_url" in inbound:
            changes["inbound_event_url"] = await self._url(_text(inbound, "event_url", "inbound."), "inbound.event_url")
        if (welcome := _text(inbound, "welcome_text", "inbound.")) is not None:
            changes["welcome_text"] = welcome.strip()
        if (voice_type := inbound.get("voice_type")) is not None:
            if voice_type not in VOICE_TYPES:
                raise CpaasError("invalid_input", "inbound.voice_type: " + " or ".join(VOICE_TYPES), "inbound.voice_type")
            changes["voice_type"] = voice_type
        if (language := inbound.get("language")) is not None:
            if language not in self.languages:
                raise CpaasError("invalid_input", "inbound.language: one of " + ", ".join(self.languages)
                                 + " (the prompts' languages)", "inbound.language")
            changes["language"] = language
        if (record := _bool(inbound, "auto_record", "inbound.")) is not None:
            changes["auto_record"] = record
        if "phone" in body:
            changes["numbers"] = self._phones(body["phone"], "phone", project, owned=True)
        if "forward_pool" in body:  # this gateway's own: forward validated callers to SIP media gateways
            pools = [p.name for p in self.config.forward_pools]
            if body["forward_pool"] not in ("", *pools):
                raise CpaasError("invalid_input", "forward_pool: \"\" (rooms on Janus) or one of the operator's "
                                 f"[[forward_pools]]: {', '.join(pools) or 'none configured'}", "forward_pool")
            changes["forward_pool"] = body["forward_pool"]
        before = (project.language, project.voice_type, project.welcome_text)
        for key, value in changes.items():
            setattr(project, key, value)
        self.projects.update(project)
        after = (project.language, project.voice_type, project.welcome_text)
        if after != before and self.voices is not None:  # the previous prompts play until these are ready
            self.voices.prepare(after, project.name)
        self._changed(request, project, sorted(changes))
        return web.json_response({"result": 1, "project": self.public(project)})

    async def patch_video(self, request: web.Request) -> web.Response:
        project = self._project(request)
        body = await self._body(request)
        _known(body, VIDEO_KEYS)
        changes: dict[str, Any] = {}
        if "notification_url" in body:
            changes["video_notification_url"] = await self._url(_text(body, "notification_url"), "notification_url")
        if "phone" in body:  # the dial-in numbers its room pages show: any E.164 number (a DID of the operator's)
            changes["video_numbers"] = self._phones(body["phone"], "phone", project, owned=False)
        for key, value in changes.items():
            setattr(project, key, value)
        self.projects.update(project)
        self._changed(request, project, sorted(changes))
        return web.json_response({"result": 1, "project": self.public(project)})

    def _changed(self, request: web.Request, project: Project, changed: list[str]) -> None:
        log.event(logger, "project.changed", project=project.name, app_id=project.app_id, fields=",".join(changed),
                  by="operator" if self._caller(request) is None else "project")

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)  # the same document as /voice/v1/openapi.json, for the operator too

    def routes(self, app: web.Application) -> None:
        app.middlewares.append(self.middleware)
        app.router.add_get("/cpaas/openapi.json", self.openapi)
        app.router.add_get("/cpaas/projects", self.list_projects)
        app.router.add_post("/cpaas/projects", self.create)
        app.router.add_get("/cpaas/projects/{app_id}", self.get)
        app.router.add_post("/cpaas/projects/{app_id}", self.edit)
        app.router.add_post("/cpaas/projects/{app_id}/reset_key", self.reset_key)
        app.router.add_patch("/cpaas/projects/{app_id}/voice", self.patch_voice)
        app.router.add_patch("/cpaas/projects/{app_id}/video", self.patch_video)
