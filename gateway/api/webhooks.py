"""Webhooks: call progress POSTed to the call's event_url (or its project's notification_url).

Every event is first written to the outbox in the CDR store (same writer as the call's events, so a
restart resumes exactly where delivery stopped), then delivered by the call's own lane: one event at a
time, in order, retried with exponential backoff (1 s doubling up to `max_backoff_s`) until it is
`max_age_s` old, when it is given up (logged, left in the outbox as `expired`). Delivery is at least once:
receivers de-duplicate on `X-Voice-Event-Id`. At most `concurrency` POSTs are in flight, at most half of
them to one receiver, and a lane holds a slot only while it POSTs (not while it waits to retry): a receiver
that is down or slow (each attempt ends at `timeout_s`) delays its own events, never another receiver's.

Each POST carries `X-Voice-Timestamp: <unix seconds>` (the time of that attempt) and
`X-Voice-Signature: v1=<hex>`, the HMAC-SHA256 of `"<timestamp>.<body>"` keyed with the project's webhook
secret; a receiver recomputes it (constant-time compare) and refuses timestamps more than
`REPLAY_WINDOW_S` away from its clock, so a captured POST cannot be replayed later (`verify`).

Targets (SSRF): only http(s) URLs whose every address is public. Loopback, private (RFC 1918, ULA),
link-local, CGNAT, multicast, unspecified, documentation/reserved and cloud metadata addresses are refused
unless `webhooks.allow_networks` names them: when the API accepts a URL (`check_target`, after DNS), and
again when the delivery connects: the resolver refuses a name with any such address, and the socket
factory checks the exact address each socket is about to connect to (literal IPs, and a DNS answer that
changed between the two checks: rebinding). A refused event is not retried: status `refused` in the outbox,
one warning line. Redirects are never followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from .. import log, tls
from ..config import WebhookConfig
from ..store.cdr import CdrStore, strip_credentials

logger = logging.getLogger("gateway.webhooks")
SIGNATURE_HEADER = "X-Voice-Signature"
TIMESTAMP_HEADER = "X-Voice-Timestamp"
EVENT_ID_HEADER = "X-Voice-Event-Id"
REPLAY_WINDOW_S = 300  # what receivers should accept (and `verify` does): 5 minutes either way
MAX_RESPONSE_BYTES = 65536  # of a receiver's answer we read (the status is what counts)
DNS_TIMEOUT_S = 5.0  # the API's look-up of an event_url's host

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


# -- signing
def sign(secret: str, ts: int, body: bytes) -> str:
    """`v1=` + HMAC-SHA256(secret, "<ts>.<body>") in hex: the X-Voice-Signature of a POST sent at `ts`."""
    return "v1=" + hmac.new(secret.encode(), b"%d." % ts + body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, timestamp: str, signature: str, now: float | None = None,
           window: int = REPLAY_WINDOW_S) -> bool:
    """What a receiver does: the timestamp is within `window` seconds of its clock (else a replay) and the
    signature matches it and the exact body bytes (constant-time compare)."""
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 12):
        return False
    ts = int(timestamp)
    if abs((time.time() if now is None else now) - ts) > window:
        return False
    return hmac.compare_digest(sign(secret, ts, body), signature)


# -- where a webhook may go
_REFUSED: list[tuple[Network, str]] = [(ipaddress.ip_network(net), reason) for net, reason in (
    # cloud metadata first: AWS/GCP/Azure/OpenStack, AWS over IPv6, Alibaba
    ("169.254.169.254/32", "cloud metadata"), ("fd00:ec2::254/128", "cloud metadata"),
    ("100.100.100.200/32", "cloud metadata"),
    ("0.0.0.0/8", "unspecified"), ("::/128", "unspecified"),
    ("127.0.0.0/8", "loopback"), ("::1/128", "loopback"),
    ("10.0.0.0/8", "private"), ("172.16.0.0/12", "private"), ("192.168.0.0/16", "private"),
    ("fc00::/7", "private"),
    ("100.64.0.0/10", "carrier-grade NAT"),
    ("169.254.0.0/16", "link-local"), ("fe80::/10", "link-local"),
    ("224.0.0.0/4", "multicast"), ("ff00::/8", "multicast"),
    ("192.0.0.0/24", "reserved"), ("::/96", "reserved"), ("64:ff9b:1::/48", "reserved"),
)]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def allowed_networks(config: WebhookConfig) -> list[Network]:
    """`webhooks.allow_networks`, parsed (the config loader has validated them)."""
    return [ipaddress.ip_network(n, strict=False) for n in config.allow_networks]


def _embedded(ip: Address) -> Address:
    """The IPv4 address an IPv6 one stands for (mapped, NAT64, 6to4), else itself."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if ip.sixtofour is not None:
            return ip.sixtofour
    return ip


def refusal(address: str, allow: Sequence[Network] = ()) -> str | None:
    """Why a webhook may not connect to `address` (None: it may): loopback, private, link-local, multicast,
    unspecified, carrier-grade NAT, cloud metadata, or any other address that is not global, unless an
    allow-listed network holds it."""
    try:
        ip = _embedded(ipaddress.ip_address(address.partition("%")[0]))
    except ValueError:
        return "not an IP address"
    if any(ip in net for net in allow if net.version == ip.version):
        return None
    for net, reason in _REFUSED:
        if net.version == ip.version and ip in net:
            return reason
    return None if ip.is_global else "reserved"


class TargetRefused(OSError):
    """A webhook target the policy refuses: an OSError, so aiohttp fails the connection attempt with it."""

    MARK = "webhook target refused"

    def __init__(self, host: str, address: str, reason: str) -> None:
        where = host if host == address else f"{host} ({address})"
        self.detail = f"{where} is {reason}, and webhooks.allow_networks does not allow it"
        super().__init__(errno.EACCES, f"{self.MARK}: {self.detail}")
        self.host, self.address, self.reason = host, address, reason


def check_url(url: str) -> str | None:
    """Why `url` cannot be a webhook target by its form (None: it can): http(s) with a host."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return "not a valid URL"
    if parsed.scheme not in ("http", "https") or not parsed.raw_host:
        return "an http:// or https:// URL with a host"
    return None


def _first_refused(host: str, addresses: Sequence[str], allow: Sequence[Network]) -> str | None:
    for address in addresses:
        reason = refusal(address, allow)
        if reason is not None:
            return TargetRefused(host, address, reason).detail
    return None


async def check_target(url: str, allow: Sequence[Network], dns: AbstractResolver | None = None) -> str | None:
    """The API's check of an event_url: its form, then every address its host resolves to. A host that
    does not resolve now passes (delivery resolves and checks again, and retries)."""
    reason = check_url(url)
    if reason is not None:
        return reason
    host = str(URL(url).raw_host)
    resolver = dns or DefaultResolver()
    try:
        results = await asyncio.wait_for(resolver.resolve(host, 0, socket.AF_UNSPEC), DNS_TIMEOUT_S)
    except (OSError, TimeoutError, UnicodeError):
        return None
    finally:
        if dns is None:
            await resolver.close()
    return _first_refused(host, [r["host"] for r in results], allow)


def check_target_blocking(url: str, allow: Sequence[Network]) -> str | None:
    """`check_target` for the CLI (no event loop)."""
    reason = check_url(url)
    if reason is not None:
        return reason
    host = str(URL(url).raw_host)
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return None
    return _first_refused(host, [str(info[4][0]) for info in infos], allow)


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing a name any of whose addresses the policy refuses (after DNS)."""

    def __init__(self, allow: Sequence[Network], inner: AbstractResolver | None = None) -> None:
        self.allow = allow
        self.inner = inner or DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self.inner.resolve(host, port, family)
        for result in results:
            reason = refusal(result["host"], self.allow)
            if reason is not None:
                raise TargetRefused(host, result["host"], reason)
        return results

    async def close(self) -> None:
        await self.inner.close()


def guarded_socket(allow: Sequence[Network]) -> Callable[[tuple[Any, ...]], socket.socket]:
    """The connector's socket factory: the last word, on the exact address about to be connected to
    (literal IPs never reach the resolver; a DNS answer may change between the two checks)."""
    def factory(addr_info: tuple[Any, ...]) -> socket.socket:
        family, type_, proto, _, sockaddr = addr_info
        address = str(sockaddr[0])
        reason = refusal(address, allow)
        if reason is not None:
            raise TargetRefused(address, address, reason)
        return socket.socket(family, type_, proto)
    return factory


# -- events
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


def _host(url: str) -> str | None:
    try:
        return URL(url).host
    except (ValueError, TypeError):
        return None


def _scrub(text: str, url: str) -> str:
    """An error text without the URL's credentials (logs and the outbox's last_error)."""
    text = text.replace(url, strip_credentials(url))
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return text
    for secret in {parsed.raw_password, parsed.password}:
        if secret:
            text = text.replace(secret, "***")
    return text


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
    def __init__(self, cdr: CdrStore, config: WebhookConfig, key_for: Callable[[str], str | None],
                 dns: AbstractResolver | None = None) -> None:
        self.cdr = cdr
        self._dns = dns  # the look-ups of the API's check and of deliveries (tests inject one; default: getaddrinfo)
        self.config = config
        self.key_for = key_for  # project name -> its webhook secret (None: the project is gone; the event is dropped)
        self.allow = allowed_networks(config)
        self.lanes: dict[str, deque[Pending]] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.slots = asyncio.Semaphore(config.concurrency)  # POSTs in flight, all receivers together
        self.per_host = max(1, config.concurrency // 2)  # ... and to one receiver (scheme, host, port)
        self._hosts: dict[tuple[str, str, int | None], tuple[asyncio.Semaphore, list[int]]] = {}
        self.session: aiohttp.ClientSession | None = None
        self.delivered = 0
        self.failures = 0
        self.expired = 0
        self.refused = 0

    @property
    def dns(self) -> AbstractResolver:
        if self._dns is None:
            self._dns = DefaultResolver()  # needs the running loop: made on first use
        return self._dns

    async def check(self, url: str) -> str | None:
        """Why the API must refuse `url` as a webhook target (None: acceptable)."""
        return await check_target(url, self.allow, self.dns)

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
                await self._deliver(lane[0])
                lane.popleft()
        finally:
            self.tasks.pop(voice_id, None)
            if not lane:
                self.lanes.pop(voice_id, None)

    async def _deliver(self, item: Pending) -> None:
        """Until delivered, refused or expired; returns either way."""
        fields = {"voice_id": item.voice_id, "event_id": item.event_id}
        while True:
            key = self.key_for(item.project)
            if key is None:
                self.cdr.outbox_state(item.event_id, "dropped", item.attempts, "project not found")
                log.event(logger, "webhook.dropped", logging.WARNING, reason="project_not_found", **fields)
                return
            item.attempts += 1
            async with self._slot(item.url):  # held for the POST only, never across the backoff
                error, refused = await self._post(item, key)
            if error is None:
                self.delivered += 1
                self.cdr.outbox_state(item.event_id, "delivered", item.attempts)
                log.event(logger, "webhook.delivered", logging.DEBUG, attempts=item.attempts, **fields)
                return
            if refused:  # the policy, not the receiver: retrying would not change it
                self.refused += 1
                self.cdr.outbox_state(item.event_id, "refused", item.attempts, error)
                log.event(logger, "webhook.refused", logging.WARNING, project=item.project, host=_host(item.url),
                          reason=error, **fields)
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

    @contextlib.asynccontextmanager
    async def _slot(self, url: str) -> AsyncIterator[None]:
        """One of the POSTs in flight, and one of its receiver's: a receiver that is slow (each POST waits for
        `timeout_s`) or down holds at most half the slots, so the others' webhooks keep flowing. The host's gate
        comes first: a call waiting for its slow receiver holds nothing that others need."""
        try:
            parsed = URL(url)
            origin = (parsed.scheme, parsed.host or "", parsed.port)
        except (ValueError, TypeError):
            origin = ("", url, None)
        gate = self._hosts.get(origin)
        if gate is None:
            gate = self._hosts[origin] = (asyncio.Semaphore(self.per_host), [0])
        gate[1][0] += 1
        try:
            async with gate[0], self.slots:
                yield
        finally:
            gate[1][0] -= 1
            if not gate[1][0]:
                self._hosts.pop(origin, None)

    def _session(self) -> aiohttp.ClientSession:
        if self.session is None:
            connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.allow, self.dns),
                                             socket_factory=guarded_socket(self.allow),
                                             ssl=tls.client_context(self.config.ca_file) if self.config.ca_file else True)
            self.session = aiohttp.ClientSession(connector=connector, trust_env=False,
                                                 timeout=aiohttp.ClientTimeout(total=self.config.timeout_s))
        return self.session

    async def _post(self, item: Pending, key: str) -> tuple[str | None, bool]:
        """(None, False) delivered; (error, refused?) otherwise."""
        reason = check_url(item.url)
        if reason is not None:
            return f"{TargetRefused.MARK}: {reason}", True
        ts = int(time.time())
        headers = {"Content-Type": "application/json", TIMESTAMP_HEADER: str(ts),
                   SIGNATURE_HEADER: sign(key, ts, item.body), EVENT_ID_HEADER: item.event_id,
                   "User-Agent": "gateway-webhooks"}
        try:
            async with self._session().post(item.url, data=item.body, headers=headers, allow_redirects=False) as r:
                await r.content.read(MAX_RESPONSE_BYTES)
                return (None, False) if 200 <= r.status < 300 else (f"HTTP {r.status}", False)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            cause = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
            if isinstance(cause, TargetRefused):
                return str(cause.strerror), True
            text = _scrub(f"{type(exc).__name__}: {exc}", item.url)
            return text[:200], TargetRefused.MARK in text

    async def close(self, grace: float = 2.0) -> None:
        """Give in-flight deliveries a moment, then stop; what is left stays in the outbox for next start."""
        if self.tasks:
            await asyncio.wait(list(self.tasks.values()), timeout=grace)
        for task in list(self.tasks.values()):
            task.cancel()
        if self.session is not None:
            await self.session.close()
        if self._dns is not None:
            await self._dns.close()
