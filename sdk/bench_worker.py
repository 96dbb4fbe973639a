"""The benchmark worker: loads one model in a fresh process and times it.

Run as ``python -m sdk.bench_worker REQUEST.json`` by :func:`sdk.bench.benchmark`. It owns
everything that happens inside the measured process: CPU pinning, the runtime-only memory
baseline, session creation, warm-up, the timed loop around ``ModelSession.run`` (the code the
board's agent runs), and reading peak memory and host facts.

It imports only the standard library, numpy, ``device_agent.runtime`` and the model's runtime,
never torch or the rest of ``sdk``, so its memory figures are what the board's agent would pay.
Numpy and the runtime are imported after pinning, so their thread pools start on the pinned CPUs.

Protocol: the request is a JSON file (see ``sdk.bench._write_request``); the worker writes
JSON lines on its original stdout: ``{"event": "progress", ...}`` while running, then one
``{"event": "result", ...}`` or ``{"event": "error", "kind": ..., "message": ...}``. Anything
native libraries print to stdout is redirected to stderr so it cannot corrupt the protocol.
The raw latencies (int64 nanoseconds) go to the ``.npy`` file the request names.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import IO, Any

__all__ = ["main", "p95_ci_relative"]

PROTOCOL_VERSION = 1
_PROGRESS_EVERY_NS = 250_000_000
_CI_CHECK_EVERY_NS = 100_000_000  # how often a ci_stop request looks at the runs so far

Emit = Callable[[dict[str, Any]], None]


def main(argv: list[str] | None = None) -> int:
    proto = _protocol_stream()

    def emit(message: dict[str, Any]) -> None:
        proto.write(json.dumps(message) + "\n")
        proto.flush()

    args = sys.argv[1:] if argv is None else argv
    try:
        if len(args) != 1:
            raise ValueError("usage: python -m sdk.bench_worker REQUEST.json")
        with open(args[0], encoding="utf-8") as fh:
            request = json.load(fh)
        if request.get("protocol") != PROTOCOL_VERSION:
            raise ValueError(
                f"request protocol {request.get('protocol')!r}, worker speaks {PROTOCOL_VERSION}"
            )
        result = run(request, emit)
    except BaseException as exc:  # the parent gets one line, never a traceback
        emit({"event": "error", "kind": type(exc).__name__, "message": _one_line(exc)})
        return 1
    emit({"event": "result", **result})
    return 0


def run(request: dict[str, Any], emit: Emit) -> dict[str, Any]:
    """Pin, measure the baseline, load, warm up and time the model described by ``request``."""
    host = host_facts()
    affinity = _pin(request.get("affinity"))

    import numpy as np

    from device_agent.runtime import check_feed, open_session

    runtime = str(request["runtime"])
    _import_runtime(runtime)
    with np.load(request["inputs"]) as npz:
        raw_inputs = {name: npz[f"arr_{i}"] for i, name in enumerate(request["input_names"])}

    baseline_rss = _current_rss()
    hwm_before = _peak_rss()
    hwm_reset = _reset_peak_rss()

    progress = bool(request.get("progress"))
    if progress:
        emit({"event": "progress", "phase": "loading"})
    threads = int(request["threads"])
    t0 = time.perf_counter_ns()
    session = open_session(request["model"], runtime=runtime, threads=threads)
    init_ns = time.perf_counter_ns() - t0
    rss_after_init = _current_rss()
    feed = check_feed(session.io, raw_inputs)

    run_once = session.run
    pc = time.perf_counter_ns
    t0 = pc()
    run_once(feed)
    first_ns = pc() - t0

    if progress:
        emit({"event": "progress", "phase": "warm-up"})
    warmup_ns: list[int] = []
    for _ in range(int(request["warmup_runs"])):
        t0 = pc()
        run_once(feed)
        warmup_ns.append(pc() - t0)

    latencies, duration_ns, stopped_by_ci = _timed_runs(run_once, feed, request, emit)

    np.save(request["latencies_out"], np.asarray(latencies, dtype=np.int64))
    hwm_after = _peak_rss()
    peak_rss = max(v for v in (hwm_before, hwm_after, baseline_rss) if v is not None)
    # After a successful reset the high-water mark covers only load + inference.
    peak_since_baseline = hwm_after if hwm_reset else peak_rss
    task_cpus, os_threads = _thread_affinity()
    return {
        "protocol": PROTOCOL_VERSION,
        "runtime": session.runtime,
        "runtime_version": session.runtime_version,
        "threads": threads,
        "affinity": affinity,
        "affinity_observed": task_cpus,
        "os_threads": os_threads,
        "host": host,
        "input_shapes": {k: list(v.shape) for k, v in feed.items()},
        "init_ns": init_ns,
        "first_ns": first_ns,
        "warmup_ns": warmup_ns,
        "runs": len(latencies),
        "duration_ns": duration_ns,
        "stopped_by_ci": stopped_by_ci,
        "baseline_rss_bytes": baseline_rss,
        "rss_after_init_bytes": rss_after_init,
        "peak_rss_bytes": peak_rss,
        "peak_since_baseline_bytes": peak_since_baseline,
        "peak_reset": hwm_reset,
        "modules": sorted(sys.modules),
    }


def _timed_runs(
    run_once: Callable[[Any], Any], feed: Any, request: dict[str, Any], emit: Emit
) -> tuple[list[int], int, bool]:
    """The timed loop: at least ``min_runs`` runs, until ``min_seconds`` have passed or the p95's
    confidence interval is within ``ci_stop``. Returns each run's ns, the loop's ns and whether
    the interval stopped it."""
    progress = bool(request.get("progress"))
    pc = time.perf_counter_ns
    min_runs = int(request["min_runs"])
    min_ns = int(float(request["min_seconds"]) * 1e9)
    ci_stop = request.get("ci_stop")
    latencies: list[int] = []
    record = latencies.append
    next_report = 0
    next_check = 0
    stopped_by_ci = False
    start = pc()
    while True:
        t0 = pc()
        run_once(feed)
        t1 = pc()
        record(t1 - t0)
        if len(latencies) >= min_runs:
            if t1 - start >= min_ns:
                break
            if ci_stop is not None and t1 >= next_check:
                next_check = t1 + _CI_CHECK_EVERY_NS
                if p95_ci_relative(latencies) <= float(ci_stop):
                    stopped_by_ci = True
                    break
        if progress and t1 >= next_report:
            next_report = t1 + _PROGRESS_EVERY_NS
            emit(
                {
                    "event": "progress",
                    "phase": "timed",
                    "runs": len(latencies),
                    "elapsed_s": (t1 - start) / 1e9,
                }
            )
    duration_ns = pc() - start
    return latencies, duration_ns, stopped_by_ci


def p95_ci_relative(latencies: list[int]) -> float:
    """Half the width of the 95% confidence interval of the p95 of ``latencies``, over the p95.

    Distribution-free: the interval's ends are the order statistics at ranks
    ``n q -+ 1.96 sqrt(n q (1 - q))`` (the binomial's normal approximation, q = 0.95).
    """
    import numpy as np  # imported after pinning (module docstring)

    n = len(latencies)
    if n < 20:
        return math.inf
    ordered = np.sort(np.asarray(latencies, dtype=np.int64))
    q = 0.95
    spread = 1.96 * math.sqrt(n * q * (1 - q))
    lo = max(0, math.floor(n * q - spread) - 1)
    hi = min(n - 1, math.ceil(n * q + spread) - 1)
    p95 = float(ordered[min(n - 1, max(0, math.ceil(n * q) - 1))])
    if p95 <= 0:
        return math.inf
    return float(ordered[hi] - ordered[lo]) / 2 / p95


def _protocol_stream() -> IO[str]:
    """A private copy of stdout for the protocol; fd 1 then points at stderr."""
    sys.stdout.flush()
    proto = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


def _pin(cpus: list[int] | None) -> list[int] | None:
    """Restrict this process to ``cpus``; return the CPUs it may run on afterwards."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    if cpus:
        try:
            os.sched_setaffinity(0, cpus)
        except OSError as exc:
            raise OSError(f"cannot pin the benchmark to CPUs {cpus}: {exc.strerror}") from exc
    return sorted(os.sched_getaffinity(0))


def _import_runtime(runtime: str) -> None:
    """Import the runtime now, so the baseline includes it and the model's cost does not."""
    from device_agent.runtime import litert_interpreter_class

    if runtime == "onnxruntime":
        import onnxruntime  # noqa: F401
    elif runtime == "litert":
        litert_interpreter_class()


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _current_rss() -> int | None:
    return _status_kb("VmRSS")


def _peak_rss() -> int | None:
    """Peak RSS in bytes: VmHWM, else getrusage (kB on Linux, bytes on macOS)."""
    hwm = _status_kb("VmHWM")
    if hwm is not None:
        return hwm
    try:
        import resource
    except ImportError:
        return None
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak excludes import transients."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _thread_affinity() -> tuple[list[int] | None, int | None]:
    """The union of CPUs any thread of this process may use (the runtime's pools included)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None, None
    cpus: set[int] = set()
    for tid in tasks:
        try:
            with open(f"/proc/self/task/{tid}/status", encoding="ascii") as fh:
                for line in fh:
                    if line.startswith("Cpus_allowed_list:"):
                        cpus |= _parse_cpu_list(line.split(":", 1)[1])
        except OSError:
            continue  # the thread ended while we looked
    return sorted(cpus), len(tasks)


def _parse_cpu_list(text: str) -> set[int]:
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def host_facts() -> dict[str, Any]:
    """Architecture, CPU model and core counts of the machine this process runs on."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {
        "arch": platform.machine(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "cores_usable": usable,
        "system": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
    }


def _cpu_model() -> str:
    """``model name`` on x86; on ARM boards, which have none, the board ``Model`` line."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                key = key.strip()
                if sep and key in ("model name", "Model", "Hardware") and key not in found:
                    found[key] = value.strip()
    except OSError:
        pass
    for key in ("model name", "Model", "Hardware"):
        if found.get(key):
            return found[key]
    return platform.processor() or platform.machine() or "unknown CPU"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, KeyError):
        text = f"request lacks {text}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else type(exc).__name__)[:500]


if __name__ == "__main__":
    sys.exit(main())
