"""The filesystem cleaner on a plain directory tree: nothing followed, everything removed."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from agent.cleaner import (
    Cleaner,
    CleanError,
    CleanJob,
    CleanOutcome,
    capacity_breakdown,
    clean_filesystem,
    run_filesystem_cleaner,
)


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


DISK = {"fs-uuid": "0f0e0d0c-aaaa-bbbb-cccc-000000000001"}


def _volume(tmp_path: Path) -> tuple[Path, str]:
    volume = tmp_path / "disks" / "vol"
    volume.mkdir(parents=True)
    (volume / "data").write_text("x")
    st = os.stat(volume)
    return volume, f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"


def _job(tmp_path: Path, volume: Path, device: str, **kw: object) -> CleanJob:
    fields: dict[str, object] = dict(
        key="/mnt/disks/vol", pv_name=None, pv_uid="", class_name="c", mode="Filesystem",
        raw_device=False, container_path=str(volume), mount_dir=str(tmp_path / "disks"),
        device=device, command=("x",), identity=DISK)
    fields.update(kw)
    return CleanJob(**fields)  # type: ignore[arg-type]


def _run(cleaner: Cleaner, job: CleanJob, done: threading.Event) -> CleanOutcome:
    assert cleaner.submit(job)
    assert done.wait(30)
    (outcome,) = cleaner.collect()
    cleaner.release(job.key)
    return outcome


def test_a_finished_clean_counts_as_running_until_released(tmp_path: Path) -> None:
    """Otherwise a pass between the end of a clean and acting on it would start another."""
    volume, device = _volume(tmp_path)
    done = threading.Event()
    cleaner = Cleaner(concurrency=1, on_done=done.set, mountinfo="/dev/null",
                      identify=lambda job: DISK)
    job = _job(tmp_path, volume, device)
    assert cleaner.submit(job)
    assert done.wait(30)
    assert cleaner.running() == {"/mnt/disks/vol"}
    assert not cleaner.submit(job)  # no second clean of the same volume
    (outcome,) = cleaner.collect()
    assert outcome.ok and os.listdir(volume) == []
    assert cleaner.running() == {"/mnt/disks/vol"}  # collected, not yet acted on
    cleaner.release(job.key)
    assert cleaner.running() == frozenset()
    cleaner.shutdown()


@pytest.mark.parametrize(("observed", "changed"), [
    ({"fs-uuid": "11111111-2222-3333-4444-555555555555"}, True),  # another disk, same number
    ({}, False),  # nothing readable: never wipe on a guess
])
def test_nothing_is_removed_from_a_disk_that_is_not_the_recorded_one(
        tmp_path: Path, observed: dict[str, str], changed: bool) -> None:
    volume, device = _volume(tmp_path)
    done = threading.Event()
    cleaner = Cleaner(on_done=done.set, mountinfo="/dev/null", identify=lambda job: observed)
    outcome = _run(cleaner, _job(tmp_path, volume, device), done)
    cleaner.shutdown()
    assert not outcome.ok and outcome.disk_changed is changed
    assert (volume / "data").read_text() == "x"


def test_an_unreadable_identity_fails_the_clean_without_touching_it(tmp_path: Path) -> None:
    volume, device = _volume(tmp_path)
    done = threading.Event()

    def hung(job: CleanJob) -> dict[str, str]:
        raise TimeoutError("the device did not answer")

    cleaner = Cleaner(on_done=done.set, mountinfo="/dev/null", identify=hung)
    outcome = _run(cleaner, _job(tmp_path, volume, device), done)
    cleaner.shutdown()
    assert not outcome.ok and "did not answer" in outcome.detail
    assert (volume / "data").exists()


def test_a_decision_that_no_longer_holds_stops_the_clean(tmp_path: Path) -> None:
    """`confirm` runs under the lock right before the first byte: a twin agent re-created
    the PV meanwhile, say."""
    volume, device = _volume(tmp_path)
    done = threading.Event()

    def confirm(job: CleanJob) -> None:
        raise CleanError("a PV exists for it again")

    cleaner = Cleaner(on_done=done.set, mountinfo="/dev/null", identify=lambda job: DISK,
                      confirm=confirm)
    outcome = _run(cleaner, _job(tmp_path, volume, device), done)
    cleaner.shutdown()
    assert not outcome.ok and "PV exists" in outcome.detail
    assert (volume / "data").exists()


def test_a_queued_clean_cancelled_for_a_new_disk_never_runs(tmp_path: Path) -> None:
    """The regression: a clean queued behind busy workers, then the disk swapped."""
    volume, device = _volume(tmp_path)
    done = threading.Event()
    gate = threading.Event()

    def identify(job: CleanJob) -> dict[str, str]:
        return DISK

    def confirm(job: CleanJob) -> None:
        if job.key == "/mnt/disks/busy":
            gate.wait(30)  # keeps the only worker busy

    cleaner = Cleaner(concurrency=1, on_done=done.set, mountinfo="/dev/null",
                      identify=identify, confirm=confirm)
    busy = _job(tmp_path, volume, device, key="/mnt/disks/busy", container_path="/nonexistent")
    assert cleaner.submit(busy)
    job = _job(tmp_path, volume, device)
    assert cleaner.submit(job)
    cleaner.cancel(job.key, "a different disk is there")
    gate.set()
    outcomes: list[CleanOutcome] = []
    deadline = time.monotonic() + 30
    while len(outcomes) < 2 and time.monotonic() < deadline:
        done.wait(1)
        done.clear()
        outcomes += cleaner.collect()
    cleaner.shutdown()
    mine = next(o for o in outcomes if o.job.key == job.key)
    assert not mine.ok and "different disk" in mine.detail
    assert (volume / "data").read_text() == "x"


def test_the_filesystem_clean_runs_in_a_child_process_on_the_open_directory(
        tmp_path: Path) -> None:
    """A child can be killed when a frozen filesystem blocks it; a thread could not."""
    volume, _ = _volume(tmp_path)
    (volume / "sub").mkdir()
    (volume / "sub" / "f").write_text("y")
    fd = os.open(volume, os.O_RDONLY | os.O_DIRECTORY)
    try:
        detail = run_filesystem_cleaner(fd, str(volume), os.fstat(fd).st_dev, [], 60, "t")
    finally:
        os.close(fd)
    assert "removed 2 files and 1 directories" in detail
    assert os.listdir(volume) == []


def test_a_stopped_child_clean_is_killed_and_reported(tmp_path: Path) -> None:
    volume, _ = _volume(tmp_path)
    fd = os.open(volume, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(CleanError, match="stopping"):
            run_filesystem_cleaner(fd, str(volume), os.fstat(fd).st_dev, [], 60, "t",
                                   stop=lambda: "stopping")
    finally:
        os.close(fd)


def test_a_volume_locked_by_another_agent_is_not_cleaned(tmp_path: Path) -> None:
    import fcntl  # noqa: PLC0415
    import hashlib  # noqa: PLC0415

    volume, device = _volume(tmp_path)
    locks = tmp_path / "state" / "locks"
    locks.mkdir(parents=True)
    digest = hashlib.sha256(b"/mnt/disks/vol").hexdigest()[:32]
    held = os.open(locks / f"{digest}.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)  # what a twin agent cleaning it holds
    done = threading.Event()
    cleaner = Cleaner(on_done=done.set, mountinfo="/dev/null", lock_dir=str(locks),
                      identify=lambda job: DISK)
    try:
        assert cleaner.lock("/mnt/disks/vol") is None
        cleaner.submit(_job(tmp_path, volume, device))
        assert done.wait(10)
        (outcome,) = cleaner.collect()
        assert outcome.busy and not outcome.ok
        assert (volume / "data").exists()
    finally:
        os.close(held)
        cleaner.shutdown()


def test_a_class_fs_cleaner_command_runs_in_the_volume_with_its_path(tmp_path: Path) -> None:
    """`fsCleanerCommand` replaces the built-in cleaner: it starts in the checked directory
    with LOCAL_PV_FS_PATH set, and only after the disk's identity was read again."""
    volume, device = _volume(tmp_path)
    marker = tmp_path / "marker"
    script = f'echo "$LOCAL_PV_FS_PATH $(pwd)" > {marker} && rm -f ./data'
    seen: list[str] = []

    def identify(job: CleanJob) -> dict[str, str]:
        seen.append("identified" if not marker.exists() else "identified after the command")
        return DISK

    done = threading.Event()
    cleaner = Cleaner(on_done=done.set, mountinfo="/dev/null", identify=identify)
    outcome = _run(cleaner, _job(tmp_path, volume, device,
                                 fs_command=("/bin/sh", "-c", script)), done)
    cleaner.shutdown()
    assert outcome.ok, outcome.detail
    assert outcome.detail == "/bin/sh succeeded"
    assert seen == ["identified"]
    assert marker.read_text().split() == [str(volume), str(volume)]
    assert os.listdir(volume) == [] and volume.is_dir()


@pytest.mark.parametrize(("script", "words"), [
    ("exit 3", "/bin/sh exited with status 3"),
    ("sleep 30", "did not finish within 1s"),
])
def test_a_failing_or_hanging_fs_cleaner_command_fails_the_clean(
        tmp_path: Path, script: str, words: str) -> None:
    volume, device = _volume(tmp_path)
    done = threading.Event()
    cleaner = Cleaner(timeout=1.0, on_done=done.set, mountinfo="/dev/null",
                      identify=lambda job: DISK)
    outcome = _run(cleaner, _job(tmp_path, volume, device,
                                 fs_command=("/bin/sh", "-c", script)), done)
    cleaner.shutdown()
    assert not outcome.ok and words in outcome.detail


def test_no_fs_cleaner_command_runs_on_a_disk_that_is_not_the_recorded_one(
        tmp_path: Path) -> None:
    volume, device = _volume(tmp_path)
    marker = tmp_path / "marker"
    done = threading.Event()
    cleaner = Cleaner(on_done=done.set, mountinfo="/dev/null",
                      identify=lambda job: {"fs-uuid": "11111111-2222-3333-4444-555555555555"})
    outcome = _run(cleaner, _job(tmp_path, volume, device,
                                 fs_command=("/bin/sh", "-c", f"touch {marker}")), done)
    cleaner.shutdown()
    assert not outcome.ok and outcome.disk_changed
    assert not marker.exists() and (volume / "data").read_text() == "x"
