#!/usr/bin/env python3
"""How long cleaning takes: a filesystem volume holding 100,000 small files, and a 1 GiB loop
device with each built-in block cleaner.

Baseline in the same run: a plain `rm -rf` of the same tree on the same filesystem (what an
operator would do by hand, without the cleaner's checks: no symlink or mount-boundary checks,
no identity check, no flags cleared), and the ratio of the agent's cleaner to it.

Runs the agent's own cleaning code (agent.cleaner) on real loop devices; no cluster needed.
Needs root. Prints a table, writes JSON; never passes or fails.

    .venv/bin/python benchmarks/cleaning.py [--files 100000] [--device-mib 1024]
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

from agent.cleaner import clean_filesystem, run_block_cleaner
from devkit import REPO
from devkit.disks import Disks

CLEANERS = REPO / "scripts" / "cleaners"
BLOCK_CLEANERS = ("quick_reset.sh", "blkdiscard.sh", "dd_zero.sh", "shred.sh")


def fill(root: Path, files: int, per_dir: int = 1000) -> float:
    started = time.monotonic()
    for i in range(files):
        d = root / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir()
        (d / f"f{i:06d}").write_bytes(b"x" * 512)
    os.sync()
    return time.monotonic() - started


def main() -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up disks when killed
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--device-mib", type=int, default=1024)
    parser.add_argument("--json", default="benchmarks/results/cleaning.json")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="localpv-clean."))
    disks = Disks(work)
    rows: list[dict[str, object]] = []
    try:
        device = disks.loop("fs", size_mib=2048, fs="ext4")
        mount = disks.mount(device, work / "mnt")
        filled = fill(mount, args.files)
        started = time.monotonic()
        report = clean_filesystem(str(mount), os.stat(mount).st_dev)
        rows.append({"case": f"filesystem, {args.files} files of 512 B (ext4)",
                     "seconds": round(time.monotonic() - started, 2),
                     "detail": report.summary(), "fill_seconds": round(filled, 2)})
        print(f"filesystem: {rows[-1]['seconds']}s", file=sys.stderr)
        (mount / "again").mkdir()
        fill(mount / "again", args.files)
        started = time.monotonic()
        subprocess.run(["rm", "-rf", "--one-file-system", str(mount / "again")], check=True)
        baseline = time.monotonic() - started
        rows.append({"case": f"baseline: rm -rf, the same {args.files} files (ext4)",
                     "seconds": round(baseline, 2),
                     "detail": f"the cleaner took {float(rows[-1]['seconds']) / baseline:.2f}x"})
        print(f"rm -rf: {rows[-1]['seconds']}s", file=sys.stderr)

        for cleaner in BLOCK_CLEANERS:
            raw = disks.loop(f"raw-{cleaner}", size_mib=args.device_mib)
            with open(raw, "r+b") as f:  # real data to wipe, not a sparse hole
                for _ in range(args.device_mib // 64):
                    f.write(os.urandom(1 << 20) * 64)
                f.flush()
                os.fsync(f.fileno())
            started = time.monotonic()
            try:
                run_block_cleaner([str(CLEANERS / cleaner)], raw, timeout=3600, label=cleaner)
                outcome = "ok"
            except Exception as exc:  # report it, do not stop the benchmark
                outcome = f"failed: {exc}"
            rows.append({"case": f"block {args.device_mib} MiB loop, {cleaner}",
                         "seconds": round(time.monotonic() - started, 2), "detail": outcome})
            print(f"{cleaner}: {rows[-1]['seconds']}s {outcome}", file=sys.stderr)
    finally:
        disks.cleanup()

    print("case | seconds | result")
    print("--- | --- | ---")
    for row in rows:
        print(f"{row['case']} | {row['seconds']} | {row['detail']}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
