"""The remediation decisions: which nodes are lost, which claims and PVs of theirs may go, and
everything that must stop them (opt-in, opt-out, a Ready node, a running pod, the partition
guard, the rate limit), plus the Lease rounds of leader election."""

from __future__ import annotations

import math
from typing import Any

import pytest

from agent.remediate import (
    OPT_OUT_ANNOTATION,
    OUT_OF_SERVICE_TAINT,
    Budget,
    ClaimCandidate,
    Memory,
    Observed,
    Options,
    RateWindow,
    Trigger,
    assess,
    cannot_run,
    decide_claim,
    lease_step,
    observe,
    parse_duration,
    pinned_hostname,
    released,
    statefulsets_to_read,
)

CLASS = "local-storage"
OPTS = Options(storage_classes=frozenset({CLASS}), deletion_delay=60.0,
               max_unavailable=Budget(count=1))


def node(name: str, ready: bool = True, taints: tuple[str, ...] = (),
         hostname: str | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": hostname or name}},
        "spec": {"taints": [{"key": k, "effect": "NoExecute"} for k in taints]},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


def pv(name: str, host: str, phase: str = "Bound", claim: str | None = "data-web-0",
       cls: str = CLASS, policy: str = "Delete", **meta: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "storageClassName": cls, "persistentVolumeReclaimPolicy": policy,
        "local": {"path": f"/mnt/disks/{name}"},
        "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": [host]}]}]}},
    }
    if claim:
        spec["claimRef"] = {"namespace": "apps", "name": claim, "uid": f"uid-{claim}"}
    return {"metadata": {"name": name, "uid": f"uid-{name}", "resourceVersion": "7", **meta},
            "spec": spec, "status": {"phase": phase}}


def run(nodes: list[dict[str, Any]], pvs: list[dict[str, Any]], opts: Options = OPTS,
        memory: Memory | None = None, now: float = 1000.0) -> tuple[Any, Memory]:
    hosts = [h for p in pvs if (h := pinned_hostname(p))]
    mem = observe(memory or Memory(), nodes, hosts, now)
    return assess(nodes, pvs, mem, opts, now), mem


FOUR = [node("n1"), node("n2"), node("n3"), node("n4")]


# -- which nodes are lost ------------------------------------------------------------------------


def test_all_ready_nothing_to_do() -> None:
    result, _ = run(FOUR, [pv("a", "n1"), pv("b", "n2", claim=None, phase="Available")])
    assert result.lost == {} and result.claims == () and result.removals == ()
    assert result.unavailable == 0 and not result.blocked


def test_deleted_node_is_lost_only_after_the_delay_and_a_return_cancels() -> None:
    pvs = [pv("a", "n1"), pv("b", "n2")]
    first, mem = run(FOUR[1:], pvs, now=1000.0)
    assert first.hosts["n1"].state == "waiting" and first.next_due == 1060.0
    assert first.claims == ()
    later, mem = run(FOUR[1:], pvs, memory=mem, now=1059.9)
    assert later.claims == ()
    due, mem = run(FOUR[1:], pvs, memory=mem, now=1060.0)
    (claim,) = due.claims
    assert (claim.pv, claim.claim, claim.trigger) == ("a", "data-web-0", Trigger.NODE_DELETED)
    back, mem = run(FOUR, pvs, memory=mem, now=1061.0)  # the Node came back
    assert back.claims == () and "n1" not in mem.missing_since
    again, mem = run(FOUR[1:], pvs, memory=mem, now=1062.0)  # gone again: a fresh delay
    assert again.claims == () and again.next_due == 1122.0


def test_each_trigger_has_its_own_switch() -> None:
    pvs = [pv("a", "n1")]
    off = Options(storage_classes=frozenset({CLASS}), trigger_deleted=False,
                  deletion_delay=0.0)
    result, _ = run(FOUR[1:], pvs, off)
    assert result.claims == () and result.hosts["n1"].state == "down"
    tainted = [node("n1", ready=False, taints=(OUT_OF_SERVICE_TAINT,)), *FOUR[1:]]
    result, _ = run(tainted, pvs)
    assert [c.trigger for c in result.claims] == [Trigger.OUT_OF_SERVICE]
    result, _ = run(tainted, pvs, Options(storage_classes=frozenset({CLASS}),
                                          trigger_out_of_service=False))
    assert result.claims == ()


def test_not_ready_alone_is_not_a_trigger_unless_enabled() -> None:
    down = [node("n1", ready=False), *FOUR[1:]]
    pvs = [pv("a", "n1")]
    result, mem = run(down, pvs, now=0.0)
    result, _ = run(down, pvs, memory=mem, now=10_000.0)
    assert result.claims == () and result.hosts["n1"].state == "down"
    assert result.unavailable == 1  # still counts for the partition guard
    on = Options(storage_classes=frozenset({CLASS}), trigger_not_ready=True,
                 not_ready_timeout=300.0)
    result, mem = run(down, pvs, on, now=0.0)
    assert result.hosts["n1"].state == "waiting" and result.next_due == 300.0
    result, _ = run(down, pvs, on, memory=mem, now=300.0)
    assert [c.trigger for c in result.claims] == [Trigger.NOT_READY]


def test_a_ready_node_is_never_touched_even_with_the_out_of_service_taint() -> None:
    nodes = [node("n1", ready=True, taints=(OUT_OF_SERVICE_TAINT,)), *FOUR[1:]]
    result, _ = run(nodes, [pv("a", "n1"), pv("b", "n1", claim=None, phase="Available")])
    assert result.claims == () and result.removals == ()
    assert "Ready" in result.hosts["n1"].detail


def test_node_found_by_hostname_label_or_by_name() -> None:
    nodes = [node("node-4", hostname="host-4"), *FOUR[1:]]
    result, _ = run(nodes, [pv("a", "host-4"), pv("b", "node-4")], OPTS, now=0.0)
    assert result.hosts["host-4"].state == "healthy"
    assert result.hosts["node-4"].state == "healthy"  # a PV pinned to the name: never "gone"


# -- which PVs -----------------------------------------------------------------------------------


def test_only_opted_in_classes_and_strictly_pinned_local_pvs() -> None:
    other = pv("other", "n1", cls="fast")
    loose = pv("loose", "n1")
    loose["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"].append(
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]})
    two = pv("two", "n1")
    two["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0][
        "values"] = ["n1", "n2"]
    not_local = pv("nfs", "n1")
    del not_local["spec"]["local"]
    opts = Options(storage_classes=frozenset({CLASS}), deletion_delay=0.0)
    result, _ = run(FOUR[1:], [other, loose, two, not_local], opts)
    assert result.hosts == {} and result.claims == ()
    result, _ = run(FOUR[1:], [pv("a", "n1")], Options(deletion_delay=0.0))  # nothing opted in
    assert result.hosts == {} and result.claims == ()


def test_unbound_pvs_of_a_lost_node_are_removed_per_upstream_rules() -> None:
    opts = Options(storage_classes=frozenset({CLASS}), deletion_delay=0.0)
    pvs = [pv("avail", "n1", phase="Available", claim=None),
           pv("released", "n1", phase="Released"),
           pv("retained", "n1", phase="Released", policy="Retain"),
           pv("failed", "n1", phase="Failed"),
           pv("going", "n1", phase="Available", claim=None,
              deletionTimestamp="2026-01-01T00:00:00Z"),
           pv("bound", "n1")]
    result, _ = run(FOUR[1:], pvs, opts)
    assert [(r.pv, r.uid, r.resource_version) for r in result.removals] == [
        ("avail", "uid-avail", "7"), ("released", "uid-released", "7")]
    assert [c.pv for c in result.claims] == ["bound"]
    assert {name for name, _ in result.kept} == {"retained", "failed"}


def test_stale_pvs_of_a_node_deleted_before_the_start_wait_a_whole_delay() -> None:
    """A new leader knows nothing of the past: the delay starts when it first sees the gap."""
    pvs = [pv("avail", "gone", phase="Available", claim=None)]
    first, mem = run(FOUR, pvs, now=500.0)
    assert first.removals == () and first.next_due == 560.0
    later, _ = run(FOUR, pvs, memory=mem, now=560.0)
    assert [r.pv for r in later.removals] == ["avail"]


# -- the partition guard -------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "total", "allowed"), [
    ("1", 100, 1), ("0", 4, 0), ("3", 2, 3), ("10%", 4, 1), ("10%", 30, 3), ("50%", 5, 2),
    ("100%", 3, 3), ("0%", 10, 1),
])
def test_budget(text: str, total: int, allowed: int) -> None:
    assert Budget.parse(text).allowed(total) == allowed


@pytest.mark.parametrize("text", ["", "-1", "x", "10%%", "101%", "-5%", "nan%", "1.5"])
def test_budget_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="count"):
        Budget.parse(text)


def test_two_of_three_lost_at_once_blocks_everything() -> None:
    opts = Options(storage_classes=frozenset({CLASS}), deletion_delay=0.0,
                   max_unavailable=Budget(count=1))
    pvs = [pv("a", "n1"), pv("b", "n2", claim="data-web-1"), pv("c", "n3", claim="data-web-2")]
    result, _ = run([node("n3")], pvs, opts)
    assert result.unavailable == 2 and result.allowed == 1 and result.blocked
    assert len(result.claims) == 2  # still decided, so the blocked ones can be reported


def test_guard_counts_only_nodes_holding_opted_in_pvs() -> None:
    """Nodes without opted-in PVs neither count as down nor widen a percent budget."""
    nodes = [node("n1", ready=False), node("x1", ready=False), node("x2", ready=False),
             node("n2")]
    opts = Options(storage_classes=frozenset({CLASS}), max_unavailable=Budget(percent=10))
    result, _ = run(nodes, [pv("a", "n1"), pv("b", "n2")], opts)
    assert (result.unavailable, result.allowed, result.blocked) == (1, 1, False)


def test_a_remediated_node_no_longer_counts() -> None:
    pvs = [pv("b", "n2")]  # n1's PVs are gone: n1 holds nothing any more
    result, _ = run(FOUR[1:], pvs)
    assert result.hosts.keys() == {"n2"} and result.unavailable == 0


# -- claims --------------------------------------------------------------------------------------

CANDIDATE = ClaimCandidate("a", "uid-a", "apps", "data-web-0", "uid-data-web-0", "n1",
                           Trigger.NODE_DELETED)
LOST = frozenset({"n1"})


def claim(**meta: Any) -> dict[str, Any]:
    return {"metadata": {"name": "data-web-0", "namespace": "apps", "uid": "uid-data-web-0",
                         "resourceVersion": "42", **meta}}


def pod(name: str = "web-0", phase: str = "Pending", node_name: str | None = None,
        owner: str | None = "StatefulSet", claim_name: str = "data-web-0",
        **meta: Any) -> dict[str, Any]:
    refs = [{"kind": owner, "name": "web", "uid": "uid-web", "controller": True}] if owner else []
    spec: dict[str, Any] = {"volumes": [{"name": "data",
                                         "persistentVolumeClaim": {"claimName": claim_name}}]}
    if node_name:
        spec["nodeName"] = node_name
    return {"metadata": {"name": name, "ownerReferences": refs, **meta}, "spec": spec,
            "status": {"phase": phase}}


STS = {"metadata": {"name": "web", "namespace": "apps", "uid": "uid-web"},
       "spec": {"volumeClaimTemplates": [{"metadata": {"name": "data"}}]}}


def test_pending_pod_of_a_statefulset_lets_the_claim_go_with_its_version() -> None:
    pods = [pod(), pod("other", claim_name="unrelated")]
    assert statefulsets_to_read(pods, "data-web-0") == {"web"}
    decision = decide_claim(CANDIDATE, claim(), pods, {"web": STS}, LOST)
    assert decision.verdict == "delete" and decision.resource_version == "42"
    assert decision.owner is not None and decision.owner.involved() == {
        "kind": "StatefulSet", "name": "web", "namespace": "apps", "uid": "uid-web",
        "apiVersion": "apps/v1"}
    assert decision.pods == ("web-0",)


def test_pod_stuck_terminating_on_the_lost_node_lets_the_claim_go() -> None:
    stuck = pod(phase="Running", node_name="n1", deletionTimestamp="2026-01-01T00:00:00Z")
    assert decide_claim(CANDIDATE, claim(), [stuck], {"web": STS}, LOST).verdict == "delete"


@pytest.mark.parametrize(("the_pod", "why"), [
    (pod(phase="Running", node_name="n1"), "may still run"),  # not evicted yet
    (pod(phase="Running", node_name="n2"), "may still run"),  # on a healthy node
    (pod(phase="Pending", node_name="n2"), "may still run"),
    (pod(phase="Running", node_name="n2", deletionTimestamp="x"), "may still run"),
])
def test_a_pod_that_may_run_keeps_the_claim(the_pod: dict[str, Any], why: str) -> None:
    decision = decide_claim(CANDIDATE, claim(), [pod("web-1", claim_name="x"), the_pod],
                            {"web": STS}, LOST)
    assert decision.verdict == "wait" and why in decision.reason


def test_no_pod_no_action_and_finished_pods_do_not_count() -> None:
    done = pod(phase="Succeeded", node_name="n1")
    decision = decide_claim(CANDIDATE, claim(), [done], {"web": STS}, LOST)
    assert decision.verdict == "wait" and "no pod" in decision.reason


def test_claim_replaced_or_being_deleted_is_done() -> None:
    assert decide_claim(CANDIDATE, None, [pod()], {"web": STS}, LOST).verdict == "done"
    replaced = claim(uid="a-new-claim")
    assert decide_claim(CANDIDATE, replaced, [pod()], {"web": STS}, LOST).verdict == "done"
    going = claim(deletionTimestamp="2026-01-01T00:00:00Z")
    assert decide_claim(CANDIDATE, going, [pod()], {"web": STS}, LOST).verdict == "done"


@pytest.mark.parametrize("value", ["false", "False", "no", "off", "0", "disabled"])
def test_claim_or_statefulset_opt_out(value: str) -> None:
    out = claim(annotations={OPT_OUT_ANNOTATION: value})
    decision = decide_claim(CANDIDATE, out, [pod()], {"web": STS}, LOST)
    assert (decision.verdict, decision.result) == ("skip", "opted_out")
    sts = {**STS, "metadata": {**STS["metadata"], "annotations": {OPT_OUT_ANNOTATION: value}}}
    decision = decide_claim(CANDIDATE, claim(), [pod()], {"web": sts}, LOST)
    assert (decision.verdict, decision.result) == ("skip", "opted_out")
    assert decision.owner is not None and decision.owner.name == "web"


def test_annotation_true_is_not_an_opt_out() -> None:
    yes = claim(annotations={OPT_OUT_ANNOTATION: "true"})
    assert decide_claim(CANDIDATE, yes, [pod()], {"web": STS}, LOST).verdict == "delete"


def test_only_a_statefulsets_own_claims() -> None:
    bare = decide_claim(CANDIDATE, claim(), [pod(owner=None)], {}, LOST)
    assert (bare.verdict, bare.result) == ("skip", "not_statefulset")
    rs = decide_claim(CANDIDATE, claim(), [pod(owner="ReplicaSet")], {}, LOST)
    assert rs.verdict == "skip"
    other_template = {**STS, "spec": {"volumeClaimTemplates": [{"metadata": {"name": "logs"}}]}}
    decision = decide_claim(CANDIDATE, claim(), [pod()], {"web": other_template}, LOST)
    assert (decision.verdict, decision.result) == ("skip", "not_statefulset")
    missing = decide_claim(CANDIDATE, claim(), [pod()], {"web": None}, LOST)
    assert missing.verdict == "wait"


def test_cannot_run() -> None:
    assert cannot_run(pod(), LOST)
    assert not cannot_run(pod(deletionTimestamp="x"), LOST)
    assert cannot_run(pod(phase="Running", node_name="n1", deletionTimestamp="x"), LOST)
    assert not cannot_run(pod(phase="Running", node_name="n1"), LOST)
    assert not cannot_run(pod(phase="Running", node_name="n2", deletionTimestamp="x"), LOST)


# -- rate limit ---------------------------------------------------------------------------------


def test_rate_window_is_sliding() -> None:
    window = RateWindow(2)
    assert window.allow(0.0) and window.next_free(0.0) is None
    window.record(0.0)
    window.record(10.0)
    assert not window.allow(30.0) and window.next_free(30.0) == 60.0
    assert window.allow(60.0)
    window.record(60.0)
    assert not window.allow(65.0) and window.next_free(65.0) == 70.0
    never = RateWindow(0)
    assert not never.allow(0.0) and never.next_free(0.0) == math.inf


# -- leader election ----------------------------------------------------------------------------

WALL = "2026-01-01T00:00:00.000000Z"


def lease(holder: str, version: str = "1", duration: int = 15) -> dict[str, Any]:
    return {"metadata": {"name": "l", "namespace": "ns", "resourceVersion": version},
            "spec": {"holderIdentity": holder, "leaseDurationSeconds": duration,
                     "renewTime": WALL, "leaseTransitions": 3}}


def test_no_lease_is_created_for_me() -> None:
    step = lease_step(None, "me", "l", "ns", 15, None, 0.0, WALL)
    assert step.verb == "create" and step.holder == "me"
    assert step.body is not None and step.body["spec"]["holderIdentity"] == "me"
    assert "resourceVersion" not in step.body["metadata"]


def test_my_lease_is_renewed_on_the_version_read() -> None:
    step = lease_step(lease("me", "5"), "me", "l", "ns", 15, None, 0.0, "later")
    assert step.verb == "update" and step.body is not None
    assert step.body["metadata"]["resourceVersion"] == "5"
    assert step.body["spec"]["renewTime"] == "later"
    assert step.body["spec"]["leaseTransitions"] == 3


def test_anothers_lease_is_taken_only_after_a_whole_duration_without_change() -> None:
    step = lease_step(lease("other", "5"), "me", "l", "ns", 15, None, 100.0, WALL)
    assert (step.verb, step.holder) == ("follow", "other")
    assert step.observed == Observed("5", "other", 100.0)
    step = lease_step(lease("other", "5"), "me", "l", "ns", 15, step.observed, 114.9, WALL)
    assert step.verb == "follow"
    renewed = lease_step(lease("other", "6"), "me", "l", "ns", 15, step.observed, 114.9, WALL)
    assert renewed.verb == "follow" and renewed.observed == Observed("6", "other", 114.9)
    taken = lease_step(lease("other", "6"), "me", "l", "ns", 15, renewed.observed, 129.9, WALL)
    assert (taken.verb, taken.holder) == ("update", "me")
    assert taken.body is not None and taken.body["spec"]["leaseTransitions"] == 4
    assert taken.body["metadata"]["resourceVersion"] == "6"


def test_released_lease_is_taken_at_once_and_only_mine_is_released() -> None:
    empty = lease("", "9")
    step = lease_step(empty, "me", "l", "ns", 15, None, 0.0, WALL)
    assert (step.verb, step.holder) == ("update", "me")
    body = released(lease("me", "3"), "me", WALL)
    assert body is not None and body["spec"]["holderIdentity"] == ""
    assert body["metadata"]["resourceVersion"] == "3"
    assert released(lease("other"), "me", WALL) is None


@pytest.mark.parametrize(("text", "seconds"), [
    ("60", 60.0), ("0", 0.0), ("2.5", 2.5), ("1m30s", 90.0), ("500ms", 0.5), ("1h", 3600.0),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "-1", "1d", "inf", "nan", "1m x", "s"])
def test_durations_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


# -- the controller's pass, on a fake API ----------------------------------------------------------


class FakeKube:
    """What the controller calls, answered from dicts; writes are recorded."""

    def __init__(self, claims: dict[str, dict[str, Any]], pods: list[dict[str, Any]],
                 sets: dict[str, dict[str, Any]]) -> None:
        self.claims, self.pods, self.sets = claims, pods, sets
        self.deleted: list[tuple[str, ...]] = []
        self.events: list[tuple[str, str, str, str]] = []
        self.reads = 0
        self.reachable = True
        self.lease: dict[str, Any] | None = None
        self.conflict_on_delete = False

    def get_pvc(self, namespace: str, name: str) -> dict[str, Any] | None:
        self.reads += 1
        return self.claims.get(name)

    def list_pods(self, namespace: str) -> list[dict[str, Any]]:
        self.reads += 1
        return self.pods

    def get_statefulset(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.sets.get(name)

    def delete_pvc(self, namespace: str, name: str, uid: str, resource_version: str) -> None:
        if self.conflict_on_delete:
            from agent.kube import ApiError  # noqa: PLC0415

            raise ApiError("delete", 409, "precondition failed")
        self.deleted.append(("claim", name, uid, resource_version))

    def delete_pv(self, name: str, uid: str, resource_version: str | None = None) -> None:
        self.deleted.append(("pv", name, uid, resource_version or ""))

    def emit_event(self, obj: dict[str, str], event_type: str, reason: str, message: str,
                   host: str) -> None:
        self.events.append((obj["kind"], obj["name"], event_type, reason))

    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.lease

    def create_lease(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        self.lease = {**body, "metadata": {**body["metadata"], "resourceVersion": "1"}}
        return self.lease

    def replace_lease(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        from agent.kube import ApiError  # noqa: PLC0415

        assert self.lease is not None
        if body["metadata"]["resourceVersion"] != self.lease["metadata"]["resourceVersion"]:
            raise ApiError("update", 409, "the object has been modified")
        version = str(int(self.lease["metadata"]["resourceVersion"]) + 1)
        self.lease = {**body, "metadata": {**body["metadata"], "resourceVersion": version}}
        return self.lease


def controller(kube: FakeKube, nodes: list[dict[str, Any]], pvs: list[dict[str, Any]],
               leader: bool = True, **options: Any) -> Any:
    from agent.remediator import LeaseSettings, Remediator  # noqa: PLC0415

    opts = Options(storage_classes=frozenset({CLASS}), deletion_delay=0.0,
                   max_unavailable=Budget(count=1), **options)
    counted: list[tuple[str, str]] = []
    r = Remediator(kube, opts, "me", LeaseSettings(enabled=not leader), 10.0,  # type: ignore[arg-type]
                   lambda trigger, result: counted.append((trigger, result)))
    r.counted = counted
    r.nodes.load(nodes)
    r.pvs.load(pvs)
    r.pending.load([])
    if leader:
        r.elector.start()  # leader election off: it leads alone
    return r


def lost_node_world(replicas: int = 1) -> tuple[FakeKube, list[dict[str, Any]],
                                                list[dict[str, Any]]]:
    claims = {f"data-web-{i}": {"metadata": {
        "name": f"data-web-{i}", "namespace": "apps", "uid": f"uid-data-web-{i}",
        "resourceVersion": f"4{i}"}} for i in range(replicas)}
    pods = [pod(f"web-{i}", claim_name=f"data-web-{i}") for i in range(replicas)]
    pvs = [pv(f"pv{i}", "n1", claim=f"data-web-{i}") for i in range(replicas)]
    return FakeKube(claims, pods, {"web": STS}), FOUR[1:], pvs


def test_leader_deletes_the_claim_with_preconditions_and_says_so_on_claim_and_owner() -> None:
    kube, nodes, pvs = lost_node_world()
    r = controller(kube, nodes, pvs)
    r.pass_once()
    assert kube.deleted == [("claim", "data-web-0", "uid-data-web-0", "40")]
    assert ("PersistentVolumeClaim", "data-web-0", "Normal", "ClaimRemediated") in kube.events
    assert ("StatefulSet", "web", "Normal", "ClaimRemediated") in kube.events
    assert r.counted == [("node_deleted", "claim_deleted")]
    released_pv = pv("pv0", "n1", phase="Released")
    r.pvs.load([released_pv])
    r.pass_once()
    assert kube.deleted[-1] == ("pv", "pv0", "uid-pv0", "7")
    assert r.counted[-1] == ("node_deleted", "pv_deleted")


def test_a_standby_observes_but_never_writes() -> None:
    kube, nodes, pvs = lost_node_world()
    r = controller(kube, nodes, pvs, leader=False)
    r.pass_once()
    assert kube.deleted == [] and kube.events == [] and kube.reads == 0
    assert r.last is not None and r.last.claims  # it knows what it would do


def test_dry_run_writes_nothing_and_says_it_once() -> None:
    kube, nodes, pvs = lost_node_world()
    r = controller(kube, nodes, pvs, dry_run=True)
    r.pass_once()
    r.pass_once()
    assert kube.deleted == []
    assert kube.events.count(("PersistentVolumeClaim", "data-web-0", "Normal",
                              "RemediationDryRun")) == 1
    assert r.counted == [("node_deleted", "dry_run")]


def test_rate_limit_defers_the_second_claim() -> None:
    kube, nodes, pvs = lost_node_world(replicas=2)
    r = controller(kube, nodes, pvs, max_claims_per_minute=1)
    due = r.pass_once()
    assert [d[1] for d in kube.deleted] == ["data-web-0"]
    assert ("PersistentVolumeClaim", "data-web-1", "Warning", "RemediationRateLimited") in \
        kube.events
    assert due is not None  # woken again when the window frees


def test_guard_blocks_and_warns_on_nodes_and_claims() -> None:
    kube, _, pvs = lost_node_world()
    pvs.append(pv("other", "n2", claim=None, phase="Available"))
    r = controller(kube, FOUR[2:], pvs)  # n1 and n2 both gone, 1 allowed
    r.pass_once()
    assert kube.deleted == []
    assert {e for e in kube.events if e[3] == "RemediationBlocked"} == {
        ("Node", "n1", "Warning", "RemediationBlocked"),
        ("Node", "n2", "Warning", "RemediationBlocked"),
        ("PersistentVolumeClaim", "data-web-0", "Warning", "RemediationBlocked"),
        ("StatefulSet", "web", "Warning", "RemediationBlocked"),
        ("PersistentVolume", "other", "Warning", "RemediationBlocked")}
    assert r.sample().blocked and r.sample().unavailable_nodes == 2


def test_a_conflict_on_delete_is_counted_and_decided_again() -> None:
    kube, nodes, pvs = lost_node_world()
    kube.conflict_on_delete = True
    r = controller(kube, nodes, pvs)
    r.pass_once()
    assert r.counted == [("node_deleted", "conflict")]
    assert not [e for e in kube.events if e[3] == "ClaimRemediated"]


def test_a_waiting_claim_is_read_again_only_after_the_interval_or_a_pod_event() -> None:
    kube, nodes, pvs = lost_node_world()
    kube.pods = [pod(phase="Running", node_name="n1")]  # not evicted yet
    r = controller(kube, nodes, pvs)
    r.pass_once()
    reads = kube.reads
    r.pass_once()
    assert kube.reads == reads  # nothing changed there: no reads
    r.wake("pods-modified", {"metadata": {"namespace": "elsewhere"}})
    r.pass_once()
    assert kube.reads == reads
    kube.pods = [pod()]  # evicted, recreated, Pending
    r.wake("pods-added", {"metadata": {"namespace": "apps"}})
    r.pass_once()
    assert kube.deleted == [("claim", "data-web-0", "uid-data-web-0", "40")]


def test_lease_rounds_on_the_fake_api() -> None:
    import threading  # noqa: PLC0415

    from agent.remediator import LeaderElector, LeaseSettings  # noqa: PLC0415

    kube, _, _ = lost_node_world()
    settings = LeaseSettings(duration=15, renew_deadline=10.0, retry_period=2.0)
    a = LeaderElector(kube, "a", settings, threading.Event(), lambda: None)  # type: ignore[arg-type]
    b = LeaderElector(kube, "b", settings, threading.Event(), lambda: None)  # type: ignore[arg-type]
    a.round()
    assert a.is_leader() and kube.lease is not None
    assert kube.lease["spec"]["holderIdentity"] == "a"
    b.round()
    assert not b.is_leader() and b.holder == "a"
    a.round()  # renewed: a new version
    assert kube.lease["metadata"]["resourceVersion"] == "2"
    a.release()
    assert not a.is_leader() and kube.lease["spec"]["holderIdentity"] == ""
    b.round()
    assert b.is_leader() and kube.lease["spec"]["holderIdentity"] == "b"
    assert kube.lease["spec"]["leaseTransitions"] == 1
