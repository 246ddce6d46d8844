"""`gateway run --workers N`: N worker processes behind Kamailio, sharing a call registry in Redis.

The supervisor starts, in order: Redis (unless cluster.redis_url names one), the embedded room service,
the workers (worker i: SIP on cluster.worker_sip_port + i, HTTP on http.port + i, its own
slice of the RTP range), and Kamailio on sip.host:sip.port with the workers as its dispatcher set. Then,
once a second, it reads every worker's /healthz and:

- a worker that exits non-zero (crash, kill -9) is *lost*: its calls are closed in the CDR and dropped from
  the registry with reason `worker_lost`, an alarm is posted, and it is started again;
- a worker that exits 0 has drained (`gateway drain NAME`, or an idle extra the supervisor retired): it
  leaves the dispatcher set and is not restarted;
- when every worker holds cluster.scale_up_load % of sip.max_calls, or the new-call rate per worker passes
  cluster.scale_up_rate, another worker is started (up to cluster.max_workers); an added worker idle for
  cluster.scale_idle_s is drained. Each of these posts an alarm event to cluster.alarm_url.

Its helpers (Redis, the room service, Kamailio) are kept running (`KeptProcess`): one that exits is started
again after 1 s (doubling to 30 s while it keeps failing within 10 s of its start), with an error line and a
`helper_lost` alarm. A restarted Redis is empty: each worker publishes its calls again (cluster.registry). A
restarted room service has forgotten its rooms: the phones it had are ended with a notice (`room_disconnected`,
rooms.connector) and callers can dial in again at once. The single-process `gateway run` keeps its room service
the same way.

SIGTERM drains every worker (calls finish, up to cluster.drain_timeout_s) and then stops the rest;
SIGINT stops at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp

from .. import log, tls
from ..api.webhooks import encode, lost_call_event
from ..config import Config
from ..store import cdr
from ..store.cdr import CdrStore
from ..store.projects import ProjectStore
from .janus import JanusProcess, JanusSecrets, supervise_janus
from .registry import client, forget_worker, sweep_expired

logger = logging.getLogger("gateway.supervisor")
TEMPLATE = Path(__file__).resolve().parents[2] / "config" / "kamailio" / "kamailio.cfg.tmpl"
MODULES = "/usr/lib/x86_64-linux-gnu/kamailio/modules/"
RESTART_DELAY_S = 1.0
HELPER_MAX_DELAY_S = 30.0  # a helper that keeps dying within HELPER_STABLE_S of its start waits this long at most
HELPER_STABLE_S = 10.0
HUNG_AFTER_S = 10.0  # a worker whose /healthz has not answered for this long is killed (then handled as lost)
SCALE_COOLDOWN_S = 10.0


@dataclass
class Slot:
    index: int
    sip_port: int
    http_port: int
    rtp: tuple[int, int]
    extra: bool = False  # started by the autoscaler
    proc: asyncio.subprocess.Process | None = None
    state: str = "stopped"  # starting | up | draining | restarting (lost, coming back) | stopped
    active: int = 0
    started_calls: int = 0
    idle_since: float = field(default_factory=time.monotonic)
    healthy_at: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return f"w{self.index + 1}"


def die_with_parent() -> None:
    """preexec_fn for children: Linux sends them SIGTERM if this process dies, even by SIGKILL."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class KeptProcess:
    """A helper process kept running: started now, started again whenever it exits until `terminate()` or
    `kill()`, after RESTART_DELAY_S (doubling up to HELPER_MAX_DELAY_S while it keeps dying within
    HELPER_STABLE_S of its start). A thread waits on it (the single-process `gateway run` has its event loop busy
    with the worker); `on_exit(name, code)` is called from that thread. It answers as a `subprocess.Popen` does
    (pid, poll, terminate, wait, kill), so an owner can hold it where it held a Popen; `poll()` is None until it
    is terminated (between a crash and its restart it still counts as running). `group`: the helper forks
    children of its own (Kamailio): it runs in a process group of its own, and whatever is left of the group when
    its first process exits is killed (else they keep its ports and its successor cannot start)."""

    def __init__(self, name: str, cmd: list[str], logfile: Path | None = None, env: dict[str, str] | None = None,
                 on_exit: Callable[[str, int], None] | None = None, group: bool = False) -> None:
        self.name, self.cmd, self.env, self.on_exit, self.group = name, cmd, env, on_exit, group
        self.logfile = logfile
        self.restarts = 0
        self._out: IO[bytes] | None = logfile.open("ab") if logfile else None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._proc = self._start()
        self._thread = threading.Thread(target=self._watch, name=f"keep-{name}", daemon=True)
        self._thread.start()

    def _start(self) -> subprocess.Popen[bytes]:
        # started by the thread that waits on it: PR_SET_PDEATHSIG follows the creating thread, which lives
        # as long as the child does (the first start: the owner's thread)
        return subprocess.Popen(self.cmd, stdout=self._out, stderr=subprocess.STDOUT if self._out else None,
                                env=self.env, preexec_fn=die_with_parent, start_new_session=self.group)

    def _signal(self, proc: subprocess.Popen[bytes], sig: int) -> None:
        """`sig` to the helper (its whole group when it has one; what is left of it after its first process died)."""
        try:
            if self.group:
                os.killpg(proc.pid, sig)
            elif proc.poll() is None:
                proc.send_signal(sig)
        except ProcessLookupError:
            pass

    @property
    def pid(self) -> int:
        return self._proc.pid

    def _watch(self) -> None:
        delay = RESTART_DELAY_S
        while True:
            proc, started = self._proc, time.monotonic()
            code = proc.wait()
            self._signal(proc, signal.SIGKILL)  # its orphans (a group's): none may outlive it
            if self._stop.is_set():
                return
            delay = RESTART_DELAY_S if time.monotonic() - started > HELPER_STABLE_S else min(HELPER_MAX_DELAY_S,
                                                                                               delay * 2)
            log.event(logger, "supervisor.helper_exited", logging.ERROR, helper=self.name, pid=proc.pid, code=code,
                      restart_in_s=delay)
            if self.on_exit is not None:
                try:
                    self.on_exit(self.name, code)
                except Exception:  # noqa: BLE001 - the restart matters more than the report
                    logger.exception("supervisor.helper_report_failed")
            if self._stop.wait(delay):
                return
            with self._lock:
                if self._stop.is_set():
                    return
                self._proc = self._start()
            self.restarts += 1
            log.event(logger, "supervisor.helper_restarted", logging.WARNING, helper=self.name, pid=self._proc.pid,
                      restarts=self.restarts)

    def poll(self) -> int | None:
        return self._proc.poll() if self._stop.is_set() else None

    def terminate(self) -> None:
        with self._lock:
            self._stop.set()
            if self._proc.poll() is None:
                self._signal(self._proc, signal.SIGTERM)

    def kill(self) -> None:
        with self._lock:
            self._stop.set()
            self._signal(self._proc, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        """After terminate()/kill(): the exit code (subprocess.TimeoutExpired after `timeout` seconds)."""
        code = self._proc.wait(timeout)
        self._signal(self._proc, signal.SIGKILL)  # what the group left behind
        self._thread.join(timeout)
        if self._out is not None:
            self._out.close()
        return code


def kamailio_files(config: Config, slots: list[Slot], run_dir: Path) -> tuple[str, str]:
    """(kamailio.cfg, dispatcher.list) for the workers in `slots`. With "tls" in sip.transports, Kamailio
    terminates SIP over TLS on sip.tls_port (its tls module, `kamailio_tls_file`) and the workers stay on UDP."""
    sip = config.sip
    listen = "\n".join(f"listen={t}:{sip.host}:{sip.port}" for t in sip.transports if t != "tls")
    tls_module = client_names = ""
    if "tls" in sip.transports:
        listen += f"\nlisten=tls:{sip.host}:{sip.tls_port}\nenable_tls=yes"
        tls_module = f'loadmodule "tls.so"\nmodparam("tls", "config", "{run_dir / "tls.cfg"}")'
        # a verified client certificate's names (its first DNS and IP subjectAltNames, its common name), for the
        # workers' per-trunk mutual TLS; nothing when there is none (or it did not verify)
        client_names = ('    if ($pr == "tls" && $tls_peer_verified == 1) {\n'
                        '        append_hf("X-Gateway-Client-Names: $tls_peer_san_hostname,$tls_peer_san_ip,'
                        '$tls_peer_subject_cn\\r\\n");\n    }')
    values = {"DEBUG": "1", "CHILDREN": "4", "LISTEN": listen, "HOST": sip.host, "PORT": str(sip.port),
              "MODULES": MODULES, "CTL_SOCKET": str(run_dir / "kamailio.ctl"), "FR_TIMER_MS": "1000",
              "DISPATCHER_LIST": str(run_dir / "dispatcher.list"), "PING_INTERVAL_S": "2",
              "TLS_MODULE": tls_module, "TLS_CLIENT_NAMES": client_names}
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    dispatcher = "".join(f"1 sip:{sip.host}:{s.sip_port} 0 0\n" for s in slots)
    return text, dispatcher or "\n"


def kamailio_tls_file(config: Config) -> str:
    """Kamailio's tls.cfg: our certificate and key, TLS 1.2 and later; client certificates asked for and verified
    against sip.tls_client_ca when it is set (one is not required: the workers decide per trunk)."""
    sip = config.sip
    lines = ["[server:default]", "method = TLSv1.2+", f"certificate = {sip.tls_cert}", f"private_key = {sip.tls_key}",
             "require_certificate = no"]
    if sip.tls_client_ca:
        lines += ["verify_certificate = yes", f"ca_list = {sip.tls_client_ca}"]
    else:
        lines += ["verify_certificate = no"]
    lines += ["", "[client:default]", "method = TLSv1.2+", "verify_certificate = yes", "require_certificate = yes"]
    return "\n".join(lines) + "\n"


class Supervisor:
    def __init__(self, config: Config, config_path: Path | None, workers: int) -> None:
        self.config = config
        self.config_path = config_path
        cl = config.cluster
        self.base = workers
        self.data = config.data_dir.resolve()
        self.run_dir = self.data / "cluster"
        lo, hi = config.rtp.port_min, config.rtp.port_max
        width = (hi - lo + 1) // cl.max_workers // 2 * 2
        if width < 20:
            raise ValueError(f"rtp range {lo}-{hi} is too small for {cl.max_workers} workers")
        self.slots = [Slot(i, cl.worker_sip_port + i, config.http.port + i, (lo + i * width, lo + (i + 1) * width - 2))
                      for i in range(cl.max_workers)]
        self.redis_url = cl.redis_url or f"redis://127.0.0.1:{cl.redis_port}/0"
        self.helpers: dict[str, KeptProcess] = {}
        self.stopping = False
        self.cdr: CdrStore | None = None
        self.redis: Any = None
        self.http: aiohttp.ClientSession | None = None
        self.last_scale = 0.0
        self._listed: list[int] = []
        self._dirty = False
        self.last_max_alarm = 0.0
        self._tasks: list[asyncio.Task[None]] = []
        self.janus: JanusProcess | None = None  # the rooms' media server, when we run it

    # -- helpers: redis-server, the room service, kamailio
    def _spawn(self, name: str, cmd: list[str], logfile: Path | None = None,
               env: dict[str, str] | None = None, group: bool = False) -> KeptProcess:
        loop = asyncio.get_running_loop()

        def exited(helper: str, code: int) -> None:  # from the helper's watcher thread
            if not self.stopping:
                loop.call_soon_threadsafe(self._helper_lost, helper, code)

        proc = KeptProcess(name, cmd, logfile, env, on_exit=exited, group=group)
        self.helpers[name] = proc
        log.event(logger, "supervisor.helper_started", helper=name, pid=proc.pid, log=str(logfile or "-"))
        return proc

    def _helper_lost(self, helper: str, code: int) -> None:
        task = asyncio.get_running_loop().create_task(self.alarm("helper_lost", "", helper=helper,
                                                                 reason=f"exit code {code}"))
        self._tasks.append(task)

    async def _wait_for(self, what: str, check: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await check():
                return
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{what} did not come up within {timeout:.0f} s (see {self.run_dir})")

    async def _start_redis(self) -> None:
        if not self.config.cluster.redis_url:
            if shutil.which("redis-server") is None:
                raise RuntimeError("redis-server not found: install the Debian package redis-server, or set cluster.redis_url")
            port = str(self.config.cluster.redis_port)
            self._spawn("redis", ["redis-server", "--bind", "127.0.0.1", "--port", port, "--save", "", "--appendonly",
                                  "no", "--daemonize", "no", "--dir", str(self.run_dir)], self.run_dir / "redis.log")
        self.redis = client(self.redis_url)

        async def pong() -> bool:
            try:
                return bool(await self.redis.ping())
            except Exception:  # noqa: BLE001 - not up yet
                return False

        await self._wait_for("redis", pong)

    def _start_rooms(self) -> None:
        if not self.config.room_service.embedded:
            return
        http = self.config.http
        cmd = [sys.executable, "-m", "gateway", "rooms", "serve", "--data-dir", str(self.data),
               "--port", str(self.config.room_service.port),
               "--voice-api-url", self.config.room_service.voice_api_url
               or f"{tls.scheme(http.tls_cert)}://{http.host}:{self.slots[0].http_port}"]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        self._spawn("rooms", cmd, env={**os.environ, "GATEWAY_CLUSTER_REDIS_URL": self.redis_url})

    async def _start_kamailio(self) -> None:
        if not self.config.cluster.kamailio:
            return
        if shutil.which("kamailio") is None:
            raise RuntimeError("kamailio not found: install the Debian package kamailio, or set cluster.kamailio = false")
        self._write_kamailio()
        cmd = ["kamailio", "-DD", "-E", "-f", str(self.run_dir / "kamailio.cfg"), "-Y", str(self.run_dir),
               "-P", str(self.run_dir / "kamailio.pid"), "-w", str(self.run_dir), "-m", "64", "-M", "8"]
        self._spawn("kamailio", cmd, self.run_dir / "kamailio.log", group=True)  # it forks its workers

        async def answers() -> bool:
            return self._kamcmd("core.version") is not None

        await self._wait_for("kamailio", answers)

    def _members(self) -> list[Slot]:
        """The dispatcher set: workers that answered /healthz, and lost ones being restarted (Kamailio's OPTIONS
        probing marks them inactive until they answer again); a drained or retired one leaves."""
        return [s for s in self.slots if s.state in ("up", "draining", "restarting")]

    def _write_kamailio(self) -> None:
        cfg, dispatcher = kamailio_files(self.config, self._members(), self.run_dir)
        if "tls" in self.config.sip.transports:
            (self.run_dir / "tls.cfg").write_text(kamailio_tls_file(self.config))
        (self.run_dir / "kamailio.cfg").write_text(cfg)
        (self.run_dir / "dispatcher.list").write_text(dispatcher)
        self._listed = [s.sip_port for s in self._members()]

    def _kamcmd(self, *args: str) -> str | None:
        sock = self.run_dir / "kamailio.ctl"
        if not sock.exists():
            return None
        try:
            out = subprocess.run(["kamcmd", "-s", f"unix:{sock}", *args], capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    def _reload_dispatcher(self) -> None:
        """Tell Kamailio about a changed worker set; retried on the next poll if it refuses (reload_delta)."""
        if "kamailio" not in self.helpers or [s.sip_port for s in self._members()] == self._listed and not self._dirty:
            return
        self._write_kamailio()
        self._dirty = self._kamcmd("dispatcher.reload") is None
        if self._dirty:
            log.event(logger, "supervisor.dispatcher_reload_deferred", logging.INFO)
        else:
            log.event(logger, "supervisor.dispatcher_reloaded", workers=[s.name for s in self._members()])

    # -- workers
    def _worker_cmd(self, slot: Slot) -> list[str]:
        cmd = [sys.executable, "-m", "gateway", "run", "--cluster-child", "--no-rooms", "--name", slot.name,
               "--sip-host", self.config.sip.host, "--sip-port", str(slot.sip_port), "--http-port", str(slot.http_port),
               "--rtp-ports", f"{slot.rtp[0]}-{slot.rtp[1]}", "--data-dir", str(self.data)]
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        return cmd

    async def _start_worker(self, slot: Slot) -> None:
        sources = json.dumps(sorted(set(self.config.cluster.lb_sources) | {self.config.sip.host}))
        env = {**os.environ, "GATEWAY_CLUSTER_REDIS_URL": self.redis_url, "GATEWAY_CLUSTER_LB_SOURCES": sources,
               **({"GATEWAY_CLUSTER_LB_TLS_HEADERS": "true"} if self.config.cluster.kamailio else {})}
        slot.proc = await asyncio.create_subprocess_exec(*self._worker_cmd(slot), env=env, preexec_fn=die_with_parent)
        slot.state, slot.active, slot.started_calls, slot.idle_since = "starting", 0, 0, time.monotonic()
        log.event(logger, "supervisor.worker_started", worker=slot.name, pid=slot.proc.pid, sip_port=slot.sip_port,
                  http_port=slot.http_port, extra=slot.extra)
        self._tasks.append(asyncio.get_running_loop().create_task(self._watch(slot, slot.proc)))

    async def _health(self, slot: Slot) -> dict[str, Any] | None:
        assert self.http is not None
        try:
            http = self.config.http
            async with self.http.get(f"{tls.scheme(http.tls_cert)}://{http.host}:{slot.http_port}/healthz",
                                     **tls.internal(http.tls_cert)) as r:
                return await r.json() if r.status == 200 else None  # type: ignore[no-any-return]
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def _watch(self, slot: Slot, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if slot.proc is not proc:
            return
        was = slot.state
        slot.proc = None
        if code == 0 or self.stopping:
            slot.state = "stopped"
            self._reload_dispatcher()
            log.event(logger, "supervisor.worker_stopped", worker=slot.name, code=code, was=was)
            if not self.stopping:
                await self.alarm("worker_retired", slot.name, reason="drained")
            return
        slot.state = "restarting"
        await self._worker_lost(slot, code)
        await asyncio.sleep(RESTART_DELAY_S)
        if not self.stopping and slot.state == "restarting":
            await self._start_worker(slot)

    async def _worker_lost(self, slot: Slot, code: int) -> None:
        """Close what the dead worker held: Kamailio stops choosing it at once (not after a timeout), the
        registry stops routing API requests to it, then the CDR and the webhooks."""
        if "kamailio" in self.helpers:  # OPTIONS probing marks it active again once it is back
            await asyncio.to_thread(self._kamcmd, "dispatcher.set_state", "ip", "1",
                                    f"sip:{self.config.sip.host}:{slot.sip_port}")
        calls: list[str] = []
        try:
            calls = await forget_worker(self.redis, slot.name)
        except Exception as exc:  # noqa: BLE001 - the CDR must still be closed
            log.event(logger, "supervisor.registry_error", logging.ERROR, error=str(exc))
        assert self.cdr is not None
        closed = await asyncio.to_thread(self.cdr.close_stale, "worker_lost", slot.name)
        notified = await asyncio.to_thread(self._notify_lost, slot.name, closed)
        log.event(logger, "supervisor.worker_lost", logging.ERROR, worker=slot.name, code=code,
                  registry_calls=len(calls), cdr_calls=len(closed), webhooks=notified)
        await self.alarm("worker_lost", slot.name, reason=f"exit code {code}", calls=len(closed))

    def _notify_lost(self, worker: str, voice_ids: list[str]) -> int:
        """Queue each lost call's last webhook into the lost worker's outbox (sent once it is back)."""
        assert self.cdr is not None
        store = ProjectStore(self.data)
        count = 0
        try:
            for voice_id in voice_ids:
                call = cdr.get_call(self.data, voice_id)
                project = store.by_name(str(call.get("project") or "")) if call else None
                if call is None or project is None:
                    continue
                initiated: dict[str, Any] = next((e for e in call["events"] if e["state"] == "initiated"), {})
                # the outbox keeps the call's URL whole (the CDR event has it without credentials)
                url = self.cdr.webhook_url(voice_id) or initiated.get("event_url") or project.notification_url
                if not url:
                    continue
                event_id, body = encode(lost_call_event(call))
                self.cdr.outbox_add(event_id, voice_id, project.name, url, body, time.time(), worker=worker)
                count += 1
        finally:
            store.close()
        self.cdr.flush()
        return count

    async def alarm(self, event: str, worker: str, **data: Any) -> None:
        url = self.config.cluster.alarm_url
        body = {"event": event, "worker": worker, "timestamp": time.time(),
                "workers": sum(1 for s in self.slots if s.state in ("starting", "up")), **data}
        log.event(logger, f"alarm.{event}", logging.WARNING, worker=worker, **data)
        if not url or self.http is None:
            return
        try:
            async with self.http.post(url, json=body) as r:
                await r.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.event(logger, "alarm.undelivered", logging.WARNING, event=event, error=str(exc)[:200])

    # -- once a second: health, dispatcher set, autoscaling
    async def _poll(self) -> None:
        last = time.monotonic()
        while not self.stopping:
            await asyncio.sleep(1.0)
            now = time.monotonic()
            elapsed, last = now - last, now
            new_calls = 0
            changed = False
            for slot in self.slots:
                if slot.state not in ("starting", "up", "draining"):
                    continue
                health = await self._health(slot)
                if health is None:
                    if slot.state != "starting" and now - slot.healthy_at > HUNG_AFTER_S and slot.proc is not None:
                        log.event(logger, "supervisor.worker_hung", logging.ERROR, worker=slot.name,
                                  silent_s=round(now - slot.healthy_at))
                        slot.proc.kill()  # its watcher handles it as lost: calls closed, restarted
                    continue
                slot.healthy_at = now
                if slot.state == "starting":
                    slot.state, changed = "up", True
                if health.get("status") == "draining" and slot.state != "draining":
                    slot.state, changed = "draining", True
                started = int(health.get("calls_started", 0))
                new_calls += max(0, started - slot.started_calls)
                slot.started_calls, slot.active = started, int(health.get("active_calls", 0))
                if slot.active:
                    slot.idle_since = now
            if changed or self._dirty:
                self._reload_dispatcher()
            await self._sweep_remote()
            await self._autoscale(new_calls / elapsed if elapsed > 0 else 0.0, now)

    async def _sweep_remote(self) -> None:
        """Workers of other hosts whose heartbeat stopped: their calls leave the registry (their own host's
        CDR is theirs to close)."""
        local = {s.name for s in self.slots}
        try:
            gone = await sweep_expired(self.redis)
        except Exception as exc:  # noqa: BLE001 - next second
            log.event(logger, "supervisor.registry_error", logging.WARNING, error=str(exc)[:200])
            return
        for name, calls in gone.items():
            if name not in local:
                await self.alarm("worker_lost", name, reason="heartbeat stopped", calls=len(calls))

    async def _autoscale(self, rate: float, now: float) -> None:
        cl = self.config.cluster
        up = [s for s in self.slots if s.state == "up"]
        if not up or now - self.last_scale < SCALE_COOLDOWN_S:
            return
        load_limit = self.config.sip.max_calls * cl.scale_up_load / 100
        busy = all(s.active >= load_limit for s in up)
        fast = rate / len(up) > cl.scale_up_rate
        if busy or fast:
            free = next((s for s in self.slots if s.state == "stopped"), None)
            if free is None:
                if now - self.last_max_alarm > 60:
                    self.last_max_alarm = now
                    await self.alarm("at_max_workers", "", reason="load" if busy else "call_rate", rate=round(rate, 1))
                return
            self.last_scale = now
            free.extra = True
            await self._start_worker(free)
            await self.alarm("worker_started", free.name, reason="load" if busy else "call_rate", rate=round(rate, 1))
            return
        for slot in up:
            if slot.extra and slot.active == 0 and now - slot.idle_since > cl.scale_idle_s and slot.proc is not None:
                self.last_scale = now
                slot.state = "draining"
                self._reload_dispatcher()
                slot.proc.send_signal(signal.SIGTERM)
                log.event(logger, "supervisor.worker_retiring", worker=slot.name, idle_s=round(now - slot.idle_since))
                return

    # -- life
    async def run(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        stop, drain = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, stop.set)
        loop.add_signal_handler(signal.SIGTERM, lambda: stop.set() if drain.is_set() else drain.set())
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        self.cdr = CdrStore(self.data, worker="supervisor")
        try:
            await self._start_redis()
            secrets = JanusSecrets.load(self.config)  # once, before the workers and the room service read them
            if self.config.room_service.embedded and self.config.janus.is_managed:
                self.janus = JanusProcess(self.config, secrets)
                self._tasks.append(await supervise_janus(self.janus))
            for slot in self.slots[: self.base]:
                await self._start_worker(slot)
            self._start_rooms()
            for slot in self.slots[: self.base]:
                await self._wait_for(f"worker {slot.name}", lambda s=slot: self._health_ok(s), 60)
                slot.state = "up"
            await self._start_kamailio()
            sip = self.config.sip
            log.event(logger, "supervisor.started", sip=f"{sip.host}:{sip.port}", workers=self.base,
                      max_workers=self.config.cluster.max_workers, redis=self.redis_url.split("@")[-1],
                      kamailio=self.config.cluster.kamailio)
            self._tasks.append(loop.create_task(self._poll()))
            waits = [loop.create_task(stop.wait()), loop.create_task(drain.wait())]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            await self.shutdown(graceful=drain.is_set() and not stop.is_set(), stop=stop)
        finally:
            self.stopping = True
            for task in self._tasks:
                task.cancel()
            if self.janus is not None:
                await self.janus.stop()
            await self._stop_workers_now()  # a failed start-up leaves none behind
            self._stop_helpers()
            if self.redis is not None:
                await self.redis.aclose()
            await self.http.close()
            self.cdr.close()
            log.event(logger, "supervisor.stopped")

    async def _health_ok(self, slot: Slot) -> bool:
        if slot.proc is None or slot.proc.returncode is not None:
            raise RuntimeError(f"worker {slot.name} exited during start-up")
        return await self._health(slot) is not None

    async def shutdown(self, graceful: bool, stop: asyncio.Event) -> None:
        """Graceful: every worker drains (SIGTERM); a SIGINT meanwhile stops them at once."""
        self.stopping = True
        procs = [s.proc for s in self.slots if s.proc is not None]
        log.event(logger, "supervisor.stopping", graceful=graceful, workers=len(procs))
        for proc in procs:
            proc.send_signal(signal.SIGTERM if graceful else signal.SIGINT)
        waiting: asyncio.Future[Any] = asyncio.gather(*(p.wait() for p in procs))
        deadline = self.config.cluster.drain_timeout_s + 15 if graceful else 15
        interrupted: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        await asyncio.wait({waiting, interrupted}, timeout=deadline, return_when=asyncio.FIRST_COMPLETED)
        interrupted.cancel()
        if not waiting.done():
            for proc in procs:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGINT)
            try:
                await asyncio.wait_for(waiting, 15)
            except TimeoutError:
                for proc in procs:
                    if proc.returncode is None:
                        proc.kill()

    async def _stop_workers_now(self) -> None:
        procs = [s.proc for s in self.slots if s.proc is not None and s.proc.returncode is None]
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()

    def _stop_helpers(self) -> None:
        for name in ("kamailio", "rooms", "redis"):
            proc = self.helpers.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            log.event(logger, "supervisor.helper_stopped", helper=name)


def drain(config: Config, worker: str) -> dict[str, Any]:
    """`gateway drain NAME`: SIGTERM to that worker of this host (its pid file in DATA_DIR/workers)."""
    path = config.data_dir / "workers" / f"{worker}.json"
    if not path.exists():
        raise LookupError(f"no running worker named {worker!r} (no {path})")
    info = json.loads(path.read_text())
    os.kill(int(info["pid"]), signal.SIGTERM)
    return {"worker": worker, "pid": info["pid"], "state": "draining", "deadline_s": config.cluster.drain_timeout_s}
