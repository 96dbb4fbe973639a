"""A float .tflite through the main path (issue 13, item 1): ``edgeship optimize`` makes LiteRT
candidates with ai-edge-quantizer, lists the ONNX Runtime recipes as skipped, chooses by the
unchanged rule and bundles the chosen .tflite with its outlier detector; ``edgeship-agent
check`` and the in-process Agent (ai-edge-litert) run the bundle. ``edgeship quantize`` takes a
.tflite too. The model is the digits CNN trained on scikit-learn's digits (tests/conftest.py),
exported to TFLite with litert-torch.
"""

from __future__ import annotations

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

pytestmark = pytest.mark.tflite
pytest.importorskip("litert_torch")
pytest.importorskip("ai_edge_litert")
pytest.importorskip("ai_edge_quantizer")

BIN = Path(sys.executable).parent
LITERT = [
    "litert-static_wi8_ai8",
    "litert-dynamic_wi8_afp32",
    "litert-weight_only_wi8_afp32",
    "litert-dynamic_wi4_afp32",
]
ONNX_SKIP = "the model is a .tflite: ONNX Runtime recipes need an ONNX model"
FAST = ["--runs", "20", "--seconds", "0.2"]


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


def test_optimize_a_float_tflite_bundles_a_litert_choice_the_agent_runs(
    float_tflite: Path,
    digits_npz: dict[str, Path],
    digits_splits: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bundle = tmp_path / "bundle"
    report_path = tmp_path / "report.json"
    code = main(
        [
            *("optimize", str(float_tflite), "--calibration", str(digits_npz["calibration"])),
            *("--eval", str(digits_npz["eval"]), "--budget", "drop<=1%", *FAST),
            *("-o", str(bundle), "--json", str(report_path)),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads(report_path.read_text())
    made = {c["name"]: c for c in report["candidates"]}
    assert list(made) == ["fp32", *LITERT], out
    assert all(c["error"] is None for c in made.values()), out
    skipped = {s["name"]: s["reason"] for s in report["skipped"]}
    assert skipped == {
        "ort-static-int8-minmax": ONNX_SKIP,
        "ort-static-int8-accuracy-aware": ONNX_SKIP,
        "ort-dynamic-int8": ONNX_SKIP,
        "fp16": ONNX_SKIP,
    }
    fp32 = made["fp32"]
    assert fp32["quality"]["accuracy"] > 0.95
    for name in LITERT:  # evaluated against the float model, on the eval data
        assert made[name]["quality"]["agreement"] is not None, name
        assert made[name]["accuracy_drop"] is not None and made[name]["latency_ms"], name
    # int4 weights are smaller than int8 weights, which are smaller than float ones.
    size = {n: c["size_bytes"] for n, c in made.items()}
    assert size["litert-dynamic_wi4_afp32"] < size["litert-static_wi8_ai8"] < size["fp32"] / 3

    chosen = made[report["chosen"]]
    assert report["meets_budget"] and chosen["accuracy_drop"] <= 0.01
    if report["chosen"] != "fp32":  # never slower than fp32 in the alternating re-runs
        assert np.median(chosen["confirm_p95_ms"]) <= np.median(fp32["confirm_p95_ms"])
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["model"]["file"] == "model.tflite"
    assert manifest["model"]["runtime"] == "litert"
    expected_recipe = "fp32" if report["chosen"] == "fp32" else report["chosen"]
    assert manifest["model"]["recipe"] == expected_recipe
    assert manifest["detector"]["kind"] == "combined", manifest["detector"]
    assert "note: outlier detector combined" in out

    check = subprocess.run(
        [str(BIN / "edgeship-agent"), "check", str(bundle)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "runtime    litert ai-edge-litert" in check.stdout, check.stdout
    assert "outputs logits (1, 10)" in check.stdout

    digits, labels = digits_splits.x_test[:40], digits_splits.y_test[:40]
    rng = np.random.default_rng(0)
    noise = rng.uniform(0, 10, size=(5, *digits.shape[1:])).astype(np.float32)
    config = AgentConfig(device_id="tfl-1", fleet="lab", state_dir=tmp_path / "state")
    with Agent.from_bundle(bundle, config) as agent:
        seen = [agent.predict({"image": d[None]}) for d in digits]
        wild = [agent.predict({"image": n[None]}) for n in noise]
    top1 = np.array([int(np.argmax(r.outputs[0])) for r in seen])
    assert (top1 == labels).mean() >= 0.9
    flagged = [bool(r.is_outlier[0]) for r in seen if r.is_outlier is not None]
    assert len(flagged) == len(seen) and sum(flagged) <= 2
    assert all(r.is_outlier is not None and r.is_outlier[0] for r in wild)


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
    assert len(err) == 1 and "--recipe dynamic_wi8_afp32" in err[0], err


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
