"""The layer walks pruning needs: which modules can be pruned, their channels and output shapes,
the weighted layers whose parameters and multiply-accumulates are counted, and the effective
(masked) tensors of a model pruned without removing its masks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sdk.errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = [
    "channels_by_module",
    "detach_masked",
    "effective_tensors",
    "module_of",
    "out_channels",
    "output_shapes",
    "parameter_names",
    "prunable_types",
    "weighted_layers",
]


def prunable_types() -> tuple[type[torch.nn.Module], ...]:
    from torch import nn

    return (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def module_of(
    target: torch.nn.Module, layer: torch.nn.Module | str, original: torch.nn.Module
) -> torch.nn.Module:
    """``layer`` (a name, or a module of ``original``) as a module of ``target`` (a copy)."""
    modules: dict[str, torch.nn.Module] = dict(target.named_modules())
    if isinstance(layer, str):
        if layer not in modules:
            raise ConfigError(
                f"ignored_layers: the model has no module named {layer!r} (names look like "
                f"{[n for n in modules if n][:6]})"
            )
        return modules[layer]
    for name, module in original.named_modules():
        if module is layer:
            return modules[name]
    raise ConfigError(f"ignored_layers: {type(layer).__name__} is not a module of the model")


def channels_by_module(
    model: torch.nn.Module, ignored: Sequence[torch.nn.Module]
) -> dict[torch.nn.Module, int]:
    from torch import nn

    out: dict[torch.nn.Module, int] = {}
    for module in model.modules():
        if module in ignored:
            continue
        if isinstance(module, nn.Linear):
            out[module] = module.out_features
        elif isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            out[module] = module.out_channels
    return out


def out_channels(model: torch.nn.Module, ignored: Sequence[torch.nn.Module]) -> dict[str, int]:
    names = {m: n for n, m in model.named_modules()}
    return {names[m]: c for m, c in channels_by_module(model, ignored).items()}


def output_shapes(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[Any]:
    import torch

    with torch.no_grad():
        result = model(*inputs)
    items = result if isinstance(result, tuple | list) else [result]
    return [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__ for t in items]


def weighted_layers(
    model: torch.nn.Module, layers: Sequence[str] | None
) -> list[tuple[str, torch.nn.Module]]:
    modules = dict(model.named_modules())
    if layers is not None:
        missing = [n for n in layers if n not in modules]
        if missing:
            raise ConfigError(f"layers: the model has no module named {missing[0]!r}")
        chosen = [(n, modules[n]) for n in layers]
    else:
        chosen = [(n, m) for n, m in modules.items() if isinstance(m, prunable_types())]
    bad = [n for n, m in chosen if not isinstance(m, prunable_types())]
    if bad:
        raise ConfigError(f"layers: {bad[0]!r} is not a convolution or linear layer")
    if not chosen:
        raise ConfigError(f"{type(model).__name__} has no convolution or linear layer to prune")
    return chosen


def detach_masked(model: torch.nn.Module) -> None:
    """Recompute masked weights (``weight_orig * weight_mask``) outside autograd.

    The pruning hook stores the masked weight as a plain tensor attribute; after a forward
    pass with gradients it is a non-leaf tensor, which ``copy.deepcopy`` refuses. The hook
    recomputes it before every forward pass, so a detached copy changes nothing else.
    """
    import torch

    with torch.no_grad():
        for module in model.modules():
            for name, mask in list(module.named_buffers(recurse=False)):
                base = name[: -len("_mask")]
                orig = getattr(module, f"{base}_orig", None)
                if name.endswith("_mask") and isinstance(orig, torch.Tensor):
                    setattr(module, base, (orig * mask).detach())


def parameter_names(model: torch.nn.Module) -> set[str]:
    """Names of the effective parameters (``weight`` for a masked ``weight_orig``)."""
    return {n[: -len("_orig")] if n.endswith("_orig") else n for n, _ in model.named_parameters()}


def effective_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's parameters and buffers as it computes with them (masks applied)."""
    out: list[tuple[str, torch.Tensor]] = []
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        masked = {n[: -len("_mask")] for n, _ in module.named_buffers(recurse=False)}
        masked = {n for n in masked if hasattr(module, f"{n}_orig")}
        for name, param in module.named_parameters(recurse=False):
            if name.endswith("_orig") and name[: -len("_orig")] in masked:
                base = name[: -len("_orig")]
                out.append((dot + base, getattr(module, base)))
            else:
                out.append((dot + name, param))
        for name, buffer in module.named_buffers(recurse=False):
            if name.endswith("_mask") and name[: -len("_mask")] in masked:
                continue
            out.append((dot + name, buffer))
    return out
