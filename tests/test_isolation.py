"""The agent stays light: importing it pulls in neither torch, the SDK, onnx nor sklearn."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "sdk", "onnx", "sklearn", "tensorflow", "litert_torch")


def _modules_after(code: str) -> set[str]:
    probe = f"{code}\nimport sys\nprint(' '.join(sorted(m.split('.')[0] for m in sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_device_agent_is_light() -> None:
    loaded = _modules_after("import device_agent, device_agent.cli, device_agent.bundle")
    assert "numpy" in loaded  # the probe really ran
    assert not loaded & set(HEAVY), loaded & set(HEAVY)


def test_import_sdk_is_lazy() -> None:
    loaded = _modules_after("import sdk, sdk.cli")
    assert not loaded & {"torch", "onnx", "sklearn", "onnxruntime"}
