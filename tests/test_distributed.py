"""opdgeo.distributed in one process: strategy resolution, launcher variables, config
checks; the trainer state's metadata reader refuses foreign pickles."""

import io
import os
import pickle

import pytest
import torch

from opdgeo import distributed
from opdgeo.errors import ConfigError
from opdgeo.training.config import load_config


def test_strategy_auto_is_none_alone_and_ddp_under_a_launcher(monkeypatch):
    assert distributed.resolve_strategy("auto", 1) == "none"
    assert distributed.resolve_strategy("auto", 4) == "ddp"
    assert distributed.resolve_strategy("fsdp", 1) == "fsdp"
    with pytest.raises(ConfigError, match="distributed.strategy"):
        distributed.resolve_strategy("zero3", 2)
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.launched_world() == 1
    ctx = distributed.init()
    assert (ctx.rank, ctx.world, ctx.is_main, ctx.owned) == (0, 1, True, False)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="RANK=3"):
        distributed.launched_world()
    monkeypatch.setenv("RANK", "1")
    assert distributed.launched_world() == 2


def test_collectives_are_identities_in_one_process():
    t = torch.tensor([1.5, 2.0], dtype=torch.float64)
    assert torch.equal(distributed.all_reduce_sum(t), t)
    assert distributed.all_reduce_max(3.0) == 3.0
    assert distributed.gather_to_rank0("x") == ["x"] and distributed.broadcast_object(7) == 7
    model = torch.nn.Linear(2, 2)
    assert distributed.wrap_model(model, "ddp", distributed.init()) is model  # nothing to reduce alone
    with distributed.no_sync(model, sync=False):
        pass


def test_distributed_config_is_checked_before_anything_loads():
    base = ["model.student=tiny:quick"]
    with pytest.raises(ConfigError) as err:
        load_config(None, base + ["distributed.strategy=zero", "model.teacher_dtype=fp8"])
    assert "distributed.strategy" in str(err.value) and "model.teacher_dtype" in str(err.value)
    with pytest.raises(ConfigError, match="cpu_offload"):
        load_config(None, base + ["distributed.cpu_offload=true"])
    with pytest.raises(ConfigError, match="monitor_every"):
        load_config(None, base + ["distributed.strategy=fsdp", "run.monitor_every=2"])
    assert load_config(None, base + ["distributed.strategy=fsdp", "distributed.cpu_offload=true"]).distributed.cpu_offload


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_metadata_reader_refuses_foreign_objects():
    from opdgeo.training.sharded import _MetadataUnpickler

    with pytest.raises(pickle.UnpicklingError, match="refused"):
        _MetadataUnpickler(io.BytesIO(pickle.dumps(_Evil()))).load()
    with pytest.raises(pickle.UnpicklingError, match="refused"):  # a function of DCP's own modules
        from torch.distributed.checkpoint import filesystem

        _MetadataUnpickler(io.BytesIO(pickle.dumps(filesystem._split_by_size_and_type))).load()
    assert _MetadataUnpickler(io.BytesIO(pickle.dumps(torch.Size([2, 3])))).load() == torch.Size([2, 3])


def test_state_save_rewrites_after_the_zip_writers_position_failure_and_raises_other_errors(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    from opdgeo.training import sharded

    real = dcp.save
    calls = []

    def flaky(state, **kw):
        calls.append(kw["storage_writer"].path)
        if len(calls) == 1:
            real(state, **kw)  # a complete folder the retry must replace, not add to
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
        return real(state, **kw)

    monkeypatch.setattr(dcp, "save", flaky)
    master = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    state = {0: {"step": torch.tensor(3.0), "exp_avg": torch.full((2, 3), 0.5)}}
    sharded.save_state(tmp_path / "ck", meta={"step": 3}, master=master,
                       optimizer={"state": state, "param_groups": [{"lr": 1e-3, "params": [0]}]},
                       rng_tensors={"cpu": torch.get_rng_state()}, rng_meta={"python": 1})
    assert len(calls) == 2
    got = sharded.read_state_tensors(tmp_path / "ck")
    assert torch.equal(got["master/w"], master["w"])
    assert sorted(got) == sorted(sharded.state_keys(tmp_path / "ck"))

    def broken(state, **kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(dcp, "save", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        sharded.save_state(tmp_path / "ck2", meta={"step": 3}, master=master,
                           optimizer={"state": state, "param_groups": [{"lr": 1e-3, "params": [0]}]},
                           rng_tensors={"cpu": torch.get_rng_state()}, rng_meta={"python": 1})
