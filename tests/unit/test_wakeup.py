"""When wake-ups start passes (PassSchedule, Waker) and which mount changes count (MountFilter)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from agent import loop as loop_module
from agent.plan import Recycling
from agent.sources import Waker
from agent.wakeup import (
    INF,
    DeviceInterest,
    MountFilter,
    PassSchedule,
    escape_mount_path,
    mounts_within,
)
from tests.unit.rig import CLASS, Rig, eventually


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Loop:
    """The loop's use of a schedule, on a fake clock: a pass starts as soon as one is due."""

    def __init__(self, schedule: PassSchedule, clock: Clock) -> None:
        self.schedule, self.clock = schedule, clock
        self.starts: list[float] = []
        self.served: list[float | None] = []

    def maybe_pass(self) -> bool:
        if self.schedule.due() > self.clock.now:
            return False
        self.served.append(self.schedule.started())
        self.starts.append(self.clock.now)
        return True


def test_the_first_wake_up_of_a_quiet_period_starts_a_pass_at_once() -> None:
    clock = Clock()
    schedule = PassSchedule(clock=clock)
    assert schedule.due() == INF  # nothing waits: sleep until the resync
    clock.now += 60
    schedule.woken()
    assert schedule.due() <= clock.now


def test_wake_ups_during_a_pass_make_exactly_one_follow_up() -> None:
    clock = Clock()
    loop = Loop(PassSchedule(clock=clock), clock)
    loop.schedule.woken()
    assert loop.maybe_pass()  # the first pass, at once
    for _ in range(50):  # a burst while it runs
        clock.now += 0.001
        loop.schedule.woken()
    clock.now += 0.01  # the pass ends
    assert loop.maybe_pass()  # one follow-up, at once
    assert not loop.maybe_pass()  # and only one
    assert loop.schedule.due() == INF


def test_a_wake_up_after_the_follow_up_started_makes_another() -> None:
    clock = Clock()
    loop = Loop(PassSchedule(clock=clock), clock)
    loop.schedule.woken()
    loop.maybe_pass()
    loop.schedule.woken()
    clock.now += 0.02
    assert loop.maybe_pass()  # the follow-up started: it may have read the host already ...
    clock.now += 0.001
    loop.schedule.woken()  # ... so this one needs a pass of its own
    clock.now += 0.02
    assert loop.maybe_pass()
    assert len(loop.starts) == 3


def test_no_wake_up_is_lost_whatever_the_interleaving() -> None:
    """Every wake-up is followed by a pass that started at or after it."""
    clock = Clock()
    loop = Loop(PassSchedule(clock=clock), clock)
    woken = []
    for step in range(2000):
        clock.now += 0.001
        if step % 7 in (0, 3) or step % 113 < 20:
            loop.schedule.woken()
            woken.append(clock.now)
        if step % 5 == 0:
            loop.maybe_pass()
    clock.now += 10
    loop.maybe_pass()
    for t in woken:
        assert any(start >= t for start in loop.starts), t
    assert loop.schedule.due() == INF
    assert len(loop.starts) < len(woken)  # coalesced, not one pass per wake-up


def test_started_reports_the_oldest_wake_up_it_serves() -> None:
    clock = Clock()
    schedule = PassSchedule(clock=clock)
    assert schedule.started() is None  # a resync: asked for by no wake-up
    schedule.woken()
    first = clock.now
    clock.now += 0.5
    schedule.woken()
    assert schedule.started() == first


def test_a_source_that_never_stops_is_held_to_the_rate_after_a_burst() -> None:
    clock = Clock()
    loop = Loop(PassSchedule(burst=5, rate=10.0, clock=clock), clock)
    for _ in range(3000):  # three seconds of a wake-up every millisecond, passes of 1 ms
        loop.schedule.woken()
        loop.maybe_pass()
        clock.now += 0.001
    assert 5 + 30 - 2 <= len(loop.starts) <= 5 + 30 + 1
    gaps = [b - a for a, b in zip(loop.starts[5:], loop.starts[6:], strict=False)]
    assert min(gaps) >= 0.1 - 1e-9
    clock.now += 10  # quiet again: the bucket refills, the next wake-up is served at once
    loop.schedule.woken()
    assert loop.schedule.due() <= clock.now


def test_debounce_gives_the_former_trailing_pass() -> None:
    clock = Clock()
    schedule = PassSchedule(debounce=0.2, clock=clock)
    schedule.woken()
    assert schedule.due() == clock.now + 0.2
    clock.now += 0.1
    schedule.woken()  # part of the same burst
    assert schedule.due() == clock.now + 0.1


def test_the_waker_counts_a_bare_event_as_a_wake_up_and_a_pass_serves_all() -> None:
    event = threading.Event()
    waker = Waker(event)
    assert waker.due() == INF and not event.is_set()
    event.set()  # the PV watch, a cleaner or shutdown set the Event directly
    assert waker.due() != INF
    assert not event.is_set()  # noted: waiting on the Event blocks again
    waker.wake("mount")
    assert event.is_set() and waker.first_wake is not None
    assert waker.take_first_wake() is not None
    assert not event.is_set() and waker.due() == INF
    waker.wake("udev")  # during the pass
    assert waker.due() != INF and waker.wakeups == {"mount": 1, "udev": 1}


# -- the mount filter --------------------------------------------------------------------------

ROOT = b"22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw"
PROC = b"23 22 0:21 / /proc rw,nosuid shared:5 - proc proc rw"


def line(mount_id: int, point: str, device: str = "0:55", fs: str = "tmpfs",
         source: str = "tmpfs") -> bytes:
    return (f"{mount_id} 22 {device} / {escape_mount_path(point).decode()} rw,relatime "
            f"shared:{mount_id} - {fs} {source} rw").encode()


def table(*lines: bytes) -> bytes:
    return b"\n".join([ROOT, PROC, *lines]) + b"\n"


DIRS = ["/mnt/disks"]


def baseline(*lines: bytes) -> MountFilter:
    mounts = MountFilter()
    assert not mounts.changed(table(*lines), DIRS)  # the first table is the baseline
    return mounts


def test_tmpfs_churn_elsewhere_does_not_matter() -> None:
    mounts = baseline()
    pod = "/var/lib/kubelet/pods/1234/volumes/kubernetes.io~secret/token"
    assert not mounts.changed(table(line(40, pod)), DIRS)
    assert not mounts.changed(table(line(40, pod), line(41, "/run/netns/cni-1", fs="nsfs",
                                                           source="nsfs")), DIRS)
    assert not mounts.changed(table(line(42, "/run/containerd/x/rootfs", fs="overlay",
                                         source="overlay")), DIRS)
    assert not mounts.changed(table(), DIRS)  # and unmounting them


def test_a_mount_in_a_discovery_dir_matters_and_so_does_its_unmount() -> None:
    mounts = baseline()
    assert mounts.changed(table(line(40, "/mnt/disks/vol1")), DIRS)
    assert not mounts.changed(table(line(40, "/mnt/disks/vol1")), DIRS)  # no change
    assert mounts.changed(table(), DIRS)


def test_mounts_on_above_or_deep_inside_a_discovery_dir_matter() -> None:
    for point in ("/mnt/disks", "/mnt", "/mnt/disks/vol1/sub", "/etc/hosts"):
        mounts = baseline()
        assert mounts.changed(table(line(40, point)), DIRS), point
    mounts = baseline()
    assert not mounts.changed(table(line(40, "/mnt/disks-other")), DIRS)  # a sibling's name


def test_a_block_device_mounted_anywhere_matters() -> None:
    """A raw device in a discovery directory is never offered while it is mounted elsewhere."""
    mounts = baseline()
    assert mounts.changed(table(line(40, "/srv/data", device="8:17", fs="ext4",
                                     source="/dev/sdb1")), DIRS)
    mounts = baseline()  # btrfs shows an anonymous device number; its source names the disk
    assert mounts.changed(table(line(40, "/srv/data", device="0:60", fs="btrfs",
                                     source="/dev/sdc")), DIRS)


def test_escaped_paths_and_new_dirs() -> None:
    dirs = ["/mnt/my disks"]
    mounts = MountFilter()
    mounts.changed(table(), dirs)
    assert mounts.changed(table(line(40, "/mnt/my disks/a")), dirs)
    assert b"\\040" in line(40, "/mnt/my disks/a")
    assert not mounts.changed(table(line(40, "/mnt/my disks/a"), line(41, "/tmp/x y")), dirs)
    assert mounts.changed(table(line(40, "/mnt/my disks/a"), line(41, "/tmp/x y")),
                          ["/tmp"])  # a config reload: new directories always matter


def test_a_line_the_filter_does_not_understand_matters() -> None:
    mounts = baseline()
    assert mounts.changed(table(b"garbage"), DIRS)


# -- udev events -------------------------------------------------------------------------------


def test_mounts_within_finds_the_devices_mounted_in_discovery_dirs() -> None:
    text = table(line(40, "/mnt/disks/a", device="7:3", fs="ext4", source="/dev/loop3"),
                 line(41, "/mnt/disks", device="0:60", fs="btrfs", source="/dev/sdc"),
                 line(42, "/srv/x", device="8:1", fs="ext4", source="/dev/sda1"))
    assert mounts_within(text, ["/mnt/disks/"]) == [("7:3", "/dev/loop3"), ("0:60", "/dev/sdc")]


def test_a_udev_event_matters_when_it_touches_a_device_of_interest() -> None:
    interest = DeviceInterest({"7:3", "8:16"})
    assert interest.matters(["7:3"])
    assert interest.matters(["8:17", "8:16"])  # a partition of a disk in a discovery dir
    assert not interest.matters(["259:0"])  # a volume attached for a pod
    assert not interest.matters([])
    assert DeviceInterest(everything=True).matters(["259:0"])  # a dangling link somewhere


def test_a_new_entry_settles_before_its_pass_unless_a_mount_asks_for_one_now() -> None:
    """mkdir then mount: the directory alone would be reported as "not a mount point"."""
    clock = Clock()
    schedule = PassSchedule(settle={"inotify": 0.2}, clock=clock)
    schedule.woken("inotify")
    assert schedule.due() == clock.now + 0.2
    clock.now += 0.05
    schedule.woken("mount")  # the mount on it: the pass is due now and serves both
    assert schedule.due() <= clock.now
    assert schedule.started() == clock.now - 0.05
    assert schedule.due() == INF


def test_a_wake_up_that_wants_a_pass_now_restarts_the_running_pass_at_no_token() -> None:
    clock = Clock()
    schedule = PassSchedule(burst=1, rate=1.0, settle={"inotify": 0.2}, clock=clock)
    schedule.woken("mount")
    schedule.started()  # the only token of the burst
    assert not schedule.wants_now()  # nothing new since the pass started
    schedule.woken("inotify")  # a new entry settles first: not a reason to read over
    schedule.woken("pv-modified")  # a PV changed: what was read of the host is still right
    assert not schedule.wants_now()
    clock.now += 0.01
    schedule.woken("mount")  # a mount wants its pass now
    assert schedule.wants_now()
    assert schedule.restarted() == clock.now - 0.01  # serves both, the oldest first
    assert not schedule.wants_now() and schedule.due() == INF
    schedule.woken("mount")  # after the restart: a follow-up, held to the rate as before
    assert schedule.due() == pytest.approx(1001.0)  # the restart spent no token


def test_a_start_that_found_what_it_was_for_gives_its_token_back() -> None:
    clock = Clock()
    schedule = PassSchedule(burst=2, rate=1.0, clock=clock)
    for _ in range(10):  # every read finds a mount of interest: never held to the rate
        schedule.woken("mount")
        assert schedule.due() <= clock.now
        schedule.started()
        schedule.refund()
        clock.now += 0.1
    for _ in range(2):  # reads that find nothing spend the burst ...
        schedule.woken("mount")
        schedule.started()
    schedule.woken("mount")
    assert schedule.due() == pytest.approx(clock.now + 1.0)  # ... then wait for the rate


def test_a_settling_wake_up_wants_its_pass_once_settled() -> None:
    clock = Clock()
    schedule = PassSchedule(settle={"inotify": 0.2}, clock=clock)
    schedule.started()
    schedule.woken("inotify")
    assert not schedule.wants_now()
    clock.now += 0.2
    assert schedule.wants_now()


# -- the loop ----------------------------------------------------------------------------------


def test_a_mount_while_the_host_is_read_restarts_the_read_in_the_same_pass(
        tmp_path: Path) -> None:
    """A pass reading the host when a mount arrives reads it over at once (before deciding
    anything), so the new disk gets its PV in this pass, not in a follow-up one."""
    rig = Rig(tmp_path, resync_period=3600.0).start()
    try:
        rig.host.add(CLASS, "a")
        rig.pass_()

        def mount_b() -> None:
            if rig.host.snapshots == 2:  # the second pass, while it reads the host
                rig.host.add(CLASS, "b")
                rig.loop.waker.wake("mount")

        rig.host.while_reading = mount_b
        rig.loop.waker.wake("inotify")
        result = rig.pass_()
        assert rig.pv("b") is not None and result.created_by_mode == {"Filesystem": 1}
        assert (rig.host.snapshots, rig.host.interrupted) == (3, 1)
        assert rig.loop.waker.due() == INF  # the restart served the mount: no follow-up due
        assert result.woken_at is not None  # the latency counts from the first wake-up

        def mount_more() -> None:  # a host that never stops changing: read over once only
            rig.host.add(CLASS, f"c{rig.host.snapshots}")
            rig.loop.waker.wake("mount")

        rig.host.while_reading = mount_more
        rig.pass_()
        assert (rig.host.snapshots, rig.host.interrupted) == (5, 2)
        assert rig.loop.waker.due() < INF  # the mount during the second read: a follow-up
    finally:
        rig.close()




def test_a_mount_as_the_read_ends_restarts_it_too(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The last moment a pass reads over is after the host was read and before anything is
    decided (the identities it records, the PVs it writes)."""
    rig = Rig(tmp_path, resync_period=3600.0).start()
    try:
        rig.pass_()
        real = loop_module.discover  # type: ignore[attr-defined]
        woke: list[bool] = []

        def discover(*args: Any, **kwargs: Any) -> Any:
            if not woke:  # the host was read: a mount now
                woke.append(True)
                rig.host.add(CLASS, "late")
                rig.loop.waker.wake("mount")
            return real(*args, **kwargs)

        monkeypatch.setattr(loop_module, "discover", discover)
        rig.loop.waker.wake("udev")
        result = rig.pass_()
        assert result.created_by_mode == {"Filesystem": 1} and rig.pv("late") is not None
        assert rig.loop.waker.due() == INF
    finally:
        rig.close()


def test_the_loop_serves_a_burst_during_a_pass_with_one_follow_up(tmp_path: Path) -> None:
    """The real run loop on the in-memory API: a wake-up starts a pass; 50 more while it is
    held make exactly one follow-up pass; then the loop waits."""
    rig = Rig(tmp_path, resync_period=3600.0)
    rig.kube.watch_timeout = 0.05
    reading, release = threading.Event(), threading.Event()
    decide = rig.loop.recycler.decide
    held = [False]

    def slow_decide(*args: Any) -> Recycling:
        # after the host was read: wake-ups now make a follow-up, not a second read
        if rig.loop.state.passes == 1 and not held[0]:  # the second pass: hold it
            held[0] = True
            reading.set()
            assert release.wait(10)
        return decide(*args)

    rig.loop.recycler.decide = slow_decide  # type: ignore[method-assign,assignment]
    rig.host.add(CLASS, "a")
    loop = threading.Thread(target=rig.loop.run, name="reconcile")
    loop.start()
    try:
        eventually(lambda: rig.pv("a") and rig.loop.state.passes, what="the first pass")
        eventually(lambda: rig.loop.waker.due() == INF, what="the loop waiting")
        passes = rig.loop.state.passes
        rig.loop.waker.wake("mount")
        assert reading.wait(10), "a wake-up did not start a pass"
        rig.host.add(CLASS, "b")  # the held pass read the host already: the follow-up sees b
        for _ in range(50):
            rig.loop.waker.wake("udev")
        release.set()
        eventually(lambda: rig.pv("b"), what="the PV of b")
        eventually(lambda: rig.loop.state.passes >= passes + 2, what="the follow-up")
        eventually(lambda: rig.loop.waker.due() == INF, what="the loop waiting again")
        assert rig.loop.state.passes == passes + 2  # the held pass and one follow-up
    finally:
        release.set()
        rig.loop.shutdown()
        loop.join(10)
        rig.close()
