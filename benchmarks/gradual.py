"""Cost of a training step with ``jaxprune.gradual`` (and ``keep_masked``) vs plain optax.

Same model (the 4-conv + 4-dense CNN on 64x64 gray images, 178 k weights), same batch, same
Adam; one jitted step each (loss, gradients, update, apply). ``gradual`` is timed at a step where
the masks do not change (its ``lax.cond`` skips the pruning), which is nearly every step of a
run; its mask-update step is timed too, for reference. Rounds alternate between the variants so
that load on a shared machine hits them alike. Goal: under 5% overhead.

Run: python benchmarks/gradual.py [--quick]
"""

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(__file__))
from _timing import load_line  # noqa: E402
import jaxprune  # noqa: E402


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--quick", action="store_true")
  ap.add_argument("--batch", type=int, default=64)
  args = ap.parse_args()
  model = jaxprune.CNN4(input_shape=(64, 64, 1))
  variables = model.init(jax.random.key(0))
  params = variables["params"]
  x = jax.random.normal(jax.random.key(1), (args.batch, 64, 64, 1))
  y = jnp.arange(args.batch) % 7

  def loss(p):
    out = model.apply({"params": p}, x)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y))

  def make_step(tx):
    @jax.jit
    def step(p, state):
      g = jax.grad(loss)(p)
      u, state = tx.update(g, state, p)
      return optax.apply_updates(p, u), state
    return step

  adam = optax.adam(1e-3)
  grad_tx = jaxprune.gradual(adam, sparsity=0.8, begin_step=1000, end_step=2000, frequency=100)
  _, masks = jaxprune.prune_to_sparsity(params, None, 0.8)
  keep_tx = optax.chain(adam, jaxprune.keep_masked(masks))
  g_state = grad_tx.init(params)
  runs = {
      "plain optax adam": (make_step(adam), adam.init(params)),
      "gradual, masks unchanged": (make_step(grad_tx), g_state._replace(
          count=jnp.asarray(1001, jnp.int32))),
      "keep_masked": (make_step(keep_tx), keep_tx.init(params)),
      "gradual, mask-update step": (make_step(grad_tx), g_state._replace(
          count=jnp.asarray(1000, jnp.int32))),
  }
  rounds, calls = (5, 3) if args.quick else (40, 5)
  for step, state in runs.values():  # compile
    jax.block_until_ready(step(params, state))
  wall = {k: [] for k in runs}
  cpu = {k: [] for k in runs}
  for _ in range(rounds):
    for k, (step, state) in runs.items():
      w0, c0 = time.perf_counter(), time.process_time()
      for _ in range(calls):
        jax.block_until_ready(step(params, state))
      wall[k].append((time.perf_counter() - w0) / calls)
      cpu[k].append((time.process_time() - c0) / calls)
  print(f"CNN4 64x64x1, batch {args.batch}, Adam; {rounds} alternating rounds x {calls} calls; "
        f"{load_line()}")
  print("  (wall: median and min over rounds; CPU: process time of all threads, median, which "
        "contention on a shared machine inflates less)")
  base_w = statistics.median(wall["plain optax adam"])
  base_m = min(wall["plain optax adam"])
  base_c = statistics.median(cpu["plain optax adam"])
  for k in runs:
    w, m, c = statistics.median(wall[k]), min(wall[k]), statistics.median(cpu[k])
    print(f"  {k:28s} wall {1e3 * w:7.2f} ms (x{w / base_w:.3f})  min {1e3 * m:7.2f} ms "
          f"(x{m / base_m:.3f})  CPU {1e3 * c:7.2f} ms (x{c / base_c:.3f})")


if __name__ == "__main__":
  main()
