"""Inference speed of compacted networks against their masked originals.

Masking zeroes a unit's weights but keeps every multiply; compaction removes them. This prints,
for an MLP and the LeNet-style CNN at 25%, 50% and 90% of hidden units removed, the time per
batch of both and the speedup (masked / compacted), all measured side by side in this run, and
checks that both give the same outputs.

  python benchmarks/compaction.py [--quick]
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import jaxprune  # noqa: E402
from _timing import median_time  # noqa: E402


def random_unit_masks(model, fraction_removed, seed):
  rng = np.random.default_rng(seed)
  out = {}
  for name, size in model.group_sizes.items():
    keep = np.ones(size, bool)
    keep[rng.choice(size, int(round(fraction_removed * size)), replace=False)] = False
    out[name] = jnp.asarray(keep)
  return out


def bench(label, model, batch, repeats):
  params = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (batch,) + model.input_shape)
  rows = []
  for frac in (0.25, 0.5, 0.9):
    um = random_unit_masks(model, frac, seed=int(frac * 100))
    masked = jaxprune.apply_masks(params, jaxprune.expand(params, model, um))
    small, small_model = model.compact(params, um)
    f_masked = jax.jit(model.apply)
    f_small = jax.jit(small_model.apply)
    err = float(jnp.max(jnp.abs(f_masked(masked, x) - f_small(small, x))))
    t_m = median_time(f_masked, masked, x, repeats=repeats)
    t_s = median_time(f_small, small, x, repeats=repeats)
    rows.append((label, f"{frac:.0%}", t_m * 1e3, t_s * 1e3, t_m / t_s,
                 model.param_count(params), small_model.param_count(small), err))
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--quick", action="store_true", help="fewer repeats, smaller batches")
  args = ap.parse_args()
  repeats = 5 if args.quick else 30
  rows = []
  rows += bench("MLP 256-1024-1024-10", jaxprune.MLP(in_features=256, hidden=(1024, 1024),
                                                      out_features=10, activation="relu"),
                batch=64 if args.quick else 512, repeats=repeats)
  rows += bench("MLP 10-1000-7 (SFEW)", jaxprune.MLP(in_features=10, hidden=(1000,),
                                                      out_features=7),
                batch=442, repeats=repeats)
  rows += bench("LeNet 90x72x1", jaxprune.LeNet(), batch=8 if args.quick else 64,
                repeats=repeats)
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores")
  print(f"{'network':24s} {'removed':>7s} {'masked ms':>10s} {'compact ms':>10s} "
        f"{'speedup':>8s} {'params':>9s} {'kept':>9s} {'max |diff|':>10s}")
  for r in rows:
    print(f"{r[0]:24s} {r[1]:>7s} {r[2]:10.3f} {r[3]:10.3f} {r[4]:7.2f}x {r[5]:9d} {r[6]:9d} "
          f"{r[7]:10.2e}")


if __name__ == "__main__":
  main()
