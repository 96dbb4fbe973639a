"""Child processes that do not outlive the process that started them.

A process stopped cleanly stops its children itself (``edgeship demo`` does, on SIGINT, SIGTERM
and SIGHUP). One killed outright (SIGKILL, the OOM killer, a crash) runs no code at all, so its
children would keep running as orphans: an embedded broker, a collector, agents replaying at full
speed. :func:`die_with_parent` returns a ``preexec_fn`` for :class:`subprocess.Popen` that asks
Linux to send the child SIGTERM when its parent dies (``prctl(PR_SET_PDEATHSIG)``); the setting
survives the child's ``exec``. Elsewhere it returns ``None`` and children are only stopped by
the clean path.

Two caveats of PR_SET_PDEATHSIG, and what this module does about them:

* The signal comes when the *thread* that forked the child exits, not the whole process. So the
  setting is only made for children started from the main thread (whose end is the process's
  end); a child started from another thread gets none.
* ``preexec_fn`` runs in the child between ``fork`` and ``exec``, where another thread of the
  parent may have held a lock at the moment of the fork. The function therefore does no
  imports, no allocation-heavy work and no logging: libc's ``prctl`` is looked up in the
  parent, beforehand, and the child only calls it and ``getppid``.

If the parent died before the child made the call, no signal would ever come; the child then
finds a parent id other than the one recorded before the fork, and exits at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
from collections.abc import Callable

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` that has the child receive ``sig`` when this process dies, or ``None``
    where that cannot be set up (not Linux, libc without prctl, not the main thread)."""
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()
    signum = int(sig)

    def preexec() -> None:
        # In the child, before exec: no imports, no logging (see the module docstring).
        if prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
            return  # refused (it never is on Linux): the clean path still stops the child
        if os.getppid() != parent:  # the parent died before the call above
            os._exit(1)

    return preexec
