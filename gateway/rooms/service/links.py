"""The room service's secrets, tokens and addresses: what the worker and the CLI need without loading the service
(no aiohttp, no Janus client). `gateway rooms create|list|delete` build links from the running service's own
address (`write_running` records it once the port is bound), not from their configuration."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

from ... import tls
from ...config import Config
from . import security

PHONE_TOKEN_S = 60  # a phone token is good this long: the worker makes one per join
RUNNING = "room-service.running.json"  # the running service's addresses (`write_running`)


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


def host_token(secret: str, room_id: str, expires: int) -> str:
    """The moderators' token of a room (in the host link), good until `expires` (Unix time)."""
    return security.sign(secret, f"host:{room_id}", expires)


def check_host_token(secret: str, room_id: str, token: object, now: float | None = None) -> str:
    """"ok", "expired" or "invalid"."""
    return security.verify(secret, f"host:{room_id}", token, time.time() if now is None else now)


def phone_token(secret: str, room_id: str, role: str, now: float | None = None) -> str:
    """The worker's token for one join of a phone in `role`: good for PHONE_TOKEN_S from `now`."""
    expires = int((time.time() if now is None else now) + PHONE_TOKEN_S)
    return security.sign(secret, f"phone:{room_id}:{role}", expires)


def check_phone_token(secret: str, room_id: str, role: str, token: object, now: float | None = None) -> bool:
    return security.verify(secret, f"phone:{room_id}:{role}", token, time.time() if now is None else now,
                           skew=security.CLOCK_SKEW_S) == "ok"


def links_base(config: Config) -> str:
    """Where people reach the room service: `room_service.url`, else its own scheme, host and port."""
    rs = config.room_service
    return rs.url or f"{tls.scheme(rs.tls_cert)}://{rs.host}:{rs.port}"


def write_running(config: Config) -> Path:
    """DATA_DIR/room-service.running.json, once the port is bound: what the CLI needs to build links that point at
    this service (not at what its own configuration says) and to call its Video API. No secrets in it."""
    rs = config.room_service
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(rs.host, rs.host)
    info = {"pid": os.getpid(), "url": links_base(config), "tls_cert": rs.tls_cert, "api_user": rs.api_user,
            "api": f"{tls.scheme(rs.tls_cert)}://{f'[{host}]' if ':' in host else host}:{rs.port}"}
    path = config.data_dir / RUNNING
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)
    return path


def running_service(data_dir: Path) -> dict[str, Any] | None:
    """What `write_running` wrote, if the process that wrote it is alive; else None."""
    try:
        info = json.loads((data_dir / RUNNING).read_text())
        os.kill(int(info["pid"]), 0)
    except PermissionError:  # alive, another user's
        return info  # type: ignore[no-any-return]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if isinstance(info, dict) else None


def room_links(config: Config, secret: str, room_id: str, now: float | None = None,
               base: str | None = None) -> dict[str, str]:
    """The page for participants, and the moderator (host) page, whose link expires in `host_link_days`. `base`:
    the running service's address (`running_service`), else `links_base`."""
    rs = config.room_service
    base = base or links_base(config)
    expires = int((time.time() if now is None else now) + rs.host_link_days * 86400)
    return {"join": f"{base}/rooms/{room_id}",
            "host": f"{base}/rooms/{room_id}?host={host_token(secret, room_id, expires)}"}
