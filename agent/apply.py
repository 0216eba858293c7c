"""The pass's PV writes: create, adopt, resize, withdraw, each exactly as the plan decided.

Every write names the object it was decided on (a create fails on a name that exists; a label
patch carries the UID; a capacity patch and a delete carry UID and resourceVersion
preconditions), so a PV that
changed since the pass looked is never overwritten or deleted: the write fails, the PV is read
again, and the next pass decides anew.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agent import pv as pvs
from agent.context import Context
from agent.kube import ApiError
from agent.notices import Notice, Once, Reason, Scope
from agent.plan import Plan, Resize, Withdrawal, upstream_adoptions
from agent.volumes import MANAGED_BY_LABEL

log = logging.getLogger(__name__)

@dataclass
class Applied:
    created_by_mode: dict[str, int] = field(default_factory=dict)
    adopted: int = 0
    withdrawn: int = 0
    resized: int = 0
    errors: int = 0  # failed writes (a precondition that failed is not an error)

class PVWriter:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def apply(self, the_plan: Plan) -> Applied:
        done = Applied()
        for adoption in the_plan.adopt:
            try:
                self.ctx.pvs.patch_labels(adoption.name, adoption.uid, adoption.labels)
                done.adopted += 1
                log.info("adopted PV %s: labelled %s", adoption.name, dict(adoption.labels))
            except ApiError as exc:
                done.errors += 1
                log.warning("adopting PV %s: %s", adoption.name, exc)
        for manifest in the_plan.create:
            self._create(manifest, done)
        for resize in the_plan.resize:
            self._resize(resize, done)
        for withdrawal in the_plan.withdraw:
            self._withdraw(withdrawal, done)
        return done

    def adopt_upstream(self) -> None:
        """Once at start: label this node's PVs made by the upstream provisioner as ours.

        Only PVs without the agent's label are listed, page by page and not kept: once a cluster
        is migrated this lists nothing, and memory stays flat in the cluster's size.
        """
        kube = self.ctx.kube
        listed = (pv for pv, _ in kube.list_pvs(f"!{MANAGED_BY_LABEL}", limit=250))
        for adoption in upstream_adoptions(listed, self.ctx.node):
            kube.patch_pv_labels(adoption.name, adoption.uid, adoption.labels)
            log.info("adopted upstream PV %s for %s", adoption.name, adoption.path)

    def _create(self, manifest: Mapping[str, Any], done: Applied) -> None:
        name, path = manifest["metadata"]["name"], manifest["spec"]["local"]["path"]
        try:
            created = self.ctx.kube.create_pv(manifest)
        except ApiError as exc:
            if exc.conflict:
                self._resolve_conflict(name, path)
                return
            done.errors += 1
            log.warning("creating PV %s for %s: %s", name, path, exc)
            return
        self.ctx.pvs.cache.put(created)
        mode = manifest["spec"]["volumeMode"]
        done.created_by_mode[mode] = done.created_by_mode.get(mode, 0) + 1
        capacity = manifest["spec"]["capacity"]["storage"]
        log.info("created PV %s for %s (%s, %s)", name, path,
                 manifest["spec"]["storageClassName"], capacity)
        self.ctx.events.post(Notice("PersistentVolume", name, Reason.PROVISIONED,
                                    f"created for {path} on node {self.ctx.node.name} "
                                    f"({capacity})", uid=pvs.uid(created)))

    def _resize(self, resize: Resize, done: Applied) -> None:
        """Give an Available PV its disk's new size, only if nobody touched it since we looked
        (a claim bound meanwhile was matched against the old size: that PV is left)."""
        try:
            updated = self.ctx.kube.patch_pv_capacity(resize.name, resize.uid,
                                                      resize.resource_version, resize.capacity)
        except ApiError as exc:
            if exc.conflict or exc.not_found:
                log.info("not resizing PV %s: it changed meanwhile", resize.name)
                self.ctx.pvs.refresh(resize.name)
                return
            done.errors += 1
            log.warning("resizing PV %s: %s", resize.name, exc)
            return
        self.ctx.pvs.cache.put(updated)
        done.resized += 1
        log.info("PV %s for %s: capacity %s -> %s", resize.name, resize.path, resize.old,
                 resize.capacity)
        self.ctx.events.post(Notice("PersistentVolume", resize.name, Reason.CAPACITY_UPDATED,
                                    f"capacity {resize.old} -> {resize.capacity}: the disk at "
                                    f"{resize.path} changed size", uid=resize.uid))

    def _withdraw(self, withdrawal: Withdrawal, done: Applied) -> None:
        """Delete an unbound PV whose disk is gone (or whose class was removed), only if nobody
        touched it since we looked."""
        try:
            self.ctx.kube.delete_pv(withdrawal.name, withdrawal.uid, withdrawal.resource_version)
        except ApiError as exc:
            if exc.conflict or exc.not_found:  # bound or changed meanwhile: decide again
                log.info("not withdrawing PV %s: it changed meanwhile", withdrawal.name)
                self.ctx.pvs.refresh(withdrawal.name)
                return
            done.errors += 1
            log.warning("withdrawing PV %s: %s", withdrawal.name, exc)
            return
        done.withdrawn += 1
        self.ctx.pvs.deleted(withdrawal.name, withdrawal.uid)
        why = withdrawal.why or f"the disk behind {withdrawal.path} is gone"
        log.warning("withdrew PV %s (%s): %s and the PV was unbound", withdrawal.name,
                    withdrawal.path, why)
        self.ctx.events.post(Notice("Node", self.ctx.node.name, Reason.VOLUME_WITHDRAWN,
                                    f"PV {withdrawal.name} ({withdrawal.path}) deleted: {why} "
                                    "and nothing had claimed it"))

    def _resolve_conflict(self, name: str, path: str) -> None:
        """The name exists already: adopt it when it is this node's PV for the same path."""
        existing = self.ctx.kube.get_pv(name)
        if existing is None:
            return  # deleted meanwhile; the next pass creates it
        if pvs.deleting(existing):  # e.g. this agent's own delete, held by pv-protection
            log.info("PV %s for %s is still being deleted; it is created again once gone",
                     name, path)
            return  # its DELETED event wakes the pass that creates it
        if pvs.is_this_nodes(existing, self.ctx.node) and pvs.local_path(existing) == path:
            self.ctx.pvs.cache.put(existing)
            log.info("PV %s for %s already exists; adopting it", name, path)
            return
        self.ctx.events.report([Notice(
            "PersistentVolume", name, Reason.NAME_CONFLICT,
            f"PV {name} exists but is not this node's PV for {path!r}; leaving it alone",
            Once(Scope.NAME_CONFLICT, f"{name}/{path}"))])
