"""Bad input gets one line saying what to fix and exit code 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import write_mlp_onnx
from tests.int8_host import HOST_REDUCE_RANGE


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    model = write_mlp_onnx(root / "mlp.onnx")
    data = model.read_bytes()
    (root / "truncated.onnx").write_bytes(data[: len(data) // 2])
    (root / "corrupt.onnx").write_bytes(np.random.default_rng(0).bytes(2000))
    (root / "empty.onnx").write_bytes(b"")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 16)).astype(np.float32)
    np.savez(root / "good.npz", x=x, labels=rng.integers(0, 4, 40))
    np.savez(root / "wrong_name.npz", image=x)
    np.savez(root / "wrong_shape.npz", x=x[:, :12])
    np.savez(root / "wrong_dtype.npz", x=(x > 0).astype("U1"))
    np.savez(root / "float_labels.npz", x=x, labels=x[:, 0])
    # The model has 4 classes: labels -1 (10 of 40) and 4 (8 of 40) are none of them.
    np.savez(root / "negative_labels.npz", x=x, labels=np.arange(40) % 4 - 1)
    np.savez(root / "big_labels.npz", x=x, labels=np.arange(40) % 5)
    return {p.stem: p for p in root.iterdir()}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sdk.cli", *args], capture_output=True, text=True, timeout=300
    )


def _assert_one_line_error(out: subprocess.CompletedProcess[str], needle: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr + out.stdout
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("edgeship: error: "), out.stderr
    assert needle in lines[0], lines[0]


CASES = [
    # (command builder, expected fragment)
    (
        lambda f, o: ["quantize", f["mlp"], "--calibration", f["wrong_name"], "-o", o + ".onnx"],
        "calibration data: missing input 'x'",
    ),
    (
        lambda f, o: ["quantize", f["mlp"], "--calibration", f["wrong_shape"], "-o", o + ".onnx"],
        "axis 1 must be 16",
    ),
    (
        lambda f, o: ["quantize", f["mlp"], "--calibration", f["wrong_dtype"], "-o", o + ".onnx"],
        "input 'x' has dtype <U1",
    ),
    (lambda f, o: ["quantize", f["mlp"], "-o", o + ".onnx"], "calibration"),
    (
        lambda f, o: ["quantize", f["truncated"], "--calibration", f["good"], "-o", o + ".onnx"],
        "truncated.onnx",
    ),
    (
        lambda f, o: ["quantize", f["corrupt"], "--mode", "dynamic", "-o", o + ".onnx"],
        "corrupt.onnx",
    ),
    (lambda f, o: ["quantize", f["empty"], "--mode", "dynamic", "-o", o + ".onnx"], "empty"),
    (
        lambda f, o: ["quantize", "nope.onnx", "--mode", "dynamic", "-o", o + ".onnx"],
        "not found: nope.onnx",
    ),
    (
        lambda f, o: ["quantize", f["mlp"], "--mode", "dynamic", "--op-types", ",", "-o", o],
        "--op-types: give operator types",
    ),
    (lambda f, o: ["bench", f["corrupt"]], "corrupt.onnx"),
    (lambda f, o: ["bench", f["mlp"], "--target", "rpi9"], "unknown target 'rpi9'"),
    (lambda f, o: ["bench", f["mlp"], "--budget", "p95=3ms"], "malformed budget term"),
    (lambda f, o: ["bench", f["mlp"], "--budget", "speed<=3ms"], "unknown budget key"),
    (lambda f, o: ["bench", "missing.onnx"], "not found: missing.onnx"),
    (lambda f, o: ["bench", f["mlp"], "--shape", "x"], "--shape 'x': expected NAME=D0,D1"),
    (lambda f, o: ["bench", f["mlp"], "--shape", "x=1,two"], "--shape 'x=1,two': expected"),
    (lambda f, o: ["bench", f["mlp"], "--shape", "x=1,3"], "shapes['x'] = (1, 3) does not fit"),
    (
        lambda f, o: ["optimize", f["mlp"], "--eval", f["wrong_shape"], "-o", o],
        "eval data: input 'x' has shape (40, 12)",
    ),
    (
        lambda f, o: ["optimize", f["mlp"], "--eval", f["float_labels"], "-o", o],
        "integer class ids",
    ),
    # Labels outside the model's classes scored 0% for fp32 and int8 alike: a drop of 0 passed.
    (
        lambda f, o: [
            "optimize",
            f["mlp"],
            "--eval",
            f["negative_labels"],
            "--budget",
            "drop<=1%",
            "-o",
            o,
        ],
        "negative_labels.npz): 10 of 40 labels are outside [0, classes)",
    ),
    (
        lambda f, o: [
            "optimize",
            f["mlp"],
            "--eval",
            f["big_labels"],
            "--calibration",
            f["good"],
            "--budget",
            "drop<=1%",
            "-o",
            o,
        ],
        "big_labels.npz): 8 of 40 labels are outside [0, 4) (4 classes: 0 to 3)",
    ),
    (
        lambda f, o: ["optimize", f["mlp"], "--calibration", f["wrong_name"], "-o", o],
        "missing input 'x'",
    ),
    (
        lambda f, o: ["optimize", f["mlp"], "--calibration", "cal-missing.npz", "-o", o],
        "calibration data file not found",
    ),
    (lambda f, o: ["optimize", f["truncated"], "-o", o], "truncated.onnx"),
    (lambda f, o: ["optimize", f["mlp"], "--target", "pi4", "-o", o], "known targets"),
    (lambda f, o: ["inspect", o], "bundle not found"),
]


@pytest.mark.parametrize(("build", "needle"), CASES, ids=[c[1][:40] for c in CASES])
def test_bad_input(files: dict[str, Path], tmp_path: Path, build: object, needle: str) -> None:
    args = build({k: str(v) for k, v in files.items()}, str(tmp_path / "out"))  # type: ignore[operator]
    _assert_one_line_error(_run(*args), needle)


def test_help_teaches() -> None:
    top = _run("--help")
    assert top.returncode == 0 and "examples:" in top.stdout and "Exit codes" in top.stdout
    for cmd in ("quantize", "bench", "optimize", "inspect", "targets", "demo"):
        sub = _run(cmd, "--help")
        assert sub.returncode == 0 and "usage: edgeship " + cmd in sub.stdout
    assert "rpi-zero2w" in _run("targets").stdout


# --- what a successful quantize prints, and what it keeps quiet ----------------------------


def _conv9_model(path: Path) -> Path:
    """x (N, 3, ?, ?) -> Conv 9x9 without padding: a generated 8x8 input is refused (ORT logs
    an error line of its own for it), a larger one runs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(0).standard_normal((4, 3, 9, 9)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "W"], ["y"], name="conv")],
        "conv9",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "?", "?"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "h", "w"])],
        [numpy_helper.from_array(weight, "W")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_quantize_prints_its_check_and_no_runtime_noise(tmp_path: Path) -> None:
    model = _conv9_model(tmp_path / "conv9.onnx")
    out = _run("quantize", str(model), "--mode", "dynamic", "-o", str(tmp_path / "q.onnx"))
    print(f"\n[quantize] {out.stdout}{out.stderr}")
    assert out.returncode == 0, out.stderr
    assert "[E:onnxruntime" not in out.stderr and "Non-zero status code" not in out.stderr
    assert "WARNING root" not in out.stderr
    assert "check vs fp32 on 2 generated random inputs: worst-sample cosine" in out.stdout
    assert "not its accuracy; pass --calibration for a real check" in out.stdout


def test_quantize_check_runs_on_calibration_data_in_dynamic_mode(
    files: dict[str, Path], tmp_path: Path
) -> None:
    out = _run(
        "quantize",
        str(files["mlp"]),
        "--mode",
        "dynamic",
        "--calibration",
        str(files["good"]),
        # Where this host's int8 kernels saturate, its documented advice (tests/int8_host.py).
        *(["--reduce-range"] if HOST_REDUCE_RANGE else []),
        "-o",
        str(tmp_path / "q.onnx"),
    )
    assert out.returncode == 0, out.stderr
    assert "check vs fp32 on 16 calibration samples: worst-sample cosine" in out.stdout
    assert "(ok)" in out.stdout


@pytest.mark.parametrize("reduce_range", [False, True])
def test_quantize_reduce_range_writes_7_bit_weights(
    files: dict[str, Path], tmp_path: Path, reduce_range: bool
) -> None:
    """--reduce-range reaches the quantizer: every int8 weight lies in [-64, 63] (7 bits)."""
    import onnx
    from onnx import numpy_helper

    out = _run(
        "quantize",
        str(files["mlp"]),
        "--mode",
        "dynamic",
        *(["--reduce-range"] if reduce_range else []),
        "-o",
        str(tmp_path / "q.onnx"),
    )
    assert out.returncode == 0, out.stderr
    weights = [
        numpy_helper.to_array(t)
        for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and t.dims
    ]
    assert weights
    widest = max(int(np.abs(w.astype(np.int16)).max()) for w in weights)
    assert (widest <= 64) is reduce_range, widest


# --- --debug and bench --shape ---------------------------------------------------------------


def test_debug_shows_the_traceback_behind_an_edgeship_error(files: dict[str, Path]) -> None:
    """--debug used to show tracebacks only for internal errors; a converted error (ONNX's
    DecodeError behind edgeship's ModelFormatError here) needs its cause shown too."""
    out = _run("--debug", "quantize", str(files["truncated"]), "--mode", "dynamic", "-o", "q.onnx")
    assert out.returncode == 2
    assert "Traceback" in out.stderr and "DecodeError" in out.stderr
    assert "The above exception was the direct cause of the following exception" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("edgeship: error: ")
    plain = _run("quantize", str(files["truncated"]), "--mode", "dynamic", "-o", "q.onnx")
    assert "Traceback" not in plain.stderr  # without --debug: one line, as before


def test_bench_shape_sizes_dynamic_dimensions(tmp_path: Path) -> None:
    """PaddleOCR's recogniser takes (N, 3, ?, ?): without --shape bench cannot pick H and W."""
    import json

    model = _conv9_model(tmp_path / "conv9.onnx")
    fast = ["--runs", "3", "--seconds", "0"]
    refused = _run("bench", str(model), *fast)
    _assert_one_line_error(refused, "on the command line: --shape NAME=D0,D1,...")
    report = tmp_path / "bench.json"
    out = _run("bench", str(model), "--shape", "x=1,3,16,24", *fast, "--json", str(report))
    assert out.returncode == 0, out.stderr
    assert json.loads(report.read_text())["input_shapes"] == {"x": [1, 3, 16, 24]}
