"""Fuzzing the agent's command path (issue 11, findings 3 and 6), through a real agent on a
private Mosquitto.

Boundary: everything that reaches the ``cmd`` topic, and everything that reaches the agent's
command queue. Random actions and arguments (wrong types, lone surrogates, NUL, NaN and inf,
huge integers, deep nesting, duplicate keys, non-UTF-8 bytes, repeated ids) are interleaved
with good ``ping`` commands of unique ids. Invariants:

* every good ping is answered exactly once, ``ok: true``;
* every command the wire decoder accepts is answered once per delivery, every delivery of an
  id with the same answer (at most once per id), ``ok: false`` for an unknown action or bad
  ``benchmark`` arguments (a ``candidate`` that is not on the device included); the
  ``candidate_*`` actions get arguments near valid ones; what the decoder refuses is counted
  and never answered;
* the agent never publishes a message that the contract's decoder refuses;
* afterwards it keeps serving: predict works, outlier events and telemetry windows keep coming,
  every worker thread runs and ``health()`` is ok.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent.benchmark import BenchmarkArgs
from device_agent.contracts import messages as msg
from device_agent.errors import ConfigError, ProtocolError
from tests.agent_device import Device, running_device
from tests.brokers import Mosquitto

ACTIONS = [
    "ping",
    "benchmark",
    "deploy_begin",
    "deploy_chunk",
    "deploy_commit",
    "deploy_status",
    "deploy_abort",
    "deploy_revert",
    "candidate_begin",
    "candidate_chunk",
    "candidate_remove",
    "reboot",
    "x",
]
KNOWN = {"ping", "benchmark", "deploy_begin", "deploy_chunk", "deploy_commit", "deploy_status"}
KNOWN |= {"deploy_abort", "deploy_revert", "candidate_begin", "candidate_chunk", "candidate_remove"}
SPECIAL_TEXT = ["\ud800", "a\udfffb", "\x00", "nul\x00byte", "\u2028", "\U0001f600", "", "x" * 3000]
ID_POOL = ["bad-1", "bad-2", "bad-3", "huge-shape", "d1"]
# A candidate id (the id of this SHA-256) and its SHA-256, so candidate_begin gets past its
# id check; no chunk completes it (the data never matches), so no benchmark of it runs long.
CANDIDATE_SHA = "ab" * 32
CANDIDATE_POOL = ["c" + "ab" * 16, CANDIDATE_SHA, "onnx", "tflite", "c" + "0" * 32]

texts = st.one_of(
    st.sampled_from(SPECIAL_TEXT),
    st.text(max_size=12),
    st.text(st.characters(categories=["Cs", "Cc"]), max_size=4),
)
huge_ints = st.sampled_from([2**63, -(2**63) - 1, 10**30, 10**300, -(10**4000)])
finite = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([1e9, 1e308]))
wire_scalars = st.one_of(st.none(), st.booleans(), st.integers(), huge_ints, finite, texts)


def _deep(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def _json(scalars: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
        max_leaves=8,
    )


def _benchmark_args(junk: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Arguments that are wrong somewhere, or right and quick: max_seconds is always given,
    so a benchmark that passes the checks stops within 50 ms of timed runs."""
    small = st.one_of(st.integers(-2, 20), junk)
    shape = st.fixed_dictionaries(
        {"shape": st.one_of(st.lists(st.integers(-1, 4), max_size=3), junk), "dtype": junk}
    )
    return st.fixed_dictionaries(
        {"max_seconds": st.one_of(st.floats(0.001, 0.05), junk)},
        optional={
            "min_runs": small,
            "warmup_runs": small,
            "min_seconds": st.one_of(st.floats(0, 0.01), junk),
            "bogus": junk,
            "candidate": st.one_of(st.sampled_from(CANDIDATE_POOL), junk),
            "threads": small,
            "inputs": st.one_of(st.dictionaries(texts, st.one_of(shape, junk), max_size=2), junk),
        },
    )


def _args_for(action: str, junk: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    if action == "benchmark":
        return _benchmark_args(junk)
    if action.startswith("candidate"):
        keys = ["candidate", "size", "sha256", "chunks", "chunk_bytes", "format", "index"]
        keys += ["data", "signature"]
        values = st.one_of(junk, st.sampled_from(CANDIDATE_POOL), st.integers(-1, 600))
        return st.dictionaries(st.sampled_from(keys), values)
    if action.startswith("deploy"):
        keys = ["deploy", "size", "sha256", "chunks", "chunk_bytes", "index", "data", "model"]
        keys.append("reason")
        return st.dictionaries(st.sampled_from(keys), st.one_of(junk, st.sampled_from(ID_POOL)))
    return st.dictionaries(texts, junk, max_size=3)


ids = st.one_of(
    st.sampled_from(ID_POOL), st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)
).filter(lambda i: not i.startswith(("good-", "sentinel-", "ready")))


@st.composite
def wire_commands(draw: st.DrawFn) -> dict[str, Any]:
    """A command object, mostly well-formed, sometimes with a field of the wrong kind."""
    action = draw(st.sampled_from(ACTIONS))
    obj: dict[str, Any] = {
        "v": 1,
        "kind": "cmd",
        "ts": time.time(),
        "id": draw(ids),
        "action": action,
        "args": draw(_args_for(action, _json(wire_scalars))),
        "expires": draw(st.one_of(st.none(), st.just(time.time() + 600), st.just(1.0))),
    }
    for key in draw(st.lists(st.sampled_from(list(obj)), max_size=2)):
        obj[key] = draw(_json(wire_scalars))
    return obj


def _render(obj: Any, ascii_only: bool) -> bytes:
    text = json.dumps(obj, ensure_ascii=ascii_only)
    return text.encode("utf-8", "surrogatepass")  # a lone surrogate: bytes that are not UTF-8


raw_payloads = st.one_of(
    st.builds(_render, wire_commands(), st.booleans()),
    st.binary(max_size=64),
    st.sampled_from(
        [
            b'{"v":1,"kind":"cmd","ts":1,"id":"bad-1","id":"bad-2","action":"ping","args":{}}',
            b'{"v":1,"kind":"cmd","ts":NaN,"id":"bad-1","action":"ping","args":{}}',
            b'{"v":1,"kind":"cmd","ts":1,"id":"bad-1","action":"benchmark","args":{"min_runs":'
            + b"9" * 5000
            + b"}}",
            b'{"v":1,"kind":"cmd","ts":1,"id":"bad-2","action":"ping","args":' + b"[" * 5000,
            b'{"v":1,"kind":"cmd","ts":1,"id":"bad-3","action":"ping","args":{"a":"\\ud800"}}',
            b'{"v":1,"kind":"cmd","ts":1,"id":"bad-3","action":"ping","args":{"a":"\\u0000"}}',
            b'{"v":1,"kind":"cmd","ts":1,"id":"bad-1","action":"benchmark","args":'
            b'{"warmup_runs":1e9,"max_seconds":1}}',
            b"",
            b"\xff\xfe{}",
        ]
    ),
)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path_factory.mktemp("mosquitto"), persistence=False) as b:
        yield b


@pytest.fixture
def device(digits_bundle: Path, broker: Mosquitto, tmp_path: Path) -> Iterator[Device]:
    with running_device(digits_bundle, broker, tmp_path / "state") as d:
        yield d


class Ledger:
    """What the agent must have answered: per id, how many deliveries were decoded."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.deliveries: dict[str, int] = {}
        self.actions: dict[str, str] = {}  # id -> the action that ran under it
        self.expect_ok: dict[str, bool] = {}
        self.refused = 0

    def deliver(self, command: msg.Command) -> None:
        first = command.id not in self.deliveries
        self.deliveries[command.id] = self.deliveries.get(command.id, 0) + 1
        if not first:
            return  # answered with the first delivery's reply, whatever this one holds
        self.actions[command.id] = str(command.action)
        if command.expires is not None and command.expires < time.time():
            self.expect_ok[command.id] = False
        elif command.action == "ping":
            self.expect_ok[command.id] = True
        elif command.action not in KNOWN:
            self.expect_ok[command.id] = False
        elif command.action == "benchmark":
            if not isinstance(command.args, Mapping):
                self.expect_ok[command.id] = False
                return
            try:
                parsed = BenchmarkArgs.parse(command.args)
            except ConfigError:
                self.expect_ok[command.id] = False
            else:  # no candidate is ever complete on the device: nothing to time
                if parsed.candidate is not None:
                    self.expect_ok[command.id] = False

    def sentinel(self) -> None:
        """A last ping: commands are answered in order, so once it is, all before it are."""
        command_id = self.device.send("ping", id=f"sentinel-{uuid.uuid4().hex[:12]}")
        self.device.wait_replies(command_id, 1, timeout=60)

    def check(self, touched: set[str]) -> None:
        for command_id in touched:
            replies = self.device.replies(command_id)
            assert len(replies) == self.deliveries[command_id], (command_id, replies)
            answers = {(r.ok, json.dumps(r.result, sort_keys=True), r.error) for r in replies}
            assert len(answers) == 1, (command_id, answers)  # the same reply every time
            ok = replies[0].ok
            if command_id in self.expect_ok:
                assert ok is self.expect_ok[command_id], (self.actions[command_id], replies[0])
            if not ok:
                assert replies[0].error


def _still_serving(device: Device, noise_seed: int) -> None:
    agent = device.agent
    t = time.time()
    pong = device.call("ping")
    assert pong.ok and pong.result["pong"] is True
    events_before = len(device.listener.of(msg.OutlierEvent))
    noise = np.random.default_rng(noise_seed).random((3, 1, 1, 8, 8), dtype=np.float32) * 50
    for x in noise:
        prediction = agent.predict({"image": x})
        assert prediction.outputs[0].shape == (1, 10)
    assert any(agent.predict({"image": x}).is_outlier[0] for x in noise)
    device.listener.wait_for(lambda: len(device.listener.of(msg.OutlierEvent)) > events_before)
    device.telemetry_after(t)
    health = agent.health()
    assert health["ok"] and set(health["workers"].values()) == {"running"}, health
    assert device.listener.invalid == []  # nothing the agent sent breaks the contract


def test_fuzz_commands_over_mqtt(device: Device) -> None:
    """Raw payloads on the real ``cmd`` topic, with good pings between them."""
    ledger = Ledger(device)
    topic = device.cmd_topic
    counter = iter(range(10**9))

    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(st.one_of(st.none(), raw_payloads), min_size=1, max_size=8))
    def run(items: list[bytes | None]) -> None:
        invalid_before = device.agent.stats["mqtt"]["invalid_commands"]
        touched: set[str] = set()
        refused = 0
        for item in items:
            if item is None:
                command_id = f"good-{next(counter)}"
                device.send("ping", id=command_id)
                ledger.deliver(msg.Command(id=command_id, action="ping", ts=0.0))
                touched.add(command_id)
                continue
            try:
                decoded = msg.decode(topic, item)
            except ProtocolError:  # the decoder's contract: nothing else escapes it
                refused += 1
            else:
                assert isinstance(decoded, msg.Command)
                ledger.deliver(decoded)
                touched.add(decoded.id)
            device.send_raw(item)
        ledger.sentinel()
        assert device.agent.stats["mqtt"]["invalid_commands"] - invalid_before == refused
        ledger.check(touched)

    run()
    _still_serving(device, 0)
    assert len(ledger.deliveries) < 1024  # within the reply cache: repeats were all cached


# --- the agent's own command queue, past the decoder --------------------------------------------

# Past the decoder anything a Python caller can build reaches the handlers: NaN, inf, nesting
# far deeper than the wire's 32 levels, integers beyond str()'s 4300 digits, bytes, tuples.
python_scalars = st.one_of(
    wire_scalars,
    st.floats(),
    st.sampled_from([math.nan, math.inf, -math.inf, b"\xff", (1, 2)]),
    # Built, not sampled: hypothesis shows a strategy's elements, and repr() of these raises.
    st.builds(lambda: 10**5000),
    st.builds(_deep, st.just(200)),
)


@st.composite
def queued_commands(draw: st.DrawFn) -> msg.Command:
    action = draw(st.one_of(st.sampled_from(ACTIONS), texts))
    junk = _json(python_scalars)
    args = draw(st.one_of(_args_for(action, junk), st.builds(list, st.lists(junk, max_size=2))))
    expires = draw(st.one_of(st.none(), st.floats(), st.just(time.time() + 600)))
    return msg.Command(id=draw(ids), action=action, ts=0.0, args=args, expires=expires)


def test_fuzz_the_agents_command_queue(device: Device) -> None:
    """Commands built in Python (no decoder) handed to the agent's command queue."""
    agent = device.agent
    ledger = Ledger(device)
    counter = iter(range(10**9))

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(st.one_of(st.none(), queued_commands()), min_size=1, max_size=8))
    def run(items: list[msg.Command | None]) -> None:
        touched: set[str] = set()
        for item in items:
            command = item or msg.Command(id=f"good-{next(counter)}", action="ping", ts=0.0)
            agent._on_command(command)
            ledger.deliver(command)
            touched.add(command.id)
        ledger.sentinel()
        ledger.check(touched)

    run()
    _still_serving(device, 1)
