"""The study presets as YAML files: the same stages, cache keys and training configs as
the snapshot taken from the presets' earlier Python form, one validation, clear errors,
and packaging (the shipped files are found from the installed package)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from opdgeo.errors import ConfigError
from opdgeo.study import get_preset
from opdgeo.study.pipeline import train_config_dict
from opdgeo.study.preset_file import PLACEHOLDERS, STUDY_RUN_KEYS, load_preset, shipped_presets_dir
from opdgeo.training.config import config_from_dict, config_to_dict

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
sys.path.insert(0, str(FIXTURES))
from dump_study_presets import PRESET_NAMES, dump  # noqa: E402

SNAPSHOT = json.loads((FIXTURES / "study_presets.json").read_text())


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_stages_and_cache_keys_are_the_snapshot(name):
    got, want = dump(name), SNAPSHOT[name]
    assert [s["name"] for s in got["stages"]] == [s["name"] for s in want["stages"]]
    for g, w in zip(got["stages"], want["stages"]):
        assert g == w, g["name"]  # config, deps, kind, path and the cache key itself


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_training_configs_are_the_snapshot(name):
    got, want = dump(name), SNAPSHOT[name]
    assert list(got["training"]) == list(want["training"])
    for run, cfg in want["training"].items():
        assert got["training"][run] == cfg, run
        # and therefore the same fully resolved config (what the core writes to config.yaml)
        assert config_to_dict(config_from_dict(got["training"][run], check_paths=False)) == \
            config_to_dict(config_from_dict(cfg, check_paths=False))
    assert got["teacher_sft"] == want["teacher_sft"]


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_study_json_keeps_every_key(name):
    got, want = dump(name)["study_info"], SNAPSHOT[name]["study_info"]
    for key, value in want.items():  # keys are only ever added
        if key == "runs":
            assert [{k: r[k] for k in w} for r, w in zip(got["runs"], value)] == value
        else:
            assert got[key] == value, key


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_the_view_writes_back_the_config_the_training_validation_accepted(name):
    """A run's StudyRun fields, written back as a training config, are the config that was
    validated when the file was read (same placeholders), so nothing is lost in the view."""
    from opdgeo.study.preset_file import _merge, _run, _training_dict
    from opdgeo.training.config_file import read_config_file

    path = shipped_presets_dir() / f"{name}.yaml"
    data = read_config_file(Path(str(path)))
    study = dict(task=data["task"], dedup=data.get("dedup", True), demonstrations=data.get("demonstrations"),
                 dtype=data.get("dtype", "bfloat16"))
    p = get_preset(name)
    for rname, raw in data["runs"].items():
        merged = _merge(data.get("defaults") or {}, raw)
        place = {**STUDY_RUN_KEYS,
                 **merged.pop("study", {})}
        validated = config_from_dict(_training_dict(merged, place, study, rname), check_paths=False)
        run = p.run(rname)
        written = train_config_dict(run, p, student=PLACEHOLDERS["student"], teacher=PLACEHOLDERS["teacher"],
                                    out_dir=Path(PLACEHOLDERS["out_dir"]), project_from=PLACEHOLDERS["from"],
                                    project_origin=PLACEHOLDERS["origin"])
        # what is kept on disk is the study's to set from the whole preset (keep_trainer_state, the
        # restart steps), like the paths, and is not part of a run's view
        kept = {k: written["checkpoint"].pop(k) for k in ("keep_trainer_state", "keep_trainer_state_steps")}
        assert kept == {"keep_trainer_state": p.keep_trainer_state,
                        "keep_trainer_state_steps": list(p.restart_steps(run))}
        assert config_to_dict(config_from_dict(written, check_paths=False)) == config_to_dict(validated), rname
        assert _run(rname, _merge(data.get("defaults") or {}, raw), study) == run


def test_shipped_presets_are_the_recipes_folder():
    """``recipes/study`` (the folder the docs name) is the packaged folder."""
    shipped = Path(str(shipped_presets_dir()))
    assert sorted(p.name for p in shipped.glob("*.yaml")) == sorted(f"{n}.yaml" for n in PRESET_NAMES)
    assert (ROOT / "recipes" / "study").resolve() == shipped.resolve()


def _study_file(tmp_path, text: str) -> Path:
    src = Path(str(shipped_presets_dir() / "quick.yaml")).read_text()
    p = tmp_path / "mine.yaml"
    p.write_text(src + text)
    return p


def test_a_users_study_file_loads_by_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text(Path(str(shipped_presets_dir() / "quick.yaml")).read_text().replace("name: quick", "name: mine"))
    mine = get_preset(str(p))
    assert mine.name == "mine" and mine.path == str(p)
    assert [r.cache_config() for r in mine.runs] == [r.cache_config() for r in get_preset("quick").runs]


@pytest.mark.parametrize("edit,message", [
    ("  bad: {objective: opd, optim: {lr: -1.0}}\n", r"mine\.yaml: runs\.bad: invalid training config: optim\.lr: must be > 0"),
    ("  bad: {objective: opd, optim: {lrr: 1.0}}\n", r"mine\.yaml: runs\.bad: .*optim\.lrr: unknown key"),
    ("  bad: {objective: opd, checkpoint: {every: 3}}\n", r"mine\.yaml: runs\.bad\.checkpoint\.every: set by the study"),
    ("  bad: {objective: opd, model: {student: x}}\n", r"mine\.yaml: runs\.bad\.model\.student: set by the study"),
    ("  bad: {objective: opd, study: {grup: main}}\n", r"mine\.yaml: runs\.bad\.study\.grup: unknown key"),
    ("  bad: {objective: {name: opd, advantage: {opd: 0.5, rlvr: 0.2}}}\n", r"runs\.bad\.objective\.advantage: the study mixes"),
    ("  bad: {objective: rlvr, rollout: {group_size: 1}}\n", r"runs\.bad: .*rollout\.group_size: RLVR needs >= 2"),
    ("  late: {study: {init: nope@0.2}, project: {rank: 4}}\n", r"mine\.yaml: .*runs\.late\.study\.init refers to run 'nope'"),
    ("  late: {project: {rank: 4}}\n", r"mine\.yaml: .*runs\.late\.study\.init must be '<run>@<fraction>'"),
    ("  late: {study: {checkpoint_every: 0}}\n", r"mine\.yaml: .*runs\.late\.study\.checkpoint_every must be in \(0, 1\]"),
])
def test_a_mistake_is_one_line_naming_the_file_and_key(tmp_path, edit, message):
    p = _study_file(tmp_path, edit)  # a run appended under `runs:` (quick.yaml ends with its runs)
    with pytest.raises(ConfigError, match=message) as err:
        load_preset(p)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("old,new,message", [
    ("eval: {n_problems: 6,", "eval: {n_problems: many,", r"mine\.yaml: eval\.n_problems: expected an integer; got 'many'"),
    ("sft_steps: 6, sft_lr: 3.0e-3", "sft_steps: 6, sft_lr: fast", r"mine\.yaml: teacher\.sft_lr: expected a number"),
    ("seeds: [0, 1]", "sed: [0, 1]", r"mine\.yaml: sed: unknown key"),
    ("diagnose: {k: 16,", "diagnose: {kk: 16,", r"mine\.yaml: diagnose\.kk: unknown key"),
    ("seeded: [sft, opd, rlvr]", "seeded: [sft, opdd]", r"mine\.yaml: seeded: 'opdd' is not a run"),
    ("seeds: [0, 1]", "seeds: [0, one]", r"mine\.yaml: seeds\[1\]: expected an integer; got 'one'"),
    ("dedup: true", "dedup: yes please", r"mine\.yaml: dedup: expected true/false"),
    ("study: {init: base, group: main, checkpoint_every: 0.2}", "study: {init: base, group: main, checkpoint_every: often}",
     r"mine\.yaml: runs\.sft\.study\.checkpoint_every: expected a number"),
])
def test_a_study_level_mistake_is_one_line_naming_the_file_and_key(tmp_path, old, new, message):
    text = Path(str(shipped_presets_dir() / "quick.yaml")).read_text()
    assert old in text
    p = tmp_path / "mine.yaml"
    p.write_text(text.replace(old, new))
    with pytest.raises(ConfigError, match=message) as err:
        load_preset(p)
    assert "\n" not in str(err.value)


def test_an_unknown_preset_lists_the_choices():
    with pytest.raises(ConfigError, match="one of quick, tiny, smollm2, paper or a study file"):
        get_preset("tinyy")
    with pytest.raises(ConfigError, match="no such study file"):
        get_preset("nowhere/study.yaml")


def test_extra_training_keys_reach_the_config_and_the_cache_key(tmp_path):
    p = _study_file(tmp_path, "  opd_eps: {objective: {name: opd, eps_high: 0.2}}\n")
    from opdgeo.study.pipeline import build_stages

    preset = load_preset(p)
    run = preset.run("opd_eps")
    assert run.extra == (("objective.eps_high", 0.2),)
    cfg = train_config_dict(run, preset, student="tiny:student", teacher="tiny:teacher", out_dir=Path("runs/x"))
    assert config_from_dict(cfg, check_paths=False).objective.eps_high == 0.2
    stages = {s.name: s for s in build_stages(preset)}
    assert stages["opd_eps"].config["run"]["extra"] == [["objective.eps_high", 0.2]]
    assert "extra" not in stages["opd"].config["run"]  # runs without extra keys keep their key


@pytest.mark.slow
def test_an_installed_wheel_finds_the_presets(tmp_path):
    """The wheel carries ``opdgeo/recipes/study/*.yaml``; opdgeo imported from it (not from
    this checkout) loads every preset with the same cache keys."""
    import subprocess
    import zipfile

    import shutil

    tree = tmp_path / "tree"  # a copy, so that the build leaves nothing in the checkout
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, tree / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(tree)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("opdgeo-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n for n in names if n.startswith("opdgeo/recipes/study/")) == \
        sorted(f"opdgeo/recipes/study/{n}.yaml" for n in PRESET_NAMES)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # a pure-Python wheel: what pip install puts in site-packages
    code = ("import json, opdgeo; from opdgeo.study import get_preset; from opdgeo.study.pipeline import build_stages;"
            "from opdgeo.study.stages import stage_keys;"
            f"print(json.dumps([opdgeo.__file__, {{n: stage_keys(build_stages(get_preset(n))) for n in {list(PRESET_NAMES)}}}]))")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, capture_output=True, text=True)
    where, keys = json.loads(out.stdout)
    assert Path(where).is_relative_to(site)
    for n in PRESET_NAMES:
        assert keys[n] == {s["name"]: s["key"] for s in SNAPSHOT[n]["stages"]}


def test_study_and_report_modules_stay_small():
    """No function over 80 lines and no file over 600 in opdgeo/study and opdgeo/report."""
    import ast

    too_long = []
    for folder in ("study", "report"):
        for p in sorted((ROOT / "src" / "opdgeo" / folder).glob("*.py")):
            text = p.read_text()
            if len(text.splitlines()) > 600:
                too_long.append(f"{p.name}: {len(text.splitlines())} lines")
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                    too_long.append(f"{p.name}: {node.name} {node.end_lineno - node.lineno + 1} lines")
    assert not too_long


def test_the_cli_runs_a_users_study_file_and_names_its_mistakes(tmp_path, capsys):
    from opdgeo.cli.main import main

    good = tmp_path / "good.yaml"
    good.write_text(Path(str(shipped_presets_dir() / "quick.yaml")).read_text())
    main(["study", "--preset", str(good), "--dry-run"])
    assert capsys.readouterr().out.startswith(f"opdgeo study --preset {good}: CI smoke test")
    bad = _study_file(tmp_path, "  bad: {objective: opd, rollout: {group_size: 0}}\n")
    with pytest.raises(SystemExit) as e:
        main(["study", "--preset", str(bad), "--dry-run"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"{bad}: runs.bad: invalid training config" in err and "rollout.group_size: must be >= 1" in err


def test_the_documented_example_file_loads(tmp_path):
    """The example study file of docs/study.md ("The file") is a valid study."""
    text = (ROOT / "docs" / "study.md").read_text()
    block = text.split("### The file", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    p = tmp_path / "example.yaml"
    p.write_text(block)
    example = load_preset(p)
    assert [r.name for r in example.runs if r.seed_of is None] == ["sft", "opd", "rlvr", "opd_topkl50", "mix_0p5", "opd_proj16"]
    assert example.run("sft").optim.lr == 2e-4 and example.run("opd").optim.lr == 2e-5
    assert example.run("mix_0p5").mix_alpha == 0.5 and example.run("opd_proj16").project_rank == 16
    assert example.roles()["projection"] == [{"projected": "opd_proj16", "full": "opd", "freeze": None,
                                              "start": "opd_proj16_start"}]
