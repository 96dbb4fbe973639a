"""The collector's telemetry fast path next to the reference decoder, per message.

``collector.ingest`` parses ordinary telemetry windows with a flat fast path and hands
anything unusual to ``device_agent.contracts.messages.decode`` (the reference). The tests prove
the two agree on every input; this script measures what the fast path saves, side by side in
one run (best of ``--reps`` rounds of ``--n`` calls each, the two interleaved):

    .venv/bin/python benchmarks/ingest_fast_path.py
    .venv/bin/python benchmarks/ingest_fast_path.py --n 2000 --reps 9

Prints microseconds per message for each and the ratio; exits 1 if the fast path was not
taken (a message it should accept went to the reference decoder).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from collector import ingest as ingest_module
from collector.fast_telemetry import fast_telemetry
from device_agent.contracts.messages import (
    LATENCY_BUCKETS_MS,
    SCORE_BUCKETS,
    Histogram,
    LatencySummary,
    TelemetryMessage,
    Throttled,
    decode,
    encode,
    topic,
)

NOW = 1_790_000_000.0


def window() -> TelemetryMessage:
    lat = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    lat[9], lat[10], lat[12] = 30, 60, 10
    scores = [0] * (len(SCORE_BUCKETS) + 1)
    scores[5], scores[11] = 95, 5
    return TelemetryMessage(
        device="pi-1", boot="b00t", seq=5, ts=NOW, window_start=NOW - 10, window_s=10.0,
        inferences=100, errors=1,
        latency_ms=LatencySummary(Histogram(LATENCY_BUCKETS_MS, tuple(lat)), 1.2, 2.9, 4.8, 5.0),
        outliers=5, scores=Histogram(SCORE_BUCKETS, tuple(scores)),
        predictions={"cat": 60, "dog": 40}, model="digits", model_version="3",
        cpu_percent=25.0, system_cpu_percent=40.0, rss_bytes=50_000_000,
        mem_available_bytes=2_000_000_000, temperature_c=61.5, throttled=Throttled(0x50005),
        spool_depth=2, spool_dropped=7, drops_since_last=3,
    )  # fmt: skip


def best_us(fn: Callable[[], object], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="calls per round (default 1000)")
    parser.add_argument("--reps", type=int, default=7, help="rounds, best kept (default 7)")
    args = parser.parse_args()

    name = topic("fleet", "pi-1", "telemetry")
    payload = encode(window())
    took_fast = fast_telemetry("fleet", "pi-1", payload, NOW) is not None
    fast_us, ref_us = float("inf"), float("inf")
    for _ in range(args.reps):
        fast_us = min(fast_us, best_us(lambda: ingest_module.ingest(name, payload, NOW), args.n))
        ref_us = min(ref_us, best_us(lambda: decode(name, payload), args.n))
    print(f"payload {len(payload)} B, best of {args.reps} x {args.n} calls")
    print(f"  ingest (fast path, record built)   {fast_us:8.2f} us/message")
    print(f"  decode (reference, message only)   {ref_us:8.2f} us/message")
    print(f"  ratio reference / fast             {ref_us / fast_us:8.2f}x")
    if not took_fast:
        print("the fast path refused an ordinary window: it went to the reference decoder")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
