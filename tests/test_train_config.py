"""Training config: YAML + overrides, typed parsing, complete validation, CLI errors."""

import pytest

from opdgeo.errors import ConfigError
from opdgeo.training.config import apply_overrides, config_to_dict, load_config, parse_override


def _write(tmp_path, text):
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_yaml_and_typed_overrides(tmp_path):
    p = _write(tmp_path, "objective: rlvr\nmodel: {student: tiny:quick}\noptim: {lr: 1.0e-3, betas: [0.9, 0.95]}\n")
    c = load_config(p, ["optim.lr=1e-5", "optim.steps=7", "rollout.offpolicy_eps=0.7", "optim.grad_clip=null",
                        "objective.eps_high=0.3", "optim.bf16_autocast=false"])
    assert c.objective.name == "rlvr" and c.model.student == "tiny:quick"
    assert c.optim.lr == 1e-5 and isinstance(c.optim.lr, float)
    assert c.optim.steps == 7 and c.optim.betas == (0.9, 0.95)
    assert c.rollout.offpolicy_eps == 0.7 and c.optim.grad_clip is None
    assert c.objective.eps_high == 0.3 and c.optim.bf16_autocast is False
    # the resolved config round-trips
    import yaml

    again = _write(tmp_path, yaml.safe_dump(config_to_dict(c)))
    assert load_config(again) == c


def test_objective_shorthand_then_dotted_override():
    d = apply_overrides({"objective": "opd"}, ["objective.eps_low=0.1"])
    assert d["objective"] == {"name": "opd", "eps_low": 0.1}
    assert parse_override("a.b=1e-4") == ("a.b", 1e-4)
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("optim.lr")


def test_all_problems_reported_at_once_with_keys():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["objective=opd", "model.student=/no/such/model", "optim.lr=-1", "optim.bogus=3",
                           "optim.steps=abc", "optim.micro_batch_size=3", "rollout.temperature=0", "nosection.x=1"])
    msg = str(err.value)
    for key in ("model.student", "model.teacher", "optim.lr", "optim.bogus", "optim.steps", "optim.micro_batch_size",
                "rollout.temperature", "nosection"):
        assert key in msg, key
    assert "8 problems" in msg


def test_rl_rollout_temperature_must_be_one():
    """A tempered sampler is refused for rlvr/opd (its log-probs would not be the policy's)."""
    for obj in ("rlvr", "opd"):
        with pytest.raises(ConfigError, match=r"rollout.temperature: must be 1 for " + obj + r".*got 0.7"):
            load_config(None, ["model.student=tiny:quick", "model.teacher=tiny:quick", f"objective={obj}",
                               "rollout.temperature=0.7"])
    assert load_config(None, ["model.student=tiny:quick", "objective=rlvr"]).rollout.temperature == 1.0


def test_rlvr_needs_groups_and_mixing_is_validated():
    with pytest.raises(ConfigError, match="rollout.group_size"):
        load_config(None, ["model.student=tiny:quick", "objective=rlvr", "rollout.group_size=1"])
    c = load_config(None, ["model.student=tiny:quick", "model.teacher=tiny:quick", "objective=opd",
                           "objective.advantage={opd: 0.75, rlvr: 0.25}"])
    assert c.objective.weights() == {"opd": 0.75, "rlvr": 0.25}
    with pytest.raises(ConfigError, match="unknown signal"):
        load_config(None, ["model.student=tiny:quick", "objective=rlvr", "objective.advantage={kl: 1}"])


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="YAML"):
        load_config(_write(tmp_path, "a: [1, 2\n"))


def test_cli_config_error_is_one_message_and_exit_2(tmp_path, capsys):
    from opdgeo.cli.main import main

    p = _write(tmp_path, "objective: rlvr\nmodel: {student: tiny:quick}\noptim: {lr: -1, steps: 0}\n")
    with pytest.raises(SystemExit) as exc:
        main(["train", str(p), "--set", "rollout.group_size=1"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("opdgeo: error: invalid training config (3 problems)")
    assert "optim.lr" in err and "optim.steps" in err and "rollout.group_size" in err
    assert "Traceback" not in err


def test_keep_trainer_state_is_validated_and_free_on_resume():
    from opdgeo.training.config import resume_differences

    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.student=tiny:quick", "checkpoint.keep_trainer_state=first",
                           "checkpoint.keep_trainer_state_steps=[0, 4]"])
    msg = str(err.value)
    assert "checkpoint.keep_trainer_state: must be one of all, last; got 'first'" in msg
    assert "checkpoint.keep_trainer_state_steps: steps must be >= 1; got 0" in msg
    c = load_config(None, ["model.student=tiny:quick", "checkpoint.keep_trainer_state=last",
                           "checkpoint.keep_trainer_state_steps=[8]"])
    assert c.checkpoint.keep_trainer_state_steps == (8,)
    saved = config_to_dict(load_config(None, ["model.student=tiny:quick"]))
    assert resume_differences(saved, c) == []  # what is kept on disk does not change the updates


def test_rollout_micro_batch_size_is_validated_against_the_batch_and_the_processes():
    from opdgeo.training.memory_plan import train_plan

    base = ["model.student=tiny:quick", "objective=rlvr", "rollout.group_size=2", "optim.batch_size=8",
            "optim.micro_batch_size=2"]
    for bad in (3, 16, 0):
        with pytest.raises(ConfigError, match=f"rollout.micro_batch_size: must be a multiple of optim.micro_batch_size "
                                              f"= 2 that divides optim.batch_size = 8; got {bad}"):
            load_config(None, [*base, f"rollout.micro_batch_size={bad}"])
    c = load_config(None, [*base, "rollout.micro_batch_size=8"])
    train_plan(c, world=1)  # one process: one call of 4 micro-batches
    with pytest.raises(ConfigError, match="4 micro-batches per generate call do not divide the 2 micro-batches of "
                                          "each of 2 processes"):
        train_plan(c, world=2)
    train_plan(load_config(None, [*base, "rollout.micro_batch_size=4"]), world=2)
