"""sdk.export: ONNX and TorchScript exports of the digits CNN, verified against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import sdk
from device_agent.runtime import open_session
from sdk.errors import ConfigError, ExportError
from sdk.export import verify_outputs
from sdk.zoo.digits import INPUT_NAME, OUTPUT_NAME


def _torch_logits(model: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out: np.ndarray = model(torch.from_numpy(x)).numpy()
    return out


def test_onnx_export_of_digits_is_verified(digits_onnx: Any) -> None:
    art = digits_onnx
    assert art.format == "onnx"
    assert art.path.is_file()
    assert art.io.input_names == (INPUT_NAME,)
    assert [o.name for o in art.io.outputs] == [OUTPUT_NAME]
    assert art.io.inputs[0].shape == ("batch", 1, 8, 8)
    assert art.io.outputs[0].shape == ("batch", 10)
    assert art.details["opset"] == 17
    assert 0.0 <= art.details["max_abs_diff"] < 1e-4
    print(f"\nONNX export max |diff| vs PyTorch: {art.details['max_abs_diff']:.3g}")


def test_onnx_export_keeps_the_batch_dynamic(
    digits_onnx: Any, trained_digits: tuple[Any, float], digits_splits: Any
) -> None:
    model, _ = trained_digits
    session = open_session(digits_onnx.path, threads=1)
    for n in (1, 7):
        x = digits_splits.x_test[:n]
        (logits,) = session.run({INPUT_NAME: x})
        assert logits.shape == (n, 10)
        np.testing.assert_allclose(logits, _torch_logits(model, x), atol=1e-4, rtol=1e-3)


def test_exported_onnx_reads_back_as_an_artifact(digits_onnx: Any) -> None:
    again = sdk.read_artifact(digits_onnx.path)
    assert again.io == digits_onnx.io


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_export(
    trained_digits: tuple[Any, float], digits_splits: Any, tmp_path: Path
) -> None:
    model, _ = trained_digits
    example = torch.from_numpy(digits_splits.x_cal[:4])
    art = sdk.export(model, example, to="torchscript", path=tmp_path / "digits.pt")
    assert art.format == "torchscript"
    assert art.io.input_names == ("input",)
    assert art.io.inputs[0].shape == ("batch", 1, 8, 8)
    assert art.io.outputs[0].shape == ("batch", 10)
    assert art.details["max_abs_diff"] < 1e-5
    jit: Any = torch.jit  # torch.jit.load is unannotated
    loaded = jit.load(str(art.path))
    x = digits_splits.x_test[:5]
    with torch.no_grad():
        got = loaded(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, _torch_logits(model, x), atol=1e-5)


def test_export_without_dynamic_batch_fixes_the_batch(
    trained_digits: tuple[Any, float], digits_splits: Any, tmp_path: Path
) -> None:
    model, _ = trained_digits
    example = torch.from_numpy(digits_splits.x_cal[:2])
    art = sdk.export(
        model, (example,), to="onnx", path=tmp_path / "fixed.onnx", dynamic_batch=False
    )
    assert art.io.inputs[0].shape == (2, 1, 8, 8)
    assert art.details["dynamic_batch"] is False


def test_verify_outputs_reports_the_divergence() -> None:
    ref = [np.array([[1.0, 2.0, 3.0]], dtype=np.float32)]
    close = [ref[0] + 5e-5]
    assert verify_outputs(ref, close, atol=1e-4, rtol=0.0) == pytest.approx(5e-5, rel=1e-2)
    far = [np.array([[1.0, 2.5, 3.0]], dtype=np.float32)]
    with pytest.raises(ExportError, match=r"max \|diff\| 0\.5 .*1 of 3 elements.*\(0, 1\)"):
        verify_outputs(ref, far, atol=1e-4, rtol=1e-3, what="onnx export")
    with pytest.raises(ExportError, match="shape"):
        verify_outputs(ref, [np.zeros((1, 4), np.float32)], atol=1e-4, rtol=1e-3)
    with pytest.raises(ExportError, match="2 outputs"):
        verify_outputs(ref, [ref[0], ref[0]], atol=1e-4, rtol=1e-3)


def test_dropout_in_training_mode_diverges(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Dropout(0.5))
    model.train()  # PyTorch drops units at random; the exporter traces eval behaviour
    with pytest.raises(ExportError, match=r"diverges.*training mode") as info:
        sdk.export(model, torch.randn(4, 16), to="onnx", path=tmp_path / "dropout.onnx")
    assert "\n" not in str(info.value)
    assert not (tmp_path / "dropout.onnx").exists()


class _Eigenvalues(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvalsh(x @ x.transpose(-1, -2))


def test_unexportable_model_gives_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"ONNX export of _Eigenvalues failed.*eigvalsh") as info:
        sdk.export(_Eigenvalues(), torch.randn(2, 4, 4), to="onnx", path=tmp_path / "eig.onnx")
    assert "\n" not in str(info.value)
    assert "\x1b" not in str(info.value)


def test_model_that_fails_on_its_example_is_an_export_error(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    with pytest.raises(ExportError, match="fails on the example inputs"):
        sdk.export(model, torch.randn(1, 5), to="onnx", path=tmp_path / "bad.onnx")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"to": "onnx", "path": "m.tflite"}, "must be written to a .onnx file"),
        ({"to": "onnx", "path": "m.onnx", "opset": 13}, "opset 13 is too old"),
        ({"to": "coreml", "path": "m.mlmodel"}, "unknown export format"),
        ({"to": "onnx", "path": "m.onnx", "input_names": ["a", "b"]}, "2 input names"),
    ],
)
def test_bad_arguments_are_config_errors(
    kwargs: dict[str, Any], message: str, tmp_path: Path
) -> None:
    kwargs = {**kwargs, "path": tmp_path / kwargs["path"]}
    with pytest.raises(ConfigError, match=message):
        sdk.export(torch.nn.Linear(3, 2), torch.randn(1, 3), **kwargs)


def test_multi_input_multi_output_names(tmp_path: Path) -> None:
    class TwoByTwo(torch.nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return a + b, a * b

    art = sdk.export(
        TwoByTwo(),
        (torch.randn(3, 4), torch.randn(3, 4)),
        to="onnx",
        path=tmp_path / "two.onnx",
        output_names=["sum", "product"],
    )
    assert art.io.input_names == ("input_0", "input_1")
    assert [o.name for o in art.io.outputs] == ["sum", "product"]
    assert all(o.shape == ("batch", 4) for o in art.io.outputs)


def test_old_opset_file_is_read_and_upgraded(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    from sdk.onnx_tools import check_onnx_file, opset_of, upgrade_opset

    weight = helper.make_tensor(
        "w", TensorProto.FLOAT, [4, 3], np.arange(12, dtype=np.float32).tolist()
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["mm"]), helper.make_node("Relu", ["mm"], ["y"])],
        "old",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        initializer=[weight],
    )
    old = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
    old.ir_version = 6
    path = tmp_path / "old.onnx"
    onnx.save(old, str(path))

    art = sdk.read_artifact(path)
    assert art.io.input_names == ("x",)
    assert art.io.inputs[0].shape == ("n", 4)

    upgraded = upgrade_opset(check_onnx_file(path), 17)
    assert opset_of(upgraded) == 17
    new_path = tmp_path / "new.onnx"
    onnx.save(upgraded, str(new_path))
    x = np.array([[1.0, -1.0, 2.0, 0.5]], dtype=np.float32)
    (y_old,) = open_session(path, threads=1).run({"x": x})
    (y_new,) = open_session(new_path, threads=1).run({"x": x})
    np.testing.assert_allclose(y_new, y_old)
    np.testing.assert_allclose(y_old, np.maximum(x @ np.arange(12).reshape(4, 3), 0))
