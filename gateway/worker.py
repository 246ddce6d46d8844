"""One worker process: SIP transports, media clock, calls, CDR store and the HTTP side, wired together."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

from aiohttp import web

from . import log
from .api import VoiceApi
from .apps.echo import echo
from .apps.ivr import IvrServices, make_api_route, make_dial_in
from .bridge import EmbeddedRoomConnector
from .cdr import CdrStore
from .config import Config, DidConfig
from .guard import AttemptLimiter
from .http import make_app
from .media.clock import MediaClock
from .projects import ProjectStore
from .prompts import PromptError, PromptLibrary, prompt_sets
from .registration import Registration
from .rooms import Directory, EmbeddedDirectory, HttpDirectory, RoomStore
from .roomservice.server import restrict_ice, service_secrets
from .ua import App, UserAgent
from .webhooks import Notifier

logger = logging.getLogger("gateway.worker")


class Worker:
    def __init__(self, config: Config, name: str = "w1") -> None:
        self.config = config
        self.name = name
        self.cdr = CdrStore(config.data_dir, worker=name)
        self.clock = MediaClock()
        self.rooms = RoomStore(config.data_dir)
        self.projects = ProjectStore(config.data_dir)
        for project in config.projects:
            self.projects.ensure(project)
        self.prompts = PromptLibrary(Path(config.ivr.prompts_dir), config.data_dir / "prompts-cache")
        d = config.directory
        self.directory: Directory = (
            HttpDirectory(d.url, d.username, d.password, d.timeout_ms / 1000) if d.kind == "http"
            else EmbeddedDirectory(self.rooms)
        )
        ivr = config.ivr
        limiter = AttemptLimiter(ivr.pin_failures_per_caller, ivr.pin_failures_per_meeting, ivr.pin_failure_window_s)
        connector = None
        if config.room_service.embedded or config.room_service.url:
            restrict_ice(config.room_service.ice_addresses)
            connector = EmbeddedRoomConnector(config, service_secrets(config)["secret"])
        services = IvrServices(config, self.prompts, self.directory, limiter, self.rooms, connector, self.projects)
        dial_in = make_dial_in(services)
        apps: dict[str, App] = {"echo": echo, "ivr": dial_in, "room": dial_in, "api": make_api_route(services)}
        self.ua = UserAgent(config, self.cdr, self.clock, apps)
        self.ua.find_did = self._find_did
        self.notifier = Notifier(self.cdr, config.webhooks, self._webhook_key)
        self.api = VoiceApi(self.ua, self.projects, self.rooms, services, self.notifier)
        self.ua.listener = self.api.on_call_event
        self._prerender: asyncio.Task[None] | None = None
        self.registrations = [Registration(self.ua, t) for t in config.trunks if t.register is not None]
        self.ready = False
        self._runner: web.AppRunner | None = None
        self._stop = asyncio.Event()

    def _find_did(self, number: str) -> DidConfig | None:
        """A configured DID, else a project's number with in=true (route "api": the application decides)."""
        did = self.config.did(number)
        if did is not None:
            return did
        project = self.projects.by_number(number)
        return None if project is None else DidConfig(number=number, route="api", project=project.name)

    def _webhook_key(self, project: str) -> str | None:
        found = self.projects.by_name(project)
        return found.app_key if found is not None else None

    async def start(self) -> None:
        stale = self.cdr.close_stale("gateway_restart", worker=self.name)
        if stale:
            log.event(logger, "cdr.closed_stale", logging.WARNING, count=len(stale))
        self.clock.start()
        self.notifier.start()
        await self.ua.start()
        for registration in self.registrations:
            registration.start()
        self._runner = web.AppRunner(make_app(self), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.http.host, self.config.http.port)
        await site.start()
        self.ready = True
        self._prerender = asyncio.get_running_loop().create_task(self._render_prompts())
        sip = self.config.sip
        log.event(logger, "worker.started", worker=self.name, sip=f"{sip.host}:{sip.port}", transports=sip.transports,
                  http=f"{self.config.http.host}:{self.config.http.port}", config=self.config.source,
                  data_dir=str(self.config.data_dir), rtp=f"{self.config.rtp.port_min}-{self.config.rtp.port_max}")

    async def _render_prompts(self) -> None:
        """Pre-render every project's prompts in the background (calls render on demand meanwhile)."""
        combos = prompt_sets(self.config.projects)
        try:
            count = await self.prompts.render_all(combos)
            log.event(logger, "prompts.ready", prompts=count, rendered=self.prompts.rendered)
        except PromptError as exc:
            log.event(logger, "prompts.unavailable", logging.ERROR, error=str(exc))

    async def stop(self) -> None:
        self.ready = False
        if self._prerender:
            self._prerender.cancel()
        for registration in self.registrations:
            registration.stop()
        tasks = [c.task for c in self.ua.calls.values() if c.task is not None]
        self.ua.close()
        if tasks:  # let each call finish its hang-up path (leave its room, close its CDR)
            await asyncio.wait(tasks, timeout=5)
        self.clock.stop()
        if self._runner:
            await self._runner.cleanup()
        await self.notifier.close()
        self.cdr.close()
        self.projects.close()
        self.prompts.close()
        self.rooms.close()
        if isinstance(self.directory, HttpDirectory):
            await self.directory.close()
        log.event(logger, "worker.stopped", worker=self.name)

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        await self.start()
        await self._stop.wait()
        await self.stop()
