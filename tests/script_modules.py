"""Load a script that is not part of a package (``scripts/board_envs.py``, an example's app) as a
module by its path, so tests can call its functions the way its own command line does."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["load_script"]


def load_script(name: str, path: Path) -> ModuleType:
    """Execute ``path`` as the module ``name``. It is put in ``sys.modules`` before it runs:
    dataclasses and ``from __future__ import annotations`` look their module up there."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
