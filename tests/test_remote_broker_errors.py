"""`edgeship deploy` and `edgeship bench --device` when the broker is not there or refuses the
client: one line saying what to check, exit 2 (nothing reached the device), no traceback, and
no 10 s wait for a subscription that a refused connection never makes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from device_agent.errors import ConfigError
from sdk.remote import BrokerUnavailableError, CommandClient
from tests.brokers import Mosquitto, free_port

ROOT = Path(__file__).resolve().parent.parent


def _edgeship(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sdk.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_line_exit_2(done: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_a_broker_that_is_not_running_is_bad_input(digits_bundle: Path) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    with pytest.raises(BrokerUnavailableError, match="cannot reach the broker"):
        CommandClient(url, "f", "d1")
    done = _edgeship("deploy", str(digits_bundle), "--device", "d1", "--broker", url)
    _one_line_exit_2(done, "cannot reach the broker", "is it running?")
    done = _edgeship("bench", "--device", "d1", "--broker", url)
    _one_line_exit_2(done, "cannot reach the broker")


def test_a_wrong_password_is_refused_at_once_with_what_to_check(
    tmp_path: Path, digits_bundle: Path
) -> None:
    passwd = tmp_path / "passwd"
    passwd.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "operator", "pw-operator"], check=True)
    with Mosquitto(tmp_path / "broker", persistence=False, password_file=passwd) as broker:
        wrong = f"mqtt://operator:wrong@127.0.0.1:{broker.port}"
        with pytest.raises(BrokerUnavailableError, match="refused the connection: Not authorized"):
            CommandClient(wrong, "f", "d1")
        # The CLI's password from a file (one in the URL would add ps's warning line).
        wrong_file = tmp_path / "wrong.pw"
        wrong_file.write_text("wrong\n")
        wrong_file.chmod(0o600)
        done = _edgeship(
            "deploy", str(digits_bundle), "--device", "d1", "--broker",
            f"mqtt://operator@127.0.0.1:{broker.port}", "--broker-password-file", str(wrong_file),
        )  # fmt: skip
        _one_line_exit_2(done, "refused the connection", "USER:PASSWORD")
        # the right password gets past the connection: the device is what does not answer
        right = f"mqtt://operator:pw-operator@127.0.0.1:{broker.port}"
        with CommandClient(right, "f", "d1") as client:
            assert client.device == "d1"


def test_a_ca_file_that_is_missing_or_not_a_certificate_is_bad_input(
    tmp_path: Path, digits_bundle: Path
) -> None:
    url = f"mqtts://127.0.0.1:{free_port()}"
    not_a_cert = tmp_path / "key.pem"
    not_a_cert.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    for ca_file in (tmp_path / "missing.crt", not_a_cert):
        with pytest.raises(ConfigError, match="cannot load it as a CA certificate"):
            CommandClient(url, "f", "d1", ca_file=str(ca_file))
    done = _edgeship(
        "deploy", str(digits_bundle), "--device", "d1", "--broker", url,
        "--ca-file", str(tmp_path / "missing.crt"),
    )  # fmt: skip
    _one_line_exit_2(done, "--ca-file", "cannot load it as a CA certificate")
    done = _edgeship(
        "bench", "--device", "d1", "--broker", url, "--ca-file", str(tmp_path / "missing.crt")
    )
    _one_line_exit_2(done, "--ca-file", "cannot load it as a CA certificate")
