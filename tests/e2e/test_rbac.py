"""The shipped manifests against the real apiserver, and the agent's RBAC proven both ways."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from devkit.agents import REPO, class_config
from devkit.controlplane import ControlPlane
from devkit.disks import disks

# Kubernetes manifests; config/monitoring holds a PrometheusRule, whose CRD (the Prometheus
# Operator's) a bare control plane does not have: it is checked with promtool instead.
MANIFESTS = [REPO / "daemonset.yaml",
             *sorted(p for p in (REPO / "config").rglob("*.yaml")
                     if "apiVersion" in p.read_text() and "monitoring" not in p.parts)]


def test_manifest_list_is_not_empty() -> None:
    names = {p.relative_to(REPO).as_posix() for p in MANIFESTS}
    assert {"daemonset.yaml", "config/storageclass.yaml",
            "config/examples/statefulset.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.relative_to(REPO).as_posix())
def test_server_side_dry_run_accepts_manifest(
    cluster: ControlPlane, agent_kubeconfig: Path, path: Path
) -> None:
    result = cluster.kubectl("apply", "--dry-run=server", "-f", str(path), check=False)
    assert result.returncode == 0, result.stderr


def test_server_side_dry_run_accepts_scan_output(
    cluster: ControlPlane, tmp_path: Path
) -> None:
    with disks(tmp_path) as d:
        d.tmpfs(tmp_path / "disks" / "vol-1")
        d.tmpfs(tmp_path / "disks" / "vol 2")
        config = class_config(tmp_path / "config.yaml", tmp_path / "disks")
        scan = subprocess.run(
            [sys.executable, "-m", "agent.cli", "scan", "--config", str(config),
             "--node-name", "node-1", "-o", "yaml"],
            capture_output=True, text=True, check=True, cwd=REPO)
    assert scan.stdout.count("kind: PersistentVolume") == 2
    result = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=scan.stdout,
                             check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("created (server dry run)") == 2


def agent_can(cluster: ControlPlane, kubeconfig: Path, verb: str, resource: str) -> bool:
    result = cluster.kubectl("--kubeconfig", str(kubeconfig), "auth", "can-i", verb, resource,
                             check=False)
    return result.stdout.strip() == "yes"


@pytest.mark.parametrize(("verb", "resource"), [
    ("create", "persistentvolumes"), ("delete", "persistentvolumes"),
    ("watch", "persistentvolumes"), ("get", "nodes"), ("get", "storageclasses.storage.k8s.io"),
    ("create", "events"),
])
def test_agent_token_may_do_what_it_needs(
    cluster: ControlPlane, agent_kubeconfig: Path, verb: str, resource: str
) -> None:
    assert agent_can(cluster, agent_kubeconfig, verb, resource)


@pytest.mark.parametrize(("verb", "resource"), [
    ("list", "secrets"), ("delete", "nodes"), ("update", "nodes"), ("create", "pods"),
    ("delete", "persistentvolumeclaims"), ("create", "storageclasses.storage.k8s.io"),
    ("list", "nodes"), ("list", "storageclasses.storage.k8s.io"), ("update", "events"),
])
def test_agent_token_is_refused_everything_else(
    cluster: ControlPlane, agent_kubeconfig: Path, verb: str, resource: str
) -> None:
    assert not agent_can(cluster, agent_kubeconfig, verb, resource)


def test_real_request_outside_the_role_is_forbidden(
    cluster: ControlPlane, agent_kubeconfig: Path
) -> None:
    result = cluster.kubectl("--kubeconfig", str(agent_kubeconfig), "get", "secrets", "-A",
                             check=False)
    assert result.returncode != 0 and "Forbidden" in result.stderr
