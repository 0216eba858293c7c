"""API outages: the agent backs off, stays alive, reports not-ready, and recovers by itself."""

from __future__ import annotations

import time
from pathlib import Path

import yaml

from agent.volumes import pv_name
from devkit.agents import Agent, class_config, pvs_of, wait_for
from devkit.controlplane import ControlPlane
from devkit.disks import disks
from tests.e2e.proxy import Proxy

FAILED = "local_volume_provisioner_apiserver_requests_failed_total"


def test_api_outage_is_survived_and_new_disks_land_after_it(
    cluster: ControlPlane, agent_kubeconfig: Path, proxy: Proxy, tmp_path: Path
) -> None:
    kubeconfig = yaml.safe_load(agent_kubeconfig.read_text())
    kubeconfig["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    through_proxy = tmp_path / "proxy.kubeconfig"
    through_proxy.write_text(yaml.safe_dump(kubeconfig))
    cluster.add_node("node-outage")
    with disks(tmp_path) as d:
        d.tmpfs(tmp_path / "disks" / "before")
        config = class_config(tmp_path / "config.yaml", tmp_path / "disks")
        agent = Agent("node-outage", config, through_proxy, tmp_path,
                      "--resync-period", "1").start()
        try:
            agent.wait_ready()
            wait_for(lambda: len(pvs_of(cluster, "node-outage")) == 1, 30, "first PV")

            failed = agent.metric(FAILED)
            proxy.cut()
            wait_for(lambda: agent.get("/ready")[0] == 503, 30, "not ready during the outage",
                     on_timeout=agent.log)
            d.tmpfs(tmp_path / "disks" / "during")
            wait_for(lambda: agent.metric(FAILED) >= failed + 2, 60,
                     "failing API requests, retried with backoff", on_timeout=agent.log)
            assert agent.proc is not None and agent.proc.poll() is None, agent.log()
            assert agent.get("/healthz")[0] == 200  # alive, just cut off

            proxy.restore()
            agent.wait_ready(timeout=90)
            names = wait_for(lambda: len(p := pvs_of(cluster, "node-outage")) == 2 and p, 90,
                             "the disk added during the outage", on_timeout=agent.log)
            assert {pv["metadata"]["name"] for pv in names} == {
                pv_name("before", "node-outage", "local-storage"),
                pv_name("during", "node-outage", "local-storage"),
            }
        finally:
            assert agent.stop() < 5


def test_sigterm_stops_promptly_whatever_the_loop_is_doing(
    cluster: ControlPlane, agent_kubeconfig: Path, tmp_path: Path
) -> None:
    """Signals arrive at random points of the loop (mid-pass, mid-wait); none may hang it."""
    cluster.add_node("sigterm-node")
    with disks(tmp_path) as d:
        d.tmpfs(tmp_path / "disks" / "v")
        config = class_config(tmp_path / "config.yaml", tmp_path / "disks")
        for round_no in range(6):
            agent = Agent("sigterm-node", config, agent_kubeconfig, tmp_path,
                          "--resync-period", "0.05").start()  # a pass every 50 ms
            agent.wait_ready()
            time.sleep(0.1 * round_no)
            took = agent.stop()
            assert took < 5, f"round {round_no}: SIGTERM took {took:.1f}s\n{agent.log()}"
            assert agent.proc is not None and agent.proc.returncode == 0
            assert "stopped" in agent.log().splitlines()[-1]
