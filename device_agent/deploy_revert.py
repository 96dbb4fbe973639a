"""``deploy_revert``, the device's side: a deploy taken back.

One on probation rolls back as on ``deploy_abort``; the applied one that runs now (named by
``current.json``, before or after an agent restart) is swapped out for the bundle
``current.json`` names as ``previous``, loaded and self-tested first, and ``current.json`` then
names that one (or is removed when it is the bundle the agent was given), so a restart runs it
too. :class:`RevertMixin` is part of :class:`~device_agent.deploy.Deployer`, which provides the
state and the record and event bookkeeping declared here.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from device_agent.agent_config import AgentConfig
from device_agent.bundle import load_bundle
from device_agent.contracts import messages as msg
from device_agent.contracts.commands import DeployError, DeployRecord, DeployRevert, printable
from device_agent.deploy_files import CURRENT_NAME, read_current, remove_durably, write_atomic
from device_agent.probation import Trial
from device_agent.slot import LoadedModel, ModelSlot, describe_failure

__all__ = ["RevertMixin", "as_record"]


def as_record(fields: Mapping[str, Any]) -> DeployRecord:
    """A copy of a deploy's record, as the type the replies document."""
    return cast(DeployRecord, dict(fields))


class RevertMixin:
    """:meth:`revert` for :class:`~device_agent.deploy.Deployer`, which sets these attributes
    and defines the methods declared under ``TYPE_CHECKING``."""

    _config: AgentConfig
    _slot: ModelSlot
    root: Path
    _lock: threading.Lock
    _trial: Trial | None
    _records: dict[str, dict[str, Any]]

    if TYPE_CHECKING:

        def rollback(self, trial: Trial, reason: str) -> None: ...

        def _record(self, deploy_id: str, **fields: Any) -> DeployRecord: ...

        def _event(
            self,
            deploy_id: str,
            state: msg.DeployState,
            from_version: str | None,
            to_version: str | None,
            model: str | None,
            reason: str | None = None,
        ) -> None: ...

    def revert(self, args: Mapping[str, Any]) -> DeployRecord:
        """Roll back deploy ``deploy``: on probation, at once (as ``deploy_abort``); applied and
        running, to the bundle it replaced (:meth:`_revert_applied`). A deploy already rolled
        back gets its record again."""
        revert = DeployRevert.parse(args)
        deploy_id = revert.deploy
        trial = self._trial
        if trial is not None and trial.id == deploy_id:
            why = "reverted by the operator during probation"
            self.rollback(trial, printable(f"{why}: {revert.reason}" if revert.reason else why))
            return as_record(self._records[deploy_id])
        rec = self._records.get(deploy_id)
        if rec is not None and rec.get("state") == "rolled_back":
            return as_record(rec)  # a revert delivered twice, or after a rollback
        pointer = self._running_pointer()
        if pointer is None or pointer.get("deploy") != deploy_id:
            raise DeployError(self._not_running(deploy_id, pointer, rec))
        why = "reverted by the operator"
        return self._revert_applied(
            deploy_id, pointer, printable(f"{why}: {revert.reason}" if revert.reason else why)
        )

    def _running_pointer(self) -> dict[str, Any] | None:
        """``current.json`` when the bundle it names is the one running now, else None."""
        pointer = read_current(self._config)
        if pointer is None or not isinstance(pointer.get("bundle"), str):
            return None
        try:
            named = (self.root / pointer["bundle"]).resolve()
        except (OSError, ValueError):  # a NUL in it: not a bundle the agent could have run
            return None
        return pointer if named == self._slot.loaded.bundle.root.resolve() else None

    def _not_running(
        self, deploy_id: str, pointer: Mapping[str, Any] | None, rec: Mapping[str, Any] | None
    ) -> str:
        loaded = self._slot.loaded
        m, root, trial = loaded.model, loaded.bundle.root.resolve(), self._trial
        if trial is not None:
            source = f"deploy {trial.id}, on probation"
        elif pointer is not None:
            source = f"deploy {pointer.get('deploy')}"
        elif root.parent == (self.root / "bundles").resolve():
            source = f"deploy {root.name}"
        else:
            source = "the bundle the agent was given"
        state = "" if rec is None else f"; it is {rec.get('state')}"
        return printable(
            f"deploy {deploy_id} is not the bundle running here (running: {m.name}@{m.version} "
            f"from {source}){state}"
        )

    def _revert_applied(
        self, deploy_id: str, pointer: Mapping[str, Any], reason: str
    ) -> DeployRecord:
        """Swap the bundle ``pointer`` names as ``previous`` back in for the applied
        ``deploy_id``. It is loaded and self-tested first (DeployError naming why when it
        cannot run: nothing changes), then ``current.json`` names it (or, when it is not a
        deployed bundle but the one the agent was given, is removed: a restart runs that
        one), then the slot swaps it in. The reverted bundle's folder is left to the next
        deploy's pruning."""
        m = self._slot.loaded.model
        previous = pointer.get("previous")
        keeps = f"{m.name} v{m.version} keeps running"
        if not isinstance(previous, str) or not previous:
            raise DeployError(
                f"deploy {deploy_id} cannot be reverted: {CURRENT_NAME} names no previous "
                f"bundle; {keeps}"
            )
        if not Path(previous).is_dir():
            raise DeployError(
                printable(
                    f"deploy {deploy_id} cannot be reverted: the previous bundle {previous} "
                    f"is gone; {keeps}"
                )
            )
        try:
            old = LoadedModel.open_tested(
                load_bundle(previous, trusted_keys=self._config.trusted_keys), self._config
            )
        except Exception as exc:  # MemoryError included: nothing was swapped
            raise DeployError(
                printable(
                    f"deploy {deploy_id} cannot be reverted: the previous bundle {previous} "
                    f"cannot run: {describe_failure(exc)}; {keeps}"
                )
            ) from exc
        back, pointer_path = old.bundle.root.resolve(), self.root / CURRENT_NAME
        if back.parent == (self.root / "bundles").resolve():
            om = old.model
            restart = {
                "deploy": back.name,  # a deployed bundle's folder is named by its deploy id
                "bundle": f"bundles/{back.name}",
                "model": om.name,
                "model_version": om.version,
                "previous": None,  # not known: current.json kept only the one before
                "ts": time.time(),
            }
            write_atomic(pointer_path, json.dumps(restart, indent=2).encode())
        else:
            remove_durably(pointer_path)
        with self._lock:
            reverted = self._slot.swap(old)
        rm, old_version = reverted.model, old.model.version
        rec = self._record(
            deploy_id,
            state="rolled_back",
            from_version=old_version,
            to_version=rm.version,
            model=rm.name,
            reason=reason,
        )
        self._event(deploy_id, "rolled_back", old_version, rm.version, rm.name, reason)
        return rec
