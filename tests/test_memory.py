"""Memory options of training: chunked log-probs without saved logits, activation
checkpointing, the bf16 teacher; values against float64 references."""

import itertools

import pytest
import torch

from opdgeo.training.losses import linear_logprobs


def _saved_bytes(fn):
    """Bytes of the tensors autograd saves for backward while ``fn`` runs (distinct storages)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def test_chunked_logprobs_equal_the_float64_formula_and_save_no_logits():
    g = torch.Generator().manual_seed(0)
    R, h, V = 37, 16, 301
    hidden = torch.randn(R, h, generator=g, requires_grad=True)
    weight = torch.randn(V, h, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (R,), generator=g)
    for tau in (1.0, 0.7):
        ref = torch.log_softmax(hidden.detach().double() @ weight.detach().double().T / tau, dim=-1)
        ref = ref.gather(1, targets[:, None]).squeeze(1)
        # one tile, slices of every row (300: 301 = 300 + 1 columns), 2-D tiles (256-column
        # slices of 4 or 14 rows), one logit a tile (1 row x 256 columns)
        for elements in (R * V, R * 300, 14 * 256, 4 * 300, 1):
            out = linear_logprobs(hidden, weight, targets, chunk_elements=elements, temperature=tau)
            torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-5)
    # gradients equal the float64 autograd of the same formula
    upstream = torch.randn(R, generator=g)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    for tau in (1.0, 0.7):
        ref = (torch.log_softmax(h64 @ w64.T / tau, dim=-1).gather(1, targets[:, None]).squeeze(1) * upstream).sum()
        rh, rw = torch.autograd.grad(ref, (h64, w64))
        for elements in (R * V, R * 300, 14 * 256, 4 * 300, 1):
            out = linear_logprobs(hidden, weight, targets, chunk_elements=elements, temperature=tau)
            gh, gw = torch.autograd.grad((out * upstream).sum(), (hidden, weight))
            torch.testing.assert_close(gh.double(), rh, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-5)
    out, chunked = _saved_bytes(lambda: linear_logprobs(hidden, weight, targets, chunk_elements=4 * 300))
    # saved for backward: only the inputs and the [R] log-sum-exp; the plain formula keeps
    # [R, V] logits (and more)
    def plain():
        z = hidden @ weight.T
        return z.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)

    _, unchunked = _saved_bytes(plain)
    assert chunked <= (R * h + V * h) * 4 + R * 8 + R * 4 < unchunked
    assert unchunked >= R * V * 4
    with pytest.raises(ValueError, match="chunk_elements"):
        linear_logprobs(hidden, weight, targets, chunk_elements=0)
    for bad in (V, -1):  # a tile's clamped gather must not turn a bad id into a number
        with pytest.raises(ValueError, match=rf"targets must be token ids in \[0, {V}\)"):
            linear_logprobs(hidden, weight, targets.clone().index_fill_(0, torch.tensor([3]), bad), chunk_elements=R * 300)


def test_chunked_logprobs_backward_under_bf16_autocast_matches_autograd_of_the_formula():
    """The hand-written backward recomputes the projection under the forward's autocast
    state: under bf16 autocast its gradients equal autograd of the same formula under the
    same autocast (bf16 products, fp32 softmax) to bf16 rounding, and keep the inputs' dtypes."""
    g = torch.Generator().manual_seed(1)
    R, h, V = 29, 32, 257
    hidden = torch.randn(R, h, generator=g, requires_grad=True)
    weight = torch.randn(V, h, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (R,), generator=g)
    upstream = torch.randn(R, generator=g)
    # fp32 weights (none/ddp), and bf16 ones as FSDP2's mixed precision unshards them; one
    # tile, vocabulary slices of every row, 2-D tiles
    cases = [(w, e) for w in (weight, weight.detach().bfloat16().requires_grad_()) for e in (R * V, R * 256, 8 * 256)]
    for (weight, elements), tau in itertools.product(cases, (1.0, 0.6)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = linear_logprobs(hidden, weight, targets, chunk_elements=elements, temperature=tau)
            z = torch.nn.functional.linear(hidden, weight).float() / tau
            ref = z.gather(1, targets[:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)  # the same ops (chunks may sum in another order)
        gh, gw = torch.autograd.grad((out * upstream).sum(), (hidden, weight))
        rh, rw = torch.autograd.grad((ref * upstream).sum(), (hidden, weight))
        assert gh.dtype == hidden.dtype and gw.dtype == weight.dtype
        torch.testing.assert_close(gh, rh, rtol=2e-2, atol=2e-2 * rh.abs().max().item())
        torch.testing.assert_close(gw, rw, rtol=2e-2, atol=2e-2 * rw.abs().max().item())


def test_logprobs_without_gradient_read_the_same_bits_as_with_it():
    """Rollout-time log-probs (no gradient) and the loss's (with gradient) must agree exactly,
    so that the first PPO ratio is exactly 1: both run the same tiles, in fp32 and under
    bf16 autocast, and a tiling that splits the vocabulary stays within fp32 rounding of one
    that does not (the online log-sum-exp)."""
    g = torch.Generator().manual_seed(2)
    R, h, V = 41, 24, 700
    hidden = torch.randn(R, h, generator=g, requires_grad=True)
    weight = torch.randn(V, h, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (R,), generator=g)
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            whole = linear_logprobs(hidden, weight, targets, chunk_elements=R * V)
            for elements in (R * V, R * 256, 10 * 300, 1):
                graded = linear_logprobs(hidden, weight, targets, chunk_elements=elements)
                with torch.no_grad():
                    plain = linear_logprobs(hidden, weight, targets, chunk_elements=elements)
                assert graded.requires_grad and not plain.requires_grad
                assert torch.equal(graded.detach(), plain)
                torch.testing.assert_close(plain, whole.detach(), rtol=0, atol=1e-5)


def _tiny(seed=0):
    from opdgeo.models import build_model, char_tokenizer, tiny_qwen3_config

    return build_model(tiny_qwen3_config("quick", len(char_tokenizer())), seed=seed)


def _batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 40, (3, 14), generator=g)
    att = torch.ones_like(ids)
    att[0, :4] = 0  # left padding
    resp = torch.ones(3, 6, dtype=torch.bool)
    resp[1, 4:] = False
    return ids, att, resp


def test_sequence_logprobs_match_the_models_own_logits_in_float64():
    from opdgeo.training.rollout import sequence_logprobs, position_ids_from_mask

    model = _tiny().double()
    ids, att, resp = _batch()
    lp = sequence_logprobs(model, ids, att, resp, chunk_elements=50)  # several chunks of rows
    logits = model(input_ids=ids, attention_mask=att, position_ids=position_ids_from_mask(att)).logits
    ref = torch.log_softmax(logits[:, -7:-1], dim=-1).gather(2, ids[:, -6:, None]).squeeze(2)
    torch.testing.assert_close(lp, torch.where(resp, ref, torch.zeros_like(ref)), rtol=0, atol=1e-12)
    assert type(model.get_output_embeddings()).forward is model.get_output_embeddings().forward.__func__  # restored


def test_activation_checkpointing_same_gradients_less_saved_memory():
    from opdgeo.training.loop import activation_checkpointing_
    from opdgeo.training.rollout import sequence_logprobs

    ids, att, resp = _batch()

    def grads_and_saved(model):
        model.zero_grad(set_to_none=True)
        lp, saved = _saved_bytes(lambda: sequence_logprobs(model, ids, att, resp))
        lp.sum().backward()
        return {k: p.grad.clone() for k, p in model.named_parameters()}, saved

    plain, saved_plain = grads_and_saved(_tiny())
    ckpt_model = _tiny()
    activation_checkpointing_(ckpt_model)
    ckpt, saved_ckpt = grads_and_saved(ckpt_model)
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-6, atol=1e-7)
    assert saved_ckpt < 0.7 * saved_plain  # a measured ratio, asserted only as a direction
    with torch.no_grad():  # generation and scoring run the layers as they are
        _, saved = _saved_bytes(lambda: sequence_logprobs(ckpt_model, ids, att, resp))
    assert saved == 0


def test_teacher_dtype_auto_follows_native_bf16_and_is_frozen():
    from opdgeo.training.config import load_config
    from opdgeo.training.loop import inference_model, teacher_dtype
    from opdgeo.training.precision import native_bf16

    cpu = torch.device("cpu")
    assert teacher_dtype("auto", cpu) == (torch.bfloat16 if native_bf16(cpu) else torch.float32)
    assert teacher_dtype("bfloat16", cpu) == torch.bfloat16 and teacher_dtype("float32", cpu) == torch.float32
    cfg = load_config(None, ["model.student=tiny:quick", "model.teacher_dtype=bfloat16"])
    t = inference_model(_tiny(), cfg, cpu)
    assert not t.training and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in t.parameters())


def test_teacher_under_fsdp_is_sharded_and_scores_as_the_whole_model():
    """``inference_model`` under ``fsdp`` (a process group of one here; the 2-process OPD
    step in test_train_ddp checks the scores across ranks): FSDP2 shards in the teacher
    dtype, marked so that transformers' ``generate`` syncs the ranks, same log-probs."""
    import dataclasses

    from torch.distributed.tensor import DTensor
    from transformers.distributed.fsdp import is_fsdp_managed_module

    from opdgeo import distributed
    from opdgeo.training.config import load_config
    from opdgeo.training.loop import inference_model
    from opdgeo.training.rollout import sequence_logprobs

    cfg = load_config(None, ["model.student=tiny:quick", "model.teacher_dtype=float32"])
    cpu = torch.device("cpu")
    whole = inference_model(_tiny(), cfg, cpu)
    ids = torch.randint(0, whole.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    att, resp = torch.ones_like(ids), torch.ones(2, 5, dtype=torch.bool)
    with torch.no_grad():
        ref = sequence_logprobs(whole, ids, att, resp)
    ctx = distributed.init(single_process_group=True)
    try:
        fsdp_cfg = dataclasses.replace(cfg, distributed=dataclasses.replace(cfg.distributed, strategy="fsdp"))
        sharded = inference_model(_tiny(), fsdp_cfg, cpu)
        assert all(isinstance(p, DTensor) and not p.requires_grad for p in sharded.parameters())
        assert is_fsdp_managed_module(sharded) and distributed.is_sharded(sharded)
        with torch.no_grad():
            got = sequence_logprobs(sharded, ids, att, resp)
    finally:
        distributed.destroy(ctx)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
