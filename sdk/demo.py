"""``edgeship demo``: the host pipeline end to end on scikit-learn's bundled digits.

Train (or reuse) a small CNN, export it to ONNX, write calibration and eval data, optimize under
a Raspberry Pi budget and bundle the choice. Every artifact lands in the work directory so a
newcomer can look at each one, and a second run reuses the trained model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["prepare_digits", "run_host_demo"]


def prepare_digits(workdir: Path, *, seed: int = 0) -> dict[str, Path]:
    """Train and export the digits CNN into ``workdir`` unless already there.

    Returns the paths of ``model`` (fp32 ONNX), ``calibration`` and ``eval`` (.npz).
    """
    from sdk.zoo.digits import INPUT_NAME, OUTPUT_NAME, load_digits_splits

    workdir.mkdir(parents=True, exist_ok=True)
    onnx_path = workdir / "digits.onnx"
    cal_path = workdir / "calibration.npz"
    eval_path = workdir / "eval.npz"
    info_path = workdir / "digits.json"
    splits = load_digits_splits(seed)
    if not (onnx_path.is_file() and info_path.is_file()):
        import torch

        from sdk.export import export
        from sdk.zoo.digits import train_digits_cnn

        print("training a CNN on scikit-learn's bundled digits (about 10 s)...", flush=True)
        start = time.perf_counter()
        model, acc = train_digits_cnn(splits, seed=seed)
        print(f"  fp32 test accuracy {acc:.2%} ({time.perf_counter() - start:.1f} s)")
        art = export(
            model,
            (torch.from_numpy(splits.x_cal[:4]),),
            to="onnx",
            path=onnx_path,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
        )
        print(f"  exported {art.path} (max |onnx - torch| = {art.details.get('max_abs_diff')})")
        info_path.write_text(json.dumps({"fp32_test_accuracy": acc, "seed": seed}) + "\n")
    else:
        print(f"reusing the trained model in {onnx_path}")
    cal: dict[str, Any] = {INPUT_NAME: splits.x_cal}
    evaluation: dict[str, Any] = {INPUT_NAME: splits.x_test, "labels": splits.y_test}
    np.savez(cal_path, **cal)
    np.savez(eval_path, **evaluation)
    return {"model": onnx_path, "calibration": cal_path, "eval": eval_path}


def run_host_demo(workdir: Path, *, target: str = "rpi4", budget: str = "") -> int:
    """Run the host demo; return the CLI exit code (0 when the budget is met)."""
    from sdk.budget import parse_budget
    from sdk.optimize import OptimizeConfig, optimize
    from sdk.targets import get_target

    parsed = parse_budget(budget)
    profile = get_target(target)
    files = prepare_digits(workdir)
    print(f"optimizing for {profile.description} under budget {parsed.describe()}...", flush=True)
    report = optimize(
        files["model"],
        calibration=files["calibration"],
        eval_data=files["eval"],
        out=workdir / "bundle",
        config=OptimizeConfig(
            target=profile,
            budget=parsed,
            name="digits-cnn",
            labels=tuple(str(i) for i in range(10)),
            min_seconds=1.0,
        ),
        progress=True,
    )
    print(report.summary())
    report_path = workdir / "report.json"
    report_path.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    print(f"\nreport: {report_path}\nnext: edgeship inspect {report.bundle}")
    return 0 if report.meets_budget else 1
