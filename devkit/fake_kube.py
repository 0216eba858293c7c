"""An in-memory Kubernetes API behind the `agent.kube.Kube` interface, for fast tests of the loop.

It keeps the API's rules that the agent's safety depends on: a create on a name that exists is
409; a get, patch or delete of a missing object is 404; every write bumps one cluster-wide
resourceVersion; a label patch carrying a UID, an annotation patch carrying a resourceVersion
and a delete with preconditions are 409 when the object is no longer that one; a watch from a
version older than the retained history is 410 Gone. A label-selected watch sees an object that
stops matching as DELETED and one that starts matching as ADDED, as the apiserver does.

Faults are injected per method (`fail`) and every request is counted like `Kube.requests`.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from typing import Any

from agent.kube import ApiError
from agent.volumes import NodeInfo

PV = dict[str, Any]
WRITES = ("create", "patch", "delete")


def matches(labels: Mapping[str, str], selector: str) -> bool:
    """`k=v`, `k!=v`, `k` and `!k` terms, comma-separated, all of which must hold."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if term.startswith("!"):
            if term[1:] in labels:
                return False
        elif "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.split("=", 1)
            if labels.get(key) != value:
                return False
        elif term not in labels:
            return False
    return True


class FakeKube:
    """PVs, Nodes, StorageClasses, Jobs and Events in memory; thread-safe."""

    def __init__(self, watch_timeout: float = 0.2, history: int = 1000) -> None:
        self._lock = threading.Condition()
        self.rv = 100  # the cluster's resourceVersion, bumped by every write
        self.pvs: dict[str, PV] = {}
        self.nodes: dict[str, dict[str, Any]] = {}
        self.storage_classes: dict[str, dict[str, Any]] = {}
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.events: list[dict[str, Any]] = []
        self.log: list[tuple[int, str, PV, PV | None]] = []  # (rv, type, object, before)
        self.compacted = 0  # watches from a version below this get 410
        self._generation = 0  # bumped by `compact`: watches in flight end with 410
        self.history = history
        self.watch_timeout = watch_timeout
        self.requests: Counter[tuple[str, str]] = Counter()
        self.calls: Counter[str] = Counter()  # by method name
        self.reachable = True
        self._faults: dict[str, list[ApiError | Exception]] = {}
        self._uids = itertools.count(1)
        self.closed = False

    # -- test helpers ---------------------------------------------------------------------------

    def add_node(self, name: str, uid: str = "", labels: Mapping[str, str] | None = None) -> None:
        self.nodes[name] = {"metadata": {"name": name, "uid": uid or f"node-uid-{name}",
                                         "labels": dict(labels or {})}}

    def add_storage_class(self, name: str, reclaim_policy: str = "Delete",
                          mount_options: tuple[str, ...] = ()) -> None:
        sc: dict[str, Any] = {"metadata": {"name": name}, "reclaimPolicy": reclaim_policy}
        if mount_options:
            sc["mountOptions"] = list(mount_options)
        self.storage_classes[name] = sc

    def fail(self, method: str, error: ApiError | Exception | None = None, times: int = 1) -> None:
        """The next `times` calls of `method` raise `error` (a 500 by default)."""
        error = error or ApiError(method, 500, "injected failure")
        with self._lock:
            self._faults.setdefault(method, []).extend([error] * times)

    def writes(self) -> int:
        """API writes so far (Events excluded)."""
        return sum(self.calls[m] for m in ("create_pv", "patch_pv_labels",
                                           "patch_pv_annotations", "delete_pv", "create_job",
                                           "delete_job", "patch_pv_capacity"))

    def put_pv(self, pv: PV) -> PV:
        """Store an object as another client would (the upstream provisioner, an admin)."""
        with self._lock:
            obj = copy.deepcopy(pv)
            meta = obj.setdefault("metadata", {})
            meta.setdefault("uid", f"pv-uid-{next(self._uids)}")
            obj.setdefault("status", {"phase": "Available"})
            before = self.pvs.get(meta["name"])
            self._store(obj, "MODIFIED" if before else "ADDED", before)
            return copy.deepcopy(obj)

    def update_pv(self, name: str, change: Any) -> PV:
        """Another client changes a PV: `change(pv)` edits it in place."""
        with self._lock:
            before = self.pvs[name]
            obj = copy.deepcopy(before)
            change(obj)
            self._store(obj, "MODIFIED", before)
            return copy.deepcopy(obj)

    def bind(self, name: str, claim: str = "claim", namespace: str = "default") -> PV:
        def bound(pv: PV) -> None:
            pv["spec"]["claimRef"] = {"name": claim, "namespace": namespace, "uid": "claim-uid"}
            pv["status"] = {"phase": "Bound"}
        return self.update_pv(name, bound)

    def release(self, name: str) -> PV:
        def released(pv: PV) -> None:
            pv["status"] = {"phase": "Released"}
        return self.update_pv(name, released)

    def remove_pv(self, name: str) -> None:
        """An admin deletes a PV."""
        with self._lock:
            before = self.pvs.pop(name)
            self._record("DELETED", before, before)

    def compact(self) -> None:
        """Forget the watch history: watches in flight and every watch from an older version
        end with 410 Gone (as after an etcd compaction or an apiserver restart)."""
        with self._lock:
            self.compacted = self.rv + 1
            self.log.clear()
            self._generation += 1
            self._lock.notify_all()

    def request_counts(self) -> dict[tuple[str, str], int]:
        return dict(self.requests)

    def reasons(self) -> list[str]:
        return [e["reason"] for e in self.events]

    def close(self) -> None:
        with self._lock:
            self.closed = True
            self._lock.notify_all()

    # -- the Kube interface: reads --------------------------------------------------------------

    def get_node(self, name: str) -> NodeInfo:
        self._enter("get_node", "get")
        node = self.nodes.get(name)
        if node is None:
            raise self._error("get", 404, f'nodes "{name}" not found')
        meta = node["metadata"]
        return NodeInfo(name=meta["name"], uid=meta["uid"], labels=meta.get("labels") or {})

    def get_pv(self, name: str) -> PV | None:
        self._enter("get_pv", "get")
        with self._lock:
            pv = self.pvs.get(name)
            return copy.deepcopy(pv) if pv is not None else None

    def list_pvs(self, label_selector: str = "", limit: int = 500) -> Iterator[tuple[PV, str]]:
        with self._lock:
            found = [copy.deepcopy(pv) for _, pv in sorted(self.pvs.items())
                     if matches(pv["metadata"].get("labels") or {}, label_selector)]
            version = str(self.rv)
        for start in range(0, max(1, len(found)), max(1, limit)):
            self._enter("list_pvs", "list")
            for pv in found[start:start + limit]:
                yield pv, version

    def list_pv_snapshot(self, label_selector: str) -> tuple[dict[str, PV], str]:
        self._enter("list_pv_snapshot", "list")
        with self._lock:
            found = {n: copy.deepcopy(pv) for n, pv in self.pvs.items()
                     if matches(pv["metadata"].get("labels") or {}, label_selector)}
            return found, str(self.rv)

    def watch_pvs(self, label_selector: str, resource_version: str,
                  timeout_seconds: int = 300) -> Iterator[tuple[str, PV]]:
        """Events after `resource_version`, then new ones until `watch_timeout` passes."""
        self._enter("watch_pvs", "watch")
        since = int(resource_version or 0)
        with self._lock:
            if since < self.compacted:
                raise self._error("watch", 410, "too old resource version")
            generation = self._generation
        deadline = time.monotonic() + self.watch_timeout
        while True:
            with self._lock:
                if self._generation != generation:
                    raise self._error("watch", 410, "too old resource version")
                pending = [e for e in self.log if e[0] > since]
                if not pending:
                    left = deadline - time.monotonic()
                    if left <= 0 or self.closed:
                        return
                    self._lock.wait(left)
                    continue
            for rv, kind, obj, before in pending:
                since = rv
                event = _filtered(kind, obj, before, label_selector)
                if event is not None:
                    yield event[0], copy.deepcopy(event[1])

    def get_storage_class(self, name: str) -> dict[str, Any] | None:
        self._enter("get_storage_class", "get")
        sc = self.storage_classes.get(name)
        return copy.deepcopy(sc) if sc is not None else None

    # -- the Kube interface: writes -------------------------------------------------------------

    def create_pv(self, manifest: Mapping[str, Any]) -> PV:
        self._enter("create_pv", "create")
        with self._lock:
            name = manifest["metadata"]["name"]
            if name in self.pvs:
                raise self._error("create", 409, f'persistentvolumes "{name}" already exists')
            obj = copy.deepcopy(dict(manifest))
            obj["metadata"]["uid"] = f"pv-uid-{next(self._uids)}"
            obj["status"] = {"phase": "Available"}
            self._store(obj, "ADDED", None)
            return copy.deepcopy(obj)

    def patch_pv_labels(self, name: str, uid: str, labels: Mapping[str, str]) -> PV:
        self._enter("patch_pv_labels", "patch")
        with self._lock:
            pv = self._existing(name, "patch")
            if uid and pv["metadata"].get("uid") != uid:
                raise self._error("patch", 409, "Precondition failed: UID in precondition")
            obj = copy.deepcopy(pv)
            obj["metadata"].setdefault("labels", {}).update(labels)
            self._store(obj, "MODIFIED", pv)
            return copy.deepcopy(obj)

    def patch_pv_annotations(self, name: str, resource_version: str,
                             annotations: Mapping[str, str | None]) -> PV:
        self._enter("patch_pv_annotations", "patch")
        with self._lock:
            pv = self._existing(name, "patch")
            if resource_version and pv["metadata"]["resourceVersion"] != resource_version:
                raise self._error("patch", 409, "the object has been modified")
            obj = copy.deepcopy(pv)
            current = obj["metadata"].setdefault("annotations", {})
            for key, value in annotations.items():
                if value is None:
                    current.pop(key, None)
                else:
                    current[key] = value
            self._store(obj, "MODIFIED", pv)
            return copy.deepcopy(obj)

    def delete_pv(self, name: str, uid: str, resource_version: str | None = None) -> None:
        self._enter("delete_pv", "delete")
        with self._lock:
            pv = self._existing(name, "delete")
            meta = pv["metadata"]
            if (uid and meta.get("uid") != uid) or \
                    (resource_version and meta["resourceVersion"] != resource_version):
                raise self._error("delete", 409, "Precondition failed")
            if meta.get("finalizers"):  # as the apiserver: marked, gone once they are removed
                if not meta.get("deletionTimestamp"):
                    obj = copy.deepcopy(pv)
                    obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
                    self._store(obj, "MODIFIED", pv)
                return
            del self.pvs[name]
            self._record("DELETED", pv, pv)

    def finalize_pv(self, name: str) -> None:
        """The controller that owns a PV's finalizers removes them (kube-controller-manager's
        pv-protection): a PV being deleted is gone then."""
        with self._lock:
            pv = self.pvs[name]
            assert pv["metadata"].get("deletionTimestamp"), f"{name} is not being deleted"
            del self.pvs[name]
            self._record("DELETED", pv, pv)

    def emit_event(self, obj: Mapping[str, str], event_type: str, reason: str, message: str,
                   host: str) -> None:
        self._enter("emit_event", "create")
        with self._lock:
            self.events.append({"involvedObject": dict(obj), "type": event_type,
                                "reason": reason, "message": message, "host": host})

    def create_job(self, manifest: Mapping[str, Any]) -> dict[str, Any]:
        self._enter("create_job", "create")
        key = (manifest["metadata"]["namespace"], manifest["metadata"]["name"])
        with self._lock:
            if key in self.jobs:
                raise self._error("create", 409, "job exists")
            self.jobs[key] = {**copy.deepcopy(dict(manifest)), "status": {}}
            return copy.deepcopy(self.jobs[key])

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        self._enter("get_job", "get")
        with self._lock:
            job = self.jobs.get((namespace, name))
            return copy.deepcopy(job) if job is not None else None

    def delete_job(self, namespace: str, name: str) -> None:
        self._enter("delete_job", "delete")
        with self._lock:
            if self.jobs.pop((namespace, name), None) is None:
                raise self._error("delete", 404, "job not found")

    # -- plumbing -------------------------------------------------------------------------------

    def _enter(self, method: str, verb: str) -> None:
        with self._lock:  # the agent's writes come from several threads at once
            self.calls[method] += 1
            faults = self._faults.get(method)
            if faults:
                error = faults.pop(0)
                self.requests[(verb, "error")] += 1
                self.reachable = isinstance(error, ApiError) and 0 < error.status < 500
                raise error
            self.requests[(verb, "ok")] += 1
            self.reachable = True

    def _error(self, verb: str, status: int, message: str) -> ApiError:
        self.requests[(verb, "ok")] -= 1
        self.requests[(verb, "error")] += 1
        return ApiError(verb, status, message)

    def _existing(self, name: str, verb: str) -> PV:
        pv = self.pvs.get(name)
        if pv is None:
            raise self._error(verb, 404, f'persistentvolumes "{name}" not found')
        return pv

    def _store(self, obj: PV, kind: str, before: PV | None) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.pvs[obj["metadata"]["name"]] = obj
        self._record(kind, obj, before, bump=False)

    def _record(self, kind: str, obj: PV, before: PV | None, bump: bool = True) -> None:
        if bump:
            self.rv += 1
        self.log.append((self.rv, kind, copy.deepcopy(obj), before))
        if len(self.log) > self.history:
            dropped = self.log.pop(0)
            self.compacted = dropped[0] + 1
        self._lock.notify_all()

    # -- the opt-in behaviours' writes (startup taint, capacity) --------------------------------

    def taint_node(self, name: str, key: str, effect: str = "NoSchedule") -> None:
        with self._lock:
            spec = self.nodes[name].setdefault("spec", {})
            spec.setdefault("taints", []).append({"key": key, "effect": effect})

    def taints(self, name: str) -> list[dict[str, Any]]:
        with self._lock:
            return copy.deepcopy(self.nodes[name].get("spec", {}).get("taints") or [])

    def remove_node_taint(self, name: str, key: str, attempts: int = 5) -> bool:
        self._enter("remove_node_taint", "patch")
        with self._lock:
            node = self.nodes.get(name)
            if node is None:
                raise self._error("patch", 404, f'nodes "{name}" not found')
            taints = node.setdefault("spec", {}).get("taints") or []
            keep = [t for t in taints if t.get("key") != key]
            node["spec"]["taints"] = keep
            return len(keep) != len(taints)

    def patch_pv_capacity(self, name: str, uid: str, resource_version: str,
                          storage: str) -> PV:
        self._enter("patch_pv_capacity", "patch")
        with self._lock:
            pv = self._existing(name, "patch")
            meta = pv["metadata"]
            if meta.get("uid") != uid or meta["resourceVersion"] != resource_version:
                raise self._error("patch", 409, "the object has been modified")
            obj = copy.deepcopy(pv)
            obj["spec"].setdefault("capacity", {})["storage"] = storage
            self._store(obj, "MODIFIED", pv)
            return copy.deepcopy(obj)


def _filtered(kind: str, obj: PV, before: PV | None, selector: str) -> tuple[str, PV] | None:
    """What a watch with `selector` sees of a change."""
    now = kind != "DELETED" and matches(obj["metadata"].get("labels") or {}, selector)
    was = before is not None and matches(before["metadata"].get("labels") or {}, selector)
    if kind == "DELETED":
        return ("DELETED", obj) if was else None
    if now and was:
        return "MODIFIED", obj
    if now:
        return "ADDED", obj
    if was:
        return "DELETED", obj
    return None
