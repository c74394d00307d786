"""Group redundancy: remove units that a linear combination of the other kept units rebuilds.

Beyond pairs: unit j is redundant when its activation vector (over the P patterns, unshifted)
is well reconstructed by a least-squares fit on the other kept units *plus a constant*:
``a_j ~ sum_k beta_k a_k + c``. Its outgoing weights are then redistributed by the coefficients
(row_k += beta_k row_j, a transfer matrix through :func:`jaxprune.units.redistribute`) and the
intercept c is folded into the next bias, so the network is unchanged when the dependency is
exact. Constant units are the special case with no coefficients.

Greedy: at each step the best-reconstructed kept unit is found (ranked by a ridge-regularised
inverse of the kept units' correlation matrix, ``delta = 1e-4``; candidates whose scores differ
only by float rounding, such as the copies of an exact duplicate, are ordered by that rounding),
its exact least-squares fit (SVD, minimum norm, on the centred activations) is computed, and it
is removed if its relative residual ``|a_j - fit| / |a_j - mean(a_j)|`` (the square root of the
unexplained variance fraction) is below ``tol``. A unit is constant, with residual 0 and only
its mean folded, when the norm of its centred activations is at most ``1e-6`` times the largest
among the kept units' (constants are ranked first). Then the next; it stops when the best
candidate fails or one unit is left. The activations are those of the starting network;
removal does not change the other units' activations.

Example:
  >>> import jax, jaxprune
  >>> from jaxprune.pruners import group_redundancy
  >>> model = jaxprune.MLP(in_features=4, hidden=(6,), out_features=3, activation='relu')
  >>> params = model.init(jax.random.key(0))
  >>> x = jax.random.normal(jax.random.key(1), (64, 4))
  >>> prune = group_redundancy(model, 'hidden_0')
  >>> acts = model.activations(params, x, 'hidden_0')
  >>> params, masks, rep = prune(params, jaxprune.unit_masks_ones(model), acts, 1e-3)
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import units as units_lib
from jaxprune.pruners import _common

_RIDGE = 1e-4


class RedundancyReport(NamedTuple):
  """Removals in order: ``removed[:count]`` unit indices, ``residual[:count]`` their relative
  residuals, ``coef`` (units, units) row n = the coefficients used for removal n,
  ``intercept[:count]``, and ``invalid`` (under jit: NaN activations, a negative or NaN tol, a
  negative max_remove, sample weights that are negative or non-finite or leave fewer than 2
  patterns; then nothing was changed)."""

  removed: jax.Array
  residual: jax.Array
  coef: jax.Array
  intercept: jax.Array
  count: jax.Array
  invalid: jax.Array


def _fit(x, mask, j):
  """Least squares of centred column j on the other kept centred columns."""
  others = mask.at[j].set(False)
  xo = jnp.where(others[None, :], x, 0.0)
  y = x[:, j]
  beta = jnp.linalg.lstsq(xo, y)[0]
  beta = jnp.where(others, beta, 0.0)
  res = y - xo @ beta
  ny = jnp.linalg.norm(y)
  scale = jnp.max(jnp.linalg.norm(jnp.where(mask[None, :], x, 0.0), axis=0))
  const = ny <= 1e-6 * jnp.maximum(scale, 1e-30)
  rel = jnp.where(const, 0.0, jnp.linalg.norm(res) / jnp.where(const, 1.0, ny))
  return jnp.where(const, 0.0, beta), rel


def group_redundancy(model_or_groups, group: str) -> Callable:
  """Greedy removal of linearly redundant units of ``group`` (see the module docstring).

  Returns:
    ``prune(params, unit_masks, activations, tol=1e-3, max_remove=None) -> (params,
    unit_masks, RedundancyReport)``, jit-compiled; ``tol`` (relative residual) and
    ``max_remove`` (stop after this many removals; None: no limit) are traced. With
    ``tol=float('inf')`` and ``max_remove=k`` it removes exactly the k best-reconstructed units
    one by one (pruning to a target size). Activations are (N, units) or (N, ..., units),
    e.g. (N, H, W, units), from the params being pruned. NaN activations raise on concrete
    input; under jit they leave everything unchanged and set ``report.invalid``.
    ``sample_weight`` (N,) makes the fits weighted least squares (weighted means, rows scaled
    by ``sqrt(w)``): a pattern of weight 0 does not exist, so zero-weight padding rows give the
    fits of the unpadded data (to float rounding). None: every pattern counts once.
  """
  g = _common.get_group(model_or_groups, group)
  _common.check_activations_complete(model_or_groups, g.name)
  why = _common.fold_obstacle(g, linear=True)
  if why:
    raise ValueError(
        f"Group {g.name!r}: group redundancy moves each removed unit's weights onto the units "
        f"that rebuild it and its intercept into the next bias, which is not exact here ({why})."
        " Prune this group with distinctiveness(..., constants=False) or from weights.")
  groups = _common.resolve_groups(model_or_groups)
  h = g.size

  @jax.jit
  def core(params, mask, acts, tol, max_remove, weight):
    a = acts.reshape(-1, h).astype(jnp.float32)
    if weight is None:
      bad = ~jnp.all(jnp.isfinite(jnp.where(mask[None, :], a, 0.0))) | ~(tol >= 0)
      a = jnp.where(jnp.isfinite(a), a, 0.0)
      mean = jnp.mean(a, axis=0)
      x = a - mean
    else:  # weighted least squares: rows scaled by sqrt(w), a weight-0 row is exactly zero
      w = jnp.asarray(weight, jnp.float32)
      wv = jnp.broadcast_to(w.reshape((-1,) + (1,) * (acts.ndim - 2)),
                            acts.shape[:-1]).reshape(-1)
      real = wv > 0
      a = jnp.where(real[:, None], a, 0.0)
      bad = ~jnp.all(jnp.isfinite(jnp.where(mask[None, :], a, 0.0))) | ~(tol >= 0)
      total = jnp.sum(wv)
      bad |= ~jnp.all(jnp.isfinite(w) & (w >= 0)) | ~(jnp.sum(real) >= 2)
      a = jnp.where(jnp.isfinite(a), a, 0.0)
      mean = jnp.sum(wv[:, None] * a, axis=0) / jnp.where(total > 0, total, 1.0)
      x = jnp.where(real[:, None], (a - mean) * jnp.sqrt(jnp.where(real, wv, 0.0))[:, None],
                    0.0)
    cov = jnp.matmul(x.T, x, precision=jax.lax.Precision.HIGHEST)

    def rank(m):
      d = jnp.where(m, jnp.diagonal(cov), 1.0)
      sd = jnp.sqrt(jnp.maximum(d, 0.0))
      tiny = sd <= 1e-6 * jnp.maximum(jnp.max(jnp.where(m, sd, 0.0)), 1e-30)
      corr = cov / jnp.where(tiny, 1.0, sd)[:, None] / jnp.where(tiny, 1.0, sd)[None, :]
      live = m & ~tiny
      corr = jnp.where(live[:, None] & live[None, :], corr, jnp.eye(h))
      inv = jnp.linalg.inv(corr + _RIDGE * jnp.eye(h))
      r2 = 1.0 / jnp.diagonal(inv)
      score = jnp.where(tiny, -1.0, r2)  # constants first
      return jnp.argmin(jnp.where(m, score, jnp.inf))

    def cond(c):
      m, _, _, _, _, _, stop = c
      return ~stop & (jnp.sum(m) > 1) & (jnp.sum(mask & ~m) < max_remove)

    def body(c):
      m, transfer, consts, rep_j, rep_r, coef, stop = c
      n = jnp.sum(~m & mask, dtype=jnp.int32)
      j = rank(m)
      beta, rel = _fit(x, m, j)
      ok = rel < tol
      icpt = mean[j] - jnp.dot(beta, mean)
      # rows_new = (I + beta e_j^T) rows, a rank-one update (beta_j = 0, so row j stays);
      # constants are in terms of the original rows.
      new_transfer = transfer + beta[:, None] * transfer[j][None, :]
      new_consts = consts + icpt * transfer[j]
      m = jnp.where(ok, m.at[j].set(False), m)
      transfer = jnp.where(ok, new_transfer, transfer)
      consts = jnp.where(ok, new_consts, consts)
      pos = jnp.where(ok, n, h)
      rep_j = rep_j.at[pos].set(j.astype(jnp.int32), mode="drop")
      rep_r = rep_r.at[pos].set(rel, mode="drop")
      coef = coef.at[pos].set(jnp.concatenate([beta, icpt[None]]), mode="drop")
      return m, transfer, consts, rep_j, rep_r, coef, ~ok

    bad |= ~(max_remove >= 0)
    init = (mask, jnp.eye(h), jnp.zeros((h,)), jnp.full((h,), -1, jnp.int32),
            jnp.full((h,), jnp.nan), jnp.zeros((h, h + 1)), bad)
    m, transfer, consts, rep_j, rep_r, coef, _ = jax.lax.while_loop(cond, body, init)
    count = jnp.sum(mask & ~m, dtype=jnp.int32)
    params = units_lib.redistribute(params, g, transfer, consts)
    params = _common.zero_units(params, g, m)
    rep = RedundancyReport(rep_j, rep_r, coef[:, :h], coef[:, h], count, bad)
    return params, m, rep

  def prune(params, unit_masks, activations, tol=1e-3, max_remove=None, *, sample_weight=None):
    mask = _common.group_mask(unit_masks, g, groups, params)
    sample_weight = _common.check_activation_input(activations, g, sample_weight, mask)
    if _common.is_concrete(tol) and not float(tol) >= 0:
      raise ValueError(f"tol must be >= 0 (a relative residual), got {tol}.")
    if max_remove is None:
      max_remove = h
    elif _common.is_concrete(max_remove):
      v = np.asarray(max_remove)
      if v.ndim or not (np.issubdtype(v.dtype, np.integer) or float(v) == np.floor(float(v))) \
          or not float(v) >= 0:
        raise ValueError(f"max_remove must be a whole number >= 0 (of units), got "
                         f"{max_remove!r}.")
    max_remove = jnp.asarray(max_remove)
    if jnp.issubdtype(max_remove.dtype, jnp.floating):  # traced: not a whole number -> invalid
      whole = max_remove == jnp.floor(max_remove)   # NaN is not; inf is (no limit)
      max_remove = jnp.where(whole, jnp.clip(max_remove, -1, h), -1)
    params, m, rep = core(params, mask, jnp.asarray(activations), tol,
                          max_remove.astype(jnp.int32), sample_weight)
    return params, _common.with_mask(unit_masks, g.name, m), rep

  return prune
