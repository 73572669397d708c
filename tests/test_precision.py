"""Both compute-precision paths of the trainer, whatever this CPU computes natively.

``optim.bf16_autocast: auto`` resolves to bf16 on a CPU with AVX-512-BF16/AMX (or a bf16
GPU) and to fp32 elsewhere, so a suite that only used the default would test one path per
machine. Here each test runs both paths explicitly (``precision`` fixture), on the
smallest model, so an AVX2-only CI machine still exercises the bf16 code and an AVX-512
one the fp32 code.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from opdgeo.errors import ConfigError
from opdgeo.training import checkpointing as ckpt
from opdgeo.training.config import load_config
from opdgeo.training.precision import AUTOCAST_ENV, native_bf16, resolve_bf16_autocast

SPEC = "arithmetic:difficulty=1,ops=+"


@pytest.fixture(params=[True, False], ids=["bf16", "fp32"])
def precision(request) -> bool:
    """The value of ``optim.bf16_autocast`` a test runs with: both, on every machine."""
    return request.param


def test_resolution_rules(monkeypatch):
    monkeypatch.delenv(AUTOCAST_ENV, raising=False)
    assert resolve_bf16_autocast(True, "cpu") is True
    assert resolve_bf16_autocast(False, "cpu") is False
    assert resolve_bf16_autocast("auto", "cpu") is native_bf16("cpu")
    # the same test PyTorch's own bf16 kernels use on this CPU
    assert native_bf16("cpu") is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    monkeypatch.setenv(AUTOCAST_ENV, "fp32")
    assert resolve_bf16_autocast("auto", "cpu") is False
    assert resolve_bf16_autocast(True, "cpu") is True  # an explicit setting wins
    monkeypatch.setenv(AUTOCAST_ENV, "BF16")
    assert resolve_bf16_autocast("auto", "cpu") is True
    monkeypatch.setenv(AUTOCAST_ENV, "fp8")
    with pytest.raises(ConfigError, match=r"\$OPDGEO_AUTOCAST: must be 'bf16' or 'fp32'; got 'fp8'"):
        resolve_bf16_autocast("auto", "cpu")


def test_config_accepts_auto_and_booleans_and_refuses_other_strings():
    base = ["model.student=tiny:quick", "run.progress=false"]
    assert load_config(None, base).optim.bf16_autocast == "auto"  # the default
    assert load_config(None, base + ["optim.bf16_autocast=true"]).optim.bf16_autocast is True
    assert load_config(None, base + ["optim.bf16_autocast=auto"]).optim.bf16_autocast == "auto"
    with pytest.raises(ConfigError, match=r"optim\.bf16_autocast: must be true, false or 'auto'; got 'fast'"):
        load_config(None, base + ["optim.bf16_autocast=fast"])


def _cfg(out, *extra):
    return load_config(None, ["objective=opd", "model.student=tiny:quick", "model.teacher=tiny:quick",
                              "model.init_seed=0", f"task.spec={SPEC}", "task.num_problems=16",
                              "optim.batch_size=2", "optim.micro_batch_size=1", "optim.steps=3",
                              "rollout.group_size=2", "rollout.max_new_tokens=6", "optim.lr=1e-3",
                              "run.progress=false", f"run.out_dir={out}", *extra])


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_each_path_trains_records_its_precision_and_resumes_bitwise(precision, tmp_path):
    from opdgeo.training.loop import train

    flag = f"optim.bf16_autocast={str(precision).lower()}"
    full = train(_cfg(tmp_path / "full", flag))
    saved = yaml.safe_load((tmp_path / "full" / "config.yaml").read_text())
    assert saved["optim"]["bf16_autocast"] is precision
    # On-policy, the recorded behaviour log-probs are the loss's own forward in the same
    # autocast context, so the PPO ratio is exactly 1 at the single inner step.
    assert all(r["train/ratio_mean"] == 1.0 and r["train/clip_frac"] == 0.0 for r in _metrics(tmp_path / "full"))
    # 2 steps, then resume to 3: the same final weights, bit for bit, in either precision
    train(_cfg(tmp_path / "part", flag, "optim.steps=2"))
    train(_cfg(tmp_path / "part", flag), resume=True)
    a = ckpt.load_trainer_state(full.checkpoints[-1]).master
    b = ckpt.load_trainer_state(tmp_path / "part" / ckpt.step_dir_name(3)).master
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_auto_follows_the_environment_override(tmp_path, monkeypatch):
    from opdgeo.training.loop import train

    for forced, want in (("bf16", True), ("fp32", False)):
        monkeypatch.setenv(AUTOCAST_ENV, forced)
        train(_cfg(tmp_path / forced, "optim.steps=1"))
        assert yaml.safe_load((tmp_path / forced / "config.yaml").read_text())["optim"]["bf16_autocast"] is want


def test_logprobs_under_each_path_match_a_float64_forward(precision):
    """The autocast path changes the numbers only by bf16 rounding: the log-probs of the
    sampled tokens stay within bf16's resolution of a float64 forward of the same model
    (fp32 within fp32's), and both paths record exactly what their own forward gives."""
    from opdgeo.models import build_model, char_tokenizer, tiny_qwen3_config
    from opdgeo.training.precision import autocast_context
    from opdgeo.training.rollout import generate, sequence_logprobs

    tok = char_tokenizer()
    model = build_model(tiny_qwen3_config("quick", len(tok)), seed=3).eval()
    with torch.no_grad(), autocast_context(precision, "cpu"):
        ro = generate(model, tok, ["12+3=\n", "4+4=\n"], num_samples=2, temperature=1.0, max_new_tokens=5,
                      seed=7, batch_size=4)
        again = sequence_logprobs(model, ro.input_ids, ro.attention_mask, ro.response_mask)
    mask = ro.response_mask.bool()
    assert torch.equal(ro.behaviour_logprobs[mask], again.float()[mask])
    with torch.no_grad():
        exact = sequence_logprobs(model.double(), ro.input_ids, ro.attention_mask, ro.response_mask)
    err = (ro.behaviour_logprobs.double() - exact).abs()[mask].max().item()
    # bf16 keeps 8 significant bits (relative 2^-8 ≈ 4e-3 per rounding) through two layers;
    # fp32 agrees with float64 to ~1e-6 on log-probs of magnitude ~4.
    assert err < (0.1 if precision else 1e-4), err
    if precision:
        assert err > 1e-6  # the bf16 path really computed in bf16
