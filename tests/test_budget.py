"""Budget strings and per-line verdicts."""

from __future__ import annotations

import pytest

from sdk.budget import Budget, check_budget, parse_budget
from sdk.errors import ConfigError


def test_parse_all_keys_and_units() -> None:
    b = parse_budget("p95<=20ms, rss<=64MB, drop<=1%, size<=2MB, p99<0.05s, p50<=800us")
    assert b.p95_ms == 20 and b.peak_rss_mb == 64 and b.max_size_mb == 2
    assert b.max_accuracy_drop == pytest.approx(0.01)
    assert b.p99_ms == pytest.approx(50) and b.p50_ms == pytest.approx(0.8)
    assert parse_budget("rss<=1GB,size<=512KB") == Budget(peak_rss_mb=1024, max_size_mb=0.5)
    assert parse_budget("drop<=0.02").max_accuracy_drop == pytest.approx(0.02)
    assert parse_budget("").is_empty()
    assert parse_budget(b.describe()) == b


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("p95=20ms", "malformed budget term"),
        ("p95<=20parsecs", "unknown time unit"),
        ("rss<=64furlongs", "unknown size unit"),
        ("latency<=3ms", "unknown budget key"),
        ("drop<=3", "percent"),
        ("p95<=1ms,p95<=2ms", "twice"),
        ("p95<=fast", "malformed"),
    ],
)
def test_malformed_budgets_say_what_to_fix(text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        parse_budget(text)


def test_lines_report_measured_limit_and_distance() -> None:
    budget = parse_budget("p95<=10ms,rss<=50MB,drop<=1%,size<=1MB")
    lines = check_budget(
        budget, {"p95_ms": 12.5, "peak_rss_mb": 20.0, "accuracy_drop": 0.004, "size_mb": None}
    )
    by = {line.name: line for line in lines}
    assert not by["p95"].passed and by["p95"].distance == pytest.approx(2.5)
    assert "over by 2.5 ms (+25%)" in by["p95"].describe()
    assert by["rss"].passed and by["drop"].passed
    assert by["drop"].measured == pytest.approx(0.4) and by["drop"].unit == "points"
    # A line that was not measured fails: nothing is assumed to pass.
    assert not by["size"].passed and "not measured" in by["size"].describe()
