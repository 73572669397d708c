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


class SourceError(CheckpointError, ConfigError):
    """A model source (folder, file, local-cache id, ``smollm2``, ``tiny:PRESET``) that
    names nothing usable. Both a checkpoint that cannot be opened and a configuration
    value that is wrong, so it is caught as either."""


class FieldError(ConfigError):
    """Invalid fields of an options dataclass, all listed at once.

    ``problems`` holds ``(field, text)`` pairs; the message is ``"<field> <text>"`` for
    each, joined by ``"; "`` (e.g. ``"k must be an integer >= 1; got 0"``). Library code
    names fields; a front end that spells them otherwise (the CLI's ``--k``) re-raises
    ``err.renamed({"k": "--k"})``.
    """

    def __init__(self, problems):
        self.problems = tuple((str(f), str(t)) for f, t in problems)
        super().__init__("; ".join(f"{f} {t}" for f, t in self.problems))

    def renamed(self, names) -> "FieldError":
        """The same problems with each field spelled ``names[field]`` (unknown fields kept)."""
        return FieldError([(names.get(f, f), t) for f, t in self.problems])

    def __reduce__(self):  # picklable across ranks despite the non-string constructor argument
        return (type(self), (self.problems,))


class OutputError(OpdgeoError):
    """An output cannot be written: the folder is read-only, the disk is full, the path is
    a file. The message names the path and the system's reason (and, from the CLI, where
    the results went instead)."""
