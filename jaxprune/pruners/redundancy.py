"""Group redundancy: remove units that a linear combination of the other kept units rebuilds.

Beyond pairs: unit j is redundant when its activation vector (over the P patterns, unshifted)
is well reconstructed by a least-squares fit on the other kept units *plus a constant*:
``a_j ~ sum_k beta_k a_k + c``. Its outgoing weights are then redistributed by the coefficients
(row_k += beta_k row_j, a transfer matrix through :func:`jaxprune.units.redistribute`) and the
intercept c is folded into the next bias, so the network is unchanged when the dependency is
exact. Constant units are the special case with no coefficients.

Greedy: at each step the best-reconstructed kept unit is found. An SVD of the kept columns
runs first. Where the kept columns have full rank with nothing below the SVD's cut (below),
that is the unit of the smallest exact least-squares residual (all of them from one QR of the
columns scaled to unit norm). Otherwise (fewer patterns than units, exact dependencies) the
units that the null space of the kept columns rebuilds (a share of it above 1e-3, and a fit
from it of relative residual at most 1e-4) go first, by that fit's residual (below 1e-5, which
is rounding, by the residual of a ridge fit); then the others, by the residual of their
ridge-regularised fit (on the correlation matrix, ``delta = 1e-5``); candidates whose
residuals differ only by float rounding, such as the copies of an exact duplicate, are
ordered by that rounding. (Ranking by the ridge's regularised minimum instead, which adds
``delta * (1 + |coefficients|^2)``, tried a unit rebuilt to 5e-3 before an exact duplicate,
and stopped there at a tol of 1e-3.) Then
its exact least-squares fit (minimum norm, on the centred activations, singular values below
``eps * max(N, units)`` of the largest left out as ``jnp.linalg.lstsq`` does, N the patterns of
weight > 0 under ``sample_weight``) is computed, and it
is removed if its relative residual ``|a_j - fit| / |a_j - mean(a_j)|`` (the square root of the
unexplained variance fraction) is below ``tol``. A unit is constant, with residual 0 and only
its mean folded, when its activations are one value on every pattern, or the norm of its
centred activations is at most ``1e-6`` times the largest among the kept units' (constants are
ranked first). Then the next; it stops when the best
candidate fails or one unit is left. The activations are those of the starting network;
removal does not change the other units' activations.

How the fit is computed: by an SVD of the other kept units' activations, which also gives the
null space of those columns. When there are fewer patterns than units, most removals are exact
(the unit is a combination of the others on these patterns); such a unit's minimum-norm fit is
read off that null space (the shortest null vector whose entry for the unit is 1), and the
null space of the units that remain is one Householder reflection away, so the fit costs
O(units^2) instead of an SVD. It is taken only when it is the SVD's fit too: its residual
is at most 1e-4 (and ``tol``); deleting the unit's column provably keeps every singular value
the fit uses above the SVD's cut (each deletion leaves them at least ``sqrt(P_jj)`` times the
smallest before, ``P_jj`` the unit's share of the null space); and the directions the basis
treats as null stay below that cut (their largest singular value, carried with the basis, is
below the cut's lower bound and 10x below the range's smallest), so the SVD would split the
columns into fit and null space the same way. Once an SVD has kept every column it was given
(full column rank, nothing cut: ``_Basis.full``), each later fit is on a subset of those
columns; deleting columns never lowers the smallest singular value (interlacing, with at
least as many patterns as columns) and only lowers the cut, so that fit is the unique least
squares solution, and a QR gives it (:func:`_qr_fit`, about a fifth of an SVD's time).
Otherwise the SVD runs, on
the kept columns only, gathered into the narrowest of 4 static widths (h, 3h/4, h/2, h/4) that
holds them, so it gets cheaper as units go (in groups large enough for that to pay, where
``4 N h^3`` exceeds 5e10 for N patterns: H=500 on 398 patterns, not H=200; a smaller group's
program keeps one width and compiles in about half the time). All of these agree to float
rounding (tested against a full-width SVD at every removal; ``benchmarks/redundancy.py``
times them). Under
``vmap`` every removal is a full-width SVD: a batched choice of branch would run every branch
for every member, so a Python loop over settings is the faster sweep here.

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
from jaxprune import validate
from jaxprune.pruners import _common

_RIDGE = 1e-5
_NULL_MIN = 1e-3   # P_jj below this: fit by SVD (the null direction is too short to trust)
_NULL_RESIDUAL = 1e-4  # a null-basis fit must rebuild the unit to this relative residual
_GAP = 0.1  # the null basis's largest singular value must be this far below the range's
_QR_FITS = 1.0  # 1: fits of columns an SVD found of full rank by a QR (:func:`_qr_fit`); 0: SVD
_EXACT_SHARE = 1e-3  # a unit with this share of the null basis or more ranks as exact
_NULL_TIE = 1e-5  # null-fit residuals below this are rounding: ranked among them by the ridge
_WIDTHS = 4  # static widths the kept columns are gathered into for an SVD: h, 3h/4, ...
# ... when the group is large enough for that to pay: 4 N h^3 (N patterns, h units: the
# operations of full-width SVDs at every removal) above this. Each width is a copy of the fits
# in the program; below it one width (all h columns, the removed ones zero) compiles in about
# half the time (2-3 s less at XLA's defaults) for a run time that the narrower SVDs would cut
# by a few hundredths of a second (H=200 on 398 patterns: 0.43 against 0.46 s with an SVD at
# every removal; H=500: 7.3 against 11.3 s, where the widths stay; benchmarks/redundancy.py).
_GATHER_MIN_WORK = 5e10


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


class _Basis(NamedTuple):
  """What an SVD of the kept units' columns leaves for the exact fits of the next steps:
  ``basis`` an orthonormal basis of the null space (h, h; zero columns unused), the singular
  vectors it cut included; ``floor`` a lower bound on the smallest singular value kept;
  ``cut`` the SVD's cut (upper bound on any later one: deleting columns lowers every singular
  value); ``top_cut`` the largest singular value cut (0 if none); ``top_vec`` the top right
  singular vector, whose image bounds the largest singular value of later subsets from below;
  ``full`` True when that SVD kept every column (no singular value cut: full column rank), so
  every later fit, on a subset of those columns, is a unique least-squares solution
  (:func:`_qr_fit`)."""

  basis: jax.Array
  floor: jax.Array
  cut: jax.Array
  top_cut: jax.Array
  top_vec: jax.Array
  full: jax.Array


def _gathered(keep, fn, patterns: int):
  """``fn(idx, valid)`` on the units of ``keep`` gathered, in index order, into the narrowest
  of ``_WIDTHS`` static widths (h, 3h/4, h/2, h/4) that holds them: ``idx`` (w,) unit indices,
  the kept ones first; ``valid`` marks the positions that hold a kept unit. The linear algebra
  per removal then costs what the units kept need, not what the group's size needs. For a
  small group (``4 * patterns * h**3`` at most :data:`_GATHER_MIN_WORK`) one width, h."""
  h = keep.shape[0]
  count = jnp.sum(keep)
  order = jnp.argsort(~keep, stable=True)
  levels = _WIDTHS if 4.0 * patterns * h ** 3 > _GATHER_MIN_WORK else 1
  widths = sorted({max(1, -(-h * (levels - b) // levels)) for b in range(levels)})
  branches = [lambda w=w: fn(order[:w], jnp.arange(w) < count) for w in widths]
  return jax.lax.switch(jnp.searchsorted(jnp.asarray(widths), count), branches)


def _svd_fit(x, others, y, rcond):
  """Minimum-norm least squares of y on the ``others`` columns of x (SVD, singular values
  below ``rcond`` times the largest cut, as jnp.linalg.lstsq), on those columns gathered
  (:func:`_gathered`). Also returns what the null-basis fits of the next steps need (a
  :class:`_Basis`, in unit coordinates; a gathered position beyond the kept units holds a zero
  column, so its unit's coordinate axis is in the null space, and the fits never use it)."""
  h = x.shape[1]

  def fit(idx, valid):
    w = idx.shape[0]
    beta, st = _svd_fit_dense(jnp.where(valid[None, :], x[:, idx], 0.0), y, rcond,
                              jnp.sum(valid))
    return (jnp.zeros((h,), beta.dtype).at[idx].set(jnp.where(valid, beta, 0.0)),
            st._replace(basis=jnp.zeros((h, h), st.basis.dtype).at[idx, :w].set(st.basis),
                        top_vec=jnp.zeros((h,), st.top_vec.dtype).at[idx].set(st.top_vec)))

  return _gathered(others, fit, x.shape[0])


def _svd_fit_dense(xo, y, rcond, count):
  """_svd_fit on the columns given (all of them; ``count`` of them are real, the others zero
  columns)."""
  n, h = xo.shape
  hi = jax.lax.Precision.HIGHEST
  u, s, vt = jnp.linalg.svd(xo, full_matrices=n < h)  # vt (h, h) either way
  k = s.shape[0]
  keep = (s > 0) & (s >= rcond * s[0])
  s_inv = jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)
  beta = jnp.matmul(vt[:k].T, s_inv * jnp.matmul(u[:, :k].T, y, precision=hi), precision=hi)
  null = jnp.concatenate([~keep, jnp.ones((h - k,), bool)])
  floor = jnp.min(jnp.where(keep, s, jnp.inf))
  return beta, _Basis(vt.T * null[None, :], jnp.where(jnp.isfinite(floor), floor, 0.0),
                      rcond * s[0], jnp.max(jnp.where(keep, 0.0, s)), vt[0],
                      jnp.sum(keep) == count)


def _leading_r(x, idx, valid, with_q=True):
  """A Householder QR of x's columns ``idx`` (the ``valid`` ones first, then zero columns):
  ``(q, rk)`` with q (N, k) (None without ``with_q``) and rk the (k, k) leading block of R,
  k = min(N, width), its rows and columns past the valid ones replaced by the identity. The
  zero columns come after the valid ones, so they do not touch R's block of the valid ones;
  the identity keeps the triangular solves finite and leaves 0 at those positions."""
  xg = jnp.where(valid[None, :], x[:, idx], 0.0)
  q, r = jnp.linalg.qr(xg) if with_q else (None, jnp.linalg.qr(xg, mode="r"))
  k = min(x.shape[0], idx.shape[0])
  r = r[:k, :k]
  vk = valid[:k]                         # the real columns are the first ones (k >= count)
  return q, jnp.where(vk[:, None] & vk[None, :], r, jnp.eye(k, dtype=r.dtype))


def _qr_fit(x, others, y):
  """The least-squares fit of y on the ``others`` columns of x when they have full column rank
  with nothing below the SVD's cut (``_Basis.full``), so that the fit is unique and equals
  the SVD's (to float rounding): a Householder QR of those columns gathered, kept units first,
  as for the SVD (:func:`_gathered`; the zero columns after them do not touch the leading
  block of R), then one triangular solve. About a fifth of an SVD's time (398 x 375: 3.9
  against 21 ms here)."""
  h = x.shape[1]
  hi = jax.lax.Precision.HIGHEST

  def fit(idx, valid):
    q, rk = _leading_r(x, idx, valid)
    k = rk.shape[0]
    rhs = jnp.where(valid[:k], jnp.matmul(q.T, y, precision=hi), 0.0)
    beta = jax.scipy.linalg.solve_triangular(rk, rhs, lower=False)
    beta = jnp.concatenate([beta, jnp.zeros((idx.shape[0] - k,), beta.dtype)])
    return jnp.zeros((h,), beta.dtype).at[idx].set(jnp.where(valid, beta, 0.0))

  return _gathered(others, fit, x.shape[0])


def _null_fit(basis, others, j):
  """The minimum-norm exact fit of unit j from the null space of the kept units' columns
  (orthonormal ``basis``, zero columns unused): v = P e_j / P_jj with P = basis basis^T is the
  shortest null vector with v_j = 1, so x_j = -X_o v_o; beta = -v_o. Returns beta, P_jj, and
  the basis of the null space without unit j (one Householder reflection in basis
  coordinates maps row j onto one basis vector, which is dropped)."""
  hi = jax.lax.Precision.HIGHEST
  b = basis[j]
  p = jnp.dot(b, b, precision=hi)
  u = jnp.matmul(basis, b, precision=hi)
  beta = jnp.where(others, -u / jnp.where(p > 0, p, 1.0), 0.0)
  c = jnp.argmax(jnp.abs(b))
  w = b.at[c].add(jnp.where(b[c] >= 0, 1.0, -1.0) * jnp.sqrt(p))
  ww = jnp.dot(w, w, precision=hi)
  reflected = basis - (2.0 / jnp.where(ww > 0, ww, 1.0)) * (
      jnp.matmul(basis, w, precision=hi)[:, None] * w[None, :])
  return beta, p, reflected.at[:, c].set(0.0)


def _exact_residuals(x, live, sq):
  """(h,) each ``live`` unit's squared relative residual of least squares on the other live
  units, ``1 / (Z^T Z)^-1_jj`` with Z the columns scaled to unit norm (``sq``: their squared
  norms; unscaled, a column 1e-5 the size of the others made the rows of R^-1 of the others
  too small for float32 and misranked them), from a QR of the live columns gathered as for
  the fits (rows of R^-1); inf elsewhere. Only for columns of full rank with nothing below
  the SVD's cut (``_Basis.full``), where these are the fits' own residuals: ranking by them
  needs no ridge (a ridge biases units whose fits need larger coefficients)."""
  h = x.shape[1]
  z = x / jnp.sqrt(jnp.where(live & (sq > 0), sq, 1.0))[None, :]

  def res(idx, valid):
    _, rk = _leading_r(z, idx, valid, with_q=False)
    k = rk.shape[0]
    rinv = jax.scipy.linalg.solve_triangular(rk, jnp.eye(k, dtype=rk.dtype), lower=False)
    d = jnp.concatenate([jnp.sum(rinv * rinv, axis=1), jnp.ones((idx.shape[0] - k,), rk.dtype)])
    return jnp.full((h,), jnp.inf, d.dtype).at[idx].set(jnp.where(valid, 1.0 / d, jnp.inf))

  return _gathered(live, res, x.shape[0])


def _null_images(x, basis, m):
  """(h,) ``|X P e_u|`` for every unit u, P = basis basis^T, from the basis columns that touch
  the kept units ``m`` (the null directions of their columns; the axes of removed units, which
  an SVD of gathered columns carries, add nothing to a kept unit's) gathered into one of the
  static widths (as the fits gather columns): two (N, h) x (h, width) products instead of
  (h, h) ones (H=500 on 398 patterns: the benchmark 4.02 -> 2.71 s)."""
  touches = jnp.sum(jnp.where(m[:, None], basis * basis, 0.0), axis=0) > 1e-12
  hi = jax.lax.Precision.HIGHEST

  def images(idx, valid):
    bg = jnp.where(valid[None, :], basis[:, idx], 0.0)                    # (h, w)
    xp = jnp.matmul(jnp.matmul(x, bg, precision=hi), bg.T, precision=hi)  # (N, h)
    return jnp.linalg.norm(xp, axis=0)

  return _gathered(touches, images, x.shape[0])


def _fit(x, m, st, j, tol, rcond, null):
  """beta and relative residual of unit j on the other kept units, and the :class:`_Basis`
  of the other kept units' columns for the next step.

  From the carried null basis when j is rebuilt exactly from it *and* that is the SVD's fit
  too, i.e. an SVD of the other columns would keep exactly the directions outside the basis:
  (1) deleting column j (P_jj = p) leaves every singular value outside the basis at least
  sqrt(p) times the smallest before, so when sqrt(p) * floor >= cut none of them is cut
  (fits through directions the SVD cuts rebuild the training patterns but generalise worse);
  (2) every direction in the basis has a singular value at most ``top_cut``, and the SVD's cut
  now is at least rcond * |X_o t| / |t| (t the carried top singular vector restricted to the
  other units), so when ``top_cut`` is below that none of them is kept. Else, when an SVD has
  already found the kept columns of full rank (``st.full``), from a QR (:func:`_qr_fit`);
  else from an SVD of the other kept columns, which renews the basis. ``null``: (_NULL_MIN,
  _NULL_RESIDUAL, _QR_FITS), passed as values (the tests change them without compiling
  another program)."""
  hi = jax.lax.Precision.HIGHEST
  others = m.at[j].set(False)
  y = x[:, j]
  beta_n, p, basis_n = _null_fit(st.basis, others, j)
  ny = jnp.linalg.norm(y)
  rel_n = jnp.linalg.norm(y - jnp.matmul(x, beta_n, precision=hi)) / jnp.where(ny > 0, ny, 1.0)
  floor_n = jnp.sqrt(jnp.maximum(p, 0.0)) * st.floor
  t = jnp.where(others, st.top_vec, 0.0)
  nt = jnp.linalg.norm(t)
  top_n = jnp.linalg.norm(jnp.matmul(x, t, precision=hi)) / jnp.where(nt > 0, nt, 1.0)
  exact = ((p > null[0]) & (floor_n >= st.cut) & (st.top_cut < rcond * top_n)
           & (st.top_cut <= _GAP * floor_n)
           & (rel_n <= jnp.minimum(null[1], tol)))
  # A subset of columns that had full rank with nothing cut keeps both: deleting a column
  # leaves every singular value at least the smallest before (interlacing, patterns >= units),
  # and the cut (rcond times the largest) only falls. So its fit is unique: a QR gives it.
  branch = jnp.where(exact, 0, jnp.where(st.full & (null[2] > 0), 1, 2))
  # After an exact removal the other columns have full rank when no null direction of the
  # basis touches them any more (their rows of it sum to the number of such directions; the
  # gathered SVD's padding axes lie on removed units): every singular value is then one the
  # SVD kept, at least floor_n >= the cut (the exact fit's condition), as after an SVD that
  # keeps every column.
  full_n = jnp.sum(jnp.where(others[:, None], basis_n, 0.0) ** 2) < 0.5
  beta, st = jax.lax.switch(branch, [
      lambda: (beta_n, st._replace(basis=basis_n, floor=floor_n, full=full_n)),
      lambda: (_qr_fit(x, others, y), st),
      lambda: _svd_fit(x, others, y, rcond)])
  return _residual(x, m, j, beta) + (st,)


def _fit_plain(x, m, j, rcond):
  """:func:`_fit` by an SVD of all the columns, the other kept ones in place (for vmap)."""
  others = m.at[j].set(False)
  beta, st = _svd_fit_dense(jnp.where(others[None, :], x, 0.0), x[:, j], rcond,
                            jnp.sum(others))
  return _residual(x, m, j, jnp.where(others, beta, 0.0)) + (st,)


def _residual(x, m, j, beta):
  """(beta, relative residual) of unit j's fit; a constant unit (centred norm at most 1e-6 of
  the largest kept unit's) has residual 0 and no coefficients."""
  y = x[:, j]
  ny = jnp.linalg.norm(y)
  res = y - jnp.matmul(x, beta, precision=jax.lax.Precision.HIGHEST)
  scale = jnp.max(jnp.linalg.norm(jnp.where(m[None, :], x, 0.0), axis=0))
  const = ny <= 1e-6 * jnp.maximum(scale, 1e-30)
  rel = jnp.where(const, 0.0, jnp.linalg.norm(res) / jnp.where(const, 1.0, ny))
  return jnp.where(const, 0.0, beta), rel


def _exact_constants(a, mean, real):
  """``(mean, flat)``: the units whose activations are one value on every pattern that counts
  (``real``; None: all) are ``flat``, and their mean is that value. A float32 mean of equal
  values can be an ulp off, which left such a unit a centred norm of about 1e-6 of its value:
  above the constant test's 1e-6 of the largest unit's when the others vary little, so an
  exactly constant unit was neither constant nor rebuilt, and stopped the removals."""
  if real is None:
    lo, hi = jnp.min(a, axis=0), jnp.max(a, axis=0)
  else:
    lo = jnp.min(jnp.where(real[:, None], a, jnp.inf), axis=0)
    hi = jnp.max(jnp.where(real[:, None], a, -jnp.inf), axis=0)
  flat = lo == hi
  return jnp.where(flat, hi, mean), flat


def _host_count(max_remove, h: int):
  """A concrete, already checked ``max_remove`` (a whole number >= 0, or inf) as the int32
  NumPy scalar the traced path computes (``clip(max_remove, -1, h)``): at most ``h``, so an
  integer beyond int32 (``np.int64(2**40)``) means no limit, as inf does (it wrapped to 0 on
  the device and removed nothing)."""
  v = np.asarray(max_remove)
  if np.issubdtype(v.dtype, np.integer) or v.dtype == bool:
    return np.asarray(min(int(v), h), np.int32)
  return np.asarray(min(float(v), h), np.int32)    # whole and >= 0; inf -> h


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
    fits of the unpadded data (to float rounding; the SVD's cut counts only the patterns of
    weight > 0). The weights' scale does not matter (they are divided by the largest; traced
    weights below float32's smallest normal number, 1.2e-38, read as 0). None: every pattern
    counts once.
  """
  g = _common.get_group(model_or_groups, group)
  _common.check_no_products(g, "group_redundancy")
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
  def core(params, mask, acts, tol, max_remove, weight, null):
    a = acts.reshape(-1, h).astype(jnp.float32)
    if weight is None:
      bad = ~jnp.all(jnp.isfinite(jnp.where(mask[None, :], a, 0.0))) | ~(tol >= 0)
      a = jnp.where(jnp.isfinite(a), a, 0.0)
      mean, flat = _exact_constants(a, jnp.mean(a, axis=0), None)
      x = jnp.where(flat[None, :], 0.0, a - mean)
    else:  # weighted least squares: rows scaled by sqrt(w), a weight-0 row is exactly zero
      w = jnp.asarray(weight, jnp.float32)
      # Weighted least squares does not depend on the weights' scale; float32 does (weights
      # near 1e-38 or 1e37 underflowed or overflowed the norms: every unit read as constant).
      top = jnp.max(w)
      w = w / jnp.where(top > 0, top, 1.0)
      wv = jnp.broadcast_to(w.reshape((-1,) + (1,) * (acts.ndim - 2)),
                            acts.shape[:-1]).reshape(-1)
      real = wv > 0
      a = jnp.where(real[:, None], a, 0.0)
      bad = ~jnp.all(jnp.isfinite(jnp.where(mask[None, :], a, 0.0))) | ~(tol >= 0)
      total = jnp.sum(wv)
      bad |= ~jnp.all(jnp.isfinite(w) & (w >= 0)) | ~(jnp.sum(real) >= 2)
      a = jnp.where(jnp.isfinite(a), a, 0.0)
      mean, flat = _exact_constants(
          a, jnp.sum(wv[:, None] * a, axis=0) / jnp.where(total > 0, total, 1.0), real)
      x = jnp.where(real[:, None] & ~flat[None, :],
                    (a - mean) * jnp.sqrt(jnp.where(real, wv, 0.0))[:, None], 0.0)
    hi = jax.lax.Precision.HIGHEST
    cov = jnp.matmul(x.T, x, precision=hi)

    def rank(m, st):  # all h units in place (gathered, the LU rounds ties otherwise)
      d = jnp.where(m, jnp.diagonal(cov), 1.0)
      sd = jnp.sqrt(jnp.maximum(d, 0.0))
      tiny = sd <= 1e-6 * jnp.maximum(jnp.max(jnp.where(m, sd, 0.0)), 1e-30)
      live = m & ~tiny

      def ridge():
        corr = cov / jnp.where(tiny, 1.0, sd)[:, None] / jnp.where(tiny, 1.0, sd)[None, :]
        eye = jnp.eye(h, dtype=x.dtype)   # float32 under x64 too: the same ranking
        corr = jnp.where(live[:, None] & live[None, :], corr, eye)
        inv = jnp.linalg.inv(corr + _RIDGE * eye)
        # Column j of v: 1 at j, minus unit j's ridge coefficients on the others, so column
        # j of z @ v is the residual of unit j's ridge fit (standardised). Its squared norm
        # ranks, not the regularised minimum 1 / inv_jj, which adds ridge * (1 +
        # |coefficients|^2): with a ridge of 1e-4 that put a unit rebuilt to 5e-3 ahead of an
        # exact duplicate (2e-4 against 2.2e-5 + 1e-4), whose fit then failed a tol of 1e-3
        # and stopped the removals.
        v = inv / jnp.diagonal(inv)[None, :]
        z = jnp.where(live[None, :], x / jnp.where(tiny, 1.0, sd)[None, :], 0.0)
        r = jnp.matmul(z, v, precision=hi)
        score = jnp.sum(r * r, axis=0)
        # Units rebuilt from the null space of the kept columns go first, ranked by the
        # residual of that fit, |X P e_u| / (p_u |x_u|) (P = basis basis^T, p_u its share of
        # unit u; the basis holds the directions the SVD cut too, so a unit of a cut, nonzero
        # direction is rebuilt only to that): the ridge residual of a fit that needs large
        # coefficients can exceed a noisy unit's (1e-4 to 1e-3), which then failed tol with
        # the exact one kept. Exact: p_u above _EXACT_SHARE and that residual at most
        # _NULL_RESIDUAL.
        p = jnp.sum(st.basis * st.basis, axis=1)
        null_res = _null_images(x, st.basis, m) / jnp.where(p > 0, p, 1.0) / sd
        exact = live & (p > _EXACT_SHARE) & (null_res <= _NULL_RESIDUAL)
        # Below _NULL_TIE those residuals are float rounding, which differs with the way the
        # basis was reached (reflections here, a fresh SVD under vmap): such units go first,
        # ordered by the ridge residual, which depends on the activations and the mask alone.
        tie = exact & (null_res < _NULL_TIE)
        return jnp.where(jnp.any(tie), jnp.where(tie, score, jnp.inf), jnp.where(
            jnp.any(exact), jnp.where(exact, null_res * null_res, jnp.inf), score))

      # Columns an SVD found of full rank with nothing cut (``full``): each unit's exact
      # residual instead, from a QR of the kept columns (no ridge: _exact_residuals).
      score = jax.lax.cond(st.full, lambda: _exact_residuals(x, live, jnp.diagonal(cov)),
                           ridge)
      score = jnp.where(tiny, -1.0, score)  # constants first
      return jnp.argmin(jnp.where(m, score, jnp.inf))

    # As jnp.linalg.lstsq: eps * max(patterns, units), the patterns those that exist (weight
    # > 0), so zero-weight padding rows do not move the cut.
    eps = float(jnp.finfo(jnp.float32).eps)
    if weight is None:
      rcond = jnp.float32(eps * max(x.shape))
    else:
      rcond = eps * jnp.maximum(jnp.sum(real), h).astype(jnp.float32)

    fit = jax.custom_batching.custom_vmap(_fit)

    @fit.def_vmap
    def _(axis_size, in_batched, x, m, st, j, tol, rcond, null):
      """Under vmap every removal is an SVD of all the columns (the kept ones in place): a
      batched cond or switch would run every branch for every member, slower than this."""
      del st, tol, null
      x, m, j, rcond = (a if b else jnp.broadcast_to(a, (axis_size,) + a.shape)
                        for a, b in zip((x, m, j, rcond), (in_batched[0], in_batched[1],
                                                           in_batched[3], in_batched[5])))
      out = jax.vmap(_fit_plain)(x, m, j, rcond)
      return out, jax.tree.map(lambda _: True, out)

    def cond(c):
      m, _, _, _, _, _, _, stop = c
      return ~stop & (jnp.sum(m) > 1) & (jnp.sum(mask & ~m) < max_remove)

    def body(c):
      m, st, transfer, consts, rep_j, rep_r, coef, stop = c
      n = jnp.sum(~m & mask, dtype=jnp.int32)
      j = rank(m, st)
      beta, rel, st = fit(x, m, st, j, tol, rcond, null)
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
      return m, st, transfer, consts, rep_j, rep_r, coef, ~ok

    bad |= ~(max_remove >= 0)
    # One SVD of the kept columns first: the first ranking knows which units are exact
    # combinations of the others, or that the columns have full rank (it ranked by the ridge
    # until a fit's SVD had run), and the first fit may come from its null basis or a QR.
    st = _svd_fit_dense(jnp.where(mask[None, :], x, 0.0), x[:, 0], rcond, jnp.sum(mask))[1]
    init = (mask, st, jnp.eye(h, dtype=x.dtype), jnp.zeros((h,), x.dtype),
            jnp.full((h,), -1, jnp.int32), jnp.full((h,), jnp.nan, x.dtype),
            jnp.zeros((h, h + 1), x.dtype), bad)
    m, _, transfer, consts, rep_j, rep_r, coef, _ = jax.lax.while_loop(cond, body, init)
    count = jnp.sum(mask & ~m, dtype=jnp.int32)
    params = units_lib.redistribute(params, g, transfer, consts)
    params = _common.zero_units(params, g, m)
    rep = RedundancyReport(rep_j, rep_r, coef[:, :h], coef[:, h], count, bad)
    return params, m, rep

  def prune(params, unit_masks, activations, tol=1e-3, max_remove=None, *, sample_weight=None):
    mask = _common.group_mask(unit_masks, g, groups, params)
    _common.check_floating_writes(
        params, g, _common.consumer_write_paths(g), "redistributing a removed unit's outgoing "
        "weights by least-squares coefficients", "prune this group with a rule that only "
        "zeroes units (importance_prune, magnitude_prune, distinctiveness with similar=False "
        "and constants=False)")
    raw_weight = sample_weight
    sample_weight = _common.check_activation_input(activations, g, sample_weight, mask)
    if sample_weight is not None and _common.is_concrete(raw_weight):
      # Scaled to a largest weight of 1 in float64 (the results do not depend on the scale):
      # weights that are subnormal in float32 (below 1.2e-38) read as 0 on the device.
      v = np.asarray(raw_weight, np.float64)
      sample_weight = np.asarray(v / v.max(), np.float32)   # host-side, as jnp.asarray does
    validate.check_real_scalar(
        "tol", tol, "a number >= 0 (the largest relative residual of a removal)",
        "to run several tolerances, loop over them (under vmap every removal is a full-width "
        "SVD: see the module's docstring).")
    if _common.is_concrete(tol) and not float(tol) >= 0:
      raise ValueError(f"tol must be >= 0 (a relative residual), got {tol}.")
    tol = _common.setting(tol)
    if max_remove is None:
      max_remove = h
    elif _common.is_concrete(max_remove):
      v = np.asarray(max_remove)
      if v.ndim or not (np.issubdtype(v.dtype, np.integer) or float(v) == np.floor(float(v))) \
          or not float(v) >= 0:
        raise ValueError(f"max_remove must be a whole number >= 0 (of units), got "
                         f"{max_remove!r}.")
    if _common.is_concrete(max_remove):
      max_remove = _host_count(max_remove, h)   # checked above: no conversion programs
    else:
      max_remove = jnp.asarray(max_remove)
      if jnp.issubdtype(max_remove.dtype, jnp.floating):  # traced: not whole -> invalid
        whole = max_remove == jnp.floor(max_remove)   # NaN is not; inf is (no limit)
        max_remove = jnp.where(whole, jnp.clip(max_remove, -1, h), -1)
      max_remove = max_remove.astype(jnp.int32)
    # A NumPy array goes to the jitted core as it is (the same canonical dtype that
    # jnp.asarray gives, without compiling a staging program).
    if not isinstance(activations, np.ndarray):
      activations = jnp.asarray(activations)
    params, m, rep = core(params, mask, activations, tol, max_remove, sample_weight,
                          np.asarray([_NULL_MIN, _NULL_RESIDUAL, _QR_FITS], np.float32))
    return params, _common.with_mask(unit_masks, g.name, m), rep

  return prune
