"""Janus as a managed component: its secrets, its rendered configuration, its supervised process.

The stock /etc/janus configuration is never used (it binds every interface, ships a well-known admin secret
and demo rooms). `render_config` writes our own folder under DATA_DIR/janus/conf from `[janus]`, loading only
the AudioBridge and VideoRoom plugins and the HTTP and WebSocket transports; `JanusProcess` runs
`janus -C DIR/janus.jcfg -F DIR` in the foreground as our child, waits until its API answers, and
`run_forever` restarts it when it dies. Secrets live only in 0600 files (secrets.json and the rendered
config): never on a command line or in our logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import json
import logging
import os
import resource
import secrets as secrets_module
import signal
import sysconfig
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from string import Template

import aiohttp

from gateway import log
from gateway.config import Config

logger = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parents[2] / "config" / "janus"
CONFIG_FILES = ("janus.jcfg", "janus.transport.http.jcfg", "janus.transport.websockets.jcfg",
                "janus.plugin.audiobridge.jcfg", "janus.plugin.videoroom.jcfg")
# The only shared objects Janus may load: folder name -> files linked into it (empty: nothing loaded).
MODULES = {
    "plugins": ("libjanus_audiobridge.so", "libjanus_videoroom.so"),
    "transports": ("libjanus_http.so", "libjanus_websockets.so"),
    "events": (),
    "loggers": (),
}
LOG_ROTATE_BYTES = 10 * 1024 * 1024


class JanusStartError(RuntimeError):
    """Janus could not be started or did not answer in time (the message names the log file)."""


def janus_dir(config: Config) -> Path:
    return config.data_dir / "janus"


@dataclass(frozen=True, repr=False)
class JanusSecrets:
    """The Janus API secret and the plugins' room-creation keys: from `[janus]` when set, else generated once."""

    api_secret: str
    audiobridge_admin_key: str
    videoroom_admin_key: str

    def __repr__(self) -> str:
        return "JanusSecrets(***)"

    def values(self) -> tuple[str, str, str]:
        return self.api_secret, self.audiobridge_admin_key, self.videoroom_admin_key

    @classmethod
    def load(cls, config: Config) -> JanusSecrets:
        """Config values win; the others come from DATA_DIR/janus/secrets.json (0600), created on first use."""
        path = janus_dir(config) / "secrets.json"
        _private_dir(path.parent)
        stored: dict[str, str] = {}
        if path.exists():
            try:
                stored = json.loads(path.read_text())
                if not isinstance(stored, dict):
                    raise ValueError("not an object")
            except ValueError as exc:
                raise JanusStartError(f"{path}: unreadable ({exc}); delete it to generate new Janus secrets") from None
        names = ("api_secret", "audiobridge_admin_key", "videoroom_admin_key")
        generated = {n: str(stored.get(n) or secrets_module.token_urlsafe(24)) for n in names}
        if generated != stored:
            _write_private(path, json.dumps(generated, indent=2) + "\n")
        key = config.janus.admin_key
        return cls(api_secret=config.janus.api_secret or generated["api_secret"],
                   audiobridge_admin_key=key or generated["audiobridge_admin_key"],
                   videoroom_admin_key=key or generated["videoroom_admin_key"])


def find_janus_lib(binary: str = "janus") -> Path:
    """The folder holding Janus' plugins/ and transports/ (Debian: /usr/lib/<multiarch>/janus)."""
    candidates = []
    if "/" in binary:
        candidates.append(Path(binary).resolve().parent.parent / "lib" / "janus")
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    candidates += [Path("/usr/lib") / multiarch / "janus", Path("/usr/lib/janus"), Path("/usr/local/lib/janus"),
                   Path("/opt/janus/lib/janus")]
    for folder in candidates:
        if (folder / "plugins" / MODULES["plugins"][0]).exists():
            return folder
    raise JanusStartError(f"Janus plugins not found in {', '.join(map(str, candidates))}: install the Debian "
                          "package janus")


def render_config(config: Config, secrets: JanusSecrets, lib_dir: Path | None = None,
                  server_name: str = "gateway-janus") -> Path:
    """Write DATA_DIR/janus/conf (0700, files 0600) with symlinks to only the wanted modules; return the folder."""
    j = config.janus
    lib = lib_dir or find_janus_lib(j.binary)
    conf = janus_dir(config) / "conf"
    _private_dir(conf.parent)
    _private_dir(conf)
    for folder, wanted in MODULES.items():
        _link_only(conf / folder, lib / folder, wanted)
    host = ipaddress.ip_address(j.host)
    acl = ("127." if host.version == 4 else "::1") if host.is_loopback else ""
    nat = ""
    if j.public_ip:
        nat += f'\tnat_1_1_mapping = "{j.public_ip}"\n'
    stun = j.stun()
    if stun:
        nat += f'\tstun_server = "{stun[0]}"\n\tstun_port = {stun[1]}\n'
    if j.ice_enforce_list:
        nat += f'\tice_enforce_list = "{",".join(j.ice_enforce_list)}"\n'
    values = {
        "conf_dir": str(conf.resolve()),
        "server_name": server_name,
        "api_secret": secrets.api_secret,
        "rtp_port_range": f"{j.rtp_port_min}-{j.rtp_port_max}",
        "nat_extra": nat,
        "host": j.host,
        "http_port": j.http_port,
        "ws_port": j.ws_port,
        "acl_line": f'\tacl = "{acl}"\n' if acl else "",
        "ws_acl_line": f'\tws_acl = "{acl}"\n' if acl else "",
        # AudioBridge plain RTP is IPv4 only and needs a concrete address (else it guesses an interface).
        "local_ip_line": f'\tlocal_ip = "{j.host}"\n' if host.version == 4 and not host.is_unspecified else "",
    }
    keys = {"janus.plugin.audiobridge.jcfg": secrets.audiobridge_admin_key,
            "janus.plugin.videoroom.jcfg": secrets.videoroom_admin_key}
    for name in CONFIG_FILES:
        text = Template((TEMPLATES / f"{name}.tmpl").read_text()).substitute(values, admin_key=keys.get(name, ""))
        _write_private(conf / name, text)
    return conf


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """preexec_fn: Linux sends the child `sig` when this process dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)


def janus_child() -> None:
    """preexec_fn of Janus: killed outright when we die, and writes no core file. Janus 1.1.2 can hang or crash
    while it shuts down (seen here: an orphan that a SIGTERM never ended, holding its ports for an hour and a half;
    a 97 MB core in the working directory). It keeps nothing worth a clean exit: the room service makes its rooms
    again. Our own stop still asks with SIGTERM first (`JanusProcess.stop`)."""
    die_with_parent(signal.SIGKILL)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


class JanusProcess:
    """One Janus child process on `[janus] host:http_port`, its output in DATA_DIR/janus/janus.log."""

    def __init__(self, config: Config, secrets: JanusSecrets | None = None, *, lib_dir: Path | None = None,
                 ready_timeout: float = 15.0, stop_grace: float = 5.0) -> None:
        self.config = config
        self.secrets = secrets or JanusSecrets.load(config)
        self.lib_dir = lib_dir
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self.proc: asyncio.subprocess.Process | None = None
        j = config.janus
        host = f"[{j.host}]" if ":" in j.host else j.host
        self.url = f"http://{host}:{j.http_port}/janus"
        self.log_path = janus_dir(config) / "janus.log"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        """Render the configuration, spawn Janus and return once its `info` answers as this very process."""
        if self.running:
            return
        name = f"gateway-janus-{secrets_module.token_hex(4)}"
        conf = render_config(self.config, self.secrets, self.lib_dir, server_name=name)
        self._rotate_log()
        fd = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            self.proc = await asyncio.create_subprocess_exec(
                self.config.janus.binary, "-C", str(conf / "janus.jcfg"), "-F", str(conf),
                stdin=asyncio.subprocess.DEVNULL, stdout=fd, stderr=fd, preexec_fn=janus_child)
        except FileNotFoundError:
            raise JanusStartError(f"Janus binary {self.config.janus.binary!r} not found: install the Debian "
                                  "package janus or set janus.binary") from None
        finally:
            os.close(fd)
        try:
            await self._wait_ready(name)
        except BaseException:
            await self.stop()
            raise
        log.event(logger, "janus.started", pid=self.pid, url=self.url, log=str(self.log_path))

    async def _wait_ready(self, name: str) -> None:
        assert self.proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ready_timeout
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
            while loop.time() < deadline:
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    async with http.get(f"{self.url}/info") as resp:
                        info = await resp.json(content_type=None)
                        if isinstance(info, dict) and info.get("server-name") == name:
                            return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), 0.05)  # poll interval; returns early if it died
                if self.proc.returncode is not None:
                    raise JanusStartError(f"Janus exited with code {self.proc.returncode} while starting: "
                                          f"see {self.log_path}")
        raise JanusStartError(f"Janus did not answer on {self.url}/info within {self.ready_timeout:g} s: "
                              f"see {self.log_path}")

    async def wait(self) -> int:
        if self.proc is None:
            raise RuntimeError("Janus was not started")
        return await self.proc.wait()

    async def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after `stop_grace` seconds; returns the exit code (None if never started)."""
        proc = self.proc
        if proc is None:
            return None
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), self.stop_grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            log.event(logger, "janus.stopped", pid=proc.pid, code=proc.returncode)
        return proc.returncode

    async def run_forever(self, on_ready: Callable[[], Awaitable[None]] | None = None) -> None:
        """Keep Janus running until cancelled: restart it when it dies (1 s, doubling up to 30 s while it keeps
        failing); `on_ready` runs after every (re)start, e.g. to recreate rooms. Stops Janus when cancelled."""
        loop = asyncio.get_running_loop()
        backoff = 1.0
        try:
            while True:
                try:
                    await self.start()
                except JanusStartError as exc:
                    log.event(logger, "janus.start_failed", logging.ERROR, error=str(exc), retry_in_s=backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 30.0)
                    continue
                started = loop.time()
                if on_ready is not None:
                    try:
                        await on_ready()
                    except Exception as exc:  # a failing hook must not stop the supervision
                        log.event(logger, "janus.on_ready_failed", logging.ERROR, error=repr(exc))
                code = await self.wait()
                uptime = loop.time() - started
                if uptime > 30:
                    backoff = 1.0
                log.event(logger, "janus.exited", logging.ERROR, pid=self.pid, code=code, uptime_s=round(uptime, 1),
                          restart_in_s=backoff, log=str(self.log_path))
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
        finally:
            await self.stop()

    def _rotate_log(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            if self.log_path.stat().st_size > LOG_ROTATE_BYTES:
                self.log_path.replace(self.log_path.with_suffix(".log.1"))


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)


def _write_private(path: Path, text: str) -> None:
    """Write atomically, readable by the owner only (the file never exists with wider permissions)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(text)
    tmp.replace(path)


def _link_only(folder: Path, source: Path, wanted: tuple[str, ...]) -> None:
    """Make `folder` hold exactly a symlink per wanted module of `source` (and nothing else)."""
    _private_dir(folder)
    for entry in folder.iterdir():
        if entry.name not in wanted or not entry.is_symlink():
            entry.unlink()
    for name in wanted:
        target = source / name
        if not target.exists():
            raise JanusStartError(f"Janus module {target} not found: install the Debian package janus")
        link = folder / name
        if not (link.is_symlink() and Path(os.readlink(link)) == target):
            link.unlink(missing_ok=True)
            link.symlink_to(target)


async def supervise_janus(janus: JanusProcess) -> asyncio.Task[None]:
    """Start Janus (waiting for it, bounded) and keep it running in a task; a Janus that does not start is
    logged and retried in the background, so the gateway starts without its media server."""
    try:
        await janus.start()
    except JanusStartError as exc:
        log.event(logger, "janus.start_failed", logging.ERROR, error=str(exc))
    return asyncio.get_running_loop().create_task(janus.run_forever(), name="janus")
