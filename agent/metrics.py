"""Prometheus metrics and the HTTP endpoints (`/metrics`, `/healthz`, `/ready`).

Metric names follow the upstream provisioner (prefix `local_volume_provisioner_`) so existing
dashboards and alerts keep working. Collectors live in an injected registry, never the global
one, so several agents can run in one process (tests) without clashing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PREFIX = "local_volume_provisioner"  # upstream-compatible names
OWN = "localpv_agent"  # this agent's own metrics


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
    ready: bool = False


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
        by_mode: dict[tuple[str, ...], int] = {}
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
        yield _family(GaugeMetricFamily, "excluded_entries",
                      "Discovery entries not offered, by class and reason.", ["class", "reason"],
                      s.excluded.items())
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
        self.api_requests = Counter(f"{PREFIX}_apiserver_requests_total",
                                    "API server requests, by HTTP method.", ["method"], registry=r)
        self.api_failures = Counter(f"{PREFIX}_apiserver_requests_failed_total",
                                    "Failed API server requests, by HTTP method.", ["method"],
                                    registry=r)
        self.api_duration = Histogram(f"{PREFIX}_apiserver_requests_duration_seconds",
                                      "API server request latency, by HTTP method.", ["method"],
                                      registry=r)
        self.discovered = Counter(f"{PREFIX}_persistentvolume_discovery_total",
                                  "PVs created by discovery, by volume mode.", ["mode"],
                                  registry=r)
        self.discovery_duration = Histogram(
            f"{PREFIX}_persistentvolume_discovery_duration_seconds",
            "Duration of discovery passes that created PVs, by volume mode.", ["mode"],
            registry=r)
        self.pass_duration = Histogram(f"{OWN}_discovery_pass_duration_seconds",
                                       "Duration of one discovery and reconcile pass.",
                                       registry=r)
        self.deleted = Counter(f"{PREFIX}_persistentvolume_delete_total",
                               "PVs cleaned and deleted, by volume mode and type (process).",
                               ["mode", "type"], registry=r)
        self.delete_failed = Counter(f"{PREFIX}_persistentvolume_delete_failed_total",
                                     "Failed cleanings of released PVs, by mode and type.",
                                     ["mode", "type"], registry=r)
        self.delete_duration = Histogram(
            f"{PREFIX}_persistentvolume_delete_duration_seconds",
            "Time to clean a released PV, by mode, type, capacity and cleanup command.",
            ["mode", "type", "capacity", "cleanup_command"], registry=r)
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

    def observe_clean(self, class_name: str, mode: str, ok: bool, seconds: float,
                      capacity: str, command: str, kind: str = "process") -> None:
        """A cleaning ended; `kind` is the upstream's delete type, process or job."""
        self.cleanings.labels(class_name, mode, "success" if ok else "failure").inc()
        if ok:
            self.deleted.labels(mode, kind).inc()
            self.delete_duration.labels(mode, kind, capacity, command).observe(seconds)
            self.cleaning_duration.labels(class_name, mode).observe(seconds)
        else:
            self.delete_failed.labels(mode, kind).inc()

    def watch_state(self, sample: Callable[[], AgentSample]) -> None:
        self.registry.register(StateCollector(sample))

    def observe_request(self, verb: str, outcome: str, seconds: float) -> None:
        method = verb  # the upstream labels requests by verb ("create", "delete")
        self.api_requests.labels(method).inc()
        if outcome != "ok":
            self.api_failures.labels(method).inc()
        if verb != "watch":  # a watch lasts minutes by design; it would drown the latencies
            self.api_duration.labels(method).observe(seconds)

    def observe_pass(self, created_by_mode: Mapping[str, int], seconds: float,
                     woken_at: float | None) -> None:
        """A pass ended: its duration, the PVs it created, and how long after the wake-up."""
        self.pass_duration.observe(seconds)
        for mode, count in created_by_mode.items():
            for _ in range(count):
                self.discovered.labels(mode).inc()
                self.discovery_duration.labels(mode).observe(seconds)
                if woken_at is not None:
                    self.event_to_pv.observe(time.monotonic() - woken_at)


class HealthServer:
    """Serves `/metrics`, `/healthz` (the loop is alive) and `/ready` (synced, API reachable)."""

    def __init__(self, address: str, metrics: Metrics, healthy: Callable[[], bool],
                 ready: Callable[[], bool]) -> None:
        host, _, port = address.rpartition(":")
        registry = metrics.registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                elif path == "/healthz":
                    ok = healthy()
                    self._reply(200 if ok else 503, b"ok\n" if ok else b"loop stalled\n")
                elif path == "/ready":
                    ok = ready()
                    self._reply(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
                else:
                    self._reply(404, b"not found\n")

            def _reply(self, code: int, body: bytes, ctype: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                return  # scrapes every few seconds would flood the log

        self.server = ThreadingHTTPServer((host or "0.0.0.0", int(port)), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, name="http",
                                        daemon=True)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def start(self) -> None:
        self._thread.start()
        log.info("serving /metrics, /healthz and /ready on port %d", self.port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def stalled_after(seconds: float, heartbeat: Callable[[], float]) -> Callable[[], bool]:
    """A liveness check: healthy while the heartbeat is younger than `seconds`."""
    return lambda: time.monotonic() - heartbeat() < seconds
