"""Observe the host: discovery directories, the mount table, device sizes and identities.

The only module that touches the host's filesystems and devices for discovery. Every host path
is a parameter (node_exporter style) so tests can point it at fixtures, and every call that can
hang on a sick disk (statvfs, opening a device) runs time-bounded, so one bad disk never stalls
the others.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import psutil

from agent.config import Config
from agent.discovery import EntryFacts, FileType, HostSnapshot, Mount, parse_mountinfo

log = logging.getLogger(__name__)

BLKGETSIZE64 = 0x80081272
T = TypeVar("T")


class HostTimeoutError(Exception):
    """A host call did not return in time (a hung disk, a dead NFS server)."""


@dataclass
class HostReader:
    """Reads host facts; holds the paths to read them from and the calls still hanging."""

    mountinfo: str = "/proc/self/mountinfo"
    sys_block: str = "/sys/dev/block"
    udev_data: str = "/run/udev/data"
    dev_dir: str = "/dev"
    timeout: float = 5.0
    capacity_of: Callable[[str], int] = field(default=lambda p: int(psutil.disk_usage(p).total))
    _hanging: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def snapshot(self, config: Config) -> HostSnapshot:
        """Observe every class's discovery directory and the mount table, once."""
        mounts = self.mounts()
        mounts_at = {m.mount_point: m for m in mounts}  # the last mount on a path is visible
        entries: dict[str, list[EntryFacts]] = {}
        real_dirs: dict[str, str] = {}
        dir_errors: dict[str, str] = {}
        for cls in config.classes:
            real = os.path.realpath(cls.mount_dir)
            real_dirs[cls.name] = real
            try:
                names = sorted(os.listdir(real))
            except OSError as exc:
                dir_errors[cls.name] = f"cannot read {cls.mount_dir}: {exc.strerror or exc}"
                continue
            entries[cls.name] = [
                self.entry(os.path.join(real, n), n, mounts_at) for n in names if cls.matches(n)
            ]
        return HostSnapshot(entries, mounts, real_dirs, dir_errors, self.mount_sources(mounts))

    @staticmethod
    def mount_sources(mounts: list[Mount]) -> dict[str, str]:
        """Device numbers of mount sources that are device nodes, where mountinfo's own number
        differs (btrfs): a raw device is never offered while any of its filesystems is mounted."""
        sources: dict[str, str] = {}
        for m in mounts:
            if not m.source.startswith("/dev/"):
                continue
            try:
                st = os.stat(m.source)
            except OSError:
                continue
            if stat.S_ISBLK(st.st_mode):
                devno = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
                if devno != m.device:
                    sources[m.mount_point] = devno
        return sources

    def mounts(self) -> list[Mount]:
        with open(self.mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            return parse_mountinfo(f.read())

    def entry(self, path: str, name: str, mounts_at: Mapping[str, Mount]) -> EntryFacts:
        """Facts about one entry; never raises for a problem of that entry alone."""
        try:
            lst = os.lstat(path)
        except OSError as exc:
            return _unreadable(name, path, exc)
        target = os.path.realpath(path) if stat.S_ISLNK(lst.st_mode) else None
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return EntryFacts(name, path, FileType.BROKEN_LINK, target=target)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return EntryFacts(name, path, FileType.BROKEN_LINK, target=target)
            return _unreadable(name, path, exc)

        if stat.S_ISDIR(st.st_mode):
            return self._directory(name, path, target, mounts_at)
        if stat.S_ISBLK(st.st_mode):
            return self._block(name, path, target, st.st_rdev)
        return EntryFacts(name, path, FileType.OTHER, target=target)

    def _directory(
        self, name: str, path: str, target: str | None, mounts_at: Mapping[str, Mount]
    ) -> EntryFacts:
        real = target or path
        mount = mounts_at.get(real)
        if mount is None:  # not a mount point: discovery explains; no need to measure it
            return EntryFacts(name, path, FileType.DIRECTORY, target=target)
        try:
            capacity = self._bounded(real, lambda: self.capacity_of(real))
        except HostTimeoutError:
            return EntryFacts(name, path, FileType.DIRECTORY, target=target,
                              device=mount.device, timed_out=True,
                              error=f"statvfs did not answer within {self.timeout:g}s")
        except OSError as exc:
            return _unreadable(name, path, exc, target)
        return EntryFacts(name, path, FileType.DIRECTORY, target=target, device=mount.device,
                          capacity_bytes=capacity, identity=self.identity(mount.device))

    def _block(self, name: str, path: str, target: str | None, rdev: int) -> EntryFacts:
        device = f"{os.major(rdev)}:{os.minor(rdev)}"
        sysdir = Path(self.sys_block, device)
        partitions = tuple(sorted(
            _read(p / "dev") for p in _children(sysdir) if (p / "partition").exists()
        ))
        holders = tuple(sorted(p.name for p in _children(sysdir / "holders")))
        real = target or path
        try:
            size = self._bounded(real, lambda: device_size(real))
        except HostTimeoutError:
            return EntryFacts(name, path, FileType.BLOCK, target=target, device=device,
                              timed_out=True,
                              error=f"opening the device did not answer within {self.timeout:g}s")
        except OSError as exc:
            return _unreadable(name, path, exc, target)
        return EntryFacts(name, path, FileType.BLOCK, target=target, device=device,
                          capacity_bytes=size, identity=self.identity(device),
                          partitions=partitions, holders=holders)

    def identity(self, device: str) -> dict[str, str]:
        """What identifies the disk behind a device number: fs UUID, WWN, serial, by-id name."""
        props = self.udev_properties(device)
        ident = {
            "fs-uuid": props.get("ID_FS_UUID", ""),
            "wwn": props.get("ID_WWN_WITH_EXTENSION") or props.get("ID_WWN", ""),
            "serial": props.get("ID_SERIAL_SHORT") or props.get("ID_SERIAL", ""),
        }
        node = self.device_node(device)
        if node:
            by_id = self._links_to(node, "disk/by-id")
            ident["device-id"] = by_id[0] if by_id else ""
            if not ident["fs-uuid"]:
                by_uuid = self._links_to(node, "disk/by-uuid")
                ident["fs-uuid"] = by_uuid[0] if by_uuid else self._probe_fs_uuid(node)
        return {k: v for k, v in ident.items() if v}

    def udev_properties(self, device: str) -> dict[str, str]:
        """udev's database entry for a block device (`E:KEY=VALUE` lines), if udev runs."""
        try:
            text = Path(self.udev_data, f"b{device}").read_text(errors="replace")
        except OSError:
            return {}
        return dict(
            line[2:].split("=", 1) for line in text.splitlines()
            if line.startswith("E:") and "=" in line
        )

    def device_node(self, device: str) -> str | None:
        try:
            uevent = Path(self.sys_block, device, "uevent").read_text()
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

    def _probe_fs_uuid(self, node: str) -> str:
        """Without udev, ask blkid to read the superblock directly."""
        try:
            out = subprocess.run(
                ["blkid", "-p", "-s", "UUID", "-o", "value", node],
                capture_output=True, text=True, timeout=self.timeout, check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    def _bounded(self, key: str, call: Callable[[], T]) -> T:
        """Run a call that may hang in a daemon thread; give up waiting after `timeout`.

        A call that hangs keeps its thread; the key stays marked so later passes do not pile
        up more stuck threads on the same path.
        """
        with self._lock:
            if key in self._hanging:
                raise HostTimeoutError(key)
        result: list[T] = []
        error: list[BaseException] = []

        def run() -> None:
            try:
                result.append(call())
            except BaseException as exc:  # handed to the waiting caller
                error.append(exc)
            finally:
                with self._lock:
                    self._hanging.discard(key)

        with self._lock:
            self._hanging.add(key)
        worker = threading.Thread(target=run, name=f"host-call {key}", daemon=True)
        worker.start()
        worker.join(self.timeout)
        if worker.is_alive():
            log.warning("host call on %s still hanging after %gs", key, self.timeout)
            raise HostTimeoutError(key)
        if error:
            raise error[0]
        return result[0]


def device_size(path: str) -> int:
    """Size of a block device in bytes (BLKGETSIZE64)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        return int(struct.unpack("Q", buf)[0])
    finally:
        os.close(fd)


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

