"""The ``signature.json`` format: Ed25519 signatures over a bundle's ``manifest.json``.

A bundle may carry ``signature.json`` beside its manifest (it is not listed in the manifest).
It holds one or more signatures (one per key, for key rotation) over the exact bytes of
``manifest.json``, which lists the SHA-256 of every other file, so one valid signature vouches
for the whole bundle. This module owns the file's schema, reading (strict: no unknown keys,
canonical base64) and writing, with the standard library alone; checking a signature against
trusted keys needs ``cryptography`` and lives in :mod:`device_agent.signing`. The format is
documented in ``docs/bundle.md``.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.contracts.bundle import MANIFEST_NAME
from device_agent.contracts.errors import SignatureError

__all__ = [
    "ALGORITHM",
    "MAX_SIGNATURE_BYTES",
    "SIGNATURE_FORMAT",
    "SIGNATURE_FORMAT_VERSION",
    "SIGNATURE_NAME",
    "SIGN_HINT",
    "Signature",
    "read_signatures",
    "write_signatures",
]

SIGNATURE_NAME = "signature.json"
SIGNATURE_FORMAT = "edgeship.signature"
SIGNATURE_FORMAT_VERSION = 1
ALGORITHM = "ed25519"

# What to do about a missing or broken signature file, for error messages.
SIGN_HINT = "sign it on the workstation with: edgeship sign BUNDLE --key PRIVATE.pem"
# A signature file holds a few hundred bytes per signature.
MAX_SIGNATURE_BYTES = 1 << 20
_ALGORITHM_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


@dataclass(frozen=True)
class Signature:
    """One entry of ``signature.json``.

    ``manifest_sha256`` records which manifest bytes were signed. The signature does not cover
    it, so it is never trusted on its own: it lets ``edgeship sign`` drop signatures over an
    older manifest without their keys, lets a failed check say whether the manifest changed,
    and must match the manifest whenever a trusted signature is checked.
    """

    key_id: str
    algorithm: str
    signature: bytes
    manifest_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "algorithm": self.algorithm,
            "key_id": self.key_id,
            "signature": base64.b64encode(self.signature).decode("ascii"),
            "manifest_sha256": self.manifest_sha256,
        }


_FILE_KEYS = frozenset({"format", "format_version", "signed_file", "signatures"})
_ENTRY_KEYS = frozenset({"algorithm", "key_id", "signature", "manifest_sha256"})


def read_signatures(root: Path) -> list[Signature] | None:
    """The signatures in ``root/signature.json``; None when the bundle has no such file.

    Raises :class:`SignatureError` when the file exists but is not exactly a signature file:
    the schema is strict (no unknown keys, canonical base64), so no byte of the file can change
    without the change being refused or reaching a checked field.
    """
    file = root / SIGNATURE_NAME
    if not file.exists():
        return None
    where = f"{root}/{SIGNATURE_NAME}"
    try:
        size = file.stat().st_size
        if size > MAX_SIGNATURE_BYTES:
            raise SignatureError(
                f"{where} is {size} bytes, over the limit of {MAX_SIGNATURE_BYTES}; it is not "
                f"a signature file ({SIGN_HINT} again)"
            )
        data = json.loads(file.read_bytes())
    except RecursionError:
        raise SignatureError(f"{where} is nested too deeply; {SIGN_HINT} again") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        why = str(exc).encode("ascii", "backslashreplace").decode("ascii")
        raise SignatureError(f"{where} is not valid JSON ({why}); {SIGN_HINT} again") from exc
    if not isinstance(data, dict) or data.get("format") != SIGNATURE_FORMAT:
        raise SignatureError(
            f"{where}: 'format' is not {SIGNATURE_FORMAT!r}; this is not an edgeship signature "
            f"file ({SIGN_HINT} again)"
        )
    unknown = sorted(set(data) - _FILE_KEYS)
    if unknown:
        raise SignatureError(f"{where}: unknown fields {unknown}; {SIGN_HINT} again")
    if data.get("signed_file") != MANIFEST_NAME:
        raise SignatureError(
            f"{where}: 'signed_file' must be {MANIFEST_NAME!r}, got {data.get('signed_file')!r}"
        )
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise SignatureError(f"{where}: format_version must be a positive int, got {version!r}")
    if version > SIGNATURE_FORMAT_VERSION:
        raise SignatureError(
            f"{where}: format_version {version} is newer than this agent understands "
            f"({SIGNATURE_FORMAT_VERSION}); upgrade edgeship on this device"
        )
    entries = data.get("signatures")
    if not isinstance(entries, list):
        raise SignatureError(f"{where}: 'signatures' must be a list")
    out: list[Signature] = []
    for i, entry in enumerate(entries):
        at = f"{where}: signatures[{i}]"
        if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
            raise SignatureError(f"{at} must be an object with exactly {sorted(_ENTRY_KEYS)}")
        key_id, algorithm, sig = entry["key_id"], entry["algorithm"], entry["signature"]
        digest = entry["manifest_sha256"]
        if not (
            isinstance(key_id, str) and key_id.startswith("sha256:") and _is_hex(key_id[7:], 64)
        ):
            raise SignatureError(f"{at}.key_id must be 'sha256:<64 hex digits>', got {key_id!r}")
        if not isinstance(algorithm, str) or not _ALGORITHM_RE.fullmatch(algorithm):
            raise SignatureError(
                f"{at}.algorithm must be a name such as {ALGORITHM!r}, got {ascii(algorithm)[:80]}"
            )
        if not isinstance(digest, str) or not _is_hex(digest, 64):
            raise SignatureError(f"{at}.manifest_sha256 must be 64 lowercase hex digits")
        try:
            raw = base64.b64decode(str(sig), validate=True)
        except ValueError as exc:
            raise SignatureError(f"{at}.signature is not base64") from exc
        if base64.b64encode(raw).decode("ascii") != sig:  # e.g. altered padding bits
            raise SignatureError(f"{at}.signature is not canonical base64")
        out.append(
            Signature(key_id=key_id, algorithm=algorithm, signature=raw, manifest_sha256=digest)
        )
    return out


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)


def write_signatures(root: Path, signatures: Sequence[Signature]) -> Path:
    """Write ``root/signature.json`` atomically (temp file + rename)."""
    doc = {
        "format": SIGNATURE_FORMAT,
        "format_version": SIGNATURE_FORMAT_VERSION,
        "signed_file": MANIFEST_NAME,
        "signatures": [s.to_dict() for s in signatures],
    }
    target = root / SIGNATURE_NAME
    tmp = root / f".{SIGNATURE_NAME}.tmp"
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, target)
    return target
