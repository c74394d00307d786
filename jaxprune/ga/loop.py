"""The compiled GA loop: every generation in one ``lax.scan``, population evaluation sharded over
devices when there are several, progress reported from inside the program."""

from __future__ import annotations

import functools
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from jaxprune.ga import incremental
from jaxprune.ga.strategy import GAConfig
from jaxprune.ga.strategy import GAHistory
from jaxprune.ga.strategy import GAHyperparams
from jaxprune.ga.strategy import GAState
from jaxprune.ga.strategy import ask
from jaxprune.ga.strategy import check_params
from jaxprune.ga.strategy import generation_keys
from jaxprune.ga.strategy import init
from jaxprune.ga.strategy import tell

PyTree = Any
FitnessFn = Callable[[jax.Array, PyTree, "GAHyperparams"], jax.Array]


# ----------------------------------------------------------------------------- progress


_PROGRESS = {"start": 0.0, "last": -1}


def _report_progress(gen, best, mean, *, total: int) -> None:
  """Host side of the progress bar: one line on stderr, rewritten each generation."""
  gen = int(np.max(gen))
  best, mean = float(np.max(best)), float(np.mean(mean))
  now = time.perf_counter()
  if _PROGRESS["last"] < 0:
    _PROGRESS["start"] = now  # first report of this run (compilation is not counted)
  if gen <= _PROGRESS["last"]:
    return  # a late, unordered report (multi-device runs)
  _PROGRESS["last"] = gen
  elapsed = now - _PROGRESS["start"]
  width = 24
  done = int(round(width * gen / max(total, 1)))
  eta = f"{elapsed / gen * (total - gen):.1f}s" if gen else "?"
  sys.stderr.write(f"\rGA [{'#' * done}{'.' * (width - done)}] gen {gen}/{total} "
                   f"best {best:.4g} mean {mean:.4g} {elapsed:.1f}s eta {eta}  ")
  if gen >= total:
    sys.stderr.write("\n")
  sys.stderr.flush()


# ----------------------------------------------------------------------------- the run


def _stats(state: GAState) -> GAHistory:
  f = state.fitness
  finite = jnp.isfinite(f)
  n = jnp.sum(finite)
  mean = jnp.where(n > 0, jnp.sum(jnp.where(finite, f, 0.0)) / jnp.maximum(n, 1), -jnp.inf)
  mn = jnp.where(n > 0, jnp.min(jnp.where(finite, f, jnp.inf)), -jnp.inf)
  return GAHistory(max=jnp.max(f), mean=mean, min=mn, best=state.hof_fitness[0],
                   best_kept=jnp.sum(state.hof[0], dtype=jnp.int32))


def _population_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PS(tuple(mesh.axis_names)))


def _evaluate(fitness_fn: FitnessFn, mesh: Mesh | None, population: jax.Array, data: PyTree,
              hyper: GAHyperparams) -> jax.Array:
  """Scores a population, sharding it over ``mesh`` (padded to a multiple of its size)."""
  p = population.shape[0]
  if mesh is not None and mesh.size > 1:
    pad = (-p) % mesh.size
    population = jnp.pad(population, ((0, pad), (0, 0)))
    population = lax.with_sharding_constraint(population, _population_sharding(mesh))
  fitness = fitness_fn(population, data, hyper)
  if not hasattr(fitness, "shape") or tuple(fitness.shape) != (population.shape[0],):
    raise ValueError(
        f"The fitness function returned shape {tuple(getattr(fitness, 'shape', ()))} for a "
        f"population of shape {tuple(population.shape)}; it must return one scalar per "
        f"individual, shape ({population.shape[0]},).")
  if mesh is not None and mesh.size > 1:
    fitness = lax.with_sharding_constraint(fitness, _population_sharding(mesh))
    # Gather the scores (P floats) to every device: selection, the hall of fame and the
    # statistics then run replicated, with the same arithmetic as on one device.
    return lax.with_sharding_constraint(fitness[:p], NamedSharding(mesh, PS()))
  return fitness[:p]


def _run(config: GAConfig, fitness_fn: FitnessFn, num_units: int, progress: bool,
         mesh: Mesh | None, hyper: GAHyperparams, data: PyTree,
         key: jax.Array) -> tuple[GAState, GAHistory]:
  keys = generation_keys(key, config)
  evaluate = functools.partial(_evaluate, fitness_fn, mesh)
  report = functools.partial(_report_progress, total=config.generations)
  plan = _incremental_plan(config, fitness_fn, num_units, mesh, data)
  if plan is not None:   # children scored from their parents' partial logits
    return incremental.run_scan(plan, config, fitness_fn, num_units, hyper, data, key,
                                report if progress else None)

  def generation(state, population):
    state = tell(config, state, population, evaluate(population, data, hyper))
    stats = _stats(state)
    if progress:
      # Ordered effects are not supported on several devices; the bar ignores late reports.
      jax.debug.callback(report, state.generation - 1, stats.best, stats.mean,
                         ordered=mesh is None or mesh.size == 1)
    return state, stats

  # Generation 0 (the random population) and the bred generations share one scan body, so the
  # evaluation and the hall of fame are compiled once.
  def body(state, k):
    return generation(state, ask(config, state, hyper, key=k))

  state, history = lax.scan(body, init(config, num_units), keys)
  if mesh is not None and mesh.size > 1:
    replicated = NamedSharding(mesh, PS())
    state, history = jax.tree.map(lambda a: lax.with_sharding_constraint(a, replicated),
                                  (state, history))
  return state, history


def _incremental_plan(config: GAConfig, fitness_fn: FitnessFn, num_units: int,
                      mesh: Mesh | None, data: PyTree) -> incremental.Plan | None:
  if not incremental.applies(fitness_fn, mesh, num_units):
    return None
  h, w = fitness_fn.incremental_data(data)[:2]
  return incremental.plan(num_units, config.population_size, config.hof_size, h.shape[0],
                          w.shape[-1])


_run_jit = jax.jit(_run, static_argnums=(0, 1, 2, 3, 4))


def default_mesh(shard: bool = True) -> Mesh | None:
  """A one-axis ``Mesh`` named ``'pop'`` over all devices, or None for a single device."""
  devices = jax.devices()
  if not shard or len(devices) < 2:
    return None
  return Mesh(np.asarray(devices), ("pop",))


def resolve_mesh(mesh: Mesh | None, shard: bool) -> Mesh | None:
  """The mesh to shard over: ``mesh`` if given (None when ``shard`` is False), else
  :func:`default_mesh`."""
  if not shard:
    return None
  return default_mesh(shard) if mesh is None else mesh


def run(config: GAConfig, fitness_fn: FitnessFn, num_units: int, *, key: jax.Array,
        hyper: GAHyperparams = GAHyperparams(), data: PyTree = None, progress: bool = True,
        mesh: Mesh | None = None, shard: bool = True) -> tuple[GAState, GAHistory]:
  """Runs the whole GA as one jit-compiled program (a ``lax.scan`` over generations).

  Args:
    config: static settings (:class:`GAConfig`).
    fitness_fn: ``fitness_fn(population, data, hyper) -> (P,)`` scores a (P, U) bool
      population; it must be hashable (a module-level function or a frozen dataclass) so that
      repeated runs reuse the compiled program.
    num_units: chromosome length ``U``.
    key: PRNG key; the run is deterministic for a key.
    hyper: numeric settings (:class:`GAHyperparams`), traced.
    data: a pytree of arrays passed to ``fitness_fn`` (traced, e.g. params and inputs).
    progress: print a progress bar on stderr (``jax.debug.callback``); turn it off under
      ``vmap``.
    mesh: shard the population over this mesh's devices (all its axes); by default a mesh
      over all devices when there are several.
    shard: False to never shard.

  Returns:
    The final :class:`GAState` and the :class:`GAHistory`.
  """
  check_params(hyper)
  mesh = resolve_mesh(mesh, shard)
  if mesh is not None and mesh.size > 1:
    data = jax.device_put(data, NamedSharding(mesh, PS()))
  _PROGRESS["last"] = -1
  out = _run_jit(config, fitness_fn, int(num_units), bool(progress), mesh, hyper, data, key)
  if progress:
    jax.effects_barrier()  # every report has been printed before we return
  return out
