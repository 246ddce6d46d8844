"""Call recordings on disk: two-channel WAV, written by a thread of their own, crash-safe (issue 14).

Layout: DATA_DIR/recordings/PROJECT/ID.wav and ID.json (what the API lists: voice_id, state, duration, size,
SHA-256...). While a call records, its file is ID.part.wav and its metadata says "recording" and which worker
writes it.

The event loop never touches the disk: each media-clock tick hands the recording two G.711 frames (what the caller
sent, what the caller heard: `Recording.frame`), gathered in memory and queued to the writer thread about once a
second. The thread decodes them (PCM16, caller left, heard right) and appends them with the standard library's
`wave`, which rewrites the header's sizes after every append: a file cut short by a crash or kill -9 is at most
one append off, and `repair` (run by the worker at start for its own files) fixes the header from the file's
length and publishes it as "repaired". A write that fails (disk full, read-only, I/O error) stops that recording
only: its partial file goes, its metadata says "failed" and why; the call goes on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import queue
import re
import struct
import threading
import time
import uuid
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import log
from ..media import g711

logger = logging.getLogger("gateway.recordings")
RATE = 8000
FRAME = 160
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
RECORDING_ID = re.compile(r"[0-9a-f]{32}")
HEADER = 44  # the stdlib writer's RIFF/fmt/data header for PCM
FINISHED = ("ready", "repaired")  # the states whose file is whole and served
Done = Callable[[dict[str, Any]], None]  # called on the event loop with the final metadata (ready or failed)


def wav_header(data: int) -> bytes:
    """The 44-byte header of a PCM16 stereo 8 kHz WAV holding `data` bytes (what the stdlib writer writes)."""
    return (b"RIFF" + struct.pack("<I", 36 + data) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 2, RATE, RATE * 4, 4, 16)
            + b"data" + struct.pack("<I", data))


def _private(path: Path) -> Any:
    """A new file only its owner reads (recordings are people's voices)."""
    return os.fdopen(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600), "wb")


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    with _private(tmp) as f:
        f.write(json.dumps(data).encode())
    os.replace(tmp, path)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Recording:
    """One call's recording, fed from the event loop; the writer thread does the rest."""

    def __init__(self, store: RecordingStore, meta: dict[str, Any], codec: Callable[[], str], on_done: Done) -> None:
        """`codec()`: the call's codec now (a re-INVITE may switch PCMU and PCMA: each batch is decoded as sent)."""
        self.store = store
        self.meta = meta
        self.id: str = meta["id"]
        self.codec_of = codec
        self.codec = codec()
        self.announced = False  # on_done was scheduled (once: ready, or failed)
        self.on_done = on_done
        self.silence = bytes([g711.SILENCE[self.codec]]) * FRAME
        self.frames = 0
        self.failed = False  # set by the writer thread; then frames are dropped at once
        self.stopped = False
        self._pending: list[bytes] = []  # caller and heard frames, alternating
        self._batch = max(1, store.flush_s * 50)
        self._wav: wave.Wave_write | None = None
        self._file: Any = None  # the file under _wav (wave leaves a file it did not open to its owner)

    def frame(self, caller: bytes | None, heard: bytes | None) -> None:
        """One 20 ms tick: what the caller sent (None: nothing arrived) and what it heard (None: nothing sent)."""
        if self.stopped or self.failed:
            return
        if self.codec_of() != self.codec:  # the call switched codec: what was gathered goes as it came
            self._submit()
            self.codec = self.codec_of()
            self.silence = bytes([g711.SILENCE[self.codec]]) * FRAME
        self._pending.append(caller if caller is not None and len(caller) == FRAME else self.silence)
        self._pending.append(heard if heard is not None and len(heard) == FRAME else self.silence)
        self.frames += 1
        if len(self._pending) >= 2 * self._batch:
            self._submit()

    def _submit(self) -> None:
        if self._pending:
            self.store.submit(("write", self, self._pending, self.codec))
            self._pending = []

    def stop(self, reason: str) -> None:
        """Stop recording (the call ended, or the API said so): the rest is written and the file finalised."""
        if self.stopped:
            return
        self.stopped = True
        self._submit()
        self.store.submit(("close", self, reason))


class RecordingStore:
    def __init__(self, data_dir: Path | str, worker: str = "w1", flush_s: int = 1,
                 notify: Callable[[Callable[[], None]], None] | None = None) -> None:
        """`notify(fn)`: how the writer thread gets `fn` run on the event loop (loop.call_soon_threadsafe)."""
        self.root = Path(data_dir) / "recordings"
        self.worker = worker
        self.flush_s = flush_s
        self.notify = notify or (lambda fn: fn())
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._writer, name="recordings-writer", daemon=True)
        self._thread.start()

    # -- paths
    def folder(self, project: str) -> Path:
        name = project if SAFE_NAME.fullmatch(project) else "x-" + hashlib.sha256(project.encode()).hexdigest()[:16]
        return self.root / name

    def _paths(self, project: str, rid: str) -> tuple[Path, Path, Path]:
        folder = self.folder(project)
        return folder / f"{rid}.part.wav", folder / f"{rid}.wav", folder / f"{rid}.json"

    # -- the event loop's side
    def start(self, project: str, voice_id: str, codec: Callable[[], str], on_done: Done, **extra: Any) -> Recording:
        meta = {"id": uuid.uuid4().hex, "project": project, "voice_id": voice_id, "state": "recording",
                "format": "wav", "channels": 2, "rate": RATE, "channel_layout": ["caller", "heard"],
                "started_at": time.time(), "worker": self.worker, **extra}
        recording = Recording(self, meta, codec, on_done)
        self.submit(("open", recording))
        return recording

    def submit(self, item: tuple[Any, ...]) -> None:
        self._queue.put(item)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(30)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until the writer has done everything queued so far (tests, shutdown)."""
        done = threading.Event()
        self._queue.put(("barrier", done))
        done.wait(timeout)

    # -- the writer thread
    def _writer(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, target = item[0], item[1]
            if kind == "barrier":
                target.set()
                continue
            rec: Recording = target
            try:
                if kind == "open":
                    self._open(rec)
                elif kind == "write" and not rec.failed:
                    self._append(rec, item[2], item[3])
                elif kind == "close" and not rec.failed:
                    self._finish(rec, item[2])
                else:
                    continue
            except Exception as exc:  # noqa: BLE001 - a recording's failure never reaches the call or the thread
                self._fail(rec, exc)
            if not rec.announced and (kind == "close" or rec.failed):  # once: ready, or failed
                rec.announced = True
                meta = rec.meta
                try:  # the loop may be gone (shutdown): the metadata on disk says it all the same
                    self.notify(functools.partial(rec.on_done, meta))
                except Exception:  # noqa: BLE001
                    logger.debug("recording.notify_failed", exc_info=True)

    def _open(self, rec: Recording) -> None:
        part, _, meta_path = self._paths(rec.meta["project"], rec.id)
        for folder in (self.root, part.parent):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_json(meta_path, rec.meta)
        rec._file = _private(part)
        wav = wave.open(rec._file, "wb")
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(RATE)
        wav.writeframes(b"")  # the header now, so even an empty recording is a valid file ...
        rec._file.flush()  # ... on disk, not in a buffer
        rec._wav = wav
        log.event(logger, "recording.started", voice_id=rec.meta["voice_id"], recording_id=rec.id,
                  project=rec.meta["project"])

    def _append(self, rec: Recording, frames: list[bytes], codec: str) -> None:
        assert rec._wav is not None
        # frames alternate caller, heard: the bytes go (tick, channel, sample) -> (tick, sample, channel), then one
        # table lookup decodes them into interleaved PCM16 (about 0.1 ms of CPU per call-second)
        raw = np.frombuffer(b"".join(frames), dtype=np.uint8).reshape(-1, 2, FRAME).transpose(0, 2, 1)
        pcm = np.take(g711.ULAW_DECODE if codec == "PCMU" else g711.ALAW_DECODE, raw)
        rec._wav.writeframes(pcm.astype("<i2", copy=False).tobytes())  # and the header: a crash loses at most this

    def _finish(self, rec: Recording, reason: str) -> None:
        assert rec._wav is not None
        rec._wav.close()  # the header's final sizes
        rec._file.close()
        rec._wav = rec._file = None
        part, final, meta_path = self._paths(rec.meta["project"], rec.id)
        facts = self._facts(part)  # before the rename: a crash after it finds the file whole (`repair`)
        os.replace(part, final)
        meta = {**rec.meta, "state": "ready", "ended_at": time.time(), "stop_reason": reason, **facts}
        rec.meta = meta
        _write_json(meta_path, meta)
        log.event(logger, "recording.ready", voice_id=meta["voice_id"], recording_id=rec.id,
                  duration_s=meta["duration_s"], size=meta["size"])

    def _fail(self, rec: Recording, exc: Exception) -> None:
        rec.failed = True
        for closing in (rec._wav, rec._file):
            try:
                if closing is not None:
                    closing.close()
            except Exception:  # noqa: BLE001 - the disk that failed may fail the close too
                pass
        rec._wav = rec._file = None
        part, final, meta_path = self._paths(rec.meta["project"], rec.id)
        part.unlink(missing_ok=True)
        final.unlink(missing_ok=True)  # failed after the rename (the metadata's write): no file without its facts
        meta = {**rec.meta, "state": "failed", "ended_at": time.time(), "error": f"{type(exc).__name__}: {exc}"}
        try:
            _write_json(meta_path, meta)
        except OSError:
            pass  # the listing will not show it; the webhook and the CDR still say it
        rec.meta = meta
        log.event(logger, "recording.failed", logging.ERROR, voice_id=meta["voice_id"], recording_id=rec.id,
                  error=meta["error"])

    @staticmethod
    def _facts(path: Path) -> dict[str, Any]:
        size = path.stat().st_size
        return {"size": size, "duration_s": round(max(0, size - HEADER) / (RATE * 4), 2), "sha256": _sha256(path)}

    # -- after a crash
    def repair(self) -> list[dict[str, Any]]:
        """This worker's recordings left open by a crash: the header rewritten from the file's length (whole frames
        only), the file published; their metadata (state "repaired") returned for the caller to report. A file that
        cannot be repaired is skipped (logged), never a reason not to start."""
        repaired = []
        for meta_path in sorted(self.root.glob("*/*.json")):
            try:
                meta = json.loads(meta_path.read_text())
                if meta.get("state") != "recording" or meta.get("worker") != self.worker:
                    continue
                fixed = self._repair_one(meta, meta_path)
            except Exception as exc:  # noqa: BLE001 - an unreadable disk or a strange file: left as it is, said
                log.event(logger, "recording.repair_failed", logging.ERROR, path=str(meta_path), error=str(exc))
                continue
            if fixed is not None:
                repaired.append(fixed)
        return repaired

    def _repair_one(self, meta: dict[str, Any], meta_path: Path) -> dict[str, Any] | None:
        part, final, _ = self._paths(meta["project"], meta["id"])
        if not part.exists():
            if final.exists():  # finished, then cut before its metadata was written: whole already
                meta = {**meta, "state": "ready", "ended_at": final.stat().st_mtime, **self._facts(final)}
                _write_json(meta_path, meta)
                return meta
            _write_json(meta_path, {**meta, "state": "failed", "error": "the file was lost before the restart"})
            return None
        data = max(0, part.stat().st_size - HEADER) // 4 * 4
        with part.open("r+b") as f:
            f.truncate(HEADER + data)
            f.seek(0)
            f.write(wav_header(data))  # whole: a crash may have come before the first header reached the disk
        os.replace(part, final)
        meta = {**meta, "state": "repaired", "ended_at": final.stat().st_mtime, "stop_reason": "gateway_restart",
                **self._facts(final)}
        _write_json(meta_path, meta)
        log.event(logger, "recording.repaired", logging.WARNING, voice_id=meta["voice_id"], recording_id=meta["id"],
                  duration_s=meta["duration_s"])
        return meta

    # -- reading (the API)
    def get(self, project: str, rid: str) -> dict[str, Any] | None:
        if not RECORDING_ID.fullmatch(rid):
            return None
        try:
            meta: dict[str, Any] = json.loads(self._paths(project, rid)[2].read_text())
        except (OSError, ValueError):
            return None
        return meta if meta.get("project") == project else None

    def file(self, project: str, rid: str) -> Path | None:
        meta = self.get(project, rid)
        if meta is None or meta["state"] not in FINISHED:
            return None
        path = self._paths(project, rid)[1]
        return path if path.exists() else None

    def list(self, project: str, voice_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        found = []
        for meta_path in self.folder(project).glob("*.json"):
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            if meta.get("project") == project and (voice_id is None or meta.get("voice_id") == voice_id):
                found.append(meta)
        return sorted(found, key=lambda m: m.get("started_at", 0), reverse=True)[:limit]

    def delete(self, project: str, rid: str) -> bool:
        meta = self.get(project, rid)
        if meta is None or meta["state"] == "recording":
            return False
        part, final, meta_path = self._paths(project, rid)
        final.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        return True

    def sweep(self, max_age_days: int, now: float | None = None) -> int:
        """Delete finished recordings older than `max_age_days` (0: none); the number deleted."""
        if max_age_days <= 0 or not self.root.exists():
            return 0
        cutoff = (now or time.time()) - max_age_days * 86400
        deleted = 0
        for meta_path in self.root.glob("*/*.json"):
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            if meta.get("state") != "recording" and meta.get("started_at", 0) < cutoff:
                if self.delete(meta.get("project", ""), meta.get("id", "")):
                    deleted += 1
        if deleted:
            log.event(logger, "recordings.swept", deleted=deleted, max_age_days=max_age_days)
        return deleted
