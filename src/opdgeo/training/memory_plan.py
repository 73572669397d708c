"""Per-GPU training memory from a run's actual settings: the one owner of the memory plan
that ``opdgeo train --dry-run`` and ``opdgeo study --dry-run`` print.

Parameter count of a Qwen3/Llama decoder (no biases), from its config::

    P       = V·h·(1 + [not tied]) + L·P_layer + h                 (embedding, lm_head, final norm)
    P_layer = h·(n_q·d) + 2·h·(n_kv·d) + (n_q·d)·h + 3·h·I + 2·h + 2·d·[qk_norm]

Memory per GPU (bytes) of one rank, N = world size, S = N under ``fsdp`` else 1, c = bytes
of a compute element (2 under bf16, 4 in fp32), T = tokens of one training micro-batch
(sequences × (prompt + response)), T_g = tokens of one generation call::

    student    = 16·P_s / S                 fp32 weights 4 + grads 4 + AdamW moments 8 (on the CPU with cpu_offload)
    cast_cache = 2·L·P_layer                none/ddp under bf16 autocast: the decoder layers' bf16 weight copies
                                            kept for backward (the output head casts one vocabulary tile at
                                            a time and keeps none)
               = 2·P_layer                  with activation checkpointing (the loss forward runs without
                                            autocast's cast cache): one layer's copies while it is recomputed
    gathered   = (2·P_layer + P_root)·(c+4) fsdp: two unsharded layers (current + prefetch) and the root
                                            (embedding, lm_head), in c bytes plus their fp32 gradients
    teacher    = t·P_t / S + [fsdp] 2·t·P_layer,t   t = 2 (bf16) or 4 (fp32); sharded like the student
    act        = L·a·T·c                    without activation checkpointing
               = L·h·T·c + a·T·c            with it: each layer's input, plus one layer recomputed in backward
                 a = 4h + 3·n_q·d + 3·n_kv·d + 4·I + 2 + n_q + 2d + [qk_norm]·(2·n_q·d + 2·n_kv·d + n_q + n_kv)
                 elements saved per token per layer: norms' inputs and outputs, q/k/v before and after
                 RoPE, SDPA's output and log-sum-exp (no T×T scores), the MLP's four I-wide tensors, the
                 norms' inverse RMS and RoPE's cos/sin (the count is what autograd saves, tested in fp32)
    logprobs   = (4 + 2·[bf16])·min(C, V·T) + 4·h·T + 4·V·h·[not fsdp]
                                            tiled log-softmax: one tile of C logits in fp32 (plus its bf16
                                            cast under bf16 autocast), the final hidden states (and their
                                            gradient), and under none/ddp the head's fp32 weight gradient,
                                            returned by its backward before it reaches .grad (under fsdp
                                            the root's unsharded gradient is in gathered)
    kv         = 2·L·n_kv·d·T_g·c           KV cache of one generation call

    per GPU = student + teacher + max(training: cast_cache + gathered + act + logprobs,
                                      generation: kv + gathered)

DDP adds no term: it runs with ``gradient_as_bucket_view``, so the gradients are views of
its flat all-reduce buckets, not a second copy. Allocator fragmentation and framework
buffers are not included (allow ~10 %).

Disk of a run's step folders (bytes; b = bytes of an element of ``checkpoint.dtype``,
n = checkpoints saved, k = trainer states kept)::

    weights       = b·P_s                       one step folder's HF weights (a tied embedding once)
    trainer_state = 12·P_s + 4·V·h·[tied]       fp32 master weights + AdamW's two moments (fp32); a
                                                tied embedding's master copy is written under both names
    run           = n·weights + k·trainer_state k = n (keep_trainer_state: all), else the last
                                                checkpoint plus keep_trainer_state_steps
    peak          = run + trainer_state         under "last": a new state is complete before
                                                the previous one is deleted

Tokenizer and config files (a few MB per step folder) and AdamW's step counters (4 bytes
per parameter tensor) are not included.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Arch", "Settings", "MemoryPlan", "plan_memory", "settings_from_config", "arch_of_source",
           "format_plan", "strategy_table", "GPU_BYTES", "LOGPROB_CHUNK_ELEMENTS", "DiskPlan", "plan_disk",
           "checkpoint_steps", "disk_lines"]

GPU_BYTES = 80 * 10**9  # an "80 GB" accelerator (H100/A100 80GB: 79.6-85 GB usable before the ~10 % margin)
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
LOGPROB_CHUNK_ELEMENTS = 2**24  # opdgeo.training.rollout.sequence_logprobs' chunk of logits


@dataclass(frozen=True)
class Arch:
    """The numbers of a Qwen3/Llama decoder that size its memory (transformers config names)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    qk_norm: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> Arch:
        """From a preset ``arch`` dict or a transformers config's ``to_dict()``."""
        heads = d["num_attention_heads"]
        qk = d.get("qk_norm", "qwen3" in str(d.get("model_type", "qwen3")))
        return cls(hidden_size=d["hidden_size"], num_hidden_layers=d["num_hidden_layers"], num_attention_heads=heads,
                   num_key_value_heads=d.get("num_key_value_heads") or heads,
                   head_dim=d.get("head_dim") or d["hidden_size"] // heads, intermediate_size=d["intermediate_size"],
                   vocab_size=d["vocab_size"], tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                   qk_norm=bool(qk))

    @property
    def layer_parameters(self) -> int:
        h, q, kv = self.hidden_size, self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        return 2 * h * q + 2 * h * kv + 3 * h * self.intermediate_size + 2 * h + (2 * self.head_dim if self.qk_norm else 0)

    @property
    def root_parameters(self) -> int:
        """Everything outside the decoder layers: embedding, lm_head (unless tied), final norm."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2) + self.hidden_size

    @property
    def parameters(self) -> int:
        return self.root_parameters + self.num_hidden_layers * self.layer_parameters

    @property
    def saved_per_token_layer(self) -> int:
        """Elements autograd keeps per token per decoder layer without checkpointing (``a``)."""
        h, nq, nkv, d = self.hidden_size, self.num_attention_heads, self.num_key_value_heads, self.head_dim
        q, kv = nq * d, nkv * d
        base = 4 * h + 3 * q + 3 * kv + 4 * self.intermediate_size + 2 + nq + 2 * d
        return base + ((2 * q + 2 * kv + nq + nkv) if self.qk_norm else 0)


@dataclass(frozen=True)
class Settings:
    """The settings that size a rank's memory (``settings_from_config`` reads them from a run)."""

    strategy: str  # none | ddp | fsdp (resolved)
    world: int
    micro_sequences: int  # sequences per training forward/backward
    prompt_tokens: int
    response_tokens: int
    activation_checkpointing: bool = False
    bf16_compute: bool = True
    teacher_bytes: int = 2
    cpu_offload: bool = False
    gen_sequences: int | None = None  # sequences per generate call (default: micro_sequences)
    logprob_chunk: int = LOGPROB_CHUNK_ELEMENTS


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU by term (module docstring), the phase that peaks and the total."""

    settings: Settings
    terms: dict = field(default_factory=dict)
    host: float = 0.0  # bytes kept in CPU memory instead (cpu_offload)

    @property
    def training(self) -> float:
        t = self.terms
        return t["cast_cache"] + t["gathered"] + t["act"] + t["logprobs"]

    @property
    def generation(self) -> float:
        return self.terms["kv"] + self.terms["gathered"]

    @property
    def per_gpu(self) -> float:
        return self.terms["student"] + self.terms["teacher"] + max(self.training, self.generation)

    def fits(self, capacity: float = GPU_BYTES) -> bool:
        return self.per_gpu <= capacity


def plan_memory(student: Arch, teacher: Arch | None, s: Settings) -> MemoryPlan:
    """The per-GPU memory of one rank training ``student`` (scored by ``teacher``) under ``s``."""
    if s.strategy not in ("none", "ddp", "fsdp"):
        raise ValueError(f"strategy must be none, ddp or fsdp; got {s.strategy!r}")
    fsdp = s.strategy == "fsdp"
    shards = s.world if fsdp else 1
    c = 2 if s.bf16_compute else 4
    ps, seq = student.parameters, s.prompt_tokens + s.response_tokens
    tokens = s.micro_sequences * seq
    state = 16.0 * ps / shards
    a = student.saved_per_token_layer
    L, h = student.num_hidden_layers, student.hidden_size
    act = (L * h * tokens * c + a * tokens * c) if s.activation_checkpointing else L * a * tokens * c
    teacher_b = 0.0
    if teacher is not None:
        teacher_b = s.teacher_bytes * teacher.parameters / shards
        if fsdp:
            teacher_b += 2 * s.teacher_bytes * teacher.layer_parameters
    gen_tokens = (s.gen_sequences or s.micro_sequences) * seq
    terms = {
        "student": 0.0 if s.cpu_offload else state,
        "teacher": teacher_b,
        "cast_cache": (0.0 if fsdp or not s.bf16_compute else
                       2.0 * student.layer_parameters * (1 if s.activation_checkpointing else L)),
        "gathered": (2 * student.layer_parameters + student.root_parameters) * (c + 4.0) if fsdp else 0.0,
        "act": float(act),
        "logprobs": ((4.0 + (2.0 if s.bf16_compute else 0.0)) * min(s.logprob_chunk, student.vocab_size * tokens)
                     + 4.0 * h * tokens + (0.0 if fsdp else 4.0 * student.vocab_size * h)),
        "kv": 2.0 * L * student.num_key_value_heads * student.head_dim * gen_tokens * c,
    }
    return MemoryPlan(settings=s, terms=terms, host=state if s.cpu_offload else 0.0)


def strategy_table(student: Arch, teacher: Arch | None, s: Settings, *, world: int) -> list[tuple[str, MemoryPlan]]:
    """The same run under every strategy on ``world`` GPUs (activation checkpointing as set)."""
    from dataclasses import replace

    rows = [("ddp", replace(s, strategy="ddp", world=world, cpu_offload=False)),
            ("fsdp", replace(s, strategy="fsdp", world=world, cpu_offload=False)),
            ("fsdp + activation checkpointing", replace(s, strategy="fsdp", world=world, cpu_offload=False,
                                                       activation_checkpointing=True))]
    seen, out = set(), []
    for name, st in rows:
        if st not in seen:
            seen.add(st)
            out.append((name, plan_memory(student, teacher, st)))
    return out


SMOLLM2_135M = Arch(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                    intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, qk_norm=False)


def arch_of_source(source: str) -> Arch | None:
    """The architecture of a model source without loading weights or downloading: a
    ``tiny:`` preset's config, SmolLM2-135M, or the ``config.json`` of a local folder or a
    model in the local Hugging Face cache; None when it is not here."""
    import json

    from opdgeo.errors import ConfigError, SourceError
    from opdgeo.sources import ModelSource

    src = ModelSource.parse(source)
    if src.kind == "tiny":
        from opdgeo.models.factory import tiny_qwen3_config
        from opdgeo.models.tokenizer import char_tokenizer

        if src.problem():
            return None
        return Arch.from_dict(tiny_qwen3_config(src.preset, len(char_tokenizer())).to_dict())
    if src.kind == "smollm2":
        return SMOLLM2_135M
    try:
        path = src.resolve()
        return Arch.from_dict(json.loads((path / "config.json").read_text()))
    except (OSError, ValueError, KeyError, SourceError, ConfigError):  # not here: the plan says so
        return None


def uses_teacher(config) -> bool:
    """The run loads ``model.teacher`` (the loop's rule: an OPD weight, or teacher rollouts)."""
    return config.objective.weights().get("opd", 0.0) != 0.0 or config.rollout.policy == "teacher"


def assumed_prompt_tokens(task_spec: str) -> int:
    """Prompt length the plan assumes (prompts are only measured once the task is read):
    16 tokens for the arithmetic task, 512 otherwise (dapo-math prompts are shorter)."""
    return 16 if task_spec.startswith("arithmetic") else 512


def settings_from_config(config, *, world: int, native_bf16: bool = True, prompt_tokens: int | None = None) -> Settings:
    """The memory settings of a ``TrainConfig`` launched on ``world`` processes.

    ``auto`` settings resolve as the loop resolves them on the target device: bf16
    autocast and a bf16 teacher where it computes bf16 natively (``native_bf16``; GPUs).
    ``prompt_tokens`` default: ``assumed_prompt_tokens(task.spec)``."""
    from opdgeo.distributed import resolve_strategy

    o, m = config.optim, config.model
    sequences = o.micro_batch_size * (1 if config.objective.demonstrations else config.rollout.group_size)
    bf16 = native_bf16 if o.bf16_autocast == "auto" else bool(o.bf16_autocast)
    t_bytes = {"bfloat16": 2, "float32": 4}.get(m.teacher_dtype, 2 if native_bf16 else 4)
    prompt = assumed_prompt_tokens(config.task.spec) if prompt_tokens is None else prompt_tokens
    gen = sequences if config.objective.demonstrations else (
        (config.rollout.micro_batch_size or o.micro_batch_size) * config.rollout.group_size)
    return Settings(strategy=resolve_strategy(config.distributed.strategy, world), world=world,
                    micro_sequences=sequences, gen_sequences=gen, prompt_tokens=prompt,
                    response_tokens=config.rollout.max_new_tokens,
                    activation_checkpointing=m.activation_checkpointing, bf16_compute=bf16, teacher_bytes=t_bytes,
                    cpu_offload=config.distributed.cpu_offload)


@dataclass(frozen=True)
class DiskPlan:
    """Bytes a run's step folders take (module docstring, "Disk")."""

    weights: int  # one step folder's HF weights
    trainer_state: int  # one trainer state
    checkpoints: int  # n
    kept_states: int  # k

    @property
    def run(self) -> int:
        return self.checkpoints * self.weights + self.kept_states * self.trainer_state

    @property
    def peak(self) -> int:
        """The most the run holds at once (a new state is written before an old one goes)."""
        return self.run + (self.trainer_state if self.kept_states < self.checkpoints else 0)


def checkpoint_steps(steps: int, every: int) -> list[int]:
    """The steps a run saves at: every ``every`` steps (0: none) and the last step."""
    out = list(range(every, steps + 1, every)) if every else []
    if not out or out[-1] != steps:
        out.append(steps)
    return out


def plan_disk(arch: Arch, *, steps: int, every: int, dtype_bytes: int = 2, save_trainer_state: bool = True,
              keep: str = "all", keep_steps: tuple[int, ...] = ()) -> DiskPlan:
    """The disk of one run's step folders from its ``checkpoint`` settings."""
    saved = checkpoint_steps(steps, every)
    p = arch.parameters
    state = 12 * p + (4 * arch.vocab_size * arch.hidden_size if arch.tie_word_embeddings else 0)
    if not save_trainer_state:
        kept = 0
    elif keep == "last":
        kept = len({saved[-1], *(s for s in keep_steps if s in saved)})
    else:
        kept = len(saved)
    return DiskPlan(weights=dtype_bytes * p, trainer_state=state, checkpoints=len(saved), kept_states=kept)


def disk_lines(disk: DiskPlan, *, keep: str) -> list[str]:
    """The disk plan of one run as text."""
    return [f"disk: {disk.checkpoints} checkpoint(s) x {_b(disk.weights)} weights + {disk.kept_states} trainer "
            f"state(s) x {_b(disk.trainer_state)} = {_b(disk.run)} at the end, {_b(disk.peak)} at most "
            f"(checkpoint.keep_trainer_state: {keep})"]


def _b(x: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= scale:
            return f"{x / scale:,.1f} {unit}"
    return f"{x:.0f} B"


_LABELS = (
    ("student", "16*P_s/S", "fp32 weights 4 + grads 4 + AdamW 8, S = {S} shards"),
    ("teacher", "t*P_t/S (+2 layers)", "t = {t} bytes, inference only"),
    ("cast_cache", "{cast}", "bf16 autocast's weight copies"),
    ("gathered", "(2*P_layer+P_root)*(c+4)", "fsdp: unsharded layers in flight"),
    ("act", "{act}", "T = {T} tokens per micro-batch"),
    ("logprobs", "{logprobs}", "tiled log-softmax, C = {C}"),
    ("kv", "2*L*n_kv*d*T_g*c", "KV cache of one generate call"),
)


def format_plan(student: Arch, teacher: Arch | None, s: Settings, *, title: str, capacity: float = GPU_BYTES,
                table_world: int | None = None) -> list[str]:
    """The plan as text lines: each term with its formula, the total, whether it fits
    ``capacity``; then the same run under each strategy on ``table_world`` GPUs."""
    p = plan_memory(student, teacher, s)
    tokens = s.micro_sequences * (s.prompt_tokens + s.response_tokens)
    act = "L*h*T*c + a*T*c" if s.activation_checkpointing else "L*a*T*c"
    cast = "2*P_layer" if s.activation_checkpointing else "2*L*P_layer"
    logprobs = f"{6 if s.bf16_compute else 4}*min(C,V*T)+4*h*T" + ("" if s.strategy == "fsdp" else "+4*V*h")
    fill = dict(S=s.world if s.strategy == "fsdp" else 1, t=s.teacher_bytes, act=act, cast=cast, logprobs=logprobs,
                T=f"{s.micro_sequences} x "
                f"({s.prompt_tokens} prompt + {s.response_tokens} response) = {tokens:,}", C=f"{s.logprob_chunk:,}")
    lines = [f"{title}: strategy {s.strategy} on {s.world} process(es), activation checkpointing "
             f"{'on' if s.activation_checkpointing else 'off'}, compute {'bf16' if s.bf16_compute else 'fp32'}, "
             f"teacher {'bf16' if s.teacher_bytes == 2 else 'fp32'}"
             + (", cpu_offload" if s.cpu_offload else ""),
             f"  P_s = {student.parameters:,}" + (f", P_t = {teacher.parameters:,}" if teacher else ", no teacher")]
    for key, formula, note in _LABELS:
        if p.terms[key]:
            lines.append(f"  {key:<10} = {formula.format(**fill):<26} = {_b(p.terms[key]):>10}   ({note.format(**fill)})")
    if p.host:
        lines.append(f"  (host memory: {_b(p.host)} of student state per rank, cpu_offload)")
    phase = "training" if p.training >= p.generation else "generation"
    verdict = "fits" if p.fits(capacity) else "does NOT fit"
    lines.append(f"  per GPU = student + teacher + max(training, generation) = {_b(p.per_gpu)} (peak in {phase}); "
                 f"{verdict} in {capacity / 1e9:.0f} GB (allow ~10 % more for the allocator)")
    if table_world:
        lines.append(f"  the same run on {table_world} x {capacity / 1e9:.0f} GB:")
        rows = strategy_table(student, teacher, s, world=table_world)
        for name, row in rows:
            lines.append(f"    {name:<32} {_b(row.per_gpu):>10} per GPU  {'fits' if row.fits(capacity) else 'does not fit'}")
        fitting = [(name, row) for name, row in rows if row.fits(capacity)]
        if fitting:
            name, row = fitting[0]
            keys = f"distributed.strategy={row.settings.strategy}" + (
                " model.activation_checkpointing=true" if row.settings.activation_checkpointing else "")
            lines.append(f"  -> on {table_world} GPUs use {name} ({keys})")
        else:
            lines.append(f"  -> no strategy fits {table_world} x {capacity / 1e9:.0f} GB at this micro-batch: "
                         "fewer sequences per micro-batch, distributed.cpu_offload, or more GPUs")
    return lines


def train_plan(config, *, world: int | None = None) -> str:
    """``opdgeo train --dry-run``: what the config would run on ``world`` processes (default:
    the launcher's) and its per-GPU memory; loads no model and touches no file.

    Raises:
        ConfigError: the batch cannot be split over ``world`` processes, or an invalid strategy.
    """
    from opdgeo import distributed
    from opdgeo.training.batches import mini_batch_share, rank_micro_batches
    from opdgeo.training.precision import native_bf16

    world = world or distributed.launched_world()
    o = config.optim
    n_micro = o.batch_size // o.micro_batch_size
    per_rank = len(rank_micro_batches(n_micro, 0, world))
    mini_batch_share(n_micro, o, world)  # the same refusals as a launch
    from opdgeo.training.batches import generation_units, micro_batches_per_call

    generation_units(rank_micro_batches(n_micro, 0, world),
                     micro_batches_per_call(config.rollout.micro_batch_size, o,
                                            demonstrations=config.objective.demonstrations), world)
    strategy = distributed.resolve_strategy(config.distributed.strategy, world)
    if world > 1 and strategy == "none":
        from opdgeo.errors import ConfigError

        raise ConfigError(f"distributed.strategy: 'none' cannot train {world} processes; use ddp or fsdp")
    lines = [f"opdgeo train --dry-run: {config.objective.name}, {o.steps} steps, {config.run.out_dir}",
             f"  student {config.model.student}" + (f", teacher {config.model.teacher}" if uses_teacher(config) else ""),
             f"  batch {o.batch_size} prompts = {n_micro} micro-batches of {o.micro_batch_size}, "
             f"{per_rank} per process on {world} process(es), strategy {strategy}", ""]
    student = arch_of_source(config.model.student)
    teacher = arch_of_source(config.model.teacher) if uses_teacher(config) else None
    if student is None or (uses_teacher(config) and teacher is None):
        missing = config.model.student if student is None else config.model.teacher
        lines.append(f"memory: {missing} is not here to read its config.json; no estimate")
        return "\n".join(lines) + "\n"
    on_gpu = torch_cuda_available()
    settings = settings_from_config(config, world=world, native_bf16=native_bf16("cuda" if on_gpu else "cpu"))
    lines += format_plan(student, teacher, settings, title=f"memory per {'GPU' if on_gpu else 'process'}",
                         table_world=8)
    lines.append(f"  (prompt length {settings.prompt_tokens} tokens is an assumption)")
    c = config.checkpoint
    disk = plan_disk(student, steps=o.steps, every=c.every, dtype_bytes=_DTYPE_BYTES[c.dtype],
                     save_trainer_state=c.save_trainer_state, keep=c.keep_trainer_state,
                     keep_steps=c.keep_trainer_state_steps)
    lines += [""] + disk_lines(disk, keep=c.keep_trainer_state)
    return "\n".join(lines) + "\n"


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()
