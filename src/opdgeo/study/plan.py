"""The study plan shown by ``opdgeo study --dry-run``: stages, runs, model sizes and the GPU
memory of the OPD run, all computed from the preset's configs without loading a model.

Parameter counts and memory come from ``opdgeo.training.memory_plan`` (formulas there),
applied to the training config the study would launch (``train_config_dict``), on the
launcher's GPUs (8 for a CUDA preset).
"""

from __future__ import annotations

from pathlib import Path

from opdgeo.study.presets import ModelSpec, StudyPreset, StudyRun
from opdgeo.training.memory_plan import Arch

__all__ = ["count_parameters", "model_arch", "memory_lines", "disk_study_bytes", "disk_study_lines", "free_bytes", "plan_rows", "format_plan",
           "preset_argument", "GPUS"]

GPUS = 8  # GPUs of a CUDA preset (the default launcher: accelerate launch --num_processes 8)


def count_parameters(arch: dict) -> int:
    """Parameters of a Qwen3/Llama decoder from its config numbers (``memory_plan.Arch``).

    Args:
        arch: ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
            ``num_key_value_heads``, ``head_dim``, ``intermediate_size``, ``vocab_size``,
            ``tie_word_embeddings``; optional ``qk_norm`` (default True: Qwen3).
    """
    return Arch.from_dict({"qk_norm": True, **arch}).parameters


def model_arch(spec: ModelSpec) -> dict | None:
    """Architecture numbers of a model spec: its ``arch``, or the tiny preset's shape with the
    char vocabulary (read from `opdgeo.models`); None when unknown."""
    if spec.arch:
        return dict(spec.arch)
    from opdgeo.sources import ModelSource

    source = ModelSource.parse(spec.source)
    if source.kind == "tiny":
        try:
            from opdgeo.models.factory import PRESETS
            from opdgeo.models.tokenizer import CHAR_VOCAB, SPECIAL_TOKENS
        except ImportError:
            return None
        p = PRESETS.get(source.preset)
        if p is None:
            return None
        return dict(hidden_size=p.hidden_size, num_hidden_layers=p.num_hidden_layers,
                    num_attention_heads=p.num_attention_heads, num_key_value_heads=p.num_key_value_heads,
                    head_dim=p.head_dim, intermediate_size=p.intermediate_size,
                    vocab_size=len(CHAR_VOCAB) + len(SPECIAL_TOKENS), tie_word_embeddings=True)
    return None


def _fmt_params(n: int | None) -> str:
    if n is None:
        return "?"
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    return f"{n / 1e3:.1f} k"


def _run_text(r: StudyRun) -> str:
    steps = f"{r.steps} steps" + (f" ({r.epochs:g} epochs)" if r.epochs is not None else "")
    parts = [f"{r.objective}", f"from {r.init}", steps, f"batch {r.batch_size}"]
    if r.objective != "sft":
        parts.append(f"x{r.samples_per_prompt} samples")
    parts.append(f"lr {r.optim.lr:g} {r.optim.schedule}" + (f"->{r.optim.min_lr:g}" if r.optim.schedule == "cosine" else ""))
    if r.optim.warmup_fraction:
        parts.append(f"warmup {100 * r.optim.warmup_fraction:.0f} %")
    if r.token_keep:
        parts.append(f"token_keep {r.token_keep[0]} {r.token_keep[1]}")
    if r.rollout_policy != "student":
        parts.append(f"rollouts by {r.rollout_policy}")
    if r.mix_alpha is not None:
        parts.append(f"alpha {r.mix_alpha}")
    if r.project_rank:
        parts.append(f"projected K={r.project_rank}" if r.project_mode == "project"
                     else f"freeze-only control (K={r.project_rank} frozen set, no projection)")
    parts.append("ckpts " + "/".join(map(str, r.checkpoint_steps())))
    if r.seed_of is not None:
        parts.append(f"seed {r.seed} of {r.seed_of}")
    return ", ".join(parts)


def estimate_seconds(preset: StudyPreset, stages) -> float:
    """Wall time of ``stages`` from the preset's measured ``step_seconds``: steps x the
    objective's step time per training run, the teacher's SFT steps x ``teacher_sft``, one
    ``eval``/``compare`` per such stage, ``trajectory`` per run a trajectory stage reads."""
    t = preset.step_seconds
    total = 0.0
    for s in stages:
        if s.kind == "model":
            total += t.get("model", 0.0) + (preset.teacher.sft_steps * t.get("teacher_sft", 0.0) if s.name == "teacher" else 0.0)
        elif s.kind == "train":
            run = preset.run(s.name)
            total += run.steps * t.get(run.objective, 0.0)
        elif s.kind == "trajectory":
            total += len(s.config.get("runs", [])) * t.get("trajectory", 0.0)
        else:
            total += t.get(s.kind, 0.0)
    return total


def plan_rows(preset: StudyPreset, stages, statuses: dict[str, str] | None = None) -> list[tuple[str, str, str, str]]:
    """``(stage, kind, what, status)`` for every stage."""
    statuses = statuses or {}
    rows = []
    for s in stages:
        if s.kind == "train":
            what = _run_text(preset.run(s.name))
        elif s.kind == "model":
            spec = preset.base if s.name == "base" else preset.teacher
            arch = model_arch(spec)
            what = f"{spec.source} ({_fmt_params(count_parameters(arch) if arch else None)} params)"
            if spec.pretrain_steps:
                what += f", pretrain {spec.pretrain_steps} steps x {spec.pretrain_batch} blocks"
            if spec.sft_steps:
                what += f", SFT {spec.sft_steps} steps lr {spec.sft_lr:g}"
        elif s.kind == "eval":
            e = preset.eval
            what = (f"suite {e.suite}" if e.suite else f"avg@{e.k} on {e.n_problems} {e.split} problems, T={e.temperature}")
        elif s.kind == "compare":
            what = f"origin -> {s.deps[0]} final (k={preset.diagnose.k}, r={preset.diagnose.rank}, alpha={preset.diagnose.alpha})"
        elif s.kind == "trajectory":
            what = "runs " + ", ".join(s.config.get("runs", [])) + (" + overlap opd/rlvr" if s.config.get("overlap") else "")
        else:
            what = "report.html, report.md, tables/, claims.json, timings.json"
        rows.append((s.name, s.kind, what, statuses.get(s.name, "")))
    return rows


def preset_argument(preset: StudyPreset) -> str:
    """What ``--preset`` takes for ``preset``: a shipped preset's name, else its file."""
    from pathlib import Path

    from opdgeo.study.preset_file import shipped_presets_dir

    shipped = Path(str(shipped_presets_dir())).resolve()
    if not preset.path or Path(preset.path).resolve().parent == shipped:
        return preset.name
    return preset.path


def format_plan(preset: StudyPreset, stages, statuses: dict[str, str] | None = None, *,
                launcher: str | None = None, data_plan: str | None = None, out: Path | None = None) -> str:
    """The plain-text plan: stages, data, sizes, memory and disk estimates with their
    formulas (the free space at ``out`` when given), time, launch."""
    demos = "the task's solutions" if preset.demonstrations is None else preset.demonstrations
    evals = f"suite {preset.eval.suite}" if preset.eval.suite else f"{preset.eval.split} split of the task"
    lines = [f"opdgeo study --preset {preset_argument(preset)}: {preset.description}",
             f"task: {preset.task} (dedup {'on' if preset.dedup else 'off'}); SFT demonstrations: {demos}; "
             f"evaluation: {evals}; checkpoints: {preset.dtype}", ""]
    rows = plan_rows(preset, stages, statuses)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for name, kind, what, status in rows:
        lines.append(f"  {name:<{w0}}  {kind:<{w1}}  {what}" + (f"  [{status}]" if status else ""))
    if data_plan:
        lines += ["", data_plan.rstrip("\n")]
    panel = preset.mixing_panel()
    if panel:
        lines += ["", "mixing sweep (alpha: run): " + ", ".join(f"{a:g}: {n}" for a, n in panel)]
    sa, ta = model_arch(preset.base), model_arch(preset.teacher)
    ps = count_parameters(sa) if sa else None
    pt = count_parameters(ta) if ta else None
    lines += ["", f"stages: {len(stages)}; training runs: {len(preset.runs)}; "
              f"optimizer steps in total: {sum(r.steps for r in preset.runs)}",
              f"student parameters: {_fmt_params(ps)}; teacher parameters: {_fmt_params(pt)}"]
    if sa:
        lines += [""] + memory_lines(preset, sa, ta, launcher=launcher)
        lines += [""] + disk_study_lines(preset, stages, sa, ta, out)
    if preset.step_seconds:
        lines += ["", f"estimated time of these {len(stages)} stages: ~{estimate_seconds(preset, stages) / 60:.0f} min "
                      f"(from step times measured {preset.measured_on})"]
    if preset.expected_minutes:
        lines += ["", "expected time: " + ", ".join(f"{k}: ~{v} min" for k, v in preset.expected_minutes.items())]
    if preset.device == "cuda" or launcher:
        lines += ["", "launch on GPUs (training stages run through the public CLI):",
                  f"  opdgeo study --preset {preset_argument(preset)} --out runs/study-{preset.name} "
                  f"--launcher \"{launcher or 'accelerate launch --num_processes 8'}\""]
    return "\n".join(lines) + "\n"


def _launcher_world(launcher: str | None, preset: StudyPreset) -> int:
    """Processes the launcher starts (``--num_processes N`` / ``--nproc_per_node N``), else
    ``GPUS`` for a CUDA preset and 1 on a CPU."""
    import shlex

    words = shlex.split(launcher or "")
    for i, w in enumerate(words[:-1]):
        if w.replace("_", "-") in ("--num-processes", "--nproc-per-node") and words[i + 1].isdigit():
            return int(words[i + 1])
    return GPUS if preset.device == "cuda" else 1


def memory_lines(preset: StudyPreset, sa: dict, ta: dict | None, *, launcher: str | None = None) -> list[str]:
    """The OPD run's per-GPU memory (``opdgeo.training.memory_plan``) from the training config
    that the study launches, and which strategy fits 8 x 80 GB."""
    from opdgeo.study.pipeline import train_config_dict
    from opdgeo.training.config import config_from_dict
    from opdgeo.training.memory_plan import GPU_BYTES, format_plan, settings_from_config, uses_teacher

    opd_name = preset.roles()["opd"]
    opd = preset.run(opd_name) if opd_name else preset.runs[0]
    # the models are described by their arch dicts, not read: tiny stand-ins keep the config check off the disk
    config = config_from_dict(train_config_dict(opd, preset, student="tiny:student", teacher="tiny:teacher",
                                                out_dir=Path("plan")), check_paths=False)
    world = _launcher_world(launcher, preset)
    on_gpu = preset.device == "cuda"
    if on_gpu:
        native = True
    else:
        from opdgeo.training.precision import native_bf16

        native = native_bf16("cpu")
    settings = settings_from_config(config, world=world, native_bf16=native)
    teacher = Arch.from_dict({"qk_norm": True, **ta}) if ta and uses_teacher(config) else None
    lines = format_plan(Arch.from_dict({"qk_norm": True, **sa}), teacher, settings,
                        title=f"GPU memory estimate for the {opd.name} run", table_world=GPUS if on_gpu else None)
    prompt = settings.prompt_tokens
    lines.append(f"  (prompt length {prompt} tokens is an assumption; GPU = {GPU_BYTES / 1e9:.0f} GB)")
    return lines


def disk_study_bytes(preset: StudyPreset, stages, sa: dict, ta: dict | None) -> tuple[int, int, int]:
    """``(at the end, at most, training runs)``: the bytes the stages write
    (``opdgeo.training.memory_plan``, "Disk"): the model stages' folders and every training
    run's step folders under the preset's ``keep_trainer_state``."""
    from opdgeo.training.memory_plan import plan_disk

    student = Arch.from_dict({"qk_norm": True, **sa})
    teacher = Arch.from_dict({"qk_norm": True, **ta}) if ta else student
    b = 4 if preset.dtype == "float32" else 2
    keep = preset.keep_trainer_state
    total = peak = runs = 0
    for s in stages:
        if s.kind == "model":
            arch = student if s.name == "base" else teacher
            total += b * arch.parameters  # models/base/model, models/teacher/pretrained
            peak = max(peak, total)
            if s.name == "teacher" and preset.teacher.sft_steps:
                d = plan_disk(arch, steps=preset.teacher.sft_steps, every=0, dtype_bytes=b, keep=keep)
                peak, total = max(peak, total + d.peak), total + d.run
        elif s.kind == "train":
            run = preset.run(s.name)
            d = plan_disk(student, steps=run.steps, every=run.every(), dtype_bytes=b, keep=keep,
                          keep_steps=preset.restart_steps(run))
            peak, total = max(peak, total + d.peak), total + d.run
            runs += 1
    return total, peak, runs


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (its nearest existing folder)."""
    import shutil

    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_study_lines(preset: StudyPreset, stages, sa: dict, ta: dict | None, out: Path | None = None) -> list[str]:
    """The disk plan of the stages as text, with the free space at ``out``."""
    from opdgeo.training.memory_plan import plan_disk

    total, peak, runs = disk_study_bytes(preset, stages, sa, ta)
    one = plan_disk(Arch.from_dict({"qk_norm": True, **sa}), steps=1, every=0,
                    dtype_bytes=4 if preset.dtype == "float32" else 2)
    lines = [f"disk of these stages: ~{total / 2**30:.1f} GiB at the end, ~{peak / 2**30:.1f} GiB at most "
             f"({runs} training run(s), keep_trainer_state: {preset.keep_trainer_state}; one checkpoint's weights "
             f"{one.weights / 2**20:,.0f} MiB, one trainer state {one.trainer_state / 2**20:,.0f} MiB)"]
    if out is not None:
        free = free_bytes(out)
        lines.append(f"  free at {out}: {free / 2**30:.1f} GiB" + (
            "" if free >= peak else " -- NOT enough for these stages (stages already cached there need none)"))
    return lines
