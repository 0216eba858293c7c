"""The HTTP endpoints on a real socket, no cluster: content negotiation, probes, IPv4 and IPv6
listen addresses, and what slow, idle or too many clients (and running out of fds) can do."""

from __future__ import annotations

import contextlib
import gzip
import http.client
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.httpserver import parse_listen_address
from agent.metrics import HealthServer, Metrics
from devkit.agents import wait_for
from tests.conftest import require

REPO = Path(__file__).resolve().parents[2]
Make = Callable[..., HealthServer]


def get(port: int, path: str, host: str = "127.0.0.1", timeout: float = 10,
        **headers: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={k.replace("_", "-"): v for k, v in headers.items()})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def raw(port: int, request: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


def server_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name.startswith("http"))


def dropped(metrics: Metrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("localpv_agent_http_connections_dropped_total",
                                              {"reason": reason})
    return value or 0.0


def ipv6_loopback() -> bool:
    try:
        with socket.create_server(("::1", 0), family=socket.AF_INET6):
            return True
    except OSError:
        return False


class Probes:
    def __init__(self) -> None:
        self.healthy: Any = True
        self.ready: Any = False

    def check(self, name: str) -> Callable[[], bool]:
        def answer() -> bool:
            value = getattr(self, name)
            if isinstance(value, Exception):
                raise value
            return bool(value)
        return answer


@pytest.fixture
def probes() -> Probes:
    return Probes()


@pytest.fixture
def make(probes: Probes) -> Iterator[Make]:
    servers: list[HealthServer] = []

    def start(address: str = "127.0.0.1:0", metrics: Metrics | None = None,
              **kw: Any) -> HealthServer:
        server = HealthServer(address, metrics or Metrics(), probes.check("healthy"),
                              probes.check("ready"), **kw)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


@contextlib.contextmanager
def clients(port: int, count: int) -> Iterator[list[socket.socket]]:
    """`count` connections that send nothing, closed at the end."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        yield socks
    finally:
        for s in socks:
            s.close()


class Trickle:
    """Sends one byte of a never-ending request per second on each socket (slowloris)."""

    REQUEST = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: y\r\n" * 100

    def __init__(self, socks: list[socket.socket]) -> None:
        self.socks = socks
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="trickle", daemon=True)

    def _run(self) -> None:
        alive = {s: 0 for s in self.socks}
        while alive and not self.stop.is_set():
            for s, sent in list(alive.items()):
                try:
                    s.send(self.REQUEST[sent:sent + 1])
                    alive[s] = sent + 1
                except OSError:
                    del alive[s]  # the server dropped it
            self.stop.wait(1.0)

    def __enter__(self) -> Trickle:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def test_metrics_plain_openmetrics_and_gzip(make: Make) -> None:
    metrics = Metrics()
    metrics.observe_pass({"Filesystem": 1}, 0.5, None)
    port = make(metrics=metrics).port

    status, headers, body = get(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert b"local_volume_provisioner_persistentvolume_discovery_total" in body
    assert "content-encoding" not in headers

    status, headers, body = get(port, "/metrics",
                                Accept="application/openmetrics-text; version=1.0.0")
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")

    status, headers, body = get(port, "/metrics", Accept_Encoding="gzip")
    assert headers["content-encoding"] == "gzip"
    assert b"localpv_agent_discovery_pass_duration_seconds_count 1.0" in gzip.decompress(body)


def test_probes_follow_the_callables(make: Make, probes: Probes,
                                     caplog: pytest.LogCaptureFixture) -> None:
    port = make().port
    assert get(port, "/healthz")[::2] == (200, b"ok\n")
    assert get(port, "/ready")[::2] == (503, b"not ready\n")
    probes.healthy, probes.ready = False, True
    assert get(port, "/healthz")[::2] == (503, b"loop stalled\n")
    assert get(port, "/ready?verbose=1")[::2] == (200, b"ready\n")
    assert get(port, "/nothing")[0] == 404

    caplog.set_level(logging.INFO, logger="agent")
    probes.ready = RuntimeError("boom")
    for _ in range(20):
        assert get(port, "/ready")[0] == 500
    probes.ready = True
    assert get(port, "/ready")[0] == 200
    lines = [r for r in caplog.records if "/ready" in r.getMessage()]
    assert [r.levelname for r in lines] == ["ERROR", "INFO"], lines  # one episode, not 20
    assert "20 times" in lines[1].getMessage()


def test_oversized_or_unframed_requests_get_an_error_without_the_app(make: Make) -> None:
    port = make().port
    big_head = b"GET /healthz HTTP/1.1\r\nX: " + b"a" * 10_000 + b"\r\n\r\n"
    assert raw(port, big_head).startswith(b"HTTP/1.0 431 ")
    big_body = b"POST /healthz HTTP/1.1\r\nContent-Length: 5000\r\n\r\n"
    assert raw(port, big_body).startswith(b"HTTP/1.0 413 ")
    chunked = b"POST /healthz HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert raw(port, chunked).startswith(b"HTTP/1.0 411 ")
    assert b"400" in raw(port, b"NONSENSE\r\n\r\n")  # an HTTP/0.9 error: no status line
    assert raw(port, b"GET /healthz HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.0 200 ")


@pytest.mark.parametrize(("address", "reachable", "unreachable"), [
    ("127.0.0.1:0", ["127.0.0.1"], ["::1"]),
    ("[::1]:0", ["::1"], ["127.0.0.1"]),
    ("[::]:0", ["127.0.0.1", "::1"], []),  # dual-stack
    (":0", ["127.0.0.1", "::1"], []),
    ("0.0.0.0:0", ["127.0.0.1"], ["::1"]),
    ("localhost:0", ["127.0.0.1"], []),
])
def test_ipv4_and_ipv6_listen_addresses(make: Make, address: str, reachable: list[str],
                                        unreachable: list[str]) -> None:
    require(ipv6_loopback(), "no IPv6 on the loopback interface")
    port = make(address).port
    for host in reachable:
        assert get(port, "/healthz", host=host)[0] == 200, host
    for host in unreachable:
        with pytest.raises(ConnectionRefusedError):
            get(port, "/healthz", host=host)


def test_listen_address_parsing() -> None:
    assert parse_listen_address(":8080") == ("", 8080)
    assert parse_listen_address("8080") == ("", 8080)
    assert parse_listen_address("[::]:8080") == ("::", 8080)
    assert parse_listen_address("[fe80::1%eth0]:1") == ("fe80::1%eth0", 1)
    assert parse_listen_address("127.0.0.1:0") == ("127.0.0.1", 0)
    for bad in ("::1:8080", "[::1]", "[::1]:", "host:http", "[::1]:99999", "host:", "[::1]x:1"):
        with pytest.raises(ValueError, match="listen address"):
            parse_listen_address(bad)


def test_slow_clients_do_not_starve_the_probe(make: Make,
                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    baseline = threading.active_count()
    metrics = Metrics()
    server = make(metrics=metrics)
    port = server.port
    with clients(port, 100) as silent, clients(port, 100) as slow, Trickle(slow):
        for _ in range(5):
            started = time.monotonic()
            assert get(port, "/healthz", timeout=10)[0] == 200
            assert time.monotonic() - started < 5  # in practice milliseconds
            assert get(port, "/metrics", timeout=10)[0] == 200
            assert server.open_connections <= server.max_connections
            assert server_threads() == 5  # one I/O thread, four workers
            assert threading.active_count() <= baseline + 5 + 1  # + the trickle thread
        assert dropped(metrics, "limit") >= len(silent) + len(slow) - server.max_connections
    assert not [r for r in caplog.records if r.exc_info], "no traceback"
    assert len(caplog.records) <= 4, [r.getMessage() for r in caplog.records]


def test_idle_and_trickling_clients_are_dropped_after_the_timeout(make: Make) -> None:
    metrics = Metrics()
    server = make(metrics=metrics, timeout=1.0)
    with clients(server.port, 3) as idle, clients(server.port, 3) as slow, Trickle(slow):
        started = time.monotonic()
        for s in idle:
            assert s.recv(1) == b""  # the server closed it
        assert time.monotonic() - started < 5
        wait_for(lambda: dropped(metrics, "timeout") >= 6, 60, "the slow ones dropped too")
        wait_for(lambda: server.open_connections == 0, 60, "no connection left")
        assert get(server.port, "/healthz")[0] == 200


def test_the_connection_limit_bounds_the_server_fds(make: Make) -> None:
    metrics = Metrics()
    server = make(metrics=metrics, max_connections=8)
    with clients(server.port, 40):
        wait_for(lambda: dropped(metrics, "limit") >= 32, 60, "the oldest dropped")
        assert server.open_connections <= 8
        assert get(server.port, "/healthz")[0] == 200


def test_stop_is_fast_with_clients_connected(make: Make) -> None:
    server = make()
    with clients(server.port, 50), clients(server.port, 10) as slow, Trickle(slow):
        assert get(server.port, "/healthz")[0] == 200
        started = time.monotonic()
        server.stop()
        assert time.monotonic() - started < 1.0
        assert server_threads() == 0
        with pytest.raises(ConnectionRefusedError):
            get(server.port, "/healthz")


CHILD = textwrap.dedent("""
    import logging, os, resource, sys
    from agent.metrics import HealthServer, Metrics
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    server = HealthServer("127.0.0.1:0", Metrics(), lambda: True, lambda: True)
    server.start()
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
    filler = []
    try:
        while True:
            filler.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    print(server.port, flush=True)
    sys.stdin.readline()  # "free"
    for fd in filler:
        os.close(fd)
    sys.stdin.readline()  # "stop"
    server.stop()
""")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_fds_pauses_accepting_and_logs_once() -> None:
    """EMFILE on accept: no spinning, one line when it starts and one when it ends."""
    child = subprocess.Popen([sys.executable, "-c", CHILD], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdin is not None
        port = int(child.stdout.readline())
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")  # waits in the backlog
            before = cpu_seconds(child.pid)
            time.sleep(2)  # a window to measure CPU in; nothing to wait for
            assert cpu_seconds(child.pid) - before < 0.5, "the accept loop spins"
            child.stdin.write("free\n")
            child.stdin.flush()
            assert s.recv(65536).startswith(b"HTTP/1.0 200 ")
        child.stdin.write("stop\n")
        child.stdin.flush()
        _, err = child.communicate(timeout=20)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == 0, err
    assert err.count("cannot accept connections") == 1, err
    assert "Too many open files" in err
    assert err.count("accepting connections again") == 1, err
    assert "Traceback" not in err


def test_start_raises_the_soft_fd_limit_to_the_hard_one() -> None:
    prlimit = shutil.which("prlimit")
    require(prlimit is not None, "prlimit (util-linux) missing")
    assert prlimit is not None
    code = textwrap.dedent("""
        import logging, resource, sys
        from agent.metrics import HealthServer, Metrics
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        server = HealthServer("127.0.0.1:0", Metrics(), lambda: True, lambda: True)
        server.start()
        server.stop()
        print(*resource.getrlimit(resource.RLIMIT_NOFILE))
    """)
    run = subprocess.run([prlimit, "--nofile=256:4096", "--", sys.executable, "-c", code],
                         cwd=REPO, capture_output=True, text=True, check=True, timeout=60)
    assert run.stdout.split() == ["4096", "4096"]
    assert "raised the open file limit from 256 to 4096" in run.stderr
