"""The study's stages: a preset becomes an ordered list of cached `Stage`s.

Each stage composes the public APIs of the other packages and writes files with their
documented schemas into the run folder::

    <out>/study.json                      the plan (preset as data; read by the report)
    <out>/models/base/                    base student (HF folder, bf16, + tokenizer)
    <out>/models/teacher/                 teacher: pretrained here, then SFT by the core in
                                          models/teacher/sft/ (its last step is the teacher)
    <out>/runs/<run>/                     training-core run folders (config.yaml,
                                          metrics.jsonl, step-NNNNNN/)
    <out>/eval/<name>/eval.json           held-out avg@k of one checkpoint
    <out>/diagnose/compare/<run>/         `opdgeo compare` outputs (origin -> run final)
    <out>/diagnose/trajectory/<group>/    `opdgeo trajectory` outputs
    <out>/tables/, figures/, report.html, report.md, claims.json, timings.json

Stage order: base, teacher, eval_base, eval_teacher, then per run ``<run>`` (train),
``eval_<run>``, ``compare_<run>``; ``trajectory_main`` (SFT, OPD, RLVR, with the OPD/RLVR
cross-run overlap), ``trajectory_<run>`` for the other runs (another seed of OPD or RLVR together
with its seed-0 run and their overlap, the noise floor of the OPD/RLVR overlap); ``report`` last.

Soft stages (every evaluation and diagnostic, and the control runs) do not stop the
study when they fail: they are recorded as failed with their error and the report lists
them as not measured. The base, teacher, SFT, OPD and RLVR runs and the report are hard.

Training runs go through `opdgeo.training.loop.train` in this process, or, with
``launcher`` set (GPUs: ``"accelerate launch --num_processes 8"``), through
``<launcher> -m opdgeo train <config.yaml> [--resume]`` in a subprocess.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import subprocess
from pathlib import Path

from opdgeo.errors import ConfigError
from opdgeo.study.data import TEACHER_SFT, task_section
from opdgeo.study.presets import ANCHOR_RUN, ModelSpec, StudyPreset, StudyRun
from opdgeo.study.stages import Stage, StageContext, StageUnavailable

__all__ = ["build_stages", "study_info", "train_config_dict", "teacher_sft_run", "teacher_sft_config", "run_checkpoints",
           "STUDY_VERSION"]

STUDY_VERSION = 1


# --------------------------------------------------------------------------- helpers


def _asdict(obj):
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def study_info(preset: StudyPreset) -> dict:
    """``study.json``: the preset as plain data (runs with group and control settings, and
    which run plays which part: ``roles``, `opdgeo.study.roles`)."""
    return {
        "preset": preset.name,
        "description": preset.description,
        "task": preset.task,
        "dtype": preset.dtype,
        "runs": [
            {
                "name": r.name, "objective": r.objective, "init": r.init, "group": r.group, "steps": r.steps,
                "batch_size": r.batch_size, "samples_per_prompt": r.samples_per_prompt, "lr": r.optim.lr,
                "token_keep": list(r.token_keep) if r.token_keep else None, "rollout_policy": r.rollout_policy,
                "mix_alpha": r.mix_alpha, "project_rank": r.project_rank, "checkpoint_steps": r.checkpoint_steps(),
                "seed": r.seed, "seed_of": r.seed_of, "project_mode": r.project_mode if r.project_rank else None,
            }
            for r in preset.runs
        ],
        "roles": preset.roles(),
        "mixing_panel": [{"alpha": a, "run": name} for a, name in preset.mixing_panel()],
        "dedup": preset.dedup,
        "demonstrations": preset.demonstrations,
        "eval": _asdict(preset.eval),
        "diagnose": _asdict(preset.diagnose),
    }


def run_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the complete ``step-NNNNNN`` checkpoints of a run, by step."""
    from opdgeo.training.checkpointing import list_checkpoints

    return list_checkpoints(run_dir)


def _final_checkpoint(run_dir: Path) -> Path:
    cks = run_checkpoints(run_dir)
    if not cks:
        raise ConfigError(f"{run_dir}: run has no checkpoint")
    return cks[-1][1]


def _checkpoint_near(run_dir: Path, fraction: float, total_steps: int) -> Path:
    """The checkpoint of the run whose step is nearest to ``fraction`` of ``total_steps``."""
    from opdgeo.study.presets import nearest_step

    cks = dict(run_checkpoints(run_dir))
    if not cks:
        raise ConfigError(f"{run_dir}: run has no checkpoint")
    return cks[nearest_step(cks, fraction * total_steps)]


def train_config_dict(run: StudyRun, preset: StudyPreset, *, student: str, teacher: str, out_dir: Path,
                      project_from: str | None = None, project_origin: str | None = None) -> dict:
    """The training-core config (``opdgeo train`` YAML schema) of one study run."""
    o = run.optim
    every = run.every()
    objective: dict = {"name": run.objective}
    if run.mix_alpha is not None:
        objective["advantage"] = {"opd": run.mix_alpha, "rlvr": round(1.0 - run.mix_alpha, 12)}
    needs_teacher = run.objective == "opd" or run.mix_alpha is not None
    cfg = {
        "model": {"student": student, "teacher": teacher if needs_teacher else None, "init_seed": run.seed},
        "task": task_section(preset, run),
        "rollout": {"group_size": run.samples_per_prompt if run.objective != "sft" else 1,
                    "temperature": run.temperature, "max_new_tokens": run.max_new_tokens},
        "optim": {
            "steps": run.steps, "batch_size": run.batch_size,
            "micro_batch_size": run.micro_batch_size or run.batch_size,
            "lr": o.lr, "schedule": o.schedule, "min_lr": o.min_lr,
            "warmup_steps": int(round(o.warmup_fraction * run.steps)),
            "betas": list(o.betas), "weight_decay": o.weight_decay, "grad_clip": o.grad_clip or None,
        },
        "objective": objective,
        "checkpoint": {"every": every, "dtype": preset.dtype, "keep_trainer_state": preset.keep_trainer_state,
                       "keep_trainer_state_steps": list(preset.restart_steps(run))},
        # progress on: a live bar in a terminal, a plain line every <= 30 s in a log; how it
        # is shown is not part of the stage's cache key (the key is the StudyRun view)
        "run": {"out_dir": str(out_dir), "seed": run.seed, "progress": True},
    }
    if run.rollout_policy != "student":
        cfg["rollout"]["policy"] = run.rollout_policy  # the core's off-policy clip default (1.0) applies
    if run.token_keep is not None:
        cfg["token_keep"] = {"mode": run.token_keep[0], "fraction": run.token_keep[1]}
    if run.project_rank is not None:
        cfg["project"] = {"from": project_from, "rank": run.project_rank, "origin": project_origin,
                          "mode": run.project_mode}
    for key, value in run.extra:  # the run's other training keys (objective.eps_high, ...)
        section, _, name = key.partition(".")
        if name:
            cfg.setdefault(section, {})[name] = value
        else:
            cfg[section] = value
    return cfg


def teacher_sft_run(preset: StudyPreset) -> StudyRun:
    """The teacher's own SFT (``teacher.sft_steps`` at ``teacher.sft_lr``, constant, no weight
    decay; the SFT run's other optimizer settings; the final checkpoint only)."""
    spec = preset.teacher
    optim = dataclasses.replace(preset.run(ANCHOR_RUN).optim, lr=spec.sft_lr, schedule="constant", warmup_fraction=0.0,
                                weight_decay=0.0)
    return StudyRun(name=TEACHER_SFT, objective="sft", init="base", steps=spec.sft_steps, batch_size=spec.sft_batch,
                    optim=optim, checkpoint_every=1.0, seed=spec.seed)


def teacher_sft_config(preset: StudyPreset, *, student: str, out_dir: Path) -> dict:
    """The training config of the teacher's SFT (`teacher_sft_run`) from ``student``."""
    return train_config_dict(teacher_sft_run(preset), preset, student=student, teacher="", out_dir=out_dir)


def _uses_controls(run: StudyRun) -> bool:
    return bool(run.token_keep or run.rollout_policy != "student" or run.project_rank is not None)


def _run_training(cfg_dict: dict, run_dir: Path, *, resume: bool, launcher: str | None, log) -> None:
    """Train through the core: in process, or ``<launcher> -m opdgeo train`` for GPUs."""
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "study-config.yaml"  # what the study asked for (the core writes config.yaml)
    cfg_path.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
    if launcher:
        cmd = shlex.split(launcher) + ["-m", "opdgeo", "train", str(cfg_path)] + (["--resume"] if resume else [])
        log("    $ " + " ".join(shlex.quote(c) for c in cmd))
        proc = subprocess.run(cmd)
        if proc.returncode != 0:
            raise ConfigError(f"{run_dir}: training subprocess failed with exit code {proc.returncode}")
        return
    from opdgeo.training.config import config_from_dict
    from opdgeo.training.loop import train

    config = config_from_dict(cfg_dict)
    train(config, resume=resume)


# --------------------------------------------------------------------------- model stages


def _save_hf(model, tokenizer, folder: Path, dtype: str) -> None:
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()

    folder.mkdir(parents=True, exist_ok=True)
    model.to(getattr(torch, dtype)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _build_pretrained(spec: ModelSpec, preset: StudyPreset, folder: Path, log) -> dict:
    """Build (``tiny:``), export (``smollm2``) or resolve a model; pretrain it if asked."""
    import torch

    from opdgeo.models import model_and_tokenizer
    from opdgeo.models.factory import num_parameters
    from opdgeo.sources import ModelSource

    if ModelSource.parse(spec.source).kind in ("tiny", "smollm2"):
        model, tok = model_and_tokenizer(spec.source, seed=spec.seed, dtype=torch.float32)
    else:
        if spec.pretrain_steps:
            raise ConfigError(f"{spec.name}: pretraining is only for 'tiny:' models; got source {spec.source!r}")
        return {"path": spec.source, "params": None, "pretrain": None}
    stats = None
    if spec.pretrain_steps:
        from opdgeo.study.pretrain import pretrain
        from opdgeo.tasks import ArithmeticTask, arithmetic_pretrain_corpus, load_task

        task = load_task(preset.task)
        if not isinstance(task, ArithmeticTask):
            raise ConfigError(f"{spec.name}: pretraining uses the arithmetic corpus; task {preset.task!r} is not arithmetic")
        docs = arithmetic_pretrain_corpus(spec.corpus_size, spec.seed, difficulty=task.difficulty, ops=task.ops)
        stats = pretrain(model, tok, docs, steps=spec.pretrain_steps, lr=spec.pretrain_lr, batch_size=spec.pretrain_batch,
                         seed=spec.seed, log=log)
        log(f"    pretrained {spec.name}: loss {stats.first_loss:.3f} -> {stats.last_loss:.3f} in {stats.seconds:.1f} s")
    n = num_parameters(model)
    _save_hf(model, tok, folder, preset.dtype)
    return {"path": str(folder), "params": n, "pretrain": dataclasses.asdict(stats) if stats else None}


def _base_fn(preset: StudyPreset):
    def fn(ctx: StageContext) -> dict:
        return _build_pretrained(preset.base, preset, ctx.dir / "model", ctx.log)

    return fn


def _teacher_fn(preset: StudyPreset, launcher: str | None):
    spec = preset.teacher

    def fn(ctx: StageContext) -> dict:
        pre = ctx.dir / "pretrained"
        if not (ctx.resume and (pre / "config.json").is_file()):
            info = _build_pretrained(spec, preset, pre, ctx.log)
        else:
            info = {"path": str(pre)}
        if not spec.sft_steps:
            return info
        run_dir = ctx.dir / "sft"
        cfg = teacher_sft_config(preset, student=info["path"], out_dir=run_dir)
        _run_training(cfg, run_dir, resume=ctx.resume, launcher=launcher, log=ctx.log)
        return {**info, "path": str(_final_checkpoint(run_dir))}

    return fn


# --------------------------------------------------------------------------- run stages


def _run_fn(run: StudyRun, preset: StudyPreset, launcher: str | None):
    def fn(ctx: StageContext) -> dict:
        out = ctx.out
        base = ctx.deps["base"]["path"]
        teacher = ctx.deps["teacher"]["path"]
        anchor = ctx.deps[ANCHOR_RUN]["final"] if ANCHOR_RUN in ctx.deps else None
        project_from = project_origin = None
        if run.init == "base":
            student = base
        elif run.init == "anchor":
            student = anchor
        else:  # projected restart of run `src` from its checkpoint nearest to `frac`
            src, _, frac = run.init.partition("@")
            src_run = preset.run(src)
            student = base if src_run.init == "base" else anchor
            project_from = str(_checkpoint_near(out / "runs" / src, float(frac), src_run.steps))
            project_origin = student
        cfg = train_config_dict(run, preset, student=student, teacher=teacher, out_dir=ctx.dir,
                                project_from=project_from, project_origin=project_origin)
        try:
            _run_training(cfg, ctx.dir, resume=ctx.resume, launcher=launcher, log=ctx.log)
        except ConfigError as err:
            if _uses_controls(run):
                # A control the training core does not (yet) offer: report, do not fail the study.
                raise StageUnavailable(str(err).replace("\n", " ")) from None
            raise
        cks = run_checkpoints(ctx.dir)
        return {"final": str(cks[-1][1]), "checkpoints": [str(p) for _, p in cks], "steps": [s for s, _ in cks],
                "init": project_from or student, "origin": student}

    return fn


# --------------------------------------------------------------------------- evaluation


def _eval_fn(preset: StudyPreset, name: str, role: str, dep: str, key: str):
    def fn(ctx: StageContext) -> dict:
        try:
            from opdgeo.training.evaluate import evaluate
        except ImportError as err:
            raise StageUnavailable(f"opdgeo.training.evaluate is not available ({err})") from None
        import torch

        from opdgeo.models import load_model, load_tokenizer
        from opdgeo.tasks import load_task

        path = ctx.deps[dep][key]
        e = preset.eval
        on_gpu = preset.device == "cuda" and torch.cuda.is_available()
        model = load_model(path, dtype=torch.bfloat16 if on_gpu else torch.float32)
        if on_gpu:
            model = model.to("cuda")
        tok = load_tokenizer(path)
        if e.suite is not None:
            return _suite_eval(model, tok, preset, ctx, name=name, role=role, path=path)
        task = load_task(preset.task)
        k = 1 if e.temperature == 0 else e.k
        res = evaluate(model, tok, task, split=e.split, n=e.n_problems, k=k, temperature=e.temperature,
                       max_new_tokens=e.max_new_tokens, seed=0, out=ctx.dir / "samples.jsonl")
        acc = float(res.avg_at_k)
        n_samples = res.n * res.k
        rec = {"name": name, "role": role, "checkpoint": str(path), "accuracy": acc, "n_problems": res.n,
               "k": res.k, "temperature": res.temperature, "n_samples": n_samples,
               "stderr": _problem_stderr([r["accuracy"] for r in res.records]),
               "mean_response_tokens": res.mean_response_tokens, "truncated_fraction": res.truncated_fraction}
        (ctx.dir / "eval.json").write_text(json.dumps(rec, indent=2) + "\n")
        ctx.log(f"    {name}: accuracy {acc:.4f} (avg@{k}, {e.n_problems} problems)")
        return {"accuracy": acc}

    return fn


def _suite_eval(model, tok, preset: StudyPreset, ctx: StageContext, *, name: str, role: str, path) -> dict:
    """Evaluate on the preset's suite (``evaluate_suite``); write ``<task>.jsonl``,
    ``summary.json`` and ``eval.json`` (``accuracy`` = the headline). The refusal of
    training rows ran once, before any stage (``run_study``: ``check_study_eval``)."""
    from opdgeo.study.data import eval_suite
    from opdgeo.training.evaluate import evaluate_suite

    res = evaluate_suite(model, tok, eval_suite(preset), seed=0, out_dir=ctx.dir)
    head = res.results[res.headline]
    rec = {"name": name, "role": role, "checkpoint": str(path), "accuracy": float(res.headline_value),
           "n_problems": head.n, "k": head.k, "temperature": head.temperature, "n_samples": head.n * head.k,
           "stderr": _problem_stderr([r["accuracy"] for r in head.records]),
           "mean_response_tokens": head.mean_response_tokens, "truncated_fraction": head.truncated_fraction,
           "headline": res.headline, "suite": res.summary()}
    from opdgeo.files import atomic_write_text

    atomic_write_text(ctx.dir / "eval.json", json.dumps(rec, indent=2) + "\n")
    ctx.log(f"    {name}: {res.headline} avg@{head.k} {res.headline_value:.4f}; " + ", ".join(
        f"{t} {r.avg_at_k:.4f}" for t, r in res.results.items() if t != res.headline))
    return {"accuracy": float(res.headline_value)}


def _problem_stderr(per_problem: list[float]) -> float | None:
    """Standard error of avg@k over problems: sample std of the per-problem accuracies / sqrt(n).

    The k samples of one problem are correlated, so the problem (not the sample) is the
    unit **(our choice)**; None for fewer than 2 problems.
    """
    n = len(per_problem)
    if n < 2:
        return None
    mean = sum(per_problem) / n
    var = sum((x - mean) ** 2 for x in per_problem) / (n - 1)
    return math.sqrt(var / n)


# --------------------------------------------------------------------------- diagnostics


def _compare_fn(preset: StudyPreset, run: str):
    d = preset.diagnose

    def fn(ctx: StageContext) -> dict:
        from opdgeo.analysis.compare import compare

        origin, final = ctx.deps[run]["origin"], ctx.deps[run]["final"]
        res = compare(origin, final, k=d.k, rank=d.rank, alpha=d.alpha, eta=d.eta,
                      cache=str(ctx.out / ".study" / "svd_cache"), progress=False)
        res.write(ctx.dir)
        s = res.summary
        ctx.log(f"    {run}: sparsity {100 * s['global_sparsity']:.2f} %, density "
                f"{_pct(s.get('mean_density'))}, NSS {s.get('mean_nss')}")
        return {"global_sparsity": s["global_sparsity"]}

    return fn


def _pct(x):
    return "n/a" if x is None else f"{100 * x:.2f} %"


def _trajectory_fn(preset: StudyPreset, runs: list[str], overlap: list[tuple[str, str]]):
    d = preset.diagnose

    def fn(ctx: StageContext) -> dict:
        try:
            from opdgeo.analysis.trajectory import trajectory
        except ImportError as err:
            raise StageUnavailable(f"opdgeo.analysis.trajectory is not available ({err})") from None
        run_paths = {r: [Path(p) for p in ctx.deps[r]["checkpoints"]] for r in runs}
        origins = {r: ctx.deps[r]["origin"] for r in runs}
        res = trajectory(run_paths, origins, matrices=d.trajectory_matrices, k_hill=d.hill_k, sim_k=d.sim_k,
                         lock_threshold=d.lock_threshold, eta=d.eta, overlap=list(overlap), progress=False)
        res.write(ctx.dir, figures=len(runs) > 1)
        for r in runs:
            ctx.log(f"    {r}: locking step {res.summary['runs'][r].get('locking_step')}")
        return {"runs": runs}

    return fn


def _report_fn(preset: StudyPreset):
    def fn(ctx: StageContext) -> dict:
        from opdgeo.report.study_report import write_report

        timings = None
        try:
            timings = json.loads((ctx.out / "timings.json").read_text())
        except (OSError, ValueError):
            pass
        paths = write_report(ctx.out, timings=timings)
        return {k: v for k, v in paths.items() if k != "tables"}

    return fn


# --------------------------------------------------------------------------- the plan


def build_stages(preset: StudyPreset, *, launcher: str | None = None) -> list[Stage]:
    """Every stage of the study for ``preset``, dependencies first.

    ``launcher`` (e.g. ``"accelerate launch --num_processes 8"``) runs training stages as
    subprocesses of the public CLI; it does not change what is computed, so it is not
    part of the cache keys. Every stage is tagged for ``--stages`` (`run_tags`).
    """
    v = {"study_version": STUDY_VERSION, "task": preset.task, "dtype": preset.dtype, "dedup": preset.dedup,
         "demonstrations": preset.demonstrations}
    stages: list[Stage] = [
        Stage("base", "model", "models/base", {**v, "spec": _asdict(preset.base)}, _base_fn(preset)),
        Stage("teacher", "model", "models/teacher",
              {**v, "spec": _asdict(preset.teacher), "sft_optim": _asdict(preset.run(ANCHOR_RUN).optim)},
              _teacher_fn(preset, launcher), resumable=True),
    ]
    ev = _asdict(preset.eval)
    if preset.eval.suite is not None:  # the suite's tasks, not only its name, determine the outputs
        from opdgeo.study.data import eval_suite

        ev["suite_tasks"] = _asdict(eval_suite(preset))
    stages.append(Stage("eval_base", "eval", "eval/base", {**v, "eval": ev}, _eval_fn(preset, "base", "base student", "base", "path"), deps=("base",), soft=True))
    stages.append(Stage("eval_teacher", "eval", "eval/teacher", {**v, "eval": ev},
                        _eval_fn(preset, "teacher", "teacher", "teacher", "path"), deps=("teacher",), soft=True))
    roles = preset.roles()
    for run in preset.runs:
        stages += _run_stages(preset, run, roles, v, ev, launcher)
    stages += _trajectory_stages(preset, roles, v)
    stages.append(Stage("report", "report", "", {**v}, _report_fn(preset), always=True))
    return _tagged(preset, stages)


CORE = ("core",)


def run_tags(run: StudyRun) -> tuple[str, ...]:
    """``--stages`` tags of a run's stages: ``core`` for SFT, OPD and RLVR (every seed, group
    ``main``), else ``controls`` and the run's panel (``matched``, ``sparsification``,
    ``offpolicy``, ``mixing``, ``projection``)."""
    return CORE if run.group == "main" else ("controls", run.group)


def _tagged(preset: StudyPreset, stages: list[Stage]) -> list[Stage]:
    """A run's training, evaluation, restart evaluation, compare and trajectory stages carry
    its `run_tags`; the models, their evaluations, ``trajectory_main`` and the report are core."""
    own = {}
    for run in preset.runs:
        for name in (run.name, f"eval_{run.name}", f"eval_{run.name}_start", f"compare_{run.name}",
                     f"trajectory_{run.name}"):
            own[name] = run_tags(run)
    return [dataclasses.replace(s, tags=own.get(s.name, CORE)) for s in stages]


def _run_stages(preset: StudyPreset, run: StudyRun, roles: dict, v: dict, ev: dict, launcher: str | None) -> list[Stage]:
    """A run's training, evaluation (and its restart checkpoint's, for a projected run) and compare."""
    deps = ["base", "teacher"]
    if run.init == "anchor" or (run.name != ANCHOR_RUN and preset.has_run(ANCHOR_RUN)):
        deps.append(ANCHOR_RUN)
    if "@" in run.init:
        deps.append(run.init.partition("@")[0])
    deps = tuple(dict.fromkeys(d for d in deps if d != run.name))
    control = run.name not in roles["main"]
    out = [Stage(run.name, "train", f"runs/{run.name}", {**v, "run": run.cache_config()},
                 _run_fn(run, preset, launcher), deps=deps, resumable=True, soft=control)]
    role = "SFT anchor" if run.name == ANCHOR_RUN else (
        ("projected" if run.project_mode == "project" else "freeze-only") if run.project_rank else run.group)
    out.append(Stage(f"eval_{run.name}", "eval", f"eval/{run.name}", {**v, "eval": ev},
                     _eval_fn(preset, run.name, role, run.name, "final"), deps=(run.name,), soft=True))
    if run.project_rank and run.project_mode == "project" and run.seed_of is None:
        # the checkpoint every seed of the projected run restarts from (the seed-0 source run's)
        start = f"{run.name}_start"
        out.append(Stage(f"eval_{start}", "eval", f"eval/{start}", {**v, "eval": ev},
                         _eval_fn(preset, start, "projection start", run.name, "init"), deps=(run.name,), soft=True))
    d = preset.diagnose
    out.append(Stage(f"compare_{run.name}", "compare", f"diagnose/compare/{run.name}",
                     {**v, "k": d.k, "rank": d.rank, "alpha": d.alpha, "eta": d.eta},
                     _compare_fn(preset, run.name), deps=(run.name,), soft=True))
    return out


def _trajectory_stages(preset: StudyPreset, roles: dict, v: dict) -> list[Stage]:
    """``trajectory_main`` (the main runs with the OPD/RLVR overlap), then one per other run
    (another seed of OPD or RLVR together with its seed-0 run and their overlap: the noise
    floor of the OPD-RLVR overlap)."""
    d = preset.diagnose
    tcfg = {**v, "matrices": d.trajectory_matrices, "hill_k": d.hill_k, "sim_k": d.sim_k, "lock": d.lock_threshold}
    main, opd, rlvr = roles["main"], roles["opd"], roles["rlvr"]
    overlap = [(opd, rlvr)] if opd and rlvr else []
    out = [Stage("trajectory_main", "trajectory", "diagnose/trajectory/main", {**tcfg, "runs": main, "overlap": overlap},
                 _trajectory_fn(preset, main, overlap), deps=tuple(main), soft=True)]
    for run in preset.runs:
        if run.name in main:
            continue
        runs, pairs = [run.name], []
        if run.seed_of is not None and run.seed_of in (opd, rlvr):
            runs, pairs = [run.seed_of, run.name], [(run.seed_of, run.name)]
        out.append(Stage(f"trajectory_{run.name}", "trajectory", f"diagnose/trajectory/{run.name}",
                         {**tcfg, "runs": runs, "overlap": pairs}, _trajectory_fn(preset, runs, pairs),
                         deps=tuple(runs), soft=True))
    return out
