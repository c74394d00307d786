"""How long tracing and compacting a whole ResNet-18 take (goal: well under a second each), and
how they grow with depth (goal: linearly, a ratio near 2 for twice the layers).

Prints, measured in this run: the time of ``jaxprune.trace`` on ResNet-18 (224x224 inputs, the
ImageNet shape; from shapes only), the time of ``target.compact`` with half of every group's units
removed (the coupled stage groups included), and, for scale, the first (compiling) and warm calls
of the compacted network's ``apply``. Each figure is the median of several repeats. Then the
same two times for tanh MLPs of width 64 and 100 to 800 hidden layers (one group each), with the
ratio of each time to the one at half the depth, and the trace time of a pre-RMSNorm residual
stream of 100 to 400 blocks (the stream one group read by every norm's sum).

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
  _depth_scaling((50, 100, 200) if args.quick else (100, 200, 400, 800), repeats)
  _stream_scaling((50, 100, 200) if args.quick else (100, 200, 400), repeats)


def _mlp(p, x):
  for i, layer in enumerate(p):
    x = x @ layer["w"] + layer["b"]
    if i < len(p) - 1:
      x = jnp.tanh(x)
  return x


def _depth_scaling(depths, repeats):
  print("depth scaling, tanh MLP of width 64 (trace from shapes; compact keeps 3 of 4 units):")
  prev = None
  for depth in depths:
    sizes = [32] + [64] * depth + [10]
    params = [{"w": jnp.zeros((a, b)), "b": jnp.zeros(b)} for a, b in zip(sizes[:-1], sizes[1:])]
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    x_spec = jax.ShapeDtypeStruct((2, 32), jnp.float32)
    t_trace, target = _median(lambda: jaxprune.trace(_mlp, shapes, x_spec), repeats)
    um = {n: jnp.arange(g.size) % 4 != 0 for n, g in target.groups.items()}
    t_compact, _ = _median(lambda: target.compact(params, um), repeats)
    ratios = "" if prev is None else (f"   x{t_trace / prev[0]:.1f} / x{t_compact / prev[1]:.1f}"
                                      " for twice the layers")
    print(f"  {depth:4d} layers, {len(target.groups):4d} groups: trace {1e3 * t_trace:8.1f} ms, "
          f"compact {1e3 * t_compact:7.1f} ms{ratios}")
    prev = (t_trace, t_compact)


def _stream(p, tok):
  x = p["emb"][tok]
  for b in p["blocks"]:
    h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * b["g"]
    x = x + jax.nn.silu(h @ b["up"]) @ b["down"]
  return x @ p["head"]


def _stream_scaling(depths, repeats):
  """A pre-norm residual stream: every block's RMSNorm sums over the stream's units, and the
  stream is one group only if each sum's values are zero at a masked unit (each check reads
  what the earlier ones found: linear in depth, not quadratic)."""
  print("depth scaling, pre-RMSNorm residual stream of width 32 (MLP blocks of 64; the stream "
        "one group across all blocks):")
  prev = None
  for depth in depths:
    d, h = 32, 64
    params = {"emb": jnp.zeros((100, d)), "head": jnp.zeros((d, 100)),
              "blocks": [{"g": jnp.ones(d), "up": jnp.zeros((d, h)), "down": jnp.zeros((h, d))}
                         for _ in range(depth)]}
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    x_spec = jax.ShapeDtypeStruct((2, 16), jnp.int32)
    t_trace, target = _median(lambda: jaxprune.trace(_stream, shapes, x_spec), repeats)
    assert target.groups["emb"].read_by_products
    ratio = "" if prev is None else f"   x{t_trace / prev:.1f} for twice the blocks"
    print(f"  {depth:4d} blocks, {len(target.groups):4d} groups: trace {1e3 * t_trace:8.1f} ms"
          f"{ratio}")
    prev = t_trace


if __name__ == "__main__":
  main()
