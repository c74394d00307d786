"""Genetic-algorithm search for unit masks: the published GA as one compiled ``lax.scan``.

The algorithm is DEAP's ``eaSimple`` with a hall of fame kept in the population (the elitist
variant used by the published GA mask search). With population ``P``, hall of fame ``K``,
tournament size ``T`` and ``G`` generations:

1. Generation 0: ``P`` random chromosomes (each bit True with probability 1/2) are evaluated and
   the hall of fame is filled with the ``K`` best distinct ones.
2. Each of the ``G`` following generations:

   a. ``P - K`` parents are chosen by tournaments of size ``T`` (with replacement);
   b. consecutive parents (0, 1), (2, 3), ... undergo one-point crossover with probability
      ``crossover_prob`` (an odd last parent is copied);
   c. each child is mutated with probability ``mutation_prob``, flipping each bit with
      probability ``bit_flip_prob``;
   d. the ``K`` hall-of-fame members are appended: the new population is the ``P - K``
      children followed by the hall of fame (elitism: the hall of fame *replaces* the last ``K``
      places of the offspring, so the population size stays ``P``);
   e. the population is evaluated (hall-of-fame members are re-scored; fitness is
      deterministic, so their values do not change) and the hall of fame is updated with it.

The result is the hall of fame's best, ``hof[0]``: the fittest individual ever evaluated.

Fitness is higher-is-better. NaN fitness is treated as the worst possible value, ``-inf``
(such individuals lose every tournament and never enter the hall of fame while a finite one
exists). Built-in fitness functions (``'eq5'``, ``'eq6'``) score training accuracy in percent
minus ``lam * N_kept / N_initial`` (eq. 5) or ``lam * N_kept`` (eq. 6). An all-False mask is a
legitimate individual: the masked network then predicts from the output bias alone, and that is
the accuracy it is given.

Keys: ``generation_keys(key, config)`` splits ``key`` into ``G + 1`` keys; generation ``g``
uses key ``g`` (the initial population uses key 0). :func:`run` does this inside one
``lax.scan``; an ask/tell loop over the same keys gives the same result:

  >>> import jax, jax.numpy as jnp
  >>> from jaxprune import ga
  >>> config = ga.GAConfig(population_size=20, generations=5)
  >>> def onemax(population, data, hyper):   # count of True bits
  ...   return population.sum(1).astype(jnp.float32)
  >>> state = ga.init(config, num_units=16)
  >>> for k in ga.generation_keys(jax.random.key(0), config):
  ...   population = ga.ask(config, state, ga.GAHyperparams(), key=k)
  ...   state = ga.tell(config, state, population, onemax(population, None, None))
  >>> state2, history = ga.run(config, onemax, 16, key=jax.random.key(0), progress=False)
  >>> bool((state.hof == state2.hof).all())
  True

Several devices: when more than one device is visible (or a ``mesh`` is given), population
evaluation is sharded over a ``Mesh`` along its population axis; results equal the one-device
run. A population that does not divide by the device count is padded with all-False
chromosomes for evaluation only (their scores are discarded), so any size works.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import time
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from jaxprune import masks as masks_lib
from jaxprune import units as units_lib
from jaxprune import validate
from jaxprune.ga import incremental
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
    tournament_size: contestants per tournament (published: 3).
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
    if self.population_size < self.tournament_size:
      raise ValueError(
          f"GAConfig.population_size ({self.population_size}) is smaller than the tournament "
          f"size ({self.tournament_size}). Increase population_size or decrease "
          "tournament_size.")


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
    mean: the mean over the population's finite fitness values (-inf if none is finite).
    min: the smallest finite fitness (-inf if none is finite).
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
  """

  mask: jax.Array
  fitness: jax.Array
  accuracy: jax.Array
  kept: jax.Array
  history: GAHistory
  state: GAState


def check_params(hyper: GAHyperparams) -> None:
  """Raises ValueError if a concrete probability is outside [0, 1] (traced values pass)."""
  for name in ("crossover_prob", "mutation_prob", "bit_flip_prob"):
    v = getattr(hyper, name)
    if isinstance(v, jax.core.Tracer):
      continue
    a = np.asarray(v)
    if not np.all((a >= 0) & (a <= 1)):
      raise ValueError(f"GAHyperparams.{name} must be a probability in [0, 1], got {v!r}.")
  if not isinstance(hyper.lam, jax.core.Tracer) and not np.all(np.isfinite(hyper.lam)):
    raise ValueError(f"GAHyperparams.lam must be finite, got {hyper.lam!r}.")


# ----------------------------------------------------------------------------- ask / tell


def generation_keys(key: jax.Array, config: GAConfig) -> jax.Array:
  """The ``generations + 1`` keys of a run: key ``g`` makes the population of generation g."""
  return jax.random.split(key, config.generations + 1)


def init(config: GAConfig, num_units: int) -> GAState:
  """An empty state (generation 0): the next :func:`ask` returns the random initial population."""
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
  return jax.random.bernoulli(key, 0.5, (config.population_size, num_units))


def breed(config: GAConfig, state: GAState, hyper: GAHyperparams, *, key: jax.Array) -> jax.Array:
  """The next population: ``P - K`` selected, crossed and mutated children, then the HoF.

  One vector of uniform draws per generation feeds the operators, in this order: tournaments
  ``(P-K, T)``, crossover ``((P-K) // 2, 2)``, mutation ``(P-K, 1 + U)``.
  """
  p, k, t = config.population_size, config.hof_size, config.tournament_size
  n, u = p - k, state.population.shape[1]
  half = n // 2
  sizes = (n * t, half * 2, n * (1 + u))
  draws = jax.random.uniform(key, (sum(sizes),))
  u_sel, u_cx, u_mut = jnp.split(draws, np.cumsum(sizes)[:-1])
  idx = jax.vmap(ops.tournament, in_axes=(0, None))(u_sel.reshape(n, t), state.fitness)
  children = ops.crossover_pairs_from(u_cx.reshape(half, 2), state.population[idx],
                                      hyper.crossover_prob)
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
  check_params(hyper)
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
  p, u = config.population_size, state.population.shape[1]
  if tuple(population.shape) != (p, u):
    raise ValueError(f"tell: population has shape {tuple(population.shape)}, expected ({p}, {u}).")
  fitness = jnp.asarray(fitness)
  if tuple(fitness.shape) != (p,):
    raise ValueError(f"tell: fitness has shape {tuple(fitness.shape)}; it must have one value "
                     f"per individual, shape ({p},).")
  fitness = fitness.astype(jnp.float32)
  fitness = jnp.where(jnp.isnan(fitness), -jnp.inf, fitness)
  population = population.astype(bool)
  hof, hof_fitness = ops.update_hall_of_fame(state.hof, state.hof_fitness, population, fitness,
                                             hof_valid=state.generation > 0)
  return GAState(population, fitness, hof, hof_fitness, state.generation + 1)


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
  if mesh is None:
    mesh = default_mesh(shard)
  elif not shard:
    mesh = None
  if mesh is not None and mesh.size > 1:
    data = jax.device_put(data, NamedSharding(mesh, PS()))
  _PROGRESS["last"] = -1
  out = _run_jit(config, fitness_fn, int(num_units), bool(progress), mesh, hyper, data, key)
  if progress:
    jax.effects_barrier()  # every report has been printed before we return
  return out


# ----------------------------------------------------------------------------- fitness


def penalized(accuracy: jax.Array, kept: jax.Array, num_units: int, lam,
              penalty: str) -> jax.Array:
  """Eq. 5 (``'ratio'``: ``acc - lam * kept / num_units``) or eq. 6 (``'count'``:
  ``acc - lam * kept``); ``accuracy`` in percent."""
  kept = jnp.asarray(kept, jnp.float32)
  if penalty == "ratio":
    return accuracy - lam * kept / num_units
  if penalty == "count":
    return accuracy - lam * kept
  raise ValueError(f"penalty must be 'ratio' (eq. 5) or 'count' (eq. 6), got {penalty!r}.")


def readout_slice(target, group: str):
  """The group's consumer slice if the target's output is an affine function of ``group``'s
  activations, read directly (the GA's fast path); else None.

  That holds when the group's only consumer is the last linear map before the output, reading
  exactly the group's activations (the last hidden layer of an MLP, the last dense layer of a
  CNN). It is found from the target's traced computation (``target.readout``), never from layer
  names.
  """
  units_lib._check_group_name(_groups_of(target), group)
  readout = getattr(target, "readout", None)
  return readout(group) if readout is not None else None


def fast_path_applies(target, group: str) -> bool:
  """True if :func:`readout_slice` finds the one-product fast path for ``group``."""
  return readout_slice(target, group) is not None


def _groups_of(target):
  groups = target.groups if hasattr(target, "groups") else None
  if not isinstance(groups, Mapping):
    raise TypeError("The GA needs a pruning target (a jaxprune model or jaxprune.trace(...)), got "
                    f"{type(target).__name__}.")
  return groups


def _labels(y: jax.Array) -> jax.Array:
  y = jnp.asarray(y)
  if y.ndim == 2:
    y = jnp.argmax(y, axis=-1)
  if y.ndim != 1 or not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(f"Labels must be integer class indices of shape (N,) (or one-hot (N, C)); "
                     f"got shape {tuple(y.shape)} and dtype {y.dtype}.")
  return y


@dataclasses.dataclass(frozen=True)
class AccuracyFitness:
  """Training accuracy in percent of the masked network, minus a size penalty.

  ``penalty='ratio'`` is eq. 5 (``acc - lam * N_kept / N_initial``), ``'count'`` eq. 6
  (``acc - lam * N_kept``), ``None`` the accuracy alone. ``fast=True`` scores the population
  from activations computed once (see :func:`fast_path_applies`), as one matrix product
  ``H @ W_all`` with ``W_all[:, p*O:(p+1)*O] = mask[p][:, None] * W_out``; ``fast=False`` runs
  the full masked forward pass for each individual (``vmap``). On the fast path,
  ``incremental`` lets :func:`run` score children from their parents' partial logits
  (:mod:`jaxprune.ga.incremental`): ``'auto'`` (the default) from
  ``incremental.MIN_UNITS`` units on, True always, False never (full evaluation).

  Use ``prepare(params, x, y)`` to build the ``data`` argument.
  """

  model: Any
  group: str
  penalty: str | None = "ratio"
  fast: bool = False
  incremental: bool | str = "auto"

  def prepare(self, params: PyTree, x: jax.Array, y: jax.Array) -> PyTree:
    y = _labels(y)
    check = getattr(self.model, "check_input", None)
    if check is not None:
      check(x)
    if y.shape[0] != jnp.shape(x)[0]:
      raise ValueError(f"x has {jnp.shape(x)[0]} patterns but y has {y.shape[0]} labels.")
    if not self.fast:
      return {"params": params, "x": jnp.asarray(x), "y": y}
    s = readout_slice(self.model, self.group)
    h = self.model.activations(params, x, self.group)
    w = units_lib.unit_view(units_lib.get_path(params, s.path), s)      # (units, outputs)
    b = (units_lib.get_path(params, s.bias) if s.bias is not None
         else jnp.zeros((w.shape[-1],), w.dtype))
    return {"h": h.reshape(h.shape[0], -1), "w": w.reshape(w.shape[0], -1), "b": b, "y": y}

  def accuracy(self, population: jax.Array, data: PyTree) -> jax.Array:
    """(P,) training accuracy in percent of each mask of the population."""
    y = data["y"]
    if self.fast:
      h, w, b = data["h"], data["w"], data["b"]
      p, (u, o) = population.shape[0], w.shape
      w_all = population.T.astype(w.dtype)[:, :, None] * w[:, None, :]   # (U, P, O)
      logits = (h @ w_all.reshape(u, p * o)).reshape(h.shape[0], p, o) + b[None, None, :]
      correct = jnp.argmax(logits, axis=-1) == y[:, None]                 # (N, P)
      return 100.0 * jnp.mean(correct.astype(jnp.float32), axis=0)

    def one(mask):
      wm = masks_lib.expand(data["params"], self.model, {self.group: mask})
      logits = self.model.apply(masks_lib.apply_masks(data["params"], wm), data["x"])
      return 100.0 * jnp.mean((jnp.argmax(logits, axis=-1) == y).astype(jnp.float32))

    return jax.vmap(one)(population)

  def incremental_data(self, data: PyTree) -> tuple[jax.Array, ...]:
    """``(h, w, b, y)`` of the fast path, for :mod:`jaxprune.ga.incremental`."""
    if not self.fast:
      raise ValueError("Incremental evaluation needs the fast path (fast=True).")
    return data["h"], data["w"], data["b"], data["y"]

  def from_accuracy(self, accuracy: jax.Array, population: jax.Array, data: PyTree,
                    hyper: GAHyperparams) -> jax.Array:
    """The fitness of each individual given its accuracy (the size penalty, if any)."""
    del data
    if self.penalty is None:
      return accuracy
    kept = jnp.sum(population, axis=1, dtype=jnp.int32)
    return penalized(accuracy, kept, population.shape[1], hyper.lam, self.penalty)

  def __call__(self, population: jax.Array, data: PyTree, hyper: GAHyperparams) -> jax.Array:
    return self.from_accuracy(self.accuracy(population, data), population, data, hyper)


@dataclasses.dataclass(frozen=True)
class UserFitness:
  """A user function ``fn(params, mask) -> scalar`` scored over the population with ``vmap``."""

  fn: Callable[[PyTree, jax.Array], jax.Array]

  def __call__(self, population: jax.Array, data: PyTree, hyper: GAHyperparams) -> jax.Array:
    del hyper
    return jax.vmap(lambda m: jnp.asarray(self.fn(data, m), jnp.float32))(population)


_FITNESS = {"eq5": "ratio", "eq6": "count", "accuracy": None}


def make_fitness(model, group: str, fitness: str | Callable = "eq5",
                 fast_path: bool | str = "auto",
                 incremental: bool | str = "auto") -> AccuracyFitness | UserFitness:
  """The fitness object :func:`search` uses (hashable, so compiled runs are reused)."""
  if incremental not in (True, False, "auto") or isinstance(incremental, (int, float)) and (
      not isinstance(incremental, bool)):
    raise ValueError(f"incremental must be 'auto', True or False, got {incremental!r}.")
  g = units_lib._check_group_name(_groups_of(model), group)
  if callable(fitness):
    return UserFitness(fitness)
  if fitness not in _FITNESS:
    raise ValueError(f"fitness must be 'eq5', 'eq6', 'accuracy' or a function "
                     f"(params, mask) -> scalar; got {fitness!r}.")
  if getattr(model, "task", "classification") != "classification":
    raise ValueError(f"Fitness {fitness!r} scores classification accuracy, but this "
                     f"{type(model).__name__} does {model.task}; pass a function "
                     "(params, mask) -> scalar instead.")
  applies = fast_path_applies(model, g.name)
  if fast_path == "auto":
    fast = applies
  elif fast_path is True:
    if not applies:
      raise ValueError(f"fast_path=True needs a group read only by the output layer "
                       f"(e.g. the last hidden layer); {group!r} is not. Use fast_path='auto'.")
    fast = True
  elif fast_path is False:
    fast = False
  else:
    raise ValueError(f"fast_path must be 'auto', True or False, got {fast_path!r}.")
  return AccuracyFitness(model, group, _FITNESS[fitness], fast, incremental)


def search(model, params: PyTree, x: jax.Array | None, y: jax.Array | None, group: str, *,
           key: jax.Array, fitness: str | Callable = "eq5", config: GAConfig = GAConfig(),
           hyper: GAHyperparams = GAHyperparams(), fast_path: bool | str = "auto", progress: bool = True,
           mesh: Mesh | None = None, shard: bool = True,
           incremental: bool | str = "auto") -> GAResult:
  """Evolves a unit mask for ``group`` of a trained model with the published GA.

  Args:
    model: a jaxprune model.
    params: its trained variables.
    x: training inputs (N, ...).
    y: training labels, int class indices (N,) (or one-hot).
    group: the unit group to prune, e.g. ``'hidden_0'``.
    key: PRNG key (the run is deterministic for a key).
    fitness: ``'eq5'`` (accuracy % - lam * kept / units), ``'eq6'`` (accuracy % - lam * kept),
      ``'accuracy'``, or a function ``(params, mask) -> scalar`` (``vmap``ped over the
      population; ``x`` and ``y`` may then be None).
    config: static settings (:class:`GAConfig`): population, hall of fame, tournament size,
      generations.
    hyper: numeric settings (:class:`GAHyperparams`): probabilities and ``lam``.
    fast_path: ``'auto'`` uses the one-product evaluation when the group feeds the output layer
      directly; ``False`` forces the general ``vmap`` of the masked forward pass.
    progress: show a progress bar on stderr.
    mesh, shard: see :func:`run`.
    incremental: on the fast path, score children from their parents' partial logits
      (:mod:`jaxprune.ga.incremental`, one device): ``'auto'`` from
      ``incremental.MIN_UNITS`` units on, True always, False forces the full evaluation.

  Returns:
    A :class:`GAResult`.

  Example:
    >>> import jax, jaxprune
    >>> from jaxprune.ga import GAConfig, search
    >>> model = jaxprune.MLP(in_features=10, hidden=(20,), out_features=7)
    >>> params = model.init(jax.random.key(0))
    >>> x = jax.random.normal(jax.random.key(1), (64, 10))
    >>> y = jax.random.randint(jax.random.key(2), (64,), 0, 7)
    >>> res = search(model, params, x, y, 'hidden_0', key=jax.random.key(3),
    ...              config=GAConfig(population_size=20, generations=3), progress=False)
    >>> res.mask.shape, res.history.best.shape
    ((20,), (4,))
  """
  fit = make_fitness(model, group, fitness, fast_path, incremental)
  if x is None:
    validate.check_params(params)
  else:
    validate.check_model_data(model, params, x, y)  # the one shared data check
  num_units = _groups_of(model)[group].size
  if isinstance(fit, UserFitness):
    data = params
    mask = jnp.ones((num_units,), bool)
    out = jax.eval_shape(lambda p, m: fit.fn(p, m), params, mask)
    if not hasattr(out, "shape") or tuple(out.shape) != ():
      raise ValueError(f"The fitness function must return a scalar for one mask; it returned "
                       f"shape {tuple(getattr(out, 'shape', ()))}.")
  else:
    if x is None or y is None:
      raise ValueError(f"fitness={fitness!r} needs training inputs x and labels y.")
    jax.eval_shape(fit.prepare, params, x, y)   # the input checks, before compiling
  check_params(hyper)
  if mesh is None:
    mesh = default_mesh(shard)
  elif not shard:
    mesh = None
  if mesh is not None and mesh.size > 1:
    params = jax.device_put(params, NamedSharding(mesh, PS()))
  with_accuracy = (x is not None and y is not None
                   and getattr(model, "task", "") == "classification")
  _PROGRESS["last"] = -1
  result = _search_jit(config, fit, num_units, bool(progress), mesh, with_accuracy, hyper,
                       params, x, y, key)
  if progress:
    jax.effects_barrier()  # every report has been printed before we return
  return result


def _search_program(config: GAConfig, fit, num_units: int, progress: bool, mesh: Mesh | None,
                    with_accuracy: bool, hyper: GAHyperparams, params: PyTree, x, y,
                    key: jax.Array):
  """The whole of :func:`search` as one program: the fast path's activations, the GA's scan
  and the best mask's accuracy (one XLA compilation for a first call)."""
  data = params if isinstance(fit, UserFitness) else fit.prepare(params, x, y)
  if mesh is not None and mesh.size > 1:
    data = jax.tree.map(lambda a: lax.with_sharding_constraint(a, NamedSharding(mesh, PS())),
                        data)
  state, history = _run(config, fit, num_units, progress, mesh, hyper, data, key)
  if with_accuracy:  # a fraction, like evaluate() (the fitness works in percent)
    accuracy = AccuracyFitness(fit.model, fit.group, None, False).accuracy(
        state.hof[0][None], {"params": params, "x": x, "y": _labels(y)})[0] / 100.0
  else:
    accuracy = jnp.asarray(jnp.nan, jnp.float32)
  best = state.hof[0]
  return GAResult(mask=best, fitness=state.hof_fitness[0], accuracy=accuracy,
                  kept=jnp.sum(best, dtype=jnp.int32), history=history, state=state)


_search_jit = jax.jit(_search_program, static_argnums=(0, 1, 2, 3, 4, 5))
