"""ONNX external data and files a bundle's manifest does not list (issue 11, finding 2).

A model saved with ``save_as_external_data=True, location="w.bin"`` keeps its weights in
``w.bin``, which ONNX Runtime opens by itself: beside ``model.onnx`` when loaded from a path, in
the current directory when loaded from bytes (an encrypted model). Before the fix ``package``
bundled ``model.onnx`` alone, the agent ignored files its manifest did not list, and so a
signed bundle's ``w.bin`` could be swapped: ``edgeship-agent check --trusted-key`` still said
verified and the outputs changed. Now ``package`` inlines the weights, the agent refuses any
unlisted file (naming it) and any model that refers to external data, and hands the runtime
the bytes it verified. Real ONNX models, real Ed25519 signatures, real ONNX Runtime sessions.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.bundle import load_bundle, sha256_file
from device_agent.cli import main as agent_main
from device_agent.contracts.bundle import IOSpec, Manifest, ModelInfo, TensorSpec
from device_agent.errors import BundleError, IntegrityError
from device_agent.onnx_scan import external_data_refs
from device_agent.runtime import open_session
from device_agent.signing import sign_manifest, write_signatures
from sdk.signing import GeneratedKey, generate_signing_key
from tests.helpers import write_mlp_onnx

FEATURES = 16


@pytest.fixture(scope="module")
def key(tmp_path_factory: pytest.TempPathFactory) -> GeneratedKey:
    return generate_signing_key(tmp_path_factory.mktemp("keys"), "release")


def _external_model(folder: Path, *, seed: int = 0) -> Path:
    """``logits = x @ W`` (x: batch x 16, W: 16 x 4) saved with W in ``folder/w.bin``.

    One MatMul and no bias: ONNX Runtime's optimizer folds nothing, so the model also loads
    from bytes, with w.bin taken from the current directory (the unsafe case)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    w = np.random.default_rng(seed).normal(0, 0.3, (FEATURES, 4)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["logits"])],
        "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", FEATURES])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    out = folder / "model.onnx"
    onnx.save_model(model, str(out), save_as_external_data=True, location="w.bin", size_threshold=0)
    assert (folder / "w.bin").is_file()
    return out


def _x() -> np.ndarray:
    return np.random.default_rng(7).random((1, FEATURES), dtype=np.float32)


def _logits(model: Path) -> np.ndarray:
    """What ONNX Runtime computes for the model at ``model`` (weights resolved beside it)."""
    return open_session(model).run({"x": _x()})[0]


def _sign(bundle: Path, key: GeneratedKey) -> None:
    """Sign the manifest's bytes as they are (what an operator's signature covers)."""
    from device_agent.signing import load_private_key

    data = (bundle / "manifest.json").read_bytes()
    write_signatures(bundle, [sign_manifest(data, load_private_key(key.private))])


def _bundle_listing(root: Path, files: list[str], *, encrypted: Any = None) -> Path:
    """A bundle of ``root/model.onnx`` (or ``model.onnx.enc``) whose manifest lists ``files``:
    the model file alone is what ``package`` wrote before the fix."""
    model_file = "model.onnx.enc" if encrypted is not None else "model.onnx"
    manifest = Manifest(
        model=ModelInfo(
            "mlp", "1", model_file, "onnxruntime", "fp32", "test", encryption=encrypted
        ),
        io=IOSpec(
            inputs=(TensorSpec("x", "float32", ("batch", FEATURES)),),
            outputs=(TensorSpec("logits", "float32", ("batch", 4)),),
        ),
        files={name: sha256_file(root / name) for name in files},
        format_version=1 if encrypted is None else 2,
    )
    (root / "manifest.json").write_text(manifest.to_json())
    return root


def _check(bundle: Path, key: GeneratedKey, capsys: Any) -> tuple[int, str, str]:
    assert key.public is not None
    code = agent_main(["check", str(bundle), "--runs", "1", "--trusted-key", str(key.public)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_package_inlines_external_data_so_the_bundle_holds_its_weights(
    tmp_path: Path, key: GeneratedKey, capsys: Any
) -> None:
    from sdk.artifact import read_artifact
    from sdk.package import package
    from sdk.signing import sign_bundle

    model = _external_model(tmp_path / "src")
    expected = _logits(model)
    bundle = package(read_artifact(model), tmp_path / "bundle", name="mlp")
    assert sorted(p.name for p in bundle.root.iterdir()) == ["manifest.json", "model.onnx"]
    assert external_data_refs(bundle.model_path.read_bytes()) == []
    assert set(bundle.manifest.files) == {"model.onnx"}
    sign_bundle(bundle.root, key.private)
    code, out, err = _check(bundle.root, key, capsys)
    assert code == 0, err
    assert "verified against trusted_keys" in out
    session = load_bundle(bundle.root, trusted_keys=[key.public or ""]).open_model()
    np.testing.assert_array_equal(session.run({"x": _x()})[0], expected)
    # The source's weights changing afterwards changes nothing in the bundle.
    (tmp_path / "src" / "w.bin").write_bytes(
        os.urandom((tmp_path / "src" / "w.bin").stat().st_size)
    )
    np.testing.assert_array_equal(
        load_bundle(bundle.root).open_model().run({"x": _x()})[0], expected
    )


def test_swapped_external_weights_of_a_signed_bundle_are_refused_naming_the_file(
    tmp_path: Path, key: GeneratedKey, capsys: Any
) -> None:
    """The issue's steps: the manifest lists model.onnx only, w.bin is copied in, the bundle
    is signed, then w.bin is overwritten. Before the fix check said verified (exit 0) and the
    outputs changed; now the bundle is refused as soon as w.bin is there unlisted."""
    root = tmp_path / "bundle"
    _external_model(root)
    _bundle_listing(root, ["model.onnx"])
    _sign(root, key)
    with pytest.raises(IntegrityError, match=r"'w\.bin'") as info:
        load_bundle(root, trusted_keys=[key.public or ""])
    assert info.value.file == "w.bin" and "not listed in manifest.json" in str(info.value)
    code, out, err = _check(root, key, capsys)
    assert code == 2 and "ok" not in out.split(), out
    assert err.count("\n") == 1 and "'w.bin'" in err and "not listed" in err, err
    other = _external_model(tmp_path / "other", seed=5).with_name("w.bin")
    shutil.copyfile(other, root / "w.bin")  # the swap
    code, _, err = _check(root, key, capsys)
    assert code == 2 and "'w.bin'" in err, err
    # Unsigned and with no trusted keys it is refused all the same.
    with pytest.raises(IntegrityError, match=r"'w\.bin'"):
        load_bundle(root)


def test_external_data_listed_and_signed_is_still_refused_since_the_runtime_reads_it_alone(
    tmp_path: Path, key: GeneratedKey, capsys: Any
) -> None:
    """A hand-made bundle that lists w.bin with its hash: every file verifies, but ONNX Runtime
    would open w.bin itself after the check; the model must hold its weights."""
    root = tmp_path / "bundle"
    _external_model(root)
    _bundle_listing(root, ["model.onnx", "w.bin"])
    _sign(root, key)
    bundle = load_bundle(root, trusted_keys=[key.public or ""])  # every file matches
    with pytest.raises(BundleError, match=r"external data file 'w\.bin'"):
        bundle.open_model()
    code, _, err = _check(root, key, capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "external data file 'w.bin'" in err and "package it again" in err


def test_an_encrypted_model_does_not_read_external_data_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loaded from bytes, ONNX Runtime looks for w.bin in the current directory: before the fix
    an encrypted bundle ran with whatever w.bin the agent's working directory held (checked
    with ONNX Runtime 1.32 on this model)."""
    from device_agent.encryption import encrypt_model
    from sdk.signing import generate_model_key

    src = tmp_path / "src"
    model = _external_model(src)
    root = tmp_path / "bundle"
    root.mkdir()
    key_file = generate_model_key(tmp_path / "keys").private
    from device_agent.encryption import load_model_key

    ciphertext, info = encrypt_model(model.read_bytes(), load_model_key(key_file))
    (root / "model.onnx.enc").write_bytes(ciphertext)
    _bundle_listing(root, ["model.onnx.enc"], encrypted=info)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    shutil.copyfile(src / "w.bin", cwd / "w.bin")
    monkeypatch.chdir(cwd)
    bundle = load_bundle(root)
    with pytest.raises(BundleError, match=r"external data file 'w\.bin'"):
        bundle.open_model(model_key_file=key_file)


def test_the_runtime_reads_no_external_data_for_a_model_given_as_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The backstop under bundle.py's check: a session opened from bytes finds no external
    data file anywhere, the working directory included."""
    from device_agent.errors import RuntimeLoadError

    model = _external_model(tmp_path / "m")
    monkeypatch.chdir(tmp_path / "m")  # w.bin is right here
    assert _logits(model).shape == (1, 4)  # from its path it loads, weights beside it
    with pytest.raises(RuntimeLoadError, match=r"w\.bin"):
        open_session(model, content=model.read_bytes())


def test_a_model_file_changed_after_verification_is_not_run(tmp_path: Path) -> None:
    """The runtime gets the bytes that were hashed, read once: a swap between load_bundle and
    open_model is refused, not run."""
    from sdk.artifact import read_artifact
    from sdk.package import package

    model = write_mlp_onnx(tmp_path / "m.onnx", features=FEATURES)
    other = write_mlp_onnx(tmp_path / "o.onnx", features=FEATURES, seed=9)
    bundle = package(read_artifact(model), tmp_path / "bundle", name="mlp")
    shutil.copyfile(other, bundle.model_path)
    with pytest.raises(IntegrityError, match=r"'model\.onnx' does not match"):
        bundle.open_model()


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ("notes.txt", "notes.txt"),
        (".signature.json.tmp", ".signature.json.tmp"),
        ("sub/w.bin", "sub"),
        ("manifest.json.bak", "manifest.json.bak"),
    ],
)
def test_any_unlisted_file_or_folder_is_refused_by_name(
    tmp_path: Path, extra: str, named: str
) -> None:
    from sdk.artifact import read_artifact
    from sdk.package import package

    model = write_mlp_onnx(tmp_path / "m.onnx", features=FEATURES)
    bundle = package(read_artifact(model), tmp_path / "bundle", name="mlp").root
    (bundle / extra).parent.mkdir(parents=True, exist_ok=True)
    (bundle / extra).write_bytes(b"x")
    with pytest.raises(IntegrityError, match=re.escape(f"'{named}'")) as info:
        load_bundle(bundle)
    assert info.value.file == named
    (bundle / extra).unlink()
    if "/" in extra:
        (bundle / extra).parent.rmdir()
    load_bundle(bundle)  # signature.json and manifest.json are the only exceptions


def test_package_refuses_external_data_it_cannot_read_in_one_line(
    tmp_path: Path, capsys: Any
) -> None:
    from sdk.artifact import read_artifact
    from sdk.errors import ConfigError
    from sdk.package import package

    artifact = read_artifact(_external_model(tmp_path / "src"))
    (tmp_path / "src" / "w.bin").unlink()
    with pytest.raises(ConfigError, match=r"external data file 'w\.bin'") as info:
        package(artifact, tmp_path / "bundle")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "bundle").exists()
