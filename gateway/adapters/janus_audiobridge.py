"""Thin helpers for the Janus AudioBridge plugin (the audio mix phones join by plain RTP).

Request shapes follow janus_audiobridge.c (Janus 1.1.2) with `string_ids = true`, as our rendered
configuration sets: room and participant ids are strings. Room management (`create`, `destroy`, `mute`,
`unmute`, `kick`, `listparticipants`) is synchronous; `join` is answered by `ack` then a `joined` event,
which `JanusHandle.request` awaits. One handle per participant: a handle already in a room cannot join
another ("Already in a room"). Janus sends a plain-RTP participant nothing before it receives one packet
from it, and `connect()`s its socket to the ip:port given in `join`: send from exactly that port.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.adapters.janus import JanusHandle, Json

PLUGIN = "janus.plugin.audiobridge"
CODECS = ("pcmu", "pcma", "opus")


@dataclass(frozen=True)
class RtpEndpoint:
    """Where a plain-RTP participant receives (in `join`), or where Janus receives it (in `joined`)."""

    ip: str
    port: int
    payload_type: int


@dataclass(frozen=True)
class RtpParticipant:
    """The answer to `join_rtp`: our participant id and the Janus socket to send our RTP to."""

    id: str
    room: str
    janus: RtpEndpoint
    participants: list[Json] = field(default_factory=list)  # the others already in the room


async def create_room(handle: JanusHandle, room: str, admin_key: str, secret: str, *, sampling_rate: int = 16000,
                      allow_rtp_participants: bool = True, prebuffer: int | None = None,
                      audiolevel_event: bool = False, description: str = "", pin: str = "",
                      allowed: list[str] | None = None, record_file: str = "", **extra: Any) -> Json:
    """Create room `room` (not permanent, not listed). `secret` guards destroy/mute/kick; `allowed` tokens,
    when given, are required to join. `record_file` records the mix (16 kHz mono WAV)."""
    body: Json = {"request": "create", "room": room, "admin_key": admin_key, "secret": secret, "is_private": True,
                  "permanent": False, "sampling_rate": sampling_rate, "allow_rtp_participants": allow_rtp_participants,
                  "audiolevel_event": audiolevel_event, **extra}
    if prebuffer is not None:
        body["default_prebuffering"] = prebuffer
    if description:
        body["description"] = description
    if pin:
        body["pin"] = pin
    if allowed is not None:
        body["allowed"] = allowed
    if record_file:
        body.update(record=True, record_file=record_file)
    return await handle.request(body)


async def destroy_room(handle: JanusHandle, room: str, secret: str) -> Json:
    return await handle.request({"request": "destroy", "room": room, "secret": secret, "permanent": False})


async def enable_recording(handle: JanusHandle, room: str, secret: str, record: bool, record_file: str = "",
                           record_dir: str = "") -> Json:
    """Start (`record_file` in `record_dir`, 16-bit WAV of the mix at the room's rate, mono) or stop recording the
    room's mix; Janus writes the header's sizes when it closes the file."""
    body: Json = {"request": "enable_recording", "room": room, "secret": secret, "record": record}
    if record_file:
        body["record_file"] = record_file
    if record_dir:
        body["record_dir"] = record_dir
    return await handle.request(body)


async def exists(handle: JanusHandle, room: str) -> bool:
    return bool((await handle.request({"request": "exists", "room": room})).get("exists"))


async def join_rtp(handle: JanusHandle, room: str, display: str, codec: str, rtp: RtpEndpoint, *,
                   token: str | None = None, pin: str | None = None, muted: bool = False,
                   prebuffer: int | None = None, participant_id: str | None = None,
                   timeout: float | None = None) -> RtpParticipant:
    """Join `room` as a plain-RTP participant receiving at `rtp` (a G.711 codec ignores its payload type)."""
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {', '.join(CODECS)}, not {codec!r}")
    body: Json = {"request": "join", "room": room, "display": display, "codec": codec, "muted": muted,
                  "rtp": {"ip": rtp.ip, "port": rtp.port, "payload_type": rtp.payload_type}}
    for key, value in (("token", token), ("pin", pin), ("prebuffer", prebuffer), ("id", participant_id)):
        if value is not None:
            body[key] = value
    data = await handle.request(body, timeout=timeout)
    theirs = data.get("rtp")
    if data.get("audiobridge") != "joined" or not isinstance(theirs, dict):
        raise ValueError(f"join: unexpected answer {data.get('audiobridge')!r} without rtp")
    return RtpParticipant(id=str(data["id"]), room=str(data.get("room", room)),
                          janus=RtpEndpoint(str(theirs["ip"]), int(theirs["port"]), int(theirs["payload_type"])),
                          participants=list(data.get("participants") or []))


async def leave(handle: JanusHandle) -> Json:
    return await handle.request({"request": "leave"})


async def configure(handle: JanusHandle, **settings: Any) -> Json:
    """Change this handle's own participation (muted, display, prebuffer, volume...)."""
    return await handle.request({"request": "configure", **settings})


async def mute(handle: JanusHandle, room: str, secret: str, participant_id: str) -> Json:
    return await handle.request({"request": "mute", "room": room, "secret": secret, "id": participant_id})


async def unmute(handle: JanusHandle, room: str, secret: str, participant_id: str) -> Json:
    return await handle.request({"request": "unmute", "room": room, "secret": secret, "id": participant_id})


async def kick(handle: JanusHandle, room: str, secret: str, participant_id: str) -> Json:
    return await handle.request({"request": "kick", "room": room, "secret": secret, "id": participant_id})


async def list_participants(handle: JanusHandle, room: str) -> list[Json]:
    data = await handle.request({"request": "listparticipants", "room": room})
    return list(data.get("participants") or [])
