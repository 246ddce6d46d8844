"""Prometheus metrics of one worker, served at /metrics (text exposition format).

Counters move with call events (gateway.call.Call.record through the worker's listener); gauges are read
at scrape time from the live objects, so a scrape costs nothing between scrapes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..api.webhooks import Notifier
    from ..calls.call import Call
    from ..calls.ua import UserAgent
    from .registry import CallRegistry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Live(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.m
        active = GaugeMetricFamily("gateway_active_calls", "Calls in progress by state", labels=["state"])
        states: Tally[str] = Tally()
        jitter = lost = 0.0
        for call in m.ua.calls.values():
            phase = call.control.phase if call.control is not None and call.answered.is_set() else call.state
            states[phase] += 1
            if call.media is not None:
                lost += call.media.jitter.stats.lost
                jitter = max(jitter, call.media.jitter.stats.jitter_ms)
        for state, count in sorted(states.items()):
            active.add_metric([state], count)
        yield active
        yield GaugeMetricFamily("gateway_rtp_jitter_max_seconds", "Largest interarrival jitter among calls in progress",
                                value=jitter / 1000)
        transport = m.ua.transport
        if transport is not None:
            connections = CounterMetricFamily(
                "gateway_sip_connections_refused", "SIP TCP/TLS connections refused, by reason: caps (too many, in all "
                "or from one source), tls_handshake (plain text, an old version, no common cipher)", labels=["reason"])
            connections.add_metric(["caps"], transport.refused_connections)
            connections.add_metric(["tls_handshake"], transport.tls_refused)
            yield connections
        refused = CounterMetricFamily("gateway_calls_refused", "INVITEs refused at admission by reason",
                                      labels=["reason"])
        for reason, count in sorted(m.ua.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        dropped = CounterMetricFamily(
            "gateway_rtp_dropped", "RTP packets dropped by strict RTP, by reason: source (not the call's learned "
            "address+port), ssrc (a source on probation switched SSRC), malformed (not RTP), srtp (failed SRTP "
            "authentication or replayed, or plain RTP where SRTP is required)", labels=["reason"])
        for reason in ("source", "ssrc", "malformed", "srtp"):
            dropped.add_metric([reason], m.ua.ports.dropped[reason])
        yield dropped
        n = m.notifier
        yield CounterMetricFamily("gateway_webhook_deliveries", "Webhook events delivered", value=n.delivered)
        yield CounterMetricFamily("gateway_webhook_failures", "Webhook delivery attempts that failed", value=n.failures)
        yield CounterMetricFamily("gateway_webhook_expired", "Webhook events given up after webhooks.max_age_s",
                                  value=n.expired)
        yield GaugeMetricFamily("gateway_webhook_queued", "Webhook events waiting", value=sum(len(q) for q in n.lanes.values()))
        cdr = m.ua.cdr.status()
        yield GaugeMetricFamily("gateway_cdr_writable", "1 while the CDR store takes writes (0: disk full, read-only, "
                                "I/O errors; events wait in memory)", value=int(cdr["ok"]))
        yield GaugeMetricFamily("gateway_cdr_buffered", "CDR entries waiting in memory for the disk", value=cdr["buffered"])
        yield CounterMetricFamily("gateway_cdr_write_failures", "CDR write attempts the disk refused (each retried)",
                                  value=cdr["write_failures"])
        yield CounterMetricFamily("gateway_cdr_dropped", "CDR entries given up beyond the in-memory bound",
                                  value=cdr["dropped"])
        if m.call_registry is not None:
            reg = m.call_registry.status()
            yield GaugeMetricFamily("gateway_registry_connected", "1 while the shared registry (Redis) answers",
                                    value=int(reg["connected"]))
            yield CounterMetricFamily("gateway_registry_errors", "Failed registry operations (Redis)", value=reg["errors"])
            yield CounterMetricFamily("gateway_registry_dropped_writes", "Registry writes not sent while Redis was away "
                                      "(republished when it is back)", value=reg["dropped"])
        yield GaugeMetricFamily("gateway_workers", "Workers alive in the cluster (this one included)", value=m.workers())
        yield GaugeMetricFamily("gateway_accepting", "1 while this worker takes new calls", value=int(m.ua.accepting))
        yield GaugeMetricFamily("gateway_cpu_percent", "This worker's CPU use over the last 2 s (% of one core)",
                                value=m.cpu_percent())


class Metrics:
    def __init__(self, ua: UserAgent, notifier: Notifier, workers: Callable[[], int], cpu: Callable[[], float],
                 registry: CallRegistry | None = None) -> None:
        self.ua = ua
        self.call_registry = registry
        self.notifier = notifier
        self.workers = workers
        self.cpu_percent = cpu
        r = self.registry = CollectorRegistry()
        self.started = Counter("gateway_calls_started", "Calls started", ["direction"], registry=r)
        self.ended = Counter("gateway_calls_ended", "Calls ended by reason", ["reason"], registry=r)
        self.failed = Counter("gateway_calls_failed", "Calls that ended before being answered, by reason",
                              ["reason"], registry=r)
        self.answered = Counter("gateway_calls_answered", "Calls answered, by signalling transport (udp, tcp, tls) "
                                "and media encryption (none, srtp)", ["transport", "media_encryption"], registry=r)
        self.dtmf = Counter("gateway_dtmf_digits", "DTMF digits received by source", ["source"], registry=r)
        self.rtp_received = Counter("gateway_rtp_packets_received", "RTP packets received (ended calls)", registry=r)
        self.rtp_lost = Counter("gateway_rtp_packets_lost", "RTP frames lost (ended calls)", registry=r)
        self.jitter = Histogram("gateway_rtp_jitter_seconds", "Interarrival jitter at the end of each call",
                                buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16), registry=r)
        self.loop_lag = Histogram("gateway_event_loop_lag_seconds", "How late the event loop ran a 100 ms timer",
                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0), registry=r)
        r.register(_Live(self))
        self._lag_task: asyncio.Task[None] | None = None

    def on_call_event(self, call: Call, state: str, data: dict[str, Any]) -> None:
        if state == "initiated":
            self.started.labels(call.direction).inc()
        elif state == "answered" and "media_encryption" in data:
            self.answered.labels(str(data.get("transport")), str(data["media_encryption"])).inc()
        elif state == "disconnected":
            reason = str(data.get("reason", "unknown"))
            self.ended.labels(reason).inc()
            if not call.answered.is_set():
                self.failed.labels(reason if reason != "failed" else f"sip_{data.get('code')}").inc()
            for source, count in (data.get("dtmf") or {}).items():
                self.dtmf.labels(source).inc(count)
            self.rtp_received.inc(int(data.get("rtp_received") or 0))
            self.rtp_lost.inc(int(data.get("rtp_lost") or 0))
            if call.media is not None and call.media.received:
                self.jitter.observe(call.media.jitter.stats.jitter_ms / 1000)

    def start(self) -> None:
        self._lag_task = asyncio.get_running_loop().create_task(self._watch_loop())

    async def _watch_loop(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.1)
            self.loop_lag.observe(max(0.0, time.perf_counter() - before - 0.1))

    def stop(self) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()

    def render(self) -> bytes:
        return generate_latest(self.registry)
