"""Call recordings through the Voice API (issue 14): `auto_record`, start and stop on a live call, list, fetch
(Range requests), delete; `recording_ready` / `recording_failed` webhooks and CDR events.

    POST   /voice/v1/call/{voice_id}/recording     start recording a live, answered call of the project
    DELETE /voice/v1/call/{voice_id}/recording     stop it (the file is finalised; the webhook follows)
    GET    /voice/v1/recordings[?voice_id=]        the project's recordings, newest first
    GET    /voice/v1/recordings/{recording_id}     one recording's metadata
    GET    /voice/v1/recordings/{recording_id}/file   the WAV (audio/wav; Range requests)
    DELETE /voice/v1/recordings/{recording_id}     delete a finished recording

Start and stop are forwarded to the worker holding the call (like every call route); the files sit in the
shared data directory, so any worker lists and serves them. Another project's recording is 404, as if it did
not exist.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from .. import log
from ..apps.prompts import PromptError
from ..apps.services import project_settings
from ..calls.call import Call
from ..store.recordings import FINISHED, FORMATS, Recording, RecordingStore
from .voice import PROJECT, ApiError, VoiceApi
from .webhooks import Notifier, timestamp

logger = logging.getLogger("gateway.recordings")


def file_url(recording_id: str) -> str:
    return f"/voice/v1/recordings/{recording_id}/file"


class Recordings:
    def __init__(self, api: VoiceApi, store: RecordingStore, notifier: Notifier) -> None:
        self.api = api
        self.store = store
        self.notifier = notifier
        self.active: dict[str, Recording] = {}  # voice_id -> its recording in progress
        self._notices: set[asyncio.Task[None]] = set()

    # -- calls
    def on_call_event(self, call: Call, state: str, data: dict[str, Any]) -> None:
        if state == "answered" and call.direction == "inbound" and call.voice_id not in self.active:
            project = self.api.projects.by_name(str(call.info.get("project", "")))
            if project is not None and project.auto_record:
                self.start(call, "auto_record")
        elif state == "disconnected":
            self.stop(call.voice_id, "call_ended")

    def start(self, call: Call, source: str) -> Recording:
        assert call.media is not None
        project = str(call.info.get("project", ""))
        url = str(call.info.get("event_url") or "")
        room = call.control.room_id if call.control is not None else None
        media = call.media
        recording = self.store.start(project, call.voice_id, lambda: media.params.codec,
                                     lambda meta: self._done(meta, url), room_id=room or call.info.get("room_id"))
        call.media.tap = recording.frame
        self.active[call.voice_id] = recording
        self.api.ua.cdr.event(call.voice_id, "recording_started", recording_id=recording.id, source=source)
        if self.api.config.recordings.notice:
            task = asyncio.get_running_loop().create_task(self._notice(call, recording))
            self._notices.add(task)
            task.add_done_callback(self._notices.discard)
        return recording

    async def _notice(self, call: Call, recording: Recording) -> None:
        """"This call is being recorded", in the project's voice, ahead of whatever the caller hears (a prompt is
        paused, not cut); a CDR event says it was played (or why not)."""
        services = self.api.services
        settings = project_settings(services, str(call.info.get("project", "")))
        try:
            audio = await services.prompts.encoded(call.media.params.codec if call.media else "PCMU",
                                                   "recording_notice", settings.language, settings.voice_type)
        except PromptError as exc:
            self.api.ua.cdr.event(call.voice_id, "recording_notice_failed", recording_id=recording.id, error=str(exc))
            return
        if call.ended.is_set() or call.audio is None:
            return
        call.audio.announce(audio)
        self.api.ua.cdr.event(call.voice_id, "recording_notice", recording_id=recording.id)

    def stop(self, voice_id: str, reason: str) -> Recording | None:
        recording = self.active.pop(voice_id, None)
        if recording is None:
            return None
        self._untap(voice_id)
        recording.stop(reason)
        self.api.ua.cdr.event(voice_id, "recording_stopped", recording_id=recording.id, reason=reason,
                              duration_s=round(recording.frames * 0.02, 2))
        return recording

    def _done(self, meta: dict[str, Any], event_url: str = "") -> None:
        """On the event loop, once the writer thread finalised (or gave up on) a recording."""
        state = "recording_ready" if meta["state"] in FINISHED else "recording_failed"
        current = self.active.get(meta["voice_id"])
        if current is not None and current.id == meta["id"]:  # failed while the call goes on: let it go
            self.active.pop(meta["voice_id"])
            self._untap(meta["voice_id"])
        facts: dict[str, Any] = {k: meta[k] for k in ("duration_s", "size", "sha256", "error") if k in meta}
        self.api.ua.cdr.event(meta["voice_id"], state, recording_id=meta["id"], **facts)
        project = self.api.projects.by_name(meta["project"])
        url = event_url or (project.notification_url if project is not None else "")
        if url and project is not None:
            self.notifier.emit(url, project.name, meta["voice_id"], {
                "state": state, "voice_id": meta["voice_id"], "room_id": meta.get("room_id"),
                "recording_id": meta["id"], "timestamp": timestamp(), **facts,
                **({"repaired": True} if meta["state"] == "repaired" else {}),
                **({"url": file_url(meta["id"])} if state == "recording_ready" else {})})

    def _untap(self, voice_id: str) -> None:
        """The call's media clock stops feeding the recording (the call may have gone already)."""
        call = self.api.ua.calls.get(voice_id)
        if call is not None and call.media is not None:
            call.media.tap = None

    async def repair(self) -> None:
        """At start: this worker's recordings cut short by a crash, repaired (in a thread: it reads and hashes
        files) and announced like finished ones."""
        for meta in await asyncio.to_thread(self.store.repair):
            self._done(meta)

    # -- routes
    def routes(self, app: web.Application) -> None:
        app.router.add_post("/voice/v1/call/{voice_id}/recording", self.start_route)
        app.router.add_delete("/voice/v1/call/{voice_id}/recording", self.stop_route)
        app.router.add_get("/voice/v1/recordings", self.list_route)
        app.router.add_get("/voice/v1/recordings/{recording_id}", self.get_route)
        app.router.add_get("/voice/v1/recordings/{recording_id}/file", self.file_route)
        app.router.add_delete("/voice/v1/recordings/{recording_id}", self.delete_route)

    async def start_route(self, request: web.Request) -> web.Response:
        if (forwarded := await self.api._forward(request)) is not None:
            return forwarded
        call = self.api._call(request.match_info["voice_id"], request[PROJECT])
        if not call.answered.is_set() or call.media is None:
            raise ApiError(409, "call_not_answered", "a call is recorded once it is answered", "voice_id")
        if call.voice_id in self.active:
            raise ApiError(409, "already_recording", "this call is being recorded already", "voice_id")
        recording = self.start(call, "api")
        log.event(logger, "recording.requested", voice_id=call.voice_id, recording_id=recording.id)
        return web.json_response({"state": "recording", "voice_id": call.voice_id, "recording_id": recording.id,
                                  "timestamp": timestamp()})

    async def stop_route(self, request: web.Request) -> web.Response:
        if (forwarded := await self.api._forward(request)) is not None:
            return forwarded
        call = self.api._call(request.match_info["voice_id"], request[PROJECT])
        recording = self.stop(call.voice_id, "api")
        if recording is None:
            raise ApiError(409, "not_recording", "this call is not being recorded", "voice_id")
        return web.json_response({"state": "stopped", "voice_id": call.voice_id, "recording_id": recording.id,
                                  "timestamp": timestamp()})

    def _meta(self, request: web.Request) -> dict[str, Any]:
        meta = self.store.get(request[PROJECT].name, request.match_info["recording_id"])
        if meta is None:
            raise ApiError(404, "recording_not_found", "no recording with this id in this project", "recording_id")
        return meta

    @staticmethod
    def public(meta: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in meta.items() if k not in ("worker", "project")}
        if meta["state"] in FINISHED:
            out["url"] = file_url(meta["id"])
        return out

    async def list_route(self, request: web.Request) -> web.Response:
        voice_id, room_id = request.query.get("voice_id") or None, request.query.get("room_id") or None
        found = self.store.list(request[PROJECT].name, voice_id[:64] if voice_id else None,
                                room_id=room_id[:64] if room_id else None)
        return web.json_response({"recordings": [self.public(m) for m in found]})

    async def get_route(self, request: web.Request) -> web.Response:
        return web.json_response(self.public(self._meta(request)))

    async def file_route(self, request: web.Request) -> web.StreamResponse:
        meta = self._meta(request)
        path = self.store.file(request[PROJECT].name, meta["id"])
        if path is None:
            raise ApiError(409, "recording_not_ready", f"the recording is {meta['state']}", "recording_id")
        return web.FileResponse(path, headers={"Content-Type": FORMATS.get(path.suffix[1:], "application/octet-stream"),
                                               "Content-Disposition": f'attachment; filename="{path.name}"'})

    async def delete_route(self, request: web.Request) -> web.Response:
        meta = self._meta(request)
        if not self.store.delete(request[PROJECT].name, meta["id"]):
            raise ApiError(409, "recording_in_progress", "stop the recording first", "recording_id")
        log.event(logger, "recording.deleted", voice_id=meta["voice_id"], recording_id=meta["id"])
        return web.json_response({"deleted": True, "recording_id": meta["id"]})
