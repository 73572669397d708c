"""Cost of the study's controls on the tiny preset.

Measures, with the real training loop (``opdgeo.training.loop.train``) on the ``tiny:student``
preset (OPD towards ``tiny:teacher``, 8 prompts x 8 samples, 32 new tokens per step):

- ``projected_vs_plain``: median step time of subspace-projected training (``project.from``
  a step, rank 16: gradients projected onto V_16, everything but the block matrices frozen)
  over the median step time of the same run unprojected, on the steps after projection
  starts. Target ≤ 1.2.
  ``projection_share_of_step`` isolates the projection itself (one ``project_gradients_``
  call over the block matrices / step time), free of the rollout noise.
- ``monitor_overhead``: the cost of one geometry-monitor probe (stable rank, ‖ΔW‖_F,
  Sim_16, bf16 density of the attention matrices' update, exactly what the loop runs)
  amortized over 10 steps: probe time / (10 x median step time). Target ≤ 0.10. The probe
  is timed on the trained weights (median of repeats), because one probe inside a
  12-step run is below the run-to-run noise of the step time.

    python bench/controls.py [--steps 12] [--threads 1]

The last lines are ``name: value`` pairs ending with ``projected_vs_plain`` and
``monitor_overhead``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path


def config(out: Path, steps: int, **sections):
    from opdgeo.training.config import config_from_dict

    d = {
        "objective": {"name": "opd"},
        "model": {"student": "tiny:student", "teacher": "tiny:teacher", "init_seed": 0},
        "task": {"spec": "arithmetic:difficulty=2", "num_problems": 64},
        "rollout": {"group_size": 8, "max_new_tokens": 32},
        "optim": {"steps": steps, "batch_size": 8, "micro_batch_size": 4, "lr": 1e-4, "betas": [0.9, 0.98],
                  "weight_decay": 0.1},
        "checkpoint": {"every": 0},
        "run": {"out_dir": str(out), "progress": False},
    }
    for name, values in sections.items():
        d.setdefault(name, {}).update(values)
    return config_from_dict(d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps per run (projection starts at 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP contention on shared cores)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats of one monitor probe")
    args = parser.parse_args()

    import torch

    from opdgeo.training.checkpointing import load_trainer_state
    from opdgeo.training.loop import load_policy, monitor_settings, origin_matrices, train
    from opdgeo.training.monitor import probe, start_monitor
    from opdgeo.training.projection import SUBSPACE_FILE, load_subspaces, project_gradients_

    torch.set_num_threads(args.threads)
    start = 2
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = {}
        for name, sections in [
            ("plain", {}),
            ("projected", {"project": {"from": start, "rank": 16}}),
            ("plain_again", {}),  # the plain run twice: run-to-run noise of the measurement
        ]:
            t0 = time.perf_counter()
            result = train(config(tmp / name, args.steps, **sections))
            wall = time.perf_counter() - t0
            times = [h.values["train/step_time"] for h in result.history[start:]]
            tokens = [h.values["train/tokens"] for h in result.history[start:]]
            runs[name] = statistics.median(times)
            print(f"{name}: median step {runs[name]:.4f} s over steps {start + 1}..{args.steps} "
                  f"({statistics.mean(tokens):.0f} tokens/step), run {wall:.1f} s")

        # the monitor's probe on the trained weights, as the loop calls it
        cfg = config(tmp / "probe", args.steps, run={"monitor_every": 10})
        student, _ = load_policy(cfg.model.student, init_seed=cfg.model.init_seed)
        origin = origin_matrices(cfg, student)
        final = dict(load_trainer_state(tmp / "plain" / f"step-{args.steps:06d}").master)
        probe_times = {}
        for matrices in ("attention", "all"):
            settings = dataclasses.replace(monitor_settings(cfg), matrices=matrices)
            state = start_monitor(origin, settings)
            _, state = probe(state, 1, final)  # warm-up, and a previous probe for Sim_16
            samples = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                probe(state, 2, final)
                samples.append(time.perf_counter() - t0)
            probe_times[matrices] = statistics.median(samples)
            print(f"monitor probe ({matrices}, {len(state.origin)} matrices): {probe_times[matrices] * 1e3:.1f} ms")

        # the projection's own cost: project every block matrix's gradient once
        subspaces = {n: v.float() for n, v in load_subspaces(tmp / "projected" / SUBSPACE_FILE)[0].items()}
        params = dict(student.named_parameters())
        for p in params.values():
            p.grad = torch.randn_like(p)
        samples = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            project_gradients_(params, subspaces)
            samples.append(time.perf_counter() - t0)
        project_time = statistics.median(samples)
        print(f"gradient projection ({len(subspaces)} matrices, rank 16): {project_time * 1e3:.2f} ms")

    plain = statistics.median([runs["plain"], runs["plain_again"]])
    print(f"plain_run_to_run: {runs['plain_again'] / runs['plain']:.3f}")
    print(f"projection_share_of_step: {project_time / plain:.4f}")
    print(f"monitor_overhead_all: {probe_times['all'] / (10 * plain):.4f}")
    print(f"projected_vs_plain: {runs['projected'] / plain:.3f}")
    print(f"monitor_overhead: {probe_times['attention'] / (10 * plain):.4f}")


if __name__ == "__main__":
    main()
