"""Keys, signing and encryption of bundles on the workstation (``edgeship keys``, ``sign``,
``verify``, ``encrypt``). The formats are in ``docs/bundle.md``; the board side, which checks
what this writes, is :mod:`device_agent.signing` and :mod:`device_agent.encryption`.

Every step that changes a bundle first verifies it (every file's SHA-256), so a damaged or
tampered bundle is never signed or encrypted into looking trustworthy.
"""

from __future__ import annotations

import base64
import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from device_agent.bundle import Bundle, load_bundle, sha256_file
from device_agent.contracts.bundle import ENCRYPTED_FORMAT_VERSION, MANIFEST_NAME, Manifest
from device_agent.encryption import KEY_BYTES, encrypt_model, key_id, load_model_key
from device_agent.errors import BundleError, ConfigError, IntegrityError
from device_agent.signing import (
    SIGNATURE_NAME,
    fingerprint,
    load_private_key,
    load_public_key,
    read_signatures,
    require_cryptography,
    sign_manifest,
    write_signatures,
)

__all__ = [
    "GeneratedKey",
    "encrypt_bundle",
    "generate_model_key",
    "generate_signing_key",
    "key_fingerprint",
    "sign_bundle",
]

DEFAULT_KEY_NAME = "edgeship-signing"
DEFAULT_MODEL_KEY_NAME = "edgeship-model"


@dataclass(frozen=True)
class GeneratedKey:
    """Files written by a key generation, and the key's id (fingerprint)."""

    key_id: str
    private: Path
    public: Path | None = None


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create ``path`` with ``mode`` from the start (no window with wider permissions); refuse
    to replace an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(
            f"{path} already exists; refusing to overwrite a key (choose another --name or "
            "--out, or delete it yourself)"
        ) from None
    try:
        os.fchmod(fd, mode)  # the umask may have narrowed it; never widen beyond ``mode``
        os.write(fd, data)
    finally:
        os.close(fd)


def _prepare_out(out_dir: str | Path, names: list[str]) -> Path:
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a directory for the key files")
    for name in names:
        if (out / name).exists():
            raise ConfigError(
                f"{out / name} already exists; refusing to overwrite a key (choose another "
                "--name or --out, or delete it yourself)"
            )
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot create the directory: {exc.strerror}") from exc
    return out


def _check_name(name: str) -> str:
    if not name or "/" in name or name.startswith(".") or "\\" in name:
        raise ConfigError(f"--name {name!r}: give a plain file name such as 'fleet-2026'")
    return name


def generate_signing_key(out_dir: str | Path, name: str = DEFAULT_KEY_NAME) -> GeneratedKey:
    """A new Ed25519 key pair: ``NAME.pem`` (private, PKCS#8, mode 0600) and ``NAME.pub.pem``
    (public, for the boards' ``trusted_keys``)."""
    require_cryptography()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    name = _check_name(name)
    out = _prepare_out(out_dir, [f"{name}.pem", f"{name}.pub.pem"])
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    private, public = out / f"{name}.pem", out / f"{name}.pub.pem"
    _write_new(private, private_pem, 0o600)
    _write_new(public, public_pem, 0o644)
    return GeneratedKey(key_id=fingerprint(key.public_key()), private=private, public=public)


def generate_model_key(out_dir: str | Path, name: str = DEFAULT_MODEL_KEY_NAME) -> GeneratedKey:
    """A new AES-256 model key: ``NAME.key`` (32 random bytes in base64, mode 0600)."""
    name = _check_name(name)
    out = _prepare_out(out_dir, [f"{name}.key"])
    key = os.urandom(KEY_BYTES)
    path = out / f"{name}.key"
    _write_new(path, base64.b64encode(key) + b"\n", 0o600)
    return GeneratedKey(key_id=key_id(key), private=path)


def key_fingerprint(path: str | Path) -> tuple[str, str]:
    """``(kind, id)`` of a key file: an Ed25519 public or private key's fingerprint, or a model
    key's id."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"key file not found: {file}")
    head = file.read_bytes()[:100]
    if b"PRIVATE KEY" in head:
        return "ed25519 private key", fingerprint(load_private_key(file).public_key())
    if b"PUBLIC KEY" in head or head.startswith(b"ssh-"):
        return "ed25519 public key", fingerprint(load_public_key(file))
    return "aes-256 model key", key_id(load_model_key(file))


def _verified(path: str | Path, action: str) -> Bundle:
    """The bundle at ``path`` with every hash checked; refuses a damaged one for ``action``."""
    try:
        return load_bundle(path)
    except IntegrityError as exc:
        raise IntegrityError(f"refusing to {action}: {exc}", file=exc.file) from exc
    except BundleError as exc:
        raise BundleError(f"refusing to {action} {path}: {exc}") from exc


def sign_bundle(bundle_dir: str | Path, key_file: str | Path) -> tuple[Bundle, str]:
    """Sign the bundle's ``manifest.json`` with the Ed25519 private key in ``key_file``.

    The bundle is verified first (a tampered bundle is refused). The signature is added to
    ``signature.json``: one by the same key is replaced, and signatures by other keys over the
    same manifest bytes are kept (several keys during a key rotation); signatures over other
    bytes (a manifest since rewritten) are dropped. Returns the bundle and the key id.
    """
    key = load_private_key(key_file)
    bundle = _verified(bundle_dir, "sign")
    manifest_bytes = (bundle.root / MANIFEST_NAME).read_bytes()
    # The bytes were hashed-verified through this manifest a moment ago; if someone rewrote it
    # in between, the re-read parse would differ, so check it still describes the same bundle.
    if Manifest.from_json(manifest_bytes) != bundle.manifest:
        raise BundleError(f"{bundle.root}/{MANIFEST_NAME} changed while signing; sign again")
    new = sign_manifest(manifest_bytes, key)
    try:
        existing = read_signatures(bundle.root) or []
    except BundleError:
        existing = []  # an unreadable signature file is replaced by a good one
    kept = [
        s for s in existing if s.key_id != new.key_id and s.manifest_sha256 == new.manifest_sha256
    ]
    write_signatures(bundle.root, [*kept, new])
    return load_bundle(bundle.root), new.key_id


def verify_bundle(bundle_dir: str | Path, trusted_keys: list[Path]) -> Bundle:
    """:func:`device_agent.load_bundle` with ``trusted_keys``: what the agent will accept."""
    if not trusted_keys:
        raise ConfigError("give at least one --trusted-key PUBLIC.pem to verify against")
    return load_bundle(bundle_dir, trusted_keys=trusted_keys)


def encrypt_bundle(bundle_dir: str | Path, key_file: str | Path) -> tuple[Bundle, bool]:
    """Encrypt the bundle's model with the AES-256 key in ``key_file``, in place.

    ``model.onnx`` becomes ``model.onnx.enc`` (AES-256-GCM, fresh nonce), the manifest records
    ``model.encryption`` and the new file's SHA-256 and becomes format version 2, and the plain
    model file is deleted. The bundle is verified first. The steps are ordered so that the
    directory is a valid bundle after each one: the encrypted file is written beside the plain
    one, then the manifest is replaced in one rename (the switch), then the plain model is
    deleted. The manifest changes, so an existing ``signature.json`` no longer applies and is
    removed: sign the bundle again. Returns the bundle and whether a signature was removed.
    """
    key = load_model_key(key_file)
    bundle = _verified(bundle_dir, "encrypt")
    m = bundle.manifest
    if m.model.encryption is not None:
        raise ConfigError(
            f"bundle {bundle.root}: the model is already encrypted (key "
            f"{m.model.encryption.key_id}); package the plain model again to change keys"
        )
    root = bundle.root
    plain_name = m.model.file
    enc_name = plain_name + ".enc"
    if enc_name in m.files:
        raise ConfigError(f"bundle {root} already has a file {enc_name!r}")
    ciphertext, info = encrypt_model(bundle.model_path.read_bytes(), key)
    files = {k: v for k, v in m.files.items() if k != plain_name}
    manifest = replace(
        m,
        model=replace(m.model, file=enc_name, encryption=info),
        files=files,
        format_version=max(m.format_version, ENCRYPTED_FORMAT_VERSION),
    )
    _replace_file(root / enc_name, ciphertext)
    files[enc_name] = sha256_file(root / enc_name)
    text = manifest.to_json()
    Manifest.from_json(text)  # what we write is what the agent reads
    _replace_file(root / MANIFEST_NAME, text.encode())
    (root / plain_name).unlink()
    had_signature = (root / SIGNATURE_NAME).exists()
    if had_signature:
        (root / SIGNATURE_NAME).unlink()
    return load_bundle(root), had_signature


def _replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary sibling and rename it over ``path`` (atomic on POSIX)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
