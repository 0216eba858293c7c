"""The planner: one PV per (node, path), adoption of upstream PVs, never touching others."""

from __future__ import annotations

from typing import Any

from agent.config import parse_config
from agent.discovery import Volume
from agent.plan import plan
from agent.pv import is_this_nodes, label_selector
from agent.pvcache import PVCache
from agent.volumes import NodeInfo, pv_manifest

CONFIG = parse_config({"storageClassMap": {"sc1": {"hostDir": "/mnt/disks"}}})
NODE = NodeInfo(name="node-1", uid="uid-1", labels={"kubernetes.io/hostname": "host-1"})


def desired(entry: str, node: NodeInfo = NODE) -> dict[str, Any]:
    volume = Volume("sc1", entry, f"/mnt/disks/{entry}", f"/mnt/disks/{entry}", "Filesystem",
                    False, 1 << 30, "7:0")
    return pv_manifest(volume, node, CONFIG)


def existing(manifest: dict[str, Any], **meta: Any) -> dict[str, Any]:
    pv = {**manifest, "metadata": {**manifest["metadata"], "uid": "pv-uid", **meta}}
    return pv


def test_creates_missing_and_is_idempotent() -> None:
    want = [desired("a"), desired("b")]
    first = plan(want, {}, NODE)
    assert [m["metadata"]["name"] for m in first.create] == [w["metadata"]["name"] for w in want]
    actual = {m["metadata"]["name"]: existing(m) for m in first.create}
    again = plan(want, actual, NODE)
    assert again.writes == 0 and again.notices == ()


def test_existing_pv_for_the_path_wins_in_any_phase_and_name() -> None:
    want = desired("a")
    other_name = existing(want, name="local-pv-handmade", deletionTimestamp="2026-11-26T10:00:00Z")
    result = plan([want], {"local-pv-handmade": other_name}, NODE)
    assert result.create == () and result.adopt == ()


def test_upstream_pv_is_adopted_by_labels_not_duplicated() -> None:
    want = desired("a")
    upstream = existing(want, labels={}, annotations={
        "pv.kubernetes.io/provisioned-by": "local-volume-provisioner-node-1-old-node-uid"})
    result = plan([want], {want["metadata"]["name"]: upstream}, NODE)
    assert result.create == ()
    (adoption,) = result.adopt
    assert adoption.labels == {"app.kubernetes.io/managed-by": "localpv-agent",
                               "kubernetes.io/hostname": "host-1"}


def test_name_taken_by_another_nodes_pv_is_a_warning_not_a_write() -> None:
    want = desired("a")
    foreign = existing(desired("a", NodeInfo(name="node-9", uid="u9")),
                       name=want["metadata"]["name"])
    result = plan([want], {want["metadata"]["name"]: foreign}, NODE)
    assert result.writes == 0
    assert [n.reason for n in result.notices] == ["NameConflict"]


def test_duplicates_are_reported_and_never_deleted() -> None:
    want = desired("a")
    pvs = {n: existing(want, name=n) for n in ("local-pv-1", "local-pv-2")}
    result = plan([want], pvs, NODE)
    assert result.writes == 0
    assert sorted(n.name for n in result.notices) == ["local-pv-1", "local-pv-2"]
    assert all(n.reason == "DuplicateVolume" for n in result.notices)


def test_ownership_needs_both_annotation_and_affinity() -> None:
    mine = existing(desired("a"))
    assert is_this_nodes(mine, NODE)
    prefix_twin = NodeInfo(name="node-1-b", uid="x", labels={"kubernetes.io/hostname": "h2"})
    twin = existing(desired("a", prefix_twin))
    assert not is_this_nodes(twin, NODE)  # "node-1" is a prefix of "node-1-b"
    other_host = NodeInfo(name="node-1", uid="uid-1", labels={"kubernetes.io/hostname": "h3"})
    assert not is_this_nodes(existing(desired("a", other_host)), NODE)
    assert label_selector(NODE) == \
        "app.kubernetes.io/managed-by=localpv-agent,kubernetes.io/hostname=host-1"


def test_cache_keeps_a_newer_watch_version_over_an_older_write_response() -> None:
    cache = PVCache()
    base = {"metadata": {"name": "pv", "uid": "u"}}
    newer = {"metadata": {**base["metadata"], "resourceVersion": "12"},
             "status": {"phase": "Available"}}
    older = {"metadata": {**base["metadata"], "resourceVersion": "11"}}
    cache.apply("MODIFIED", newer)
    cache.put(older)  # our create's response, arriving after the watch event
    assert cache.get("pv") == newer
    cache.forget("pv", "u")
    cache.apply("MODIFIED", newer)  # a late event about a PV this agent deleted
    assert cache.get("pv") is None
    cache.apply("DELETED", newer)
    cache.apply("ADDED", {"metadata": {"name": "pv", "uid": "u2", "resourceVersion": "20"}})
    assert cache.get("pv") is not None  # a new object under the same name is welcome
