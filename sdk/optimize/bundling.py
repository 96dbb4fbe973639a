"""What goes into the bundle next to the chosen model: its outlier detector, fitted on the
calibration data; the reference statistics a collector compares the fleet with (drift); the
int8 outlook note for the target; and the candidate's measurements as the bundle's benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from device_agent.contracts.bundle import DetectorSpec
from sdk.artifact import ModelArtifact
from sdk.data import Dataset
from sdk.errors import EdgeshipError
from sdk.optimize.config import OptimizeConfig
from sdk.optimize.report import Candidate
from sdk.targets import TargetProfile

if TYPE_CHECKING:
    pass
from sdk.optimize.stages.ort_dynamic import DYNAMIC


def write_reference(
    cfg: OptimizeConfig,
    data: Dataset | None,
    model: ModelArtifact,
    detector: tuple[DetectorSpec, Path] | None,
    work: Path,
    notes: list[str],
) -> Path | None:
    """The reference statistics a collector compares the fleet's predictions and outlier
    scores with (drift), from in-distribution data through the chosen model and detector."""
    from sdk.reference import reference_stats, write_reference

    if data is None:
        return None
    # Dynamic int8 scales activations per batch: count at batch 1, as the board runs it.
    batch = 1 if model.recipe.startswith(DYNAMIC) else 256
    try:
        stats = reference_stats(
            model.path,
            detector,
            data,
            cfg.labels,
            model=cfg.name,
            model_version=cfg.version,
            batch_size=batch,
        )
    except EdgeshipError as exc:
        notes.append(f"no reference statistics for drift: {exc}")
        return None
    return write_reference(work / "reference.json", stats)


def isa_note(target: TargetProfile) -> str | None:
    from sdk.isa import int8_outlook

    try:
        outlook = int8_outlook(target)
    except EdgeshipError:
        return None
    return f"int8 outlook on {target.name}: {outlook.reason}"


def fit_detector(
    cfg: OptimizeConfig, cal: Dataset, model: ModelArtifact, work: Path, notes: list[str]
) -> tuple[DetectorSpec, Path] | None:
    """Fit the configured detector on the calibration data, or explain in a note why not."""
    from sdk.detect import DetectorOptions, default_detector, fit_detector

    if cfg.detector is None or cfg.detector == "none":
        return None
    if cal.constants:
        notes.append(
            f"no outlier detector: the model takes scalar inputs ({', '.join(cal.constants)}), "
            "which the detectors do not handle yet"
        )
        return None
    if cfg.detector == "auto":
        choice = default_detector(model.io)
        if choice is None:
            notes.append(
                "no outlier detector: the model has no float input or embedding "
                "output to watch (choose one with --detector)"
            )
            return None
        kind, options = choice.kind, choice.options
    else:
        kind, options = cfg.detector, DetectorOptions()
    # A model with a fixed batch axis (a .tflite export: batch 1) runs in batches of that size.
    try:
        spec, path = fit_detector(
            kind,
            cal,
            model,
            target_fpr=cfg.outlier_fpr,
            options=options,
            out=work / "detector.npz",
            batch_size=model.io.fixed_batch or 256,
        )
    except EdgeshipError as exc:
        notes.append(f"no outlier detector: fitting {kind} failed: {exc}")
        return None
    measured = spec.options.get("fpr_holdout")
    extra = "" if measured is None else f", {float(measured):.1%} on held-out calibration data"
    notes.append(
        f"outlier detector {kind}: threshold {spec.threshold:.4g} for a target "
        f"false-positive rate of {cfg.outlier_fpr:.1%}{extra}"
    )
    return spec, path


def bundle_benchmark(c: Candidate) -> dict[str, Any]:
    data = c.to_dict()
    data.pop("path", None)
    return data
