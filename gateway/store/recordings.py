"""Call recordings on disk: two-channel WAV, written by a thread of their own, crash-safe (issue 14).

Layout: DATA_DIR/recordings/PROJECT/ID.wav (or ID.opus) and ID.json (what the API lists: voice_id, state,
duration, size, SHA-256...). While a call records, its file is ID.part.wav and its metadata says "recording" and
which worker writes it.

Opus in Ogg (`[recordings] format = "opus"`): the call is still written as WAV while it lasts (the crash-safe
part), then `opusenc` (Xiph's opus-tools, the reference encoder: Debian's, installed by the Makefile) turns the
finished WAV into ID.opus on a thread of its own, so a long encoding never holds back other calls' writes; the
WAV goes once the Ogg file is whole. A crash before that: `repair` finishes the WAV and encodes it.

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
import subprocess
import threading
import time
import uuid
import wave
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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
FORMATS = {"wav": "audio/wav", "opus": "audio/ogg"}  # what a recording may be written as, and its media type
OPUS_BITRATE_KBPS = 24  # per file (both channels): speech at 8 kHz needs no more
ENCODE_TIMEOUT_S = 600
Done = Callable[[dict[str, Any]], None]  # called on the event loop with the final metadata (ready or failed)


def wav_header(data: int, channels: int = 2, rate: int = RATE) -> bytes:
    """The 44-byte header of a PCM16 WAV holding `data` bytes (what the stdlib writer, and Janus, write)."""
    block = 2 * channels
    return (b"RIFF" + struct.pack("<I", 36 + data) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, channels, rate, rate * block, block, 16) + b"data" + struct.pack("<I", data))


def _header_matches(path: Path) -> bool:
    """A PCM WAV whose RIFF size says the file's length: its writer has closed it. (Janus 1.1 writes the file's
    whole length as the data chunk's size when it closes one: `_rewrite_header` puts the right one.)"""
    try:
        with path.open("rb") as f:
            head = f.read(HEADER)
        size = path.stat().st_size
    except OSError:
        return False
    return (len(head) == HEADER and head[:4] == b"RIFF" and struct.unpack("<I", head[4:8])[0] == size - 8
            and head[36:40] == b"data" and struct.unpack("<I", head[40:44])[0] in (size - HEADER, size))


def _rewrite_header(path: Path, channels: int, rate: int) -> None:
    """The header's sizes from the file's length (whole sample frames only)."""
    block = 2 * channels
    data = max(0, path.stat().st_size - HEADER) // block * block
    with path.open("r+b") as f:
        f.truncate(HEADER + data)
        f.seek(0)
        f.write(wav_header(data, channels, rate))


def encode_opus(wav: Path, out: Path) -> None:
    """Ogg Opus from a finished WAV, written beside `out` then renamed (a crash never leaves half a file under
    `out`); RuntimeError if the encoder is missing or fails."""
    tmp = out.with_name(out.name + ".tmp")
    try:
        result = subprocess.run(["opusenc", "--quiet", "--bitrate", str(OPUS_BITRATE_KBPS), str(wav), str(tmp)],
                                capture_output=True, text=True, timeout=ENCODE_TIMEOUT_S)
    except FileNotFoundError:
        raise RuntimeError("opusenc not found: install the Debian package opus-tools") from None
    except subprocess.TimeoutExpired:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"opusenc took over {ENCODE_TIMEOUT_S} s") from None
    if result.returncode != 0 or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"opusenc failed ({result.returncode}): {result.stderr.strip()[-300:]}")
    os.chmod(tmp, 0o600)
    os.replace(tmp, out)


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
                 notify: Callable[[Callable[[], None]], None] | None = None, fmt: str = "wav") -> None:
        """`notify(fn)`: how the writer thread gets `fn` run on the event loop (loop.call_soon_threadsafe);
        `fmt`: "wav" or "opus" (Ogg Opus, encoded when the recording ends)."""
        if fmt not in FORMATS:
            raise ValueError(f"recordings.format: one of {', '.join(FORMATS)}")
        self.root = Path(data_dir) / "recordings"
        self.worker = worker
        self.flush_s = flush_s
        self.format = fmt
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="recordings-encoder")
        self.notify = notify or (lambda fn: fn())
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._writer, name="recordings-writer", daemon=True)
        self._thread.start()

    # -- paths
    def folder(self, project: str) -> Path:
        name = project if SAFE_NAME.fullmatch(project) else "x-" + hashlib.sha256(project.encode()).hexdigest()[:16]
        return self.root / name

    def _paths(self, project: str, rid: str, fmt: str = "wav") -> tuple[Path, Path, Path]:
        """The file while recording, the finished file (ID.wav or ID.opus), the metadata."""
        folder = self.folder(project)
        return folder / f"{rid}.part.wav", folder / f"{rid}.{fmt}", folder / f"{rid}.json"

    # -- the event loop's side
    def start(self, project: str, voice_id: str, codec: Callable[[], str], on_done: Done, **extra: Any) -> Recording:
        meta = {"id": uuid.uuid4().hex, "project": project, "voice_id": voice_id, "state": "recording",
                "format": self.format, "channels": 2, "rate": RATE, "channel_layout": ["caller", "heard"],
                "started_at": time.time(), "worker": self.worker, **extra}
        recording = Recording(self, meta, codec, on_done)
        self.submit(("open", recording))
        return recording

    def submit(self, item: tuple[Any, ...]) -> None:
        self._queue.put(item)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(30)
        self._encoder.shutdown(wait=True)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until the writer (and the encoder after it) has done everything queued so far (tests, shutdown)."""
        done = threading.Event()
        self._queue.put(("barrier", done))
        deadline = time.monotonic() + timeout
        if done.wait(timeout):
            encoded = threading.Event()
            self._encoder.submit(encoded.set)
            encoded.wait(max(0.0, deadline - time.monotonic()))

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
                    if rec.meta["format"] == "opus":  # encoded on its own thread, announced from there
                        self._close_wav(rec)
                        self._encoder.submit(self._encode, rec, item[2])
                        continue
                    self._finish(rec, item[2])
                else:
                    continue
            except Exception as exc:  # noqa: BLE001 - a recording's failure never reaches the call or the thread
                self._fail(rec, exc)
            if kind == "close" or rec.failed:
                self._announce(rec)

    def _announce(self, rec: Recording) -> None:
        """Once: ready, or failed."""
        if rec.announced:
            return
        rec.announced = True
        try:  # the loop may be gone (shutdown): the metadata on disk says it all the same
            self.notify(functools.partial(rec.on_done, rec.meta))
        except Exception:  # noqa: BLE001
            logger.debug("recording.notify_failed", exc_info=True)

    def _encode(self, rec: Recording, reason: str) -> None:
        """The encoder thread: the finished WAV becomes ID.opus, then the recording is ready."""
        try:
            self._finish(rec, reason)
        except Exception as exc:  # noqa: BLE001
            self._fail(rec, exc)
        self._announce(rec)

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

    def _close_wav(self, rec: Recording) -> None:
        if rec._wav is not None:
            rec._wav.close()  # the header's final sizes
            rec._file.close()
            rec._wav = rec._file = None

    def _finish(self, rec: Recording, reason: str) -> None:
        self._close_wav(rec)
        part, final, meta_path = self._paths(rec.meta["project"], rec.id, rec.meta["format"])
        facts = self._publish(part, final, rec.meta)
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
        part, final, meta_path = self._paths(rec.meta["project"], rec.id, rec.meta["format"])
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
    def _publish(part: Path, final: Path, meta: dict[str, Any]) -> dict[str, Any]:
        """The finished WAV under its final name (encoded first for Opus); its size, duration and SHA-256. The facts
        come before the rename: a crash after it finds the file whole (`repair`)."""
        pcm = max(0, part.stat().st_size - HEADER)
        duration = round(pcm / (meta.get("rate", RATE) * 2 * meta.get("channels", 2)), 2)
        if final.suffix == ".opus":
            try:
                encode_opus(part, final)
            except RuntimeError as exc:  # the audio is kept all the same: as the WAV it was recorded as
                log.event(logger, "recording.encode_failed", logging.ERROR, recording_id=meta["id"], error=str(exc),
                          kept="wav")
                final = final.with_suffix(".wav")
                facts: dict[str, Any] = {"format": "wav", "encode_error": str(exc)}
            else:
                facts = {"size": final.stat().st_size, "duration_s": duration, "sha256": _sha256(final)}
                part.unlink()
                return facts
        else:
            facts = {}
        facts.update(size=part.stat().st_size, duration_s=duration, sha256=_sha256(part))
        os.replace(part, final)
        return facts

    @staticmethod
    def _facts(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
        size = path.stat().st_size
        if path.suffix == ".opus":
            return {"size": size, "sha256": _sha256(path)}
        rate, channels = meta.get("rate", RATE), meta.get("channels", 2)
        return {"size": size, "duration_s": round(max(0, size - HEADER) / (rate * 2 * channels), 2),
                "sha256": _sha256(path)}

    # -- recordings another program writes (a room's mix, written by Janus's AudioBridge)
    def begin_external(self, project: str, channels: int, rate: int, **extra: Any) -> tuple[dict[str, Any], Path]:
        """The metadata of a recording some other program writes as ID.part.wav (saved, state "recording") and the
        folder it goes in (made 0700)."""
        meta = {"id": uuid.uuid4().hex, "project": project, "voice_id": "", "state": "recording",
                "format": self.format, "channels": channels, "rate": rate, "started_at": time.time(),
                "worker": self.worker, **extra}
        part, _, meta_path = self._paths(project, meta["id"])
        for folder in (self.root, part.parent):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        _write_json(meta_path, meta)
        return meta, part.parent

    def finish_external(self, meta: dict[str, Any], reason: str, settle_s: float = 5.0) -> dict[str, Any]:
        """Blocking (run it in a thread): once the writer has closed ID.part.wav (its header's size matches the
        file, checked for up to `settle_s`), the file is made 0600 and published like a call's; a header that never
        matched (the writer died) is rewritten from the file's length and the recording is "repaired". A missing
        file fails the recording. The final metadata is saved and returned."""
        part, final, meta_path = self._paths(meta["project"], meta["id"], meta.get("format", "wav"))
        deadline = time.monotonic() + settle_s
        closed = False
        while part.exists():
            closed = _header_matches(part)
            if closed or time.monotonic() >= deadline:
                break
            time.sleep(0.05)  # the writer is another process: its closing is only seen on disk
        if not part.exists():
            meta = {**meta, "state": "failed", "ended_at": time.time(), "error": "the recording's file was not written"}
            _write_json(meta_path, meta)
            log.event(logger, "recording.failed", logging.ERROR, recording_id=meta["id"], error=meta["error"],
                      room_id=meta.get("room_id"))
            return meta
        os.chmod(part, 0o600)
        if not closed:  # the writer died with the file open
            repaired = self._repair_one(meta, meta_path)
            return repaired or {**meta, "state": "failed"}
        _rewrite_header(part, meta.get("channels", 2), meta.get("rate", RATE))
        facts = self._publish(part, final, meta)
        meta = {**meta, "state": "ready", "ended_at": time.time(), "stop_reason": reason, **facts}
        _write_json(meta_path, meta)
        log.event(logger, "recording.ready", recording_id=meta["id"], room_id=meta.get("room_id"),
                  duration_s=meta["duration_s"], size=meta["size"])
        return meta

    # -- after a crash
    def open_recordings(self) -> list[dict[str, Any]]:
        """This worker's recordings still marked "recording" (a previous run stopped without finishing them)."""
        found = []
        for meta_path in sorted(self.root.glob("*/*.json")):
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            if meta.get("state") == "recording" and meta.get("worker") == self.worker:
                found.append(meta)
        return found

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
        part, final, _ = self._paths(meta["project"], meta["id"], meta.get("format", "wav"))
        if not part.exists():
            if final.exists():  # finished, then cut before its metadata was written: whole already
                meta = {**meta, "state": "ready", "ended_at": final.stat().st_mtime, **self._facts(final, meta)}
                _write_json(meta_path, meta)
                return meta
            _write_json(meta_path, {**meta, "state": "failed", "error": "the file was lost before the restart"})
            return None
        # the whole header: a crash may have come before the first one reached the disk
        _rewrite_header(part, meta.get("channels", 2), meta.get("rate", RATE))
        facts = self._publish(part, final, meta)
        meta = {**meta, "state": "repaired", "ended_at": time.time(), "stop_reason": "gateway_restart", **facts}
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
        path = self._paths(project, rid, meta.get("format", "wav"))[1]
        return path if path.exists() else None

    def list(self, project: str, voice_id: str | None = None, limit: int = 100,
             room_id: str | None = None) -> list[dict[str, Any]]:
        found = []
        for meta_path in self.folder(project).glob("*.json"):
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            if meta.get("project") == project and (voice_id is None or meta.get("voice_id") == voice_id) and (
                    room_id is None or meta.get("room_id") == room_id):
                found.append(meta)
        return sorted(found, key=lambda m: m.get("started_at", 0), reverse=True)[:limit]

    def delete(self, project: str, rid: str) -> bool:
        meta = self.get(project, rid)
        if meta is None or meta["state"] == "recording":
            return False
        part, final, meta_path = self._paths(project, rid, meta.get("format", "wav"))
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
