"""The opt-in behaviours on the in-memory API: the startup taint. The real proof is in
tests/e2e (test_startup_taint.py); these say which decision went wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.kube import ApiError
from agent.plan import offered_all
from agent.volumes import NodeInfo
from tests.unit.rig import CLASS, HOSTNAME, NODE, Rig

TAINT = "localpv-agent.io/not-ready"


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


# -- the startup taint -------------------------------------------------------------------------


def taint_rig(tmp_path: Path, **top: Any) -> Rig:
    r = Rig(tmp_path)
    r.write_config(r.classes, removeNodeNotReadyTaint=True,
                   provisionerNotReadyNodeTaintKey=TAINT, **top)
    assert r.loop._reload_config()
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
