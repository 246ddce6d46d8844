"""SDP (RFC 8866) for one audio stream, and the offer/answer rules of RFC 3264, sans-I/O.

SRTP keys travel in the SDP (SDES, RFC 4568): `a=crypto:<tag> <suite> inline:<base64 key||salt>`. A trunk's
`media_encryption` decides what an offer may be: "none" takes plain RTP only (an RTP/SAVP offer is refused),
"optional" takes either (and SRTP when an RTP/AVP offer carries a crypto line we can use: best-effort SDES),
"required" takes only RTP/SAVP with a crypto line we can use. Refusals raise SdpError (488 by the caller)."""

from __future__ import annotations

import base64
import binascii
import itertools
import re
from dataclasses import dataclass, field

from .message import ascii_digits

STATIC_CODECS = {0: "PCMU", 8: "PCMA"}
SUPPORTED = ("PCMU", "PCMA")
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
_REVERSE = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}


# The SDES suites we take, best first; both use a 16-byte AES key and a 14-byte salt (30 bytes inline).
SUITES = ("AES_CM_128_HMAC_SHA1_80", "AES_CM_128_HMAC_SHA1_32")
KEY_LENGTH = 30
SECURE = ("RTP/SAVP", "RTP/SAVPF")
PLAIN = ("RTP/AVP", "RTP/AVPF")


class SdpError(ValueError):
    pass


_DIGITS = re.compile(r"[0-9]{1,9}")
_LIFETIME = re.compile(r"(?:[0-9]{1,20}|2\^[0-9]{1,2})")


def _digits(text: str) -> bool:
    """ASCII digits (`ascii_digits`), at most nine of them: a port, a payload type, a ptime, a crypto tag."""
    return _DIGITS.fullmatch(text) is not None


@dataclass(frozen=True)
class Crypto:
    """One `a=crypto` line (RFC 4568) we can use: one inline key, no MKI, no session parameters."""

    tag: int
    suite: str
    key: bytes = field(repr=False)  # master key || master salt: never in a repr (logs, exceptions)

    @classmethod
    def parse(cls, value: str) -> Crypto | None:
        """The line's value after `a=crypto:`, or None for a suite, key or parameter we do not take."""
        parts = value.split()
        if len(parts) != 3 or not _digits(parts[0]) or parts[1] not in SUITES:
            return None  # session parameters (UNENCRYPTED_SRTP, KDR=...) or an unknown suite
        if ";" in parts[2] or parts[2][:7].lower() != "inline:":
            return None  # several keys need MKIs
        key_text, *params = parts[2][7:].split("|")
        if len(params) > 1 or any(_LIFETIME.fullmatch(p) is None for p in params):
            return None  # an MKI ("1:4": libsrtp would need it in every packet), or junk; a lifetime alone is fine
        try:
            key = base64.b64decode(key_text, validate=True)
        except (binascii.Error, ValueError):
            return None
        if len(key) != KEY_LENGTH:
            return None
        return cls(int(parts[0]), parts[1], key)

    def line(self) -> str:
        return f"a=crypto:{self.tag} {self.suite} inline:{base64.b64encode(self.key).decode()}"


@dataclass
class MediaDescription:
    media: str
    port: int
    proto: str
    formats: list[int]
    rtpmap: dict[int, str] = field(default_factory=dict)  # pt -> "PCMU/8000"
    fmtp: dict[int, str] = field(default_factory=dict)
    direction: str | None = None
    connection: str | None = None
    ptime: int | None = None
    crypto: list[Crypto] = field(default_factory=list)  # the usable a=crypto lines, in the offer's order
    crypto_lines: int = 0  # every a=crypto line, usable or not


@dataclass
class SessionDescription:
    origin_user: str = "-"
    session_id: int = 0
    session_version: int = 0
    address: str = "0.0.0.0"
    connection: str | None = None
    direction: str = "sendrecv"
    media: list[MediaDescription] = field(default_factory=list)

    @classmethod
    def parse(cls, data: bytes | str) -> SessionDescription:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        sdp = cls()
        current: MediaDescription | None = None
        saw_version = False
        for raw in text.splitlines():
            line = raw.strip()
            if len(line) < 2 or line[1] != "=":
                continue
            kind, value = line[0], line[2:]
            if kind == "v":
                saw_version = True
            elif kind == "o":
                parts = value.split()
                if len(parts) >= 6:
                    sdp.origin_user = parts[0]
                    sdp.session_id = int(parts[1]) if ascii_digits(parts[1]) else 0
                    sdp.session_version = int(parts[2]) if ascii_digits(parts[2]) else 0
                    sdp.address = parts[5]
            elif kind == "c":
                parts = value.split()
                if len(parts) < 3:
                    raise SdpError(f"malformed c= line {value!r}")
                addr = parts[2].split("/")[0]
                if current is None:
                    sdp.connection = addr
                else:
                    current.connection = addr
            elif kind == "m":
                parts = value.split()
                if len(parts) < 4 or not _digits(parts[1].split("/")[0]):
                    raise SdpError(f"malformed m= line {value!r}")
                fmts = [int(f) for f in parts[3:] if _digits(f) and int(f) < 128]
                current = MediaDescription(parts[0], int(parts[1].split("/")[0]), parts[2], fmts)
                sdp.media.append(current)
            elif kind == "a":
                name, _, arg = value.partition(":")
                if name in DIRECTIONS:
                    if current is None:
                        sdp.direction = name
                    else:
                        current.direction = name
                elif current is not None and name in ("rtpmap", "fmtp"):
                    pt_text, _, rest = arg.partition(" ")
                    if _digits(pt_text):
                        target = current.rtpmap if name == "rtpmap" else current.fmtp
                        target[int(pt_text)] = rest.strip()
                elif current is not None and name == "ptime" and _digits(arg.strip()):
                    current.ptime = int(arg.strip())
                elif current is not None and name == "crypto":
                    current.crypto_lines += 1
                    if (crypto := Crypto.parse(arg)) is not None:
                        current.crypto.append(crypto)
        if not saw_version:
            raise SdpError("not an SDP body (no v= line)")
        return sdp

    def audio(self) -> MediaDescription | None:
        return next((m for m in self.media if m.media == "audio" and m.port != 0), None)

    def media_address(self, m: MediaDescription) -> str | None:
        return m.connection or self.connection

    def media_direction(self, m: MediaDescription) -> str:
        direction = m.direction or self.direction
        if self.media_address(m) in ("0.0.0.0", "::"):
            return "inactive"  # RFC 2543 style hold
        return direction


def codec_name(m: MediaDescription, pt: int) -> str | None:
    if pt in m.rtpmap:
        enc = m.rtpmap[pt].split("/")
        rate = enc[1] if len(enc) > 1 else "8000"
        return f"{enc[0].upper()}/{rate}"
    if pt in STATIC_CODECS:
        return f"{STATIC_CODECS[pt]}/8000"
    return None


@dataclass
class MediaParams:
    """The outcome of a negotiation: what we send and accept."""

    remote_host: str
    remote_port: int
    codec: str  # PCMU or PCMA
    payload_type: int
    dtmf_pt: int | None
    direction: str  # our direction: sendrecv, sendonly, recvonly, inactive
    ptime: int = 20
    proto: str = "RTP/AVP"  # the m= line's transport: an answer repeats the offer's
    crypto: Crypto | None = None  # SRTP: the peer's suite, tag and key (what it sends with); None: plain RTP

    @property
    def encryption(self) -> str:
        """What the CDR and the metrics say: "srtp" or "none"."""
        return "srtp" if self.crypto is not None else "none"


@dataclass(frozen=True)
class OurOffer:
    """What our last offer said of security: its m= transport and crypto lines (an answer must match them)."""

    proto: str = "RTP/AVP"
    crypto: tuple[Crypto, ...] = ()


def choose_crypto(audio: MediaDescription, encryption: str, answering: OurOffer | None = None) -> Crypto | None:
    """The crypto line to use for this media line under a trunk's `encryption`, or None for plain RTP; SdpError
    when the trunk's rule refuses it. `answering`: `audio` answers our offer, so it must keep the offer's
    transport and carry exactly one of our lines (same tag and suite), or none when we offered none
    (RFC 3264 6, RFC 4568 5.1.2)."""
    proto = audio.proto.upper()
    if proto not in SECURE + PLAIN:
        raise SdpError(f"unsupported media transport {audio.proto}")
    secure = proto in SECURE
    if answering is not None:
        if proto.replace("SAVP", "AVP") != answering.proto.upper().replace("SAVP", "AVP") or \
                secure != (answering.proto.upper() in SECURE):
            raise SdpError(f"the answer's transport {audio.proto} is not our offer's {answering.proto}")
        if audio.crypto_lines > 1:
            raise SdpError("an answer carries one a=crypto line at most")
        if audio.crypto_lines and not answering.crypto:
            raise SdpError("an a=crypto line in the answer to an offer without one")
    usable = [c for c in audio.crypto if answering is None
              or any(o.tag == c.tag and o.suite == c.suite for o in answering.crypto)]
    if encryption == "none":
        if secure:
            raise SdpError(f"{audio.proto} (SRTP) offered: this trunk takes plain RTP (media_encryption none)")
        return None
    if encryption == "required" and not secure:
        raise SdpError(f"plain {audio.proto} offered: this trunk requires SRTP (media_encryption required)")
    if not usable:
        if secure or encryption == "required":
            what = "no a=crypto line" if not audio.crypto_lines else "no usable a=crypto line (suite, MKI, key)"
            raise SdpError(f"{what}: SDES with {' or '.join(SUITES)} and one inline key is supported")
        return None  # optional: plain RTP (with any unusable crypto lines ignored)
    return usable[0]


def negotiate(offer: SessionDescription, preferences: tuple[str, ...] = SUPPORTED, encryption: str = "none",
              answering: OurOffer | None = None) -> MediaParams:
    """Pick a codec from an offer (the offerer's order, among those we support) and SRTP as `encryption` (the
    trunk's media_encryption) allows; `answering`: what we offered, when `offer` is the answer to it."""
    audio = offer.audio()
    if audio is None:
        raise SdpError("no audio stream offered")
    crypto = choose_crypto(audio, encryption, answering)
    chosen: tuple[str, int] | None = None
    dtmf_pt = None
    for pt in audio.formats:
        name = codec_name(audio, pt)
        if name is None:
            continue
        enc, rate = name.split("/")
        if enc == "TELEPHONE-EVENT" and rate == "8000" and dtmf_pt is None:
            dtmf_pt = pt
        elif chosen is None and enc in preferences and rate == "8000":
            chosen = (enc, pt)
    if chosen is None:
        raise SdpError("no common codec (PCMU or PCMA)")
    host = offer.media_address(audio)
    if host is None:
        raise SdpError("no connection address")
    return MediaParams(
        remote_host=host, remote_port=audio.port, codec=chosen[0], payload_type=chosen[1], dtmf_pt=dtmf_pt,
        direction=_REVERSE[offer.media_direction(audio)], ptime=audio.ptime or 20, proto=audio.proto.upper(),
        crypto=crypto,
    )


_versions = itertools.count(1)


def build_sdp(
    address: str, port: int, codecs: list[tuple[str, int]], dtmf_pt: int | None, direction: str = "sendrecv",
    session_id: int = 0, version: int | None = None, ptime: int = 20, proto: str = "RTP/AVP",
    crypto: list[Crypto] | tuple[Crypto, ...] = (),
) -> bytes:
    """An SDP body for one audio stream. `codecs` is [(name, payload type)] in preference order; `crypto`: our
    SDES lines (an offer: one per suite; an answer: the chosen tag and suite with our key)."""
    ip = "IP6" if ":" in address else "IP4"
    fmts = [pt for _, pt in codecs] + ([dtmf_pt] if dtmf_pt is not None else [])
    lines = [
        "v=0",
        f"o=gateway {session_id} {version if version is not None else next(_versions)} IN {ip} {address}",
        "s=gateway",
        f"c=IN {ip} {address}",
        "t=0 0",
        f"m=audio {port} {proto} {' '.join(str(f) for f in fmts)}",
    ]
    lines += [c.line() for c in crypto]
    for name, pt in codecs:
        lines.append(f"a=rtpmap:{pt} {name}/8000")
    if dtmf_pt is not None:
        lines += [f"a=rtpmap:{dtmf_pt} telephone-event/8000", f"a=fmtp:{dtmf_pt} 0-16"]
    lines += [f"a=ptime:{ptime}", f"a={direction}"]
    return ("\r\n".join(lines) + "\r\n").encode()
