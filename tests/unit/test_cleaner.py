"""The filesystem cleaner on a plain directory tree: nothing followed, everything removed."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from agent.cleaner import CleanError, capacity_breakdown, clean_filesystem


def test_removes_everything_inside_and_follows_no_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    root = tmp_path / "vol"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "file").write_text("x")
    (root / "link-out").symlink_to(outside)
    (root / "a" / "link-file").symlink_to(outside / "keep")
    (root / "line\nbreak").write_text("x")
    os.mkfifo(root / "fifo")
    report = clean_filesystem(str(root), os.stat(root).st_dev)
    assert os.listdir(root) == []
    assert (outside / "keep").read_text() == "x"
    assert (report.files, report.dirs) == (5, 2)


def test_deep_tree_beyond_path_max(tmp_path: Path) -> None:
    root = tmp_path / "vol"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    for _ in range(3000):  # 3000 * "/d" is past PATH_MAX (4096)
        os.mkdir("dd", dir_fd=fd)
        nxt = os.open("dd", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    os.close(fd)
    assert clean_filesystem(str(root), os.stat(root).st_dev).dirs == 3000
    assert os.listdir(root) == []


def test_refuses_another_device_and_reports_skipped_mounts(tmp_path: Path) -> None:
    root = tmp_path / "vol"
    (root / "inner").mkdir(parents=True)
    (root / "inner" / "data").write_text("x")
    with pytest.raises(CleanError, match="not the expected filesystem"):
        clean_filesystem(str(root), os.stat(root).st_dev + 1)
    with pytest.raises(CleanError, match=r"nested mount .*inner"):
        clean_filesystem(str(root), os.stat(root).st_dev, skip=[str(root / "inner")])
    assert (root / "inner" / "data").exists()


@pytest.mark.parametrize(("size", "label"), [(0, "0G"), (1, "500G"), (500 << 30, "500G"),
                                             ((500 << 30) + 1, "1000G")])
def test_capacity_breakdown_like_upstream(size: int, label: str) -> None:
    assert capacity_breakdown(size) == label


def test_a_stop_request_ends_the_clean_before_touching_anything(tmp_path: Path) -> None:
    root = tmp_path / "vol"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("x")
    stop = threading.Event()
    stop.set()
    with pytest.raises(CleanError, match="stopping"):
        clean_filesystem(str(root), os.stat(root).st_dev, stop=stop)
    assert (root / "d" / "f").exists()


def test_a_finished_clean_counts_as_running_until_collected(tmp_path: Path) -> None:
    """Otherwise a pass between the end of a clean and its collection would start another."""
    from agent.cleaner import Cleaner, CleanJob  # noqa: PLC0415

    volume = tmp_path / "disks" / "vol"
    volume.mkdir(parents=True)
    (volume / "data").write_text("x")
    st = os.stat(volume)
    done = threading.Event()
    cleaner = Cleaner(concurrency=1, on_done=done.set, mountinfo="/dev/null")
    job = CleanJob(key="/mnt/disks/vol", pv_name=None, pv_uid="", class_name="c",
                   mode="Filesystem", raw_device=False, container_path=str(volume),
                   mount_dir=str(tmp_path / "disks"),
                   device=f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}", command=("x",))
    assert cleaner.submit(job)
    assert done.wait(10)
    assert cleaner.running() == {"/mnt/disks/vol"}
    assert not cleaner.submit(job)  # no second clean of the same volume
    (outcome,) = cleaner.collect()
    assert outcome.ok and os.listdir(volume) == []
    assert cleaner.running() == frozenset()
    cleaner.shutdown()


def test_a_volume_locked_by_another_agent_is_not_cleaned(tmp_path: Path) -> None:
    import fcntl  # noqa: PLC0415
    import hashlib  # noqa: PLC0415

    from agent.cleaner import Cleaner, CleanJob  # noqa: PLC0415

    volume = tmp_path / "disks" / "vol"
    volume.mkdir(parents=True)
    (volume / "data").write_text("x")
    locks = tmp_path / "state" / "locks"
    locks.mkdir(parents=True)
    digest = hashlib.sha256(b"/mnt/disks/vol").hexdigest()[:32]
    held = os.open(locks / f"{digest}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)  # what a twin agent cleaning it holds
    st = os.stat(volume)
    done = threading.Event()
    cleaner = Cleaner(on_done=done.set, mountinfo="/dev/null", lock_dir=str(locks))
    try:
        cleaner.submit(CleanJob(
            key="/mnt/disks/vol", pv_name=None, pv_uid="", class_name="c", mode="Filesystem",
            raw_device=False, container_path=str(volume), mount_dir=str(tmp_path / "disks"),
            device=f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}", command=("x",)))
        assert done.wait(10)
        (outcome,) = cleaner.collect()
        assert outcome.busy and not outcome.ok
        assert (volume / "data").exists()
    finally:
        os.close(held)
        cleaner.shutdown()
