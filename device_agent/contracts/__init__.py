"""The wire between edgeship's three programs (SDK, agent, collector), importable alone.

One module per format: ``bundle`` (the manifest; ``shapes``, its tensor and sample shapes),
``signature`` (``signature.json``), ``reference`` (``reference.json``), ``messages`` (MQTT
topics and messages), ``commands`` (commands as types), ``broker`` (the broker URL) and
``text`` (how outside text is escaped).
They live on the constrained side (the agent) and the SDK and the collector import them, never
the reverse. Each loads only the standard library, the exception tree
(:mod:`device_agent.errors`) and other contracts, never an agent module
(``tests/test_imports.py``).
"""
