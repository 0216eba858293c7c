"""A class's own filesystem cleaner (`fsCleanerCommand`) on a real ext4 loop device (root).

The command runs in place of the built-in cleaner with LOCAL_PV_FS_PATH set, only after the
disk at the path was read again and recognised; the mount point itself stays.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from agent.cleaner import Cleaner, CleanJob, CleanOutcome
from agent.config import parse_config
from agent.host import HostReader
from devkit.disks import Disks, disks, sh
from tests.conftest import require


def _clean(mount: Path, mount_dir: Path, devno: str, identity: dict[str, str],
           command: tuple[str, ...]) -> CleanOutcome:
    reader = HostReader()
    done = threading.Event()
    cleaner = Cleaner(on_done=done.set, mountinfo="/proc/self/mountinfo", timeout=60.0,
                      identify=lambda job: reader.read_identity(job.device))
    try:
        assert cleaner.submit(CleanJob(
            key=f"/mnt/disks/{mount.name}", pv_name=None, pv_uid="", class_name="c",
            mode="Filesystem", raw_device=False, container_path=str(mount),
            mount_dir=str(mount_dir), device=devno, command=("/scripts/quick_reset.sh",),
            identity=identity, fs_command=command))
        assert done.wait(60), "the clean did not finish"
        (outcome,) = cleaner.collect()
        cleaner.release(outcome.job.key)
        return outcome
    finally:
        cleaner.shutdown()


def _volume(d: Disks, tmp_path: Path) -> tuple[Path, Path, str]:
    device = d.loop("vol", fs="ext4")
    mount_dir = tmp_path / "disks"
    mount = d.mount(device, mount_dir / "vol")
    (mount / "tenant" / "deep").mkdir(parents=True)
    (mount / "tenant" / "deep" / "data.bin").write_bytes(os.urandom(1 << 16))
    (mount / "top.txt").write_text("old tenant")
    st = os.stat(mount)
    return mount, mount_dir, f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


def test_the_class_command_empties_the_volume_with_its_path_and_keeps_the_mount(
        tmp_path: Path) -> None:
    require(os.geteuid() == 0, "loop devices need root")
    marker = tmp_path / "marker"
    script = tmp_path / "fsclean.sh"
    script.write_text(
        "#!/bin/sh\nset -e\n"
        f'echo "$LOCAL_PV_FS_PATH $1" > {marker}\n'
        'find "$LOCAL_PV_FS_PATH" -mindepth 1 -delete\n')
    script.chmod(0o755)
    # The command as the config gives it: a list, the executable first.
    (cls,) = parse_config({"storageClassMap": {"c": {
        "hostDir": "/mnt/disks", "mountDir": str(tmp_path / "disks"),
        "fsCleanerCommand": [str(script), "--quick"]}}}).classes
    with disks(tmp_path) as d:
        mount, mount_dir, devno = _volume(d, tmp_path)
        identity = HostReader().read_identity(devno)
        assert identity.get("fs-uuid")
        outcome = _clean(mount, mount_dir, devno, identity, cls.fs_cleaner_command)
        assert outcome.ok, outcome.detail
        assert marker.read_text().split() == [str(mount), "--quick"]
        assert os.listdir(mount) == []  # ext4's lost+found too: `find -delete` took it
        assert os.path.ismount(mount)
        st = os.stat(mount)
        assert f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}" == devno


def test_the_class_command_never_runs_on_a_replacement_disk(tmp_path: Path) -> None:
    """Between the decision and the clean the disk was reformatted (same device number,
    same path): the identity read right before the command differs, so it never starts."""
    require(os.geteuid() == 0, "loop devices need root")
    marker = tmp_path / "marker"
    with disks(tmp_path) as d:
        mount, mount_dir, devno = _volume(d, tmp_path)
        recorded = HostReader().read_identity(devno)
        device = sh("findmnt", "-n", "-o", "SOURCE", str(mount))
        sh("umount", str(mount))
        sh("mkfs.ext4", "-q", "-F", device)
        d.mount(device, mount)
        (mount / "precious").write_text("the new disk's data")
        outcome = _clean(mount, mount_dir, devno, recorded,
                         ("/bin/sh", "-c", f"touch {marker}; rm -rf ./*"))
        assert not outcome.ok and outcome.disk_changed, outcome.detail
        assert not marker.exists()
        assert (mount / "precious").read_text() == "the new disk's data"
