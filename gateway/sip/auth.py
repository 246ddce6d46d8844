"""HTTP Digest authentication for SIP (RFC 3261 section 22, RFC 7616 / RFC 8760): both sides, sans-I/O."""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass

from .message import _split_unquoted

ALGORITHMS = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


def _h(algorithm: str, text: str) -> str:
    return ALGORITHMS[algorithm](text.encode("utf-8")).hexdigest()


def parse_auth_header(value: str) -> tuple[str, dict[str, str]]:
    """`Digest realm="x", nonce="y", qop="auth,auth-int"` -> ("Digest", {...})."""
    scheme, _, rest = value.strip().partition(" ")
    params: dict[str, str] = {}
    for part in _split_unquoted(rest, ","):
        k, sep, v = part.strip().partition("=")
        if not sep:
            continue
        v = v.strip()
        if len(v) >= 2 and v[0] == v[-1] == '"':
            v = v[1:-1]
        params[k.strip().lower()] = v
    return scheme, params


def digest_response(
    algorithm: str, username: str, realm: str, password: str, method: str, uri: str,
    nonce: str, qop: str | None, nc: str, cnonce: str,
) -> str:
    ha1 = _h(algorithm, f"{username}:{realm}:{password}")
    ha2 = _h(algorithm, f"{method}:{uri}")
    if qop:
        return _h(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return _h(algorithm, f"{ha1}:{nonce}:{ha2}")


@dataclass
class Credentials:
    username: str
    password: str


class DigestClient:
    """Answers a 401/407 challenge; keeps the nonce count across requests (RFC 7616 section 3.4)."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials
        self._nonce = ""
        self._nc = 0

    def authorization(self, challenge: str, method: str, uri: str) -> str:
        scheme, p = parse_auth_header(challenge)
        if scheme.lower() != "digest":
            raise ValueError(f"unsupported auth scheme {scheme}")
        algorithm = p.get("algorithm", "MD5").upper()
        if algorithm not in ALGORITHMS:
            raise ValueError(f"unsupported digest algorithm {algorithm}")
        nonce = p.get("nonce", "")
        if nonce != self._nonce:
            self._nonce, self._nc = nonce, 0
        qops = [q.strip() for q in p.get("qop", "").split(",") if q.strip()]
        qop = "auth" if "auth" in qops else None
        if qops and qop is None:
            raise ValueError("only qop=auth is supported")
        self._nc += 1
        nc = f"{self._nc:08x}"
        cnonce = os.urandom(8).hex()
        realm = p.get("realm", "")
        resp = digest_response(
            algorithm, self.credentials.username, realm, self.credentials.password, method, uri,
            nonce, qop, nc, cnonce,
        )
        fields = [
            f'username="{self.credentials.username}"', f'realm="{realm}"', f'nonce="{nonce}"',
            f'uri="{uri}"', f'response="{resp}"', f"algorithm={algorithm}",
        ]
        if qop:
            fields += [f"qop={qop}", f"nc={nc}", f'cnonce="{cnonce}"']
        if "opaque" in p:
            fields.append(f'opaque="{p["opaque"]}"')
        return "Digest " + ", ".join(fields)


class DigestServer:
    """Issues challenges and verifies answers. Nonces are stateless: time + HMAC, valid `lifetime` s."""

    def __init__(self, realm: str, secret: bytes | None = None, lifetime: float = 300.0,
                 algorithms: tuple[str, ...] = ("SHA-256", "MD5")) -> None:
        self.realm = realm
        self.algorithms = algorithms
        self._secret = secret or os.urandom(32)
        self.lifetime = lifetime

    def _nonce(self, now: float) -> str:
        stamp = f"{int(now):x}"
        mac = hmac.new(self._secret, stamp.encode(), hashlib.sha256).hexdigest()[:24]
        return f"{stamp}.{mac}"

    def _nonce_ok(self, nonce: str, now: float) -> bool:
        stamp, _, mac = nonce.partition(".")
        good = hmac.new(self._secret, stamp.encode(), hashlib.sha256).hexdigest()[:24]
        try:
            issued = int(stamp, 16)
        except ValueError:
            return False
        return hmac.compare_digest(mac, good) and 0 <= now - issued <= self.lifetime

    def challenges(self, now: float | None = None) -> list[str]:
        nonce = self._nonce(time.time() if now is None else now)
        return [
            f'Digest realm="{self.realm}", nonce="{nonce}", algorithm={alg}, qop="auth"'
            for alg in self.algorithms
        ]

    def verify(self, authorization: str, method: str, lookup: dict[str, str], now: float | None = None) -> str | None:
        """Return the authenticated username, or None. `lookup` maps username -> password."""
        scheme, p = parse_auth_header(authorization)
        if scheme.lower() != "digest":
            return None
        user = p.get("username", "")
        algorithm = p.get("algorithm", "MD5").upper()
        if user not in lookup or algorithm not in self.algorithms or p.get("realm") != self.realm:
            return None
        if not self._nonce_ok(p.get("nonce", ""), time.time() if now is None else now):
            return None
        qop = p.get("qop") or None
        expected = digest_response(
            algorithm, user, self.realm, lookup[user], method, p.get("uri", ""), p.get("nonce", ""),
            qop, p.get("nc", ""), p.get("cnonce", ""),
        )
        return user if hmac.compare_digest(expected, p.get("response", "")) else None
