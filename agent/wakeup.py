"""When a wake-up starts a pass, and which mount-table changes and udev events are worth one.

Pure: the loop and the sources feed these the time and what they read.

`PassSchedule` is leading-edge: the first wake-up of a quiet period makes a pass due at once
(a new disk should not wait for a timer); wake-ups that arrive while a pass runs make exactly
one follow-up pass due, since the follow-up reads the whole host again and so serves them all.
A pass serves every wake-up that arrived before it started, never one after: none is lost.
A token bucket (`burst` passes at once, then `rate` a second) keeps a source that never stops
from turning into back-to-back passes; `debounce` > 0 gives the former trailing behaviour
(a pass `debounce` seconds after the first wake-up of a burst). A new directory entry
(inotify) is usually half of a change, the mount on it follows: its wake-up `settle`s a moment
first, so that the pass does not report a plain directory the user is about to mount on.

`MountFilter` keeps the agent idle while the host mounts and unmounts things elsewhere all
day (a kubelet mounts every pod's secrets and tokens): of each new mount table it compares
only the lines that can change what discovery sees with the previous table. Likewise
`DeviceInterest` says which block devices a udev event must concern to be worth a pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

from agent.discovery import SYSTEM_MOUNT_POINTS

INF = float("inf")
HOST_SOURCES = frozenset({"mount", "udev", "inotify"})  # the wake-ups that say the host changed


class PassSchedule:
    """Decides when the next pass is due from the wake-ups and the passes so far."""

    def __init__(self, debounce: float = 0.0, burst: int = 20, rate: float = 10.0, *,
                 settle: Mapping[str, float] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.debounce = debounce
        self.burst = max(1, burst)
        self.rate = rate  # passes a second once the burst is spent; <= 0: no limit
        self.settle = dict(settle or {})  # source -> seconds its wake-ups wait for a pass
        self.clock = clock
        self.pending_since: float | None = None  # the oldest wake-up no pass has served
        self._wanted_at = INF  # when the wake-ups so far want their pass
        self._host_wanted_at = INF  # the same, of the wake-ups that say the host changed
        self._tokens = float(self.burst)
        self._tokens_at = clock()

    def woken(self, source: str = "") -> None:
        """A wake-up arrived: a pass that starts from now on serves it. A source with a
        `settle` time is one whose event is often half of a change (a directory created to
        be mounted on): its pass waits that long, unless another wake-up asks for one now."""
        now = self.clock()
        if self.pending_since is None:
            self.pending_since = now
        wanted = now + max(self.debounce, self.settle.get(source, 0.0))
        self._wanted_at = min(self._wanted_at, wanted)
        if source in HOST_SOURCES:
            self._host_wanted_at = min(self._host_wanted_at, wanted)

    def started(self) -> float | None:
        """A pass starts reading the host now: it serves every wake-up so far. Returns when
        the oldest of them arrived (None: the pass was not asked for by a wake-up)."""
        now = self.clock()
        self._tokens = max(0.0, self._available(now) - 1.0)
        self._tokens_at = now
        return self.restarted()

    def refund(self) -> None:
        """The pass (or read) just started found what it was for: its token is given back.
        The rate is for starts that find nothing (churn elsewhere); a host whose every change
        matters, one disk mounted after another, is never held to it."""
        now = self.clock()
        self._tokens = min(float(self.burst), self._available(now) + 1.0)
        self._tokens_at = now

    def wants_now(self) -> bool:
        """A wake-up since the pass started says the host changed and wants a pass now (not
        one that settles first). A pass still reading the host then reads it over
        (`restarted`) instead of finishing a look already out of date and making a second
        pass due. A PV's change (the watch) does not make what was read of the host stale."""
        return self._host_wanted_at <= self.clock()

    def restarted(self) -> float | None:
        """The running pass reads the host again from the start: it serves every wake-up so
        far, at no token (it is the same pass). Returns when the oldest of them arrived."""
        since, self.pending_since = self.pending_since, None
        self._wanted_at = self._host_wanted_at = INF
        return since

    def due(self) -> float:
        """The clock time the next pass should start at (now or earlier: at once); INF when
        no wake-up waits."""
        if self.pending_since is None:
            return INF
        due = self._wanted_at
        if self.rate > 0:
            missing = 1.0 - self._available(self._tokens_at)
            if missing > 0:
                due = max(due, self._tokens_at + missing / self.rate)
        return due

    def _available(self, now: float) -> float:
        if self.rate <= 0:
            return float(self.burst)
        return min(float(self.burst), self._tokens + (now - self._tokens_at) * self.rate)


# The kernel escapes these in mountinfo's paths as three octal digits (see proc(5)).
_ESCAPED = {ord(c): f"\\{ord(c):03o}" for c in " \t\n\\"}


def escape_mount_path(path: str) -> bytes:
    """A path as mountinfo spells it, so lines compare without being decoded."""
    path = path.rstrip("/") or "/"
    return path.translate(_ESCAPED).encode("utf-8", "surrogateescape")


class MountFilter:
    """Tells whether a new mount table differs from the last one where discovery looks.

    A line matters when its mount point is a discovery directory, inside one, or above one
    (covering it), or one of the system mount points (they mark the host's own devices); or
    when it mounts a block device (its major number is not 0, or its source is a /dev path):
    a raw device in a discovery directory is never offered while mounted anywhere. The churn
    of a busy node (tmpfs for secrets and tokens, overlays of containers, nsfs) is none of
    these. Only the lines that changed are looked at, so a change costs one set difference.
    """

    def __init__(self) -> None:
        self._table = b""
        self._lines: frozenset[bytes] | None = None
        self._dirs: tuple[str, ...] = ()
        self._exact: frozenset[bytes] = frozenset()
        self._prefixes: tuple[bytes, ...] = ()

    def changed(self, table: bytes, dirs: Iterable[str]) -> bool:
        """Remember `table` (mountinfo's bytes); True when it matters to discovery. The first
        table is the baseline (False); new directories always matter."""
        wanted = tuple(sorted(set(dirs)))
        new_dirs = wanted != self._dirs
        if table == self._table and not new_dirs and self._lines is not None:
            return False  # changed and changed back between two reads (one memcmp)
        self._table = table
        lines = frozenset(table.split(b"\n"))
        previous, self._lines = self._lines, lines
        if new_dirs:
            self._set_dirs(wanted)
        if previous is None:
            return False
        return new_dirs or any(self.matters(line) for line in lines ^ previous if line)

    def _set_dirs(self, dirs: tuple[str, ...]) -> None:
        self._dirs = dirs
        exact = {escape_mount_path(p) for p in SYSTEM_MOUNT_POINTS}
        prefixes = set()
        for d in dirs:
            spelled = escape_mount_path(d)
            exact.add(spelled)
            prefixes.add(spelled.rstrip(b"/") + b"/")
            parts = spelled.split(b"/")
            exact.update(b"/".join(parts[:i]) or b"/" for i in range(1, len(parts)))
        self._exact = frozenset(exact)
        self._prefixes = tuple(sorted(prefixes))

    def matters(self, line: bytes) -> bool:
        """Whether one mountinfo line can change what discovery sees (see the class)."""
        fields = line.split(b" ")
        if len(fields) < 5:
            return True  # not understood: never a reason to miss a change
        point, device = fields[4], fields[2]
        if point in self._exact or point.startswith(self._prefixes):
            return True
        if not device.startswith(b"0:"):
            return True
        try:
            source = fields[fields.index(b"-", 6) + 2]
        except (ValueError, IndexError):
            return True
        return source.startswith(b"/dev/")


def mounts_within(table: bytes, dirs: Iterable[str]) -> list[tuple[str, str]]:
    """(device "major:minor", source) of each mount on or under one of `dirs`."""
    prefixes = tuple({escape_mount_path(d).rstrip(b"/") + b"/" for d in dirs})
    exact = {escape_mount_path(d) for d in dirs}
    found = []
    for line in table.split(b"\n"):
        fields = line.split(b" ")
        if len(fields) < 5 or not (fields[4] in exact or fields[4].startswith(prefixes)):
            continue
        try:
            source = fields[fields.index(b"-", 6) + 2].decode("utf-8", "surrogateescape")
        except (ValueError, IndexError):
            source = ""
        found.append((fields[2].decode(), source))
    return found


class DeviceInterest:
    """The block devices ("major:minor") a udev event must concern to matter to discovery:
    those mounted in the discovery directories and those their entries point to, with their
    whole disks. `everything` when an entry cannot be pinned to a device (a dangling
    symlink, which a new device may complete)."""

    def __init__(self, devices: Iterable[str] = (), everything: bool = False) -> None:
        self.devices = frozenset(devices)
        self.everything = everything

    def matters(self, event_devices: Iterable[str]) -> bool:
        """`event_devices`: the event's device and its parents (a partition's disk)."""
        return self.everything or not self.devices.isdisjoint(event_devices)
