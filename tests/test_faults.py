"""The fault and load suite (marker ``faults``; docs/reliability.md reports its figures).

Real processes everywhere: a test-owned Mosquitto with persistence (tests/brokers.py), the
agent's spool and publisher in a subprocess (the stand-in of tests/brokers.py, which reacts to
a failed window as the agent does), the collector service with its SQLite store, and a TCP proxy
(tests/proxy.py) for the partitions. Each test compares what the devices produced with what
the store holds (lost, stored twice, sequence gaps), records how long recovery took, and
asserts that every process came back on its own. Timings are figures, never pass/fail, except
generous deadlines (a recovery that takes minutes is a failure).

Other fault tests live with the code they exercise and carry the marker too: tests/test_outage.py
(broker down 31 s, the agent SIGKILLed mid-spool, the spool's byte bound reached) and
tests/test_collector_service.py (the collector SIGKILLed mid-stream).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from collector.service import Collector, CollectorConfig
from tests.brokers import (
    MOSQUITTO,
    ROOT,
    Mosquitto,
    Producer,
    free_port,
    producer_process,
    wait_for,
)
from tests.brokers import (
    Collector as Subscriber,
)
from tests.faults_report import record
from tests.proxy import TcpProxy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.faults,
    pytest.mark.skipif(shutil.which(MOSQUITTO) is None, reason="needs mosquitto"),
]

RECOVERY_DEADLINE_S = 90.0  # a generous bound: the figures are in the doc, not in asserts
PERIOD_S = 0.2

# As examples/mosquitto/collector.conf: persistence with a periodic save, room in flight.
BROKER_CONF = "autosave_interval 30\nmax_inflight_messages 1000"


# --- the rig: broker, collector service, stand-in agents, the store's view --------------------


class Rig:
    """One fleet: the collector service (fixed client id, persistent session) writing to a
    SQLite store, stand-in agents, and audits of the store against what the agents made."""

    def __init__(self, tmp: Path, broker: Mosquitto, stack: contextlib.ExitStack) -> None:
        self.tmp = tmp
        self.broker = broker
        self.stack = stack
        self.fleet = f"faults{uuid.uuid4().hex[:8]}"
        self.db = tmp / "fleet.db"
        self.client_id = f"collector-{self.fleet}"
        self.collector: Collector | None = None
        self.producers: dict[str, list[Producer]] = {}
        self.collector_starts = 0

    # collector

    def start_collector(self, **over: Any) -> Collector:
        values: dict[str, Any] = dict(
            broker_url=self.broker.url,
            fleet=self.fleet,
            store_url=f"sqlite:///{self.db}",
            http=None,
            client_id=self.client_id,
            worker="thread",
            keepalive_s=5,
            batch_interval_s=0.05,
        )
        values.update(over)
        c = Collector(CollectorConfig(**values)).start()
        self.stack.callback(c.stop)
        self.collector = c
        self.collector_starts += 1
        return c

    def stop_collector(self) -> None:
        assert self.collector is not None
        self.collector.stop()
        self.collector = None

    # agents

    def start_agent(self, device: str, url: str, **kw: Any) -> Producer:
        spool = self.tmp / f"spool-{device}.db"
        p = self.stack.enter_context(
            producer_process(spool, url, device=device, fleet=self.fleet, **kw)
        )
        self.producers.setdefault(device, []).append(p)
        return p

    def agents(self) -> list[Producer]:
        """The running stand-in of each device (the newest process)."""
        return [runs[-1] for runs in self.producers.values()]

    def produced(self) -> dict[str, set[int]]:
        """Telemetry seqs each device's runs put in their spool so far."""
        return {
            d: {w["seq"] for run in runs for w in run.windows()}
            for d, runs in self.producers.items()
        }

    # the store

    def rows(self) -> list[tuple[str, str, int, str, float, float, str]]:
        if not self.db.exists():
            return []
        db = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(
                "SELECT device, boot, seq, kind, ts, received_at, COALESCE(body, '') "
                "FROM messages WHERE fleet = ?",
                (self.fleet,),
            ).fetchall()
        except sqlite3.OperationalError:  # the collector has not created its schema yet
            return []
        finally:
            db.close()

    def stored_telemetry(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for device, _, seq, kind, *_ in self.rows():
            if kind == "telemetry":
                out.setdefault(device, []).append(seq)
        return out

    def missing(self, wanted: dict[str, set[int]]) -> int:
        stored = self.stored_telemetry()
        return sum(len(seqs - set(stored.get(d, ()))) for d, seqs in wanted.items())

    def wait_stored(self, wanted: dict[str, set[int]], since: float) -> float:
        """Seconds from ``since`` (time.monotonic()) until every seq in ``wanted`` is stored."""
        ok = wait_for(lambda: self.missing(wanted) == 0, RECOVERY_DEADLINE_S, interval=0.1)
        assert ok, f"{self.missing(wanted)} windows still missing after {RECOVERY_DEADLINE_S} s"
        return round(time.monotonic() - since, 2)

    def wait_windows(self, n: int, timeout: float = 60.0) -> None:
        """Until every running agent has put ``n`` more windows in its spool."""
        marks = [(p, len(p.windows())) for p in self.agents()]

        def done() -> bool:
            if any(p.proc.poll() is not None for p, _ in marks):
                return True  # an agent died: fail now, not after the timeout
            return all(len(p.windows()) >= m + n for p, m in marks)

        ok = wait_for(done, timeout) and all(p.proc.poll() is None for p, _ in marks)
        assert ok, [p.stderr[-5:] for p, _ in marks]

    def finish(self) -> dict[str, Any]:
        """SIGTERM every agent (a clean close: spool drained, offline status), wait until the
        store holds everything, and audit it."""
        for p in self.agents():
            assert p.proc.poll() is None, f"an agent died: {''.join(p.stderr)[-3000:]}"
            closed = p.terminate()
            assert closed["depth"] == 0, closed
        produced = self.produced()
        self.wait_stored(produced, time.monotonic())
        time.sleep(0.5)  # the offline statuses, anything else in flight
        return self.audit(produced)

    def audit(self, produced: dict[str, set[int]]) -> dict[str, Any]:
        rows = self.rows()
        keys = [(d, b, s) for d, b, s, *_ in rows]
        tele: dict[str, list[int]] = {}
        every: dict[str, set[int]] = {}
        for d, _, s, kind, *_ in rows:
            every.setdefault(d, set()).add(s)
            if kind == "telemetry":
                tele.setdefault(d, []).append(s)
        sent = sum(len(v) for v in produced.values())
        lost = sum(len(v - set(tele.get(d, ()))) for d, v in produced.items())
        extra = sum(len(set(tele.get(d, ())) - v) for d, v in produced.items())
        gaps = sum(len(set(range(min(s), max(s) + 1)) - s) for s in every.values() if s)
        c = self.collector
        return {
            "sent": sent,
            "stored": sum(len(v) for v in tele.values()),
            "lost": lost,
            "stored twice": len(keys) - len(set(keys)),
            "not sent but stored": extra,
            "seq gaps": gaps,
            "duplicates dropped by the store": None if c is None else c.stats.duplicates,
        }


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    with contextlib.ExitStack() as stack:
        broker = Mosquitto(tmp_path / "broker", extra_conf=BROKER_CONF)
        stack.callback(broker.stop)
        broker.start()
        stack.callback(broker.resume)  # never leave a stopped process behind
        yield Rig(tmp_path, broker, stack)


def assert_exact(fig: dict[str, Any]) -> None:
    assert fig["lost"] == 0, fig
    assert fig["stored twice"] == 0, fig
    assert fig["not sent but stored"] == 0, fig
    assert fig["seq gaps"] == 0, fig
    assert fig["stored"] == fig["sent"], fig


# --- broker restart with persistence ------------------------------------------------------------


def test_broker_restarts_sigterm_and_sigkill_lose_nothing(rig: Rig) -> None:
    """Three agents publish every 0.2 s while the broker is restarted three ways: SIGTERM with
    the collector online, SIGTERM while the collector is away (its queue must survive on
    disk), and SIGKILL with the collector online. Then the agents close and the broker
    restarts once more: their retained offline status must survive it."""
    broker = rig.broker
    rig.start_collector()
    for i in range(3):
        rig.start_agent(f"dev{i}", broker.url, period_s=PERIOD_S)
    rig.wait_windows(5)
    recovery: dict[str, float] = {}

    # 1. SIGTERM, collector online, down 4 s.
    broker.stop()
    time.sleep(4.0)
    broker.start()
    t_up = time.monotonic()
    recovery["SIGTERM, collector online"] = rig.wait_stored(rig.produced(), t_up)

    # 2. The collector away; what the broker queued for its session survives a SIGTERM restart.
    rig.stop_collector()
    rig.wait_windows(10)  # queued by the broker for the collector's session
    broker.stop()
    time.sleep(2.0)
    broker.start()
    rig.wait_windows(5)
    rig.start_collector()
    t_back = time.monotonic()
    recovery["SIGTERM, collector away"] = rig.wait_stored(rig.produced(), t_back)

    # 3. SIGKILL, collector online, down 4 s.
    rig.wait_windows(5)
    broker.kill()
    time.sleep(4.0)
    broker.start()
    t_up = time.monotonic()
    recovery["SIGKILL, collector online"] = rig.wait_stored(rig.produced(), t_up)
    rig.wait_windows(5)

    fig = rig.finish()
    c = rig.collector
    assert c is not None
    stats = c.stats

    # The retained offline status of each closed agent survives another restart.
    broker.stop()
    broker.start()
    sub = Subscriber(broker.port, f"edgeship/{rig.fleet}/+/status", persistent=False)
    with sub:
        ok = sub.wait(lambda got: len({r.topic for r in got if r.retain}) == 3, 10)
        retained = {r.topic: r.data["state"] for r in sub.snapshot() if r.retain}
    assert ok, retained
    assert set(retained.values()) == {"offline"}, retained

    fig = record(
        "broker restart (persistence on)",
        devices=3,
        **fig,
        collector_reconnects=stats.connects,
        redelivered=stats.redelivered,
        recovery_s=recovery,
        retained_status_after_restart=f"{len(retained)}/3",
    )
    assert_exact(fig)
    # The collector came back by itself: the second instance connected, then again after the
    # SIGKILL restart.
    assert stats.connects >= 2, stats


def test_broker_killed_while_the_collector_is_away_loses_only_what_it_had_not_saved(
    tmp_path: Path,
) -> None:
    """The designed loss: Mosquitto saves its database every ``autosave_interval`` and on a
    clean stop. Killed while the collector is away, it loses what it queued for the collector
    since the last save, and the agents had already deleted those (acknowledged) messages. The
    loss must be exactly those windows, and every one of them a visible sequence gap."""
    with contextlib.ExitStack() as stack:
        # No periodic save during the test: the last save is the clean restart below.
        broker = Mosquitto(
            tmp_path / "broker", extra_conf="autosave_interval 3600\nmax_inflight_messages 1000"
        )
        stack.callback(broker.stop)
        broker.start()
        rig = Rig(tmp_path, broker, stack)
        rig.start_collector()
        for i in range(3):
            rig.start_agent(f"dev{i}", broker.url, period_s=PERIOD_S)
        rig.wait_windows(5)
        broker.stop()  # a clean stop saves the collector's session
        broker.start()
        rig.wait_stored(rig.produced(), time.monotonic())
        rig.stop_collector()
        rig.wait_windows(10)
        broker.kill()
        stored_then = rig.stored_telemetry()
        away = {d: seqs - set(stored_then.get(d, ())) for d, seqs in rig.produced().items()}
        queued = sum(map(len, away.values()))
        time.sleep(2.0)
        broker.start()
        rig.wait_windows(5)
        rig.start_collector()
        rig.wait_windows(5)
        for p in rig.agents():
            p.terminate()
        produced = rig.produced()
        # Everything but (at most) the windows the collector had not received before the kill.
        wait_for(lambda: rig.missing(produced) <= queued, 60, interval=0.2)
        time.sleep(1.0)
        fig = rig.audit(produced)
        stored = rig.stored_telemetry()
        lost = {d: sorted(seqs - set(stored.get(d, ()))) for d, seqs in produced.items()}
        every: dict[str, set[int]] = {}
        for d, _, seq, *_ in rig.rows():
            every.setdefault(d, set()).add(seq)
        other_gaps = {
            d: sorted(set(range(min(v), max(v) + 1)) - v - set(lost[d])) for d, v in every.items()
        }
        fig = record(
            "broker SIGKILL while the collector is away",
            devices=3,
            **fig,
            windows_queued_while_away=queued,
            gaps_that_are_not_windows=other_gaps,
        )
    # Lost: only windows the collector had not received when the broker was killed (those
    # the broker had not acknowledged yet came back from the agents' spools).
    assert fig["lost"] > 0, fig
    assert all(set(seqs) <= away[d] for d, seqs in lost.items()), (lost, away)
    # Every loss is a gap the collector can see, nothing is stored twice.
    assert fig["seq gaps"] >= fig["lost"], fig
    assert fig["stored twice"] == 0 and fig["not sent but stored"] == 0, fig


# --- a disk that fills up ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlp_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle around a small ONNX MLP (milliseconds to build)."""
    from sdk.artifact import read_artifact
    from sdk.package import package
    from tests.helpers import write_mlp_onnx

    root = tmp_path_factory.mktemp("bundle")
    art = read_artifact(write_mlp_onnx(root / "mlp.onnx"))
    package(art, root / "bundle", name="mlp", version="1", labels=["a", "b", "c", "d"])
    return root / "bundle"


class AgentProcess(Producer):
    """``python -m tests.agent_process``: the real Agent, its stats every 0.2 s."""

    def stats(self) -> dict[str, Any]:
        lines = self.events("stats")
        return lines[-1] if lines else {}

    def not_published(self) -> int:
        with self._lock:
            return sum("telemetry window not published" in line for line in self.stderr)


def test_full_disk_counts_the_windows_it_could_not_spool(rig: Rig, mlp_bundle: Path) -> None:
    """The spool's disk fills up during an outage (RLIMIT_FSIZE on the real agent's process:
    its files cannot grow, SQLite's writes fail with EFBIG as with ENOSPC). The agent must keep
    running, count each window it could not spool as an error in the next window that makes it,
    burn no sequence number on a failed write, and deliver everything it did spool once space
    is back and the broker returns."""
    broker = rig.broker
    rig.start_collector()
    broker.stop()  # the collector's session is on the broker; now the outage
    cmd = [
        sys.executable, "-m", "tests.agent_process", "--bundle", str(mlp_bundle),
        "--broker", broker.url, "--fleet", rig.fleet, "--device", "dev0",
        "--state", str(rig.tmp / "agent"), "--window", "0.2", "--fsize-limit", str(96 * 1024),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    agent = AgentProcess(proc)
    rig.stack.callback(_stop, proc)
    assert wait_for(lambda: agent.not_published() >= 10 or proc.poll() is not None, 60)
    assert proc.poll() is None and agent.not_published() >= 10, "".join(agent.stderr)[-3000:]
    assert proc.poll() is None
    proc.send_signal(signal.SIGUSR1)  # space is back
    depth_at_full = agent.stats().get("spool_depth")
    time.sleep(1.0)
    broker.start()
    t_up = time.monotonic()

    def drained() -> bool:
        st = agent.stats()
        return (
            bool(st.get("connected")) and st.get("spool_depth") == 0 and st["t"] > time.time() - 2
        )

    assert wait_for(drained, RECOVERY_DEADLINE_S), agent.stats()
    recovery = round(time.monotonic() - t_up, 2)
    failed = agent.not_published()
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    agent.join()
    (closed,) = agent.events("closed")
    assert closed["spool_depth"] == 0 and closed["spool_dropped"] == 0, closed

    def offline_stored() -> bool:
        return any(r[3] == "status" and '"offline"' in r[6] for r in rig.rows())

    assert wait_for(offline_stored, 30)
    time.sleep(0.5)
    rows = rig.rows()
    seqs = sorted(r[2] for r in rows)
    keys = {(r[0], r[1], r[2]) for r in rows}
    db = sqlite3.connect(f"file:{rig.db}?mode=ro", uri=True)
    windows, errors = db.execute(
        "SELECT COUNT(*), COALESCE(SUM(errors), 0) FROM telemetry WHERE fleet = ?", (rig.fleet,)
    ).fetchone()
    db.close()
    fig = record(
        "disk full (the agent's spool writes fail)",
        windows_stored=windows,
        windows_not_spooled=failed,
        errors_reported_in_telemetry=errors,
        **{"stored twice": len(rows) - len(keys)},
        seq_gaps=len(set(range(seqs[0], seqs[-1] + 1)) - set(seqs)),
        spool_depth_when_full=depth_at_full,
        recovery_s=recovery,
        agent_restarts=0,
    )
    # Everything spooled arrived once (depth 0 at close, contiguous numbers from the first
    # birth to the closing offline status), and every window that was not is counted.
    assert fig["seq_gaps"] == 0 and fig["stored twice"] == 0, fig
    assert failed >= 10 and errors == failed, fig


# --- the board's wall clock steps -------------------------------------------------------------


def test_wall_clock_steps_on_the_board(rig: Rig, tmp_path: Path) -> None:
    """NTP steps the clock of a board without an RTC: +1 h, then back 2 h, then back to true
    time, while the agent publishes. Sequence numbers, not timestamps, order and dedupe; the
    collector judges staleness on its own receive clock; window lengths stay true."""
    rig.start_collector(stale_windows=20.0)
    clock = tmp_path / "clock"
    agent = rig.start_agent(
        "dev0", rig.broker.url, period_s=0.5, extra=("--clock-file", str(clock))
    )
    rig.wait_windows(4)
    verdicts = []
    c = rig.collector
    assert c is not None
    for offset in (3600.0, -3600.0, 0.0):
        clock.write_text(str(offset))
        agent.proc.send_signal(signal.SIGUSR2)
        rig.wait_windows(6)
        rig.wait_stored(rig.produced(), time.monotonic())
        c.state.invalidate()
        (device,) = c.state.snapshot().devices
        verdicts.append(device.status)
    fig = rig.finish()
    tele = sorted(
        (seq, ts, received_at)
        for _, _, seq, kind, ts, received_at, _ in rig.rows()
        if kind == "telemetry"
    )
    skew = [ts - received_at for _, ts, received_at in tele]
    db = sqlite3.connect(f"file:{rig.db}?mode=ro", uri=True)
    lengths = [
        r[0] for r in db.execute("SELECT window_s FROM telemetry WHERE fleet = ?", (rig.fleet,))
    ]
    db.close()
    fig = record(
        "wall clock steps +1 h, -2 h, +1 h on the board",
        **fig,
        ts_minus_received_s=f"{min(skew):.0f}..{max(skew):.0f}",
        window_s=f"{min(lengths):.2f}..{max(lengths):.2f}",
        status_after_each_step=verdicts,
    )
    assert_exact(fig)
    # The steps really happened: the board's timestamps jumped an hour either way ...
    assert max(skew) > 3000 and min(skew) < -3000, skew
    # ... yet no window claims an hour (or nothing), and the device never looked stale.
    assert all(0.2 < s < 60 for s in lengths), lengths
    assert verdicts == ["online"] * 3, verdicts


# --- a network partition through a TCP proxy -----------------------------------------------------


def test_network_partition_cut_and_blackhole_then_heal(rig: Rig) -> None:
    """Three agents reach the broker through a TCP proxy (the collector directly). The link is
    cut (RST, new connections reset) for 5 s, then black-holed (open, silent) for 15 s: only
    keep-alive and the connect timeout can notice. After each heal the agents reconnect, replay
    their spool, and the store holds every window once."""
    rig.start_collector()
    proxy = rig.stack.enter_context(TcpProxy(rig.broker.port))
    for i in range(3):
        rig.start_agent(f"dev{i}", proxy.url, period_s=PERIOD_S, extra=("--keepalive", "5"))
    rig.wait_windows(5)
    recovery: dict[str, float] = {}
    detect: list[float] = []

    proxy.cut()
    time.sleep(5.0)
    proxy.heal()
    recovery["cut 5 s"] = rig.wait_stored(rig.produced(), time.monotonic())
    rig.wait_windows(5)

    t_hole = time.time()
    proxy.blackhole()

    def noticed_at() -> list[float]:
        """When each agent that noticed the silent link first said it was disconnected."""
        firsts = []
        for p in rig.agents():
            noticed = [w["t"] for w in p.windows() if w["t"] > t_hole and not w["connected"]]
            firsts += noticed[:1]
        return firsts

    # At least 15 s of black hole, and the heal only once every agent noticed it by itself
    # (keep-alive): within 60 s, however slow the machine, not within a fixed 15 s.
    all_noticed = wait_for(lambda: len(noticed_at()) == len(rig.agents()), 60, interval=0.2)
    time.sleep(max(0.0, t_hole + 15.0 - time.time()))
    detect = [round(t - t_hole, 1) for t in noticed_at()]
    proxy.heal()
    recovery["black hole 15 s"] = rig.wait_stored(rig.produced(), time.monotonic())
    rig.wait_windows(5)
    fig = rig.finish()
    offline = sum(1 for r in rig.rows() if r[3] == "status" and '"offline"' in r[6])
    fig = record(
        "network partition (TCP proxy)",
        devices=3,
        **fig,
        recovery_s=recovery,
        blackhole_noticed_after_s=detect,
        offline_statuses_stored=offline,
        swallowed_bytes=proxy.swallowed_bytes,
    )
    assert_exact(fig)
    # Every agent noticed the silent link by itself (keep-alive), before the heal.
    assert all_noticed and len(detect) == 3, detect


# --- 500 devices for 2 minutes ------------------------------------------------------------------

DEVICES = 500
DURATION_S = 120.0
SIM_PERIOD_S = 2.0
SIM_PROCESSES = 2


def _rss_kib(pid: int) -> int:
    """Resident memory of a process and its children (the collector's workers), KiB."""
    total = 0
    pids = [pid]
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
            pids += [int(c) for c in children]
    for p in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def _health(port: int) -> dict[str, Any]:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5) as r:
            return dict(json.loads(r.read()).get("collector") or {})
    except OSError:
        return {}


def test_500_devices_for_2_minutes(tmp_path: Path) -> None:
    """500 simulated devices (one MQTT connection each, Last Will, birth, a telemetry window
    every 2 s) for 2 minutes against ``edgeship collect`` (SQLite, its default worker
    processes): every acknowledged message stored once, the collector keeps up."""
    from tests.test_collector_service import stored_exactly

    fleet = f"load{uuid.uuid4().hex[:6]}"
    store_url = f"sqlite:///{tmp_path}/fleet.db"
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with contextlib.ExitStack() as stack:
        broker = stack.enter_context(
            Mosquitto(tmp_path / "broker", extra_conf=BROKER_CONF + "\nmax_connections -1")
        )
        collect = subprocess.Popen(
            [sys.executable, "-m", "sdk.cli", "collect", "--broker", broker.url,
             "--fleet", fleet, "--store", store_url, "--http", f"127.0.0.1:{port}",
             "--client-id", f"collector-{fleet}", "--no-monitor"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        stack.callback(_stop, collect)
        assert wait_for(lambda: _health(port), 60), collect.poll()
        # Two simulator processes of 250 devices: paho waits on its sockets with select(),
        # which cannot watch descriptors above 1023, and each client holds three.
        sims = []
        for part in range(SIM_PROCESSES):
            sim = subprocess.Popen(
                [sys.executable, "-m", "collector.simulate", "--broker", broker.url,
                 "--fleet", fleet, "--devices", str(DEVICES // SIM_PROCESSES),
                 "--prefix", f"sim{part}", "--period", str(SIM_PERIOD_S),
                 "--duration", str(DURATION_S), "--keepalive", "30",
                 "--report", str(tmp_path / f"published{part}.json")],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            stack.callback(_stop, sim)
            sims.append(sim)
        peak_rss = 0
        t0 = time.monotonic()
        while any(s.poll() is None for s in sims) and time.monotonic() - t0 < DURATION_S + 240:
            peak_rss = max(peak_rss, _rss_kib(collect.pid))
            time.sleep(1.0)
        for sim in sims:
            out, err = sim.communicate(timeout=60)
            assert sim.returncode == 0, (out, err[-3000:])
        t_done = time.monotonic()
        published: dict[str, Any] = {"messages": 0, "devices": {}, "rounds": []}
        for part in range(SIM_PROCESSES):
            one = json.loads((tmp_path / f"published{part}.json").read_text())
            published["messages"] += one["messages"]
            published["devices"].update(one["devices"])
            published["rounds"].append(one["rounds"])
        total = published["messages"]
        ok = wait_for(lambda: _health(port).get("stored", 0) >= total, RECOVERY_DEADLINE_S, 0.2)
        drain_s = round(time.monotonic() - t_done, 2)
        peak_rss = max(peak_rss, _rss_kib(collect.pid))
        health = _health(port)
        assert ok, (health, total)
        result = stored_exactly(store_url, fleet, published["devices"])
        assert collect.poll() is None, collect.stderr
    db = sqlite3.connect(f"{tmp_path}/fleet.db")
    lags = sorted(
        r[0] for r in db.execute("SELECT received_at - ts FROM telemetry WHERE fleet = ?", (fleet,))
    )
    db.close()
    fig = record(
        f"{DEVICES} devices for {DURATION_S:g} s",
        devices=DEVICES,
        window_every_s=SIM_PERIOD_S,
        sent=total,
        stored=health.get("stored"),
        lost=result["missing"],
        **{"stored twice": result["extra"]},
        duplicates_dropped=health.get("duplicates"),
        dead_letters=health.get("dead_letters"),
        rate_msg_s=round(total / DURATION_S, 1),
        lag_s_p50=round(lags[len(lags) // 2], 3),
        lag_s_p99=round(lags[int(len(lags) * 0.99)], 3),
        lag_s_max=round(lags[-1], 3),
        drain_after_last_publish_s=drain_s,
        collector_peak_rss_mib=round(peak_rss / 1024, 1),
        rounds=published["rounds"],
    )
    assert result == {"missing": 0, "extra": 0, "total": total}, result
    assert fig["stored"] == total


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=10)
