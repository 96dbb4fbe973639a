"""``examples/raspberry_pi/`` does what its README says.

* ``install.sh`` runs inside the emulated Raspberry Pi 4 of ``scripts/board_envs.py`` (Debian
  bookworm's arm64 Python 3.11 under qemu-user; systemd is skipped there): it makes a
  virtualenv with the Pi's Python, installs the agent from aarch64 wheels offline, writes
  agent.toml, checks the digits bundle; a second run keeps the edited configuration. Then the
  ``edgeship-agent run`` it installed replays test digits to a Mosquitto on the host, whose
  telemetry and retained status arrive from an aarch64 device, and SIGTERM stops it cleanly.
* ``optimize --device pi-emulated`` against that installed agent (issue 16): every candidate
  that passed the quality gate is timed in the agent's child process on the emulated Pi (its
  timings are qemu's, not a Pi's: the flow is tested), the choice is made from those figures,
  the report has host and device figures per candidate, and an application calling the
  agent's endpoint meanwhile sees no failed call. The agent's child is its own Python started
  again, which qemu-user can do only with a binfmt_misc rule: the emulated Pi's ``binfmt``
  method (skipped where the kernel or container does not allow it).
* ``agent.toml`` is valid for ``device_agent.config.load_settings``, with every line
  uncommented too, and documents every setting the agent has.
* The Mosquitto example (TLS listener, passwords, ACL) runs: a device publishes its own
  telemetry through the agent's own MQTT code over TLS, cannot publish as another device or to
  its own ``cmd``, and receives an operator's command; the collector reads everything.
* ``camera_app.py`` fits images to the bundle's input and runs on the synthetic signal.
"""

from __future__ import annotations

import configparser
import dataclasses
import getpass
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_agent import AgentConfig, TensorSpec
from device_agent.config import RunConfig, load_settings
from device_agent.contracts import messages as msg
from tests.brokers import (
    MOSQUITTO,
    AckClient,
    Collector,
    Mosquitto,
    delivery_report,
    port_open,
    wait_for,
)
from tests.script_modules import load_script

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "raspberry_pi"
DEVICE = "pi-emulated"
FLEET = "pi-lab"
REPLAY_DIGITS = 40
NOT_AUTHORIZED = 135  # MQTT 5 reason code

T = TypeVar("T")


board_envs = load_script("board_envs", ROOT / "scripts" / "board_envs.py")
camera_app = load_script("camera_app", EXAMPLE / "camera_app.py")


def _setup(build: Callable[[], T]) -> T:
    try:
        return build()
    except board_envs.SetupError as exc:
        message = f"board environment setup failed: {exc}"
    pytest.fail(message, pytrace=False)  # outside the except: no chained traceback


# ---------------------------------------------------------------------------------------------
# agent.toml, install.sh --help, the unit file


def _documented_settings(text: str) -> list[str]:
    return re.findall(r"^(?:# )?([a-z_]+) = ", text, flags=re.MULTILINE)


def test_agent_toml_loads_and_documents_every_setting(tmp_path: Path) -> None:
    text = (EXAMPLE / "agent.toml").read_text()
    agent, run = load_settings(EXAMPLE / "agent.toml", {}, {})
    assert run.bundle == Path("/opt/edgeship/bundle")
    assert agent.state_dir == Path("/var/lib/edgeship")
    assert agent.broker_url == "mqtt://hub.local:1883"
    assert (agent.fleet, agent.window_s, run.http) == ("greenhouse", 10.0, "127.0.0.1:8765")

    documented = _documented_settings(text)
    known = {f.name for f in dataclasses.fields(AgentConfig)} | {
        f.name for f in dataclasses.fields(RunConfig)
    }
    assert sorted(documented) == sorted(known), "agent.toml must list each setting once"

    # The commented-out examples are valid values too.
    everything = tmp_path / "agent.toml"
    everything.write_text(re.sub(r"^# ([a-z_]+ = )", r"\1", text, flags=re.MULTILINE))
    agent, run = load_settings(everything, {}, {})
    assert agent.threads == 2 and agent.spool_max_bytes == 33554432
    assert agent.providers == ("CPUExecutionProvider",)
    assert agent.device_id == agent.username == "pi-07"
    assert run.replay == Path("/opt/edgeship/replay.npz") and run.replay_loops == 0


def test_install_sh_help_explains_every_option() -> None:
    script = (EXAMPLE / "install.sh").read_text()
    options = set(re.findall(r"^\t(--[a-z-]+)(?: \| -h)?\)", script, flags=re.MULTILINE))
    assert len(options) >= 15, options
    proc = subprocess.run(
        ["bash", EXAMPLE / "install.sh", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    missing = sorted(o for o in options if o not in proc.stdout)
    assert not missing, f"--help does not explain {missing}"
    envs = set(re.findall(r"\$\{(EDGESHIP_[A-Z_]+):-", script))
    missing = sorted(e for e in envs if e not in proc.stdout)
    assert not missing, f"--help does not name {missing}"

    bad = subprocess.run(
        ["bash", EXAMPLE / "install.sh", "--runtime", "cuda"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2 and "--runtime must be" in bad.stderr


def test_unit_file_restarts_hardens_and_runs_the_installed_agent() -> None:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read_string((EXAMPLE / "edgeship-agent.service").read_text())
    service = unit["Service"]
    assert service["ExecStart"] == (
        "/opt/edgeship/venv/bin/edgeship-agent run --config /etc/edgeship/agent.toml"
    )
    assert (service["User"], service["Restart"], service["KillSignal"]) == (
        "edgeship",
        "on-failure",
        "SIGTERM",
    )
    assert service["StateDirectory"] == "edgeship"
    assert service["ReadWritePaths"] == "/var/lib/edgeship"
    assert service["EnvironmentFile"] == "-/etc/edgeship/agent.env"
    assert service["SupplementaryGroups"] == "video"
    assert int(service["TimeoutStopSec"]) >= 15  # close() flushes for up to ~5 s per step
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome", "ProtectKernelTunables"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"
    assert service["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"
    assert "StartLimitBurst" in unit["Unit"] and "RestartSec" in service
    assert unit["Install"]["WantedBy"] == "multi-user.target"


# ---------------------------------------------------------------------------------------------
# The Mosquitto example: TLS, passwords, ACL


# The commands of the README's certificate recipe, for localhost instead of hub.local.
CERTIFICATE_RECIPE = (
    "openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2"
    " -keyout ca.key -out ca.crt -subj '/CN=edgeship test CA'",
    "openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    " -keyout server.key -out server.csr -subj /CN=localhost",
    "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2"
    " -out server.crt -extfile san.ext",
)


def _certificates(where: Path) -> None:
    """A CA, and a server certificate it signed for localhost / 127.0.0.1."""
    where.mkdir()
    (where / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for command in CERTIFICATE_RECIPE:
        subprocess.run(shlex.split(command), cwd=where, check=True, capture_output=True)


def _mosquitto_from_example(tmp: Path) -> tuple[subprocess.Popen[bytes], int, int, Path]:
    """Start Mosquitto on ``edgeship.conf`` with its paths and ports moved into ``tmp``."""
    certs = tmp / "certs"
    _certificates(certs)
    passwd = tmp / "passwd"
    passwd.touch()
    for user in ("pi-07", "pi-08", "collector", "operator"):
        subprocess.run(
            ["mosquitto_passwd", "-b", passwd, user, f"secret-{user}"],
            check=True,
            capture_output=True,
        )
    local, tls = _free_ports(2)
    conf = (EXAMPLE / "mosquitto" / "edgeship.conf").read_text()
    moves = {
        "listener 1883 127.0.0.1": f"listener {local} 127.0.0.1",
        "listener 8883": f"listener {tls} 127.0.0.1",
        "/etc/mosquitto/certs/": f"{certs}/",
        "/etc/mosquitto/passwd": str(passwd),
        "/etc/mosquitto/edgeship.acl": str(EXAMPLE / "mosquitto" / "acl"),
        "/var/lib/mosquitto/": f"{tmp}/",
    }
    for old, new in moves.items():
        assert old in conf, f"edgeship.conf no longer has {old!r}; update this test"
        conf = conf.replace(old, new)
    log = tmp / "mosquitto.log"
    # As root Mosquitto would switch to the "mosquitto" user, which cannot read tmp.
    conf += f"\nuser {getpass.getuser()}\nlog_dest file {log}\n"
    (tmp / "mosquitto.conf").write_text(conf)
    proc = subprocess.Popen([MOSQUITTO, "-c", tmp / "mosquitto.conf"], stderr=subprocess.PIPE)
    if not wait_for(lambda: (port_open(local) and port_open(tls)) or proc.poll() is not None, 10):
        proc.kill()
        raise RuntimeError("mosquitto did not open its ports")
    if proc.poll() is not None:
        err = proc.stderr.read().decode() if proc.stderr else ""
        raise RuntimeError(f"mosquitto exited {proc.returncode}: {err}{log.read_text()}")
    return proc, local, tls, certs / "ca.crt"


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


class _Client(AckClient):
    """A plain MQTT 5 paho client that records reason codes of PUBACKs and SUBACKs."""

    def __init__(
        self, user: str | None, port: int, ca_file: Path | None = None, password: str = ""
    ) -> None:
        super().__init__(
            mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=f"{user}-{uuid.uuid4().hex[:6]}",
                protocol=mqtt.MQTTv5,
            )
        )
        if user is not None:
            self.client.username_pw_set(user, password or f"secret-{user}")
        if ca_file is not None:
            self.client.tls_set(ca_certs=str(ca_file))
        self.messages: list[mqtt.MQTTMessage] = []
        self.connected = threading.Event()
        self.refused: int | None = None
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, m: self.messages.append(m)
        self.client.connect("localhost", port, 10)
        self.client.loop_start()

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any) -> None:
        if rc.is_failure:
            self.refused = rc.value
        self.connected.set()


def test_mosquitto_example_tls_passwords_and_acl(tmp_path: Path) -> None:
    from device_agent.mqtt import BrokerConfig, Publisher
    from device_agent.spool import Spool

    proc, local, tls, ca = _mosquitto_from_example(tmp_path)
    clients: list[_Client] = []
    publisher = None
    spool = None
    try:

        def client(user: str, port: int, ca_file: Path | None = None) -> _Client:
            c = _Client(user, port, ca_file)
            clients.append(c)
            assert c.connected.wait(10) and c.refused is None, f"{user} refused: {c.refused}"
            return c

        collector = client("collector", local)
        assert collector.subscribe("edgeship/#") == 1
        shared = client("collector", local)  # edgeship collect --group uses shared subscriptions
        assert shared.subscribe("$share/g/edgeship/+/+/telemetry") == 1

        # The device, through the agent's own MQTT code, over TLS with the password.
        commands: list[msg.Command] = []
        spool = Spool(tmp_path / "spool.db")
        boot = uuid.uuid4().hex[:16]

        def status(state: Literal["online", "offline"]) -> Callable[[int], bytes]:
            return lambda seq: msg.encode(
                msg.StatusMessage(
                    device="pi-07",
                    boot=boot,
                    seq=seq,
                    ts=time.time(),
                    state=state,
                    agent_version="test",
                )
            )

        broker = BrokerConfig.from_url(
            f"mqtts://localhost:{tls}", username="pi-07", password="secret-pi-07", ca_file=str(ca)
        )
        publisher = Publisher(
            broker,
            spool,
            fleet="f",
            device="pi-07",
            boot=boot,
            birth=status("online"),
            will=status("offline"),
            on_command=commands.append,
        )
        publisher.start()
        assert wait_for(lambda: publisher.connected, 15), publisher.stats
        publisher.publish("outliers", lambda seq: _outlier(boot, seq))
        assert wait_for(lambda: publisher.stats["acked"] >= 2, 10), publisher.stats
        topics = {m.topic for m in collector.messages}
        assert {"edgeship/f/pi-07/status", "edgeship/f/pi-07/outliers"} <= topics, topics

        # What the device may not do, refused with MQTT 5's "not authorized".
        device = client("pi-07", tls, ca)
        assert device.publish("edgeship/f/pi-07/telemetry") < 128
        assert device.publish("edgeship/f/pi-08/telemetry") == NOT_AUTHORIZED
        assert device.publish("edgeship/f/pi-08/status") == NOT_AUTHORIZED
        assert device.publish("edgeship/f/pi-07/cmd") == NOT_AUTHORIZED
        assert device.publish("edgeship/f/alerts") == NOT_AUTHORIZED
        # Mosquitto grants every SUBSCRIBE and checks read access per delivered message: a
        # device subscribed to everything receives only its own commands.
        assert device.subscribe("edgeship/#") == 1

        # The operator commands a device; the agent's publisher receives it.
        operator = client("operator", local)
        others = msg.Command(id="c0", action="ping", ts=time.time())
        assert operator.publish("edgeship/f/pi-08/cmd", msg.encode(others)) < 128
        command = msg.Command(id="c1", action="ping", ts=time.time())
        assert operator.publish("edgeship/f/pi-07/cmd", msg.encode(command)) < 128
        assert wait_for(lambda: commands, 10)
        assert [c.id for c in commands] == ["c1"]
        assert wait_for(lambda: device.messages, 10)  # c1, sent after c0: c0 would be here
        assert [m.topic for m in device.messages] == ["edgeship/f/pi-07/cmd"]
        assert operator.publish("edgeship/f/pi-07/telemetry") == NOT_AUTHORIZED
        assert collector.publish("edgeship/f/pi-07/cmd") == NOT_AUTHORIZED
        assert collector.publish("edgeship/f/alerts") < 128
        assert wait_for(lambda: any(m.topic.endswith("/telemetry") for m in shared.messages), 5)

        # A wrong password, no credentials: refused at CONNECT.
        for user, password in (("pi-07", "wrong"), (None, "")):
            intruder = _Client(user, local, password=password)
            clients.append(intruder)
            assert intruder.connected.wait(10)
            assert intruder.refused in (134, 135), intruder.refused  # bad password / not authorized
    finally:
        for c in clients:
            c.close()
        if publisher is not None:
            publisher.close(flush_timeout_s=2)
        if spool is not None:
            spool.close()
        proc.terminate()
        proc.wait(10)


def _outlier(boot: str, seq: int) -> bytes:
    summary = msg.InputSummary(shape=(1, 8, 8), mean=0.5, std=0.1, min=0.0, max=1.0)
    return msg.encode(
        msg.OutlierEvent(
            device="pi-07",
            boot=boot,
            seq=seq,
            ts=time.time(),
            score=9.0,
            threshold=5.0,
            prediction="3",
            input=summary,
        )
    )


# ---------------------------------------------------------------------------------------------
# camera_app.py


def test_camera_app_fits_images_to_the_bundle_input(tmp_path: Path) -> None:
    from sdk.zoo.digits import load_digits_splits

    digits = load_digits_splits(seed=0).x_test[:20]  # (20, 1, 8, 8) in [0, 1]
    fmt = camera_app.InputFormat.from_spec(TensorSpec("image", "float32", ("batch", 1, 8, 8)))
    assert (fmt.layout, fmt.height, fmt.width, fmt.channels) == ("NCHW", 8, 8, 1)
    for img in digits[:, 0]:
        # A 4x larger RGB frame of the same picture comes back as the model's input.
        big = np.repeat(np.kron(img, np.ones((4, 4), np.float32))[:, :, None], 3, axis=2)
        np.testing.assert_allclose(fmt.prepare(big), img[None, None], atol=1e-6)
        assert fmt.prepare(big).dtype == np.float32
        np.testing.assert_allclose(fmt.prepare(1.0 - big, invert=True), img[None, None], atol=1e-6)

    # A PGM file as a camera tool writes it (8-bit, with a comment) reads back.
    pixels = np.round(np.kron(digits[0, 0], np.ones((2, 2))) * 255).astype(np.uint8)
    pgm = tmp_path / "frame.pgm"
    pgm.write_bytes(b"P5\n# from a camera\n16 16\n255\n" + pixels.tobytes())
    np.testing.assert_allclose(camera_app._read_pgm(pgm), pixels / 255.0, atol=1e-6)

    nhwc = camera_app.InputFormat.from_spec(TensorSpec("x", "uint8", (1, 224, 224, 3)))
    x = nhwc.prepare(np.full((480, 640, 3), 0.5, np.float32))
    assert (nhwc.layout, x.shape, x.dtype) == ("NHWC", (1, 224, 224, 3), np.uint8)
    assert int(x[0, 0, 0, 0]) == 128
    with pytest.raises(SystemExit, match="--size"):
        camera_app.InputFormat.from_spec(TensorSpec("x", "float32", ("n", 3, "h", "w")))
    sized = camera_app.InputFormat.from_spec(
        TensorSpec("x", "float32", ("n", 3, "h", "w")), size=(32, 48)
    )
    assert sized.prepare(np.zeros((10, 10), np.float32)).shape == (1, 3, 32, 48)


@pytest.mark.slow
def test_camera_app_runs_on_the_synthetic_signal(digits_bundle: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            EXAMPLE / "camera_app.py",
            "--bundle",
            digits_bundle,
            "--source",
            "synthetic",
            "--frames",  # a frame count, not seconds: how many fit in 3 s depends on the CPU
            "60",
            "--rate",
            "20",
            "--state-dir",
            tmp_path / "state",
            "--log-level",
            "warning",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\ncamera_app, synthetic source, 60 frames at 20 fps: {summary}")
    assert summary["source"] == "synthetic"
    assert summary["input"] == {
        "name": "image",
        "layout": "NCHW",
        "dtype": "float32",
        "height": 8,
        "width": 8,
        "channels": 1,
    }
    assert summary["frames"] == 60 and summary["rejected"] == 0
    # The synthetic glitches (a saturated frame every 25 frames first) are flagged and logged.
    assert summary["outliers"] >= 1
    assert "outlier: frame" in proc.stderr


# ---------------------------------------------------------------------------------------------
# install.sh on this machine, as on a board without an emulator


def _install_env(root: Path, **extra: str) -> dict[str, str]:
    """Environment for install.sh into ``root``: no systemd, offline from the wheelhouse."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "EDGESHIP_"))}
    env.update(
        EDGESHIP_PREFIX=str(root / "opt"),
        EDGESHIP_CONFIG_DIR=str(root / "etc"),
        EDGESHIP_STATE_DIR=str(root / "state"),
        EDGESHIP_SKIP_SYSTEMD="1",
        EDGESHIP_OFFLINE="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        **extra,
    )
    return env


def _install_sh(
    args: list[str | Path], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    cmd = ["bash", str(EXAMPLE / "install.sh"), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"install.sh exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_install_sh_on_this_host_runs_the_console_script(
    digits_bundle: Path, tmp_path: Path
) -> None:
    """No emulator: ensurepip's pip, the installed edgeship-agent run directly, as on a Pi."""
    _setup(board_envs.agent_venv)  # fills the local wheelhouse with the agent's wheels
    env = _install_env(
        tmp_path,
        EDGESHIP_PYTHON=str(board_envs._base_python()),
        EDGESHIP_PACKAGE=str(_setup(board_envs.project_wheel)),
        EDGESHIP_FIND_LINKS=str(board_envs.CACHE / "wheelhouse"),
    )
    out = _install_sh(["--bundle", digits_bundle], env, tmp_path).stdout
    assert f"created with Python {platform.python_version()} on {platform.machine()}" in out, out
    assert "\nok\n" in out and "runtime    onnxruntime" in out, out
    assert os.access(tmp_path / "opt" / "venv" / "bin" / "edgeship-agent", os.X_OK)


@pytest.mark.slow
def test_install_sh_litert_chooses_tflite_runtime_next_to_numpy_1(tmp_path: Path) -> None:
    """--runtime tflite gives numpy<2 and tflite-runtime; --runtime litert then keeps them.

    Offline, with no ai-edge-litert wheel in the wheelhouse: choosing it would fail.
    """
    _setup(board_envs.tflite_venv)  # fills the wheelhouse with numpy 1.x and tflite-runtime
    env = _install_env(
        tmp_path,
        EDGESHIP_PYTHON=str(board_envs._base_python()),
        EDGESHIP_PACKAGE=str(_setup(board_envs.project_wheel)),
        EDGESHIP_FIND_LINKS=str(board_envs.CACHE / "wheelhouse"),
    )
    _install_sh(["--runtime", "tflite"], env, tmp_path)
    out = _install_sh(["--runtime", "litert"], env, tmp_path).stdout
    assert "numpy 1.x is present: LiteRT comes from tflite-runtime" in out, out
    python = tmp_path / "opt" / "venv" / "bin" / "python"
    probe = "import numpy, tflite_runtime, device_agent.runtime; print(numpy.__version__)"
    version = subprocess.run(
        [python, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert version.startswith("1."), version


# ---------------------------------------------------------------------------------------------
# install.sh on the emulated Raspberry Pi, and the agent it installed


@pytest.fixture(scope="module")
def pi_install(digits_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run install.sh with the emulated Pi's Python; returns paths, output and seconds."""
    emulator = _setup(board_envs.pi_emulator)
    python = _setup(board_envs.pi_interpreter)
    wheelhouse = _setup(board_envs.pi_wheelhouse)
    wheel = _setup(board_envs.project_wheel)
    work = tmp_path_factory.mktemp("pi-example")
    # What binfmt_misc would do on a host set up for aarch64: run the program under qemu.
    wrapper = work / "pi-emulator"
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.join(emulator)} "$@"\n')
    wrapper.chmod(0o755)
    layout = {
        "prefix": work / "opt" / "edgeship",
        "config": work / "etc" / "edgeship",
        "state": work / "var" / "lib" / "edgeship",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "EDGESHIP_"))}
    env.update(
        EDGESHIP_PREFIX=str(layout["prefix"]),
        EDGESHIP_CONFIG_DIR=str(layout["config"]),
        EDGESHIP_STATE_DIR=str(layout["state"]),
        EDGESHIP_SKIP_SYSTEMD="1",
        EDGESHIP_PYTHON=str(python),
        EDGESHIP_EMULATOR=str(wrapper),
        EDGESHIP_PACKAGE=str(wheel),
        EDGESHIP_FIND_LINKS=str(wheelhouse),
        EDGESHIP_OFFLINE="1",
        EDGESHIP_PIP_WHEEL=str(next(wheelhouse.glob("pip-*.whl"))),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    cmd = ["bash", str(EXAMPLE / "install.sh"), "--bundle", str(digits_bundle)]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, f"install.sh exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return {
        "work": work,
        "wrapper": wrapper,
        "venv": layout["prefix"] / "venv",
        **layout,
        "env": env,
        "cmd": cmd,
        "stdout": proc.stdout,
        "seconds": seconds,
        "bundle": digits_bundle,
    }


@pytest.mark.slow
@pytest.mark.board
def test_install_sh_installs_the_agent_on_the_emulated_pi(pi_install: dict[str, Any]) -> None:
    out = pi_install["stdout"]
    print(f"\ninstall.sh on the emulated Pi 4: {pi_install['seconds']:.1f} s")
    assert "Python 3.11.2 on aarch64" in out, out
    assert "skipping systemd: EDGESHIP_SKIP_SYSTEMD=1" in out
    check = {
        parts[0]: parts[1] if len(parts) > 1 else ""
        for parts in (line.split(None, 1) for line in out.splitlines() if line.strip())
    }
    assert "ok" in check, out
    assert check["runtime"].startswith("onnxruntime "), check["runtime"]
    assert check["host"].startswith("aarch64, ") and "Python 3.11.2" in check["host"]

    toml = pi_install["config"] / "agent.toml"
    agent, run = load_settings(toml, {}, {})
    assert run.bundle == pi_install["bundle"] and agent.state_dir == pi_install["state"]
    env_file = pi_install["config"] / "agent.env"
    assert env_file.stat().st_mode & 0o077 == 0  # secrets go there
    unit = (pi_install["prefix"] / "edgeship-agent.service").read_text()
    assert f"ExecStart={pi_install['venv']}/bin/edgeship-agent run --config {toml}" in unit
    assert f"ReadWritePaths={pi_install['state']}" in unit
    site = pi_install["venv"] / "lib" / "python3.11" / "site-packages"
    assert next(site.glob("onnxruntime-*.dist-info")) and not list(site.glob("torch*"))
    so = next((site / "onnxruntime" / "capi").glob("onnxruntime_pybind11_state*.so"))
    assert so.read_bytes()[18] == 0xB7  # ELF e_machine: EM_AARCH64


@pytest.mark.slow
@pytest.mark.board
def test_installed_unit_passes_systemd_analyze_verify(pi_install: dict[str, Any]) -> None:
    """The unit install.sh wrote (its paths exist) has no unknown key or bad value."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed; the unit's keys are checked above")
    proc = subprocess.run(
        ["systemd-analyze", "verify", pi_install["prefix"] / "edgeship-agent.service"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and not proc.stdout + proc.stderr, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.board
def test_install_sh_again_keeps_the_configuration(pi_install: dict[str, Any]) -> None:
    toml = pi_install["config"] / "agent.toml"
    edited = toml.read_text().replace('fleet = "greenhouse"', f'fleet = "{FLEET}"')
    toml.write_text(edited)
    started = time.monotonic()
    proc = subprocess.run(
        pi_install["cmd"],
        cwd=pi_install["work"],
        env=pi_install["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.monotonic() - started
    print(f"\ninstall.sh again: {seconds:.1f} s")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "exists: reused" in proc.stdout
    assert f"{toml} exists: kept" in proc.stdout
    assert "reinstalling edgeship from" in proc.stdout  # a rebuilt wheel replaces the old one
    assert toml.read_text() == edited
    assert proc.stdout.rstrip().count("\nok") == 1


@pytest.fixture(scope="module")
def replay_digits(digits_splits: Any, pi_install: dict[str, Any]) -> Path:
    path = Path(pi_install["work"]) / "replay.npz"
    np.savez(path, image=digits_splits.x_test[:REPLAY_DIGITS])
    return path


@pytest.mark.slow
@pytest.mark.board
def test_installed_agent_on_the_emulated_pi_reports_to_the_host_broker(
    pi_install: dict[str, Any], replay_digits: Path, tmp_path: Path
) -> None:
    venv = pi_install["venv"]
    with Mosquitto(tmp_path / "broker") as broker:
        collector = Collector(broker.port, "edgeship/#", persistent=False).start()
        try:
            cmd = [
                pi_install["wrapper"],
                venv / "bin" / "python",
                venv / "bin" / "edgeship-agent",
                "run",
                "--config",
                pi_install["config"] / "agent.toml",
                "--broker",
                broker.url,
                "--fleet",
                FLEET,
                "--device-id",
                DEVICE,
                "--http",
                "off",
                "--replay",
                replay_digits,
                "--replay-rate",
                "20",
                "--window",
                "2",
            ]
            log = tmp_path / "agent.log"
            started = time.monotonic()
            with open(log, "wb") as out:
                agent = subprocess.Popen(
                    [str(c) for c in cmd],
                    cwd=pi_install["work"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            try:
                first = _first_telemetry(collector, agent, log, timeout=240)
                to_first = first.t - started
                # A subscriber arriving now learns the device is online from the retained status.
                late = Collector(broker.port, msg.topic(FLEET, DEVICE, "status"), persistent=False)
                late.start()
                try:
                    assert late.wait(lambda rs: any(r.retain for r in rs), 10)
                    retained = [r for r in late.snapshot() if r.retain]
                finally:
                    late.stop()
                time.sleep(3)  # another window or so
                sigterm = time.monotonic()
                agent.send_signal(signal.SIGTERM)
                code = agent.wait(60)
                to_exit = time.monotonic() - sigterm
            finally:
                if agent.poll() is None:
                    agent.kill()
                    agent.wait(10)
            assert code == 0, f"exit {code}\n{log.read_text()}"
            assert wait_for(
                lambda: any(m.state == "offline" for _, m in _decoded(collector, "status")), 10
            ), log.read_text()
        finally:
            collector.stop()

    decoded = [m for _, m in collector.decoded()]
    statuses = [m for m in decoded if isinstance(m, msg.StatusMessage)]
    telemetry = [m for m in decoded if isinstance(m, msg.TelemetryMessage)]
    online = next(s for s in statuses if s.state == "online")
    assert all(getattr(m, "device", DEVICE) == DEVICE for m in decoded)
    assert online.host["arch"] == "aarch64", online.host
    assert online.host["python"] == "3.11.2"
    assert online.model == "digits-cnn"
    assert (online.runtime or "").startswith("onnxruntime"), online.runtime
    retained_status = msg.decode(retained[-1].topic, retained[-1].payload)
    assert isinstance(retained_status, msg.StatusMessage) and retained_status.state == "online"
    assert retained_status.host["arch"] == "aarch64"
    inferences = sum(t.inferences for t in telemetry)
    assert inferences > 0 and all(t.errors == 0 for t in telemetry)
    predicted = sum(sum(t.predictions.values()) for t in telemetry)
    assert predicted == inferences
    report = delivery_report(decoded, DEVICE)
    assert report.missing == [] and report.duplicates == 0, report.line()
    kinds: dict[str, int] = {}
    for m in decoded:
        kinds[m.KIND] = kinds.get(m.KIND, 0) + 1
    print(
        f"\nagent installed by install.sh on the emulated Pi 4 ({online.host['model']}, "
        f"{online.host['arch']}, Python {online.host['python']}): first telemetry "
        f"{to_first:.1f} s after start; {len(decoded)} messages {kinds}; {inferences} "
        f"inferences; {report.line()}; SIGTERM -> exit 0 in {to_exit:.1f} s"
    )


def _decoded(collector: Collector, kind: str) -> Iterator[tuple[Any, Any]]:
    return ((r, m) for r, m in collector.decoded() if kind == m.KIND)


def _first_telemetry(
    collector: Collector, agent: subprocess.Popen[bytes], log: Path, timeout: float
) -> Any:
    def found() -> Any:
        if agent.poll() is not None:
            raise AssertionError(f"the agent exited {agent.returncode}:\n{log.read_text()}")
        for received, m in _decoded(collector, "telemetry"):
            if m.inferences > 0:
                return received
        return None

    assert wait_for(found, timeout, interval=0.2), f"no telemetry in {timeout} s\n{log.read_text()}"
    return found()


# ---------------------------------------------------------------------------------------------
# optimize --device against the installed agent on the emulated Pi (issue 16)


def _binfmt_or_skip() -> None:
    if not _setup(board_envs.binfmt_works):
        pytest.skip(
            "no private binfmt_misc here (Linux >= 6.7 and unshare --user needed): the "
            "emulated Pi cannot start its own Python, which timing a candidate needs"
        )


# Run by the emulated Pi's Python: start its own sys.executable, as the agent does to time a
# candidate, and say what that child saw (or why it did not start).
_START_ITSELF = """
import subprocess, sys
child = "import platform; print(platform.machine(), 'Pi 4' in open('/proc/cpuinfo').read())"
try:
    print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout)
except OSError as exc:
    print("OSError", exc.errno)
"""


@pytest.mark.slow
@pytest.mark.board
def test_the_emulated_pi_starts_its_own_python_under_binfmt_only(tmp_path: Path) -> None:
    """qemu-user hands an aarch64 program's execve to the host kernel, which refuses it
    without a binfmt_misc rule (ENOEXEC, 8); the ``binfmt`` method adds one in a private
    namespace, and the child is the same emulated Pi."""
    _binfmt_or_skip()
    plain = board_envs.pi_python(board_envs.cpuinfo_method())
    out = subprocess.run(
        [*plain, "-c", _START_ITSELF], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["OSError", "8"], out
    binfmt = board_envs.pi_python("binfmt")
    out = subprocess.run(
        [*binfmt, "-c", _START_ITSELF], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["aarch64", "True"], out


def _online(collector: Collector) -> list[msg.StatusMessage]:
    return [
        m
        for _, m in collector.decoded()
        if isinstance(m, msg.StatusMessage) and m.state == "online"
    ]


class _Calls:
    """The application: calls to the agent's local endpoint, one after another, until stopped."""

    def __init__(self, port: int, image: np.ndarray) -> None:
        self.url = f"http://127.0.0.1:{port}/v1/predict"
        self.body = json.dumps({"inputs": {"image": image.tolist()}}).encode()
        self.ok = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        import urllib.request

        while not self.stop.is_set():
            try:
                request = urllib.request.Request(self.url, data=self.body)
                with urllib.request.urlopen(request, timeout=30) as answer:
                    assert "outputs" in json.loads(answer.read())
                self.ok += 1
            except Exception as exc:  # every failure is a test failure, whatever its type
                self.failures.append(repr(exc))
            self.stop.wait(0.02)


@pytest.mark.slow
@pytest.mark.board
def test_optimize_times_every_candidate_on_the_installed_agent_of_the_emulated_pi(
    pi_install: dict[str, Any],
    digits_onnx: Any,
    digits_npz: dict[str, Path],
    digits_splits: Any,
    tmp_path: Path,
) -> None:
    """``optimize`` with ``--device pi-emulated`` (``OnDevice``, one confirmation round to keep
    it short): the agent install.sh installed, run by the emulated Pi (qemu: its timings are
    not a Pi's), times every candidate that passed the quality gate in its child process while
    an application calls its endpoint; the choice is made from those figures, and the report
    has host and device figures side by side."""
    from sdk.budget import parse_budget
    from sdk.optimize import OptimizeConfig, optimize
    from sdk.optimize.on_device import OnDevice

    _binfmt_or_skip()
    venv = pi_install["venv"]
    (port,) = _free_ports(1)
    with Mosquitto(tmp_path / "broker") as broker:
        status = Collector(broker.port, msg.topic(FLEET, DEVICE, "status"), persistent=False)
        status.start()
        cmd = [
            *board_envs.pi_emulator("binfmt"),
            venv / "bin" / "edgeship-agent",  # its #! line names the venv's aarch64 python
            "run",
            "--config",
            pi_install["config"] / "agent.toml",
            "--broker",
            broker.url,
            "--fleet",
            FLEET,
            "--device-id",
            DEVICE,
            "--http",
            f"127.0.0.1:{port}",
        ]
        log = tmp_path / "agent.log"
        with open(log, "wb") as out:
            agent = subprocess.Popen(
                [str(c) for c in cmd], cwd=pi_install["work"], stdout=out, stderr=subprocess.STDOUT
            )
        calls = _Calls(port, digits_splits.x_test[:1])
        try:

            def online() -> bool:
                if agent.poll() is not None:
                    raise AssertionError(f"the agent exited {agent.returncode}:\n{log.read_text()}")
                return bool(_online(status))

            assert wait_for(online, 120, interval=0.2), log.read_text()
            (status_msg,) = _online(status)
            assert str(status_msg.host["model"]).startswith("Raspberry Pi 4 Model B"), status_msg
            assert status_msg.host["arch"] == "aarch64"
            assert wait_for(lambda: port_open(port), 30), log.read_text()
            calls.thread.start()
            target = OnDevice(
                broker_url=broker.url, devices=(DEVICE,), fleet=FLEET, min_runs=10,
                min_seconds=0.2,
            )  # fmt: skip
            config = OptimizeConfig(
                budget=parse_budget("drop<=2%"), min_runs=20, min_seconds=0.2, confirm_rounds=1,
                static_methods=("minmax",), per_tensor_variant=False, try_accuracy_aware=False,
                detector=None, on_device=target,
            )  # fmt: skip
            started = time.monotonic()
            report = optimize(
                digits_onnx.path, calibration=digits_npz["calibration"],
                eval_data=digits_npz["eval"], out=tmp_path / "bundle", config=config,
            )  # fmt: skip
            wall = time.monotonic() - started
            calls.stop.set()
            calls.thread.join(60)
            agent.send_signal(signal.SIGTERM)
            assert agent.wait(60) == 0, log.read_text()
        finally:
            calls.stop.set()
            status.stop()
            if agent.poll() is None:
                agent.kill()
                agent.wait(10)

    data = json.loads(json.dumps(report.to_dict(), default=str))  # as --json writes it
    summary = report.summary()
    devices = data["devices"]
    ((board, timed_by),) = devices["boards"].items()
    assert board.startswith("Raspberry Pi 4 Model B") and timed_by == [DEVICE], devices
    assert data["measured_on"].startswith(f"device {DEVICE}: {board} (aarch64 "), data
    figures = []
    for c in data["candidates"]:
        host = c["host_benchmark"]
        if host is None:  # not made, or failed the quality gate: never timed anywhere
            continue
        assert host["measured_on"].startswith("host: "), host["measured_on"]
        bench = c["device_benchmarks"].get(board)
        if bench is None:
            assert c["device_note"], c["name"]  # why it was not sent (a hopeless host figure)
            figures.append(f"{c['name']} host p50 {host['latency_ms']['p50']:.3f} ms, not sent")
            continue
        assert bench["device"] == DEVICE and bench["runs"] >= 10
        assert bench["measured_on"] == data["measured_on"]
        assert bench["host"]["arch"] == "aarch64" and bench["host"]["board"] == board
        assert bench["application"]["failed"] == 0
        figures.append(
            f"{c['name']} host p50 {host['latency_ms']['p50']:.3f} ms, emulated Pi p50 "
            f"{bench['latency_ms']['p50']:.3f} ms"
        )
    assert devices["counts"] == {DEVICE: len(devices["timed_by"][DEVICE])}
    assert len(devices["timed_by"][DEVICE]) >= 2  # fp32 and at least one int8
    assert devices["missing"] == {board: {}} and devices["lost"] == {}
    # The choice was made from the device's figures.
    chosen = next(c for c in data["candidates"] if c["name"] == data["chosen"])
    assert chosen["benchmark"]["measured_on"] == data["measured_on"]
    assert chosen["name"] in devices["timed_by"][DEVICE]
    assert devices["choices"][board]["chosen"] == data["chosen"]
    assert "on the host: p50" in summary
    # The application kept being served: by its own count and by the agent's.
    app = devices["application"][DEVICE]
    assert app["calls"] > 0 and app["failed"] == 0, app
    assert calls.ok > 0 and calls.failures == [], calls.failures[:3]
    # Nothing is left on the device.
    left = pi_install["state"] / f"candidates-{FLEET}-{DEVICE}"
    assert sorted(p.name for p in left.iterdir() if p.name != "staging") == []
    print(
        f"\noptimize --device on the emulated Pi 4 (qemu: not a Pi's timings) in {wall:.0f} s, "
        f"chose {data['chosen']}; {'; '.join(figures)}; application {calls.ok} calls, 0 failed"
    )
