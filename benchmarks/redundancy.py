"""Group redundancy: exact fits from a carried null basis, SVDs of the kept columns only.

The case of the main job's comparison stage: a 10-H-7 sigmoid MLP seen on fewer patterns than
it has hidden units (N=398 and H=500 by default; inputs scaled so the sigmoid units are about
as nonlinear as the study's trained ones), so the first ~N removals are exact (each removed unit
is a linear combination of the others on these patterns) and the rest are least-squares fits
within ``--tol``. ``group_redundancy`` fits an exact removal from the null space of the other
kept units' activations, carried from removal to removal (one Householder reflection each),
whenever that is provably the SVD's fit; once an SVD has found the kept columns of full rank
(nothing cut), the later fits by a QR; the other removals by an SVD of the kept columns
gathered into the narrowest of 4 static widths (in a group large enough for it,
``redundancy._GATHER_MIN_WORK``; else one width). Printed side by side in one process: that
pruner; the same with the widths forced and with one width (first call: the compilation they
cost); the same without the QR fits (widths forced); forced to an SVD at every removal; and
forced to an SVD of all H columns at every removal (the implementation before these changes;
same ranking). Their removals must be
the same and their coefficients agree to float rounding. Run: python benchmarks/redundancy.py
[--quick]
"""

import argparse
import os
import resource
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
# This checkout's jaxprune, not whichever one is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jaxprune  # noqa: E402
from jaxprune.pruners import redundancy  # noqa: E402
from _timing import call_times, load_line  # noqa: E402


def case(hidden: int, patterns: int, seed: int = 0):
  """A sigmoid MLP with the study's shape whose inputs are correlated like image features."""
  model = jaxprune.MLP(in_features=10, hidden=(hidden,), out_features=7, activation="sigmoid")
  params = model.init(jax.random.key(seed))
  rng = np.random.default_rng(seed)
  mix = rng.normal(size=(10, 10)) / np.sqrt(10)
  x = (rng.normal(size=(patterns, 10)) @ mix * 4.0).astype(np.float32)
  return model, params, model.activations(params, x, "hidden_0")


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--hidden", type=int, default=500)
  ap.add_argument("--patterns", type=int, default=398)
  ap.add_argument("--tol", type=float, default=0.1)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--quick", action="store_true", help="H=120 on 80 patterns, one repeat")
  a = ap.parse_args()
  if a.quick:
    a.hidden, a.patterns, a.repeats = 120, 80, 1
  model, params, acts = case(a.hidden, a.patterns)
  um = jaxprune.unit_masks_ones(model)
  print(f"group redundancy, 10-{a.hidden}-7 sigmoid MLP, {a.patterns} patterns, tol {a.tol} "
        f"({load_line()})")
  results = {}
  defaults = (redundancy._NULL_MIN, redundancy._WIDTHS, redundancy._QR_FITS,
              redundancy._GATHER_MIN_WORK)
  variants = (("null basis + QR + SVD", defaults),
              ("the same, widths forced", defaults[:3] + (0.0,)),
              ("the same, one width", (defaults[0], 1) + defaults[2:]),
              ("null basis + narrow SVD", defaults[:2] + (0.0, 0.0)),
              ("narrow SVD every removal", (2.0, 4, 0.0, 0.0)),
              ("full SVD every removal", (2.0, 1, 0.0, 0.0)))  # P_jj <= 1 < 2: never the basis
  for name, (null_min, widths, qr, min_work) in variants:
    # _NULL_MIN and _QR_FITS are read at every call (passed as values), _WIDTHS and
    # _GATHER_MIN_WORK (below it: one width) when the pruner is traced
    (redundancy._NULL_MIN, redundancy._WIDTHS, redundancy._QR_FITS,
     redundancy._GATHER_MIN_WORK) = null_min, widths, qr, min_work
    prune = jaxprune.group_redundancy(model, "hidden_0")
    t0 = time.perf_counter()
    out = jax.block_until_ready(prune(params, um, acts, a.tol))
    first = time.perf_counter() - t0
    cpu0 = resource.getrusage(resource.RUSAGE_SELF).ru_utime
    times = call_times(prune, params, um, acts, a.tol, repeats=a.repeats, min_time=0.0,
                       warmup=False)
    cpu = (resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu0) / len(times)
    rep = out[2]
    count = int(rep.count)
    exact = int(np.sum(np.asarray(rep.residual[:count]) < 1e-4))
    t = float(np.median(times))
    results[name] = (rep, t)
    print(f"  {name:25s} {t:7.3f} s ({1e3 * t / max(count, 1):5.1f} ms per removal, CPU "
          f"{cpu:6.3f} s)  first call {first:6.2f} s  removed {count} ({exact} exact)")
  (redundancy._NULL_MIN, redundancy._WIDTHS, redundancy._QR_FITS,
   redundancy._GATHER_MIN_WORK) = defaults
  (_, t_fast), _, _, (_, t_before), _, (full, t_full) = results.values()
  same = all(np.array_equal(np.asarray(r.removed), np.asarray(full.removed))
             for r, _ in results.values())
  diff = max(float(np.max(np.abs(np.asarray(r.coef) - np.asarray(full.coef))))
             for r, _ in results.values())
  print(f"  same removals: {same}; largest coefficient difference {diff:.1e}; "
        f"{t_before / t_fast:.2f}x without the QR fits, {t_full / t_fast:.2f}x the full SVD at "
        "every removal")


if __name__ == "__main__":
  main()
