"""``optimize --device``: the choice from the devices' figures, once per board model.

:func:`choose_on_devices` sends the candidates that passed the quality gate to the devices
(:mod:`sdk.optimize.on_device`: the work queue, failover, the checks on what a device answers),
then applies the search's objective (:func:`sdk.optimize.search._choose`) with each board's
figures and bundles each board's choice. The search itself is :mod:`sdk.optimize.search`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sdk.artifact import ModelArtifact
from sdk.bench import BenchReport
from sdk.budget import check_budget
from sdk.optimize.choice import _bundle, _choose, _metrics, _nothing_to_quantize
from sdk.optimize.on_device import DeviceRun
from sdk.optimize.report import Candidate
from sdk.optimize.stages import SearchContext
from sdk.optimize.stages.fp32 import FP32
from sdk.remote import RemoteError

__all__ = ["choose_on_devices", "input_spec"]

log = logging.getLogger(__name__)


def input_spec(
    sample: dict[str, np.ndarray] | None, art: ModelArtifact
) -> dict[str, dict[str, Any]]:
    """The shapes the device times a candidate on: the search's real sample's, else the
    model's with symbolic dimensions as 1."""
    if sample is not None:
        return {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sample.items()}
    return {
        t.name: {"shape": [d if isinstance(d, int) else 1 for d in t.shape], "dtype": t.dtype}
        for t in art.io.inputs
    }


def choose_on_devices(
    ctx: SearchContext,
    candidates: list[Candidate],
    boards: Mapping[str, list[str]],
    sample: dict[str, np.ndarray] | None,
    work: Path,
    out_dir: Path,
    notes: list[str],
    bar: Any,
    host_measure: Callable[[ModelArtifact], BenchReport],
) -> tuple[Candidate, Path, dict[str, Any]]:
    """Time the candidates on the devices (host figures as the first filter), then choose and
    bundle once per board model from that board's figures. The first board (of the first
    ``--device``) is bundled into ``out_dir``, each other into ``<out_dir>-<board>``."""
    from sdk.optimize.on_device import Job, clean_up, inline_for_device, time_on_devices

    cfg = ctx.config
    target = cfg.on_device
    assert target is not None
    made = [c for c in candidates if c.error is None and c.artifact and c.bench]
    fp32 = next(c for c in made if c.name == FP32)
    assert fp32.bench is not None
    base = fp32.bench.latency_ms["p95"]
    jobs: list[Job] = []
    for c in made:
        assert c.artifact is not None and c.bench is not None
        c.host_bench = c.bench
        ratio = c.bench.latency_ms["p95"] / base if base > 0 else 1.0
        if c is not fp32 and ratio > target.hopeless_ratio:
            c.device_note = (
                f"not sent to the devices: host p95 {ratio:.2f}x fp32's, over "
                f"{target.hopeless_ratio:g}x (hopeless)"
            )
            continue
        path = inline_for_device(c.artifact.path, work)
        jobs.append(Job(c.name, path, c.bench, input_spec(sample, c.artifact)))
    bar.set_description(f"time {len(jobs)} candidates on {len(target.devices)} device(s)")
    run = time_on_devices(jobs, target, say=log.info, boards=boards)
    paths = {job.name: job.path for job in jobs}
    try:
        return _choose_per_board(
            ctx, made, run, sample, work, out_dir, notes, bar, paths, host_measure
        )
    finally:
        clean_up(jobs, target, run)


def _choose_per_board(
    ctx: SearchContext,
    made: list[Candidate],
    run: DeviceRun,
    sample: dict[str, np.ndarray] | None,
    work: Path,
    out_dir: Path,
    notes: list[str],
    bar: Any,
    paths: Mapping[str, Path],
    host_measure: Callable[[ModelArtifact], BenchReport],
) -> tuple[Candidate, Path, dict[str, Any]]:
    """Choose and bundle for each board model of ``run`` from its figures."""
    cfg = ctx.config
    for board, reports in run.reports.items():
        for name, report in reports.items():
            next(c for c in made if c.name == name).device_benches[board] = report
    choices: dict[str, dict[str, Any]] = {}
    unchosen: dict[str, str] = {}
    boards = list(run.boards)
    dests = _board_dirs(out_dir, boards)
    first: tuple[Candidate, Path] | None = None
    hopeless = {c.name: c.device_note for c in made if c.device_note}
    # The other boards first, the first board last: its figures stay on the candidates.
    for board in [*boards[1:], boards[0]]:
        for c in made:
            c.bench = c.device_benches.get(board)
            c.confirm_p95_ms = []
            c.budget_lines = check_budget(cfg.budget, _metrics(c))
            c.device_note = hopeless.get(c.name) or run.missing.get(board, {}).get(c.name)
        if not any(c.bench for c in made):
            why = [f"{d} lost: {r}" for d, r in run.lost.items() if d in run.boards[board]]
            why += [f"{name}: {r}" for name, r in run.missing.get(board, {}).items()]
            unchosen[board] = "; ".join(why[:3]) or "no candidate was sent"
            notes.append(f"{board}: no candidate was timed there ({unchosen[board]})")
            continue
        bar.set_description(f"confirm the choice on {board}")
        on_board = _OnBoard(ctx, made, run, board, sample, paths, notes)
        chosen = _choose(made, cfg.confirm_rounds, on_board, notes)
        if board == boards[0]:
            _nothing_to_quantize(ctx, chosen, notes)
        root = _bundle(ctx, chosen, work, dests[board], notes, bar)
        choices[board] = {
            "chosen": chosen.name,
            "bundle": str(root),
            "meets_budget": chosen.meets_budget,
            "devices": run.boards[board],
        }
        if board == boards[0]:
            first = (chosen, root)
    if first is None:
        # Nothing timed on the first board: the choice falls back to the host's figures, and
        # the report says so (the CLI exits 1: a board got no choice).
        for c in made:
            c.bench, c.confirm_p95_ms = c.host_bench, []
            c.budget_lines = check_budget(cfg.budget, _metrics(c))
            c.device_note = c.device_note or run.missing.get(boards[0], {}).get(c.name)
        notes.append(
            f"no candidate could be timed on {boards[0]} (the first --device's board): "
            "chosen from the host's figures instead"
        )
        chosen = _choose(
            made, cfg.confirm_rounds, lambda art: host_measure(art).latency_ms["p95"], notes
        )
        first = (chosen, _bundle(ctx, chosen, work, dests[boards[0]], notes, bar))
    notes.append(
        "latencies and memory measured on the devices (each candidate in a child process of "
        "the agent at low priority, beside the application it serves); host figures were the "
        "first filter"
    )
    return first[0], first[1], {**run.to_dict(), "choices": choices, "unchosen": unchosen}


def _board_dirs(out_dir: Path, boards: Sequence[str]) -> dict[str, Path]:
    """``out_dir`` for the first board, ``<out_dir>-<slug>`` for each other: one folder each
    (slugs made unique), never the search's ``-candidates`` work folder."""
    from sdk.optimize.on_device import board_slug

    dirs = {boards[0]: out_dir}
    taken = {"candidates"}
    for board in boards[1:]:
        slug = board_slug(board)
        n = 1
        while (f"{slug}-{n}" if n > 1 else slug) in taken:
            n += 1
        slug = f"{slug}-{n}" if n > 1 else slug
        taken.add(slug)
        dirs[board] = out_dir.with_name(f"{out_dir.name}-{slug}")
    return dirs


class _OnBoard:
    """The confirmation re-runs on a board: a candidate's p95 timed again on a live device of
    it (the next one when one refuses, stops answering or answers what cannot be), checked as
    the first timings were; its first-round figure, said in a note, when no device of the
    board can time it any more."""

    def __init__(
        self,
        ctx: SearchContext,
        made: list[Candidate],
        run: DeviceRun,
        board: str,
        sample: dict[str, np.ndarray] | None,
        paths: Mapping[str, Path],
        notes: list[str],
    ) -> None:
        self.target = ctx.config.on_device
        self.made, self.run, self.board, self.sample = made, run, board, sample
        self.paths, self.notes = paths, notes

    def __call__(self, art: ModelArtifact) -> float:
        from sdk.optimize.on_device import device_alive, device_report
        from sdk.remote_bench import benchmark_candidate

        target = self.target
        assert target is not None
        cand = next(c for c in self.made if c.artifact is art)
        assert cand.host_bench is not None
        path = self.paths.get(cand.name, art.path)
        for device in [d for d in self.run.boards[self.board] if d not in self.run.lost]:
            try:
                rep = benchmark_candidate(
                    target.broker_url, target.fleet, device, path,
                    min_runs=target.min_runs, min_seconds=target.min_seconds,
                    threads=target.threads, inputs=input_spec(self.sample, art),
                    key=target.key, timeout_s=target.timeout_s, remove=False, **target.auth(),
                )  # fmt: skip
                return device_report(cand.host_bench, rep, device, self.board).latency_ms["p95"]
            except Exception as exc:  # refused, no answer, or an answer that cannot be
                log.warning("confirming %s on %s: %s", cand.name, device, exc)
                if isinstance(exc, RemoteError) and not device_alive(target, device):
                    self.run.lost.setdefault(device, f"during the confirmation re-runs: {exc}")
        self.notes.append(
            f"{cand.name}: no device of {self.board} could time it again for the confirmation; "
            "its first figure stands in"
        )
        return cand.device_benches[self.board].latency_ms["p95"]
