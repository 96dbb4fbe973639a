"""Model encryption at rest: AES-256-GCM with a per-device or per-fleet key file.

An encrypted bundle's model file holds ``AESGCM(key).encrypt(nonce, model, None)`` (ciphertext
then the 16-byte tag); ``manifest.json`` records the algorithm, the key's id and the nonce
(``model.encryption``, format version 2) and, as for any file, the SHA-256 of the encrypted
file on disk. The agent reads the file, checks the tag and hands the plaintext to the runtime
as bytes; the plaintext model is never written to disk.

A model key file holds the 32-byte key in base64 on one line (``edgeship keys generate
--symmetric``, or ``head -c 32 /dev/urandom | base64``). Its id is ``sha256:`` and the hex
SHA-256 of ``b"edgeship-model-key\\0"`` followed by the 32 key bytes: it names the key without
revealing it. ``cryptography`` is imported only here, and only for encrypted bundles.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import stat
from pathlib import Path

from device_agent.contracts.bundle import GCM_NONCE_BYTES, ModelEncryption
from device_agent.errors import BundleError, ConfigError

__all__ = [
    "ALGORITHM",
    "KEY_BYTES",
    "MAX_MODEL_BYTES",
    "decrypt",
    "decrypt_model",
    "encrypt_model",
    "key_id",
    "load_model_key",
]

ALGORITHM = "aes-256-gcm"
KEY_BYTES = 32
_KEY_ID_PREFIX = b"edgeship-model-key\0"
# cryptography's AESGCM takes at most 2**31 - 1 bytes in one call.
MAX_MODEL_BYTES = 2**31 - 1 - 16


def key_id(key: bytes) -> str:
    """The public name of a model key: ``sha256:`` + hex SHA-256 of a prefix and the key."""
    return "sha256:" + hashlib.sha256(_KEY_ID_PREFIX + key).hexdigest()


def load_model_key(path: str | Path) -> bytes:
    """The 32-byte key in ``path`` (base64 text). :class:`ConfigError` for a missing, malformed
    or world-accessible file (a key others can read protects nothing: ``chmod 600`` or
    ``640`` with the agent's group)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ConfigError(f"model key file not found: {file}")
    # What the file is comes first: a public key or a model file (mode 0644) given by mistake
    # must be named as the wrong kind of file, not sent to chmod first.
    size = file.stat().st_size
    if size > 1024:  # a key is 45 bytes of base64; do not read a model given by mistake
        raise ConfigError(
            f"model key file {file} holds {size} bytes, not a model key (one line of base64; "
            "make one with: edgeship keys generate --symmetric --out DIR)"
        )
    head = file.read_bytes()[:200]
    if b"-----BEGIN" in head or head.startswith(b"ssh-"):
        raise ConfigError(
            f"{file} is a signing key (PEM/OpenSSH), not a model key; a model key file is one "
            "line of base64 (make one with: edgeship keys generate --symmetric --out DIR)"
        )
    try:
        text = file.read_text("ascii").strip()
        key = base64.b64decode(text, validate=True)
    except (OSError, UnicodeDecodeError, binascii.Error, ValueError) as exc:
        raise ConfigError(
            f"model key file {file} is not one line of base64 (make one with: "
            "edgeship keys generate --symmetric --out DIR)"
        ) from exc
    if len(key) != KEY_BYTES:
        raise ConfigError(
            f"model key file {file} holds {len(key)} bytes; an AES-256 key is {KEY_BYTES} bytes "
            "(make one with: edgeship keys generate --symmetric --out DIR)"
        )
    mode = file.stat().st_mode
    if os.name == "posix" and mode & 0o007:
        raise ConfigError(
            f"model key file {file} is accessible by others (mode {stat.S_IMODE(mode):04o}); "
            f"restrict it with: chmod 600 {file}"
        )
    return key


def encrypt_model(plaintext: bytes, key: bytes) -> tuple[bytes, ModelEncryption]:
    """Encrypt a model with a fresh random nonce; returns the file's bytes and the manifest's
    ``model.encryption``."""
    from device_agent.signing import require_cryptography

    require_cryptography()
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(plaintext) > MAX_MODEL_BYTES:
        raise ConfigError(
            f"the model is {len(plaintext) / 2**30:.1f} GiB; AES-GCM encryption here handles "
            "models up to 2 GiB"
        )
    nonce = os.urandom(GCM_NONCE_BYTES)
    ciphertext = AESGCM(key).encrypt(nonce, plaintext, None)
    return ciphertext, ModelEncryption(algorithm=ALGORITHM, key_id=key_id(key), nonce=nonce)


def decrypt_model(path: Path, info: ModelEncryption, key_file: str | Path | None) -> bytes:
    """The plaintext of the encrypted model at ``path``, in memory (see :func:`decrypt`)."""
    _key_for(info, key_file, path.name)  # a missing or wrong key is said before reading
    return decrypt(path.read_bytes(), info, key_file, path.name)


def decrypt(data: bytes, info: ModelEncryption, key_file: str | Path | None, name: str) -> bytes:
    """The plaintext of the encrypted model ``data`` (the file ``name``), in memory.

    Raises :class:`ConfigError` when no key file is configured or it holds another key than
    the one the bundle was encrypted with, and :class:`BundleError` when the tag does not
    verify (the file or the manifest's nonce was altered).
    """
    key = _key_for(info, key_file, name)
    from device_agent.signing import require_cryptography

    require_cryptography()
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    try:
        return AESGCM(key).decrypt(info.nonce, data, None)
    except InvalidTag:
        raise BundleError(
            f"{name} does not decrypt with key {info.key_id} (authentication tag "
            "mismatch): the encrypted model or its nonce in the manifest was altered; copy the "
            "bundle again"
        ) from None


def _key_for(info: ModelEncryption, key_file: str | Path | None, name: str) -> bytes:
    if key_file is None:
        raise ConfigError(
            f"the bundle's model {name} is encrypted (key {info.key_id}); give the agent "
            "its key with model_key_file in agent.toml, EDGESHIP_AGENT_MODEL_KEY_FILE, or "
            "--model-key FILE"
        )
    key = load_model_key(key_file)
    found = key_id(key)
    if found != info.key_id:
        raise ConfigError(
            f"model key file {key_file} holds key {found}, but the bundle's model was "
            f"encrypted with key {info.key_id}; configure that key's file"
        )
    return key
