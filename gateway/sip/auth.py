"""HTTP Digest authentication for SIP (RFC 3261 section 22, RFC 7616 / RFC 8760): both sides, sans-I/O."""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import unquote

from .message import SipParseError, SipUri, _split_unquoted

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


def uri_matches(digest_uri: str, request_uri: str) -> bool:
    """Whether a digest `uri` names the resource of the Request-URI (RFC 7616 section 3.4.6).

    Same scheme and host; the same user when the digest uri has one; the same port when both give one.
    Parameters are not compared. This is the tolerance real clients need: sipp and some UAs write the
    domain (`sip:host:port`, no user) for every request, LiveKit drops the port and `;transport`. A replay
    to another number still fails: a user-part uri names the number, and a nonce count is used once.
    """
    if digest_uri == request_uri:
        return True
    try:
        d, r = SipUri.parse(digest_uri), SipUri.parse(request_uri)
    except SipParseError:
        return False
    if d.scheme != r.scheme or d.scheme not in ("sip", "sips") or d.host.lower() != r.host.lower():
        return False
    if d.user is not None and unquote(d.user) != unquote(r.user or ""):
        return False
    return d.port is None or r.port is None or d.port == r.port


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


@dataclass(frozen=True)
class DigestResult:
    """What `DigestServer.check` found. `user` is set only when the request is authenticated.

    Otherwise `status` is the answer: 401 (a new challenge; with `stale` when the credentials were right
    but the nonce is expired or its count was used before, RFC 7616 section 3.3) or 400 (the `uri`
    is not the Request-URI, RFC 7616 section 3.4.6). `reason` names the check that failed, for the log.
    """

    user: str | None
    status: int = 0
    stale: bool = False
    reason: str = ""


class DigestServer:
    """Issues challenges and verifies answers.

    A nonce is `time.salt.mac`, the MAC an HMAC-SHA256 (secret of this process) over the time, the salt,
    the realm and the address the challenge went to: it is valid `lifetime` s and only from that address.
    Nothing is stored for a challenge. Once a nonce has authenticated a request, its nonce count is kept
    (bounded: `max_nonces`, dropped when expired) and every later request with it must carry a higher
    `nc` (qop=auth; a nonce without qop is good for one request), like Kamailio's auth `nonce_count`. When
    the cap pushes out a nonce that is still alive, every nonce issued up to then counts as stale, so a
    forgotten count never lets a replay through (the client just answers a fresh challenge).
    """

    def __init__(self, realm: str, secret: bytes | None = None, lifetime: float = 300.0,
                 algorithms: tuple[str, ...] = ("SHA-256", "MD5"), max_nonces: int = 10_000) -> None:
        self.realm = realm
        self.algorithms = algorithms
        self._secret = secret or os.urandom(32)
        self.lifetime = lifetime
        self.max_nonces = max_nonces
        self._counts: OrderedDict[str, tuple[int, int]] = OrderedDict()  # nonce -> (issued, last nc)
        self._floor = -1  # nonces issued at or before this time with no count kept are stale

    def _mac(self, stamp: str, salt: str, source: str) -> str:
        text = f"{stamp}:{salt}:{self.realm}:{source}".encode()
        return hmac.new(self._secret, text, hashlib.sha256).hexdigest()[:32]

    def _nonce(self, now: float, source: str) -> str:
        stamp, salt = f"{int(now):x}", os.urandom(6).hex()
        return f"{stamp}.{salt}.{self._mac(stamp, salt, source)}"

    def _issued(self, nonce: str, source: str) -> int | None:
        """When a nonce we made for `source` was issued; None if it is not one (forged, other address)."""
        stamp, salt, mac = (nonce.split(".") + ["", ""])[:3]
        if len(stamp) > 12 or not mac:
            return None
        try:
            issued = int(stamp, 16)
        except ValueError:
            return None
        return issued if hmac.compare_digest(mac, self._mac(stamp, salt, source)) else None

    def challenges(self, now: float | None = None, source: str = "", stale: bool = False) -> list[str]:
        """WWW-Authenticate values, one per algorithm, with a nonce good only from `source`."""
        nonce = self._nonce(time.time() if now is None else now, source)
        extra = ", stale=true" if stale else ""
        return [
            f'Digest realm="{self.realm}", nonce="{nonce}", algorithm={alg}, qop="auth"{extra}'
            for alg in self.algorithms
        ]

    def check(self, authorization: str, method: str, lookup: dict[str, str], now: float | None = None,
              source: str = "", request_uri: str | None = None) -> DigestResult:
        """Verify an Authorization header from `source` for a request to `request_uri`.

        `lookup` maps username -> password. With `request_uri` None the `uri` is not compared.
        """
        now = time.time() if now is None else now
        scheme, p = parse_auth_header(authorization)
        if scheme.lower() != "digest":
            return DigestResult(None, 401, reason="scheme")
        user = p.get("username", "")
        algorithm = p.get("algorithm", "MD5").upper()
        if user not in lookup or algorithm not in self.algorithms or p.get("realm") != self.realm:
            return DigestResult(None, 401, reason="credentials")
        nonce = p.get("nonce", "")
        issued = self._issued(nonce, source)
        if issued is None:
            return DigestResult(None, 401, reason="nonce")  # not ours, or issued to another address
        uri = p.get("uri", "")
        if request_uri is not None and not uri_matches(uri, request_uri):
            return DigestResult(None, 400, reason="uri_mismatch")
        qop = p.get("qop") or None
        nc_text = p.get("nc", "")
        if qop is not None and (qop != "auth" or len(nc_text) != 8 or not p.get("cnonce")):
            return DigestResult(None, 401, reason="qop")
        try:
            nc = int(nc_text, 16) if qop else 1
        except ValueError:
            return DigestResult(None, 401, reason="qop")
        expected = digest_response(algorithm, user, self.realm, lookup[user], method, uri, nonce, qop, nc_text,
                                   p.get("cnonce", ""))
        if not hmac.compare_digest(expected, p.get("response", "")):
            return DigestResult(None, 401, reason="response")
        # The credentials are right from here on: what is left is whether this nonce may still be used.
        self._expire(now)
        if not 0 <= now - issued <= self.lifetime:
            return DigestResult(None, 401, stale=True, reason="nonce_expired")
        kept = self._counts.get(nonce)
        if kept is None and issued <= self._floor:
            return DigestResult(None, 401, stale=True, reason="nonce_forgotten")
        if kept is not None and nc <= kept[1]:
            return DigestResult(None, 401, stale=True, reason="nonce_count_reused")
        self._counts[nonce] = (issued, nc)
        self._counts.move_to_end(nonce)
        while len(self._counts) > self.max_nonces:
            _, (old, _) = self._counts.popitem(last=False)
            self._floor = max(self._floor, old)
        return DigestResult(user)

    def _expire(self, now: float) -> None:
        while self._counts:
            issued, _ = next(iter(self._counts.values()))
            if now - issued <= self.lifetime:
                return
            self._counts.popitem(last=False)

    def verify(self, authorization: str, method: str, lookup: dict[str, str], now: float | None = None,
               source: str = "", request_uri: str | None = None) -> str | None:
        """The authenticated username, or None (see `check` for why)."""
        return self.check(authorization, method, lookup, now, source, request_uri).user
