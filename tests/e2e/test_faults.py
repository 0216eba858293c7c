"""Faults that must not stop a node: a stalled API, a hung disk, a frozen filesystem mid-clean.

Each test runs one agent for its own fake Node against the shared control plane, on real
mounts: a FUSE mount nobody answers stands in for a dead disk, `fsfreeze` for writes that
block in the kernel, a proxy that forwards nothing for a frozen apiserver.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest
import yaml

from agent.volumes import pv_name
from devkit.agents import Agent, bind_claim, class_config, node_for_test, pvs_of, wait_for
from devkit.controlplane import ControlPlane
from devkit.disks import disks, sh
from devkit.hungfs import HungMount
from tests.e2e.proxy import Proxy

CLASS = "local-storage"


def through(proxy: Proxy, kubeconfig: Path, work: Path) -> Path:
    config = yaml.safe_load(kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    path = work / "proxy.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def has_pv(cluster: ControlPlane, node: str, entry: str) -> bool:
    name = pv_name(entry, node, CLASS)
    return any(pv["metadata"]["name"] == name for pv in pvs_of(cluster, node))


def stops_promptly(agent: Agent, despite: str) -> None:
    took = agent.stop()
    assert took < 5, f"SIGTERM took {took:.1f}s with {despite}\n{agent.log()}"


def test_a_stalled_api_neither_fails_liveness_nor_holds_sigterm(
    cluster: ControlPlane, agent_kubeconfig: Path, proxy: Proxy, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """The apiserver accepts connections and never answers, for a minute: /healthz stays 200
    (a liveness probe must not restart every agent of a cluster for an API outage), and
    SIGTERM still stops the agent within 5 s."""
    node = node_for_test(cluster, request.node.name)
    with disks(tmp_path) as d:
        d.tmpfs(tmp_path / "disks" / "before")
        config = class_config(tmp_path / "config.yaml", tmp_path / "disks")
        agent = Agent(node, config, through(proxy, agent_kubeconfig, tmp_path),
                      tmp_path).start()
        try:
            agent.wait_ready()
            wait_for(lambda: has_pv(cluster, node, "before"), 30, "the first PV")
            proxy.stall()
            d.tmpfs(tmp_path / "disks" / "during")  # the loop now waits on API calls
            deadline = time.monotonic() + 60
            answers = []
            while time.monotonic() < deadline:
                answers.append(agent.get("/healthz")[0])
                time.sleep(2)
            assert set(answers) == {200}, f"{answers}\n{agent.log()}"
            stops_promptly(agent, "a stalled API")
        finally:
            agent.kill()


def test_a_hung_disk_delays_no_other_volume_and_no_stop(
    cluster: ControlPlane, agent_kubeconfig: Path, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """A mount whose filesystem never answers: it is excluded as `timeout`, a disk added
    next to it gets its PV at once, /healthz stays 200 and SIGTERM stops the agent."""
    node = node_for_test(cluster, request.node.name)
    with disks(tmp_path) as d, HungMount(tmp_path / "disks" / "a-hung") as _hung:
        d.tmpfs(tmp_path / "disks" / "b-fine")
        config = class_config(tmp_path / "config.yaml", tmp_path / "disks")
        agent = Agent(node, config, agent_kubeconfig, tmp_path, "--host-timeout", "2").start()
        try:
            agent.wait_ready(timeout=60)
            wait_for(lambda: has_pv(cluster, node, "b-fine"), 30, "the fine disk's PV",
                     on_timeout=agent.log)
            wait_for(lambda: "timeout" in agent.get("/metrics")[1]
                     and 'reason="timeout"' in agent.get("/metrics")[1], 30,
                     "the hung entry excluded as timeout", on_timeout=agent.log)
            d.tmpfs(tmp_path / "disks" / "c-new")
            added = time.monotonic()
            wait_for(lambda: has_pv(cluster, node, "c-new"), 30, "the new disk's PV",
                     on_timeout=agent.log, interval=0.05)
            assert time.monotonic() - added < 2, agent.log()
            assert agent.get("/healthz")[0] == 200
            stops_promptly(agent, "a hung disk")
        finally:
            agent.kill()


def test_sigterm_during_a_clean_on_a_frozen_filesystem(
    cluster: ControlPlane, agent_kubeconfig: Path, tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """The clean of a released volume blocks on a frozen filesystem: SIGTERM still stops the
    agent within 5 s, the volume is never offered half-cleaned, and after the thaw a new
    agent finishes the clean."""
    node = node_for_test(cluster, request.node.name)
    with disks(tmp_path) as d:
        mount = d.mount(d.loop("frozen", fs="ext4"), tmp_path / "disks" / "frozen")
        config = class_config(tmp_path / "config.yaml", tmp_path / "disks")
        extra = ("--clean-retry-base", "1", "--clean-stale-after", "3")
        agent = Agent(node, config, agent_kubeconfig, tmp_path, *extra).start()
        frozen = False
        try:
            agent.wait_ready()
            name = pv_name("frozen", node, CLASS)
            pv = wait_for(lambda: next((p for p in pvs_of(cluster, node)
                                        if p["metadata"]["name"] == name), None), 30, "the PV")
            claim = f"{node[:40]}-frozen"
            bind_claim(cluster, pv, claim)
            wait_for(lambda: agent.dirty_paths() == {"/mnt/disks/frozen"}, 30,
                     "the volume recorded as dirty", on_timeout=agent.log)
            for i in range(100):
                (mount / f"file-{i}").write_text("tenant data")
            sh("fsfreeze", "-f", str(mount))
            frozen = True
            cluster.api("DELETE", f"/api/v1/namespaces/default/persistentvolumeclaims/{claim}")
            wait_for(lambda: subprocess.run(["pgrep", "-f", "agent.cleaner --fd"],
                                            capture_output=True, check=False).returncode == 0,
                     60, "the filesystem cleaner started", on_timeout=agent.log)
            took = agent.stop()
            assert took < 5, f"SIGTERM took {took:.1f}s\n{agent.log()}"
            current = next(pv for pv in pvs_of(cluster, node) if pv["metadata"]["name"] == name)
            assert current["status"]["phase"] == "Released"  # not offered half-cleaned
            sh("fsfreeze", "-u", str(mount))
            frozen = False
            agent = Agent(node, config, agent_kubeconfig, tmp_path, *extra).start()
            wait_for(lambda: [pv for pv in pvs_of(cluster, node)
                              if pv["metadata"]["name"] == name
                              and pv["metadata"]["uid"] != current["metadata"]["uid"]
                              and pv.get("status", {}).get("phase") == "Available"],
                     90, "the clean resumed and the volume offered again",
                     on_timeout=agent.log)
            assert [p.name for p in mount.iterdir()] == []
        finally:
            if frozen:
                subprocess.run(["fsfreeze", "-u", str(mount)], check=False)
            agent.kill()
