"""Sub-8-bit weights (issue 13, item 6): int4 MatMul weights for ONNX Runtime
(:mod:`sdk.quantize.nbits`, ``MatMulNBits``) and the ``ort-weight-int4`` candidate optimize
tries when the budget has a size line; for a float .tflite, LiteRT's int4 weights
(``weight_only_wi4_afp32``), kept out by default because tflite-runtime 2.14 cannot load them.

The model is a real MLP (flatten, 64 -> 256 -> 256 -> 10) trained here on scikit-learn's
digits and exported with ``sdk.export``: its ``nn.Linear`` layers are ``Gemm`` nodes, which
the int4 path rewrites to ``MatMul`` first.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import sdk
from sdk.artifact import ModelArtifact, read_artifact
from sdk.budget import parse_budget
from sdk.cli.app import main
from sdk.data import load_dataset
from sdk.errors import QuantizationError
from sdk.optimize import OptimizeConfig, optimize
from sdk.optimize.stages import SearchContext, default_registry
from sdk.optimize.stages.weight4 import WEIGHT_INT4, WeightInt4Recipe
from sdk.quantize.nbits import gemm_to_matmul, int4_blocker, quantize_int4
from sdk.targets import get_target
from sdk.zoo.digits import INPUT_NAME, OUTPUT_NAME

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HIDDEN = 256
# Only the candidates this file is about: fp32, the first static int8 and int4.
FAST: dict[str, Any] = {
    "min_runs": 20,
    "min_seconds": 0.05,
    "confirm_rounds": 1,
    "detector": None,
    "static_methods": ("minmax",),
    "try_dynamic": False,
    "try_all_ops": False,
    "per_tensor_variant": False,
    "try_accuracy_aware": False,
    "try_latency_aware": False,  # tried only where static int8 is slower: machines differ
}


@pytest.fixture(scope="module")
def mlp(digits_splits: Any, tmp_path_factory: pytest.TempPathFactory) -> ModelArtifact:
    """The digits MLP, trained with one torch thread and exported to ONNX."""
    import torch
    from torch import nn

    from sdk.training import torch_threads
    from sdk.zoo.digits import train_digits_cnn

    net = nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, 10),
    )
    with torch_threads(1):
        trained, accuracy = train_digits_cnn(digits_splits, seed=0, epochs=20, model=net)
    assert accuracy > 0.93
    return sdk.export(
        trained,
        (torch.from_numpy(digits_splits.x_cal[:4]),),
        to="onnx",
        path=tmp_path_factory.mktemp("mlp") / "mlp.onnx",
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
    )


@pytest.fixture(scope="module")
def int4(mlp: ModelArtifact, digits_splits: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("int4") / "mlp.int4.onnx"
    return quantize_int4(mlp, {INPUT_NAME: digits_splits.x_cal}, out=out)


def _ops(path: Path) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: x})[0])


def test_int4_weights_run_in_onnx_runtime_at_a_sixth_of_the_size(
    mlp: ModelArtifact, int4: ModelArtifact, digits_splits: Any
) -> None:
    assert _ops(mlp.path).count("Gemm") == 3  # what torch exports for nn.Linear
    ops = _ops(int4.path)
    assert ops.count("MatMulNBits") == 3 and "Gemm" not in ops and "MatMul" not in ops, ops
    assert int4.precision == "int4" and int4.recipe == "ort-weight-int4"
    assert int4.details["quantized_nodes"] == 3 and int4.details["gemm_rewritten"] == 3
    assert int4.size_bytes < 0.35 * mlp.size_bytes, (int4.size_bytes, mlp.size_bytes)

    x, y = digits_splits.x_test, digits_splits.y_test
    fp32_top1 = _run(mlp.path, x).argmax(1)
    int4_top1 = _run(int4.path, x).argmax(1)  # a plain ONNX Runtime session, not ours
    assert (int4_top1 == y).mean() >= (fp32_top1 == y).mean() - 0.015
    assert (int4_top1 == fp32_top1).mean() >= 0.97

    check = int4.details["check"]  # against fp32, on calibration samples
    assert check["inputs"] == "calibration" and check["samples"] > 8
    assert 0.99 <= check["cosine_min"] < 1.0 and check["max_abs_error"] > 0


def test_the_gemm_rewrite_keeps_the_outputs(
    mlp: ModelArtifact, digits_splits: Any, tmp_path: Path
) -> None:
    import onnx

    proto = onnx.load(str(mlp.path))
    assert gemm_to_matmul(proto.graph) == 3
    ops = [n.op_type for n in proto.graph.node]
    assert "Gemm" not in ops and ops.count("MatMul") == 3 and ops.count("Add") == 3
    rewritten = tmp_path / "matmul.onnx"
    onnx.save(proto, str(rewritten))
    x = digits_splits.x_test
    np.testing.assert_allclose(_run(rewritten, x), _run(mlp.path, x), rtol=0, atol=1e-5)


def _gemms(path: Path) -> Path:
    """x[2, 8] through five Gemms with every attribute the rewrite handles or leaves."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)

    def const(name: str, *shape: int) -> Any:
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Gemm", ["x", "w_t", "c_row"], ["h1"], transB=1, beta=0.5),
        helper.make_node("Gemm", ["h1", "w"], ["h2"]),  # no C
        helper.make_node("Gemm", ["h2", "w2", "c_fed"], ["h3"]),  # C a graph input, beta 1
        helper.make_node("Gemm", ["h3", "w3", "c_zero"], ["h4"], beta=0.0),  # C ignored
        helper.make_node("Gemm", ["h4", "w4"], ["y"], alpha=2.0),  # kept: alpha
    ]
    graph = helper.make_graph(
        nodes,
        "gemms",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
            helper.make_tensor_value_info("c_fed", TensorProto.FLOAT, [6]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [
            const("w_t", 6, 8),
            const("c_row", 1, 6),
            const("w", 6, 6),
            const("w2", 6, 6),
            const("w3", 6, 5),
            const("c_zero", 5),
            const("w4", 5, 3),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_the_gemm_rewrite_handles_transb_beta_and_c(tmp_path: Path) -> None:
    import onnx
    import onnxruntime as ort

    original = _gemms(tmp_path / "gemms.onnx")
    proto = onnx.load(str(original))
    assert gemm_to_matmul(proto.graph) == 4
    assert [n.op_type for n in proto.graph.node] == [
        *("MatMul", "Add", "MatMul", "MatMul", "Add", "MatMul", "Gemm"),
    ]
    inits = {i.name for i in proto.graph.initializer}
    assert "w_t" not in inits and "c_row" not in inits  # replaced by w_t.T and 0.5 * c_row
    rewritten = tmp_path / "rewritten.onnx"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(rewritten))
    rng = np.random.default_rng(2)
    feed = {
        "x": rng.normal(size=(2, 8)).astype(np.float32),
        "c_fed": rng.normal(size=6).astype(np.float32),
    }
    before, after = (
        ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)[0]
        for p in (original, rewritten)
    )
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)


def _conv_only(path: Path) -> Path:
    """x[N, 1, 8, 8] -> Conv -> Relu -> GlobalAveragePool -> Flatten: no MatMul, no Gemm."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(4, 1, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"]),
            helper.make_node("GlobalAveragePool", ["r"], ["p"]),
            helper.make_node("Flatten", ["p"], ["y"]),
        ],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _context(model: ModelArtifact, budget: str, **config: Any) -> SearchContext:
    cfg = OptimizeConfig(budget=parse_budget(budget), **config)
    return SearchContext(cfg, model, None, None, get_target("host"), None)


def test_a_model_without_matmul_weights_is_skipped_with_the_reason(tmp_path: Path) -> None:
    conv = read_artifact(_conv_only(tmp_path / "conv.onnx"))
    reason = int4_blocker(conv.path)
    assert reason == (
        "nothing to quantize to int4: no MatMul or Gemm with a constant weight in this model "
        "(its ops: Conv, Flatten, GlobalAveragePool, Relu)"
    )
    recipes, skipped = default_registry().plan(_context(conv, "size<=1MB"))
    assert WEIGHT_INT4 not in [r.name for r in recipes]
    assert {s.name: s.reason for s in skipped}[WEIGHT_INT4] == reason
    with pytest.raises(QuantizationError) as err:
        quantize_int4(conv, out=tmp_path / "conv.int4.onnx")
    assert str(err.value) == f"{reason}; the fp32 model is the one to ship"
    assert "\n" not in str(err.value)


def test_int4_is_planned_only_with_a_size_line(mlp: ModelArtifact) -> None:
    for budget in ("p95<=10ms", "drop<=1%,rss<=100MB"):
        recipes, skipped = default_registry().plan(_context(mlp, budget))
        names = [r.name for r in recipes] + [s.name for s in skipped]
        assert WEIGHT_INT4 not in names, (budget, names)
    recipes, _ = default_registry().plan(_context(mlp, "size<=1MB"))
    assert WEIGHT_INT4 in [r.name for r in recipes]


def test_without_eval_data_the_int4_candidate_is_gated_on_min_cosine(
    mlp: ModelArtifact, int4: ModelArtifact, digits_splits: Any, tmp_path: Path
) -> None:
    cal = load_dataset({INPUT_NAME: digits_splits.x_cal}, mlp.io)
    cos = int4.details["check"]["cosine_min"]
    passing = SearchContext(
        OptimizeConfig(budget=parse_budget("size<=1MB"), min_cosine=cos - 1e-4),
        *(mlp, cal, None, get_target("host"), None),
    )
    assert WeightInt4Recipe().make(passing, tmp_path / "a.onnx").precision == "int4"
    failing = SearchContext(
        OptimizeConfig(budget=parse_budget("size<=1MB"), min_cosine=min(1.0, cos + 1e-4)),
        *(mlp, cal, None, get_target("host"), None),
    )
    with pytest.raises(QuantizationError, match=r"^quality gate: worst-sample cosine .* below"):
        WeightInt4Recipe().make(failing, tmp_path / "b.onnx")


def test_optimize_with_a_size_line_measures_int4_and_ships_it_when_only_it_fits(
    mlp: ModelArtifact, int4: ModelArtifact, digits_splits: Any, tmp_path: Path
) -> None:
    """The size line sits between the int4 and int8 sizes (int8 weights take about twice the
    bytes): only int4 can meet the budget, so the objective must choose it; the bundle it
    writes checks in the agent."""
    limit_kb = 1.25 * int4.size_bytes / 1024
    config = OptimizeConfig(
        budget=parse_budget(f"size<={limit_kb:.1f}KB"),
        calibration_cache=tmp_path / "cache",
        **FAST,
    )
    report = optimize(
        mlp.path,
        calibration={INPUT_NAME: digits_splits.x_cal},
        eval_data={INPUT_NAME: digits_splits.x_test, "labels": digits_splits.y_test},
        out=tmp_path / "bundle",
        config=config,
    )
    by = {c.name: c for c in report.candidates}
    assert list(by) == ["fp32", "ort-static-int8-minmax", WEIGHT_INT4], report.summary()
    made = by[WEIGHT_INT4]
    assert made.error is None and made.artifact is not None and made.bench is not None
    assert made.artifact.precision == "int4" and made.quality is not None
    assert made.accuracy_drop is not None and made.accuracy_drop <= 0.015
    assert made.bench.latency_ms["p95"] > 0
    int8 = by["ort-static-int8-minmax"]
    assert int8.error is None and int8.artifact is not None and not int8.meets_budget
    assert made.artifact.size_bytes < int8.artifact.size_bytes
    assert report.chosen == WEIGHT_INT4 and report.meets_budget, report.summary()
    assert WEIGHT_INT4 in report.summary()

    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())
    assert manifest["model"]["precision"] == "int4"
    assert manifest["model"]["recipe"] == "ort-weight-int4"
    check = subprocess.run(
        [str(BIN / "edgeship-agent"), "check", str(tmp_path / "bundle")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert check.returncode == 0 and check.stdout.rstrip().endswith("ok"), check.stdout
    # the report's command (edgeship quantize --mode int4) writes the same model again
    assert made.reproduce is not None and "--mode int4" in made.reproduce, made.reproduce
    np.savez(tmp_path / "cal.npz", **{INPUT_NAME: digits_splits.x_cal})
    again = tmp_path / "again.onnx"
    argv = shlex.split(made.reproduce.replace("CALIBRATION.npz", str(tmp_path / "cal.npz")))
    argv[argv.index("-o") + 1] = str(again)
    assert argv[:2] == ["edgeship", "quantize"] and main(argv[1:]) == 0
    assert again.read_bytes() == made.artifact.path.read_bytes()
    assert main([*argv[1:], "--per-tensor"]) == 2  # an int8 option: one line, exit 2


def test_optimize_without_a_size_line_does_not_try_int4(
    mlp: ModelArtifact, digits_splits: Any, tmp_path: Path
) -> None:
    config = OptimizeConfig(budget=parse_budget("p95<=1000ms"), **{**FAST, "static_methods": ()})
    report = optimize(
        mlp.path,
        calibration={INPUT_NAME: digits_splits.x_cal},
        out=tmp_path / "bundle",
        config=config,
    )
    assert [c.name for c in report.candidates] == ["fp32"]
    assert WEIGHT_INT4 not in [s.name for s in report.skipped]


# --- LiteRT: int4 weights for a float .tflite -----------------------------------------------


@pytest.fixture(scope="module")
def float_tflite(
    trained_digits: tuple[Any, float], digits_splits: Any, tmp_path_factory: pytest.TempPathFactory
) -> ModelArtifact:
    pytest.importorskip("litert_torch")
    pytest.importorskip("ai_edge_quantizer")
    import torch

    model, _ = trained_digits
    return sdk.export(
        model,
        (torch.from_numpy(digits_splits.x_cal[:1]),),
        to="tflite",
        path=tmp_path_factory.mktemp("tflite") / "digits.tflite",
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
    )


@pytest.mark.slow
@pytest.mark.tflite
def test_a_float_tflite_lists_litert_int4_as_skipped_only_with_a_size_line(
    float_tflite: ModelArtifact,
) -> None:
    from sdk.optimize.stages.litert_tflite import RUNTIME_UNSAFE

    name = "litert-weight_only_wi4_afp32"
    recipes, skipped = default_registry().plan(_context(float_tflite, "size<=100KB"))
    reasons = {s.name: s.reason for s in skipped}
    assert reasons[name] == RUNTIME_UNSAFE["weight_only_wi4_afp32"]
    assert "cannot load" in reasons[name] and name not in [r.name for r in recipes]
    assert WEIGHT_INT4 in reasons  # an ONNX Runtime recipe, skipped: the model is a .tflite
    _, skipped = default_registry().plan(_context(float_tflite, "p95<=10ms"))
    assert name not in [s.name for s in skipped] and WEIGHT_INT4 not in [s.name for s in skipped]
    named = _context(float_tflite, "size<=100KB", litert_recipes=("weight_only_wi4_afp32",))
    assert [r.name for r in default_registry().plan(named)[0]] == ["fp32", name]


# Runs under tflite-runtime 2.14 (numpy<2): the model's logits for the images, or why it fails.
TFLITE_RUN = """
import json, sys
import numpy as np
from tflite_runtime.interpreter import Interpreter
x = np.load(sys.argv[2])["image"]
try:
    it = Interpreter(model_path=sys.argv[1], num_threads=1)
    it.allocate_tensors()
except RuntimeError as exc:
    print(json.dumps({"error": str(exc)}))
    raise SystemExit(0)
i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
rows = []
for one in x:
    it.set_tensor(i, one[None]); it.invoke(); rows.append(it.get_tensor(o)[0].tolist())
print(json.dumps({"logits": rows}))
"""


@pytest.mark.slow
@pytest.mark.tflite
@pytest.mark.board
def test_tflite_runtime_2_14_cannot_load_litert_int4_weights(
    float_tflite: ModelArtifact, digits_splits: Any, tmp_path: Path
) -> None:
    """The measured reason litert-weight_only_wi4_afp32 is kept out by default: the LiteRT of
    many Pi images refuses the model, while ai-edge-litert runs it with fp32's top-1."""
    from tests.script_modules import load_script

    board_envs = load_script("board_envs", ROOT / "scripts" / "board_envs.py")
    try:
        venv = Path(board_envs.tflite_venv())
    except board_envs.SetupError as exc:
        pytest.fail(f"board environment setup failed: {exc}", pytrace=False)
    x, y = digits_splits.x_test[:100], digits_splits.y_test[:100]
    int4 = sdk.quantize_tflite(
        float_tflite, None, tmp_path / "wi4.tflite", recipe="weight_only_wi4_afp32"
    )
    assert int4.precision == "int4" and int4.size_bytes < float_tflite.size_bytes / 4
    here = sdk.evaluate(int4, load_dataset({INPUT_NAME: x, "labels": y}, int4.io), batch_size=1)
    assert here.accuracy is not None and here.accuracy >= 0.93  # ai-edge-litert runs it

    feed = tmp_path / "x.npz"
    np.savez(feed, image=x)
    script = tmp_path / "run.py"
    script.write_text(TFLITE_RUN)
    python = str(board_envs.venv_python(venv))
    results = {}
    for model in (float_tflite.path, int4.path):
        proc = subprocess.run(
            [python, str(script), str(model), str(feed)],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=tmp_path,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        results[model] = json.loads(proc.stdout.strip().splitlines()[-1])
    float_top1 = np.argmax(results[float_tflite.path]["logits"], axis=1)
    assert (float_top1 == y).mean() >= 0.93  # the float model runs there
    assert "DEQUANTIZE" in results[int4.path]["error"], results[int4.path]


@pytest.mark.tflite
def test_quantize_mode_int4_refuses_a_tflite_and_names_its_int4_recipe(
    float_tflite: ModelArtifact, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "q.tflite"
    assert main(["quantize", str(float_tflite.path), "--mode", "int4", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--recipe weight_only_wi4_afp32" in err and "Traceback" not in err
    assert not out.exists()
