"""Wake-up sources on the real kernel interfaces: the mount table and inotify (needs root)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

from agent.sources import InotifySource, MountTableSource, Waker
from devkit.disks import can_make_disks, disks
from tests.conftest import require

MAX_QUEUED = Path("/proc/sys/fs/inotify/max_queued_events")


def until(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_new_mount_wakes_the_loop(tmp_path: Path) -> None:
    ok, why = can_make_disks()
    require(ok, why)
    waker, stop = Waker(threading.Event()), threading.Event()
    assert MountTableSource(waker, stop).start()
    try:
        time.sleep(0.2)
        with disks(tmp_path) as d:
            d.tmpfs(tmp_path / "new-disk")
            assert until(lambda: waker.wakeups["mount"] >= 1)
            assert waker.event.is_set()
    finally:
        stop.set()


def test_inotify_overflow_is_counted_and_the_source_keeps_working(tmp_path: Path) -> None:
    require(MAX_QUEUED.exists(), "no inotify limits in /proc")
    watched = tmp_path / "disks"
    watched.mkdir()
    waker, stop = Waker(threading.Event()), threading.Event()
    old = MAX_QUEUED.read_text()
    MAX_QUEUED.write_text("1\n")  # applies to inotify instances created from now on
    try:
        source = InotifySource(waker, stop, lambda: [str(watched)])
        assert source.start()
        assert until(lambda: bool(source._watched))  # its instance exists, the dir watched
    finally:
        MAX_QUEUED.write_text(old)
    try:
        # A rename queues two events (moved-from, moved-to) in one system call, so with a
        # queue of one the kernel must overflow however quickly the source reads.
        entry = watched / "entry-0"
        entry.touch()
        for i in range(1, 50):
            entry = entry.rename(watched / f"entry-{i}")
        assert until(lambda: waker.failures["inotify"] >= 1)
        assert waker.wakeups["inotify-recovery"] >= 1  # a full pass was asked for
        before = waker.wakeups["inotify"]
        time.sleep(0.2)
        (watched / "after-overflow").mkdir()
        assert until(lambda: waker.wakeups["inotify"] > before)
    finally:
        stop.set()
