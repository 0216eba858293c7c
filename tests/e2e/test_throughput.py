"""Many volumes at once on a real apiserver: the pass's creates in flight together, and the
apiserver's own 429s (priority and fairness rejecting what exceeds a tiny priority level)
waited out, with exactly one PV and one Provisioned Event per volume in the end."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.volumes import pv_name
from devkit.agents import (
    Agent,
    class_config,
    items,
    metric_sum,
    node_for_test,
    pvs_of,
    wait_for,
)
from devkit.controlplane import ControlPlane
from devkit.disks import disks

CLASS = "local-storage"
VOLUMES = 80
LEVEL = "localpv-e2e-throttled"  # the priority level and flow schema of this test
FLOWCONTROL = "/apis/flowcontrol.apiserver.k8s.io/v1"


@pytest.fixture
def tiny_priority_level(cluster: ControlPlane) -> Iterator[None]:
    """The agent's PV creates go to a priority level of a share of 1 (a few seats out of the
    apiserver's 600) that neither borrows nor queues: what exceeds it is answered 429 with
    Retry-After by the apiserver itself. Removed after the test."""
    level = {"apiVersion": "flowcontrol.apiserver.k8s.io/v1",
             "kind": "PriorityLevelConfiguration", "metadata": {"name": LEVEL},
             "spec": {"type": "Limited", "limited": {
                 "nominalConcurrencyShares": 1, "lendablePercent": 0,
                 "borrowingLimitPercent": 0, "limitResponse": {"type": "Reject"}}}}
    schema = {"apiVersion": "flowcontrol.apiserver.k8s.io/v1", "kind": "FlowSchema",
              "metadata": {"name": LEVEL},
              "spec": {"priorityLevelConfiguration": {"name": LEVEL},
                       "matchingPrecedence": 150,
                       "distinguisherMethod": {"type": "ByUser"},
                       "rules": [{"subjects": [{"kind": "ServiceAccount", "serviceAccount": {
                                     "name": "localpv-agent", "namespace": "localpv-agent"}}],
                                  "resourceRules": [{"verbs": ["create"], "apiGroups": [""],
                                                     "resources": ["persistentvolumes"],
                                                     "clusterScope": True}]}]}}
    for path, body in ((f"{FLOWCONTROL}/prioritylevelconfigurations", level),
                       (f"{FLOWCONTROL}/flowschemas", schema)):
        status, answer = cluster.api("POST", path, body)
        assert status == 201, answer
    try:
        wait_for(lambda: apiserver_metric(cluster, "apiserver_flowcontrol_nominal_limit_seats",
                                          priority_level=LEVEL) > 0,
                 30, "the apiserver to take the priority level in")
        yield
    finally:
        cluster.api("DELETE", f"{FLOWCONTROL}/flowschemas/{LEVEL}")
        cluster.api("DELETE", f"{FLOWCONTROL}/prioritylevelconfigurations/{LEVEL}")


def apiserver_metric(cluster: ControlPlane, name: str, **labels: str) -> float:
    status, text = cluster.api("GET", "/metrics")
    assert status == 200, text
    return metric_sum(str(text), name, **labels)


def test_volumes_mounted_at_once_get_their_pvs_through_the_apiservers_429s(
        cluster: ControlPlane, agent_kubeconfig: Path, tiny_priority_level: None,
        tmp_path: Path) -> None:
    node = node_for_test(cluster, "throughput-429")
    disc = tmp_path / "disks"
    config = class_config(tmp_path / "config.yaml", disc, CLASS)
    rejected = apiserver_metric(cluster, "apiserver_flowcontrol_rejected_requests_total",
                                priority_level=LEVEL)
    with disks(tmp_path) as d:
        for i in range(VOLUMES):  # all there before the agent starts: one pass creates all
            d.tmpfs(disc / f"v{i:03d}", size_mib=1)
        agent = Agent(node, config, agent_kubeconfig, tmp_path, "--api-concurrency", "16",
                      "--resync-period", "3600").start()
        try:
            wanted = {pv_name(f"v{i:03d}", node, CLASS) for i in range(VOLUMES)}
            wait_for(lambda: {p["metadata"]["name"] for p in pvs_of(cluster, node)} == wanted,
                     180, f"{VOLUMES} PVs through the 429s", on_timeout=agent.log)
            # the apiserver itself refused some creates, and the agent sent them again
            assert apiserver_metric(cluster, "apiserver_flowcontrol_rejected_requests_total",
                                    priority_level=LEVEL) > rejected
            assert agent.metric("localpv_agent_api_requests_total", verb="create",
                                result="throttled") > 0
            pvs = pvs_of(cluster, node)
            assert len(pvs) == VOLUMES  # one per volume
            assert len({p["spec"]["local"]["path"] for p in pvs}) == VOLUMES

            def provisioned() -> Counter[str]:
                return Counter(e["involvedObject"]["name"]
                               for e in items(cluster, "/api/v1/events")
                               if e["reason"] == "Provisioned"
                               and e["involvedObject"]["name"] in wanted)

            wait_for(lambda: len(provisioned()) == VOLUMES, 120,
                     "a Provisioned Event per PV", on_timeout=agent.log)
            assert set(provisioned().values()) == {1}
            assert "Traceback" not in agent.log()
        finally:
            took = agent.stop()
            for pv in pvs_of(cluster, node):
                cluster.api("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}")
    assert took < 5, f"SIGTERM took {took:.1f}s"
