"""Drift: the PSI formula, and the drift monitor's false alarms and detection delay on
simulated windows (the end-to-end acceptance over MQTT is in test_collector_monitor.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from collector.drift import (
    DriftConfig,
    DriftMonitor,
    Reference,
    ReferenceSet,
    psi,
)
from collector.ingest import TelemetryRecord, ingest
from device_agent.contracts.messages import encode, topic
from device_agent.errors import ConfigError
from sdk.reference import ReferenceStats
from tests.collector_helpers import LABELS, UNIFORM, gamma_score_counts, reference_doc, window

SHIFTED = (0.3, 0.3) + (0.05,) * 8  # PSI 0.72 against uniform: two classes take 60%
MILD = (0.16,) * 4 + (0.04,) * 4 + (0.1,) * 2  # PSI 0.33


def record(device: str, seq: int, rng: np.random.Generator, **kw: object) -> TelemetryRecord:
    m = window(device, seq, rng=rng, ts=1e9 + seq, **kw)  # type: ignore[arg-type]
    r = ingest(topic("f", device, "telemetry"), encode(m), 1e9 + seq)
    assert isinstance(r, TelemetryRecord)
    return r


def references(rng: np.random.Generator) -> ReferenceSet:
    doc = reference_doc(dict(zip(LABELS, UNIFORM, strict=True)), gamma_score_counts(rng))
    return ReferenceSet([Reference("digits-cnn", "1", ReferenceStats.from_dict(doc), "test")])


def test_psi_formula() -> None:
    assert psi([1, 2, 3], [2, 4, 6]) == 0.0  # shares, not counts, are compared
    e, a = [0.5, 0.5], [0.9, 0.1]
    expected = (0.9 - 0.5) * math.log(0.9 / 0.5) + (0.1 - 0.5) * math.log(0.1 / 0.5)
    assert psi(e, a) == pytest.approx(expected)
    assert psi(e, a) == pytest.approx(psi(a, e))  # symmetric
    # An empty bin on one side counts as epsilon, not as 0 (which would be infinite).
    assert psi([1, 0], [1, 1]) == pytest.approx(
        (0.5 - 1) * math.log(0.5 / 1) + (0.5 - 1e-4) * math.log(0.5 / 1e-4)
    )
    assert psi([1, 0, 0], [1, 1, 0]) == psi([1, 0], [1, 1])  # empty on both sides adds 0
    assert psi({"a": 1, "b": 1}, {"a": 9, "b": 1}) == pytest.approx(psi([1, 1], [9, 1]))
    assert psi({"a": 1}, {"b": 1}) > 1  # disjoint labels: maximal shift
    for bad in (([1], [1, 2]), ([0, 0], [1, 1]), ([-1, 2], [1, 1])):
        with pytest.raises(ConfigError):
            psi(*bad)


@pytest.mark.parametrize("basis", ["reference", "baseline"])
def test_no_false_alarms_on_unshifted_devices(basis: str) -> None:
    """20 devices x 150 windows of 100 inferences drawn from the reference distribution: no
    window reaches the significant level (0.25); the worst PSI is printed."""
    rng = np.random.default_rng(7)
    monitor = DriftMonitor(DriftConfig(), references(rng) if basis == "reference" else None)
    significant = evaluated = 0
    worst = 0.0
    for d in range(20):
        for i in range(150):
            r = monitor.observe(record(f"dev{d}", i, rng))
            assert r is not None
            if r.psi is not None:
                evaluated += 1
                worst = max(worst, r.psi)
                significant += r.level == "significant"
                assert r.basis == basis
    print(f"\n{basis}: {evaluated} verdicts, {significant} significant, worst PSI {worst:.3f}")
    assert significant == 0
    assert evaluated >= 20 * (150 - 10 if basis == "baseline" else 150) - 20 * 3


@pytest.mark.parametrize("basis", ["reference", "baseline"])
@pytest.mark.parametrize(("shift", "probs"), [("strong", SHIFTED), ("mild", MILD)])
def test_a_shift_is_significant_within_three_windows(
    basis: str, shift: str, probs: tuple[float, ...]
) -> None:
    rng = np.random.default_rng(11)
    delays = []
    for _trial in range(10):
        monitor = DriftMonitor(DriftConfig(), references(rng) if basis == "reference" else None)
        for i in range(20):
            r = monitor.observe(record("dev", i, rng))
            assert r is not None and r.level != "significant"
        for j in range(1, 11):
            r = monitor.observe(record("dev", 100 + j, rng, probs=probs))
            assert r is not None
            if r.level == "significant":
                delays.append(j)
                break
        else:
            delays.append(99)
    print(f"\n{shift} shift against the {basis}: detected after {delays} windows")
    assert max(delays) <= 3


def test_score_shift_alone_is_drift() -> None:
    rng = np.random.default_rng(3)
    monitor = DriftMonitor(DriftConfig(), references(rng))
    for i in range(5):
        monitor.observe(record("dev", i, rng))
    for i in range(5, 8):
        r = monitor.observe(record("dev", i, rng, score_shift=2.0))
    assert r is not None and r.level == "significant"
    assert r.scores_psi is not None and r.scores_psi > 0.25
    assert r.predictions_psi is not None and r.predictions_psi < 0.1


def test_too_few_samples_and_new_versions() -> None:
    rng = np.random.default_rng(5)
    monitor = DriftMonitor(DriftConfig(min_samples=300, max_windows=30), references(rng))
    r = monitor.observe(record("dev", 0, rng, n=20))
    assert r is not None and r.level == "insufficient" and r.psi is None
    for i in range(1, 15):  # the window grows back until 300 predictions are in
        r = monitor.observe(record("dev", i, rng, n=20))
    assert r is not None and r.level == "ok" and r.windows == 15 and r.samples == 300
    # A new model version has no reference here: it learns its own baseline from scratch.
    r = monitor.observe(record("dev", 20, rng, version="2"))
    assert r is not None and r.level == "learning" and r.basis is None
    assert r.observed_windows == 1


def test_config_is_checked() -> None:
    with pytest.raises(ConfigError):
        DriftConfig(windows=0)
    with pytest.raises(ConfigError):
        DriftConfig(moderate=0.3, significant=0.2)
