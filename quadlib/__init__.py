"""Quad Workbench: pretraining data selection by influence and diversity (Quad, ICLR 2025)."""

import os as _os

# OpenMP threads that finish a parallel region sleep instead of spinning. With the default (active)
# policy, a 2-thread torch process beside two busy processes on 2 cores took 12.9 s per training
# step of tiny-llama against 1.6 s with this setting (2.1 s on 1 thread); measured side by side in
# benchmarks/bench_demo_load.py. It must be set before the OpenMP runtime starts, so it is set
# here, in the `quad` command and in the Makefile; a value the user set is kept.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
