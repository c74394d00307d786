"""Tests for jaxprune.pruners.distinctiveness_pruning: hand-built cases with known answers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import host_f32
import jaxprune
from jaxprune.models.mlp import MLP, Autoencoder
from jaxprune.models.cnn import LeNet
from jaxprune.pruners import distinctiveness_pruning as dist_lib
from jaxprune.pruners import selection as selection_lib
from jaxprune.pruners import (distinctiveness, pairwise_angles, progressive_distinctiveness,
                              report_actions, weight_distinctiveness)


H, P = 12, 30  # the shared tanh model's units and patterns (hand-built cases are padded)


def _ones(model):
  return jaxprune.unit_masks_ones(model)


def _masked_apply(model, apply, params, masks, x):
  w = jaxprune.expand(params, model, masks)
  return apply(jaxprune.apply_masks(params, w), x)


def _normal(seed, shape):
  """Random inputs built in NumPy (no eager JAX PRNG programs to compile)."""
  return host_f32(np.random.default_rng(seed).normal(size=shape))


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
  # Exactly 0 on CPU; a GPU's matmul sums the Gram matrix's diagonal and off-diagonal entries
  # in other orders (an H200 gave 0.028 degrees), far below any pruning threshold.
  exact = jax.default_backend() == "cpu"
  assert ang[0, 1] == pytest.approx(0.0, abs=0 if exact else 0.1)
  assert ang[0, 0] == pytest.approx(0.0, abs=0 if exact else 0.1)
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


def _conv_flatten_dense(layout):
  """A sigmoid conv whose channel 1 is 1 - channel 0, read through a flatten by a dense layer
  (each position with its own rows), in Flax's NHWC order or PyTorch's NCHW flatten."""
  def fn(p, x):
    y = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.sigmoid(y + p["kb"])
    if layout == "NCHW":
      h = h.transpose(0, 3, 1, 2)
    if layout == "flipped":
      h = h[:, :, ::-1]
    return h.reshape(h.shape[0], -1) @ p["w"] + p["b"]
  rng = np.random.default_rng(0)
  k, kb = rng.normal(size=(3, 3, 2, 3)), rng.normal(size=3)
  k[..., 1], kb[1] = -k[..., 0], -kb[0]
  p = {"k": k, "kb": kb, "w": rng.normal(size=(48, 3)), "b": np.zeros(3)}
  p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), p)
  x = host_f32(rng.normal(size=(20, 6, 6, 2)))
  return fn, p, x


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_compensate_through_a_flatten_keeps_the_mean_output(layout):
  """compensate adds the removed units' mean contribution: through a flatten each position has
  its own rows, so the means are taken per position (the mean output over the patterns stays
  where it was; the overall mean times the rows' sum moved it by about 0.4)."""
  fn, p, x = _conv_flatten_dense(layout)
  t = jaxprune.trace(fn, p, x)
  assert t.groups["k"].consumers[0].positions_in_order
  acts = t.activations(p, x, "k")
  before = np.asarray(t.apply(p, x)).mean(0)
  ones = jaxprune.unit_masks_ones(t)
  prune = distinctiveness(t, "k", similar=False, compensate=True)
  p2, m2, _ = prune(p, ones, acts, 15.0, 165.0)
  np.testing.assert_array_equal(m2["k"], [False, False, True])
  np.testing.assert_allclose(np.asarray(t.apply(p2, x)).mean(0), before, atol=2e-5)
  # Sample weights: weight 0 drops a pattern, weight 2 counts it twice.
  w = np.ones(20, np.float32)
  w[:5], w[5:8] = 0.0, 2.0
  xs = np.concatenate([x[5:], x[5:8]])
  p3, m3, _ = prune(p, ones, acts, 15.0, 165.0, sample_weight=w)
  np.testing.assert_array_equal(m3["k"], m2["k"])
  np.testing.assert_allclose(np.asarray(t.apply(p3, xs)).mean(0),
                             np.asarray(t.apply(p, xs)).mean(0), atol=2e-5)
  # Progressive, one step: the complementary pair goes first (3 units left), same mean output.
  mean_moved = lambda q: jnp.max(jnp.abs(t.apply(q, x).mean(0) - before))
  _, _, rep = progressive_distinctiveness(t, "k", mean_moved, complementary=True,
                                         compensate=True)(p, ones, x)
  np.testing.assert_array_equal(rep.unit_masks[1], [False, False, True])
  assert float(rep.loss[1]) < 2e-5


def test_compensate_through_a_flip_before_the_flatten_folds_overall_means():
  """The tracer reports the activations before the flip, the flatten reads them flipped: a
  position's mean would meet another position's rows, so each unit's mean over all positions
  is folded (times the rows' sum), as for a consumer that reads every position alike."""
  fn, p, x = _conv_flatten_dense("flipped")
  t = jaxprune.trace(fn, p, x)
  (con,) = t.groups["k"].consumers
  assert not con.positions_in_order
  acts = t.activations(p, x, "k")
  p2, m2, _ = distinctiveness(t, "k", similar=False, compensate=True)(
      p, jaxprune.unit_masks_ones(t), acts, 15.0, 165.0)
  np.testing.assert_array_equal(m2["k"], [False, False, True])
  a = np.asarray(acts, np.float64).reshape(-1, 3)
  rows = np.asarray(p["w"], np.float64).reshape(16, 3, 3)
  want = sum(a[:, c].mean() * rows[:, c].sum(0) for c in (0, 1))
  np.testing.assert_allclose(np.asarray(p2["b"]), want, rtol=1e-5, atol=1e-5)


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
  assert int(rep.kind[0]) == selection_lib.COMPLEMENTARY
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
  assert int(rep.kind[0]) == selection_lib.SIMILAR and int(rep.count) == 1
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


def _walk(pairs, h, absorb):
  """The sequential definition: walk pairs (sorted) and apply each one its units allow.

  ``pairs`` are (sort key..., kind, i, j) with kind 0 similar, 1 complementary. Returns the
  removed flags and the actions as (kind, kept, removed) in the order they were applied.
  """
  free, keeper, removed = np.ones(h, bool), np.zeros(h, bool), np.zeros(h, bool)
  actions = []
  for *_, kind, i, j in pairs:
    if kind == 0:
      if absorb:
        ok = not removed[i] and not removed[j] and not (keeper[i] and keeper[j])
        k, r = (j, i) if keeper[j] else (i, j)  # an existing keeper absorbs; else the lower
      else:
        ok, (k, r) = free[i] and free[j], (i, j)
      if ok:
        removed[r], keeper[k] = True, True
        free[i] = free[j] = False
        actions.append(("similar", (k,), (r,)))
    elif free[i] and free[j]:
      removed[i] = removed[j] = True
      free[i] = free[j] = False
      actions.append(("complementary", (), (i, j)))
  return removed, actions


def _reference_sweep(acts, sim, comp, absorb):
  """Straight NumPy in float64: sort qualifying pairs by (excess desc, kind, i, j), walk them."""
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
  return ~_walk(pairs, h, absorb)[0]


def _ranked_pairs(ang, ok, sim, comp, similar, complementary):
  """Qualifying pairs of a float32 angle matrix, sorted as the sweep ranks them: excess
  (computed in float32, as the library does) descending, similar first, then (i, j)."""
  h = ang.shape[0]
  sim32, comp32 = np.float32(sim), np.float32(comp)
  pairs = []
  for i in range(h):
    for j in range(i + 1, h):
      if not (ok[i] and ok[j]):
        continue
      ex_s, ex_c = sim32 - ang[i, j], ang[i, j] - comp32
      if similar and ex_s > 0:
        pairs.append((-float(ex_s), 0, i, j))
      elif complementary and ex_c > 0:
        pairs.append((-float(ex_c), 1, i, j))
  return sorted(pairs)


def _sequential_sweep(vecs, active, sim, comp, *, absorb, similar, complementary, constants,
                      tol=1e-6):
  """The whole sweep's definition in plain Python on the library's float32 angles: constants,
  then the walk, then keep-one. Returns the keep mask and the actions (kind, kept, removed)."""
  vecs = np.where(active[:, None], vecs, 0.0).astype(np.float32)
  const = active & (np.ptp(vecs, axis=1) < tol) & constants
  ok = active & ~const & (np.linalg.norm(vecs, axis=1) > 0)
  ang = np.asarray(pairwise_angles(vecs))
  removed, actions = _walk(_ranked_pairs(ang, ok, sim, comp, similar, complementary),
                           vecs.shape[0], absorb)
  actions = [("constant", (), (int(i),)) for i in np.flatnonzero(const)] + actions
  keep = active & ~removed & ~const
  if active.any() and not keep.any():
    pref = active & ~const
    last = int(np.argmax(pref) if pref.any() else np.argmax(active))
    keep[last] = True
    k = next(k for k, (_, _, gone) in enumerate(actions) if last in gone)   # listed as kept
    kind, kept, gone = actions[k]
    actions[k] = (kind, tuple(sorted(kept + (last,))), tuple(u for u in gone if u != last))
  return keep, actions


def _random_acts(seed=0, dim=3):
  """H vectors in ``dim`` dimensions, as (P, H) activations: many pairs at loose thresholds."""
  rng = np.random.default_rng(seed)
  return host_f32((rng.normal(size=(H, dim)) @ rng.normal(size=(dim, P))).T)


@pytest.mark.parametrize("absorb", [False, True])
def test_matches_float64_reference(tanh_model, absorb):
  model, params = tanh_model
  acts = _random_acts()
  ref = _reference_sweep(np.asarray(acts), 40.0, 140.0, absorb)
  _, m, rep = distinctiveness(model, "hidden_0", absorb=absorb)(params, _ones(model), acts,
                                                                40.0, 140.0)
  assert int(rep.count) > 3 and not np.any(rep.kind == selection_lib.CONSTANT)
  np.testing.assert_array_equal(m["hidden_0"], ref)


def _adversarial_angles(rng, h=10):
  """A symmetric float32 angle matrix built to stress the order (it need not come from vectors):
  angles on a coarse grid (many exact ties, equal excesses across the two kinds), angles one
  float step either side of each threshold, units that may not take part; and thresholds."""
  sim = np.float32(rng.choice([0.0, 5.0, 15.0, 30.0, 45.0, 90.0]))
  comp = np.float32(rng.choice([x for x in (90.5, 135.0, 150.0, 165.0, 180.0) if x > sim]))
  grid = np.concatenate([np.arange(0.0, 181.0, float(rng.choice([5.0, 15.0, 45.0]))),
                         [np.nextafter(sim, 0), sim, np.nextafter(sim, 180),
                          np.nextafter(comp, 0), comp, np.nextafter(comp, 180)]])
  a = rng.choice(grid.astype(np.float32), size=(h, h))
  a = np.triu(a, 1)
  a = (a + a.T).astype(np.float32)
  ok = rng.random(h) > 0.15
  return a, ok, sim, comp


@pytest.mark.parametrize("absorb", [False, True])
@pytest.mark.parametrize("min_phase", [64, 3])
def test_parallel_rounds_match_sequential_walk_on_adversarial_angles(absorb, min_phase,
                                                                     monkeypatch):
  """The parallel rounds take exactly the sequential walk's pairs, listed in its order, on
  matrices full of ties and near-threshold angles, with each rule switched on and off; with
  ``min_phase=3`` the working set is compacted (12, 6, 3 units) as it is for large groups."""
  monkeypatch.setattr(selection_lib, "_MIN_PHASE", min_phase)
  ordered_pairs = jax.jit(lambda *a, **k: selection_lib._ordered_pairs(*a, **k))
  rng = np.random.default_rng(11 + absorb)
  for _ in range(100):
    a, ok, sim, comp = _adversarial_angles(rng, h=12)
    similar, complementary = [(True, True), (True, False), (False, True)][rng.integers(3)]
    first, second, kind, angle = map(np.asarray, ordered_pairs(
        a, ok, sim, comp, use_similar=similar, use_comp=complementary, absorb=absorb))
    got = []
    for f, s_, k in zip(first, second, kind):
      if k == selection_lib.SIMILAR:
        got.append(("similar", (int(f),), (int(s_),)))
      elif k == selection_lib.COMPLEMENTARY:
        got.append(("complementary", (), (int(f), int(s_))))
    _, want = _walk(_ranked_pairs(a, ok, sim, comp, similar, complementary), len(ok), absorb)
    assert got == want, (sim, comp, similar, complementary)
    n = len(got)
    np.testing.assert_array_equal(angle[:n], a[first[:n], second[:n]])


def test_vmap_rule_batched_and_mapped_agree(monkeypatch):
  """Under vmap the rounds map over thresholds on CPU and run batched elsewhere: both equal
  the unbatched call per threshold."""
  a, ok, _, _ = _adversarial_angles(np.random.default_rng(5), h=12)
  sims = jnp.asarray([0.0, 15.0, 45.0, 90.0], jnp.float32)
  comps = jnp.asarray([165.0, 150.0, 135.0, 90.5], jnp.float32)
  run = lambda s, c: selection_lib._ordered_pairs(a, ok, s, c, use_similar=True, use_comp=True,
                                             absorb=True)
  mapped = jax.jit(jax.vmap(lambda s, c: run(s, c)))(sims, comps)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  batched = jax.jit(jax.vmap(lambda s, c: run(s, c)))(sims, comps)
  for n in range(4):
    one = run(sims[n], comps[n])
    for x, y, z in zip(mapped, batched, one):
      np.testing.assert_array_equal(x[n], z)
      np.testing.assert_array_equal(y[n], z)


def _vector_case(rng):
  """Vectors (H, P) whose qualifying pairs are either exact (duplicates at 0, opposites at 180)
  or far from every other angle and threshold, so float32 rounding cannot reorder them; plus
  constant, zero and masked units. Returns (vecs, active, sim, comp)."""
  sim = float(rng.choice([5.0, 15.0, 30.0, 45.0]))
  comp = float(rng.choice([135.0, 150.0, 165.0]))
  dim = int(rng.integers(2, 5))
  v = rng.normal(size=(H, dim)) @ rng.normal(size=(dim, P))
  for u in range(1, H):
    r = rng.random()
    if r < 0.25:
      v[u] = v[rng.integers(u)]  # exact duplicate (ties at 0 with every copy)
    elif r < 0.4:
      v[u] = -v[rng.integers(u)]  # exact opposite
    elif r < 0.5:
      v[u] = rng.choice([-1.0, 1.0])  # constant (exact ties with the others when not removed)
    elif r < 0.55:
      v[u] = 0.0
  return v.astype(np.float32), rng.random(H) > 0.15, sim, comp


@pytest.mark.parametrize("absorb", [False, True])
def test_property_matches_sequential_definition(tanh_model, absorb):
  """The public pruner end to end against the sequential definition in plain Python: random
  low-rank units with duplicates, opposites, constant, zero and masked units, every rule
  switched on and off; same masks, same actions in the same order."""
  model, params = tanh_model
  rng = np.random.default_rng(7 + absorb)
  for _ in range(40):
    vecs, active, sim, comp = _vector_case(rng)
    similar, complementary, constants = (bool(b) for b in rng.random(3) < [0.8, 0.6, 0.7])
    if not (similar or complementary):
      similar = True
    prune = distinctiveness(model, "hidden_0", similar=similar, complementary=complementary,
                            constants=constants, absorb=absorb)
    _, m, rep = prune(params, {"hidden_0": jnp.asarray(active)}, jnp.asarray(vecs.T), sim, comp)
    keep, actions = _sequential_sweep(vecs, active, sim, comp, absorb=absorb, similar=similar,
                                      complementary=complementary, constants=constants)
    got = [(a["kind"], a["kept"], a["removed"]) for a in report_actions(rep)]
    assert got == actions, (sim, comp, similar, complementary, constants)
    np.testing.assert_array_equal(m["hidden_0"], keep)


def test_absorb_keeper_with_higher_index():
  """The issue's reproduction: unit 1 absorbs 2 (6 degrees), then 0 (12 degrees)."""
  d = np.radians([-12.0, 0.0, 6.0])
  acts = 0.5 + 0.3 * np.stack([np.cos(d), np.sin(d)])  # (P=2, H=3)
  model = jaxprune.MLP(in_features=1, hidden=(3,), out_features=1)
  params = model.init(jax.random.key(0))
  p2, m, rep = distinctiveness(model, "hidden_0", absorb=True)(params, _ones(model), acts,
                                                               15.0, 165.0)
  np.testing.assert_array_equal(m["hidden_0"], [False, True, False])
  assert [(a["kept"], a["removed"]) for a in report_actions(rep)] == [((1,), (2,)),
                                                                      ((1,), (0,))]
  w = _np(params, "out", "kernel")
  np.testing.assert_allclose(p2["params"]["out"]["kernel"][1], w.sum(0), rtol=1e-6)
  # Without absorb only the first pair is taken.
  _, m, _ = distinctiveness(model, "hidden_0")(params, _ones(model), acts, 15.0, 165.0)
  np.testing.assert_array_equal(m["hidden_0"], [True, True, False])


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
  # Inside jit with the activations closed over (concrete, checked on the host, not traced).
  _, jm, _ = jax.jit(lambda s: prune(params, _ones(model), acts, s))(45.0)
  np.testing.assert_array_equal(jm["hidden_0"], vm["hidden_0"][9])
  before = prune._trace_count()
  prune(params, _ones(model), acts, 33.0)
  prune(params, _ones(model), acts, jnp.float32(44.0))
  assert prune._trace_count() == before  # new values, no new trace


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


# ----------------------------------------------------------------------------- sample weights


def _weighted_case():
  """A sigmoid MLP with a duplicate pair (0, 3) and a constant unit (5), 30 real patterns and
  the same patterns padded with 10 rows of other data."""
  model = MLP(in_features=5, hidden=(6,), out_features=3, activation="sigmoid")
  params = model.init(jax.random.key(7))
  params = _set_unit(params, "hidden_0", 3, _np(params, "hidden_0", "kernel")[:, 0],
                     _np(params, "hidden_0", "bias")[0])
  params = _set_unit(params, "hidden_0", 5, np.zeros(5), 0.3)
  x = _normal(11, (30, 5))
  xp = jnp.concatenate([x, 5.0 * _normal(12, (10, 5))])
  w = np.r_[np.ones(30), np.zeros(10)].astype(np.float32)
  return model, params, x, xp, w


def test_sample_weight_zero_rows_give_the_unpadded_sweep():
  model, params, x, xp, w = _weighted_case()
  prune = distinctiveness(model, "hidden_0")
  acts, acts_p = (model.activations(params, d, "hidden_0") for d in (x, xp))
  p0, m0, r0 = prune(params, _ones(model), acts, 40.0, 140.0)
  p1, m1, r1 = prune(params, _ones(model), acts_p, 40.0, 140.0, sample_weight=w)
  assert int(r0.count) >= 2 and 3 in np.asarray(r0.kind)        # a pair and the constant
  np.testing.assert_array_equal(m0["hidden_0"], m1["hidden_0"])
  for f in r0._fields:                                             # the same angles, exactly
    np.testing.assert_array_equal(getattr(r0, f), getattr(r1, f), err_msg=f)
  for a, b in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):      # constant folded: its mean
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # The padding changes the unweighted sweep (it is real data there).
  _, _, r2 = prune(params, _ones(model), acts_p, 40.0, 140.0)
  assert not np.array_equal(r2.angle, r0.angle)
  # vmap over folds of unequal size, padded to one shape: each fold's own sweep.
  ws = np.stack([w, np.r_[np.ones(20), np.zeros(20)].astype(np.float32)])
  _, vm, vr = jax.vmap(lambda sw: prune(params, _ones(model), acts_p, 40.0, 140.0,
                                        sample_weight=sw))(ws)
  _, m3, r3 = prune(params, _ones(model), acts[:20], 40.0, 140.0)
  np.testing.assert_array_equal(vm["hidden_0"][1], m3["hidden_0"])
  np.testing.assert_array_equal(vm["hidden_0"][0], m0["hidden_0"])
  # (A batched product may round differently from an unbatched one: close, not identical.)
  np.testing.assert_allclose(vr.angle[1], r3.angle, rtol=1e-5)
  np.testing.assert_allclose(vr.angle[0], r0.angle, rtol=1e-5)
  # until_stable passes the weights to every sweep.
  s0 = jaxprune.until_stable(prune, params, _ones(model), acts, 40.0, 140.0)
  s1 = jaxprune.until_stable(prune, params, _ones(model), acts_p, 40.0, 140.0, sample_weight=w)
  np.testing.assert_array_equal(s0[1]["hidden_0"], s1[1]["hidden_0"])
  assert int(s0[2].actions) == int(s1[2].actions)


def test_zero_patterns_leave_the_gram_matrix_bit_for_bit():
  # The plain product's summation order depends on the length; the blocked one's does not.
  from jaxprune.pruners.angles import _blocked_gram
  rng = np.random.default_rng(0)
  gram = jax.jit(_blocked_gram)
  for h, p, extra in [(7, 30, 10), (13, 250, 300), (5, 513, 1)]:
    v = host_f32(rng.normal(size=(h, p)))
    g0, d0 = gram(v)
    g1, d1 = gram(jnp.concatenate([v, jnp.zeros((h, extra), jnp.float32)], 1))
    np.testing.assert_array_equal(g0, g1)
    np.testing.assert_array_equal(d0, d1)
    u = np.asarray(v, np.float64) / np.linalg.norm(np.asarray(v, np.float64), axis=1)[:, None]
    np.testing.assert_allclose(g0, u @ u.T, atol=1e-5)


def test_sample_weight_is_the_weighted_cosine():
  model, params, x, _, _ = _weighted_case()
  acts = np.asarray(model.activations(params, x, "hidden_0"), np.float64) - 0.5
  w = np.random.default_rng(3).uniform(0.1, 2.0, size=30)
  keep = np.array([1, 1, 1, 0, 1, 0], bool)                      # no duplicate, no constant
  v = acts[:, keep].T * np.sqrt(w)
  u = v / np.linalg.norm(v, axis=1, keepdims=True)
  ang = np.degrees(np.arccos(np.clip(u @ u.T, -1, 1)))[np.triu_indices(4, 1)]
  prune = distinctiveness(model, "hidden_0", constants=False)
  _, _, rep = prune(params, {"hidden_0": jnp.asarray(keep)}, model.activations(
      params, x, "hidden_0"), 0.0, 180.0, sample_weight=w)
  assert int(rep.count) == 0
  assert float(rep.min_angle) == pytest.approx(ang.min(), abs=1e-3)
  assert float(rep.max_angle) == pytest.approx(ang.max(), abs=1e-3)


def test_weight_angles_are_the_weight_pruners_vectors():
  model = LeNet(input_shape=(16, 16, 1))
  params = model.init(jax.random.key(0))
  g = model.groups["conv_1"]                                          # read by the output layer
  out = jaxprune.units.consumer_views(params, g)
  vec = np.concatenate([np.asarray(v).reshape(g.size, -1) for v in out], axis=1)
  np.testing.assert_array_equal(jaxprune.pruners.weight_angles(params, g),
                                pairwise_angles(vec))
  k = np.asarray(params["params"]["conv_0"]["kernel"])              # (5, 5, in, out)
  inc = np.moveaxis(k, -1, 0).reshape(k.shape[-1], -1)
  np.testing.assert_allclose(jaxprune.pruners.weight_angles(params, model.groups["conv_0"],
                                                            source="incoming"),
                             pairwise_angles(inc), atol=1e-4)
  with pytest.raises(ValueError, match="source"):
    jaxprune.pruners.weight_angles(params, g, source="both")


def test_sample_weight_errors():
  model, params, x, _, _ = _weighted_case()
  acts = model.activations(params, x, "hidden_0")
  prune = distinctiveness(model, "hidden_0")
  with pytest.raises(ValueError, match="shape"):
    prune(params, _ones(model), acts, sample_weight=np.ones(7))
  with pytest.raises(ValueError, match=">= 0"):
    prune(params, _ones(model), acts, sample_weight=-np.ones(30))
  with pytest.raises(ValueError, match="all zero"):
    prune(params, _ones(model), acts, sample_weight=np.zeros(30))
  bad = np.asarray(acts).copy()
  bad[0, 0] = np.nan
  w = np.ones(30, np.float32)
  with pytest.raises(ValueError, match="NaN"):
    prune(params, _ones(model), bad, sample_weight=w)
  w[0] = 0.0  # NaN in a pattern that does not exist: fine
  prune(params, _ones(model), bad, sample_weight=w)


# ----------------------------------------------------------------------------- progressive


def _autoencoder_with_a_duplicate():
  """A 6-5-6 autoencoder whose hidden units 0 and 3 duplicate, its data and its loss."""
  model = Autoencoder(in_features=6, hidden=(5,))
  params = model.init(jax.random.key(0))
  params = _set_unit(params, "hidden_0", 3, _np(params, "hidden_0", "kernel")[:, 0],
                     _np(params, "hidden_0", "bias")[0])  # 0 and 3 duplicate
  x = host_f32(np.random.default_rng(1).uniform(size=(32, 6)))
  return model, params, x, lambda p: jnp.mean((model.apply(p, x) - x) ** 2)


def test_progressive_autoencoder():
  model, params, x, loss = _autoencoder_with_a_duplicate()
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


def test_progressive_row_zero_scores_the_masked_network():
  """Starting from a mask that already removes a unit whose weights are not zero: row 0 is
  the loss of the network the mask describes (it used to be the unmasked params' loss, so an
  exact duplicate merge looked like a drop in loss)."""
  model, params, x, loss = _autoencoder_with_a_duplicate()
  masks = {"hidden_0": jnp.asarray([True, True, False, True, True])}
  _, _, rep = progressive_distinctiveness(model, "hidden_0", loss)(params, masks, x)
  masked = jaxprune.apply_masks(params, jaxprune.expand(params, model, masks))
  assert float(rep.loss[0]) == pytest.approx(float(loss(masked)), rel=1e-6)
  assert float(rep.loss[0]) != pytest.approx(float(loss(params)), rel=1e-3)
  assert float(rep.loss[1]) == pytest.approx(float(rep.loss[0]), rel=1e-5)  # the duplicate


def test_masked_units_activations_are_not_checked():
  """Masked units never take part, so their activations may hold anything, concretely as under
  jit (the concrete check used to refuse a NaN in a masked unit's column)."""
  model = jaxprune.MLP(in_features=2, hidden=(4,), out_features=2)
  params = model.init(jax.random.key(0))
  acts = jnp.ones((5, 4)).at[:, 0].set(jnp.arange(5.0)).at[1, 1].set(jnp.inf)
  masks = {"hidden_0": jnp.asarray([True, False, True, True])}
  for prune in (jaxprune.distinctiveness(model, "hidden_0"),
                jaxprune.pruners.group_redundancy(model, "hidden_0")):
    eager = prune(params, masks, acts)
    jitted = jax.jit(prune)(params, masks, acts)
    assert not bool(eager[2].invalid)
    np.testing.assert_array_equal(eager[1]["hidden_0"], jitted[1]["hidden_0"])
    with pytest.raises(ValueError, match="1 NaN or infinite"):
      prune(params, jaxprune.unit_masks_ones(model), acts)


def test_progressive_metrics_equal_separate_runs():
  model = Autoencoder(in_features=6, hidden=(5,))
  params = model.init(jax.random.key(4))
  rng = np.random.default_rng(5)
  x, x_te = (host_f32(rng.uniform(size=(n, 6))) for n in (32, 12))
  mse = lambda data: (lambda p: jnp.mean((model.apply(p, data) - data) ** 2))
  run = progressive_distinctiveness(model, "hidden_0", mse(x),
                                    metrics={"test": mse(x_te), "again": mse(x)})
  p, _, rep = run(params, _ones(model), x)
  # The same trajectory scored by the test loss as its loss function: the same values.
  _, _, rep_te = progressive_distinctiveness(model, "hidden_0", mse(x_te))(params, _ones(model), x)
  np.testing.assert_array_equal(rep.unit_masks, rep_te.unit_masks)
  np.testing.assert_array_equal(rep.metrics["test"], rep_te.loss)
  np.testing.assert_array_equal(rep.metrics["again"], rep.loss)
  assert float(rep.metrics["test"][int(rep.count) - 1]) == pytest.approx(
      float(mse(x_te)(p)), rel=1e-6)                            # the last row: the final network
  assert set(progressive_distinctiveness(model, "hidden_0", mse(x))(
      params, _ones(model), x)[2].metrics) == set()
  with pytest.raises(TypeError, match="metrics"):
    progressive_distinctiveness(model, "hidden_0", mse(x), metrics={"bad": 3.0})
  with pytest.raises(TypeError, match="metrics must be a mapping"):
    progressive_distinctiveness(model, "hidden_0", mse(x), metrics=[mse(x_te)])
  # A metric (or the loss) that is not one number: said before anything runs.
  per_sample = lambda p: jnp.mean((model.apply(p, x_te) - x_te) ** 2, axis=1)
  with pytest.raises(ValueError, match=r"metrics\['per'\] must return a scalar.*\(12,\)"):
    progressive_distinctiveness(model, "hidden_0", mse(x), metrics={"per": per_sample})(
        params, _ones(model), x)
  with pytest.raises(ValueError, match="loss_fn must return a scalar"):
    progressive_distinctiveness(model, "hidden_0", per_sample)(params, _ones(model), x)


def test_progressive_checks_its_data():
  """A NaN in x made every angle NaN: no step removed a unit, yet the report counted every
  step, with no error. Now x is checked as fit checks it: NaN, empty, wrong width raise and
  name the problem; under jit (x traced) the run goes on as before."""
  model, params, x, loss = _autoencoder_with_a_duplicate()
  run = progressive_distinctiveness(model, "hidden_0", loss)
  with pytest.raises(ValueError, match="x holds 1 NaN or infinite"):
    run(params, _ones(model), x.at[0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match="x is empty"):
    run(params, _ones(model), x[:0])
  with pytest.raises(ValueError, match="sample_weight is all zero"):
    run(params, _ones(model), x, sample_weight=jnp.zeros(x.shape[0]))
  with pytest.raises(ValueError, match=r"batch of shape \(N, 6\); got \(32, 4\)"):
    run(params, _ones(model), x[:, :4])
  bad = jax.tree.map(lambda a: a.at[(0,) * a.ndim].set(jnp.nan), params)
  with pytest.raises(ValueError, match="NaN"):
    run(bad, _ones(model), x)
  _, _, rep_jit = jax.jit(run)(params, _ones(model), x)
  np.testing.assert_array_equal(rep_jit.units_kept, [5, 4, 3, 2, 1])


def test_progressive_sample_weight_is_padding_and_repetition():
  model = Autoencoder(in_features=6, hidden=(7,))
  params = model.init(jax.random.key(6))
  rng = np.random.default_rng(7)
  x = host_f32(rng.uniform(size=(20, 6)))
  loss = lambda p: jnp.mean((model.apply(p, x) - x) ** 2)
  run = progressive_distinctiveness(model, "hidden_0", loss, complementary=True)
  _, m_ref, ref = run(params, _ones(model), x)
  # Weight-0 padding rows (any finite values) change nothing.
  xp = jnp.concatenate([x, jnp.full((5, 6), 30.0)])
  w = jnp.r_[jnp.ones(20), jnp.zeros(5)]
  _, m_pad, rep = run(params, _ones(model), xp, sample_weight=w)
  np.testing.assert_array_equal(rep.unit_masks, ref.unit_masks)
  np.testing.assert_allclose(rep.loss, ref.loss, rtol=1e-5)
  np.testing.assert_allclose(rep.min_angle, ref.min_angle, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(m_pad["hidden_0"], m_ref["hidden_0"])
  # A weight of 2 is the pattern twice (the weighted angles and means).
  wi = np.asarray(rng.integers(0, 3, size=20), np.float32)
  _, _, rep_w = run(params, _ones(model), x, sample_weight=wi)
  _, _, rep_d = run(params, _ones(model), jnp.asarray(np.repeat(np.asarray(x), wi.astype(int),
                                                                axis=0)))
  np.testing.assert_array_equal(rep_w.unit_masks, rep_d.unit_masks)
  assert not np.array_equal(rep_w.unit_masks, ref.unit_masks)   # the weights matter here
  _, _, unweighted = run(params, _ones(model), xp)               # and so does the padding
  assert not np.array_equal(unweighted.unit_masks, ref.unit_masks)
  np.testing.assert_allclose(rep_w.min_angle, rep_d.min_angle, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="sample_weight"):
    run(params, _ones(model), x, sample_weight=np.ones(3))


def test_bias_folds_refused_where_they_cannot_be_exact():
  cnn = jaxprune.CNN4(input_shape=(67, 67, 3), channels=(4, 6, 8, 8), dense=(12, 10, 9))
  with pytest.raises(ValueError, match=r"'conv_1' cannot fold.*\(its consumer "
                     r"params/conv_2/kernel reads it through a zero-padded \('SAME'\) "
                     r"convolution, [^;]*\)\. Pass constants=False"):
    distinctiveness(cnn, "conv_1")
  with pytest.raises(ValueError, match="Pass constants=False, compensate=False"):
    distinctiveness(cnn, "conv_2", compensate=True)
  with pytest.raises(ValueError, match=r"its consumer params/layer1_0/conv2/kernel adds no "
                     "bias with a value for each of its outputs"):
    jaxprune.weight_distinctiveness(jaxprune.ResNet18(input_shape=(32, 32, 3)), "layer1_0")
  # Merging and complementary removal stay available there; VALID-read groups fold as usual.
  distinctiveness(cnn, "conv_1", constants=False)
  distinctiveness(cnn, "conv_3")


# ----------------------------------------------------------------------------- until stable


def test_until_stable_equals_a_loop_of_sweeps(tanh_model):
  model, params = tanh_model
  acts = _random_acts(seed=3, dim=2)
  prune = distinctiveness(model, "hidden_0", complementary=False)
  p, m, n = params, _ones(model), 0
  while True:  # the loop the studies used to write themselves
    p, m, r = prune(p, m, acts, 50.0)
    n += 1
    if int(r.count) == 0:
      break
  assert n >= 3  # the case needs several sweeps
  p2, m2, rep = jaxprune.until_stable(prune, params, _ones(model), acts, 50.0)
  assert int(rep.sweeps) == n and bool(rep.stable) and not bool(rep.invalid)
  assert int(rep.actions) == H - int(np.sum(m2["hidden_0"]))
  for a, b in zip(jax.tree.leaves((p, m)), jax.tree.leaves((p2, m2))):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # Stopped early, it is not stable; a second factory with the same options shares the loop.
  again = distinctiveness(model, "hidden_0", complementary=False)
  _, m3, rep3 = jaxprune.until_stable(again, params, _ones(model), acts, 50.0, max_sweeps=2)
  assert int(rep3.sweeps) == 2 and not bool(rep3.stable)
  assert again._config == prune._config
  assert dist_lib._stable_loop(again, None) is dist_lib._stable_loop(prune, None)
  with pytest.raises(ValueError, match="max_sweeps"):
    jaxprune.until_stable(prune, params, _ones(model), acts, 50.0, max_sweeps=0)
  with pytest.raises(ValueError, match=r"\[0, 180\]"):
    jaxprune.until_stable(prune, params, _ones(model), acts, 200.0)
  # Sample weights belong to activation pruners: a weight pruner says so.
  wprune = weight_distinctiveness(model, "hidden_0", complementary=False)
  with pytest.raises(ValueError, match="activation pruner.*drop sample_weight"):
    jaxprune.until_stable(wprune, params, _ones(model), 50.0,
                          sample_weight=np.ones(acts.shape[0], np.float32))
  # Another pruner (it chooses its own number of units) is named, not an attribute error; a
  # wrapper returning what a distinctiveness pruner returns still works.
  with pytest.raises(TypeError, match="returned ImportanceReport as its report"):
    jaxprune.until_stable(jaxprune.importance_prune(model, "hidden_0"), params, _ones(model), 2)
  with pytest.raises(TypeError, match="returned a dict"):
    jaxprune.until_stable(lambda p, m, a: {"p": p}, params, _ones(model), acts)
  _, m4, _ = jaxprune.until_stable(lambda p, m, a, s: prune(p, m, a, s), params, _ones(model),
                                   acts, 50.0)
  np.testing.assert_array_equal(m4["hidden_0"], m2["hidden_0"])


@pytest.mark.parametrize("by", ["activations", "weights"])
def test_until_stable_on_two_models_sharing_an_equal_group(by):
  """The compiled loop was cached by the group and options alone: a second model whose
  'conv_0' equals the first's but whose 'conv_1' is wider ran the first model's sweep, which
  refused the second model's masks ("'conv_1' has shape (8,); group 'conv_1' has 6 units")."""
  x = jax.random.normal(jax.random.key(1), (3, 16, 16, 1))
  for channels in ((5, 6), (5, 8)):
    model = LeNet(input_shape=(16, 16, 1), channels=channels)
    params = model.init(jax.random.key(0))
    kernel = params["params"]["conv_0"]["kernel"]
    for copy in (2, 4):   # three copies of filter 0: the second sweep still merges one
      kernel = kernel.at[..., copy].set(kernel[..., 0])
    params["params"]["conv_0"]["kernel"] = kernel
    bias = params["params"]["conv_0"]["bias"]
    params["params"]["conv_0"]["bias"] = bias.at[2].set(bias[0]).at[4].set(bias[0])
    if by == "activations":
      prune = distinctiveness(model, "conv_0", complementary=False)
      args = (model.activations(params, x, "conv_0"), 1e-3)
    else:
      prune = jaxprune.weight_distinctiveness(model, "conv_0", source="incoming",
                                              complementary=False, constants=False)
      args = (1e-3,)
    _, m, rep = jaxprune.until_stable(prune, params, _ones(model), *args)
    assert np.flatnonzero(~np.asarray(m["conv_0"])).tolist() == [2, 4]
    assert m["conv_1"].shape == (channels[1],) and bool(rep.stable)


def test_weight_distinctiveness_refuses_nan_weights(lenet):
  model, params, *_ = lenet
  p = jax.tree.map(np.array, params)
  p["params"]["conv_0"]["kernel"][0, 0, 0, 3] = np.nan
  p = jax.tree.map(jnp.asarray, p)
  prune = weight_distinctiveness(model, "conv_0")
  with pytest.raises(ValueError, match="conv_0/kernel.*NaN"):
    prune(p, _ones(model), 30.0, 150.0)
  # Under jit: nothing changes and the report says so.
  _, m, rep = jax.jit(lambda q: prune(q, _ones(model), 30.0, 150.0))(p)
  assert bool(rep.invalid) and bool(np.all(m["conv_0"]))


def test_report_lists_the_unit_kept_last_as_kept():
  """A sweep that would remove every unit keeps one; report_actions said it was removed."""
  m = jaxprune.MLP(in_features=3, hidden=(2,), out_features=2, activation="tanh")
  p = m.init(jax.random.key(0))
  v = np.random.default_rng(0).normal(size=8)
  for acts, want in ((np.stack([v, -v], 1), [{"kind": "complementary", "kept": (0,),
                                             "removed": (1,), "angle": 180.0,
                                             "kept_last": True}]),
                     (np.stack([np.full(8, 0.3), np.full(8, -0.2)], 1),
                      [{"kind": "constant", "kept": (0,), "removed": (), "angle": None,
                        "kept_last": True},
                       {"kind": "constant", "kept": (), "removed": (1,), "angle": None}])):
    _, um, rep = distinctiveness(m, "hidden_0")(p, jaxprune.unit_masks_ones(m),
                                                jnp.asarray(acts, jnp.float32), 15.0, 165.0)
    assert np.asarray(um["hidden_0"]).tolist() == [True, False] and bool(rep.kept_last)
    assert report_actions(rep) == want


def test_fold_and_compensate_together_are_refused():
  m = jaxprune.MLP(in_features=3, hidden=(4,), out_features=2, activation="tanh")
  with pytest.raises(ValueError, match="pass one of them"):
    distinctiveness(m, "hidden_0", fold=True, compensate=True)


def test_one_pattern_or_integer_activations_are_refused():
  """Over one pattern every unit is constant: the pruners used to remove the whole layer as
  constants (outputs off by up to 0.5 elsewhere); integer activations likewise. Both are
  refused, by the activation pruners alike; two patterns are accepted."""
  model = MLP(in_features=4, hidden=(6,), out_features=3)
  params = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (16, 4))
  ones = jaxprune.unit_masks_ones(model)
  for prune in (distinctiveness(model, "hidden_0"), jaxprune.pruners.group_redundancy(
      model, "hidden_0")):
    with pytest.raises(ValueError, match=r"Activations hold 1 pattern\(s\).*at least 2"):
      prune(params, ones, model.activations(params, x[:1], "hidden_0"))
    with pytest.raises(ValueError, match=r"Activations hold 1 pattern\(s\) \(with weight > 0\)"):
      prune(params, ones, model.activations(params, x, "hidden_0"),
            sample_weight=jnp.zeros(16).at[3].set(1.0))
    with pytest.raises(TypeError, match=r"Activations are int32, not floating point.*"
                                        r"model\.activations\(params, x, 'hidden_0'\)"):
      prune(params, ones, jnp.ones((8, 6), jnp.int32))
    prune(params, ones, model.activations(params, x[:2], "hidden_0"))
