"""Property test at the boundary where MQTT topics and payloads enter the collector: the decoder,
ingest and the store (``collector.worker.process_batch``, what each worker runs per batch),
on SQLite and PostgreSQL.

Good telemetry windows are interleaved with generated bad messages (tests/poison.py: lone
surrogates in keys and values, NUL, non-UTF-8 bytes, non-finite and huge numbers, deep nesting,
duplicate keys, wrong types, bad topics, broken JSON) and with valid messages the store itself
refuses (a trigger standing in for a value the database cannot take), some of them delivered
twice, in batches of any size. Good and bad messages on the fleet-level ``rollouts`` topic are
among them (states of a few rollouts in any order, and rollouts the contract refuses). Whatever
the mix: ``process_batch`` never raises, every good message is stored exactly once (a rollout:
its one row holds the first delivery of its highest ``seq``), every distinct bad one is exactly
one dead letter whose text is safe, and the store keeps taking batches.
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.store import open_store
from collector.worker import process_batch
from device_agent.contracts.messages import ROLLOUT_STATES, RolloutEvent, encode, topic
from tests.collector_helpers import window
from tests.poison import (
    BAD_KINDS,
    STORE_REFUSED,
    T0,
    bad_message,
    dead_letter_digest,
    refuse_in_store,
)
from tests.test_collector_store import PG_URL, pg_available, pg_url

_FLEETS = itertools.count()
_BAD_CHAR = st.characters(categories=["Cs"]) | st.just("\x00")
_UNSAFE_TEXT = st.builds(
    lambda a, c, b: a + c + b, st.text(max_size=6), _BAD_CHAR, st.text(max_size=6)
)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fuzz_store(request: pytest.FixtureRequest, tmp_path_factory: Any) -> Iterator[Any]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('fuzz')}/fleet.db"
    elif pg_available():
        url = pg_url()
    else:
        pytest.skip(f"no PostgreSQL at {PG_URL}")
    store: Any = open_store(url)
    refuse_in_store(url)
    try:
        yield store
    finally:
        if request.param == "postgresql":
            store.drop_schema()
        store.close()


def _good(fleet: str, devices: int, per_device: int, seed: int) -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(seed)
    return [
        (topic(fleet, f"pi-{d}", "telemetry"),
         encode(window(f"pi-{d}", seq, rng=rng, n=5, ts=T0 + seq)))
        for d in range(devices)
        for seq in range(per_device)
    ]  # fmt: skip


_WAVES = (("pi-0",), ("pi-1", "pi-2"))
# How a rollouts message is made bad: each one the contract refuses.
BAD_ROLLOUTS = (
    "state", "devices", "wave", "seq", "surrogate", "nul", "twice", "truncated", "device_topic",
    "non_utf8", "duplicate_key",
)  # fmt: skip


def _rollout(fleet: str, rid: str, seq: int, n: int) -> tuple[str, bytes]:
    """A valid state of rollout ``rid``, told apart from its others by ``ts`` (``T0 + n``)."""
    states = itertools.chain.from_iterable(_WAVES)
    event = RolloutEvent(
        id=rid, seq=seq, ts=T0 + n, started=T0, state=ROLLOUT_STATES[n % 4], deploy="d0123",
        wave=0, waves=_WAVES, devices=dict.fromkeys(states, "pending"),
    )  # fmt: skip
    return f"edgeship/{fleet}/rollouts", encode(event)


def bad_rollout(kind: str, fleet: str, nonce: int) -> tuple[str, bytes]:
    """A message on the rollouts topic that the collector must dead-letter, made distinct by
    ``nonce``."""
    name, good = _rollout(fleet, f"bad-{nonce % 3}", nonce, nonce)
    doc = {"nonce": nonce, **json.loads(good)}
    changes: dict[str, Any] = {
        "state": {"state": "paused"},
        "devices": {"devices": {"pi-0": "applied"}},
        "wave": {"wave": 3},
        "seq": {"seq": -1 - nonce},
        "surrogate": {"reason": "halted \ud800"},
        "nul": {"model": "digits\x00"},
        "twice": {"waves": [["pi-0"], ["pi-0", "pi-1", "pi-2"]]},
    }
    doc.update(changes.get(kind, {}))
    text = json.dumps(doc)  # ASCII: a lone surrogate or a NUL is written as a \u escape
    if kind in changes:
        return name, text.encode()
    if kind == "truncated":
        return name, text[: len(text) // 2].encode()
    if kind == "device_topic":
        return f"edgeship/{fleet}/pi-0/rollouts", text.encode()
    if kind == "non_utf8":
        return name, text.replace('"nonce"', '"n\xffonce"').encode("latin-1")
    if kind == "duplicate_key":
        return name, ('{"seq": 1, ' + text[1:]).encode()
    raise ValueError(f"unknown bad rollout {kind!r}")


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_good_messages_are_stored_once_and_bad_ones_dead_lettered_in_any_mix(
    fuzz_store: Any, data: st.DataObject
) -> None:
    store = fuzz_store
    fleet = f"fz{next(_FLEETS)}"
    devices = data.draw(st.integers(1, 3), label="devices")
    per_device = data.draw(st.integers(0, 8), label="windows per device")
    good = _good(fleet, devices, per_device, data.draw(st.integers(0, 100)))
    kinds = data.draw(st.lists(st.sampled_from((*BAD_KINDS, STORE_REFUSED)), max_size=10))
    bad = [
        bad_message(kind, fleet, nonce, random.Random(data.draw(st.integers(0, 2**16))),
                    text=data.draw(st.none() | _UNSAFE_TEXT))
        for nonce, kind in enumerate(kinds)
    ]  # fmt: skip
    # Rollouts: states of up to 3 rollouts with any seqs, and bad ones.
    seqs = data.draw(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 5)), max_size=8))
    rollouts = [_rollout(fleet, f"r-{r}", seq, n) for n, (r, seq) in enumerate(seqs)]
    bad_kinds = data.draw(st.lists(st.sampled_from(BAD_ROLLOUTS), max_size=4), label="bad rollouts")
    bad += [bad_rollout(kind, fleet, 1000 + n) for n, kind in enumerate(bad_kinds)]
    traffic = [*good, *rollouts, *bad]
    # Redeliveries: some messages, good or bad, arrive a second time.
    again = data.draw(st.lists(st.integers(0, max(0, len(traffic) - 1)), max_size=4))
    traffic += [traffic[i] for i in again if traffic]
    order = data.draw(st.permutations(range(len(traffic))), label="arrival order")
    cuts = data.draw(st.lists(st.integers(1, 12), min_size=1, max_size=8), label="batch sizes")

    before = _max_dead_letter_id(store)
    deliveries = [(*traffic[i], T0 + n) for n, i in enumerate(order)]
    position = 0
    for size in itertools.cycle(cuts):
        if position >= len(deliveries):
            break
        process_batch(store, deliveries[position : position + size], fleet)  # never raises
        position += size

    stored = sorted((w.device, w.seq) for w in store.telemetry(fleet))
    assert stored == sorted((f"pi-{d}", s) for d in range(devices) for s in range(per_device))
    assert store.count_messages(fleet) == ({"telemetry": len(stored)} if stored else {})
    rows = store._query("SELECT digest, topic, field, error FROM dead_letters WHERE id > ?",
                        [before])  # fmt: skip
    assert sorted(r[0] for r in rows) == sorted({dead_letter_digest(t, p) for t, p in bad})
    for _, topic_text, field, error in rows:
        for text in (topic_text, field, error):
            text.encode("utf-8")
            assert "\x00" not in text
    refused = [r for r in rows if r[2] == "store"]
    assert len(refused) == kinds.count(STORE_REFUSED)
    # Each rollout: one row, the first delivery of its highest seq.
    expected: dict[str, tuple[int, float]] = {}
    for name, payload, _ in deliveries:
        if name.endswith("/rollouts") and (name, payload) in rollouts:
            m = json.loads(payload)
            if m["seq"] > expected.get(m["id"], (-1, 0.0))[0]:
                expected[m["id"]] = (m["seq"], m["ts"])
    got = {r.id: (r.seq, r.ts) for r in store.rollouts(fleet, limit=None)}
    assert got == expected
    # Still serving: a window that arrives now is stored.
    late = _good(fleet, 1, per_device + 1, 0)[-1]
    assert process_batch(store, [(*late, T0)], fleet).stored.new == 1


def _max_dead_letter_id(store: Any) -> int:
    return int(store._query("SELECT MAX(id) FROM dead_letters")[0][0] or 0)


def test_the_fuzz_traffic_is_what_it_claims(tmp_path: Path) -> None:
    """The generator's bad messages are refused by the reference decoder (so the property
    above tests the collector, not the generator), and its good ones accepted."""
    from collector.ingest import DeadLetter, RolloutRecord, TelemetryRecord, ingest

    rnd = random.Random(0)
    for nonce in range(400):
        kind = BAD_KINDS[nonce % len(BAD_KINDS)]
        out = ingest(*bad_message(kind, "fz", nonce, rnd), T0, fleet="fz")
        assert isinstance(out, DeadLetter), (kind, out)
    assert all(
        isinstance(ingest(t, p, T0, fleet="fz"), TelemetryRecord) for t, p in _good("fz", 2, 5, 0)
    )
    t, p = bad_message(STORE_REFUSED, "fz", 1, rnd)
    assert isinstance(ingest(t, p, T0, fleet="fz"), TelemetryRecord)
    for nonce, kind in enumerate(BAD_ROLLOUTS * 3):
        out = ingest(*bad_rollout(kind, "fz", nonce), T0, fleet="fz")
        assert isinstance(out, DeadLetter), (kind, out)
    assert isinstance(ingest(*_rollout("fz", "r-1", 3, 0), T0, fleet="fz"), RolloutRecord)
