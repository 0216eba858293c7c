"""The filesystem cleaner against real mounts inside a volume (needs root)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agent.cleaner import CleanError, clean_filesystem
from tests.conftest import require


def test_bind_mount_of_the_same_filesystem_is_not_entered(tmp_path: Path) -> None:
    """A bind mount inside the volume shares its st_dev: it is found by the directory
    entry's inode differing from the mounted root's, and left alone."""
    require(os.geteuid() == 0, "bind mounts need root")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    root = tmp_path / "vol"
    (root / "bind").mkdir(parents=True)
    subprocess.run(["mount", "--bind", str(outside), str(root / "bind")], check=True)
    try:
        with pytest.raises(CleanError, match="nested mount"):
            clean_filesystem(str(root), os.stat(root).st_dev)
        assert (outside / "keep.txt").exists()
    finally:
        subprocess.run(["umount", str(root / "bind")], check=True)


def test_read_only_volume_fails_once_per_entry_not_per_rescan(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "mounts need root")
    root = tmp_path / "vol"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(root)], check=True)
    try:
        for d in range(20):
            (root / f"d{d}").mkdir()
            (root / f"f{d}").write_text("x")
        subprocess.run(["mount", "-o", "remount,ro", str(root)], check=True)
        with pytest.raises(CleanError, match=r"and 35 more"):  # 20 files + 20 dirs, once each
            clean_filesystem(str(root), os.stat(root).st_dev)
    finally:
        subprocess.run(["umount", str(root)], check=True)
