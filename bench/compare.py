"""Benchmark of ``opdgeo compare`` on a synthetic pair shaped like one decoder layer.

Qwen3-1.7B layer (default): q, o 2048x2048; k, v 1024x2048; gate, up 6144x2048;
down 2048x6144. ``--qwen3-8b``: q, o 4096x4096; k, v 1024x4096; gate, up 12288x4096;
down 4096x12288. Stored in bf16 as two HF-layout folders in a temporary directory; the
tuned copy differs by a sparse perturbation biased towards low-magnitude entries (the
OPD/RLVR picture of SPEC §1).

Measured in one run (the opdgeo side in a child process, so its peak RSS is its own):

1. sparsity-only compare time / time to merely read both checkpoints (target <= 1.5);
2. full-metrics compare time (cold cache) / the naive method: two float64 full SVDs with
   vectors per matrix in numpy (``np.linalg.svd``, its default ``full_matrices=True``;
   ``--naive-thin`` for thin), then each metric from them (target <= 0.5);
3. a second full compare against the same base with a warm cache / the first (<= 0.5);
4. peak RSS of the opdgeo process (MiB);
5. the largest difference from the naive method: NSS relative error (<= 1e-6) and
   principal-angle error in degrees over all k angles of both sides (<= 1e-5).

The last lines are ``name: value`` pairs for scripts. Usage::

    python bench/compare.py [--qwen3-8b] [--workers N] [--repeat 7] [--svd-repeat 2] [--naive-thin]

Fairness: every ratio compares two timings taken in the same process, with the same
thread count, on page-cached files, as the minimum over interleaved repeats (read and
sparsity-only ``--repeat`` times; cold/warm full compares ``--svd-repeat`` times, each
cold run on an empty cache folder).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import resource
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
    m_q, hidden = shapes["q"]
    config = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
              "intermediate_size": shapes["gate"][0], "num_hidden_layers": 1, "torch_dtype": "bfloat16"}
    folders = []
    for label, tensors in (("base", base), ("tuned", tuned)):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "config.json").write_text(json.dumps(config))
        folders.append(folder)
    return folders[0], folders[1]


# --------------------------------------------------------------------------- naive reference


def naive(base: Path, tuned: Path, *, k: int, rank: int, alpha: float, eta: float, thin: bool) -> dict:
    """Every metric from two float64 full SVDs with vectors per matrix, in numpy/scipy."""
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
    """Runs in a child process: all opdgeo timings, the rows, and this process's peak RSS."""
    import opdgeo

    base, tuned = Path(base), Path(tuned)
    _read_both(base, tuned)  # warm-up: imports and the page cache, for both sides alike
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
    cold_time, warm_time = min(cold_times), min(warm_times)
    queue.put({
        "read": min(read_times),
        "sparsity": min(sparsity_times),
        "cold": cold_time,
        "warm": warm_time,
        "cold_all": cold_times,
        "warm_all": warm_times,
        "read_all": read_times,
        "sparsity_all": sparsity_times,
        "rows": cold.matrices,
        "warm_rows": warm.matrices,
        "angles": {n: {s: v.tolist() for s, v in a.items()} for n, a in cold.angles.items()},
        "stats": [cold.stats, warm.stats],
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--qwen3-8b", action="store_true", help="Qwen3-8B layer shapes instead of Qwen3-1.7B")
    parser.add_argument("--k", type=int, default=512)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=7, help="repeats of the (cheap) read and sparsity timings (min of N)")
    parser.add_argument("--svd-repeat", type=int, default=2,
                        help="interleaved cold/warm full-compare pairs (min of N each; a shared box is noisy)")
    parser.add_argument("--naive-thin", action="store_true", help="naive SVDs with full_matrices=False")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shrink", type=int, default=1, help="divide every dimension by this (quick smoke runs)")
    args = parser.parse_args()

    preset = "qwen3-8b" if args.qwen3_8b else "qwen3-1.7b"
    import torch

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}")
    root = Path(tempfile.mkdtemp(prefix="opdgeo-bench-"))
    try:
        t0 = time.perf_counter()
        shapes = {t: (m // args.shrink, n // args.shrink) for t, (m, n) in SHAPES[preset].items()}
        base, tuned = synthetic_pair(root, shapes, seed=args.seed)
        size = sum(f.stat().st_size for f in (base / "model.safetensors", tuned / "model.safetensors"))
        print(f"synthetic {preset} layer pair: {size / 2**20:.0f} MiB of bf16 in {time.perf_counter() - t0:.1f} s")

        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_opdgeo_side, args=(str(base), str(tuned), str(root / "cache"), args.k, args.rank,
                                                      args.workers, args.repeat, args.svd_repeat, queue))
        proc.start()
        ours = queue.get()
        proc.join()
        print(f"read both checkpoints:   {ours['read']:8.3f} s   (min of {ours['read_all']})")
        print(f"compare --metrics sparsity: {ours['sparsity']:8.3f} s   (min of {ours['sparsity_all']})")
        print(f"cold runs {ours['cold_all']}, warm runs {ours['warm_all']} (min of each used)")
        print(f"compare full, cold cache:   {ours['cold']:8.2f} s   (last run: {ours['stats'][0]})")
        print(f"compare full, warm cache:   {ours['warm']:8.2f} s   (last run: {ours['stats'][1]})")

        t0 = time.perf_counter()
        ref = naive(base, tuned, k=args.k, rank=args.rank, alpha=0.3, eta=1e-3, thin=args.naive_thin)
        naive_time = time.perf_counter() - t0
        kind = "thin" if args.naive_thin else "full_matrices=True"
        print(f"naive numpy float64 SVDs ({kind}): {naive_time:8.2f} s")

        nss_err = angle_err = overlap_err = 0.0
        for row in ours["rows"]:
            r = ref[row["name"]]
            assert abs(row["sparsity"] - r["sparsity"]) < 1e-12, row["name"]
            nss_err = max(nss_err, abs(row["nss"] - r["nss"]) / r["nss"])
            a = ours["angles"][row["name"]]
            angle_err = max(angle_err, float(np.max(np.abs(np.array(a["left"]) - r["left"]))),
                            float(np.max(np.abs(np.array(a["right"]) - r["right"]))))
            overlap_err = max(overlap_err, abs(row["principal_overlap"] - r["principal_overlap"]),
                              abs(row["low_magnitude_overlap"] - r["low_magnitude_overlap"]))
            print(f"  {row['name']:40s} sparsity {row['sparsity']:.4f}  nss {row['nss']:.3e}  "
                  f"max angle L/R {row['angle_left_max_deg']:.4f}/{row['angle_right_max_deg']:.4f} deg  "
                  f"overlap P/L {row['principal_overlap']:.4f}/{row['low_magnitude_overlap']:.4f}")
        warm_same = all(a == b for a, b in zip(ours["rows"], ours["warm_rows"]))
        print(f"warm rows identical to cold: {warm_same}; max overlap difference vs naive: {overlap_err:.2e}")
        results = {
            "sparsity_vs_read": ours["sparsity"] / ours["read"],
            "full_vs_naive": ours["cold"] / naive_time,
            "warm_vs_cold": ours["warm"] / ours["cold"],
            "peak_rss_mib": ours["peak_rss_mib"],
            "nss_rel_err": nss_err,
            "angle_err_deg": angle_err,
        }
        for name, value in results.items():
            print(f"{name}: {value:.4g}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
