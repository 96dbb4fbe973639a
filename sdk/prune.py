"""Pruning: structured channel pruning that makes a model smaller and faster, unstructured
magnitude pruning that makes it sparse, and the fine-tuning that recovers the accuracy.

**Structured** (:func:`prune_structured`) removes whole output channels of convolutions and
features of linear layers, with `torch-pruning <https://github.com/VainF/Torch-Pruning>`_'s
dependency graph so every layer that consumes a removed channel shrinks with it. The result is
an ordinary dense ``nn.Module`` with fewer channels: it exports to ONNX with
:func:`sdk.export`, quantizes with :func:`sdk.quantize` and runs faster on any runtime. The
classifier head (the last convolution or linear layer to run) keeps its outputs, so the model
still returns the same shape; a pruning that would change an output shape is refused.

**Unstructured** (:func:`prune_unstructured`) zeroes the smallest weights with
``torch.nn.utils.prune``. The zeros stay zeros during :func:`fine_tune` (the pruning masks are
kept until :func:`remove_pruning_masks`). Dense runtimes (ONNX Runtime, LiteRT) still multiply
by the zeros: unstructured sparsity shrinks the *compressed* file, not the MACs or the latency,
and :class:`ModelStats` reports both so nobody mistakes sparsity for speed.

Every result carries parameters, MACs (torch-pruning's counter, one multiply-accumulate per
weight use) and fp32 parameter bytes before and after; latency is measured on exports with
:func:`sdk.benchmark` (``benchmarks/prune_speedup.py`` compares a model and its pruned copy).
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, cast

from sdk.errors import ConfigError
from sdk.export_common import example_tuple
from sdk.prune_layers import (
    channels_by_module,
    detach_masked,
    effective_tensors,
    module_of,
    out_channels,
    output_shapes,
    parameter_names,
    prunable_types,
    weighted_layers,
)
from sdk.training import (
    TrainData,
    TrainHistory,
    as_tensors,
    epoch_callback_loop,
    torch_threads,
    train_loop,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "Importance",
    "ModelStats",
    "PruneResult",
    "SparsityResult",
    "classifier_head",
    "fine_tune",
    "model_stats",
    "prune_structured",
    "prune_unstructured",
    "remove_pruning_masks",
]

Importance = Literal["l1", "l2", "fpgm", "random"]
_IMPORTANCES = ("l1", "l2", "fpgm", "random")


@dataclass(frozen=True)
class ModelStats:
    """Size and cost of a PyTorch model.

    ``params``: parameter count; ``nonzero_params``: those not exactly zero; ``macs``:
    multiply-accumulates of one forward pass on the example inputs (dense: zeros count);
    ``size_bytes``: bytes of the parameters and buffers as stored; ``compressed_bytes``: the
    same bytes after zlib (what unstructured sparsity saves in a compressed download).
    """

    params: int
    nonzero_params: int
    macs: int
    size_bytes: int
    compressed_bytes: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero_params / self.params if self.params else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "nonzero_params": self.nonzero_params,
            "sparsity": self.sparsity,
            "macs": self.macs,
            "size_bytes": self.size_bytes,
            "compressed_bytes": self.compressed_bytes,
        }


@dataclass(frozen=True)
class PruneResult:
    """A structurally pruned model and what the pruning removed.

    ``channels_before``/``channels_after`` map each pruned layer's name to its output channels
    (features for linear layers); ``ignored`` names the layers kept whole (the classifier head
    unless told otherwise).
    """

    model: torch.nn.Module
    ratio: float
    importance: str
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    size_bytes_before: int
    size_bytes_after: int
    channels_before: Mapping[str, int]
    channels_after: Mapping[str, int]
    ignored: tuple[str, ...]

    @property
    def params_ratio(self) -> float:
        """Parameters after / before."""
        return self.params_after / self.params_before if self.params_before else 1.0

    @property
    def macs_ratio(self) -> float:
        """MACs after / before."""
        return self.macs_after / self.macs_before if self.macs_before else 1.0

    @property
    def channels_removed(self) -> float:
        """Share of the pruned layers' output channels that were removed."""
        before = sum(self.channels_before.values())
        return 1.0 - sum(self.channels_after.values()) / before if before else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ratio": self.ratio,
            "importance": self.importance,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_ratio": self.params_ratio,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "macs_ratio": self.macs_ratio,
            "size_bytes_before": self.size_bytes_before,
            "size_bytes_after": self.size_bytes_after,
            "channels_removed": self.channels_removed,
            "channels_before": dict(self.channels_before),
            "channels_after": dict(self.channels_after),
            "ignored": list(self.ignored),
        }

    def summary(self) -> str:
        layers = ", ".join(
            f"{name} {self.channels_before[name]}->{self.channels_after.get(name, 0)}"
            for name in self.channels_before
        )
        return (
            f"structured pruning ({self.importance}, ratio {self.ratio:g}): "
            f"{self.channels_removed:.0%} of channels removed ({layers}); "
            f"params {self.params_before:,} -> {self.params_after:,} ({self.params_ratio:.2f}x), "
            f"MACs {self.macs_before:,} -> {self.macs_after:,} ({self.macs_ratio:.2f}x), "
            f"fp32 size {self.size_bytes_before / 1024:.0f} -> "
            f"{self.size_bytes_after / 1024:.0f} KiB"
        )


@dataclass(frozen=True)
class SparsityResult:
    """An unstructurally pruned model: ``zeros`` of the ``total`` weights of the pruned layers
    are zero. ``masked``: the pruning masks are still attached (call
    :func:`remove_pruning_masks` after fine-tuning, before export)."""

    model: torch.nn.Module
    amount: float
    scope: str
    layers: tuple[str, ...]
    zeros: int
    total: int
    masked: bool

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


def prune_structured(
    model: torch.nn.Module,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    ratio: float,
    *,
    ignored_layers: Sequence[torch.nn.Module | str] | None = None,
    importance: Importance = "l1",
    global_pruning: bool = False,
    round_to: int | None = None,
    inplace: bool = False,
) -> PruneResult:
    """Remove ``ratio`` of the output channels of every prunable layer (convolutions, linear
    layers) and everything that depends on them.

    ``ignored_layers`` (modules or their names) are kept whole; by default the classifier head
    (:func:`classifier_head`). ``importance`` ranks channels: ``"l1"``/``"l2"`` (weight
    magnitude), ``"fpgm"`` (geometric median) or ``"random"`` (a baseline). ``global_pruning``
    ranks channels across layers instead of removing ``ratio`` from each. ``round_to`` keeps
    channel counts multiples of it (8 suits NEON/AVX kernels). The model is copied first unless
    ``inplace``. Fine-tune the result (:func:`fine_tune` or :func:`sdk.distill.distill`).
    """
    import torch
    import torch_pruning as tp

    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"ratio must be between 0 and 1 (exclusive), got {ratio}")
    if importance not in _IMPORTANCES:
        raise ConfigError(f"importance {importance!r} is not one of {list(_IMPORTANCES)}")
    if round_to is not None and round_to < 1:
        raise ConfigError(f"round_to must be at least 1, got {round_to}")
    inputs = example_tuple(example_inputs)
    target = model if inplace else copy.deepcopy(model)
    was_training = target.training
    target.eval()
    names = {m: n for n, m in target.named_modules()}
    ignored = (
        [classifier_head(target, inputs)]
        if ignored_layers is None
        else [module_of(target, layer, model) for layer in ignored_layers]
    )
    before = model_stats(target, inputs)
    shapes_before = output_shapes(target, inputs)
    channels_before = out_channels(target, ignored)
    scorers: dict[str, Callable[[], Any]] = {
        "l1": lambda: tp.importance.MagnitudeImportance(p=1),
        "l2": lambda: tp.importance.MagnitudeImportance(p=2),
        "fpgm": lambda: tp.importance.FPGMImportance(),
        "random": lambda: tp.importance.RandomImportance(),
    }
    try:
        pruner = tp.pruner.MetaPruner(
            target,
            inputs[0] if len(inputs) == 1 else inputs,
            importance=scorers[importance](),
            pruning_ratio=ratio,
            ignored_layers=ignored,
            global_pruning=global_pruning,
            round_to=round_to,
        )
        pruner.step()
    except Exception as exc:  # torch-pruning raises anything while tracing odd models
        raise ConfigError(
            f"structured pruning of {type(model).__name__} failed: {exc}; pass ignored_layers "
            "for layers it cannot follow"
        ) from exc
    shapes_after = output_shapes(target, inputs)
    if shapes_after != shapes_before:
        raise ConfigError(
            f"pruning changed the model's output shapes {shapes_before} -> {shapes_after}; "
            "add the layers that produce the outputs to ignored_layers"
        )
    after = model_stats(target, inputs)
    channels_after = {names[m]: c for m, c in channels_by_module(target, ignored).items()}
    target.train(was_training)
    return PruneResult(
        model=target,
        ratio=ratio,
        importance=importance,
        params_before=before.params,
        params_after=after.params,
        macs_before=before.macs,
        macs_after=after.macs,
        size_bytes_before=before.size_bytes,
        size_bytes_after=after.size_bytes,
        channels_before=channels_before,
        channels_after=channels_after,
        ignored=tuple(names.get(m, type(m).__name__) for m in ignored),
    )


def prune_unstructured(
    model: torch.nn.Module,
    amount: float,
    *,
    scope: Literal["global", "layer"] = "global",
    layers: Sequence[str] | None = None,
    inplace: bool = False,
) -> SparsityResult:
    """Zero the ``amount`` smallest-magnitude weights (L1) of the convolution and linear layers.

    ``scope="global"`` ranks all the layers' weights together (layers that matter less lose
    more); ``"layer"`` removes ``amount`` from each. ``layers`` restricts pruning to these
    module names. The masks stay attached so :func:`fine_tune` keeps the zeros at zero; call
    :func:`remove_pruning_masks` before exporting. The model is copied first unless ``inplace``.
    """
    import torch
    from torch.nn.utils import prune

    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not 0.0 <= amount < 1.0:
        raise ConfigError(f"amount must be in [0, 1), got {amount}")
    if scope not in ("global", "layer"):
        raise ConfigError(f"scope must be 'global' or 'layer', got {scope!r}")
    target = model if inplace else copy.deepcopy(model)
    chosen = weighted_layers(target, layers)
    if scope == "global":
        prune.global_unstructured(
            [(m, "weight") for _, m in chosen], pruning_method=prune.L1Unstructured, amount=amount
        )
    else:
        for _, module in chosen:  # a "global" ranking of one layer is that layer's ranking
            prune.global_unstructured(
                [(module, "weight")], pruning_method=prune.L1Unstructured, amount=amount
            )
    detach_masked(target)
    zeros = total = 0
    for _, module in chosen:
        weight = module.weight  # weight_orig * weight_mask, recomputed by the mask's hook
        if isinstance(weight, torch.Tensor):
            zeros += int((weight == 0).sum())
            total += weight.numel()
    return SparsityResult(
        model=target,
        amount=amount,
        scope=scope,
        layers=tuple(name for name, _ in chosen),
        zeros=zeros,
        total=total,
        masked=True,
    )


def remove_pruning_masks(model: torch.nn.Module) -> torch.nn.Module:
    """Make unstructured pruning permanent: fold each mask into its weight (in place) so the
    model has plain parameters again and exports without the mask multiplications."""
    from torch.nn.utils import prune

    # torch.nn.utils.prune.remove carries no annotations; this is its documented signature.
    remove = cast("Callable[[torch.nn.Module, str], torch.nn.Module]", prune.remove)
    for module in model.modules():
        masked = [
            n[: -len("_mask")]
            for n, _ in module.named_buffers(recurse=False)
            if n.endswith("_mask") and hasattr(module, n[: -len("_mask")] + "_orig")
        ]
        for name in masked:
            remove(module, name)
    return model


def fine_tune(
    model: torch.nn.Module,
    data: TrainData | Callable[[torch.nn.Module, int], float],
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 0,
    weight_decay: float = 0.0,
    eval_data: TrainData | None = None,
    progress: bool = True,
    threads: int | None = 1,
) -> TrainHistory:
    """Train ``model`` in place to recover the accuracy pruning cost; return the history.

    ``data`` is either ``(x, y)`` (inputs and integer class labels, trained with Adam and
    cross-entropy in shuffled batches of ``batch_size``) or a function ``train_fn(model,
    epoch) -> loss`` that trains one epoch its own way (then ``lr``, ``batch_size``,
    ``seed`` and ``weight_decay`` are unused). ``eval_data`` adds a per-epoch accuracy to the
    history; ``progress`` shows a tqdm bar. Pruning masks stay in force while training.
    The model is left in eval mode.
    """
    with torch_threads(threads):
        history = _fine_tune(
            model, data, epochs, lr, batch_size, seed, weight_decay, eval_data, progress
        )
    detach_masked(model)
    return history


def _fine_tune(
    model: torch.nn.Module,
    data: TrainData | Callable[[torch.nn.Module, int], float],
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float,
    eval_data: TrainData | None,
    progress: bool,
) -> TrainHistory:
    import torch

    if callable(data):
        return epoch_callback_loop(
            model, data, epochs=epochs, eval_data=eval_data, progress=progress, desc="fine-tune"
        )
    x, y = as_tensors(data, what="fine-tuning data")
    loss_fn = torch.nn.CrossEntropyLoss()

    def batch_loss(outputs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        loss: torch.Tensor = loss_fn(outputs, y[idx])
        return loss

    return train_loop(
        model,
        x,
        batch_loss,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        weight_decay=weight_decay,
        eval_data=eval_data,
        progress=progress,
        desc="fine-tune",
    )


def model_stats(
    model: torch.nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]
) -> ModelStats:
    """Parameters, non-zero parameters, MACs, stored and compressed size of ``model``."""
    import torch
    import torch_pruning as tp

    inputs = example_tuple(example_inputs)
    detach_masked(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            macs, _ = tp.utils.count_ops_and_params(
                model, inputs[0] if len(inputs) == 1 else inputs
            )
    finally:
        model.train(was_training)
    # state_dict() holds the masked weights as ``weight_orig`` + ``weight_mask`` while masks
    # are attached; the effective weights are what the model computes with.
    tensors = effective_tensors(model)
    params = sum(t.numel() for name, t in tensors if name in parameter_names(model))
    nonzero = sum(int((t != 0).sum()) for name, t in tensors if name in parameter_names(model))
    raw = b"".join(t.detach().cpu().contiguous().numpy().tobytes() for _, t in tensors)
    return ModelStats(
        params=params,
        nonzero_params=nonzero,
        macs=int(macs),
        size_bytes=len(raw),
        compressed_bytes=len(zlib.compress(raw, 6)),
    )


def classifier_head(
    model: torch.nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor]
) -> torch.nn.Module:
    """The last convolution or linear layer to run on ``example_inputs``: the layer whose
    outputs are the model's classes, which pruning must leave whole."""
    import torch

    order: list[torch.nn.Module] = []
    handles = [
        m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
        for m in model.modules()
        if isinstance(m, prunable_types())
    ]
    try:
        with torch.no_grad():
            model(*example_tuple(example_inputs))
    finally:
        for handle in handles:
            handle.remove()
    if not order:
        raise ConfigError(
            f"{type(model).__name__} runs no convolution or linear layer on the example inputs; "
            "there is nothing to prune"
        )
    return order[-1]


# --- helpers ------------------------------------------------------------------------------
