"""Thin command-line layer: parse options, call the library, print results."""

import os

# OpenMP threads that finished their share of a parallel region sleep instead of spinning
# (libgomp reads this once, when torch loads it, so it is set before anything imports
# torch). On a CPU shared with other work a spinning thread burns the core the next op
# needs: one fused-AdamW step over 55M parameters took 1.2-1.7 s spinning, 0.4-0.7 s
# passive on the 2-core host (bench/rl_step.py). An explicit setting in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
