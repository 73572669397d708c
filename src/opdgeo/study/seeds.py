"""Seeds of the study's runs.

Every run of ``tiny`` and ``smollm2`` runs with seeds 0, 1, 2 (``quick``: 0, 1 for SFT, OPD
and RLVR, its controls once, to stay a one-minute smoke test; ``paper``: 0, as in the paper). Seed 0 keeps the run's name; seed s > 0 is the run ``<name>_seed<s>``
(``StudyRun.seed_of`` = the name). Every seed starts from the same checkpoint (the base for
SFT, the seed-0 SFT anchor for the RL runs and ``sft_matched``, the seed-0 source run's
checkpoint for a projected run); the seed (the training core's ``run.seed``) varies the
prompt order, the rollout samples and the random token-keep draw, nothing else.
"""

from __future__ import annotations

from dataclasses import replace

__all__ = ["with_seeds"]


def with_seeds(runs, seeds: tuple[int, ...], only: tuple[str, ...] | None = None) -> tuple:
    """Every run once per seed: seed ``seeds[0]`` keeps the run's name, seed ``s`` is
    ``<name>_seed<s>`` with ``seed_of = <name>`` (same init: the same starting checkpoint).
    ``only``: the runs that get the other seeds (None: all); the rest run once."""
    base = list(runs)
    out = [replace(r, seed=seeds[0]) for r in base]
    for r in base:
        if only is not None and r.name not in only:
            continue
        out += [replace(r, name=f"{r.name}_seed{s}", seed=s, seed_of=r.name) for s in seeds[1:]]
    return tuple(out)
