"""What operators see: a real Prometheus scraping the agent, promtool on a live scrape, and
the mounted ConfigMap edited the way the kubelet does it (a swapped `..data` symlink)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from agent.volumes import pv_name
from devkit import prometheus
from devkit.agents import Agent, class_config, events_for, pvs_of, wait_for
from devkit.controlplane import ControlPlane
from devkit.disks import disks, sh
from tests.conftest import require

MiB = 1 << 20
CLASS = "local-storage"


@pytest.fixture
def prom_binary() -> str:
    path = prometheus.binary()
    require(path is not None, "prometheus missing: run scripts/install-system-deps")
    return str(path)


def test_prometheus_sees_what_the_node_really_offers(
    cluster: ControlPlane, agent_kubeconfig: Path, tmp_path: Path, prom_binary: str
) -> None:
    cluster.add_node("obs-node")
    mount_dir = tmp_path / "disks"
    config = class_config(tmp_path / "config.yaml", mount_dir)
    with disks(tmp_path) as d:
        d.tmpfs(mount_dir / "a", size_mib=16)
        d.tmpfs(mount_dir / "b", size_mib=32)
        (mount_dir / "stray.txt").write_text("x")
        agent = Agent("obs-node", config, agent_kubeconfig, tmp_path).start()
        prom = prometheus.Prometheus(tmp_path, [f"127.0.0.1:{agent.port}"])
        try:
            agent.wait_ready()
            prom.start()

            def offered(volumes: int, size: int) -> bool:
                return (prom.value("sum(localpv_agent_volumes)") == volumes
                        and prom.value("sum(localpv_agent_capacity_bytes)") == size
                        and prom.value('local_volume_provisioner_persistentvolume_capacity_bytes'
                                       '{mode="Filesystem"}') == size)

            wait_for(lambda: offered(2, 48 * MiB), 30, "2 volumes, 48 MiB in Prometheus")
            assert prom.value('localpv_agent_excluded_entries{reason="unsupported_type"}') == 1
            assert prom.value("localpv_agent_ready") == 1
            assert prom.value('sum(localpv_agent_volumes{state="available"})') == 2

            d.tmpfs(mount_dir / "c", size_mib=64)
            wait_for(lambda: offered(3, 112 * MiB), 30, "a disk added")
            sh("umount", str(mount_dir / "a"))
            wait_for(lambda: offered(2, 96 * MiB), 30, "a disk removed")
            assert prom.value('sum(localpv_agent_wakeups_total{source="mount"})') >= 2  # type: ignore[operator]

            promtool = shutil.which("promtool")
            require(promtool is not None, "promtool missing")
            _, scrape = agent.get("/metrics")
            lint = subprocess.run([str(promtool), "check", "metrics"], input=scrape,
                                  capture_output=True, text=True, check=False)
            assert lint.returncode == 0, lint.stdout + lint.stderr
            assert agent.get("/healthz")[0] == 200
        finally:
            prom.stop()
            assert agent.stop() < 5


class MountedConfigMap:
    """A directory laid out like the kubelet's ConfigMap volume: keys are links into `..data`,
    which is swapped atomically to a new timestamped directory on every edit."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.version = 0

    def write(self, data: dict[str, object]) -> None:
        self.version += 1
        stamp = self.root / f"..2026_11_26_00_00_{self.version:02d}.000"
        stamp.mkdir()
        for key, value in data.items():
            (stamp / key).write_text(value if isinstance(value, str) else yaml.safe_dump(value))
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(stamp.name)
        os.replace(tmp, self.root / "..data")
        for key in data:
            link = self.root / key
            if not link.is_symlink():
                link.symlink_to(f"..data/{key}")
        for key in {p.name for p in self.root.iterdir() if not p.name.startswith(".")} - set(data):
            (self.root / key).unlink()


@pytest.fixture
def reload_node(cluster: ControlPlane) -> Iterator[str]:
    cluster.add_node("reload-node")
    yield "reload-node"


def test_config_edits_are_applied_rejected_or_seen_removed(
    cluster: ControlPlane, agent_kubeconfig: Path, tmp_path: Path, reload_node: str
) -> None:
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    fast_class = {"hostDir": "/mnt/fast", "mountDir": str(fast)}
    slow_class = {"hostDir": "/mnt/slow", "mountDir": str(slow)}
    configmap = MountedConfigMap(tmp_path / "config")
    configmap.write({"storageClassMap": {CLASS: fast_class}})
    with disks(tmp_path) as d:
        d.tmpfs(fast / "f1")
        d.tmpfs(slow / "s1")
        agent = Agent(reload_node, configmap.root, agent_kubeconfig, tmp_path).start()
        try:
            agent.wait_ready()
            names = lambda: {pv["metadata"]["name"] for pv in pvs_of(cluster, reload_node)}  # noqa: E731
            wait_for(lambda: names() == {pv_name("f1", reload_node, CLASS)}, 20, "fast PV")

            cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump({
                "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
                "metadata": {"name": "slow-disks"}, "provisioner": "kubernetes.io/no-provisioner",
                "volumeBindingMode": "WaitForFirstConsumer"}))
            configmap.write({"storageClassMap": {CLASS: fast_class, "slow-disks": slow_class},
                             "useNodeNameOnly": "true"})
            slow_pv = pv_name("s1", reload_node, "slow-disks")
            wait_for(lambda: slow_pv in names(), 20, "the added class's PV",
                     on_timeout=agent.log)
            _, created = cluster.api("GET", f"/api/v1/persistentvolumes/{slow_pv}")
            assert created["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"] == \
                f"local-volume-provisioner-{reload_node}"  # the new key applies to new PVs

            configmap.write({"storageClassMap": {CLASS: {**fast_class, "volumeMode": "Blok"}}})
            wait_for(lambda: [e for e in events_for(cluster, "Node", reload_node)
                              if e["reason"] == "ConfigRejected"], 20, "the rejected edit")
            d.tmpfs(slow / "s2")  # the last good config (with slow-disks) is still in force
            wait_for(lambda: pv_name("s2", reload_node, "slow-disks") in names(), 20,
                     "a PV under the old config", on_timeout=agent.log)

            configmap.write({"storageClassMap": {CLASS: fast_class}})
            wait_for(lambda: agent.metric("localpv_agent_config_reloads_total",
                                          result="applied") == 2, 20, "the class removed",
                     on_timeout=agent.log)
            d.tmpfs(slow / "s3")
            d.tmpfs(fast / "f2")
            wait_for(lambda: pv_name("f2", reload_node, CLASS) in names(), 20, "fast f2")
            assert pv_name("s3", reload_node, "slow-disks") not in names()
            _, still = cluster.api("GET", f"/api/v1/persistentvolumes/{slow_pv}")
            assert still["metadata"]["uid"] == created["metadata"]["uid"]  # never rewritten
            assert agent.metric("localpv_agent_config_reloads_total", result="rejected") == 1
        finally:
            assert agent.stop() < 5


def test_passes_over_an_unchanged_host_write_nothing(
    cluster: ControlPlane, agent_kubeconfig: Path, tmp_path: Path
) -> None:
    """Level-driven, not edge-driven: a pass every second, and no write after the first."""
    cluster.add_node("idle-node")
    mount_dir = tmp_path / "disks"
    config = class_config(tmp_path / "config.yaml", mount_dir)

    def writes(agent: Agent) -> float:
        return sum(agent.metric("localpv_agent_api_requests_total", verb=verb)
                   for verb in ("create", "delete", "patch"))

    def no_write_over_two_passes(agent: Agent) -> bool:
        before = writes(agent)
        agent.wait_passes(2)
        return writes(agent) == before

    with disks(tmp_path) as d:
        d.tmpfs(mount_dir / "a")
        d.tmpfs(mount_dir / "b")
        (mount_dir / "stray.txt").write_text("x")  # an exclusion Event, once
        agent = Agent("idle-node", config, agent_kubeconfig, tmp_path,
                      "--resync-period", "1").start()
        try:
            agent.wait_ready()
            wait_for(lambda: len(pvs_of(cluster, "idle-node")) == 2, 20, "two PVs")
            wait_for(lambda: any(e["reason"] == "VolumeExcluded"
                                 for e in events_for(cluster, "Node", "idle-node")),
                     20, "the exclusion's Event")
            wait_for(lambda: no_write_over_two_passes(agent), 60, "the agent settling",
                     on_timeout=agent.log)
            settled = writes(agent)
            agent.wait_passes(3)
            assert writes(agent) == settled, agent.log()
        finally:
            assert agent.stop() < 5
