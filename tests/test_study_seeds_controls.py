"""Presets: seeds of every run, the learning-rate-matched SFT control, and the learning
rates the docs state."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from opdgeo.errors import ConfigError
from opdgeo.study.presets import get_preset
from opdgeo.study.seeds import with_seeds

DOCS = Path(__file__).resolve().parents[1] / "docs" / "study.md"


@pytest.mark.parametrize("name,n,seeded", [("tiny", 3, None), ("smollm2", 3, None), ("quick", 2, {"sft", "opd", "rlvr"})])
def test_every_run_has_its_seeds_from_the_same_start(name, n, seeded):
    p = get_preset(name)
    base = [r for r in p.runs if r.seed_of is None]
    for r in base:
        reps = [x for x in p.runs if x.seed_of == r.name]
        want = n if seeded is None or r.name in seeded else 1  # quick: only the main runs are repeated
        assert sorted([r.seed] + [x.seed for x in reps]) == list(range(want)), r.name
        for x in reps:  # only the seed and the name differ
            assert x.name == f"{r.name}_seed{x.seed}" and x.init == r.init
            assert (x.optim, x.steps, x.batch_size, x.samples_per_prompt) == (r.optim, r.steps, r.batch_size, r.samples_per_prompt)


def test_with_seeds_and_validation():
    p = get_preset("quick")
    runs = with_seeds([p.run("sft")], (3, 5))
    assert [(r.name, r.seed, r.seed_of) for r in runs] == [("sft", 3, None), ("sft_seed5", 5, "sft")]
    from dataclasses import replace

    bad = replace(p.run("opd_seed1"), seed_of="nope")
    with pytest.raises(ConfigError, match="seed_of"):
        replace(p, runs=p.runs + (replace(bad, name="x"),))


@pytest.mark.parametrize("name", ["tiny", "smollm2", "quick"])
def test_sft_matched_is_opd_step_size_and_origin(name):
    p = get_preset(name)
    m, opd = p.run("sft_matched"), p.run("opd")
    assert m.objective == "sft" and m.init == "anchor" == opd.init
    assert (m.optim, m.steps, m.batch_size) == (opd.optim, opd.steps, opd.batch_size)


def _doc_lrs(preset: str) -> list[float]:
    row = next(line for line in DOCS.read_text().splitlines() if line.startswith(f"| `{preset}`"))
    return [float(x) for x in re.findall(r"lr (\d(?:\.\d+)?e-\d+)", row)]


def test_tiny_learning_rates_are_the_documented_ones():
    p = get_preset("tiny")
    sft, rl = p.run("sft").optim.lr, p.run("opd").optim.lr
    assert _doc_lrs("tiny") == [sft, rl] == [2e-4, 2e-5]
    assert sft / rl == pytest.approx(10.0)  # the paper's SFT:RL ratio (1e-5 : 1e-6)
    for r in p.runs:  # SFT and its projected continuation at the SFT rate; every run from the anchor at the RL rate
        assert r.optim.lr == (sft if r.init == "base" or r.init.startswith("sft@") else rl), r.name
    text = _yaml_text("tiny")  # the preset's own file states them beside the values
    assert "RL (OPD, RLVR and every control) at lr 2e-5" in text and "SFT at 2e-4" in text
    assert "lr: 2.0e-5" in text and "lr: 2.0e-4" in text


def test_smollm2_learning_rates_are_the_documented_ones():
    p = get_preset("smollm2")
    s = p.run("sft").optim
    assert _doc_lrs("smollm2") == [s.lr, p.run("rlvr").optim.lr] == [1e-5, 1e-6]
    assert (s.schedule, s.min_lr) == ("cosine", 1e-6) and f"lr 1e-5 cosine → 1e-6" in DOCS.read_text()
    assert "SFT lr 1e-5 cosine -> 1e-6" in _yaml_text("smollm2") and "RL (OPD, RLVR and every control) lr 1e-6" in _yaml_text("smollm2")


@pytest.mark.parametrize("name", ["quick", "paper"])
def test_other_presets_learning_rates_are_the_documented_ones(name):
    p = get_preset(name)
    assert _doc_lrs(name) == [p.run("sft").optim.lr, p.run("opd").optim.lr]
    assert all(r.optim.lr == p.run("opd").optim.lr for r in p.runs if r.init == "anchor" and r.group != "matched"
               or r.init.startswith("opd@"))


def _yaml_text(name: str) -> str:
    from opdgeo.study.preset_file import shipped_presets_dir

    return (shipped_presets_dir() / f"{name}.yaml").read_text()
