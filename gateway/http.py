"""The worker's HTTP side: /healthz (no credentials), the Voice API, the project API and the operator console
(gateway.api)."""

from __future__ import annotations

import asyncio
import os
from typing import Protocol

from aiohttp import web

from . import tls
from .adapters.clock import MediaClock
from .api.console import Console
from .api.projects import CpaasApi
from .api.recordings import Recordings
from .api.voice import VoiceApi
from .calls.registration import Registration
from .calls.ua import UserAgent
from .cluster.metrics import Metrics
from .cluster.registry import CallRegistry
from .config import Config
from .rooms.connector import JanusRoomConnector
from .rooms.sip_forward import SipForwardConnector


class Served(Protocol):
    """What the HTTP side reads of its worker (`gateway.worker.Worker`)."""

    config: Config
    name: str
    ready: bool
    ua: UserAgent
    registrations: list[Registration]
    clock: MediaClock
    metrics: Metrics
    api: VoiceApi
    cpaas: CpaasApi
    console: Console
    recordings: Recordings
    registry: CallRegistry
    connector: JanusRoomConnector | None
    forwarders: dict[str, SipForwardConnector]


def make_app(worker: Served) -> web.Application:
    app = web.Application(client_max_size=worker.config.api.max_body_bytes)
    app["worker"] = worker
    if worker.config.http.tls_cert:  # over HTTPS: browsers and clients keep to it
        async def hsts(request: web.Request, response: web.StreamResponse) -> None:
            response.headers["Strict-Transport-Security"] = tls.HSTS

        app.on_response_prepare.append(hsts)

    async def healthz(request: web.Request) -> web.Response:
        if not worker.ready:
            return web.json_response({"status": "starting"}, status=503)
        return web.json_response({
            "status": "ok" if worker.ua.accepting else "draining",
            "worker": worker.name,
            "calls_started": worker.ua.calls_started,
            "active_calls": len(worker.ua.calls),
            "rtp_ports_in_use": worker.ua.ports.in_use,
            "registrations": {r.trunk.name: r.state for r in worker.registrations},
            "media_clock": {"ticks": worker.clock.ticks, "skipped": worker.clock.skipped,
                            "lateness": worker.clock.lateness_percentiles()},
            # what an operator (or the soak test) watches for outages and leaks
            "cdr": worker.ua.cdr.status(),
            "registry": worker.registry.status(),
            "janus": worker.connector.stats() if worker.connector is not None else None,
            "forward_pools": {name: f.stats() for name, f in worker.forwarders.items()},  # legs, live per member
            "webhooks_queued": sum(len(q) for q in worker.api.notifier.lanes.values()),
            "tasks": len(asyncio.all_tasks()),
            "fds": len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None,
        })

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=worker.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    worker.api.routes(app)
    worker.cpaas.routes(app)
    worker.recordings.routes(app)
    worker.console.routes(app)
    return app
