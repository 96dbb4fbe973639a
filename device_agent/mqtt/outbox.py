"""Draining the spool into a connection: in-flight bound, acknowledgements, re-sends.

The spool is the outbox's source of truth: a message leaves it only when its PUBACK arrived
(QoS 1) or it was written to the socket (QoS 0). At most ``max_inflight`` QoS 1 publishes are
unacknowledged at once, so an outage's backlog drains at the pace of the acknowledgements,
never as a flood. When a connection ends, everything not acknowledged is sent again on the next
one, from the oldest: a duplicate, never a loss. Used on the network thread only.
"""

from __future__ import annotations

import logging

import paho.mqtt.client as paho
from paho.mqtt.reasoncodes import ReasonCode

from device_agent.errors import EdgeshipError
from device_agent.mqtt.stats import LinkStats
from device_agent.spool import Spool

__all__ = ["Outbox"]

# One logger for the whole link, as before it was split into modules.
log = logging.getLogger("device_agent.mqtt")


class Outbox:
    """The spool's messages on their way to one connection at a time."""

    def __init__(self, spool: Spool, stats: LinkStats, max_inflight: int) -> None:
        self._spool = spool
        self._stats = stats
        self._max_inflight = max_inflight
        self._inflight: dict[int, int] = {}  # paho mid -> spool item id
        self._last_sent_id = 0  # highest spool id handed to this connection
        self._acked_ids: list[int] = []  # acknowledged, not yet removed from the spool
        self._need_peek = True

    @property
    def inflight(self) -> int:
        """QoS 1 publishes awaiting their PUBACK."""
        return len(self._inflight)

    def backlog(self) -> int:
        """Messages still in the spool."""
        return self._spool.depth()

    def poke(self) -> None:
        """New messages may be in the spool (a publish, a birth, the will): look again."""
        self._need_peek = True

    def pump(self, client: paho.Client) -> None:
        """Remove acknowledged messages, then send the next ones up to the in-flight bound."""
        self.apply_acks()
        room = self._max_inflight - len(self._inflight)
        if room <= 0 or not self._need_peek:
            return
        try:
            items = self._spool.peek(room, after=self._last_sent_id)
        except EdgeshipError as exc:
            self._stats.count("errors")
            self._stats.set_error(f"spool: {exc}")
            log.error("mqtt: cannot read the spool: %s", exc)
            return
        if len(items) < room:
            self._need_peek = False  # drained; a publish() or an ack wakes us again
        for item in items:
            try:
                info = client.publish(item.topic, item.payload, qos=item.qos, retain=item.retain)
            except ValueError as exc:  # paho's own checks (topic, size): no broker will take it
                self._stats.count("errors")
                log.error(
                    "mqtt: spool item %d can never be published (%s); dropping it", item.id, exc
                )
                self._last_sent_id = item.id
                self._acked_ids.append(item.id)
                continue
            if info.rc == paho.MQTT_ERR_NO_CONN or info.rc == paho.MQTT_ERR_CONN_LOST:
                self._need_peek = True
                return
            if info.rc != paho.MQTT_ERR_SUCCESS:
                self._stats.count("errors")
                log.error(
                    "mqtt: spool item %d not published: %s; it is retried after a reconnect",
                    item.id,
                    paho.error_string(info.rc),
                )
                self._last_sent_id = item.id
                continue
            self._last_sent_id = item.id
            self._stats.count("sent")
            if item.qos == 0:
                self._acked_ids.append(item.id)  # QoS 0 has no PUBACK: written is all we get
            else:
                self._inflight[info.mid] = item.id

    def acked(self, mid: int, reason_code: ReasonCode) -> None:
        """A PUBACK (or its MQTT 5 refusal) for the publish ``mid``."""
        item_id = self._inflight.pop(mid, None)
        if item_id is None:
            return  # a QoS 0 write, already accounted for in pump()
        self._need_peek = True
        if reason_code.is_failure:
            # The broker refused it (not authorized, quota): keep it spooled for the next
            # connection rather than lose it; the spool's bound limits what piles up.
            self._stats.count("refused")
            self._stats.set_error(f"broker refused a message: {reason_code}")
            log.warning("mqtt: broker refused spool item %d: %s", item_id, reason_code)
            return
        self._acked_ids.append(item_id)
        self._stats.count("acked")

    def apply_acks(self) -> None:
        if not self._acked_ids:
            return
        ids, self._acked_ids = self._acked_ids, []
        try:
            self._spool.ack_many(ids)
        except EdgeshipError as exc:
            # They stay in the spool and are sent again after a reconnect: a duplicate, not a loss.
            self._stats.count("errors")
            log.error(
                "mqtt: cannot remove %d acknowledged messages from the spool: %s", len(ids), exc
            )

    def flushed(self) -> bool:
        """Everything acknowledged and removed: the spool is empty and nothing is in flight."""
        self.apply_acks()
        return self._spool.depth() == 0 and not self._inflight

    def reset(self) -> None:
        """The connection ended: what was in flight is sent again on the next one."""
        self._inflight.clear()
        self._last_sent_id = 0
        self._need_peek = True
        self.apply_acks()
