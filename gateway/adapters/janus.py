"""An asyncio client for the Janus API over its REST (HTTP) transport: sessions, plugin handles, events.

Shapes follow Janus 1.1.2 (janus.c, transports/janus_http.c). Requests are POSTed JSON carrying a
`transaction` and the `apisecret`; a plugin answers a synchronous request with `success` + `plugindata`,
an asynchronous one with `ack` and later an `event` carrying the same transaction. Events arrive by long
poll (`GET /janus/<session>?maxev=10`, answered within 30 s; each poll also keeps the session alive). A
session is lost when Janus forgets it (HTTP 404, error 458, `timeout`) or stops answering: `on_lost` fires
once and `JanusSession.lost` is set. Nothing received from Janus can raise out of the poll loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway import log

logger = logging.getLogger(__name__)

Json = dict[str, Any]
EventCallback = Callable[[Json, Json | None], None]  # (plugindata.data, jsep)
CoreCallback = Callable[[Json], None]  # webrtcup, media, hangup, slowlink, detached
CORE_EVENTS = ("webrtcup", "media", "hangup", "slowlink", "detached", "trickle")
UNAUTHORIZED, SESSION_NOT_FOUND, HANDLE_NOT_FOUND = 403, 458, 459
LONG_POLL_S = 30.0  # Janus answers an idle long poll after 30 s
POLL_RETRY_S = 0.5  # after a failed poll; a second consecutive failure means the session is lost


class JanusError(Exception):
    """An error answered by Janus or a plugin (`code`, `reason`); code 0: no answer (transport, timeout)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}" if code else reason)
        self.code = code
        self.reason = reason


class JanusConnectionError(JanusError):
    """Janus could not be reached or answered something that is not the Janus API."""

    def __init__(self, reason: str) -> None:
        super().__init__(0, reason)


@dataclass(frozen=True)
class JanusReply:
    data: Json  # the plugin's plugindata.data
    jsep: Json | None = None


def new_transaction() -> str:
    return secrets.token_hex(8)


def parse_events(text: str) -> list[object]:
    """A long-poll body: one event, or a list of them with maxev > 1; [] when it is not JSON."""
    try:
        body = json.loads(text)
    except ValueError:
        log.event(logger, "janus.bad_event", logging.WARNING, detail="not JSON", size=len(text))
        return []
    return body if isinstance(body, list) else [body]


class JanusClient:
    """One Janus server: `create_session()` opens sessions; every request is bounded by `timeout` seconds."""

    def __init__(self, url: str, api_secret: str = "", *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.api_secret = api_secret
        self.timeout = timeout
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> JanusClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def http(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:  # created lazily: needs a running loop
            self._http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))  # long polls hold one each
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    async def info(self) -> Json:
        """GET /janus/info (needs no secret)."""
        try:
            async with self.http().get(f"{self.url}/info", timeout=aiohttp.ClientTimeout(total=self.timeout)) as r:
                body = await r.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise JanusConnectionError(f"info: {self.redact(exc)}") from None
        if not isinstance(body, dict):
            raise JanusConnectionError("info: not a JSON object")
        return body

    async def create_session(self, on_lost: Callable[[str], None] | None = None) -> JanusSession:
        """A new session with its long-poll loop running; `on_lost(reason)` fires once if Janus loses it."""
        reply = await self.post("", {"janus": "create"})
        session = JanusSession(self, _id(reply), on_lost)
        session.start()
        return session

    async def post(self, path: str, body: Json, timeout: float | None = None) -> Json:
        """POST one request to url+path; returns Janus' answer, raises JanusError for `janus: error`."""
        payload = {**body, "transaction": body.get("transaction") or new_transaction()}
        if self.api_secret:
            payload["apisecret"] = self.api_secret
        try:
            async with self.http().post(self.url + path, json=payload,
                                        timeout=aiohttp.ClientTimeout(total=timeout or self.timeout)) as resp:
                status, text = resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise JanusConnectionError(f"{body.get('janus')}: {self.redact(exc)}") from None
        try:
            answer = json.loads(text)
        except ValueError:
            raise JanusConnectionError(f"{body.get('janus')}: HTTP {status}, not JSON") from None
        if not isinstance(answer, dict):
            raise JanusConnectionError(f"{body.get('janus')}: HTTP {status}, not a JSON object")
        if answer.get("janus") == "error":
            error = answer.get("error")
            if not isinstance(error, dict):
                error = {}
            raise JanusError(_int(error.get("code")), str(error.get("reason") or "error"))
        return answer

    def redact(self, exc: BaseException) -> str:
        """An exception as text, the API secret (which rides in long-poll URLs) masked."""
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return text.replace(self.api_secret, "***") if self.api_secret else text


class JanusSession:
    """A Janus session: plugin handles, the long-poll loop dispatching events to them by `sender`."""

    def __init__(self, client: JanusClient, session_id: int, on_lost: Callable[[str], None] | None = None) -> None:
        self.client = client
        self.id = session_id
        self.on_lost = on_lost
        self.lost = asyncio.Event()
        self.lost_reason = ""
        self.handles: dict[int, JanusHandle] = {}
        self.pending: dict[str, asyncio.Future[JanusReply]] = {}  # transaction -> awaited asynchronous event
        self._closed = False
        self._poller: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._poller = asyncio.get_running_loop().create_task(self._poll_loop(), name=f"janus-poll-{self.id}")

    async def post(self, path: str, body: Json, timeout: float | None = None) -> Json:
        if self.lost.is_set():
            raise JanusError(SESSION_NOT_FOUND, f"session lost: {self.lost_reason}")
        if self._closed:
            raise JanusError(SESSION_NOT_FOUND, "session destroyed")
        try:
            return await self.client.post(f"/{self.id}{path}", body, timeout)
        except JanusError as exc:
            if exc.code == SESSION_NOT_FOUND:
                self.mark_lost(exc.reason)
            raise

    async def attach(self, plugin: str, on_event: EventCallback | None = None,
                     on_core_event: CoreCallback | None = None) -> JanusHandle:
        """Attach to a plugin (e.g. "janus.plugin.audiobridge"); its events go to `on_event(data, jsep)`."""
        reply = await self.post("", {"janus": "attach", "plugin": plugin})
        handle = JanusHandle(self, _id(reply), plugin, on_event, on_core_event)
        self.handles[handle.id] = handle
        return handle

    async def keepalive(self) -> None:
        """Not needed while the long poll runs (every poll keeps the session alive); here for other uses."""
        await self.post("", {"janus": "keepalive"})

    async def destroy(self) -> None:
        """Destroy the session in Janus (detaching its handles); `on_lost` does not fire."""
        if self._closed:
            return
        self._closed = True
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if not self.lost.is_set():
            with contextlib.suppress(JanusError):
                await self.client.post(f"/{self.id}", {"janus": "destroy"})
        self._fail_pending(JanusError(SESSION_NOT_FOUND, "session destroyed"))

    def mark_lost(self, reason: str) -> None:
        """Janus no longer has this session: fail waiting requests, set `lost`, fire `on_lost` (once)."""
        if self.lost.is_set() or self._closed:
            return
        self.lost_reason = reason
        self.lost.set()
        log.event(logger, "janus.session_lost", logging.WARNING, session=self.id, reason=reason)
        self._fail_pending(JanusError(SESSION_NOT_FOUND, f"session lost: {reason}"))
        if self.on_lost is not None:
            try:
                self.on_lost(reason)
            except Exception:
                logger.exception("janus.on_lost_failed")

    def _fail_pending(self, error: JanusError) -> None:
        for future in self.pending.values():
            if not future.done():
                future.set_exception(error)
        self.pending.clear()

    async def _poll_loop(self) -> None:
        failures = 0
        while not self.lost.is_set():
            params = {"maxev": "10", "rid": str(int(time.time() * 1000))}
            if self.client.api_secret:
                params["apisecret"] = self.client.api_secret
            try:
                async with self.client.http().get(f"{self.client.url}/{self.id}", params=params,
                                                  timeout=aiohttp.ClientTimeout(total=LONG_POLL_S + 10)) as resp:
                    status, text = resp.status, await resp.text()
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures += 1
                log.event(logger, "janus.poll_failed", logging.DEBUG, session=self.id, error=self.client.redact(exc))
                if failures >= 2:
                    self.mark_lost(f"Janus unreachable ({self.client.redact(exc)})")
                    return
                await asyncio.sleep(POLL_RETRY_S)
                continue
            if status in (404, UNAUTHORIZED):
                self.mark_lost("no such session" if status == 404 else "unauthorized")
                return
            failures = 0
            if status != 200:
                log.event(logger, "janus.poll_status", logging.WARNING, session=self.id, status=status)
                await asyncio.sleep(POLL_RETRY_S)
                continue
            for event in parse_events(text):
                self.dispatch(event)

    def dispatch(self, event: object) -> None:
        """Route one message from Janus; malformed or unexpected ones are logged, never raised."""
        try:
            self._dispatch(event)
        except Exception as exc:
            log.event(logger, "janus.bad_event", logging.WARNING, session=self.id, detail=repr(exc)[:200])

    def _dispatch(self, event: object) -> None:
        if not isinstance(event, dict):
            log.event(logger, "janus.bad_event", logging.WARNING, session=self.id, detail=type(event).__name__)
            return
        kind = event.get("janus")
        if kind in ("keepalive", "ack"):
            return
        if kind == "timeout":
            self.mark_lost("session timed out")
            return
        handle = self.handles.get(event.get("sender"))  # type: ignore[arg-type]
        if kind == "event":
            plugindata = event.get("plugindata")
            data = plugindata.get("data") if isinstance(plugindata, dict) else None
            jsep = event.get("jsep") if isinstance(event.get("jsep"), dict) else None
            if not isinstance(data, dict):
                log.event(logger, "janus.bad_event", logging.WARNING, session=self.id, detail="no plugindata.data")
                return
            future = self.pending.pop(str(event.get("transaction")), None)
            if future is not None and not future.done():
                future.set_result(JanusReply(data, jsep))
            elif handle is None:
                log.event(logger, "janus.unknown_sender", logging.DEBUG, session=self.id, sender=event.get("sender"))
            else:
                handle.deliver(data, jsep)
        elif kind in CORE_EVENTS and handle is not None:
            if kind == "detached":
                self.handles.pop(handle.id, None)
                handle.detached = True
            handle.deliver_core(event)
        else:
            log.event(logger, "janus.unexpected_event", logging.DEBUG, session=self.id, kind=str(kind)[:40],
                      sender=event.get("sender"))


class JanusHandle:
    """A plugin handle: `request()` (synchronous or ack + event, both awaited), events to `on_event`."""

    def __init__(self, session: JanusSession, handle_id: int, plugin: str, on_event: EventCallback | None = None,
                 on_core_event: CoreCallback | None = None) -> None:
        self.session = session
        self.id = handle_id
        self.plugin = plugin
        self.on_event = on_event
        self.on_core_event = on_core_event
        self.detached = False

    async def message(self, body: Json, jsep: Json | None = None, timeout: float | None = None) -> JanusReply:
        """Send a plugin request; for an `ack`, wait for the event with the same transaction. Raises
        JanusError with the plugin's `error_code` when it refuses."""
        timeout = timeout or self.session.client.timeout
        transaction = new_transaction()
        future: asyncio.Future[JanusReply] = asyncio.get_running_loop().create_future()
        self.session.pending[transaction] = future  # before posting: the event may beat the HTTP answer
        request: Json = {"janus": "message", "body": body, "transaction": transaction}
        if jsep is not None:
            request["jsep"] = jsep
        try:
            async with asyncio.timeout(timeout):
                answer = await self.session.post(f"/{self.id}", request, timeout)
                if answer.get("janus") == "success":
                    plugindata = answer.get("plugindata")
                    data = plugindata.get("data") if isinstance(plugindata, dict) else None
                    if not isinstance(data, dict):
                        raise JanusConnectionError(f"{body.get('request')}: success without plugindata")
                    reply = JanusReply(data, answer.get("jsep"))
                elif answer.get("janus") == "ack":
                    reply = await future
                else:
                    raise JanusConnectionError(f"{body.get('request')}: unexpected answer {answer.get('janus')!r}")
        except TimeoutError:
            raise JanusError(0, f"{body.get('request')}: no answer within {timeout:g} s") from None
        finally:
            self.session.pending.pop(transaction, None)
            if future.done() and not future.cancelled():
                future.exception()  # retrieved: a session lost meanwhile is reported by the raise above
            future.cancel()
        if "error_code" in reply.data:
            raise JanusError(_int(reply.data.get("error_code")), str(reply.data.get("error") or "plugin error"))
        return reply

    async def request(self, body: Json, jsep: Json | None = None, timeout: float | None = None) -> Json:
        """The plugin's answer (`plugindata.data`) to `body`."""
        return (await self.message(body, jsep, timeout)).data

    async def detach(self) -> None:
        self.session.handles.pop(self.id, None)
        if not self.detached:
            self.detached = True
            try:
                await self.session.post(f"/{self.id}", {"janus": "detach"})
            except JanusError as exc:
                if exc.code not in (HANDLE_NOT_FOUND, SESSION_NOT_FOUND):
                    raise

    def deliver(self, data: Json, jsep: Json | None) -> None:
        if self.on_event is not None:
            self._call(self.on_event, data, jsep)

    def deliver_core(self, event: Json) -> None:
        if self.on_core_event is not None:
            self._call(self.on_core_event, event)

    def _call(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            callback(*args)
        except Exception as exc:  # a consumer's bug must not stop the session's event loop
            log.event(logger, "janus.callback_failed", logging.WARNING, handle=self.id, error=repr(exc)[:200])


def _id(answer: Json) -> int:
    data = answer.get("data")
    value = data.get("id") if isinstance(data, dict) else None
    if not isinstance(value, int):
        raise JanusConnectionError(f"{answer.get('janus')}: answer without data.id")
    return value


def _int(value: object) -> int:
    try:
        return int(value)  # type: ignore[call-overload, no-any-return]
    except (TypeError, ValueError):
        return 0
