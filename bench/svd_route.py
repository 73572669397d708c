"""Benchmark of the two routes of ``opdgeo.geometry.lowrank.top_svd``: where the exact thin
SVD is cheaper than the randomized top-k SVD (``EXACT_SVD_MAX_DIM``).

For each shape and a slow (σ_i = i^-0.3) and a fast (i^-1) power-law spectrum with
Haar-random singular vectors (float64), the best of ``--repeats`` timings of
``exact_svd(w)`` and of ``randomized_top_svd(w, k)`` (the trajectory's settings:
oversample 64, tol 1e-4), one torch thread. Printed: ``exact/randomized`` time ratios
(< 1: the exact route is cheaper), measured back to back in one process. Usage::

    python bench/svd_route.py [--k 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

SHAPES = [(128, 128), (256, 128), (128, 256), (160, 160), (192, 192), (1024, 192), (192, 1024), (224, 224),
          (256, 256), (1024, 256), (384, 384), (512, 512), (768, 768), (1024, 1024)]


def _matrix(m: int, n: int, p: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))
    return (u * torch.arange(1, r + 1, dtype=torch.float64) ** (-p)) @ v.T


def _best(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    from opdgeo.geometry.lowrank import EXACT_SVD_MAX_DIM, exact_svd, randomized_top_svd

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"threads {torch.get_num_threads()}, EXACT_SVD_MAX_DIM = {EXACT_SVD_MAX_DIM}")
    for m, n in SHAPES:
        ratios = []
        for p in (0.3, 1.0):
            w = _matrix(m, n, p)
            t_exact = _best(lambda: exact_svd(w), a.repeats)
            t_rand = _best(lambda: randomized_top_svd(w, a.k), a.repeats)
            ratios.append(f"i^-{p}: {t_exact / t_rand:.2f} ({1e3 * t_exact:.1f} / {1e3 * t_rand:.1f} ms)")
        print(f"{m}x{n}: exact/randomized " + ", ".join(ratios), flush=True)


if __name__ == "__main__":
    main()
