"""Bundles: written atomically, verified on load, and refused when any byte changes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_agent.bundle import load_bundle
from device_agent.errors import BundleError, IntegrityError
from device_agent.runtime import open_session
from sdk.artifact import read_artifact
from sdk.budget import parse_budget
from sdk.errors import ConfigError
from sdk.package import package
from tests.helpers import write_mlp_onnx


@pytest.fixture()
def bundle_dir(tmp_path: Path) -> Path:
    art = read_artifact(write_mlp_onnx(tmp_path / "mlp.onnx"))
    extra = tmp_path / "detector.npz"
    np.savez(extra, mean=np.zeros(16))
    package(
        art,
        tmp_path / "bundle",
        name="mlp",
        version="2",
        labels=["a", "b", "c", "d"],
        budget=parse_budget("p95<=5ms"),
        benchmark={"latency_ms": {"p50": np.float64(0.1), "p95": 0.2}},
        extra_files={"extra/detector.npz": extra},
    )
    return tmp_path / "bundle"


def test_bundle_loads_and_runs(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    m = bundle.manifest
    assert m.model.name == "mlp" and m.model.file == "model.onnx"
    assert m.io.outputs[0].labels == ("a", "b", "c", "d")
    assert set(m.files) == {"model.onnx", "extra/detector.npz"}
    assert m.tools["onnxruntime"] and m.budget == {"p95_ms": 5.0}
    out = open_session(bundle.model_path).run({"x": np.ones((3, 16), np.float32)})
    assert out[0].shape == (3, 4)
    assert not list(bundle_dir.parent.glob(".bundle.*")), "staging directory left behind"


@pytest.mark.parametrize("victim", ["model.onnx", "extra/detector.npz"])
@pytest.mark.parametrize("offset", [0, -1, 100])
def test_one_changed_byte_is_refused_naming_the_file(
    bundle_dir: Path, victim: str, offset: int
) -> None:
    path = bundle_dir / victim
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError) as info:
        load_bundle(bundle_dir)
    assert info.value.file == victim and repr(victim) in str(info.value)


def test_missing_file_and_bad_manifest(bundle_dir: Path) -> None:
    (bundle_dir / "extra" / "detector.npz").unlink()
    with pytest.raises(IntegrityError, match="missing"):
        load_bundle(bundle_dir)
    (bundle_dir / "manifest.json").write_text("{}")
    with pytest.raises(BundleError, match="not an edgeship bundle"):
        load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="bundle not found"):
        load_bundle(bundle_dir / "nope")


def test_never_overwrites_a_directory_it_did_not_write(tmp_path: Path) -> None:
    art = read_artifact(write_mlp_onnx(tmp_path / "mlp.onnx"))
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(ConfigError, match="not a bundle"):
        package(art, precious)
    assert (precious / "cat.jpg").read_bytes() == b"meow"
    # Re-packaging over an existing bundle replaces it.
    package(art, tmp_path / "b", version="1")
    package(art, tmp_path / "b", version="2")
    assert load_bundle(tmp_path / "b").manifest.model.version == "2"


def test_cli_inspect_and_agent_check(bundle_dir: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sdk.cli", "inspect", str(bundle_dir)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "mlp v2" in out.stdout and "labels=['a', 'b', 'c', 'd']" in out.stdout
    raw = subprocess.run(
        [sys.executable, "-m", "sdk.cli", "inspect", "--json", str(bundle_dir)],
        capture_output=True,
        text=True,
    )
    assert json.loads(raw.stdout)["model"]["version"] == "2"
    check = subprocess.run(
        [sys.executable, "-m", "device_agent.cli", "check", str(bundle_dir)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stderr
    assert "verified   2 file(s)" in check.stdout and "outputs logits (1, 4)" in check.stdout
    (bundle_dir / "model.onnx").write_bytes(b"tampered")
    bad = subprocess.run(
        [sys.executable, "-m", "device_agent.cli", "check", str(bundle_dir)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "'model.onnx'" in bad.stderr
