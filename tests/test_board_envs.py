"""The agent installed the way a board gets it, away from the developer's ``.venv``.

Bundles are made here on the host side (the digits CNN through ``sdk.export``/``sdk.package``)
and run by ``edgeship-agent`` in three environments that ``scripts/board_envs.py`` builds and
caches under ``.cache/board-envs/``:

* **agent-only virtualenv**: ``edgeship[agent]`` installed from a wheel, nothing else. torch is
  not importable, ``import device_agent`` loads none of sdk/torch/onnx/sklearn, and the ONNX
  bundle checks and predicts exactly what the host's ONNX Runtime predicts.
* **numpy<2 + tflite-runtime 2.14.0**: the project without a runtime extra, as on a board whose
  numpy is older than 2. A LiteRT int8 bundle (static_wi8_ai8) checks there with tflite-runtime
  and in ``.venv`` with ai-edge-litert, and the two agree on the test digits.
* **emulated Raspberry Pi 4**: Debian bookworm's arm64 Python 3.11 under qemu-user with aarch64
  wheels; ``platform.machine()`` is aarch64, the ONNX bundle checks (signed and encrypted too,
  with cryptography's aarch64 wheel), and its predictions match the host's.

A prerequisite that cannot be had (no package index, no Debian archive) fails these tests with
the setup step's message; the one skip is the ``unshare -m`` variant where mount namespaces are
not permitted, and the qemu ``-L`` sysroot variant covers that case.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from tests.script_modules import load_script

pytestmark = [pytest.mark.slow, pytest.mark.board]

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"torch", "sdk", "onnx", "sklearn", "tensorflow", "litert_torch"}
PI_DIGITS = 64  # test digits run on the emulated Pi (each qemu start costs seconds)
MIN_TFLITE_AGREEMENT = 0.99

T = TypeVar("T")


board_envs = load_script("board_envs", ROOT / "scripts" / "board_envs.py")

# Runs inside each environment: load the bundle through device_agent, predict every sample in
# batches the model accepts, report what ran and which heavy modules got imported.
PREDICT = """
import json, platform, sys
import numpy as np
import device_agent
from device_agent import load_bundle, open_session

bundle = load_bundle(sys.argv[1])
session = open_session(bundle.model_path, runtime=bundle.manifest.model.runtime, threads=1)
x = np.load(sys.argv[2])["image"]
name = bundle.manifest.io.inputs[0].name
first = session.io.inputs[0].shape[0]
step = first if isinstance(first, int) else len(x)
logits = np.concatenate([session.run({name: x[i : i + step]})[0] for i in range(0, len(x), step)])
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[3].split(",")))
print(json.dumps({
    "runtime": f"{session.runtime} {session.runtime_version}",
    "machine": platform.machine(),
    "numpy": np.__version__,
    "device_agent": device_agent.__file__,
    "heavy": heavy,
    "logits": logits.tolist(),
}))
"""


# Imports every module of the installed device_agent; prints where it lives, the modules, and
# the top-level packages loaded.
IMPORT_ALL = """
import importlib, pkgutil, sys
import device_agent
names = [m.name for m in pkgutil.walk_packages(device_agent.__path__, "device_agent.")]
for name in names:
    importlib.import_module(name)
print(device_agent.__file__)
print(" ".join(names))
print(" ".join(sorted({m.split(".")[0] for m in sys.modules})))
"""


def _setup(build: Callable[[], T]) -> T:
    try:
        return build()
    except board_envs.SetupError as exc:
        message = f"board environment setup failed: {exc}"
    pytest.fail(message, pytrace=False)  # outside the except: no chained traceback


def _run(
    cmd: Sequence[str | Path], cwd: Path, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def _ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _predict(python: Sequence[str | Path], bundle: Path, data: Path, cwd: Path) -> dict[str, Any]:
    script = cwd / "predict.py"
    script.write_text(PREDICT)
    out = _ok(_run([*python, script, bundle, data, ",".join(sorted(HEAVY))], cwd))
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return result


def _check_lines(stdout: str) -> dict[str, str]:
    """``edgeship-agent check`` output as {first word: rest of the line}."""
    lines = [ln.split(None, 1) for ln in stdout.strip().splitlines() if ln.strip()]
    return {parts[0]: parts[1] if len(parts) > 1 else "" for parts in lines}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working directory outside the checkout, so ``device_agent`` comes from the install."""
    return tmp_path_factory.mktemp("board-envs")


@pytest.fixture(scope="module")
def onnx_bundle(digits_onnx: Any, work: Path) -> Path:
    import sdk

    return Path(sdk.package(digits_onnx, work / "digits-onnx", name="digits").root)


@pytest.fixture(scope="module")
def int8_bundle(trained_digits: tuple[Any, float], digits_splits: Any, work: Path) -> Path:
    """The digits CNN as a LiteRT int8 bundle: export (batch 1), static_wi8_ai8, package."""
    import torch

    import sdk
    from sdk.zoo.digits import INPUT_NAME, OUTPUT_NAME

    model, _ = trained_digits
    tflite = sdk.export(
        model,
        (torch.from_numpy(digits_splits.x_cal[:1]),),
        to="tflite",
        path=work / "digits.tflite",
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
    )
    int8 = sdk.quantize_tflite(
        tflite,
        {INPUT_NAME: digits_splits.x_cal},
        work / "digits.int8.tflite",
        recipe="static_wi8_ai8",
    )
    return Path(sdk.package(int8, work / "digits-int8", name="digits-int8").root)


@pytest.fixture(scope="module")
def test_digits(digits_splits: Any, work: Path) -> Path:
    path = work / "test-digits.npz"
    np.savez(path, image=digits_splits.x_test, labels=digits_splits.y_test)
    return path


@pytest.fixture(scope="module")
def pi_digits(digits_splits: Any, work: Path) -> Path:
    path = work / "pi-digits.npz"
    np.savez(path, image=digits_splits.x_test[:PI_DIGITS], labels=digits_splits.y_test[:PI_DIGITS])
    return path


# ---------------------------------------------------------------------------------------------
# 1. agent-only virtualenv


@pytest.fixture(scope="module")
def agent_venv() -> Path:
    return Path(_setup(board_envs.agent_venv))


def test_agent_venv_holds_the_agent_and_no_torch(agent_venv: Path, work: Path) -> None:
    python = board_envs.venv_python(agent_venv)
    proc = _run([python, "-c", "import torch"], work)
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr, proc.stderr
    listing = _ok(
        _run(
            [
                python,
                "-c",
                "import importlib.metadata as m; "
                "print(' '.join(d.metadata['Name'].lower() for d in m.distributions()))",
            ],
            work,
        )
    )
    installed = set(listing.split())
    assert {"edgeship", "numpy", "onnxruntime", "paho-mqtt"} <= installed, installed
    assert not installed & {"torch", "onnx", "scikit-learn", "ai-edge-litert", "tflite-runtime"}


def test_agent_venv_import_leaves_heavy_modules_out(agent_venv: Path, work: Path) -> None:
    out = _ok(_run([board_envs.venv_python(agent_venv), "-c", IMPORT_ALL], work)).splitlines()
    assert Path(out[0]).is_relative_to(agent_venv), f"device_agent imported from {out[0]}"
    assert "device_agent.cli" in out[1].split()  # the probe really imported the modules
    loaded = set(out[2].split())
    assert "numpy" in loaded
    assert not loaded & HEAVY, loaded & HEAVY


def test_agent_venv_checks_and_runs_the_onnx_bundle(
    agent_venv: Path, onnx_bundle: Path, test_digits: Path, work: Path
) -> None:
    check = _check_lines(
        _ok(_run([agent_venv / "bin" / "edgeship-agent", "check", onnx_bundle], work))
    )
    assert "ok" in check
    assert check["runtime"].startswith("onnxruntime ")
    assert "match their SHA-256" in check["verified"], check["verified"]

    board = _predict([board_envs.venv_python(agent_venv)], onnx_bundle, test_digits, work)
    host = _predict([sys.executable], onnx_bundle, test_digits, work)
    assert Path(board["device_agent"]).is_relative_to(agent_venv)
    assert board["heavy"] == []  # running a bundle pulls in nothing heavy either
    np.testing.assert_array_equal(np.argmax(board["logits"], 1), np.argmax(host["logits"], 1))
    np.testing.assert_allclose(board["logits"], host["logits"], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 2. numpy<2 + tflite-runtime, against ai-edge-litert in .venv


@pytest.fixture(scope="module")
def tflite_venv() -> Path:
    return Path(_setup(board_envs.tflite_venv))


def test_tflite_runtime_checks_the_int8_bundle(
    tflite_venv: Path, int8_bundle: Path, work: Path
) -> None:
    out = _ok(_run([tflite_venv / "bin" / "edgeship-agent", "check", int8_bundle], work))
    check = _check_lines(out)
    assert "ok" in check, out
    assert check["runtime"].startswith("litert tflite-runtime 2.14.0"), check["runtime"]
    assert ", numpy 1." in check["host"], check["host"]


def test_every_agent_module_imports_with_numpy_1(tflite_venv: Path, work: Path) -> None:
    python = board_envs.venv_python(tflite_venv)
    out = _ok(_run([python, "-c", IMPORT_ALL + "import numpy; print(numpy.__version__)"], work))
    lines = out.splitlines()
    assert Path(lines[0]).is_relative_to(tflite_venv)
    assert "device_agent.runtime" in lines[1].split()
    assert lines[3].startswith("1."), lines[3]


def test_ai_edge_litert_checks_the_int8_bundle(int8_bundle: Path, work: Path) -> None:
    out = _ok(_run([sys.executable, "-m", "device_agent.cli", "check", int8_bundle], work))
    check = _check_lines(out)
    assert "ok" in check, out
    assert check["runtime"].startswith("litert ai-edge-litert "), check["runtime"]


def test_tflite_runtime_and_ai_edge_litert_agree(
    tflite_venv: Path, int8_bundle: Path, test_digits: Path, digits_splits: Any, work: Path
) -> None:
    old = _predict([board_envs.venv_python(tflite_venv)], int8_bundle, test_digits, work)
    new = _predict([sys.executable], int8_bundle, test_digits, work)
    assert old["runtime"].startswith("litert tflite-runtime") and old["numpy"].startswith("1.")
    assert new["runtime"].startswith("litert ai-edge-litert")
    assert old["heavy"] == []
    top_old = np.argmax(old["logits"], 1)
    top_new = np.argmax(new["logits"], 1)
    agreement = float((top_old == top_new).mean())
    accuracy = float((top_old == digits_splits.y_test).mean())
    print(
        f"\nint8 bundle on {len(top_old)} test digits: tflite-runtime vs ai-edge-litert top-1 "
        f"agreement {agreement:.2%}, max |logit diff| "
        f"{np.abs(np.subtract(old['logits'], new['logits'])).max():.3g}, "
        f"tflite-runtime accuracy {accuracy:.2%}"
    )
    assert agreement >= MIN_TFLITE_AGREEMENT


# ---------------------------------------------------------------------------------------------
# 3. emulated Raspberry Pi 4


@pytest.fixture(scope="module")
def pi() -> list[str]:
    """The emulated Pi's Python command prefix (``unshare -m`` where permitted)."""
    return _setup(board_envs.pi_python)


def test_pi_is_an_aarch64_raspberry_pi_4(pi: list[str], work: Path) -> None:
    probe = "import platform; print(platform.machine()); print(open('/proc/cpuinfo').read())"
    out = _ok(_run([*pi, "-c", probe], work))
    machine, cpuinfo = out.split("\n", 1)
    assert machine == "aarch64"
    assert "Raspberry Pi 4 Model B" in cpuinfo and "CPU part\t: 0xd08" in cpuinfo
    # The fixture is seen by the emulated Python only, never by the host.
    assert "Raspberry Pi" not in Path("/proc/cpuinfo").read_text()


@pytest.mark.parametrize("method", ["mount", "sysroot"])
def test_pi_checks_the_onnx_bundle(method: str, onnx_bundle: Path, work: Path) -> None:
    if method == "mount" and board_envs.cpuinfo_method() != "mount":
        pytest.skip("unshare -m with a bind mount is not permitted here; the sysroot case runs")
    prefix = _setup(lambda: board_envs.pi_python(method))
    out = _ok(_run([*prefix, "-m", "device_agent.cli", "check", onnx_bundle], work))
    check = _check_lines(out)
    assert "ok" in check, out
    assert check["runtime"].startswith("onnxruntime "), check["runtime"]
    assert check["host"].startswith("aarch64, "), check["host"]


def test_pi_predicts_what_the_host_predicts(
    pi: list[str], onnx_bundle: Path, pi_digits: Path, work: Path
) -> None:
    board = _predict(pi, onnx_bundle, pi_digits, work)
    host = _predict([sys.executable], onnx_bundle, pi_digits, work)
    assert board["machine"] == "aarch64" and host["machine"] != "aarch64"
    assert Path(board["device_agent"]).is_relative_to(board_envs.CACHE / "pi-agent")
    assert board["heavy"] == []
    np.testing.assert_array_equal(np.argmax(board["logits"], 1), np.argmax(host["logits"], 1))
    np.testing.assert_allclose(board["logits"], host["logits"], atol=1e-4)


def test_pi_checks_a_signed_and_encrypted_bundle(
    pi: list[str], onnx_bundle: Path, work: Path
) -> None:
    """cryptography's aarch64 wheel on the Pi's Python 3.11: the Ed25519 signature and the
    AES-GCM model are checked there as on the host, and a changed manifest is refused."""
    import shutil

    from sdk.signing import encrypt_bundle, generate_model_key, generate_signing_key, sign_bundle

    bundle = Path(shutil.copytree(onnx_bundle, work / "digits-signed"))
    keys = work / "pi-keys"
    signing, model_key = generate_signing_key(keys), generate_model_key(keys)
    assert signing.public is not None
    encrypt_bundle(bundle, model_key.private)
    sign_bundle(bundle, signing.private)
    check = [*pi, "-m", "device_agent.cli", "check", bundle, "--runs", "1"]
    trust = ["--trusted-key", signing.public, "--model-key", model_key.private]
    out = _ok(_run([*check, *trust], work))
    lines = _check_lines(out)
    assert "ok" in lines, out
    assert lines["signature"] == f"signed by {signing.key_id}, verified against trusted_keys"
    assert lines["decrypted"].startswith("model.onnx.enc (aes-256-gcm"), out
    assert lines["host"].startswith("aarch64, "), lines["host"]
    manifest = bundle / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"digits"', '"digitz"'))
    refused = _run([*check, *trust], work)
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    assert "manifest.json was changed after it was signed" in refused.stderr
