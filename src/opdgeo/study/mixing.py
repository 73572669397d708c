"""The mixing sweep of a study: which run stands at each α, and that they all match.

The sweep is A = α·A_OPD + (1 − α)·A_GRPO over α ∈ {1, 0.75, 0.5, 0.25, 0.05, 0.01, 0}
(SPEC §3). The mixtures are the runs with ``mix_alpha``; the ends are runs of their own
(group ``mixing`` without ``mix_alpha``: objective ``opd`` is α = 1, ``rlvr`` α = 0) or,
when there is none, the main OPD / RLVR run (`opdgeo.study.roles`). Every point must run the mixtures'
steps, batch and group size, so that the panel compares α alone.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["mixing_panel", "mixing_problems"]


def mixing_panel(runs: Sequence) -> list[tuple[float, str]]:
    """``(α, run name)`` of every point of the sweep, α descending; empty without mixtures.

    Args:
        runs: the preset's `StudyRun`s.
    """
    points = {r.mix_alpha: r.name for r in runs if r.mix_alpha is not None}
    if not points:
        return []
    for r in runs:
        if r.group == "mixing" and r.mix_alpha is None and r.objective in ("opd", "rlvr"):
            points.setdefault(1.0 if r.objective == "opd" else 0.0, r.name)
    import dataclasses

    from opdgeo.study.roles import study_roles

    roles = study_roles([dataclasses.asdict(r) for r in runs])
    for alpha, main in ((1.0, roles["opd"]), (0.0, roles["rlvr"])):
        if alpha not in points and main is not None:
            points[alpha] = main
    return sorted(points.items(), key=lambda p: -p[0])


def mixing_problems(runs: Sequence) -> list[str]:
    """One line per point of the sweep whose (steps, batch, group size) differ from the mixtures'."""
    by_name = {r.name: r for r in runs}
    panel = mixing_panel(runs)
    mixes = [by_name[n] for _, n in panel if by_name[n].mix_alpha is not None]
    if not mixes:
        return []
    ref = mixes[0]
    want = (ref.steps, ref.batch_size, ref.samples_per_prompt)
    out = []
    for alpha, name in panel:
        r = by_name[name]
        got = (r.steps, r.batch_size, r.samples_per_prompt)
        if got != want:
            out.append(f"mixing panel: the alpha={alpha:g} point {name!r} runs {got[0]} steps x batch {got[1]} x "
                       f"{got[2]} samples, the mixtures {want[0]} x {want[1]} x {want[2]}; add a run of group "
                       "'mixing' with the mixtures' numbers")
    return out
