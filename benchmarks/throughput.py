#!/usr/bin/env python3
"""How fast many volumes mounted at once become PVs, with the pass's writes concurrent
(`--api-concurrency`, the default) and one at a time (`--api-concurrency 1`, the baseline).

For each setting and each count (1, 10, 100, 1,000): a fresh KWOK node and agent; the benchmark
mounts that many tmpfs volumes under the node's discovery dir at once and times from the first
mount call to the last PV's ADDED event on a watch; then waits for the agent's Provisioned
Events. Counted from the agent's own metrics and the API: PV creates (the agent's create
requests minus its Events: it creates nothing else here), Event creates (Events in the API
whose source is the node), 429s the agent was answered, and its passes. Same control plane,
same run; the ratio is baseline / setting.

Needs root and the control plane binaries. Prints a table, writes JSON; never passes or fails.

    .venv/bin/python benchmarks/throughput.py [--counts 1,10,100,1000] [--concurrency 8,1]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# the sibling benchmark, run as a script too
from discovery_latency import CLASS, LIBC, PASSES, REQUESTS, PVWatch, mount_tmpfs, new_node

from agent.volumes import pv_name
from devkit.agents import Agent, build_binaries, install_agent, items, wait_for
from devkit.controlplane import ControlPlane

PASS_SECONDS = re.compile(
    r"^localpv_agent_discovery_pass_duration_seconds_sum ([0-9.e+]+)$", re.M)


def agent_counts(agent: Agent) -> dict[str, float]:
    """create requests answered ok, 429s, passes and their seconds: from the agent's
    /metrics."""
    _, text = agent.get("/metrics")
    found = {"passes": 0.0, "pass_seconds": 0.0, "create_ok": 0.0, "throttled": 0.0}
    if passes := PASSES.search(text):
        found["passes"] = float(passes[1])
    if seconds := PASS_SECONDS.search(text):
        found["pass_seconds"] = float(seconds[1])
    for m in REQUESTS.finditer(text):
        if m[2] == "create" and m[1] == "ok":
            found["create_ok"] += float(m[3])
        if m[1] == "throttled":
            found["throttled"] += float(m[3])
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_of(cluster: ControlPlane, agent: Agent) -> dict[str, float]:
    """CPU seconds so far of the agent and of each control plane process."""
    assert agent.proc is not None
    found = {"agent": cpu_seconds(agent.proc.pid)}
    for name, pid in cluster.pids.items():
        found[name] = cpu_seconds(pid)
    return found


def node_events(cluster: ControlPlane, node: str) -> tuple[int, int]:
    """The node's agent's Events in the API: all of them, and the Provisioned ones."""
    mine = [e for e in items(cluster, "/api/v1/namespaces/default/events")
            if (e.get("source") or {}).get("host") == node]
    return len(mine), sum(1 for e in mine if e.get("reason") == "Provisioned")


def one(count: int, concurrency: int, cluster: ControlPlane, pvw: PVWatch, kubeconfig: Path,
        work: Path) -> dict[str, Any]:
    node = f"tp-{concurrency}-{count}"
    disc, cfg = new_node(cluster, work, node)
    agent = Agent(node, cfg, kubeconfig, work, "--api-concurrency", str(concurrency)).start()
    targets = [disc / f"v{i:04d}" for i in range(count)]
    try:
        agent.wait_ready()
        before, events_before = agent_counts(agent), node_events(cluster, node)
        cpu_before = cpu_of(cluster, agent)
        started = time.monotonic()
        for target in targets:
            mount_tmpfs(target)
        mounted = time.monotonic() - started
        last = max(pvw.wait_added(pv_name(t.name, node, CLASS), timeout=600) for t in targets)
        all_pvs = last - started
        cpu = {k: round(v - cpu_before[k], 2) for k, v in cpu_of(cluster, agent).items()}
        wait_for(lambda: node_events(cluster, node)[1] - events_before[1] >= count, 300,
                 "the Provisioned Events")
        all_events = time.monotonic() - started
        time.sleep(0.5)  # the counters include the final pass
        after, events_after = agent_counts(agent), node_events(cluster, node)
    finally:
        agent.stop()
        for target in targets:
            LIBC.umount2(os.fsencode(target), 2)  # MNT_DETACH
    creates = after["create_ok"] - before["create_ok"]
    events, provisioned = (a - b for a, b in zip(events_after, events_before, strict=True))
    return {"volumes": count, "api_concurrency": concurrency, "mount_seconds": round(mounted, 3),
            "all_pvs_seconds": round(all_pvs, 3), "all_events_seconds": round(all_events, 3),
            "pv_creates": int(creates - events), "event_creates": events,
            "provisioned_events": provisioned,
            "throttled": int(after["throttled"] - before["throttled"]),
            "passes": int(after["passes"] - before["passes"]),
            "pass_seconds": round(after["pass_seconds"] - before["pass_seconds"], 3),
            "cpu_seconds_until_all_pvs": cpu, "load_average": os.getloadavg()[0]}


def print_table(rows: list[dict[str, Any]], settings: list[int]) -> None:
    base = {r["volumes"]: r for r in rows if r["api_concurrency"] == 1}
    print("volumes mounted at once -> every PV on a watch (tmpfs, one KWOK node, real apiserver)")
    print("volumes | --api-concurrency | until all PVs s | PV creates | Event creates "
          "(Provisioned) | until all Provisioned s | 429s | passes | baseline / this")
    print("--- | --- | --- | --- | --- | --- | --- | --- | ---")
    for setting in settings:
        for r in (r for r in rows if r["api_concurrency"] == setting):
            b = base.get(r["volumes"])
            ratio = (f"{b['all_pvs_seconds'] / r['all_pvs_seconds']:.1f}x"
                     if b is not None and r["all_pvs_seconds"] else "")
            print(f"{r['volumes']} | {setting} | {r['all_pvs_seconds']:.3f} | "
                  f"{r['pv_creates']} | {r['event_creates']} ({r['provisioned_events']}) | "
                  f"{r['all_events_seconds']:.3f} | "
                  f"{r['throttled']} | {r['passes']} ({r['pass_seconds']:.1f}) | {ratio}")
    print("\nCPU seconds from the first mount to the last PV (user + system)")
    names = sorted({k for r in rows for k in r["cpu_seconds_until_all_pvs"]})
    print("volumes | --api-concurrency | " + " | ".join(names) + " | load average")
    print(" | ".join(["---"] * (len(names) + 3)))
    for setting in settings:
        for r in (r for r in rows if r["api_concurrency"] == setting):
            cpu = r["cpu_seconds_until_all_pvs"]
            print(f"{r['volumes']} | {setting} | " + " | ".join(
                f"{cpu.get(n, 0):.2f}" for n in names) + f" | {r['load_average']:.1f}")


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up mounts when killed
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,10,100,1000")
    parser.add_argument("--concurrency", default="8,1",
                        help="--api-concurrency settings, the default first; 1 is the baseline")
    parser.add_argument("--json", default="benchmarks/results/throughput.json")
    args = parser.parse_args()
    counts = [int(n) for n in args.counts.split(",")]
    settings = [int(c) for c in args.concurrency.split(",")]
    if 1 not in settings:
        settings.append(1)
    work = Path(tempfile.mkdtemp(prefix="localpv-throughput."))
    cluster = ControlPlane(work / "cluster", build_binaries())
    rows: list[dict[str, Any]] = []
    try:
        cluster.start(nodes=0)
        kubeconfig = install_agent(cluster, work / "agent.kubeconfig")
        pvw = PVWatch(cluster.kubeconfig)
        for count in counts:  # settings interleaved, so a drift of the machine hits both
            for setting in settings:
                rows.append(one(count, setting, cluster, pvw, kubeconfig, work))
                print(f"  {rows[-1]}", file=sys.stderr)
    finally:
        cluster.stop()
    print_table(rows, settings)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "cpus": os.cpu_count(),
                               "rows": rows}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
