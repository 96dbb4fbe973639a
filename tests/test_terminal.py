"""Text from devices, bundles and data files reaches the terminal without control characters.

A device put ESC sequences in its model name and `edgeship fleet status` cleared the screen and
set the window title of whoever ran it. The end-to-end tests use a private Mosquitto, a real
collector, a hostile device speaking MQTT through paho, and the `edgeship` command in its own
process; they read the bytes the command wrote.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
import unicodedata
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from device_agent.contracts import messages as msg
from sdk.terminal import SafeStream, guard_stdio, printable, raw_stream
from tests.brokers import Mosquitto, wait_for
from tests.collector_helpers import status, window

FLEET = "farm"
DEVICE = "pi-evil"
TOKEN = "t0ken-" + "y" * 26
# Set the window title, clear the screen, move home, red text (C0 and C1 CSI), a bell, a
# backspace, a carriage return and a newline that would forge a table row, a bidi override.
TITLE = "\x1b]0;pwned\x07"
HOSTILE = TITLE + "\x1b[2J\x1b[H\x1b[31mred\x9b1m\x08\rpi-ok online\n\u202eevil"
ESCAPED = "\\x1b]0;pwned\\x07\\x1b[2J\\x1b[H\\x1b[31mred\\x9b1m\\x08\\rpi-ok online\\n\\u202eevil"


BIDI = set("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _unsafe(c: str) -> bool:
    """Characters that drive a terminal or what it shows: C0 and C1 controls, DEL, line and
    paragraph separators, bidi controls, lone surrogates."""
    return unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") or c in BIDI


def _controls(text: str) -> list[str]:
    """Every such character of ``text`` (the newlines of a command's layout excepted)."""
    return [f"U+{ord(c):04X}" for c in text if c != "\n" and _unsafe(c)]


# --- the helper ----------------------------------------------------------------------------


def test_printable_escapes_controls_and_keeps_other_text() -> None:
    assert printable(HOSTILE) == ESCAPED
    assert printable("\x00\x7f\x85\ud800\u2028\u2066") == "\\x00\\x7f\\x85\\ud800\\u2028\\u2066"
    for fine in ("digits-cnn@1", "Gewächshaus ünd café", "温室 センサー", "📟 pi", "a\u00a0b"):
        assert printable(fine) == fine
    assert printable("a\tb\nc") == "a\\tb\\nc"
    assert printable("a\tb\nc\x1b", keep_newlines=True) == "a\\tb\nc\\x1b"
    assert printable(ValueError("bad \x1b[2J")) == "bad \\x1b[2J"


@settings(max_examples=500, deadline=None)
@given(st.text(st.characters(blacklist_categories=()), max_size=40))
def test_printable_leaves_no_control_and_changes_nothing_else(text: str) -> None:
    out = printable(text)
    assert not any(_unsafe(c) for c in out), out
    out.encode("utf-8")  # no lone surrogate left: any terminal encoding takes it
    if not any(_unsafe(c) for c in text):
        assert out == text
    kept = printable(text, keep_newlines=True)
    assert _controls(kept) == [] and kept.count("\n") == text.count("\n")


def test_the_guard_escapes_what_is_printed_and_lets_deliberate_sequences_through(
    capsys: Any,
) -> None:
    with guard_stdio():
        print(f"error: {HOSTILE}")
        print("to stderr \x1b[2J", file=sys.stderr)
        assert isinstance(sys.stdout, SafeStream)
        raw_stream(sys.stdout).write("\x1b[H")  # a command's own clear-screen, on purpose
    out, err = capsys.readouterr()
    # the layout's newlines stay (one in HOSTILE too), everything else is escaped
    assert out == "error: " + ESCAPED.replace("\\n", "\n") + "\n\x1b[H"
    assert err == "to stderr \\x1b[2J\n"


_ANY_TEXT = st.text(st.characters(blacklist_categories=()), max_size=30)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"device": _ANY_TEXT, "model": _ANY_TEXT, "version": _ANY_TEXT, "rule": _ANY_TEXT}
        ),
        min_size=1,
        max_size=4,
    ),
    _ANY_TEXT,
)
def test_fleet_table_of_any_device_strings_has_no_control_and_one_line_per_device(
    devices: list[dict[str, str]], fleet: str
) -> None:
    """Whatever text the collector's API hands back (control characters, NUL, lone
    surrogates, newlines, bidi overrides in any field), the table has one line per device
    and nothing in it drives the terminal."""
    from sdk.cli.fleet import render_fleet

    rows = [
        {
            "device": d["device"], "fleet": fleet if i % 2 else "other", "status": d["rule"],
            "model": d["model"], "model_version": d["version"], "latency_ms": {"p95": 1.5},
            "outlier_rate": 0.01, "temperature_c": None, "last_seen": 0.0,
        }
        for i, d in enumerate(devices)
    ]  # fmt: skip
    alerts = [{"fleet": r["fleet"], "device": r["device"], "rule": d["rule"]}
              for r, d in zip(rows, devices, strict=True)]  # fmt: skip
    data = {"devices": {"devices": rows, "fleet": fleet}, "alerts": {"firing": alerts}}
    text = render_fleet(data, now=10.0)
    assert _controls(text) == []
    text.encode("utf-8")
    assert len(text.splitlines()) == 3 + len(devices)  # summary, blank, header, the rows


# --- end to end: a hostile device, a real collector, `edgeship fleet` ------------------------


class HostileDevice:
    """A device on MQTT whose model name and version, and whose command replies, are ESC
    sequences: birth and telemetry like an agent's, and an error reply to every command."""

    def __init__(self, port: int) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"evil-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self.seq = 0
        self.lock = threading.Lock()
        ready = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            msg.topic(FLEET, DEVICE, "cmd"), qos=1
        )
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._on_command
        self.client.connect("127.0.0.1", port, 30)
        self.client.loop_start()
        assert ready.wait(10)

    def next_seq(self) -> int:
        with self.lock:
            self.seq += 1
            return self.seq

    def send(self, message: Any, retain: bool = False) -> None:
        info = self.client.publish(
            msg.topic(FLEET, DEVICE, message.KIND), msg.encode(message), qos=1, retain=retain
        )
        info.wait_for_publish(10)

    def announce(self) -> None:
        birth = dataclasses.replace(
            status(DEVICE, self.next_seq(), model=HOSTILE, version=HOSTILE), runtime=HOSTILE
        )
        self.send(birth, retain=True)
        rng = np.random.default_rng(0)
        self.send(window(DEVICE, self.next_seq(), rng=rng, model=HOSTILE, version=HOSTILE))

    def _on_command(self, c: Any, u: Any, m: mqtt.MQTTMessage) -> None:
        command = msg.decode(m.topic, m.payload)
        assert isinstance(command, msg.Command)
        reply = msg.CommandReply(
            device=DEVICE, boot="boot0", seq=self.next_seq(), ts=time.time(), id=command.id,
            ok=False, error=f"cannot {command.action}: {HOSTILE}",
        )  # fmt: skip
        threading.Thread(target=self.send, args=(reply,), daemon=True).start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def collector_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from collector.service import Collector, CollectorConfig

    tmp = tmp_path_factory.mktemp("terminal")
    with Mosquitto(tmp / "mosquitto", persistence=False) as broker:
        collector = Collector(
            CollectorConfig(
                broker_url=broker.url,
                fleet=FLEET,
                store_url=f"sqlite:///{tmp}/fleet.db",
                http="127.0.0.1:0",
                client_id=f"term-{uuid.uuid4().hex[:8]}",
                batch_interval_s=0.02,
                worker="thread",
                api_token=TOKEN,
            )
        ).start()
        device = HostileDevice(broker.port)
        try:
            device.announce()
            stored = collector.state.device  # the device, as the collector's API serves it
            assert wait_for(lambda: stored(DEVICE) is not None, 15)
            host, port = collector.http_address_bound()
            yield f"http://{host}:{port}"
        finally:
            device.close()
            collector.stop()


def _edgeship(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "sdk.cli", *args],
        capture_output=True,
        timeout=120,
        env={**os.environ, "EDGESHIP_API_TOKEN": TOKEN},
    )


def test_fleet_status_shows_a_hostile_model_name_escaped(collector_url: str) -> None:
    done = _edgeship("fleet", "status", "--collector", collector_url)
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode("utf-8")
    assert b"\x1b" not in done.stdout and b"\x07" not in done.stdout and b"\r" not in done.stdout
    assert _controls(out) == [], _controls(out)
    row = next(line for line in out.splitlines() if line.startswith(DEVICE))
    assert f"{ESCAPED}@{ESCAPED}" in row  # model@version, on the device's own row
    # the newline inside the name forged no row of its own
    assert not any(line.startswith("pi-ok") for line in out.splitlines())

    watched = _edgeship("fleet", "watch", "--collector", collector_url, "--count", "1")
    assert watched.returncode == 0, watched.stderr
    assert _controls(watched.stdout.decode("utf-8")) == []
    assert ESCAPED in watched.stdout.decode("utf-8")


def test_fleet_command_shows_a_hostile_reply_escaped(collector_url: str) -> None:
    done = _edgeship("fleet", "command", DEVICE, "ping", "--collector", collector_url)
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout.decode("utf-8")
    assert _controls(out) == [] and b"\x1b" not in done.stdout
    assert f"{DEVICE} failed: cannot ping: {ESCAPED}" in out
    assert out.count("\n") == 1  # one line, whatever the reply held


def test_error_messages_quoting_input_are_escaped(tmp_path: Path) -> None:
    bad = tmp_path / f"bundle{TITLE}\x1b[2J"
    done = _edgeship("inspect", str(bad))
    assert done.returncode == 2
    err = done.stderr.decode("utf-8")
    assert _controls(err) == [] and "\\x1b]0;pwned\\x07\\x1b[2J" in err
    assert err.count("\n") == 1
    # A collector address urllib refuses (control characters) was an internal error, exit 3.
    for action in (["status"], ["watch", "--count", "1"]):
        done = _edgeship("fleet", *action, "--collector", f"http://127.0.0.1:9/{TITLE}")
        err = done.stderr.decode("utf-8")
        assert done.returncode == 2 and _controls(err) == [] and err.count("\n") == 1, err
        assert err.startswith("edgeship: error: --collector 'http://127.0.0.1:9/\\x1b]0;pwned")


def test_inspect_of_a_hostile_manifest_prints_no_control(tmp_path: Path) -> None:
    """A manifest edited by hand to carry ESC sequences: whether the bundle contract refuses
    it (one line, exit 2) or inspect shows it, nothing of it reaches the terminal raw."""
    from sdk.artifact import read_artifact
    from sdk.package import package
    from tests.helpers import write_mlp_onnx

    art = read_artifact(write_mlp_onnx(tmp_path / "mlp.onnx"))
    package(art, tmp_path / "bundle", name="mlp", version="1")
    path = tmp_path / "bundle" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["model"]["name"] = manifest["model"]["version"] = HOSTILE
    path.write_text(json.dumps(manifest))
    done = _edgeship("inspect", str(tmp_path / "bundle"))
    out, err = done.stdout.decode("utf-8"), done.stderr.decode("utf-8")
    assert _controls(out) == [] and _controls(err) == [], (out, err)
    assert b"\x1b" not in done.stdout + done.stderr
    if done.returncode == 0:
        assert f"model      {ESCAPED} v{ESCAPED}:" in out
    else:
        assert done.returncode == 2 and err.count("\n") == 1, err
