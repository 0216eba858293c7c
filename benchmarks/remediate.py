#!/usr/bin/env python3
"""Time from a lost node to its StatefulSet replica Running again elsewhere, with
`localpv-agent remediate`, in the 4-node scenario of tests/e2e/test_remediate.py: a 3-replica
StatefulSet on 4 KWOK nodes, one PV each (one spare). Each run makes a fresh scenario, starts
the controller (its own ServiceAccount token, the shipped defaults but the deletion delay), loses
the node of replica web-1 and polls until web-1 runs with a new claim on the spare's PV.

Triggers: `deleted` (the Node object is deleted; the time includes --delay and the pod
garbage collector's removal of the pod bound to the deleted node, 40-60 s in Kubernetes), or
`out-of-service` (the node is shut down, NotReady, then gets the out-of-service taint; its pod
is evicted, the claim deleted at once, and the pod removed by the pod garbage collector).
Prints each run and the p50; never passes or fails. Needs only the control plane binaries
(scripts/build-binaries), no root.

    .venv/bin/python benchmarks/remediate.py [--runs 10] [--trigger deleted] [--delay 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from devkit.agents import api_get, build_binaries
from devkit.controlplane import ControlPlane
from devkit.remediation import (
    Controller,
    claim_uid,
    install_rbac,
    lost_by_deletion,
    make_scenario,
    out_of_service,
    running,
    settle,
    shut_down,
    teardown,
)


def one_run(cluster: ControlPlane, kubeconfig: Path, work: Path, i: int, trigger: str,
            delay: float) -> dict[str, float]:
    s = make_scenario(cluster, f"bench-{i}", nodes=4, replicas=3)
    controller = Controller(kubeconfig, work, name=f"bench-{i}")
    controller.args = ("--storageclass-names", s.cls, "--pvc-deletion-delay", f"{delay:g}")
    try:
        before = settle(cluster, s)
        controller.start().wait_leader(60)
        victim = before["web-1"]
        started = time.monotonic()
        if trigger == "deleted":
            lost_by_deletion(cluster, victim["node"])
        else:
            shut_down(cluster, victim["node"])
            out_of_service(cluster, victim["node"])
        pod_gone = claim_gone = None
        deadline = started + 600
        pod = f"/api/v1/namespaces/{s.ns}/pods/web-1"
        while time.monotonic() < deadline:
            now = time.monotonic()
            if pod_gone is None:
                body = api_get(cluster, pod)
                if body is None or body["metadata"]["uid"] != victim["pod"]:
                    pod_gone = now - started
            if claim_gone is None and claim_uid(cluster, s, "web-1") != victim["claim"]:
                claim_gone = now - started
            r = running(cluster, s).get("web-1")
            if r and r["claim"] != victim["claim"] and r["node"] != victim["node"]:
                return {"total": now - started, "old_pod_gone": pod_gone or now - started,
                        "claim_replaced": claim_gone or now - started}
            time.sleep(0.1)
        raise RuntimeError(f"run {i}: web-1 not running again within 600 s\n{controller.log()}")
    finally:
        controller.stop()
        teardown(cluster, s)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--trigger", choices=("deleted", "out-of-service"), default="deleted")
    parser.add_argument("--delay", type=float, default=5.0,
                        help="--pvc-deletion-delay of the controller (default: %(default)s s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-remediate-") as tmp:
        work = Path(tmp)
        cluster = ControlPlane(work / "cluster", build_binaries())
        try:
            cluster.start(nodes=0)
            kubeconfig = install_rbac(cluster, work / "kubeconfig", namespace=True)
            results = []
            for i in range(1, args.runs + 1):
                result = one_run(cluster, kubeconfig, work, i, args.trigger, args.delay)
                results.append(result)
                print(f"run {i:2d}: trigger -> old pod gone {result['old_pod_gone']:5.1f} s, "
                      f"-> old claim gone {result['claim_replaced']:5.1f} s, -> replacement pod "
                      f"Running {result['total']:5.1f} s", flush=True)
        finally:
            cluster.stop()
    totals = [r["total"] for r in results]
    summary = {
        "trigger": args.trigger, "pvc_deletion_delay": args.delay, "runs": len(totals),
        "p50_seconds": statistics.median(totals), "min_seconds": min(totals),
        "max_seconds": max(totals),
        "p50_claim_replaced_seconds": statistics.median(r["claim_replaced"] for r in results),
        "p50_old_pod_gone_seconds": statistics.median(r["old_pod_gone"] for r in results),
    }
    print(f"\ntrigger {args.trigger} (--pvc-deletion-delay {args.delay:g} s), {len(totals)} "
          f"runs: trigger -> replacement pod Running p50 {summary['p50_seconds']:.1f} s "
          f"(min {summary['min_seconds']:.1f}, max {summary['max_seconds']:.1f}); "
          f"old pod gone p50 {summary['p50_old_pod_gone_seconds']:.1f} s, old claim gone p50 "
          f"{summary['p50_claim_replaced_seconds']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
