"""Projects (the CPaaS tenant of the EnableX documents): API credentials, phone numbers, inbound settings,
the default webhook and the outbound trunk. Stored beside the rooms (`rooms.sqlite` in the data directory),
so the worker and the room service see the same projects.

A project named in `config/gateway.toml` ([[projects]]) gets credentials generated on first start; more are
made with `gateway projects create`. The app_key is kept (it signs the project's webhooks), readable only
by whoever can read the data directory.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import sqlite3
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import ProjectConfig
from .rooms import open_store

SCHEMA = """
CREATE TABLE IF NOT EXISTS projects (
    app_id TEXT PRIMARY KEY,
    app_key TEXT NOT NULL,
    name TEXT NOT NULL UNIQUE,
    data TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL
);
"""


@dataclass
class Number:
    number: str
    inbound: bool = True  # calls to it reach the project (route "api" unless [[dids]] says otherwise)
    outbound: bool = True  # it may be the caller ID of the project's dial-out calls

    def public(self) -> dict[str, Any]:
        return {"number": self.number, "in": self.inbound, "out": self.outbound}


@dataclass
class Project:
    app_id: str
    app_key: str
    name: str
    numbers: list[Number] = field(default_factory=list)
    welcome_text: str = ""
    voice_type: str = "female"
    language: str = "en-US"
    notification_url: str = ""
    trunk: str = ""  # the outbound trunk; empty = the first trunk with [trunks.outbound]

    def public(self, with_key: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"app_id": self.app_id, "name": self.name,
                               "numbers": [n.public() for n in self.numbers],
                               "inbound": {"welcome_text": self.welcome_text, "voice_type": self.voice_type,
                                           "language": self.language},
                               "notification_url": self.notification_url, "trunk": self.trunk}
        if with_key:
            out["app_key"] = self.app_key
        return out

    def settings(self) -> ProjectConfig:
        return ProjectConfig(name=self.name, welcome_text=self.welcome_text, voice_type=self.voice_type,
                             language=self.language, notification_url=self.notification_url)

    def can_call_from(self, number: str) -> bool:
        wanted = number.lstrip("+")
        return any(n.outbound and n.number.lstrip("+") == wanted for n in self.numbers)


def normalize_number(value: str) -> str:
    """E.164 with an optional leading +: digits only, 6 to 15 of them; raises ValueError."""
    digits = value[1:] if value.startswith("+") else value
    if not digits.isdigit() or not 6 <= len(digits) <= 15:
        raise ValueError("must be an E.164 number: optional +, then 6 to 15 digits")
    return value


def _secret() -> str:
    return base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")


class ProjectStore:
    def __init__(self, data_dir: Path | str) -> None:
        self._db = open_store(data_dir, SCHEMA)
        self._cache: dict[str, tuple[float, Project | None]] = {}

    @staticmethod
    def _project(row: tuple[Any, ...]) -> Project:
        app_id, app_key, name, data, _ = row
        d = json.loads(data)
        numbers = [Number(n["number"], n.get("in", True), n.get("out", True)) for n in d.pop("numbers", [])]
        return Project(app_id=app_id, app_key=app_key, name=name, numbers=numbers, **d)

    def _save(self, p: Project) -> None:
        data = asdict(p)
        for key in ("app_id", "app_key", "name"):
            data.pop(key)
        data["numbers"] = [n.public() for n in p.numbers]
        with self._db:
            self._db.execute("UPDATE projects SET data=? WHERE app_id=?", (json.dumps(data), p.app_id))
        self._cache.clear()

    def create(self, name: str, numbers: list[Number] | None = None, **settings: Any) -> Project:
        """A new project with generated credentials; ValueError if the name is taken."""
        if not name or len(name) > 64:
            raise ValueError("name: 1 to 64 characters")
        project = Project(app_id=uuid.uuid4().hex, app_key=_secret(), name=name, numbers=numbers or [], **settings)
        try:
            with self._db:
                self._db.execute("INSERT INTO projects (app_id, app_key, name, data, created_at) VALUES (?,?,?,?,?)",
                                 (project.app_id, project.app_key, name, "{}", time.time()))
        except sqlite3.IntegrityError:
            raise ValueError(f"name: a project named {name!r} exists") from None
        self._save(project)
        return project

    def ensure(self, config: ProjectConfig) -> Project:
        """The stored project for a configured one (created on first start); config settings win."""
        project = self.by_name(config.name, cached=False)
        if project is None:
            try:
                project = self.create(config.name)
            except ValueError:  # another process created it meanwhile
                project = self.by_name(config.name, cached=False)
                assert project is not None
        project.welcome_text, project.voice_type = config.welcome_text, config.voice_type
        project.language = config.language
        project.notification_url = config.notification_url or project.notification_url
        self._save(project)
        return project

    def update(self, project: Project) -> None:
        self._save(project)

    def _one(self, where: str, value: str) -> Project | None:
        row = self._db.execute(f"SELECT * FROM projects WHERE {where}=?", (value,)).fetchone()
        return None if row is None else self._project(row)

    def by_name(self, name: str, cached: bool = True) -> Project | None:
        return self._cached(f"name:{name}", lambda: self._one("name", name), cached)

    def get(self, app_id: str) -> Project | None:
        return self._cached(f"id:{app_id}", lambda: self._one("app_id", app_id), True)

    def _cached(self, key: str, load: Any, cached: bool, ttl: float = 2.0) -> Project | None:
        """Projects change rarely; a short cache keeps the API and call setup off the disk."""
        now = time.monotonic()
        hit = self._cache.get(key)
        if cached and hit is not None and now - hit[0] < ttl:
            return hit[1]
        value = load()
        self._cache[key] = (now, value)
        return value

    def authenticate(self, app_id: str, app_key: str) -> Project | None:
        project = self.get(app_id)
        if project is None:
            hmac.compare_digest(app_key, "x" * 32)  # same work whether or not the app_id exists
            return None
        return project if hmac.compare_digest(project.app_key.encode(), app_key.encode()) else None

    def by_number(self, number: str) -> Project | None:
        """The project owning an inbound number (in=true)."""
        wanted = number.lstrip("+")

        def load() -> Project | None:
            for project in self.list():
                if any(n.inbound and n.number.lstrip("+") == wanted for n in project.numbers):
                    return project
            return None

        return self._cached(f"number:{wanted}", load, True)

    def list(self) -> list[Project]:
        return [self._project(r) for r in self._db.execute("SELECT * FROM projects ORDER BY created_at")]

    def close(self) -> None:
        self._db.close()
