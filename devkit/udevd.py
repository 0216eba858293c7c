"""A real systemd-udevd for tests: started in the foreground when none runs, stopped after."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from devkit import process

CANDIDATES = ("/lib/systemd/systemd-udevd", "/usr/lib/systemd/systemd-udevd")


def udevd_binary() -> str | None:
    for path in CANDIDATES:
        if Path(path).exists():
            return path
    return shutil.which("systemd-udevd")


def running() -> bool:
    return subprocess.run(["pgrep", "-x", "systemd-udevd"], capture_output=True,
                          check=False).returncode == 0


class Udevd:
    """Owns a systemd-udevd process (unless one already ran), which tests may restart."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.borrowed = False

    def start(self) -> Udevd:
        if running() and self.proc is None:
            self.borrowed = True
            return self
        binary = udevd_binary()
        if binary is None:
            raise RuntimeError("systemd-udevd not found: install the Debian package udev")
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([binary],
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while subprocess.run(["udevadm", "control", "--ping", "--timeout=1"],
                             capture_output=True, check=False).returncode != 0:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"systemd-udevd did not start: {self.log_path.read_text()}")
            time.sleep(0.05)
        settle()
        return self

    def stop(self) -> None:
        if self.proc is None:
            return
        process.stop(self.proc)
        self.proc = None

    def restart(self) -> None:
        if self.borrowed:
            raise RuntimeError("a systemd-udevd this harness did not start cannot be restarted")
        self.stop()
        self.start()


def settle(timeout: int = 10) -> None:
    subprocess.run(["udevadm", "settle", f"--timeout={timeout}"], check=False,
                   capture_output=True)


def trigger_block_changes(times: int = 1) -> None:
    """A burst of `change` events for every block device (to overflow a small socket)."""
    for _ in range(times):
        subprocess.run(["udevadm", "trigger", "--action=change", "--subsystem-match=block"],
                       check=True, capture_output=True)
