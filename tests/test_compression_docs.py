"""docs/compression.md's example runs as written, and the doc names every public function."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "compression.md"


def test_doc_names_every_public_function() -> None:
    import importlib

    # By path: sdk.prune, sdk.distill and sdk.quantize are also the functions of those names.
    modules = ("sdk.prune", "sdk.distill", "sdk.quantize.accuracy_aware", "sdk.isa")
    text = DOC.read_text()
    for module in map(importlib.import_module, modules):
        for name in module.__all__:
            if callable(getattr(module, name)) and not name[0].isupper():
                assert f"{name}(" in text, f"docs/compression.md does not show {name}()"


@pytest.mark.slow
def test_example_runs(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(# compression-example.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/compression.md lost its runnable example"
    script = tmp_path / "example.py"
    script.write_text(blocks[0])
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    print(out.stdout)
    assert "50% of channels removed" in out.stdout
    assert "accuracy-aware int8" in out.stdout and "met)" in out.stdout
    assert "'/0/Conv'" in out.stdout and "'/2/Conv'" in out.stdout
    assert "rpi4 False" in out.stdout and "rpi5 True" in out.stdout
    assert (tmp_path / "pruned.int8.onnx").is_file()
