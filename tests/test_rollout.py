"""Rollout: HF generate wrapper, EOS masking, reproducibility, greedy, per-token log-probs."""

from __future__ import annotations

import pytest
import torch

from opdgeo.errors import ConfigError
from opdgeo.models import build_model, char_tokenizer, tiny_qwen3_config
from opdgeo.training.rollout import _response_mask, generate, sequence_logprobs

PROMPTS = ["12+34=\n", "5*6=\n", "123-456=\n"]




@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return build_model(tiny_qwen3_config("quick", len(tok)), seed=0)


def manual_logprobs(model, tok, ro, row, temperature=1.0):
    """Reference: the row's own tokens without any padding, one float64 log_softmax per position."""
    prompt = ro.input_ids[row, : ro.prompt_len][ro.attention_mask[row, : ro.prompt_len].bool()]
    resp = ro.response_ids[row][ro.response_mask[row]]
    seq = torch.cat([prompt, resp])[None]
    with torch.no_grad():
        logits = model(seq).logits[0].double() / temperature
    logp = torch.log_softmax(logits, -1)
    n = len(prompt)
    return torch.stack([logp[n + t - 1, resp[t]] for t in range(len(resp))])


def test_response_mask_known_answer():
    tokens = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 0, 0, 0], [4, 4, 1, 1]])
    mask, finished = _response_mask(tokens, [1])
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False],
                             [True, True, True, False]]
    assert finished.tolist() == [True, False, True, True]
    mask2, _ = _response_mask(tokens, [1, 8])  # several EOS ids
    assert mask2[1].tolist() == [True] * 4 and mask2[0].tolist() == [True, True, False, False]


def test_shapes_padding_and_prompt_index(model, tok):
    ro = generate(model, tok, PROMPTS, num_samples=2, temperature=1.0, max_new_tokens=12, seed=0, batch_size=4)
    N, P = 6, len("123-456=\n")
    T = ro.response_ids.shape[1]
    assert ro.prompt_len == P and ro.input_ids.shape == (N, P + T) and T <= 12
    assert ro.attention_mask.shape == (N, P + T) and ro.response_mask.shape == (N, T)
    assert ro.response_mask.dtype == torch.bool and ro.behaviour_logprobs.dtype == torch.float32
    assert ro.prompt_index.tolist() == [0, 0, 1, 1, 2, 2] and ro.num_samples == 2
    for row, i in enumerate(ro.prompt_index.tolist()):
        ids = tok(PROMPTS[i], add_special_tokens=False)["input_ids"]
        pad = P - len(ids)
        assert ro.input_ids[row, :pad].eq(tok.pad_token_id).all() and ro.attention_mask[row, :pad].eq(0).all()
        assert ro.input_ids[row, pad:P].tolist() == ids and ro.attention_mask[row, pad:P].eq(1).all()
    assert torch.equal(ro.input_ids[:, P:], ro.response_ids)
    assert torch.equal(ro.attention_mask[:, P:].bool(), ro.response_mask)


def test_eos_masking_and_texts(model, tok):
    # temperature 4 makes sampling almost uniform over 99 tokens: EOS shows up in some rows
    ro = generate(model, tok, PROMPTS, num_samples=16, temperature=4.0, max_new_tokens=40, seed=1, batch_size=48)
    eos = tok.eos_token_id
    ended = ro.finished.nonzero().flatten().tolist()
    assert 3 <= len(ended) < len(ro.texts)  # both kinds present
    for row in range(len(ro.texts)):
        ids, mask = ro.response_ids[row], ro.response_mask[row]
        if row in ended:
            first = (ids == eos).nonzero()[0].item()
            assert mask[: first + 1].all() and not mask[first + 1:].any()  # EOS counted, rest masked
            assert ids[first + 1:].eq(tok.pad_token_id).all()
            assert ro.behaviour_logprobs[row, first + 1:].eq(0).all()
            assert ro.behaviour_logprobs[row, first] < 0
        else:
            assert mask.sum() == 40 and eos not in ids.tolist()  # truncated at max_new_tokens
        visible = [t for t in ids[mask].tolist() if t not in tok.all_special_ids]
        assert ro.texts[row] == tok.decode(visible)


def test_behaviour_logprobs_equal_manual_per_token_computation(model, tok):
    ro = generate(model, tok, PROMPTS, num_samples=3, temperature=0.7, max_new_tokens=16, seed=2, batch_size=4)
    for row in range(len(ro.texts)):
        ref = manual_logprobs(model, tok, ro, row, temperature=0.7)  # the distribution sampled from
        got = ro.behaviour_logprobs[row][ro.response_mask[row]].double()
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
        assert not torch.allclose(got, manual_logprobs(model, tok, ro, row), atol=1e-3)  # not the τ = 1 ones
    assert ro.behaviour_logprobs[~ro.response_mask].eq(0).all()


def test_sequence_logprobs_temperature_chunking_and_gradient(model, tok):
    ro = generate(model, tok, PROMPTS, num_samples=2, temperature=1.0, max_new_tokens=10, seed=3, batch_size=8)
    args = (ro.input_ids, ro.attention_mask, ro.response_mask)
    with torch.no_grad():
        hot = sequence_logprobs(model, *args, temperature=2.0)
        whole = sequence_logprobs(model, *args)
        chunked = sequence_logprobs(model, *args, chunk_elements=99 * 3)  # 3 rows of logits at a time
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(whole, ro.behaviour_logprobs, rtol=0, atol=1e-5)
    for row in range(len(ro.texts)):
        ref = manual_logprobs(model, tok, ro, row, temperature=2.0)
        torch.testing.assert_close(hot[row][ro.response_mask[row]].double(), ref, rtol=0, atol=2e-5)
    model.zero_grad()
    lp = sequence_logprobs(model, *args)
    assert lp.requires_grad
    lp[ro.response_mask].sum().backward()
    grad = model.model.embed_tokens.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad()


def test_reproducible_with_seed_and_rng_untouched(model, tok):
    kw = dict(num_samples=4, temperature=1.0, max_new_tokens=12, batch_size=5)
    torch.manual_seed(99)
    state = torch.get_rng_state()
    a = generate(model, tok, PROMPTS, seed=7, **kw)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate(model, tok, PROMPTS, seed=7, **kw)
    c = generate(model, tok, PROMPTS, seed=8, **kw)
    assert torch.equal(a.input_ids, b.input_ids) and a.texts == b.texts
    assert torch.equal(a.behaviour_logprobs, b.behaviour_logprobs)
    assert not torch.equal(a.response_ids, c.response_ids)
    assert not model.training


def test_greedy_is_argmax_and_ignores_seed(model, tok):
    ro = generate(model, tok, PROMPTS, num_samples=2, temperature=0, max_new_tokens=10, seed=0, batch_size=6)
    other = generate(model, tok, PROMPTS, num_samples=1, temperature=0.0, max_new_tokens=10, seed=5, batch_size=1)
    assert ro.texts[::2] == ro.texts[1::2] == other.texts
    for row in range(0, 6, 2):
        prompt = ro.input_ids[row, : ro.prompt_len][ro.attention_mask[row, : ro.prompt_len].bool()]
        resp = ro.response_ids[row][ro.response_mask[row]]
        seq = torch.cat([prompt, resp])[None]
        with torch.no_grad():
            logits = model(seq).logits[0]
        n = len(prompt)
        assert resp.tolist() == logits[n - 1: n - 1 + len(resp)].argmax(-1).tolist()


def test_sampling_is_unrestricted_softmax(model, tok):
    """No hidden top-k / top-p: 3000 one-token samples match softmax(logits) (all 99 tokens reachable)."""
    ro = generate(model, tok, ["1"], num_samples=3000, temperature=1.0, max_new_tokens=1, seed=0, batch_size=3000)
    with torch.no_grad():
        p = torch.softmax(model(torch.tensor([tok("1")["input_ids"]])).logits[0, -1].double(), -1)
    emp = torch.bincount(ro.response_ids[:, 0], minlength=len(tok)).double() / 3000
    assert ro.response_ids[:, 0].unique().numel() > 80  # top_k=50 would cap this at 50
    assert 0.5 * (emp - p).abs().sum() < 0.11  # expected ≈ 0.07 for 3000 draws over ~99 near-uniform cells
    # at temperature 0.1 the draw follows softmax(z / 0.1), far (TV ≈ 0.49) from softmax(z)
    cold = generate(model, tok, ["1"], num_samples=3000, temperature=0.1, max_new_tokens=1, seed=0, batch_size=3000)
    with torch.no_grad():
        pc = torch.softmax(model(torch.tensor([tok("1")["input_ids"]])).logits[0, -1].double() / 0.1, -1)
    emp_c = torch.bincount(cold.response_ids[:, 0], minlength=len(tok)).double() / 3000
    assert 0.5 * (emp_c - pc).abs().sum() < 0.08 and 0.5 * (emp_c - p).abs().sum() > 0.35


def test_bad_arguments_listed_at_once(model, tok):
    with pytest.raises(ConfigError, match="num_samples.*max_new_tokens.*temperature"):
        generate(model, tok, PROMPTS, num_samples=0, temperature=-1.0, max_new_tokens=0, seed=0, batch_size=2)
    with pytest.raises(ConfigError, match="prompts"):
        generate(model, tok, [], num_samples=1, temperature=1.0, max_new_tokens=4, seed=0, batch_size=2)


def test_model_generation_config_cannot_change_samples_or_logprobs(model, tok):
    """A checkpoint whose generation_config sets penalties and truncation samples exactly as
    the neutral model: same tokens for the same seed, log-probs of softmax(z) in float64."""
    import copy

    odd = copy.deepcopy(model)
    gc = odd.generation_config
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.top_k, gc.min_p = 3.0, 1, 3, 0.3
    gc.top_p, gc.typical_p, gc.temperature, gc.do_sample = 0.5, 0.5, 0.3, False
    gc.suppress_tokens, gc.min_new_tokens = [5, 6, 7], 4
    kw = dict(num_samples=6, temperature=1.0, max_new_tokens=12, seed=5, batch_size=9)
    ref = generate(model, tok, PROMPTS, **kw)
    got = generate(odd, tok, PROMPTS, **kw)
    assert odd.generation_config.repetition_penalty == 3.0  # the model's own config is restored
    assert torch.equal(got.response_ids, ref.response_ids) and torch.equal(got.response_mask, ref.response_mask)
    assert torch.equal(got.behaviour_logprobs, ref.behaviour_logprobs)
    # the neutral samples do what those settings forbid: repeat a token, use suppressed ones
    resp = [ref.response_ids[r][ref.response_mask[r]].tolist() for r in range(len(ref.texts))]
    assert any(len(set(x)) < len(x) for x in resp)
    assert any(t in (5, 6, 7) for x in resp for t in x)
    for row in range(len(ref.texts)):
        lp = ref.behaviour_logprobs[row][ref.response_mask[row]].double()
        torch.testing.assert_close(lp, manual_logprobs(model, tok, ref, row), atol=2e-5, rtol=0)



def test_score_false_gives_the_same_samples_without_logprobs(model, tok):
    kw = dict(num_samples=2, temperature=1.0, max_new_tokens=8, seed=4, batch_size=6)
    a, b = generate(model, tok, PROMPTS, **kw), generate(model, tok, PROMPTS, score=False, **kw)
    assert torch.equal(a.response_ids, b.response_ids) and b.behaviour_logprobs is None


def test_shared_prompt_prefill_samples_like_the_reference_path(model, tok):
    """A group's rows share one prefill of their prompt; generate then runs only the last
    prompt token and the new ones, and the samples and log-probs are the reference path's."""
    kw = dict(num_samples=4, temperature=1.0, max_new_tokens=12, seed=3, batch_size=6)
    shapes = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)),
                                           with_kwargs=True)
    try:
        shared = generate(model, tok, PROMPTS, **kw)
    finally:
        hook.remove()
    ref = generate(model, tok, PROMPTS, share_prompts=False, **kw)
    assert torch.equal(shared.response_ids, ref.response_ids) and torch.equal(shared.response_mask, ref.response_mask)
    assert torch.equal(shared.behaviour_logprobs, ref.behaviour_logprobs)
    # chunk 0 holds rows of prompts 0 (x4) and 1 (x2): one prefill of the 2 distinct prompts
    # without their last token, then generate's first forward sees one token per row
    p0 = max(len(PROMPTS[0]), len(PROMPTS[1]))
    assert shapes[0] == (2, p0 - 1) and shapes[1] == (6, 1)
    greedy = dict(kw, temperature=0.0)
    assert torch.equal(generate(model, tok, PROMPTS, **greedy).response_ids,
                       generate(model, tok, PROMPTS, share_prompts=False, **greedy).response_ids)


def test_split_micro_batches_trims_each_part_to_its_own_padding(model, tok):
    from opdgeo.training.stages import MicroBatch, split_micro_batches

    prompts = ["1+2=\n", "123-456=\n", "7*8=\n", "99+1=\n"]  # the long prompt sits in the first part only
    ro = generate(model, tok, prompts, num_samples=2, max_new_tokens=12, seed=4, batch_size=8)
    mb = MicroBatch(input_ids=ro.input_ids, attention_mask=ro.attention_mask, response_mask=ro.response_mask.bool(),
                    problem_index=ro.prompt_index, texts=tuple(ro.texts), behaviour_logprobs=ro.behaviour_logprobs)
    parts = split_micro_batches(mb, 2)
    assert [len(p.texts) for p in parts] == [4, 4] and split_micro_batches(mb, 1) == [mb]
    P, T = ro.prompt_len, ro.response_mask.shape[1]
    for i, part in enumerate(parts):
        rows = slice(4 * i, 4 * i + 4)
        p_len = part.input_ids.shape[1] - part.response_mask.shape[1]
        # the part's own layout: its longest prompt and its longest response, no wider
        assert p_len == max(len(tok(prompts[2 * i + j // 2], add_special_tokens=False)["input_ids"]) for j in range(4))
        assert part.response_mask.shape[1] == int(ro.response_mask[rows].sum(1).max()) <= T
        assert part.attention_mask[:, 0].any() and part.response_mask[:, -1].any()
        for r in range(4):  # every row keeps its tokens, masks and log-probs
            full = 4 * i + r
            keep = ro.attention_mask[full].bool()
            assert torch.equal(part.input_ids[r][part.attention_mask[r].bool()], ro.input_ids[full][keep])
            resp = part.response_mask[r]
            assert torch.equal(part.input_ids[r, p_len:][resp], ro.input_ids[full, P:][ro.response_mask[full]])
            assert torch.equal(part.behaviour_logprobs[r][resp], ro.behaviour_logprobs[full][ro.response_mask[full]])
        assert torch.equal(part.problem_index, ro.prompt_index[rows]) and part.texts == tuple(ro.texts[rows])
        # the trimmed layout scores the same log-probs (positions follow the mask, not the padding)
        got = sequence_logprobs(model, part.input_ids, part.attention_mask, part.response_mask)
        torch.testing.assert_close(got[part.response_mask], ro.behaviour_logprobs[rows][ro.response_mask[rows]],
                                   rtol=0, atol=2e-5)
    with pytest.raises(ValueError, match="do not split"):
        split_micro_batches(mb, 3)


def test_inverse_cdf_sampler_draws_from_the_softmax():
    from opdgeo.training.rollout import InverseCdfSampler

    p = torch.tensor([0.5, 0.3, 0.2 - 1e-4, 1e-4, 0.0])
    scores = torch.log(p).repeat(40000, 1)  # -inf at the last token: probability 0
    torch.manual_seed(3)
    out = InverseCdfSampler(1.0)(None, scores)
    assert out.isfinite().sum(1).eq(1).all() and out.max(1).values.eq(0).all()  # one-hot: greedy takes the draw
    counts = torch.bincount(out.argmax(1), minlength=5).double()
    expected = 40000 * p.double()
    assert counts[4] == 0 and counts[3] > 0
    # chi-square over the four reachable tokens (3 dof): < 16.3 with probability 0.999
    assert float(((counts[:4] - expected[:4]) ** 2 / expected[:4]).sum()) < 16.3
    # at temperature 2 the draw follows softmax(log p / 2) ∝ sqrt(p)
    torch.manual_seed(4)
    hot = torch.bincount(InverseCdfSampler(2.0)(None, scores).argmax(1), minlength=5).double()
    q = p.double().sqrt() / p.double().sqrt().sum()
    assert float(((hot[:4] - 40000 * q[:4]) ** 2 / (40000 * q[:4])).sum()) < 16.3
    torch.manual_seed(3)
    assert torch.equal(InverseCdfSampler(1.0)(None, scores), out)  # seeded by torch's generator
