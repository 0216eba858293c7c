"""The API adapter (`agent.kube.Kube`) over HTTP against the in-memory API: requests, paging,
watch streams and the mapping of every failure to ApiError."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.kube import ApiError, ClusterKube, Kube
from agent.pv import rfc3339
from devkit.fake_kube import FakeKube
from tests.unit.fake_apiserver import serving

SELECTOR = "app.kubernetes.io/managed-by=localpv-agent"


def manifest(name: str, labelled: bool = True) -> dict[str, Any]:
    labels = {"app.kubernetes.io/managed-by": "localpv-agent"} if labelled else {}
    return {"apiVersion": "v1", "kind": "PersistentVolume",
            "metadata": {"name": name, "labels": labels},
            "spec": {"local": {"path": f"/mnt/disks/{name}"}, "capacity": {"storage": "1Gi"}}}


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[Kube, FakeKube, list[tuple[str, str]], list[tuple]]]:
    fake = FakeKube(watch_timeout=0.2)
    fake.add_node("node-1", labels={"kubernetes.io/hostname": "host-1"})
    fake.add_storage_class("local-storage")
    observed: list[tuple] = []
    with serving(fake, tmp_path) as (kubeconfig, seen):
        kube = Kube(str(kubeconfig), observe=lambda *a: observed.append(a), timeout=5.0)
        yield kube, fake, seen, observed


def test_reads_of_nodes_storage_classes_and_pvs(api: tuple) -> None:
    kube, fake, _, observed = api
    node = kube.get_node("node-1")
    assert (node.name, node.uid, node.hostname_label) == ("node-1", "node-uid-node-1", "host-1")
    assert kube.get_storage_class("local-storage")["reclaimPolicy"] == "Delete"
    assert kube.get_storage_class("nope") is None
    assert kube.get_pv("nope") is None
    fake.put_pv(manifest("a"))
    assert kube.get_pv("a")["metadata"]["name"] == "a"
    with pytest.raises(ApiError) as missing:
        kube.get_node("node-9")
    assert missing.value.not_found and "not found" in str(missing.value)
    assert kube.request_counts()[("get", "ok")] == 3
    assert kube.request_counts()[("get", "error")] == 3
    assert kube.reachable  # a 404 is an answer
    assert observed[0][:2] == ("get", "ok")


def test_a_token_is_refreshed_at_most_once_a_second_not_per_request(
        api: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    kube, _, seen, _ = api
    refreshed: list[int] = []

    def refresh(cfg: Any) -> None:  # what a kubeconfig's or the in-cluster loader's hook does
        refreshed.append(1)
        cfg.api_key["BearerToken"] = f"Bearer token-{len(refreshed)}"

    kube._api.configuration.refresh_api_key_hook = refresh
    for _ in range(3):
        assert kube.get_storage_class("local-storage") is not None
    assert len(refreshed) == 1 and len(seen) == 3
    monkeypatch.setattr("agent.kube.AUTH_REFRESH", 0.0)  # a second later, every time
    kube.get_storage_class("local-storage")
    kube.get_storage_class("local-storage")
    assert len(refreshed) == 3
    assert kube._api._auth_headers() == {"authorization": "Bearer token-4"}


def test_lists_are_paged_and_filtered_by_label(api: tuple) -> None:
    kube, fake, seen, _ = api
    for i in range(5):
        fake.put_pv(manifest(f"pv-{i}"))
    fake.put_pv(manifest("foreign", labelled=False))
    found = [pv["metadata"]["name"] for pv, _ in kube.list_pvs(SELECTOR, limit=2)]
    assert found == [f"pv-{i}" for i in range(5)]
    assert sum(1 for m, p in seen if p == "/api/v1/persistentvolumes") == 3  # three pages
    unlabelled = [pv["metadata"]["name"] for pv, _ in kube.list_pvs(
        "!app.kubernetes.io/managed-by")]
    assert unlabelled == ["foreign"]
    snapshot, version = kube.list_pv_snapshot(SELECTOR)
    assert sorted(snapshot) == [f"pv-{i}" for i in range(5)] and version == str(fake.rv)
    empty, version = kube.list_pv_snapshot("app=none")
    assert empty == {} and version  # an empty list still has a version


def test_writes_carry_their_preconditions(api: tuple) -> None:
    kube, fake, _, _ = api
    created = kube.create_pv(manifest("a"))
    uid, version = created["metadata"]["uid"], created["metadata"]["resourceVersion"]
    with pytest.raises(ApiError) as clash:
        kube.create_pv(manifest("a"))
    assert clash.value.conflict
    labelled = kube.patch_pv_labels("a", uid, {"x": "y"})
    assert labelled["metadata"]["labels"]["x"] == "y"
    with pytest.raises(ApiError) as other:
        kube.patch_pv_labels("a", "another-uid", {"x": "z"})
    assert other.value.conflict
    with pytest.raises(ApiError) as stale:
        kube.patch_pv_annotations("a", version, {"k": "v"})  # the label patch bumped it
    assert stale.value.conflict
    current = labelled["metadata"]["resourceVersion"]
    annotated = kube.patch_pv_annotations("a", current, {"k": "v"})
    assert annotated["metadata"]["annotations"] == {"k": "v"}
    removed = kube.patch_pv_annotations("a", annotated["metadata"]["resourceVersion"],
                                        {"k": None})
    assert removed["metadata"]["annotations"] == {}
    with pytest.raises(ApiError) as gone:
        kube.delete_pv("a", uid, current)  # an older version
    assert gone.value.conflict
    kube.delete_pv("a", uid, removed["metadata"]["resourceVersion"])
    assert "a" not in fake.pvs
    with pytest.raises(ApiError) as missing:
        kube.delete_pv("a", uid)
    assert missing.value.not_found


def test_events_are_core_v1_events_of_the_involved_object(api: tuple) -> None:
    kube, fake, _, _ = api
    kube.emit_event({"kind": "Node", "name": "node-1", "uid": "u"}, "Warning",
                    "VolumeExcluded", "x" * 2000, "node-1")
    kube.emit_event({"kind": "PersistentVolumeClaim", "name": "c", "namespace": "ns"},
                    "Warning", "VolumeMissing", "gone", "node-1")
    first, second = fake.events
    assert first["reason"] == "VolumeExcluded" and len(first["message"]) == 1024
    assert first["host"] == "node-1" and first["involvedObject"]["namespace"] == ""
    assert second["involvedObject"]["namespace"] == "ns"


def test_cleaning_jobs(api: tuple) -> None:
    kube, _, _, _ = api
    job = {"apiVersion": "batch/v1", "kind": "Job",
           "metadata": {"name": "cleanup-a", "namespace": "ns"},
           "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "i"}]}}}}
    kube.create_job(job)
    assert kube.get_job("ns", "cleanup-a")["metadata"]["name"] == "cleanup-a"
    kube.delete_job("ns", "cleanup-a")
    assert kube.get_job("ns", "cleanup-a") is None
    with pytest.raises(ApiError):
        kube.delete_job("ns", "cleanup-a")


def test_a_watch_streams_changes_and_says_when_it_expired(api: tuple) -> None:
    kube, fake, _, _ = api
    _, version = kube.list_pv_snapshot(SELECTOR)
    fake.put_pv(manifest("a"))
    fake.put_pv(manifest("foreign", labelled=False))
    fake.bind("a")
    events = [(kind, pv["metadata"]["name"]) for kind, pv in kube.watch_pvs(SELECTOR, version)]
    assert events == [("ADDED", "a"), ("MODIFIED", "a")]
    assert kube.request_counts()[("watch", "ok")] == 1
    fake.compact()
    with pytest.raises(ApiError) as expired:  # an in-stream ERROR event, as the API sends it
        list(kube.watch_pvs(SELECTOR, version))
    assert expired.value.gone


def test_the_cluster_wide_list_and_watch_page_and_map_errors_as_the_pv_ones_do(
        tmp_path: Path) -> None:
    fake = FakeKube(watch_timeout=0.2)
    for i in range(3):
        fake.put_pv(manifest(f"pv-{i}"))
    with serving(fake, tmp_path) as (kubeconfig, seen):
        cluster = ClusterKube(str(kubeconfig), timeout=5.0)
        found, version = cluster.list_all("persistentvolumes", limit=2)
        assert [pv["metadata"]["name"] for pv in found] == ["pv-0", "pv-1", "pv-2"]
        assert version == str(fake.rv) and len(seen) == 2  # two pages
        fake.bind("pv-1")
        events = [(kind, pv["metadata"]["name"])
                  for kind, pv in cluster.watch_all("persistentvolumes", version)]
        assert events == [("MODIFIED", "pv-1")] and cluster.request_counts()[("watch", "ok")] == 1
        fake.compact()
        with pytest.raises(ApiError) as expired:
            list(cluster.watch_all("persistentvolumes", version))
        assert expired.value.gone and cluster.request_counts()[("watch", "error")] == 1


def test_an_api_that_does_not_answer_is_an_error_with_status_zero(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        f"clusters: [{{name: c, cluster: {{server: 'http://127.0.0.1:{port}'}}}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u}}]\n")
    kube = Kube(str(kubeconfig), timeout=2.0)
    with pytest.raises(ApiError) as refused:
        kube.get_pv("a")
    assert refused.value.status == 0 and not kube.reachable
    with pytest.raises(ApiError) as watch:
        list(kube.watch_pvs(SELECTOR, "1", timeout_seconds=1))
    assert watch.value.status == 0
    counts = kube.request_counts()
    assert counts[("get", "error")] == 1 and counts[("watch", "error")] == 1


def test_timestamps_are_rfc3339_in_utc_to_the_second_or_the_microsecond() -> None:
    assert rfc3339(1_764_547_200.25) == "2025-12-01T00:00:00Z"  # records, annotations
    assert rfc3339(1_764_547_200.25, micro=True) == "2025-12-01T00:00:00.250000Z"  # MicroTime
    assert rfc3339(1.9999999, micro=True) == "1970-01-01T00:00:01.999999Z"  # never rounds up
