"""The collector's errors, under the shared :class:`~device_agent.errors.EdgeshipError` root.

::

    EdgeshipError (device_agent.errors)
    ├── ConfigError          a collector setting is invalid (broker or store URL, address...)
    └── CollectorError       the collector cannot go on
        ├── StoreError       the store cannot be opened, migrated or written
        └── BrokerError      the broker refused the collector (credentials, protocol)

A message that breaks the wire contract is not an error here: it becomes a dead letter.
"""

from __future__ import annotations

from device_agent.errors import ConfigError, EdgeshipError

__all__ = ["BrokerError", "CollectorError", "ConfigError", "StoreError"]


class CollectorError(EdgeshipError):
    """The collector cannot go on."""


class StoreError(CollectorError):
    """The store cannot be opened, migrated or written; the message says which and why."""


class BrokerError(CollectorError):
    """The broker refused the collector for a reason retrying will not fix."""
