#!/usr/bin/env python3
"""How fast a new disk becomes a PV, and what an idle agent costs while the host mounts things.

Part 1 (latency), per mode, N trials: attach a loop device, make ext4, mount it under the
discovery dir, and time from the mount call's return to the PV's ADDED event on a watch. Modes:
`events` (the leading-edge wake-up), `debounce` (the former design: a pass 0.2 s after the first
wake-up of a burst, every mount-table change a wake-up) and `poll` (the upstream's 10 s timer).
All run in the same invocation against the same control plane; the table gives p50/p95/p99/max
and the ratios to `events`.
Part 2 (bulk), events mode: 1, 10, 100 and 1,000 tmpfs volumes mounted at once; time until
every PV exists, and the API requests the agent made for it (from its own metrics).
Part 3 (idle): an agent with one volume, its CPU seconds (user + system, /proc/PID/stat) and
bytes read (/proc/PID/io rchar) per minute, its passes and mount wake-ups, while nothing
happens and while the benchmark mounts and unmounts `--churn` tmpfs a second outside the
discovery dir; with the mount-table filter, without it, and the former design.

Runs in a mount namespace of its own (`--shared-mounts`: the machine's), so that what else
mounts on the machine is not measured. Needs root and the control plane binaries. Prints tables,
writes JSON; never passes or fails.

    .venv/bin/python benchmarks/discovery_latency.py [--trials 100] [--modes events,debounce]
        [--parts latency,bulk,idle] [--bulk 1,10,100,1000] [--idle-seconds 60] [--churn 10]
"""

from __future__ import annotations

import argparse
import contextlib
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
# The agent's flags per mode; `debounce` is the design before the leading-edge wake-up.
MODES: dict[str, tuple[str, ...]] = {
    "events": (),
    "debounce": ("--debounce", "0.2", "--no-wake-filter"),
    "poll": ("--discovery-mode", "poll", "--discovery-period", str(POLL_PERIOD)),
}
IDLE_CASES: list[tuple[str, tuple[str, ...], bool]] = [  # label, agent flags, churn
    ("events, quiet host", (), False),
    ("events, churn", (), True),
    ("events, the filter reading the table on every change (before), churn",
     ("--mount-read-rate", "0"), True),
    ("events without the wake-up filter, churn", ("--no-wake-filter",), True),
    ("former design (debounce 0.2 s, no filter), churn", MODES["debounce"], True),
]
REQUESTS = re.compile(
    r'^localpv_agent_api_requests_total\{result="(\w+)",verb="(\w+)"\} ([0-9.e+]+)$', re.M)
PASSES = re.compile(r"^localpv_agent_discovery_pass_duration_seconds_count ([0-9.e+]+)$", re.M)
WAKEUPS = re.compile(r'^localpv_agent_wakeups_total\{source="([\w-]+)"\} ([0-9.e+]+)$', re.M)
LIBC = ctypes.CDLL("libc.so.6", use_errno=True)
CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x00020000, 0x4000, 1 << 18


def private_mounts() -> None:
    """This process's own mount namespace, which the control plane and the agents inherit:
    the mounts of whatever else runs on the machine (other tests, other benchmarks) do not
    reach the agents measured, and the ones made here do not leave. Called while the process
    has one thread."""
    if LIBC.unshare(CLONE_NEWNS) != 0 or \
            LIBC.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "a private mount namespace")


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
    agent = Agent(node, cfg, kubeconfig, work, *MODES[mode]).start()
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


def cpu_and_reads(pid: int) -> tuple[float, int]:
    """CPU seconds (user + system, all threads) and bytes read so far by a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return (int(fields[11]) + int(fields[12])) / ticks, int(io["rchar"])


def counters(agent: Agent) -> tuple[float, dict[str, float]]:
    """Passes so far, and wake-ups by source, from the agent's metrics."""
    _, text = agent.get("/metrics")
    passes = PASSES.search(text)
    return (float(passes[1]) if passes else 0.0,
            {m[1]: float(m[2]) for m in WAKEUPS.finditer(text)})


class Churn:
    """Mounts and unmounts tmpfs `rate` times a second in `where` (a kubelet's pod volumes)."""

    def __init__(self, where: Path, rate: float) -> None:
        self.where, self.rate = where, rate
        self.done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Churn:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            target = self.where / f"pod-{self.done % 8}"
            mount_tmpfs(target)
            LIBC.umount2(os.fsencode(target), 0)
            self.done += 1
            next_at += 1.0 / self.rate
            self._stop.wait(max(0.0, next_at - time.monotonic()))


def idle_case(label: str, extra: tuple[str, ...], churn: bool, seconds: float, rate: float,
              index: int, cluster: ControlPlane, pvw: PVWatch, kubeconfig: Path,
              work: Path) -> dict[str, object]:
    node = f"idle-{index}"
    disc, cfg = new_node(cluster, work, node)
    mount_tmpfs(disc / "vol")
    agent = Agent(node, cfg, kubeconfig, work, *extra).start()
    try:
        agent.wait_ready()
        pvw.wait_added(pv_name("vol", node, CLASS), timeout=60)
        time.sleep(5)  # let the startup's follow-up passes and the watch settle
        assert agent.proc is not None
        passes0, wakes0 = counters(agent)
        cpu0, read0 = cpu_and_reads(agent.proc.pid)
        started = time.monotonic()
        with Churn(work / f"churn-{index}", rate) if churn else contextlib.nullcontext() as c:
            time.sleep(seconds)
        elapsed = time.monotonic() - started
        cpu1, read1 = cpu_and_reads(agent.proc.pid)
        passes1, wakes1 = counters(agent)
    finally:
        agent.stop()
        LIBC.umount2(os.fsencode(disc / "vol"), 2)
    per_min = 60.0 / elapsed
    return {"case": label, "flags": list(extra), "seconds": round(elapsed, 1),
            "churn_mounts": c.done if churn else 0,  # type: ignore[union-attr]
            "cpu_s_per_min": round((cpu1 - cpu0) * per_min, 3),
            "read_mb_per_min": round((read1 - read0) * per_min / 1e6, 3),
            "passes": int(passes1 - passes0),
            "mount_wakeups": int(wakes1.get("mount", 0) - wakes0.get("mount", 0))}


def print_tables(report: dict[str, object], stats: dict[str, dict[str, float]],
                 args: argparse.Namespace) -> None:
    if stats:
        print(f"mount -> PV seen on a watch ({args.trials} trials; poll: {args.poll_trials})")
        print("mode | trials | p50 s | p95 s | p99 s | max s")
        print("--- | --- | --- | --- | --- | ---")
        for mode, s in stats.items():
            n = args.poll_trials if mode == "poll" else args.trials
            print(f"{mode} | {n} | {s['p50']:.3f} | {s['p95']:.3f} | {s['p99']:.3f} | "
                  f"{s['max']:.3f}")
        for mode in stats:
            if mode != "events" and "events" in stats:
                print(f"{mode}/events | | " + " | ".join(
                    f"{stats[mode][k] / stats['events'][k]:.1f}x"
                    for k in ("p50", "p95", "p99", "max")))
    if "bulk" in report:
        print("\nvolumes mounted at once (events mode)")
        print("volumes | mounting s | until all PVs s | agent API requests")
        print("--- | --- | --- | ---")
        for row in report["bulk"]:  # type: ignore[attr-defined]
            print(f"{row['volumes']} | {row['mount_seconds']} | {row['all_pvs_seconds']} | "
                  f"{row['requests']}")
    if "idle" in report:
        print(f"\nidle agent, {args.idle_seconds:g} s per case; churn: {args.churn:g} tmpfs "
              "mounts+unmounts a second outside the discovery dir")
        print("case | churn mounts | CPU s/min | read MB/min | passes | mount wake-ups")
        print("--- | --- | --- | --- | --- | ---")
        for row in report["idle"]:  # type: ignore[attr-defined]
            print(f"{row['case']} | {row['churn_mounts']} | {row['cpu_s_per_min']} | "
                  f"{row['read_mb_per_min']} | {row['passes']} | {row['mount_wakeups']}")


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up disks when killed
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--poll-trials", type=int, default=20,
                        help="trials of poll mode (each waits up to 10 s)")
    parser.add_argument("--modes", default="events,debounce,poll")
    parser.add_argument("--parts", default="latency,bulk,idle")
    parser.add_argument("--bulk", default="1,10,100,1000")
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--churn", type=float, default=10.0,
                        help="unrelated tmpfs mounts (each unmounted again) a second")
    parser.add_argument("--shared-mounts", action="store_true",
                        help="run in the machine's mount namespace, seeing its other mounts")
    parser.add_argument("--json", default="benchmarks/results/discovery_latency.json")
    args = parser.parse_args()
    parts, modes = args.parts.split(","), args.modes.split(",")
    if not args.shared_mounts:
        private_mounts()
    work = Path(tempfile.mkdtemp(prefix="localpv-latency."))
    cluster = ControlPlane(work / "cluster", build_binaries())
    report: dict[str, object] = {"command": " ".join(sys.argv), "trials": args.trials,
                                 "poll_trials": args.poll_trials}
    stats: dict[str, dict[str, float]] = {}
    try:
        cluster.start(nodes=0)
        kubeconfig = install_agent(cluster, work / "agent.kubeconfig")
        pvw = PVWatch(cluster.kubeconfig)
        if "latency" in parts:
            latency = {mode: latency_trials(
                mode, args.poll_trials if mode == "poll" else args.trials, cluster, pvw,
                kubeconfig, work) for mode in modes}
            stats = {mode: percentiles(v) for mode, v in latency.items()}
            report["latency"] = {m: {"flags": list(MODES[m]), "stats": stats[m],
                                     "samples": latency[m]} for m in latency}
        if "bulk" in parts:
            report["bulk"] = [bulk(int(n), cluster, pvw, kubeconfig, work)
                              for n in args.bulk.split(",")]
        if "idle" in parts:
            report["idle"] = [idle_case(label, extra, churn, args.idle_seconds, args.churn, i,
                                        cluster, pvw, kubeconfig, work)
                              for i, (label, extra, churn) in enumerate(IDLE_CASES)]
        report["pvs_left"] = len(items(cluster, "/api/v1/persistentvolumes"))
    finally:
        cluster.stop()

    print_tables(report, stats, args)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
