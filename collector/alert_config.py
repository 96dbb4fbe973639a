"""The alert rules' settings: :class:`AlertsConfig` with one :class:`RuleConfig` per rule,
read from TOML (the format is in :mod:`collector.alerts`) and checked whole at load."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, TypeAlias

from collector.drift import DriftConfig
from collector.errors import ConfigError
from device_agent.errors import ProtocolError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


__all__ = [
    "DEVICE_RULES",
    "FLEET_RULES",
    "RULES",
    "AlertsConfig",
    "RuleConfig",
    "Severity",
    "load_alerts_config",
]

Severity: TypeAlias = Literal["info", "warning", "critical"]
# Rules judged on each device, and rules judged on something of the fleet's (a rollout), whose
# alerts have no device.
DEVICE_RULES: tuple[str, ...] = (
    "offline",
    "stale",
    "p95_latency",
    "outlier_rate",
    "drift",
    "throttled",
    "gaps",
    "spool_drops",
    "deploy_failed",
)
FLEET_RULES: tuple[str, ...] = ("rollout_halted",)
RULES: tuple[str, ...] = (*DEVICE_RULES, *FLEET_RULES)
_SEVERITIES = ("info", "warning", "critical")
_COMMON_KEYS = frozenset({"enabled", "severity", "for_s"})
_RULE_KEYS: Mapping[str, frozenset[str]] = {
    "offline": _COMMON_KEYS,
    "stale": _COMMON_KEYS,
    "p95_latency": _COMMON_KEYS
    | {"threshold_ms", "use_budget", "windows", "min_inferences", "models"},
    "outlier_rate": _COMMON_KEYS | {"threshold", "windows", "min_inferences", "models"},
    "drift": _COMMON_KEYS,
    "throttled": _COMMON_KEYS,
    "gaps": _COMMON_KEYS | {"threshold", "period_s"},
    "spool_drops": _COMMON_KEYS | {"threshold", "period_s"},
    "deploy_failed": _COMMON_KEYS,
    "rollout_halted": _COMMON_KEYS,
}

# --- configuration --------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleConfig:
    """One rule's settings; each rule reads the fields its table in the module docstring
    names. ``threshold`` is ms for ``p95_latency`` (``threshold_ms`` in TOML), a fraction for
    ``outlier_rate``, a message count for ``gaps`` and ``spool_drops``; ``models`` maps a
    model name to its own threshold."""

    enabled: bool = True
    severity: Severity = "warning"
    for_s: float = 0.0
    threshold: float | None = None
    use_budget: bool = True
    windows: int = 6
    min_inferences: int = 0
    period_s: float = 300.0
    models: Mapping[str, float] = field(default_factory=dict)


_DEFAULT_RULES: Mapping[str, RuleConfig] = {
    "offline": RuleConfig(severity="critical"),
    "stale": RuleConfig(severity="warning"),
    "p95_latency": RuleConfig(severity="warning", windows=6, min_inferences=20),
    "outlier_rate": RuleConfig(severity="warning", threshold=0.10, windows=6, min_inferences=100),
    "drift": RuleConfig(severity="warning"),
    "throttled": RuleConfig(severity="warning"),
    "gaps": RuleConfig(severity="info", threshold=1, period_s=300.0, for_s=30.0),
    "spool_drops": RuleConfig(severity="warning", threshold=1, period_s=300.0),
    "deploy_failed": RuleConfig(severity="warning"),
    "rollout_halted": RuleConfig(severity="critical"),
}


@dataclass(frozen=True)
class AlertsConfig:
    """Every rule's settings, the drift settings, and ``max_age_s`` (telemetry older than this
    does not count for telemetry rules). ``source``: the id alerts carry (default: derived
    from the collector's MQTT client id)."""

    rules: Mapping[str, RuleConfig] = field(default_factory=lambda: dict(_DEFAULT_RULES))
    drift: DriftConfig = field(default_factory=DriftConfig)
    max_age_s: float = 300.0
    source: str | None = None

    def __post_init__(self) -> None:
        unknown = set(self.rules) - set(RULES)
        if unknown:
            raise ConfigError(f"alerts: unknown rules {sorted(unknown)}; known: {list(RULES)}")
        missing = [r for r in RULES if r not in self.rules]
        if missing:
            merged = dict(self.rules)
            merged.update({r: _DEFAULT_RULES[r] for r in missing})
            object.__setattr__(self, "rules", merged)
        if not self.max_age_s > 0:
            raise ConfigError("alerts: max_age_s must be positive")
        if self.source is not None:
            try:
                from device_agent.contracts.messages import validate_id

                validate_id(self.source, "source")
            except ProtocolError as exc:
                raise ConfigError(f"alerts: {exc}") from exc

    def rule(self, name: str) -> RuleConfig:
        return self.rules[name]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "alerts") -> AlertsConfig:
        """Build from a parsed TOML document; raises ConfigError naming the key."""
        top = set(data) - {"rules", "drift", "max_age_s", "source"}
        if top:
            raise ConfigError(
                f"{where}: unknown keys {sorted(top)}; expected rules, drift, max_age_s, source"
            )
        rules = dict(_DEFAULT_RULES)
        for name, table in _table(data.get("rules", {}), f"{where}.rules").items():
            if name not in RULES:
                raise ConfigError(f"{where}.rules.{name}: unknown rule; known: {list(RULES)}")
            rules[name] = _rule(name, _table(table, f"{where}.rules.{name}"), rules[name], where)
        drift_raw = _table(data.get("drift", {}), f"{where}.drift")
        known = {f.name: f for f in fields(DriftConfig)}
        drift_kwargs: dict[str, Any] = {}
        for key, value in drift_raw.items():
            if key not in known:
                raise ConfigError(f"{where}.drift.{key}: unknown key; known: {sorted(known)}")
            if known[key].type in ("int", int):
                drift_kwargs[key] = _int(value, f"{where}.drift.{key}")
            else:
                drift_kwargs[key] = _num(value, f"{where}.drift.{key}")
        max_age = data.get("max_age_s", 300.0)
        source = data.get("source")
        if source is not None and not isinstance(source, str):
            raise ConfigError(f"{where}.source: expected a string")
        return cls(
            rules=rules,
            drift=DriftConfig(**drift_kwargs),
            max_age_s=_num(max_age, f"{where}.max_age_s"),
            source=source,
        )


def load_alerts_config(path: str | Path | None) -> AlertsConfig:
    """The defaults, or the defaults overridden by the TOML file at ``path``."""
    if path is None:
        return AlertsConfig()
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"alerts file not found: {p}") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{p}: not a readable TOML file: {exc}") from exc
    return AlertsConfig.from_dict(data, where=p.name)


def _rule(name: str, table: Mapping[str, Any], base: RuleConfig, where: str) -> RuleConfig:
    here = f"{where}.rules.{name}"
    allowed = _RULE_KEYS[name]
    unknown = set(table) - allowed
    if unknown:
        raise ConfigError(f"{here}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    changes: dict[str, Any] = {}
    for key, value in table.items():
        at = f"{here}.{key}"
        if key in ("enabled", "use_budget"):
            if not isinstance(value, bool):
                raise ConfigError(f"{at}: expected true or false")
            changes[key] = value
        elif key == "severity":
            if value not in _SEVERITIES:
                raise ConfigError(f"{at}: {value!r} is not one of {list(_SEVERITIES)}")
            changes[key] = value
        elif key in ("windows", "min_inferences"):
            changes[key] = _int(value, at, lo=1 if key == "windows" else 0)
        elif key in ("threshold", "threshold_ms"):
            changes["threshold"] = _num(value, at)
        elif key in ("for_s", "period_s"):
            changes[key] = _num(value, at)
        elif key == "models":
            changes[key] = {str(k): _num(v, f"{at}.{k}") for k, v in _table(value, at).items()}
    if name == "outlier_rate" and not 0 <= changes.get("threshold", 0.0) <= 1:
        raise ConfigError(f"{here}.threshold: an outlier rate is a fraction in [0, 1]")
    return replace(base, **changes)


def _table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
    return value


def _num(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if value < 0:
        raise ConfigError(f"{where}: {value} is negative")
    return float(value)


def _int(value: Any, where: str, lo: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ConfigError(f"{where}: expected an integer >= {lo}, got {value!r}")
    return value
