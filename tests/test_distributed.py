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


def test_state_is_written_as_safetensors_and_reads_back_exactly(tmp_path):
    from safetensors import safe_open

    from opdgeo.training import sharded

    master = {"w": torch.randn(2, 3), "tied": torch.randn(4, 2)}
    master["head"] = master["tied"]  # shares storage, as tied embeddings do
    state = {0: {"step": torch.tensor(3.0), "exp_avg": torch.full((2, 3), 0.5)}}
    sharded.save_state(tmp_path / "ck", meta={"step": 3}, master=master,
                       optimizer={"state": state, "param_groups": [{"lr": 1e-3, "params": [0]}]},
                       rng_tensors={"cpu": torch.get_rng_state()}, rng_meta={"python": 1})
    files = sorted((tmp_path / "ck" / "dcp").glob("*.safetensors"))
    assert files and not (tmp_path / "ck" / "dcp" / ".metadata").exists()
    with safe_open(str(files[0]), "pt") as f:  # plain safetensors, readable without DCP
        assert torch.equal(f.get_tensor("master/w"), master["w"])
    got = sharded.read_state_tensors(tmp_path / "ck")
    for k, v in master.items():
        assert torch.equal(got[f"master/{k}"], v)
    assert sharded.state_keys(tmp_path / "ck")["master/w"] == ((2, 3), torch.float32)


def test_state_written_by_the_torch_save_writer_still_reads(tmp_path):
    import torch.distributed.checkpoint as dcp

    from opdgeo.training import sharded

    flat = {"master/w": torch.randn(3, 2), "optimizer/0/step": torch.tensor(5.0)}
    dcp.save(flat, storage_writer=dcp.FileSystemWriter(str(tmp_path / "ck" / "dcp")), no_dist=True)
    assert (tmp_path / "ck" / "dcp" / ".metadata").is_file()
    got = sharded.read_state_tensors(tmp_path / "ck")
    assert sorted(got) == sorted(flat) and all(torch.equal(got[k], flat[k]) for k in flat)
