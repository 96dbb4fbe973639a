"""What the agent costs on top of the bare runtime, measured side by side in one run.

Latency: one process per model holds, on the same int8 model and thread count,

* **bare**: ``onnxruntime.InferenceSession`` on the plain int8 model file, ``session.run``;
* **agent**: ``Agent.predict`` on the bundle, outlier scoring in the model graph (the default
  bundle: ``detector.graph_output``) and telemetry on (MQTT to a broker this script starts);
* **agent, numpy scoring**: the same bundle made with ``detector_in_graph=False`` (the
  reference scorer, and what LiteRT bundles use);
* **agent, no detector**: telemetry only.

They take turns in short blocks (``--blocks`` rounds of ``--block`` calls, the order rotated
each round), so drift and cache effects on a shared machine hit all alike; p50 is over every
call of every block. Then the per-stage costs (input check, run with and without the score
nodes, numpy scoring, telemetry record) are timed in isolated hot loops, which shows where the
added microseconds go.

Memory: for the digits int8 model, separate fresh processes (bare vs agent with scoring and
telemetry) take turns ``--rounds`` times; steady-state RSS medians and their difference.

Targets (issue: device agent): p50 ratio <= 1.15 and RSS difference <= 25 MB on the digits
int8 model. The wider digits CNN and a ~1 ms one show the fixed per-call cost against more
compute per call.

    python benchmarks/agent_overhead.py [--blocks 30] [--block 200] [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (conv width, hidden units, training epochs); the last one is only there for its
# compute per call (about a millisecond here), so a short training is enough.
MODELS = {
    "digits-int8": (16, 128, 15),
    "digits-wide-int8": (96, 512, 15),
    "digits-xl-int8": (320, 1024, 2),
}
VARIANTS = ("bare", "agent", "agent_numpy", "agent_nodet")

SIDE_BY_SIDE = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    import onnxruntime as ort
    from device_agent import Agent, AgentConfig
    args = json.loads(sys.argv[1])
    threads = args["threads"]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    session = ort.InferenceSession(args["plain"], sess_options=opts,
                                   providers=["CPUExecutionProvider"])
    feed = {"image": np.load(args["sample"])}
    agents = {}
    for variant in ("agent", "agent_numpy", "agent_nodet"):
        config = AgentConfig(device_id=f"bench-{variant}".replace("_", "-"), fleet="overhead",
                             broker_url=args["broker"], window_s=1.0, threads=threads,
                             state_dir=f"{args['state']}/{variant}", mqtt_protocol="3.1.1")
        agents[variant] = Agent.from_bundle(args["bundles"][variant], config).start()
    # Telemetry on means connected: time nothing before every agent's MQTT session is up.
    # (The embedded amqtt broker speaks 3.1.1 only and never answers an MQTT 5 CONNECT with a
    # will, so "auto" would spend its 10 s connect timeout first.)
    deadline = time.monotonic() + 30
    while not all(a.stats.get("connected") for a in agents.values()):
        if time.monotonic() > deadline:
            raise SystemExit(f"agents not connected to {args['broker']} within 30 s")
        time.sleep(0.05)
    calls = {"bare": lambda: session.run(None, feed)}
    for variant, agent in agents.items():
        calls[variant] = (lambda a: lambda: a.predict(feed))(agent)
    assert agents["agent"].slot.loaded.score_in_graph
    assert not agents["agent_numpy"].slot.loaded.score_in_graph
    names = list(calls)
    times = {n: [] for n in names}
    for n in names:  # warm-up
        for _ in range(200):
            calls[n]()
    clock = time.perf_counter_ns
    for b in range(args["blocks"]):
        for n in names[b % len(names):] + names[: b % len(names)]:
            call, out = calls[n], times[n]
            for _ in range(args["block"]):
                t0 = clock()
                call()
                out.append(clock() - t0)

    def p50(values):
        values = sorted(values)
        return values[len(values) // 2] / 1000

    def hot(fn, n=2000):
        for _ in range(200):
            fn()
        ts = []
        for _ in range(n):
            t0 = clock()
            fn()
            ts.append(clock() - t0)
        return p50(ts)

    graph, numpy_ = agents["agent"].slot.loaded, agents["agent_numpy"].slot.loaded
    checked = graph.check(feed)
    names_out = [o.name for o in session.get_outputs()]
    outs = numpy_.run(checked)
    stages = {
        "input_check_us": hot(lambda: graph.check(feed)),
        "bare_run_us": hot(lambda: session.run(None, feed)),
        # what the agent calls: ORT's core, without the Python wrapper's name check
        "bare_core_run_us": hot(lambda: session._sess.run(names_out, feed, None)),
        "run_with_score_us": hot(lambda: graph.run(checked)),
        "numpy_score_us": hot(lambda: numpy_.detector.score(checked, outs)),
        "telemetry_record_us": hot(
            lambda: agents["agent"].slot.aggregator.record(2e-5, 3, 1.0, False)
        ),
    }
    time.sleep(1.2)  # let a telemetry window go out, so the check below means something
    acked = {}
    for variant, agent in agents.items():
        acked[variant] = agent.stats.get("mqtt", {}).get("acked", 0)
        agent.close()
    print(json.dumps({"p50_us": {n: p50(v) for n, v in times.items()},
                      "p90_us": {n: sorted(v)[len(v) * 9 // 10] / 1000 for n, v in times.items()},
                      "calls": {n: len(v) for n, v in times.items()},
                      "stages": stages, "telemetry_acked": acked}))
    """
)

BARE = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    import onnxruntime as ort
    model, threads, runs, sample = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    feed = {"image": np.load(sample)}
    call = lambda: session.run(None, feed)
    """
)

AGENT = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from device_agent import Agent, AgentConfig
    bundle, threads, runs, sample, broker, state = sys.argv[1:7]
    threads, runs = int(threads), int(runs)
    config = AgentConfig(device_id="bench", fleet="overhead", broker_url=broker, window_s=1.0,
                         threads=threads, state_dir=state, mqtt_protocol="3.1.1")
    agent = Agent.from_bundle(bundle, config).start()
    deadline = time.monotonic() + 30
    while not agent.stats.get("connected") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.stats.get("connected"), "the agent did not connect to " + broker
    feed = {"image": np.load(sample)}
    call = lambda: agent.predict(feed)
    """
)

MEMORY = textwrap.dedent(
    """
    for _ in range(runs):
        call()
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    result = {"rss_mb": status("VmRSS"), "hwm_mb": status("VmHWM"),
              "modules": sorted(m for m in ("torch", "sdk", "onnx", "sklearn") if m in sys.modules)}
    if "agent" in globals():
        agent.close()
    print(json.dumps(result))
    """
)


def build_bundles(work: Path) -> tuple[dict[str, dict[str, Path]], Path]:
    """Train, export and int8-quantize each digits CNN; bundle it three ways.

    Returns ``{model: {"plain": int8 .onnx, "agent": bundle, "agent_numpy": ...,
    "agent_nodet": ...}}`` and the sample file (one real test digit).
    """
    import numpy as np
    import torch

    import sdk
    from sdk.detect import default_detector, fit_detector
    from sdk.zoo.digits import build_digits_cnn, load_digits_splits, train_digits_cnn

    torch.set_num_threads(1)
    data = load_digits_splits()
    sample = work / "sample.npy"
    np.save(sample, data.x_test[:1])
    out: dict[str, dict[str, Path]] = {}
    for name, (width, hidden, epochs) in MODELS.items():
        paths = {
            "plain": work / f"{name}.onnx",
            "agent": work / name,
            "agent_numpy": work / f"{name}-numpy",
            "agent_nodet": work / f"{name}-nodet",
        }
        out[name] = paths
        if all((paths[v] / "manifest.json").is_file() for v in VARIANTS[1:]):
            continue
        print(f"building {name} ...", flush=True)
        net = build_digits_cnn(width, hidden)
        model, acc = train_digits_cnn(data, model=net, epochs=epochs)
        fp32 = sdk.export(
            model,
            (torch.from_numpy(data.x_cal[:4]),),
            to="onnx",
            path=work / f"{name}.fp32.onnx",
            input_names=["image"],
            output_names=["logits"],
        )
        int8 = sdk.quantize(fp32, {"image": data.x_cal}, out=paths["plain"])
        print(f"  fp32 accuracy {acc:.2%}", flush=True)
        choice = default_detector(int8.io)
        assert choice is not None
        detector = fit_detector(
            choice.kind,
            {"image": data.x_cal},
            int8,
            options=choice.options,
            out=work / f"{name}.det.npz",
        )
        labels = [str(i) for i in range(10)]
        sdk.package(int8, paths["agent"], name=name, labels=labels, detector=detector)
        sdk.package(
            int8,
            paths["agent_numpy"],
            name=name,
            labels=labels,
            detector=detector,
            detector_in_graph=False,
        )
        sdk.package(int8, paths["agent_nodet"], name=name, labels=labels)
    return out, sample


def run_one(code: str, args: list[str]) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    if proc.returncode != 0:
        raise SystemExit(f"benchmark process failed:\n{proc.stderr[-3000:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def plot(results: dict[str, Any], path: Path) -> None:
    """Bars of p50 per call per variant and model, with the agent's added microseconds."""
    try:
        import matplotlib
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install -e '.[dev]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["models"])
    labels = {
        "bare": "bare session.run",
        "agent": "Agent.predict, score in graph",
        "agent_numpy": "Agent.predict, numpy score",
        "agent_nodet": "Agent.predict, no detector",
    }
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.8))
    for ax, name in zip(axes, names, strict=True):
        m = results["models"][name]
        values = [m["p50_us"][v] for v in VARIANTS]
        ax.bar(range(len(VARIANTS)), values, color=["#777", "#1f77b4", "#ff7f0e", "#2ca02c"])
        for x, v in enumerate(values[1:], start=1):
            ax.annotate(
                f"+{v - values[0]:.1f} us\n{v / values[0]:.2f}x",
                (x, v),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        ax.set_xticks(
            range(len(VARIANTS)), [labels[v] for v in VARIANTS], rotation=30, ha="right", fontsize=7
        )
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("p50 per call (us)")
        ax.set_ylim(0, max(values) * 1.25)
    fig.suptitle(f"agent overhead, {results['threads']} thread(s), this host", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=30, help="rounds of blocks (default 30)")
    parser.add_argument("--block", type=int, default=200, help="calls per block (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="memory rounds (default 3)")
    parser.add_argument("--runs", type=int, default=3000, help="calls before reading RSS")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=ROOT / ".cache" / "agent-overhead")
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "results" / "agent_overhead.json"
    )
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from sdk.broker import EmbeddedBroker

    bundles, sample = build_bundles(args.workdir)
    results: dict[str, Any] = {
        "threads": args.threads,
        "blocks": args.blocks,
        "block": args.block,
        "models": {},
    }
    with EmbeddedBroker() as broker, tempfile.TemporaryDirectory() as state:
        for name, paths in bundles.items():
            print(f"timing {name} ...", flush=True)
            spec = {
                "threads": args.threads,
                "plain": str(paths["plain"]),
                "bundles": {v: str(paths[v]) for v in VARIANTS[1:]},
                "sample": str(sample),
                "broker": broker.url,
                "state": f"{state}/{name}",
                "blocks": args.blocks,
                "block": args.block,
            }
            side = run_one(SIDE_BY_SIDE, [json.dumps(spec)])
            p50 = side["p50_us"]
            results["models"][name] = {
                **side,
                "ratio": {v: p50[v] / p50["bare"] for v in VARIANTS[1:]},
                "added_us": {v: p50[v] - p50["bare"] for v in VARIANTS[1:]},
            }
        digits = bundles["digits-int8"]
        bare_runs, agent_runs = [], []
        for r in range(args.rounds):
            common = [str(args.threads), str(args.runs), str(sample)]
            bare_runs.append(run_one(BARE + MEMORY, [str(digits["plain"]), *common]))
            agent_runs.append(
                run_one(
                    AGENT + MEMORY,
                    [str(digits["agent"]), *common, broker.url, f"{state}/memory{r}"],
                )
            )
        bare_rss = statistics.median(b["rss_mb"] for b in bare_runs)
        agent_rss = statistics.median(a["rss_mb"] for a in agent_runs)
        results["memory"] = {
            "model": "digits-int8",
            "bare_rss_mb": bare_rss,
            "agent_rss_mb": agent_rss,
            "rss_added_mb": agent_rss - bare_rss,
            "heavy_modules_in_agent": agent_runs[0]["modules"],
            "rounds": {"bare": bare_runs, "agent": agent_runs},
        }
    print(
        f"\nthreads={args.threads}; {args.blocks} rounds of {args.block}-call blocks per "
        "variant, interleaved in one process; p50 per call in us (ratio to bare, added us)"
    )
    print(
        f"{'model':<18}{'bare':>8}{'agent (graph score)':>28}{'agent (numpy score)':>28}"
        f"{'agent (no detector)':>28}"
    )
    for name, m in results["models"].items():
        cells = "".join(
            f"{m['p50_us'][v]:>9.1f} ({m['ratio'][v]:.2f}x, {m['added_us'][v]:+6.1f})"
            for v in VARIANTS[1:]
        )
        print(f"{name:<18}{m['p50_us']['bare']:>8.1f}{cells}")
    print("\nper stage, isolated hot loops (p50 us):")
    stage_names = list(next(iter(results["models"].values()))["stages"])
    print(f"{'model':<18}" + "".join(f"{k.removesuffix('_us'):>20}" for k in stage_names))
    for name, m in results["models"].items():
        print(f"{name:<18}" + "".join(f"{m['stages'][k]:>20.2f}" for k in stage_names))
    mem = results["memory"]
    print(
        f"\nRSS, digits-int8, median of {args.rounds} fresh processes each: bare "
        f"{mem['bare_rss_mb']:.1f} MB, agent {mem['agent_rss_mb']:.1f} MB "
        f"(+{mem['rss_added_mb']:.1f} MB); heavy modules in the agent: "
        f"{mem['heavy_modules_in_agent'] or 'none'}"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten {args.json}")
    plot(results, args.json.with_suffix(".png"))
    digits = results["models"]["digits-int8"]
    acked = {
        f"{name}/{v}": n
        for name, m in results["models"].items()
        for v, n in m["telemetry_acked"].items()
    }
    print(
        "telemetry windows acknowledged by the broker while timing: "
        + ", ".join(f"{k} {n}" for k, n in acked.items())
    )
    if not all(acked.values()):
        print("telemetry was not flowing for every agent: the figures above do not count")
        return 1
    ratio_ok = digits["ratio"]["agent"] <= 1.15
    rss_ok = mem["rss_added_mb"] <= 25
    print(
        f"targets on digits-int8: p50 ratio {digits['ratio']['agent']:.2f} (<= 1.15: "
        f"{'met' if ratio_ok else 'NOT met'}), +RSS {mem['rss_added_mb']:.1f} MB (<= 25: "
        f"{'met' if rss_ok else 'NOT met'})"
    )
    return 0 if ratio_ok and rss_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
