"""The agent's ``benchmark`` command: the running model timed in place, or a candidate the
host sent (:mod:`device_agent.candidates`) timed in a child process
(:mod:`device_agent.candidate_bench`) while the application's calls are watched.

:class:`~device_agent.agent.Agent` registers :func:`run_benchmark_command` as its
``benchmark`` handler; the timing modules are imported when a benchmark runs, not when the
agent starts.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from device_agent._version import __version__ as AGENT_VERSION
from device_agent.agent_config import AgentConfig
from device_agent.candidates import CandidateStore
from device_agent.contracts import messages as msg
from device_agent.contracts.commands import BenchmarkArgs
from device_agent.errors import ConfigError
from device_agent.slot import CallWatch, ModelSlot
from device_agent.sysinfo import SysInfo

__all__ = ["run_benchmark_command"]


def run_benchmark_command(
    command: msg.Command,
    *,
    slot: ModelSlot,
    candidates: CandidateStore,
    sysinfo: SysInfo,
    config: AgentConfig,
    stop: threading.Event,
) -> dict[str, Any]:
    """Answer ``benchmark``: time candidate ``args.candidate`` when it names one, else the
    model in ``slot`` (under its run lock). ``stop`` ends a timing when the agent closes."""
    from device_agent.benchmark import run_benchmark

    if not isinstance(command.args, Mapping):
        raise ConfigError("benchmark: args must be an object")
    args = BenchmarkArgs.parse(command.args)
    if args.candidate is not None:
        return _benchmark_candidate(args, slot, candidates, sysinfo, config, stop)
    loaded = slot.loaded
    return run_benchmark(
        loaded.session,
        loaded.io,
        min_runs=args.min_runs,
        min_seconds=args.min_seconds,
        warmup_runs=args.warmup_runs,
        max_seconds=args.max_seconds,
        lock=loaded.run_lock,
        model_path=loaded.bundle.model_path,
        stop=stop,
    )


def _benchmark_candidate(
    args: BenchmarkArgs,
    slot: ModelSlot,
    candidates: CandidateStore,
    sysinfo: SysInfo,
    config: AgentConfig,
    stop: threading.Event,
) -> dict[str, Any]:
    """Time candidate ``args.candidate`` in a child process
    (:mod:`device_agent.candidate_bench`) while the application's calls are watched."""
    from device_agent.candidate_bench import time_candidate

    assert args.candidate is not None
    candidate = candidates.ready(args.candidate)
    loaded = slot.loaded
    watch = slot.watch = CallWatch()
    try:
        report = time_candidate(candidate.path, candidate.format, args, loaded.io, stop=stop)
    finally:
        slot.watch = None
    facts = sysinfo.host_facts()
    device = {
        "device": config.device_id,
        "board": facts["model"],
        "cpu": sysinfo.cpu_name(),
        "arch": facts["arch"],
        "cores": facts["cores"],
        "mem_total_bytes": facts["mem_total_bytes"],
        "os": facts["os"],
        "agent_version": AGENT_VERSION,
    }
    report.update(
        candidate=candidate.id,
        format=candidate.format,
        sha256=candidate.sha256,
        model=None,  # the file's path on the device says nothing to the sender
        measured_on=f"device {config.device_id}: {facts['model'] or 'unknown board'}"
        f", {device['cpu'] or 'unknown CPU'}, {facts['arch']}, {facts['cores']} cores",
        host={"arch": facts["arch"], "cpu": device["cpu"], "cores": facts["cores"]},
        device=device,
        application=watch.summary(),
    )
    return report
