"""The project's exceptions.

A user mistake (bad path, corrupt file, wrong option, invalid config) raises an
``OpdgeoError`` subclass whose message is one line naming the file, tensor or key and
what is wrong. The CLI prints it as ``opdgeo: error: <message>`` and exits with code 2.
Internal invariants use ``assert``.
"""


class OpdgeoError(Exception):
    """A user-facing error: one line, names the offending file, tensor or key."""


class CheckpointError(OpdgeoError):
    """A checkpoint is missing, unreadable, corrupt, or does not pair with another."""


class ConfigError(OpdgeoError):
    """A configuration or option value is invalid (all problems listed at once)."""
