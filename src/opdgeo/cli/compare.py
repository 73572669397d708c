"""``opdgeo compare BASE TUNED``: pairwise diagnostics (SPEC §1). Parse, call, print.

Under ``torchrun --nproc-per-node N -m opdgeo compare ...`` every rank takes a share of
the tensors and rank 0 prints and writes the report.
"""

from __future__ import annotations

import click

from opdgeo.analysis.compare import METRICS, CompareOptions

_D = CompareOptions()  # the defaults, in one place
_FLAGS = {"keep_angles": "--save-angles"}  # fields whose flag is not --<field>


@click.command("compare", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("base")
@click.argument("tuned")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Write matrices.csv, summary.json and summary.md into this folder.")
@click.option("--metrics", default=",".join(_D.metrics), show_default=True,
              help=f"Comma-separated subset of: {', '.join(METRICS)} (sparsity is always computed).")
@click.option("--k", "k", type=str, default=str(_D.k), show_default=True,
              help="Principal-angle subspace size: an integer (capped at min(m, n) per matrix) or a fraction "
                   "a/b of each matrix's min(m, n), e.g. 1/8 (the paper's 512 of 4096).")
@click.option("--rank", "rank", type=int, default=_D.rank, show_default=True,
              help="Rank of the W0 reconstruction behind the principal mask (capped at min(m, n) per matrix; "
                   "the rank column reports the value used).")
@click.option("--alpha", type=float, default=_D.alpha, show_default=True,
              help="Fraction of entries in the principal and low-magnitude masks.")
@click.option("--eta", type=float, default=_D.eta, show_default=True,
              help="Relative tolerance of the bf16 unchanged rule.")
@click.option("--legacy-atol", type=float, default=_D.legacy_atol,
              help="Also report legacy sparsity |Δ| <= ATOL (e.g. 1e-5; off by default).")
@click.option("--precision", type=click.Choice(["fp64", "fp32"]), default=_D.precision, show_default=True,
              help="Precision of the SVDs.")
@click.option("--device", default=_D.device, show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--workers", type=int, default=_D.workers, show_default=True,
              help="Tensors processed in parallel (threads).")
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help="Folder caching the base's SVDs and masks (reused by later comparisons against the same base).")
@click.option("--ignore-missing", is_flag=True, help="Skip tensors present in only one checkpoint.")
@click.option("--allow-pickle", is_flag=True, help="Allow pytorch_model*.bin (loaded with weights_only=True).")
@click.option("--show-matrices", is_flag=True, help="Also print the per-matrix table.")
@click.option("--save-angles", is_flag=True, help="With --out, also write every angle vector to angles.safetensors.")
def compare_cmd(base, tuned, out, metrics, k, rank, alpha, eta, legacy_atol, precision, device, workers, cache,
                ignore_missing, allow_pickle, show_matrices, save_angles):
    """Diagnose the update from BASE to TUNED (HF folders, .safetensors files, local-cache ids or smollm2)."""
    from opdgeo.analysis.compare import compare
    from opdgeo.analysis.parallel import dist_context
    from opdgeo.cli.flags import flags_for_fields
    from opdgeo.cli.output import check_folder, publish
    from opdgeo.errors import ConfigError

    if save_angles and out is None:
        raise ConfigError("--save-angles needs --out DIR")
    check_folder("--out", out)  # before any work: a result that cannot be written is not computed
    check_folder("--cache", cache)
    k = int(k) if k.strip().isdigit() else k  # an integer, or a fraction a/b validated by the options
    options = CompareOptions(metrics=metrics, k=k, rank=rank, alpha=alpha, eta=eta, legacy_atol=legacy_atol,
                             precision=precision, device=device, workers=workers, keep_angles=save_angles,
                             cache=cache, ignore_missing=ignore_missing, allow_pickle=allow_pickle, progress=True)
    with flags_for_fields(_FLAGS), dist_context(device=device) as (rank_id, world):
        result = compare(base, tuned, options)
        if rank_id == 0:
            print_result(result, show_matrices=show_matrices)
            if out is not None:
                paths = publish(result.write, out, flag="--out", command="compare")
                click.echo(f"wrote {', '.join(str(p) for p in paths)}", err=True)


def print_result(result, *, show_matrices: bool = False) -> None:
    """The readable summary: headline numbers, the per-type table, optionally every matrix."""
    from rich.console import Console
    from rich.table import Table

    from opdgeo.analysis.compare_summary import SUMMARY_MEAN_KEYS
    from opdgeo.report.compare_files import format_percent, format_value

    import sys

    console = Console(width=None if sys.stdout.isatty() else 200)  # files/pipes: do not cut names
    s = result.summary
    console.print(f"[bold]global sparsity[/bold] {format_percent(s['global_sparsity'])} of {s['n_params']:,} parameters "
                  f"({s['n_tensors']} tensors, {s['n_matrices']} geometry matrices)")
    if s.get("global_legacy_sparsity") is not None:
        console.print(f"legacy sparsity (|Δ| ≤ {s['settings']['legacy_atol']}) {format_percent(s['global_legacy_sparsity'])}")
    means = Table(title="geometry-set means", show_header=True)
    means.add_column("metric")
    means.add_column("value", justify="right")
    for key in SUMMARY_MEAN_KEYS.values():
        means.add_row(key, format_value(s[key], key))
    console.print(means)

    short = {"mean_density": "density", "mean_nss": "NSS", "mean_angle_left_max_deg": "max∠ left",
             "mean_angle_right_max_deg": "max∠ right", "mean_principal_overlap": "principal ov.",
             "mean_low_magnitude_overlap": "low-mag ov."}
    table = Table(title="by type", show_header=True)
    for column in ["type", "tensors", "params", "sparsity", *short.values()]:
        table.add_column(column, justify="left" if column == "type" else "right")
    for t, d in s["by_type"].items():
        table.add_row(t, str(d["n_tensors"]), f"{d['n_params']:,}", format_percent(d["sparsity"]),
                      *[format_value(d[key], key) for key in short])
    console.print(table)
    if s.get("by_expert"):
        moved = Table(title=f"experts that moved most (layer.expert; {len(s['by_expert'])} experts)", show_header=True)
        for column in ("rank", *s["experts_moved_most"]):
            moved.add_column(column, justify="right")
        ranked = list(s["experts_moved_most"].items())
        for i in range(max(len(r) for _, r in ranked)):
            moved.add_row(str(i + 1), *[f"{r[i]['layer']}.{r[i]['expert']}  {format_value(r[i][m], m)}"
                                        if i < len(r) else "" for m, r in ranked])
        console.print(moved)

    if show_matrices:
        mt = Table(title="matrices", show_header=True)
        for column in ["name", "shape", "sparsity", "max∠ L", "max∠ R", "NSS", "principal ov.", "low-mag ov.", "note"]:
            mt.add_column(column, justify="left" if column in ("name", "note") else "right",
                          no_wrap=column == "name")
        for r in result.matrices:
            mt.add_row(r["name"], r["shape"], format_percent(r["sparsity"]),
                       format_value(r["angle_left_max_deg"], "deg"), format_value(r["angle_right_max_deg"], "deg"),
                       format_value(r["nss"], "nss"), format_value(r["principal_overlap"], "overlap"),
                       format_value(r["low_magnitude_overlap"], "overlap"), r["note"] or "")
        console.print(mt)
    if s["non_finite"]:
        for item in s["non_finite"]:
            console.print(f"[yellow]warning[/yellow] {item['name']}: {item['note']} (its geometry metrics are NaN)",
                          soft_wrap=True)
