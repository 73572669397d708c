"""``opdgeo eval``: pass@1 (avg@k) of a model on one verifiable task or a suite of them."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("eval")
@click.argument("model")
@click.option("--task", "task_specs", multiple=True,
              help="'arithmetic[:difficulty=3,seed=0]', a .jsonl/.parquet file, a cached dataset id, or a known "
                   "dataset (aime-2024, math-500, ...); eval options after ':' (k=8, n=30, split=test, name=...). "
                   "Repeat for several tasks. Default: arithmetic.")
@click.option("--suite", default=None, help="A named suite of tasks, each with its own k: 'paper' (AIME 2024 "
              "avg@8 headline, AIME 2025, AMC 2023, MATH-500, Minerva).")
@click.option("--split", default="test", show_default=True, help="Problem split (held-out test by default).")
@click.option("--n", type=int, default=None, help="Number of problems (task default when omitted).")
@click.option("--k", type=int, default=1, show_default=True, help="Samples per problem (avg@k).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--max-new-tokens", type=int, default=96, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True, help="Sequences per generate call.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="One task: write per-problem results and samples as JSONL (and <out>.summary.json).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Any number of tasks: write <out-dir>/<task>.jsonl per task and <out-dir>/summary.json.")
@click.option("--no-dedup", is_flag=True, help="Evaluate every row, duplicates included (default: distinct problems).")
@click.option("--train-task", "train_tasks", multiple=True,
              help="A training task 'SPEC[:split=train]' to refuse as evaluation data (repeatable).")
def eval_cmd(model, task_specs, suite, split, n, k, temperature, max_new_tokens, batch_size, seed, dtype, out,
             out_dir, no_dedup, train_tasks):
    """Evaluate MODEL (a folder, a locally cached model id, or 'smollm2') on a task or a suite."""
    import dataclasses

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from opdgeo.cli.output import check_folder
    from opdgeo.errors import ConfigError
    from opdgeo.files import atomic_write_text
    from opdgeo.models import load_model, load_tokenizer
    from opdgeo.tasks import load_task, split_task_spec
    from opdgeo.tasks.suite import suite_from
    from opdgeo.training.evaluate import evaluate_suite

    tasks = task_specs or (() if suite else ("arithmetic",))
    plan = suite_from(tasks, suite=suite, k=k, split=split, n=n, temperature=temperature,
                      max_new_tokens=max_new_tokens)
    ctx = click.get_current_context()
    given = {name for name in ("temperature", "max_new_tokens")
             if ctx.get_parameter_source(name) is not click.core.ParameterSource.DEFAULT}
    # an explicit --temperature / --max-new-tokens overrides a named suite's own
    plan = dataclasses.replace(plan, dedup=not no_dedup,
                               temperature=temperature if "temperature" in given else plan.temperature,
                               max_new_tokens=max_new_tokens if "max_new_tokens" in given else plan.max_new_tokens)
    if out is not None and len(plan.tasks) > 1:
        raise ConfigError(f"--out writes one task's results; {len(plan.tasks)} tasks: use --out-dir")
    train = []
    for text in train_tasks:
        head, opts = split_task_spec(text)
        tsplit = opts.pop("split", "train")
        train.append((head + (":" + ",".join(f"{a}={b}" for a, b in opts.items()) if opts else ""), tsplit))
    problems = []
    for t in plan.tasks:  # every task spec checked before the model loads (they load lazily)
        try:
            load_task(t.spec)
        except ConfigError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError("; ".join(problems))
    check_folder("--out-dir", out_dir)
    check_folder("--out", None if out is None else out.parent)
    tokenizer = load_tokenizer(model)
    lm = load_model(model, dtype=getattr(torch, dtype))
    err = Console(stderr=True)
    with Progress(TextColumn("eval {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        jobs = {t.name: bar.add_task(t.name, total=None) for t in plan.tasks}
        result = evaluate_suite(lm, tokenizer, plan, seed=seed, batch_size=batch_size, out_dir=out_dir, train=train,
                                progress=lambda name, done, total: bar.update(jobs[name], completed=done, total=total))
    if out is not None:
        (only,) = result.results.values()
        only.write(out)
        atomic_write_text(out.with_name(out.name + ".summary.json"), json.dumps(only.summary(), indent=2) + "\n")
    for name, r in result.results.items():
        c = result.counts.get(name, {})
        dup = f", {c['rows'] - c['distinct']} duplicate rows skipped" if plan.dedup and c.get("rows", 0) > c.get(
            "distinct", 0) else ""
        click.echo(f"{model}: avg@{r.k} (pass@1) = {r.avg_at_k:.4f} on {r.n} {r.split} problems of "
                   f"{r.task} (T={r.temperature:g}, mean {r.mean_response_tokens:.1f} tokens, "
                   f"{100 * r.truncated_fraction:.1f}% truncated{dup})")
    if len(result.results) > 1:
        head = result.results[result.headline]
        click.echo(f"headline: {result.headline} avg@{head.k} = {head.avg_at_k:.4f}")
