"""The main job's training grid: ``jaxprune.fit_many`` against a plain per-run Flax/Optax loop.

The grid is the main job's: for one hidden size H, 3 learning rates x 10 folds of the bundled
feature data (a 10-H-7 sigmoid MLP, Adam, batch 32, 300 epochs). ``fit_many`` trains all 30
runs as one vmapped, compiled program (folds padded to one length with zero sample weights). The
baseline is what a JAX user writes: a ``flax.linen`` module, ``optax.adam`` and one jitted
training step, called for every minibatch of every epoch of every run, with the same data
order rule (a new permutation per epoch). Both timings include compilation, in one fresh
process, side by side, and the script prints their ratio, and for the jaxprune grid (the 30
networks' init and ``fit_many``, as the main job runs it) the number of XLA programs its first
call compiled, their compilation seconds, and the tracing and lowering seconds.

  python benchmarks/train.py [--quick] [--hidden 20,100,1000] [--epochs 300] [--loop_runs N]
"""

import argparse
import os
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
import jaxprune  # noqa: E402
from _timing import CompileClock, load_line  # noqa: E402
from jaxprune import data  # noqa: E402

LRS = (0.001, 0.01, 0.1)


class _MLP(nn.Module):
  hidden: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(7)(nn.sigmoid(nn.Dense(self.hidden)(x)))


def folds_padded(ds, n_splits=10):
  """(x, y, w) stacked over folds, padded to one length with zero weights."""
  folds = data.kfold(ds, n_splits=n_splits, seed=0)
  n = max(len(tr) for tr, _ in folds)
  xs, ys, ws = [], [], []
  for tr, _ in folds:
    x = np.asarray(ds.x[tr], np.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    pad = n - len(tr)
    xs.append(np.concatenate([x, np.zeros((pad, x.shape[1]), np.float32)]))
    ys.append(np.concatenate([np.asarray(ds.y[tr]), np.zeros(pad, np.int64)]))
    ws.append(np.concatenate([np.ones(len(tr), np.float32), np.zeros(pad, np.float32)]))
  return np.stack(xs), np.stack(ys), np.stack(ws)


def jaxprune_grid(h, x, y, w, epochs):
  """(first call, warm call, compile clock of the first call): fit_many of the whole grid,
  including the vmapped init of its 30 networks, as a study runs it."""
  model = jaxprune.MLP(in_features=x.shape[-1], hidden=(h,), out_features=7)
  runs = len(LRS) * x.shape[0]
  xr, yr, wr = (np.tile(a, (len(LRS),) + (1,) * (a.ndim - 1)) for a in (x, y, w))
  lr = np.repeat(np.asarray(LRS, np.float32), x.shape[0])
  keys = jax.random.split(jax.random.key(0), runs)
  jax.block_until_ready(keys)
  times, clocks = [], []
  for _ in range(2):                                # first call compiles; second is warm
    t = time.perf_counter()
    with CompileClock() as init_clock:
      params = jax.block_until_ready(jax.vmap(model.init)(keys))
    with CompileClock() as fit_clock:
      out, _ = jaxprune.fit_many(model, params, xr, yr, wr, key=keys, epochs=epochs,
                                 learning_rate=lr, progress=False,
                                 log_every=max(epochs // 5, 1))
      jax.block_until_ready(out)
    times.append(time.perf_counter() - t)
    clocks.append((init_clock, fit_clock))
  return times[0], times[1], clocks[0]


def flax_grid(h, x, y, w, epochs, batch=32, runs=None):
  """The per-run Flax loop over the grid (learning rate major, then fold), or over its first
  ``runs`` runs: the seconds of each run, and of each learning rate's first step (its
  compilation)."""
  module = _MLP(h)
  todo = [(lr, f) for lr in LRS for f in range(x.shape[0])][:runs]

  def loss_fn(p, xb, yb):
    return optax.softmax_cross_entropy_with_integer_labels(module.apply(p, xb), yb).mean()

  first, per_run = [], []
  for k, lr in enumerate(sorted({lr for lr, _ in todo}, key=LRS.index)):
    tx = optax.adam(lr)

    @jax.jit
    def step(p, s, xb, yb):
      g = jax.grad(loss_fn)(p, xb, yb)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s

    for f in [f for l, f in todo if l == lr]:
      t_run = time.perf_counter()
      real = w[f] > 0
      xf, yf = jnp.asarray(x[f][real]), jnp.asarray(y[f][real])
      p = module.init(jax.random.key(f), xf[:1])
      s = tx.init(p)
      rng = np.random.default_rng(f)
      n = xf.shape[0]
      for _ in range(epochs):
        perm = rng.permutation(n)
        for i in range(0, n - batch + 1, batch):     # full batches: one compiled shape
          idx = perm[i:i + batch]
          if len(first) == k:                        # this learning rate's first step
            t0 = time.perf_counter()
            p, s = jax.block_until_ready(step(p, s, xf[idx], yf[idx]))
            first.append(time.perf_counter() - t0)
          else:
            p, s = step(p, s, xf[idx], yf[idx])
      jax.block_until_ready(p)
      per_run.append(time.perf_counter() - t_run)
  return per_run, first


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="H=20 only, 20 epochs")
  ap.add_argument("--hidden", default="20,100,1000")
  ap.add_argument("--epochs", type=int, default=300)
  ap.add_argument("--loop_runs", type=int, default=None,
                  help="time the Flax loop on its first N >= 2 of the 30 runs and scale it to "
                       "the grid (where one step is slow to dispatch, as on a GPU)")
  args = ap.parse_args()
  if args.loop_runs is not None and args.loop_runs < 2:
    ap.error("--loop_runs needs at least 2 runs (the first one carries the one-time costs).")
  hidden = [20] if args.quick else [int(v) for v in args.hidden.split(",")]
  epochs = 20 if args.quick else args.epochs
  ds = data.load("features")
  x, y, w = folds_padded(ds)
  print(load_line())
  print(f"grid: {len(LRS)} learning rates x {x.shape[0]} folds, {epochs} epochs, batch 32, "
        f"{int(w.sum(1).max())} training rows per fold")
  print("jaxprune: the 30 networks' vmapped init, then fit_many in 5 chunks, as the main job "
        "runs them; 'XLA' is the XLA compilation of the first call (programs / seconds) and "
        "'trace+lower' the tracing and lowering before it, for fit_many and for the init")
  print(f"{'H':>6} {'jaxprune first':>15} {'warm':>7} {'fit_many XLA':>13} {'trace+lower':>12} "
        f"{'init XLA':>12} {'flax loop':>10} {'ratio':>6}")
  for h in hidden:
    first, warm, (init_clock, fit_clock) = jaxprune_grid(h, x, y, w, epochs)
    total = len(LRS) * x.shape[0]
    part = min(args.loop_runs or total, total)
    per_run, first_steps = flax_grid(h, x, y, w, epochs, runs=part)
    loop = sum(per_run)
    if part < total:   # the first run (with one-time costs), then runs like the others, each
      loop = (per_run[0] + float(np.mean(per_run[1:])) * (total - 1)   # other learning rate
              + float(np.mean(first_steps)) * (len(LRS) - 1))          # compiling its step
    xla = lambda c: f"{c.programs} / {c.seconds['xla']:.2f}s"
    print(f"{h:>6} {first:>14.1f}s {warm:>6.1f}s {xla(fit_clock):>13} "
          f"{fit_clock.seconds['trace'] + fit_clock.seconds['lower']:>11.2f}s "
          f"{xla(init_clock):>12} {loop:>9.1f}s {loop / first:>5.1f}x"
          + (f"  (Flax loop: {part} of {total} runs, scaled)" if part < total else ""),
          flush=True)
  print(load_line())


if __name__ == "__main__":
  main()
