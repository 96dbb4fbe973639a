"""The collector installed the way a fleet server gets it: only ``edgeship[collector]``.

``scripts/board_envs.py`` builds (once, cached under ``.cache/board-envs/collector-venv/``) a
virtualenv from a wheel of the working tree with ``pip install '<wheel>[collector]'`` and nothing
else. In it:

* torch, onnx, onnxruntime and scikit-learn are not installed, and importing every collector
  module loads none of them (nor the host SDK's heavy modules);
* ``edgeship collect`` and ``edgeship-collector`` run against a real Mosquitto started here,
  with SQLite and with PostgreSQL (a fresh schema per run); a message published is stored, and
  ``GET /api/devices``, ``/metrics``, the dashboard and the OpenAPI page ``/docs`` answer 200.

Marked like the agent-only environment's tests (``slow``, ``board``: an environment built under
``.cache/``). A package index that cannot be reached fails the build with its step's message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.contracts.messages import encode, topic
from tests.brokers import Mosquitto, free_port, wait_for
from tests.collector_helpers import status, window
from tests.script_modules import load_script
from tests.test_collector_service import publish_all, publisher
from tests.test_collector_store import pg_available, pg_url

pytestmark = [pytest.mark.slow, pytest.mark.board]

ROOT = Path(__file__).resolve().parents[1]
ML = ("torch", "onnx", "onnxruntime", "sklearn")
FLEET = "install"


board_envs = load_script("board_envs", ROOT / "scripts" / "board_envs.py")

# Runs inside the venv: which ML libraries are installed, and which heavy modules importing
# every collector module (and the collect command's parser) loads.
PROBE = """
import importlib, importlib.util, json, pkgutil, sys
import collector
for m in pkgutil.walk_packages(collector.__path__, "collector."):
    importlib.import_module(m.name)
from sdk.cli import main  # what the edgeship script imports
print(json.dumps({
    "installed": [m for m in sys.argv[1].split(",") if importlib.util.find_spec(m) is not None],
    "loaded": sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[1].split(","))),
    "collector": collector.__file__,
}))
"""


@pytest.fixture(scope="module")
def venv() -> Path:
    try:
        root: Path = board_envs.collector_venv()
    except board_envs.SetupError as exc:
        pytest.fail(f"cannot build the collector-only virtualenv: {exc}")
    return root


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path_factory.mktemp("mosquitto")) as b:
        yield b


def test_the_collector_extra_installs_no_ml_library(venv: Path) -> None:
    python = board_envs.venv_python(venv)
    out = subprocess.run(
        [python, "-c", PROBE, ",".join(ML)],
        cwd=venv, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    probe = json.loads(out.stdout)
    assert probe["installed"] == [], probe  # pip pulled none of them
    assert probe["loaded"] == [], probe
    assert str(probe["collector"]).startswith(str(venv)), probe  # the wheel, not the checkout


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def _stored(port: int) -> int:
    code, body = _get(port, "/api/health")
    if code not in (200, 503):
        return -1
    collector: dict[str, Any] = json.loads(body).get("collector") or {}
    return int(collector.get("stored", -1))


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
@pytest.mark.parametrize("command", [["edgeship", "collect"], ["edgeship-collector"]])
def test_collect_stores_and_serves_from_the_collector_only_install(
    venv: Path, broker: Mosquitto, tmp_path: Path, store: str, command: list[str]
) -> None:
    if store == "sqlite":
        store_url = f"sqlite:///{tmp_path}/fleet.db"
    elif pg_available():
        store_url = pg_url()  # a fresh schema: nothing collides with another run
    else:
        pytest.skip("no PostgreSQL at 127.0.0.1:5432")
    port = free_port()
    fleet = f"{FLEET}-{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen(
        [venv / "bin" / command[0], *command[1:], "--broker", broker.url, "--fleet", fleet,
         "--store", store_url, "--http", f"127.0.0.1:{port}", "--workers", "1"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": ""},
    )  # fmt: skip
    pub = publisher(broker.port)
    try:
        assert wait_for(lambda: _stored(port) == 0 or proc.poll() is not None, 60), proc.poll()
        assert proc.poll() is None, proc.communicate(timeout=10)
        now, rng = time.time(), np.random.default_rng(0)
        # The API answers before the broker session has subscribed: the status goes retained
        # (as agents send it), so it reaches the collector whenever its subscription lands, and
        # the telemetry follows once something was stored (the subscription is then in place).
        pub.publish(
            topic(fleet, "pi-1", "status"), encode(status("pi-1", 1, ts=now)), qos=1, retain=True
        ).wait_for_publish(10)
        assert wait_for(lambda: _stored(port) == 1, 60), _get(port, "/api/health")
        publish_all(pub, [
            (topic(fleet, "pi-1", "telemetry"), encode(window("pi-1", 2, rng=rng, ts=now))),
        ])  # fmt: skip
        assert wait_for(lambda: _stored(port) == 2, 60), _get(port, "/api/health")
        # The fleet state is a snapshot renewed after each commit (or cache_s): wait for it.
        devices = lambda: _get(port, f"/api/devices?fleet={fleet}")  # noqa: E731
        assert wait_for(lambda: b'"pi-1"' in devices()[1], 10), devices()
        assert devices()[0] == 200
        code, body = _get(port, "/metrics")
        assert code == 200 and b"edgeship_" in body, (code, body[:300])
        code, body = _get(port, "/")
        assert code == 200 and b"<html" in body.lower(), (code, body[:300])
        code, body = _get(port, "/docs")
        assert code == 200 and b"/docs/assets/swagger-ui-bundle.js" in body, (code, body[:300])
        code, body = _get(port, "/docs/assets/swagger-ui-bundle.js")  # offline: from a wheel
        assert code == 200 and b"SwaggerUIBundle" in body, (code, body[:300])
    finally:
        pub.disconnect()
        pub.loop_stop()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        if store == "postgresql":
            from collector.store import PostgresStore

            pg = PostgresStore(store_url, migrate=False)
            pg.drop_schema()
            pg.close()
    assert proc.returncode == 0, err
    assert "stopped: 2 received, 2 stored" in out, (out, err)
    assert "Traceback" not in err, err
