"""Pruning: structured channel removal (torch-pruning), unstructured masks, fine-tuning, and the
acceptance run on a wide digits CNN (channels, params, MACs, accuracy, export and int8).

The latency side of the acceptance (pruned p50 <= 0.7x the unpruned, side by side) lives in
``benchmarks/prune_speedup.py``: a latency ratio in a unit test is flaky on a shared machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torch_pruning")

from sdk.errors import ConfigError  # noqa: E402
from sdk.prune import (  # noqa: E402
    classifier_head,
    fine_tune,
    model_stats,
    prune_structured,
    prune_unstructured,
    remove_pruning_masks,
)
from sdk.zoo.digits import INPUT_NAME, OUTPUT_NAME, build_digits_cnn  # noqa: E402


def _example() -> Any:
    return torch.zeros(2, 1, 8, 8)


def test_structured_pruning_removes_channels_and_keeps_the_head() -> None:
    torch.manual_seed(0)
    model = build_digits_cnn(16, 128)
    result = prune_structured(model, _example(), 0.5)
    pruned = result.model
    assert pruned is not model
    assert model[0].out_channels == 16  # the original is untouched
    assert pruned[0].out_channels == 8 and pruned[2].out_channels == 16
    assert pruned[6].out_features == 64 and pruned[6].in_features == 16 * 16
    assert pruned[8].out_features == 10  # the classifier head keeps its classes
    assert result.ignored == ("8",)
    assert result.channels_before == {"0": 16, "2": 32, "6": 128}
    assert result.channels_after == {"0": 8, "2": 16, "6": 64}
    assert result.channels_removed == pytest.approx(0.5)
    assert result.params_after < 0.3 * result.params_before
    assert result.macs_after < 0.3 * result.macs_before
    assert result.size_bytes_after == 4 * result.params_after
    assert pruned(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    assert "50% of channels removed" in result.summary()


def test_structured_pruning_options() -> None:
    torch.manual_seed(0)
    model = build_digits_cnn(16, 128)
    kept = prune_structured(model, _example(), 0.5, ignored_layers=["0", "8"])
    assert kept.model[0].out_channels == 16 and "0" not in kept.channels_after
    rounded = prune_structured(model, _example(), 0.6, round_to=8, importance="l2")
    assert all(c % 8 == 0 for c in rounded.channels_after.values())
    assert classifier_head(model, _example()) is model[8]
    with pytest.raises(ConfigError, match="ratio"):
        prune_structured(model, _example(), 1.0)
    with pytest.raises(ConfigError, match="importance"):
        prune_structured(model, _example(), 0.5, importance="taylor")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="no module named 'head'"):
        prune_structured(model, _example(), 0.5, ignored_layers=["head"])
    with pytest.raises(ConfigError, match="output shapes"):
        prune_structured(model, _example(), 0.5, ignored_layers=[])  # the head would shrink


def test_unstructured_pruning_keeps_zeros_through_fine_tuning() -> None:
    torch.manual_seed(0)
    model = build_digits_cnn(8, 32)
    rng = np.random.default_rng(0)
    x = rng.random((64, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 64)
    result = prune_unstructured(model, 0.8)
    assert result.masked and result.sparsity == pytest.approx(0.8, abs=1e-3)
    assert result.layers == ("0", "2", "6", "8")
    stats = model_stats(result.model, _example())
    dense = model_stats(model, _example())
    assert stats.macs == dense.macs  # zeros are still multiplied by dense kernels
    assert stats.params == dense.params and stats.nonzero_params < 0.25 * dense.params
    assert stats.compressed_bytes < 0.5 * dense.compressed_bytes
    history = fine_tune(result.model, (x, y), epochs=2, progress=False)
    assert len(history.epochs) == 2 and history.final_loss is not None
    remove_pruning_masks(result.model)
    names = {n for n, _ in result.model.named_parameters()}
    assert names == {f"{i}.{p}" for i in (0, 2, 6, 8) for p in ("weight", "bias")}
    after = model_stats(result.model, _example())
    assert after.nonzero_params == stats.nonzero_params  # fine-tuning did not revive zeros
    per_layer = prune_unstructured(model, 0.5, scope="layer")
    for _, module in per_layer.model.named_children():
        if hasattr(module, "weight_mask"):
            assert float((module.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def test_fine_tune_accepts_a_train_function_and_checks_data() -> None:
    model = build_digits_cnn(8, 32)
    calls: list[int] = []

    def one_epoch(net: Any, epoch: int) -> float:
        calls.append(epoch)
        return 1.0 / (epoch + 1)

    history = fine_tune(model, one_epoch, epochs=3, progress=False)
    assert calls == [0, 1, 2] and history.final_loss == pytest.approx(1 / 3)
    from sdk.errors import DataError

    with pytest.raises(DataError, match="one label per sample"):
        fine_tune(model, (np.zeros((4, 1, 8, 8), np.float32), np.zeros(3, np.int64)))
    with pytest.raises(ConfigError, match="lr"):
        fine_tune(model, (np.zeros((4, 1, 8, 8), np.float32), np.zeros(4, np.int64)), lr=0)


@pytest.mark.slow
def test_acceptance_wide_digits_cnn_pruned_half_fine_tuned_exported_and_int8(
    digits_splits: Any, tmp_path: Path
) -> None:
    """>= 50% of channels removed, accuracy within 1 point after fine-tuning, export + int8."""
    import sdk
    from sdk.training import torch_threads
    from sdk.zoo.digits import train_digits_cnn

    s = digits_splits
    with torch_threads(1):
        wide, _ = train_digits_cnn(s, seed=0, width=64, hidden=256, epochs=20)
    example = torch.from_numpy(s.x_cal[:4])
    result = prune_structured(wide, example, 0.5)
    history = fine_tune(
        result.model, (s.x_train, s.y_train), epochs=10, lr=1e-3, seed=0, progress=False
    )
    assert history.final_loss is not None

    names = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME]}
    wide_onnx = sdk.export(wide, (example,), to="onnx", path=tmp_path / "wide.onnx", **names)
    pruned_onnx = sdk.export(
        result.model, (example,), to="onnx", path=tmp_path / "pruned.onnx", **names
    )
    eval_data = sdk.load_dataset(
        {INPUT_NAME: s.x_test, "labels": s.y_test}, wide_onnx.io, what="eval data"
    )
    base = sdk.evaluate(wide_onnx, eval_data)
    pruned = sdk.evaluate(pruned_onnx, eval_data)
    int8 = sdk.quantize(pruned_onnx, {INPUT_NAME: s.x_cal}, out=tmp_path / "pruned.int8.onnx")
    pruned_int8 = sdk.evaluate(int8, eval_data)
    assert base.accuracy is not None and pruned.accuracy is not None
    assert pruned_int8.accuracy is not None
    print(
        f"\n{result.summary()}\n"
        f"accuracy (ONNX Runtime, {len(eval_data)} test digits): unpruned {base.accuracy:.4f}, "
        f"pruned+fine-tuned {pruned.accuracy:.4f}, pruned int8 {pruned_int8.accuracy:.4f}\n"
        f"ONNX size: unpruned {wide_onnx.size_bytes:,} B, pruned {pruned_onnx.size_bytes:,} B, "
        f"pruned int8 {int8.size_bytes:,} B"
    )
    assert result.channels_removed >= 0.5
    assert result.params_ratio <= 0.3 and result.macs_ratio <= 0.3
    assert pruned_onnx.size_bytes < 0.3 * wide_onnx.size_bytes
    assert base.accuracy - pruned.accuracy <= 0.01
    assert int8.precision == "int8" and int8.details["quantized_nodes"] > 0
    assert base.accuracy - pruned_int8.accuracy <= 0.02
