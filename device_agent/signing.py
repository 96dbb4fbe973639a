"""Ed25519 signatures over a bundle's ``manifest.json``, kept in ``signature.json`` beside it.

The manifest lists the SHA-256 of every other bundle file, so a valid signature over the exact
bytes of ``manifest.json`` vouches for the whole bundle: the agent checks the signature first
(was this manifest written by a key we trust?) and then every file's hash (are these the files
the manifest describes?). ``signature.json`` is not listed in the manifest; it can hold several
signatures (one per key, for key rotation). The file's format (reading and writing it) is
:mod:`device_agent.contracts.signature`, re-exported here; this module holds the keys and the
checks, and is documented in ``docs/bundle.md``.

A key is named by its fingerprint: ``sha256:`` and the hex SHA-256 of the public key's DER
SubjectPublicKeyInfo, which ``openssl pkey -pubin -in key.pub.pem -outform DER | sha256sum``
reproduces.

``cryptography`` is imported only when a key is read or a signature checked, so an agent
without ``trusted_keys`` runs without it.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_agent.contracts.bundle import MANIFEST_NAME
from device_agent.contracts.commands import CandidateSignature, candidate_signed_bytes
from device_agent.contracts.signature import (
    ALGORITHM,
    MAX_SIGNATURE_BYTES,
    SIGN_HINT,
    SIGNATURE_FORMAT,
    SIGNATURE_FORMAT_VERSION,
    SIGNATURE_NAME,
    Signature,
    read_signatures,
    write_signatures,
)
from device_agent.errors import ConfigError, SignatureError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "ALGORITHM",
    "MAX_SIGNATURE_BYTES",
    "SIGNATURE_FORMAT",
    "SIGNATURE_FORMAT_VERSION",
    "SIGNATURE_NAME",
    "SIGN_HINT",
    "Signature",
    "SignatureStatus",
    "TrustedKeys",
    "check_candidate_signature",
    "check_signatures",
    "fingerprint",
    "load_private_key",
    "load_public_key",
    "load_trusted_keys",
    "read_signatures",
    "require_cryptography",
    "sign_candidate",
    "sign_manifest",
    "signature_status",
    "write_signatures",
]


def require_cryptography() -> None:
    """Raise :class:`ConfigError` saying how to install ``cryptography`` when it is missing."""
    try:
        import cryptography  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            "bundle signatures and encryption need the 'cryptography' package, which is not "
            "installed; install it with: pip install 'cryptography>=41'"
        ) from exc


def fingerprint(key: Ed25519PublicKey) -> str:
    """``sha256:`` + hex SHA-256 of the key's DER SubjectPublicKeyInfo."""
    from cryptography.hazmat.primitives import serialization

    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()


def short(key_id: str) -> str:
    """A key id cut for messages where the full one would be noise: ``sha256:1a2b3c4d5e6f…``."""
    return key_id[:19] + "…" if len(key_id) > 20 else key_id


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM (``-----BEGIN PUBLIC KEY-----``) or OpenSSH
    (``ssh-ed25519 AAAA...``) file; :class:`ConfigError` naming the file otherwise."""
    require_cryptography()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    file = Path(path).expanduser()
    data = _read_key_file(file, "trusted key")
    try:
        if data.lstrip().startswith(b"ssh-"):
            key: Any = serialization.load_ssh_public_key(data.strip())
        else:
            key = serialization.load_pem_public_key(data)
    except Exception as exc:  # ValueError, UnsupportedAlgorithm, ...: they vary by format
        if b"PRIVATE KEY" in data:
            raise ConfigError(
                f"trusted key {file} is a PRIVATE key; give the public key (.pub.pem) here and "
                "keep the private key on the signing workstation"
            ) from exc
        raise ConfigError(
            f"trusted key {file} is not a PEM or OpenSSH public key; give the .pub.pem "
            "written by 'edgeship keys generate'"
        ) from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(
            f"trusted key {file} is a {_key_kind(key)} key; edgeship signs bundles with Ed25519 "
            "only (make one with: edgeship keys generate --out DIR)"
        )
    return key


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from an unencrypted PKCS#8 PEM or OpenSSH file.

    Refuses a file that group or others can read or write (``chmod 600`` it), as ssh does: a
    signing key others can read signs for them too.
    """
    require_cryptography()
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    file = Path(path).expanduser()
    data = _read_key_file(file, "private key")
    if b"PRIVATE KEY" not in data and (b"PUBLIC KEY" in data or data.lstrip().startswith(b"ssh-")):
        raise ConfigError(
            f"{file} is a PUBLIC key; signing needs the private key (the .pem without .pub)"
        )
    mode = file.stat().st_mode
    if os.name == "posix" and mode & 0o077:
        raise ConfigError(
            f"private key {file} is accessible by group or others (mode "
            f"{stat.S_IMODE(mode):04o}); restrict it with: chmod 600 {file}"
        )
    try:
        if b"OPENSSH PRIVATE KEY" in data:
            key: Any = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # "Password was not given but private key is encrypted"
        raise ConfigError(
            f"private key {file} is protected by a passphrase, which edgeship does not read; "
            "keep the key unencrypted on a protected workstation (chmod 600)"
        ) from exc
    except Exception as exc:
        if b"-----BEGIN" not in data:
            raise ConfigError(
                f"{file} is not a PEM or OpenSSH private key (a model key file? those encrypt "
                "models: edgeship encrypt); sign with the .pem written by 'edgeship keys "
                "generate'"
            ) from exc
        raise ConfigError(
            f"private key {file} is not a PEM or OpenSSH private key; give the .pem written "
            "by 'edgeship keys generate'"
        ) from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(
            f"private key {file} is a {_key_kind(key)} key; edgeship signs with Ed25519 only "
            "(make one with: edgeship keys generate --out DIR)"
        )
    return key


def _read_key_file(file: Path, what: str) -> bytes:
    if not file.exists():
        raise ConfigError(f"{what} file not found: {file}")
    if not file.is_file():
        raise ConfigError(f"{what} {file} is not a file")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {file}: {exc.strerror or exc}") from exc
    if not data.strip():
        raise ConfigError(f"{what} {file} is empty")
    return data


def _key_kind(key: Any) -> str:
    name = type(key).__name__
    for kind in ("RSA", "EllipticCurve", "Ed448", "DSA", "X25519", "X448"):
        if name.startswith(f"_{kind}") or name.startswith(kind):
            return {"EllipticCurve": "ECDSA"}.get(kind, kind)
    return name


@dataclass(frozen=True)
class TrustedKeys:
    """Public keys the agent accepts signatures from, by fingerprint, and the files they came
    from (for messages)."""

    keys: Mapping[str, Ed25519PublicKey]
    files: Mapping[str, str]

    def __bool__(self) -> bool:
        return bool(self.keys)

    def describe(self) -> str:
        return ", ".join(f"{short(k)} ({self.files[k]})" for k in self.keys)


def load_trusted_keys(paths: Sequence[str | Path]) -> TrustedKeys:
    """Read every public key file; :class:`ConfigError` for a missing or unusable one."""
    keys: dict[str, Ed25519PublicKey] = {}
    files: dict[str, str] = {}
    for path in paths:
        key = load_public_key(path)
        key_id = fingerprint(key)
        keys.setdefault(key_id, key)
        files.setdefault(key_id, str(path))
    return TrustedKeys(keys=keys, files=files)


def sign_manifest(manifest_bytes: bytes, key: Ed25519PrivateKey) -> Signature:
    """An Ed25519 signature over the exact bytes of ``manifest.json``."""
    return Signature(
        key_id=fingerprint(key.public_key()),
        algorithm=ALGORITHM,
        signature=key.sign(manifest_bytes),
        manifest_sha256=hashlib.sha256(manifest_bytes).hexdigest(),
    )


@dataclass(frozen=True)
class SignatureStatus:
    """What a loaded bundle's ``signature.json`` says, and what was checked.

    ``signers`` are the key ids listed in the file (unchecked claims); ``verified_by`` those
    whose signature was verified against a trusted key (empty without ``trusted_keys``).
    ``problem`` is set when the file exists but could not be read and nothing was enforced.
    """

    signers: tuple[str, ...] = ()
    verified_by: tuple[str, ...] = ()
    problem: str | None = None

    @property
    def signed(self) -> bool:
        return bool(self.signers)

    def describe(self) -> str:
        """One line for ``edgeship-agent check`` and ``edgeship inspect``."""
        if self.problem is not None:
            return f"{SIGNATURE_NAME} unreadable, not verified (no trusted_keys): {self.problem}"
        if not self.signers:
            return "not signed"
        if self.verified_by:
            others = [s for s in self.signers if s not in self.verified_by]
            extra = f" (also signed by {', '.join(others)}, not trusted here)" if others else ""
            return f"signed by {', '.join(self.verified_by)}, verified against trusted_keys{extra}"
        return f"signed by {', '.join(self.signers)}, not verified (no trusted_keys)"


def signature_status(root: Path) -> SignatureStatus:
    """The signers listed in ``signature.json`` without checking anything (no trusted keys)."""
    try:
        signatures = read_signatures(root)
    except SignatureError as exc:
        return SignatureStatus(problem=str(exc))
    if signatures is None:
        return SignatureStatus()
    return SignatureStatus(signers=tuple(s.key_id for s in signatures))


def check_signatures(root: Path, manifest_bytes: bytes, trusted: TrustedKeys) -> SignatureStatus:
    """Enforce ``trusted``: the bundle must carry a valid signature by one of its keys.

    Every signature by a trusted key must verify (a bad one means the manifest or the signature
    file was altered); signatures by other keys are listed but not checked. Raises
    :class:`SignatureError` saying what is wrong and what to do.
    """
    from cryptography.exceptions import InvalidSignature

    signatures = read_signatures(root)
    if signatures is None:
        raise SignatureError(
            f"bundle {root} is not signed (no {SIGNATURE_NAME}) and this agent only runs bundles "
            f"signed by its trusted_keys ({trusted.describe()}); {SIGN_HINT}"
        )
    if not signatures:
        raise SignatureError(f"bundle {root}: {SIGNATURE_NAME} holds no signatures; {SIGN_HINT}")
    signers = tuple(s.key_id for s in signatures)
    by_trusted = [s for s in signatures if s.key_id in trusted.keys]
    if not by_trusted:
        raise SignatureError(
            f"bundle {root} is signed by {', '.join(signers)}, which is not among this agent's "
            f"trusted_keys ({trusted.describe()}); sign it with a trusted key, or add the "
            "signer's public key to trusted_keys if you trust it"
        )
    actual = hashlib.sha256(manifest_bytes).hexdigest()
    verified: list[str] = []
    for sig in by_trusted:
        if sig.algorithm != ALGORITHM:
            raise SignatureError(
                f"bundle {root}: the signature by {sig.key_id} uses algorithm "
                f"{sig.algorithm!r}; this agent verifies {ALGORITHM!r} only"
            )
        try:
            trusted.keys[sig.key_id].verify(sig.signature, manifest_bytes)
        except InvalidSignature:
            if sig.manifest_sha256 != actual:
                why = (
                    f"{MANIFEST_NAME} was changed after it was signed (signed SHA-256 "
                    f"{sig.manifest_sha256[:12]}…, now {actual[:12]}…)"
                )
            else:
                why = f"the signature in {SIGNATURE_NAME} is damaged or forged"
            raise SignatureError(
                f"bundle {root}: the signature by trusted key {sig.key_id} does not verify: "
                f"{why}; do not run this bundle; copy the original again or re-sign it on the "
                "workstation"
            ) from None
        if sig.manifest_sha256 != actual:
            raise SignatureError(
                f"bundle {root}: {SIGNATURE_NAME} was altered (the signature by {sig.key_id} "
                f"verifies, but its manifest_sha256 is not {MANIFEST_NAME}'s); copy the bundle "
                "again or re-sign it"
            )
        verified.append(sig.key_id)
    return SignatureStatus(signers=signers, verified_by=tuple(verified))


def check_candidate_signature(
    sha256: str, signature: CandidateSignature | None, trusted: TrustedKeys
) -> str:
    """Enforce ``trusted`` on a candidate model (docs/agent.md, "Timing candidates"): its
    ``signature`` must be by one of those keys and verify over
    :func:`~device_agent.contracts.commands.candidate_signed_bytes` of its SHA-256. Returns the
    key id; raises :class:`SignatureError` saying what is wrong."""
    import base64
    import binascii

    from cryptography.exceptions import InvalidSignature

    if signature is None:
        raise SignatureError(
            "the candidate is not signed and this agent only runs models signed by its "
            f"trusted_keys ({trusted.describe()}); send it with the signing key"
        )
    key = trusted.keys.get(signature.key_id)
    if key is None:
        raise SignatureError(
            f"the candidate is signed by {short(signature.key_id)}, which is not among this "
            f"agent's trusted_keys ({trusted.describe()})"
        )
    try:
        raw = base64.b64decode(signature.signature, validate=True)
        key.verify(raw, candidate_signed_bytes(sha256))
    except (binascii.Error, ValueError, InvalidSignature):
        raise SignatureError(
            f"the candidate's signature by trusted key {short(signature.key_id)} does not "
            "verify: the file or its signature was altered; it is not run"
        ) from None
    return signature.key_id


def sign_candidate(sha256: str, key: Ed25519PrivateKey) -> CandidateSignature:
    """A candidate's signature (:func:`check_candidate_signature` checks it on the device)."""
    import base64

    return CandidateSignature(
        key_id=fingerprint(key.public_key()),
        algorithm=ALGORITHM,
        signature=base64.b64encode(key.sign(candidate_signed_bytes(sha256))).decode("ascii"),
    )
