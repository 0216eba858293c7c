"""Agents as real processes against the test control plane, and helpers to read the API."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from devkit import REPO, process
from devkit.controlplane import ControlPlane

T = TypeVar("T")


# Passes completed: the count of the pass-duration histogram (agent/metrics.py).
PASSES = "localpv_agent_discovery_pass_duration_seconds_count"
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", re.M)
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

AGENT_KINDS = {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
               "RoleBinding", "StorageClass"}


def node_for_test(cluster: ControlPlane, test_name: str) -> str:
    """A fresh fake Node named after the test, so each test's PVs and Events are its own."""
    name = re.sub(r"[^a-z0-9-]", "-", test_name.lower())[:40].strip("-")
    cluster.add_node(name)
    return name


def build_binaries() -> Path:
    """The control plane binaries (built once, cached): scripts/build-binaries' last line."""
    out = subprocess.run([str(REPO / "scripts" / "build-binaries")], check=True,
                         stdout=subprocess.PIPE, text=True).stdout
    return Path(out.strip().splitlines()[-1])


def install_agent(cluster: ControlPlane, kubeconfig: Path) -> Path:
    """Apply daemonset.yaml's RBAC and StorageClass; return a kubeconfig with a token of the
    agent's ServiceAccount (what the DaemonSet's pods get)."""
    docs = [d for d in yaml.safe_load_all((REPO / "daemonset.yaml").read_text())
            if d and d["kind"] in AGENT_KINDS]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    return write_token_kubeconfig(cluster, kubeconfig)


def class_config(path: Path, mount_dir: Path, cls: str = "local-storage",
                 host_dir: str = "/mnt/disks") -> Path:
    """A one-class agent config file discovering `mount_dir`."""
    path.write_text(yaml.safe_dump({"storageClassMap": {cls: {
        "hostDir": host_dir, "mountDir": str(mount_dir)}}}))
    return path


def fs_and_block_dirs(work: Path, **block: object) -> tuple[Path, Path, Path]:
    """Discovery dirs for a Filesystem class `local-storage` (/mnt/disks) and a Block class
    `local-block` (/mnt/block, with `block`'s extra keys); returns (fs dir, block dir, config)."""
    fs_dir, block_dir = work / "disks", work / "block"
    fs_dir.mkdir()
    block_dir.mkdir()
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump({"storageClassMap": {
        "local-storage": {"hostDir": "/mnt/disks", "mountDir": str(fs_dir)},
        "local-block": {"hostDir": "/mnt/block", "mountDir": str(block_dir),
                        "volumeMode": "Block", **block},
    }}))
    return fs_dir, block_dir, config


def write_token_kubeconfig(cluster: ControlPlane, path: Path, account: str = "localpv-agent",
                           namespace: str = "localpv-agent") -> Path:
    """Ask the TokenRequest API for a ServiceAccount token and wrap it in a kubeconfig."""
    token = cluster.kubectl("create", "token", account, "-n", namespace,
                            "--duration=6h").stdout.strip()
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "agent",
        "clusters": [{"name": "test", "cluster": {
            "server": cluster.server, "certificate-authority": str(cluster.ca_file)}}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "agent", "context": {"cluster": "test", "user": account}}],
    }))
    return path


NO_JITTER = "import random\nrandom.random = lambda: 0.0\n"
"""For benchmarks only, never for a real agent: a `prelude` that makes every random draw of
the agent's process 0, run before the agent's modules are imported (their `rand` defaults are
bound then). agent.backoff then waits each backoff delay in full (never shortened) and each
resync period is exactly the minimum: agents that fail together retry together. The baseline
that shows what the jitter is worth."""

RUN_MAIN = "import sys\nfrom agent.cli import main\nsys.exit(main(sys.argv[1:]))\n"


class Agent:
    """`localpv-agent run` for one node, logging to a file, with a random HTTP port.

    `prelude`: Python run in the agent's process before the agent's own modules (e.g.
    NO_JITTER); the agent then starts as `python -c` instead of `python -m agent.cli`."""

    def __init__(self, node: str, config: Path, kubeconfig: Path, workdir: Path,
                 *extra: str, wrapper: Sequence[str] = (), prelude: str = "") -> None:
        self.node = node
        self.wrapper = wrapper  # a command that execs the agent, e.g. prlimit
        self.prelude = prelude
        self.config = config
        self.kubeconfig = kubeconfig
        self.workdir = workdir
        self.extra = extra
        self.log_path = workdir / f"agent-{node}-{time.monotonic_ns()}.log"
        self.port_file = workdir / f"agent-{node}.port"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Agent:
        self.port_file.unlink(missing_ok=True)
        main = ["-c", self.prelude + RUN_MAIN] if self.prelude else ["-m", "agent.cli"]
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*self.wrapper, sys.executable, *main, "run",
                 "--config", str(self.config),
                 "--node-name", self.node, "--kubeconfig", str(self.kubeconfig),
                 "--listen-address", "127.0.0.1:0", "--port-file", str(self.port_file),
                 "--resync-period", "3600",
                 "--state-dir", str(self.state_dir), *self.extra],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                env={k: v for k, v in os.environ.items() if k != "MY_NODE_NAME"},
            )
        return self

    @property
    def state_dir(self) -> Path:
        """Its --state-dir (unless `extra` names another)."""
        return self.workdir / f"state-{self.node}"

    def dirty_paths(self) -> set[str]:
        """Volumes it recorded as holding a tenant's data (its records in the state dir)."""
        return {str(json.loads(f.read_text())["path"])
                for f in (self.state_dir / "dirty").glob("*.json")}

    @property
    def port(self) -> int:
        return int(wait_for(lambda: self.port_file.exists() and self.port_file.read_text(),
                            60, f"agent {self.node} HTTP port", on_timeout=self.log))

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the series of `name` carrying `labels` (0 when there is none)."""
        status, text = self.get("/metrics")
        assert status == 200, f"/metrics answered {status}: {text[:500]}"
        return metric_sum(text, name, **labels)

    def passes(self) -> float:
        """Discovery passes completed (failed passes are not counted)."""
        return self.metric(PASSES)

    def wait_passes(self, count: int = 2, timeout: float = 60) -> None:
        """Wait until `count` more passes have completed, each asked for by a wake-up that
        changes nothing (the discovery dirs' times touched), so a long resync period does not
        matter. Called after an action, 2 passes mean one pass began after it: a check that
        something did NOT happen is then made on what the agent saw, not after a guessed sleep.
        """
        target = self.passes()
        for done in range(1, count + 1):
            target += 1
            self.poke()
            wait_for(lambda: self.passes() >= target, timeout,  # noqa: B023 (waited for here)
                     f"pass {done} of {count} of agent {self.node}", on_timeout=self.log)

    def poke(self) -> None:
        """Wake the agent without changing what it sees: touch each discovery dir of its
        config (an inotify IN_ATTRIB on the dir; in poll mode passes come anyway)."""
        if self.config.is_dir():  # a mounted ConfigMap: a file per key
            key = self.config / "storageClassMap"
            classes = yaml.safe_load(key.read_text()) if key.exists() else {}
        else:
            classes = (yaml.safe_load(self.config.read_text()) or {}).get("storageClassMap")
        for cls in (classes or {}).values():
            mount_dir = Path(cls.get("mountDir", ""))
            if mount_dir.is_dir():
                os.utime(mount_dir)

    def wait_ready(self, timeout: float = 90) -> None:
        wait_for(lambda: self.get("/ready")[0] == 200, timeout, f"agent {self.node} ready",
                 on_timeout=self.log)

    def stop(self) -> float:
        """SIGTERM, and how long the agent took to exit."""
        assert self.proc is not None
        started = time.monotonic()
        process.stop(self.proc, timeout=15)
        return time.monotonic() - started

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def wait_for(check: Callable[[], T], timeout: float, what: str,
             on_timeout: Callable[[], str] | None = None, interval: float = 0.2) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{on_timeout()}" if on_timeout else ""
            raise AssertionError(f"timed out after {timeout}s waiting for {what}{extra}")
        time.sleep(interval)


def metric_sum(text: str, name: str, **labels: str) -> float:
    """In Prometheus text `text`: the sum of the samples of `name` that carry `labels`."""
    total = 0.0
    for found in SAMPLE.finditer(text):
        if found[1] != name:
            continue
        have = dict(LABEL.findall(found[2] or ""))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(found[3])
    return total


def api_get(cluster: ControlPlane, path: str) -> dict[str, Any] | None:
    """GET as admin: the object, or None when it does not exist. A loaded machine sometimes
    drops a request (status 0) or the apiserver answers 5xx: asked again, never read as gone."""
    deadline = time.monotonic() + 30
    while True:
        status, body = cluster.api("GET", path)
        if status == 200 and isinstance(body, dict):
            return body
        if status == 404:
            return None
        assert time.monotonic() < deadline, f"GET {path}: HTTP {status}: {body}"
        time.sleep(0.5)


def items(cluster: ControlPlane, path: str) -> list[dict[str, Any]]:
    body = api_get(cluster, path)
    assert body is not None, path
    return list(body.get("items") or [])


def pvs_of(cluster: ControlPlane, node: str) -> list[dict[str, Any]]:
    """PVs whose nodeAffinity pins them to `node` (by hostname label value)."""
    found = []
    for pv in items(cluster, "/api/v1/persistentvolumes"):
        terms = pv["spec"].get("nodeAffinity", {}).get("required", {}).get("nodeSelectorTerms", [])
        values = {v for t in terms for e in t.get("matchExpressions", []) for v in e["values"]}
        if node in values:
            found.append(pv)
    return found


def bind_claim(cluster: ControlPlane, pv: dict[str, Any], claim: str,
               timeout: float = 60.0) -> None:
    """A claim in `default` pre-bound to `pv` (its class and mode): the PV controller binds it
    at once; returns when the PV is Bound."""
    name = pv["metadata"]["name"]
    status, body = cluster.api("POST", "/api/v1/namespaces/default/persistentvolumeclaims", {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": claim},
        "spec": {"storageClassName": pv["spec"]["storageClassName"],
                 "volumeMode": pv["spec"].get("volumeMode", "Filesystem"),
                 "accessModes": ["ReadWriteOnce"], "volumeName": name,
                 "resources": {"requests": {"storage": "1Mi"}}},
    })
    assert status == 201, body

    def phase() -> str | None:
        status, body = cluster.api("GET", f"/api/v1/persistentvolumes/{name}")
        return (body.get("status") or {}).get("phase") if status == 200 else None

    wait_for(lambda: phase() == "Bound", timeout, f"claim {claim} bound to PV {name}")


def events_for(cluster: ControlPlane, kind: str, name: str) -> list[dict[str, Any]]:
    return [e for e in items(cluster, "/api/v1/events")
            if e["involvedObject"].get("kind") == kind and e["involvedObject"]["name"] == name]


def wait_events(cluster: ControlPlane, kind: str, name: str, reason: str, timeout: float,
                on_timeout: Callable[[], str] | None = None) -> list[dict[str, Any]]:
    """The Events of `reason` about one object, once there is at least one. The agent posts
    Events from a queue of their own, after the writes they are about (and behind them while
    a pass writes), so an Event can lag the object change that a test saw first."""
    return wait_for(lambda: [e for e in events_for(cluster, kind, name) if e["reason"] == reason],
                    timeout, f"a {reason} Event on {kind} {name}", on_timeout)
