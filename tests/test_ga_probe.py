"""The GA as an outside user drives it: a NumPy reference of the documented algorithm, fitness
functions of one's own (also sharded over forced CPU devices), and settings the GA cannot use."""

import importlib
import inspect
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune import ga


# ----------------------------------------------------------------------------- NumPy reference


def _ref_hall_of_fame(hof, hof_fit, valid, pop, fit, k):
  """docs/ga-reference.md, step 2.5: the K fittest distinct chromosomes among the members and
  the new population, best first; members ahead of newcomers on equal fitness, then lower
  population index; too few distinct ones: the best duplicates, each after the distinct members
  of its fitness. Placeholders (before the first update) are never candidates."""
  cands = ([(hof[i], hof_fit[i]) for i in range(len(hof))] if valid else []) + [
      (pop[i], fit[i]) for i in range(len(pop))]
  seen, distinct, dups = set(), [], []
  for order, (c, f) in enumerate(cands):
    key = (c.tobytes(), float(f))
    (dups if key in seen else distinct).append((order, c, float(f), key in seen))
    seen.add(key)
  rank = lambda t: (-t[2], t[0])
  chosen = sorted(distinct, key=rank)[:k]
  chosen += sorted(dups, key=rank)[:k - len(chosen)]
  chosen.sort(key=lambda t: (-t[2], t[3], t[0]))
  return (np.stack([t[1] for t in chosen]), np.array([t[2] for t in chosen], np.float32))


def _ref_ga(cfg, hyper, units, key, score):
  """The documented GA step by step, in NumPy, on the documented draws: generation g's key is
  ``split(key, G + 1)[g]``; generation 0 is ``bernoulli(keys[0], 0.5, (P, U))``; a generation
  draws ``uniform(keys[g], (n*T + 2*(n//2) + n*(1+U),))`` (n = P - K) and reads it as
  tournaments (n, T), crossovers (n//2, 2), mutations (n, 1 + U). Returns the last population,
  its fitness, the hall of fame, its fitness and the best fitness of every generation."""
  p, k, t, g_max = (cfg.population_size, cfg.hof_size, cfg.tournament_size, cfg.generations)
  keys = jax.random.split(key, g_max + 1)
  pop = np.asarray(jax.random.bernoulli(keys[0], 0.5, (p, units)))
  hof, hof_fit, valid, best = np.zeros((k, units), bool), np.full(k, -np.inf, np.float32), False, []
  fit = None
  for g in range(g_max + 1):
    if g > 0:
      n, half = p - k, (p - k) // 2
      d = np.asarray(jax.random.uniform(keys[g], (n * t + 2 * half + n * (1 + units),)))
      sel = d[:n * t].reshape(n, t)
      cx = d[n * t:n * t + 2 * half].reshape(half, 2)
      mu = d[n * t + 2 * half:].reshape(n, 1 + units)
      parents = []
      for i in range(n):
        drawn = np.minimum(np.floor(sel[i] * np.float32(p)).astype(int), p - 1)
        winner = drawn[0]
        for j in drawn[1:]:            # the fittest; ties: the first drawn
          if fit[j] > fit[winner]:
            winner = j
        parents.append(pop[winner].copy())
      kids = [q.copy() for q in parents]
      for i in range(half):
        a, b = parents[2 * i], parents[2 * i + 1]
        if cx[i, 0] < hyper.crossover_prob and units > 1:
          cut = 1 + min(int(np.floor(cx[i, 1] * np.float32(units - 1))), units - 2)
          kids[2 * i] = np.concatenate([a[:cut], b[cut:]])
          kids[2 * i + 1] = np.concatenate([b[:cut], a[cut:]])
      for i in range(n):
        if mu[i, 0] < hyper.mutation_prob:
          kids[i] = kids[i] ^ (mu[i, 1:] < hyper.bit_flip_prob)
      pop = np.concatenate([np.stack(kids), hof])
    fit = np.asarray(score(pop), np.float32)
    fit = np.where(np.isnan(fit), -np.inf, fit).astype(np.float32)
    hof, hof_fit = _ref_hall_of_fame(hof, hof_fit, valid, pop, fit, k)
    valid = True
    best.append(hof_fit[0])
  return pop, fit, hof, hof_fit, np.array(best, np.float32)


def _integer_score(weights, nan_rule):
  """A fitness with many exact ties (integer sums, exact in float32), optionally NaN for some
  individuals; as a NumPy function and as ga.run's ``(population, data, hyper)``."""
  def np_score(pop):
    f = (pop * weights).sum(1).astype(np.float32)
    return np.where(pop[:, 0] & (pop.sum(1) % 2 == 0), np.nan, f) if nan_rule else f

  def jax_score(pop, data, hyper):
    del hyper
    f = jnp.sum(pop * data, axis=1).astype(jnp.float32)
    return jnp.where(pop[:, 0] & (pop.sum(1) % 2 == 0), jnp.nan, f) if nan_rule else f

  return np_score, jax_score


@pytest.mark.parametrize("units, pop, hof, tour, gens, probs, nan_rule", [
    (17, 9, 2, 3, 4, (0.8, 0.2, 0.1), True),     # the published rates, NaN scores
    (5, 6, 3, 1, 3, (1.0, 1.0, 0.5), False),     # every pair crossed, every child mutated
    (1, 4, 3, 4, 3, (0.8, 0.2, 0.1), False),     # one unit: fewer distinct chromosomes than K
])
def test_run_follows_the_documented_algorithm_exactly(units, pop, hof, tour, gens, probs,
                                                      nan_rule):
  cfg = ga.GAConfig(population_size=pop, hof_size=hof, tournament_size=tour, generations=gens)
  hyper = ga.GAHyperparams(*probs, lam=0.0)
  weights = np.random.default_rng(units).integers(-2, 3, units).astype(np.float32)
  np_score, jax_score = _integer_score(weights, nan_rule)
  key = jax.random.key(units + gens)
  want = _ref_ga(cfg, hyper, units, key, np_score)
  state, history = ga.run(cfg, jax_score, units, key=key, data=jnp.asarray(weights),
                          hyper=hyper, progress=False)
  got = (state.population, state.fitness, state.hof, state.hof_fitness, history.best)
  for name, a, b in zip(("population", "fitness", "hof", "hof_fitness", "best"), got, want):
    np.testing.assert_array_equal(np.asarray(a), b, err_msg=name)


# ----------------------------------------------------------------------------- several devices

_SHARDED = """
import jax, jax.numpy as jnp, numpy as np
from jaxprune import ga
assert jax.device_count() == 4
weights = np.asarray([2, 1, -1, 3, 0, 2, -2, 1, 1, 2], np.float32)

def np_relative(pop):              # each score relative to the population's worst
  s = (pop * weights).sum(1).astype(np.float32)
  return s - s.min() + np.float32(pop.shape[0])

def relative(pop, data, hyper):    # the same, as ga.run takes it
  s = jnp.sum(pop * data, axis=1).astype(jnp.float32)
  return s - jnp.min(s) + pop.shape[0]

cfg = ga.GAConfig(population_size=18, hof_size=2, generations=4)   # 18: not a multiple of 4
key = jax.random.key(18)
want = _ref_ga(cfg, ga.GAHyperparams(), 10, key, np_relative)
state, hist = ga.run(cfg, relative, 10, key=key, data=jnp.asarray(weights), progress=False)
assert len(state.hof.sharding.device_set) == 4   # the sharded run
got = (state.population, state.fitness, state.hof, state.hof_fitness, hist.best)
for name, a, b in zip(("population", "fitness", "hof", "hof_fitness", "best"), got, want):
  assert np.array_equal(np.asarray(a), b), (name, np.asarray(a), b)
print("SHARDED_POPULATION_OK")
"""


def test_sharded_run_gives_a_population_fitness_the_population_as_it_is():
  """ga.run's fitness (population, data, hyper) may read the population as a whole; sharded over
  4 devices, a population of 18 used to reach it padded with 2 all-False rows, which moved every
  score of a population-relative fitness (other values, other selections than one device)."""
  script = (textwrap.dedent(inspect.getsource(_ref_hall_of_fame)) + "\n"
            + textwrap.dedent(inspect.getsource(_ref_ga)) + _SHARDED)
  env = dict(os.environ)
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "SHARDED_POPULATION_OK" in proc.stdout


# ----------------------------------------------------------------------------- bad settings


@pytest.fixture(scope="module")
def small():
  model = jaxprune.MLP(in_features=4, hidden=(6,), out_features=3)
  params = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (16, 4))
  y = jax.random.randint(jax.random.key(2), (16,), 0, 3)
  return model, params, x, y


CFG = ga.GAConfig(population_size=6, hof_size=2, generations=1)


def test_prepare_refuses_the_data_search_refuses(small):
  """ga.run on fit.prepare(...) data scored labels beyond the model's classes and NaN inputs
  (a plausible fitness, no flag), where ga.search refuses them before compiling."""
  model, params, x, y = small
  fit = ga.make_fitness(model, "hidden_0", "eq5")
  with pytest.raises(ValueError, match=r"labels range over \[0, 7\] but the model has 3"):
    fit.prepare(params, x, y.at[0].set(7))
  with pytest.raises(ValueError, match="x holds 2 NaN or infinite values"):
    fit.prepare(params, x.at[0, :2].set(jnp.nan), y)
  data = fit.prepare(params, x, y)                       # good data: as before
  assert data["h"].shape == (16, 6) and data["y"].shape == (16,)


@pytest.mark.parametrize("lam", [1e39, np.float64(1e300)])
def test_lam_beyond_float32_is_refused_before_running(small, lam):
  """A lam finite in float64 but infinite in float32 (where the GA computes) used to pass the
  host check and return a NaN, invalid result; it is refused like an infinite lam. 1e38 still
  runs, with a finite penalty."""
  model, params, x, y = small
  kw = dict(key=jax.random.key(3), config=CFG, progress=False)
  with pytest.raises(ValueError, match=r"lam=.*finite here but not in float32.*below 3\.4e38"):
    ga.search(model, params, x, y, "hidden_0", hyper=ga.GAHyperparams(lam=lam), **kw)
  with pytest.raises(ValueError, match=r"not in float32"):
    ga.run(CFG, lambda pop, d, h: pop.sum(1).astype(jnp.float32), 6, key=jax.random.key(0),
           hyper=ga.GAHyperparams(lam=lam), progress=False)
  res = ga.search(model, params, x, y, "hidden_0", hyper=ga.GAHyperparams(lam=1e38), **kw)
  kept = int(res.kept)
  assert not bool(res.invalid)
  # the fitness of eq. 5 by hand: accuracy % - lam * kept / U, finite
  masked = jaxprune.apply_masks(params, jaxprune.expand(params, model, {"hidden_0": res.mask},
                                                        allow_empty=True))
  acc = 100.0 * np.mean(np.asarray(model.apply(masked, x)).argmax(-1) == np.asarray(y))
  assert float(res.fitness) == pytest.approx(acc - 1e38 * kept / 6, rel=1e-6)


@pytest.mark.parametrize("fn, message", [
    (lambda p, m: (jnp.sum(m), 1.0), "returned a tuple of 2 values"),
    (lambda p, m: None, "returned None"),
    (lambda p, m: jnp.sum(m) + 1j, "returned dtype complex64.*jnp.real"),
    (lambda p, m: m.astype(jnp.float32), r"returned shape \(6,\)"),
])
def test_a_fitness_function_that_does_not_return_one_real_number_is_named(small, fn, message):
  """A tuple or None used to be reported as 'returned shape ()', and a complex score was cast to
  float32 silently (its imaginary part dropped, with a ComplexWarning)."""
  model, params, _, _ = small
  with pytest.raises(ValueError, match=message):
    ga.search(model, params, None, None, "hidden_0", key=jax.random.key(3), config=CFG,
              fitness=fn, progress=False)


@pytest.mark.parametrize("fast_path", ["yes", 1, None])
def test_a_bad_fast_path_is_refused_with_a_fitness_function_too(small, fast_path):
  """fast_path='yes' (or 1, None) was refused with the built-in fitness but silently ignored
  with a fitness function of one's own."""
  model, params, _, _ = small
  with pytest.raises(ValueError, match=r"fast_path must be 'auto', True or False, got"):
    ga.search(model, params, None, None, "hidden_0", key=jax.random.key(3), config=CFG,
              fitness=lambda p, m: jnp.sum(m), fast_path=fast_path, progress=False)


@pytest.mark.parametrize("raw", [False, True])
def test_a_batch_of_keys_says_to_vmap_the_search(raw):
  model = jaxprune.MLP(in_features=4, hidden=(6,), out_features=3)
  params = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (20, 4))
  y = jax.random.randint(jax.random.key(2), (20,), 0, 3)
  keys = jax.random.split(jax.random.PRNGKey(3) if raw else jax.random.key(3), 2)
  with pytest.raises(ValueError, match=r"ga.search takes one key, got a batch of keys of shape "
                     r"\(2,\); for several runs, vmap"):
    ga.search(model, params, x, y, "hidden_0", key=keys, progress=False,
              config=ga.GAConfig(population_size=6, generations=1))


# ----------------------------------------------------------------------------- history


_INF, _NAN = float("inf"), float("nan")


@pytest.mark.parametrize("in_scan", [False, True])
@pytest.mark.parametrize("row, want", [
    # every fitness +inf (min and mean used to read -inf, below the max of +inf)
    (lambda i: jnp.full(i.shape, _INF), (_INF, _INF, _INF)),
    (lambda i: jnp.full(i.shape, _NAN), (-_INF, -_INF, -_INF)),          # NaN ranks as -inf
    (lambda i: jnp.where(i % 2 == 0, _INF, _NAN), (_INF, -_INF, _NAN)),  # +inf, -inf: no mean
    (lambda i: jnp.where(i == 0, _INF, i.astype(jnp.float32)), (_INF, 1.0, None)),  # 1 .. P-1
])
def test_history_min_and_mean_of_a_generation_without_finite_fitness(monkeypatch, in_scan, row,
                                                                     want):
  """Fitness by population position, the same every generation, so (max, min, mean) are known
  by hand: min and mean over the finite values, over all values where none is finite. Every
  +inf gave a min and mean of -inf, below the max."""
  pop = 8 if in_scan else 7   # another program: not one compiled before the patch
  if in_scan:   # the statistics computed inside the scan, not from the recorded rows
    monkeypatch.setattr(importlib.import_module("jaxprune.ga.loop"), "RECORD_FITNESS_MAX", 0)
  want = want[:2] + ((pop / 2) if want[2] is None else want[2],)   # mean of 1 .. P-1: P / 2
  cfg = ga.GAConfig(population_size=pop, hof_size=2, generations=2)
  fn = lambda population, data, hyper: row(jnp.arange(population.shape[0]))
  _, hist = ga.run(cfg, fn, 5, key=jax.random.key(0), progress=False)
  for name, got, w in zip(("max", "min", "mean"), (hist.max, hist.min, hist.mean), want):
    np.testing.assert_array_equal(np.asarray(got), np.full(3, w, np.float32), err_msg=name)


def test_a_fitness_wider_than_float32_warns_that_the_ga_rounds_it():
  """Scores are float32 throughout the GA: a float64 fitness (under x64) of 1 + 1e-12 * kept
  tied every mask at 1.0 without a word, so the search found nothing; now it warns, and the
  docs say so."""
  model = jaxprune.MLP(in_features=4, hidden=(6,), out_features=3)
  params = model.init(jax.random.key(0))
  cfg = ga.GAConfig(population_size=8, hof_size=2, generations=2)
  with jax.enable_x64(True):
    with pytest.warns(UserWarning, match=r"returns float64; the GA keeps every score as "
                      r"float32.*subtract a large constant"):
      res = ga.search(model, params, None, None, "hidden_0", key=jax.random.key(3), config=cfg,
                      progress=False, fitness=lambda p, m: 1.0 + 1e-12 * jnp.sum(m))
    assert res.fitness.dtype == jnp.float32 and float(res.fitness) == 1.0   # the tie warned of
    # a count (int64 under x64, exact in float32): no warning (warnings are errors here)
    res = ga.search(model, params, None, None, "hidden_0", key=jax.random.key(3),
                    config=cfg, progress=False, fitness=lambda p, m: jnp.sum(m))
  assert int(res.kept) == float(res.fitness)
