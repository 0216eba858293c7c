"""Recycling through the loop, on the in-memory API: the state machine and its safety checks.

The cleaner here is the real one (locks, queue, the confirm and identity checks under the
lock) with a clean that removes nothing; tests/e2e/test_recycling.py cleans real disks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cleaner import CleanError, CleanJob
from agent.kube import ApiError
from agent.pv import CLEANING_ANNOTATION, CleaningRecord, CleaningState
from tests.unit.rig import CLASS, Rig, eventually


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path, clean_retry_base=30.0, clean_stale_after=60.0)
    yield r
    r.close()


def claimed_then_released(rig: Rig, entry: str = "a") -> str:
    """A PV created, bound (its volume marked dirty), then released by its claim."""
    rig.host.add(CLASS, entry)
    rig.start()
    rig.pass_()
    name = rig.name(entry)
    rig.kube.bind(name)
    rig.pass_()
    assert rig.dirty.paths() == {f"/mnt/disks/{entry}"}
    rig.kube.release(name)
    return name


def record(rig: Rig, name: str) -> CleaningRecord:
    return CleaningRecord.of(rig.kube.pvs[name])


def test_a_released_volume_is_cleaned_its_pv_deleted_and_offered_again(rig: Rig) -> None:
    name = claimed_then_released(rig)
    uid = rig.kube.pvs[name]["metadata"]["uid"]
    started = rig.pass_()
    assert started.cleaning == {name}
    running = record(rig, name)
    assert running.state is CleaningState.RUNNING and running.by == rig.loop.ctx.instance
    assert rig.cleaner is not None
    rig.cleaner.wait()
    # the next pass acts on the outcome first (the PV deleted, the dirt forgotten), then
    # offers the clean disk again with a fresh PV
    offered = rig.pass_()
    assert rig.cleaner.cleaned == ["/mnt/disks/a"]
    assert rig.dirty.paths() == frozenset()
    assert [o.ok for o in rig.outcomes] == [True]
    assert "VolumeCleaned" in rig.reasons()
    assert offered.created_by_mode == {"Filesystem": 1}
    assert rig.kube.pvs[name]["metadata"]["uid"] != uid
    assert record(rig, name).state is CleaningState.NONE


def test_a_cleaned_pv_still_held_by_its_finalizer_is_not_taken_back(rig: Rig) -> None:
    """After the clean, the PV's delete waits on kube-controller-manager's pv-protection
    finalizer: the recreate meets the terminating PV (409). It must not be adopted (a ghost
    the cache would keep) nor marked dirty again; once gone, a fresh PV is offered."""
    name = claimed_then_released(rig)
    rig.kube.update_pv(name, lambda pv: pv["metadata"].update(
        finalizers=["kubernetes.io/pv-protection"]))
    uid = rig.kube.pvs[name]["metadata"]["uid"]
    rig.pass_()
    assert rig.cleaner is not None
    rig.cleaner.wait()
    for _ in range(2):
        held = rig.pass_()
        assert held.created_by_mode == {} and held.errors == 0
        assert rig.kube.pvs[name]["metadata"]["uid"] == uid  # still terminating
        assert rig.loop.cache.get(name) is None and rig.dirty.paths() == frozenset()
    rig.kube.finalize_pv(name)
    offered = rig.pass_()
    assert offered.created_by_mode == {"Filesystem": 1}
    fresh = rig.kube.pvs[name]
    assert fresh["metadata"]["uid"] != uid and fresh["status"]["phase"] == "Available"
    assert rig.cleaner.cleaned == ["/mnt/disks/a"] and rig.dirty.paths() == frozenset()


def test_a_failed_clean_is_recorded_on_the_pv_and_retried_after_its_delay(rig: Rig) -> None:
    name = claimed_then_released(rig)
    assert rig.cleaner is not None
    rig.cleaner.failure = "device busy"
    rig.pass_()
    rig.cleaner.wait()
    rig.pass_()
    failed = record(rig, name)
    assert failed.state is CleaningState.FAILED and failed.attempts == 1
    assert failed.error == "device busy"
    assert time.time() + 20 < failed.retry_after <= time.time() + 30  # jittered, never longer
    assert rig.reasons().count("VolumeFailedDelete") == 1
    assert [o.ok for o in rig.outcomes] == [False]
    rig.pass_()
    assert rig.cleaner.cleaned == [] and rig.loop.cleaner is not None
    assert rig.loop.cleaner.running() == frozenset()  # waiting, not retried at once
    # the retry time passes: the next attempt runs, and succeeds
    rig.cleaner.failure = ""
    rig.kube.update_pv(name, lambda pv: pv["metadata"]["annotations"].update({
        CLEANING_ANNOTATION: CleaningRecord.failed(1, time.time() - 1, "x").to_annotation()}))
    rig.pass_()
    assert record(rig, name).attempts == 1  # the running record keeps the count
    rig.cleaner.wait()
    rig.pass_()
    assert rig.cleaner.cleaned == ["/mnt/disks/a"]
    assert record(rig, name).state is CleaningState.NONE  # a new PV


def test_a_released_pv_on_a_swapped_disk_is_never_cleaned(rig: Rig) -> None:
    name = claimed_then_released(rig)
    rig.host.swap(CLASS, "a")
    for _ in range(2):
        result = rig.pass_()
        assert result.plan.changed_disk == (name,)
    assert rig.cleaner is not None and rig.cleaner.cleaned == []
    assert record(rig, name).state is CleaningState.NONE
    # reported once on the PV, and once on the Node for the dirty record it cannot clear
    assert sorted(e["involvedObject"]["kind"] for e in rig.events("DiskChanged")) == [
        "Node", "PersistentVolume"]
    assert name in rig.kube.pvs


def test_a_disk_swapped_after_the_decision_is_caught_under_the_lock(rig: Rig) -> None:
    """The identity is read from the device right before the first byte."""
    name = claimed_then_released(rig)
    assert rig.cleaner is not None
    rig.cleaner.identify = lambda job: {"fs-uuid": "someone-else"}
    rig.pass_()
    rig.cleaner.wait()
    rig.pass_()
    assert rig.cleaner.cleaned == [] and name in rig.kube.pvs
    assert rig.outcomes == []  # not an attempt: nothing was touched


def test_a_pv_replaced_after_the_decision_is_not_cleaned(rig: Rig) -> None:
    name = claimed_then_released(rig)
    pv = rig.kube.pvs[name]
    job = CleanJob(key="/mnt/disks/a", pv_name=name, pv_uid=pv["metadata"]["uid"],
                   class_name=CLASS, mode="Filesystem", raw_device=False,
                   container_path="/mnt/disks/a", mount_dir="/mnt/disks", device="7:1",
                   command=())
    rig.loop.confirm_clean(job)  # the decision holds
    rig.kube.remove_pv(name)
    rig.kube.put_pv({**pv, "metadata": {"name": name}, "status": {"phase": "Released"}})
    with pytest.raises(CleanError, match="no longer the Released PV"):
        rig.loop.confirm_clean(job)  # same name, another object
    rig.kube.fail("get_pv")
    with pytest.raises(CleanError, match="cannot re-read"):
        rig.loop.confirm_clean(job)


def test_a_live_twin_clean_is_left_alone_and_a_stale_one_resumed(rig: Rig) -> None:
    name = claimed_then_released(rig)
    twin = CleaningRecord.running("node-1/twin", 0, time.time())
    rig.kube.update_pv(name, lambda pv: pv["metadata"]["annotations"].update(
        {CLEANING_ANNOTATION: twin.to_annotation()}))
    result = rig.pass_()
    assert result.cleaning == {name}
    assert rig.cleaner is not None and rig.cleaner.running() == frozenset()
    stale = CleaningRecord.running("node-1/twin", 0, time.time() - 120)
    rig.kube.update_pv(name, lambda pv: pv["metadata"]["annotations"].update(
        {CLEANING_ANNOTATION: stale.to_annotation()}))
    rig.pass_()
    assert record(rig, name).by == rig.loop.ctx.instance  # resumed here
    rig.cleaner.wait()
    rig.pass_()
    assert rig.cleaner.cleaned == ["/mnt/disks/a"]


def test_a_volume_locked_by_another_agent_is_looked_at_again(rig: Rig) -> None:
    name = claimed_then_released(rig)
    assert rig.cleaner is not None
    held = rig.cleaner.lock("/mnt/disks/a")
    assert held is not None
    try:
        rig.pass_()
        assert record(rig, name).state is CleaningState.NONE  # not even recorded
        assert rig.loop.waker.next_alarm() < float("inf")
    finally:
        held.release()


def test_a_conflicting_running_record_defers_the_clean(rig: Rig) -> None:
    name = claimed_then_released(rig)
    rig.pump()
    rig.kube.update_pv(name, lambda pv: pv["metadata"]["labels"].update({"x": "y"}))
    result = rig.loop.sync()  # decided on a version that changed meanwhile
    assert result.errors == 0 and rig.cleaner is not None
    assert rig.cleaner.running() == frozenset()
    rig.kube.fail("patch_pv_annotations")
    assert rig.pass_().errors == 1  # a refused write is an error: the loop backs off


def test_a_dirty_volume_whose_pv_was_deleted_is_cleaned_before_it_is_offered(rig: Rig) -> None:
    name = claimed_then_released(rig)
    rig.kube.remove_pv(name)  # deleted by hand before it was cleaned
    result = rig.pass_()
    assert result.created_by_mode == {}  # held until cleaned
    assert rig.cleaner is not None
    rig.cleaner.wait()
    assert rig.pass_().created_by_mode == {"Filesystem": 1}
    assert rig.cleaner.cleaned == ["/mnt/disks/a"] and rig.dirty.paths() == frozenset()


def test_a_dirty_volume_without_a_pv_that_fails_to_clean_is_retried_later(rig: Rig) -> None:
    name = claimed_then_released(rig)
    rig.kube.remove_pv(name)
    assert rig.cleaner is not None
    rig.cleaner.failure = "EIO"
    rig.pass_()
    rig.cleaner.wait()
    rig.pass_()
    assert rig.reasons().count("VolumeFailedDelete") == 1
    rig.pass_()
    assert rig.cleaner.running() == frozenset()  # waiting for its retry
    assert rig.dirty.paths() == {"/mnt/disks/a"}


def test_a_dirty_volume_on_a_different_disk_is_held_and_never_cleaned(rig: Rig) -> None:
    name = claimed_then_released(rig)
    rig.kube.remove_pv(name)
    rig.host.swap(CLASS, "a")
    for _ in range(2):
        assert rig.pass_().created_by_mode == {}
    assert rig.cleaner is not None and rig.cleaner.cleaned == []
    assert rig.loop.recycler.guard.held == {"/mnt/disks/a": "disk_changed"}
    (changed,) = rig.events("DiskChanged")
    assert "delete" in changed["message"] and "to offer it" in changed["message"]


def test_a_legacy_dirty_record_without_identity_is_held_as_unverified(rig: Rig) -> None:
    rig.host.add(CLASS, "a")
    record_file = rig.dirty.file_of("/mnt/disks/a")
    record_file.write_text(json.dumps({"path": "/mnt/disks/a", "pv": "old", "since": "then"}))
    rig.start()
    assert rig.pass_().created_by_mode == {}
    assert rig.loop.recycler.guard.held == {"/mnt/disks/a": "unverified"}
    assert rig.reasons() == ["VolumeUnverified"]


def test_a_released_pv_whose_disk_cannot_be_recognised_is_reported_not_cleaned(
        rig: Rig) -> None:
    name = claimed_then_released(rig)
    rig.kube.update_pv(name, lambda pv: pv["metadata"]["annotations"].pop(
        "localpv-agent.io/fs-uuid"))
    rig.host.entries[CLASS]["a"].identity = {}
    rig.pass_()
    assert rig.cleaner is not None and rig.cleaner.running() == frozenset()
    assert "VolumeUnverified" in rig.reasons()


def test_heartbeats_renew_the_record_of_a_running_clean_off_the_loop_thread(
        rig: Rig) -> None:
    name = claimed_then_released(rig)
    recycler = rig.loop.recycler
    rig.pump()
    rig.loop.sync()
    assert recycler.heartbeats.tracked() == {name}
    first = record(rig, name).heartbeat
    # pretend the clean is still running and the last renewal is due
    recycler.heartbeats._last[name] = time.monotonic() - 3600
    recycler.heartbeats.running = lambda: frozenset({"/mnt/disks/a"})
    time.sleep(0.01)
    recycler.heartbeats.renew_due()
    assert record(rig, name).heartbeat > first
    assert record(rig, name).state is CleaningState.RUNNING
    recycler.heartbeats.running = frozenset
    recycler.heartbeats.renew_due()
    assert recycler.heartbeats.tracked() == frozenset()  # no longer cleaned here


def test_a_failed_renewal_is_logged_and_tried_again(rig: Rig) -> None:
    name = claimed_then_released(rig)
    rig.pump()
    rig.loop.sync()
    beats = rig.loop.recycler.heartbeats
    beats._last[name] = 0.0
    beats.running = lambda: frozenset({"/mnt/disks/a"})
    rig.kube.fail("patch_pv_annotations", ApiError("patch", 500, "etcd timeout"))
    beats.renew_due()
    assert beats.tracked() == {name}


def test_the_heartbeat_thread_renews_on_its_own(tmp_path: Path) -> None:
    rig = Rig(tmp_path, clean_stale_after=0.3)
    try:
        name = claimed_then_released(rig)
        assert rig.cleaner is not None
        rig.pump()
        rig.loop.sync()  # the clean stays "running" until the next pass collects it
        first = record(rig, name).heartbeat
        eventually(lambda: record(rig, name).heartbeat > first, what="a renewal")
    finally:
        rig.close()


def job_rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **settings: Any) -> Rig:
    """A Block class cleaned by Jobs; the device checks that need a real device pass."""
    monkeypatch.setattr("agent.jobclean.verify_block_device", lambda path, device: None)
    rig = Rig(tmp_path, classes={CLASS: {"hostDir": "/mnt/disks", "volumeMode": "Block"}},
              **settings)
    rig.write_config(rig.classes, useJobForCleaning=True)
    rig.loop.ctx.config = rig.loop.reloader.check(rig.loop.config) or rig.loop.config
    assert rig.loop.config.use_job_for_cleaning
    return rig


def block_released(rig: Rig) -> str:
    disk = rig.host.add(CLASS, "sdb", wwn="0x5000c500a1b2c3d4")
    rig.host.block.add("sdb")
    assert disk.device
    rig.start()
    rig.pass_()
    name = rig.name("sdb")
    rig.kube.bind(name)
    rig.pass_()
    rig.kube.release(name)
    return name


def test_a_job_cleans_a_block_volume_then_the_pv_is_deleted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = job_rig(tmp_path, monkeypatch, job_image="cleaner:1", namespace="ns")
    try:
        name = block_released(rig)
        rig.pass_()
        ((namespace, job_name),) = rig.kube.jobs
        assert (namespace, job_name) == ("ns", f"cleanup-{name}")
        rig.pass_()
        assert name in rig.kube.pvs  # still running
        rig.kube.jobs[("ns", job_name)]["status"] = {"succeeded": 1, "conditions": [
            {"type": "Complete", "status": "True"}]}
        uid = rig.kube.pvs[name]["metadata"]["uid"]
        rig.pass_()
        assert rig.kube.jobs == {} and rig.kube.pvs[name]["metadata"]["uid"] != uid
        assert [(o.ok, o.job.via_job) for o in rig.outcomes] == [(True, True)]
    finally:
        rig.close()


def test_a_failed_job_is_counted_once_and_reported_once_until_deleted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = job_rig(tmp_path, monkeypatch, job_image="cleaner:1", namespace="ns")
    try:
        name = block_released(rig)
        rig.pass_()
        ((_, job_name),) = rig.kube.jobs
        rig.kube.jobs[("ns", job_name)]["status"] = {"failed": 1, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded",
             "message": "too many"}]}
        rig.kube.fail("emit_event")  # the Event is refused once: the count does not care
        for _ in range(3):
            rig.pass_()
        assert [o.ok for o in rig.outcomes] == [False]
        assert rig.reasons().count("VolumeFailedDelete") == 1  # posted on the next pass
        assert name in rig.kube.pvs
        del rig.kube.jobs[("ns", job_name)]  # the admin deletes it: a new clean starts
        rig.pass_()
        rig.pass_()
        assert ("ns", job_name) in rig.kube.jobs
        rig.kube.jobs[("ns", job_name)]["status"] = {"failed": 1, "conditions": [
            {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
        rig.pass_()
        assert [o.ok for o in rig.outcomes] == [False, False]
        assert rig.reasons().count("VolumeFailedDelete") == 2
    finally:
        rig.close()


def test_without_a_job_image_a_block_volume_is_cleaned_in_process(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = job_rig(tmp_path, monkeypatch)
    try:
        name = block_released(rig)
        rig.pass_()
        assert rig.kube.jobs == {} and rig.cleaner is not None
        uid = rig.kube.pvs[name]["metadata"]["uid"]
        rig.cleaner.wait()
        rig.pass_()
        assert rig.kube.pvs[name]["metadata"]["uid"] != uid
    finally:
        rig.close()


def test_a_job_is_not_created_when_the_disk_fails_the_checks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = job_rig(tmp_path, monkeypatch, job_image="cleaner:1", namespace="ns")
    try:
        name = block_released(rig)

        def busy(path: str, device: str) -> None:
            raise CleanError(f"{path} is in use")

        monkeypatch.setattr("agent.jobclean.verify_block_device", busy)
        rig.pass_()
        assert rig.kube.jobs == {}
        assert record(rig, name).state is CleaningState.FAILED
        assert "VolumeFailedDelete" in rig.reasons()
        assert rig.cleaner is not None
        rig.cleaner.identify = lambda job: {"wwn": "0xother"}
        monkeypatch.setattr("agent.jobclean.verify_block_device", lambda p, d: None)
        rig.kube.update_pv(name, lambda pv: pv["metadata"]["annotations"].update({
            CLEANING_ANNOTATION: CleaningRecord.failed(1, 0.0, "x").to_annotation()}))
        rig.pass_()
        assert rig.kube.jobs == {}  # a different disk: no Job, nothing recorded as failed
        assert record(rig, name).state is CleaningState.RUNNING
    finally:
        rig.close()


def test_job_api_failures_are_retried_and_a_foreign_job_is_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rig = job_rig(tmp_path, monkeypatch, job_image="cleaner:1", namespace="ns")
    try:
        name = block_released(rig)
        rig.kube.fail("create_job")
        rig.pass_()
        assert rig.kube.jobs == {}
        rig.kube.update_pv(name, lambda pv: pv["metadata"]["annotations"].pop(
            CLEANING_ANNOTATION))
        rig.pass_()
        ((_, job_name),) = rig.kube.jobs
        rig.kube.fail("get_job")
        rig.pass_()  # cannot look at it now: later
        rig.kube.jobs[("ns", job_name)]["metadata"]["labels"]["pvuuid"] = "an-earlier-pv"
        rig.pass_()  # it says nothing about this PV: removed, and a Job made for this one
        uid = rig.kube.pvs[name]["metadata"]["uid"]
        assert rig.kube.jobs[("ns", job_name)]["metadata"]["labels"]["pvuuid"] == uid
        rig.kube.jobs[("ns", job_name)]["status"] = {"succeeded": 1}
        rig.kube.fail("delete_job")
        rig.pass_()
        assert name in rig.kube.pvs  # the finished Job is deleted first, then the PV
        rig.pass_()
        assert rig.kube.jobs == {} and record(rig, name).state is CleaningState.NONE
    finally:
        rig.close()
