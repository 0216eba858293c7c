"""Observe the host: discovery directories, the mount table, device sizes and identities.

The only module that touches the host's filesystems and devices for discovery. Every host path
is a parameter (node_exporter style) so tests can point it at fixtures. Any call on a sick disk
or mount can hang (lstat, statvfs, opening or reading a device, a hung FUSE or NFS mount), so
the work runs time-bounded in worker threads: see `_Walk`. A disk's identity is read
from the device itself (`agent.signatures`); udev's database only adds hardware ids.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar, cast

import psutil

from agent import signatures
from agent.config import Config
from agent.discovery import (
    SYSTEM_FILESYSTEMS,
    EntryFacts,
    FileType,
    HostSnapshot,
    Mount,
    parse_mountinfo,
)

log = logging.getLogger(__name__)

BLKGETSIZE64 = 0x80081272
LOOP_GET_STATUS64 = 0x4C05
LOOP_MAJOR = 7
LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")  # struct loop_info64, 232 bytes
SLOW_AFTER = 0.25  # an entry busy this long gets the rest of the pass handed to a new worker
T = TypeVar("T")


class HostTimeoutError(OSError):
    """A host call did not return in time (a hung disk, a dead NFS server)."""

    def __init__(self, what: str) -> None:
        super().__init__(errno.ETIMEDOUT, what)


class SnapshotInterrupted(Exception):  # noqa: N818 - a signal to start over, not an error
    """A snapshot stopped reading entries: a newer wake-up asked for a fresh look at once."""


class Doing:
    """What a bounded task is busy with, so a timeout can name the call that hung."""

    def __init__(self) -> None:
        self.what = "starting"

    def __call__(self, what: str) -> None:
        self.what = what


@dataclass(frozen=True)
class Hung:
    """A task that did not finish within the timeout (now, or since an earlier call)."""

    what: str
    timeout: float
    earlier: bool = False

    def describe(self) -> str:
        if self.earlier:
            return f"{self.what} has not answered since an earlier pass (over {self.timeout:g}s)"
        return f"{self.what} did not answer within {self.timeout:g}s"


@dataclass(frozen=True)
class DeviceRead:
    """What one open of a block device showed."""

    size: int
    probe: signatures.Probe
    loop_backing: str = ""


@dataclass
class Devices:
    """What identifies a block device: its own bytes (read through the node, never cached),
    udev's database and the /dev/disk links. Paths are the host's, overridable for tests."""

    sys_block: str = "/sys/dev/block"
    udev_data: str = "/run/udev/data"
    dev_dir: str = "/dev"
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _disagreements: set[tuple[str, str, str]] = field(default_factory=set)

    def read(self, path: str, device: str, doing: Callable[[str], None],
                     loop: bool) -> DeviceRead | None:
        """Open a device node and read its size, its signatures and (`loop`) its loop status.
        None when the node is not the block device `device` (any more)."""
        doing("opening the device")
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISBLK(st.st_mode) or _devno(st.st_rdev) != device:
                return None
            doing("reading the device size")
            size = int(struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0])
            doing("reading the device")
            chunks = {off: os.pread(fd, length, off) for off, length in signatures.regions(size)}
            backing = ""
            if loop and self.is_loop(device):
                doing("reading the loop status")
                backing = _loop_status(fd)
            return DeviceRead(size, signatures.probe(chunks, size), backing)
        finally:
            os.close(fd)

    def is_loop(self, device: str) -> bool:
        major = device.split(":", 1)[0]
        return major == str(LOOP_MAJOR) or Path(self.sys_block, device, "loop").is_dir()

    def identity(self, device: str, read: DeviceRead | None, doing: Callable[[str], None],
                  fs_type: str | None = None, node: str | None = None) -> dict[str, str]:
        """What identifies the disk behind a device number. The device's own bytes win over
        udev's database, which can be stale (a disk reformatted while udev was not looking).
        `node`: the device's node, when the caller has just looked it up."""
        doing("reading udev data")
        props = self.udev_properties(device)
        if node is None:
            node = self.node(device)
        by_id = self._links_to(node, "disk/by-id") if node else []
        udev_uuid = props.get("ID_FS_UUID", "")
        if not udev_uuid and node and read is None:
            by_uuid = self._links_to(node, "disk/by-uuid")
            udev_uuid = by_uuid[0] if by_uuid else ""
        if read is not None:
            fs_uuid = read.probe.fs_uuid(fs_type)
            pt_uuid = read.probe.table.uuid if read.probe.table else ""
            if udev_uuid and udev_uuid != fs_uuid:
                self._disagree(device, udev_uuid, fs_uuid)
        else:
            fs_uuid, pt_uuid = udev_uuid, props.get("ID_PART_TABLE_UUID", "")
        return compose_identity(props, by_id, fs_uuid, pt_uuid,
                                read.loop_backing if read is not None else "")

    def _disagree(self, device: str, udev_uuid: str, own: str) -> None:
        with self._lock:
            if (device, udev_uuid, own) in self._disagreements:
                return
            self._disagreements.add((device, udev_uuid, own))
        log.warning("device %s: udev's database says filesystem UUID %s, the device itself %s; "
                    "using the device's", device, udev_uuid, own or "(none)")

    def udev_properties(self, device: str) -> dict[str, str]:
        """udev's database entry for a block device (`E:KEY=VALUE` lines), if udev runs."""
        try:  # os.path, not pathlib: called for every entry on every pass
            with open(os.path.join(self.udev_data, f"b{device}"), errors="replace") as f:
                text = f.read()
        except OSError:
            return {}
        return dict(
            line[2:].split("=", 1) for line in text.splitlines()
            if line.startswith("E:") and "=" in line
        )

    def node(self, device: str) -> str | None:
        try:
            with open(os.path.join(self.sys_block, device, "uevent")) as f:
                uevent = f.read()
        except OSError:
            return None
        for line in uevent.splitlines():
            if line.startswith("DEVNAME="):
                return os.path.join(self.dev_dir, line.split("=", 1)[1])
        return None

    def _links_to(self, node: str, subdir: str) -> list[str]:
        """Names of the /dev/disk/... symlinks that resolve to a device node, preferring WWNs."""
        base = Path(self.dev_dir, subdir)
        try:
            names = [p.name for p in base.iterdir()
                     if os.path.realpath(p) == os.path.realpath(node)]
        except OSError:
            return []
        return sorted(names, key=lambda n: (not n.startswith("wwn-"), n))


@dataclass
class HostReader:
    """Reads host facts; holds the paths to read them from and the calls still hanging."""

    mountinfo: str = "/proc/self/mountinfo"
    sys_block: str = "/sys/dev/block"
    udev_data: str = "/run/udev/data"
    dev_dir: str = "/dev"
    timeout: float = 5.0
    capacity_of: Callable[[str], int] = field(default=lambda p: int(psutil.disk_usage(p).total))
    _hanging: dict[str, Doing] = field(default_factory=dict)  # key -> what its thread is stuck in
    _lock: threading.Lock = field(default_factory=threading.Lock)
    devices: Devices = field(init=False)

    def __post_init__(self) -> None:
        self.devices = Devices(self.sys_block, self.udev_data, self.dev_dir)

    def snapshot(self, config: Config,
                 interrupted: Callable[[], bool] | None = None) -> HostSnapshot:
        """Observe every class's discovery directory and the mount table, once.

        Raises HostTimeoutError when the mount table itself does not answer: without it no
        entry can be judged. A class directory or an entry that hangs is reported, not raised.
        `interrupted`, asked before each entry is read: when it says so, the entries left are
        not read and SnapshotInterrupted is raised (a snapshot older than a change just seen
        would only need to be taken again).
        """
        listing_calls: dict[str, Callable[[Doing], object]] = {
            "mount-table": self._mount_table,
            **{f"dir:{cls.mount_dir}": functools.partial(_list_dir, cls.mount_dir)
               for cls in config.classes},
        }
        first = self._walk(listing_calls)
        table = first["mount-table"]
        if isinstance(table, Hung):
            raise HostTimeoutError(f"reading the mount table: {table.describe()}")
        if isinstance(table, BaseException):
            raise table
        mounts, sources = cast(tuple[list[Mount], dict[str, str]], table)
        mounts_at = {m.mount_point: m for m in mounts}  # the last mount on a path is visible
        real_dirs: dict[str, str] = {}
        dir_errors: dict[str, str] = {}
        wanted: dict[str, list[tuple[str, str]]] = {}  # class -> [(name, path)]
        for cls in config.classes:
            listing = first[f"dir:{cls.mount_dir}"]
            if isinstance(listing, Hung):
                dir_errors[cls.name] = f"cannot read {cls.mount_dir}: {listing.describe()}"
            elif isinstance(listing, OSError):
                dir_errors[cls.name] = f"cannot read {cls.mount_dir}: {listing.strerror or listing}"
            elif isinstance(listing, BaseException):
                raise listing
            else:
                real, names = cast(tuple[str, list[str]], listing)
                real_dirs[cls.name] = real
                wanted[cls.name] = [(n, os.path.join(real, n)) for n in names if cls.matches(n)]
        calls = {f"entry:{path}": functools.partial(self.entry, path, name, mounts_at)
                 for pairs in wanted.values() for name, path in pairs}
        done = self._walk(calls, interrupted)
        if any(isinstance(outcome, SnapshotInterrupted) for outcome in done.values()):
            raise SnapshotInterrupted
        entries = {cls: [_entry_outcome(name, path, done[f"entry:{path}"]) for name, path in pairs]
                   for cls, pairs in wanted.items()}
        return HostSnapshot(entries, mounts, real_dirs, dir_errors, sources)

    def _mount_table(self, doing: Doing) -> tuple[list[Mount], dict[str, str]]:
        doing("reading the mount table")
        mounts = self.mounts()
        doing("looking up mount sources")
        return mounts, self.mount_sources(mounts)

    @staticmethod
    def mount_sources(mounts: list[Mount]) -> dict[str, str]:
        """Device numbers of mount sources that are device nodes, where mountinfo's own number
        differs (btrfs): a raw device is never offered while any of its filesystems is mounted."""
        sources: dict[str, str] = {}
        for m in mounts:
            devno = _block_devno(m.source)
            if devno is not None and devno != m.device:
                sources[m.mount_point] = devno
        return sources

    def mounts(self) -> list[Mount]:
        with open(self.mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            return parse_mountinfo(f.read())

    def entry(self, path: str, name: str, mounts_at: Mapping[str, Mount],
              doing: Callable[[str], None] = lambda _: None) -> EntryFacts:
        """Facts about one entry; never raises for a problem of that entry alone. Unbounded
        itself: `snapshot` runs it under the timeout."""
        try:
            return self._entry(path, name, mounts_at, doing)
        except OSError as exc:
            return _unreadable(name, path, exc)

    def _entry(self, path: str, name: str, mounts_at: Mapping[str, Mount],
               doing: Callable[[str], None]) -> EntryFacts:
        doing("lstat")
        lst = os.lstat(path)
        target = None
        if stat.S_ISLNK(lst.st_mode):
            doing("resolving the symlink")
            target = os.path.realpath(path)
        doing("stat")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return EntryFacts(name, path, FileType.BROKEN_LINK, target=target)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return EntryFacts(name, path, FileType.BROKEN_LINK, target=target)
            return _unreadable(name, path, exc, target)

        if stat.S_ISDIR(st.st_mode):
            return self._directory(name, path, target, mounts_at, doing)
        if stat.S_ISBLK(st.st_mode):
            return self._block(name, path, target, _devno(st.st_rdev), doing)
        return EntryFacts(name, path, FileType.OTHER, target=target)

    def _directory(self, name: str, path: str, target: str | None,
                   mounts_at: Mapping[str, Mount], doing: Callable[[str], None]) -> EntryFacts:
        real = target or path
        mount = mounts_at.get(real)
        if mount is None:  # not a mount point: discovery explains; no need to measure it
            return EntryFacts(name, path, FileType.DIRECTORY, target=target)
        if mount.fs_type in SYSTEM_FILESYSTEMS:  # never offered: not even asked (autofs)
            return EntryFacts(name, path, FileType.DIRECTORY, target=target, device=mount.device)
        try:
            doing("statvfs")
            capacity = self.capacity_of(real)
            # Unmounted between the mount table's read and statvfs, the size measured is the
            # parent filesystem's: the mount point must still hold the mounted device.
            doing("stat of the mount point")
            now = os.stat(real).st_dev
        except OSError as exc:
            return _unreadable(name, path, exc, target)
        if f"{os.major(now)}:{os.minor(now)}" != mount.device:
            return EntryFacts(name, path, FileType.UNREADABLE, target=target,
                              error="the mount changed while it was read")
        doing("stat of the mount source")
        device = _block_devno(mount.source) or mount.device  # btrfs: 0:N in mountinfo
        node = self.devices.node(device)
        read = None
        if node is not None:
            try:
                read = self.devices.read(node, device, doing, loop=False)
            except OSError:
                read = None  # the node is not here (a pod without the host's /dev): udev's word
        return EntryFacts(name, path, FileType.DIRECTORY, target=target, device=mount.device,
                          capacity_bytes=capacity,
                          identity=self.devices.identity(device, read, doing, mount.fs_type, node))

    def _block(self, name: str, path: str, target: str | None, device: str,
               doing: Callable[[str], None]) -> EntryFacts:
        doing("reading sysfs")
        sysdir = Path(self.devices.sys_block, device)
        partitions = tuple(sorted(
            _read(p / "dev") for p in _children(sysdir) if (p / "partition").exists()
        ))
        holders = tuple(sorted(p.name for p in _children(sysdir / "holders")))
        try:
            read = self.devices.read(target or path, device, doing, loop=True)
        except OSError as exc:
            return _unreadable(name, path, exc, target)
        if read is None:
            return EntryFacts(name, path, FileType.UNREADABLE, target=target,
                              error="the entry changed while it was read")
        probe, identity = read.probe, self.devices.identity(device, read, doing)
        return EntryFacts(name, path, FileType.BLOCK, target=target, device=device,
                          capacity_bytes=read.size, identity=identity,
                          partitions=partitions, holders=holders, signatures=probe.types,
                          partition_table=probe.table.type if probe.table else None)

    def read_identity(self, device: str, fs_type: str | None = None) -> dict[str, str]:
        """The identity of the disk behind `device` ("major:minor"), read from it now.

        For a check right before anything destructive: nothing is cached, the device is opened
        (read-only, never exclusively) and read on every call; its own superblock gives
        `fs-uuid` (the one of `fs_type` when given, as for a mount), its partition table
        `pt-uuid`, a loop device's status `loop-backing`; udev's database adds `wwn`, `serial`
        and `device-id`. `{}` when the device has no node here, is not that device any more, or
        cannot be opened or read. Bounded by `timeout`: raises HostTimeoutError when the device
        does not answer, at once while an earlier call on it still hangs.
        """
        key = f"device:{device}"
        result = self._walk({key: functools.partial(self._read_identity, device, fs_type)})[key]
        if isinstance(result, Hung):
            raise HostTimeoutError(f"device {device}: {result.describe()}")
        if isinstance(result, BaseException):
            raise result
        return result

    def _read_identity(self, device: str, fs_type: str | None, doing: Doing) -> dict[str, str]:
        doing("reading sysfs")
        node = self.devices.node(device)
        if node is None:
            return {}
        try:
            read = self.devices.read(node, device, doing, loop=True)
        except OSError:
            return {}
        if read is None:
            return {}
        return self.devices.identity(device, read, doing, fs_type, node)

    def _walk(self, calls: Mapping[str, Callable[[Doing], T]],
              interrupted: Callable[[], bool] | None = None
              ) -> dict[str, T | Hung | BaseException]:
        """Run `calls` in order, each bounded by `timeout` (see `_Walk`); once `interrupted`
        says so, the calls not started yet get SnapshotInterrupted instead."""
        return _Walk(self, calls, interrupted).run()


class _Walk(Generic[T]):
    """One time-bounded run of host calls; a call that hangs costs the others at most
    `SLOW_AFTER`, and the whole run at most `timeout`, once.

    Why this shape: a thread blocked in the kernel on a hung disk cannot be cancelled, only
    abandoned. So a worker thread walks the calls in order; when one call has been busy for
    `SLOW_AFTER` a new worker takes over the rest (the slow one exits when its call returns),
    and when it has been busy for `timeout` its key is marked hanging and its result is `Hung`.
    A hanging key is not started again, by this or a later run, until its thread returns: at
    most one stuck thread per hung path, never a pile-up. Workers wake the caller only when
    every call is answered; it wakes itself at the deadlines (each call's start is recorded):
    a pass over a hundred disks would otherwise hand the GIL back and forth twice per disk.
    """

    def __init__(self, reader: HostReader, calls: Mapping[str, Callable[[Doing], T]],
                 interrupted: Callable[[], bool] | None = None) -> None:
        self.reader = reader
        self.calls = calls
        self.interrupted = interrupted
        self.keys = list(calls)
        self.results: dict[str, T | Hung | BaseException] = {}
        self.running: dict[str, tuple[float, Doing]] = {}  # key -> (started, what it does)
        self.handed_off: set[str] = set()
        self.cursor = 0
        self.cond = threading.Condition(reader._lock)  # the one lock that guards _hanging
        self.slow = min(SLOW_AFTER, reader.timeout)

    def run(self) -> dict[str, T | Hung | BaseException]:
        timeout = self.reader.timeout
        with self.cond:
            if self.keys:
                self._start_worker()
            while len(self.results) < len(self.keys):
                now = time.monotonic()
                wake = now + self.slow  # a call may start meanwhile: look at it by then
                for key, (began, doing) in list(self.running.items()):
                    if key in self.results:
                        continue  # given up on; its thread may still be stuck
                    if key not in self.handed_off and now - began >= self.slow:
                        self.handed_off.add(key)
                        self._start_worker()
                    if now - began >= timeout:
                        self._give_up(key, doing)
                        continue
                    wake = min(wake, began + (timeout if key in self.handed_off else self.slow))
                if len(self.results) < len(self.keys):
                    self.cond.wait(max(0.0, wake - now) + 0.005)
        return self.results

    def _give_up(self, key: str, doing: Doing) -> None:
        hung = Hung(doing.what, self.reader.timeout)
        self.results[key] = hung
        self.reader._hanging[key] = doing
        log.warning("host call on %s: %s; not retried until it returns", key, hung.describe())

    def _start_worker(self) -> None:
        threading.Thread(target=self._work, name="host-walk", daemon=True).start()

    def _next(self) -> tuple[str, Doing] | None:
        """The next call to make (under the lock); calls still hanging are answered at once."""
        hanging = self.reader._hanging
        if self.interrupted is not None and self.cursor < len(self.keys) and self.interrupted():
            for key in self.keys[self.cursor:]:
                self.results[key] = SnapshotInterrupted()
            self.cursor = len(self.keys)
            self._notify_when_done()
            return None
        while self.cursor < len(self.keys):
            key = self.keys[self.cursor]
            self.cursor += 1
            stuck = hanging.get(key)
            if stuck is not None:
                self.results[key] = Hung(stuck.what, self.reader.timeout, earlier=True)
                self._notify_when_done()
                continue
            doing = Doing()
            self.running[key] = (time.monotonic(), doing)  # the caller times the call from now
            return key, doing
        return None

    def _notify_when_done(self) -> None:
        if len(self.results) == len(self.keys):
            self.cond.notify_all()

    def _work(self) -> None:
        while True:
            with self.cond:
                job = self._next()
            if job is None:
                return
            key, doing = job
            outcome: T | BaseException
            try:
                outcome = self.calls[key](doing)
            except Exception as exc:  # handed to the caller, in its thread
                outcome = exc
            with self.cond:
                self.running.pop(key, None)
                hanging = self.reader._hanging
                if hanging.get(key) is doing:
                    del hanging[key]
                    log.info("host call on %s answered again (%s)", key, doing.what)
                self.results.setdefault(key, outcome)
                self._notify_when_done()
                if key in self.handed_off:
                    return  # another worker carries on with the rest


def compose_identity(udev: Mapping[str, str], by_id: list[str], fs_uuid: str, pt_uuid: str,
                     loop_backing: str) -> dict[str, str]:
    """The identity keys (agent.identity.IDENTITY_KEYS) that have a value."""
    ident = {
        "fs-uuid": fs_uuid,
        "wwn": udev.get("ID_WWN_WITH_EXTENSION") or udev.get("ID_WWN", ""),
        "serial": udev.get("ID_SERIAL_SHORT") or udev.get("ID_SERIAL", ""),
        "device-id": by_id[0] if by_id else "",
        "pt-uuid": pt_uuid,
        "loop-backing": loop_backing,
    }
    return {k: v for k, v in ident.items() if v}


def loop_backing(info: bytes) -> str:
    """A loop device's backing file from its `struct loop_info64`, as a stable string:
    `MAJOR:MINOR:INODE` (the device of the filesystem holding the file, and the file's inode),
    then `@OFFSET` and `+SIZELIMIT` when the loop maps only part of the file. A path would not
    do: the file can be renamed, or another file put at its path."""
    lo_device, lo_inode, _rdevice, offset, sizelimit = LOOP_INFO64.unpack(info)[:5]
    text = f"{_devno(lo_device)}:{lo_inode}"
    if offset:
        text += f"@{offset}"
    if sizelimit:
        text += f"+{sizelimit}"
    return text


def _loop_status(fd: int) -> str:
    try:
        info = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(LOOP_INFO64.size))
    except OSError:  # ENXIO: no file attached
        return ""
    return loop_backing(info)


def _list_dir(mount_dir: str, doing: Doing) -> tuple[str, list[str]]:
    doing("resolving the directory")
    real = os.path.realpath(mount_dir)
    doing("listing the directory")
    return real, sorted(os.listdir(real))


def _entry_outcome(name: str, path: str, outcome: EntryFacts | Hung | BaseException
                   ) -> EntryFacts:
    if isinstance(outcome, Hung):
        return EntryFacts(name, path, FileType.UNREADABLE, timed_out=True,
                          error=outcome.describe())
    if isinstance(outcome, OSError):
        return _unreadable(name, path, outcome)
    if isinstance(outcome, BaseException):
        raise outcome  # a bug, not a disk problem
    return outcome


def _block_devno(path: str) -> str | None:
    """The device number of a device node, for a path under /dev; None for anything else."""
    if not path.startswith("/dev/"):
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _devno(st.st_rdev) if stat.S_ISBLK(st.st_mode) else None


def _devno(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def _unreadable(name: str, path: str, exc: OSError, target: str | None = None) -> EntryFacts:
    code = errno.errorcode.get(exc.errno or 0, "error")
    return EntryFacts(name, path, FileType.UNREADABLE, target=target,
                      error=f"{code}: {exc.strerror or exc}")


def _children(directory: Path) -> list[Path]:
    try:
        return list(directory.iterdir())
    except OSError:
        return []


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
