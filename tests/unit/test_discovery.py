"""Discovery rules from host facts: every volume kind and every exclusion reason."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from agent.config import parse_config
from agent.discovery import (
    EntryFacts,
    FileType,
    HostSnapshot,
    HostView,
    Mount,
    Reason,
    VolumeState,
    discover,
    mounts_under,
    parse_mountinfo,
    unescape_mount_path,
)

CONFIG = parse_config({"storageClassMap": {
    "fs": {"hostDir": "/mnt/disks", "mountDir": "/d/fs"},
    "raw": {"hostDir": "/mnt/raw", "mountDir": "/d/raw", "volumeMode": "Block"},
    "named": {"hostDir": "/mnt/named", "mountDir": "/d/named", "namePattern": "ssd*,nvme*"},
}})
ROOT = Mount(1, 0, "8:1", "/", "/", "ext4", "/dev/sda1")


def mount(device: str, point: str, root: str = "/") -> Mount:
    return Mount(10, 1, device, root, point, "ext4", "/dev/x")


def directory(name: str, cls: str = "fs", **kw: object) -> EntryFacts:
    return EntryFacts(name, f"/d/{cls}/{name}", FileType.DIRECTORY, **kw)  # type: ignore[arg-type]


def block(name: str, device: str, cls: str = "raw", **kw: object) -> EntryFacts:
    kw.setdefault("identity", {"serial": f"serial-{name}"})
    return EntryFacts(name, f"/d/{cls}/{name}", FileType.BLOCK, device=device,  # type: ignore[arg-type]
                      capacity_bytes=1 << 30, **kw)


def run(entries: dict[str, Sequence[EntryFacts]], mounts: Sequence[Mount] = ()) -> tuple[
        list[str], dict[str, tuple[Reason, str]]]:
    found = discover(CONFIG, HostSnapshot(entries, [ROOT, *mounts]))
    volumes = [f"{v.class_name}/{v.entry_name}" for v in found.volumes]
    excluded = {f"{e.class_name}/{e.entry_name}": (e.reason, e.detail) for e in found.exclusions}
    return volumes, excluded


def test_mount_point_becomes_filesystem_volume() -> None:
    found = discover(CONFIG, HostSnapshot(
        {"fs": [directory("disk1", device="7:0", capacity_bytes=5 << 30,
                          identity={"fs-uuid": "u1"})]},
        [ROOT, mount("7:0", "/d/fs/disk1")]))
    (vol,) = found.volumes
    assert (vol.host_path, vol.mount_path, vol.volume_mode) == (
        "/mnt/disks/disk1", "/d/fs/disk1", "Filesystem")
    assert (vol.device, vol.capacity_bytes, vol.identity) == ("7:0", 5 << 30, {"fs-uuid": "u1"})
    assert not vol.is_block_device and found.exclusions == ()


def test_block_device_in_block_and_filesystem_classes() -> None:
    volumes, excluded = run({
        "raw": [block("by-id-link", "7:1", target="/dev/loop1")],
        "fs": [block("rawdisk", "7:2", cls="fs", target="/dev/loop2")],
    })
    assert volumes == ["fs/rawdisk", "raw/by-id-link"] and excluded == {}
    found = discover(CONFIG, HostSnapshot({"fs": [block("rawdisk", "7:2", cls="fs")]}, [ROOT]))
    assert found.volumes[0].volume_mode == "Filesystem" and found.volumes[0].is_block_device


@pytest.mark.parametrize(("facts", "mounts", "reason", "words"), [
    (directory("plain"), [], Reason.NOT_MOUNT_POINT, "plain directory"),
    (directory("lost+found"), [], Reason.NOT_MOUNT_POINT, "created by mkfs"),
    (EntryFacts("stray", "/d/fs/stray", FileType.OTHER), [], Reason.UNSUPPORTED_TYPE,
     "neither a directory"),
    (EntryFacts("gone", "/d/fs/gone", FileType.BROKEN_LINK, target="/dev/disk/by-id/x"), [],
     Reason.BROKEN_SYMLINK, "/dev/disk/by-id/x"),
    (directory("toroot", target="/"), [], Reason.SYMLINK_ESCAPES, "leaves the discovery"),
    (directory("toother", target="/srv/data"), [mount("7:5", "/srv/data")],
     Reason.SYMLINK_ESCAPES, "/srv/data"),
    (directory("onroot", capacity_bytes=1 << 30), [mount("8:1", "/d/fs/onroot", "/srv")],
     Reason.SYSTEM_DEVICE, "host's /"),
    (EntryFacts("eio", "/d/fs/eio", FileType.UNREADABLE, error="EIO: Input/output error"), [],
     Reason.UNREADABLE, "EIO"),
    (directory("hung", timed_out=True, error="statvfs did not answer within 5s"),
     [mount("0:99", "/d/fs/hung")], Reason.TIMEOUT, "statvfs"),
    (directory("empty", capacity_bytes=0), [mount("0:98", "/d/fs/empty")],
     Reason.ZERO_CAPACITY, "no capacity"),
    (directory("bad\udcffname", capacity_bytes=1), [mount("0:97", "/d/fs/bad\udcffname")],
     Reason.INVALID_NAME, "UTF-8"),
])
def test_exclusions_in_filesystem_class(
    facts: EntryFacts, mounts: list[Mount], reason: Reason, words: str
) -> None:
    volumes, excluded = run({"fs": [facts]}, mounts)
    assert volumes == []
    got_reason, detail = excluded[f"fs/{facts.name}"]
    assert got_reason is reason and words in detail


@pytest.mark.parametrize(("facts", "mounts", "reason", "words"), [
    (directory("adir", cls="raw", capacity_bytes=1), [mount("7:0", "/d/raw/adir")],
     Reason.WRONG_MODE, "volumeMode Block"),
    (block("sys", "8:0", partitions=("8:1",)), [], Reason.SYSTEM_DEVICE, "8:1"),
    (block("busy", "7:4"), [mount("7:4", "/var/lib/data")], Reason.DEVICE_IN_USE,
     "mounted at /var/lib/data"),
    (block("lvm", "7:6", holders=("dm-0",)), [], Reason.DEVICE_IN_USE, "dm-0"),
    (block("parted", "7:7", partitions=("259:1",)), [], Reason.DEVICE_IN_USE, "partition"),
    (EntryFacts("nosize", "/d/raw/nosize", FileType.BLOCK, device="7:8", capacity_bytes=0), [],
     Reason.ZERO_CAPACITY, "no size"),
])
def test_exclusions_in_block_class(
    facts: EntryFacts, mounts: list[Mount], reason: Reason, words: str
) -> None:
    volumes, excluded = run({"raw": [facts]}, mounts)
    assert volumes == []
    got_reason, detail = excluded[f"raw/{facts.name}"]
    assert got_reason is reason and words in detail


def test_one_disk_one_pv_across_entries_and_classes() -> None:
    volumes, excluded = run(
        {
            "fs": [
                directory("a", capacity_bytes=1 << 30),
                directory("b", capacity_bytes=1 << 30),  # same fs as a
                directory("link-to-a", target="/d/fs/a", capacity_bytes=1 << 30),
            ],
            "raw": [block("dev-of-a", "7:0")],  # the raw device under fs/a, claimed first
        },
        [mount("7:0", "/d/fs/a"), mount("7:0", "/d/fs/b")],
    )
    assert volumes == ["fs/a"]
    assert {k: r for k, (r, _) in excluded.items()} == {
        "fs/b": Reason.DUPLICATE,
        "fs/link-to-a": Reason.DUPLICATE,
        "raw/dev-of-a": Reason.DUPLICATE,
    }
    assert "same disk as fs/a" in excluded["fs/b"][1]


def test_disjoint_bind_mounts_of_one_filesystem_are_separate_volumes() -> None:
    volumes, excluded = run(
        {"fs": [directory(n, capacity_bytes=1 << 30) for n in ("v1", "v2", "v1-sub")]},
        [mount("7:0", "/d/fs/v1", "/vols/v1"), mount("7:0", "/d/fs/v2", "/vols/v2"),
         mount("7:0", "/d/fs/v1-sub", "/vols/v1/inner")],
    )
    assert volumes == ["fs/v1", "fs/v2"]
    assert excluded["fs/v1-sub"][0] is Reason.DUPLICATE


def test_name_pattern_filters_silently_and_order_is_stable() -> None:
    entries = {"named": [directory(n, cls="named", capacity_bytes=1) for n in
                         ("sda", "ssd2", "nvme0", "ssd1")]}
    mounts = [mount(f"0:{i}", f"/d/named/{n}") for i, n in enumerate(("sda", "ssd2", "nvme0",
                                                                        "ssd1"))]
    volumes, excluded = run(entries, mounts)
    assert volumes == ["named/nvme0", "named/ssd1", "named/ssd2"] and excluded == {}


def test_class_with_unreadable_dir_yields_nothing_but_others_work() -> None:
    snapshot = HostSnapshot({"fs": [directory("a", capacity_bytes=1)]},
                            [ROOT, mount("0:50", "/d/fs/a")],
                            dir_errors={"raw": "cannot read /d/raw: Permission denied"})
    assert [v.entry_name for v in discover(CONFIG, snapshot).volumes] == ["a"]


MOUNTINFO = (
    "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
    "40 22 7:0 / /mnt/disks/with\\040space rw shared:5 - ext4 /dev/loop0 rw\n"
    "41 22 7:1 /sub /mnt/disks/new\\012line rw - xfs /dev/loop1 rw\n"
    "42 22 0:50 / /mnt/disks/back\\134slash rw master:3 unbindable - tmpfs tmp\\040fs rw\n"
    "43 22 0:51 / /mnt/disks/caf\\303\\251 rw - tmpfs tmpfs rw\n"
    "garbage line\n"
)


def test_parse_mountinfo_with_escapes_and_optional_fields() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert [m.mount_point for m in mounts] == [
        "/", "/mnt/disks/with space", "/mnt/disks/new\nline", "/mnt/disks/back\\slash",
        "/mnt/disks/café",
    ]
    assert mounts[2].root == "/sub" and mounts[2].fs_type == "xfs"
    assert mounts[3].fs_type == "tmpfs" and mounts[3].source == "tmp fs"
    assert (mounts[1].mount_id, mounts[1].parent_id, mounts[1].device) == (40, 22, "7:0")


@pytest.mark.parametrize(("raw", "decoded"), [
    ("plain", "plain"), ("a\\040b", "a b"), ("a\\011b", "a\tb"), ("tail\\", "tail\\"),
    ("\\37x", "\\37x"), ("\\377", "\udcff"),
])
def test_unescape(raw: str, decoded: str) -> None:
    assert unescape_mount_path(raw) == decoded


def test_block_device_mounted_under_an_anonymous_device_number_is_in_use() -> None:
    """btrfs shows 0:N in mountinfo; the mount's source node still names the disk."""
    btrfs = Mount(20, 1, "0:45", "/", "/srv", "btrfs", "/dev/sdb")
    found = discover(CONFIG, HostSnapshot({"raw": [block("sdb-link", "8:16")]}, [ROOT, btrfs],
                                          mount_sources={"/srv": "8:16"}))
    assert found.volumes == ()
    assert found.exclusions[0].reason is Reason.DEVICE_IN_USE
    assert "mounted at /srv" in found.exclusions[0].detail


@pytest.mark.parametrize("fs_type", ["devtmpfs", "proc", "sysfs", "cgroup2", "debugfs",
                                     "hugetlbfs", "autofs", "efivarfs", "rpc_pipefs"])
def test_system_filesystems_are_never_volumes(fs_type: str) -> None:
    volumes, excluded = run({"fs": [directory("sys", device="0:60", capacity_bytes=1 << 30)]},
                            [Mount(10, 1, "0:60", "/", "/d/fs/sys", fs_type, "none")])
    assert volumes == []
    assert excluded["fs/sys"][0] is Reason.SYSTEM_FILESYSTEM
    assert fs_type in excluded["fs/sys"][1]


def test_tmpfs_and_a_foreign_overlay_are_volumes_the_roots_overlay_is_not() -> None:
    root = Mount(1, 0, "0:30", "/", "/", "overlay", "overlay")
    found = discover(CONFIG, HostSnapshot(
        {"fs": [directory(n, capacity_bytes=1 << 30) for n in ("tmp", "other", "rootfs")]},
        [root, Mount(10, 1, "0:61", "/", "/d/fs/tmp", "tmpfs", "tmpfs"),
         Mount(11, 1, "0:62", "/", "/d/fs/other", "overlay", "overlay"),
         Mount(12, 1, "0:30", "/", "/d/fs/rootfs", "overlay", "overlay")]))
    assert [v.entry_name for v in found.volumes] == ["other", "tmp"]
    assert [(e.entry_name, e.reason) for e in found.exclusions] == [
        ("rootfs", Reason.SYSTEM_FILESYSTEM)]


SIGNED = {
    "gpt": block("gpt", "7:20", partition_table="gpt"),
    "mbr": block("mbr", "7:21", partition_table="dos"),
    "ext4": block("ext4", "7:22", signatures=("ext4",)),
    "lvm": block("lvm", "7:23", signatures=("LVM2_member",)),
    "luks": block("luks", "7:24", signatures=("crypto_LUKS",)),
    "empty": block("empty", "7:25"),
}


def test_new_raw_devices_must_not_be_partitioned_nor_hold_anything_in_a_block_class() -> None:
    volumes, excluded = run({"raw": list(SIGNED.values())})
    assert volumes == ["raw/empty"]
    assert {k: r for k, (r, _) in excluded.items()} == {
        "raw/gpt": Reason.PARTITIONED, "raw/mbr": Reason.PARTITIONED,
        "raw/ext4": Reason.HAS_SIGNATURE, "raw/lvm": Reason.HAS_SIGNATURE,
        "raw/luks": Reason.HAS_SIGNATURE,
    }
    assert "gpt partition table" in excluded["raw/gpt"][1]
    assert "LVM2_member" in excluded["raw/lvm"][1]


def test_a_filesystem_class_offers_a_formatted_device_never_a_partitioned_one() -> None:
    volumes, excluded = run({"fs": [block("ext4", "7:22", cls="fs", signatures=("ext4",)),
                                    block("gpt", "7:20", cls="fs", partition_table="gpt")]})
    assert volumes == ["fs/ext4"]
    assert excluded["fs/gpt"][0] is Reason.PARTITIONED


@pytest.mark.parametrize("established", ["keep", "dirty"])
def test_established_volumes_stay_volumes_whatever_a_tenant_wrote(established: str) -> None:
    paths = frozenset(f"/mnt/raw/{n}" for n in SIGNED)
    found = discover(CONFIG, HostSnapshot({"raw": list(SIGNED.values())}, [ROOT]),
                     **{established: paths})  # type: ignore[arg-type]
    assert sorted(v.entry_name for v in found.volumes) == sorted(SIGNED)
    assert found.exclusions == ()


def test_a_device_nothing_identifies_is_never_a_volume_and_its_pv_is_left_alone() -> None:
    anonymous = block("anon", "8:32", identity={"fs-uuid": "only-content"})
    snapshot = HostSnapshot({"raw": [anonymous, block("known", "8:48")]}, [ROOT])
    found = discover(CONFIG, snapshot, keep=frozenset({"/mnt/raw/anon"}))
    assert [v.entry_name for v in found.volumes] == ["known"]
    (excluded,) = found.exclusions
    assert excluded.reason is Reason.NO_IDENTITY and "WWN" in excluded.detail
    view = HostView(CONFIG, snapshot, found)
    assert view.state("raw", "/mnt/raw/anon")[0] is VolumeState.UNKNOWN


def test_a_hung_entry_of_an_existing_pv_is_unknown_never_gone() -> None:
    hung = EntryFacts("slow", "/d/fs/slow", FileType.UNREADABLE, timed_out=True,
                      error="lstat did not answer within 5s")
    snapshot = HostSnapshot({"fs": [hung], "raw": []}, [ROOT],
                            dir_errors={"named": "cannot read /d/named: listing the directory "
                                                 "did not answer within 5s"})
    found = discover(CONFIG, snapshot, keep=frozenset({"/mnt/disks/slow"}))
    assert [(e.reason, e.detail) for e in found.exclusions] == [
        (Reason.TIMEOUT, "lstat did not answer within 5s")]
    view = HostView(CONFIG, snapshot, found)
    assert view.state("fs", "/mnt/disks/slow")[0] is VolumeState.UNKNOWN
    assert view.state("named", "/mnt/named/ssd1")[0] is VolumeState.UNKNOWN  # dir hung
    assert view.state("raw", "/mnt/raw/gone")[0] is VolumeState.GONE  # read: really not there


def test_a_dirty_volume_wins_its_disk_over_a_new_alias() -> None:
    found = discover(CONFIG, HostSnapshot(
        {"raw": [block("a-alias", "7:30"), block("b-dirty", "7:30")]}, [ROOT]),
        dirty=frozenset({"/mnt/raw/b-dirty"}))
    assert [v.entry_name for v in found.volumes] == ["b-dirty"]
    assert found.exclusions[0].reason is Reason.DUPLICATE


def test_mounts_under_a_volume_are_those_strictly_inside_it() -> None:
    mounts = [ROOT, mount("8:2", "/d/fs/vol"), mount("8:3", "/d/fs/vol/a"),
              mount("8:4", "/d/fs/vol/a/b"), mount("8:5", "/d/fs/volume2")]
    assert mounts_under(mounts, "/d/fs/vol") == ("/d/fs/vol/a", "/d/fs/vol/a/b")
    assert mounts_under(mounts, "/d/fs/vol/") == ("/d/fs/vol/a", "/d/fs/vol/a/b")
    assert mounts_under([ROOT, mount("8:2", "/d")], "/") == ("/d",)
