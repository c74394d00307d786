"""Incremental fitness for the GA's fast path: children are scored from their parents' logits.

On the fast path (a group read only by the output layer) an individual's output logits are a
sum over its kept units, ``logits = sum_{u kept} H[:, u] W[u, :] + b``. The units are split
into ``B`` blocks of ``s`` units, and every individual carries its logits as ``B`` partial sums
``S[j, p] = (mask_p[block j, None] * W[block j]).T @ H[:, block j].T`` (shape (O, N) each).
Each generation, every child is scored by the cheapest exact route its lineage allows:

* a child that is a copy of its parent (no crossover, no mutation) takes the parent's partial
  sums; nothing is computed;
* a crossed child ``A[:c] ++ B[c:]`` that was not mutated takes ``A``'s partial sums for the
  blocks before the cut and ``B``'s after it (one gather), and recomputes only the block that
  holds the cut, from its own bits (``s`` units instead of ``U``);
* a mutated child is evaluated in full (all ``B`` blocks from its bits). At the published
  rates a mutation flips about one bit in ten, so a flipped bit lands in nearly every block
  (a block of 100 units is left untouched once in 40,000), and on XLA:CPU one dense product
  per block costs less than gathering the flipped units for ``+-H[:, u] W[u, :]`` updates
  (measured: 9 ms against 15-45 ms per generation at H=1000). Recomputing also means that no
  rounding accumulates over generations: every block sum is one product of its bits;
* hall-of-fame members are not re-scored: their fitness is the one recorded when they entered
  the hall of fame (fitness is deterministic), and their partial sums travel with them.

Every shape is static and the choice is made inside the compiled program: ``cut_slots``
children per block have their cut block recomputed (more: full evaluation), and the full
evaluations go ``full_slots`` children at a time in a ``lax.while_loop`` that runs zero times
when no child needs one, so the work per generation is bounded by a fixed budget plus the rare
overflow.

Exactness. The accuracies equal the full evaluation's except where float summation order can
flip an argmax: the full evaluation sums a pattern's logits in one product over all ``U``
units; the incremental one sums ``B`` block products, then the blocks in block order. The two
differ by a few units in the last place of the logits, so they can disagree only on a pattern
whose two largest logits are that close (a near tie); one pattern's prediction then flips, the
accuracy moves by ``1 / N`` and the two runs part ways. ``tests/test_ga_incremental.py``
compares every individual of many random generations with the full evaluation (no
disagreement in its cases) and ``benchmarks/ga.py`` reports the count at H=1000.
``incremental=False`` (on :func:`jaxprune.ga.search` or :func:`jaxprune.ga.make_fitness`)
forces the full evaluation; ``'auto'`` (the default) uses the incremental one from
:data:`MIN_UNITS` units on, except on CPU (where it was measured no faster; see :func:`applies`).

Scope: one device (with several devices the population is sharded and evaluated in full), a
fitness object that exposes ``incremental_data(data) -> (h, w, b, y)`` and
``from_accuracy(accuracy, population, data, hyper)`` (:class:`jaxprune.ga.AccuracyFitness` on
the fast path does), and partial sums that fit :data:`MEMORY_LIMIT` bytes (fewer blocks are
used for large populations; none fits: full evaluation).

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

import importlib
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune.ga import operators as ops
from jaxprune.ga import strategy

PyTree = Any

#: Largest size in bytes of the population's partial sums (float32, (P, B, O, N)); with more,
#: fewer blocks are used, and below two blocks the full evaluation.
MEMORY_LIMIT = 1 << 30


class Plan(NamedTuple):
  """Static sizes of the incremental evaluation.

  Attributes:
    blocks: ``B``, number of unit blocks.
    block_size: ``s``, units per block (the last block is padded with zero units).
    full_slots: children evaluated in full per ``while_loop`` iteration (sized for the
      mutated children at the published mutation rate, 0.2, plus three standard deviations).
    cut_slots: children whose cut block is recomputed per block (more: full evaluation).
  """

  blocks: int
  block_size: int
  full_slots: int
  cut_slots: int


def plan(num_units: int, population_size: int, hof_size: int, num_patterns: int,
         num_outputs: int, *, blocks: int | None = None,
         memory_limit: int = MEMORY_LIMIT) -> Plan | None:
  """The static sizes for a run, or None when the partial sums would not fit or pay off.

  About ``sqrt(U) / 3`` blocks (10 for 1,000 units) balance the cut block's recomputation
  (``s`` units per child) against the copying of ``B`` partial sums per child.
  """
  if num_units < 2:
    return None
  if blocks is None:
    blocks = int(np.clip(round(math.sqrt(num_units) / 3), 2, 32))
  blocks = min(blocks, num_units)
  per_block = 4 * population_size * num_patterns * num_outputs
  blocks = min(blocks, memory_limit // max(per_block, 1))
  if blocks < 2:
    return None
  size = -(-num_units // blocks)
  n = population_size - hof_size
  mean = 0.2 * n
  full = int(math.ceil(mean + 3 * math.sqrt(mean * 0.8) + 1))
  per_block = 0.64 * n / blocks   # crossed (0.8) and not mutated (0.8), spread over blocks
  cut = int(math.ceil(per_block + 3 * math.sqrt(per_block) + 1))
  return Plan(blocks=blocks, block_size=size, full_slots=min(n, full),
              cut_slots=min(n, cut))


#: ``incremental='auto'`` uses the incremental evaluation from this many units on.
MIN_UNITS = 256


def applies(fitness_fn, mesh, num_units: int) -> bool:
  """True when ``fitness_fn`` asks for, and supports, incremental evaluation on this mesh.

  ``fitness_fn.incremental`` is True (always), False (never) or ``'auto'``: from
  :data:`MIN_UNITS` units on, and not on CPU. On XLA:CPU the measured incremental run was not
  faster than the full one at H=1000 (the block products and gathers are memory-bound there,
  while the full product runs near the matmul rate; see docs/benchmarks.md) and it compiles
  2-4x longer, so ``'auto'`` keeps the full evaluation on CPU; pass True to opt in.
  """
  if mesh is not None and mesh.size > 1:
    return False
  if not (bool(getattr(fitness_fn, "fast", True)) and hasattr(fitness_fn, "incremental_data")
          and hasattr(fitness_fn, "from_accuracy")):
    return False
  mode = getattr(fitness_fn, "incremental", False)
  if mode == "auto":
    return num_units >= MIN_UNITS and jax.default_backend() != "cpu"
  return mode is True


# ----------------------------------------------------------------------------- block algebra


class _Blocks(NamedTuple):
  """The fast path's arrays split into blocks (padded with zero units)."""

  ht: jax.Array    # (B, s, N) activations of each block, one row per unit
  wb: jax.Array    # (B, s, O) output kernel rows of each block
  b: jax.Array     # (O,) output bias
  y: jax.Array     # (N,) labels


def _blocks(plan_: Plan, h, w, b, y) -> _Blocks:
  pad = plan_.blocks * plan_.block_size - h.shape[1]
  ht = jnp.pad(h, ((0, 0), (0, pad))).T.reshape(plan_.blocks, plan_.block_size, -1)
  wb = jnp.pad(w, ((0, pad), (0, 0))).reshape(plan_.blocks, plan_.block_size, -1)
  return _Blocks(ht, wb, b, y)


def _pad_bits(plan_: Plan, population: jax.Array) -> jax.Array:
  pad = plan_.blocks * plan_.block_size - population.shape[-1]
  return jnp.pad(population, ((0, 0), (0, pad)))


def _block_product(blk: _Blocks, j: jax.Array, bits: jax.Array) -> jax.Array:
  """(Q, O, N) partial sums of block ``j`` for (Q, s) bits: one plain 2-D product.

  ``W_all.T @ H_j.T`` with ``W_all[:, q*O:(q+1)*O] = bits[q][:, None] * W_j``, the fast
  path's one-product formulation per block (XLA:CPU runs batched products of small matrices
  far below its GEMM rate), transposed so that the result needs no transpose.
  """
  q, o = bits.shape[0], blk.wb.shape[-1]
  wm = bits.astype(blk.wb.dtype)[:, :, None] * blk.wb[j][None, :, :]       # (Q, s, O)
  lhs = jnp.transpose(wm, (0, 2, 1)).reshape(q * o, -1)                   # (Q*O, s)
  return (lhs @ blk.ht[j]).reshape(q, o, -1)


def full_partials(plan_: Plan, blk: _Blocks, population: jax.Array) -> jax.Array:
  """(B, Q, O, N) partial sums of each individual, every block computed from its bits.

  A ``lax.scan`` over the blocks, so that one product is compiled, not ``B``.
  """
  q = population.shape[0]
  m = _pad_bits(plan_, population).reshape(q, plan_.blocks, plan_.block_size)
  return jnp.stack([_block_product(blk, j, m[:, j]) for j in range(plan_.blocks)])


def accuracy_from_partials(blk: _Blocks, partials: jax.Array) -> jax.Array:
  """(Q,) accuracy in percent from (B, Q, O, N) partial sums (block sums in block order)."""
  logits = partials[0]
  for j in range(1, partials.shape[0]):   # block order, the same for every individual
    logits = logits + partials[j]
  logits = logits + blk.b[None, :, None]                                   # (Q, O, N)
  # argmax over the (middle) output axis as an unrolled compare, which XLA:CPU fuses with the
  # sum (its argmax reduction over a middle axis is ~100x slower here). Same semantics as
  # jnp.argmax: the first maximum wins, and the first NaN wins over any number.
  best, arg = logits[:, 0], jnp.zeros(logits[:, 0].shape, jnp.int32)
  for o in range(1, logits.shape[1]):
    v = logits[:, o]
    better = jnp.logical_or(v > best, jnp.logical_and(jnp.isnan(v), jnp.logical_not(
        jnp.isnan(best))))
    best, arg = jnp.where(better, v, best), jnp.where(better, o, arg)
  correct = arg == blk.y[None, :]
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


def child_partials(plan_: Plan, blk: _Blocks, partials: jax.Array,
                   lin: _Lineage) -> tuple[jax.Array, jax.Array]:
  """(B, n, O, N) children's partial sums, and (n,) which children need a full evaluation.

  Mutated children are flagged for full evaluation: a flipped bit lands in nearly every block
  at the published rates (``0.9 ** 100``: a block of 100 units is left untouched once in
  40,000), and on XLA:CPU one dense product per block costs less than gathering the flipped
  units for ``+-H[:, u] W[u, :]`` updates (measured: 9 ms against 15-45 ms per generation at
  H=1000), so the recomputation is both the cheaper delta and free of accumulated rounding.
  """
  nb, s = plan_.blocks, plan_.block_size
  n = lin.children.shape[0]
  cb = (lin.cut - 1) // s   # the block holding the last unit taken from the first parent
  j = jnp.arange(nb)
  # Blocks up to the cut from the first parent, after it from the second: one gather.
  src = jnp.where(j[:, None] <= cb[None, :], lin.first[None, :], lin.second[None, :])
  p = partials.shape[1]
  flat = partials.reshape((-1,) + partials.shape[2:])
  out = flat[j[:, None] * p + src]                                         # (B, n, O, N)
  # The cut block of crossed, unmutated children: grouped by block, ``cut_slots`` per block.
  need_cut = jnp.logical_and(lin.crossed, jnp.logical_not(lin.mutated))
  bits = _pad_bits(plan_, lin.children).reshape(n, nb, s)
  need_full = lin.mutated
  for jj in range(nb):
    here = jnp.logical_and(need_cut, cb == jj)
    members = jnp.nonzero(here, size=plan_.cut_slots, fill_value=n)[0]
    part = _block_product(blk, jj, bits[jnp.minimum(members, n - 1), jj])
    out = out.at[jj, members].set(part, mode="drop")
    need_full = jnp.logical_or(need_full, jnp.logical_and(
        here, jnp.cumsum(here) > plan_.cut_slots))
  return out, need_full


def _full_fallback(plan_: Plan, blk: _Blocks, out: jax.Array, children: jax.Array,
                   need_full: jax.Array) -> jax.Array:
  """Recomputes the flagged children in full, ``full_slots`` at a time (zero passes if none)."""
  n = children.shape[0]

  def cond(carry):
    return jnp.any(carry[1])

  def body(carry):
    out, need = carry
    idx = jnp.nonzero(need, size=plan_.full_slots, fill_value=n)[0]
    part = full_partials(plan_, blk, children[jnp.minimum(idx, n - 1)])
    out = out.at[:, idx].set(part, mode="drop")
    return out, need.at[idx].set(False, mode="drop")

  return lax.while_loop(cond, body, (out, need_full))[0]


# ----------------------------------------------------------------------------- the run


class IncrementalState(NamedTuple):
  """The partial sums carried between generations.

  Attributes:
    partials: (B, P, O, N) partial sums of the population's logits, block-major.
    hof_partials: (B, K, O, N) those of the hall of fame.
  """

  partials: jax.Array
  hof_partials: jax.Array


def _tell(config, state, population, fitness, partials, inc: IncrementalState):
  """:func:`jaxprune.ga.tell` that also carries the members' partial sums."""
  fitness = fitness.astype(jnp.float32)
  fitness = jnp.where(jnp.isnan(fitness), -jnp.inf, fitness)
  idx = ops.hall_of_fame_indices(state.hof, state.hof_fitness, population, fitness,
                                 hof_valid=state.generation > 0)
  cand = jnp.concatenate([state.hof, population], axis=0)
  cand_fit = jnp.concatenate([state.hof_fitness, fitness], axis=0)
  # The K members' partial sums, gathered without concatenating the population's.
  k = state.hof.shape[0]
  from_hof = (idx < k)[None, :, None, None]
  hof_part = jnp.where(from_hof, inc.hof_partials[:, jnp.minimum(idx, k - 1)],
                       partials[:, jnp.maximum(idx - k, 0)])
  new = strategy.GAState(population, fitness, cand[idx], cand_fit[idx], state.generation + 1)
  return new, IncrementalState(partials, hof_part)


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
  h, w, b, y = fitness_fn.incremental_data(data)
  blk = _blocks(plan_, h.reshape(h.shape[0], -1), w, b, y)
  keys = strategy.generation_keys(key, config)
  k = config.hof_size

  def score(population, partials):
    return fitness_fn.from_accuracy(accuracy_from_partials(blk, partials), population, data,
                                    hyper)

  def finish(state, inc, population, fitness, partials):
    state, inc = _tell(config, state, population, fitness, partials, inc)
    stats = S._stats(state)  # pylint: disable=protected-access
    if report is not None:
      report(state.generation - 1, stats.best, stats.mean)  # issues the host callback
    out = (stats, (population, state.fitness)) if record else stats
    return state, inc, out

  # Generation 0: the random population, evaluated in full.
  state0 = strategy.init(config, num_units)
  pop0 = strategy.initial_population(config, num_units, key=keys[0])
  part0 = full_partials(plan_, blk, pop0)
  inc0 = IncrementalState(part0, jnp.zeros(part0.shape[:1] + (k,) + part0.shape[2:],
                                          part0.dtype))
  state, inc, out0 = finish(state0, inc0, pop0, score(pop0, part0), part0)

  def body(carry, kk):
    state, inc = carry
    lin = breed_with_lineage(config, state, hyper, key=kk)
    part, need_full = child_partials(plan_, blk, inc.partials, lin)
    part = _full_fallback(plan_, blk, part, lin.children, need_full)
    fit_children = score(lin.children, part)
    population = jnp.concatenate([lin.children, state.hof], axis=0)
    fitness = jnp.concatenate([fit_children.astype(jnp.float32), state.hof_fitness])
    partials = jnp.concatenate([part, inc.hof_partials], axis=1)
    state, inc, out = finish(state, inc, population, fitness, partials)
    return (state, inc), out

  (state, inc), outs = lax.scan(body, (state, inc), keys[1:])
  outs = jax.tree.map(lambda a, b_: jnp.concatenate([a[None], b_], axis=0), out0, outs)
  if record:
    history, recorded = outs
    return state, history, recorded
  return state, outs
