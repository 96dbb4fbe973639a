"""Timing a model session: the loop both the host benchmark and the board's agent use.

``edgeship bench`` runs :func:`time_runs` in an isolated worker process on the workstation;
the agent runs it on the real board when a ``benchmark`` command arrives
(:func:`run_benchmark`), and both report the same fields, so a host figure and a board
figure can be set side by side.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.contracts.bundle import IOSpec
from device_agent.errors import ConfigError
from device_agent.runtime import ModelSession, check_feed

__all__ = ["Timing", "latency_summary_ms", "run_benchmark", "sample_inputs", "time_runs"]

Progress = Callable[[int, float], None]


@dataclass(frozen=True)
class Timing:
    """Raw timings in nanoseconds: the first run, the warm-up runs, then the timed runs."""

    first_ns: int
    warmup_ns: list[int]
    latencies_ns: list[int]
    duration_ns: int


def time_runs(
    run_once: Callable[[], object],
    *,
    warmup_runs: int,
    min_runs: int,
    min_seconds: float,
    progress: Progress | None = None,
    progress_every_s: float = 0.25,
) -> Timing:
    """Call ``run_once`` once, ``warmup_runs`` times, then until both ``min_runs`` calls and
    ``min_seconds`` have passed, timing each call alone with ``perf_counter_ns``."""
    if min_runs < 1 or min_seconds < 0 or warmup_runs < 0:
        raise ConfigError("min_runs must be >= 1, min_seconds and warmup_runs >= 0")
    pc = time.perf_counter_ns
    t0 = pc()
    run_once()
    first = pc() - t0
    warmup: list[int] = []
    for _ in range(warmup_runs):
        t0 = pc()
        run_once()
        warmup.append(pc() - t0)
    min_ns = int(min_seconds * 1e9)
    every_ns = int(progress_every_s * 1e9)
    latencies: list[int] = []
    record = latencies.append
    next_report = 0
    start = pc()
    while True:
        t0 = pc()
        run_once()
        t1 = pc()
        record(t1 - t0)
        if len(latencies) >= min_runs and t1 - start >= min_ns:
            break
        if progress is not None and t1 >= next_report:
            next_report = t1 + every_ns
            progress(len(latencies), (t1 - start) / 1e9)
    return Timing(first, warmup, latencies, pc() - start)


def latency_summary_ms(latencies_ns: Any) -> dict[str, float]:
    """p50, p90, p95, p99, min, max, mean and std in milliseconds."""
    lat = np.asarray(latencies_ns, dtype=np.float64) / 1e6
    if lat.size == 0:
        raise ConfigError("no timed runs to summarise")
    p50, p90, p95, p99 = (float(v) for v in np.percentile(lat, [50, 90, 95, 99]))
    return {
        "p50": p50,
        "p90": p90,
        "p95": p95,
        "p99": p99,
        "min": float(lat.min()),
        "max": float(lat.max()),
        "mean": float(lat.mean()),
        "std": float(lat.std()),
    }


def sample_inputs(io: IOSpec, *, batch: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs of the right names, dtypes and shapes; symbolic dims become ``batch`` (first
    axis) or 1. Floats are uniform in [0, 1), integers 0 or 1 (valid token ids and masks)."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for spec in io.inputs:
        shape = tuple(
            (batch if i == 0 else 1) if isinstance(d, str) else d for i, d in enumerate(spec.shape)
        )
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feed[spec.name] = rng.random(shape, dtype=np.float32).astype(dtype)
        elif dtype.kind == "b":
            feed[spec.name] = np.ones(shape, dtype=dtype)
        else:
            feed[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feed


def _rss_mb(field: str) -> float | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        return None
    return None


def _board_model() -> str:
    for path in ("/proc/device-tree/model", "/sys/firmware/devicetree/base/model"):
        try:
            return Path(path).read_text(errors="replace").strip("\x00\n ")
        except OSError:
            continue
    return platform.processor() or platform.machine()


def run_benchmark(
    session: ModelSession,
    io: IOSpec,
    *,
    min_runs: int = 200,
    min_seconds: float = 3.0,
    warmup_runs: int = 10,
    inputs: Mapping[str, np.ndarray] | None = None,
    lock: threading.Lock | None = None,
    model_path: Path | None = None,
) -> dict[str, Any]:
    """Benchmark an already-loaded session where it runs (on the board, for the agent).

    The result uses the key names of ``edgeship bench``'s JSON report, with ``measured_on``
    saying it was measured on this device. Memory is the agent process's, which also holds
    the agent itself, so there is no runtime-only baseline here.
    """
    if min_runs > 100_000 or min_seconds > 600:
        raise ConfigError("a remote benchmark is limited to 100000 runs and 600 s")
    feed = check_feed(io, inputs if inputs is not None else sample_inputs(io))
    guard = lock if lock is not None else nullcontext()

    def once() -> object:
        with guard:
            return session.run(feed)

    timing = time_runs(once, warmup_runs=warmup_runs, min_runs=min_runs, min_seconds=min_seconds)
    latency = latency_summary_ms(timing.latencies_ns)
    total_s = sum(timing.latencies_ns) / 1e9
    batch = int(next(iter(feed.values())).shape[0]) if feed else 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_s = len(timing.latencies_ns) / total_s if total_s > 0 else float("inf")
    return {
        "schema": "edgeship.bench/1",
        "model": None if model_path is None else str(model_path),
        "size_bytes": None if model_path is None else model_path.stat().st_size,
        "runtime": session.runtime,
        "runtime_version": session.runtime_version,
        "measured_on": f"device: {platform.machine()} {_board_model()}, {cores} cores",
        "host": {"arch": platform.machine(), "cpu": _board_model(), "cores": cores},
        "batch_size": batch,
        "input_shapes": {k: list(v.shape) for k, v in feed.items()},
        "inputs_generated": inputs is None,
        "first_inference_ms": timing.first_ns / 1e6,
        "warmup_runs": warmup_runs,
        "warmup_mean_ms": (sum(timing.warmup_ns) / len(timing.warmup_ns) / 1e6)
        if timing.warmup_ns
        else None,
        "runs": len(timing.latencies_ns),
        "duration_s": timing.duration_ns / 1e9,
        "latency_ms": latency,
        "inferences_per_s": per_s,
        "samples_per_s": per_s * batch,
        "peak_rss_mb": _rss_mb("VmHWM"),
        "rss_mb": _rss_mb("VmRSS"),
    }
