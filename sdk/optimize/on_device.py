"""Optimize against the board you own: every candidate timed on real devices over MQTT.

``edgeship optimize MODEL ... --device pi-07 --device pi-08 --broker mqtt://hub:1883`` (and
``OptimizeConfig(on_device=OnDevice(...))``) sends each candidate that passed the quality gate
to the named devices, where the agent times it in a child process of its own, at low CPU
priority, beside the application it keeps serving (docs/agent.md, "Timing candidates"). The
choice then uses the board's p50/p95 and peak RSS; host figures stay in the report, and are
the first filter: a candidate whose host p95 is more than :attr:`OnDevice.hopeless_ratio`
times fp32's is not sent (the report says so).

Devices are grouped by board model (their retained ``status``: ``host.model``, else CPU and
architecture): each group times every candidate once, the work split between its devices (one
candidate per device at a time), and each group gets its own choice. A device that stops
answering mid-search is dropped and its candidate goes to another device of the group; when
none is left, the report says what was not measured.
"""

from __future__ import annotations

import itertools
import math
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from device_agent.contracts.commands import SHUTTING_DOWN, Action
from device_agent.errors import ConfigError, EdgeshipError
from sdk.bench import BenchReport
from sdk.fleet_watch import FleetWatch
from sdk.remote import RemoteError, send_command
from sdk.remote_bench import CandidateRefused

__all__ = [
    "DeviceBenchReport",
    "DeviceRun",
    "Job",
    "OnDevice",
    "board_slug",
    "boards_of",
    "clean_up",
    "inline_for_device",
    "probe",
    "time_on_devices",
]


@dataclass(frozen=True)
class OnDevice:
    """Where and how to time candidates on real devices (``optimize --device``)."""

    broker_url: str
    devices: tuple[str, ...]
    fleet: str = "default"
    key: str | Path | None = None  # signs candidates for devices with trusted keys
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    min_runs: int = 100
    min_seconds: float = 2.0
    threads: int = 1
    hopeless_ratio: float = 3.0
    timeout_s: float | None = None
    settle_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.devices:
            raise ConfigError("--device: name at least one device")
        if len(set(self.devices)) != len(self.devices):
            raise ConfigError("--device: a device is named twice")
        if not (self.hopeless_ratio > 1 and math.isfinite(self.hopeless_ratio)):
            raise ConfigError("hopeless_ratio must be a finite number above 1")

    def auth(self) -> dict[str, Any]:
        return {"username": self.username, "password": self.password, "ca_file": self.ca_file}


@dataclass(frozen=True)
class DeviceBenchReport(BenchReport):
    """A candidate timed on a device: the fields of a host :class:`BenchReport` where the
    device measured them (latency, runtime, memory of the process that ran it alone), plus
    which device, its board and what the application it serves saw meanwhile."""

    device: str = ""
    board: str = ""
    agent_version: str | None = None
    application: Mapping[str, Any] | None = None
    transfer: Mapping[str, Any] | None = None

    @property
    def measured_on(self) -> str:
        h = self.host
        cpu = h.get("cpu") or "?"
        agent = f", agent {self.agent_version}" if self.agent_version else ""
        return (
            f"device {self.device}: {self.board} ({h.get('arch', '?')} {cpu}, "
            f"{h.get('cores', '?')} cores; {self.runtime} {self.runtime_version}{agent})"
        )

    def to_dict(self, *, include_latencies: bool = False) -> dict[str, Any]:
        out = super().to_dict(include_latencies=include_latencies)
        out.update(
            device=self.device,
            board=self.board,
            agent_version=self.agent_version,
            application=None if self.application is None else dict(self.application),
            transfer=None if self.transfer is None else dict(self.transfer),
        )
        return out


@dataclass(frozen=True)
class Job:
    """One candidate to time: its name in the search, its file, the host's report and the
    shapes of its sample inputs (name -> ``{shape, dtype}``)."""

    name: str
    path: Path
    host: BenchReport
    inputs: Mapping[str, Any] | None = None


@dataclass
class DeviceRun:
    """What the devices measured: per board, per candidate, a report or why there is none;
    which device timed what; the devices lost on the way."""

    boards: dict[str, list[str]]
    reports: dict[str, dict[str, DeviceBenchReport]] = field(default_factory=dict)
    missing: dict[str, dict[str, str]] = field(default_factory=dict)
    timed_by: dict[str, list[str]] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)

    def application(self) -> dict[str, dict[str, Any]]:
        """Per device, what the application it serves saw while candidates were timed there:
        calls, failed calls, and the worst p95 and max latency of those timings (ms)."""
        out: dict[str, dict[str, Any]] = {}
        for reports in self.reports.values():
            for report in reports.values():
                app = report.application or {}
                seen = out.setdefault(
                    report.device, {"calls": 0, "failed": 0, "p95_ms": None, "max_ms": None}
                )
                for key in ("calls", "failed"):
                    value = app.get(key)
                    if isinstance(value, int) and not isinstance(value, bool):
                        seen[key] += value
                lat = app.get("latency_ms")
                if isinstance(lat, Mapping):
                    for key, name in (("p95", "p95_ms"), ("max", "max_ms")):
                        value = lat.get(key)
                        if isinstance(value, int | float) and _finite(value):
                            seen[name] = max(seen[name] or 0.0, float(value))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "application": self.application(),
            "boards": {b: list(d) for b, d in self.boards.items()},
            "timed_by": {d: list(names) for d, names in self.timed_by.items()},
            "counts": {d: len(names) for d, names in self.timed_by.items()},
            "missing": {b: dict(m) for b, m in self.missing.items()},
            "lost": dict(self.lost),
        }


def board_slug(board: str) -> str:
    """``Raspberry Pi 4 Model B Rev 1.1`` -> ``raspberry-pi-4-model-b-rev-1-1`` (a folder
    name for that board's bundle)."""
    return re.sub(r"[^a-z0-9]+", "-", board.lower()).strip("-")[:60] or "board"


def _board_of(host: Mapping[str, Any]) -> str:
    """The board model a device's status names; without one (a PC, an Arm board without a
    device-tree model), its architecture, CPU and core count, so unlike machines are never
    timed as one board."""
    model = host.get("model")
    if isinstance(model, str) and model.strip():
        return model.strip()
    cpu = host.get("cpu") or "unknown CPU"
    return f"{host.get('arch') or '?'} {cpu} ({host.get('cores') or '?'} cores)"


def boards_of(target: OnDevice) -> dict[str, list[str]]:
    """The target's devices grouped by board model, from their retained status; ConfigError
    naming a device that is not online."""
    watch = FleetWatch(target.broker_url, target.fleet, **target.auth())
    try:
        online, _ = watch.online(target.settle_s)
        statuses = dict(watch.statuses)
    finally:
        watch.close()
    boards: dict[str, list[str]] = {}
    for device in target.devices:
        if device not in online:
            known = ", ".join(online[:8]) or "none"
            raise ConfigError(
                f"--device {device}: not online in fleet {target.fleet!r} (no retained status "
                f"saying so on the broker; online: {known})"
            )
        boards.setdefault(_board_of(statuses[device].host), []).append(device)
    return boards


def _finite(value: Any) -> bool:
    """A real, finite number (an int too large for a float is not: JSON allows 10**400)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def device_report(
    host: BenchReport, rep: Mapping[str, Any], device: str, board: str
) -> DeviceBenchReport:
    """The device's answer as a report the search can choose from; EdgeshipError when it
    lacks finite latencies (what a device sends is not trusted)."""
    lat = rep.get("latency_ms")
    keys = ("p50", "p90", "p95", "p99", "max")
    if not isinstance(lat, Mapping) or not all(_finite(lat.get(k)) for k in keys):
        raise EdgeshipError(f"device {device} answered without finite p50/p90/p95/p99 latencies")
    ordered = [float(lat[k]) for k in keys]
    if ordered[0] < 0 or any(a > b for a, b in itertools.pairwise(ordered)):
        raise EdgeshipError(
            f"device {device} answered latencies that cannot be (negative, or percentiles "
            f"out of order: {dict(zip(keys, ordered, strict=True))})"
        )
    runs_given = rep.get("runs")
    if not (isinstance(runs_given, int) and not isinstance(runs_given, bool) and runs_given >= 1):
        raise EdgeshipError(f"device {device} answered without the number of timed runs")

    def num(key: str) -> float | None:
        value = rep.get(key)
        if isinstance(value, int | float) and _finite(value) and value >= 0:
            return float(value)
        return None

    given = rep.get("device")
    facts: Mapping[str, Any] = given if isinstance(given, Mapping) else {}
    base = {f.name: getattr(host, f.name) for f in fields(BenchReport)}
    runs = rep.get("runs")
    threads = rep.get("threads")
    base.update(
        runtime=str(rep.get("runtime") or host.runtime),
        runtime_version=str(rep.get("runtime_version") or "?"),
        threads=int(threads) if isinstance(threads, int) else host.threads,
        affinity=None,
        affinity_observed=None,
        host={k: v for k, v in dict(facts).items() if isinstance(v, str | int | float)},
        init_ms=num("init_ms") or float("nan"),
        first_inference_ms=num("first_inference_ms") or float("nan"),
        runs=runs if isinstance(runs, int) and not isinstance(runs, bool) else 0,
        # What the device does not say is not the host's: its own name, generated inputs of
        # the sample's shapes, its warm-up if it reports one.
        target=f"device {device} ({board})",
        inputs_generated=True,
        warmup_mean_ms=num("warmup_mean_ms"),
        warmup_runs=wr if isinstance(wr := rep.get("warmup_runs"), int) else host.warmup_runs,
        duration_s=num("duration_s") or float("nan"),
        latency_ms={k: float(v) for k, v in lat.items() if _finite(v) and v >= 0},
        inferences_per_s=num("inferences_per_s") or float("nan"),
        samples_per_s=num("samples_per_s") or float("nan"),
        baseline_rss_mb=num("baseline_rss_mb"),
        init_rss_increase_mb=num("init_rss_increase_mb"),
        peak_rss_mb=num("peak_rss_mb"),
        rss_increase_mb=num("rss_increase_mb"),
        latency_scale=None,
        estimated_board_latency_ms=None,
        budget_lines=(),
        latencies_ms=(),
        stopped_by_ci=False,
    )
    app = rep.get("application")
    transfer = rep.get("transfer")
    agent = facts.get("agent_version")
    return DeviceBenchReport(
        **base,
        device=device,
        board=board,
        agent_version=str(agent) if agent else None,
        application=dict(app) if isinstance(app, Mapping) else None,
        transfer=dict(transfer) if isinstance(transfer, Mapping) else None,
    )


def probe(
    target: OnDevice,
    boards: Mapping[str, list[str]],
    model: Path,
    inputs: Mapping[str, Any],
    work: Path,
) -> dict[str, str]:
    """Send ``model`` (the search's fp32) to every device and time it once, all devices at
    once, before the search starts: a device that does not answer, or refuses what every
    candidate would need (its trusted keys, the size, the arguments), is one line now
    (ConfigError naming it), not after the search. A device whose runtime cannot time this
    model (fp32 out of memory on a small board: the reason to quantize) is not an error:
    returns those devices' reasons, for the report."""
    from concurrent.futures import ThreadPoolExecutor

    from sdk.remote_bench import benchmark_candidate

    path = inline_for_device(model, work)

    def one(device: str) -> tuple[str, str | None, ConfigError | None]:
        try:
            rep = benchmark_candidate(
                target.broker_url, target.fleet, device, path, min_runs=1, min_seconds=0.0,
                warmup_runs=0, threads=target.threads, inputs=inputs, key=target.key,
                timeout_s=target.timeout_s, remove=False, **target.auth(),
            )  # fmt: skip
        except CandidateRefused as exc:
            if exc.stage == "timing":
                return device, str(exc), None
            return device, None, ConfigError(f"--device {device} refuses candidates: {exc}")
        except EdgeshipError as exc:
            return device, None, ConfigError(f"--device {device} cannot time candidates: {exc}")
        if not isinstance(rep.get("latency_ms"), Mapping):
            return device, "it answered the fp32 timing without latencies", None
        return device, None, None

    devices = [d for ds in boards.values() for d in ds]
    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        results = list(pool.map(one, devices))
    for _, _, error in results:
        if error is not None:
            raise error
    return {device: why for device, why, _ in results if why is not None}


def inline_for_device(path: Path, work: Path) -> Path:
    """``path``, or a copy in ``work`` with its external data read in: a device gets one file
    per candidate (ConfigError when the data cannot be read in)."""
    if path.suffix.lower() != ".onnx":
        return path
    from sdk.package import inline_external_data

    scratch = work / f"{path.stem}.inlined.onnx"
    return inline_external_data(path, scratch)


def device_alive(target: OnDevice, device: str) -> bool:
    try:
        send_command(
            target.broker_url,
            target.fleet,
            device,
            Action.PING,
            {},
            timeout_s=10,
            **target.auth(),
        )
    except EdgeshipError:
        return False
    return True


def time_on_devices(
    jobs: Sequence[Job],
    target: OnDevice,
    *,
    say: Callable[[str], None] | None = None,
    boards: Mapping[str, list[str]] | None = None,
    measure: Callable[..., dict[str, Any]] | None = None,
) -> DeviceRun:
    """Time every job on every board model of ``target``: within a board, each job once, on
    whichever of its devices is free; the candidates stay on the devices for the choice's
    re-runs until :func:`clean_up`. A device that fails a job and then does not answer a
    ping is dropped and the job goes back to the queue; a job the device refused (its
    runtime failed on it) is recorded as missing with the device's reason."""
    from sdk.remote_bench import benchmark_candidate

    tell = say or (lambda line: None)
    run = DeviceRun(boards={b: list(d) for b, d in (boards or boards_of(target)).items()})
    for board, devices in run.boards.items():
        run.reports[board] = {}
        run.missing[board] = {}
        started = time.monotonic()
        queue = _BoardQueue(
            board, devices, list(jobs), target, run, measure or benchmark_candidate, tell
        )
        queue.run_all()
        tell(
            f"{board}: {len(run.reports[board])} of {len(jobs)} timed in "
            f"{time.monotonic() - started:.1f} s"
        )
    return run


class _BoardQueue:
    """The jobs of one board model, taken one at a time by a thread per device."""

    def __init__(
        self,
        board: str,
        devices: list[str],
        pending: list[Job],
        target: OnDevice,
        run: DeviceRun,
        measure: Callable[..., dict[str, Any]],
        tell: Callable[[str], None],
    ) -> None:
        self.board, self.pending, self.target, self.run = board, pending, target, run
        self.measure, self.tell = measure, tell
        self.devices = devices
        self.alive = set(devices)
        self.in_flight = 0
        self.cond = threading.Condition()

    def run_all(self) -> None:
        threads = [
            threading.Thread(target=self.worker, args=(d,), daemon=True) for d in self.devices
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _take(self, device: str) -> Job | None:
        with self.cond:
            while not self.pending and self.in_flight > 0:
                self.cond.wait(0.5)
            if not self.pending or device not in self.alive:
                return None
            self.in_flight += 1
            return self.pending.pop(0)

    def worker(self, device: str) -> None:
        while (job := self._take(device)) is not None:
            try:
                rep = self.measure(
                    self.target.broker_url,
                    self.target.fleet,
                    device,
                    job.path,
                    min_runs=self.target.min_runs,
                    min_seconds=self.target.min_seconds,
                    threads=self.target.threads,
                    inputs=job.inputs,
                    key=self.target.key,
                    timeout_s=self.target.timeout_s,
                    remove=False,
                    **self.target.auth(),
                )
                report = device_report(job.host, rep, device, self.board)
            except Exception as exc:  # whatever a device answers, the queue goes on
                if isinstance(exc, RemoteError) and (
                    SHUTTING_DOWN in str(exc) or not device_alive(self.target, device)
                ):
                    # Gone (no ping), or going (it said it is shutting down, and may still
                    # answer a ping for a moment): its job goes to another device of the
                    # board and it gets no more.
                    self._lost(device, job, str(exc))
                    return
                # A refusal, no answer within --device-timeout from a device that still
                # answers pings (slow, or stuck on this model), or an answer that cannot be:
                # this job's failure there; the device goes on with the next.
                reason = (
                    str(exc)
                    if isinstance(exc, EdgeshipError)
                    else (f"an answer that cannot be read ({type(exc).__name__}: {exc})")
                )
                with self.cond:
                    self.run.missing[self.board][job.name] = f"{device}: {reason}"
                    self.in_flight -= 1
                    self.cond.notify_all()
                self.tell(f"  {job.name} on {device}: failed: {reason}")
                continue
            with self.cond:
                self.run.reports[self.board][job.name] = report
                self.run.timed_by.setdefault(device, []).append(job.name)
                self.in_flight -= 1
                self.cond.notify_all()
            lat = report.latency_ms
            self.tell(f"  {job.name} on {device}: p50 {lat['p50']:.3f} ms, p95 {lat['p95']:.3f} ms")

    def _lost(self, device: str, job: Job, exc: str) -> None:
        """``device`` stopped answering: its job goes back to the others, if any are left."""
        with self.cond:
            self.alive.discard(device)
            self.run.lost[device] = str(exc)
            self.in_flight -= 1
            if self.alive:
                self.pending.insert(0, job)
            else:
                for left in [job, *self.pending]:
                    self.run.missing[self.board][left.name] = (
                        f"not measured: {device} stopped answering ({exc}) and no other "
                        f"{self.board} device was left"
                    )
                self.pending.clear()
            self.cond.notify_all()
        self.tell(f"  {device}: lost ({exc}); its work goes to the others")


def clean_up(jobs: Sequence[Job], target: OnDevice, run: DeviceRun) -> None:
    """Ask every device still answering to delete the candidates it holds (best effort: the
    agent also keeps only its newest few and clears them when it starts)."""
    import hashlib

    from device_agent.contracts.commands import candidate_id

    ids = []
    for job in jobs:
        try:
            ids.append(candidate_id(hashlib.sha256(job.path.read_bytes()).hexdigest()))
        except OSError:
            continue
    for devices in run.boards.values():
        for device in devices:
            if device in run.lost:
                continue
            for ident in ids:
                try:
                    send_command(
                        target.broker_url,
                        target.fleet,
                        device,
                        Action.CANDIDATE_REMOVE,
                        {"candidate": ident},
                        timeout_s=10,
                        **target.auth(),
                    )
                except EdgeshipError:
                    break
