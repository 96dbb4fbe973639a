"""Collector ingest rate next to a bare paho subscriber, and loss at 200 devices.

Acceptance figures for the collector (docs/collector.md), measured in one run on one private
Mosquitto started from examples/mosquitto/collector.conf:

1. **Ingest rate.** A backlog of telemetry windows from simulated devices waits in a persistent
   session; then the subscriber connects and drains it. The bare subscriber only counts
   messages (paho acknowledges each on receipt); the collector validates each one, stores it in
   SQLite and acknowledges it after the commit. Rate = messages / (last stored or counted -
   first received). Repeated with the order alternating; the ratio of the medians must be
   >= 0.7.
2. **Loss.** 200 simulated devices (one MQTT connection each, with Last Will and birth) send a
   telemetry window every second for 60 s while the collector runs; every message the broker
   acknowledged must be in the store exactly once, with no gaps.

    .venv/bin/python benchmarks/collector_ingest.py                 # the acceptance run
    .venv/bin/python benchmarks/collector_ingest.py --quick         # smaller, for a smoke test
    .venv/bin/python benchmarks/collector_ingest.py --postgres postgresql://postgres@127.0.0.1/test

Prints a table and writes JSON (default benchmarks/results/collector_ingest.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

from collector.service import Collector, CollectorConfig  # noqa: E402
from collector.simulate import SimConfig, SimulatedFleet  # noqa: E402
from collector.store import open_store  # noqa: E402

EXAMPLE_CONF = ROOT / "examples" / "mosquitto" / "collector.conf"
RECEIVE_MAXIMUM = 10_000


# --- a private broker from the shipped config -----------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """mosquitto -c <examples/mosquitto/collector.conf with a private port and directory>."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        keep = []
        for line in EXAMPLE_CONF.read_text().splitlines():
            word = line.split("#", 1)[0].strip().split(" ", 1)[0]
            if word in ("listener", "password_file", "allow_anonymous", "persistence_location"):
                continue
            keep.append(line)
        keep += [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence_location {workdir}/",
            f"log_dest file {workdir}/mosquitto.log",
        ]
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text("\n".join(keep) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def __enter__(self) -> Broker:
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([mosquitto, "-c", str(self.conf)], stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read() if self.proc.stderr else b""
                    raise RuntimeError(f"mosquitto failed: {err!r}") from None
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(20)


def mosquitto_version() -> str:
    out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout
    return out.splitlines()[0] if out else "?"


# --- subscribers ----------------------------------------------------------------------------


def _connect_props() -> Properties:
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    props.ReceiveMaximum = RECEIVE_MAXIMUM
    return props


def register_session(broker: Broker, client_id: str, pattern: str) -> None:
    """Create a persistent session subscribed to ``pattern``, then leave: messages queue."""
    done = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=MQTTProtocolVersion.MQTTv5)  # fmt: skip
    c.on_connect = lambda c, u, f, rc, p: c.subscribe(pattern, qos=1)
    c.on_subscribe = lambda *a: done.set()
    c.connect("127.0.0.1", broker.port, 30, clean_start=False, properties=_connect_props())
    c.loop_start()
    if not done.wait(10):
        raise RuntimeError("no SUBACK")
    c.disconnect()
    c.loop_stop()


class BareCounter:
    """paho and nothing else: count messages (paho acknowledges each on receipt)."""

    def __init__(self, broker: Broker, client_id: str, pattern: str) -> None:
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=MQTTProtocolVersion.MQTTv5)  # fmt: skip
        self.client.on_message = self._on_message
        self.broker = broker  # the session holds the subscription (see register_session)

    def _on_message(self, c: Any, u: Any, m: Any) -> None:
        now = time.time()
        if self.first is None:
            self.first = now
        self.count += 1
        self.last = now

    def start(self) -> BareCounter:
        self.client.connect(
            "127.0.0.1", self.broker.port, 30, clean_start=False, properties=_connect_props()
        )
        self.client.loop_start()
        return self

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def publish_backlog(broker: Broker, fleet: str, devices: int, per_device: int) -> int:
    sim = SimulatedFleet(SimConfig(broker.url, fleet=fleet, devices=devices, prefix="dev"))
    sim.connect()
    for _ in range(per_device):
        sim.publish_round()
    if not sim.wait_acked(300):
        raise RuntimeError("the broker did not acknowledge the backlog")
    sim.close(goodbye=False)
    return sum(len(v["seqs"]) for v in sim.published.values())


def rate_bare(broker: Broker, n: int, devices: int) -> dict[str, Any]:
    fleet = f"rb{uuid.uuid4().hex[:6]}"
    cid = f"bare-{fleet}"
    register_session(broker, cid, f"edgeship/{fleet}/#")
    total = publish_backlog(broker, fleet, devices, n // devices)
    sub = BareCounter(broker, cid, f"edgeship/{fleet}/#").start()
    cpu0 = time.process_time()
    deadline = time.monotonic() + 600
    while sub.count < total and time.monotonic() < deadline:
        time.sleep(0.01)
    cpu = time.process_time() - cpu0
    sub.stop()
    assert sub.first is not None and sub.last is not None
    elapsed = sub.last - sub.first
    return {
        "subscriber": "bare paho (count only)",
        "messages": sub.count,
        "expected": total,
        "seconds": elapsed,
        "rate": (sub.count - 1) / elapsed,
        "cpu_us_per_msg": cpu / max(sub.count, 1) * 1e6,
    }


def rate_collector(
    broker: Broker,
    n: int,
    devices: int,
    store_url: str,
    worker: str,
    label: str,
    workers: int = 2,
) -> dict[str, Any]:
    fleet = f"rc{uuid.uuid4().hex[:6]}"
    cid = f"collector-{fleet}"
    register_session(broker, cid, f"edgeship/{fleet}/#")
    total = publish_backlog(broker, fleet, devices, n // devices)
    config = CollectorConfig(
        broker.url, fleet=fleet, store_url=store_url, http=None, client_id=cid,
        worker=worker, workers=workers, receive_maximum=RECEIVE_MAXIMUM,  # type: ignore[arg-type]
    )  # fmt: skip
    cpu0 = time.process_time()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    collector = Collector(config).start()
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            s = collector.stats
            if s.stored >= total:
                break
            time.sleep(0.01)
        s = collector.stats
        cpu = time.process_time() - cpu0
    finally:
        collector.stop()
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    worker_cpu = (children1.ru_utime + children1.ru_stime) - (
        children0.ru_utime + children0.ru_stime
    )
    worker_cpu -= _worker_startup_cpu(broker, store_url, worker, workers)
    store = open_store(store_url)
    try:
        counts = store.count_messages(fleet)
    finally:
        _cleanup_store(store)
    assert s.first_received_at is not None and s.last_commit_at is not None
    elapsed = s.last_commit_at - s.first_received_at
    return {
        "subscriber": label,
        "messages": s.stored,
        "expected": total,
        "stored_in_db": counts.get("telemetry", 0),
        "duplicates": s.duplicates,
        "dead_letters": s.dead_letters,
        "batches": s.batches,
        "seconds": elapsed,
        "rate": s.stored / elapsed,
        "cpu_us_per_msg": cpu / max(s.stored, 1) * 1e6,
        "worker_cpu_us_per_msg": worker_cpu / max(s.stored, 1) * 1e6,
    }


_STARTUP_CPU: dict[tuple[str, int], float] = {}


def _worker_startup_cpu(broker: Broker, store_url: str, worker: str, workers: int) -> float:
    """CPU seconds the workers spend starting and stopping (imports, store) with no message:
    subtracted, so the per-message figure is the steady state."""
    key = (worker, workers)
    if key not in _STARTUP_CPU:
        fleet = f"idle{uuid.uuid4().hex[:6]}"
        config = CollectorConfig(
            broker.url, fleet=fleet, store_url=store_url, http=None, client_id=f"idle-{fleet}",
            worker=worker, workers=workers,  # type: ignore[arg-type]
        )  # fmt: skip
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        Collector(config).start().stop()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        _STARTUP_CPU[key] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return _STARTUP_CPU[key]


def _cleanup_store(store: Any) -> None:
    if getattr(store, "schema", None):
        store.drop_schema()
    store.close()


# --- loss at 200 devices --------------------------------------------------------------------


def loss_run(
    broker: Broker, store_url: str, devices: int, period: float, duration: float, workdir: Path
) -> dict[str, Any]:
    fleet = f"loss{uuid.uuid4().hex[:6]}"
    config = CollectorConfig(
        broker.url, fleet=fleet, store_url=store_url, http="127.0.0.1:0",
        client_id=f"collector-{fleet}", receive_maximum=RECEIVE_MAXIMUM,
    )  # fmt: skip
    register_session(broker, f"bare-{fleet}", f"edgeship/{fleet}/#")
    bare = BareCounter(broker, f"bare-{fleet}", f"edgeship/{fleet}/#").start()
    collector = Collector(config).start()
    report = workdir / f"{fleet}.json"
    try:
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "collector.simulate", "--broker", broker.url,
             "--fleet", fleet, "--devices", str(devices), "--prefix", "pi",
             "--period", str(period), "--duration", str(duration), "--report", str(report)],
            cwd=ROOT, capture_output=True, text=True, timeout=duration + 300,
        )  # fmt: skip
        if proc.returncode != 0:
            raise RuntimeError(f"simulator failed: {proc.stderr[-2000:]}")
        published = json.loads(report.read_text())
        expected = published["messages"]
        deadline = time.monotonic() + 120
        while collector.stats.stored < expected and time.monotonic() < deadline:
            time.sleep(0.1)
        wall = time.monotonic() - t0
        stats = collector.stats
        snapshot = collector.state.snapshot()
    finally:
        collector.stop()
        bare.stop()
    store = open_store(store_url)
    try:
        ranges = store.boot_ranges(fleet)
        counts = store.count_messages(fleet)
        missing_keys = 0
        extra = 0
        by_device = {(r.device, r.boot): r for r in ranges}
        for device, info in published["devices"].items():
            r = by_device.get((device, info["boot"]))
            seqs = info["seqs"]
            if r is None:
                missing_keys += len(seqs)
                continue
            # Stored count equals published count, and the stored range is the published one:
            # with the store's unique key, that is every message exactly once.
            missing_keys += max(0, len(seqs) - r.messages)
            extra += max(0, r.messages - len(seqs))
            if (r.min_seq, r.max_seq) != (min(seqs), max(seqs)):
                missing_keys += 1
    finally:
        _cleanup_store(store)
    stored_total = sum(counts.values())
    return {
        "devices": devices,
        "period_s": period,
        "duration_s": duration,
        "published_acked": expected,
        "stored": stored_total,
        "stored_by_kind": counts,
        "missing": missing_keys,
        "extra": extra,
        "duplicates_dropped": stats.duplicates,
        "dead_letters": stats.dead_letters,
        "gaps": sum(d.gaps.missing for d in snapshot.devices),
        "bare_subscriber_received": bare.count,
        "wall_s": wall,
        "loss": missing_keys,
    }


# --- main -----------------------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--backlog", type=int, default=40_000, help="messages per rate run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--duration", type=float, default=60.0, help="loss run length (s)")
    p.add_argument("--period", type=float, default=1.0, help="loss run: s between windows")
    p.add_argument("--postgres", help="also measure a PostgreSQL collector (URL)")
    p.add_argument("--thread-worker", action="store_true", help="also measure worker=thread")
    p.add_argument("--workers", type=int, default=2, help="collector worker processes")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    p.add_argument("--skip-loss", action="store_true")
    p.add_argument("--json", type=Path, default=ROOT / "benchmarks/results/collector_ingest.json")
    args = p.parse_args()
    if args.quick:
        args.backlog, args.repeats, args.duration = 4000, 1, 10.0
    workdir = Path(tempfile.mkdtemp(prefix="edgeship-ingest-"))
    results: dict[str, Any] = {
        "host": {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg(),
            "mosquitto": mosquitto_version(),
        },
        "config": vars(args) | {"json": str(args.json)},
        "rate": [],
    }
    try:
        with Broker(workdir) as broker:
            for rep in range(args.repeats):
                order = ["bare", "sqlite"] if rep % 2 == 0 else ["sqlite", "bare"]
                for kind in order:
                    if kind == "bare":
                        row = rate_bare(broker, args.backlog, args.devices)
                    else:
                        db = workdir / f"rate-{rep}.db"
                        row = rate_collector(broker, args.backlog, args.devices,
                                             f"sqlite:///{db}", "process",
                                             "collector, SQLite", args.workers)  # fmt: skip
                    row["repeat"] = rep
                    results["rate"].append(row)
                    print(f"  {row['subscriber']:<32} {row['rate']:>9.0f} msg/s "
                          f"({row['messages']} in {row['seconds']:.2f} s; CPU/msg "
                          f"{row.get('cpu_us_per_msg', 0):.0f} us + worker "
                          f"{row.get('worker_cpu_us_per_msg', 0):.0f} us)", flush=True)  # fmt: skip
            if args.thread_worker:
                db = workdir / "rate-thread.db"
                row = rate_collector(broker, args.backlog, args.devices, f"sqlite:///{db}",
                                     "thread", "collector, SQLite, worker=thread")  # fmt: skip
                results["rate"].append(row)
            if args.postgres:
                schema = f"bench_{uuid.uuid4().hex[:8]}"
                sep = "&" if "?" in args.postgres else "?"
                row = rate_collector(broker, args.backlog, args.devices,
                                     f"{args.postgres}{sep}schema={schema}", "process",
                                     "collector, PostgreSQL")  # fmt: skip
                results["rate"].append(row)
            if not args.skip_loss:
                db = workdir / "loss.db"
                results["loss"] = loss_run(broker, f"sqlite:///{db}", args.devices,
                                           args.period, args.duration, workdir)  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    bare = [r["rate"] for r in results["rate"] if r["subscriber"].startswith("bare")]
    sqlite = [r["rate"] for r in results["rate"] if r["subscriber"] == "collector, SQLite"]
    ratio = statistics.median(sqlite) / statistics.median(bare)
    # Each repeat measures both back to back, so a pair shares the machine's load of the moment.
    pairs = [c / b for b, c in zip(bare, sqlite, strict=False)]
    results["summary"] = {
        "bare_rate_median": statistics.median(bare),
        "collector_sqlite_rate_median": statistics.median(sqlite),
        "ratio": ratio,
        "pair_ratios": pairs,
        "pair_ratio_median": statistics.median(pairs),
        "ratio_ok": ratio >= 0.7,
        "loadavg_end": os.getloadavg(),
    }
    _print_table(results)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nJSON written to {args.json}")
    _plot(results, args.json.with_suffix(".png"))
    loss_ok = args.skip_loss or results["loss"]["loss"] == 0
    return 0 if ratio >= 0.7 and loss_ok else 1


def _plot(results: dict[str, Any], path: Path) -> None:
    """Ingest rate per repeat, bare subscriber against the collector, as a PNG."""
    try:
        import matplotlib
    except ImportError:
        print("plot skipped: matplotlib is not installed (pip install -e '.[dev]')")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = results["summary"]
    pairs = summary["pair_ratios"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(range(len(pairs)), pairs, color="#4a7")
    ax.axhline(0.7, color="#b42318", linestyle="--", label="target 0.7")
    ax.set_xlabel("repeat (bare subscriber and collector measured back to back)")
    ax.set_ylabel("collector rate / bare rate")
    ax.set_title(
        f"collector ingest (SQLite): median {summary['collector_sqlite_rate_median']:.0f} msg/s "
        f"vs bare {summary['bare_rate_median']:.0f} msg/s"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


def _print_table(results: dict[str, Any]) -> None:
    print("\nIngest rate (backlog drained from a persistent session, same broker)")
    print(f"{'subscriber':<36}{'repeat':>7}{'messages':>10}{'seconds':>9}{'msg/s':>9}")
    for r in results["rate"]:
        print(f"{r['subscriber']:<36}{r.get('repeat', '-')!s:>7}{r['messages']:>10}"
              f"{r['seconds']:>9.2f}{r['rate']:>9.0f}")  # fmt: skip
    s = results["summary"]
    print(f"median: bare {s['bare_rate_median']:.0f} msg/s, collector+SQLite "
          f"{s['collector_sqlite_rate_median']:.0f} msg/s, ratio {s['ratio']:.2f} "
          f"({'meets' if s['ratio_ok'] else 'MISSES'} >= 0.7); per repeat "
          f"{', '.join(f'{r:.2f}' for r in s['pair_ratios'])}")  # fmt: skip
    loss = results.get("loss")
    if loss:
        print(f"\nLoss: {loss['devices']} devices x 1 window / {loss['period_s']:g} s x "
              f"{loss['duration_s']:g} s")  # fmt: skip
        for key in ("published_acked", "stored", "missing", "extra", "gaps",
                    "duplicates_dropped", "dead_letters", "bare_subscriber_received"):  # fmt: skip
            print(f"  {key:<26}{loss[key]}")


if __name__ == "__main__":
    sys.exit(main())
