"""Distinctiveness sweep, H=1000 units over 600 patterns: jitted sweep vs a NumPy pair loop.

The NumPy baseline is the straightforward implementation: a Python double loop over unit
pairs computing each angle with np.arccos of the cosine, then sorting qualifying pairs and
walking them. The loop is timed on a subset of rows and extrapolated to all H(H-1)/2 pairs
(printed as such). Run: python benchmarks/distinctiveness.py [--quick]
"""

import argparse
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import jaxprune  # noqa: E402
from _timing import call_times, load_line  # noqa: E402
from jaxprune.pruners import distinctiveness  # noqa: E402


def numpy_pairs(acts, rows):
  """Angles of pairs (i, j > i) for the first `rows` rows i, one pair at a time."""
  v = acts.T - 0.5
  h = v.shape[0]
  out = []
  for i in range(rows):
    for j in range(i + 1, h):
      c = np.dot(v[i], v[j]) / (np.linalg.norm(v[i]) * np.linalg.norm(v[j]))
      a = np.degrees(np.arccos(np.clip(c, -1.0, 1.0)))
      if a < 15.0 or a > 165.0:
        out.append((a, i, j))
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args()
  h, p = 1000, 600
  model = jaxprune.MLP(in_features=20, hidden=(h,), out_features=7, activation="sigmoid")
  params = model.init(jax.random.key(0))
  # Plant 20 duplicate pairs and 10 complementary pairs so the sweep has work to do.
  k = params["params"]["hidden_0"]["kernel"]
  b = params["params"]["hidden_0"]["bias"]
  for n in range(20):
    k, b = k.at[:, 500 + n].set(k[:, n]), b.at[500 + n].set(b[n])
  for n in range(10):
    k, b = k.at[:, 600 + n].set(-k[:, 100 + n]), b.at[600 + n].set(-b[100 + n])
  params["params"]["hidden_0"] = dict(kernel=k, bias=b)
  x = jax.random.normal(jax.random.key(1), (p, 20))
  acts = model.activations(params, x, "hidden_0")
  masks = jaxprune.unit_masks_ones(model)
  prune = distinctiveness(model, "hidden_0")
  sweep = lambda: prune(params, masks, acts, 15.0, 165.0)
  _, m, rep = sweep()  # compile
  repeats = 10 if args.quick else 50
  ts = call_times(sweep, repeats=repeats, min_time=0.0, warmup=False)
  t_jax, t_jax_min = statistics.median(ts), min(ts)

  a = np.asarray(acts)
  rows = 10 if args.quick else 40
  t0 = time.perf_counter()
  numpy_pairs(a, rows)
  t_sub = time.perf_counter() - t0
  pairs_sub = sum(h - 1 - i for i in range(rows))
  total_pairs = h * (h - 1) // 2
  t_np = t_sub * total_pairs / pairs_sub

  print(load_line())
  print(f"distinctiveness sweep, H={h} units x P={p} patterns "
        f"({int(rep.count)} actions, {int(np.sum(m['hidden_0']))} units kept)")
  print(f"  jitted sweep (angles included, median of {repeats}): {t_jax * 1e3:.1f} ms "
        f"(min {t_jax_min * 1e3:.1f} ms; target < 50 ms)")
  print(f"  NumPy pair loop: {t_sub:.2f} s for {pairs_sub} pairs (rows 0..{rows - 1}), "
        f"extrapolated to all {total_pairs} pairs: {t_np:.1f} s")
  print(f"  speedup: {t_np / t_jax:.0f}x (target >= 100x)")


if __name__ == "__main__":
  main()
