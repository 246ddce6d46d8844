"""One worker process: SIP transports, media clock, calls, CDR store and the HTTP side, wired together."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from . import log, tls
from .adapters.clock import MediaClock
from .api.console import Console
from .api.projects import CpaasApi
from .api.recordings import Recordings
from .api.voice import VoiceApi
from .api.webhooks import Notifier
from .apps.echo import echo
from .apps.limits import AttemptLimiter, Limits, RedisLimiter
from .apps.prompts import ProjectVoices, PromptError, PromptLibrary, prompt_sets
from .apps.routes import make_api_route, make_dial_in
from .apps.services import Directory, IvrServices, Limiter
from .calls.call import Call
from .calls.registration import Registration
from .calls.ua import App, UserAgent
from .cluster.alarms import StoreAlarm
from .cluster.janus import JanusProcess, JanusSecrets, supervise_janus
from .cluster.metrics import Metrics
from .cluster.registry import CallRegistry, LocalRegistry, RedisRegistry
from .config import Config, DidConfig
from .http import make_app
from .rooms.connector import JanusRoomConnector
from .rooms.directory import EmbeddedDirectory, HttpDirectory, SharedDirectory, pin_key
from .rooms.service.server import service_secrets
from .rooms.sip_forward import SipForwardConnector
from .store.cdr import CdrStore
from .store.projects import ProjectStore
from .store.recordings import RecordingStore
from .store.rooms import RoomStore

logger = logging.getLogger("gateway.worker")


class Worker:
    def __init__(self, config: Config, name: str = "w1", manage_janus: bool = False) -> None:
        self.config = config
        self.name = name
        self.cdr = CdrStore(config.data_dir, worker=name)
        self.clock = MediaClock()
        self.rooms = RoomStore(config.data_dir)
        self.projects = ProjectStore(config.data_dir)
        for project in config.projects:
            self.projects.ensure(project)
        self.prompts = PromptLibrary(Path(config.ivr.prompts_dir), config.data_dir / "prompts-cache")
        self.voices = ProjectVoices(self.prompts)
        http = config.http
        self.api_url = f"{tls.scheme(http.tls_cert)}://{http.host}:{http.port}"
        self.registry: CallRegistry = (
            RedisRegistry(config.cluster.redis_url, name, self.api_url, f"{config.sip.host}:{config.sip.port}")
            if config.cluster.redis_url else LocalRegistry(name))
        shared = self.registry.redis if isinstance(self.registry, RedisRegistry) else None
        d = config.directory
        self.directory: Directory = (
            HttpDirectory(d.url, d.username, d.password, d.timeout_ms / 1000) if d.kind == "http"
            else SharedDirectory(shared, self.rooms, pin_key(service_secrets(config)["secret"]))
            if shared is not None  # several workers: Redis holds it (PINs keyed by the room service's secret)
            else EmbeddedDirectory(self.rooms)
        )
        limits = Limits.from_config(config.ivr)
        limiter: Limiter = RedisLimiter(shared, limits) if shared is not None else AttemptLimiter(limits)
        services = IvrServices(config, self.prompts, self.directory, limiter, self.rooms, None, self.projects,
                               self.voices)
        dial_in = make_dial_in(services)
        apps: dict[str, App] = {"echo": echo, "ivr": dial_in, "room": dial_in, "api": make_api_route(services)}
        self.ua = UserAgent(config, self.cdr, self.clock, apps)
        self.connector: JanusRoomConnector | None = None
        secrets = service_secrets(config)  # the room service's: the phones' token secret, the operator's key
        if config.room_service.embedded or config.room_service.url:  # phones into rooms: their media on Janus
            self.connector = services.connector = JanusRoomConnector(
                config, secrets["secret"], JanusSecrets.load(config).api_secret, self.ua.ports,
                config.sip.host)  # the legs to Janus: an address of this host, never the NAT's public one
        # rooms reached through SIP media gateways instead (per DID or project: `forward_pool`)
        self.forwarders = {pool.name: SipForwardConnector(pool, self.rooms) for pool in config.forward_pools}
        services.forwarders.update(self.forwarders)
        # the Janus we start ourselves (one process; with --workers N the supervisor starts it)
        self.janus = JanusProcess(config) if manage_janus and config.janus.is_managed else None
        self.ua.find_did = self._find_did
        self.notifier = Notifier(self.cdr, config.webhooks, self._webhook_key)
        self.api = VoiceApi(self.ua, self.projects, self.rooms, services, self.notifier, self.registry)
        operator = (config.room_service.api_user, secrets["api_key"])  # one operator credential
        self.cpaas = CpaasApi(self.api, operator, self.voices, self.prompts.languages())
        self._loop: asyncio.AbstractEventLoop | None = None
        self.recording_store = RecordingStore(config.data_dir, name, config.recordings.flush_s, self._soon,
                                              config.recordings.format)
        self.recordings = Recordings(self.api, self.recording_store, self.notifier)
        self._cpu: tuple[float, float] = (time.monotonic(), time.process_time())
        self._cpu_percent = 0.0
        self._workers_alive = 1
        self.console = Console(self.api, operator, name, self.clock, lambda: self._cpu_percent)
        self.metrics = Metrics(self.ua, self.notifier, lambda: self._workers_alive, lambda: self._cpu_percent,
                               registry=self.registry)
        self.cdr_alarm = StoreAlarm(self.cdr, name, config.cluster.alarm_url, lambda: self._workers_alive)
        self.ua.listener = self._on_call_event
        threshold = config.cluster.cpu_threshold
        self.ua.overloaded = lambda: threshold > 0 and self._cpu_percent > threshold
        self._tasks: list[asyncio.Task[None]] = []
        self._prerender: asyncio.Task[None] | None = None
        self.registrations = [Registration(self.ua, t) for t in config.trunks if t.register is not None]
        self.ready = False
        self._runner: web.AppRunner | None = None
        self._stop = asyncio.Event()

    def _find_did(self, number: str) -> DidConfig | None:
        """A configured DID, else a project's number with in=true (its route: "api", the application decides, or
        "ivr", the dial-in prompts); route "off" when its project takes no inbound calls (voice.in = false)."""
        did = self.config.did(number)
        project = self.projects.by_name(did.project) if did is not None else self.projects.by_number(number)
        if project is None:
            return did
        if did is None:
            found = project.inbound_number(number)
            did = DidConfig(number=number, route=found.route if found is not None else "api", project=project.name)
        return did if project.voice_in else dataclasses.replace(did, route="off")

    def _soon(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the event loop (from another thread: the recordings writer)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn)

    def _on_call_event(self, call: Call, state: str, data: dict[str, Any]) -> None:
        """Every recorded call event: webhooks, recordings, metrics, the shared registry."""
        self.api.on_call_event(call, state, data)
        self.recordings.on_call_event(call, state, data)
        self.metrics.on_call_event(call, state, data)
        if state == "disconnected":
            self.registry.ended(call.voice_id)
        else:
            room = data.get("room_id") or (call.control.room_id if call.control is not None else "") or ""
            self.registry.update(call.voice_id, state=state, room_id=str(room), project=str(call.info.get("project", "")))

    async def _housekeeping(self) -> None:
        """Once a second: this process's CPU use (admission), the registry's view of the cluster (metrics); once an
        hour, recordings past their retention."""
        sweep_at = time.monotonic() + 60
        while True:
            await asyncio.sleep(1.0)
            if time.monotonic() >= sweep_at and self.config.recordings.max_age_days > 0:
                sweep_at = time.monotonic() + 3600
                await asyncio.to_thread(self.recording_store.sweep, self.config.recordings.max_age_days)
            now, cpu = time.monotonic(), self._call_cpu()
            then, cpu_then = self._cpu
            if now - then >= 2.0:
                self._cpu_percent = 100.0 * (cpu - cpu_then) / (now - then)
                self._cpu = (now, cpu)
            self.registry.set_state("up" if self.ua.accepting else "draining", len(self.ua.calls))
            self.cdr_alarm.check()  # the CDR disk refusing writes (or back): an alarm
            if isinstance(self.registry, RedisRegistry):
                try:
                    self._workers_alive = len(await self.registry.workers())
                except Exception:  # noqa: BLE001 - a metrics refresh must never end the loop
                    pass

    def _call_cpu(self) -> float:
        """This process's CPU seconds, less the prompt renderer's: rendering prompts (at a first start, after a
        project's new welcome text) is a background job and must not make admission refuse calls (cpu_overload)."""
        return time.process_time() - self.prompts.render_cpu_s

    def _write_pidfile(self) -> None:
        folder = self.config.data_dir / "workers"
        folder.mkdir(parents=True, exist_ok=True)
        info = {"name": self.name, "pid": os.getpid(), "sip": f"{self.config.sip.host}:{self.config.sip.port}",
                "http": self.api_url}
        (folder / f"{self.name}.json").write_text(json.dumps(info))

    def _webhook_key(self, project: str) -> str | None:
        """The project's webhook secret (a secret of its own: a webhook receiver never holds the API key)."""
        found = self.projects.by_name(project)
        return found.webhook_secret if found is not None else None

    async def start(self) -> None:
        stale = self.cdr.close_stale("gateway_restart", worker=self.name)
        if stale:
            log.event(logger, "cdr.closed_stale", logging.WARNING, count=len(stale))
        if self.janus is not None:
            self._tasks.append(await supervise_janus(self.janus))
        self._loop = asyncio.get_running_loop()
        self.clock.start()
        self.notifier.start()
        await self.recordings.repair()  # this worker's recordings cut short by a crash: fixed and announced
        await self.registry.start()
        self.metrics.start()
        self.console.start()
        self._tasks.append(asyncio.get_running_loop().create_task(self._housekeeping()))
        await self.ua.start()
        for registration in self.registrations:
            registration.start()
        self._runner = web.AppRunner(make_app(self), access_log=None)
        await self._runner.setup()
        http = self.config.http
        site = web.TCPSite(self._runner, http.host, http.port,
                           ssl_context=tls.server_context(http.tls_cert, http.tls_key) if http.tls_cert else None)
        await site.start()
        self.ready = True
        self._write_pidfile()
        self._prerender = asyncio.get_running_loop().create_task(self._render_prompts())
        sip = self.config.sip
        log.event(logger, "worker.started", worker=self.name, sip=f"{sip.host}:{sip.port}", transports=sip.transports,
                  http=f"{self.config.http.host}:{self.config.http.port}", config=self.config.source,
                  data_dir=str(self.config.data_dir), rtp=f"{self.config.rtp.port_min}-{self.config.rtp.port_max}")

    async def _render_prompts(self) -> None:
        """Pre-render every project's prompts in the background (calls render on demand meanwhile)."""
        configured = {p.name for p in self.config.projects}
        stored = await asyncio.to_thread(self.projects.list)  # projects made through the API or the CLI speak too
        combos = prompt_sets([*self.config.projects, *(p for p in stored if p.name not in configured)])
        try:
            count = await self.prompts.render_all(combos)
            self.voices.ready.update(combos)
            log.event(logger, "prompts.ready", prompts=count, rendered=self.prompts.rendered)
        except PromptError as exc:
            log.event(logger, "prompts.unavailable", logging.ERROR, error=str(exc))

    async def drain(self, deadline_s: float) -> None:
        """Stop taking calls (INVITE and OPTIONS answer 503, so the balancer moves on), let the calls in
        progress finish for up to `deadline_s`, then stop (what is left is hung up, reason drain_deadline)."""
        self.ua.accepting = False
        self.registry.set_state("draining", len(self.ua.calls))
        log.event(logger, "worker.draining", logging.WARNING, worker=self.name, calls=len(self.ua.calls),
                  deadline_s=deadline_s)
        end = time.monotonic() + deadline_s
        while self.ua.calls and time.monotonic() < end and not self._stop.is_set():
            tasks = [c.task for c in self.ua.calls.values() if c.task is not None]
            if not tasks:
                await asyncio.sleep(0.2)
                continue
            await asyncio.wait(tasks, timeout=min(1.0, max(0.0, end - time.monotonic())))
        for call in list(self.ua.calls.values()):
            call.hangup("drain_deadline")
        log.event(logger, "worker.drained", worker=self.name)

    async def stop(self) -> None:
        self.ready = False
        for task in self._tasks:
            task.cancel()
        self.metrics.stop()
        if self._prerender:
            self._prerender.cancel()
        for registration in self.registrations:
            registration.stop()
        tasks = [c.task for c in self.ua.calls.values() if c.task is not None]
        for forwarder in self.forwarders.values():  # their BYEs go out before the SIP transport closes
            forwarder.hang_up_all()
        self.ua.close()
        if tasks:  # let each call finish its hang-up path (leave its room, close its CDR)
            await asyncio.wait(tasks, timeout=5)
        await asyncio.to_thread(self.recording_store.flush, 10.0)  # recordings finalised ...
        await asyncio.sleep(0)  # ... and announced (CDR, webhooks) before those close
        if self.connector is not None:
            await self.connector.close()
        if self.janus is not None:
            await self.janus.stop()
        self.clock.stop()
        await self.console.close()  # its live streams end, or the HTTP server would wait for them
        if self._runner:
            await self._runner.cleanup()
        await self.notifier.close()
        await self.cdr_alarm.close()
        await self.api.close()
        await self.registry.close()
        self.recording_store.close()
        self.cdr.close()
        (self.config.data_dir / "workers" / f"{self.name}.json").unlink(missing_ok=True)
        self.projects.close()
        await self.voices.close()
        self.prompts.close()
        self.rooms.close()
        if isinstance(self.directory, HttpDirectory):
            await self.directory.close()
        log.event(logger, "worker.stopped", worker=self.name)

    async def run_forever(self) -> None:
        """SIGTERM drains (calls finish, up to cluster.drain_timeout_s); SIGINT, or a second SIGTERM, stops now."""
        loop = asyncio.get_running_loop()
        draining = asyncio.Event()

        def on_term() -> None:
            if draining.is_set():
                self._stop.set()
            draining.set()

        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGTERM, on_term)
        await self.start()
        waits = [loop.create_task(self._stop.wait()), loop.create_task(draining.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if draining.is_set() and not self._stop.is_set():
            await self.drain(self.config.cluster.drain_timeout_s)
        for task in waits:
            task.cancel()
        await self.stop()
