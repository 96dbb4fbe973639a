"""Remote deploy, the device's side: a bundle sent over ``cmd`` in chunks, staged, verified,
swapped in, watched and rolled back.

The host (``edgeship deploy``, :mod:`sdk.deploy`) packs a bundle directory into a tar archive
and sends it with the ``deploy_*`` actions of :mod:`device_agent.contracts.commands`, each
answered on ``cmd/reply`` (docs/agent.md, "Remote deploy"). ``deploy_commit`` joins the chunks,
checks the archive's size and SHA-256, unpacks it safely, verifies the bundle as a bundle
loaded at start is verified (every file's hash, no file the manifest does not list, and the
signature when ``trusted_keys`` are configured), opens it, runs a self-test inference, and
swaps it into the agent's :class:`~device_agent.slot.ModelSlot`. The reply says
``probation``, ``applied`` or ``failed``; anything that goes wrong before the swap (any
exception, MemoryError included) is ``failed`` with the reason, and the unpacked folder is
deleted.

After the swap the new bundle is on probation (:mod:`device_agent.probation`): for
``deploy_probation_inferences`` inferences, or as ``deploy_begin``'s ``probation``
argument asks (a count, a time, whichever comes first, and the limits), its model health is
judged against the previous model's on the same inputs and against its ``reference.json``; a
line that fails rolls back. An inference that fails on it is retried on the previous model; if
the previous model answers, the new bundle is at fault: the agent rolls back at once and the
caller gets the previous model's answer. If both fail, the input is at fault and nothing
changes. Only a bundle that passed probation is recorded as current on disk
(:mod:`device_agent.deploy_files` has the layout), so a bundle that crashes the process is not
used again after a restart.

``deploy_revert`` (:mod:`device_agent.deploy_revert`) takes back a deploy: one on probation
rolls back as on ``deploy_abort``; the applied one that runs now (named by ``current.json``,
before or after an agent restart) is swapped out for the bundle ``current.json`` names as
``previous``, loaded and self-tested first, and ``current.json`` then names that one (or is
removed when it is the bundle the agent was given), so a restart runs it too.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from device_agent.agent_config import AgentConfig
from device_agent.bundle import Bundle, load_bundle
from device_agent.contracts import messages as msg
from device_agent.contracts.commands import (
    MAX_CHUNK_BYTES,
    MAX_CHUNKS,
    MIN_CHUNK_BYTES,
    Action,
    ChunkReply,
    DeployBegin,
    DeployChunk,
    DeployError,
    DeployRecord,
    DeployRef,
    ProbationArgs,
    ReceivingReply,
    printable,
)
from device_agent.contracts.reference import ReferenceStats, load_reference
from device_agent.deploy_files import (
    CURRENT_NAME,
    MAX_FILES,
    Upload,
    deploy_dir,
    deploy_state,
    deployed_bundle,
    join_chunks,
    store_chunk,
    unpack_archive,
    write_atomic,
)
from device_agent.deploy_revert import RevertMixin
from device_agent.deploy_revert import as_record as _as_record
from device_agent.errors import BundleError, ConfigError, EdgeshipError
from device_agent.probation import Trial
from device_agent.slot import LoadedModel, ModelSlot, describe_failure

__all__ = [
    "MAX_CHUNKS",
    "MAX_CHUNK_BYTES",
    "MAX_FILES",
    "MIN_CHUNK_BYTES",
    "DeployError",
    "Deployer",
    "deploy_dir",
    "deploy_state",
    "deployed_bundle",
    "guarded_handlers",
    "unpack_archive",
]

log = logging.getLogger(__name__)

_KEEP_RECORDS = 32


ArgsAction = Callable[[Mapping[str, Any]], Mapping[str, object]]


def guarded_handlers(
    actions: Mapping[Action, ArgsAction], root: Path, what: str
) -> dict[str, Callable[[msg.Command], Any]]:
    """Command handlers, by action name, for ``actions`` that take a command's ``args``: args
    that are not an object, a disk that fails under ``root`` and any unexpected exception
    become a DeployError naming the action (the agent answers ``ok: false`` and goes on)."""

    def handler(action: ArgsAction) -> Callable[[msg.Command], Any]:
        def run(command: msg.Command) -> Mapping[str, object]:
            try:
                if not isinstance(command.args, Mapping):
                    raise DeployError(f"{command.action}: args must be an object")
                return action(command.args)
            except EdgeshipError:
                raise
            except OSError as exc:  # a full or failing disk: the reply says so
                raise DeployError(
                    printable(f"{command.action}: cannot write under {root}: {exc}")
                ) from exc
            except Exception as exc:  # a bug here must not cost the agent its commands
                log.exception("%s: %s failed", what, command.action)
                raise DeployError(
                    printable(
                        f"{command.action} failed: {describe_failure(exc)} (an error in the "
                        "agent; its log has the details)"
                    )
                ) from exc

        return run

    return {name.value: handler(action) for name, action in actions.items()}


class Deployer(RevertMixin):
    """The device side of remote deploy for one agent's :class:`~device_agent.slot.ModelSlot`.

    :meth:`handlers` are registered as the agent's ``deploy_*`` commands; they run on the
    agent's command thread, one at a time. A bundle on probation is watched by its
    :class:`~device_agent.probation.Trial`, which calls :meth:`rollback` or
    :meth:`probation_passed` with its verdict.
    ``run_soon(work)`` runs disk and network work on the agent's events thread;
    ``announce(event)`` tells the fleet of each change of a deploy's state (the next telemetry
    window and a new status).
    """

    def __init__(
        self,
        config: AgentConfig,
        slot: ModelSlot,
        *,
        run_soon: Callable[[Callable[[], None]], None],
        announce: Callable[[msg.DeployEvent], None],
    ) -> None:
        self._slot = slot
        self._config = config
        self._run_soon = run_soon
        self._announce = announce
        self.root = deploy_dir(config)
        self._lock = threading.Lock()
        self._upload: Upload | None = None
        self._upload_probation: ProbationArgs | None = None  # deploy_begin's, for the commit
        self._trial: Trial | None = None
        self._records: dict[str, dict[str, Any]] = {}
        self.last_event: msg.DeployEvent | None = None

    def handlers(self) -> dict[str, Callable[[msg.Command], Any]]:
        """The ``deploy_*`` commands, by action name: each turns a failure into DeployError."""
        actions: dict[Action, ArgsAction] = {
            Action.DEPLOY_BEGIN: self.begin,
            Action.DEPLOY_CHUNK: self.chunk,
            Action.DEPLOY_COMMIT: self.commit,
            Action.DEPLOY_STATUS: self.status,
            Action.DEPLOY_ABORT: self.abort,
            Action.DEPLOY_REVERT: self.revert,
        }

        return guarded_handlers(actions, self.root, "deploy")

    # --- records and events -------------------------------------------------------------

    def _record(self, deploy_id: str, **fields: Any) -> DeployRecord:
        # Called from the command thread and, for a rollback, from an inference thread.
        with self._lock:
            rec = self._records.setdefault(deploy_id, {"deploy": deploy_id})
            rec.update(fields)
            while len(self._records) > _KEEP_RECORDS:
                del self._records[next(iter(self._records))]
            return _as_record(rec)

    def _event(
        self,
        deploy_id: str,
        state: msg.DeployState,
        from_version: str | None,
        to_version: str | None,
        model: str | None,
        reason: str | None = None,
    ) -> None:
        event = msg.DeployEvent(
            id=deploy_id,
            state=state,
            ts=time.time(),
            from_version=from_version,
            to_version=to_version,
            model=model,
            reason=None if reason is None else printable(reason),
        )
        self.last_event = event
        level = logging.WARNING if state in ("rolled_back", "failed") else logging.INFO
        log.log(
            level,
            "deploy %s: %s (%s -> %s)%s",
            deploy_id,
            state,
            from_version,
            to_version,
            f": {reason}" if reason else "",
        )
        self._announce(event)

    # --- actions ------------------------------------------------------------------------

    def _refuse_the_running_bundle(self, deploy_id: str) -> None:
        """A deploy id names its folder; the running bundle's folder must not be replaced."""
        dest = self.root / "bundles" / deploy_id
        if dest.resolve() == self._slot.loaded.bundle.root.resolve():
            raise DeployError(f"deploy {deploy_id} is the bundle running now; nothing to do")

    def begin(self, args: Mapping[str, Any]) -> ReceivingReply:
        self._refuse_the_running_bundle(DeployRef.id_of(args))
        begin = DeployBegin.parse(args, max_bytes=self._config.deploy_max_bytes)
        deploy_id, size, chunks = begin.deploy, begin.size, begin.chunks
        params = begin.params()
        trial = self._trial
        if trial is not None:
            raise DeployError(
                f"deploy {trial.id} is on probation ({trial.describe_left()}); wait for "
                "it to be applied or send deploy_abort"
            )
        # The same id, size, hash and chunking resume an upload; the model fields are labels.
        same = ("deploy", "size", "sha256", "chunks", "chunk_bytes")
        upload = self._upload
        if upload is not None and all(upload.params()[k] == params[k] for k in same):
            upload.model, upload.model_version = begin.model, begin.model_version
            self._upload_probation = begin.probation
            return self._receiving(upload)
        if upload is not None:
            log.info("deploy %s: abandoned for deploy %s", upload.id, deploy_id)
            self._discard(upload)
        staging = self.root / "staging" / deploy_id
        upload = Upload(
            id=deploy_id,
            size=size,
            sha256=begin.sha256,
            chunks=chunks,
            chunk_bytes=begin.chunk_bytes,
            model=begin.model,
            model_version=begin.model_version,
            dir=staging,
        )
        begin_file = staging / "begin.json"
        resumed = False
        if begin_file.is_file():
            try:
                before = json.loads(begin_file.read_text(encoding="utf-8"))
                resumed = all(before.get(k) == params[k] for k in same)
            except (OSError, ValueError, AttributeError):
                resumed = False
        if resumed:
            upload.resume()
        else:
            shutil.rmtree(staging, ignore_errors=True)
            self._clear_staging()
            self.root.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.root).free
            if free < 3 * size:
                raise DeployError(
                    f"{free // 2**20} MiB free under {self.root}; a deploy of {size // 2**20} "
                    "MiB needs three times its size (chunks, unpacked bundle, previous bundle)"
                )
            staging.mkdir(parents=True)
            write_atomic(begin_file, json.dumps(params).encode())
        self._upload, self._upload_probation = upload, begin.probation
        self._record(deploy_id, state="receiving", error=None)
        log.info(
            "deploy %s: %s %d bytes in %d chunks (%d already here)",
            deploy_id,
            "resuming" if resumed else "receiving",
            size,
            chunks,
            upload.received,
        )
        return self._receiving(upload)

    def _receiving(self, upload: Upload) -> ReceivingReply:
        return {
            "deploy": upload.id,
            "state": "receiving",
            "chunks": upload.chunks,
            "have": upload.have(),
        }

    def _current_upload(self, deploy_id: str) -> Upload:
        upload = self._upload
        if upload is None or upload.id != deploy_id:
            raise DeployError(f"no upload {deploy_id!r} in progress; send deploy_begin first")
        return upload

    def chunk(self, args: Mapping[str, Any]) -> ChunkReply:
        chunk = DeployChunk.parse(
            args, chunks_of=lambda deploy_id: self._current_upload(deploy_id).chunks
        )
        upload, index = self._current_upload(chunk.deploy), chunk.index
        store_chunk(upload, index, chunk.data, chunk.sha256)
        return {
            "deploy": upload.id,
            "index": index,
            "received": upload.received,
            "chunks": upload.chunks,
        }

    def commit(self, args: Mapping[str, Any]) -> DeployRecord:
        deploy_id = DeployRef.id_of(args)
        done = self._records.get(deploy_id)
        if done is not None and done.get("state") not in (None, "receiving"):
            return _as_record(done)  # a commit delivered twice gets the same answer
        self._refuse_the_running_bundle(deploy_id)
        upload = self._current_upload(deploy_id)
        if upload.received < upload.chunks:
            raise DeployError(
                f"deploy {deploy_id}: {upload.chunks - upload.received} of {upload.chunks} "
                f"chunks missing (first: {upload.first_missing(10)}); send them and commit again"
            )
        current = self._slot.loaded
        from_version = current.model.version
        dest = self.root / "bundles" / deploy_id
        self._upload = None
        try:
            try:
                self._unpack(upload, dest)
                bundle = load_bundle(dest, trusted_keys=self._config.trusted_keys)
                if upload.model_version is not None and (
                    bundle.manifest.model.version != upload.model_version
                ):
                    raise BundleError(
                        f"the bundle is {bundle.manifest.model.name} v"
                        f"{bundle.manifest.model.version}, not the announced v"
                        f"{upload.model_version}"
                    )
                new = LoadedModel.open_tested(bundle, self._config)
            finally:
                shutil.rmtree(upload.dir, ignore_errors=True)
        except Exception as exc:  # MemoryError included: whatever it is, nothing was swapped
            shutil.rmtree(dest, ignore_errors=True)
            if not isinstance(exc, EdgeshipError | OSError):
                log.warning("deploy %s: refused on %r", deploy_id, exc, exc_info=exc)
            reason = printable(f"refused before the swap: {describe_failure(exc)}")
            self._event(
                deploy_id, "failed", from_version, upload.model_version, upload.model, reason
            )
            return self._record(
                deploy_id,
                state="failed",
                from_version=from_version,
                to_version=upload.model_version,
                reason=reason,
            )
        m = bundle.manifest.model
        inputs_changed = new.io.inputs != current.io.inputs
        trial = self._trial_for(deploy_id, new, current)
        if trial is not None:
            new.trial = self._trial = trial
        previous = self._slot.swap(new)
        rec = self._record(
            deploy_id,
            state="probation" if trial else "applied",
            from_version=previous.model.version,
            to_version=m.version,
            model=m.name,
            reason=None,
            inputs_changed=inputs_changed,
            probation=0 if trial is None else trial.inferences or 0,
        )
        if trial is not None:
            self._event(deploy_id, "probation", from_version, m.version, m.name)
            trial.start()
        else:
            self._apply(deploy_id, new, previous)
        return rec

    def _trial_for(self, deploy_id: str, new: LoadedModel, current: LoadedModel) -> Trial | None:
        """The probation the deploy asked for (None: applied at the swap)."""
        args, self._upload_probation = self._upload_probation, None
        default_n = self._config.deploy_probation_inferences
        if args is None and default_n == 0:
            return None
        limits = args or ProbationArgs()
        inferences, seconds = limits.ends(default_n)
        return Trial(
            self,
            self._slot,
            deploy_id,
            new,
            current,
            limits,
            inferences=inferences,
            seconds=seconds,
            reference=_reference_of(new.bundle),
        )

    def _unpack(self, upload: Upload, dest: Path) -> None:
        archive = upload.dir / "archive"
        join_chunks(upload, archive, what="archive", begin="deploy_begin")
        shutil.rmtree(dest, ignore_errors=True)
        unpack_archive(archive, dest, max_bytes=self._config.deploy_max_bytes)

    def status(self, args: Mapping[str, Any]) -> DeployRecord:
        deploy_id = DeployRef.parse(args, required=False).deploy
        current = self._slot.loaded.model
        base = {"model": current.name, "model_version": current.version}
        if deploy_id is None:
            trial, upload = self._trial, self._upload
            deploy_id = trial.id if trial else upload.id if upload else None
            if deploy_id is None and self._records:
                deploy_id = next(reversed(self._records))
        if deploy_id is None:
            return _as_record({**base, "deploy": None, "state": None})
        rec = self._records.get(deploy_id)
        if rec is None:
            pointer = self._running_pointer()
            if pointer is None or pointer.get("deploy") != deploy_id:
                raise DeployError(f"no deploy {deploy_id!r} on this device since the agent started")
            # Applied before the agent started: current.json names it, and it runs.
            rec = {
                "deploy": deploy_id,
                "state": "applied",
                "to_version": current.version,
                "model": current.name,
                "reason": f"applied before the agent started ({CURRENT_NAME})",
            }
        out = {**base, **rec}
        if out.get("state") == "applied" and self._slot.loaded.bundle.root.name != deploy_id:
            # Applied once, then replaced (another deploy, a revert): it does not run now.
            out["state"] = "superseded"
        upload, trial = self._upload, self._trial
        if upload is not None and upload.id == deploy_id:
            out.update(received=upload.received, chunks=upload.chunks)
        if trial is not None and trial.id == deploy_id and trial.left is not None:
            out["probation_left"] = trial.left
        return _as_record(out)

    def abort(self, args: Mapping[str, Any]) -> DeployRecord:
        deploy_id = DeployRef.id_of(args)
        upload, trial = self._upload, self._trial
        if upload is not None and upload.id == deploy_id:
            self._discard(upload)
            self._upload = None
            return self._record(deploy_id, state="aborted")
        if trial is not None and trial.id == deploy_id:
            self.rollback(trial, "aborted by the operator during probation")
            return _as_record(self._records[deploy_id])
        rec = self._records.get(deploy_id)
        state = None if rec is None else rec.get("state")
        raise DeployError(
            f"deploy {deploy_id!r} cannot be aborted: "
            + ("unknown to this agent" if state is None else f"it is {state}")
        )

    def _discard(self, upload: Upload) -> None:
        shutil.rmtree(upload.dir, ignore_errors=True)

    def _clear_staging(self) -> None:
        shutil.rmtree(self.root / "staging", ignore_errors=True)

    # --- probation ------------------------------------------------------------------------

    def rollback(self, trial: Trial, reason: str) -> None:
        """Swap the previous model back in: ``trial``'s bundle failed (on any thread)."""
        if not trial.decide("rolled_back"):
            return
        previous, new = trial.previous, trial.new
        assert previous is not None and new is not None
        with self._lock:
            self._slot.swap(previous)
            if self._trial is trial:
                self._trial = None
            trial.new = None  # new.trial -> trial -> new was a cycle: only the GC freed it
        new_model = new.model
        self._record(trial.id, state="rolled_back", reason=reason)
        self._event(
            trial.id,
            "rolled_back",
            previous.model.version,
            new_model.version,
            new_model.name,
            reason,
        )
        dest = self.root / "bundles" / trial.id
        self._run_soon(lambda: shutil.rmtree(dest, ignore_errors=True))

    def probation_passed(self, trial: Trial, reason: str) -> None:
        """``trial`` is over and passed: the new bundle is applied (on the events thread);
        ``reason`` gives the verdict's figures."""
        if not trial.decide("applied"):
            return
        previous, new = trial.previous, trial.new
        assert previous is not None and new is not None
        with self._lock:
            new.trial = None  # the hot path stops counting
            trial.previous = None  # let the previous session go
            if self._trial is trial:
                self._trial = None
        self._run_soon(lambda: self._apply(trial.id, new, previous, reason))

    def close(self) -> None:
        """Stop a probation in progress without a verdict (the agent is closing): its thread
        has exited when this returns, so nothing is applied or rolled back after the agent
        closed. ``current.json`` still names the previous bundle, which a restart runs."""
        trial = self._trial
        if trial is not None:
            trial.stop()

    def _apply(
        self, deploy_id: str, new: LoadedModel, previous: LoadedModel, reason: str | None = None
    ) -> None:
        """Record ``new`` as the bundle to run after a restart, and tell the fleet."""
        m = new.model
        pointer = {
            "deploy": deploy_id,
            "bundle": f"bundles/{deploy_id}",
            "model": m.name,
            "model_version": m.version,
            "previous": str(previous.bundle.root),
            "ts": time.time(),
        }
        try:
            write_atomic(self.root / CURRENT_NAME, json.dumps(pointer, indent=2).encode())
        except OSError as exc:
            log.error("deploy %s: applied, but %s not written: %s", deploy_id, CURRENT_NAME, exc)
        self._prune(keep={new.bundle.root.name, previous.bundle.root.name})
        self._record(deploy_id, state="applied", reason=reason)
        self._event(deploy_id, "applied", previous.model.version, m.version, m.name, reason)

    def _prune(self, keep: set[str]) -> None:
        """Delete deployed bundles other than the current and the previous one."""
        bundles = self.root / "bundles"
        if not bundles.is_dir():
            return
        for entry in bundles.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)


def _reference_of(bundle: Bundle) -> ReferenceStats | None:
    """The bundle's reference statistics, if it has readable ones (else probation compares
    with the previous model alone)."""
    name = bundle.manifest.reference_file
    if name is None:
        return None
    try:
        return load_reference(bundle.path_of(name))
    except ConfigError as exc:
        log.warning("deploy: %s; probation compares with the previous model alone", exc)
        return None
