"""A small HTTP server for a WSGI app that stays bounded whatever its clients do.

One I/O thread does all socket work without blocking (accept, read the request, write the
response); a fixed pool of workers only runs the app on requests already in memory. A client
that connects and stays silent, or trickles a byte a second, costs one fd and a few bytes until
its deadline, never a thread. Requests for the "priority" paths (the kubelet's probes) have a
worker of their own, so a slow scrape never delays them. Standard library only; IPv4 and IPv6.
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
from collections.abc import Callable, Sequence
from http import HTTPStatus
from pathlib import Path
from socketserver import BaseServer
from typing import IO, Any, cast
from wsgiref.simple_server import WSGIRequestHandler
from wsgiref.types import WSGIApplication, WSGIEnvironment

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 32  # open connections, whatever their state: also the server's fd budget
WORKERS = 3  # threads running the app for ordinary requests
PRIORITY_WORKERS = 1  # the thread running the priority paths
REQUEST_TIMEOUT = 5.0  # seconds from accept to a whole request (headers and any body)
WRITE_TIMEOUT = 10.0  # seconds to wait for a worker, and then for the client to take the answer
MAX_HEAD = 8192  # bytes of request line and headers
MAX_BODY = 1024  # bytes of request body (GET needs none)
ACCEPT_BACKOFF = 0.5  # seconds without accepting after EMFILE, ENFILE, ENOBUFS or ENOMEM
ACCEPT_BATCH = 16  # accepts per loop turn, so reads and writes are not starved by a flood
BACKLOG = 64

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


class Episode:
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


def _framing(data: bytes, priority: Sequence[bytes]) -> tuple[int, bool] | None:  # noqa: PLR0911 - one status per malformed framing, checked in order
    """None while `data` holds no whole request yet; else (a status to answer without the
    app, or 0 for "run the app", whether it is for a priority path)."""
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
    return 0, bool(target) and target[0].split(b"?", 1)[0] in priority


class _WakePipe:
    """Wakes the I/O thread out of `select` from another thread."""

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._lock = threading.Lock()

    def wake(self) -> None:
        with self._lock, contextlib.suppress(BlockingIOError):  # full: it wakes anyway
            if self._write_fd >= 0:
                os.write(self._write_fd, b"x")

    def drain(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self.read_fd, 4096):
                pass

    def close(self) -> None:
        with self._lock:  # a late worker must not write to a reused fd number
            fds, self.read_fd, self._write_fd = (self.read_fd, self._write_fd), -1, -1
        for fd in fds:
            os.close(fd)


class _Workers:
    """The threads that run the app: `count` for ordinary requests, `priority` for the
    priority paths, each set fed by its own queue."""

    def __init__(self, run: Callable[[_Conn], None], count: int, priority: int) -> None:
        self._run = run
        self.jobs: queue.SimpleQueue[_Conn | None] = queue.SimpleQueue()
        self.priority_jobs: queue.SimpleQueue[_Conn | None] = queue.SimpleQueue()
        self._threads = [
            (self.jobs, threading.Thread(target=self._work, args=(self.jobs,),
                                         name=f"http-worker-{i}", daemon=True))
            for i in range(count)
        ] + [
            (self.priority_jobs, threading.Thread(target=self._work, args=(self.priority_jobs,),
                                                  name=f"http-priority-{i}", daemon=True))
            for i in range(priority)
        ]

    def start(self) -> None:
        for _, thread in self._threads:
            thread.start()

    def put(self, conn: _Conn, priority: bool) -> None:
        (self.priority_jobs if priority else self.jobs).put(conn)

    def stop(self, deadline: float) -> None:
        """Ask every worker to end and wait for them until `deadline` (a worker stuck in the
        app is a daemon thread: it does not keep the process alive)."""
        for jobs, _ in self._threads:
            jobs.put(None)
        for _, thread in self._threads:
            if thread.ident is not None:
                thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _work(self, jobs: queue.SimpleQueue[_Conn | None]) -> None:
        while (conn := jobs.get()) is not None:
            self._run(conn)


class BoundedServer:
    """Serves `app` on `address`, bounded: at most `max_connections` open connections (the
    whole fd budget; at the limit a new connection replaces the oldest unfinished one), a
    fixed set of threads, a deadline per connection, small request limits. `dropped(why)` is
    told of each connection closed early ("timeout" or "limit"). Errors are logged per
    episode, not per connection."""

    def __init__(self, address: str, app: WSGIApplication, *, priority: Sequence[bytes] = (),  # noqa: PLR0913 - the app and its limits, all but two by keyword
                 dropped: Callable[[str], None] = lambda why: None,
                 max_connections: int = MAX_CONNECTIONS,
                 timeout: float = REQUEST_TIMEOUT) -> None:
        self.max_connections = max_connections
        self.timeout = timeout
        self._priority = tuple(priority)
        self._dropped = dropped
        self._listener = listen(address)
        host = self._listener.getsockname()
        self.port = int(host[1])
        self._host = _AppHost({"SERVER_NAME": host[0], "SERVER_PORT": str(host[1]),
                               "GATEWAY_INTERFACE": "CGI/1.1", "SCRIPT_NAME": "",
                               "CONTENT_LENGTH": "", "REMOTE_HOST": ""}, app)
        self._selector = selectors.DefaultSelector()
        self._wake = _WakePipe()
        self._selector.register(self._wake.read_fd, selectors.EVENT_READ, _WAKE)
        self._conns: set[_Conn] = set()
        self._lock = threading.Lock()  # conn.state between the I/O thread and the workers
        self._done: list[tuple[_Conn, bytes]] = []
        self._listening = False
        self._accept_paused_until = 0.0
        self._stopping = False
        self._accept_failing = Episode(
            "HTTP: cannot accept connections, retrying every "
            f"{ACCEPT_BACKOFF:g}s", "HTTP: accepting connections again")
        self._over_limit = Episode(
            f"HTTP: {max_connections} connections open, the limit; closing the oldest "
            "unfinished one for each new one", "HTTP: under the connection limit again, "
            "connections closed early")
        self._loop_failing = Episode("HTTP: the I/O loop failed", "HTTP: the I/O loop recovered",
                                     logging.ERROR)
        self._handler_failing = Episode("HTTP: answering a request failed",
                                        "HTTP: answering requests again", logging.ERROR)
        self._thread = threading.Thread(target=self._serve, name="http", daemon=True)
        self._workers = _Workers(self._answer, WORKERS, PRIORITY_WORKERS)

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def start(self) -> None:
        raise_fd_limit()
        self._workers.start()
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close every connection; returns within about a second."""
        if self._stopping:
            return
        self._stopping = True
        self._wake.wake()
        if self._thread.ident is None:
            self._workers.stop(time.monotonic())
            self._close_all()
            return
        self._thread.join(timeout=1.0)
        if self._thread.is_alive():
            log.warning("HTTP: the I/O thread did not stop within 1s")
        self._workers.stop(time.monotonic() + 0.2)

    def _answer(self, conn: _Conn) -> None:
        """Run by a worker: the app's whole response to a request read into memory."""
        with self._lock:
            if conn.state != _QUEUED:
                return  # dropped while it waited
            conn.state = _RUNNING
        try:
            response = _Exchange(conn.data, conn.peer, self._host).response()
        except Exception as exc:  # wsgiref itself; the app catches its own errors
            self._handler_failing.happened(repr(exc), traceback=True)
            response = _canned(500)
        else:
            self._handler_failing.over()
        with self._lock:
            self._done.append((conn, response))
        self._wake.wake()

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
                self._wake.drain()
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
                self._dropped("timeout")
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
        self._dropped("limit")
        self._over_limit.happened(f"dropped a connection from {victim.peer[0]}")
        return True

    def _read(self, conn: _Conn) -> None:
        try:
            chunk = conn.sock.recv(MAX_HEAD + MAX_BODY + 1 - len(conn.data))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close(conn)
            return
        conn.data += chunk
        framing = _framing(conn.data, self._priority)
        if framing is None:
            return
        status, priority = framing
        self._selector.unregister(conn.sock)
        if status:
            self._respond(conn, _canned(status))
            return
        with self._lock:
            conn.state = _QUEUED
        conn.deadline = time.monotonic() + WRITE_TIMEOUT
        self._workers.put(conn, priority)

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
        self._wake.close()
