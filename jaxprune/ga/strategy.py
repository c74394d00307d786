"""The GA strategy: static config, hyperparameters, state, and the ask/tell steps (evosax
style: hyperparameters apart from state; population operators written for one individual and
vmapped, in :mod:`jaxprune.ga.operators`)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune.ga import operators as ops

PyTree = Any
FitnessFn = Callable[[jax.Array, PyTree, "GAHyperparams"], jax.Array]


# ----------------------------------------------------------------------------- config and state


@dataclasses.dataclass(frozen=True)
class GAConfig:
  """Structural (static) settings of the GA; changing one recompiles.

  Attributes:
    population_size: individuals per generation (``P``; published: 100).
    hof_size: hall-of-fame size ``K``; its members are kept in every next population
      (published: 5).
    tournament_size: contestants per tournament (published: 3), drawn with replacement,
      so it may exceed the population (as DEAP's ``selTournament`` allows).
    generations: generations after the initial one (published: 50); ``generations + 1``
      populations are evaluated.
  """

  population_size: int = 100
  hof_size: int = 5
  tournament_size: int = 3
  generations: int = 50

  def __post_init__(self):
    for name in ("population_size", "hof_size", "tournament_size", "generations"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"GAConfig.{name} must be an int, got {v!r}.")
      object.__setattr__(self, name, int(v))
    if self.hof_size < 1:
      raise ValueError(f"GAConfig.hof_size must be at least 1, got {self.hof_size}.")
    if self.tournament_size < 1:
      raise ValueError(f"GAConfig.tournament_size must be at least 1, got "
                       f"{self.tournament_size}.")
    if self.generations < 0:
      raise ValueError(f"GAConfig.generations must be >= 0, got {self.generations}.")
    if self.population_size <= self.hof_size:
      raise ValueError(
          f"GAConfig.population_size ({self.population_size}) must be larger than the hall of "
          f"fame ({self.hof_size}): each generation breeds population_size - hof_size children. "
          "Increase population_size or decrease hof_size.")


class GAHyperparams(NamedTuple):
  """Numeric (traced) settings: ``vmap`` over them, or change them, without recompiling.

  Attributes:
    crossover_prob: probability that a pair of parents is crossed (published: 0.8).
    mutation_prob: probability that a child is mutated (published: 0.2).
    bit_flip_prob: probability that each bit of a mutated child flips (published: 0.1).
    lam: the size penalty ``lambda`` of the built-in fitness functions (eq. 5 / eq. 6). There
      is no published default; 10 trades 10 accuracy points for the whole layer under eq. 5.
  """

  crossover_prob: float | jax.Array = 0.8
  mutation_prob: float | jax.Array = 0.2
  bit_flip_prob: float | jax.Array = 0.1
  lam: float | jax.Array = 10.0


class GAState(NamedTuple):
  """The state between generations.

  Attributes:
    population: (P, U) bool, the last evaluated population.
    fitness: (P,) float32, its fitness (NaN replaced by -inf).
    hof: (K, U) bool, the hall of fame, best first.
    hof_fitness: (K,) float32, non-increasing.
    generation: int32 scalar, the number of populations told so far.
  """

  population: jax.Array
  fitness: jax.Array
  hof: jax.Array
  hof_fitness: jax.Array
  generation: jax.Array


class GAHistory(NamedTuple):
  """Per-generation statistics, each of shape (generations + 1,) (generation 0 first).

  Attributes:
    max: the population's best fitness.
    mean: the mean over the population's finite fitness values; with none finite, over all
      values (all +inf: +inf; all -inf, NaN's stand-in: -inf; a mix of both: NaN).
    min: the smallest finite fitness; with none finite, the smallest value.
    best: the hall of fame's best fitness so far (non-decreasing).
    best_kept: units kept by the hall of fame's best individual.
  """

  max: jax.Array
  mean: jax.Array
  min: jax.Array
  best: jax.Array
  best_kept: jax.Array


class GAResult(NamedTuple):
  """What :func:`search` returns.

  Attributes:
    mask: (U,) bool, the best unit mask found.
    fitness: its fitness.
    accuracy: its training accuracy as a fraction in [0, 1], like :func:`jaxprune.evaluate`
      (NaN when the fitness is a user function and no labels are given, or for a model whose
      task is not classification). The fitness itself keeps the seeds' percent scale.
    kept: number of units it keeps.
    history: a :class:`GAHistory`.
    state: the final :class:`GAState` (population and hall of fame).
    invalid: True when the run was given unusable input: for the built-in fitness, NaN or
      infinite inputs or params, labels outside the model's classes or one-hot rows that are
      not one-hot, a ``lam`` that is NaN, infinite or negative; for any fitness, a probability
      of ``hyper`` outside [0, 1] or NaN. Outside ``jit`` such input raises before anything
      runs; under ``jit`` or ``vmap`` (traced values) it cannot, so the run goes on, this flag
      is set and ``fitness`` and ``accuracy`` are NaN.
  """

  mask: jax.Array
  fitness: jax.Array
  accuracy: jax.Array
  kept: jax.Array
  history: GAHistory
  state: GAState
  invalid: jax.Array = False


def check_config(config) -> None:
  """Raises TypeError unless ``config`` is a :class:`GAConfig` (a dict of its fields, say)."""
  if isinstance(config, GAConfig):
    return
  fix = (f"ga.GAConfig(**{dict(config)!r})" if isinstance(config, Mapping) else
         "ga.GAConfig(population_size=100, generations=50)")
  raise TypeError(f"config must be a ga.GAConfig (the GA's static settings), got "
                  f"{type(config).__name__} {config!r}; pass config={fix}.")


def _is_number(v) -> bool:
  """Whether a concrete setting is a real number or an array of them (not bool, str, None)."""
  dtype = getattr(v, "dtype", None)
  if dtype is None:
    if not isinstance(v, (int, float, np.number, list, tuple)) or isinstance(v, bool):
      return False
    try:
      dtype = np.asarray(v).dtype
    except (TypeError, ValueError):
      return False
  try:
    return bool(jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))
  except TypeError:
    return False


def _check_types(hyper) -> None:
  """Raises TypeError unless ``hyper`` is a :class:`GAHyperparams` of numbers (or tracers)."""
  if not isinstance(hyper, GAHyperparams):
    fix = (f"ga.GAHyperparams(**{dict(hyper)!r})" if isinstance(hyper, Mapping) else
           "ga.GAHyperparams(lam=10.0)")
    raise TypeError(f"hyper must be a ga.GAHyperparams (the GA's numeric settings), got "
                    f"{type(hyper).__name__} {hyper!r}; pass hyper={fix}.")
  for name, default in zip(GAHyperparams._fields, GAHyperparams._field_defaults.values()):
    v = getattr(hyper, name)
    if isinstance(v, jax.core.Tracer) or _is_number(v):
      continue
    try:
      example = float(v)   # a number written as a string, say
    except (TypeError, ValueError):
      example = default
    raise TypeError(f"GAHyperparams.{name} must be a number (a Python float, or a JAX or "
                    f"NumPy array of floats), got {v!r} ({type(v).__name__}); e.g. "
                    f"GAHyperparams({name}={example!r}).")


def check_params(hyper: GAHyperparams) -> None:
  """Raises ValueError if a concrete probability is outside [0, 1], or a concrete setting is not
  one number (several settings run as a ``vmap`` over ``hyper``), TypeError if ``hyper`` is not
  a :class:`GAHyperparams` or a setting is not a number (a string, None, a bool); traced values
  pass."""
  _check_types(hyper)
  for name in GAHyperparams._fields:
    v = getattr(hyper, name)
    if not isinstance(v, jax.core.Tracer) and np.ndim(v) != 0:
      raise ValueError(
          f"GAHyperparams.{name} must be one number, got shape {np.shape(v)}. To run several "
          "settings at once, vmap over hyper: jax.vmap(lambda h: ga.search(..., hyper=h))"
          "(GAHyperparams(...)) with every field an array of the same length, or only some "
          "fields mapped with in_axes=(GAHyperparams(None, None, None, 0),) (see docs/ga.md).")
  for name in ("crossover_prob", "mutation_prob", "bit_flip_prob"):
    v = getattr(hyper, name)
    if isinstance(v, jax.core.Tracer):
      continue
    a = np.asarray(v)
    if not np.all((a >= 0) & (a <= 1)):
      raise ValueError(f"GAHyperparams.{name} must be a probability in [0, 1], got {v!r}.")
  if not isinstance(hyper.lam, jax.core.Tracer):
    if not np.all(np.isfinite(hyper.lam)):
      raise ValueError(f"GAHyperparams.lam must be finite, got {hyper.lam!r}.")
    if not np.all(np.isfinite(_as_jax_float(hyper.lam))):
      raise ValueError(
          f"GAHyperparams.lam={hyper.lam!r} is finite here but not in "
          f"{jax.dtypes.canonicalize_dtype(np.float64)}, the dtype the GA computes in (its "
          "largest value is about 3.4e38): the penalty would be infinite and every fitness "
          "-inf or NaN. Pass a lam below 3.4e38 (eq. 5 takes one as large as 1e38).")


def _as_jax_float(v) -> np.ndarray:
  """A concrete float setting in the dtype JAX gives it (float32 unless x64 is enabled)."""
  a = np.asarray(v)
  if a.dtype.kind != "f":
    return a
  with np.errstate(over="ignore"):
    return a.astype(jax.dtypes.canonicalize_dtype(a.dtype))


def check_penalty(hyper: GAHyperparams) -> None:
  """Raises ValueError if a concrete ``lam`` is negative: the built-in fitness subtracts it as a
  size penalty, so a negative one would reward keeping units (a fitness function of your own
  may read ``lam`` as it likes; :func:`check_params` leaves its sign alone)."""
  if not isinstance(hyper.lam, jax.core.Tracer) and not np.all(np.asarray(hyper.lam) >= 0):
    raise ValueError(f"GAHyperparams.lam must be >= 0, got {hyper.lam!r}: the built-in fitness "
                     "subtracts lam as a penalty on the units kept (eq. 5 / eq. 6), so a "
                     "negative lam rewards keeping units. Use lam=0 (or fitness='accuracy') for "
                     "accuracy alone.")


def unusable_hyper(hyper: GAHyperparams, penalty: bool) -> jax.Array:
  """() bool, inside a program: what :func:`check_params` (and with ``penalty``,
  :func:`check_penalty`) refuses outside jit: a probability outside [0, 1] or NaN, a lam that
  is not finite (or negative)."""
  bad = jnp.zeros((), bool)
  for name in ("crossover_prob", "mutation_prob", "bit_flip_prob"):
    v = jnp.asarray(getattr(hyper, name))
    bad = bad | ~((v >= 0) & (v <= 1))
  lam = jnp.asarray(hyper.lam)
  bad = bad | ~jnp.isfinite(lam)
  if penalty:
    bad = bad | (lam < 0)
  return bad


# ----------------------------------------------------------------------------- ask / tell


def generation_keys(key: jax.Array, config: GAConfig) -> jax.Array:
  """The ``generations + 1`` keys of a run: key ``g`` makes the population of generation g."""
  return jax.random.split(key, config.generations + 1)


def init(config: GAConfig, num_units: int) -> GAState:
  """An empty state (generation 0): the next :func:`ask` returns the random initial population."""
  check_config(config)
  if num_units < 1:
    raise ValueError(f"num_units must be at least 1, got {num_units}.")
  p, k = config.population_size, config.hof_size
  return GAState(
      population=jnp.zeros((p, num_units), bool),
      fitness=jnp.full((p,), -jnp.inf, jnp.float32),
      hof=jnp.zeros((k, num_units), bool),
      hof_fitness=jnp.full((k,), -jnp.inf, jnp.float32),
      generation=jnp.zeros((), jnp.int32))


def initial_population(config: GAConfig, num_units: int, *, key: jax.Array) -> jax.Array:
  """``P`` random chromosomes, each bit True with probability 1/2 (DEAP's ``randint(0, 1)``)."""
  # (a float32 p: the draws are float32 under x64 too, so a key gives the same population)
  return jax.random.bernoulli(key, jnp.float32(0.5), (config.population_size, num_units))


def select_parents(config: GAConfig, state: GAState, *, key: jax.Array):
  """One generation's uniform draws, split for the operators, and the tournament winners.

  Returns ``(parent indices (P-K,), crossover draws ((P-K) // 2, 2), mutation draws
  (P-K * (1 + U),))``.
  """
  p, k, t = config.population_size, config.hof_size, config.tournament_size
  n, u = p - k, state.population.shape[1]
  half = n // 2
  sizes = (n * t, half * 2, n * (1 + u))
  draws = ops.uniform(key, sum(sizes))
  u_sel, u_cx, u_mut = jnp.split(draws, np.cumsum(sizes)[:-1])
  idx = jax.vmap(ops.tournament, in_axes=(0, None))(u_sel.reshape(n, t), state.fitness)
  return idx, u_cx.reshape(half, 2), u_mut


def breed(config: GAConfig, state: GAState, hyper: GAHyperparams, *, key: jax.Array) -> jax.Array:
  """The next population: ``P - K`` selected, crossed and mutated children, then the HoF.

  One vector of uniform draws per generation feeds the operators, in this order: tournaments
  ``(P-K, T)``, crossover ``((P-K) // 2, 2)``, mutation ``(P-K, 1 + U)``.
  """
  n, u = config.population_size - config.hof_size, state.population.shape[1]
  idx, u_cx, u_mut = select_parents(config, state, key=key)
  children = ops.crossover_pairs_from(u_cx, state.population[idx], hyper.crossover_prob)
  children = ops.mutate_from(u_mut.reshape(n, 1 + u), children, hyper.mutation_prob,
                             hyper.bit_flip_prob)
  return jnp.concatenate([children, state.hof], axis=0)


def ask(config: GAConfig, state: GAState, hyper: GAHyperparams = GAHyperparams(), *,
        key: jax.Array) -> jax.Array:
  """The population to evaluate next: random at generation 0, else bred from ``state``.

  Args:
    config: the static settings.
    state: the current state (from :func:`init` or :func:`tell`).
    hyper: the numeric settings.
    key: this generation's key (see :func:`generation_keys`).

  Returns:
    (P, U) bool population.
  """
  check_config(config)
  check_params(hyper)
  return _ask(config, state, hyper, key)


@functools.partial(jax.jit, static_argnums=0)
def _ask(config: GAConfig, state: GAState, hyper: GAHyperparams, key: jax.Array) -> jax.Array:
  # Compiled once per config and shapes: called eagerly (a user's ask/tell loop), a bare
  # lax.cond of fresh lambdas was traced and lowered again at every generation.
  num_units = state.population.shape[1]
  return lax.cond(state.generation == 0,
                  lambda: initial_population(config, num_units, key=key),
                  lambda: breed(config, state, hyper, key=key))


def tell(config: GAConfig, state: GAState, population: jax.Array,
         fitness: jax.Array) -> GAState:
  """Records an evaluated population: updates the hall of fame and the generation counter.

  NaN fitness values are replaced by ``-inf`` (the worst fitness).

  Args:
    config: the static settings.
    state: the state :func:`ask` was called with.
    population: (P, U) bool, as returned by :func:`ask`.
    fitness: (P,) fitness of each individual, higher is better.

  Returns:
    The new state.
  """
  return tell_with_indices(config, state, population, fitness)[0]


def tell_with_indices(config: GAConfig, state: GAState, population: jax.Array,
                      fitness: jax.Array) -> tuple[GAState, jax.Array]:
  """:func:`tell`, and the (K,) indices into ``concat([state.hof, population])`` of the new
  hall of fame (:func:`jaxprune.ga.operators.hall_of_fame_indices`)."""
  p, u = config.population_size, state.population.shape[1]
  if tuple(population.shape) != (p, u):
    raise ValueError(f"tell: population has shape {tuple(population.shape)}, expected ({p}, {u}).")
  if jnp.result_type(population) != jnp.bool_:
    raise ValueError(f"tell: population has dtype {jnp.result_type(population)}; it must be the "
                     "bool masks ask returned (a float population would be read as nonzero = "
                     "kept: pass population > 0.5 or population.astype(bool) yourself).")
  fitness = jnp.asarray(fitness)
  if tuple(fitness.shape) != (p,):
    raise ValueError(f"tell: fitness has shape {tuple(fitness.shape)}; it must have one value "
                     f"per individual, shape ({p},).")
  return _tell(state, population, fitness)


@jax.jit
def _tell(state: GAState, population: jax.Array, fitness: jax.Array
          ) -> tuple[GAState, jax.Array]:
  # One program per shape rather than a dispatch per op in an eager ask/tell loop.
  fitness = fitness.astype(jnp.float32)
  fitness = jnp.where(jnp.isnan(fitness), -jnp.inf, fitness)
  population = population.astype(bool)
  hof, hof_fitness, idx = ops.update_hall_of_fame_with_indices(
      state.hof, state.hof_fitness, population, fitness, hof_valid=state.generation > 0)
  return GAState(population, fitness, hof, hof_fitness, state.generation + 1), idx
