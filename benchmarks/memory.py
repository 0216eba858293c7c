#!/usr/bin/env python3
"""The agent's memory: what its imports cost, its steady RSS as the cluster holds 0, 1,000 and
10,000 PVs of other nodes, and its growth over mount/unmount cycles.

Three ways of starting the same agent, in the same run, against one control plane:

- `previous`: the full `kubernetes` package and its generated CoreV1Api, StorageV1Api and
  BatchV1Api imported first, as the agent did before it loaded only the REST layer (the
  baseline; agent.kube leaves an already imported package as it is);
- `kubeconfig`: the agent as the tests run it, out of the cluster (the kubeconfig loader brings
  oauthlib and the pydantic ApiClient);
- `in-cluster`: the agent as the DaemonSet runs it, with the in-cluster loader (the service
  account token and CA written to files, KUBERNETES_SERVICE_HOST/PORT set).

Prints tables and writes JSON. Needs root (tmpfs mounts) and the control plane binaries
(scripts/build-binaries). Never passes or fails on the numbers.

    .venv/bin/python benchmarks/memory.py [--sizes 0,1000,10000] [--cycles 200]

`--tracemalloc DIR` (debugging growth, not for figures: tracing costs time and memory) starts
tracemalloc in the cycling agent and has it dump a snapshot to DIR after the warm-up and at
the end; the largest differences between the two are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml
from cluster_scale import NODE, VOLUMES, fill  # the sibling benchmark, run as a script too

from devkit.agents import (
    Agent,
    build_binaries,
    class_config,
    install_agent,
    items,
    wait_for,
)
from devkit.controlplane import ControlPlane
from devkit.disks import Disks, sh
from devkit.report import table

REPO = Path(__file__).resolve().parent.parent

MODES = ("previous", "kubeconfig", "in-cluster")
STEADY_SECONDS = 20.0
RESYNC_SECONDS = 2.0
CYCLE_POLL = 0.02  # seconds between looks at the PVs in a cycle: 10,000 cycles in minutes
PREVIOUS = ("import kubernetes\nfrom kubernetes import client\n"
            "client.CoreV1Api, client.StorageV1Api, client.BatchV1Api\n")
RUN_MODULES = ("agent.cli", "agent.loop", "agent.metrics", "agent.sources", "agent.udev",
               "agent.cleaner", "agent.settings")
MIB = 2**20
IMAGE_ARENAS = "2"  # the Dockerfile's MALLOC_ARENA_MAX; set it in the environment to compare


def prelude(mode: str, secrets: Path | None = None) -> str:
    """Python run before the agent's own modules, for a mode."""
    if mode == "previous":
        return PREVIOUS
    if mode == "in-cluster":
        return ("import importlib, agent.kube\n"
                "ic = importlib.import_module('kubernetes.config.incluster_config')\n"
                f"ic.SERVICE_TOKEN_FILENAME = {str(secrets / 'token')!r}\n"
                f"ic.SERVICE_CERT_FILENAME = {str(secrets / 'ca.crt')!r}\n")
    return ""


# For --tracemalloc: a thread in the agent's process that dumps a snapshot to DIR/<label>.snap
# when DIR/take (holding the label) appears, then removes DIR/take.
TRACE = """import os, threading, time, tracemalloc
tracemalloc.start(12)
def _snapshots(where={where!r}):
    take = os.path.join(where, 'take')
    while True:
        time.sleep(0.2)
        if os.path.exists(take):
            label = open(take).read().strip()
            tracemalloc.take_snapshot().dump(os.path.join(where, label + '.snap'))
            os.remove(take)
threading.Thread(target=_snapshots, name='tracemalloc', daemon=True).start()
"""


def snapshot(where: Path, label: str) -> None:
    """Have the traced agent dump a snapshot (see TRACE), and wait for it."""
    (where / "take").write_text(label)
    wait_for(lambda: not (where / "take").exists(), 120, f"the {label} snapshot")


def trace_report(where: Path, first: str, last: str, top: int = 25) -> None:
    """The largest growths between two snapshots, by traceback (the agent's frames first)."""
    import tracemalloc  # noqa: PLC0415

    old = tracemalloc.Snapshot.load(str(where / f"{first}.snap"))
    new = tracemalloc.Snapshot.load(str(where / f"{last}.snap"))
    total = sum(s.size for s in new.statistics("filename")) - sum(
        s.size for s in old.statistics("filename"))
    print(f"traced Python memory {first} -> {last}: {total / 1024:+.1f} KiB", file=sys.stderr)
    for stat in new.compare_to(old, "traceback")[:top]:
        print(f"{stat.size_diff / 1024:+9.1f} KiB {stat.count_diff:+7d} blocks", file=sys.stderr)
        for line in stat.traceback.format(limit=6, most_recent_first=True):
            print("      " + line.strip(), file=sys.stderr)


def imports_only(mode: str, secrets: Path) -> dict[str, Any]:
    """RSS of a fresh interpreter after the run-time imports of a mode (no cluster)."""
    loader = {"previous": "", "in-cluster": "importlib.import_module("
              "'kubernetes.config.incluster_config')\n",
              "kubeconfig": "importlib.import_module('kubernetes.config.kube_config')\n"}[mode]
    code = (prelude(mode, secrets) + "import importlib, json, sys\n"
            + "".join(f"import {m}\n" for m in RUN_MODULES) + loader
            + "status = dict(l.split(':', 1) for l in open('/proc/self/status'))\n"
            "print(json.dumps({'rss_kib': int(status['VmRSS'].split()[0]),\n"
            "                  'modules': len(sys.modules)}))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, text=True,
                         capture_output=True).stdout
    found = json.loads(out.strip().splitlines()[-1])
    return {"mode": mode, "rss_mib": round(found["rss_kib"] / 1024, 1),
            "modules": found["modules"]}


class ModeAgent(Agent):
    """The agent started in one of MODES (see the module docstring)."""

    def __init__(self, mode: str, secrets: Path, server: str, *args: Any,
                 trace: Path | None = None) -> None:
        super().__init__(*args)
        self.mode = mode
        self.secrets = secrets
        self.server = server
        self.trace = trace  # --tracemalloc's DIR

    def prelude_code(self) -> str:
        trace = TRACE.format(where=str(self.trace)) if self.trace else ""
        return trace + prelude(self.mode, self.secrets)

    def start(self) -> ModeAgent:
        self.port_file.unlink(missing_ok=True)
        code = self.prelude_code() + (
            "import sys\nfrom agent.cli import main\nsys.exit(main(sys.argv[1:]))\n")
        env = {k: v for k, v in os.environ.items() if k != "MY_NODE_NAME"}
        env.setdefault("MALLOC_ARENA_MAX", IMAGE_ARENAS)  # as the image runs it
        flags = ["--kubeconfig", str(self.kubeconfig)]
        if self.mode == "in-cluster":
            host, _, port = self.server.removeprefix("https://").rpartition(":")
            env |= {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port}
            flags = []
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, "run", "--config", str(self.config),
                 "--node-name", self.node, *flags,
                 "--listen-address", "127.0.0.1:0", "--port-file", str(self.port_file),
                 "--state-dir", str(self.state_dir), *self.extra],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        return self


def node_pvs(cluster: ControlPlane) -> list[dict[str, Any]]:
    return items(cluster, "/api/v1/persistentvolumes?labelSelector="
                 f"kubernetes.io/hostname%3D{NODE}")


def clear_node(cluster: ControlPlane) -> None:
    for pv in node_pvs(cluster):
        cluster.api("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}")
    wait_for(lambda: not node_pvs(cluster), 60, "the node's PVs gone")


def rss(proc: psutil.Process) -> float:
    return proc.memory_info().rss / MIB


def steady(agent: ModeAgent, cluster: ControlPlane, volumes: int) -> tuple[psutil.Process, float]:
    """Start the agent, wait for the node's PVs, let it run; its RSS at the end."""
    agent.start()
    agent.wait_ready(timeout=300)
    wait_for(lambda: len(node_pvs(cluster)) == volumes, 120, "the node's PVs", on_timeout=agent.log)
    assert agent.proc is not None
    proc = psutil.Process(agent.proc.pid)
    time.sleep(STEADY_SECONDS)
    return proc, rss(proc)


def cycles(agent: ModeAgent, cluster: ControlPlane, proc: psutil.Process, mount_dir: Path,
           count: int) -> dict[str, Any]:
    """Mount a volume, wait for its PV; unmount it, delete the PV; `count` times. RSS after a
    tenth of them (the warm-up) and at the end (and snapshots then, with --tracemalloc)."""
    target = mount_dir / "vol-cycle"
    target.mkdir(parents=True, exist_ok=True)
    warm = max(1, count // 10)
    after_warmup = 0.0
    started = time.monotonic()
    for i in range(count):
        sh("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(target))
        pv = wait_for(lambda: [p for p in node_pvs(cluster) if p["spec"]["local"]["path"]
                               .endswith("/vol-cycle")], 60, "the cycle's PV",
                      on_timeout=agent.log, interval=CYCLE_POLL)[0]
        sh("umount", str(target))
        cluster.api("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}")
        wait_for(lambda: len(node_pvs(cluster)) == VOLUMES, 60, "the cycle's PV gone",
                 interval=CYCLE_POLL)
        if i + 1 == warm:
            after_warmup = rss(proc)
            if agent.trace:
                snapshot(agent.trace, "warm")
        if (i + 1) % 500 == 0:  # progress, and the curve if the run is cut short
            print(f"cycle {i + 1}: RSS {rss(proc):.2f} MiB, {proc.num_threads()} threads, "
                  f"{time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    time.sleep(RESYNC_SECONDS * 2)
    end = rss(proc)
    if agent.trace:
        snapshot(agent.trace, "end")
        trace_report(agent.trace, "warm", "end")
    return {"mode": agent.mode, "cycles": count, "warmup_cycles": warm,
            "seconds": round(time.monotonic() - started, 1),
            "rss_after_warmup_mib": round(after_warmup, 1), "rss_end_mib": round(end, 1),
            "growth_mib": round(end - after_warmup, 2)}



def on_a_cluster(work: Path, secrets: Path, sizes: list[int], modes: list[str],
                 cycle_count: int, trace: Path | None = None
                 ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Steady RSS per size and mode, then the cycles, on one control plane."""
    disks = Disks(work)
    cluster = ControlPlane(work / "cluster", build_binaries())
    rows: list[dict[str, Any]] = []
    churn: dict[str, Any] = {}
    try:
        cluster.start(nodes=1)
        kubeconfig = install_agent(cluster, work / "agent.kubeconfig")
        token = yaml.safe_load(kubeconfig.read_text())["users"][0]["user"]["token"]
        (secrets / "token").write_text(token)
        (secrets / "ca.crt").write_bytes(Path(cluster.ca_file).read_bytes())
        mount_dir = work / "disks"
        for i in range(VOLUMES):
            disks.tmpfs(mount_dir / f"vol-{i}", size_mib=16)
        config = class_config(work / "config.yaml", mount_dir)
        existing = 0
        for size in sizes:
            fill(cluster, existing, size)
            existing = max(existing, size)
            for mode in modes:
                clear_node(cluster)
                agent = ModeAgent(mode, secrets, cluster.server, NODE, config, kubeconfig, work,
                                  "--resync-period", str(RESYNC_SECONDS))
                try:
                    _, steady_mib = steady(agent, cluster, VOLUMES)
                finally:
                    agent.stop()
                rows.append({"other_pvs": size, "mode": mode,
                             "rss_steady_mib": round(steady_mib, 1)})
                print(f"{size} other PVs, {mode}: {steady_mib:.1f} MiB", file=sys.stderr)
        if cycle_count:
            clear_node(cluster)
            mode = "in-cluster" if "in-cluster" in modes else modes[-1]
            agent = ModeAgent(mode, secrets, cluster.server, NODE, config, kubeconfig, work,
                              "--resync-period", str(RESYNC_SECONDS), trace=trace)
            try:
                proc, _ = steady(agent, cluster, VOLUMES)
                churn = cycles(agent, cluster, proc, mount_dir, cycle_count)
            finally:
                agent.stop()
                subprocess.run(["umount", "-l", str(mount_dir / "vol-cycle")], check=False,
                               capture_output=True)
    finally:
        cluster.stop()
        disks.cleanup()
    return rows, churn


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up disks when killed
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,1000,10000", help="other nodes' PVs")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--cycles", type=int, default=200,
                        help="mount/unmount cycles (in-cluster mode); 0 for none")
    parser.add_argument("--json", default="benchmarks/results/memory.json")
    parser.add_argument("--tracemalloc", metavar="DIR", type=Path,
                        help="debugging: trace the cycling agent's allocations, snapshots to DIR")
    args = parser.parse_args()
    if args.tracemalloc:
        args.tracemalloc.mkdir(parents=True, exist_ok=True)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    modes = args.modes.split(",")
    work = Path(tempfile.mkdtemp(prefix="localpv-bench."))
    secrets = work / "secrets"
    secrets.mkdir()
    imports = [imports_only(mode, secrets) for mode in modes]
    rows, churn = on_a_cluster(work, secrets, sizes, modes, args.cycles, args.tracemalloc)

    table(("imports of", "RSS MiB", "modules"),
          [(i["mode"], i["rss_mib"], i["modules"]) for i in imports])
    by = {(r["other_pvs"], r["mode"]): r["rss_steady_mib"] for r in rows}
    table(("other PVs", *(f"{m} MiB" for m in modes)),
          [(size, *(by.get((size, m), "") for m in modes)) for size in sizes])
    if churn:
        table(("mode", "cycles", "RSS after warm-up MiB", "RSS end MiB", "growth MiB"),
              [(churn["mode"], churn["cycles"], churn["rss_after_warmup_mib"],
                churn["rss_end_mib"], churn["growth_mib"])])
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"volumes": VOLUMES, "steady_seconds": STEADY_SECONDS,
                               "resync_seconds": RESYNC_SECONDS, "imports": imports,
                               "steady": rows, "cycles": churn}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
