"""optimize with a PyTorch model: ONNX Runtime and LiteRT candidates both searched where the
board may run either, one runtime kept to on request or where the board has only one, and a
``.pt2`` program from the CLI (sdk/optimize/runtimes.py).

Every search here runs real exports (torch.onnx, litert-torch), real quantizers and real
ONNX Runtime / LiteRT sessions on a small network trained on scikit-learn's digits in the test.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.bundle import load_bundle
from sdk.budget import parse_budget
from sdk.cli.app import main
from sdk.errors import ConfigError
from sdk.optimize import OptimizeConfig, optimize
from sdk.targets import get_target

QUICK: dict[str, Any] = {
    "min_runs": 10,
    "min_seconds": 0.02,
    "confirm_rounds": 1,
    "detector": None,
    "static_methods": ("minmax",),
    "try_all_ops": False,
    "try_dynamic": False,
    "use_calibration_cache": False,
}


@pytest.fixture(scope="module")
def digits_mlp() -> tuple[Any, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A small MLP trained on digits (seconds), its calibration and eval data."""
    import torch

    from sdk.zoo.digits import load_digits_splits, train_digits_cnn

    s = load_digits_splits(0)
    net = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)
    )
    model, acc = train_digits_cnn(s, epochs=10, model=net)
    assert acc > 0.85
    return model, {"image": s.x_cal[:200]}, {"image": s.x_test, "labels": s.y_test}


def _by_name(report: Any) -> dict[str, Any]:
    return {c.name: c for c in report.candidates}


def test_a_module_on_a_board_with_both_runtimes_gets_candidates_of_both(
    digits_mlp: Any, tmp_path: Path
) -> None:
    model, cal, ev = digits_mlp
    config = OptimizeConfig(budget=parse_budget("drop<=3%"), keep_candidates=False, **QUICK)
    report = optimize(model, calibration=cal, eval_data=ev, out=tmp_path / "b", config=config)
    by = _by_name(report)
    assert by["fp32"].artifact.format == "onnx"
    onnx_int8, litert_int8 = by["ort-static-int8-minmax"], by["litert-static_wi8_ai8"]
    for cand, fmt, runtime in (
        (onnx_int8, "onnx", "onnxruntime"),
        (litert_int8, "tflite", "litert"),
    ):
        assert cand.error is None and cand.artifact.format == fmt, cand.error
        assert cand.bench.to_dict()["runtime"] == runtime
        assert cand.quality.accuracy is not None and cand.accuracy_drop < 0.03
    assert "litert-weight_only_wi8_afp32" in by
    assert any("ONNX Runtime and LiteRT candidates both searched" in n for n in report.notes)
    chosen = report.chosen_candidate.artifact
    manifest = load_bundle(report.bundle).manifest.model
    assert manifest.runtime == ("litert" if chosen.format == "tflite" else "onnxruntime")
    # keep_candidates=False leaves nothing beside the bundle: the exports went with the rest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_a_board_with_litert_only_is_searched_from_a_float_tflite_export(
    digits_mlp: Any, tmp_path: Path
) -> None:
    model, cal, ev = digits_mlp
    target = get_target("rpi4", runtimes=("litert",))
    config = OptimizeConfig(target=target, budget=parse_budget("drop<=3%"), **QUICK)
    report = optimize(model, calibration=cal, eval_data=ev, out=tmp_path / "b", config=config)
    by = _by_name(report)
    assert by["fp32"].artifact.format == "tflite" and by["fp32"].quality.accuracy > 0.85
    made = [c for c in report.candidates if c.artifact is not None]
    assert {c.artifact.format for c in made} == {"tflite"}
    assert by["litert-static_wi8_ai8"].error is None
    assert not any(name.startswith("ort-") for name in by)
    assert any("may name LiteRT only" in n for n in report.notes)
    assert load_bundle(report.bundle).manifest.model.runtime == "litert"
    from device_agent.cli import main as agent_main

    assert agent_main(["check", str(report.bundle)]) == 0


def test_an_onnx_model_with_its_module_for_litert_keeps_out_of_a_users_folder(
    digits_mlp: Any, tmp_path: Path
) -> None:
    """An ONNX file with ``torch_model`` for a LiteRT-only board exports the float TFLite into
    ``<out>-source``: a folder of that name the user already has is refused, untouched."""
    import torch

    from sdk.export import export
    from sdk.optimize.runtimes import SOURCE_MARK
    from sdk.zoo.digits import INPUT_NAME

    model, cal, _ = digits_mlp
    onnx = tmp_path / "m.onnx"
    export(model, torch.from_numpy(cal[INPUT_NAME][:2]), to="onnx", path=onnx,
           input_names=[INPUT_NAME])  # fmt: skip
    mine = tmp_path / "b-source" / "model.tflite"
    mine.parent.mkdir()
    mine.write_text("the user's")
    config = OptimizeConfig(target=get_target("rpi4", runtimes=("litert",)), **QUICK)
    with pytest.raises(ConfigError, match="b-source already exists and was not made by edgeship"):
        optimize(onnx, calibration=cal, out=tmp_path / "b", config=config, torch_model=model)
    assert mine.read_text() == "the user's" and sorted(mine.parent.iterdir()) == [mine]
    report = optimize(onnx, calibration=cal, out=tmp_path / "c", config=config, torch_model=model)
    assert _by_name(report)["fp32"].artifact.format == "tflite"
    assert (tmp_path / "c-source" / SOURCE_MARK).is_file()


def test_runtime_onnxruntime_keeps_to_onnx(digits_mlp: Any, tmp_path: Path) -> None:
    model, cal, ev = digits_mlp
    config = OptimizeConfig(budget=parse_budget("drop<=3%"), runtime="onnxruntime", **QUICK)
    report = optimize(model, calibration=cal, eval_data=ev, out=tmp_path / "b", config=config)
    assert {c.artifact.format for c in report.candidates if c.artifact} == {"onnx"}
    assert not any(c.name.startswith("litert") for c in report.candidates)
    assert not any(s.name.startswith("litert") for s in report.skipped)
    assert not any("both searched" in n for n in report.notes)


def test_runtime_mistakes_are_one_line_errors(digits_mlp: Any, tmp_path: Path) -> None:
    from sdk.zoo.digits import INPUT_NAME

    model, cal, _ = digits_mlp
    with pytest.raises(ConfigError, match="auto, onnxruntime or litert"):
        OptimizeConfig(runtime="tensorrt")
    with pytest.raises(ConfigError, match="runtime is onnxruntime"):
        OptimizeConfig(runtime="onnxruntime", litert_recipes=("static_wi8_ai8",))
    with pytest.raises(ConfigError, match="runtimes takes a tuple"):
        get_target("rpi4", runtimes=("cuda",))
    onnx = tmp_path / "m.onnx"
    import torch

    from sdk.export import export

    export(model, torch.from_numpy(cal[INPUT_NAME][:2]), to="onnx", path=onnx,
           input_names=[INPUT_NAME])  # fmt: skip
    litert_only = OptimizeConfig(target=get_target("rpi4", runtimes=("litert",)), **QUICK)
    with pytest.raises(ConfigError, match=r"may name LiteRT only.*float \.tflite"):
        optimize(onnx, calibration=cal, out=tmp_path / "b", config=litert_only)
    onnx_only = replace(litert_only, target=get_target("rpi4", runtimes=("onnxruntime",)))
    with pytest.raises(ConfigError, match="rpi4 has onnxruntime only"):
        optimize(
            onnx, calibration=cal, out=tmp_path / "b", config=replace(onnx_only, runtime="litert")
        )
    with pytest.raises(ConfigError, match="leave torch_model out"):
        optimize(model, calibration=cal, out=tmp_path / "b", config=onnx_only, torch_model=model)
    with pytest.raises(ConfigError, match="pass calibration data"):
        optimize(model, out=tmp_path / "b", config=onnx_only)
    with pytest.raises(ConfigError, match="does not run on the calibration data"):
        optimize(model, calibration={"image": np.zeros((4, 3), np.float32)},
                 out=tmp_path / "b", config=onnx_only)  # fmt: skip
    assert not (tmp_path / "b").exists()


def test_the_cli_takes_a_pt2_program(
    digits_mlp: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    model, cal, ev = digits_mlp
    x = torch.from_numpy(cal["image"][:3])
    dynamic = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(dynamic, tmp_path / "dyn.pt2")
    torch.export.save(torch.export.export(model, (x[:2],)), tmp_path / "two.pt2")
    np.savez(tmp_path / "cal.npz", **cal)
    np.savez(tmp_path / "ev.npz", **ev)
    common = ["--calibration", str(tmp_path / "cal.npz"), "--eval", str(tmp_path / "ev.npz"),
              "--budget", "drop<=3%", "--runs", "10", "--seconds", "0.02", "--methods", "minmax",
              "--detector", "none"]  # fmt: skip
    out = tmp_path / "bundle"
    rc = main(["optimize", str(tmp_path / "dyn.pt2"), "-o", str(out), "--runtime", "onnxruntime",
               *common])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "ort-static-int8-minmax" in text and "litert-" not in text
    assert load_bundle(out).manifest.model.runtime == "onnxruntime"
    rc = main(["optimize", str(tmp_path / "two.pt2"), "-o", str(tmp_path / "b2"), *common])
    err = capsys.readouterr().err
    assert rc == 2 and "fixed batch of 2" in err and "Traceback" not in err
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    rc = main(["optimize", str(tmp_path / "junk.pt2"), "-o", str(tmp_path / "b3"), *common])
    err = capsys.readouterr().err
    assert rc == 2 and "not a program saved with torch.export.save" in err


def test_inputs_are_matched_to_forward_arguments_by_name(tmp_path: Path) -> None:
    """Two inputs given in another order than forward's arguments are matched by name (fed by
    position under swapped names they would be silently wrong); a missing or unknown name is
    a one-line error; the caller's module keeps its training mode; and a -source folder the
    user already had is refused up front and left as it was."""
    import torch

    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.fc(a * 2 - b)

    torch.manual_seed(0)
    net = TwoInputs().train()
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((64, 8)).astype(np.float32) for _ in range(2))
    kept = tmp_path / "b-source" / "mine.txt"
    kept.parent.mkdir()
    kept.write_text("the user's")
    config = OptimizeConfig(runtime="onnxruntime", keep_candidates=False, **QUICK)
    refused = r"b-source already exists and was not made by edgeship: .* choose another -o"
    with pytest.raises(ConfigError, match=refused):
        optimize(net, calibration={"b": b, "a": a}, out=tmp_path / "b", config=config)
    assert sorted(p.name for p in kept.parent.iterdir()) == ["mine.txt"]
    kept_files = replace(config, keep_candidates=True)  # the fp32 export stays to be read
    report = optimize(net, calibration={"b": b, "a": a}, out=tmp_path / "b2", config=kept_files)
    assert net.training  # given back as it came
    from device_agent.runtime import open_session

    fp32 = report.candidates[0].artifact
    assert [s.name for s in fp32.io.inputs] == ["a", "b"]
    with torch.no_grad():
        want = net.eval()(torch.from_numpy(a[:4]), torch.from_numpy(b[:4])).numpy()
    got = open_session(fp32.path).run({"a": a[:4], "b": b[:4]})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # The bundle holds fp32 or an int8 model, whichever this CPU ran faster: int8 rounds (2%
    # here), swapped inputs (b * 2 - a) would be off by whole units.
    shipped = open_session(report.bundle / "model.onnx").run({"a": a[:4], "b": b[:4]})[0]
    np.testing.assert_allclose(shipped, want, rtol=0.1, atol=0.1)
    assert kept.read_text() == "the user's"
    with pytest.raises(ConfigError, match=r"named as the model's arguments \['a', 'b'\]: 'b'"):
        optimize(net, calibration={"a": a, "c": b}, out=tmp_path / "c", config=config)
    assert not (tmp_path / "c-source").exists()  # a failed run leaves no folder behind


def test_a_source_folder_an_earlier_search_made_is_replaced(tmp_path: Path) -> None:
    """Re-running optimize with the same -o works: the folder the first run made carries the
    mark and is replaced; a folder without it (the user's) is refused and left as it was."""
    from sdk.optimize.runtimes import SOURCE_MARK, make_source_folder, refuse_existing

    ours = tmp_path / "out-source"
    refuse_existing(ours)
    make_source_folder(ours)
    (ours / "model.onnx").write_text("old export")
    refuse_existing(ours)  # an earlier run's: replaced
    assert not ours.exists()
    mine = tmp_path / "mine-source"
    mine.mkdir()
    (mine / "model.onnx").write_text("the user's")
    with pytest.raises(ConfigError, match="not made by edgeship"):
        refuse_existing(mine)
    assert (mine / "model.onnx").read_text() == "the user's" and not (mine / SOURCE_MARK).exists()
    link = tmp_path / "link-source"
    link.symlink_to(tmp_path / "nowhere")  # dangling, then to a marked folder: refused both
    with pytest.raises(ConfigError, match="symbolic link"):
        refuse_existing(link)
    make_source_folder(ours)
    link.unlink()
    link.symlink_to(ours)
    with pytest.raises(ConfigError, match="symbolic link"):
        refuse_existing(link)
    assert (ours / SOURCE_MARK).is_file()


def test_a_float_tflite_search_says_nothing_of_ort_weights_on_a_saturating_host(
    digits_mlp: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A float .tflite gets LiteRT candidates only: the 7-bit rule for ONNX Runtime's int8
    weights, decided from the host's CPU flags (faked: AVX2 without VNNI), does not apply and
    is not noted (a review found the note on a search without an ONNX Runtime candidate)."""
    import torch

    import sdk
    import sdk.isa

    monkeypatch.setattr(sdk.isa, "cpu_flags", lambda root="/": frozenset({"avx2", "fma"}))
    model, cal, ev = digits_mlp
    tflite = sdk.export(
        model, (torch.from_numpy(cal["image"][:1]),), to="tflite",
        path=tmp_path / "digits.tflite", input_names=["image"], output_names=["logits"],
    )  # fmt: skip
    config = OptimizeConfig(budget=parse_budget("drop<=3%"), **QUICK)
    report = optimize(tflite.path, calibration=cal, eval_data=ev, out=tmp_path / "b", config=config)
    assert not any(c.name.startswith("ort-") for c in report.candidates)
    assert any(c.name.startswith("litert-") for c in report.candidates)
    assert not any("7-bit" in n for n in report.notes), report.notes
