"""Probation on model health (issue 14): a real agent serving scikit-learn's digits on a thread,
bundles built here from a logistic regression, deployed through the agent's own ``deploy_*``
handlers (no broker needed). A bundle that answers one class, one that does ten times the work
and one whose detector flags half its inputs are each rolled back with the failed line named;
a good bundle is applied with its figures; no application call fails. A quiet device's
probation ends by time. The verdicts are asserted by the line they name, never by timings."""

from __future__ import annotations

import base64
import hashlib
import re
import threading
import time
import tracemalloc
import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent import Agent, AgentConfig
from device_agent.bundle import load_bundle
from device_agent.contracts import messages as msg
from device_agent.contracts.commands import (
    MAX_CHUNK_BYTES,
    DeployBegin,
    DeployError,
    ProbationArgs,
)
from device_agent.contracts.reference import ReferenceStats
from device_agent.probation import Side, Trial, judge
from device_agent.slot import LoadedModel, ModelSlot

LABELS = [str(i) for i in range(10)]


def _digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    return x[:1000], y[:1000], x[1000:]


def _write_model(
    path: Path, w: np.ndarray, b: np.ndarray, *, redundant_layers: int = 0, seed: int = 0
) -> Path:
    """x[batch, 64] -> MatMul -> Add -> logits[batch, 10]; with ``redundant_layers``, a side
    branch of (batch * 64)x512 by 512x512 products whose sum is multiplied by 0 and added to
    the logits: real work the answer does not depend on."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits = [numpy_helper.from_array(w.astype(np.float32), "w"),
             numpy_helper.from_array(b.astype(np.float32), "b")]  # fmt: skip
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["logits0" if redundant_layers else "logits"]),
    ]
    if redundant_layers:
        rng = np.random.default_rng(seed)
        square = rng.normal(0, 1 / np.sqrt(512), (512, 512)).astype(np.float32)
        inits += [
            numpy_helper.from_array(np.ones((1, 512), np.float32), "ones"),
            numpy_helper.from_array(square, "square"),
            numpy_helper.from_array(np.zeros((1,), np.float32), "zero"),
            numpy_helper.from_array(np.array([-1, 1], np.int64), "column"),
        ]
        nodes += [
            helper.make_node("Reshape", ["x", "column"], ["xt"]),
            helper.make_node("MatMul", ["xt", "ones"], ["r0"]),
        ]
        for i in range(redundant_layers):
            nodes.append(helper.make_node("MatMul", [f"r{i}", "square"], [f"r{i + 1}"]))
        nodes += [
            helper.make_node("ReduceSum", [f"r{redundant_layers}"], ["total"], keepdims=0),
            helper.make_node("Mul", ["total", "zero"], ["nothing"]),
            helper.make_node("Add", ["logits0", "nothing"], ["logits"]),
        ]
    batch = "batch"
    graph = helper.make_graph(
        nodes,
        "digits-logreg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, w.shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from sklearn.linear_model import LogisticRegression

    from sdk.artifact import read_artifact
    from sdk.detect import fit_detector
    from sdk.package import package

    root = tmp_path_factory.mktemp("probation-bundles")
    x, y, x_cal = _digits()
    clf = LogisticRegression(max_iter=500).fit(x, y)
    w, b = clf.coef_.T, clf.intercept_

    def bundle(
        name: str, version: str, *, fpr: float | None = 0.05, features: int = 64, **model: Any
    ) -> Path:
        path = _write_model(root / f"{name}.onnx", w[:features], b, **model)
        if "constant" in name:
            path = _write_model(root / f"{name}.onnx", np.zeros_like(w), np.eye(10)[3] * 5)
        detector = None
        if fpr is not None:
            detector = fit_detector(
                "max_softmax", {"x": x_cal}, path, target_fpr=fpr, out=root / f"{name}.npz"
            )
        artifact = read_artifact(path)
        return package(
            artifact, root / name, name="digits", version=version, labels=LABELS,
            detector=detector,
        ).root  # fmt: skip

    return {
        "v1": bundle("v1", "1"),
        "good": bundle("good", "2"),
        "constant": bundle("constant", "2-constant", fpr=None),
        # Forty 64x512x512 products for a model that does one 64x10: about 100x the work.
        "slow": bundle("slow", "2-slow", fpr=None, redundant_layers=40),
        # The same model, its detector calibrated to flag half of in-distribution inputs.
        "noisy": bundle("noisy", "2-noisy", fpr=0.5),
        # It takes 32 features where the application sends 64: every call fails on it.
        "narrow": bundle("narrow", "2-narrow", fpr=None, features=32),
    }


@dataclass
class _App:
    """The application: predict() on a cycle of test digits, on its own thread."""

    agent: Agent
    x: np.ndarray
    calls: int = 0
    failures: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            try:
                self.agent.predict({"x": self.x[i % len(self.x) : i % len(self.x) + 1]})
                self.calls += 1
            except Exception as exc:  # every failure is a test failure, whatever its type
                self.failures.append(exc)
            i += 1
            time.sleep(0.001)


@contextmanager
def _device(bundle: Path, state: Path, *, traffic: bool = True) -> Iterator[tuple[Agent, _App]]:
    cfg = AgentConfig(device_id="pi-h", state_dir=state, window_s=0.5)
    agent = Agent.from_bundle(bundle, cfg).start()
    app = _App(agent, _digits()[2])
    thread = threading.Thread(target=app.run, daemon=True)
    if traffic:
        thread.start()
    try:
        yield agent, app
    finally:
        app.stop.set()
        if traffic:
            thread.join(10)
        agent.close()


def _call(agent: Agent, action: str, args: dict[str, Any]) -> Any:
    command = msg.Command(id=uuid.uuid4().hex[:12], action=action, ts=time.time(), args=args)
    return agent.command_handlers[action](command)


def _deploy(agent: Agent, bundle: Path, probation: ProbationArgs | None = None) -> dict[str, Any]:
    """begin, chunks, commit through the agent's handlers; then deploy_status until the
    probation is over. Returns the last status."""
    result = _commit(agent, bundle, probation)
    deploy_id = result["deploy"]
    deadline = time.monotonic() + 120
    while result["state"] == "probation":
        assert time.monotonic() < deadline, f"still on probation: {result}"
        time.sleep(0.05)
        result = dict(_call(agent, "deploy_status", {"deploy": deploy_id}))
    return result


def _commit(agent: Agent, bundle: Path, probation: ProbationArgs | None) -> dict[str, Any]:
    """begin, chunks, commit: the commit's reply (the bundle on probation)."""
    from sdk.deploy import pack_bundle

    archive = pack_bundle(bundle)
    deploy_id = f"d{uuid.uuid4().hex[:12]}"
    chunks = -(-len(archive) // MAX_CHUNK_BYTES)
    begin = DeployBegin(
        deploy_id, len(archive), hashlib.sha256(archive).hexdigest(), chunks,
        min(MAX_CHUNK_BYTES, len(archive)), probation=probation,
    )  # fmt: skip
    _call(agent, "deploy_begin", begin.to_args())
    for i in range(chunks):
        part = archive[i * MAX_CHUNK_BYTES : (i + 1) * MAX_CHUNK_BYTES]
        _call(agent, "deploy_chunk", {
            "deploy": deploy_id, "index": i, "data": base64.b64encode(part).decode(),
            "sha256": hashlib.sha256(part).hexdigest(),
        })  # fmt: skip
    result = dict(_call(agent, "deploy_commit", {"deploy": deploy_id}))
    assert result["state"] == "probation", result
    return result


def test_unhealthy_bundles_roll_back_naming_the_line_and_a_good_one_is_applied(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    with _device(bundles["v1"], tmp_path / "state") as (agent, app):
        limits = ProbationArgs(inferences=60)
        expected = {
            "constant": ("class '3' predicted for 100%", "the previous model's"),
            "slow": ("p95 latency", "the previous model's"),
            "noisy": ("outlier rate", "the previous model's"),
        }
        for name, needles in expected.items():
            before = app.calls
            # The ratio alone judges the slow one: on a fast machine its extra work may take
            # less than the default floor of 0.5 ms above a model that takes microseconds.
            floor = {"latency_floor_ms": 0.0} if name == "slow" else {}
            result = _deploy(agent, bundles[name], ProbationArgs(inferences=60, **floor))
            assert result["state"] == "rolled_back", (name, result)
            reason = result["reason"]
            assert reason.startswith("model health: "), (name, reason)
            assert all(n in reason for n in needles), (name, reason)
            assert agent.bundle.manifest.model.version == "1"
            assert app.calls > before
        result = _deploy(agent, bundles["good"], limits)
        assert result["state"] == "applied", result
        assert result["reason"].startswith("healthy over "), result
        assert "p95 latency" in result["reason"] and "outlier rate" in result["reason"]
        assert agent.bundle.manifest.model.version == "2"
        before = app.calls
        deadline = time.monotonic() + 20
        while app.calls < before + 10:
            assert time.monotonic() < deadline, "the application stalled"
            time.sleep(0.01)
        assert app.failures == [], app.failures[:3]
        # Outside probation, predict hands nothing to a trial.
        assert agent.slot.loaded.trial is None


def test_a_quiet_device_ends_probation_by_time_with_the_verdict_it_was_asked_for(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    with _device(bundles["v1"], tmp_path / "state", traffic=False) as (agent, _):
        result = _deploy(agent, bundles["noisy"], ProbationArgs(seconds=0.5, quiet="rollback"))
        assert result["state"] == "rolled_back", result
        assert "only 0 calls" in result["reason"] and "too few to judge" in result["reason"]
        assert agent.bundle.manifest.model.version == "1"
        # By default a count ends it, and 600 s if the count is not reached; here 0.5 s.
        result = _deploy(agent, bundles["good"], ProbationArgs(inferences=50, seconds=0.5))
        assert result["state"] == "applied", result
        assert result["reason"].startswith("applied without a health verdict: only 0 calls")
        assert agent.bundle.manifest.model.version == "2"


def test_with_an_error_rate_allowed_a_bundle_failing_every_call_is_judged_within_the_count(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """max_error_rate 0.5: each failed call is answered by the previous model and counted, and
    the failures count toward the 30 calls that end the probation, so the error line rolls
    back after at most 30 of them, not when ``seconds`` runs out."""
    with _device(bundles["v1"], tmp_path / "state") as (agent, app):
        limits = ProbationArgs(inferences=30, seconds=60, max_error_rate=0.5)
        result = _deploy(agent, bundles["narrow"], limits)
        assert result["state"] == "rolled_back", result
        found = re.search(r"(\d+) of (\d+) calls failed on the new bundle", result["reason"])
        assert found is not None, result["reason"]
        failed, tried = int(found[1]), int(found[2])
        assert failed == tried and limits.min_calls <= tried <= 30, result["reason"]
        assert agent.bundle.manifest.model.version == "1"
        assert app.failures == [], app.failures[:3]


def test_deploy_begin_refuses_bad_probation_arguments_naming_them(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    good = {"deploy": "d1", "size": 2048, "sha256": "0" * 64, "chunks": 4, "chunk_bytes": 512}
    bad = [
        ({"inferences": 0}, "'inferences'"),
        ({"inferences": True}, "'inferences'"),
        ({"seconds": 0}, "'seconds'"),
        ({"seconds": float("inf")}, "'seconds'"),
        ({"max_latency_ratio": 0.5}, "'max_latency_ratio'"),
        ({"max_class_shift": "0.5"}, "'max_class_shift'"),
        ({"max_error_rate": 2}, "'max_error_rate'"),
        ({"quiet": "maybe"}, "'quiet'"),
        ({"inferences": 5}, "'inferences' (5) is below 'min_calls' (10)"),
        ({"inferences": 50, "min_calls": 100}, "'inferences' (50) is below 'min_calls' (100)"),
        ({"p99": 3}, "unknown argument 'p99'"),
    ]
    cfg = AgentConfig(device_id="pi-h", state_dir=tmp_path / "state")
    with Agent.from_bundle(bundles["v1"], cfg) as agent:
        for probation, needle in bad:
            with pytest.raises(DeployError) as info:
                _call(agent, "deploy_begin", {**good, "probation": probation})
            assert needle in str(info.value), (probation, str(info.value))
        with pytest.raises(DeployError, match="'probation': expected an object"):
            _call(agent, "deploy_begin", {**good, "probation": [1]})
        assert _call(agent, "deploy_begin", {**good, "probation": {}})["state"] == "receiving"
    # The host's arguments parse back to the same values; the defaults are not sent.
    args = ProbationArgs(inferences=100, max_latency_ratio=3, quiet="rollback")
    begin = DeployBegin("d1", 2048, "0" * 64, 4, 512, probation=args)
    assert begin.to_args()["probation"] == {
        "inferences": 100,
        "max_latency_ratio": 3,
        "quiet": "rollback",
    }
    assert DeployBegin.parse(begin.to_args(), max_bytes=4096) == begin
    assert ProbationArgs(seconds=30).ends(20) == (None, 30)
    assert ProbationArgs().ends(20) == (20, ProbationArgs.DEFAULT_SECONDS)
    # The agent's own default below min_calls is raised to it: a verdict stays possible.
    assert ProbationArgs().ends(5) == (10, ProbationArgs.DEFAULT_SECONDS)
    assert ProbationArgs(min_calls=3).ends(5) == (5, ProbationArgs.DEFAULT_SECONDS)
    assert ProbationArgs.parse({"probation": {"inferences": 10}}).inferences == 10


def _side(classes: dict[str, int], outliers: int = 0) -> Side:
    n = sum(classes.values())
    return Side(calls=n, samples=n, scored=n, outliers=outliers, labelled=n, classes=classes)


def test_without_the_previous_model_the_reference_is_the_baseline() -> None:
    """When the new bundle takes other inputs the previous model cannot run them: outliers and
    class shares are compared with the bundle's reference.json."""
    spread = {label: 0.1 for label in LABELS}
    ref = ReferenceStats(samples=1000, predictions=spread, prediction_counts={}, outlier_rate=0.02)
    limits = ProbationArgs()
    one_class = _side({"7": 40})
    line = judge(limits, one_class, None, ref)
    assert line is not None and "class '7'" in line and "the reference's" in line
    assert judge(limits, _side({"1": 8, "2": 12, "3": 20}), None, ref) is None
    line = judge(limits, _side({"1": 20, "2": 20}, outliers=12), None, ref)
    assert line is not None and "outlier rate 30.0%" in line and "the reference's 2.0%" in line
    # 0 expected against 1 seen is not a failure: below min_outliers.
    assert judge(limits, _side({"1": 20, "2": 20}, outliers=1), None, ref) is None
    # Traffic that is one class for the previous model too: not a collapse.
    assert judge(limits, one_class, _side({"7": 40}), ref) is None
    # Too few calls: nothing is judged.
    assert judge(limits, _side({"7": 5}), None, ref) is None


class _Owner:
    """A Trial's owner that records its verdict (the deployer's part, without disk or swap)."""

    def __init__(self) -> None:
        self.verdicts: list[tuple[str, str]] = []
        self.done = threading.Event()

    def rollback(self, trial: Trial, reason: str) -> None:
        if trial.decide("rolled_back"):
            self.verdicts.append(("rolled_back", reason))
            self.done.set()

    def probation_passed(self, trial: Trial, reason: str) -> None:
        if trial.decide("applied"):
            self.verdicts.append(("applied", reason))
            self.done.set()


@contextmanager
def _blocked_trial(
    bundles: dict[str, Path], new_name: str, limits: ProbationArgs, *, inferences: int,
    reference: ReferenceStats | None = None,
) -> Iterator[tuple[Trial, ModelSlot, _Owner, threading.Lock]]:  # fmt: skip
    """A started probation of ``new_name`` against v1, whose shadow runs wait on the lock
    yielded (held: the previous model cannot keep up at all) until the test releases it."""
    cfg = AgentConfig(device_id="pi-h")
    previous = LoadedModel.open(load_bundle(bundles["v1"]), cfg)
    new = LoadedModel.open(load_bundle(bundles[new_name]), cfg)
    blocked = threading.Lock()
    blocked.acquire()
    previous.run_lock = blocked  # observe() takes it around the previous model's run
    slot, owner = ModelSlot(new), _Owner()
    trial = Trial(
        owner, slot, "d-test", new, previous, limits,
        inferences=inferences, seconds=None, reference=reference,
    )  # fmt: skip
    new.trial = trial
    trial.start()
    try:
        yield trial, slot, owner, blocked
    finally:
        if blocked.locked():
            blocked.release()
        trial.decide("stopped")
        trial._thread.join(10)


def test_input_copies_waiting_for_the_previous_model_are_bounded_in_bytes(
    bundles: dict[str, Path],
) -> None:
    """An application sending 5 MiB batches while the previous model is behind: the copies
    held for it stay under 64 MiB (16 would be 80 MiB); the calls that do not fit are counted
    as skipped, and every copy is released once compared."""
    batch = np.random.default_rng(0).random((20480, 64), dtype=np.float32)  # 5 MiB
    calls = 30
    with _blocked_trial(bundles, "good", ProbationArgs(), inferences=calls) as (
        trial, slot, owner, blocked,
    ):  # fmt: skip
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(calls):
                slot.predict({"x": batch})
            held = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        bound = 64 << 20
        assert held < bound + (4 << 20), f"{held / 2**20:.0f} MiB held for the shadow runs"
        assert trial.max_waiting_bytes == bound
        assert 0 < trial.peak_waiting_bytes <= bound, trial.peak_waiting_bytes
        assert trial.skipped >= calls - bound // batch.nbytes, trial.skipped
        blocked.release()
        assert owner.done.wait(60), "no verdict"
        assert trial.waiting_bytes == 0


def _spread_reference() -> ReferenceStats:
    spread = {label: 0.1 for label in LABELS}
    return ReferenceStats(samples=1000, predictions=spread, prediction_counts={}, outlier_rate=0.05)


def _calls_then_verdict(
    slot: ModelSlot, owner: _Owner, blocked: threading.Lock, calls: int
) -> tuple[str, str]:
    x = _digits()[2]
    for i in range(calls):
        slot.predict({"x": x[i : i + 1]})
    blocked.release()  # the previous model catches up on the (at most 17) copies kept
    assert owner.done.wait(60), "no verdict"
    return owner.verdicts[0]


@pytest.mark.parametrize("name", ["constant", "good"])
def test_too_few_calls_compared_with_a_slow_previous_model_judge_against_the_reference(
    bundles: dict[str, Path], name: str
) -> None:
    """The previous model cannot keep up (held behind a lock until all 30 calls are made):
    at most 17 of them are compared, fewer than min_calls 20. Outliers and classes are then
    judged on every call against reference.json, and a passing verdict names latency as not
    judged instead of saying 'healthy' over lines it skipped."""
    limits = ProbationArgs(min_calls=20)
    with _blocked_trial(bundles, name, limits, inferences=30, reference=_spread_reference()) as (
        trial,
        slot,
        owner,
        blocked,
    ):
        verdict, reason = _calls_then_verdict(slot, owner, blocked, 30)
    if name == "constant":
        assert verdict == "rolled_back", reason
        assert "class '3' predicted for 100% of 30 samples" in reason, reason
        assert "the reference's" in reason, reason
    else:
        assert verdict == "applied", reason
        assert reason.startswith("healthy over 30 calls"), reason
        assert "not judged: latency (" in reason and "compared with the previous model" in reason
        assert "outliers" not in reason.split("not judged:")[1], reason
    assert trial.skipped > 0 and trial._base.calls < limits.min_calls


def test_without_a_reference_the_verdict_names_every_line_not_judged(
    bundles: dict[str, Path],
) -> None:
    with _blocked_trial(bundles, "good", ProbationArgs(min_calls=20), inferences=30) as (
        _, slot, owner, blocked,
    ):  # fmt: skip
        verdict, reason = _calls_then_verdict(slot, owner, blocked, 30)
    assert verdict == "applied", reason
    assert "not judged: latency, outliers, classes (" in reason, reason
    assert "no reference statistics" in reason, reason


def _probation_threads(deploy_id: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"probation-{deploy_id}"]


def test_after_close_no_verdict_is_applied_and_the_probation_thread_has_exited(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """A quiet device's probation would end at 3 s with 'apply'; the agent closes before.
    Once close returns the thread is gone, and nothing writes current.json after it."""
    with _device(bundles["v1"], tmp_path / "state", traffic=False) as (agent, _):
        committed = time.monotonic()
        deploy_id = _commit(agent, bundles["good"], ProbationArgs(seconds=3))["deploy"]
        assert _probation_threads(deploy_id)
        agent.close()
        closed = time.monotonic()
        assert closed - committed < 3, "too slow to close before the verdict: not judged"
        time.sleep(3.5 - (closed - committed))  # past the time the verdict was due
        assert not (agent.deployer.root / "current.json").exists()
        assert _probation_threads(deploy_id) == []
        assert agent.deployer.status({"deploy": deploy_id})["state"] == "probation"


def test_a_rolled_back_bundle_is_released_without_the_garbage_collector(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    """The rejected model's session is freed once the rollback is done and its last call
    returned: nothing keeps it (a reference cycle would wait for the GC, disabled here)."""
    import gc

    gc.collect()
    gc.disable()
    try:
        with _device(bundles["v1"], tmp_path / "state", traffic=False) as (agent, _):
            result = _commit(agent, bundles["narrow"], ProbationArgs(inferences=30))
            assert agent.slot.loaded.model.version == "2-narrow"
            session = weakref.ref(agent.slot.loaded.session)
            # It fails on the new bundle (32 features, 64 sent): the previous model answers.
            answer = agent.predict({"x": _digits()[2][:1]})
            assert answer.labels is not None
            status = _call(agent, "deploy_status", {"deploy": result["deploy"]})
            assert status["state"] == "rolled_back", status
            deadline = time.monotonic() + 20
            while _probation_threads(result["deploy"]) or session() is not None:
                assert time.monotonic() < deadline, "the rejected session is still referenced"
                time.sleep(0.05)
    finally:
        gc.enable()


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=20), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        _JSONISH,
        st.dictionaries(st.sampled_from(ProbationArgs.KEYS), _JSONISH, max_size=6),
    )
)
def test_fuzz_the_probation_object_is_parsed_or_refused_by_name(value: Any) -> None:
    """Any ``probation`` object a deploy_begin can carry (NaN, huge numbers, strings, nesting,
    surrogates, unknown keys) is a ProbationArgs within the limits or a DeployError: never
    another exception, which would fail the deploy command as an internal error."""
    try:
        parsed = ProbationArgs.parse({"probation": value})
    except DeployError as exc:
        assert str(exc)
        return
    assert parsed.min_calls >= 1 and parsed.max_latency_ratio >= 1.0
    assert parsed.inferences is None or parsed.inferences >= parsed.min_calls
    assert ProbationArgs.parse({"probation": parsed.to_args()}) == parsed  # round trip
