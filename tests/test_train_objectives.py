"""A tiny model trained briefly with each objective improves its task reward.

Chain (seeds fixed; 1-digit additions, the first 16 training problems; character tokenizer):
a fresh ``tiny:student`` -> SFT (12 + 16 steps) = the *anchor*; the anchor -> 16 more SFT
steps = the *teacher*. RLVR and OPD then start from the anchor on the 4 first problems.
Rewards are avg@32 at temperature 1 (sampled), on a fixed evaluation seed.
"""

import pytest

from opdgeo.training.config import load_config
from opdgeo.training.loop import train

SPEC = "arithmetic:difficulty=1,ops=+"


def _run(out, *extra):
    cfg = load_config(None, [f"task.spec={SPEC}", "run.progress=false", f"run.out_dir={out}",
                             "checkpoint.dtype=float32", "checkpoint.save_trainer_state=false", *extra])
    result = train(cfg)
    return result.checkpoints[-1], result


def _reward(path, n):
    from opdgeo.models import load_model, load_tokenizer
    from opdgeo.tasks import load_task
    from opdgeo.training.evaluate import evaluate

    model, tok = load_model(path), load_tokenizer(path)
    return evaluate(model, tok, load_task(SPEC), split="train", n=n, k=32, temperature=1.0, max_new_tokens=24,
                    seed=7, batch_size=128).pass_at_1


SFT = ["objective=sft", "task.num_problems=16", "optim.batch_size=16", "optim.micro_batch_size=16", "optim.lr=3e-3"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("objectives")
    warm, _ = _run(root / "warm", "model.student=tiny:student", "optim.steps=12", *SFT)
    anchor, _ = _run(root / "anchor", f"model.student={warm}", "optim.steps=16", *SFT)
    teacher, _ = _run(root / "teacher", f"model.student={anchor}", "optim.steps=16", *SFT)
    return root, anchor, teacher


def test_sft_improves_reward(models):
    root, anchor, teacher = models
    from opdgeo.models import build_model, char_tokenizer, tiny_qwen3_config

    tok = char_tokenizer()
    init = root / "init"
    build_model(tiny_qwen3_config("student", len(tok)), seed=0).save_pretrained(init)
    tok.save_pretrained(init)
    r0, r1, r2 = _reward(init, 16), _reward(anchor, 16), _reward(teacher, 16)
    assert r0 == 0.0
    assert r1 > 0.3 and r2 > r1 + 0.1


@pytest.mark.parametrize("objective", ["rlvr", "opd"])
def test_rl_objectives_improve_reward_from_the_anchor(models, objective):
    root, anchor, teacher = models
    extra = [f"model.teacher={teacher}"] if objective == "opd" else []
    out, result = _run(root / objective, f"model.student={anchor}", f"objective={objective}", "task.num_problems=4",
                       "optim.steps=8", "optim.batch_size=4", "optim.micro_batch_size=4", "rollout.group_size=16",
                       "rollout.max_new_tokens=24", "optim.lr=3e-4", *extra)
    before, after = _reward(anchor, 4), _reward(out, 4)
    assert after > before + 0.05, (before, after, [h.values["rlvr/reward"] for h in result.history])
