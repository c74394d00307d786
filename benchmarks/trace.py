"""How long tracing and compacting a whole ResNet-18 take (goal: well under a second each).

Prints, measured in this run: the time of ``jaxprune.trace`` on ResNet-18 (224x224 inputs, the
ImageNet shape; from shapes only), the time of ``target.compact`` with half of every group's units
removed (the coupled stage groups included), and, for scale, the first (compiling) and warm calls
of the compacted network's ``apply``. Each figure is the median of several repeats.

  python benchmarks/trace.py [--quick]
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import jaxprune  # noqa: E402
from _timing import load_line  # noqa: E402


def _median(fn, repeats):
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(jax.tree.leaves(out))
    times.append(time.perf_counter() - t)
  return statistics.median(times), out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="64x64 inputs, fewer repeats")
  args = parser.parse_args()
  size, repeats = (64, 2) if args.quick else (224, 5)
  print(load_line())
  model = jaxprune.ResNet18(input_shape=(size, size, 3), num_classes=1000)
  params = model.init(jax.random.key(0))
  shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  x_spec = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  t_trace, target = _median(lambda: jaxprune.trace(model.apply, shapes, x_spec), repeats)
  rng = np.random.default_rng(0)
  um = {n: jnp.asarray(rng.permutation(g.size) < g.size // 2) for n, g in target.groups.items()}
  t_compact, (small, small_target) = _median(lambda: target.compact(params, um), repeats)
  n_full = sum(a.size for a in jax.tree.leaves(params))
  n_small = sum(a.size for a in jax.tree.leaves(small))
  x = jax.random.normal(jax.random.key(1), (8, size, size, 3))
  t0 = time.perf_counter()
  jax.block_until_ready(small_target.apply(small, x))
  t_first = time.perf_counter() - t0
  t_warm, _ = _median(lambda: small_target.apply(small, x), repeats)
  print(f"ResNet-18 {size}x{size}: {len(target.groups)} unit groups "
        f"({sum(1 for n in target.groups if n == 'conv1' or n.endswith('conv2'))} residual-coupled),"
        f" {len(jax.tree.leaves(params))} parameter leaves")
  print(f"trace:   {1e3 * t_trace:8.1f} ms   (median of {repeats})")
  print(f"compact: {1e3 * t_compact:8.1f} ms   (half of every group's units removed; "
        f"{n_full:,} -> {n_small:,} values)")
  print(f"compacted apply, batch 8: first call {1e3 * t_first:.0f} ms (compiles), "
        f"warm {1e3 * t_warm:.1f} ms")


if __name__ == "__main__":
  main()
