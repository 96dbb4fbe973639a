"""``edgeship-agent check`` on bundles that make libraries raise (issue 11, finding 10).

Before the fix only EdgeshipError was caught: the bundle of finding 3 (a manifest input shape
of [1, 10**12]) made the self-test inference raise MemoryError, and check printed a traceback
and exited 1. Now a bad bundle is one line and exit 2 whatever it makes a library raise, and a
real bug in the agent is one line and exit 3 (``--debug`` shows the traceback).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from device_agent.cli import main
from tests.helpers import write_mlp_onnx


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdk.artifact import read_artifact
    from sdk.package import package

    root = tmp_path_factory.mktemp("check")
    return package(read_artifact(write_mlp_onnx(root / "m.onnx")), root / "bundle").root


def _huge(bundle: Path, tmp_path: Path) -> Path:
    huge = Path(shutil.copytree(bundle, tmp_path / "huge"))
    manifest = json.loads((huge / "manifest.json").read_text())
    manifest["io"]["inputs"][0]["shape"] = [1, 10**12]
    (huge / "manifest.json").write_text(json.dumps(manifest))
    return huge


def test_check_on_the_bundle_of_finding_3_is_one_line_and_exit_2(
    bundle: Path, tmp_path: Path
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "device_agent.cli", "check", str(_huge(bundle, tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "io.inputs[0].shape" in done.stderr and "over the limit" in done.stderr


def test_anything_a_bundle_makes_a_library_raise_is_exit_2(
    bundle: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A MemoryError (or any other foreign exception) while the bundle is loaded, opened or run
    once is the bundle's fault: one line saying what to check. Injected here into the input
    generator, since the manifest contract now refuses shapes that would raise it."""
    import device_agent.benchmark as benchmark

    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise MemoryError("Unable to allocate 3.64 TiB")

    monkeypatch.setattr(benchmark, "sample_inputs", out_of_memory)
    assert main(["check", str(bundle), "--runs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "needs more memory than this device has" in err and "manifest.json" in err

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("line one\nline two")

    monkeypatch.setattr(benchmark, "sample_inputs", broken)
    assert main(["check", str(bundle), "--runs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ValueError: line one" in err, err


def test_a_bug_outside_the_bundle_is_exit_3_with_one_line(
    bundle: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import device_agent.cli as cli

    def bug() -> str:
        raise TypeError("a bug in the agent")

    monkeypatch.setattr(cli.platform, "machine", bug)
    assert main(["check", str(bundle), "--runs", "1"]) == 3
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("edgeship-agent: internal error: TypeError")
    assert err.count("\n") == 1 and "--debug" in err
    assert main(["--debug", "check", str(bundle), "--runs", "1"]) == 3
    assert "Traceback" in capsys.readouterr().err


def test_check_refuses_a_run_count_below_one(bundle: Path, capsys: Any) -> None:
    assert main(["check", str(bundle), "--runs", "0"]) == 2
    assert "--runs must be at least 1" in capsys.readouterr().err
