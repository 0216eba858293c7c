"""The only code that talks to the Kubernetes API.

Objects cross this boundary as plain dicts (the API's JSON), never as client models, so the
pure planner can reason about them and tests can build them by hand. API errors are mapped to
`ApiError` here; nothing above this module imports `kubernetes`. Every request is counted by
verb and outcome, for metrics and for the benchmarks that claim the agent is light.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from urllib3 import HTTPConnectionPool, ProxyManager, Timeout
from urllib3.exceptions import HTTPError


def _deferred_package(name: str) -> None:
    """Register the package `name` without running its `__init__`, so its submodules load alone.

    `import kubernetes` runs an `__init__` that loads the whole client (its config loaders with
    oauthlib and requests, dynamic, stream, the pydantic ApiClient): ~25 MiB the agent never
    uses. The package's module object is made from its own spec, so it has the real `__path__`
    and submodules import as usual; the first attribute that is not a submodule (say
    `kubernetes.__version__`) runs the real `__init__` into that same object, so any other user
    in the process still sees the whole package. A package already imported is left as it is.
    """
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        raise ImportError(f"{name} is not an importable package")
    module = importlib.util.module_from_spec(spec)
    loader = spec.loader

    def complete(attr: str) -> Any:
        if not attr.startswith("__") and importlib.util.find_spec(f"{name}.{attr}") is not None:
            return importlib.import_module(f"{name}.{attr}")
        del module.__dict__["__getattr__"]  # from here on it is the real package
        loader.exec_module(module)
        return getattr(module, attr)

    module.__dict__["__getattr__"] = complete
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


_deferred_package("kubernetes")
_deferred_package("kubernetes.config")  # its __init__ loads the kubeconfig loader, in-cluster too

from kubernetes.client.configuration import Configuration  # noqa: E402
from kubernetes.client.exceptions import ApiException  # noqa: E402
from kubernetes.client.rest import RESTClientObject, RESTResponse  # noqa: E402
from kubernetes.watch.watch import iter_resp_lines  # noqa: E402

from agent.backoff import exponential  # noqa: E402
from agent.pv import rfc3339  # noqa: E402
from agent.volumes import NodeInfo  # noqa: E402

log = logging.getLogger(__name__)

T = TypeVar("T")
PV = dict[str, Any]
EVENTS_NAMESPACE = "default"  # where the kubelet records events of cluster-scoped objects
COMPONENT = "localpv-agent"
# A 429 (the apiserver's max-inflight or priority-and-fairness limit) is retried here, since
# the server asked for it: after its Retry-After, else after a jittered backoff, a few times.
THROTTLE_RETRIES = 5  # 429s taken per request before it fails (the next pass tries again)
THROTTLE_WAIT_MAX = 10.0  # seconds waited after one 429, whatever Retry-After says
THROTTLE_BACKOFF = 0.5  # first wait after a 429 without Retry-After, doubling to the max
AUTH_REFRESH = 1.0  # seconds the auth headers (a token's) are reused before asking the client


class ApiError(Exception):
    """A failed API request; `status` is the HTTP status, 0 when the server was not reached."""

    def __init__(self, verb: str, status: int, message: str,
                 retry_after: float | None = None) -> None:
        self.verb = verb
        self.status = status
        self.retry_after = retry_after  # seconds the server asked to wait (429, 503)
        super().__init__(f"{verb}: HTTP {status}: {message}" if status else f"{verb}: {message}")

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def gone(self) -> bool:
        return self.status == 410


class Kube:
    """A small typed facade over the client, for the handful of calls the agent makes."""

    def __init__(self, kubeconfig: str | None = None, observe: RequestObserver | None = None,
                 timeout: float = 30.0, connections: int = 0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        cfg = Configuration()
        if kubeconfig:  # out of the cluster only: this loader brings oauthlib and pydantic
            kube_config = importlib.import_module("kubernetes.config.kube_config")
            kube_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        else:
            in_cluster = importlib.import_module("kubernetes.config.incluster_config")
            in_cluster.load_incluster_config(client_configuration=cfg)
        # No retries inside the client: a stalled API would hold one call for several
        # timeouts. The agent retries with its own backoff, and each failure shows.
        cfg.retries = 0
        # Kept-alive connections: one per concurrent write, plus the watch, Events, heartbeats.
        cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, connections + 4)
        self._api = _Rest(cfg)
        self._core = _Group(self._api, "/api/v1", CORE_V1)
        self._timeout = timeout
        self._requests = _Requests(observe, sleep)
        self._call = self._requests.call
        self._watch = self._requests.watch

    # The other API groups are built on first use.
    @functools.cached_property
    def _storage(self) -> _Group:
        return _Group(self._api, "/apis/storage.k8s.io/v1", STORAGE_V1)

    @functools.cached_property
    def _batch(self) -> _Group:
        return _Group(self._api, "/apis/batch/v1", BATCH_V1)

    def request_counts(self) -> dict[tuple[str, str], int]:
        """Requests so far by (verb, "ok" | "error"), read safely from any thread."""
        return self._requests.counts()

    @property
    def reachable(self) -> bool:
        """Did the last request get an answer from a healthy server?"""
        return self._requests.reachable

    # -- reads ---------------------------------------------------------------------------------

    def get_node(self, name: str) -> NodeInfo:
        node = self._call("get", lambda: self._core.read_node(
            name, _preload_content=False, _request_timeout=self._timeout))
        meta = node["metadata"]
        return NodeInfo(name=meta["name"], uid=meta["uid"], labels=meta.get("labels") or {})

    def get_pv(self, name: str) -> PV | None:
        try:
            return self._call("get", lambda: self._core.read_persistent_volume(
                name, _preload_content=False, _request_timeout=self._timeout))
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    def list_pvs(self, label_selector: str = "", limit: int = 500) -> Iterator[tuple[PV, str]]:
        """All PVs matching the selector, page by page, each with the list's resourceVersion."""
        for page in self._pages(self._core.list_persistent_volume, limit,
                                label_selector=label_selector):
            version = page["metadata"].get("resourceVersion", "")
            for item in page.get("items") or []:
                yield item, version

    def _pages(self, lister: Callable[..., Any], limit: int,
               **params: str) -> Iterator[dict[str, Any]]:
        """A list request's pages, each requested when the previous one is consumed."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": limit, **params}
            if token:
                kwargs["_continue"] = token
            page = self._call("list", lambda kw=kwargs: lister(  # type: ignore[misc]
                _preload_content=False, _request_timeout=self._timeout, **kw))
            yield page
            token = page["metadata"].get("continue")
            if not token:
                return

    def list_pv_snapshot(self, label_selector: str) -> tuple[dict[str, PV], str]:
        pvs: dict[str, PV] = {}
        version = ""
        for pv, page_version in self.list_pvs(label_selector):
            pvs[pv["metadata"]["name"]] = pv
            version = page_version
        if not version:  # an empty list still has a version; fetch it with a tiny page
            page = self._call("list", lambda: self._core.list_persistent_volume(
                label_selector=label_selector, limit=1, _preload_content=False,
                _request_timeout=self._timeout))
            version = page["metadata"].get("resourceVersion", "")
        return pvs, version

    def watch_pvs(self, label_selector: str, resource_version: str,
                  timeout_seconds: int = 300) -> Iterator[tuple[str, PV]]:
        """Watch events (type, PV) from a version; raises ApiError(410) when it expired."""
        return self._watch(self._core.list_persistent_volume, timeout_seconds,
                           label_selector=label_selector, resource_version=resource_version)

    def get_storage_class(self, name: str) -> dict[str, Any] | None:
        try:
            return self._call("get", lambda: self._storage.read_storage_class(
                name, _preload_content=False, _request_timeout=self._timeout))
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    # -- writes --------------------------------------------------------------------------------

    def create_pv(self, manifest: Mapping[str, Any]) -> PV:
        body: Any = dict(manifest)
        return self._call("create", lambda: self._core.create_persistent_volume(
            body, _preload_content=False, _request_timeout=self._timeout))

    def patch_pv_labels(self, name: str, uid: str, labels: Mapping[str, str]) -> PV:
        """Add labels to a PV, only if it is still the object (UID) that was decided on."""
        body = {"metadata": {"uid": uid, "labels": dict(labels)}}
        return self._call("patch", lambda: self._core.patch_persistent_volume(
            name, body, _preload_content=False, _request_timeout=self._timeout))

    def patch_pv_annotations(self, name: str, resource_version: str,
                             annotations: Mapping[str, str | None]) -> PV:
        """Set (or, with None, remove) annotations, only on the version that was decided on."""
        body = {"metadata": {"resourceVersion": resource_version,
                             "annotations": dict(annotations)}}
        return self._call("patch", lambda: self._core.patch_persistent_volume(
            name, body, _preload_content=False, _request_timeout=self._timeout))

    def delete_pv(self, name: str, uid: str, resource_version: str | None = None) -> None:
        """Delete a PV only if it is still exactly the object that was decided on."""
        options = _delete_options(uid, resource_version)
        self._call("delete", lambda: self._core.delete_persistent_volume(
            name, body=options,
            _preload_content=False, _request_timeout=self._timeout))

    def emit_event(self, obj: Mapping[str, str], event_type: str, reason: str, message: str,
                   host: str) -> None:
        """A core/v1 Event about an object: in its namespace, or `default` for cluster-scoped
        ones (a Node, a PV), as the kubelet does."""
        now = rfc3339(time.time(), micro=True)
        name = f"{obj['name']}.{time.time_ns():x}"
        namespace = obj.get("namespace") or EVENTS_NAMESPACE
        body: Any = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": {**obj, "namespace": obj.get("namespace", "")},
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT, "host": host},
            "reportingComponent": COMPONENT,
            "reportingInstance": host,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self._call("create", lambda: self._core.create_namespaced_event(
            namespace, body, _preload_content=False, _request_timeout=self._timeout))

    def create_job(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        body: Any = dict(manifest)
        namespace = manifest["metadata"]["namespace"]
        return self._call("create", lambda: self._batch.create_namespaced_job(
            namespace, body, _preload_content=False, _request_timeout=self._timeout))

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call("get", lambda: self._batch.read_namespaced_job(
                name, namespace, _preload_content=False, _request_timeout=self._timeout))
        except ApiError as exc:
            if exc.not_found:
                return None
            raise

    def delete_job(self, namespace: str, name: str) -> None:
        """Delete a finished Job and its pods."""
        options = {"propagationPolicy": "Background"}
        self._call("delete", lambda: self._batch.delete_namespaced_job(
            name, namespace, body=options, _preload_content=False,
            _request_timeout=self._timeout))

    # -- writes of the opt-in behaviours (startup taint, capacity) -------------------------------

    def patch_pv_capacity(self, name: str, uid: str, resource_version: str,
                          storage: str) -> PV:
        """Set a PV's capacity, only on the object (UID) and version that was decided on."""
        body = {"metadata": {"uid": uid, "resourceVersion": resource_version},
                "spec": {"capacity": {"storage": storage}}}
        return self._call("patch", lambda: self._core.patch_persistent_volume(
            name, body, _preload_content=False, _request_timeout=self._timeout))

    def remove_node_taint(self, name: str, key: str, attempts: int = 5) -> bool:
        """Remove the taints with `key` from a Node; True when there was one. A JSON patch that
        first tests the taint list is still the one read, so a taint someone else added or
        changed meanwhile is never dropped: the test fails and the patch is retried on a fresh
        read."""
        for _ in range(attempts):
            node = self._call("get", lambda: self._core.read_node(
                name, _preload_content=False, _request_timeout=self._timeout))
            taints = (node.get("spec") or {}).get("taints") or []
            keep = [t for t in taints if t.get("key") != key]
            if len(keep) == len(taints):
                return False
            patch: Any = [{"op": "test", "path": "/spec/taints", "value": taints},
                          {"op": "replace", "path": "/spec/taints", "value": keep}]
            try:
                self._call("patch", lambda p=patch: self._core.patch_node(  # type: ignore[misc]
                    name, p, _content_type="application/json-patch+json",
                    _preload_content=False, _request_timeout=self._timeout))
                return True
            except ApiError as exc:
                if exc.status not in (409, 422):  # 422: the test op failed (taints changed)
                    raise
                log.info("node %s: taints changed meanwhile; reading them again", name)
        raise ApiError("patch", 409, f"node {name}: its taints kept changing")


RequestObserver = Callable[[str, str, float], None]


class _Requests:
    """Every request's plumbing: its answer decoded, its failure turned into an ApiError, a 429
    waited out (at most THROTTLE_RETRIES times), and each counted by verb and outcome."""

    def __init__(self, observe: RequestObserver | None, sleep: Callable[[float], None]) -> None:
        self._observe = observe
        self._sleep = sleep
        self._counts: Counter[tuple[str, str]] = Counter()  # (verb, "ok" | "error" | ...)
        self._lock = threading.Lock()  # requests come from several threads
        self.reachable = False  # did the last request get an answer from a healthy server?

    def counts(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)

    def call(self, verb: str, request: Callable[[], Any]) -> Any:
        """One request; a 429 is waited out and sent again, at most THROTTLE_RETRIES times."""
        for attempt in range(1, THROTTLE_RETRIES + 2):
            try:
                return self._once(verb, request)
            except ApiError as exc:
                if exc.status != 429 or attempt > THROTTLE_RETRIES:
                    raise
                wait = exc.retry_after
                if wait is None:
                    wait = exponential(attempt, THROTTLE_BACKOFF, THROTTLE_WAIT_MAX)
                wait = min(max(wait, 0.0), THROTTLE_WAIT_MAX)
                log.debug("%s: throttled by the API (429), retrying in %.2fs", verb, wait)
                self._sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _once(self, verb: str, request: Callable[[], Any]) -> Any:
        start = time.monotonic()
        try:
            response = request()
            data = json.loads(response.data or b"{}")
        except ApiException as exc:
            status = exc.status or 0
            self.count(verb, "throttled" if status == 429 else "error",
                        time.monotonic() - start, status)
            raise ApiError(verb, status, _api_message(exc),
                           _retry_after(exc.headers)) from None
        except (HTTPError, OSError, ValueError) as exc:
            self.count(verb, "error", time.monotonic() - start, 0)
            raise ApiError(verb, 0, str(exc)) from None
        self.count(verb, "ok", time.monotonic() - start)
        return data

    def count(self, verb: str, outcome: str, seconds: float, status: int = 200) -> None:
        with self._lock:
            self._counts[(verb, outcome)] += 1
        self.reachable = 0 < status < 500
        if self._observe is not None:
            self._observe(verb, outcome, seconds)

    def watch(self, lister: Callable[..., Any], timeout_seconds: int,
               **params: str) -> Iterator[tuple[str, Any]]:
        """One watch request: its events as (type, raw object). Every failure is an ApiError
        (0 when no status came back), and an in-stream ERROR event is the 410 it carries."""
        w = _Watch()
        start = time.monotonic()
        try:
            for event in w.stream(
                lister, **params, timeout_seconds=timeout_seconds, allow_watch_bookmarks=True,
                deserialize=False, _request_timeout=timeout_seconds + 30,
            ):
                yield event["type"], event["object"]
            self.count("watch", "ok", time.monotonic() - start)
        except ApiException as exc:
            self.count("watch", "error", time.monotonic() - start, exc.status or 0)
            raise ApiError("watch", exc.status or 0, str(exc.reason)) from None
        except KeyError:
            # An in-stream ERROR event (the apiserver's 410 for an expired resourceVersion).
            self.count("watch", "error", time.monotonic() - start, 410)
            raise ApiError("watch", 410, "the watch ended with an error event (its "
                                         "resourceVersion expired)") from None
        except (HTTPError, OSError) as exc:
            self.count("watch", "error", time.monotonic() - start, 0)
            raise ApiError("watch", 0, str(exc)) from None
        finally:
            w.stop()


def _retry_after(headers: Any) -> float | None:
    """Retry-After in seconds (the apiserver sends whole seconds); None when absent or a
    date, which the apiserver never sends."""
    try:
        value = headers.get("Retry-After") if headers is not None else None
        return max(0.0, float(value)) if value is not None else None
    except (TypeError, ValueError):
        return None


def _api_message(exc: ApiException) -> str:
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except (TypeError, ValueError):
        return str(exc.reason)


class ClusterKube(Kube):
    """The cluster-wide calls of `localpv-agent remediate`: Nodes and PVs of every node, the
    claims, pods and StatefulSets of lost nodes' PVs, and the Lease of its leader election.
    Objects are plain dicts here too; reads of a missing object answer None."""

    LISTS = (("nodes", "list_node"), ("persistentvolumes", "list_persistent_volume"),
             ("pods", "list_pod_for_all_namespaces"))  # the kinds list_all and watch_all know

    @functools.cached_property
    def _apps(self) -> _Group:
        return _Group(self._api, "/apis/apps/v1", APPS_V1)

    @functools.cached_property
    def _coordination(self) -> _Group:
        return _Group(self._api, "/apis/coordination.k8s.io/v1", COORDINATION_V1)

    def list_all(self, kind: str, field_selector: str = "",
                 limit: int = 500) -> tuple[list[dict[str, Any]], str]:
        """Every object of a kind in `LISTS`, page by page, and the list's resourceVersion."""
        lister = getattr(self._core, dict(self.LISTS)[kind])
        found: list[dict[str, Any]] = []
        version = ""
        for page in self._pages(lister, limit, field_selector=field_selector):
            found.extend(page.get("items") or [])
            version = page["metadata"].get("resourceVersion", "")
        return found, version

    def watch_all(self, kind: str, resource_version: str, field_selector: str = "",
                  timeout_seconds: int = 300) -> Iterator[tuple[str, dict[str, Any]]]:
        """Watch events (type, object) of a kind from a version; ApiError(410) when expired."""
        lister = getattr(self._core, dict(self.LISTS)[kind])
        return self._watch(lister, timeout_seconds, field_selector=field_selector,
                           resource_version=resource_version)

    def get_pvc(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get_or_none(lambda: self._core.read_namespaced_persistent_volume_claim(
            name, namespace, _preload_content=False, _request_timeout=self._timeout))

    def delete_pvc(self, namespace: str, name: str, uid: str, resource_version: str) -> None:
        """Delete a claim only if it is still exactly the object that was decided on."""
        options = _delete_options(uid, resource_version or None)
        self._call("delete", lambda: self._core.delete_namespaced_persistent_volume_claim(
            name, namespace, body=options,
            _preload_content=False, _request_timeout=self._timeout))

    def list_pods(self, namespace: str) -> list[dict[str, Any]]:
        page = self._call("list", lambda: self._core.list_namespaced_pod(
            namespace, _preload_content=False, _request_timeout=self._timeout))
        return list(page.get("items") or [])

    def get_statefulset(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get_or_none(lambda: self._apps.read_namespaced_stateful_set(
            name, namespace, _preload_content=False, _request_timeout=self._timeout))

    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get_or_none(lambda: self._coordination.read_namespaced_lease(
            name, namespace, _preload_content=False, _request_timeout=self._timeout))

    def create_lease(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any]:
        manifest: Any = dict(body)
        return self._call("create", lambda: self._coordination.create_namespaced_lease(
            namespace, manifest, _preload_content=False, _request_timeout=self._timeout))

    def replace_lease(self, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Write the whole Lease; fails with 409 unless its resourceVersion is still current."""
        manifest: Any = dict(body)
        return self._call("update", lambda: self._coordination.replace_namespaced_lease(
            name, namespace, manifest, _preload_content=False, _request_timeout=self._timeout))

    def _get_or_none(self, request: Callable[[], Any]) -> dict[str, Any] | None:
        try:
            return self._call("get", request)
        except ApiError as exc:
            if exc.not_found:
                return None
            raise


# -- the REST layer ------------------------------------------------------------------------------
#
# The generated API classes (CoreV1Api...) import a pydantic model for every kind they name,
# ~25 MiB for the three groups the agent uses, only to send dicts and read bytes. The agent's
# calls are these few paths; each is called as the generated method of the same name (path
# parameters first, then the body), over the client's own Configuration (TLS, proxy, token
# refresh) and RESTClientObject (urllib3 pool, keep-alive).

_NS = "namespaces/{namespace}/"
Route = tuple[str, str, tuple[str, ...]]  # HTTP verb, path in the group, path parameters
CORE_V1: dict[str, Route] = {
    "read_node": ("GET", "nodes/{name}", ("name",)),
    "list_node": ("GET", "nodes", ()),
    "patch_node": ("PATCH", "nodes/{name}", ("name",)),
    "read_persistent_volume": ("GET", "persistentvolumes/{name}", ("name",)),
    "list_persistent_volume": ("GET", "persistentvolumes", ()),
    "create_persistent_volume": ("POST", "persistentvolumes", ()),
    "patch_persistent_volume": ("PATCH", "persistentvolumes/{name}", ("name",)),
    "delete_persistent_volume": ("DELETE", "persistentvolumes/{name}", ("name",)),
    "create_namespaced_event": ("POST", _NS + "events", ("namespace",)),
    "list_pod_for_all_namespaces": ("GET", "pods", ()),
    "list_namespaced_pod": ("GET", _NS + "pods", ("namespace",)),
    "read_namespaced_persistent_volume_claim": (
        "GET", _NS + "persistentvolumeclaims/{name}", ("name", "namespace")),
    "delete_namespaced_persistent_volume_claim": (
        "DELETE", _NS + "persistentvolumeclaims/{name}", ("name", "namespace")),
}
STORAGE_V1: dict[str, Route] = {"read_storage_class": ("GET", "storageclasses/{name}", ("name",))}
BATCH_V1: dict[str, Route] = {
    "create_namespaced_job": ("POST", _NS + "jobs", ("namespace",)),
    "read_namespaced_job": ("GET", _NS + "jobs/{name}", ("name", "namespace")),
    "delete_namespaced_job": ("DELETE", _NS + "jobs/{name}", ("name", "namespace")),
}
APPS_V1: dict[str, Route] = {
    "read_namespaced_stateful_set": ("GET", _NS + "statefulsets/{name}", ("name", "namespace")),
}
COORDINATION_V1: dict[str, Route] = {
    "read_namespaced_lease": ("GET", _NS + "leases/{name}", ("name", "namespace")),
    "create_namespaced_lease": ("POST", _NS + "leases", ("namespace",)),
    "replace_namespaced_lease": ("PUT", _NS + "leases/{name}", ("name", "namespace")),
}


def _delete_options(uid: str, resource_version: str | None) -> dict[str, Any]:
    """DeleteOptions whose preconditions are the UID (and version) that was decided on."""
    pre = {"uid": uid} if resource_version is None else {
        "uid": uid, "resourceVersion": resource_version}
    return {"preconditions": pre}


def _camel(name: str) -> str:
    """A query parameter as the API spells it: label_selector -> labelSelector."""
    head, *rest = name.lstrip("_").split("_")
    return head + "".join(part.title() for part in rest)


class _Rest:
    """Requests over the client's RESTClientObject's connections (TLS, proxy, pool size, no
    retries), authenticated as its ApiClient would.

    Lean on purpose: the agent's writes come a thousand at once when disks are mounted together,
    and every microsecond of the client's own per-request work is CPU the apiserver on the same
    node does not get. So a request goes straight to the host's connection pool (the pool
    manager's URL parsing and pool lookup, and the client's content-type checks, are per
    request), and the auth headers are refreshed at most once a second (the client's refresh
    hook re-applies the whole kubeconfig, the proxy environment lookup included, each time).
    """

    def __init__(self, cfg: Configuration) -> None:
        self.configuration = cfg
        self._rest = RESTClientObject(cfg)
        manager = self._rest.pool_manager
        # Through an HTTP proxy the manager rewrites each request; otherwise the host's pool.
        self._pool: HTTPConnectionPool | None = (
            None if isinstance(manager, ProxyManager) else manager.connection_from_url(cfg.host))
        self._auth: tuple[float, dict[str, str]] | None = None  # (when, headers)

    def _auth_headers(self) -> dict[str, str]:
        now = time.monotonic()
        cached = self._auth  # replaced whole: threads may share it without a lock
        if cached is None or now - cached[0] >= AUTH_REFRESH:
            auths: dict[str, Any] = dict(self.configuration.auth_settings())  # refreshes tokens
            cached = self._auth = (now, {a["key"]: a["value"] for a in auths.values()
                                         if a["in"] == "header" and a["value"]})
        return cached[1]

    def request(  # noqa: PLR0913 - the generated methods' options, passed through
            self, verb: str, path: str, query: Mapping[str, Any], body: Any = None, *,
            content_type: str | None = None, timeout: float | None = None) -> Any:
        """The urllib3 response of a 2xx answer, unread; ApiException for any other status."""
        params = {_camel(k): ("true" if v is True else "false" if v is False else v)
                  for k, v in query.items() if v is not None and v != ""}
        target = path + (f"?{urlencode(params)}" if params else "")
        headers = {"Accept": "application/json", "User-Agent": COMPONENT}
        data = None
        if body is not None:
            if content_type is None and verb == "PATCH":
                content_type = ("application/json-patch+json" if isinstance(body, list)
                                else "application/strategic-merge-patch+json")
            headers["Content-Type"] = content_type or "application/json"
            data = json.dumps(body).encode()
        headers.update(self._auth_headers())
        options: dict[str, Any] = {
            "body": data, "headers": headers, "preload_content": False,
            "timeout": Timeout(total=timeout) if timeout else Timeout.DEFAULT_TIMEOUT}
        if self._pool is not None:
            response = self._pool.urlopen(verb, target, redirect=False, assert_same_host=False,
                                          **options)
        else:
            response = self._rest.pool_manager.urlopen(verb, self.configuration.host + target,
                                                       **options)
        if not 200 <= response.status <= 299:
            answer = RESTResponse(response)
            answer.read()
            raise ApiException.from_response(http_resp=answer, body=None, data=None)
        return response


class _Group:
    """One API group's calls, named and called as the generated client's methods are."""

    def __init__(self, api: _Rest, prefix: str, routes: Mapping[str, Route]) -> None:
        self.api_client = api
        self._prefix = prefix
        self._routes = routes

    def __getattr__(self, method: str) -> Callable[..., Any]:
        try:
            verb, template, names = self._routes[method]
        except KeyError:
            raise AttributeError(method) from None
        prefix, api = self._prefix, self.api_client

        def call(*args: Any, _preload_content: bool = False, _request_timeout: Any = None,
                 _content_type: str | None = None, **query: Any) -> Any:
            del _preload_content  # always raw: the caller reads the JSON itself
            values = {k: quote(str(v), safe="") for k, v in zip(names, args, strict=False)}
            body = args[len(names)] if len(args) > len(names) else query.pop("body", None)
            path = f"{prefix}/{template.format(**values)}"
            return api.request(verb, path, query, body, content_type=_content_type,
                               timeout=_request_timeout)

        call.__name__ = method
        return call


class _Watch:
    """A watch request read line by line: its events as the API sends them, plain dicts."""

    def __init__(self) -> None:
        self._response: Any = None

    def stream(self, lister: Callable[..., Any], deserialize: bool = False,
               **params: Any) -> Iterator[dict[str, Any]]:
        del deserialize  # always raw: objects stay the API's JSON
        self._response = lister(watch=True, **params)
        try:
            for line in iter_resp_lines(self._response):
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":  # a Status, e.g. the 410 of an expired version
                    raise KeyError(str((event.get("object") or {}).get("message", "")))
                yield event
        finally:
            self.stop()

    def stop(self) -> None:
        """Close the stream: its connection is not reused half read."""
        response, self._response = self._response, None
        if response is not None:
            response.close()
            response.release_conn()
