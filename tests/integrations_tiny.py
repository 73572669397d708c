"""Tiny Qwen3 runs of ``transformers.Trainer`` / TRL with opdgeo's callbacks, shared by the
integration tests and by the distributed scripts they launch (``python integrations_tiny.py``)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

VOCAB = 99


def tiny_model(seed: int = 0, *, dtype=torch.float32):
    """A 2-layer Qwen3 (hidden 64: q/o 64×64, k/v 32×64, gate/up/down 128×64), from a config."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(cfg).to(dtype)


def token_rows(n: int = 64, length: int = 16, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        x = torch.randint(3, VOCAB, (length,), generator=g)
        rows.append({"input_ids": x, "labels": x.clone()})
    return rows


def training_args(out, *, steps: int, save_steps: int | None, lr: float = 1e-2, optim: str = "adamw_torch",
                  batch: int = 4, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                             lr_scheduler_type="constant", save_strategy="steps" if save_steps else "no",
                             save_steps=save_steps or 1, logging_steps=1, report_to=[], use_cpu=True,
                             save_only_model=True, disable_tqdm=True, seed=0, optim=optim, **kw)


def run_trainer(out: Path, callbacks, *, steps: int = 6, save_steps: int | None = 2, origin: Path | None = None,
                **kw):
    """Train the tiny model with ``transformers.Trainer``; save its start in ``origin``."""
    from transformers import Trainer

    model = tiny_model()
    if origin is not None:
        model.save_pretrained(origin)
    trainer = Trainer(model=model, args=training_args(out, steps=steps, save_steps=save_steps, **kw),
                      train_dataset=token_rows(), callbacks=list(callbacks))
    trainer.train()
    return trainer


def _ddp(out: Path) -> None:
    from opdgeo.integrations.transformers import GeometryMonitor

    run_trainer(out, [GeometryMonitor(every=2, dtype="float32")], origin=out.parent / "origin", ddp_backend="gloo")


class GatherRecorder:
    """Wraps ``opdgeo.integrations.weights.full_matrix`` (where the callbacks gather a parameter):
    counts the gathers and, at each one, how many values returned by earlier gathers are still
    held by the callbacks (storage weak references) — 0 throughout means one matrix at a time.
    Each value is handed on as a private copy, so only the callbacks' own references count:
    not the parameter's storage (a plain parameter), nor a collective's buffer that the
    process group releases later (gloo's work objects can outlive the call by a moment)."""

    def __init__(self):
        import opdgeo.integrations.transformers as callbacks
        import opdgeo.integrations.weights as weights

        self.modules, self.original = (weights, callbacks), weights.full_matrix
        self.calls, self.max_alive, self._refs = 0, 0, []
        for module in self.modules:
            module.full_matrix = self

    def __call__(self, p):
        from torch.multiprocessing.reductions import StorageWeakRef

        self._refs = [r for r in self._refs if not r.expired()]
        self.max_alive = max(self.max_alive, len(self._refs))
        self.calls += 1
        out = self.original(p).clone()
        self._refs.append(StorageWeakRef(out.untyped_storage()))
        return out

    def record(self) -> dict:
        return {"calls": self.calls, "max_alive": self.max_alive}


ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                               "stage3_gather_16bit_weights_on_model_save": True},
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
         "zero_force_ds_cpu_optimizer": False}
"""DeepSpeed ZeRO-3 for ``transformers.Trainer`` on CPU: every parameter partitioned (no
persistence threshold), the torch AdamW of the Trainer, whole checkpoints saved."""


def _zero3(out: Path) -> None:
    """DeepSpeed ZeRO-3 through ``transformers.Trainer`` on 2 CPU ranks (gloo): the monitor's table in
    ``out/geometry``, the checkpoints, each rank's gathers in ``gathers-<rank>.json``."""
    import json
    import os

    recorder = GatherRecorder()
    from opdgeo.integrations.transformers import GeometryMonitor

    run_trainer(out, [GeometryMonitor(every=2, dtype="float32", matrices="all")], origin=out.parent / "origin",
                ddp_backend="gloo", deepspeed=ZERO3)
    (out.parent / f"gathers-{os.environ['RANK']}.json").write_text(json.dumps(recorder.record()))


def _fsdp(out: Path) -> None:
    """FSDP2 (fully_shard) on 2 CPU ranks (gloo): one SGD step, the monitor probing the sharded model; rank 0
    writes its metrics and the reference model's (unsharded, the same step) to ``out``, each rank its gathers
    (``GatherRecorder``) to ``gathers-<rank>.json``."""
    import json

    from torch.distributed.fsdp import fully_shard
    from transformers import TrainerControl, TrainerState

    from opdgeo.integrations.transformers import GeometryMonitor

    dist.init_process_group("gloo")
    recorder = GatherRecorder()
    model, ref = tiny_model(), tiny_model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    rank = dist.get_rank()
    results = {}
    for label, m in (("fsdp", model), ("ref", ref)):
        if label == "ref" and rank != 0:
            break
        state = TrainerState(is_world_process_zero=(rank == 0) if label == "fsdp" else True)
        args = training_args(out, steps=1, save_steps=None)
        mon = GeometryMonitor(every=1, dtype="float32", out=False, matrices="all")
        mon.on_train_begin(args, state, TrainerControl(), model=m)
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        batch = token_rows(4)
        ids = torch.stack([r["input_ids"] for r in batch])
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        state.global_step = 1
        mon.on_step_end(args, state, TrainerControl(), model=m)
        if rank == 0:
            results[label] = {n: [mp.stable_rank, mp.fro_norm, mp.density] for n, mp in mon.history[0][1].items()}
        if label == "fsdp":
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / f"gathers-{rank}.json").write_text(json.dumps(recorder.record()))
    if rank == 0:
        (Path(out) / "fsdp.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    {"ddp": _ddp, "fsdp": _fsdp, "zero3": _zero3}[sys.argv[1]](Path(sys.argv[2]))
    # a process group left to interpreter exit can abort rank 0 ("terminate called without an
    # active exception") while gloo's threads are still up
    if dist.is_initialized():
        dist.destroy_process_group()
