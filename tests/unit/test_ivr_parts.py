"""Room store, PIN roles, the PIN-guessing limiter, and prompt overrides (no sockets)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from gateway.apps.limits import AttemptLimiter
from gateway.apps.prompts import PromptLibrary, write_wav
from gateway.rooms.directory import EmbeddedDirectory
from gateway.store.rooms import RoomStore, check_pin


def test_room_store_create_lookup_and_roles(tmp_path: Path) -> None:
    store = RoomStore(tmp_path)
    room = store.create("Board", meeting_id_digits=9, pin_digits=6)
    sip = room["sip"]
    assert sip["enabled"] and len(sip["meeting_id"]) == 9 and len(sip["pin"]) == 6 and sip["pin"] != sip["mpin"]
    assert store.by_meeting(sip["meeting_id"])["room_id"] == room["room_id"]  # type: ignore[index]
    assert check_pin(room, sip["pin"]) == "participant" and check_pin(room, sip["mpin"]) == "moderator"
    assert check_pin(room, "9" * 7) is None
    with pytest.raises(ValueError):
        store.create("Dup", meeting_id=sip["meeting_id"])
    assert store.create("NoSip", sip_enabled=False)["sip"]["enabled"] is False
    directory = EmbeddedDirectory(store)
    assert asyncio.run(directory.resolve(sip["meeting_id"], sip["mpin"])) == (room["room_id"], "moderator")
    assert asyncio.run(directory.resolve(sip["meeting_id"], "000")) is None
    assert asyncio.run(directory.exists("0")) is False


def test_attempt_limiter_per_caller_and_meeting_over_window() -> None:
    lim = AttemptLimiter(per_caller=2, per_meeting=3, window=60)
    lim.failed("alice", "m1", 0)
    assert lim.blocked("alice", "m1", 1) is None
    lim.failed("alice", "m1", 2)
    assert lim.blocked("alice", "m1", 3) == "caller"
    assert lim.blocked("bob", "m1", 3) is None
    lim.failed("bob", "m1", 4)
    assert lim.blocked("carol", "m1", 5) == "meeting"
    assert lim.blocked("alice", "m1", 63) is None and lim.blocked("carol", "m1", 65) is None  # window passed


def test_recorded_prompt_overrides_tts(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts"
    (prompts / "en-US").mkdir(parents=True)
    (prompts / "en-US.toml").write_text('goodbye = "Goodbye."\ncount = "There are {count}."\n')
    tone = (3000 * np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)).astype(np.int16)
    path = prompts / "en-US" / "goodbye.wav"
    import wave

    with wave.open(str(path), "wb") as w:  # 16 kHz recording: resampled to 8 kHz
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(tone.tobytes())
    lib = PromptLibrary(prompts, tmp_path / "cache")
    used, pcm = asyncio.run(lib.pcm("goodbye"))
    assert used == path and len(pcm) == 8000 and lib.rendered == 0
    assert lib.text("count", "en-US", count=4) == "There are 4."
    cached = lib.cache_path("Hello", "en-US", "female")
    write_wav(cached, np.zeros(800, dtype=np.int16))
    assert asyncio.run(lib.pcm("x", text="Hello"))[0] == cached and lib.rendered == 0  # a cache hit renders nothing
    lib.close()


def test_missing_espeak_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ctypes.util

    from gateway.apps import prompts as mod

    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    lib = PromptLibrary(Path("prompts"), tmp_path / "cache")
    with pytest.raises(mod.PromptError, match="espeak-ng"):
        asyncio.run(lib.pcm("goodbye"))
    lib.close()
