"""Good and bad MQTT traffic for the collector's poison-message tests (tests/test_poison.py and
tests/test_fuzz_collector.py).

* :func:`good_windows`: valid telemetry windows, one sequence per device.
* :func:`bad_message`: one generated message the wire contract refuses, of a chosen kind from
  :data:`BAD_KINDS` (lone surrogates in keys and values, NUL, non-UTF-8 bytes, non-finite and
  huge numbers, deep nesting, duplicate keys, wrong types, bad topics, broken or empty JSON),
  varied by a ``random.Random``; a ``nonce`` makes every one distinct bytes (the store keeps one
  dead letter per distinct message, so the tests can count them).
* :data:`STORE_REFUSED`: a valid message the *store* refuses (a trigger the test installs with
  :func:`refuse_in_store`, standing in for a value a database cannot take), to make the
  collector split a batch.
* :func:`dead_letter_digest`: the digest the store keeps for a dead letter, to match what was
  sent against what was stored.
* :func:`storable`: whether a text the collector kept from a bad message (topic, field, error)
  can go to a store, a log or a terminal: encodable as UTF-8 and free of NUL (checked here
  independently of the contract's own ``text_problem``).
"""

from __future__ import annotations

import hashlib
import json
import random
from typing import Any

import numpy as np

from device_agent.contracts.messages import (
    CommandReply,
    InputSummary,
    OutlierEvent,
    StatusMessage,
    encode,
    safe_text,
    topic,
)
from tests.collector_helpers import window

Traffic = tuple[str, bytes]  # (topic, payload)

REFUSED_MODEL = "refused-by-the-store"
STORE_REFUSED = "store_refused"
BAD_KINDS: tuple[str, ...] = (
    "surrogate_value",
    "surrogate_key",
    "duplicate_surrogate_key",
    "nul",
    "non_utf8",
    "non_finite",
    "huge_number",
    "deep_nesting",
    "duplicate_key",
    "wrong_type",
    "bad_topic",
    "not_json",
    "empty",
)
T0 = 1_800_000_000.0


def good_windows(fleet: str, devices: int, per_device: int, seed: int = 0) -> list[Traffic]:
    """``devices * per_device`` valid telemetry windows (device ``pi-NN``, seq 0..), in order."""
    rng = np.random.default_rng(seed)
    out: list[Traffic] = []
    for d in range(devices):
        device = f"pi-{d:02d}"
        for seq in range(per_device):
            m = window(device, seq, rng=rng, n=20, ts=T0 + seq)
            out.append((topic(fleet, device, "telemetry"), encode(m)))
    return out


def refused_by_store(fleet: str, nonce: int) -> Traffic:
    """A valid telemetry window the store refuses once :func:`refuse_in_store` ran."""
    rng = np.random.default_rng(nonce)
    m = window(f"odd-{nonce % 7}", nonce, rng=rng, n=5, ts=T0, model=REFUSED_MODEL)
    return topic(fleet, m.device, "telemetry"), encode(m)


def refuse_in_store(store_url: str) -> None:
    """Install a trigger that refuses telemetry of model :data:`REFUSED_MODEL` (SQLite: a
    constraint error, PostgreSQL: a data exception), as a database refuses a value it cannot
    take. The store must exist (opened once)."""
    if store_url.startswith("sqlite:///"):
        import sqlite3

        with sqlite3.connect(store_url[len("sqlite:///") :]) as conn:
            conn.execute(
                "CREATE TRIGGER refuse_model BEFORE INSERT ON telemetry "
                f"WHEN NEW.model = '{REFUSED_MODEL}' "
                "BEGIN SELECT RAISE(ABORT, 'this store refuses that model'); END"
            )
        return
    from collector.store import PostgresStore

    store = PostgresStore(store_url)
    try:

        def install() -> None:
            with store._conn.transaction():
                store._conn.execute(
                    "CREATE FUNCTION refuse_model() RETURNS trigger AS $$ BEGIN "
                    f"IF NEW.model = '{REFUSED_MODEL}' THEN RAISE EXCEPTION "
                    "'this store refuses that model' USING ERRCODE = '22023'; END IF; "
                    "RETURN NEW; END $$ LANGUAGE plpgsql"
                )
                store._conn.execute(
                    "CREATE TRIGGER refuse_model BEFORE INSERT ON telemetry "
                    "FOR EACH ROW EXECUTE FUNCTION refuse_model()"
                )

        store._with_retry(install, "install the test trigger")
    finally:
        store.close()


def dead_letter_digest(topic_name: str, payload: bytes) -> str:
    """The digest :func:`collector.ingest.dead_letter` gives this message."""
    return hashlib.sha256(safe_text(topic_name).encode("utf-8") + b"\x00" + payload).hexdigest()


# --- the bad ones -----------------------------------------------------------------------------


def _base(kind: str, device: str, nonce: int, rnd: random.Random) -> dict[str, Any]:
    """A valid message of ``kind`` as a JSON object, with an unknown ``nonce`` field first."""
    env = {"device": device, "boot": f"b{rnd.randrange(3)}", "seq": rnd.randrange(10**6),
           "ts": T0 + rnd.random()}  # fmt: skip
    msg: Any
    if kind == "status":
        msg = StatusMessage(**env, state="online", agent_version="0.1.0", model="digits",
                            host={"model": "Raspberry Pi 4", "cores": 4})  # fmt: skip
    elif kind == "outliers":
        msg = OutlierEvent(**env, score=9.5, threshold=3.0, prediction="7",
                           input=InputSummary((1, 8), 0.5, 0.1, 0.0, 1.0))  # fmt: skip
    elif kind == "cmd/reply":
        msg = CommandReply(**env, id="c-1", ok=True, result={"p95_ms": 1.5, "runs": [1, 2]})
    else:
        rng = np.random.default_rng(nonce)
        msg = window(device, env["seq"], rng=rng, n=10, ts=env["ts"], boot=env["boot"])
    return {"nonce": nonce, **json.loads(encode(msg))}


def _string_places(kind: str) -> list[tuple[str, ...]]:
    """Paths of string values in a message of ``kind`` (the last part is set or added)."""
    common = [("extra",), ("extra_list", "0")]
    return (
        common
        + {
            "telemetry": [("model",), ("model_version",)],
            "status": [("agent_version",), ("model",), ("runtime",), ("host", "model")],
            "outliers": [("prediction",), ("model",)],
            "cmd/reply": [("result", "note")],
        }[kind]
    )


def _key_places(kind: str) -> list[tuple[str, ...]]:
    """Objects of a message of ``kind`` where a key can be added."""
    return [()] + {
        "telemetry": [("predictions",), ("latency_ms",)],
        "status": [("host",)],
        "outliers": [("input",)],
        "cmd/reply": [("result",)],
    }[kind]


def _set(obj: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node: Any = obj
    for key in path[:-1]:
        if key not in node:
            node[key] = [] if key.endswith("_list") else {}
        node = node[key]
    last = path[-1]
    if isinstance(node, list):
        node.append(value)
    else:
        node[last] = value


def _get(obj: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = obj
    for key in path:
        node = node[key]
    return node


def _json(obj: Any) -> bytes:
    # ensure_ascii: a lone surrogate or a NUL is written as a \u escape, as JSON allows
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":")).encode()


def _bad_char(rnd: random.Random, nul: bool) -> str:
    return "\x00" if nul else chr(rnd.randrange(0xD800, 0xE000))


def _with_bad_char(rnd: random.Random, nul: bool, text: str | None = None) -> str:
    """``text`` (or a chosen one) holding a NUL or a lone surrogate at a random place."""
    if text is not None and any(c == "\x00" or 0xD800 <= ord(c) <= 0xDFFF for c in text):
        return text
    base = text if text is not None else rnd.choice(["digits", "", "Pi 4 ✓", "modèle", "x" * 40])
    at = rnd.randrange(len(base) + 1)
    return base[:at] + _bad_char(rnd, nul) + base[at:]


_NUMBER_PATHS = (
    ("ts",), ("window_start",), ("window_s",), ("cpu_percent",), ("temperature_c",),
    ("latency_ms", "p50"), ("latency_ms", "max"), ("latency_ms", "bounds", 3),
)  # fmt: skip
_WRONG_TYPES: tuple[tuple[tuple[Any, ...], Any], ...] = (
    (("seq",), "17"), (("seq",), 1.5), (("seq",), True), (("seq",), -3), (("v",), "1"),
    (("kind",), 7), (("device",), 5), (("inferences",), None), (("latency_ms",), []),
    (("scores",), "x"), (("predictions",), [1, 2]), (("window_s",), "10"),
    (("throttled",), "yes"), (("model",), 12), (("errors",), {"n": 1}),
    (("latency_ms", "counts"), [1, 2, 3]), (("predictions", "3"), -1), (("boot",), "a b"),
    (("outliers",), 10**6),
)  # fmt: skip


def bad_message(
    kind: str, fleet: str, nonce: int, rnd: random.Random, text: str | None = None
) -> Traffic:
    """One message of ``kind`` (one of :data:`BAD_KINDS`, or :data:`STORE_REFUSED`) that the
    collector must dead-letter. ``text``, for the surrogate and NUL kinds, is the string to
    put in (a bad character is added unless it holds one)."""
    if kind == STORE_REFUSED:
        return refused_by_store(fleet, nonce)
    device = f"bad-{rnd.randrange(10)}"
    msg_kind = rnd.choice(["telemetry", "telemetry", "status", "outliers", "cmd/reply"])
    t = topic(fleet, device, msg_kind)  # type: ignore[arg-type]
    obj = _base(msg_kind, device, nonce, rnd)
    if kind in ("surrogate_value", "nul"):
        path = rnd.choice(_string_places(msg_kind))
        _set(obj, path, _with_bad_char(rnd, kind == "nul", text))
        return t, _json(obj)
    if kind == "surrogate_key":
        where = rnd.choice(_key_places(msg_kind))
        key = _with_bad_char(rnd, rnd.random() < 0.3, text)
        _get(obj, where)[key] = 1 if where != () else "v"
        return t, _json(obj)
    if kind == "duplicate_surrogate_key":  # the 27 bytes, varied
        key = _with_bad_char(rnd, False, text)
        return t, b"{%s:1,%s:%d}" % (_json(key), _json(key), nonce)
    if kind == "non_utf8":
        good = _json(obj)
        junk = rnd.choice([b"\xff", b"\xfe\xff", b"\xed\xa0\x80", b"\xc3", b"\xc0\xaf", b"\x80"])
        at = good.index(b'"nonce"')
        where = rnd.choice([at + 1, len(good) - 1, good.index(b":", at) + 1])
        return t, good[:where] + junk + good[where:]
    if kind == "non_finite":
        spelled = rnd.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e400"])
        path = rnd.choice(_NUMBER_PATHS) if msg_kind == "telemetry" else ("ts",)
        _set_path(obj, path, "__nf__")
        return t, _json(obj).replace(b'"__nf__"', spelled)
    if kind == "huge_number":
        field = rnd.choice(["seq", "seq", "inferences"] if msg_kind == "telemetry" else ["seq"])
        big = rnd.choice([b"%d" % (2**64 + nonce), b"1" + b"0" * 30, b"%d" % 2**63, b"9" * 5000])
        obj[field] = "__big__"  # written as text: json refuses integers over 4300 digits
        return t, _json(obj).replace(b'"__big__"', big)
    if kind == "deep_nesting":
        depth = rnd.randrange(1100, 6000)
        opener, closer = rnd.choice([(b"[", b"]"), (b'{"a":', b"}")])
        good = _json(obj)
        return t, good[:-1] + b',"deep":' + opener * depth + b"1" + closer * depth + b"}"
    if kind == "duplicate_key":
        good = _json(obj)
        key = rnd.choice([b"seq", b"device", b"v", b"kind", b"nonce"])
        value = json.dumps(obj[key.decode()]).encode()
        return t, good[:1] + b'"' + key + b'":' + value + b"," + good[1:]
    if kind == "wrong_type":
        obj = _base("telemetry", device, nonce, rnd)
        t = topic(fleet, device, "telemetry")
        path, value = rnd.choice(_WRONG_TYPES)
        _set_path(obj, path, value)
        return t, _json(obj)
    if kind == "bad_topic":
        obj = _base("telemetry", device, nonce, rnd)
        payload = _json(obj)
        bad = rnd.choice([
            f"edgeship/{fleet}/{device}/unknown",
            f"edgeship/{fleet}/{device}/telemetry/extra",
            f"edgeship/{fleet}/d*v{nonce % 5}/telemetry",
            f"edgeship/{fleet}/{'x' * 65}/telemetry",
            f"edgeship/{fleet}/dév/telemetry",
            f"edgeship/{fleet}/{device}",
            f"edgeship/{fleet}//telemetry",
            f"edgeship/{fleet}/{device}/status",  # a telemetry payload on a status topic
            f"edgeship/{fleet}/other-{device}/telemetry",  # another device's payload
        ])  # fmt: skip
        return bad, payload
    if kind == "not_json":
        good = _json(obj)
        cut = rnd.randrange(good.index(b",") + 1, len(good))  # an object left open
        return t, rnd.choice([good[:cut], good + b"trailing", b"nonce %d" % nonce])
    if kind == "empty":
        return topic(fleet, f"empty-{nonce}", "telemetry"), b""
    raise ValueError(f"unknown bad kind {kind!r}")


def _set_path(obj: dict[str, Any], path: tuple[Any, ...], value: Any) -> None:
    node: Any = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def bad_kinds_cycle(rnd: random.Random, n: int, store_refused: int = 0) -> list[str]:
    """``n`` kinds: every kind of :data:`BAD_KINDS` about equally often, plus
    ``store_refused`` of :data:`STORE_REFUSED`, shuffled."""
    kinds = [BAD_KINDS[i % len(BAD_KINDS)] for i in range(n - store_refused)]
    kinds += [STORE_REFUSED] * store_refused
    rnd.shuffle(kinds)
    return kinds


def interleave(
    good: list[Traffic], bad: list[Traffic], rnd: random.Random
) -> list[tuple[bool, Traffic]]:
    """``good`` in its order with ``bad`` put at random places; (is_good, message) each."""
    slots = sorted(rnd.randrange(len(good) + 1) for _ in bad)
    out: list[tuple[bool, Traffic]] = []
    b = 0
    for i, g in enumerate(good):
        while b < len(bad) and slots[b] == i:
            out.append((False, bad[b]))
            b += 1
        out.append((True, g))
    out.extend((False, m) for m in bad[b:])
    return out


def storable(text: str) -> bool:
    """True when ``text`` encodes as UTF-8 (no lone surrogate) and holds no NUL."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return "\x00" not in text
