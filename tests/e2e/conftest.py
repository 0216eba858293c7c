"""The e2e tier: a real control plane (etcd, apiserver, controller-manager, scheduler, KWOK)
on 127.0.0.1, the agent's own RBAC from daemonset.yaml, and agents run as real processes."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from devkit.agents import REPO, write_token_kubeconfig
from devkit.controlplane import ControlPlane
from devkit.disks import can_make_disks
from devkit.udevd import Udevd, udevd_binary
from tests.conftest import require
from tests.e2e.proxy import Proxy

CLUSTER_KEY = pytest.StashKey[ControlPlane]()
RBAC_KINDS = {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
              "RoleBinding"}


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    """The control plane binaries: built once and cached by version outside the repo."""
    require(shutil.which("go") is not None or _assets_preset(),
            "Go is needed to build the control plane binaries")
    result = subprocess.run([str(REPO / "scripts" / "build-binaries")], capture_output=True,
                            text=True, check=False, timeout=3600)
    if result.returncode != 0:
        pytest.fail(f"scripts/build-binaries failed:\n{result.stderr[-4000:]}", pytrace=False)
    return Path(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def cluster(bin_dir: Path, tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> Iterator[ControlPlane]:
    ok, why = can_make_disks()
    require(ok, why)
    plane = ControlPlane(tmp_path_factory.mktemp("control-plane"), bin_dir)
    request.config.stash[CLUSTER_KEY] = plane
    try:
        plane.start(nodes=3)
    except Exception:
        print(plane.log_tails())
        plane.stop()
        raise
    plane.kubectl("apply", "-f", str(REPO / "config" / "storageclass.yaml"))
    yield plane
    plane.stop()


@pytest.fixture(scope="session")
def agent_kubeconfig(cluster: ControlPlane, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kubeconfig holding a token of the agent's ServiceAccount, bound by daemonset.yaml."""
    docs = [d for d in yaml.safe_load_all((REPO / "daemonset.yaml").read_text())
            if d and d["kind"] in RBAC_KINDS]
    assert {d["kind"] for d in docs} == RBAC_KINDS
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    return write_token_kubeconfig(cluster, tmp_path_factory.mktemp("agent") / "kubeconfig")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    plane = item.config.stash.get(CLUSTER_KEY, None)
    if plane is not None and getattr(report, "failed", False) and "e2e" in item.nodeid:
        report.sections.append(("control plane log tails", plane.log_tails()))  # type: ignore[attr-defined]
    return report


def _assets_preset() -> bool:
    import os  # noqa: PLC0415

    assets = os.environ.get("KUBEBUILDER_ASSETS")
    return bool(assets) and Path(assets, "kube-apiserver").exists()


@pytest.fixture(scope="session")
def udevd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Udevd]:
    """A real systemd-udevd (Debian package udev), started unless one already runs."""
    require(udevd_binary() is not None, "systemd-udevd missing: run scripts/install-system-deps")
    daemon = Udevd(tmp_path_factory.mktemp("udevd") / "udevd.log").start()
    yield daemon
    daemon.stop()


@pytest.fixture
def proxy(cluster: ControlPlane) -> Iterator[Proxy]:
    """A cuttable, stallable TCP forwarder to the apiserver (see proxy.py)."""
    url = urlparse(cluster.server)
    p = Proxy(url.hostname or "127.0.0.1", url.port or 443)
    yield p
    p.close()
