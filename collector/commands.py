"""Commands to devices, sent through the collector's broker session (the API's
``POST /api/devices/{device}/commands``), and the newest ones kept for
``GET /api/devices/{device}/commands/{id}``.

A command counts as sent once the broker acknowledged it (MQTT QoS 1 PUBACK); a PUBACK with a
failure reason code (MQTT 5: the collector's user may not write the topic) is an error that
says which permission is missing.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from collector.api import SentCommand
from collector.errors import BrokerError
from device_agent.contracts.messages import Command, encode
from device_agent.contracts.messages import topic as message_topic

__all__ = ["Commander"]

_PUBACK_REASONS = {
    128: "unspecified error",
    131: "implementation specific error",
    135: "not authorized",
    144: "topic name invalid",
    151: "quota exceeded",
}

# The newest commands kept for their status route.
MAX_SENT = 1000


class Commander:
    """Publishes commands on the session ``client()`` returns (None: not connected yet) and
    waits for their PUBACKs, which the session hands to :meth:`puback`. ``connected()`` says
    whether the session is up now; ``broker`` names it in errors."""

    def __init__(
        self,
        client: Callable[[], mqtt.Client | None],
        connected: Callable[[], bool],
        broker: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._client = client
        self._connected = connected
        self._broker = broker
        self._clock = clock
        # PUBACK reason codes by packet id, and the newest commands by id.
        self._pubacks: dict[int, int] = {}
        self._abandoned: set[int] = set()
        self._pub_cond = threading.Condition()
        self._lock = threading.Lock()
        self._sent: collections.OrderedDict[str, SentCommand] = collections.OrderedDict()

    def puback(self, mid: int, code: int) -> None:
        """The broker acknowledged packet ``mid`` with reason ``code`` (paho's network thread)."""
        with self._pub_cond:
            if mid in self._abandoned:
                self._abandoned.discard(mid)
                return
            self._pubacks[mid] = code
            self._pub_cond.notify_all()

    def send_command(
        self, fleet: str, device: str, command: Command, timeout_s: float = 10.0
    ) -> SentCommand:
        """Publish ``command`` to ``edgeship/{fleet}/{device}/cmd`` at QoS 1 and wait for the
        broker's PUBACK. Raises BrokerError when not connected, when the broker refuses it
        (MQTT 5 reason code; the collector's user lacks write access to the topic) or when no
        PUBACK comes in ``timeout_s``."""
        client = self._client()
        cmd_topic = message_topic(fleet, device, "cmd")
        if client is None or not self._connected():
            raise BrokerError(f"not connected to {self._broker}: command not sent")
        # Not under _pub_cond: paho calls on_publish holding its own message lock, which
        # publish() takes too. A PUBACK that beats us to the wait below is kept by mid.
        info = client.publish(cmd_topic, encode(command), qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise BrokerError(f"cannot publish to {cmd_topic}: {mqtt.error_string(info.rc)}")
        deadline = time.monotonic() + timeout_s
        with self._pub_cond:
            self._abandoned.discard(info.mid)  # a mid number reused long after a timeout
            while info.mid not in self._pubacks:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._abandoned.add(info.mid)  # its late PUBACK must not answer another
                    raise BrokerError(
                        f"the broker did not acknowledge the command in {timeout_s:.0f} s"
                    )
                self._pub_cond.wait(left)
            code = self._pubacks.pop(info.mid)
        if code >= 128:
            reason = _PUBACK_REASONS.get(code, f"reason code {code}")
            raise BrokerError(
                f"the broker refused the command on {cmd_topic}: {reason}; the collector's MQTT "
                "user needs write access to edgeship/+/+/cmd (docs/security.md)"
            )
        sent = SentCommand(fleet, device, cmd_topic, command, self._clock())
        with self._lock:
            self._sent[command.id] = sent
            while len(self._sent) > MAX_SENT:
                self._sent.popitem(last=False)
        return sent

    def sent_command(self, command_id: str) -> SentCommand | None:
        """A command sent lately (the newest :data:`MAX_SENT`), by its id."""
        with self._lock:
            return self._sent.get(command_id)
