"""`fsCleanerCommand` through a running agent: a released claim's volume is emptied by the
class's own command, given LOCAL_PV_FS_PATH, and offered again on the same mount point."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from agent.volumes import pv_name
from devkit.agents import Agent, bind_claim, node_for_test, pvs_of, wait_for
from devkit.controlplane import ControlPlane
from devkit.disks import disks

CLASS = "local-storage"


def _pv(cluster: ControlPlane, name: str) -> dict[str, Any] | None:
    status, body = cluster.api("GET", f"/api/v1/persistentvolumes/{name}")
    return body if status == 200 else None


def test_a_released_volume_is_emptied_by_the_class_command(
        cluster: ControlPlane, agent_kubeconfig: Path, tmp_path: Path) -> None:
    node = node_for_test(cluster, "fs-cleaner-command")
    fs_dir = tmp_path / "disks"
    marker = tmp_path / "marker"
    script = tmp_path / "fsclean.sh"
    script.write_text("#!/bin/sh\nset -e\n"
                      f'echo "$LOCAL_PV_FS_PATH" > {marker}\n'
                      'find "$LOCAL_PV_FS_PATH" -mindepth 1 -delete\n'
                      'echo "fsclean: emptied $LOCAL_PV_FS_PATH"\n')
    script.chmod(0o755)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storageClassMap": {CLASS: {
        "hostDir": "/mnt/disks", "mountDir": str(fs_dir), "fsCleanerCommand": [str(script)]}}}))
    claim = f"{node[:30]}-fs"
    with disks(tmp_path) as d:
        mount = d.mount(d.loop("fscmd", fs="ext4"), fs_dir / "vol")
        agent = Agent(node, config, agent_kubeconfig, tmp_path).start()
        try:
            agent.wait_ready()
            name = pv_name("vol", node, CLASS)
            pv = wait_for(lambda: _pv(cluster, name), 30, "the PV")
            bind_claim(cluster, pv, claim)
            (mount / "tenant").mkdir()
            (mount / "tenant" / "data.txt").write_text("the old tenant's data\n")
            wait_for(lambda: agent.dirty_paths() == {"/mnt/disks/vol"}, 30,
                     "remembered as dirty", on_timeout=agent.log)
            status, _ = cluster.api(
                "DELETE", f"/api/v1/namespaces/default/persistentvolumeclaims/{claim}")
            assert status == 200
            wait_for(lambda: (new := _pv(cluster, name)) is not None
                     and new["metadata"]["uid"] != pv["metadata"]["uid"]
                     and (new.get("status") or {}).get("phase") == "Available", 60,
                     "cleaned and offered again", on_timeout=agent.log)
            assert marker.read_text().strip() == str(mount)
            assert os.listdir(mount) == [] and os.path.ismount(mount)
            assert "fsclean: emptied" in agent.log()  # its output streamed to the log
        finally:
            agent.kill()
            cluster.api("DELETE", f"/api/v1/namespaces/default/persistentvolumeclaims/{claim}")
            for left in pvs_of(cluster, node):
                cluster.api("DELETE", f"/api/v1/persistentvolumes/{left['metadata']['name']}")
