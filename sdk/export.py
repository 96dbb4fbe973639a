"""Export a PyTorch model to ONNX, TFLite or TorchScript, and prove the export is faithful.

Every export is run by the runtime that will execute it (ONNX Runtime, LiteRT, TorchScript) on
the example inputs and compared with PyTorch; the largest absolute difference is recorded in the
artifact's ``details["max_abs_diff"]``, and an export that diverges beyond ``atol + rtol*|ref|``
raises :class:`~sdk.errors.ExportError`. Failures inside torch or litert-torch are converted into
``ExportError`` with a one-line message.

ONNX uses torch's TorchScript-based exporter (fast, emits the requested opset directly) and falls
back to the ``torch.export``-based exporter when the tracer cannot handle the model.

TFLite: litert-torch names a signature's inputs ``args_0, ...`` and outputs ``output_0, ...``;
the export renames the signature entries and their tensors to the given names, so ONNX and TFLite
exports take the same feed. litert-torch 0.10 cannot keep the batch dynamic through flatten or
reshape, so such models are exported with the example's fixed batch size (logged, and recorded
as ``details["dynamic_batch"] = False``).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from device_agent.contracts.bundle import IOSpec, TensorSpec
from device_agent.errors import EdgeshipError
from sdk.artifact import ModelArtifact, ModelFormat
from sdk.errors import ConfigError, ExportError
from sdk.export_common import at_least_two, example_tuple, one_line, other_batch
from sdk.export_tflite import export_tflite, set_tflite_output_batch

if TYPE_CHECKING:
    import torch

__all__ = ["MIN_OPSET", "export", "verify_outputs"]

log = logging.getLogger(__name__)

MIN_OPSET = 17


_SUFFIX: dict[str, str] = {"onnx": ".onnx", "tflite": ".tflite", "torchscript": ".pt"}


def export(
    model: torch.nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    to: ModelFormat,
    path: str | Path,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = True,
    opset: int = MIN_OPSET,
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> ModelArtifact:
    """Export ``model`` to ``path`` in format ``to`` and verify it against PyTorch.

    ``example_inputs`` (a tensor or a tuple of tensors) fixes every shape except, with
    ``dynamic_batch``, the first axis. Names default to ``input``/``output`` (``input_0``, ...
    when there are several). The model runs as given: call ``model.eval()`` first unless the
    export should reflect training-mode behaviour.
    """
    import torch

    if to not in _SUFFIX:
        raise ConfigError(f"unknown export format {to!r}; expected one of {sorted(_SUFFIX)}")
    out = Path(path)
    if out.suffix.lower() != _SUFFIX[to]:
        raise ConfigError(f"{out.name}: a {to} export must be written to a {_SUFFIX[to]} file")
    if opset < MIN_OPSET:
        raise ConfigError(f"opset {opset} is too old; edgeship exports opset {MIN_OPSET} or newer")
    if atol < 0 or rtol < 0:
        raise ConfigError(f"atol and rtol must be non-negative, got atol={atol}, rtol={rtol}")
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = example_tuple(example_inputs)
    in_names = _names(input_names, len(inputs), "input")
    reference = _reference_outputs(model, inputs)
    out_names = _names(output_names, len(reference), "output")
    if model.training:
        log.warning(
            "%s is in training mode; call model.eval() before exporting unless that is intended",
            type(model).__name__,
        )
    out.parent.mkdir(parents=True, exist_ok=True)

    try:
        io, max_diff, dynamic_batch = _export_and_verify(
            model, inputs, reference, to, out, in_names, out_names, dynamic_batch, opset, atol, rtol
        )
    except ExportError:
        out.unlink(missing_ok=True)  # a failed or diverging export must not pass for a good one
        raise
    details: dict[str, Any] = {
        "max_abs_diff": max_diff,
        "atol": atol,
        "rtol": rtol,
        "dynamic_batch": dynamic_batch,
        "torch_version": torch.__version__,
    }
    if to == "onnx":
        details["opset"] = opset
    log.info(
        "exported %s to %s (%d bytes, max |diff| vs PyTorch %.3g)",
        type(model).__name__,
        out,
        out.stat().st_size,
        max_diff,
    )
    return ModelArtifact(
        path=out, format=to, io=io, precision="fp32", recipe="fp32", details=details
    )


def _export_and_verify(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    reference: list[np.ndarray],
    to: str,
    out: Path,
    in_names: list[str],
    out_names: list[str],
    dynamic_batch: bool,
    opset: int,
    atol: float,
    rtol: float,
) -> tuple[IOSpec, float, bool]:
    """Write the export, run it, and compare with PyTorch; return (io, max |diff|, dynamic)."""
    if to == "onnx":
        _export_onnx(model, inputs, out, in_names, out_names, dynamic_batch, opset)
    elif to == "tflite":
        dynamic_batch = export_tflite(model, inputs, out, in_names, out_names, dynamic_batch)
    else:
        _export_torchscript(model, inputs, out)

    feed = dict(zip(in_names, (t.detach().cpu().numpy() for t in inputs), strict=True))
    if to == "torchscript":
        actual = _run_torchscript(out, inputs)
        io = _io_from_arrays(in_names, list(feed.values()), out_names, reference, dynamic_batch)
    else:
        io, actual = _run_runtime(out, feed)
    try:
        max_diff = verify_outputs(reference, actual, atol=atol, rtol=rtol, what=f"{to} export")
        if dynamic_batch:
            other_diff, other_outputs = _verify_other_batch(
                model, inputs, out, in_names, atol, rtol, to
            )
            max_diff = max(max_diff, other_diff)
            io = _mark_batch_outputs(io, actual, other_outputs)
            if to == "tflite":
                set_tflite_output_batch(out, io)
    except ExportError as exc:
        if not model.training:
            raise
        # Exporters trace eval-mode behaviour (dropout off, batch-norm running stats).
        raise ExportError(
            f"{exc} (the model is in training mode; call model.eval() first)"
        ) from exc
    return io, max_diff, dynamic_batch


def verify_outputs(
    reference: Sequence[np.ndarray],
    actual: Sequence[np.ndarray],
    *,
    atol: float,
    rtol: float,
    what: str = "export",
) -> float:
    """Compare an export's outputs with PyTorch's; return the largest absolute difference.

    Raises :class:`ExportError` when the number or shapes of outputs differ, or when any element
    differs by more than ``atol + rtol * |reference|``.
    """
    if len(reference) != len(actual):
        raise ExportError(f"{what} returns {len(actual)} outputs, PyTorch returns {len(reference)}")
    worst = 0.0
    for i, (ref, got) in enumerate(zip(reference, actual, strict=True)):
        ref = np.asarray(ref)
        got = np.asarray(got)
        if ref.shape != got.shape:
            raise ExportError(
                f"{what}: output {i} has shape {got.shape}, PyTorch gives {ref.shape}"
            )
        if ref.size == 0:
            continue
        ref64 = ref.astype(np.float64)
        diff = np.abs(got.astype(np.float64) - ref64)
        if np.isnan(diff).any():
            # NaN where PyTorch has NaN too is agreement; anywhere else it is a divergence.
            both_nan = np.isnan(ref64) & np.isnan(got.astype(np.float64))
            if not (np.isnan(diff) == both_nan).all():
                raise ExportError(f"{what}: output {i} has NaN where PyTorch does not")
            diff = np.where(both_nan, 0.0, diff)
        worst = max(worst, float(diff.max()))
        allowed = atol + rtol * np.abs(ref64)
        bad = diff > allowed
        if bad.any():
            idx = np.unravel_index(int(np.argmax(diff - allowed)), diff.shape)
            raise ExportError(
                f"{what} diverges from PyTorch on output {i}: max |diff| {float(diff.max()):.3g} "
                f"({int(bad.sum())} of {diff.size} elements beyond atol={atol:g} + "
                f"rtol={rtol:g}*|ref|; worst at {tuple(int(j) for j in idx)}: "
                f"{float(got[idx]):.6g} vs {float(ref[idx]):.6g})"
            )
    return worst


def _verify_other_batch(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    out: Path,
    in_names: list[str],
    atol: float,
    rtol: float,
    to: str,
) -> tuple[float, list[np.ndarray]]:
    """Run a batch size other than the example's, so a batch baked in at export is caught."""
    if any(t.dim() == 0 for t in inputs):
        return 0.0, []
    other = other_batch(inputs)
    reference = _reference_outputs(model, other)
    if to == "torchscript":
        actual = _run_torchscript(out, other)
    else:
        feed = dict(zip(in_names, (t.detach().cpu().numpy() for t in other), strict=True))
        _io, actual = _run_runtime(out, feed)
    n = other[0].shape[0]
    diff = verify_outputs(
        reference, actual, atol=atol, rtol=rtol, what=f"{to} export at batch size {n}"
    )
    return diff, actual


def _mark_batch_outputs(io: IOSpec, first: list[np.ndarray], second: list[np.ndarray]) -> IOSpec:
    """Name the first axis ``batch`` on outputs whose size followed the batch size.

    litert-torch records outputs with the example's fixed shape even when the input's batch
    axis is dynamic; running two batch sizes shows which outputs really follow it.
    """
    if len(first) != len(io.outputs) or len(second) != len(io.outputs):
        return io
    outputs = []
    for spec, a, b in zip(io.outputs, first, second, strict=True):
        if spec.shape and isinstance(spec.shape[0], int) and a.ndim and a.shape[0] != b.shape[0]:
            spec = replace(spec, shape=("batch", *spec.shape[1:]))
        outputs.append(spec)
    return replace(io, outputs=tuple(outputs))


def _names(given: Sequence[str] | None, count: int, kind: str) -> list[str]:
    if given is None:
        return [kind] if count == 1 else [f"{kind}_{i}" for i in range(count)]
    names = [given] if isinstance(given, str) else list(given)
    if len(names) != count:
        raise ConfigError(
            f"{len(names)} {kind} names given ({names}), but the model has {count} {kind}s"
        )
    if len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"{kind} names must be distinct non-empty strings, got {names}")
    return names


def _reference_outputs(
    model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]
) -> list[np.ndarray]:
    import torch

    try:
        with torch.no_grad():
            result = model(*inputs)
    except Exception as exc:
        raise ExportError(f"the model fails on the example inputs: {one_line(exc)}") from exc
    return [t.detach().cpu().numpy() for t in _flatten_outputs(result)]


def _flatten_outputs(result: Any) -> list[torch.Tensor]:
    import torch

    if isinstance(result, torch.Tensor):
        return [result]
    if (
        isinstance(result, list | tuple)
        and result
        and all(isinstance(t, torch.Tensor) for t in result)
    ):
        return list(result)
    raise ExportError(
        f"the model returns {type(result).__name__}; edgeship exports models that "
        "return a tensor or a tuple of tensors"
    )


def _export_onnx(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    out: Path,
    in_names: list[str],
    out_names: list[str],
    dynamic_batch: bool,
    opset: int,
) -> None:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
            torch.onnx.export(
                model,
                inputs,
                str(out),
                input_names=in_names,
                output_names=out_names,
                opset_version=opset,
                dynamic_axes=(
                    {n: {0: "batch"} for n in [*in_names, *out_names]} if dynamic_batch else None
                ),
                dynamo=False,
            )
    except Exception as legacy_exc:
        log.info(
            "TorchScript-based ONNX export failed (%s); trying torch.export", one_line(legacy_exc)
        )
        try:
            _export_onnx_dynamo(model, inputs, out, in_names, out_names, dynamic_batch, opset)
        except Exception as exc:
            raise ExportError(
                f"ONNX export of {type(model).__name__} failed: {one_line(legacy_exc)} "
                f"(torch.export-based exporter: {one_line(exc)})"
            ) from exc
    from sdk.errors import ModelFormatError
    from sdk.onnx_tools import check_onnx_file

    try:
        check_onnx_file(out)
    except ModelFormatError as exc:
        raise ExportError(f"the ONNX export is invalid: {exc}") from exc


def _export_onnx_dynamo(
    model: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    out: Path,
    in_names: list[str],
    out_names: list[str],
    dynamic_batch: bool,
    opset: int,
) -> None:
    import torch

    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if t.dim() else {} for t in inputs)
        inputs = at_least_two(inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            inputs,
            input_names=in_names,
            output_names=out_names,
            opset_version=opset,
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    program.save(str(out), external_data=False)


def _export_torchscript(
    model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], out: Path
) -> None:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and torch.jit deprecation warnings
            traced = _jit().trace(model, inputs, check_trace=False)
            torch.jit.save(traced, str(out))
    except Exception as exc:
        raise ExportError(
            f"TorchScript export of {type(model).__name__} failed: {one_line(exc)}"
        ) from exc


def _jit() -> Any:
    # torch.jit.trace and torch.jit.load carry no annotations; strict mypy rejects the calls.
    import torch

    return torch.jit


def _run_torchscript(path: Path, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.load's deprecation notice
            loaded = _jit().load(str(path))
        with torch.no_grad():
            result = loaded(*inputs)
    except Exception as exc:
        raise ExportError(f"the TorchScript export cannot be run: {one_line(exc)}") from exc
    return [t.detach().cpu().numpy() for t in _flatten_outputs(result)]


def _run_runtime(path: Path, feed: dict[str, np.ndarray]) -> tuple[IOSpec, list[np.ndarray]]:
    from device_agent.runtime import open_session

    try:
        session = open_session(path, threads=1)
        return session.io, session.run(feed)
    except EdgeshipError as exc:
        raise ExportError(f"the exported {path.name} cannot be run: {exc}") from exc


def _io_from_arrays(
    in_names: list[str],
    inputs: list[np.ndarray],
    out_names: list[str],
    outputs: list[np.ndarray],
    dynamic_batch: bool,
) -> IOSpec:
    """The spec of a TorchScript export; outputs get a ``batch`` axis later, once a second
    batch size has shown which of them follow it."""

    def spec(name: str, arr: np.ndarray, dynamic: bool) -> TensorSpec:
        shape: list[int | str] = [int(d) for d in arr.shape]
        if dynamic and shape:
            shape[0] = "batch"
        return TensorSpec(name=name, dtype=arr.dtype.name, shape=tuple(shape))

    return IOSpec(
        inputs=tuple(spec(n, a, dynamic_batch) for n, a in zip(in_names, inputs, strict=True)),
        outputs=tuple(spec(n, a, False) for n, a in zip(out_names, outputs, strict=True)),
    )
