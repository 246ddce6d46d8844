"""REGISTER client for providers that deliver DIDs to a registered contact (RFC 3261 section 10).

Digest (qop=auth, MD5 or SHA-256) on 401/407, refresh before the granted expiry, exponential backoff on
failure. The registrar's address is trusted for inbound INVITEs of that trunk.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import uuid

from .. import log
from ..config import TrunkConfig
from ..sip.auth import Credentials, DigestClient
from ..sip.message import Headers, NameAddr, Request, Response, SipUri, ascii_digits
from ..sip.transaction import Target, new_tag

logger = logging.getLogger("gateway.register")

RETRY_MIN = 5.0
RETRY_MAX = 300.0


def retry_delay(failures: int) -> float:
    """Backoff after `failures` consecutive failures: 5, 10, 20, ... capped at 300 s."""
    return min(RETRY_MAX, RETRY_MIN * 2 ** max(0, failures - 1))


def refresh_delay(granted: int) -> float:
    """When to refresh a binding granted for `granted` seconds: well before it expires."""
    return granted / 2 if granted < 120 else granted - 60


def granted_expires(response: Response, contact_uri: str, requested: int) -> int:
    for value in response.headers.get_all("contact"):
        try:
            addr = NameAddr.parse(value)
        except ValueError:
            continue
        if str(addr.uri).split(";")[0] == contact_uri.split(";")[0] and ascii_digits(addr.params.get("expires") or ""):
            return int(addr.params["expires"] or requested)
    expires = response.headers.get("expires")
    return int(expires) if expires and ascii_digits(expires.strip()) else requested


class Registration:
    def __init__(self, ua, trunk: TrunkConfig) -> None:  # type: ignore[no-untyped-def]
        assert trunk.register is not None
        self.ua = ua
        self.trunk = trunk
        self.cfg = trunk.register
        self.registrar = SipUri.parse(self.cfg.registrar)
        self.call_id = f"{uuid.uuid4()}@gateway"
        self.tag = new_tag()
        self.cseq = 0
        self.digest = DigestClient(Credentials(self.cfg.username, self.cfg.password))
        self.state = "idle"
        self.failures = 0
        self.expires_at = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name=f"register-{self.trunk.name}")

    def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def _target(self) -> Target:
        transport = self.registrar.transport if self.registrar.transport in ("udp", "tcp", "tls") else "udp"
        if self.registrar.scheme == "sips":
            transport = "tls"
        host = name = self.registrar.host
        try:
            ipaddress.ip_address(host)
        except ValueError:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, family=0, type=0)
            host = str(infos[0][4][0])
        self.ua.trusted_sources[host] = self.trunk
        return Target(transport, host, self.registrar.port or (5061 if transport == "tls" else 5060), name=name)

    def _request(self, target: Target, authorization: tuple[str, str] | None) -> Request:
        self.cseq += 1
        user = self.cfg.username
        aor = f"<sip:{user}@{self.registrar.host}>"
        h = Headers()
        h.add("Max-Forwards", "70")
        h.add("From", f"{aor};tag={self.tag}")
        h.add("To", aor)
        h.add("Call-ID", self.call_id)
        h.add("CSeq", f"{self.cseq} REGISTER")
        h.add("Contact", f"<{self.contact_uri(target)}>")
        h.add("Expires", str(self.cfg.expires))
        h.add("User-Agent", self.ua.config.sip.user_agent)
        if authorization:
            h.add(*authorization)
        return Request("REGISTER", f"sip:{self.registrar.host}" + (f":{self.registrar.port}" if self.registrar.port else ""), h)

    def contact_uri(self, target: Target) -> str:
        contact = self.ua.contact(target.transport)  # <sip:gateway@host:port;transport=..>
        uri = NameAddr.parse(contact).uri
        uri.user = self.cfg.contact_user or self.cfg.username
        return str(uri)

    async def register_once(self) -> int | None:
        """One REGISTER (plus its authenticated retry). Returns the granted expiry, or None on failure."""
        target = await self._target()
        authorization = None
        for _attempt in range(3):
            request = self._request(target, authorization)
            response = await self.ua.request(request, target)
            if response is None:
                log.event(logger, "register.timeout", logging.WARNING, trunk=self.trunk.name, registrar=self.cfg.registrar)
                return None
            if response.status in (401, 407) and _attempt < 2:
                name = "www-authenticate" if response.status == 401 else "proxy-authenticate"
                challenge = response.headers.get(name)
                if challenge is None:
                    return None
                try:
                    value = self.digest.authorization(challenge, "REGISTER", request.uri)
                except ValueError as exc:
                    log.event(logger, "register.auth_unsupported", logging.ERROR, trunk=self.trunk.name, error=str(exc))
                    return None
                authorization = ("Authorization" if response.status == 401 else "Proxy-Authorization", value)
                continue
            if 200 <= response.status < 300:
                return granted_expires(response, self.contact_uri(target), self.cfg.expires)
            log.event(logger, "register.rejected", logging.WARNING, trunk=self.trunk.name, status=response.status,
                      reason=response.reason)
            return None
        return None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                granted = await self.register_once()
            except (OSError, ValueError) as exc:
                log.event(logger, "register.error", logging.WARNING, trunk=self.trunk.name, error=str(exc))
                granted = None
            if granted:
                self.state, self.failures = "registered", 0
                self.expires_at = loop.time() + granted
                delay = refresh_delay(granted)
                log.event(logger, "register.ok", trunk=self.trunk.name, registrar=self.cfg.registrar, expires=granted,
                          refresh_in=round(delay, 1))
            else:
                self.failures += 1
                self.state = "failed" if loop.time() >= self.expires_at else "registered"
                delay = retry_delay(self.failures)
                log.event(logger, "register.retry", logging.WARNING, trunk=self.trunk.name, failures=self.failures,
                          retry_in=delay)
            await asyncio.sleep(delay)
