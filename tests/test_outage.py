"""Acceptance: a broker outage loses nothing, with the broker and the agent really stopped.

From the issue: stop a test-owned Mosquitto for at least 30 s while the agent runs inference,
then restart it; every telemetry window produced during the outage arrives, in order, with
contiguous sequence numbers, none twice after dedupe by (device, boot, seq). The same when the
agent is SIGKILLed during the outage and restarted. When the spool's bound is reached, the
oldest messages are dropped and the drop count appears in the next telemetry.

The agent is the stand-in of tests/brokers.py (Spool + Publisher + WindowAggregator in a
subprocess, one telemetry window every PERIOD_S). The subscriber keeps a persistent session on
a broker with persistence on, so what the broker accepted while the subscriber was away waits
for it, across the broker restart too.

``boot`` is the agent *process's* boot (docs/protocol.md: "random id chosen each time the agent
process starts"): the restarted agent has a new boot, its seq continues the spool's counter, and
the killed run's spooled messages keep the old boot they were made with.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from device_agent.contracts import messages as msg
from tests.brokers import (
    MOSQUITTO,
    Collector,
    Mosquitto,
    Producer,
    delivery_report,
    producer_process,
    wait_for,
)
from tests.faults_report import record

pytestmark = [
    pytest.mark.slow,
    pytest.mark.faults,
    pytest.mark.skipif(shutil.which(MOSQUITTO) is None, reason="needs mosquitto"),
]

DEVICE = "dev1"
OUTAGE_S = 31.0  # the issue asks for at least 30 s
PERIOD_S = 0.5


@dataclass
class Outcome:
    produced: list[dict[str, Any]]  # every window line of every producer run
    outage_windows: list[dict[str, Any]]
    messages: list[tuple[Any, msg.Message]]  # (Received, decoded), arrival order
    t_up: float  # time.monotonic() when the broker came back
    closed: dict[str, Any]
    boots: list[str]


def run_outage(
    tmp_path: Path,
    *,
    outage_s: float,
    period_s: float = PERIOD_S,
    kill_after_s: float | None = None,
    max_bytes: int = 32 * 1024 * 1024,
    backoff_max_s: float = 2.0,
) -> Outcome:
    broker = Mosquitto(tmp_path / "broker").start()
    col = Collector(broker.port, "edgeship/test/#", client_id="collector").start()
    spool = tmp_path / "spool.db"
    runs: list[Producer] = []
    with contextlib.ExitStack() as stack:

        def start_producer() -> Producer:
            p = stack.enter_context(
                producer_process(
                    spool,
                    broker.url,
                    period_s=period_s,
                    max_bytes=max_bytes,
                    backoff_max_s=backoff_max_s,
                )
            )
            runs.append(p)
            return p

        p = start_producer()
        assert col.wait(lambda _: len(col.seqs("telemetry")) >= 3, 30), p.stderr
        t_down = time.time()
        broker.stop()
        if kill_after_s is not None:
            time.sleep(kill_after_s)
            p.kill()
            p = start_producer()
            time.sleep(outage_s - kill_after_s)
        else:
            time.sleep(outage_s)
        t_up_wall = time.time()
        t_up = time.monotonic()
        broker.start()

        produced = [w for run in runs for w in run.windows()]
        outage_windows = [w for w in produced if t_down <= w["t"] <= t_up_wall]
        assert outage_windows, "the agent must keep producing during the outage"
        # Let the backlog drain: every window made so far arrives, but for those the device
        # reports as dropped from its full spool.
        before_up = {w["seq"] for w in produced}

        def drained() -> bool:
            tele = [m for _, m in col.decoded() if isinstance(m, msg.TelemetryMessage)]
            reported = max((m.spool_dropped for m in tele), default=0)
            return len(before_up - {m.seq for m in tele}) <= reported

        assert wait_for(drained, 60, interval=0.2), (p.stderr, col.seqs("telemetry"))
        n = len(p.windows())
        assert wait_for(lambda: len(p.windows()) >= n + 3, 10)
        closed = p.terminate()
        # The clean close's offline status is the device's last message.
        assert col.wait(
            lambda _: any(
                isinstance(m, msg.StatusMessage) and m.state == "offline" and r.t > t_up
                for r, m in col.decoded()
            ),
            15,
        )
        time.sleep(0.5)  # anything still in flight
    col.stop()
    broker.stop()
    return Outcome(
        produced=[w for run in runs for w in run.windows()],
        outage_windows=outage_windows,
        messages=col.decoded(),
        t_up=t_up,
        closed=closed,
        boots=[run.events("started")[0]["boot"] for run in runs],
    )


def figures(out: Outcome, label: str) -> dict[str, Any]:
    report = delivery_report([m for _, m in out.messages], DEVICE)
    outage_seqs = {w["seq"] for w in out.outage_windows}
    arrivals = {}
    for r, m in out.messages:
        if isinstance(m, msg.TelemetryMessage) and m.seq in outage_seqs:
            arrivals.setdefault(m.seq, r.t)
    drain_s = max(arrivals.values()) - out.t_up if arrivals else float("nan")
    seen: set[tuple[str, int]] = set()
    dup_kinds: dict[str, int] = {}
    for _, m in out.messages:
        if isinstance(m, msg.Command | msg.Alert):
            continue
        if (m.boot, m.seq) in seen:
            name = f"{m.KIND}/{m.state}" if isinstance(m, msg.StatusMessage) else m.KIND
            dup_kinds[name] = dup_kinds.get(name, 0) + 1
        seen.add((m.boot, m.seq))
    fig = {
        "windows produced": len(out.produced),
        "windows produced during outage": len(out.outage_windows),
        "outage windows received": len(arrivals),
        "messages received": report.received,
        "duplicates before dedupe": report.duplicates,
        "duplicates by kind": dup_kinds,
        "gaps": len(report.missing),
        "max spool depth": max(w["depth"] for w in out.produced),
        "drain s after broker restart": round(drain_s, 2),
        "publisher stats at close": {
            k: out.closed["stats"][k] for k in ("sent", "acked", "reconnects", "connect_attempts")
        },
    }
    record(label, **fig)
    return fig


def check_nothing_lost(out: Outcome) -> None:
    report = delivery_report([m for _, m in out.messages], DEVICE)
    telemetry = [m for _, m in out.messages if isinstance(m, msg.TelemetryMessage)]
    # Every window produced (during the outage and otherwise) arrived.
    produced = [w["seq"] for w in out.produced]
    received = {m.seq for m in telemetry}
    assert set(produced) <= received, sorted(set(produced) - received)
    # In order: the first arrival of each telemetry seq is increasing.
    first_arrivals = list(dict.fromkeys(m.seq for m in telemetry))
    assert first_arrivals == sorted(first_arrivals)
    # Contiguous over every kind, status included: no number was skipped.
    assert report.missing == [], report.missing
    # A seq belongs to one message: duplicates are byte-identical re-sends, never a reuse.
    by_key: dict[tuple[str, int], bytes] = {}
    boots_of_seq: dict[int, set[str]] = {}
    for r, m in out.messages:
        if isinstance(m, msg.Command | msg.Alert):
            continue
        assert by_key.setdefault((m.boot, m.seq), r.payload) == r.payload
        boots_of_seq.setdefault(m.seq, set()).add(m.boot)
    assert all(len(b) == 1 for b in boots_of_seq.values())
    assert out.closed["depth"] == 0


def _is_offline(m: msg.Message) -> bool:
    return isinstance(m, msg.StatusMessage) and m.state == "offline"


def test_broker_outage_loses_nothing(tmp_path: Path) -> None:
    out = run_outage(tmp_path, outage_s=OUTAGE_S)
    fig = figures(out, f"broker down {OUTAGE_S:g} s")
    check_nothing_lost(out)
    # A backlog that needs the spool, each of its windows delivered (contiguous numbers: checked
    # above). How many the producer made in the time depends on the machine: printed.
    assert fig["windows produced during outage"] >= 10, fig
    assert fig["outage windows received"] == fig["windows produced during outage"]
    print(
        f"\n{fig['windows produced during outage']} windows produced during the {OUTAGE_S:g} s "
        f"outage ({OUTAGE_S / PERIOD_S:g} at the nominal rate)"
    )


def test_agent_sigkilled_during_the_outage_loses_nothing(tmp_path: Path) -> None:
    out = run_outage(tmp_path, outage_s=OUTAGE_S, kill_after_s=OUTAGE_S / 2)
    fig = figures(out, f"broker down {OUTAGE_S:g} s, agent SIGKILLed after {OUTAGE_S / 2:g} s")
    check_nothing_lost(out)
    assert fig["outage windows received"] == fig["windows produced during outage"]
    # Two agent processes, two boots, one continuous numbering.
    assert len(set(out.boots)) == 2
    telemetry_boots = [m.boot for _, m in out.messages if isinstance(m, msg.TelemetryMessage)]
    assert set(telemetry_boots) == set(out.boots)


def test_full_spool_drops_the_oldest_and_the_next_telemetry_says_how_many(
    tmp_path: Path,
) -> None:
    # About 10 telemetry windows (~1.1 kB each) fit; the outage produces about 30.
    out = run_outage(tmp_path, outage_s=15.0, period_s=0.5, max_bytes=10 * 1100, backoff_max_s=1.0)
    fig = figures(out, "spool bound reached")
    report = delivery_report([m for _, m in out.messages], DEVICE)
    telemetry = [(r, m) for r, m in out.messages if isinstance(m, msg.TelemetryMessage)]
    dropped_total = max(m.spool_dropped for _, m in telemetry)
    assert report.missing, "the outage should have overflowed the spool"
    # Every gap is a drop the device reported. A drop that is not a gap can only be the
    # re-sent copy of a will (the oldest message in the spool when the connection died) that
    # the broker itself had published: wills of connections that ended, all but the last
    # offline status, which close() sent.
    offline_seqs = sorted({m.seq for _, m in out.messages if _is_offline(m)})
    broker_wills = len(offline_seqs) - 1
    print(
        f"dropped {dropped_total}: {len(report.missing)} gaps, wills seen {offline_seqs[:-1]}, "
        f"close's offline status {offline_seqs[-1]}"
    )
    record(
        "spool bound reached: drops",
        dropped_by_the_spool=dropped_total,
        gaps=len(report.missing),
        broker_wills=broker_wills,
        drops_reported_by_drops_since_last=sum(m.drops_since_last for _, m in telemetry),
    )
    assert len(report.missing) <= dropped_total <= len(report.missing) + broker_wills
    # The oldest went: what survived of the outage is its end, contiguous.
    outage_seqs = sorted(w["seq"] for w in out.outage_windows)
    lost = [s for s in outage_seqs if s in set(report.missing)]
    kept = [s for s in outage_seqs if s not in set(report.missing)]
    assert lost and kept and max(lost) < min(kept)
    # The first telemetry that arrived after the broker came back reports the drops.
    after = [m for r, m in telemetry if r.t > out.t_up]
    assert after[0].drops_since_last > 0, after[0]
    assert after[0].seq > min(report.missing)
    # drops_since_last adds up: the windows that arrived report every drop before them.
    assert sum(m.drops_since_last for _, m in telemetry) <= dropped_total
    assert fig["gaps"] == len(report.missing)
