"""``edgeship demo``: the host pipeline end to end on scikit-learn's bundled digits.

Train (or reuse) a small CNN, export it to ONNX, write calibration and eval data, optimize under
a Raspberry Pi budget, bundle the choice and sign the bundle with an Ed25519 key kept in the
work directory (``keys/``); the fleet's agents only accept bundles signed by that key. Every
artifact lands in the work directory so a newcomer can look at each one, and a second run
reuses the trained model and the key. The fleet that runs the bundle afterwards is
:mod:`sdk.demo_fleet`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DEMO_KEY_NAME", "demo_signing_key", "prepare_digits", "run_host_demo"]

DEMO_KEY_NAME = "demo-signing"


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
        # One thread: this small CNN trains fastest that way, above all on a busy machine.
        torch.set_num_threads(1)
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


def demo_signing_key(workdir: Path) -> tuple[Path, Path, str]:
    """The demo's Ed25519 key pair under ``workdir/keys``: ``(private, public, key id)``.

    Generated on the first run; a later run reuses the private key (and rewrites the public
    file from it when that is missing or does not match), so the agents' trusted key stays the
    same across runs.
    """
    from cryptography.hazmat.primitives import serialization

    from device_agent.signing import fingerprint, load_private_key
    from sdk.signing import generate_signing_key

    keys = workdir / "keys"
    private = keys / f"{DEMO_KEY_NAME}.pem"
    public = keys / f"{DEMO_KEY_NAME}.pub.pem"
    if not private.exists():
        public.unlink(missing_ok=True)  # a public key without its private key is useless here
        generated = generate_signing_key(keys, DEMO_KEY_NAME)
        return generated.private, public, generated.key_id
    key = load_private_key(private).public_key()
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if not public.is_file() or public.read_bytes() != pem:
        public.write_bytes(pem)
    return private, public, fingerprint(key)


def run_host_demo(workdir: Path, *, target: str = "rpi4", budget: str = "") -> int:
    """Run the host demo; return the CLI exit code (0 when the budget is met).

    The bundle (``workdir/bundle``) is signed with :func:`demo_signing_key`."""
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
    if (workdir / "bundle" / "manifest.json").is_file():
        from sdk.signing import sign_bundle

        private, public, _ = demo_signing_key(workdir)
        _, signed_by = sign_bundle(workdir / "bundle", private)
        print(
            f"\nsigned the bundle with Ed25519 key {signed_by}\n  private key {private}\n"
            f"  public key {public} (the agents' trusted key)"
        )
    report_path = workdir / "report.json"
    report_path.write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    print(f"\nreport: {report_path}\nnext: edgeship inspect {report.bundle}")
    return 0 if report.meets_budget else 1
