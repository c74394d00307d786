"""Progressive distinctiveness: the single most similar pair per step, recording the loss."""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.pruners import _common
from jaxprune.pruners.angles import pairwise_angles
from jaxprune import validate
from jaxprune.pruners.distinctiveness_pruning import _apply_moves, _check_bias_folds, _check_tol
from jaxprune.pruners.distinctiveness_pruning import _check_integer_writes
from jaxprune.pruners.distinctiveness_pruning import _weighted_vectors, position_means

PyTree = Any


# ----------------------------------------------------------------------------- progressive


class ProgressiveReport(NamedTuple):
  """The trajectory of progressive distinctiveness; row 0 is the starting network.

  Rows ``[:count]`` are valid; row s is the network after s steps. Rows from ``count`` on
  repeat the last network (``min_angle`` NaN).

  Attributes:
    units_kept: (units,) int32 kept units.
    loss: (units,) float32 ``loss_fn(params)`` of the pruned network.
    min_angle: (units,) float32 smallest angle between kept units (NaN with fewer than two).
    unit_masks: (units, units) bool, the group's unit mask at each step.
    count: () int32 number of valid rows: steps that removed a unit, plus row 0. The trajectory
      ends at one unit, or earlier when a step can remove nothing (the units left have no
      angle between them and none is constant: all-zero activation vectors, such as dead relu
      units with ``constants=False`` or ``constant_tol=0``).
    metrics: dict name -> (units,) float32, each extra metric function (the factory's
      ``metrics``) of the pruned network at each step; empty if none were given.
    invalid: () bool, bad input (a negative or NaN ``constant_tol``, NaN activations,
      activations too large for a float32 norm, and under ``jit``/``vmap`` sample weights that
      are negative or non-finite or leave fewer than 2 patterns, a unit mask that keeps no
      unit of the group): no step was taken (``count`` 1, the masks as given, the params with
      the masked units zeroed).
  """

  units_kept: jax.Array
  loss: jax.Array
  min_angle: jax.Array
  unit_masks: jax.Array
  count: jax.Array
  metrics: dict = {}
  invalid: jax.Array = False


def progressive_distinctiveness(model, group: str, loss_fn: Callable[[PyTree], jax.Array], *,
                                complementary: bool = False, constants: bool = True,
                                compensate: bool = False,
                                metrics: Mapping[str, Callable[[PyTree], jax.Array]] | None = None
                                ) -> Callable:
  """Removes the single most similar pair per step, down to one unit, recording the loss.

  At each step the group's activations on ``x`` are recomputed from the current params; constant
  units are removed (folded into the next bias), then the pair with the smallest angle is merged
  (lower index kept; among equal angles the pair with the lowest ``(i, j)``). With
  ``complementary=True`` the pair with the largest angle (same tie rule) is removed instead when
  it is closer to 180 than the smallest angle is to 0 (strictly: equally close merges) and at
  least three units are left. Runs as one compiled ``lax.scan`` of ``units - 1`` steps;
  ``loss_fn`` must be a JAX function of the params (it sees the pruned params, removed units
  zeroed).

  Args:
    model: a jaxprune model (its ``activations`` method is used).
    group: the unit group's name.
    loss_fn: ``loss_fn(params) -> scalar``, e.g. the reconstruction error on the training set.
    complementary: also remove complementary pairs.
    constants: remove constant units at each step.
    compensate: fold a removed complementary pair's mean contribution into the next bias.
    metrics: optional ``{name: fn(params) -> scalar}`` recorded at every step beside the loss
      (e.g. the test loss), in ``report.metrics[name]``: one trajectory, several measures.

  Returns:
    ``run(params, unit_masks, x, constant_tol=1e-6, *, sample_weight=None) -> (params,
    unit_masks, ProgressiveReport)``; the returned params and masks are the final network
    (one unit, unless the trajectory ended earlier: see ``ProgressiveReport.count``). Every
    group named in ``unit_masks`` is applied first (its removed units zeroed, as
    ``expand`` + ``apply_masks`` do), so the activations, angles and losses are those of the
    network the masks describe. ``sample_weight`` (N,) weights the patterns of ``x`` as in
    :func:`jaxprune.pruners.distinctiveness`: weighted angles, the constant test over patterns
    of weight > 0, constants folding their weighted mean; a pattern of weight 0 does not exist,
    so padded ``x`` gives the trajectory of the unpadded data, to float rounding (near-tied
    pairs may be taken in another order). ``loss_fn`` and the metrics see
    only the params: weight their data in them.

  Example:
    >>> import jax, jaxprune
    >>> model = jaxprune.Autoencoder(in_features=11, hidden=(10,))
    >>> params = model.init(jax.random.key(0))
    >>> x = jax.random.uniform(jax.random.key(1), (64, 11))
    >>> loss = lambda p: jax.numpy.mean((model.apply(p, x) - x) ** 2)
    >>> run = progressive_distinctiveness(model, 'hidden_0', loss)
    >>> _, _, rep = run(params, jaxprune.unit_masks_ones(model), x)
    >>> rep.units_kept[:3].tolist()
    [10, 9, 8]
    >>> x_test = jax.random.uniform(jax.random.key(2), (16, 11))
    >>> run = progressive_distinctiveness(model, 'hidden_0', loss, metrics={
    ...     'test_loss': lambda p: jax.numpy.mean((model.apply(p, x_test) - x_test) ** 2)})
    >>> _, _, rep = run(params, jaxprune.unit_masks_ones(model), x)
    >>> rep.metrics['test_loss'].shape
    (10,)
  """
  g = _common.get_group(model, group)
  _common.check_no_products(g, "progressive_distinctiveness")
  _common.check_activations_complete(model, g.name)
  groups = _common.resolve_groups(model)
  _check_bias_folds(g, constants=constants, compensate=compensate)
  if not hasattr(model, "activations"):
    raise TypeError("progressive_distinctiveness needs a jaxprune model (to recompute "
                    "activations), not just its groups.")
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be a function loss_fn(params) -> scalar, got "
                    f"{type(loss_fn).__name__}.")
  if metrics is not None and not isinstance(metrics, Mapping):
    raise TypeError("metrics must be a mapping {name: fn(params) -> scalar}, e.g. "
                    f"{{'test_loss': fn}}; got {type(metrics).__name__}.")
  metrics = dict(metrics or {})
  for name, fn in metrics.items():
    if not isinstance(name, str) or not callable(fn):
      raise TypeError("metrics must map names (str) to functions fn(params) -> scalar; got "
                      f"{name!r}: {type(fn).__name__}.")
  shift = _common.SHIFT[g.activation]
  h = g.size

  def measure(params):
    return {k: jnp.asarray(fn(params), jnp.float32) for k, fn in metrics.items()}
  triu = np.triu(np.ones((h, h), bool), 1)

  def min_angle(ang, keep):
    pm = keep[:, None] & keep[None, :] & jnp.asarray(triu) & jnp.isfinite(ang)
    return jnp.where(jnp.any(pm), jnp.min(jnp.where(pm, ang, jnp.inf)), jnp.nan)

  def vectors(params, mask, x, tol, weight):
    """The shifted activation vectors (units, P), their means, the constant test and whether
    the input is unusable (see :class:`ProgressiveReport`'s ``invalid``)."""
    acts = model.activations(params, x, g.name)
    a = acts.reshape(-1, h).T.astype(jnp.float32)
    if weight is None:
      bad = ~jnp.all(jnp.isfinite(jnp.where(mask[:, None], a, 0.0)))
      return (a - shift, position_means(a, acts.shape),
              (jnp.max(a, axis=1) - jnp.min(a, axis=1)) < tol, bad)
    return _weighted_vectors(a, weight, acts.shape, shift, tol, mask)

  def step(params, mask, x, tol, weight):
    vecs, mean, is_const, _ = vectors(params, mask, x, tol, weight)
    const = mask & is_const if constants else jnp.zeros((h,), bool)
    # Keep at least one unit: never remove the last non-constant one as a constant.
    const = jnp.where(jnp.sum(mask & ~const) == 0,
                      const.at[jnp.argmax(mask)].set(False), const)
    consts = jnp.where(const[:, None], mean, 0.0)            # (h, P): a value per position
    keep = mask & ~const
    ang = pairwise_angles(jnp.where(keep[:, None], vecs, 0.0))
    pm = keep[:, None] & keep[None, :] & jnp.asarray(triu) & jnp.isfinite(ang)
    n_kept = jnp.sum(keep)
    flat = jnp.where(pm, ang, jnp.inf).reshape(-1)
    p_sim = jnp.argmin(flat)
    has_pair = jnp.any(pm)
    if complementary:
      flat_c = jnp.where(pm, ang, -jnp.inf).reshape(-1)
      p_comp = jnp.argmax(flat_c)
      use_comp = has_pair & (n_kept >= 3) & (180.0 - flat_c[p_comp] < flat[p_sim])
    else:
      p_comp, use_comp = p_sim, jnp.asarray(False)
    i_s, j_s = p_sim // h, p_sim % h
    i_c, j_c = p_comp // h, p_comp % h
    do_sim = has_pair & ~use_comp
    # One sparse row move (j's consumer rows into i's), not an (h, h) transfer matrix: each step
    # is O(h^2) on the angles and O(h) on the consumers.
    moves = (jnp.where(do_sim, i_s, h)[None], j_s[None], jnp.ones((1,), jnp.float32))
    keep = keep.at[j_s].set(keep[j_s] & ~do_sim)
    keep = keep.at[i_c].set(keep[i_c] & ~use_comp).at[j_c].set(keep[j_c] & ~use_comp)
    if compensate:
      consts = consts.at[i_c].add(jnp.where(use_comp, mean[i_c], 0.0))
      consts = consts.at[j_c].add(jnp.where(use_comp, mean[j_c], 0.0))
    params = _apply_moves(params, g, keep, moves, consts, constants or compensate)
    return params, keep, min_angle(ang, keep)

  def run_core(params, mask, others, x, tol, weight):
    # Row 0 scores the network the masks describe: the group's removed units, and those of the
    # other groups named in the unit masks (their activations feed this group's, or this
    # group's feed theirs), zeroed as expand + apply_masks would.
    params = _common.zero_other_units(params, groups, others)
    params = _common.zero_units(params, g, mask)
    vecs0, _, _, bad = vectors(params, mask, x, tol, weight)
    bad |= ~(tol >= 0) | ~jnp.any(mask)
    # a kept unit whose activations overflow a float32 norm has no angle (it would never be
    # merged, and the trajectory would end early, silently)
    bad |= jnp.any(mask & jnp.isinf(jnp.linalg.norm(jnp.where(mask[:, None], vecs0, 0.0),
                                                    axis=1)))
    ang0 = pairwise_angles(jnp.where(mask[:, None], vecs0, 0.0))
    row0 = (jnp.sum(mask, dtype=jnp.int32), jnp.asarray(loss_fn(params), jnp.float32),
            min_angle(ang0, mask), mask, measure(params))

    def body(carry, _):
      params, mask, count = carry
      new_p, new_m, ma = step(params, mask, x, tol, weight)
      # A step that removes nothing ends the trajectory (the units left have no angle between
      # them and none is constant, e.g. a dead relu unit with constants=False or
      # constant_tol=0): it would only repeat the last row, so it is not counted.
      live = (jnp.sum(mask) > 1) & ~bad & jnp.any(mask & ~new_m)
      params = jax.tree.map(lambda a, b: jnp.where(live, a, b), new_p, params)
      mask = jnp.where(live, new_m, mask)
      row = (jnp.sum(mask, dtype=jnp.int32), jnp.asarray(loss_fn(params), jnp.float32),
             jnp.where(live, ma, jnp.nan), mask, measure(params))
      return (params, mask, count + live.astype(jnp.int32)), row

    (params, mask, count), rows = jax.lax.scan(body, (params, mask, jnp.asarray(1, jnp.int32)),
                                               None, length=h - 1)
    rows = jax.tree.map(lambda r0, r: jnp.concatenate([r0[None], r]), row0, rows)
    return params, mask, ProgressiveReport(rows[0], rows[1], rows[2], rows[3], count, rows[4],
                                           bad)

  jitted = jax.jit(run_core)

  def check_scalars(params):
    """Each of ``loss_fn`` and the metrics must give one number (checked by shape, not run)."""
    for what, fn in [("loss_fn", loss_fn)] + [(f"metrics[{k!r}]", f) for k, f in
                                             metrics.items()]:
      out = jax.eval_shape(fn, params)
      shape = getattr(out, "shape", None)
      if shape is None or tuple(shape) != ():
        got = (f"shape {tuple(shape)}" if shape is not None
               else f"a {type(out).__name__}")
        raise ValueError(f"{what} must return a scalar (one number per network, e.g. a mean "
                         f"loss), got {got}; reduce it, e.g. with jnp.mean.")

  def run(params, unit_masks, x, constant_tol=1e-6, *, sample_weight=None):
    if isinstance(x, (tuple, dict)):
      raise TypeError(
          f"x must be one array of input patterns (the model's input), got a "
          f"{type(x).__name__}: progressive_distinctiveness recomputes the group's activations "
          "from a single input. For a model of several inputs, trace a function of one array "
          "that splits it, e.g. jaxprune.trace(lambda p, x: fn(p, x[:, :3], x[:, 3:]), params, "
          "jnp.concatenate([x1, x2], axis=1)), and pass the concatenated inputs.")
    mask = _common.group_mask(unit_masks, g, groups, params)
    others = _common.other_unit_masks(unit_masks, g, groups)
    _check_tol(constant_tol)
    check_scalars(params)
    _check_integer_writes(
        params, g, merges_fix="prune this group with a rule that only zeroes units "
        "(importance_prune, magnitude_prune)", constants=constants, compensate=compensate)
    if sample_weight is not None:
      sample_weight = validate.check_sample_weight(sample_weight, jnp.shape(x)[0])
    # x of the model's shape, not empty, finite (a NaN would make every angle NaN: no step
    # would remove a unit); params finite. Rows of weight 0 do not exist: they may hold
    # anything, as under jit (the core never reads them).
    x_real = x
    if sample_weight is not None and _common.is_concrete(x, sample_weight):
      xa = np.asarray(x)
      real = np.asarray(sample_weight) > 0
      x_real = np.where(real.reshape((-1,) + (1,) * (xa.ndim - 1)), xa, np.zeros((), xa.dtype))
    validate.check_model_data(model, params, x_real, sample_weight=sample_weight)
    shape = jax.eval_shape(lambda p, x: model.activations(p, x, g.name), params, x).shape
    _common.check_patterns(shape, sample_weight, f"x gives group {g.name!r}")
    params, mask, report = jitted(params, mask, others, x, _common.setting(constant_tol),
                                  sample_weight)
    return params, _common.with_mask(unit_masks, g.name, mask), report

  return run
