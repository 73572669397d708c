"""Presets, the --dry-run plan of every preset, parameter counts and the memory formula."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from opdgeo.cli.main import main
from opdgeo.errors import ConfigError
from opdgeo.study.pipeline import build_stages, train_config_dict
from opdgeo.study.plan import count_parameters, estimate_seconds, model_arch
from opdgeo.study.presets import PRESETS, StudyPreset, StudyRun, get_preset
from opdgeo.study.stages import select_stages


def _meta_count(arch: dict) -> int:
    """Independent reference: instantiate the transformers model on the meta device and count."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    kw = {k: v for k, v in arch.items() if k != "qk_norm"}
    cfg_cls, model_cls = (LlamaConfig, LlamaForCausalLM) if arch.get("qk_norm") is False else (Qwen3Config, Qwen3ForCausalLM)
    with torch.device("meta"):
        model = model_cls(cfg_cls(**kw))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_counts_match_transformers(name):
    p = get_preset(name)
    for spec in (p.base, p.teacher):
        arch = model_arch(spec)
        assert arch is not None
        assert count_parameters(arch) == _meta_count(arch), (name, spec.name)


def test_known_sizes():
    paper = get_preset("paper")
    assert count_parameters(model_arch(paper.base)) == 8_190_735_360  # Qwen3-8B
    assert abs(count_parameters(model_arch(paper.teacher)) - 32.76e9) < 0.01e9  # Qwen3-32B
    assert abs(count_parameters(model_arch(get_preset("smollm2").base)) - 134.5e6) < 0.1e6  # SmolLM2-135M


def test_count_by_hand():
    arch = dict(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                intermediate_size=16, vocab_size=10, tie_word_embeddings=True)
    # by hand: embed 80; per layer q 64 + k,v 2*32 + o 64 + mlp 3*128 + norms 16 + qk norms 8 = 600
    assert count_parameters(arch) == 80 + 2 * 600 + 8


@pytest.fixture
def no_datasets(tmp_path, monkeypatch):
    """Empty Hugging Face caches: the plan of a preset whose datasets are not here."""
    import huggingface_hub.constants  # noqa: F401  (reads its default cache at import)

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))


@pytest.mark.parametrize("name", list(PRESETS))
def test_dry_run_every_preset(name, capsys, tmp_path, no_datasets):
    main(["study", "--preset", name, "--dry-run", "--out", str(tmp_path / "none")])
    text = capsys.readouterr().out
    p = get_preset(name)
    shown = select_stages(build_stages(p), p.default_stages)
    for s in shown:
        assert f"  {s.name} " in text
    for r in p.runs:
        if r.name in {s.name for s in shown}:
            assert "ckpts " + "/".join(map(str, r.checkpoint_steps())) in text
    assert "student parameters:" in text and "student    = 16*P_s/S" in text
    assert not (tmp_path / "none").exists()  # a dry run writes nothing


def test_paper_plan_numbers(capsys, no_datasets):
    main(["study", "--preset", "paper", "--dry-run"])
    text = capsys.readouterr().out
    assert "student parameters: 8.19 B; teacher parameters: 32.76 B" in text
    assert "opd, from anchor, 299 steps, batch 64, x8 samples, lr 1e-06 constant" in text
    assert "ckpts 64/128/192/256/299" in text  # 0-indexed 63/127/191/255, then the final step
    assert "rlvr, from anchor, 1023 steps, batch 512" in text
    # 5 epochs of the demonstrations: their count is unknown without the data, so the estimate shows
    assert "sft, from base, 1831 steps (5 epochs), batch 256, lr 1e-05 cosine->1e-06, warmup 10 %" in text
    assert "mix_0 " in text and "rlvr, from anchor, 299 steps, batch 64" in text  # the sweep's matched alpha = 0 end
    assert "strategy ddp on 8 process(es)" in text and "accelerate launch --num_processes 8" in text
    assert "-> on 8 GPUs use fsdp + activation checkpointing" in text
    paper = get_preset("paper")
    opd = paper.run("opd")
    assert (opd.optim.weight_decay, opd.optim.betas) == (0.1, (0.9, 0.98))


def test_smollm2_runs_its_core_by_default_and_the_controls_on_request(capsys, no_datasets):
    p = get_preset("smollm2")
    stages = build_stages(p)
    core = select_stages(stages, p.default_stages)
    core_runs = {s.name for s in core if s.kind == "train"}
    assert core_runs == {r.name for r in p.runs if r.name.partition("_seed")[0] in ("sft", "opd", "rlvr")}
    assert len(core_runs) == 9  # SFT, OPD, RLVR x 3 seeds
    assert {s.name for s in core} >= {"base", "teacher", "eval_base", "eval_teacher", "trajectory_main", "report"}
    assert {s.kind for s in core} == {"model", "train", "eval", "compare", "trajectory", "report"}
    controls = select_stages(stages, ["controls"])
    control_runs = {r.name for r in p.runs if r.group != "main"}
    assert control_runs and {s.name for s in controls if s.kind == "train"} == control_runs | {"sft", "opd"}  # + deps
    assert {s.name for s in select_stages(stages, ["mixing"]) if s.kind == "train"} == (
        {"sft"} | {r.name for r in p.runs if r.group == "mixing"})  # its ends opd and rlvr are the core's
    # the estimate, by hand from the measured step times
    t = p.step_seconds
    n = {k: sum(1 for s in core if s.kind == k) for k in ("eval", "compare")}
    traj_runs = sum(len(s.config["runs"]) for s in core if s.kind == "trajectory")
    by_hand = (2 * t["model"] + p.teacher.sft_steps * t["teacher_sft"]
               + sum(p.run(s.name).steps * t[p.run(s.name).objective] for s in core if s.kind == "train")
               + n["eval"] * t["eval"] + n["compare"] * t["compare"] + traj_runs * t["trajectory"])
    assert estimate_seconds(p, core) == pytest.approx(by_hand)
    assert by_hand <= 2 * 3600  # the core's budget on 2 CPU cores
    main(["study", "--preset", "smollm2", "--dry-run"])
    text = capsys.readouterr().out
    assert f"estimated time of these {len(core)} stages: ~{by_hand / 60:.0f} min (from step times measured" in text
    assert "  mix_0p5 " not in text and "  opd_seed2 " in text


def test_unknown_preset_and_stage_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["study", "--preset", "nope", "--dry-run"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["study", "--preset", "quick", "--dry-run", "--stages", "bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "opdgeo: error: --stages: unknown 'bogus'" in err and "Traceback" not in err


def test_preset_validation_lists_every_problem():
    p = get_preset("quick")
    # the study-level problems; a run's training settings are the training config's to
    # validate (tests/test_study_presets_data.py)
    bad_run = dataclasses.replace(p.run("opd"), init="nope@1.5", project_rank=16, checkpoint_every=0.0)
    with pytest.raises(ConfigError) as e:
        dataclasses.replace(p, runs=(p.run("sft"), bad_run), dtype="int8")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(p.path)
    assert "runs.opd.study.init refers to run 'nope'" in msg and "runs.opd.study.init fraction must be in (0, 1]" in msg
    assert "runs.opd.study.checkpoint_every must be in (0, 1]" in msg and "dtype must be" in msg
    with pytest.raises(ConfigError, match="must be one of quick, tiny, smollm2, paper"):
        get_preset("x")
    assert isinstance(p, StudyPreset)


def test_train_configs_of_core_runs_validate():
    from opdgeo.training.config import config_from_dict

    p = get_preset("tiny")
    for name in ("sft", "opd", "rlvr", "mix_0p5"):
        cfg = train_config_dict(p.run(name), p, student="tiny:student", teacher="tiny:teacher", out_dir=tmp_dir())
        c = config_from_dict(cfg, check_paths=False)
        assert c.optim.steps == p.run(name).steps and c.checkpoint.dtype == "bfloat16"
    mix = config_from_dict(train_config_dict(p.run("mix_0p25"), p, student="tiny:student", teacher="tiny:teacher",
                                             out_dir=tmp_dir()), check_paths=False)
    assert dict(mix.objective.advantage) == {"opd": 0.25, "rlvr": 0.75}
    assert p.run("opd").checkpoint_steps() == [8, 16, 24, 32, 40]


def tmp_dir():
    return "runs/x"


def test_training_through_a_launcher_subprocess(tmp_path):
    """The GPU path: a training stage runs ``<launcher> -m opdgeo train CONFIG`` (here plain python)."""
    import sys

    from opdgeo.study.pipeline import _run_training

    p = get_preset("quick")
    run = dataclasses.replace(p.run("sft"), steps=2)
    run_dir = tmp_path / "runs" / "sft"
    cfg = train_config_dict(run, p, student="tiny:quick", teacher="", out_dir=run_dir)
    lines = []
    _run_training(cfg, run_dir, resume=False, launcher=sys.executable, log=lines.append)
    assert (run_dir / "step-000002" / "config.json").is_file()
    assert lines and "-m opdgeo train" in lines[0] and str(run_dir / "study-config.yaml") in lines[0]


def test_study_runs_keep_the_last_trainer_state_and_their_restart_sources():
    from opdgeo.training.config import config_from_dict

    p = get_preset("smollm2")
    assert p.keep_trainer_state == "last"
    for name, kept in (("opd", [8]), ("sft", [8]), ("rlvr", []), ("opd_proj16", [])):
        run = p.run(name)
        cfg = config_from_dict(train_config_dict(run, p, student="tiny:student", teacher="tiny:teacher",
                                                 out_dir=tmp_dir()), check_paths=False)
        assert cfg.checkpoint.keep_trainer_state == "last"
        assert list(cfg.checkpoint.keep_trainer_state_steps) == kept, name
    # the step each restart reads is the one the source keeps: 20 % of 40 steps = step 8
    assert p.run("opd").checkpoint_steps() == [8, 16, 24, 32, 40]
    from opdgeo.study.presets import nearest_step

    assert nearest_step([8, 16, 24], 12.0) == 8 and nearest_step([8, 16, 24], 12.1) == 16


def test_dry_run_disk_estimate_by_hand(capsys, tmp_path, no_datasets):
    from opdgeo.study.plan import disk_study_bytes

    p = get_preset("smollm2")
    core = select_stages(build_stages(p), p.default_stages)
    P = count_parameters(dict(p.base.arch))
    V_h = 49152 * 576
    w, s = 2 * P, 12 * P + 4 * V_h  # bf16 weights; fp32 master (tied matrix twice) + AdamW moments
    # models: base + teacher folders, the teacher's SFT (one checkpoint, with its state);
    # 9 runs x 5 checkpoints' weights; one state each, plus step 8 of sft and opd (restart sources)
    end = 2 * w + (w + s) + 9 * 5 * w + 9 * s + 2 * s
    total, peak, runs = disk_study_bytes(p, core, dict(p.base.arch), dict(p.teacher.arch))
    assert (total, runs) == (end, 9) and peak == end + s  # the last run holds two states for a moment
    everything = dataclasses.replace(p, keep_trainer_state="all")
    assert disk_study_bytes(everything, core, dict(p.base.arch), dict(p.teacher.arch))[0] == (
        2 * w + (w + s) + 9 * 5 * (w + s))
    main(["study", "--preset", "smollm2", "--dry-run", "--out", str(tmp_path / "x")])
    text = capsys.readouterr().out
    assert f"disk of these stages: ~{end / 2**30:.1f} GiB at the end, ~{(end + s) / 2**30:.1f} GiB at most" in text
    assert f"free at {tmp_path / 'x'}: " in text
    with pytest.raises(ConfigError, match="keep_trainer_state must be all|last"):
        dataclasses.replace(p, keep_trainer_state="some")
