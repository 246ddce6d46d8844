"""Guessing meeting IDs and PINs, attacked over real sockets (issue 11: finding 3, finding 10, the Redis part of
finding 8): sipp callers from 127.0.0.2 stand in for the stranger, from 127.0.0.1 for the participants, against a
real gateway; the shared limiter and directory against a real redis-server started here."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from gateway.rooms.directory import SharedDirectory, pin_key, publish_room
from gateway.store.rooms import RoomStore
from tests.conftest import (
    ROOT,
    Gateway,
    free_port,
    make_test_config,
    media_block,
    scenario,
    start_gateway,
    stop_gateway,
    wait_until,
)
from tests.integration.ivr_tools import ivr_scenario, reply, rfc4733

STRANGER, MEMBER = "127.0.0.2", "127.0.0.1"
IVR_DID = "15550100000"
WRONG = "0000000"  # 7 digits: never one of the 6-digit PINs


def config(extra: str = "", **ivr: object) -> str:
    """The test config with some [ivr] keys set."""
    text = make_test_config(extra)
    for key, value in ivr.items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {json.dumps(value)}", text, count=1, flags=re.M)
        assert n == 1, key
    return text


def gateway(tmp: Path, text: str, redis_url: str = "") -> Gateway:
    env = {"GATEWAY_CLUSTER_REDIS_URL": redis_url} if redis_url else None
    gw = start_gateway(tmp, text, env)
    wait_until(lambda: '"prompts.ready"' in gw.log(), 90, "prompts rendered")
    return gw


def create_room(gw: Gateway, project: str = "") -> dict[str, Any]:
    args = [sys.executable, "-m", "gateway", "rooms", "create", "--json", "--name", "guessed",
            "--data-dir", str(gw.data_dir)]
    args += ["--config", str(gw.data_dir.parent / "gateway.toml")] + (["--project", project] if project else [])
    return json.loads(subprocess.run(args, capture_output=True, timeout=90, cwd=ROOT, check=True).stdout)  # type: ignore[no-any-return]


def guesser(tmp: Path, name: str, entries: list[str], caller: str) -> Path:
    """A caller typing each entry (RFC 4733) and ready, after each, for the gateway's BYE (refused, or too many
    attempts): it answers it and the call ends well either way."""
    steps = []
    for i, keys in enumerate(entries, 1):
        steps.append(f'  <nop><action><exec play_dtmf="{keys}"/></action></nop>')
        steps.append(f'  <recv request="BYE" timeout="{600 * len(keys) + 800}" ontimeout="{i}" next="99"/>')
        steps.append(f'  <label id="{i}"/>')
    end = '  <recv request="BYE" timeout="30000"/>\n  <label id="99"/>\n' + reply("200 OK")
    return scenario(tmp / name, "ivr_caller.xml", input="\n".join(steps), end=end, caller=caller)


def sipp(gw: Gateway, source: str, sf: Path, calls: int = 1, did: str = IVR_DID,
         timeout: float = 150) -> subprocess.CompletedProcess[str]:
    """sipp from `source` (signalling and media), `calls` calls all at once."""

    cmd = ["sipp", gw.sip, "-sf", str(sf), "-s", did, "-i", source, "-mi", source, "-p", str(free_port()),
           "-mp", str(media_block()), "-m", str(calls), "-l", str(calls), "-r", str(calls),
           "-nostdin", "-timeout", f"{int(timeout) - 5}s", "-timeout_error"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def events(gw: Gateway) -> list[dict[str, Any]]:
    """The worker's call events (JSON log lines)."""
    found = []
    for line in gw.log().splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and str(item.get("event", "")).startswith("call."):
            found.append(item)
    return found


def count(gw: Gateway, name: str, **fields: Any) -> int:
    return sum(1 for e in events(gw) if e["event"] == name and all(e.get(k) == v for k, v in fields.items()))


def ended(gw: Gateway, calls: int, timeout: float = 60) -> None:
    wait_until(lambda: count(gw, "call.disconnected") >= calls, timeout, f"{calls} calls ended")


@pytest.mark.parametrize("shared", [False, True], ids=["worker", "redis"])
def test_a_burst_of_guessers_stays_within_the_limit_and_the_participant_still_gets_in(
        tmp_path: Path, request: pytest.FixtureRequest, shared: bool) -> None:
    """20 callers at once from one address, each with its own number, each typing three wrong PINs: 60 attempts
    wanted. Today's limiter checked, asked, then recorded, so they overran it (38 against 30); attempts are
    reserved before the PIN is asked for now. The stranger's address is refused from then on, whatever number it
    gives; the meeting is not locked: a participant from another address gets in after the meeting's back-off."""
    redis_url = request.getfixturevalue("redis_url") if shared else ""
    if shared:
        redis_sync.Redis.from_url(redis_url).flushdb()
    limit, callers = 30, 20
    gw = gateway(tmp_path, config(pin_failures_per_source=limit, pin_failures_per_caller=10,
                                  pin_failures_per_meeting=limit, pin_backoff_ms=500, pin_backoff_max_ms=2000),
                 redis_url)
    try:
        room = create_room(gw)
        mid, pin = room["sip"]["meeting_id"], room["sip"]["pin"]
        sf = guesser(tmp_path, "burst", [mid + "#"] + [WRONG + "#"] * 3, caller="1555700[call_number]")
        r = sipp(gw, STRANGER, sf, calls=callers)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
        ended(gw, callers)
        checked = count(gw, "call.pin_invalid")
        refused = count(gw, "call.pin_blocked", limit="source")
        print(f"\n{'redis' if shared else 'worker'}: {callers} concurrent callers from one address, 3 wrong PINs each: "
              f"{checked} PIN attempts checked against a limit of {limit} ({refused} calls refused)")
        assert checked == limit and refused >= callers - limit // 3  # every attempt reserved was typed and checked

        # the stranger, with yet another number: refused before typing a PIN
        sf = guesser(tmp_path, "again", [mid + "#", pin + "#"], caller="15557999999")
        assert sipp(gw, STRANGER, sf).returncode == 0
        ended(gw, callers + 1)
        assert count(gw, "call.pin_blocked", limit="source") == refused + 1
        assert count(gw, "call.validated") == 0

        # a participant from another address: in, after the back-off (the meeting's budget is spent)
        sf = ivr_scenario(tmp_path / "member", [rfc4733(mid + "#"), rfc4733(pin + "#")], caller="15551230000",
                          tail=4000)
        r = sipp(gw, MEMBER, sf)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
        ended(gw, callers + 2)
        validated = [e for e in events(gw) if e["event"] == "call.validated"]
        assert len(validated) == 1 and validated[0]["room_id"] == room["room_id"]
        backoff = [e for e in events(gw) if e["event"] == "call.pin_backoff"]
        assert backoff and backoff[-1]["voice_id"] == validated[0]["voice_id"] and backoff[-1]["delay_ms"] >= 500
        assert pin not in gw.log()
    finally:
        stop_gateway(gw)


def test_wrong_meeting_ids_from_one_source_are_refused(tmp_path: Path) -> None:
    """Three callers at once from one address, three numbers, three wrong meeting IDs each: 9 tries wanted, 4
    allowed per source (today: all 9 checked, no limit). A participant from another address still gets in."""
    gw = gateway(tmp_path, config(meeting_id_failures_per_source=4))
    try:
        room = create_room(gw)
        wrong = "9" * len(room["sip"]["meeting_id"])
        assert wrong != room["sip"]["meeting_id"]
        sf = guesser(tmp_path, "ids", [wrong + "#"] * 3, caller="1555800[call_number]")
        r = sipp(gw, STRANGER, sf, calls=3)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
        ended(gw, 3)
        checked, refused = count(gw, "call.meeting_id_invalid"), count(gw, "call.meeting_id_blocked", limit="source")
        print(f"\n3 concurrent callers from one address, 3 wrong meeting IDs each: {checked} checked against a limit "
              f"of 4 ({refused} calls refused)")
        assert checked == 4 and refused >= 2
        reasons = Counter(e.get("reason") for e in events(gw) if e["event"] == "call.disconnected")
        assert reasons["meeting_id_attempts_blocked"] == refused
        assert reasons["meeting_id_attempts_blocked"] + reasons["too_many_meeting_id_attempts"] == 3
        sf = ivr_scenario(tmp_path / "member", [rfc4733(room["sip"]["meeting_id"] + "#"), rfc4733(room["sip"]["pin"] + "#")])
        r = sipp(gw, MEMBER, sf)
        assert r.returncode == 0, r.stdout[-3000:]
        ended(gw, 4)
        assert count(gw, "call.validated", room_id=room["room_id"]) == 1
    finally:
        stop_gateway(gw)


TENANTS = """
[[projects]]
name = "acme"

[[dids]]
number = "15550100007"
route = "ivr"
project = "acme"

[[dids]]
number = "15550100008"
route = "ivr"
project = "demo"
any_project = true
"""


def test_a_did_resolves_only_its_own_projects_meeting_ids(tmp_path: Path) -> None:
    """Project demo's IVR DID does not resolve project acme's meeting ID (today it does); acme's DID does, and a DID
    the operator shares (any_project = true) does too."""
    gw = gateway(tmp_path, config(TENANTS))
    try:
        room = create_room(gw, project="acme")
        mid, pin = room["sip"]["meeting_id"], room["sip"]["pin"]
        calls = 0
        for did, resolves in ((IVR_DID, False), ("15550100007", True), ("15550100008", True)):
            sf = ivr_scenario(tmp_path / did, [rfc4733(mid + "#"), rfc4733(pin + "#")], tail=4000)
            r = sipp(gw, MEMBER, sf, did=did)
            assert r.returncode == 0, r.stdout[-3000:]
            calls += 1
            ended(gw, calls)
            (voice_id,) = [e["voice_id"] for e in events(gw) if e["event"] == "call.initiated" and e["did"] == did]
            mine = [e["event"] for e in events(gw) if e.get("voice_id") == voice_id]
            assert ("call.meeting_id_accepted" in mine) == resolves and ("call.validated" in mine) == resolves, mine
        assert count(gw, "call.validated", room_id=room["room_id"]) == 2
    finally:
        stop_gateway(gw)


def sha256_preimage(entry: dict[str, str], digits: int) -> str | None:
    """What the attacker of finding 8 did with a dump of Redis: every PIN of `digits` digits, hashed as today's
    code did (sha256 of room_id:pin) and plainly (sha256 of the PIN)."""
    values = {v for k, v in entry.items() if k in ("pin", "mpin") and v}
    room = entry.get("room_id", "").encode()
    for n in range(10 ** digits):
        pin = f"{n:0{digits}d}".encode()
        if hashlib.sha256(room + b":" + pin).hexdigest() in values or hashlib.sha256(pin).hexdigest() in values:
            return pin.decode()
    return None


def test_redis_holds_no_unkeyed_pin_hash(tmp_path: Path, redis_url: str) -> None:
    """A worker on Redis publishes the room on its first lookup; a dump of Redis then yields no PIN to a brute force
    over every 6-digit PIN (today: the moderator PIN in 0.34 s), nor the key. The participant still gets in."""
    redis_sync.Redis.from_url(redis_url).flushdb()
    gw = gateway(tmp_path, config(), redis_url)
    try:
        room = create_room(gw)
        sip = room["sip"]
        sf = ivr_scenario(tmp_path, [rfc4733(sip["meeting_id"] + "#"), rfc4733(sip["mpin"] + "#")], tail=4000)
        r = sipp(gw, MEMBER, sf)
        assert r.returncode == 0, r.stdout[-3000:]
        ended(gw, 1)
        assert count(gw, "call.validated", room_id=room["room_id"], role="moderator") == 1
        client = redis_sync.Redis.from_url(redis_url, decode_responses=True)
        entry = client.hgetall(f"gw:meeting:{sip['meeting_id']}")
        assert entry["room_id"] == room["room_id"] and entry["mpin"] and entry["pin"]
        assert sha256_preimage(entry, len(sip["pin"])) is None
        secret = json.loads((gw.data_dir / "room-service.json").read_text())["secret"]
        dump = json.dumps({key: client.dump(key).hex() for key in client.keys("*")})  # type: ignore[union-attr]
        for clear in (sip["pin"], sip["mpin"], secret, pin_key(secret).hex()):
            assert clear not in dump and clear.encode().hex() not in dump
    finally:
        stop_gateway(gw)


async def test_shared_directory_keeps_projects_apart(redis: Any, tmp_path: Path) -> None:
    store = RoomStore(tmp_path)
    room = store.create("Board", meeting_id_digits=9, pin_digits=6, project="acme")
    key = pin_key("the room service's secret")
    directory = SharedDirectory(redis, RoomStore(tmp_path / "elsewhere"), key)
    await publish_room(redis, room, key)
    mid, pin = room["sip"]["meeting_id"], room["sip"]["pin"]
    assert await directory.exists(mid, "acme") and not await directory.exists(mid, "demo")
    assert await directory.resolve(mid, pin, "demo") is None
    assert await directory.resolve(mid, pin, "acme") == (room["room_id"], "participant")
    assert await directory.resolve(mid, pin, None) == (room["room_id"], "participant")  # a shared number
    # a host with another secret cannot use the entry (and says so), rather than accept or refuse wrongly
    assert not await SharedDirectory(redis, RoomStore(tmp_path / "third"), pin_key("another")).exists(mid, "acme")
    store.close()
