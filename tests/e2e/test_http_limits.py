"""The metrics port under attack: an agent limited to 1024 open files and 1,000 slow clients
held against its port (reopened as the agent drops them) must still turn a new disk into a PV,
answer /healthz, hold few fds and keep its log quiet."""

from __future__ import annotations

import os
import resource
import selectors
import shutil
import socket
import threading
import time
from pathlib import Path

from agent.volumes import pv_name
from devkit.agents import Agent, class_config, pvs_of, wait_for
from devkit.controlplane import ControlPlane
from devkit.disks import disks
from tests.conftest import require

CLASS = "local-storage"
FD_LIMIT = 1024
ATTACKERS = 1000
OPENS_PER_SECOND = 200  # the attack's connections, and again each one the agent drops


class SlowClients:
    """Up to `count` connections to `port`, each sending one byte a second of a request that
    never ends (slowloris). The ones the agent drops are opened again, so it always has more
    would-be clients than its limit. Opens are paced: a burst would overflow the listen
    backlog and most connections would never reach the server at all."""

    REQUEST = b"GET /metrics HTTP/1.1\r\nHost: agent\r\n" + b"X-Padding: slow\r\n" * 1000

    def __init__(self, port: int, count: int) -> None:
        self.port, self.count = port, count
        self.opened = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="attack", daemon=True)
        self.selector = selectors.DefaultSelector()
        self.alive: dict[socket.socket, int] = {}  # -> bytes sent

    def _open(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)  # a full backlog delays a connect by seconds: do not wait for it
        s.connect_ex(("127.0.0.1", self.port))
        self.selector.register(s, selectors.EVENT_READ)
        self.alive[s] = 0
        self.opened += 1

    def _drop(self, s: socket.socket) -> None:
        self.selector.unregister(s)
        s.close()
        del self.alive[s]

    def _run(self) -> None:
        budget, last, next_byte = 0.0, time.monotonic(), time.monotonic() + 1
        while not self.stop.is_set():
            now = time.monotonic()
            budget = min(budget + (now - last) * OPENS_PER_SECOND, OPENS_PER_SECOND / 10)
            last = now
            while len(self.alive) < self.count and budget >= 1:
                self._open()
                budget -= 1
            if now >= next_byte:
                next_byte = now + 1
                for s, sent in list(self.alive.items()):
                    try:
                        self.alive[s] += s.send(self.REQUEST[sent:sent + 1])
                    except BlockingIOError:
                        pass  # still connecting
                    except OSError:  # reset: the server dropped or never accepted it
                        self._drop(s)
            for key, _ in self.selector.select(0.05):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    if s.recv(65536):
                        continue  # an error status; the close follows
                except OSError:
                    pass
                self._drop(s)  # closed by the agent

    def __enter__(self) -> SlowClients:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        need = self.count + 512
        require(hard == resource.RLIM_INFINITY or hard >= need,
                f"the test needs {need} open files, the hard limit is {hard}")
        if soft != resource.RLIM_INFINITY and soft < need:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        for s in list(self.alive):
            self._drop(s)
        self.selector.close()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def nofile_limits(pid: int) -> list[str]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return line.split()[3:5]
    raise AssertionError("no open files limit")


def dropped(agent: Agent) -> float:
    _, text = agent.get("/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("localpv_agent_http_connections_dropped_total{"))


def test_a_thousand_held_connections_do_not_starve_the_agent(
    cluster: ControlPlane, agent_kubeconfig: Path, tmp_path: Path
) -> None:
    prlimit = shutil.which("prlimit")
    require(prlimit is not None, "prlimit (util-linux) missing")
    assert prlimit is not None
    node = "http-limits-node"
    cluster.add_node(node)
    mount_dir = tmp_path / "disks"
    config = class_config(tmp_path / "config.yaml", mount_dir)
    names = lambda: {pv["metadata"]["name"] for pv in pvs_of(cluster, node)}  # noqa: E731
    with disks(tmp_path) as d:
        d.tmpfs(mount_dir / "a")
        agent = Agent(node, config, agent_kubeconfig, tmp_path,
                      wrapper=[prlimit, f"--nofile={FD_LIMIT}:{FD_LIMIT}", "--"]).start()
        try:
            agent.wait_ready()
            assert agent.proc is not None
            pid = agent.proc.pid
            assert nofile_limits(pid) == [str(FD_LIMIT), str(FD_LIMIT)]
            wait_for(lambda: pv_name("a", node, CLASS) in names(), 30, "the first PV")
            before = dropped(agent)

            with SlowClients(agent.port, ATTACKERS) as attack:
                wait_for(lambda: attack.opened >= ATTACKERS, 60,
                         "the attack's connections", on_timeout=agent.log)
                # Evidence the agent saw them: it dropped nearly all (it keeps at most 32).
                wait_for(lambda: dropped(agent) - before >= ATTACKERS - 32, 60,
                         "the agent dropping the held connections", on_timeout=agent.log)

                d.tmpfs(mount_dir / "b")
                healthz: list[tuple[int, float]] = []
                fds: list[int] = []
                tasks: list[int] = []

                def pv_made_while_probing() -> bool:
                    started = time.monotonic()
                    healthz.append((agent.get("/healthz")[0], time.monotonic() - started))
                    fds.append(open_fds(pid))
                    tasks.append(threads(pid))
                    return pv_name("b", node, CLASS) in names()

                wait_for(pv_made_while_probing, 90, "the new disk's PV under attack",
                         on_timeout=agent.log, interval=0.5)
                for _ in range(5):  # and the probe keeps answering
                    started = time.monotonic()
                    healthz.append((agent.get("/healthz")[0], time.monotonic() - started))
                    fds.append(open_fds(pid))
                    tasks.append(threads(pid))
                    time.sleep(0.5)  # spacing between probes, not a wait for a condition
                assert attack.opened > ATTACKERS  # the agent kept dropping, the attack reopening

            assert all(code == 200 for code, _ in healthz), healthz
            assert max(seconds for _, seconds in healthz) < 5, healthz
            assert max(fds) < 200, fds  # the server holds at most 32 client connections
            assert max(tasks) < 100, tasks  # and a fixed set of threads, not one per client
        finally:
            assert agent.stop() < 5
    log = agent.log()
    assert log.count("Traceback") < 5, log[-5000:]
    assert "Too many open files" not in log, log[-5000:]
    assert len([line for line in log.splitlines() if "HTTP:" in line]) <= 4, log[-5000:]
