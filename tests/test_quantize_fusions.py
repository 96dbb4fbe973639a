"""Exact rewrites before int8 quantization (sdk.quantize.fusions): a digits CNN trained here in
PP-LCNetV3's style (a learnable scale and shift after each Conv, hard-swish written out as
x * relu6(x + 3) / 6) is rewritten with the same outputs and fewer nodes, quantized with fewer
tensors on int8 grids, and left alone where a rewrite would not be exact. Real ONNX Runtime
sessions throughout."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import sdk
from sdk.quantize import QuantizeConfig, quantize
from sdk.quantize.fusions import fuse
from tests.int8_host import HOST_REDUCE_RANGE

NAME = "image"


def _net() -> Any:
    import torch
    from torch import nn

    class Affine(nn.Module):  # PP-LCNetV3's "learnable affine block": one scale, one shift
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.tensor([1.3]))
            self.shift = nn.Parameter(torch.tensor([0.2]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale + self.shift

    class HardSwish(nn.Module):  # as Paddle2ONNX writes it
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, 16, 3, padding=1)
            self.stem_affine, self.act1 = Affine(), HardSwish()
            self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
            self.channel_scale = nn.Parameter(torch.linspace(0.5, 1.5, 16).reshape(1, 16, 1, 1))
            self.act2 = HardSwish()
            self.pw = nn.Conv2d(16, 32, 1)
            self.pw_affine = Affine()
            self.head = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.act1(self.stem_affine(self.stem(x)))
            x = self.act2(self.dw(x) * self.channel_scale)
            x = torch.relu(self.pw_affine(self.pw(x)))
            return self.head(x.mean(dim=(2, 3)))

    return Net()


@pytest.fixture(scope="module")
def lcnet_style(digits_splits: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import torch

    from sdk.training import torch_threads

    s = digits_splits
    torch.manual_seed(0)
    net = _net()
    x, y = torch.from_numpy(s.x_train), torch.from_numpy(s.y_train.astype(np.int64))
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    with torch_threads(1):
        for _ in range(40):
            for i in range(0, len(x), 128):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(x[i : i + 128]), y[i : i + 128]).backward()
                opt.step()
    net.eval()
    tmp = tmp_path_factory.mktemp("fusions")
    fp32 = sdk.export(
        net, (x[:8],), to="onnx", path=tmp / "lcnet.onnx", input_names=[NAME],
        output_names=["logits"],
    )  # fmt: skip
    with torch.no_grad():
        accuracy = float((net(torch.from_numpy(s.x_test)).argmax(1).numpy() == s.y_test).mean())
    return {"fp32": fp32.path, "s": s, "tmp": tmp, "accuracy": accuracy}


def _run(model: Path | bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    out: np.ndarray = session.run(None, {NAME: x})[0]
    return out


def _ops(model: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_the_rewrite_is_exact_and_removes_the_nodes(lcnet_style: dict[str, Any]) -> None:
    c = lcnet_style
    assert c["accuracy"] > 0.8  # a real model: it learnt the digits (10 classes)
    model = onnx.load(str(c["fp32"]))
    before = _ops(model)
    done = fuse(model)
    onnx.checker.check_model(model)
    after = _ops(model)
    # stem: Mul + Add; depthwise: the per-channel Mul; pointwise: Mul + Add
    assert (done.folded, done.hard_swish) == (5, 2), done
    assert after.get("Div", 0) == before["Div"] - 2 and "Clip" not in after
    assert after["HardSigmoid"] == 2
    assert after.get("Add", 0) == before["Add"] - 2 - 2  # 2 folded shifts, 2 hard-swishes' "+ 3"
    assert after.get("Constant", 0) < before["Constant"]  # the constants they read are gone too
    x = c["s"].x_test
    ref, got = _run(c["fp32"], x), _run(model.SerializeToString(), x)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    assert (got.argmax(1) == ref.argmax(1)).all()
    # the folded weights replace the old ones: no initializer is left unread
    read = {i for n in model.graph.node for i in n.input}
    assert all(i.name in read for i in model.graph.initializer)


def test_quantize_fuses_by_default_and_quantizes_fewer_tensors(
    lcnet_style: dict[str, Any],
) -> None:
    c, tmp = lcnet_style, lcnet_style["tmp"]
    cal = {NAME: c["s"].x_cal}
    counts, notes, outs = {}, {}, {}
    for fused in (True, False):
        config = QuantizeConfig(op_types=None, fuse=fused, reduce_range=HOST_REDUCE_RANGE)
        out = tmp / f"int8-{fused}.onnx"
        art = quantize(c["fp32"], cal, out=out, config=config)
        counts[fused] = _ops(onnx.load(str(out))).get("QuantizeLinear", 0)
        notes[fused] = art.details["fallbacks"]
        outs[fused] = _run(out, c["s"].x_test)
        assert art.details["fuse"] is fused
    fused_note = re.compile(r"folded \d constant Mul/Add nodes into the Convs before them; rewrote")
    assert any(fused_note.match(n) for n in notes[True]), notes[True]
    assert not any("folded" in n for n in notes[False])
    assert counts[True] < counts[False], counts
    ref = _run(c["fp32"], c["s"].x_test)
    agree = float((outs[True].argmax(1) == ref.argmax(1)).mean())
    assert agree > 0.95, agree


def test_cli_no_fuse_flag(lcnet_style: dict[str, Any]) -> None:
    c, tmp = lcnet_style, lcnet_style["tmp"]
    cal = tmp / "cal.npz"
    np.savez(cal, **{NAME: c["s"].x_cal[:64]})
    cmd = [sys.executable, "-m", "sdk.cli", "quantize", str(c["fp32"]), "--calibration", str(cal)]
    fused = subprocess.run([*cmd, "-o", str(tmp / "cli.onnx")], capture_output=True, text=True)
    plain = subprocess.run(
        [*cmd, "--no-fuse", "-o", str(tmp / "cli-plain.onnx")], capture_output=True, text=True
    )
    assert fused.returncode == 0 and plain.returncode == 0, fused.stderr + plain.stderr
    assert "Mul/Add nodes into the Convs before them; rewrote 2 hard-swishes" in fused.stdout
    assert "folded" not in plain.stdout
    int4 = subprocess.run(
        [*cmd, "--mode", "int4", "--no-fuse", "-o", str(tmp / "x.onnx")],
        capture_output=True,
        text=True,
    )
    assert int4.returncode == 2 and "--no-fuse: int8 options" in int4.stderr


def _graph(nodes: list[Any], inits: dict[str, np.ndarray], outputs: list[str]) -> Any:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 4, 4])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


CONV = {"w": np.ones((2, 2, 1, 1)), "b": np.zeros(2)}


@pytest.mark.parametrize(
    "case",
    [
        "two readers",
        "graph output",
        "per-position constant",
        "higher-rank constant",
        "last-axis constant",
    ],
)
def test_folds_only_where_exact(case: str) -> None:
    conv = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")
    inits: dict[str, np.ndarray] = dict(CONV)
    outputs = ["z"]
    nodes = [conv, helper.make_node("Mul", ["y", "c"], ["z"])]
    inits["c"] = np.array([2.0])
    if case == "two readers":
        nodes.append(helper.make_node("Relu", ["y"], ["r"]))
        outputs.append("r")
    elif case == "graph output":
        outputs.append("y")
    elif case == "per-position constant":
        inits["c"] = np.arange(16.0).reshape(1, 1, 4, 4)
    elif case == "higher-rank constant":
        inits["c"] = np.ones((1, 1, 2, 1, 1))
    else:  # (C,) broadcasts over the last axis (W = C = 4 here), not over the channels
        inits |= {"w": np.ones((4, 2, 1, 1)), "b": np.zeros(4), "c": np.arange(4.0)}
    model = _graph(nodes, inits, outputs)
    assert fuse(model).folded == 0
    assert [n.op_type for n in model.graph.node][:2] == ["Conv", "Mul"]


@pytest.mark.parametrize("three,six", [(2.0, 6.0), (3.0, 5.0)])
def test_a_different_activation_is_not_called_hard_swish(three: float, six: float) -> None:
    nodes = [
        helper.make_node("Add", ["x", "three"], ["a"]),
        helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
        helper.make_node("Mul", ["x", "c"], ["m"]),
        helper.make_node("Div", ["m", "div"], ["y"]),
    ]
    inits = {
        "three": np.array(three),
        "zero": np.array(0.0),
        "six": np.array(six),
        "div": np.array(6.0),
    }
    model = _graph(nodes, inits, ["y"])
    assert fuse(model).hard_swish == 0
    exact = _graph(nodes, {**inits, "three": np.array(3.0), "six": np.array(6.0)}, ["y"])
    assert fuse(exact).hard_swish == 1
    x = np.random.default_rng(0).normal(0, 4, (1, 2, 4, 4)).astype(np.float32)
    import onnxruntime as ort

    got = ort.InferenceSession(exact.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, x * np.clip(x + 3, 0, 6) / 6, rtol=1e-6, atol=1e-6)


def test_a_calibration_cache_from_the_unfused_graph_is_not_reused(
    lcnet_style: dict[str, Any], tmp_path: Path
) -> None:
    """The rewrites rename and remove tensors: ranges cached for the graph as it was lack the
    fused graph's, and reusing them failed ('Quantization parameters are not specified')."""
    c = lcnet_style
    cal = {NAME: c["s"].x_cal[:64]}
    for fused in (False, True):
        config = QuantizeConfig(fuse=fused, reduce_range=HOST_REDUCE_RANGE)
        art = quantize(
            c["fp32"], cal, out=tmp_path / f"q-{fused}.onnx", config=config,
            calibration_cache=tmp_path / "cache",
        )  # fmt: skip
        assert art.details["calibration_cache"]["hit"] is False
    assert len(list((tmp_path / "cache").iterdir())) == 2


def _hard_swish_nodes(out: str = "y") -> list[Any]:
    return [
        helper.make_node("Add", ["x", "three"], ["a"]),
        helper.make_node("Clip", ["a", "zero", "six"], ["c"]),
        helper.make_node("Mul", ["x", "c"], ["m"]),
        helper.make_node("Div", ["m", "div"], [out]),
    ]


HS = {"three": np.array(3.0), "zero": np.array(0.0), "six": np.array(6.0), "div": np.array(6.0)}


def _same_outputs(before: Any, after: Any, feeds: dict[str, np.ndarray]) -> None:
    import onnxruntime as ort

    a = ort.InferenceSession(before.SerializeToString()).run(None, feeds)
    b = ort.InferenceSession(after.SerializeToString()).run(None, feeds)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6)


def test_a_tensor_read_inside_a_subgraph_is_not_rewritten() -> None:
    """An If body reading the Conv's output (or a hard-swish's Clip output) is one more reader:
    folding renamed the tensor and left the body reading a name nothing made."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["y"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)],
    )
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv"),
        helper.make_node("Mul", ["y", "c"], ["z"]),
        helper.make_node("If", ["cond"], ["o"], then_branch=body, else_branch=body),
    ]
    model = _graph(nodes, {**CONV, "c": np.array([2.5])}, ["z", "o"])
    model.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    before = onnx.ModelProto()
    before.CopyFrom(model)
    assert fuse(model).folded == 0
    x = np.ones((1, 2, 4, 4), np.float32)
    _same_outputs(before, model, {"x": x})


def test_generated_names_never_collide() -> None:
    nodes = [*_hard_swish_nodes(), helper.make_node("Relu", ["x"], ["y_hardsigmoid"])]
    model = _graph(nodes, HS, ["y", "y_hardsigmoid"])
    before = onnx.ModelProto()
    before.CopyFrom(model)
    assert fuse(model).hard_swish == 1
    x = np.random.default_rng(0).normal(0, 4, (1, 2, 4, 4)).astype(np.float32)
    _same_outputs(before, model, {"x": x})


@pytest.mark.parametrize("case", ["rank-5 three", "almost a sixth", "constant fed by the caller"])
def test_constants_that_only_look_right_are_left_alone(case: str) -> None:
    if case == "constant fed by the caller":
        nodes = [
            helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv"),
            helper.make_node("Mul", ["y", "c"], ["z"]),
        ]
        model = _graph(nodes, {**CONV, "c": np.array([2.5])}, ["z"])
        model.graph.input.append(helper.make_tensor_value_info("c", TensorProto.FLOAT, [1]))
        assert fuse(model).folded == 0
        return
    inits = dict(HS)
    nodes = _hard_swish_nodes()
    if case == "rank-5 three":  # broadcasting it adds an axis to the output
        inits["three"] = np.full((1, 1, 1, 1, 1), 3.0)
    else:
        nodes[3] = helper.make_node("Mul", ["m", "div"], ["y"])
        inits["div"] = np.array(0.1666672)
    model = _graph(nodes, inits, ["y"])
    assert fuse(model).hard_swish == 0


def test_optimize_measures_the_rewritten_fp32_model(lcnet_style: dict[str, Any]) -> None:
    """Candidate fp32-fused: the fp32 model with the rewrites, judged and timed like the rest
    (which one ships depends on the machine's timings, not asserted here)."""
    from sdk.budget import parse_budget
    from sdk.optimize import OptimizeConfig, optimize

    c, tmp = lcnet_style, lcnet_style["tmp"]
    data = {"cal": {NAME: c["s"].x_cal}, "ev": {NAME: c["s"].x_test, "labels": c["s"].y_test}}
    names = {}
    for fused in (True, False):
        config = OptimizeConfig(
            budget=parse_budget("drop<=1%"), min_runs=20, min_seconds=0.2, try_fused_fp32=fused,
            try_accuracy_aware=False, try_latency_aware=False, try_dynamic=False,
        )  # fmt: skip
        report = optimize(
            c["fp32"], calibration=data["cal"], eval_data=data["ev"],
            out=tmp / f"bundle-{fused}", config=config,
        )  # fmt: skip
        names[fused] = {x.name: x for x in report.candidates}
    assert "fp32-fused" not in names[False]
    fused_candidate = names[True]["fp32-fused"]
    assert fused_candidate.error is None and fused_candidate.artifact is not None
    assert fused_candidate.artifact.details["fusions"].startswith("folded 5 constant")
    assert fused_candidate.quality is not None and fused_candidate.quality.agreement == 1.0
    ref = _run(c["fp32"], c["s"].x_test)
    got = _run(fused_candidate.artifact.path, c["s"].x_test)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
