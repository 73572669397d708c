"""``opdgeo study``: reproduce the study end to end and write a report (thin: parse, call, print)."""

from __future__ import annotations

import click


@click.command("study")
@click.option("--preset", default="tiny", show_default=True, metavar="NAME|FILE.yaml",
              help="quick: CI smoke test (< 1 min); tiny: the default small study (<= 15 min on 2 CPU cores); "
                   "smollm2: real SmolLM2-135M-Instruct student; paper: the paper's recipe (GPUs); or a study "
                   "file of your own (recipes/study/*.yaml show the format).")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Run folder (default: runs/study-<the preset's name>).")
@click.option("--fresh", is_flag=True, help="Redo the selected stages even when cached.")
@click.option("--dry-run", is_flag=True, help="Validate and show the plan (stages, runs, sizes, GPU memory, disk); run nothing.")
@click.option("--stages", "stages", default=None,
              help="Comma-separated stage names, kinds (model, train, eval, compare, trajectory, report) or tags "
                   "(core, controls, matched, sparsification, offpolicy, mixing, projection; all) to run, with their "
                   "dependencies (default: the preset's default_stages: the core for smollm2, all for the others).")
@click.option("--launcher", default=None,
              help='Run training stages as subprocesses, e.g. "accelerate launch --num_processes 8" on GPUs.')
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Stages run at once, each in its own process (default: the CPU cores divided by the preset's "
                   "torch_threads; 1 with --launcher). Results do not depend on it.")
def study_cmd(preset, out, fresh, dry_run, stages, launcher, jobs):
    """Train teacher and student, run SFT, OPD, RLVR and every control, diagnose, and report.

    Finished stages are cached in the run folder by their configuration; rerunning the
    command reuses them and resumes an interrupted one.
    """
    from pathlib import Path

    from opdgeo.study import get_preset, plan_text, run_study

    p = get_preset(preset)
    out = Path(out or f"runs/study-{p.name}")
    select = [s.strip() for s in stages.split(",") if s.strip()] if stages else None
    if not dry_run:
        from opdgeo.cli.output import check_folder

        check_folder("--out", out)  # before any stage runs
    if dry_run:
        click.echo(plan_text(p, out, launcher=launcher, select=select), nl=False)
        return
    res = run_study(p, out, fresh=fresh, select=select, launcher=launcher, jobs=jobs)
    _summary(res)


def _summary(res) -> None:
    import json

    from rich.console import Console
    from rich.table import Table

    console = Console()
    counts: dict[str, int] = {}
    for o in res.outcomes.values():
        counts[o.status] = counts.get(o.status, 0) + 1
    console.print(f"[bold]study finished[/bold] in {res.seconds:.1f} s: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())))
    claims_path = res.out / "claims.json"
    if claims_path.is_file():
        t = Table(title="claims")
        t.add_column("claim")
        t.add_column("this run")
        for c in json.loads(claims_path.read_text()):
            mark = {True: "[green]reproduced[/green]", False: "[red]not reproduced[/red]", None: "[dim]not measured[/dim]"}[c["holds"]]
            t.add_row(c["claim"], mark)
        console.print(t)
    roots = [o for o in res.outcomes.values() if o.status in ("unavailable", "failed")]
    skipped = [o.name for o in res.outcomes.values() if o.status == "skipped"]
    for o in roots:
        console.print(f"[yellow]not measured[/yellow]: {o.name} ({o.status}: {o.reason[:200]})")
    if skipped:
        console.print(f"[yellow]not measured[/yellow]: {len(skipped)} stages depending on those were skipped")
    if res.report is not None:
        console.print(f"report: {res.report}")
    console.print(f"timings: {res.out / 'timings.json'}")
