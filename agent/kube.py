"""The only code that talks to the Kubernetes API.

Objects cross this boundary as plain dicts (the API's JSON), never as client models, so the
pure planner can reason about them and tests can build them by hand. API errors are mapped to
`ApiError` here; nothing above this module imports `kubernetes`. Every request is counted by
verb and outcome, for metrics and for the benchmarks that claim the agent is light.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from agent.volumes import NodeInfo

log = logging.getLogger(__name__)

T = TypeVar("T")
PV = dict[str, Any]
EVENTS_NAMESPACE = "default"  # where the kubelet records events of cluster-scoped objects
COMPONENT = "localpv-agent"


class ApiError(Exception):
    """A failed API request; `status` is the HTTP status, 0 when the server was not reached."""

    def __init__(self, verb: str, status: int, message: str) -> None:
        self.verb = verb
        self.status = status
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
                 timeout: float = 30.0) -> None:
        cfg = client.Configuration()
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        else:
            config.load_incluster_config(client_configuration=cfg)
        # No retries inside the client: a stalled API would hold one call for several
        # timeouts. The agent retries with its own backoff, and each failure shows.
        cfg.retries = 0
        api = client.ApiClient(cfg)
        self._core = client.CoreV1Api(api)
        self._storage = client.StorageV1Api(api)
        self._batch = client.BatchV1Api(api)
        self._timeout = timeout
        self.requests: Counter[tuple[str, str]] = Counter()  # (verb, "ok" | "error")
        self._requests_lock = threading.Lock()  # requests come from several threads
        self.reachable = False  # did the last request get an answer from a healthy server?
        self._observe = observe

    def request_counts(self) -> dict[tuple[str, str], int]:
        """Requests so far by (verb, "ok" | "error"), read safely from any thread."""
        with self._requests_lock:
            return dict(self.requests)

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
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": limit, "label_selector": label_selector}
            if token:
                kwargs["_continue"] = token
            page = self._call("list", lambda kw=kwargs: self._core.list_persistent_volume(  # type: ignore[misc]
                _preload_content=False, _request_timeout=self._timeout, **kw))
            version = page["metadata"].get("resourceVersion", "")
            for item in page.get("items") or []:
                yield item, version
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
        w = watch.Watch()
        start = time.monotonic()
        try:
            for event in w.stream(
                self._core.list_persistent_volume, label_selector=label_selector,
                resource_version=resource_version, timeout_seconds=timeout_seconds,
                allow_watch_bookmarks=True, deserialize=False,
                _request_timeout=timeout_seconds + 30,
            ):
                yield event["type"], event["object"]
            self._count("watch", "ok", time.monotonic() - start)
        except ApiException as exc:
            self._count("watch", "error", time.monotonic() - start, exc.status or 0)
            raise ApiError("watch", exc.status or 0, str(exc.reason)) from None
        except KeyError:
            # An in-stream ERROR event (the apiserver's 410 for an expired resourceVersion):
            # with deserialize=False the client fails to read it (KeyError 'raw_object').
            self._count("watch", "error", time.monotonic() - start, 410)
            raise ApiError("watch", 410, "the watch ended with an error event (its "
                                         "resourceVersion expired)") from None
        except (HTTPError, OSError) as exc:
            self._count("watch", "error", time.monotonic() - start, 0)
            raise ApiError("watch", 0, str(exc)) from None
        finally:
            w.stop()

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
        pre = client.V1Preconditions(uid=uid, resource_version=resource_version)
        self._call("delete", lambda: self._core.delete_persistent_volume(
            name, body=client.V1DeleteOptions(preconditions=pre),
            _preload_content=False, _request_timeout=self._timeout))

    def emit_event(self, obj: Mapping[str, str], event_type: str, reason: str, message: str,
                   host: str) -> None:
        """A core/v1 Event about an object: in its namespace, or `default` for cluster-scoped
        ones (a Node, a PV), as the kubelet does."""
        now = datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
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
        options = client.V1DeleteOptions(propagation_policy="Background")
        self._call("delete", lambda: self._batch.delete_namespaced_job(
            name, namespace, body=options, _preload_content=False,
            _request_timeout=self._timeout))

    # -- plumbing ------------------------------------------------------------------------------

    def _call(self, verb: str, request: Callable[[], Any]) -> Any:
        start = time.monotonic()
        try:
            response = request()
            data = json.loads(response.data or b"{}")
        except ApiException as exc:
            self._count(verb, "error", time.monotonic() - start, exc.status or 0)
            raise ApiError(verb, exc.status or 0, _api_message(exc)) from None
        except (HTTPError, OSError, ValueError) as exc:
            self._count(verb, "error", time.monotonic() - start, 0)
            raise ApiError(verb, 0, str(exc)) from None
        self._count(verb, "ok", time.monotonic() - start)
        return data

    def _count(self, verb: str, outcome: str, seconds: float, status: int = 200) -> None:
        with self._requests_lock:
            self.requests[(verb, outcome)] += 1
        self.reachable = 0 < status < 500
        if self._observe is not None:
            self._observe(verb, outcome, seconds)

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

    def __init__(self, kubeconfig: str | None = None, observe: RequestObserver | None = None,
                 timeout: float = 30.0) -> None:
        super().__init__(kubeconfig, observe=observe, timeout=timeout)
        api = self._core.api_client
        self._apps = client.AppsV1Api(api)
        self._coordination = client.CoordinationV1Api(api)

    def list_all(self, kind: str, field_selector: str = "",
                 limit: int = 500) -> tuple[list[dict[str, Any]], str]:
        """Every object of a kind in `LISTS`, page by page, and the list's resourceVersion."""
        lister = getattr(self._core, dict(self.LISTS)[kind])
        found: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": limit, "field_selector": field_selector}
            if token:
                kwargs["_continue"] = token
            page = self._call("list", lambda kw=kwargs: lister(  # type: ignore[misc]
                _preload_content=False, _request_timeout=self._timeout, **kw))
            found.extend(page.get("items") or [])
            token = page["metadata"].get("continue")
            if not token:
                return found, page["metadata"].get("resourceVersion", "")

    def watch_all(self, kind: str, resource_version: str, field_selector: str = "",
                  timeout_seconds: int = 300) -> Iterator[tuple[str, dict[str, Any]]]:
        """Watch events (type, object) of a kind from a version; ApiError(410) when expired."""
        lister = getattr(self._core, dict(self.LISTS)[kind])
        w = watch.Watch()
        start = time.monotonic()
        try:
            for event in w.stream(
                lister, field_selector=field_selector, resource_version=resource_version,
                timeout_seconds=timeout_seconds, allow_watch_bookmarks=True, deserialize=False,
                _request_timeout=timeout_seconds + 30,
            ):
                yield event["type"], event["object"]
            self._count("watch", "ok", time.monotonic() - start)
        except ApiException as exc:
            self._count("watch", "error", time.monotonic() - start, exc.status or 0)
            raise ApiError("watch", exc.status or 0, str(exc.reason)) from None
        except KeyError:  # an in-stream ERROR event (410), unreadable with deserialize=False
            self._count("watch", "error", time.monotonic() - start, 410)
            raise ApiError("watch", 410, "the watch ended with an error event (its "
                                         "resourceVersion expired)") from None
        except (HTTPError, OSError) as exc:
            self._count("watch", "error", time.monotonic() - start, 0)
            raise ApiError("watch", 0, str(exc)) from None
        finally:
            w.stop()

    def get_pvc(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self._get_or_none(lambda: self._core.read_namespaced_persistent_volume_claim(
            name, namespace, _preload_content=False, _request_timeout=self._timeout))

    def delete_pvc(self, namespace: str, name: str, uid: str, resource_version: str) -> None:
        """Delete a claim only if it is still exactly the object that was decided on."""
        pre = client.V1Preconditions(uid=uid, resource_version=resource_version or None)
        self._call("delete", lambda: self._core.delete_namespaced_persistent_volume_claim(
            name, namespace, body=client.V1DeleteOptions(preconditions=pre),
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
