"""``opdgeo eval``: pass@1 (avg@k) of a model on a verifiable task."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("eval")
@click.argument("model")
@click.option("--task", "task_spec", default="arithmetic", show_default=True,
              help="'arithmetic[:difficulty=3,seed=0]', a .jsonl/.parquet file, or a cached dataset name.")
@click.option("--split", default="test", show_default=True, help="Problem split (held-out test by default).")
@click.option("--n", type=int, default=None, help="Number of problems (task default when omitted).")
@click.option("--k", type=int, default=1, show_default=True, help="Samples per problem (avg@k).")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--max-new-tokens", type=int, default=96, show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True, help="Sequences per generate call.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write per-problem results and samples as JSONL (and <out>.summary.json).")
def eval_cmd(model, task_spec, split, n, k, temperature, max_new_tokens, batch_size, seed, dtype, out):
    """Evaluate MODEL (a folder, a locally cached model id, or 'smollm2') on a task."""
    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from opdgeo.models import load_model, load_tokenizer
    from opdgeo.tasks import load_task
    from opdgeo.training.evaluate import evaluate

    task = load_task(task_spec)
    tokenizer = load_tokenizer(model)
    lm = load_model(model, dtype=getattr(torch, dtype))
    err = Console(stderr=True)
    with Progress(TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True) as bar:
        job = bar.add_task("eval", total=None)
        result = evaluate(lm, tokenizer, task, split=split, n=n, k=k, temperature=temperature,
                          max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size, out=out,
                          progress=lambda done, total: bar.update(job, completed=done, total=total))
    if out is not None:
        out.with_name(out.name + ".summary.json").write_text(json.dumps(result.summary(), indent=2) + "\n")
    click.echo(f"{model}: avg@{k} (pass@1) = {result.avg_at_k:.4f} on {result.n} {split} problems of "
               f"{result.task} (T={temperature:g}, mean {result.mean_response_tokens:.1f} tokens, "
               f"{100 * result.truncated_fraction:.1f}% truncated)")
