"""The host reader against fixture host paths: a hanging statvfs is time-bounded per entry."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from agent.config import parse_config
from agent.discovery import FileType, Reason, discover
from agent.host import HostReader


def test_hanging_statvfs_excludes_only_that_entry(tmp_path: Path) -> None:
    disks = tmp_path / "disks"
    (disks / "hung").mkdir(parents=True)
    (disks / "fine").mkdir()
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"30 1 0:70 / {disks}/hung rw - nfs server:/export rw\n"
        f"31 1 0:71 / {disks}/fine rw - tmpfs tmpfs rw\n"
    )
    release = threading.Event()

    def capacity(path: str) -> int:
        if path.endswith("hung"):
            release.wait(30)
        return 1 << 30

    reader = HostReader(mountinfo=str(mountinfo), timeout=0.2, capacity_of=capacity)
    config = parse_config({"storageClassMap": {"sc": {"hostDir": "/mnt", "mountDir": str(disks)}}})
    try:
        started = time.monotonic()
        snapshot = reader.snapshot(config)
        first = time.monotonic() - started
        again = reader.snapshot(config)  # the stuck call is not started a second time
        second = time.monotonic() - started - first
    finally:
        release.set()
    found = discover(config, snapshot)
    assert [v.entry_name for v in found.volumes] == ["fine"]
    ((hung_reason, hung_detail),) = [(e.reason, e.detail) for e in found.exclusions]
    assert hung_reason is Reason.TIMEOUT and "0.2s" in hung_detail
    assert first < 5 and second < 0.2
    assert [e.timed_out for e in again.entries["sc"]] == [False, True]


def test_entry_kinds_from_a_real_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dangling").symlink_to(tmp_path / "absent")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    reader = HostReader(mountinfo="/dev/null")
    kinds = {n: reader.entry(str(tmp_path / n), n, {}).file_type
             for n in ("file", "dir", "dangling", "loop")}
    assert kinds == {"file": FileType.OTHER, "dir": FileType.DIRECTORY,
                     "dangling": FileType.BROKEN_LINK, "loop": FileType.BROKEN_LINK}
