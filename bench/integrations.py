"""Benchmark of opdgeo's transformers callbacks: the cost of ``GeometryMonitor`` in a run.

The tiny model: the study's student (``tiny_qwen3_config("student")``, 3 layers, hidden
128, char vocabulary; from a config, nothing downloaded), trained by ``transformers.Trainer``
(AdamW, batch 8 × 64 tokens, fp32, no checkpoints saved) for ``--steps`` steps, once
without callbacks and once with ``GeometryMonitor(every=10)`` (attention matrices, the
default), ``--repeats`` times alternating, in one process. Measured:

- ``monitor_overhead``: median(t_with) / median(t_without) − 1 (target ≤ 0.10 at every=10);
- the same with ``matrices="all"`` (``monitor_all_overhead``, reported, no target);
- ``projection_overhead``: ``SubspaceProjection(rank=16, start=5)`` against no callback.

The last lines are ``name: value`` pairs. Usage::

    python bench/integrations.py [--steps 60] [--repeats 3] [--every 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)


def _model():
    from opdgeo.models import build_model, char_tokenizer, tiny_qwen3_config

    return build_model(tiny_qwen3_config("student", len(char_tokenizer())), seed=0).train()


def _rows(n: int, length: int = 64):
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        x = torch.randint(3, 99, (length,), generator=g)
        out.append({"input_ids": x, "labels": x.clone()})
    return out


def _time(steps: int, callbacks, out: str) -> float:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=out, max_steps=steps, per_device_train_batch_size=8, learning_rate=1e-3,
                             save_strategy="no", logging_steps=10, report_to=[], use_cpu=True, disable_tqdm=True,
                             seed=0)
    trainer = Trainer(model=_model(), args=args, train_dataset=_rows(8 * steps), callbacks=callbacks)
    t0 = time.perf_counter()
    trainer.train()
    return time.perf_counter() - t0


def main() -> None:
    from opdgeo.integrations.transformers import GeometryMonitor, SubspaceProjection

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--every", type=int, default=10)
    a = ap.parse_args()
    variants = {
        "none": lambda: [],
        "monitor": lambda: [GeometryMonitor(every=a.every, out=False)],
        "monitor_all": lambda: [GeometryMonitor(every=a.every, matrices="all", out=False)],
        "projection": lambda: [SubspaceProjection(rank=16, start=5)],
    }
    times = {k: [] for k in variants}
    with tempfile.TemporaryDirectory() as tmp:
        _time(5, [], tmp)  # warm-up (imports, allocator)
        for _ in range(a.repeats):
            for name, make in variants.items():
                times[name].append(_time(a.steps, make(), tmp))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}")
    for name, v in times.items():
        print(f"{name}: " + ", ".join(f"{t:.2f}" for t in v) + f" s (median {med[name]:.2f} s, {a.steps} steps)")
    print(f"monitor_overhead: {med['monitor'] / med['none'] - 1:.4f}")
    print(f"monitor_all_overhead: {med['monitor_all'] / med['none'] - 1:.4f}")
    print(f"projection_overhead: {med['projection'] / med['none'] - 1:.4f}")


if __name__ == "__main__":
    main()
