"""The study plan shown by ``opdgeo study --dry-run``: stages, runs, model sizes and a GPU
memory estimate, all computed from the preset's configs without loading a model.

Parameter count of a Qwen3/Llama decoder (no biases), from its config::

    P = V·h                                   (embedding)
      + L·[ h·(n_q·d) + 2·h·(n_kv·d) + (n_q·d)·h      (q, k, v, o)
            + 3·h·I                                    (gate, up, down)
            + 2·h + 2·d·[qk_norm] ]                    (norms; Qwen3 q/k norms)
      + h                                      (final norm)
      + V·h·[not tied]                         (lm_head)

Training memory (bytes), the paper's precision (fp32 master weights, bf16 autocast, AdamW)::

    M_student = 16·P_s            (4 weights + 4 grads + 8 Adam moments)
    M_teacher = 2·P_t             (bf16, inference only; OPD runs)
    M_kv      = 2·2·L·n_kv·d·(prompt+response)·B_gen      (bf16 KV cache of one generation micro-batch)
    M_logits  = 4·V·T_micro       (fp32 logits of one training micro-batch of T_micro tokens)
    M_act     = 2·L·h·T_micro·c   (bf16 activations kept for backward; c ≈ 2 with activation
                                   checkpointing, ≈ 34 without — Korthikanti et al. 2022)
    per GPU (DDP, the training core's mode)   = M_student + M_teacher + M_kv + M_logits + M_act
    per GPU (FSDP/ZeRO-3 over N GPUs)         = (M_student + M_teacher)/N + M_kv + M_logits + M_act

The estimate ignores allocator fragmentation and framework buffers (add ~10 %).
"""

from __future__ import annotations

from dataclasses import dataclass

from opdgeo.study.presets import ModelSpec, StudyPreset, StudyRun

__all__ = ["count_parameters", "model_arch", "MemoryEstimate", "memory_estimate", "plan_rows", "format_plan",
           "preset_argument"]


def count_parameters(arch: dict) -> int:
    """Parameters of a Qwen3/Llama decoder from its config numbers (formula in the module doc).

    Args:
        arch: ``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``,
            ``num_key_value_heads``, ``head_dim``, ``intermediate_size``, ``vocab_size``,
            ``tie_word_embeddings``; optional ``qk_norm`` (default True: Qwen3).
    """
    h, L = arch["hidden_size"], arch["num_hidden_layers"]
    nq, nkv = arch["num_attention_heads"], arch["num_key_value_heads"]
    d = arch.get("head_dim") or h // nq
    inter, V = arch["intermediate_size"], arch["vocab_size"]
    qk_norm = arch.get("qk_norm", True)
    per_layer = h * nq * d + 2 * h * nkv * d + nq * d * h + 3 * h * inter + 2 * h + (2 * d if qk_norm else 0)
    return V * h + L * per_layer + h + (0 if arch.get("tie_word_embeddings", False) else V * h)


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


@dataclass(frozen=True)
class MemoryEstimate:
    """Training-memory estimate in bytes (see the module docstring for the formulas)."""

    student: float
    teacher: float
    kv: float
    logits: float
    activations: float
    prompt_tokens: int
    micro_tokens: int

    @property
    def ddp_per_gpu(self) -> float:
        return self.student + self.teacher + self.kv + self.logits + self.activations

    def sharded_per_gpu(self, n_gpus: int) -> float:
        return (self.student + self.teacher) / n_gpus + self.kv + self.logits + self.activations


def memory_estimate(student: dict, teacher: dict | None, run: StudyRun, *, prompt_tokens: int = 512,
                    micro_batch_sequences: int = 1, checkpointing: bool = True) -> MemoryEstimate:
    """Estimate the per-GPU training memory of ``run`` (bytes).

    Args:
        student, teacher: architecture dicts (`count_parameters` keys); teacher None = no teacher.
        run: the run (its ``max_new_tokens`` and ``samples_per_prompt`` size the rollouts).
        prompt_tokens: assumed prompt length **(our assumption; dapo-math prompts are short)**.
        micro_batch_sequences: sequences per training micro-batch.
        checkpointing: activation checkpointing on (c = 2) or off (c = 34).
    """
    ps = count_parameters(student)
    pt = count_parameters(teacher) if teacher else 0
    seq = prompt_tokens + run.max_new_tokens
    L, h = student["num_hidden_layers"], student["hidden_size"]
    d = student.get("head_dim") or h // student["num_attention_heads"]
    kv = 2 * 2 * L * student["num_key_value_heads"] * d * seq * run.samples_per_prompt
    micro = seq * micro_batch_sequences
    return MemoryEstimate(
        student=16.0 * ps,
        teacher=2.0 * pt,
        kv=float(kv),
        logits=4.0 * student["vocab_size"] * micro,
        activations=2.0 * L * h * micro * (2 if checkpointing else 34),
        prompt_tokens=prompt_tokens,
        micro_tokens=micro,
    )


def _gib(x: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= scale:
            return f"{x / scale:,.1f} {unit}"
    return f"{x:.0f} B"


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
                launcher: str | None = None,
                data_plan: str | None = None) -> str:
    """The plain-text plan: stages, data, sizes, memory estimate with its formula, time, launch."""
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
        opd_name = preset.roles()["opd"]
        opd = preset.run(opd_name) if opd_name else preset.runs[0]
        micro = (opd.micro_batch_size or opd.batch_size) * opd.samples_per_prompt
        m = memory_estimate(sa, ta, opd, prompt_tokens=16 if preset.task.startswith("arithmetic") else 512,
                            micro_batch_sequences=micro)
        lines += [
            "",
            f"GPU memory estimate for the {opd.name} run (bytes; P_s = {ps:,}, P_t = {pt or 0:,}):",
            f"  M_student = 16*P_s                      = {_gib(m.student)}   (fp32 weights 4 + grads 4 + Adam 8)",
            f"  M_teacher = 2*P_t                       = {_gib(m.teacher)}   (bf16, inference)",
            f"  M_kv      = 4*L*n_kv*d*seq*G            = {_gib(m.kv)}   (seq = {m.prompt_tokens} prompt + {opd.max_new_tokens} new, G = {opd.samples_per_prompt})",
            f"  M_logits  = 4*V*T_micro                 = {_gib(m.logits)}   (T_micro = {micro} sequences x "
            f"{m.micro_tokens // micro} = {m.micro_tokens} tokens; chunked log-softmax would cut this)",
            f"  M_act     = 2*L*h*T_micro*2             = {_gib(m.activations)}   (activation checkpointing)",
            f"  per GPU, DDP (full replica)             = {_gib(m.ddp_per_gpu)}",
            f"  per GPU, FSDP/ZeRO-3 over 8 GPUs        = {_gib(m.sharded_per_gpu(8))}",
        ]
        gpu = 80 * 2**30
        if m.ddp_per_gpu > gpu:
            per_rank = m.kv + m.logits + m.activations
            if per_rank >= gpu:
                lines.append(f"  -> the per-GPU activations alone ({_gib(per_rank)}) exceed an 80 GiB GPU: use fewer tokens "
                             "per micro-step (one sequence, chunked log-softmax) and FSDP/ZeRO-3 sharding.")
            else:
                n = -(-(m.student + m.teacher) // (gpu - per_rank))
                lines.append(f"  -> exceeds one 80 GiB GPU with DDP: shard with FSDP/ZeRO-3 (accelerate config) over "
                             f">= {int(n)} x 80 GiB GPUs.")
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

