"""`gateway` command line: run a worker, read calls and CDRs."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import unicodedata
from datetime import datetime
from pathlib import Path
from typing import Any

from . import log, tls
from .config import Config, ConfigError, load_config, unknown_variables
from .store import cdr

DEFAULT_CONFIG = Path("config/gateway.toml")


def _config(args: argparse.Namespace) -> Config:
    path = args.config
    if path is None and DEFAULT_CONFIG.exists():
        path = DEFAULT_CONFIG
    config = load_config(path)
    if getattr(args, "data_dir", None):
        config.data.dir = args.data_dir
    for warning in unknown_variables():  # a misspelt variable is said, not silently ignored
        print(f"gateway: warning: {warning}", file=sys.stderr)
    return config


def cmd_run(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.sip_host:
        config.sip.host = args.sip_host
    if args.sip_port is not None:
        config.sip.port = args.sip_port
    if args.http_port is not None:
        config.http.port = args.http_port
    if args.rtp_ports:
        low, _, high = args.rtp_ports.partition("-")
        if not (low.isdigit() and high.isdigit() and 1024 <= int(low) < int(high) <= 65535):
            raise ConfigError(f"--rtp-ports: expected A-B with 1024 <= A < B <= 65535, not {args.rtp_ports!r}")
        config.rtp.port_min, config.rtp.port_max = int(low), int(high)
    if args.workers is not None:
        config.cluster.workers = args.workers
        config.cluster.max_workers = max(config.cluster.max_workers, args.workers)
    if args.cluster_child and "tls" in config.sip.transports:  # Kamailio holds the TLS listener: workers stay inside
        config.sip.transports = [t for t in config.sip.transports if t != "tls"]
    log.setup(config.log.level, config.log.format)
    from .worker import Worker

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if not args.cluster_child and (args.workers is not None or config.cluster.workers > 1):
        from .cluster.supervisor import Supervisor

        if "tls" in config.sip.transports and not config.cluster.kamailio:
            raise ConfigError("sip.transports: tls with --workers is terminated by the Kamailio the gateway starts "
                              "(cluster.kamailio = true); with your own balancer, terminate TLS there")
        tls_trunks = [t.name for t in config.trunks if t.reached_over_tls]
        if tls_trunks:
            raise ConfigError(f"trunks {', '.join(tls_trunks)}: reached over TLS, which needs one worker for now "
                              "(with --workers, TLS is terminated by Kamailio for inbound calls only)")

        path = args.config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
        try:
            asyncio.run(Supervisor(config, path, config.cluster.workers).run())
        except (RuntimeError, ValueError) as exc:
            print(f"gateway: cluster: {exc}", file=sys.stderr)
            return 1
        return 0
    rooms = None
    if config.room_service.embedded and not args.no_rooms:
        from .cluster.janus import JanusSecrets
        from .rooms.service.links import service_secrets

        service_secrets(config)  # create the shared secrets before the room service reads them
        JanusSecrets.load(config)
        cmd = [sys.executable, "-m", "gateway", "rooms", "serve", "--data-dir", str(config.data_dir),
               "--port", str(config.room_service.port),
               "--voice-api-url", config.room_service.voice_api_url
               or f"{tls.scheme(config.http.tls_cert)}://{config.http.host}:{config.http.port}"]
        if args.config is not None or DEFAULT_CONFIG.exists():
            cmd += ["--config", str(args.config or DEFAULT_CONFIG)]
        from .cluster.supervisor import KeptProcess

        # its own process (media mixing never shares our interpreter lock), ended with us even on SIGKILL
        rooms = KeptProcess("rooms", cmd)  # started again if it dies (a Popen's interface)
    try:
        asyncio.run(Worker(config, name=args.name, manage_janus=not args.cluster_child).run_forever())
    finally:
        if rooms is not None:
            rooms.terminate()
            try:
                rooms.wait(10)
            except subprocess.TimeoutExpired:
                rooms.kill()
    return 0


# -- output: for people by default (tables, local ISO-8601 times), `--json` for scripts (the JSON of before)

def _json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def _fail(args: argparse.Namespace, code: str, message: str, field: str | None = None) -> int:
    """An error on stderr: `{"error": {code, message[, field]}}` with --json, one line for people. Exit 1."""
    if _json(args):
        body = {"code": code, "message": message} | ({"field": field} if field else {})
        print(json.dumps({"error": body}), file=sys.stderr)
    else:
        print(f"gateway: {message}", file=sys.stderr)
    return 1


def _note(args: argparse.Namespace, message: str) -> None:
    """A remark for people (stderr, so stdout stays the answer); none with --json."""
    if not _json(args):
        print(f"gateway: {message}", file=sys.stderr)


def when(ts: float | None, timespec: str = "seconds") -> str:
    """A Unix time in the machine's local zone, ISO-8601 with its offset (2026-11-29T15:48:36+00:00); '-' for none."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec=timespec)


BIDI = {0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A)}  # marks, embeddings, isolates


def cell(value: object) -> str:
    """A value as table text. Control characters and bidi controls (a caller's From, an old room's name) are shown
    escaped: what the CLI prints cannot move the cursor, recolour the terminal or reorder a line."""
    text = "-" if value is None or value == "" else str(value)
    return "".join(f"\\x{ord(c):02x}" if unicodedata.category(c) == "Cc"
                   else f"\\u{ord(c):04x}" if ord(c) in BIDI else c for c in text)


def table(headers: list[str], rows: list[list[object]]) -> str:
    """Aligned columns, two spaces apart, a header line first."""
    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h), *(len(r[i]) for r in cells)]) for i, h in enumerate(headers)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip()
                     for line in [headers, *cells])


def block(title: str, pairs: list[tuple[str, object]], indent: str = "  ") -> str:
    """A title line, then `key  value` lines aligned."""
    width = max((len(k) for k, _ in pairs), default=0)
    return "\n".join([cell(title), *(f"{indent}{k.ljust(width)}  {cell(v)}" for k, v in pairs)])


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(round(seconds))
    h, rest = divmod(whole, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def cmd_drain(args: argparse.Namespace) -> int:
    from .cluster.supervisor import drain

    try:
        answer = drain(_config(args), args.worker)
    except (LookupError, ProcessLookupError) as exc:
        return _fail(args, "not_found", str(exc))
    if _json(args):
        print(json.dumps(answer))
    else:
        print(f"{answer['worker']} (pid {answer['pid']}): draining; calls in progress may go on for up to "
              f"{answer['deadline_s']} s, then it exits")
    return 0


def cmd_kamailio_config(args: argparse.Namespace) -> int:
    from .cluster.supervisor import Supervisor, kamailio_files, kamailio_tls_file

    config = _config(args)
    sup = Supervisor(config, args.config, config.cluster.workers)
    cfg, dispatcher = kamailio_files(config, sup.slots[: config.cluster.workers], sup.run_dir)
    print(cfg)
    print("# ---- dispatcher.list ----")
    print(dispatcher)
    if "tls" in config.sip.transports:
        print("# ---- tls.cfg ----")
        print(kamailio_tls_file(config))
    return 0


def _call_duration(call: dict[str, Any]) -> float | None:
    """Talk time: from the answer to the end (or to now, for a call in progress)."""
    if call.get("answered_at") is None:
        return None
    end = call.get("ended_at")
    return (time.time() if end is None else float(end)) - float(call["answered_at"])


def cmd_calls(args: argparse.Namespace) -> int:
    config = _config(args)
    if not (config.data_dir / "cdr.sqlite").exists():  # an empty list would look like "no calls yet"
        print(f"gateway: no CDR store in {config.data_dir} (no call has been handled with this data directory; "
              "--data-dir or [data] dir names another)", file=sys.stderr)
    rows = cdr.list_calls(config.data_dir, limit=args.limit, active_only=args.active)
    if _json(args):
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no calls in progress" if args.active else "no calls")
        return 0
    print(table(["STARTED", "VOICE_ID", "DIRECTION", "FROM", "TO", "STATE", "TALK", "END", "CODE", "PROJECT"],
                [[when(r["started_at"]), r["voice_id"], r["direction"], r["from_number"], r["to_number"], r["state"],
                  duration(_call_duration(r)), r["reason"], r["sip_code"], r["project"]] for r in rows]))
    more = " (--limit for more)" if len(rows) >= args.limit else ""
    print(f"{len(rows)} call{'s' if len(rows) != 1 else ''}, newest first{more}; 'gateway cdr VOICE_ID' for one")
    return 0


CALL_FIELDS = [("direction", "direction"), ("from", "from_number"), ("to", "to_number"), ("did", "did"),
               ("trunk", "trunk"), ("project", "project"), ("worker", "worker"), ("transport", "transport"),
               ("media", "media_encryption"), ("room", "room_id")]


def cmd_cdr(args: argparse.Namespace) -> int:
    config = _config(args)
    call = cdr.get_call(config.data_dir, args.voice_id)
    if call is None:
        return _fail(args, "not_found", f"no call {args.voice_id}")
    if _json(args):
        print(json.dumps(call, indent=2))
        return 0
    ending = ", ".join(str(v) for v in (call.get("reason"), call.get("sip_code")) if v not in (None, ""))
    pairs: list[tuple[str, object]] = [(label, call.get(key)) for label, key in CALL_FIELDS]
    pairs += [("state", f"{call['state']} ({ending})" if ending else call["state"]),
              ("started", when(call["started_at"])), ("answered", when(call.get("answered_at"))),
              ("ended", when(call.get("ended_at"))), ("talk", duration(_call_duration(call)))]
    print(block(f"call {call['voice_id']}", pairs))
    print()
    events = [[when(e["ts"], "milliseconds"), e["state"],
               " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in e.items()
                        if k not in ("ts", "state"))] for e in call["events"]]
    print(table(["TIME", "EVENT", "DETAILS"], events))
    return 0


def _room_lines(room: dict[str, Any], config: Config) -> str:
    sip = room.get("sip") or {}
    dial_in = (f"meeting ID {sip.get('meeting_id')}, PIN {sip.get('pin')}, moderator PIN {sip.get('mpin')}"
               if sip.get("enabled") else "off")
    settings = ", ".join(k for k, v in sorted((room.get("settings") or {}).items()) if v) or "-"
    links = room.get("links") or {}
    expires = when(time.time() + config.room_service.host_link_days * 86400)
    return block(room["name"], [("room_id", room["room_id"]), ("project", room.get("project")),
                                ("created", when(room.get("created_at"))), ("dial-in", dial_in),
                                ("settings", settings), ("join", links.get("join")),
                                ("host", f"{links.get('host')}  (moderators; share it like a password; "
                                         f"expires {expires})")])


def _links_source(config: Config) -> tuple[str | None, str]:
    """The base of room links, and where it came from: the room service running on this data directory (its pid
    alive), else the configuration (the service may be started later with it, or be another host's)."""
    from .rooms.service.links import links_base, running_service

    running = running_service(config.data_dir)
    if running is not None:
        return str(running["url"]), f"links from the room service running at {running['url']}"
    return None, (f"the room service is not running on {config.data_dir}: links from the configuration "
                  f"({links_base(config)})")


def cmd_rooms_create(args: argparse.Namespace) -> int:
    from .store.rooms import RoomStore

    config = _config(args)
    store = RoomStore(config.data_dir)
    try:
        project = args.project or (config.projects[0].name if config.projects else "")
        room = store.create(args.name, sip_enabled=not args.no_sip, meeting_id_digits=config.rooms.meeting_id_digits,
                            pin_digits=config.rooms.pin_digits, meeting_id=args.meeting_id, project=project)
    except ValueError as exc:
        return _fail(args, "conflict", str(exc))
    finally:
        store.close()
    from .rooms.service.links import room_links, service_secrets

    base, source = _links_source(config)
    room["links"] = room_links(config, service_secrets(config)["secret"], room["room_id"], base=base)
    if _json(args):
        print(json.dumps(room, indent=2))
    else:
        print(_room_lines(room, config))
        _note(args, source)
        if not _caller_id(config, room["project"]):
            _note(args, f"\"call a phone\" on its page needs a number to call from: 'gateway projects numbers add "
                        f"{room['project'] or 'PROJECT'} NUMBER --outbound-only'")
    return 0


def _caller_id(config: Config, project: str) -> bool:
    """Whether the project has a number it may call from (the room page's "call a phone" needs one)."""
    from .store.projects import ProjectStore

    store = ProjectStore(config.data_dir)
    try:
        for configured in config.projects:
            store.ensure(configured)
        found = store.by_name(project, cached=False)
        return found is not None and any(n.outbound for n in found.numbers)
    finally:
        store.close()


def cmd_rooms_list(args: argparse.Namespace) -> int:
    from .rooms.service.links import room_links, service_secrets
    from .store.rooms import RoomStore

    config = _config(args)
    store = RoomStore(config.data_dir)
    try:
        rooms = store.list(args.project)
    finally:
        store.close()
    base, source = _links_source(config)
    secret = service_secrets(config)["secret"] if rooms else ""
    for room in rooms:
        room["links"] = room_links(config, secret, room["room_id"], base=base)
    if _json(args):
        print(json.dumps(rooms, indent=2))
        return 0
    print("\n\n".join(_room_lines(room, config) for room in rooms) if rooms else "no rooms")
    if rooms:
        _note(args, source)
    return 0


async def _delete_through_service(running: dict[str, Any], api_user: str, api_key: str, room_id: str) -> int:
    """DELETE /video/v1/rooms/{room_id} on the running service: its HTTP status."""
    import aiohttp

    auth = aiohttp.BasicAuth(api_user, api_key)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        async with session.delete(f"{running['api']}/video/v1/rooms/{room_id}", auth=auth,
                                  **tls.internal(str(running.get("tls_cert") or ""))) as r:
            return r.status


def cmd_rooms_delete(args: argparse.Namespace) -> int:
    """Through the running room service's Video API (participants hear or see "the meeting has ended", the Janus
    rooms are destroyed, the shared directory forgets the meeting ID); with no service running, from the store."""
    from .rooms.service.links import running_service, service_secrets
    from .store.rooms import RoomStore

    config = _config(args)
    room_id = args.room_id
    running = running_service(config.data_dir)
    via = "store"
    if running is not None:
        import aiohttp

        error: BaseException | None = None
        user = str(running.get("api_user") or config.room_service.api_user)
        try:
            status = asyncio.run(_delete_through_service(running, user, service_secrets(config)["api_key"], room_id))
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:  # it died since, or hangs: the store is the truth
            status, error = 0, exc
        if status == 404:
            return _fail(args, "not_found", f"no room {room_id}", "room_id")
        if status == 200:
            via = "room_service"
        elif status == 0:
            _note(args, f"the room service at {running['api']} did not answer ({type(error).__name__}): "
                        "deleting from the store")
        else:
            return _fail(args, "room_service_error", f"the room service answered {status}")
    if via == "store":
        store = RoomStore(config.data_dir)
        try:
            deleted = store.delete(room_id)
        finally:
            store.close()
        if not deleted:
            return _fail(args, "not_found", f"no room {room_id}", "room_id")
    if _json(args):
        print(json.dumps({"room_id": room_id, "state": "deleted", "via": via}))
    elif via == "room_service":
        print(f"room {room_id} deleted by the room service at {running['api'] if running else ''}: its "
              "participants were told the meeting has ended and its Janus rooms destroyed")
    elif running is None:
        print(f"room {room_id} deleted from the store (the room service is not running: no one was in it)")
    else:
        print(f"room {room_id} deleted from the store (the room service did not answer: anyone in the room was not "
              "told)")
    return 0


def webhook_target_refusal(url: str, config: Config) -> str | None:
    from .api.webhooks import allowed_networks, check_target_blocking

    return check_target_blocking(url, allowed_networks(config.webhooks))


def cmd_projects_create(args: argparse.Namespace) -> int:
    from .store.projects import Number, ProjectStore, check_notification_url

    config = _config(args)
    numbers = [Number(raw, inbound=not args.outbound_only, outbound=not args.inbound_only) for raw in args.number or []]
    try:
        check_notification_url(args.notification_url or "")
    except ValueError as exc:
        raise ConfigError(f"--notification-url: {str(exc).partition(': ')[2]}") from None
    if args.notification_url and (unsafe := webhook_target_refusal(args.notification_url, config)) is not None:
        raise ConfigError(f"--notification-url: {unsafe}")  # SSRF, as the API checks an event_url
    if not (Path(config.ivr.prompts_dir) / f"{args.language}.toml").exists():
        raise ConfigError(f"--language: no prompts/{args.language}.toml")
    if args.trunk and not any(t.name == args.trunk and t.outbound for t in config.trunks):
        raise ConfigError(f"--trunk: no trunk named {args.trunk!r} with [trunks.outbound]")
    store = ProjectStore(config.data_dir)
    try:
        project = store.create(args.name, numbers, notification_url=args.notification_url or "",
                               trunk=args.trunk or "", welcome_text=args.welcome_text or "",
                               voice_type=args.voice_type, language=args.language, auto_record=args.auto_record)
    except ValueError as exc:
        return _fail(args, "conflict", str(exc))
    finally:
        store.close()
    _print_project(args, project.public(with_key=True), "created")
    return 0


def _numbers_text(numbers: list[dict[str, Any]]) -> str:
    return ", ".join(f"{n['number']} ({'/'.join(d for d in ('in', 'out') if n.get(d)) or 'off'}"
                     f"{', route ' + n['route'] if n.get('route') else ''})" for n in numbers) or "-"


def _print_project(args: argparse.Namespace, project: dict[str, Any], what: str = "") -> None:
    """One project: JSON with --json, else a block. Credentials (present once: create, reset) are marked and
    followed by the reminder that they are shown only now."""
    secrets = [k for k in ("app_key", "webhook_secret") if k in project]
    if _json(args):
        print(json.dumps(project, indent=2))
    else:
        inbound = project.get("inbound") or {}
        pairs: list[tuple[str, object]] = [("app_id", project["app_id"])]
        pairs += [(k, f"{project[k]}   <- SECRET, shown only now: store it") for k in secrets]
        pairs += [("numbers", _numbers_text(project.get("numbers") or [])),
                  ("notification_url", project.get("notification_url")), ("trunk", project.get("trunk") or "default"),
                  ("welcome_text", inbound.get("welcome_text")),
                  ("voice", f"{inbound.get('voice_type')}, {inbound.get('language')}"),
                  ("auto_record", "yes" if inbound.get("auto_record") else "no"),
                  ("key fingerprint", project.get("app_key_fingerprint"))]
        print(block(f"project {project['name']}" + (f" ({what})" if what else ""), pairs))
    if secrets:
        shown = "app_key and webhook_secret above are" if "app_key" in project else "webhook_secret above is"
        print(f"gateway: the {shown} shown only now (the store keeps a hash of the key, and 'gateway projects "
              f"list' a fingerprint); 'gateway projects reset-key {project['name']}' replaces them", file=sys.stderr)


def cmd_projects_numbers(args: argparse.Namespace) -> int:
    """numbers add NAME NUMBER: the project takes calls to NUMBER and/or may call from it; numbers remove NAME NUMBER.
    A number belongs to one project at most. Prints the project (no secrets)."""
    from .store.projects import Number, ProjectStore

    config = _config(args)
    wanted = args.number.lstrip("+")
    store = ProjectStore(config.data_dir)
    try:
        for configured in config.projects:
            store.ensure(configured)
        project = store.by_name(args.name, cached=False)
        error = None
        if project is None:
            error = ("not_found", f"no project named {args.name!r}", "name")
        elif args.numbers_command == "add":
            inbound = not args.outbound_only  # calls to a number reach one project: an inbound one is unique
            owner = next((p for p in store.list() for n in p.numbers if n.number.lstrip("+") == wanted
                          and (p.name == project.name or inbound and n.inbound)), None)
            if owner is not None:
                error = ("conflict", f"{args.number} is a number of the project {owner.name!r} already", "number")
            else:
                project.numbers.append(Number(args.number, inbound=not args.outbound_only,
                                              outbound=not args.inbound_only))
                store.update(project)
        else:
            kept = [n for n in project.numbers if n.number.lstrip("+") != wanted]
            if len(kept) == len(project.numbers):
                error = ("not_found", f"{args.number} is not a number of {args.name!r}", "number")
            else:
                project.numbers = kept
                store.update(project)
    finally:
        store.close()
    if error is not None:
        return _fail(args, *error)
    assert project is not None
    _print_project(args, project.public())
    return 0


def cmd_projects_list(args: argparse.Namespace) -> int:
    from .store.projects import ProjectStore

    config = _config(args)
    store = ProjectStore(config.data_dir)
    try:
        for configured in config.projects:
            store.ensure(configured)
        projects = [p.public() for p in store.list()]
    finally:
        store.close()
    if _json(args):
        print(json.dumps(projects, indent=2))
        return 0
    if not projects:
        print("no projects")
        return 0
    print(table(["NAME", "APP_ID", "KEY", "NUMBERS", "NOTIFICATION_URL"],
                [[p["name"], p["app_id"], p["app_key_fingerprint"], _numbers_text(p["numbers"]),
                  p["notification_url"]] for p in projects]))
    return 0


def cmd_projects_reset(args: argparse.Namespace) -> int:
    """reset-key: a new app_key (the old one stops working) and a new webhook secret; reset-webhook-secret: the
    webhook secret only. Prints the project with the new secrets, once."""
    from .store.projects import ProjectStore

    config = _config(args)
    store = ProjectStore(config.data_dir)
    try:
        for configured in config.projects:
            store.ensure(configured)
        if args.projects_command == "reset-key":
            project = store.reset_key(args.name, webhook_secret=not args.keep_webhook_secret)
        else:
            project = store.reset_webhook_secret(args.name)
    finally:
        store.close()
    if project is None:
        return _fail(args, "not_found", f"no project named {args.name!r}", "name")
    _print_project(args, project.public(with_key=True), "new credentials")
    return 0


def cmd_rooms_serve(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.port is not None:
        config.room_service.port = args.port
    if args.voice_api_url:
        config.room_service.voice_api_url = args.voice_api_url
    log.setup(config.log.level, config.log.format)
    from .rooms.service.server import serve

    serve(config)
    return 0


def cmd_prompts_render(args: argparse.Namespace) -> int:
    from .apps.prompts import PromptError, PromptLibrary, prompt_sets

    config = _config(args)
    log.setup(config.log.level, "text")
    library = PromptLibrary(Path(config.ivr.prompts_dir), config.data_dir / "prompts-cache")
    combos = prompt_sets(config.projects)
    try:
        count = asyncio.run(library.render_all(combos))
    except PromptError as exc:
        print(f"gateway: prompts: {exc}", file=sys.stderr)
        return 1
    finally:
        library.close()
    answer = {"prompts": count, "rendered": library.rendered, "cache": str(config.data_dir / "prompts-cache")}
    if _json(args):
        print(json.dumps(answer))
    else:
        print(f"{count} prompts ready in {answer['cache']} ({library.rendered} rendered now, the rest cached)")
    return 0


def cmd_certs_self_signed(args: argparse.Namespace) -> int:
    """A self-signed certificate and key for trying HTTPS (browsers will warn: use a CA's for people)."""
    out = Path(args.out)
    cert, key = out / "cert.pem", out / "key.pem"
    if not args.force and (cert.exists() or key.exists()):
        print(f"gateway: certs: {cert} or {key} exists (--force replaces them)", file=sys.stderr)
        return 1
    tls.self_signed(args.name, cert, key, args.days)
    if _json(args):
        print(json.dumps({"cert": str(cert), "key": str(key), "names": args.name, "days": args.days,
                          "config": {"tls_cert": str(cert), "tls_key": str(key)}}))
    else:
        print(f"wrote {cert} and {key} (0600) for {', '.join(args.name)}, valid {args.days} days; use them as\n"
              f'  [http] tls_cert = "{cert}"  tls_key = "{key}"\n'
              f'  [room_service] tls_cert = "{cert}"  tls_key = "{key}"')
    return 0


# -- arguments checked by the rules the APIs apply (one rule each, imported from where the API takes it)

def _room_name(value: str) -> str:
    from .store.rooms import name_problem

    problem = name_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def _meeting_id(value: str) -> str:
    from .store.rooms import meeting_id_problem

    problem = meeting_id_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def _number(value: str) -> str:
    from .store.projects import normalize_number

    try:
        return normalize_number(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{value!r}: {exc}") from None


def _room_id(value: str) -> str:
    if not (len(value) == 32 and all(c in "0123456789abcdef" for c in value)):
        raise argparse.ArgumentTypeError(f"{value!r}: a room id is 32 hex digits ('gateway rooms list' shows them)")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="IVR voice gateway: phone calls into video rooms")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", type=Path, help=f"TOML config (default: {DEFAULT_CONFIG} if present)")
        sp.add_argument("--data-dir", help="data directory (CDR store, caches)")
        sp.add_argument("--json", action="store_true", help="JSON for scripts (default: text for people)")

    run = sub.add_parser("run", help="run a worker")
    common(run)
    run.add_argument("--sip-host")
    run.add_argument("--sip-port", type=int)
    run.add_argument("--http-port", type=int)
    run.add_argument("--rtp-ports", help="RTP port range A-B")
    run.add_argument("--name", default=os.environ.get("GATEWAY_WORKER_NAME", "w1"), help="worker name (CDR)")
    run.add_argument("--workers", type=int, help="worker processes behind Kamailio (default: cluster.workers)")
    run.add_argument("--no-rooms", action="store_true", help="do not start the embedded room service")
    run.add_argument("--cluster-child", action="store_true", help=argparse.SUPPRESS)  # a supervisor's worker
    run.set_defaults(func=cmd_run)

    dr = sub.add_parser("drain", help="drain a worker of this host: no new calls, current ones finish, then it exits")
    common(dr)
    dr.add_argument("worker", help="worker name (w1, w2, ...)")
    dr.set_defaults(func=cmd_drain)

    cluster = sub.add_parser("cluster", help="scale-out helpers").add_subparsers(dest="cluster_command", required=True)
    kam = cluster.add_parser("kamailio-config", help="print the Kamailio config and dispatcher list for the workers")
    common(kam)
    kam.set_defaults(func=cmd_kamailio_config)

    calls = sub.add_parser("calls", help="list calls, newest first")
    common(calls)
    calls.add_argument("--active", action="store_true", help="only calls not yet disconnected")
    calls.add_argument("--limit", type=int, default=100)
    calls.set_defaults(func=cmd_calls)

    c = sub.add_parser("cdr", help="one call's record and events")
    common(c)
    c.add_argument("voice_id")
    c.set_defaults(func=cmd_cdr)

    rooms = sub.add_parser("rooms", help="the embedded room store").add_subparsers(dest="rooms_command", required=True)
    create = rooms.add_parser("create", help="create a room: its links, meeting ID, PIN and moderator PIN")
    common(create)
    create.add_argument("--name", required=True, type=_room_name, help="1 to 64 characters")
    create.add_argument("--no-sip", action="store_true", help="a room without dial-in")
    create.add_argument("--meeting-id", type=_meeting_id, help="use this meeting ID (4 to 16 digits) instead of a "
                                                               "random one")
    create.add_argument("--project", help="the project the room belongs to (default: the first configured)")
    create.set_defaults(func=cmd_rooms_create)
    serve = rooms.add_parser("serve", help="run the embedded room service (Video API, room page, media)")
    common(serve)
    serve.add_argument("--port", type=int, help="HTTP port (default: room_service.port)")
    serve.add_argument("--voice-api-url", help="the gateway's Voice API for the page's \"call a phone\"")
    serve.set_defaults(func=cmd_rooms_serve)
    listing = rooms.add_parser("list", help="all rooms, with their links and dial-in details")
    common(listing)
    listing.add_argument("--project", help="only this project's rooms")
    listing.set_defaults(func=cmd_rooms_list)
    delete = rooms.add_parser("delete", help="delete a room (through the running room service: its participants are "
                                             "told, its Janus rooms destroyed)")
    common(delete)
    delete.add_argument("room_id", type=_room_id, help="the room's id (32 hex digits)")
    delete.set_defaults(func=cmd_rooms_delete)

    projects = sub.add_parser("projects", help="API projects (app_id/app_key, numbers, webhook)").add_subparsers(
        dest="projects_command", required=True)
    pcreate = projects.add_parser("create", help="create a project; prints its app_id, app_key and webhook_secret "
                                                 "(shown only then)")
    common(pcreate)
    pcreate.add_argument("--name", required=True)
    pcreate.add_argument("--number", action="append", type=_number,
                         help="an E.164 number of the project: optional +, then 6 to 15 digits (repeatable)")
    direction = pcreate.add_mutually_exclusive_group()
    direction.add_argument("--inbound-only", action="store_true", help="the numbers take calls only (out=false)")
    direction.add_argument("--outbound-only", action="store_true", help="the numbers are caller IDs only (in=false)")
    pcreate.add_argument("--notification-url", help="default webhook for the project's calls")
    pcreate.add_argument("--trunk", help="outbound trunk (default: the first with [trunks.outbound])")
    pcreate.add_argument("--welcome-text", help="greeting for the project's inbound calls")
    pcreate.add_argument("--auto-record", action="store_true",
                         help="record the project's inbound calls from answer to hang-up (voice.inbound.auto_record)")
    pcreate.add_argument("--voice-type", choices=["female", "male"], default="female", help="prompt voice")
    pcreate.add_argument("--language", default="en-US", help="prompt language (prompts/<language>.toml)")
    pcreate.set_defaults(func=cmd_projects_create)
    plist = projects.add_parser("list", help="all projects (keys only as fingerprints)")
    common(plist)
    plist.set_defaults(func=cmd_projects_list)
    preset = projects.add_parser("reset-key", help="a new app_key and webhook secret (the old key stops working); "
                                                   "prints them, once")
    common(preset)
    preset.add_argument("name", help="the project's name")
    preset.add_argument("--keep-webhook-secret", action="store_true", help="replace the app_key only")
    preset.set_defaults(func=cmd_projects_reset)
    phook = projects.add_parser("reset-webhook-secret", help="a new webhook secret (the app_key stays); prints it, once")
    common(phook)
    phook.add_argument("name", help="the project's name")
    phook.set_defaults(func=cmd_projects_reset)
    numbers = projects.add_parser("numbers", help="a project's numbers").add_subparsers(dest="numbers_command",
                                                                                        required=True)
    nadd = numbers.add_parser("add", help="give a project a number: calls to it reach the project (route api unless "
                                          "[[dids]] says otherwise) and its dial-outs may show it")
    common(nadd)
    nadd.add_argument("name", help="the project's name")
    nadd.add_argument("number", type=_number, help="E.164: optional +, then 6 to 15 digits")
    ndirection = nadd.add_mutually_exclusive_group()
    ndirection.add_argument("--inbound-only", action="store_true", help="it takes calls only (out=false)")
    ndirection.add_argument("--outbound-only", action="store_true", help="a caller ID only (in=false)")
    nadd.set_defaults(func=cmd_projects_numbers)
    nremove = numbers.add_parser("remove", help="take a number from a project")
    common(nremove)
    nremove.add_argument("name", help="the project's name")
    nremove.add_argument("number", type=_number)
    nremove.set_defaults(func=cmd_projects_numbers)

    prompts = sub.add_parser("prompts", help="spoken prompts").add_subparsers(dest="prompts_command", required=True)
    render = prompts.add_parser("render", help="pre-render every project's prompts into the cache")
    common(render)
    render.set_defaults(func=cmd_prompts_render)

    certs = sub.add_parser("certs", help="TLS certificates").add_subparsers(dest="certs_command", required=True)
    signed = certs.add_parser("self-signed", help="write a self-signed certificate and key (0600) for trying HTTPS: "
                                                  "set them as http.tls_cert/tls_key and room_service.tls_cert/tls_key")
    signed.add_argument("--name", action="append", required=True,
                        help="a DNS name or IP address the certificate is for (repeat for more; the first is its CN)")
    signed.add_argument("--out", default="data/tls", help="directory for cert.pem and key.pem (default: data/tls)")
    signed.add_argument("--days", type=int, default=397, help="validity (default: 397, what browsers accept)")
    signed.add_argument("--force", action="store_true", help="replace existing files")
    signed.add_argument("--json", action="store_true", help="JSON for scripts (default: text for people)")
    signed.set_defaults(func=cmd_certs_self_signed)
    return p


def main(argv: list[str] | None = None) -> int:
    # whatever this process and its helpers (room service, Janus, Redis, Kamailio) create is the owner's only:
    # the data directory holds keys, PINs and call records (PostgreSQL's rule for its data directory)
    os.umask(0o077)
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
