"""The host reader against fixture host paths: every entry, directory and device read is
time-bounded, a hung one never holds up the rest, and hung calls are never piled up."""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import parse_config
from agent.discovery import FileType, Reason, discover
from agent.host import (
    LOOP_INFO64,
    HostReader,
    HostTimeoutError,
    SnapshotInterrupted,
    compose_identity,
    loop_backing,
)


def fixture_disks(tmp_path: Path, lines: dict[str, str]) -> tuple[Path, Path]:
    """A discovery dir whose entries the mountinfo fixture says are mounts of the given type."""
    disks = tmp_path / "disks"
    disks.mkdir()
    mountinfo = tmp_path / "mountinfo"
    text = ""
    for i, (name, fs_type) in enumerate(lines.items()):
        (disks / name).mkdir()
        dev = (disks / name).stat().st_dev  # the reader checks the mount point still holds it
        devno = f"{os.major(dev)}:{os.minor(dev)}"
        text += f"{30 + i} 1 {devno} / {disks}/{name} rw - {fs_type} src rw\n"
    mountinfo.write_text(text)
    return disks, mountinfo


def one_class(disks: Path) -> object:
    return parse_config({"storageClassMap": {"sc": {"hostDir": "/mnt", "mountDir": str(disks)}}})


@contextlib.contextmanager
def released(event: threading.Event) -> Iterator[threading.Event]:
    try:
        yield event
    finally:
        event.set()


def test_hanging_statvfs_excludes_only_that_entry(tmp_path: Path) -> None:
    disks, mountinfo = fixture_disks(tmp_path, {"hung": "nfs", "fine": "tmpfs"})

    def capacity(path: str) -> int:
        if path.endswith("hung"):
            release.wait(30)
        return 1 << 30

    reader = HostReader(mountinfo=str(mountinfo), timeout=0.2, capacity_of=capacity)
    config = one_class(disks)
    with released(threading.Event()) as release:
        started = time.monotonic()
        snapshot = reader.snapshot(config)  # type: ignore[arg-type]
        first = time.monotonic() - started
        again = reader.snapshot(config)  # type: ignore[arg-type]
        second = time.monotonic() - started - first
    found = discover(config, snapshot)  # type: ignore[arg-type]
    assert [v.entry_name for v in found.volumes] == ["fine"]
    ((hung_reason, hung_detail),) = [(e.reason, e.detail) for e in found.exclusions]
    assert hung_reason is Reason.TIMEOUT and hung_detail == "statvfs did not answer within 0.2s"
    assert first < 5 and second < 0.2
    assert [e.timed_out for e in again.entries["sc"]] == [False, True]
    assert "has not answered since an earlier pass" in (again.entries["sc"][1].error or "")


def test_an_interrupted_snapshot_reads_no_entry_after_the_interruption(tmp_path: Path) -> None:
    disks, mountinfo = fixture_disks(tmp_path, {"a": "tmpfs", "b": "tmpfs", "c": "tmpfs"})
    measured: list[str] = []

    def capacity(path: str) -> int:
        measured.append(os.path.basename(path))
        return 1 << 30

    reader = HostReader(mountinfo=str(mountinfo), timeout=1.0, capacity_of=capacity)
    config = one_class(disks)
    with pytest.raises(SnapshotInterrupted):
        reader.snapshot(config, lambda: bool(measured))  # type: ignore[arg-type]
    assert measured == ["a"]
    measured.clear()
    snapshot = reader.snapshot(config, lambda: False)  # type: ignore[arg-type]
    assert measured == ["a", "b", "c"] and len(snapshot.entries["sc"]) == 3


def test_a_hung_entry_hands_the_rest_of_the_pass_to_a_new_worker(tmp_path: Path) -> None:
    disks, mountinfo = fixture_disks(tmp_path, {"a-hung": "nfs", "b": "tmpfs", "c": "tmpfs"})
    seen: dict[str, float] = {}

    def capacity(path: str) -> int:
        seen[os.path.basename(path)] = time.monotonic()
        if path.endswith("hung"):
            release.wait(30)
        return 1 << 30

    reader = HostReader(mountinfo=str(mountinfo), timeout=3.0, capacity_of=capacity)
    with released(threading.Event()) as release:
        started = time.monotonic()
        snapshot = reader.snapshot(one_class(disks))  # type: ignore[arg-type]
        took = time.monotonic() - started
    assert seen["b"] - started < 1.5 and seen["c"] - started < 1.5  # not after the timeout
    assert took < 3.0 + 2  # the pass waits for the timeout once, not once per entry
    assert [(e.name, e.timed_out, e.capacity_bytes) for e in snapshot.entries["sc"]] == [
        ("a-hung", True, None), ("b", False, 1 << 30), ("c", False, 1 << 30)]


def test_one_stuck_thread_per_hung_path_and_a_recovered_path_is_read_again(
    tmp_path: Path,
) -> None:
    disks, mountinfo = fixture_disks(tmp_path, {"hung": "nfs"})
    calls = 0

    def capacity(path: str) -> int:
        nonlocal calls
        calls += 1
        release.wait(30)
        return 1 << 20

    reader = HostReader(mountinfo=str(mountinfo), timeout=0.1, capacity_of=capacity)
    config = one_class(disks)
    with released(threading.Event()) as release:
        for _ in range(5):
            (facts,) = reader.snapshot(config).entries["sc"]  # type: ignore[arg-type]
            assert facts.timed_out
    assert calls == 1
    deadline = time.monotonic() + 5
    while reader.snapshot(config).entries["sc"][0].timed_out:  # type: ignore[arg-type]
        assert time.monotonic() < deadline, "the recovered path was never read again"
        time.sleep(0.05)
    assert calls == 2


def test_a_hung_discovery_directory_is_a_directory_error_of_its_class_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    disks, mountinfo = fixture_disks(tmp_path, {"ok": "tmpfs"})
    stuck = tmp_path / "stuck"
    stuck.mkdir()
    real_listdir = os.listdir

    def listdir(path: str) -> list[str]:
        if str(path) == str(stuck):
            release.wait(30)
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    config = parse_config({"storageClassMap": {
        "good": {"hostDir": "/mnt/good", "mountDir": str(disks)},
        "bad": {"hostDir": "/mnt/bad", "mountDir": str(stuck)},
    }})
    reader = HostReader(mountinfo=str(mountinfo), timeout=0.2, capacity_of=lambda _: 1 << 20)
    with released(threading.Event()) as release:
        snapshot = reader.snapshot(config)
    assert snapshot.dir_errors == {
        "bad": f"cannot read {stuck}: listing the directory did not answer within 0.2s"}
    assert [e.name for e in snapshot.entries["good"]] == ["ok"]


def test_a_mount_table_that_does_not_answer_fails_the_pass(tmp_path: Path) -> None:
    fifo = tmp_path / "mountinfo"
    os.mkfifo(fifo)  # opening it blocks until a writer comes: a real hang
    reader = HostReader(mountinfo=str(fifo), timeout=0.2)
    config = one_class(tmp_path)
    try:
        for _ in range(2):
            with pytest.raises(HostTimeoutError, match="mount table") as caught:
                reader.snapshot(config)  # type: ignore[arg-type]
            assert isinstance(caught.value, OSError)  # the loop's OSError handling covers it
    finally:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # lets the stuck open return


def test_read_identity_is_bounded_and_never_piles_up(tmp_path: Path) -> None:
    sys_block, dev = tmp_path / "sys", tmp_path / "dev"
    (sys_block / "7:9").mkdir(parents=True)
    (sys_block / "7:9" / "uevent").write_text("MAJOR=7\nMINOR=9\nDEVNAME=loop9\n")
    dev.mkdir()
    os.mkfifo(dev / "loop9")  # a "device" whose open never returns
    reader = HostReader(sys_block=str(sys_block), dev_dir=str(dev), timeout=0.2)
    try:
        started = time.monotonic()
        with pytest.raises(HostTimeoutError, match="opening the device did not answer"):
            reader.read_identity("7:9")
        assert time.monotonic() - started < 2
        started = time.monotonic()
        with pytest.raises(HostTimeoutError, match="since an earlier pass"):
            reader.read_identity("7:9")
        assert time.monotonic() - started < 0.1
    finally:
        os.close(os.open(dev / "loop9", os.O_WRONLY | os.O_NONBLOCK))


def test_read_identity_of_what_is_no_readable_block_device_is_empty(tmp_path: Path) -> None:
    sys_block, dev = tmp_path / "sys", tmp_path / "dev"
    (sys_block / "8:0").mkdir(parents=True)
    (sys_block / "8:0" / "uevent").write_text("DEVNAME=sda\n")
    dev.mkdir()
    (dev / "sda").write_bytes(b"XFSB" + bytes(4096))  # a regular file is not the device 8:0
    reader = HostReader(sys_block=str(sys_block), dev_dir=str(dev), timeout=1)
    assert reader.read_identity("8:0") == {}
    assert reader.read_identity("8:16") == {}  # no such device here


def test_system_filesystems_are_not_even_measured(tmp_path: Path) -> None:
    disks, mountinfo = fixture_disks(tmp_path, {"auto": "autofs", "dev": "devtmpfs"})

    def capacity(path: str) -> int:
        raise AssertionError(f"statvfs of {path} (an automount would trigger)")

    reader = HostReader(mountinfo=str(mountinfo), timeout=1, capacity_of=capacity)
    config = one_class(disks)
    found = discover(config, reader.snapshot(config))  # type: ignore[arg-type]
    assert {e.entry_name: e.reason for e in found.exclusions} == {
        "auto": Reason.SYSTEM_FILESYSTEM, "dev": Reason.SYSTEM_FILESYSTEM}


def test_entry_kinds_from_a_real_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "absent")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    reader = HostReader(mountinfo="/dev/null")
    kinds = {n: reader.entry(str(tmp_path / n), n, {}).file_type
             for n in ("file", "dir", "dangling", "loop", "absent")}
    assert kinds == {"file": FileType.OTHER, "dir": FileType.DIRECTORY,
                     "dangling": FileType.BROKEN_LINK, "loop": FileType.BROKEN_LINK,
                     "absent": FileType.UNREADABLE}


def loop_info(device: int, inode: int, offset: int = 0, sizelimit: int = 0) -> bytes:
    return LOOP_INFO64.pack(device, inode, 0, offset, sizelimit, 0, 0, 0, 0, b"/img", b"",
                            b"", 0, 0)


def test_loop_backing_names_the_backing_files_device_and_inode() -> None:
    assert LOOP_INFO64.size == 232  # sizeof(struct loop_info64)
    dev = os.makedev(259, 3)
    assert loop_backing(loop_info(dev, 1234)) == "259:3:1234"
    assert loop_backing(loop_info(dev, 1234, offset=1 << 20, sizelimit=4096)) == \
        "259:3:1234@1048576+4096"
    # the kernel encodes lo_device as new_encode_dev: minors above 255 split around the major
    big_minor = (0x345 & 0xFF) | (8 << 8) | ((0x345 & ~0xFF) << 12)
    assert loop_backing(struct.pack("=QQ", big_minor, 7) + bytes(216)) == "8:837:7"


def test_compose_identity_keeps_only_known_values() -> None:
    udev = {"ID_WWN": "0x5000c500a1b2c3d4", "ID_WWN_WITH_EXTENSION": "0x5000c500a1b2c3d4ext",
            "ID_SERIAL": "Vendor_Model_S123", "ID_SERIAL_SHORT": "S123"}
    assert compose_identity(udev, ["wwn-0x5000c500a1b2c3d4", "ata-x"], "u-1", "", "7:0:12") == {
        "fs-uuid": "u-1", "wwn": "0x5000c500a1b2c3d4ext", "serial": "S123",
        "device-id": "wwn-0x5000c500a1b2c3d4", "loop-backing": "7:0:12"}
    assert compose_identity({}, [], "", "", "") == {}
