"""Timing a candidate model on the device without disturbing the application the agent serves.

The agent never opens a candidate in its own process: :func:`time_candidate` starts a child
Python process (this module's :func:`main`, with the agent's ``sys.path``) that lowers its own CPU
priority (``os.nice``), opens the candidate with the runtime thread count it is given (default
1), times it with :func:`device_agent.benchmark.time_runs` on generated inputs and prints its
report as one JSON line. The child's memory is its own (its peak RSS is the candidate's figure,
not the agent's), and a runtime that crashes (a segfault, an abort, the kernel's OOM killer)
ends the child, not the agent: the command is answered ``ok: false`` saying so. The whole of it,
the child's start and the model's load included, is bounded by the benchmark's
``max_seconds``; the child is killed :data:`GRACE_S` after that, or at once when the agent's
stop event is set, and ends itself when the agent is gone. A child that cannot be started (no
``sys.executable``, or a program the kernel refuses: an emulated Python without binfmt_misc)
is the same kind of answer, ``ok: false`` saying why.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from device_agent.contracts.bundle import IOSpec, TensorSpec
from device_agent.contracts.commands import SHUTTING_DOWN, BenchmarkArgs
from device_agent.errors import EdgeshipError

__all__ = ["GRACE_S", "NICE", "time_candidate"]

# How much lower the child's CPU priority is than the agent's (os.nice increment): the
# application's calls win every contended core.
NICE = 10
# After max_seconds the child has this long to report before it is killed.
GRACE_S = 10.0
_RUNTIMES = {"onnx": "onnxruntime", "tflite": "litert"}
_TAIL = 600  # characters of the child's stderr quoted in an error
_BOOT = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[2]); "
    "from device_agent.candidate_bench import main; sys.exit(main(sys.argv))"
)


def _spec_inputs(inputs: Sequence[TensorSpec]) -> list[dict[str, Any]]:
    return [
        {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "sample_shape": t.sample_shape}
        for t in inputs
    ]


def time_candidate(
    path: Path,
    fmt: str,
    args: BenchmarkArgs,
    bundle_io: IOSpec,
    *,
    stop: threading.Event,
) -> dict[str, Any]:
    """Time the candidate model file ``path`` (``fmt`` ``onnx`` or ``tflite``) in a child
    process (see the module's docstring) and return its report: the fields of a ``benchmark``
    report, with ``baseline_rss_mb`` (the child with its runtime loaded, before the model),
    ``peak_rss_mb`` (the child's peak), ``rss_increase_mb``, ``threads``, ``nice`` and
    ``inputs_from`` (``args``: ``args.inputs``; ``bundle``: the bundle's input spec, when the
    candidate takes such inputs; ``candidate``: the candidate's own, symbolic dimensions 1).

    EdgeshipError when the candidate cannot be loaded or run, its runtime crashes, it runs past
    ``max_seconds`` or the agent is stopping."""
    started = time.monotonic()
    spec = {
        "path": str(path),
        "runtime": _RUNTIMES[fmt],
        "threads": args.threads or 1,
        "nice": NICE,
        "min_runs": args.min_runs,
        "min_seconds": args.min_seconds,
        "warmup_runs": args.warmup_runs,
        "deadline": started + args.max_seconds,  # CLOCK_MONOTONIC: the same in the child
        "max_seconds": args.max_seconds,
        "inputs": None
        if args.inputs is None
        else [{"name": i.name, "shape": list(i.shape), "dtype": i.dtype} for i in args.inputs],
        "bundle_inputs": _spec_inputs(bundle_io.inputs),
    }
    threads = str(args.threads or 1)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}
    # Isolated (-I: no current folder, no PYTHON* variables) with the agent's own sys.path: the
    # child imports exactly the modules the agent would, and nothing from the folder it runs in.
    sys_path = json.dumps([p for p in sys.path if p])
    proc = _start([sys.executable, "-I", "-c", _BOOT, json.dumps(spec), sys_path], env)
    kill_at = started + args.max_seconds + GRACE_S
    why = None
    while True:
        try:
            out, err = proc.communicate(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            if stop.is_set():
                why = SHUTTING_DOWN
            elif time.monotonic() > kill_at:
                why = f"it ran past max_seconds ({args.max_seconds:g} s) and was killed"
            else:
                continue
            proc.kill()
            out, err = proc.communicate()
            break
    if why is not None:
        raise EdgeshipError(f"benchmark of the candidate stopped: {why}")
    return _parse_result(proc.returncode, out, err)


def _start(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Start the child (``cmd[0]`` is the agent's own ``sys.executable``); EdgeshipError, saying
    why, when it cannot be started."""
    if not cmd[0]:
        raise EdgeshipError(
            "the agent's Python does not know its own program (sys.executable is empty), so it "
            "cannot start the process that times candidates; the application is not affected"
        )
    try:
        return subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,  # a signal to the agent's group does not reach it
        )
    except OSError as exc:
        hint = (
            ": the kernel does not run this kind of program by itself (an emulated Python, "
            "e.g. qemu-user without binfmt_misc for its architecture)"
            if exc.errno == errno.ENOEXEC
            else ""
        )
        raise EdgeshipError(
            f"the process that times candidates could not be started ({cmd[0]}: "
            f"{exc.strerror or exc}){hint}; the application is not affected"
        ) from None


def _parse_result(code: int, out: bytes, err: bytes) -> dict[str, Any]:
    tail = err.decode("utf-8", "replace").strip()[-_TAIL:]
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        raise EdgeshipError(
            f"the candidate's runtime crashed ({name}) in its own process; the agent and its "
            f"application were not affected{': ' + tail if tail else ''}"
        )
    lines = out.decode("utf-8", "replace").strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        raise EdgeshipError(
            f"the candidate's benchmark process exited with {code} without a report"
            f"{': ' + tail if tail else ''}"
        ) from None
    if not isinstance(result, dict) or not result.get("ok"):
        error = result.get("error") if isinstance(result, dict) else None
        raise EdgeshipError(f"the candidate cannot be timed: {error or 'no reason given'}")
    report = result.get("report")
    if not isinstance(report, dict):
        raise EdgeshipError("the candidate's benchmark process sent no report")
    return report


# --- the child process ----------------------------------------------------------------------


def _tensor_specs(items: Sequence[dict[str, Any]]) -> tuple[TensorSpec, ...]:
    return tuple(
        TensorSpec(i["name"], i["dtype"], tuple(i["shape"]), sample_shape=_sample_shape(i))
        for i in items
    )


def _sample_shape(item: dict[str, Any]) -> tuple[int, ...] | None:
    sample = item.get("sample_shape")
    return None if sample is None else tuple(sample)


def _sample(inputs: tuple[TensorSpec, ...]) -> dict[str, Any]:
    from device_agent.benchmark import sample_inputs

    return sample_inputs(IOSpec(inputs=inputs, outputs=()))


def _watchdog(deadline: float) -> None:
    """End the child when its agent is gone (killed: no one would read its report) or
    :data:`GRACE_S` after its deadline, whatever it is doing (a load that never returns)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent and time.monotonic() < deadline + GRACE_S:
            time.sleep(0.5)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """Open, time and report the candidate (in the child process)."""
    _watchdog(float(spec["deadline"]))
    os.nice(int(spec["nice"]))
    from device_agent.benchmark import bench_report, rss_mb, time_runs
    from device_agent.runtime import check_feed, litert_interpreter_class, open_session

    if spec["runtime"] == "onnxruntime":
        import onnxruntime  # noqa: F401 - the runtime in memory before the baseline
    else:
        litert_interpreter_class()
    baseline = rss_mb("VmRSS")
    path = Path(spec["path"])
    session = open_session(path, runtime=spec["runtime"], threads=int(spec["threads"]))
    if spec["inputs"] is not None:
        feed = check_feed(session.io, _sample(_tensor_specs(spec["inputs"])))
        source = "args"
    else:
        try:  # the application's inputs, when the candidate takes them
            feed = check_feed(session.io, _sample(_tensor_specs(spec["bundle_inputs"])))
            source = "bundle"
        except EdgeshipError:
            feed = check_feed(session.io, _sample(session.io.inputs))
            source = "candidate"
    left = float(spec["deadline"]) - time.monotonic()
    if left <= 0:
        raise EdgeshipError(
            f"loading the candidate took all of max_seconds ({spec['max_seconds']:g} s)"
        )
    timing = time_runs(
        lambda: session.run(feed),
        warmup_runs=int(spec["warmup_runs"]),
        min_runs=int(spec["min_runs"]),
        min_seconds=min(float(spec["min_seconds"]), left),
        max_seconds=left,
    )
    report = bench_report(
        timing,
        feed,
        session,
        max_seconds=float(spec["max_seconds"]),
        inputs_generated=True,
        model_path=path,
    )
    peak = report["peak_rss_mb"]
    report.update(
        baseline_rss_mb=baseline,
        rss_increase_mb=None if peak is None or baseline is None else max(0.0, peak - baseline),
        threads=int(spec["threads"]),
        nice=os.nice(0),
        pid=os.getpid(),
        inputs_from=source,
    )
    return report


def main(argv: Sequence[str]) -> int:
    """The child: one JSON line on stdout, ``{"ok": true, "report": ...}`` or ``{"ok": false,
    "error": ...}``."""
    try:
        result: dict[str, Any] = {"ok": True, "report": _child(json.loads(argv[1]))}
        code = 0
    except Exception as exc:  # MemoryError included: a refusal, with its reason
        from device_agent.slot import describe_failure

        result, code = {"ok": False, "error": describe_failure(exc)}, 1
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
