"""Experiment binaries: one absl program per published study (python -m experiments.<name>)."""

import os

# LAPACK calls (jnp.linalg inverses and SVDs, e.g. group redundancy's least-squares fits) run in
# the OpenBLAS that scipy bundles; its worker threads spin against XLA's own on a 2-core machine:
# group redundancy at H=500 took 14.6x longer with 2 OpenBLAS threads than with 1 at load 6.6
# (docs/benchmarks.md). Read when OpenBLAS loads, so it is set before numpy is imported; an
# OPENBLAS_NUM_THREADS of your own wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
