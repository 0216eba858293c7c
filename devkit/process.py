"""Stopping the helper processes the tests start (udevd, Prometheus, agents)."""

from __future__ import annotations

import signal
import subprocess


def stop(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `timeout`: a hung helper must not
    hang the test session."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
