"""``opdgeo trajectory --origin DIR RUN_DIR``: follow runs' updates over their checkpoints (SPEC §2).

Parse, call ``opdgeo.analysis.trajectory.trajectory``, print. Under
``torchrun --nproc-per-node N -m opdgeo trajectory ...`` every rank takes a share of the
matrices and rank 0 prints and writes.
"""

from __future__ import annotations

import math
import sys

import click

from opdgeo.analysis.trajectory import TrajectoryOptions
from opdgeo.errors import ConfigError


def _split_named(value: str, known: set[str]) -> tuple[str | None, str]:
    """``NAME=PATH`` when NAME is a known run (paths may contain '='), else ``(None, value)``."""
    name, sep, rest = value.partition("=")
    if sep and name in known:
        return name, rest
    return None, value


def _parse_runs(run_args: tuple[str, ...], positional: tuple[str, ...]) -> dict:
    from pathlib import Path

    runs: dict = {}
    for value in run_args:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--run expects NAME=PATH (a run folder, or checkpoints separated by commas); got {value!r}")
        if name in runs:
            raise ConfigError(f"--run {name} given twice")
        parts = [p for p in path.split(",") if p]
        runs[name] = parts[0] if len(parts) == 1 and _is_run_folder(parts[0]) else parts
    if positional:
        if len(positional) == 1 and _is_run_folder(positional[0]):
            name, spec = Path(positional[0]).resolve().name, positional[0]
        else:
            name, spec = Path(positional[0]).resolve().parent.name or "run", list(positional)
        if name in runs:
            raise ConfigError(f"run name {name} (from RUN_DIR) is also given by --run")
        runs[name] = spec
    if not runs:
        raise ConfigError("no run: give RUN_DIR (a folder of step-N or checkpoint-N folders, or checkpoint folders "
                          "in order) "
                          "or --run NAME=PATH")
    return runs


def _is_run_folder(path: str) -> bool:
    """A folder that is not itself a checkpoint is a run folder (of step folders: step-N,
    checkpoint-N, global_step_N, iter_N)."""
    from pathlib import Path

    from opdgeo.checkpoints.steps import checkpoint_step_of

    p = Path(path)
    if not p.is_dir():
        return False
    if any(c.is_dir() and (c.name.startswith("step") or checkpoint_step_of(c) is not None) for c in p.iterdir()):
        return True
    return not any(p.glob("*.safetensors")) and not any(p.glob("*.bin")) and not (p / "config.json").exists()


def _parse_origins(origin_args: tuple[str, ...], runs: dict) -> dict:
    from pathlib import Path

    known = set(runs)
    default, named = None, {}
    for value in origin_args:
        name, path = _split_named(value, known)
        if name is None and "=" in value and not Path(value).exists():
            raise ConfigError(f"--origin {value}: {value.partition('=')[0]} is not a run (runs: {', '.join(runs)})")
        if name is None:
            if default is not None:
                raise ConfigError(f"--origin given twice without a run name ({default} and {path}); "
                                  "use --origin NAME=DIR per run")
            default = path
        else:
            if name in named:
                raise ConfigError(f"--origin {name} given twice")
            named[name] = path
    missing = [r for r in runs if r not in named and default is None]
    if missing:
        raise ConfigError(f"no --origin for run(s) {', '.join(missing)}: give --origin DIR or --origin NAME=DIR")
    return {r: named.get(r, default) for r in runs}


_D = TrajectoryOptions()  # the defaults, in one place
_FLAGS = {"origins": "--origin"}  # fields whose flag is not --<field>


@click.command("trajectory", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", nargs=-1)
@click.option("--origin", "origins", multiple=True, metavar="[NAME=]DIR",
              help="Origin checkpoint W0 (the SFT anchor for OPD/RLVR, the base for SFT); NAME=DIR per run.")
@click.option("--run", "runs", multiple=True, metavar="NAME=PATH",
              help="A run to overlay: a folder of step-N, checkpoint-N, global_step_N or iter_N checkpoints, "
                   "or checkpoint folders separated by commas. "
                   "Repeatable.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Write trajectory.csv, summary.json, overlap.csv and the figures (PNG, SVG) here.")
@click.option("--matrices", default=_D.matrices, show_default=True,
              help="attention (q, k, v, o), all (q..down, experts included) or a regular expression on tensor names.")
@click.option("--k-hill", type=int, default=_D.k_hill, show_default=True, help="Top singular values in the Hill index.")
@click.option("--sim-k", type=int, default=_D.sim_k, show_default=True, help="Subspace size K of Sim_K.")
@click.option("--lock-threshold", "--threshold", "lock_threshold", type=float, default=_D.lock_threshold,
              show_default=True, help="Locking threshold of Sim_K (--threshold is the older spelling).")
@click.option("--workers", type=int, default=_D.workers, show_default=True,
              help="Matrices processed in parallel (threads).")
@click.option("--exact-svd", is_flag=True, help="Full float64 SVDs instead of the randomized top-k SVD (slow).")
@click.option("--no-overlap", is_flag=True, help="Skip the cross-run overlap of runs sharing an origin.")
@click.option("--allow-pickle", is_flag=True, help="Allow pytorch_model*.bin (loaded with weights_only=True).")
def trajectory_cmd(run_dir, origins, runs, out, matrices, k_hill, sim_k, lock_threshold, workers, exact_svd,
                   no_overlap, allow_pickle):
    """Follow the update ΔW_t = W_t − W0 of RUN_DIR's checkpoints (step-N, checkpoint-N,
    global_step_N/actor/huggingface, iter_N; the step from the name), or of each --run."""
    from opdgeo.analysis.parallel import dist_context
    from opdgeo.analysis.trajectory import trajectory
    from opdgeo.cli.flags import flags_for_fields

    from opdgeo.cli.output import check_folder, publish

    check_folder("--out", out)  # before any work
    run_map = _parse_runs(runs, run_dir)
    origin_map = _parse_origins(origins, run_map)
    options = TrajectoryOptions(matrices=matrices, k_hill=k_hill, sim_k=sim_k, lock_threshold=lock_threshold,
                                workers=workers, exact_svd=exact_svd, allow_pickle=allow_pickle, progress=True)
    with flags_for_fields(_FLAGS), dist_context() as (rank_id, _):
        result = trajectory(run_map, origin_map, options, overlap=False if no_overlap else None)
        if rank_id == 0:
            print_result(result)
            if out is not None:
                paths = publish(result.write, out, flag="--out", command="trajectory")
                click.echo(f"wrote {len(paths)} files to {out}", err=True)


def _fmt(x, spec=".4g") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def print_result(result) -> None:
    """Per run: the locking step and the per-checkpoint means; then the pooled cross-run overlap."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    settings = result.summary["settings"]
    k = settings["sim_k"]
    for run, info in result.summary["runs"].items():
        lock = info["locking_step"]
        where = (f"locks at step {lock} ({info['locking_progress']:.0f} % of training)" if lock is not None
                 else "never locks")
        console.print(f"[bold]{run}[/bold]: {where} (Sim_{k} ≥ {settings['lock_threshold']:g}); "
                      f"{len(info['steps'])} checkpoints, {info['n_matrices']} matrices")
        table = Table(show_header=True)
        for col in ("step", "progress", "stable rank", "‖ΔW‖_F", "rel ‖ΔW‖_F", "Hill α", f"Sim_{k}"):
            table.add_column(col, justify="right")
        for m in info["means"]:
            table.add_row(str(m["step"]), f"{m['progress']:.0f} %", _fmt(m["stable_rank"]), _fmt(m["fro_norm"], ".3e"),
                          _fmt(m["rel_fro_norm"], ".3e"), _fmt(m["hill_alpha"]), _fmt(m["sim_to_final"], ".3f"))
        console.print(table)
    pooled = [r for r in result.overlap if r["scope"] == "all"]
    if pooled:
        table = Table(title="cross-run overlap of final update masks (all selected matrices)", show_header=True)
        for col in ("A", "B", "density A", "density B", "|A∩B|/|A| (baseline)", "|A∩B|/|B| (baseline)",
                    "Jaccard (baseline)"):
            table.add_column(col, justify="left" if col in ("A", "B") else "right")
        for r in pooled:
            table.add_row(r["run_a"], r["run_b"], _fmt(r["density_a"], ".3f"), _fmt(r["density_b"], ".3f"),
                          f"{_fmt(r['overlap_a_in_b'], '.3f')} ({_fmt(r['baseline_a_in_b'], '.3f')})",
                          f"{_fmt(r['overlap_b_in_a'], '.3f')} ({_fmt(r['baseline_b_in_a'], '.3f')})",
                          f"{_fmt(r['jaccard'], '.3f')} ({_fmt(r['jaccard_baseline'], '.3f')})")
        console.print(table)
