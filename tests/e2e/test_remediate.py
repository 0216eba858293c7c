"""`localpv-agent remediate` on a real control plane: KWOK nodes are deleted, shut down
(NotReady, then the out-of-service taint), or come back, and the StatefulSet replica of a lost
node gets a fresh claim on the spare node's PV while nothing else is touched; the guard, the
opt-outs and the dry run delete nothing; two replicas elect one leader through a Lease; the
controller runs with its own ServiceAccount token throughout.

Each test has its own StorageClass, namespace and nodes, so their PVs and Events are its own.
PVs are made with the agent's shape by the test, except in the last test, where real agents on
real disks make them and one of them comes back after its node was lost.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.volumes import pv_name
from devkit.agents import (
    REPO,
    Agent,
    api_get,
    events_for,
    items,
    pvs_of,
    wait_events,
    wait_for,
)
from devkit.controlplane import ControlPlane
from devkit.disks import disks
from devkit.remediation import (
    ACCOUNT,
    NAMESPACE,
    STS,
    TEMPLATE,
    Controller,
    Scenario,
    claim_uid,
    install_rbac,
    lost_by_deletion,
    make_scenario,
    out_of_service,
    running,
    settle,
    shut_down,
    statefulset,
    teardown,
)

# -- the controller --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def remediate_kubeconfig(cluster: ControlPlane, agent_kubeconfig: Path,
                         tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A token of the controller's ServiceAccount, bound by remediate.yaml (its namespace
    comes from daemonset.yaml, applied for `agent_kubeconfig`)."""
    return install_rbac(cluster, tmp_path_factory.mktemp("remediate") / "kubeconfig")


@pytest.fixture
def controllers(remediate_kubeconfig: Path, tmp_path: Path) -> Iterator[list[Controller]]:
    """Controllers started by the test (`start(...)`), all stopped at its end."""
    started: list[Controller] = []
    yield started
    for c in started:
        c.stop()


def start(started: list[Controller], kubeconfig: Path, workdir: Path, *args: str,
          name: str = "a", lead: bool = True) -> Controller:
    c = Controller(kubeconfig, workdir, *args, name=name).start()
    started.append(c)
    if lead:
        c.wait_leader()
    return c


# -- a StatefulSet on KWOK nodes -------------------------------------------------------------------


def pv_exists(cluster: ControlPlane, name: str) -> bool:
    return api_get(cluster, f"/api/v1/persistentvolumes/{name}") is not None


def replaced(cluster: ControlPlane, s: Scenario, replica: str, before: dict[str, str],
             timeout: float = 240) -> dict[str, str]:
    """Wait for `replica` to run again with a new claim on another node's PV."""
    return wait_for(
        lambda: (r := running(cluster, s).get(replica)) and r["claim"] != before["claim"]
        and r["node"] != before["node"] and r, timeout,
        f"{replica} running with a new claim away from {before['node']}")


def untouched(cluster: ControlPlane, s: Scenario, before: dict[str, dict[str, str]],
              skip: str = "") -> None:
    """The other replicas: same pod, claim, PV and node (UIDs unchanged)."""
    now = running(cluster, s)
    for replica, was in before.items():
        if replica != skip:
            assert now.get(replica) == was, (replica, was, now.get(replica))
            assert pv_exists(cluster, was["pv"])


def remediation_events(cluster: ControlPlane, s: Scenario) -> list[dict[str, Any]]:
    return [e for e in items(cluster, f"/api/v1/namespaces/{s.ns}/events")
            if e.get("source", {}).get("component") == "localpv-agent"]


@pytest.fixture
def scenarios(cluster: ControlPlane) -> Iterator[list[Scenario]]:
    made: list[Scenario] = []
    yield made
    for s in made:
        teardown(cluster, s)


# -- losing a node, the ways it happens ------------------------------------------------------------


# -- the tests -------------------------------------------------------------------------------------


def test_deleted_node_replica_moves_to_the_spare_pv_and_nothing_else_changes(
    cluster: ControlPlane, remediate_kubeconfig: Path, tmp_path: Path,
    controllers: list[Controller], scenarios: list[Scenario],
) -> None:
    s = make_scenario(cluster, "rm-del", nodes=4, replicas=3)
    scenarios.append(s)
    before = settle(cluster, s)
    c = start(controllers, remediate_kubeconfig, tmp_path, "--storageclass-names", s.cls,
              "--pvc-deletion-delay", "5")
    victim = before["web-1"]
    spare = (set(s.nodes) - {r["node"] for r in before.values()}).pop()

    lost_by_deletion(cluster, victim["node"])
    after = replaced(cluster, s, "web-1", victim)

    assert after["node"] == spare
    assert after["pv"] == pv_name("disk", spare, s.cls)
    untouched(cluster, s, before, skip="web-1")
    wait_for(lambda: not pv_exists(cluster, victim["pv"]), 60, f"{victim['pv']} removed")
    assert pv_exists(cluster, after["pv"])
    reasons = {(e["involvedObject"]["kind"], e["involvedObject"]["name"], e["reason"])
               for e in remediation_events(cluster, s)}
    assert ("PersistentVolumeClaim", f"{TEMPLATE}-web-1", "ClaimRemediated") in reasons
    assert ("StatefulSet", STS, "ClaimRemediated") in reasons
    assert wait_events(cluster, "PersistentVolume", victim["pv"], "VolumeRemediated", 60)
    metrics = c.metrics()
    assert metrics['localpv_agent_remediations_total{result="claim_deleted",'
                   'trigger="node_deleted"}'] == 1
    assert metrics['localpv_agent_remediations_total{result="pv_deleted",'
                   'trigger="node_deleted"}'] == 1


def test_out_of_service_taint_on_a_shut_down_node_triggers_it(
    cluster: ControlPlane, remediate_kubeconfig: Path, tmp_path: Path,
    controllers: list[Controller], scenarios: list[Scenario],
) -> None:
    s = make_scenario(cluster, "rm-oos", nodes=4, replicas=3)
    scenarios.append(s)
    before = settle(cluster, s)
    # The default deletion delay (60 s) does not apply: the taint is an operator's word.
    start(controllers, remediate_kubeconfig, tmp_path, "--storageclass-names", s.cls)
    victim = before["web-0"]
    shut_down(cluster, victim["node"])
    out_of_service(cluster, victim["node"])
    after = replaced(cluster, s, "web-0", victim, timeout=180)
    untouched(cluster, s, before, skip="web-0")
    assert after["pv"] == pv_name("disk", after["node"], s.cls)
    wait_for(lambda: not pv_exists(cluster, victim["pv"]), 60, f"{victim['pv']} removed")


def test_not_ready_alone_does_nothing_unless_enabled(
    cluster: ControlPlane, remediate_kubeconfig: Path, tmp_path: Path,
    controllers: list[Controller], scenarios: list[Scenario],
) -> None:
    evict_fast = [{"key": f"node.kubernetes.io/{k}", "operator": "Exists", "effect": "NoExecute",
                   "tolerationSeconds": 1} for k in ("not-ready", "unreachable")]
    s = make_scenario(cluster, "rm-nr", nodes=4, replicas=3, tolerations=evict_fast)
    scenarios.append(s)
    before = settle(cluster, s)
    victim = before["web-2"]
    off = start(controllers, remediate_kubeconfig, tmp_path, "--storageclass-names", s.cls,
                "--not-ready-timeout", "1", name="off")
    shut_down(cluster, victim["node"])
    pod = f"/api/v1/namespaces/{s.ns}/pods/web-2"
    wait_for(lambda: ((api_get(cluster, pod) or {}).get("metadata") or {}).get(
        "deletionTimestamp"), 60,
             "web-2 evicted, stuck terminating on the NotReady node")
    wait_for(lambda: off.metric("localpv_agent_unavailable_nodes") == 1, 30,
             "the controller counting the node down", on_timeout=off.log)
    off.wait_passes(3)
    assert off.metric("localpv_agent_lost_nodes") == 0  # down, but the trigger is off
    assert claim_uid(cluster, s, "web-2") == victim["claim"]
    assert remediation_events(cluster, s) == []
    off.stop()

    on = start(controllers, remediate_kubeconfig, tmp_path, "--storageclass-names", s.cls,
               "--trigger-not-ready", "--not-ready-timeout", "2", name="on")
    claim = f"/api/v1/namespaces/{s.ns}/persistentvolumeclaims/{TEMPLATE}-web-2"
    wait_for(lambda: (c := api_get(cluster, claim)) is None
             or c["metadata"].get("deletionTimestamp"), 60, "the claim deleted",
             on_timeout=on.log)
    # No kubelet will ever confirm that pod's end: the operator force-deletes it, then the
    # replica starts on the spare.
    cluster.kubectl("delete", "pod", "web-2", "-n", s.ns, "--grace-period=0", "--force")
    replaced(cluster, s, "web-2", victim)
    untouched(cluster, s, before, skip="web-2")
    assert on.metric("localpv_agent_remediations_total", result="claim_deleted",
                     trigger="not_ready") == 1


def test_node_back_within_the_delay_cancels(
    cluster: ControlPlane, remediate_kubeconfig: Path, tmp_path: Path,
    controllers: list[Controller], scenarios: list[Scenario],
) -> None:
    s = make_scenario(cluster, "rm-back", nodes=4, replicas=3)
    scenarios.append(s)
    before = settle(cluster, s)
    delay = 15.0
    c = start(controllers, remediate_kubeconfig, tmp_path, "--storageclass-names", s.cls,
              "--pvc-deletion-delay", f"{delay:g}")
    victim = before["web-1"]
    gone_at = time.monotonic()
    lost_by_deletion(cluster, victim["node"])
    wait_for(lambda: c.metric("localpv_agent_unavailable_nodes") == 1, 30, "the loss seen",
             on_timeout=c.log)
    cluster.add_node(victim["node"])  # back (a new Node object, KWOK behind it again)
    wait_for(lambda: c.metric("localpv_agent_unavailable_nodes") == 0, 30, "the return seen",
             on_timeout=c.log)
    wait_for(lambda: time.monotonic() > gone_at + delay + 2, delay + 10, "the delay over",
             interval=0.5)
    c.wait_passes(3)
    untouched(cluster, s, before)
    assert remediation_events(cluster, s) == []
    assert c.metric("localpv_agent_lost_nodes") == 0


def test_two_of_three_lost_at_once_trips_the_guard(
    cluster: ControlPlane, remediate_kubeconfig: Path, tmp_path: Path,
    controllers: list[Controller], scenarios: list[Scenario],
) -> None:
    s = make_scenario(cluster, "rm-guard", nodes=3, replicas=3)
    scenarios.append(s)
    before = settle(cluster, s)
    c = start(controllers, remediate_kubeconfig, tmp_path, "--storageclass-names", s.cls,
              "--max-unavailable-nodes", "1")
    lost = [before["web-0"]["node"], before["web-1"]["node"]]
    for node in lost:  # both go down together (a partition, a rack), then get the taint
        shut_down(cluster, node)
    for node in lost:
        out_of_service(cluster, node)
    wait_for(lambda: c.metric("localpv_agent_blocked_by_guard") == 1, 60, "the guard",
             on_timeout=c.log)
    for node in lost:
        warnings = wait_for(lambda n=node: [e for e in events_for(cluster, "Node", n)
                                            if e["reason"] == "RemediationBlocked"], 30,
                            f"Warning Event on {node}")
        assert warnings[0]["type"] == "Warning" and "at most 1 allowed" in warnings[0]["message"]
    # Once the replicas are Pending (their pods evicted and removed) the claims would go:
    # the guard says so on each claim, and deletes nothing.
    for replica in ("web-0", "web-1"):
        wait_for(lambda r=replica: any(
            e["reason"] == "RemediationBlocked" and e["involvedObject"]["name"] ==
            f"{TEMPLATE}-{r}" for e in remediation_events(cluster, s)), 120,
            f"the guard's Event on {TEMPLATE}-{replica}", on_timeout=c.log)
    c.wait_passes(3)
    assert c.metric("localpv_agent_unavailable_nodes") == 2
    assert c.metric("localpv_agent_remediations_total", result="blocked",
                    trigger="out_of_service") >= 2
    for replica, was in before.items():
        assert claim_uid(cluster, s, replica) == was["claim"]
        assert pv_exists(cluster, was["pv"])


@pytest.mark.parametrize("how", ["not-opted-in", "claim", "statefulset"])
def test_not_opted_in_or_opted_out_nothing_is_deleted(
    cluster: ControlPlane, remediate_kubeconfig: Path, tmp_path: Path,
    controllers: list[Controller], scenarios: list[Scenario], how: str,
) -> None:
    s = make_scenario(cluster, f"rm-out-{how[:5]}", nodes=4, replicas=3)
    scenarios.append(s)
    before = settle(cluster, s)
    victim = before["web-1"]
    annotation = "localpv-agent.io/remediate=false"
    if how == "claim":
        cluster.kubectl("annotate", "pvc", f"{TEMPLATE}-web-1", "-n", s.ns, annotation)
    elif how == "statefulset":
        cluster.kubectl("annotate", "statefulset", STS, "-n", s.ns, annotation)
    classes = "some-other-class" if how == "not-opted-in" else s.cls
    c = start(controllers, remediate_kubeconfig, tmp_path, "--storageclass-names", classes)
    shut_down(cluster, victim["node"])
    out_of_service(cluster, victim["node"])
    pod = f"/api/v1/namespaces/{s.ns}/pods/web-1"
    wait_for(lambda: (p := api_get(cluster, pod)) is not None
             and p["status"].get("phase") == "Pending" and not p["spec"].get("nodeName"), 120,
             "web-1 recreated and Pending: its claim could go now")
    if how != "not-opted-in":
        skipped = wait_for(lambda: [e for e in remediation_events(cluster, s)
                                    if e["reason"] == "RemediationSkipped"], 60,
                           "the opt-out said", on_timeout=c.log)
        assert "opts out" in skipped[0]["message"]
    c.wait_passes(3)
    assert claim_uid(cluster, s, "web-1") == victim["claim"]
    assert pv_exists(cluster, victim["pv"])
    untouched(cluster, s, before, skip="web-1")
    assert not [e for e in remediation_events(cluster, s) if e["reason"] == "ClaimRemediated"]


def test_dry_run_deletes_nothing_and_says_what_it_would(
    cluster: ControlPlane, remediate_kubeconfig: Path, tmp_path: Path,
    controllers: list[Controller], scenarios: list[Scenario],
) -> None:
    s = make_scenario(cluster, "rm-dry", nodes=4, replicas=3)
    scenarios.append(s)
    before = settle(cluster, s)
    victim = before["web-0"]
    c = start(controllers, remediate_kubeconfig, tmp_path, "--storageclass-names", s.cls,
              "--dry-run")
    shut_down(cluster, victim["node"])
    out_of_service(cluster, victim["node"])
    said = wait_for(lambda: {e["involvedObject"]["kind"]: e for e in remediation_events(cluster, s)
                             if e["reason"] == "RemediationDryRun"}.keys() >= {
                                 "PersistentVolumeClaim", "StatefulSet"} and
                    [e for e in remediation_events(cluster, s)
                     if e["reason"] == "RemediationDryRun"], 120, "dry-run Events",
                    on_timeout=c.log)
    assert all(f"would delete claim {s.ns}/{TEMPLATE}-web-0" in e["message"] for e in said)
    c.wait_passes(3)
    assert claim_uid(cluster, s, "web-0") == victim["claim"]
    assert pv_exists(cluster, victim["pv"])
    assert c.metric("localpv_agent_remediations_total", result="dry_run",
                    trigger="out_of_service") == 1


def test_two_replicas_one_leader_and_the_standby_takes_over(
    cluster: ControlPlane, remediate_kubeconfig: Path, tmp_path: Path,
    controllers: list[Controller], scenarios: list[Scenario],
) -> None:
    s = make_scenario(cluster, "rm-lead", nodes=5, replicas=3)
    scenarios.append(s)
    before = settle(cluster, s)
    args = ("--storageclass-names", s.cls)
    a = start(controllers, remediate_kubeconfig, tmp_path, *args, name="a", lead=False)
    b = start(controllers, remediate_kubeconfig, tmp_path, *args, name="b", lead=False)
    leader = wait_for(lambda: [c for c in (a, b) if c.leader()], 30, "a leader")[0]
    standby = b if leader is a else a
    wait_for(lambda: standby.passes() > 0, 30, "the standby watching too")
    assert not standby.leader()

    first = before["web-0"]
    shut_down(cluster, first["node"])
    out_of_service(cluster, first["node"])
    replaced(cluster, s, "web-0", first)
    actors = {e["reportingInstance"] for e in remediation_events(cluster, s)
              if e["reason"] == "ClaimRemediated"}
    assert actors == {leader.name}
    assert [c.metric("localpv_agent_remediations_total", result="claim_deleted")
            for c in (leader, standby)] == [1, 0]

    lease = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases/{ACCOUNT}"
    killed_at = time.monotonic()
    leader.kill()
    wait_for(standby.leader, 30, "the standby leading", on_timeout=standby.log)
    took = time.monotonic() - killed_at
    assert took < 4 + 1 + 3, f"took {took:.1f}s over a 4 s lease"  # duration + a round + slack
    assert (api_get(cluster, lease) or {})["spec"]["holderIdentity"] == standby.name

    second = before["web-1"]
    shut_down(cluster, second["node"])
    out_of_service(cluster, second["node"])
    replaced(cluster, s, "web-1", second)
    assert running(cluster, s)["web-0"]["claim"] != first["claim"]  # moved once, stays
    untouched(cluster, s, {"web-2": before["web-2"]})


# -- RBAC ------------------------------------------------------------------------------------------


def can(cluster: ControlPlane, kubeconfig: Path, *args: str) -> bool:
    result = cluster.kubectl("--kubeconfig", str(kubeconfig), "auth", "can-i", *args,
                             check=False)
    return result.stdout.strip() == "yes"


@pytest.mark.parametrize("args", [
    ("list", "nodes"), ("watch", "nodes"), ("list", "persistentvolumes"),
    ("watch", "persistentvolumes"), ("delete", "persistentvolumes"),
    ("get", "persistentvolumeclaims", "-n", "apps"),
    ("delete", "persistentvolumeclaims", "-n", "apps"), ("list", "pods", "-A"),
    ("watch", "pods", "-A"), ("get", "statefulsets.apps", "-n", "apps"),
    ("create", "events", "-n", "apps"), ("create", "leases.coordination.k8s.io", "-n", NAMESPACE),
    ("get", f"leases.coordination.k8s.io/{ACCOUNT}", "-n", NAMESPACE),
    ("update", f"leases.coordination.k8s.io/{ACCOUNT}", "-n", NAMESPACE),
], ids=" ".join)
def test_controller_token_may_do_what_it_needs(
    cluster: ControlPlane, remediate_kubeconfig: Path, args: tuple[str, ...]
) -> None:
    assert can(cluster, remediate_kubeconfig, *args)


@pytest.mark.parametrize("args", [
    ("list", "secrets", "-A"), ("create", "persistentvolumes"), ("patch", "persistentvolumes"),
    ("delete", "nodes"), ("update", "nodes"), ("patch", "nodes"), ("delete", "pods", "-A"),
    ("create", "pods", "-A"), ("create", "persistentvolumeclaims", "-n", "apps"),
    ("update", "persistentvolumeclaims", "-n", "apps"),
    ("list", "persistentvolumeclaims", "-A"), ("update", "statefulsets.apps", "-n", "apps"),
    ("delete", "statefulsets.apps", "-n", "apps"),
    ("get", "leases.coordination.k8s.io/kube-controller-manager", "-n", "kube-system"),
    ("update", "leases.coordination.k8s.io/other", "-n", NAMESPACE),
    ("delete", f"leases.coordination.k8s.io/{ACCOUNT}", "-n", NAMESPACE),
    ("update", "events", "-n", "apps"),
], ids=" ".join)
def test_controller_token_is_refused_everything_else(
    cluster: ControlPlane, remediate_kubeconfig: Path, args: tuple[str, ...]
) -> None:
    assert not can(cluster, remediate_kubeconfig, *args)


def test_remediate_yaml_is_accepted_by_the_apiserver(
    cluster: ControlPlane, agent_kubeconfig: Path
) -> None:
    result = cluster.kubectl("apply", "--dry-run=server", "-f", str(REPO / "remediate.yaml"),
                             check=False)
    assert result.returncode == 0, result.stderr
    kinds = [d["kind"] for d in yaml.safe_load_all((REPO / "remediate.yaml").read_text()) if d]
    assert kinds.count("Deployment") == 1
    (deployment,) = [d for d in yaml.safe_load_all((REPO / "remediate.yaml").read_text())
                     if d and d["kind"] == "Deployment"]
    assert deployment["spec"]["replicas"] == 2
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "remediate" and "--storageclass-names=" in args  # opted in to nothing


# -- a node that comes back with its disk ----------------------------------------------------------


def test_node_back_with_the_same_disk_gets_exactly_one_pv(
    cluster: ControlPlane, remediate_kubeconfig: Path, agent_kubeconfig: Path, tmp_path: Path,
    controllers: list[Controller], scenarios: list[Scenario],
) -> None:
    """Real agents on real disks: the lost node's PV is removed; when the node returns with the
    disk, its agent cleans it (a tenant wrote there) and offers it again as one PV."""
    s = Scenario("rm-disk", ["rm-disk-1", "rm-disk-2"], 1, cls="sc-rm-disk")
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
        {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
         "metadata": {"name": s.cls}, "provisioner": "kubernetes.io/no-provisioner",
         "volumeBindingMode": "WaitForFirstConsumer", "reclaimPolicy": "Delete"},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": s.ns}}]))
    scenarios.append(s)
    with disks(tmp_path) as d:
        agents: dict[str, Agent] = {}
        configs: dict[str, Path] = {}
        try:
            for node in s.nodes:
                cluster.add_node(node)
                s.made_nodes.add(node)
                d.mount(d.loop(f"{node}-vol", size_mib=32, fs="ext4"),
                        tmp_path / node / "disks" / "vol")
                configs[node] = tmp_path / node / "config.yaml"
                configs[node].write_text(yaml.safe_dump({"storageClassMap": {s.cls: {
                    "hostDir": "/mnt/disks", "mountDir": str(tmp_path / node / "disks")}}}))
                agents[node] = Agent(node, configs[node], agent_kubeconfig, tmp_path,
                                     "--resync-period", "2").start()
            for node, agent in agents.items():
                agent_ready(agent)
                wait_for(lambda n=node: len(pvs_of(cluster, n)) == 1, 30, f"{node}'s PV")
            cluster.kubectl("apply", "-f", "-",
                            input=yaml.safe_dump(statefulset(s, storage="16Mi")))
            (before,) = settle(cluster, s).values()
            lost = before["node"]
            data = tmp_path / lost / "disks" / "vol" / "tenant-data"
            data.write_text("the replica's bytes")
            # the agent remembers on its host that the volume held a tenant's data
            wait_for(lambda: list((tmp_path / f"state-{lost}" / "dirty").glob("*.json")), 30,
                     f"{lost}'s dirty record", on_timeout=agents[lost].log)
            start(controllers, remediate_kubeconfig, tmp_path, "--storageclass-names", s.cls,
                  "--pvc-deletion-delay", "3")
            agents[lost].stop()
            lost_by_deletion(cluster, lost)
            after = replaced(cluster, s, "web-0", before)
            assert after["node"] != lost
            wait_for(lambda: pvs_of(cluster, lost) == [], 60, f"{lost}'s PV removed")
            assert data.exists()  # the controller never touches data

            cluster.add_node(lost)  # it comes back, with the same disk
            agents[lost] = Agent(lost, configs[lost], agent_kubeconfig, tmp_path,
                                 "--resync-period", "2").start()
            agent_ready(agents[lost])
            wait_for(lambda: [p for p in pvs_of(cluster, lost)
                              if p.get("status", {}).get("phase") == "Available"], 60,
                     f"{lost}'s disk offered again", on_timeout=agents[lost].log)
            agents[lost].wait_passes(2)
            assert [p["metadata"]["name"] for p in pvs_of(cluster, lost)] == [
                pv_name("vol", lost, s.cls)]
            assert not data.exists()  # cleaned by its own agent before it was offered
            assert running(cluster, s)["web-0"] == after
        finally:
            for agent in agents.values():
                agent.kill()


def agent_ready(agent: Agent) -> None:
    """Its port first, with a deadline for a busy machine (Agent.port allows only 10 s)."""
    wait_for(lambda: agent.port_file.exists() and agent.port_file.read_text().strip(), 60,
             f"agent {agent.node} listening", on_timeout=agent.log)
    agent.wait_ready(60)

