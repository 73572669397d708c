"""run.report_to: every metrics.jsonl record mirrored to TensorBoard (read back from the event file)."""

from __future__ import annotations

import json
import math

import pytest

from opdgeo.errors import ConfigError
from opdgeo.training.config import load_config
from opdgeo.training.loop import train

BASE = ["objective=sft", "model.student=tiny:quick", "task.spec=arithmetic:difficulty=1,ops=+",
        "task.num_problems=16", "optim.batch_size=4", "optim.micro_batch_size=4", "optim.steps=4",
        "optim.lr=3e-3", "checkpoint.every=0", "run.progress=false", "run.monitor_every=2"]


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(folder.rglob("events.out.tfevents.*"))  # the scalars and the hparams run
    scalars: dict[str, dict[int, float]] = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for ev in acc.Scalars(tag):
                scalars.setdefault(tag, {})[ev.step] = ev.value
    return scalars


def test_tensorboard_events_equal_metrics_jsonl(tmp_path):
    out = tmp_path / "run"
    train(load_config(None, [*BASE, f"run.out_dir={out}", "run.report_to=[tensorboard]"]))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    events = _events(out / "trackers")
    expected = {(k, r["step"]): v for r in records for k, v in r.items() if k != "step"}
    got = {(k, s): v for k, steps in events.items() for s, v in steps.items() if "/" in k}
    assert set(got) == set(expected) and any(k == "geometry/stable_rank" for k, _ in got)
    for key, value in expected.items():  # TensorBoard stores float32 scalars
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, rel=2e-7, abs=1e-30), key
    assert len(records) == 4


def test_report_to_is_validated_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match="run.report_to: unknown tracker.*'neptune'"):
        load_config(None, [*BASE, f"run.out_dir={tmp_path}", "run.report_to=[tensorboard, neptune]"])
    with pytest.raises(ConfigError, match="listed twice"):
        load_config(None, [*BASE, f"run.out_dir={tmp_path}", "run.report_to=[tensorboard, tensorboard]"])
    from opdgeo.training.trackers import missing_trackers

    absent = [t for t in ("wandb", "mlflow", "swanlab") if t in missing_trackers([t])]
    if absent:  # a tracker that is not installed: named at validation, with what to install
        with pytest.raises(ConfigError, match=f"run.report_to: {absent[0]} not installed"):
            load_config(None, [*BASE, f"run.out_dir={tmp_path}", f"run.report_to=[{absent[0]}]"])
    with pytest.raises(ConfigError, match="run.report_to.*expected a list"):
        load_config(None, [*BASE, f"run.out_dir={tmp_path}", "run.report_to=7"])
