"""The host reader on real mounts and devices (needs root): a mount that never answers costs one
timeout once and never holds up the others; identities are read from the devices themselves
and agree with `blkid -p`."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.config import Config, parse_config
from agent.discovery import HostView, Reason, VolumeState, discover
from agent.host import HostReader
from devkit.disks import Disks, can_make_disks, disks
from devkit.hungfs import HungMount, can_hang
from tests.conftest import require

TIMEOUT = 2.0


def fs_class(mount_dir: Path) -> Config:
    return parse_config({"storageClassMap": {
        "local": {"hostDir": "/mnt/disks", "mountDir": str(mount_dir)}}})


@pytest.fixture
def hung_and_good(tmp_path: Path) -> Iterator[tuple[Path, Disks]]:
    ok, why = can_make_disks()
    require(ok, why)
    ok, why = can_hang()
    require(ok, why)
    mount_dir = tmp_path / "disks"
    mount_dir.mkdir()
    with disks(tmp_path) as d:
        d.tmpfs(mount_dir / "b-good", size_mib=16)
        with HungMount(mount_dir / "a-hung"):  # sorts first: the others come after it
            yield mount_dir, d


def test_a_hung_mount_costs_one_timeout_once(hung_and_good: tuple[Path, Disks]) -> None:
    mount_dir, d = hung_and_good
    config = fs_class(mount_dir)
    reader = HostReader(timeout=TIMEOUT)
    threads_before = len([t for t in threading.enumerate() if t.name == "host-walk"])

    started = time.monotonic()
    snapshot = reader.snapshot(config)
    first = time.monotonic() - started
    facts = {e.name: e for e in snapshot.entries["local"]}
    assert facts["a-hung"].timed_out
    assert facts["a-hung"].error == f"lstat did not answer within {TIMEOUT:g}s"
    assert facts["b-good"].capacity_bytes == 16 << 20
    assert TIMEOUT * 0.9 <= first < TIMEOUT + 3

    started = time.monotonic()
    again = {e.name: e for e in reader.snapshot(config).entries["local"]}
    assert time.monotonic() - started < TIMEOUT / 2  # the hung path is not waited on again
    assert again["a-hung"].timed_out and again["b-good"].capacity_bytes == 16 << 20

    d.tmpfs(mount_dir / "c-new", size_mib=8)
    started = time.monotonic()
    snapshot = reader.snapshot(config)
    assert time.monotonic() - started < TIMEOUT / 2
    keep = frozenset({"/mnt/disks/a-hung"})  # a PV exists on the hung disk
    found = discover(config, snapshot, keep)
    assert sorted(v.entry_name for v in found.volumes) == ["b-good", "c-new"]
    assert [(e.entry_name, e.reason) for e in found.exclusions] == [("a-hung", Reason.TIMEOUT)]
    view = HostView(config, snapshot, found)
    assert view.state("local", "/mnt/disks/a-hung")[0] is VolumeState.UNKNOWN  # never withdrawn
    stuck = [t for t in threading.enumerate() if t.name == "host-walk"]
    assert len(stuck) == threads_before + 1  # one for the one hung path, after three passes


@dataclass
class Device:
    path: str
    devno: str
    image: Path
    blkid: dict[str, str]


def blkid(device: str) -> dict[str, str]:
    out = subprocess.run(["blkid", "-p", "-o", "export", device], capture_output=True,
                         text=True, check=False).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture(scope="module")
def devices(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Device]]:
    ok, why = can_make_disks()
    require(ok, why)
    require(shutil.which("sfdisk") is not None and shutil.which("mkswap") is not None,
            "missing sfdisk or mkswap (Debian packages fdisk, util-linux)")
    work = tmp_path_factory.mktemp("devices")
    with disks(work) as d:
        made = {
            "ext4": d.loop("ext4", fs="ext4"),
            "xfs": d.loop("xfs", size_mib=320, fs="xfs"),
            "swap": d.swap("swap"),
            "gpt": d.partitioned("gpt", "gpt"),
            "dos": d.partitioned("dos", "dos"),
            "empty": d.loop("empty", size_mib=16),
        }
        found = {}
        for name, path in made.items():
            rdev = os.stat(path).st_rdev
            found[name] = Device(path, f"{os.major(rdev)}:{os.minor(rdev)}", work / f"{name}.img",
                                 blkid(path))
        yield found


@pytest.mark.parametrize("kind", ["ext4", "xfs", "swap", "gpt", "dos", "empty"])
def test_identity_read_from_the_device_matches_blkid(devices: dict[str, Device],
                                                     kind: str) -> None:
    device = devices[kind]
    image = os.stat(device.image)
    expected = {
        "fs-uuid": device.blkid.get("UUID", ""), "pt-uuid": device.blkid.get("PTUUID", ""),
        "loop-backing": f"{os.major(image.st_dev)}:{os.minor(image.st_dev)}:{image.st_ino}",
    }
    identity = HostReader(timeout=TIMEOUT).read_identity(device.devno)
    assert {k: identity.get(k, "") for k in expected} == expected
    assert (kind == "empty") == (not device.blkid)
    assert (kind in ("gpt", "dos")) == bool(device.blkid.get("PTUUID"))


def test_raw_devices_what_they_hold_decides_new_offers(devices: dict[str, Device],
                                                       tmp_path: Path) -> None:
    block_dir, fs_dir = tmp_path / "block", tmp_path / "fs"
    block_dir.mkdir()
    fs_dir.mkdir()
    for name in ("ext4", "swap", "gpt", "dos", "empty"):
        (block_dir / name).symlink_to(devices[name].path)
    (fs_dir / "raw-xfs").symlink_to(devices["xfs"].path)
    (fs_dir / "raw-gpt").symlink_to(devices["gpt"].path)
    config = parse_config({"storageClassMap": {
        "blk": {"hostDir": "/mnt/block", "mountDir": str(block_dir), "volumeMode": "Block"},
        "fs": {"hostDir": "/mnt/fs", "mountDir": str(fs_dir)},
    }})
    snapshot = HostReader(timeout=TIMEOUT).snapshot(config)
    facts = {e.name: e for e in snapshot.entries["blk"]}
    assert (facts["ext4"].signatures, facts["gpt"].partition_table) == (("ext4",), "gpt")
    assert (facts["swap"].signatures, facts["dos"].partition_table) == (("swap",), "dos")
    assert facts["gpt"].partitions == ()  # the kernel did not parse it; the device was read

    found = discover(config, snapshot)
    assert sorted(v.host_path for v in found.volumes) == ["/mnt/block/empty", "/mnt/fs/raw-xfs"]
    assert {e.entry_name: e.reason for e in found.exclusions} == {
        "ext4": Reason.HAS_SIGNATURE, "swap": Reason.HAS_SIGNATURE, "gpt": Reason.PARTITIONED,
        "dos": Reason.PARTITIONED, "raw-gpt": Reason.PARTITIONED}
    by_path = {v.host_path: v for v in found.volumes}
    assert set(by_path["/mnt/block/empty"].identity) == {"loop-backing"}
    assert by_path["/mnt/fs/raw-xfs"].identity["fs-uuid"] == devices["xfs"].blkid["UUID"]

    established = frozenset({"/mnt/block/ext4", "/mnt/block/gpt", "/mnt/block/swap"})
    kept = discover(config, snapshot, keep=established)  # a tenant wrote these: still volumes
    assert established <= {v.host_path for v in kept.volumes}


def test_the_device_wins_over_stale_udev_data(devices: dict[str, Device], tmp_path: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    device = devices["ext4"]
    udev = tmp_path / "udev"
    udev.mkdir()
    (udev / f"b{device.devno}").write_text(
        "E:ID_FS_UUID=0badc0de-0000-4000-8000-000000000000\nE:ID_SERIAL_SHORT=S-1\n")
    reader = HostReader(udev_data=str(udev), timeout=TIMEOUT)
    with caplog.at_level(logging.WARNING, logger="agent.host"):
        for _ in range(2):
            identity = reader.read_identity(device.devno)
            assert identity["fs-uuid"] == device.blkid["UUID"]
            assert identity["serial"] == "S-1"  # hardware ids still come from udev
    warnings = [r.getMessage() for r in caplog.records if "udev's database" in r.getMessage()]
    assert len(warnings) == 1 and device.blkid["UUID"] in warnings[0]


def test_a_mounted_filesystem_is_known_by_the_uuid_on_its_device(devices: dict[str, Device],
                                                                  tmp_path: Path) -> None:
    mount_dir = tmp_path / "disks"
    mount_dir.mkdir()
    with disks(tmp_path) as d:
        d.mount(devices["xfs"].path, mount_dir / "vol")
        snapshot = HostReader(udev_data=str(tmp_path / "no-udev"),
                              timeout=TIMEOUT).snapshot(fs_class(mount_dir))
    (facts,) = snapshot.entries["local"]
    assert facts.identity == {"fs-uuid": devices["xfs"].blkid["UUID"]}
