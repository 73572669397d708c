"""Reading a study preset from its YAML file (the format is in ``docs/study.md``, "Presets").

A study file has the study-level sections (``name``, ``description``, ``task``, ``dedup``,
``demonstrations``, ``dtype``, ``device``, ``torch_threads``, ``expected_minutes``,
``step_seconds``, ``measured_on``, ``default_stages``, ``seeds``, ``seeded``,
``keep_trainer_state``, ``base``, ``teacher``, ``eval``, ``diagnose``), ``defaults`` and
``runs``. Every entry of ``runs`` is a partial training config (the sections of
``opdgeo train``'s YAML config) with one more section, ``study`` (``init``, ``group``,
``checkpoint_every``, ``warmup_fraction``, ``epochs``); it is deep-merged over
``defaults`` (a mapping merges key by key, anything else replaces), and the study fills in
what only it knows (`_STUDY_SET`: the models, the task, the run folder and seed, the
checkpoint cadence, warm-up steps and projection start). The result is validated once, by
`opdgeo.training.config.config_from_dict`, and the `StudyRun` view is read from the
validated config. Every problem is one line naming the file and the key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from opdgeo.errors import ConfigError
from opdgeo.study.presets import PRESETS, DiagnoseSpec, EvalSpec, ModelSpec, OptimSpec, StudyPreset, StudyRun

__all__ = ["preset_path", "load_preset", "shipped_presets_dir", "PLACEHOLDERS", "STUDY_RUN_KEYS"]

_TOP = ("name", "description", "task", "dedup", "demonstrations", "dtype", "device", "torch_threads",
        "expected_minutes", "step_seconds", "measured_on", "default_stages", "seeds", "seeded", "keep_trainer_state",
        "base", "teacher", "eval", "diagnose", "defaults", "runs")
STUDY_RUN_KEYS = {"init": "anchor", "group": "main", "checkpoint_every": 0.2, "warmup_fraction": 0.0, "epochs": None}
"""The keys of a run's ``study`` section, with their defaults."""
_STUDY_RUN_TYPES = {"init": str, "group": str, "checkpoint_every": int | float, "warmup_fraction": int | float,
                    "epochs": int | float | None}  # numbers keep the type written (a cache key hashes them)

_STUDY_SET = {
    "model": "the study's models and the run's study.init",
    "task": "the preset's task, dedup and demonstrations",
    "run.out_dir": "the study's run folder", "run.seed": "the preset's seeds",
    "run.progress": "the study (progress is not part of a stage's cache key)",
    "project.from": "study.init", "project.origin": "study.init",
    "checkpoint.every": "study.checkpoint_every (a fraction of the steps)",
    "checkpoint.dtype": "the preset's dtype",
    "checkpoint.keep_trainer_state": "the preset's keep_trainer_state",
    "checkpoint.keep_trainer_state_steps": "the projected runs' study.init",
    "optim.warmup_steps": "study.warmup_fraction (a fraction of the steps)",
}
# Training keys the StudyRun view carries in its own fields; any other key a run sets is
# kept in StudyRun.extra (written to the training config, part of the cache key).
_VIEWED = {"objective.name", "objective.advantage", "optim.steps", "optim.batch_size", "optim.micro_batch_size",
           "optim.lr", "optim.schedule", "optim.min_lr", "optim.betas", "optim.weight_decay", "optim.grad_clip",
           "rollout.group_size", "rollout.temperature", "rollout.max_new_tokens", "rollout.policy",
           "token_keep.mode", "token_keep.fraction", "project.rank", "project.mode"}

PLACEHOLDERS = {"student": "tiny:student", "teacher": "tiny:teacher", "from": "runs/source/step-000001",
                "origin": "tiny:student", "out_dir": "runs/run"}
"""Stand-ins for the paths only a running study knows, used to validate a run's config."""


def shipped_presets_dir():
    """The packaged folder of the shipped presets (``opdgeo/recipes/study``; ``recipes/study``
    in a source checkout links to it)."""
    return resources.files("opdgeo") / "recipes" / "study"


def preset_path(name: str):
    """The file of preset ``name``: a shipped preset's name, or a path to a study file.

    Raises:
        ConfigError: neither a shipped preset nor a ``.yaml``/``.yml`` path.
    """
    if name in PRESETS:
        return shipped_presets_dir() / f"{name}.yaml"
    if name.endswith((".yaml", ".yml")) or "/" in name:
        path = Path(name).expanduser()
        if not path.is_file():
            raise ConfigError(f"--preset {name}: no such study file")
        return path
    raise ConfigError(f"--preset must be one of {', '.join(PRESETS)} or a study file (.yaml); got {name!r}")


def _read(path) -> tuple[Mapping, str]:
    from opdgeo.training.config_file import read_config_file

    if isinstance(path, Path):
        return read_config_file(path), str(path)
    with resources.as_file(path) as real:  # a packaged file (a real file in both installs)
        return read_config_file(Path(real)), str(real)


def load_preset(path) -> StudyPreset:
    """The `StudyPreset` of a study file; every run validated by the training config.

    Raises:
        ConfigError: one line naming the file and the key of every problem.
    """
    data, where = _read(path)
    unknown = [k for k in data if k not in _TOP]
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown key (known: {', '.join(_TOP)})")
    try:
        _check_types({k: v for k, v in data.items() if k in _TOP_TYPES}, _TOP_TYPES, "")
        return _build(data, where)
    except ConfigError as err:
        msg = str(err)
        raise ConfigError(msg if msg.startswith(where) else f"{where}: {msg}") from None


_TOP_TYPES = {"name": str, "description": str, "task": str, "dedup": bool, "demonstrations": str | None, "dtype": str,
              "device": str, "torch_threads": int | None, "expected_minutes": dict, "seeds": tuple[int, ...],
              "seeded": tuple[str, ...] | None, "keep_trainer_state": str}
"""The type of each scalar top-level key (the sections are checked by their dataclasses)."""


def _check_types(values: Mapping, types: Mapping, prefix: str) -> None:
    """The first value of ``values`` whose type is not ``types[key]``, as a `ConfigError`
    (the training config's own checks and messages)."""
    from opdgeo.training.config import _coerce

    errors: list[str] = []
    for k, v in values.items():
        _coerce(v, types[k], f"{prefix}{k}", errors)
        if errors:
            raise ConfigError(errors[0])


def _section(cls, raw, key: str, **fixed):
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{key}: expected a mapping; got {raw!r}")
    known = {f.name for f in dataclasses.fields(cls)} - set(fixed)
    bad = [k for k in raw if k not in known]
    if bad:
        raise ConfigError(f"{key}.{bad[0]}: unknown key (known: {', '.join(sorted(known))})")
    import typing

    from opdgeo.training.config import _coerce  # the training config's own type checks and messages

    hints, errors, values = typing.get_type_hints(cls), [], {}
    for k, v in raw.items():
        value = _coerce(v, hints[k], f"{key}.{k}", errors)
        values[k] = dict(value) if isinstance(value, Mapping) else value
    if errors:
        raise ConfigError(errors[0])
    try:
        return cls(**{**values, **fixed})
    except TypeError as err:
        raise ConfigError(f"{key}: {err}") from None


def _build(data: Mapping, where: str) -> StudyPreset:
    name = data.get("name") or Path(where).stem
    required = [k for k in ("task", "base", "teacher", "runs") if k not in data]
    if required:
        raise ConfigError(f"{required[0]}: required")
    study = dict(task=data["task"], dedup=data.get("dedup", True), demonstrations=data.get("demonstrations"),
                 dtype=data.get("dtype", "bfloat16"))
    runs = data["runs"]
    if not isinstance(runs, Mapping) or not runs:
        raise ConfigError("runs: expected a mapping of run name to its training config")
    defaults = data.get("defaults") or {}
    if not isinstance(defaults, Mapping):
        raise ConfigError(f"defaults: expected a mapping; got {defaults!r}")
    views = [_run(str(n), _merge(defaults, r if isinstance(r, Mapping) else {"": r}), study) for n, r in runs.items()]
    from opdgeo.study.seeds import with_seeds

    seeds = tuple(data.get("seeds") or (0,))
    seeded = data.get("seeded")
    if seeded is not None:
        missing = [s for s in seeded if s not in runs]
        if missing:
            raise ConfigError(f"seeded: {missing[0]!r} is not a run")
    return StudyPreset(
        name=name, description=data.get("description", ""), task=study["task"],
        base=_section(ModelSpec, data.get("base"), "base", name="base"),
        teacher=_section(ModelSpec, data.get("teacher"), "teacher", name="teacher"),
        runs=with_seeds(views, seeds, None if seeded is None else tuple(seeded)),
        eval=_section(EvalSpec, data.get("eval"), "eval"), diagnose=_section(DiagnoseSpec, data.get("diagnose"), "diagnose"),
        dtype=study["dtype"], device=data.get("device", "cpu"), expected_minutes=dict(data.get("expected_minutes") or {}),
        torch_threads=data.get("torch_threads"), dedup=study["dedup"], demonstrations=study["demonstrations"],
        seeds=seeds, keep_trainer_state=data.get("keep_trainer_state", "last"), path=where, step_seconds={str(k): float(v) for k, v in (data.get("step_seconds") or {}).items()},
        measured_on=str(data.get("measured_on") or ""), default_stages=tuple(data.get("default_stages") or ()))


def _merge(base: Mapping, over: Mapping) -> dict:
    """``over`` deep-merged over ``base`` (``objective: opd`` counts as ``{name: opd}``)."""
    def plain(k, v):
        v = {"name": v} if k == "objective" and isinstance(v, str) else v
        return dict(v) if isinstance(v, Mapping) else v

    out = {k: plain(k, v) for k, v in base.items()}
    for k, v in over.items():
        v, old = plain(k, v), out.get(k)
        out[k] = _merge(old, v) if isinstance(old, Mapping) and isinstance(v, Mapping) else v
    return out


def _flat(cfg: Mapping) -> dict[str, Any]:
    out = {}
    for section, values in cfg.items():
        if isinstance(values, Mapping) and values:
            out.update({f"{section}.{k}": v for k, v in values.items()})
        else:
            out[section] = values
    return out


def _run(name: str, merged: dict, study: dict) -> StudyRun:
    """One run's view, after the training config validated its merged config."""
    key = f"runs.{name}"
    if "" in merged:
        raise ConfigError(f"{key}: expected a mapping of training-config sections; got {merged['']!r}")
    place = merged.pop("study", None) or {}
    if not isinstance(place, Mapping):
        raise ConfigError(f"{key}.study: expected a mapping; got {place!r}")
    bad = [k for k in place if k not in STUDY_RUN_KEYS]
    if bad:
        raise ConfigError(f"{key}.study.{bad[0]}: unknown key (known: {', '.join(STUDY_RUN_KEYS)})")
    _check_types(place, _STUDY_RUN_TYPES, f"{key}.study.")
    place = {**STUDY_RUN_KEYS, **place}
    flat = _flat(merged)
    for k, why in _STUDY_SET.items():
        hit = [f for f in flat if f == k or f.startswith(k + ".")]
        if hit:
            raise ConfigError(f"{key}.{hit[0]}: set by the study from {why}; leave it out")
    cfg = _training_dict(merged, place, study, name)
    from opdgeo.training.config import config_from_dict

    try:
        train = config_from_dict(cfg, check_paths=False)
    except ConfigError as err:
        raise ConfigError(f"{key}: {err}") from None
    extra = tuple(sorted((k, v) for k, v in flat.items() if k not in _VIEWED))
    return _view(name, train, place, extra, projected="project" in merged)


def _training_dict(merged: dict, place: dict, study: dict, name: str) -> dict:
    """The run's training config with the study's own values (placeholder paths) filled in."""
    from opdgeo.study.data import task_fields

    cfg = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in merged.items()}
    obj = cfg.setdefault("objective", {})
    optim = cfg.setdefault("optim", {})
    rollout = cfg.setdefault("rollout", {})
    if obj.get("name") == "sft":
        rollout["group_size"] = 1  # SFT trains on one demonstration per prompt
    optim.setdefault("micro_batch_size", optim.get("batch_size"))
    steps = optim.get("steps")
    if isinstance(steps, int) and isinstance(place["warmup_fraction"], (int, float)):
        optim["warmup_steps"] = int(round(place["warmup_fraction"] * steps))
    if isinstance(steps, int) and isinstance(place["checkpoint_every"], (int, float)):
        f = place["checkpoint_every"]
        cfg["checkpoint"] = {**cfg.get("checkpoint", {}), "every": 0 if f >= 1 else max(1, round(f * steps)),
                             "dtype": study["dtype"]}
    needs_teacher = obj.get("name") == "opd" or obj.get("advantage") is not None
    cfg["model"] = {"student": PLACEHOLDERS["student"], "teacher": PLACEHOLDERS["teacher"] if needs_teacher else None}
    cfg["task"] = task_fields(study["task"], study["dedup"], study["demonstrations"],
                              demonstrations_apply=obj.get("name") == "sft")
    if "project" in cfg:
        cfg["project"] = {**cfg["project"], "from": PLACEHOLDERS["from"], "origin": PLACEHOLDERS["origin"]}
    cfg["run"] = {**cfg.get("run", {}), "out_dir": PLACEHOLDERS["out_dir"], "seed": 0, "progress": True}
    return cfg


def _view(name: str, t, place: dict, extra: tuple, *, projected: bool) -> StudyRun:
    o, r, obj = t.optim, t.rollout, t.objective
    mix = None
    if obj.advantage is not None:
        w = dict(obj.advantage)
        alpha = w.get("opd", 0.0)
        if set(w) - {"opd", "rlvr"} or abs(alpha + w.get("rlvr", 0.0) - 1.0) > 1e-9:
            raise ConfigError(f"runs.{name}.objective.advantage: the study mixes A = alpha*A_opd + (1 - alpha)*A_rlvr; "
                              f"the weights must be {{opd: alpha, rlvr: 1 - alpha}}; got {w}")
        mix = alpha
    optim = OptimSpec(lr=o.lr, schedule=o.schedule, min_lr=o.min_lr, warmup_fraction=place["warmup_fraction"],
                      weight_decay=o.weight_decay, betas=tuple(o.betas), grad_clip=o.grad_clip or 0.0)
    return StudyRun(
        name=name, objective=obj.name, init=place["init"], steps=o.steps, batch_size=o.batch_size, optim=optim,
        samples_per_prompt=r.group_size, micro_batch_size=None if o.micro_batch_size == o.batch_size else o.micro_batch_size,
        checkpoint_every=place["checkpoint_every"], temperature=r.temperature, max_new_tokens=r.max_new_tokens,
        token_keep=None if t.token_keep.mode == "none" else (t.token_keep.mode, t.token_keep.fraction),
        rollout_policy=r.policy, mix_alpha=mix, project_rank=t.project.rank if projected else None,
        group=place["group"], epochs=place["epochs"], project_mode=t.project.mode if projected else "project",
        extra=extra)
