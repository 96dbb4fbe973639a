"""Bundle trust: Ed25519 signatures over the manifest and AES-256-GCM model encryption at rest.

Real keys made by the code under test, real bundles, real ONNX Runtime sessions, and the two
CLIs run as processes. Acceptance: one byte changed in any bundle file or in the manifest, or a
signature by another key, is refused with a clear message; a correctly signed bundle loads and
predicts; an encrypted bundle predicts what the plain one does and never leaves its plaintext
on disk.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import Agent, AgentConfig, load_bundle, open_session
from device_agent.config import load_settings
from device_agent.contracts.bundle import Manifest
from device_agent.errors import BundleError, ConfigError, IntegrityError, SignatureError
from device_agent.signing import SIGNATURE_NAME, fingerprint, load_public_key
from sdk.signing import (
    GeneratedKey,
    encrypt_bundle,
    generate_model_key,
    generate_signing_key,
    key_fingerprint,
    sign_bundle,
)
from tests.helpers import write_mlp_onnx

ROOT = Path(__file__).resolve().parents[1]
# Every file of the small bundle below; test_tiny_bundle_holds_exactly_these_files keeps the
# byte-flip test honest if the bundle ever gains a file.
TINY_FILES = ("manifest.json", "model.onnx", "detector.npz", "reference.json", SIGNATURE_NAME)


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, GeneratedKey]:
    root = tmp_path_factory.mktemp("keys")
    return {
        "release": generate_signing_key(root, "release"),
        "other": generate_signing_key(root, "other"),
        "fleet": generate_model_key(root, "fleet"),
        "wrong": generate_model_key(root, "wrong"),
    }


def _pub(keys: dict[str, GeneratedKey], name: str) -> Path:
    public = keys[name].public
    assert public is not None
    return public


@pytest.fixture(scope="module")
def tiny_signed(tmp_path_factory: pytest.TempPathFactory, keys: dict[str, GeneratedKey]) -> Path:
    """A small MLP bundle with a detector and reference statistics, signed by 'release'."""
    from sdk.artifact import read_artifact
    from sdk.detect import fit_detector
    from sdk.package import package
    from sdk.reference import reference_stats, write_reference

    root = tmp_path_factory.mktemp("tiny")
    art = read_artifact(write_mlp_onnx(root / "mlp.onnx"))
    x = np.random.default_rng(0).normal(size=(200, 16)).astype(np.float32)
    detector = fit_detector("mahalanobis", {"x": x}, art, out=root / "det.npz")
    ref = write_reference(root / "ref.json", reference_stats(art.path, detector, {"x": x}))
    bundle = package(art, root / "bundle", name="mlp", detector=detector, reference=ref)
    sign_bundle(bundle.root, keys["release"].private)
    return bundle.root


@pytest.fixture()
def tiny(tiny_signed: Path, tmp_path: Path) -> Path:
    """A private copy of the signed small bundle, free to damage."""
    return Path(shutil.copytree(tiny_signed, tmp_path / "bundle"))


@pytest.fixture()
def digits(digits_bundle: Path, tmp_path: Path) -> Path:
    """A private copy of the digits CNN bundle (unsigned)."""
    return Path(shutil.copytree(digits_bundle, tmp_path / "digits"))


def _flip(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def _cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    module = "device_agent.cli" if args[0] == "agent" else "sdk.cli"
    argv = [str(a) for a in (args[1:] if args[0] == "agent" else args)]
    return subprocess.run(
        [sys.executable, "-m", module, *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        timeout=300,
    )


def _refused(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit code 2 and exactly one line on stderr containing every needle."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# --- signing ----------------------------------------------------------------------------------


def test_generated_keys_are_private_and_fingerprinted(keys: dict[str, GeneratedKey]) -> None:
    key = keys["release"]
    assert key.private.stat().st_mode & 0o777 == 0o600
    assert key.public is not None and key.public.name == "release.pub.pem"
    assert key.key_id == fingerprint(load_public_key(key.public))
    assert key_fingerprint(key.private) == ("ed25519 private key", key.key_id)
    assert key_fingerprint(key.public) == ("ed25519 public key", key.key_id)
    assert keys["fleet"].private.stat().st_mode & 0o777 == 0o600
    assert key_fingerprint(keys["fleet"].private) == ("aes-256 model key", keys["fleet"].key_id)
    assert len({k.key_id for k in keys.values()}) == 4
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_signing_key(key.private.parent, "release")
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        generate_model_key(key.private.parent, "fleet")


def test_tiny_bundle_holds_exactly_these_files(tiny_signed: Path) -> None:
    assert sorted(p.name for p in tiny_signed.iterdir()) == sorted(TINY_FILES)
    manifest = Manifest.from_json((tiny_signed / "manifest.json").read_bytes())
    assert SIGNATURE_NAME not in manifest.files  # the signature signs the manifest, not itself
    assert set(manifest.files) == set(TINY_FILES) - {"manifest.json", SIGNATURE_NAME}


def test_signed_bundle_loads_and_says_who_signed_it(
    tiny: Path, keys: dict[str, GeneratedKey]
) -> None:
    release = keys["release"].key_id
    bundle = load_bundle(tiny, trusted_keys=[_pub(keys, "release")])
    assert bundle.signature.verified_by == (release,)
    assert bundle.signature.describe() == f"signed by {release}, verified against trusted_keys"
    # Without trusted keys nothing changes, but the claim is reported as unverified.
    unchecked = load_bundle(tiny)
    assert unchecked.signature.verified_by == ()
    assert unchecked.signature.describe() == (
        f"signed by {release}, not verified (no trusted_keys)"
    )
    # An unreadable signature file changes nothing without trusted keys, and says so.
    (tiny / SIGNATURE_NAME).write_text("{not json")
    assert (
        load_bundle(tiny)
        .signature.describe()
        .startswith("signature.json unreadable, not verified (no trusted_keys)")
    )
    with pytest.raises(SignatureError, match="is not valid JSON"):
        load_bundle(tiny, trusted_keys=[_pub(keys, "release")])


@pytest.mark.parametrize("name", TINY_FILES)
def test_every_byte_of_every_file_changed_is_refused(
    tiny: Path, keys: dict[str, GeneratedKey], name: str
) -> None:
    trusted = [_pub(keys, "release")]
    path = tiny / name
    size = path.stat().st_size
    assert size > 0
    expected: type[BundleError] = SignatureError
    if name not in ("manifest.json", SIGNATURE_NAME):
        expected = IntegrityError
    for at in range(size):
        _flip(path, at)
        with pytest.raises(expected) as info:
            load_bundle(tiny, trusted_keys=trusted)
        if expected is IntegrityError:
            assert getattr(info.value, "file", None) == name
            assert f"bundle file {name!r} does not match its SHA-256" in str(info.value)
        _flip(path, at)  # back to the original
    assert load_bundle(tiny, trusted_keys=trusted).signature.verified_by


def test_manifest_edited_to_match_a_swapped_model_is_refused(
    tiny: Path, tmp_path: Path, keys: dict[str, GeneratedKey]
) -> None:
    # An attacker replaces the model and rewrites the manifest's hash to match: every hash
    # agrees, so only the signature can tell.
    write_mlp_onnx(tiny / "model.onnx", seed=1)
    doc = json.loads((tiny / "manifest.json").read_text())
    doc["files"]["model.onnx"] = hashlib.sha256((tiny / "model.onnx").read_bytes()).hexdigest()
    (tiny / "manifest.json").write_text(json.dumps(doc, indent=2) + "\n")
    assert load_bundle(tiny).manifest.files["model.onnx"] == doc["files"]["model.onnx"]
    with pytest.raises(SignatureError) as info:
        load_bundle(tiny, trusted_keys=[_pub(keys, "release")])
    message = str(info.value)
    assert f"the signature by trusted key {keys['release'].key_id} does not verify" in message
    assert "manifest.json was changed after it was signed" in message
    assert "do not run this bundle" in message


def test_missing_signature_is_refused_and_unsigned_loads_without_trusted_keys(
    tiny: Path, keys: dict[str, GeneratedKey]
) -> None:
    (tiny / SIGNATURE_NAME).unlink()
    assert load_bundle(tiny).signature.describe() == "not signed"
    with pytest.raises(SignatureError) as info:
        load_bundle(tiny, trusted_keys=[_pub(keys, "release")])
    message = str(info.value)
    assert "is not signed (no signature.json)" in message
    assert keys["release"].key_id[:19] in message  # names the key it wanted
    assert "edgeship sign BUNDLE --key PRIVATE.pem" in message


def test_signature_by_another_key_is_refused(tiny: Path, keys: dict[str, GeneratedKey]) -> None:
    other = keys["other"].key_id
    (tiny / SIGNATURE_NAME).unlink()
    sign_bundle(tiny, keys["other"].private)
    with pytest.raises(SignatureError) as info:
        load_bundle(tiny, trusted_keys=[_pub(keys, "release")])
    assert f"is signed by {other}, which is not among this agent's trusted_keys" in str(info.value)
    assert load_bundle(tiny, trusted_keys=[_pub(keys, "other")]).signature.verified_by == (other,)


def test_signature_claiming_a_trusted_key_id_is_refused_as_forged(
    tiny: Path, keys: dict[str, GeneratedKey]
) -> None:
    # Signed by 'other', but the entry claims to be by 'release'.
    (tiny / SIGNATURE_NAME).unlink()
    sign_bundle(tiny, keys["other"].private)
    doc = json.loads((tiny / SIGNATURE_NAME).read_text())
    doc["signatures"][0]["key_id"] = keys["release"].key_id
    (tiny / SIGNATURE_NAME).write_text(json.dumps(doc))
    with pytest.raises(SignatureError, match="damaged or forged"):
        load_bundle(tiny, trusted_keys=[_pub(keys, "release")])


def test_two_signatures_for_a_key_rotation(tiny: Path, keys: dict[str, GeneratedKey]) -> None:
    release, other = keys["release"].key_id, keys["other"].key_id
    bundle, signer = sign_bundle(tiny, keys["other"].private)
    assert signer == other
    assert bundle.signature.signers == (release, other)
    for name, key_id in (("release", release), ("other", other)):
        loaded = load_bundle(tiny, trusted_keys=[_pub(keys, name)])
        assert loaded.signature.verified_by == (key_id,)
    both = load_bundle(tiny, trusted_keys=[_pub(keys, "release"), _pub(keys, "other")])
    assert both.signature.verified_by == (release, other)
    # Re-signing with the same key replaces its entry instead of adding one.
    assert sign_bundle(tiny, keys["other"].private)[0].signature.signers == (release, other)


def test_signing_refuses_a_tampered_bundle_and_an_exposed_key(
    tiny: Path, tmp_path: Path, keys: dict[str, GeneratedKey]
) -> None:
    before = (tiny / SIGNATURE_NAME).read_bytes()
    _flip(tiny / "detector.npz", 100)
    with pytest.raises(IntegrityError, match=r"refusing to sign: bundle file 'detector\.npz'"):
        sign_bundle(tiny, keys["other"].private)
    assert (tiny / SIGNATURE_NAME).read_bytes() == before
    _flip(tiny / "detector.npz", 100)
    exposed = tmp_path / "exposed.pem"
    shutil.copyfile(keys["other"].private, exposed)
    exposed.chmod(0o640)
    with pytest.raises(ConfigError, match=r"group or others \(mode 0640\).*chmod 600"):
        sign_bundle(tiny, exposed)
    with pytest.raises(ConfigError, match="is a PUBLIC key"):
        sign_bundle(tiny, _pub(keys, "other"))
    with pytest.raises(ConfigError, match="a model key file"):
        sign_bundle(tiny, keys["fleet"].private)
    with pytest.raises(ConfigError, match=r"is a signing key .*, not a model key"):
        encrypt_bundle(tiny, keys["other"].private)
    public = _pub(keys, "other")  # mode 0644: named as the wrong kind of key, not sent to chmod
    assert public.stat().st_mode & 0o004
    with pytest.raises(ConfigError, match=r"is a signing key .*, not a model key"):
        encrypt_bundle(tiny, public)
    model = tiny / "model.onnx"  # readable by others, and no key: named as what it is
    with pytest.raises(ConfigError, match=r"bytes, not a model key"):
        encrypt_bundle(tiny, model)
    unmade = tmp_path / "not-a-dir" / "keys"
    (tmp_path / "not-a-dir").write_text("")
    with pytest.raises(ConfigError, match="cannot create the directory"):
        generate_signing_key(unmade)


def test_trusted_key_files_that_cannot_be_used_are_config_errors(
    tiny: Path, tmp_path: Path, keys: dict[str, GeneratedKey]
) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    rsa_pub = tmp_path / "rsa.pub.pem"
    rsa_pub.write_bytes(
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    cases = [
        (tmp_path / "absent.pub.pem", "trusted key file not found"),
        (garbage, "is not a PEM or OpenSSH public key"),
        (rsa_pub, "is a RSA key; edgeship signs bundles with Ed25519 only"),
        (keys["release"].private, "is a PRIVATE key; give the public key"),
    ]
    for path, needle in cases:
        with pytest.raises(ConfigError) as info:
            load_bundle(tiny, trusted_keys=[path])
        assert needle in str(info.value) and str(path) in str(info.value)


def test_openssl_verifies_the_signature_and_fingerprint(
    tiny: Path, tmp_path: Path, keys: dict[str, GeneratedKey]
) -> None:
    """docs/bundle.md's third-party check, run: what edgeship writes is plain Ed25519."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl binary on this machine")
    public = _pub(keys, "release")
    der = subprocess.run(
        [openssl, "pkey", "-pubin", "-in", public, "-outform", "DER"],
        capture_output=True,
        check=True,
    ).stdout
    assert "sha256:" + hashlib.sha256(der).hexdigest() == keys["release"].key_id
    entry = json.loads((tiny / SIGNATURE_NAME).read_text())["signatures"][0]
    sig = tmp_path / "sig.bin"
    sig.write_bytes(base64.b64decode(entry["signature"]))
    verify = [openssl, "pkeyutl", "-verify", "-pubin", "-inkey", public, "-rawin"]
    ok = subprocess.run(
        [*verify, "-in", tiny / "manifest.json", "-sigfile", sig], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "Signature Verified Successfully" in ok.stdout, ok
    _flip(tiny / "manifest.json", 10)
    bad = subprocess.run(
        [*verify, "-in", tiny / "manifest.json", "-sigfile", sig], capture_output=True, text=True
    )
    assert bad.returncode != 0


# --- the agent on the digits CNN --------------------------------------------------------------


def _config(tmp_path: Path, **kw: Any) -> AgentConfig:
    return AgentConfig(device_id="pi-sig", fleet="lab", state_dir=tmp_path / "state", **kw)


def test_signed_digits_bundle_runs_in_the_agent(
    digits: Path, digits_splits: Any, tmp_path: Path, keys: dict[str, GeneratedKey]
) -> None:
    x = digits_splits.x_test[:32]
    expected = open_session(digits / "model.onnx").run({"image": x})[0]
    sign_bundle(digits, keys["release"].private)
    config = _config(tmp_path, trusted_keys=(str(_pub(keys, "release")),))
    with Agent.from_bundle(digits, config) as agent:
        assert agent.bundle.signature.verified_by == (keys["release"].key_id,)
        np.testing.assert_array_equal(agent.predict({"image": x}).outputs[0], expected)
    _flip(digits / "model.onnx", 5000)
    with pytest.raises(IntegrityError, match=r"'model\.onnx' does not match"):
        Agent.from_bundle(digits, config)
    _flip(digits / "model.onnx", 5000)
    with pytest.raises(SignatureError, match="not among this agent's trusted_keys"):
        Agent.from_bundle(digits, _config(tmp_path, trusted_keys=(str(_pub(keys, "other")),)))


def _files_under(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*") if p.is_file()]


def test_encrypted_bundle_predicts_like_the_plain_one_and_leaves_no_plaintext(
    digits: Path, digits_splits: Any, tmp_path: Path, keys: dict[str, GeneratedKey]
) -> None:
    plain = (digits / "model.onnx").read_bytes()
    x = digits_splits.x_test[:64]
    with Agent.from_bundle(digits, _config(tmp_path / "plain")) as agent:
        expected = agent.predict({"image": x})
    bundle, had_signature = encrypt_bundle(digits, keys["fleet"].private)
    assert not had_signature
    info = bundle.manifest.model.encryption
    assert info is not None and info.key_id == keys["fleet"].key_id
    assert bundle.manifest.model.file == "model.onnx.enc"
    assert bundle.manifest.format_version == 2
    assert not (digits / "model.onnx").exists()
    stored = (digits / "model.onnx.enc").read_bytes()
    assert len(stored) == len(plain) + 16 and plain[:4096] not in stored

    sign_bundle(digits, keys["release"].private)
    state = tmp_path / "enc-state"
    config = AgentConfig(
        device_id="pi-sig",
        fleet="lab",
        state_dir=state,
        trusted_keys=(str(_pub(keys, "release")),),
        model_key_file=str(keys["fleet"].private),
    )
    with Agent.from_bundle(digits, config) as agent:
        got = agent.predict({"image": x})
    np.testing.assert_array_equal(got.outputs[0], expected.outputs[0])
    assert got.scores is not None and expected.scores is not None
    np.testing.assert_array_equal(got.scores, expected.scores)
    # No file under the bundle, the agent's state or this test's directory holds the model.
    probe = plain[len(plain) // 2 : len(plain) // 2 + 256]
    written = _files_under(tmp_path)  # the bundle and both agents' state directories
    assert {p.name for p in written} >= {"model.onnx.enc", "manifest.json", SIGNATURE_NAME}
    for path in written:
        assert probe not in path.read_bytes(), path


def test_encrypted_model_needs_the_right_key(
    digits: Path, tmp_path: Path, keys: dict[str, GeneratedKey]
) -> None:
    encrypt_bundle(digits, keys["fleet"].private)
    fleet, wrong = keys["fleet"].key_id, keys["wrong"].key_id
    with pytest.raises(ConfigError, match=f"is encrypted \\(key {fleet}\\); give the agent"):
        Agent.from_bundle(digits, _config(tmp_path))
    with pytest.raises(ConfigError) as info:
        Agent.from_bundle(digits, _config(tmp_path, model_key_file=str(keys["wrong"].private)))
    assert f"holds key {wrong}, but the bundle's model was encrypted with key {fleet}" in str(
        info.value
    )
    exposed = tmp_path / "exposed.key"
    shutil.copyfile(keys["fleet"].private, exposed)
    exposed.chmod(0o644)
    with pytest.raises(ConfigError, match="accessible by others"):
        Agent.from_bundle(digits, _config(tmp_path, model_key_file=str(exposed)))
    short = tmp_path / "short.key"
    short.write_text(base64.b64encode(os.urandom(16)).decode())
    short.chmod(0o600)
    with pytest.raises(ConfigError, match="holds 16 bytes; an AES-256 key is 32 bytes"):
        Agent.from_bundle(digits, _config(tmp_path, model_key_file=str(short)))
    with pytest.raises(ConfigError, match="already encrypted"):
        encrypt_bundle(digits, keys["fleet"].private)


def test_altered_ciphertext_fails_authentication_even_with_matching_hashes(
    digits: Path, tmp_path: Path, keys: dict[str, GeneratedKey]
) -> None:
    encrypt_bundle(digits, keys["fleet"].private)
    path = digits / "model.onnx.enc"
    _flip(path, 1000)
    doc = json.loads((digits / "manifest.json").read_text())
    doc["files"]["model.onnx.enc"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (digits / "manifest.json").write_text(json.dumps(doc))
    config = _config(tmp_path, model_key_file=str(keys["fleet"].private))
    with pytest.raises(BundleError, match="authentication tag mismatch"):
        Agent.from_bundle(digits, config)


def test_encryption_is_in_the_manifest_contract() -> None:
    plain = json.loads(
        Manifest.from_json(
            json.dumps(
                {
                    "format": "edgeship.bundle",
                    "format_version": 1,
                    "model": {
                        "name": "m",
                        "version": "1",
                        "file": "model.onnx",
                        "runtime": "onnxruntime",
                        "precision": "fp32",
                        "recipe": "given",
                    },
                    "io": {
                        "inputs": [{"name": "x", "dtype": "float32", "shape": [1]}],
                        "outputs": [{"name": "y", "dtype": "float32", "shape": [1]}],
                    },
                    "files": {"model.onnx": "0" * 64},
                }
            )
        ).to_json()
    )
    assert "encryption" not in plain["model"]  # plain manifests are written as before
    enc = {
        "algorithm": "aes-256-gcm",
        "key_id": "sha256:" + "1" * 64,
        "nonce": base64.b64encode(b"n" * 12).decode(),
    }

    def decode(version: int, encryption: Any, files: Any = None) -> Manifest:
        doc = json.loads(json.dumps(plain))
        doc["format_version"] = version
        doc["model"]["encryption"] = encryption
        if files is not None:
            doc["files"] = files
        return Manifest.from_dict(doc)

    info = decode(2, enc).model.encryption
    assert info is not None and info.nonce == b"n" * 12
    assert json.loads(decode(2, enc).to_json())["model"]["encryption"] == enc
    with pytest.raises(BundleError, match="needs format_version 2"):
        decode(1, enc)
    with pytest.raises(BundleError, match="nonce: expected 12 bytes"):
        decode(2, {**enc, "nonce": base64.b64encode(b"n" * 8).decode()})
    with pytest.raises(BundleError, match="algorithm: 'aes-128-cbc' is not one of"):
        decode(2, {**enc, "algorithm": "aes-128-cbc"})
    with pytest.raises(BundleError, match=r"'signature\.json' is reserved"):
        decode(2, enc, {"model.onnx": "0" * 64, "signature.json": "0" * 64})
    with pytest.raises(BundleError, match="newer than this agent understands"):
        decode(3, enc)


def test_trust_settings_come_from_toml_and_environment(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text(
        'trusted_keys = ["/etc/edgeship/release.pub.pem", "/etc/edgeship/next.pub.pem"]\n'
        'model_key_file = "/etc/edgeship/fleet.key"\n'
    )
    agent, _ = load_settings(toml, {})
    assert agent.trusted_keys == ("/etc/edgeship/release.pub.pem", "/etc/edgeship/next.pub.pem")
    assert agent.model_key_file == "/etc/edgeship/fleet.key"
    agent, _ = load_settings(toml, {"EDGESHIP_AGENT_TRUSTED_KEYS": "/a.pub.pem,/b.pub.pem"})
    assert agent.trusted_keys == ("/a.pub.pem", "/b.pub.pem")


# --- the command lines ------------------------------------------------------------------------


def test_cli_keys_sign_verify_encrypt_and_agent_check(
    digits: Path, tmp_path: Path, keys: dict[str, GeneratedKey]
) -> None:
    out = tmp_path / "cli-keys"
    made = _cli("keys", "generate", "--out", out, "--name", "ci")
    assert made.returncode == 0, made.stderr
    private, public = out / "ci.pem", out / "ci.pub.pem"
    key_id = fingerprint(load_public_key(public))
    assert f"fingerprint {key_id}" in made.stdout
    assert private.stat().st_mode & 0o777 == 0o600
    _refused(_cli("keys", "generate", "--out", out, "--name", "ci"), "refusing to overwrite")
    made = _cli("keys", "generate", "--symmetric", "--out", out, "--name", "fleet")
    assert made.returncode == 0 and "key id sha256:" in made.stdout, made.stderr
    model_key = out / "fleet.key"

    check = ("agent", "check", digits, "--runs", "1")
    # Unsigned: check passes without trusted keys and says so; refuses with one.
    plain = _cli(*check)
    assert plain.returncode == 0 and "signature  not signed" in plain.stdout, plain.stderr
    _refused(_cli(*check, "--trusted-key", public), "is not signed (no signature.json)")

    signed = _cli("sign", digits, "--key", private)
    assert signed.returncode == 0 and f"with {key_id}" in signed.stdout, signed.stderr
    unverified = _cli(*check)
    assert f"signed by {key_id}, not verified (no trusted_keys)" in unverified.stdout
    verified = _cli(*check, "--trusted-key", public)
    assert verified.returncode == 0, verified.stderr
    assert f"signed by {key_id}, verified against trusted_keys" in verified.stdout
    assert verified.stdout.rstrip().endswith("ok")
    # The environment configures check as it configures run.
    by_env = _cli(*check, env={"EDGESHIP_AGENT_TRUSTED_KEYS": str(_pub(keys, "other"))})
    _refused(by_env, f"is signed by {key_id}, which is not among")
    assert _cli("verify", digits, "--trusted-key", public).returncode == 0
    _refused(_cli("verify", digits, "--trusted-key", _pub(keys, "other")), "not among")
    inspect = _cli("inspect", digits)
    assert f"signature  signed by {key_id}, not verified" in inspect.stdout, inspect.stderr

    # One byte of the manifest changed: refused by the board and by verify.
    _flip(digits / "manifest.json", 200)
    _refused(_cli(*check, "--trusted-key", public), "does not verify", "do not run this bundle")
    _refused(_cli("verify", digits, "--trusted-key", public), "does not verify")
    _refused(_cli("sign", digits, "--key", private), "refusing to sign")
    _flip(digits / "manifest.json", 200)

    encrypted = _cli("encrypt", digits, "--key", model_key)
    assert encrypted.returncode == 0, encrypted.stderr
    assert "old signature was removed" in encrypted.stdout
    assert _cli("sign", digits, "--key", private).returncode == 0
    _refused(_cli(*check, "--trusted-key", public), "is encrypted", "--model-key FILE")
    _refused(_cli(*check, "--model-key", keys["wrong"].private), "holds key", "encrypted with")
    ok = _cli(*check, "--trusted-key", public, "--model-key", model_key)
    assert ok.returncode == 0, ok.stderr
    assert "decrypted  model.onnx.enc (aes-256-gcm, key sha256:" in ok.stdout
    _refused(_cli("bench", digits), "model is encrypted")


def test_agent_run_refuses_an_unsigned_bundle(
    digits: Path, tmp_path: Path, keys: dict[str, GeneratedKey]
) -> None:
    result = _cli(
        "agent",
        "run",
        "--bundle",
        digits,
        "--http",
        "off",
        "--state-dir",
        tmp_path / "state",
        "--trusted-key",
        _pub(keys, "release"),
    )
    _refused(result, "is not signed (no signature.json)")


@pytest.mark.slow
@pytest.mark.tflite
@pytest.mark.filterwarnings("ignore:.*treespec, LeafSpec.* is deprecated:FutureWarning")
def test_encrypted_litert_bundle_predicts_like_the_plain_one(
    tmp_path: Path, keys: dict[str, GeneratedKey]
) -> None:
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_litert")
    import torch

    import sdk
    from sdk.package import package

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    art = sdk.export(
        model.eval(),
        (torch.randn(1, 8),),
        to="tflite",
        path=tmp_path / "mlp.tflite",
        input_names=["x"],
        output_names=["y"],
    )
    bundle = package(art, tmp_path / "bundle")
    x = np.random.default_rng(1).normal(size=(1, 8)).astype(np.float32)
    expected = open_session(bundle.model_path).run({"x": x})[0]
    encrypted, _ = encrypt_bundle(bundle.root, keys["fleet"].private)
    assert encrypted.manifest.model.file == "model.tflite.enc"
    config = _config(tmp_path, model_key_file=str(keys["fleet"].private))
    with Agent.from_bundle(bundle.root, config) as agent:
        np.testing.assert_array_equal(agent.predict({"x": x}).outputs[0], expected)


def test_openssh_ed25519_keys_sign_and_verify(tiny: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private, public = tmp_path / "id_ed25519", tmp_path / "id_ed25519.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
    )
    private.chmod(0o600)
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
    )
    _, key_id = sign_bundle(tiny, private)
    assert key_id == fingerprint(key.public_key())
    assert load_bundle(tiny, trusted_keys=[public]).signature.verified_by[-1] == key_id


@pytest.mark.slow
def test_optimize_signs_the_bundle_only_when_it_meets_the_budget(
    tmp_path: Path, keys: dict[str, GeneratedKey]
) -> None:
    model = write_mlp_onnx(tmp_path / "mlp.onnx")
    cal = tmp_path / "cal.npz"
    np.savez(cal, x=np.random.default_rng(0).normal(size=(64, 16)).astype(np.float32))
    base = ("optimize", model, "--calibration", cal, "--detector", "none")
    fast = ("--runs", "5", "--seconds", "0.05", "--sign-key")
    _refused(_cli(*base, "-o", tmp_path / "b0", *fast, _pub(keys, "release")), "PUBLIC key")
    assert not (tmp_path / "b0").exists()  # refused before the search

    met = _cli(*base, "-o", tmp_path / "b1", *fast, keys["release"].private)
    assert met.returncode == 0, met.stderr
    assert f"signed {tmp_path / 'b1'} with {keys['release'].key_id}" in met.stdout
    bundle = load_bundle(tmp_path / "b1", trusted_keys=[_pub(keys, "release")])
    assert bundle.signature.verified_by == (keys["release"].key_id,)

    missed = _cli(
        *base, "-o", tmp_path / "b2", "--budget", "size<=0.001MB", *fast, keys["release"].private
    )
    assert missed.returncode == 1, missed.stderr
    assert "not signed: the bundle misses its budget" in missed.stdout
    assert load_bundle(tmp_path / "b2").signature.describe() == "not signed"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b" " * (2**20 + 1), "over the limit"),
        (b'{"format": "edgeship.signature", "x": "\xff"}', "not valid JSON"),
    ],
)
def test_a_signature_file_no_json_reader_should_take_is_refused_in_one_line(
    tiny: Path, keys: dict[str, GeneratedKey], content: bytes, needle: str, capsys: Any
) -> None:
    """Issue 11: signature.json is read before anything is verified; whatever it holds is a
    SignatureError (with trusted keys) or a listed problem (without), never another exception."""
    from device_agent.cli import main

    (tiny / SIGNATURE_NAME).write_bytes(content)
    with pytest.raises(SignatureError, match=needle):
        load_bundle(tiny, trusted_keys=[_pub(keys, "release")])
    assert needle in (load_bundle(tiny).signature.problem or "")
    code = main(["check", str(tiny), "--runs", "1", "--trusted-key", str(_pub(keys, "release"))])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and needle in err, err


def test_a_signature_algorithm_that_cannot_be_printed_is_refused(
    tiny: Path, keys: dict[str, GeneratedKey], capsys: Any
) -> None:
    from device_agent.cli import main

    data = json.loads((tiny / SIGNATURE_NAME).read_text())
    data["signatures"][0]["algorithm"] = "ed25519\ud800\n"
    (tiny / SIGNATURE_NAME).write_text(json.dumps(data))
    with pytest.raises(SignatureError, match="algorithm must be a name"):
        load_bundle(tiny, trusted_keys=[_pub(keys, "release")])
    assert main(["check", str(tiny), "--runs", "1"]) == 0  # no trusted keys: listed, not used
    out = capsys.readouterr().out
    assert "signature  signature.json unreadable, not verified" in out


def test_the_signature_format_is_the_contract_modules(tmp_path: Path) -> None:
    """signature.json is read and written by device_agent.contracts.signature (standard library
    only); device_agent.signing re-exports its names for the code that signs and checks."""
    import device_agent.signing
    from device_agent.contracts import signature as contract

    for name in contract.__all__:
        assert getattr(device_agent.signing, name) is getattr(contract, name), name
    entry = contract.Signature(
        key_id="sha256:" + "ab" * 32,
        algorithm=contract.ALGORITHM,
        signature=b"\x01" * 64,
        manifest_sha256="cd" * 32,
    )
    contract.write_signatures(tmp_path, [entry])
    assert contract.read_signatures(tmp_path) == [entry]
    assert contract.read_signatures(tmp_path / "none") is None
