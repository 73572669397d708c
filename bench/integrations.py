"""Benchmark of opdgeo's transformers callbacks: the cost of ``GeometryMonitor`` in a run.

The tiny model: the study's student (``tiny_qwen3_config("student")``, 3 layers, hidden
128, char vocabulary; from a config, nothing downloaded), trained by ``transformers.Trainer``
(AdamW, batch 8 × 64 tokens, fp32, no checkpoints saved) for ``--steps`` steps, once
without callbacks and once with ``GeometryMonitor(every=10)`` (attention matrices, the
default), ``--repeats`` times alternating, in one process. Measured:

- ``monitor_overhead``: inside each run with the monitor, the seconds spent in the
  callback's events over the seconds of everything else (target ≤ 0.10 at every=10);
  the median over repeats. Measured in the run itself, so it does not depend on how fast
  the shared machine happens to be between runs;
- ``monitor_ab_ratio``: median(t_with) / median(t_without) − 1 over whole runs (the same
  quantity from separate runs; noisy on a loaded machine);
- the same two with ``matrices="all"`` (``monitor_all_*``, reported, no target), and
  ``projection_overhead`` for ``SubspaceProjection(rank=16, start=5)``.

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


class Timed:
    """Delegates the trainer events to ``inner`` and adds up the seconds they take."""

    EVENTS = ("on_train_begin", "on_optimizer_step", "on_step_end", "on_train_end")

    def __init__(self, inner):
        from transformers import TrainerCallback

        self.inner, self.seconds = inner, 0.0
        for name in dir(TrainerCallback):
            if name.startswith("on_") and name not in self.EVENTS:
                setattr(self, name, getattr(inner, name))
        for name in self.EVENTS:
            setattr(self, name, self._timed(getattr(inner, name)))

    def _timed(self, fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        return call


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
        "monitor": lambda: [Timed(GeometryMonitor(every=a.every, out=False))],
        "monitor_all": lambda: [Timed(GeometryMonitor(every=a.every, matrices="all", out=False))],
        "projection": lambda: [Timed(SubspaceProjection(rank=16, start=5))],
    }
    times = {k: [] for k in variants}
    share = {k: [] for k in variants if k != "none"}
    with tempfile.TemporaryDirectory() as tmp:
        _time(5, [], tmp)  # warm-up (imports, allocator)
        for _ in range(a.repeats):
            for name, make in variants.items():
                callbacks = make()
                total = _time(a.steps, callbacks, tmp)
                times[name].append(total)
                if callbacks:
                    share[name].append(callbacks[0].seconds / (total - callbacks[0].seconds))
    med = {k: statistics.median(v) for k, v in times.items()}
    mshare = {k: statistics.median(v) for k, v in share.items()}
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"cpu capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}")
    for name, v in times.items():
        print(f"{name}: " + ", ".join(f"{t:.2f}" for t in v) + f" s (median {med[name]:.2f} s, {a.steps} steps)")
    for name, v in share.items():
        print(f"{name} callback share: " + ", ".join(f"{x:.4f}" for x in v))
    print(f"monitor_overhead: {mshare['monitor']:.4f}")
    print(f"monitor_ab_ratio: {med['monitor'] / med['none'] - 1:.4f}")
    print(f"monitor_all_overhead: {mshare['monitor_all']:.4f}")
    print(f"monitor_all_ab_ratio: {med['monitor_all'] / med['none'] - 1:.4f}")
    print(f"projection_overhead: {mshare['projection']:.4f}")
    print(f"projection_ab_ratio: {med['projection'] / med['none'] - 1:.4f}")


if __name__ == "__main__":
    main()
