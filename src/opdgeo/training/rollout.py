"""Batched sampling with HF ``generate`` and per-token log-probs of sampled responses.

``generate`` returns a ``Rollout``: left-padded prompts followed by right-padded
responses, the response mask (EOS included, everything after it excluded) and the
behaviour policy's log-probs of the sampled tokens (SPEC §3: the student log-prob is
taken at rollout time, without gradient). ``sequence_logprobs`` is the one function that
scores responses; training recomputes log-probs with it too, so at the first inner step
the importance ratio is exactly exp(0) = 1 for identical weights and batch shapes.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from opdgeo.errors import ConfigError


@dataclass(frozen=True)
class Rollout:
    """Sampled responses of a batch of prompts. N = len(prompts) · num_samples,
    P = longest prompt (tokens), T = longest response (≤ max_new_tokens)."""

    input_ids: torch.Tensor
    """[N, P+T] long: prompt left-padded to P, then the response right-padded to T."""
    attention_mask: torch.Tensor
    """[N, P+T] long: 1 on prompt tokens and on response tokens (through EOS), 0 on padding."""
    response_mask: torch.Tensor
    """[N, T] bool: True on response tokens, the first EOS included; False after it."""
    response_ids: torch.Tensor
    """[N, T] long: ``input_ids[:, P:]`` (pad id where ``response_mask`` is False)."""
    behaviour_logprobs: torch.Tensor | None
    """[N, T] float32 (None when ``generate(score=False)``): log π(a_t | s_t) of each sampled token under the distribution it was
    sampled from, log softmax(z / τ) at the sampling temperature τ (τ = 1 for greedy;
    ``sequence_logprobs``), 0 where ``response_mask`` is False."""
    texts: list[str]
    """N decoded responses (up to, not including, EOS; special tokens skipped)."""
    prompt_index: torch.Tensor
    """[N] long: which prompt each row answers (rows are prompt-major: 0,0,..,1,1,..)."""
    prompt_len: int
    """P: response token t of row i sits at ``input_ids[i, P + t]``."""
    finished: torch.Tensor
    """[N] bool: the response ended with EOS (False: truncated at max_new_tokens)."""

    @property
    def num_samples(self) -> int:
        """Samples per prompt (G)."""
        return int((self.prompt_index == self.prompt_index[0]).sum()) if len(self.prompt_index) else 0


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ConfigError("rollout: neither the model's generation config nor the tokenizer defines an EOS token")
    return ids


def _response_mask(tokens: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of tokens up to and including the first EOS, and whether an EOS occurred. [N, T]."""
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device))
    # number of EOS strictly before position t; a token is in the response iff that is 0
    before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()
    return before == 0, is_eos.any(dim=1)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting only attended tokens: cumsum(mask) − 1, clamped at 0 on left padding.

    The same positions HF ``generate`` uses for left-padded batches, so a full forward pass
    scores exactly the sequence that was sampled.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor, *, temperature: float = 1.0,
                      chunk_elements: int = 2**24) -> torch.Tensor:
    """Per-token log-probs of the response tokens: log softmax(z_t / τ)[a_t].

    For response token t of row i (at ``input_ids[i, P+t]``, P = L − T) the logits come
    from position P+t−1 (only the last T+1 positions reach the head, ``logits_to_keep``).
    The output head itself is replaced, for this call, by ``losses.linear_logprobs``:
    gathered logit − logsumexp over the vocabulary in float32, in tiles of at most
    ``chunk_elements`` logits, each recomputed in backward, so neither the [N, T, V]
    logits nor their float32 log-softmax are ever held for backward (V = 49k for SmolLM2,
    152k for Qwen3).
    Differentiable (no ``no_grad`` here; callers decide).

    Args:
        model: causal LM (HF ``PreTrainedModel``).
        input_ids: [N, L] long, prompt then response (response = last T columns).
        attention_mask: [N, L] 0/1.
        response_mask: [N, T] bool; T ≥ 1 and T < L.
        temperature: τ > 0; SPEC §3 scores student and teacher at τ = 1.

    Returns:
        [N, T] float32; 0 where ``response_mask`` is False.
    """
    if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
        raise ValueError(f"input_ids and attention_mask must be [N, L]; got {tuple(input_ids.shape)}, "
                         f"{tuple(attention_mask.shape)}")
    N, L = input_ids.shape
    if response_mask.dim() != 2 or response_mask.shape[0] != N or not 0 < response_mask.shape[1] < L:
        raise ValueError(f"response_mask must be [N, T] with 0 < T < L = {L}; got {tuple(response_mask.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    T = response_mask.shape[1]
    targets = input_ids[:, L - T:]  # [N, T]: position P+t-1 predicts token P+t
    with _head_as_logprobs(model, targets, chunk_elements=chunk_elements, temperature=temperature):
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    position_ids=position_ids_from_mask(attention_mask), logits_to_keep=T + 1, use_cache=False)
    logp = out.logits  # [N, T]: the output head returned log-probs, not logits
    return torch.where(response_mask.bool(), logp, torch.zeros((), dtype=logp.dtype, device=logp.device))


@contextlib.contextmanager
def _head_as_logprobs(model, targets: torch.Tensor, *, chunk_elements: int, temperature: float):
    """Within the block, the model's output head returns the sampled tokens' log-probs
    ``[N, T]`` (``losses.linear_logprobs``: tiles of ``chunk_elements`` logits, each
    recomputed in backward) instead of ``[N, T+1, V]`` logits. The head still runs inside
    the model's forward, so DDP and FSDP2 see an ordinary forward (FSDP2's unsharded weight)."""
    from opdgeo.training.losses import linear_logprobs

    inner = getattr(model, "module", model)
    if getattr(inner.config, "final_logit_softcapping", None):
        raise ConfigError(f"{type(inner).__name__}: logit soft-capping is applied after the output head; "
                          "sequence_logprobs does not support it")
    head = inner.get_output_embeddings()
    N, T = targets.shape

    def forward(hidden: torch.Tensor) -> torch.Tensor:  # hidden [N, T+1, h]
        h = hidden[:, :-1, :].reshape(N * T, hidden.shape[-1])  # [N*T, h]
        return linear_logprobs(h, head.weight, targets.reshape(N * T), chunk_elements=chunk_elements,
                               temperature=temperature).reshape(N, T)

    head.forward = forward
    try:
        yield
    finally:
        del head.forward  # back to the class's forward


def _check_args(prompts, num_samples, temperature, max_new_tokens, batch_size):
    problems = []
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) and p for p in prompts):
        problems.append("prompts must be a non-empty list of non-empty strings")
    if not isinstance(num_samples, int) or num_samples < 1:
        problems.append(f"num_samples must be a positive integer; got {num_samples!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        problems.append(f"max_new_tokens must be a positive integer; got {max_new_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size must be a positive integer; got {batch_size!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        problems.append(f"temperature must be a finite number >= 0; got {temperature!r}")
    if problems:
        raise ConfigError("rollout: " + "; ".join(problems))


# Every GenerationConfig field that shapes the next-token distribution or the stopping
# rule, at its neutral value. ``generate`` fills a field left None from the model's own
# ``generation_config`` (transformers 5), so leaving one out would let a checkpoint's
# ``repetition_penalty`` or ``top_k`` change the samples: each is set here explicitly.
_NEUTRAL_SAMPLING = {
    # generation is greedy over InverseCdfSampler's one-hot scores (do_sample=False), under which
    # transformers builds no warper; top_k/min_p stay unset (a set value only draws a warning)
    "top_k": None, "top_p": 1.0, "min_p": None, "top_h": None, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "length_penalty": 1.0,
    "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None,
    "renormalize_logits": False, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "remove_invalid_values": False, "exponential_decay_length_penalty": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "sequence_bias": None, "guidance_scale": None, "watermarking_config": None,
    "min_length": 0, "max_time": None, "stop_strings": None, "num_beams": 1,
    "num_beam_groups": 1, "diversity_penalty": 0.0, "penalty_alpha": None, "dola_layers": None,
    "num_return_sequences": 1, "output_scores": False, "output_logits": False, "return_dict_in_generate": False,
    "token_healing": False, "prompt_lookup_num_tokens": None, "cache_implementation": None,
}


def neutral_generation_config(*, max_new_tokens: int, eos_ids: list[int], pad_id: int):
    """A ``GenerationConfig`` that decodes greedily over the scores it is given and changes
    nothing else: sampling happens in ``InverseCdfSampler`` (a logits processor whose
    one-hot scores greedy decoding takes; ``sample_chunk`` adds it unless τ = 0, which is
    then plain greedy decoding of the logits).

    Every field that could reshape the distribution (top-k/top-p/min-p/typical/epsilon/eta
    truncation, repetition and n-gram penalties, suppressed, forced or biased tokens,
    minimum lengths, beams, watermarking, guidance) is set to its neutral value, so nothing
    is inherited from a model's ``generation_config``; ``generate`` additionally swaps the
    model's own config for an empty one during the call.
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False, temperature=None, max_new_tokens=max_new_tokens,
        max_length=None, eos_token_id=list(eos_ids), pad_token_id=pad_id, use_cache=True, **_NEUTRAL_SAMPLING)


class InverseCdfSampler:
    """A ``generate`` logits processor that draws the next token of every row from
    softmax(z / τ) by inversion: p = softmax(z / τ) (float32), c = cumsum(p) in float64,
    u ~ U[0, 1) from torch's generator, token = the first index with c > u·c_V. It returns
    scores that are 0 at the drawn token and −inf elsewhere, so greedy decoding takes it.

    Exact ancestral sampling (up to the float32 probabilities), with one uniform per row and
    token instead of ``torch.multinomial``'s one exponential per vocabulary entry: on a CPU
    that draw cost ~7 ms per token for 8 rows of a 49k vocabulary, about 7 % of decoding.
    A token of probability 0 is never drawn.
    """

    def __init__(self, temperature: float):
        self.temperature = float(temperature)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        p = torch.softmax(scores.float() / self.temperature, dim=-1)
        c = p.double().cumsum(dim=-1)
        u = torch.rand(c.shape[0], 1, dtype=torch.float64, device=c.device) * c[:, -1:]
        token = torch.searchsorted(c, u, right=True).clamp_(max=c.shape[1] - 1)
        out = torch.full_like(scores, -math.inf)
        return out.scatter_(1, token, 0.0)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, num_samples: int = 1, temperature: float = 1.0,
             max_new_tokens: int = 64, seed: int = 0, batch_size: int = 64, score: bool = True,
             share_prompts: bool = True) -> Rollout:
    """Sample ``num_samples`` responses per prompt with HF ``generate`` and score them.

    Sampling is plain ancestral sampling from softmax(z / temperature), exactly: each token
    is drawn by ``InverseCdfSampler`` under ``neutral_generation_config`` (no
    top-k/top-p/min-p, no repetition or n-gram penalty, nothing taken from the model's
    ``generation_config``; ``temperature == 0`` means greedy), with the KV cache, stopping a row at its first EOS
    (EOS counts as a response token; later tokens are masked). Rows are processed in
    chunks of ``batch_size`` sequences; chunk c is sampled after ``torch.manual_seed(seed + c)``
    inside ``fork_rng`` (the caller's RNG state is untouched), so results are reproducible
    on CPU for a fixed (seed, batch_size).

    ``share_prompts``: the rows of a chunk that answer the same prompt share one prefill of
    it (`sample_chunk`): the prompt's KV cache is computed once and copied to its rows, so
    the G samples of a group cost one prompt forward, not G. The samples come from the
    same distribution either way (the cache holds the same keys and values, up to float
    rounding of a different batch shape); False is the reference path (every row
    prefilled by ``generate`` itself).

    ``behaviour_logprobs`` are recomputed after sampling by ``sequence_logprobs`` (one
    no-grad forward, chunked like sampling) at the sampling temperature, i.e. they are the
    log-probs of the distribution the tokens were drawn from, log softmax(z / τ)[a_t]
    (τ = 1 for greedy, which has no sampling distribution). They are not taken from the
    sampler's scores: at τ = 1 they then equal, bit for bit on CPU, what training
    recomputes for the same weights. (Training refuses ``rollout.temperature != 1``:
    SPEC §3 scores the policy and the teacher at τ = 1, so a tempered sampler would make
    the run off-policy.)

    Args:
        model: causal LM; put in eval mode during the call, its mode restored after.
        tokenizer: its tokenizer (prompts are tokenized without adding special tokens:
            chat templates already contain them).
        prompts: B prompt strings.
        num_samples: G samples per prompt.
        temperature: sampling temperature (0 → greedy).
        max_new_tokens: response length cap.
        seed: sampling seed.
        batch_size: sequences per ``generate`` call.
        score: compute ``behaviour_logprobs`` (one no-grad forward per chunk); False leaves
            them None, for callers that need only the samples (evaluation, rejection
            sampling, an on-policy step whose loss forward gives the old log-probs).
        share_prompts: one prefill per distinct prompt of a chunk (see above).

    Returns:
        ``Rollout`` with N = B·G rows, prompt-major.

    Raises:
        ConfigError: invalid arguments, or no EOS/pad token.
    """
    _check_args(prompts, num_samples, temperature, max_new_tokens, batch_size)
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    device = next(model.parameters()).device
    gen_config = neutral_generation_config(max_new_tokens=max_new_tokens,
                                           eos_ids=eos_ids, pad_id=pad_id)
    encoded = _encode(tokenizer, prompts)
    rows = [i for i in range(len(prompts)) for _ in range(num_samples)]  # prompt-major
    starts = range(0, len(rows), batch_size)
    with _sampling_mode(model):
        responses = [sample_chunk(model, [encoded[i] for i in rows[start:start + batch_size]], gen_config,
                                  pad_id=pad_id, seed=seed + c, device=device, share_prompts=share_prompts,
                                  temperature=temperature)
                     for c, start in enumerate(starts)]
        batch = _assemble(encoded, rows, responses, batch_size=batch_size, pad_id=pad_id, eos_ids=eos_ids)
        behaviour_logprobs = None
        if score:
            tau = float(temperature) if temperature > 0 else 1.0  # the distribution sampled from
            behaviour_logprobs = torch.cat([
                sequence_logprobs(model, batch["input_ids"][sl].to(device), batch["attention_mask"][sl].to(device),
                                  batch["response_mask"][sl].to(device), temperature=tau).float().cpu()
                for sl in (slice(start, start + batch_size) for start in starts)])
    texts = _texts(tokenizer, batch["response_ids"], batch["response_mask"], eos_ids)
    return Rollout(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   response_mask=batch["response_mask"], response_ids=batch["response_ids"],
                   behaviour_logprobs=behaviour_logprobs, texts=texts, prompt_index=torch.tensor(rows, dtype=torch.long),
                   prompt_len=batch["prompt_len"], finished=batch["finished"])


def _encode(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt (no special tokens added: chat templates contain them)."""
    encoded = [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise ConfigError(f"rollout: prompt {i} tokenizes to nothing")
    return encoded


@contextlib.contextmanager
def _sampling_mode(model):
    """Eval mode and an empty ``generation_config`` (nothing of the model's own is merged
    into the neutral one) for the block; both restored after."""
    from transformers import GenerationConfig

    was_training = model.training
    own_config = model.generation_config
    model.eval()
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = own_config
        model.train(was_training)


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[b, P]`` ids and 0/1 mask of the prompts, left-padded to the longest."""
    P = max(len(ids) for ids in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, P - len(p):] = torch.tensor(p)
        mask[r, P - len(p):] = 1
    return ids, mask


def sample_chunk(model, prompts: list[list[int]], gen_config, *, pad_id: int, seed: int, device: torch.device,
                 share_prompts: bool = True, temperature: float = 1.0) -> torch.Tensor:
    """One ``generate`` call over the rows ``prompts`` (token ids); ``[b, T_c]`` response ids,
    sampled at ``temperature`` (``InverseCdfSampler``; 0: greedy).

    With ``share_prompts`` and rows repeating a prompt (every prompt at least two tokens
    long), every distinct prompt but its last token is run through the model once, its
    KV cache (a ``DynamicCache``) copied to each of its rows, and ``generate`` continues
    from that cache: it computes only the last prompt token and the new ones. Left padding
    and positions are those of the full batch (``position_ids_from_mask``), so each row
    sees the cache it would have computed itself.
    """
    ids, mask = _left_padded(prompts, pad_id)
    kwargs = {}
    if temperature:
        from transformers import LogitsProcessorList

        kwargs["logits_processor"] = LogitsProcessorList([InverseCdfSampler(temperature)])
    first = {}
    for r, p in enumerate(prompts):
        first.setdefault(tuple(p), r)
    if share_prompts and len(first) < len(prompts) and min(len(p) for p in prompts) >= 2:
        from transformers import DynamicCache

        distinct = torch.tensor(list(first.values()))
        cache = DynamicCache()
        head_ids, head_mask = ids[distinct, :-1].to(device), mask[distinct, :-1].to(device)
        model(input_ids=head_ids, attention_mask=head_mask, position_ids=position_ids_from_mask(head_mask),
              cache=cache, use_cache=True, logits_to_keep=1)
        slot = {r: k for k, r in enumerate(first.values())}
        cache.batch_select_indices(torch.tensor([slot[first[tuple(p)]] for p in prompts], device=device))
        kwargs["cache"] = cache
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device]):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_config,
                             **kwargs)
    return out[:, ids.shape[1]:].cpu()


def _assemble(encoded: list[list[int]], rows: list[int], responses: list[torch.Tensor], *, batch_size: int,
              pad_id: int, eos_ids: list[int]) -> dict:
    """The rollout's tensors: prompts left-padded to P, responses right-padded to T and
    masked after their first EOS (pad id there), the attention and response masks."""
    N, P = len(rows), max(len(ids) for ids in encoded)
    T = max(r.shape[1] for r in responses)
    response_ids = torch.full((N, T), pad_id, dtype=torch.long)
    for start, r in zip(range(0, N, batch_size), responses):
        response_ids[start:start + r.shape[0], : r.shape[1]] = r
    response_mask, finished = _response_mask(response_ids, eos_ids)  # [N, T]
    response_ids = torch.where(response_mask, response_ids, torch.full_like(response_ids, pad_id))
    prompt_ids, prompt_mask = _left_padded([encoded[i] for i in rows], pad_id)  # [N, P]
    input_ids = torch.cat([prompt_ids, response_ids], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask,
            "response_ids": response_ids, "finished": finished, "prompt_len": P}


def _texts(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor, eos_ids: list[int]) -> list[str]:
    """Decoded responses, up to (not including) EOS, special tokens skipped."""
    texts = []
    for r in range(response_ids.shape[0]):
        keep = response_ids[r][response_mask[r]].tolist()
        if keep and keep[-1] in eos_ids:
            keep = keep[:-1]
        texts.append(tokenizer.decode(keep, skip_special_tokens=True))
    return texts
