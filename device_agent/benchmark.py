"""Timing a model session: the loop both the host benchmark and the board's agent use.

``edgeship bench`` runs :func:`time_runs` in an isolated worker process on the workstation;
the agent runs it on the real board when a ``benchmark`` command arrives
(:func:`run_benchmark`), and both report the same fields, so a host figure and a board
figure can be set side by side.
"""

from __future__ import annotations

import math
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
from device_agent.contracts.commands import (
    MAX_RUNS,
    MAX_SECONDS,
    MAX_WARMUP_RUNS,
    SHUTTING_DOWN,
    BenchmarkArgs,
)
from device_agent.errors import ConfigError, EdgeshipError
from device_agent.runtime import ModelSession, check_feed

__all__ = [
    "MAX_RUNS",
    "MAX_SECONDS",
    "MAX_WARMUP_RUNS",
    "BenchmarkArgs",
    "Timing",
    "bench_report",
    "latency_summary_ms",
    "rss_mb",
    "run_benchmark",
    "sample_inputs",
    "time_runs",
]

Progress = Callable[[int, float], None]


@dataclass(frozen=True)
class Timing:
    """Raw timings in nanoseconds: the first run, the warm-up runs, then the timed runs.
    ``capped``: ``max_seconds`` ran out before the warm-up or the minimum runs were done.
    ``stopped``: ``stop`` said so before they were done."""

    first_ns: int
    warmup_ns: list[int]
    latencies_ns: list[int]
    duration_ns: int
    capped: bool = False
    stopped: bool = False


def time_runs(
    run_once: Callable[[], object],
    *,
    warmup_runs: int,
    min_runs: int,
    min_seconds: float,
    progress: Progress | None = None,
    progress_every_s: float = 0.25,
    max_seconds: float | None = None,
    stop: Callable[[], bool] | None = None,
) -> Timing:
    """Call ``run_once`` once, ``warmup_runs`` times, then until both ``min_runs`` calls and
    ``min_seconds`` have passed, timing each call alone with ``perf_counter_ns``.

    ``max_seconds`` bounds the wall time of all of it: once it has passed, the warm-up and the
    timed runs stop (after at least one timed run), and :attr:`Timing.capped` is set. ``stop``
    is asked before each run after the first: once it returns true the runs end the same way
    and :attr:`Timing.stopped` is set (the agent is shutting down).
    """
    if isinstance(min_runs, bool) or not isinstance(min_runs, int) or min_runs < 1:
        raise ConfigError(f"min_runs must be an integer >= 1, got {min_runs!r}")
    if isinstance(warmup_runs, bool) or not isinstance(warmup_runs, int) or warmup_runs < 0:
        raise ConfigError(f"warmup_runs must be an integer >= 0, got {warmup_runs!r}")
    if not math.isfinite(min_seconds) or min_seconds < 0:
        raise ConfigError(f"min_seconds must be a finite number >= 0, got {min_seconds!r}")
    if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):
        raise ConfigError(f"max_seconds must be a finite number > 0, got {max_seconds!r}")
    pc = time.perf_counter_ns
    t0 = begin = pc()
    end = None if max_seconds is None else begin + int(max_seconds * 1e9)
    capped = stopped = False
    run_once()
    first = pc() - t0
    warmup: list[int] = []
    for _ in range(warmup_runs):
        if end is not None and pc() >= end:
            capped = True
            break
        if stop is not None and stop():
            stopped = True
            break
        t0 = pc()
        run_once()
        warmup.append(pc() - t0)
    min_ns = int(min_seconds * 1e9)
    every_ns = int(progress_every_s * 1e9)
    latencies: list[int] = []
    record = latencies.append
    next_report = 0
    start = pc()
    while not stopped:
        t0 = pc()
        run_once()
        t1 = pc()
        record(t1 - t0)
        if len(latencies) >= min_runs and t1 - start >= min_ns:
            break
        if end is not None and t1 >= end:
            capped = True
            break
        if stop is not None and stop():
            stopped = True
            break
        if progress is not None and t1 >= next_report:
            next_report = t1 + every_ns
            progress(len(latencies), (t1 - start) / 1e9)
    return Timing(first, warmup, latencies, pc() - start, capped, stopped)


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
    axis), else the input's ``sample_shape`` from the manifest when it has one (a detector
    whose height and width are free cannot run at 1x1), else 1. Floats are uniform in [0, 1),
    integers 0 or 1 (valid token ids and masks)."""
    rng = np.random.default_rng(seed)
    feed: dict[str, np.ndarray] = {}
    for spec in io.inputs:
        sample = spec.sample_shape or tuple(1 for _ in spec.shape)
        shape = tuple(
            (batch if i == 0 else s) if isinstance(d, str) else d
            for i, (d, s) in enumerate(zip(spec.shape, sample, strict=True))
        )
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feed[spec.name] = rng.random(shape, dtype=np.float32).astype(dtype)
        elif dtype.kind == "b":
            feed[spec.name] = np.ones(shape, dtype=dtype)
        else:
            feed[spec.name] = rng.integers(0, 2, size=shape).astype(dtype)
    return feed


def rss_mb(field: str) -> float | None:
    """This process's ``VmRSS`` or ``VmHWM`` (peak) in MiB, from ``/proc/self/status``."""
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
    max_seconds: float = MAX_SECONDS,
    inputs: Mapping[str, np.ndarray] | None = None,
    lock: threading.Lock | None = None,
    model_path: Path | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Benchmark an already-loaded session where it runs (on the board, for the agent).

    The arguments are checked as :class:`BenchmarkArgs` checks a command's (ConfigError naming
    the argument and its range). The result uses the key names of ``edgeship bench``'s JSON
    report, with ``measured_on`` saying it was measured on this device, and ``capped`` true when
    ``max_seconds`` stopped it before ``warmup_runs``, ``min_runs`` or ``min_seconds`` were
    reached. Memory is the agent process's, which also holds the agent itself, so there is no
    runtime-only baseline here.

    ``stop`` (the agent's stop event) ends it between two runs: EdgeshipError, so the command
    is answered at once and a process being stopped does not wait for, or abort in the middle
    of, a benchmark that may last :data:`MAX_SECONDS`.
    """
    checked = BenchmarkArgs.parse(
        {
            "min_runs": min_runs,
            "min_seconds": min_seconds,
            "warmup_runs": warmup_runs,
            "max_seconds": max_seconds,
        }
    )
    feed = check_feed(io, inputs if inputs is not None else sample_inputs(io))
    guard = lock if lock is not None else nullcontext()

    def once() -> object:
        with guard:
            return session.run(feed)

    timing = time_runs(
        once,
        warmup_runs=checked.warmup_runs,
        min_runs=checked.min_runs,
        min_seconds=checked.min_seconds,
        max_seconds=checked.max_seconds,
        stop=None if stop is None else stop.is_set,
    )
    if timing.stopped:
        raise EdgeshipError(
            f"benchmark stopped after {len(timing.latencies_ns)} timed run(s): {SHUTTING_DOWN}"
        )
    return bench_report(
        timing,
        feed,
        session,
        max_seconds=checked.max_seconds,
        inputs_generated=inputs is None,
        model_path=model_path,
    )


def bench_report(
    timing: Timing,
    feed: Mapping[str, np.ndarray],
    session: ModelSession,
    *,
    max_seconds: float,
    inputs_generated: bool,
    model_path: Path | None,
) -> dict[str, Any]:
    """The benchmark report of ``timing`` (the key names of ``edgeship bench``'s JSON report),
    measured on this machine, with this process's memory."""
    latency = latency_summary_ms(timing.latencies_ns)
    # At least the clock's 1 ns: a reply cannot carry inf (it must be valid JSON).
    total_s = max(1, sum(timing.latencies_ns)) / 1e9
    batch = int(next(iter(feed.values())).shape[0]) if feed else 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_s = len(timing.latencies_ns) / total_s
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
        "inputs_generated": inputs_generated,
        "first_inference_ms": timing.first_ns / 1e6,
        "warmup_runs": len(timing.warmup_ns),
        "warmup_mean_ms": (sum(timing.warmup_ns) / len(timing.warmup_ns) / 1e6)
        if timing.warmup_ns
        else None,
        "runs": len(timing.latencies_ns),
        "duration_s": timing.duration_ns / 1e9,
        "max_seconds": max_seconds,
        "capped": timing.capped,
        "latency_ms": latency,
        "inferences_per_s": per_s,
        "samples_per_s": per_s * batch,
        "peak_rss_mb": rss_mb("VmHWM"),
        "rss_mb": rss_mb("VmRSS"),
    }
