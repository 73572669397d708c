"""Peak memory of ``opdgeo compare --legacy-atol`` against the bf16 count alone.

The pair is the synthetic decoder layer of ``bench/compare.py`` (Qwen3-8B shapes by
default: 193M parameters, 386 MB per bf16 checkpoint). Three child processes, each
started fresh so that its peak RSS is its own, run ``compare --metrics sparsity``:

1. ``plain``: the bf16 count only (the memory bound);
2. ``legacy``: with ``--legacy-atol 1e-5``, the blocked legacy count (``legacy_unchanged_count``);
3. ``legacy_whole``: the same with the former whole-tensor legacy mask (float64 copies of
   both tensors), patched in for comparison.

Every configuration also gives the global legacy sparsity, which must be the same number
for 2 and 3. The last lines are ``name: value`` pairs. Usage::

    python bench/legacy_memory.py [--qwen3-1.7b] [--keep DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

_CHILD = """
def peak_rss_mib():
    # VmHWM: this process's own peak (getrusage's ru_maxrss would carry the parent's over fork + exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

import json, sys, time
import opdgeo
mode, base, tuned = sys.argv[1:4]
if mode == "legacy_whole":
    import torch
    import opdgeo.geometry.sparsity as sp

    def whole(w0, w1, *, atol=1e-5, chunk=None):
        return int(torch.count_nonzero(sp.legacy_unchanged_mask(w0, w1, atol=atol)))

    sp.legacy_unchanged_count = whole
t0 = time.perf_counter()
res = opdgeo.compare(base, tuned, metrics="sparsity", legacy_atol=None if mode == "plain" else 1e-5)
print(json.dumps({"seconds": time.perf_counter() - t0, "legacy": res.summary.get("global_legacy_sparsity"),
                  "sparsity": res.summary["global_sparsity"],
                  "peak_rss_mib": peak_rss_mib()}))
"""


def _synthetic_pair():
    spec = importlib.util.spec_from_file_location("bench_compare", HERE / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(mode: str, base: Path, tuned: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", _CHILD, mode, str(base), str(tuned)], capture_output=True, text=True,
                          check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--qwen3-1.7b", dest="small", action="store_true", help="the 1.7B layer (100 MB per side)")
    parser.add_argument("--keep", type=Path, default=None, help="write the pair here and keep it")
    args = parser.parse_args()
    bench = _synthetic_pair()
    shapes = bench.SHAPES["qwen3-1.7b" if args.small else "qwen3-8b"]
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        base, tuned = bench.synthetic_pair(root, shapes)
        size_mb = sum(p.stat().st_size for p in (base / "model.safetensors", tuned / "model.safetensors")) / 1e6
        results = {mode: _run(mode, base, tuned) for mode in ("plain", "legacy", "legacy_whole")}
    assert results["legacy"]["legacy"] == results["legacy_whole"]["legacy"], "blocked and whole legacy counts differ"
    print(f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}, "
          f"pair of {size_mb:.0f} MB ({'Qwen3-1.7B' if args.small else 'Qwen3-8B'} layer shapes, bf16)")
    for mode, r in results.items():
        print(f"  {mode:13s} peak RSS {r['peak_rss_mib']:7.0f} MiB  {r['seconds']:6.2f} s  "
              f"legacy sparsity {r['legacy']}")
    plain = results["plain"]["peak_rss_mib"]
    print(f"pair_mb: {size_mb:.0f}")
    print(f"peak_rss_plain_mib: {plain:.0f}")
    print(f"peak_rss_legacy_mib: {results['legacy']['peak_rss_mib']:.0f}")
    print(f"peak_rss_legacy_whole_mib: {results['legacy_whole']['peak_rss_mib']:.0f}")
    print(f"legacy_vs_plain_rss: {results['legacy']['peak_rss_mib'] / plain:.3f}")
    print(f"legacy_whole_vs_plain_rss: {results['legacy_whole']['peak_rss_mib'] / plain:.3f}")
    print(f"legacy_vs_plain_time: {results['legacy']['seconds'] / results['plain']['seconds']:.3f}")


if __name__ == "__main__":
    main()
