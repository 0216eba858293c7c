"""The no-cluster demo runs end to end on real loop devices and leaves nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from devkit.disks import can_make_disks, sh
from tests.conftest import require

REPO = Path(__file__).resolve().parents[2]


def test_demo_scan_shows_three_volumes_and_reasons() -> None:
    ok, why = can_make_disks()
    require(ok, why)
    env = {**os.environ, "VENV": str(Path(sys.executable).parent.parent)}
    result = subprocess.run([str(REPO / "scripts" / "demo-scan")], capture_output=True,
                            text=True, env=env, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    table = [ln for ln in result.stdout.splitlines() if ln.startswith(("local-pv-", "(excl"))]
    assert sum(ln.startswith("local-pv-") for ln in table) == 3
    assert any("notes.txt" in ln and "unsupported_type" in ln for ln in table)
    assert any("not-mounted" in ln and "not_mount_point" in ln for ln in table)
    assert result.stdout.count("passed for resource persistentvolume/") == 3
    assert "demo: cleaned up" in result.stderr
    backing = sh("losetup", "--list", "--noheadings", "--output", "BACK-FILE")
    assert "localpv-demo." not in backing  # every demo disk detached
