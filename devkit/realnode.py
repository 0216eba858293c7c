"""A real node beside the test control plane: containerd + runc + a real kubelet.

Where ``ControlPlane`` lets KWOK fake every kubelet, ``RealNode`` runs one for real, so pods
really start: the agent's DaemonSet from ``daemonset.yaml`` (deployed through a kustomize
overlay), and consumers writing to the PVs it creates. Everything lives under
``<workdir>/node`` and is removed by ``stop_node``, which needs no live object (``scripts/cluster
down`` calls it after ``up`` has exited)::

    cp = ControlPlane(workdir, bin_dir, detach=True)
    cp.start(nodes=0)
    node = RealNode(cp, images)          # images: scripts/build-images' output
    node.start()                          # containerd, images imported, kubelet, Node Ready
    node.deploy_agent()                   # kubectl apply -k, DaemonSet Ready
    ...
    stop_node(cp.workdir)                 # before cp.stop()

What this environment forces, and how it is met (root is required):

- The machine lacks CAP_SYS_RESOURCE: runc fails every sandbox ("can't get final child's PID
  from pipe") unless containerd's CRI has ``restrict_oom_score_adj = true``.
- cgroup v1 (``failCgroupV1: false``), the cgroupfs driver, swap allowed. The kubelet's cgroup
  root is a new cgroup below this process's own, in every hierarchy; ``stop_node`` removes it.
- The kubelet writes host sysctls (``kernel.panic_on_oops``, ``vm.overcommit_memory``, ...). It
  runs in its own mount namespace where those ``/proc/sys`` files are files of the node dir,
  bound over the real ones: the host's values never change.
- The kubelet's root dir and the disks dir are ``rshared`` bind mounts: volume mounts the
  kubelet makes in its namespace reach containerd's, and disks mounted on the host later reach
  the kubelet and (``HostToContainer``) the agent's container.
- No kube-proxy: the agent reaches the API with ``hostNetwork`` and
  ``KUBERNETES_SERVICE_HOST/PORT`` pointing at the apiserver on 127.0.0.1.
- CNI: a bridge with its own interface and a connected route (so nothing sent to a pod address
  can leave the machine), no gateway, no masquerade: no iptables rule, no forwarding sysctl.
- Nothing can be pulled: the pause and agent images are imported from archives made by
  ``scripts/build-images`` with ``ctr -n k8s.io images import``.

Only the standard library (and PyYAML, for the overlay) is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from devkit import REPO
from devkit.controlplane import ControlPlane, ControlPlaneError, _die_with_parent

__all__ = [
    "NODE_NAME",
    "Images",
    "RealNode",
    "host_snapshot",
    "node_pids",
    "overlay_files",
    "stop_node",
]

# The kubelet refuses a loopback --node-ip, but takes the address of a --hostname-override that
# is an IP as is: so the Node is named 127.0.0.1, and everything that connects to it (the
# apiserver for logs and exec, the kubelet's probes of hostNetwork pods) connects to 127.0.0.1.
NODE_NAME = "127.0.0.1"
AGENT_NAMESPACE = "localpv-agent"
AGENT_NAME = "localpv-agent"
BASE_IMAGE = "ghcr.io/localpv-agent/localpv-agent"
CNI_BIN_DIR = Path("/usr/lib/cni")
CNI_CACHE = Path("/var/lib/cni")  # libcni's result cache: not configurable in containerd 1.6
CGROUP_V1_CONTROLLERS = frozenset({
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "hugetlb",
    "net_cls", "net_prio", "perf_event", "rdma", "misc"})
# What the kubelet writes under /proc/sys at start (setupKernelTunables); bound over in its
# mount namespace so the host keeps its values.
KUBELET_SYSCTLS = (
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
)
# Host sysctls a node could change; recorded by `up`, compared (and restored) by `down`.
WATCHED_SYSCTLS = (
    *KUBELET_SYSCTLS,
    "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding",
    "net/ipv4/conf/all/route_localnet",
)
NODE_COMPONENTS = ("containerd", "kubelet")


class RealNodeError(ControlPlaneError):
    """The real node could not be started or deployed to."""


@dataclass(frozen=True)
class Images:
    """The images a node needs: names and docker-archive files (scripts/build-images)."""

    pause: str
    pause_archive: Path
    agent: str
    agent_archive: Path

    @classmethod
    def parse(cls, output: str) -> Images:
        """Read ``scripts/build-images``' stdout: ``<kind> <name> <archive>`` lines."""
        found: dict[str, tuple[str, Path]] = {}
        for line in output.splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] in {"pause", "agent"}:
                found[parts[0]] = (parts[1], Path(parts[2]))
        if set(found) != {"pause", "agent"}:
            raise RealNodeError(f"unexpected scripts/build-images output: {output!r}")
        return cls(found["pause"][0], found["pause"][1], found["agent"][0], found["agent"][1])

    @classmethod
    def build(cls, image: str | None = None) -> Images:
        """Run ``scripts/build-images`` (fast when cached) and parse what it printed."""
        env = dict(os.environ)
        if image:
            env["IMAGE"] = image
        proc = subprocess.run([str(REPO / "scripts" / "build-images")], capture_output=True,
                              text=True, env=env, check=False, timeout=3600)
        if proc.returncode != 0:
            raise RealNodeError(f"scripts/build-images failed:\n{proc.stderr[-4000:]}")
        return cls.parse(proc.stdout)


# ------------------------------------------------------------------------------ layout


class _Layout:
    """Paths under ``<workdir>/node`` (short: unix socket paths are limited to 107 bytes)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir).resolve()
        self.root = self.workdir / "node"
        self.pids = self.root / "pids"
        self.logs = self.root / "logs"
        self.state_file = self.root / "state.json"
        self.containerd = self.root / "containerd"
        self.sock = self.containerd / "c.sock"
        self.kubelet = self.root / "kubelet"
        self.disks = self.root / "disks"
        self.agent_state = self.root / "agent-state"
        self.pod_logs = self.root / "pod-logs"
        self.cni_conf = self.root / "cni" / "net.d"
        self.cni_data = self.root / "cni" / "ipam"
        self.sysctl = self.root / "sysctl"
        self.pki = self.root / "pki"
        self.overlay = self.root / "overlay"

    @property
    def tag(self) -> str:
        """A short id of this workdir, for host-wide names (cgroup, bridge)."""
        return hashlib.sha256(str(self.workdir).encode()).hexdigest()[:8]

    @property
    def bridge(self) -> str:
        return f"lpv{self.tag}"  # IFNAMSIZ: at most 15 bytes

    @property
    def network(self) -> str:
        """The CNI network's name (it prefixes this node's entries in the CNI cache)."""
        return f"localpv-{self.tag}"

    @property
    def subnet_octet(self) -> int:
        return 16 + int(self.tag, 16) % 200


# ------------------------------------------------------------------------- host helpers


def _run(*args: str, check: bool = True, timeout: float = 120.0,
         input: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, check=False, timeout=timeout,
                          input=input)
    if check and proc.returncode != 0:
        raise RealNodeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (space, tab, newline, backslash)."""
    return (field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n")
            .replace("\\134", "\\"))


def _mountpoints() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return [_unescape(line.split()[4]) for line in f]


def _under(path: str, root: Path) -> bool:
    return path == str(root) or path.startswith(str(root) + "/")


def _sysctl_read(name: str) -> str | None:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return None


def _cgroup_hierarchies() -> dict[str, Path]:
    """Mounted cgroup hierarchies: their controllers (``cgroup2`` for v2) -> mount point."""
    found: dict[str, Path] = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fstype, _source, super_options = right.split()[:3]
            mountpoint = Path(_unescape(left.split()[4]))
            if fstype == "cgroup2":
                found["cgroup2"] = mountpoint
            elif fstype == "cgroup":
                controllers = [o for o in super_options.split(",")
                               if o in CGROUP_V1_CONTROLLERS or o.startswith("name=")]
                if controllers:
                    found[",".join(controllers)] = mountpoint
    return found


def _own_cgroup_base() -> str:
    """This process's deepest cgroup path in any v1 hierarchy (the sandbox it is put in)."""
    deepest = "/"
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers and path.count("/") > deepest.count("/") and path != "/":
            deepest = path
    return deepest


def _proc_start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] == "Z" else fields[19]


def node_pids(workdir: Path) -> dict[str, int]:
    """The node's components (containerd, kubelet) recorded in ``<workdir>/node/pids`` that
    still run."""
    found: dict[str, int] = {}
    piddir = _Layout(workdir).pids
    for pidfile in sorted(piddir.glob("*.pid")) if piddir.is_dir() else []:
        with contextlib.suppress(OSError, ValueError):
            pid_text, start = pidfile.read_text().split()
            if _proc_start_time(int(pid_text)) == start:
                found[pidfile.stem] = int(pid_text)
    return found


def _processes_referring_to(root: Path) -> list[int]:
    """Pids whose command line names a path under ``root`` (shims, containers' runc, ...)."""
    needle = str(root).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
    return found


def _wait(what: str, check: Callable[[], bool], timeout: float,
          on_timeout: Callable[[], str] | None = None, interval: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            extra = f"\n{on_timeout()}" if on_timeout else ""
            raise RealNodeError(f"timed out after {timeout:.0f}s waiting for {what}{extra}")
        time.sleep(interval)


def host_snapshot(workdir: Path) -> dict[str, Any]:
    """What a real node in ``workdir`` could leave behind on the host, as comparable data.

    Scoped to this node (its paths, names, cgroups and sockets) plus host-wide settings it
    could change (watched sysctls, iptables rules, well-known runtime directories), so that
    other work on the same machine does not disturb the comparison.
    """
    layout = _Layout(workdir)
    hierarchies = _cgroup_hierarchies()
    snapshot: dict[str, Any] = {
        "mounts": sorted(m for m in _mountpoints() if _under(m, layout.workdir)),
        "loop devices": sorted(
            line for line in _run("losetup", "--list", "--noheadings", "--output",
                                  "NAME,BACK-FILE", check=False).stdout.splitlines()
            if str(layout.workdir) in line),
        "processes": sorted(_processes_referring_to(layout.workdir)),
        "sysctls": {name: _sysctl_read(name) for name in WATCHED_SYSCTLS},
        "cgroups": sorted(str(p) for h in hierarchies.values()
                          for p in h.rglob(f"localpv-{layout.tag}*")),
        "links": sorted(n for n in os.listdir("/sys/class/net") if n.startswith(layout.bridge)),
        "runtime dirs": sorted(
            str(p) for p in (Path("/run/containerd"), Path("/var/run/netns"),
                             Path("/var/lib/cni"), Path("/var/lib/kubelet"),
                             Path("/var/lib/containerd"), Path("/var/log/pods"),
                             Path("/var/log/containers"), Path("/etc/cni"), Path("/opt/cni"),
                             Path("/opt/containerd"), Path("/etc/kubernetes"),
                             Path("/run/kubernetes"))
            if p.exists()),
    }
    for tool in ("iptables-save", "ip6tables-save"):
        if shutil.which(tool):
            # Rules, and chains without their packet counters.
            lines = _run(tool, check=False).stdout.splitlines()
            snapshot[tool] = sorted(" ".join(x.split()[:2]) if x.startswith(":") else x
                                    for x in lines if x and not x.startswith("#"))
    return snapshot


# ------------------------------------------------------------------------------ overlay


def _split_image(image: str) -> tuple[str, str]:
    """``name[:tag]`` -> (name, tag); a registry port is not a tag."""
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon + 1:]
    return image, "latest"


def _index(items: Sequence[dict[str, Any]], name: str, what: str) -> int:
    for i, item in enumerate(items):
        if item.get("name") == name:
            return i
    raise RealNodeError(f"daemonset.yaml has no {what} named {name}")


def overlay_files(*, base_dir: Path, overlay_dir: Path, image: str, api_port: int,
                  metrics_port: int, disks_dir: Path, state_dir: Path) -> dict[str, str]:
    """The kustomize overlay deploying ``base_dir``'s ``daemonset.yaml`` on the real node.

    It changes only what this environment forces, each with a JSON patch whose ``test`` ops
    fail the build if ``daemonset.yaml`` changed shape:

    - the image (nothing can be pulled: the locally built one), also for cleaning Jobs;
    - ``hostNetwork`` and ``KUBERNETES_SERVICE_HOST/PORT`` (no kube-proxy: the apiserver is
      reachable at 127.0.0.1 only from the host's network namespace);
    - the metrics port (with ``hostNetwork`` it is a host port: a free one, not 8080);
    - host paths under the node dir: the discovery dir (and the ConfigMap's ``hostDir``, the
      host path that goes into the PVs) and the agent's state dir.

    Returns file name -> content.
    """
    docs = [d for d in yaml.safe_load_all((base_dir / "daemonset.yaml").read_text()) if d]
    ds = next(d for d in docs if d["kind"] == "DaemonSet")
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    pod = ds["spec"]["template"]["spec"]
    container = pod["containers"][0]
    old_port = container["ports"][0]["containerPort"]
    args = [a.replace(f":{old_port}", f":{metrics_port}") for a in container["args"]]
    env = container["env"]
    job_image = _index(env, "JOB_CONTAINER_IMAGE", "env var")
    volumes = pod["volumes"]
    disks = _index(volumes, "local-disks", "volume")
    state = _index(volumes, "state", "volume")
    c0 = "/spec/template/spec/containers/0"
    ds_ops: list[dict[str, Any]] = [
        {"op": "test", "path": f"{c0}/name", "value": container["name"]},
        {"op": "replace", "path": f"{c0}/args", "value": args},
        {"op": "test", "path": f"{c0}/ports/0/name", "value": "metrics"},
        {"op": "replace", "path": f"{c0}/ports/0/containerPort", "value": metrics_port},
        {"op": "replace", "path": "/spec/template/metadata/annotations/prometheus.io~1port",
         "value": str(metrics_port)},
        {"op": "add", "path": "/spec/template/spec/hostNetwork", "value": True},
        {"op": "add", "path": "/spec/template/spec/dnsPolicy", "value": "ClusterFirstWithHostNet"},
        {"op": "test", "path": f"{c0}/env/{job_image}/name", "value": "JOB_CONTAINER_IMAGE"},
        {"op": "replace", "path": f"{c0}/env/{job_image}/value", "value": image},
        {"op": "add", "path": f"{c0}/env/-",
         "value": {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"}},
        {"op": "add", "path": f"{c0}/env/-",
         "value": {"name": "KUBERNETES_SERVICE_PORT", "value": str(api_port)}},
        {"op": "test", "path": f"/spec/template/spec/volumes/{disks}/name", "value": "local-disks"},
        {"op": "replace", "path": f"/spec/template/spec/volumes/{disks}/hostPath/path",
         "value": str(disks_dir)},
        {"op": "test", "path": f"/spec/template/spec/volumes/{state}/name", "value": "state"},
        {"op": "replace", "path": f"/spec/template/spec/volumes/{state}/hostPath/path",
         "value": str(state_dir)},
    ]
    old_disks = volumes[disks]["hostPath"]["path"]
    classes = yaml.safe_load(cm["data"]["storageClassMap"])
    for cls in classes.values():
        if cls.get("hostDir") == old_disks:
            cls["hostDir"] = str(disks_dir)
    cm_ops = [{"op": "replace", "path": "/data/storageClassMap",
               "value": yaml.safe_dump(classes, sort_keys=False)}]
    name, tag = _split_image(image)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(base_dir, overlay_dir)],
        "images": [{"name": BASE_IMAGE, "newName": name, "newTag": tag}],
        "patches": [
            {"path": "daemonset-patch.yaml",
             "target": {"kind": "DaemonSet", "name": ds["metadata"]["name"]}},
            {"path": "configmap-patch.yaml",
             "target": {"kind": "ConfigMap", "name": cm["metadata"]["name"]}},
        ],
    }
    header = ("# Generated by devkit/realnode.py for the real test node: daemonset.yaml,\n"
              "# changed only where this environment forces it.\n")
    return {
        "kustomization.yaml": header + yaml.safe_dump(kustomization, sort_keys=False),
        "daemonset-patch.yaml": yaml.safe_dump(ds_ops, sort_keys=False),
        "configmap-patch.yaml": yaml.safe_dump(cm_ops, sort_keys=False),
    }


# ---------------------------------------------------------------------------- the node


class RealNode:
    """containerd and a kubelet registering Node ``name`` with the control plane ``cp``.

    Args:
        cp: A started ControlPlane (its CA signs the kubelet's client certificate).
        images: The pause and agent images to import (``Images.build()``).
        name: The Node's name (and ``kubernetes.io/hostname`` label).
        detach: Like ``ControlPlane``'s: when False, the processes die with this one.
    """

    def __init__(self, cp: ControlPlane, images: Images, name: str = NODE_NAME, *,
                 detach: bool = False) -> None:
        self.cp = cp
        self.images = images
        self.name = name
        self.detach = detach
        self.paths = _Layout(cp.workdir)
        self.kubelet_port = 0
        self.metrics_port = 0

    # ------------------------------------------------------------------ public

    @property
    def disks_dir(self) -> Path:
        """The discovery dir on the host (``/mnt/disks`` in the agent's container)."""
        return self.paths.disks

    @property
    def state(self) -> dict[str, Any]:
        """What ``start`` recorded (ports, cgroup root, host settings before it)."""
        loaded: dict[str, Any] = json.loads(self.paths.state_file.read_text())
        return loaded

    def start(self, timeout: float = 300.0) -> None:
        """Start containerd, import the images, start the kubelet, wait for Node Ready.

        On failure everything started is undone (logs are kept) and RealNodeError carries
        the log tails.
        """
        self._preflight()
        deadline = time.monotonic() + timeout
        try:
            self._prepare_host()
            self._start_containerd(deadline)
            self._import_images()
            self._start_kubelet()
            _wait(f"Node {self.name} Ready", lambda: self.cp.node_ready(self.name),
                  max(deadline - time.monotonic(), 1.0), self.log_tails)
        except BaseException as exc:
            tails = self.log_tails()
            stop_node(self.cp.workdir, keep_logs=True)
            if isinstance(exc, RealNodeError):
                raise RealNodeError(f"{exc}\n{tails}") from None
            raise

    def deploy_agent(self, timeout: float = 300.0) -> float:
        """``kubectl apply -k`` the overlay of daemonset.yaml; wait until the DaemonSet is
        Ready. Returns the seconds from apply to Ready."""
        self.metrics_port = _free_port()
        port = int(self.cp.server.rsplit(":", 1)[1])
        files = overlay_files(base_dir=REPO, overlay_dir=self.paths.overlay,
                              image=self.images.agent, api_port=port,
                              metrics_port=self.metrics_port, disks_dir=self.paths.disks,
                              state_dir=self.paths.agent_state)
        self.paths.overlay.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (self.paths.overlay / name).write_text(text)
        self._record(metrics_port=self.metrics_port)
        started = time.monotonic()
        self.cp.kubectl("apply", "-k", str(self.paths.overlay), timeout=120)
        wait_daemonset_ready(self.cp, timeout, self.log_tails)
        return time.monotonic() - started

    def ctr(self, *args: str, check: bool = True,
            timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        """Run ``ctr`` against this node's containerd, in the CRI's namespace."""
        return _run("ctr", "--address", str(self.paths.sock), "--namespace", "k8s.io", *args,
                    check=check, timeout=timeout)

    def log_tails(self, lines: int = 30) -> str:
        """The end of containerd's and the kubelet's logs."""
        out = []
        for name in NODE_COMPONENTS:
            path = self.paths.logs / f"{name}.log"
            if path.exists():
                text = path.read_text(errors="replace").splitlines()[-lines:]
                out += [f"==> {path} <==", *text]
        return "\n".join(out)

    # ---------------------------------------------------------------- internals

    def _preflight(self) -> None:
        if os.geteuid() != 0:
            raise RealNodeError("a real node needs root (mounts, cgroups, containerd)")
        for hidden in ("/var/lib", "/var/log"):
            if _under(str(self.paths.workdir), Path(hidden)):
                raise RealNodeError(f"the work dir may not be under {hidden}: the kubelet sees "
                                    "an empty one")
        missing = [t for t in ("containerd", "ctr", "runc", "unshare", "mount", "ip")
                   if shutil.which(t) is None]
        missing += [str(p) for p in (CNI_BIN_DIR / "bridge", CNI_BIN_DIR / "loopback",
                                     CNI_BIN_DIR / "host-local") if not p.exists()]
        if not os.access(self.cp.binary("kubelet"), os.X_OK):
            missing.append(str(self.cp.binary("kubelet")))
        if missing:
            raise RealNodeError(f"missing: {', '.join(missing)} (run scripts/install-system-deps"
                                " and scripts/build-binaries)")
        if node_pids(self.cp.workdir):
            raise RealNodeError(f"a real node already runs in {self.paths.root}")

    def _record(self, **values: Any) -> None:
        state = json.loads(self.paths.state_file.read_text()) if (
            self.paths.state_file.exists()) else {}
        state.update(values)
        self.paths.state_file.write_text(json.dumps(state, indent=1, sort_keys=True))

    def _prepare_host(self) -> None:
        p = self.paths
        if p.root.exists():
            stop_node(p.workdir)
        for d in (p.pids, p.logs, p.containerd, p.kubelet, p.disks, p.agent_state, p.pod_logs,
                  p.cni_conf, p.cni_data, p.sysctl, p.pki):
            d.mkdir(parents=True, exist_ok=True)
        # Record the host's state first: `down` restores what it finds changed.
        self._record(
            sysctls={n: _sysctl_read(n) for n in WATCHED_SYSCTLS},
            # Host dirs containerd creates at fixed paths (shim sockets, CNI result cache).
            created_dirs=[str(d) for d in (Path("/run/containerd"), Path("/run/containerd/s"),
                                           CNI_CACHE, CNI_CACHE / "results") if not d.exists()],
            cgroup_root=f"{_own_cgroup_base().rstrip('/')}/localpv-{p.tag}",
            bridge=p.bridge,
        )
        # Shared mounts: kubelet volume mounts reach containerd; later disk mounts reach both.
        for d in (p.kubelet, p.disks):
            _run("mount", "--bind", str(d), str(d))
            _run("mount", "--make-rshared", str(d))
        self._make_cgroup_root(self.state["cgroup_root"])
        # The kubelet's sysctl writes land in these files.
        for name in KUBELET_SYSCTLS:
            value = _sysctl_read(name)
            if value is not None:
                (p.sysctl / name.replace("/", ".")).write_text(value + "\n")
        # A bridge with an address: pod addresses have a connected route on this host.
        net = f"10.{p.subnet_octet}.{int(p.tag[:2], 16)}"
        _run("ip", "link", "add", p.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{net}.1/24", "dev", p.bridge)
        _run("ip", "link", "set", p.bridge, "up")
        (p.cni_conf / "10-localpv.conflist").write_text(json.dumps({
            "cniVersion": "1.0.0",
            "name": p.network,
            "plugins": [
                {"type": "bridge", "bridge": p.bridge, "isGateway": False, "ipMasq": False,
                 "hairpinMode": False,
                 "ipam": {"type": "host-local", "dataDir": str(p.cni_data),
                          "ranges": [[{"subnet": f"{net}.0/24", "rangeStart": f"{net}.10"}]]}},
                {"type": "loopback"},
            ],
        }, indent=1))
        self._make_kubelet_pki()

    def _make_cgroup_root(self, root: str) -> None:
        """Create the kubelet's cgroup root in every hierarchy (cpuset needs cpus and mems)."""
        created: list[str] = []
        for mount in _cgroup_hierarchies().values():
            path = mount
            for part in root.strip("/").split("/"):
                parent, path = path, path / part
                if path.exists():
                    continue
                path.mkdir()
                created.append(str(path))
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    if (parent / knob).exists():
                        (path / knob).write_text((parent / knob).read_text())
        self._record(created_cgroups=created)

    def _make_kubelet_pki(self) -> None:
        ca, ca_key = self.cp.ca_file, self.cp.pki_dir / "ca.key"
        pki = self.paths.pki
        (pki / "ext.cnf").write_text(
            "[req]\ndistinguished_name = dn\n[dn]\n"
            "[client]\nbasicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature, keyEncipherment\n"
            "extendedKeyUsage = clientAuth\n")
        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        for cmd in (
            ("openssl", "req", "-new", *ec, "-config", "ext.cnf", "-keyout", "kubelet.key",
             "-out", "kubelet.csr", "-subj", f"/O=system:nodes/CN=system:node:{self.name}"),
            ("openssl", "x509", "-req", "-in", "kubelet.csr", "-CA", str(ca), "-CAkey",
             str(ca_key), "-CAcreateserial", "-CAserial", "ca.srl", "-days", "365", "-sha256",
             "-extfile", "ext.cnf", "-extensions", "client", "-out", "kubelet.crt"),
        ):
            proc = subprocess.run(cmd, cwd=pki, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RealNodeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        (pki / "kubelet.key").chmod(0o600)
        kubeconfig = {
            "apiVersion": "v1", "kind": "Config", "current-context": "kubelet",
            "clusters": [{"name": "localpv", "cluster": {
                "server": self.cp.server, "certificate-authority": str(ca)}}],
            "users": [{"name": "kubelet", "user": {
                "client-certificate": str(pki / "kubelet.crt"),
                "client-key": str(pki / "kubelet.key")}}],
            "contexts": [{"name": "kubelet", "context": {"cluster": "localpv",
                                                         "user": "kubelet"}}],
        }
        (pki / "kubelet.kubeconfig").write_text(yaml.safe_dump(kubeconfig))

    def _spawn(self, name: str, args: Sequence[str]) -> None:
        log_path = self.paths.logs / f"{name}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                list(args), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                cwd=self.paths.root, start_new_session=True,
                preexec_fn=None if self.detach else _die_with_parent,  # noqa: PLW1509
            )
        start = _proc_start_time(proc.pid)
        (self.paths.pids / f"{name}.pid").write_text(f"{proc.pid} {start}\n")

    def _start_containerd(self, deadline: float) -> None:
        p = self.paths
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        config = f"""version = 2
root = "{p.containerd / 'root'}"
state = "{p.containerd / 'state'}"
# Nothing outside the node dir: no /opt/containerd, no snapshotters this host cannot use.
disabled_plugins = ["io.containerd.internal.v1.opt", "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{p.sock}"
[ttrpc]
  address = "{p.sock}.ttrpc"

[{cri}]
  sandbox_image = "{self.images.pause}"
  # No CAP_SYS_RESOURCE here: without this runc fails every sandbox.
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  [{cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [{cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [{cri}.containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{p.containerd / 'runc'}"
  [{cri}.cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{p.cni_conf}"
"""
        (p.containerd / "config.toml").write_text(config)
        self._spawn("containerd", ["containerd", "--config", str(p.containerd / "config.toml"),
                                   "--log-level", "warn"])
        _wait("containerd", lambda: self.ctr("version", check=False).returncode == 0,
              max(deadline - time.monotonic(), 1.0), self.log_tails)

    def _import_images(self) -> None:
        for archive in (self.images.pause_archive, self.images.agent_archive):
            self.ctr("images", "import", "--snapshotter", "overlayfs", str(archive),
                     timeout=600)

    def _start_kubelet(self) -> None:
        p = self.paths
        self.kubelet_port = _free_port()
        config = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": "127.0.0.1",
            "port": self.kubelet_port,
            "readOnlyPort": 0,
            "healthzPort": 0,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.cp.ca_file)}},
            "authorization": {"mode": "Webhook"},
            "containerRuntimeEndpoint": f"unix://{p.sock}",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.state["cgroup_root"],
            "cgroupsPerQOS": True,
            "failCgroupV1": False,
            "failSwapOn": False,
            "podLogsDir": str(p.pod_logs),
            # ConfigMap volumes and pod status follow quickly (the tests wait for them).
            "syncFrequency": "5s",
            "nodeStatusUpdateFrequency": "5s",
            "nodeStatusReportFrequency": "30s",
            # Never evict or collect images on a busy shared disk: nothing could be pulled back.
            "evictionHard": {"memory.available": "1Mi", "nodefs.available": "0%",
                             "imagefs.available": "0%", "nodefs.inodesFree": "0%"},
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "maxPods": 50,
            "serializeImagePulls": False,
            "resolvConf": "",
            "enableControllerAttachDetach": True,
            # No KUBE-FIREWALL, KUBE-IPTABLES-HINT or canary chains in the host's iptables.
            "makeIPTablesUtilChains": False,
        }
        (p.root / "kubelet.yaml").write_text(yaml.safe_dump(config))
        self._record(kubelet_port=self.kubelet_port)
        binds = " && ".join(
            f"mount --bind {p.sysctl / n.replace('/', '.')} /proc/sys/{n}"
            for n in KUBELET_SYSCTLS if (p.sysctl / n.replace("/", ".")).exists())
        # Own mount namespace, propagation unchanged (the rshared binds stay peers of the
        # host's). In it, /proc and / are made private (/ alone, not its submounts) so these
        # mounts never reach the host: the sysctl files, and empty /var/lib and /var/log, where
        # the kubelet writes at paths it does not let one choose (/var/lib/kubelet/
        # device-plugins, /var/log/containers).
        script = (f"mount --make-rprivate /proc && mount --make-private / && {binds}"
                  " && mount -t tmpfs -o size=16m,mode=755 kubelet-var-lib /var/lib"
                  " && mount -t tmpfs -o size=16m,mode=755 kubelet-var-log /var/log"
                  ' && exec "$@"')
        self._spawn("kubelet", [
            "unshare", "--mount", "--propagation", "unchanged", "--", "sh", "-c", script,
            "kubelet", str(self.cp.binary("kubelet")),
            f"--config={p.root / 'kubelet.yaml'}",
            f"--kubeconfig={p.pki / 'kubelet.kubeconfig'}",
            f"--root-dir={p.kubelet}",
            f"--cert-dir={p.kubelet / 'pki'}",
            f"--hostname-override={self.name}",
            "--v=1",
        ])


def wait_daemonset_ready(cp: ControlPlane, timeout: float = 300.0,
                         on_timeout: Callable[[], str] | None = None) -> None:
    """Wait until the agent's DaemonSet has rolled out: every pod updated, available, Ready."""
    path = f"/apis/apps/v1/namespaces/{AGENT_NAMESPACE}/daemonsets/{AGENT_NAME}"

    def ready() -> bool:
        status, ds = cp.api("GET", path)
        if status != 200:
            return False
        s = ds.get("status", {})
        want = s.get("desiredNumberScheduled", 0)
        return bool(
            s.get("observedGeneration") == ds["metadata"]["generation"] and want > 0
            and s.get("updatedNumberScheduled") == want and s.get("numberReady") == want
            and s.get("numberAvailable") == want)

    _wait("DaemonSet localpv-agent Ready", ready, timeout, on_timeout)


# ---------------------------------------------------------------------------- teardown


def _kill(pids: Iterable[int], timeout: float) -> list[int]:
    """SIGTERM each pid, then SIGKILL what is left after ``timeout``; return survivors."""
    pids = list(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = [p for p in pids if _proc_start_time(p) is not None]
        if not pids:
            return []
    return pids


def _cgroup_procs(root: str) -> list[int]:
    pids: set[int] = set()
    for mount in _cgroup_hierarchies().values():
        base = mount / root.strip("/")
        if base.is_dir():
            for procs in base.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(x) for x in procs.read_text().split())
    return sorted(pids)


def _stop_processes(layout: _Layout, cgroup_root: str | None) -> list[str]:
    """The kubelet, every container (through containerd), containerd, then any process left
    in the node's cgroups or naming its paths (shims)."""
    notes = []
    pids = node_pids(layout.workdir)
    if "kubelet" in pids:
        _kill([pids["kubelet"]], 10)
    if "containerd" in pids and layout.sock.exists():
        ctr = ("ctr", "--address", str(layout.sock), "--namespace", "k8s.io")
        tasks = _run(*ctr, "tasks", "ls", "--quiet", check=False, timeout=30).stdout.split()
        for task in tasks:
            _run(*ctr, "tasks", "kill", "--signal", "SIGKILL", task, check=False, timeout=30)
        for task in tasks:
            _run(*ctr, "tasks", "delete", "--force", task, check=False, timeout=30)
    if "containerd" in pids:
        _kill([pids["containerd"]], 10)
    for _ in range(5):
        left = set(_cgroup_procs(cgroup_root) if cgroup_root else [])
        left |= set(_processes_referring_to(layout.root))
        if not left:
            break
        notes.append(f"killed leftover processes {sorted(left)}")
        _kill(left, 5)
    return notes


def _unmount_under(root: Path) -> list[str]:
    """Unmount everything under ``root``, deepest first; a busy mount is detached lazily."""
    for _ in range(3):
        mounts = sorted((m for m in _mountpoints() if _under(m, root)),
                        key=lambda m: m.count("/"), reverse=True)
        if not mounts:
            return []
        for m in mounts:
            if _run("umount", m, check=False).returncode != 0:
                _run("umount", "--lazy", m, check=False)
    left = [m for m in _mountpoints() if _under(m, root)]
    return [f"mounts left: {left}"] if left else []


def _detach_loops(workdir: Path) -> list[str]:
    """Detach loop devices backed by files under ``workdir`` (disks a test left attached)."""
    notes = []
    for line in _run("losetup", "--list", "--noheadings", "--output", "NAME,BACK-FILE",
                     check=False).stdout.splitlines():
        device, _, backing = line.strip().partition(" ")
        if _under(backing.strip(), workdir):
            _run("losetup", "--detach", device, check=False)
            notes.append(f"detached {device} ({backing.strip()})")
    return notes


def stop_node(workdir: Path, *, keep_logs: bool = False) -> list[str]:
    """Stop the real node of ``workdir`` and undo everything ``start`` did to the host.

    In order: the kubelet; every container (through containerd, then any process left in the
    node's cgroups or naming its paths); containerd; every mount under the node dir (netns,
    volumes, rootfs, the shared binds); loop devices backed by files there; the cgroups; the
    bridge; watched sysctls that differ from what ``start`` recorded. Safe to call more than
    once and after a failed start. Returns what it had to clean up or restore, as text.
    """
    layout = _Layout(workdir)
    notes: list[str] = []
    if not layout.root.exists():
        return notes
    state: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        state = json.loads(layout.state_file.read_text())
    root = state.get("cgroup_root")
    notes += _stop_processes(layout, root)
    notes += _unmount_under(layout.root)
    notes += _detach_loops(layout.workdir)
    if root:
        _remove_cgroups(root, state.get("created_cgroups", []))
    bridge = state.get("bridge")
    if bridge and Path("/sys/class/net", bridge).exists():
        _run("ip", "link", "delete", bridge, check=False)
    for name, before in (state.get("sysctls") or {}).items():
        now = _sysctl_read(name)
        if before is not None and now != before:
            with contextlib.suppress(OSError):
                Path("/proc/sys", name).write_text(before)
            notes.append(f"restored sysctl {name}: {now} -> {before}")
    for cached in (CNI_CACHE / "results").glob(f"{layout.network}-*"):
        cached.unlink(missing_ok=True)
    for d in sorted(state.get("created_dirs", []), key=lambda d: d.count("/"), reverse=True):
        with contextlib.suppress(OSError):
            Path(d).rmdir()  # only if empty: another node may use it by now
    if any(_under(m, layout.root) for m in _mountpoints()):
        notes.append(f"left {layout.root} in place: something is still mounted there")
        return notes
    for entry in layout.root.iterdir():
        if keep_logs and entry.name == "logs":
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        layout.root.rmdir()
    return notes


def _remove_cgroups(root: str, created: Sequence[str]) -> None:
    for mount in _cgroup_hierarchies().values():
        base = mount / root.strip("/")
        if not base.is_dir():
            continue
        for d in sorted((p for p in base.rglob("*") if p.is_dir()),
                        key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
    for path in sorted(created, key=lambda p: p.count("/"), reverse=True):
        with contextlib.suppress(OSError):
            Path(path).rmdir()
