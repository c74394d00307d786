"""Where a GA generation's time goes: jaxprune's full-evaluation run against plain JAX, one part
of the generation swapped at a time, side by side in one run.

At population 100 a generation's evaluation is small, and the GA's bookkeeping (selection, the
hall of fame, the statistics, the program's control flow) decides the time; on a GPU each part
is one or more kernels of its own. Every row is one jitted ``lax.scan`` of 51 generations on the
same trained 10-H-7 MLP (H=1000 by default) and the same evaluation (``ga.make_fitness(...,
incremental=False)``), except plain JAX, which is the GA of ``benchmarks/ga.py`` (column (c)):

* ``ga.run``: the library's compiled run (``incremental=False``);
* ``ga.run, hall of fame by sorting`` / ``by ranking``: the same with the hall of fame's
  members found by the other route than this backend's default
  (``jaxprune.ga.operators.RANK_BELOW``: pairwise ranks or three sorts; the same members);
* ``ga.run, data as constants``: the library's program with the data and settings closed
  over, as every row below and plain JAX have them (``ga.run`` takes them as arguments);
* ``ask/tell body``: the generation written as ``tell(ask(...))`` in the scan, which branches
  on the generation with ``lax.cond`` (the library's body before it bred the next population
  at the end of each step);
* ``statistics in the scan``: the library's body computing each generation's statistics in the
  scan (as a run with a progress display does; without one the library records the fitness
  rows and computes them after the scan, ``jaxprune.ga.loop.RECORD_FITNESS_MAX``);
* ``library body, no statistics``: the library's body recording only the best fitness;
* ``elite by top_k``: the library's body with the hall of fame replaced by ``lax.top_k`` of the
  fitness (no duplicate check: not the library's semantics, only its cost);
* ``... no statistics``: the same without the per-generation statistics;
* ``evaluation only``: 51 evaluations of a fixed population (a floor for every row);
* ``plain JAX``.

On CPU the two ``ga.run`` rows compile with the library's options for the GA
(``jaxprune.ga.loop.RUN_OPTIONS``: LLVM level 1 and XLA:CPU's older loop emitter for the full
evaluation), the other rows with XLA's defaults; on a GPU every row is a plain jit.

Each row reports its best of ``--repeats`` runs timed in turns, in microseconds per generation,
and its ratio to plain JAX. Run: ``python benchmarks/ga_parts.py [--hidden 1000]
[--population 100]``.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(__file__))
import ga as B  # noqa: E402
from _timing import call_times  # noqa: E402
from jaxprune import ga  # noqa: E402
from jaxprune.ga import loop as L  # noqa: E402
from jaxprune.ga import strategy as S  # noqa: E402


def variants(config, fit, data, hyper, num_units):
  """{name: run(key)} of the rows between ``ga.run`` and plain JAX."""
  evaluate = lambda pop: fit(pop, data, hyper)
  k = config.hof_size

  def ask_tell(key):
    def body(state, kk):
      pop = S.ask(config, state, hyper, key=kk)
      state = S.tell(config, state, pop, evaluate(pop))
      return state, L._stats(state)  # pylint: disable=protected-access

    state, hist = lax.scan(body, S.init(config, num_units), S.generation_keys(key, config))
    return state.hof[0], hist

  def library_body(update, record):
    """The library's body: ``update(state, population)`` (evaluate, tell), record
    ``record(state)``, breed the next population."""
    def run(key):
      def body(carry, kk):
        state, pop = carry
        state = update(state, pop)
        return (state, S.breed(config, state, hyper, key=kk)), record(state)

      keys = S.generation_keys(key, config)
      pop0 = S.initial_population(config, num_units, key=keys[0])
      (state, _), out = lax.scan(body, (S.init(config, num_units), pop0),
                                 jnp.concatenate([keys[1:], keys[:1]]))
      return state.hof[0], out

    return run

  def tell(state, pop):
    return S.tell(config, state, pop, evaluate(pop))

  def top_k_elite(state, pop):
    """A top_k elite as the hall of fame (no duplicate check)."""
    f = evaluate(pop).astype(jnp.float32)
    f = jnp.where(jnp.isnan(f), -jnp.inf, f)
    best, idx = lax.top_k(f, k)
    return S.GAState(pop, f, pop[idx], best, state.generation + 1)

  stats = L._stats  # pylint: disable=protected-access
  best = lambda state: state.hof_fitness[0]

  def eval_only(key):
    pop = S.initial_population(config, num_units, key=key)
    def body(c, _):
      return c + jnp.sum(evaluate(pop ^ (c > 1e30))), None
    return lax.scan(body, jnp.float32(0), None, length=config.generations + 1)[0]

  def closed_over(key):
    return L._run(config, fit, num_units, False, None, hyper, data, key)  # pylint: disable=protected-access

  return {"ga.run, data as constants": jax.jit(closed_over),
          "ask/tell body (lax.cond)": jax.jit(ask_tell),
          "statistics in the scan": jax.jit(library_body(tell, stats)),
          "library body, no statistics": jax.jit(library_body(tell, best)),
          "elite by top_k": jax.jit(library_body(top_k_elite, stats)),
          "elite by top_k, no statistics": jax.jit(library_body(top_k_elite, best)),
          "evaluation only": jax.jit(eval_only)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, default=1000,
                      help="hidden units H of the trained 10-H-7 MLP (default 1000)")
  parser.add_argument("--population", type=int, default=100,
                      help="individuals per generation (default 100, the published setting)")
  parser.add_argument("--repeats", type=int, default=7,
                      help="timed runs of each row, in turns; each row reports its best "
                           "(default 7)")
  args = parser.parse_args()
  x, y = B.make_data()
  h = args.hidden
  config = ga.GAConfig(population_size=args.population, generations=50)
  model, params = B.train(h, x, y)
  fit, data, hyper, run_lib, _ = B.jax_setup(model, params, x, y, config, incremental=False)
  ops = L.ops
  saved = ops.RANK_BELOW, ops.RANK_BELOW_CPU
  ranks = config.population_size + config.hof_size <= (
      saved[1] if jax.default_backend() == "cpu" else saved[0])
  ops.RANK_BELOW = ops.RANK_BELOW_CPU = 0 if ranks else 10**9   # the other route
  other = B.jax_setup(model, params, x, y, config, incremental=False)[3]
  ops.RANK_BELOW, ops.RANK_BELOW_CPU = saved
  out = params["params"]["out"]
  plain = B.plain_jax_ga(config, np.asarray(data["h"]), np.asarray(out["kernel"]),
                         np.asarray(out["bias"]), np.asarray(y), h)
  rows = {f"ga.run (incremental=False{', ranks' if ranks else ', sorts'})": run_lib,
          f"ga.run, hall of fame by {'sorting' if ranks else 'ranking'}": other,
          **variants(config, fit, data, hyper, h), "plain JAX": plain}
  for f in rows.values():
    jax.block_until_ready(f(jax.random.key(0)))
  best = {name: np.inf for name in rows}
  for r in range(args.repeats):
    for name, f in rows.items():
      key = jax.random.key(r + 1)
      best[name] = min(best[name], min(call_times(f, key, repeats=3, min_time=0.0,
                                                  warmup=False)))
  gens = config.generations + 1
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; H={h}, population "
        f"{config.population_size}, {gens} generations; best of {args.repeats} turns; "
        f"load {os.getloadavg()[0]:.1f}")
  for name, t in best.items():
    print(f"  {name:32s} {1e6 * t / gens:9.1f} us/generation  "
          f"{t / best['plain JAX']:5.2f}x plain JAX")


if __name__ == "__main__":
  main()
