"""Library fields -> CLI flags: library errors name the options' fields (``k``,
``lock_threshold``); a command spells them as its flags (``--k``, ``--lock-threshold``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from opdgeo.errors import FieldError

__all__ = ["flag", "flags_for_fields"]


def flag(field: str, renames: Mapping[str, str] | None = None) -> str:
    """The flag of a field: ``renames[field]`` when given, else ``--`` + the field with
    dashes (``legacy_atol`` -> ``--legacy-atol``)."""
    if renames and field in renames:
        return renames[field]
    return "--" + field.replace("_", "-")


@contextlib.contextmanager
def flags_for_fields(renames: Mapping[str, str] | None = None) -> Iterator[None]:
    """Re-raise a ``FieldError`` from the body with every field spelled as its flag."""
    try:
        yield
    except FieldError as err:
        raise err.renamed({f: flag(f, renames) for f, _ in err.problems}) from None
