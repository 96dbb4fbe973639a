"""Where edgeship keeps what it can rebuild: one rule for every cache of the host SDK.

``$EDGESHIP_CACHE_DIR/<kind>``, else ``$XDG_CACHE_HOME/edgeship/<kind>``, else
``~/.cache/edgeship/<kind>``: calibration tensors (``calibration``) and models rewritten on
reading (``converted``).
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["edgeship_cache"]


def edgeship_cache(kind: str) -> Path:
    """The folder of the cache named ``kind`` (not created here)."""
    root = os.environ.get("EDGESHIP_CACHE_DIR")
    if root:
        return Path(root) / kind
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "edgeship" / kind
