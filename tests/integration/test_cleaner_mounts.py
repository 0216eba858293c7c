"""The filesystem cleaner against real mounts inside a volume (needs root)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from agent.cleaner import CleanError, clean_filesystem
from agent.host import HostReader
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


def test_block_cleaner_refuses_a_device_mounted_in_another_namespace(tmp_path: Path) -> None:
    """The agent cannot see mounts of other mount namespaces in its mount table; the
    kernel's exclusive-open check still catches them before anything is wiped."""
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    from agent.cleaner import Cleaner, CleanJob  # noqa: PLC0415
    from devkit.disks import disks  # noqa: PLC0415

    require(os.geteuid() == 0, "loop devices and namespaces need root")
    with disks(tmp_path) as d:
        device = d.loop("other-ns", size_mib=16, fs="ext4")
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"mount {device} {elsewhere} && echo mounted && sleep 60"],
            stdout=subprocess.PIPE, text=True, start_new_session=True)
        try:
            assert holder.stdout is not None and holder.stdout.readline().strip() == "mounted"
            assert not os.path.ismount(elsewhere)  # invisible from here
            mount_dir = tmp_path / "block"
            mount_dir.mkdir()
            (mount_dir / "disk").symlink_to(device)
            st = os.stat(device)
            before = Path(device).read_bytes()[:1 << 20]
            done = threading.Event()
            reader = HostReader()
            devno = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
            cleaner = Cleaner(on_done=done.set, mountinfo="/proc/self/mountinfo",
                              identify=lambda job: reader.read_identity(job.device))
            cleaner.submit(CleanJob(
                key="/mnt/block/disk", pv_name=None, pv_uid="", class_name="b", mode="Block",
                raw_device=True, container_path=str(mount_dir / "disk"),
                mount_dir=str(mount_dir), device=devno, identity=reader.read_identity(devno),
                command=("/bin/sh", "-c", "dd if=/dev/zero of=$LOCAL_PV_BLKDEVICE bs=1M")))
            assert done.wait(20)
            (outcome,) = cleaner.collect()
            cleaner.shutdown()
            assert not outcome.ok and "in use" in outcome.detail
            assert Path(device).read_bytes()[:1 << 20] == before
        finally:
            os.killpg(holder.pid, signal.SIGKILL)
            holder.wait()
            if holder.stdout is not None:
                holder.stdout.close()


def test_a_queued_clean_finds_the_replacement_disk_and_touches_nothing(tmp_path: Path) -> None:
    """The disk behind a volume is replaced (a new ext4, same device number, same path)
    between the decision and the start of its clean: the identity read from the device
    right before the first byte no longer matches, and nothing is removed."""
    require(os.geteuid() == 0, "loop devices need root")
    import threading  # noqa: PLC0415

    from agent.cleaner import Cleaner, CleanJob  # noqa: PLC0415
    from devkit.disks import disks, sh  # noqa: PLC0415

    with disks(tmp_path) as d:
        device = d.loop("vol", fs="ext4")
        mount_dir = tmp_path / "disks"
        mount = d.mount(device, mount_dir / "vol")
        (mount / "old-tenant").write_text("old")
        st = os.stat(mount)
        devno = f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        reader = HostReader()
        recorded = reader.read_identity(devno)
        assert recorded.get("fs-uuid") == sh("blkid", "-p", "-s", "UUID", "-o", "value", device)
        sh("umount", str(mount))
        sh("mkfs.ext4", "-q", "-F", device)  # the replacement: same major:minor
        d.mount(device, mount)
        (mount / "precious").write_text("the new disk's data")
        done = threading.Event()
        cleaner = Cleaner(on_done=done.set, mountinfo="/proc/self/mountinfo",
                          identify=lambda job: reader.read_identity(job.device))
        cleaner.submit(CleanJob(
            key="/mnt/disks/vol", pv_name=None, pv_uid="", class_name="c", mode="Filesystem",
            raw_device=False, container_path=str(mount), mount_dir=str(mount_dir),
            device=devno, command=("x",), identity=recorded))
        assert done.wait(30)
        (outcome,) = cleaner.collect()
        cleaner.shutdown()
        assert not outcome.ok and outcome.disk_changed, outcome.detail
        assert (mount / "precious").read_text() == "the new disk's data"
