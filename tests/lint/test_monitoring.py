"""The PrometheusRule passes promtool, and the dashboard and alerts only name metrics the
agent really exports (taken from the agent's own registry, not from a list)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from agent.metrics import AgentSample, Metrics
from tests.conftest import require

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "config" / "monitoring"
METRIC = re.compile(r"\b((?:localpv_agent|local_volume_provisioner)_[a-z0-9_]+)")


def exported_names() -> set[str]:
    metrics = Metrics()
    metrics.watch_state(AgentSample)
    names = set()
    for family in metrics.registry.collect():
        base = family.name
        names.add(base)
        if family.type == "counter":
            names.add(base + "_total")
        if family.type == "histogram":
            names.update({base + "_bucket", base + "_sum", base + "_count"})
    return names


def rules() -> dict[str, object]:
    doc = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    assert doc["kind"] == "PrometheusRule"
    return {"groups": doc["spec"]["groups"]}


def dashboard_exprs() -> list[str]:
    board = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in board["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_promtool_accepts_the_rules(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    require(promtool is not None, "promtool missing: run scripts/install-system-deps")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rules()))
    result = subprocess.run([str(promtool), "check", "rules", str(path)], capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def test_alerts_cover_the_operators_questions() -> None:
    alerts = {r["alert"] for g in rules()["groups"] for r in g["rules"]}  # type: ignore[attr-defined]
    assert alerts == {"LocalPVVolumeMissing", "LocalPVCleaningFailing", "LocalPVAgentNotReady",
                      "LocalPVWakeupSourceFailing", "LocalPVNodeLostAllVolumes",
                      "LocalPVVolumeHeld"}


@pytest.mark.parametrize("source", ["dashboard", "rules"])
def test_every_query_names_an_exported_metric(source: str) -> None:
    exported = exported_names()
    exprs = dashboard_exprs() if source == "dashboard" else [
        r["expr"] for g in rules()["groups"] for r in g["rules"]]  # type: ignore[attr-defined]
    assert exprs
    for expr in exprs:
        named = METRIC.findall(expr)
        assert named, f"query names no agent metric: {expr}"
        unknown = set(named) - exported
        assert not unknown, f"{unknown} in {expr!r} is not exported"
