"""Tests for jaxprune.pruners.redundancy: exact removal of planted linear combinations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune.models.mlp import MLP
from jaxprune.pruners.redundancy import group_redundancy
from conftest import host_f32


def test_planted_linear_combination_is_exact():
  # A linear hidden layer: unit 4 = 2*unit0 - unit1 + 0.5 (bias), so its activation is an exact
  # affine combination of units 0 and 1.
  model = MLP(in_features=6, hidden=(6,), out_features=3, activation="linear")
  params = model.init(jax.random.key(0))
  k = params["params"]["hidden_0"]["kernel"]
  b = params["params"]["hidden_0"]["bias"]
  k = k.at[:, 4].set(2 * k[:, 0] - k[:, 1])
  b = b.at[4].set(2 * b[0] - b[1] + 0.5)
  params["params"]["hidden_0"] = dict(kernel=k, bias=b)
  x = jax.random.normal(jax.random.key(1), (80, 6))
  acts = model.activations(params, x, "hidden_0")
  prune = group_redundancy(model, "hidden_0")
  p2, m, rep = prune(params, jaxprune.unit_masks_ones(model), acts, 1e-3)
  assert int(rep.count) == 1
  assert int(np.sum(m["hidden_0"])) == 5
  j = int(rep.removed[0])
  assert j in (0, 1, 4)  # any of the three is an exact combination of the other two
  np.testing.assert_allclose(model.apply(p2, x), model.apply(params, x), atol=2e-4)
  if j == 4:
    np.testing.assert_allclose(rep.coef[0, :2], [2, -1], atol=1e-3)
    assert float(rep.intercept[0]) == pytest.approx(0.5, abs=1e-3)
  # Tolerance 0 (traced): nothing is exact to 0 in float32 except constants.
  _, m0, rep0 = prune(params, jaxprune.unit_masks_ones(model), acts, 0.0)
  assert int(rep0.count) == 0 and bool(np.all(m0["hidden_0"]))


def test_constant_and_duplicate_relu_units_and_keep_one():
  model = MLP(in_features=3, hidden=(4,), out_features=2, activation="relu")
  params = model.init(jax.random.key(2))
  k = params["params"]["hidden_0"]["kernel"]
  b = params["params"]["hidden_0"]["bias"]
  k = k.at[:, 2].set(0.0).at[:, 3].set(k[:, 0])
  b = b.at[2].set(0.4).at[3].set(b[0])
  params["params"]["hidden_0"] = dict(kernel=k, bias=b)
  x = jax.random.normal(jax.random.key(3), (50, 3))
  acts = model.activations(params, x, "hidden_0")
  prune = group_redundancy(model, "hidden_0")  # one compiled prune, tol traced
  p2, m, rep = prune(params, jaxprune.unit_masks_ones(model), acts, 1e-3)
  assert int(rep.removed[0]) == 2  # the constant goes first
  assert int(rep.count) >= 2 and not m["hidden_0"][2]
  assert int(np.sum(m["hidden_0"])) >= 1
  np.testing.assert_allclose(model.apply(p2, x), model.apply(params, x), atol=2e-4)
  # tol = 1 removes everything it can but keeps one unit.
  _, m1, _ = prune(params, jaxprune.unit_masks_ones(model), acts, 1.01)
  assert int(np.sum(m1["hidden_0"])) == 1


def test_bad_input():
  model = MLP(in_features=3, hidden=(4,), out_features=2)
  params = model.init(jax.random.key(0))
  prune = group_redundancy(model, "hidden_0")
  acts = jnp.ones((10, 4))
  with pytest.raises(ValueError, match="4 units"):
    prune(params, jaxprune.unit_masks_ones(model), jnp.ones((10, 3)))
  with pytest.raises(ValueError, match="NaN"):
    prune(params, jaxprune.unit_masks_ones(model), acts.at[0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match="tol"):
    prune(params, jaxprune.unit_masks_ones(model), acts, -1.0)
  with pytest.raises(KeyError, match="hidden_0"):
    group_redundancy(model, "dense_0")


def test_max_remove_stops_the_same_greedy_path_after_k_removals():
  model = MLP(in_features=4, hidden=(9,), out_features=3, activation="tanh")
  params = model.init(jax.random.key(3))
  x = jax.random.normal(jax.random.key(4), (40, 4))
  acts = model.activations(params, x, "hidden_0")
  prune = group_redundancy(model, "hidden_0")
  ones = jaxprune.unit_masks_ones(model)
  _, m_all, full = prune(params, ones, acts, float("inf"))
  assert int(full.count) == 8 and int(np.sum(m_all["hidden_0"])) == 1  # down to one unit
  for k in (0, 3, 5):
    p_k, m_k, rep = prune(params, ones, acts, float("inf"), k)
    assert int(rep.count) == k and int(np.sum(m_k["hidden_0"])) == 9 - k
    np.testing.assert_array_equal(rep.removed[:k], full.removed[:k])
    removed = np.asarray(full.removed[:k])
    assert not np.any(np.asarray(m_k["hidden_0"])[removed])
    kernel = np.asarray(p_k["params"]["hidden_0"]["kernel"])
    assert np.all(kernel[:, removed] == 0)
  with pytest.raises(ValueError, match="max_remove must be a whole number >= 0"):
    prune(params, ones, acts, 1.0, -1)


def test_sample_weight_padding_gives_the_unpadded_fits():
  model = MLP(in_features=6, hidden=(6,), out_features=3, activation="linear")
  params = model.init(jax.random.key(2))
  k, b = params["params"]["hidden_0"]["kernel"], params["params"]["hidden_0"]["bias"]
  k = k.at[:, 4].set(2 * k[:, 0] - k[:, 1]).at[:, 5].set(k[:, 2] + k[:, 3])
  b = b.at[4].set(2 * b[0] - b[1] + 0.5).at[5].set(b[2] + b[3] - 1.0)
  params["params"]["hidden_0"] = dict(kernel=k, bias=b)
  rng = np.random.default_rng(0)
  x = host_f32(rng.normal(size=(40, 6)))
  pad = jnp.concatenate([x, host_f32(rng.normal(size=(15, 6)) * 9)])
  w = np.r_[np.ones(40), np.zeros(15)].astype(np.float32)
  acts, acts_p = (model.activations(params, d, "hidden_0") for d in (x, pad))
  prune = group_redundancy(model, "hidden_0")
  um = jaxprune.unit_masks_ones(model)
  p0, m0, r0 = prune(params, um, acts, 1e-3)
  p1, m1, r1 = prune(params, um, acts_p, 1e-3, sample_weight=w)
  assert int(r0.count) == 2
  np.testing.assert_array_equal(m0["hidden_0"], m1["hidden_0"])
  np.testing.assert_array_equal(r0.removed, r1.removed)
  np.testing.assert_allclose(r0.coef, r1.coef, atol=1e-4)
  np.testing.assert_allclose(r0.intercept, r1.intercept, atol=1e-4)
  for a, c in zip(jax.tree.leaves(p0), jax.tree.leaves(p1)):
    np.testing.assert_allclose(a, c, atol=1e-4)
  np.testing.assert_allclose(model.apply(p1, x), model.apply(params, x), atol=5e-4)
  # Weight 2 on a row is that row twice (the same 55 and 40 rows as above: no new programs).
  # Down to two units (tol inf): the inexact fits after the two planted ones depend on the
  # weights (the planted ones are exact under any weights). Not to one: of the last two, each
  # rebuilds the other equally well, a tie that float rounding decides.
  w2 = np.r_[np.full(10, 2.0), np.ones(20), np.zeros(25)].astype(np.float32)
  twice = jnp.concatenate([acts[:10], acts[:30]])
  _, m2, r2 = prune(params, um, acts_p, float("inf"), 4, sample_weight=w2)
  _, m3, r3 = prune(params, um, twice, float("inf"), 4)
  assert int(r3.count) == 4 and int(r2.count) == 4
  np.testing.assert_array_equal(m2["hidden_0"], m3["hidden_0"])
  np.testing.assert_array_equal(r2.removed, r3.removed)
  np.testing.assert_allclose(r2.residual[:4], r3.residual[:4], atol=1e-4)
  np.testing.assert_allclose(r2.coef, r3.coef, atol=1e-3)
  np.testing.assert_allclose(r2.intercept, r3.intercept, atol=1e-4)
  with pytest.raises(ValueError, match="shape"):
    prune(params, um, acts, 1e-3, sample_weight=np.ones(3))


def _reference_fit(x, kept, j):
  """Float64 minimum-norm least squares of centred column j on the kept others (NumPy)."""
  others = kept.copy()
  others[j] = False
  beta = np.zeros(x.shape[1])
  beta[others] = np.linalg.lstsq(x[:, others], x[:, j], rcond=None)[0]
  res = np.linalg.norm(x[:, j] - x @ beta) / np.linalg.norm(x[:, j])
  return beta, res


def _wide_case():
  """40 tanh units seen on 24 patterns: the centred activations have rank 23, so the first 17
  removals are exact (units rebuilt from the null space of the others' columns)."""
  model = MLP(in_features=5, hidden=(40,), out_features=3, activation="tanh")
  params = model.init(jax.random.key(7))
  x = jax.random.normal(jax.random.key(8), (24, 5)) * 2.0
  return model, params, x, model.activations(params, x, "hidden_0")


def test_fewer_patterns_than_units_every_fit_is_the_min_norm_least_squares():
  model, params, x, acts = _wide_case()
  a = np.asarray(acts, np.float64)
  xc = a - a.mean(0)
  prune = group_redundancy(model, "hidden_0")
  p2, m, rep = prune(params, jaxprune.unit_masks_ones(model), acts, 0.2)
  count = int(rep.count)
  assert count > 17  # the exact ones, then some within 20%
  kept = np.ones(40, bool)
  for t in range(count):
    j = int(rep.removed[t])
    beta, res = _reference_fit(xc, kept, j)
    np.testing.assert_allclose(rep.coef[t], beta, atol=2e-3 * max(1.0, np.abs(beta).max()))
    assert abs(float(rep.residual[t]) - res) < 1e-4 + 1e-3 * res, t
    if t < 17:
      assert res < 1e-6 and float(rep.residual[t]) < 1e-4
    kept[j] = False
  np.testing.assert_array_equal(np.asarray(m["hidden_0"]), kept)
  # Only exact removals: the network's outputs on its patterns do not change.
  p17, _, _ = prune(params, jaxprune.unit_masks_ones(model), acts, float("inf"), 17)
  np.testing.assert_allclose(model.apply(p17, x), model.apply(params, x), atol=1e-4)


def test_null_space_fits_agree_with_svd_fits_and_are_used(monkeypatch):
  """The exact fits come from a null basis carried from step to step; forcing an SVD at every
  step gives the same removals and coefficients, and a wrong null-space fit changes them (so
  the carried basis is what the exact removals use)."""
  from jaxprune.pruners import redundancy
  model, params, _, acts = _wide_case()
  um = jaxprune.unit_masks_ones(model)
  # _NULL_MIN and _NULL_RESIDUAL are read at each call and passed as values: one program
  # serves fast and svd, another (the patched _null_fit, traced anew) the last two runs.
  prune = group_redundancy(model, "hidden_0")
  fast = prune(params, um, acts, 0.2)[2]
  monkeypatch.setattr(redundancy, "_NULL_MIN", 2.0)  # P_jj <= 1: never from the basis
  svd = prune(params, um, acts, 0.2)[2]
  np.testing.assert_array_equal(fast.removed, svd.removed)
  np.testing.assert_allclose(fast.coef, svd.coef, atol=1e-3)
  monkeypatch.setattr(redundancy, "_NULL_MIN", 1e-3)
  real = redundancy._null_fit
  monkeypatch.setattr(redundancy, "_null_fit",
                      lambda basis, others, j: (lambda b, p, n: (b * 1.01, p, n))(
                          *real(basis, others, j)))
  prune = group_redundancy(model, "hidden_0")
  wrong = prune(params, um, acts, 0.2)[2]  # 1% off: the residual check sends every step to
  np.testing.assert_allclose(wrong.coef, svd.coef, atol=1e-3)  # the SVD...
  monkeypatch.setattr(redundancy, "_NULL_RESIDUAL", 1.0)  # ...unless it lets the error through
  assert np.abs(np.asarray(prune(params, um, acts, 0.2)[2].coef) - np.asarray(svd.coef)).max() > 1e-3


def test_null_fit_is_the_min_norm_solution_and_drops_one_direction():
  from jaxprune.pruners import redundancy
  rng = np.random.default_rng(3)
  x = rng.normal(size=(6, 10)).astype(np.float32)  # rank 6: a 4-dimensional null space
  _, _, vt = np.linalg.svd(x)
  basis = jnp.asarray(np.concatenate([np.zeros((10, 6)), vt[6:].T], 1), jnp.float32)
  others = jnp.ones(10, bool).at[3].set(False)
  beta, p, new = redundancy._null_fit(basis, others, 3)
  ref = np.zeros(10)
  keep = np.asarray(others)
  ref[keep] = np.linalg.lstsq(x[:, keep].astype(np.float64), x[:, 3], rcond=None)[0]
  np.testing.assert_allclose(beta, ref, atol=1e-4)
  assert float(p) == pytest.approx(float(np.sum(vt[6:, 3] ** 2)), rel=1e-5)
  new = np.asarray(new)
  live = np.abs(new).sum(0) > 0
  assert live.sum() == 3  # one direction fewer
  np.testing.assert_allclose(new[:, live].T @ new[:, live], np.eye(3), atol=1e-5)
  np.testing.assert_allclose(new[3], 0.0, atol=1e-6)  # unit 3 has left the null space
  np.testing.assert_allclose(x @ new[:, live], 0.0, atol=1e-4)


def test_null_space_fits_never_use_directions_the_svd_cuts(monkeypatch):
  """Near the end of the exact removals the other units' activations can have a singular value
  below the SVD's cut (eps * max(N, units) of the largest): the SVD fit leaves that direction
  out, an exact fit from the carried null basis would use it (larger coefficients, which
  generalise worse; on this case 6.4 apart). The null basis is used only when deleting the
  column provably keeps every singular value it uses above the cut."""
  from jaxprune.pruners import redundancy
  model = MLP(in_features=10, hidden=(300,), out_features=7, activation="sigmoid")
  params = model.init(jax.random.key(1))
  rng = np.random.default_rng(1)
  mix = rng.normal(size=(10, 10)) / np.sqrt(10)
  x = (rng.normal(size=(200, 10)) @ mix * 2.0).astype(np.float32)
  acts = model.activations(params, x, "hidden_0")
  um = jaxprune.unit_masks_ones(model)
  # 105 removals: the exact ones end near the 100th (the 100th with AVX-512 kernels, the 101st
  # with AVX2 ones: the SVD's rounding decides) and a null fit needs a residual <= 1e-4, so
  # the later removals (to 231 at tol 0.1) are SVDs either way.
  prune = group_redundancy(model, "hidden_0")
  fast = prune(params, um, acts, 0.1, 105)[2]
  monkeypatch.setattr(redundancy, "_NULL_MIN", 2.0)
  svd = prune(params, um, acts, 0.1, 105)[2]
  res = np.asarray(svd.residual[:105])
  last = int(np.flatnonzero(res <= 1e-4).max())  # the last exact removal
  assert int(svd.count) == 105 and 95 <= last <= 101 and np.all(res[last + 1:] > 1e-3)
  np.testing.assert_array_equal(fast.removed, svd.removed)
  np.testing.assert_allclose(fast.coef, svd.coef, atol=1e-3)


def _planted_dependencies(seed, units=8, patterns=60):
  """Activations with exact and near linear dependencies planted among random columns: each
  column after the first 3-5 is a random combination of the ones before, half of them plus
  noise of 1e-7 to 1e-3 (so some subsets of columns have singular values below the SVD's cut)."""
  rng = np.random.default_rng(seed)
  k = rng.integers(3, 6)
  cols = list(rng.normal(size=(patterns, k)).T)
  while len(cols) < units:
    w = rng.normal(size=len(cols)) * (rng.random(len(cols)) < 0.5)
    noise = 10.0 ** rng.uniform(-7, -3)
    cols.append(np.stack(cols, 1) @ w + noise * rng.normal(size=patterns) * (rng.random() < 0.6))
  return np.stack(cols, 1)[:, rng.permutation(units)].astype(np.float32)


def test_null_space_fits_on_planted_dependencies_equal_svd_fits(monkeypatch):
  """The guard of the test above on small hand-made cases whose outcome does not hang on the
  machine's rounding: with the guard's three conditions taken out of the exact fit (measured
  by editing them out), these runs remove other units or fit them 1.5 to 3.4 apart from the
  SVD's fits; with it, every removal and coefficient equals the SVD-only run's."""
  from jaxprune.pruners import redundancy
  model = MLP(in_features=3, hidden=(8,), out_features=2)
  params = model.init(jax.random.key(0))
  um = jaxprune.unit_masks_ones(model)
  prune = group_redundancy(model, "hidden_0")
  cases = [_planted_dependencies(seed) for seed in (219, 257, 291)]
  fast = [prune(params, um, jnp.asarray(x), 0.1, 7)[2] for x in cases]
  monkeypatch.setattr(redundancy, "_NULL_MIN", 2.0)
  for x, f in zip(cases, fast):
    svd = prune(params, um, jnp.asarray(x), 0.1, 7)[2]
    assert int(f.count) == int(svd.count) >= 3
    np.testing.assert_array_equal(f.removed, svd.removed)
    np.testing.assert_allclose(f.coef, svd.coef, atol=1e-4)


def _linear_pruner(h):
  """(params, prune, unit masks) of group redundancy on a linear 2-h-2 MLP: activations are
  passed in directly."""
  model = MLP(in_features=2, hidden=(h,), out_features=2, activation="linear")
  return (model.init(jax.random.key(0)), group_redundancy(model, "hidden_0"),
          jaxprune.unit_masks_ones(model))


def _deps_plus_noise(rng, n, h):
  """(n, h) float32: r random columns at scales 1e-2 to 1, noise of 1e-4 to 1e-1 on them, and
  h - r exact combinations of the noiseless ones."""
  r = int(rng.integers(3, 8))
  base = rng.normal(size=(n, r)) * 10 ** rng.uniform(-2, 0, size=r)
  a = np.concatenate([base, base @ rng.normal(size=(r, h - r))], 1)
  a[:, :r] += rng.normal(size=(n, r)) * 10 ** rng.uniform(-4, -1, size=r)
  return a.astype(np.float32)


def _float64_residual(a, kept, j):
  """Unit j's relative residual in float64, least squares on the other kept units' centred
  activations with the pruner's cut (float32 eps * max(patterns, units), as lstsq)."""
  xc = np.asarray(a, np.float64) - np.asarray(a, np.float64).mean(0)
  others = kept.copy()
  others[j] = False
  cut = np.finfo(np.float32).eps * max(xc.shape)
  r = xc[:, j] - xc[:, others] @ np.linalg.lstsq(xc[:, others], xc[:, j], rcond=cut)[0]
  return np.linalg.norm(r) / np.linalg.norm(xc[:, j])


def test_an_exact_duplicate_ranks_ahead_of_a_unit_rebuilt_only_approximately():
  """The ranking is by the residual of each unit's ridge fit, not by the ridge's regularised
  minimum, which adds ridge * (1 + |coefficients|^2): that put the noisy mean of five
  correlated units (residual 4.7e-3) ahead of an exact duplicate, whose fit then failed a
  tol of 1e-3 and stopped the removals with the duplicate kept."""
  rng = np.random.default_rng(0)
  n, h = 200, 8
  a = np.zeros((n, h))
  a[:, 0] = rng.normal(size=n)
  a[:, 6] = a[:, 0]                                   # an exact duplicate
  f = rng.normal(size=n)
  for k in range(1, 6):
    a[:, k] = f + 0.3 * rng.normal(size=n)            # five correlated units
  a[:, 7] = a[:, 1:6].mean(1) + 0.005 * rng.normal(size=n)   # their mean, nearly
  a = a.astype(np.float32)
  assert 4e-3 < _float64_residual(a, np.ones(h, bool), 7) < 6e-3
  model = MLP(in_features=2, hidden=(h,), out_features=2, activation="linear")
  params = model.init(jax.random.key(0))
  _, m, rep = group_redundancy(model, "hidden_0")(params, jaxprune.unit_masks_ones(model), a, 1e-3)
  assert int(rep.count) == 1 and int(rep.removed[0]) in (0, 6)
  assert float(rep.residual[0]) < 1e-5


def test_the_removals_stop_only_when_no_kept_unit_is_rebuilt_within_tol():
  """Low-rank activations plus noise of 3e-5 to 3e-3 (8 units, 40 patterns, tol 1e-3): where
  the greedy loop stops, every kept unit's float64 least-squares residual is at least 0.9 tol
  (ranked by the ridge's regularised minimum, 7 of these 20 cases stopped with a unit well
  within tol)."""
  rng = np.random.default_rng(3)
  h, n = 8, 40
  params, prune, um = _linear_pruner(h)
  for _ in range(20):
    r = int(rng.integers(2, 6))
    a = (rng.normal(size=(n, r)) * 10 ** rng.uniform(-3, 0, size=r)) @ (
        rng.normal(size=(r, h)) * 10 ** rng.uniform(-2, 1, size=(r, h)))
    a /= np.linalg.norm(a - a.mean(0), axis=0)
    a += rng.normal(size=(n, h)) * 10 ** rng.uniform(-4.5, -2.5, size=h) / np.sqrt(n)
    a = a.astype(np.float32)
    kept = np.asarray(prune(params, um, a, 1e-3)[1]["hidden_0"])
    if kept.sum() > 1:
      assert min(_float64_residual(a, kept, j) for j in np.flatnonzero(kept)) >= 0.9e-3


def _check_greedy(a, prune, params, um, tol):
  """Follows the pruner's removals with float64 fits: each removal is a best-reconstructed
  kept unit (its residual within float32 rounding of the smallest), and where it stops no
  kept unit is rebuilt within 0.9 tol."""
  rep = prune(params, um, a, tol)[2]
  kept = np.ones(a.shape[1], bool)
  for j in np.asarray(rep.removed[:int(rep.count)]):
    res = {u: _float64_residual(a, kept, u) for u in np.flatnonzero(kept)}
    assert res[j] <= min(res.values()) * 1.001 + 1e-5, (j, res)
    kept[j] = False
  if kept.sum() > 1:
    assert min(_float64_residual(a, kept, u) for u in np.flatnonzero(kept)) >= 0.9 * tol


def test_the_best_reconstructed_unit_goes_first_with_more_patterns_than_units():
  """60 patterns, 8 near-collinear units (condition numbers 1e3 to 1e5): the SVD before the
  loop finds their columns of full rank, so even the first removal is ranked by exact
  residuals (it was ranked by the ridge until a fit's SVD had run, and took a unit at up to
  2.3x the best residual; at tol 1e-3 it stopped with three units within tol)."""
  rng = np.random.default_rng(0)
  h, n = 8, 60
  params, prune, um = _linear_pruner(h)
  for case in range(8):
    cond = 10 ** rng.uniform(3, 5)
    u = np.linalg.qr(rng.normal(size=(n, h)))[0]
    s = np.logspace(0, -np.log10(cond), h) if case % 2 else np.r_[np.ones(h - 2), 1 / cond,
                                                                     3 / cond]
    a = (u * s) @ np.linalg.qr(rng.normal(size=(h, h)))[0].T + rng.normal(size=h) * 3
    a = (a * 10 ** rng.uniform(-1, 1, size=h)).astype(np.float32)
    for tol in (1e-4, 1e-3, 1e-2):
      _check_greedy(a, prune, params, um, tol)


def test_exact_combinations_go_before_noisy_units_with_fewer_patterns_than_units():
  """10 patterns, 12 units, some exact combinations of the others and some within noise of
  1e-4 to 1e-1: the exact ones (in the null space of the kept columns) go first (by the ridge
  residual alone, a noisy unit at 4e-4 went before one at 1e-8, and at tol 5e-4 the loop
  stopped there with the exact one kept)."""
  rng = np.random.default_rng(1)
  h, n = 12, 10
  params, prune, um = _linear_pruner(h)
  for _ in range(12):
    r = int(rng.integers(2, n - 1))
    base = rng.normal(size=(n, r))
    a = np.empty((n, h))
    a[:, :r] = base
    for k in range(r, h):
      noise = 0 if rng.random() < 0.5 else 10 ** rng.uniform(-4, -1)
      a[:, k] = (base @ (rng.normal(size=r) * (rng.random(r) < 0.6)) + rng.normal()
                 + noise * rng.normal(size=n))
    a = a[:, rng.permutation(h)].astype(np.float32)
    for tol in (5e-4, 1e-2):
      _check_greedy(a, prune, params, um, tol)


def test_after_exact_removals_leave_full_rank_the_loop_ranks_by_exact_residuals():
  """Exact dependencies first (removed from the carried null basis, no SVD), then columns of
  full rank: every removal is a best-reconstructed unit and the loop stops only when none is
  within tol. (A review found the loop still ranking by the ridge after such removals, as
  no SVD had said the columns were of full rank: at tol 7e-4 it stopped with a unit at 6.5e-4
  kept. The null basis now says so too.)"""
  rng = np.random.default_rng(0)
  h, n = 12, 24
  params, prune, um = _linear_pruner(h)
  for _ in range(16):
    a = _deps_plus_noise(rng, n, h)
    for tol in (3e-4, 3e-3, 3e-2):
      _check_greedy(a, prune, params, um, tol)
  # The reviewer's case (the 19th of a stream of such draws at other sizes, each followed by a
  # draw of tol; 16 patterns): at tol 7e-4 the loop stopped after two exact removals with a
  # unit at 6.5e-4 kept.
  rng = np.random.default_rng(0)
  for _ in range(19):
    a = _deps_plus_noise(rng, int(rng.integers(14, 40)), h)
    rng.uniform(-3, 0)
  assert a.shape == (16, h)
  _check_greedy(a, prune, params, um, 7e-4)


def test_only_an_svd_that_keeps_every_real_column_certifies_full_rank():
  """``_Basis.full`` (later fits by QR) is set only when no real column's singular value is
  cut: a duplicate column, more columns than patterns, or a column far below the cut clear it;
  zero padding columns (the gathered widths) do not."""
  from jaxprune.pruners import redundancy
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 5)).astype(np.float32)
  y = rng.normal(size=(12,)).astype(np.float32)
  rcond = np.float32(np.finfo(np.float32).eps * 12)
  full = lambda xo, count: bool(redundancy._svd_fit_dense(
      jnp.asarray(xo), jnp.asarray(y[:xo.shape[0]]), rcond, count)[1].full)
  assert full(x, 5)
  assert full(np.concatenate([x, np.zeros((12, 3), np.float32)], 1), 5)   # padding columns
  assert not full(np.concatenate([x, x[:, :1]], 1), 6)                   # a duplicate
  assert not full(rng.normal(size=(4, 5)).astype(np.float32), 5)         # wider than tall
  tiny = x.copy()
  tiny[:, 4] = x[:, 0] + 1e-9 * x[:, 1]                                  # below the cut
  assert not full(tiny, 5)


@pytest.mark.parametrize("hidden,patterns,count", [(6, 10, 4), (20, 8, 6), (9, 30, 9)])
def test_qr_fit_is_numpys_least_squares_at_every_gathered_width(monkeypatch, hidden, patterns,
                                                                 count):
  """``_qr_fit`` on the kept columns gathered into a static width (padding columns after them,
  also where the width exceeds the patterns, (20, 8, 6): width 10) is NumPy's float64
  least-squares fit; the coefficients of the other units are exactly 0."""
  from jaxprune.pruners import redundancy
  monkeypatch.setattr(redundancy, "_GATHER_MIN_WORK", 0.0)  # the widths of a large group
  rng = np.random.default_rng(hidden)
  x = rng.normal(size=(patterns, hidden)).astype(np.float32)
  y = rng.normal(size=(patterns,)).astype(np.float32)
  others = np.zeros(hidden, bool)
  others[rng.choice(hidden, count, replace=False)] = True
  got = np.asarray(redundancy._qr_fit(jnp.asarray(x), jnp.asarray(others), jnp.asarray(y)))
  want = np.linalg.lstsq(x[:, others].astype(np.float64), y.astype(np.float64), rcond=None)[0]
  np.testing.assert_allclose(got[others], want, rtol=1e-4, atol=1e-5)
  assert np.all(got[~others] == 0)


def test_qr_fits_after_a_full_rank_svd_agree_with_svd_fits_and_are_used(monkeypatch):
  """More patterns than units: the SVD before the loop finds the columns of full rank, and
  every fit (on a subset of them) comes from a QR. Forcing an SVD at every step gives the
  same removals, coefficients and residuals to float rounding, and a wrong QR fit changes
  them (so the QR is what those steps use)."""
  from jaxprune.pruners import redundancy
  model = MLP(in_features=6, hidden=(30,), out_features=3, activation="tanh")
  params = model.init(jax.random.key(3))
  x = jax.random.normal(jax.random.key(4), (60, 6)) * 1.5
  acts = model.activations(params, x, "hidden_0")
  um = jaxprune.unit_masks_ones(model)
  prune = group_redundancy(model, "hidden_0")
  qr = prune(params, um, acts, float("inf"), 25)
  monkeypatch.setattr(redundancy, "_QR_FITS", 0.0)
  svd = prune(params, um, acts, float("inf"), 25)
  assert int(qr[2].count) == int(svd[2].count) == 25
  np.testing.assert_array_equal(qr[2].removed, svd[2].removed)
  np.testing.assert_allclose(qr[2].coef, svd[2].coef, atol=1e-4)
  np.testing.assert_allclose(qr[2].residual, svd[2].residual, atol=1e-5)
  for a, b in zip(jax.tree.leaves(qr[0]), jax.tree.leaves(svd[0])):
    np.testing.assert_allclose(a, b, atol=1e-4)
  monkeypatch.setattr(redundancy, "_QR_FITS", 1.0)
  real = redundancy._qr_fit
  monkeypatch.setattr(redundancy, "_qr_fit", lambda x, o, y: real(x, o, y) * 1.01)
  wrong = group_redundancy(model, "hidden_0")(params, um, acts, float("inf"), 25)[2]
  gap = np.abs(np.asarray(wrong.coef[:25]) - np.asarray(svd[2].coef[:25])).max(axis=1)
  assert np.all(gap > 1e-5) and gap.max() > 1e-3                 # every removal: a QR fit


@pytest.mark.parametrize("hidden,patterns,smallest,seed",
                         [(32, 20, -6, 0), (32, 20, -6, 1), (24, 12, -6, 0), (24, 12, -6, 1),
                          (40, 30, -7, 1)])
def test_graded_spectra_refuse_null_fits_that_differ_from_the_svd(monkeypatch, hidden, patterns,
                                                                   smallest, seed):
  """Activations whose singular values fall evenly (on a log scale) from 1 to 1e-6: some sit
  just below the SVD's cut and rise above the cut of a later, smaller subset, some just above
  it fall close to those below. The null basis is used only when the SVD of the other units
  would split the directions as the basis does, and far enough apart that the two fits agree:
  here the guards refuse every null fit, which without them took 2-7 removals per case, 3e-2 to
  3e-1 of the largest coefficient away from the SVD's. (Null fits that are taken are compared
  with the SVD's in test_null_space_fits_agree_with_svd_fits_and_are_used.)"""
  from jaxprune.pruners import redundancy
  rng = np.random.default_rng(seed)
  r = min(patterns, hidden)
  u = np.linalg.qr(rng.normal(size=(patterns, r)))[0]
  v = np.linalg.qr(rng.normal(size=(hidden, r)))[0]
  acts = jnp.asarray((u * np.logspace(0, smallest, r)) @ v.T + 0.5, jnp.float32)
  model = MLP(in_features=3, hidden=(hidden,), out_features=2, activation="tanh")
  params = model.init(jax.random.key(0))
  um = jaxprune.unit_masks_ones(model)

  def run():
    return group_redundancy(model, "hidden_0")(params, um, acts, float("inf"), patterns)[2]

  fast = run()
  monkeypatch.setattr(redundancy, "_NULL_MIN", 2.0)  # every fit an SVD
  svd = run()
  np.testing.assert_array_equal(fast.removed, svd.removed)
  scale = np.maximum(1.0, np.abs(np.asarray(svd.coef)).max(1, keepdims=True))
  np.testing.assert_allclose(np.asarray(fast.coef) / scale, np.asarray(svd.coef) / scale,
                             atol=2e-3)


def test_float64_mode_prunes_as_float32():
  """Under jax_enable_x64 the carried null basis has the activations' dtype (float32), so the
  branches agree; the removals are those of the default mode."""
  model, params, _, acts = _wide_case()
  um = jaxprune.unit_masks_ones(model)
  want = group_redundancy(model, "hidden_0")(params, um, acts, 0.2)[2]
  # Scoped: the previous setting comes back, whatever it was (older JAX has the context
  # manager in jax.experimental only).
  if hasattr(jax, "enable_x64"):
    enable_x64 = jax.enable_x64
  else:
    from jax.experimental import enable_x64  # pylint: disable=import-outside-toplevel
  with enable_x64(True):
    got = group_redundancy(model, "hidden_0")(params, um, acts, 0.2)[2]
  np.testing.assert_array_equal(got.removed, want.removed)
  np.testing.assert_allclose(got.coef, want.coef, atol=1e-3)


def test_small_groups_compile_one_gathered_width_and_large_ones_four(monkeypatch):
  """Each gathered width copies the SVD fit into the program (one SVD call each, LAPACK's on
  CPU, cuSOLVER's on a GPU, plus the one before the loop): a small group (4 N h^3 <=
  _GATHER_MIN_WORK) compiles one width, a large one four (the test below compares the fits
  of one width and of several)."""
  import re
  from jaxprune.pruners import redundancy

  def svd_calls(hidden, patterns):
    model = MLP(in_features=3, hidden=(hidden,), out_features=2)
    params = model.init(jax.random.key(0))
    acts = jnp.zeros((patterns, hidden), jnp.float32)
    prune = group_redundancy(model, "hidden_0")
    text = jax.jit(lambda a: prune(params, jaxprune.unit_masks_ones(model), a, 0.1)).lower(
        acts).as_text()
    return len(re.findall(r"custom_call @\w*(?:gesdd|gesvd)", text))

  small = svd_calls(12, 40)
  assert 4 * 40 * 12 ** 3 <= redundancy._GATHER_MIN_WORK
  monkeypatch.setattr(redundancy, "_GATHER_MIN_WORK", 4 * 40 * 12 ** 3 - 1)  # just below
  assert svd_calls(12, 40) == small + 3 >= 5


@pytest.mark.parametrize("hidden", [3, 5])  # 5: four widths (2, 3, 4, 5), not a multiple of 4
def test_svd_of_the_kept_columns_gathered_at_any_width_gives_the_same_fits(monkeypatch, hidden):
  """The SVD fits gather the kept columns into one of _WIDTHS static widths (the narrowest
  that holds them); one width (all columns, the removed ones zero) or a width per count give
  the same removals and coefficients to float rounding, down to the last unit."""
  from jaxprune.pruners import redundancy
  model = MLP(in_features=3, hidden=(hidden,), out_features=2, activation="tanh")
  params = model.init(jax.random.key(hidden))
  x = jax.random.normal(jax.random.key(0), (30, 3))
  acts = model.activations(params, x, "hidden_0")
  um = jaxprune.unit_masks_ones(model)
  monkeypatch.setattr(redundancy, "_NULL_MIN", 2.0)  # every fit an SVD
  monkeypatch.setattr(redundancy, "_GATHER_MIN_WORK", 0.0)  # the widths of a large group
  reps = []
  for widths in (1, redundancy._WIDTHS, hidden):
    monkeypatch.setattr(redundancy, "_WIDTHS", widths)
    reps.append(group_redundancy(model, "hidden_0")(params, um, acts, float("inf"))[2])
  for rep in reps:
    assert int(rep.count) == hidden - 1
    np.testing.assert_array_equal(rep.removed, reps[0].removed)
    np.testing.assert_allclose(rep.coef, reps[0].coef, atol=1e-4)
    np.testing.assert_allclose(rep.residual, reps[0].residual, atol=1e-5)


def test_vmap_over_tol_and_activations_agrees_with_a_loop():
  """Under vmap every fit is a full-width SVD (a batched cond or switch would run every branch
  for every member); the removals are the loop's and the coefficients agree to rounding."""
  model, params, x, acts = _wide_case()
  um = jaxprune.unit_masks_ones(model)
  prune = group_redundancy(model, "hidden_0")
  tols = jnp.asarray([1e-3, 0.2, jnp.inf])
  batched = jax.vmap(lambda t: prune(params, um, acts, t, 30))(tols)
  acts2 = jnp.stack([acts, model.activations(params, x[::-1] * 0.5, "hidden_0")])
  by_acts = jax.vmap(lambda a: prune(params, um, a, 0.2))(acts2)
  for out, i, (a, t, k) in [(batched, 0, (acts, 1e-3, 30)), (batched, 1, (acts, 0.2, 30)),
                            (batched, 2, (acts, float("inf"), 30)), (by_acts, 0, (acts, 0.2, None)),
                            (by_acts, 1, (acts2[1], 0.2, None))]:
    one = prune(params, um, a, t, k)
    np.testing.assert_array_equal(out[1]["hidden_0"][i], one[1]["hidden_0"])
    np.testing.assert_array_equal(out[2].removed[i], one[2].removed)
    np.testing.assert_allclose(out[2].coef[i], one[2].coef, atol=2e-3)
    for b, o in zip(jax.tree.leaves(out[0]), jax.tree.leaves(one[0])):
      np.testing.assert_allclose(b[i], o, atol=2e-3)


@pytest.mark.parametrize("weighted", [False, True])
def test_an_exactly_constant_unit_is_removed_first_whatever_the_others_scale(weighted):
  """A unit with zero incoming weights is one value on every pattern, but its float32 mean can
  be an ulp off: its centred norm (1.2e-6) exceeded 1e-6 of the other units' (std 0.07), so it
  was neither constant nor rebuilt, and nothing was removed. It goes first now, exactly."""
  model = jaxprune.Autoencoder(in_features=11, hidden=(10,))
  params = model.init(jax.random.key(0))
  layer = params["params"]["hidden_0"]
  params["params"]["hidden_0"] = {"kernel": layer["kernel"].at[:, 1].set(0.0),
                                  "bias": layer["bias"].at[1].set(0.7)}
  x = jax.random.uniform(jax.random.key(1), (100, 11))   # 100 equal values: a mean an ulp off
  acts = model.activations(params, x, "hidden_0")
  kw = {}
  if weighted:   # padding rows of another value: they do not exist
    acts = jnp.concatenate([acts, jnp.full((5, 10), 3.0)])
    kw["sample_weight"] = jnp.concatenate([jnp.ones(100), jnp.zeros(5)])
  um = jaxprune.unit_masks_ones(model)
  new, m, rep = group_redundancy(model, "hidden_0")(params, um, acts, 1e-3, **kw)
  assert int(rep.count) >= 1 and int(rep.removed[0]) == 1 and float(rep.residual[0]) == 0.0
  assert not bool(m["hidden_0"][1])
  masked = jaxprune.apply_masks(new, jaxprune.expand(new, model, m))
  np.testing.assert_allclose(model.apply(masked, x), model.apply(params, x), atol=1e-6)
