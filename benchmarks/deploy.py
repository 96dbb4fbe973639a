"""Remote deploy, measured: how long a bundle takes to reach and swap into a running agent, and
what the application sees meanwhile.

One agent (in this process) serves ``Agent.predict`` in a loop on its own thread, as an
application would, while ``sdk.deploy.deploy_bundle`` sends it bundles over MQTT: a good one
(applied after its probation) and a bad one (inputs of another shape: rolled back after its
first failing inference), alternating, ``--rounds`` times. Models are MLPs of random weights
(``--hidden`` sets the size; random weights do not compress, so the archive is about the size
of the model). Printed per deploy: archive size, chunks, the upload time and rate, the time from
the last chunk to the device's verdict (verify, unpack, load, self-test, swap, probation), the
total; and for the application, calls, failed calls, p50 and max latency during the deploy
against the same figures in the quiet second before it. Exits 1 unless every application call
succeeded and every deploy had its expected outcome.

Then probation on model health (issue 14), ``--health`` times: a second agent serves
scikit-learn's digits (a logistic regression with twelve redundant 64x512x512 MatMuls, so a
call takes about a millisecond) while four bundles are deployed with
``probation={"inferences": N}``: one that predicts a constant class (its logits ignore the
input), one about 3x slower (three times the redundant MatMul work), one whose detector flags
5x the outliers (its threshold calibrated for a 25% false-positive rate where the running
bundle's is 5%), and a good one. Printed per
deploy: the verdict and its reason (the failed line), the time from commit to verdict, and the
application's calls and failed calls meanwhile. The three bad ones must be rolled back by model
health, the good one applied, and no application call may fail.

    python benchmarks/deploy.py [--broker mqtt://127.0.0.1:1883 | --broker embedded]
        [--hidden 4096] [--rounds 3] [--health 1] [--probation 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from device_agent import Agent, AgentConfig
from device_agent.contracts.commands import ProbationArgs
from sdk.deploy import deploy_bundle

FEATURES = 64


def _wait_connected(agent: Any) -> None:
    """Up to 30 s for the agent's broker link, then a second for its subscriptions."""
    deadline = time.monotonic() + 30
    while not agent.stats.get("connected") and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)


def _save(graph: Any, path: Path) -> Path:
    """``graph`` as an ONNX file (opset 17, IR 8: what every runtime here reads)."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _mlp(path: Path, features: int, hidden: int, seed: int) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.1, (features, hidden)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.1, (hidden, 10)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    return _save(graph, path)


def _bundle(root: Path, name: str, version: str, features: int, hidden: int, seed: int) -> Path:
    from sdk.artifact import read_artifact
    from sdk.package import package

    model = _mlp(root / f"{name}.onnx", features, hidden, seed)
    return package(read_artifact(model), root / name, name="mlp", version=version).root


def _digits_model(path: Path, w: np.ndarray, b: np.ndarray, layers: int) -> Path:
    """x[batch, 64] -> logits = x @ w + b, plus ``layers`` products of (batch * 64)x512 by
    512x512 whose sum, times 0, is added to the logits: work the answer does not depend on."""
    from onnx import TensorProto, helper, numpy_helper

    square = np.random.default_rng(0).normal(0, 1 / np.sqrt(512), (512, 512))
    inits = [
        numpy_helper.from_array(w.astype(np.float32), "w"),
        numpy_helper.from_array(b.astype(np.float32), "b"),
        numpy_helper.from_array(np.ones((1, 512), np.float32), "ones"),
        numpy_helper.from_array(square.astype(np.float32), "square"),
        numpy_helper.from_array(np.zeros((1,), np.float32), "zero"),
        numpy_helper.from_array(np.array([-1, 1], np.int64), "column"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("Add", ["h", "b"], ["logits0"]),
        helper.make_node("Reshape", ["x", "column"], ["xc"]),
        helper.make_node("MatMul", ["xc", "ones"], ["r0"]),
    ]
    for i in range(layers):
        nodes.append(helper.make_node("MatMul", [f"r{i}", "square"], [f"r{i + 1}"]))
    nodes += [
        helper.make_node("ReduceSum", [f"r{layers}"], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "zero"], ["nothing"]),
        helper.make_node("Add", ["logits0", "nothing"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        inits,
    )
    return _save(graph, path)


def _health_bundles(root: Path) -> tuple[dict[str, Path], np.ndarray]:
    """The running bundle and the four candidates, and the application's inputs."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from sdk.artifact import read_artifact
    from sdk.detect import fit_detector
    from sdk.package import package

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    clf = LogisticRegression(max_iter=500).fit(x[:1000], y[:1000])
    w, b = clf.coef_.T, clf.intercept_
    labels = [str(i) for i in range(10)]

    def bundle(name: str, version: str, *, layers: int = 12, fpr: float | None = 0.05,
               constant: bool = False) -> Path:  # fmt: skip
        weights, bias = (np.zeros_like(w), np.eye(10)[3] * 5) if constant else (w, b)
        model = _digits_model(root / f"{name}.onnx", weights, bias, layers)
        detector = None
        if fpr is not None:
            detector = fit_detector(
                "max_softmax", {"x": x[1000:1400]}, model, target_fpr=fpr,
                out=root / f"{name}.npz",
            )  # fmt: skip
        return package(
            read_artifact(model), root / name, name="digits", version=version, labels=labels,
            detector=detector,
        ).root  # fmt: skip

    bundles = {
        "h1": bundle("h1", "1"),
        "constant": bundle("constant", "2-constant", constant=True),
        "slow3x": bundle("slow3x", "2-slow", layers=36),
        "outliers5x": bundle("outliers5x", "2-outliers", fpr=0.25),
        "good": bundle("good", "2"),
    }
    return bundles, x[1400:]


def _health(broker: str, root: Path, rounds: int, inferences: int) -> list[dict[str, Any]]:
    """Deploy each health candidate, then the good one, ``rounds`` times; one row each."""
    bundles, inputs = _health_bundles(root)
    fleet = f"bench{uuid.uuid4().hex[:8]}"
    config = AgentConfig(
        device_id="pi-health", fleet=fleet, broker_url=broker, window_s=1.0,
        state_dir=root / "health-state",
    )  # fmt: skip
    rows: list[dict[str, Any]] = []
    expect = {"constant": "rolled_back", "slow3x": "rolled_back", "outliers5x": "rolled_back"}
    agent = Agent.from_bundle(bundles["h1"], config).start()
    app = _App(agent, inputs)
    app.thread.start()
    try:
        _wait_connected(agent)
        for _ in range(rounds):
            for name in ("constant", "slow3x", "outliers5x", "good"):
                start = time.perf_counter()
                marks: list[float] = []
                result = deploy_bundle(
                    bundles[name], broker, fleet, "pi-health", timeout_s=300,
                    probation=ProbationArgs(inferences=inferences),
                    progress=lambda done, total, marks=marks: marks.append(time.perf_counter()),
                )  # fmt: skip
                end = time.perf_counter()
                during = app.window(start, end)
                row = {
                    "bundle": name,
                    "state": result.state,
                    "expected": expect.get(name, "applied"),
                    "reason": result.reason,
                    "verdict_s": end - (marks[-1] if marks else start),
                    "health": True,
                    "during": during,
                }
                rows.append(row)
                print(
                    f"{name:>10} -> {result.state:<11} verdict +{row['verdict_s']:.2f} s after "
                    f"the last chunk | app: {during['calls']} calls, {during['failed']} failed"
                    f"\n{'':>14}{result.reason}",
                    flush=True,
                )
                if result.state == "applied":  # back to the running bundle for the next round
                    deploy_bundle(bundles["h1"], broker, fleet, "pi-health", timeout_s=300)
    finally:
        app.stop.set()
        app.thread.join(5)
        agent.close()
    return rows


class _App:
    def __init__(self, agent: Agent, inputs: np.ndarray | None = None) -> None:
        self.agent = agent
        self.inputs = (
            np.random.default_rng(0).random((1, FEATURES), dtype=np.float32)
            if inputs is None
            else inputs
        )
        self.calls: list[tuple[float, float, bool]] = []  # (start, latency s, ok)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            t0 = time.perf_counter()
            j = i % len(self.inputs)
            i += 1
            try:
                self.agent.predict({"x": self.inputs[j : j + 1]})
                ok = True
            except Exception:
                ok = False
            self.calls.append((t0, time.perf_counter() - t0, ok))
            time.sleep(0.001)

    def window(self, start: float, end: float) -> dict[str, Any]:
        calls = [c for c in self.calls if start <= c[0] < end]
        lat = sorted(c[1] * 1000 for c in calls)
        return {
            "calls": len(calls),
            "failed": sum(1 for c in calls if not c[2]),
            "p50_ms": statistics.median(lat) if lat else None,
            "max_ms": max(lat) if lat else None,
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--health", type=int, default=1, help="rounds of probation on health")
    parser.add_argument("--probation", type=int, default=200, help="probation inferences")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    embedded = None
    broker = args.broker
    if broker == "embedded":
        from sdk.broker import EmbeddedBroker

        embedded = EmbeddedBroker().start()
        broker = embedded.url
    rows: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            bundles = {
                "v1": _bundle(root, "v1", "1", FEATURES, args.hidden, 0),
                "v2": _bundle(root, "v2", "2", FEATURES, args.hidden, 1),
                "bad": _bundle(root, "bad", "3-bad", FEATURES // 2, args.hidden, 2),
            }
            fleet = f"bench{uuid.uuid4().hex[:8]}"
            config = AgentConfig(
                device_id="pi-bench",
                fleet=fleet,
                broker_url=broker,
                window_s=1.0,
                state_dir=root / "state",
                deploy_probation_inferences=20,
            )
            agent = Agent.from_bundle(bundles["v1"], config).start()
            app = _App(agent)
            app.thread.start()
            try:
                _wait_connected(agent)
                order: list[str] = []
                for _ in range(args.rounds):
                    order += ["bad", "good"]
                current = "v1"
                for kind in order:
                    target = "bad" if kind == "bad" else ("v2" if current == "v1" else "v1")
                    marks: list[float] = []
                    quiet = time.perf_counter()
                    time.sleep(1.0)
                    start = time.perf_counter()
                    result = deploy_bundle(
                        bundles[target],
                        broker,
                        fleet,
                        "pi-bench",
                        timeout_s=120,
                        progress=lambda done, total, marks=marks: marks.append(time.perf_counter()),
                    )
                    end = time.perf_counter()
                    if result.ok:
                        current = target
                    upload = (marks[-1] - start) if marks else float("nan")
                    row = {
                        "bundle": target,
                        "state": result.state,
                        "archive_mib": result.archive_bytes / 2**20,
                        "chunks": result.chunks,
                        "upload_s": upload,
                        "upload_mib_s": result.archive_bytes / 2**20 / upload,
                        "verdict_s": end - marks[-1],
                        "total_s": end - start,
                        "reason": result.reason,
                        "before": app.window(quiet, start),
                        "during": app.window(start, end),
                    }
                    rows.append(row)
                    d, b = row["during"], row["before"]
                    print(
                        f"{target:>3} -> {result.state:<11} {row['archive_mib']:.2f} MiB in "
                        f"{row['chunks']} chunks: upload {upload:.2f} s "
                        f"({row['upload_mib_s']:.2f} MiB/s), verdict +{row['verdict_s']:.2f} s, "
                        f"total {row['total_s']:.2f} s | app during: {d['calls']} calls, "
                        f"{d['failed']} failed, p50 {d['p50_ms']:.3f} ms, max {d['max_ms']:.1f}"
                        f" ms (before: p50 {b['p50_ms']:.3f}, max {b['max_ms']:.1f} ms)",
                        flush=True,
                    )
            finally:
                app.stop.set()
                app.thread.join(5)
                agent.close()
            if args.health > 0:
                rows += _health(broker, root, args.health, args.probation)
    finally:
        if embedded is not None:
            embedded.stop()
    failed = sum(r["during"]["failed"] for r in rows)
    wrong = [
        r
        for r in rows
        if r["state"] != r.get("expected", "rolled_back" if r["bundle"] == "bad" else "applied")
        or (
            r.get("health")
            and r["state"] == "rolled_back"
            and "model health" not in (r["reason"] or "")
        )
    ]
    print(f"failed application calls over {len(rows)} deploys: {failed} (target 0)")
    print(f"deploys with the wrong outcome: {len(wrong)} (target 0)")
    if args.json is not None:
        args.json.write_text(json.dumps({"broker": args.broker, "rows": rows}, indent=2) + "\n")
    return 0 if failed == 0 and not wrong else 1


if __name__ == "__main__":
    raise SystemExit(main())
