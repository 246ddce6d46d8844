"""Projects (the CPaaS tenant of the EnableX documents): API credentials, phone numbers, inbound settings,
the default webhook and the outbound trunk. Stored beside the rooms (`rooms.sqlite` in the data directory),
so the worker and the room service see the same projects.

A project named in `config/gateway.toml` ([[projects]]) gets credentials generated on first start; more are
made with `gateway projects create`. Secrets at rest:
- the app_key is kept only as a keyed hash (HMAC-SHA256 under the data directory's key, bound to the app_id);
  it is shown once, by `gateway projects create` or `gateway projects reset-key NAME` (which ends the old one).
  A keyed hash rather than a slow one: app_keys are 192 random bits, beyond any guessing whatever the hash's
  speed, and a slow hash would hand whoever knows an app_id a way to burn CPU on every request;
- the webhook secret (signs the project's webhooks; a secret of its own, so a webhook receiver never holds the
  API key) must stay usable, so it is sealed (AES-GCM, `secure.DataKey`); shown with the app_key;
- a notification_url with credentials (user:password@) is refused: the signature authenticates the webhooks.
A store written by an older version (app_keys in clear) is converted in place when opened: the same keys keep
working, each project gets a new webhook secret (`gateway projects reset-webhook-secret NAME` shows one).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .. import log
from ..config import ProjectConfig
from .rooms import open_store, rewrite, store_key

logger = logging.getLogger("gateway.store")
SCHEMA = """
CREATE TABLE IF NOT EXISTS projects (
    app_id TEXT PRIMARY KEY,
    key_hash TEXT NOT NULL,
    name TEXT NOT NULL UNIQUE,
    data TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    webhook_secret TEXT NOT NULL DEFAULT '',
    key_fingerprint TEXT NOT NULL DEFAULT ''
);
"""
COLUMNS = "app_id, key_hash, name, data, webhook_secret, key_fingerprint, created_at"
# kept in columns of their own (or never stored: app_key), not in the `data` JSON
COLUMN_FIELDS = ("app_id", "app_key", "name", "webhook_secret", "key_hash", "key_fingerprint", "created_at")
CACHE_TTL_S = 2.0  # how long a project read from the store is reused (a write by any process empties the cache)
CACHE_SIZE = 256  # found projects only (an unknown app_id, name or number is never cached)


@dataclass
class Number:
    number: str
    inbound: bool = True  # calls to it reach the project (route "api" unless [[dids]] says otherwise)
    outbound: bool = True  # it may be the caller ID of the project's dial-out calls
    country: str = ""  # as the project API was told (ISO 3166 alpha-2 or a name): shown, never used for routing
    country_code: str = ""  # e.g. "1", "44": shown, never used for routing
    route: str = "api"  # inbound calls: "api" (answered, on hold for the application) or "ivr" (the dial-in prompts)

    def public(self) -> dict[str, Any]:
        out: dict[str, Any] = {"number": self.number, "in": self.inbound, "out": self.outbound}
        if self.route != "api":
            out["route"] = self.route
        if self.country:
            out["country"] = self.country
        if self.country_code:
            out["country_code"] = self.country_code
        return out


@dataclass
class Project:
    app_id: str
    app_key: str = field(repr=False)  # in clear only on what `create` and `reset_key` return; "" when read back
    name: str
    numbers: list[Number] = field(default_factory=list)
    welcome_text: str = ""
    voice_type: str = "female"
    language: str = "en-US"
    notification_url: str = ""
    trunk: str = ""  # the outbound trunk; empty = the first trunk with [trunks.outbound]
    auto_record: bool = False  # voice.inbound.auto_record: its inbound calls are recorded from answer to hang-up
    webhook_secret: str = field(default="", repr=False)  # signs the project's webhooks
    key_hash: str = field(default="", repr=False)
    key_fingerprint: str = ""  # the first 8 hex digits of SHA-256(app_key): tells keys apart, reveals nothing usable
    # the CPaaS project document's own fields (`api.projects`): shown and searched, and what the gateway acts on
    app_name: str = ""  # the name shown (may change; "" = name, which is fixed: rooms, DIDs and the CLI use it)
    short_desc: str = ""
    description: str = ""
    category_id: int = 0  # 0: none given (projects made by the config file or the CLI)
    services: list[str] = field(default_factory=lambda: ["voice", "video"])  # services_incl
    voice_in: bool = True  # voice.in: calls to the project's numbers are taken (false: refused with 403)
    voice_out: bool = True  # voice.out: the Voice API may dial out for the project (false: 403)
    inbound_event_url: str = ""  # voice.inbound.event_url: webhooks of inbound calls (else notification_url)
    video_notification_url: str = ""  # video.notification_url: stored and shown (the room service sends no webhooks)
    video_numbers: list[Number] = field(default_factory=list)  # video.phone: the dial-in numbers room pages show
    created_at: float = 0.0
    forward_pool: str = ""  # its rooms are reached through this [[forward_pools]] entry (sip_forward); "" = Janus

    def public(self, with_key: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"app_id": self.app_id, "name": self.name,
                               "numbers": [n.public() for n in self.numbers],
                               "inbound": {"welcome_text": self.welcome_text, "voice_type": self.voice_type,
                                           "language": self.language, "auto_record": self.auto_record},
                               "notification_url": self.notification_url, "trunk": self.trunk,
                               "app_key_fingerprint": self.key_fingerprint}
        if with_key:
            if self.app_key:
                out["app_key"] = self.app_key
            out["webhook_secret"] = self.webhook_secret
        return out

    def settings(self) -> ProjectConfig:
        return ProjectConfig(name=self.name, welcome_text=self.welcome_text, voice_type=self.voice_type,
                             language=self.language, notification_url=self.notification_url,
                             auto_record=self.auto_record, forward_pool=self.forward_pool)

    def event_url(self, direction: str) -> str:
        """Where a call's webhooks go when the call names none: voice.inbound.event_url for inbound calls, else
        the project's notification_url."""
        return (self.inbound_event_url if direction == "inbound" else "") or self.notification_url

    def inbound_number(self, number: str) -> Number | None:
        wanted = number.lstrip("+")
        return next((n for n in self.numbers if n.inbound and n.number.lstrip("+") == wanted), None)

    def can_call_from(self, number: str) -> bool:
        wanted = number.lstrip("+")
        return any(n.outbound and n.number.lstrip("+") == wanted for n in self.numbers)


def normalize_number(value: str) -> str:
    """E.164 with an optional leading +: digits only, 6 to 15 of them; raises ValueError."""
    digits = value[1:] if value.startswith("+") else value
    if not (digits.isascii() and digits.isdigit()) or not 6 <= len(digits) <= 15:
        raise ValueError("must be an E.164 number: optional +, then 6 to 15 digits")
    return value


def check_notification_url(url: str) -> str:
    """An http(s) URL without credentials; ValueError otherwise (the message names the field)."""
    if not url:
        return url
    if not url.startswith(("http://", "https://")):
        raise ValueError("notification_url: an http(s):// URL")
    if "@" in urlsplit(url).netloc:
        raise ValueError("notification_url: no user:password@ in the URL: credentials are not stored, the "
                         "webhooks are signed with the project's webhook_secret instead")
    return url


def without_credentials(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _secret() -> str:
    return base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")


def _number(n: dict[str, Any]) -> Number:
    return Number(n["number"], n.get("in", True), n.get("out", True), n.get("country", ""), n.get("country_code", ""),
                  n.get("route", "api"))


def fingerprint(app_key: str) -> str:
    return hashlib.sha256(app_key.encode()).hexdigest()[:8]


class ProjectStore:
    def __init__(self, data_dir: Path | str) -> None:
        self._db = open_store(data_dir, SCHEMA)
        self._key = store_key(self._db, data_dir)
        self._cache: OrderedDict[str, tuple[float, Project]] = OrderedDict()
        self._lock = threading.Lock()  # the room service reads from several threads
        self._version = -1  # SQLite's data_version when the cache was last valid
        if "app_key" in {r[1] for r in self._db.execute("PRAGMA table_info(projects)")}:
            converted = rewrite(self._db, self._convert_clear_keys)
            if converted:
                log.event(logger, "projects.keys_hashed", logging.WARNING, projects=converted,
                          note="app_keys stored in clear by an older version are now kept as keyed hashes; the "
                               "keys still work; webhook secrets are new: gateway projects reset-webhook-secret NAME")

    def _hash(self, app_id: str, app_key: str) -> str:
        return self._key.mac("app_key", f"{app_id}:{app_key}")

    def _seal_webhook(self, app_id: str, secret: str) -> str:
        return self._key.seal(secret, f"project:{app_id}:webhook_secret")

    def _convert_clear_keys(self, db: sqlite3.Connection) -> int:
        """The old table (app_key in clear) becomes the new one, row by row, inside `rewrite`'s transaction."""
        if "app_key" not in {r[1] for r in db.execute("PRAGMA table_info(projects)")}:
            return 0  # another process converted it meanwhile
        db.execute("ALTER TABLE projects RENAME COLUMN app_key TO key_hash")
        db.execute("ALTER TABLE projects ADD COLUMN webhook_secret TEXT NOT NULL DEFAULT ''")
        db.execute("ALTER TABLE projects ADD COLUMN key_fingerprint TEXT NOT NULL DEFAULT ''")
        rows = db.execute("SELECT app_id, key_hash, name, data FROM projects").fetchall()
        for app_id, clear, name, data in rows:
            settings = json.loads(data)
            url = str(settings.get("notification_url") or "")
            if "@" in urlsplit(url).netloc:
                settings["notification_url"] = without_credentials(url)
                log.event(logger, "projects.url_credentials_removed", logging.WARNING, project=name,
                          note="notification_url had user:password@; the webhooks are signed instead")
            db.execute("UPDATE projects SET key_hash=?, webhook_secret=?, key_fingerprint=?, data=? WHERE app_id=?",
                       (self._hash(app_id, clear), self._seal_webhook(app_id, _secret()), fingerprint(clear),
                        json.dumps(settings), app_id))
        return len(rows)

    def _project(self, row: tuple[Any, ...]) -> Project:
        app_id, key_hash, name, data, webhook, key_fingerprint, created_at = row
        d = json.loads(data)
        numbers = [_number(n) for n in d.pop("numbers", [])]
        video = [_number(n) for n in d.pop("video_numbers", [])]
        secret = self._key.unseal(webhook, f"project:{app_id}:webhook_secret") if webhook else ""
        known = {f.name for f in fields(Project)}
        return Project(app_id=app_id, app_key="", name=name, numbers=numbers, video_numbers=video, webhook_secret=secret,
                       key_hash=key_hash, key_fingerprint=key_fingerprint, created_at=created_at,
                       **{k: v for k, v in d.items() if k in known})

    def _save(self, p: Project) -> None:
        check_notification_url(p.notification_url)
        data = asdict(p)
        for key in COLUMN_FIELDS:
            data.pop(key)
        data["numbers"] = [n.public() for n in p.numbers]
        data["video_numbers"] = [n.public() for n in p.video_numbers]
        with self._db:
            self._db.execute("UPDATE projects SET data=? WHERE app_id=?", (json.dumps(data), p.app_id))
        self._forget()

    def _forget(self) -> None:
        with self._lock:
            self._cache.clear()

    def create(self, name: str, numbers: list[Number] | None = None, **settings: Any) -> Project:
        """A new project with generated credentials (in clear on the returned object only); ValueError if the
        name is taken or a setting is invalid."""
        if not name or len(name) > 64:
            raise ValueError("name: 1 to 64 characters")
        check_notification_url(settings.get("notification_url", ""))
        app_id, app_key, webhook = uuid.uuid4().hex, _secret(), _secret()
        project = Project(app_id=app_id, app_key=app_key, name=name, numbers=numbers or [], webhook_secret=webhook,
                          key_hash=self._hash(app_id, app_key), key_fingerprint=fingerprint(app_key),
                          created_at=time.time(), **settings)
        try:
            with self._db:
                self._db.execute(f"INSERT INTO projects ({COLUMNS}) VALUES (?,?,?,?,?,?,?)",
                                 (app_id, project.key_hash, name, "{}", self._seal_webhook(app_id, webhook),
                                  project.key_fingerprint, project.created_at))
        except sqlite3.IntegrityError:
            raise ValueError(f"name: a project named {name!r} exists") from None
        self._save(project)
        return project

    def reset_key(self, name: str, webhook_secret: bool = True) -> Project | None:
        """A new app_key (the old one stops working at once, in every process: `data_version`) and, unless told
        otherwise, a new webhook secret; the project with both in clear, or None if there is no such project."""
        project = self.by_name(name, cached=False)
        if project is None:
            return None
        project.app_key = _secret()
        project.key_hash, project.key_fingerprint = self._hash(project.app_id, project.app_key), fingerprint(project.app_key)
        if webhook_secret:
            project.webhook_secret = _secret()
        with self._db:
            self._db.execute("UPDATE projects SET key_hash=?, key_fingerprint=?, webhook_secret=? WHERE app_id=?",
                             (project.key_hash, project.key_fingerprint,
                              self._seal_webhook(project.app_id, project.webhook_secret), project.app_id))
        self._forget()
        log.event(logger, "project.key_reset", project=name, app_id=project.app_id, webhook_secret=webhook_secret)
        return project

    def reset_webhook_secret(self, name: str) -> Project | None:
        """A new webhook secret only (the app_key stays); the project with it in clear, or None."""
        project = self.by_name(name, cached=False)
        if project is None:
            return None
        project.webhook_secret = _secret()
        with self._db:
            self._db.execute("UPDATE projects SET webhook_secret=? WHERE app_id=?",
                             (self._seal_webhook(project.app_id, project.webhook_secret), project.app_id))
        self._forget()
        log.event(logger, "project.webhook_secret_reset", project=name, app_id=project.app_id)
        return project

    def ensure(self, config: ProjectConfig) -> Project:
        """The stored project for a configured one (created on first start); config settings win."""
        project = self.by_name(config.name, cached=False)
        if project is None:
            try:
                project = self.create(config.name)
                log.event(logger, "project.created", project=config.name, app_id=project.app_id,
                          note=f"its app_key is not shown: gateway projects reset-key {config.name} makes one")
            except ValueError:  # another process created it meanwhile
                project = self.by_name(config.name, cached=False)
                assert project is not None
        project.welcome_text, project.voice_type = config.welcome_text, config.voice_type
        project.language = config.language
        project.auto_record = config.auto_record
        project.notification_url = config.notification_url or project.notification_url
        self._save(project)
        return project

    def update(self, project: Project) -> None:
        self._save(project)

    def _one(self, where: str, value: str) -> Project | None:
        row = self._db.execute(f"SELECT {COLUMNS} FROM projects WHERE {where}=?", (value,)).fetchone()
        return None if row is None else self._project(row)

    def by_name(self, name: str, cached: bool = True) -> Project | None:
        return self._cached(f"name:{name}", lambda: self._one("name", name), cached)

    def get(self, app_id: str) -> Project | None:
        return self._cached(f"id:{app_id}", lambda: self._one("app_id", app_id), True)

    def _cached(self, key: str, load: Callable[[], Project | None], cached: bool) -> Project | None:
        """Projects change rarely; a short cache keeps the API and call setup off the disk. Only projects that
        exist are cached, at most CACHE_SIZE of them: unknown app_ids (anyone can send those) cost a lookup by
        primary key and no memory."""
        now = time.monotonic()
        with self._lock:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            if version != self._version:  # another process wrote (a key reset, a PATCH): nothing cached holds
                self._version = version
                self._cache.clear()
            hit = self._cache.get(key)
            if cached and hit is not None and now - hit[0] < CACHE_TTL_S:
                self._cache.move_to_end(key)
                return hit[1]
        value = load()
        with self._lock:
            if value is None:
                self._cache.pop(key, None)
                return None
            self._cache[key] = (now, value)
            self._cache.move_to_end(key)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return value

    def authenticate(self, app_id: str, app_key: str) -> Project | None:
        """The project whose credentials these are: its app_key, or the key `internal_key` gives the room service."""
        project = self.get(app_id)
        if project is None:
            self._hash(app_id, app_key)  # the same work whether or not the app_id exists
            return None
        if hmac.compare_digest(self._hash(app_id, app_key).encode(), project.key_hash.encode()):
            return project
        return project if hmac.compare_digest(app_key.encode(), self.internal_key(project).encode()) else None

    def internal_key(self, project: Project) -> str:
        """A key the processes sharing this data directory (the room service's "call a phone") use to call the
        Voice API as the project, since the app_key itself is not kept. Derived from the data directory's key
        and the current key hash, so `reset_key` ends it too; never shown."""
        return self._key.mac("internal", f"{project.app_id}:{project.key_hash}")

    def by_number(self, number: str) -> Project | None:
        """The project owning an inbound number (in=true)."""
        wanted = number.lstrip("+")

        def load() -> Project | None:
            return next((p for p in self.list() if p.inbound_number(wanted) is not None), None)

        return self._cached(f"number:{wanted}", load, True)

    def number_owner(self, number: str) -> Project | None:
        """The project holding this number (in or out), if any: a number belongs to one project."""
        wanted = number.lstrip("+")
        return next((p for p in self.list() if any(n.number.lstrip("+") == wanted for n in p.numbers)), None)

    def list(self) -> list[Project]:
        return [self._project(r) for r in self._db.execute(f"SELECT {COLUMNS} FROM projects ORDER BY created_at")]

    def close(self) -> None:
        self._db.close()
