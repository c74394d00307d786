"""Helpers shared by the pruners: group lookup, input checks, unit vectors, zeroing units."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import masks as masks_lib
from jaxprune import units as units_lib
from jaxprune import validate
from jaxprune.models.base import activation_fn

PyTree = Any

# Activations whose outputs are centred by distinctiveness: sigmoid lives in [0, 1] and is shifted
# to [-0.5, 0.5]; the others are used as they are.
SHIFT = {"sigmoid": 0.5, "tanh": 0.0, "relu": 0.0, "linear": 0.0, "other": 0.0}


def resolve_groups(target) -> Mapping[str, units_lib.UnitGroup]:
  """A pruning target's ``groups`` (built-in model or traced), or the groups mapping itself."""
  return dict(masks_lib.groups_of(target, "A structured pruner"))


def get_group(target, name: str) -> units_lib.UnitGroup:
  """The unit group called ``name``; a KeyError that lists the target's groups otherwise."""
  return units_lib._check_group_name(resolve_groups(target), name)


def check_no_products(group: units_lib.UnitGroup, pruner: str) -> None:
  """Raises ValueError for a group whose units are contracted between two activations
  (``UnitGroup.read_by_products``): ``pruner`` merges units or folds them into the next layer,
  which no change of kernel rows or biases makes exact there."""
  if group.read_by_products:
    raise ValueError(
        f"Group {group.name!r}: its units are contracted between two activations (as in "
        "attention's q @ k.T, where they are query/key features) or summed over by a "
        "statistic of each example (an RMSNorm's or an L2 norm's sum of squares, a mean), and "
        "a unit's term there is the product of its values on the two sides or its own value, "
        f"so {pruner}, which merges units or folds "
        "them into the next layer, would change the outputs. Prune it by removing units: "
        "importance_prune, magnitude_prune or ga.search (in a training loop, gradual with "
        "importance_pruner).")


def check_activations_complete(target, name: str) -> None:
  """Raises ValueError for a traced group whose activations are not what its consumers read
  (see ``TracedTarget.activations_complete``): pruners from activations would compare other
  vectors than the network computes with."""
  complete = getattr(target, "activations_complete", None)
  if complete is not None and not complete(name):
    why = getattr(target, "activations_incomplete_why", None)
    why = why(name) if why is not None else None
    raise ValueError(
        f"Group {name!r}: its consumers read other values than the activations it reports "
        + (f"({why})" if why else
           "(other kernels act on its units after them: a residual addition couples it, a "
           "gate scales it, or layers scanned over stacked params share it; or its readers "
           "read it at different points, like relu(h) @ W2 + h @ W3; or a per-unit parameter "
           "of the group acts after them, like tanh(h.mean(1) + b))") + ", so a "
        "pruner from activations would merge or remove the wrong units. Prune it from weights "
        "(weight_distinctiveness, importance_prune, magnitude_prune) or give each layer its own "
        "group.")


def fold_obstacle(group: units_lib.UnitGroup, *, linear: bool = False) -> str | None:
  """Why a removed unit's constant (``linear``: also its weights, moved onto other units)
  cannot be folded into the next bias exactly here, or None when it can."""
  # (a factor of a computed kernel, a LoRA's a in h @ (w + a @ b), has no bias of its own:
  # what blocks the fold is the computed kernel, said below)
  no_bias = [s for s in group.consumers if s.bias is None and not units_lib.reads_computed(s)]
  if no_bias:
    return (f"its consumer {units_lib.path_str(no_bias[0].path)} adds no bias with a value for "
            "each of its outputs directly to its product (it has no bias, as a conv that a "
            "BatchNorm follows; or one added after another op, such as a scaling "
            "2 * (h @ W) + b, which cannot take the fold)")
  if not group.exact_constant_fold:
    padded = [s for s in group.consumers if s.padded]
    if padded and all(s.padded_why for s in padded):  # what each reader is, where known
      by_why = {}
      for s in padded:      # a leaf read at two places (an outer product) is named once
        paths = by_why.setdefault(s.padded_why, [])
        if units_lib.path_str(s.path) not in paths:
          paths.append(units_lib.path_str(s.path))
      return "; ".join(
          (f"its consumer {paths[0]} reads" if len(paths) == 1 else
           f"its consumers {', '.join(paths)} read") + f" it through {why}"
          for why, paths in by_why.items())
    return ("it is read by a zero-padded ('SAME') or input-dilated (transposed) convolution, "
            "where a constant channel contributes less at the borders, or between inputs, than "
            "elsewhere; by a recurrence, which reads the initial state at the first step; or "
            "through an op that does not pass a constant on unchanged, like a sum, a zero pad, "
            "an average that counts padding, a scaling or an attention-weighted sum")
  if linear and not group.exact_linear_fold:
    return ("it is read through a max or min (max pooling), which passes a constant on "
            "unchanged but not a sum of units")
  return None


def setting(value):
  """A checked numeric setting as the compiled sweep takes it: a concrete one as a Python
  float (weakly typed, as a Python float literal), whatever type it came in (an int, a NumPy
  or JAX scalar), so a new type of value compiles no new program; a traced one as it is.

  The same arithmetic either way, except for a float64 value under ``jax_enable_x64``: a
  strongly typed float64 setting makes comparisons with float32 losses or angles float64,
  where a weak one is rounded to float32 first; it stays a (NumPy) float64, as it would be
  under the user's own ``jit`` (one program more). (Without x64 JAX holds it as float32
  anyway.)"""
  if isinstance(value, jax.core.Tracer):
    return value
  if (jax.config.jax_enable_x64 and type(value) is not float   # (np.float64 subclasses float)
      and np.result_type(value) == np.float64):
    return np.asarray(value, np.float64)
  return float(value)


def is_concrete(*xs) -> bool:
  """True if no argument is a tracer (so values can be checked on the host)."""
  return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(xs))


def group_mask(unit_masks: Mapping[str, Any], group: units_lib.UnitGroup,
               groups: Mapping[str, units_lib.UnitGroup], params: PyTree = None) -> jax.Array:
  """The group's unit mask from ``unit_masks`` (all True if the group is not named).

  Every key of ``unit_masks`` must name one of ``groups`` (a misspelt key raises), every mask
  must be bool (or 0/1 integers), and the group is checked against ``params`` when given.
  """
  units_lib.check_mask_keys(groups, unit_masks)
  if params is not None:
    units_lib.check_group(params, group)
  for name, m in unit_masks.items():
    units_lib.unit_mask(m, groups[name], np)  # a check: nothing compiled
  if group.name not in unit_masks:
    return jnp.ones((group.size,), bool)
  m = unit_masks[group.name]
  if is_concrete(m) and not bool(np.any(np.asarray(m))):
    raise ValueError(f"Unit mask {group.name!r} keeps no unit: there is nothing to prune, and a "
                     "layer without units cuts the network. Pass the unit masks of a network "
                     "that still has units there (jaxprune.unit_masks_ones(target) to start).")
  return units_lib.unit_mask(m, group)


def with_mask(unit_masks: Mapping[str, Any], name: str, mask: jax.Array) -> dict:
  out = dict(unit_masks)
  out[name] = mask
  return out


def round_count(fraction, n) -> jax.Array:
  """``round(fraction x n)`` (int32), half to even, of the decimal ``fraction`` was written as.

  ``fraction`` is traced (a sweep is one ``vmap``), so it arrives as float32, where 0.59 is
  0.58999997 and 0.59 x 50 computes as 29.499998. The float32 product is within ``p 2**-23``
  of the exact one (two roundings of 2**-24); below 2048 a product that close to a half is taken
  as that half (30, as the decimal 29.5 rounds), and a product that is no half is farther from
  one (by at least 0.001 less that error, for a fraction of up to 3 decimals), so the count is
  the decimal's. From 2048 on, the float32 product is rounded as it is: its error there can
  reach a decimal's distance from a half."""
  p = jnp.asarray(fraction, jnp.float32) * jnp.asarray(n).astype(jnp.float32)
  half = jnp.floor(p) + 0.5
  p = jnp.where((jnp.abs(p - half) <= jnp.abs(p) * 2.0 ** -22) & (jnp.abs(p) < 2048.0),
                half, p)
  return jnp.round(p).astype(jnp.int32)


def check_fraction(name: str, value) -> None:
  """Raises if a concrete fraction lies outside [0, 1]."""
  if is_concrete(value):
    v = np.asarray(value)
    if np.any(~np.isfinite(v)) or np.any(v < 0) or np.any(v > 1):
      raise ValueError(f"{name} must lie in [0, 1], got {value}.")


def check_activation_shape(acts, group: units_lib.UnitGroup) -> None:
  """Raises unless ``acts`` is (N, ..., units) for ``group``: (N, units), (N, L, units) or
  (N, H, W, units), units last; every position of every pattern is one pattern of the unit
  (no array work)."""
  shape = tuple(jnp.shape(acts))
  if len(shape) < 2 or shape[-1] != group.size:
    raise ValueError(
        f"Activations of shape {shape} do not match group {group.name!r}: it has {group.size} "
        "units, so activations need shape (N, units), (N, L, units) or (N, H, W, units) with "
        f"units last. Get them with model.activations(params, x, {group.name!r}).")


def activation_vectors(acts: jax.Array, group: units_lib.UnitGroup) -> jax.Array:
  """(N, ..., units) activations -> (units, P) with P = N * (positions), unshifted."""
  check_activation_shape(acts, group)
  return jnp.asarray(acts).reshape(-1, group.size).T


def check_finite(name: str, x) -> None:
  """The shared :func:`jaxprune.validate.check_finite`, with the pruners' hint."""
  try:
    validate.check_finite(name, x)
  except ValueError as e:
    raise ValueError(f"{e} Check the model (diverged training?) or the inputs before "
                     "pruning.") from None


def check_finite_slices(params: PyTree, group: units_lib.UnitGroup, slices) -> None:
  """Raises ValueError if a concrete leaf that ``slices`` of ``group`` read holds NaN or
  infinite values (the weights a weight-based pruner ranks units by)."""
  for s in slices:
    validate.check_finite(f"Weight leaf {units_lib.path_str(s.path)} of group {group.name!r}",
                          units_lib.get_path(params, s.path),
                          "repair them (e.g. load the params from before training diverged) "
                          "before pruning.")


def check_floating_writes(params: PyTree, group: units_lib.UnitGroup, paths, rule: str,
                          fix: str) -> None:
  """Raises ValueError if a leaf at ``paths`` (the leaves ``rule`` adds computed values to: a
  folded constant, a redistribution by coefficients, a merged unit's rows) is not floating
  point; an integer leaf would truncate them without a word (sigmoid(0) * w folded as 0) or
  wrap around (int8 codes 88 + 82 stored as -86)."""
  bad = []
  for path in dict.fromkeys(paths):
    dtype = jnp.result_type(units_lib.get_path(params, path))
    if not jnp.issubdtype(dtype, jnp.inexact):
      bad.append(f"{units_lib.path_str(path)} ({dtype})")
  if bad:
    raise ValueError(
        f"Group {group.name!r}: {rule} adds computed values to {', '.join(bad)}, which an "
        "integer leaf would truncate or wrap around (int8: 88 + 82 is -86). Cast the params "
        "to floating point first "
        f"(jax.tree.map(lambda a: a.astype(jnp.float32), params)), or {fix}.")


def consumer_write_paths(group: units_lib.UnitGroup) -> list:
  """The leaves a fold or a redistribution into ``group``'s consumers writes: their kernels
  (the contributions are computed in a kernel's dtype) and their biases."""
  return [p for s in group.consumers for p in (s.path, s.bias) if p is not None]


def check_patterns(shape, sample_weight, what: str) -> None:
  """Raises unless activations of ``shape`` (N, ..., units) hold at least 2 patterns (rows of
  weight > 0 when concrete ``sample_weight`` is given, times the positions of each row): over
  fewer every unit is constant, and every unit would be removed."""
  rows = shape[0]
  if sample_weight is not None and is_concrete(sample_weight):
    rows = int(np.sum(np.asarray(sample_weight) > 0))
  patterns = rows * int(np.prod(shape[1:-1]))
  if patterns < 2:
    raise ValueError(f"{what} {patterns} pattern(s) (with weight > 0): over fewer than 2 every "
                     "unit is constant, so every unit would be removed. Pass the training set "
                     "(at least 2 patterns; many more for angles that mean anything).")


def check_activation_input(acts, group: units_lib.UnitGroup, sample_weight=None, mask=None):
  """The checks an activation pruner makes before any work: shape against ``group``; with
  ``sample_weight``, the weights valid for ``acts``' N patterns; and (on concrete input) the
  activations that take part finite: those of the patterns that count (weight > 0, so padding
  rows may hold anything) and of the kept units (``mask``; masked units never take part, as in
  the jitted cores). Returns the weights as an array (None stays None)."""
  check_activation_shape(acts, group)
  validate.check_not_empty("Activations", acts)
  dtype = getattr(acts, "dtype", None)
  dtype = np.asarray(acts).dtype if dtype is None else dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"Activations are {dtype}, not floating point: pass the activations the "
                    f"model computes, model.activations(params, x, {group.name!r}).")
  w = (None if sample_weight is None else
       validate.check_sample_weight(sample_weight, jnp.shape(acts)[0]))
  check_patterns(jnp.shape(acts), sample_weight, "Activations hold")
  if is_concrete(acts, sample_weight, mask):
    a = np.asarray(acts)
    if sample_weight is not None:
      a = a[np.asarray(sample_weight) > 0]
    if mask is not None:
      a = a[..., np.asarray(mask, bool)]
    check_finite("Activations", a)
    check_norms(a, group)
  return w


def check_norms(a: np.ndarray, group: units_lib.UnitGroup) -> None:
  """Raises ValueError if a unit's activations (concrete, units last) are too large for a
  float32 norm: the sum of their squares overflows, the vector normalises to zero, and every such
  unit would read as a duplicate of the others (the jitted sweeps then set ``invalid``)."""
  if a.size == 0:
    return
  top = float(np.max(np.abs(a)))
  limit = float(np.finfo(np.float32).max)
  if top * top * (a.size // a.shape[-1]) <= limit:   # cannot overflow: the usual case, one pass
    return
  flat = a.reshape(-1, a.shape[-1]).astype(np.float64)
  sums = np.einsum("nu,nu->u", flat, flat)
  over = np.flatnonzero(sums > limit)
  if over.size:
    raise ValueError(f"Activations of {over.size} unit(s) of group {group.name!r} (e.g. unit "
                     f"{int(over[0])}) are too large for float32 (largest |value| {top:.3g}): the "
                     "sum of their squares overflows, so their angles cannot be computed and "
                     "they would all read as duplicates. Rescale the inputs or the weights "
                     "(diverged training?) before pruning.")


def incoming_vectors(params: PyTree, group: units_lib.UnitGroup,
                     acting_later: bool = False) -> jax.Array:
  """Each unit's incoming kernel weights, flattened: (units, fan_in) (conv: in_ch x k x k).

  Producer slices of kind ``'kernel'`` are used; biases and normalisation parameters are left
  out. With ``acting_later`` (weight distinctiveness, which merges units whose vectors agree),
  where the group has a kernel, a ``'scale'`` slice with several numbers per unit is used too:
  a kernel computed from params that acts on the units later (a weight-normed depthwise conv
  after them), so that units whose vectors agree also compute the same (two units with equal
  first kernels read by different weight-normed depthwise kernels were merged).
  """
  parts = []
  kernels = any(s.kind == "kernel" for s in group.producers)
  for s in group.producers:
    leaf = units_lib.get_path(params, s.path)
    if s.kind == "kernel" or (acting_later and kernels and s.kind == "scale"):
      v = units_lib.unit_view(leaf, s)
      v = v.reshape(v.shape[0], -1)
      if s.kind == "kernel" or v.shape[1] > 1:
        parts.append(v)
  if not parts:
    kinds = sorted({s.kind for s in group.producers}) or ["none"]
    raise ValueError(
        f"Group {group.name!r} has no producer kernel slice to take incoming weights from (its "
        f"producer slices are of kind {', '.join(kinds)}). Where the units' kernel is computed "
        "from params (a weight norm, weight standardisation), the raw params are not their "
        "incoming weights and target.explain() names the ops; prune such a group "
        + _other_ways(group) + ".")
  return jnp.concatenate(parts, axis=1)


def _other_ways(group: units_lib.UnitGroup) -> str:
  """The pruners that take ``group`` without its incoming weights, in words."""
  folds = fold_obstacle(group) is None
  ways = [] if group.read_by_products else [
      "from activations (distinctiveness" + ("" if folds else " with constants=False")
      + (", group_redundancy)" if folds else ")")]
  if group.consumers and all(s.kind == "kernel" for s in group.consumers) and (
      not group.read_by_products):
    ways.append("from outgoing weights (weight_distinctiveness(source='outgoing'"
                + ("" if folds else ", constants=False") + "))")
  ways.append("by magnitude (magnitude_prune) or with ga.search")
  return ", ".join(ways[:-1]) + (" or " if len(ways) > 1 else "") + ways[-1]


def outgoing_vectors(params: PyTree, group: units_lib.UnitGroup) -> jax.Array:
  """Each unit's outgoing weights (every consumer slice, flattened and concatenated)."""
  computed = [units_lib.path_str(s.path) for s in group.consumers if s.kind != "kernel"]
  if computed:
    raise ValueError(
        f"Group {group.name!r}: its consumer {computed[0]} is read through a kernel computed "
        "from params (a per-output scale, a merged LoRA: target.explain() names the ops), so "
        "the params' rows are not the units' outgoing weights. Compare the units from their "
        "activations (distinctiveness), their incoming weights "
        "(weight_distinctiveness(source='incoming')), or remove them by importance_prune.")
  parts = [v.reshape(v.shape[0], -1) for v in units_lib.consumer_views(params, group)]
  if not parts:
    raise ValueError(f"Group {group.name!r} has no consumer slice (outgoing weights).")
  return jnp.concatenate(parts, axis=1)


def producer_bias(params: PyTree, group: units_lib.UnitGroup) -> jax.Array:
  """The units' biases (zeros if the group has no producer slice of kind ``'bias'``)."""
  for s in group.producers:
    if s.kind == "bias":
      leaf = units_lib.get_path(params, s.path)
      view = units_lib.unit_view(leaf, s)
      if view.size != group.size:
        raise ValueError(
            f"Group {group.name!r}: each unit's bias at {'/'.join(map(str, s.path))} holds "
            f"{view.size // group.size} numbers (the bias has shape {tuple(leaf.shape)} for "
            f"{group.size} units: one per group of a grouped conv or per channel of a norm "
            "group, say), so a unit with zero "
            "incoming weights has no single constant output act(bias) to fold; pass "
            "constants=False.")
      return view.reshape(group.size)
  return jnp.zeros((group.size,), jnp.float32)


def constant_output(params: PyTree, group: units_lib.UnitGroup) -> jax.Array:
  """What each unit outputs if its incoming kernel is zero: act(bias) (an integer bias is read
  as float32: only the next bias is written)."""
  b = producer_bias(params, group)
  if not jnp.issubdtype(jnp.result_type(b), jnp.inexact):
    b = jnp.asarray(b, jnp.float32)
  return activation_fn(group.activation)(b)


def zero_units(params: PyTree, group: units_lib.UnitGroup, keep: jax.Array,
               slices=None) -> PyTree:
  """Zeroes every slice (producer and consumer; or those in ``slices``) of the units with
  ``keep`` False."""
  out = params
  for s in (group.slices if slices is None else slices):
    leaf = units_lib.get_path(out, s.path)
    m = units_lib._mask_like(keep, jnp.shape(leaf), s)
    out = units_lib.set_path(out, s.path, jnp.where(m, leaf, jnp.zeros((), leaf.dtype)))
  return out


def other_unit_masks(unit_masks: Mapping[str, Any], group: units_lib.UnitGroup,
                     groups: Mapping[str, units_lib.UnitGroup]) -> dict:
  """The unit masks of the groups named in ``unit_masks`` other than ``group`` (bool (units,);
  host masks stay NumPy, so nothing is compiled or run outside the pruner's program)."""
  out = {}
  for name, m in unit_masks.items():
    if name != group.name:
      m = units_lib.unit_mask(m, groups[name], np)
      if not (isinstance(m, np.ndarray) and m.all()):   # a concrete mask that keeps every
        out[name] = m                                    # unit zeroes nothing: left out
  return out


def zero_other_units(params: PyTree, groups: Mapping[str, units_lib.UnitGroup],
                     others: Mapping[str, jax.Array]) -> PyTree:
  """``params`` with the removed units of every group in ``others`` zeroed (as ``expand`` +
  ``apply_masks`` would): a loss or an activation of them is that of the network the unit
  masks describe, not of the unmasked params."""
  for name, m in others.items():
    params = zero_units(params, groups[name], m)
  return params


def masked_network(params: PyTree, groups: Mapping[str, units_lib.UnitGroup],
                   group: units_lib.UnitGroup, mask: jax.Array,
                   others: Mapping[str, jax.Array]) -> PyTree:
  """The params as the network the masks describe, for a pruner of ``group`` to read: every
  other group's removed units zeroed (``others``), and ``group``'s own (``mask``) where a leaf
  both produces and reads it (``h + tanh(h @ w1)``: rows of its removed units among its kept
  units' weights); elsewhere the pruner ignores its removed units' vectors, so nothing more
  is compiled for the common case."""
  params = zero_other_units(params, groups, others)
  own = own_slices(group)
  return zero_units(params, group, mask, own) if own else params


def own_slices(group: units_lib.UnitGroup) -> list:
  """The slices of ``group`` on leaves that both produce and read it (``h + tanh(h @ w1)``, a
  recurrence): only there do rows of its removed units sit among its kept units' weights
  (elsewhere a pruner ignores removed units' vectors)."""
  own = {s.path for s in group.producers} & {s.path for s in group.consumers}
  return [s for s in group.slices if s.path in own]


def scale_rows(v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(v with each row times 2**-e, e)``: ``e`` per row, the power of two that brings the row's
  largest ``|entry|`` to [0.5, 1).

  Exact, so norms and angles of the scaled rows are those of the rows wherever their float
  squares neither underflow nor overflow, and rows of entries near 1e-20 or 1e19 and more,
  whose float32 squares would flush to zero or overflow to inf, measure like the same rows at
  unit scale. Zero rows, and rows of subnormal entries only (XLA flushes them, they read as
  zero), keep ``e = 0``; rows holding inf or NaN stay so.
  """
  top = jnp.max(jnp.abs(v), axis=1, keepdims=True)
  _, e = jnp.frexp(top)
  e = jnp.where(top >= jnp.finfo(v.dtype).tiny, e, 0)
  return jnp.ldexp(v, -e), e[:, 0]

