"""Faults that must lose nothing: a kill at every point of a checkpoint swap, a second
writer on a run folder, a damaged cached study stage, a cache on a disk that fills up,
file modes under the umask, the config size limits, the verifier's hung-worker restart."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opdgeo.errors import ConfigError
from opdgeo.files import TMP_PREFIX, atomic_folder, clean_temporaries
from opdgeo.locking import LockedError, hold_folder, lock_owner

SRC = str(Path(__file__).resolve().parents[1] / "src")

# ------------------------------------------------------------------ checkpoint swap

def _Model(seed: int):
    """The part of a ``PreTrainedModel`` that ``save_checkpoint`` uses: a module of bf16
    parameters with a ``config`` (the export streams its state dict tensor by tensor)."""
    import torch
    from transformers import PretrainedConfig

    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.full((4, 4), float(seed), dtype=torch.bfloat16))
    model.config = PretrainedConfig()
    return model


def _save_and_die(run: Path, point: str, seed: int) -> int:
    """``save_checkpoint`` in a forked child killed (``os._exit``: no cleanup, no finally)
    at ``point``; returns the child's exit status."""
    pid = os.fork()
    if pid == 0:  # the child
        import opdgeo.files as files
        from opdgeo.training import checkpointing as ckpt

        real_replace, real_fsync_tree, calls = os.replace, files.fsync_tree, [0]

        def replace(a, b):
            calls[0] += 1
            if point == f"before{calls[0]}":
                os._exit(9)
            real_replace(a, b)
            if point == f"after{calls[0]}":
                os._exit(9)

        def fsync_tree(root):
            if point == "build":  # killed while the new folder is still being written
                os._exit(9)
            real_fsync_tree(root)

        try:
            files.os.replace = replace  # the os module itself: only this child is affected
            files.fsync_tree = fsync_tree
            ckpt.save_checkpoint(run, 5, _Model(seed), None, trainer_state=None)
        finally:
            os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _weights(step_dir: Path) -> bytes:
    return (step_dir / "model.safetensors").read_bytes()


# before1: the old folder still in place; after1 = before2: renamed aside, the new one not yet
# in; after2: the new one in place, the old aside copy not yet removed
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork to kill a writer mid-save")
@pytest.mark.parametrize("point,survivor", [("build", "old"), ("before1", "old"), ("after1", "old"),
                                            ("after2", "new"), ("none", "new")])
def test_kill_at_each_point_of_the_swap_keeps_a_complete_checkpoint(tmp_path, point, survivor):
    """Replacing step-000005 (seed 0 weights) by a new save (seed 1), killed at each point:
    resume's view (latest_resumable, remove_partial) always finds one complete folder,
    the old or the new one, and nothing temporary is left."""
    from opdgeo.checkpoints import open_checkpoint
    from opdgeo.training import checkpointing as ckpt

    run = tmp_path / "run"
    ckpt.save_checkpoint(run, 5, _Model(0), None, trainer_state=None)
    old = _weights(run / "step-000005")
    assert _save_and_die(run, point, 1) == (0 if point == "none" else 9)
    assert ckpt.latest_resumable(run) is None  # no trainer state saved; restores an aside copy first
    ckpt.remove_partial(run)
    assert [p.name for _, p in ckpt.list_checkpoints(run)] == ["step-000005"]
    assert not [p for p in run.iterdir() if p.name.startswith(TMP_PREFIX)]
    now = _weights(run / "step-000005")
    assert (now == old) == (survivor == "old")
    assert open_checkpoint(run / "step-000005").names() == ["w"]  # complete and readable


def test_cleanup_restores_an_aside_copy_instead_of_deleting_it(tmp_path):
    (tmp_path / "step-000003").mkdir()
    with atomic_folder(tmp_path / "step-000003") as tmp:
        (tmp / "w").write_text("v1")
    aside = tmp_path / f"{TMP_PREFIX}old-step-000003-123-abcdef01"
    os.rename(tmp_path / "step-000003", aside)  # as a kill between the two renames leaves it
    half = tmp_path / f"{TMP_PREFIX}step-000003-123-0badf00d"
    half.mkdir()
    removed = clean_temporaries(tmp_path)
    assert (tmp_path / "step-000003" / "w").read_text() == "v1"
    assert removed == [half] and not aside.exists()


# ------------------------------------------------------------------ run-folder lock

_HOLD = "import sys, time\nfrom opdgeo.locking import hold_folder\nwith hold_folder(sys.argv[1]):\n" \
        "    print('held', flush=True)\n    time.sleep(600)\n"


def test_second_writer_fails_at_once_and_a_dead_owner_is_stale(tmp_path, capsys):
    run = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=SRC)
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        owner = lock_owner(run)
        assert owner["pid"] == holder.pid and owner["host"]
        t0 = time.monotonic()
        with pytest.raises(LockedError, match=f"in use by pid {holder.pid} on host"):
            with hold_folder(run):
                pass
        assert time.monotonic() - t0 < 30  # fails at once, never waits for the owner (a hang guard, not a timing claim)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with hold_folder(run):  # the owner died: its lock is stale and taken over
        assert lock_owner(run)["pid"] == os.getpid()
    assert f"stale lock of pid {holder.pid}" in capsys.readouterr().err
    with hold_folder(run):  # released at the end of the block: free again, silently
        pass
    assert "stale" not in capsys.readouterr().err


def test_train_holds_the_lock_for_the_whole_run(tmp_path):
    from opdgeo.training.config import load_config
    from opdgeo.training.loop import train

    out = tmp_path / "run"
    config = load_config(None, ["model.student=tiny:quick", "optim.steps=1", "optim.batch_size=2",
                                "optim.micro_batch_size=2", f"run.out_dir={out}", "run.progress=false"])
    train(config)
    with hold_folder(out):  # released after the run
        pass
    with hold_folder(out):
        with pytest.raises(LockedError):
            train(config, resume=True)


# ------------------------------------------------------------------ study stage cache


def test_damaged_cached_stage_is_redone_and_reported(tmp_path):
    from opdgeo.study.stages import Stage, run_stages

    calls = []

    def produce(ctx):
        calls.append(ctx.dir.name)
        (ctx.dir / "summary.json").write_text(json.dumps({"global_sparsity": 0.25}))
        return {"ok": True}

    def consume(ctx):
        calls.append("report")
        return json.loads((ctx.out / "compare" / "rlvr" / "summary.json").read_text())

    stages = [Stage("compare_rlvr", "compare", "compare/rlvr", {}, produce),
              Stage("table", "report", "tables", {}, consume, deps=("compare_rlvr",))]
    logs = []
    run_stages(stages, tmp_path, log=logs.append)
    assert calls == ["rlvr", "report"]
    run_stages(stages, tmp_path, log=logs.append)
    assert calls == ["rlvr", "report"]  # both cached
    summary = tmp_path / "compare" / "rlvr" / "summary.json"
    summary.write_text(summary.read_text()[:10])  # cut short
    logs.clear()
    outcomes = run_stages(stages, tmp_path, log=logs.append)
    assert calls == ["rlvr", "report", "rlvr", "report"]  # redone, and so is what read it
    assert any("compare_rlvr: its cached output is damaged" in m and "summary.json" in m for m in logs)
    assert "damaged" in outcomes["compare_rlvr"].reason and outcomes["table"].summary == {"global_sparsity": 0.25}
    (tmp_path / "compare" / "rlvr" / "summary.json").unlink()
    run_stages(stages, tmp_path, log=logs.append)
    assert calls[-2:] == ["rlvr", "report"] and summary.is_file()


# ------------------------------------------------------------------ caches and modes


def test_cache_that_fails_mid_run_warns_once_and_keeps_the_results(tmp_path, tiny_qwen3_factory, monkeypatch, capsys):
    import torch

    import opdgeo.analysis.cache as cache_mod
    from opdgeo.analysis.compare import compare

    base = tiny_qwen3_factory(tmp_path / "b", seed=0)
    tuned = tiny_qwen3_factory(tmp_path / "t", seed=0, perturb={"model.layers.0.mlp.up_proj.weight": torch.ones(128, 64)})
    expected = compare(base, tuned, k=4, rank=4).summary

    def full(path, tensors, metadata):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_mod, "_write", full)
    got = compare(base, tuned, k=4, rank=4, cache=str(tmp_path / "cache"))
    assert {k: v for k, v in got.summary.items() if k != "settings"} == \
        {k: v for k, v in expected.items() if k != "settings"}
    err = capsys.readouterr().err
    assert err.count("cannot write to the cache") == 1 and "No space left on device" in err


def test_written_files_follow_the_umask(tmp_path):
    import torch
    from safetensors.torch import save_file

    from opdgeo.files import atomic_write

    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "w.safetensors", lambda t: save_file({"x": torch.zeros(2)}, str(t)))
        with atomic_folder(tmp_path / "step") as tmp:
            save_file({"x": torch.zeros(2)}, str(tmp / "model.safetensors"))
        os.umask(0o077)
        atomic_write(tmp_path / "p.safetensors", lambda t: save_file({"x": torch.zeros(2)}, str(t)))
    finally:
        os.umask(old)
    mode = lambda p: (tmp_path / p).stat().st_mode & 0o777  # noqa: E731
    assert (mode("w.safetensors"), mode("step"), mode("step/model.safetensors"), mode("p.safetensors")) == \
        (0o644, 0o755, 0o644, 0o600)


# ------------------------------------------------------------------ config limits


def test_config_limits_refuse_bombs_and_accept_real_configs(tmp_path):
    from opdgeo.training.config import MAX_CONFIG_DEPTH, MAX_CONFIG_NODES, load_config

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=f"more than {MAX_CONFIG_NODES} values once its YAML aliases"):
        load_config(bomb)
    assert time.monotonic() - t0 < 60  # a hang guard: the bomb is never expanded
    deep = tmp_path / "deep.yaml"
    deep.write_text("x: " + "[" * (MAX_CONFIG_DEPTH + 2) + "]" * (MAX_CONFIG_DEPTH + 2) + "\n")
    with pytest.raises(ConfigError, match="nested deeper"):
        load_config(deep)
    loop = tmp_path / "loop.yaml"
    loop.write_text("x: &l [1, *l]\n")
    with pytest.raises(ConfigError, match="refers to itself"):
        load_config(loop)
    ok = tmp_path / "ok.yaml"  # aliases within the limits are fine
    ok.write_text("common: &c {student: 'tiny:quick'}\nmodel: *c\n")
    with pytest.raises(ConfigError, match="common: unknown section"):
        load_config(ok)
    ok.write_text("model: &c {student: 'tiny:quick'}\n")
    assert load_config(ok).model.student == "tiny:quick"


# ------------------------------------------------------------------ verifier


def test_hung_check_is_replaced_by_the_warm_standby(monkeypatch):
    pytest.importorskip("math_verify")
    from opdgeo.tasks.math_verifier import MathVerifier

    v = MathVerifier(timeout_s=1.0)
    try:
        assert v.check(r"\boxed{2}", "2").reason == "correct"
        standby = v._standby
        assert standby is not None and v._ready(standby, 120)  # warm before it is needed
        first = v._proc
        sent = []
        real_ask = v._ask

        def hang_once(proc, gold, predicted, timeout):
            sent.append(proc)
            if len(sent) == 1:
                return None  # as if no reply came within the limit
            return real_ask(proc, gold, predicted, timeout)

        monkeypatch.setattr(v, "_ask", hang_once)
        assert v.check(r"\boxed{3}", "3").reason == "timeout"
        assert first.poll() is not None and v._proc is standby and v.restarts == 1
        assert v.check(r"\boxed{3}", "3").reason == "correct"
        assert sent[1] is standby and v._standby is not None and v._standby is not standby
    finally:
        v.close()
