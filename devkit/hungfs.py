"""A mount that never answers: FUSE with no daemon reading /dev/fuse.

Every call that reaches it (lstat, statvfs, open) waits in the kernel, exactly like a dead
disk or an NFS server gone away; the thread that made it cannot be interrupted. `release()`
aborts the connection (every waiting call then fails with ENOTCONN) and detaches the mount.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path
from types import TracebackType

from agent.discovery import parse_mountinfo

MNT_DETACH = 2
FUSECTL = Path("/sys/fs/fuse/connections")


def can_hang() -> tuple[bool, str]:
    """Whether this process may make a hung FUSE mount (root and /dev/fuse)."""
    if os.geteuid() != 0:
        return False, "needs root to mount"
    if not Path("/dev/fuse").exists():
        return False, "no /dev/fuse (modprobe fuse)"
    return True, ""


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class HungMount:
    """`with HungMount(path):` a FUSE mount at `path` that hangs every call made on it."""

    def __init__(self, target: Path) -> None:
        self.target = target
        self.fd: int | None = None
        self.device = ""  # "0:N" from mountinfo; N names the connection in fusectl

    def __enter__(self) -> Path:
        self.target.mkdir(parents=True, exist_ok=True)
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        options = f"fd={self.fd},rootmode=40000,user_id=0,group_id=0,allow_other"
        # mount(2) itself, as `mount -i -t fuse -o <options> hung <path>` would do
        if _libc().mount(b"hung", os.fsencode(self.target), b"fuse", 0, options.encode()) != 0:
            err = ctypes.get_errno()
            os.close(self.fd)
            self.fd = None
            raise OSError(err, f"mounting FUSE at {self.target}: {os.strerror(err)}")
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            mounts = [m for m in parse_mountinfo(f.read()) if m.mount_point == str(self.target)]
        self.device = mounts[-1].device if mounts else ""
        return self.target

    def release(self) -> None:
        """Abort the connection, so every call stuck on it returns, and detach the mount."""
        if self.fd is None:
            return
        abort = FUSECTL / self.device.split(":")[-1] / "abort"
        if self.device and abort.exists():
            abort.write_text("1")
        os.close(self.fd)  # the last reference to the device: the kernel aborts the connection
        self.fd = None
        _libc().umount2(os.fsencode(self.target), MNT_DETACH)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
