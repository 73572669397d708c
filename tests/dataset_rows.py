"""Rows in the real schemas and answer formats of the datasets opdgeo knows, and writers
that lay them out as local files, folders and the Hugging Face caches (nothing downloaded).

Column names, nesting and value types follow each dataset's card on the Hub:
BytedTsinghua-SIA/DAPO-Math-17k, open-r1/DAPO-Math-17k-Processed, HuggingFaceH4/MATH-500,
HuggingFaceH4/aime_2024, math-ai/aime25, math-ai/amc23, math-ai/minervamath,
openai/gsm8k (main), open-r1/OpenR1-Math-220k (default).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

DAPO_HEAD = ("Solve the following math problem step by step. The last line of your response should be of the "
             "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_TAIL = "\n\nRemember to put your answer on its own line after \"Answer:\"."


def dapo_text(problem: str) -> str:
    return DAPO_HEAD + problem + DAPO_TAIL


def dapo_row(problem: str, answer: str, index: str) -> dict:
    return {"data_source": "math_dapo", "prompt": [{"content": dapo_text(problem), "role": "user"}],
            "ability": "MATH", "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": index}}


# 7 rows, 3 distinct problems: copies (one with different whitespace) and one copy whose
# answer disagrees, as the Hub copy repeats every prompt ~100 times.
DAPO_PROBLEMS = [
    ("In triangle $ABC$, $AB=13$, $BC=14$, $CA=15$. Find the area of the triangle.", "84", "a1"),
    ("Let $x$ be a real number with $x^2 = 1156$ and $x > 0$. Find $x$.", "34", "b2"),
    ("How many positive divisors does $360$ have?", "24", "c3"),
]
DAPO_ROWS = [
    dapo_row(*DAPO_PROBLEMS[0]),
    dapo_row(*DAPO_PROBLEMS[1]),
    dapo_row(*DAPO_PROBLEMS[0]),
    dapo_row(DAPO_PROBLEMS[1][0].replace(" with ", "  with\n"), "34", "b2"),  # same text up to whitespace
    dapo_row(*DAPO_PROBLEMS[2]),
    dapo_row(DAPO_PROBLEMS[2][0], "25", "c3"),  # a duplicate with another answer
    dapo_row(*DAPO_PROBLEMS[0]),
]


def dapo_processed_row(problem: str, answer: str, index: str) -> dict:
    src = dapo_row(problem, answer, index)
    return {"prompt": dapo_text(problem), "solution": answer, "data_source": "math_dapo",
            "source_prompt": src["prompt"], "ability": "MATH", "reward_model": src["reward_model"],
            "extra_info": src["extra_info"]}


DAPO_PROCESSED_ROWS = [dapo_processed_row(*p) for p in DAPO_PROBLEMS]

MATH500_ROWS = [
    {"problem": "Convert the point $(0,3)$ in rectangular coordinates to polar coordinates.  Enter your answer in "
                "the form $(r,\\theta),$ where $r > 0$ and $0 \\le \\theta < 2 \\pi.$",
     "solution": "We have that $r = \\sqrt{0^2 + 3^2} = 3.$  Also, the point is on the positive $y$-axis, so "
                 "$\\theta = \\frac{\\pi}{2}.$  Hence, the polar coordinates are "
                 "$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
     "answer": "\\left( 3, \\frac{\\pi}{2} \\right)", "subject": "Precalculus", "level": 2,
     "unique_id": "test/precalculus/807.json"},
    {"problem": "What is the value of $513^2 - 487^2$?",
     "solution": "Note that $513^2 - 487^2 = (513+487)(513-487) = 1000 \\cdot 26 = \\boxed{26000}$.",
     "answer": "26000", "subject": "Algebra", "level": 1, "unique_id": "test/algebra/2036.json"},
]

AIME24_ROWS = [
    {"id": 60, "problem": "Every morning Aya goes for a $9$-kilometer-long walk and stops at a coffee shop "
                          "afterwards. Find the number of minutes the walk takes her, including $t$ minutes.",
     "solution": "$9/s + t/60 = 4$ ... so the walk takes $\\boxed{204}$ minutes.", "answer": "204",
     "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_1", "year": "2024"},
    {"id": 61, "problem": "Let $ABC$ be a triangle inscribed in circle $\\omega$. Find $m + n$.",
     "solution": "... hence $m+n = \\boxed{113}$.", "answer": "113",
     "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_10", "year": "2024"},
]

AIME25_ROWS = [
    {"problem": "Find the sum of all integer bases $b>9$ for which $17_b$ is a divisor of $97_b$.", "answer": "70",
     "id": "0"},
    {"problem": "On $\\triangle ABC$ points $A, D, E$, and $B$ lie in that order on side $\\overline{AB}$. Find the "
                "area of the heptagon $AFNBCEM$.", "answer": "588", "id": "1"},
]

AMC23_ROWS = [  # numeric answers stored as float64
    {"id": 0, "problem": "Cities $A$ and $B$ are $45$ miles apart. How many miles from City $A$ will they be when "
                         "they meet?", "answer": 27.0,
     "url": "https://artofproblemsolving.com/wiki/index.php/2023_AMC_12A_Problems/Problem_1"},
    {"id": 1, "problem": "Positive real numbers $x$ and $y$ satisfy $y^3=x^2$ and $(y-x)^2=4y^2$. What is $x+y$?",
     "answer": 36.0, "url": "https://artofproblemsolving.com/wiki/index.php/2023_AMC_12A_Problems/Problem_2"},
]

MINERVA_ROWS = [
    {"question": "Each of the two Magellan telescopes has a diameter of $6.5 \\mathrm{~m}$. In one configuration "
                 "the effective focal length is $72 \\mathrm{~m}$. Find the diameter of the image of a planet (in "
                 "$\\mathrm{cm}$) at this focus if the angular diameter of the planet at the time of the observation "
                 "is $45^{\\prime \\prime}$.", "answer": "1.6"},
    {"question": "What is the wavelength in nm of the Balmer alpha line? Give your answer to 3 significant "
                 "figures.", "answer": "656"},
]

GSM8K_ROWS = {
    "train": [
        {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
                     "May. How many clips did Natalia sell altogether in April and May?",
         "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
                   "altogether in April and May.\n#### 72"},
        {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. How "
                     "much did she earn?",
         "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = "
                   "$<<0.2*50=10>>10.\n#### 10"},
    ],
    "test": [
        {"question": "Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes "
                     "muffins for her friends every day with four. She sells the remainder at the farmers' market "
                     "daily for $2 per fresh duck egg. How much in dollars does she make every day at the farmers' "
                     "market?",
         "answer": "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every "
                   "day at the farmer's market.\n#### 18"},
    ],
}

OPENR1_ROWS = [
    {"problem": "Find all real $x$ with $x^2 - 5x + 6 = 0$ and $x > 2$.",
     "solution": "Factor: $(x-2)(x-3)=0$, and $x>2$ leaves $\\boxed{3}$.", "answer": "3",
     "problem_type": "Algebra", "question_type": "math-word-problem", "source": "olympiads",
     "uuid": "0b1c2d3e-0000-5000-8000-000000000001", "is_reasoning_complete": [True, True],
     "generations": ["<think>\nThe roots are 2 and 3... so x = 2.\n</think>\nThe answer is $\\boxed{2}$.",
                     "<think>\nThe roots are 2 and 3; only 3 is above 2.\n</think>\nThe answer is $\\boxed{3}$."],
     "correctness_math_verify": [False, True], "correctness_llama": None, "finish_reasons": None,
     "correctness_count": 1,
     "messages": [{"content": "Find all real $x$ with $x^2 - 5x + 6 = 0$ and $x > 2$.", "role": "user"},
                  {"content": "<think>\nThe roots are 2 and 3; only 3 is above 2.\n</think>\nThe answer is "
                              "$\\boxed{3}$.", "role": "assistant"}]},
    {"problem": "Compute $7 \\cdot 8$.", "solution": "$7 \\cdot 8 = \\boxed{56}$.", "answer": "56",
     "problem_type": "Algebra", "question_type": "math-word-problem", "source": "cn_k12",
     "uuid": "0b1c2d3e-0000-5000-8000-000000000002", "is_reasoning_complete": [False, True],
     "generations": ["<think>\n7 times 8 is 56", "<think>\n7*8=56\n</think>\n$\\boxed{56}$"],
     "correctness_math_verify": [True, True], "correctness_llama": None, "finish_reasons": None,
     "correctness_count": 2,
     "messages": [{"content": "Compute $7 \\cdot 8$.", "role": "user"},
                  {"content": "<think>\n7*8=56\n</think>\n$\\boxed{56}$", "role": "assistant"}]},
]


# ------------------------------------------------------------------------- writers


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def readme(configs: dict[str, dict[str, str]]) -> str:
    """A dataset card whose YAML header maps config → split → data-file glob, as the Hub's do."""
    lines = ["---", "configs:"]
    for name, splits in configs.items():
        lines += [f"- config_name: {name}", "  data_files:"]
        lines += [f"  - split: {split}\n    path: {glob}" for split, glob in splits.items()]
    return "\n".join(lines + ["---", "", "# fixture"]) + "\n"


def hub_cache_dataset(cache: Path, repo_id: str, files: dict[str, list[dict] | str],
                      revision: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay out ``repo_id`` as the hub cache stores a dataset snapshot:
    ``datasets--org--name/{blobs/<sha256>, refs/main, snapshots/<rev>/<path> -> ../../blobs/<sha256>}``.

    ``files`` maps a repository path to rows (written as parquet or JSONL by suffix) or text.
    Returns the snapshot folder.
    """
    repo = cache / ("datasets--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for rel, content in files.items():
        tmp = repo / "tmp-file"
        if isinstance(content, str):
            tmp.write_text(content)
        elif rel.endswith(".parquet"):
            write_parquet(tmp, content)
        else:
            write_jsonl(tmp, content)
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        tmp.replace(blob)
        link = snap / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snap
