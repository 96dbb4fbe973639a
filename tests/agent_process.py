"""The real :class:`device_agent.Agent` in a process of its own, for fault tests that need
to do things to that process (limit its file sizes, SIGKILL it)::

    python -m tests.agent_process --bundle DIR --broker URL --fleet F --device D \\
        --state DIR [--window 0.2] [--fsize-limit BYTES]

It runs inference on random inputs in a loop, prints one JSON line of ``Agent.stats()`` every
0.2 s (``{"event": "stats", ...}``) and, after SIGTERM and a clean ``close()``, a last one with
``"event": "closed"``. ``--fsize-limit`` is a full disk: files this process writes cannot grow
past that many bytes (RLIMIT_FSIZE with SIGXFSZ ignored, so writes fail with EFBIG as they
would with ENOSPC); SIGUSR1 lifts the limit (space freed).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="tests.agent_process")
    p.add_argument("--bundle", required=True)
    p.add_argument("--broker", required=True)
    p.add_argument("--fleet", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--window", type=float, default=0.2)
    p.add_argument("--fsize-limit", type=int)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(message)s"
    )
    if args.fsize_limit is not None:
        from tests.brokers import fill_disk_at

        fill_disk_at(args.fsize_limit)

    import numpy as np

    from device_agent import Agent, AgentConfig

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    config = AgentConfig(
        device_id=args.device,
        fleet=args.fleet,
        broker_url=args.broker,
        state_dir=args.state,
        window_s=args.window,
    )
    agent = Agent.from_bundle(args.bundle, config).start()
    (spec,) = agent.bundle.manifest.io.inputs
    shape = [1 if not isinstance(d, int) else d for d in spec.shape]
    rng = np.random.default_rng(0)

    def emit(event: str) -> None:
        print(json.dumps({"event": event, "t": time.time(), **agent.stats}), flush=True)

    emit("started")
    next_stats = 0.0
    while not stop.is_set():
        agent.predict({spec.name: rng.normal(size=shape).astype(np.float32)})
        if time.monotonic() >= next_stats:
            emit("stats")
            next_stats = time.monotonic() + 0.2
        stop.wait(0.01)
    agent.close(flush_timeout_s=10.0)
    emit("closed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
