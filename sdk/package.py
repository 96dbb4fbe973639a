"""Packaging a chosen model as a bundle directory (see ``docs/bundle.md``).

The bundle is written into a temporary sibling directory and renamed into place, so a reader
never sees half a bundle, and an existing directory is only replaced when it is itself a
bundle (or empty): edgeship never deletes files it did not write.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from device_agent.bundle import Bundle, load_bundle, sha256_file
from device_agent.contracts.bundle import (
    MANIFEST_NAME,
    DetectorSpec,
    IOSpec,
    Manifest,
    ModelInfo,
)
from device_agent.contracts.shapes import MAX_TENSOR_ELEMENTS, parse_sample_shape
from device_agent.errors import BundleError
from device_agent.signing import SIGNATURE_NAME
from sdk.artifact import ModelArtifact
from sdk.budget import Budget
from sdk.errors import ConfigError

__all__ = ["package", "tool_versions"]

_TOOL_DISTS = (
    "edgeship",
    "numpy",
    "onnx",
    "onnxruntime",
    "torch",
    "ai-edge-litert",
    "litert-torch",
    "ai-edge-quantizer",
    "tflite-runtime",
    "scikit-learn",
)


def tool_versions() -> dict[str, str]:
    """Versions of the installed tools that can take part in making a bundle."""
    from importlib import metadata

    found: dict[str, str] = {}
    for dist in _TOOL_DISTS:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


def package(
    model: ModelArtifact,
    out_dir: str | Path,
    *,
    name: str = "model",
    version: str = "1",
    labels: Sequence[str] | None = None,
    preprocessing: Mapping[str, Any] | None = None,
    budget: Budget | None = None,
    benchmark: Mapping[str, Any] | None = None,
    detector: tuple[DetectorSpec, Path] | None = None,
    reference: Path | None = None,
    extra_files: Mapping[str, Path] | None = None,
    overwrite: bool = True,
    detector_in_graph: bool = True,
    samples: Mapping[str, Any] | None = None,
) -> Bundle:
    """Write ``model`` and its manifest into the bundle directory ``out_dir``.

    ``detector`` is ``(spec, params_path)``; ``reference`` a JSON file of reference statistics;
    ``benchmark`` the (JSON-serialisable) report that justified the choice; ``samples`` the
    calibration data (its shapes give ``sample_shape``). Returns the bundle as loaded, verified.

    With ``detector_in_graph`` (the default) and an ONNX model, the detector is also merged
    into the bundled model as an extra output (``sdk.detector_graph``), so the agent gets the
    score from the same ``session.run`` as the outputs; the manifest names that output in
    ``detector.graph_output``. When the detector has no graph form, the bundle keeps numpy
    scoring and ``detector.options["graph_output_skipped"]`` says why.
    """
    if model.format not in ("onnx", "tflite"):
        raise ConfigError(f"only ONNX and TFLite models can be bundled, not {model.format}")
    out = Path(out_dir)
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)

    model_file = "model.onnx" if model.format == "onnx" else "model.tflite"
    io = _with_sample_shapes(_with_labels(model.io, labels), samples)
    taken = {model_file, MANIFEST_NAME, SIGNATURE_NAME, "reference.json"}
    if detector is not None:
        taken.add(detector[0].params_file)
    clash = sorted(taken & set(extra_files or {}))
    if clash:
        raise ConfigError(f"extra_files {clash}: these names belong to the bundle itself")
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        det_spec = None
        merged = False
        source = model.path
        if model.format == "onnx":
            # The weights go inside model.onnx: the agent runs only what it verified, and
            # ONNX Runtime would read an external data file by itself.
            source = inline_external_data(model.path, staging / ".inlined.onnx")
        if detector is not None:
            det_spec, det_path = detector
            shutil.copyfile(det_path, staging / det_spec.params_file)
            if detector_in_graph and model.format == "onnx":
                det_spec, merged = _merge_detector(source, det_spec, det_path, staging)
        if not merged:
            shutil.copyfile(source, staging / model_file)
        if source != model.path:
            source.unlink()
        ref_name = None
        if reference is not None:
            ref_name = "reference.json"
            shutil.copyfile(reference, staging / ref_name)
        for rel, src in (extra_files or {}).items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, staging / rel)
        files = {
            p.relative_to(staging).as_posix(): sha256_file(p)
            for p in sorted(staging.rglob("*"))
            if p.is_file()
        }
        manifest = Manifest(
            model=ModelInfo(
                name=name,
                version=version,
                file=model_file,
                runtime="onnxruntime" if model.format == "onnx" else "litert",
                precision=model.precision,
                recipe=model.recipe,
            ),
            io=io,
            files=files,
            tools=tool_versions(),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            preprocessing=preprocessing,
            detector=det_spec,
            reference_file=ref_name,
            budget=None if budget is None else budget.to_dict(),
            benchmark=None if benchmark is None else _jsonable(benchmark),
        )
        # Round-trip through the decoder so a bundle we write is always one we can read.
        Manifest.from_json(manifest.to_json())
        (staging / MANIFEST_NAME).write_text(manifest.to_json())
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_bundle(out)


def inline_external_data(path: Path, scratch: Path) -> Path:
    """``path`` itself when the ONNX model holds all its tensors, else ``scratch``: the model
    with its external data files read in (ConfigError when it cannot be, in one line)."""
    from device_agent.onnx_scan import external_data_refs

    try:
        refs = external_data_refs(path.read_bytes(), name=path.name)
    except BundleError as exc:
        raise ConfigError(f"cannot package {path}: {exc}") from exc
    if not refs:
        return path
    import onnx

    try:
        # load_external_data resolves each location next to the model, as ONNX Runtime does.
        proto = onnx.load(str(path), load_external_data=True)
        from onnx.external_data_helper import convert_model_from_external_data

        convert_model_from_external_data(proto)
        onnx.save(proto, str(scratch))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise ConfigError(
            f"cannot package {path}: its tensor {refs[0].tensor!r} is in the external data "
            f"file {refs[0].location!r}, which cannot be read into the model ({exc}); a bundle's "
            "ONNX model must hold its weights (the protobuf limit is 2 GiB)"
        ) from exc
    return scratch


def _merge_detector(
    model_path: Path, spec: DetectorSpec, params_path: Path, staging: Path
) -> tuple[DetectorSpec, bool]:
    """Write ``staging/model.onnx`` with the detector's score as an extra output, if it can."""
    from device_agent.detectors import load_detector
    from sdk.detector_graph import SCORE_OUTPUT, NotExportable, merge_detector

    try:
        merge_detector(model_path, load_detector(spec, params_path), staging / "model.onnx")
    except NotExportable as exc:
        (staging / "model.onnx").unlink(missing_ok=True)
        options = {**spec.options, "graph_output_skipped": str(exc)}
        return replace(spec, options=options), False
    return replace(spec, graph_output=SCORE_OUTPUT), True


def _check_target(out: Path, overwrite: bool) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ConfigError(f"{out} exists and is a file; choose a directory for the bundle")
    entries = list(out.iterdir())
    if not entries:
        return
    if not (out / MANIFEST_NAME).is_file():
        raise ConfigError(
            f"{out} is a non-empty directory that is not a bundle; refusing to overwrite it "
            "(choose a new directory)"
        )
    if not overwrite:
        raise ConfigError(f"bundle {out} already exists; pass overwrite=True to replace it")


def _swap_into_place(staging: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)


def _with_labels(io: IOSpec, labels: Sequence[str] | None) -> IOSpec:
    if labels is None:
        return io
    first = io.outputs[0]
    return replace(
        io, outputs=(replace(first, labels=tuple(str(x) for x in labels)), *io.outputs[1:])
    )


def _with_sample_shapes(io: IOSpec, samples: Mapping[str, Any] | None) -> IOSpec:
    """``io`` with ``sample_shape`` on each input that has a symbolic dimension past the batch
    axis and a sample in ``samples`` that fits its shape, within the manifest's limits (else
    the input keeps none, and the agent's self-test uses 1 for those dimensions, as before)."""
    if not samples:
        return io
    inputs = []
    for spec in io.inputs:
        shape = tuple(getattr(samples.get(spec.name), "shape", ()))
        if any(isinstance(d, str) for d in spec.shape[1:]) and len(shape) == len(spec.shape):
            try:
                sample = parse_sample_shape([1, *map(int, shape[1:])], spec.shape, "sample_shape")
            except BundleError:
                sample = None  # not this input's layout, or too big
            spec = replace(spec, sample_shape=sample)
        inputs.append(spec)
    if sum(t.fixed_elements for t in inputs) > MAX_TENSOR_ELEMENTS:
        return io
    return replace(io, inputs=tuple(inputs))


def _jsonable(value: Mapping[str, Any]) -> dict[str, Any]:
    """Normalise to plain JSON types (numpy scalars, Paths, tuples)."""
    return dict(json.loads(json.dumps(value, default=_default)))


def _default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
