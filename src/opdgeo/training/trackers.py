"""Experiment trackers of ``opdgeo train`` (``run.report_to``), through accelerate's tracker API.

Every ``metrics.jsonl`` record ``{"step": s, key: value, ...}`` is mirrored to every tracker
as ``tracker.log({key: value, ...}, step=s)`` — the same keys (``train/loss``,
``rlvr/reward``, ``geometry/stable_rank``, ...), the same step — and the resolved config
is stored once as the run's hyper-parameters (flattened: ``optim.lr``, ...). The trackers
are accelerate's own classes (``accelerate.tracking``: TensorBoard, Weights & Biases,
Trackio, MLflow, Comet, Aim, ClearML, DVCLive, SwanLab), started on the main process only;
their local files go under ``<out_dir>/trackers/`` (TensorBoard: ``trackers/<run name>/``).

Offline by default (``run.report_offline``, our choice: a run never talks to a server
unless asked): wandb with ``WANDB_MODE=offline``, ClearML with ``CLEARML_OFFLINE_MODE=1``,
Comet with ``online=False``, SwanLab with ``mode="offline"``, MLflow with a local
``file:<out_dir>/trackers/mlruns`` store; environment variables already set win. TensorBoard,
Trackio, Aim and DVCLive are local anyway.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from opdgeo.errors import ConfigError

__all__ = ["REPORT_TO", "Trackers", "missing_trackers", "open_trackers"]

REPORT_TO = ("tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab")
"""Tracker names of ``run.report_to`` (accelerate's ``LoggerType`` values)."""


def missing_trackers(names) -> list[str]:
    """The trackers among ``names`` whose package is not installed (accelerate's check)."""
    if not names:
        return []
    from accelerate.tracking import get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    return [n for n in names if n not in available]


def _offline(name: str, folder: Path) -> tuple[dict[str, str], dict[str, Any]]:
    """(environment defaults, init kwargs) that keep tracker ``name`` offline, files in ``folder``."""
    return {
        "wandb": ({"WANDB_MODE": "offline", "WANDB_DIR": str(folder)}, {}),
        "clearml": ({"CLEARML_OFFLINE_MODE": "1"}, {}),
        "comet_ml": ({}, {"online": False}),
        "swanlab": ({}, {"mode": "offline", "logdir": str(folder / "swanlog")}),
        "mlflow": ({"MLFLOW_TRACKING_URI": f"file:{folder / 'mlruns'}"}, {}),
    }.get(name, ({}, {}))


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1e-6}}`` → ``{"optim.lr": 1e-6}``; lists and None as text (what
    every tracker's hyper-parameter store accepts)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        else:
            out[name] = str(value)
    return out


class Trackers:
    """The started trackers of one run: ``log(record)`` mirrors a ``metrics.jsonl`` record."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log(self, record: Mapping[str, Any]) -> None:
        """Send ``record`` (``{"step": s, **values}``) to every tracker at step ``s``."""
        values = {k: v for k, v in record.items() if k != "step"}
        for tracker in self.trackers:
            tracker.log(values, step=int(record["step"]))

    def close(self) -> None:
        """Flush and finish every tracker (their files complete)."""
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def open_trackers(config, run_dir: str | os.PathLike) -> Trackers:
    """Start the trackers of ``config.run.report_to`` for the run in ``run_dir`` (main process).

    Args:
        config: the resolved ``TrainConfig`` (stored as hyper-parameters).
        run_dir: the run folder; trackers write under ``run_dir/trackers``.

    Returns:
        ``Trackers`` (empty when ``report_to`` is empty).

    Raises:
        ConfigError: (``run.report_to``) a tracker whose package is not installed (the
            config's validation reports it first).
    """
    names = list(config.run.report_to)
    if not names:
        return Trackers([])
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    from opdgeo.training.config import config_to_dict

    missing = missing_trackers(names)
    if missing:
        raise ConfigError(f"run.report_to: {', '.join(missing)} not installed (pip install {' '.join(missing)})")
    folder = Path(run_dir) / "trackers"
    folder.mkdir(parents=True, exist_ok=True)
    project = Path(os.path.abspath(run_dir)).name
    hparams = _flat(config_to_dict(config))
    started = []
    for name in names:
        env, kwargs = _offline(name, folder) if config.run.report_offline else ({}, {})
        for key, value in env.items():
            os.environ.setdefault(key, value)
        cls = LOGGER_TYPE_TO_CLASS[name]
        if name == "tensorboard":
            kwargs = {"flush_secs": 30, **kwargs}  # a killed run keeps all but the last 30 s
        tracker = cls(project, str(folder), **kwargs) if cls.requires_logging_directory else cls(project, **kwargs)
        tracker.start()
        tracker.store_init_configuration(hparams)
        started.append(tracker)
    return Trackers(started)
