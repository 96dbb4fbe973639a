"""The ``edgeship`` command: arguments in, one library call, a report out.

One module per command (``quantize``, ``bench``, ``optimize``, ``deploy``, ``inspect``,
``targets``, ``demo``, ``collect``, ``fleet``; ``keys``/``sign``/``verify``/``encrypt`` in
``sdk.trust_cli``), each registering its own parser and handler; :mod:`sdk.cli.app` builds the
root parser and maps outcomes to exit codes; :mod:`sdk.cli.common` holds what commands share.

Exit codes (stable; scripts rely on them):

* 0 — success (for ``bench``/``optimize`` with a budget: the budget is met)
* 1 — the work ran, but no candidate / the model does not meet the budget (report written)
* 2 — bad input: a missing file, malformed budget, unknown target, data not matching the model
* 3 — an unexpected internal error (a bug: rerun with ``--debug`` and report the traceback)
* 130 — interrupted (Ctrl-C)
"""

from __future__ import annotations

from sdk.cli.app import build_parser, main
from sdk.cli.common import EXIT_BAD_INPUT, EXIT_BUDGET, EXIT_INTERNAL, EXIT_OK

__all__ = ["EXIT_BAD_INPUT", "EXIT_BUDGET", "EXIT_INTERNAL", "EXIT_OK", "build_parser", "main"]
