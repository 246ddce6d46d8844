"""The recordings store (issue 14): two channels in order, written off the caller's thread, finalised with its
facts, repaired after a crash, a failure that stops the recording only, retention, and projects kept apart."""

from __future__ import annotations

import hashlib
import subprocess
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.media import g711
from gateway.store.recordings import RecordingStore


def tone(freq: float, frames: int) -> list[bytes]:
    t = np.arange(frames * 160) / 8000
    data = g711.encode("PCMU", (8000 * np.sin(2 * np.pi * freq * t)).astype(np.int16))
    return [data[i * 160 : (i + 1) * 160] for i in range(frames)]


def channels(path: Path) -> tuple[np.ndarray, np.ndarray, int]:
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (2, 2, 8000)
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return data[0::2].astype(float), data[1::2].astype(float), w.getnframes()


def peak(x: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / 8000)[int(np.argmax(spectrum))])


def test_a_recording_has_the_caller_left_and_what_it_heard_right(tmp_path: Path) -> None:
    done: list[dict[str, Any]] = []
    store = RecordingStore(tmp_path, "w1", flush_s=1)
    rec = store.start("acme", "v-1", lambda: "PCMU", done.append)
    for caller, heard in zip(tone(1000, 150), tone(600, 150), strict=True):
        rec.frame(caller, heard)
    rec.frame(None, None)  # a tick with nothing either way: silence on both
    rec.stop("call_ended")
    store.flush()
    meta = done[0]
    assert meta["state"] == "ready" and meta["duration_s"] == pytest.approx(151 * 0.02, abs=0.01), meta
    path = store.file("acme", meta["id"])
    assert path is not None and meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert path.stat().st_mode & 0o777 == 0o600, "people's voices: owner only"
    left, right, frames = channels(path)
    assert frames == 151 * 160 and peak(left) == pytest.approx(1000, abs=10) and peak(right) == pytest.approx(600, abs=10)
    assert store.get("other", meta["id"]) is None and store.file("other", meta["id"]) is None, "another project's"
    assert [m["id"] for m in store.list("acme", "v-1")] == [meta["id"]] and store.list("other") == []
    store.close()


def test_a_recording_cut_by_a_crash_is_repaired_at_the_next_start(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path, "w1", flush_s=1)
    rec = store.start("acme", "v-2", lambda: "PCMU", lambda meta: None)
    for frame in tone(1000, 120):
        rec.frame(frame, frame)
    store.flush()  # written, never finalised: what a kill -9 leaves
    part = next((tmp_path / "recordings" / "acme").glob("*.part.wav"))
    with part.open("ab") as f:
        f.write(b"\x01\x02\x03")  # half a frame from an append that was cut
    store.flush()
    other = RecordingStore(tmp_path, "w2")  # another worker's files are not its business
    assert other.repair() == []
    restarted = RecordingStore(tmp_path, "w1")
    repaired = restarted.repair()
    assert [m["state"] for m in repaired] == ["repaired"] and repaired[0]["duration_s"] == pytest.approx(2.0, abs=0.05)
    path = restarted.file("acme", repaired[0]["id"])
    assert path is not None and channels(path)[2] == 100 * 160  # two appends of 50 frames; 20 were still in memory
    sox = subprocess.run(["sox", str(path), "-n", "stat"], capture_output=True, text=True, timeout=30)
    assert sox.returncode == 0 and "Length (seconds):" in sox.stderr, sox.stderr
    for s in (store, other, restarted):
        s.close()


def test_a_write_failure_stops_the_recording_not_the_caller(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    done: list[dict[str, Any]] = []
    store = RecordingStore(tmp_path, "w1", flush_s=1)

    def full(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store, "_append", full)
    rec = store.start("acme", "v-3", lambda: "PCMU", done.append)
    for frame in tone(1000, 60):
        rec.frame(frame, frame)  # never raises here: the writer thread meets the error
    store.flush()
    assert rec.failed and done[0]["state"] == "failed" and "No space left" in done[0]["error"]
    rec.frame(b"\xff" * 160, None)  # dropped at once from now on
    rec.stop("call_ended")
    store.flush()
    assert len(done) == 1 and not list((tmp_path / "recordings" / "acme").glob("*.wav"))
    store.close()


def test_retention_deletes_finished_recordings_only(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path, "w1")
    old = store.start("acme", "v-4", lambda: "PCMU", lambda meta: None)
    old.stop("call_ended")
    live = store.start("acme", "v-5", lambda: "PCMU", lambda meta: None)
    store.flush()
    assert store.sweep(0) == 0 and store.sweep(30, now=old.meta["started_at"] + 29 * 86400) == 0
    assert store.sweep(30, now=old.meta["started_at"] + 31 * 86400) == 1
    assert [m["voice_id"] for m in store.list("acme")] == ["v-5"]
    assert not store.delete("acme", live.id), "a recording in progress is not deleted"
    live.stop("call_ended")
    store.close()


def test_crashes_at_the_edges_leave_valid_files(tmp_path: Path) -> None:
    """Killed before the first append (the header alone on disk, even truncated), and killed between publishing a
    finished file and writing its metadata: both come back as valid, served recordings."""
    store = RecordingStore(tmp_path, "w1")
    early = store.start("acme", "v-6", lambda: "PCMU", lambda meta: None)
    store.flush()
    part = tmp_path / "recordings" / "acme" / f"{early.id}.part.wav"
    assert part.stat().st_size == 44, "the header is on disk at once"
    part.write_bytes(b"RIFF")  # torn even so
    done = store.start("acme", "v-7", lambda: "PCMU", lambda meta: None)
    for frame in tone(1000, 60):
        done.frame(frame, frame)
    done.stop("call_ended")
    store.flush()
    meta_path = tmp_path / "recordings" / "acme" / f"{done.id}.json"
    meta_path.write_text(meta_path.read_text().replace('"ready"', '"recording"'))  # as if cut before the write
    repaired = {m["voice_id"]: m for m in RecordingStore(tmp_path, "w1").repair()}
    assert repaired["v-6"]["state"] == "repaired" and repaired["v-6"]["duration_s"] == 0
    assert repaired["v-7"]["state"] == "ready" and repaired["v-7"]["duration_s"] == pytest.approx(1.2, abs=0.02)
    for voice_id in ("v-6", "v-7"):
        path = store.file("acme", repaired[voice_id]["id"])
        assert path is not None
        with wave.open(str(path)) as w:
            assert (w.getnchannels(), w.getframerate()) == (2, 8000)
    store.close()


def test_a_codec_switch_mid_call_is_decoded_as_sent(tmp_path: Path) -> None:
    """A re-INVITE may move the call from PCMU to PCMA: each batch is decoded with the codec it was sent in."""
    done: list[dict[str, Any]] = []
    codec = ["PCMU"]
    store = RecordingStore(tmp_path, "w1")
    rec = store.start("acme", "v-8", lambda: codec[0], done.append)
    for frame in tone(1000, 30):
        rec.frame(frame, frame)
    codec[0] = "PCMA"
    t = np.arange(30 * 160) / 8000
    alaw = g711.encode("PCMA", (8000 * np.sin(2 * np.pi * 1000 * t)).astype(np.int16))
    for i in range(30):
        rec.frame(alaw[i * 160 : (i + 1) * 160], None)
    rec.stop("call_ended")
    store.flush()
    path = store.file("acme", done[0]["id"])
    assert path is not None
    left, _, _ = channels(path)
    assert peak(left[:4800]) == pytest.approx(1000, abs=10) and peak(left[4800:]) == pytest.approx(1000, abs=10)
    assert np.sqrt(np.mean(left[4800:] ** 2)) > 4000, "PCMA decoded as PCMA, not as noise"
    store.close()


def _janus_file(folder: Path, name: str, samples: int, closed: bool) -> Path:
    """A 16 kHz mono WAV as Janus's AudioBridge leaves it: closed (RIFF size right, data size = the file's whole
    length, Janus 1.1's quirk) or still open (the sizes of an empty file)."""
    from gateway.store.recordings import wav_header

    pcm = (1000 * np.sin(2 * np.pi * 440 * np.arange(samples) / 16000)).astype("<i2").tobytes()
    size = 44 + len(pcm)
    head = bytearray(wav_header(0, 1, 16000))
    if closed:
        head[4:8] = (size - 8).to_bytes(4, "little")
        head[40:44] = size.to_bytes(4, "little")
    path = folder / name
    path.write_bytes(bytes(head) + pcm)
    return path


@pytest.mark.parametrize("closed", [True, False])
def test_an_external_recording_is_published_when_its_writer_closed_it(tmp_path: Path, closed: bool) -> None:
    store = RecordingStore(tmp_path, "rooms")
    meta, folder = store.begin_external("acme", 1, 16000, room_id="r1")
    assert (folder.stat().st_mode & 0o777) == 0o700 and store.get("acme", meta["id"])["state"] == "recording"
    _janus_file(folder, f"{meta['id']}.part.wav", 16000 * 2, closed)
    final = store.finish_external(meta, "api", settle_s=0.2)
    assert final["state"] == ("ready" if closed else "repaired"), final
    path = store.file("acme", meta["id"])
    assert path is not None and (path.stat().st_mode & 0o777) == 0o600
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getframerate(), w.getnframes()) == (1, 16000, 32000), "the header made right"
    assert final["duration_s"] == 2.0 and final["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    store.close()


def test_an_external_recording_never_written_fails(tmp_path: Path) -> None:
    store = RecordingStore(tmp_path, "rooms")
    meta, _ = store.begin_external("acme", 1, 16000, room_id="r1")
    final = store.finish_external(meta, "api", settle_s=0.1)
    assert final["state"] == "failed" and store.get("acme", meta["id"])["state"] == "failed"
    store.close()


def test_opus_keeps_the_wav_when_the_encoder_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An encoder that fails (here: none on PATH) never costs the audio: the WAV is published instead."""
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    done: list[dict[str, Any]] = []
    store = RecordingStore(tmp_path, "w1", flush_s=1, fmt="opus")
    rec = store.start("acme", "v-1", lambda: "PCMU", done.append)
    for caller, heard in zip(tone(1000, 100), tone(600, 100), strict=True):
        rec.frame(caller, heard)
    rec.stop("hangup")
    store.flush()
    store.close()
    meta = store.get("acme", rec.id)
    assert meta is not None and meta["state"] == "ready" and meta["format"] == "wav", meta
    assert "opusenc not found" in meta["encode_error"] and done and done[0]["state"] == "ready"
    left, right, frames = channels(store.file("acme", rec.id))  # type: ignore[arg-type]
    assert frames == 16000 and abs(peak(left) - 1000) < 10 and abs(peak(right) - 600) < 10
