"""Real disks for tests: loop devices, filesystems and mounts, always cleaned up."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path


def sh(*args: str) -> str:
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


class Disks:
    """Creates loop devices and mounts; `cleanup` undoes all of it in reverse order."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._undo: list[tuple[str, ...]] = []

    def loop(self, name: str, size_mib: int = 64, fs: str | None = None) -> str:
        """A loop device backed by a sparse file, optionally with a fresh filesystem."""
        image = self.workdir / f"{name}.img"
        with image.open("wb") as f:
            f.truncate(size_mib << 20)
        device = sh("losetup", "--find", "--show", str(image))
        self._undo.append(("losetup", "-d", device))
        if fs == "ext4":
            sh("mkfs.ext4", "-q", "-F", device)
        elif fs == "xfs":
            sh("mkfs.xfs", "-q", "-f", device)
        return device

    def partitioned(self, name: str, label: str = "gpt", size_mib: int = 64) -> str:
        """A loop device whose image got a partition table (one 8 MiB partition) before it was
        attached, without partition scanning: the kernel has not parsed the table."""
        image = self.workdir / f"{name}.img"
        with image.open("wb") as f:
            f.truncate(size_mib << 20)
        subprocess.run(["sfdisk", "-q", str(image)], input=f"label: {label}\n,8M\n",
                       check=True, capture_output=True, text=True)
        device = sh("losetup", "--find", "--show", str(image))
        self._undo.append(("losetup", "-d", device))
        return device

    def swap(self, name: str, size_mib: int = 64) -> str:
        """A loop device with a swap signature (never enabled)."""
        device = self.loop(name, size_mib)
        sh("mkswap", "-q", device)
        return device

    def mount(self, source: str, target: Path, fstype: str | None = None,
              options: str | None = None) -> Path:
        target.mkdir(parents=True, exist_ok=True)
        cmd = ["mount"]
        if fstype:
            cmd += ["-t", fstype]
        if options:
            cmd += ["-o", options]
        sh(*cmd, source, str(target))
        self._undo.append(("umount", "-l", str(target)))
        return target

    def tmpfs(self, target: Path, size_mib: int = 16) -> Path:
        return self.mount("tmpfs", target, "tmpfs", f"size={size_mib}m")

    def cleanup(self) -> None:
        for cmd in reversed(self._undo):
            subprocess.run(cmd, check=False, capture_output=True)
        self._undo.clear()


@contextlib.contextmanager
def disks(workdir: Path) -> Iterator[Disks]:
    d = Disks(workdir)
    try:
        yield d
    finally:
        d.cleanup()


def can_make_disks() -> tuple[bool, str]:
    """Whether this process may create loop devices and mounts (root and the tools)."""
    if os.geteuid() != 0:
        return False, "needs root for loop devices and mounts"
    missing = [t for t in ("losetup", "mount", "mkfs.ext4", "mkfs.xfs", "blkid")
               if shutil.which(t) is None]
    if missing:
        return False, f"missing tools: {', '.join(missing)} (run scripts/install-system-deps)"
    if not Path("/dev/loop-control").exists():
        return False, "no /dev/loop-control: loop devices unavailable"
    return True, ""
