"""Wake-up sources that need no third-party library: the mount table and directory entries.

Events only wake the level-driven loop; they carry no data it relies on. So a source may
coalesce, overflow or fail: it says so (a Warning in the log and a counted failure), the loop
resyncs, and the source recovers on its own. None of this can make a volume be missed, only
noticed later.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import BinaryIO

from agent.backoff import Backoff
from agent.wakeup import MountFilter, PassSchedule

log = logging.getLogger(__name__)

IN_ATTRIB, IN_MOVED_FROM, IN_MOVED_TO = 0x4, 0x40, 0x80
IN_CREATE, IN_DELETE, IN_DELETE_SELF, IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
IN_Q_OVERFLOW, IN_IGNORED, IN_ONLYDIR = 0x4000, 0x8000, 0x01000000
IN_NONBLOCK, IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
WATCH_MASK = (IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_ATTRIB
              | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR)
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len (struct inotify_event)


class Waker:
    """Funnels every source into the loop's one wake-up Event, counting wake-ups by source,
    and keeps the `PassSchedule` that says when they make a pass due."""

    def __init__(self, event: threading.Event, schedule: PassSchedule | None = None) -> None:
        self.event = event
        self.schedule = schedule or PassSchedule()
        self.wakeups: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.active: dict[str, bool] = {}
        self.first_wake: float | None = None  # monotonic time of the oldest unserved wake-up
        self._alarms: list[float] = []
        self._lock = threading.Lock()
        self._scheduled = False  # the Event is set by `wake`: already in the schedule

    def wake(self, source: str) -> None:
        with self._lock:
            self.wakeups[source] += 1
            if self.first_wake is None:
                self.first_wake = time.monotonic()
            self.schedule.woken(source)
            self._scheduled = True
            self.event.set()  # only ends the loop's wait: the schedule says when the pass is

    def failed(self, source: str, why: str) -> None:
        """A source lost events: count it, warn, and wake the loop for a full pass."""
        with self._lock:
            self.failures[source] += 1
        log.warning("wake-up source %s failed (%s); resyncing", source, why)
        self.wake(f"{source}-recovery")

    def wake_at(self, when: float) -> None:
        """Ask for a pass at a monotonic time (a retry), without a thread of its own."""
        with self._lock:
            self._alarms.append(when)

    def next_alarm(self) -> float:
        """The earliest requested pass still ahead; past ones are dropped."""
        now = time.monotonic()
        with self._lock:
            self._alarms = [t for t in self._alarms if t > now]
            return min(self._alarms, default=float("inf"))

    def counts(self) -> tuple[dict[str, int], dict[str, int], dict[str, bool]]:
        """Wake-ups and failures by source, and which sources run (for metrics, any thread)."""
        with self._lock:
            return dict(self.wakeups), dict(self.failures), dict(self.active)

    def due(self) -> float:
        """When the wake-ups so far make a pass due (monotonic; inf: none waits). The Event
        set by anyone else (the PV watch, a cleaner, shutdown) counts as a wake-up from now; set
        by `wake`, it is in the schedule already, and a wake-up that settles (a new PV made
        Available, a new entry) keeps its settle time instead of making a pass due at once."""
        with self._lock:
            if self.event.is_set():
                self.event.clear()  # noted in the schedule: waiting on it again must block
                if not self._scheduled:
                    self.schedule.woken()
            self._scheduled = False
            return self.schedule.due()

    def take_first_wake(self, restart: bool = False) -> float | None:
        """A pass starts (`restart`: starts reading the host over): it serves every wake-up so
        far (later ones make another pass due). Returns when the oldest source wake-up it
        serves arrived, for the latency metric."""
        with self._lock:
            self.event.clear()
            self._scheduled = False
            if restart:
                self.schedule.restarted()
            else:
                self.schedule.started()
            first, self.first_wake = self.first_wake, None
            return first

    def wants_pass_now(self) -> bool:
        """A wake-up since the pass started wants a pass at once (PassSchedule.wants_now)."""
        with self._lock:
            return self.schedule.wants_now()


class Source:
    """A daemon thread feeding a Waker until `stop` is set."""

    name = "source"

    def __init__(self, waker: Waker, stop: threading.Event) -> None:
        self.waker = waker
        self.stop = stop
        self.thread = threading.Thread(target=self._run_forever, name=self.name, daemon=True)

    def start(self) -> bool:
        """Start if the source can work here; say so either way."""
        ok = self.available()
        self.waker.active[self.name] = ok
        if ok:
            self.thread.start()
        return ok

    def available(self) -> bool:
        return True

    def _run_forever(self) -> None:
        backoff = Backoff(1.0, 30.0)
        while not self.stop.is_set():
            try:
                self.run()
                backoff.reset()
            except Exception as exc:  # a source must never die silently: count, resync, retry
                self.waker.failed(self.name, f"{type(exc).__name__}: {exc}")
                self.stop.wait(backoff.next_delay())

    def run(self) -> None:
        raise NotImplementedError


class MountTableSource(Source):
    """The kernel flags a changed mount table with POLLPRI on /proc/self/mountinfo.

    With `dirs` (the discovery directories), a change wakes the loop only when it can matter
    to discovery (`MountFilter`): other mounts on the host cost one read of the table, never
    a pass. The flag re-arms in poll(2) itself; reading the table is only for the filter.
    The reads are leading-edge, then held to READ_RATE a second (a `PassSchedule` of reads)
    when they find nothing: a mount in a discovery dir, or a run of them, is read at once,
    while a host that never stops mounting elsewhere costs one read a second, serving every
    change since the one before, instead of a read of the whole table (a kernel walk of every
    mount) per change. The price: a mount in a discovery dir during such churn waits up to
    1/READ_RATE seconds to be seen.
    """

    name = "mount"
    RESOLVE_EVERY = 30.0  # seconds a resolved discovery directory (realpath) is trusted
    READ_BURST = 5  # table reads at once after a quiet spell ...
    READ_RATE = 1.0  # ... then this many a second while changes keep coming

    def __init__(self, waker: Waker, stop: threading.Event,
                 mountinfo: str = "/proc/self/mountinfo",
                 dirs: Callable[[], Iterable[str]] | None = None,
                 read_rate: float | None = None) -> None:
        super().__init__(waker, stop)
        self.mountinfo = mountinfo
        self.dirs = dirs
        self.read_rate = self.READ_RATE if read_rate is None else read_rate  # 0: every change
        self.ignored = 0  # changes the filter found irrelevant (tests, benchmarks)
        self.reads = 0  # reads of the table for the filter (tests)
        self._resolved: tuple[tuple[str, ...], float, tuple[str, ...]] = ((), -1e9, ())

    def available(self) -> bool:
        return os.access(self.mountinfo, os.R_OK)

    def run(self) -> None:
        table = MountFilter()
        reads = PassSchedule(burst=self.READ_BURST, rate=self.read_rate)
        with open(self.mountinfo, "rb", buffering=0) as f:
            poller = select.poll()
            poller.register(f.fileno(), select.POLLPRI | select.POLLERR)
            poller.poll(0)  # consume the flag of changes before this point
            if self.dirs is not None:
                table.changed(_read_all(f), self._watched_dirs())
            while not self.stop.is_set():
                if not poller.poll(1000):
                    continue
                if self.dirs is None:  # no filter: every change wakes, nothing is read
                    self.waker.wake(self.name)
                    continue
                reads.woken()
                if self.stop.wait(max(0.0, reads.due() - time.monotonic())):
                    return
                reads.started()
                poller.poll(0)  # changes while waiting: the read below sees them
                self.reads += 1
                if table.changed(_read_all(f), self._watched_dirs()):
                    reads.refund()  # only reads that find nothing are held to the rate
                    self.waker.wake(self.name)
                else:
                    self.ignored += 1

    def _watched_dirs(self) -> tuple[str, ...]:
        """The configured directories as given and resolved (the table shows real paths);
        resolved again when they change or every RESOLVE_EVERY seconds."""
        assert self.dirs is not None
        given = tuple(self.dirs())
        known, when, resolved = self._resolved
        now = time.monotonic()
        if given != known or now - when > self.RESOLVE_EVERY:
            resolved = tuple(sorted({*given, *map(os.path.realpath, given)}))
            self._resolved = (given, now, resolved)
        return resolved


def _read_all(f: BinaryIO) -> bytes:
    f.seek(0)
    chunks = []
    while chunk := f.read(1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


class InotifySource(Source):
    """Entries created, removed or renamed in the discovery directories (inotify(7))."""

    name = "inotify"

    def __init__(self, waker: Waker, stop: threading.Event, dirs: Callable[[], Iterable[str]]):
        super().__init__(waker, stop)
        self.dirs = dirs
        self._libc = _load_libc()
        self._watched: dict[int, str] = {}

    def available(self) -> bool:
        return self._libc is not None

    def run(self) -> None:
        assert self._libc is not None
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        self._watched.clear()
        try:
            while not self.stop.is_set():
                self._watch_missing(fd)
                ready, _, _ = select.select([fd], [], [], 1.0)
                if ready:
                    self._drain(fd)
        finally:
            os.close(fd)

    def _watch_missing(self, fd: int) -> None:
        """(Re)add watches: a discovery dir may appear after start or be recreated."""
        assert self._libc is not None
        watched = set(self._watched.values())
        for path in self.dirs():
            if path in watched or not os.path.isdir(path):
                continue
            wd = self._libc.inotify_add_watch(fd, os.fsencode(path), WATCH_MASK)
            if wd >= 0:
                self._watched[wd] = path
                log.debug("inotify: watching %s", path)

    def _drain(self, fd: int) -> None:
        try:
            data = os.read(fd, 64 * 1024)
        except BlockingIOError:
            return
        offset, woke = 0, False
        while offset + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size + length
            if mask & IN_Q_OVERFLOW:
                self.waker.failed(self.name, "event queue overflow")
                continue
            if mask & IN_IGNORED:
                self._watched.pop(wd, None)  # the directory went away; re-added when back
            woke = True
        if woke:
            self.waker.wake(self.name)


def _load_libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6", use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    except (OSError, AttributeError):
        return None
    return libc

