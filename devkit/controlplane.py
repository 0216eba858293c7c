"""A real Kubernetes control plane on 127.0.0.1 for end-to-end tests.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler run as
child processes on free loopback ports; KWOK plays the kubelet of every fake
Node. Authentication uses client certificates made with the ``openssl`` CLI,
authorization is ``Node,RBAC``, and service-account tokens are signed by a key
made for the run.

Typical use from a pytest session fixture::

    cp = ControlPlane(tmp_path_factory.mktemp("cluster"), bin_dir)
    try:
        cp.start(nodes=3)
        yield cp
    finally:
        cp.stop()

``bin_dir`` is the last line printed by ``scripts/build-binaries``.
Only the standard library is used.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import functools
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "COMPONENTS",
    "STAGES_FILE",
    "ControlPlane",
    "ControlPlaneError",
    "running_pids",
    "stop_workdir",
]

STAGES_FILE = Path(__file__).with_name("kwok-stages.yaml")
"""KWOK stages that make fake nodes Ready and their pods Running."""

COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
)
"""Processes started, in start order."""

SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = "10.96.0.1"
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"

# Entries of the work directory that this module creates (and stop removes).
_OWNED = ("etcd", "pki", "kubeconfig", "logs", "pids", "admin.kubeconfig")

_PR_SET_PDEATHSIG = 1


class ControlPlaneError(RuntimeError):
    """A component failed to start or to become healthy."""


@dataclass(frozen=True)
class _Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int


def _free_ports(count: int) -> list[int]:
    """Return ``count`` distinct TCP ports that were free on 127.0.0.1.

    All sockets stay bound until every port is chosen, so the ports differ.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _proc_start_time(pid: int) -> str | None:
    """Return the kernel start time of ``pid``, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; fields after it follow ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return fields[19]


def running_pids(workdir: Path) -> dict[str, int]:
    """Return the components recorded in ``workdir/pids`` that still run.

    A pid file holds ``<pid> <start time>``; a pid whose start time differs
    belongs to another process by now and is left out.
    """
    found: dict[str, int] = {}
    piddir = workdir / "pids"
    if not piddir.is_dir():
        return found
    for pidfile in sorted(piddir.glob("*.pid")):
        try:
            pid_text, start = pidfile.read_text().split()
            pid = int(pid_text)
        except (OSError, ValueError):
            continue
        if _proc_start_time(pid) == start:
            found[pidfile.stem] = pid
    return found


def _wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait until no pid in ``pids`` runs; return those still running."""
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [p for p in left if _proc_start_time(p) is not None]
    return left


def stop_workdir(workdir: Path, *, remove: bool = True, keep_logs: bool = False) -> None:
    """Stop every component recorded in ``workdir`` and remove its data.

    Works without the ``ControlPlane`` object that started them, e.g. from
    ``scripts/cluster down`` after ``up`` has exited. Each component runs in
    its own process group, which gets SIGTERM, then SIGKILL after 10 s.
    Components stop in reverse start order so none logs the loss of another.
    """
    pids = running_pids(workdir)
    order = [c for c in reversed(COMPONENTS) if c in pids]
    order += [c for c in pids if c not in order]
    for name in order:
        pid = pids[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        if not _wait_gone([pid], 10.0):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        if _wait_gone([pid], 5.0):
            raise ControlPlaneError(f"{name} (pid {pid}) survived SIGKILL")
    if remove:
        for entry in _OWNED:
            if keep_logs and entry == "logs":
                continue
            path = workdir / entry
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            workdir.rmdir()  # only if nothing else is left there


_LIBC = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this (child) process when its parent dies.

    Runs between fork and exec, so it only calls into the already loaded libc.
    """
    _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


class ControlPlane:
    """etcd, kube-apiserver, kube-controller-manager, kube-scheduler and KWOK.

    Args:
        workdir: Directory for data, certificates, kubeconfigs, logs and pid
            files; created if missing. Use one per control plane.
        bin_dir: Directory holding the binaries named in ``COMPONENTS`` and
            ``kubectl``.
        detach: When False (the default) every process gets SIGKILL if the
            Python process that started it dies, so a crashed test run leaks
            nothing. ``scripts/cluster up`` sets True so they outlive it.
        stages_file: KWOK stages to use instead of ``STAGES_FILE``.
        apiserver_args: Extra kube-apiserver flags, e.g. an audit log for a benchmark.
    """

    def __init__(
        self,
        workdir: Path,
        bin_dir: Path,
        *,
        detach: bool = False,
        stages_file: Path = STAGES_FILE,
        apiserver_args: Sequence[str] = (),
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.bin_dir = Path(bin_dir).resolve()
        self.detach = detach
        self.stages_file = Path(stages_file).resolve()
        self.apiserver_args = tuple(apiserver_args)
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        self._ports: _Ports | None = None
        self._ssl: ssl.SSLContext | None = None

    # ------------------------------------------------------------------ paths

    @property
    def kubeconfig(self) -> Path:
        """Path of the admin kubeconfig (user in group ``system:masters``)."""
        return self.workdir / "admin.kubeconfig"

    @property
    def pki_dir(self) -> Path:
        """Directory of the CA, certificates and service-account keys."""
        return self.workdir / "pki"

    @property
    def ca_file(self) -> Path:
        """CA certificate that signs the apiserver's serving certificate."""
        return self.pki_dir / "ca.crt"

    @property
    def log_dir(self) -> Path:
        """Directory with one ``<component>.log`` per process."""
        return self.workdir / "logs"

    @property
    def server(self) -> str:
        """URL of the kube-apiserver."""
        if self._ports is None:
            raise ControlPlaneError("control plane not started")
        return f"https://127.0.0.1:{self._ports.apiserver}"

    @property
    def pids(self) -> dict[str, int]:
        """Process ids of the components that run now, by component name."""
        return running_pids(self.workdir)

    def binary(self, name: str) -> Path:
        """Return the path of binary ``name`` in ``bin_dir``."""
        return self.bin_dir / name

    # -------------------------------------------------------------- lifecycle

    def start(self, nodes: int = 3, timeout: float = 120.0) -> None:
        """Start every component, wait until healthy and add ``nodes`` Nodes.

        Nodes are named ``node-1`` .. ``node-<nodes>``. On failure everything
        already started is stopped (logs are kept) and ControlPlaneError
        carries the log tails.
        """
        missing = [b for b in (*COMPONENTS, "kubectl") if not os.access(self.binary(b), os.X_OK)]
        if missing:
            raise ControlPlaneError(f"missing in {self.bin_dir}: {', '.join(missing)}")
        if running_pids(self.workdir):
            raise ControlPlaneError(f"a control plane already runs in {self.workdir}")
        deadline = time.monotonic() + timeout
        self._ssl = None
        try:
            for entry in _OWNED:
                path = self.workdir / entry
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
            for sub in ("etcd", "pki", "kubeconfig", "logs", "pids"):
                (self.workdir / sub).mkdir(parents=True, exist_ok=True)
            (self.workdir / "etcd").chmod(0o700)
            self._ports = _Ports(*_free_ports(5))
            self._make_pki()
            self._write_kubeconfigs()
            self._start_etcd(deadline)
            self._start_apiserver(deadline)
            self._start_controller_manager(deadline)
            self._start_scheduler(deadline)
            self._start_kwok()
            self._wait(
                "ServiceAccount default/default",
                lambda: (
                    self.api("GET", "/api/v1/namespaces/default/serviceaccounts/default")[0] == 200
                ),
                deadline,
            )
            names = [f"node-{i}" for i in range(1, nodes + 1)]
            for name in names:
                self.add_node(name, wait=False)
            self.wait_nodes_ready(names, max(deadline - time.monotonic(), 1.0))
        except BaseException as exc:
            tails = self.log_tails()
            stop_workdir(self.workdir, remove=False)
            self._reap()
            if isinstance(exc, ControlPlaneError):
                raise ControlPlaneError(f"{exc}\n{tails}") from None
            raise

    def stop(self, *, keep_logs: bool = False) -> None:
        """Stop every component (whole process groups) and remove the data.

        Safe to call more than once, and after a failed ``start``.
        """
        stop_workdir(self.workdir, keep_logs=keep_logs)
        self._reap()
        self._ssl = None

    def __enter__(self) -> ControlPlane:
        """Return self; call ``start`` yourself to choose the node count."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop everything."""
        self.stop()

    def restart_apiserver(self, grace: float = 60.0, timeout: float = 120.0) -> float:
        """Stop kube-apiserver (SIGTERM to its process group, SIGKILL after `grace` seconds)
        and start it again on the same etcd, port and flags; return once /readyz answers, with
        the seconds from SIGTERM to then.

        What every client sees when the apiserver is upgraded or its node reboots: its watches
        end, requests are refused, and it comes back with the same data. After SIGTERM it
        stops listening and ends its watches within a second or so, then waits up to 60 s for
        open connections to go before it exits: a short `grace` skips that wait.
        """
        stopped = time.monotonic()
        pid = running_pids(self.workdir).get("kube-apiserver")
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
            if _wait_gone([pid], grace):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                if _wait_gone([pid], 5.0):
                    raise ControlPlaneError(f"kube-apiserver (pid {pid}) survived SIGKILL")
        old = self._procs.pop("kube-apiserver", None)
        if old is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                old.wait(timeout=5)
        self._start_apiserver(time.monotonic() + timeout)
        return time.monotonic() - stopped

    def metrics_text(self) -> str:
        """The apiserver's own /metrics (Prometheus text), read as admin."""
        status, body = self.api("GET", "/metrics")
        if status != 200 or not isinstance(body, str):
            raise ControlPlaneError(f"GET /metrics: HTTP {status}: {str(body)[:500]}")
        return body

    def log_tails(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of every component's log."""
        out: list[str] = []
        for name in COMPONENTS:
            path = self.log_dir / f"{name}.log"
            if not path.exists():
                continue
            with path.open("rb") as f:
                f.seek(0, os.SEEK_END)
                start = max(0, f.tell() - 1024 * (lines + 1))
                f.seek(start)
                text = f.read().decode(errors="replace").splitlines()
            if start > 0:
                text = text[1:]  # the first line read is likely cut
            tail = text[-lines:]
            out.append(f"==> {path} <==")
            out.extend(tail)
        return "\n".join(out)

    # ------------------------------------------------------------------ nodes

    def add_node(
        self,
        name: str,
        labels: Mapping[str, str] | None = None,
        *,
        wait: bool = True,
        timeout: float = 60.0,
    ) -> None:
        """Create a fake Node that KWOK manages; optionally wait until Ready.

        It is labelled ``kubernetes.io/hostname=<name>``, ``type=kwok`` and
        annotated ``kwok.x-k8s.io/node=fake``; ``labels`` are added on top.
        """
        all_labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
            **(labels or {}),
        }
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": all_labels,
                "annotations": {
                    KWOK_NODE_ANNOTATION: "fake",
                    "node.alpha.kubernetes.io/ttl": "0",
                },
            },
            "spec": {},
        }
        status, body = self.api("POST", "/api/v1/nodes", node)
        if status != 201:
            raise ControlPlaneError(f"creating node {name}: HTTP {status}: {body}")
        if wait:
            self.wait_nodes_ready([name], timeout)

    def node_ready(self, name: str) -> bool:
        """Return whether Node ``name`` exists, is Ready and has no not-ready taint."""
        status, node = self.api("GET", f"/api/v1/nodes/{name}")
        if status != 200:
            return False
        conditions = node.get("status", {}).get("conditions", [])
        ready = any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)
        taints = node.get("spec", {}).get("taints", [])
        blocked = any(t["key"].startswith("node.kubernetes.io/not-ready") for t in taints)
        return ready and not blocked

    def wait_nodes_ready(self, names: Sequence[str], timeout: float = 60.0) -> None:
        """Wait until every Node in ``names`` is Ready and schedulable."""
        deadline = time.monotonic() + timeout
        for name in names:
            self._wait(f"node {name} Ready", functools.partial(self.node_ready, name), deadline)

    # ---------------------------------------------------------------- clients

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        timeout: float = 60.0,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``kubectl`` as admin; return the completed process (text mode).

        Raises ControlPlaneError with its stderr when ``check`` and it fails.
        """
        cmd = [str(self.binary("kubectl")), f"--kubeconfig={self.kubeconfig}", *args]
        proc = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise ControlPlaneError(
                f"kubectl {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}"
            )
        return proc

    def api(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> tuple[int, Any]:
        """Call the kube-apiserver as admin; return (HTTP status, decoded JSON).

        HTTP errors are returned, not raised; a connection failure gives
        status 0 and the error text.
        """
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, context=self._admin_ssl(), timeout=10) as resp:
                return resp.status, _decode(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, _decode(err.read())
        except (OSError, ssl.SSLError) as err:
            return 0, str(err)

    # --------------------------------------------------------------- internals

    def _admin_ssl(self) -> ssl.SSLContext:
        if self._ssl is None:
            ctx = ssl.create_default_context(cafile=str(self.ca_file))
            ctx.load_cert_chain(self.pki_dir / "admin.crt", self.pki_dir / "admin.key")
            self._ssl = ctx
        return self._ssl

    def _openssl(self, *args: str) -> None:
        proc = subprocess.run(
            ["openssl", *args], cwd=self.pki_dir, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise ControlPlaneError(f"openssl {' '.join(args)}: {proc.stderr.strip()}")

    def _make_pki(self) -> None:
        """Create the CA, serving and client certificates, and SA keys."""
        ext = self.pki_dir / "ext.cnf"
        ext.write_text(
            "[req]\ndistinguished_name = dn\n[dn]\n"
            "[ca]\nbasicConstraints = critical, CA:TRUE\n"
            "keyUsage = critical, keyCertSign, cRLSign, digitalSignature\n"
            "subjectKeyIdentifier = hash\n"
            "[serving]\nbasicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature, keyEncipherment\n"
            "extendedKeyUsage = serverAuth\n"
            "subjectAltName = IP:127.0.0.1, IP:" + SERVICE_IP + ", DNS:localhost, "
            "DNS:kubernetes, DNS:kubernetes.default, DNS:kubernetes.default.svc, "
            "DNS:kubernetes.default.svc.cluster.local\n"
            "[client]\nbasicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature, keyEncipherment\n"
            "extendedKeyUsage = clientAuth\n"
        )
        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        self._openssl(
            "req", "-x509", *ec, "-config", "ext.cnf", "-extensions", "ca",
            "-keyout", "ca.key", "-out", "ca.crt", "-days", "3650",
            "-subj", "/CN=localpv-test-ca",
        )  # fmt: skip
        # A second CA for the aggregation layer's request-header authentication;
        # without it every delegating component logs a missing CA bundle.
        self._openssl(
            "req", "-x509", *ec, "-config", "ext.cnf", "-extensions", "ca",
            "-keyout", "front-proxy-ca.key", "-out", "front-proxy-ca.crt", "-days", "3650",
            "-subj", "/CN=localpv-test-front-proxy-ca",
        )  # fmt: skip
        leaves = {
            "apiserver": ("serving", "/CN=kube-apiserver"),
            "admin": ("client", "/O=system:masters/CN=localpv-admin"),
            "controller-manager": ("client", "/CN=system:kube-controller-manager"),
            "scheduler": ("client", "/CN=system:kube-scheduler"),
            "kwok": ("client", "/O=system:masters/CN=kwok"),
            "front-proxy-client": ("client", "/CN=front-proxy-client"),
            # The apiserver's identity towards kubelets (kubectl logs/exec on a real node).
            "kubelet-client": ("client", "/O=system:masters/CN=kube-apiserver-kubelet-client"),
        }
        for name, (kind, subject) in leaves.items():
            ca = "front-proxy-ca" if name == "front-proxy-client" else "ca"
            self._openssl(
                "req", "-new", *ec, "-config", "ext.cnf",
                "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
            )  # fmt: skip
            self._openssl(
                "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-days", "3650", "-sha256",
                "-extfile", "ext.cnf", "-extensions", kind, "-out", f"{name}.crt",
            )  # fmt: skip
        self._openssl(
            "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key"
        )
        self._openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        for key in self.pki_dir.glob("*.key"):
            key.chmod(0o600)

    def _kubeconfig_text(self, user: str) -> str:
        pki = self.pki_dir
        return (
            "apiVersion: v1\nkind: Config\n"
            "clusters:\n- name: localpv\n  cluster:\n"
            f"    server: {self.server}\n"
            f"    certificate-authority-data: {_b64(pki / 'ca.crt')}\n"
            f"users:\n- name: {user}\n  user:\n"
            f"    client-certificate-data: {_b64(pki / f'{user}.crt')}\n"
            f"    client-key-data: {_b64(pki / f'{user}.key')}\n"
            f"contexts:\n- name: {user}@localpv\n  context:\n"
            f"    cluster: localpv\n    user: {user}\n"
            f"current-context: {user}@localpv\n"
        )

    def _write_kubeconfigs(self) -> None:
        self.kubeconfig.write_text(self._kubeconfig_text("admin"))
        self.kubeconfig.chmod(0o600)
        for user in ("controller-manager", "scheduler", "kwok"):
            path = self.workdir / "kubeconfig" / f"{user}.kubeconfig"
            path.write_text(self._kubeconfig_text(user))
            path.chmod(0o600)

    def _spawn(self, name: str, args: Sequence[str]) -> None:
        """Start ``name`` in its own session, logging to ``logs/<name>.log``."""
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                [str(self.binary(name)), *args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
                # Only a prctl call, made with a libc handle loaded beforehand.
                preexec_fn=None if self.detach else _die_with_parent,  # noqa: PLW1509
            )
        self._procs[name] = proc
        start = _proc_start_time(proc.pid)
        (self.workdir / "pids" / f"{name}.pid").write_text(f"{proc.pid} {start}\n")

    def _wait(self, what: str, ready: Callable[[], bool], deadline: float) -> None:
        """Poll ``ready`` until true; fail fast if a component has exited."""
        while True:
            for name, proc in self._procs.items():
                code = proc.poll()
                if code is not None:
                    raise ControlPlaneError(f"{name} exited with {code} while waiting for {what}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(f"timed out waiting for {what}")
            time.sleep(0.25)

    def _http_ok(self, url: str, *, verify: bool) -> bool:
        if verify:
            ctx = self._admin_ssl()
        else:  # controller-manager and scheduler serve self-signed certificates
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
                return bool(resp.status == 200)
        except (OSError, ssl.SSLError):
            return False

    def _start_etcd(self, deadline: float) -> None:
        assert self._ports is not None
        client = f"http://127.0.0.1:{self._ports.etcd_client}"
        peer = f"http://127.0.0.1:{self._ports.etcd_peer}"
        self._spawn(
            "etcd",
            [
                "--name=localpv",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=localpv={peer}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        self._wait("etcd /health", lambda: self._etcd_healthy(client), deadline)

    @staticmethod
    def _etcd_healthy(client: str) -> bool:
        try:
            with urllib.request.urlopen(client + "/health", timeout=5) as resp:
                return bool(json.loads(resp.read()).get("health") == "true")
        except (OSError, ValueError):
            return False

    def _start_apiserver(self, deadline: float) -> None:
        assert self._ports is not None
        pki = self.pki_dir
        self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers=http://127.0.0.1:{self._ports.etcd_client}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self._ports.apiserver}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--requestheader-client-ca-file={pki / 'front-proxy-ca.crt'}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--proxy-client-cert-file={pki / 'front-proxy-client.crt'}",
                f"--proxy-client-key-file={pki / 'front-proxy-client.key'}",
                f"--kubelet-client-certificate={pki / 'kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'kubelet-client.key'}",
                "--authorization-mode=Node,RBAC",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # Endpoints may not hold a loopback address; nothing here needs
                # the "kubernetes" Service's endpoints, so skip them.
                "--endpoint-reconciler-type=none",
                "--allow-privileged=true",
                "--profiling=false",
                "--v=1",
                *self.apiserver_args,
            ],
        )
        self._wait(
            "kube-apiserver /readyz",
            lambda: self._http_ok(self.server + "/readyz", verify=True),
            deadline,
        )

    def _component_args(self, user: str, port: int) -> list[str]:
        kubeconfig = self.workdir / "kubeconfig" / f"{user}.kubeconfig"
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.workdir / 'pki' / user}",
            "--leader-elect=false",
            "--profiling=false",
            "--v=1",
        ]

    def _start_controller_manager(self, deadline: float) -> None:
        assert self._ports is not None
        pki = self.pki_dir
        port = self._ports.controller_manager
        self._spawn(
            "kube-controller-manager",
            [
                *self._component_args("controller-manager", port),
                "--controllers=*",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--cluster-signing-cert-file={pki / 'ca.crt'}",
                f"--cluster-signing-key-file={pki / 'ca.key'}",
            ],
        )
        self._wait(
            "kube-controller-manager /healthz",
            lambda: self._http_ok(f"https://127.0.0.1:{port}/healthz", verify=False),
            deadline,
        )

    def _start_scheduler(self, deadline: float) -> None:
        assert self._ports is not None
        port = self._ports.scheduler
        self._spawn("kube-scheduler", self._component_args("scheduler", port))
        self._wait(
            "kube-scheduler /healthz",
            lambda: self._http_ok(f"https://127.0.0.1:{port}/healthz", verify=False),
            deadline,
        )

    def _start_kwok(self) -> None:
        self._spawn(
            "kwok",
            [
                f"--kubeconfig={self.workdir / 'kubeconfig' / 'kwok.kubeconfig'}",
                f"--config={self.stages_file}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                "--node-ip=127.0.0.1",
                "--node-lease-duration-seconds=40",
            ],
        )

    def _reap(self) -> None:
        """Collect exit statuses of children started by this object."""
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
        self._procs.clear()


def _decode(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")
