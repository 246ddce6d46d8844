"""`gateway` command line: run a worker, read calls and CDRs."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

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
        from .rooms.service.server import service_secrets

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


def cmd_drain(args: argparse.Namespace) -> int:
    from .cluster.supervisor import drain

    try:
        print(json.dumps(drain(_config(args), args.worker)))
    except (LookupError, ProcessLookupError) as exc:
        print(json.dumps({"error": {"code": "not_found", "message": str(exc)}}), file=sys.stderr)
        return 1
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


def cmd_calls(args: argparse.Namespace) -> int:
    config = _config(args)
    if not (config.data_dir / "cdr.sqlite").exists():  # an empty list would look like "no calls yet"
        print(f"gateway: no CDR store in {config.data_dir} (no call has been handled with this data directory; "
              "--data-dir or [data] dir names another)", file=sys.stderr)
    rows = cdr.list_calls(config.data_dir, limit=args.limit, active_only=args.active)
    print(json.dumps(rows, indent=2))
    return 0


def cmd_cdr(args: argparse.Namespace) -> int:
    config = _config(args)
    call = cdr.get_call(config.data_dir, args.voice_id)
    if call is None:
        print(json.dumps({"error": {"code": "not_found", "message": f"no call {args.voice_id}"}}), file=sys.stderr)
        return 1
    print(json.dumps(call, indent=2))
    return 0


def cmd_rooms_create(args: argparse.Namespace) -> int:
    from .store.rooms import RoomStore

    config = _config(args)
    store = RoomStore(config.data_dir)
    if args.meeting_id is not None and not (args.meeting_id.isdigit() and 4 <= len(args.meeting_id) <= 16):
        raise ConfigError("--meeting-id: 4 to 16 digits")
    try:
        project = args.project or (config.projects[0].name if config.projects else "")
        room = store.create(args.name, sip_enabled=not args.no_sip, meeting_id_digits=config.rooms.meeting_id_digits,
                            pin_digits=config.rooms.pin_digits, meeting_id=args.meeting_id, project=project)
    except ValueError as exc:
        print(json.dumps({"error": {"code": "conflict", "message": str(exc)}}), file=sys.stderr)
        return 1
    finally:
        store.close()
    from .rooms.service.server import room_links, service_secrets

    room["links"] = room_links(config, service_secrets(config)["secret"], room["room_id"])
    print(json.dumps(room, indent=2))
    return 0


def cmd_rooms_list(args: argparse.Namespace) -> int:
    from .store.rooms import RoomStore

    store = RoomStore(_config(args).data_dir)
    print(json.dumps(store.list(), indent=2))
    store.close()
    return 0


def webhook_target_refusal(url: str, config: Config) -> str | None:
    from .api.webhooks import allowed_networks, check_target_blocking

    return check_target_blocking(url, allowed_networks(config.webhooks))


def cmd_projects_create(args: argparse.Namespace) -> int:
    from .store.projects import Number, ProjectStore, check_notification_url, normalize_number

    config = _config(args)
    numbers = []
    for raw in args.number or []:
        try:
            normalize_number(raw)
        except ValueError as exc:
            raise ConfigError(f"--number {raw!r}: {exc}") from None
        numbers.append(Number(raw, inbound=not args.outbound_only, outbound=not args.inbound_only))
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
        print(json.dumps({"error": {"code": "conflict", "message": str(exc)}}), file=sys.stderr)
        return 1
    finally:
        store.close()
    _print_credentials(project.public(with_key=True))
    return 0


def _print_credentials(project: dict[str, object]) -> None:
    print(json.dumps(project, indent=2))
    shown = "app_key and webhook_secret above are" if "app_key" in project else "webhook_secret above is"
    print(f"gateway: the {shown} shown only now (the store keeps a hash of the key, and 'gateway projects "
          f"list' a fingerprint); 'gateway projects reset-key {project['name']}' replaces them", file=sys.stderr)


def cmd_projects_numbers(args: argparse.Namespace) -> int:
    """numbers add NAME NUMBER: the project takes calls to NUMBER and/or may call from it; numbers remove NAME NUMBER.
    A number belongs to one project at most. Prints the project (no secrets)."""
    from .store.projects import Number, ProjectStore, normalize_number

    config = _config(args)
    try:
        normalize_number(args.number)
    except ValueError as exc:
        raise ConfigError(f"number {args.number!r}: {exc}") from None
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
        print(json.dumps({"error": dict(zip(("code", "message", "field"), error, strict=True))}), file=sys.stderr)
        return 1
    assert project is not None
    print(json.dumps(project.public(), indent=2))
    return 0


def cmd_projects_list(args: argparse.Namespace) -> int:
    from .store.projects import ProjectStore

    config = _config(args)
    store = ProjectStore(config.data_dir)
    for configured in config.projects:
        store.ensure(configured)
    print(json.dumps([p.public() for p in store.list()], indent=2))
    store.close()
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
        print(json.dumps({"error": {"code": "not_found", "message": f"no project named {args.name!r}", "field": "name"}}),
              file=sys.stderr)
        return 1
    _print_credentials(project.public(with_key=True))
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
    print(json.dumps({"prompts": count, "rendered": library.rendered, "cache": str(config.data_dir / "prompts-cache")}))
    return 0


def cmd_certs_self_signed(args: argparse.Namespace) -> int:
    """A self-signed certificate and key for trying HTTPS (browsers will warn: use a CA's for people)."""
    out = Path(args.out)
    cert, key = out / "cert.pem", out / "key.pem"
    if not args.force and (cert.exists() or key.exists()):
        print(f"gateway: certs: {cert} or {key} exists (--force replaces them)", file=sys.stderr)
        return 1
    tls.self_signed(args.name, cert, key, args.days)
    print(json.dumps({"cert": str(cert), "key": str(key), "names": args.name, "days": args.days,
                      "config": {"tls_cert": str(cert), "tls_key": str(key)}}))
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="IVR voice gateway: phone calls into video rooms")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", type=Path, help=f"TOML config (default: {DEFAULT_CONFIG} if present)")
        sp.add_argument("--data-dir", help="data directory (CDR store, caches)")

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

    calls = sub.add_parser("calls", help="list calls (JSON)")
    common(calls)
    calls.add_argument("--active", action="store_true", help="only calls not yet disconnected")
    calls.add_argument("--limit", type=int, default=100)
    calls.set_defaults(func=cmd_calls)

    c = sub.add_parser("cdr", help="one call's record and events (JSON)")
    common(c)
    c.add_argument("voice_id")
    c.set_defaults(func=cmd_cdr)

    rooms = sub.add_parser("rooms", help="the embedded room store").add_subparsers(dest="rooms_command", required=True)
    create = rooms.add_parser("create", help="create a room (JSON with room_id and sip: meeting_id, pin, mpin)")
    common(create)
    create.add_argument("--name", required=True)
    create.add_argument("--no-sip", action="store_true", help="a room without dial-in")
    create.add_argument("--meeting-id", help="use this meeting ID (digits) instead of a random one")
    create.add_argument("--project", help="the project the room belongs to (default: the first configured)")
    create.set_defaults(func=cmd_rooms_create)
    serve = rooms.add_parser("serve", help="run the embedded room service (Video API, room page, media)")
    common(serve)
    serve.add_argument("--port", type=int, help="HTTP port (default: room_service.port)")
    serve.add_argument("--voice-api-url", help="the gateway's Voice API for the page's \"call a phone\"")
    serve.set_defaults(func=cmd_rooms_serve)
    listing = rooms.add_parser("list", help="all rooms (JSON)")
    common(listing)
    listing.set_defaults(func=cmd_rooms_list)

    projects = sub.add_parser("projects", help="API projects (app_id/app_key, numbers, webhook)").add_subparsers(
        dest="projects_command", required=True)
    pcreate = projects.add_parser("create", help="create a project; prints JSON with its app_id, app_key and "
                                                 "webhook_secret (shown only then)")
    common(pcreate)
    pcreate.add_argument("--name", required=True)
    pcreate.add_argument("--number", action="append", help="an E.164 number of the project (repeatable)")
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
    plist = projects.add_parser("list", help="all projects (JSON; keys only as fingerprints)")
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
    nadd.add_argument("number", help="E.164: optional +, then 6 to 15 digits")
    ndirection = nadd.add_mutually_exclusive_group()
    ndirection.add_argument("--inbound-only", action="store_true", help="it takes calls only (out=false)")
    ndirection.add_argument("--outbound-only", action="store_true", help="a caller ID only (in=false)")
    nadd.set_defaults(func=cmd_projects_numbers)
    nremove = numbers.add_parser("remove", help="take a number from a project")
    common(nremove)
    nremove.add_argument("name", help="the project's name")
    nremove.add_argument("number")
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
