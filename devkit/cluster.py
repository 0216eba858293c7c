"""Start or stop a local Kubernetes control plane for manual and e2e use.

    scripts/cluster up [--nodes N] [--dir DIR] [--bin-dir BIN] [--real-node [--image NAME]]
    scripts/cluster down [--dir DIR] [--keep-logs]
    scripts/cluster status [--dir DIR]

``up`` starts etcd, kube-apiserver, kube-controller-manager, kube-scheduler
and KWOK on 127.0.0.1 as detached processes (pid files in DIR/pids), adds N
fake Nodes ``node-1``..``node-N`` and prints the admin kubeconfig path as the
last line of stdout. ``down`` stops what ``up`` started and removes DIR's data.
Binaries come from ``scripts/build-binaries`` (fast once built) unless
``--bin-dir`` or ``LOCALPV_BIN_DIR`` names a directory.

``--real-node`` (root) adds one real Node, ``127.0.0.1``: containerd and a
kubelet with their state under DIR/node (devkit/realnode.py), the pause
and agent images from ``scripts/build-images`` imported into its containerd,
then the agent deployed from daemonset.yaml through a kustomize overlay
(DIR/node/overlay) with ``kubectl apply -k``; ``up`` returns once the
DaemonSet is Ready. ``down`` also stops the node and undoes what it did to the
host (processes, mounts, loop devices, cgroups, the bridge, sysctls).

``scripts/cluster`` runs this module (``python -m devkit.cluster``) in the project's virtualenv.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from devkit import REPO
from devkit.controlplane import (
    ControlPlane,
    ControlPlaneError,
    running_pids,
    stop_workdir,
)
from devkit.realnode import Images, RealNode, node_pids, stop_node

DEFAULT_DIR = Path("/tmp/localpv-cluster")


def find_bin_dir(explicit: str | None) -> Path:
    """Return the binaries directory: explicit, from the env, or built."""
    chosen = explicit or os.environ.get("LOCALPV_BIN_DIR")
    if chosen:
        return Path(chosen)
    proc = subprocess.run(
        [str(REPO / "scripts" / "build-binaries")],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        sys.exit(f"cluster: scripts/build-binaries failed (exit {proc.returncode})")
    return Path(lines[-1])


def cmd_up(args: argparse.Namespace) -> int:
    """Start the control plane detached and print the kubeconfig path."""
    workdir = Path(args.dir).resolve()
    alive = {**running_pids(workdir), **node_pids(workdir)}
    if alive:
        print(
            f"cluster: already running in {workdir} ({', '.join(sorted(alive))}); "
            f"run: scripts/cluster down --dir {workdir}",
            file=sys.stderr,
        )
        return 1
    images = None
    if args.real_node:
        if os.geteuid() != 0:
            print("cluster: --real-node needs root", file=sys.stderr)
            return 1
        try:
            images = Images.build(args.image)
        except ControlPlaneError as err:
            print(f"cluster: {err}", file=sys.stderr)
            return 1
    cp = ControlPlane(workdir, find_bin_dir(args.bin_dir), detach=True)
    print(f"cluster: starting in {workdir} with {args.nodes} fake nodes"
          + (" and a real one" if images else ""), file=sys.stderr)
    try:
        cp.start(nodes=args.nodes, timeout=args.timeout)
    except ControlPlaneError as err:
        print(f"cluster: {err}", file=sys.stderr)
        print(f"cluster: logs kept in {cp.log_dir}", file=sys.stderr)
        return 1
    print(f"cluster: up, apiserver {cp.server}, logs in {cp.log_dir}", file=sys.stderr)
    if images is not None:
        node = RealNode(cp, images, detach=True)
        try:
            node.start(timeout=args.timeout)
            print(f"cluster: node {node.name} Ready, logs in {node.paths.logs}", file=sys.stderr)
            seconds = node.deploy_agent(timeout=args.timeout)
        except ControlPlaneError as err:
            print(f"cluster: {err}", file=sys.stderr)
            print(f"cluster: still running; stop with: scripts/cluster down --dir {workdir}",
                  file=sys.stderr)
            return 1
        print(f"cluster: DaemonSet localpv-agent Ready {seconds:.1f}s after kubectl apply -k "
              f"{node.paths.overlay}; disks go under {node.disks_dir}", file=sys.stderr)
    print(cp.kubeconfig)
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    """Stop everything ``up`` started in DIR and remove its data."""
    workdir = Path(args.dir).resolve()
    for note in stop_node(workdir, keep_logs=args.keep_logs):
        print(f"cluster: {note}", file=sys.stderr)
    stop_workdir(workdir, keep_logs=args.keep_logs)
    left = {**running_pids(workdir), **node_pids(workdir)}
    if left:
        print(f"cluster: still running: {left}", file=sys.stderr)
        return 1
    print(f"cluster: down ({workdir})", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print the running components; exit 1 if none runs."""
    workdir = Path(args.dir).resolve()
    alive = {**running_pids(workdir), **node_pids(workdir)}
    for name, pid in alive.items():
        print(f"{name}\t{pid}")
    if alive:
        print(workdir / "admin.kubeconfig")
    return 0 if alive else 1


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the chosen command."""
    parser = argparse.ArgumentParser(prog="cluster", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start a control plane with fake nodes")
    up.add_argument("--nodes", type=int, default=3, help="fake nodes to add (default 3)")
    up.add_argument("--dir", default=str(DEFAULT_DIR), help=f"work dir (default {DEFAULT_DIR})")
    up.add_argument("--bin-dir", help="directory of prebuilt binaries")
    up.add_argument("--timeout", type=float, default=300.0, help="seconds to become ready")
    up.add_argument("--real-node", action="store_true",
                    help="add a real node (containerd + kubelet) running the agent's DaemonSet")
    up.add_argument("--image", help="agent image name for --real-node (default localpv-agent:dev)")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop the control plane and remove its data")
    down.add_argument("--dir", default=str(DEFAULT_DIR), help=f"work dir (default {DEFAULT_DIR})")
    down.add_argument("--keep-logs", action="store_true", help="leave DIR/logs in place")
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="list running components")
    status.add_argument("--dir", default=str(DEFAULT_DIR), help=f"work dir (default {DEFAULT_DIR})")
    status.set_defaults(func=cmd_status)

    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
