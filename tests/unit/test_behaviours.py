"""The opt-in behaviours on the in-memory API: the startup taint, capacity changes and PVs of a
class removed from the config. The real proof is in tests/e2e (test_startup_taint.py,
test_capacity.py, test_removed_class.py); these say which decision went wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import pv as pvs
from agent.kube import ApiError
from agent.plan import Resize, offered_all, plan
from agent.volumes import NodeInfo
from tests.unit.fake_host import GiB
from tests.unit.rig import CLASS, HOSTNAME, NODE, Rig

TAINT = "localpv-agent.io/not-ready"
FAST = "fast"


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


# -- quantities --------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "size"), [
    ("20Gi", 20 * GiB), ("64Mi", 64 << 20), ("1073741824", 1 << 30), ("5G", 5 * 10**9),
    ("3k", 3000), ("1Ti", 1 << 40), ("1.5Gi", None), ("", None), ("1e3", None), ("Gi", None),
])
def test_quantities_the_agent_compares(text: str, size: int | None) -> None:
    assert pvs.quantity_bytes(text) == size


# -- the startup taint -------------------------------------------------------------------------


def taint_rig(tmp_path: Path, **top: Any) -> Rig:
    r = Rig(tmp_path)
    r.write_config(r.classes, removeNodeNotReadyTaint=True,
                   provisionerNotReadyNodeTaintKey=TAINT, **top)
    assert r.loop.runner.reload_config()
    r.kube.taint_node(NODE, TAINT)
    r.kube.taint_node(NODE, "other.example/keep", "NoExecute")
    return r


def test_the_taint_goes_after_the_first_complete_pass_and_only_that_taint(
        tmp_path: Path) -> None:
    r = taint_rig(tmp_path)
    try:
        r.host.add(CLASS, "a")
        r.host.add(CLASS, "b")
        r.start()
        r.kube.fail("create_pv")  # the first pass cannot create one of the PVs
        first = r.pass_()
        assert first.errors == 1 and len(r.kube.pvs) == 1
        assert [t["key"] for t in r.kube.taints(NODE)] == [TAINT, "other.example/keep"]
        assert r.kube.calls["remove_node_taint"] == 0
        second = r.pass_()
        assert second.errors == 0 and len(r.kube.pvs) == 2
        assert r.kube.taints(NODE) == [{"key": "other.example/keep", "effect": "NoExecute"}]
        r.pass_()
        assert r.kube.calls["remove_node_taint"] == 1  # once per run
    finally:
        r.close()


def test_a_failed_taint_removal_fails_the_pass_and_is_retried(tmp_path: Path) -> None:
    r = taint_rig(tmp_path)
    try:
        r.host.add(CLASS, "a")
        r.start()
        r.kube.fail("remove_node_taint", ApiError("patch", 403, "forbidden"))
        assert r.pass_().errors == 1
        assert r.kube.taints(NODE)[0]["key"] == TAINT
        assert r.pass_().errors == 0
        assert TAINT not in [t["key"] for t in r.kube.taints(NODE)]
    finally:
        r.close()


def test_without_the_setting_the_taint_stays(rig: Rig) -> None:
    rig.kube.taint_node(NODE, TAINT)
    rig.host.add(CLASS, "a")
    rig.start()
    rig.pass_()
    assert rig.kube.taints(NODE) == [{"key": TAINT, "effect": "NoSchedule"}]
    assert rig.kube.calls["remove_node_taint"] == 0


def test_offered_all_counts_only_this_nodes_live_pvs() -> None:
    node = NodeInfo(NODE, "uid", labels={"kubernetes.io/hostname": HOSTNAME})
    want = [{"spec": {"local": {"path": "/mnt/disks/a"}}}]
    mine = {"metadata": {"name": "p", "annotations": {
        "pv.kubernetes.io/provisioned-by": f"local-volume-provisioner-{NODE}-uid"}},
        "spec": {"local": {"path": "/mnt/disks/a"}, "nodeAffinity": {"required": {
            "nodeSelectorTerms": [{"matchExpressions": [{
                "key": "kubernetes.io/hostname", "operator": "In", "values": [HOSTNAME]}]}]}}}}
    assert offered_all(want, {"p": mine}, node)
    assert not offered_all(want, {}, node)
    going = {**mine, "metadata": {**mine["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"}}
    assert not offered_all(want, {"p": going}, node)
    assert offered_all([], {}, node)


# -- capacity ----------------------------------------------------------------------------------


def test_an_available_pv_takes_its_disks_new_size(rig: Rig) -> None:
    disk = rig.host.add(CLASS, "a")
    rig.start()
    rig.pass_()
    before = rig.pv("a")
    assert before is not None and before["spec"]["capacity"]["storage"] == "20Gi"
    disk.capacity = 30 * GiB
    result = rig.pass_()
    assert result.resized == 1 and result.errors == 0
    after = rig.pv("a")
    assert after is not None and after["spec"]["capacity"]["storage"] == "30Gi"
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert rig.reasons() == ["Provisioned", "CapacityUpdated"]
    assert rig.pass_().plan.writes == 0  # settled


def test_a_resize_of_a_pv_bound_meanwhile_fails_its_precondition(rig: Rig) -> None:
    disk = rig.host.add(CLASS, "a")
    rig.start()
    rig.pass_()
    disk.capacity = 30 * GiB
    rig.pump()
    rig.kube.bind(rig.name("a"))  # bound after the cache was read: the patch gets 409
    result = rig.loop.sync()
    assert result.errors == 0 and result.resized == 0
    assert rig.kube.pvs[rig.name("a")]["spec"]["capacity"]["storage"] == "20Gi"
    assert rig.pass_().plan.capacity_differs == (rig.name("a"),)  # now seen bound: reported
    assert rig.kube.pvs[rig.name("a")]["spec"]["capacity"]["storage"] == "20Gi"


def test_a_bound_pv_keeps_its_size_and_is_reported_once_per_size(rig: Rig) -> None:
    disk = rig.host.add(CLASS, "a")
    rig.start()
    rig.pass_()
    rig.kube.bind(rig.name("a"))
    disk.capacity = 30 * GiB
    for _ in range(3):
        result = rig.pass_()
        assert result.plan.writes == 0 and result.plan.capacity_differs == (rig.name("a"),)
    pv = rig.pv("a")
    assert pv is not None and pv["spec"]["capacity"]["storage"] == "20Gi"
    changed = rig.events("CapacityChanged")
    assert len(changed) == 1 and "30Gi" in changed[0]["message"]
    assert changed[0]["type"] == "Warning"
    disk.capacity = 40 * GiB  # grown again: reported again
    rig.pass_()
    assert len(rig.events("CapacityChanged")) == 2
    disk.capacity = 20 * GiB  # back to the PV's size: cleared
    assert rig.pass_().plan.capacity_differs == ()


def test_capacity_is_left_alone_when_the_pv_cannot_be_read_or_is_another_class() -> None:
    node = NodeInfo(NODE, "uid", labels={"kubernetes.io/hostname": HOSTNAME})
    manifest = {"metadata": {"name": "p"}, "spec": {
        "local": {"path": "/mnt/disks/a"}, "storageClassName": CLASS,
        "capacity": {"storage": "30Gi"}}}

    def existing(capacity: str, cls: str = CLASS) -> dict[str, Any]:
        return {"metadata": {"name": "p", "uid": "u", "resourceVersion": "7", "annotations": {
            "pv.kubernetes.io/provisioned-by": f"local-volume-provisioner-{NODE}"}},
            "spec": {"local": {"path": "/mnt/disks/a"}, "storageClassName": cls,
                     "capacity": {"storage": capacity}, "nodeAffinity": {"required": {
                         "nodeSelectorTerms": [{"matchExpressions": [{
                             "key": "kubernetes.io/hostname", "operator": "In",
                             "values": [HOSTNAME]}]}]}}},
            "status": {"phase": "Available"}}

    assert plan([manifest], {"p": existing("20Gi")}, node).resize == (
        Resize("p", "u", "7", "30Gi", "20Gi", "/mnt/disks/a"),)
    assert plan([manifest], {"p": existing("30720Mi")}, node).resize == ()  # same size
    assert plan([manifest], {"p": existing("1.5Ti")}, node).resize == ()
    assert plan([manifest], {"p": existing("20Gi", "other")}, node).resize == ()


# -- removed classes ---------------------------------------------------------------------------


def two_class_rig(tmp_path: Path, **settings: Any) -> Rig:
    r = Rig(tmp_path, classes={CLASS: {"hostDir": "/mnt/disks"},
                               FAST: {"hostDir": "/mnt/fast"}}, **settings)
    r.host.add(CLASS, "a")
    r.host.add(FAST, "f")
    r.host.add(FAST, "g")
    r.start()
    r.pass_()
    assert len(r.kube.pvs) == 3
    return r


def test_available_pvs_of_a_removed_class_are_withdrawn_bound_ones_reported(
        tmp_path: Path) -> None:
    r = two_class_rig(tmp_path, withdraw_removed_classes=True)
    try:
        r.kube.bind(r.name("g", FAST))
        r.write_config({CLASS: {"hostDir": "/mnt/disks"}})
        assert r.loop.runner.reload_config()
        result = r.pass_()
        assert result.withdrawn == 1 and result.errors == 0
        assert r.pv("f", FAST) is None and r.pv("g", FAST) is not None
        assert r.pv("a") is not None
        withdrawn = r.events("VolumeWithdrawn")
        assert len(withdrawn) == 1 and "no longer in the config" in withdrawn[0]["message"]
        for _ in range(2):
            assert r.pass_().plan.writes == 0
        removed = r.events("ClassRemoved")
        assert len(removed) == 1 and removed[0]["involvedObject"]["name"] == r.name("g", FAST)
    finally:
        r.close()


def test_a_withdrawal_of_a_pv_bound_meanwhile_fails_its_precondition(tmp_path: Path) -> None:
    r = two_class_rig(tmp_path, withdraw_removed_classes=True)
    try:
        r.write_config({CLASS: {"hostDir": "/mnt/disks"}})
        assert r.loop.runner.reload_config()
        r.pump()
        r.kube.bind(r.name("f", FAST))
        result = r.loop.sync()
        assert result.withdrawn == 1 and result.errors == 0  # g went; f was bound meanwhile
        assert r.pv("f", FAST) is not None and r.pv("g", FAST) is None
    finally:
        r.close()


def test_removed_classes_are_left_alone_by_default(tmp_path: Path) -> None:
    r = two_class_rig(tmp_path)
    try:
        r.write_config({CLASS: {"hostDir": "/mnt/disks"}})
        assert r.loop.runner.reload_config()
        result = r.pass_()
        assert result.plan.writes == 0 and len(r.kube.pvs) == 3
        assert "ClassRemoved" not in r.reasons()
    finally:
        r.close()


def test_the_flag_is_off_by_default_and_reaches_the_settings() -> None:
    from agent import cli  # noqa: PLC0415

    def settings(*flags: str) -> bool:
        args = cli._parser().parse_args(["run", "--node-name", NODE, *flags])
        return cli._settings(args, None).withdraw_removed_classes

    assert settings() is False
    assert settings("--withdraw-removed-classes") is True
    assert settings("--withdraw-removed-classes", "--no-withdraw-removed-classes") is False
