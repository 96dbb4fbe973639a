"""Wire contracts shared by the board and the host: the bundle manifest and MQTT messages.

They live on the constrained side (the agent) and the SDK imports them, never the reverse.
"""
