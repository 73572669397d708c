"""Tests for the streaming checkpoint reader (opdgeo.checkpoints)."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from conftest import save_tiny_qwen3
from opdgeo.checkpoints import (
    ATTENTION_TYPES,
    GEOMETRY_TYPES,
    TYPES,
    TensorInfo,
    TensorName,
    is_geometry_matrix,
    open_checkpoint,
    pair_names,
    parse_tensor_name,
)
from opdgeo.errors import CheckpointError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """bf16 tied tiny Qwen3, saved single-file and sharded from the same weights."""
    root = tmp_path_factory.mktemp("ckpt")
    single = save_tiny_qwen3(root / "single", seed=0)
    sharded = save_tiny_qwen3(root / "sharded", seed=0, max_shard_size="20KB")
    return single, sharded


def _write_raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


# ---------------------------------------------------------------------------- reading


def test_single_and_sharded_match_transformers(tiny):
    from transformers import AutoModelForCausalLM

    single, sharded = tiny
    assert len(list(sharded.glob("*.safetensors"))) > 2  # really sharded
    a, b = open_checkpoint(single), open_checkpoint(sharded)
    state = AutoModelForCausalLM.from_pretrained(single, dtype=torch.bfloat16).state_dict()
    # tied: transformers lists lm_head.weight as a second name of the embedding
    assert torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    expected = sorted(set(state) - {"lm_head.weight"})
    assert sorted(a.names()) == expected
    assert a.names() == b.names()
    assert a.names().index("model.layers.1.mlp.up_proj.weight") < a.names().index("model.norm.weight")
    assert a.aliases == {} == b.aliases  # save_pretrained does not store the tied lm_head
    assert "lm_head.weight" not in a and "model.norm.weight" in a and len(a) == len(expected)
    assert a.config["num_hidden_layers"] == 2
    with safe_open(single / "model.safetensors", framework="pt") as f:
        for name in a.names():
            ta, tb = a.load(name), b.load(name)
            assert ta.dtype == torch.bfloat16 and ta.is_contiguous()
            assert torch.equal(ta, state[name]) and torch.equal(tb, state[name])
            assert torch.equal(ta, f.get_tensor(name))
            info = a.info(name)
            assert info == TensorInfo(name, tuple(state[name].shape), torch.bfloat16, state[name].numel())
            assert b.info(name) == info


def test_untied_fp32_and_single_file_source(tmp_path):
    from transformers import AutoModelForCausalLM

    path = save_tiny_qwen3(tmp_path / "m", seed=1, dtype=torch.float32, tie_word_embeddings=False)
    state = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    ck = open_checkpoint(str(path / "model.safetensors"))  # a file; config.json beside it is read
    assert sorted(ck.names()) == sorted(state) and "lm_head.weight" in ck
    assert ck.config["tie_word_embeddings"] is False
    assert torch.equal(ck.load("lm_head.weight"), state["lm_head.weight"])
    assert ck.info("lm_head.weight").dtype == torch.float32


def test_tied_both_stored_counted_once(tmp_path):
    emb = torch.randn(8, 4)
    save_file({"model.embed_tokens.weight": emb, "lm_head.weight": emb.clone(), "model.norm.weight": torch.ones(4)},
              tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    ck = open_checkpoint(tmp_path)
    assert ck.names() == ["model.embed_tokens.weight", "model.norm.weight"]
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    assert "lm_head.weight" in open_checkpoint(tmp_path).names()


def test_shared_byte_range_deduplicated(tmp_path):
    # two names pointing at the very same bytes (safetensors itself refuses this)
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    header = {
        "lm_head.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "model.embed_tokens.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "step": {"dtype": "I64", "shape": [], "data_offsets": [24, 32]},
    }
    _write_raw_safetensors(tmp_path / "x.safetensors", header, w.numpy().tobytes() + struct.pack("<q", 7))
    ck = open_checkpoint(tmp_path / "x.safetensors")
    assert ck.names() == ["model.embed_tokens.weight", "step"]
    assert ck.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert torch.equal(ck.load("model.embed_tokens.weight"), w)
    # a non-floating tensor is listed, with its dtype
    assert ck.info("step").dtype == torch.int64 and ck.load("step").item() == 7
    # partial overlap is corruption
    header["step"]["data_offsets"] = [16, 24]
    header["step"]["dtype"] = "F64"
    _write_raw_safetensors(tmp_path / "y.safetensors", header, w.numpy().tobytes())
    with pytest.raises(CheckpointError, match="y.safetensors.*overlap"):
        open_checkpoint(tmp_path / "y.safetensors")


def test_mixed_dtypes(tmp_path):
    a = {"model.layers.0.mlp.up_proj.weight": torch.randn(3, 2, dtype=torch.float16),
         "model.layers.0.mlp.down_proj.weight": torch.randn(2, 3, dtype=torch.bfloat16)}
    b = {k: v.float() for k, v in a.items()}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    ca, cb = open_checkpoint(tmp_path / "a.safetensors"), open_checkpoint(tmp_path / "b.safetensors")
    assert pair_names(ca, cb) == ["model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.up_proj.weight"]
    assert ca.info("model.layers.0.mlp.up_proj.weight").dtype == torch.float16
    assert cb.load("model.layers.0.mlp.up_proj.weight").dtype == torch.float32
    assert torch.equal(ca.load("model.layers.0.mlp.up_proj.weight"), a["model.layers.0.mlp.up_proj.weight"])


def test_concurrent_loads_match_sequential(tiny):
    from concurrent.futures import ThreadPoolExecutor

    ck = open_checkpoint(tiny[1])
    names = ck.names() * 4
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(ck.load, names))
    assert all(torch.equal(t, ck.load(n)) for n, t in zip(names, loaded))


# ---------------------------------------------------------------------------- fused


PHI3 = {"hidden_size": 8, "num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 6}


def test_phi3_fused_qkv_and_gate_up(tmp_path):
    torch.manual_seed(0)
    head_dim = 2
    q, k, v = torch.randn(4 * head_dim, 8), torch.randn(head_dim, 8), torch.randn(head_dim, 8)
    gate, up = torch.randn(6, 8), torch.randn(6, 8)
    qkv_bias = torch.randn(12)
    tensors = {
        "model.layers.0.self_attn.qkv_proj.weight": torch.cat([q, k, v]).to(torch.bfloat16),
        "model.layers.0.self_attn.qkv_proj.bias": qkv_bias,
        "model.layers.0.mlp.gate_up_proj.weight": torch.cat([gate, up]).to(torch.bfloat16),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(8, 8),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(PHI3))
    ck = open_checkpoint(tmp_path)
    p = "model.layers.0."
    assert set(ck.names()) == {p + s for s in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
        "mlp.gate_proj.weight", "mlp.up_proj.weight", "self_attn.o_proj.weight")}
    for name, want in (("self_attn.q_proj.weight", q), ("self_attn.k_proj.weight", k),
                       ("self_attn.v_proj.weight", v), ("mlp.gate_proj.weight", gate),
                       ("mlp.up_proj.weight", up)):
        got = ck.load(p + name)
        assert torch.equal(got, want.to(torch.bfloat16)), name
        assert ck.info(p + name).shape == tuple(want.shape)
        # only the slice was read, not the fused tensor
        assert got.untyped_storage().nbytes() == want.numel() * 2
    assert torch.equal(ck.load(p + "self_attn.k_proj.bias"), qkv_bias[8:10])
    assert is_geometry_matrix(p + "self_attn.k_proj.weight", ck.info(p + "self_attn.k_proj.weight").shape)
    # content_key of a part equals that of the same tensor stored alone
    save_file({"x": k.to(torch.bfloat16)}, tmp_path / "k.safetensors")
    assert ck.content_key(p + "self_attn.k_proj.weight") == open_checkpoint(tmp_path / "k.safetensors").content_key("x")

    # the same split from a pickle checkpoint
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(tmp_path / "config.json", pickled)
    torch.save(tensors, pickled / "pytorch_model.bin")
    ckp = open_checkpoint(pickled, allow_pickle=True)
    assert ckp.names() == ck.names()
    assert all(torch.equal(ckp.load(n), ck.load(n)) and ckp.content_key(n) == ck.content_key(n) for n in ck.names())

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(CheckpointError, match="model.safetensors.*qkv_proj.*num_attention_heads"):
        open_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**PHI3, "num_key_value_heads": 2}))
    with pytest.raises(CheckpointError, match=r"qkv_proj.*\[8, 4, 4\].*12 rows"):
        open_checkpoint(tmp_path)


def test_neox_and_gpt2_fused(tmp_path):
    torch.manual_seed(1)
    heads, hd, hidden = 2, 3, 6
    q, k, v = (torch.randn(heads, hd, hidden) for _ in range(3))
    fused = torch.stack([q, k, v], dim=1).reshape(heads * 3 * hd, hidden)  # [h, (q,k,v), hd] rows
    c_attn = torch.randn(hidden, 3 * hidden)  # GPT-2 Conv1D [in, 3n]
    save_file({"gpt_neox.layers.0.attention.query_key_value.weight": fused,
               "transformer.h.0.attn.c_attn.weight": c_attn}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": heads, "hidden_size": hidden}))
    ck = open_checkpoint(tmp_path)
    for part, want in zip("qkv", (q, k, v)):
        assert torch.equal(ck.load(f"gpt_neox.layers.0.attention.{part}_proj.weight"), want.reshape(heads * hd, hidden))
    for j, part in enumerate("qkv"):
        name = f"transformer.h.0.attn.{part}_proj.weight"
        assert torch.equal(ck.load(name), c_attn[:, j * hidden:(j + 1) * hidden])
        assert parse_tensor_name(name) == TensorName(0, part)


# ---------------------------------------------------------------------------- content key


def test_content_key(tiny, tmp_path):
    single, sharded = tiny
    a, b = open_checkpoint(single), open_checkpoint(sharded)
    keys = {n: a.content_key(n) for n in a.names()}
    assert keys == {n: b.content_key(n) for n in b.names()}
    assert keys == {n: open_checkpoint(single).content_key(n) for n in a.names()}  # stable on reopen
    matrices = [n for n in a.names() if a.info(n).shape.__len__() == 2]
    assert len({keys[n] for n in matrices}) == len(matrices) == 15  # random matrices: distinct
    # norms are all ones at init: equal content, equal key
    assert keys["model.norm.weight"] == keys["model.layers.0.input_layernorm.weight"]
    name = "model.layers.1.self_attn.v_proj.weight"
    w = a.load(name)
    assert keys[name] != open_checkpoint(single).content_key("model.layers.0.self_attn.v_proj.weight")
    # one entry changed by one bf16 ULP -> a different key
    w2 = w.clone()
    w2.view(torch.int16)[3, 5] += 1
    save_file({name: w, "other": w2}, tmp_path / "one.safetensors")
    c = open_checkpoint(tmp_path / "one.safetensors")
    assert c.content_key(name) == keys[name] and c.content_key("other") != keys[name]
    # same bytes, other shape or dtype -> different key
    save_file({"r": w.reshape(-1).clone(), "i": w.view(torch.int16).clone()}, tmp_path / "r.safetensors")
    r = open_checkpoint(tmp_path / "r.safetensors")
    assert len({r.content_key("r"), r.content_key("i"), keys[name]}) == 3
    # the key does not depend on the file format: same tensor in a pickle
    torch.save({name: w}, tmp_path / "pytorch_model.bin")
    assert open_checkpoint(tmp_path / "pytorch_model.bin", allow_pickle=True).content_key(name) == keys[name]


# ---------------------------------------------------------------------------- pairing


def test_pair_names(tmp_path):
    base = {f"model.layers.{i}.mlp.up_proj.weight": torch.zeros(2, 3) for i in range(5)}
    tuned = dict(base)
    for i in (1, 2, 3, 4):
        del tuned[f"model.layers.{i}.mlp.up_proj.weight"]
    tuned["extra.weight"] = torch.zeros(1)
    save_file(base, tmp_path / "a.safetensors")
    save_file(tuned, tmp_path / "b.safetensors")
    ca, cb = open_checkpoint(tmp_path / "a.safetensors"), open_checkpoint(tmp_path / "b.safetensors")
    with pytest.raises(CheckpointError) as e:
        pair_names(ca, cb)
    msg = str(e.value)
    assert "\n" not in msg
    assert f"4 tensors only in {tmp_path / 'a.safetensors'} (model.layers.1.mlp.up_proj.weight, " in msg
    assert f"1 tensor only in {tmp_path / 'b.safetensors'} (extra.weight)" in msg and "--ignore-missing" in msg
    assert pair_names(ca, cb, ignore_missing=True) == ["model.layers.0.mlp.up_proj.weight"]
    tuned = {**base, "model.layers.3.mlp.up_proj.weight": torch.zeros(3, 2)}
    save_file(tuned, tmp_path / "c.safetensors")
    with pytest.raises(CheckpointError, match=r"model.layers.3.mlp.up_proj.weight: \[2, 3\] in .*a.safetensors vs \[3, 2\]"):
        pair_names(ca, open_checkpoint(tmp_path / "c.safetensors"))
    assert pair_names(ca, ca) == ca.names()


# ---------------------------------------------------------------------------- bad inputs


def _raises(source, match, **kw):
    with pytest.raises(CheckpointError) as e:
        open_checkpoint(source, **kw)
    msg = str(e.value)
    assert "\n" not in msg, msg
    assert re.search(match, msg), msg
    return msg


def test_bad_paths_and_corrupt_files(tiny, tmp_path):
    single, sharded = tiny
    _raises(tmp_path / "nope", "nope: no such file or directory")
    (tmp_path / "empty").mkdir()
    _raises(tmp_path / "empty", r"empty: not a checkpoint folder.*model.safetensors")
    (tmp_path / "notes.txt").write_text("hi")
    _raises(tmp_path / "notes.txt", "notes.txt: not a checkpoint file")

    data = (single / "model.safetensors").read_bytes()
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(data[:-100])
    _raises(trunc, r"trunc.safetensors: tensor .*truncated")
    trunc.write_bytes(data[:20])
    _raises(trunc, r"trunc.safetensors: corrupt or truncated .*header length")
    trunc.write_bytes(data[:3])
    _raises(trunc, r"trunc.safetensors: not a safetensors file")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:8] + b"#garbage" + data[16:])
    _raises(bad, r"bad.safetensors: corrupt safetensors header")
    bad.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    _raises(bad, r"bad.safetensors: corrupt or truncated")
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [s + 1 for s in header[key]["shape"]]
    _write_raw_safetensors(bad, header, data[8 + n:])
    _raises(bad, rf"bad.safetensors: tensor {key}: header gives \d+ bytes but shape")

    broken = tmp_path / "sharded"
    shutil.copytree(sharded, broken)
    victim = sorted(broken.glob("model-*.safetensors"))[1]
    victim.unlink()
    _raises(broken, rf"model.safetensors.index.json: shard {victim.name} \(holding .*\) is missing")
    (broken / "config.json").write_text("{not json")
    _raises(broken, r"config.json: cannot parse")


def test_pickle_requires_flag(tiny, tmp_path):
    single, _ = tiny
    ref = open_checkpoint(single)
    state = {n: ref.load(n) for n in ref.names()}
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # shared storage in the pickle
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(single / "config.json", folder)
    torch.save(state, folder / "pytorch_model.bin")
    msg = _raises(folder, r"pytorch_model.bin: pickle checkpoint refused.*--allow-pickle")
    assert str(folder) in msg
    ck = open_checkpoint(folder, allow_pickle=True)
    assert ck.names() == ref.names()
    for n in ref.names():
        assert torch.equal(ck.load(n), state[n]) and ck.content_key(n) == ref.content_key(n)
    # sharded pickle with an index
    names = ref.names()
    shard_dir = tmp_path / "bin_sharded"
    shard_dir.mkdir()
    halves = {"pytorch_model-00001-of-00002.bin": names[:10], "pytorch_model-00002-of-00002.bin": names[10:]}
    for fname, part in halves.items():
        torch.save({n: state[n] for n in part}, shard_dir / fname)
    index = {"weight_map": {n: f for f, part in halves.items() for n in part}}
    (shard_dir / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    _raises(shard_dir, r"pytorch_model.bin.index.json: pickle checkpoint refused")
    cs = open_checkpoint(shard_dir, allow_pickle=True)
    assert cs.names() == names and all(torch.equal(cs.load(n), state[n]) for n in names)
    # a malicious pickle is refused by weights_only
    import pickle
    import os as _os

    class Evil:
        def __reduce__(self):
            return (_os.getcwd, ())

    (tmp_path / "evil.bin").write_bytes(pickle.dumps(Evil(), protocol=2))
    _raises(tmp_path / "evil.bin", r"evil.bin: cannot load with torch.load\(weights_only=True\)", allow_pickle=True)


def test_model_id_from_local_cache_only(tiny, tmp_path, monkeypatch):
    single, _ = tiny
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--acme--tiny" / "snapshots" / commit
    snap.mkdir(parents=True)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text(commit)
    for f in ("model.safetensors", "config.json"):
        shutil.copy(single / f, snap / f)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    import socket

    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    ck = open_checkpoint("acme/tiny")
    assert ck.path == snap and ck.names() == open_checkpoint(single).names()
    _raises("acme/absent", rf"acme/absent: .*not found in the local Hugging Face cache {cache}")
    # an existing local path of the same spelling wins over the cache
    local = tmp_path / "acme" / "tiny"
    shutil.copytree(snap, local)
    assert open_checkpoint("acme/tiny").path == Path("acme/tiny")
    shutil.rmtree(tmp_path / "acme")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # HF_HOME/hub is the same cache
    assert open_checkpoint("acme/tiny").path == snap
    assert attempts == []  # never tried to reach the hub


# ---------------------------------------------------------------------------- names


NAMES = [
    # Llama / Mistral / SmolLM / Qwen2
    ("model.embed_tokens.weight", None, "embed"),
    ("model.layers.0.self_attn.q_proj.weight", 0, "q"),
    ("model.layers.12.self_attn.k_proj.weight", 12, "k"),
    ("model.layers.3.self_attn.v_proj.bias", 3, "v"),
    ("model.layers.3.self_attn.o_proj.weight", 3, "o"),
    ("model.layers.7.mlp.gate_proj.weight", 7, "gate"),
    ("model.layers.7.mlp.up_proj.weight", 7, "up"),
    ("model.layers.7.mlp.down_proj.weight", 7, "down"),
    ("model.layers.7.input_layernorm.weight", 7, "norm"),
    ("model.layers.7.post_attention_layernorm.weight", 7, "norm"),
    ("model.norm.weight", None, "norm"),
    ("lm_head.weight", None, "lm_head"),
    ("model.layers.1.self_attn.rotary_emb.inv_freq", 1, "other"),
    # Qwen3 q/k norms
    ("model.layers.2.self_attn.q_norm.weight", 2, "norm"),
    ("model.layers.2.self_attn.k_norm.weight", 2, "norm"),
    # Phi-3 unsplit fused
    ("model.layers.0.self_attn.qkv_proj.weight", 0, "other"),
    ("model.layers.0.mlp.gate_up_proj.weight", 0, "other"),
    # Meta Llama
    ("tok_embeddings.weight", None, "embed"),
    ("layers.4.attention.wq.weight", 4, "q"),
    ("layers.4.attention.wo.weight", 4, "o"),
    ("layers.4.feed_forward.w1.weight", 4, "gate"),
    ("layers.4.feed_forward.w2.weight", 4, "down"),
    ("layers.4.feed_forward.w3.weight", 4, "up"),
    ("layers.4.attention_norm.weight", 4, "norm"),
    ("output.weight", None, "lm_head"),
    # GPT-NeoX / Pythia
    ("gpt_neox.embed_in.weight", None, "embed"),
    ("gpt_neox.layers.5.attention.query_key_value.weight", 5, "other"),
    ("gpt_neox.layers.5.attention.dense.weight", 5, "o"),
    ("gpt_neox.layers.5.mlp.dense_h_to_4h.weight", 5, "up"),
    ("gpt_neox.layers.5.mlp.dense_4h_to_h.bias", 5, "down"),
    ("gpt_neox.layers.5.input_layernorm.bias", 5, "norm"),
    ("gpt_neox.final_layer_norm.weight", None, "norm"),
    ("embed_out.weight", None, "lm_head"),
    # GPT-2
    ("transformer.wte.weight", None, "embed"),
    ("transformer.wpe.weight", None, "embed"),
    ("transformer.h.11.attn.c_attn.weight", 11, "other"),
    ("transformer.h.11.attn.c_proj.weight", 11, "o"),
    ("transformer.h.11.mlp.c_fc.weight", 11, "up"),
    ("transformer.h.11.mlp.c_proj.weight", 11, "down"),
    ("transformer.h.11.ln_1.weight", 11, "norm"),
    ("transformer.ln_f.bias", None, "norm"),
    ("transformer.h.0.attn.bias", 0, "other"),
]


@pytest.mark.parametrize("name,layer,typ", NAMES)
def test_parse_tensor_name(name, layer, typ):
    assert parse_tensor_name(name) == TensorName(layer, typ)
    assert typ in TYPES


def test_type_constants_and_geometry_set():
    assert TYPES == ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head", "norm", "other", "router")
    assert GEOMETRY_TYPES == TYPES[:7] and ATTENTION_TYPES == TYPES[:4]
    assert is_geometry_matrix("model.layers.0.mlp.down_proj.weight", (4, 8))
    assert not is_geometry_matrix("model.layers.0.self_attn.q_proj.bias", (8,))
    assert not is_geometry_matrix("model.embed_tokens.weight", (64, 8))
    assert not is_geometry_matrix("lm_head.weight", (64, 8))
    assert not is_geometry_matrix("model.layers.0.input_layernorm.weight", (8,))
