"""GA operators: semantics on fixed keys, vmap against Python loops, rates within bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import host_f32
from jaxprune.ga import operators as ops

# Jitted once per module: eager op-by-op dispatch in loops would dominate the test time.
tournament = jax.jit(ops.tournament)
select_tournament = jax.jit(ops.select_tournament, static_argnums=(2, 3))
one_point_crossover = jax.jit(ops.one_point_crossover)
crossover_pairs = jax.jit(ops.crossover_pairs)
flip_mutation = jax.jit(ops.flip_mutation)
mutate = jax.jit(ops.mutate)
update_hall_of_fame = jax.jit(ops.update_hall_of_fame)


def test_tournament_picks_best_of_its_sample():
  fit = host_f32(np.random.default_rng(0).permutation(20))
  # Hand case: draws 0.0, 0.5, 0.99 are contestants 0, 10, 19.
  u = jnp.asarray([0.0, 0.5, 0.99])
  want = [0, 10, 19][int(np.argmax(np.asarray(fit)[[0, 10, 19]]))]
  assert int(tournament(u, fit)) == want
  draws = jax.random.uniform(jax.random.key(0), (12, 3))
  for d in draws:
    contestants = np.floor(np.asarray(d) * 20).astype(int)
    got = int(tournament(d, fit))
    assert got in contestants
    assert float(fit[got]) == float(np.max(np.asarray(fit)[contestants]))


def test_tournament_ties_go_to_first_drawn():
  fit = jnp.zeros((10,), jnp.float32)
  assert int(tournament(jnp.asarray([0.35, 0.15, 0.95, 0.55]), fit)) == 3


def test_select_tournament_vmap_equals_loop_and_favours_fit():
  fit = jnp.arange(50, dtype=jnp.float32)
  key = jax.random.key(1)
  idx = np.asarray(select_tournament(key, fit, 400, 3))
  draws = jax.random.uniform(key, (400, 3))
  loop = [int(tournament(draws[i], fit)) for i in range(0, 400, 20)]
  np.testing.assert_array_equal(idx[::20], loop)
  # The best of 3 uniform draws has mean rank 3/4 of the range (vs 1/2 without selection).
  assert 0.70 * 49 < idx.mean() < 0.80 * 49


def test_one_point_crossover_is_a_prefix_suffix_swap():
  u = 6
  a, b = jnp.ones((u,), bool), jnp.zeros((u,), bool)
  # Hand case: cut = 1 + floor(0.5 * 5) = 3.
  c1, c2 = one_point_crossover(jnp.asarray([0.0, 0.5]), a, b, 0.8)
  np.testing.assert_array_equal(c1, [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(c2, [0, 0, 0, 1, 1, 1])
  draws = jax.random.uniform(jax.random.key(0), (200, 2))
  aa, bb = jnp.ones((200, u), bool), jnp.zeros((200, u), bool)
  c1, c2 = jax.jit(jax.vmap(ops.one_point_crossover, in_axes=(0, 0, 0, None)))(draws, aa, bb, 1.0)
  c1, c2 = np.asarray(c1), np.asarray(c2)
  cuts = c1.sum(1)
  for cut, x1, x2 in zip(cuts, c1, c2):
    np.testing.assert_array_equal(x1, np.arange(u) < cut)   # a[:cut] ++ b[cut:]
    np.testing.assert_array_equal(x2, np.arange(u) >= cut)  # b[:cut] ++ a[cut:]
  assert set(cuts.tolist()) == set(range(1, u))  # cut points 1 .. U-1, never 0 or U


def test_one_point_crossover_general_parents_and_probability():
  rng = np.random.default_rng(0)
  a, b = jnp.asarray(rng.random(9) < 0.5), jnp.asarray(rng.random(9) < 0.5)
  c1, c2 = one_point_crossover(jnp.asarray([0.1, 0.3]), a, b, 1.0)
  cut = 1 + int(0.3 * 8)
  np.testing.assert_array_equal(c1, np.concatenate([a[:cut], b[cut:]]))
  np.testing.assert_array_equal(c2, np.concatenate([b[:cut], a[cut:]]))
  # u[0] = 0.9 >= prob = 0.8: no crossover.
  c1, c2 = one_point_crossover(jnp.asarray([0.9, 0.3]), a, b, 0.8)
  np.testing.assert_array_equal(c1, a)
  np.testing.assert_array_equal(c2, b)
  # Crossover happens with probability 0.8 (a=all True, b=all False: crossed iff c1 != a).
  ones, zeros = jnp.ones((4000, 8), bool), jnp.zeros((4000, 8), bool)
  c1 = crossover_pairs(jax.random.key(0), jnp.stack([ones, zeros], 1).reshape(8000, 8), 0.8)
  rate = float(np.mean(~np.all(np.asarray(c1)[0::2], axis=1)))
  assert abs(rate - 0.8) < 5 * np.sqrt(0.8 * 0.2 / 4000)


def test_crossover_pairs_consecutive_parents_and_odd_last():
  rng = np.random.default_rng(1)
  parents = jnp.asarray(rng.random((5, 10)) < 0.5)
  key = jax.random.key(2)
  children = np.asarray(crossover_pairs(key, parents, 1.0))
  draws = jax.random.uniform(key, (2, 2))
  for i in range(2):
    c1, c2 = one_point_crossover(draws[i], parents[2 * i], parents[2 * i + 1], 1.0)
    np.testing.assert_array_equal(children[2 * i], c1)
    np.testing.assert_array_equal(children[2 * i + 1], c2)
  np.testing.assert_array_equal(children[4], parents[4])


def test_mutation_rates_within_statistical_bounds():
  pop = jnp.zeros((400, 250), bool)
  # Every individual mutated: each bit flips with probability 0.1.
  out = np.asarray(mutate(jax.random.key(0), pop, 1.0, 0.1))
  n = out.size
  assert abs(out.mean() - 0.1) < 5 * np.sqrt(0.1 * 0.9 / n)
  # Individual probability 0.2, every bit of a mutated individual flips.
  out = np.asarray(mutate(jax.random.key(1), pop, 0.2, 1.0))
  rows = out.sum(1)
  assert set(np.unique(rows)) <= {0, 250}
  assert abs((rows == 250).mean() - 0.2) < 5 * np.sqrt(0.2 * 0.8 / 400)
  # Nothing mutated.
  np.testing.assert_array_equal(mutate(jax.random.key(2), pop, 0.0, 1.0), pop)
  # Flip, not set: hand case.
  x = jnp.asarray([True, True, False, False])
  np.testing.assert_array_equal(flip_mutation(jnp.asarray([0.1, 0.05, 0.5, 0.05, 0.5]), x, 0.2,
                                              0.1), [False, True, True, False])
  np.testing.assert_array_equal(flip_mutation(jnp.asarray([0.3, 0.0, 0.0, 0.0, 0.0]), x, 0.2,
                                              0.1), x)   # individual not mutated


def test_mutate_vmap_equals_loop():
  pop = jnp.asarray(np.random.default_rng(2).random((6, 30)) < 0.5)
  key = jax.random.key(4)
  out = mutate(key, pop, 0.5, 0.3)
  draws = jax.random.uniform(key, (6, 31))
  loop = [flip_mutation(draws[i], pop[i], 0.5, 0.3) for i in range(6)]
  np.testing.assert_array_equal(out, np.stack(loop))


def test_pack_bits():
  rng = np.random.default_rng(3)
  pop = rng.random((7, 70)) < 0.5
  words = np.asarray(ops.pack_bits(jnp.asarray(pop)))
  assert words.shape == (7, 3) and words.dtype == np.uint32
  unpacked = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :70]
  np.testing.assert_array_equal(unpacked.astype(bool), pop)


def _b(rows):
  return jnp.asarray(np.array(rows, dtype=bool))


def test_hall_of_fame_hand_case_distinct_and_ties():
  hof = _b([[1, 0, 0], [0, 1, 0]])
  hof_fit = jnp.asarray([5.0, 3.0])
  pop = _b([[1, 0, 0], [0, 0, 1], [0, 0, 1], [1, 1, 1]])
  fit = jnp.asarray([5.0, 4.0, 4.0, 5.0])
  new, new_fit = update_hall_of_fame(hof, hof_fit, pop, fit)
  # [1,0,0] is already in (not duplicated); the newcomer [1,1,1] ties it and stays behind it.
  np.testing.assert_array_equal(new, _b([[1, 0, 0], [1, 1, 1]]))
  np.testing.assert_array_equal(new_fit, [5.0, 5.0])
  # A hall of fame of 3: the distinct [0,0,1] (4.0) enters, its duplicate does not.
  hof3 = _b([[1, 0, 0], [0, 1, 0], [0, 1, 1]])
  new, new_fit = update_hall_of_fame(hof3, jnp.asarray([5.0, 3.0, 1.0]), pop, fit)
  np.testing.assert_array_equal(new, _b([[1, 0, 0], [1, 1, 1], [0, 0, 1]]))
  np.testing.assert_array_equal(new_fit, [5.0, 5.0, 4.0])


def test_hall_of_fame_tie_at_the_cut_keeps_the_earlier_individual_unlike_deap():
  """docs/ga-reference.md's example: from an empty hall of fame of 2, X and Y (3) then Z (4)
  keep Z and X here; DEAP's one-at-a-time update keeps Z and Y. The fitness values agree."""
  pop = _b([[1, 0, 0], [0, 1, 0], [0, 0, 1]])
  new, new_fit = update_hall_of_fame(jnp.zeros((2, 3), bool), jnp.full((2,), -jnp.inf), pop,
                                     jnp.asarray([3.0, 3.0, 4.0]), hof_valid=False)
  np.testing.assert_array_equal(new, _b([[0, 0, 1], [1, 0, 0]]))
  np.testing.assert_array_equal(new_fit, [4.0, 3.0])


def test_hall_of_fame_first_update_ignores_placeholders_and_fills_with_duplicates():
  hof = jnp.zeros((3, 4), bool)
  hof_fit = jnp.full((3,), -jnp.inf)
  pop = _b([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
  fit = jnp.asarray([2.0, 2.0, 2.0, -jnp.inf])
  new, new_fit = update_hall_of_fame(hof, hof_fit, pop, fit, hof_valid=False)
  # Two distinct real individuals and the best duplicate (placeholders never enter), best
  # first: the duplicate follows the distinct member of its fitness (it came after the -inf
  # individual, so hof_fitness was not sorted).
  np.testing.assert_array_equal(new, _b([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]))
  np.testing.assert_array_equal(new_fit, [2.0, 2.0, -np.inf])


def test_hall_of_fame_never_loses_its_best():
  rng = np.random.default_rng(4)
  hof, hof_fit = jnp.zeros((5, 12), bool), jnp.full((5,), -jnp.inf)
  seen = {}
  for step in range(25):
    pop = rng.random((16, 12)) < 0.5
    fit = np.asarray([float(np.sum(r * np.arange(12))) for r in pop], np.float32)
    for r, f in zip(pop, fit):
      seen[r.tobytes()] = f
    prev_best = float(hof_fit[0])
    hof, hof_fit = update_hall_of_fame(hof, hof_fit, jnp.asarray(pop), jnp.asarray(fit), step > 0)
    assert float(hof_fit[0]) >= prev_best
    assert float(hof_fit[0]) == max(seen.values())
    assert np.all(np.diff(np.asarray(hof_fit)) <= 0)
    assert len({np.asarray(h).tobytes() for h in hof}) == 5   # distinct members
    for h, f in zip(np.asarray(hof), np.asarray(hof_fit)):
      assert seen[h.tobytes()] == f
  top5 = sorted(seen.values(), reverse=True)[:5]
  np.testing.assert_allclose(np.asarray(hof_fit), top5)


def test_uniform_draws_equal_jax_random_uniform_for_odd_and_even_lengths():
  # ops.uniform draws an odd length as the next even one (5x faster on XLA:CPU) and must give
  # exactly jax.random.uniform's values, so the GA's random stream does not depend on it.
  key = jax.random.key(7)
  for n in (1, 2, 7, 1001, 95475):
    got = jax.jit(ops.uniform, static_argnums=1)(key, n)
    assert got.shape == (n,)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.random.uniform(key, (n,))))


def _reference_hall_of_fame(hof, hof_fit, pop, fit, valid):
  """hall_of_fame_indices' documented semantics in plain Python."""
  k = len(hof)
  bits = [r.tobytes() for r in np.concatenate([hof, pop])]
  f = np.concatenate([hof_fit, fit]).astype(np.float32)
  f = np.where(np.isnan(f), -np.inf, f)
  invalid = [0 if (valid or i >= k) else 1 for i in range(len(bits))]
  dup = [int(any(invalid[j] == invalid[i] and f[j] == f[i] and bits[j] == bits[i]
                 for j in range(i))) for i in range(len(bits))]
  chosen = sorted(range(len(bits)), key=lambda i: (invalid[i], dup[i], -f[i], i))[:k]
  return sorted(chosen, key=lambda i: (invalid[i], -f[i], dup[i], i))


@pytest.mark.parametrize("rank_below", [0, 10**6], ids=["sorting", "ranking"])
def test_hall_of_fame_both_routes_equal_the_documented_semantics(monkeypatch, rank_below):
  """Small candidate sets are ranked by pairwise comparisons, large ones sorted: each route
  gives the members of the Python reference, in its order, on cases full of duplicates, ties
  between distinct chromosomes, -inf fitness and placeholders."""
  monkeypatch.setattr(ops, "RANK_BELOW", rank_below)
  monkeypatch.setattr(ops, "RANK_BELOW_CPU", rank_below)
  rng = np.random.default_rng(7)
  for k, p in ((1, 4), (3, 10), (5, 40), (5, 95)):
    indices = jax.jit(lambda *a: ops.hall_of_fame_indices(*a))   # a fresh trace per route
    for case in range(12):
      m = (2, 3, 6)[case % 3]   # a pool of 2 or 3: fewer distinct masks than members
      pool = rng.random((m, 37)) < 0.5
      pool_fit = np.sum(pool, axis=1).astype(np.float32) % 3   # ties between distinct masks
      pool_fit[rng.random(m) < 0.2] = -np.inf
      hi, pi = rng.integers(0, m, k), rng.integers(0, m, p)
      valid = bool(case % 4)
      hof, hof_fit = pool[hi], pool_fit[hi]
      if not valid:
        hof, hof_fit = np.zeros_like(hof), np.full(k, -np.inf, np.float32)
      got = indices(jnp.asarray(hof), jnp.asarray(hof_fit), jnp.asarray(pool[pi]),
                    jnp.asarray(pool_fit[pi]), valid)
      want = _reference_hall_of_fame(hof, hof_fit, pool[pi], pool_fit[pi], valid)
      np.testing.assert_array_equal(np.asarray(got), want, err_msg=f"k={k} p={p} case={case}")
  # The operator alone (the GA always has P > K): fewer newcomers than members, a placeholder
  # equal to a real newcomer (all bits False) at its fitness, NaN and -0.0 fitness.
  indices = jax.jit(lambda *a: ops.hall_of_fame_indices(*a), static_argnums=4)
  zero, one = np.zeros(9, bool), np.ones(9, bool)
  cases = [(np.stack([zero, one, zero, one]), np.full(4, -np.inf, np.float32), zero[None],
            np.asarray([-np.inf], np.float32), False),
           (np.stack([zero, one, one]), np.asarray([1.0, np.nan, 0.0], np.float32),
            np.stack([zero, one, zero]), np.asarray([np.nan, -0.0, 1.0], np.float32), True)]
  for hof, hof_fit, pop, fit, valid in cases:
    got = indices(jnp.asarray(hof), jnp.asarray(hof_fit), jnp.asarray(pop), jnp.asarray(fit),
                  valid)
    np.testing.assert_array_equal(np.asarray(got),
                                  _reference_hall_of_fame(hof, hof_fit, pop, fit, valid))


def test_operators_name_chromosomes_of_other_lengths():
  """Parents or a population of another width than the members failed with JAX's own
  broadcasting or concatenation errors, which name neither the operator nor the shapes."""
  u = jnp.asarray([0.1, 0.5])
  with pytest.raises(ValueError, match=r"one_point_crossover.*\(6,\) and \(5,\)"):
    ops.one_point_crossover(u, jnp.ones(6, bool), jnp.ones(5, bool), 1.0)
  hof, pop = jnp.ones((2, 6), bool), jnp.ones((4, 5), bool)
  with pytest.raises(ValueError, match=r"update_hall_of_fame.*\(2, 6\), \(2,\), \(4, 5\) and "
                     r"\(4,\)"):
    ops.update_hall_of_fame(hof, jnp.zeros(2), pop, jnp.zeros(4))
  with pytest.raises(ValueError, match=r"update_hall_of_fame.*\(4, 6\) and \(3,\)"):
    ops.update_hall_of_fame(hof, jnp.zeros(2), jnp.ones((4, 6), bool), jnp.zeros(3))
  got, fit = ops.update_hall_of_fame(hof, jnp.zeros(2), jnp.ones((4, 6), bool), jnp.ones(4))
  assert got.shape == (2, 6) and fit.shape == (2,)
