"""udev block device events (add, remove, change) as wake-ups, through pyudev.

Only wake-ups: a new device behind an existing symlink, a disk pulled out. In a pod the events
arrive only with `hostNetwork: true` (udevd multicasts in the host's network namespace) and
`/run/udev` mounted; without them this source is simply quiet, and the mount table and inotify
sources still see new mounts and entries.

With `dirs` (the discovery directories), an event wakes the loop only when it concerns a
device discovery can see (`DeviceInterest`, read from the host when the event arrives: after
udev has updated its links): a kubelet attaching a cloud volume to a pod costs no pass.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import select
import socket
import stat
import threading
from collections.abc import Callable, Iterable
from typing import Any

from agent.sources import Source, Waker
from agent.wakeup import DeviceInterest, mounts_within

log = logging.getLogger(__name__)


class UdevSource(Source):
    """A netlink monitor of udev's processed block events, rebuilt after any failure."""

    name = "udev"
    sys_block = "/sys/dev/block"

    def __init__(self, waker: Waker, stop: threading.Event,
                 receive_buffer: int | None = None, *,
                 dirs: Callable[[], Iterable[str]] | None = None,
                 mountinfo: str = "/proc/self/mountinfo") -> None:
        super().__init__(waker, stop)
        self.receive_buffer = receive_buffer
        self.dirs = dirs
        self.mountinfo = mountinfo
        self.ignored = 0  # events about devices discovery cannot see
        self.table_reads = 0  # reads of the mount table for `interest` (tests)
        self.why_unavailable = ""
        # The mounts in the discovery dirs, kept while the kernel flags no change of the mount
        # table (POLLPRI on an open mountinfo): reading the whole table for every udev event
        # of every disk of the host was most of an idle agent's cost on a busy host.
        self._table: tuple[select.poll, io.FileIO] | None = None  # for the source's life
        self._mounted: tuple[list[str], list[tuple[str, str]]] | None = None

    def available(self) -> bool:
        try:
            import pyudev  # noqa: PLC0415  (libudev is loaded here; it may be missing)

            pyudev.Context()
        except (ImportError, OSError) as exc:
            self.why_unavailable = str(exc)
            return False
        return True

    def run(self) -> None:
        import pyudev  # noqa: PLC0415

        monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
        monitor.filter_by("block")
        if self.receive_buffer:
            monitor.set_receive_buffer_size(self.receive_buffer)
        monitor.start()
        try:
            self._follow(monitor)
        finally:
            self.close()

    def _follow(self, monitor: Any) -> None:
        while not self.stop.is_set():
            ready, _, _ = select.select([monitor.fileno()], [], [], 1.0)
            if not ready:
                continue
            try:
                device = monitor.poll(timeout=0)
            except OSError as exc:
                # pyudev reports a socket error from poll() without its errno: ask the socket.
                code = exc.errno or _pending_socket_error(monitor.fileno())
                if code == errno.ENOBUFS:  # the socket overflowed: events were dropped
                    self.waker.failed(self.name, "netlink socket overflow (ENOBUFS)")
                    return  # a fresh monitor, and the loop resyncs
                raise
            if device is None:
                continue
            log.debug("udev: %s %s", device.action, device.device_node)
            if self.dirs is None or self.interest().matters(_numbers(device)):
                self.waker.wake(self.name)
            else:
                self.ignored += 1

    def interest(self) -> DeviceInterest:
        """What the discovery directories hold now, down to device numbers. Only cheap reads:
        the directory listings (types from readdir), links into /dev, device nodes, sysfs and
        the mount table; a mounted entry is never stat'ed (its filesystem may hang)."""
        assert self.dirs is not None
        dirs = sorted({os.path.realpath(d) for d in self.dirs()})
        mounted = self._mounts_within(dirs)
        devices = {dev for dev, _ in mounted}
        devices.update(n for _, source in mounted
                       if source.startswith("/") and (n := _block_number(source)))
        everything = False
        for d in dirs:
            try:
                entries = list(os.scandir(d))
            except OSError:
                continue
            for entry in entries:
                if entry.is_symlink():
                    target = os.path.normpath(os.path.join(d, os.readlink(entry.path)))
                    if not target.startswith("/dev/"):
                        continue  # a directory: seen through the mount table, or excluded
                    number = _block_number(target)
                    everything = everything or number is None  # dangling, or not a device
                    devices.update([number] if number else [])
                elif not entry.is_dir(follow_symlinks=False):
                    devices.update([n] if (n := _block_number(entry.path)) else [])
        devices.update([disk for d in list(devices) if (disk := self._disk_of(d))])
        return DeviceInterest(devices, everything)

    def _mounts_within(self, dirs: list[str]) -> list[tuple[str, str]]:
        """`mounts_within` the current mount table, read again only when it changed."""
        if self._table is None:
            f = open(self.mountinfo, "rb", buffering=0)  # noqa: SIM115 - kept open: the flag
            poller = select.poll()
            poller.register(f.fileno(), select.POLLPRI | select.POLLERR)
            self._table, self._mounted = (poller, f), None
        poller, f = self._table
        if poller.poll(0) or self._mounted is None or self._mounted[0] != dirs:
            f.seek(0)  # the flag is consumed first: a change from now on raises it again
            self.table_reads += 1
            self._mounted = (dirs, mounts_within(f.read(), dirs))
        return self._mounted[1]

    def close(self) -> None:
        """Close the mount table kept open by `interest` (read afresh if asked again)."""
        if self._table is not None:
            self._table[1].close()
            self._table = None

    def _disk_of(self, number: str) -> str | None:
        """The whole disk of a partition (from sysfs), so that both sides of a
        partition table change are seen."""
        try:
            if not os.path.exists(f"{self.sys_block}/{number}/partition"):
                return None
            with open(f"{self.sys_block}/{number}/../dev") as f:
                return f.read().strip()
        except OSError:
            return None


def _numbers(device: Any) -> list[str]:
    """The event's device number and those of its block parents (a partition's disk)."""
    numbers = []
    while device is not None:
        if device.device_number:
            numbers.append(f"{os.major(device.device_number)}:{os.minor(device.device_number)}")
        device = device.find_parent("block")
    return numbers


def _block_number(path: str) -> str | None:
    """"major:minor" of a block device node (links followed), None for anything else."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" if stat.S_ISBLK(st.st_mode) else None


def _pending_socket_error(fd: int) -> int:
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
