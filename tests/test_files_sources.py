"""The shared plumbing: atomic writes (opdgeo/files.py), model sources (opdgeo/sources.py)
and the step-folder convention (checkpoints/steps.py)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from opdgeo.checkpoints.steps import list_step_dirs, step_dir_name, step_of
from opdgeo.errors import CheckpointError, ConfigError, SourceError
from opdgeo.files import TMP_PREFIX, atomic_folder, atomic_write, atomic_write_text, is_temporary
from opdgeo.sources import ModelSource


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_file_modes_follow_the_umask_and_nothing_is_left_behind(tmp_path, umask_027):
    path = atomic_write_text(tmp_path / "sub" / "a.json", "{}\n")
    assert path.read_text() == "{}\n" and _mode(path) == 0o640  # 0o666 & ~0o027, not mkstemp's 0o600
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n" and os.listdir(path.parent) == ["a.json"]

    def fail(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "new\n" and os.listdir(path.parent) == ["a.json"]  # old content, no temporary


def test_atomic_folder_replaces_whole_or_not_at_all(tmp_path, umask_027):
    target = tmp_path / "step-000010"
    with atomic_folder(target) as tmp:
        assert is_temporary(tmp) and tmp.parent == tmp_path and tmp.name.startswith(TMP_PREFIX)
        (tmp / "model.safetensors").write_bytes(b"one")
        assert not target.exists()  # readers never see the folder being filled
    assert (target / "model.safetensors").read_bytes() == b"one" and _mode(target) == 0o750
    with pytest.raises(RuntimeError):
        with atomic_folder(target) as tmp:
            (tmp / "model.safetensors").write_bytes(b"two")
            raise RuntimeError("killed")
    assert (target / "model.safetensors").read_bytes() == b"one"  # the old folder, intact
    with atomic_folder(target) as tmp:
        (tmp / "other").write_text("x")
    assert sorted(os.listdir(target)) == ["other"]  # replaced, not merged
    assert os.listdir(tmp_path) == ["step-000010"]  # no temporaries left


def test_step_folder_convention(tmp_path):
    assert step_dir_name(63) == "step-000063" and step_dir_name(1234567) == "step-1234567"
    for name, step in (("step-000063", 63), ("step-7", 7), ("step_12", 12), ("step40", 40), ("step-final", None),
                       (".tmp-step-000063-1-ab", None), ("checkpoint-5", None)):
        assert step_of(tmp_path / name) == step, name
    for name in ("step-000020", "step-000003", ".tmp-step-000040-9-00", "notes"):
        (tmp_path / name).mkdir()
    assert list_step_dirs(tmp_path) == [(3, tmp_path / "step-000003"), (20, tmp_path / "step-000020")]
    assert list_step_dirs(tmp_path / "absent") == []


def test_model_source_kinds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "w.safetensors").write_bytes(b"")
    cases = {"tiny:student": ("tiny", "student"), "smollm2": ("smollm2", None), "folder": ("folder", None),
             "w.safetensors": ("file", None), "org/name": ("cached", None), "./missing": ("folder", None)}
    for text, (kind, preset) in cases.items():
        src = ModelSource.parse(text)
        assert (src.kind, src.preset, str(src)) == (kind, preset, text), text
    assert ModelSource.parse(Path("org/name")).kind == "folder"  # a Path is never an id
    assert ModelSource.parse("org/name").model_id == "org/name"
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").mkdir()
    assert ModelSource.parse("org/name").kind == "folder"  # an existing path wins over an id
    with pytest.raises(SourceError, match="empty model source"):
        ModelSource.parse("  ")


def test_model_source_problems_and_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert ModelSource.parse("tiny:student").problem() is None
    assert "needs a preset name" in ModelSource.parse("tiny:").problem()
    assert "unknown tiny preset 'huge'" in ModelSource.parse("tiny:huge").problem()
    assert "not found" in ModelSource.parse(str(tmp_path / "absent")).problem()
    assert ModelSource.parse(str(tmp_path / "absent")).problem(check_paths=False) is None
    assert ModelSource.parse("acme/model").problem() is None  # looked up only when resolved
    with pytest.raises(SourceError, match="built in memory"):
        ModelSource.parse("tiny:student").resolve()
    with pytest.raises(SourceError, match=r"absent: no such file or directory"):
        ModelSource.parse(str(tmp_path / "absent")).resolve()
    # one resolver, one error: caught as a checkpoint problem and as a configuration problem
    for kind in (CheckpointError, ConfigError):
        with pytest.raises(kind, match=rf"acme/model: .*not found in the local Hugging Face cache {tmp_path / 'hub'}"):
            ModelSource.parse("acme/model").resolve()
