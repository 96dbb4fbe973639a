"""Loading a bundle directory and verifying it: the manifest's signature (when trusted keys are
configured), every file against the manifest's SHA-256, and that the directory holds nothing
else. The runtime is handed the model's bytes as verified, never a path to re-open."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from device_agent.contracts.bundle import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest
from device_agent.errors import BundleError, IntegrityError
from device_agent.runtime import ModelSession, open_session
from device_agent.signing import (
    SIGNATURE_NAME,
    SignatureStatus,
    check_signatures,
    signature_status,
)

__all__ = ["UNLISTED_NAMES", "Bundle", "load_bundle", "sha256_file", "unlisted_files"]

# The only files a bundle directory may hold besides those its manifest lists.
UNLISTED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks so large models need no extra memory."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk. ``signature`` says who signed its manifest and whether that
    was verified against trusted keys."""

    root: Path
    manifest: Manifest
    signature: SignatureStatus = field(default_factory=SignatureStatus)

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model.file

    def path_of(self, name: str) -> Path:
        return self.root / name

    @property
    def encrypted(self) -> bool:
        return self.manifest.model.encryption is not None

    def open_model(
        self,
        *,
        model_key_file: str | Path | None = None,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> ModelSession:
        """Open the model with its runtime.

        The model file is read once and its SHA-256 checked again on those bytes, which are
        what the runtime gets: a file changed since :func:`load_bundle` is refused, never run.
        An encrypted model is decrypted in memory with the key in ``model_key_file`` (never
        written to disk); the key file is ignored for a plain model. An ONNX model that keeps
        tensors in external data files is refused (the runtime would read those files by
        itself, unverified). The detector's in-graph score output (``detector.graph_output``)
        is hidden from the session's ``io`` and ``run``."""
        model = self.manifest.model
        content = read_verified(self.root, model.file, self.manifest.files[model.file])
        if model.encryption is not None:
            from device_agent.encryption import decrypt

            content = decrypt(content, model.encryption, model_key_file, model.file)
        if model.runtime == "onnxruntime":
            _refuse_external_data(content, model.file)
        detector = self.manifest.detector
        hidden = (
            () if detector is None or detector.graph_output is None else (detector.graph_output,)
        )
        return open_session(
            self.model_path,
            runtime=model.runtime,
            threads=threads,
            providers=providers,
            content=content,
            hidden_outputs=hidden,
        )


def load_bundle(
    path: str | Path,
    *,
    verify: bool = True,
    trusted_keys: Sequence[str | Path] = (),
) -> Bundle:
    """Read ``manifest.json`` under ``path`` and, by default, check every file's SHA-256.

    With ``trusted_keys`` (public key files), the bundle must also carry a valid Ed25519
    signature of its manifest by one of those keys (``signature.json``), checked before
    anything else; without them, signatures are listed but not checked.

    Raises :class:`BundleError` when the directory or manifest is unusable,
    :class:`SignatureError` when the bundle is unsigned, signed by another key or its signature
    does not verify, :class:`IntegrityError` (naming the file) when a file is missing or
    altered, and :class:`ConfigError` when a trusted key file is missing or not an Ed25519
    public key.
    """
    root = Path(path)
    try:
        if not root.exists():
            raise BundleError(f"bundle not found: {root}")
        if not root.is_dir():
            raise BundleError(
                f"{root} is not a bundle directory (expected a folder with {MANIFEST_NAME})"
            )
        manifest_path = root / MANIFEST_NAME
        if not manifest_path.is_file():
            raise BundleError(f"{root} has no {MANIFEST_NAME}; is it a bundle directory?")
        size = manifest_path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise BundleError(
                f"{manifest_path} is {size} bytes, over the limit of {MAX_MANIFEST_BYTES}; "
                "it is not a manifest"
            )
        keys = None
        if trusted_keys:
            from device_agent.signing import load_trusted_keys

            keys = load_trusted_keys(trusted_keys)
        # One read: the bytes whose signature is checked are the bytes that are parsed.
        manifest_bytes = manifest_path.read_bytes()
    except OSError as exc:
        raise BundleError(f"cannot read the bundle {root}: {exc.strerror or exc}") from exc
    if keys is not None:
        status = check_signatures(root, manifest_bytes, keys)
    else:
        status = signature_status(root)
    manifest = Manifest.from_json(manifest_bytes)
    if verify:
        verify_files(root, manifest)
    return Bundle(root=root, manifest=manifest, signature=status)


def unlisted_files(root: Path, manifest: Manifest) -> list[str]:
    """Entries under ``root`` that are neither listed in the manifest nor in
    :data:`UNLISTED_NAMES`, nor a folder on the way to a listed file (sorted, relative POSIX
    names; a folder that holds only unlisted entries is named itself)."""
    listed = set(manifest.files)
    folders = {"/".join(n.split("/")[:i]) for n in listed for i in range(1, n.count("/") + 1)}
    extra: list[str] = []

    def fail(err: OSError) -> None:
        raise err

    # Folders on the way to a listed file are walked even through a link (the walk cannot go
    # deeper than the deepest listed name); any other folder is named, not walked.
    for top, dirs, names in os.walk(root, onerror=fail, followlinks=True):
        rel = Path(top).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        for d in list(dirs):
            if prefix + d not in folders:
                extra.append(prefix + d)
                dirs.remove(d)  # named once, not each thing inside it
        for n in names:
            name = prefix + n
            if name not in listed and (prefix or n not in UNLISTED_NAMES):
                extra.append(name)
    return sorted(extra)


def verify_files(root: Path, manifest: Manifest) -> None:
    """Check that ``root`` holds only the manifest's files (and :data:`UNLISTED_NAMES`), and
    each of them against its recorded SHA-256."""
    try:
        extra = unlisted_files(root, manifest)
    except OSError as exc:
        raise BundleError(f"cannot list the bundle {root}: {exc.strerror or exc}") from exc
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise IntegrityError(
            f"bundle file {extra[0]!r}{more} in {root} is not listed in {MANIFEST_NAME}: a "
            "bundle holds only the files its manifest lists (and signature.json), since "
            "nothing else is verified; delete it, or package the bundle again if the model "
            "needs it",
            file=extra[0],
        )
    for name, expected in sorted(manifest.files.items()):
        file = root / name
        try:
            if not file.is_file():
                raise IntegrityError(f"bundle file {name!r} is missing from {root}", file=name)
            actual = sha256_file(file)
        except OSError as exc:
            raise IntegrityError(
                f"bundle file {name!r} in {root} cannot be read: {exc.strerror or exc}",
                file=name,
            ) from exc
        _check_digest(name, expected, actual)


def read_verified(root: Path, name: str, expected: str) -> bytes:
    """The bytes of bundle file ``name``, read once and checked against ``expected``."""
    try:
        data = (root / name).read_bytes()
    except OSError as exc:
        raise IntegrityError(
            f"bundle file {name!r} in {root} cannot be read: {exc.strerror or exc}", file=name
        ) from exc
    _check_digest(name, expected, hashlib.sha256(data).hexdigest())
    return data


def _check_digest(name: str, expected: str, actual: str) -> None:
    if actual != expected:
        raise IntegrityError(
            f"bundle file {name!r} does not match its SHA-256 in {MANIFEST_NAME} "
            f"(expected {expected[:12]}…, found {actual[:12]}…): the bundle was altered "
            "or damaged in transfer; copy it again",
            file=name,
        )


def _refuse_external_data(content: bytes, name: str) -> None:
    from device_agent.onnx_scan import external_data_refs

    refs = external_data_refs(content, name=name)
    if refs:
        first = refs[0]
        more = f" and {len(refs) - 1} more tensor(s)" if len(refs) > 1 else ""
        raise BundleError(
            f"{name} keeps tensor {first.tensor!r}{more} in the external data file "
            f"{first.location!r}, which the runtime would read unverified; a bundle's model "
            "must hold its weights: package it again with edgeship (sdk.package inlines "
            "external data)"
        )
