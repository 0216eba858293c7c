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

import contextlib
import errno
import io
import logging
import os
import queue
import resource
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from socketserver import BaseServer
from typing import IO, Any, cast
from wsgiref.simple_server import WSGIRequestHandler
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

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

    def observe_clean(self, class_name: str, mode: str, ok: bool, seconds: float,
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
#
# One I/O thread does all socket work without blocking (accept, read the request, write the
# response); a fixed pool of workers only runs the WSGI app on requests already in memory.
# A client that connects and stays silent, or trickles a byte a second, costs one fd and a
# few bytes until its deadline, never a thread. /healthz and /ready have a worker of their
# own, so a slow scrape never delays the kubelet's probe.

MAX_CONNECTIONS = 32  # open connections, whatever their state: also the server's fd budget
METRICS_WORKERS = 3  # threads running /metrics (and 404s)
PROBE_WORKERS = 1  # the thread running /healthz and /ready
REQUEST_TIMEOUT = 5.0  # seconds from accept to a whole request (headers and any body)
WRITE_TIMEOUT = 10.0  # seconds to wait for a worker, and then for the client to take the answer
MAX_HEAD = 8192  # bytes of request line and headers
MAX_BODY = 1024  # bytes of request body (GET needs none)
ACCEPT_BACKOFF = 0.5  # seconds without accepting after EMFILE, ENFILE, ENOBUFS or ENOMEM
ACCEPT_BATCH = 16  # accepts per loop turn, so reads and writes are not starved by a flood
BACKLOG = 64
PROBES = (b"/healthz", b"/ready")

_READING, _QUEUED, _RUNNING, _WRITING, _CLOSED = range(5)
_EVICT_ORDER = (_READING, _WRITING, _QUEUED)  # never a request a worker is running
_LISTENER, _WAKE = object(), object()


def parse_listen_address(address: str) -> tuple[str, int]:
    """`host:port`, `[ipv6]:port`, `:port` or `port` -> (host, port); host "" means all."""
    if address.startswith("["):
        host, sep, port = address[1:].partition("]:")
    else:
        host, sep, port = address.rpartition(":")
        sep = sep or ":"
        if ":" in host:
            raise ValueError(f"listen address {address!r}: write an IPv6 address in brackets, "
                             "e.g. [::1]:8080")
    if not sep or "]" in host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"listen address {address!r}: expected host:port, [ipv6]:port or :port")
    return host, int(port)


def listen(address: str) -> socket.socket:
    """A non-blocking listening socket. An empty host or `[::]` listens on IPv6 and IPv4 (one
    dual-stack socket) where the host has IPv6, else on IPv4; `0.0.0.0` only on IPv4."""
    host, port = parse_listen_address(address)
    if host in ("", "::") and socket.has_dualstack_ipv6():
        sock = socket.create_server(("::", port), family=socket.AF_INET6, backlog=BACKLOG,
                                    dualstack_ipv6=True)
    else:
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host or "0.0.0.0", port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.create_server(sockaddr, family=family, backlog=BACKLOG)
    sock.setblocking(False)
    return sock


def raise_fd_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit (what Go programs do at start): a soft
    limit of 1024 is a common container default and far below what the kernel allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            return
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (OSError, ValueError) as exc:
        log.warning("cannot raise the open file limit from %d to %d: %s", soft, target, exc)
        return
    log.info("raised the open file limit from %d to %d (the hard limit)", soft, target)


class _Episode:
    """A failing condition logged once when it starts and once when it ends, with how many
    times it happened in between: an attack makes thousands of events, the log gets two
    lines, and at most one traceback."""

    def __init__(self, started: str, ended: str, level: int = logging.WARNING) -> None:
        self.started, self.ended, self.level = started, ended, level
        self.count = 0
        self.last = 0.0
        self._lock = threading.Lock()

    def happened(self, detail: object, traceback: bool = False) -> None:
        with self._lock:
            self.count += 1
            self.last = time.monotonic()
            if self.count > 1:
                return
        log.log(self.level, "%s: %s", self.started, detail, exc_info=traceback)

    def over(self) -> None:
        with self._lock:
            count, self.count = self.count, 0
        if count:
            log.info("%s (%d times)", self.ended, count)


class _Conn:
    __slots__ = ("data", "deadline", "opened", "out", "peer", "sent", "sock", "state")

    def __init__(self, sock: socket.socket, peer: Any, now: float, timeout: float) -> None:
        self.sock, self.peer = sock, peer
        self.state = _READING
        self.opened = now
        self.deadline = now + timeout
        self.data = b""
        self.out = b""
        self.sent = 0


class _AppHost:
    """What wsgiref's request handler reads from its server: the base environ and the app."""

    def __init__(self, base_environ: WSGIEnvironment, app: WSGIApplication) -> None:
        self.base_environ = base_environ
        self.app = app

    def get_app(self) -> WSGIApplication:
        return self.app


class _DiscardErrors(io.StringIO):
    """wsgi.errors: the app here never writes to it; wsgiref's own errors are logged by
    the worker instead of printed."""

    def write(self, s: str) -> int:
        return len(s)


class _Exchange(WSGIRequestHandler):
    """wsgiref's request handler over a request the I/O thread already read into memory: it
    parses it, builds the environ, runs the app and leaves the whole response in `wfile`."""

    def __init__(self, raw: bytes, peer: Any, host: _AppHost) -> None:
        # Not BaseRequestHandler.__init__, which would read and write a socket in this thread.
        self.request, self.client_address = raw, peer
        self.server = cast(BaseServer, host)
        self.rfile = io.BytesIO(raw)
        self.wfile = io.BytesIO()

    def response(self) -> bytes:
        self.handle()
        return cast(io.BytesIO, self.wfile).getvalue()

    def get_stderr(self) -> IO[str]:
        return _DiscardErrors()

    def log_message(self, format: str, *args: Any) -> None:
        return  # scrapes every few seconds would flood the log


def _canned(status: int) -> bytes:
    """A whole response for a request the app never sees (too large, malformed framing)."""
    phrase = HTTPStatus(status).phrase
    body = f"{status} {phrase}\n".encode()
    return (f"HTTP/1.0 {status} {phrase}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


def _framing(data: bytes) -> tuple[int, bool] | None:
    """None while `data` holds no whole request yet; else (a status to answer without the
    app, or 0 for "run the app", whether the request is a probe)."""
    ends = [(i, len(sep)) for sep in (b"\r\n\r\n", b"\n\n") if (i := data.find(sep)) >= 0]
    if not ends:
        return (431, False) if len(data) > MAX_HEAD else None
    index, size = min(ends)
    end = index + size
    if end > MAX_HEAD:
        return 431, False
    lines = data[:index].split(b"\n")
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"transfer-encoding":
            return 411, False  # a body must come with its Content-Length here
        if name == b"content-length":
            if not value.strip().isdigit():
                return 400, False
            length = int(value)
    if length > MAX_BODY:
        return 413, False
    if len(data) < end + length:
        return None
    target = lines[0].split()[1:2]
    return 0, bool(target) and target[0].split(b"?", 1)[0] in PROBES


class HealthServer:
    """Serves `/metrics`, `/healthz` (the loop is alive) and `/ready` (synced, API reachable).

    Bounded whatever clients do: at most `max_connections` open connections (the server's
    whole fd budget; at the limit a new connection replaces the oldest unfinished one), a
    fixed set of threads (one for I/O, `METRICS_WORKERS` + `PROBE_WORKERS` for the app), a
    deadline per connection, small request limits. Errors are logged per episode, not per
    connection.
    """

    def __init__(self, address: str, metrics: Metrics, healthy: Callable[[], bool],
                 ready: Callable[[], bool], *, max_connections: int = MAX_CONNECTIONS,
                 timeout: float = REQUEST_TIMEOUT) -> None:
        self.address = address
        self.max_connections = max_connections
        self.timeout = timeout
        self._metrics_app = make_wsgi_app(metrics.registry)
        self._probes: dict[str, Callable[[], bool]] = {"/healthz": healthy, "/ready": ready}
        self._dropped = metrics.http_dropped
        self._listener = listen(address)
        host = self._listener.getsockname()
        self._port = int(host[1])
        self._host = _AppHost({"SERVER_NAME": host[0], "SERVER_PORT": str(host[1]),
                               "GATEWAY_INTERFACE": "CGI/1.1", "SCRIPT_NAME": "",
                               "CONTENT_LENGTH": "", "REMOTE_HOST": ""}, self._app)
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, _WAKE)
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()  # conn.state between the I/O thread and the workers
        self._done: list[tuple[_Conn, bytes]] = []
        self._jobs: queue.SimpleQueue[_Conn | None] = queue.SimpleQueue()
        self._probe_jobs: queue.SimpleQueue[_Conn | None] = queue.SimpleQueue()
        self._listening = False
        self._accept_paused_until = 0.0
        self._stopping = False
        self._accept_failing = _Episode(
            "HTTP: cannot accept connections, retrying every "
            f"{ACCEPT_BACKOFF:g}s", "HTTP: accepting connections again")
        self._over_limit = _Episode(
            f"HTTP: {max_connections} connections open, the limit; closing the oldest "
            "unfinished one for each new one", "HTTP: under the connection limit again, "
            "connections closed early")
        self._loop_failing = _Episode("HTTP: the I/O loop failed", "HTTP: the I/O loop recovered",
                                      logging.ERROR)
        self._app_failing = {path: _Episode(f"HTTP: {path} failed", f"HTTP: {path} answers again",
                                            logging.ERROR)
                             for path in ("/metrics", "/healthz", "/ready", "other")}
        self._thread = threading.Thread(target=self._serve, name="http", daemon=True)
        self._workers = [
            threading.Thread(target=self._work, args=(self._jobs,), name=f"http-worker-{i}",
                             daemon=True) for i in range(METRICS_WORKERS)
        ] + [
            threading.Thread(target=self._work, args=(self._probe_jobs,), name=f"http-probe-{i}",
                             daemon=True) for i in range(PROBE_WORKERS)
        ]

    @property
    def port(self) -> int:
        return self._port

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def start(self) -> None:
        raise_fd_limit()
        for worker in self._workers:
            worker.start()
        self._thread.start()
        log.info("serving /metrics, /healthz and /ready on %s (port %d)", self.address,
                 self.port)

    def stop(self) -> None:
        """Stop serving and close every connection; returns within about a second."""
        if self._stopping:
            return
        self._stopping = True
        self._wake()
        for _ in self._workers[:METRICS_WORKERS]:
            self._jobs.put(None)
        for _ in self._workers[METRICS_WORKERS:]:
            self._probe_jobs.put(None)
        if self._thread.ident is None:
            self._close_all()
            return
        self._thread.join(timeout=1.0)
        if self._thread.is_alive():
            log.warning("HTTP: the I/O thread did not stop within 1s")
        deadline = time.monotonic() + 0.2  # a worker stuck in a collector is a daemon thread
        for worker in self._workers:
            worker.join(timeout=max(0.0, deadline - time.monotonic()))

    # The app, run by the workers.

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

    def _work(self, jobs: queue.SimpleQueue[_Conn | None]) -> None:
        while (conn := jobs.get()) is not None:
            with self._lock:
                if conn.state != _QUEUED:
                    continue  # dropped while it waited
                conn.state = _RUNNING
            try:
                response = _Exchange(conn.data, conn.peer, self._host).response()
            except Exception as exc:  # wsgiref itself; the app catches its own errors
                self._app_failing["other"].happened(repr(exc), traceback=True)
                response = _canned(500)
            with self._lock:
                self._done.append((conn, response))
            self._wake()

    def _wake(self) -> None:
        with self._lock, contextlib.suppress(BlockingIOError):  # full: it wakes anyway
            if self._wake_w >= 0:
                os.write(self._wake_w, b"x")

    # The I/O thread: everything that touches a socket.

    def _serve(self) -> None:
        try:
            while not self._stopping:
                try:
                    self._turn()
                except Exception as exc:  # a bug here must neither end /healthz nor flood logs
                    self._loop_failing.happened(repr(exc), traceback=True)
                    time.sleep(0.1)
                else:
                    self._loop_failing.over()
        finally:
            self._close_all()

    def _turn(self) -> None:
        now = time.monotonic()
        self._update_listening(now)
        for key, _ in self._selector.select(self._timeout(now)):
            if key.data is _LISTENER:
                self._accept()
            elif key.data is _WAKE:
                while True:
                    try:
                        if not os.read(self._wake_r, 4096):
                            break
                    except BlockingIOError:
                        break
            else:
                conn = cast(_Conn, key.data)
                if conn.state == _READING:
                    self._read(conn)
                elif conn.state == _WRITING:
                    self._write(conn)
        with self._lock:
            done, self._done = self._done, []
        for conn, response in done:
            self._respond(conn, response)
        now = time.monotonic()
        for conn in [c for c in self._conns if c.state != _RUNNING and c.deadline <= now]:
            if self._close(conn):
                self._dropped.labels("timeout").inc()
        if (self._over_limit.count and len(self._conns) < self.max_connections // 2
                and now - self._over_limit.last > 10):
            self._over_limit.over()

    def _timeout(self, now: float) -> float:
        until = now + 1.0
        for conn in self._conns:
            if conn.state != _RUNNING:
                until = min(until, conn.deadline)
        if not self._listening and self._accept_paused_until > now:
            until = min(until, self._accept_paused_until)
        return max(0.0, until - now)

    def _update_listening(self, now: float) -> None:
        want = (not self._stopping and now >= self._accept_paused_until
                and (len(self._conns) < self.max_connections
                     or any(c.state in _EVICT_ORDER for c in self._conns)))
        if want and not self._listening:
            self._selector.register(self._listener, selectors.EVENT_READ, _LISTENER)
        elif self._listening and not want:
            self._selector.unregister(self._listener)
        self._listening = want

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if len(self._conns) >= self.max_connections and not self._evict():
                return  # every connection is being answered; new ones wait in the backlog
            try:
                sock, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue  # the client gave up while in the backlog
                # EMFILE, ENFILE, ENOBUFS, ENOMEM: the connection stays in the backlog and
                # the listener readable; retrying at once would spin. Pause, log once.
                self._accept_failing.happened(exc)
                self._accept_paused_until = time.monotonic() + ACCEPT_BACKOFF
                return
            self._accept_failing.over()
            sock.setblocking(False)
            conn = _Conn(sock, peer, time.monotonic(), self.timeout)
            self._conns.add(conn)
            self._selector.register(sock, selectors.EVENT_READ, conn)
            self._read(conn)  # a normal client's request is usually there already

    def _evict(self) -> bool:
        """Close the oldest connection not being answered, to make room for a new one."""
        with self._lock:
            for state in _EVICT_ORDER:
                victims = [c for c in self._conns if c.state == state]
                if victims:
                    victim = min(victims, key=lambda c: c.opened)
                    break
            else:
                return False
        self._close(victim)
        self._dropped.labels("limit").inc()
        self._over_limit.happened(f"dropped a connection from {victim.peer[0]}")
        return True

    def _read(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(MAX_HEAD + MAX_BODY + 1 - len(conn.data))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not chunk:
            self._close(conn)
            return
        conn.data += chunk
        framing = _framing(conn.data)
        if framing is None:
            return
        status, probe = framing
        if status:
            self._selector.unregister(conn.sock)
            self._respond(conn, _canned(status))
            return
        self._selector.unregister(conn.sock)
        with self._lock:
            conn.state = _QUEUED
        conn.deadline = time.monotonic() + WRITE_TIMEOUT
        (self._probe_jobs if probe else self._jobs).put(conn)

    def _respond(self, conn: _Conn, response: bytes) -> None:
        with self._lock:
            if conn.state == _CLOSED:
                return
            conn.state = _WRITING
        conn.out, conn.sent = response, 0
        conn.deadline = time.monotonic() + WRITE_TIMEOUT
        self._selector.register(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        try:
            conn.sent += conn.sock.send(memoryview(conn.out)[conn.sent:])
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if conn.sent >= len(conn.out):
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
            self._close(conn)

    def _close(self, conn: _Conn) -> bool:
        """Close a connection no worker is answering; False if it was closed already."""
        with self._lock:
            if conn.state in (_CLOSED, _RUNNING) and not self._stopping:
                return False
            conn.state = _CLOSED
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(conn.sock)
        conn.sock.close()
        self._conns.discard(conn)
        return True

    def _close_all(self) -> None:
        self._stopping = True
        for conn in list(self._conns):
            self._close(conn)
        self._selector.close()
        self._listener.close()
        with self._lock:  # a late worker must not write to a reused fd number
            fds, self._wake_r, self._wake_w = (self._wake_r, self._wake_w), -1, -1
        for fd in fds:
            os.close(fd)


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
