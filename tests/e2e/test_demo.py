"""`make demo` tells the whole story and leaves no loop device or process behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from devkit.disks import can_make_disks, sh
from tests.conftest import require

REPO = Path(__file__).resolve().parents[2]


def test_demo_shows_pods_returning_to_their_nodes(bin_dir: Path) -> None:
    ok, why = can_make_disks()
    require(ok, why)
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "demo")],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert out.count("same node, same PV") == 6 and "DRIFTED" not in out
    assert out.count("persistentvolume/local-pv-") >= 6
    assert "Done: every pod came back" in out
    backing = sh("losetup", "--list", "--noheadings", "--output", "BACK-FILE")
    assert "localpv-demo." not in backing  # every demo disk detached
