"""optimize with a Keras model or a TensorFlow SavedModel (sdk/optimize/tf_source.py): converted
once to ONNX (tf2onnx) and to a float TFLite (TensorFlow's converter), then both runtimes'
candidates searched as for a PyTorch model; the CLI on a .keras file and a SavedModel folder;
the one-line errors (input names and shapes, a fixed batch, TensorFlow or tf2onnx missing).

A small Conv2D classifier is trained here on scikit-learn's digits (seeded, seconds); every
search runs real converters, quantizers and ONNX Runtime / LiteRT sessions.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.bundle import load_bundle
from device_agent.runtime import open_session
from sdk.budget import parse_budget
from sdk.cli.app import main
from sdk.errors import ConfigError
from sdk.optimize import OptimizeConfig, optimize
from sdk.targets import get_target

pytestmark = pytest.mark.slow

QUICK: dict[str, Any] = {
    "min_runs": 10,
    "min_seconds": 0.02,
    "confirm_rounds": 1,
    "detector": None,
    "static_methods": ("minmax",),
    "try_all_ops": False,
    "try_dynamic": False,
    "try_latency_aware": False,
    "use_calibration_cache": False,
}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_keras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A Conv2D classifier trained on digits (NHWC), saved as .keras and as a SavedModel, with
    calibration and eval data keyed 'pixels' (the model calls its input 'image')."""
    import keras

    from sdk.zoo.digits import load_digits_splits

    s = load_digits_splits(0)
    nhwc = {k: np.transpose(getattr(s, k), (0, 2, 3, 1)) for k in ("x_train", "x_cal", "x_test")}
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(8, 3, activation="relu")(inp)
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(10, name="logits")(h)
    model = keras.Model(inp, out, name="digits")
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer="adam", loss=loss, metrics=["accuracy"])
    model.fit(nhwc["x_train"], s.y_train, epochs=15, batch_size=32, verbose=0)
    _, acc = model.evaluate(nhwc["x_test"], s.y_test, verbose=0)
    assert acc > 0.85
    folder = tmp_path_factory.mktemp("keras")
    model.save(folder / "digits.keras")
    model.export(str(folder / "saved"), verbose=False)
    return {
        "model": model,
        "keras": folder / "digits.keras",
        "saved": folder / "saved",
        "cal": {"pixels": nhwc["x_cal"][:200]},
        "ev": {"pixels": nhwc["x_test"], "labels": s.y_test},
    }


def _by_name(report: Any) -> dict[str, Any]:
    return {c.name: c for c in report.candidates}


def test_a_keras_file_gets_onnx_and_litert_candidates(
    digits_keras: dict[str, Any], tmp_path: Path
) -> None:
    d = digits_keras
    config = OptimizeConfig(budget=parse_budget("drop<=3%"), **QUICK)
    report = optimize(
        d["keras"], calibration=d["cal"], eval_data=d["ev"], out=tmp_path / "b", config=config
    )
    by = _by_name(report)
    assert by["fp32"].artifact.format == "onnx"
    for name, fmt, runtime in (
        ("ort-static-int8-minmax", "onnx", "onnxruntime"),
        ("litert-static_wi8_ai8", "tflite", "litert"),
        ("litert-weight_only_wi8_afp32", "tflite", "litert"),
    ):
        cand = by[name]
        assert cand.error is None and cand.artifact.format == fmt, cand.error
        assert cand.bench.to_dict()["runtime"] == runtime
        assert cand.quality.accuracy is not None and cand.accuracy_drop < 0.03
    assert any("digits.keras converted to" in n for n in report.notes)
    assert any("ONNX Runtime and LiteRT candidates both searched" in n for n in report.notes)
    # the converted files are kept beside the bundle and compute what Keras computes, with the
    # calibration data's input name and the model's output name
    source = tmp_path / "b-source"
    x = d["ev"]["pixels"][:1]
    want = d["model"].predict(x, verbose=0)
    for file in ("model.onnx", "model.tflite"):
        session = open_session(source / file)
        assert [s.name for s in session.io.inputs] == ["pixels"]
        assert [s.name for s in session.io.outputs] == ["logits"]
        np.testing.assert_allclose(session.run({"pixels": x})[0], want, rtol=1e-4, atol=1e-4)
    assert open_session(source / "model.onnx").io.inputs[0].shape[0] == "batch"
    assert open_session(source / "model.tflite").io.inputs[0].shape == (1, 8, 8, 1)
    chosen = report.chosen_candidate.artifact
    manifest = load_bundle(report.bundle).manifest.model
    assert manifest.runtime == ("litert" if chosen.format == "tflite" else "onnxruntime")
    from device_agent.cli import main as agent_main

    assert agent_main(["check", str(report.bundle)]) == 0


def test_a_saved_model_and_a_keras_model_keep_to_the_runtimes_allowed(
    digits_keras: dict[str, Any], tmp_path: Path
) -> None:
    d = digits_keras
    litert = OptimizeConfig(runtime="litert", **QUICK)
    report = optimize(d["saved"], calibration=d["cal"], eval_data=d["ev"], out=tmp_path / "s",
                      config=litert)  # fmt: skip
    by = _by_name(report)
    assert by["fp32"].artifact.format == "tflite" and by["fp32"].quality.accuracy > 0.85
    assert by["litert-static_wi8_ai8"].error is None
    assert not any(name.startswith("ort-") for name in by)
    assert any("measured against SavedModel saved/'s float TFLite" in n for n in report.notes)
    assert not (tmp_path / "s-source" / "model.onnx").exists()  # not converted: not needed
    assert load_bundle(report.bundle).manifest.model.runtime == "litert"

    # a board profile with LiteRT only: the ONNX conversion is measured against its TFLite twin
    board = OptimizeConfig(target=get_target("rpi4", runtimes=("litert",)), **QUICK)
    report = optimize(d["model"], calibration=d["cal"], out=tmp_path / "k", config=board)
    assert {c.artifact.format for c in report.candidates if c.artifact} == {"tflite"}
    assert any("the Keras model 'digits''s float TFLite" in n for n in report.notes)

    ort = OptimizeConfig(runtime="onnxruntime", keep_candidates=False, **QUICK)
    report = optimize(d["model"], calibration=d["cal"], out=tmp_path / "o", config=ort)
    assert {c.artifact.format for c in report.candidates if c.artifact} == {"onnx"}
    assert not any(c.name.startswith("litert") for c in report.candidates)
    assert load_bundle(report.bundle).manifest.model.runtime == "onnxruntime"
    left = ["k", "k-candidates", "k-source", "o", "s", "s-candidates", "s-source"]
    assert sorted(p.name for p in tmp_path.iterdir()) == left  # "o" kept no candidates


def test_the_cli_takes_a_keras_file_and_a_saved_model_folder(
    digits_keras: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = digits_keras
    np.savez(tmp_path / "cal.npz", **d["cal"])
    np.savez(tmp_path / "ev.npz", **d["ev"])
    common = ["--calibration", str(tmp_path / "cal.npz"), "--eval", str(tmp_path / "ev.npz"),
              "--budget", "drop<=3%", "--runs", "10", "--seconds", "0.02", "--methods", "minmax",
              "--detector", "none", "--no-latency-aware"]  # fmt: skip
    rc = main(["optimize", str(d["keras"]), "-o", str(tmp_path / "k"), *common])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "ort-static-int8-minmax" in text and "litert-static_wi8_ai8" in text
    assert load_bundle(tmp_path / "k").manifest.model.name == "digits"
    rc = main(["optimize", f"{d['saved']}/", "-o", str(tmp_path / "s"), "--runtime",
               "onnxruntime", *common])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "ort-static-int8-minmax" in text and "litert-" not in text
    assert load_bundle(tmp_path / "s").manifest.model.runtime == "onnxruntime"


def test_input_names_shapes_and_batch_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import keras

    a_in, b_in = keras.Input((4,), name="a"), keras.Input((4,), name="b")
    two = keras.Model([a_in, b_in], keras.layers.Dense(3)(keras.layers.Concatenate()([a_in, b_in])))
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((16, 4)).astype(np.float32) for _ in range(2))
    config = OptimizeConfig(**QUICK)
    with pytest.raises(ConfigError, match=r"named as the Keras model .* \['a', 'b'\]: 'b' miss"):
        optimize(two, calibration={"a": a, "c": b}, out=tmp_path / "n", config=config)
    with pytest.raises(ConfigError, match=r"input 'b' takes \(batch, 4\); .* 'b' is \(16, 5\)"):
        optimize(two, calibration={"a": a, "b": np.zeros((16, 5), np.float32)},
                 out=tmp_path / "n", config=config)  # fmt: skip
    fixed_in = keras.Input((4,), batch_size=2, name="x")
    fixed = keras.Model(fixed_in, keras.layers.Dense(3)(fixed_in))
    with pytest.raises(ConfigError, match="fixed batch of 2"):
        optimize(fixed, calibration={"x": a}, out=tmp_path / "n", config=config)
    with pytest.raises(ConfigError, match="pass calibration data"):
        optimize(fixed, out=tmp_path / "n", config=config)
    assert not (tmp_path / "n-source").exists()  # a failed run leaves no folder behind
    # the same from the CLI: exit 2, one line, no traceback
    two.save(tmp_path / "two.keras")
    np.savez(tmp_path / "cal.npz", a=a, c=b)
    rc = main(["optimize", str(tmp_path / "two.keras"), "-o", str(tmp_path / "c"),
               "--calibration", str(tmp_path / "cal.npz")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "'b' missing; 'c' unknown" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    rc = main(["optimize", str(tmp_path / "junk.keras"), "-o", str(tmp_path / "c"),
               "--calibration", str(tmp_path / "cal.npz")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "junk.keras: Keras cannot load it" in err and "Traceback" not in err


def test_without_tf2onnx_only_litert_is_searched(
    digits_keras: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = digits_keras
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # find_spec: None, import: ImportError
    report = optimize(d["keras"], calibration=d["cal"], out=tmp_path / "b",
                      config=OptimizeConfig(**QUICK))  # fmt: skip
    assert {c.artifact.format for c in report.candidates if c.artifact} == {"tflite"}
    assert any("no ONNX Runtime candidates: converting to ONNX needs tf2onnx" in n
               for n in report.notes)  # fmt: skip
    with pytest.raises(ConfigError, match=r"needs tf2onnx: pip install 'edgeship\[tf\]'"):
        optimize(d["keras"], calibration=d["cal"], out=tmp_path / "c",
                 config=OptimizeConfig(runtime="onnxruntime", **QUICK))  # fmt: skip


def test_without_tensorflow_the_cli_says_what_to_install(
    digits_keras: dict[str, Any], tmp_path: Path
) -> None:
    """In a process where TensorFlow cannot be imported (None in sys.modules: the import
    raises ImportError, as when it is not installed)."""
    np.savez(tmp_path / "cal.npz", **digits_keras["cal"])
    code = (
        "import sys; sys.modules['tensorflow'] = None; from sdk.cli.app import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    for model in (digits_keras["keras"], digits_keras["saved"]):
        args = ["optimize", str(model), "-o", str(tmp_path / "b")]
        proc = subprocess.run(
            [sys.executable, "-c", code, *args, "--calibration", str(tmp_path / "cal.npz")],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=120,
        )
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "pip install 'edgeship[tf]'" in lines[0], proc.stderr
        assert not (tmp_path / "b-source").exists()


def _lambda_model(fn: Any) -> Any:
    import keras

    inp = keras.Input((3, 3), name="x")
    return keras.Model(inp, keras.layers.Lambda(fn)(inp))


def test_a_converter_that_fails_leaves_its_runtime_out_or_is_one_line(tmp_path: Path) -> None:
    """tf2onnx has no ONNX op for Lgamma (it logs and emits an invalid graph); TFLite has no
    builtin for MatrixDeterminant. Each model is searched on the runtime that converted it,
    and an explicit --runtime for the one that failed is one line naming the op."""
    import tensorflow as tf

    x = np.random.default_rng(0).standard_normal((8, 3, 3)).astype(np.float32)
    lgamma = _lambda_model(lambda t: tf.math.lgamma(tf.abs(t) + 1.0))
    det = _lambda_model(lambda t: tf.linalg.det(t))
    for model, fmt, left_out, op in (
        (lgamma, "tflite", "no ONNX Runtime candidates: tf2onnx", "Lgamma"),
        (det, "onnx", "no LiteRT candidates: TensorFlow's TFLite", "MatrixDeterminant"),
    ):
        out = tmp_path / fmt
        report = optimize(model, calibration={"x": x}, out=out, config=OptimizeConfig(**QUICK))
        assert {c.artifact.format for c in report.candidates if c.artifact} == {fmt}
        assert any(n.startswith(left_out) and n.endswith(op) for n in report.notes), report.notes
        runtime = "onnxruntime" if fmt == "tflite" else "litert"
        with pytest.raises(ConfigError) as info:
            optimize(model, calibration={"x": x}, out=tmp_path / "e",
                     config=OptimizeConfig(runtime=runtime, **QUICK))  # fmt: skip
        text = str(info.value)
        assert text.endswith(f"TensorFlow's {op}") and "\n" not in text, text
        assert not (tmp_path / "e-source").exists()


def test_converter_locations_are_stripped_from_the_message() -> None:
    from sdk.optimize.tf_source import _converter_text

    exc = RuntimeError(
        "Could not translate MLIR to FlatBuffer./work/main/.venv/bin/edgeship:6:1: error: "
        "'tf.Foo' failed\nmore"
    )
    assert _converter_text(exc) == (
        "RuntimeError: Could not translate MLIR to FlatBuffer. error: 'tf.Foo' failed"
    )


def test_a_free_sequence_length_is_fixed_from_the_calibration_data_with_a_note(
    tmp_path: Path,
) -> None:
    import keras

    inp = keras.Input((None, 3), name="seq")
    pooled = keras.layers.GlobalAveragePooling1D()(keras.layers.Dense(5)(inp))
    model = keras.Model(inp, keras.layers.Dense(2, name="out")(pooled))
    x = np.random.default_rng(0).standard_normal((16, 7, 3)).astype(np.float32)
    config = OptimizeConfig(runtime="litert", **QUICK)
    report = optimize(model, calibration={"seq": x}, out=tmp_path / "b", config=config)
    note = "input 'seq' has free dimension(s) past the batch, fixed from the calibration data"
    assert any(note in n and "dimension 1 at 7" in n for n in report.notes), report.notes
    assert open_session(tmp_path / "b-source" / "model.tflite").io.inputs[0].shape == (1, 7, 3)


def test_a_subclassed_model_takes_its_input_from_the_calibration_data(tmp_path: Path) -> None:
    import keras

    class Scale(keras.Model):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x: Any) -> Any:
            return self.dense(x) * 2.0

    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 4)).astype(np.float32)
    model = Scale()  # never called: built on one calibration sample
    config = OptimizeConfig(runtime="onnxruntime", **QUICK)
    report = optimize(model, calibration={"feat": x}, out=tmp_path / "b", config=config)
    assert report.chosen_candidate.error is None
    session = open_session(tmp_path / "b-source" / "model.onnx")
    assert [s.name for s in session.io.inputs] == ["feat"]
    np.testing.assert_allclose(session.run({"feat": x})[0], np.asarray(model(x)), atol=1e-5)
    with pytest.raises(ConfigError, match=r"subclassed model.*functional model.*model\.export"):
        optimize(Scale(), calibration={"a": x, "b": x}, out=tmp_path / "c", config=config)


def test_a_source_folder_the_user_has_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import keras

    inp = keras.Input((4,), name="x")
    keras.Model(inp, keras.layers.Dense(2)(inp)).save(tmp_path / "m.keras")
    np.savez(tmp_path / "cal.npz", x=np.ones((4, 4), np.float32))
    mine = tmp_path / "b-source" / "model.onnx"
    mine.parent.mkdir()
    mine.write_text("the user's")
    rc = main(["optimize", str(tmp_path / "m.keras"), "-o", str(tmp_path / "b"),
               "--calibration", str(tmp_path / "cal.npz")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and f"{mine.parent} already exists" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in mine.parent.iterdir()) == ["model.onnx"]
    assert mine.read_text() == "the user's"
