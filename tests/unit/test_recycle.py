"""Which volumes are cleaned and which are held back: the pure recycling decisions."""

from __future__ import annotations

import json
from typing import Any

from agent.discovery import VolumeState
from agent.plan import recycle, retry_delay
from agent.pv import CLEANING_ANNOTATION

PRESENT = (VolumeState.PRESENT, {"fs-uuid": "u1"})


def pv(name: str, phase: str = "Released", policy: str = "Delete",
       record: dict[str, Any] | None = None, **meta: Any) -> dict[str, Any]:
    annotations = {"localpv-agent.io/fs-uuid": "u1"}
    if record is not None:
        annotations[CLEANING_ANNOTATION] = json.dumps(record)
    return {"metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": "7",
                         "annotations": annotations, **meta},
            "spec": {"local": {"path": f"/mnt/disks/{name}"},
                     "persistentVolumeReclaimPolicy": policy,
                     "claimRef": {"name": "c"}},
            "status": {"phase": phase}}


def decide(pvs: list[dict[str, Any]], states: dict[str, Any] | None = None,
           dirty: frozenset[str] = frozenset(), running: frozenset[str] = frozenset(),
           now: float = 1000.0, me: str = "me") -> Any:
    ours = {p["metadata"]["name"]: p for p in pvs}
    states = states if states is not None else {n: PRESENT for n in ours}
    present = frozenset(f"/mnt/disks/{n}" for n in ours) | dirty
    return recycle(ours, states, present, dirty, running, now=now, me=me, stale_after=60)


def test_released_delete_is_cleaned_other_phases_and_policies_are_not() -> None:
    result = decide([pv("a"), pv("b", phase="Bound"), pv("c", policy="Retain"),
                     pv("d", policy="Recycle")])
    assert [(d.pv_name, d.pv_uid, d.resource_version) for d in result.clean] == [
        ("a", "uid-a", "7")]
    assert [n.reason for n in result.notices] == ["VolumeUnsupportedReclaimPolicy"]
    assert result.cleaning == {"a"}


def test_missing_unknown_or_changed_disks_are_never_cleaned() -> None:
    states = {"gone": (VolumeState.GONE, {}), "unsure": (VolumeState.UNKNOWN, {}),
              "swapped": (VolumeState.PRESENT, {"fs-uuid": "OTHER"})}
    assert decide([pv("gone"), pv("unsure"), pv("swapped")], states).clean == ()


def test_deleting_pv_is_left_to_the_api() -> None:
    assert decide([pv("a", deletionTimestamp="2026-11-26T10:00:00Z")]).clean == ()


def test_running_failed_and_twin_records() -> None:
    running = decide([pv("a")], running=frozenset({"/mnt/disks/a"}))
    assert running.clean == () and running.cleaning == {"a"}

    waiting = decide([pv("a", record={"state": "failed", "attempts": 2, "retryAfter": 1500})])
    assert waiting.clean == () and waiting.recheck == (1500.0,)
    due = decide([pv("a", record={"state": "failed", "attempts": 2, "retryAfter": 900})])
    assert [d.attempts for d in due.clean] == [2]

    twin = decide([pv("a", record={"state": "running", "by": "other", "heartbeat": 990})])
    assert twin.clean == () and twin.recheck == (1050.0,)
    interrupted = decide([pv("a", record={"state": "running", "by": "other",
                                          "heartbeat": 900})])
    assert [d.pv_name for d in interrupted.clean] == ["a"]  # a restart resumes
    mine = decide([pv("a", record={"state": "running", "by": "me", "heartbeat": 999})])
    assert [d.pv_name for d in mine.clean] == ["a"]


def test_dirty_volume_without_a_pv_is_held_and_cleaned() -> None:
    result = decide([], dirty=frozenset({"/mnt/disks/orphan"}))
    assert result.hold == {"/mnt/disks/orphan"}
    assert [(d.key, d.pv_name) for d in result.clean] == [("/mnt/disks/orphan", None)]
    # a dirty volume that still has its PV is not held separately: the PV blocks creation
    assert decide([pv("a", phase="Bound")], dirty=frozenset({"/mnt/disks/a"})).hold == set()


def test_retry_delay_doubles_and_is_bounded() -> None:
    assert [retry_delay(n, rand=lambda: 0.0) for n in (1, 2, 3)] == [30.0, 60.0, 120.0]
    assert retry_delay(50, rand=lambda: 0.0) == 3600.0
    assert retry_delay(10_000, rand=lambda: 0.0) == 3600.0  # no overflow, however many
    assert 24.0 <= retry_delay(1) <= 30.0  # jitter shortens, never lengthens


def test_a_pv_whose_disk_cannot_be_recognised_is_never_cleaned() -> None:
    """Nothing recorded (an upstream PV released before it was adopted), or nothing read back
    (a disk without identity): a Warning, never a wipe on a guess."""
    unrecorded = pv("a")
    unrecorded["metadata"]["annotations"] = {}
    result = decide([unrecorded, pv("b")], {"a": PRESENT, "b": (VolumeState.PRESENT, {})})
    assert result.clean == ()
    assert sorted((n.reason, n.name) for n in result.notices) == [
        ("VolumeUnverified", "a"), ("VolumeUnverified", "b")]


def test_a_dirty_volume_is_cleaned_only_when_its_disk_is_recognised() -> None:
    dirty = frozenset({"/mnt/disks/same", "/mnt/disks/other"})
    result = recycle({}, {}, dirty, dirty, frozenset(), now=1000.0,
                     cleanable=frozenset({"/mnt/disks/same"}))
    assert result.hold == dirty  # neither is offered
    assert [d.key for d in result.clean] == ["/mnt/disks/same"]
