"""Which runtimes a search makes candidates for, and the models it starts from.

A board runs a bundle in ONNX Runtime or in LiteRT (``ai-edge-litert``, or ``tflite-runtime`` on
many Raspberry Pi images). :attr:`~sdk.optimize.OptimizeConfig.runtime` says which the bundle
may name: ``"auto"`` (every runtime the target has, see
:meth:`sdk.targets.TargetProfile.usable_runtimes`), ``"onnxruntime"`` or ``"litert"``. With
both allowed and the PyTorch model at hand (``torch_model``), the search makes ONNX candidates
*and* LiteRT ones (the module exported to TFLite and quantized with ai-edge-quantizer) and the
measurements choose: on Arm, XNNPACK's int8 is often the fastest int8 there is.

Where only LiteRT is allowed, the baseline every candidate is measured against is a float
TFLite export of ``torch_model`` (:func:`litert_baseline`), so the search is the one a float
``.tflite`` gets. A ``torch.nn.Module`` (or a ``.pt2`` file saved with ``torch.export.save``)
given as the model is exported to ONNX first (:func:`source_model`), with input names taken
from the calibration data.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdk.artifact import ModelArtifact
from sdk.data import LABELS_KEY, Dataset, DataSource, take_samples
from sdk.errors import ConfigError
from sdk.optimize.config import OptimizeConfig
from sdk.targets import TargetProfile

if TYPE_CHECKING:
    import torch

__all__ = [
    "SOURCE_MARK",
    "allowed_runtimes",
    "check_input_names",
    "litert_baseline",
    "load_pt2",
    "make_source_folder",
    "refuse_existing",
    "source_arrays",
    "source_model",
]

_LITERT_EXPORT = "pip install 'edgeship[tflite-export]'"


def allowed_runtimes(
    cfg: OptimizeConfig, target: TargetProfile, fmt: str, torch_model: Any
) -> tuple[str, ...]:
    """The runtimes the search's candidates may use, or a ConfigError saying what to change."""
    usable = target.usable_runtimes()
    if cfg.runtime == "auto":
        allowed = usable
    elif cfg.runtime in usable:
        allowed = (cfg.runtime,)
    else:
        raise ConfigError(
            f"runtime {cfg.runtime}: target {target.name} has {' and '.join(usable)} only"
        )
    if fmt == "tflite" and "litert" not in allowed:
        raise ConfigError(
            f"a .tflite model runs in LiteRT, and target {target.name} allows "
            f"{' and '.join(allowed)} only: pass the ONNX model or --runtime litert"
        )
    if fmt == "onnx" and "onnxruntime" not in allowed and torch_model is None:
        raise ConfigError(
            f"the bundle may name LiteRT only (--runtime {cfg.runtime}, target {target.name} "
            f"has {' and '.join(usable)}): pass a float .tflite, or the PyTorch model to export "
            "one (a .pt2 file; torch_model in Python)"
        )
    return allowed


def litert_export_missing() -> str | None:
    """Why LiteRT candidates cannot be exported here (litert-torch is absent), or None."""
    from importlib.util import find_spec

    if find_spec("litert_torch") is None:
        return f"exporting to TFLite needs litert-torch: {_LITERT_EXPORT}"
    return None


def litert_baseline(
    fp32: ModelArtifact, torch_model: torch.nn.Module | None, cal: Dataset | None, path: Path
) -> ModelArtifact:
    """``torch_model`` exported to a float TFLite at ``path`` (batch 1, the batch a board
    runs), with ``fp32``'s input and output names: the baseline of a LiteRT-only search. A
    Keras model's or SavedModel's float TFLite (:mod:`sdk.optimize.tf_source`) is there
    already: ``fp32.details["tflite_source"]``."""
    import torch

    from sdk.artifact import read_artifact
    from sdk.export import export

    source = fp32.details.get("tflite_source")
    if source is not None:
        kept = {k: v for k, v in fp32.details.items() if k in ("made_from", "notes")}
        return _as_fp32(read_artifact(source)).with_details(litert_only=True, **kept)
    if torch_model is None:
        raise ConfigError("a LiteRT-only search needs the PyTorch model to export a TFLite")
    missing = litert_export_missing()
    if missing is not None:
        raise ConfigError(f"a LiteRT-only search starts from a TFLite export; {missing}")
    if cal is None:
        raise ConfigError("a LiteRT-only search exports the PyTorch model: pass calibration data")
    one = take_samples(cal.inputs, 0, 1)
    example = tuple(torch.from_numpy(np.ascontiguousarray(one[s.name])) for s in fp32.io.inputs)
    folder = path.parent  # <out>-source: made by this search, or by an earlier one, or refused
    if folder.is_symlink() or (folder.exists() and not (folder / SOURCE_MARK).is_file()):
        refuse_existing(folder)  # the user's own folder: raises, nothing written into it
    if not folder.exists():
        make_source_folder(folder)
    art = export(
        torch_model,
        example,
        to="tflite",
        path=path,
        input_names=[s.name for s in fp32.io.inputs],
        output_names=[s.name for s in fp32.io.outputs],
        dynamic_batch=False,
    )
    return _as_fp32(art).with_details(litert_only=True)


def _as_fp32(art: ModelArtifact) -> ModelArtifact:
    from dataclasses import replace

    from sdk.optimize.stages.fp32 import FP32

    return replace(art, recipe=FP32)


def load_pt2(path: Path) -> torch.nn.Module:
    """The module of an ExportedProgram saved with ``torch.export.save`` (a ``.pt2`` file)."""
    import torch

    try:
        with _quiet_torch():
            program = torch.export.load(str(path))
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no such file") from exc
    except Exception as exc:
        from sdk.export_common import one_line

        raise ConfigError(
            f"{path.name}: not a program saved with torch.export.save ({one_line(exc)})"
        ) from exc
    batches = [
        node.meta["val"].shape[0]
        for node in program.graph.nodes
        if node.op == "placeholder"
        and node.name in program.graph_signature.user_inputs
        and len(getattr(node.meta.get("val"), "shape", ())) > 0
    ]
    fixed = [b for b in batches if isinstance(b, int)]
    if any(b != 1 for b in fixed):
        raise ConfigError(
            f"{path.name} was exported with a fixed batch of {fixed[0]}: export it with batch 1 "
            "or a dynamic batch (torch.export.export(model, args, dynamic_shapes=...))"
        )
    names = [str(n) for n in program.graph_signature.user_inputs]
    return _as_program(program.module(), 1 if fixed else None, names)


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """torch.export logs a failed load's traceback before raising: the error says it all."""
    logger = logging.getLogger("torch")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _program_class() -> type:
    import torch

    class Program(torch.nn.Module):
        """An exported program's module, which runs as it was exported: ``train()`` and
        ``eval()`` (which torch refuses on it) leave it as it is."""

        def __init__(
            self, inner: torch.nn.Module, fixed_batch: int | None, input_names: list[str]
        ) -> None:
            super().__init__()
            self.inner = inner
            self.fixed_batch = fixed_batch  # the batch it was exported at, if fixed
            self.input_names = input_names  # forward's arguments, in order

        def forward(self, *args: Any) -> Any:
            return self.inner(*args)

        def train(self, mode: bool = True) -> Program:
            self.training = mode
            return self

    return Program


def _as_program(inner: Any, fixed_batch: int | None, names: list[str]) -> torch.nn.Module:
    module: torch.nn.Module = _program_class()(inner, fixed_batch, names)
    return module


def _argument_names(model: torch.nn.Module) -> list[str] | None:
    """``forward``'s positional argument names, in order (None when it takes ``*args``)."""
    import inspect

    names = getattr(model, "input_names", None)  # a .pt2's, as recorded at export
    if isinstance(names, list):
        return names
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    if any(p.kind == inspect.Parameter.VAR_POSITIONAL for p in params):
        return None
    return [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty]


def _in_forward_order(
    model: torch.nn.Module, arrays: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The calibration arrays in the order of ``forward``'s arguments, matched by name; a
    single input matches whatever its key. A mismatch is a one-line error: feeding inputs by
    position under the wrong names would be silently wrong."""
    names = _argument_names(model)
    if names is None or (len(names) == 1 and len(arrays) == 1):
        return arrays
    check_input_names(arrays, names, "the model's arguments")
    return {n: arrays[n] for n in names}


def check_input_names(arrays: dict[str, np.ndarray], names: list[str], named_as: str) -> None:
    """One line naming what is missing and what is unknown when the calibration data's keys
    are not ``names`` (``named_as`` says whose names they are)."""
    missing = [n for n in names if n not in arrays]
    extra = [k for k in arrays if k not in names]
    if missing or extra:
        raise ConfigError(
            f"calibration data's inputs {list(arrays)} must be named as {named_as} {names}"
            + (f": {', '.join(map(repr, missing))} missing" if missing else "")
            + (f"; {', '.join(map(repr, extra))} unknown" if extra else "")
        )


def source_model(
    model: torch.nn.Module, calibration: DataSource | None, folder: Path
) -> ModelArtifact:
    """``model`` exported to ONNX in ``folder`` (dynamic batch), its inputs named and shaped
    after the calibration data: ``{name: array}`` in the order of ``forward``'s arguments,
    an ``.npz`` file of them, or one array (named ``input``)."""
    import torch

    from sdk.export import export

    refuse_existing(folder)
    arrays = _in_forward_order(model, _input_arrays(calibration))
    names = list(arrays)
    fixed = getattr(model, "fixed_batch", None)  # a .pt2 exported at batch 1
    batch = fixed or min(4, *(len(a) for a in arrays.values()))
    example = tuple(torch.from_numpy(np.ascontiguousarray(a[:batch])) for a in arrays.values())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(*example)
    except Exception as exc:
        from sdk.export_common import one_line

        model.train(was_training)
        what = "the .pt2 program" if hasattr(model, "fixed_batch") else type(model).__name__
        raise ConfigError(
            f"{what} does not run on the calibration data's inputs "
            f"{[(n, tuple(a.shape)) for n, a in arrays.items()]}: {one_line(exc)}"
        ) from exc
    count = len(out) if isinstance(out, tuple | list) else 1
    make_source_folder(folder)
    try:  # the module in eval mode, as it runs on a board; given back as it came
        return _as_fp32(
            export(
                model,
                example,
                to="onnx",
                path=folder / "model.onnx",
                input_names=names,
                output_names=["output"] if count == 1 else [f"output_{i}" for i in range(count)],
                dynamic_batch=fixed is None,
            )
        )
    finally:
        model.train(was_training)


#: Written in every ``<out>-source`` folder a search makes: a later run with the same ``-o``
#: may replace a folder that holds it, and refuses one that does not (the user's own).
SOURCE_MARK = ".edgeship-source"


def refuse_existing(folder: Path) -> None:
    """The ``<out>-source`` folder a search converts the model in must be its own: one the
    user already has would get files written into it (and old ones left beside them). A folder
    an earlier search made (it holds :data:`SOURCE_MARK`) is replaced, so re-running with the
    same ``-o`` works."""
    if folder.is_symlink():
        raise ConfigError(
            f"{folder} is a symbolic link: optimize converts the model into a folder of its "
            "own there; remove it or choose another -o"
        )
    if not folder.exists():
        return
    if folder.is_dir() and (folder / SOURCE_MARK).is_file():
        shutil.rmtree(folder)
        return
    raise ConfigError(
        f"{folder} already exists and was not made by edgeship: optimize converts the model "
        "into it; remove it or choose another -o"
    )


def make_source_folder(folder: Path) -> None:
    """Create ``folder`` (checked by :func:`refuse_existing` first) and mark it as ours."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SOURCE_MARK).write_text(
        "made by edgeship optimize; a later run with the same -o replaces this folder\n",
        encoding="utf-8",
    )


def source_arrays(
    calibration: DataSource | None, converted: str, kind: str
) -> dict[str, np.ndarray]:
    """The calibration data a PyTorch or Keras model is converted on, as ``{name: array}``
    (labels dropped); ``converted`` says what happens to the model ("a PyTorch model is
    exported") and ``kind`` names it ("a PyTorch model") in the one-line errors."""
    from sdk.data import read_npz

    if calibration is None:
        raise ConfigError(f"{converted} on calibration samples: pass calibration data")
    if isinstance(calibration, Dataset):
        arrays = dict(calibration.inputs)
    elif isinstance(calibration, str | Path):
        arrays = read_npz(Path(calibration), "calibration data")
    elif isinstance(calibration, np.ndarray):
        arrays = {"input": calibration}
    elif isinstance(calibration, dict):
        arrays = {str(k): np.asarray(v) for k, v in calibration.items()}
    else:
        raise ConfigError(
            f"with {kind}, pass calibration data as {{input name: array}}, an .npz "
            f"file or one array, not {type(calibration).__name__}"
        )
    arrays.pop(LABELS_KEY, None)
    if not arrays or any(a.ndim == 0 or len(a) == 0 for a in arrays.values()):
        raise ConfigError("calibration data: every input needs at least one sample")
    return arrays


def _input_arrays(calibration: DataSource | None) -> dict[str, np.ndarray]:
    arrays = source_arrays(calibration, "a PyTorch model is exported", "a PyTorch model")
    # float64 arrays (numpy's default) become float32, as they do for an ONNX model
    return {k: a.astype(np.float32) if a.dtype == np.float64 else a for k, a in arrays.items()}
