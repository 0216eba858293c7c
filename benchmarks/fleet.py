#!/usr/bin/env python3
"""A fleet: 50 agents (50 KWOK nodes, 10 tmpfs disks each) against one control plane.

1. Startup: from starting every agent at once to all their PVs existing, and to each agent's
   first PV (the times the apiserver received the creates, from its audit log).
2. Steady state: apiserver requests per agent per minute by verb and resource, from the
   apiserver's own `apiserver_request_total` (scraped before and after a window with the
   agents running, minus the same rate in a window with them stopped: the controller-manager,
   scheduler and KWOK make requests too), beside the agents' requests in the audit log (their
   ServiceAccount only) and their own counters.
3. The relist storm after an apiserver restart (SIGTERM, SIGKILL 5 s later, started again on
   the same etcd and port): the agents' LIST and WATCH requests per second from the first LIST
   that reached it, with the agents' jitter as it is, and without it (devkit.agents.NO_JITTER,
   the baseline) in the same run. "ready s" and "first LIST s" count from the SIGTERM; a LIST
   answered 403 reached the apiserver before its authorizer was ready; a relist is an agent's
   first LIST answered 200.

Prints tables and writes JSON. Needs root (tmpfs mounts) and the control plane binaries
(scripts/build-binaries). Never passes or fails on the numbers. Agents run with the default
resync period (minResyncPeriod, 5m). About 15 minutes with the defaults:

    .venv/bin/python benchmarks/fleet.py [--agents 50] [--disks 10] [--window 300]
    .venv/bin/python benchmarks/fleet.py --report benchmarks/results/fleet.json  # tables again
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from devkit.agents import NO_JITTER, build_binaries, install_agent, wait_for
from devkit.controlplane import ControlPlane
from devkit.disks import Disks
from devkit.fleet import AuditLog, Fleet, apiserver_requests, per_bin
from devkit.report import table

RESYNC = "300"  # the default minResyncPeriod (5m), as a DaemonSet runs it
GRACE = 5.0  # seconds from SIGTERM to SIGKILL: it stopped listening and serving long before
AGENT_RESOURCES = {"persistentvolumes", "storageclasses", "nodes", "events"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def startup(fleet: Fleet, audit: AuditLog, timeout: float) -> dict[str, Any]:
    """Start the agents; wait for all their PVs; when the apiserver got each create."""
    fleet.start()
    start = fleet.started_at
    want = len(fleet.nodes) * fleet.volumes
    wait_for(lambda: sum(1 for r in audit.since(start) if r.verb == "create"
                         and r.resource == "persistentvolumes" and r.code == 201) >= want,
             timeout, f"{want} PV creates in the audit log", interval=1.0)
    names = fleet.wait_pvs(60)
    creates = [r for r in audit.since(start) if r.verb == "create"
               and r.resource == "persistentvolumes" and r.code == 201 and r.name in names]
    cpu = agents_cpu(fleet)
    first: dict[str, float] = {}
    for r in creates:
        first.setdefault(names[r.name], r.received - start)
    firsts = sorted(first.values())
    return {"pvs": len(names), "all_pvs_s": round(max(r.received for r in creates) - start, 1),
            "first_pv_p50_s": round(statistics.median(firsts), 1),
            "first_pv_max_s": round(firsts[-1], 1), "agents_with_a_pv": len(first),
            "agent_cpu_s_mean": round(statistics.mean(cpu), 2), "load_avg_1m": os.getloadavg()[0]}


def agents_cpu(fleet: Fleet) -> list[float]:
    """CPU seconds (user and system) each agent process has used so far."""
    found = []
    for agent in fleet.agents:
        assert agent.proc is not None
        times = psutil.Process(agent.proc.pid).cpu_times()
        found.append(times.user + times.system)
    return found


def watching(audit: AuditLog, nodes: list[str], since: float) -> bool:
    """Every agent has a PV watch received after `since`."""
    seen = {r.node for r in audit.since(since) if r.verb == "watch"
            and r.resource == "persistentvolumes"}
    return seen >= set(nodes)


def steady(cluster: ControlPlane, fleet: Fleet | None, audit: AuditLog,
           seconds: float) -> dict[str, Any]:
    """apiserver_request_total over a window (and the agents' own view of it)."""
    own0 = fleet.request_counts() if fleet else {}
    cpu0 = agents_cpu(fleet) if fleet else []
    before, t0 = apiserver_requests(cluster.metrics_text()), time.time()
    time.sleep(seconds)
    after, t1 = apiserver_requests(cluster.metrics_text()), time.time()
    own1 = fleet.request_counts() if fleet else {}
    cpu1 = agents_cpu(fleet) if fleet else []
    minutes = (t1 - t0) / 60
    audited = Counter((r.verb.upper(), r.resource) for r in audit.since(t0, t1))
    return {"minutes": round(minutes, 2),
            "apiserver": {f"{v} {r}": (after[(v, r)] - before.get((v, r), 0.0)) / minutes
                          for v, r in after if after[(v, r)] > before.get((v, r), 0)},
            "audit": {f"{v} {r}": n / minutes for (v, r), n in audited.items()},
            "own": {m: (own1[m] - own0.get(m, 0)) / minutes for m in own1},
            "agent_cpu_percent_mean": round(100 * (sum(cpu1) - sum(cpu0)) / len(cpu1) / (t1 - t0),
                                            3) if cpu1 else None,
            "load_avg_1m": os.getloadavg()[0]}


def storm(cluster: ControlPlane, fleet: Fleet, audit: AuditLog, timeout: float,
          mode: str) -> dict[str, Any]:
    """Restart the apiserver; every agent's LIST and WATCH of PVs after it, by second from the
    first LIST. Requests refused while it is down never reach it (nor its log): the agents'
    retries then cost it nothing."""
    audit.poll()
    stopped = time.time()
    down = cluster.restart_apiserver(grace=GRACE)
    wait_for(lambda: watching(audit, fleet.nodes, stopped), timeout,
             "every agent watching again", interval=1.0)
    time.sleep(5)  # a request received just before the last watch is in the log by now
    after = [r for r in audit.since(stopped) if r.resource == "persistentvolumes"]
    lists = [r for r in after if r.verb == "list" and r.node]
    ok: dict[str, float] = {}
    for r in lists:
        if r.code == 200:
            ok.setdefault(r.node, r.received)
    watches = [r.received for r in after if r.verb == "watch"]
    first = min((r.received for r in lists), default=stopped)
    relists = sorted(ok.values())
    return {
        "mode": mode, "ready_after_s": round(down, 1), "load_avg_1m": os.getloadavg()[0],
        "first_list_after_s": round(first - stopped, 1),
        "lists": len(lists), "list_codes": dict(Counter(r.code for r in lists)),
        "agents_relisted": len(ok), "watches": len(watches),
        "relist_spread_s": round(relists[-1] - relists[0], 2) if relists else 0.0,
        "lists_per_s": per_bin([r.received for r in lists], first, 1.0),
        "relists_per_s": per_bin(relists, first, 1.0),
        "watches_per_s": per_bin(watches, first, 1.0),
        "peak_lists_per_s": max(per_bin([r.received for r in lists], first, 1.0), default=0),
        "peak_relists_per_s": max(per_bin(relists, first, 1.0), default=0),
        "peak_relists_per_100ms": max(per_bin(relists, first, 0.1), default=0),
        "peak_watches_per_s": max(per_bin(watches, first, 1.0), default=0),
        "other_requests": dict(Counter(f"{r.verb} {r.code}" for r in after
                                       if r.verb not in ("list", "watch"))),
    }



def report(args: argparse.Namespace, up: dict[str, Any], load: dict[str, Any],
           idle: dict[str, Any], storms: list[dict[str, Any]]) -> None:
    n = args.agents
    table(("agents", "disks each", "PVs", "all PVs s", "first PV p50 s", "first PV max s",
           "CPU s per agent by then", "load avg"),
          [(n, args.disks, up["pvs"], up["all_pvs_s"], up["first_pv_p50_s"],
            up["first_pv_max_s"], up["agent_cpu_s_mean"], f"{up['load_avg_1m']:.0f}")])
    keys = sorted(set(load["apiserver"]) | set(load["audit"]) | set(idle["apiserver"]))
    rows = []
    for key in keys:
        with_agents = load["apiserver"].get(key, 0.0)
        without = idle["apiserver"].get(key, 0.0)
        audited = load["audit"].get(key, 0.0)
        if key.split()[-1].split("/")[0] not in AGENT_RESOURCES and not audited:
            continue  # nothing the agents touch: leases, pods, configmaps...
        rows.append((key, f"{with_agents:.1f}", f"{without:.1f}",
                     f"{(with_agents - without) / n:.3f}", f"{audited / n:.3f}"))
    table(("verb resource", "all clients /min, agents on", "all clients /min, agents off",
           "difference /agent/min", "agents' own (audit) /agent/min"), rows)
    table(("agent counter (method)", "/agent/min"),
          [(m, f"{v / n:.3f}") for m, v in sorted(load["own"].items())])
    print(f"steady: {load['minutes']} min with the agents (each {load['agent_cpu_percent_mean']}% "
          f"of a core, load avg {load['load_avg_1m']:.1f}), {idle['minutes']} min without\n")
    table(("jitter", "ready s", "first LIST s", "LISTs (by code)", "agents relisted",
           "relist spread s", "peak LIST/s", "peak relist/s", "peak relist/100ms",
           "peak WATCH/s"),
          [(s["mode"], s["ready_after_s"], s["first_list_after_s"],
            f"{s['lists']} ({', '.join(f'{c}: {n}' for c, n in sorted(s['list_codes'].items()))})",
            s["agents_relisted"], s["relist_spread_s"], s["peak_lists_per_s"],
            s["peak_relists_per_s"], s["peak_relists_per_100ms"], s["peak_watches_per_s"])
           for s in storms])
    for s in storms:
        for key in ("lists_per_s", "relists_per_s", "watches_per_s"):
            print(f"{s['mode']}: {key} from the first LIST: {s[key]}")


def run(args: argparse.Namespace, done: dict[str, Any]) -> None:
    """The three parts, on one control plane, each recorded in `done` when it is measured;
    everything it started is undone."""
    work = Path(tempfile.mkdtemp(prefix="localpv-fleet."))
    audit = AuditLog(work / "audit")
    cluster = ControlPlane(work / "cluster", build_binaries(),
                           apiserver_args=audit.apiserver_args())
    disks = Disks(work)
    fleet: Fleet | None = None
    storms: list[dict[str, Any]] = done["storms"]
    try:
        log(f"control plane with {args.agents} nodes")
        cluster.start(nodes=args.agents, timeout=120 + 2 * args.agents)
        kubeconfig = install_agent(cluster, work / "agent.kubeconfig")
        nodes = [f"node-{i}" for i in range(1, args.agents + 1)]
        fleet = Fleet(cluster, work, kubeconfig, disks, nodes, args.disks,
                      "--resync-period", RESYNC)
        fleet.prepare(add_nodes=False)
        log(f"starting {args.agents} agents")
        up = done["startup"] = startup(fleet, audit, args.timeout)
        log(f"startup: {up}")
        fleet.wait_ready(args.timeout)
        wait_for(lambda: watching(audit, nodes, fleet.started_at), args.timeout,
                 "every agent watching")
        time.sleep(args.settle)
        log(f"steady window of {args.window:.0f}s, agents on")
        done["steady_agents_on"] = steady(cluster, fleet, audit, args.window)
        log("apiserver restart, agents with their jitter")
        storms.append(storm(cluster, fleet, audit, args.timeout, "as is"))
        fleet.stop()
        time.sleep(args.settle)
        log(f"steady window of {args.baseline_window:.0f}s, agents off")
        done["steady_agents_off"] = steady(cluster, None, audit, args.baseline_window)
        log("agents without jitter")
        fleet.start(prelude=NO_JITTER)
        fleet.wait_ready(args.timeout)
        wait_for(lambda: watching(audit, nodes, fleet.started_at), args.timeout,
                 "every agent watching")
        time.sleep(args.settle / 3)
        log("apiserver restart, agents without jitter")
        storms.append(storm(cluster, fleet, audit, args.timeout, "none (baseline)"))
    finally:
        if fleet is not None:
            fleet.stop()
        cluster.stop()
        disks.cleanup()


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up mounts when killed
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--disks", type=int, default=10, help="tmpfs mounts per agent")
    parser.add_argument("--window", type=float, default=300,
                        help="steady window, agents on (s); 300 s, the agent's watch timeout: "
                        "every watch ends once in it")
    parser.add_argument("--baseline-window", type=float, default=120,
                        help="steady window with the agents stopped (s)")
    parser.add_argument("--settle", type=float, default=20,
                        help="seconds to let startup work (Events, first passes) finish")
    parser.add_argument("--timeout", type=float, default=600, help="for startup and storms (s)")
    parser.add_argument("--json", default="benchmarks/results/fleet.json")
    parser.add_argument("--report", metavar="JSON",
                        help="print the tables of an earlier run's JSON; measure nothing")
    args = parser.parse_args()
    if args.report:
        done = json.loads(Path(args.report).read_text())
        args.agents, args.disks = done["agents"], done["disks"]
        for part in ("steady_agents_on", "steady_agents_off"):  # runs before verbs were upper
            done[part]["audit"] = {k.split()[0].upper() + " " + k.split()[1]: v
                                   for k, v in done[part]["audit"].items()}
        report(args, done["startup"], done["steady_agents_on"], done["steady_agents_off"],
               done["storms"])
        return 0
    done: dict[str, Any] = {"agents": args.agents, "disks": args.disks,
                            "resync_period_s": float(RESYNC), "storms": []}
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        run(args, done)
    finally:  # what was measured is kept, also when a later part failed
        out.write_text(json.dumps(done, indent=2))
        print(f"wrote {out}", file=sys.stderr)
    report(args, done["startup"], done["steady_agents_on"], done["steady_agents_off"],
           done["storms"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
