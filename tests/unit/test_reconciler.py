"""The reconcile loop's orchestration on the in-memory API: sync, adoption, withdrawal, names.

The same behaviour is proven on a real control plane in tests/e2e; these run in milliseconds
and say exactly which step went wrong.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.backoff import Backoff
from agent.kube import ApiError
from tests.unit.rig import CLASS, HOSTNAME, NODE, Rig


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def upstream_pv(name: str, path: str, node_uid: str = "old-node-uid") -> dict[str, Any]:
    """A PV as the upstream provisioner makes it: none of this agent's labels."""
    return {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {"name": name, "annotations": {
            "pv.kubernetes.io/provisioned-by": f"local-volume-provisioner-{NODE}-{node_uid}"}},
        "spec": {"local": {"path": path}, "storageClassName": CLASS,
                 "capacity": {"storage": "20Gi"}, "volumeMode": "Filesystem",
                 "persistentVolumeReclaimPolicy": "Delete",
                 "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                     {"key": "kubernetes.io/hostname", "operator": "In",
                      "values": [HOSTNAME]}]}]}}},
        "status": {"phase": "Available"},
    }


def test_one_pv_per_disk_and_an_unchanged_host_makes_no_writes(rig: Rig) -> None:
    rig.host.add(CLASS, "a")
    rig.host.add(CLASS, "b")
    rig.start()
    first = rig.pass_()
    assert first.created_by_mode == {"Filesystem": 2} and first.errors == 0
    pv = rig.pv("a")
    assert pv is not None
    assert pv["metadata"]["labels"] == {"kubernetes.io/hostname": HOSTNAME,
                                        "app.kubernetes.io/managed-by": "localpv-agent"}
    assert pv["metadata"]["annotations"]["localpv-agent.io/fs-uuid"].startswith("uuid-a")
    assert sorted(rig.reasons()) == ["Provisioned", "Provisioned"]
    writes, events = rig.kube.writes(), len(rig.kube.events)
    for _ in range(3):
        again = rig.pass_()
        assert again.plan.writes == 0
    assert rig.kube.writes() == writes and len(rig.kube.events) == events


def test_upstream_pvs_are_adopted_by_labels_never_duplicated(rig: Rig) -> None:
    rig.host.add(CLASS, "a")
    rig.kube.put_pv(upstream_pv("local-pv-upstream", "/mnt/disks/a"))
    rig.kube.put_pv(upstream_pv("local-pv-other", "/mnt/disks/x", node_uid="u") | {
        "spec": {**upstream_pv("x", "/mnt/disks/x")["spec"], "nodeAffinity": {}}})
    rig.start()
    adopted = rig.kube.pvs["local-pv-upstream"]
    assert adopted["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "localpv-agent"
    assert "labels" not in rig.kube.pvs["local-pv-other"]["metadata"]  # not pinned here
    result = rig.pass_()
    assert result.created_by_mode == {} and rig.pv("a") is None  # the upstream PV serves it
    # an identity is recorded on the adopted PV from the disk present now
    assert "localpv-agent.io/fs-uuid" in rig.kube.pvs["local-pv-upstream"]["metadata"][
        "annotations"]
    writes = rig.kube.writes()
    rig.pass_()
    assert rig.kube.writes() == writes


def test_a_pv_that_lost_its_labels_is_adopted_again_by_the_pass(rig: Rig) -> None:
    rig.host.add(CLASS, "a")
    rig.start()
    rig.pass_()
    name = rig.name("a")
    rig.loop.cache.put(rig.kube.update_pv(name, lambda pv: pv["metadata"]["labels"].pop(
        "app.kubernetes.io/managed-by")))
    result = rig.pass_()  # the watch saw it leave the selection, the pass has it cached
    assert result.created_by_mode == {}


def test_a_name_taken_by_another_nodes_pv_is_reported_once_and_left_alone(rig: Rig) -> None:
    rig.host.add(CLASS, "a")
    foreign = upstream_pv(rig.name("a"), "/mnt/other/a")
    foreign["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"] = \
        "local-volume-provisioner-node-9-u9"
    rig.kube.put_pv(foreign)
    rig.start()
    for _ in range(3):
        assert rig.pass_().errors == 0
    assert rig.reasons() == ["NameConflict"]
    assert rig.kube.pvs[rig.name("a")]["spec"]["local"]["path"] == "/mnt/other/a"


def test_a_create_conflict_with_this_nodes_pv_for_the_path_adopts_it(rig: Rig) -> None:
    """The PV appeared between the list and the create (a twin agent made it)."""
    rig.host.add(CLASS, "a")
    rig.start()
    rig.pump()
    twin = rig.kube.put_pv(upstream_pv(rig.name("a"), "/mnt/disks/a"))
    result = rig.loop.sync()  # the cache has not seen it: the create gets 409
    assert result.created_by_mode == {} and result.errors == 0
    cached = rig.loop.cache.get(rig.name("a"))
    assert cached is not None and cached["metadata"]["uid"] == twin["metadata"]["uid"]


def test_a_create_conflict_with_a_pv_being_deleted_waits_until_it_is_gone(rig: Rig) -> None:
    """The PV at the name is this node's for the path but being deleted (its finalizer still
    pending): adopting it would keep a ghost; the PV is created anew once it is gone."""
    rig.host.add(CLASS, "a")
    rig.start()
    rig.pump()
    going = upstream_pv(rig.name("a"), "/mnt/disks/a")
    going["metadata"].update(finalizers=["kubernetes.io/pv-protection"],
                             deletionTimestamp="2026-01-01T00:00:00Z")
    old = rig.kube.put_pv(going)
    result = rig.loop.sync()  # the cache has not seen it: the create gets 409
    assert result.created_by_mode == {} and result.errors == 0
    assert rig.loop.cache.get(rig.name("a")) is None
    rig.kube.finalize_pv(rig.name("a"))
    assert rig.pass_().created_by_mode == {"Filesystem": 1}
    assert rig.kube.pvs[rig.name("a")]["metadata"]["uid"] != old["metadata"]["uid"]


def test_an_unbound_pv_whose_disk_is_gone_is_withdrawn(rig: Rig) -> None:
    rig.host.add(CLASS, "a")
    rig.start()
    rig.pass_()
    rig.host.unmount(CLASS, "a")
    result = rig.pass_()
    assert result.withdrawn == 1 and rig.pv("a") is None
    assert rig.reasons() == ["Provisioned", "VolumeWithdrawn", "VolumeExcluded"]
    assert rig.pass_().plan.writes == 0  # and nothing more
    rig.host.entries[CLASS]["a"].mounted = True
    assert rig.pass_().created_by_mode == {"Filesystem": 1}  # back: offered again


def test_a_withdrawal_that_lost_a_race_deletes_nothing(rig: Rig) -> None:
    rig.host.add(CLASS, "a")
    rig.start()
    rig.pass_()
    rig.host.unmount(CLASS, "a")
    rig.kube.bind(rig.name("a"))  # claimed meanwhile; the cache does not know yet
    result = rig.loop.sync()
    assert result.withdrawn == 0 and result.errors == 0
    assert rig.pv("a") is not None  # the precondition held it
    rig.pass_()
    assert rig.pv("a") is not None and "VolumeMissing" in rig.reasons()


def test_a_bound_pv_whose_disk_is_gone_is_kept_and_reported_once_per_episode(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    rig.host.add(CLASS, "a")
    rig.start()
    rig.pass_()
    rig.kube.bind(rig.name("a"), claim="data-0")
    rig.pass_()
    rig.host.unmount(CLASS, "a")
    for _ in range(3):
        result = rig.pass_()
        assert result.plan.missing == (rig.name("a"),) and result.withdrawn == 0
    missing = rig.events("VolumeMissing")
    assert sorted(e["involvedObject"]["kind"] for e in missing) == [
        "PersistentVolume", "PersistentVolumeClaim"]
    claim = next(e for e in missing if e["involvedObject"]["kind"] == "PersistentVolumeClaim")
    assert claim["involvedObject"]["namespace"] == "default"
    rig.host.entries[CLASS]["a"].mounted = True
    with caplog.at_level(logging.INFO):
        rig.pass_()
    assert "condition cleared: missing/" in caplog.text
    rig.host.unmount(CLASS, "a")
    rig.pass_()
    assert len(rig.events("VolumeMissing")) == 4  # a new episode is reported anew


def test_a_different_disk_at_a_pvs_path_is_reported_not_offered(rig: Rig) -> None:
    rig.host.add(CLASS, "a")
    rig.start()
    rig.pass_()
    uid = rig.kube.pvs[rig.name("a")]["metadata"]["uid"]
    rig.host.swap(CLASS, "a")
    for _ in range(2):
        result = rig.pass_()
        assert result.plan.changed_disk == (rig.name("a"),) and result.plan.writes == 0
    (changed,) = rig.events("DiskChanged")
    assert "swapped-a" in changed["message"]
    assert rig.kube.pvs[rig.name("a")]["metadata"]["uid"] == uid


def test_a_missing_storage_class_disables_its_class_alone(tmp_path: Path) -> None:
    rig = Rig(tmp_path, classes={CLASS: {"hostDir": "/mnt/disks"},
                                 "fast": {"hostDir": "/mnt/fast"}})
    try:
        del rig.kube.storage_classes["fast"]
        rig.host.add(CLASS, "a")
        rig.host.add("fast", "f")
        rig.start()
        rig.pass_()
        rig.pass_()
        assert rig.pv("a") is not None and rig.pv("f", "fast") is None
        assert rig.reasons().count("StorageClassMissing") == 1
        rig.kube.add_storage_class("fast", reclaim_policy="Retain", mount_options=("noatime",))
        rig.loop.classes.refresh()
        rig.pass_()
        made = rig.pv("f", "fast")
        assert made is not None and made["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
        assert made["spec"]["mountOptions"] == ["noatime"]
    finally:
        rig.close()


def test_a_failed_create_counts_as_an_error_and_is_retried(rig: Rig) -> None:
    rig.host.add(CLASS, "a")
    rig.start()
    rig.kube.fail("create_pv")
    assert rig.pass_().errors == 1 and rig.pv("a") is None
    assert rig.pass_().created_by_mode == {"Filesystem": 1}


def test_a_failed_adoption_counts_as_an_error(rig: Rig) -> None:
    rig.host.add(CLASS, "a")
    rig.start()
    rig.pass_()
    rig.loop.cache.put(rig.kube.update_pv(rig.name("a"), lambda pv: pv["metadata"].pop(
        "labels")))
    rig.kube.fail("patch_pv_labels")
    assert rig.pass_().errors == 1
    assert rig.pass_().adopted == 1


def test_an_unreachable_api_at_start_is_retried_until_it_answers(
        rig: Rig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("agent.runloop.Backoff", lambda: Backoff(0.01, 0.02))
    rig.kube.fail("get_node", ApiError("get", 0, "connection refused"), times=2)
    rig.loop.runner.retry(lambda: rig.loop.ctx.kube.get_node(NODE) and None)
    assert rig.kube.calls["get_node"] == 3


def test_the_class_of_a_volume_whose_pv_cannot_be_built_is_skipped_alone(rig: Rig) -> None:
    rig.host.add(CLASS, "a")
    rig.start()
    rig.write_config(rig.classes, setPVOwnerRef=True)
    assert rig.loop.runner.reload_config()
    rig.loop.ctx.node = type(rig.loop.node)(name=NODE, uid="", labels=rig.loop.node.labels)
    result = rig.pass_()
    assert result.created_by_mode == {} and rig.reasons() == ["ConfigReloaded", "ClassFailed"]
    rig.pass_()
    assert rig.reasons() == ["ConfigReloaded", "ClassFailed"]
