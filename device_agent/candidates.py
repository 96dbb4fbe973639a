"""Candidate models on the device: model files sent to be timed, never deployed.

The host (``sdk.remote_bench.benchmark_candidate``) sends a model file with the
``candidate_*`` actions of :mod:`device_agent.contracts.commands`, chunked as a deploy is
(the chunk checks and the staging bookkeeping are :mod:`device_agent.deploy_files`'), and then
``benchmark`` with its id, which :mod:`device_agent.candidate_bench` times in a child process.
A candidate's id is derived from its SHA-256, so a file already here is ``ready`` at
``candidate_begin`` and nothing is sent again.

On-disk layout, under ``{state_dir}/candidates-{fleet}-{device}/``::

    staging/{id}/        begin.json and the received chunks (one upload at a time)
    {id}/model.onnx      a complete candidate (or model.tflite), and candidate.json

Bounds: a candidate is at most ``candidate_max_bytes``; at most ``candidate_keep`` complete
candidates are kept (the oldest goes first), none older than ``candidate_ttl_s``, and all are
removed when the agent starts. With ``trusted_keys`` a candidate must carry a signature by one
of them over its SHA-256 (:func:`device_agent.signing.check_candidate_signature`), checked at
``candidate_begin`` before anything is stored and again before it is timed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.agent_config import AgentConfig
from device_agent.contracts import messages as msg
from device_agent.contracts.commands import (
    Action,
    CandidateBegin,
    CandidateChunk,
    CandidateChunkReply,
    CandidateRef,
    CandidateReply,
    CandidateSignature,
    DeployError,
)
from device_agent.deploy import guarded_handlers
from device_agent.deploy_files import Upload, join_chunks, store_chunk, write_atomic
from device_agent.errors import EdgeshipError

__all__ = ["Candidate", "CandidateStore", "candidates_dir"]

log = logging.getLogger(__name__)

_META = "candidate.json"


def candidates_dir(config: AgentConfig) -> Path:
    """Where this device's candidates live: ``{state_dir}/candidates-{fleet}-{device}``."""
    return Path(config.state_dir) / f"candidates-{config.fleet}-{config.device_id}"


@dataclass(frozen=True)
class Candidate:
    """A complete candidate: its model file, format and SHA-256."""

    id: str
    path: Path
    format: str
    sha256: str
    size: int
    signature: CandidateSignature | None


class CandidateStore:
    """The ``candidate_*`` commands and the candidates they leave on disk (see the module's
    docstring). Its handlers run on the agent's command thread, one at a time."""

    def __init__(self, config: AgentConfig, *, clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._clock = clock
        self.root = candidates_dir(config)
        self._upload: Upload | None = None
        self._begin: CandidateBegin | None = None
        self._trusted: Any = None

    def handlers(self) -> dict[str, Callable[[msg.Command], Any]]:
        """The ``candidate_*`` commands, by action name (failures are DeployError)."""
        actions = {
            Action.CANDIDATE_BEGIN: self.begin,
            Action.CANDIDATE_CHUNK: self.chunk,
            Action.CANDIDATE_REMOVE: self.remove,
        }
        return guarded_handlers(actions, self.root, "candidate")

    def clear(self) -> None:
        """Remove every candidate and upload (the agent starts: none is wanted any more)."""
        self._upload = self._begin = None
        shutil.rmtree(self.root, ignore_errors=True)

    # --- signatures -----------------------------------------------------------------------

    def _check_signature(self, sha256: str, signature: CandidateSignature | None) -> None:
        if not self._config.trusted_keys:
            return
        from device_agent.signing import check_candidate_signature, load_trusted_keys

        if self._trusted is None:
            self._trusted = load_trusted_keys(self._config.trusted_keys)
        try:
            check_candidate_signature(sha256, signature, self._trusted)
        except EdgeshipError as exc:
            raise DeployError(f"candidate refused: {exc}") from exc

    # --- actions --------------------------------------------------------------------------

    def begin(self, args: Mapping[str, Any]) -> CandidateReply:
        begin = CandidateBegin.parse(args, max_bytes=self._config.candidate_max_bytes)
        self._check_signature(begin.sha256, begin.signature)
        self._prune()
        ident = begin.candidate
        ready = self._ready_meta(ident)
        if ready is not None:
            if ready.get("signature") != begin.params()["signature"]:
                self._write_meta(ident, begin)  # the signature the sender has now
            return self._reply(ident, "ready", begin.chunks, list(range(begin.chunks)))
        upload = self._upload
        if upload is not None and self._begin == begin:
            return self._reply(ident, "receiving", upload.chunks, upload.have())
        self._discard_upload()
        self._make_room(begin.size)
        staging = self.root / "staging" / ident
        upload = Upload(
            id=ident,
            size=begin.size,
            sha256=begin.sha256,
            chunks=begin.chunks,
            chunk_bytes=begin.chunk_bytes,
            model=None,
            model_version=None,
            dir=staging,
        )
        begin_file = staging / "begin.json"
        try:
            resumed = json.loads(begin_file.read_text(encoding="utf-8")) == begin.params()
        except (OSError, ValueError):
            resumed = False
        if resumed:
            upload.resume()
        else:
            shutil.rmtree(self.root / "staging", ignore_errors=True)
            staging.mkdir(parents=True)
            write_atomic(begin_file, json.dumps(begin.params()).encode())
        self._upload, self._begin = upload, begin
        log.info(
            "candidate %s: receiving %d bytes in %d chunks (%d already here)",
            ident,
            begin.size,
            begin.chunks,
            upload.received,
        )
        return self._reply(ident, "receiving", upload.chunks, upload.have())

    def chunk(self, args: Mapping[str, Any]) -> CandidateChunkReply:
        chunk = CandidateChunk.parse(args, chunks_of=self._chunks_of)
        ident, index = chunk.candidate, chunk.index
        upload, begin = self._upload, self._begin
        if upload is None or begin is None or upload.id != ident:
            # Complete already (a chunk delivered again after the last one): acknowledged.
            n = self._chunks_of(ident)  # from its candidate.json: raises if it is gone
            return {"candidate": ident, "index": index, "received": n, "chunks": n,
                    "state": "ready"}  # fmt: skip
        store_chunk(upload, index, chunk.data, chunk.sha256)
        state = "receiving"
        if upload.received == upload.chunks:
            self._complete(upload, begin)
            state = "ready"
        return {
            "candidate": ident,
            "index": index,
            "received": upload.received,
            "chunks": upload.chunks,
            "state": state,
        }

    def remove(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Delete the candidate (and its upload); ``removed`` says whether there was one."""
        ident = CandidateRef.parse(args).candidate
        removed = False
        if self._upload is not None and self._upload.id == ident:
            self._discard_upload()
            removed = True
        folder = self.root / ident
        if folder.is_dir():
            shutil.rmtree(folder)
            removed = True
        return {"candidate": ident, "removed": removed}

    def ready(self, ident: str) -> Candidate:
        """The complete candidate ``ident``, its file checked again against its SHA-256 (and its
        signature, with ``trusted_keys``) before it is run; DeployError when there is none (an
        expired one included: ``candidate_ttl_s`` is applied here too)."""
        self._prune()
        meta = self._ready_meta(ident)
        if meta is None:
            raise DeployError(
                f"no candidate {ident} on this device (send it with candidate_begin and "
                "candidate_chunk first; candidates are removed when the agent restarts)"
            )
        path = self.root / ident / f"model.{meta['format']}"
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != meta["sha256"]:
            shutil.rmtree(self.root / ident, ignore_errors=True)
            raise DeployError(f"candidate {ident} was altered on disk; removed, send it again")
        raw = meta.get("signature")
        signature = None if raw is None else CandidateSignature.parse(raw)
        self._check_signature(meta["sha256"], signature)
        return Candidate(
            id=ident,
            path=path,
            format=str(meta["format"]),
            sha256=str(meta["sha256"]),
            size=int(meta["size"]),
            signature=signature,
        )

    # --- bookkeeping ----------------------------------------------------------------------

    def _reply(self, ident: str, state: str, chunks: int, have: list[int]) -> CandidateReply:
        return {"candidate": ident, "state": state, "chunks": chunks, "have": have}

    def _chunks_of(self, ident: str) -> int:
        upload = self._upload
        if upload is not None and upload.id == ident:
            return upload.chunks
        meta = self._ready_meta(ident)
        if meta is not None:
            return int(meta["chunks"])
        raise DeployError(f"no upload of candidate {ident} in progress; send candidate_begin first")

    def _ready_meta(self, ident: str) -> dict[str, Any] | None:
        try:
            meta = json.loads((self.root / ident / _META).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None

    def _write_meta(self, ident: str, begin: CandidateBegin) -> None:
        meta = {**begin.params(), "ready_at": self._clock()}
        write_atomic(self.root / ident / _META, json.dumps(meta).encode())

    def _complete(self, upload: Upload, begin: CandidateBegin) -> None:
        """Join the chunks into ``{id}/model.{format}``, checked against the SHA-256 (the
        candidate id); a file that does not match is discarded and refused."""
        folder = self.root / upload.id
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        self._upload = self._begin = None
        try:
            join_chunks(upload, folder / f"model.{begin.format}", what="file",
                        begin="candidate_begin")  # fmt: skip
        except EdgeshipError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            raise DeployError(f"candidate {upload.id} refused: {exc}; send it again") from exc
        finally:
            shutil.rmtree(upload.dir, ignore_errors=True)
        self._write_meta(upload.id, begin)
        log.info("candidate %s: ready (%d bytes, %s)", upload.id, begin.size, begin.format)

    def _discard_upload(self) -> None:
        if self._upload is not None:
            shutil.rmtree(self._upload.dir, ignore_errors=True)
        self._upload = self._begin = None

    def _complete_ones(self) -> list[tuple[float, str]]:
        """(ready_at, id) of every complete candidate, oldest first."""
        out = []
        if self.root.is_dir():
            for entry in self.root.iterdir():
                meta = self._ready_meta(entry.name) if entry.name != "staging" else None
                if meta is not None:
                    ready_at = meta.get("ready_at")
                    out.append((float(ready_at) if isinstance(ready_at, int | float) else 0.0,
                                entry.name))  # fmt: skip
        return sorted(out)

    def _prune(self) -> None:
        """Remove candidates older than ``candidate_ttl_s`` (and folders that are no complete
        candidate, left by a crash)."""
        if not self.root.is_dir():
            return
        complete = self._complete_ones()
        known = {ident for _, ident in complete} | {"staging"}
        for entry in self.root.iterdir():
            if entry.name not in known:
                shutil.rmtree(entry, ignore_errors=True)
        cutoff = self._clock() - self._config.candidate_ttl_s
        for ready_at, ident in complete:
            if ready_at < cutoff:
                log.info("candidate %s: removed after candidate_ttl_s", ident)
                shutil.rmtree(self.root / ident, ignore_errors=True)

    def _make_room(self, size: int) -> None:
        """Before a new upload: remove the oldest candidates beyond ``candidate_keep - 1``, and
        refuse when the disk has less than twice ``size`` free (chunks and the joined file)."""
        complete = self._complete_ones()
        for _, ident in complete[: max(0, len(complete) - self._config.candidate_keep + 1)]:
            log.info("candidate %s: removed to keep at most candidate_keep", ident)
            shutil.rmtree(self.root / ident, ignore_errors=True)
        self.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.root).free
        if free < 2 * size:
            raise DeployError(
                f"{free // 2**20} MiB free under {self.root}; a candidate of {size // 2**20} MiB "
                "needs twice its size (chunks and the joined file)"
            )
