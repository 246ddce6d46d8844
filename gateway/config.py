"""Configuration: embedded defaults, `config/gateway.toml`, environment overrides; validated at start.

Every error names the file and the key (`config/gateway.toml: sip.port: must be ...`). Environment
variables override scalar keys: `GATEWAY_<SECTION>_<KEY>`, e.g. `GATEWAY_SIP_PORT=5070`,
`GATEWAY_RTP_PORT_MIN=30000`; values are read as TOML (so `["udp"]` is a list), else as a string.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import shutil
import ssl
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    pass


@dataclass
class SipConfig:
    host: str = "127.0.0.1"
    port: int = 5060
    transports: list[str] = field(default_factory=lambda: ["udp", "tcp"])  # and "tls" (on tls_port)
    tls_port: int = 5061
    tls_cert: str = ""  # PEM chain and key for SIP over TLS (TLS 1.2+); required with "tls" in transports
    tls_key: str = ""
    tls_ca: str = ""  # PEM CAs trusted for outgoing TLS connections (trunks' proxies) besides the system's
    tls_client_ca: str = ""  # PEM CAs for client certificates: the TLS listener asks for one (trunks' mutual TLS)
    public_host: str = ""  # address written in Contact and SDP; defaults to host
    user_agent: str = "gateway"
    session_expires: int = 1800  # RFC 4028 interval we ask for / accept
    min_se: int = 90
    max_calls: int = 500
    # Digest challenges sent to trunks outside the allow-list, in order of preference (RFC 8760). Some
    # clients (sipp among them) read only the first challenge and know only MD5: put "MD5" first for them.
    digest_algorithms: list[str] = field(default_factory=lambda: ["SHA-256", "MD5"])
    digest_nonce_lifetime_s: int = 300  # a nonce is good for this long, from the address it was sent to
    # Flood limits (Kamailio's pike is the model). They spare trusted peers: trunk `sources`, registrars,
    # outbound proxies given as addresses, cluster.lb_sources.
    rate_limit_per_source: int = 50  # SIP messages a second from one address (IPv6: one /64); 0 = off ...
    rate_limit_burst: int = 200  # ... in bursts of up to this many; beyond, dropped unanswered
    max_connections: int = 2000  # TCP connections in all; the last tenth only for trusted peers
    max_connections_per_source: int = 50  # TCP connections from one untrusted address (IPv6: one /64)
    tcp_first_message_s: int = 5  # a new connection must deliver a whole SIP message within this, or is closed
    tcp_idle_s: int = 600  # a connection without a whole message (or keep-alive ping) for this long is closed


@dataclass
class RtpConfig:
    port_min: int = 20000
    port_max: int = 29999
    jitter_min_ms: int = 20
    jitter_max_ms: int = 200
    codecs: list[str] = field(default_factory=lambda: ["PCMU", "PCMA"])
    telephone_event_pt: int = 101  # the payload type we offer; we accept whatever the peer offers
    strict_learning_ms: int = 2000  # strict RTP: window after the answer / a re-INVITE in which the source is learned
    strict_learning_packets: int = 4  # packets in sequence that latch a source other than the SDP's (NAT)


@dataclass
class HttpConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    tls_cert: str = ""  # PEM chain: the Voice API over HTTPS (TLS 1.2+, with HSTS); empty = plain HTTP
    tls_key: str = ""


@dataclass
class DataConfig:
    dir: str = "data"


@dataclass
class IvrConfig:
    attempts: int = 3  # per step (meeting ID, PIN)
    first_digit_timeout_ms: int = 10000
    inter_digit_timeout_ms: int = 5000
    max_digits: int = 16
    prompts_dir: str = "prompts"  # texts <lang>.toml and recorded overrides <lang>/<key>.wav
    pin_failures_per_caller: int = 10  # failed PINs per caller number (within its trunk) ...
    pin_failures_per_source: int = 20  # ... and per source address, within the window; beyond: refused (0 = off)
    meeting_id_failures_per_caller: int = 10  # wrong meeting IDs per caller number ...
    meeting_id_failures_per_source: int = 20  # ... and per source address, within the window (0 = off)
    pin_failures_per_meeting: int = 30  # per meeting: a budget, never a lock; beyond it each PIN check waits ...
    pin_backoff_ms: int = 1000  # ... this long, doubling with each further failure ...
    pin_backoff_max_ms: int = 10000  # ... up to this
    pin_failure_window_s: int = 900  # failures count for this long
    shared_directory: bool = False  # meeting IDs of every project resolve on every IVR DID (else: the DID's project)


@dataclass
class RoomsConfig:
    meeting_id_digits: int = 9
    pin_digits: int = 6


@dataclass
class DirectoryConfig:
    kind: str = "embedded"  # embedded (local rooms) | http (an external room service)
    url: str = ""
    username: str = ""
    password: str = ""
    timeout_ms: int = 3000


@dataclass
class MenuConfig:
    """In-call keypad menu: `*` then the key. Everyone: mute_self, help, count; moderators also the rest."""

    mute_self: str = "6"
    help: str = "1"
    count: str = "#"
    mute_all: str = "4"
    lock: str = "5"
    unmute_all: str = "9"


@dataclass
class RoomServiceConfig:
    embedded: bool = True  # `gateway run` starts `gateway rooms serve` beside the worker
    host: str = "127.0.0.1"
    port: int = 8090
    url: str = ""  # how the gateway and browsers reach it; empty = http(s)://host:port
    tls_cert: str = ""  # PEM chain: the room page over HTTPS (browsers give camera and microphone to HTTPS pages)
    tls_key: str = ""
    api_user: str = "demo"
    api_key: str = ""  # empty: generated once into DATA_DIR/room-service.json
    secret: str = ""  # gateway <-> room service token secret; empty: generated into the same file
    mask_digits: int = 4  # a phone participant is shown as its caller number's last N digits
    voice_api_url: str = ""  # where the room page's "call a phone" goes; empty = this host's http.host:http.port
    allowed_origins: list[str] = field(default_factory=list)  # more page origins that may open the room WebSocket
    host_link_days: int = 30  # a moderator (host) link expires this long after it was made
    max_participants: int = 50  # per room, phones included; the next join gets room_full
    auth_failures_per_minute: int = 20  # per source address (IPv6: /64); beyond, 429 until the minute ends


# Dial-out destinations denied unless a project's or the operator's rules say otherwise: premium-rate and
# revenue-share ranges (the toll-fraud targets), ITU international premium rate, satellite and international
# networks. A starting point, not a complete list: carriers publish their own (README "Security").
PREMIUM_PREFIXES = [
    "+1900", "+1976",                          # NANP premium rate (900, 976)
    "+449", "+4487", "+4470",                  # UK: 09 premium rate, 087 revenue sharing, 070 personal numbers
    "+49900", "+49137",                        # Germany: 0900 premium rate, 0137 mass calling
    "+3389",                                   # France: 089 premium rate
    "+39892", "+39894", "+39895", "+39899",    # Italy: 89x premium rate
    "+34803", "+34806", "+34807", "+34905",    # Spain: premium rate, mass calling
    "+3190",                                   # Netherlands: 090x premium rate
    "+3290",                                   # Belgium: 090x premium rate
    "+41900", "+41901", "+41906",              # Switzerland: premium rate
    "+43900", "+43930", "+43939",              # Austria: premium rate
    "+61190",                                  # Australia: 190x premium rate
    "+979",                                    # ITU International Premium Rate Service
    "+870", "+881", "+882", "+883",            # Inmarsat, global mobile satellite, international networks
]


@dataclass
class ApiProjectConfig:
    """`[[api.projects]]`: one project's dial-out limits and rules (by project name); unset keys: the [api] ones."""

    name: str = ""
    max_outbound_calls: int | None = None
    outbound_calls_per_minute: int | None = None
    allow_sip_uri: bool | None = None
    allow_prefixes: list[str] | None = None
    deny_prefixes: list[str] | None = None


@dataclass
class ApiConfig:
    """The Voice API (on the worker's HTTP port) and its dial-out calls."""

    ring_timeout_s: int = 60  # an unanswered dial-out is cancelled after this long (failed, 408)
    park_timeout_s: int = 600  # a call on hold waiting for the API to name a room is hung up after this long
    max_body_bytes: int = 16384
    auth_failures_per_source: int = 20  # failed authentications per source address (0 = no limit) ...
    auth_failure_window_s: int = 60  # ... within this window; beyond it the source gets 429 until it ends
    auth_failure_max_sources: int = 10000  # sources tracked at most (the least recently failing are forgotten)
    trusted_proxies: list[str] = field(default_factory=list)  # IP/CIDR whose X-Forwarded-For names the client
    max_outbound_calls_per_project: int = 20  # concurrent dial-outs per project, per worker (0 = no limit)
    outbound_calls_per_minute: int = 60  # dial-outs placed per project per minute, per worker (0 = no limit)
    allow_sip_uri: bool = False  # may `to` be a sip: URI (sip:user@host[:port], never parameters or headers)
    allow_prefixes: list[str] = field(default_factory=list)  # E.164 prefixes that may be called; [] = any ...
    deny_prefixes: list[str] = field(default_factory=lambda: list(PREMIUM_PREFIXES))  # ... but these
    projects: list[ApiProjectConfig] = field(default_factory=list)  # per-project overrides of the dial-out keys


@dataclass
class WebhookConfig:
    timeout_s: int = 5  # per delivery attempt
    max_backoff_s: int = 60  # retry delays double from 1 s up to this ...
    max_age_s: int = 3600  # ... and an event older than this is given up (logged, kept in the outbox)
    concurrency: int = 16  # calls delivered in parallel (each call's events stay in order)
    # loopback, private, link-local, CGNAT, multicast and metadata addresses a webhook may reach anyway (CIDRs);
    # empty: public addresses only (SSRF)
    allow_networks: list[str] = field(default_factory=list)
    ca_file: str = ""  # PEM CAs trusted for https receivers besides the system's (a private CA)


@dataclass
class RecordingsConfig:
    """Call recordings: two-channel WAV per call under DATA_DIR/recordings/PROJECT/ (issue 14)."""

    max_age_days: int = 0  # recordings older than this are deleted (swept hourly); 0 = kept until deleted
    flush_s: int = 1  # the writer thread appends what the media clock gathered this often (seconds)
    format: str = "wav"  # wav (PCM16) | opus (Ogg Opus, encoded with opusenc when the recording ends)
    notice: bool = False  # callers hear "this call is being recorded" when their recording starts


@dataclass
class ClusterConfig:
    """Scale-out: `gateway run --workers N` runs N workers behind Kamailio with a shared registry in Redis."""

    workers: int = 1  # worker processes `gateway run` starts (--workers N overrides); 1 = no Kamailio, no Redis
    max_workers: int = 4  # the autoscaler adds workers up to this many
    redis_url: str = ""  # the shared call registry; empty with several workers: a local redis-server is started
    redis_port: int = 6390  # ... on this port (127.0.0.1)
    kamailio: bool = True  # start Kamailio on sip.host:sip.port in front of the workers (false: an external one)
    worker_sip_port: int = 5070  # worker i listens for SIP on worker_sip_port + i
    drain_timeout_s: int = 120  # SIGTERM / `gateway drain`: calls in progress may finish for this long
    cpu_threshold: int = 90  # percent of one core over the last 2 s; above it INVITEs get 503 (0 = off)
    scale_up_load: int = 80  # start another worker when every worker holds this % of sip.max_calls ...
    scale_up_rate: int = 20  # ... or takes more than this many new calls per second
    scale_idle_s: int = 60  # an autoscaled worker idle this long is drained and stopped
    alarm_url: str = ""  # supervisor events (worker_started, worker_lost, worker_retired, at_max_workers) POSTed here
    # Balancer addresses whose X-Gateway-Source header (the caller's IP) is trusted; the supervisor adds its
    # own Kamailio's address for the workers it starts.
    lb_sources: list[str] = field(default_factory=list)
    # whether the balancer at lb_sources also says the transport and a TLS client certificate's names
    # (X-Gateway-Transport, X-Gateway-Client-Names, stripped from what callers send): set for the workers of the
    # Kamailio the gateway starts; turn on for your own balancer only if it does the same
    lb_tls_headers: bool = False


@dataclass
class JanusConfig:
    """The Janus media server the video rooms run on: one we start and supervise (`managed`), or external ones."""

    managed: bool = True  # start our own Janus (ignored when `urls` lists external servers)
    host: str = "127.0.0.1"  # its HTTP/WebSocket APIs and the plain-RTP sockets of phone participants bind here
    http_port: int = 8088  # Janus REST API (the gateway's client)
    ws_port: int = 8188  # Janus WebSocket API (browsers, janus.js)
    rtp_port_min: int = 40000  # WebRTC and plain-RTP ports of our Janus
    rtp_port_max: int = 44999
    public_ip: str = ""  # 1:1 NAT: the public address written in ICE candidates (nat_1_1_mapping)
    stun_server: str = ""  # host[:port] Janus asks for its reflexive address
    ice_enforce_list: list[str] = field(default_factory=list)  # interfaces/addresses ICE may use; [] = all
    turn_servers: list[str] = field(default_factory=list)  # turn:/turns: URIs handed to browsers (the room page)
    urls: list[str] = field(default_factory=list)  # external Janus REST URLs (http://host:port/janus); implies not managed
    api_secret: str = field(default="", repr=False)  # empty: generated once into DATA_DIR/janus/secrets.json
    admin_key: str = field(default="", repr=False)  # room-creation key of both plugins; empty: generated per plugin
    prebuffer: int = 1  # AudioBridge default_prebuffering (20 ms packets) for rooms we create
    binary: str = "janus"

    @property
    def is_managed(self) -> bool:
        """Whether the gateway starts Janus itself: `managed` and no external `urls`."""
        return self.managed and not self.urls

    def stun(self) -> tuple[str, int] | None:
        """`stun_server` as (host, port), port 3478 unless given; None when unset. ValueError if malformed."""
        if not self.stun_server:
            return None
        host, sep, port = self.stun_server.rpartition(":")
        if not sep:
            host, port = self.stun_server, "3478"
        if not host or any(ch in host for ch in ' "\\\n') or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(self.stun_server)
        return host, int(port)


@dataclass
class LogConfig:
    level: str = "info"
    format: str = "json"


@dataclass
class RegisterConfig:
    registrar: str = ""  # sip:provider.example.com[:port][;transport=tcp]
    username: str = ""
    password: str = ""
    expires: int = 3600
    contact_user: str = ""


@dataclass
class OutboundConfig:
    """Where dial-out INVITEs go for this trunk, and our credentials if it challenges (401/407)."""

    proxy: str = ""  # sip:host[:port][;transport=tcp]; the Request-URI is sip:NUMBER@host[:port]
    username: str = ""
    password: str = ""
    from_domain: str = ""  # host part of From; empty = the proxy's host


MEDIA_ENCRYPTION = ("none", "optional", "required")  # a trunk's SRTP rule (gateway.sip.sdp.choose_crypto)


@dataclass
class TrunkConfig:
    name: str = ""
    sources: list[str] = field(default_factory=list)  # IP / CIDR allow-list
    username: str = ""  # digest credentials a caller outside `sources` may authenticate with
    password: str = ""
    realm: str = "gateway"
    dtmf: list[str] = field(default_factory=lambda: ["rfc4733", "info", "inband"])
    register: RegisterConfig | None = None
    outbound: OutboundConfig | None = None
    trust_id_inbound: bool = False  # the trunk vouches for caller numbers: PIN limits skip its source address
    media_encryption: str = "none"  # SRTP (SDES): none | optional | required (RTP/SAVP only, plain offers get 488)
    tls_client_certificate: bool = False  # mutual TLS: calls must come over TLS with a certificate of sip.tls_client_ca
    tls_client_names: list[str] = field(default_factory=list)  # ... naming one of these (DNS/IP SAN, else CN); [] = any
    # (names alone imply tls_client_certificate)

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(s, strict=False) for s in self.sources]

    @property
    def reached_over_tls(self) -> bool:
        """Whether we open TLS connections to it: a sips: or ;transport=tls outbound proxy or registrar."""
        uris = [self.outbound.proxy if self.outbound else "", self.register.registrar if self.register else ""]
        return any(u.lower().startswith("sips:") or "transport=tls" in u.lower() for u in uris)


@dataclass
class DidConfig:
    number: str = ""
    route: str = "ivr"  # ivr | room | echo | api
    project: str = "demo"
    room_id: str = ""
    answer_after_ms: int = 0  # ring (180) this long before answering
    any_project: bool = False  # route ivr: meeting IDs of every project resolve here (one shared dial-in number)
    connector: str = ""  # where its callers' rooms are: "janus" | "sip_forward"; "" = the project's choice
    forward_pool: str = ""  # connector sip_forward: the [[forward_pools]] name (else the project's forward_pool)


@dataclass
class ProjectConfig:
    name: str = ""
    welcome_text: str = ""
    voice_type: str = "female"
    language: str = "en-US"
    notification_url: str = ""  # default webhook for the project's calls
    auto_record: bool = False  # voice.inbound.auto_record: record the project's inbound calls from answer to hang-up
    forward_pool: str = ""  # its rooms are reached through this [[forward_pools]] entry (sip_forward); "" = Janus


FORWARD_FIELDS = ("room_id", "role", "room_name", "meeting_id", "domain")  # what a forwarded header may name
# headers a pool may not set: the dialog's own, the body's, routing (RFC 3261 8.1.1), and what auth computes
FORWARD_RESERVED = frozenset({
    "via", "v", "from", "f", "to", "t", "call-id", "i", "cseq", "contact", "m", "max-forwards", "route",
    "record-route", "content-type", "c", "content-length", "l", "content-encoding", "e", "authorization",
    "proxy-authorization", "allow", "supported", "k", "require", "session-expires", "x", "user-agent"})
TOKEN = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+")  # RFC 3261 token: a header name


@dataclass
class ForwardPoolConfig:
    """`[[forward_pools]]`: SIP media gateways a validated caller is forwarded to (the `sip_forward` connector)."""

    name: str = ""
    targets: list[str] = field(default_factory=list)  # sip:[user@]host[:port][;transport=tcp], tried fewest legs first
    headers: dict[str, str] = field(default_factory=dict)  # added to the INVITE; values: {room_id} {role} ...
    domain: str = ""  # the {domain} of the header templates
    ring_timeout_s: int = 10  # a member that has not answered by then is CANCELled: the next one is tried
    username: str = ""  # digest credentials, if the members challenge (401/407)
    password: str = field(default="", repr=False)


@dataclass
class Config:
    sip: SipConfig = field(default_factory=SipConfig)
    rtp: RtpConfig = field(default_factory=RtpConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    data: DataConfig = field(default_factory=DataConfig)
    log: LogConfig = field(default_factory=LogConfig)
    ivr: IvrConfig = field(default_factory=IvrConfig)
    rooms: RoomsConfig = field(default_factory=RoomsConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    room_service: RoomServiceConfig = field(default_factory=RoomServiceConfig)
    menu: MenuConfig = field(default_factory=MenuConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    webhooks: WebhookConfig = field(default_factory=WebhookConfig)
    recordings: RecordingsConfig = field(default_factory=RecordingsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    janus: JanusConfig = field(default_factory=JanusConfig)
    trunks: list[TrunkConfig] = field(
        default_factory=lambda: [TrunkConfig(name="local", sources=["127.0.0.0/8"])]
    )
    dids: list[DidConfig] = field(
        default_factory=lambda: [
            DidConfig(number="15550100001", route="echo"),
            DidConfig(number="15550100000", route="ivr"),
        ]
    )
    projects: list[ProjectConfig] = field(
        default_factory=lambda: [ProjectConfig(name="demo", welcome_text="Welcome to the demo conference service.")]
    )
    forward_pools: list[ForwardPoolConfig] = field(default_factory=list)
    source: str = "<embedded defaults>"

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir)

    def did(self, number: str) -> DidConfig | None:
        wanted = number.lstrip("+")
        return next((d for d in self.dids if d.number.lstrip("+") == wanted), None)


ROUTES = ("ivr", "room", "echo", "api")


def _convert(value: object, hint: object, where: str) -> object:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _convert(value, args[0], where)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: must be a table")
        return _build(hint, value, where)  # type: ignore[arg-type]
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: must be a list")
        return [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: must be true or false, not {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: must be an integer, not {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: must be a string, not {value!r}")
        return value
    return value


def _build(cls: type, data: dict[str, object], where: str) -> object:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    for key in data:
        if key not in names:
            raise ConfigError(f"{where + '.' if where else ''}{key}: unknown key")
    kwargs = {k: _convert(v, hints[k], f"{where + '.' if where else ''}{k}") for k, v in data.items()}
    return cls(**kwargs)


def _env_overrides(data: dict[str, typing.Any], environ: typing.Mapping[str, str]) -> None:
    sections = {f.name for f in dataclasses.fields(Config)
                if f.name not in ("trunks", "dids", "projects", "forward_pools", "source")}
    for name, raw in environ.items():
        if not name.startswith("GATEWAY_"):
            continue
        rest = name[len("GATEWAY_") :].lower()
        section = max((s for s in sections if rest.startswith(s + "_")), key=len, default="")
        key = rest[len(section) + 1 :]
        if not section or not key:
            continue
        try:
            value: object = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        data.setdefault(section, {})[key] = value


NOT_SETTINGS = {"GATEWAY_WORKER_NAME", "GATEWAY_SCREENSHOTS"}  # GATEWAY_ variables that are not settings


def unknown_variables(environ: typing.Mapping[str, str] | None = None) -> list[str]:
    """GATEWAY_* variables that name no setting (a misspelt one would otherwise be silently ignored), each with
    the closest setting's name when there is one. A known section with an unknown key is an error at load."""
    import difflib

    environ = os.environ if environ is None else environ
    hints = typing.get_type_hints(Config)
    known = {f"GATEWAY_{section}_{field.name}".upper() for section, cls in hints.items() if dataclasses.is_dataclass(cls)
             for field in dataclasses.fields(cls)}
    sections = {f.name for f in dataclasses.fields(Config)}
    out = []
    for name in sorted(environ):
        if not name.startswith("GATEWAY_") or name in NOT_SETTINGS or name in known:
            continue
        rest = name[len("GATEWAY_"):].lower()
        if any(rest.startswith(s + "_") for s in sections):
            continue  # a section's unknown key: load_config says so, as an error
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
        out.append(f"{name}: not a setting, ignored" + (f" (did you mean {close[0]}?)" if close else ""))
    return out


def load_config(path: str | Path | None = None, environ: typing.Mapping[str, str] | None = None) -> Config:
    """Embedded defaults, overlaid by the file (whole sections/keys), then by the environment."""
    environ = os.environ if environ is None else environ
    data: dict[str, typing.Any] = {}
    source = "<embedded defaults>"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{source}: file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    _env_overrides(data, environ)
    try:
        config = typing.cast(Config, _build(Config, data, ""))
        _validate(config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    config.source = source
    return config


def _validate(c: Config) -> None:
    def port(value: int, key: str) -> None:
        if not 0 <= value <= 65535:
            raise ConfigError(f"{key}: must be a port number 0-65535, not {value}")

    port(c.sip.port, "sip.port")
    port(c.http.port, "http.port")
    for section, listener in (("http", c.http), ("room_service", c.room_service)):
        _check_tls(listener.tls_cert, listener.tls_key, section)
    if c.webhooks.ca_file and not os.access(c.webhooks.ca_file, os.R_OK):
        raise ConfigError(f"webhooks.ca_file: cannot read {c.webhooks.ca_file}")
    for transport in c.sip.transports:
        if transport not in ("udp", "tcp", "tls"):
            raise ConfigError(f"sip.transports: unknown transport {transport!r} (udp, tcp, tls)")
    port(c.sip.tls_port, "sip.tls_port")
    if "tls" in c.sip.transports and not (c.sip.tls_cert and c.sip.tls_key):
        raise ConfigError("sip.transports has tls: sip.tls_cert and sip.tls_key are needed")
    _check_tls(c.sip.tls_cert, c.sip.tls_key, "sip")
    if "tls" in c.sip.transports and "tcp" in c.sip.transports and c.sip.tls_port == c.sip.port and c.sip.port:
        raise ConfigError("sip.tls_port: must differ from sip.port (TCP listens there)")
    for key in ("tls_ca", "tls_client_ca"):
        if getattr(c.sip, key):
            try:
                ssl.create_default_context().load_verify_locations(cafile=getattr(c.sip, key))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"sip.{key}: {exc}") from None
    if c.recordings.max_age_days < 0 or not 1 <= c.recordings.flush_s <= 60:
        raise ConfigError("recordings.max_age_days (>= 0) / recordings.flush_s (1-60): out of range")
    if c.recordings.format not in ("wav", "opus"):
        raise ConfigError(f"recordings.format: wav or opus, not {c.recordings.format!r}")
    if c.recordings.format == "opus" and shutil.which("opusenc") is None:
        raise ConfigError("recordings.format = \"opus\" needs opusenc: install the Debian package opus-tools")
    for i, t in enumerate(c.trunks):
        if (t.tls_client_certificate or t.tls_client_names) and not ("tls" in c.sip.transports and c.sip.tls_client_ca):
            raise ConfigError(f"trunks[{i}].tls_client_certificate: mutual TLS needs tls in sip.transports and "
                              "sip.tls_client_ca (the CAs that sign the trunk's certificates)")
    for i, t in enumerate(c.trunks):  # a trunk reached over TLS needs our TLS listener: its Contact is there
        if t.reached_over_tls and "tls" not in c.sip.transports:
            raise ConfigError(f"trunks[{i}]: reached over TLS, so sip.transports needs tls (and sip.tls_cert/tls_key)")
    for key in ("host", "public_host"):
        value = getattr(c.sip, key)
        if value:
            _check_ip(value, f"sip.{key}")
    if not 1024 <= c.rtp.port_min < c.rtp.port_max <= 65535 or c.rtp.port_max - c.rtp.port_min < 2:
        raise ConfigError("rtp.port_min/rtp.port_max: need 1024 <= port_min < port_max <= 65535")
    if not 0 < c.rtp.jitter_min_ms <= c.rtp.jitter_max_ms <= 1000:
        raise ConfigError("rtp.jitter_min_ms/jitter_max_ms: need 0 < min <= max <= 1000")
    for codec in c.rtp.codecs:
        if codec not in ("PCMU", "PCMA"):
            raise ConfigError(f"rtp.codecs: unsupported codec {codec!r} (PCMU, PCMA)")
    if not 96 <= c.rtp.telephone_event_pt <= 127:
        raise ConfigError("rtp.telephone_event_pt: must be a dynamic payload type 96-127")
    if not 100 <= c.rtp.strict_learning_ms <= 30000:
        raise ConfigError("rtp.strict_learning_ms: must be 100-30000")
    if not 2 <= c.rtp.strict_learning_packets <= 50:
        raise ConfigError("rtp.strict_learning_packets: must be 2-50")
    if c.sip.session_expires < c.sip.min_se or c.sip.min_se < 90:
        raise ConfigError("sip.session_expires/min_se: need 90 <= min_se <= session_expires")
    if not c.sip.digest_algorithms or any(a not in ("SHA-256", "MD5") for a in c.sip.digest_algorithms):
        raise ConfigError("sip.digest_algorithms: a non-empty list of \"SHA-256\" and/or \"MD5\"")
    _validate_sip_limits(c.sip)
    if c.log.level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log.level: must be debug, info, warning or error, not {c.log.level!r}")
    if c.log.format not in ("json", "text"):
        raise ConfigError(f"log.format: must be json or text, not {c.log.format!r}")
    if c.ivr.attempts < 1 or c.ivr.max_digits < 1:
        raise ConfigError("ivr.attempts/ivr.max_digits: must be at least 1")
    for key in ("first_digit_timeout_ms", "inter_digit_timeout_ms"):
        if not 500 <= getattr(c.ivr, key) <= 120000:
            raise ConfigError(f"ivr.{key}: must be between 500 and 120000")
    for key in ("pin_failures_per_caller", "pin_failures_per_source", "meeting_id_failures_per_caller",
                "meeting_id_failures_per_source", "pin_failures_per_meeting"):
        if getattr(c.ivr, key) < 0:
            raise ConfigError(f"ivr.{key}: must be 0 (off) or more")
    if not 0 <= c.ivr.pin_backoff_ms <= c.ivr.pin_backoff_max_ms <= 60000 or c.ivr.pin_failure_window_s < 1:
        raise ConfigError("ivr.pin_backoff_ms/pin_backoff_max_ms/pin_failure_window_s: need 0 <= pin_backoff_ms <= "
                          "pin_backoff_max_ms <= 60000 and a window of at least 1 s")
    if not 4 <= c.rooms.meeting_id_digits <= 16 or not 4 <= c.rooms.pin_digits <= 12:
        raise ConfigError("rooms.meeting_id_digits (4-16) / rooms.pin_digits (4-12): out of range")
    if c.directory.kind not in ("embedded", "http"):
        raise ConfigError(f"directory.kind: must be embedded or http, not {c.directory.kind!r}")
    if c.directory.kind == "http" and not c.directory.url.startswith(("http://", "https://")):
        raise ConfigError("directory.url: an http(s):// URL is required when directory.kind = \"http\"")
    keys = [getattr(c.menu, f.name) for f in dataclasses.fields(MenuConfig)]
    if any(len(k) != 1 or k not in "0123456789#" for k in keys) or len(set(keys)) != len(keys):
        raise ConfigError("menu: each action needs its own key, one of 0-9 or #")
    port(c.room_service.port, "room_service.port")
    if not 0 <= c.room_service.mask_digits <= 15:
        raise ConfigError("room_service.mask_digits: 0 to 15")
    for origin in c.room_service.allowed_origins:
        if not re.fullmatch(r"https?://[^/?#\s]+", origin):
            raise ConfigError(f"room_service.allowed_origins: {origin!r} is not an origin (scheme://host[:port])")
    for key in ("host_link_days", "max_participants", "auth_failures_per_minute"):
        if getattr(c.room_service, key) < 1:
            raise ConfigError(f"room_service.{key}: must be at least 1")
    projects = {p.name for p in c.projects}
    for i, t in enumerate(c.trunks):
        if not t.name:
            raise ConfigError(f"trunks[{i}].name: required")
        for j, s in enumerate(t.sources):
            try:
                ipaddress.ip_network(s, strict=False)
            except ValueError:
                raise ConfigError(f"trunks[{i}].sources[{j}]: not an IP address or CIDR: {s!r}") from None
        if bool(t.username) != bool(t.password):
            raise ConfigError(f"trunks[{i}]: username and password go together")
        if t.media_encryption not in MEDIA_ENCRYPTION:
            raise ConfigError(f"trunks[{i}].media_encryption: {t.media_encryption!r} is not one of "
                              f"{', '.join(MEDIA_ENCRYPTION)}")
        for source in t.dtmf:
            if source not in ("rfc4733", "info", "inband"):
                raise ConfigError(f"trunks[{i}].dtmf: unknown source {source!r} (rfc4733, info, inband)")
        if t.register is not None and not t.register.registrar.startswith(("sip:", "sips:")):
            raise ConfigError(f"trunks[{i}].register.registrar: must be a sip: or sips: URI")
        if t.outbound is not None and not t.outbound.proxy.startswith(("sip:", "sips:")):
            raise ConfigError(f"trunks[{i}].outbound.proxy: must be a sip: or sips: URI (sips: is TLS)")
    if not 5 <= c.api.ring_timeout_s <= 600:
        raise ConfigError("api.ring_timeout_s: 5 to 600")
    if not 5 <= c.api.park_timeout_s <= 86400:
        raise ConfigError("api.park_timeout_s: 5 to 86400")
    _validate_api(c.api)
    if c.webhooks.timeout_s < 1 or c.webhooks.max_backoff_s < 1 or c.webhooks.max_age_s < 1 or c.webhooks.concurrency < 1:
        raise ConfigError("webhooks: timeout_s, max_backoff_s, max_age_s and concurrency must be at least 1")
    for i, net in enumerate(c.webhooks.allow_networks):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"webhooks.allow_networks[{i}]: not an IP network (CIDR): {net!r}") from None
    cl = c.cluster
    if not 1 <= cl.workers <= cl.max_workers <= 64:
        raise ConfigError("cluster.workers/max_workers: need 1 <= workers <= max_workers <= 64")
    port(cl.redis_port, "cluster.redis_port")
    port(cl.worker_sip_port, "cluster.worker_sip_port")
    if cl.redis_url and not cl.redis_url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("cluster.redis_url: a redis:// URL")
    if not 0 <= cl.cpu_threshold <= 100 or not 1 <= cl.scale_up_load <= 100:
        raise ConfigError("cluster.cpu_threshold (0-100) / cluster.scale_up_load (1-100): out of range")
    for i, addr in enumerate(cl.lb_sources):
        _check_ip(addr, f"cluster.lb_sources[{i}]")
    if cl.alarm_url and not cl.alarm_url.startswith(("http://", "https://")):
        raise ConfigError("cluster.alarm_url: an http(s):// URL")
    _validate_janus(c.janus)
    for i, p in enumerate(c.projects):
        if p.notification_url and not p.notification_url.startswith(("http://", "https://")):
            raise ConfigError(f"projects[{i}].notification_url: must be an http(s):// URL")
        if "@" in re.split("[/?#]", p.notification_url.partition("://")[2])[0]:  # not kept: webhooks are signed
            raise ConfigError(f"projects[{i}].notification_url: no user:password@ (the webhooks are signed)")
    for i, d in enumerate(c.dids):
        if not d.number.lstrip("+").isdigit():
            raise ConfigError(f"dids[{i}].number: must be digits (E.164, optional +), not {d.number!r}")
        if d.route not in ROUTES:
            raise ConfigError(f"dids[{i}].route: must be one of {', '.join(ROUTES)}, not {d.route!r}")
        if d.route == "room" and not d.room_id:
            raise ConfigError(f"dids[{i}].room_id: required when route = \"room\"")
        if d.project not in projects:
            raise ConfigError(f"dids[{i}].project: no project named {d.project!r}")
    _validate_forwarding(c)


def _validate_forwarding(c: Config) -> None:
    pools: set[str] = set()
    for i, p in enumerate(c.forward_pools):
        where = f"forward_pools[{i}]"
        if not p.name or p.name in pools:
            raise ConfigError(f"{where}.name: required, one entry per name")
        pools.add(p.name)
        if not p.targets:
            raise ConfigError(f"{where}.targets: at least one sip: URI")
        for j, target in enumerate(p.targets):
            if not re.fullmatch(r"sips?:([A-Za-z0-9\-_.!~*'()+]{1,64}@)?[A-Za-z0-9.\-]+(:[0-9]{1,5})?"
                                r"(;transport=(udp|tcp|tls))?", target, re.IGNORECASE):
                raise ConfigError(f"{where}.targets[{j}]: must be sip:[user@]host[:port][;transport=udp|tcp|tls], "
                                  f"not {target!r}")
            if (target.lower().startswith("sips:") or "transport=tls" in target.lower()) \
                    and "tls" not in c.sip.transports:
                raise ConfigError(f"{where}.targets[{j}]: reached over TLS, so sip.transports needs tls")
        if not isinstance(p.headers, dict):
            raise ConfigError(f"{where}.headers: must be a table of header name = value template")
        for name, value in p.headers.items():
            check_forward_header(name, value, f"{where}.headers.{name}")
        if any(ch in p.domain for ch in "\r\n\0"):
            raise ConfigError(f"{where}.domain: no CR, LF or NUL")
        if not 1 <= p.ring_timeout_s <= 300:
            raise ConfigError(f"{where}.ring_timeout_s: 1 to 300")
        if bool(p.username) != bool(p.password):
            raise ConfigError(f"{where}: username and password go together")
    for i, proj in enumerate(c.projects):
        if proj.forward_pool and proj.forward_pool not in pools:
            raise ConfigError(f"projects[{i}].forward_pool: no forward_pools entry named {proj.forward_pool!r}")
    project_pools = {p.name: p.forward_pool for p in c.projects}
    for i, d in enumerate(c.dids):
        if d.connector not in ("", "janus", "sip_forward"):
            raise ConfigError(f"dids[{i}].connector: must be janus or sip_forward, not {d.connector!r}")
        if d.forward_pool and d.forward_pool not in pools:
            raise ConfigError(f"dids[{i}].forward_pool: no forward_pools entry named {d.forward_pool!r}")
        if d.connector == "sip_forward" and not (d.forward_pool or project_pools.get(d.project)):
            raise ConfigError(f"dids[{i}].forward_pool: connector sip_forward needs a forward pool (here or on "
                              f"project {d.project!r})")
        if d.connector == "janus" and d.forward_pool:
            raise ConfigError(f"dids[{i}].forward_pool: set, but connector = \"janus\"")


def check_forward_header(name: object, value: object, where: str) -> None:
    """A header of a forward pool: a token name the SIP stack does not own, and a value template with no CR, LF
    or NUL whose {fields} are among FORWARD_FIELDS (no format specs, conversions or attributes)."""
    import string

    if not isinstance(name, str) or not TOKEN.fullmatch(name):
        raise ConfigError(f"{where}: the header name must be a token (letters, digits, -.!%*_+`'~)")
    if name.lower() in FORWARD_RESERVED:
        raise ConfigError(f"{where}: {name} is set by the SIP stack, not by a pool")
    if not isinstance(value, str):
        raise ConfigError(f"{where}: the value must be a string")
    if any(ch in value for ch in "\r\n\0"):
        raise ConfigError(f"{where}: the value must not contain CR, LF or NUL")
    try:
        parts = list(string.Formatter().parse(value))
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc} (write {{{{ and }}}} for literal braces)") from None
    for _, field_name, spec, conversion in parts:
        if field_name is None:
            continue
        if field_name not in FORWARD_FIELDS or spec or conversion:
            raise ConfigError(f"{where}: {{{field_name}}} is not one of "
                              f"{', '.join('{' + f + '}' for f in FORWARD_FIELDS)}")


def _check_tls(cert: str, key: str, section: str) -> None:
    """Both files or neither, readable, and a pair (the key is the certificate's): said at start, not at first use."""
    if not cert and not key:
        return
    if not (cert and key):
        raise ConfigError(f"{section}.tls_cert and {section}.tls_key: give both (or neither, for plain HTTP)")
    def no_passphrase() -> str:
        raise ConfigError(f"{section}.tls_key: an encrypted key (a pass phrase) is not supported: decrypt it, "
                          "keep it 0600")

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=no_passphrase)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{section}.tls_cert/{section}.tls_key: {exc}") from None


def _validate_api(a: ApiConfig) -> None:
    if a.auth_failures_per_source < 0 or a.auth_failure_window_s < 1 or a.auth_failure_max_sources < 1:
        raise ConfigError("api.auth_failures_per_source (0 = no limit), api.auth_failure_window_s and "
                          "api.auth_failure_max_sources (at least 1): out of range")
    for i, net in enumerate(a.trusted_proxies):
        try:
            ipaddress.ip_network(net, strict=False)
        except ValueError:
            raise ConfigError(f"api.trusted_proxies[{i}]: not an IP address or CIDR: {net!r}") from None
    names: set[str] = set()
    for where, o in [("api", a), *((f"api.projects[{i}]", p) for i, p in enumerate(a.projects))]:
        if isinstance(o, ApiProjectConfig):
            if not o.name or o.name in names:
                raise ConfigError(f"{where}.name: a project name, one entry per project")
            names.add(o.name)
        for key in ("max_outbound_calls_per_project", "max_outbound_calls", "outbound_calls_per_minute"):
            value = getattr(o, key, None)
            if value is not None and value < 0:
                raise ConfigError(f"{where}.{key}: 0 (no limit) or more, not {value}")
        for key in ("allow_prefixes", "deny_prefixes"):
            for j, prefix in enumerate(getattr(o, key) or []):
                if not re.fullmatch(r"\+?[0-9]{1,15}", prefix):
                    raise ConfigError(f"{where}.{key}[{j}]: an E.164 prefix (optional +, ASCII digits), not {prefix!r}")


def _validate_sip_limits(s: SipConfig) -> None:
    if not 10 <= s.digest_nonce_lifetime_s <= 3600:
        raise ConfigError("sip.digest_nonce_lifetime_s: 10 to 3600")
    if s.rate_limit_per_source < 0 or s.rate_limit_burst < 1:
        raise ConfigError("sip.rate_limit_per_source (0 = off) / sip.rate_limit_burst (at least 1): out of range")
    if not 1 <= s.max_connections_per_source <= s.max_connections:
        raise ConfigError("sip.max_connections_per_source/max_connections: need 1 <= per source <= max_connections")
    if not 1 <= s.tcp_first_message_s <= s.tcp_idle_s <= 86400:
        raise ConfigError("sip.tcp_first_message_s/tcp_idle_s: need 1 <= tcp_first_message_s <= tcp_idle_s <= 86400")


def _validate_janus(j: JanusConfig) -> None:
    for key in ("http_port", "ws_port"):
        if not 1 <= getattr(j, key) <= 65535:
            raise ConfigError(f"janus.{key}: must be a port number 1-65535, not {getattr(j, key)}")
    if j.http_port == j.ws_port:
        raise ConfigError("janus.http_port/janus.ws_port: must differ")
    if not 1024 <= j.rtp_port_min < j.rtp_port_max <= 65535:
        raise ConfigError("janus.rtp_port_min/janus.rtp_port_max: need 1024 <= rtp_port_min < rtp_port_max <= 65535")
    _check_ip(j.host, "janus.host")
    if j.public_ip:
        _check_ip(j.public_ip, "janus.public_ip")
    try:
        j.stun()
    except ValueError:
        raise ConfigError(f"janus.stun_server: must be host or host:port, not {j.stun_server!r}") from None
    for i, item in enumerate(j.ice_enforce_list):
        if not item or any(ch in item for ch in ", \"\n"):
            raise ConfigError(f"janus.ice_enforce_list[{i}]: an interface name or address, not {item!r}")
    for i, uri in enumerate(j.turn_servers):
        if not uri.startswith(("turn:", "turns:")):
            raise ConfigError(f"janus.turn_servers[{i}]: must be a turn: or turns: URI")
    for i, url in enumerate(j.urls):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"janus.urls[{i}]: must be an http(s):// URL of a Janus REST API")
    if j.urls and not j.admin_key:
        raise ConfigError("janus.admin_key: required with external janus.urls (the servers' plugin admin_key)")
    for key in ("api_secret", "admin_key"):
        if any(ch in getattr(j, key) for ch in "\"\\\n"):
            raise ConfigError(f"janus.{key}: must not contain quotes, backslashes or newlines")
    if not 0 <= j.prebuffer <= 50:
        raise ConfigError("janus.prebuffer: 0 to 50 packets")
    if not j.binary:
        raise ConfigError("janus.binary: required")


def _check_ip(value: str, key: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"{key}: must be an IP address, not {value!r}") from None
