"""``opdgeo compare BASE TUNED``: pairwise diagnostics (SPEC §1). Parse, call, print.

Under ``torchrun --nproc-per-node N -m opdgeo compare ...`` every rank takes a share of
the tensors and rank 0 prints and writes the report.
"""

from __future__ import annotations

import click

from opdgeo.analysis.compare import METRICS


@click.command("compare", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("base")
@click.argument("tuned")
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Write matrices.csv, summary.json and summary.md into this folder.")
@click.option("--metrics", default=",".join(METRICS), show_default=True,
              help="Comma-separated subset of: sparsity, angles, nss, overlap (sparsity is always computed).")
@click.option("--k", "k", type=int, default=512, show_default=True,
              help="Principal-angle subspace size (capped at min(m, n) per matrix).")
@click.option("--rank", "rank", type=int, default=64, show_default=True,
              help="Rank of the W0 reconstruction behind the principal mask.")
@click.option("--alpha", type=float, default=0.3, show_default=True,
              help="Fraction of entries in the principal and low-magnitude masks.")
@click.option("--eta", type=float, default=1e-3, show_default=True,
              help="Relative tolerance of the bf16 unchanged rule.")
@click.option("--legacy-atol", type=float, default=None,
              help="Also report legacy sparsity |Δ| <= ATOL (e.g. 1e-5; off by default).")
@click.option("--precision", type=click.Choice(["fp64", "fp32"]), default="fp64", show_default=True,
              help="Precision of the SVDs.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--workers", type=int, default=1, show_default=True, help="Tensors processed in parallel (threads).")
@click.option("--cache", type=click.Path(file_okay=False), default=None,
              help="Folder caching the base's SVDs (reused by later comparisons against the same base).")
@click.option("--ignore-missing", is_flag=True, help="Skip tensors present in only one checkpoint.")
@click.option("--allow-pickle", is_flag=True, help="Allow pytorch_model*.bin (loaded with weights_only=True).")
@click.option("--show-matrices", is_flag=True, help="Also print the per-matrix table.")
@click.option("--save-angles", is_flag=True, help="With --out, also write every angle vector to angles.safetensors.")
def compare_cmd(base, tuned, out, metrics, k, rank, alpha, eta, legacy_atol, precision, device, workers, cache,
                ignore_missing, allow_pickle, show_matrices, save_angles):
    """Diagnose the update from BASE to TUNED (HF folders, .safetensors files or local-cache ids)."""
    from pathlib import Path

    from opdgeo.analysis.compare import compare
    from opdgeo.analysis.parallel import dist_context
    from opdgeo.errors import ConfigError

    if save_angles and out is None:
        raise ConfigError("--save-angles needs --out DIR")
    if out is not None and Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out {out}: exists and is not a folder")  # checked before any work

    with dist_context(device=device) as (rank_id, world):
        result = compare(
            base,
            tuned,
            metrics=metrics,
            k=k,
            rank=rank,
            alpha=alpha,
            eta=eta,
            legacy_atol=legacy_atol,
            precision=precision,
            device=device,
            workers=workers,
            cache=cache,
            ignore_missing=ignore_missing,
            allow_pickle=allow_pickle,
            progress=True,
            keep_angles=save_angles,
        )
        if rank_id == 0:
            if out is not None:
                paths = result.write(out)
                click.echo(f"wrote {', '.join(str(p) for p in paths)}", err=True)
            print_result(result, show_matrices=show_matrices)


def print_result(result, *, show_matrices: bool = False) -> None:
    """The readable summary: headline numbers, the per-type table, optionally every matrix."""
    from rich.console import Console
    from rich.table import Table

    from opdgeo.analysis.compare import SUMMARY_MEAN_KEYS, format_value, format_percent

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
