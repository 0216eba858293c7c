"""The upstream-compatible cleanup Job and the reading of its status."""

from __future__ import annotations

from datetime import UTC, datetime

from agent.config import parse_config
from agent.jobs import JobState, cleanup_job, job_failure, job_name, job_state
from agent.volumes import NodeInfo

CLS = parse_config({"storageClassMap": {"raw": {
    "hostDir": "/mnt/raw", "mountDir": "/host/raw", "volumeMode": "Block",
    "blockCleanerCommand": ["/scripts/shred.sh", "2"]}}}).classes[0]


def test_manifest_uses_upstream_names_labels_and_annotations() -> None:
    node = NodeInfo(name="n1", uid="nu", labels={"kubernetes.io/hostname": "h1"})
    job = cleanup_job("local-pv-1", "pv-uid", node, CLS, "/host/raw/disk", "img:1", "ns",
                      [{"operator": "Exists"}], now=datetime(2026, 11, 26, tzinfo=UTC))
    assert job_name("local-pv-1") == job["metadata"]["name"] == "cleanup-local-pv-1"
    assert job["metadata"]["namespace"] == "ns"
    assert job["metadata"]["labels"]["pv"] == "local-pv-1"
    assert job["metadata"]["labels"]["pvuuid"] == "pv-uid"
    assert job["metadata"]["labels"]["kubernetes.io/hostname"] == "n1"
    assert job["metadata"]["annotations"] == {"device": "/host/raw/disk",
                                              "start-time": "2026-11-26T00:00:00Z"}
    pod = job["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kubernetes.io/hostname": "h1"}  # the label, not the name
    (container,) = pod["containers"]
    assert container["command"] == ["/scripts/shred.sh", "2"]
    assert container["env"] == [{"name": "LOCAL_PV_BLKDEVICE", "value": "/host/raw/disk"}]
    assert {v["name"]: v["hostPath"]["path"] for v in pod["volumes"]} == {
        "discovery": "/mnt/raw", "dev": "/dev"}
    assert {m["name"]: m["mountPath"] for m in container["volumeMounts"]} == {
        "discovery": "/host/raw", "dev": "/dev"}


def test_job_state() -> None:
    assert job_state({}) is JobState.RUNNING
    assert job_state({"status": {"succeeded": 1}}) is JobState.SUCCEEDED
    failed = {"status": {"conditions": [{"type": "Failed", "status": "True",
                                         "reason": "BackoffLimitExceeded", "message": "6x"}]}}
    assert job_state(failed) is JobState.FAILED
    assert job_failure(failed) == "BackoffLimitExceeded: 6x"
