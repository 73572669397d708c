"""Reading and deduplicating a dapo-math-17k-shaped split.

Builds a parquet file in dapo-math-17k's schema (chat ``prompt`` with DAPO's instruction,
``reward_model.ground_truth``, ``extra_info.index``…) holding ``--distinct`` problems
repeated ``--repeats`` times in a shuffled order (the Hub copy: 17,398 × ~100 ≈ 1.79M
rows), then, each in a fresh subprocess so that peak memory is its own:

- ``ours``: ``MathTask(file).distinct_problems("train")`` (rows streamed in batches, one
  entry kept per distinct prompt);
- ``materialize``: ``MathTask(file).problems("train")`` then ``deduplicate`` (every row a
  ``Problem`` first);
- ``pandas``: what open-r1 did to build DAPO-Math-17k-Processed: ``pandas.read_parquet``,
  the prompt text taken out of the chat column, ``drop_duplicates("prompt")``.

Prints each variant's seconds, peak RSS and distinct count, then ``name: value`` lines:
``ours_vs_pandas_time``, ``ours_vs_materialize_rss``, ``distinct_match`` (1 when all
three find the same number of distinct prompts).

    python bench/data.py [--distinct 17398] [--repeats 100]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HEAD = ("Solve the following math problem step by step. The last line of your response should be of the form "
        "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
TAIL = "\n\nRemember to put your answer on its own line after \"Answer:\"."

# (imports, timed work): imports are not timed
VARIANTS = {
    "ours": ("from opdgeo.tasks import MathTask", """
kept, counts = MathTask(PATH).distinct_problems("train")
result = {"distinct": counts.distinct, "rows": counts.rows}
"""),
    "materialize": ("from opdgeo.tasks import MathTask, deduplicate", """
rows = MathTask(PATH).problems("train")
kept, counts = deduplicate(rows)
result = {"distinct": counts.distinct, "rows": counts.rows}
"""),
    "pandas": ("import pandas as pd", """
df = pd.read_parquet(PATH)
df["text"] = df["prompt"].map(lambda m: m[0]["content"])
dedup = df.drop_duplicates("text")
result = {"distinct": len(dedup), "rows": len(df)}
"""),
}

RUNNER = """
import json, resource, sys, time
{imports}
PATH = sys.argv[1]
t0 = time.perf_counter()
{body}
result["seconds"] = time.perf_counter() - t0
# VmHWM, not ru_maxrss: on Linux ru_maxrss survives exec and would include the parent's
# footprint at fork time (it holds the table it wrote)
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
result["peak_rss_mib"] = (int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024
print(json.dumps(result))
"""


def build(path: Path, distinct: int, repeats: int, seed: int = 0) -> None:
    """The dapo-shaped parquet file (dictionary-encoded, so the file itself stays small)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    texts = [HEAD + f"Problem {i}: find the value of x such that {i} * x = {i * (i % 97 + 1)}, "
             + "with every step justified. " * 6 + TAIL for i in range(distinct)]
    order = rng.permutation(np.repeat(np.arange(distinct), repeats))
    prompt = pa.array([[{"content": t, "role": "user"}] for t in texts])
    table = pa.table({
        "data_source": pa.array(["math_dapo"] * distinct),
        "prompt": prompt,
        "ability": pa.array(["MATH"] * distinct),
        "reward_model": pa.array([{"ground_truth": str(i % 97 + 1), "style": "rule-lighteval/MATH_v2"}
                                  for i in range(distinct)]),
        "extra_info": pa.array([{"index": f"id-{i}"} for i in range(distinct)]),
    }).take(pa.array(order))
    pq.write_table(table, path, row_group_size=100_000)


def run(variant: str, path: Path) -> dict:
    imports, body = VARIANTS[variant]
    code = RUNNER.format(imports=imports, body=body)
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--distinct", type=int, default=17_398)
    ap.add_argument("--repeats", type=int, default=100)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dapo-math-17k.parquet"
        build(path, args.distinct, args.repeats)
        print(f"{args.distinct} distinct x {args.repeats} = {args.distinct * args.repeats:,} rows, "
              f"{path.stat().st_size / 2**20:.1f} MiB on disk")
        res = {v: run(v, path) for v in VARIANTS}
    for v, r in res.items():
        print(f"{v:12s} {r['seconds']:8.2f} s  peak {r['peak_rss_mib']:8.0f} MiB  distinct {r['distinct']:,} "
              f"of {r['rows']:,}")
    print(f"ours_vs_pandas_time: {res['ours']['seconds'] / res['pandas']['seconds']:.3f}")
    print(f"ours_vs_materialize_time: {res['ours']['seconds'] / res['materialize']['seconds']:.3f}")
    print(f"ours_vs_pandas_rss: {res['ours']['peak_rss_mib'] / res['pandas']['peak_rss_mib']:.3f}")
    print(f"ours_vs_materialize_rss: {res['ours']['peak_rss_mib'] / res['materialize']['peak_rss_mib']:.3f}")
    same = all(r["distinct"] == args.distinct for r in res.values())
    print(f"distinct_match: {int(same)}")


if __name__ == "__main__":
    main()
