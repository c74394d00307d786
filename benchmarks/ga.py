"""GA mask search: jaxprune (one compiled lax.scan) against DEAP and a vectorised NumPy GA.

The published settings (population 100, hall of fame 5, tournament 3, crossover 0.8, mutation
0.2 / 0.1 per bit, 50 generations, fitness eq. 5) on a trained 10-H-7 sigmoid MLP with 1,100
training patterns, H in {100, 500, 1000}:

* (a) DEAP: ``eaSimple`` with the hall of fame kept in the population, DEAP's own operators,
  each individual evaluated alone with NumPy (``H @ (mask[:, None] * W) + b``); skipped with a
  message when ``deap`` is not installed (``pip install deap``).
* (b) the same GA written with vectorised NumPy, the whole population evaluated per generation
  in one batch, as one large product ``H @ W_all`` with ``W_all[:, p*O:(p+1)*O] = mask[p][:, None]
  * W`` (the fastest NumPy formulation we know: the stacked ``H @ (mask[:, :, None] * W)`` is
  about 30 times slower, NumPy runs stacked products with a broadcast operand without BLAS);
* (c) plain JAX: the same GA written directly in JAX (jit of a ``lax.scan``; tournaments,
  one-point crossover, bit flips, a top-K elite), every individual evaluated in full with the one
  product each generation: what a JAX user would write without this library (evosax ships no
  bit-string GA with these operators, so it is not a column);
* jaxprune: ``jaxprune.ga.run`` with the fast path, incremental evaluation ('inc', see
  ``jaxprune.ga.incremental``) and full evaluation ('full', ``incremental=False``).

Compilation is reported apart from the run, with the number of XLA compilations of a first
``ga.search`` call in a fresh process (H=100) against a whole DEAP + NumPy run; and the count of
fitness values where the incremental evaluation disagrees with the full one at H=1000 (near
ties, see ``jaxprune.ga.incremental``).

Times are steady state (compiled; the columns are timed in turns and each reports its best
run, as load from other processes only ever slows a run down); compilation (lowering + XLA,
cold) is reported separately. The population evaluation rate (best of repeats) is compared with this
machine's float32 matmul rate (best of repeats over square products); rates use the best time
because other processes on a shared machine only ever slow a run down. Then
jaxprune alone for populations 100, 1,000 and 10,000 at H=1000 (per generation).

Run: ``python benchmarks/ga.py`` (a few minutes on 2 CPU cores) or ``--quick``; on a GPU,
``python benchmarks/ga.py --populations 100,1000,10000,100000`` adds population 100,000 at
H=1000 (ms per generation and the evaluation's share of the device's measured matmul rate).
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(__file__))
import jaxprune  # noqa: E402
from _timing import call_times  # noqa: E402
from jaxprune import ga  # noqa: E402

N_PATTERNS, N_IN, N_OUT = 1100, 10, 7
_BLAS_REST = 1.0   # seconds after the NumPy and DEAP columns (see main)
LAM = 10.0
_SEARCH = importlib.import_module("jaxprune.ga.loop")


def median_time(fn, repeats, reduce=np.median):
  """``reduce`` (median by default) of ``repeats`` timed calls; the caller compiles first."""
  return float(reduce(call_times(fn, repeats=repeats, min_time=0.0, warmup=False)))


def make_data(seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.normal(size=(N_OUT, N_IN)) * 1.2
  y = rng.integers(0, N_OUT, N_PATTERNS)
  x = (centers[y] + rng.normal(size=(N_PATTERNS, N_IN))).astype(np.float32)
  return x, y.astype(np.int32)


def train(h, x, y, steps=150):
  model = jaxprune.MLP(in_features=N_IN, hidden=(h,), out_features=N_OUT)
  params = model.init(jax.random.key(h))
  opt = optax.adam(0.01)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x), y).mean()
    updates, state = opt.update(jax.grad(loss)(params), state)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return model, params


def matmul_peak():
  """Best float32 matmul rate over a few square sizes (GFLOP/s)."""
  best = 0.0
  f = jax.jit(jnp.matmul)
  for n in (1024, 2048, 4096):
    a = jax.random.normal(jax.random.key(n), (n, n))
    jax.block_until_ready(f(a, a))
    best = max(best, 2 * n**3 / median_time(lambda: f(a, a), 10, np.min) / 1e9)
  return best


# ----------------------------------------------------------------------------- NumPy GAs


def _np_fitness_batched(h, w, b, y, pop):
  p, u = pop.shape
  o = w.shape[1]
  w_all = (pop.T.astype(np.float32)[:, :, None] * w[:, None, :]).reshape(u, p * o)
  logits = (h @ w_all).reshape(h.shape[0], p, o) + b
  acc = 100.0 * (logits.argmax(-1) == y[:, None]).mean(0)
  return acc - LAM * pop.sum(1) / u


def _np_hof_update(hof, hof_fit, pop, fit, k):
  cand = pop if hof is None else np.concatenate([hof, pop])
  cfit = fit if hof is None else np.concatenate([hof_fit, fit])
  order = np.argsort(-cfit, kind="stable")
  seen, keep = set(), []
  for i in order:
    key = cand[i].tobytes()
    if key not in seen:
      seen.add(key)
      keep.append(i)
      if len(keep) == k:
        break
  keep = np.asarray(keep)
  return cand[keep], cfit[keep]


def numpy_ga(h, w, b, y, num_units, generations, pop_size=100, hof_size=5, seed=0):
  rng = np.random.default_rng(seed)
  pop = rng.random((pop_size, num_units)) < 0.5
  fit = _np_fitness_batched(h, w, b, y, pop)
  hof, hof_fit = _np_hof_update(None, None, pop, fit, hof_size)
  n = pop_size - hof_size
  for _ in range(generations):
    idx = rng.integers(0, pop_size, (n, 3))
    parents = pop[idx[np.arange(n), np.argmax(fit[idx], axis=1)]]
    half = n // 2
    a, bb = parents[0:2 * half:2], parents[1:2 * half:2]
    swap = ((rng.random(half) < 0.8)[:, None]
            & (np.arange(num_units)[None] >= rng.integers(1, num_units, half)[:, None]))
    kids = parents.copy()
    kids[0:2 * half:2], kids[1:2 * half:2] = np.where(swap, bb, a), np.where(swap, a, bb)
    mut = (rng.random(n) < 0.2)[:, None] & (rng.random((n, num_units)) < 0.1)
    pop = np.concatenate([kids ^ mut, hof])
    fit = _np_fitness_batched(h, w, b, y, pop)
    hof, hof_fit = _np_hof_update(hof, hof_fit, pop, fit, hof_size)
  return hof[0], hof_fit[0]


def deap_ga(h, w, b, y, num_units, generations, pop_size=100, hof_size=5, seed=0):
  from deap import algorithms, base, creator, tools  # pylint: disable=import-outside-toplevel
  if not hasattr(creator, "FitnessMax"):
    creator.create("FitnessMax", base.Fitness, weights=(1.0,))
    creator.create("Individual", list, fitness=creator.FitnessMax)
  random.seed(seed)
  tb = base.Toolbox()
  tb.register("bit", random.randint, 0, 1)
  tb.register("individual", tools.initRepeat, creator.Individual, tb.bit, num_units)
  tb.register("population", tools.initRepeat, list, tb.individual)

  def evaluate(ind):
    m = np.asarray(ind, dtype=np.float32)
    logits = h @ (m[:, None] * w) + b
    acc = 100.0 * np.mean(logits.argmax(-1) == y)
    return (acc - LAM * m.sum() / num_units,)

  tb.register("evaluate", evaluate)
  tb.register("select", tools.selTournament, tournsize=3)
  tb.register("mate", tools.cxOnePoint)
  tb.register("mutate", tools.mutFlipBit, indpb=0.1)
  pop = tb.population(n=pop_size)
  hof = tools.HallOfFame(hof_size)
  for ind in pop:
    ind.fitness.values = tb.evaluate(ind)
  hof.update(pop)
  for _ in range(generations):   # eaSimple with the hall of fame kept in the population
    offspring = algorithms.varAnd(tb.select(pop, pop_size - hof_size), tb, 0.8, 0.2)
    for ind in offspring:
      if not ind.fitness.valid:
        ind.fitness.values = tb.evaluate(ind)
    offspring.extend(hof.items)
    hof.update(offspring)
    pop[:] = offspring
  return hof[0], hof[0].fitness.values[0]


# ----------------------------------------------------------------------------- jaxprune


def plain_jax_ga(config, h, w, b, y, num_units, hyper_lam=LAM):
  """(c) The GA in plain JAX, full evaluation every generation: a jitted ``run(key)``."""
  p, k, n = config.population_size, config.hof_size, config.population_size - config.hof_size
  h, w, b, y = map(jnp.asarray, (h, w, b, y))

  def fitness(pop):
    o = w.shape[1]
    w_all = (pop.T.astype(jnp.float32)[:, :, None] * w[:, None, :]).reshape(num_units, -1)
    logits = (h @ w_all).reshape(h.shape[0], p, o) + b
    acc = 100.0 * jnp.mean(jnp.argmax(logits, -1) == y[:, None], axis=0)
    return acc - hyper_lam * pop.sum(1) / num_units

  def gen(carry, key):
    pop, fit = carry
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    cont = jax.random.randint(k1, (n, 3), 0, p)
    parents = pop[cont[jnp.arange(n), jnp.argmax(fit[cont], axis=1)]]
    half = n // 2
    a, bb = parents[0:2 * half:2], parents[1:2 * half:2]
    cut = jax.random.randint(k2, (half, 1), 1, num_units)
    swap = (jax.random.uniform(k3, (half, 1)) < 0.8) & (jnp.arange(num_units)[None] >= cut)
    kids = jnp.stack([jnp.where(swap, bb, a), jnp.where(swap, a, bb)], 1).reshape(-1, num_units)
    kids = jnp.concatenate([kids, parents[2 * half:]])
    flip = (jax.random.uniform(k4, (n, 1)) < 0.2) & (jax.random.uniform(k5, (n, num_units)) < 0.1)
    elite = jnp.argsort(-fit)[:k]
    pop = jnp.concatenate([kids ^ flip, pop[elite]])
    fit = fitness(pop)
    return (pop, fit), jnp.max(fit)

  @jax.jit
  def run(key):
    k0, key = jax.random.split(key)
    pop = jax.random.bernoulli(k0, 0.5, (p, num_units))
    (pop, fit), best = jax.lax.scan(gen, (pop, fitness(pop)),
                                    jax.random.split(key, config.generations))
    return pop[jnp.argmax(fit)], best

  return run


FIRST_CALL = """
import time, sys
t0 = time.perf_counter()
import jax, numpy as np
sys.path.insert(0, {bench!r})
import ga as B
from _timing import CompileClock
import jaxprune
from jaxprune import ga
x, y = B.make_data()
model = jaxprune.MLP(in_features=B.N_IN, hidden=(100,), out_features=B.N_OUT)
params = jax.tree.map(np.asarray, model.init(jax.random.key(100)))
key = jax.block_until_ready(jax.random.key(0))  # the key's own small program is not counted
t_import = time.perf_counter() - t0
with CompileClock() as c:
  t = time.perf_counter()
  res = ga.search(model, params, x, y, "hidden_0", key=key,
                  hyper=ga.GAHyperparams(lam=B.LAM), progress=False)
  jax.block_until_ready(res)
  first = time.perf_counter() - t
t = time.perf_counter()
jax.block_until_ready(ga.search(model, params, x, y, "hidden_0", key=jax.random.key(1),
                                hyper=ga.GAHyperparams(lam=B.LAM), progress=False))
print("FIRST", first, c.programs, c.seconds["xla"], time.perf_counter() - t, t_import,
      c.seconds["trace"], c.seconds["lower"])
"""


def _first_call_in_fresh_process(**env):
  """(first call, programs, XLA s, second call, import s, trace s, lower s) of FIRST_CALL."""
  import subprocess  # pylint: disable=import-outside-toplevel
  out = subprocess.run([sys.executable, "-c", FIRST_CALL.format(bench=os.path.dirname(
      os.path.abspath(__file__)))], capture_output=True, text=True, check=True,
      env=dict(os.environ, **env))
  return tuple(map(float, [l for l in out.stdout.splitlines()
                           if l.startswith("FIRST")][-1].split()[1:]))


def first_call(h_np, w_np, b_np, y_np):
  """ga.search's first call (fresh process, H=100) against one whole DEAP + NumPy run: cold,
  then with JAX's persistent compilation cache warm (as the experiment binaries set it)."""
  import tempfile  # pylint: disable=import-outside-toplevel
  first, count, compile_s, second, t_import, _, _ = _first_call_in_fresh_process(
      JAX_ENABLE_COMPILATION_CACHE="false")
  t_np = min(median_time(lambda: numpy_ga(h_np, w_np, b_np, y_np, 100, 50, seed=r), 1)
             for r in range(3))
  load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
  print(f"\nFirst call, fresh process, H=100 (load {load}): ga.search {first:.2f}s of which "
        f"XLA compilation {compile_s:.2f}s in {int(count)} program(s); second call "
        f"{second:.3f}s; (import jax + jaxprune and set-up {t_import:.1f}s, not counted). "
        f"A whole DEAP + NumPy run: {t_np:.2f}s -> {t_np / first:.2f}x")
  with tempfile.TemporaryDirectory() as cache:
    env = dict(JAX_ENABLE_COMPILATION_CACHE="true", JAX_COMPILATION_CACHE_DIR=cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    _first_call_in_fresh_process(**env)                      # fills the cache
    warm = [_first_call_in_fresh_process(**env) for _ in range(2)]
  for first, _, compile_s, _, _, trace, lower in warm:
    print(f"  with the persistent cache warm, fresh process: {first:.2f}s (tracing {trace:.2f}s, "
          f"lowering {lower:.2f}s, XLA or cache read {compile_s:.2f}s)")


def jax_setup(model, params, x, y, config, incremental="auto"):
  """The compiled run and its compilation time (lowering + XLA compilation)."""
  fit = ga.make_fitness(model, "hidden_0", "eq5", incremental=incremental)
  data = fit.prepare(params, x, y)
  hyper = ga.GAHyperparams(lam=LAM)
  num_units = model.hidden[0]
  jax.clear_caches()   # measure a cold compilation every time
  t = time.perf_counter()
  compiled = _SEARCH.run_program(config, fit, num_units, None, data).lower(
      config, fit, num_units, False, None, hyper, data, jax.random.key(0)).compile()
  compile_s = time.perf_counter() - t
  run = lambda key: compiled(hyper, data, key)
  jax.block_until_ready(run(jax.random.key(0)))
  return fit, data, hyper, run, compile_s


def eval_rate(fit, data, hyper, num_units, pop_size, repeats):
  f = jax.jit(fit)
  pop = jax.random.bernoulli(jax.random.key(1), 0.5, (pop_size, num_units))
  jax.block_until_ready(f(pop, data, hyper))
  t = median_time(lambda: f(pop, data, hyper), repeats, np.min)
  return t, 2.0 * N_PATTERNS * num_units * N_OUT * pop_size / t / 1e9


def mismatches(model, params, x, y, config):
  """(disagreeing, total) accuracies of an incremental run against the full evaluation.

  Accuracies (fitness 'accuracy'), not eq. 5 values: the size penalty ``lam * kept / U`` can
  round one unit in the last place differently in two compiled programs (XLA may rewrite the
  division), which says nothing about the evaluation; at H=1000 about 20% of eq. 5 values
  differ by 7.6e-6 for that reason alone while every accuracy agrees.
  """
  inc = importlib.import_module("jaxprune.ga.incremental")
  fit = ga.make_fitness(model, "hidden_0", "accuracy", incremental=True)
  data = fit.prepare(params, x, y)
  hyper = ga.GAHyperparams(lam=LAM)
  plan = inc.plan(model.hidden[0], config.population_size, config.hof_size, x.shape[0], N_OUT)
  run = jax.jit(lambda d, k: inc.run_scan(plan, config, fit, model.hidden[0], hyper, d, k,
                                          record=True))
  _, _, (pops, fits) = run(data, jax.random.key(3))
  full = jax.jit(jax.vmap(lambda p: fit(p, data, hyper)))(pops)
  return int(jnp.sum(full != fits)), int(fits.size)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="H=100 and 500 only, fewer repeats")
  parser.add_argument("--hidden", default=None,
                      help="hidden sizes of the main table, e.g. 1000 (default 100,500,1000; "
                           "--quick: 100,500); the per-generation table uses the last")
  parser.add_argument("--repeats", type=int, default=None,
                      help="runs of each column of the main table, timed in turns (default 5; "
                           "--quick: 3)")
  parser.add_argument("--populations", default=None,
                      help="population sizes of the per-generation table, e.g. "
                           "100,1000,10000,100000 on a GPU (default 100,1000,10000; --quick: "
                           "100,1000; none: skip it); above 1,000 each runs 5 generations")
  args = parser.parse_args()
  hs = (100, 500) if args.quick else (100, 500, 1000)
  if args.hidden:
    hs = tuple(int(v) for v in args.hidden.split(","))
  repeats = args.repeats or (3 if args.quick else 5)
  gens = 50
  try:
    import deap  # pylint: disable=import-outside-toplevel,unused-import
    have_deap = True
  except ImportError:
    have_deap = False
    print("DEAP is not installed: column (a) is skipped (pip install deap to include it).")

  print(f"jax {jax.__version__} on {jax.devices()[0].platform} x{jax.device_count()}; "
        f"{N_PATTERNS} patterns, 10-H-7 sigmoid MLP, population 100, 50 generations, eq. 5")
  peak = matmul_peak()
  load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
  print(f"measured float32 matmul peak: {peak:.1f} GFLOP/s; load average {load} on "
        f"{os.cpu_count()} cores (other processes slow every column)\n")
  x, y = make_data()
  config = ga.GAConfig(generations=gens)
  header = (f"{'H':>5} | {'inc run':>8} | {'full run':>8} | {'compile i/f':>11} | "
            f"{'(a) DEAP':>9} | {'x(a)':>6} | {'(b) numpy':>9} | {'x(b)':>5} | "
            f"{'(c) JAX':>8} | {'x(c)':>5} | {'eval GF/s':>9} | {'% peak':>6} | load")
  print(header)
  print("-" * len(header))
  for h in hs:
    model, params = train(h, x, y)
    fit, data, hyper, run_inc, c_inc = jax_setup(model, params, x, y, config, True)
    _, _, _, run_full, c_full = jax_setup(model, params, x, y, config, False)
    keys = iter(jax.random.split(jax.random.key(1), 3 * repeats))
    _, rate = eval_rate(fit, data, hyper, h, 100, 10)
    hid = np.asarray(data["h"])
    out = params["params"]["out"]
    w, b, yy = np.asarray(out["kernel"]), np.asarray(out["bias"]), np.asarray(y)
    plain = plain_jax_ga(config, hid, w, b, yy, h)
    jax.block_until_ready(plain(jax.random.key(0)))
    # The columns are timed in turns, so that a change in the machine's load hits them alike;
    # each column reports its best time.
    t_inc, t_full, t_b, t_a, t_c = [], [], [], [], []
    for r in range(repeats):
      t_inc.append(median_time(lambda: run_inc(next(keys)), 1))
      t_full.append(median_time(lambda: run_full(next(keys)), 1))
      t_c.append(median_time(lambda: plain(next(keys)), 1))
      t_b.append(median_time(lambda: numpy_ga(hid, w, b, yy, h, gens, seed=r), 1))
      if have_deap and r < 2:
        t_a.append(median_time(lambda: deap_ga(hid, w, b, yy, h, gens, seed=r), 1))
      # NumPy's OpenBLAS worker threads keep spinning on the cores for a while after its last
      # product, which slowed whichever compiled column came next (the incremental one, 1.32x
      # plain JAX measured this way against 1.56x with one OpenBLAS thread): let them sleep.
      time.sleep(_BLAS_REST)
    medians = {k: float(np.median(v)) for k, v in
               (("inc", t_inc), ("full", t_full), ("plain JAX", t_c))}
    t_inc, t_full, t_b, t_c = min(t_inc), min(t_full), min(t_b), min(t_c)
    t_jax = min(t_inc, t_full)
    if have_deap:
      t_a = min(t_a)
      a_cols = f"{t_a:8.2f}s | {t_a / t_jax:5.1f}x"
    else:
      a_cols = f"{'skipped':>9} | {'-':>6}"
    print(f"{h:5d} | {t_inc:7.3f}s | {t_full:7.3f}s | {c_inc:4.1f}/{c_full:4.1f}s | {a_cols} | "
          f"{t_b:8.3f}s | {t_b / t_jax:4.1f}x | {t_c:7.3f}s | {t_c / t_jax:4.2f}x | "
          f"{rate:9.1f} | {100 * rate / peak:5.0f}% | {os.getloadavg()[0]:.1f}", flush=True)
    ratio = medians["plain JAX"] / min(medians["inc"], medians["full"])
    print("      medians over the turns: "
          + ", ".join(f"{k} {v:.3f}s" for k, v in medians.items())
          + f"; plain JAX / faster jaxprune {ratio:.2f}x")
  print("(x columns: the peer's time over jaxprune's faster of inc and full)")

  h = hs[-1]
  model, params = train(h, x, y)
  bad, total = mismatches(model, params, x, y, config)
  print(f"\nIncremental vs full evaluation at H={h}: {bad} of {total} accuracies differ "
        "(near ties in float summation order)")
  print(f"\njaxprune, H={h}, per generation, incremental / full (population evaluation GFLOP/s "
        f"vs peak {peak:.0f}):")
  if args.populations == "none":
    sizes = ()
  elif args.populations:
    sizes = tuple(int(v) for v in args.populations.split(","))
  else:
    sizes = (100, 1000) if args.quick else (100, 1000, 10000)
  for p in sizes:
    g = 50 if p <= 1000 else 5
    cfg = ga.GAConfig(population_size=p, generations=g)
    ms = []
    for incremental in (True, False):
      fit, data, hyper, run, compile_s = jax_setup(model, params, x, y, cfg, incremental)
      keys = iter(jax.random.split(jax.random.key(2), 100))
      # At least two timed calls, the faster reported: on an H200 a single call read 9x slower
      # at population 100 than the main table's best of 3.
      t = median_time(lambda: run(next(keys)), max(2, repeats - 2), np.min)
      ms.append((1e3 * t / (g + 1), compile_s))
    t_eval, rate = eval_rate(fit, data, hyper, h, p, 3)
    print(f"  population {p:6d}: {ms[0][0]:8.2f} / {ms[1][0]:8.2f} ms/generation, compile "
          f"{ms[0][1]:.1f} / {ms[1][1]:.1f}s (full evaluation alone {1e3 * t_eval:8.2f} ms, "
          f"{rate:6.1f} GFLOP/s, {100 * rate / peak:4.0f}% of peak); load "
          f"{os.getloadavg()[0]:.1f}", flush=True)
  model, params = train(100, x, y)
  fit = ga.make_fitness(model, "hidden_0", "eq5")
  data = fit.prepare(params, x, y)
  out = params["params"]["out"]
  first_call(np.asarray(data["h"]), np.asarray(out["kernel"]), np.asarray(out["bias"]),
             np.asarray(y))


if __name__ == "__main__":
  main()
