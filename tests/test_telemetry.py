"""The window aggregator: counts, fixed buckets, exact percentiles, labels, thread safety."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from device_agent.contracts.messages import (
    LATENCY_BUCKETS_MS,
    SCORE_BUCKETS,
    TelemetryMessage,
    decode,
    encode,
)
from device_agent.errors import ConfigError
from device_agent.telemetry import OTHER_LABEL, WindowAggregator, percentile


def test_counts_buckets_and_percentiles() -> None:
    agg = WindowAggregator(labels=("cat", "dog"), start=100.0, seed=0)
    latencies_ms = np.linspace(0.5, 100.0, 1000)
    for i, ms in enumerate(latencies_ms):
        agg.record(float(ms) / 1000.0, prediction=i % 2, score=float(i % 7), is_outlier=i % 7 == 6)
    agg.record_error()
    agg.record_error()
    w = agg.close_window(110.0)
    assert (w["window_start"], w["window_s"]) == (100.0, 10.0)
    assert (w["inferences"], w["errors"], w["outliers"]) == (1000, 2, 142)
    hist = w["latency_ms"].histogram
    assert hist.bounds == LATENCY_BUCKETS_MS and sum(hist.counts) == 1000
    expected = np.bincount(
        np.searchsorted(LATENCY_BUCKETS_MS, latencies_ms, side="left"),
        minlength=len(LATENCY_BUCKETS_MS) + 1,
    )
    assert list(hist.counts) == expected.tolist()
    ordered = sorted(latencies_ms.tolist())
    assert w["latency_ms"].p50 == pytest.approx(ordered[499])
    assert w["latency_ms"].p95 == pytest.approx(ordered[949])
    assert w["latency_ms"].p99 == pytest.approx(ordered[989])
    assert w["latency_ms"].max == pytest.approx(100.0)
    assert w["predictions"] == {"cat": 500, "dog": 500}
    assert w["scores"].bounds == SCORE_BUCKETS and w["scores"].total == 1000
    # The next window starts empty where the last one ended.
    empty = agg.close_window(120.0)
    assert empty["window_start"] == 110.0 and empty["inferences"] == 0
    assert empty["latency_ms"].p50 is None and empty["predictions"] == {}


def test_bucket_edges_follow_le_semantics() -> None:
    agg = WindowAggregator((1.0, 2.0), start=0.0)
    for ms in (0.5, 1.0, 1.0001, 2.0, 2.5):
        agg.record(ms / 1000.0)
    assert agg.close_window(1.0)["latency_ms"].histogram.counts == (2, 2, 1)


def test_window_fields_build_a_valid_message() -> None:
    agg = WindowAggregator(labels=("a",), start=0.0)
    agg.record(0.002, prediction="a", score=0.3)
    agg.record(0.003, prediction="zzz", score=float("nan"))
    agg.record(float("nan"))
    agg.record(-1.0)
    agg.record(float("inf"))
    fields = agg.close_window(10.0)
    msg = TelemetryMessage(device="pi", boot="b", seq=0, ts=10.0, **fields)
    assert decode("edgeship/f/pi/telemetry", encode(msg)) == msg
    assert fields["predictions"] == {"a": 1, "zzz": 1}
    assert fields["scores"].total == 1  # NaN scores are not binned


def test_unknown_predictions_are_bounded() -> None:
    agg = WindowAggregator(labels=("a", "b"), start=0.0)
    agg.record(0.001, prediction=np.int64(1))
    agg.record(0.001, prediction=7)
    for i in range(200):
        agg.record(0.001, prediction=f"label-{i}")
    agg.record(0.001, prediction="")
    preds = agg.close_window(1.0)["predictions"]
    assert preds["b"] == 1 and preds["7"] == 1
    # "7" and 63 "label-*" fill the 64 extra slots; the other 137 and "" go to OTHER_LABEL.
    assert len(preds) == 1 + 64 + 1 and preds[OTHER_LABEL] == 137 + 1
    assert sum(preds.values()) == 203


def test_reservoir_keeps_percentiles_close_beyond_max_samples() -> None:
    agg = WindowAggregator(start=0.0, max_samples=2000, seed=1)
    rng = np.random.default_rng(0)
    values = rng.exponential(5.0, 50_000)
    for v in values:
        agg.record(float(v) / 1000.0)
    w = agg.close_window(1.0)
    assert w["inferences"] == 50_000 and w["latency_ms"].histogram.total == 50_000
    assert w["latency_ms"].max == pytest.approx(values.max())
    assert w["latency_ms"].p50 == pytest.approx(np.quantile(values, 0.5), rel=0.1)
    assert w["latency_ms"].p95 == pytest.approx(np.quantile(values, 0.95), rel=0.1)


def test_concurrent_records_are_all_counted() -> None:
    agg = WindowAggregator(labels=("x",), start=0.0)

    def work() -> None:
        for _ in range(5000):
            agg.record(0.001, prediction=0, score=1.0, is_outlier=True)
            agg.record_error()

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    w = agg.close_window(1.0)
    assert w["inferences"] == w["outliers"] == w["errors"] == 20_000
    assert w["predictions"] == {"x": 20_000}


def test_percentile_nearest_rank() -> None:
    assert percentile([1.0], 0.99) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.51) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 1.0) == 4.0
    with pytest.raises(ValueError):
        percentile([], 0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"latency_bounds_ms": ()},
        {"latency_bounds_ms": (1.0, 1.0)},
        {"score_bounds": (float("inf"),)},
        {"labels": ("a", "a")},
        {"labels": ("",)},
        {"max_samples": 0},
    ],
)
def test_bad_configuration_is_a_config_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        WindowAggregator(**kwargs)  # type: ignore[arg-type]


def test_a_wall_clock_step_never_bends_window_lengths() -> None:
    # A board without an RTC boots with a stale clock and NTP steps it later (forward by hours,
    # or back): the agent passes its wall clock as ``now``. The length comes from the
    # monotonic clock, the start is the end minus the length.
    agg = WindowAggregator(labels=("a",))
    time.sleep(0.05)
    ahead = time.time() + 3600.0
    w = agg.close_window(ahead)
    assert 0.04 <= w["window_s"] < 30.0, w["window_s"]
    assert w["window_start"] == pytest.approx(ahead - w["window_s"])
    time.sleep(0.05)
    behind = time.time() - 7200.0
    w = agg.close_window(behind)
    assert 0.04 <= w["window_s"] < 30.0, w["window_s"]
    assert w["window_start"] == pytest.approx(behind - w["window_s"])
