"""group_redundancy against an independent float64 NumPy reference of its documented semantics:
each removal is the minimum-norm least-squares fit of the unit's centred (weighted) activations
on the other kept units' (singular values below eps32 * max(patterns, units) of the largest left
out), the intercept the (weighted) mean left over, and the residual |a_j - fit| / |a_j - mean|."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune.models.mlp import MLP
from jaxprune.pruners.redundancy import group_redundancy

_EPS32 = float(np.finfo(np.float32).eps)


@functools.lru_cache(maxsize=None)
def _pruner(h):
  model = MLP(in_features=2, hidden=(h,), out_features=2, activation="linear")
  return model, model.init(jax.random.key(0)), group_redundancy(model, "hidden_0")


def _run(acts, tol, max_remove=None, mask=None, weight=None):
  model, params, prune = _pruner(acts.shape[-1])
  um = {"hidden_0": jnp.asarray(mask)} if mask is not None else jaxprune.unit_masks_ones(model)
  kw = {} if weight is None else {"sample_weight": weight}
  _, m, rep = prune(params, um, jnp.asarray(acts), tol, max_remove, **kw)
  return np.asarray(m["hidden_0"]), jax.tree.map(np.asarray, rep)


def _reference(a, kept, j, weight=None):
  """(beta, intercept, relative residual) of unit j on the other kept units, in float64."""
  a = np.asarray(a, np.float64).reshape(-1, a.shape[-1])
  w = np.ones(len(a)) if weight is None else np.asarray(weight, np.float64)
  a, w = np.where(kept, a, 0.0)[w > 0], w[w > 0]   # units already gone: no part, NaN or not
  others = kept.copy()
  others[j] = False
  mu = w @ a / w.sum()
  cn = np.sqrt(w @ (a - mu) ** 2)
  if np.all(a[:, j] == a[0, j]) or cn[j] <= 1e-6 * cn[kept].max():   # a constant unit
    return np.zeros(a.shape[1]), mu[j], 0.0
  sw = np.sqrt(w)[:, None]
  beta = np.zeros(a.shape[1])
  if others.any():
    beta[others] = np.linalg.lstsq((a[:, others] - mu[others]) * sw, (a[:, j] - mu[j]) * sw[:, 0],
                                   rcond=_EPS32 * max(a.shape))[0]
  c = mu[j] - beta @ mu
  res = np.sqrt(w @ (a[:, j] - a @ beta - c) ** 2) / cn[j]
  return beta, c, res


def _check_against_reference(a, rep, mask=None, weight=None, atol=2e-3):
  """Every removal of ``rep`` is the reference fit given the units kept before it."""
  kept = np.ones(a.shape[-1], bool) if mask is None else np.array(mask, bool)
  for t in range(int(rep.count)):
    j = int(rep.removed[t])
    assert kept[j], (t, j)
    beta, c, res = _reference(a, kept, j, weight)
    assert np.all(rep.coef[t][~kept] == 0), t   # units already gone are no regressors
    scale = max(1.0, np.abs(beta).max())
    np.testing.assert_allclose(rep.coef[t], beta, atol=atol * scale, err_msg=f"step {t}")
    assert abs(rep.intercept[t] - c) <= atol * max(1.0, abs(c), np.abs(a).max()), t
    assert abs(rep.residual[t] - res) <= 1e-4 + 1e-3 * res, (t, rep.residual[t], res)
    kept[j] = False
  return kept


def test_planted_constant_duplicate_and_sum_are_the_reference_fits():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(30, 8))
  a[:, 1] = 3 * a[:, 0] + 2            # collinear with unit 0
  a[:, 2] = 1.5                        # constant
  a[:, 5] = a[:, 3] + a[:, 4] - 0.25   # a sum of two others
  a = a.astype(np.float32)
  m, rep = _run(a, 1e-3)
  assert int(rep.count) == 3 and not bool(rep.invalid)
  assert int(rep.removed[0]) == 2 and rep.residual[0] == 0 and rep.intercept[0] == 1.5
  kept = _check_against_reference(a, rep)
  np.testing.assert_array_equal(m, kept)
  # What is left is one of {0, 1}, and two of {3, 4, 5}: none rebuilds another.
  assert kept[[0, 1]].sum() == 1 and kept[[3, 4, 5]].sum() == 2 and kept[[6, 7]].all()


def test_random_rank_deficient_cases_with_masks_and_weights_match_the_reference():
  rng = np.random.default_rng(1)
  n, h = 30, 8
  for case in range(6):
    r = int(rng.integers(1, h + 1))
    mix = rng.normal(size=(r, h))
    mix[:, rng.random(h) < 0.2] = 0                       # constants
    a = rng.normal(size=(n, r)) @ mix + rng.normal(size=h)
    noisy = rng.random(h) < 0.3
    a[:, noisy] += rng.normal(size=(n, noisy.sum())) * 10 ** rng.uniform(-4, 0)
    a = a.astype(np.float32)
    mask = rng.random(h) < 0.8
    mask[0] = True
    a[:, ~mask] = np.nan            # units already removed take no part, NaN or not
    w = None
    if case >= 3:
      w = rng.uniform(0, 3, size=n).astype(np.float32)
      w[rng.random(n) < 0.6] = 0    # 12 patterns or so: rank deficient
    tol = (1e-3, 0.3, np.inf)[case % 3]
    m, rep = _run(a, tol, mask=mask, weight=w)
    assert not bool(rep.invalid)
    kept = _check_against_reference(a, rep, mask, w)
    np.testing.assert_array_equal(m, kept)


def test_zero_weight_padding_does_not_move_the_singular_value_cut():
  """The SVD cut is eps * max(patterns, units) of the largest singular value, the patterns
  those that exist: 18 zero-weight padding rows moved it from 12 eps to 30 eps, so a direction
  of the other units at 3e-6 of the largest (kept on the 12 real patterns) was cut on the
  padded data, and the fit of unit 7, which needs it (a coefficient near 2e4), became another
  one (coefficient 0, residual 0.06)."""
  rng = np.random.default_rng(1)
  n, pad = 12, 18
  u = rng.normal(size=(n, 8))
  u = np.linalg.qr(u - u.mean(0))[0]
  others = u[:, :7] * np.array([1.0, 0.7, 0.5, 0.4, 0.3, 0.2, 3e-6])
  y = others[:, :3] @ np.array([0.3, -0.2, 0.6]) + 0.05 * u[:, 6]
  a = (np.concatenate([others, y[:, None]], 1) * 10 + 1).astype(np.float32)
  padded = np.concatenate([a, rng.normal(size=(pad, 8)).astype(np.float32)])
  w = np.r_[np.ones(n), np.zeros(pad)].astype(np.float32)
  _, rep = _run(padded, np.inf, 1, weight=w)
  beta, _, res = _reference(padded, np.ones(8, bool), 7, w)
  assert abs(beta[6]) > 1e4 and res < 1e-3     # the reference keeps the small direction
  assert int(rep.removed[0]) == 7
  np.testing.assert_allclose(rep.coef[0], beta, rtol=2e-3, atol=1e-3)
  assert rep.residual[0] < 1e-2                 # float32 rounding of a 2e4 coefficient


def _weight_scale_case():
  rng = np.random.default_rng(5)
  a = rng.normal(size=(30, 8)).astype(np.float32)
  a[:, 5] = 2 * a[:, 1] - a[:, 2] + 0.3 + 1e-3 * rng.normal(size=30).astype(np.float32)
  a[:, 6] = a[:, 0] * 0.5 + 0.05 * rng.normal(size=30).astype(np.float32)
  w = rng.uniform(0.5, 2, size=30)
  w[:6] = 0
  return a, w


def test_sample_weights_of_any_scale_give_the_reference_fits():
  """Weighted least squares does not depend on the weights' scale. In float32 it did: weights
  of 1e-38 or 1e37 underflowed or overflowed the norms, every unit read as constant and was
  removed with its mean folded (the outputs changed); 1e-40 (subnormal) read as all zero, and
  the call only set ``invalid``."""
  a, w = _weight_scale_case()
  _, want = _run(a, np.inf, weight=w.astype(np.float32))
  for scale in (1e-40, 1e-38, 1e37):
    _, got = _run(a, np.inf, weight=(w * scale).astype(np.float32))
    assert not bool(got.invalid) and int(got.count) == 7, scale
    _check_against_reference(a, got, weight=w)
    np.testing.assert_array_equal(got.removed[:5], want.removed[:5])  # the last two: a tie
    np.testing.assert_allclose(got.residual[:7], want.residual[:7], atol=1e-5)


def test_vmap_over_sample_weights_of_any_scale_agrees_with_a_loop_and_the_reference():
  """Traced (vmapped) weights are scaled in the program (1e37 overflowed the norms there).
  Traced weights below float32's smallest normal number (1.2e-38) still read as 0."""
  rng = np.random.default_rng(2)
  a = rng.normal(size=(30, 8)).astype(np.float32)
  a[:, 5] = a[:, 1] - a[:, 2]
  a[:, 7] = 0.5 * a[:, 3] + 0.1 * rng.normal(size=30).astype(np.float32)
  ws = np.stack([np.r_[np.ones(20), np.zeros(10)], np.r_[np.zeros(5), np.ones(25)],
                 rng.uniform(0, 2, 30)]).astype(np.float64)
  ws = np.concatenate([ws, ws[2:] * 1e-36, ws[2:] * 1e37]).astype(np.float32)
  model, params, prune = _pruner(8)
  um = jaxprune.unit_masks_ones(model)
  # 6 removals: the 7th, of one of the last two units, is a tie that rounding decides.
  out = jax.vmap(lambda w: prune(params, um, jnp.asarray(a), jnp.inf, 6, sample_weight=w))(
      jnp.asarray(ws))
  for i, w in enumerate(ws):
    batched = jax.tree.map(lambda t, i=i: np.asarray(t[i]), out[2])
    assert int(batched.count) == 6 and not bool(batched.invalid), i
    _check_against_reference(a, batched, weight=w.astype(np.float64))
    if i < 3:
      _, m, one = prune(params, um, jnp.asarray(a), jnp.inf, 6, sample_weight=w)
      np.testing.assert_array_equal(batched.removed, one.removed)
      np.testing.assert_array_equal(out[1]["hidden_0"][i], m["hidden_0"])
