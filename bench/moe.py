"""``opdgeo compare`` on a mixture-of-experts layer: fused layout against per-expert layout.

One Qwen3-30B-A3B-shaped MoE layer (hidden 2048, expert intermediate 768; ``--experts``
experts, 32 by default: 151M parameters, 302 MB per bf16 checkpoint), written twice from
the same tensors:

- per-expert (``mlp.experts.<e>.gate_proj.weight``, as ``save_pretrained`` writes it);
- fused (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I], as
  transformers >= 5 holds it in memory).

Each side runs ``compare --metrics sparsity`` (``--metrics`` to change) in a fresh child process (its own peak
RSS, from ``VmHWM``). The fused side reads one expert's byte range at a time, so its time
and memory should match the per-expert side (ratios near 1); the size of one fused tensor
is printed for scale (what a reader that materialized it would hold at once). The rows of
the two sides must be identical. The last lines are ``name: value`` pairs. Usage::

    python bench/moe.py [--experts 32] [--metrics sparsity]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HIDDEN, INTER = 2048, 768

_CHILD = """
import json, sys, time
import opdgeo

def peak_rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

base, tuned, metrics = sys.argv[1:4]
t0 = time.perf_counter()
res = opdgeo.compare(base, tuned, metrics=metrics)
print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mib": peak_rss_mib(), "csv": res.to_csv()}))
"""


def write_pair(root: Path, experts: int, seed: int = 0) -> dict[str, Path]:
    """Base and tuned in both layouts; the tuned copy moves a third of the experts."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    gate_up = (0.02 * torch.randn(experts, 2 * INTER, HIDDEN, generator=g)).to(torch.bfloat16)  # [E, 2I, H]
    down = (0.02 * torch.randn(experts, HIDDEN, INTER, generator=g)).to(torch.bfloat16)  # [E, H, I]
    moved = torch.arange(experts) % 3 == 0
    gate_up_1 = gate_up.clone()
    down_1 = down.clone()
    gate_up_1[moved] += (1e-3 * torch.randn(int(moved.sum()), 2 * INTER, HIDDEN, generator=g)).to(torch.bfloat16)
    down_1[moved] += (1e-3 * torch.randn(int(moved.sum()), HIDDEN, INTER, generator=g)).to(torch.bfloat16)
    config = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": HIDDEN,
              "moe_intermediate_size": INTER, "num_experts": experts, "num_hidden_layers": 1}
    prefix = "model.layers.0.mlp.experts"
    out = {}
    for label, (gu, dn) in (("base", (gate_up, down)), ("tuned", (gate_up_1, down_1))):
        layouts = {
            "fused": {f"{prefix}.gate_up_proj": gu.contiguous(), f"{prefix}.down_proj": dn.contiguous()},
            "per_expert": {name: t for e in range(experts) for name, t in (
                (f"{prefix}.{e}.gate_proj.weight", gu[e, :INTER].clone()),
                (f"{prefix}.{e}.up_proj.weight", gu[e, INTER:].clone()),
                (f"{prefix}.{e}.down_proj.weight", dn[e].clone()))},
        }
        for layout, tensors in layouts.items():
            folder = root / f"{label}-{layout}"
            folder.mkdir(parents=True)
            save_file(tensors, str(folder / "model.safetensors"))
            (folder / "config.json").write_text(json.dumps(config))
            out[f"{label}-{layout}"] = folder
    return out


def _run(base: Path, tuned: Path, metrics: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(base), str(tuned), metrics], capture_output=True,
                          text=True, check=True, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--metrics", default="sparsity")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folders = write_pair(Path(tmp), args.experts)
        per = _run(folders["base-per_expert"], folders["tuned-per_expert"], args.metrics)
        fused = _run(folders["base-fused"], folders["tuned-fused"], args.metrics)
        mb = (folders["base-fused"] / "model.safetensors").stat().st_size / 1e6
    assert per["csv"] == fused["csv"], "the two layouts gave different rows"
    fused_tensor_mib = args.experts * 2 * INTER * HIDDEN * 2 / 2**20
    print(f"machine: {platform.machine()}, python {platform.python_version()}; one MoE layer, {args.experts} experts "
          f"of {INTER}x{HIDDEN}, {mb:.0f} MB per bf16 checkpoint; --metrics {args.metrics}")
    for label, r in (("per-expert", per), ("fused", fused)):
        print(f"  {label:10s} {r['seconds']:7.2f} s  peak RSS {r['peak_rss_mib']:6.0f} MiB")
    print(f"  one fused gate_up_proj tensor: {fused_tensor_mib:.0f} MiB")
    print(f"fused_vs_per_expert_time: {fused['seconds'] / per['seconds']:.3f}")
    print(f"fused_vs_per_expert_rss: {fused['peak_rss_mib'] / per['peak_rss_mib']:.3f}")
    print(f"peak_rss_fused_mib: {fused['peak_rss_mib']:.0f}")
    print(f"fused_gate_up_tensor_mib: {fused_tensor_mib:.0f}")
    print("identical_rows: 1")


if __name__ == "__main__":
    main()
