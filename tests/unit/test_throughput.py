"""Many PVs at once: a pass's writes in flight together (bounded), Events kept out of their
way, and the apiserver's 429 answers waited out. On the in-memory API (the rig) and, for the
429s, the real `Kube` adapter over HTTP; tests/e2e/test_throughput.py proves both on a real
apiserver."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from agent.apply import NOTHING, Written, run_all
from agent.events import EventRecorder
from agent.kube import THROTTLE_RETRIES, THROTTLE_WAIT_MAX, ApiError, Kube
from agent.notices import Notice, Reason
from agent.volumes import NodeInfo
from devkit.fake_kube import FakeKube
from tests.unit.fake_apiserver import serving
from tests.unit.rig import CLASS, Rig, eventually
from tests.unit.test_reconciler import upstream_pv

N = 120  # volumes mounted at once in these tests


class SlowKube(FakeKube):
    """Creates take a little while, and what was in flight together is recorded."""

    def __init__(self, delay: float = 0.005) -> None:
        super().__init__(watch_timeout=0.0)
        self.delay = delay
        self.in_flight = 0
        self.most_in_flight = 0
        self.order: list[str] = []  # "create" and "event", in the order they were sent
        self.events_during_creates = 0
        self._count_lock = threading.Lock()

    def create_pv(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        with self._count_lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            self.order.append("create")
        try:
            time.sleep(self.delay)
            return super().create_pv(manifest)
        finally:
            with self._count_lock:
                self.in_flight -= 1

    def emit_event(self, obj: Mapping[str, str], event_type: str, reason: str, message: str,
                   host: str) -> None:
        with self._count_lock:
            self.order.append("event")
            self.events_during_creates += self.in_flight > 0
        super().emit_event(obj, event_type, reason, message, host)


def slow_rig(tmp_path: Path, concurrency: int, delay: float = 0.005) -> Rig:
    return Rig(tmp_path, kube=SlowKube(delay), api_concurrency=concurrency)


@pytest.fixture
def rig8(tmp_path: Path) -> Iterator[Rig]:
    r = slow_rig(tmp_path, 8)
    yield r
    r.close()


# -- the pool -------------------------------------------------------------------------------------


def test_run_all_keeps_the_bound_and_the_order() -> None:
    lock = threading.Lock()
    running, most = [0], [0]

    def write(i: int) -> Written:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return Written("created", str(i))

    writes = [lambda i=i: write(i) for i in range(40)]  # type: ignore[misc]
    results = run_all(writes, 6, threading.Event())
    assert [r.mode for r in results] == [str(i) for i in range(40)]
    assert most[0] == 6
    assert [t for t in threading.enumerate() if t.name.startswith("reconcile-write")] == []
    running[0] = most[0] = 0
    run_all(writes[:10], 1, threading.Event())
    assert most[0] == 1


def test_run_all_finishes_the_other_writes_when_one_crashes_then_raises() -> None:
    done: list[int] = []

    def write(i: int) -> Written:
        if i == 3:
            raise RuntimeError("a bug")
        done.append(i)
        return NOTHING

    with pytest.raises(RuntimeError, match="a bug"):
        run_all([lambda i=i: write(i) for i in range(20)], 4, threading.Event())  # type: ignore[misc]
    assert sorted(done) == [i for i in range(20) if i != 3]


def test_run_all_starts_nothing_once_stopping() -> None:
    stop = threading.Event()
    started: list[int] = []

    def write(i: int) -> Written:
        started.append(i)
        stop.set()
        return NOTHING

    run_all([lambda i=i: write(i) for i in range(50)], 4, stop)  # type: ignore[misc]
    assert 1 <= len(started) <= 4  # those already running finish; no new one starts


# -- the pass -------------------------------------------------------------------------------------


def test_a_thousand_volumes_at_once_get_one_create_each_in_parallel(rig8: Rig) -> None:
    for i in range(N):
        rig8.host.add(CLASS, f"v{i:03d}")
    rig8.start()
    result = rig8.pass_()
    kube: SlowKube = rig8.kube  # type: ignore[assignment]
    assert result.created_by_mode == {"Filesystem": N} and result.errors == 0
    assert kube.calls["create_pv"] == N and len(kube.pvs) == N
    assert 1 < kube.most_in_flight <= 8
    assert sorted(rig8.loop.cache.snapshot()) == sorted(kube.pvs)  # every response cached
    provisioned = rig8.events("Provisioned")
    assert len(provisioned) == N
    assert {e["involvedObject"]["name"] for e in provisioned} == set(kube.pvs)
    # the pass's Events went out after its last create, never beside one
    assert kube.order == ["create"] * N + ["event"] * N
    assert kube.events_during_creates == 0
    writes = kube.writes()
    assert rig8.pass_().plan.writes == 0 and kube.writes() == writes


def test_api_concurrency_1_is_the_former_one_at_a_time(tmp_path: Path) -> None:
    rig = slow_rig(tmp_path, 1, delay=0.001)
    try:
        for i in range(30):
            rig.host.add(CLASS, f"v{i:03d}")
        rig.start()
        assert rig.pass_().created_by_mode == {"Filesystem": 30}
        assert rig.kube.most_in_flight == 1  # type: ignore[attr-defined]
    finally:
        rig.close()


def test_failed_creates_among_many_count_and_stop_none_of_the_others(rig8: Rig) -> None:
    for i in range(N):
        rig8.host.add(CLASS, f"v{i:03d}")
    rig8.start()
    rig8.kube.fail("create_pv", times=5)
    first = rig8.pass_()
    assert first.errors == 5 and first.created_by_mode == {"Filesystem": N - 5}
    assert len(rig8.events("Provisioned")) == N - 5
    second = rig8.pass_()  # the next pass creates exactly the missing ones
    assert second.errors == 0 and second.created_by_mode == {"Filesystem": 5}
    assert len(rig8.kube.pvs) == N and len(rig8.events("Provisioned")) == N


def test_name_clashes_among_concurrent_creates_resolve_as_one_at_a_time(rig8: Rig) -> None:
    for i in range(N):
        rig8.host.add(CLASS, f"v{i:03d}")
    rig8.start()
    rig8.pump()
    # made meanwhile, unseen by the cache: a twin's PV for the same path (adopted) and
    # another node's PV under the same name (left alone, reported once)
    twin = rig8.kube.put_pv(upstream_pv(rig8.name("v007"), "/mnt/disks/v007"))
    foreign = upstream_pv(rig8.name("v042"), "/mnt/other/v042")
    foreign["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"] = "x-node-9-u9"
    rig8.kube.put_pv(foreign)
    result = rig8.loop.sync()
    assert rig8.loop.events.drain(10)
    assert result.errors == 0 and result.created_by_mode == {"Filesystem": N - 2}
    cached = rig8.loop.cache.get(rig8.name("v007"))
    assert cached is not None and cached["metadata"]["uid"] == twin["metadata"]["uid"]
    assert rig8.reasons().count("NameConflict") == 1
    assert rig8.reasons().count("Provisioned") == N - 2
    assert rig8.kube.pvs[rig8.name("v042")]["spec"]["local"]["path"] == "/mnt/other/v042"


def test_withdrawals_run_concurrently_too(rig8: Rig) -> None:
    for i in range(40):
        rig8.host.add(CLASS, f"v{i:03d}")
    rig8.start()
    rig8.pass_()
    for i in range(40):
        rig8.host.unmount(CLASS, f"v{i:03d}")
    result = rig8.pass_()
    assert result.withdrawn == 40 and result.errors == 0 and rig8.kube.pvs == {}
    assert rig8.reasons().count("VolumeWithdrawn") == 40


# -- Events wait for the PVs ----------------------------------------------------------------------


def test_events_wait_while_a_pass_writes_pvs() -> None:
    kube = FakeKube()
    kube.add_node("n")
    recorder = EventRecorder(kube, lambda: NodeInfo(name="n", uid="u"))
    try:
        with recorder.held():
            for i in range(5):
                recorder.post(Notice("Node", "n", Reason.PROVISIONED, f"m{i}"))
            time.sleep(0.3)  # the poster is idle meanwhile: nothing may be sent
            assert kube.events == []
        assert recorder.drain(10)
        assert [e["message"] for e in kube.events] == [f"m{i}" for i in range(5)]
    finally:
        recorder.close()


def test_a_hold_never_holds_events_forever(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.events.HOLD_MAX", 0.2)
    kube = FakeKube()
    kube.add_node("n")
    recorder = EventRecorder(kube, lambda: NodeInfo(name="n", uid="u"))
    try:
        with recorder.held():
            recorder.post(Notice("Node", "n", Reason.PROVISIONED, "late"))
            eventually(lambda: kube.events, 5, "the Event after HOLD_MAX")
    finally:
        recorder.close()


# -- the apiserver's 429 --------------------------------------------------------------------------


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[Kube, FakeKube, list[float]]]:
    fake = FakeKube(watch_timeout=0.2)
    slept: list[float] = []
    with serving(fake, tmp_path) as (kubeconfig, _):
        yield Kube(str(kubeconfig), timeout=5.0, sleep=slept.append), fake, slept


def manifest(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": {"name": name},
            "spec": {"local": {"path": f"/mnt/disks/{name}"}, "capacity": {"storage": "1Gi"}}}


def test_a_429_is_sent_again_after_its_retry_after(api: tuple) -> None:
    kube, fake, slept = api
    fake.fail("create_pv", ApiError("create", 429, "too many requests", retry_after=2),
              times=2)
    created = kube.create_pv(manifest("a"))
    assert created["metadata"]["name"] == "a" and "a" in fake.pvs
    assert slept == [2.0, 2.0]
    assert kube.request_counts() == {("create", "throttled"): 2, ("create", "ok"): 1}


def test_a_429_without_retry_after_backs_off_and_a_long_one_is_capped(api: tuple) -> None:
    kube, fake, slept = api
    fake.fail("create_pv", ApiError("create", 429, "too many requests"), times=3)
    kube.create_pv(manifest("a"))
    assert len(slept) == 3 and 0 < slept[0] < slept[2] <= THROTTLE_WAIT_MAX
    slept.clear()
    fake.fail("create_pv", ApiError("create", 429, "slow down", retry_after=3600))
    kube.create_pv(manifest("b"))
    assert slept == [THROTTLE_WAIT_MAX]


def test_a_request_throttled_too_often_fails_and_the_next_pass_retries_it(
        api: tuple) -> None:
    kube, fake, slept = api
    fake.fail("create_pv", ApiError("create", 429, "too many", retry_after=1),
              times=THROTTLE_RETRIES + 1)
    with pytest.raises(ApiError) as failed:
        kube.create_pv(manifest("a"))
    assert failed.value.status == 429 and len(slept) == THROTTLE_RETRIES
    assert "a" not in fake.pvs
    kube.create_pv(manifest("a"))  # what the next pass does
    assert "a" in fake.pvs


def test_other_errors_are_never_retried_here(api: tuple) -> None:
    kube, fake, slept = api
    fake.fail("create_pv", ApiError("create", 503, "unavailable", retry_after=1))
    with pytest.raises(ApiError) as failed:
        kube.create_pv(manifest("a"))
    assert failed.value.status == 503 and slept == []


# -- the flag -------------------------------------------------------------------------------------


def test_the_flag_is_documented_defaults_to_8_and_refuses_0(
        capsys: pytest.CaptureFixture[str]) -> None:
    from agent.cli import _parser, _settings  # noqa: PLC0415

    parser = _parser()
    run = parser.parse_args(["run", "--node-name", "n"])
    assert _settings(run, None).api_concurrency == 8
    one = parser.parse_args(["run", "--node-name", "n", "--api-concurrency", "1"])
    assert _settings(one, None).api_concurrency == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--api-concurrency", "0"])
    assert "must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--help"])
    assert "--api-concurrency N" in capsys.readouterr().out


# -- a thousand new PVs made Available are not a thousand passes ----------------------------------


def test_a_new_pv_made_available_wakes_a_settled_pass_other_changes_one_at_once(
        tmp_path: Path) -> None:
    from agent.loop import AVAILABLE_SETTLE  # noqa: PLC0415
    from agent.pvcache import _wake_source  # noqa: PLC0415

    def pv(phase: str, claim: bool = False) -> dict[str, Any]:
        spec = {"claimRef": {"name": "c", "namespace": "d"}} if claim else {}
        return {"metadata": {"name": "p"}, "spec": spec, "status": {"phase": phase}}

    assert _wake_source("ADDED", None, pv("Pending")) is None
    assert _wake_source("MODIFIED", pv("Pending"), pv("Available")) == "pv-available"
    assert _wake_source("MODIFIED", pv(""), pv("Available")) == "pv-available"
    assert _wake_source("MODIFIED", pv("Available"), pv("Available")) is None
    assert _wake_source("MODIFIED", pv("Available"), pv("Bound", claim=True)) == "pv-modified"
    assert _wake_source("MODIFIED", pv("Pending"), pv("Bound", claim=True)) == "pv-modified"
    assert _wake_source("MODIFIED", pv("Bound", claim=True), pv("Released", claim=True)) == \
        "pv-modified"
    assert _wake_source("MODIFIED", pv("Released"), pv("Available")) == "pv-modified"
    assert _wake_source("DELETED", pv("Available"), pv("Available")) == "pv-deleted"
    rig = Rig(tmp_path)
    try:
        schedule = rig.loop.waker.schedule
        assert schedule.settle["pv-available"] == AVAILABLE_SETTLE > 0
        schedule.woken("pv-available")
        assert schedule.due() > time.monotonic() + AVAILABLE_SETTLE / 2  # waits for company
        schedule.woken("mount")
        assert schedule.due() <= time.monotonic()  # a mount asks for a pass now: served along
        waker = rig.loop.waker  # the same through the Waker, whose Event ends the loop's wait
        waker.take_first_wake()
        waker.wake("pv-available")
        assert rig.loop.wake.is_set()
        assert waker.due() > time.monotonic() + AVAILABLE_SETTLE / 2  # still settles
        assert waker.due() > time.monotonic() + AVAILABLE_SETTLE / 2
        rig.loop.wake.set()  # set by anyone else (a fresh list, a cleaner): a pass now
        assert waker.due() <= time.monotonic()
    finally:
        rig.close()


def test_events_wait_for_a_pass_after_one_that_wrote_never_for_idle_ones(
        tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    held: list[int] = []
    take = rig.loop._sync

    def observed() -> Any:
        held.append(rig.loop.events._holds)
        return take()

    rig.loop._sync = observed  # type: ignore[method-assign]
    try:
        rig.host.add(CLASS, "a")
        rig.start()
        rig.pass_()  # nothing written before it: Events flow while it observes
        rig.pass_()  # right after a pass that created a PV: Events wait throughout
        rig.pass_()  # after one that wrote nothing
        assert held == [0, 1, 0]
    finally:
        rig.close()
