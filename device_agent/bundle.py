"""Loading a bundle directory and verifying every file against its manifest."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from device_agent.contracts.bundle import MANIFEST_NAME, Manifest
from device_agent.errors import BundleError, IntegrityError

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
    """A verified bundle on disk."""

    root: Path
    manifest: Manifest

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model.file

    def path_of(self, name: str) -> Path:
        return self.root / name


def load_bundle(path: str | Path, *, verify: bool = True) -> Bundle:
    """Read ``manifest.json`` under ``path`` and, by default, check every file's SHA-256.

    Raises :class:`BundleError` when the directory or manifest is unusable and
    :class:`IntegrityError` (naming the file) when a file is missing or altered.
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
    manifest = Manifest.from_json(manifest_path.read_bytes())
    if verify:
        verify_files(root, manifest)
    return Bundle(root=root, manifest=manifest)


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
