"""Room recordings: the room's mix as the AudioBridge hears it (every phone and browser), recorded by Janus itself
(`enable_recording`: 16 kHz mono WAV) into the project's recordings folder, then published like a call's recording
(`store.recordings`: ID.wav or ID.opus and ID.json) so the Voice API lists, serves and deletes both alike.

Started and stopped through the Video API (`POST`/`DELETE /video/v1/rooms/{room_id}/recording`) or by a moderator
on the page (`record {on}`); every page shows that the room is being recorded (`state.recording`). A room records
only while it is live (someone in it); it stops when the room empties, is deleted or loses its media server. The
file is written by the Janus this gateway runs, on this host: with operator-run Janus servers (`[janus] urls`) the
file would land on their disks, so room recording is refused there.

When it ends, the file is published once Janus has closed it (its header's sizes match the file); a file Janus
never closed (Janus died) is repaired from its length. `recording_ready` / `recording_failed` go to the project's
notification_url through this process's own webhook outbox (the CDR store's, worker "rooms"), signed with the
project's webhook secret. At start, recordings a previous run left open are repaired and announced.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ... import log
from ...adapters import janus_audiobridge as audiobridge
from ...adapters.janus import JanusError
from ...api.recordings import file_url
from ...api.webhooks import Notifier, timestamp
from ...config import Config
from ...store.cdr import CdrStore
from ...store.projects import ProjectStore
from ...store.recordings import RecordingStore
from .janus_rooms import SAMPLING_RATE, JanusPool, room_secret
from .room import Room

logger = logging.getLogger("gateway.rooms")
WORKER = "rooms"  # whose recordings these are in the store (and whose webhook outbox)


class RecordingError(Exception):
    def __init__(self, code: str, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class RoomRecorder:
    def __init__(self, config: Config, projects: ProjectStore) -> None:
        self.config = config
        self.projects = projects
        self.store = RecordingStore(config.data_dir, WORKER, fmt=config.recordings.format)
        self.cdr = CdrStore(config.data_dir, worker=WORKER)
        self.notifier = Notifier(self.cdr, config.webhooks, self._webhook_key)
        self.local = not config.janus.urls  # the managed Janus writes on this host
        self.tasks: set[asyncio.Task[None]] = set()

    def _webhook_key(self, project: str) -> str | None:
        found = self.projects.by_name(project)
        return found.webhook_secret if found is not None else None

    async def start_service(self, pool: JanusPool) -> None:
        """Deliver what the outbox holds; repair and announce the recordings a previous run left open, after asking
        Janus to close them (it may still be writing: a room outlives a room service that died)."""
        self.notifier.start()
        stale = await asyncio.to_thread(self.store.open_recordings)
        for meta in stale:
            for server in pool.servers:
                try:
                    await pool.connect(server)
                    if server.audiobridge is not None:
                        await audiobridge.enable_recording(server.audiobridge, str(meta.get("room_id")),
                                                           room_secret(pool.secrets, str(meta.get("room_id"))), False)
                except JanusError as exc:  # no such room (Janus restarted: the file is closed), or no server
                    log.event(logger, "room.recording_stale", logging.DEBUG, recording_id=meta["id"], error=str(exc)[:200])
        if stale:
            for meta in await asyncio.to_thread(self.store.repair):
                self._announce(meta)

    async def start(self, room: Room, project: str, by: str) -> dict[str, Any]:
        """Record the room's mix; RecordingError when it cannot be (not live, already, an external Janus)."""
        if not self.local:
            raise RecordingError("not_supported", "room recording needs the Janus this gateway runs: the files of "
                                 "[janus] urls servers would be written on their hosts")
        if room.media is None or room.media.server.audiobridge is None:
            raise RecordingError("room_not_live", "nobody is in the room: a room records while it is live")
        if room.recording is not None:
            raise RecordingError("already_recording", "the room is being recorded already")
        meta, folder = await asyncio.to_thread(self.store.begin_external, project, 1, SAMPLING_RATE,
                                               room_id=room.id, channel_layout=["room"], started_by=by)
        room.recording = meta
        try:
            await audiobridge.enable_recording(room.media.server.audiobridge, room.id, room.media.secret, True,
                                               f"{meta['id']}.part.wav", str(folder.resolve()))
        except JanusError as exc:
            room.recording = None
            failed = await asyncio.to_thread(self.store.finish_external, meta, "janus_refused", 0.0)
            self._announce(failed)
            raise RecordingError("media_server_error", f"the media server refused to record: {exc}", 502) from exc
        log.event(logger, "room.recording_started", room_id=room.id, recording_id=meta["id"], project=project, by=by)
        room.broadcast()
        return meta

    async def stop(self, room: Room, reason: str) -> dict[str, Any] | None:
        """Stop recording (if it is): Janus closes the file; publishing and the webhook follow in the background."""
        meta, room.recording = room.recording, None
        if meta is None:
            return None
        media = room.media
        if media is not None and media.server.audiobridge is not None:
            try:
                await audiobridge.enable_recording(media.server.audiobridge, room.id, media.secret, False)
            except JanusError as exc:  # the room or its server is going: Janus closes the file with the room
                log.event(logger, "room.recording_stop_refused", logging.DEBUG, room_id=room.id, error=str(exc)[:200])
        log.event(logger, "room.recording_stopped", room_id=room.id, recording_id=meta["id"], reason=reason)
        room.broadcast()
        task = asyncio.get_running_loop().create_task(self._finish(meta, reason))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return meta

    async def _finish(self, meta: dict[str, Any], reason: str) -> None:
        final = await asyncio.to_thread(self.store.finish_external, meta, reason)
        self._announce(final)

    def _announce(self, meta: dict[str, Any]) -> None:
        project = self.projects.by_name(str(meta.get("project", "")))
        if project is None or not project.notification_url:
            return
        state = "recording_ready" if meta["state"] in ("ready", "repaired") else "recording_failed"
        facts: dict[str, Any] = {k: meta[k] for k in ("duration_s", "size", "sha256", "error") if k in meta}
        payload: dict[str, Any] = {"state": state, "room_id": meta.get("room_id"), "voice_id": None,
                                   "recording_id": meta["id"], "timestamp": timestamp(), **facts}
        if meta["state"] == "repaired":
            payload["repaired"] = True
        if state == "recording_ready":
            payload["url"] = file_url(meta["id"])
        self.notifier.emit(project.notification_url, project.name, f"room:{meta.get('room_id')}", payload)

    async def close(self) -> None:
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.notifier.close()
        self.store.close()
        self.cdr.close()
