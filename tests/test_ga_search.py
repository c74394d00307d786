"""GA search: eq. 5 / eq. 6 on a hand-checked network, fast path = general path, scan = ask/tell,
determinism, no recompilation, vmap over lambda, NaN handling, progress, bad input."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import as_users_compile, host_f32
import jaxprune
from jaxprune import ga
# The GA module is jaxprune.ga.mask_search (jaxprune.ga.search is the function).
search_lib = importlib.import_module("jaxprune.ga.mask_search")

CFG = ga.GAConfig(population_size=16, hof_size=3, tournament_size=3, generations=6)


def _tree_equal(a, b):
  return all(bool(np.array_equal(x, y, equal_nan=True))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.fixture(scope="module")
def trained():
  """A 10-12-7 sigmoid MLP trained a few Adam steps on separable synthetic data."""
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(7, 10)) * 2
  y = rng.integers(0, 7, size=140)
  x = (centers[y] + rng.normal(size=(140, 10))).astype(np.float32)
  model = jaxprune.MLP(in_features=10, hidden=(12,), out_features=7)
  params = model.init(jax.random.key(0))
  opt = optax.adam(0.05)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply(p, x), y).mean()
    g = jax.grad(loss)(params)
    updates, state = opt.update(g, state)
    return optax.apply_updates(params, updates), state

  for _ in range(60):
    params, state = step(params, state)
  return model, params, jnp.asarray(x), jnp.asarray(y)


@pytest.fixture(scope="module")
def result(trained):
  model, params, x, y = trained
  return ga.search(model, params, x, y, "hidden_0", key=jax.random.key(7), config=CFG,
                   progress=False)


# ----------------------------------------------------------------------------- fitness values


def _hand_network():
  """2-2-2 relu network: h = relu(x), logits = h + [0.1, 0]. Accuracy per mask by hand:
  keep both 100 %, keep unit 0 only 25 %, keep unit 1 only 100 %, keep none 25 %."""
  model = jaxprune.MLP(in_features=2, hidden=(2,), out_features=2, activation="relu")
  eye = jnp.eye(2, dtype=jnp.float32)
  params = {"params": {"hidden_0": {"kernel": eye, "bias": jnp.zeros(2)},
                       "out": {"kernel": eye, "bias": jnp.asarray([0.1, 0.0])}}}
  x = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
  y = jnp.asarray([0, 1, 1, 1])
  pop = jnp.asarray([[1, 1], [1, 0], [0, 1], [0, 0]], bool)
  return model, params, x, y, pop


@pytest.mark.parametrize("fast", [True, False])
def test_eq5_eq6_hand_checked(fast):
  model, params, x, y, pop = _hand_network()
  hyper = ga.GAHyperparams(lam=10.0)
  for penalty, want in [("ratio", [100 - 10, 25 - 5, 100 - 5, 25 - 0]),     # eq. 5
                        ("count", [100 - 20, 25 - 10, 100 - 10, 25 - 0]),   # eq. 6
                        (None, [100, 25, 100, 25])]:
    fit = ga.AccuracyFitness(model, "hidden_0", penalty, fast)
    got = jax.jit(fit)(pop, fit.prepare(params, x, y), hyper)
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_search_finds_the_hand_checked_optimum():
  model, params, x, y, _ = _hand_network()
  cfg = ga.GAConfig(population_size=8, hof_size=2, generations=3)
  res = ga.search(model, params, x, y, "hidden_0", key=jax.random.key(0), fitness="eq5",
                  config=cfg, hyper=ga.GAHyperparams(lam=10.0), progress=False)
  np.testing.assert_array_equal(res.mask, [False, True])
  assert float(res.fitness) == pytest.approx(95.0)
  assert float(res.accuracy) == pytest.approx(1.0)  # a fraction, like evaluate()
  assert int(res.kept) == 1
  # eq. 6 with a large lambda prefers the empty mask (bias-only prediction, 25 %).
  res = ga.search(model, params, x, y, "hidden_0", key=jax.random.key(0), fitness="eq6",
                  config=cfg, hyper=ga.GAHyperparams(lam=100.0), progress=False)
  np.testing.assert_array_equal(res.mask, [False, False])
  assert float(res.fitness) == pytest.approx(25.0)
  assert int(res.kept) == 0


def test_fast_path_equals_general_path(trained):
  model, params, x, y = trained
  pop = jax.random.bernoulli(jax.random.key(1), 0.5, (40, 12))
  pop = pop.at[0].set(False).at[1].set(True)
  fast = ga.AccuracyFitness(model, "hidden_0", "ratio", True)
  slow = ga.AccuracyFitness(model, "hidden_0", "ratio", False)
  hyper = ga.GAHyperparams(lam=25.0)
  f_fast = jax.jit(fast)(pop, fast.prepare(params, x, y), hyper)
  f_slow = jax.jit(slow)(pop, slow.prepare(params, x, y), hyper)
  np.testing.assert_array_equal(f_fast, f_slow)
  assert len(np.unique(np.asarray(f_fast))) > 5   # a real spread of values, not a constant
  full = 100 * float(jnp.mean(jnp.argmax(model.apply(params, x), -1) == y))
  assert float(f_fast[1]) == pytest.approx(full - 25.0)


@pytest.mark.parametrize("fast", [True, False])
def test_sample_weights_padding_and_per_run_penalty(trained, fast):
  model, params, x, y = trained
  pop = jax.random.bernoulli(jax.random.key(2), 0.5, (24, 12))
  hyper = ga.GAHyperparams(lam=25.0)
  n = 100
  xp = jnp.concatenate([x[:n], 3.0 * x[:40]])                  # padding: other patterns
  yp = jnp.concatenate([y[:n], (y[:40] + 1) % 7])
  w = np.r_[np.ones(n), np.zeros(40)].astype(np.float32)
  for penalty in ("ratio", "count"):
    plain = ga.AccuracyFitness(model, "hidden_0", penalty, fast)
    ref = jax.jit(plain)(pop, plain.prepare(params, x[:n], y[:n]), hyper)
    weighted = ga.AccuracyFitness(model, "hidden_0", "per_run", fast, weighted=True)
    got = jax.jit(weighted)(pop, weighted.prepare(params, xp, yp, sample_weight=w,
                                                  penalty=penalty), hyper)
    np.testing.assert_allclose(got, ref, rtol=1e-6)              # the same, to float rounding
  # Fractional weights: the weighted mean of the correct patterns.
  acc = ga.AccuracyFitness(model, "hidden_0", None, fast, weighted=True)
  wf = np.random.default_rng(1).uniform(0, 1, size=x.shape[0]).astype(np.float32)
  got = acc(pop[:3], acc.prepare(params, x, y, sample_weight=wf), hyper)
  for i in range(3):
    wm = jaxprune.expand(params, model, {"hidden_0": pop[i]})
    correct = np.asarray(jnp.argmax(model.apply(jaxprune.apply_masks(params, wm), x), -1) == y)
    assert float(got[i]) == pytest.approx(100 * np.sum(wf * correct) / np.sum(wf), rel=1e-5)
  assert acc.incremental == "auto"     # weighted fitness takes the incremental path too
  if fast:
    assert len(acc.incremental_data(acc.prepare(params, x, y, sample_weight=wf))) == 5
  with pytest.raises(ValueError, match="weighted=True"):
    plain.prepare(params, x, y, sample_weight=wf)
  with pytest.raises(ValueError, match="per_run"):
    plain.prepare(params, x, y, penalty="count")
  with pytest.raises(ValueError, match="per_run"):
    weighted.prepare(params, x, y, sample_weight=wf)


def test_fast_path_applicability():
  deep = jaxprune.MLP(in_features=4, hidden=(5, 6), out_features=3)
  assert ga.fast_path_applies(deep, "hidden_1")
  assert not ga.fast_path_applies(deep, "hidden_0")
  assert ga.make_fitness(deep, "hidden_0").fast is False
  assert ga.make_fitness(deep, "hidden_1").fast is True
  with pytest.raises(ValueError, match="fast_path=True needs"):
    ga.make_fitness(deep, "hidden_0", fast_path=True)


def test_deep_model_general_path_search():
  deep = jaxprune.MLP(in_features=4, hidden=(5, 6), out_features=3)
  params = deep.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (30, 4))
  y = jax.random.randint(jax.random.key(2), (30,), 0, 3)
  cfg = ga.GAConfig(population_size=10, hof_size=2, generations=2)
  res = ga.search(deep, params, x, y, "hidden_0", key=jax.random.key(3), config=cfg,
                  fitness="accuracy", progress=False)
  assert res.mask.shape == (5,)
  masked = jaxprune.apply_masks(params, jaxprune.expand(params, deep, {"hidden_0": res.mask}))
  acc = 100 * float(jnp.mean(jnp.argmax(deep.apply(masked, x), -1) == y))
  assert float(res.fitness) == pytest.approx(acc) == pytest.approx(100 * float(res.accuracy))


def _tanh_hidden(p, x):
  return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


# Readouts of traced functions whose bias is not a (C,) vector: name -> (b2's shape, scale, fn).
# A scalar does not change which class is largest except by rounding: at 5e7 the logits are
# rounded to multiples of 4, so ties decide many patterns and a fast path that left it out (or
# crashed on it) is seen.
_READOUT_BIASES = {
    "vector": ((4,), 2.0, lambda p, x: _tanh_hidden(p, x) + p["b2"]),
    "row": ((1, 4), 2.0, lambda p, x: _tanh_hidden(p, x) + p["b2"]),
    "scalar": ((), 1e8, lambda p, x: _tanh_hidden(p, x) + p["b2"]),
    "column_transposed": ((4, 1), 2.0, lambda p, x: _tanh_hidden(p, x) + p["b2"].T),
    "row_of_a_matrix": ((2, 4), 2.0, lambda p, x: _tanh_hidden(p, x) + p["b2"][1]),
    "flipped": ((4,), 2.0, lambda p, x: _tanh_hidden(p, x) + p["b2"][::-1]),
    "per_pattern": ((60, 4), 2.0, lambda p, x: _tanh_hidden(p, x) + p["b2"]),
    "none": ((4,), 2.0, _tanh_hidden),
    # more than one term after the product: no bias recorded for the GA, read from the function
    "bias_and_flipped": ((4,), 2.0, lambda p, x: _tanh_hidden(p, x) + p["b2"] + p["b2"][::-1]),
    "bias_minus_literal": ((4,), 2.0, lambda p, x: _tanh_hidden(p, x) + p["b2"] - 0.5),
}


@pytest.mark.parametrize("case,incremental",
                         [(c, True) for c in sorted(_READOUT_BIASES)]
                         + [(c, False) for c in ("per_pattern", "row", "scalar")])
def test_readout_bias_of_any_shape_scores_as_the_function(case, incremental):
  """A traced function's readout bias of shape (1, C), () or (C, 1).T (it crashed the fast path,
  or was left out), a row of a larger leaf, a flipped vector (the trace records no bias: it was
  left out) or a per-pattern (N, C) array: the GA's fast path
  (full and incremental evaluation) scores the best mask as the function with the pruned units'
  outgoing weights zeroed does."""
  shape, scale, fn = _READOUT_BIASES[case]
  rng = np.random.default_rng(0)
  params = {"w1": host_f32(rng.normal(size=(6, 10))), "b1": jnp.zeros(10),
            "w2": host_f32(rng.normal(size=(10, 4))),
            "b2": host_f32(scale * rng.normal(size=shape))}
  x = jax.random.normal(jax.random.key(0), (60, 6))
  y = jnp.arange(60) % 4
  t = jaxprune.trace(fn, params, x)
  assert ga.make_fitness(t, "w1").fast
  if case in ("flipped", "scalar"):   # no value per output in its order: not the layer's bias
    assert t.groups["w1"].consumers[0].bias is None   # (a flipped one was, read unflipped)
  res = ga.search(t, params, x, y, "w1", key=jax.random.key(3), fitness="accuracy",
                  config=ga.GAConfig(population_size=16, generations=3), progress=False,
                  incremental=incremental)
  pruned = {**params, "w2": params["w2"] * res.mask[:, None]}
  direct = float(jnp.mean(jnp.argmax(fn(pruned, x), -1) == y))
  masked = jaxprune.apply_masks(params, jaxprune.expand(params, t, {"w1": res.mask}))
  assert float(jnp.mean(jnp.argmax(t.apply(masked, x), -1) == y)) == direct
  assert float(res.fitness) == pytest.approx(100 * direct)       # the fast path's score
  assert float(res.accuracy) == pytest.approx(direct)            # the general path's


def test_a_term_computed_from_the_readout_kernel_or_the_inputs_takes_the_general_path():
  """Terms added after the product are read from the function once, with the readout kernel
  zeroed, so one that depends on the inputs (a skip connection) is left to the general path.
  (One computed from the readout kernel, ``+ w2.sum(0)``, makes the trace refuse the group.)"""
  rng = np.random.default_rng(0)
  params = {"w1": host_f32(rng.normal(size=(6, 10))), "b1": jnp.zeros(10),
            "w2": host_f32(rng.normal(size=(10, 4))), "b2": jnp.zeros(4)}
  x = jax.random.normal(jax.random.key(0), (60, 6))
  for fn in (lambda p, x: _tanh_hidden(p, x) + p["b2"] + x[:, :4],
             lambda p, x: _tanh_hidden(p, x) + x[:, :4] + p["b2"]):
    assert not ga.fast_path_applies(jaxprune.trace(fn, params, x), "w1")
  for fn in (lambda p, x: _tanh_hidden(p, x) + p["b2"] + p["b2"][::-1],
             lambda p, x: _tanh_hidden(p, x) + (p["b2"] + 2 * p["b2"]),
             lambda p, x: _tanh_hidden(p, x) - p["b2"]):
    t = jaxprune.trace(fn, params, x)
    assert ga.fast_path_applies(t, "w1")
    assert t.readout("w1").bias is None   # read from the function, whole


def test_conv_channels_read_through_a_flatten_take_the_general_path():
  """conv -> relu -> flatten -> dense: the dense kernel reads each channel at 16 positions, so
  its rows are not one per unit. The fast path was taken and failed in dot_general ((80,)
  against (5,)), with and without incremental fitness; the general path scores it."""
  rng = np.random.default_rng(0)
  x = host_f32(rng.normal(size=(40, 4, 4, 1)))
  y = np.arange(40) % 3

  def fn(p, x):
    h = jax.nn.relu(jax.lax.conv_general_dilated(
        x, p["c"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["b"])
    return h.reshape(h.shape[0], -1) @ p["w"] + p["bd"]

  params = {"c": host_f32(rng.normal(size=(3, 3, 1, 5))), "b": jnp.zeros(5),
            "w": host_f32(rng.normal(size=(80, 3))), "bd": jnp.zeros(3)}
  t = jaxprune.trace(fn, params, x[:4])
  assert t.readout("c") is None and not ga.fast_path_applies(t, "c")
  cfg = ga.GAConfig(population_size=10, hof_size=2, generations=3)
  ref = ga.search(t, params, x, y, "c", key=jax.random.key(1), config=cfg, progress=False,
                  fast_path=False)
  for incremental in (False, True):
    res = ga.search(t, params, x, y, "c", key=jax.random.key(1), config=cfg, progress=False,
                    incremental=incremental)
    np.testing.assert_array_equal(res.mask, ref.mask)
    assert float(res.fitness) == float(ref.fitness)
  masked = jaxprune.apply_masks(params, jaxprune.expand(params, t, {"c": ref.mask}))
  assert float(ref.accuracy) == pytest.approx(float(np.mean(np.argmax(fn(masked, x), -1) == y)))


def test_readout_bias_brings_a_recorded_bias_to_one_value_per_output():
  """A bias leaf recorded on the readout slice is broadcast (one value) or reshaped (C values
  along one axis) to (C,); any other shape is read from the function, pattern by pattern."""
  fn = lambda p, x: x @ p["w"] + p["b"]
  x = jnp.arange(6.0).reshape(2, 3)
  target = jaxprune.trace(fn, {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}, x)
  s = jaxprune.units.Slice(("w",), axis=0, role="consumer", bias=("b",))
  fitness = importlib.import_module("jaxprune.ga.fitness")
  for b, want in [(jnp.float32(3.0), np.full(4, 3.0)), (jnp.full((1, 1), 2.0), np.full(4, 2.0)),
                  (jnp.arange(4.0)[None], np.arange(4.0)), (jnp.arange(4.0)[:, None],
                                                            np.arange(4.0))]:
    got = fitness.readout_bias(target, {"w": jnp.ones((3, 4)), "b": b}, x, s, 4)
    np.testing.assert_array_equal(got, want)
  per_pattern = jnp.arange(8.0).reshape(2, 4)
  p = {"w": jnp.ones((3, 4)), "b": per_pattern}
  got = fitness.readout_bias(jaxprune.trace(fn, p, x), p, x, s, 4)   # traced with these params
  np.testing.assert_array_equal(got, per_pattern)


# ----------------------------------------------------------------------------- the run


def test_result_is_consistent(trained, result):
  model, params, x, y = trained
  h = result.history
  assert h.max.shape == (CFG.generations + 1,)
  assert np.all(np.diff(np.asarray(h.best)) >= 0)          # HoF best never decreases
  assert np.all(np.asarray(h.max) <= np.asarray(h.best))
  assert float(result.fitness) == float(h.best[-1]) == float(np.max(h.max))
  assert np.all(np.asarray(h.min) <= np.asarray(h.mean))
  assert np.all(np.asarray(h.mean) <= np.asarray(h.max))
  assert int(result.kept) == int(result.mask.sum()) == int(h.best_kept[-1])
  assert float(result.fitness) == pytest.approx(
      100 * float(result.accuracy) - 10.0 * int(result.kept) / 12, abs=1e-4)
  masked = jaxprune.apply_masks(params, jaxprune.expand(params, model,
                                                        {"hidden_0": result.mask}))
  acc = 100 * float(jnp.mean(jnp.argmax(model.apply(masked, x), -1) == y))
  assert 100 * float(result.accuracy) == pytest.approx(acc)


def test_scan_equals_ask_tell_loop(trained, result):
  model, params, x, y = trained
  fit = ga.make_fitness(model, "hidden_0", "eq5")
  data = fit.prepare(params, x, y)
  hyper = ga.GAHyperparams()
  ask = jax.jit(ga.ask, static_argnums=0)
  tell = jax.jit(ga.tell, static_argnums=0)
  evaluate = jax.jit(fit)
  state = ga.init(CFG, 12)
  maxes, bests, pops = [], [], []
  for k in ga.generation_keys(jax.random.key(7), CFG):
    pop = ask(CFG, state, hyper, key=k)
    pops.append(pop)
    state = tell(CFG, state, pop, evaluate(pop, data, hyper))
    maxes.append(float(state.fitness.max()))
    bests.append(float(state.hof_fitness[0]))
  assert _tree_equal(state, result.state)
  np.testing.assert_array_equal(maxes, result.history.max)
  np.testing.assert_array_equal(bests, result.history.best)
  assert int(state.generation) == CFG.generations + 1


def test_elitism_hall_of_fame_is_the_population_tail(result):
  state = result.state
  nxt = jax.jit(ga.breed, static_argnums=0)(CFG, state, ga.GAHyperparams(), key=jax.random.key(0))
  assert nxt.shape == state.population.shape
  np.testing.assert_array_equal(nxt[-CFG.hof_size:], state.hof)


def test_deterministic_and_no_recompilation(trained, result):
  model, params, x, y = trained
  sizes = lambda: [program.active._cache_size() for program in search_lib._SEARCH_JIT.values()]
  size = sizes()
  again = ga.search(model, params, x, y, "hidden_0", key=jax.random.key(7), config=CFG,
                    progress=False)
  assert _tree_equal(again, result)
  other = ga.search(model, jax.tree.map(lambda p: p * 1.01, params), x, y, "hidden_0",
                    key=jax.random.key(8), config=CFG, hyper=ga.GAHyperparams(0.5, 0.3, 0.2, 3.0),
                    progress=False)
  # new key, params, lambda: no retrace
  assert sizes() == size
  assert not np.array_equal(other.state.population, result.state.population)


def _onemax_minus_lam(population, data, hyper):
  del data
  return population.sum(1).astype(jnp.float32) - hyper.lam * population[:, 0]


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="the lighter compile options are XLA:CPU's; elsewhere it is a plain jit")
@pytest.mark.parametrize("incremental", [False, True])
def test_run_compiled_for_faster_compilation_gives_the_default_bits(trained, incremental):
  """The GA's programs compile with XLA:CPU's older loop emitter (jaxprune._compile.FAST),
  the full evaluation's also at LLVM level 1: with those options named (the suite's XLA_FLAGS
  would override them, tests/conftest.py) the run gives the bits, state and history of XLA's
  default options, on the full and on the incremental path; ga.run runs that program."""
  from jaxprune import _compile  # pylint: disable=import-outside-toplevel
  S = importlib.import_module("jaxprune.ga.loop")
  model, params, x, y = trained
  fit = ga.make_fitness(model, "hidden_0", incremental=incremental)
  data = fit.prepare(params, x, y)
  args = (CFG, fit, 12, False, None, ga.GAHyperparams(), data, jax.random.key(5))
  program = S.run_program(CFG, fit, 12, None, data)
  assert program is S._RUN_JIT[incremental]
  assert S.uses_incremental(CFG, fit, 12, None, jax.eval_shape(lambda d: d, data)) is incremental
  lowered = program.plain.lower(*args)
  assert program.asked == S.RUN_OPTIONS[incremental]
  light = lowered.compile(as_users_compile(program.asked))(*args[5:])
  want = lowered.compile(_compile.supported(_compile.DEFAULT_LEVEL))(*args[5:])
  assert _tree_equal(light, want)
  assert _tree_equal(program.lower(*args).compile()(*args[5:]),
                     ga.run(CFG, fit, 12, key=jax.random.key(5), data=args[6], progress=False))


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="the lighter compile options are XLA:CPU's; elsewhere it is a plain jit")
def test_search_program_compiled_lighter_gives_the_default_bits(trained, monkeypatch):
  """ga.search's one program (activations, the GA and the best mask's accuracy) with the full
  evaluation compiles at level 1 with the older emitter: XLA's default options give the same
  bits. Both programs are made as with no XLA_FLAGS (the suite's flags would override the
  library's options, tests/conftest.py)."""
  from jaxprune import _compile  # pylint: disable=import-outside-toplevel
  S = importlib.import_module("jaxprune.ga.loop")
  model, params, x, y = trained
  got = []
  for options in (S.RUN_OPTIONS[False], _compile.DEFAULT_LEVEL):
    program = _compile.light_jit(   # a function of its own: a cache of its own to count
        functools.partial(search_lib._search_program), options, static_argnums=(0, 1, 2, 3, 4, 5))
    with monkeypatch.context() as m:   # its options fixed as with no XLA_FLAGS (first use)
      m.setenv("XLA_FLAGS", "")
      assert program.options == options
    monkeypatch.setitem(search_lib._SEARCH_JIT, False, program)
    got.append(ga.search(model, params, x, y, "hidden_0", key=jax.random.key(7), config=CFG,
                         progress=False))
    assert program.active._cache_size() == 1   # it ran this program
  assert _tree_equal(*got)


def test_vmap_over_lambda_equals_loop():
  cfg = ga.GAConfig(population_size=12, hof_size=2, generations=4)
  lams = jnp.asarray([0.0, 5.0])

  def one(lam):
    state, hist = ga.run(cfg, _onemax_minus_lam, 9, key=jax.random.key(0),
                         hyper=ga.GAHyperparams(lam=lam), progress=False)
    return state.hof[0], hist.best

  masks, bests = jax.vmap(one)(lams)
  for i, lam in enumerate(lams):
    m, b = one(lam)
    np.testing.assert_array_equal(masks[i], m)
    np.testing.assert_array_equal(bests[i], b)
  assert not bool(masks[1][0])   # a penalty of 5 on bit 0 switches it off


def test_nan_fitness_is_worst_and_progress_bar(capsys):
  def fn(population, data, hyper):
    del data, hyper
    f = population.sum(1).astype(jnp.float32)
    return jnp.where(population[:, 0], jnp.nan, f)   # any mask keeping unit 0 scores NaN

  cfg = ga.GAConfig(population_size=20, hof_size=3, generations=5)
  state, hist = ga.run(cfg, fn, 8, key=jax.random.key(1), progress=True)
  err = capsys.readouterr().err
  assert "[GA] gen 0/5" in err and "gen 5/5" in err and "best=" in err and "mean=" in err
  # A second run with progress on has its own display (no state left over from the first).
  ga.run(ga.GAConfig(population_size=20, hof_size=3, generations=3), fn, 8,
         key=jax.random.key(2), progress=True)
  err = capsys.readouterr().err
  assert "gen 0/3" in err and "gen 3/3" in err and "/5" not in err
  assert not np.any(np.asarray(state.hof)[:, 0])
  assert np.all(np.isfinite(np.asarray(state.hof_fitness)))
  f = np.asarray(state.fitness)
  np.testing.assert_array_equal(np.isneginf(f), np.asarray(state.population)[:, 0])
  assert np.all(np.isfinite(np.asarray(hist.mean)))


def test_statistics_after_the_scan_equal_the_statistics_in_it(capsys, monkeypatch):
  """Without progress the run computes its history after the scan from recorded fitness rows
  (up to loop.RECORD_FITNESS_MAX values); with progress, or above the limit, inside it. Both
  give the same bits, here with NaN (-inf) and all-non-finite generations, and equal a Python
  computation of the documented statistics."""
  S = importlib.import_module("jaxprune.ga.loop")

  def fn(population, data, hyper):
    del data, hyper
    f = population.sum(1).astype(jnp.float32) / 7.0
    f = jnp.where(population[:, 0] & population[:, 1], jnp.nan, f)
    return jnp.where(population[:, 2] & population[:, 3], -jnp.inf, f)

  def same_bits(a, b):
    a, b = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(a) == len(b) and all(
        u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes()
        for u, v in zip(map(np.asarray, a), map(np.asarray, b)))

  traced_in_scan = []   # the in-scan statistics, traced (once per program)
  stats = S._stats
  monkeypatch.setattr(S, "_stats", lambda state: traced_in_scan.append(1) or stats(state))
  cfg = ga.GAConfig(population_size=23, hof_size=3, generations=6)
  recorded = ga.run(cfg, fn, 8, key=jax.random.key(4), progress=False)
  assert not traced_in_scan
  shown = ga.run(cfg, fn, 8, key=jax.random.key(4), progress=True)
  assert "gen 6/6" in capsys.readouterr().err and traced_in_scan
  traced_in_scan.clear()
  monkeypatch.setattr(S, "RECORD_FITNESS_MAX", 0)
  # A new fitness callable: a new trace, which reads the patched limit.
  in_scan = ga.run(cfg, lambda p, d, h: fn(p, d, h), 8, key=jax.random.key(4), progress=False)
  assert traced_in_scan
  assert same_bits(recorded, shown) and same_bits(recorded, in_scan)
  # One generation recomputed by hand from the final state (the last row of the history).
  state, hist = recorded
  f = np.asarray(state.fitness, np.float32)
  fin = f[np.isfinite(f)]
  assert hist.max[-1] == f.max() and hist.min[-1] == (fin.min() if fin.size else -np.inf)
  np.testing.assert_allclose(hist.mean[-1], fin.mean() if fin.size else -np.inf, rtol=1e-6)
  assert hist.best[-1] == state.hof_fitness[0]
  assert hist.best_kept[-1] == np.asarray(state.hof[0]).sum()
  # And all-non-finite generations: every individual scores -inf.
  all_bad = ga.run(cfg, lambda p, d, h: jnp.full(p.shape[:1], -jnp.inf), 8,
                   key=jax.random.key(4), progress=False)[1]
  assert np.all(np.isneginf(all_bad.mean)) and np.all(np.isneginf(all_bad.min))


def test_user_fitness(trained):
  model, params, x, y = trained

  def fewest_units_with_big_outgoing_weights(p, mask):
    w = jnp.abs(p["params"]["out"]["kernel"]).sum(1)
    return jnp.sum(jnp.where(mask, w, 0.0)) - 0.5 * jnp.sum(mask) * jnp.mean(w)

  cfg = ga.GAConfig(population_size=12, hof_size=2, generations=3)
  res = ga.search(model, params, None, None, "hidden_0", key=jax.random.key(0),
                  fitness=fewest_units_with_big_outgoing_weights, config=cfg, progress=False)
  assert np.isnan(float(res.accuracy))
  want = fewest_units_with_big_outgoing_weights(params, res.mask)
  assert float(res.fitness) == pytest.approx(float(want), rel=1e-6)


def test_user_fitness_with_data_reports_the_masks_accuracy(trained):
  """A fitness function plus x and y: the result's accuracy is the best mask's, as evaluate
  gives it (it used to fail with an AttributeError)."""
  model, params, x, y = trained
  cfg = ga.GAConfig(population_size=12, hof_size=2, generations=3)
  res = ga.search(model, params, x, y, "hidden_0", key=jax.random.key(0), config=cfg,
                  fitness=lambda p, m: -jnp.sum(m).astype(jnp.float32), progress=False)
  masks = jaxprune.masks.expand(params, model, {"hidden_0": res.mask})
  want = jaxprune.evaluate(model, params, x, y, masks=masks)["accuracy"]
  assert float(res.accuracy) == pytest.approx(float(want), abs=1e-6)
  # The built-in fitness on 80 patterns: the fraction as evaluate gives it, to the bit (the
  # percent divided by 100 was an ulp off for 78 of the 81 counts of 80, all correct included).
  res = ga.search(model, params, x[:80], y[:80], "hidden_0", key=jax.random.key(0), config=cfg,
                  progress=False)
  masks = jaxprune.masks.expand(params, model, {"hidden_0": res.mask})
  assert float(res.accuracy) == jaxprune.evaluate(model, params, x[:80], y[:80],
                                                  masks=masks)["accuracy"]


def test_label_forms(trained, result):
  """Labels as class indices, one-hot rows or a Python list give the same search; a column
  (N, 1) is refused (its argmax made every label class 0), as are one-hot rows of the wrong
  width or all zero (unless their weight is 0: padding)."""
  model, params, x, y = trained
  kw = dict(key=jax.random.key(7), config=CFG, progress=False)
  for labels in (jax.nn.one_hot(y, 7), [int(v) for v in y]):
    res = ga.search(model, params, x, labels, "hidden_0", **kw)
    assert _tree_equal((res.mask, res.fitness, res.accuracy),
                       (result.mask, result.fitness, result.accuracy))
  with pytest.raises(ValueError, match=r"shape \(140, 1\), a column; .*y.ravel\(\)"):
    ga.search(model, params, x, y[:, None], "hidden_0", **kw)
  with pytest.raises(ValueError, match="8 columns but the model has 7 outputs"):
    ga.search(model, params, x, jax.nn.one_hot(y, 8), "hidden_0", **kw)
  holes = jax.nn.one_hot(y, 7).at[3].set(0.0)
  with pytest.raises(ValueError, match=r"1 row\(s\) all zero \(first: row 3\)"):
    ga.search(model, params, x, holes, "hidden_0", **kw)
  w = jnp.ones((140,)).at[3].set(0.0)   # the all-zero row is padding: accepted
  data = ga.AccuracyFitness(model, "hidden_0", weighted=True).prepare(params, x, holes,
                                                                      sample_weight=w)
  np.testing.assert_array_equal(np.asarray(data["y"])[w > 0], np.asarray(y)[w > 0])


def test_search_under_jit_with_closed_over_arrays(trained, result):
  """Data checks read concrete labels with NumPy, so jax arrays closed over inside jit stay
  concrete (the label range check used to raise a ConcretizationTypeError there)."""
  model, params, x, y = trained
  res = jax.jit(lambda k: ga.search(model, params, x, y, "hidden_0", key=k, config=CFG,
                                    progress=False))(jax.random.key(7))
  assert _tree_equal((res.mask, res.fitness), (result.mask, result.fitness))


# ----------------------------------------------------------------------------- bad input


def test_a_tournament_larger_than_the_population_draws_with_replacement(trained):
  """Contestants are drawn with replacement (DEAP's selTournament too), so a tournament of 6 in
  a population of 4 is a tournament; it was refused as impossible."""
  model, params, x, y = trained
  cfg = ga.GAConfig(population_size=4, hof_size=1, tournament_size=6, generations=3)
  runs = [ga.search(model, params, x, y, "hidden_0", key=jax.random.key(5), config=cfg,
                    progress=False, incremental=inc) for inc in (True, False)]
  np.testing.assert_array_equal(runs[0].mask, runs[1].mask)
  assert float(runs[0].fitness) == float(runs[1].fitness) == float(runs[0].history.best[-1])


def test_bad_config():
  with pytest.raises(ValueError, match="larger than the hall of fame"):
    ga.GAConfig(population_size=5, hof_size=5)
  with pytest.raises(ValueError, match="hof_size must be at least 1"):
    ga.GAConfig(hof_size=0)
  with pytest.raises(TypeError, match="must be an int"):
    ga.GAConfig(population_size=10.5)


def test_bad_params_and_inputs(trained):
  model, params, x, y = trained
  kw = dict(key=jax.random.key(0), config=CFG, progress=False)
  for bad in (ga.GAHyperparams(crossover_prob=1.5), ga.GAHyperparams(mutation_prob=-0.1),
              ga.GAHyperparams(bit_flip_prob=2.0)):
    with pytest.raises(ValueError, match=r"probability in \[0, 1\]"):
      ga.search(model, params, x, y, "hidden_0", hyper=bad, **kw)
  with pytest.raises(ValueError, match=r"lam must be one number, got shape \(2,\).*vmap"):
    ga.search(model, params, x, y, "hidden_0", hyper=ga.GAHyperparams(lam=jnp.ones(2)), **kw)
  for raw in (jnp.zeros((2,), jnp.uint32), jnp.zeros((5, 4), jnp.uint32)):  # threefry, rbg
    jaxprune.validate.check_key(raw)
  for key in (3, np.int32(3), jnp.zeros(3, jnp.uint32)):
    with pytest.raises(TypeError, match=r"key must be a PRNG key made by jax.random.key"):
      ga.search(model, params, x, y, "hidden_0", **{**kw, "key": key})
    with pytest.raises(TypeError, match=r"key must be a PRNG key"):
      ga.run(CFG, lambda pop, d, h: pop.sum(1).astype(float), 5, key=key, progress=False)
  with pytest.raises(KeyError, match="Unknown unit group 'hidden_7'"):
    ga.search(model, params, x, y, "hidden_7", **kw)
  with pytest.raises(ValueError, match="must return a scalar"):
    ga.search(model, params, x, y, "hidden_0", fitness=lambda p, m: jnp.ones(3), **kw)
  with pytest.raises(ValueError, match="fitness must be 'eq5'"):
    ga.search(model, params, x, y, "hidden_0", fitness="eq7", **kw)
  with pytest.raises(ValueError, match="needs training inputs"):
    ga.search(model, params, None, None, "hidden_0", **kw)
  with pytest.raises(ValueError, match="integer class indices"):
    ga.search(model, params, x, y.astype(jnp.float32), "hidden_0", **kw)
  ae = jaxprune.Autoencoder(in_features=4, hidden=(3,))
  with pytest.raises(ValueError, match="does reconstruction"):
    ga.search(ae, ae.init(jax.random.key(0)), x[:, :4], y, "hidden_0", **kw)
  with pytest.raises(ValueError, match="one scalar per individual"):
    ga.run(CFG, lambda pop, d, h: pop.sum(), 5, key=jax.random.key(0), progress=False)
  state = ga.init(CFG, 5)
  pop = ga.ask(CFG, state, key=jax.random.key(0))
  with pytest.raises(ValueError, match="fitness has shape"):
    ga.tell(CFG, state, pop, jnp.zeros((3,)))
  with pytest.raises(ValueError, match="dtype float32.*bool"):   # it read 0.3 as kept
    ga.tell(CFG, state, jnp.full(pop.shape, 0.3), jnp.zeros((CFG.population_size,)))
  # A traced target runs params of another width; the GA's chromosome would not fit them (it
  # raised a broadcasting TypeError from inside the program, or a bare KeyError).
  f = lambda p, x: jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  mk = lambda u: {"w1": jnp.ones((10, u)), "b1": jnp.zeros(u), "w2": jnp.ones((u, 7)),
                  "b2": jnp.zeros(7)}
  target = jaxprune.trace(f, mk(20), x)
  with pytest.raises(ValueError, match=r"has 25 entries but the group has 20 units. These "
                     r"params do not fit TracedTarget's group 'w1': pass the params"):
    ga.search(target, mk(25), x, y, "w1", **kw)
  with pytest.raises(ValueError, match=r"no key 'b2'.* These params do not fit"):
    ga.search(target, {k: v for k, v in mk(20).items() if k != "b2"}, x, y, "w1", **kw)


def test_first_call_is_one_compiled_program():
  """A first search (new shapes) compiles exactly one XLA program: activations, scan, accuracy.

  Tracing the model (for its readout) identifies its nonlinearity on a grid of 64 points with
  NumPy, so that compiles nothing either, whichever tests ran before in this process."""
  events = []
  listener = lambda event, duration, **kw: events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    model = jaxprune.MLP(in_features=3, hidden=(7,), out_features=3)
    params = model.init(jax.random.key(0))
    x = np.asarray(jax.random.normal(jax.random.key(1), (29, 3)))
    y = np.arange(29) % 3
    cfg = ga.GAConfig(population_size=11, hof_size=2, generations=2)
    events.clear()
    res = ga.search(model, params, x, y, "hidden_0", key=jax.random.key(2), config=cfg,
                    progress=False)
    jax.block_until_ready(res)
    compiles = [e for e in events if e == "/jax/core/compile/backend_compile_duration"]
    assert len(compiles) == 1, events
    assert 0.0 <= float(res.accuracy) <= 100.0
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def test_progress_displays_are_per_run(capsys):
  # No module-level progress state: each run has its own display, reached through its token.
  loop = importlib.import_module("jaxprune.ga.loop")
  assert not hasattr(loop, "_PROGRESS")
  a, b = loop.GAProgress(4, "A"), loop.GAProgress(4, "B")
  with loop._DISPLAYS.open(a) as ta, loop._DISPLAYS.open(b) as tb:
    assert int(ta) != int(tb) and int(ta) > 0
    for g in range(3):   # two runs reporting in turn
      loop._DISPLAYS.report(ta, np.int32(g), np.float32(g), np.float32(0.5))
      loop._DISPLAYS.report(tb, np.int32(g + 2), np.float32(10.0), np.float32(1.0))
    loop._DISPLAYS.report(ta, np.int32(1), np.float32(9.0), np.float32(9.0))  # late: ignored
  assert (a.last, b.last) == (2, 4)
  loop._DISPLAYS.report(ta, np.int32(3), np.float32(0.0), np.float32(0.0))  # closed: ignored
  assert a.last == 2
  lines = capsys.readouterr().err.splitlines()
  assert [l.split(" best")[0] for l in lines if l.startswith("[A]")] == [
      "[A] gen 0/4", "[A] gen 1/4", "[A] gen 2/4"]
  assert [l.split(" best")[0] for l in lines if l.startswith("[B]")] == [
      "[B] gen 2/4", "[B] gen 3/4", "[B] gen 4/4"]
  # Generation 0 has no rate to tell the time left from (it said ~(0.02 s x 1500) left).
  a_lines = [l for l in lines if l.startswith("[A]")]
  assert "left" not in a_lines[0] and a_lines[0].endswith("s elapsed)"), a_lines[0]
  assert all(l.endswith("s left)") for l in a_lines[1:]), a_lines
  # A search's display names its group.
  model = jaxprune.MLP(in_features=3, hidden=(4,), out_features=2)
  x = host_f32(np.random.default_rng(0).normal(size=(8, 3)))
  ga.search(model, model.init(jax.random.key(0)), x, jnp.arange(8) % 2, "hidden_0",
            key=jax.random.key(1), config=ga.GAConfig(population_size=8, generations=2))
  err = capsys.readouterr().err
  assert "[GA hidden_0] gen 0/2" in err and "[GA hidden_0] gen 2/2" in err


def test_sample_weight_padding_gives_the_unpadded_search(trained, result):
  model, params, x, y = trained
  # 13 padding rows of weight 0 with an out-of-range label and inputs unlike the data.
  xp = jnp.concatenate([x, 5.0 * jnp.ones((13, x.shape[1]), x.dtype)])
  yp = jnp.concatenate([y, jnp.full((13,), 99, y.dtype)])
  w = jnp.concatenate([jnp.ones(x.shape[0]), jnp.zeros(13)])
  eq6 = ga.search(model, params, x, y, "hidden_0", key=jax.random.key(7), config=CFG,
                  fitness="eq6", fast_path=False, progress=False)
  for fitness, fast_path, ref in (("eq5", "auto", result), ("eq6", False, eq6)):
    padded = ga.search(model, params, xp, yp, "hidden_0", key=jax.random.key(7), config=CFG,
                       fitness=fitness, fast_path=fast_path, progress=False, sample_weight=w)
    np.testing.assert_array_equal(padded.mask, ref.mask)
    # Same search; the fitness to float rounding (a weighted mean is not jnp.mean's program).
    assert float(padded.fitness) == pytest.approx(float(ref.fitness), rel=1e-6)
    assert float(padded.accuracy) == pytest.approx(float(ref.accuracy), rel=1e-6)
    np.testing.assert_allclose(padded.history.best, ref.history.best, rtol=1e-6)
    np.testing.assert_array_equal(padded.history.best_kept, ref.history.best_kept)
  # Fractional weights: the result's accuracy is the weighted mean of the best mask's hits.
  wf = host_f32(np.random.default_rng(1).uniform(0.1, 1.0, size=x.shape[0]))
  res = ga.search(model, params, x, y, "hidden_0", key=jax.random.key(7), config=CFG,
                  fitness="accuracy", progress=False, sample_weight=wf)
  m = jaxprune.expand(params, model, {"hidden_0": res.mask})
  pred = np.argmax(np.asarray(model.apply(jaxprune.apply_masks(params, m), x)), -1)
  hits = (pred == np.asarray(y)).astype(np.float64)
  assert float(res.accuracy) == pytest.approx(np.sum(wf * hits) / np.sum(wf), rel=1e-5)
  assert float(res.fitness) == pytest.approx(100 * float(res.accuracy), rel=1e-5)
  # Bad weights and weights with a fitness function are errors.
  with pytest.raises(ValueError, match="shape"):
    ga.search(model, params, x, y, "hidden_0", key=jax.random.key(7), config=CFG,
              progress=False, sample_weight=jnp.ones(3))
  with pytest.raises(ValueError, match="inside it"):
    ga.search(model, params, x, y, "hidden_0", key=jax.random.key(7), config=CFG,
              fitness=lambda p, m: jnp.sum(m), progress=False, sample_weight=w[:140])


def test_inputs_as_nested_lists_and_an_unhashable_fitness_object():
  """x written as nested lists is one input (it was refused as 'several inputs'); a callable
  object with __eq__ and no __hash__ is a fitness (it failed with JAX's static-argument error),
  cached by identity, while a hashable one fetched again reuses its compiled run."""
  model = jaxprune.MLP(in_features=3, hidden=(6,), out_features=2)
  params = model.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(10, 3)).round(2).tolist(), rng.integers(0, 2, 10).tolist()
  cfg = ga.GAConfig(population_size=8, hof_size=2, generations=2)
  kw = dict(key=jax.random.key(1), config=cfg, progress=False)
  a = ga.search(model, params, x, y, "hidden_0", **kw)
  b = ga.search(model, params, np.asarray(x, np.float32), np.asarray(y), "hidden_0", **kw)
  assert _tree_equal(a, b)

  class Weighted:
    def __init__(self, w):
      self.w = jnp.asarray(w, jnp.float32)

    def __eq__(self, other):                 # defines equality, so Python drops __hash__
      return isinstance(other, Weighted) and bool(jnp.all(other.w == self.w))

    def __call__(self, p, m):
      return jnp.sum(m * self.w)

  w = np.arange(6.0)
  res = ga.search(model, params, None, None, "hidden_0", fitness=Weighted(w), **kw)
  assert float(res.fitness) == float(np.sum(np.asarray(res.mask) * w))
  f1, f2 = ga.make_fitness(model, "hidden_0", Weighted(w)), ga.make_fitness(
      model, "hidden_0", Weighted(w))
  assert f1 == f1 and f1 != f2 and hash(f1) == hash(f1)

  class Scorer:
    def score(self, p, m):
      return jnp.sum(m)

  s = Scorer()
  assert ga.make_fitness(model, "hidden_0", s.score) == ga.make_fitness(model, "hidden_0", s.score)


def test_unusable_data_under_jit_flag_the_result(trained):
  """Under jit the input checks cannot raise (the values are traced): NaN inputs or labels
  outside the classes used to give a plausible-looking fitness; now the result says so."""
  model, params, x, y = trained
  run = jax.jit(lambda xx, yy, pp: ga.search(model, pp, xx, yy, "hidden_0",
                                             key=jax.random.key(7), config=CFG, progress=False))
  good = run(x, y, params)
  assert not bool(good.invalid) and np.isfinite(float(good.fitness))
  np.testing.assert_array_equal(np.asarray(good.mask), np.asarray(
      ga.search(model, params, x, y, "hidden_0", key=jax.random.key(7), config=CFG,
                progress=False).mask))
  for bad in (run(x.at[3, 2].set(jnp.nan), y, params), run(x, y.at[0].set(7), params),
              run(x, y, jax.tree.map(lambda a: a.at[0].set(jnp.inf), params))):
    assert bool(bad.invalid) and np.isnan(float(bad.fitness)) and np.isnan(float(bad.accuracy))


def test_unusable_weights_and_a_user_fitness_on_unusable_x_flag_the_result_under_vmap(trained):
  """Negative, NaN or all-zero sample weights under vmap gave invalid=False with a plausible
  (or -inf) fitness; a user fitness with NaN x reported an accuracy computed from them. Both
  flag the result now, as outside jit they raise."""
  model, params, x, y = trained
  n = x.shape[0]
  kw = dict(key=jax.random.key(7), config=CFG, progress=False)
  run = lambda w: ga.search(model, params, x, y, "hidden_0", sample_weight=w, **kw)
  ws = jnp.stack([jnp.ones(n), jnp.ones(n).at[0].set(-5.0), jnp.zeros(n),
                  jnp.ones(n).at[0].set(jnp.nan)])
  res = jax.vmap(run)(ws)
  np.testing.assert_array_equal(np.asarray(res.invalid), [False, True, True, True])
  assert np.isfinite(float(res.fitness[0])) and np.isnan(np.asarray(res.fitness[1:])).all()
  assert np.isnan(np.asarray(res.accuracy[1:])).all()
  for w in ws[1:]:
    with pytest.raises(ValueError, match="sample_weight"):
      run(w)
  user = lambda p, mask: jnp.sum(mask).astype(jnp.float32)
  nan_x = jax.jit(lambda xx: ga.search(model, params, xx, y, "hidden_0", fitness=user, **kw))(
      x.at[0, 0].set(jnp.nan))
  assert bool(nan_x.invalid) and np.isnan(float(nan_x.accuracy))


def test_one_hot_rows_that_are_not_one_hot_are_refused(trained, result):
  """Rows that are not one-hot used to become labels by an argmax (uniform rows: every label
  class 0, accuracy 1.0); they are refused outside jit and flag the result under jit. Bool
  one-hot rows are one-hot; weight-0 rows are padding and not looked at. (The four kinds of
  rows in one test: each jitted search is compiled once and serves all four.)"""
  model, params, x, y = trained
  kw = dict(key=jax.random.key(7), config=CFG, progress=False)
  onehot = jax.nn.one_hot(y, 7)
  res = ga.search(model, params, x, onehot.astype(bool), "hidden_0", **kw)
  assert _tree_equal((res.mask, res.fitness), (result.mask, result.fitness))
  w = jnp.ones((140,)).at[5].set(0.0)
  plain = ga.search(model, params, x, onehot, "hidden_0", sample_weight=w, **kw)
  flag = jax.jit(lambda yy: ga.search(model, params, x, yy, "hidden_0", **kw))
  flag_padded = jax.jit(lambda yy: ga.search(model, params, x, yy, "hidden_0",
                                             sample_weight=w, **kw))
  for rows, bad in (("uniform", jnp.full((140, 7), 1 / 7)),
                    ("multi_hot", onehot.at[:, 0].set(1.0)), ("negated", -onehot),
                    ("smoothed", onehot * 0.9 + 0.1 / 7)):
    with pytest.raises(ValueError, match=r"row\(s\) are not one-hot \(first: row 0, .*"
                                         r"y\.argmax\(-1\)"):
      ga.search(model, params, x, bad, "hidden_0", **kw)
    flagged = flag(bad)
    assert bool(flagged.invalid) and np.isnan(float(flagged.fitness)), rows
    one_bad = onehot.at[5].set(bad[5])    # one such row, as padding (weight 0): accepted
    padded = ga.search(model, params, x, one_bad, "hidden_0", sample_weight=w, **kw)
    assert _tree_equal((padded.mask, padded.fitness), (plain.mask, plain.fitness)), rows
    assert not bool(flag_padded(one_bad).invalid), rows


def test_traced_hyperparameters_out_of_range_flag_their_run(trained):
  """A vmap over GAHyperparams cannot raise for one bad setting: a NaN, infinite or negative lam
  and a probability outside [0, 1] flag that run only (they used to give a plausible result:
  NaN lam a -inf fitness with a normal accuracy, crossover 1.5 acting as 1)."""
  model, params, x, y = trained
  kw = dict(key=jax.random.key(7), config=CFG, progress=False)
  nan, inf = float("nan"), float("inf")
  cases = [(0.8, 0.2, 0.1, 10.0), (0.8, 0.2, 0.1, nan), (0.8, 0.2, 0.1, -1.0),
           (0.8, 0.2, 0.1, inf), (1.5, 0.2, 0.1, 10.0), (0.8, -1.0, 0.1, 10.0),
           (0.8, 0.2, nan, 10.0), (0.8, 0.2, 0.1, 0.0)]
  hyper = ga.GAHyperparams(*(jnp.asarray(c, jnp.float32) for c in zip(*cases)))
  many = jax.vmap(lambda h: ga.search(model, params, x, y, "hidden_0", hyper=h, **kw))(hyper)
  assert many.invalid.tolist() == [False, True, True, True, True, True, True, False]
  bad = np.asarray(many.invalid)
  assert np.all(np.isnan(np.asarray(many.fitness)[bad]))
  assert np.all(np.isnan(np.asarray(many.accuracy)[bad]))
  for i in (0, 7):   # the good runs are the searches run one at a time
    one = ga.search(model, params, x, y, "hidden_0", hyper=ga.GAHyperparams(*cases[i]), **kw)
    np.testing.assert_array_equal(np.asarray(many.mask[i]), np.asarray(one.mask))
    np.testing.assert_allclose(float(many.fitness[i]), float(one.fitness), rtol=1e-6)
  # A fitness function of one's own reads lam as it likes: its sign is not checked.
  user = lambda p, m: jnp.sum(m).astype(jnp.float32)
  mine = jax.vmap(lambda h: ga.search(model, params, None, None, "hidden_0", fitness=user,
                                      hyper=h, **kw))(hyper)
  assert mine.invalid.tolist() == [False, True, False, True, True, True, True, False]


def test_negative_lam_is_refused_for_the_built_in_fitness_only(trained):
  model, params, x, y = trained
  kw = dict(key=jax.random.key(7), config=CFG, progress=False,
            hyper=ga.GAHyperparams(lam=-10.0))
  for fitness in ("eq5", "eq6"):
    with pytest.raises(ValueError, match=r"lam must be >= 0, got -10\.0.*lam=0"):
      ga.search(model, params, x, y, "hidden_0", fitness=fitness, **kw)
  user = lambda p, m: -jnp.sum(m).astype(jnp.float32)
  res = ga.search(model, params, None, None, "hidden_0", fitness=user, **kw)
  assert not bool(res.invalid) and float(res.fitness) == -int(res.kept)


# ----------------------------------------------------------------------------- extreme scales


def test_sample_weights_of_any_scale_give_the_same_search(trained):
  """The weighted accuracy does not depend on the weights' scale: weights of 1e37 each (whose
  float32 sum overflows: accuracy 0.0, fitness -inf) or subnormal ones (1e-40, which XLA:CPU
  flushes to 0: NaN and invalid=True under jit although the host check accepts them) score as
  weights of 1; weights times a power of two give the same bits (ordinary weights keep theirs)."""
  model, params, x, y = trained
  small = ga.GAConfig(population_size=10, hof_size=2, generations=3)
  kw = dict(key=jax.random.key(3), config=small, progress=False)
  n = x.shape[0]
  ones = ga.search(model, params, x, y, "hidden_0", sample_weight=np.ones(n, np.float32), **kw)
  scales = (1e37, 1e-40, 1e-44, 3e38)
  for scale in scales:
    res = ga.search(model, params, x, y, "hidden_0",
                    sample_weight=np.full(n, scale, np.float32), **kw)
    np.testing.assert_array_equal(np.asarray(res.mask), np.asarray(ones.mask))
    assert not bool(res.invalid)
    assert float(res.accuracy) == pytest.approx(float(ones.accuracy), rel=1e-6)
    np.testing.assert_allclose(res.history.max, ones.history.max, rtol=1e-6)
  # float64 weights beyond float32's range (they rounded to 0 or inf)
  for scale in (1e-50, 1e300):
    res = ga.search(model, params, x, y, "hidden_0", sample_weight=np.full(n, scale), **kw)
    assert not bool(res.invalid)
    assert float(res.accuracy) == pytest.approx(float(ones.accuracy), rel=1e-6)
  # traced weights (under vmap): scaled inside the program, judged as on the host; a
  # negative subnormal weight (the last row) is refused on the host and flagged when traced
  # (in the same program as the good weights: one compilation)
  neg = jnp.ones(n).at[0].set(-1e-40)
  with pytest.raises(ValueError, match="sample_weight must be finite and >= 0"):
    ga.search(model, params, x, y, "hidden_0", sample_weight=neg, **kw)
  ws = jnp.asarray([np.full(n, s, np.float32) for s in (1.0,) + scales] + [neg])
  many = jax.vmap(lambda w: ga.search(model, params, x, y, "hidden_0", sample_weight=w,
                                      **kw))(ws)
  np.testing.assert_array_equal(np.asarray(many.invalid), [False] * 5 + [True])
  np.testing.assert_allclose(np.asarray(many.accuracy[:5]), float(ones.accuracy), rtol=1e-6)
  # Ordinary weights times 2**k: the same bits, also where the unscaled sums overflow (k=120).
  wf = np.random.default_rng(2).uniform(0.1, 1.0, size=n).astype(np.float32)
  fit = ga.AccuracyFitness(model, "hidden_0", None, fast=True, weighted=True)
  pop = jax.random.bernoulli(jax.random.key(4), 0.5, (16, 12))
  score = jax.jit(lambda w: fit.accuracy(pop, fit.prepare(params, x, y, sample_weight=w)))
  ref = np.asarray(score(wf))
  for k in (-100, 120):
    np.testing.assert_array_equal(np.asarray(score(wf * np.float32(2.0 ** k))), ref)
  F = importlib.import_module("jaxprune.ga.fitness")
  correct = jax.random.bernoulli(jax.random.key(5), 0.5, (n, 7))
  plain = lambda c, w: 100.0 * (F.ops.ordered_sum(w[:, None] * c.astype(jnp.float32))
                                / F.ops.ordered_sum(w[:, None]))   # the unscaled formula
  np.testing.assert_array_equal(np.asarray(jax.jit(F.weighted_percent)(correct, wf)),
                                np.asarray(jax.jit(plain)(correct, wf)))


def test_eq5_does_not_overflow_for_large_lam(trained):
  """Eq. 5 computed ``lam * kept`` first: lam=1e38 (finite, accepted) overflowed to -inf
  although ``lam * kept / U`` is finite, so every individual scored -inf. At ordinary lam the
  bits are those of ``lam * kept / U``."""
  model, params, x, y = trained
  kept = jnp.asarray([0, 2, 6, 12])
  for lam in (1e38, 3.4e38):
    got = np.asarray(jax.jit(lambda l: ga.penalized(jnp.zeros(4), kept, 12, l, "ratio"))(lam))
    want = -np.float64(np.float32(lam)) * np.asarray(kept) / 12
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-6)
  acc = host_f32(np.random.default_rng(0).uniform(0, 100, 13))
  for lam in (0.0, 0.7, 10.0, 123.456, 1e19):
    got = jax.jit(lambda a, l: ga.penalized(a, jnp.arange(13), 12, l, "ratio"))(acc, lam)
    want = jax.jit(lambda a, l: a - l * jnp.arange(13).astype(jnp.float32) / 12)(acc, lam)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  res = ga.search(model, params, x, y, "hidden_0", key=jax.random.key(3), progress=False,
                  config=ga.GAConfig(population_size=10, hof_size=2, generations=3),
                  hyper=ga.GAHyperparams(lam=1e38))
  assert np.all(np.isfinite(np.asarray(res.history.max)))
  assert float(res.fitness) == pytest.approx(
      100 * float(res.accuracy) - np.float64(np.float32(1e38)) * int(res.kept) / 12, rel=1e-6)


# ----------------------------------------------------------------------------- typed settings


def test_wrongly_typed_settings_are_refused_before_compiling(trained):
  """A string lam failed in NumPy's isfinite, None in a comparison, a dict for hyper or config
  with an AttributeError or JAX's static-argument error; ga.run with an AccuracyFitness and
  no data failed inside the trace, and with the wrong num_units with a broadcasting error."""
  model, params, x, y = trained
  kw = dict(key=jax.random.key(0), config=CFG, progress=False)
  cases = [
      (dict(hyper=ga.GAHyperparams(lam="10")), TypeError,
       r"GAHyperparams\.lam must be a number.*got '10'.*GAHyperparams\(lam=10\.0\)"),
      (dict(hyper=ga.GAHyperparams(crossover_prob=None)), TypeError,
       r"GAHyperparams\.crossover_prob must be a number.*None.*crossover_prob=0\.8"),
      (dict(hyper={"lam": 1.0}), TypeError,
       r"hyper must be a ga\.GAHyperparams.*got dict.*ga\.GAHyperparams\(\*\*\{'lam': 1\.0\}\)"),
      (dict(config={"population_size": 10}), TypeError,
       r"config must be a ga\.GAConfig.*ga\.GAConfig\(\*\*\{'population_size': 10\}\)"),
  ]
  for extra, error, message in cases:
    with pytest.raises(error, match=message):
      ga.search(model, params, x, y, "hidden_0", **{**kw, **extra})
  f = lambda pop, d, h: pop.sum(1).astype(jnp.float32)
  with pytest.raises(TypeError, match=r"hyper must be a ga\.GAHyperparams"):
    ga.run(CFG, f, 5, key=jax.random.key(0), hyper={"lam": 1.0}, progress=False)
  with pytest.raises(TypeError, match=r"config must be a ga\.GAConfig"):
    ga.run({"generations": 2}, f, 5, key=jax.random.key(0), progress=False)
  with pytest.raises(TypeError, match=r"config must be a ga\.GAConfig"):
    ga.init({"generations": 2}, 5)
  for fast in (False, True):
    fit = ga.AccuracyFitness(model, "hidden_0", fast=fast)
    with pytest.raises(ValueError, match=r"got data=None\. Pass data=fitness\.prepare"):
      ga.run(CFG, fit, 12, key=jax.random.key(0), progress=False)
    with pytest.raises(ValueError, match=r"num_units is 10 but group 'hidden_0' of this "
                       r"fitness has 12 units.*num_units=12"):
      ga.run(CFG, fit, 10, key=jax.random.key(0), progress=False,
             data=fit.prepare(params, x, y))
  weighted = ga.AccuracyFitness(model, "hidden_0", weighted=True)
  with pytest.raises(ValueError, match=r"'sample_weight'.*sample_weight=w"):
    ga.run(CFG, weighted, 12, key=jax.random.key(0), progress=False,
           data=ga.AccuracyFitness(model, "hidden_0").prepare(params, x, y))
  # numbers of any kind pass: ints, NumPy scalars, 0-d arrays
  strategy = importlib.import_module("jaxprune.ga.strategy")
  strategy.check_params(ga.GAHyperparams(1, np.float32(0.2), jnp.asarray(0.1), np.int64(3)))


# ----------------------------------------------------------------------------- progress


def test_progress_under_vmap_shows_the_best_run_and_the_mean_of_the_runs(capsys):
  """Under jax.vmap the host callback is called once per run: the lines showed the first run's
  statistics alone (the others' reports of a generation were dropped as late), where the docs
  promise the best run's best fitness and the mean of the runs' means."""
  f = lambda pop, d, h: (pop * jnp.arange(1.0, 8.0)).sum(1)
  cfg = ga.GAConfig(population_size=6, hof_size=1, generations=4)
  keys = jax.random.split(jax.random.key(3), 3)
  _, hist = jax.vmap(lambda k: ga.run(cfg, f, 7, key=k, progress=True))(keys)
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("[GA] gen ")]
  best, mean = np.asarray(hist.best), np.asarray(hist.mean)
  assert not np.all(best == best[:1])          # the runs differ: the first alone would show
  assert [l.split(" best=")[0] for l in lines] == [f"[GA] gen {g}/4" for g in range(5)]
  for g, line in enumerate(lines):
    assert f" best={float(best[:, g].max()):.4g} " in line, (line, best[:, g])
    assert f" mean={float(np.float32(mean[:, g]).mean()):.4g} " in line, (line, mean[:, g])


def test_progress_of_zero_generations_and_under_jit(capsys, monkeypatch, caplog):
  """generations=0 showed 'gen 0/1' for its one population; under jit nothing is shown (the
  display lives during the call only), which a warning now says, once."""
  f = lambda pop, d, h: pop.sum(1).astype(jnp.float32)
  ga.run(ga.GAConfig(population_size=6, hof_size=1, generations=0), f, 5,
         key=jax.random.key(0), progress=True)
  err = capsys.readouterr().err
  assert "[GA] gen 0/0 best=" in err and "/1" not in err
  loop = importlib.import_module("jaxprune.ga.loop")
  monkeypatch.setattr(loop, "_NOT_SHOWN_WARNED", False)
  cfg = ga.GAConfig(population_size=6, hof_size=1, generations=2)
  with caplog.at_level("WARNING"):
    jitted = jax.jit(lambda k: ga.run(cfg, f, 5, key=k, progress=True))
    jitted(jax.random.key(0))
    jax.jit(lambda k: ga.run(cfg, f, 6, key=k, progress=True))(jax.random.key(0))
  assert capsys.readouterr().err.count("gen ") == 0
  warned = [r for r in caplog.records if "progress=True shows nothing" in r.getMessage()]
  assert len(warned) == 1 and "progress=False" in warned[0].getMessage()
  caplog.clear()
  monkeypatch.setattr(loop, "_NOT_SHOWN_WARNED", False)
  with caplog.at_level("WARNING"):   # run eagerly (also under vmap) it is shown: no warning
    jax.vmap(lambda k: ga.run(cfg, f, 5, key=k, progress=True))(
        jax.random.split(jax.random.key(0), 2))
  assert "gen 2/2" in capsys.readouterr().err
  assert not [r for r in caplog.records if "progress=True" in r.getMessage()]


def test_activations_that_overflow_are_refused_not_scored_as_nan_logits():
  """Finite x and params whose hidden activations overflow: a removed unit's inf * 0 made
  every logit NaN, every individual scored alike, and the result's fitness contradicted its
  accuracy with invalid=False. search (fast and general paths) and prepare (for ga.run) now
  name the activations; a padding row of weight 0 that overflows does not count."""
  rng = np.random.default_rng(0)
  scale = np.where(np.arange(40) < 10, 100.0, 0.01)[:, None]   # 10 rows overflow
  x = host_f32(rng.normal(size=(40, 4)) * scale)
  y = jnp.asarray(rng.integers(0, 3, 40))
  model = jaxprune.MLP(in_features=4, hidden=(8,), out_features=3, activation="relu")
  p = model.init(jax.random.key(0))
  p["params"]["hidden_0"]["kernel"] = p["params"]["hidden_0"]["kernel"] * 1e37
  assert not bool(jnp.all(jnp.isfinite(model.activations(p, x, "hidden_0"))))
  cfg = ga.GAConfig(population_size=6, hof_size=2, generations=2)
  for fast_path in ("auto", False):
    with pytest.raises(ValueError, match="activations of group 'hidden_0'.*standardize"):
      ga.search(model, p, x, y, "hidden_0", key=jax.random.key(0), config=cfg,
                progress=False, fast_path=fast_path)
  fit = ga.make_fitness(model, "hidden_0", "eq5")
  with pytest.raises(ValueError, match="activations of group 'hidden_0'"):
    fit.prepare(p, x, y)
  # only the rows that overflow carry weight 0: a search as on the other rows
  h = model.activations(p, x, "hidden_0")
  ok = np.asarray(jnp.all(jnp.isfinite(h), axis=1))
  assert 0 < ok.sum() < ok.size
  x2 = jnp.where(jnp.asarray(ok)[:, None], x, 0.0)   # the same shape: one compiled program
  a = ga.search(model, p, x, y, "hidden_0", key=jax.random.key(0), config=cfg, progress=False,
                sample_weight=ok.astype(np.float32))
  b = ga.search(model, p, x2, y, "hidden_0", key=jax.random.key(0), config=cfg, progress=False,
                sample_weight=ok.astype(np.float32))
  assert not bool(a.invalid)
  np.testing.assert_array_equal(a.mask, b.mask)
  assert float(a.fitness) == float(b.fitness)


def test_a_recurrent_group_with_sample_weights_is_searched():
  """A group inside a lax.scan has activations stacked over the steps first: the check of
  non-finite activations read the steps as the patterns (a broadcasting TypeError against the
  sample weights, found by a review); it checks every value there."""
  rng = np.random.default_rng(0)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  n, steps, d, h, c = 12, 5, 3, 6, 3
  p = {"wx": f32(rng.normal(size=(d, h))), "wh": f32(0.5 * rng.normal(size=(h, h))),
       "wo": f32(rng.normal(size=(h, c))), "bo": f32(np.zeros(c))}

  def rnn(p, x):
    def step(s, xt):
      s = jnp.tanh(xt @ p["wx"] + s @ p["wh"])
      return s, s
    s, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], h)), jnp.swapaxes(x, 0, 1))
    return s @ p["wo"] + p["bo"]

  x = f32(rng.normal(size=(n, steps, d)))
  y = jnp.arange(n) % c
  t = jaxprune.trace(rnn, p, x)
  cfg = ga.GAConfig(population_size=8, generations=2)
  a = ga.search(t, p, x, y, "wx", key=jax.random.key(0), config=cfg, progress=False)
  b = ga.search(t, p, x, y, "wx", key=jax.random.key(0), config=cfg, progress=False,
                sample_weight=np.ones(n, np.float32))
  assert not bool(b.invalid) and float(a.fitness) == float(b.fitness)
  np.testing.assert_array_equal(a.mask, b.mask)
  # ... and its overflowing activations are still refused (stacked over the steps: any value)
  big = dict(p, wx=p["wx"] * 1e37)
  t = jaxprune.trace(rnn, big, x * 100)
  for sw in (None, np.ones(n, np.float32)):
    with pytest.raises(ValueError, match="activations of group 'wx'"):
      ga.search(t, big, x * 100, y, "wx", key=jax.random.key(0), config=cfg, progress=False,
                sample_weight=sw)
