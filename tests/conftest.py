"""Shared fixtures: a digits CNN trained once per test session, and its ONNX export."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

# CI runs on a 2-core machine that may be busy: how fast Hypothesis generates data or runs an
# example says nothing about the code, so neither may fail a test. Loaded here, before the test
# modules' own @settings, which inherit it (a test naming its own health checks lists too_slow).
settings.register_profile("edgeship", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("edgeship")


@pytest.fixture(scope="session")
def digits_splits() -> Any:
    from sdk.zoo.digits import load_digits_splits

    return load_digits_splits(seed=0)


@pytest.fixture(scope="session")
def trained_digits(digits_splits: Any) -> tuple[Any, float]:
    """(model, fp32 test accuracy) of the digits CNN, trained once for the whole session."""
    import torch

    from sdk.zoo.digits import train_digits_cnn

    # One thread trains this small CNN several times faster than torch's default on a busy
    # 2-core machine (thread contention), and the weights do not depend on it.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_digits_cnn(digits_splits, seed=0)
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def digits_onnx(
    trained_digits: tuple[Any, float], digits_splits: Any, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """The trained digits CNN exported to ONNX through ``sdk.export`` (a ModelArtifact)."""
    import torch

    import sdk
    from sdk.zoo.digits import INPUT_NAME, OUTPUT_NAME

    model, _ = trained_digits
    out = tmp_path_factory.mktemp("digits") / "digits.onnx"
    example = torch.from_numpy(digits_splits.x_cal[:4])
    return sdk.export(
        model, (example,), to="onnx", path=out, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME]
    )


@pytest.fixture(scope="session")
def digits_npz(digits_splits: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """calibration and eval .npz files keyed by the model's input name (eval has labels)."""
    from sdk.zoo.digits import INPUT_NAME

    root = tmp_path_factory.mktemp("digits-data")
    cal = root / "cal.npz"
    ev = root / "eval.npz"
    np.savez(cal, **{INPUT_NAME: digits_splits.x_cal})
    np.savez(ev, **{INPUT_NAME: digits_splits.x_test, "labels": digits_splits.y_test})
    return {"calibration": cal, "eval": ev}


@pytest.fixture(scope="session")
def digits_bundle(
    digits_onnx: Any, digits_splits: Any, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A bundle of the fp32 digits CNN with its default (combined) outlier detector."""
    from sdk.detect import default_detector, fit_detector
    from sdk.package import package
    from sdk.zoo.digits import INPUT_NAME

    root = tmp_path_factory.mktemp("digits-bundle")
    choice = default_detector(digits_onnx.io)
    assert choice is not None
    detector = fit_detector(
        choice.kind,
        {INPUT_NAME: digits_splits.x_cal},
        digits_onnx,
        target_fpr=0.05,
        options=choice.options,
        out=root / "det.npz",
    )
    bundle = package(
        digits_onnx,
        root / "bundle",
        name="digits-cnn",
        version="1",
        labels=[str(i) for i in range(10)],
        detector=detector,
    )
    return bundle.root


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's headless chromium (installed with apt-get when missing and we are root)."""
    from tests.browser import chromium_path

    return chromium_path()
