"""Remote deploy's files on the device: where deploys live, which bundle runs at start, and
how a received archive becomes a bundle folder.

On-disk layout, under ``{state_dir}/deploy-{fleet}-{device}/``::

    current.json        the deployed bundle to run (written to a temporary file, then renamed)
    staging/{id}/       begin.json and the received chunks, 000000.part ...
    bundles/{id}/       unpacked, verified bundles: the current one and the one before it

The commands that fill it are :mod:`device_agent.deploy`'s; ``edgeship-agent check`` and
``status`` read it with :func:`deployed_bundle` and :func:`deploy_state`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from device_agent.agent_config import AgentConfig
from device_agent.bundle import Bundle, load_bundle
from device_agent.contracts.bundle import MANIFEST_NAME
from device_agent.contracts.commands import DeployError, has_bad_text
from device_agent.errors import BundleError, ConfigError, EdgeshipError
from device_agent.runtime import ModelSession

__all__ = [
    "CURRENT_NAME",
    "MAX_FILES",
    "Upload",
    "bundle_to_run",
    "deploy_dir",
    "deploy_state",
    "deployed_bundle",
    "join_chunks",
    "read_current",
    "remove_durably",
    "store_chunk",
    "unpack_archive",
    "write_atomic",
]

log = logging.getLogger(__name__)

T = TypeVar("T")

MAX_FILES = 1000
CURRENT_NAME = "current.json"


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


def bundle_to_run(
    path: str | Path | None, cfg: AgentConfig, build: Callable[[Bundle, ModelSession], T]
) -> T:
    """``build(bundle, session)`` for the bundle the agent runs at start: the one deployed
    here (:func:`deployed_bundle`) when there is one that verifies and opens and builds, else
    the bundle at ``path``, verified (see :meth:`device_agent.agent.Agent.from_bundle`).
    ConfigError when ``path`` is None and no deployed bundle can run."""
    try:
        deployed = deployed_bundle(cfg, fallback=path is not None)
    except ConfigError as exc:  # only without path: nothing to fall back to
        raise ConfigError(
            f"{exc}; pass --bundle DIR (or set bundle in agent.toml) to run another, or "
            "deploy one again"
        ) from exc
    if deployed is not None:
        try:
            opened = deployed.open_model(
                model_key_file=cfg.model_key_file, threads=cfg.threads, providers=cfg.providers
            )
            return build(deployed, opened)
        except EdgeshipError as exc:  # e.g. its model key is gone: the given bundle runs
            if path is None:
                raise ConfigError(
                    f"the deployed bundle {deployed.root} cannot run: {exc}; pass --bundle "
                    "DIR (or set bundle in agent.toml) to run another"
                ) from exc
            log.error("the deployed bundle %s cannot run: %s; using %s", deployed.root, exc, path)
    if path is None:
        raise ConfigError(
            "no bundle to run: pass --bundle DIR (or set bundle in agent.toml), or deploy "
            f"one with 'edgeship deploy' (none in {deploy_dir(cfg)})"
        )
    bundle = load_bundle(path, trusted_keys=cfg.trusted_keys)
    session = bundle.open_model(
        model_key_file=cfg.model_key_file, threads=cfg.threads, providers=cfg.providers
    )
    return build(bundle, session)


def deploy_state(config: AgentConfig) -> dict[str, Any]:
    """What is on disk about remote deploys, read without verifying anything (cheap).

    ``current`` is ``current.json`` (or None), with ``error`` when it cannot be read;
    ``previous_model``/``previous_version`` come from the previous bundle's manifest;
    ``uploads`` lists the open uploads (``deploy``, ``received``, ``chunks``); ``unapplied``
    names the deployed bundles that are neither current nor previous (on probation now, left by
    a restart during one, or taken back by ``deploy_revert``; the next applied deploy deletes
    them). Whether a bundle is on probation is known only to the running
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


def read_current(config: AgentConfig) -> dict[str, Any] | None:
    """``current.json`` as an object, unverified; None when there is none or it cannot be read
    (then :func:`deployed_bundle` ignores it and the agent runs the bundle it was given)."""
    try:
        data = json.loads((deploy_dir(config) / CURRENT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so that a reader (or a power cut) sees the old or the new content."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def remove_durably(path: Path) -> None:
    """Remove ``path`` if it is there, so that a power cut after this returns does not bring it
    back (a reader sees it or not, never part of it)."""
    path.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
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
                if has_bad_text(name):
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


@dataclass
class Upload:
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

    def resume(self) -> None:
        """Count the chunks already stored in :attr:`dir` (an upload begun before, perhaps by
        an agent since restarted): each whole ``.part`` file of the right length."""
        for i in range(self.chunks):
            part = self.chunk_path(i)
            if part.is_file() and part.stat().st_size == self.chunk_len(i):
                self.add(i)


def store_chunk(upload: Upload, index: int, data_b64: str, sha256: str) -> None:
    """Check chunk ``index`` of ``upload`` (base64 ``data_b64``, its length, its ``sha256``) and
    write it once, to a temporary file renamed into place; a chunk delivered twice is checked
    and not written again. DeployError saying what is wrong (damaged in transit)."""
    try:
        data = base64.b64decode(data_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DeployError(f"chunk {index}: 'data' is not base64 ({exc})") from exc
    if len(data) != upload.chunk_len(index):
        raise DeployError(f"chunk {index}: {len(data)} bytes, expected {upload.chunk_len(index)}")
    if hashlib.sha256(data).hexdigest() != sha256:
        raise DeployError(f"chunk {index}: does not match its SHA-256 (damaged in transit)")
    if not upload.has(index):
        path = upload.chunk_path(index)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        upload.add(index)


def join_chunks(upload: Upload, out: Path, *, what: str, begin: str) -> None:
    """Join the chunks of ``upload`` into the file ``out`` and check its size and SHA-256
    against those announced by the ``begin`` action; BundleError naming ``what`` if not."""
    digest = hashlib.sha256()
    size = 0
    with out.open("wb") as fh:
        for i in range(upload.chunks):
            data = upload.chunk_path(i).read_bytes()
            digest.update(data)
            size += len(data)
            fh.write(data)
    if size != upload.size or digest.hexdigest() != upload.sha256:
        raise BundleError(
            f"the {what} does not match the SHA-256 announced in {begin} "
            f"(expected {upload.sha256[:12]}…, got {digest.hexdigest()[:12]}…, {size} bytes)"
        )
