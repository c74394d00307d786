"""Magnitude-percentile pruning (Dixit) and random pruning with the same counts.

Unstructured weight masks: of the weights still kept in scope, the ``round(fraction x
remaining)`` with the smallest ``|w|`` are removed, so repeated calls prune a fraction of what is
left (like ``torch.nn.utils.prune``). Scope is each selected layer on its own (``'layer'``) or all
selected layers together (``'global'``). By default every floating-point leaf with ``ndim >= 2``
is pruned (integer buffers such as index tables are not),
whatever it is named (flax ``kernel``, haiku ``w``, a plain dict, an nnx ``State``); biases and
normalisation parameters are left alone: vectors, and any leaf named ``bias``, ``scale``,
``mean``, ``var`` or ``offset`` (a ``DenseGeneral``'s bias is 2-D).

These are the *weight-mask family* of pruners: they act on weight masks (a bool pytree like the
params), not on unit masks, and take no pruning target. Like the structured pruners they return
``(params, masks, report)``: the params with every masked weight zeroed, the new masks, and a
:class:`MagnitudeReport` (per-leaf kept and removed counts, the cut, the total removed).

Counts are exact: the cut is found by an exact two-pass radix select on the bit patterns of
``|w|`` (no sort), and ties at the cut are broken by position (lower flat index, in tree order,
is removed first). ``round`` is round-half-to-even on ``fraction * remaining`` in float32.

Example:
  >>> import jax, jaxprune
  >>> from jaxprune.pruners import magnitude_prune
  >>> model = jaxprune.MLP(in_features=10, hidden=(20,), out_features=7)
  >>> params = model.init(jax.random.key(0))
  >>> params, wmask, report = magnitude_prune(params, None, 0.5)
  >>> int(wmask['params']['hidden_0']['kernel'].sum())
  100
  >>> report.kept.tolist(), int(report.count)
  ([100, 70], 170)
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import masks as masks_lib
from jaxprune import units as units_lib
from jaxprune import validate
from jaxprune.pruners import _common

PyTree = Any



class MagnitudeReport(NamedTuple):
  """What :func:`magnitude_prune` or :func:`random_prune` did, per selected leaf.

  The leaves are the selected ones in ``jax.tree.leaves`` order (:func:`select_leaves` gives
  their indices and ``leaf_names`` their names).

  Attributes:
    kept: (L,) int32 weights kept in each selected leaf after this call.
    removed: (L,) int32 weights removed from each selected leaf by this call.
    threshold: (L,) float32 (float64 when a scored leaf is float64, under x64) the cut: the largest score (``|w|``, or the random score) removed
      in the leaf's scope (with ``scope='global'`` one value shared by every leaf); every kept
      weight in scope scores ``>= threshold`` (equal only where ties were broken by position).
      NaN where the scope removed nothing.
    count: () int32 weights removed in all.
    invalid: () bool, True if the input was bad under ``jit``/``vmap`` (a traced fraction
      outside [0, 1] or NaN; NaN or infinite weights to rank): nothing was removed. On
      concrete values bad input raises instead.
  """

  kept: jax.Array
  removed: jax.Array
  threshold: jax.Array
  count: jax.Array
  invalid: jax.Array


_HI_BITS = 16  # first pass: bits 30..15 of the float32 pattern; second pass: bits 14..0
_LO = 15
# Up to this many weights the selection is one sort rather than two histogram passes: the same
# weights removed (both take the k smallest, ties to the lower flat index), and a program that
# XLA:CPU compiles in about 0.1 s instead of 0.8 s (the first call of a small network's pruner
# is its compilation); the histograms scale to millions of weights.
_SORT_MAX = 1 << 15


def _key_name(k) -> str:
  key = units_lib.key_of(k)
  return str(k) if key is None else str(key)


def _leaf_paths(params) -> list[tuple[str, ...]]:
  """Each leaf's path as a tuple of key names (an nnx ``Variable``'s trailing ``value``
  attribute is dropped, so an nnx ``State`` and its pure dict have the same paths)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  out = []
  for path, _ in flat:
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
      path = path[:-1]
    out.append(tuple(_key_name(k) for k in path))
  return out


def leaf_names(params) -> list[str]:
  """``'a/b/c'`` names of every leaf, in ``jax.tree.leaves`` order."""
  return ["/".join(p) for p in _leaf_paths(params)]


# Leaf names that are never weights, whatever their rank: biases (a DenseGeneral's or an
# attention layer's bias is 2-D) and normalisations' params.
NOT_WEIGHTS = frozenset(("bias", "scale", "mean", "var", "offset"))


def select_leaves(params: PyTree, select=None) -> tuple[int, ...]:
  """Indices (in ``jax.tree.leaves`` order) of the leaves to prune.

  Args:
    params: the params pytree.
    select: None (every floating-point leaf with ``ndim >= 2``: kernels and weight matrices,
      not biases or norm scales, not integer buffers such as index tables, and not a leaf
      named in ``NOT_WEIGHTS``, like a ``DenseGeneral``'s 2-D ``bias``), a predicate
      ``select(path, leaf) -> bool`` with ``path`` a tuple of keys, a sequence of paths
      (tuples or ``'a/b/c'`` strings), or one ``'a/b/c'`` string.
  """
  if hasattr(params, "groups"):   # a model or traced target where params belong
    raise TypeError(f"Got a pruning target ({type(params).__name__}) where params belong: "
                    "magnitude and random pruning take the params pytree first, e.g. "
                    "magnitude_prune(params, masks, fraction).")
  paths = _leaf_paths(params)
  leaves = jax.tree.leaves(params)
  if select is None:
    chosen = [i for i, (p, l) in enumerate(zip(paths, leaves))
              if jnp.ndim(l) >= 2 and jnp.issubdtype(jnp.result_type(l), jnp.floating)
              and not (p and str(p[-1]) in NOT_WEIGHTS)]
  elif callable(select):
    chosen = [i for i, (p, l) in enumerate(zip(paths, leaves)) if select(p, l)]
  else:
    if isinstance(select, str):   # one 'a/b/c' path, not a list of one-letter paths
      select = [select]
    want = [tuple(s.split("/")) if isinstance(s, str) else tuple(str(k) for k in s)
            for s in select]                   # keys compare as names: ('layers', 0, 'kernel')
    index = {p: i for i, p in enumerate(paths)}
    missing = [w for w in want if w not in index]
    if missing:
      raise KeyError(f"No parameter at {['/'.join(m) for m in missing]}; available leaves: "
                     f"{['/'.join(p) for p in paths]}.")
    chosen = sorted(index[w] for w in want)
  if not chosen:
    raise ValueError("The selection picks no parameter leaf to prune (by default: floating-point "
                     "leaves with ndim >= 2); pass select= (a predicate or a list of paths).")
  return tuple(chosen)


def _bits(scores: jax.Array) -> jax.Array:
  """Non-negative scores -> bit patterns with the same order: int32 (float32 and narrower
  scores), int64 for float64 scores (under ``jax_enable_x64``; a float32 cast would tie weights
  that differ beyond float32 precision). Patterns of both widths are ranked together by
  :func:`_remove_smallest_and_cut`, which widens the int32 ones (:func:`_float64_bits`)."""
  if jnp.iscomplexobj(scores):   # |w| is the modulus: a float cast would keep the real part
    scores = jnp.abs(scores)
  if jnp.asarray(scores).dtype == jnp.float64:
    return jax.lax.bitcast_convert_type(jnp.abs(scores), jnp.int64)
  return jax.lax.bitcast_convert_type(jnp.abs(scores.astype(jnp.float32)), jnp.int32)


def _float64_bits(bits: jax.Array) -> jax.Array:
  """Float32 bit patterns (int32, sign bit clear) -> the float64 patterns (int64) of the same
  values, so that they compare with float64 patterns; int64 patterns come back as they are.

  Integer arithmetic, not a float conversion (which flushes subnormals to zero on some
  backends): rebias the exponent (127 -> 1023) and shift the mantissa (23 -> 52 bits); a
  subnormal's mantissa is normalised at its highest set bit; inf and NaN keep exponent 2047.
  """
  if bits.dtype == jnp.int64:
    return bits
  b = bits.astype(jnp.int64)
  exp, man = b >> 23, b & 0x7FFFFF
  rebias = jnp.where(exp == 255, jnp.int64(2047 - 255), jnp.int64(1023 - 127))
  normal = (b << 29) + (rebias << 52)
  top = jnp.maximum(63 - jax.lax.clz(man), 0)          # highest set bit of a subnormal
  subnormal = ((top + (1023 - 149)) << 52) | ((man - (jnp.int64(1) << top)) << (52 - top))
  return jnp.where(exp > 0, normal, jnp.where(man > 0, subnormal, jnp.int64(0)))


def _remove_smallest(bits: list[jax.Array], keep: list[jax.Array], k: jax.Array):
  """Removal masks for exactly ``k`` of the kept entries with the smallest bit patterns.

  Ties at the cut go to the lower flat index (leaves concatenated in order).
  """
  return _remove_smallest_and_cut(bits, keep, k)[0]


def _remove_smallest_and_cut(bits: list[jax.Array], keep: list[jax.Array], k: jax.Array):
  """:func:`_remove_smallest` and the cut: the largest removed score (NaN if k == 0)."""
  if any(b.dtype == jnp.int64 for b in bits) or sum(b.size for b in bits) <= _SORT_MAX:
    return _remove_smallest_sorted(bits, keep, k)
  nb1, nb2 = 1 << _HI_BITS, 1 << _LO
  hist1 = sum(jnp.bincount(jnp.where(m, b >> _LO, nb1).reshape(-1), length=nb1 + 1)[:nb1]
              for b, m in zip(bits, keep))
  cum1 = jnp.cumsum(hist1)
  b1 = jnp.searchsorted(cum1, k, side="left").astype(jnp.int32)
  b1 = jnp.minimum(b1, nb1 - 1)
  r1 = k - (cum1[b1] - hist1[b1])
  hist2 = sum(jnp.bincount(jnp.where(m & ((b >> _LO) == b1), b & (nb2 - 1), nb2).reshape(-1),
                           length=nb2 + 1)[:nb2] for b, m in zip(bits, keep))
  cum2 = jnp.cumsum(hist2)
  b2 = jnp.minimum(jnp.searchsorted(cum2, r1, side="left").astype(jnp.int32), nb2 - 1)
  r2 = r1 - (cum2[b2] - hist2[b2])
  cut = (b1 << _LO) | b2
  n_eq = hist2[b2]

  def all_ties(_):
    return [m & (b <= cut) for b, m in zip(bits, keep)]

  def some_ties(_):
    out, offset = [], jnp.zeros((), jnp.int32)
    for b, m in zip(bits, keep):
      eq = (m & (b == cut)).reshape(-1)
      rank = offset + jnp.cumsum(eq, dtype=jnp.int32)
      out.append((m & (b < cut)) | (eq & (rank <= r2)).reshape(b.shape))
      offset = offset + jnp.sum(eq, dtype=jnp.int32)
    return out

  removed = jax.lax.cond(r2 == n_eq, all_ties, some_ties, None)
  cut_value = jnp.where(k > 0, jax.lax.bitcast_convert_type(cut, jnp.float32), jnp.nan)
  return [r & (k > 0) for r in removed], cut_value


def _remove_smallest_sorted(bits: list[jax.Array], keep: list[jax.Array], k: jax.Array):
  """:func:`_remove_smallest_and_cut` by one sort on (not kept, bits, flat index): for 64-bit
  patterns, where two 16-bit histogram passes do not reach every bit, and for few weights
  (``_SORT_MAX``). Float32 patterns among 64-bit ones (leaves of other float dtypes in a global
  scope) are first widened to the float64 patterns of the same values: compared as raw integers
  of different widths, every float32 weight would rank below every float64 one."""
  wide = any(b.dtype == jnp.int64 for b in bits)
  flat = jnp.concatenate([(_float64_bits(b) if wide else b).reshape(-1) for b in bits])
  kept = jnp.concatenate([m.reshape(-1) for m in keep])
  index = jnp.arange(flat.shape[0], dtype=jnp.int32)
  order = jax.lax.sort((~kept, flat, index), num_keys=3)[-1]
  rank = jnp.zeros_like(index).at[order].set(index)
  removed = kept & (rank < k)
  cut = (flat[order[jnp.clip(k - 1, 0, flat.shape[0] - 1)]] if flat.size else
         jnp.zeros((), flat.dtype))   # no weight (a size-0 leaf): nothing removed, no cut
  cut_value = jnp.where(k > 0, jax.lax.bitcast_convert_type(
      cut, jnp.float64 if wide else jnp.float32), jnp.nan)
  out, start = [], 0
  for b in bits:
    out.append(removed[start:start + b.size].reshape(b.shape))
    start += b.size
  return out, cut_value


def _n_remove(fraction, remaining, valid):
  # Bad traced input (a fraction outside [0, 1] or NaN, non-finite scores) cannot raise: it
  # removes nothing and sets report.invalid, as the distinctiveness and redundancy pruners do.
  # float32(remaining) rounds above 2**24 weights: a fraction of 1 removes every one exactly,
  # and no count exceeds what is left.
  fraction = jnp.asarray(fraction, jnp.float32)
  n = _common.round_count(fraction, remaining)
  n = jnp.where(fraction == 1, remaining, jnp.minimum(n, remaining))
  return jnp.where(valid, n, 0)


@functools.partial(jax.jit, static_argnames=("shapes",))
def _uniform_scores(key, *, shapes):
  """One uniform [0, 1) score array per selected leaf (compiled apart from the mask-making, so
  random and magnitude pruning share one compiled ``_core``)."""
  keys = jax.random.split(key, len(shapes))
  # float32 draws (under x64 too: a key gives the masks it gives without x64)
  return [jax.random.uniform(kk, shape, jnp.float32) for kk, shape in zip(keys, shapes)]


def _threshold_dtype(scores):
  """float32, or float64 when a score is float64: a float64 cut rounded to float32 can exceed
  the kept weights just above it (1 - 5e-13 kept, the cut shown as 1.0)."""
  real = [jnp.finfo(s.dtype).dtype if jnp.iscomplexobj(s) else s.dtype for s in scores]
  return functools.reduce(jnp.promote_types, real, jnp.float32)


def _widen(cut: jax.Array, dtype) -> jax.Array:
  """A float32 cut in ``dtype`` (float64 under x64 when a leaf is): widened through its bits
  (:func:`_float64_bits`), since a float conversion flushes a subnormal cut to 0 on CPU."""
  if cut.dtype == dtype or dtype != jnp.float64:
    return cut.astype(dtype)
  bits = jax.lax.bitcast_convert_type(cut, jnp.int32)
  wide = jax.lax.bitcast_convert_type(_float64_bits(bits & 0x7FFFFFFF), jnp.float64)
  return jnp.where(jnp.isnan(cut), jnp.nan, wide)


@functools.partial(jax.jit, static_argnames=("selected", "scope"))
def _core(params, scores, weight_masks, fraction, *, selected, scope):
  """Masks removing the smallest ``scores`` (one array per selected leaf), masked params, and
  the number of non-finite scores (checked by the caller; counted here, in the same pass)."""
  leaves, treedef = jax.tree.flatten(params)
  if weight_masks is None:  # all-keep masks built inside the program, not op by op
    weight_masks = masks_lib.ones_like(params)
  mleaves = jax.tree.leaves(weight_masks)
  keep = [mleaves[i] for i in selected]
  # only the weights still kept are ranked: a NaN the masks already remove is zeroed below
  n_bad = sum(jnp.sum(~jnp.isfinite(s) & m, dtype=jnp.int32) for s, m in zip(scores, keep))
  valid = (fraction >= 0) & (fraction <= 1) & (n_bad == 0)
  bits = [_bits(s) for s in scores]
  if scope == "global":
    remaining = sum(jnp.sum(m, dtype=jnp.int32) for m in keep)
    removed, cut = _remove_smallest_and_cut(bits, keep, _n_remove(fraction, remaining, valid))
    cuts = [cut] * len(keep)
  else:
    pairs = [_remove_smallest_and_cut([b], [m], _n_remove(fraction, jnp.sum(m, dtype=jnp.int32),
                                                          valid))
             for b, m in zip(bits, keep)]
    removed, cuts = [p[0][0] for p in pairs], [p[1] for p in pairs]
  new_m = list(mleaves)
  for i, r in zip(selected, removed):
    new_m[i] = mleaves[i] & ~r
  new_masks = jax.tree.unflatten(treedef, new_m)
  n_removed = jnp.stack([jnp.sum(r, dtype=jnp.int32) for r in removed])
  report = MagnitudeReport(
      kept=jnp.stack([jnp.sum(new_m[i], dtype=jnp.int32) for i in selected]),
      removed=n_removed,
      threshold=jnp.stack([_widen(c, _threshold_dtype(scores)) for c in cuts]),
      count=jnp.sum(n_removed), invalid=~valid)
  return masks_lib.apply_masks(params, new_masks), new_masks, report, n_bad


def _check_fraction_value(fraction) -> None:
  """Raises unless ``fraction`` is one real number (concrete: in [0, 1]); a sequence of
  fractions is a sweep, which is a ``jax.vmap``."""
  validate.check_real_scalar(
      "fraction", fraction, "a real number in [0, 1] (the share of the remaining weights to "
      "remove)", "to prune at several fractions, vmap over them: jax.vmap(lambda f: "
      "magnitude_prune(params, masks, f))(fractions).")
  _common.check_fraction("fraction", fraction)


def check_integer_scores(named_leaves, what: str = "Magnitude pruning") -> None:
  """Scores are ranked by their float32 values, exact for integers up to 2**24: a concrete leaf
  of an integer type of more than 16 bits (chosen with ``select=``, or scores of one) is refused
  when its values go beyond that (16777217 would rank as 16777216). Traced values cannot be
  read, and are ranked as their float32 values.

  Args:
    named_leaves: ``(name, leaf)`` pairs of the selected leaves.
    what: who ranks, for the message.
  """
  wide = []
  for name, leaf in named_leaves:
    dtype = getattr(leaf, "dtype", None)
    dtype = np.result_type(leaf) if dtype is None else dtype   # (int64 named as it is)
    if (not jnp.issubdtype(dtype, jnp.integer) or jnp.dtype(dtype).itemsize <= 2
        or isinstance(leaf, jax.core.Tracer)):
      continue
    if np.size(leaf) and np.max(np.abs(np.asarray(leaf).astype(np.float64))) > 2.0 ** 24:
      wide.append(f"{name} ({dtype})")
  if wide:
    raise ValueError(
        f"{what} ranks weights by their float32 values, exact for integers up to 2**24, and "
        f"these integer leaves hold larger values: {', '.join(wide)}. Cast them to a float "
        "type (float64 under jax_enable_x64 for larger values) or leave them out of select=.")


def _prune(params, weight_masks, fraction, key, scope, select, random):
  moved = masks_lib.on_one_device(params, weight_masks)
  if moved is not None:   # leaves placed by hand on several devices: ranked on one
    p, m, report = _prune(*moved, fraction, key, scope, select, random)
    return (*masks_lib.placed_like((p, m), (params, params)), report)
  if scope not in ("layer", "global"):
    raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}.")
  _check_fraction_value(fraction)
  if weight_masks is not None:
    masks_lib.check_weight_masks(params, weight_masks)
  selected = select_leaves(params, select)
  leaves = jax.tree.leaves(params)
  if random:
    if key is None:
      key = jax.random.key(0)
    scores = _uniform_scores(key, shapes=tuple(tuple(jnp.shape(leaves[i])) for i in selected))
  else:
    scores = [leaves[i] for i in selected]
    names = leaf_names(params)
    check_integer_scores([(names[i], leaves[i]) for i in selected])
  # A concrete fraction goes in as a NumPy float32 (the same value and dtype that
  # ``jnp.asarray(fraction, jnp.float32)`` gives, without compiling a conversion program).
  fraction = (jnp.asarray(fraction, jnp.float32) if isinstance(fraction, jax.core.Tracer)
              else np.asarray(fraction, np.float32))
  new_params, new_masks, report, n_bad = _core(params, scores, weight_masks, fraction,
                                               selected=selected, scope=scope)
  if _common.is_concrete(n_bad) and int(n_bad):
    raise ValueError(f"Parameters hold {int(n_bad)} NaN or infinite values where the masks "
                     "keep weights in the leaves to prune; magnitudes are undefined there. Fix "
                     "the params, remove those weights with the masks, or exclude those leaves "
                     "with select=.")
  return new_params, new_masks, report


def magnitude_prune(params: PyTree, weight_masks: PyTree | None = None, fraction=0.2, *,
                    scope: str = "layer", select: Sequence | Callable | None = None):
  """Removes the ``round(fraction x remaining)`` smallest-magnitude kept weights.

  Args:
    params: the params pytree.
    weight_masks: current weight masks (bool pytree like ``params``), or None for all-True.
    fraction: traced, in [0, 1]: the fraction of the *remaining* weights in scope to remove.
    scope: ``'layer'`` (each selected leaf on its own) or ``'global'`` (all together).
    select: which leaves to prune; see :func:`select_leaves` (default: every floating-point
      leaf with ``ndim >= 2``).

  Returns:
    ``(params, weight_masks, MagnitudeReport)``: params with every masked weight zeroed, the
    new masks, and the per-leaf counts and cut (see :class:`MagnitudeReport`); leaves placed
    by hand on different devices are ranked on the first leaf's device and returned where they
    were. Jit-compiled; a new fraction does not recompile. Bad fractions raise ValueError (on
    concrete values); NaN or infinite weights raise ValueError. Under ``jit``/``vmap`` a
    traced fraction outside [0, 1] (or NaN), or NaN or infinite weights, cannot raise: nothing
    is removed (the masks come back unchanged) and ``report.invalid`` is True, as with the
    distinctiveness and redundancy pruners.
  """
  return _prune(params, weight_masks, fraction, None, scope, select, random=False)


def random_prune(params: PyTree, weight_masks: PyTree | None = None, fraction=0.2, *,
                 key: jax.Array, scope: str = "layer",
                 select: Sequence | Callable | None = None):
  """Like :func:`magnitude_prune` with uniformly random scores: the same counts, random weights.

  The baseline of the lottery-ticket experiment. ``key`` is a ``jax.random.key``.
  """
  validate.check_key(key, single="random_prune")
  return _prune(params, weight_masks, fraction, key, scope, select, random=True)
