#!/usr/bin/env python3
"""Where a pass spends its time: cProfile over passes on 1, 10 and 1,000 tmpfs volumes.

The real loop and host reader on real mounts, made in a private mount namespace (nothing leaks
to the host, other mounts on the host do not reach it), against the in-memory API
(devkit/fake_kube.py): the API's own latency is not the subject. Profiled: the first pass
(every PV created) and steady passes (nothing to do: what each wake-up costs).

Needs root. Prints a table and the top functions by own CPU time (all threads); writes JSON.

    .venv/bin/python benchmarks/profile_pass.py [--sizes 1,10,1000] [--passes 20] [--top 12]
        [--kind tmpfs|ext4]
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import json
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from agent.configfiles import load_config
from agent.host import HostReader
from agent.loop import Reconciler
from agent.settings import RunSettings
from devkit.disks import Disks
from devkit.fake_kube import FakeKube

LIBC = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, MS_REC, MS_PRIVATE = 0x00020000, 0x4000, 1 << 18
NODE, CLASS = "node-1", "local"


def private_mounts() -> None:
    """This process's own mount namespace (called while it has one thread)."""
    if LIBC.unshare(CLONE_NEWNS) != 0 or \
            LIBC.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "a private mount namespace")


def mount_tmpfs(target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    if LIBC.mount(b"tmpfs", os.fsencode(target), b"tmpfs", 0, b"size=1m") != 0:
        raise OSError(ctypes.get_errno(), f"mount {target}")


class Profiles:
    """cProfile of the calling thread and of every thread started meanwhile (the host reader
    walks entries on worker threads of its own), merged."""

    def __init__(self) -> None:
        self.main = cProfile.Profile(time.thread_time)  # CPU, not time spent waiting
        self.threads: list[cProfile.Profile] = []

    def _thread_started(self, *_: object) -> None:
        sys.setprofile(None)
        profile = cProfile.Profile(time.thread_time)
        self.threads.append(profile)
        profile.enable()

    def __enter__(self) -> Profiles:
        threading.setprofile(self._thread_started)
        self.main.enable()
        return self

    def __exit__(self, *_: object) -> None:
        self.main.disable()
        threading.setprofile(None)  # type: ignore[arg-type]

    def stats(self) -> pstats.Stats:
        stats = pstats.Stats(self.main)
        for profile in self.threads:
            stats.add(profile)
        return stats


def top(profiles: Profiles, count: int) -> list[dict[str, Any]]:
    stats = profiles.stats()
    rows = []
    for (file, line, func), (_cc, calls, own, cum, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append({"function": f"{Path(file).name}:{line}({func})", "calls": calls,
                     "own_s": round(own, 4), "cumulative_s": round(cum, 4)})
    return sorted(rows, key=lambda r: -r["own_s"])[:count]


def measure(size: int, passes: int, count: int, work: Path, kind: str = "tmpfs"
            ) -> dict[str, Any]:
    disc = work / f"disks-{kind}-{size}"
    disks = Disks(work)
    for i in range(size):
        if kind == "tmpfs":
            mount_tmpfs(disc / f"v{i:04d}")
        else:  # a real block device under each entry: read, probed and identified every pass
            disks.mount(disks.loop(f"{kind}-{size}-{i}", size_mib=16, fs=kind),
                        disc / f"v{i:04d}")
    config = work / f"config-{size}.yaml"
    config.write_text(yaml.safe_dump({"storageClassMap": {CLASS: {"hostDir": str(disc)}}}))
    kube = FakeKube(watch_timeout=0.05)
    kube.add_node(NODE, labels={"kubernetes.io/hostname": NODE})
    kube.add_storage_class(CLASS)
    loop = Reconciler(kube, HostReader(), load_config(str(config)),
                      RunSettings(NODE, resync_period=3600.0))
    try:
        loop._start()
        started = time.perf_counter()
        with Profiles() as first_profile:
            result = loop.sync()
        first = time.perf_counter() - started
        assert sum(result.created_by_mode.values()) == size, result.created_by_mode
        times = []
        with Profiles() as steady_profile:
            for _ in range(passes):
                started = time.perf_counter()
                result = loop.sync()
                times.append(time.perf_counter() - started)
                assert not result.created_by_mode and not result.errors
        # the same passes unprofiled: the profiler's own overhead inflates small calls
        plain = []
        for _ in range(passes):
            started = time.perf_counter()
            loop.sync()
            plain.append(time.perf_counter() - started)
    finally:
        loop.shutdown()
        loop.close()
        for i in range(size):
            LIBC.umount2(os.fsencode(disc / f"v{i:04d}"), 2)
        disks.cleanup()
    return {"volumes": size, "kind": kind, "first_pass_s": round(first, 4),
            "steady_pass_ms_profiled": round(1000 * statistics.median(times), 2),
            "steady_pass_ms": round(1000 * statistics.median(plain), 2),
            "first_pass_top": top(first_profile, count),
            "steady_pass_top": top(steady_profile, count)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1,10,1000")
    parser.add_argument("--kind", choices=("tmpfs", "ext4"), default="tmpfs",
                        help="tmpfs mounts, or ext4 on loop devices (slower to set up)")
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--json", default="benchmarks/results/profile_pass.json")
    args = parser.parse_args()
    private_mounts()
    work = Path(tempfile.mkdtemp(prefix="localpv-profile."))
    rows = [measure(int(n), args.passes, args.top, work, args.kind)
            for n in args.sizes.split(",")]
    print("volumes | kind | first pass s (creates all) | steady pass ms | steady, profiled ms")
    print("--- | --- | --- | --- | ---")
    for r in rows:
        print(f"{r['volumes']} | {r['kind']} | {r['first_pass_s']} | {r['steady_pass_ms']} | "
              f"{r['steady_pass_ms_profiled']}")
    for r in rows:
        for which in ("first_pass_top", "steady_pass_top"):
            print(f"\n{r['volumes']} volumes, {which.replace('_', ' ')} (by own time)")
            for f in r[which]:
                print(f"  {f['own_s']:8.4f} own {f['cumulative_s']:8.4f} cum "
                      f"{f['calls']:7d}x {f['function']}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "passes": args.passes,
                               "results": rows}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
