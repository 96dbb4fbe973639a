"""The device's MQTT link: broker settings, and the publisher that drains the spool to a broker.

:class:`BrokerConfig` is the validated broker setting (URL, credentials, TLS files, protocol).
:class:`Publisher` owns the link for the life of the agent. It is built from parts, one module
each: ``connection`` (the state machine: connect, MQTT 5 -> 3.1.1 fallback, reconnect with
:class:`Backoff`, close; it owns the paho client and nothing else), and the work it carries:
``outbox`` (draining the spool, in-flight bound, acknowledgements), ``will`` (the Last Will's
sequence number), ``commands`` (command intake and its worker), with ``stats`` the counters
they share and ``publisher`` composing them. How the link behaves:

* **Spool first.** :meth:`Publisher.publish` only writes to the :class:`~device_agent.spool.Spool`
  (which numbers the message) and wakes the network thread. That thread replays the spool in
  order, keeps at most ``max_inflight`` QoS 1 publishes unacknowledged, and deletes a message
  from the spool when its PUBACK arrives. After a reconnect everything still in the spool is
  sent again from the oldest, so a message may arrive twice (subscribers dedupe on
  ``(device, boot, seq)``) but is never lost, and an outage's backlog drains at the pace of the
  acknowledgements, never as a flood.
* **One thread owns the paho client.** paho's ``Client`` is not safe for writes from two
  threads (a partial socket write from one thread can interleave with another's packet), so
  the thread that runs the socket loop is also the one that publishes; other threads only
  write to the spool and poke a wake-up socket.
* **Own reconnect loop.** A fresh paho client per connection attempt, capped exponential
  backoff with full jitter (:class:`Backoff`, injectable random source), no paho auto-reconnect.
  ``start()`` never waits for the broker: an agent that boots without network keeps spooling.
* **MQTT 5 first, 3.1.1 fallback.** With ``protocol="auto"`` a broker that refuses v5 (CONNACK
  "unsupported protocol version"), closes the connection, or never answers the v5 CONNECT
  (amqtt does that) within ``connect_timeout_s`` is tried again at once with 3.1.1; once a
  3.1.1 connection succeeds the publisher keeps using 3.1.1.
* **Birth and Last Will.** Every connection registers a retained QoS 1 ``offline`` status as
  its will and, once accepted, spools a retained ``online`` birth. See "Will sequence numbers".
* **Commands** on ``edgeship/{fleet}/{device}/cmd`` (QoS 1, persistent session so commands sent
  while the device was offline are delivered when it returns) are decoded on the network
  thread and handed to ``on_command`` on a worker thread, so a slow command cannot stall
  keep-alives. Malformed or retained commands are counted and logged, never run.

Will sequence numbers
---------------------
A will's ``seq`` is taken from the spool's counter like any other message's, but whether the
broker ever publishes it is unknown: a broker restart loses it, a clean disconnect discards it.
A number that is reserved and never sent would be a gap the collector cannot tell from a lost
message, so the publisher makes sure each will number is sent at least once:

* The number is reserved lazily and kept across failed attempts: only a connection the broker
  accepted can have published it, so an hour of refused connects uses one number, not 120.
* The prepared will (topic and payload) is written to ``<spool>.will`` (fsynced) when it is
  reserved. When a connection that registered it ends without a clean close, the publisher
  puts that same message into the spool: if the broker published it, the copy is a duplicate
  (same ``device, boot, seq``); if not, it fills the gap. The file covers a crash: the next
  start spools a will it finds there the same way.
* On :meth:`Publisher.close` the agent publishes the prepared message itself, after the
  backlog, and disconnects cleanly only once the broker acknowledged it; if the flush times
  out it disconnects so that the broker publishes the will (MQTT 5 reason code 4; under 3.1.1
  it drops the socket), and the spooled copy goes out on the next start.

So the offline status may arrive twice, or late (after a reconnect, behind newer messages), but
its number is not a gap. A gap of one remains possible only if the process dies between
reserving a number and writing ``<spool>.will``, or if ``<spool>.will`` cannot be written.
"""

from __future__ import annotations

from device_agent.mqtt.config import BrokerConfig, Protocol
from device_agent.mqtt.connection import Backoff
from device_agent.mqtt.publisher import PUBLISHED_KINDS, Publisher

__all__ = ["PUBLISHED_KINDS", "Backoff", "BrokerConfig", "Protocol", "Publisher"]
