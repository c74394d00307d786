"""Tests for jaxprune.pruners.distinctiveness: hand-built cases with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune.models.mlp import MLP, Autoencoder
from jaxprune.models.cnn import LeNet
import importlib
dist_lib = importlib.import_module("jaxprune.pruners.distinctiveness")
from jaxprune.pruners.distinctiveness import (distinctiveness, pairwise_angles,
                                              progressive_distinctiveness, report_actions,
                                              weight_distinctiveness)


H, P = 12, 30  # the shared tanh model's units and patterns (hand-built cases are padded)


def _ones(model):
  return jaxprune.unit_masks_ones(model)


def _masked_apply(model, apply, params, masks, x):
  w = jaxprune.expand(params, model, masks)
  return apply(jaxprune.apply_masks(params, w), x)


def _normal(seed, shape):
  """Random inputs built in NumPy (no eager JAX PRNG programs to compile)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _rot(a_deg, i, j, dim):
  """Unit vector at angle a from e_i, rotated towards e_j."""
  v = np.zeros(dim)
  a = np.radians(a_deg)
  v[i], v[j] = np.cos(a), np.sin(a)
  return v


def _set_unit(params, layer, unit, kernel_col, bias):
  """A copy of params with one unit's incoming kernel and bias replaced (built in NumPy)."""
  p = jax.tree.map(np.array, params)
  p["params"][layer]["kernel"][..., unit] = kernel_col
  p["params"][layer]["bias"][unit] = bias
  return jax.tree.map(jnp.asarray, p)


def _np(params, layer, name):
  return np.asarray(params["params"][layer][name])


@pytest.fixture(scope="module")
def mlp():
  model = MLP(in_features=5, hidden=(6,), out_features=3, activation="sigmoid")
  params = model.init(jax.random.key(0))
  x = _normal(3, (40, 5))  # no accidental pairs at 15/165 degrees among the random units
  return model, params, x, jax.jit(model.apply), jax.jit(model.activations, static_argnums=2)


@pytest.fixture(scope="module")
def tanh_model():
  """One tanh model for every hand-built case: H units, activations over P patterns.

  Hand-built cases use the first few units; the others are zero and masked off (masked units
  never take part), so all cases share one compiled sweep per configuration.
  """
  model = MLP(in_features=3, hidden=(H,), out_features=2, activation="tanh")
  return model, model.init(jax.random.key(0))


def _padded(rows, mask=None):
  """(P, H) activations whose first units are ``rows`` (vectors of any length <= P), and the
  unit masks with only those units on (or ``mask`` for them)."""
  a = np.zeros((H, P), np.float32)
  rows = np.asarray(rows, np.float32)
  a[:rows.shape[0], :rows.shape[1]] = rows
  m = np.zeros(H, bool)
  m[:rows.shape[0]] = True if mask is None else mask
  return jnp.asarray(a.T), {"hidden_0": jnp.asarray(m)}


# ----------------------------------------------------------------------------- angles


def test_pairwise_angles_exact_duplicates_and_opposites():
  v = np.asarray(_normal(0, (3, 37)))
  vecs = np.stack([v[0], v[0] * 3.0, -v[0], v[1], np.zeros(37, np.float32)])
  ang = np.asarray(pairwise_angles(vecs))
  assert ang[0, 1] == 0.0 and ang[0, 0] == 0.0
  assert ang[0, 2] == pytest.approx(180.0, abs=1e-4)
  assert np.isnan(ang[4]).all() and np.isnan(ang[:, 4]).all()
  ref = np.degrees(np.arccos(np.dot(v[0], v[1]) / np.linalg.norm(v[0]) / np.linalg.norm(v[1])))
  assert ang[0, 3] == pytest.approx(ref, abs=1e-3)


# ----------------------------------------------------------------------------- functional


def test_planted_duplicate_merge_keeps_outputs(mlp):
  model, params, x, apply, activations = mlp
  p = _set_unit(params, "hidden_0", 4, _np(params, "hidden_0", "kernel")[:, 1],
                _np(params, "hidden_0", "bias")[1])
  prune = distinctiveness(model, "hidden_0")
  p2, m2, rep = prune(p, _ones(model), activations(p, x, "hidden_0"))
  np.testing.assert_array_equal(m2["hidden_0"], [1, 1, 1, 1, 0, 1])
  assert report_actions(rep) == [{"kind": "similar", "kept": (1,), "removed": (4,),
                                  "angle": 0.0}]
  np.testing.assert_allclose(apply(p2, x), apply(p, x), atol=1e-5)
  np.testing.assert_allclose(_masked_apply(model, apply, p2, m2, x), apply(p, x), atol=1e-5)
  # The kept unit's outgoing row is the sum of both.
  w = _np(p, "out", "kernel")
  np.testing.assert_allclose(p2["params"]["out"]["kernel"][1], w[1] + w[4], rtol=1e-6)
  np.testing.assert_array_equal(p2["params"]["out"]["kernel"][4], 0.0)
  # The input params are untouched.
  assert not np.allclose(p["params"]["out"]["kernel"][4], 0.0)


def test_planted_complementary_pair(mlp):
  model, params, x, apply, activations = mlp
  p = _set_unit(params, "hidden_0", 3, -_np(params, "hidden_0", "kernel")[:, 0],
                -_np(params, "hidden_0", "bias")[0])  # o_3 = 1 - o_0
  acts = activations(p, x, "hidden_0")
  p2, m2, rep = distinctiveness(model, "hidden_0")(p, _ones(model), acts)
  np.testing.assert_array_equal(m2["hidden_0"], [0, 1, 1, 0, 1, 1])
  (a,) = report_actions(rep)
  assert a["kind"] == "complementary" and a["removed"] == (0, 3)
  assert a["angle"] == pytest.approx(180.0, abs=1e-3)
  # fold: exact for o_j = 1 - o_i whatever the outgoing weights.
  p3, m3, rep3 = distinctiveness(model, "hidden_0", fold=True)(p, _ones(model), acts)
  np.testing.assert_array_equal(m3["hidden_0"], [1, 1, 1, 0, 1, 1])
  (a3,) = report_actions(rep3)
  assert a3["kept"] == (0,) and a3["removed"] == (3,)
  np.testing.assert_allclose(apply(p3, x), apply(p, x), atol=1e-5)
  # compensate: exact when the two outgoing weight rows are equal.
  w = _np(p, "out", "kernel").copy()
  w[3] = w[0]
  pe = jax.tree.map(lambda a: a, p)
  pe["params"]["out"] = dict(pe["params"]["out"], kernel=jnp.asarray(w))
  p4, m4, _ = distinctiveness(model, "hidden_0", compensate=True)(pe, _ones(model), acts)
  np.testing.assert_array_equal(m4["hidden_0"], [0, 1, 1, 0, 1, 1])
  np.testing.assert_allclose(apply(p4, x), apply(pe, x), atol=1e-5)
  # Without compensation the outputs do change.
  p5, _, _ = distinctiveness(model, "hidden_0")(pe, _ones(model), acts)
  assert not np.allclose(apply(p5, x), apply(pe, x), atol=1e-3)


def test_constant_unit_removed_exactly(mlp):
  model, params, x, apply, activations = mlp
  p = _set_unit(params, "hidden_0", 2, np.zeros(5), 0.7)
  p2, m2, rep = distinctiveness(model, "hidden_0")(p, _ones(model), activations(p, x, "hidden_0"))
  np.testing.assert_array_equal(m2["hidden_0"], [1, 1, 0, 1, 1, 1])
  assert report_actions(rep) == [{"kind": "constant", "kept": (), "removed": (2,),
                                  "angle": None}]
  np.testing.assert_allclose(apply(p2, x), apply(p, x), atol=1e-5)


# ----------------------------------------------------------------------------- hand-built angles


def test_strict_thresholds_at_14_9_and_15_1(tanh_model):
  model, params = tanh_model
  acts, on = _padded([_rot(0, 0, 1, 4), _rot(14.9, 0, 1, 4), _rot(0, 2, 3, 4),
                      _rot(15.1, 2, 3, 4)])
  prune = distinctiveness(model, "hidden_0")
  _, m, rep = prune(params, on, acts, 15.0, 165.0)
  np.testing.assert_array_equal(m["hidden_0"][:4], [1, 0, 1, 1])
  assert not np.any(m["hidden_0"][4:])  # masked units stay off
  assert float(rep.angle[0]) == pytest.approx(14.9, abs=1e-3)
  assert float(rep.min_angle) == pytest.approx(15.1, abs=1e-3)
  assert float(rep.max_angle) == pytest.approx(90.0, abs=1e-3)
  # Complementary at 165.1 and 164.9.
  acts, on = _padded([_rot(0, 0, 1, 4), _rot(165.1, 0, 1, 4), _rot(0, 2, 3, 4),
                      _rot(164.9, 2, 3, 4)])
  _, m, rep = prune(params, on, acts, 15.0, 165.0)
  np.testing.assert_array_equal(m["hidden_0"][:4], [0, 0, 1, 1])
  assert int(rep.kind[0]) == dist_lib.COMPLEMENTARY
  # Rules switched off one at a time (Dixit: similar-only at 45, complementary-only at 140).
  _, m, _ = distinctiveness(model, "hidden_0", complementary=False)(params, on, acts, 45.0)
  np.testing.assert_array_equal(m["hidden_0"][:4], [1, 1, 1, 1])
  _, m, rep = distinctiveness(model, "hidden_0", similar=False)(params, on, acts,
                                                                complementary_deg=140.0)
  np.testing.assert_array_equal(m["hidden_0"][:4], [1, 0, 0, 0])  # all four qualify: keep one
  assert bool(rep.kept_last)


def test_unit_in_two_qualifying_pairs_and_absorb(tanh_model):
  model, params = tanh_model
  # 0-1 at 3 deg, 0-2 at 8 deg, 1-2 at about 8.5 deg, 3 far away.
  acts, on = _padded([_rot(0, 0, 1, 4), _rot(3, 0, 1, 4), _rot(8, 0, 2, 4), _rot(90, 0, 3, 4)])
  _, m, rep = distinctiveness(model, "hidden_0")(params, on, acts)
  np.testing.assert_array_equal(m["hidden_0"][:4], [1, 0, 1, 1])
  assert int(rep.count) == 1
  p2, m, rep = distinctiveness(model, "hidden_0", absorb=True)(params, on, acts)
  np.testing.assert_array_equal(m["hidden_0"][:4], [1, 0, 0, 1])
  assert [(a["kept"], a["removed"]) for a in report_actions(rep)] == [((0,), (1,)),
                                                                      ((0,), (2,))]
  w = _np(params, "out", "kernel")
  np.testing.assert_allclose(p2["params"]["out"]["kernel"][0], w[0] + w[1] + w[2], rtol=1e-6)


def test_ties_go_to_lower_index(tanh_model):
  model, params = tanh_model
  e = _rot(0, 0, 1, 4)
  # 1, 2, 3 pairwise at exactly 0 degrees
  acts, on = _padded([_rot(90, 0, 3, 4), e, e * 2, e * 3])
  _, m, rep = distinctiveness(model, "hidden_0")(params, on, acts)
  np.testing.assert_array_equal(m["hidden_0"][:4], [1, 1, 0, 1])
  assert (int(rep.first[0]), int(rep.second[0])) == (1, 2)


def test_similar_before_complementary_on_equal_excess(tanh_model):
  model, params = tanh_model
  # (0, 1) at exactly 0 deg, (0, 2) and (1, 2) at exactly 180: 15 past both thresholds.
  e0 = _rot(0, 0, 1, 4)
  acts, on = _padded([e0, e0, -e0, _rot(90, 0, 3, 4)])
  big = np.float32(np.asarray(pairwise_angles(acts.T))[0, 2])
  comp = np.float32(big - np.float32(15.0))
  assert big - comp == np.float32(15.0)
  _, m, rep = distinctiveness(model, "hidden_0")(params, on, acts, 15.0, comp)
  assert int(rep.kind[0]) == dist_lib.SIMILAR and int(rep.count) == 1
  np.testing.assert_array_equal(m["hidden_0"][:4], [1, 0, 1, 1])


def test_masked_units_never_take_part(tanh_model):
  model, params = tanh_model
  e = _rot(0, 0, 1, 4)
  acts, on = _padded([e, e, _rot(90, 0, 2, 4), _rot(90, 0, 3, 4)], mask=[0, 1, 1, 1])
  _, m, rep = distinctiveness(model, "hidden_0")(params, on, acts)
  np.testing.assert_array_equal(m["hidden_0"][:4], [0, 1, 1, 1])
  assert int(rep.count) == 0


def test_keeps_at_least_one_unit(tanh_model):
  model, params = tanh_model
  e = _rot(0, 0, 1, 4)
  acts, on = _padded([e, -e, e, e], mask=[1, 1, 0, 0])
  _, m, rep = distinctiveness(model, "hidden_0")(params, on, acts)
  np.testing.assert_array_equal(m["hidden_0"], np.arange(H) == 0)
  assert bool(rep.kept_last)


# ----------------------------------------------------------------------------- reference + paths


def _reference_sweep(acts, sim, comp, absorb):
  """Straight NumPy: sort qualifying pairs by (excess desc, kind, i, j), walk them."""
  v = acts.T.astype(np.float64)
  h = v.shape[0]
  u = v / np.linalg.norm(v, axis=1, keepdims=True)
  ang = np.degrees(np.arccos(np.clip(u @ u.T, -1, 1)))
  pairs = []
  for i in range(h):
    for j in range(i + 1, h):
      if ang[i, j] < sim:
        pairs.append((-(sim - ang[i, j]), 0, i, j))
      elif ang[i, j] > comp:
        pairs.append((-(ang[i, j] - comp), 1, i, j))
  pairs.sort()
  used, keeper, keep = np.zeros(h, bool), np.zeros(h, bool), np.ones(h, bool)
  for _, kind, i, j in pairs:
    if kind == 0 and not used[j] and (not used[i] or (absorb and keeper[i])):
      keep[j] = False
      keeper[i] = used[i] = used[j] = True
    elif kind == 1 and not used[i] and not used[j]:
      keep[i] = keep[j] = False
      used[i] = used[j] = True
  return keep


def _random_acts(seed=0, dim=3):
  """H vectors in ``dim`` dimensions, as (P, H) activations: many pairs at loose thresholds."""
  rng = np.random.default_rng(seed)
  return jnp.asarray((rng.normal(size=(H, dim)) @ rng.normal(size=(dim, P))).T, jnp.float32)


@pytest.mark.parametrize("absorb", [False, True])
def test_matches_numpy_reference_fast_and_slow_paths(tanh_model, absorb):
  model, params = tanh_model
  acts = _random_acts()
  ref = _reference_sweep(np.asarray(acts), 40.0, 140.0, absorb)
  # The default path sorts every candidate; _candidates=0 forces the many-candidates fallback.
  fast = distinctiveness(model, "hidden_0", absorb=absorb)
  slow = distinctiveness(model, "hidden_0", absorb=absorb, _candidates=0)
  pf, mf, rf = fast(params, _ones(model), acts, 40.0, 140.0)
  ps, ms, rs = slow(params, _ones(model), acts, 40.0, 140.0)
  assert int(rf.count) > 3 and not np.any(rf.kind == dist_lib.CONSTANT)
  np.testing.assert_array_equal(mf["hidden_0"], ref)
  np.testing.assert_array_equal(ms["hidden_0"], ref)
  for a, b in zip(jax.tree.leaves((pf, rf)), jax.tree.leaves((ps, rs))):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- conv groups


@pytest.fixture(scope="module")
def lenet():
  model = LeNet(input_shape=(16, 16, 1))
  params = model.init(jax.random.key(0))
  x = _normal(1, (6, 16, 16, 1))
  return model, params, x, jax.jit(model.apply), jax.jit(model.activations, static_argnums=2)


@pytest.mark.parametrize("name", ["conv_0", "conv_1"])
def test_conv_duplicate_channel_merge(lenet, name):
  model, params, x, apply, activations = lenet
  p = _set_unit(params, name, 5, _np(params, name, "kernel")[..., 2], _np(params, name, "bias")[2])
  acts = activations(p, x, name)
  prune = distinctiveness(model, name)
  p2, m2, rep = prune(p, _ones(model), acts)
  acted = report_actions(rep)
  assert {"kind": "similar", "kept": (2,), "removed": (5,), "angle": 0.0} in acted
  assert not m2[name][5]
  # Other actions on random channels may change outputs; check only the planted merge.
  if len(acted) == 1:
    np.testing.assert_allclose(apply(p2, x), apply(p, x), atol=1e-4)
  # Similar merges only (complementary off at 180, constants off at tolerance 0): the same
  # compiled sweep with other traced settings.
  p3, m3, _ = prune(p, _ones(model), acts, 1e-3, 180.0, 0.0)
  assert int(np.sum(m3[name])) == model.groups[name].size - 1
  np.testing.assert_allclose(apply(p3, x), apply(p, x), atol=1e-4)


def test_conv_constant_channel_folds_into_next_conv(lenet):
  model, params, x, apply, activations = lenet
  k = _np(params, "conv_0", "kernel")
  p = _set_unit(params, "conv_0", 7, np.zeros(k.shape[:-1]), 0.3)  # relu(0.3) everywhere
  # Constants only: similar off at 0 degrees, complementary off at 180.
  prune = distinctiveness(model, "conv_0")
  p2, m2, _ = prune(p, _ones(model), activations(p, x, "conv_0"), 0.0, 180.0)
  assert not m2["conv_0"][7] and int(np.sum(m2["conv_0"])) == 15
  np.testing.assert_allclose(apply(p2, x), apply(p, x), atol=1e-4)


def test_weight_distinctiveness_incoming_and_outgoing(lenet):
  model, params, x, apply, _ = lenet
  k = _np(params, "conv_0", "kernel")
  b = _np(params, "conv_0", "bias")
  p = _set_unit(params, "conv_0", 9, k[..., 4] * 2.0, b[4])  # same direction, other scale
  p = _set_unit(p, "conv_0", 11, np.zeros(k.shape[:-1]), 0.2)  # zero filter: constant relu(.2)
  prune = weight_distinctiveness(model, "conv_0")
  p2, m2, rep = prune(p, _ones(model), 1.0, 180.0)  # complementary off at 180
  np.testing.assert_array_equal(np.flatnonzero(~np.asarray(m2["conv_0"])), [9, 11])
  kinds = [(a["kind"], a["removed"]) for a in report_actions(rep)]
  assert kinds == [("constant", (11,)), ("similar", (9,))]
  # Removing the zero filter is exact: compare against the merge-free prune.
  p3, m3, _ = prune(p, _ones(model), 0.0, 180.0)
  np.testing.assert_array_equal(np.flatnonzero(~np.asarray(m3["conv_0"])), [11])
  np.testing.assert_allclose(apply(p3, x), apply(p, x), atol=1e-4)
  # Outgoing: duplicate consumer rows of the flatten consumer (conv_1 -> out).
  w = _np(p, "out", "kernel").reshape(-1, 32, 7).copy()
  w[:, 3] = w[:, 1] * 0.5
  p4 = jax.tree.map(lambda a: a, p)
  p4["params"]["out"] = dict(p4["params"]["out"], kernel=jnp.asarray(w.reshape(-1, 7)))
  out = weight_distinctiveness(model, "conv_1", source="outgoing")
  _, m5, rep5 = out(p4, _ones(model), 1.0, 180.0, 0.0)  # similar only
  assert report_actions(rep5)[0]["removed"] == (3,)
  assert int(np.sum(m5["conv_1"])) == 31


# ----------------------------------------------------------------------------- traced thresholds


def test_vmap_over_thresholds_equals_loop_and_no_recompile(tanh_model):
  model, params = tanh_model
  acts = _random_acts(seed=2, dim=3)
  prune = distinctiveness(model, "hidden_0", complementary=False)
  angles = jnp.arange(0.0, 91.0, 5.0)
  assert angles.shape == (19,)
  vp, vm, vr = jax.vmap(prune, in_axes=(None, None, None, 0))(params, _ones(model), acts, angles)
  counts = []
  for n, a in enumerate(np.asarray(angles)):
    p, m, r = prune(params, _ones(model), acts, float(a))
    np.testing.assert_array_equal(vm["hidden_0"][n], m["hidden_0"])
    np.testing.assert_array_equal(vr.count[n], r.count)
    np.testing.assert_allclose(vp["params"]["out"]["kernel"][n], p["params"]["out"]["kernel"],
                               rtol=1e-6, atol=1e-6)
    counts.append(int(r.count))
  assert counts[0] == 0 and counts[-1] > counts[3]
  before = prune.trace_count()
  prune(params, _ones(model), acts, 33.0)
  prune(params, _ones(model), acts, jnp.float32(44.0))
  assert prune.trace_count() == before  # new values, no new trace


# ----------------------------------------------------------------------------- bad input


def test_bad_input(mlp):
  model, params, x, _, activations = mlp
  prune = distinctiveness(model, "hidden_0")
  acts = np.asarray(activations(params, x, "hidden_0"))
  nan_acts = acts.copy()
  nan_acts[3, 2] = np.nan
  with pytest.raises(ValueError, match="6 units"):
    prune(params, _ones(model), acts[:, :5])
  with pytest.raises(ValueError, match="NaN"):
    prune(params, _ones(model), nan_acts)
  with pytest.raises(ValueError, match=r"\[0, 180\]"):
    prune(params, _ones(model), acts, 190.0)
  with pytest.raises(ValueError, match="smaller than complementary"):
    prune(params, _ones(model), acts, 90.0, 80.0)
  with pytest.raises(KeyError, match="hidden_0"):
    distinctiveness(model, "conv_7")
  with pytest.raises(ValueError, match="shape"):
    prune(params, {"hidden_0": jnp.ones(4, bool)}, acts)
  # Under jit: nothing changes and the report says so.
  run = jax.jit(lambda a, s: prune(params, _ones(model), a, s))
  p2, m2, rep = run(nan_acts, 15.0)
  assert bool(rep.invalid) and int(rep.count) == 0
  assert bool(np.all(m2["hidden_0"]))
  p3, m3, rep3 = run(acts, 200.0)
  assert bool(rep3.invalid)


# ----------------------------------------------------------------------------- progressive


def test_progressive_autoencoder():
  model = Autoencoder(in_features=6, hidden=(5,))
  params = model.init(jax.random.key(0))
  params = _set_unit(params, "hidden_0", 3, _np(params, "hidden_0", "kernel")[:, 0],
                     _np(params, "hidden_0", "bias")[0])  # 0 and 3 duplicate
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(32, 6)), jnp.float32)
  loss = lambda p: jnp.mean((model.apply(p, x) - x) ** 2)
  run = progressive_distinctiveness(model, "hidden_0", loss)
  p, m, rep = run(params, _ones(model), x)
  assert int(rep.count) == 5
  np.testing.assert_array_equal(rep.units_kept, [5, 4, 3, 2, 1])
  assert float(rep.min_angle[0]) == 0.0
  # The first step merges the duplicate: loss unchanged.
  assert float(rep.loss[1]) == pytest.approx(float(rep.loss[0]), rel=1e-5)
  np.testing.assert_array_equal(rep.unit_masks[1], [1, 1, 1, 0, 1])
  assert np.isnan(rep.min_angle[4])
  assert int(np.sum(m["hidden_0"])) == 1
  assert np.all(np.diff(np.asarray(rep.units_kept)) <= 0)


def test_bias_folds_refused_where_they_cannot_be_exact():
  cnn = jaxprune.CNN4(input_shape=(67, 67, 3), channels=(4, 6, 8, 8), dense=(12, 10, 9))
  with pytest.raises(ValueError, match="'conv_1' cannot fold.*zero-padded.*constants=False"):
    distinctiveness(cnn, "conv_1")
  with pytest.raises(ValueError, match="Pass constants=False, compensate=False"):
    distinctiveness(cnn, "conv_2", compensate=True)
  with pytest.raises(ValueError, match="consumer has no bias"):
    jaxprune.weight_distinctiveness(jaxprune.ResNet18(input_shape=(32, 32, 3)), "layer1_0")
  # Merging and complementary removal stay available there; VALID-read groups fold as usual.
  distinctiveness(cnn, "conv_1", constants=False)
  distinctiveness(cnn, "conv_3")
