"""GRPO with TRL's GRPOTrainer on the tiny model, with opdgeo's geometry monitor and subspace projection.

The tiny Qwen3 student is built from a config (nothing downloaded) with the character tokenizer;
the task is the embedded arithmetic task, its verifier the reward (plus a small shaping term, the
share of digits in the completion, so that the untrained model gets a signal). Every 2 steps the monitor logs
``geometry/*`` through the trainer and writes ``<out>/geometry/trajectory.csv``; from step 4 the
projection keeps the update inside the top-8 right singular subspace of each block matrix's update
(``project/out_of_subspace_fraction``). Then ``opdgeo trajectory`` reads the run's ``checkpoint-N``
folders. Finishes in about a minute on a laptop CPU::

    python examples/trl_grpo.py [--out runs/trl-grpo] [--steps 8]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")


def main(argv=None) -> None:
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from opdgeo.integrations.transformers import GeometryMonitor, SubspaceProjection
    from opdgeo.models import build_model, char_tokenizer, tiny_qwen3_config
    from opdgeo.tasks import load_task

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/trl-grpo")
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)

    tok = char_tokenizer()
    model = build_model(tiny_qwen3_config("quick", len(tok)), seed=0).train()
    model.save_pretrained(os.path.join(a.out, "origin"))  # W0, for `opdgeo trajectory --origin`
    tok.save_pretrained(os.path.join(a.out, "origin"))
    task = load_task("arithmetic:difficulty=1,ops=+")
    problems = task.problems("train", 32)
    by_prompt = {task.plain_prompt(p): p for p in problems}
    data = Dataset.from_list([{"prompt": task.plain_prompt(p)} for p in problems])

    def correct(prompts, completions, **kwargs):  # the task's verifier: 1 for a correct answer
        return [task.reward(c, by_prompt[p]) for p, c in zip(prompts, completions)]

    def digits(prompts, completions, **kwargs):  # shaping, so that an untrained model gets a signal
        return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]

    args = GRPOConfig(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=12, learning_rate=1e-3, logging_steps=1, save_strategy="steps",
                      save_steps=2, save_only_model=True, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                      temperature=1.0, beta=0.0)
    trainer = GRPOTrainer(model=model, reward_funcs=[correct, digits], args=args, train_dataset=data,
                          processing_class=tok,
                          callbacks=[GeometryMonitor(every=2, dtype="float32"), SubspaceProjection(rank=8, start=4)])
    trainer.train()
    print(f"done: {a.out} (checkpoint-N folders, geometry/trajectory.csv); next: "
          f"opdgeo trajectory --origin {os.path.join(a.out, 'origin')} {a.out}")


if __name__ == "__main__":
    main()
