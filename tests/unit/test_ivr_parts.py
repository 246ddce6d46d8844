"""Room store, PIN roles, the PIN-guessing limiter, and prompt overrides (no sockets)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gateway.apps.limits import AttemptLimiter, Limits
from gateway.apps.prompts import PromptLibrary, write_wav
from gateway.apps.services import Origin
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


def test_attempt_limiter_reserves_per_source_and_caller_and_backs_off_per_meeting() -> None:
    now = [0.0]
    per = {("pin", "caller"): 2, ("pin", "source"): 3, ("meeting_id", "caller"): 1, ("meeting_id", "source"): 0}
    lim = AttemptLimiter(Limits(per, meeting_budget=2, backoff=1.0, backoff_max=3.0, window=60), lambda: now[0])
    alice, bob, carol = Origin("10.0.0.2", "t/alice"), Origin("10.0.0.2", "t/bob"), Origin("10.0.0.3", "t/carol")
    first = lim.take("pin", alice, "m1")
    assert not first.blocked and first.delay == 0
    assert lim.take("pin", alice, "m1").delay == 0  # reserved, not yet checked: it counts already
    assert lim.take("pin", alice, "m1").blocked == "caller"
    lim.give_back(first)  # the first one was right: it no longer counts
    assert lim.take("pin", alice, "m1").delay == 0
    assert lim.take("pin", bob, "m1").delay == 1.0  # the meeting's budget (2) is spent: a wait, no lock
    assert lim.take("pin", bob, "m1").blocked == "source"  # another number, same address
    assert lim.take("pin", carol, "m1").delay == 2.0 and lim.take("pin", carol, "m1").delay == 3.0  # doubling, capped
    assert lim.take("meeting_id", carol).blocked == "" and lim.take("meeting_id", carol).blocked == "caller"
    assert lim.take("meeting_id", Origin("", "t/dave")).blocked == ""  # a trusted trunk: no source counter
    now[0] = 61.0  # the window passed
    assert lim.take("pin", bob, "m1").delay == 0 and not lim.take("pin", alice, "m1").blocked
    now[0] = 200.0
    lim.take("pin", Origin("10.0.0.9", "t/erin"), "m2")
    assert len(lim) == 3  # expired counters are swept: m2, erin and her address remain


def test_call_origin_is_the_network_source_unless_the_trunk_vouches_for_numbers() -> None:
    from types import SimpleNamespace

    from gateway.apps.services import call_origin
    from gateway.config import Config, TrunkConfig

    config = Config()
    config.trunks = [TrunkConfig(name="open", sources=["127.0.0.0/8"]),
                     TrunkConfig(name="carrier", sources=["10.0.0.0/8"], trust_id_inbound=True)]
    config.cluster.lb_sources = ["10.9.9.9"]

    def call(host: str, trunk: str, forwarded: str = "") -> Any:
        headers = {"x-gateway-source": forwarded} if forwarded else {}
        return SimpleNamespace(source=SimpleNamespace(host=host), invite=SimpleNamespace(headers=headers),
                               info={"trunk": trunk, "caller": "15551230000"})

    assert call_origin(call("127.0.0.2", "open"), config) == Origin("127.0.0.2", "open/15551230000")
    assert call_origin(call("10.9.9.9", "open", "203.0.113.7"), config).source == "203.0.113.7"  # the balancer says
    assert call_origin(call("127.0.0.2", "open", "203.0.113.7"), config).source == "127.0.0.2"  # anyone else: no
    assert call_origin(call("10.1.1.1", "carrier"), config) == Origin("", "carrier/15551230000")


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
