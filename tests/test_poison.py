"""Poison messages against the collector service (issue 11, finding 1), through a real Mosquitto.

A message the store cannot take used to crash the worker on every retry of its batch: the
batch was retried whole, forever, holding the messages that shared it, and with as many such
batches as committer threads (``workers``, 2 by default) nothing more was stored, while
``/api/health`` said ok; a restart got the same messages back first from the broker. Now the
decoder refuses text a store cannot hold (lone surrogates, NUL), a batch the store refuses is
split until the refused message is alone (a dead letter, ``field="store"``), and health says
why it is not ok while anything cannot be committed or a worker is down.

The acceptance run (marker ``faults``; ``-s`` prints its figures): 10,000 good telemetry windows
from 50 devices interleaved with 1,000 generated bad messages (tests/poison.py), through a
private Mosquitto into ``edgeship collect``, on SQLite and PostgreSQL, once undisturbed and
once with the collector SIGKILLed mid-run.
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from collector.service import Collector, CollectorConfig
from collector.store import open_store
from device_agent.contracts.messages import encode, topic
from tests.brokers import ROOT, Mosquitto, free_port, wait_for
from tests.collector_helpers import status, window
from tests.faults_report import record
from tests.poison import (
    bad_kinds_cycle,
    bad_message,
    dead_letter_digest,
    good_windows,
    interleave,
    refuse_in_store,
    storable,
)
from tests.test_collector_store import PG_URL, pg_available, pg_url

FLEET = "poison"
# As examples/mosquitto/collector.conf: room in flight for a collector that acks after commit.
BROKER_CONF = "autosave_interval 30\nmax_inflight_messages 1000"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "mosquitto", extra_conf=BROKER_CONF) as b:
        yield b


def _publisher(port: int) -> mqtt.Client:
    c = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=f"poison-pub-{uuid.uuid4().hex[:8]}",
        protocol=MQTTProtocolVersion.MQTTv311,
    )
    c.max_inflight_messages_set(500)
    connected = threading.Event()
    c.on_connect = lambda *_: connected.set()
    c.connect("127.0.0.1", port, 30)
    c.loop_start()
    assert connected.wait(10), "test publisher: no CONNACK"
    return c


def _publish(c: mqtt.Client, items: list[tuple[str, bytes]]) -> list[mqtt.MQTTMessageInfo]:
    return [c.publish(t, p, qos=1) for t, p in items]


def _acked(infos: list[mqtt.MQTTMessageInfo], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for info in infos:
        info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        assert info.is_published(), "the broker did not acknowledge a publish"


PROBE = "probe"


def _probe(pub: mqtt.Client) -> None:
    """A retained status: a collector that received it is subscribed (what is published
    before its subscription is active would not reach it)."""
    _acked([pub.publish(topic(FLEET, PROBE, "status"), encode(status(PROBE, 0)), qos=1,
                        retain=True)])  # fmt: skip


def _subscribed(c: Collector) -> None:
    assert wait_for(lambda: c.stats.stored >= 1, 15), c.health()


def _config(broker: Mosquitto, store_url: str, **over: Any) -> CollectorConfig:
    values: dict[str, Any] = dict(
        broker_url=broker.url, fleet=FLEET, store_url=store_url, http="127.0.0.1:0",
        client_id=f"poison-{uuid.uuid4().hex[:8]}", batch_interval_s=0.05, keepalive_s=5,
    )  # fmt: skip
    values.update(over)
    return CollectorConfig(**values)


def _stored(store_url: str) -> dict[str, int]:
    s = open_store(store_url)
    try:
        return {r.device: r.messages for r in s.devices(FLEET) if r.device != PROBE}
    finally:
        s.close()


def _dead_rows(store_url: str) -> list[tuple[str, str, str, str]]:
    """(digest, topic, field, error) of every dead letter."""
    s: Any = open_store(store_url)
    try:
        return [tuple(r) for r in s._query("SELECT digest, topic, field, error FROM dead_letters")]
    finally:
        s.close()


# --- the issue's poison, one at a time ----------------------------------------------------------


def _issue_poison(n: int) -> list[tuple[str, bytes]]:
    """``n`` poison messages of the kinds the issue names, each distinct."""
    rng = np.random.default_rng(1)
    out: list[tuple[str, bytes]] = []
    for i in range(n):
        m = window("bad", i, rng=rng, n=5)
        good = encode(m)
        out.append([
            (topic(FLEET, "bad", "telemetry"), b'{"\\ud800":1,"\\ud800":%d}' % i),
            (topic(FLEET, "bad", "telemetry"),
             good.replace(b'"digits-cnn"', b'"digits\\udc00cnn"')),  # model, lone surrogate
            (topic(FLEET, "bad", "telemetry"), good.replace(b'"digits-cnn"', b'"dig\\u0000"')),
            (topic(FLEET, "bad", "status"),
             encode(status("bad", i)).replace(b'"test"', b'"t\\ud834"')),  # agent_version
        ][i % 4])  # fmt: skip
    return out


def test_the_issues_poison_is_dead_lettered_and_every_other_device_is_stored(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """25 poison messages, each in its own batch (one device with a bad model name, one per
    telemetry window), between an agent connected before and one that connects after: both
    agents' windows are stored, the poison is dead-lettered with safe text, health stays ok,
    nothing is left uncommitted, and a restarted collector gets nothing back from the broker."""
    store_url = f"sqlite:///{tmp_path}/fleet.db"
    config = _config(broker, store_url)  # worker="process", workers=2: the default
    rng = np.random.default_rng(0)
    pub = _publisher(broker.port)
    _probe(pub)
    try:
        with Collector(config) as c:
            _subscribed(c)
            old = [(topic(FLEET, "old", "telemetry"), encode(window("old", s, rng=rng)))
                   for s in range(3)]  # fmt: skip
            _acked(_publish(pub, old))
            for item in _issue_poison(25):
                _acked(_publish(pub, [item]))
                time.sleep(0.06)  # past batch_interval_s: a batch of its own
            new = [(topic(FLEET, name, "telemetry"), encode(window(name, s, rng=rng)))
                   for s in range(3, 13) for name in ("new", "old")]  # fmt: skip
            _acked(_publish(pub, new))
            assert wait_for(lambda: c.stats.received >= 49, 30), (c.stats, c.health()["problems"])
            assert wait_for(lambda: c.stats.uncommitted == 0, 10), c.health()
            health = c.health()
            assert health["ok"] and health["problems"] == [], health
            stats = c.stats
            assert (stats.stored, stats.dead_letters) == (1 + 23, 25), stats
        assert _stored(store_url) == {"old": 13, "new": 10}
        rows = _dead_rows(store_url)
        assert len(rows) == 25 and all(
            storable(t) and storable(f) and storable(e) for _, t, f, e in rows
        )
        assert {f for _, _, f, _ in rows} == {"payload", "model", "agent_version"}
        # A restart with the same session: nothing was left un-acknowledged to poison it.
        with Collector(config) as again:
            assert wait_for(lambda: again.stats.subscribed, 10)
            time.sleep(0.5)
            assert again.stats.received == 0 and again.health()["ok"], again.health()
    finally:
        pub.disconnect()
        pub.loop_stop()


# --- a batch the store refuses ------------------------------------------------------------------


def test_a_batch_the_store_refuses_is_split_and_everything_else_stored_once(
    broker: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Three valid windows the store refuses (a trigger standing in for a value the database
    cannot take), among 300 good ones sent in one burst so that they share batches: the
    batches are split, the three are dead letters naming the store's reason, the 300 are
    stored once, and health is ok again once the split is done."""
    store_url = f"sqlite:///{tmp_path}/fleet.db"
    open_store(store_url).close()
    refuse_in_store(store_url)
    rnd = random.Random(3)
    good = good_windows(FLEET, 3, 100)
    refused = [bad_message("store_refused", FLEET, nonce, rnd) for nonce in (1, 2, 3)]
    traffic = [m for _, m in interleave(good, refused, rnd)]
    config = _config(broker, store_url, batch_interval_s=0.2)
    pub = _publisher(broker.port)
    _probe(pub)
    try:
        with caplog.at_level("WARNING", logger="collector"), Collector(config) as c:
            _subscribed(c)
            _acked(_publish(pub, traffic))
            # (At least once: a redelivery would be a duplicate, dropped by the store.)
            assert wait_for(
                lambda: (c.stats.stored, c.stats.dead_letters, c.stats.uncommitted) == (301, 3, 0),
                30,
            ), (c.stats, c.health()["problems"])
            assert wait_for(lambda: c.health()["ok"], 10), c.health()
            stats = c.stats
            assert stats.dead_by_field.get("store") == 3, stats.dead_by_field
        assert _stored(store_url) == {"pi-00": 100, "pi-01": 100, "pi-02": 100}
        rows = _dead_rows(store_url)
        assert sorted(d for d, *_ in rows) == sorted(dead_letter_digest(*m) for m in refused)
        assert all(f == "store" and "refuses that model" in e for _, _, f, e in rows), rows
        assert any("split" in r.getMessage() for r in caplog.records)
    finally:
        pub.disconnect()
        pub.loop_stop()


# --- health while nothing can be committed, and with a worker down -----------------------------


def test_health_is_not_ok_while_a_batch_cannot_be_committed_or_a_worker_is_down(
    broker: Mosquitto, tmp_path: Path
) -> None:
    db = tmp_path / "fleet.db"
    config = _config(broker, f"sqlite:///{db}", workers=1)
    rng = np.random.default_rng(0)
    pub = _publisher(broker.port)
    _probe(pub)

    def health() -> tuple[int, dict[str, Any]]:
        host, port = c.http_address_bound()
        try:
            with urllib.request.urlopen(f"http://{host}:{port}/api/health", timeout=5) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def send(seq: int) -> None:
        _acked(
            _publish(pub, [(topic(FLEET, "pi", "telemetry"), encode(window("pi", seq, rng=rng)))])
        )

    try:
        with Collector(config) as c:
            _subscribed(c)
            send(0)
            assert wait_for(lambda: c.stats.stored == 2, 10)
            assert health()[0] == 200
            # The store cannot write: the batch waits, un-acknowledged, and health says why.
            with sqlite3.connect(db) as conn:
                conn.execute("ALTER TABLE messages RENAME TO messages_away")
            send(1)
            assert wait_for(lambda: health()[0] == 503, 15), health()
            code, body = health()
            assert not body["ok"] and body["collector"]["uncommitted"] == 1
            assert any("not stored" in p and "no such table" in p for p in body["problems"]), body
            with sqlite3.connect(db) as conn:
                conn.execute("ALTER TABLE messages_away RENAME TO messages")
            assert wait_for(lambda: c.stats.stored == 3, 30), health()
            code, body = health()
            assert code == 200 and body["problems"] == [], body
            # A worker that dies (here: SIGKILL) is reported until the next batch replaces it.
            sink: Any = c.pipeline.sink(0)
            os.kill(sink.pid, signal.SIGKILL)
            assert wait_for(lambda: sink.exit_code() is not None, 10)
            code, body = health()
            assert code == 503 and any("worker 0 exited" in p for p in body["problems"]), body
            send(2)
            assert wait_for(lambda: c.stats.stored == 4, 30), health()
            assert wait_for(lambda: health()[0] == 200, 10), health()
    finally:
        pub.disconnect()
        pub.loop_stop()


# --- acceptance: 10,000 good and 1,000 bad through Mosquitto ---------------------------------

GOOD_DEVICES, GOOD_PER_DEVICE, BAD = 50, 200, 1000
STORE_REFUSED_SHARE = 20  # of the 1,000 bad ones: valid messages the store refuses (splits)


class _HealthWatch:
    """Polls ``/api/health`` every 50 ms: (time, ok or None when unreachable, problems)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.samples: list[tuple[float, bool | None, list[str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def get(self) -> dict[str, Any] | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/health", timeout=5) as r:
                body: dict[str, Any] = json.loads(r.read())
                return body
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
            return body
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return None

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            h = self.get()
            self.samples.append(
                (
                    time.monotonic(),
                    None if h is None else h["ok"],
                    [] if h is None else h["problems"],
                )
            )

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def _collect(broker: Mosquitto, store_url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "sdk.cli", "collect", "--broker", broker.url, "--fleet", FLEET,
        "--store", store_url, "--http", f"127.0.0.1:{port}", "--client-id", "poison-collector",
    ]  # fmt: skip
    with log.open("ab") as err:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # fmt: skip


@functools.lru_cache(maxsize=1)
def _traffic() -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]], list[tuple[bool, Any]]]:
    rnd = random.Random(11)
    good = good_windows(FLEET, GOOD_DEVICES, GOOD_PER_DEVICE)
    kinds = bad_kinds_cycle(rnd, BAD, store_refused=STORE_REFUSED_SHARE)
    bad = [bad_message(kind, FLEET, nonce, rnd) for nonce, kind in enumerate(kinds)]
    return good, bad, interleave(good, bad, rnd)


@pytest.fixture(params=["sqlite", "postgresql"])
def acceptance_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/fleet.db"
    elif pg_available():
        url = pg_url()
    else:
        pytest.skip(f"no PostgreSQL at {PG_URL}")
    open_store(url).close()
    refuse_in_store(url)
    yield url
    if request.param == "postgresql":
        s: Any = open_store(url)
        s.drop_schema()
        s.close()


@pytest.mark.slow
@pytest.mark.faults
@pytest.mark.parametrize("kill", [False, True], ids=["undisturbed", "sigkill"])
def test_10000_good_and_1000_fuzzed_bad_through_mosquitto(
    broker: Mosquitto, acceptance_store: str, tmp_path: Path, kill: bool
) -> None:
    store_url = acceptance_store
    kind = store_url.split(":")[0]
    good, bad, traffic = _traffic()
    port = free_port()
    log = tmp_path / "collector.log"
    procs = [_collect(broker, store_url, port, log)]
    watch = _HealthWatch(port)
    pub = _publisher(broker.port)
    _probe(pub)
    figures: dict[str, Any] = {}
    try:
        ready = lambda: (watch.get() or {"collector": {}})["collector"].get("stored")  # noqa: E731
        assert wait_for(ready, 60), log.read_text()
        t0 = time.monotonic()
        items = [m for _, m in traffic]
        cut = len(items) * 2 // 5 if kill else len(items)
        infos = _publish(pub, items[:cut])
        if kill:
            # SIGKILL with messages received but not committed (or not yet received at all).
            before = (watch.get() or {}).get("collector", {})
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait(10)
            figures["at_kill"] = {k: before.get(k) for k in ("received", "stored", "uncommitted")}
            infos += _publish(pub, items[cut:])  # the broker queues for the session meanwhile
            time.sleep(1.0)
            procs.append(_collect(broker, store_url, port, log))
        _acked(infos, 120)
        t_published = time.monotonic()

        def done() -> bool:
            h = watch.get()
            if not h or not h["ok"] or h["collector"]["uncommitted"]:
                return False
            return sum(_stored(store_url).values()) == len(good) and len(
                _dead_rows(store_url)
            ) == len(bad)

        assert wait_for(done, 120, interval=0.5), (watch.get(), log.read_text()[-3000:])
        t_done = time.monotonic()
        final = watch.get() or {}
    finally:
        watch.stop()
        pub.disconnect()
        pub.loop_stop()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(30)

    # Every good window stored exactly once: 200 consecutive numbers per device, no more.
    s = open_store(store_url)
    try:
        ranges = {
            r.device: (r.min_seq, r.max_seq, r.messages)
            for r in s.boot_ranges(FLEET)
            if r.device != PROBE
        }
        counts = s.count_messages(FLEET)
        counts["status"] -= 1  # the probe
        counts = {k: n for k, n in counts.items() if n}
    finally:
        s.close()
    expected = {f"pi-{d:02d}": (0, GOOD_PER_DEVICE - 1, GOOD_PER_DEVICE)
                for d in range(GOOD_DEVICES)}  # fmt: skip
    assert ranges == expected and counts == {"telemetry": len(good)}, (ranges, counts)
    # Every bad one is exactly one dead letter, with safe text.
    rows = _dead_rows(store_url)
    assert sorted(d for d, *_ in rows) == sorted(dead_letter_digest(*m) for m in bad)
    assert all(storable(t) and storable(f) and storable(e) for _, t, f, e in rows)
    by_field: dict[str, int] = {}
    for _, _, f, _ in rows:
        name = f.split(".")[0].split("[")[0]
        by_field[name] = by_field.get(name, 0) + 1
    assert by_field.get("store") == STORE_REFUSED_SHARE, by_field
    # Health: ok, except while a refused batch was being split (or, around the SIGKILL, while
    # the collector was down or reconnecting); ok at the end.
    reasons: dict[str, int] = {}
    samples = [x for x in watch.samples if x[0] >= t0]  # from the first message on
    for _, ok, problems in samples:
        if ok is None:
            reasons["down"] = reasons.get("down", 0) + 1
        for p in problems if ok is False else []:
            why = "splitting" if "splitting" in p else "connecting" if "not connected" in p else p
            reasons[why] = reasons.get(why, 0) + 1
    allowed = {"splitting", "down", "connecting"} if kill else {"splitting"}
    assert set(reasons) <= allowed, reasons
    assert final.get("ok") and final["problems"] == [], final
    collector = final["collector"]
    splits = log.read_text().count("the store refused a batch")
    figures.update(
        store=kind,
        good=len(good),
        bad=len(bad),
        stored=sum(counts.values()),
        dead_letters=len(rows),
        refused_by_store=by_field["store"],
        batches_split=splits,
        health_samples=len(samples),
        health_not_ok=sum(1 for _, ok, _ in samples if ok is False),
        not_ok_reasons=reasons,
        publish_s=round(t_published - t0, 2),
        stored_all_after_s=round(t_done - t0, 2),
        redelivered=collector["redelivered"],
        duplicates_dropped=collector["duplicates"],
        dead_by_field=dict(sorted(by_field.items())),
    )
    record(f"poison pill, {kind}, {'SIGKILL mid-run' if kill else 'undisturbed'}", **figures)


# --- a store that does not answer, a sender that picks field names -----------------------------


def test_a_store_that_never_answers_is_a_health_problem_and_nothing_is_lost(
    broker: Mosquitto,
) -> None:
    """A PostgreSQL link that goes silent (here a proxy that forwards nothing and answers
    nothing) gives no error: the batch's query waits for as long as the kernel keeps the
    connection. /api/health must say so instead of ok, and once the link breaks for real the
    batch is retried and stored once, not split or dead-lettered."""
    if not pg_available():
        pytest.skip(f"no PostgreSQL at {PG_URL}")
    from tests.proxy import TcpProxy

    rng = np.random.default_rng(0)
    with TcpProxy(5432) as proxy:
        url = pg_url().replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}", 1)
        assert f":{proxy.port}/" in url, url
        config = _config(broker, url, workers=1)
        pub = _publisher(broker.port)
        _probe(pub)
        try:
            with Collector(config) as c:
                c.commit_stall_s = 1.0
                _subscribed(c)
                assert c.problems() == []
                proxy.blackhole()
                _acked(_publish(pub, [(topic(FLEET, "pi", "telemetry"),
                                       encode(window("pi", 0, rng=rng)))]))  # fmt: skip
                stalled = wait_for(
                    lambda: any("the store does not answer" in p for p in c.problems()), 20
                )
                assert stalled, c.health()
                assert c.stats.uncommitted == 1 and not c.health()["ok"]
                proxy.cut()  # the link breaks for real: an error at last, and a retry
                time.sleep(0.2)
                proxy.heal()
                assert wait_for(lambda: c.stats.stored == 2, 60), c.health()
                assert wait_for(lambda: c.problems() == [], 10), c.health()
            assert _stored(url) == {"pi": 1}
            assert _dead_rows(url) == []
        finally:
            pub.disconnect()
            pub.loop_stop()


def test_dead_letter_field_names_a_sender_picks_are_counted_in_bounded_space(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """A key given twice names the dead letter's field: a sender that uses a new key in each
    message must not grow the collector's counters (and /metrics, /api/dead-letters) without
    bound; past the limit the rest are counted as "(other)"."""
    from collector.pipeline import MAX_DEAD_FIELDS, OTHER_DEAD_FIELD
    from collector.store import DEAD_LETTER_FIELDS

    n = MAX_DEAD_FIELDS + 50
    db = tmp_path / "fleet.db"
    config = _config(broker, f"sqlite:///{db}", workers=1)
    pub = _publisher(broker.port)
    _probe(pub)
    bad = [(topic(FLEET, "bad", "telemetry"), b'{"k%d":1,"k%d":2}' % (i, i)) for i in range(n)]
    try:
        with Collector(config) as c:
            _subscribed(c)
            _acked(_publish(pub, bad))
            assert wait_for(lambda: c.stats.dead_letters == n, 30), c.health()
            by_field = c.stats.dead_by_field
            assert len(by_field) == MAX_DEAD_FIELDS + 1, len(by_field)
            assert by_field[OTHER_DEAD_FIELD] == n - MAX_DEAD_FIELDS
            assert sum(by_field.values()) == n
        s = open_store(f"sqlite:///{db}")
        try:
            counts = s.dead_letter_counts()
        finally:
            s.close()
        assert len(counts) == DEAD_LETTER_FIELDS + 1
        assert sum(counts.values()) == n and counts["(other)"] == n - DEAD_LETTER_FIELDS
    finally:
        pub.disconnect()
        pub.loop_stop()
