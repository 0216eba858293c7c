"""Prometheus metrics and the HTTP endpoints (`/metrics`, `/healthz`, `/ready`).

Metric names follow the upstream provisioner (prefix `local_volume_provisioner_`) so existing
dashboards and alerts keep working. Collectors live in an injected registry, never the global
one, so several agents can run in one process (tests) without clashing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest

log = logging.getLogger(__name__)

PREFIX = "local_volume_provisioner"
HTTP_METHOD = {"get": "GET", "list": "GET", "watch": "GET", "create": "POST",
               "delete": "DELETE", "patch": "PATCH", "update": "PUT"}


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

    def observe_request(self, verb: str, outcome: str, seconds: float) -> None:
        method = HTTP_METHOD.get(verb, verb.upper())
        self.api_requests.labels(method).inc()
        if outcome != "ok":
            self.api_failures.labels(method).inc()
        if verb != "watch":  # a watch lasts minutes by design; it would drown the latencies
            self.api_duration.labels(method).observe(seconds)

    def observe_created(self, mode: str, seconds: float) -> None:
        self.discovered.labels(mode).inc()
        self.discovery_duration.labels(mode).observe(seconds)


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
