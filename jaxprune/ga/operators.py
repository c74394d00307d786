"""Genetic-algorithm operators on bit chromosomes, written for one individual and ``vmap``ped.

The operators follow DEAP's ``selTournament``, ``cxOnePoint``, ``mutFlipBit`` and
``HallOfFame`` (the operators of the published GA mask search), as pure functions of a PRNG
key. A chromosome is a bool vector with one bit per unit of a group (True keeps the unit); a
population is a (P, U) bool array.

* :func:`tournament` / :func:`select_tournament`: draw ``size`` contestants uniformly *with
  replacement* and keep the fittest (ties go to the first drawn, like DEAP's ``max``).

The per-individual operators take their uniform draws ``u`` (explicit randomness, ``vmap``ped
over rows); the population operators take a PRNG key.
* :func:`one_point_crossover` / :func:`crossover_pairs`: with probability ``prob`` swap the
  suffixes of two parents after a cut point drawn uniformly from ``1 .. U-1``; parents are paired
  as consecutive individuals (0, 1), (2, 3), ... and an odd last one is left unchanged.
* :func:`flip_mutation` / :func:`mutate`: with probability ``prob`` an individual is mutated, and
  then each of its bits flips with probability ``bit_prob``.
* :func:`update_hall_of_fame`: the ``K`` best *distinct* chromosomes ever seen, best first.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxprune.ga import operators as ops
  >>> pop = jax.random.bernoulli(jax.random.key(0), 0.5, (8, 12))
  >>> fit = pop.sum(1).astype(jnp.float32)
  >>> parents = pop[ops.select_tournament(jax.random.key(1), fit, 8, 3)]
  >>> children = ops.crossover_pairs(jax.random.key(2), parents, 0.8)
  >>> children = ops.mutate(jax.random.key(3), children, 0.2, 0.1)
  >>> children.shape
  (8, 12)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Randomness: each per-individual operator takes its own uniform draws ``u`` in [0, 1) rather
# than a key, and each population operator draws all of them with one call. The run draws one
# vector per generation for selection, crossover and mutation together (see ``breed`` in
# ``search.py``): one random-number kernel instead of a split and a draw per operator, which
# compiles about three times faster on CPU.


def uniform(key: jax.Array, n: int) -> jax.Array:
  """``jax.random.uniform(key, (n,), jnp.float32)``, the same values, drawn faster for odd
  ``n`` (float32 under x64 too, so that a key draws what it draws without x64).

  With the partitionable threefry (JAX's default) a 1-D draw of odd length runs about 5x
  slower on XLA:CPU than one of the next even length (2.0 ms against 0.42 ms for 95,475
  values), whose first ``n`` values are the same; so an odd ``n`` is drawn as ``n + 1``.
  """
  if n % 2 and jax.config.jax_threefry_partitionable:
    return jax.random.uniform(key, (n + 1,), jnp.float32)[:n]
  return jax.random.uniform(key, (n,), jnp.float32)


def ordered_sum(v: jax.Array) -> jax.Array:
  """The sum over axis 0, added in one fixed order (halves, pairwise), so that every program
  that computes it gets the same float: XLA orders a reduction by the layout and fusion it is
  compiled into (the incremental and the full GA computed a mean, and a weighted accuracy,
  one ulp apart)."""
  size = 1 << max(v.shape[0] - 1, 0).bit_length()
  v = jnp.pad(v, [(0, size - v.shape[0])] + [(0, 0)] * (v.ndim - 1))
  while v.shape[0] > 1:
    v = v[: v.shape[0] // 2] + v[v.shape[0] // 2:]
  return v[0]


def _index(u: jax.Array, n: int) -> jax.Array:
  """Uniform draws in [0, 1) -> integers uniform in 0 .. n-1."""
  return jnp.minimum(jnp.floor(u * n).astype(jnp.int32), n - 1)


# ----------------------------------------------------------------------------- selection


def tournament(u: jax.Array, fitness: jax.Array) -> jax.Array:
  """One tournament: the index of the fittest of ``len(u)`` contestants drawn with replacement.

  The contestants are ``floor(u * P)``; ties go to the first drawn (as DEAP's ``max`` over the
  aspirants).

  Args:
    u: (T,) uniform draws in [0, 1), one per contestant (T is the tournament size).
    fitness: (P,) fitness values (higher is better; NaN must already be mapped to ``-inf``).

  Returns:
    A scalar int32 index into the population.
  """
  contestants = _index(u, fitness.shape[0])
  return contestants[jnp.argmax(fitness[contestants])]


def select_tournament(key: jax.Array, fitness: jax.Array, num: int, size: int) -> jax.Array:
  """``num`` independent tournaments of ``size`` (``vmap`` of :func:`tournament`): (num,)."""
  return jax.vmap(tournament, in_axes=(0, None))(
      jax.random.uniform(key, (num, size), jnp.float32), fitness)


# ----------------------------------------------------------------------------- crossover


def one_point_crossover(u: jax.Array, a: jax.Array, b: jax.Array,
                        prob: float | jax.Array) -> tuple[jax.Array, jax.Array]:
  """DEAP's ``cxOnePoint``, applied with probability ``prob``.

  The pair is crossed if ``u[0] < prob``; the cut point ``c = 1 + floor(u[1] * (U - 1))`` is
  uniform in ``1 .. U-1``; the children are ``a[:c] ++ b[c:]`` and ``b[:c] ++ a[c:]``. Without
  crossover, or for a one-bit chromosome, the children are the parents.

  Args:
    u: (2,) uniform draws in [0, 1).
    a, b: (U,) parent chromosomes.
    prob: crossover probability (traced).

  Returns:
    The two children.
  """
  if jnp.ndim(a) != 1 or jnp.shape(a) != jnp.shape(b):
    raise ValueError(f"one_point_crossover: the parents must be two chromosomes of one length, "
                     f"(U,) each; got shapes {jnp.shape(a)} and {jnp.shape(b)}.")
  n = a.shape[0]
  do = u[0] < prob
  cut = 1 + _index(u[1], max(n - 1, 1))
  swap = jnp.logical_and(do, jnp.arange(n) >= cut)
  return jnp.where(swap, b, a), jnp.where(swap, a, b)


def crossover_pairs_from(u: jax.Array, parents: jax.Array,
                         prob: float | jax.Array) -> jax.Array:
  """:func:`crossover_pairs` with given draws ``u`` of shape (P // 2, 2)."""
  p = parents.shape[0]
  half = p // 2
  if half == 0:
    return parents
  a, b = parents[0:2 * half:2], parents[1:2 * half:2]
  c1, c2 = jax.vmap(one_point_crossover, in_axes=(0, 0, 0, None))(u, a, b, prob)
  children = jnp.stack([c1, c2], axis=1).reshape(2 * half, parents.shape[1])
  return jnp.concatenate([children, parents[2 * half:]], axis=0)


def crossover_pairs(key: jax.Array, parents: jax.Array, prob: float | jax.Array) -> jax.Array:
  """One-point crossover of consecutive pairs (0, 1), (2, 3), ... (DEAP's ``varAnd``).

  With an odd number of parents the last one is copied unchanged.

  Args:
    key: PRNG key.
    parents: (P, U) selected parents.
    prob: crossover probability per pair (traced).

  Returns:
    (P, U) children, in the parents' order.
  """
  u = jax.random.uniform(key, (parents.shape[0] // 2, 2), jnp.float32)
  return crossover_pairs_from(u, parents, prob)


# ----------------------------------------------------------------------------- mutation


def flip_mutation(u: jax.Array, x: jax.Array, prob: float | jax.Array,
                  bit_prob: float | jax.Array) -> jax.Array:
  """DEAP's ``mutFlipBit(indpb=bit_prob)`` applied with probability ``prob``.

  The individual is mutated if ``u[0] < prob``; then bit ``i`` flips if ``u[1 + i] < bit_prob``.

  Args:
    u: (1 + U,) uniform draws in [0, 1).
    x: (U,) chromosome.
    prob: probability that the individual is mutated at all (traced).
    bit_prob: probability that each bit of a mutated individual flips (traced).

  Returns:
    The mutated chromosome.
  """
  do = u[0] < prob
  flips = u[1:] < bit_prob
  return jnp.logical_xor(x, jnp.logical_and(do, flips))


def mutate_from(u: jax.Array, population: jax.Array, prob: float | jax.Array,
                bit_prob: float | jax.Array) -> jax.Array:
  """:func:`mutate` with given draws ``u`` of shape (P, 1 + U)."""
  return jax.vmap(flip_mutation, in_axes=(0, 0, None, None))(u, population, prob, bit_prob)


def mutate(key: jax.Array, population: jax.Array, prob: float | jax.Array,
           bit_prob: float | jax.Array) -> jax.Array:
  """:func:`flip_mutation` of every individual (``vmap``), each with its own draws."""
  p, u = population.shape
  return mutate_from(jax.random.uniform(key, (p, 1 + u), jnp.float32), population, prob,
                     bit_prob)


# ----------------------------------------------------------------------------- hall of fame


def pack_bits(population: jax.Array) -> jax.Array:
  """(P, U) bool -> (P, ceil(U / 32)) uint32 words (for exact comparison and sorting)."""
  p, u = population.shape
  w = -(-u // 32)
  bits = jnp.pad(population, ((0, 0), (0, 32 * w - u))).reshape(p, w, 32).astype(jnp.uint32)
  shifts = jnp.arange(32, dtype=jnp.uint32)[None, None, :]
  return jnp.sum(bits << shifts, axis=-1, dtype=jnp.uint32)


def _fmix32(x: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finaliser (uint32 in, uint32 out, wrapping arithmetic)."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x85EBCA6B)
  x = x ^ (x >> 13)
  x = x * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def _hash_words(words: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Two independent 32-bit hashes of each row of packed bits (position-dependent)."""
  pos = jnp.arange(words.shape[1], dtype=jnp.uint32)[None, :]
  m1 = _fmix32(words ^ (pos * jnp.uint32(0x9E3779B9) + jnp.uint32(0x7F4A7C15)))
  m2 = _fmix32(words ^ (pos * jnp.uint32(0x85EBCA77) + jnp.uint32(0x165667B1)))
  return (_fmix32(jnp.sum(m1, axis=1, dtype=jnp.uint32)),
          _fmix32(jnp.sum(m2 * jnp.uint32(0x27D4EB2F), axis=1, dtype=jnp.uint32)))


def update_hall_of_fame(hof: jax.Array, hof_fitness: jax.Array, population: jax.Array,
                        fitness: jax.Array, hof_valid: bool | jax.Array = True
                        ) -> tuple[jax.Array, jax.Array]:
  """The ``K`` fittest distinct chromosomes among the hall of fame and a population.

  See :func:`hall_of_fame_indices` (this gathers its rows of ``concat([hof, population])``).
  """
  return update_hall_of_fame_with_indices(hof, hof_fitness, population, fitness, hof_valid)[:2]


def update_hall_of_fame_with_indices(hof, hof_fitness, population, fitness, hof_valid=True):
  """:func:`update_hall_of_fame`, and the (K,) indices of its members into
  ``concat([hof, population])`` (:func:`hall_of_fame_indices`)."""
  idx = hall_of_fame_indices(hof, hof_fitness, population, fitness, hof_valid)
  cand = jnp.concatenate([hof, population], axis=0)
  cand_fit = jnp.concatenate([hof_fitness, fitness], axis=0).astype(jnp.float32)
  return cand[idx], cand_fit[idx], idx


def hall_of_fame_indices(hof: jax.Array, hof_fitness: jax.Array, population: jax.Array,
                         fitness: jax.Array, hof_valid: bool | jax.Array = True) -> jax.Array:
  """The ``K`` fittest distinct chromosomes among the hall of fame and a population.

  As DEAP's ``HallOfFame.update``, an individual identical to one already kept is not kept
  twice, a newcomer that only ties the worst member does not displace it, and the fitness
  values kept are DEAP's. Ties are broken once for the whole update: on equal fitness an
  existing member stays ahead of a newcomer, so ``hof[0]`` changes only on a strict
  improvement, and among newcomers the lower population index wins. DEAP, which inserts one
  individual at a time, puts a newcomer ahead of the members it ties and evicts the oldest of
  the tied worst, so where chromosomes tie at the cut the members kept can differ from DEAP's
  (docs/ga-reference.md gives an example and how often). If fewer than ``K`` distinct
  chromosomes exist, the remaining places are filled with the best duplicates (each after the
  distinct members of its fitness, so the members stay sorted best first). Identical chromosomes
  are found by their fitness and a 64-bit hash of the bits (sorted on them and neighbours
  compared, or, for up to :data:`RANK_BELOW` candidates off CPU, compared pairwise), then
  checked bit for bit: exact, except that a hash collision between two different chromosomes of
  equal fitness (probability about ``2**-64`` per pair) could let a duplicate through. Members
  are sorted best first, so ``hof[0]`` is the best individual ever evaluated and its fitness
  never decreases.

  Args:
    hof: (K, U) current members.
    hof_fitness: (K,) their fitness.
    population: (P, U) newly evaluated individuals.
    fitness: (P,) their fitness (NaN, here or in ``hof_fitness``, ranks as ``-inf``).
    hof_valid: False before the first update (the members are placeholders and are ranked
      after every real individual).

  Returns:
    (K,) indices into ``concat([hof, population])`` of the new members, best first (the
    incremental evaluation gathers the members' partial logits with them).
  """
  _check_hall_of_fame_shapes(hof, hof_fitness, population, fitness)
  k = hof.shape[0]
  cand = jnp.concatenate([hof, population], axis=0)
  cand_fit = jnp.concatenate([hof_fitness, fitness], axis=0).astype(jnp.float32)
  cand_fit = jnp.where(jnp.isnan(cand_fit), -jnp.inf, cand_fit)   # NaN ranks as the worst
  n = cand.shape[0]
  invalid = jnp.concatenate([jnp.full((k,), jnp.logical_not(hof_valid)),
                             jnp.zeros((population.shape[0],), bool)]).astype(jnp.int32)
  words = pack_bits(cand)
  h1, h2 = _hash_words(words)
  if n <= (RANK_BELOW_CPU if jax.default_backend() == "cpu" else RANK_BELOW):
    return _hof_by_ranking(k, invalid, cand_fit, words, h1, h2)
  return _hof_by_sorting(k, invalid, cand_fit, words, h1, h2)


def _check_hall_of_fame_shapes(hof, hof_fitness, population, fitness) -> None:
  """Raises naming the shapes when the members and the population are not (K, U) and (P, U)
  with one fitness each (a raw concatenate or broadcasting error said which op failed)."""
  shapes = [jnp.shape(v) for v in (hof, hof_fitness, population, fitness)]
  if (len(shapes[0]) != 2 or len(shapes[2]) != 2 or shapes[0][1] != shapes[2][1]
      or shapes[1] != shapes[0][:1] or shapes[3] != shapes[2][:1]):
    raise ValueError(
        f"update_hall_of_fame: expected hof (K, U), hof_fitness (K,), population (P, U) and "
        f"fitness (P,) with one chromosome length U; got {shapes[0]}, {shapes[1]}, "
        f"{shapes[2]} and {shapes[3]}.")


# Up to this many candidates (hall of fame + population) the members are found by comparing
# every pair (n^2 comparisons in a few fused kernels), above it by three sorts (n log n). On a
# GPU each sort is kernel launches of its own, which cost more than the comparisons: on an
# H200 at H=1000 a whole generation took 61 against 93 us at population 100, 180 against 221
# us at 1,000 (benchmarks/ga_parts.py). On XLA:CPU the sorts were the faster route at each
# size measured (the whole update on 2 cores: 144 against 218 us at population 100, 635 against
# 1,159 at 500, 1,355 against 4,051 at 1,000). Both give the same members in the same order.
RANK_BELOW = 1024
RANK_BELOW_CPU = 0


def _lex_less(a: tuple[jax.Array, ...], b: tuple[jax.Array, ...]) -> jax.Array:
  """Elementwise lexicographic ``a < b`` over tuples of equally shaped keys."""
  less, equal = jnp.zeros(a[0].shape, bool), jnp.ones(a[0].shape, bool)
  for x, y in zip(a, b):
    less = less | (equal & (x < y))
    equal = equal & (x == y)
  return less


def _hof_by_ranking(k, invalid, cand_fit, words, h1, h2):
  """:func:`hall_of_fame_indices` by ranks from pairwise comparisons (no sort)."""
  n = cand_fit.shape[0]
  order = jnp.arange(n, dtype=jnp.int32)
  col = lambda v: v[:, None]
  row = lambda v: v[None, :]
  # A candidate is a duplicate when an earlier candidate with the same placeholder flag, fitness
  # and 64-bit hash (the first such, checked bit for bit) holds the same chromosome.
  match = ((col(invalid) == row(invalid)) & (col(cand_fit) == row(cand_fit))
           & (col(h1) == row(h1)) & (col(h2) == row(h2)))
  first = jnp.argmax(match, axis=1).astype(jnp.int32)   # match[i, i] holds: at most i
  dup = ((first < order) & jnp.all(words[first] == words, axis=1)).astype(jnp.int32)
  # The K members: real before placeholder, distinct before duplicate, then by (-fitness,
  # order); each candidate's rank is the number of candidates ahead of it.
  key = (invalid, dup, -cand_fit, order)
  rank = jnp.sum(_lex_less(tuple(map(col, key)), tuple(map(row, key))), axis=0)
  chosen = rank < k
  # The members best first (a duplicate after the distinct members of its fitness).
  key = (invalid, -cand_fit, dup, order)
  ahead = _lex_less(tuple(map(col, key)), tuple(map(row, key))) & col(chosen)
  place = jnp.where(chosen, jnp.sum(ahead, axis=0), k)     # (n,), k: not a member
  slots = jnp.arange(k, dtype=jnp.int32)
  return jnp.sum(jnp.where(row(place) == col(slots), row(order), 0), axis=1, dtype=jnp.int32)


def _hof_by_sorting(k, invalid, cand_fit, words, h1, h2):
  """:func:`hall_of_fame_indices` by three sorts."""
  n = cand_fit.shape[0]
  order = jnp.arange(n, dtype=jnp.int32)
  # Pass 1: sort by (placeholder, -fitness, 64-bit hash, order) so that identical chromosomes
  # (same fitness, same hash) are adjacent with the earliest first; all but the first of each
  # run are duplicates (checked on the full bits, so a hash collision never merges two
  # different chromosomes).
  sorted_ops = lax.sort((invalid, -cand_fit, h1, h2, order), num_keys=5)
  s_invalid, s_fit, s_order = sorted_ops[0], -sorted_ops[1], sorted_ops[-1]
  s_words = words[s_order]
  same_as_prev = (jnp.all(s_words[1:] == s_words[:-1], axis=1) & (s_fit[1:] == s_fit[:-1])
                  & (s_invalid[1:] == s_invalid[:-1]))   # a placeholder is no copy of a real one
  dup = jnp.concatenate([jnp.zeros((1,), bool), same_as_prev]).astype(jnp.int32)
  # Pass 2: the K members: real before placeholder, distinct before duplicate, then by
  # (-fitness, order).
  pos = jnp.arange(n, dtype=jnp.int32)
  chosen = lax.sort((s_invalid, dup, -s_fit, s_order, pos), num_keys=4)[-1][:k]
  # Pass 3: the members best first (duplicates, taken only when fewer than K distinct
  # chromosomes exist, go after the distinct members of their fitness, not after all of them).
  return lax.sort((s_invalid[chosen], -s_fit[chosen], dup[chosen], s_order[chosen]),
                  num_keys=4)[-1]
