"""udev block device events (add, remove, change) as wake-ups, through pyudev.

Only wake-ups: a new device behind an existing symlink, a disk pulled out. In a pod the events
arrive only with `hostNetwork: true` (udevd multicasts in the host's network namespace) and
`/run/udev` mounted; without them this source is simply quiet, and the mount table and inotify
sources still see new mounts and entries.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading

from agent.sources import Source, Waker

log = logging.getLogger(__name__)


class UdevSource(Source):
    """A netlink monitor of udev's processed block events, rebuilt after any failure."""

    name = "udev"

    def __init__(self, waker: Waker, stop: threading.Event,
                 receive_buffer: int | None = None) -> None:
        super().__init__(waker, stop)
        self.receive_buffer = receive_buffer
        self.why_unavailable = ""

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
            if device is not None:
                log.debug("udev: %s %s", device.action, device.device_node)
                self.waker.wake(self.name)


def _pending_socket_error(fd: int) -> int:
    with socket.socket(fileno=os.dup(fd)) as sock:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
