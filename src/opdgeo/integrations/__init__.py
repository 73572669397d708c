"""opdgeo inside other trainers.

- ``opdgeo.integrations.transformers``: ``GeometryMonitor`` and ``SubspaceProjection``,
  ``transformers.TrainerCallback`` s for any ``transformers.Trainer`` (and so TRL's
  ``SFTTrainer``, ``GRPOTrainer``, ``GKDTrainer``, ...).
- ``opdgeo.integrations.weights``: a model's matrices by checkpoint name, gathered one
  matrix at a time under FSDP2 / DeepSpeed ZeRO-3 (what both callbacks read).

Importing this package imports neither transformers nor TRL; the submodules do.
"""
