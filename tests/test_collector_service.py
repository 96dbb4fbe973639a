"""The collector service against real brokers (a private Mosquitto per test, amqtt for the
3.1.1 fallback) and real stores: collection and the JSON API, malformed input, the Last Will
and staleness, shared subscriptions on PostgreSQL, and a SIGKILL in the middle of a stream."""

from __future__ import annotations

import json
import os
import random
import signal
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

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from collector.service import Collector, CollectorConfig
from collector.simulate import SimConfig, SimulatedFleet
from collector.store import SCHEMA_VERSION, open_store
from device_agent.contracts.messages import encode, topic
from tests.brokers import ROOT, Amqtt, Mosquitto, free_port, wait_for
from tests.faults_report import record
from tests.test_collector_ingest import status, telemetry
from tests.test_collector_store import PG_URL, pg_available, pg_url


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(tmp_path / "mosquitto", extra_conf="max_inflight_messages 1000") as b:
        yield b


def get(url: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def publisher(port: int) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def publish_all(c: mqtt.Client, items: list[tuple[str, bytes]]) -> None:
    infos = [c.publish(t, p, qos=1) for t, p in items]
    for info in infos:
        info.wait_for_publish(10)


def collector_config(broker_url: str, store_url: str, **over: Any) -> CollectorConfig:
    values: dict[str, Any] = dict(
        broker_url=broker_url,
        store_url=store_url,
        http="127.0.0.1:0",
        client_id=f"test-{uuid.uuid4().hex[:8]}",
        batch_interval_s=0.05,
        keepalive_s=5,
    )
    values.update(over)
    return CollectorConfig(**values)


def stored_exactly(
    store_url: str, fleet: str, published: dict[str, dict[str, Any]]
) -> dict[str, int]:
    """Compare the store with what the broker acknowledged: counts of missing and extra."""
    store = open_store(store_url)
    try:
        ranges = {(r.device, r.boot): r for r in store.boot_ranges(fleet)}
        total = sum(store.count_messages(fleet).values())
    finally:
        store.close()
    missing = extra = 0
    for device, info in published.items():
        seqs = info["seqs"]
        r = ranges.get((device, info["boot"]))
        if r is None:
            missing += len(seqs)
            continue
        # The unique key makes a stored (device, boot, seq) unique; equal counts over the same
        # range mean every published number is there, once.
        same_range = (r.min_seq, r.max_seq) == (min(seqs), max(seqs))
        missing += max(0, len(seqs) - r.messages) + int(not same_range)
        extra += max(0, r.messages - len(seqs))
    return {"missing": missing, "extra": extra, "total": total}


# --- collection, the API and malformed input --------------------------------------------------


def test_collects_a_fleet_serves_the_api_and_survives_garbage(
    broker: Mosquitto, tmp_path: Path
) -> None:
    fleet = "farm"
    store_url = f"sqlite:///{tmp_path}/fleet.db"
    config = collector_config(broker.url, store_url, fleet=fleet)
    with Collector(config) as c:
        # start() returns once messages flow: the broker has granted the subscription.
        assert c.stats.subscribed, c.stats
        host, port = c.http_address_bound()
        api = f"http://{host}:{port}"
        # Windows of 60 s: the API calls below must see the fleet online however long a busy
        # machine takes over the garbage (0.2 s windows went stale 0.6 s after the last one).
        sim = SimulatedFleet(
            SimConfig(broker.url, fleet=fleet, devices=5, period_s=0.2, window_s=60.0)
        ).connect()
        for _ in range(3):
            sim.publish_round()
        assert sim.wait_acked(30)
        good = sum(len(v["seqs"]) for v in sim.published.values())

        # Garbage of every kind, and a duplicate of a stored window.
        rng = random.Random(7)
        dev = "sim-0000"
        base = json.loads(encode(telemetry(seq=1)))
        garbage: list[tuple[str, bytes]] = [
            (topic(fleet, dev, "telemetry"), b"not json"),
            (topic(fleet, dev, "telemetry"), json.dumps(dict(base, v=2)).encode()),
            (topic(fleet, dev, "telemetry"), json.dumps(dict(base, inferences="many")).encode()),
            (topic(fleet, dev, "telemetry"), b"{" + b" " * (1 << 20) + b"}"),
            (f"edgeship/{fleet}/{dev}/unknown-kind", b"{}"),
            (topic(fleet, dev, "status"), b"\x00\x01\x02"),
        ]
        for _ in range(300):
            name = rng.choice(["telemetry", "status", "outliers", "cmd/reply"])
            noise = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
            garbage.append((topic(fleet, f"junk-{rng.randrange(5)}", name), noise))  # type: ignore[arg-type]
        pub = publisher(broker.port)
        publish_all(pub, garbage)
        again = sim.telemetry_payload(sim._devices[0], 5)  # seq 5 was never sent: new
        publish_all(pub, [(topic(fleet, "sim-0000", "telemetry"), again)] * 3)
        expected = good + len(garbage) + 3
        assert wait_for(lambda: c.stats.received >= expected, 30), c.stats

        stats = c.stats
        assert stats.stored == good + 1 and stats.duplicates == 2
        assert stats.dead_letters == len(garbage)
        assert stats.dead_by_field["payload"] >= 300 and stats.dead_by_field["v"] == 1
        assert stats.dead_by_field["topic.kind"] == 1 and stats.dead_by_field["inferences"] == 1

        code, health = get(f"{api}/api/health")
        assert code == 200 and health["ok"] and health["collector"]["dead_letters"] == len(garbage)
        assert (
            health["subscription"] == f"edgeship/{fleet}/#"
            and health["schema_version"] == SCHEMA_VERSION
        )
        code, devices = get(f"{api}/api/devices")
        assert code == 200 and devices["summary"]["devices"] == 5
        assert devices["summary"]["online"] == 5 and devices["summary"]["latency_ms"]["p95"] > 0
        assert devices["summary"]["dead_letters"]["payload"] >= 300
        first = devices["devices"][0]
        assert first["model"] == "sim-model" and first["status"] == "online"
        assert first["gaps"]["missing"] == 0 and first["temperature_c"] is not None
        code, one = get(f"{api}/api/devices/sim-0000?series=2")
        assert code == 200 and len(one["series"]) == 2 and one["series"][-1]["seq"] == 5
        assert any(e["kind"] == "status" for e in one["events"])
        assert get(f"{api}/api/devices/nobody")[0] == 404
        assert get(f"{api}/api/devices/sim-0000?series=abc")[0] == 400
        code, dead = get(f"{api}/api/dead-letters?limit=5")
        assert code == 200 and len(dead["newest"]) == 5 and dead["counts"]["payload"] >= 300
        assert get(f"{api}/api/nothing")[0] == 404
        req = urllib.request.Request(f"{api}/api/devices", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(req, timeout=5)
        assert info.value.code == 403  # no API token configured: nothing changes state
        sim.close()
        pub.disconnect()
        pub.loop_stop()
        assert wait_for(lambda: c.state.snapshot().counts["offline"] == 5, 10)
    store = open_store(store_url)
    assert store.dead_letter_counts()["topic.kind"] == 1
    big = [d for d in store.dead_letters(1000) if d.size > 1 << 20]
    assert len(big) == 1 and len(big[0].payload) == 64 * 1024
    store.close()


# --- offline by the Last Will, stale by silence -----------------------------------------------


def test_offline_within_keepalive_grace_and_stale_when_silent(
    broker: Mosquitto, tmp_path: Path
) -> None:
    fleet = "lw"
    keepalive = 2
    window = 0.5
    config = collector_config(broker.url, f"sqlite:///{tmp_path}/f.db", fleet=fleet,
                              stale_windows=3.0)  # fmt: skip
    with Collector(config) as c:
        sim = SimulatedFleet(SimConfig(broker.url, fleet=fleet, devices=4, period_s=window,
                                       keepalive_s=keepalive)).connect()  # fmt: skip
        names = sim.devices
        silent_link, crashed, quiet, healthy = names
        for i in range(3):
            if i == 2:
                # quiet's last telemetry: the collector receives it after this instant, so
                # by the rule (3 windows of silence) it cannot be stale before t_last + 1.5 s.
                t_last = time.time()
            sim.publish_round()
            time.sleep(window)
        assert sim.wait_acked(30)

        def statuses() -> dict[str, str]:
            return {d.device: d.status for d in c.state.snapshot().devices}

        # Every device known; on a slow machine quiet may already be stale here, which is fine.
        assert wait_for(lambda: "unknown" not in statuses().values() and len(statuses()) == 4,
                        30), statuses()  # fmt: skip
        # silent_link: the network goes away (no FIN, no pings); the broker notices after
        # 1.5 x keepalive and publishes the will. crashed: the socket closes (a crash).
        t0 = time.monotonic()
        sim.drop([crashed])
        sim.freeze([silent_link])
        want = {silent_link: "offline", crashed: "offline", quiet: "stale"}
        seen: dict[str, float] = {}
        quiet_stale_at = 0.0
        deadline = t0 + 1.5 * keepalive + 60
        while time.monotonic() < deadline and len(seen) < len(want):
            sim.publish_round([healthy])
            now = statuses()
            for name, target in want.items():
                if name not in seen and now[name] == target:
                    seen[name] = time.monotonic() - t0
                    quiet_stale_at = time.time() if name == quiet else quiet_stale_at
            time.sleep(0.1)
        assert {n: statuses()[n] for n in want} == want, (statuses(), seen)
        # A device that keeps talking stays online (polled: one slow loop turn on a busy
        # machine may leave it silent for 3 windows, which is its rule for stale).
        assert wait_for(lambda: (sim.publish_round([healthy]), statuses()[healthy])[1] == "online",
                        30), statuses()  # fmt: skip
        # The rule, not a latency: stale only after 3 windows without telemetry.
        assert quiet_stale_at >= t_last + 3 * window, (quiet_stale_at - t_last, seen)
        # Latencies depend on the machine and on Mosquitto's 5 s sweep for expired clients
        # (keepalive.c): printed, not asserted.
        print(
            f"\nmeasured: crash -> offline {seen[crashed]:.2f} s, silent link -> offline "
            f"{seen[silent_link]:.2f} s (keepalive {keepalive} s, broker grace "
            f"{1.5 * keepalive:g} s), silence -> stale {quiet_stale_at - t_last:.2f} s after "
            f"the last window ({3 * window:g} s by the rule)"
        )
        sim.close(goodbye=False)


# --- protocol fallback ------------------------------------------------------------------------


def test_falls_back_to_mqtt_311_on_a_broker_without_v5(tmp_path: Path) -> None:
    with Amqtt(tmp_path) as amqtt:
        config = collector_config(amqtt.url, f"sqlite:///{tmp_path}/f.db", fleet="old",
                                  worker="thread", http=None)  # fmt: skip
        with Collector(config) as c:
            assert wait_for(lambda: c.stats.connected and c.stats.subscribed, 20)
            assert c.stats.protocol == "3.1.1"
            pub = publisher(amqtt.port)
            msg = telemetry(seq=1)
            publish_all(pub, [(topic("old", msg.device, "telemetry"), encode(msg))])
            assert wait_for(lambda: c.stats.stored == 1, 20), c.stats
            pub.disconnect()
            pub.loop_stop()


# --- shared subscriptions on PostgreSQL -------------------------------------------------------


def test_two_collectors_share_a_fleet_and_store_each_message_once(broker: Mosquitto) -> None:
    if not pg_available():
        pytest.skip(f"no PostgreSQL at {PG_URL}")
    fleet = "shared"
    url = pg_url()
    configs = [
        collector_config(
            broker.url,
            url,
            fleet=fleet,
            share_group="collectors",
            http=None,
            client_id=f"shared-{i}",
        )
        for i in range(2)
    ]
    collectors = [Collector(cfg).start() for cfg in configs]
    try:
        # Both shares subscribed (SUBACK), not just connected, before the fleet talks: a
        # message published before then goes to the one share there is, or to nobody.
        assert wait_for(lambda: all(c.stats.subscribed for c in collectors), 20)
        sim = SimulatedFleet(SimConfig(broker.url, fleet=fleet, devices=10, period_s=0.1)).connect()
        for _ in range(30):
            sim.publish_round()
        assert sim.wait_acked(30)
        published = sim.published
        total = sum(len(v["seqs"]) for v in published.values())
        assert wait_for(lambda: sum(c.stats.stored for c in collectors) >= total, 30)
        shares = [c.stats.received for c in collectors]
        # Redeliver a few stored messages to both collectors' shares: the store keeps one each.
        pub = publisher(broker.port)
        again = sim.telemetry_payload(sim._devices[0], 1)
        publish_all(pub, [(topic(fleet, "sim-0000", "telemetry"), again)] * 6)
        assert wait_for(lambda: sum(c.stats.received for c in collectors) >= total + 6, 20)
        pub.disconnect()
        pub.loop_stop()
        sim.close(goodbye=False)
    finally:
        for c in collectors:
            c.stop()
    assert all(s > total * 0.2 for s in shares), shares  # each got a real share
    assert sum(shares) == total  # shared: each message went to one of them
    result = stored_exactly(url, fleet, published)
    assert result == {"missing": 0, "extra": 0, "total": total}, result
    assert sum(c.stats.duplicates for c in collectors) == 6
    print(f"\nshared subscription split {shares} of {total}; store holds {result['total']}")
    store = open_store(url)
    store.drop_schema()  # type: ignore[union-attr]
    store.close()


# --- the CLI and SIGKILL ----------------------------------------------------------------------


def _collect_cmd(
    broker: Mosquitto, store_url: str, fleet: str, http: str, *extra: str
) -> list[str]:
    return [
        sys.executable, "-m", "sdk.cli", "collect", "--broker", broker.url, "--fleet", fleet,
        "--store", store_url, "--http", http, "--client-id", f"cli-{fleet}", *extra,
    ]  # fmt: skip


def test_cli_collect_runs_until_sigterm(broker: Mosquitto, tmp_path: Path) -> None:
    port = free_port()
    store_url = f"sqlite:///{tmp_path}/f.db"
    proc = subprocess.Popen(
        _collect_cmd(broker, store_url, "cli", f"127.0.0.1:{port}"),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        # 90 s: the collector imports FastAPI/uvicorn, slow on a busy 2-core machine.
        assert wait_for(lambda: _health(port) is not None, 90), proc.poll()
        pub = publisher(broker.port)
        msg = status(seq=1)
        # Retained, as agents send it: the API answers before the session has subscribed.
        pub.publish(
            topic("cli", msg.device, "status"), encode(msg), qos=1, retain=True
        ).wait_for_publish(10)
        assert wait_for(lambda: (_health(port) or {}).get("collector", {}).get("stored") == 1, 60)
        pub.disconnect()
        pub.loop_stop()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "collecting edgeship/cli/# from" in out and "stopped: 1 received, 1 stored" in out
    assert "Traceback" not in err


def test_cli_collect_serves_the_api_over_https(broker: Mosquitto, tmp_path: Path) -> None:
    """--http-tls-cert/--http-tls-key: the API (and the token with it) over HTTPS only."""
    import ssl

    from tests.pki import CertificateAuthority

    ca = CertificateAuthority.create(tmp_path / "pki")
    server = ca.issue_server("collector")
    port = free_port()
    tls = ["--http-tls-cert", str(server.cert), "--http-tls-key", str(server.key)]
    proc = subprocess.Popen(
        _collect_cmd(broker, f"sqlite:///{tmp_path}/f.db", "tls", f"127.0.0.1:{port}", *tls),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    context = ssl.create_default_context(cafile=str(ca.cert))

    def health_over_tls() -> bool:
        try:
            url = f"https://127.0.0.1:{port}/api/health"
            with urllib.request.urlopen(url, timeout=10, context=context) as answer:
                return bool(answer.status == 200)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            return False

    try:
        assert wait_for(health_over_tls, 90), proc.poll()
        assert _health(port) is None  # plain HTTP gets no answer
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert f"API https://127.0.0.1:{port}/api/health" in out, out
    # Half a pair is bad input: exit 2, one line.
    half = subprocess.run(
        _collect_cmd(broker, f"sqlite:///{tmp_path}/g.db", "tls", "127.0.0.1:0", *tls[:2]),
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert half.returncode == 2 and "certificate and its key" in half.stderr, half.stderr


def test_cli_collect_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for args in (
        ["--broker", "ftp://x"],
        ["--broker", "mqtt://127.0.0.1:1", "--store", "mysql://db/x"],
        ["--broker", "mqtt://127.0.0.1:1", "--fleet", "bad/fleet"],
        ["--broker", "mqtt://127.0.0.1:1", "--store", "postgresql://nobody@127.0.0.1:1/x"],
    ):
        out = subprocess.run([sys.executable, "-m", "sdk.cli", "collect", "--http", "off", *args],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.count("\n") == 1 and out.stderr.startswith("edgeship: error:"), out.stderr


def _collector(port: int) -> dict[str, Any]:
    return dict((_health(port) or {}).get("collector") or {})


def _stored(port: int) -> int:
    return int(_collector(port).get("stored", 0))


def _health(port: int) -> dict[str, Any] | None:
    try:
        return get(f"http://127.0.0.1:{port}/api/health")[1]
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


@pytest.mark.parametrize(
    ("url", "part"),
    [
        ("ftp://u:hunter2@host", "scheme 'ftp'"),
        ("mqtt://u:hunter2@host:99999", "port 99999"),
        ("mqtt://u:hunter2@:1883", "no host"),
        ("mqtt://u:hunter2@host/path", "path"),
    ],
)
def test_a_bad_broker_url_is_a_config_error_naming_the_part_never_the_password(
    url: str, part: str
) -> None:
    """The collector reads --broker with the one grammar every program shares
    (device_agent.contracts.broker): the error names what is wrong, not the password."""
    from collector.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        CollectorConfig(url, http=None)
    assert part in str(info.value) and "hunter2" not in str(info.value), info.value
    good = CollectorConfig("mqtts://u:hunter2@Host.example", http=None)
    assert good.broker.display() == "mqtts://u@host.example:8883"
    assert "hunter2" not in repr(good) + repr(good.broker)


@pytest.mark.slow
@pytest.mark.faults
def test_sigkill_mid_stream_then_restart_after_30s_stores_everything_once(
    broker: Mosquitto, tmp_path: Path
) -> None:
    fleet = "kill"
    store_url = f"sqlite:///{tmp_path}/f.db"
    port = free_port()
    cmd = _collect_cmd(broker, store_url, fleet, f"127.0.0.1:{port}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)  # fmt: skip
    sim = SimulatedFleet(SimConfig(broker.url, fleet=fleet, devices=20, period_s=0.2)).connect()
    stop = threading.Event()
    runner = threading.Thread(target=sim.run, args=(120.0, stop), daemon=True)
    second: subprocess.Popen[str] | None = None
    try:
        # Deadlines of 90 s: start-up (FastAPI/uvicorn imports) and the first 300 windows are
        # slow on a busy 2-core machine.
        assert wait_for(lambda: _health(port) is not None, 90)
        # The fleet talks once the broker has granted the subscription (SUBACK), not when the
        # API answers: a window published before then goes to no one (a fresh session), and
        # a fresh-clone run lost sim-0000's first window that way.
        assert wait_for(lambda: _collector(port).get("subscribed"), 60), _collector(port)
        runner.start()
        assert wait_for(lambda: _stored(port) > 300, 90)
        # Kill while messages are received but not committed (so not acknowledged either).
        snapshot: dict[str, Any] = {}

        def in_flight() -> bool:
            snapshot.update(_collector(port))
            return int(snapshot.get("uncommitted", 0)) > 0

        assert wait_for(in_flight, 60, interval=0.001)
        # A batch is in flight for ~50 ms only: freeze the collector at once, then let the
        # fleet publish 2 more rounds, which the broker sends to the frozen collector and
        # holds un-acknowledged. So the kill always leaves messages for the broker to re-send.
        first.send_signal(signal.SIGSTOP)
        before = dict(snapshot)

        def acked() -> int:
            return sum(len(v["seqs"]) for v in sim.published.values())

        acked_at_stop = acked()
        assert wait_for(lambda: acked() >= acked_at_stop + 2 * 20, 60)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        time.sleep(30)  # the fleet keeps publishing; the broker queues for the session
        second = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)  # fmt: skip
        t_restart = time.monotonic()
        assert wait_for(lambda: _health(port) is not None, 90)
        time.sleep(3)
        stop.set()
        runner.join(10)
        assert sim.wait_acked(30)
        published = sim.published
        total = sum(len(v["seqs"]) for v in published.values())
        assert wait_for(lambda: stored_exactly(store_url, fleet, published)["missing"] == 0, 60), (
            stored_exactly(store_url, fleet, published)
        )
        recovery_s = round(time.monotonic() - t_restart, 2)
        after = _collector(port)
    finally:
        stop.set()
        for p in (first, second):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.communicate(timeout=30)
        sim.close(goodbye=False)
    result = stored_exactly(store_url, fleet, published)
    record(
        "collector SIGKILL mid-stream, restarted after 30 s",
        devices=20,
        sent=total,
        stored=result["total"],
        lost=result["missing"],
        **{"stored twice": result["extra"]},
        uncommitted_at_kill=before["uncommitted"],
        redelivered_after_restart=after["redelivered"],
        duplicates_dropped=after["duplicates"],
        recovery_s=recovery_s,
    )
    assert result == {"missing": 0, "extra": 0, "total": total}, result
    # What was in flight at the kill came back from the broker, flagged as re-sent.
    assert after["redelivered"] > 0, after
    print(
        f"\nSIGKILL with {before['uncommitted']} received but uncommitted, after "
        f"{before['stored']} stored; restarted after 30 s; the broker re-sent "
        f"{after['redelivered']} un-acknowledged messages; after restart {after['received']} "
        f"received, {after['stored']} new, {after['duplicates']} duplicates dropped; "
        f"store holds {result['total']} = published {total}, each once"
    )


def test_a_failed_start_stops_what_it_started(tmp_path: Path) -> None:
    import socket

    from collector.errors import ConfigError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = collector_config("mqtt://127.0.0.1:1", f"sqlite:///{tmp_path}/f.db",
                                  http=f"127.0.0.1:{port}")  # fmt: skip
        before = {t.name for t in threading.enumerate()}
        with pytest.raises(ConfigError, match="Address already in use"):
            Collector(config).start()
        assert {t.name for t in threading.enumerate()} <= before  # no thread, no worker left
