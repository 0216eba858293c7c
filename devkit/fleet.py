"""A fleet of agents against one control plane, and what the apiserver says about them.

`Fleet`: many fake Nodes, each with tmpfs disks under its own discovery dir and its own agent
process. `AuditLog`: the apiserver's audit log of the agents' ServiceAccount only, read as it
grows: every request of every agent with the time the apiserver received it, and the node it
was for (the label selector of its list or watch). `apiserver_requests`: the apiserver's own
`apiserver_request_total`, by verb and resource. Used by benchmarks/fleet.py and its smoke test.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from devkit.agents import LABEL, SAMPLE, Agent, class_config, items, wait_for
from devkit.controlplane import ControlPlane
from devkit.disks import Disks

AGENT_USER = "system:serviceaccount:localpv-agent:localpv-agent"  # daemonset.yaml's account
REQUESTS = "local_volume_provisioner_apiserver_requests_total"  # the agent's own, by method
HOSTNAME = re.compile(r"kubernetes\.io/hostname=([^,]+)")
MANAGED = "app.kubernetes.io/managed-by=localpv-agent"


class Fleet:
    """`nodes` agents, one per Node (created here), each with `volumes` tmpfs mounts."""

    def __init__(self, cluster: ControlPlane, work: Path, kubeconfig: Path, disks: Disks,
                 nodes: Sequence[str], volumes: int, *extra: str) -> None:
        self.cluster = cluster
        self.work = work
        self.kubeconfig = kubeconfig
        self.disks = disks
        self.nodes = list(nodes)
        self.volumes = volumes
        self.extra = extra
        self.agents: list[Agent] = []
        self.started_at = 0.0  # wall time the latest start began

    def prepare(self, add_nodes: bool = True, size_mib: int = 1) -> None:
        """The Nodes (unless they exist), the mounts and each agent's config."""
        for node in self.nodes:
            if add_nodes:
                self.cluster.add_node(node, wait=False)
            mount_dir = self.work / node / "disks"
            for i in range(self.volumes):
                self.disks.tmpfs(mount_dir / f"vol-{i}", size_mib=size_mib)
            class_config(self.work / node / "config.yaml", mount_dir)
        if add_nodes:
            self.cluster.wait_nodes_ready(self.nodes, timeout=60 + len(self.nodes))

    def start(self, prelude: str = "") -> None:
        """Start every agent at once (a `prelude` such as devkit.agents.NO_JITTER for all)."""
        self.agents = [Agent(node, self.work / node / "config.yaml", self.kubeconfig,
                             self.work / node, *self.extra, prelude=prelude)
                       for node in self.nodes]
        self.started_at = time.time()
        for agent in self.agents:
            agent.start()

    def stop(self) -> None:
        """SIGTERM to every agent first, then wait for each: they stop together."""
        for agent in self.agents:
            if agent.proc is not None and agent.proc.poll() is None:
                agent.proc.terminate()
        for agent in self.agents:
            if agent.proc is not None:
                agent.stop()
        self.agents = []

    def wait_ready(self, timeout: float) -> None:
        """Every agent serving /ready; many starting at once on few cores take minutes."""
        deadline = time.monotonic() + timeout
        for agent in self.agents:
            wait_for(lambda a=agent: a.port_file.exists() and a.port_file.read_text(),  # type: ignore[misc]
                     max(1.0, deadline - time.monotonic()), f"agent {agent.node} HTTP port",
                     on_timeout=agent.log, interval=1.0)
            agent.wait_ready(max(1.0, deadline - time.monotonic()))

    def pvs(self) -> dict[str, str]:
        """The agents' PVs that exist: name -> node (its hostname label)."""
        found = items(self.cluster, "/api/v1/persistentvolumes?labelSelector=" + MANAGED)
        return {pv["metadata"]["name"]: pv["metadata"]["labels"]["kubernetes.io/hostname"]
                for pv in found
                if pv["metadata"]["labels"].get("kubernetes.io/hostname") in self.nodes}

    def wait_pvs(self, timeout: float) -> dict[str, str]:
        want = len(self.nodes) * self.volumes

        def complete() -> dict[str, str]:
            found = self.pvs()
            return found if len(found) >= want else {}

        return wait_for(complete, timeout, f"{want} PVs", interval=1.0)

    def request_counts(self) -> dict[str, float]:
        """The agents' own request counters (their /metrics), summed, by method."""
        total: dict[str, float] = defaultdict(float)
        for agent in self.agents:
            _, text = agent.get("/metrics")
            for found in SAMPLE.finditer(text):
                if found[1] == REQUESTS:
                    total[dict(LABEL.findall(found[2] or "")).get("method", "")] += float(found[3])
        return total


def apiserver_requests(text: str) -> dict[tuple[str, str], float]:
    """`apiserver_request_total` from the apiserver's /metrics, summed by (verb, resource)
    (subresources as `resource/sub`). Counted when a request completes: a watch when it ends."""
    total: dict[tuple[str, str], float] = defaultdict(float)
    for found in SAMPLE.finditer(text):
        if found[1] != "apiserver_request_total":
            continue
        labels = dict(LABEL.findall(found[2] or ""))
        resource = labels.get("resource", "")
        if labels.get("subresource"):
            resource += "/" + labels["subresource"]
        total[(labels.get("verb", ""), resource)] += float(found[3])
    return total


@dataclass(frozen=True)
class Request:
    """One request of an agent, as the apiserver's audit log has it."""

    verb: str  # the API verb, lower case: get, list, watch, create, patch, ...
    resource: str
    name: str  # the object's, when the request names one
    node: str  # from the label selector of a list or watch; "" when it has none
    received: float  # wall time the apiserver received it
    code: int  # the response's status; 0 while a watch runs


class AuditLog:
    """The apiserver's audit log of the agents' ServiceAccount alone, at Metadata level."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "audit.log"
        self.policy = directory / "policy.yaml"
        self.policy.write_text(
            "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\n"
            f"rules:\n- level: Metadata\n  users: [\"{AGENT_USER}\"]\n- level: None\n")
        self.requests: dict[str, Request] = {}  # by auditID
        self._offset = 0
        self._partial = b""

    def apiserver_args(self) -> list[str]:
        return [f"--audit-policy-file={self.policy}", f"--audit-log-path={self.path}",
                "--audit-log-maxsize=0", "--audit-log-format=json"]

    def poll(self) -> dict[str, Request]:
        """Read what was appended since the last poll; all requests seen so far."""
        if not self.path.exists():
            return self.requests
        with self.path.open("rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if line.strip():
                self._add(json.loads(line))
        return self.requests

    def _add(self, event: dict[str, object]) -> None:
        if event.get("stage") not in ("ResponseStarted", "ResponseComplete", "Panic"):
            return
        audit_id = str(event["auditID"])
        ref = event.get("objectRef") or {}
        assert isinstance(ref, dict)
        status = event.get("responseStatus") or {}
        assert isinstance(status, dict)
        query = parse_qs(urlsplit(str(event.get("requestURI", ""))).query)
        host = HOSTNAME.search((query.get("labelSelector") or [""])[0])
        done = event["stage"] != "ResponseStarted"
        self.requests[audit_id] = Request(
            verb=str(event.get("verb", "")), resource=str(ref.get("resource", "")),
            name=str(ref.get("name", "")), node=host[1] if host else "",
            received=_wall(str(event["requestReceivedTimestamp"])),
            code=int(status.get("code", 0)) if done else 0)

    def since(self, start: float, until: float = float("inf")) -> list[Request]:
        """The requests received in [start, until), in order."""
        return sorted((r for r in self.poll().values() if start <= r.received < until),
                      key=lambda r: r.received)


def _wall(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def per_bin(times: Iterable[float], start: float, width: float) -> list[int]:
    """How many of `times` fall in each `width`-second bin from `start`."""
    counts: Counter[int] = Counter(int((t - start) // width) for t in times if t >= start)
    return [counts.get(i, 0) for i in range(max(counts, default=-1) + 1)]
