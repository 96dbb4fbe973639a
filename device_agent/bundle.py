"""Loading a bundle directory and verifying it: the manifest's signature (when trusted keys are
configured) and every file against the manifest's SHA-256."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from device_agent.contracts.bundle import MANIFEST_NAME, Manifest
from device_agent.errors import BundleError, IntegrityError
from device_agent.runtime import ModelSession, open_session
from device_agent.signing import SignatureStatus, check_signatures, signature_status

__all__ = ["Bundle", "load_bundle", "sha256_file"]

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
        """Open the model with its runtime. An encrypted model is decrypted in memory with the
        key in ``model_key_file`` and handed to the runtime as bytes (never written to disk);
        the key file is ignored for a plain model. The detector's in-graph score output
        (``detector.graph_output``) is hidden from the session's ``io`` and ``run``."""
        model = self.manifest.model
        content = None
        if model.encryption is not None:
            from device_agent.encryption import decrypt_model

            content = decrypt_model(self.model_path, model.encryption, model_key_file)
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
    if not root.exists():
        raise BundleError(f"bundle not found: {root}")
    if not root.is_dir():
        raise BundleError(
            f"{root} is not a bundle directory (expected a folder with {MANIFEST_NAME})"
        )
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise BundleError(f"{root} has no {MANIFEST_NAME}; is it a bundle directory?")
    keys = None
    if trusted_keys:
        from device_agent.signing import load_trusted_keys

        keys = load_trusted_keys(trusted_keys)
    # One read: the bytes whose signature is checked are the bytes that are parsed.
    manifest_bytes = manifest_path.read_bytes()
    if keys is not None:
        status = check_signatures(root, manifest_bytes, keys)
    else:
        status = signature_status(root)
    manifest = Manifest.from_json(manifest_bytes)
    if verify:
        verify_files(root, manifest)
    return Bundle(root=root, manifest=manifest, signature=status)


def verify_files(root: Path, manifest: Manifest) -> None:
    """Check each file listed in the manifest against its recorded SHA-256."""
    for name, expected in sorted(manifest.files.items()):
        file = root / name
        if not file.is_file():
            raise IntegrityError(f"bundle file {name!r} is missing from {root}", file=name)
        actual = sha256_file(file)
        if actual != expected:
            raise IntegrityError(
                f"bundle file {name!r} does not match its SHA-256 in {MANIFEST_NAME} "
                f"(expected {expected[:12]}…, found {actual[:12]}…): the bundle was altered "
                "or damaged in transfer; copy it again",
                file=name,
            )
