"""Global magnitude pruning over a ResNet-18-sized pytree (11.7 M weights) vs NumPy partition.

The pytree has ResNet-18's conv and dense kernels (ImageNet shapes, 1000 classes) plus its
biases and batch-norm scales, which are not pruned. The NumPy baseline concatenates |w| of the
kernels, finds the cut with np.partition, and builds masks with exact counts (ties by
position). Run: python benchmarks/magnitude.py [--quick]
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _timing import median_time  # noqa: E402
from jaxprune.pruners import magnitude_prune  # noqa: E402


def resnet18_shapes():
  shapes = {"conv_init": (7, 7, 3, 64)}
  cin = 64
  for stage, cout in enumerate((64, 128, 256, 512)):
    for block in range(2):
      stride2 = stage > 0 and block == 0
      name = f"stage{stage}_block{block}"
      shapes[f"{name}_conv1"] = (3, 3, cin, cout)
      shapes[f"{name}_conv2"] = (3, 3, cout, cout)
      if stride2:
        shapes[f"{name}_proj"] = (1, 1, cin, cout)
      cin = cout
  shapes["dense"] = (512, 1000)
  return shapes


def build(key):
  params = {}
  for n, (name, shape) in enumerate(resnet18_shapes().items()):
    k = jax.random.fold_in(key, n)
    layer = {"kernel": jax.random.normal(k, shape) * 0.05}
    if name == "dense":
      layer["bias"] = jnp.zeros(shape[-1])
    else:
      layer["scale"] = jnp.ones(shape[-1])
    params[name] = layer
  return {"params": params}


def numpy_global(kernels, fraction):
  flat = np.abs(np.concatenate([k.ravel() for k in kernels]))
  n_remove = int(round(fraction * flat.size))
  keep = np.ones(flat.size, bool)
  if n_remove:
    cut = np.partition(flat, n_remove - 1)[n_remove - 1]
    below = flat < cut
    keep[below] = False
    ties = np.flatnonzero(flat == cut)[: n_remove - int(below.sum())]
    keep[ties] = False
  out, start = [], 0
  for k in kernels:
    out.append(keep[start:start + k.size].reshape(k.shape))
    start += k.size
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  args = ap.parse_args()
  params = build(jax.random.key(0))
  n = sum(int(np.prod(s)) for s in resnet18_shapes().values())
  kernels_j = [params["params"][k]["kernel"] for k in resnet18_shapes()]
  kernels_np = [np.asarray(k) for k in kernels_j]
  repeats = 3 if args.quick else 7
  f = 0.8
  run = lambda: magnitude_prune(params, None, f, scope="global")
  _, masks, _ = run()  # compile
  t_jax = median_time(run, repeats=repeats, min_time=0.0, warmup=False)
  t_np = median_time(lambda: numpy_global(kernels_np, f), repeats=repeats, min_time=0.0,
                     warmup=False)
  def numpy_same_work():  # the same outputs as jaxprune: masks and masked kernels
    m = numpy_global(kernels_np, f)
    return m, [np.where(mk, k, 0.0) for mk, k in zip(m, kernels_np)]
  t_np2 = median_time(numpy_same_work, repeats=repeats, min_time=0.0, warmup=False)
  ref = numpy_global(kernels_np, f)
  got = [np.asarray(masks["params"][k]["kernel"]) for k in resnet18_shapes()]
  same = all(np.array_equal(a, b) for a, b in zip(ref, got))
  print(f"global magnitude pruning, {n / 1e6:.2f} M kernel weights, fraction {f}")
  print(f"  jaxprune.magnitude_prune (jit, median of {repeats}): {t_jax * 1e3:.0f} ms "
        "(masks and masked params)")
  print(f"  NumPy partition, masks only: {t_np * 1e3:.0f} ms; masks and masked kernels (the "
        f"same outputs): {t_np2 * 1e3:.0f} ms")
  print(f"  ratio NumPy / jaxprune: {t_np / t_jax:.2f}x against masks only, {t_np2 / t_jax:.2f}x "
        f"on the same work (target >= 1); masks identical: {same}")


if __name__ == "__main__":
  main()
