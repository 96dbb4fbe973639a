"""Secrets off the command line (issue 14, acceptance 4): the broker password of ``edgeship
deploy``, ``edgeship bench --device`` and ``edgeship collect`` from a file or the environment,
and the collector API's separate read token.

A real Mosquitto with a password per user, a real agent (its own user), and each command as a
real subprocess. While they run, a sampler reads every process's command line from ``/proc``
and ``ps -eo args``; afterwards every line they printed, their ``--json`` reports, the
collector's output and the broker's log are searched: the password is in none of them. The
sampler must have seen each command's own command line, so an empty sample cannot pass.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from collector.config import READ_TOKEN_ENV, CollectorConfig, load_read_token
from device_agent import Agent, AgentConfig
from device_agent.contracts.broker import BrokerUrl
from device_agent.contracts.broker_password import (
    PASSWORD_ENV,
    BrokerPassword,
    resolve_broker_password,
    url_with_password,
)
from device_agent.errors import ConfigError
from tests.brokers import ROOT, Mosquitto, free_port, wait_for
from tests.helpers import write_mlp_onnx

FLEET = "sec"
DEVICE = "pi-s"
# Characters a URL would need encoded, so the collector's in-memory URL is exercised too.
PASSWORDS = {
    "operator": f"op-{uuid.uuid4().hex}",
    "collector": f"co@l:l/e#c%t {uuid.uuid4().hex[:12]}",
    DEVICE: f"dev-{uuid.uuid4().hex}",
}
READ_TOKEN = "read-" + uuid.uuid4().hex
WRITE_TOKEN = "write-" + uuid.uuid4().hex


def forms(password: str) -> list[str]:
    """The password as it could leak: raw, percent-encoded, and as a repr would show it."""
    return [password, quote(password, safe=""), repr(password)[1:-1]]


@dataclass
class Rig:
    broker: Mosquitto
    work: Path
    bundles: dict[str, Path]

    def url(self, user: str) -> str:
        return f"mqtt://{user}@127.0.0.1:{self.broker.port}"


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    from sdk.artifact import read_artifact
    from sdk.package import package

    work = tmp_path_factory.mktemp("secrets")
    passwd = work / "passwd"
    passwd.touch(mode=0o600)
    for user, password in PASSWORDS.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True)
    bundles = {}
    for version in ("1", "2"):
        model = write_mlp_onnx(work / f"v{version}.onnx", seed=int(version))
        bundles[version] = package(
            read_artifact(model), work / f"bundle-v{version}", name="mlp", version=version
        ).root
    with Mosquitto(work / "broker", persistence=False, password_file=passwd) as broker:
        yield Rig(broker, work, bundles)


@pytest.fixture
def agent(rig: Rig, tmp_path: Path) -> Iterator[Agent]:
    config = AgentConfig(
        device_id=DEVICE,
        fleet=FLEET,
        broker_url=f"mqtt://127.0.0.1:{rig.broker.port}",
        username=DEVICE,
        password=PASSWORDS[DEVICE],
        window_s=0.3,
        state_dir=tmp_path / "state",
        deploy_probation_inferences=0,
    )
    started = Agent.from_bundle(rig.bundles["1"], config).start()
    try:
        assert wait_for(lambda: started.stats.get("connected"), 15), started.stats
        yield started
    finally:
        started.close()


class Sampler:
    """Reads ``/proc/<pid>/cmdline`` of every process and ``ps -eo args``, over and over,
    until stopped: everything any user of the machine could have seen."""

    def __init__(self) -> None:
        self.seen: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            for proc in Path("/proc").iterdir():
                if proc.name.isdigit():
                    try:
                        raw = (proc / "cmdline").read_bytes()
                    except OSError:
                        continue
                    self.seen.add(raw.replace(b"\0", b" ").decode("utf-8", "replace"))
            ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True)
            self.seen.update(ps.stdout.splitlines())
            self._stop.wait(0.05)

    def saw(self, *words: str) -> bool:
        return any(all(w in line for w in words) for line in self.seen)


def _edgeship(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> Any:
    return subprocess.run(
        [sys.executable, "-m", "sdk.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _get(url: str, authorization: str | None = None) -> tuple[int, Any, Any]:
    headers = {} if authorization is None else {"Authorization": authorization}
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=20) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), exc.headers


def _secret_file(path: Path, text: str) -> Path:
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("source", ["file", "env"])
def test_the_broker_password_never_shows_in_ps_or_any_output(
    source: str, rig: Rig, agent: Agent, tmp_path: Path
) -> None:
    """collect, deploy, bench --device and a fleet rollout each connect with a password from
    ``source``."""

    def how(user: str) -> tuple[list[str], dict[str, str]]:
        env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
        if source == "env":
            return [], {**env, PASSWORD_ENV: PASSWORDS[user]}
        path = _secret_file(tmp_path / f"{user}.pw", PASSWORDS[user])
        return ["--broker-password-file", str(path)], env

    port = free_port()
    api = f"http://127.0.0.1:{port}"
    extra, env = how("collector")
    collect_cmd = [
        sys.executable, "-m", "sdk.cli", "-v", "collect", "--broker", rig.url("collector"),
        *extra, "--fleet", FLEET, "--store", f"sqlite:///{tmp_path / 'fleet.db'}",
        "--http", f"127.0.0.1:{port}", "--workers", "1",
    ]  # fmt: skip
    outputs: list[str] = []
    with Sampler() as sampler:
        collector = subprocess.Popen(
            collect_cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:

            def device_seen() -> bool:
                try:
                    status, body, _ = _get(f"{api}/api/devices")
                except OSError:
                    return False
                return status == 200 and DEVICE in body.decode()

            assert wait_for(device_seen, 120), "the collector never saw the device"
            extra, env = how("operator")
            report = tmp_path / "deploy.json"
            deployed = _edgeship(
                "-v", "deploy", str(rig.bundles["2"]), "--device", DEVICE, "--fleet", FLEET,
                "--broker", rig.url("operator"), *extra, "--timeout", "120", "--no-wait",
                "--json", str(report), env=env,
            )  # fmt: skip
            assert deployed.returncode == 0, deployed.stdout + deployed.stderr
            assert wait_for(lambda: agent.bundle.manifest.model.version == "2", 30)
            bench_report = tmp_path / "bench.json"
            benched = _edgeship(
                "-v", "bench", "--device", DEVICE, "--fleet", FLEET, "--broker",
                rig.url("operator"), *extra, "--runs", "20", "--seconds", "0.3",
                "--json", str(bench_report), env=env,
            )  # fmt: skip
            assert benched.returncode == 0, benched.stdout + benched.stderr
            assert "latency (ms)" in benched.stdout
            # A fleet rollout (deploy without --device) connects with the same password.
            rollout_report = tmp_path / "rollout.json"
            rolled = _edgeship(
                "-v", "deploy", str(rig.bundles["1"]), "--fleet", FLEET, "--broker",
                rig.url("operator"), *extra, "--soak", "0", "--timeout", "120",
                "--state-dir", str(tmp_path / "rollouts"), "--json", str(rollout_report),
                env=env,
            )  # fmt: skip
            assert rolled.returncode == 0, rolled.stdout + rolled.stderr
            assert wait_for(lambda: agent.bundle.manifest.model.version == "1", 30)
        finally:
            collector.send_signal(signal.SIGTERM)
            out, _ = collector.communicate(timeout=60)
    outputs += [out.decode(), deployed.stdout, deployed.stderr, benched.stdout, benched.stderr]
    outputs += [rolled.stdout, rolled.stderr, rollout_report.read_text()]
    outputs += [p.read_text() for p in (tmp_path / "rollouts").glob("*.json")]
    outputs += [report.read_text(), bench_report.read_text(), rig.broker.log_text()]
    assert collector.returncode == 0, outputs[0]
    assert "stopped:" in outputs[0] and "collecting" in outputs[0]
    # The sampler saw each command while it ran: the negative below is not an empty sample.
    assert sampler.saw("collect", rig.url("collector"))
    assert sampler.saw("deploy", DEVICE, rig.url("operator"))
    assert sampler.saw("bench", "--device", DEVICE)
    assert sampler.saw("deploy", "--fleet", FLEET, "--soak")
    everything = "\n".join([*sampler.seen, *outputs])
    for user in ("collector", "operator"):
        for form in forms(PASSWORDS[user]):
            assert form not in everything, f"{user}'s password leaked"


def test_a_password_in_the_url_still_connects_and_is_warned_about(rig: Rig) -> None:
    password = PASSWORDS["operator"]
    url = f"mqtt://operator:{password}@127.0.0.1:{rig.broker.port}"
    env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
    # No agent: the broker accepted the password, the device is what does not answer (exit 1).
    done = _edgeship(
        "deploy", str(rig.bundles["2"]), "--device", "nobody", "--fleet", FLEET,
        "--broker", url, "--timeout", "3", env=env,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "did not answer" in done.stderr
    assert "ps shows it" in done.stderr and "--broker-password-file" in done.stderr
    assert password not in done.stdout + done.stderr


def _one_line(capsys: pytest.CaptureFixture[str], *expected: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def test_bad_password_files_and_two_passwords_are_one_line_and_exit_2(
    rig: Rig, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    from collector.cli import main as collector_main
    from sdk.cli import main

    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    secret = PASSWORDS["operator"]
    empty = tmp_path / "empty"
    empty.write_text("\n")
    two_lines = _secret_file(tmp_path / "two", f"{secret}\nsecond")
    good = _secret_file(tmp_path / "good", secret)
    cases: list[tuple[list[str], tuple[str, ...]]] = [
        (["--broker-password-file", str(tmp_path / "missing")], ("cannot read it", "missing")),
        (["--broker-password-file", str(empty)], ("is empty",)),
        (["--broker-password-file", str(tmp_path)], ("is a directory",)),
        (["--broker-password-file", str(two_lines)], ("more than one line",)),
    ]
    if os.geteuid() != 0:  # root reads a mode-000 file
        locked = _secret_file(tmp_path / "locked", secret)
        locked.chmod(0)
        cases.append((["--broker-password-file", str(locked)], ("cannot read it",)))
    commands = {
        "deploy": lambda url, extra: main(
            ["deploy", str(rig.bundles["2"]), "--device", DEVICE, "--broker", url, *extra]
        ),
        "bench": lambda url, extra: main(["bench", "--device", DEVICE, "--broker", url, *extra]),
        "collect": lambda url, extra: collector_main(
            [
                "--broker",
                url,
                "--store",
                f"sqlite:///{tmp_path / 'x.db'}",
                "--http",
                "off",
                *extra,
            ]
        ),
    }
    for name, run in commands.items():
        for extra, expected in cases:
            assert run(rig.url("operator"), extra) == 2, (name, extra)
            assert secret not in _one_line(capsys, *expected)
        # Two passwords: one in the URL, one from a file or the environment.
        in_url = f"mqtt://operator:{secret}@127.0.0.1:{rig.broker.port}"
        assert run(in_url, ["--broker-password-file", str(good)]) == 2, name
        assert secret not in _one_line(capsys, "given twice", "remove it from the URL")
        monkeypatch.setenv(PASSWORD_ENV, secret)
        assert run(in_url, []) == 2, name
        assert secret not in _one_line(capsys, "given twice", PASSWORD_ENV)
        # A password with no user to go with it.
        assert run(f"mqtt://127.0.0.1:{rig.broker.port}", []) == 2, name
        assert secret not in _one_line(capsys, "needs a user name")
        monkeypatch.delenv(PASSWORD_ENV)


def test_the_password_rule_and_the_collectors_url_in_memory(tmp_path: Path) -> None:
    url = "mqtt://op@hub:1883"
    path = _secret_file(tmp_path / "pw", "from-file")
    env = {PASSWORD_ENV: "from-env"}
    assert resolve_broker_password(url, path, env).password == "from-file"  # file > env
    assert resolve_broker_password(url, None, env) == BrokerPassword(
        "from-env", "env", PASSWORD_ENV
    )
    found = resolve_broker_password("mqtt://op:in-url@hub", None, {})
    assert (found.password, found.source) == ("in-url", "url")
    assert resolve_broker_password(url, None, {PASSWORD_ENV: ""}).password is None  # unset
    assert "from-env" not in repr(resolve_broker_password(url, None, env))
    path.write_bytes(b"crlf\r\n")
    assert resolve_broker_password(url, path, {}).password == "crlf"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        resolve_broker_password(url, path, {})
    # The collector folds a password into its URL in memory; it round-trips through the grammar.
    weird = PASSWORDS["collector"]
    text = url_with_password(BrokerUrl.parse("mqtts://c%40x@[::1]:8883"), weird)
    parsed = BrokerUrl.parse(text)
    assert (parsed.username, parsed.password, parsed.host, parsed.tls) == (
        "c@x",
        weird,
        "::1",
        True,
    )
    config = CollectorConfig("mqtt://collector@hub:1883", broker_password=weird)
    assert config.broker.password == weird and config.broker.username == "collector"
    assert weird not in repr(config) and quote(weird, safe="") not in repr(config)
    with pytest.raises(ConfigError, match="needs a user name"):
        CollectorConfig("mqtt://hub:1883", broker_password=weird)


# --- the collector API's read token -------------------------------------------------------------


GUARDED = ("/api/devices", "/api/dead-letters", "/api/alerts", "/metrics", "/", "/openapi.json",
           f"/api/devices/never-{DEVICE}", "/api/devices/", "/nowhere")  # fmt: skip

# No such route; no such device (not DEVICE: its agent publishes on this broker and fleet, and a
# collector that came up slowly on a busy machine had heard of it before the checks).
UNKNOWN = ("/nowhere", f"/api/devices/never-{DEVICE}")


def test_with_a_read_token_every_read_but_health_needs_a_token(rig: Rig, tmp_path: Path) -> None:
    read_file = _secret_file(tmp_path / "read-token", READ_TOKEN)
    write_file = _secret_file(tmp_path / "write-token", WRITE_TOKEN)
    pw_file = _secret_file(tmp_path / "collector.pw", PASSWORDS["collector"])
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "collector.cli",
            "--broker",
            rig.url("collector"),
            "--broker-password-file",
            str(pw_file),
            "--store",
            f"sqlite:///{tmp_path / 'r.db'}",
            "--http",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--api-read-token-file",
            str(read_file),
            "--api-token-file",
            str(write_file),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:

        def healthy() -> bool:
            try:
                return _get(f"{api}/api/health")[0] == 200
            except OSError:
                return False

        assert wait_for(healthy, 120), "the collector's API did not come up"
        assert _get(f"{api}/api/health/")[0] == 200  # open, with or without a trailing slash
        basic = "Basic " + base64.b64encode(f"anyone:{READ_TOKEN}".encode()).decode()
        refused = (None, f"Bearer wrong-{READ_TOKEN}", f"Basic {READ_TOKEN}",
                   f"Token {READ_TOKEN}", f"Bearer {READ_TOKEN}x")  # fmt: skip
        for path in GUARDED:
            for authorization in refused:
                status, body, headers = _get(api + path, authorization)
                assert status == 401, (path, authorization, status)
                challenges = headers.get_all("WWW-Authenticate")
                assert any(c.startswith("Basic") for c in challenges), challenges
                assert any(c.startswith("Bearer") for c in challenges), challenges
                assert READ_TOKEN not in body.decode()
            for authorization in (f"Bearer {READ_TOKEN}", basic, f"Bearer {WRITE_TOKEN}"):
                status, _, _ = _get(api + path, authorization)
                # past the guard: an unknown route or device is the route's own 404
                assert status == (404 if path in UNKNOWN else 200), (path, authorization)
        # The read token does not send commands; the write token does.
        command = json.dumps({"action": "ping"}).encode()
        for token, expected in ((READ_TOKEN, 401), (WRITE_TOKEN, 202)):
            request = urllib.request.Request(
                f"{api}/api/devices/pi-s/commands?fleet={FLEET}", data=command, method="POST",
                headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            )  # fmt: skip
            try:
                with urllib.request.urlopen(request, timeout=20) as resp:
                    status = resp.status
            except urllib.error.HTTPError as exc:
                status = exc.code
            assert status == expected, token
        _fleet_commands_send_their_tokens(api, read_file, write_file)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    text = out.decode()
    assert "(reads: token set)" in text
    for secret in (READ_TOKEN, WRITE_TOKEN, *forms(PASSWORDS["collector"])):
        assert secret not in text


def _fleet_commands_send_their_tokens(api: str, read_file: Path, write_file: Path) -> None:
    """edgeship fleet status / command against a collector whose reads need a token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_API")}
    # No token: one line that says which token is missing, exit 2.
    r = _edgeship("fleet", "status", "--collector", api, env=env)
    assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
    assert len(r.stderr.strip().splitlines()) == 1 and "read token" in r.stderr, r.stderr
    r = _edgeship("fleet", "status", "--collector", api, "--token-file", str(write_file) + "x",
                  env=env)  # fmt: skip
    assert r.returncode == 2 and "--token-file" in r.stderr, r.stderr
    # The read token from its file or the environment; the API token reads too.
    for extra, more_env in (
        (["--token-file", str(read_file)], {}),
        ([], {"EDGESHIP_API_READ_TOKEN": READ_TOKEN}),
        ([], {"EDGESHIP_API_TOKEN": WRITE_TOKEN}),
    ):
        r = _edgeship("fleet", "status", "--collector", api, "--json", *extra,
                      env={**env, **more_env})  # fmt: skip
        assert r.returncode == 0, (extra, more_env.keys(), r.stderr)
        assert json.loads(r.stdout)["collector"] == api
    r = _edgeship("fleet", "status", "--collector", api, env={**env, "EDGESHIP_API_READ_TOKEN":
                  "wrong-" + READ_TOKEN})  # fmt: skip
    assert r.returncode == 2 and "neither" in r.stderr, r.stderr
    # fleet command polls the reply with its token: no device answers here, so "no reply"
    # (exit 1), not a 401 on the reply's URL (exit 2).
    r = _edgeship("fleet", "command", "pi-s", "ping", "--fleet", FLEET, "--collector", api,
                  "--token-file", str(write_file), "--wait", "1", env=env)  # fmt: skip
    assert r.returncode == 1 and "no reply" in r.stdout, (r.returncode, r.stdout, r.stderr)
    for text in (r.stdout, r.stderr):
        assert READ_TOKEN not in text and WRITE_TOKEN not in text


def test_the_read_token_comes_from_a_file_or_the_environment(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="longer than 65536 bytes"):
        load_read_token("/dev/zero", {})  # read no further than a secret can be
    path = _secret_file(tmp_path / "t", READ_TOKEN)
    assert load_read_token(path, {READ_TOKEN_ENV: "ignored-" + WRITE_TOKEN}) == READ_TOKEN
    assert load_read_token(None, {READ_TOKEN_ENV: READ_TOKEN}) == READ_TOKEN
    assert load_read_token(None, {}) is None
    with pytest.raises(ConfigError, match="cannot read it"):
        load_read_token(tmp_path / "missing", {})
    path.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        load_read_token(path, {})
    path.write_text("short")
    with pytest.raises(ConfigError, match="at least 16"):
        load_read_token(path, {})
    with pytest.raises(ConfigError, match="at least 16"):
        load_read_token(None, {READ_TOKEN_ENV: "short"})


def test_fleet_sends_its_token_to_no_other_host_and_never_prints_it(tmp_path: Path) -> None:
    """A collector address that redirects (a proxy, a typo'd port) must not lead the token to
    another host; a token variable with a stray line break is trimmed; one with a character a
    header cannot carry is one line that does not quote it (urllib's own error would)."""
    import http.server

    seen: list[str | None] = []

    class Elsewhere(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(b'{"devices": [], "fleet": null, "at": 0}')

        def log_message(self, *args: Any) -> None:
            pass

    elsewhere = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Elsewhere)

    class Redirect(Elsewhere):
        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{elsewhere.server_port}{self.path}")
            self.send_header("Content-Length", "0")
            self.end_headers()

    redirect = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    servers = [elsewhere, redirect]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESHIP_API")}
    try:
        api = f"http://127.0.0.1:{redirect.server_port}"
        r = _edgeship("fleet", "status", "--collector", api,
                      env={**env, "EDGESHIP_API_READ_TOKEN": READ_TOKEN + "\r\n"})  # fmt: skip
        assert r.returncode == 2 and "redirect" in r.stderr, (r.returncode, r.stderr)
        assert seen == [] and READ_TOKEN not in r.stderr + r.stdout, seen
        direct = f"http://127.0.0.1:{elsewhere.server_port}"
        r = _edgeship("fleet", "status", "--collector", direct, "--json",
                      env={**env, "EDGESHIP_API_READ_TOKEN": READ_TOKEN + "\r\n"})  # fmt: skip
        assert r.returncode == 0, r.stderr
        # /api/devices and /api/alerts, the token trimmed, sent where it was aimed
        assert seen == [f"Bearer {READ_TOKEN}"] * 2, seen
        for bad in (READ_TOKEN + "\x7f", READ_TOKEN[:8] + " " + READ_TOKEN[8:], READ_TOKEN + "é"):
            r = _edgeship("fleet", "status", "--collector", direct,
                          env={**env, "EDGESHIP_API_READ_TOKEN": bad})  # fmt: skip
            assert r.returncode == 2 and "not a token" in r.stderr, (bad, r.stderr)
            assert len(r.stderr.strip().splitlines()) == 1 and READ_TOKEN[:8] not in r.stderr
        assert len(seen) == 2
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_the_collectors_worker_gets_the_store_url_off_its_command_line(tmp_path: Path) -> None:
    """A store URL may hold the database's password (postgresql://edge:pw@db/fleet); the
    collector's worker process used to get it as an argument, readable by every user in ps."""
    from collector.store import open_store
    from collector.worker import ProcessSink

    url = f"sqlite:///{tmp_path / 'secret-store-name.db'}"
    open_store(url).close()
    sink = ProcessSink(url, "fleet-x")
    try:
        cmdline = Path(f"/proc/{sink.pid}/cmdline").read_bytes().split(b"\0")
        assert any(b"collector.worker" in part for part in cmdline), cmdline  # the worker
        assert not any(b"secret-store-name" in part for part in cmdline), cmdline
        assert sink.exit_code() is None  # it opened the store it was sent
    finally:
        sink.close()
    assert sink.exit_code() == 0
