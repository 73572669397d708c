"""Datasets as researchers name them: every known dataset's real schema from local files,
folders and the local Hugging Face caches (laid out in tmp_path; nothing is downloaded),
what a split means per dataset, and one-line errors that name the columns."""

from __future__ import annotations

import shutil
import socket

import pytest
from dataset_rows import (
    AIME24_ROWS,
    AIME25_ROWS,
    AMC23_ROWS,
    DAPO_PROCESSED_ROWS,
    DAPO_ROWS,
    GSM8K_ROWS,
    MATH500_ROWS,
    MINERVA_ROWS,
    OPENR1_ROWS,
    dapo_text,
    hub_cache_dataset,
    readme,
    write_jsonl,
    write_parquet,
)

from opdgeo.cli.main import main
from opdgeo.errors import ConfigError
from opdgeo.tasks import MathTask, load_task, split_task_spec


@pytest.fixture(autouse=True)
def _caches(tmp_path, monkeypatch):
    """Empty hub and datasets caches of this test only; and no network: any connection fails."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return tmp_path


def test_each_known_dataset_reads_from_a_local_file(tmp_path):
    dapo = load_task(str(write_parquet(tmp_path / "dapo-math-17k.parquet", DAPO_ROWS)))
    assert dapo.adapter.name == "dapo-math-17k"  # recognised by its columns
    p = dapo.problems("train")[0]
    assert (p.id, p.answer, p.solution) == ("a1", "84", None) and p.prompt == dapo_text(
        "In triangle $ABC$, $AB=13$, $BC=14$, $CA=15$. Find the area of the triangle.")

    proc = load_task(str(write_parquet(tmp_path / "processed.parquet", DAPO_PROCESSED_ROWS)))
    assert proc.adapter.name == "dapo-math-17k-processed"
    # its 'solution' column is the reference answer, never a demonstration
    assert [(q.answer, q.solution) for q in proc.problems("train")] == [("84", None), ("34", None), ("24", None)]

    m500 = load_task(str(write_jsonl(tmp_path / "m.jsonl", MATH500_ROWS)) + ":dataset=math-500")
    q = m500.problems("test")[0]
    assert (q.id, q.answer) == ("test/precalculus/807.json", "\\left( 3, \\frac{\\pi}{2} \\right)")
    assert q.solution.endswith("\\right)}.$")

    aime = load_task(str(write_parquet(tmp_path / "aime24.parquet", AIME24_ROWS)) + ":dataset=aime-2024")
    assert [(q.id, q.answer) for q in aime.problems("test")] == [("60", "204"), ("61", "113")]
    aime25 = load_task(str(write_jsonl(tmp_path / "a25.jsonl", AIME25_ROWS)) + ":dataset=aime25")
    assert [q.answer for q in aime25.problems("test")] == ["70", "588"]
    amc = load_task(str(write_parquet(tmp_path / "amc.parquet", AMC23_ROWS)) + ":dataset=amc-2023")
    assert [q.answer for q in amc.problems("test")] == ["27", "36"]  # float64 27.0 -> "27"
    minerva = load_task(str(write_jsonl(tmp_path / "minerva.jsonl", MINERVA_ROWS)) + ":dataset=minerva-math")
    assert [q.answer for q in minerva.problems("test")] == ["1.6", "656"]

    gsm = load_task(str(write_jsonl(tmp_path / "gsm8k_train.jsonl", GSM8K_ROWS["train"])))
    assert gsm.adapter.name == "gsm8k"  # question/answer with a '#### ' final line
    g = gsm.problems("train")[0]
    assert g.answer == "72" and "<<" not in g.solution and g.solution.endswith("#### 72")

    r1 = load_task(str(write_parquet(tmp_path / "openr1.parquet", OPENR1_ROWS)))
    assert r1.adapter.name == "openr1-math"
    a, b = r1.problems("train")
    # the first generation math-verify found correct (and complete) is the demonstration
    assert a.solution.endswith("$\\boxed{3}$.") and "only 3" in a.solution
    assert b.solution == "<think>\n7*8=56\n</think>\n$\\boxed{56}$"  # the first one is incomplete


def test_splits_mean_what_the_dataset_says(tmp_path):
    dapo = load_task(str(write_parquet(tmp_path / "dapo.parquet", DAPO_ROWS)))
    assert len(dapo.problems("train")) == 7
    with pytest.raises(ConfigError, match="DAPO-Math-17k has no held-out split"):
        dapo.problems("test")  # a one-file dataset never serves its training rows as the test split
    aime = MathTask(write_parquet(tmp_path / "aime.parquet", AIME24_ROWS), dataset="aime-2024")
    with pytest.raises(ConfigError, match="AIME 2024 is an evaluation set"):
        aime.problems("train")
    generic = MathTask(write_jsonl(tmp_path / "problems.jsonl", AIME25_ROWS))
    assert generic.adapter.name == "generic" and generic.splits() == ["train"]
    with pytest.raises(ConfigError, match="a single data file holds one split, 'train'"):
        generic.problems("test")
    named = MathTask(write_jsonl(tmp_path / "aime25_test.jsonl", AIME25_ROWS))
    assert named.splits() == ["test"] and len(named.problems("test")) == 2  # the Hub's file-name rule


def test_a_folder_uses_the_dataset_card_configs_and_splits(tmp_path):
    root = tmp_path / "gsm8k"
    write_parquet(root / "main" / "train-00000-of-00001.parquet", GSM8K_ROWS["train"])
    write_parquet(root / "main" / "test-00000-of-00001.parquet", GSM8K_ROWS["test"])
    write_parquet(root / "socratic" / "train-00000-of-00001.parquet", GSM8K_ROWS["train"][:1])
    (root / "README.md").write_text(readme({"main": {"train": "main/train-*", "test": "main/test-*"},
                                            "socratic": {"train": "socratic/train-*"}}))
    with pytest.raises(ConfigError, match=r"Config name is missing.*':config=NAME'"):
        MathTask(root).problems("train")
    t = MathTask(root, config="main")
    assert t.adapter.name == "gsm8k" and t.splits() == ["test", "train"]
    assert [p.answer for p in t.problems("train")] == ["72", "10"] and [p.answer for p in t.problems("test")] == ["18"]
    assert len(MathTask(root, config="socratic").problems("train")) == 1


def test_hub_cache_ids_and_names(tmp_path):
    hub = tmp_path / "hub"
    hub_cache_dataset(hub, "HuggingFaceH4/aime_2024", {
        "data/train-00000-of-00001.parquet": AIME24_ROWS,
        "README.md": readme({"default": {"train": "data/train-*"}}),
    })
    hub_cache_dataset(hub, "open-r1/DAPO-Math-17k-Processed", {
        "all/train-00000-of-00001.parquet": DAPO_PROCESSED_ROWS,
        "en/train-00000-of-00001.parquet": DAPO_PROCESSED_ROWS[:2],
        "README.md": readme({"all": {"train": "all/train-*"}, "en": {"train": "en/train-*"}}),
    })
    by_name = load_task("aime-2024")
    by_id = load_task("HuggingFaceH4/aime_2024")
    assert by_name.adapter.name == by_id.adapter.name == "aime-2024"
    # the Hub copy calls its 30 problems 'train'; they are AIME's test problems
    assert by_name.dataset_split("test") == "train"
    assert [p.answer for p in by_name.problems("test")] == [p.answer for p in by_id.problems("test")] == ["204", "113"]
    info = by_name.describe("test")
    assert (info.dataset, info.split, info.dataset_split) == ("AIME 2024", "test", "train")
    # the processed dapo: its default config ('all'), or another with :config=
    assert len(load_task("dapo-math-17k-processed").problems("train")) == 3
    assert len(load_task("open-r1/DAPO-Math-17k-Processed:config=en").problems("train")) == 2
    with pytest.raises(ConfigError, match=r"MATH-500 is not in the local Hugging Face cache \(none of "
                                          r"HuggingFaceH4/MATH-500.*hf download --repo-type dataset"):
        load_task("math-500")
    with pytest.raises(ConfigError, match="not a dataset in the local Hugging Face cache"):
        load_task("someone/not-cached")


def test_the_datasets_library_cache_of_an_earlier_load_dataset(tmp_path):
    """``load_dataset("org/name")`` once online leaves ``HF_DATASETS_CACHE/org___name/...``;
    offline, opdgeo reads it (with the hub cache empty)."""
    import datasets

    src = tmp_path / "staging" / "minervamath"
    write_jsonl(src / "test.jsonl", MINERVA_ROWS)
    cache = tmp_path / "datasets-cache"
    datasets.load_dataset(str(src), cache_dir=str(cache))  # what an online load leaves, under the folder's name
    (built,) = [p for p in cache.iterdir() if p.is_dir() and p.name == "minervamath"]
    target = cache / "math-ai___minervamath"
    shutil.move(str(built), str(target))  # its arrow files are already named minervamath-<split>.arrow
    task = load_task("minerva-math")
    assert task.location == "datasets cache: math-ai/minervamath"
    assert [p.answer for p in task.problems("test")] == ["1.6", "656"]


def test_unfindable_fields_name_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "weird.jsonl", [{"statement": "2+2?", "gold": "4"}])
    with pytest.raises(ConfigError) as err:
        load_task(str(path)).problems("train")
    msg = str(err.value)
    assert "weird.jsonl:1: no problem text" in msg and "the dataset has columns: statement, gold" in msg
    assert "\n" not in msg
    nested = write_parquet(tmp_path / "dapo_like.parquet",
                           [{"prompt": [{"content": "x", "role": "user"}], "reward_model": {"style": "rule"}}])
    with pytest.raises(ConfigError, match=r"no answer \(expected reward_model.ground_truth\).*columns: prompt, "
                                          r"reward_model"):
        load_task(str(nested)).problems("train")


def test_spec_options_and_cli_error(tmp_path, capsys):
    assert split_task_spec("org/name:config=a+b,format=hash") == ("org/name", {"config": "a+b", "format": "hash"})
    assert split_task_spec("data/x.jsonl") == ("data/x.jsonl", {})
    assert split_task_spec("arithmetic:difficulty=2") == ("arithmetic", {"difficulty": "2"})
    with pytest.raises(ConfigError, match="unknown option"):
        load_task(str(write_jsonl(tmp_path / "a.jsonl", AIME25_ROWS)) + ":k=8")
    with pytest.raises(ConfigError, match="unknown dataset 'aime-1999'"):
        load_task(str(tmp_path / "a.jsonl") + ":dataset=aime-1999")
    with pytest.raises(ConfigError, match="format: must be one of boxed, answer_line, hash"):
        load_task(str(tmp_path / "a.jsonl") + ":format=latex")
    model = tmp_path / "model"
    from opdgeo.models import build_model, char_tokenizer, tiny_qwen3_config

    tok = char_tokenizer()
    build_model(tiny_qwen3_config("quick", len(tok)), seed=0).save_pretrained(model)
    tok.save_pretrained(model)
    dapo = write_parquet(tmp_path / "dapo.parquet", DAPO_ROWS)
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(model), "--task", str(dapo)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "opdgeo: error:" in err and "no held-out split" in err and "Traceback" not in err
