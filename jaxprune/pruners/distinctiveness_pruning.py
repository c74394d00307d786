"""Distinctiveness pruning (Gedeon and Harris): merge similar units, drop complementary ones.

Each unit of a group is described by a vector: its activations over the P training patterns
(sigmoid outputs shifted by -0.5 to [-0.5, 0.5]; tanh, relu and linear outputs unshifted), or its
weights. Two units whose vectors make an angle below ``similar_deg`` compute nearly the same thing:
one is removed and its outgoing weights are added to the other's. Two units at an angle above
``complementary_deg`` nearly cancel: both are removed. Units whose activation is constant are
removed and their constant contribution is folded into the next layer's bias (exact).

One sweep computes all angles once and applies the qualifying actions in a fixed order:

1. constant units (activation range over the patterns ``< constant_tol``), in index order;
2. pairs, most extreme first, measured by how far the angle is past its threshold
   (``similar_deg - angle`` or ``angle - complementary_deg``); ties go to similar before
   complementary, then to the lower unit index (then the lower second index). In a similar pair
   the lower index is kept. Thresholds are strict. A pair is applied only if neither unit has
   taken part in an action in this sweep. With ``absorb=True`` a unit kept in a similar merge
   absorbs further similar units, whatever the indices: a similar pair is taken when neither
   unit is removed and not both are already keepers; an existing keeper absorbs the other,
   otherwise the lower index is kept. Complementary pairs always need two untouched units.

This order is a greedy matching under a strict total order on pairs, and it is computed exactly
in parallel rounds: every free unit finds its best available partner, and pairs that are each
other's best are taken together (with ``absorb``, a free unit whose best partner is already a
keeper is absorbed by it), until a round takes nothing (Preis 1999; Manne and Bisseling 2007).
The taken pairs, sorted by the same order, are the report's actions. See docs/distinctiveness.md.

Masked units (False in the unit mask) never take part. Units with an all-zero vector (after the
shift) have no angle and take part only as constants. If a sweep would remove every unit, the
lowest-index non-constant unit it removed (else the lowest-index unit) is kept, without
compensation, and ``report.kept_last`` says so.

The pruners are factories (optax style): they close over the model's groups and the structural
options and return a jit-compiled function whose numeric settings (angles, tolerance) are traced,
so a sweep over thresholds is one ``jax.vmap`` and new values never recompile.

The code is split along the method's seams: scoring (the angles) in
:mod:`jaxprune.pruners.angles`, selection (vectors -> actions, the parallel rounds) in
:mod:`jaxprune.pruners.selection`, the pruner factories and :func:`until_stable` here, and
progressive pruning in :mod:`jaxprune.pruners.progressive`.

The returned params are the merged params with every removed unit's slices (producer and
consumer) set to zero, so ``model.apply(new_params, x)`` already computes the pruned network.

Example:
  >>> import jax, jaxprune
  >>> from jaxprune.pruners import distinctiveness, report_actions
  >>> model = jaxprune.MLP(in_features=4, hidden=(6,), out_features=3)
  >>> params = model.init(jax.random.key(0))
  >>> x = jax.random.normal(jax.random.key(1), (50, 4))
  >>> prune = distinctiveness(model, 'hidden_0')
  >>> acts = model.activations(params, x, 'hidden_0')
  >>> params, masks, report = prune(params, jaxprune.unit_masks_ones(model), acts, 15.0, 165.0)
  >>> actions = report_actions(report)
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import units as units_lib
from jaxprune import validate
from jaxprune.pruners import _common
from jaxprune.pruners.angles import _thresholds_ok, check_thresholds
from jaxprune.pruners.selection import CONSTANT, SweepReport, _sweep

PyTree = Any


def _apply_moves(params, group, keep, moves, consts, folds_constants):
  """``_apply`` with the transfer given as sparse row moves (see ``_sweep``): O(units) work."""
  dst, src, scale = moves
  out = params
  for s in group.consumers:
    leaf = units_lib.get_path(out, s.path)
    v = units_lib.unit_view(leaf, s)
    flat = v.reshape(v.shape[0], -1)
    new = flat.at[dst].add(scale.astype(flat.dtype)[:, None] * flat[src], mode="drop")
    out = units_lib.set_path(out, s.path, units_lib.from_unit_view(new.reshape(v.shape), s,
                                                                   leaf))
  # The constants' contributions (identity transfer), from the original rows; the flag may be
  # traced.
  out = _fold_constants(out, params, group, consts, folds_constants)
  return _common.zero_units(out, group, keep)


def _fold_constants(out, params, group, consts, enabled=True):
  """Adds each consumer's ``sum_j consts[j] * row_j`` (rows of ``params``) to its bias.

  ``enabled`` may be traced; when it is statically False nothing is folded, so consumers without
  a bias (convs followed by batch norm, as in ResNet) are fine. A traced ``enabled`` on a group
  with a consumer without a bias is False at run time: the factories refuse every folding rule
  for such a group (:func:`_check_bias_folds`), so nothing is folded either.
  """
  if enabled is False:
    return out
  if any(s.bias is None for s in group.consumers):
    if enabled is True:
      raise ValueError(f"Group {group.name!r}: a consumer has no bias path, so constant units "
                       "cannot be folded into it.")
    return out
  for s in group.consumers:
    leaf = units_lib.get_path(params, s.path)
    v = units_lib.unit_view(leaf, s)
    b = units_lib.get_path(out, s.bias)
    contrib = units_lib.bias_contribution(consts, v, jnp.shape(b), s, leaf)
    out = units_lib.set_path(out, s.bias, jnp.where(enabled, b + contrib, b))
  return out


def _counted_jit(fn):
  """jax.jit(fn) plus a count of how many times it was traced (for recompilation checks)."""
  traces = [0]

  def counted(*args):
    traces[0] += 1
    return fn(*args)

  jitted = jax.jit(counted)
  return jitted, (lambda: traces[0])


class _Sweep(NamedTuple):
  """A distinctiveness pruner's two halves, for :func:`until_stable`: ``prepare`` (the pruner's
  signature) runs the host-side checks and returns ``(mask, rest)``; ``core(params, mask,
  *rest)`` is the jitted sweep, returning ``(params, keep, SweepReport)``; ``group`` names the
  unit mask that ``keep`` replaces."""

  prepare: Callable
  core: Callable
  group: str


# ----------------------------------------------------------------------------- public pruners


@functools.lru_cache(maxsize=None)
def _activation_core(g):
  """The jitted sweep for one group (shared by every factory of that group: the rule flags are
  traced arguments, so new flags never recompile)."""
  shift = _common.SHIFT[g.activation]

  def core(params, mask, acts, sim, comp, tol, flags, weight):
    similar, complementary, constants, absorb, compensate, fold = flags
    folds = constants | (complementary & (compensate | fold))
    cfg = dict(use_similar=similar, use_comp=complementary, use_const=constants, absorb=absorb,
               fold=fold, compensate=compensate)
    a = acts.reshape(-1, g.size).T.astype(jnp.float32)
    sim = jnp.asarray(sim, jnp.float32)
    comp = jnp.asarray(comp, jnp.float32)
    bad = ~_thresholds_ok(sim, comp, similar, complementary) | ~(tol >= 0)
    if weight is None:
      mean = position_means(a, acts.shape)
      is_const = (jnp.max(a, axis=1) - jnp.min(a, axis=1)) < tol
      vecs = a - shift
      bad |= ~jnp.all(jnp.isfinite(jnp.where(mask[:, None], a, 0.0)))
    else:
      vecs, mean, is_const, bad_w = _weighted_vectors(a, weight, acts.shape, shift, tol, mask)
      bad |= bad_w
    # Blocked Gram sums: padding patterns (weight 0, exact zeros) leave every angle unchanged.
    keep, moves, consts, report = _sweep(vecs, mask, is_const, mean, mean, sim, comp,
                                         bad, blocked=True, **cfg)
    return _apply_moves(params, g, keep, moves, consts, folds), keep, report

  return _counted_jit(core)


def position_means(a, acts_shape, weight=None):
  """Each unit's mean activation at each position of its map, over the examples: (units, P)
  from ``a`` (units, N * P), where ``acts_shape`` is (N, ..., units) and P the product of its
  middle axes (1 for a dense layer). ``weight`` (N,) weighs the examples (its sum must be > 0
  where it is used). A consumer that reads each position with its own weights (a dense layer
  after a flatten) takes the folded means position by position, so ``compensate`` adds the
  units' mean contribution there, not their overall mean times the rows' sum."""
  p = math.prod(acts_shape[1:-1])
  per = a.reshape(a.shape[0], -1, p)
  if weight is None:
    return jnp.mean(per, axis=1)
  w = jnp.asarray(weight, jnp.float32)
  total = jnp.sum(w)
  if p == 1:                    # a dense layer: the weighted sum as it always was (same bits)
    return (jnp.sum(w * a, axis=1) / jnp.where(total > 0, total, 1.0))[:, None]
  return jnp.einsum("unp,n->up", per, w) / jnp.where(total > 0, total, 1.0)


def _weighted_vectors(a, weight, acts_shape, shift, tol, mask):
  """The sweep's inputs from (units, P) activations and per-sample weights (N,).

  Each sample's weight covers its H*W positions (conv). Returns ``(vectors, mean, is_const,
  bad)``: the shifted vectors scaled by ``sqrt(w)`` (so the cosine is the weighted one, and a
  0/1 weight leaves a real entry exactly as it is and makes a padded one exactly 0: the angles
  of the unpadded data), the weighted mean, the range over samples of positive weight, and
  whether the input is unusable (NaN among the real activations, weights that are negative or
  non-finite, or fewer than 2 patterns of weight > 0).
  """
  w = jnp.asarray(weight, jnp.float32)
  wv = jnp.broadcast_to(w.reshape((-1,) + (1,) * (len(acts_shape) - 2)),
                        acts_shape[:-1]).reshape(-1)
  real = wv > 0
  a = jnp.where(real[None, :], a, 0.0)                 # padding may hold anything
  mean = position_means(a, acts_shape, jnp.where(w > 0, w, 0.0))
  hi = jnp.max(jnp.where(real[None, :], a, -jnp.inf), axis=1)
  lo = jnp.min(jnp.where(real[None, :], a, jnp.inf), axis=1)
  is_const = (hi - lo) < tol
  vecs = jnp.where(real[None, :], (a - shift) * jnp.sqrt(jnp.where(real, wv, 0.0)), 0.0)
  bad = ~jnp.all(jnp.isfinite(jnp.where(mask[:, None], a, 0.0)))
  # fewer than 2 patterns of weight > 0 (all zero included): every unit would be constant
  bad |= ~jnp.all(jnp.isfinite(w) & (w >= 0)) | ~(jnp.sum(real) >= 2)
  return vecs, mean, is_const, bad


def _check_bias_folds(g, *, constants: bool, compensate: bool = False, fold: bool = False):
  """Rules that fold contributions into the next layer's bias need an exact fold (a bias, and
  no zero-padded conv reading the group; for ``fold``, which moves weights onto the kept unit,
  also no max pooling); otherwise say so before any work."""
  wanted = [n for n, on in (("constants", constants), ("compensate", compensate),
                            ("fold", fold)) if on]
  why = _common.fold_obstacle(g) if wanted else None
  if why is None and fold:
    why, wanted = _common.fold_obstacle(g, linear=True), ["fold"]
  if why:
    raise ValueError(
        f"Group {g.name!r} cannot fold removed units into the next bias exactly ({why}). "
        f"Pass {', '.join(f'{n}=False' for n in wanted)} (merging similar units and removing "
        "complementary pairs still work).")


_MERGING = "merging similar units (a merged unit's outgoing rows added to the kept unit's)"


def _check_integer_writes(params, g, *, merges_fix=None, **rules):
  """The rules among ``rules`` (name -> on) that write computed values into the next layer are
  refused on integer consumer leaves, naming the rules to turn off: ``similar`` adds a merged
  unit's outgoing rows to the kept unit's (int8 codes wrap around: 88 + 82 is -86); the folds
  (``constants``, ``compensate``, ``fold``) also write fractional values into the bias. A
  pruner that always merges passes ``merges_fix``, the fix its merges' refusal names."""
  if merges_fix is not None:
    _common.check_floating_writes(params, g, [s.path for s in g.consumers], _MERGING,
                                  merges_fix)
  on = [n for n, v in rules.items() if v]
  if not on:
    return
  folds = [n for n in on if n != "similar"]
  what = " and ".join(([_MERGING] if "similar" in on else [])
                      + (["folding removed units into the next bias"] if folds else []))
  paths = (_common.consumer_write_paths(g) if folds
           else [s.path for s in g.consumers])
  _common.check_floating_writes(params, g, paths, what,
                                "pass " + ", ".join(f"{n}=False" for n in on))


def _check_output_from_bias(g):
  """A unit with zero incoming weights outputs act(bias) only when nothing else acts between
  its kernel and its nonlinearity, and that nonlinearity is a known one."""
  kinds = [s.kind for s in g.producers]
  why = None
  if not kinds.count("kernel") and "scale" in kinds:
    why = ("its kernel is computed from params (a LoRA's w + a @ b, a weight norm: "
           "target.explain() names the ops), so zero params are not zero incoming weights")
  elif kinds.count("kernel") != 1:
    why = (f"{kinds.count('kernel')} kernels produce its units (a residual addition or a "
           "gate a * sigmoid(b) couples them)")
  elif set(kinds) - {"kernel", "bias"} or kinds.count("bias") > 1 or not g.act_of_bias:
    why = ("something acts on its units between the kernel and the nonlinearity: a "
           "normalisation, a scale, a constant, or another branch added, as when one layer is "
           "applied twice and its outputs summed")
  elif g.activation == "other":
    why = "its nonlinearity is not one of sigmoid, tanh, relu or none (it is 'other')"
  if why:
    raise ValueError(
        f"Group {g.name!r}: a unit with zero incoming weights does not output act(bias) here "
        f"({why}), so its constant output cannot be folded into the next bias. Pass "
        "constants=False, use source='outgoing', or find constant units from activations "
        "(distinctiveness).")


def distinctiveness(model_or_groups, group: str, *, similar: bool = True,
                    complementary: bool = True, constants: bool = True, absorb: bool = False,
                    compensate: bool = False, fold: bool = False) -> Callable:
  """Activation-based distinctiveness pruning of one unit group (Gedeon and Harris).

  Args:
    model_or_groups: a jaxprune model, or its ``groups`` dict.
    group: the unit group's name, e.g. ``'hidden_0'`` or ``'conv_1'``.
    similar: merge similar pairs (angle < ``similar_deg``).
    complementary: remove complementary pairs (angle > ``complementary_deg``).
    constants: remove constant units, folding their constant output into the next bias.
    absorb: let a unit kept in a similar merge absorb further similar units in the same sweep,
      whatever the indices (an existing keeper absorbs; see the module docstring).
    compensate: when removing a complementary pair, add the two units' mean contributions
      to the next layer's bias (exact only if their outgoing weights are equal).
    fold: for a complementary pair, remove only the higher-index unit j: subtract its outgoing
      weights from the kept unit i's and add ``mean(o_i + o_j)`` times them to the next bias
      (exact when ``o_i + o_j`` is constant, e.g. sigmoid ``o_j = 1 - o_i``).

  Returns:
    ``prune(params, unit_masks, activations, similar_deg=15.0, complementary_deg=165.0,
    constant_tol=1e-6, *, sample_weight=None) -> (params, unit_masks, SweepReport)``.
    ``activations`` are the group's activations over the patterns, (N, units) or
    (N, ..., units) such as (N, H, W, units) (then each unit's vector is its values at every
    position of every pattern, N*H*W); they must come from the
    params being pruned. Angles and the tolerance are traced. ``sample_weight`` (N,) weights the
    patterns: the angles are those of the weighted inner product, the constant test looks only
    at patterns of weight > 0, and constants fold their weighted mean. A pattern of weight 0
    does not exist, so data padded with zero-weight rows (several folds stacked under ``vmap``)
    give exactly the angles, masks and report of the unpadded data (bit for bit: the Gram matrix
    is summed in fixed blocks of patterns, so appended zeros change no rounding). None: every
    pattern counts once. With concrete inputs bad values raise ValueError; under ``jit``/``vmap`` they leave
    everything unchanged and set ``report.invalid``.

  Note:
    Merging is exact (outputs unchanged) for exact duplicates and removing constants is exact
    when the consumer reads the activations linearly (dense layers, flatten, and conv layers
    away from 'SAME' padding borders). Through a max-pool only exact duplicates and constants
    stay exact.
  """
  g = _common.get_group(model_or_groups, group)
  _common.check_no_products(g, "distinctiveness")
  _common.check_activations_complete(model_or_groups, g.name)
  groups = _common.resolve_groups(model_or_groups)
  if not (similar or complementary or constants):
    raise ValueError("All rules are off (similar, complementary, constants); turn one on.")
  if fold and compensate:
    raise ValueError("fold and compensate are two treatments of a complementary pair (fold "
                     "drops one unit exactly, compensate drops both and adds their mean); "
                     "pass one of them.")
  _check_bias_folds(g, constants=constants, compensate=compensate, fold=fold)
  jitted, trace_count = _activation_core(g)
  flags = np.array([similar, complementary, constants, absorb, compensate, fold], bool)

  def prepare(params, unit_masks, activations, similar_deg=15.0, complementary_deg=165.0,
              constant_tol=1e-6, *, sample_weight=None):
    """The host-side checks (nothing compiled); returns the group's mask and the sweep's
    other arguments, ``jitted(params, mask, *rest)``."""
    mask = _common.group_mask(unit_masks, g, groups, params)
    sample_weight = _common.check_activation_input(activations, g, sample_weight, mask)
    check_thresholds(similar_deg, complementary_deg, similar=similar,
                     complementary=complementary)
    _check_tol(constant_tol)
    _check_integer_writes(params, g, similar=similar, constants=constants,
                       compensate=compensate, fold=fold)
    if not isinstance(activations, (np.ndarray, jax.Array)):
      activations = jnp.asarray(activations)   # an array already goes to jit as it is: jnp's
      # conversion of a NumPy array is one more compiled program per shape, the same values
    return mask, (activations, _common.setting(similar_deg), _common.setting(complementary_deg),
                  _common.setting(constant_tol), flags, sample_weight)

  def prune(params, unit_masks, activations, similar_deg=15.0, complementary_deg=165.0,
            constant_tol=1e-6, *, sample_weight=None):
    mask, rest = prepare(params, unit_masks, activations, similar_deg, complementary_deg,
                         constant_tol, sample_weight=sample_weight)
    new_params, keep, report = jitted(params, mask, *rest)
    return new_params, _common.with_mask(unit_masks, g.name, keep), report

  prune._trace_count = trace_count  # for tests: compilations so far (not public API)
  prune._sweep = _Sweep(prepare, jitted, g.name)   # for until_stable (not public API)
  # same config: same sweep (the model's other groups too: prune checks masks against them)
  prune._config = ("activations", g, tuple(flags.tolist()), tuple(sorted(groups.items())))
  return prune


def _check_tol(tol):
  """One real ``constant_tol`` >= 0 (a TypeError / ValueError naming it, not NumPy's or jit's
  own message, for None, a string or an array of tolerances)."""
  validate.check_real_scalar(
      "constant_tol", tol, "a number >= 0 (a unit whose activation range is below it is "
      "constant)", "to run several tolerances, jax.vmap the pruner over them (in_axes 0 for "
      "constant_tol, None for the rest).")
  if _common.is_concrete(tol) and not float(tol) >= 0:
    raise ValueError(f"constant_tol must be >= 0, got {tol}.")


@functools.lru_cache(maxsize=None)
def _weight_core(g, source, similar, complementary, constants, absorb, groups):
  """The jitted weight-based sweep for one group and configuration (``groups``: the model's
  groups as sorted ``(name, group)`` pairs, for the other groups' masks)."""
  cfg = dict(use_similar=similar, use_comp=complementary, use_const=constants, absorb=absorb,
             fold=False, compensate=False)
  groups = dict(groups)

  def core(params, mask, sim, comp, tol, others):
    # The vectors of the network the unit masks describe: every removed unit zeroed (a
    # removed unit of the layer before still has a row in this group's incoming kernels).
    params = _common.masked_network(params, groups, g, mask, others)
    incoming = source == "incoming"
    v = (functools.partial(_common.incoming_vectors, acting_later=True) if incoming
         else _common.outgoing_vectors)(params, g)
    if incoming and constants:
      # only the constants rule reads a zero-weight unit's constant output act(bias); without
      # it, groups whose activation or bias layout has no such value (gelu, a 2-D bias) prune
      const_val = _common.constant_output(params, g)
    else:
      const_val = jnp.zeros((g.size,), jnp.float32)
    v = v.astype(jnp.float32)
    is_const = jnp.linalg.norm(v, axis=1) < tol
    sim = jnp.asarray(sim, jnp.float32)
    comp = jnp.asarray(comp, jnp.float32)
    bad = ~_thresholds_ok(sim, comp, similar, complementary) | ~(tol >= 0)
    bad |= ~jnp.all(jnp.isfinite(jnp.where(mask[:, None], v, 0.0)))
    keep, moves, consts, report = _sweep(v, mask, is_const, const_val, None, sim, comp, bad,
                                         **cfg)
    return _apply_moves(params, g, keep, moves, consts, constants), keep, report

  return _counted_jit(core)


def weight_distinctiveness(model_or_groups, group: str, *, source: str = "incoming",
                           similar: bool = True, complementary: bool = True,
                           constants: bool = True, absorb: bool = False) -> Callable:
  """Weight-based distinctiveness (Zheng; Dixit): the same sweep on weight vectors.

  Each unit's vector is its incoming kernel weights (``source='incoming'``: a dense column, or a
  conv filter flattened to in_ch x k x k; biases excluded) or its outgoing weights
  (``source='outgoing'``: every consumer slice concatenated). No shift is applied.
  "Constant" units are those whose weight vector has norm ``< constant_tol``: with zero incoming
  weights a unit outputs act(bias) everywhere, which is folded into the next bias (exact); with
  zero outgoing weights it contributes nothing and is simply removed. Complementary pairs are
  removed without compensation (no activations to compute a mean from). Every group named in
  ``unit_masks`` is applied first (its removed units zeroed, in the params returned too), so
  the vectors are those of the network the masks describe.

  Returns:
    ``prune(params, unit_masks, similar_deg=15.0, complementary_deg=165.0, constant_tol=1e-6)
    -> (params, unit_masks, SweepReport)``, jit-compiled with traced thresholds.

  Example:
    >>> import jax, jaxprune
    >>> model = jaxprune.LeNet(input_shape=(16, 16, 1))
    >>> params = model.init(jax.random.key(0))
    >>> prune = weight_distinctiveness(model, 'conv_0')
    >>> params, masks, report = prune(params, jaxprune.unit_masks_ones(model), 30.0, 150.0)
  """
  g = _common.get_group(model_or_groups, group)
  _common.check_no_products(g, "weight_distinctiveness")
  groups = _common.resolve_groups(model_or_groups)
  if source not in ("incoming", "outgoing"):
    raise ValueError(f"source must be 'incoming' or 'outgoing', got {source!r}.")
  if not (similar or complementary or constants):
    raise ValueError("All rules are off (similar, complementary, constants); turn one on.")
  _check_bias_folds(g, constants=constants)
  if source == "incoming" and constants:
    _check_output_from_bias(g)
  jitted, trace_count = _weight_core(g, source, similar, complementary, constants, absorb,
                                     tuple(sorted(groups.items())))

  sources = g.producers if source == "incoming" else g.consumers

  def prepare(params, unit_masks, similar_deg=15.0, complementary_deg=165.0,
              constant_tol=1e-6):
    """The host-side checks (nothing compiled); returns the group's mask and the sweep's
    other arguments, ``jitted(params, mask, *rest)``."""
    mask = _common.group_mask(unit_masks, g, groups, params)
    _common.check_finite_slices(params, g, sources)   # the leaves the unit vectors come from
    # act(bias) of zero-weight units is folded (computed in the consumer kernel's dtype)
    _check_integer_writes(params, g, similar=similar,
                       constants=source == "incoming" and constants)
    check_thresholds(similar_deg, complementary_deg, similar=similar,
                     complementary=complementary)
    _check_tol(constant_tol)
    return mask, (_common.setting(similar_deg), _common.setting(complementary_deg),
                  _common.setting(constant_tol), _common.other_unit_masks(unit_masks, g, groups))

  def prune(params, unit_masks, similar_deg=15.0, complementary_deg=165.0, constant_tol=1e-6):
    mask, rest = prepare(params, unit_masks, similar_deg, complementary_deg, constant_tol)
    new_params, keep, report = jitted(params, mask, *rest)
    return new_params, _common.with_mask(unit_masks, g.name, keep), report

  prune._trace_count = trace_count  # for tests: compilations so far (not public API)
  prune._sweep = _Sweep(prepare, jitted, g.name)   # for until_stable (not public API)
  prune._config = ("weights", g, source, similar, complementary, constants, absorb,
                   tuple(sorted(groups.items())))
  return prune


# ----------------------------------------------------------------------------- until stable


class StableReport(NamedTuple):
  """What :func:`until_stable` did.

  Attributes:
    sweeps: () int32 sweeps run, the last one (which found nothing) included.
    actions: () int32 actions over all sweeps (a last sweep that removed nothing adds none).
    stable: () bool, True if the last sweep found no qualifying pair or removed nothing (False
      if ``max_sweeps`` stopped it first, or if the input was bad under ``jit``).
    invalid: () bool, the first sweep's ``report.invalid``.
  """

  sweeps: jax.Array
  actions: jax.Array
  stable: jax.Array
  invalid: jax.Array


_STABLE_LOOPS = {}


def _stable_loop(prune, max_sweeps):
  """One compiled ``lax.while_loop`` of sweeps per pruner configuration (factories called
  again with the same group and options share it, as they share the sweep itself). For the
  library's pruners it runs every sweep, the first included (:func:`_make_sweep_loop`);
  for another function, the sweeps after a first ordinary call."""
  key = (getattr(prune, "_config", prune), max_sweeps)
  if key not in _STABLE_LOOPS:
    sweep = getattr(prune, "_sweep", None)
    _STABLE_LOOPS[key] = (_make_sweep_loop(sweep.core, max_sweeps) if isinstance(sweep, _Sweep)
                          else _make_stable_loop(prune, max_sweeps))
  return _STABLE_LOOPS[key]


def _sweep_limit(max_sweeps) -> int:
  """The loop's bound on sweeps, an int32 like its counter (a larger ``max_sweeps`` is no
  bound: there are never more sweeps than units + 1)."""
  top = int(np.iinfo(np.int32).max)
  return top if max_sweeps is None else min(int(max_sweeps), top)


def _same_types(a, b) -> bool:
  """Whether two pytrees of arrays / avals have the same structure, shapes, dtypes and weak
  types (a ``lax.while_loop`` carry must keep them)."""
  def aval(x):
    return (tuple(jnp.shape(x)), jnp.result_type(x),
            bool(getattr(getattr(x, "aval", x), "weak_type", False)))
  return (jax.tree.structure(a) == jax.tree.structure(b)
          and all(aval(x) == aval(y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def _make_sweep_loop(core, max_sweeps):
  """``loop(params, mask, rest) -> (params, keep, StableReport)``: every sweep of
  :func:`until_stable` in one compiled program, the sweep compiled once (as the loop's body).

  The first sweep runs in the body too (``n == 0``; the carry's ``acted`` starts at 1 so it
  always runs), so results are those of one ordinary call followed by the loop. Only when the
  sweep returns params of other types than it is given (a dtype promoted, a weak type made
  strong) is the first sweep run before the loop, as the carry must keep its types.
  """
  limit = _sweep_limit(max_sweeps)

  def loop(params, mask, rest):
    def cond(c):
      return (c[2] > 0) & (c[3] < limit)

    def body(c):
      p, m, _, n, total, invalid = c
      p, m, r = core(p, m, *rest)
      acted = _acted(r)
      return p, m, acted, n + 1, total + acted, jnp.where(n == 0, r.invalid, invalid)

    zero = jnp.asarray(0, jnp.int32)
    out = jax.eval_shape(core, params, mask, *rest)   # traced once: the body reuses the trace
    init = (params, mask, jnp.asarray(1, jnp.int32), zero, zero, jnp.asarray(False))
    if not _same_types(out[:2], (params, mask)):
      init = body(init)
    params, mask, last, sweeps, total, invalid = jax.lax.while_loop(cond, body, init)
    return params, mask, StableReport(sweeps, total, (last == 0) & ~invalid, invalid)

  return jax.jit(loop)


def _make_stable_loop(prune, max_sweeps):
  limit = _sweep_limit(max_sweeps)

  def loop(params, unit_masks, first_count, args, kwargs):
    def cond(c):
      return (c[2] > 0) & (c[3] < limit)

    def body(c):
      p, m, _, n, total = c
      p, m, r = prune(p, m, *args, **kwargs)
      acted = _acted(r)
      return p, m, acted, n + 1, total + acted

    one = jnp.asarray(1, jnp.int32)
    return jax.lax.while_loop(cond, body, (params, unit_masks, first_count, one, first_count))

  return jax.jit(loop)


def _acted(report: SweepReport) -> jax.Array:
  """The sweep's action count, or 0 if it removed nothing: when the only unit left in play is
  constant, the sweep removes it and then keeps it (``kept_last``), one action that changes
  nothing, and repeating it would never end."""
  idle = report.kept_last & (report.count == 1) & (report.kind[0] == CONSTANT)
  return jnp.where(idle, jnp.zeros_like(report.count), report.count)


def _takes_sample_weight(prune: Callable) -> bool:
  try:
    ps = inspect.signature(prune).parameters.values()
  except (TypeError, ValueError):  # no signature to read: let the call decide
    return True
  return any(p.name == "sample_weight" or p.kind is p.VAR_KEYWORD for p in ps)


def until_stable(prune: Callable, params: PyTree, unit_masks, *args,
                 max_sweeps: int | None = None, sample_weight=None):
  """Repeats a distinctiveness sweep until a sweep finds no qualifying pair.

  One sweep computes the angles once, so units merged in it may leave new pairs below the
  threshold among the kept units (a kept unit's outgoing weights change, and with the default
  ``absorb=False`` a unit takes part in one action per sweep). Repeating until nothing
  qualifies is how the CNN studies prune a layer. Every sweep that acts removes at least one
  unit, so this ends after at most ``units + 1`` sweeps. A sweep that removes nothing counts as
  finding nothing: that is the case when the only unit left is constant (the sweep removes it,
  then keeps it as the last unit, ``report.kept_last``); it adds no actions.

  Bad concrete input raises as in an ordinary call of ``prune`` (its checks run first); then
  every sweep, the first included, runs in one compiled ``lax.while_loop`` (compiled once per
  pruner configuration and input shapes). The results are those of a first call of ``prune``
  followed by the loop.

  Args:
    prune: a pruner from :func:`distinctiveness` or :func:`weight_distinctiveness`.
    params: the params to prune.
    unit_masks: the unit masks.
    *args: the pruner's other arguments (activations, thresholds, tolerance), the same for
      every sweep. Activations stay valid across sweeps: merging changes only outgoing weights,
      so the kept units' activations do not change.
    max_sweeps: stop after this many sweeps (None: until stable).
    sample_weight: the activation pruner's per-pattern weights (see :func:`distinctiveness`),
      the same for every sweep; None for none (and for weight-based pruners).

  Returns:
    ``(params, unit_masks, StableReport)``.

  Example:
    >>> import jax, jaxprune
    >>> from jaxprune.pruners import weight_distinctiveness, until_stable
    >>> model = jaxprune.MLP(in_features=4, hidden=(8,), out_features=3)
    >>> prune = weight_distinctiveness(model, 'hidden_0', complementary=False)
    >>> params, masks, rep = until_stable(prune, model.init(jax.random.key(0)),
    ...                                   jaxprune.unit_masks_ones(model), 60.0)
    >>> bool(rep.stable)
    True
  """
  if max_sweeps is not None:   # (an int: it keys the cache of compiled loops)
    max_sweeps = validate.whole_number("max_sweeps", max_sweeps, 1)
  if sample_weight is not None and not _takes_sample_weight(prune):
    raise ValueError("sample_weight weights the patterns of an activation pruner "
                     "(distinctiveness(...)); this pruner takes no data (weight_distinctiveness "
                     "scores the weights themselves), so it has no sample weights: drop "
                     "sample_weight.")
  kwargs = {} if sample_weight is None else {"sample_weight": sample_weight}
  sweep = getattr(prune, "_sweep", None)
  if isinstance(sweep, _Sweep):   # a library pruner: its checks here, every sweep compiled
    try:
      inspect.signature(prune).bind(params, unit_masks, *args, **kwargs)
    except TypeError:   # wrong arguments: the pruner's own message (nothing runs before it)
      prune(params, unit_masks, *args, **kwargs)
      raise
    mask, rest = sweep.prepare(params, unit_masks, *args, **kwargs)
    params, keep, report = _stable_loop(prune, max_sweeps)(params, mask, rest)
    return params, _common.with_mask(unit_masks, sweep.group, keep), report
  out = prune(params, unit_masks, *args, **kwargs)
  triple = isinstance(out, tuple) and len(out) == 3
  if not (triple and isinstance(out[2], SweepReport)):
    got = (f"{type(out[2]).__name__} as its report" if triple
           else f"a {type(out).__name__}")
    raise TypeError(
        "until_stable repeats a distinctiveness sweep: prune must be a pruner from "
        "distinctiveness(...) or weight_distinctiveness(...) (or a function returning what they "
        f"return, (params, unit_masks, SweepReport)); it returned {got}. Other pruners choose "
        "their own number of units: call them once.")
  params, unit_masks, first = out
  first_count = _acted(first)
  if _common.is_concrete(first_count) and int(first_count) == 0:  # stable already: no loop
    one = jnp.asarray(1, jnp.int32)
    return params, unit_masks, StableReport(one, first_count, ~first.invalid, first.invalid)
  loop = _stable_loop(prune, max_sweeps)
  params, unit_masks, last, sweeps, total = loop(params, unit_masks, first_count, args, kwargs)
  return params, unit_masks, StableReport(sweeps, total, (last == 0) & ~first.invalid,
                                          first.invalid)
