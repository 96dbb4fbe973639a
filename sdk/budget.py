"""Budgets: what a model must meet on the board, and the per-line verdict for a candidate.

A missed budget is a result, not an exception: :func:`check_budget` returns one
:class:`BudgetLine` per limit with the measured value, the limit and the distance.

Budget strings (CLI ``--budget``) are comma-separated ``key<=value[unit]`` terms:

=========  ===========================  ======================
key        meaning                      units
=========  ===========================  ======================
p50..p99   latency percentile           ms (default), us, s
rss        peak memory increase         MB (default), KB, GB
drop       accuracy drop vs fp32        % (points, default), or a fraction below 1
size       model file size              MB (default), KB, GB
=========  ===========================  ======================

MB means MiB (2**20 bytes) for memory and size alike.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from sdk.errors import ConfigError

__all__ = ["Budget", "BudgetLine", "check_budget", "parse_budget"]

_LATENCY_KEYS = ("p50", "p90", "p95", "p99")


@dataclass(frozen=True)
class Budget:
    """Limits a candidate must meet; ``None`` leaves a line out.

    ``max_accuracy_drop`` is a fraction (0.01 = one percentage point of top-1 accuracy, or of
    agreement with fp32 when no labels are given).
    """

    p95_ms: float | None = None
    peak_rss_mb: float | None = None
    max_accuracy_drop: float | None = None
    max_size_mb: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None

    def __post_init__(self) -> None:
        for key, value in asdict(self).items():
            if value is not None and not value >= 0:
                raise ConfigError(f"budget {key} must be a non-negative number, got {value}")

    def is_empty(self) -> bool:
        return all(v is None for v in asdict(self).values())

    def to_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def describe(self) -> str:
        parts = [
            f"{k}<={getattr(self, f'{k}_ms'):g}ms"
            for k in _LATENCY_KEYS
            if getattr(self, f"{k}_ms") is not None
        ]
        if self.peak_rss_mb is not None:
            parts.append(f"rss<={self.peak_rss_mb:g}MB")
        if self.max_accuracy_drop is not None:
            parts.append(f"drop<={self.max_accuracy_drop * 100:g}%")
        if self.max_size_mb is not None:
            parts.append(f"size<={self.max_size_mb:g}MB")
        return ",".join(parts) or "(none)"


_TERM = re.compile(
    r"^\s*([a-z0-9_]+)\s*(<=|<)\s*([0-9]*\.?[0-9]+(?:e-?[0-9]+)?)\s*([a-z%]*)\s*$", re.I
)
_TIME = {"": 1.0, "ms": 1.0, "us": 1e-3, "µs": 1e-3, "s": 1000.0}
_BYTES = {
    "": 1.0,
    "mb": 1.0,
    "mib": 1.0,
    "kb": 1 / 1024,
    "kib": 1 / 1024,
    "gb": 1024.0,
    "gib": 1024.0,
}
_ALIASES = {
    "rss": "rss",
    "mem": "rss",
    "memory": "rss",
    "peak_rss": "rss",
    "drop": "drop",
    "accuracy_drop": "drop",
    "size": "size",
    "file_size": "size",
}


def parse_budget(text: str) -> Budget:
    """Parse ``"p95<=20ms,rss<=64MB,drop<=1%,size<=2MB"`` into a :class:`Budget`."""
    values: dict[str, float] = {}
    if not text.strip():
        return Budget()
    for raw in text.split(","):
        if not raw.strip():
            continue
        m = _TERM.match(raw)
        if m is None:
            raise ConfigError(
                f"malformed budget term {raw.strip()!r}; write terms like "
                "'p95<=20ms', 'rss<=64MB', 'drop<=1%', 'size<=2MB', separated by commas"
            )
        key, _op, number, unit = (
            m.group(1).lower(),
            m.group(2),
            float(m.group(3)),
            m.group(4).lower(),
        )
        key = _ALIASES.get(key, key)
        if key in _LATENCY_KEYS:
            if unit not in _TIME:
                raise ConfigError(
                    f"budget {raw.strip()!r}: unknown time unit {unit!r} (use ms, us or s)"
                )
            field_name, value = f"{key}_ms", number * _TIME[unit]
        elif key in ("rss", "size"):
            if unit not in _BYTES:
                raise ConfigError(
                    f"budget {raw.strip()!r}: unknown size unit {unit!r} (use KB, MB or GB)"
                )
            field_name = "peak_rss_mb" if key == "rss" else "max_size_mb"
            value = number * _BYTES[unit]
        elif key == "drop":
            if unit == "%":
                value = number / 100.0
            elif unit == "" and number < 1:
                value = number
            else:
                raise ConfigError(
                    f"budget {raw.strip()!r}: give the accuracy drop in percent "
                    "points ('drop<=1%') or as a fraction ('drop<=0.01')"
                )
            field_name = "max_accuracy_drop"
        else:
            raise ConfigError(
                f"unknown budget key {m.group(1)!r}; known keys: "
                "p50, p90, p95, p99, rss, drop, size"
            )
        if field_name in values:
            raise ConfigError(f"budget names {m.group(1)!r} twice")
        values[field_name] = value
    return Budget(**values)


@dataclass(frozen=True)
class BudgetLine:
    """The verdict on one budget line."""

    name: str  # "p95", "rss", "drop", "size"
    measured: float | None
    limit: float
    unit: str
    passed: bool

    @property
    def distance(self) -> float | None:
        """How far over the limit (positive) or under it (negative); None if not measured."""
        return None if self.measured is None else self.measured - self.limit

    def describe(self) -> str:
        if self.measured is None:
            return f"{self.name}: not measured (limit {self.limit:g} {self.unit})"
        over = self.measured - self.limit
        rel = f" ({over / self.limit:+.0%})" if self.limit else ""
        op = "<=" if self.passed else ">"
        verdict = "ok" if self.passed else f"over by {over:.3g} {self.unit}{rel}"
        measured = f"{self.measured:.4g} {self.unit}"
        return f"{self.name} {measured} {op} {self.limit:g} {self.unit}: {verdict}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "measured": self.measured,
            "limit": self.limit,
            "unit": self.unit,
            "passed": self.passed,
            "distance": self.distance,
            "text": self.describe(),
        }


def check_budget(budget: Budget, metrics: Mapping[str, float | None]) -> list[BudgetLine]:
    """Compare ``metrics`` with ``budget``.

    ``metrics`` keys: ``p50_ms``..``p99_ms``, ``peak_rss_mb``, ``accuracy_drop`` (fraction),
    ``size_mb``. A line whose metric is missing fails (nothing is assumed to pass).
    """
    lines: list[BudgetLine] = []
    for key in _LATENCY_KEYS:
        limit = getattr(budget, f"{key}_ms")
        if limit is not None:
            lines.append(_line(key, metrics.get(f"{key}_ms"), limit, "ms"))
    if budget.peak_rss_mb is not None:
        lines.append(_line("rss", metrics.get("peak_rss_mb"), budget.peak_rss_mb, "MB"))
    if budget.max_accuracy_drop is not None:
        drop = metrics.get("accuracy_drop")
        lines.append(
            _line(
                "drop",
                None if drop is None else drop * 100,
                budget.max_accuracy_drop * 100,
                "points",
            )
        )
    if budget.max_size_mb is not None:
        lines.append(_line("size", metrics.get("size_mb"), budget.max_size_mb, "MB"))
    return lines


def _line(name: str, measured: float | None, limit: float, unit: str) -> BudgetLine:
    passed = measured is not None and measured <= limit
    return BudgetLine(name=name, measured=measured, limit=limit, unit=unit, passed=passed)
