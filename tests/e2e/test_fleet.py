"""benchmarks/fleet.py's own setup, small and quick: a few agents started together without
jitter, and the apiserver's request counters by verb and resource. The benchmark itself
exercises the apiserver restart and the audit log (they need a control plane of their own)."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

from devkit.agents import NO_JITTER, REPO
from devkit.controlplane import ControlPlane
from devkit.disks import Disks
from devkit.fleet import Fleet, apiserver_requests


def test_no_jitter_makes_every_backoff_and_period_exact() -> None:
    code = NO_JITTER + ("import agent.backoff as b\n"
                        "print(b.Backoff().next_delay(), b.resync_period(5.0), b.watch_timeout())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, text=True,
                         capture_output=True).stdout
    assert out.split() == ["1.0", "5.0", "300"]


def test_a_small_fleet_makes_its_pvs_and_the_apiserver_counts_them(
        cluster: ControlPlane, agent_kubeconfig: Path, tmp_path: Path) -> None:
    nodes = [f"fleet-smoke-{i}" for i in range(1, 4)]
    disks = Disks(tmp_path)
    fleet = Fleet(cluster, tmp_path, agent_kubeconfig, disks, nodes, 2)
    before = apiserver_requests(cluster.metrics_text())
    try:
        fleet.prepare()
        fleet.start(prelude=NO_JITTER)
        found = fleet.wait_pvs(120)
        assert Counter(found.values()) == dict.fromkeys(nodes, 2)
        fleet.wait_ready(60)
        assert fleet.request_counts()["create"] >= 6  # the agents' own counters, summed
    finally:
        fleet.stop()
        disks.cleanup()
    created = apiserver_requests(cluster.metrics_text())[("POST", "persistentvolumes")]
    assert created - before.get(("POST", "persistentvolumes"), 0.0) >= 6
    for name in fleet.pvs():
        cluster.api("DELETE", f"/api/v1/persistentvolumes/{name}")
