"""SDP (RFC 8866) for one audio stream, and the offer/answer rules of RFC 3264, sans-I/O."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

STATIC_CODECS = {0: "PCMU", 8: "PCMA"}
SUPPORTED = ("PCMU", "PCMA")
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
_REVERSE = {"sendrecv": "sendrecv", "sendonly": "recvonly", "recvonly": "sendonly", "inactive": "inactive"}


class SdpError(ValueError):
    pass


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
                    sdp.session_id = int(parts[1]) if parts[1].isdigit() else 0
                    sdp.session_version = int(parts[2]) if parts[2].isdigit() else 0
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
                if len(parts) < 4 or not parts[1].split("/")[0].isdigit():
                    raise SdpError(f"malformed m= line {value!r}")
                fmts = [int(f) for f in parts[3:] if f.isdigit() and int(f) < 128]
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
                    if pt_text.isdigit():
                        target = current.rtpmap if name == "rtpmap" else current.fmtp
                        target[int(pt_text)] = rest.strip()
                elif current is not None and name == "ptime" and arg.strip().isdigit():
                    current.ptime = int(arg.strip())
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


def negotiate(offer: SessionDescription, preferences: tuple[str, ...] = SUPPORTED) -> MediaParams:
    """Pick a codec from an offer (the offerer's order, among those we support)."""
    audio = offer.audio()
    if audio is None:
        raise SdpError("no audio stream offered")
    if audio.proto.upper() not in ("RTP/AVP", "RTP/AVPF"):
        raise SdpError(f"unsupported media transport {audio.proto}")
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
        direction=_REVERSE[offer.media_direction(audio)], ptime=audio.ptime or 20,
    )


_versions = itertools.count(1)


def build_sdp(
    address: str, port: int, codecs: list[tuple[str, int]], dtmf_pt: int | None, direction: str = "sendrecv",
    session_id: int = 0, version: int | None = None, ptime: int = 20,
) -> bytes:
    """An SDP body for one audio stream. `codecs` is [(name, payload type)] in preference order."""
    ip = "IP6" if ":" in address else "IP4"
    fmts = [pt for _, pt in codecs] + ([dtmf_pt] if dtmf_pt is not None else [])
    lines = [
        "v=0",
        f"o=gateway {session_id} {version if version is not None else next(_versions)} IN {ip} {address}",
        "s=gateway",
        f"c=IN {ip} {address}",
        "t=0 0",
        f"m=audio {port} RTP/AVP {' '.join(str(f) for f in fmts)}",
    ]
    for name, pt in codecs:
        lines.append(f"a=rtpmap:{pt} {name}/8000")
    if dtmf_pt is not None:
        lines += [f"a=rtpmap:{dtmf_pt} telephone-event/8000", f"a=fmtp:{dtmf_pt} 0-16"]
    lines += [f"a=ptime:{ptime}", f"a={direction}"]
    return ("\r\n".join(lines) + "\r\n").encode()
