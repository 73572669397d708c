"""GeometryMonitor under DeepSpeed ZeRO-3: each parameter gathered with
``deepspeed.zero.GatheredParameters`` one matrix at a time, never the whole model — with a
stand-in for DeepSpeed (always run) and, where DeepSpeed is installed, through
``transformers.Trainer`` on 2 CPU ranks (gloo)."""

from __future__ import annotations

import contextlib
import json
import sys
import types

import pytest
import torch

from integrations_tiny import GatherRecorder, run_trainer, tiny_model, training_args
from opdgeo.analysis.trajectory import trajectory
from opdgeo.errors import ConfigError
from opdgeo.integrations.transformers import GeometryMonitor, SubspaceProjection, trajectory_rows
from test_integrations_monitor import assert_rows_equal, table, torchrun


class FakeZero3:
    """A stand-in for ``deepspeed.zero``: parameters partitioned to nothing (``ds_id``,
    ``ds_shape``, an empty ``data``), whose ``GatheredParameters`` puts the full value in
    ``data`` for the duration of the block and logs every gather and release."""

    def __init__(self, model):
        self.log: list[tuple[str, int]] = []
        self.max_gathered = 0
        self._gathered = 0
        self.params = [p for p in model.parameters() if p.dim() == 2]
        for i, p in enumerate(self.params):
            p.ds_id, p.ds_shape, p.ds_full = i, p.shape, p.data.clone()
            p.data = torch.empty(0, dtype=p.dtype)

    @contextlib.contextmanager
    def GatheredParameters(self, params, modifier_rank=None):  # noqa: N802 (DeepSpeed's name)
        assert modifier_rank is None  # read-only: no rank's changes broadcast back
        params = list(params)
        for p in params:
            self.log.append(("gather", p.ds_id))
            p.data = p.ds_full
            self._gathered += 1
        self.max_gathered = max(self.max_gathered, self._gathered)
        try:
            yield
        finally:
            for p in params:
                p.data = torch.empty(0, dtype=p.dtype)
                self._gathered -= 1
                self.log.append(("release", p.ds_id))


def _probe_once(model, zero, *, rank0=True, monitor=None):
    """on_train_begin, one update of every matrix (the full values), one probe at step 1."""
    from transformers import TrainerControl, TrainerState

    args = training_args("unused", steps=1, save_steps=None)
    state = TrainerState(is_world_process_zero=rank0)
    mon = monitor or GeometryMonitor(every=1, dtype="float32", out=False)
    mon.on_train_begin(args, state, TrainerControl(), model=model)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            full = p.ds_full if zero is not None and hasattr(p, "ds_id") else p.data
            full.add_(1e-2 * torch.randn(full.shape, generator=g))
    state.global_step = 1
    mon.on_step_end(args, state, TrainerControl(), model=model)
    return mon


def test_zero3_gathers_one_matrix_at_a_time_and_equals_the_unpartitioned_model(monkeypatch):
    plain = _probe_once(tiny_model(), None)
    model = tiny_model()
    zero = FakeZero3(model)
    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(zero=zero))
    recorder = GatherRecorder()
    try:
        mon = _probe_once(model, zero)
    finally:
        for module in recorder.modules:
            module.full_matrix = recorder.original
    (step, got), (_, ref) = mon.history[0], plain.history[0]
    assert step == 1 and list(got) == list(ref) and len(got) == 8  # the attention matrices, in model order
    for name, mp in got.items():
        assert (mp.stable_rank, mp.fro_norm, mp.density) == (ref[name].stable_rank, ref[name].fro_norm,
                                                               ref[name].density), name
        assert torch.equal(mp.V, ref[name].V), name
    # one parameter per gather, released before the next one: the monitored 8 at train begin and at the probe
    params = dict(model.named_parameters())
    monitored = [params[name].ds_id for name in got]
    expected = [(event, i) for i in monitored for event in ("gather", "release")]
    assert zero.log == expected * 2 and zero.max_gathered == 1
    assert recorder.record() == {"calls": 16, "max_alive": 0}  # no gathered copy outlives its matrix's turn


def test_zero3_other_ranks_take_part_in_every_gather_and_compute_nothing(monkeypatch):
    model = tiny_model()
    zero = FakeZero3(model)
    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(zero=zero))
    mon = _probe_once(model, zero, rank0=False)
    assert mon.history == [] and mon.probes == []
    params = dict(model.named_parameters())
    names = [n for n in params if ".self_attn." in n and n.endswith("_proj.weight")]
    assert len(names) == 8
    assert [e for e in zero.log if e[0] == "gather"] == [("gather", params[n].ds_id) for n in names] * 2


def test_projection_refuses_zero3_at_train_begin(monkeypatch):
    from transformers import TrainerControl, TrainerState

    model = tiny_model()
    zero = FakeZero3(model)
    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(zero=zero))
    with pytest.raises(ConfigError, match="ZeRO-3"):
        SubspaceProjection(rank=4, start=2).on_train_begin(training_args("unused", steps=1, save_steps=None),
                                                          TrainerState(), TrainerControl(), model=model)
    assert zero.log == []  # refused before any gather


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="compares CPU processes (gloo)")
@pytest.mark.skipif(not _has_deepspeed(), reason="DeepSpeed is not installed (pip install deepspeed: not in the "
                    "test extra, an sdist built at install time)")
def test_two_process_zero3_equals_trajectory_and_the_one_process_run(tmp_path):
    """DeepSpeed ZeRO-3 through transformers.Trainer on 2 CPU ranks: the table equals `opdgeo trajectory` on the
    run's own checkpoints, and the one-process run with the same global batch to round-off (the gradients are
    reduced in another order); each rank gathered one matrix at a time."""
    torchrun("zero3", tmp_path / "run", DS_ACCELERATOR="cpu")
    mine = table(tmp_path / "run" / "geometry" / "trajectory.csv")
    assert {s for s, _ in mine} == {2, 4, 6}
    assert_rows_equal(mine, trajectory(tmp_path / "run", tmp_path / "origin", matrices="all", overlap=False).rows,
                       rtol=1e-9)
    one = GeometryMonitor(every=2, dtype="float32", matrices="all", out=False)
    run_trainer(tmp_path / "one", [one], save_steps=None, batch=8)  # 2 ranks × 4 = 8 rows a step
    rows = trajectory_rows("run", one.history, 16)
    assert_rows_equal(mine, rows, rtol=1e-5)
    with pytest.raises(AssertionError):  # negative control: the one-process run with half the batch differs
        half = GeometryMonitor(every=2, dtype="float32", matrices="all", out=False)
        run_trainer(tmp_path / "half", [half], save_steps=None)
        assert_rows_equal(mine, trajectory_rows("run", half.history, 16), rtol=1e-3)
    # 14 matrices gathered for the origin and at each of 3 probes, never two alive at once
    for rank in (0, 1):
        assert json.loads((tmp_path / f"gathers-{rank}.json").read_text()) == {"calls": 56, "max_alive": 0}, rank
