"""Thin helpers for the Janus VideoRoom plugin (the browsers' video room; phones are in the AudioBridge).

Request shapes follow janus_videoroom.c (Janus 1.1.2) with `string_ids = true`: room ids are strings.
Browsers publish and subscribe themselves (janus.js); the gateway only creates and destroys rooms.
"""

from __future__ import annotations

from typing import Any

from gateway.adapters.janus import JanusHandle, Json

PLUGIN = "janus.plugin.videoroom"


async def create_room(handle: JanusHandle, room: str, admin_key: str, secret: str, *, publishers: int = 16,
                      description: str = "", pin: str = "", allowed: list[str] | None = None,
                      audiocodec: str = "opus", videocodec: str = "vp8", bitrate: int = 0, **extra: Any) -> Json:
    """Create room `room` (not permanent, not listed); `secret` guards edit/destroy/kick."""
    body: Json = {"request": "create", "room": room, "admin_key": admin_key, "secret": secret, "is_private": True,
                  "permanent": False, "publishers": publishers, "audiocodec": audiocodec, "videocodec": videocodec,
                  **extra}
    if bitrate:
        body["bitrate"] = bitrate
    if description:
        body["description"] = description
    if pin:
        body["pin"] = pin
    if allowed is not None:
        body["allowed"] = allowed
    return await handle.request(body)


async def destroy_room(handle: JanusHandle, room: str, secret: str) -> Json:
    return await handle.request({"request": "destroy", "room": room, "secret": secret, "permanent": False})


async def exists(handle: JanusHandle, room: str) -> bool:
    return bool((await handle.request({"request": "exists", "room": room})).get("exists"))
