"""Webhooks: call progress POSTed to the call's event_url (or its project's notification_url).

Every event is first written to the outbox in the CDR store (same writer as the call's events, so a
restart resumes exactly where delivery stopped), then delivered by the call's own lane: one event at a
time, in order, retried with exponential backoff (1 s doubling up to `max_backoff_s`) until it is
`max_age_s` old, when it is given up (logged, left in the outbox as `expired`). Delivery is at least once:
receivers de-duplicate on `X-Voice-Event-Id`.

Each POST carries `X-Voice-Signature: sha256=<hex>`, the HMAC-SHA256 of the exact body bytes keyed with
the project's app_key, which receivers recompute and compare (constant-time).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from .. import log
from ..config import WebhookConfig
from ..store.cdr import CdrStore

logger = logging.getLogger("gateway.webhooks")
SIGNATURE_HEADER = "X-Voice-Signature"


def sign(key: str, body: bytes) -> str:
    return "sha256=" + hmac.new(key.encode(), body, hashlib.sha256).hexdigest()


def verify(key: str, body: bytes, header: str) -> bool:
    return hmac.compare_digest(sign(key, body), header)


def timestamp(ts: float | None = None) -> str:
    """ISO 8601 UTC with milliseconds, as every webhook and API answer carries it."""
    return datetime.fromtimestamp(time.time() if ts is None else ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def encode(payload: dict[str, Any]) -> tuple[str, bytes]:
    event_id = uuid.uuid4().hex
    return event_id, json.dumps({"event_id": event_id, **payload}, separators=(",", ":")).encode()


def lost_call_event(call: dict[str, Any]) -> dict[str, Any]:
    """The last event of a call whose worker died (from its CDR record): disconnected, or failed if it was
    never answered; reason worker_lost. The worker's outbox delivers it when the worker is back."""
    initiated: dict[str, Any] = next((e for e in call.get("events", []) if e["state"] == "initiated"), {})
    payload: dict[str, Any] = {
        "state": "disconnected" if call.get("answered_at") else "failed" if call["direction"] == "outbound"
        else "disconnected",
        "voice_id": call["voice_id"], "room_id": call.get("room_id"),
        "timestamp": timestamp(), "direction": call["direction"],
        "from": call.get("from_number"), "to": call.get("to_number"), "code": None, "reason": "worker_lost"}
    for key in ("name", "owner_ref"):
        if initiated.get(key):
            payload[key] = initiated[key]
    return payload


@dataclass
class Pending:
    event_id: str
    voice_id: str
    project: str
    url: str
    body: bytes
    created_at: float
    attempts: int = 0


class Notifier:
    def __init__(self, cdr: CdrStore, config: WebhookConfig, key_for: Callable[[str], str | None]) -> None:
        self.cdr = cdr
        self.config = config
        self.key_for = key_for  # project name -> app_key (None: the project is gone; the event is dropped)
        self.lanes: dict[str, deque[Pending]] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.slots = asyncio.Semaphore(config.concurrency)
        self.session: aiohttp.ClientSession | None = None
        self.delivered = 0
        self.failures = 0
        self.expired = 0

    def start(self) -> None:
        """Resume what the outbox still holds (a restart, a crash)."""
        resumed = self.cdr.outbox_pending()
        for row in resumed:
            self._queue(Pending(row["event_id"], row["voice_id"], row["project"], row["url"], bytes(row["body"]),
                                row["created_at"], row["attempts"]))
        if resumed:
            log.event(logger, "webhooks.resumed", events=len(resumed), calls=len(self.lanes))

    def emit(self, url: str, project: str, voice_id: str, payload: dict[str, Any]) -> None:
        event_id, body = encode(payload)
        now = time.time()
        self.cdr.outbox_add(event_id, voice_id, project, url, body, now)
        self._queue(Pending(event_id, voice_id, project, url, body, now))

    def _queue(self, item: Pending) -> None:
        self.lanes.setdefault(item.voice_id, deque()).append(item)
        if item.voice_id not in self.tasks:
            self.tasks[item.voice_id] = asyncio.get_running_loop().create_task(self._lane(item.voice_id))

    async def _lane(self, voice_id: str) -> None:
        lane = self.lanes[voice_id]
        try:
            while lane:
                item = lane[0]
                async with self.slots:
                    await self._deliver(item)
                lane.popleft()
        finally:
            self.tasks.pop(voice_id, None)
            if not lane:
                self.lanes.pop(voice_id, None)

    async def _deliver(self, item: Pending) -> None:
        """Until delivered or expired; returns either way."""
        fields = {"voice_id": item.voice_id, "event_id": item.event_id}
        while True:
            key = self.key_for(item.project)
            if key is None:
                self.cdr.outbox_state(item.event_id, "dropped", item.attempts, "project not found")
                log.event(logger, "webhook.dropped", logging.WARNING, reason="project_not_found", **fields)
                return
            item.attempts += 1
            error = await self._post(item, key)
            if error is None:
                self.delivered += 1
                self.cdr.outbox_state(item.event_id, "delivered", item.attempts)
                log.event(logger, "webhook.delivered", logging.DEBUG, attempts=item.attempts, **fields)
                return
            self.failures += 1
            delay = min(float(self.config.max_backoff_s), 2.0 ** min(item.attempts - 1, 20))
            if time.time() + delay - item.created_at > self.config.max_age_s:
                self.expired += 1
                self.cdr.outbox_state(item.event_id, "expired", item.attempts, error)
                log.event(logger, "webhook.expired", logging.ERROR, attempts=item.attempts, error=error, **fields)
                return
            self.cdr.outbox_state(item.event_id, "pending", item.attempts, error)
            log.event(logger, "webhook.retry", logging.WARNING if item.attempts <= 3 else logging.DEBUG,
                      attempts=item.attempts, delay_s=delay, error=error, **fields)
            await asyncio.sleep(delay)

    async def _post(self, item: Pending, key: str) -> str | None:
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout_s))
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(key, item.body),
                   "X-Voice-Event-Id": item.event_id, "User-Agent": "gateway-webhooks"}
        try:
            async with self.session.post(item.url, data=item.body, headers=headers, allow_redirects=False) as r:
                await r.read()
                return None if 200 <= r.status < 300 else f"HTTP {r.status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"[:200]

    async def close(self, grace: float = 2.0) -> None:
        """Give in-flight deliveries a moment, then stop; what is left stays in the outbox for next start."""
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=grace)
        for task in list(self.tasks.values()):
            task.cancel()
        if self.session is not None:
            await self.session.close()
