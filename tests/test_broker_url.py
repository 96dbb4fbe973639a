"""The broker URL contract: one grammar for agent, collector and remote commands, and a
password that never shows in an error, a repr or a display string."""

from __future__ import annotations

from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent.contracts.broker import BrokerUrl, redact
from device_agent.errors import ConfigError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mqtt://hub", ("hub", 1883, False, None, None)),
        ("mqtts://hub.example.com", ("hub.example.com", 8883, True, None, None)),
        ("MQTT://user:p%40ss@[::1]:1884/", ("::1", 1884, False, "user", "p@ss")),
        ("  mqtts://op:pw@Hub.Local:8884  ", ("hub.local", 8884, True, "op", "pw")),
        # Without a scheme: mqtt:// (the collector took this before the grammar was shared).
        ("127.0.0.1:1883", ("127.0.0.1", 1883, False, None, None)),
        ("hub", ("hub", 1883, False, None, None)),
        ("u:pw@hub", ("hub", 1883, False, "u", "pw")),
        # Eclipse Paho's scheme names.
        ("tcp://b:1884", ("b", 1884, False, None, None)),
        ("ssl://b", ("b", 8883, True, None, None)),
        # An unencoded '@' or ':' in a password: the last '@' ends the credentials.
        ("mqtt://u:p@s:s@h", ("h", 1883, False, "u", "p@s:s")),
        ("mqtt://u%2Fx:p%2F%23@h", ("h", 1883, False, "u/x", "p/#")),
        ("mqtt://u@h", ("h", 1883, False, "u", None)),
        ("mqtt://u:@h", ("h", 1883, False, "u", "")),
        ("mqtt://h:", ("h", 1883, False, None, None)),
    ],
)
def test_urls_parse(text: str, expected: tuple[object, ...]) -> None:
    b = BrokerUrl.parse(text)
    assert (b.host, b.port, b.tls, b.username, b.password) == expected


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("http://broker", "scheme 'http' is not mqtt or mqtts"),
        ("mqtt://", "no host"),
        ("mqtt://:1883", "no host"),
        ("mqtt://broker:99999", "port 99999 is out of range"),
        ("mqtt://broker:0", "port 0 is out of range"),
        ("mqtt://broker:-1", "port '-1' is not a number"),
        ("mqtt://broker:port", "port 'port' is not a number"),
        ("mqtt://broker/fleet", "unexpected path"),
        ("mqtt://broker?x=1", "unexpected path"),
        ("mqtt://broker#x", "unexpected path"),
        ("mqtt://u:pa/ss@broker", "percent-encode"),
        ("mqtt://:pw@broker", "user name before '@' is empty"),
        ("mqtt://u%20v@broker", "user name holds a space"),
        ("mqtt://bro ker", "host 'bro ker'"),
        ("mqtt://[::1", "no ']' closes"),
        ("mqtt://[nope]:1", "'nope' is not an IPv6 address"),
        ("mqtt://[::1]x", "after the IPv6 address"),
    ],
)
def test_bad_urls_name_the_bad_part(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        BrokerUrl.parse(text)


def test_display_and_repr_leave_the_password_out() -> None:
    b = BrokerUrl.parse("ssl://op:hunter2@[::1]")
    assert b.display() == "mqtts://op@[::1]:8883"
    assert b.scheme == "mqtts"
    assert "hunter2" not in repr(b)
    assert BrokerUrl.parse("hub").display() == "mqtt://hub:1883"


def test_redact_hides_what_a_password_might_be() -> None:
    assert redact("mqtt://u:secret@h:1") == "'mqtt://u:***@h:1'"
    assert redact("mqtt://h:1") == "'mqtt://h:1'"
    assert "se/cr" not in redact("mqtt://u:se/cr@h")
    assert "pw" not in redact("u:pw@h")
    assert "pw" not in redact("u:pw://x@h")


_TEXT = st.text(
    st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=12
)  # any text but lone surrogates, which no str from a command line or a file holds


@settings(max_examples=400, deadline=None)
@given(
    scheme=st.sampled_from(["mqtt://", "mqtts://", "tcp://", "", "http://", "mqtt:/", "x"]),
    user=_TEXT,
    before=_TEXT,
    after=_TEXT,
    encode=st.booleans(),
    host=st.sampled_from(["hub", "[::1]", "", "h h", "[x"]) | _TEXT,
    port=st.sampled_from(["", ":1883", ":0", ":x", ":99999"]) | _TEXT,
    tail=st.sampled_from(["", "/", "/p", "?q", "#f", "/@"]) | _TEXT,
)
def test_no_error_or_display_ever_holds_the_password(
    scheme: str,
    user: str,
    before: str,
    after: str,
    encode: bool,
    host: str,
    port: str,
    tail: str,
) -> None:
    # Any characters around a marker no message has in its own words: a password that leaks
    # whole or in a part holding the marker is caught.
    password = f"{before}Zq9{after}"
    written = quote(password, safe="") if encode else password
    text = f"{scheme}{user}:{written}@{host}{port}{tail}"
    rest = f"{scheme}{user}:@{host}{port}{tail}"
    # A password that also appears elsewhere in the URL is not a secret the parser could keep.
    secrets = {password, written, "Zq9"}
    if any(s in rest for s in secrets):
        return
    try:
        b = BrokerUrl.parse(text)
    except ConfigError as exc:
        shown = str(exc)
    else:
        shown = f"{b.display()} {b!r}"
    for secret in secrets:
        assert secret not in shown
        assert secret not in redact(text)
