"""Remote deploy: a bundle sent over ``cmd`` in chunks, staged, verified, swapped in, watched
and rolled back.

The host (``edgeship deploy``, :mod:`sdk.deploy`) packs a bundle directory into a tar archive
and sends it with five actions, each answered on ``cmd/reply`` (docs/agent.md, "Remote deploy"):

* ``deploy_begin`` ``{deploy, size, sha256, chunks, chunk_bytes, model?, model_version?}``:
  opens (or resumes) an upload; the reply lists the chunks already ``have``. Chunks are
  :data:`MIN_CHUNK_BYTES` to :data:`MAX_CHUNK_BYTES` (a deploy in one chunk may be smaller),
  at most :data:`MAX_CHUNKS` of them: the bookkeeping of an upload is a bitmap of at most
  2 KiB, whatever the arguments say.
* ``deploy_chunk`` ``{deploy, index, data, sha256}``: one base64 chunk, checked against its
  own SHA-256 and written to the staging folder. A chunk delivered twice (QoS 1) is written
  once and acknowledged twice.
* ``deploy_commit`` ``{deploy}``: joins the chunks, checks the archive's size and SHA-256,
  unpacks it safely, verifies the bundle as a bundle loaded at start is verified (every file's
  hash, no file the manifest does not list, and the signature when ``trusted_keys`` are
  configured), opens it, runs a self-test inference, and swaps it in. The reply says
  ``probation``, ``applied`` or ``failed``; anything that goes wrong before the swap (any
  exception, MemoryError included) is ``failed`` with the reason, and the unpacked folder is
  deleted.
* ``deploy_status`` ``{deploy?}`` and ``deploy_abort`` ``{deploy}``.

After the swap the new bundle is on probation for ``deploy_probation_inferences`` successful
inferences. An inference that fails on it is retried on the previous model; if the previous
model answers, the new bundle is at fault: the agent rolls back at once and the caller gets
the previous model's answer. If both fail, the input is at fault and nothing changes. Only a
bundle that passed probation is recorded as current on disk, so a bundle that crashes the
process is not used again after a restart.

On-disk layout, under ``{state_dir}/deploy-{fleet}-{device}/``::

    current.json        the deployed bundle to run (written to a temporary file, then renamed)
    staging/{id}/       begin.json and the received chunks, 000000.part ...
    bundles/{id}/       unpacked, verified bundles: the current one and the one before it
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent.bundle import Bundle, load_bundle
from device_agent.contracts import messages as msg
from device_agent.contracts.bundle import MANIFEST_NAME
from device_agent.errors import BundleError, ConfigError, EdgeshipError

if TYPE_CHECKING:
    from device_agent.agent import Agent, AgentConfig, LoadedModel, Prediction

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
    "unpack_archive",
]

log = logging.getLogger(__name__)

# 128 KiB of raw data is about 171 KiB of base64: a chunk command stays well under the
# protocol's 256 KiB payload limit.
MAX_CHUNK_BYTES = 128 * 1024
# Smaller chunks only multiply commands and files; a deploy in one chunk may be smaller.
MIN_CHUNK_BYTES = 512
# The begin reply lists the chunks already received: 16384 numbers fit in one reply, and
# 16384 chunks of 128 KiB carry 2 GiB.
MAX_CHUNKS = 16384
MAX_FILES = 1000
# What a model name and version may be on the wire (DeployEvent, telemetry).
_MAX_MODEL_LEN = 128
_MAX_VERSION_LEN = 64
_BAD_TEXT = re.compile("[\\x00-\\x1f\\x7f-\\x9f\\ud800-\\udfff]")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_KEEP_RECORDS = 32
CURRENT_NAME = "current.json"


class DeployError(ConfigError):
    """A deploy command that cannot be done as asked (unknown upload, missing chunks, a bad
    argument, another deploy on probation)."""


def deploy_dir(config: AgentConfig) -> Path:
    """Where this device's deploys live: ``{state_dir}/deploy-{fleet}-{device}``."""
    return Path(config.state_dir) / f"deploy-{config.fleet}-{config.device_id}"


def deployed_bundle(config: AgentConfig, *, fallback: bool = True) -> Bundle | None:
    """The bundle a remote deploy made current on this device, verified; None if there is none.

    It takes precedence over the bundle given at start (``--bundle``). A pointer to a bundle
    that no longer verifies (or no longer passes the signature check of ``trusted_keys``) is
    logged as an error and ignored, so the agent starts with the given bundle instead; with
    ``fallback=False`` (no bundle was given) it raises :class:`ConfigError` saying why.
    """
    root = deploy_dir(config)
    pointer = root / CURRENT_NAME
    try:
        data = json.loads(pointer.read_text(encoding="utf-8"))
        rel = PurePosixPath(str(data["bundle"]))
        if rel.is_absolute() or ".." in rel.parts:
            raise ValueError(f"bundle {str(rel)!r} is not inside {root}")
        bundle = load_bundle(root / rel, trusted_keys=config.trusted_keys)
    except FileNotFoundError:  # no deploy applied here (an unreadable one is reported below)
        return None
    except (OSError, ValueError, KeyError, TypeError, EdgeshipError) as exc:
        why = (
            f"the deployed bundle in {pointer} cannot run: {exc}"
            if isinstance(exc, EdgeshipError)
            else f"{pointer} is unreadable ({exc})"
        )
        if not fallback:
            raise ConfigError(why) from exc
        log.error("ignoring it: %s; delete %s to silence this", why, pointer)
        return None
    m = bundle.manifest.model
    if fallback:
        why = f"it takes precedence over the configured bundle: delete {pointer} to go back"
    else:
        why = f"no bundle configured; {pointer} names this one"
    log.info(
        "using %s v%s, deployed remotely as %s (%s); %s",
        m.name,
        m.version,
        data.get("deploy"),
        bundle.root,
        why,
    )
    return bundle


def deploy_state(config: AgentConfig) -> dict[str, Any]:
    """What is on disk about remote deploys, read without verifying anything (cheap).

    ``current`` is ``current.json`` (or None), with ``error`` when it cannot be read;
    ``previous_model``/``previous_version`` come from the previous bundle's manifest;
    ``uploads`` lists the open uploads (``deploy``, ``received``, ``chunks``); ``unapplied``
    names the deployed bundles that are neither current nor previous (on probation now, or left
    by a restart during one). Whether a bundle is on probation is known only to the running
    agent (``deploy_status``).
    """
    root = deploy_dir(config)
    out: dict[str, Any] = {"dir": str(root), "current": None, "uploads": [], "unapplied": []}
    pointer = root / CURRENT_NAME
    if pointer.is_file():
        try:
            current = json.loads(pointer.read_text(encoding="utf-8"))
            if not isinstance(current, dict):
                raise ValueError("not a JSON object")
            out["current"] = current
        except (OSError, ValueError) as exc:
            out["error"] = f"{pointer} is unreadable ({exc})"
    current = out["current"] or {}
    previous = current.get("previous")
    if isinstance(previous, str):
        try:
            manifest = json.loads((Path(previous) / MANIFEST_NAME).read_text(encoding="utf-8"))
            out["previous_model"] = manifest["model"]["name"]
            out["previous_version"] = manifest["model"]["version"]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    staging = root / "staging"
    if staging.is_dir():
        for entry in sorted(staging.iterdir()):
            try:
                begin = json.loads((entry / "begin.json").read_text(encoding="utf-8"))
                chunks = int(begin["chunks"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            parts = len(list(entry.glob("*.part")))
            out["uploads"].append({"deploy": entry.name, "received": parts, "chunks": chunks})
    keep = {PurePosixPath(str(current.get("bundle", ""))).name}
    if isinstance(previous, str):
        keep.add(Path(previous).name)
    bundles = root / "bundles"
    if bundles.is_dir():
        out["unapplied"] = sorted(e.name for e in bundles.iterdir() if e.name not in keep)
    return out


# --- helpers ------------------------------------------------------------------------------


def _arg(args: Mapping[str, Any], key: str) -> Any:
    if key not in args:
        raise DeployError(f"argument {key!r} is missing")
    return args[key]


def _arg_id(args: Mapping[str, Any], key: str = "deploy") -> str:
    value = _arg(args, key)
    try:
        ident = msg.validate_id(value, key)
    except EdgeshipError as exc:
        raise DeployError(_printable(str(exc), 300)) from exc
    # The id names folders under the deploy root: "." or ".." would name the root itself or
    # its parent (and rmtree them before any signature is checked).
    if ident.startswith("."):
        raise DeployError(f"{key} {ident!r}: an id must not start with '.'")
    return ident


def _arg_int(args: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
    value = _arg(args, key)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise DeployError(
            f"argument {key!r}: expected an integer in [{lo}, {hi}], got {ascii(value)[:80]}"
        )
    return value


def _arg_sha(args: Mapping[str, Any], key: str = "sha256") -> str:
    value = _arg(args, key)
    if not isinstance(value, str) or not _SHA_RE.fullmatch(value):
        raise DeployError(f"argument {key!r}: expected a lowercase hex SHA-256")
    return value


def _opt_text(args: Mapping[str, Any], key: str, max_len: int) -> str | None:
    """An optional label: 1 to ``max_len`` characters, no control character or lone surrogate
    (it is logged and sent in telemetry, which must be able to encode it)."""
    value = args.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not 0 < len(value) <= max_len:
        raise DeployError(f"argument {key!r}: expected a string of 1 to {max_len} characters")
    if _BAD_TEXT.search(value):
        raise DeployError(
            f"argument {key!r}: {ascii(value)[:80]} holds a control character or a lone surrogate"
        )
    return value


def _printable(text: str, limit: int = 1000) -> str:
    """``text`` cut to ``limit`` characters with control characters and lone surrogates
    escaped: a reason that quotes a file name or an exception must still encode."""
    if _BAD_TEXT.search(text):
        text = _BAD_TEXT.sub(lambda m: ascii(m.group())[1:-1], text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _describe(exc: BaseException) -> str:
    """An exception as one line: an EdgeshipError's message, else its type and first line."""
    if isinstance(exc, EdgeshipError):
        return str(exc)
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    kind = type(exc).__name__
    return f"{kind}: {lines[0]}" if lines else kind


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so that a reader (or a power cut) sees the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unpack_archive(
    archive: Path, dest: Path, *, max_bytes: int, max_files: int = MAX_FILES
) -> None:
    """Unpack a (possibly gzipped) tar of a bundle into the new folder ``dest``, safely.

    Only plain files and folders with relative names inside ``dest`` are accepted: an absolute
    name, ``..``, a link, a device or a name given twice raises :class:`BundleError`, as do
    more than ``max_files`` files or ``max_bytes`` bytes in all (checked before a byte is
    written, from the headers; tarfile never reads past a member's declared size).
    """
    try:
        tar = tarfile.open(archive, mode="r:*")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"the deployed archive is not a tar archive: {exc}") from exc
    dest.mkdir(parents=True)
    root = dest.resolve()
    total = files = 0
    with tar:
        try:
            for member in tar:
                name = member.name
                parts = tuple(p for p in PurePosixPath(name).parts if p != ".")
                if name.startswith("/") or "\\" in name or ".." in parts:
                    raise BundleError(f"archive member {name!r}: not a relative path inside it")
                if _BAD_TEXT.search(name):
                    raise BundleError(
                        f"archive member {name!r}: a control character or a byte that is not "
                        "UTF-8 in its name; no bundle file has such a name"
                    )
                if not parts:
                    if member.isdir():
                        continue  # the archive's own "./"
                    raise BundleError(f"archive member {name!r}: an empty name")
                target = root.joinpath(*parts)
                if root not in target.parents:
                    raise BundleError(f"archive member {name!r}: outside the bundle")
                if member.isdir():
                    files += 1  # folders use inodes too: an archive of folder headers
                    if files > max_files:
                        raise BundleError(f"the archive holds more than {max_files} entries")
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isreg():
                    raise BundleError(
                        f"archive member {name!r} is a link or special file; a bundle holds "
                        "only plain files and folders"
                    )
                files += 1
                total += member.size
                if files > max_files:
                    raise BundleError(f"the archive holds more than {max_files} files")
                if total > max_bytes:
                    raise BundleError(
                        f"the archive unpacks to more than {max_bytes} bytes (deploy_max_bytes)"
                    )
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(member)
                if src is None:  # pragma: no cover - isreg() members always have data
                    raise BundleError(f"archive member {name!r} has no data")
                try:
                    with src, target.open("xb") as out:
                        shutil.copyfileobj(src, out, 1 << 20)
                except FileExistsError as exc:
                    raise BundleError(f"archive member {name!r} appears twice") from exc
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            raise BundleError(f"the deployed archive is damaged: {exc}") from exc


# --- state ----------------------------------------------------------------------------------


@dataclass
class _Upload:
    id: str
    size: int
    sha256: str
    chunks: int
    chunk_bytes: int
    model: str | None
    model_version: str | None
    dir: Path
    # One bit per chunk (at most MAX_CHUNKS / 8 bytes) and their count: the bookkeeping does
    # not grow with what a sender claims.
    bits: bytearray = field(default_factory=bytearray)
    received: int = 0

    def __post_init__(self) -> None:
        self.bits = bytearray((self.chunks + 7) // 8)

    def has(self, index: int) -> bool:
        return bool(self.bits[index >> 3] & (1 << (index & 7)))

    def add(self, index: int) -> None:
        if not self.has(index):
            self.bits[index >> 3] |= 1 << (index & 7)
            self.received += 1

    def have(self) -> list[int]:
        return [i for i in range(self.chunks) if self.has(i)]

    def params(self) -> dict[str, Any]:
        return {
            "deploy": self.id,
            "size": self.size,
            "sha256": self.sha256,
            "chunks": self.chunks,
            "chunk_bytes": self.chunk_bytes,
            "model": self.model,
            "model_version": self.model_version,
        }

    def chunk_path(self, index: int) -> Path:
        return self.dir / f"{index:06d}.part"

    def chunk_len(self, index: int) -> int:
        if index < self.chunks - 1:
            return self.chunk_bytes
        return self.size - self.chunk_bytes * (self.chunks - 1)

    def first_missing(self, n: int) -> list[int]:
        out: list[int] = []
        for i in range(self.chunks):
            if not self.has(i):
                out.append(i)
                if len(out) == n:
                    break
        return out


class _Trial:
    """A swapped-in bundle's probation: ``left`` successful inferences to go."""

    def __init__(
        self, deployer: Deployer, deploy_id: str, new: LoadedModel, previous: LoadedModel, n: int
    ) -> None:
        self.deployer = deployer
        self.id = deploy_id
        self.new = new
        self.previous: LoadedModel | None = previous
        self.left = n
        self.outcome: str | None = None  # "applied" or "rolled_back" once decided
        self._lock = threading.Lock()

    def passed(self) -> None:
        """One inference on the new bundle succeeded (called on the caller's thread)."""
        with self._lock:
            if self.outcome is not None:
                return
            self.left -= 1
            if self.left > 0:
                return
            self.outcome = "applied"
        self.deployer._probation_passed(self)

    def decide_rollback(self) -> bool:
        with self._lock:
            if self.outcome is not None:
                return False
            self.outcome = "rolled_back"
            return True


class Deployer:
    """The device side of remote deploy for one :class:`~device_agent.agent.Agent`.

    :meth:`handlers` are registered as the agent's ``deploy_*`` commands; they run on the
    agent's command thread, one at a time. :meth:`trial_failed` is called by ``predict`` when a
    bundle on probation fails.
    """

    def __init__(self, agent: Agent) -> None:
        self._agent = agent
        self._config = agent.config
        self.root = deploy_dir(agent.config)
        self._lock = threading.Lock()
        self._upload: _Upload | None = None
        self._trial: _Trial | None = None
        self._records: dict[str, dict[str, Any]] = {}
        self.last_event: msg.DeployEvent | None = None

    def handlers(self) -> dict[str, Callable[[msg.Command], Any]]:
        actions: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
            "deploy_begin": self.begin,
            "deploy_chunk": self.chunk,
            "deploy_commit": self.commit,
            "deploy_status": self.status,
            "deploy_abort": self.abort,
        }

        def handler(action: Callable[[Mapping[str, Any]], dict[str, Any]]) -> Any:
            def run(command: msg.Command) -> dict[str, Any]:
                try:
                    if not isinstance(command.args, Mapping):
                        raise DeployError(f"{command.action}: args must be an object")
                    return action(command.args)
                except EdgeshipError:
                    raise
                except OSError as exc:  # a full or failing disk: the reply says so
                    raise DeployError(
                        _printable(f"{command.action}: cannot write under {self.root}: {exc}")
                    ) from exc
                except Exception as exc:  # a bug here must not cost the agent its commands
                    log.exception("deploy: %s failed", command.action)
                    raise DeployError(
                        _printable(
                            f"{command.action} failed: {_describe(exc)} (an error in the "
                            "agent; its log has the details)"
                        )
                    ) from exc

            return run

        return {name: handler(action) for name, action in actions.items()}

    # --- records and events -------------------------------------------------------------

    def _record(self, deploy_id: str, **fields: Any) -> dict[str, Any]:
        # Called from the command thread and, for a rollback, from an inference thread.
        with self._lock:
            rec = self._records.setdefault(deploy_id, {"deploy": deploy_id})
            rec.update(fields)
            while len(self._records) > _KEEP_RECORDS:
                del self._records[next(iter(self._records))]
            return dict(rec)

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
            reason=None if reason is None else _printable(reason),
        )
        self.last_event = event
        with self._agent._window_lock:  # the window being emitted takes it under this lock
            self._agent._deploy_event = event
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
        self._agent._run_soon(self._agent._publish_status)

    # --- actions ------------------------------------------------------------------------

    def _refuse_the_running_bundle(self, deploy_id: str) -> None:
        """A deploy id names its folder; the running bundle's folder must not be replaced."""
        dest = self.root / "bundles" / deploy_id
        if dest.resolve() == self._agent.bundle.root.resolve():
            raise DeployError(f"deploy {deploy_id} is the bundle running now; nothing to do")

    def begin(self, args: Mapping[str, Any]) -> dict[str, Any]:
        deploy_id = _arg_id(args)
        self._refuse_the_running_bundle(deploy_id)
        size = _arg_int(args, "size", 1, self._config.deploy_max_bytes)
        chunk_bytes = _arg_int(args, "chunk_bytes", 1, MAX_CHUNK_BYTES)
        if chunk_bytes < min(MIN_CHUNK_BYTES, size):
            raise DeployError(
                f"argument 'chunk_bytes': {chunk_bytes} bytes is below the minimum of "
                f"{MIN_CHUNK_BYTES} (only a deploy sent in one chunk may be smaller)"
            )
        needed = -(-size // chunk_bytes)
        if needed > MAX_CHUNKS:
            raise DeployError(
                f"{size} bytes in chunks of {chunk_bytes} bytes is {needed} chunks, over the "
                f"limit of {MAX_CHUNKS}; send chunks of at least {-(-size // MAX_CHUNKS)} bytes"
            )
        chunks = _arg_int(args, "chunks", 1, MAX_CHUNKS)
        if chunks != needed:
            raise DeployError(
                f"{chunks} chunks of {chunk_bytes} bytes cannot hold {size} bytes exactly"
            )
        sha = _arg_sha(args)
        model = _opt_text(args, "model", _MAX_MODEL_LEN)
        model_version = _opt_text(args, "model_version", _MAX_VERSION_LEN)
        params: dict[str, Any] = {
            "deploy": deploy_id,
            "size": size,
            "sha256": sha,
            "chunks": chunks,
            "chunk_bytes": chunk_bytes,
            "model": model,
            "model_version": model_version,
        }
        trial = self._trial
        if trial is not None:
            raise DeployError(
                f"deploy {trial.id} is on probation ({trial.left} inferences to go); wait for "
                "it to be applied or send deploy_abort"
            )
        # The same id, size, hash and chunking resume an upload; the model fields are labels.
        same = ("deploy", "size", "sha256", "chunks", "chunk_bytes")
        upload = self._upload
        if upload is not None and all(upload.params()[k] == params[k] for k in same):
            upload.model, upload.model_version = model, model_version
            return self._receiving(upload)
        if upload is not None:
            log.info("deploy %s: abandoned for deploy %s", upload.id, deploy_id)
            self._discard(upload)
        staging = self.root / "staging" / deploy_id
        upload = _Upload(
            id=deploy_id,
            size=size,
            sha256=sha,
            chunks=chunks,
            chunk_bytes=chunk_bytes,
            model=model,
            model_version=model_version,
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
            for i in range(chunks):
                part = upload.chunk_path(i)
                if part.is_file() and part.stat().st_size == upload.chunk_len(i):
                    upload.add(i)
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
            _write_atomic(begin_file, json.dumps(params).encode())
        self._upload = upload
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

    def _receiving(self, upload: _Upload) -> dict[str, Any]:
        return {
            "deploy": upload.id,
            "state": "receiving",
            "chunks": upload.chunks,
            "have": upload.have(),
        }

    def _current_upload(self, deploy_id: str) -> _Upload:
        upload = self._upload
        if upload is None or upload.id != deploy_id:
            raise DeployError(f"no upload {deploy_id!r} in progress; send deploy_begin first")
        return upload

    def chunk(self, args: Mapping[str, Any]) -> dict[str, Any]:
        upload = self._current_upload(_arg_id(args))
        index = _arg_int(args, "index", 0, upload.chunks - 1)
        sha = _arg_sha(args)
        data_b64 = _arg(args, "data")
        if not isinstance(data_b64, str):
            raise DeployError("argument 'data': expected a base64 string")
        try:
            data = base64.b64decode(data_b64, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DeployError(f"chunk {index}: 'data' is not base64 ({exc})") from exc
        if len(data) != upload.chunk_len(index):
            raise DeployError(
                f"chunk {index}: {len(data)} bytes, expected {upload.chunk_len(index)}"
            )
        if hashlib.sha256(data).hexdigest() != sha:
            raise DeployError(f"chunk {index}: does not match its SHA-256 (damaged in transit)")
        path = upload.chunk_path(index)
        if not upload.has(index):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
            upload.add(index)
        return {
            "deploy": upload.id,
            "index": index,
            "received": upload.received,
            "chunks": upload.chunks,
        }

    def commit(self, args: Mapping[str, Any]) -> dict[str, Any]:
        deploy_id = _arg_id(args)
        done = self._records.get(deploy_id)
        if done is not None and done.get("state") not in (None, "receiving"):
            return dict(done)  # a commit delivered twice gets the same answer
        self._refuse_the_running_bundle(deploy_id)
        upload = self._current_upload(deploy_id)
        if upload.received < upload.chunks:
            raise DeployError(
                f"deploy {deploy_id}: {upload.chunks - upload.received} of {upload.chunks} "
                f"chunks missing (first: {upload.first_missing(10)}); send them and commit again"
            )
        current = self._agent._loaded
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
                new = self._open_and_test(bundle)
            finally:
                shutil.rmtree(upload.dir, ignore_errors=True)
        except Exception as exc:  # MemoryError included: whatever it is, nothing was swapped
            shutil.rmtree(dest, ignore_errors=True)
            if not isinstance(exc, EdgeshipError | OSError):
                log.warning("deploy %s: refused on %r", deploy_id, exc, exc_info=exc)
            reason = _printable(f"refused before the swap: {_describe(exc)}")
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
        n = self._config.deploy_probation_inferences
        if n > 0:
            new.trial = trial = _Trial(self, deploy_id, new, current, n)
            self._trial = trial
        previous = self._agent._swap_model(new)
        rec = self._record(
            deploy_id,
            state="probation" if n > 0 else "applied",
            from_version=previous.model.version,
            to_version=m.version,
            model=m.name,
            reason=None,
            inputs_changed=inputs_changed,
            probation=n,
        )
        if n > 0:
            self._event(deploy_id, "probation", from_version, m.version, m.name)
        else:
            self._apply(deploy_id, new, previous)
        return rec

    def _unpack(self, upload: _Upload, dest: Path) -> None:
        digest = hashlib.sha256()
        archive = upload.dir / "archive"
        size = 0
        with archive.open("wb") as out:
            for i in range(upload.chunks):
                data = upload.chunk_path(i).read_bytes()
                digest.update(data)
                size += len(data)
                out.write(data)
        if size != upload.size or digest.hexdigest() != upload.sha256:
            raise BundleError(
                f"the archive does not match the SHA-256 announced in deploy_begin "
                f"(expected {upload.sha256[:12]}…, got {digest.hexdigest()[:12]}…, "
                f"{size} bytes)"
            )
        shutil.rmtree(dest, ignore_errors=True)
        unpack_archive(archive, dest, max_bytes=self._config.deploy_max_bytes)

    def _open_and_test(self, bundle: Bundle) -> LoadedModel:
        """Open the bundle's model and detector and run one inference on generated inputs."""
        from device_agent.agent import LoadedModel
        from device_agent.benchmark import sample_inputs

        new = LoadedModel.open(bundle, self._config)
        io = bundle.manifest.io
        # The same steps as Agent.predict: the checker, the run predict uses (with the score
        # output when the detector is in the graph), then the score.
        try:
            feed = new.check(sample_inputs(io))
            outputs = new.run(feed)
            if new.score_in_graph:
                scores = outputs.pop()
            elif new.detector is not None:
                scores = new.detector.score(feed, outputs)
            else:
                scores = np.zeros(1)
        except Exception as exc:  # MemoryError, a detector's numpy error...: all a refusal
            raise BundleError(f"the self-test inference failed: {_describe(exc)}") from exc
        if not np.isfinite(scores).all():
            raise BundleError("the self-test gave a non-finite outlier score")
        if len(outputs) != len(io.outputs):
            raise BundleError(
                f"the self-test gave {len(outputs)} outputs; the manifest lists {len(io.outputs)}"
            )
        for spec, out in zip(io.outputs, outputs, strict=True):
            if out.dtype.kind == "f" and not np.isfinite(out).all():
                raise BundleError(f"the self-test gave non-finite values in output {spec.name!r}")
        return new

    def status(self, args: Mapping[str, Any]) -> dict[str, Any]:
        deploy_id = args.get("deploy")
        current = self._agent._loaded.model
        base = {"model": current.name, "model_version": current.version}
        if deploy_id is None:
            trial, upload = self._trial, self._upload
            deploy_id = trial.id if trial else upload.id if upload else None
            if deploy_id is None and self._records:
                deploy_id = next(reversed(self._records))
        if deploy_id is None:
            return {**base, "deploy": None, "state": None}
        deploy_id = _arg_id({"deploy": deploy_id})
        rec = self._records.get(deploy_id)
        if rec is None:
            raise DeployError(f"no deploy {deploy_id!r} on this device since the agent started")
        out = {**base, **rec}
        upload, trial = self._upload, self._trial
        if upload is not None and upload.id == deploy_id:
            out.update(received=upload.received, chunks=upload.chunks)
        if trial is not None and trial.id == deploy_id:
            out["probation_left"] = max(0, trial.left)
        return out

    def abort(self, args: Mapping[str, Any]) -> dict[str, Any]:
        deploy_id = _arg_id(args)
        upload, trial = self._upload, self._trial
        if upload is not None and upload.id == deploy_id:
            self._discard(upload)
            self._upload = None
            return self._record(deploy_id, state="aborted")
        if trial is not None and trial.id == deploy_id:
            self._rollback(trial, "aborted by the operator during probation")
            return dict(self._records[deploy_id])
        rec = self._records.get(deploy_id)
        state = None if rec is None else rec.get("state")
        raise DeployError(
            f"deploy {deploy_id!r} cannot be aborted: "
            + ("unknown to this agent" if state is None else f"it is {state}")
        )

    def _discard(self, upload: _Upload) -> None:
        shutil.rmtree(upload.dir, ignore_errors=True)

    def _clear_staging(self) -> None:
        shutil.rmtree(self.root / "staging", ignore_errors=True)

    # --- probation ------------------------------------------------------------------------

    def trial_failed(
        self, loaded: LoadedModel, inputs: Mapping[str, Any], exc: EdgeshipError
    ) -> Prediction:
        """``loaded`` (on probation) failed on ``inputs``: answer with the previous model if it
        can, rolling back, or re-raise ``exc`` if the previous model fails too."""
        trial = loaded.trial
        previous = None if trial is None else trial.previous
        if trial is None or previous is None:
            raise exc
        try:
            result = self._agent._predict_on(previous, inputs)
        except EdgeshipError:
            raise exc from None  # both models refuse it: the input is at fault, not the deploy
        self._rollback(trial, f"inference failed on the new bundle: {exc}")
        return result

    def _rollback(self, trial: _Trial, reason: str) -> None:
        if not trial.decide_rollback():
            return
        previous = trial.previous
        assert previous is not None
        with self._lock:
            self._agent._swap_model(previous)
            if self._trial is trial:
                self._trial = None
        new_model = trial.new.model
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
        self._agent._run_soon(lambda: shutil.rmtree(dest, ignore_errors=True))

    def _probation_passed(self, trial: _Trial) -> None:
        previous = trial.previous
        assert previous is not None
        with self._lock:
            trial.new.trial = None  # the hot path stops counting
            trial.previous = None  # let the previous session go
            if self._trial is trial:
                self._trial = None
        self._agent._run_soon(lambda: self._apply(trial.id, trial.new, previous))

    def _apply(self, deploy_id: str, new: LoadedModel, previous: LoadedModel) -> None:
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
            _write_atomic(self.root / CURRENT_NAME, json.dumps(pointer, indent=2).encode())
        except OSError as exc:
            log.error("deploy %s: applied, but %s not written: %s", deploy_id, CURRENT_NAME, exc)
        self._prune(keep={new.bundle.root.name, previous.bundle.root.name})
        self._record(deploy_id, state="applied")
        self._event(deploy_id, "applied", previous.model.version, m.version, m.name)

    def _prune(self, keep: set[str]) -> None:
        """Delete deployed bundles other than the current and the previous one."""
        bundles = self.root / "bundles"
        if not bundles.is_dir():
            return
        for entry in bundles.iterdir():
            if entry.name not in keep:
                shutil.rmtree(entry, ignore_errors=True)
