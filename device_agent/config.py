"""Settings for ``edgeship-agent run``: TOML file, environment, command line, in that order.

Every field of :class:`~device_agent.agent.AgentConfig` and :class:`RunConfig` can be set in
``agent.toml`` (top level or an ``[agent]`` table), as ``EDGESHIP_AGENT_<FIELD>`` in the
environment (``EDGESHIP_AGENT_BROKER_URL=mqtt://hub:1883``), or on the command line; a later
source wins. Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.agent import AgentConfig
from device_agent.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 boards (Jetson JetPack 6)
    import tomli as tomllib

__all__ = ["ENV_PREFIX", "RunConfig", "load_settings"]

ENV_PREFIX = "EDGESHIP_AGENT_"


@dataclass(frozen=True)
class RunConfig:
    """What the service does besides the agent's own settings.

    ``http`` is ``host:port`` for the local inference endpoint (``off`` disables it); it binds
    127.0.0.1 by default so only processes on the board can reach it. ``replay`` feeds inputs
    from an ``.npz`` keyed by input name at ``replay_rate`` inputs per second, ``replay_loops``
    times over (0 = forever); ``replay_log`` records each replayed input's index, score and
    outlier flag as JSON lines (for demos and tests that check detection against ground truth).
    """

    bundle: Path | None = None
    http: str = "127.0.0.1:8765"
    replay: Path | None = None
    replay_rate: float = 10.0
    replay_loops: int = 0
    replay_log: Path | None = None
    log_level: str = "info"

    def http_address(self) -> tuple[str, int] | None:
        if self.http.lower() in ("", "off", "none", "false", "0"):
            return None
        host, sep, port = self.http.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"http: {self.http!r} is not host:port (or 'off')")
        return host or "127.0.0.1", int(port)


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_AGENT_FIELDS = _fields(AgentConfig)
_RUN_FIELDS = _fields(RunConfig)


def _convert(name: str, value: Any, hint: Any, source: str) -> Any:
    """Turn a TOML value or an environment string into the field's type."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            return None
        hint = next(a for a in args if a is not type(None))
    if Path in typing.get_args(hint):  # Path | str: settings always give a path
        hint = Path
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if hint is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if hint is Path:
            return Path(str(value)).expanduser()
        if hint is str:
            if not isinstance(value, str | int | float):
                raise ValueError("expected a string")
            return str(value)
        if origin is tuple or (isinstance(hint, types.GenericAlias) and origin is tuple):
            items = value.split(",") if isinstance(value, str) else list(value)
            return tuple(str(i).strip() for i in items if str(i).strip())
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {name} = {value!r}: {exc}") from exc
    raise ConfigError(f"{source}: {name} has an unsupported type {hint}")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    table = data.pop("agent", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [agent] must be a table")
    return {**data, **table}


def load_settings(
    toml_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[AgentConfig, RunConfig]:
    """Merge defaults < TOML file < environment < ``overrides`` (the command line; None values
    are ignored) into typed configs."""
    agent: dict[str, Any] = {}
    run: dict[str, Any] = {}

    def put(name: str, value: Any, source: str) -> None:
        key = name.replace("-", "_")
        if key in _AGENT_FIELDS:
            agent[key] = _convert(key, value, _AGENT_FIELDS[key], source)
        elif key in _RUN_FIELDS:
            run[key] = _convert(key, value, _RUN_FIELDS[key], source)
        else:
            known = ", ".join(sorted({*_AGENT_FIELDS, *_RUN_FIELDS}))
            raise ConfigError(f"{source}: unknown setting {name!r}; known settings: {known}")

    if toml_path is not None:
        for key, value in _read_toml(toml_path).items():
            put(key, value, str(toml_path))
    for key, value in (env or {}).items():
        if key.startswith(ENV_PREFIX):
            put(key[len(ENV_PREFIX) :].lower(), value, f"environment {key}")
    for key, value in (overrides or {}).items():
        if value is not None:
            put(key, value, f"--{key.replace('_', '-')}")
    return AgentConfig(**agent), RunConfig(**run)
