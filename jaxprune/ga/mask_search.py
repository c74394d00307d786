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
run. For a fitness that scores each individual on its own (the built-in ones, a
``(params, mask)`` function), a population that does not divide by the device count is padded
with all-False chromosomes for evaluation only (their scores are discarded), so any size works;
a ``ga.run`` fitness of the whole population gets its ``P`` rows, split unevenly.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as PS

from jaxprune import units as units_lib
from jaxprune import validate
from jaxprune.ga.strategy import GAConfig, GAHyperparams, GAResult, check_params
from jaxprune.ga.strategy import check_config, check_penalty, unusable_hyper
from jaxprune.ga.loop import _DISPLAYS, GAProgress, _run, resolve_mesh, warn_if_not_shown
from jaxprune.ga.loop import programs_by_path, uses_incremental
from jaxprune.ga.fitness import AccuracyFitness
from jaxprune.ga.fitness import UserFitness
from jaxprune.ga.fitness import _groups_of
from jaxprune.ga.fitness import _labels
from jaxprune.ga.fitness import host_sample_weight
from jaxprune.ga.fitness import nonfinite_activations_message
from jaxprune.ga.fitness import nonfinite_rows
from jaxprune.ga.fitness import nonzero_weights
from jaxprune.ga.fitness import weights_unusable
from jaxprune.ga.fitness import make_fitness

PyTree = Any
FitnessFn = Callable[[jax.Array, PyTree, "GAHyperparams"], jax.Array]


def search(model, params: PyTree, x: jax.Array | None, y: jax.Array | None, group: str, *,
           key: jax.Array, fitness: str | Callable = "eq5", config: GAConfig = GAConfig(),
           hyper: GAHyperparams = GAHyperparams(), fast_path: bool | str = "auto", progress: bool = True,
           mesh: Mesh | None = None, shard: bool = True,
           incremental: bool | str = "auto", sample_weight=None) -> GAResult:
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
    progress: show a progress bar on stderr (not under ``jit``, see :func:`run`).
    mesh, shard: see :func:`run`.
    incremental: on the fast path, score children from their parents' logits
      (:mod:`jaxprune.ga.incremental`, one device): ``'auto'`` on CPU, from
      ``incremental.MIN_UNITS`` units on, for long runs (elsewhere the full evaluation, see
      :func:`jaxprune.ga.incremental.applies`), True always (except for logits below 32 bits,
      bfloat16 or float16 params and inputs, which are evaluated in full:
      :func:`jaxprune.ga.incremental.exact_dtype`), False forces the full evaluation.
    sample_weight: optional (N,) weights >= 0 of the training patterns for the built-in
      fitness: the accuracy (in the fitness and in the result) is the weighted mean
      ``sum(w * correct) / sum(w)``. A pattern of weight 0 does not exist, so data padded
      with weight-0 rows (whatever their labels) give the same search as the unpadded data.
      The weights are first scaled by a power of two (exactly), so their scale does not
      matter (:func:`jaxprune.ga.fitness.scale_weights`).
      None: every pattern counts once.

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
  if isinstance(x, list) and not any(hasattr(e, "shape") for e in x):
    x = np.asarray(x)   # one input written as nested lists of numbers
  if isinstance(x, (tuple, list, dict)):
    raise ValueError("ga.search takes one input array x (the built-in fitness runs "
                     "model.apply(params, x)); for a model with several inputs pass a fitness "
                     "function (params, mask) -> scalar that closes over them, and x=None.")
  if isinstance(y, (list, tuple)):  # labels as a Python list, as fit and evaluate take them
    y = np.asarray(y)
  check_config(config)
  check_params(hyper)   # (its types, before anything compiles; again with the data below)
  fit = make_fitness(model, group, fitness, fast_path, incremental)
  if not isinstance(fit, UserFitness):   # (a fitness function may take any pytree as params)
    # A traced target runs params of other sizes; the chromosome has the group's size.
    units_lib.check_group(params, _groups_of(model)[group], fix=(
        f"These params do not fit {type(model).__name__}'s group {group!r}: pass the params "
        "the model was built or traced with, or trace it again with these params."))
  if sample_weight is not None:
    if isinstance(fit, UserFitness):
      raise ValueError("sample_weight weights the built-in fitness ('eq5', 'eq6', 'accuracy'); "
                       "a fitness function (params, mask) -> scalar sees no data: weight the "
                       "patterns inside it instead.")
    if x is None:
      raise ValueError("sample_weight weights the training patterns; pass x and y too.")
    # (scaled by a power of two, so that weights of any scale the check accepts work)
    sample_weight = host_sample_weight(sample_weight, jnp.shape(x)[0])
    fit = dataclasses.replace(fit, weighted=True)
  if x is None:
    validate.check_params(params)
  else:  # the one shared data check (labels of weight-0 rows are padding: not checked)
    validate.check_model_data(model, params, x, y, sample_weight=sample_weight)
  num_units = _groups_of(model)[group].size
  data = params   # the GA's data (abstract for the built-in fitness), for the program's choice
  if isinstance(fit, UserFitness):
    mask = jnp.ones((num_units,), bool)
    out = jax.eval_shape(lambda p, m: fit.fn(p, m), params, mask)
    _check_user_score(out)
  else:
    if x is None or y is None:
      raise ValueError(f"fitness={fitness!r} needs training inputs x and labels y.")
    data = jax.eval_shape(lambda p, a, b, w: fit.prepare(p, a, b, sample_weight=w), params, x,
                          y, sample_weight)   # the input checks, before compiling
  check_params(hyper)
  if not isinstance(fit, UserFitness):
    check_penalty(hyper)
  validate.check_key(key, single="ga.search")
  mesh = resolve_mesh(mesh, shard)
  if mesh is not None and mesh.size > 1:
    params = jax.device_put(params, NamedSharding(mesh, PS()))
  # the best mask's accuracy, also under a user fitness when x and y are given
  scorer = (AccuracyFitness(model, group, None, False)
            if x is not None and y is not None
            and getattr(model, "task", "") == "classification" else None)
  display = GAProgress(config.generations, f"GA {group}") if progress else None
  with _DISPLAYS.open(display) as token:
    program = _SEARCH_JIT[uses_incremental(config, fit, num_units, mesh, data)]
    result, acts_bad = program(config, fit, num_units, bool(progress), mesh, scorer, hyper,
                               params, x, y, key, token, sample_weight)
    if progress:
      jax.effects_barrier()  # every report has been printed before we return
  if display is not None:
    warn_if_not_shown(display)
  if validate.is_concrete(acts_bad) and bool(acts_bad):
    raise ValueError(nonfinite_activations_message(group))
  return result


def _check_user_score(out) -> None:
  """Raises ValueError unless ``out`` (the abstract value of a fitness function's result for
  one mask) is one real number: a scalar of a float, integer or bool dtype."""
  if not hasattr(out, "shape") or not hasattr(out, "dtype"):
    what = ("None" if out is None else
            f"a {type(out).__name__} of {len(out)} values" if isinstance(out, (tuple, list))
            else f"a {type(out).__name__}")
    raise ValueError(f"The fitness function must return one number (a scalar array) for one "
                     f"mask; it returned {what}. Return the score alone, e.g. "
                     "jnp.mean(correct) - lam * mask.sum().")
  if tuple(out.shape) != ():
    raise ValueError(f"The fitness function must return a scalar for one mask; it returned "
                     f"shape {tuple(out.shape)}. Reduce it to one number per mask (the GA "
                     "vmaps the function over the population itself).")
  if not (jnp.issubdtype(out.dtype, jnp.floating) or jnp.issubdtype(out.dtype, jnp.integer)
          or out.dtype == jnp.bool_):
    raise ValueError(f"The fitness function must return a real number for one mask; it "
                     f"returned dtype {out.dtype}. Return a float score (for a complex value, "
                     "say which part counts: jnp.real(z) or jnp.abs(z)).")
  if jnp.issubdtype(out.dtype, jnp.floating) and jnp.dtype(out.dtype).itemsize > 4:
    # (not a 64-bit integer: x64 makes a mask's count int64, and counts fit float32 exactly)
    warnings.warn(f"The fitness function returns {out.dtype}; the GA keeps every score as "
                  "float32, so scores that differ by less than float32 resolves at their size "
                  "tie (e.g. 1 + 1e-12 * kept, or integers above 2**24). Return a score whose "
                  "differences float32 holds (subtract a large constant first), then cast it: "
                  "jnp.float32(score).", UserWarning, stacklevel=3)


def _search_program(config: GAConfig, fit, num_units: int, progress: bool, mesh: Mesh | None,
                    scorer: AccuracyFitness | None, hyper: GAHyperparams, params: PyTree, x, y,
                    key: jax.Array, token: jax.Array, sample_weight=None):
  """The whole of :func:`search` as one program: the fast path's activations, the GA's scan
  and the best mask's accuracy (one XLA compilation for a first call)."""
  data = (params if isinstance(fit, UserFitness)
          else fit.prepare(params, x, y, sample_weight=sample_weight))
  if mesh is not None and mesh.size > 1:
    data = jax.tree.map(lambda a: lax.with_sharding_constraint(a, NamedSharding(mesh, PS())),
                        data)
  user = isinstance(fit, UserFitness)
  # Non-finite activations of the group (finite inputs and params, a unit that overflows):
  # a removed unit's inf * 0 is NaN in every logit, and every individual scores alike.
  acts_bad = jnp.zeros((), bool)
  if not user:
    acts_bad = _nonfinite_activations(fit, data, params, x, sample_weight)
  state, history = _run(config, fit, num_units, progress, mesh, hyper, data, key, token)
  if scorer is not None:  # a fraction, like evaluate() (the fitness works in percent)
    accuracy = scorer.accuracy(
        state.hof[0][None], {"params": params, "x": x, "y": _labels(y, sample_weight),
                             "sample_weight": sample_weight}, scale=1.0)[0]
  else:
    accuracy = jnp.asarray(jnp.nan, jnp.float32)
  best = state.hof[0]
  invalid = unusable_hyper(hyper, penalty=not user) | acts_bad
  if not user:
    invalid = invalid | _unusable(fit.model, params, x, y, sample_weight)
  elif scorer is not None:   # a user fitness's run reports the accuracy on x: checked as well
    invalid = invalid | _unusable(scorer.model, params, x, y, sample_weight)
  nan = jnp.asarray(jnp.nan, jnp.float32)
  return GAResult(mask=best, fitness=jnp.where(invalid, nan, state.hof_fitness[0]),
                  accuracy=jnp.where(invalid, nan, accuracy),
                  kept=jnp.sum(best, dtype=jnp.int32), history=history, state=state,
                  invalid=invalid), acts_bad


def _nonfinite_activations(fit, data, params: PyTree, x, sample_weight) -> jax.Array:
  """() bool: the group's activations hold NaN or inf on a pattern that counts. With the
  patterns first (the fast path's ``H``, a top-level group), rows of weight 0 do not count; a
  group inside a scan has its activations stacked over the steps first, so there any
  non-finite value counts, unless some pattern has weight 0 (then it cannot be told apart from
  padding, and nothing is flagged). False where a traced group has no activations to take
  (one looked up in a table)."""
  if fit.fast:
    return nonfinite_rows(data["h"], sample_weight)
  try:
    h = fit.model.activations(params, x, fit.group)
  except (ValueError, TypeError):
    return jnp.zeros((), bool)
  site = getattr(fit.model, "_site", None)
  if (site is None or site(fit.group).scope == ()) and h.shape[:1] == jnp.shape(x)[:1]:
    return nonfinite_rows(h, sample_weight)
  bad = ~jnp.all(jnp.isfinite(h))
  if sample_weight is not None:
    bad = bad & jnp.all(nonzero_weights(jnp.asarray(sample_weight)))
  return bad


def _unusable(model, params: PyTree, x, y, sample_weight=None) -> jax.Array:
  """() bool, inside the program: what :func:`validate.check_model_data` refuses outside jit
  (NaN or infinite inputs or params, labels outside the classes or one-hot rows that are not
  one-hot, of weight > 0 rows; sample weights that are negative or not finite, or sum to 0)."""
  floats = [a for a in jax.tree.leaves((params, x)) if jnp.issubdtype(a.dtype, jnp.floating)]
  bad = jnp.zeros((), bool)
  for a in floats:
    bad = bad | ~jnp.all(jnp.isfinite(a))
  labels = _labels(y, sample_weight)
  out = (labels < 0) | (labels >= validate.num_outputs(model, params, x))
  if jnp.ndim(y) == 2:
    out = out | ~validate.one_hot_rows(jnp.asarray(y))
  if sample_weight is not None:
    w = jnp.asarray(sample_weight)
    out = out & nonzero_weights(w)   # padding rows (weight 0) are not checked
    bad = bad | weights_unusable(w)
  return bad | jnp.any(out)


# {incremental: program}, compiled with ga.loop's options for the GA's programs (see there).
_SEARCH_JIT = programs_by_path(_search_program, static_argnums=(0, 1, 2, 3, 4, 5))
