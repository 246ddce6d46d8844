"""What protects the Voice API from strangers and from a project that dials too much.

    (failed authentications per source: `gateway.sources.FailureWindow`; beyond the limit a source gets 429
    with Retry-After until its window ends)
    client_source  the address a request counts against: the peer, or X-Forwarded-For from a trusted proxy.
    DialLimits     per project: concurrent outbound calls, calls placed per minute, and the destination rules
                   (`api.*` defaults, `[[api.projects]]` overrides by project name).
    quiet_malformed_http
                   aiohttp logs a request it cannot parse with a traceback at ERROR: one line at INFO instead.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from ..calls.outbound import DialRules
from ..config import ApiConfig

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_source(request: web.Request, trusted: list[Network]) -> str:
    """The client's address: the TCP peer, unless the peer is a trusted proxy (`api.trusted_proxies`); then the
    right-most X-Forwarded-For hop that is not itself a trusted proxy (hops left of it are the client's say)."""
    peer = request.remote or ""
    if not trusted or not _within(peer, trusted):
        return peer
    hops = [h.strip() for v in request.headers.getall("X-Forwarded-For", []) for h in v.split(",")]
    for hop in reversed(hops):
        if not _within(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # a malformed hop: trust nothing the proxy relayed beyond this point
        peer = hop
    return peer


def _within(address: str, networks: Iterable[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def networks(values: Iterable[str]) -> list[Network]:
    return [ipaddress.ip_network(v, strict=False) for v in values]


class DialLimits:
    """Per project: concurrent dial-outs (counted by the caller from the live calls), calls placed per minute."""

    def __init__(self, api: ApiConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.api = api
        self.clock = clock
        self._placed: dict[str, deque[float]] = {}  # project -> times of the calls placed in the last minute
        self._overrides = {o.name: o for o in api.projects}

    def rules(self, project: str) -> DialRules:
        o = self._overrides.get(project)
        allow_sip = self.api.allow_sip_uri if o is None or o.allow_sip_uri is None else o.allow_sip_uri
        allow = self.api.allow_prefixes if o is None or o.allow_prefixes is None else o.allow_prefixes
        deny = self.api.deny_prefixes if o is None or o.deny_prefixes is None else o.deny_prefixes
        return DialRules(allow_sip, tuple(allow), tuple(deny))

    def caps(self, project: str) -> tuple[int, int]:
        """(concurrent calls, calls per minute) for the project; 0 = no limit."""
        o = self._overrides.get(project)
        concurrent = self.api.max_outbound_calls_per_project
        per_minute = self.api.outbound_calls_per_minute
        if o is not None and o.max_outbound_calls is not None:
            concurrent = o.max_outbound_calls
        if o is not None and o.outbound_calls_per_minute is not None:
            per_minute = o.outbound_calls_per_minute
        return concurrent, per_minute

    def refused(self, project: str, live: int) -> tuple[str, str, int] | None:
        """(code, message, retry_after) when the project may not place another call now; None when it may."""
        concurrent, per_minute = self.caps(project)
        if concurrent and live >= concurrent:
            return "too_many_concurrent_calls", f"at most {concurrent} outbound calls at a time for this project", 5
        if per_minute:
            now = self.clock()
            recent = self._recent(project, now)
            if len(recent) >= per_minute:
                retry = max(1, math.ceil(recent[0] + 60 - now))
                return "too_many_calls", f"at most {per_minute} outbound calls per minute for this project", retry
        return None

    def placed(self, project: str) -> None:
        now = self.clock()
        self._recent(project, now).append(now)

    def _recent(self, project: str, now: float) -> deque[float]:
        q = self._placed.setdefault(project, deque())
        while q and q[0] <= now - 60:
            q.popleft()
        return q


class _MalformedHttp(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):  # a request aiohttp could not parse (it answered 400)
            source = record.args[0] if isinstance(record.args, tuple) and record.args else None
            record.msg, record.args, record.exc_info, record.exc_text = "http.malformed", (), None, None
            if record.levelno > logging.INFO:
                record.levelno, record.levelname = logging.INFO, "INFO"
            reason = str(exc.message).strip().splitlines()[0][:120] if exc.message else ""
            record.fields = {"source": source, "status": exc.code, "reason": reason}
            return logging.getLogger(record.name).isEnabledFor(record.levelno)
        return True


_FILTER = _MalformedHttp()


def quiet_malformed_http() -> None:
    """One line (event http.malformed) instead of an ERROR with a traceback for each unparseable request."""
    server = logging.getLogger("aiohttp.server")
    if _FILTER not in server.filters:
        server.addFilter(_FILTER)
