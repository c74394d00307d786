"""Distinctiveness sweeps: a sparse case with planted pairs, and the dense regime of the studies.

Sparse (H=1000 units over 600 patterns, 20 planted duplicates and 10 complementary pairs): the
jitted sweep vs a NumPy pair loop (a Python double loop over unit pairs computing each angle
with np.arccos, timed on a subset of rows and extrapolated to all H(H-1)/2 pairs).

Dense (a 10-H-7 sigmoid MLP on 600 patterns of 10 inputs, H = 100, 1000, 4000): the hidden
vectors lie near a 10-dimensional manifold, so hundreds to thousands of pairs qualify. Printed
side by side: the published threshold sweep (similar below 0, 5, ..., 90 degrees, complementary
above 180 minus that, one float step above 90 at 90) as one vmapped call and as a Python loop of
19 calls; one call at 15, 45 and 90 degrees; one HxH angle matrix (the floor for any sweep); and
a NumPy implementation (float64 angles, the sequential definition walked in Python). Every mask
is checked against the others. Run: python benchmarks/distinctiveness.py [--quick]
"""

import argparse
import os
import resource
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
# This checkout's jaxprune, not whichever one is installed.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


SWEEP = np.arange(0.0, 91.0, 5.0, dtype=np.float32)  # the 19 published angles
SWEEP_COMP = np.maximum(180.0 - SWEEP, np.nextafter(SWEEP, np.float32(181.0)))


def numpy_sweep(vecs, sim, comp):
  """The sequential definition in NumPy: float64 angles, qualifying pairs sorted by (excess,
  kind, i, j), walked in Python (no absorb). Returns the keep mask."""
  v = vecs.astype(np.float64)
  u = v / np.linalg.norm(v, axis=1, keepdims=True)
  ang = np.degrees(np.arccos(np.clip(u @ u.T, -1.0, 1.0)))
  i, j = np.triu_indices(len(v), 1)
  a = ang[i, j]
  is_s = a < sim
  is_c = ~is_s & (a > comp)
  q = is_s | is_c
  i, j, a, is_c = i[q], j[q], a[q], is_c[q]
  ex = np.where(is_c, a - comp, sim - a)
  order = np.lexsort((j, i, is_c, -ex))
  free = np.ones(len(v), bool)
  keep = np.ones(len(v), bool)
  for n in order.tolist():
    x, y = i[n], j[n]
    if free[x] and free[y]:
      free[x] = free[y] = False
      keep[y] = False
      if is_c[n]:
        keep[x] = False
  return keep


def best_of(fn, repeats):
  """(median, min) seconds of ``repeats`` warm calls (one untimed call first)."""
  ts = call_times(fn, repeats=repeats, min_time=0.0)
  return statistics.median(ts), min(ts)


def load():
  return f"load {os.getloadavg()[0]:.1f}"


def dense(h, repeats, with_numpy):
  """One row of the dense-regime table."""
  p = 600
  model = jaxprune.MLP(in_features=10, hidden=(h,), out_features=7, activation="sigmoid")
  params = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (p, 10))
  acts = model.activations(params, x, "hidden_0")
  masks = jaxprune.unit_masks_ones(model)
  prune = distinctiveness(model, "hidden_0", constants=False)
  sweep = jax.vmap(prune, in_axes=(None, None, None, 0, 0))
  sims, comps = jax.numpy.asarray(SWEEP), jax.numpy.asarray(SWEEP_COMP)
  angles = jaxprune.pruners.pairwise_angles
  vecs = jax.numpy.asarray(acts).T - 0.5
  print(f"H={h}: ({load()} at start)")
  t, tmin = best_of(lambda: angles(vecs), repeats)
  t_ang = tmin
  print(f"  one HxH angle matrix (Gram + angles): {t * 1e3:8.1f} ms (min {tmin * 1e3:.1f}; "
        f"{load()})")
  t, tmin = best_of(lambda: sweep(params, masks, acts, sims, comps), repeats)
  t_vmap = tmin
  print(f"  19-angle sweep, vmapped:             {t * 1e3:8.1f} ms (min {tmin * 1e3:.1f}; "
        f"{load()})")
  loop = lambda: [prune(params, masks, acts, float(s), float(c)) for s, c in
                  zip(SWEEP, SWEEP_COMP)]
  t, tmin = best_of(loop, repeats)
  t_loop = tmin
  print(f"  19-angle sweep, Python loop:         {t * 1e3:8.1f} ms (min {tmin * 1e3:.1f}; "
        f"{load()})")
  _, vm, vr = sweep(params, masks, acts, sims, comps)
  loop_masks = [m["hidden_0"] for _, m, _ in loop()]
  agree = all(np.array_equal(vm["hidden_0"][n], loop_masks[n]) for n in range(len(SWEEP)))
  print(f"  vmapped / loop: {t_vmap / t_loop:.2f}; masks agree: {agree}; actions per angle: "
        f"{np.asarray(vr.count).tolist()}")
  for a in (15.0, 45.0, 90.0):
    c = float(max(180.0 - a, np.nextafter(np.float32(a), np.float32(181.0))))
    t, tmin = best_of(lambda: prune(params, masks, acts, a, c), repeats)
    _, m1, r1 = prune(params, masks, acts, a, c)
    line = (f"  one call at {a:g} deg:  {t * 1e3:8.1f} ms (min {tmin * 1e3:.1f}; "
            f"{tmin / t_ang:.2f}x the angle matrix; {int(r1.count)} actions; {load()})")
    if with_numpy:
      t0 = time.perf_counter()
      ref = numpy_sweep(np.asarray(vecs), a, c)
      t_np = time.perf_counter() - t0
      line += (f"\n      NumPy (float64 angles + Python walk): {t_np * 1e3:8.1f} ms; masks "
               f"agree: {np.array_equal(ref, np.asarray(m1['hidden_0']))}")
    print(line)
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
  print(f"  peak resident memory of this process so far: {rss:.2f} GiB")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--dense_only", action="store_true")
  args = ap.parse_args()
  print(load_line(), "| jaxprune from", os.path.dirname(jaxprune.__file__))
  print("Dense regime: 10-H-7 sigmoid MLP, 600 patterns of 10 inputs")
  for h in ((100, 1000) if args.quick else (100, 1000, 4000)):
    dense(h, 2 if h > 1000 else 3 if args.quick else 7, with_numpy=True)
  if args.dense_only:
    return
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
