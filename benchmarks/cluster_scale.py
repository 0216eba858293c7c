#!/usr/bin/env python3
"""Agent memory and API traffic as the cluster grows: one node with 10 volumes while the
cluster holds 0, 1,000 and 10,000 PVs of other nodes.

The upstream provisioner caches every PV of the cluster on every node; this agent watches only
its own node's PVs, so its memory should stay flat. Prints a table (RSS as a ratio to the
0-PV baseline of the same run) and writes JSON. Needs root (tmpfs mounts) and the control plane
binaries (scripts/build-binaries). Never passes or fails on the numbers.

    .venv/bin/python benchmarks/cluster_scale.py [--sizes 0,1000,10000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from devkit.agents import (
    Agent,
    build_binaries,
    class_config,
    install_agent,
    items,
    wait_for,
)
from devkit.controlplane import ControlPlane
from devkit.disks import Disks

NODE = "node-1"
VOLUMES = 10
STEADY_SECONDS = 20.0
RESYNC_SECONDS = 2.0
READS = {"get", "list", "watch"}  # the metric's `method` label is the API verb
REQUESTS = re.compile(
    r'^local_volume_provisioner_apiserver_requests_total\{method="(\w+)"\} ([0-9.e+]+)$', re.M)


def other_nodes_pv(i: int, upstream: bool) -> dict[str, object]:
    """A PV pinned to some other node, as this agent writes it or (unlabelled) as upstream does."""
    node = f"other-{i % 500}"
    labels = {} if upstream else {"kubernetes.io/hostname": node,
                                  "app.kubernetes.io/managed-by": "localpv-agent"}
    return {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {
            "name": f"bench-{'up' if upstream else 'pv'}-{i}",
            "labels": labels,
            "annotations": {"pv.kubernetes.io/provisioned-by":
                            f"local-volume-provisioner-{node}-uid"},
        },
        "spec": {
            "capacity": {"storage": "100Gi"}, "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete", "storageClassName": "local-storage",
            "volumeMode": "Filesystem", "local": {"path": f"/mnt/disks/vol-{i}"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}},
        },
    }


def fill(cluster: ControlPlane, start: int, stop: int, upstream: bool = False) -> None:
    def create(i: int) -> None:
        status, body = cluster.api("POST", "/api/v1/persistentvolumes",
                                   other_nodes_pv(i, upstream))
        if status != 201:
            raise RuntimeError(f"creating bench-pv-{i}: HTTP {status}: {body}")

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(create, range(start, stop)))


def api_requests(agent: Agent) -> dict[str, float]:
    _, text = agent.get("/metrics")
    return {m[1]: float(m[2]) for m in REQUESTS.finditer(text)}


def measure(cluster: ControlPlane, config: Path, kubeconfig: Path, work: Path,
            others: int, upstream_made: int) -> dict[str, float]:
    # Start from a clean slate for this node so every size pays the same creates.
    for pv in items(cluster, "/api/v1/persistentvolumes?labelSelector="
                    f"kubernetes.io/hostname%3D{NODE}"):
        cluster.api("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}")
    agent = Agent(NODE, config, kubeconfig, work, "--resync-period", str(RESYNC_SECONDS))
    started = time.monotonic()
    agent.start()
    try:
        agent.wait_ready(timeout=300)
        wait_for(lambda: len(items(cluster, "/api/v1/persistentvolumes?labelSelector="
                                   f"kubernetes.io/hostname%3D{NODE}")) == VOLUMES,
                 120, "the node's PVs")
        ready_s = time.monotonic() - started
        assert agent.proc is not None
        proc = psutil.Process(agent.proc.pid)
        startup = api_requests(agent)
        rss_ready = proc.memory_info().rss
        time.sleep(STEADY_SECONDS)
        steady = api_requests(agent)
        rss_steady = proc.memory_info().rss
    finally:
        agent.stop()
    delta = {m: steady.get(m, 0) - startup.get(m, 0) for m in steady}
    return {
        "other_pvs": others,
        "of_which_upstream_made": upstream_made,
        "ready_seconds": round(ready_s, 2),
        "rss_ready_mib": round(rss_ready / 2**20, 1),
        "rss_steady_mib": round(rss_steady / 2**20, 1),
        "startup_get": sum(v for m, v in startup.items() if m in READS),
        "startup_writes": sum(v for m, v in startup.items() if m not in READS),
        "steady_passes": int(STEADY_SECONDS / RESYNC_SECONDS),
        "steady_get": sum(v for m, v in delta.items() if m in READS),
        "steady_writes": sum(v for m, v in delta.items() if m not in READS),
    }


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up disks when killed
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,1000,10000",
                        help="other nodes' PVs labelled by their agents")
    parser.add_argument("--upstream", type=int, default=10000,
                        help="then this many unlabelled PVs made by the upstream provisioner")
    parser.add_argument("--json", default="benchmarks/results/cluster_scale.json")
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    work = Path(tempfile.mkdtemp(prefix="localpv-bench."))
    disks = Disks(work)
    cluster = ControlPlane(work / "cluster", build_binaries())
    rows = []
    try:
        cluster.start(nodes=1)
        kubeconfig = install_agent(cluster, work / "agent.kubeconfig")
        mount_dir = work / "disks"
        for i in range(VOLUMES):
            disks.tmpfs(mount_dir / f"vol-{i}", size_mib=16)
        config = class_config(work / "config.yaml", mount_dir)
        existing = 0
        for size in sizes:
            fill(cluster, existing, size)
            existing = max(existing, size)
            rows.append(measure(cluster, config, kubeconfig, work, size, 0))
            print(f"measured with {size} other PVs", file=sys.stderr)
        if args.upstream:
            fill(cluster, 0, args.upstream, upstream=True)
            rows.append(measure(cluster, config, kubeconfig, work, existing + args.upstream,
                                args.upstream))
    finally:
        cluster.stop()
        disks.cleanup()

    base = rows[0]["rss_steady_mib"]
    header = ("other PVs", "upstream-made", "ready s", "RSS ready MiB", "RSS steady MiB",
              "x baseline", "startup reads", "startup writes", "steady reads", "steady writes")
    print(" | ".join(header))
    print(" | ".join("---" for _ in header))
    for r in rows:
        print(" | ".join(str(v) for v in (
            r["other_pvs"], r["of_which_upstream_made"], r["ready_seconds"],
            r["rss_ready_mib"], r["rss_steady_mib"],
            f"{r['rss_steady_mib'] / base:.2f}", int(r["startup_get"]),
            int(r["startup_writes"]), int(r["steady_get"]), int(r["steady_writes"]))))
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"volumes": VOLUMES, "steady_seconds": STEADY_SECONDS,
                               "resync_seconds": RESYNC_SECONDS, "rows": rows}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
