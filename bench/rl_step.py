"""One SmolLM2-135M-Instruct RL step (batch 2 prompts x 4 samples x 64 new tokens), before and after.

    python bench/rl_step.py [--steps 3] [--before-rev 78b1270] [--objective rlvr] [--rounds 1] [--part step|adamw]
                            [--precision auto|fp32|bf16] [--generate-batch 2]

"before" is the training core at git revision ``--before-rev`` (exported with ``git archive``
into a temporary folder; default: main before the step speed-up) run with the environment
it had (OpenMP's default spin-waiting: ``OMP_WAIT_POLICY`` removed); "after" is this
checkout run as the ``opdgeo`` CLI runs it (``OMP_WAIT_POLICY=PASSIVE``, set by
``opdgeo.cli``). Both run the same config in their own subprocess, alternately when
``--rounds`` > 1, with the precision ``optim.bf16_autocast: auto`` picks (fp32 on a CPU
without native bf16; ``--precision fp32|bf16`` forces it through ``$OPDGEO_AUTOCAST`` on both
sides — a "before" revision that predates ``auto`` ignores it, so compare fp32 against a
revision that has it). The step time is the loop's ``train/step_time`` (rollout, scoring,
loss, backward, AdamW); the first step of each process is a warm-up and not counted. The
last lines are ``name: value`` pairs; ``speedup`` = median before / median after, measured
in one run. ``--part adamw`` times only the optimizer update over SmolLM2's 135M parameters
(random gradients): the multi-tensor AdamW with OpenMP spinning (before) against the fused
AdamW with passive waiting (after). ``--generate-batch N`` runs "after" with
``rollout.micro_batch_size=N`` (default 2: the step's two micro-batches of 1 prompt are
sampled in one ``generate`` call; the backward still runs per micro-batch of 1 prompt).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def config_overrides(objective: str, steps: int, out: str, *, generate_batch: int | None = None) -> list[str]:
    """The step's config; ``generate_batch``: ``rollout.micro_batch_size`` (prompts per generate
    call; None: one call per micro-batch of 1 prompt, the only layout "before" knows)."""
    over = ["model.student=smollm2", f"objective={objective}", "optim.batch_size=2", "optim.micro_batch_size=1",
            "rollout.group_size=4", "rollout.max_new_tokens=64", "task.spec=arithmetic:difficulty=2",
            "task.num_problems=64", f"optim.steps={steps}", "optim.lr=1e-6", "run.progress=false",
            f"run.out_dir={out}", "checkpoint.save_trainer_state=false"]
    over += [f"rollout.micro_batch_size={generate_batch}"] if generate_batch else []
    return over + (["model.teacher=smollm2"] if objective == "opd" else [])


def worker(objective: str, steps: int, out: str, after: bool, generate_batch: int | None = None) -> None:
    if after:
        import opdgeo.cli  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads, as the CLI does)
    import torch

    from opdgeo.training.config import load_config
    from opdgeo.training.loop import train

    out = out or tempfile.mkdtemp(prefix="rl-step-worker-")  # a worker started by hand: never a folder "None"
    history = train(load_config(None, config_overrides(objective, steps, out, generate_batch=generate_batch))).history
    print("RESULT " + json.dumps({
        "step_time": [h.values["train/step_time"] for h in history],
        "tokens": [h.values["train/tokens"] for h in history],
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
    }), flush=True)


def adamw_worker(after: bool, steps: int) -> None:
    """AdamW steps over SmolLM2-135M's parameters with random gradients: the old update
    (multi-tensor foreach, OpenMP spinning) or the new one (fused, passive)."""
    if after:
        import opdgeo.cli  # noqa: F401
    import time

    import torch

    from opdgeo.models import model_and_tokenizer

    model = model_and_tokenizer("smollm2", seed=0)[0].float()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.1, **({"fused": True} if after else {"foreach": True}))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    print("RESULT " + json.dumps({"step_time": times, "tokens": [0] * steps, "threads": torch.get_num_threads(),
                                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}), flush=True)


def run_side(name: str, src: Path, objective: str, steps: int, tmp: Path, index: int, part: str = "step",
             precision: str = "auto", generate_batch: int | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OPDGEO_AUTOCAST")}
    env["PYTHONPATH"] = str(src)
    if precision != "auto":
        env["OPDGEO_AUTOCAST"] = precision
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--objective", objective,
           "--steps", str(steps), "--out", str(tmp / f"{name}-{index}"), "--part", part]
    cmd += ["--generate-batch", str(generate_batch)] if generate_batch else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="steps per process (the first is a warm-up)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating before/after processes per side")
    ap.add_argument("--objective", default="rlvr", choices=("rlvr", "opd"))
    ap.add_argument("--before-rev", default="78b1270")
    ap.add_argument("--part", default="step", choices=("step", "adamw"),
                    help="the whole RL step, or only the AdamW update over SmolLM2's parameters")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"),
                    help="the forward passes' precision on both sides (auto: bf16 autocast where native)")
    ap.add_argument("--generate-batch", type=int, default=2,
                    help="after: rollout.micro_batch_size, prompts per generate call (2: both micro-batches of "
                         "the step in one call; 1: one call per micro-batch, as before)")
    ap.add_argument("--worker", choices=("before", "after"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        if a.part == "adamw":
            adamw_worker(a.worker == "after", a.steps)
        else:
            worker(a.objective, a.steps, a.out, a.worker == "after",
                   generate_batch=a.generate_batch if a.worker == "after" else None)
        return
    import platform

    with tempfile.TemporaryDirectory(prefix="rl-step-") as tmp:
        tmp = Path(tmp)
        before_src = tmp / "before"
        before_src.mkdir()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", a.before_rev, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", str(before_src)], input=archive.stdout, check=True)
        sides = {"before": before_src / "src", "after": ROOT / "src"}
        times: dict[str, list[float]] = {"before": [], "after": []}
        info = {}
        for r in range(a.rounds):
            for name, src in sides.items():
                res = run_side(name, src, a.objective, a.steps, tmp, r, a.part, a.precision,
                               generate_batch=a.generate_batch if name == "after" else None)
                times[name] += res["step_time"][1:]
                info[name] = res
                print(f"{name} round {r}: steps {[round(t, 2) for t in res['step_time']]} s "
                      f"(tokens {res['tokens']}, threads {res['threads']}, OMP_WAIT_POLICY {res['omp_wait_policy']})",
                      flush=True)
    import torch

    med = {k: statistics.median(v) for k, v in times.items()}
    from opdgeo.training.precision import native_bf16

    print(f"cpu: {platform.processor() or platform.machine()} capability {torch.backends.cpu.get_cpu_capability()} "
          f"native_bf16 {native_bf16('cpu')}")
    print(f"precision: {a.precision}")
    print(f"before_rev: {a.before_rev}")
    print(f"part: {a.part}")
    print(f"objective: {a.objective}")
    print(f"after_generate_batch: {a.generate_batch}")
    print(f"before_median_step_s: {med['before']:.4g}")
    print(f"after_median_step_s: {med['after']:.4g}")
    print(f"speedup: {med['before'] / med['after']:.4g}")
    if a.part == "step":
        print(f"after_vs_31s: {31.0 / med['after']:.4g}")


if __name__ == "__main__":
    main()
