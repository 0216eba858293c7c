#!/usr/bin/env python3
"""How fast a new disk becomes a PV: events mode against the upstream-style 10 s polling.

Part 1, per mode, N trials: attach a loop device, make ext4, mount it under the discovery dir,
and time from the mount call's return to the PV's ADDED event on a watch. Both modes run in the
same invocation against the same control plane; the table gives p50/p95/p99/max and the ratio.
Part 2, events mode: 1, 10, 100 and 1,000 tmpfs volumes mounted at once; time until every PV
exists, and the API requests the agent made for it (from its own metrics).

Needs root and the control plane binaries. Prints a table, writes JSON; never passes or fails.

    .venv/bin/python benchmarks/discovery_latency.py [--trials 50] [--bulk 1,10,100,1000]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from kubernetes import client, config, watch

from agent.volumes import pv_name
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

CLASS = "local-storage"
POLL_PERIOD = 10.0  # the upstream provisioner's default
REQUESTS = re.compile(
    r'^localpv_agent_api_requests_total\{result="(\w+)",verb="(\w+)"\} ([0-9.e+]+)$', re.M)
LIBC = ctypes.CDLL("libc.so.6", use_errno=True)


class PVWatch:
    """Records when each PV's ADDED event arrives on a watch (the client's view)."""

    def __init__(self, kubeconfig: Path) -> None:
        api = config.new_client_from_config(config_file=str(kubeconfig))
        self.core = client.CoreV1Api(api)
        self.added: dict[str, float] = {}
        self.cond = threading.Condition()
        self._stop = False
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        try:
            self._watch()
        except Exception:  # the control plane stopping at the end ends the watch
            return

    def _watch(self) -> None:
        version = self.core.list_persistent_volume().metadata.resource_version
        while not self._stop:
            w = watch.Watch()
            for event in w.stream(self.core.list_persistent_volume, resource_version=version,
                                  timeout_seconds=60, deserialize=False):
                now = time.monotonic()
                obj = event["object"]
                version = obj["metadata"]["resourceVersion"]
                if event["type"] == "ADDED":
                    with self.cond:
                        self.added[obj["metadata"]["name"]] = now
                        self.cond.notify_all()

    def wait_added(self, name: str, timeout: float) -> float:
        with self.cond:
            self.cond.wait_for(lambda: name in self.added, timeout)
            return self.added[name]


def mount_tmpfs(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    if LIBC.mount(b"tmpfs", os.fsencode(target), b"tmpfs", 0, b"size=1m") != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}")


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]

    return {"p50": pick(0.5), "p95": pick(0.95), "p99": pick(0.99), "max": ordered[-1],
            "mean": statistics.fmean(ordered)}


def api_requests(agent: Agent) -> dict[str, float]:
    _, text = agent.get("/metrics")
    return {f"{m[2]}": float(m[3]) for m in REQUESTS.finditer(text) if m[1] == "ok"}


def new_node(cluster: ControlPlane, work: Path, node: str) -> tuple[Path, Path]:
    """A fake Node with its own discovery dir and config."""
    cluster.add_node(node)
    disc = work / node / "disks"
    disc.mkdir(parents=True)
    return disc, class_config(work / node / "config.yaml", disc, CLASS)


def latency_trials(mode: str, trials: int, cluster: ControlPlane, pvw: PVWatch,
                   kubeconfig: Path, work: Path) -> list[float]:
    node = f"lat-{mode}"
    disc, cfg = new_node(cluster, work, node)
    extra = ("--discovery-mode", "poll", "--discovery-period", str(POLL_PERIOD)) \
        if mode == "poll" else ()
    agent = Agent(node, cfg, kubeconfig, work, *extra).start()
    disks = Disks(work / node)
    results = []
    try:
        agent.wait_ready()
        for i in range(trials):
            device = disks.loop(f"t{i}", size_mib=16, fs="ext4")
            target = disc / f"disk-{i}"
            target.mkdir()
            # Disks appear at random moments, not in step with a poll timer.
            time.sleep(random.uniform(0, POLL_PERIOD if mode == "poll" else 0.5))
            disks.mount(device, target)  # recorded, so that cleanup() unmounts it
            mounted = time.monotonic()
            seen = pvw.wait_added(pv_name(f"disk-{i}", node, CLASS), timeout=60)
            results.append(seen - mounted)
            # Disks stay mounted: removing one would make a pass of its own (a withdrawal)
            # and the trials would no longer be independent.
            print(f"  {mode} trial {i + 1}/{trials}: {seen - mounted:.3f}s", file=sys.stderr)
    finally:
        agent.stop()
        disks.cleanup()  # unmounts and detaches every trial's disk
    return results


def bulk(count: int, cluster: ControlPlane, pvw: PVWatch, kubeconfig: Path,
         work: Path) -> dict[str, float]:
    node = f"bulk-{count}"
    disc, cfg = new_node(cluster, work, node)
    agent = Agent(node, cfg, kubeconfig, work).start()
    targets = [disc / f"v{i:04d}" for i in range(count)]
    try:
        agent.wait_ready()
        before = api_requests(agent)
        started = time.monotonic()
        for target in targets:
            mount_tmpfs(target)
        mounted = time.monotonic() - started
        names = [pv_name(t.name, node, CLASS) for t in targets]
        last = max(pvw.wait_added(n, timeout=600) for n in names)
        wait_for(lambda: agent.get("/metrics")[0] == 200, 5, "metrics")
        time.sleep(0.5)  # let the counters include the final pass
        after = api_requests(agent)
    finally:
        agent.stop()
        for target in targets:
            LIBC.umount2(os.fsencode(target), 2)  # MNT_DETACH
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {"volumes": count, "mount_seconds": round(mounted, 3),
            "all_pvs_seconds": round(last - started, 3),
            "requests": {k: int(v) for k, v in sorted(delta.items()) if v}}


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up disks when killed
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--bulk", default="1,10,100,1000")
    parser.add_argument("--json", default="benchmarks/results/discovery_latency.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="localpv-latency."))
    cluster = ControlPlane(work / "cluster", build_binaries())
    report: dict[str, object] = {"trials": args.trials}
    try:
        cluster.start(nodes=0)
        kubeconfig = install_agent(cluster, work / "agent.kubeconfig")
        pvw = PVWatch(cluster.kubeconfig)
        latency = {mode: latency_trials(mode, args.trials, cluster, pvw, kubeconfig, work)
                   for mode in ("events", "poll")}
        stats = {mode: percentiles(v) for mode, v in latency.items()}
        report["latency"] = {m: {"stats": stats[m], "samples": latency[m]} for m in latency}
        report["bulk"] = [bulk(int(n), cluster, pvw, kubeconfig, work)
                          for n in args.bulk.split(",")]
        report["pvs_left"] = len(items(cluster, "/api/v1/persistentvolumes"))
    finally:
        cluster.stop()

    print(f"mount -> PV seen on a watch, {args.trials} trials per mode")
    print("mode | p50 s | p95 s | p99 s | max s")
    print("--- | --- | --- | --- | ---")
    for mode in ("events", "poll"):
        s = stats[mode]
        print(f"{mode} | {s['p50']:.3f} | {s['p95']:.3f} | {s['p99']:.3f} | {s['max']:.3f}")
    print("poll/events | " + " | ".join(
        f"{stats['poll'][k] / stats['events'][k]:.1f}x" for k in ("p50", "p95", "p99", "max")))
    print("\nvolumes mounted at once (events mode)")
    print("volumes | mounting s | until all PVs s | agent API requests")
    print("--- | --- | --- | ---")
    for row in report["bulk"]:  # type: ignore[attr-defined]
        print(f"{row['volumes']} | {row['mount_seconds']} | {row['all_pvs_seconds']} | "
              f"{row['requests']}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
