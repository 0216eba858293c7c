#!/usr/bin/env python3
"""The agent as users run it, on a real node: image size, time from `kubectl apply -k` to the
DaemonSet Ready, and mount -> PV latency through mount propagation into the agent's pod.

Brings up `scripts/cluster up --real-node --nodes 0` (containerd + kubelet; the images built by
scripts/build-images), then:
  - image: the agent image's size as buildah reports it (uncompressed layers), its
    docker-archive's size, and that archive gzip-compressed (about what a registry stores);
  - apply -> Ready: deletes the DaemonSet, `kubectl apply -k` the overlay again, and times until
    every pod is updated, available and Ready (the agent's readiness probe needs its first sync
    with the API), `--rollouts` times; the first apply, by `scripts/cluster up`, is reported too;
  - mount -> PV: `--disks` ext4 loop devices, mounted one at a time by UUID under the node's
    discovery dir; each latency runs from the mount(8) call returning to the PV's ADDED event on
    a watch of the API.
Needs root. Prints a table, writes JSON; never passes or fails. Cleans up when killed.

    .venv/bin/python benchmarks/real_node.py [--disks 25] [--rollouts 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

from devkit import REPO
from devkit.disks import Disks, sh
from devkit.realnode import Images, _Layout

NS, DS = "localpv-agent", "localpv-agent"


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, round(q / 100 * len(ordered) + 0.4999))
    return ordered[min(rank, len(ordered)) - 1]


class PvWatch:
    """`kubectl get pv --watch`: when each local path's PV was first ADDED (monotonic time)."""

    def __init__(self, kubectl: list[str]) -> None:
        self.added: dict[str, float] = {}
        self.cond = threading.Condition()
        self.proc = subprocess.Popen(
            [*kubectl, "get", "pv", "--watch", "--output-watch-events", "-o",
             'jsonpath={.type}{" "}{.object.spec.local.path}{"\\n"}'],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.monotonic()
            kind, _, path = line.strip().partition(" ")
            if kind == "ADDED" and path:
                with self.cond:
                    self.added.setdefault(path, now)
                    self.cond.notify_all()

    def wait(self, path: str, timeout: float) -> float:
        with self.cond:
            if not self.cond.wait_for(lambda: path in self.added, timeout):
                raise TimeoutError(f"no PV for {path} within {timeout}s")
            return self.added[path]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def image_sizes(images: Images) -> dict[str, object]:
    archive = images.agent_archive
    compressed = 0
    with archive.open("rb") as src:  # gzip level 6, streamed
        z = zlib.compressobj(6, zlib.DEFLATED, 31)
        while chunk := src.read(1 << 20):
            compressed += len(z.compress(chunk))
        compressed += len(z.flush())
    cache = Path(os.environ.get("LOCALPV_CACHE", "/var/cache/localpv-agent"))
    size = subprocess.run(
        ["buildah", "--root", str(cache / "containers" / "storage"), "--runroot",
         str(cache / "containers" / "run"), "images", "--format", "{{.Size}}", images.agent],
        capture_output=True, text=True, check=False,
        env={**os.environ, "CONTAINERS_CONF": str(cache / "containers" / "containers.conf")},
    ).stdout.strip()
    return {"image": images.agent, "buildah size": size,
            "archive MiB": round(archive.stat().st_size / 2**20, 1),
            "archive gzip MiB": round(compressed / 2**20, 1)}


def rollout_seconds(kubectl: list[str], overlay: Path, timeout: float = 300) -> float:
    subprocess.run([*kubectl, "delete", "daemonset", DS, "-n", NS, "--wait=true",
                    "--timeout=120s"], check=True, capture_output=True)
    started = time.monotonic()
    subprocess.run([*kubectl, "apply", "-k", str(overlay)], check=True, capture_output=True)
    deadline = started + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([*kubectl, "get", "daemonset", DS, "-n", NS, "-o", "json"],
                             capture_output=True, text=True, check=False).stdout
        if out:
            ds = json.loads(out)
            s = ds.get("status", {})
            want = s.get("desiredNumberScheduled", 0)
            if (want and s.get("observedGeneration") == ds["metadata"]["generation"]
                    and s.get("updatedNumberScheduled") == want
                    and s.get("numberReady") == want and s.get("numberAvailable") == want):
                return time.monotonic() - started
        time.sleep(0.1)
    raise TimeoutError("DaemonSet not Ready")


def mount_latencies(disks: Disks, discovery_dir: Path, watch: PvWatch, count: int) -> list[float]:
    """Mount ``count`` fresh ext4 disks one at a time; seconds from each mount to its PV."""
    devices = [disks.loop(f"d{i}", 64, fs="ext4") for i in range(count)]
    latencies = []
    for i, device in enumerate(devices):
        target = discovery_dir / sh("blkid", "-s", "UUID", "-o", "value", device)
        target.mkdir()
        disks.mount(device, target)
        mounted = time.monotonic()
        latencies.append(watch.wait(str(target), 120) - mounted)
        print(f"disk {i + 1}: {latencies[-1] * 1000:.0f} ms", file=sys.stderr)
    return latencies


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up when killed
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--disks", type=int, default=25)
    parser.add_argument("--rollouts", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/results/real_node.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="localpv-realnode."))
    cluster_dir = work / "cluster"
    disks = Disks(work)
    results: dict[str, object] = {}
    watch: PvWatch | None = None
    try:
        images = Images.build()
        results["image"] = image_sizes(images)
        print(f"image: {results['image']}", file=sys.stderr)
        started = time.monotonic()
        up = subprocess.run([str(REPO / "scripts" / "cluster"), "up", "--real-node", "--nodes",
                             "0", "--dir", str(cluster_dir)], capture_output=True, text=True,
                            check=False)
        if up.returncode != 0:
            print(up.stderr, file=sys.stderr)
            return 1
        results["cluster up seconds"] = round(time.monotonic() - started, 1)
        first = re.search(r"Ready ([0-9.]+)s after kubectl apply", up.stderr)
        kubeconfig = up.stdout.strip().splitlines()[-1]
        bin_dir = subprocess.run([str(REPO / "scripts" / "build-binaries")], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
        kubectl = [str(Path(bin_dir) / "kubectl"), f"--kubeconfig={kubeconfig}"]
        layout = _Layout(cluster_dir)
        rollouts = [rollout_seconds(kubectl, layout.overlay) for _ in range(args.rollouts)]
        results["apply -> DaemonSet Ready seconds"] = {
            "first (scripts/cluster up)": float(first.group(1)) if first else None,
            "again": [round(r, 2) for r in rollouts]}
        print(f"apply -> Ready: {results['apply -> DaemonSet Ready seconds']}", file=sys.stderr)

        watch = PvWatch(kubectl)
        latencies = mount_latencies(disks, layout.disks, watch, args.disks)
        results["mount -> PV ms"] = {
            "n": len(latencies),
            "p50": round(percentile(latencies, 50) * 1000),
            "p99": round(percentile(latencies, 99) * 1000),
            "max": round(max(latencies) * 1000),
            "mean": round(statistics.mean(latencies) * 1000),
        }
    finally:
        if watch is not None:
            watch.stop()
        disks.cleanup()
        subprocess.run([str(REPO / "scripts" / "cluster"), "down", "--dir", str(cluster_dir)],
                       capture_output=True, check=False)
        for leftover in sorted(work.glob("*.img")):
            leftover.unlink()
        for d in (cluster_dir, work):
            if d.exists() and not any(d.iterdir()):
                d.rmdir()

    print("figure | value")
    print("--- | ---")
    for key, value in results.items():
        print(f"{key} | {value}")
    out = REPO / args.json
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
