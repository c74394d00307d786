"""One contract for every structured pruner: ``make(target, group, **static)`` returns
``prune(params, unit_masks, *data, *traced) -> (params, unit_masks, report)`` with a NamedTuple
report; it runs under ``jit``, ``vmap``s over a traced setting, zeroes every slice of the units it
removes, and its new params are already masked by ``expand`` of its new unit masks.

The weight-mask family (magnitude and random pruning) keeps the same shape on weight masks:
``prune(params, weight_masks, fraction) -> (params, weight_masks, report)``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from conftest import host_f32

MODEL = jaxprune.MLP(in_features=4, hidden=(8,), out_features=3, activation="tanh")
RNG = np.random.default_rng(0)
PARAMS = jax.tree.map(lambda a: host_f32(RNG.normal(size=a.shape)),
                      MODEL.init(jax.random.key(0)))
X = host_f32(RNG.normal(size=(30, 4)))
ACTS = MODEL.activations(PARAMS, X, "hidden_0")
_LOSS = lambda p: jnp.mean(MODEL.apply(p, X) ** 2)

_W = jnp.asarray(np.r_[np.ones(22), np.zeros(8)], jnp.float32)


def _weighted(prune):
  return lambda p, m, acts, setting: prune(p, m, acts, setting, sample_weight=_W)


# name -> (factory call, data before the traced setting, the traced settings to vmap over)
PRUNERS = {
    "distinctiveness": (lambda: jaxprune.distinctiveness(MODEL, "hidden_0", constants=False),
                        (ACTS,), jnp.array([30.0, 60.0, 89.0])),
    "weight_distinctiveness": (lambda: jaxprune.weight_distinctiveness(
        MODEL, "hidden_0", constants=False), (), jnp.array([40.0, 70.0, 89.0])),
    "importance_prune": (lambda: jaxprune.importance_prune(MODEL, "hidden_0"), (),
                         jnp.array([1, 3, 5])),
    "group_redundancy": (lambda: jaxprune.group_redundancy(MODEL, "hidden_0"), (ACTS,),
                         jnp.array([1e-3, 0.3, 0.9])),
    "iterative_importance": (lambda: jaxprune.iterative_importance(MODEL, "hidden_0", _LOSS), (),
                             jnp.array([0.0, 0.05, 1.0])),
    # Sample weights (0 marks padding): the same contract.
    "distinctiveness_weighted": (lambda: _weighted(jaxprune.distinctiveness(
        MODEL, "hidden_0", constants=False)), (ACTS,), jnp.array([30.0, 60.0, 89.0])),
    "group_redundancy_weighted": (lambda: _weighted(jaxprune.group_redundancy(
        MODEL, "hidden_0")), (ACTS,), jnp.array([1e-3, 0.3, 0.9])),
    "progressive_distinctiveness": (lambda: jaxprune.progressive_distinctiveness(
        MODEL, "hidden_0", lambda p: _LOSS(p)), (X,), jnp.array([1e-6, 1e-3, 1e-1])),
}


def _check_result(params, unit_masks, report):
  assert isinstance(report, tuple) and hasattr(report, "_fields")     # a NamedTuple
  wm = jaxprune.expand(params, MODEL, unit_masks, allow_empty=True)
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(wm)):
    assert float(jnp.max(jnp.abs(jnp.where(m, 0.0, p)))) == 0.0        # removed slices are zero
  again = jaxprune.apply_masks(params, wm)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_pruner_contract(name):
  make, data, settings = PRUNERS[name]
  prune = make()
  um = jaxprune.unit_masks_ones(MODEL)
  eager = prune(PARAMS, um, *data, settings[1])
  _check_result(*eager)
  jitted = jax.jit(lambda p, m, s: prune(p, m, *data, s))(PARAMS, um, settings[1])
  np.testing.assert_array_equal(jitted[1]["hidden_0"], eager[1]["hidden_0"])
  for a, b in zip(jax.tree.leaves(jitted[0]), jax.tree.leaves(eager[0])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  batched = jax.vmap(lambda s: prune(PARAMS, um, *data, s))(settings)
  for i, s in enumerate(settings):
    one = prune(PARAMS, um, *data, s)
    np.testing.assert_array_equal(batched[1]["hidden_0"][i], one[1]["hidden_0"])
    _check_result(jax.tree.map(lambda a: a[i], batched[0]),
                  {"hidden_0": batched[1]["hidden_0"][i]}, one[2])


@pytest.mark.parametrize("name", sorted(PRUNERS))
def test_pruner_refuses_a_unit_mask_that_keeps_no_unit(name):
  """A concrete all-False unit mask of the pruned group is refused (check_unit_masks and
  compact refuse one; the activation pruners used to return it as it was)."""
  make, data, settings = PRUNERS[name]
  with pytest.raises(ValueError, match="'hidden_0' keeps no unit"):
    make()(PARAMS, {"hidden_0": jnp.zeros((8,), bool)}, *data, settings[1])


# The weight-mask family: name -> prune(params, weight_masks, fraction).
WEIGHT_PRUNERS = {
    "magnitude_prune": jaxprune.magnitude_prune,
    "magnitude_prune_global": lambda p, m, f: jaxprune.magnitude_prune(p, m, f, scope="global"),
    "random_prune": lambda p, m, f: jaxprune.random_prune(p, m, f, key=jax.random.key(1)),
}


def _check_weight_result(params, weight_masks, report):
  assert isinstance(report, tuple) and hasattr(report, "_fields")     # a NamedTuple
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(weight_masks)):
    assert float(jnp.max(jnp.abs(jnp.where(m, 0.0, p)))) == 0.0        # removed weights are zero
  kernels = [m for m in jax.tree.leaves(weight_masks) if m.ndim >= 2]
  np.testing.assert_array_equal(report.kept, [int(m.sum()) for m in kernels])


@pytest.mark.parametrize("name", sorted(WEIGHT_PRUNERS))
def test_weight_pruner_contract(name):
  prune = WEIGHT_PRUNERS[name]
  eager = prune(PARAMS, None, 0.5)
  _check_weight_result(*eager)
  jitted = jax.jit(lambda p, f: prune(p, None, f))(PARAMS, 0.5)
  for a, b in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager)):
    np.testing.assert_array_equal(a, b)
  fractions = jnp.array([0.1, 0.5, 0.9])
  batched = jax.vmap(lambda f: prune(PARAMS, None, f))(fractions)
  for i, f in enumerate(fractions):
    one = prune(PARAMS, None, f)
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(one)):
      np.testing.assert_array_equal(a[i], b)
    _check_weight_result(*one)


def test_traced_bad_settings_and_weights_set_invalid_and_change_nothing():
  """Found by an outside review: under jit, sample weights with a single positive entry made
  distinctiveness remove 7 of 8 units and group_redundancy all but one (every unit is constant
  over one pattern), with invalid False; progressive_distinctiveness had no invalid flag at all
  (a NaN constant_tol ran as 0); group_redundancy truncated a max_remove of 2.7 to 2 and took a
  traced -1 silently. Each now flags the run and changes nothing; eager calls raise."""
  one = jnp.zeros((30,)).at[3].set(1.0)
  um = jaxprune.unit_masks_ones(MODEL)
  dist = jaxprune.distinctiveness(MODEL, "hidden_0", constants=False)
  red = jaxprune.group_redundancy(MODEL, "hidden_0")
  prog = jaxprune.progressive_distinctiveness(MODEL, "hidden_0", _LOSS)
  for prune, args in ((dist, (ACTS, 60.0)), (red, (ACTS, 0.3))):
    p, m, rep = jax.jit(lambda w: prune(PARAMS, um, *args, sample_weight=w))(one)
    assert bool(rep.invalid) and bool(jnp.all(m["hidden_0"]))
    with pytest.raises(ValueError, match="1 pattern"):
      prune(PARAMS, um, *args, sample_weight=one)
  # One jitted function per pruner, so that cases of the same types share one compilation.
  traced_prog = jax.jit(lambda w, t: prog(PARAMS, um, X, t, sample_weight=w))
  for w, tol in ((one, 1e-6), (jnp.ones((30,)), jnp.nan), (-jnp.ones((30,)), 1e-6)):
    _, m, rep = traced_prog(w, tol)
    assert bool(rep.invalid) and int(rep.count) == 1 and bool(jnp.all(m["hidden_0"]))
  _, _, rep = prog(PARAMS, um, X)
  assert not bool(rep.invalid) and int(rep.count) == 8
  with pytest.raises(ValueError, match="1 pattern"):
    prog(PARAMS, um, X[:1])
  with pytest.raises(ValueError, match="1 pattern"):
    prog(PARAMS, um, X, sample_weight=one)

  traced_red = jax.jit(lambda k: red(PARAMS, um, ACTS, jnp.inf, k))
  for k in (2.7, -1.0, jnp.nan):
    _, m, rep = traced_red(k)
    assert bool(rep.invalid) and int(rep.count) == 0 and bool(jnp.all(m["hidden_0"]))
    with pytest.raises(ValueError, match="max_remove must be a whole number"):
      red(PARAMS, um, ACTS, jnp.inf, k)
  for k in (2, 2.0, jnp.inf):
    _, _, rep = traced_red(k)
    assert not bool(rep.invalid) and int(rep.count) == (7 if k == jnp.inf else 2)


def test_integer_params_are_refused_where_a_pruner_would_fold_fractions_into_them():
  """Folding sigmoid(0) = 0.5 times an int32 row into an int32 bias truncated it: a constant
  unit was removed and the output moved, without a word (weight_distinctiveness failed inside
  jax on the logistic of an int bias). Every rule that writes computed values now names the
  leaves and the fix (merges too: see the int8 test below); the rules that only zero units
  still run."""
  model = jaxprune.MLP(in_features=4, hidden=(3,), out_features=2)   # sigmoid
  p = jax.tree.map(lambda a: jnp.round(a * 4).astype(jnp.int32), model.init(jax.random.key(0)))
  p["params"]["hidden_0"]["kernel"] = p["params"]["hidden_0"]["kernel"].at[:, 1].set(0)
  um = jaxprune.unit_masks_ones(model)
  x = jnp.arange(24.0).reshape(6, 4)
  acts = model.activations(p, x, "hidden_0")            # unit 1 is constant: sigmoid(bias)
  fix = r"integer leaf would truncate or wrap around.*astype\(jnp.float32\)"
  for call in (lambda: jaxprune.distinctiveness(model, "hidden_0")(p, um, acts),
               lambda: jaxprune.weight_distinctiveness(model, "hidden_0")(p, um),
               lambda: jaxprune.group_redundancy(model, "hidden_0")(p, um, acts),
               lambda: jaxprune.progressive_distinctiveness(
                   model, "hidden_0", lambda q: jnp.float32(0.0))(p, um, x)):
    with pytest.raises(ValueError, match=r"params/out/(kernel|bias) \(int32\).*" + fix):
      call()
  with pytest.raises(ValueError, match="constants=False"):
    jaxprune.weight_distinctiveness(model, "hidden_0")(p, um)
  # the same network in float32: the fold is exact there, and int merges/zeroing still run
  pf = jax.tree.map(lambda a: a.astype(jnp.float32), p)
  out, masks, _ = jaxprune.distinctiveness(model, "hidden_0", similar=False,
                                           complementary=False)(pf, um, acts)
  assert not bool(masks["hidden_0"][1])
  np.testing.assert_allclose(model.apply(out, x), model.apply(pf, x), atol=1e-6)
  jaxprune.distinctiveness(model, "hidden_0", similar=False, constants=False)(p, um, acts)
  jaxprune.weight_distinctiveness(model, "hidden_0", source="outgoing", similar=False,
                                  constants=False)(p, um)
  jaxprune.importance_prune(model, "hidden_0")(p, um, 1)
  # an integer bias that is only read (act(b1) of the zero-weight unit) is not refused
  pb = {"params": {**pf["params"], "hidden_0": {**pf["params"]["hidden_0"],
                                                "bias": p["params"]["hidden_0"]["bias"]}}}
  out, masks, _ = jaxprune.weight_distinctiveness(model, "hidden_0", similar=False,
                                                  complementary=False)(pb, um)
  assert not bool(masks["hidden_0"][1])
  np.testing.assert_allclose(model.apply(out, x), model.apply(pb, x), atol=1e-5)


def test_merges_into_int8_codes_are_refused_rather_than_wrapped():
  """A dequantised consumer (int8 codes times a scale): merging an exact duplicate added its
  codes to the kept unit's in int8, 88 + 82 stored as -86, and the output moved by ~20 without a
  word. Every rule that merges names the int8 leaf and the fix; in float the merge is exact."""
  rng = np.random.default_rng(0)

  def fn(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    return h @ (p["q2"].astype(x.dtype) * p["s2"]) + p["b2"]

  w1 = rng.normal(size=(5, 6)).astype(np.float32)
  w1[:, 5] = w1[:, 0]                                        # unit 5 duplicates unit 0
  p = {"w1": jnp.asarray(w1), "b1": jnp.full((6,), 3.0), "s2": jnp.asarray([0.01, 0.02, 0.03]),
       "q2": jnp.asarray(rng.integers(60, 127, size=(6, 3)), jnp.int8), "b2": jnp.zeros(3)}
  x = jnp.asarray(rng.normal(size=(8, 5)), jnp.float32)
  t = jaxprune.trace(fn, p, x)
  um = jaxprune.unit_masks_ones(t)
  acts = t.activations(p, x, "w1")
  wrap = r"merg.*q2 \(int8\).*wrap around.*astype\(jnp.float32\)"
  for call in (
      lambda: jaxprune.distinctiveness(t, "w1", constants=False, complementary=False)(
          p, um, acts),
      lambda: jaxprune.weight_distinctiveness(t, "w1", source="outgoing", constants=False)(
          p, um),
      lambda: jaxprune.progressive_distinctiveness(t, "w1", lambda q: jnp.float32(0.0),
                                                 constants=False)(p, um, x)):
    with pytest.raises(ValueError, match=wrap):
      call()
  with pytest.raises(ValueError, match="similar=False"):
    jaxprune.distinctiveness(t, "w1", constants=False)(p, um, acts)
  # the rules that only zero units run on the int8 codes; the merge is exact in float
  _, masks, _ = jaxprune.distinctiveness(t, "w1", similar=False, constants=False)(p, um, acts)
  assert bool(jnp.all(masks["w1"]))
  pf = dict(p, q2=p["q2"].astype(jnp.float32))
  tf = jaxprune.trace(fn, pf, x)
  out, masks, _ = jaxprune.distinctiveness(tf, "w1", constants=False, complementary=False)(
      pf, um, tf.activations(pf, x, "w1"))
  assert np.asarray(masks["w1"]).tolist() == [True] * 5 + [False]
  assert float(out["q2"][0, 0]) == float(p["q2"][0, 0]) + float(p["q2"][5, 0])   # above 127
  np.testing.assert_allclose(fn(out, x), fn(pf, x), rtol=1e-5, atol=1e-5)
