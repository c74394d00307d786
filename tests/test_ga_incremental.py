"""Incremental GA fitness (jaxprune.ga.incremental) against the full evaluation."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune import ga
from conftest import host_f32

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
    # tiny budgets: delta overflow, and several full-evaluation passes per generation
    "tight": I.Plan(split=U // 2, delta_slots=1, full_slots=1),
    # halves of unequal width
    "ragged": I.Plan(split=23, delta_slots=3, full_slots=2),
    # two delta budgets: generations with at most one pair per half take the smaller
    "two_sizes": I.Plan(split=U // 2, delta_slots=4, full_slots=3, delta_sizes=(1,)),
    # several sizes of both budgets
    "levels": I.Plan(split=U // 2, delta_slots=5, full_slots=4, delta_sizes=(1, 2, 4),
                     full_sizes=(1, 3)),
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
  # The path is chosen on the host and run_scan is called while tracing, so each search is
  # only traced (jax.eval_shape: nothing compiles), with a population size of its own per call
  # so that it is traced afresh, without clearing every other test's compiled programs.
  for size, (incremental, used) in zip((12, 14, 16), ((False, 0), (True, 1), ("auto", 0))):
    cfg = ga.GAConfig(population_size=size, hof_size=2, generations=2)   # U=60 < MIN_UNITS
    calls.clear()
    out = jax.eval_shape(lambda: ga.search(  # pylint: disable=cell-var-from-loop
        model, params, x, y, "hidden_0", key=jax.random.key(0), config=cfg, progress=False,
        incremental=incremental))
    assert len(calls) == used, incremental
    assert out.mask.shape == (U,)
  with pytest.raises(ValueError, match="incremental must be"):
    ga.make_fitness(model, "hidden_0", incremental="yes")


def test_lineage_reproduces_breed():
  """breed_with_lineage makes breed's children, and its lineage explains unmutated ones."""
  cfg = ga.GAConfig(population_size=21, hof_size=2, generations=1)  # odd number of children
  pop = jax.random.bernoulli(jax.random.key(0), 0.5, (21, 17))
  state = S.init(cfg, 17)._replace(population=pop, generation=jnp.int32(1),
                                   fitness=jax.random.normal(jax.random.key(1), (21,)))
  lineage = jax.jit(functools.partial(I.breed_with_lineage, cfg, hyper=ga.GAHyperparams()))
  breed = jax.jit(functools.partial(ga.breed, cfg, hyper=ga.GAHyperparams()))
  for seed in range(5):
    k = jax.random.key(100 + seed)
    lin = lineage(state, key=k)
    bred = breed(state, key=k)
    np.testing.assert_array_equal(np.asarray(lin.children), np.asarray(bred[:19]))
    tail = jnp.arange(17)[None, :] >= lin.cut[:, None]
    expect = jnp.where(tail, pop[lin.second], pop[lin.first])
    same = np.asarray(jnp.all(expect == lin.children, axis=1))
    mutated = np.asarray(lin.mutated)
    assert np.all(same | mutated) and not np.any(same & mutated)
    assert not bool(lin.crossed[-1])   # the odd last child is a copy of its parent


def test_accuracy_from_logits_matches_argmax_with_ties_and_nan():
  y = jnp.array([0, 1, 2, 1, 0])
  b = jnp.array([0.0, 0.5, -0.5])
  z = jnp.array(np.random.default_rng(0).integers(-2, 3, (4, 3, 5)), jnp.float32)
  z = z.at[1, 2, 3].set(jnp.nan).at[2, :, 0].set(1.0).at[3, :, 1].set(-b)   # NaN; exact ties
  want = 100.0 * jnp.mean((jnp.argmax(z + b[None, :, None], axis=1) == y[None]).astype(
      jnp.float32), 1)
  np.testing.assert_array_equal(np.asarray(I.accuracy_from_logits(b, y, z)), np.asarray(want))


def test_plan_sizes():
  p = I.plan(1000, 100, 5, 1100, 7)
  assert p.split == 500
  # 47 pairs, each crossed, not both mutated and with its shorter side on a given half with
  # probability 0.8 * (1 - 0.2**2) / 2: 18.0 + 1 sd; 95 children, each mutated with
  # probability 0.2: 19 + 1 sd.
  assert (p.delta_slots, p.full_slots) == (23, 24)
  # Large products: five sizes of each budget, from an eighth of the deltas (a converged
  # generation, where most children copy an individual) and a quarter of the batch.
  assert (p.delta_sizes, p.full_sizes) == ((3, 8, 13, 18), (6, 10, 15, 20))
  # Small products (each size is a program to compile): two delta budgets, one batch size.
  small = I.plan(60, 30, 3, 96, 4)
  assert (small.delta_sizes, small.full_sizes) == ((1,), ())
  assert I.plan(8, 10, 2, 96, 4).delta_sizes == ()      # too few slots to split
  assert I._sizes(1, 4, 5) == (1, 2, 3) and I._sizes(3, 3, 5) == ()  # pylint: disable=protected-access
  # Logits over the memory limit: no plan (full evaluation).
  assert I.plan(1000, 100, 5, 1100, 7, memory_limit=4 * 100 * 1100 * 8) is not None
  assert I.plan(1000, 100, 5, 1100, 7, memory_limit=4 * 100 * 1100 * 8 - 1) is None
  assert I.plan(1, 100, 5, 10, 2) is None


@pytest.mark.parametrize("name", sorted(PLANS))
def test_child_logits_rows_match_full_products(name):
  """One generation: every child row not flagged for a full evaluation (and every row after
  the fallback) equals its full product to float rounding; the hall-of-fame rows are copied."""
  _, _, _, _, fit, data = _problem()
  h, w, b, y = fit.incremental_data(data)
  arr = I.arrays(h, w, b, y)
  cfg = ga.GAConfig(population_size=30, hof_size=3, generations=1)
  rng = np.random.default_rng(0)
  plan = PLANS[name]
  # Compiled once each (eager, every operation would compile a program of its own); the
  # arrays are closed over (their any_off is a static bool).
  full_logits = jax.jit(lambda p: I.full_logits(arr, p))
  lineage = jax.jit(functools.partial(I.breed_with_lineage, cfg, hyper=ga.GAHyperparams()))
  child_logits = jax.jit(lambda *r: I.child_logits(plan, arr, *r))
  fallback = jax.jit(lambda *r: I._full_fallback(plan, arr, *r))  # pylint: disable=protected-access
  overflowed = copies = 0
  for seed in range(6):
    pop = jnp.asarray(rng.random((30, U)) < 0.5)
    state = S.init(cfg, U)._replace(population=pop, generation=jnp.int32(1),
                                    fitness=host_f32(rng.normal(size=30)))
    z = full_logits(pop)
    hof_rows = jnp.asarray(rng.permutation(30)[:3])
    lin = lineage(state, key=jax.random.key(seed))
    out, need_full = child_logits(pop, z, lin, hof_rows)
    want = full_logits(lin.children)
    ok = ~np.asarray(need_full)
    np.testing.assert_allclose(np.asarray(out[:27])[ok], np.asarray(want)[ok], atol=2e-5)
    np.testing.assert_array_equal(np.asarray(out[27:]), np.asarray(z[hof_rows]))
    done = fallback(out, lin.children, need_full)
    np.testing.assert_allclose(np.asarray(done[:27]), np.asarray(want), atol=2e-5)
    np.testing.assert_array_equal(np.asarray(done[27:]), np.asarray(z[hof_rows]))
    # Flagged: exactly the mutated children and both children of each crossed pair (not both
    # mutated or copies) beyond the first delta_slots pairs of its half; never a copy (a child
    # equal to an individual of the population, which takes its logits).
    mutated = np.asarray(lin.mutated)
    kids = np.asarray(lin.children)
    copied = (kids[:, None, :] == np.asarray(pop)[None, :, :]).all(-1).any(-1)
    served = mutated | copied
    crossed, cut = np.asarray(lin.crossed)[0:26:2], np.asarray(lin.cut)[0:26:2]
    need = crossed & ~(served[0:26:2] & served[1:26:2])
    over = np.zeros(13, bool)
    for side in (need & (cut < plan.split), need & (cut >= plan.split)):
      over |= side & (np.cumsum(side) > plan.delta_slots)
    want_flags = mutated.copy()
    want_flags[:26] |= np.repeat(over, 2)
    np.testing.assert_array_equal(np.asarray(need_full), want_flags & ~copied)
    overflowed += int(over.sum())
    copies += int(copied.sum())
  if name == "tight":   # the overflow path is exercised
    assert overflowed > 0
  assert copies > 0       # and children that copy an individual


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_auto_is_full_evaluation_off_cpu(monkeypatch, backend):
  """'auto' elsewhere than on CPU: the full evaluation, however long the run (on an H200 it
  was 3x faster over the published run, see docs/benchmarks.md); True still opts in."""
  model = jaxprune.MLP(in_features=5, hidden=(300,), out_features=O)
  monkeypatch.setattr(I.jax, "default_backend", lambda: backend)
  assert not I.applies(ga.make_fitness(model, "hidden_0", "eq5"), None, 300, work=1e30)
  assert I.applies(ga.make_fitness(model, "hidden_0", "eq5", incremental=True), None, 300)


def test_auto_on_cpu_needs_enough_work(monkeypatch):
  """'auto' on CPU: incremental only for runs whose full evaluation would cost >= CPU_MIN_WORK."""
  model = jaxprune.MLP(in_features=5, hidden=(300,), out_features=O)
  auto = ga.make_fitness(model, "hidden_0", "eq5")
  monkeypatch.setattr(I.jax, "default_backend", lambda: "cpu")
  assert not I.applies(auto, None, 300, work=None)
  assert not I.applies(auto, None, 300, work=I.CPU_MIN_WORK / 2)
  assert I.applies(auto, None, 300, work=I.CPU_MIN_WORK)
  assert not I.applies(auto, None, I.MIN_UNITS - 1, work=I.CPU_MIN_WORK)
  assert I.applies(ga.make_fitness(model, "hidden_0", "eq5", incremental=True), None, 300)
  assert not I.applies(ga.make_fitness(model, "hidden_0", "eq5", incremental=False), None, 300,
                       work=I.CPU_MIN_WORK)
  # The run's work: 2 (G + 1) P U N O.
  loop = importlib.import_module("jaxprune.ga.loop")
  params = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (N, 5))
  data = auto.prepare(params, x, jnp.zeros((N,), jnp.int32))
  cfg = ga.GAConfig(population_size=30, hof_size=3, generations=20)
  work = loop.full_work(cfg, *auto.incremental_data(data)[:2])
  assert work == 2.0 * 21 * 30 * 300 * N * O


def test_vmapped_incremental_runs_equal_one_at_a_time():
  """jit(vmap(ga.run)) with incremental fitness over keys and lambdas == each run alone."""
  _, _, _, _, fit, data = _problem()
  cfg = ga.GAConfig(population_size=20, hof_size=2, generations=8)
  keys = jax.random.split(jax.random.key(7), 3)
  lams = jnp.asarray([0.0, 5.0, 20.0])

  def one(k, lam):
    return ga.run(cfg, fit, U, key=k, data=data, hyper=ga.GAHyperparams(lam=lam),
                  progress=False, shard=False)

  batched = jax.jit(jax.vmap(one))(keys, lams)
  for i in range(3):
    alone = one(keys[i], lams[i])
    for u, v in zip(jax.tree.leaves(alone), jax.tree.leaves(batched)):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v)[i])


def test_history_identical_to_full_run_on_small_populations():
  """The generation statistics are summed in one fixed order, so the incremental and the full
  run agree on ``history.mean`` too (they differed by one ulp in 7 of 12 of these seeds when
  the mean was a plain reduction compiled into two different programs)."""
  ordered_sum = importlib.import_module("jaxprune.ga.operators").ordered_sum
  for v in (np.arange(1.0, 2.0), np.arange(1.0, 4.0), np.arange(1.0, 101.0)):
    assert float(ordered_sum(jnp.asarray(v, jnp.float32))) == v.sum()
  m = np.arange(1.0, 22.0).reshape(7, 3)
  np.testing.assert_array_equal(ordered_sum(jnp.asarray(m, jnp.float32)), m.sum(0))
  model = jaxprune.MLP(in_features=3, hidden=(7,), out_features=3)
  cfg = ga.GAConfig(population_size=30, hof_size=1, generations=1, tournament_size=3)
  for s in range(6):
    params = model.init(jax.random.key(s))
    x = jax.random.normal(jax.random.key(s + 1), (33, 3))
    y = jax.random.randint(jax.random.key(s + 2), (33,), 0, 3)
    a, b = [ga.search(model, params, x, y, "hidden_0", key=jax.random.key(s), config=cfg,
                      progress=False, fitness="accuracy", incremental=i) for i in (True, False)]
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@functools.lru_cache(maxsize=None)
def _recorded_and_full_programs(fit, units, population, hof, generations, n, outputs):
  config, hyper = ga.GAConfig(population_size=population, hof_size=hof,
                              generations=generations), ga.GAHyperparams()
  plan = I.plan(units, population, hof, n, outputs)
  record = jax.jit(lambda d, k: I.run_scan(plan, config, fit, units, hyper, d, k,
                                           record=True))
  # data as an argument, as in a run (closed over, its sums fold into constants, and XLA
  # turns a division by a constant into a multiplication: one ulp apart)
  full = jax.jit(jax.vmap(lambda p, d: fit(p, d, hyper), in_axes=(0, None)))
  return record, full


def _recorded_and_full(fit, data, units, population, hof, generations, key):
  """Every individual of an incremental run (recorded) and its full evaluation:
  ``(populations, recorded fitness, full fitness)``; compiled once per setting."""
  record, full = _recorded_and_full_programs(fit, units, population, hof, generations,
                                             data["h"].shape[0], data["w"].shape[-1])
  _, _, (pops, fits) = record(data, key)
  return pops, fits, full(pops, data)


def test_children_without_units_score_the_empty_network_exactly(units=3):
  """Tiny groups breed children with no unit left. Their logits are exactly 0 in the full
  evaluation (the output bias alone: every class tied on a fresh network), but a delta left
  rounding remainders that picked the argmax: a third of all fitness values differed."""
  model = jaxprune.MLP(in_features=5, hidden=(units,), out_features=O)
  params = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (N, 5))
  y = jax.random.randint(jax.random.key(2), (N,), 0, O)
  fit = ga.make_fitness(model, "hidden_0", "eq5", incremental=True)
  data = fit.prepare(params, x, y)
  pops, fits, want = _recorded_and_full(fit, data, units, 30, 3, 20, jax.random.key(0))
  assert int(jnp.sum(~jnp.any(pops, -1))) > 20          # the case occurs
  np.testing.assert_array_equal(np.asarray(fits), np.asarray(want))


def test_patterns_where_every_kept_relu_unit_is_off_score_exactly():
  """A fresh ReLU network (zero output bias) with few units: on many patterns all of a child's
  kept units are off, so the full product's logits there are exactly 0 and every class ties;
  a delta left remainders that picked the argmax (1,194 of 2,440 accuracies differed at U=11).
  The carried count of live units makes those logits exactly 0."""
  units, n = 11, 64
  model = jaxprune.MLP(in_features=6, hidden=(units,), out_features=3, activation="relu")
  params = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (n, 6))
  y = jax.random.randint(jax.random.key(2), (n,), 0, 3)
  fit = ga.make_fitness(model, "hidden_0", "accuracy", incremental=True)
  data = fit.prepare(params, x, y)
  pops, fits, want = _recorded_and_full(fit, data, units, 40, 5, 30, jax.random.key(3))
  h = np.asarray(data["h"])
  off = ~((np.asarray(pops)[..., None, :] & (h != 0)[None, None]).any(-1))   # (G, P, N)
  assert off[np.asarray(pops).any(-1)].sum() > 1000   # common, and not only in empty children
  np.testing.assert_array_equal(np.asarray(fits), np.asarray(want))


def test_an_unknown_nonlinearity_with_zeros_looks_at_the_activations():
  """relu6 written as a clip is identified as 'other': whether activations are 0 is then read
  from the data (a lax.cond), and a readout without bias keeps every all-off pattern exact."""
  units, n = 11, 64
  k = jax.random.split(jax.random.key(3), 4)   # 387 of 1,240 differ if counted as 'kept'
  params = {"w1": 0.3 * jax.random.normal(k[0], (6, units)), "b1": jnp.zeros(units),
            "w2": 0.3 * jax.random.normal(k[1], (units, 3))}
  fn = lambda p, x: jnp.clip(x @ p["w1"] + p["b1"], 0.0, 6.0) @ p["w2"]
  x = jax.random.normal(k[2], (n, 6))
  y = jax.random.randint(k[3], (n,), 0, 3)
  target = jaxprune.trace(fn, params, x)
  fit = ga.make_fitness(target, "w1", "accuracy", incremental=True)
  assert fit.unit_activation() == "other"
  _, fits, want = _recorded_and_full(fit, fit.prepare(params, x, y), units, 40, 5, 30,
                                     jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(fits), np.asarray(want))


def test_live_unit_counts_are_exact_signed_sums():
  h = host_f32(np.random.default_rng(0).normal(size=(20, 9)) * (
      np.random.default_rng(1).random((20, 9)) < 0.5))
  arr = I.arrays(h, jnp.ones((9, 2)), jnp.zeros(2), jnp.zeros(20, jnp.int32))
  weights = jnp.asarray(np.random.default_rng(2).integers(-1, 2, (5, 9)), jnp.int8)
  out = I._product(weights, arr.w, arr.ht, arr.live)   # pylint: disable=protected-access
  assert out.shape == (5, 3, 20)
  np.testing.assert_array_equal(np.asarray(out[:, 2]),
                                np.asarray(weights, np.float32) @ (np.asarray(h) != 0).T)


def test_two_sizes_plan_takes_both_budgets(monkeypatch):
  """The 'two_sizes' plan of the every-generation test really runs both programs: some
  generations need at most one delta per half (the small budget), others more."""
  seen = []
  orig = I._pairs_needing_delta  # pylint: disable=protected-access

  def counted(lin, copied, split):
    need, head = orig(lin, copied, split)
    jax.debug.callback(lambda a, b: seen.append(max(int(a), int(b))),
                       jnp.sum(need & head), jnp.sum(need & ~head))
    return need, head

  monkeypatch.setattr(I, "_pairs_needing_delta", counted)
  _, _, _, _, fit, data = _problem()
  cfg = ga.GAConfig(population_size=30, hof_size=3, generations=20)
  jax.block_until_ready(jax.jit(lambda d, k: I.run_scan(
      PLANS["two_sizes"], cfg, fit, U, ga.GAHyperparams(), d, k))(data, jax.random.key(10)))
  assert min(seen) <= PLANS["two_sizes"].delta_sizes[0] < max(seen)


def test_levels_plan_takes_several_sizes_of_both_budgets(monkeypatch):
  """The 'levels' plan of the every-generation test really runs several programs of each
  budget: the generations' indices into delta_sizes and full_sizes vary."""
  seen = {}
  orig = I._fitting  # pylint: disable=protected-access

  def recorded(sizes, count):
    index = orig(sizes, count)
    jax.debug.callback(lambda i: seen.setdefault(sizes, set()).add(int(i)), index)
    return index

  monkeypatch.setattr(I, "_fitting", recorded)
  _, _, _, _, fit, data = _problem()
  cfg = ga.GAConfig(population_size=30, hof_size=3, generations=20)
  plan = PLANS["levels"]
  jax.block_until_ready(jax.jit(lambda d, k: I.run_scan(
      plan, cfg, fit, U, ga.GAHyperparams(), d, k))(data, jax.random.key(10)))
  assert len(seen[plan.delta_sizes + (plan.delta_slots,)]) >= 3
  assert len(seen[plan.full_sizes + (plan.full_slots,)]) >= 2


def test_switch_max_takes_one_branch_for_every_member_under_vmap():
  """Unbatched: lax.switch. Batched index: the branch of the largest index for every member
  (a plain lax.switch would pick member by member, by running every branch)."""
  branches = [lambda x, d, k=k: x + k * d for k in (1, 2, 3)]
  f = lambda i, x, d: I.switch_max(i, branches, x, d)
  x = jnp.asarray([10.0, 20.0])
  assert [float(f(i, 1.0, 2.0)) for i in range(3)] == [3.0, 5.0, 7.0]
  np.testing.assert_array_equal(jax.vmap(f)(jnp.asarray([0, 0]), x, x / 10), [11, 22])
  np.testing.assert_array_equal(jax.vmap(f)(jnp.asarray([0, 2]), x, x / 10), [13, 26])
  # an unbatched index and a broadcast operand keep their meaning
  np.testing.assert_array_equal(jax.vmap(f, in_axes=(None, 0, None))(1, x, 1.0), [12, 22])
  np.testing.assert_array_equal(jax.jit(jax.vmap(f, in_axes=(0, 0, None)))(
      jnp.asarray([1, 0]), x, 1.0), [12, 22])
  # nested vmaps reduce over both axes
  i = jnp.asarray([[0, 0], [0, 1]])
  np.testing.assert_array_equal(jax.vmap(jax.vmap(f))(i, jnp.zeros((2, 2)), jnp.ones((2, 2))),
                                2 * jnp.ones((2, 2)))
  np.testing.assert_array_equal(jax.vmap(jax.vmap(f))(i * 0, jnp.zeros((2, 2)),
                                                      jnp.ones((2, 2))), jnp.ones((2, 2)))
  # pytrees pass through; one branch is a plain call
  g = lambda i, t: I.switch_max(i, [lambda t: {"a": t["a"] + 1, "b": t["b"]},
                                    lambda t: {"a": t["a"] - 1, "b": 2 * t["b"]}], t)
  out = jax.vmap(g, in_axes=(0, {"a": 0, "b": None}))(jnp.asarray([0, 1]),
                                                       {"a": x, "b": jnp.ones(3)})
  np.testing.assert_array_equal(out["a"], [9, 19])
  np.testing.assert_array_equal(out["b"], 2 * np.ones((2, 3)))
  assert float(I.switch_max(jnp.asarray(5), branches[:1], 1.0, 2.0)) == 3.0
  assert [int(I._fitting((2, 5, 9), c)) for c in (0, 2, 3, 9, 10)] == [0, 0, 1, 2, 2]  # pylint: disable=protected-access


@pytest.mark.parametrize("name", ["two_sizes", "levels"])
def test_vmapped_runs_with_several_budgets_score_every_individual_exactly(name):
  """Under vmap the budgets are one branch for all runs (see switch_max); every recorded
  fitness of every run still equals its full evaluation."""
  _, _, _, _, fit, data = _problem()
  cfg = ga.GAConfig(population_size=30, hof_size=3, generations=20)
  keys = jax.random.split(jax.random.key(21), 4)
  hyper = ga.GAHyperparams()
  # one lowering serves both the run and the look at its program text
  lowered = jax.jit(jax.vmap(lambda k: I.run_scan(
      PLANS[name], cfg, fit, U, hyper, data, k, record=True))).lower(keys)
  _, _, (pops, fits) = lowered.compile()(keys)
  full = jax.jit(jax.vmap(jax.vmap(lambda p: fit(p, data, hyper))))(pops)
  np.testing.assert_array_equal(np.asarray(fits), np.asarray(full))
  # and the vmapped program branches (stablehlo.case), as the one-run program does, rather
  # than computing every budget and selecting
  text = lowered.as_text()
  assert "custom_vmap" not in text and text.count("stablehlo.case") >= 1


@pytest.mark.parametrize("weights", ["padding", "float"])
def test_weighted_incremental_equals_weighted_full_evaluation(weights):
  """Sample weights (0/1 padding, or arbitrary floats): the incremental run's recorded fitness
  equals the weighted full evaluation's for every individual, bit for bit, and the run
  takes the incremental path."""
  model, params, x, y, _, _ = _problem()
  w = (np.r_[np.ones(N - 17), np.zeros(17)] if weights == "padding" else
       np.asarray(jax.random.uniform(jax.random.key(3), (N,), minval=0.0, maxval=3.0)))
  fit = ga.AccuracyFitness(model, "hidden_0", "ratio", fast=True, weighted=True,
                           incremental=True)
  data = fit.prepare(params, x, y, sample_weight=jnp.asarray(w, jnp.float32))
  assert len(fit.incremental_data(data)) == 5
  for seed in range(2):
    pops, fits, full = _recorded_and_full(fit, data, U, 30, 3, 15, jax.random.key(seed))
    np.testing.assert_array_equal(np.asarray(fits), np.asarray(full))
  # a weight-0 pattern does not count: the padded data score as the unpadded ones
  if weights == "padding":
    plain = ga.AccuracyFitness(model, "hidden_0", "ratio", fast=True, incremental=True)
    real = plain.prepare(params, x[:N - 17], y[:N - 17])
    np.testing.assert_allclose(np.asarray(plain(pops[-1], real, ga.GAHyperparams())),
                               np.asarray(fits[-1]), rtol=1e-6)
  loop = importlib.import_module("jaxprune.ga.loop")
  cfg = ga.GAConfig(population_size=30, hof_size=3, generations=3)
  assert loop._incremental_plan(cfg, fit, U, None, data) is not None  # pylint: disable=protected-access


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "linear"])
def test_exact_zero_activations_of_smooth_units_score_exactly(activation):
  """tanh(0) on sparse inputs and a pruned kernel, a saturated sigmoid (float32 0 below about
  -104), a linear unit: activations exactly 0 on every kept unit of a pattern make the full
  product's logits exactly 0 there. The carried kept-unit count would leave that pattern to a
  delta's remainders (a user audit: 24 of 1,890 fitness values differed for tanh); such runs
  count the live units from the bits."""
  units, n, o = 8, 96, 4
  model = jaxprune.MLP(in_features=8, hidden=(units,), out_features=o, activation=activation)
  params = model.init(jax.random.key(0))
  k = jax.random.split(jax.random.key(9), 3)
  kernel = params["params"]["hidden_0"]["kernel"]
  sparse = jax.random.uniform(k[0], (8, units)) < 0.3
  x = (jax.random.uniform(k[1], (n, 8)) < 0.25).astype(jnp.float32)
  if activation == "sigmoid":   # saturated: pre-activations -200 (exactly 0) or >= 100 (1)
    params["params"]["hidden_0"]["kernel"] = 300.0 * sparse
    params["params"]["hidden_0"]["bias"] = jnp.full((units,), -200.0)
  else:
    params["params"]["hidden_0"]["kernel"] = kernel * sparse
  y = jax.random.randint(k[2], (n,), 0, o)
  fit = ga.make_fitness(model, "hidden_0", "accuracy", incremental=True)
  data = fit.prepare(params, x, y)
  assert fit.unit_activation() == activation and bool(jnp.any(data["h"] == 0))
  for seed in range(2):
    _, fits, want = _recorded_and_full(fit, data, units, 30, 3, 20, jax.random.key(seed))
    np.testing.assert_array_equal(np.asarray(fits), np.asarray(want))
  if activation != "tanh":   # a whole search once (each compiles two programs)
    return
  # and a search returns what the full evaluation returns (it did not: another mask)
  cfg = ga.GAConfig(population_size=30, hof_size=3, generations=20)
  a, b = [ga.search(model, params, x, y, "hidden_0", key=jax.random.key(1), config=cfg,
                    progress=False, fitness="accuracy", incremental=i) for i in (True, False)]
  np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
  assert float(a.fitness) == float(b.fitness)


def test_vmap_over_no_runs_gives_empty_results():
  """switch_max under a vmap of size 0 (an empty batch of keys) takes branch 0."""
  _, _, _, _, fit, data = _problem()
  cfg = ga.GAConfig(population_size=30, hof_size=3, generations=3)
  state, history = jax.vmap(lambda k: ga.run(cfg, fit, U, key=k, data=data, progress=False,
                                             shard=False))(jax.random.split(jax.random.key(0), 0))
  assert state.hof.shape == (0, 3, U) and history.best.shape == (0, 4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_params_below_32_bits_take_the_full_evaluation(dtype):
  """bfloat16 / float16 params: the logits of the fast path round to 8 (11) bits, once in the
  full product but again at every ``z_parent + delta``, so the incremental run scored
  individuals differently and returned other masks (here: fitness 28.6875 against 30.25 for
  bfloat16, and histories that parted ways). Such runs take the full evaluation, also with
  incremental=True, and run_scan itself refuses them."""
  units = 40
  model = jaxprune.MLP(in_features=6, hidden=(units,), out_features=5, activation="relu")
  params = jax.tree.map(lambda a: a.astype(dtype), model.init(jax.random.key(9)))
  x = jax.random.normal(jax.random.key(109), (64, 6), dtype)
  y = jax.random.randint(jax.random.key(209), (64,), 0, 5)
  cfg = ga.GAConfig(population_size=20, hof_size=2, generations=8)
  kw = dict(key=jax.random.key(9), config=cfg, progress=False,
            hyper=ga.GAHyperparams(lam=2.0))
  a = ga.search(model, params, x, y, "hidden_0", incremental=True, **kw)
  b = ga.search(model, params, x, y, "hidden_0", incremental=False, **kw)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  # the reported fitness is the reported accuracy's (eq. 5)
  assert float(a.fitness) == pytest.approx(100 * float(a.accuracy) - 2.0 * int(a.kept) / units,
                                           abs=1e-4)
  fit = ga.make_fitness(model, "hidden_0", "eq5", incremental=True)
  data = fit.prepare(params, x, y)
  loop = importlib.import_module("jaxprune.ga.loop")
  assert not loop.uses_incremental(cfg, fit, units, None, data)
  assert not I.exact_dtype(data["h"], data["w"])
  assert I.exact_dtype(data["h"].astype(jnp.float32), data["w"])   # float32 logits: exact
  with pytest.raises(ValueError, match=r"at least 32 bits.*cast params and inputs to float32"):
    I.run_scan(I.plan(units, 20, 2, 64, 5), cfg, fit, units, ga.GAHyperparams(), data,
               jax.random.key(0))
