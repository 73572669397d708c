"""Atomic writes: the one place that puts a file or a folder on disk.

A reader (another process, a resumed run, a concurrent rank) sees either the old content
or the new one, never half of it. The recipe, for files and folders alike:

1. create a temporary sibling of the target (same folder, so the rename stays on one
   filesystem) named ``.tmp-<target name>-<pid>-<random>``: every temporary name starts
   with ``TMP_PREFIX``, so a cleanup can find what a killed writer left behind;
2. write into it; fsync every file (and, for a folder, every folder) in it;
3. ``os.replace`` it over the target (atomic on POSIX), then fsync the parent folder so
   the rename itself survives a crash.

File and folder modes follow the process umask (``0o666`` / ``0o777`` masked), as an
ordinary ``open``/``mkdir`` would give them, whatever the writer used (``apply_umask``:
safetensors, and so ``save_pretrained``, create ``0o600`` files; ``tempfile.mkstemp`` /
``mkdtemp`` would too), so other users of a shared run folder or cache can read them.

A folder that already exists is replaced: it is first renamed aside (``.tmp-old-<name>-…``),
the new one renamed into place, then the old one removed. Between the two renames the
target is briefly absent, never partial, and the previous complete folder is the aside
copy: after a kill there, ``restore_aside`` renames it back and ``clean_temporaries``
(which removes every other leftover) never deletes it while the target is missing.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "TMP_PREFIX",
    "apply_umask",
    "atomic_folder",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "clean_temporaries",
    "restore_aside",
    "fsync_dir",
    "fsync_tree",
    "is_temporary",
    "staged_folder",
    "temporary_sibling",
    "writable_folder_problem",
]

TMP_PREFIX = ".tmp-"
_ASIDE = "old-"  # temporary_sibling(<folder>/old-<name>) holds a replaced folder until the swap is done
_ASIDE_RE = re.compile(r"^\.tmp-old-(?P<name>.+)-\d+-[0-9a-f]{8}$")


def is_temporary(path: str | os.PathLike) -> bool:
    """True for a name made by ``temporary_sibling`` (a leftover of an interrupted write)."""
    return Path(path).name.startswith(TMP_PREFIX)


def temporary_sibling(path: str | os.PathLike, *, folder: bool = False) -> Path:
    """Create and return a new, empty temporary file (or folder) beside ``path``.

    The name is ``.tmp-<name>-<pid>-<8 hex>``, created exclusively (``O_EXCL``/``mkdir``)
    with mode ``0o666``/``0o777`` under the umask. The parent folder is created if needed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            if folder:
                os.mkdir(tmp, 0o777)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue


def _read_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status`` on Linux; else
    the ``os.umask`` round trip, which is brief but not thread-safe, so done once)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORT_UMASK


def _import_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_IMPORT_UMASK = _import_umask()


def apply_umask(root: str | os.PathLike) -> None:
    """Give ``root`` (a file, or a folder and everything below it) the modes an ordinary
    ``open``/``mkdir`` would: ``0o666``/``0o777`` under the umask. Writers such as
    safetensors create their files ``0o600`` whatever the umask; shared run folders and
    caches must stay readable by the other users the umask admits."""
    mask = _read_umask()
    root = Path(root)
    if root.is_file():
        os.chmod(root, 0o666 & ~mask)
        return
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in files:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a folder (its entries: names created or renamed in it); a no-op where the
    platform has no directory file descriptors."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and every folder below ``root`` (``root`` included)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write a file atomically: ``write(tmp)`` fills a temporary sibling, which then replaces ``path``.

    Args:
        path: the target file.
        write: called with the temporary path (which exists, empty); it writes the content
            by path (``save_file(tensors, tmp)``, ``tmp.write_text(...)``).

    Returns:
        ``path``.

    Raises:
        OSError: from the write or the rename; the temporary file is removed, the target
            is left as it was.
    """
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        write(tmp)
        apply_umask(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``atomic_write`` of ``data``."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """``atomic_write`` of ``text`` in UTF-8."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Build a folder atomically: yield an empty temporary sibling to fill; on a clean exit
    it is fsynced and renamed into place (an existing ``path`` is replaced, see the module
    docstring); on an exception it is removed and ``path`` is left as it was.

    Example::

        with atomic_folder(run_dir / "step-000010") as tmp:
            model.save_pretrained(tmp)
    """
    path = Path(path)
    tmp = temporary_sibling(path, folder=True)
    try:
        yield tmp
        apply_umask(tmp)
        fsync_tree(tmp)
        old = None
        if path.exists():
            old = temporary_sibling(path.with_name(f"{_ASIDE}{path.name}"), folder=True)
            os.replace(path, old)  # a folder renamed over an empty folder
            fsync_dir(path.parent)
        # a kill here leaves the previous folder aside; restore_aside() puts it back
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)



def writable_folder_problem(path: str | os.PathLike) -> str | None:
    """Why files cannot be written into folder ``path`` (created if absent), or None.

    Checked before a long computation so that its results are not lost at the end: the
    path (or, when it does not exist yet, its nearest existing ancestor) must be a folder
    in which a file can be created (a probe file, removed at once: this sees permissions,
    read-only mounts and a full inode table) on a filesystem with free space left. Nothing
    is left behind. A disk that fills up later is still possible; writers handle that.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        return "exists and is not a folder"
    where = path
    while not where.exists() and where.parent != where:
        where = where.parent
    if not where.is_dir():
        return f"{where} is not a folder"
    probe = where / f"{TMP_PREFIX}probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        probe.unlink()
    except OSError as err:
        return f"cannot write in {where} ({err.strerror or err})"
    try:
        st = os.statvfs(where)
    except (OSError, AttributeError):  # pragma: no cover - platforms without statvfs
        return None
    if st.f_bavail == 0:
        return f"no space left on the device of {where}"
    return None


@contextlib.contextmanager
def staged_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Write a set of files into folder ``path`` all at once, or not at all.

    Yields an empty staging folder (a ``TMP_PREFIX`` folder inside ``path``, so the
    renames stay on one filesystem) to fill; on a clean exit each entry is renamed into
    ``path`` (replacing a file of the same name) and the staging folder removed. On an
    exception the staging folder is removed, ``path`` keeps what it held before (and is
    itself removed if this call created it and it is empty), and the exception propagates.
    Other files already in ``path`` are left alone.
    """
    path = Path(path)
    created = [p for p in (path, *path.parents) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    stage = temporary_sibling(path / "publish", folder=True)
    try:
        yield stage
        fsync_tree(stage)
        for entry in sorted(stage.iterdir()):
            target = path / entry.name
            if target.is_dir() and entry.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
        fsync_dir(path)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        for folder in created:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)


def restore_aside(folder: str | os.PathLike) -> list[Path]:
    """Put back every folder that ``atomic_folder`` had renamed aside when a kill cut its
    swap short (``.tmp-old-<name>-…`` whose ``<name>`` is missing); returns the restored
    paths. Safe to run from several processes at once (a lost race is skipped)."""
    folder = Path(folder)
    restored = []
    if not folder.is_dir():
        return restored
    for entry in sorted(folder.iterdir()):
        m = _ASIDE_RE.match(entry.name)
        if not m or not entry.is_dir():
            continue
        target = folder / m.group("name")
        if target.exists():
            continue
        try:
            os.rename(entry, target)  # not os.replace: never over a target that appeared meanwhile
        except OSError:
            continue
        fsync_dir(folder)
        restored.append(target)
    return restored


def clean_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove what killed writers left in ``folder`` (every ``TMP_PREFIX`` file or folder),
    after ``restore_aside``: a previous complete folder whose replacement never arrived is
    renamed back, not deleted. Returns the removed paths. Only for a folder no live writer
    is using (a run folder under its lock)."""
    folder = Path(folder)
    restore_aside(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        if not is_temporary(entry):
            continue
        m = _ASIDE_RE.match(entry.name)
        if m and not (folder / m.group("name")).exists():  # pragma: no cover - restore_aside lost a race
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed
