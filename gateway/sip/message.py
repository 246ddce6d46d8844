"""SIP messages (RFC 3261 section 7): parse bytes into requests and responses, serialize them back.

Pure functions and small classes: no sockets, no clock. Anything malformed raises `SipParseError`,
which carries what could be parsed so that the caller can still answer 400.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

SIP_VERSION = "SIP/2.0"
MAX_MESSAGE_SIZE = 65535
MAX_HEADERS = 200

# RFC 3261 section 7.3.3 plus the later compact forms.
COMPACT_FORMS = {
    "a": "accept-contact",
    "b": "referred-by",
    "c": "content-type",
    "d": "request-disposition",
    "e": "content-encoding",
    "f": "from",
    "i": "call-id",
    "j": "reject-contact",
    "k": "supported",
    "l": "content-length",
    "m": "contact",
    "o": "event",
    "r": "refer-to",
    "s": "subject",
    "t": "to",
    "u": "allow-events",
    "v": "via",
    "x": "session-expires",
    "y": "identity",
}

# Canonical spelling used when we serialize a header we were given in another case.
CANONICAL = {
    "call-id": "Call-ID",
    "cseq": "CSeq",
    "www-authenticate": "WWW-Authenticate",
    "mime-version": "MIME-Version",
    "rseq": "RSeq",
    "rack": "RAck",
    "min-se": "Min-SE",
}

# Headers whose grammar is a comma-separated list (RFC 3261 section 7.3.1): they may be repeated or joined.
LIST_HEADERS = frozenset(
    {
        "via",
        "contact",
        "route",
        "record-route",
        "allow",
        "supported",
        "require",
        "proxy-require",
        "unsupported",
        "accept",
        "accept-encoding",
        "accept-language",
        "allow-events",
        "content-encoding",
        "in-reply-to",
        "warning",
    }
)

# Headers that must appear at most once (RFC 4475 section 3.3.8).
SINGLE_HEADERS = frozenset({"call-id", "cseq", "from", "to", "max-forwards", "content-length", "content-type"})

TOKEN_RE = re.compile(r"^[A-Za-z0-9\-.!%*_+`'~]+$")
STATUS_RE = re.compile(r"^SIP/(\d+\.\d+) (\d+)(?: (.*))?$")


def ascii_digits(text: str) -> bool:
    """str.isdigit() also passes "²" or "١", which int() then refuses with a bare ValueError: ASCII only."""
    return text.isascii() and text.isdigit()


class SipParseError(ValueError):
    """A message that cannot be accepted. `partial` holds what was parsed (for building a 400)."""

    def __init__(self, reason: str, partial: Message | None = None, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.partial = partial
        self.status = status


def canonical_name(name: str) -> str:
    low = name.strip().lower()
    low = COMPACT_FORMS.get(low, low)
    if low in CANONICAL:
        return CANONICAL[low]
    return "-".join(part.capitalize() for part in low.split("-"))


def split_commas(value: str) -> list[str]:
    """Split a header value on commas that are not inside quotes or <...>."""
    out: list[str] = []
    depth = 0
    quoted = False
    start = 0
    i = 0
    while i < len(value):
        ch = value[i]
        if quoted:
            if ch == "\\":
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
        elif ch == "<":
            depth += 1
        elif ch == ">":
            depth = max(0, depth - 1)
        elif ch == "," and depth == 0:
            part = value[start:i].strip()
            if part:
                out.append(part)
            start = i + 1
        i += 1
    if quoted:
        raise SipParseError("unterminated quoted string")
    part = value[start:].strip()
    if part:
        out.append(part)
    return out


class Headers:
    """Ordered, case-insensitive header fields; compact names are expanded on lookup."""

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        self._items: list[tuple[str, str]] = [(canonical_name(n), v) for n, v in items]

    @staticmethod
    def _key(name: str) -> str:
        low = name.lower()
        return COMPACT_FORMS.get(low, low)

    def get(self, name: str, default: str | None = None) -> str | None:
        key = self._key(name)
        for n, v in self._items:
            if n.lower() == key:
                return v
        return default

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def get_all(self, name: str) -> list[str]:
        """All values, with comma-joined list headers split into separate values."""
        key = self._key(name)
        values = [v for n, v in self._items if n.lower() == key]
        if key in LIST_HEADERS:
            return [part for v in values for part in split_commas(v)]
        return values

    def count(self, name: str) -> int:
        key = self._key(name)
        return sum(1 for n, _ in self._items if n.lower() == key)

    def add(self, name: str, value: str) -> None:
        self._items.append((canonical_name(name), value))

    def prepend(self, name: str, value: str) -> None:
        self._items.insert(0, (canonical_name(name), value))

    def set(self, name: str, value: str) -> None:
        """Replace every value of `name` by one value, keeping the first one's position."""
        key = self._key(name)
        for i, (n, _) in enumerate(self._items):
            if n.lower() == key:
                self._items[i] = (canonical_name(name), value)
                self._items = [
                    item for j, item in enumerate(self._items) if j <= i or item[0].lower() != key
                ]
                return
        self.add(name, value)

    def remove(self, name: str) -> None:
        key = self._key(name)
        self._items = [item for item in self._items if item[0].lower() != key]

    def items(self) -> Iterator[tuple[str, str]]:
        return iter(self._items)

    def copy(self) -> Headers:
        h = Headers()
        h._items = list(self._items)
        return h


# ---------------------------------------------------------------- parameters, URIs, addresses


def parse_params(text: str) -> dict[str, str | None]:
    """`;a=1;b;c="x"` -> {"a": "1", "b": None, "c": '"x"'} (names lower-cased, order kept)."""
    params: dict[str, str | None] = {}
    for part in _split_unquoted(text, ";"):
        part = part.strip()
        if not part:
            continue
        if "=" in part:
            k, v = part.split("=", 1)
            params[k.strip().lower()] = v.strip()
        else:
            params[part.lower()] = None
    return params


def format_params(params: dict[str, str | None]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


def _split_unquoted(text: str, sep: str) -> list[str]:
    out: list[str] = []
    buf: list[str] = []
    quoted = False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    out.append("".join(buf))
    return out


@dataclass
class SipUri:
    scheme: str = "sip"
    user: str | None = None
    password: str | None = None
    host: str = ""
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    headers: str | None = None

    @classmethod
    def parse(cls, text: str) -> SipUri:
        text = text.strip()
        if not text or any(c in text for c in " \t<>"):
            raise SipParseError(f"malformed URI {text[:60]!r}")
        scheme, sep, rest = text.partition(":")
        scheme = scheme.lower()
        if not sep or not TOKEN_RE.match(scheme):
            raise SipParseError(f"malformed URI {text[:60]!r}")
        if scheme not in ("sip", "sips"):
            # Absolute URI of another scheme (tel:, http:, ...): keep it opaque.
            return cls(scheme=scheme, host=rest)
        headers = None
        if "?" in rest:
            rest, headers = rest.split("?", 1)
        user = password = None
        if "@" in rest:
            userinfo, rest = rest.rsplit("@", 1)
            user, _, pw = userinfo.partition(":")
            password = pw or None
        hostport, _, paramtext = rest.partition(";")
        host, port = parse_hostport(hostport)
        return cls(scheme, user, password, host, port, parse_params(paramtext), headers)

    @property
    def transport(self) -> str:
        value = self.params.get("transport")
        return (value or ("tls" if self.scheme == "sips" else "udp")).lower()

    def __str__(self) -> str:
        if self.scheme not in ("sip", "sips"):
            return f"{self.scheme}:{self.host}"
        out = [self.scheme, ":"]
        if self.user is not None:
            out.append(self.user)
            if self.password is not None:
                out.append(":" + self.password)
            out.append("@")
        out.append(format_host(self.host))
        if self.port is not None:
            out.append(f":{self.port}")
        out.append(format_params(self.params))
        if self.headers:
            out.append("?" + self.headers)
        return "".join(out)


def parse_hostport(text: str) -> tuple[str, int | None]:
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SipParseError(f"malformed IPv6 reference {text[:60]!r}")
        host = text[1:end]
        rest = text[end + 1 :]
    else:
        host, _, port_text = text.partition(":")
        rest = ":" + port_text if _ else ""
    port = None
    if rest:
        if not rest.startswith(":") or not ascii_digits(rest[1:]) or not 0 < int(rest[1:]) < 65536:
            raise SipParseError(f"malformed port in {text[:60]!r}")
        port = int(rest[1:])
    if not host or any(c in host for c in " \t,;\"<>"):
        raise SipParseError(f"malformed host {text[:60]!r}")
    return host.lower(), port


def format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass
class NameAddr:
    """From, To, Contact, Route values: optional display name, URI, header parameters."""

    uri: SipUri
    display: str | None = None
    params: dict[str, str | None] = field(default_factory=dict)
    wildcard: bool = False

    @classmethod
    def parse(cls, text: str) -> NameAddr:
        text = text.strip()
        if text == "*":
            return cls(SipUri(), wildcard=True)
        display = None
        if "<" in text:
            before, _, after = text.partition("<")
            uri_text, sep, param_text = after.partition(">")
            if not sep:
                raise SipParseError(f"unterminated <> in {text[:60]!r}")
            before = before.strip()
            if before.startswith('"'):
                if len(before) < 2 or not before.endswith('"'):
                    raise SipParseError("unterminated quoted display name")
                display = before[1:-1]
            elif before:
                for word in before.split():
                    if not TOKEN_RE.match(word):
                        raise SipParseError(f"display name must be quoted: {before[:40]!r}")
                display = before
        else:
            # addr-spec form: parameters after the URI belong to the header, not the URI.
            if '"' in text:
                raise SipParseError(f"malformed address {text[:60]!r}")
            uri_text, _, param_text = text.partition(";")
            param_text = ";" + param_text if _ else ""
        uri = SipUri.parse(uri_text)
        return cls(uri, display, parse_params(param_text))

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    def __str__(self) -> str:
        if self.wildcard:
            return "*"
        disp = f'"{self.display}" ' if self.display else ""
        return f"{disp}<{self.uri}>{format_params(self.params)}"


@dataclass
class Via:
    transport: str
    host: str
    port: int | None = None
    params: dict[str, str | None] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Via:
        m = re.match(r"^\s*SIP\s*/\s*2\.0\s*/\s*([A-Za-z0-9\-]+)\s+([^;]+?)\s*(;.*)?$", text, re.S)
        if not m:
            raise SipParseError(f"malformed Via {text[:60]!r}")
        host, port = parse_hostport(m.group(2).replace(" ", ""))
        return cls(m.group(1).upper(), host, port, parse_params(m.group(3) or ""))

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    def __str__(self) -> str:
        port = f":{self.port}" if self.port else ""
        return f"SIP/2.0/{self.transport} {format_host(self.host)}{port}{format_params(self.params)}"


# ---------------------------------------------------------------- messages


class Message:
    headers: Headers
    body: bytes

    @property
    def call_id(self) -> str:
        return self.headers.get("call-id") or ""

    @property
    def cseq(self) -> tuple[int, str]:
        return parse_cseq(self.headers.get("cseq") or "")

    @property
    def vias(self) -> list[Via]:
        return [Via.parse(v) for v in self.headers.get_all("via")]

    @property
    def top_via(self) -> Via:
        return Via.parse(self.headers.get_all("via")[0])

    @property
    def from_(self) -> NameAddr:
        return NameAddr.parse(self.headers.get("from") or "")

    @property
    def to(self) -> NameAddr:
        return NameAddr.parse(self.headers.get("to") or "")

    @property
    def content_type(self) -> str:
        return (self.headers.get("content-type") or "").split(";")[0].strip().lower()

    def _head(self) -> str:
        raise NotImplementedError

    def serialize(self) -> bytes:
        self.headers.set("Content-Length", str(len(self.body)))
        lines = [self._head()]
        lines += [f"{n}: {v}" for n, v in self.headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape") + self.body

    def __bytes__(self) -> bytes:
        return self.serialize()


class Request(Message):
    def __init__(self, method: str, uri: str, headers: Headers | None = None, body: bytes = b"") -> None:
        self.method = method
        self.uri = uri
        self.headers = headers if headers is not None else Headers()
        self.body = body

    @property
    def ruri(self) -> SipUri:
        return SipUri.parse(self.uri)

    def _head(self) -> str:
        return f"{self.method} {self.uri} {SIP_VERSION}"

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri} call-id={self.call_id}>"


class Response(Message):
    def __init__(self, status: int, reason: str = "", headers: Headers | None = None, body: bytes = b"") -> None:
        self.status = status
        self.reason = reason or REASONS.get(status, "")
        self.headers = headers if headers is not None else Headers()
        self.body = body

    def _head(self) -> str:
        return f"{SIP_VERSION} {self.status} {self.reason}"

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason} call-id={self.call_id}>"


def parse_cseq(value: str) -> tuple[int, str]:
    parts = value.split()
    if len(parts) != 2 or not ascii_digits(parts[0]) or not TOKEN_RE.match(parts[1]):
        raise SipParseError(f"malformed CSeq {value[:40]!r}")
    number = int(parts[0])
    if number >= 2**31:
        raise SipParseError("CSeq number out of range")
    return number, parts[1]


def _split_head(data: bytes) -> tuple[str, bytes, bool]:
    """Return the header section text, the bytes after it, and whether a blank line was found."""
    for sep in (b"\r\n\r\n", b"\n\n"):
        idx = data.find(sep)
        if idx >= 0:
            return data[:idx].decode("utf-8", "surrogateescape"), data[idx + len(sep) :], True
    return data.decode("utf-8", "surrogateescape"), b"", False


def _unfold(head: str) -> list[str]:
    lines: list[str] = []
    for line in re.split(r"\r\n|\n|\r", head):
        if line[:1] in (" ", "\t") and lines:
            lines[-1] += " " + line.strip()
        else:
            lines.append(line)
    return lines


def parse_message(data: bytes, stream: bool = False) -> Request | Response:
    """Parse one message. On datagrams extra bytes after Content-Length are ignored (RFC 4475 3.1.1.8).

    With `stream=True` the caller has already framed the message by Content-Length.
    """
    if len(data) > MAX_MESSAGE_SIZE:
        raise SipParseError("message too large", status=513)
    data = data.lstrip(b"\r\n")
    head, rest, _complete = _split_head(data)
    lines = _unfold(head)
    start = lines[0]
    header_lines = lines[1:]
    if len(header_lines) > MAX_HEADERS:
        raise SipParseError("too many header fields")
    headers = Headers()
    bad_header = None
    for line in header_lines:
        if not line.strip():
            continue
        name, sep, value = line.partition(":")
        name = name.strip()
        if not sep or not TOKEN_RE.match(name):
            bad_header = bad_header or f"malformed header line {line[:40]!r}"
            continue
        headers.add(name, value.strip())

    msg: Request | Response
    m = STATUS_RE.match(start)
    if m:
        if m.group(1) != "2.0":
            raise SipParseError("unsupported SIP version")
        status = int(m.group(2)) if len(m.group(2)) == 3 else 0
        if not 100 <= status <= 699:
            raise SipParseError(f"status code {status} out of range")
        msg = Response(status, m.group(3) or "", headers)
        msg.reason = m.group(3) or ""
    else:
        parts = start.split(" ")
        if len(parts) != 3 or not all(parts):
            raise SipParseError("malformed request line", _partial(headers, start))
        method, uri, version = parts
        msg = Request(method, uri, headers)
        if not TOKEN_RE.match(method):
            raise SipParseError("malformed method", msg)
        if not version.upper().startswith("SIP/"):
            raise SipParseError("malformed request line", msg)
        if version.upper() != SIP_VERSION:
            raise SipParseError("SIP version not supported", msg, status=505)
        if uri.startswith("<"):
            raise SipParseError("Request-URI must not be enclosed in <>", msg)
        try:
            SipUri.parse(uri)
        except SipParseError as exc:
            raise SipParseError(exc.reason, msg) from None

    if bad_header:
        raise SipParseError(bad_header, msg)
    _frame_body(msg, rest, stream)
    _validate(msg)
    return msg


def _partial(headers: Headers, start: str) -> Request | None:
    parts = start.split()
    if len(parts) >= 2:
        return Request(parts[0], parts[1], headers)
    return None


def _frame_body(msg: Request | Response, rest: bytes, stream: bool) -> None:
    lengths = msg.headers.get_all("content-length")
    if len(lengths) > 1:
        raise SipParseError("multiple Content-Length values", msg if isinstance(msg, Request) else None)
    if not lengths:
        msg.body = rest
        return
    text = lengths[0].strip()
    if not ascii_digits(text):
        raise SipParseError("malformed Content-Length", msg if isinstance(msg, Request) else None)
    length = int(text)
    if length > len(rest):
        raise SipParseError("Content-Length larger than message", msg if isinstance(msg, Request) else None)
    msg.body = rest[:length]


def _validate(msg: Request | Response) -> None:
    partial = msg if isinstance(msg, Request) else None
    h = msg.headers
    for name in ("via", "from", "to", "call-id", "cseq"):
        if name not in h:
            raise SipParseError(f"missing {canonical_name(name)} header", partial)
    for name in SINGLE_HEADERS:
        if h.count(name) > 1:
            raise SipParseError(f"more than one {canonical_name(name)} header", partial)
    try:
        number, method = msg.cseq
        if not msg.vias:  # "Via:" with no value: nowhere to answer
            raise SipParseError("empty Via header", partial)
        msg.from_  # noqa: B018
        msg.to  # noqa: B018
        for contact in h.get_all("contact"):
            NameAddr.parse(contact)
    except SipParseError as exc:
        raise SipParseError(exc.reason, partial) from None
    mf = h.get("max-forwards")
    if mf is not None and (not ascii_digits(mf.strip()) or int(mf) > 255):
        raise SipParseError("malformed Max-Forwards", partial)
    expires = h.get("expires")
    if expires is not None and (not ascii_digits(expires.strip()) or int(expires) >= 2**32):
        raise SipParseError("malformed Expires", partial)
    if isinstance(msg, Request) and method != msg.method:
        unknown = msg.method not in KNOWN_METHODS
        raise SipParseError("CSeq method does not match the request", partial, status=501 if unknown else 400)


KNOWN_METHODS = frozenset(
    {"INVITE", "ACK", "BYE", "CANCEL", "OPTIONS", "REGISTER", "INFO", "UPDATE", "PRACK", "SUBSCRIBE", "NOTIFY", "REFER", "MESSAGE", "PUBLISH"}
)

REASONS = {
    100: "Trying",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    183: "Session Progress",
    200: "OK",
    202: "Accepted",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    413: "Request Entity Too Large",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    422: "Session Interval Too Small",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    491: "Request Pending",
    500: "Server Internal Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    603: "Decline",
}


def make_response(request: Request, status: int, reason: str = "", to_tag: str | None = None) -> Response:
    """A response that copies Via, From, To (adding our tag), Call-ID and CSeq (RFC 3261 8.2.6.2), and the
    Record-Route of a dialog-creating INVITE into its 1xx/2xx (RFC 3261 12.1.1), so the caller's in-dialog
    requests take the proxies that asked to stay on the path."""
    h = Headers()
    for via in request.headers.get_all("via"):
        h.add("Via", via)
    if request.method == "INVITE" and 100 < status < 300:
        for route in request.headers.get_all("record-route"):
            h.add("Record-Route", route)
    for name in ("from", "to", "call-id", "cseq"):
        value = request.headers.get(name)
        if value is not None:
            h.add(name, value)
    if to_tag and status != 100:
        to_value = h.get("to")
        if to_value is not None and ";tag=" not in to_value.replace(" ", "").lower():
            h.set("to", f"{to_value};tag={to_tag}")
    return Response(status, reason, h)
