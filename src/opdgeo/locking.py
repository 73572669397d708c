"""An exclusive lock on a folder, so that two writers never share one run folder.

``hold_folder(path)`` creates ``path`` if needed and holds ``path/.lock`` for the duration
of a ``with`` block. The lock file records its owner as one JSON line (``pid``, ``host``,
``started`` UTC time, ``command``); the lock itself is an ``fcntl.flock`` on that file,
which the operating system releases when the owner exits in any way (kill -9 included).
So a lock file left by a dead owner is stale by construction: the next writer takes it
over (and says so on stderr). A second writer while the owner lives fails at once with
``LockedError`` naming the owner's pid, host and start time.

Where ``flock`` is unavailable (not POSIX) the file is created exclusively instead, and
a file whose owner is a dead process of this host is taken over; one from another host
is reported with the advice to remove it if that run is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from opdgeo.errors import OpdgeoError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

__all__ = ["LOCK_NAME", "LockedError", "hold_folder", "lock_owner"]

LOCK_NAME = ".lock"


class LockedError(OpdgeoError):
    """The folder is held by another live writer."""


def lock_owner(folder: str | os.PathLike) -> dict | None:
    """The owner record of ``folder/.lock`` (``pid``, ``host``, ``started``), or None."""
    try:
        return json.loads((Path(folder) / LOCK_NAME).read_text() or "null")
    except (OSError, ValueError):
        return None


def _record() -> str:
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "command": " ".join(sys.argv)[:300]}) + "\n"


def _busy(folder: Path, what: str, owner: dict | None) -> LockedError:
    who = (f"pid {owner.get('pid')} on host {owner.get('host')} since {owner.get('started')}"
           if isinstance(owner, dict) else "another process")
    return LockedError(f"{folder}: {what} in use by {who} (lock file {folder / LOCK_NAME}); wait for it to "
                       "finish or choose another folder")


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError, OverflowError):
        return True
    return True


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, *, what: str = "run folder") -> Iterator[Path]:
    """Hold the exclusive lock of ``folder`` (created if absent) inside the block.

    Raises:
        LockedError: another live process holds it (its pid, host and start time named).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    if fcntl is None:  # pragma: no cover - not POSIX
        with _hold_exclusive_file(folder, path, what):
            yield folder
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise _busy(folder, what, lock_owner(folder)) from None
        try:  # the file may have been removed by its previous owner after we opened it
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        previous = lock_owner(folder)
        if isinstance(previous, dict) and previous.get("pid"):
            print(f"opdgeo: note: {path}: taking over a stale lock of pid {previous.get('pid')} on host "
                  f"{previous.get('host')} (that process has ended)", file=sys.stderr, flush=True)
        os.ftruncate(fd, 0)
        os.pwrite(fd, _record().encode(), 0)
        os.fsync(fd)
        yield folder
    finally:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # unlocked and empty: not stale, just free
        os.close(fd)


@contextlib.contextmanager
def _hold_exclusive_file(folder: Path, path: Path, what: str) -> Iterator[None]:  # pragma: no cover - not POSIX
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            owner = lock_owner(folder)
            stale = (isinstance(owner, dict) and owner.get("host") == socket.gethostname()
                     and not _pid_alive(owner.get("pid")))
            if not stale:
                raise _busy(folder, what, owner) from None
            path.unlink(missing_ok=True)
    else:
        raise _busy(folder, what, lock_owner(folder))
    try:
        os.write(fd, _record().encode())
        os.close(fd)
        yield
    finally:
        path.unlink(missing_ok=True)


def holds_run_folder(train_fn):
    """Decorate ``train(config, ...)``: the main process (``RANK`` 0, or no launcher)
    holds ``config.run.out_dir``'s lock for the whole call, before the check that the
    folder holds no other run, so two ``opdgeo train`` on one folder cannot both run."""
    import functools

    @functools.wraps(train_fn)
    def wrapper(config, *args, **kwargs):
        if int(os.environ.get("RANK", "0") or 0) != 0:
            return train_fn(config, *args, **kwargs)
        with hold_folder(config.run.out_dir):
            return train_fn(config, *args, **kwargs)

    return wrapper
