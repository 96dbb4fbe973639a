"""Benchmarking: latency, throughput and memory of one model under a target profile.

This module owns the benchmark's configuration, the worker process's lifecycle and the
report; the generated inputs (below) are :mod:`sdk.bench_inputs`'s. Each model runs in its own
fresh process (:mod:`sdk.bench_worker`), pinned to the target's thread count and CPUs, so one
model's memory and thread pools cannot affect another's figures and the process's RSS belongs
to that model and its runtime alone. The worker times ``device_agent.runtime``'s sessions, the
code the board runs.

Latencies are measured on the machine running the benchmark and labelled as such
(``measured_on``); a profile's ``latency_scale`` gives a separate, labelled estimate for the
board. A missed budget is a result: the report carries one :class:`~sdk.budget.BudgetLine`
per limit. Only bad input (a missing or unreadable model, a bad config, inputs that do not
fit) or a failed worker raises.

Generated inputs: a float input gets standard-normal values, an integer input values in
``[0, 100)`` (valid token ids for any vocabulary), a bool input random bools. A symbolic
dimension is resolved, in order, from ``BenchConfig.shapes`` (a full shape per input name;
its symbolic names then hold for every input that shares them), as ``batch_size`` when it is
the first axis, as 128 when its name has a sequence-like word (``seq``, ``sequence``,
``seq_len``, ``length``, ``tokens``, ``time``, ...); any other, including an axis the
exporter left unnamed, raises :class:`ConfigError` asking for ``shapes``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

import numpy as np

from device_agent.benchmark import latency_summary_ms
from device_agent.runtime import check_feed
from sdk.artifact import ModelArtifact, read_artifact
from sdk.bench_inputs import make_inputs
from sdk.budget import Budget, BudgetLine, check_budget
from sdk.errors import BenchmarkError, ConfigError, ModelFormatError
from sdk.targets import TargetProfile, get_target

__all__ = ["BenchConfig", "BenchReport", "benchmark", "make_inputs"]

REPORT_SCHEMA = "edgeship.bench/1"
_MIB = 2**20


@dataclass(frozen=True)
class BenchConfig:
    """How to benchmark a model.

    ``target`` (a profile or its name) fixes the CPUs the worker is pinned to (the board's
    core count, capped at this host's) and the default ``threads``. Timed runs continue until
    both ``min_runs`` and ``min_seconds`` are reached, after ``warmup_runs`` untimed ones.
    ``batch_size`` and ``shapes`` (input name -> concrete shape) only shape generated inputs.
    ``timeout_s`` bounds the whole worker process; ``seed`` makes generated inputs repeatable.
    ``ci_stop`` (a fraction, e.g. 0.02) ends the timed runs early, once ``min_runs`` are done,
    when the 95% confidence interval of the p95 (from order statistics) is within
    ``ci_stop`` of it on either side: more runs would not move it; the report says so in
    ``stopped_by_ci``. None (default): always run until ``min_seconds``.
    """

    target: str | TargetProfile = "host"
    min_runs: int = 200
    min_seconds: float = 3.0
    warmup_runs: int = 10
    threads: int | None = None
    batch_size: int = 1
    shapes: Mapping[str, tuple[int, ...]] | None = None
    timeout_s: float = 600.0
    seed: int = 0
    ci_stop: float | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.min_runs >= 1, f"min_runs must be at least 1, got {self.min_runs}"),
            (self.min_seconds >= 0, f"min_seconds must be >= 0, got {self.min_seconds}"),
            (self.warmup_runs >= 0, f"warmup_runs must be >= 0, got {self.warmup_runs}"),
            (
                self.threads is None or self.threads >= 1,
                f"threads must be at least 1, got {self.threads}",
            ),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.timeout_s > 0, f"timeout_s must be positive, got {self.timeout_s}"),
            (
                self.ci_stop is None or 0 < self.ci_stop < 1,
                f"ci_stop must be a fraction between 0 and 1, got {self.ci_stop}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        for name, shape in (self.shapes or {}).items():
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise ConfigError(f"shapes[{name!r}] must be non-negative integers, got {shape}")

    def profile(self) -> TargetProfile:
        return self.target if isinstance(self.target, TargetProfile) else get_target(self.target)


@dataclass(frozen=True)
class BenchReport:
    """What one benchmark measured, on this host, for one model.

    ``latency_ms`` maps ``p50``, ``p90``, ``p95``, ``p99``, ``min``, ``max``, ``mean`` and
    ``std`` (population) over the timed runs; each is the time of one ``session.run`` call.
    ``inferences_per_s`` is ``runs`` divided by the summed run times, ``samples_per_s`` that
    times ``batch_size`` (the first axis of the first input). Memory: ``baseline_rss_mb`` is
    the worker's RSS with numpy, the runtime and the inputs loaded but no model;
    ``peak_rss_mb`` the process's peak (VmHWM); ``rss_increase_mb`` the peak since the
    baseline minus the baseline, the model's own cost, which the budget's ``rss`` line
    checks; ``init_rss_increase_mb`` the RSS right after session creation minus the baseline.
    MB means MiB.
    """

    model: str
    model_format: str
    precision: str
    size_bytes: int
    runtime: str
    runtime_version: str
    target: str
    threads: int
    affinity: tuple[int, ...] | None
    affinity_observed: tuple[int, ...] | None
    host: Mapping[str, Any]
    batch_size: int
    input_shapes: Mapping[str, tuple[int, ...]]
    inputs_generated: bool
    init_ms: float
    first_inference_ms: float
    warmup_runs: int
    warmup_mean_ms: float | None
    runs: int
    duration_s: float
    latency_ms: Mapping[str, float]
    inferences_per_s: float
    samples_per_s: float
    baseline_rss_mb: float | None
    init_rss_increase_mb: float | None
    peak_rss_mb: float | None
    rss_increase_mb: float | None
    latency_scale: float | None = None
    estimated_board_latency_ms: Mapping[str, float] | None = None
    budget: Budget | None = None
    budget_lines: tuple[BudgetLine, ...] = ()
    latencies_ms: tuple[float, ...] = field(default=(), repr=False, compare=False)
    stopped_by_ci: bool = False

    @property
    def size_mb(self) -> float:
        return self.size_bytes / _MIB

    @property
    def measured_on(self) -> str:
        """``"host: x86_64 AMD EPYC, 2 cores"``: where the latencies were measured."""
        h = self.host
        return f"host: {h.get('arch', '?')} {h.get('cpu', '?')}, {h.get('cores', '?')} cores"

    @property
    def meets_budget(self) -> bool | None:
        """Whether every budget line passed; None when no budget was given."""
        if self.budget is None:
            return None
        return all(line.passed for line in self.budget_lines)

    def budget_metrics(self) -> dict[str, float | None]:
        """The figures :func:`~sdk.budget.check_budget` compares: host latencies, the peak RSS
        increase over the runtime-only baseline, and the file size, in ms and MiB."""
        metrics: dict[str, float | None] = {
            f"{k}_ms": self.latency_ms[k] for k in ("p50", "p90", "p95", "p99")
        }
        metrics["peak_rss_mb"] = self.rss_increase_mb
        metrics["size_mb"] = self.size_mb
        return metrics

    def to_dict(self, *, include_latencies: bool = False) -> dict[str, Any]:
        """A JSON-serialisable dict: every field, plus ``schema``, ``measured_on``,
        ``size_mb``, ``meets_budget`` and, with a latency scale, ``estimate_note``."""
        out: dict[str, Any] = {
            "schema": REPORT_SCHEMA,
            "model": self.model,
            "model_format": self.model_format,
            "precision": self.precision,
            "size_bytes": self.size_bytes,
            "size_mb": self.size_mb,
            "runtime": self.runtime,
            "runtime_version": self.runtime_version,
            "target": self.target,
            "threads": self.threads,
            "affinity": None if self.affinity is None else list(self.affinity),
            "affinity_observed": (
                None if self.affinity_observed is None else list(self.affinity_observed)
            ),
            "measured_on": self.measured_on,
            "host": dict(self.host),
            "batch_size": self.batch_size,
            "input_shapes": {k: list(v) for k, v in self.input_shapes.items()},
            "inputs_generated": self.inputs_generated,
            "init_ms": self.init_ms,
            "first_inference_ms": self.first_inference_ms,
            "warmup_runs": self.warmup_runs,
            "warmup_mean_ms": self.warmup_mean_ms,
            "runs": self.runs,
            "duration_s": self.duration_s,
            "stopped_by_ci": self.stopped_by_ci,
            "latency_ms": dict(self.latency_ms),
            "inferences_per_s": self.inferences_per_s,
            "samples_per_s": self.samples_per_s,
            "baseline_rss_mb": self.baseline_rss_mb,
            "init_rss_increase_mb": self.init_rss_increase_mb,
            "peak_rss_mb": self.peak_rss_mb,
            "rss_increase_mb": self.rss_increase_mb,
            "latency_scale": self.latency_scale,
            "estimated_board_latency_ms": (
                None
                if self.estimated_board_latency_ms is None
                else dict(self.estimated_board_latency_ms)
            ),
            "budget": None if self.budget is None else self.budget.to_dict(),
            "budget_lines": [line.to_dict() for line in self.budget_lines],
            "meets_budget": self.meets_budget,
        }
        if self.latency_scale is not None:
            out["estimate_note"] = (
                f"estimated_board_latency_ms is an estimate: host latency x {self.latency_scale:g}"
                f" (the profile's latency_scale), not a measurement on {self.target}"
            )
        if include_latencies:
            out["latencies_ms"] = list(self.latencies_ms)
        return out

    def summary(self) -> str:
        lat = self.latency_ms
        name = Path(self.model).name
        affinity = "any CPU" if self.affinity is None else f"CPUs {list(self.affinity)}"
        lines = [
            f"{name} ({self.runtime} {self.runtime_version}, {self.precision}, "
            f"{self.size_mb:.3g} MiB) for target {self.target}: {self.threads} threads on "
            f"{affinity}",
            f"measured on {self.measured_on} (not on the board)",
            f"  init {self.init_ms:.3g} ms, first inference {self.first_inference_ms:.3g} ms"
            + (
                ""
                if self.warmup_mean_ms is None
                else f", warm-up mean {self.warmup_mean_ms:.3g} ms ({self.warmup_runs} runs)"
            ),
            f"  latency (ms) over {self.runs} runs ({self.duration_s:.3g} s): "
            + "  ".join(f"{k} {lat[k]:.4g}" for k in ("p50", "p90", "p95", "p99", "min", "max"))
            + f"  mean {lat['mean']:.4g} ± {lat['std']:.2g} ms",
            f"  throughput {self.inferences_per_s:.4g} inferences/s, "
            f"{self.samples_per_s:.4g} samples/s (batch {self.batch_size})",
            f"  memory: baseline {_fmt_mb(self.baseline_rss_mb)} (runtime, no model), peak "
            f"{_fmt_mb(self.peak_rss_mb)}, model's peak increase {_fmt_mb(self.rss_increase_mb)}",
        ]
        if self.estimated_board_latency_ms is not None:
            est = self.estimated_board_latency_ms
            lines.append(
                f"  ESTIMATE for {self.target} (host x {self.latency_scale:g}, not measured): "
                + "  ".join(f"{k} {v:.4g}" for k, v in est.items())
                + " ms"
            )
        if self.budget is not None:
            verdict = "met" if self.meets_budget else "NOT met"
            lines.append(f"  budget {self.budget.describe()}: {verdict} (latency measured on host)")
            lines.extend(f"    {line.describe()}" for line in self.budget_lines)
        return "\n".join(lines)


def benchmark(
    model: ModelArtifact | str | Path,
    config: BenchConfig = BenchConfig(),
    *,
    inputs: Mapping[str, np.ndarray] | None = None,
    budget: Budget | None = None,
    progress: bool = False,
) -> BenchReport:
    """Benchmark ``model`` (an artifact, or an ``.onnx``/``.tflite`` path) in its own process.

    The worker is pinned to ``config``'s target: ``threads`` runtime threads (default: the
    board's cores, capped at this host's) on the target's CPUs. ``inputs`` (name -> array)
    replaces generated inputs (see the module docstring for how those are made).

    With ``budget``, ``report.budget_lines`` holds one verdict per limit: latency lines
    compare the host-measured percentiles, the ``rss`` line the model's peak RSS increase
    over the runtime-only baseline (not the whole process, whose runtime share does not
    depend on the model), the ``size`` line the file size in MiB. A missed budget is a
    result. Raises :class:`ModelFormatError` for a missing or unreadable model file,
    :class:`ConfigError` or :class:`InputError` for a bad config or inputs, and
    :class:`BenchmarkError` (one line, from the worker) when the worker fails or times out.
    """
    artifact = _resolve(model)
    profile = config.profile()
    threads = config.threads if config.threads is not None else profile.threads_on_host()
    affinity = profile.affinity_on_host() or None
    if inputs is None:
        feed = make_inputs(
            artifact.io, batch_size=config.batch_size, shapes=config.shapes, seed=config.seed
        )
    else:
        feed = check_feed(artifact.io, inputs)

    with tempfile.TemporaryDirectory(prefix="edgeship-bench-") as tmp:
        work = Path(tmp)
        request_path = _write_request(work, artifact, feed, config, threads, affinity, progress)
        result = _launch_worker(
            request_path,
            timeout_s=config.timeout_s,
            progress=progress,
            label=artifact.path.name,
            config=config,
        )
        latencies_ns = np.load(work / "latencies.npy")

    report = _report(artifact, profile, feed, result, latencies_ns, config, inputs is None)
    if budget is not None:
        lines = tuple(check_budget(budget, report.budget_metrics()))
        report = replace(report, budget=budget, budget_lines=lines)
    return report


def _write_request(
    work: Path,
    artifact: ModelArtifact,
    feed: Mapping[str, np.ndarray],
    config: BenchConfig,
    threads: int,
    affinity: list[int] | None,
    progress: bool,
) -> Path:
    from sdk.bench_worker import PROTOCOL_VERSION

    names = list(feed)
    # Positional keys: input names may hold characters a zip member name cannot.
    np.savez(work / "inputs.npz", *[feed[n] for n in names])
    request = {
        "protocol": PROTOCOL_VERSION,
        "model": str(artifact.path.resolve()),
        "runtime": artifact.runtime,
        "threads": threads,
        "affinity": affinity,
        "inputs": str(work / "inputs.npz"),
        "input_names": names,
        "warmup_runs": config.warmup_runs,
        "min_runs": config.min_runs,
        "min_seconds": config.min_seconds,
        "ci_stop": config.ci_stop,
        "progress": progress,
        "latencies_out": str(work / "latencies.npy"),
    }
    path = work / "request.json"
    path.write_text(json.dumps(request), encoding="utf-8")
    return path


def _worker_env() -> dict[str, str]:
    """This environment, with the directories holding ``sdk`` and ``device_agent`` importable
    (they may be a source checkout rather than an installed package)."""
    import device_agent

    roots = {
        str(Path(__file__).resolve().parent.parent),
        str(Path(device_agent.__file__).resolve().parent.parent),
    }
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = os.pathsep.join([*sorted(roots), *([old] if old else [])])
    return env


def _launch_worker(
    request_path: Path,
    *,
    timeout_s: float,
    progress: bool,
    label: str,
    config: BenchConfig | None = None,
) -> dict[str, Any]:
    """Run the worker on ``request_path`` and return its result message (raw dict)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sdk.bench_worker", str(request_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_worker_env(),
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    assert proc.stdout is not None and proc.stderr is not None  # both are PIPEs
    stderr_tail: deque[str] = deque(maxlen=40)
    drain = threading.Thread(target=_drain, args=(proc.stderr, stderr_tail), daemon=True)
    drain.start()
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout_s, kill)
    timer.daemon = True
    timer.start()
    bar = _ProgressBar(label, config) if progress else None
    final: dict[str, Any] | None = None
    try:
        for line in proc.stdout:
            message = _parse(line)
            if message is None:
                continue
            event = message.get("event")
            if event == "progress" and bar is not None:
                bar.update(message)
            elif event in ("result", "error"):
                final = message
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        drain.join(timeout=5)
        if bar is not None:
            bar.close()
    if final is not None and final.get("event") == "result" and code == 0:
        return final
    if timed_out.is_set():
        raise BenchmarkError(
            f"benchmark of {label} timed out after {timeout_s:g} s; raise "
            "BenchConfig.timeout_s or lower min_runs/min_seconds"
        )
    if final is not None and final.get("event") == "error":
        raise BenchmarkError(f"benchmark of {label} failed: {final.get('message', '?')}")
    raise BenchmarkError(
        f"benchmark worker for {label} {_exit_reason(code)}{_last_line(stderr_tail)}"
    )


def _drain(stream: IO[str], tail: deque[str]) -> None:
    for line in stream:
        if line.strip():
            tail.append(line.rstrip())


def _parse(line: str) -> dict[str, Any] | None:
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) else None


def _exit_reason(code: int) -> str:
    if code < 0:
        import signal

        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory?)" if name == "SIGKILL" else ""
        return f"was killed by {name}{hint}"
    if code == 0:
        return "exited without a result"
    return f"exited with code {code}"


def _last_line(tail: deque[str]) -> str:
    return f": {tail[-1].strip()[:300]}" if tail else ""


class _ProgressBar:
    """A tqdm bar on stderr: the fraction of min_runs and min_seconds the timed loop has done."""

    def __init__(self, label: str, config: BenchConfig | None) -> None:
        from tqdm import tqdm

        self._config = config
        self._bar = tqdm(
            total=100,
            desc=f"bench {label}",
            unit="%",
            file=sys.stderr,
            leave=False,
            bar_format="{desc}: {percentage:3.0f}%|{bar}|{postfix}",
        )

    def update(self, message: Mapping[str, Any]) -> None:
        phase = str(message.get("phase", ""))
        runs = int(message.get("runs", 0))
        elapsed = float(message.get("elapsed_s", 0.0))
        if phase == "timed" and self._config is not None:
            done = min(
                runs / self._config.min_runs,
                elapsed / self._config.min_seconds if self._config.min_seconds else 1.0,
            )
            self._bar.n = min(100, int(done * 100))
            self._bar.set_postfix_str(f"{runs} runs, {elapsed:.1f} s", refresh=False)
        else:
            self._bar.set_postfix_str(phase, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


def _report(
    artifact: ModelArtifact,
    profile: TargetProfile,
    feed: Mapping[str, np.ndarray],
    result: Mapping[str, Any],
    latencies_ns: np.ndarray,
    config: BenchConfig,
    generated: bool,
) -> BenchReport:
    lat = latencies_ns.astype(np.float64) / 1e6
    if lat.size == 0:
        raise BenchmarkError(f"benchmark of {artifact.path.name} recorded no runs")
    # The same summary the board's agent reports for a remote benchmark.
    latency = latency_summary_ms(latencies_ns)
    first = next(iter(feed.values()))
    batch = int(first.shape[0]) if first.ndim else 1
    total_s = float(lat.sum()) / 1e3
    per_s = lat.size / total_s if total_s > 0 else math.inf
    warm = [w / 1e6 for w in result["warmup_ns"]]
    baseline = _mb(result.get("baseline_rss_bytes"))
    after_init = _mb(result.get("rss_after_init_bytes"))
    since = _mb(result.get("peak_since_baseline_bytes"))
    scale = profile.latency_scale
    return BenchReport(
        model=str(artifact.path),
        model_format=artifact.format,
        precision=artifact.precision,
        size_bytes=artifact.size_bytes,
        runtime=str(result["runtime"]),
        runtime_version=str(result["runtime_version"]),
        target=profile.name,
        threads=int(result["threads"]),
        affinity=_tuple_or_none(result.get("affinity")),
        affinity_observed=_tuple_or_none(result.get("affinity_observed")),
        host=dict(result["host"]),
        batch_size=batch,
        input_shapes={k: tuple(v.shape) for k, v in feed.items()},
        inputs_generated=generated,
        init_ms=result["init_ns"] / 1e6,
        first_inference_ms=result["first_ns"] / 1e6,
        warmup_runs=len(warm),
        warmup_mean_ms=sum(warm) / len(warm) if warm else None,
        runs=int(lat.size),
        duration_s=result["duration_ns"] / 1e9,
        latency_ms=latency,
        inferences_per_s=per_s,
        samples_per_s=per_s * batch,
        baseline_rss_mb=baseline,
        init_rss_increase_mb=None
        if baseline is None or after_init is None
        else after_init - baseline,
        peak_rss_mb=_mb(result.get("peak_rss_bytes")),
        rss_increase_mb=None if baseline is None or since is None else max(0.0, since - baseline),
        latency_scale=scale,
        estimated_board_latency_ms=None
        if scale is None
        else {k: latency[k] * scale for k in ("p50", "p90", "p95", "p99", "mean")},
        latencies_ms=tuple(float(v) for v in lat),
        stopped_by_ci=bool(result.get("stopped_by_ci", False)),
    )


def _mb(value: Any) -> float | None:
    return None if value is None else float(value) / _MIB


def _fmt_mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} MiB"


def _tuple_or_none(value: Any) -> tuple[int, ...] | None:
    return None if value is None else tuple(int(v) for v in value)


def _resolve(model: ModelArtifact | str | Path) -> ModelArtifact:
    if isinstance(model, ModelArtifact):
        if not model.path.is_file():
            raise ModelFormatError(f"model file not found: {model.path}")
        if model.format == "torchscript":
            raise ModelFormatError(
                f"{model.path.name}: TorchScript files cannot be benchmarked; "
                "export the model to ONNX or TFLite"
            )
        return model
    return read_artifact(model)
