"""lab: an LLM-unlearning lab (methods, metrics, gradient-geometry diagnostics)."""
import os

# OpenMP threads that spin while waiting make torch 10-100x slower on CPU whenever the cores are
# shared (pytest -n 2, notebooks beside a dashboard, CI runners): a 1.3M-parameter forward went from
# 0.12 s to 2.2 s on 2 cores. PASSIVE waiting costs nothing measurable when the machine is idle.
# Effective only if set before torch loads OpenMP: import lab first, or export it (Makefile, CI do).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
