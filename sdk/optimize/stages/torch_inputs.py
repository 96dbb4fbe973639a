"""What the PyTorch stages (pruned, distilled, LiteRT) share: the inputs they are refused
without, an example batch for export, and the export-then-static-int8 that ends pruning and
distillation. ``torch_model`` alone (no ``train_data``) makes LiteRT candidates; pruning and
distillation also need ``train_data``."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sdk.artifact import ModelArtifact
from sdk.data import Dataset, take_samples
from sdk.errors import ConfigError
from sdk.optimize.config import OptimizeConfig
from sdk.quantize import quantize

if TYPE_CHECKING:
    import torch

    from sdk.optimize.stages.base import SearchContext
    from sdk.training import TrainData


def check_torch_inputs(
    cfg: OptimizeConfig,
    fp32: ModelArtifact,
    cal: Dataset | None,
    ev: Dataset | None,
    torch_model: torch.nn.Module | None,
    train_data: TrainData | None,
    student: torch.nn.Module | None,
) -> None:
    """Refuse PyTorch recipes that cannot work or could not be judged, before any search."""
    if torch_model is None:
        if student is not None or train_data is not None:
            raise ConfigError(
                "student and train_data need torch_model (the PyTorch model the ONNX file was "
                "exported from): it is pruned, and it teaches the student"
            )
        return
    import torch

    if not isinstance(torch_model, torch.nn.Module):
        raise ConfigError(
            f"torch_model must be a torch.nn.Module, got {type(torch_model).__name__}"
        )
    if student is not None and not isinstance(student, torch.nn.Module):
        raise ConfigError(f"student must be a torch.nn.Module, got {type(student).__name__}")
    if student is not None and train_data is None:
        raise ConfigError("a student needs train_data=(x, y) to be distilled on")
    if cal is None:
        raise ConfigError(
            "torch_model's candidates are exported on and calibrated with calibration data: "
            "pass calibration data"
        )
    if train_data is not None and (ev is None or cfg.budget.max_accuracy_drop is None):
        raise ConfigError(
            "pruning and distillation change what the model computes: pass eval data and a "
            "'drop' budget line so their accuracy is judged"
        )
    example = torch_example(fp32, cal)
    from device_agent.runtime import open_session

    expected = open_session(fp32.path).run(
        {s.name: t.numpy() for s, t in zip(fp32.io.inputs, example, strict=True)}
    )
    was_training = torch_model.training
    torch_model.eval()
    try:
        with torch.no_grad():
            got = torch_model(*example)
    finally:
        torch_model.train(was_training)
    first = got[0] if isinstance(got, tuple | list) else got
    a = first.detach().numpy().reshape(-1).astype(np.float64)
    b = np.asarray(expected[0]).reshape(-1).astype(np.float64)
    if a.shape != b.shape or not np.allclose(a, b, rtol=1e-3, atol=1e-3):
        raise ConfigError(
            f"torch_model does not compute what {fp32.path.name} computes on calibration "
            "samples: pass the module the ONNX model was exported from"
        )


def torch_example(fp32: ModelArtifact, cal: Dataset) -> tuple[torch.Tensor, ...]:
    import torch

    first = fp32.io.inputs[0].shape[:1]  # a model exported at a fixed batch takes only that
    fixed = first[0] if first and isinstance(first[0], int) and first[0] > 0 else None
    feed = take_samples(cal.inputs, 0, min(fixed or 4, len(cal)))
    return tuple(torch.from_numpy(np.ascontiguousarray(feed[s.name])) for s in fp32.io.inputs)


def export_and_quantize(
    module: torch.nn.Module, ctx: SearchContext, path: Path, recipe: str, details: dict[str, Any]
) -> ModelArtifact:
    """Export ``module`` next to ``path`` as ONNX and quantize it (static int8, with the
    search's ``reduce_range``) to ``path``."""
    from sdk.export import export
    from sdk.quantize import QuantizeConfig

    fp32, cal = ctx.fp32, ctx.require_calibration()

    exported = export(
        module,
        torch_example(fp32, cal),
        to="onnx",
        path=path.with_name(path.stem + ".fp32.onnx"),
        input_names=[s.name for s in fp32.io.inputs],
        output_names=[s.name for s in fp32.io.outputs],
    )
    config = QuantizeConfig(reduce_range=ctx.reduce_range)
    art = quantize(exported, cal, out=path, config=config, calibration_cache=ctx.calibration_cache)
    return replace(art, recipe=recipe).with_details(**details)
