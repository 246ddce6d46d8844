"""One worker process: SIP transports, media clock, calls, CDR store and the HTTP side, wired together."""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web

from . import log
from .apps.echo import echo
from .cdr import CdrStore
from .config import Config
from .http import make_app
from .media.clock import MediaClock
from .registration import Registration
from .ua import App, UserAgent

logger = logging.getLogger("gateway.worker")


class Worker:
    def __init__(self, config: Config, name: str = "w1") -> None:
        self.config = config
        self.name = name
        self.cdr = CdrStore(config.data_dir, worker=name)
        self.clock = MediaClock()
        apps: dict[str, App] = {"echo": echo}
        self.ua = UserAgent(config, self.cdr, self.clock, apps)
        self.registrations = [Registration(self.ua, t) for t in config.trunks if t.register is not None]
        self.ready = False
        self._runner: web.AppRunner | None = None
        self._stop = asyncio.Event()

    async def start(self) -> None:
        stale = self.cdr.close_stale("gateway_restart", worker=self.name)
        if stale:
            log.event(logger, "cdr.closed_stale", logging.WARNING, count=len(stale))
        self.clock.start()
        await self.ua.start()
        for registration in self.registrations:
            registration.start()
        self._runner = web.AppRunner(make_app(self), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.http.host, self.config.http.port)
        await site.start()
        self.ready = True
        sip = self.config.sip
        log.event(logger, "worker.started", worker=self.name, sip=f"{sip.host}:{sip.port}", transports=sip.transports,
                  http=f"{self.config.http.host}:{self.config.http.port}", config=self.config.source,
                  data_dir=str(self.config.data_dir), rtp=f"{self.config.rtp.port_min}-{self.config.rtp.port_max}")

    async def stop(self) -> None:
        self.ready = False
        for registration in self.registrations:
            registration.stop()
        self.ua.close()
        self.clock.stop()
        if self._runner:
            await self._runner.cleanup()
        self.cdr.close()
        log.event(logger, "worker.stopped", worker=self.name)

    async def run_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop.set)
        await self.start()
        await self._stop.wait()
        await self.stop()
