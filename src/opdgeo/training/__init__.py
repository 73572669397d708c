"""Training: SFT, RLVR (GRPO) and OPD from one policy-gradient loop (SPEC §3).

- ``config``: typed frozen dataclasses, YAML + ``--set`` overrides, complete validation;
- ``advantages`` / ``losses``: the pure per-token math and THE reduction (``masked_mean``);
- ``rollout``: batched sampling and ``sequence_logprobs``;
- ``loop``: the recipe, ``train(config) -> RunResult``;
- ``checkpointing``: run folders, atomic HF-layout checkpoints, exact resume.

``from opdgeo.training import train, load_config`` is the Python API.
"""

from opdgeo.training.config import TrainConfig, load_config

__all__ = ["train", "load_config", "TrainConfig", "RunResult", "StepStats", "Hooks"]


def __getattr__(name):
    if name in ("train", "RunResult", "StepStats", "Hooks"):
        from opdgeo.training import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'opdgeo.training' has no attribute {name!r}")
