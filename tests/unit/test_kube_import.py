"""agent.kube loads only the API client's REST layer (issue 14: memory), and stays right.

It registers the `kubernetes` package without running its `__init__` and calls its few paths
by the generated methods' names. These tests fail when a later `kubernetes` release breaks
that: heavy modules loaded again, a package that no longer completes on demand, or a path,
method name or argument order that no longer matches the generated client.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# What `import kubernetes` brings and the agent must not load in the cluster.
HEAVY = ("pydantic", "oauthlib", "requests", "kubernetes.client.api_client",
         "kubernetes.client.models.", "kubernetes.client.api.", "kubernetes.dynamic",
         "kubernetes.stream", "kubernetes.leaderelection", "kubernetes.informer",
         "kubernetes.config.kube_config")


def python(code: str) -> dict[str, object]:
    """Run `code` in a fresh interpreter (nothing imported yet); it prints one JSON value."""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, text=True,
                         capture_output=True, timeout=120).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def test_the_in_cluster_agent_loads_no_model_no_oauth_and_no_pydantic() -> None:
    found = python(
        "import importlib, json, sys\n"
        "import agent.kube, agent.loop\n"
        "importlib.import_module('kubernetes.config.incluster_config')\n"
        f"heavy = [m for m in sys.modules if m.startswith({HEAVY!r})]\n"
        "print(json.dumps({'heavy': heavy}))\n")
    assert found["heavy"] == []


def test_the_package_completes_itself_for_any_other_user() -> None:
    """After agent.kube, `kubernetes` still works as a whole for code that wants it all."""
    found = python(
        "import json, agent.kube, kubernetes\n"
        "from kubernetes import client, config, watch\n"
        "print(json.dumps({'version': kubernetes.__version__,\n"
        "    'api': client.ApiClient.__name__, 'dynamic': kubernetes.dynamic.__name__,\n"
        "    'loader': config.load_kube_config.__name__, 'watch': watch.Watch.__name__}))\n")
    assert found["api"] == "ApiClient"
    assert found["dynamic"] == "kubernetes.dynamic"
    assert found["loader"] == "load_kube_config"
    assert found["watch"] == "Watch"
    assert re.match(r"\d+\.", str(found["version"]))


GROUPS = ("CORE_V1", "STORAGE_V1", "BATCH_V1", "APPS_V1", "COORDINATION_V1")


def generated_routes() -> list[tuple[str, str, str]]:
    from agent import kube  # noqa: PLC0415 - after the package is registered the agent's way

    classes = {"CORE_V1": "CoreV1Api", "STORAGE_V1": "StorageV1Api", "BATCH_V1": "BatchV1Api",
               "APPS_V1": "AppsV1Api", "COORDINATION_V1": "CoordinationV1Api"}
    return [(group, classes[group], method) for group in GROUPS
            for method in getattr(kube, group)]


@functools.cache
def generated_source(cls: str) -> str:
    """The generated API class's file, read as text: importing it would load every model."""
    spec = importlib.util.find_spec("kubernetes")  # a top-level find runs no __init__
    assert spec is not None and spec.origin is not None
    module = re.sub(r"(?<!^)(?=[A-Z])", "_", cls).lower().replace("v_1", "v1")
    return (Path(spec.origin).parent / "client" / "api" / f"{module}.py").read_text()


def method_source(cls: str, name: str) -> str:
    """One method of the generated class, dedented so that it parses alone."""
    source = generated_source(cls)
    start = source.index(f"\n    def {name}(\n")
    ends = [i for i in (source.find(m, start + 1) for m in ("\n    @", "\n    def ")) if i > 0]
    return textwrap.dedent(source[start:min(ends, default=len(source))])


@pytest.mark.parametrize(("group", "cls", "method"), generated_routes())
def test_each_call_is_the_generated_methods_path_verb_and_arguments(
        group: str, cls: str, method: str) -> None:
    from agent import kube  # noqa: PLC0415

    prefix = {"CORE_V1": "/api/v1", "STORAGE_V1": "/apis/storage.k8s.io/v1",
              "BATCH_V1": "/apis/batch/v1", "APPS_V1": "/apis/apps/v1",
              "COORDINATION_V1": "/apis/coordination.k8s.io/v1"}[group]
    verb, template, names = getattr(kube, group)[method]
    source = method_source(cls, f"_{method}_serialize")
    assert re.search(rf"method='{verb}',\s*resource_path='{re.escape(prefix)}/"
                     rf"{re.escape(template)}'", source), source[-800:]
    (function,) = ast.parse(method_source(cls, method)).body
    assert isinstance(function, ast.FunctionDef)
    params = [a.arg for a in function.args.args if a.arg != "self"]
    assert params[:len(names)] == list(names)
    if verb in ("POST", "PUT", "PATCH"):
        assert params[len(names)] == "body"
