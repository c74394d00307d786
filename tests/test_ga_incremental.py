"""Incremental GA fitness (jaxprune.ga.incremental) against the full evaluation."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune import ga

S = importlib.import_module("jaxprune.ga.strategy")
I = importlib.import_module("jaxprune.ga.incremental")

U, N, O = 60, 96, 4


@functools.lru_cache(maxsize=None)
def _problem():
  model = jaxprune.MLP(in_features=5, hidden=(U,), out_features=O)
  params = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (N, 5))
  # Labels from the unmasked network, so that accuracies are far from chance and vary.
  y = jnp.argmax(model.apply(params, x), -1)
  y = jnp.where(jax.random.uniform(jax.random.key(2), (N,)) < 0.3, (y + 1) % O, y)
  fit = ga.make_fitness(model, "hidden_0", "eq5", incremental=True)
  return model, params, x, y, fit, fit.prepare(params, x, y)


@functools.lru_cache(maxsize=None)
def _recorded_run(config, plan):
  _, _, _, _, fit, _ = _problem()
  return jax.jit(lambda d, h, k: I.run_scan(plan, config, fit, U, h, d, k, record=True))


PLANS = {
    # the plan run() would choose
    "default": I.plan(U, 30, 3, N, O),
    # tiny budgets: cut-slot overflow and several full-evaluation passes every generation
    "tight": I.Plan(blocks=6, block_size=10, full_slots=1, cut_slots=1),
    # blocks that do not divide the units (padded last block)
    "ragged": I.Plan(blocks=7, block_size=9, full_slots=3, cut_slots=2),
}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_incremental_equals_full_evaluation_every_generation(name):
  """Every individual of every generation: recorded fitness == full evaluation, exactly."""
  _, _, _, _, fit, data = _problem()
  config = ga.GAConfig(population_size=30, hof_size=3, generations=20)
  full = jax.jit(jax.vmap(lambda p, h: fit(p, data, h), in_axes=(0, None)))
  mismatches, total = 0, 0
  for seed, hyper in enumerate([ga.GAHyperparams(), ga.GAHyperparams(0.5, 0.6, 0.05, 3.0)]):
    state, history, (pops, fits) = _recorded_run(config, PLANS[name])(
        data, hyper, jax.random.key(10 + seed))
    want = full(pops, hyper)
    mismatches += int(jnp.sum(want != fits))
    total += fits.size
    # The hall of fame holds the best recorded individuals.
    assert float(state.hof_fitness[0]) == float(jnp.max(fits))
    assert np.array_equal(np.asarray(history.best), np.maximum.accumulate(np.max(fits, 1)))
  assert total == 2 * 21 * 30
  assert mismatches == 0, f"{mismatches} of {total} fitness values differ"


def test_incremental_run_equals_full_run():
  """The same GA trajectory: state and history equal with incremental on and off."""
  model, params, x, y, _, _ = _problem()
  cfg = ga.GAConfig(population_size=24, hof_size=2, generations=12)
  kw = dict(key=jax.random.key(5), config=cfg, progress=False)
  a = ga.search(model, params, x, y, "hidden_0", incremental=True, **kw)
  b = ga.search(model, params, x, y, "hidden_0", incremental=False, **kw)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


def test_incremental_false_forces_full_evaluation(monkeypatch):
  model, params, x, y, _, _ = _problem()
  calls = []
  real = I.run_scan
  monkeypatch.setattr(I, "run_scan", lambda *a, **k: calls.append(1) or real(*a, **k))
  cfg = ga.GAConfig(population_size=12, hof_size=2, generations=2)
  for incremental, used in ((False, 0), (True, 1), ("auto", 0)):   # U=60 < MIN_UNITS
    calls.clear()
    jax.clear_caches()
    ga.search(model, params, x, y, "hidden_0", key=jax.random.key(0), config=cfg,
              progress=False, incremental=incremental)
    assert len(calls) == used, incremental
  with pytest.raises(ValueError, match="incremental must be"):
    ga.make_fitness(model, "hidden_0", incremental="yes")


def test_lineage_reproduces_breed():
  """breed_with_lineage makes breed's children, and its lineage explains unmutated ones."""
  cfg = ga.GAConfig(population_size=21, hof_size=2, generations=1)  # odd number of children
  pop = jax.random.bernoulli(jax.random.key(0), 0.5, (21, 17))
  state = S.init(cfg, 17)._replace(population=pop, generation=jnp.int32(1),
                                   fitness=jax.random.normal(jax.random.key(1), (21,)))
  for seed in range(5):
    k = jax.random.key(100 + seed)
    lin = I.breed_with_lineage(cfg, state, ga.GAHyperparams(), key=k)
    bred = ga.breed(cfg, state, ga.GAHyperparams(), key=k)
    np.testing.assert_array_equal(np.asarray(lin.children), np.asarray(bred[:19]))
    tail = jnp.arange(17)[None, :] >= lin.cut[:, None]
    expect = jnp.where(tail, pop[lin.second], pop[lin.first])
    same = np.asarray(jnp.all(expect == lin.children, axis=1))
    mutated = np.asarray(lin.mutated)
    assert np.all(same | mutated) and not np.any(same & mutated)
    assert not bool(lin.crossed[-1])   # the odd last child is a copy of its parent


def test_accuracy_from_partials_matches_argmax_with_ties_and_nan():
  plan = I.Plan(blocks=2, block_size=3, full_slots=1, cut_slots=1)
  y = jnp.array([0, 1, 2, 1, 0])
  blk = I._Blocks(ht=None, wb=None, b=jnp.zeros(3), y=y)   # pylint: disable=protected-access
  parts = jnp.array(np.random.default_rng(0).integers(-2, 3, (2, 4, 3, 5)), jnp.float32)
  parts = parts.at[0, 1, 2, 3].set(jnp.nan).at[1, 2, :, 0].set(0.0).at[0, 2, :, 0].set(1.0)
  logits = parts[0] + parts[1]                                    # (Q, O, N)
  want = 100.0 * jnp.mean((jnp.argmax(logits, axis=1) == y[None]).astype(jnp.float32), 1)
  got = I.accuracy_from_partials(blk, parts)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  del plan


def test_plan_sizes():
  p = I.plan(1000, 100, 5, 1100, 7)
  assert (p.blocks, p.block_size) == (11, 91)
  assert p.blocks * p.block_size >= 1000
  # Partial sums over the memory limit: fewer blocks, then none.
  assert I.plan(1000, 100, 5, 1100, 7, memory_limit=4 * 100 * 1100 * 7 * 3).blocks == 3
  assert I.plan(1000, 100, 5, 1100, 7, memory_limit=4 * 100 * 1100 * 7) is None
  assert I.plan(1, 100, 5, 10, 2) is None
