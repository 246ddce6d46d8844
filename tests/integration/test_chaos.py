"""Chaos under load: a part of the system fails while calls are up (echo callers, IVR callers in a room, dial-outs
through the Voice API to a sipp far phone, every call's webhooks going to a receiver), and nothing is lost: every
call ends cleanly (the callers' sipp and the far phone finish as scripted: calls that must go on go on, calls that
must end get a BYE), every call is closed in the CDR with a reason, and every webhook arrives, in order.

1. Redis hangs (SIGSTOP, every request times out), then dies (SIGKILL) and the supervisor starts a new, empty one:
   calls go on, new calls are taken, the workers drop their registry writes with a warning and publish their calls
   again when Redis answers; afterwards one worker's API acts on the other's calls again and the IVR resolves
   meetings again. Then Kamailio is killed: the supervisor starts it again and it carries calls.
2. The room service dies (SIGKILL): the phones in its rooms hear the notice and get a BYE (`room_disconnected`:
   the room service holds the rooms' Janus secrets, moderation and participant lists, so nobody can keep such a
   room safely; README "Rooms on Janus"), other calls go on; `gateway run` starts it again and a caller joins the
   same room at once.
3. The CDR disk fills up, then turns read-only (a small ext4 mounted as the data directory, filled; then the CDR
   files made immutable): calls go on and new ones are taken, the worker raises an alarm (error line, metrics,
   cluster.alarm_url) and catches up once the disk takes writes again.
4. The webhook receiver is slow (30 s per request), then down, then back: every event arrives, in order; the calls
   and the other project's webhooks are unaffected.
5. A worker SIGSTOPped: test_cluster.py (test_hung_worker_is_killed_and_replaced).

Each test cleans up the processes (by PID) and the mount it made.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    Gateway,
    free_port,
    make_test_config,
    start_gateway,
    stop_gateway,
    stop_process,
    wait_until,
)
from tests.integration.chaos_tools import (
    ACME_NUMBER,
    Cdr,
    Receiver,
    all_closed,
    all_delivered,
    children,
    echo_callers,
    far_phones,
    finish,
    http_json,
    ivr_callers,
    joined,
    log_lines,
    no_leftovers,
    read_cdr,
    require,
    require_tools,
    start_cluster_with,
    trunk_config,
    when,
)
from tests.integration.test_cluster import Cluster
from tests.integration.voice_tools import VoiceClient, cli

pytestmark = pytest.mark.timeout(420)


@dataclass
class Rig:
    """The projects and rooms of a chaos test: demo (the IVR and echo DIDs; its webhooks to `hooks`) with a room
    for IVR callers, acme (dial-outs; its webhooks to `api_hooks`) with a room for its dial-outs."""

    tmp: Path
    data: Path
    hooks: Receiver
    api_hooks: Receiver
    acme: dict[str, Any]
    demo_room: dict[str, Any]
    acme_room: dict[str, Any]
    uas_port: int

    def config(self, extra: str = "") -> str:
        text = make_test_config(trunk_config(self.uas_port) + extra)
        return text.replace('notification_url = ""', f'notification_url = "{self.hooks.url}"', 1)

    def dial(self, http_port: int, count: int) -> list[str]:
        client = self.client(http_port)
        vids = []
        for i in range(count):
            status, body, _ = client("POST", f"/voice/v1/room/{self.acme_room['room_id']}/join",
                                     {"name": f"Far {i}", "owner_ref": f"chaos-{i}", "from": ACME_NUMBER,
                                      "to": f"1555123{random.randrange(1000, 9999)}"})
            assert status == 200 and body["state"] == "initiated", body
            vids.append(str(body["voice_id"]))
        return vids

    def remove(self, http_port: int, vids: list[str]) -> None:
        client = self.client(http_port)
        for vid in vids:
            status, body, _ = client("DELETE", f"/voice/v1/room/{self.acme_room['room_id']}/call/{vid}")
            assert status == 200 and body["state"] == "removed", (status, body)

    def client(self, http_port: int) -> VoiceClient:
        port = type("Port", (), {"http_port": http_port})()
        return VoiceClient(port, self.acme["app_id"], self.acme["app_key"])  # type: ignore[arg-type]

    def check(self, rows: list[Cdr], timeout: float = 60) -> None:
        """Every call's webhooks delivered, in order, signed (demo's and acme's receivers)."""
        demo = [r for r in rows if r.project == "demo"]
        acme = [r for r in rows if r.project == "acme"]
        assert len(demo) + len(acme) == len(rows), {r.project for r in rows}
        all_delivered(self.hooks, demo, timeout=timeout)
        all_delivered(self.api_hooks, acme, secret=self.acme["webhook_secret"], timeout=timeout)


def make_rig(tmp: Path, data: Path | None = None) -> Rig:
    data = data or tmp / "data"
    hooks, api_hooks = Receiver(), Receiver()
    hooks.set("up")
    api_hooks.set("up")
    acme = cli(data, "projects", "create", "--name", "acme", "--number", ACME_NUMBER, "--notification-url", api_hooks.url)
    acme_room = cli(data, "rooms", "create", "--name", "Board", "--project", "acme")
    demo_room = cli(data, "rooms", "create", "--name", "Standup")
    return Rig(tmp, data, hooks, api_hooks, acme, demo_room, acme_room, free_port())


def start_single(rig: Rig, env: dict[str, str] | None = None) -> Gateway:
    gw = start_gateway(rig.tmp, rig.config(), env={"GATEWAY_WEBHOOKS_MAX_BACKOFF_S": "4", **(env or {})})
    try:
        wait_until(lambda: '"prompts.ready"' in gw.log() and '"rooms.started"' in gw.log(), 120, "prompts and rooms")
    except AssertionError:
        stop_gateway(gw)
        raise
    return gw


def in_rooms(data: Path, since: float, count: int, timeout: float = 120) -> None:
    when(lambda: len(joined(data, since)) >= count, timeout, f"{count} calls in rooms")


def healthz(port: int) -> dict[str, Any] | None:
    try:
        return http_json(f"http://127.0.0.1:{port}/healthz")  # type: ignore[no-any-return]
    except OSError:
        return None


# -- 1. Redis
def start_cluster(rig: Rig, env: dict[str, str]) -> Cluster:
    return start_cluster_with(rig.tmp, rig.data, rig.config(), env)


def redis_keys(port: int, pattern: str) -> set[str]:
    out = subprocess.run(["redis-cli", "-p", str(port), "--scan", "--pattern", pattern], capture_output=True,
                         text=True, timeout=10)
    return set(out.stdout.split())


def test_redis_killed_and_restarted_under_load(tmp_path: Path) -> None:
    require_tools("sipp", "redis-server", "redis-cli", "kamailio", "janus")
    rig = make_rig(tmp_path)
    alarms = Receiver()
    alarms.set("up")
    redis_port = free_port()
    cluster = start_cluster(rig, {"GATEWAY_CLUSTER_REDIS_PORT": str(redis_port), "GATEWAY_CLUSTER_ALARM_URL": alarms.url,
                                  "GATEWAY_WEBHOOKS_MAX_BACKOFF_S": "4"})
    procs: list[subprocess.Popen[bytes]] = []
    w1, w2 = cluster.http_base, cluster.http_base + 1
    try:
        since = time.time()
        uas, uas_log = far_phones(rig.uas_port, 4, tmp_path)
        echo, echo_log = echo_callers(cluster.sip, tmp_path, 8, hold_ms=65000)
        ivr, ivr_log = ivr_callers(cluster.sip, tmp_path, rig.demo_room, 4, stay_ms=50000)
        procs += [uas, echo, ivr]
        vids = rig.dial(w1, 4)  # placed by w1; removed through w2 at the end (the registry says where they are)
        in_rooms(rig.data, since, 8)
        assert sum((healthz(p) or {}).get("active_calls", 0) for p in (w1, w2)) == 16

        # Redis hangs: every request times out (2 s); calls go on, new calls are taken
        (redis_pid,) = children(cluster.proc.pid, "redis-server")
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            hung, hung_log = echo_callers(cluster.sip, tmp_path, 6, hold_ms=2000, rate=3, tag="during-hang")
            procs.append(hung)
            noticed = when(lambda: all(not (healthz(p) or {"registry": {"connected": True}})["registry"]["connected"]
                                       for p in (w1, w2)), 20, "both workers to see Redis gone")
            finish(hung, hung_log, 60)
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        back = when(lambda: all((healthz(p) or {}).get("registry", {}).get("connected") for p in (w1, w2)), 20,
                    "both workers to see Redis back")
        print(f"\nRedis hung: both workers noticed in {noticed:.1f} s, recovered {back:.1f} s after SIGCONT")

        # Redis dies: the supervisor starts a new, empty one; the workers publish their calls again
        recoveries = {p: healthz(p)["registry"]["recoveries"] for p in (w1, w2)}  # type: ignore[index]
        os.kill(redis_pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(lambda: children(cluster.proc.pid, "redis-server") not in ([], [redis_pid]), 20, "a new redis-server")
        wait_until(lambda: all((h := healthz(p)) and h["registry"]["connected"] and h["registry"]["recoveries"] >
                               recoveries[p] for p in (w1, w2)), 20, "both workers to republish their calls")
        print(f"Redis killed: restarted, every live call published again after {time.monotonic() - killed:.1f} s")
        live = {r.voice_id for r in read_cdr(rig.data, since) if r.state != "disconnected"}
        listed = {k.split(":", 2)[2] for k in redis_keys(redis_port, "gw:call:*")}
        assert live <= listed, f"live calls missing from the registry: {live - listed}"
        after, after_log = echo_callers(cluster.sip, tmp_path, 6, hold_ms=2000, rate=3, tag="after-restart")
        procs.append(after)
        finish(after, after_log, 60)

        # the registry routes again: w2's API removes the calls w1 holds
        rig.remove(w2, vids)
        assert len(log_lines(cluster.log_path, "api.forwarded")) >= len(vids)
        finish(uas, uas_log, 60)
        # and the IVR resolves the meeting with the new Redis (the directory and the PIN limiter live there)
        ivr_after = time.time()
        again, again_log = ivr_callers(cluster.sip, tmp_path, rig.demo_room, 1, stay_ms=3000, tag="ivr-after")
        procs.append(again)
        finish(again, again_log, 90)
        finish(ivr, ivr_log, 120)
        finish(echo, echo_log, 120)
        # coda: Kamailio killed is started again, its forked workers taken along (they would keep the SIP port)
        kamailio_killed = time.time()
        (kamailio,) = children(cluster.proc.pid, "kamailio")
        os.kill(kamailio, signal.SIGKILL)
        wait_until(lambda: children(cluster.proc.pid, "kamailio") not in ([], [kamailio]), 20, "Kamailio restarted")
        later, later_log = echo_callers(cluster.sip, tmp_path, 2, hold_ms=1000, rate=2, tag="after-kamailio")
        procs.append(later)
        finish(later, later_log, 60)

        rows = all_closed(rig.data, since, 8 + 4 + 4 + 6 + 6 + 1 + 2)
        reasons = {r.voice_id: r.reason for r in rows}
        assert {reasons[v] for v in vids} == {"removed_by_api"}
        assert {r.reason for r in rows if r.voice_id not in vids} == {"remote_bye"}
        (after_redis,) = [r for r in rows if ivr_after <= r.started_at < kamailio_killed]  # the IVR caller after it
        assert "joined" in after_redis.states, after_redis
        rig.check(rows)
        # nothing left behind in Redis: no call entries, empty per-worker sets
        wait_until(lambda: not redis_keys(redis_port, "gw:call:*"), 10, "no gw:call:* left")
        assert all(not subprocess.run(["redis-cli", "-p", str(redis_port), "smembers", f"gw:worker:{w}:calls"],
                                      capture_output=True, text=True).stdout.strip() for w in ("w1", "w2"))
        # what the operator saw: a warning per worker, the helper restarted, an alarm
        assert len(log_lines(cluster.log_path, "registry.unavailable")) >= 2
        assert any(e.get("helper") == "redis" for e in log_lines(cluster.log_path, "supervisor.helper_restarted"))
        assert any(json.loads(body)["event"] == "helper_lost" and json.loads(body)["helper"] == "redis"
                   for _, body, _, _ in alarms.received)
    finally:
        for proc in procs:
            stop_process(proc, grace=5)
        stop_process(cluster.proc, signal.SIGINT, grace=30)
        for r in (rig.hooks, rig.api_hooks, alarms):
            r.stop()
    assert cluster.proc.returncode == 0, cluster.log()[-3000:]
    no_leftovers(rig.data)


# -- 2. the room service
def test_room_service_killed_and_restarted_under_load(tmp_path: Path) -> None:
    require_tools("sipp", "janus")
    rig = make_rig(tmp_path)
    gw = start_single(rig)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        since = time.time()
        uas, uas_log = far_phones(rig.uas_port, 3, tmp_path)
        echo, echo_log = echo_callers(gw.sip, tmp_path, 6, hold_ms=45000)
        ivr, ivr_log = ivr_callers(gw.sip, tmp_path, rig.demo_room, 5, stay_ms=120000, end="gateway")
        procs += [uas, echo, ivr]
        vids = rig.dial(gw.http_port, 3)
        in_rooms(rig.data, since, 8)

        (rooms_pid,) = children(gw.proc.pid, "rooms serve")
        os.kill(rooms_pid, signal.SIGKILL)
        killed = time.monotonic()
        # every phone in a room hears the notice and gets a BYE: the IVR callers and the far phone finish
        finish(ivr, ivr_log, 60)
        finish(uas, uas_log, 60)
        ended = time.monotonic() - killed
        # `gateway run` starts the room service again; a caller joins the same room at once
        wait_until(lambda: children(gw.proc.pid, "rooms serve") not in ([], [rooms_pid])
                   and healthz(gw.rooms_port) is not None, 30, "the room service restarted")
        restarted = time.monotonic() - killed
        again, again_log = ivr_callers(gw.sip, tmp_path, rig.demo_room, 1, stay_ms=3000, tag="ivr-after")
        procs.append(again)
        finish(again, again_log, 90)
        print(f"\nroom service killed: 8 phones in rooms ended in {ended:.1f} s, service back in {restarted:.1f} s")
        finish(echo, echo_log, 90)  # untouched: every echo call ended by its caller

        rows = all_closed(rig.data, since, 6 + 5 + 3 + 1)
        by_reason: dict[str | None, int] = {}
        for r in rows:
            by_reason[r.reason] = by_reason.get(r.reason, 0) + 1
        assert by_reason == {"room_disconnected": 8, "remote_bye": 7}, by_reason
        assert {r.reason for r in rows if r.voice_id in vids} == {"room_disconnected"}
        last = max(rows, key=lambda r: r.started_at)
        assert "joined" in last.states and last.reason == "remote_bye", last.states
        rig.check(rows)
        assert any(e.get("helper") == "rooms" for e in log_lines(gw.log_path, "supervisor.helper_restarted"))
        assert not log_lines(gw.log_path, "janus.place_failed"), "the restarted service could not re-open the room"
    finally:
        for proc in procs:
            stop_process(proc, grace=5)
        stop_gateway(gw)
        rig.hooks.stop()
        rig.api_hooks.stop()
    no_leftovers(rig.data)  # the restarted room service too


# -- 3. the CDR disk
@contextlib.contextmanager
def small_disk(where: Path, size_mb: int) -> Iterator[Path]:
    """An ext4 of `size_mb` (no reserved blocks) loop-mounted at `where`; unmounted and deleted afterwards."""
    image = where.with_suffix(".img")
    with image.open("wb") as f:
        f.truncate(size_mb << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True, capture_output=True, timeout=60)
    where.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(where)], capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        image.unlink()
        require(False, f"cannot loop-mount a filesystem here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        for target in (where / "cdr.sqlite", where / "cdr.sqlite-wal"):
            subprocess.run(["chattr", "-i", str(target)], capture_output=True)
        if subprocess.run(["umount", str(where)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)
        image.unlink(missing_ok=True)


def fill(disk: Path) -> Path:
    """Take every free block of `disk` (1 MiB writes, then 4 KiB, then 512 B ones) with one file; returns it."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 4096, 512):
            block = b"\0" * chunk
            while True:
                try:
                    os.write(fd, block)
                except OSError:
                    break
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
    return filler


def truncate_wal(data: Path) -> None:
    """Checkpoint the CDR's WAL and truncate it (while the disk has room), so the gateway's next writes need new
    blocks: with the disk then full they fail at once instead of reusing the WAL's old space for a while."""
    db = sqlite3.connect(data / "cdr.sqlite", timeout=10)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


def test_cdr_disk_full_then_read_only_under_load(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "needs root: mounts a small filesystem as the data directory")
    require_tools("sipp", "janus", "mkfs.ext4", "chattr", "mount", "umount")
    with small_disk(tmp_path / "data", 64) as data:
        rig = make_rig(tmp_path, data)
        alarms = Receiver()
        alarms.set("up")
        gw = start_single(rig, {"GATEWAY_CLUSTER_ALARM_URL": alarms.url})
        procs: list[subprocess.Popen[bytes]] = []

        def cdr_ok() -> bool | None:
            h = healthz(gw.http_port)
            return None if h is None else bool(h["cdr"]["ok"])

        def alarm_events() -> list[str]:
            return [json.loads(body)["event"] for _, body, _, _ in list(alarms.received)]

        try:
            since = time.time()
            uas, uas_log = far_phones(rig.uas_port, 2, tmp_path)
            echo, echo_log = echo_callers(gw.sip, tmp_path, 6, hold_ms=70000)
            ivr, ivr_log = ivr_callers(gw.sip, tmp_path, rig.demo_room, 4, stay_ms=55000)
            procs += [uas, echo, ivr]
            vids = rig.dial(gw.http_port, 2)
            in_rooms(rig.data, since, 6)

            # the disk fills up: new calls are taken and go as scripted while the CDR waits in memory
            truncate_wal(data)
            filler = fill(data)
            full, full_log = echo_callers(gw.sip, tmp_path, 10, hold_ms=1500, rate=1, tag="disk-full")
            procs.append(full)
            failed_in = when(lambda: cdr_ok() is False, 45, "the CDR store to report the full disk")
            wait_until(lambda: "cdr_unwritable" in alarm_events(), 10, "the cdr_unwritable alarm")
            assert metric(gw.http_port, "gateway_cdr_writable") == 0
            assert log_lines(gw.log_path, "cdr.write_failed")[0]["level"] == "error"
            finish(full, full_log, 60)
            buffered = healthz(gw.http_port)["cdr"]["buffered"]  # type: ignore[index]
            assert buffered > 0
            # room again: it catches up
            filler.unlink()
            caught_up = when(lambda: cdr_ok() and healthz(gw.http_port)["cdr"]["buffered"] == 0, 30,  # type: ignore[index]
                             "the CDR store to catch up")
            wait_until(lambda: "cdr_recovered" in alarm_events(), 10, "the cdr_recovered alarm")
            print(f"\ndisk full: failure seen in {failed_in:.1f} s, {buffered} entries held, caught up in "
                  f"{caught_up:.1f} s after space came back")

            # the CDR files turn read-only (immutable): the same
            for name in ("cdr.sqlite", "cdr.sqlite-wal"):
                subprocess.run(["chattr", "+i", str(data / name)], check=True, timeout=10)
            try:
                ro, ro_log = echo_callers(gw.sip, tmp_path, 6, hold_ms=1500, rate=2, tag="read-only")
                procs.append(ro)
                when(lambda: cdr_ok() is False, 30, "the CDR store to report the read-only files")
                finish(ro, ro_log, 60)
            finally:
                for name in ("cdr.sqlite", "cdr.sqlite-wal"):
                    subprocess.run(["chattr", "-i", str(data / name)], check=True, timeout=10)
            when(lambda: cdr_ok() and healthz(gw.http_port)["cdr"]["buffered"] == 0, 30, "caught up again")  # type: ignore[index]
            wait_until(lambda: alarm_events().count("cdr_recovered") == 2, 10, "the second cdr_recovered alarm")
            assert alarm_events() == ["cdr_unwritable", "cdr_recovered"] * 2

            rig.remove(gw.http_port, vids)
            finish(uas, uas_log, 60)
            finish(ivr, ivr_log, 120)
            finish(echo, echo_log, 120)
            rows = all_closed(rig.data, since, 6 + 4 + 2 + 10 + 6)
            assert {r.reason for r in rows if r.voice_id not in vids} == {"remote_bye"}
            assert {r.reason for r in rows if r.voice_id in vids} == {"removed_by_api"}
            assert healthz(gw.http_port)["cdr"]["dropped"] == 0  # type: ignore[index]
            rig.check(rows)
        finally:
            for proc in procs:
                stop_process(proc, grace=5)
            stop_gateway(gw)
            for r in (rig.hooks, rig.api_hooks, alarms):
                r.stop()
            no_leftovers(data)
        assert not log_lines(gw.log_path, "cdr.lost_at_stop")


# -- 4. the webhook receiver
def test_webhook_receiver_slow_then_down_under_load(tmp_path: Path) -> None:
    require_tools("sipp", "janus")
    rig = make_rig(tmp_path)
    # 4 POSTs in flight at most (2 per receiver): acme's five calls are more than its share
    gw = start_single(rig, {"GATEWAY_WEBHOOKS_CONCURRENCY": "4", "GATEWAY_WEBHOOKS_TIMEOUT_S": "5"})
    procs: list[subprocess.Popen[bytes]] = []
    try:
        rig.api_hooks.set("slow")  # 30 s per request: every attempt times out at webhooks.timeout_s
        since = time.time()
        uas, uas_log = far_phones(rig.uas_port, 5, tmp_path)
        echo, echo_log = echo_callers(gw.sip, tmp_path, 6, hold_ms=40000)
        ivr, ivr_log = ivr_callers(gw.sip, tmp_path, rig.demo_room, 4, stay_ms=20000)
        procs += [uas, echo, ivr]
        vids = rig.dial(gw.http_port, 5)
        in_rooms(rig.data, since, 9)
        # the other project's webhooks are not held up: every demo call's events so far have arrived
        demo = [r for r in read_cdr(rig.data, since) if r.project == "demo"]
        wait_until(lambda: all(rig.hooks.states(r.voice_id) == r.expected_hooks()[:-1] for r in demo), 15,
                   "the demo project's webhooks while acme's receiver is slow")
        assert rig.api_hooks.count("slow") >= 2 and log_lines(gw.log_path, "webhook.retry")
        rig.remove(gw.http_port, vids)
        finish(uas, uas_log, 60)
        rig.api_hooks.set("down")
        downed = time.monotonic()
        finish(ivr, ivr_log, 120)
        wait_until(lambda: time.monotonic() - downed > 15, 20, "15 s with the receiver down")
        rig.api_hooks.set("up")
        finish(echo, echo_log, 90)
        rows = all_closed(rig.data, since, 6 + 4 + 5)
        assert {r.reason for r in rows if r.voice_id in vids} == {"removed_by_api"}
        assert {r.reason for r in rows if r.voice_id not in vids} == {"remote_bye"}
        rig.check(rows, timeout=90)
        attempts = rig.api_hooks.count()
        events = sum(len(rig.api_hooks.events(v)) for v in vids)
        print(f"\nslow then down: {events} acme events delivered in order after {attempts} POSTs "
              f"({rig.api_hooks.count('slow')} to the slow receiver)")
        assert not log_lines(gw.log_path, "webhook.expired")
    finally:
        for proc in procs:
            stop_process(proc, grace=5)
        stop_gateway(gw)
        rig.hooks.stop()
        rig.api_hooks.stop()
    no_leftovers(rig.data)
