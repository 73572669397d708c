"""Benchmark of ``opdgeo compare`` on a synthetic pair shaped like one decoder layer.

Qwen3-1.7B layer (default): q, o 2048x2048; k, v 1024x2048; gate, up 6144x2048;
down 2048x6144. ``--qwen3-8b``: q, o 4096x4096; k, v 1024x4096; gate, up 12288x4096;
down 4096x12288. Stored in bf16 as two HF-layout folders in a temporary directory; the
tuned copy differs by a sparse perturbation biased towards low-magnitude entries (the
OPD/RLVR picture of SPEC §1). ``--per-shape`` keeps one matrix per distinct cost (q, k,
gate) and extrapolates to the layer: o costs as q, v as k, up and down as gate (down is
gate's transpose: the same Gram size and GEMM flops); the extrapolation is printed as such.

Measured in one run (the opdgeo side in a child process; peak memory is that process's
own ``VmHWM``, not ``ru_maxrss``, which can carry a parent's peak):

1. sparsity-only compare time / time to merely read both checkpoints (target <= 1.5);
2. full-metrics compare time (cold cache) / the naive method: two thin float64 SVDs per
   matrix in numpy (``np.linalg.svd(w, full_matrices=False)``: what a careful user
   writes), then each metric from them (target <= 0.5); ``--naive-full`` also times the
   ``full_matrices=True`` variant (numpy's default, which builds an m x m U no metric
   needs) as a labelled extra line;
3. the same full compare against the same base with a warm cache / the naive method
   (target <= 0.2), and warm / cold;
4. peak memory of the opdgeo process (MiB);
5. the largest difference from the naive method: NSS relative error (<= 1e-6) and
   principal-angle error in degrees over all k angles of both sides (<= 1e-5).

``--sweep`` instead times one cold compare per ``--metrics`` choice and ``--precision``
(each in its own child process: wall seconds and ``VmHWM``), per layer.

The last lines are ``name: value`` pairs for scripts. Usage::

    python bench/compare.py [--qwen3-8b] [--per-shape] [--workers N] [--repeat 7] [--svd-repeat 2] [--naive-full]
    python bench/compare.py --qwen3-8b --per-shape --sweep

Fairness: every ratio compares two timings taken in the same run, with the same thread
count, on page-cached files, as the minimum over interleaved repeats: ``--svd-repeat``
rounds, each a fresh child (read and sparsity-only ``--repeat`` times, then one cold
compare on an empty cache folder and one warm compare) followed by the naive method in
the parent, so a load that changes during the run weighs on both sides.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {
    "qwen3-1.7b": {"q": (2048, 2048), "k": (1024, 2048), "v": (1024, 2048), "o": (2048, 2048),
                   "gate": (6144, 2048), "up": (6144, 2048), "down": (2048, 6144)},
    "qwen3-8b": {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
                 "gate": (12288, 4096), "up": (12288, 4096), "down": (4096, 12288)},
}
#: per-shape mode: the matrices measured and how many of the layer's matrices each stands for
PER_SHAPE = {"q": 2, "k": 2, "gate": 3}
MODULE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
          "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


# --------------------------------------------------------------------------- synthetic data


def synthetic_pair(root: Path, shapes: dict, *, seed: int = 0, density: float = 0.3) -> tuple[Path, Path]:
    """Write ``root/base`` and ``root/tuned`` (bf16 ``model.safetensors`` + ``config.json``).

    W0 = 0.02·G + a rank-32 part with decaying strength (a spectrum with principal
    directions, like trained weights). The update touches about ``density`` of the entries,
    with probability decreasing in |w0| (low-magnitude bias), by a relative step of
    0.4-4 % (mostly visible in bf16; some steps are not).
    """
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    base, tuned = {}, {}
    for t, (m, n) in shapes.items():
        name = f"model.layers.0.{MODULE[t]}.weight"
        r = 32
        strength = torch.logspace(0, -1.5, r) * 0.5 / math.sqrt(max(m, n))
        w0 = 0.02 * torch.randn(m, n, generator=g)
        w0 += (torch.randn(m, r, generator=g) * strength) @ torch.randn(r, n, generator=g)
        w0 = w0.to(torch.bfloat16).float()
        mag = w0.abs()
        p = torch.exp(-mag / mag.median())  # low-magnitude entries are likelier to move
        p *= density / p.mean()
        hit = torch.rand(m, n, generator=g) < p.clamp(max=1.0)
        step = (0.004 + 0.036 * torch.rand(m, n, generator=g)) * torch.sign(torch.randn(m, n, generator=g))
        w1 = torch.where(hit, w0 * (1 + step) + 1e-5 * torch.randn(m, n, generator=g), w0)
        base[name] = w0.to(torch.bfloat16).contiguous()
        tuned[name] = w1.to(torch.bfloat16).contiguous()
        del w0, w1, mag, p, hit, step
    hidden = next(iter(shapes.values()))[1]
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
              "intermediate_size": shapes.get("gate", (4 * hidden,))[0], "num_hidden_layers": 1,
              "torch_dtype": "bfloat16"}
    folders = []
    for label, tensors in (("base", base), ("tuned", tuned)):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config))
        folders.append(folder)
    return folders[0], folders[1]


# --------------------------------------------------------------------------- naive reference


def naive(base: Path, tuned: Path, *, k: int, rank: int, alpha: float, eta: float, thin: bool = True) -> dict:
    """Every metric from two float64 SVDs with vectors per matrix, in numpy/scipy: thin
    (``full_matrices=False``, the honest baseline) unless ``thin=False``."""
    import scipy.linalg
    from safetensors.torch import load_file

    b = load_file(str(base / "model.safetensors"))
    t = load_file(str(tuned / "model.safetensors"))
    out = {}
    for name in b:
        w0 = b[name].double().numpy()
        w1 = t[name].double().numpy()
        U0, S0, V0t = np.linalg.svd(w0, full_matrices=not thin)
        U1, S1, V1t = np.linalg.svd(w1, full_matrices=not thin)
        kk = min(k, *w0.shape)
        left = np.sort(np.degrees(scipy.linalg.subspace_angles(U0[:, :kk], U1[:, :kk])))
        right = np.sort(np.degrees(scipy.linalg.subspace_angles(V0t[:kk].T, V1t[:kk].T)))
        update = np.abs(w1 - w0) > eta * np.maximum(np.abs(w0), np.abs(w1))
        n_sel = math.floor(alpha * w0.size + 0.5)
        recon = np.abs((U0[:, :rank] * S0[:rank]) @ V0t[:rank])
        principal = np.zeros(w0.size, bool)
        principal[np.argpartition(-recon.reshape(-1), n_sel)[:n_sel]] = True
        low = np.zeros(w0.size, bool)
        low[np.argpartition(np.abs(w0).reshape(-1), n_sel)[:n_sel]] = True
        upd = update.reshape(-1)
        out[name] = {
            "sparsity": 1.0 - upd.mean(),
            "nss": float(np.linalg.norm(S1 - S0) / np.linalg.norm(S0)),
            "left": left,
            "right": right,
            "principal_overlap": float((principal & upd).sum() / upd.sum()),
            "low_magnitude_overlap": float((low & upd).sum() / upd.sum()),
        }
        del U0, U1, V0t, V1t, w0, w1, recon
    return out


# --------------------------------------------------------------------------- opdgeo side


def peak_mib() -> float:
    """This process's own peak resident memory (``VmHWM``), MiB."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _read_both(base: Path, tuned: Path) -> float:
    """Read every tensor of both checkpoints into memory with the opdgeo reader.

    ``Checkpoint.load`` maps whole tensors zero-copy, so the bytes are only read when
    touched; ``clone()`` touches (copies) every byte, the least any reader must do.
    """
    from opdgeo.checkpoints import open_checkpoint

    t0 = time.perf_counter()
    for source in (base, tuned):
        ckpt = open_checkpoint(source)
        for name in ckpt.names():
            ckpt.load(name).clone()
    return time.perf_counter() - t0


def _opdgeo_side(
    base: str, tuned: str, cache: str, k: int, rank: int, workers: int, repeat: int, svd_repeat: int, queue
) -> None:
    """Runs in a child process: all opdgeo timings, the rows, and this process's peak memory."""
    import opdgeo

    base, tuned = Path(base), Path(tuned)
    _read_both(base, tuned)  # warm-up: imports and the page cache, for both sides alike
    import scipy.linalg  # noqa: F401  (imported once per run by either side, not per matrix)
    opdgeo.compare(base, tuned, metrics="sparsity", workers=workers)
    read_times, sparsity_times = [], []
    for _ in range(repeat):  # interleaved, best of `repeat`: the machine may be shared
        read_times.append(_read_both(base, tuned))
        t0 = time.perf_counter()
        opdgeo.compare(base, tuned, metrics="sparsity", workers=workers)
        sparsity_times.append(time.perf_counter() - t0)
    cold_times, warm_times = [], []
    for i in range(svd_repeat):  # interleaved cold/warm pairs, each cold with an empty cache
        t0 = time.perf_counter()
        cold = opdgeo.compare(base, tuned, k=k, rank=rank, workers=workers, cache=f"{cache}-{i}", keep_angles=True)
        cold_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        warm = opdgeo.compare(base, tuned, k=k, rank=rank, workers=workers, cache=f"{cache}-{i}", keep_angles=True)
        warm_times.append(time.perf_counter() - t0)
    queue.put({
        "read": min(read_times),
        "sparsity": min(sparsity_times),
        "cold": min(cold_times),
        "warm": min(warm_times),
        "cold_all": cold_times,
        "warm_all": warm_times,
        "read_all": read_times,
        "sparsity_all": sparsity_times,
        "rows": cold.matrices,
        "warm_rows": warm.matrices,
        "angles": {n: {s: v.tolist() for s, v in a.items()} for n, a in cold.angles.items()},
        "stats": [cold.stats, warm.stats],
        "peak_rss_mib": peak_mib(),
    })


def _sweep_child(base: str, tuned: str, metrics: str, precision: str, k: int, rank: int, workers: int, queue) -> None:
    """One cold compare in a fresh process: wall seconds and this process's peak memory."""
    import opdgeo

    _read_both(Path(base), Path(tuned))  # page cache and imports, not timed
    before = peak_mib()
    t0 = time.perf_counter()
    res = opdgeo.compare(base, tuned, metrics=metrics, precision=precision, k=k, rank=rank, workers=workers)
    seconds = time.perf_counter() - t0
    queue.put({"seconds": seconds, "peak_mib": peak_mib(), "peak_before_mib": before,
               "per_matrix": {r["name"]: r for r in res.matrices}})


def _child(target, args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


#: ``--sweep``: each ``--metrics`` choice at the default precision, and all metrics at fp32
SWEEP = [("sparsity", "fp64"), ("sparsity,nss", "fp64"), ("sparsity,angles", "fp64"), ("sparsity,overlap", "fp64"),
         ("sparsity,angles,nss,overlap", "fp64"), ("sparsity,angles,nss,overlap", "fp32")]


def _cpu_model() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _pairs(root: Path, preset: str, args) -> dict[str, tuple[Path, Path, int]]:
    """``{label: (base, tuned, layer factor)}``: the whole layer, or one pair per distinct cost."""
    shapes = {t: (m // args.shrink, n // args.shrink) for t, (m, n) in SHAPES[preset].items()}
    only = [t for t in args.shapes.split(",") if t] if args.shapes else list(PER_SHAPE)
    groups = {t: {t: shapes[t]} for t in PER_SHAPE if t in only} if args.per_shape else {"layer": shapes}
    out = {}
    for label, group in groups.items():
        t0 = time.perf_counter()
        base, tuned = synthetic_pair(root / label, group, seed=args.seed)
        size = sum(f.stat().st_size for f in (base / "model.safetensors", tuned / "model.safetensors"))
        factor = PER_SHAPE[label] if args.per_shape else 1
        print(f"synthetic {preset} {label} pair ({', '.join(f'{t} {m}x{n}' for t, (m, n) in group.items())}): "
              f"{size / 2**20:.0f} MiB of bf16 in {time.perf_counter() - t0:.1f} s; stands for {factor} matrices")
        out[label] = (base, tuned, factor)
    return out


def sweep(pairs: dict, args) -> dict[str, float]:
    """``--sweep``: one cold compare per metrics choice and precision, each in a fresh child;
    seconds per layer (summed over the pairs with their factors) and the largest peak."""
    out = {}
    for metrics, precision in SWEEP:
        layer_s, peak = 0.0, 0.0
        for label, (base, tuned, factor) in pairs.items():
            r = _child(_sweep_child, (str(base), str(tuned), metrics, precision, args.k, args.rank, args.workers))
            layer_s += factor * r["seconds"]
            peak = max(peak, r["peak_mib"])
            print(f"  {label:6s} --metrics {metrics:28s} --precision {precision}: {r['seconds']:8.2f} s, "
                  f"peak {r['peak_mib']:7.0f} MiB", flush=True)
        print(f"  layer  --metrics {metrics:28s} --precision {precision}: {layer_s:8.2f} s per layer, "
              f"peak {peak:7.0f} MiB", flush=True)
        out[f"sweep/{metrics}/{precision}/layer_s"] = layer_s
        out[f"sweep/{metrics}/{precision}/peak_mib"] = peak
    return out


def _errors(ours: dict, ref: dict) -> tuple[float, float, float]:
    """Largest NSS relative error, angle error (degrees) and overlap difference vs the naive rows."""
    nss_err = angle_err = overlap_err = 0.0
    for row in ours["rows"]:
        r = ref[row["name"]]
        assert abs(row["sparsity"] - r["sparsity"]) < 1e-12, row["name"]
        nss_err = max(nss_err, abs(row["nss"] - r["nss"]) / r["nss"])
        a = ours["angles"][row["name"]]
        angle_err = max(angle_err, float(np.max(np.abs(np.array(a["left"]) - r["left"]))) if len(a["left"]) else 0.0,
                        float(np.max(np.abs(np.array(a["right"]) - r["right"]))) if len(a["right"]) else 0.0)
        overlap_err = max(overlap_err, abs(row["principal_overlap"] - r["principal_overlap"]),
                          abs(row["low_magnitude_overlap"] - r["low_magnitude_overlap"]))
        left, right = row["angle_left_max_deg"], row["angle_right_max_deg"]
        print(f"  {row['name']:40s} sparsity {row['sparsity']:.4f}  nss {row['nss']:.3e}  max angle L/R "
              f"{'n/a' if left is None else f'{left:.4f}'}/{'n/a' if right is None else f'{right:.4f}'} deg  "
              f"gap {row.get('rel_gap', float('nan')):.2e}  "
              f"overlap P/L {row['principal_overlap']:.4f}/{row['low_magnitude_overlap']:.4f}")
    return nss_err, angle_err, overlap_err


def _rounds(base: Path, tuned: Path, cache: Path, args) -> tuple[dict, list[float], list[float]]:
    """``--svd-repeat`` rounds, each one child (read, sparsity, one cold and one warm compare)
    and then the naive method (and its ``full_matrices=True`` variant with ``--naive-full``)
    in this process: the naive timings interleave with ours, so a load that changes during
    the run weighs on both. Returns the merged child results (min over the rounds) and the
    naive timings."""
    merged, naive_s, naive_full_s = None, [], []
    for i in range(args.svd_repeat):
        ours = _child(_opdgeo_side, (str(base), str(tuned), f"{cache}-r{i}", args.k, args.rank,
                                     args.workers, args.repeat, 1))
        if merged is None:
            merged = ours
        else:
            for key in ("read_all", "sparsity_all", "cold_all", "warm_all"):
                merged[key] = merged[key] + ours[key]
            merged["peak_rss_mib"] = max(merged["peak_rss_mib"], ours["peak_rss_mib"])
        t0 = time.perf_counter()
        ref = naive(base, tuned, k=args.k, rank=args.rank, alpha=0.3, eta=1e-3, thin=True)
        naive_s.append(time.perf_counter() - t0)
        if args.naive_full:
            t0 = time.perf_counter()
            naive(base, tuned, k=args.k, rank=args.rank, alpha=0.3, eta=1e-3, thin=False)
            naive_full_s.append(time.perf_counter() - t0)
    for key in ("read", "sparsity", "cold", "warm"):
        merged[key] = min(merged[f"{key}_all"])
    merged["ref"] = ref
    return merged, naive_s, naive_full_s


def _ratios(pairs: dict, root: Path, args) -> dict[str, float]:
    """The issue's ratios, each from timings of one run, summed over the pairs with their factors."""
    tot = dict(read=0.0, sparsity=0.0, cold=0.0, warm=0.0, naive=0.0, naive_full=0.0)
    peak, errs, warm_same = 0.0, (0.0, 0.0, 0.0), True
    for label, (base, tuned, factor) in pairs.items():
        ours, naive_s, naive_full_s = _rounds(base, tuned, root / label / "cache", args)
        print(f"[{label}] read both checkpoints:      {ours['read']:8.3f} s   (min of {ours['read_all']})")
        print(f"[{label}] compare --metrics sparsity: {ours['sparsity']:8.3f} s   (min of {ours['sparsity_all']})")
        print(f"[{label}] compare full, cold cache:   {ours['cold']:8.2f} s   (runs {ours['cold_all']}; {ours['stats'][0]})")
        print(f"[{label}] compare full, warm cache:   {ours['warm']:8.2f} s   (runs {ours['warm_all']}; {ours['stats'][1]})")
        print(f"[{label}] naive numpy float64 SVDs, thin (full_matrices=False): {min(naive_s):8.2f} s   (runs {naive_s})",
              flush=True)
        if args.naive_full:
            tot["naive_full"] += factor * min(naive_full_s)
            print(f"[{label}] extra: naive with full_matrices=True: {min(naive_full_s):8.2f} s   (runs {naive_full_s})",
                  flush=True)
        errs = tuple(max(a, b) for a, b in zip(errs, _errors(ours, ours["ref"])))
        warm_same &= all(a == b for a, b in zip(ours["rows"], ours["warm_rows"]))
        for key in ("read", "sparsity", "cold", "warm"):
            tot[key] += factor * ours[key]
        tot["naive"] += factor * min(naive_s)
        peak = max(peak, ours["peak_rss_mib"])
    print(f"per layer: read {tot['read']:.3f} s, sparsity {tot['sparsity']:.3f} s, cold {tot['cold']:.2f} s, "
          f"warm {tot['warm']:.2f} s, naive thin {tot['naive']:.2f} s"
          + (f", naive full_matrices=True {tot['naive_full']:.2f} s" if args.naive_full else "")
          + (" (extrapolated from one matrix per shape)" if args.per_shape else ""))
    print(f"warm rows identical to cold: {warm_same}; max overlap difference vs naive: {errs[2]:.2e}")
    results = {
        "sparsity_vs_read": tot["sparsity"] / tot["read"],
        "full_vs_naive": tot["cold"] / tot["naive"],
        "warm_vs_naive": tot["warm"] / tot["naive"],
        "warm_vs_cold": tot["warm"] / tot["cold"],
        "peak_rss_mib": peak,
        "nss_rel_err": errs[0],
        "angle_err_deg": errs[1],
    }
    if args.naive_full:
        results["full_vs_naive_full_matrices"] = tot["cold"] / tot["naive_full"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qwen3-8b", action="store_true", help="Qwen3-8B layer shapes instead of Qwen3-1.7B")
    parser.add_argument("--per-shape", action="store_true",
                        help="one matrix per distinct cost (q, k, gate), extrapolated to the layer")
    parser.add_argument("--sweep", action="store_true", help="time each --metrics choice and --precision instead")
    parser.add_argument("--shapes", default="", help="with --per-shape: a subset of q,k,gate (the sums then cover it only)")
    parser.add_argument("--k", type=int, default=512)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=7, help="repeats of the (cheap) read and sparsity timings (min of N)")
    parser.add_argument("--svd-repeat", type=int, default=2,
                        help="interleaved cold/warm full-compare pairs (min of N each; a shared box is noisy)")
    parser.add_argument("--naive-full", action="store_true",
                        help="also time the naive method with full_matrices=True (an extra, labelled line)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shrink", type=int, default=1, help="divide every dimension by this (quick smoke runs)")
    args = parser.parse_args()

    preset = "qwen3-8b" if args.qwen3_8b else "qwen3-1.7b"
    import torch

    print(f"machine: {_cpu_model()}, {os.cpu_count()} CPUs, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}", flush=True)
    root = Path(tempfile.mkdtemp(prefix="opdgeo-bench-"))
    try:
        pairs = _pairs(root, preset, args)
        results = sweep(pairs, args) if args.sweep else _ratios(pairs, root, args)
        for name, value in results.items():
            print(f"{name}: {value:.4g}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
