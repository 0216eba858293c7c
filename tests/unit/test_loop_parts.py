"""The parts around the pass: the PV watch, Event posting, config reloads, the run loop."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import watching as watching_module
from agent.backoff import Backoff, exponential, resync_period, watch_timeout
from agent.events import EventRecorder
from agent.kube import ApiError
from agent.notices import Notice, Once, Reason, Scope
from agent.pv import CleaningRecord, CleaningState
from agent.pvcache import GONE_KEPT, GONE_SECONDS, PVCache, PVWatcher
from agent.volumes import NodeInfo
from devkit.fake_kube import FakeKube
from tests.unit.rig import CLASS, NODE, Rig, eventually

SELECTOR = "app.kubernetes.io/managed-by=localpv-agent"


def pv(name: str, labels: dict[str, str] | None = None, phase: str = "Available") -> dict:
    return {"metadata": {"name": name, "labels": {"app.kubernetes.io/managed-by": "localpv-agent"}
                         if labels is None else labels},
            "spec": {"local": {"path": f"/mnt/disks/{name}"}}, "status": {"phase": phase}}


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries after milliseconds, not seconds."""
    for module in ("agent.runloop", "agent.watching"):
        monkeypatch.setattr(f"{module}.Backoff",
                            lambda **kw: Backoff(0.01, 0.02, **kw))


@pytest.fixture
def watching(fast_backoff: None) -> Iterator[tuple[FakeKube, PVCache, list[str], threading.Event]]:
    kube = FakeKube(watch_timeout=0.05)
    cache, woken, stop = PVCache(), [], threading.Event()
    watcher = PVWatcher(kube, cache, SELECTOR, stop, lambda s: woken.append(s or "list"))
    watcher.start()
    yield kube, cache, woken, stop
    stop.set()
    kube.close()


# -- the watch ---------------------------------------------------------------------------------


def test_the_watch_lists_then_follows_changes_of_its_selection_only(watching: tuple) -> None:
    kube, cache, woken, _ = watching
    kube.put_pv(pv("a"))
    kube.put_pv(pv("foreign", labels={}))
    eventually(lambda: cache.get("a"), what="the PV in the cache")
    assert cache.get("foreign") is None
    kube.bind("a")
    eventually(lambda: "pv-modified" in woken, what="a wake-up for the new phase")
    kube.update_pv("a", lambda p: p["metadata"]["labels"].clear())  # leaves the selection
    eventually(lambda: cache.get("a") is None, what="the PV gone from the cache")
    assert "pv-deleted" in woken
    assert kube.calls["list_pv_snapshot"] == 1  # one list, then watches resumed from it


def test_an_expired_watch_lists_again(watching: tuple) -> None:
    kube, cache, woken, _ = watching
    eventually(lambda: kube.calls["watch_pvs"] >= 1, what="a watch")
    kube.put_pv(pv("before"))
    eventually(lambda: cache.get("before"), what="the first PV")
    kube.compact()  # etcd compacted: the watch in flight ends with 410 Gone
    kube.put_pv(pv("after"))
    eventually(lambda: cache.get("after") and kube.calls["list_pv_snapshot"] >= 2,
               what="a relist after 410")
    assert woken.count("list") >= 2


def test_a_failing_watch_backs_off_and_relists(watching: tuple) -> None:
    kube, cache, _, _ = watching
    eventually(lambda: kube.calls["watch_pvs"] >= 1, what="a watch")
    kube.fail("watch_pvs", ApiError("watch", 0, "connection reset"))
    eventually(lambda: kube.calls["list_pv_snapshot"] >= 2, timeout=15, what="a relist")
    kube.put_pv(pv("later"))
    eventually(lambda: cache.get("later"), timeout=15, what="the cache current again")


def test_a_crash_in_the_watch_relists_instead_of_going_stale(watching: tuple) -> None:
    kube, cache, _, _ = watching
    eventually(lambda: kube.calls["watch_pvs"] >= 1, what="a watch")
    kube.fail("watch_pvs", RuntimeError("a bug"))
    eventually(lambda: kube.calls["list_pv_snapshot"] >= 2, timeout=15, what="a relist")
    kube.put_pv(pv("later"))
    eventually(lambda: cache.get("later"), timeout=15, what="the cache current again")


def test_each_watch_asks_for_its_own_length_so_watches_begun_together_end_apart(
        fast_backoff: None, monkeypatch: pytest.MonkeyPatch) -> None:
    kube = FakeKube(watch_timeout=0.01)
    asked: list[int] = []
    real = kube.watch_pvs

    def watch(selector: str, version: str, timeout_seconds: int = 300) -> Iterator[tuple]:
        asked.append(timeout_seconds)
        return real(selector, version, timeout_seconds)

    monkeypatch.setattr(kube, "watch_pvs", watch)
    stop = threading.Event()
    PVWatcher(kube, PVCache(), SELECTOR, stop, lambda s: None).start()
    try:
        eventually(lambda: len(asked) >= 5, what="five watch requests")
    finally:
        stop.set()
        kube.close()
    assert all(300 <= t < 600 for t in asked) and len(set(asked)) > 1, asked
    assert (watch_timeout(rand=lambda: 0.0), watch_timeout(rand=lambda: 0.999)) == (300, 599)


def test_the_cache_keeps_its_own_deletes_and_newer_versions() -> None:
    cache = PVCache()
    newer = {"metadata": {"name": "p", "uid": "u", "resourceVersion": "12"}}
    cache.apply("MODIFIED", newer)
    cache.put({"metadata": {"name": "p", "uid": "u", "resourceVersion": "11"}})
    assert cache.get("p") == newer
    cache.forget("p", "u")
    cache.replace({"p": newer}, "13")  # a list racing the delete
    assert cache.get("p") is None and cache.version == "13"
    cache.expire()
    assert cache.version == ""


def test_a_deleted_pv_never_comes_back_from_a_late_response_or_event() -> None:
    """A write's response read before the DELETED event but applied after it (the watch runs
    on its own thread) must not bring the PV back: the cache would keep it until a relist."""
    cache = PVCache()
    old = {"metadata": {"name": "p", "uid": "u", "resourceVersion": "20"}}
    cache.forget("p", "u")
    cache.apply("DELETED", old)
    cache.put(old)
    cache.apply("MODIFIED", old)
    assert cache.get("p") is None
    fresh = {"metadata": {"name": "p", "uid": "v", "resourceVersion": "22"}}
    cache.put(fresh)  # the same name, a new object: kept
    cache.apply("DELETED", old)  # a late event about the old one removes nothing
    assert cache.get("p") == fresh


def test_a_response_overtaken_by_its_deleted_event_does_not_bring_the_pv_back() -> None:
    """Seen over thousands of mount/unmount cycles: the agent's create response was put in
    the cache after the watch had delivered the PV's deletion (by someone else); the cache
    then held a PV that did not exist, and the disk got none until the next relist."""
    cache = PVCache()
    first = {"metadata": {"name": "p", "uid": "u1", "resourceVersion": "10"}}
    cache.apply("DELETED", {"metadata": {**first["metadata"], "resourceVersion": "11"}})
    cache.put(first)  # the create's response, late
    assert cache.get("p") is None
    second = {"metadata": {"name": "p", "uid": "u2", "resourceVersion": "12"}}
    cache.put(second)  # a new object of the same name is welcome
    cache.apply("DELETED", first)  # a late event about the old one leaves the new one
    assert cache.get("p") == second
    for i in range(GONE_KEPT + 10):  # what is remembered stays bounded
        cache.apply("DELETED", {"metadata": {"name": f"x{i}", "uid": f"x{i}"}})
    assert len(cache._deleted) == GONE_KEPT


def test_a_deleted_uid_is_forgotten_once_nothing_late_can_arrive_about_it() -> None:
    """Over 10,000 mount/unmount cycles a UID kept per deleted PV grew the agent by a MiB:
    a UID is kept GONE_SECONDS, long enough for any late response, event or list."""
    now = [0.0]
    cache = PVCache(clock=lambda: now[0])
    old = {"metadata": {"name": "p", "uid": "u", "resourceVersion": "20"}}
    cache.forget("p", "u")
    now[0] = GONE_SECONDS - 1
    cache.forget("q", "w")
    cache.put(old)  # still within the window: a late response changes nothing
    assert cache.get("p") is None
    now[0] = GONE_SECONDS + 1
    cache.replace({}, "30")  # a relist forgets the old ones even with no delete since
    assert list(cache._deleted) == ["w"]
    now[0] = 2 * GONE_SECONDS
    cache.apply("DELETED", {"metadata": {"name": "r", "uid": "x"}})
    assert list(cache._deleted) == ["x"]
    cache.put(old)  # long after: nothing late is in flight any more; the cache takes it
    assert cache.get("p") == old


# -- Events ------------------------------------------------------------------------------------


def notice(subject: str, scope: Scope = Scope.EXCLUDED) -> Notice:
    return Notice("Node", NODE, Reason.VOLUME_EXCLUDED, f"entry {subject}", Once(scope, subject))


@pytest.fixture
def recorder() -> Iterator[tuple[FakeKube, EventRecorder]]:
    kube = FakeKube()
    events = EventRecorder(kube, lambda: NodeInfo(NODE, uid="node-uid"))
    yield kube, events
    events.close()


def test_a_lasting_condition_is_posted_once_and_again_after_it_cleared(
        recorder: tuple, caplog: pytest.LogCaptureFixture) -> None:
    kube, events = recorder
    for _ in range(3):
        events.report([notice("a"), notice("b")], scopes={Scope.EXCLUDED})
    assert events.drain(5)
    assert [e["message"] for e in kube.events] == ["entry a", "entry b"]
    assert kube.events[0]["involvedObject"]["uid"] == "node-uid"  # a Node's Event names it
    with caplog.at_level(logging.INFO):
        events.report([notice("a")], scopes={Scope.EXCLUDED})  # b cleared
    assert "condition cleared: excluded/b" in caplog.text
    events.report([notice("a"), notice("b")], scopes={Scope.EXCLUDED})
    events.report([], scopes={Scope.MISSING})  # another scope clears nothing of this one
    events.report([notice("a"), notice("b")])
    assert events.drain(5)
    assert [e["message"] for e in kube.events] == ["entry a", "entry b", "entry b"]


def test_an_event_the_api_refused_is_posted_by_a_later_report(recorder: tuple) -> None:
    kube, events = recorder
    kube.fail("emit_event")
    events.report([notice("a")])
    assert events.drain(5) and kube.events == [] and events.failed == 1
    assert not events.reported(Once(Scope.EXCLUDED, "a"))
    events.report([notice("a")])
    assert events.drain(5) and len(kube.events) == 1


def test_posting_never_waits_for_a_stalled_api(recorder: tuple) -> None:
    kube, events = recorder
    gate = threading.Event()
    stalled = kube.emit_event

    def stall(*args: object) -> None:
        gate.wait(10)
        stalled(*args)  # type: ignore[arg-type]

    kube.emit_event = stall  # type: ignore[method-assign]
    started = time.monotonic()
    for i in range(50):
        events.post(Notice("Node", NODE, Reason.VOLUME_CLEANED, f"{i}"))
    assert time.monotonic() - started < 1
    assert not events.drain(0.1)
    gate.set()
    assert events.drain(10)
    assert [e["message"] for e in kube.events] == [str(i) for i in range(50)]  # in order


def test_a_full_queue_drops_new_events_and_reports_them_later(recorder: tuple) -> None:
    kube, _ = recorder
    gate = threading.Event()
    posted = kube.emit_event

    def slow(*args: object) -> None:
        gate.wait(10)
        posted(*args)  # type: ignore[arg-type]

    kube.emit_event = slow  # type: ignore[method-assign]
    events = EventRecorder(kube, lambda: NodeInfo(NODE), limit=2)
    try:
        for subject in "abcd":
            events.report([notice(subject)])
        dropped = [s for s in "abcd" if not events.reported(Once(Scope.EXCLUDED, s))]
        assert dropped  # at most 2 wait and 1 is being posted
        gate.set()
        assert events.drain(10)
        events.report(notice(s) for s in "abcd")  # the next pass reports the dropped ones
        assert events.drain(10)
        assert sorted(e["message"] for e in kube.events) == [f"entry {s}" for s in "abcd"]
    finally:
        events.close()


def test_a_closed_recorder_posts_nothing_more(recorder: tuple) -> None:
    kube, events = recorder
    events.post(Notice("PersistentVolume", "pv", Reason.PROVISIONED, "made", uid="u"))
    events.close(5)
    events.post(Notice("PersistentVolume", "pv", Reason.PROVISIONED, "late"))
    assert [e["message"] for e in kube.events] == ["made"]
    assert kube.events[0]["type"] == "Normal"


def test_reasons_carry_their_event_type() -> None:
    normal = (Reason.PROVISIONED, Reason.VOLUME_CLEANED, Reason.CONFIG_RELOADED,
              Reason.CAPACITY_UPDATED)
    assert {r.event_type for r in normal} == {"Normal"}
    assert {r.event_type for r in Reason if r not in normal} == {"Warning"}
    assert str(Once(Scope.MISSING, "pv/uid")) == "missing/pv/uid"


# -- config reloads ----------------------------------------------------------------------------


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def test_a_valid_config_edit_applies_and_a_bad_one_is_rejected(rig: Rig) -> None:
    rig.host.add(CLASS, "a")
    rig.host.add("fast", "f")
    rig.kube.add_storage_class("fast")
    rig.start()
    rig.pass_()
    assert rig.pv("f", "fast") is None
    rig.write_config({**rig.classes, "fast": {"hostDir": "/mnt/fast"}})
    assert rig.loop.runner.reload_config()
    assert not rig.loop.runner.reload_config()  # unchanged since
    rig.pass_()
    assert rig.pv("f", "fast") is not None
    rig.config_path.write_text("storageClassMap: {fast: {volumeMode: Blok}}\n")
    assert not rig.loop.runner.reload_config()
    assert sorted(c.name for c in rig.loop.config.classes) == ["fast", CLASS]  # the last good
    assert rig.loop.events.drain(5)
    assert [r for r in rig.reasons() if r.startswith("Config")] == [
        "ConfigReloaded", "ConfigRejected"]
    assert rig.loop.reloader.counts() == {"applied": 1, "rejected": 1}


def test_a_config_fix_ends_a_backoff_wait_at_once(rig: Rig) -> None:
    rig.start()
    waited = threading.Thread(target=rig.loop.runner.backoff_wait, args=(60.0,))
    started = time.monotonic()
    waited.start()
    rig.write_config({**rig.classes, "fast": {"hostDir": "/mnt/fast"}})
    waited.join(30)
    assert not waited.is_alive() and time.monotonic() - started < 30


# -- the run loop ------------------------------------------------------------------------------


def test_the_loop_runs_passes_on_wake_ups_and_stops_promptly(tmp_path: Path) -> None:
    rig = Rig(tmp_path, resync_period=3600.0, debounce=0.0)
    rig.kube.watch_timeout = 0.05
    rig.host.add(CLASS, "a")
    loop = threading.Thread(target=rig.loop.run, name="reconcile")
    loop.start()
    try:
        eventually(lambda: rig.pv("a"), what="the first PV")
        passes = rig.loop.state.passes
        rig.host.add(CLASS, "b")
        rig.loop.waker.wake("udev")
        eventually(lambda: rig.pv("b"), what="the PV of a hot-added disk")
        # the PV exists as soon as the create returns; the pass is counted when it ends
        eventually(lambda: rig.loop.state.passes > passes, what="the pass counted")
        assert rig.loop.state.first_sync_done
        rig.kube.remove_pv(rig.name("a"))  # deleted by hand: the watch wakes the loop
        eventually(lambda: rig.pv("a"), what="the PV made again")
    finally:
        stopped = time.monotonic()
        rig.loop.shutdown()
        loop.join(10)
        assert not loop.is_alive() and time.monotonic() - stopped < 5
        rig.close()
    assert rig.kube.events and all(e["reason"] == "Provisioned" for e in rig.kube.events)


def test_failed_passes_back_off_and_only_non_api_streaks_count_as_wedged(
        tmp_path: Path, fast_backoff: None) -> None:
    rig = Rig(tmp_path, resync_period=3600.0, debounce=0.0)
    rig.kube.watch_timeout = 0.05
    rig.host.add(CLASS, "a")
    rig.kube.fail("get_node", ApiError("get", 0, "refused"))  # startup retries
    rig.kube.fail("create_pv", times=2)
    loop = threading.Thread(target=rig.loop.run, name="reconcile")
    loop.start()
    try:
        eventually(lambda: rig.pv("a"), timeout=30, what="the PV after the API recovered")
        assert rig.kube.calls["create_pv"] == 3
        assert not rig.loop.wedged(0.0)  # the API's fault: never a restart
        rig.loop.state.failing_since = time.monotonic() - 10
        rig.loop.state.failing_for_api = False
        assert rig.loop.wedged(5.0)
    finally:
        rig.loop.shutdown()
        loop.join(10)
        rig.close()


def test_a_crashing_or_host_failing_pass_is_retried(rig: Rig, monkeypatch: pytest.MonkeyPatch,
                                                    fast_backoff: None) -> None:
    rig.host.add(CLASS, "a")
    calls = []

    def broken(config: object, interrupted: object = None) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")
        raise RuntimeError("a bug")

    monkeypatch.setattr(rig.host, "snapshot", broken)
    rig.kube.watch_timeout = 0.05
    loop = threading.Thread(target=rig.loop.run, name="reconcile")
    loop.start()
    try:
        eventually(lambda: len(calls) >= 3, what="passes retried after failures")
        assert rig.loop.state.failing_since is not None and not rig.loop.state.failing_for_api
    finally:
        rig.loop.shutdown()
        loop.join(10)


# -- backoff and records -----------------------------------------------------------------------


def test_backoff_doubles_to_its_bound_with_jitter_that_only_shortens() -> None:
    assert [exponential(n, 1.0, 60.0, rand=lambda: 0.0) for n in (1, 2, 3, 7, 8, 500)] == [
        1.0, 2.0, 4.0, 60.0, 60.0, 60.0]
    assert exponential(3, 1.0, 60.0, rand=lambda: 1.0) == pytest.approx(3.2)
    backoff = Backoff(rand=lambda: 0.5)
    assert [backoff.next_delay() for _ in range(3)] == [0.9, 1.8, 3.6]
    backoff.reset()
    assert backoff.next_delay() == 0.9
    assert resync_period(300.0, rand=lambda: 0.0) == 300.0
    assert resync_period(300.0, rand=lambda: 0.999) < 600.0
    spread = [resync_period(300.0) for _ in range(50)]
    assert len({int(p) for p in spread}) > 10 and all(300 <= p < 600 for p in spread)


def test_relists_after_a_failure_spread_over_most_of_their_delay(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Agents that lost the API together must not relist together: the delay after a failed
    watch is drawn from 10% to 100% of the backoff, never longer."""
    waits: list[float] = []
    stop = threading.Event()

    def wait(delay: float) -> bool:
        waits.append(delay)
        return len(waits) >= 200

    def failing() -> None:
        raise ApiError("watch", 0, "connection refused")

    monkeypatch.setattr(stop, "wait", wait)
    monkeypatch.setattr(stop, "is_set", lambda: len(waits) >= 200)
    monkeypatch.setattr(watching_module, "Backoff",
                        lambda jitter: Backoff(jitter=jitter, maximum=1.0))
    watching_module.follow("PV", failing, lambda: None, stop)
    assert all(0.1 <= w <= 1.0 for w in waits)
    assert min(waits) < 0.3 and max(waits) > 0.8  # spread, not bunched near the full delay


def test_the_cleaning_record_round_trips_and_tolerates_anything() -> None:
    running = CleaningRecord.running("node-1/abc", 2, 1000.0)
    assert CleaningRecord.from_annotation(running.to_annotation()) == running
    failed = CleaningRecord.failed(3, 2000.0, "x" * 900)
    back = CleaningRecord.from_annotation(failed.to_annotation())
    assert back == failed and len(back.error) == 500
    assert back.state is CleaningState.FAILED
    for junk in ("", "not json", "[]", '{"heartbeat": "soon"}', '{"attempts": 1e400}',
                 '{"state": "exploded"}'):
        assert CleaningRecord.from_annotation(junk).state is CleaningState.NONE
    legacy = '{"state": "running", "by": "n/x", "heartbeat": 5, "attempts": 0, "retryAfter": 0}'
    assert CleaningRecord.from_annotation(legacy).live_elsewhere("me", 10.0, 60.0)
    assert not CleaningRecord.from_annotation(legacy).live_elsewhere("n/x", 10.0, 60.0)
