"""Output folders of the commands: checked before the work, results never lost after it.

``check_folder`` runs before any computation: an ``--out`` or ``--cache`` that is a file,
read-only, or on a full disk is refused at once (``opdgeo.files.writable_folder_problem``).
``publish`` writes the results; when the destination fails anyway (the disk filled up
during the run) the results, still in memory, are written to a fresh folder under the
system's temporary directory and the error says where they went.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from opdgeo.errors import ConfigError, OutputError

__all__ = ["check_folder", "publish"]


def check_folder(flag: str, path: str | Path | None) -> None:
    """Refuse ``flag PATH`` now if no file can be written into folder ``path`` (None: not given).

    Raises:
        ConfigError: ``"--out x: exists and is not a folder"``, ``"... cannot write in x
            (Read-only file system)"``, ``"... no space left ..."``.
    """
    from opdgeo.files import writable_folder_problem

    if path is None:
        return
    problem = writable_folder_problem(path)
    if problem:
        raise ConfigError(f"{flag} {path}: {problem}")


def publish(write: Callable[[Path], object], out: str | Path, *, flag: str, command: str):
    """``write(out)``; if that fails with an OS-level error, ``write`` into a rescue folder.

    Args:
        write: writes every output file into the folder it is given (all or nothing:
            ``opdgeo.report.files.output_folder``).
        out: the destination the user chose.
        flag: its option (``--out``), for the message.
        command: the command's name, the rescue folder's prefix (``opdgeo-compare-…``).

    Returns:
        What ``write(out)`` returned.

    Raises:
        OutputError: naming ``out``, the reason, and the rescue folder holding the results
            (or that none could be written).
    """
    try:
        return write(Path(out))
    except (OSError, OutputError) as err:
        reason = str(err) if isinstance(err, OutputError) else f"{out}: {err.strerror or err}"
    rescue = Path(tempfile.mkdtemp(prefix=f"opdgeo-{command}-"))
    try:
        write(rescue)
    except (OSError, OutputError) as err:
        shutil.rmtree(rescue, ignore_errors=True)
        raise OutputError(f"{flag} {reason}; the results could not be saved elsewhere either ({err}); "
                          "only what was printed remains") from None
    raise OutputError(f"{flag} {reason}; the results were written to {rescue} instead")
