"""What the room service checks of strangers: signed, expiring tokens; the WebSocket's Origin; display names;
authentication failures per source; the page's security headers.

Tokens are `EXPIRES.MAC`: the Unix time they expire at and an HMAC-SHA256 (128 bits, hex) over their purpose
and that time, keyed with the service secret (`room-service.json`, shared with the workers). Host links carry
one (`?host=`, days); the worker makes a fresh phone token for each join (a minute).

Display names follow the PRECIS nickname profile (RFC 8266: NFKC, every kind of space as one space, trimmed),
minus what would let a participant pass for someone else on the page: control, format (bidi overrides,
zero-width characters), private-use and unassigned code points, role tags such as "(moderator)" or "(you)",
and, in a browser's name, the phone marks and the "Phone" prefix the worker gives phones ("Phone ••••1234").
"""

from __future__ import annotations

import hashlib
import hmac
import re
import unicodedata
from urllib.parse import urlsplit

TOKEN_MAC_HEX = 32  # 128 bits
MAX_TOKEN = 80
CLOCK_SKEW_S = 30  # a phone token made by a worker whose clock is this far behind is still good

# -- tokens


def sign(secret: str, purpose: str, expires: int) -> str:
    mac = hmac.new(secret.encode(), f"{purpose}:{expires}".encode(), hashlib.sha256).hexdigest()[:TOKEN_MAC_HEX]
    return f"{expires}.{mac}"


def verify(secret: str, purpose: str, token: object, now: float, skew: float = 0) -> str:
    """"ok", "expired" or "invalid" (anything not made with the secret for this purpose, non-ASCII included)."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN or not token.isascii():
        return "invalid"
    expires, dot, mac = token.partition(".")
    if not dot or not expires.isdigit() or len(expires) > 12:
        return "invalid"
    if not hmac.compare_digest(mac.encode(), sign(secret, purpose, int(expires)).partition(".")[2].encode()):
        return "invalid"
    return "ok" if int(expires) + skew >= now else "expired"


# -- origins


def origin_of(url: str) -> str:
    """scheme://host[:port] of a URL, lower-case, default ports left out (as browsers send Origin)."""
    parts = urlsplit(url.strip())
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in ("http", "https") or not host:
        return ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        return ""
    default = 443 if scheme == "https" else 80
    return f"{scheme}://{host}" + (f":{port}" if port and port != default else "")


def same_host(origin: str, host: str) -> bool:
    """Whether `origin` names the host (and port) the request was sent to: its Host header."""
    netloc = origin.partition("://")[2]
    host = host.strip().lower()
    for suffix in (":80", ":443"):  # the Host header may name the default port; Origin never does
        if host.endswith(suffix) and origin == f"{'https' if suffix == ':443' else 'http'}://{host[:-len(suffix)]}":
            return True
    return bool(netloc) and netloc == host


def origin_allowed(origin: str | None, host: str, allowed: set[str]) -> bool:
    """A page may open the WebSocket if it comes from the service itself (the Host it was reached at, or
    `allowed`: room_service.url and allowed_origins). No Origin: not a browser (the worker's phones), which
    authenticates otherwise; "null" (sandboxes, files) is refused."""
    if origin is None:
        return True
    normal = origin_of(origin)
    return bool(normal) and (normal in allowed or same_host(normal, host))


# -- display names

PHONE_MARKS = frozenset("\u260e\u260f\u2706\u2121\u2022\u2219\u25cf\u00b7\u2024"
                        "\U0001f4de\U0001f4f1\U0001f4f2\U0001f57b\U0001f57c\U0001f57d")  # phones, and the mask's dots
ROLE_TAG = re.compile(r"[(\[{<]\s*(?:moderator|mod|host|co-?host|organi[sz]er|admin|owner|you|me|phone)\s*[)\]}>]",
                      re.IGNORECASE)
PHONE_PREFIX = re.compile(r"^\W*(?:tele)?phone\b\W*", re.IGNORECASE)
DROPPED = frozenset(("Cc", "Cf", "Co", "Cs", "Cn"))


def clean_name(raw: object, kind: str, max_len: int) -> str:
    """The name to show for a participant ("" if nothing is left: the caller picks a default)."""
    if not isinstance(raw, str):
        return ""
    text = unicodedata.normalize("NFKC", raw[: 4 * max_len])
    out: list[str] = []
    marks = 0
    for ch in text:
        category = unicodedata.category(ch)
        if category[0] == "Z" or ch in "\t\n\r\x0b\x0c":
            out.append(" ")
        elif category in DROPPED or (kind == "browser" and ch in PHONE_MARKS):
            continue
        elif category == "Mn":
            marks += 1
            if marks <= 2:  # accents, not a tower of them over the neighbours' names
                out.append(ch)
            continue
        else:
            out.append(ch)
        marks = 0
    name, previous = " ".join("".join(out).split()), None
    while name != previous:  # until nothing is left to take out ("(mod(moderator)erator)")
        previous = name
        name = ROLE_TAG.sub("", name)
        if kind == "browser":
            name = PHONE_PREFIX.sub("", name)
        name = " ".join(name.split())
    return name[:max_len].strip()


# -- the page's headers

HOST_HEADER = re.compile(r"^[A-Za-z0-9.\-]+(?::\d{1,5})?$|^\[[0-9A-Fa-f:.]+\](?::\d{1,5})?$")


def page_headers(host: str) -> dict[str, str]:
    """The room page's headers: its scripts and styles from here only, no inline code, never framed, the
    host token in its URL never sent on as a Referer, WebSockets to this host only."""
    sockets = f" ws://{host} wss://{host}" if HOST_HEADER.match(host) else ""
    csp = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; media-src 'self'; "
           f"connect-src 'self'{sockets}; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")
    return {"Content-Security-Policy": csp, "X-Frame-Options": "DENY", "Cache-Control": "no-store"}


COMMON_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
