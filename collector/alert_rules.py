"""The alert rules: what each one sees of a device (:class:`DeviceView`) and its verdict
(:class:`Condition`). Pure functions of the view; the engine (:mod:`collector.alerts`) turns
verdicts into firing and resolved alerts. The fleet-level rule ``rollout_halted`` judges a
stored rollout instead (:func:`rollout_halted`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from collector.alert_config import RuleConfig
from collector.drift import DriftConfig, DriftResult, Reference
from collector.errors import ConfigError
from collector.ingest import TelemetryRecord
from collector.state import DeviceState, summarize_latency
from collector.store import RolloutRow

__all__ = ["ROLLOUT_BAD_STATES", "Condition", "DeviceView", "evaluate_rule", "rollout_halted"]

# A device's states in a rollout that count against it (the rollout_halted alert's value).
ROLLOUT_BAD_STATES = ("rolled_back", "failed", "reverted")

_THROTTLE_NOW = (
    (0, "under-voltage"),
    (1, "frequency capped"),
    (2, "throttled"),
    (3, "soft temperature limit"),
)


# --- rules ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceView:
    """What the rules see of one device: its state (:class:`FleetState`), its newest telemetry
    windows of the current model (oldest first, received within ``max_age_s``), its drift
    verdict, its reference (for the p95 budget) and how many sequence numbers went missing and
    how many messages its spool dropped within each rule's ``period_s``."""

    state: DeviceState
    now: float
    windows: Sequence[TelemetryRecord] = ()
    drift: DriftResult | None = None
    reference: Reference | None = None
    new_gaps: int = 0
    spool_drops: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.state.fleet, self.state.device)


@dataclass(frozen=True)
class Condition:
    """A rule's verdict: ``active`` (the condition holds), the measured ``value`` and a
    one-line ``summary`` for a human. ``episode``, when set, names what the alert is about
    (a deploy id): the alert's id is derived from it, and another episode while one fires
    resolves that alert and fires a new one."""

    active: bool
    value: float | None
    summary: str
    episode: str | None = None


def evaluate_rule(
    name: str, rule: RuleConfig, view: DeviceView, *, drift: DriftConfig, firing: bool
) -> Condition | None:
    """The verdict of rule ``name`` on one device; None when it cannot be evaluated (the alert,
    if any, stays as it is). ``firing`` says whether its alert fires now (drift hysteresis)."""
    check = _CHECKS.get(name)
    if check is None:
        raise ConfigError(f"unknown rule {name!r}")
    windows = list(view.windows)[-rule.windows :]
    return check(_Inputs(rule, view, windows, drift, firing))


@dataclass(frozen=True)
class _Inputs:
    """What one rule's check reads: its settings, the device, its newest ``rule.windows``
    windows, the drift thresholds and whether its alert fires now."""

    rule: RuleConfig
    view: DeviceView
    windows: list[TelemetryRecord]
    drift: DriftConfig
    firing: bool

    @property
    def who(self) -> str:
        return self.view.state.device


def _offline(i: _Inputs) -> Condition | None:
    s = i.view.state
    return Condition(s.status == "offline", None, f"{i.who} is offline: {s.reason}")


def _stale(i: _Inputs) -> Condition | None:
    s = i.view.state
    return Condition(s.status == "stale", None, f"{i.who} is stale: {s.reason}")


def _p95_latency(i: _Inputs) -> Condition | None:
    rule, windows, who = i.rule, i.windows, i.who
    threshold, basis = _latency_threshold(rule, i.view)
    if threshold is None:
        return None
    if not windows:
        return Condition(False, None, f"{who}: no recent telemetry")
    lat = summarize_latency(windows)
    if lat.p95 is None or lat.inferences < max(rule.min_inferences, 1):
        return None
    return Condition(
        lat.p95 > threshold,
        lat.p95,
        f"{who}: p95 latency {lat.p95:.3g} ms over {len(windows)} windows "
        f"({'above' if lat.p95 > threshold else 'within'} the {threshold:g} ms {basis})",
    )


def _outlier_rate(i: _Inputs) -> Condition | None:
    rule, windows, who = i.rule, i.windows, i.who
    threshold = rule.models.get(i.view.state.model or "", rule.threshold)
    if threshold is None:
        return None
    inferences = sum(w.inferences for w in windows)
    outliers = sum(w.outliers for w in windows)
    if not windows:
        return Condition(False, None, f"{who}: no recent telemetry")
    if inferences < max(rule.min_inferences, 1):
        return None
    rate = outliers / inferences
    return Condition(
        rate > threshold,
        rate,
        f"{who}: {rate:.1%} of {inferences} inferences were outliers over {len(windows)} "
        f"windows (threshold {threshold:.1%})",
    )


def _drift(i: _Inputs) -> Condition | None:
    d, drift, who = i.view.drift, i.drift, i.who
    if not i.view.windows:
        return Condition(False, None, f"{who}: no recent telemetry")
    if d is None or d.psi is None:
        return None
    limit = drift.moderate if i.firing else drift.significant
    active = d.psi >= limit
    return Condition(
        active,
        d.psi,
        f"{who}: {d.reason}"
        + (f" (>= {drift.significant:g}: significant)" if d.psi >= drift.significant else ""),
    )


def _throttled(i: _Inputs) -> Condition | None:
    who = i.who
    newest = i.windows[-1] if i.windows else None
    raw = None if newest is None else newest.throttled
    if raw is None:
        return Condition(False, None, f"{who}: no throttling reported")
    now = [text for bit, text in _THROTTLE_NOW if raw & 1 << bit]
    return Condition(
        bool(now),
        float(raw),
        f"{who}: {', '.join(now)} (get_throttled {raw:#x})"
        if now
        else f"{who}: not throttled ({raw:#x})",
    )


def _gaps(i: _Inputs) -> Condition | None:
    rule, view = i.rule, i.view
    limit = rule.threshold if rule.threshold is not None else 1.0
    return Condition(
        view.new_gaps >= limit,
        float(view.new_gaps),
        f"{i.who}: {view.new_gaps} sequence numbers missing in the last {rule.period_s:g} s"
        + (
            f" ({view.spool_drops} messages dropped by the device's full spool)"
            if view.spool_drops
            else ""
        ),
    )


def _spool_drops(i: _Inputs) -> Condition | None:
    rule, view = i.rule, i.view
    limit = rule.threshold if rule.threshold is not None else 1.0
    return Condition(
        view.spool_drops >= limit,
        float(view.spool_drops),
        f"{i.who}: its spool dropped {view.spool_drops} messages in the last {rule.period_s:g} s",
    )


def _deploy_failed(i: _Inputs) -> Condition | None:
    who, dep = i.who, i.view.state.deploy
    if dep is None:
        return Condition(False, None, f"{who}: no remote deploy reported")
    what = f"deploy {dep.id} of {dep.model or 'a model'} {dep.from_version} -> {dep.to_version}"
    if dep.state in ("rolled_back", "failed"):
        verb = "rolled back" if dep.state == "rolled_back" else "failed"
        return Condition(
            True, None, f"{who}: {what} {verb}: {dep.reason or 'no reason given'}", dep.id
        )
    return Condition(False, None, f"{who}: {what} is {dep.state}")


# One check per rule in RULES (tests/test_collector_alerts.py runs every one).
_CHECKS: dict[str, Callable[[_Inputs], Condition | None]] = {
    "offline": _offline,
    "stale": _stale,
    "p95_latency": _p95_latency,
    "outlier_rate": _outlier_rate,
    "drift": _drift,
    "throttled": _throttled,
    "gaps": _gaps,
    "spool_drops": _spool_drops,
    "deploy_failed": _deploy_failed,
}


def rollout_halted(r: RolloutRow) -> Condition:
    """The ``rollout_halted`` verdict on a rollout's newest stored state: active while it is
    ``halted``; the value counts its devices rolled back, failed or reverted; the episode is
    the rollout (one alert per rollout)."""
    what = f"rollout {r.id} of {r.model or 'a model'}@{r.model_version or '?'}"
    bad = sum(r.counts.get(s, 0) for s in ROLLOUT_BAD_STATES)
    where = f"wave {r.wave_shown} of {r.waves_total}"
    if r.state == "halted":
        return Condition(
            True,
            float(bad),
            f"{what} halted at {where} ({bad} of {r.devices_total} devices rolled back, "
            f"failed or reverted): {r.reason or 'no reason given'}",
            r.id,
        )
    if r.state == "aborted":
        summary = f"{what} was aborted at {where}: {r.reason or 'no reason given'}"
    elif r.state == "done":
        summary = f"{what} is done ({r.waves_total} waves)"
    else:
        summary = f"{what} is {r.state} at {where}"
    return Condition(False, float(bad), summary, r.id)


def _latency_threshold(rule: RuleConfig, view: DeviceView) -> tuple[float | None, str]:
    model = view.state.model or ""
    if model in rule.models:
        return rule.models[model], f"threshold for {model}"
    ref = view.reference
    if rule.use_budget and ref is not None and ref.p95_budget_ms is not None:
        return ref.p95_budget_ms, f"p95 budget of {ref.model}@{ref.version}"
    return rule.threshold, "threshold"
