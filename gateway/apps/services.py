"""What the dial-in and in-room flows share: the services a worker hands them, the interfaces of the room side
they call (implemented in `gateway.rooms`, which sits above the applications), and `Voice`, the call as a flow
sees it (its audio, prompts in the project's voice, the API's steering).

`Limiter`: guessing limits (implemented in `apps.limits`). `Directory`: `exists(meeting_id, project)` and
`resolve(meeting_id, pin, project) -> (room_id, role)`; `RoomConnector.join` puts a call's leg into a room. Both
raise their error (`DirectoryUnavailable`, `RoomError`) when they cannot.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..calls.audio import CallAudio
from ..calls.call import Call
from ..calls.control import Steering
from ..config import Config, DidConfig, ProjectConfig
from ..store.projects import ProjectStore
from ..store.rooms import RoomStore
from .prompts import ProjectVoices, PromptError, PromptLibrary


class DirectoryUnavailable(RuntimeError):
    pass


class Directory(Protocol):
    """Meeting IDs resolve within `project` (the dialled DID's); None: any project (a shared dial-in number)."""

    async def exists(self, meeting_id: str, project: str | None = None) -> bool: ...

    async def resolve(self, meeting_id: str, pin: str, project: str | None = None) -> tuple[str, str] | None:
        """(room_id, role) with role "moderator" for the mpin, "participant" for the pin; None if wrong."""
        ...


@dataclass(frozen=True)
class Origin:
    """Who is guessing, as the limits count it: the source address the network saw ("" for a trunk that vouches
    for its caller numbers) and the caller number within its trunk (chosen by the caller)."""

    source: str
    caller: str


def call_origin(call: Call, config: Config) -> Origin:
    """A call's `Origin`. Behind a balancer in `cluster.lb_sources` the source is its X-Gateway-Source header
    (as `UserAgent.peer` reads it)."""
    host = call.source.host
    forwarded = call.invite.headers.get("x-gateway-source") if host in config.cluster.lb_sources else None
    trunk = next((t for t in config.trunks if t.name == call.info.get("trunk")), None)
    source = "" if trunk is not None and trunk.trust_id_inbound else (forwarded.strip() if forwarded else host)
    caller = str(call.info.get("caller", ""))[:64]
    return Origin(source, f"{call.info.get('trunk', '')}/{caller}")


@dataclass(frozen=True)
class Attempt:
    """One attempt at a step ("meeting_id" or "pin"), counted as a failure from the moment it is reserved (so calls
    at the same time cannot overrun a limit) until `Limiter.release` gives it back."""

    step: str
    token: str = ""
    keys: tuple[str, ...] = ()  # the counters it was added to
    blocked: str = ""  # "source" or "caller": refused, nothing counted
    delay: float = 0.0  # seconds to wait before checking: the meeting's budget is spent


class Limiter(Protocol):
    async def reserve(self, step: str, origin: Origin, meeting_id: str = "") -> Attempt:
        """Count an attempt before the caller's digits are checked, or refuse it (`Attempt.blocked`)."""
        ...

    async def release(self, attempt: Attempt) -> None:
        """The attempt succeeded, or was never checked: it no longer counts."""
        ...


class RoomError(RuntimeError):
    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code  # e.g. "room_locked"


# the keypad menu's actions (config.MenuConfig's fields); a leg says which of them it can carry out
MENU_ACTIONS = frozenset({"mute_self", "help", "count", "mute_all", "lock", "unmute_all"})


@dataclass(frozen=True)
class JoinContext:
    """What a connector may want to know of the call it puts into a room besides the room: the call itself (a
    connector that relays its media and DTMF itself, `rooms.sip_forward`), the meeting ID the caller typed."""

    call: Call
    meeting_id: str = ""


class RoomLeg(Protocol):
    room_id: str
    participant_id: str
    state: dict[str, Any]
    actions: frozenset[str]  # the menu actions it can carry out (MENU_ACTIONS for a room service)

    def push(self, frame: bytes | None) -> None:
        """The caller's payload of this 20 ms tick (None: nothing arrived), in the call's codec."""

    def pull(self) -> bytes | None:
        """One payload of the room's audio for the caller, or None (nothing to play yet)."""

    def stats(self) -> dict[str, int]: ...

    async def command(self, message: dict[str, Any]) -> None: ...

    async def leave(self) -> None: ...


class RoomConnector(Protocol):
    async def join(self, room_id: str, role: str, name: str, on_event: Callable[[dict[str, Any]], None],
                   codec: str = "PCMU", context: JoinContext | None = None) -> RoomLeg: ...


class MissingPool:
    """The connector of a forward pool that is not configured (a stored project naming one): every join fails."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def join(self, room_id: str, role: str, name: str, on_event: Callable[[dict[str, Any]], None],
                   codec: str = "PCMU", context: JoinContext | None = None) -> RoomLeg:
        raise RoomError(f"no forward pool named {self.name!r}", "forward_failed")


def masked_number(number: str, keep: int) -> str:
    digits = "".join(c for c in number if c.isdigit()) or number
    if keep <= 0:
        return "Phone"
    return "Phone " + "•" * max(0, len(digits) - keep) + digits[-keep:]


@dataclass
class IvrServices:
    config: Config
    prompts: PromptLibrary
    directory: Directory
    limiter: Limiter
    rooms: RoomStore | None = None
    connector: RoomConnector | None = None
    projects: ProjectStore | None = None
    voices: ProjectVoices | None = None  # what each stored project sounds like (set by the project API)
    forwarders: dict[str, RoomConnector] = field(default_factory=dict)  # forward pool name -> its connector

    def connector_for(self, did: DidConfig | None, project: ProjectConfig) -> RoomConnector | None:
        """Where this call's rooms are: the DID's connector choice, else its project's forward pool, else Janus."""
        if did is not None and did.connector == "janus":
            return self.connector
        pool = (did.forward_pool if did is not None else "") or project.forward_pool
        if pool:
            return self.forwarders.get(pool) or MissingPool(pool)
        return self.connector


class Voice:
    """A call as the flows drive it: its audio (digits, prompts, hold), the project's voice, the API's steering."""

    def __init__(self, call: Call, services: IvrServices, project: ProjectConfig, did: DidConfig | None = None) -> None:
        self.call = call
        self.s = services
        self.did = did
        self.project = project
        self.steer: Steering = call.control if call.control is not None else Steering()
        call.control = self.steer
        assert call.media is not None
        trunk = next(t for t in services.config.trunks if t.name == call.info["trunk"])
        self.audio = CallAudio(call.media, trunk.dtmf, call.voice_id)
        call.audio = self.audio
        self.caller = str(call.info["caller"])

    async def say(self, key: str, interruptible: bool = True, **values: Any) -> bool:
        text = self.project.welcome_text if key == "welcome" and self.project.welcome_text else None
        audio = await self.s.prompts.encoded(self.audio.codec, key, self.project.language, self.project.voice_type,
                                             text, **values)
        self.call._check_alive()
        return await self.audio.play(audio, interruptible)

    async def ask(self, key: str) -> str | None:
        cfg = self.s.config.ivr
        await self.say(key)
        return await self.audio.collect(cfg.max_digits, "#", cfg.first_digit_timeout_ms / 1000,
                                        cfg.inter_digit_timeout_ms / 1000)

    async def goodbye(self, key: str, reason: str, **cdr: Any) -> None:
        self.audio.clear_digits()
        await self.say(key, interruptible=False)
        self.call.hangup(reason, **cdr)


def project_settings(services: IvrServices, name: str) -> ProjectConfig:
    configured = next((p for p in services.config.projects if p.name == name), None)
    if configured is not None:
        return configured
    stored = services.projects.by_name(name) if services.projects is not None else None
    if stored is None:
        return ProjectConfig(name=name)
    settings = stored.settings()
    if services.voices is not None:  # a voice still rendering: the previous one until it is ready
        language, voice_type, welcome = services.voices.choose(name, (settings.language, settings.voice_type,
                                                                      settings.welcome_text))
        settings = dataclasses.replace(settings, language=language, voice_type=voice_type, welcome_text=welcome)
    return settings


async def guarded(call: Call, flow: Awaitable[None]) -> None:
    """Run a call's flow; missing prompts end the call with their reason; an order still waiting hears why."""
    try:
        await flow
    except PromptError as exc:
        call.record("prompts_unavailable", logging.ERROR, error=str(exc))
        call.hangup("prompts_unavailable", error=str(exc))
    finally:
        if call.control is not None:
            call.control.abandon(call.end_reason or "call ended")
