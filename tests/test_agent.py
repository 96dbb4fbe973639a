"""The Agent API on a real digits bundle: predictions, outlier scores, errors, threads, service."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import Agent, AgentConfig, InputError, open_session
from device_agent.config import load_settings
from device_agent.errors import ConfigError


def _config(tmp_path: Path, **kw: Any) -> AgentConfig:
    return AgentConfig(device_id="pi-test", fleet="lab", state_dir=tmp_path / "state", **kw)


def test_predict_matches_the_bare_runtime_and_scores(
    digits_bundle: Path, digits_splits: Any, tmp_path: Path
) -> None:
    x = digits_splits.x_test[:16]
    bare = open_session(digits_bundle / "model.onnx").run({"image": x})[0]
    with Agent.from_bundle(digits_bundle, _config(tmp_path)) as agent:
        result = agent.predict({"image": x})
        np.testing.assert_allclose(result.outputs[0], bare, rtol=1e-5, atol=1e-5)
        assert result.scores is not None and result.scores.shape == (16,)
        assert result.labels == [str(int(c)) for c in bare.argmax(1)]
        assert result.latency_s > 0
        noise = np.random.default_rng(0).random((8, 1, 8, 8), dtype=np.float32)
        flagged = agent.predict({"image": noise})
        assert flagged.is_outlier.all(), flagged.scores
        assert flagged.scores is not None and flagged.scores.min() > result.scores.max()


@pytest.mark.parametrize(
    ("feed", "needle"),
    [
        ({"image": np.zeros((1, 1, 7, 7), np.float32)}, "shape (1, 1, 7, 7)"),
        ({"image": np.zeros((1, 1, 8, 8), np.int64)}, "dtype int64"),
        ({"pixels": np.zeros((1, 1, 8, 8), np.float32)}, "missing ['image']"),
        ({"image": [[1, 2], [3]]}, "cannot be read as an array"),
    ],
)
def test_bad_input_is_a_clear_error_counted_in_telemetry(
    digits_bundle: Path, digits_splits: Any, tmp_path: Path, feed: Any, needle: str
) -> None:
    agent = Agent.from_bundle(digits_bundle, _config(tmp_path, window_s=3600))
    with agent:
        with pytest.raises(InputError) as info:
            agent.predict(feed)
        assert needle in str(info.value)
        agent.predict({"image": digits_splits.x_test[:2]})  # still serving
    assert agent.last_window is not None  # close() publishes the last window
    assert agent.last_window["errors"] == 1 and agent.last_window["inferences"] == 2


def test_thread_safe_under_concurrent_predicts(
    digits_bundle: Path, digits_splits: Any, tmp_path: Path
) -> None:
    x = digits_splits.x_test[:40]
    expected = open_session(digits_bundle / "model.onnx").run({"image": x})[0].argmax(1)
    agent = Agent.from_bundle(digits_bundle, _config(tmp_path, window_s=3600)).start()
    errors: list[str] = []

    def worker(offset: int) -> None:
        for i in range(50):
            j = (offset + i) % len(x)
            got = agent.predict({"image": x[j : j + 1]}).outputs[0].argmax(1)[0]
            if got != expected[j]:
                errors.append(f"sample {j}: {got} != {expected[j]}")

    threads = [threading.Thread(target=worker, args=(k * 7,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    agent.close()
    assert errors == []
    assert agent.last_window is not None and agent.last_window["inferences"] == 200


def test_settings_precedence_and_typos(tmp_path: Path) -> None:
    toml = tmp_path / "agent.toml"
    toml.write_text(
        'fleet = "from-toml"\nwindow_s = 5\n[agent]\ndevice_id = "pi-toml"\nhttp = "off"\n'
    )
    env = {"EDGESHIP_AGENT_FLEET": "from-env", "EDGESHIP_AGENT_THREADS": "2", "HOME": "/x"}
    agent, run = load_settings(
        toml, env, {"device_id": "pi-cli", "window_s": None, "state_dir": "~/spool"}
    )
    assert agent.state_dir == Path("~/spool").expanduser()
    assert (agent.fleet, agent.device_id, agent.window_s, agent.threads) == (
        "from-env",
        "pi-cli",
        5.0,
        2,
    )
    assert run.http_address() is None
    toml.write_text('brokr_url = "mqtt://x"\n')
    with pytest.raises(ConfigError, match="unknown setting 'brokr_url'"):
        load_settings(toml, {}, {})
    with pytest.raises(ConfigError, match="window_s = 'soon'"):
        load_settings(None, {"EDGESHIP_AGENT_WINDOW_S": "soon"}, {})
    with pytest.raises(ConfigError, match="device_id"):
        load_settings(None, {}, {"device_id": "bad/id#"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[str], timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"agent exited early: {proc.communicate()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return dict(json.loads(resp.read()))
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.2)
    raise AssertionError(f"{url} did not answer in {timeout} s")


def test_service_http_replay_and_sigterm(
    digits_bundle: Path, digits_splits: Any, tmp_path: Path
) -> None:
    port = _free_port()
    replay = tmp_path / "replay.npz"
    np.savez(replay, image=digits_splits.x_test[:20], labels=digits_splits.y_test[:20])
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "device_agent.cli",
            "run",
            "--bundle",
            str(digits_bundle),
            "--http",
            f"127.0.0.1:{port}",
            "--replay",
            str(replay),
            "--replay-rate",
            "200",
            "--window",
            "0.5",
            "--state-dir",
            str(tmp_path / "state"),
            "--device-id",
            "pi-http",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        health = _wait_http(f"http://127.0.0.1:{port}/v1/health", proc)
        assert health["ok"] and health["model"] == "digits-cnn"
        body = json.dumps({"inputs": {"image": digits_splits.x_test[:2].tolist()}}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/predict",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            result = json.loads(resp.read())
        assert len(result["outputs"]["logits"]) == 2 and len(result["scores"]) == 2
        assert result["labels"] == [str(int(y)) for y in digits_splits.y_test[:2]]
        bad = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/predict",
            data=json.dumps({"inputs": {"image": [[1.0]]}}).encode(),
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(bad, timeout=10)
        assert info.value.code == 422 and "shape" in json.loads(info.value.read())["error"]
        # A replay window closes with inferences in it; polled, as a busy machine is slow.
        health: dict[str, Any] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            health = _wait_http(f"http://127.0.0.1:{port}/v1/health", proc)
            if (health.get("last_window") or {}).get("inferences", 0) > 0:
                break
            time.sleep(0.2)
        assert health["last_window"]["inferences"] > 0, health
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_run_without_bundle_is_a_one_line_error(tmp_path: Path) -> None:
    # --state-dir: no deployed bundle there either
    argv = ["run", "--http", "off", "--state-dir", str(tmp_path)]
    out = subprocess.run(
        [sys.executable, "-m", "device_agent.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "no bundle to run: pass --bundle DIR" in out.stderr
