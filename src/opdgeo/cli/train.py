"""``opdgeo train CONFIG.yaml [--set key=value ...] [--resume] [--out DIR] [--project-from STEP_DIR --rank K]``.

Thin: parse, validate the whole config (every problem listed at once, before any model
loads), call ``opdgeo.training.train``, print where the run went.
"""

from __future__ import annotations

import click


@click.command("train", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("config_path", metavar="CONFIG.yaml", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config value with a dotted key, e.g. --set optim.lr=1e-5 (repeatable).")
@click.option("--resume", is_flag=True, help="Continue the run in the output folder from its last checkpoint.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Run folder (overrides run.out_dir).")
@click.option("--no-progress", is_flag=True, help="Do not show the progress bar.")
@click.option("--project-from", "project_from", type=click.Path(file_okay=False), default=None,
              help="Restart the run from this checkpoint (e.g. runs/opd/step-000063) under subspace projection: "
                   "gradients of the block matrices are projected onto the top --rank right singular vectors of "
                   "their update since the run's origin; everything else is frozen. Default --out: "
                   "<run.out_dir>-projected-<step folder>-k<rank>.")
@click.option("--rank", type=int, default=None, help="K for --project-from (default: project.rank, 16).")
@click.option("--dry-run", is_flag=True, help="Validate the config and print the plan (batches, strategy, per-GPU "
              "memory and which strategy fits 8 x 80 GB, the disk its checkpoints take); load and run nothing.")
@click.option("--world-size", type=click.IntRange(min=1), default=None,
              help="--dry-run: processes to plan for (default: the launcher's, 1 in a plain process).")
def train_cmd(config_path, overrides, resume, out_dir, no_progress, project_from, rank, dry_run, world_size):
    """Train with SFT, RLVR (GRPO) or OPD from a YAML config (SPEC §3).

    Writes the run folder: config.yaml, metrics.jsonl and step-NNNNNN/ checkpoints in
    Hugging Face layout. Data-parallel: `accelerate launch --multi_gpu --num_processes N
    -m opdgeo train ...` (on CPU too: gloo) or `torchrun --nproc_per_node N -m opdgeo train ...`.
    """
    import dataclasses
    import json
    from pathlib import Path

    from opdgeo.errors import ConfigError
    from opdgeo.training.config import load_config

    overrides = list(overrides)
    if project_from is not None:
        overrides.append(f"project.from={json.dumps(str(project_from))}")
    if rank is not None:
        if project_from is None:
            raise ConfigError("--rank: only with --project-from (or set project.rank in the config)")
        overrides.append(f"project.rank={rank}")
    config = load_config(config_path, overrides)
    run = config.run
    if project_from is not None and out_dir is None:
        out_dir = f"{run.out_dir.rstrip('/')}-projected-{Path(project_from).name}-k{config.project.rank}"
    if out_dir is not None:
        run = dataclasses.replace(run, out_dir=str(out_dir))
    if no_progress:
        run = dataclasses.replace(run, progress=False)
    config = dataclasses.replace(config, run=run)
    if dry_run:
        from opdgeo.training.memory_plan import train_plan

        click.echo(train_plan(config, world=world_size), nl=False)
        return
    if world_size is not None:
        raise ConfigError("--world-size: only with --dry-run (the launcher sets the world size)")
    from opdgeo.cli.output import check_folder

    check_folder("--out" if out_dir is not None else "run.out_dir", run.out_dir)  # before any model loads

    from opdgeo.training.loop import train

    result = train(config, resume=resume)
    import os

    if os.environ.get("RANK", "0") == "0":  # the launcher's rank 0 (train has ended the process group)
        last = result.history[-1].values if result.history else {}
        summary = ", ".join(f"{k} {last[k]:.4g}" for k in ("train/loss", "rlvr/reward", "rlvr/accuracy") if k in last)
        click.echo(f"{result.out_dir}: step {result.final_step}" + (f" ({summary})" if summary else ""))
