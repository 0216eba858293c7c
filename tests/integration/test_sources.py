"""Wake-up sources on the real kernel interfaces: the mount table and inotify (needs root)."""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pyudev
import yaml

from agent.configfiles import load_config
from agent.host import HostReader
from agent.loop import Reconciler
from agent.settings import RunSettings
from agent.sources import InotifySource, MountTableSource, Waker
from agent.udev import UdevSource, _numbers
from agent.volumes import pv_name
from devkit.disks import can_make_disks, disks
from devkit.fake_kube import FakeKube
from tests.conftest import require

MAX_QUEUED = Path("/proc/sys/fs/inotify/max_queued_events")
CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x00020000, 0x4000, 1 << 18
# A thread's own view: /proc/self is the main thread's, in the host's mount namespace.
MOUNTINFO = "/proc/thread-self/mountinfo"
T = TypeVar("T")


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


def in_private_mount_namespace(body: Callable[[], T]) -> T:
    """Run `body` on a thread with a mount namespace of its own, cut off from propagation:
    on a machine shared with other test runs their mounts never reach it (a block device
    mounted anywhere rightly wakes the agent), and its own never leave. Threads and processes
    it starts inherit the namespace."""
    outcome: dict[str, object] = {}

    def run() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNS) != 0 or \
                libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
            outcome["error"] = OSError(ctypes.get_errno(), "a private mount namespace")
            return
        try:
            outcome["value"] = body()
        except BaseException as exc:  # re-raised on the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="private-mount-ns")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome["value"]  # type: ignore[return-value]


def test_mounts_outside_the_discovery_dir_cost_no_pass(tmp_path: Path) -> None:
    """12 tmpfs mounts and unmounts elsewhere: no wake-up, no pass; one inside: one of each."""
    ok, why = can_make_disks()
    require(ok, why)
    disc, elsewhere = tmp_path / "disks", tmp_path / "elsewhere"
    disc.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storageClassMap": {"local": {"hostDir": str(disc)}}}))
    kube = FakeKube(watch_timeout=0.05)
    kube.add_node("node-1", labels={"kubernetes.io/hostname": "node-1"})
    kube.add_storage_class("local")

    def scenario() -> tuple[int, int, int, int]:
        loop = Reconciler(kube, HostReader(mountinfo=MOUNTINFO), load_config(str(config)),
                          RunSettings("node-1", resync_period=3600.0))
        source = MountTableSource(loop.waker, loop.stop, MOUNTINFO, dirs=lambda: [
            p for c in loop.config.classes for p in (c.host_dir, c.mount_dir)])
        thread = threading.Thread(target=loop.run, name="reconcile")
        with disks(tmp_path) as d:
            try:
                assert source.start()
                thread.start()
                assert until(lambda: loop.state.passes >= 1, 30), "no first pass"
                passes = loop.state.passes
                for i in range(12):
                    d.tmpfs(elsewhere / f"pod-{i}", size_mib=1)
                    d.cleanup()  # unmounts it again
                assert until(lambda: source.ignored >= 1, 30), "the churn was never seen"
                churn = (loop.state.passes - passes, loop.waker.wakeups["mount"])
                d.tmpfs(disc / "vol1", size_mib=1)
                assert until(lambda: pv_name("vol1", "node-1", "local") in kube.pvs, 30)
                # the PV is written mid-pass; the pass is counted when it ends
                assert until(lambda: loop.state.passes > passes, 30), "the pass never ended"
                return (*churn, loop.state.passes - passes, loop.waker.wakeups["mount"])
            finally:
                loop.shutdown()
                thread.join(10)
                loop.close()

    churn_passes, churn_wakes, passes, wakes = in_private_mount_namespace(scenario)
    assert (churn_passes, churn_wakes) == (0, 0)
    assert (passes, wakes) == (1, 1)


def test_a_burst_of_mounts_elsewhere_costs_a_few_reads_and_a_mount_inside_still_wakes(
        tmp_path: Path) -> None:
    """60 tmpfs mounts and unmounts elsewhere as fast as they go: the table is read at most
    the burst plus the rate's worth, not once per change; a mount in the discovery dir right
    after still wakes the loop."""
    ok, why = can_make_disks()
    require(ok, why)
    disc, elsewhere = tmp_path / "disks", tmp_path / "elsewhere"
    disc.mkdir()
    waker, stop = Waker(threading.Event()), threading.Event()

    def scenario() -> tuple[int, float, int]:
        source = MountTableSource(waker, stop, MOUNTINFO, dirs=lambda: [str(disc)])
        assert source.start()
        try:
            with disks(tmp_path) as d:
                assert until(source.thread.is_alive, 10)
                started = time.monotonic()
                for i in range(60):
                    d.tmpfs(elsewhere / f"pod-{i % 4}", size_mib=1)
                    d.cleanup()
                took = time.monotonic() - started
                assert until(lambda: source.ignored >= 1, 30), "the churn was never seen"
                reads = source.reads
                d.tmpfs(disc / "vol", size_mib=1)
                assert until(lambda: waker.wakeups["mount"] >= 1, 30), "the mount inside"
                return reads, took, waker.wakeups["mount"]
        finally:
            stop.set()

    reads, took, wakes = in_private_mount_namespace(scenario)
    bound = MountTableSource.READ_BURST + MountTableSource.READ_RATE * (took + 1.0) + 1
    assert reads <= bound, (reads, took)
    assert wakes == 1


def test_without_the_filter_every_mount_change_wakes(tmp_path: Path) -> None:
    """The benchmark's baseline (--no-wake-filter): a mount anywhere wakes the loop."""
    ok, why = can_make_disks()
    require(ok, why)
    waker, stop = Waker(threading.Event()), threading.Event()

    def scenario() -> bool:
        source = MountTableSource(waker, stop, MOUNTINFO)
        assert source.start()
        try:
            with disks(tmp_path) as d:
                d.tmpfs(tmp_path / "pod-0", size_mib=1)
            return until(lambda: waker.wakeups["mount"] >= 1) and source.ignored == 0
        finally:
            stop.set()

    assert in_private_mount_namespace(scenario)


def test_udev_interest_covers_the_devices_of_the_discovery_dirs(tmp_path: Path) -> None:
    """What a udev event must touch to wake the loop, read from real devices and mounts."""
    ok, why = can_make_disks()
    require(ok, why)
    disc = tmp_path / "disks"
    disc.mkdir()
    stop = threading.Event()

    def numbers(device: str) -> list[str]:
        return _numbers(pyudev.Devices.from_device_file(pyudev.Context(), device))

    def scenario() -> None:
        source = UdevSource(Waker(threading.Event()), stop, dirs=lambda: [str(disc)],
                            mountinfo=MOUNTINFO)
        with disks(tmp_path) as d:
            raw, mounted, other = d.loop("raw"), d.loop("fs", fs="ext4"), d.loop("other")
            (disc / "raw").symlink_to(raw)
            d.mount(mounted, disc / "fs")
            interest = source.interest()
            assert not interest.everything
            assert interest.matters(numbers(raw)) and interest.matters(numbers(mounted))
            assert not interest.matters(numbers(other))  # a device discovery cannot see
            (disc / "gone").symlink_to("/dev/no-such-disk")  # a new device may complete it
            assert source.interest().matters(numbers(other))
        source.close()

    in_private_mount_namespace(scenario)


def test_udev_interest_reads_the_mount_table_again_only_when_it_changed(tmp_path: Path) -> None:
    """Every udev event asks what the discovery dirs hold; the mount table is read once, then
    only after the kernel flags a change, and a mount made meanwhile is always seen."""
    ok, why = can_make_disks()
    require(ok, why)
    disc = tmp_path / "disks"
    disc.mkdir()

    def scenario() -> None:
        source = UdevSource(Waker(threading.Event()), threading.Event(),
                            dirs=lambda: [str(disc)], mountinfo=MOUNTINFO)
        with disks(tmp_path) as d:
            first = source.interest()
            for _ in range(20):
                assert source.interest().devices == first.devices
            assert source.table_reads == 1
            device = d.loop("fs", fs="ext4")
            d.mount(device, disc / "fs")
            st = os.stat(device)
            assert f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" in source.interest().devices
            assert source.table_reads == 2
        source.close()

    in_private_mount_namespace(scenario)
