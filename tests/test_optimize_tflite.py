"""A float .tflite through the main path (issue 13, item 1): ``edgeship optimize`` makes LiteRT
candidates with ai-edge-quantizer, lists the ONNX Runtime recipes as skipped, chooses by the
unchanged rule and bundles the chosen .tflite with its outlier detector; ``edgeship-agent
check`` and the in-process Agent (ai-edge-litert) run the bundle. ``edgeship quantize`` takes a
.tflite too. The model is the digits CNN trained on scikit-learn's digits (tests/conftest.py),
exported to TFLite with litert-torch.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import sdk
from device_agent import Agent, AgentConfig
from sdk.cli.app import main
from sdk.data import load_dataset
from sdk.optimize.stages.litert_tflite import TFLITE_RECIPES

pytestmark = pytest.mark.tflite
pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")
pytest.importorskip("ai_edge_quantizer")

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
LITERT = ["litert-static_wi8_ai8", "litert-weight_only_wi8_afp32"]
UNSAFE = "runs its models without an error but computes wrong outputs"
ONNX_SKIP = "the model is a .tflite: ONNX Runtime recipes need an ONNX model"
FAST = ["--runs", "20", "--seconds", "0.2"]

# Runs in a Python of the tflite-runtime venv and of .venv: the bundle in an Agent, one image
# at a time (as a board is fed); top-1 and outlier flags as JSON.
AGENT_PREDICT = """
import json, sys
import numpy as np
from device_agent import Agent, AgentConfig

x = np.load(sys.argv[2])["image"]
config = AgentConfig(device_id="tfl", fleet="lab", state_dir=sys.argv[3])
with Agent.from_bundle(sys.argv[1], config) as agent:
    seen = [agent.predict({"image": one[None]}) for one in x]
print(json.dumps({
    "numpy": np.__version__,
    "top1": [int(np.argmax(r.outputs[0])) for r in seen],
    "outlier": [bool(r.is_outlier[0]) for r in seen],
}))
"""


@pytest.fixture(scope="module")
def float_tflite(
    trained_digits: tuple[Any, float], digits_splits: Any, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The trained digits CNN as a float .tflite (batch 1, as litert-torch exports it)."""
    import torch

    from sdk.zoo.digits import INPUT_NAME, OUTPUT_NAME

    model, _ = trained_digits
    art = sdk.export(
        model,
        (torch.from_numpy(digits_splits.x_cal[:1]),),
        to="tflite",
        path=tmp_path_factory.mktemp("tflite") / "digits.tflite",
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
    )
    return Path(art.path)


@pytest.fixture(scope="module")
def optimized(
    float_tflite: Path, digits_npz: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any], str]:
    """``edgeship optimize`` on the float .tflite: (bundle, JSON report, what it printed). The
    size line rules fp32 (284 KiB) out, so the bundle holds a quantized .tflite."""
    root = tmp_path_factory.mktemp("optimized")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(
            [
                *("optimize", str(float_tflite), "--calibration", str(digits_npz["calibration"])),
                *("--eval", str(digits_npz["eval"]), "--budget", "drop<=1%,size<=100KB", *FAST),
                *("-o", str(root / "bundle"), "--json", str(root / "report.json")),
            ]
        )
    assert code == 0, printed.getvalue()
    report = json.loads((root / "report.json").read_text())
    return root / "bundle", report, printed.getvalue()


def test_optimize_a_float_tflite_makes_litert_candidates_and_bundles_the_choice(
    optimized: tuple[Path, dict[str, Any], str],
) -> None:
    bundle, report, out = optimized
    made = {c["name"]: c for c in report["candidates"]}
    assert list(made) == ["fp32", *LITERT], out
    assert all(c["error"] is None for c in made.values()), out
    skipped = {s["name"]: s["reason"] for s in report["skipped"]}
    for name in ("litert-dynamic_wi8_afp32", "litert-dynamic_wi4_afp32"):
        assert UNSAFE in skipped.pop(name), skipped
    assert "cannot load its models" in skipped.pop("litert-weight_only_wi4_afp32"), skipped
    assert skipped == {
        "ort-static-int8-minmax": ONNX_SKIP,
        "ort-static-int8-accuracy-aware": ONNX_SKIP,
        "ort-dynamic-int8": ONNX_SKIP,
        "ort-weight-int4": ONNX_SKIP,
        "fp16": ONNX_SKIP,
    }
    assert f"ort-dynamic-int8               skipped: {ONNX_SKIP}" in out
    assert made["fp32"]["quality"]["accuracy"] > 0.95
    for name in LITERT:  # evaluated against the float model, on the eval data
        assert made[name]["quality"]["agreement"] is not None, name
        assert made[name]["accuracy_drop"] is not None and made[name]["latency_ms"], name
        # ... and each says how to make it again.
        again = made[name]["reproduce"]
        assert again.startswith("edgeship quantize ") and f"--recipe {name[7:]}" in again, again
    # int8 weights are smaller than float ones.
    size = {n: c["size_bytes"] for n, c in made.items()}
    assert size["litert-static_wi8_ai8"] < size["fp32"] / 3

    # The rule: the lowest p95 among the candidates that meet every line.
    passing = [c for c in made.values() if c["meets_budget"]]
    assert made["fp32"] not in passing and passing, out
    chosen = made[report["chosen"]]
    assert report["meets_budget"] and chosen in passing
    p95 = {c["name"]: c["latency_ms"]["p95"] for c in passing}
    assert chosen["latency_ms"]["p95"] == min(p95.values()), p95
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["file"] == "model.tflite"
    assert manifest["model"]["runtime"] == "litert"
    assert manifest["model"]["recipe"] == chosen["recipe"]
    assert manifest["model"]["precision"] == chosen["precision"]
    assert (bundle / "model.tflite").stat().st_size == chosen["size_bytes"]
    assert manifest["detector"]["kind"] == "combined", manifest["detector"]
    assert "note: outlier detector combined" in out


def test_the_tflite_bundle_checks_and_predicts_on_ai_edge_litert(
    optimized: tuple[Path, dict[str, Any], str], digits_splits: Any, tmp_path: Path
) -> None:
    bundle = optimized[0]
    check = _agent_check(BIN / "edgeship-agent", bundle, tmp_path)
    assert "runtime    litert ai-edge-litert" in check, check
    assert "outputs logits (1, 10)" in check

    digits, labels = digits_splits.x_test[:40], digits_splits.y_test[:40]
    config = AgentConfig(device_id="tfl-1", fleet="lab", state_dir=tmp_path / "state")
    with Agent.from_bundle(bundle, config) as agent:
        seen = [agent.predict({"image": d[None]}) for d in digits]
        wild = [agent.predict({"image": n[None]}) for n in _noise(digits)]
    top1 = np.array([int(np.argmax(r.outputs[0])) for r in seen])
    assert (top1 == labels).mean() >= 0.9
    flagged = [bool(r.is_outlier[0]) for r in seen if r.is_outlier is not None]
    assert len(flagged) == len(seen) and sum(flagged) <= 2
    assert all(r.is_outlier is not None and r.is_outlier[0] for r in wild)


@pytest.mark.slow
@pytest.mark.board
def test_tflite_bundles_run_on_tflite_runtime_with_numpy_1(
    optimized: tuple[Path, dict[str, Any], str],
    float_tflite: Path,
    digits_npz: dict[str, Path],
    digits_splits: Any,
    tmp_path: Path,
) -> None:
    """The chosen bundle, detector included, predicts under tflite-runtime 2.14 (numpy<2) what
    it predicts under ai-edge-litert; every default recipe's model loads and runs there."""
    from tests.script_modules import load_script

    board_envs = load_script("board_envs", ROOT / "scripts" / "board_envs.py")
    try:
        venv = Path(board_envs.tflite_venv())
    except board_envs.SetupError as exc:
        pytest.fail(f"board environment setup failed: {exc}", pytrace=False)
    bundle = optimized[0]
    check = _agent_check(venv / "bin" / "edgeship-agent", bundle, tmp_path)
    assert "runtime    litert tflite-runtime 2.14.0" in check and ", numpy 1." in check, check

    digits = digits_splits.x_test[:40]
    feed = tmp_path / "feed.npz"
    np.savez(feed, image=np.concatenate([digits, _noise(digits)]))
    script = tmp_path / "predict.py"
    script.write_text(AGENT_PREDICT)
    old = _run_json(board_envs.venv_python(venv), script, bundle, feed, tmp_path / "old")
    new = _run_json(Path(sys.executable), script, bundle, feed, tmp_path / "new")
    assert old["numpy"].startswith("1.") and not new["numpy"].startswith("1.")
    agreement = np.mean(np.equal(old["top1"], new["top1"]))
    assert agreement >= 0.95, (old["top1"], new["top1"])
    assert old["outlier"][40:] == [True] * 5 and sum(old["outlier"][:40]) <= 2, old["outlier"]

    for recipe in TFLITE_RECIPES:
        model = sdk.quantize_tflite(
            float_tflite, digits_npz["calibration"], tmp_path / f"{recipe}.tflite", recipe=recipe
        )
        one = sdk.package(model, tmp_path / f"bundle-{recipe}", name=recipe)
        check = _agent_check(venv / "bin" / "edgeship-agent", one.root, tmp_path)
        assert "outputs logits (1, 10)" in check, (recipe, check)
        # ... and computes there what ai-edge-litert computes (the dynamic-range recipes,
        # left out of the defaults, do not: tflite-runtime 2.14 predicts one class for all).
        there = _run_json(board_envs.venv_python(venv), script, one.root, feed, tmp_path / recipe)
        here = _run_json(Path(sys.executable), script, one.root, feed, tmp_path / f"{recipe}-h")
        assert np.mean(np.equal(there["top1"], here["top1"])) >= 0.95, (recipe, there, here)


def test_optimize_without_calibration_skips_static_int8_with_a_note(
    float_tflite: Path, digits_npz: dict[str, Path], tmp_path: Path
) -> None:
    config = sdk.OptimizeConfig(min_runs=20, min_seconds=0.2, confirm_rounds=0)
    report = sdk.optimize(
        float_tflite, eval_data=digits_npz["eval"], out=tmp_path / "b", config=config
    )
    assert [c.name for c in report.candidates] == ["fp32", *LITERT[1:]]
    skipped = {s.name: s.reason for s in report.skipped}
    assert skipped["litert-static_wi8_ai8"].startswith("no calibration data")
    assert skipped["ort-dynamic-int8"] == ONNX_SKIP and "ort-static-int8-minmax" not in skipped
    assert "no calibration data: static int8 was not tried (pass --calibration)" in report.notes
    assert (tmp_path / "b" / "model.tflite").is_file()


def test_quantize_cli_quantizes_a_tflite_with_ai_edge_quantizer(
    float_tflite: Path,
    digits_npz: dict[str, Path],
    digits_splits: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "int8.tflite"
    code = main(
        [
            *("quantize", str(float_tflite), "--calibration", str(digits_npz["calibration"])),
            *("-o", str(out)),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert f"wrote {out} (litert-static_wi8_ai8, int8)" in printed
    assert "check vs fp32 on 16 calibration samples" in printed and "(ok)" in printed
    int8 = sdk.read_artifact(out)
    assert int8.format == "tflite" and int8.size_bytes < float_tflite.stat().st_size / 3
    quality = sdk.evaluate(int8, load_dataset(digits_npz["eval"], int8.io))
    assert quality.accuracy is not None and quality.accuracy > 0.95

    # Without calibration data the default static recipe is refused with the way out.
    assert main(["quantize", str(float_tflite), "-o", str(tmp_path / "x.tflite")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--recipe weight_only_wi8_afp32" in err[0], err


@pytest.mark.parametrize("command", ["optimize", "quantize"])
def test_a_corrupt_tflite_is_one_line_and_exit_2(
    command: str,
    digits_npz: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(np.random.default_rng(0).bytes(300))
    code = main(
        [
            *(command, str(bad), "--calibration", str(digits_npz["calibration"])),
            *("-o", str(tmp_path / ("out" if command == "optimize" else "out.tflite"))),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [
        "edgeship: error: LiteRT cannot load bad.tflite: The model is not a valid Flatbuffer buffer"
    ], err


def _noise(digits: np.ndarray) -> np.ndarray:
    """Five images of uniform noise in [0, 10): far outside the digits' [0, 1] pixels."""
    rng = np.random.default_rng(0)
    return rng.uniform(0, 10, size=(5, *digits.shape[1:])).astype(np.float32)


def _agent_check(agent: Path, bundle: Path, cwd: Path) -> str:
    """``edgeship-agent check BUNDLE``'s output; it must pass."""
    proc = subprocess.run(
        [str(agent), "check", str(bundle)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        check=False,
    )
    assert proc.returncode == 0 and proc.stdout.rstrip().endswith("ok"), proc.stdout + proc.stderr
    return proc.stdout


def _run_json(python: Path, script: Path, *args: Path) -> dict[str, Any]:
    """Run ``script`` with ``python`` from its own folder (outside the checkout, so the venv's
    installed device_agent is the one imported); its last line, as JSON."""
    proc = subprocess.run(
        [str(python), str(script), *(str(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=script.parent,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result
