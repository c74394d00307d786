"""Importance-norm pruning (Luan): score units by the norm of their incoming kernel.

A unit's importance is computed from its producer kernel slice a (a dense column, or a conv
filter of in_ch x k x k weights; biases excluded):

* ``'rms'``: ``I = sqrt(mean(a^2))`` (the paper's ``sqrt(1/k^2 sum a^2)``);
* ``'l1'``: ``sum |a|``;  ``'l2'``: ``sqrt(sum a^2)``.

One-shot pruning removes the k least important kept units; the iterative procedure removes the
least important unit, re-evaluates a loss, and stops before the loss rises by more than
``max_rise`` above the starting loss (0.1 in the study; ``relative=True`` reads it as a fraction
of the starting loss). Ties go to the lower unit index. A removed
unit's slices are zeroed (no redistribution). At least one unit is always kept.

Example:
  >>> import jax, jaxprune
  >>> from jaxprune.pruners import importance_prune
  >>> model = jaxprune.LeNet(input_shape=(16, 16, 1))
  >>> params = model.init(jax.random.key(0))
  >>> prune = importance_prune(model, 'conv_0')
  >>> params, masks, report = prune(params, jaxprune.unit_masks_ones(model), 4)
  >>> int(masks['conv_0'].sum())
  12
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import masks as masks_lib
from jaxprune import validate
from jaxprune.pruners import _common

PyTree = Any
NORMS = ("rms", "l1", "l2")


def importance_scores(params: PyTree, model_or_groups, group: str | None = None,
                      norm: str = "rms"):
  """(units,) importance of each unit of ``group`` from its incoming kernel weights.

  A function of the params, so they come first: ``importance_scores(params, model, group)``.
  The mean of ``'rms'`` is over every weight of the unit's producer kernels, the zeroed rows of
  removed units included. Concrete NaN or infinite kernels raise ValueError, as in the pruners.
  """
  if masks_lib._is_target(params) and not masks_lib._is_target(model_or_groups):
    raise TypeError("importance_scores takes (params, target, group): the params come first "
                    "(unlike the pruner factories, which take (target, group) and then the "
                    "params). Call importance_scores(params, target, group).")
  if group is None:
    raise TypeError("importance_scores needs the group's name: importance_scores(params, "
                    "target, group).")
  g = _common.get_group(model_or_groups, group)
  _common.units_lib.check_group(params, g)
  _check_kernels(params, g)   # a NaN score would rank as no number does (the pruners refuse it)
  return _scores(params, g, norm)


def _scores(params, g, norm):
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
  v = _common.incoming_vectors(params, g)
  # float32 at least (bfloat16 norms would tie), float64 kept (a float32 cast ties units that
  # differ beyond its precision)
  v = v.astype(jnp.float64 if v.dtype == jnp.float64 else jnp.float32)
  if norm == "l1":
    return jnp.sum(jnp.abs(v), axis=1)
  # Each unit's weights scaled by a power of two (exact) that brings the largest to [0.5, 1):
  # squares of float32 weights of 1e19 and more no longer overflow to inf (nor tiny ones
  # underflow to 0), and wherever the plain sqrt(mean(a^2)) is finite and normal its bits are
  # the same (scaling by 4^-e commutes with every rounding, and sqrt(4^-e x) = 2^-e sqrt(x)).
  v, e = _common.scale_rows(v)
  sq = jnp.mean(v * v, axis=1) if norm == "rms" else jnp.sum(v * v, axis=1)
  return jnp.ldexp(jnp.sqrt(sq), e)


def _check_kernels(params, g) -> None:
  """Concrete incoming kernels must be finite: a NaN score would rank its unit last."""
  _common.check_finite_slices(params, g, [s for s in g.producers if s.kind == "kernel"])


def _order(scores, mask):
  """Kept units from least to most important (stable: ties by lower index)."""
  return jnp.argsort(jnp.where(mask, scores, jnp.inf), stable=True)


class ImportanceReport(NamedTuple):
  """One-shot result of :func:`importance_prune`.

  Attributes:
    scores: (units,) the units' importance.
    removed: () int32 units removed by this call.
    kept_last: () bool, True if ``k`` asked for every kept unit and the most important was kept.
    invalid: () bool, True if the input was bad under ``jit``/``vmap`` (a traced ``k`` that is
      not a whole number in [0, size]; NaN or infinite scores): nothing was changed. On
      concrete values bad input raises instead.
  """

  scores: jax.Array
  removed: jax.Array
  kept_last: jax.Array
  invalid: jax.Array


def importance_prune(model_or_groups, group: str, *, norm: str = "rms") -> Callable:
  """One-shot removal of the k least important kept units of ``group``.

  Returns:
    ``prune(params, unit_masks, k) -> (params, unit_masks, ImportanceReport)``; ``k`` is
    traced. If ``k`` would remove every kept unit, the most important one is kept and
    ``kept_last`` is True. Every group named in ``unit_masks`` is applied first (its removed
    units zeroed, in the params returned too), so the scores are those of the network the
    masks describe, as in :func:`iterative_importance`. A ``k`` that is not a whole number in
    [0, group size] or NaN kernels raise ValueError on concrete values; under ``jit``/``vmap``
    they change nothing and set ``report.invalid``.
  """
  g = _common.get_group(model_or_groups, group)
  groups = _common.resolve_groups(model_or_groups)
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")

  @jax.jit
  def core(params, mask, others, k):
    # Scores of the network the unit masks describe: every removed unit zeroed (a removed
    # unit of the layer before still has a row in this group's kernels).
    params = _common.masked_network(params, groups, g, mask, others)
    s = _scores(params, g, norm)
    n = jnp.sum(mask, dtype=jnp.int32)
    kf = jnp.asarray(k, jnp.float32)
    # (a unit the masks removed is not ranked: its NaN is no reason to refuse, as in
    # iterative_importance)
    valid = ((kf >= 0) & (kf <= g.size) & (kf == jnp.round(kf))
             & jnp.all(jnp.isfinite(jnp.where(mask, s, 0.0))))
    k = jnp.where(valid, kf, 0).astype(jnp.int32)
    kk = jnp.clip(k, 0, jnp.maximum(n - 1, 0))
    rank = jnp.zeros((g.size,), jnp.int32).at[_order(s, mask)].set(
        jnp.arange(g.size, dtype=jnp.int32))   # int64 under x64: a FutureWarning, later an error
    keep = mask & (rank >= kk)
    pruned = jax.tree.map(lambda new, old: jnp.where(valid, new, old),
                          _common.zero_units(params, g, keep), params)
    # (a unit the masks removed has zero weights in the network they describe: score 0)
    s = jnp.where(mask, s, jnp.zeros((), s.dtype))
    return (pruned, keep, ImportanceReport(s, n - jnp.sum(keep, dtype=jnp.int32),
                                           (k >= n) & (n > 0), ~valid))

  def prune(params, unit_masks, k):
    mask = _common.group_mask(unit_masks, g, groups, params)
    if _common.is_concrete(k) and not _whole_in_range(k, g.size):
      raise ValueError(f"k must be a whole number of units between 0 and the group size "
                       f"{g.size}, got {k!r}.")
    _check_kernels(params, g)
    params, keep, res = core(params, mask, _common.other_unit_masks(unit_masks, g, groups),
                             _common.setting(k))
    return params, _common.with_mask(unit_masks, g.name, keep), res

  return prune


def _whole_in_range(k, size: int) -> bool:
  """Whether a concrete ``k`` is a whole number of units in ``0 .. size`` (a real scalar:
  not a bool, NaN or infinity)."""
  v = np.asarray(k)
  if v.ndim or v.dtype == bool or not (np.issubdtype(v.dtype, np.integer)
                                       or np.issubdtype(v.dtype, np.floating)):
    return False
  f = float(v)
  return math.isfinite(f) and f == math.floor(f) and 0 <= f <= size


def _check_max_rise(max_rise) -> None:
  """Raises unless ``max_rise`` is one real number (concrete: >= 0, NaN refused)."""
  validate.check_real_scalar(
      "max_rise", max_rise, "a number >= 0 (the largest allowed rise of the loss)",
      "to run several thresholds, vmap over them: jax.vmap(run, in_axes=(None, None, "
      "0))(params, unit_masks, max_rises).")
  if _common.is_concrete(max_rise) and not float(max_rise) >= 0:
    raise ValueError(f"max_rise must be >= 0 (the largest allowed rise of the loss), got "
                     f"{max_rise}.")


class IterativeReport(NamedTuple):
  """Per step of iterative importance pruning; row 0 is the start, rows ``[:count]`` valid.

  Attributes:
    units_kept: (units,) int32.
    loss: (units,) loss of the pruned network (float32; float64 for a float64 loss).
    min_importance: (units,) smallest importance among kept units (float32; float64 for
      float64 kernels).
    removed: (units,) int32 the unit removed at step s (row s; -1 in row 0 and past count).
    count: () int32.
    stopped_loss: () the loss of the rejected removal that stopped the loop (NaN if
      it stopped because one unit was left).
    invalid: () bool, True if the input was bad under ``jit``/``vmap`` (NaN or infinite
      importance of a kept unit, a ``max_rise`` that is NaN or negative, a loss that is not
      finite for the unpruned params): nothing was removed and the params come back as given
      (``count`` 1). On concrete values bad input raises instead.
  """

  units_kept: jax.Array
  loss: jax.Array
  min_importance: jax.Array
  removed: jax.Array
  count: jax.Array
  stopped_loss: jax.Array
  invalid: jax.Array


def iterative_importance(model_or_groups, group: str, loss_fn: Callable[[PyTree], jax.Array],
                         *, norm: str = "rms", relative: bool = False) -> Callable:
  """Removes the least important unit while the loss stays within ``max_rise`` of the start.

  The whole loop is one ``lax.while_loop`` with ``loss_fn`` inside, so ``loss_fn`` must be a
  JAX function of the params (it receives them with removed units zeroed); close over the data.
  A removal is rejected, and the loop stops, unless ``loss - loss0 <= max_rise`` (or, with
  ``relative=True``, ``loss - loss0 <= max_rise * |loss0|``): a NaN loss stops it too.
  ``loss_fn`` must return a scalar; NaN kernel weights, or a NaN loss for the unpruned params,
  raise ValueError on concrete input.
  Importance depends on a unit's own incoming weights, so the order is fixed up front, except
  in a group that reads itself (a recurrent layer, ``h + tanh(h @ w1)``): there a removed unit's
  rows leave its kept units' kernels, and the scores are computed again after each removal.

  Returns:
    ``run(params, unit_masks, max_rise=0.1) -> (params, unit_masks, IterativeReport)``;
    ``max_rise`` is traced. Every group named in ``unit_masks`` is applied first (its removed
    units zeroed), so the losses are those of the network the masks describe.

  Example:
    >>> import jax, jaxprune
    >>> model = jaxprune.MLP(in_features=4, hidden=(8,), out_features=3)
    >>> params = model.init(jax.random.key(0))
    >>> x = jax.random.normal(jax.random.key(1), (32, 4))
    >>> y = model.apply(params, x)
    >>> loss = lambda p: jax.numpy.mean((model.apply(p, x) - y) ** 2) + 1.0
    >>> run = iterative_importance(model, 'hidden_0', loss)
    >>> params, masks, rep = run(params, jaxprune.unit_masks_ones(model), 0.1)
  """
  g = _common.get_group(model_or_groups, group)
  groups = _common.resolve_groups(model_or_groups)
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be a function loss_fn(params) -> scalar loss (close over the "
                    f"data), got {type(loss_fn).__name__}.")
  h = g.size

  @jax.jit
  def core(params, mask, others, max_rise):
    given = params
    # The losses and scores are those of the network the unit masks describe: every removed
    # unit zeroed (other groups' activations feed this group's, or this group's feed theirs).
    params = _common.masked_network(params, groups, g, mask, others)
    s = _scores(params, g, norm)
    order = _order(s, mask)
    # A group that reads itself: a removal zeroes rows of the kept units' kernels too.
    own = _common.own_slices(g)
    scores = ((lambda m: _scores(_common.zero_units(params, g, m, own), g, norm)) if own else
              (lambda m: s))
    def loss(m):
      value = jnp.asarray(loss_fn(_common.zero_units(params, g, m)))
      # float32, or float64 for a float64 loss (under x64): rises are judged at its precision
      value = value.astype(jnp.promote_types(value.dtype, jnp.float32))
      if value.shape != ():   # found when the loop is traced, before any work
        raise ValueError(f"loss_fn must return a scalar loss for the params; it returned shape "
                         f"{value.shape} (average over the patterns).")
      return value

    min_imp = lambda m: jnp.min(jnp.where(m, scores(m), jnp.inf))
    loss0 = loss(mask)
    # Bad traced input (concrete input raises in run): change nothing.
    valid = (jnp.all(jnp.isfinite(jnp.where(mask, s, 0.0))) & (jnp.asarray(max_rise) >= 0)
             & jnp.isfinite(loss0))
    n0 = jnp.sum(mask, dtype=jnp.int32)
    rows = (jnp.zeros((h,), jnp.int32).at[0].set(n0),
            jnp.full((h,), jnp.nan, loss0.dtype).at[0].set(loss0),
            jnp.full((h,), jnp.nan, s.dtype).at[0].set(min_imp(mask)),
            jnp.full((h,), -1, jnp.int32))

    limit = max_rise * jnp.abs(loss0) if relative else max_rise

    # (ties: the lower index, as the stable order)
    pick = ((lambda m, done: order[done]) if not own else
            (lambda m, done: jnp.argmin(jnp.where(m, scores(m), jnp.inf))))

    def propose(go, mask, done):
      # (no loss for a removal that will not be judged: the loop ends, or nothing is left)
      def run():
        u = pick(mask, done).astype(jnp.int32)
        return u, loss(mask.at[u].set(False))
      return jax.lax.cond(go, run, lambda: (jnp.zeros((), jnp.int32),
                                            jnp.full((), jnp.nan, loss0.dtype)))

    # Each step judges the removal the step before proposed, from its loss carried through the
    # loop, then proposes the next. The carried loss is one stored number: judged where it is
    # computed, XLA copies ``loss - loss0 <= limit`` into each of its consumers, and copies that
    # contract the loss's last product into the subtraction (a fused multiply-add) and copies
    # that do not can judge a rise of exactly ``max_rise`` apart (a mask kept and a report row
    # written for the same removal).
    def cond(c):
      return c[4]

    def body(c):
      mask, done, rows, _, _, u, l = c
      ok = l - loss0 <= limit  # a NaN loss is no "within": it stops the loop too
      new = mask.at[u].set(False)
      mask = jnp.where(ok, new, mask)
      pos = jnp.where(ok, done + 1, h)
      rows = (rows[0].at[pos].set(jnp.sum(new, dtype=jnp.int32), mode="drop"),
              rows[1].at[pos].set(l, mode="drop"),
              rows[2].at[pos].set(min_imp(new), mode="drop"),
              rows[3].at[pos].set(u, mode="drop"))
      done = done + ok.astype(jnp.int32)
      go = ok & (jnp.sum(mask) > 1)   # a rejected removal ends the loop
      stopped = jnp.where(ok, jnp.nan, l)
      u, l = propose(go, mask, done)
      return mask, done, rows, stopped, go, u, l

    zero = jnp.asarray(0, jnp.int32)
    go = valid & (n0 > 1)
    u0, l0 = propose(go, mask, zero)
    init = (mask, zero, rows, jnp.asarray(jnp.nan, loss0.dtype), go, u0, l0)
    mask, done, rows, stopped, _, _, _ = jax.lax.while_loop(cond, body, init)
    count = done + 1
    out = jax.tree.map(lambda new, old: jnp.where(valid, new, old),
                       _common.zero_units(params, g, mask), given)
    return (out, mask, IterativeReport(rows[0], rows[1], rows[2], rows[3], count, stopped,
                                       ~valid))

  def run(params, unit_masks, max_rise=0.1):
    mask = _common.group_mask(unit_masks, g, groups, params)
    _check_max_rise(max_rise)
    _check_kernels(params, g)
    params, mask, rep = core(params, mask, _common.other_unit_masks(unit_masks, g, groups),
                             _common.setting(max_rise))
    if _common.is_concrete(rep.loss) and not np.isfinite(float(rep.loss[0])):
      raise ValueError(f"loss_fn gives {float(rep.loss[0])} for the unpruned params, so no "
                       "removal can be judged; check the loss and the data it closes over.")
    return params, _common.with_mask(unit_masks, g.name, mask), rep

  return run
