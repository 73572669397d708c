"""Bad inputs and faults, one row each: every command must answer a user mistake or a
refused output with exactly one line ``opdgeo: error: ...`` naming what is wrong, exit
code 2, no traceback, and no leftover files (no ``.tmp-*``, no half-written output).

Future commands add their rows here. A row builds its inputs under the test's folder,
may inject a fault (a read-only or full folder, through a patched writer, so the test
needs no root and no tmpfs), and may check what must (not) exist afterwards.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import save_tiny_qwen3
from opdgeo.cli.main import main


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Path], list[str]]
    """Builds the inputs under the folder it is given and returns the command line."""
    fragment: str
    """Must appear in the one error line."""
    fault: Callable[[Path, pytest.MonkeyPatch], None] | None = None
    absent: tuple[str, ...] = ()
    """Paths (relative to the test folder) that must not exist afterwards."""
    check: Callable[[Path], None] | None = None
    code: int = 2
    tags: tuple[str, ...] = field(default=())


# ------------------------------------------------------------------------ inputs


def _st(folder: Path, name: str, tensors: dict) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / name))
    return str(folder / name)


def _pair(tmp: Path, a: dict, b: dict) -> list[str]:
    return [_st(tmp, "base.safetensors", a), _st(tmp, "tuned.safetensors", b)]


def _floats(tmp: Path) -> list[str]:
    return _pair(tmp, {"x.weight": torch.randn(8, 4)}, {"x.weight": torch.randn(8, 4)})


def _truncated_model(tmp: Path) -> str:
    folder = save_tiny_qwen3(tmp / "cut", num_hidden_layers=1)
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size - 512)
    return str(folder)


def _config(tmp: Path, text: str) -> str:
    (tmp / "c.yaml").write_text(text)
    return str(tmp / "c.yaml")


def _bomb(tmp: Path) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    return _config(tmp, "\n".join(lines) + "\nmodel: {student: 'tiny:quick'}\n")


def _symlink_loop(tmp: Path) -> str:
    os.symlink(tmp / "loop_b", tmp / "loop_a")
    os.symlink(tmp / "loop_a", tmp / "loop_b")
    return str(tmp / "loop_a")


def _index_escape(tmp: Path, shard: str) -> str:
    import json

    folder = tmp / "sharded"
    _st(tmp, "outside.safetensors", {"x.weight": torch.randn(4, 4)})
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x.weight": shard}}))
    return str(folder)


def _locked_run(tmp: Path) -> list[str]:
    import contextlib

    from opdgeo.locking import hold_folder

    stack = contextlib.ExitStack()
    stack.enter_context(hold_folder(tmp / "run"))  # held by "another writer" (a second open file)
    _LOCKS.append(stack)
    cfg = _config(tmp, f"model: {{student: 'tiny:quick'}}\noptim: {{steps: 1}}\nrun: {{out_dir: {tmp / 'run'}}}\n")
    return ["train", cfg]


_LOCKS: list = []


# ------------------------------------------------------------------------ faults


def _under(path, folder: Path) -> bool:
    try:
        return Path(os.fspath(path)).resolve().is_relative_to(folder.resolve())
    except (TypeError, ValueError, OSError):
        return False


def _read_only(name: str, err: int = errno.EROFS):
    """Creating anything under ``tmp/name`` fails as on a read-only mount."""

    def fault(tmp: Path, mp: pytest.MonkeyPatch) -> None:
        folder = tmp / name
        folder.mkdir(parents=True, exist_ok=True)
        real_open, real_mkdir = os.open, os.mkdir

        def open_(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _under(path, folder):
                raise OSError(err, os.strerror(err), str(path))
            return real_open(path, flags, *args, **kwargs)

        def mkdir_(path, *args, **kwargs):
            if _under(path, folder) and Path(path).resolve() != folder.resolve():
                raise OSError(err, os.strerror(err), str(path))
            return real_mkdir(path, *args, **kwargs)

        mp.setattr(os, "open", open_)
        mp.setattr(os, "mkdir", mkdir_)

    return fault


def _no_space_left(name: str):
    """The filesystem of ``tmp/name`` has no free block (statvfs says 0 available)."""

    def fault(tmp: Path, mp: pytest.MonkeyPatch) -> None:
        real = os.statvfs

        class Full:
            def __init__(self, st):
                self._st = st

            def __getattr__(self, key):
                return 0 if key == "f_bavail" else getattr(self._st, key)

        mp.setattr(os, "statvfs", lambda p: Full(real(p)) if _under(p, tmp / name) or
                   _under(tmp / name, p) else real(p))

    return fault


def _fills_up_while_writing(name: str):
    """The disk of ``tmp/name`` fills up after the pre-check: every fsync of a file there fails."""

    def fault(tmp: Path, mp: pytest.MonkeyPatch) -> None:
        import opdgeo.files as files

        real = files._fsync_file

        def fsync(path):
            if _under(path, tmp / name):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            real(path)

        mp.setattr(files, "_fsync_file", fsync)

    return fault


def _rescued(tmp: Path) -> None:
    (rescue,) = list((tmp / "sys-tmp").glob("opdgeo-compare-*"))
    assert sorted(p.name for p in rescue.iterdir()) == ["matrices.csv", "summary.json", "summary.md"]


def _no_model_loaded(tmp: Path, mp: pytest.MonkeyPatch) -> None:
    import opdgeo.models as models

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the task spec was checked")

    mp.setattr(models, "load_model", refuse)
    mp.setattr(models, "load_tokenizer", refuse)


# ------------------------------------------------------------------------ the table

CASES = [
    # compare: what the tensors hold
    Case("compare-int-one-side", lambda t: ["compare", *_pair(t, {"x.weight": torch.randn(8, 4)},
                                                               {"x.weight": torch.arange(32).reshape(8, 4)})],
         "tensor x.weight: float32 in"),
    Case("compare-int-both-sides", lambda t: ["compare", *_pair(t, {"ids": torch.arange(6)}, {"ids": torch.arange(6) + 1})],
         "nothing to compare: none of the 1 tensors"),
    Case("compare-zero-size", lambda t: ["compare", *_pair(t, {"x.weight": torch.zeros(0, 32)},
                                                           {"x.weight": torch.zeros(0, 32)})],
         "tensor x.weight has zero size (shape [0, 32])"),
    Case("compare-symlink-loop", lambda t: ["compare", _symlink_loop(t), _floats(t)[1]], "symbolic link loop"),
    Case("compare-index-parent-shard", lambda t: ["compare", _index_escape(t, "../outside.safetensors"), _floats(t)[1]],
         "shard '../outside.safetensors' (holding x.weight) is not a file name inside"),
    Case("compare-index-absolute-shard", lambda t: ["compare", _index_escape(t, str(t / "outside.safetensors")),
                                                    _floats(t)[1]], "absolute paths and '..' are refused"),
    # compare: outputs (checked before the work; rescued when the disk fills up during the write)
    Case("compare-out-is-a-file", lambda t: ["compare", *_floats(t), "--out", str(_st(t, "f.safetensors", {}))],
         "Invalid value for '--out'"),
    Case("compare-cache-is-a-file", lambda t: ["compare", *_floats(t), "--cache", str(_st(t, "f.safetensors", {}))],
         "Invalid value for '--cache'"),
    Case("compare-out-read-only", lambda t: ["compare", *_floats(t), "--out", str(t / "ro" / "out")],
         "--out", fault=_read_only("ro"), absent=("ro/out", "sys-tmp")),
    Case("compare-out-read-only-existing", lambda t: ["compare", *_floats(t), "--out", str(t / "ro")],
         "Read-only file system", fault=_read_only("ro"), absent=("ro/matrices.csv", "sys-tmp")),
    Case("compare-out-permission-denied", lambda t: ["compare", *_floats(t), "--out", str(t / "ro")],
         "Permission denied", fault=_read_only("ro", errno.EACCES), absent=("ro/matrices.csv", "sys-tmp")),
    Case("compare-cache-read-only", lambda t: ["compare", *_floats(t), "--cache", str(t / "ro")],
         "--cache", fault=_read_only("ro"), absent=("sys-tmp",)),
    Case("compare-out-full-disk", lambda t: ["compare", *_floats(t), "--out", str(t / "full" / "out")],
         "no space left", fault=_no_space_left("full"), absent=("full/out", "sys-tmp")),
    Case("compare-cache-full-disk", lambda t: ["compare", *_floats(t), "--cache", str(t / "full")],
         "--cache", fault=_no_space_left("full")),
    Case("compare-out-fills-up", lambda t: ["compare", *_floats(t), "--out", str(t / "disk" / "out")],
         "No space left on device", fault=_fills_up_while_writing("disk"), absent=("disk/out",), check=_rescued),
    # click's usage errors, in the one-line form
    Case("compare-bad-choice", lambda t: ["compare", *_floats(t), "--precision", "fp8"],
         "'fp8' is not one of 'fp64', 'fp32'"),
    Case("compare-bad-type", lambda t: ["compare", *_floats(t), "--rank", "abc"], "'abc' is not a valid integer"),
    Case("compare-bad-k", lambda t: ["compare", *_floats(t), "--k", "abc"],
         "--k must be an integer >= 1 or a fraction a/b in (0, 1]; got 'abc'"),
    Case("compare-unknown-option", lambda t: ["compare", "--bogus"], "No such option '--bogus'"),
    Case("compare-missing-argument", lambda t: ["compare", "only-one"], "Missing argument 'TUNED'"),
    Case("study-bad-preset", lambda t: ["study", "--preset", "huge"],
         "--preset must be one of quick, tiny, smollm2, paper or a study file (.yaml); got 'huge'"),
    Case("unknown-command", lambda t: ["bogus"], "No such command 'bogus'"),
    Case("trajectory-out-read-only", lambda t: ["trajectory", "--origin", _floats(t)[0], str(t), "--out",
                                                str(t / "ro")], "Read-only file system", fault=_read_only("ro")),
    # eval and train: corrupt weights named with file and tensor, before transformers reads them
    Case("eval-truncated-weights", lambda t: ["eval", _truncated_model(t), "--n", "1"], "file is truncated"),
    Case("eval-bad-task-before-loading", lambda t: ["eval", _truncated_model(t), "--task", "arithmetic:zz=1"],
         "unknown option(s) zz", fault=_no_model_loaded),
    Case("train-truncated-student", lambda t: ["train", _config(t, f"model: {{student: {_truncated_model(t)}}}\n")],
         "model.student: "),
    Case("train-truncated-teacher", lambda t: ["train", _config(
        t, f"objective: opd\nmodel: {{student: 'tiny:quick', teacher: {_truncated_model(t)}}}\n")],
        "model.teacher: "),
    # configs
    Case("train-alias-bomb", lambda t: ["train", _bomb(t)], "once its YAML aliases are expanded"),
    Case("train-self-alias", lambda t: ["train", _config(t, "x: &l [1, *l]\n")], "refers to itself"),
    Case("train-problems-on-one-line", lambda t: ["train", _config(t, "model: {student: 'tiny:quick'}\n"
                                                                   "optim: {lr: -1, steps: 0}\nbogus: 1\n")],
         "invalid training config (3 problems): "),
    Case("train-every-bad-set", lambda t: ["train", _config(t, "model: {student: 'tiny:quick'}\n"), "--set", "a",
                                           "--set", "b=[1"], "--set 'a': expected key=value"),
    Case("train-bad-task-spec", lambda t: ["train", _config(t, "model: {student: 'tiny:quick'}\n"
                                                            "task: {spec: 'arithmetic:zz=1'}\n")],
         "task.spec: task 'arithmetic:zz=1': unknown option(s) zz"),
    Case("train-project-rank-0", lambda t: ["train", _config(t, "model: {student: 'tiny:quick'}\n"),
                                            "--project-from", str(t / "nowhere"), "--rank", "0"],
         "project.rank: must be >= 1; got 0"),
    Case("train-folder-locked", _locked_run, "run folder in use by pid"),
    Case("train-out-read-only", lambda t: ["train", _config(t, "model: {student: 'tiny:quick'}\n"), "--out",
                                           str(t / "ro" / "run")], "--out", fault=_read_only("ro"), absent=("ro/run",)),
    Case("eval-out-dir-read-only", lambda t: ["eval", "tiny-model-never-loaded", "--out-dir", str(t / "ro")],
         "--out-dir", fault=_read_only("ro")),
    Case("study-out-read-only", lambda t: ["study", "--preset", "quick", "--out", str(t / "ro" / "s")],
         "--out", fault=_read_only("ro"), absent=("ro/s",)),
    Case("study-folder-locked", lambda t: _locked(t / "s", ["study", "--preset", "quick", "--out", str(t / "s")]),
         "study folder in use by pid"),
]


def _locked(folder: Path, argv: list[str]) -> list[str]:
    import contextlib

    from opdgeo.locking import hold_folder

    stack = contextlib.ExitStack()
    stack.enter_context(hold_folder(folder, what="study folder"))
    _LOCKS.append(stack)
    return argv


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sys-tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "sys-tmp"))
    try:
        argv = case.argv(tmp_path)
        if case.fault is not None:
            case.fault(tmp_path, monkeypatch)
        with pytest.raises(SystemExit) as exc:
            main(argv)
    finally:
        while _LOCKS:
            _LOCKS.pop().close()
    out = capsys.readouterr()
    errors = [line for line in out.err.splitlines() if line.startswith("opdgeo: error:")]
    assert exc.value.code == case.code, out.err
    assert len(errors) == 1, out.err
    assert case.fragment in errors[0], errors[0]
    assert "Traceback" not in out.err + out.out
    assert not [p for p in tmp_path.rglob(".tmp-*")], "temporary files left behind"
    if "sys-tmp" in case.absent:
        assert not any((tmp_path / "sys-tmp").iterdir()), "results written elsewhere although nothing was computed"
    for rel in case.absent:
        if rel != "sys-tmp":
            assert not (tmp_path / rel).exists(), f"{rel} exists"
    if case.check is not None:
        case.check(tmp_path)
