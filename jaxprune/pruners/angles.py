"""Distinctiveness scoring: the angle between every pair of unit vectors (numerically stable:
exact duplicates give exactly 0 degrees) and the threshold checks."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import validate
from jaxprune.pruners import _common

PyTree = Any


# ----------------------------------------------------------------------------- angles


@jax.jit
def pairwise_angles(vectors: jax.Array) -> jax.Array:
  """Angles in degrees between the rows of ``vectors`` (units, dim); NaN for zero rows and
  rows holding inf or NaN.

  Stable everywhere: each row is first scaled by the power of two that brings its largest
  entry to [0.5, 1) (exact, so rows of 1e-20 or 1e30 have the angles of the same rows at unit
  scale, where a float32 sum of squares would underflow or overflow), rows are normalised, and
  the angle is ``2 * atan2(|u - v|, |u + v|)`` with the squared norms taken from the Gram
  matrix, so exact duplicates give exactly 0 and exact opposites exactly 180 on CPU (a GPU's
  matmul sums the Gram matrix's entries in other orders: an H200 gave 0.028 degrees for a
  duplicate).
  """
  v = jnp.asarray(vectors, jnp.float32)
  if v.ndim != 2:  # checked while tracing: free at run time
    raise ValueError(f"pairwise_angles takes a 2-D (units, dim) array, one row per unit; got "
                     f"shape {v.shape}. Stack the units' vectors as rows (for activations "
                     "(N, units), pass their transpose).")
  # no angle for a zero row (one of subnormal entries only reads as zero: XLA flushes them),
  # nor for one holding inf or NaN
  top = jnp.max(jnp.abs(v), axis=1)
  zero = ~(top >= jnp.finfo(jnp.float32).tiny) | jnp.isinf(top)
  ang = _angle_matrix(*_gram(v))
  return jnp.where(zero[:, None] | zero[None, :], jnp.nan, ang)


def weight_angles(params: PyTree, group, *, source: str = "outgoing") -> jax.Array:
  """(units, units) angles in degrees between the units' weight vectors (NaN for zero rows).

  The vectors the weight-based pruner (:func:`jaxprune.pruners.weight_distinctiveness`) compares:
  each unit's outgoing weights (``source='outgoing'``: every consumer slice concatenated) or
  incoming kernel weights (``'incoming'``: a dense column or a conv filter, biases excluded).

  Args:
    params: the params.
    group: a :class:`jaxprune.UnitGroup` (e.g. ``model.groups['dense_2']``).
    source: ``'outgoing'`` or ``'incoming'``.
  """
  if not hasattr(group, "consumers"):
    raise TypeError(f"group must be a jaxprune.UnitGroup, e.g. model.groups['hidden_0'], not "
                    f"{type(group).__name__} {group!r}.")
  if source == "outgoing":
    return pairwise_angles(_common.outgoing_vectors(params, group))
  if source == "incoming":
    return pairwise_angles(_common.incoming_vectors(params, group, acting_later=True))
  raise ValueError(f"source must be 'outgoing' or 'incoming', got {source!r}.")


def _angle_matrix(g, d):
  """Symmetric (units, units) angles from the Gram matrix g and its diagonal d: the upper
  triangle mirrored, so (i, j) and (j, i) are the same float32 value."""
  ang = _angle(*_pair_terms(g, d[:, None], d[None, :]))
  idx = jnp.arange(g.shape[0])
  return jnp.where(idx[:, None] < idx[None, :], ang, ang.T)


def _gram(v):
  """Gram matrix of the normalised rows of v, and its diagonal."""
  v, _ = _common.scale_rows(v)   # exact: tiny or huge rows normalise as at unit scale
  n = jnp.linalg.norm(v, axis=1)
  u = v / jnp.where(n > 0, n, 1.0)[:, None]
  g = jnp.matmul(u, u.T, precision=jax.lax.Precision.HIGHEST)
  return g, jnp.diagonal(g)


# Patterns per block of the order-fixed Gram matrix (see ``_blocked_gram``).
GRAM_BLOCK = 256


def _blocked_gram(v, block: int = GRAM_BLOCK):
  """:func:`_gram` with a summation order that does not depend on the number of patterns.

  The pattern axis is cut into blocks of ``block`` (the last one zero-filled); each block's sums
  (squared norms, then the Gram product of the normalised rows) have one fixed shape, and the
  blocks are added one after another in a ``lax.scan``. Appending patterns whose entries are 0
  (padding with sample weight 0) adds only blocks of exact zeros, so the result is bit-for-bit
  that of the unpadded vectors, whatever XLA's dot product does inside a block. The zero-filled
  blocks pass an optimisation barrier: otherwise XLA may see through the padding and sum only
  the ``p`` real patterns, in an order that depends on ``p`` (it did on a GPU).
  """
  h, p = v.shape
  v, _ = _common.scale_rows(v)   # its row maxima, so the scale, do not change with padding
  nb = -(-p // block)
  blocks = jnp.pad(v, ((0, 0), (0, nb * block - p))).reshape(h, nb, block).transpose(1, 0, 2)
  blocks = jax.lax.optimization_barrier(blocks)
  sq, _ = jax.lax.scan(lambda acc, c: (acc + jnp.sum(c * c, axis=1), None),
                       jnp.zeros((h,), v.dtype), blocks)
  n = jnp.sqrt(sq)
  u = blocks / jnp.where(n > 0, n, 1.0)[None, :, None]
  g, _ = jax.lax.scan(
      lambda acc, c: (acc + jnp.matmul(c, c.T, precision=jax.lax.Precision.HIGHEST), None),
      jnp.zeros((h, h), v.dtype), u)
  return g, jnp.diagonal(g)


def _pair_terms(g, di, dj):
  """|u_i - u_j|^2 and |u_i + u_j|^2 from the Gram entries g and the squared norms di, dj."""
  s = di + dj
  return jnp.maximum(s - 2.0 * g, 0.0), jnp.maximum(s + 2.0 * g, 0.0)


def _angle(diff2, sum2):
  """Degrees: 2 atan2(|u - v|, |u + v|)."""
  return jnp.degrees(2.0 * jnp.arctan2(jnp.sqrt(diff2), jnp.sqrt(sum2)))


def _thresholds_ok(sim, comp, use_similar, use_comp):
  """The rule flags may be Python or traced booleans."""
  use_similar, use_comp = jnp.asarray(use_similar, bool), jnp.asarray(use_comp, bool)
  ok = ~use_similar | ((sim >= 0) & (sim <= 180))
  ok &= ~use_comp | ((comp >= 0) & (comp <= 180))
  return ok & (~(use_similar & use_comp) | (sim < comp))


def check_thresholds(similar_deg, complementary_deg, *, similar: bool = True,
                     complementary: bool = True) -> None:
  """Raises ValueError for concrete thresholds outside [0, 180] or similar >= complementary."""
  for name, val, used in (("similar_deg", similar_deg, similar),
                          ("complementary_deg", complementary_deg, complementary)):
    if used:
      validate.check_real_scalar(
          name, val, "an angle in degrees in [0, 180] (a number)",
          "to sweep several values use jax.vmap over the pruner.", bool_ok=False)
    if used and _common.is_concrete(val):
      v = np.asarray(val)
      if v.ndim:
        raise ValueError(f"{name} must be a scalar, got shape {v.shape}; to sweep several "
                         "values use jax.vmap over the pruner.")
      if not np.isfinite(v) or v < 0 or v > 180:
        raise ValueError(f"{name} must be an angle in degrees in [0, 180], got {val}.")
  if similar and complementary and _common.is_concrete(similar_deg, complementary_deg):
    if float(similar_deg) >= float(complementary_deg):
      raise ValueError(f"similar_deg ({similar_deg}) must be smaller than complementary_deg "
                       f"({complementary_deg}); turn one rule off (similar=False or "
                       "complementary=False) to use only the other.")
