"""Incremental fitness for the GA's fast path: children are scored from their parents' logits.

On the fast path (a group read only by the output layer) an individual's output logits are a
sum over its kept units, ``z = sum_{u kept} H[:, u] W[u, :]`` (plus the bias). Every
individual carries its ``z`` (shape (O, N)), and each generation every child is scored by the
cheapest exact route its lineage allows. Children come in pairs: one-point crossover of parents
``a`` and ``b`` at cut ``c`` makes ``a[:c] ++ b[c:]`` and ``b[:c] ++ a[c:]``, and the two
children's logits sum to the parents' (``z0 + z1 = z_a + z_b``). So one product serves the pair:

* ``c`` at or past the middle (the tail ``c..U-1`` is the shorter side):
  ``d = sum_{u >= c} (b_u - a_u) H[:, u] W[u, :]``, ``z0 = z_a + d``, ``z1 = z_b - d``;
* ``c`` before the middle (the head ``0..c-1`` is shorter):
  ``e = sum_{u < c} (a_u - b_u) H[:, u] W[u, :]``, ``z0 = z_b + e``, ``z1 = z_a - e``.

``d`` and ``e`` are products over one half of the units (the tail lies in the second half, the
head in the first), with ``-1 / 0 / +1`` weights that are nonzero only where the parents differ,
so a crossed pair costs a quarter of the two children's full evaluation. Further:

* a child whose bits equal an individual of the previous generation (a copy of its parent, or,
  in a converged population, most children: :func:`copies`) takes that individual's logits, and
  a pair whose children are all copies or mutated gets no delta;
* a mutated child is evaluated in full, from its bits: at the published rates a mutation flips
  about one bit in ten, spread over all units, so a delta would cost as much as the product;
  recomputing also resets the rounding of its lineage (below);
* hall-of-fame members are not re-scored: their fitness is the one recorded when they entered
  the hall of fame (fitness is deterministic), and their logits travel with them.

Every shape is static and the choice is made inside the compiled program: ``delta_slots``
pairs per half get their delta computed (more: their children are evaluated in full), and the
full evaluations go ``full_slots`` children in one batch, then any left over in a
``lax.while_loop`` that runs zero times when none is, so the work per generation is a fixed
budget plus the rare overflow. Each budget comes in a few sizes (``delta_sizes``,
``full_sizes``, each a compiled program of its own, chosen by a ``lax.switch``): a generation
takes the smallest that holds its pairs and its children to evaluate in full, so it computes
about what it needs, and a converged population needs few deltas. Under ``vmap`` the choice
is made once for all runs (:func:`switch_max`: the size the largest run needs), not by a
``select`` that would run every size. At population 100 and H=1000 a generation costs about
half of the full evaluation's floating-point work at first, and about a quarter once the
population has converged (see docs/benchmarks.md for what that buys on each machine).

Exactness. The accuracies equal the full evaluation's except where float summation order can
flip an argmax. A child's logits are its parent's logits plus a delta, which were themselves
a product or a parent's logits plus a delta; the full evaluation sums the same terms in one
product. The two differ by a few units in the last place of the logits (more along a long
line of unmutated descent; every mutation starts a fresh product), so they can disagree only
on a pattern whose two largest logits are that close (a near tie); that pattern's prediction
then flips, the accuracy moves by ``1 / N`` and the two runs part ways. Exact ties are kept
exact where they are common: each individual also carries, per pattern, the count of its kept
units whose activation is nonzero (an integer, exact under any order), and where that count is
0 its logits are exactly 0, as in the full product (a ReLU group's child whose kept units are
all off on a pattern; a child with no unit left). Without it, a delta's rounding remainders
decided those patterns' argmax against a zero bias: at U=11, 1,194 of 2,440 accuracies of a
fresh ReLU network differed from the full evaluation. (For units that are not ReLU the count
carried is the number of kept units, recounted from the bits when some activation is exactly
0, see :func:`arrays`.)
``tests/test_ga_incremental.py`` compares every individual of many random generations with
the full evaluation (no disagreement in its cases; they run at 'highest' matmul precision: on
an H200 GPU at the default, TF32 operands, 2 of 1,240 accuracies of two small ReLU and clip
cases differed, see docs/ga.md), and ``benchmarks/ga.py`` reports the count at H=1000.
``incremental=False`` (on :func:`jaxprune.ga.search` or :func:`jaxprune.ga.make_fitness`)
forces the full evaluation; ``'auto'`` (the default) chooses as :func:`applies` says.

Scope: one device (with several devices the population is sharded and evaluated in full), a
fitness object that exposes ``incremental_data(data) -> (h, w, b, y[, sample_weight])`` and
``from_accuracy(accuracy, population, data, hyper)`` (:class:`jaxprune.ga.AccuracyFitness` on
the fast path does), logits that fit :data:`MEMORY_LIMIT` bytes, and logits of at least 32
bits (:func:`exact_dtype`; otherwise, with ``incremental=True`` too, the full evaluation).
With bfloat16 or float16 activations and output kernel the full product rounds each logit
once, in that dtype, while ``z_parent + delta`` rounds again at every step of a line of
descent, by far more than float32's last place (8 bits of mantissa for bfloat16): measured
at H=120 with bfloat16 params, 18 of 480 fitness values differed from the full evaluation's
and runs returned other masks, one a fitness that did not match its own accuracy.

Example (incremental and full evaluation agree on every generation here):

  >>> import jax, jaxprune
  >>> from jaxprune import ga
  >>> model = jaxprune.MLP(in_features=6, hidden=(40,), out_features=3)
  >>> params = model.init(jax.random.key(0))
  >>> x = jax.random.normal(jax.random.key(1), (64, 6))
  >>> y = jax.random.randint(jax.random.key(2), (64,), 0, 3)
  >>> cfg = ga.GAConfig(population_size=20, generations=5)
  >>> a = ga.search(model, params, x, y, 'hidden_0', key=jax.random.key(3), config=cfg,
  ...               progress=False, incremental=True)
  >>> b = ga.search(model, params, x, y, 'hidden_0', key=jax.random.key(3), config=cfg,
  ...               progress=False, incremental=False)
  >>> bool((a.mask == b.mask).all()), float(a.fitness) == float(b.fitness)
  (True, True)
"""

from __future__ import annotations

import functools
import importlib
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import custom_batching
from jax import lax

from jaxprune.ga import fitness as fitness_lib
from jaxprune.ga import operators as ops
from jaxprune.ga import strategy

PyTree = Any

#: Largest size in bytes of the population's logits and live-unit counts (float32,
#: (P, O + 1, N)); with more, the full evaluation.
MEMORY_LIMIT = 1 << 30


class Plan(NamedTuple):
  """Static sizes of the incremental evaluation.

  Attributes:
    split: the first unit of the second half (``U // 2``): a crossed pair's delta is a product
      over units ``0 .. split-1`` (cut before ``split``) or ``split .. U-1``.
    delta_slots: pairs per half whose delta is computed per generation (sized for the
      published rates, crossover 0.8 and mutation 0.2, plus one standard deviation; pairs
      beyond it have their children evaluated in full).
    full_slots: children evaluated in full in one batch (sized for the mutated children at the
      published mutation rate plus one standard deviation); any left over are evaluated in a
      ``while_loop``, a sixth as many at a time.
    delta_sizes: smaller numbers of delta slots per half (ascending), each taken by a
      generation whose pairs all fit in it (a ``lax.switch`` over the sizes): the pairs that
      need a delta vary from generation to generation, and once the population converges most
      children copy an individual (:func:`copies`) and few pairs need one. (): one size only.
    full_sizes: smaller full-evaluation batches (ascending), likewise chosen per generation
      by the number of children to evaluate in full.
  """

  split: int
  delta_slots: int
  full_slots: int
  delta_sizes: tuple[int, ...] = ()
  full_sizes: tuple[int, ...] = ()


#: ``plan`` gives a run this many delta budgets and this many full-evaluation batch sizes
#: (the largest included) when one full-evaluation batch costs at least
#: :data:`LEVELS_MIN_FLOPS`: each generation then computes about what it needs (H=1000,
#: population 100: 13% less run time on the median key than two delta budgets and one batch
#: size, for about 1 s more compilation); below that, two delta budgets (when there are at
#: least 8 slots) and one batch size, as each size is a compiled program of its own.
BUDGET_LEVELS = 5
LEVELS_MIN_FLOPS = 5e7


def _sizes(low: int, high: int, levels: int) -> tuple[int, ...]:
  """Up to ``levels`` sizes from ``low`` to ``high`` (included), evenly spaced, without the
  last (the plan's budget itself)."""
  low = max(1, min(low, high))
  steps = [round(low + (high - low) * k / (levels - 1)) for k in range(levels)]
  return tuple(sorted(set(steps) - {high}))


def plan(num_units: int, population_size: int, hof_size: int, num_patterns: int,
         num_outputs: int, *, memory_limit: int = MEMORY_LIMIT) -> Plan | None:
  """The static sizes for a run, or None when the logits would not fit or nothing can pay off.

  Sized for the published rates (crossover 0.8, mutation 0.2): a pair needs a delta on a given
  half with probability ``0.8 * (1 - 0.2**2) / 2``, and a child a full evaluation with
  probability 0.2. Other rates still give exact results (overflow goes to the full
  evaluation), only a different cost.
  """
  n = population_size - hof_size
  if num_units < 2 or n < 2:
    return None
  if 4 * population_size * num_patterns * (num_outputs + 1) > memory_limit:
    return None
  half = n // 2
  p = 0.8 * (1 - 0.2 ** 2) / 2
  mean = half * p
  delta = int(math.ceil(mean + 1 * math.sqrt(mean * (1 - p)) + 1))
  mean = 0.2 * n
  full = int(math.ceil(mean + math.sqrt(mean * 0.8) + 1))
  delta, full = min(half, delta), min(n, full)
  sparse = -(-delta // 8) if delta >= 8 else 0
  if 2.0 * full * num_units * num_patterns * (num_outputs + 1) >= LEVELS_MIN_FLOPS:
    return Plan(split=num_units // 2, delta_slots=delta, full_slots=full,
                delta_sizes=_sizes(max(sparse, 1), delta, BUDGET_LEVELS),
                full_sizes=_sizes(-(-full // 4), full, BUDGET_LEVELS))
  return Plan(split=num_units // 2, delta_slots=delta, full_slots=full,
              delta_sizes=(sparse,) if sparse else ())


#: ``incremental='auto'`` uses the incremental evaluation (on CPU) from this many units on.
MIN_UNITS = 256


#: On CPU, ``incremental='auto'`` also needs a run whose full evaluation would cost at least
#: this many floating-point operations (``2 (G + 1) P U N O``): the incremental program
#: compiles 3-5 s longer there (several budget sizes, see :func:`plan`; the full program
#: compiles at LLVM level 1 in about 1 s) and saves about 60% of the evaluation's time
#: (measured at 150-180 GFLOP/s: break-even near 1e12; about twice that, so that 'auto'
#: switches only where the gain is clear).
CPU_MIN_WORK = 2e12


def applies(fitness_fn, mesh, num_units: int, work: float | None = None) -> bool:
  """True when ``fitness_fn`` asks for, and supports, incremental evaluation on this mesh.

  ``fitness_fn.incremental`` is True (always), False (never) or ``'auto'``: on CPU only, from
  :data:`MIN_UNITS` units on, for runs whose full evaluation would cost at least
  :data:`CPU_MIN_WORK` operations (``work``: ``2 * (generations + 1) * population * units *
  patterns * outputs``; None: unknown, full evaluation). There the incremental run is faster
  (2.2x over 50 generations at H=1000, population 100, see docs/benchmarks.md) but compiles
  3-5 s longer, which a shorter run does not win back; pass True to opt in (for example
  with the persistent compilation cache warm). On other backends 'auto' is the full
  evaluation: on an H200 at H=1000 it was about 3x faster over the published run (0.005
  against 0.014-0.016 s) and as fast or faster per generation at populations 100 to 100,000
  (docs/benchmarks.md).
  """
  if mesh is not None and mesh.size > 1:
    return False
  if not (bool(getattr(fitness_fn, "fast", True)) and hasattr(fitness_fn, "incremental_data")
          and hasattr(fitness_fn, "from_accuracy")):
    return False
  mode = getattr(fitness_fn, "incremental", False)
  if mode == "auto":
    return (jax.default_backend() == "cpu" and num_units >= MIN_UNITS and work is not None
            and work >= CPU_MIN_WORK)
  return mode is True


def exact_dtype(h, w) -> bool:
  """True when the fast path's logits, ``h @ W_all`` from activations ``h`` and the output
  kernel ``w`` (arrays or ``jax.ShapeDtypeStruct``), are floats of at least 32 bits: the
  incremental evaluation reproduces the full one only there. Below (bfloat16, float16 params
  and inputs) every ``z_parent + delta`` rounds to 8 or 11 bits again, so the run takes the
  full evaluation instead, whatever ``incremental`` says."""
  dtype = jnp.result_type(h.dtype, w.dtype)
  return bool(jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits >= 32)


# ----------------------------------------------------------------------------- algebra


class _Arrays(NamedTuple):
  """The fast path's arrays, laid out for the products (see :func:`arrays`)."""

  ht: jax.Array    # (U, N) activations, one row per unit
  w: jax.Array     # (U, O) output kernel
  b: jax.Array     # (O,) output bias, or (N, O) where it varies per pattern
  y: jax.Array     # (N,) labels
  live: jax.Array  # (U, N) 1.0 where the activation is nonzero, else 0.0
  any_off: bool    # ReLU units: zeros are common, each product also counts the live units
  zeros: jax.Array | bool  # otherwise: some activation is exactly 0 (read from the data)


def arrays(h: jax.Array, w: jax.Array, b: jax.Array, y: jax.Array,
           activation: str | None = None) -> _Arrays:
  """The fast path's arrays from (N, U) activations ``h``, the (U, O) output kernel ``w``,
  the (O,) bias ``b`` ((N, O) where it varies per pattern) and the (N,) labels ``y``.
  ``activation`` (the units' nonlinearity, if known): ``'relu'`` units are often exactly 0,
  so every product also counts the live units (carried along the deltas); for any other the
  count carried is the number of kept units, and in a run whose activations hold an exact 0
  anywhere (``tanh(0)``, a sigmoid below about -104 in float32, a linear unit) each
  generation counts them from the bits instead (:func:`live_counts`)."""
  ht = h.reshape(h.shape[0], -1).T
  relu = activation == "relu"
  return _Arrays(ht, w, b, y, (ht != 0).astype(ht.dtype), relu,
                 False if relu else jnp.any(ht == 0))


def live_counts(arr: _Arrays, population: jax.Array, z: jax.Array) -> jax.Array:
  """(Q, N) each individual's count of live units per pattern: the count carried in row O of
  its logits ``z``, or, for units that are not ReLU when some activation is exactly 0, the
  count from its bits (one product per generation, 1/O the size of a full evaluation; under
  ``vmap`` for every run when any run has such a zero)."""
  count = z[:, -1]
  if arr.any_off or arr.zeros is False:
    return count
  return switch_max(jnp.asarray(arr.zeros, jnp.int32),
                    [lambda c, p, live: c, lambda c, p, live: p.astype(live.dtype) @ live],
                    count, population, arr.live)


def _product(weights: jax.Array, w: jax.Array, ht: jax.Array, live: jax.Array,
             any_off: bool = True) -> jax.Array:
  """(Q, O + 1, N): the logits ``sum_u weights[q, u] W[u, :] H[:, u]`` for (Q, V) weights, and
  in row O the signed count of live units ``sum_u weights[q, u] [H[:, u] != 0]``.

  The logits are one 2-D product, ``W_all.T @ H.T`` with ``W_all[:, q*O:(q+1)*O] =
  weights[q][:, None] * W`` (XLA:CPU runs batched products of small matrices far below its
  GEMM rate), transposed so that the result needs no transpose. The counts are integers, exact
  in float32 (below 2**24 units) under any summation order, so they add up exactly along a
  line of deltas: a pattern where a child has no live unit gets exactly the full evaluation's
  logits there, zero (see :func:`accuracy_from_logits`). With ``any_off`` False (units that
  are not ReLU) the count is the signed number of units, no product (see :func:`arrays`).
  """
  q, o = weights.shape[0], w.shape[-1]
  wm = weights.astype(w.dtype)[:, :, None] * w[None, :, :]                 # (Q, V, O)
  lhs = jnp.transpose(wm, (0, 2, 1)).reshape(q * o, -1)                   # (Q*O, V)
  wf = weights.astype(live.dtype)
  count = (wf @ live if any_off else                                      # (Q, N)
           jnp.broadcast_to(jnp.sum(wf, axis=1)[:, None], (q, live.shape[1])))
  return jnp.concatenate([(lhs @ ht).reshape(q, o, -1), count[:, None, :]], axis=1)


def full_logits(arr: _Arrays, population: jax.Array) -> jax.Array:
  """(Q, O + 1, N) logits (without the bias) of each individual, from its bits, and the count
  of its live units per pattern (:func:`_product`)."""
  return _product(population, arr.w, arr.ht, arr.live, arr.any_off)


def accuracy_from_logits(b: jax.Array, y: jax.Array, z: jax.Array,
                         live: jax.Array | None = None,
                         sample_weight: jax.Array | None = None) -> jax.Array:
  """(Q,) accuracy in percent from (Q, O, N) logits ``z`` (without the bias ``b``: (O,), or
  (N, O) where it varies per pattern); with ``sample_weight`` (N,), the weighted accuracy,
  summed as the full evaluation sums it.

  ``live`` (Q, N): the count of each individual's live units per pattern; where it is 0 the
  logits are taken as exactly 0, as the full product computes them (a sum of exact zeros),
  whatever rounding remainders the deltas left. Those remainders decide an argmax when the
  bias has ties (a fresh network's zero bias, a readout without bias): with ReLU units, a
  pattern on which every kept unit is off is common in small groups.
  """
  if live is not None:
    z = jnp.where((live == 0)[:, None, :], jnp.zeros((), z.dtype), z)
  # b: (O,) the same for every pattern, or (N, O) (see fitness.readout_bias)
  logits = z + (b[None, :, None] if b.ndim == 1 else b.T[None])            # (Q, O, N)
  # argmax over the (middle) output axis as an unrolled compare, which XLA:CPU fuses (its
  # argmax reduction over a middle axis is ~100x slower here). Same semantics as jnp.argmax:
  # the first maximum wins, and the first NaN wins over any number.
  best, arg = logits[:, 0], jnp.zeros(logits[:, 0].shape, jnp.int32)
  for o in range(1, logits.shape[1]):
    v = logits[:, o]
    better = jnp.logical_or(v > best, jnp.logical_and(jnp.isnan(v), jnp.logical_not(
        jnp.isnan(best))))
    best, arg = jnp.where(better, v, best), jnp.where(better, o, arg)
  correct = arg == y[None, :]
  if sample_weight is not None:   # the full evaluation's (N, Q) layout and reduction
    return fitness_lib.weighted_percent(correct.T, sample_weight)
  return 100.0 * jnp.mean(correct.astype(jnp.float32), axis=1)


# ----------------------------------------------------------------------------- children


class _Lineage(NamedTuple):
  children: jax.Array   # (n, U) bool, after crossover and mutation (equal to search.breed's)
  first: jax.Array      # (n,) parent index giving the blocks up to the cut
  second: jax.Array     # (n,) parent index giving the blocks after the cut
  cut: jax.Array        # (n,) cut point (first unit taken from the second parent)
  crossed: jax.Array    # (n,) bool, crossover happened
  mutated: jax.Array    # (n,) bool, mutation flipped at least one bit


def breed_with_lineage(config, state, hyper, *, key: jax.Array) -> _Lineage:
  """The children of :func:`jaxprune.ga.breed` (same draws) and where their bits came from."""
  n, u = config.population_size - config.hof_size, state.population.shape[1]
  half = n // 2
  idx, u_cx, u_mut = strategy.select_parents(config, state, key=key)
  crossed = ops.crossover_pairs_from(u_cx, state.population[idx], hyper.crossover_prob)
  children = ops.mutate_from(u_mut.reshape(n, 1 + u), crossed, hyper.mutation_prob,
                             hyper.bit_flip_prob)
  do = jnp.logical_and(u_cx[:, 0] < hyper.crossover_prob, u > 1)
  cut = 1 + ops._index(u_cx[:, 1], max(u - 1, 1))  # pylint: disable=protected-access
  a, b = idx[0:2 * half:2], idx[1:2 * half:2]
  first = jnp.stack([a, b], 1).reshape(-1)
  second = jnp.stack([jnp.where(do, b, a), jnp.where(do, a, b)], 1).reshape(-1)
  cut, do = jnp.repeat(cut, 2), jnp.repeat(do, 2)
  if n % 2:
    first = jnp.concatenate([first, idx[-1:]])
    second = jnp.concatenate([second, idx[-1:]])
    cut = jnp.concatenate([cut, jnp.ones((1,), cut.dtype)])
    do = jnp.concatenate([do, jnp.zeros((1,), bool)])
  mutated = jnp.any(jnp.logical_xor(children, crossed), axis=1)
  return _Lineage(children, first, second, cut, do, mutated)


def copies(population: jax.Array, children: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(n,) whether each child's bits equal an individual of ``population``, and (n,) the row of
  one such individual (meaningful where True).

  Found by a 32-bit hash of the packed bits (one sort of the population, a binary search per
  child) and checked bit for bit, so a match is exact; a hash collision can only hide a copy
  (the child is then evaluated as any other). A converged population breeds many copies: at
  H=1000 with the published settings, 44-76% of the children from the tenth generation on.
  """
  words_p, words_c = ops.pack_bits(population), ops.pack_bits(children)
  hash_ = ops._hash_words  # pylint: disable=protected-access
  hash_p, hash_c = hash_(words_p)[0], hash_(words_c)[0]
  order = jnp.argsort(hash_p)
  pos = jnp.minimum(jnp.searchsorted(hash_p[order], hash_c), population.shape[0] - 1)
  row = order[pos]
  return jnp.all(words_p[row] == words_c, axis=1), row


def _pairs_needing_delta(lin: _Lineage, copied: jax.Array, split: int):
  """(half,) which pairs need a delta, and (half,) whether its side is the head."""
  half = lin.children.shape[0] // 2
  crossed, cut = lin.crossed[0:2 * half:2], lin.cut[0:2 * half:2]
  # A copy needs nothing computed; a pair needs its delta for a child that is neither a copy
  # nor mutated (a mutated child is evaluated in full).
  served = jnp.logical_or(lin.mutated, copied)[:2 * half].reshape(half, 2)
  return jnp.logical_and(crossed, jnp.logical_not(jnp.all(served, axis=1))), cut < split


def _operand(arr: _Arrays):
  """``arr`` as an operand of :func:`switch_max` (whose branches may not close over batched
  values), and the function that restores it: the static ``any_off`` stays out, and
  ``zeros`` (read only by :func:`live_counts`, outside the branches) is left behind."""
  return arr._replace(any_off=None, zeros=None), lambda a: a._replace(any_off=arr.any_off)


def _delta_table(slots: int, rows: int, split: int, restore, arr: _Arrays, need: jax.Array,
                 head: jax.Array, cut: jax.Array, bits_a: jax.Array, bits_b: jax.Array):
  """The deltas of the first ``slots`` pairs of each half that need one, laid out for a
  budget of ``rows``: ``(table, slot, overflow)`` with ``table`` (2 rows + 1, O + 1, N) (the
  head's deltas from row 0, the tail's from row ``rows``, zeros elsewhere and in the last row),
  ``slot`` (half,) each pair's row (2 rows: none), ``overflow`` (half,) the pairs left out."""
  arr = restore(arr)
  half, u = need.shape[0], bits_a.shape[1]
  parts, slot, overflow = [], jnp.full((half,), 2 * rows), jnp.zeros((half,), bool)
  for i, (side, lo, hi) in enumerate(((jnp.logical_and(need, head), 0, split),
                                      (jnp.logical_and(need, jnp.logical_not(head)), split, u))):
    members = jnp.nonzero(side, size=slots, fill_value=half)[0]
    safe = jnp.minimum(members, half - 1)
    units = jnp.arange(lo, hi)
    c = cut[safe][:, None]
    diff = (bits_a[safe, lo:hi].astype(jnp.int8) - bits_b[safe, lo:hi].astype(jnp.int8))
    # Head: e from (a - b) on units < c; tail: d from (b - a) on units >= c.
    weights = (jnp.where(units[None, :] < c, diff, 0) if lo == 0 else
               jnp.where(units[None, :] >= c, -diff, 0))
    part = _product(weights, arr.w[lo:hi], arr.ht[lo:hi], arr.live[lo:hi], arr.any_off)
    parts.append(jnp.pad(part, ((0, rows - slots), (0, 0), (0, 0))))
    slot = slot.at[members].set(i * rows + jnp.arange(slots), mode="drop")
    overflow = jnp.logical_or(overflow, jnp.logical_and(side, jnp.cumsum(side) > slots))
  parts.append(jnp.zeros((1,) + parts[0].shape[1:], parts[0].dtype))
  return jnp.concatenate(parts), slot, overflow                           # (2 rows + 1, O, N)


def child_logits(plan_: Plan, arr: _Arrays, population: jax.Array, z: jax.Array,
                 lin: _Lineage, hof_rows: jax.Array,
                 copy: tuple[jax.Array, jax.Array] | None = None
                 ) -> tuple[jax.Array, jax.Array]:
  """The next generation's (P, O, N) logits, and (n,) which children need a full evaluation.

  Args:
    plan_: the static sizes.
    arr: the fast path's arrays.
    population: (P, U) the parents' generation (``lin.first`` and ``lin.second`` index it).
    z: (P, O, N) its logits.
    lin: the n children and their lineage.
    hof_rows: (K,) the rows of ``z`` that hold the hall of fame, which follows the children.
    copy: :func:`copies` of the children in ``population``, if already found.

  A crossed pair whose children are not both mutated gets one delta product over the half
  that holds its shorter side (``delta_slots`` pairs per half; the rest are flagged); a
  mutated child is flagged, whatever its pair got. Flagged rows hold a parent's logits. A child
  whose bits equal an individual of ``population`` (:func:`copies`) takes that individual's
  logits: it is never flagged, and a pair of two such children gets no delta.
  """
  n = lin.children.shape[0]
  half, m = n // 2, plan_.split
  u = population.shape[1]
  pa, pb = lin.first[0:2 * half:2], lin.first[1:2 * half:2]     # the pair's parents a, b
  cut, crossed = lin.cut[0:2 * half:2], lin.crossed[0:2 * half:2]
  copied, source = copies(population, lin.children) if copy is None else copy
  need, head = _pairs_needing_delta(lin, copied, m)   # head: the shorter side is units < m
  # Bases: z0 = z_a + d and z1 = z_b - d (tail), z0 = z_b + e and z1 = z_a - e (head).
  swap = jnp.logical_and(crossed, head)
  base = jnp.stack([jnp.where(swap, pb, pa), jnp.where(swap, pa, pb)], 1).reshape(-1)
  base = jnp.where(copied, source, jnp.concatenate([base, lin.first[2 * half:]]))
  bits_a, bits_b = population[pa], population[pb]
  # The products, with the smallest delta budget that holds this generation's pairs (each
  # size a program of its own; the table keeps the largest budget's layout).
  sizes = plan_.delta_sizes + (plan_.delta_slots,)
  count = jnp.maximum(jnp.sum(need & head), jnp.sum(need & ~head))
  ops_arr, restore = _operand(arr)
  table, slot, overflow = switch_max(
      _fitting(sizes, count),
      [functools.partial(_delta_table, d, plan_.delta_slots, m, restore) for d in sizes],
      ops_arr, need, head, cut, bits_a, bits_b)
  # Each row's base logits plus its signed delta (zero for a row without one: a copy, the odd
  # child, a hall-of-fame member), both gathered rather than scattered (XLA:CPU runs a gather of
  # rows about twice as fast), in one pass over the (P, O, N) logits.
  r, zero = table.shape[0], 2 * plan_.delta_slots
  signed = jnp.stack([slot, r + slot], 1).reshape(-1)      # child 1 of a pair: -delta, row r + s
  signed = jnp.concatenate([signed, jnp.full((n - 2 * half,), zero, signed.dtype)])
  signed = jnp.concatenate([jnp.where(copied, zero, signed),
                            jnp.full(hof_rows.shape, zero, signed.dtype)])
  out = (z[jnp.concatenate([base, hof_rows])]
         + jnp.concatenate([table, -table])[signed])                           # (P, O, N)
  need_full = lin.mutated.at[:2 * half].set(jnp.logical_or(
      lin.mutated[:2 * half], jnp.repeat(overflow, 2)))
  return out, jnp.logical_and(need_full, jnp.logical_not(copied))


def _full_fallback(plan_: Plan, arr: _Arrays, out: jax.Array, children: jax.Array,
                   need_full: jax.Array) -> jax.Array:
  """Recomputes the flagged children (rows of ``out``) in full: the first ``full_slots`` of
  them, then the rest (a ``lax.while_loop`` that runs zero times unless more were flagged) in
  batches of a sixth of that. The small batches matter under ``vmap``: the loop then runs
  while any run has children left, and with many runs one of them nearly always has."""
  n, rows = children.shape[0], out.shape[0]

  def batch(need, size, arr, children):
    idx = jnp.nonzero(need, size=size, fill_value=rows)[0]     # unused slots: row P, dropped
    return idx, full_logits(arr, children[jnp.minimum(idx, n - 1)])

  def first(size, restore, arr, children, need):   # padded to the largest batch's layout
    idx, part = batch(need, size, restore(arr), children)
    pad = plan_.full_slots - size
    return (jnp.pad(idx, (0, pad), constant_values=rows),
            jnp.pad(part, ((0, pad), (0, 0), (0, 0))))

  # The first batch, of the smallest size that holds the flagged children (each size a program
  # of its own), is put in place by a gather (XLA:CPU gathers rows faster than it scatters).
  sizes = plan_.full_sizes + (plan_.full_slots,)
  ops_arr, restore = _operand(arr)
  idx, part = switch_max(_fitting(sizes, jnp.sum(need_full)),
                         [functools.partial(first, f, restore) for f in sizes], ops_arr, children,
                         need_full)
  slot = jnp.full((rows,), plan_.full_slots).at[idx].set(jnp.arange(plan_.full_slots),
                                                          mode="drop")
  part = jnp.concatenate([part, jnp.zeros((1,) + out.shape[1:], out.dtype)])[slot]
  out = jnp.where((slot < plan_.full_slots)[:, None, None], part, out)
  extra = max(1, -(-plan_.full_slots // 6))   # at least one: the loop always progresses

  def body(carry):
    out, need = carry
    idx, part = batch(need, extra, arr, children)
    return out.at[idx].set(part, mode="drop"), need.at[idx].set(False, mode="drop")

  need = need_full.at[idx].set(False, mode="drop")
  return lax.while_loop(lambda c: jnp.any(c[1]), body, (out, need))[0]


def _fitting(sizes: tuple[int, ...], count: jax.Array) -> jax.Array:
  """The index of the smallest of the ascending ``sizes`` that holds ``count``, else the last."""
  return jnp.minimum(jnp.sum(jnp.asarray(sizes) < count), len(sizes) - 1)


def switch_max(index: jax.Array, branches, *operands):
  """``lax.switch(index, branches, *operands)`` that stays one branch under ``vmap``.

  ``vmap`` turns a ``lax.switch`` whose index is batched into a ``select`` that runs every
  branch for every member. Here a batched index is reduced instead: the branch of the largest
  index runs (vmapped) for all members. So each branch must give an acceptable answer wherever
  a lower one would (here: exact evaluations with budgets that grow with the index). The
  branches may not close over batched values: pass them in ``operands``.
  """
  if len(branches) == 1:
    return branches[0](*operands)

  @custom_batching.custom_vmap
  def call(index, *ops):
    return lax.switch(index, branches, *ops)

  @call.def_vmap
  def _rule(axis_size, in_batched, index, *ops):
    axes = tuple(jax.tree.map(lambda batched: 0 if batched else None, in_batched[1:]))
    index = jnp.max(index, initial=0) if in_batched[0] else index   # (no members: branch 0)
    out = switch_max(index, [jax.vmap(b, in_axes=axes, axis_size=axis_size) for b in branches],
                     *ops)
    return out, jax.tree.map(lambda _: True, out)

  return call(index, *operands)


# ----------------------------------------------------------------------------- the run


class IncrementalState(NamedTuple):
  """The logits carried between generations.

  Attributes:
    logits: (P, O, N) logits (without the bias) of the population.
    hof_rows: (K,) the rows of ``logits`` that hold the hall of fame's (every member of the
      hall of fame is in the population it entered with, or in the one after, which carries
      the previous hall of fame in its last K rows).
  """

  logits: jax.Array
  hof_rows: jax.Array


def _tell(config, state, population, fitness, logits):
  """:func:`jaxprune.ga.tell` that also says where the hall of fame's logits are."""
  new, idx = strategy.tell_with_indices(config, state, population, fitness)
  # A member of the previous hall of fame (index < K; only from generation 1 on) is also in
  # the population's last K rows.
  k, n = state.hof.shape[0], population.shape[0] - state.hof.shape[0]
  rows = jnp.where(idx < k, n + idx, idx - k)
  return new, IncrementalState(logits, rows)


def run_scan(plan_: Plan, config, fitness_fn, num_units: int, hyper, data: PyTree,
             key: jax.Array, report=None, record: bool = False):
  """The GA of :func:`jaxprune.ga.run` with incremental fitness (inside its jit).

  Args:
    plan_: the static sizes (:func:`plan`).
    config, fitness_fn, num_units, hyper, data, key: as for :func:`jaxprune.ga.run`.
    report: None, or a function ``(generation, best, mean)`` called inside the program that
      reports to the host (:func:`jaxprune.ga.loop._in_program_reporter`).
    record: also return each generation's population and fitness (for tests).

  Returns:
    ``(state, history)``, plus ``(populations, fitness)`` of shapes (G+1, P, U) and (G+1, P)
    when ``record``.
  """
  S = importlib.import_module("jaxprune.ga.loop")  # imports this module: loaded lazily
  h, w, b, y, *weight = fitness_fn.incremental_data(data)
  if not exact_dtype(h, w):
    raise ValueError(
        f"The incremental evaluation needs logits of at least 32 bits; these activations "
        f"({jnp.result_type(h)}) and output kernel ({jnp.result_type(w)}) give "
        f"{jnp.result_type(h.dtype, w.dtype)}, where parent logits plus a delta round "
        "differently from the full product. Use the full evaluation (ga.run and ga.search do "
        "so by themselves for these params: incremental=False or 'auto'), or cast params and "
        "inputs to float32.")
  weight = weight[0] if weight else None
  activation = getattr(fitness_fn, "unit_activation", lambda: None)()
  arr = arrays(h, w, b, y, activation)
  keys = strategy.generation_keys(key, config)
  n = config.population_size - config.hof_size

  def score(population, z):
    acc = accuracy_from_logits(arr.b, arr.y, z[:, :-1], live_counts(arr, population, z),
                               weight)
    return fitness_fn.from_accuracy(acc, population, data, hyper)

  def finish(state, population, fitness, z):
    state, inc = _tell(config, state, population, fitness, z)
    stats = S._stats(state)  # pylint: disable=protected-access
    if report is not None:
      report(state.generation - 1, stats.best, stats.mean)  # issues the host callback
    out = (stats, (population, state.fitness)) if record else stats
    return state, inc, out

  # Generation 0: the random population, evaluated in full.
  state0 = strategy.init(config, num_units)
  pop0 = strategy.initial_population(config, num_units, key=keys[0])
  z0 = full_logits(arr, pop0)
  state, inc, out0 = finish(state0, pop0, score(pop0, z0), z0)

  def body(carry, kk):
    state, inc = carry
    lin = breed_with_lineage(config, state, hyper, key=kk)
    copy = copies(state.population, lin.children)

    z, need_full = child_logits(plan_, arr, state.population, inc.logits, lin, inc.hof_rows,
                                copy)
    z = _full_fallback(plan_, arr, z, lin.children, need_full)
    fit_children = score(lin.children, z[:n])
    population = jnp.concatenate([lin.children, state.hof], axis=0)
    fitness = jnp.concatenate([fit_children.astype(jnp.float32), state.hof_fitness])
    state, inc, out = finish(state, population, fitness, z)
    return (state, inc), out

  (state, inc), outs = lax.scan(body, (state, inc), keys[1:])
  outs = jax.tree.map(lambda a, b_: jnp.concatenate([a[None], b_], axis=0), out0, outs)
  if record:
    history, recorded = outs
    return state, history, recorded
  return state, outs
