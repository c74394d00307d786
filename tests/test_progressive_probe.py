"""progressive_distinctiveness checked against an independent NumPy reference of the whole
trajectory, written from the DESIGN text (float64 angles, one pair per step), and regressions
found while probing it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune.pruners import progressive_distinctiveness
from conftest import host_f32


# ----------------------------------------------------------------------------- the reference

_ACT = {"sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z))}


def _angle(u, v):
  """Degrees between u and v (float64), NaN if either is zero; the stable form DESIGN asks
  for (arccos of the cosine is ill-conditioned at 0: duplicates came out at 1e-6 degrees)."""
  nu, nv = np.linalg.norm(u), np.linalg.norm(v)
  if nu == 0 or nv == 0:
    return np.nan
  u, v = u / nu, v / nv
  return float(np.degrees(2.0 * np.arctan2(np.linalg.norm(u - v), np.linalg.norm(u + v))))


def _reference(acts, w_out, b_out, keep, shift, *, tol=1e-6, weight=None, constants=True,
               complementary=False, compensate=False):
  """The trajectory from DESIGN.md, one step at a time.

  ``acts`` (P, H) are the group's activations (they never change: a merge touches only the
  consumer rows, and removed units are masked), ``w_out`` (H, out) the consumer kernel (a conv
  consumer's (H, k, k, out), read with no zero padding) and
  ``b_out`` its bias. Each step: constant units (range over patterns of weight > 0 below
  ``tol``; never the last unit: then the lowest-index one stays) fold their weighted mean times
  their row into the bias; then among the other kept units with an angle, the pair with the
  smallest angle (ties: lowest i, then lowest j) is merged, row j added into row i; with
  ``complementary``, the pair with the largest angle (same ties) is removed instead when
  ``180 - largest < smallest`` and at least 3 units take part (``compensate``: both means
  folded). A step that removes nothing ends the trajectory. Returns one dict per row (keep,
  w_out, b_out, min_angle over the kept units, and ``gap``: the smallest nonzero margin by
  which a choice was made, to skip float32 near-ties).
  """
  p = acts.shape[0]
  w = np.ones(p) if weight is None else np.asarray(weight, np.float64)
  a = np.asarray(acts, np.float64)
  real = w > 0
  vecs = (a - shift) * np.sqrt(w)[:, None]
  mean = (w[:, None] * a).sum(0) / w.sum()
  rng = a[real].max(0) - a[real].min(0)
  w_out, b_out, keep = (np.array(w_out, np.float64), np.array(b_out, np.float64),
                        np.array(keep, bool))
  w_out[~keep] = 0

  def pairs(k):
    idx = np.flatnonzero(k)
    out = [(_angle(vecs[:, i], vecs[:, j]), i, j) for n, i in enumerate(idx) for j in idx[n + 1:]]
    return [q for q in out if np.isfinite(q[0])]

  def row(gap):
    angles = [q[0] for q in pairs(keep)]
    return dict(keep=keep.copy(), w_out=w_out.copy(), b_out=b_out.copy(), gap=gap,
                min_angle=min(angles) if angles else np.nan)

  rows = [row(np.inf)]
  while keep.sum() > 1:
    removed, gap = [], np.inf
    const = keep & (rng < tol) if constants else np.zeros_like(keep)
    if constants and not np.any(keep & ~const):
      const[np.flatnonzero(keep)[0]] = False
    for j in np.flatnonzero(const):   # a conv consumer's row (k, k, out): summed over k x k
      b_out += mean[j] * w_out[j].reshape(-1, b_out.shape[0]).sum(0)
      removed.append(j)
    live = keep & ~const
    cand = pairs(live)
    if cand:
      sim = sorted(cand)
      comp = sorted(cand, key=lambda q: (-q[0], q[1], q[2]))
      margins = [q[0] - sim[0][0] for q in sim] + [comp[0][0] - q[0] for q in comp]
      use_comp = complementary and live.sum() >= 3 and 180.0 - comp[0][0] < sim[0][0]
      if complementary and sim[0][0] > 0:   # at exactly 0 the merge wins whatever comes
        margins.append(abs(180.0 - comp[0][0] - sim[0][0]))
      gap = min([m for m in margins if m > 0], default=np.inf)
      if use_comp:
        _, i, j = comp[0]
        if compensate:
          b_out += (mean[i] * w_out[i] + mean[j] * w_out[j]).reshape(-1, b_out.shape[0]).sum(0)
        removed += [i, j]
      else:
        _, i, j = sim[0]
        w_out[i] += w_out[j]
        removed.append(j)
    if not removed:
      break
    keep[removed] = False
    w_out[removed] = 0
    rows.append(row(gap))
  return rows


def _ae_params(w1, b1, w2, b2):
  f = lambda v: jnp.asarray(v, jnp.float32)
  return {"params": {"hidden_0": {"kernel": f(w1), "bias": f(b1)},
                     "out": {"kernel": f(w2), "bias": f(b2)}}}


def _ae_np(params):
  q = params["params"]
  return [np.asarray(q[a][b], np.float64) for a in ("hidden_0", "out") for b in ("kernel", "bias")]


# One Autoencoder 4-6-4 and one training set for every autoencoder case, so each set of options
# compiles once for the whole file.
_X = host_f32(np.random.default_rng(1).uniform(size=(16, 4)))
_AE = jaxprune.Autoencoder(in_features=4, hidden=(6,))
_ae_loss = jax.jit(lambda p: jnp.mean((_AE.apply(p, _X) - _X) ** 2))
_RUNS = {}


def _ae_run(**options):
  key = tuple(sorted(options.items()))
  if key not in _RUNS:
    _RUNS[key] = progressive_distinctiveness(_AE, "hidden_0", _ae_loss, **options)
  return _RUNS[key]


def _check_autoencoder(w1, b1, w2, b2, mask, *, weight=None, tol=1e-6, check_loss_np=True,
                       **options):
  """Runs the pruner on the Autoencoder with these params on ``_X`` and compares every row with
  the reference: masks, counts, loss (loss_fn on the reference network and a NumPy forward
  pass), min angles, the padding rows and the final params. Returns the report."""
  h = w1.shape[1]
  params = _ae_params(w1, b1, w2, b2)
  x, loss = _X, _ae_loss
  fp, fm, rep = _ae_run(**options)(params, {"hidden_0": jnp.asarray(mask)}, x, tol,
                                   sample_weight=weight)
  w1, b1, w2, b2 = _ae_np(params)
  xs = np.asarray(x, np.float64)
  keep0 = np.asarray(mask, bool)
  acts = _ACT["sigmoid"](xs @ (w1 * keep0) + b1 * keep0)
  rows = _reference(acts, w2, b2, keep0, 0.5, tol=tol, weight=weight, **options)
  n = int(rep.count)
  assert n == len(rows)
  assert all(r["gap"] > 1e-3 for r in rows), "a near-tie: pick another case"
  for s, r in enumerate(rows):
    np.testing.assert_array_equal(rep.unit_masks[s], r["keep"])
    assert int(rep.units_kept[s]) == r["keep"].sum()
    k = r["keep"]
    ref_params = _ae_params(w1 * k, b1 * k, r["w_out"], r["b_out"])
    assert float(rep.loss[s]) == pytest.approx(float(loss(ref_params)), rel=1e-5, abs=1e-7)
    if check_loss_np:
      out = _ACT["sigmoid"](xs @ (w1 * k) + b1 * k) @ r["w_out"] + r["b_out"]
      assert float(rep.loss[s]) == pytest.approx(np.mean((out - xs) ** 2), rel=1e-4, abs=1e-6)
    if np.isnan(r["min_angle"]):
      assert np.isnan(rep.min_angle[s])
    else:
      assert float(rep.min_angle[s]) == pytest.approx(r["min_angle"], abs=0.05)
  for s in range(n, h):     # padding rows repeat the last network, with no angle
    np.testing.assert_array_equal(rep.unit_masks[s], rep.unit_masks[n - 1])
    assert int(rep.units_kept[s]) == int(rep.units_kept[n - 1])
    assert float(rep.loss[s]) == float(rep.loss[n - 1])
    assert np.isnan(rep.min_angle[s])
  np.testing.assert_array_equal(fm["hidden_0"], rows[-1]["keep"])
  k = rows[-1]["keep"]
  for got, want in zip(_ae_np(fp), (w1 * k, b1 * k, rows[-1]["w_out"], rows[-1]["b_out"])):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  return rep


def _hand_built(rng, d=4, h=6):
  """Unit 1 duplicates 0, unit 2 is 0's complement (o2 = 1 - o0), unit 3 is constant
  (sigmoid(0.3)), unit 5 duplicates 4: two exact ties at 0 degrees."""
  w1 = rng.normal(size=(d, h))
  b1 = rng.normal(size=h) * 0.3
  w1[:, 1], b1[1] = w1[:, 0], b1[0]
  w1[:, 2], b1[2] = -w1[:, 0], -b1[0]
  w1[:, 3], b1[3] = 0.0, 0.3
  w1[:, 5], b1[5] = w1[:, 4], b1[4]
  return w1, b1, rng.normal(size=(h, d)), rng.normal(size=d) * 0.1


# ----------------------------------------------------------------------------- against it


@pytest.mark.parametrize("options", [{}, {"complementary": True},
                                     {"complementary": True, "compensate": True}])
def test_random_autoencoders_match_the_reference(options):
  for seed in range(3):
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(4, 6)) * 2
    b1, w2, b2 = rng.normal(size=6), rng.normal(size=(6, 4)), rng.normal(size=4)
    mask = np.ones(6, bool)
    mask[seed] = seed == 0          # one start with a unit already masked
    _check_autoencoder(w1, b1, w2, b2, mask, **options)


@pytest.mark.parametrize("options", [{}, {"complementary": True},
                                     {"complementary": True, "compensate": True},
                                     {"constants": False},
                                     {"constants": False, "complementary": True}])
def test_duplicates_ties_complements_and_constants(options):
  w1, b1, w2, b2 = _hand_built(np.random.default_rng(0))
  rep = _check_autoencoder(w1, b1, w2, b2, np.ones(6, bool), **options)
  # By hand: both duplicate pairs are at exactly 0 degrees; the tie goes to the lower pair
  # (0, 1), and the constant unit goes in the same first step when constants are removed.
  first = [1, 0, 1, 0, 1, 1] if options.get("constants", True) else [1, 0, 1, 1, 1, 1]
  np.testing.assert_array_equal(rep.unit_masks[1], first)
  assert float(rep.min_angle[0]) == 0.0 and float(rep.min_angle[1]) == 0.0
  assert float(rep.loss[1]) == pytest.approx(float(rep.loss[0]), rel=1e-5)  # exact merges


def test_sample_weights_zero_rows_equal_dropping_them():
  rng = np.random.default_rng(3)
  w1, b1, w2, b2 = rng.normal(size=(4, 6)) * 2, rng.normal(size=6), rng.normal(size=(6, 4)), \
      rng.normal(size=4)
  w = rng.integers(0, 3, size=16).astype(np.float32)
  w[[0, 1]] = 1.0
  w[[4, 9]] = 0.0
  rep = _check_autoencoder(w1, b1, w2, b2, np.ones(6, bool), weight=w)
  # A nearly constant unit under a loose tolerance folds its WEIGHTED mean (not the plain one).
  w1n = w1.copy()
  w1n[:, 5] *= 0.02
  rep_c = _check_autoencoder(w1n, b1, w2, b2, np.ones(6, bool), weight=w, tol=0.02)
  assert not rep_c.unit_masks[1][5]
  # weight 2 is the pattern twice, weight 0 no pattern
  xd = jnp.asarray(np.repeat(np.asarray(_X), w.astype(int), axis=0), jnp.float32)
  _, _, rep_d = _ae_run()(_ae_params(w1, b1, w2, b2), jaxprune.unit_masks_ones(_AE), xd)
  np.testing.assert_array_equal(rep.unit_masks, rep_d.unit_masks)
  np.testing.assert_allclose(rep.min_angle, rep_d.min_angle, atol=1e-3)


# ----------------------------------------------------------------------------- the trajectory ends


def _relu_mlp_with_a_dead_unit():
  """A relu MLP 3-4-2 whose unit 2 is dead on every pattern (activation exactly 0: no angle)."""
  model = jaxprune.MLP(in_features=3, hidden=(4,), out_features=2, activation="relu")
  rng = np.random.default_rng(0)
  w1 = np.abs(rng.normal(size=(3, 4)))
  b1 = np.array([0.1, 0.2, -50.0, 0.3])
  w2, b2 = rng.normal(size=(4, 2)), rng.normal(size=2)
  f = lambda v: jnp.asarray(v, jnp.float32)
  params = {"params": {"hidden_0": {"kernel": f(w1), "bias": f(b1)},
                       "out": {"kernel": f(w2), "bias": f(b2)}}}
  x = rng.uniform(size=(12, 3))
  return model, params, x, (w1, b1, w2, b2)


@pytest.mark.parametrize("options,tol", [({"constants": False}, 1e-6), ({}, 0.0)])
def test_a_step_that_removes_nothing_ends_the_trajectory(options, tol):
  """A unit with an all-zero activation vector has no angle: without the constant rule
  (constants=False, or constant_tol=0, where nothing is below the tolerance) it can never be
  removed. Once it and one other unit are left, every further step removed nothing, yet each
  was counted: count 4 where 3 rows hold a network, the last row a repeat of the one before
  (units_kept [4, 3, 2, 2]). Now such a step ends the trajectory, as the reference does."""
  model, params, x, (w1, b1, w2, b2) = _relu_mlp_with_a_dead_unit()
  x = jnp.asarray(x, jnp.float32)
  loss = lambda p: jnp.mean(model.apply(p, x) ** 2)
  _, m, rep = progressive_distinctiveness(model, "hidden_0", loss, **options)(
      params, jaxprune.unit_masks_ones(model), x, tol)
  acts = np.maximum(np.asarray(x, np.float64) @ w1 + b1, 0.0)
  assert np.all(acts[:, 2] == 0.0)
  rows = _reference(acts, w2, b2, np.ones(4, bool), 0.0, tol=tol, **options)
  assert len(rows) == 3 and rows[-1]["keep"].tolist() == [True, False, True, False]
  assert int(rep.count) == 3
  np.testing.assert_array_equal(rep.units_kept, [4, 3, 2, 2])
  for s, r in enumerate(rows):
    np.testing.assert_array_equal(rep.unit_masks[s], r["keep"])
  np.testing.assert_array_equal(m["hidden_0"], rows[-1]["keep"])
  assert np.isnan(rep.min_angle[2]) and np.isnan(rep.min_angle[3])


def test_activations_too_large_for_a_norm_are_invalid():
  """relu activations of about 5e19: their squared norms overflow float32, so no angle exists
  and no unit could be merged; every step was counted doing nothing, with invalid False (the
  distinctiveness pruners set invalid for such vectors). Now invalid is set, no step taken."""
  model, params, x, _ = _relu_mlp_with_a_dead_unit()
  x = jnp.asarray(x * 3e19, jnp.float32)
  params = {"params": dict(params["params"], hidden_0={
      "kernel": params["params"]["hidden_0"]["kernel"],
      "bias": jnp.zeros(4)})}                       # no dead unit here: all four overflow
  acts = np.asarray(x, np.float64) @ np.asarray(params["params"]["hidden_0"]["kernel"])
  assert np.all(np.sum(acts ** 2, axis=0) > np.finfo(np.float32).max)
  loss = lambda p: jnp.sum(p["params"]["out"]["bias"])
  _, m, rep = progressive_distinctiveness(model, "hidden_0", loss)(
      params, jaxprune.unit_masks_ones(model), x)
  assert bool(rep.invalid) and int(rep.count) == 1
  assert m["hidden_0"].all()


def test_all_constant_keeps_the_lowest_unit():
  """Every kept unit constant: all but the lowest-index kept one go in one step, folded
  exactly (the loss does not change), and the trajectory ends there."""
  rng = np.random.default_rng(5)
  w1 = np.zeros((4, 6))
  b1, w2, b2 = rng.normal(size=6), rng.normal(size=(6, 4)), rng.normal(size=4)
  mask = np.array([False, True, True, True, False, True])
  rep = _check_autoencoder(w1, b1, w2, b2, mask)
  assert int(rep.count) == 2
  np.testing.assert_array_equal(rep.unit_masks[1], [0, 1, 0, 0, 0, 0])
  assert float(rep.loss[1]) == pytest.approx(float(rep.loss[0]), rel=1e-5)


# ----------------------------------------------------------------------------- a deeper model


def test_second_layer_of_a_tanh_mlp_matches_the_reference():
  model = jaxprune.MLP(in_features=3, hidden=(5, 6), out_features=2, activation="tanh")
  params = model.init(jax.random.key(2))
  q = params["params"]
  # unit 4 of hidden_1 a copy of unit 1, unit 5 its negation (tanh: exactly opposite)
  k1 = q["hidden_1"]["kernel"].at[:, 4].set(q["hidden_1"]["kernel"][:, 1])
  k1 = k1.at[:, 5].set(-q["hidden_1"]["kernel"][:, 1])
  b1 = q["hidden_1"]["bias"]
  b1 = b1.at[4].set(b1[1]).at[5].set(-b1[1])
  params = {"params": dict(q, hidden_1={"kernel": k1, "bias": b1})}
  rng = np.random.default_rng(6)
  x = host_f32(rng.normal(size=(20, 3)))
  y = host_f32(rng.normal(size=(20, 2)))
  loss = jax.jit(lambda p: jnp.mean((model.apply(p, x) - y) ** 2))
  for options in ({"complementary": True, "compensate": True},):
    _, _, rep = progressive_distinctiveness(model, "hidden_1", loss, **options)(
        params, jaxprune.unit_masks_ones(model), x)
    g = lambda *path: np.asarray(params["params"][path[0]][path[1]], np.float64)
    xs = np.asarray(x, np.float64)
    acts = np.tanh(np.tanh(xs @ g("hidden_0", "kernel") + g("hidden_0", "bias"))
                   @ g("hidden_1", "kernel") + g("hidden_1", "bias"))
    rows = _reference(acts, g("out", "kernel"), g("out", "bias"), np.ones(6, bool), 0.0,
                      **options)
    assert int(rep.count) == len(rows) and all(r["gap"] > 1e-3 for r in rows)
    for s, r in enumerate(rows):
      np.testing.assert_array_equal(rep.unit_masks[s], r["keep"])
      k = jnp.asarray(r["keep"], jnp.float32)
      ref = {"params": dict(params["params"],
                            hidden_1={"kernel": k1 * k, "bias": b1 * k},
                            out={"kernel": jnp.asarray(r["w_out"], jnp.float32),
                                 "bias": jnp.asarray(r["b_out"], jnp.float32)})}
      assert float(rep.loss[s]) == pytest.approx(float(loss(ref)), rel=1e-5)
      if not np.isnan(r["min_angle"]):
        assert float(rep.min_angle[s]) == pytest.approx(r["min_angle"], abs=0.05)
    # (1, 4) at 0 degrees and (1, 5) at 180 are equally extreme: the tie goes to similar.
    np.testing.assert_array_equal(rep.unit_masks[1], [1, 1, 1, 1, 0, 1])


# ----------------------------------------------------------------------------- masks and data


def test_other_groups_masks_are_applied():
  """Pruning hidden_1 with hidden_0's unit 1 masked in the unit masks but not zeroed in the
  params: the activations, angles and every loss were those of the network WITH unit 1 (row
  0's loss was loss(params), not that of the masked network), silently. Now the masks are
  applied first: the same trajectory as from params zeroed by hand."""
  model = jaxprune.MLP(in_features=3, hidden=(4, 5), out_features=2, activation="tanh")
  params = model.init(jax.random.key(0))
  x = host_f32(np.random.default_rng(0).normal(size=(20, 3)))
  loss = jax.jit(lambda p: jnp.mean(model.apply(p, x) ** 2))
  masks = {"hidden_0": jnp.asarray([True, False, True, True]), "hidden_1": jnp.ones(5, bool)}
  q = params["params"]
  zeroed = {"params": dict(q, hidden_0={"kernel": q["hidden_0"]["kernel"].at[:, 1].set(0.0),
                                        "bias": q["hidden_0"]["bias"].at[1].set(0.0)},
                           hidden_1={"kernel": q["hidden_1"]["kernel"].at[1].set(0.0),
                                     "bias": q["hidden_1"]["bias"]})}
  run = progressive_distinctiveness(model, "hidden_1", loss)
  p1, m1, rep = run(params, masks, x)
  _, _, ref = run(zeroed, masks, x)
  assert float(rep.loss[0]) == pytest.approx(float(loss(zeroed)), rel=1e-6)
  assert float(rep.loss[0]) != pytest.approx(float(loss(params)), rel=1e-3)
  np.testing.assert_array_equal(rep.unit_masks, ref.unit_masks)
  np.testing.assert_allclose(rep.loss, ref.loss, rtol=1e-6)
  np.testing.assert_allclose(rep.min_angle, ref.min_angle, atol=1e-4)
  assert float(jnp.abs(p1["params"]["hidden_0"]["kernel"][:, 1]).sum()) == 0.0
  np.testing.assert_array_equal(m1["hidden_0"], masks["hidden_0"])


def test_padding_rows_may_hold_anything_eagerly_too():
  """A NaN in a row of weight 0 (a row that does not exist) was refused eagerly ('x holds 1
  NaN') while the same call under jit ran, and gave the unpadded trajectory."""
  w1, b1, w2, b2 = _hand_built(np.random.default_rng(2))
  params = _ae_params(w1, b1, w2, b2)
  xp = jnp.concatenate([_X, jnp.full((3, 4), jnp.nan)])
  w = np.r_[np.ones(16), np.zeros(3)].astype(np.float32)
  run = _ae_run()
  _, m, rep = run(params, jaxprune.unit_masks_ones(_AE), xp, sample_weight=w)
  _, m_ref, ref = run(params, jaxprune.unit_masks_ones(_AE), _X)
  assert not bool(rep.invalid)
  np.testing.assert_array_equal(rep.unit_masks, ref.unit_masks)
  np.testing.assert_allclose(rep.loss, ref.loss, rtol=1e-6)
  with pytest.raises(ValueError, match="x holds 1 NaN"):       # a real row still may not
    run(params, jaxprune.unit_masks_ones(_AE), xp.at[0, 0].set(jnp.nan), sample_weight=w)


# ----------------------------------------------------------------------------- transforms, models


def test_vmap_over_params_equals_a_loop():
  run = _ae_run()
  ones = jaxprune.unit_masks_ones(_AE)
  stacked = jax.vmap(_AE.init)(jax.random.split(jax.random.key(7), 3))
  _, vm, vrep = jax.vmap(run, in_axes=(0, None, None))(stacked, ones, _X)
  for k in range(3):
    p = jax.tree.map(lambda a: a[k], stacked)
    _, m, rep = run(p, ones, _X)
    np.testing.assert_array_equal(rep.unit_masks, vrep.unit_masks[k])
    np.testing.assert_array_equal(vm["hidden_0"][k], m["hidden_0"])
    assert int(rep.count) == int(vrep.count[k])
    np.testing.assert_allclose(rep.loss, vrep.loss[k], rtol=1e-5)
    np.testing.assert_allclose(rep.min_angle, vrep.min_angle[k], atol=1e-3)


def test_jit_equals_eager_and_flags_bad_input():
  run = _ae_run()
  ones = jaxprune.unit_masks_ones(_AE)
  p = _AE.init(jax.random.key(8))
  _, _, rep = run(p, ones, _X)
  jitted = jax.jit(run)
  _, _, jrep = jitted(p, ones, _X)
  np.testing.assert_array_equal(jrep.unit_masks, rep.unit_masks)
  np.testing.assert_allclose(jrep.loss, rep.loss, rtol=1e-6)
  # Bad traced input: no step, invalid set (eagerly each raises).
  for args in ((_X, jnp.nan), (_X, -1.0), (_X.at[0, 0].set(jnp.nan), 1e-6)):
    _, m_bad, bad = jitted(p, ones, *args)
    assert bool(bad.invalid) and int(bad.count) == 1
    np.testing.assert_array_equal(bad.units_kept, [6] * 6)
    assert m_bad["hidden_0"].all()
  # A tolerance that is not one number: said plainly (it was NumPy's or jit's own message).
  with pytest.raises(ValueError, match=r"constant_tol must be one number, got shape \(2,\); "
                     "to run several tolerances, jax.vmap"):
    run(p, ones, _X, jnp.asarray([1e-6, 1e-3]))
  for tol in (None, "1e-6"):
    with pytest.raises(TypeError, match="constant_tol must be a number >= 0"):
      run(p, ones, _X, tol)
  # A traced mask that keeps no unit (eagerly refused) was a valid empty trajectory.
  _, _, empty = jitted(p, {"hidden_0": jnp.zeros(6, bool)}, _X)
  assert bool(empty.invalid) and int(empty.count) == 1


def test_a_traced_plain_function_and_a_flax_module():
  """A model from outside the library: a plain function over a dict, and the same network as a
  Flax linen module, each traced; both follow the reference trajectory."""
  nn = pytest.importorskip("flax.linen")
  w1, b1, w2, b2 = _hand_built(np.random.default_rng(8))
  f = lambda v: jnp.asarray(v, jnp.float32)

  def fn(p, x):
    return jax.nn.sigmoid(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

  class AE(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(4, name="dec")(nn.sigmoid(nn.Dense(6, name="enc")(x)))

  plain = {"w1": f(w1), "b1": f(b1), "w2": f(w2), "b2": f(b2)}
  linen = {"params": {"enc": {"kernel": f(w1), "bias": f(b1)},
                      "dec": {"kernel": f(w2), "bias": f(b2)}}}
  xs = np.asarray(_X, np.float64)
  rows = _reference(_ACT["sigmoid"](xs @ w1 + b1), w2, b2, np.ones(6, bool), 0.5,
                    complementary=True)
  for apply, params in ((fn, plain), (AE().apply, linen)):
    target = jaxprune.trace(apply, params, _X)
    (name,) = target.groups
    loss = lambda p: jnp.mean((apply(p, _X) - _X) ** 2)
    _, _, rep = progressive_distinctiveness(target, name, loss, complementary=True)(
        params, jaxprune.unit_masks_ones(target), _X)
    assert int(rep.count) == len(rows)
    for s, r in enumerate(rows):
      np.testing.assert_array_equal(rep.unit_masks[s], r["keep"])
      out = _ACT["sigmoid"](xs @ (w1 * r["keep"]) + b1 * r["keep"]) @ r["w_out"] + r["b_out"]
      assert float(rep.loss[s]) == pytest.approx(np.mean((out - xs) ** 2), rel=1e-4)


def test_conv_channels_match_the_reference():
  """The first conv layer of a CNN4: a channel's vector is all its N x H x W values, a
  constant channel folds its value times the sum of its k x k consumer weights."""
  cnn = jaxprune.CNN4(input_shape=(59, 59, 1), channels=(4, 3, 3, 3), dense=(3, 3, 3))
  params = cnn.init(jax.random.key(3))
  q = params["params"]
  k0, b0 = q["conv_0"]["kernel"], q["conv_0"]["bias"]
  k0 = k0.at[..., 2].set(k0[..., 0]).at[..., 1].set(0.0)   # 2 duplicates 0; 1 is constant
  b0 = b0.at[2].set(b0[0]).at[1].set(0.4)
  params = {"params": dict(q, conv_0={"kernel": k0, "bias": b0})}
  rng = np.random.default_rng(9)
  x = host_f32(rng.normal(size=(3, 59, 59, 1)))
  loss = jax.jit(lambda p: jnp.mean(cnn.apply(p, x) ** 2))
  _, _, rep = progressive_distinctiveness(cnn, "conv_0", loss)(
      params, jaxprune.unit_masks_ones(cnn), x)
  acts = np.asarray(cnn.activations(params, x, "conv_0"), np.float64).reshape(-1, 4)
  w_out = np.moveaxis(np.asarray(q["conv_1"]["kernel"], np.float64), 2, 0)  # (4, k, k, out)
  rows = _reference(acts, w_out, np.asarray(q["conv_1"]["bias"]), np.ones(4, bool), 0.5)
  assert int(rep.count) == len(rows) and all(r["gap"] > 1e-3 for r in rows)
  np.testing.assert_array_equal(rep.unit_masks[1], [1, 0, 0, 1])   # the constant, the copy
  for s, r in enumerate(rows):
    np.testing.assert_array_equal(rep.unit_masks[s], r["keep"])
    k = jnp.asarray(r["keep"], jnp.float32)
    ref = {"params": dict(params["params"], conv_0={"kernel": k0 * k, "bias": b0 * k},
                          conv_1={"kernel": jnp.asarray(np.moveaxis(r["w_out"], 0, 2),
                                                        jnp.float32),
                                  "bias": jnp.asarray(r["b_out"], jnp.float32)})}
    assert float(rep.loss[s]) == pytest.approx(float(loss(ref)), rel=1e-5)
  assert float(rep.loss[1]) == pytest.approx(float(rep.loss[0]), rel=1e-5)


def test_several_inputs_get_a_clear_error_and_the_workaround_works():
  """A traced model of two inputs, its inputs passed as a tuple: NumPy's 'setting an array
  element with a sequence' came out of the data check. Now a TypeError names the fix, and the
  fix (one input, split inside the function) gives the trajectory of the two-input network."""
  rng = np.random.default_rng(10)
  f = lambda *shape: host_f32(rng.normal(size=shape))
  p = {"w1": f(3, 5), "w2": f(2, 5), "b1": f(5), "wo": f(5, 2), "bo": f(2)}
  x1, x2 = f(10, 3), f(10, 2)

  def fn(p, a, b):
    return jnp.tanh(a @ p["w1"] + b @ p["w2"] + p["b1"]) @ p["wo"] + p["bo"]

  t = jaxprune.trace(fn, p, x1, x2)
  (name,) = t.groups
  run = progressive_distinctiveness(t, name, lambda q: jnp.mean(fn(q, x1, x2) ** 2))
  with pytest.raises(TypeError, match="x must be one array.*got a tuple.*x\\[:, :3\\]"):
    run(p, jaxprune.unit_masks_ones(t), (x1, x2))
  xc = jnp.concatenate([x1, x2], axis=1)
  one = lambda q, x: fn(q, x[:, :3], x[:, 3:])
  t1 = jaxprune.trace(one, p, xc)
  _, _, rep = progressive_distinctiveness(t1, name, lambda q: jnp.mean(one(q, xc) ** 2))(
      p, jaxprune.unit_masks_ones(t1), xc)
  acts = np.tanh(np.asarray(x1, np.float64) @ np.asarray(p["w1"], np.float64)
                 + np.asarray(x2, np.float64) @ np.asarray(p["w2"], np.float64)
                 + np.asarray(p["b1"], np.float64))
  rows = _reference(acts, np.asarray(p["wo"]), np.asarray(p["bo"]), np.ones(5, bool), 0.0)
  assert int(rep.count) == len(rows) and all(r["gap"] > 1e-3 for r in rows)
  for s, r in enumerate(rows):
    np.testing.assert_array_equal(rep.unit_masks[s], r["keep"])
