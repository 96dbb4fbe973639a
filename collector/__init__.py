"""The fleet collector: subscribe to a fleet's MQTT topics, validate, store, serve its state.

Modules, each owning one stage (see ``docs/collector.md``):

* :mod:`~collector.ingest`: ``(topic, payload, received_at)`` -> record or dead letter;
  pure, no I/O. Its results are :mod:`~collector.records`; telemetry takes
  :mod:`~collector.fast_telemetry` first.
* :mod:`~collector.store`: the :class:`~collector.store.Store` protocol, SQLite and
  PostgreSQL implementations, schema versions, batch inserts deduplicated by the store.
* :mod:`~collector.state`: online / offline / stale, latency percentiles, outlier rate,
  gaps, derived from the store with an injectable clock.
* :mod:`~collector.service`: :class:`Collector`, composed of :mod:`~collector.session` (the
  persistent MQTT session: v5 with a 3.1.1 fallback, shared subscriptions, acks per
  connection), :mod:`~collector.pipeline` (batching, manual acks after commit) with its
  :mod:`~collector.worker` processes, and :mod:`~collector.commands`; configured by
  :mod:`~collector.config`.
* :mod:`~collector.api`: the JSON API (reads open; sending commands needs the API token).
* :mod:`~collector.alerts` (with :mod:`~collector.alert_config`,
  :mod:`~collector.alert_rules`, :mod:`~collector.alert_history`) and :mod:`~collector.drift`:
  what the monitor evaluates.
* :mod:`~collector.sim_fleet`: a fleet of simulated devices, for benchmarks, tests, demos
  (``python -m collector.simulate`` runs one).
* :mod:`~collector.program`: the composition root: builds the collector (subscriber, store,
  HTTP API) and its monitor from one config, and runs them until a signal.
* :mod:`~collector.cli`: the command line, ``edgeship-collector`` (the same options as
  ``edgeship collect``, which calls it) and ``python -m collector.simulate``.

The names below are imported on first use, so ``import collector`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "Collector": "collector.service",
    "CollectorConfig": "collector.service",
    "CollectorStats": "collector.service",
    "run_collector": "collector.program",
    "FleetState": "collector.state",
    "StateConfig": "collector.state",
    "Store": "collector.store",
    "open_store": "collector.store",
    "CollectorError": "collector.errors",
    "StoreError": "collector.errors",
    "BrokerError": "collector.errors",
}

__all__ = [
    "BrokerError",
    "Collector",
    "CollectorConfig",
    "CollectorError",
    "CollectorStats",
    "FleetState",
    "StateConfig",
    "Store",
    "StoreError",
    "open_store",
    "run_collector",
]

if TYPE_CHECKING:
    from collector.errors import BrokerError, CollectorError, StoreError
    from collector.program import run_collector
    from collector.service import Collector, CollectorConfig, CollectorStats
    from collector.state import FleetState, StateConfig
    from collector.store import Store, open_store


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'collector' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
