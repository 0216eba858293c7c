"""Prometheus metrics and the HTTP endpoints (`/metrics`, `/healthz`, `/ready`).

Metric names follow the upstream provisioner (prefix `local_volume_provisioner_`) so existing
dashboards and alerts keep working, and the series of those names are the upstream's exactly:
the same types, labels and histogram buckets (the Go client's defaults, written as Go writes
them, `le="1"`), no `_created` series. prometheus_client's own Counter and Histogram would
write `le="1.0"` and add `_created`, so those names are kept by `UpstreamSeries` and exposed as
fresh families at each scrape; the agent's own metrics (prefix `localpv_agent_`) use the client's
classes, with finer buckets where they help. Collectors live in an injected registry, never the
global one, so several agents can run in one process (tests) without clashing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from wsgiref.types import StartResponse, WSGIEnvironment

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from agent.httpserver import MAX_CONNECTIONS, REQUEST_TIMEOUT, BoundedServer, Episode

log = logging.getLogger(__name__)

PREFIX = "local_volume_provisioner"  # upstream-compatible names
OWN = "localpv_agent"  # this agent's own metrics
# The Go client's prometheus.DefBuckets, which every upstream histogram uses.
GO_DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
VOLUME_MODES = ("Filesystem", "Block")
API_REQUESTS = f"{PREFIX}_apiserver_requests_total"
API_FAILURES = f"{PREFIX}_apiserver_requests_failed_total"
API_DURATION = f"{PREFIX}_apiserver_requests_duration_seconds"
DISCOVERED = f"{PREFIX}_persistentvolume_discovery_total"
DISCOVERY_DURATION = f"{PREFIX}_persistentvolume_discovery_duration_seconds"
DELETED = f"{PREFIX}_persistentvolume_delete_total"
DELETE_FAILED = f"{PREFIX}_persistentvolume_delete_failed_total"
DELETE_DURATION = f"{PREFIX}_persistentvolume_delete_duration_seconds"


def go_float(value: float) -> str:
    """A float as the Go client writes it in a label: shortest form, no `.0` (`1`, `0.005`)."""
    if value == float("inf"):
        return "+Inf"
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


class UpstreamSeries(Collector):
    """The counters and histograms of the upstream's names, exposed as the upstream does."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._docs: dict[str, tuple[str, str, tuple[str, ...]]] = {}  # name -> kind, doc, labels
        self._counters: dict[str, dict[tuple[str, ...], float]] = {}
        # name -> labels -> (per-bucket counts, sum, count); the +Inf bucket is the count
        self._histograms: dict[str, dict[tuple[str, ...], tuple[list[int], float, int]]] = {}

    def counter(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self._docs[name] = ("counter", documentation, tuple(labels))
        self._counters[name] = {}

    def histogram(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        self._docs[name] = ("histogram", documentation, tuple(labels))
        self._histograms[name] = {}

    def inc(self, name: str, *labels: str) -> None:
        with self._lock:
            series = self._counters[name]
            series[labels] = series.get(labels, 0.0) + 1.0

    def observe(self, name: str, value: float, *labels: str) -> None:
        with self._lock:
            series = self._histograms[name]
            counts, total, count = series.get(labels) or ([0] * len(GO_DEFAULT_BUCKETS), 0.0, 0)
            for i, bound in enumerate(GO_DEFAULT_BUCKETS):
                if value <= bound:
                    counts[i] += 1
            series[labels] = (counts, total + value, count + 1)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counters = {n: dict(v) for n, v in self._counters.items()}
            histograms = {n: {k: (list(c), t, n_) for k, (c, t, n_) in v.items()}
                          for n, v in self._histograms.items()}
        for name, (kind, doc, labels) in self._docs.items():
            if kind == "counter":
                counter = CounterMetricFamily(name, doc, labels=list(labels))
                for key, value in sorted(counters[name].items()):
                    counter.add_metric(list(key), value)
                yield counter
                continue
            histogram = HistogramMetricFamily(name, doc, labels=list(labels))
            for key, (counts, total, count) in sorted(histograms[name].items()):
                buckets = [(go_float(b), float(c))
                           for b, c in zip(GO_DEFAULT_BUCKETS, counts, strict=True)]
                histogram.add_metric(list(key), [*buckets, ("+Inf", float(count))], total)
            yield histogram


@dataclass(frozen=True)
class VolumeSample:
    """One PV of this node, as metrics see it."""

    name: str
    class_name: str
    mode: str
    state: str  # available, bound, released, pending, failed, missing, cleaning
    path: str
    identity: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentSample:
    """Everything the state metrics are built from, taken at scrape time."""

    volumes: Sequence[VolumeSample] = ()
    offered: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (class, mode) -> bytes
    excluded: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (class, reason) -> n
    wakeups: Mapping[str, int] = field(default_factory=dict)
    source_failures: Mapping[str, int] = field(default_factory=dict)
    sources_active: Mapping[str, bool] = field(default_factory=dict)
    api_requests: Mapping[tuple[str, str], int] = field(default_factory=dict)  # (verb, result)
    config_reloads: Mapping[str, int] = field(default_factory=dict)  # result -> count
    held: Mapping[str, int] = field(default_factory=dict)  # why -> dirty volumes held back
    ready: bool = False
    # In-process cleans as the upstream's process table counts them: running, and finished
    # (succeeded, failed) but not yet acted on by the loop.
    proctable: tuple[int, int, int] = (0, 0, 0)
    capacity_differs: int = 0  # claimed PVs whose capacity is not their disk's size


class StateCollector(Collector):
    """Fresh metric families from a snapshot of the agent's state at every scrape."""

    def __init__(self, sample: Callable[[], AgentSample]) -> None:
        self.sample = sample

    def collect(self) -> Iterator[Metric]:
        s = self.sample()
        counts: dict[tuple[str, ...], int] = {}
        for v in s.volumes:
            key = (v.class_name, v.mode, v.state)
            counts[key] = counts.get(key, 0) + 1
        yield _family(GaugeMetricFamily, "volumes", "PVs of this node by class, mode and state.",
                      ["class", "mode", "state"], counts.items())
        yield _family(GaugeMetricFamily, "volume_info",
                      "One series per PV of this node, for joins.",
                      ["persistentvolume", "class", "path", "fs_uuid", "wwn", "serial"],
                      {(v.name, v.class_name, v.path, v.identity.get("fs-uuid", ""),
                        v.identity.get("wwn", ""), v.identity.get("serial", "")): 1
                       for v in s.volumes}.items())
        by_mode: dict[tuple[str, ...], int] = {(mode,): 0 for mode in VOLUME_MODES}
        for (_, mode), size in s.offered.items():
            by_mode[(mode,)] = by_mode.get((mode,), 0) + size
        yield _family(GaugeMetricFamily, "capacity_bytes",
                      "Capacity the node offers now, by class and volume mode.",
                      ["class", "mode"], s.offered.items())
        upstream = GaugeMetricFamily(f"{PREFIX}_persistentvolume_capacity_bytes",
                                     "Capacity the node offers now, by volume mode.",
                                     labels=["mode"])
        for mode_key, size in sorted(by_mode.items()):
            upstream.add_metric(list(mode_key), size)
        yield upstream
        for state, value in zip(("running", "succeeded", "failed"), s.proctable, strict=True):
            yield GaugeMetricFamily(f"{PREFIX}_proctable_{state}",
                                    f"In-process cleans {state}, as the upstream's process "
                                    "table counts them (finished ones until acted on).",
                                    value=value)
        yield _family(GaugeMetricFamily, "excluded_entries",
                      "Discovery entries not offered, by class and reason.", ["class", "reason"],
                      s.excluded.items())
        yield _family(GaugeMetricFamily, "volumes_held",
                      "Volumes holding a former tenant's data that are neither cleaned nor "
                      "offered until an operator acts (disk_changed, unverified).", ["reason"],
                      (((k,), n) for k, n in s.held.items()))
        yield GaugeMetricFamily(f"{OWN}_volumes_capacity_differs",
                                "Claimed PVs whose capacity differs from their disk's size "
                                "now (left as they are; see CapacityChanged Events).",
                                value=s.capacity_differs)
        yield _family(CounterMetricFamily, "wakeups", "Wake-ups of the loop, by source.",
                      ["source"], (((k,), n) for k, n in s.wakeups.items()))
        yield _family(CounterMetricFamily, "wakeup_source_failures",
                      "Times a wake-up source lost events and was recovered.", ["source"],
                      (((k,), n) for k, n in s.source_failures.items()))
        yield _family(GaugeMetricFamily, "wakeup_source_active",
                      "Whether a wake-up source runs (1) or is unavailable (0).", ["source"],
                      (((k,), int(on)) for k, on in s.sources_active.items()))
        yield _family(CounterMetricFamily, "api_requests", "API requests by verb and result.",
                      ["verb", "result"], s.api_requests.items())
        yield GaugeMetricFamily(f"{OWN}_ready", "1 when the first pass is done and the API "
                                "answers (what /ready says).", value=1 if s.ready else 0)
        yield _family(CounterMetricFamily, "config_reloads",
                      "Config edits applied or rejected (the old one kept).", ["result"],
                      (((r,), s.config_reloads.get(r, 0)) for r in ("applied", "rejected")))


def _family(
    kind: type[GaugeMetricFamily] | type[CounterMetricFamily], name: str, documentation: str,
    labels: list[str], values: Iterable[tuple[tuple[str, ...], int]],
) -> Metric:
    """One metric family of this agent's, its samples in a stable order."""
    family = kind(f"{OWN}_{name}", documentation, labels=labels)
    for key, value in sorted(values):
        family.add_metric(list(key), value)
    return family


class Metrics:
    """The agent's collectors, registered in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.upstream = UpstreamSeries()
        up = self.upstream
        up.counter(API_REQUESTS, "API server requests, by HTTP method.", ["method"])
        up.counter(API_FAILURES, "Failed API server requests, by HTTP method.", ["method"])
        up.histogram(API_DURATION, "API server request latency, by HTTP method.", ["method"])
        up.counter(DISCOVERED, "PVs created by discovery, by volume mode.", ["mode"])
        up.histogram(DISCOVERY_DURATION,
                     "Duration of discovery passes that created PVs, by volume mode.", ["mode"])
        up.counter(DELETED, "PVs cleaned and deleted, by volume mode and type (process, job).",
                   ["mode", "type"])
        up.counter(DELETE_FAILED, "Failed cleanings of released PVs, by mode and type.",
                   ["mode", "type"])
        up.histogram(DELETE_DURATION, "Time to clean a released PV, by mode, type, capacity and "
                     "cleanup command (the class's blockCleanerCommand[0]).",
                     ["mode", "type", "capacity", "cleanup_command"])
        r.register(up)
        self.api_request_duration = Histogram(
            f"{OWN}_api_request_duration_seconds",
            "API server request latency, by verb (finer buckets than the upstream's).",
            ["verb"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                               5, 10, 30), registry=r)
        self.pass_duration = Histogram(f"{OWN}_discovery_pass_duration_seconds",
                                       "Duration of one discovery and reconcile pass.",
                                       registry=r)
        self.cleanings = Counter(f"{OWN}_cleanings_total",
                                 "Cleanings of released or dirty volumes, by class, mode, result.",
                                 ["class", "mode", "result"], registry=r)
        self.cleaning_duration = Histogram(
            f"{OWN}_cleaning_duration_seconds", "Time to clean a volume, by class and mode.",
            ["class", "mode"], buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 14400),
            registry=r)
        self.event_to_pv = Histogram(
            f"{OWN}_event_to_pv_seconds",
            "From the wake-up (udev, mount, inotify) to the PV created for it.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self.http_dropped = Counter(
            f"{OWN}_http_connections_dropped",
            "HTTP connections closed before an answer: too slow (timeout) or the oldest "
            "unfinished one when the connection limit was reached (limit).", ["reason"],
            registry=r)
        for reason in ("timeout", "limit"):
            self.http_dropped.labels(reason)

    def observe_clean(self, class_name: str, mode: str, ok: bool, seconds: float,  # noqa: PLR0913, PLR0917 - the upstream's labels of a delete, one argument each
                      capacity: str, command: str, kind: str = "process") -> None:
        """A cleaning ended; `kind` is the upstream's delete type, process or job."""
        self.cleanings.labels(class_name, mode, "success" if ok else "failure").inc()
        if ok:
            self.upstream.inc(DELETED, mode, kind)
            self.upstream.observe(DELETE_DURATION, seconds, mode, kind, capacity, command)
            self.cleaning_duration.labels(class_name, mode).observe(seconds)
        else:
            self.upstream.inc(DELETE_FAILED, mode, kind)

    def watch_state(self, sample: Callable[[], AgentSample]) -> None:
        self.registry.register(StateCollector(sample))

    def observe_request(self, verb: str, outcome: str, seconds: float) -> None:
        method = verb  # the upstream labels requests by verb ("create", "delete")
        self.upstream.inc(API_REQUESTS, method)
        if outcome != "ok":
            self.upstream.inc(API_FAILURES, method)
        if verb != "watch":  # a watch lasts minutes by design; it would drown the latencies
            self.upstream.observe(API_DURATION, seconds, method)
            self.api_request_duration.labels(verb).observe(seconds)

    def observe_pass(self, created_by_mode: Mapping[str, int], seconds: float,
                     woken_at: float | None) -> None:
        """A pass ended: its duration, the PVs it created, and how long after the wake-up."""
        self.pass_duration.observe(seconds)
        for mode, count in created_by_mode.items():
            for _ in range(count):
                self.upstream.inc(DISCOVERED, mode)
                self.upstream.observe(DISCOVERY_DURATION, seconds, mode)
                if woken_at is not None:
                    self.event_to_pv.observe(time.monotonic() - woken_at)


# --- HTTP ---------------------------------------------------------------------------------

PROBES = (b"/healthz", b"/ready")  # the kubelet's: a worker of their own, never behind a scrape


class HealthServer:
    """Serves `/metrics`, `/healthz` (the loop is alive) and `/ready` (synced, API reachable)
    with prometheus_client's WSGI app (gzip, OpenMetrics negotiation), on the bounded server
    of `agent.httpserver`. A collector or probe that fails answers 500, logged per episode."""

    def __init__(self, address: str, metrics: Metrics, healthy: Callable[[], bool],  # noqa: PLR0913 - the endpoints' three callables and the limits, by keyword
                 ready: Callable[[], bool], *, max_connections: int = MAX_CONNECTIONS,
                 timeout: float = REQUEST_TIMEOUT) -> None:
        self.address = address
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._probes: dict[str, Callable[[], bool]] = {"/healthz": healthy, "/ready": ready}
        self._app_failing = {path: Episode(f"HTTP: {path} failed", f"HTTP: {path} answers again",
                                           logging.ERROR)
                             for path in ("/metrics", "/healthz", "/ready", "other")}
        self._server = BoundedServer(
            address, self._app, priority=PROBES,
            dropped=lambda why: metrics.http_dropped.labels(why).inc(),
            max_connections=max_connections, timeout=timeout)

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def max_connections(self) -> int:
        return self._server.max_connections

    @property
    def open_connections(self) -> int:
        return self._server.open_connections

    def start(self) -> None:
        self._server.start()
        log.info("serving /metrics, /healthz and /ready on %s (port %d)", self.address,
                 self.port)

    def stop(self) -> None:
        """Stop serving and close every connection; returns within about a second."""
        self._server.stop()

    def _app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        episode = self._app_failing.get(path, self._app_failing["other"])
        try:
            status, headers, body = self._answer(path, environ)
        except Exception as exc:  # a collector or a probe callable; never wsgiref's traceback
            episode.happened(repr(exc), traceback=True)
            status, headers, body = "500 Internal Server Error", [], b"internal error\n"
        else:
            episode.over()
        if not any(name == "Content-Type" for name, _ in headers):
            headers = [("Content-Type", "text/plain; charset=utf-8"), *headers]
        start_response(status, headers)
        return [body]

    def _answer(self, path: str, environ: WSGIEnvironment
                ) -> tuple[str, list[tuple[str, str]], bytes]:
        if path == "/metrics":
            answer: list[Any] = []
            body = b"".join(self._metrics_app(
                environ, lambda status, headers, exc_info=None: answer.extend((status, headers))))
            return answer[0], answer[1], body
        check = self._probes.get(path)
        if check is None:
            return "404 Not Found", [], b"not found\n"
        if environ["REQUEST_METHOD"] != "GET":
            return "405 Method Not Allowed", [("Allow", "GET")], b"use GET\n"
        ok = check()
        words = (b"ok\n", b"loop stalled\n") if path == "/healthz" else (b"ready\n",
                                                                         b"not ready\n")
        return ("200 OK", [], words[0]) if ok else ("503 Service Unavailable", [], words[1])


def stalled_after(seconds: float, heartbeat: Callable[[], float]) -> Callable[[], bool]:
    """A liveness check: healthy while the heartbeat is younger than `seconds`."""
    return lambda: time.monotonic() - heartbeat() < seconds


# --- localpv-agent remediate ----------------------------------------------------------------


@dataclass(frozen=True)
class RemediationSample:
    """The remediation controller's state at scrape time."""

    lost_nodes: int = 0  # nodes holding opted-in PVs that a trigger declared lost
    unavailable_nodes: int = 0  # nodes holding opted-in PVs that are down: the guard's count
    allowed_unavailable: int = 0  # the guard's budget
    blocked: bool = False  # the guard holds: nothing is deleted
    leader: bool = False
    passes: int = 0
    ready: bool = False


class RemediationMetrics:
    """The metrics of `localpv-agent remediate`, added to the registry of a `Metrics` (which
    brings the API request metrics and the HTTP server's own)."""

    def __init__(self, metrics: Metrics, sample: Callable[[], RemediationSample]) -> None:
        self.remediations = Counter(
            f"{OWN}_remediations_total",
            "Remediation outcomes by trigger and result: claim_deleted, pv_deleted, dry_run, "
            "blocked (the partition guard), rate_limited, opted_out, not_statefulset, "
            "conflict (the object changed), failed.", ["trigger", "result"],
            registry=metrics.registry)
        metrics.registry.register(_RemediationCollector(sample))

    def count(self, trigger: str, result: str) -> None:
        self.remediations.labels(trigger, result).inc()


class _RemediationCollector(Collector):
    def __init__(self, sample: Callable[[], RemediationSample]) -> None:
        self.sample = sample

    def collect(self) -> Iterator[Metric]:
        s = self.sample()
        gauges = (
            ("lost_nodes", "Nodes holding opted-in PVs that a trigger declared lost.",
             s.lost_nodes),
            ("unavailable_nodes", "Nodes holding opted-in PVs that are down (deleted, not "
             "Ready or out of service): what the partition guard counts.", s.unavailable_nodes),
            ("unavailable_nodes_allowed", "The partition guard's budget "
             "(--max-unavailable-nodes).", s.allowed_unavailable),
            ("blocked_by_guard", "1 while more nodes are down than allowed: nothing is "
             "remediated.", int(s.blocked)),
            ("remediation_leader", "1 on the replica holding the Lease (the only one acting).",
             int(s.leader)),
            ("ready", "1 once the caches are synced and the API answers.", int(s.ready)),
        )
        for name, doc, value in gauges:
            yield GaugeMetricFamily(f"{OWN}_{name}", doc, value=value)
        yield CounterMetricFamily(f"{OWN}_remediation_passes", "Remediation passes run.",
                                  value=s.passes)
