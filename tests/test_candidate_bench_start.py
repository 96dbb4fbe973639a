"""A candidate timing process that cannot be started is an answer saying why, not a crash.

The agent starts the process that times a candidate from its own ``sys.executable``
(``device_agent.candidate_bench``). Where the kernel refuses that program (``ENOEXEC``: an
emulated Python under qemu-user with no binfmt_misc rule, as the emulated Pi of
``scripts/board_envs.py`` is without its ``binfmt`` method) or the Python does not know its
program (``sys.executable`` empty, as in some embedded Pythons), a real agent on the shared
Mosquitto answers ``benchmark`` ``ok: false`` naming the cause, keeps serving its application,
and times the next candidate once it can start its Python again. Here the refused program is a
file the kernel cannot run, put in ``sys.executable`` of this process (the agent's).
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from device_agent.candidate_bench import time_candidate
from device_agent.contracts.bundle import IOSpec
from device_agent.contracts.commands import BenchmarkArgs
from device_agent.errors import EdgeshipError
from sdk.remote import RemoteError
from sdk.remote_bench import benchmark_candidate
from tests.helpers import write_mlp_onnx
from tests.test_deploy import BROKER, FEATURES, _bundle, _device, _fleet

FAST: dict[str, Any] = {"min_runs": 20, "min_seconds": 0.1, "warmup_runs": 2, "max_seconds": 60.0}


def _not_a_program(where: Path) -> Path:
    """An executable file with no ELF header and no ``#!`` line: execve fails with ENOEXEC."""
    path = where / "python3.11"
    path.write_bytes(b"\x00\x01 neither an ELF file nor a script\n")
    path.chmod(0o755)
    return path


@pytest.mark.parametrize("executable", ["not-a-program", ""])
def test_time_candidate_says_why_its_process_cannot_start(
    executable: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = write_mlp_onnx(tmp_path / "m.onnx", features=8, seed=0)
    program = str(_not_a_program(tmp_path)) if executable else ""
    monkeypatch.setattr(sys, "executable", program)
    args = BenchmarkArgs(min_runs=1, min_seconds=0.0, max_seconds=30.0)
    with pytest.raises(EdgeshipError) as info:
        time_candidate(model, "onnx", args, IOSpec(inputs=(), outputs=()), stop=threading.Event())
    message = str(info.value)
    if executable:
        assert f"could not be started ({program}: Exec format error)" in message, message
        assert "binfmt_misc" in message, message
    else:
        assert "sys.executable is empty" in message, message


def test_an_agent_that_cannot_start_its_python_answers_and_keeps_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = _bundle(tmp_path, "v1", "1", features=FEATURES, seed=0)
    candidate = write_mlp_onnx(tmp_path / "wide.onnx", features=FEATURES, hidden=256, seed=5)
    fleet = _fleet()
    with _device(bundle, tmp_path / "state", fleet) as (agent, traffic):
        monkeypatch.setattr(sys, "executable", str(_not_a_program(tmp_path)))
        with pytest.raises(RemoteError, match=r"could not be started .*Exec format error"):
            benchmark_candidate(BROKER, fleet, "pi-d", candidate, **FAST)
        traffic.wait_count(5)
        assert traffic.failures == [] and agent.health()["ok"]
        monkeypatch.undo()  # the agent's Python can be started again: the same file is timed
        report = benchmark_candidate(BROKER, fleet, "pi-d", candidate, **FAST)
        assert report["runs"] >= FAST["min_runs"] and report["pid"] != os.getpid()
