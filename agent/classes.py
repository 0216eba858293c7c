"""The StorageClasses of the configured classes: what their PVs get, and which are missing.

A class whose StorageClass does not exist is disabled alone (its volumes are not offered), with
a Warning on the Node until it appears; so is a class whose PVs cannot be built. The
StorageClass's `reclaimPolicy` and `mountOptions` go onto the PVs created from then on.
"""

from __future__ import annotations

import logging
from typing import Any

from agent.context import Context
from agent.discovery import Discovery
from agent.notices import Notice, Once, Reason, Scope
from agent.volumes import ClassPolicy, policy_of, pv_manifest

log = logging.getLogger(__name__)


class StorageClasses:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._policies: dict[str, ClassPolicy | None] = {}

    def policy(self, class_name: str) -> ClassPolicy | None:
        """None: the class is disabled (its StorageClass is missing, or not read yet)."""
        return self._policies.get(class_name)

    def refresh(self) -> None:
        """Read the StorageClass of every configured class; raises ApiError."""
        policies: dict[str, ClassPolicy | None] = {}
        for cls in self.ctx.config.classes:
            sc = self.ctx.kube.get_storage_class(cls.name)
            missing = Once(Scope.SC_MISSING, cls.name)
            if sc is None:
                policies[cls.name] = None
                self.ctx.events.report([Notice(
                    "Node", self.ctx.node.name, Reason.STORAGE_CLASS_MISSING,
                    f"StorageClass {cls.name} does not exist; its volumes under "
                    f"{cls.host_dir} are not offered until it does", missing)])
                continue
            self.ctx.events.forget(missing)
            policies[cls.name] = policy_of(sc)
        changed = policies != self._policies
        self._policies = policies
        if changed:
            log.info("storage classes: %s", {k: (v.reclaim_policy if v else "missing")
                                             for k, v in policies.items()})

    def desired(self, found: Discovery, hold: frozenset[str]) -> list[dict[str, Any]]:
        """The PVs the volumes should have. A class whose volumes cannot be turned into PVs
        (a bug, or a config the checks missed) is left out alone, with an Event."""
        desired = []
        failed: dict[str, str] = {}
        node, config = self.ctx.node, self.ctx.config
        for volume in found.volumes:
            if volume.host_path in hold:
                continue  # holds a former tenant's data until it is cleaned
            policy = self.policy(volume.class_name)
            if policy is None or volume.class_name in failed:
                continue  # StorageClass missing: that class is disabled
            try:
                desired.append(pv_manifest(volume, node, config, policy))
            except Exception as exc:
                log.exception("class %s: building the PV for %s failed", volume.class_name,
                              volume.host_path)
                failed[volume.class_name] = f"{type(exc).__name__}: {exc}"
        self.ctx.events.report([Notice("Node", node.name, Reason.CLASS_FAILED,
                                       f"class {name} is skipped in this pass: {why}",
                                       Once(Scope.CLASS_FAILED, name))
                                for name, why in failed.items()], scopes={Scope.CLASS_FAILED})
        return desired
