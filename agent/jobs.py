"""Cleaning a block volume in a Kubernetes Job (`useJobForCleaning`), the upstream way.

Pure: the Job manifest and the reading of its status. The names, labels and annotations are the
upstream provisioner's (`cleanup-<pv>`, labels `kubernetes.io/hostname`, `pv`, `pvuuid`,
annotations `device`, `start-time`), so tooling that watches those Jobs keeps working. The Job's
name is the lock: a second agent cannot start a second clean of the same PV.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from agent.config import ClassConfig
from agent.pv import rfc3339
from agent.volumes import HOSTNAME_LABEL, MANAGED_BY, MANAGED_BY_LABEL, NodeInfo

JOB_PREFIX = "cleanup-"
CONTAINER = "cleaner"


class JobState(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # left for an admin to look at; deleting it starts a new clean


def job_name(pv_name: str) -> str:
    return JOB_PREFIX + pv_name


def cleanup_job(  # noqa: PLR0913, PLR0917 - the Job manifest's inputs, a pure builder
    pv_name: str,
    pv_uid: str,
    node: NodeInfo,
    cls: ClassConfig,
    device: str,
    image: str,
    namespace: str,
    tolerations: Sequence[Mapping[str, Any]] = (),
    now: datetime | None = None,
) -> dict[str, Any]:
    """A privileged Job on this node running the class's block cleaner on `device` (the
    in-container path under the class's mountDir)."""
    started = rfc3339((now or datetime.now(UTC)).timestamp())
    container = {
        "name": CONTAINER,
        "image": image,
        "command": list(cls.block_cleaner_command),
        "env": [{"name": "LOCAL_PV_BLKDEVICE", "value": device}],
        "securityContext": {"privileged": True},
        "volumeMounts": [{"name": "discovery", "mountPath": cls.mount_dir},
                         {"name": "dev", "mountPath": "/dev"}],
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(pv_name),
            "namespace": namespace,
            "labels": {HOSTNAME_LABEL: node.name, "pv": pv_name, "pvuuid": pv_uid,
                       MANAGED_BY_LABEL: MANAGED_BY},
            "annotations": {"device": device, "start-time": started},
        },
        "spec": {
            "template": {
                "spec": {
                    "restartPolicy": "OnFailure",
                    "nodeSelector": {HOSTNAME_LABEL: node.hostname_label},
                    "tolerations": [dict(t) for t in tolerations],
                    "containers": [container],
                    "volumes": [
                        {"name": "discovery", "hostPath": {"path": cls.host_dir}},
                        {"name": "dev", "hostPath": {"path": "/dev"}},
                    ],
                },
            },
        },
    }


def job_state(job: Mapping[str, Any]) -> JobState:
    status = job.get("status") or {}
    if int(status.get("succeeded") or 0) > 0:
        return JobState.SUCCEEDED
    for condition in status.get("conditions") or []:
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            return JobState.FAILED
    return JobState.RUNNING


def job_failure(job: Mapping[str, Any]) -> str:
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Failed":
            return f"{condition.get('reason', 'Failed')}: {condition.get('message', '')}"
    return "failed"
