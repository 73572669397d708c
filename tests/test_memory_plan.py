"""The memory plan (``opdgeo.training.memory_plan``): closed-form parameter counts against
meta-device models built from the real configs, the activation count against what autograd
saves, each term by hand, and the two dry-run CLIs."""

from __future__ import annotations

import pytest
import torch

from opdgeo.cli.main import main
from opdgeo.training.memory_plan import SMOLLM2_135M, Arch, Settings, plan_memory

# Qwen3-8B and Qwen3-32B (their config.json on the Hub), SmolLM2-135M (a Llama)
QWEN3_8B = dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False)
QWEN3_32B = dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
                 intermediate_size=25600, vocab_size=151936, tie_word_embeddings=False)
SMOLLM2 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
               intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)


def _meta_model(kind: str, kw: dict):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    cfg_cls, model_cls = (Qwen3Config, Qwen3ForCausalLM) if kind == "qwen3" else (LlamaConfig, LlamaForCausalLM)
    cfg = cfg_cls(**kw)
    with torch.device("meta"):
        return cfg, model_cls(cfg)


@pytest.mark.parametrize("kind,kw", [("qwen3", QWEN3_8B), ("qwen3", QWEN3_32B), ("llama", SMOLLM2)])
def test_closed_form_counts_equal_a_meta_model_of_the_config(kind, kw):
    cfg, model = _meta_model(kind, kw)
    arch = Arch.from_dict(cfg.to_dict())  # model_type decides the q/k norms
    total = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert arch.parameters == total
    assert arch.layer_parameters == layer
    assert arch.root_parameters == total - cfg.num_hidden_layers * layer
    if kw is QWEN3_8B:
        assert total == 8_190_735_360
    if kind == "llama":
        assert arch == SMOLLM2_135M


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_saved_activations_per_token_and_layer_are_what_autograd_keeps(kind):
    """Two models that differ only in depth: the extra layers' saved bytes (float32, no
    checkpointing; parameters excluded) are exactly L_extra * a * tokens * 4."""
    kw = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, intermediate_size=96,
              vocab_size=50, tie_word_embeddings=True, attn_implementation="sdpa")
    saved = {}
    for layers in (2, 4):
        from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

        cfg_cls, model_cls = (Qwen3Config, Qwen3ForCausalLM) if kind == "qwen3" else (LlamaConfig, LlamaForCausalLM)
        torch.manual_seed(0)
        model = model_cls(cfg_cls(num_hidden_layers=layers, **kw)).float()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        seen: dict[int, int] = {}

        def pack(t, seen=seen, params=params):
            if t.untyped_storage().data_ptr() not in params:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        ids = torch.randint(0, 50, (2, 40))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        saved[layers] = sum(seen.values())
        arch = Arch.from_dict(model.config.to_dict())
    assert saved[4] - saved[2] == 2 * arch.saved_per_token_layer * 80 * 4


def _arch():
    return Arch(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                intermediate_size=16, vocab_size=10, tie_word_embeddings=True)


def test_terms_by_hand():
    a = _arch()
    # embed 80 + final norm 8; layer: q 64, k+v 64, o 64, mlp 384, norms 16, q/k norms 8 = 600
    assert (a.root_parameters, a.layer_parameters, a.parameters) == (88, 600, 1288)
    # a = 4*8 + 3*8 + 3*4 + 4*16 + 2 + 2 + 2*4 + (2*8 + 2*4 + 2 + 1) = 171
    assert a.saved_per_token_layer == 171
    s = Settings(strategy="ddp", world=4, micro_sequences=3, prompt_tokens=4, response_tokens=6, bf16_compute=True,
                 teacher_bytes=2)
    T = 30
    ddp = plan_memory(a, a, s).terms
    # the layers' bf16 weight copies; a tile of logits (fp32 + bf16), the hidden states, the head's fp32 gradient
    assert ddp == {"student": 16.0 * 1288, "teacher": 2.0 * 1288, "cast_cache": 2.0 * 2 * 600,
                   "gathered": 0.0, "act": 2 * 171 * T * 2.0, "logprobs": 6.0 * 10 * T + 4 * 8 * T + 4 * 10 * 8,
                   "kv": 2.0 * 2 * 1 * 4 * T * 2}
    f = plan_memory(a, a, Settings(**{**s.__dict__, "strategy": "fsdp", "activation_checkpointing": True}))
    assert f.terms["student"] == 16.0 * 1288 / 4
    assert f.terms["teacher"] == 2.0 * 1288 / 4 + 2 * 2 * 600
    assert f.terms["cast_cache"] == 0.0
    d = plan_memory(a, a, Settings(**{**s.__dict__, "activation_checkpointing": True}))  # ddp, checkpointed
    assert d.terms["cast_cache"] == 2.0 * 600  # one recomputed layer's bf16 copies
    assert f.terms["logprobs"] == 6.0 * 10 * T + 4 * 8 * T  # the root's unsharded gradient is in gathered
    assert f.terms["gathered"] == (2 * 600 + 88) * (2 + 4.0)
    assert f.terms["act"] == 2 * 8 * T * 2 + 171 * T * 2
    assert f.per_gpu == f.terms["student"] + f.terms["teacher"] + max(f.training, f.generation)
    fp32 = plan_memory(a, None, Settings(strategy="none", world=1, micro_sequences=3, prompt_tokens=4,
                                         response_tokens=6, bf16_compute=False))
    assert fp32.terms["teacher"] == 0.0 and fp32.terms["cast_cache"] == 0.0 and fp32.terms["act"] == 2 * 171 * T * 4
    assert fp32.terms["logprobs"] == 4.0 * 10 * T + 4 * 8 * T + 4 * 10 * 8  # no bf16 cast of the tile
    off = plan_memory(a, None, Settings(strategy="fsdp", world=2, micro_sequences=3, prompt_tokens=4,
                                        response_tokens=6, cpu_offload=True))
    assert off.terms["student"] == 0.0 and off.host == 16.0 * 1288 / 2


def test_paper_opd_run_fits_8x80gb_only_sharded_with_checkpointing():
    from opdgeo.training.memory_plan import GPU_BYTES

    base = Settings(strategy="ddp", world=8, micro_sequences=8, prompt_tokens=512, response_tokens=8192)
    s, t = Arch.from_dict({**QWEN3_8B, "model_type": "qwen3"}), Arch.from_dict({**QWEN3_32B, "model_type": "qwen3"})
    ddp = plan_memory(s, t, base)
    fsdp = plan_memory(s, t, Settings(**{**base.__dict__, "strategy": "fsdp"}))
    both = plan_memory(s, t, Settings(**{**base.__dict__, "strategy": "fsdp", "activation_checkpointing": True}))
    assert not ddp.fits() and not fsdp.fits() and both.fits()
    assert both.terms["student"] + both.terms["teacher"] < 0.5 * GPU_BYTES  # the model state is no longer the problem


def test_train_dry_run_prints_the_plan_and_runs_nothing(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text('objective: opd\nmodel: {student: "tiny:quick", teacher: "tiny:quick"}\n'
                   'task: {spec: "arithmetic:difficulty=1,ops=+", num_problems: 8}\n'
                   "rollout: {group_size: 2, max_new_tokens: 8}\noptim: {steps: 1, batch_size: 4, micro_batch_size: 1}\n")
    out = tmp_path / "run"
    main(["train", str(cfg), "--dry-run", "--world-size", "2", "--out", str(out), "--set", "distributed.strategy=fsdp",
          "--set", "model.activation_checkpointing=true"])
    text = capsys.readouterr().out
    assert "strategy fsdp on 2 process(es), activation checkpointing on" in text
    assert "2 per process on 2 process(es)" in text and "the same run on 8 x 80 GB" in text
    assert not out.exists()
    with pytest.raises(SystemExit) as e:
        main(["train", str(cfg), "--dry-run", "--world-size", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "cannot be split evenly over 3 processes" in err and "Traceback" not in err
