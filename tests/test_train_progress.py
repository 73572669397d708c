"""Training progress: plain lines in a log (at least every 30 s), a live bar on a terminal."""

from __future__ import annotations

import io

from opdgeo.training.progress import StepProgress, format_elapsed, step_summary


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Log(io.StringIO):
    def isatty(self):
        return False


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_log_gets_a_line_whenever_30_seconds_passed_first_and_last_step():
    clock, out = FakeClock(), Log()
    with StepProgress("train", 10, stream=out, clock=clock, heartbeat=False) as p:
        for step in range(1, 11):
            clock.now += 12.0  # steps of 12 s: a line at step 1, then once >= 30 s passed (4, 7) and at the last (10)
            p.update(step, {"train/loss": 1.0 / step, "rlvr/reward": 0.25})
    lines = out.getvalue().splitlines()
    assert [ln.split()[2] for ln in lines] == ["1/10", "4/10", "7/10", "10/10"]
    assert lines[0] == "train step 1/10 loss 1.0000 reward 0.250 elapsed 0:00:12"
    assert lines[-1].endswith("elapsed 0:02:00")


def test_heartbeat_covers_a_step_longer_than_30_seconds():
    clock, out = FakeClock(), Log()
    with StepProgress("train", 5, start=2, stream=out, clock=clock, heartbeat=False) as p:
        clock.now += 1.0
        p.update(3, {"train/loss": 0.5})  # first step of a resumed run: printed
        clock.now += 29.0
        p.tick()  # 29 s of silence: nothing yet
        clock.now += 1.0
        p.tick()  # 30 s: the last values again, marked running
        p.tick()  # printed just now: nothing
        clock.now += 45.0
        p.tick()
    lines = out.getvalue().splitlines()
    assert lines == ["train step 3/5 loss 0.5000 elapsed 0:00:01",
                     "train step 3/5 (running) loss 0.5000 elapsed 0:00:31",
                     "train step 3/5 (running) loss 0.5000 elapsed 0:01:16"]


def test_terminal_gets_a_bar_not_lines_and_disabled_is_silent():
    out = Terminal()
    with StepProgress("train", 3, stream=out, clock=FakeClock(), heartbeat=False) as p:
        assert p.live
        for step in (1, 2, 3):
            p.update(step, {"train/loss": 0.1})
            p.tick()
    assert "train step" not in out.getvalue() and "3/3" in out.getvalue()
    quiet = Log()
    with StepProgress("train", 3, stream=quiet, enabled=False, clock=FakeClock()) as p:
        p.update(1, {"train/loss": 0.1})
        p.tick()
    assert quiet.getvalue() == ""


def test_summary_and_elapsed_format():
    assert step_summary({"train/loss": 0.12345, "rlvr/accuracy": 0.5, "x": 1}) == "loss 0.1235 acc 0.500"
    assert format_elapsed(3725.9) == "1:02:05" and format_elapsed(-1) == "0:00:00"


def test_training_loop_prints_lines_in_a_log(tmp_path, capsys):
    from opdgeo.training.config import config_from_dict
    from opdgeo.training.loop import train

    cfg = config_from_dict({
        "objective": "sft", "model": {"student": "tiny:quick"},
        "task": {"spec": "arithmetic:difficulty=1", "num_problems": 8},
        "optim": {"steps": 2, "batch_size": 2, "micro_batch_size": 2, "lr": 1e-3},
        "run": {"out_dir": str(tmp_path / "run"), "progress": True},
    })
    train(cfg)
    err = capsys.readouterr().err.splitlines()
    lines = [ln for ln in err if ln.startswith("train step")]
    assert [ln.split()[2] for ln in lines] == ["1/2", "2/2"] and all("loss" in ln and "elapsed" in ln for ln in lines)
