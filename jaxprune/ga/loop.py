"""The compiled GA loop: every generation in one ``lax.scan``, population evaluation sharded over
devices when there are several, progress reported from inside the program."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from jaxprune import _compile
from jaxprune import validate
from jaxprune.ga import incremental
from jaxprune.ga import operators as ops
from jaxprune.progress import Progress
from jaxprune.ga.strategy import GAConfig
from jaxprune.ga.strategy import GAHistory
from jaxprune.ga.strategy import GAHyperparams
from jaxprune.ga.strategy import GAState
from jaxprune.ga.strategy import breed
from jaxprune.ga.strategy import check_config
from jaxprune.ga.strategy import check_params
from jaxprune.ga.strategy import generation_keys
from jaxprune.ga.strategy import init
from jaxprune.ga.strategy import initial_population
from jaxprune.ga.strategy import tell

PyTree = Any
FitnessFn = Callable[[jax.Array, PyTree, "GAHyperparams"], jax.Array]


# ----------------------------------------------------------------------------- progress


class GAProgress:
  """The progress display of one GA run: :class:`jaxprune.progress.Progress` lines.

  Each run (:func:`run`, :func:`jaxprune.ga.search`) makes its own, so two runs never share
  state. A line is printed for generation 0, then about every 5% of the generations and for the
  last one; the clock starts at generation 0's report, so compilation is not counted. Late,
  unordered reports (several devices) are ignored.

  Under ``jax.vmap`` the host callback is called once per run, each generation's reports in a
  row: a line waits for the next generation's report (or :meth:`flush`, when the run's display
  closes), so that it shows the best run's best fitness and the mean of the runs' means.
  """

  def __init__(self, total: int, desc: str = "GA", enabled: bool = True):
    self.total = max(int(total), 0)   # generations: a run of 0 shows "gen 0/0"
    self.bar = Progress(self.total, desc, enabled, unit="gen")
    self.bar.total = self.total       # (Progress counts at least 1 step)
    self.every = max(1, self.total // 20)
    self.last = -1
    self._pending = None   # (generation, [bests], [means]) of the line not printed yet

  def __call__(self, gen, best, mean) -> None:
    gen = int(np.max(gen))
    if self._pending is not None and gen == self._pending[0]:   # another run of a vmap
      self._pending[1].append(np.max(best))
      self._pending[2].append(np.mean(mean))
      return
    if gen <= self.last:
      return  # a late, unordered report (multi-device runs), or a vmapped run's, not shown
    self.flush()
    if self.last < 0:
      self.bar.start = time.time()  # compilation is not counted
    self.last = gen
    if gen == 0 or gen >= self.total or gen % self.every == 0:
      self._pending = (gen, [np.max(best)], [np.mean(mean)])

  def flush(self) -> None:
    """Prints the line that waits for other runs' reports of its generation, if any."""
    if self._pending is not None:
      gen, bests, means = self._pending
      self._pending = None
      self.bar.update(gen, best=float(np.max(bests)), mean=float(np.mean(means)))


_NOT_SHOWN_WARNED = False


def warn_if_not_shown(display: GAProgress) -> None:
  """Logs a warning (once per process, with absl) when a run with a progress display got no
  report while it ran: the call was traced (under ``jax.jit``, ``lax.map``, ...), its program
  runs later, when the display is gone, so nothing is printed."""
  global _NOT_SHOWN_WARNED
  if display.last >= 0 or _NOT_SHOWN_WARNED:
    return
  _NOT_SHOWN_WARNED = True
  logging.warning("jaxprune.ga: progress=True shows nothing when the GA is called under "
                  "jax.jit (or another transformation that compiles the call for later): the "
                  "run's display only lives during the call. Pass progress=False there.")


class _Displays:
  """The displays of the runs in progress, each under its own token.

  A compiled program is shared by every run with the same static settings, so its host callback
  cannot hold one run's display; it carries the run's token (a traced int32) instead, and looks
  the display up here. A run registers its display for its own duration only (:meth:`open`).
  """

  def __init__(self):
    self._live: dict[int, GAProgress] = {}
    self._next = itertools.count(1)
    self._lock = threading.Lock()

  @contextlib.contextmanager
  def open(self, display: GAProgress | None):
    """Registers ``display`` while the block runs; yields its token (0 for no display)."""
    if display is None:
      yield np.int32(0)   # NumPy: jnp.int32 would compile a program on a first call
      return
    with self._lock:
      token = next(self._next) % (2**31 - 1) or 1
      self._live[token] = display
    try:
      yield np.int32(token)
    finally:
      with self._lock:
        self._live.pop(token, None)
      display.flush()

  def report(self, token, gen, best, mean) -> None:
    """The host callback: forwards one generation's statistics to the run's display."""
    display = self._live.get(int(np.max(token)))
    if display is not None:
      display(gen, best, mean)


_DISPLAYS = _Displays()


def _in_program_reporter(token: jax.Array, ordered: bool):
  """A function ``(generation, best, mean)`` that, inside the program, reports to the host."""

  def report(gen, best, mean):
    # Ordered effects are not supported on several devices; the display ignores late reports.
    jax.debug.callback(_DISPLAYS.report, token, gen, best, mean, ordered=ordered)

  return report


# ----------------------------------------------------------------------------- the run


def _stats(state: GAState) -> GAHistory:
  return _stats_of(*_stats_inputs(state))


def _stats_inputs(state: GAState) -> tuple[jax.Array, jax.Array, jax.Array]:
  """What a generation's :class:`GAHistory` entry is computed from: the population's fitness,
  the best member's fitness and its number of kept units."""
  return state.fitness, state.hof_fitness[0], jnp.sum(state.hof[0], dtype=jnp.int32)


def _stats_of(f: jax.Array, best: jax.Array, best_kept: jax.Array) -> GAHistory:
  """One generation's statistics. ``mean`` and ``min`` are over the finite fitness values; in
  a generation with none (``f`` holds only -inf, NaN's stand-in, and +inf, which a fitness
  function of one's own can return) they are those of all values: all +inf gives +inf, all
  -inf gives -inf, and a mix gives a ``min`` of -inf and a ``mean`` of NaN (+inf and -inf have
  none)."""
  finite = jnp.isfinite(f)
  n = jnp.sum(finite)
  mx = jnp.max(f)
  # No more reductions than before: -inf enters the min as the largest finite float, so the
  # min is the finite values' when there are any, and else tells whether any value is -inf.
  lowest = jnp.min(jnp.where(finite, f, jnp.where(f == -jnp.inf, jnp.finfo(f.dtype).max,
                                                  jnp.inf)))
  mn = jnp.where(n > 0, lowest, jnp.where(lowest == jnp.inf, jnp.inf, -jnp.inf))
  mean = jnp.where(n > 0, ops.ordered_sum(jnp.where(finite, f, 0.0)) / jnp.maximum(n, 1),
                   jnp.where(mx == mn, mx, jnp.nan))
  return GAHistory(max=mx, mean=mean, min=mn, best=best, best_kept=best_kept)


# Without a progress display, a run that evaluates in full records each generation's fitness
# row and computes the statistics after the scan (the same values: an element-wise batch of the
# same operations) when one run's rows hold at most this many values (64 MB of float32; a vmap
# of runs records that much per run): a generation then launches fewer kernels on a GPU (57
# against 65 us per generation on an H200 at H=1000, population 100, both with the data closed
# over; within the spread of ga.run's own row across leases). The incremental scan computes
# them in the scan.
RECORD_FITNESS_MAX = 1 << 24


def _population_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PS(tuple(mesh.axis_names)))


def scores_rows_independently(fitness_fn: FitnessFn) -> bool:
  """Whether ``fitness_fn`` scores each row of the population on its own (a ``vmap`` over the
  rows: the built-in :class:`jaxprune.ga.AccuracyFitness` and the ``(params, mask)`` functions
  of :func:`jaxprune.ga.search`, which set ``per_individual = True``), so that rows added to the
  population cannot change the others' scores."""
  return getattr(fitness_fn, "per_individual", False) is True


def _evaluate(fitness_fn: FitnessFn, mesh: Mesh | None, population: jax.Array, data: PyTree,
              hyper: GAHyperparams) -> jax.Array:
  """Scores a population, sharding it over ``mesh``.

  A fitness that scores each row on its own (:func:`scores_rows_independently`) gets the
  population padded to a multiple of the device count with all-False rows, whose scores are
  dropped (an even split: one product per device on the fast path). Any other function
  ``(population, data, hyper) -> (P,)`` may read the population as a whole (a rank, a mean,
  its size), so it gets the ``P`` rows as they are, split unevenly over the devices.
  """
  p = population.shape[0]
  if mesh is not None and mesh.size > 1:
    pad = (-p) % mesh.size if scores_rows_independently(fitness_fn) else 0
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
         mesh: Mesh | None, hyper: GAHyperparams, data: PyTree, key: jax.Array,
         token: jax.Array | None = None) -> tuple[GAState, GAHistory]:
  """The GA's scan; with ``progress``, each generation is reported to the display registered
  under ``token`` (see :class:`_Displays`; None or 0: no display)."""
  token = jnp.int32(0) if token is None else token
  keys = generation_keys(key, config)
  evaluate = functools.partial(_evaluate, fitness_fn, mesh)
  report = (_in_program_reporter(token, ordered=mesh is None or mesh.size == 1)
            if progress else None)
  plan = _incremental_plan(config, fitness_fn, num_units, mesh, data)
  if plan is not None:   # children scored from their parents' partial logits
    return incremental.run_scan(plan, config, fitness_fn, num_units, hyper, data, key, report)

  record = report is None and (config.generations + 1) * config.population_size <= (
      RECORD_FITNESS_MAX)

  def generation(state, population):
    state = tell(config, state, population, evaluate(population, data, hyper))
    if record:
      return state, _stats_inputs(state)
    stats = _stats(state)
    if report is not None:
      report(state.generation - 1, stats.best, stats.mean)
    return state, stats

  # Generation 0 (the random population) and the bred generations share one scan body, so the
  # evaluation and the hall of fame are compiled once. The body evaluates the population it is
  # given and breeds the next from the new state, so it needs no branch on the generation (what
  # `ask` does with `lax.cond`, which a GPU runs by reading the predicate back to the host
  # every generation). The last step breeds one population that is never evaluated.
  def body(carry, k):
    state, population = carry
    state, stats = generation(state, population)
    return (state, breed(config, state, hyper, key=k)), stats

  population0 = initial_population(config, num_units, key=keys[0])
  # Any key serves the unused last breed; keys[0] keeps the scan's inputs one array.
  next_keys = jnp.concatenate([keys[1:], keys[:1]])
  (state, _), history = lax.scan(body, (init(config, num_units), population0), next_keys)
  if record:
    history = jax.vmap(_stats_of)(*history)
  if mesh is not None and mesh.size > 1:
    replicated = NamedSharding(mesh, PS())
    state, history = jax.tree.map(lambda a: lax.with_sharding_constraint(a, replicated),
                                  (state, history))
  return state, history


def _incremental_plan(config: GAConfig, fitness_fn: FitnessFn, num_units: int,
                      mesh: Mesh | None, data: PyTree) -> incremental.Plan | None:
  # First whether it is asked for and supported at all (whatever the work), then the work.
  if not incremental.applies(fitness_fn, mesh, num_units, work=math.inf):
    return None
  h, w = fitness_fn.incremental_data(data)[:2]
  if not incremental.exact_dtype(h, w):   # logits below 32 bits: the full evaluation
    return None
  if not incremental.applies(fitness_fn, mesh, num_units, work=full_work(config, h, w)):
    return None
  return incremental.plan(num_units, config.population_size, config.hof_size, h.shape[0],
                          w.shape[-1])


def full_work(config: GAConfig, h: jax.Array, w: jax.Array) -> float:
  """Floating-point operations of one run's full evaluations on the fast path (activations
  ``h``, output kernel ``w``; arrays or ``jax.ShapeDtypeStruct``): ``2 (G + 1) P U N O``, the
  ``work`` that ``incremental='auto'`` weighs (:func:`jaxprune.ga.incremental.applies`)."""
  units = math.prod(h.shape[1:])
  return (2.0 * (config.generations + 1) * config.population_size * units * h.shape[0]
          * w.shape[-1])


# The GA's programs compile with XLA:CPU's older loop emitter (jaxprune._compile.FAST: a third
# less compilation, the same bits; the same run time at H=1000, 4-8% more at H=100). A run that
# evaluates every child in full also compiles at LLVM level 1 (half the compilation again, the
# same bits and run time); the incremental run keeps level 2, where it ran 9-70% faster
# (docs/benchmarks.md). {incremental: options}; :func:`run_program` picks the program.
RUN_OPTIONS = {False: _compile.LEVEL_1, True: _compile.FAST}


def programs_by_path(fn: Callable, **jit_kwargs) -> dict[bool, _compile.LightJit]:
  """``{incremental: light_jit(fn, RUN_OPTIONS[incremental])}``: a program that runs the GA
  compiled with the options of its evaluation path (pick one with :func:`uses_incremental`)."""
  return {inc: _compile.light_jit(fn, options, **jit_kwargs)
          for inc, options in RUN_OPTIONS.items()}


_RUN_JIT = programs_by_path(_run, static_argnums=(0, 1, 2, 3, 4))


def uses_incremental(config: GAConfig, fitness_fn: FitnessFn, num_units: int,
                     mesh: Mesh | None, data: PyTree) -> bool:
  """Whether one run of :func:`run` on ``data`` scores children incrementally.

  ``data`` may be abstract (``jax.ShapeDtypeStruct`` leaves): only the shapes that
  ``fitness_fn.incremental_data(data)`` returns are read, so that method must only pick arrays
  out of ``data`` (as the built-in fitness does), not compute.
  """
  return _incremental_plan(config, fitness_fn, num_units, mesh, data) is not None


def run_program(config: GAConfig, fitness_fn: FitnessFn, num_units: int, mesh: Mesh | None,
                data: PyTree) -> _compile.LightJit:
  """The jitted :func:`_run` that :func:`run` calls for these settings (see ``_RUN_JIT``)."""
  return _RUN_JIT[uses_incremental(config, fitness_fn, num_units, mesh, data)]


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
    progress: print progress lines on stderr (:class:`GAProgress`, fed by a
      ``jax.debug.callback``); each run has its own display. The display only lives during
      this call: under ``jit`` nothing is shown (a warning is logged once, with absl), so
      turn it off there; under a plain ``vmap`` it is shown.
    mesh: shard the population over this mesh's devices (all its axes); by default a mesh
      over all devices when there are several. ``fitness_fn`` still sees the ``P`` rows as
      they are (split unevenly where ``P`` does not divide by the device count), unless it
      sets ``per_individual = True`` (scores each row on its own: then padded with all-False
      rows whose scores are dropped, see :func:`scores_rows_independently`).
    shard: False to never shard.

  Returns:
    The final :class:`GAState` and the :class:`GAHistory`.
  """
  check_config(config)
  check_params(hyper)
  validate.check_key(key, single="ga.run")
  try:
    hash(fitness_fn)
  except TypeError:
    raise TypeError(f"fitness_fn must be hashable (the compiled run is cached by it), got an "
                    f"unhashable {type(fitness_fn).__name__}: use a module-level function, a "
                    "frozen dataclass (@dataclasses.dataclass(frozen=True)) or an object that "
                    "defines __hash__ and __eq__.") from None
  check_data = getattr(fitness_fn, "check_data", None)
  if check_data is not None:   # the built-in fitness: its data and the chromosome's length
    check_data(data, int(num_units))
  mesh = resolve_mesh(mesh, shard)
  if mesh is not None and mesh.size > 1:
    data = jax.device_put(data, NamedSharding(mesh, PS()))
  display = GAProgress(config.generations) if progress else None
  with _DISPLAYS.open(display) as token:
    out = run_program(config, fitness_fn, int(num_units), mesh, data)(
        config, fitness_fn, int(num_units), bool(progress), mesh, hyper, data, key, token)
    if progress:
      jax.effects_barrier()  # every report has been printed before we return
  if display is not None:
    warn_if_not_shown(display)
  return out
