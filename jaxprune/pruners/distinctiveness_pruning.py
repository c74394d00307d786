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

The returned params are the merged params with every removed unit's slices (producer and
consumer) set to zero, so ``model.apply(new_params, x)`` already computes the pruned network.

Example:
  >>> import jax, jaxprune
  >>> from jaxprune.pruners import distinctiveness
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
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import units as units_lib
from jaxprune.pruners import _common

PyTree = Any

NONE, SIMILAR, COMPLEMENTARY, CONSTANT = 0, 1, 2, 3
KIND_NAMES = {SIMILAR: "similar", COMPLEMENTARY: "complementary", CONSTANT: "constant"}


class SweepReport(NamedTuple):
  """What one sweep did; fixed-size arrays so it can leave ``jit``/``vmap``.

  Entries ``[:count]`` are the actions in the order they were applied.

  Attributes:
    first: (units,) int32. Similar: the kept unit (the lower index; with ``absorb`` an existing
      keeper, whatever its index). Complementary: the lower index.
      Constant: the removed unit. -1 past ``count``.
    second: (units,) int32. Similar: the removed unit. Complementary: the higher index (with
      ``fold`` the only one removed). Constant: -1.
    angle: (units,) float32 degrees (NaN for constants and past ``count``).
    kind: (units,) int32: 1 similar, 2 complementary, 3 constant, 0 past ``count``.
    count: () int32 number of actions.
    min_angle: () float32, smallest angle between two units kept after the sweep (NaN if fewer
      than two kept units have an angle).
    max_angle: () float32, largest such angle.
    kept_last: () bool, True if the sweep would have removed every unit and one was kept.
    invalid: () bool, True if the input was bad under ``jit`` (NaN activations, thresholds
      outside [0, 180] or ``similar_deg >= complementary_deg``): nothing was changed.
    folded: () bool, True if complementary pairs were folded (only ``second`` removed).
  """

  first: jax.Array
  second: jax.Array
  angle: jax.Array
  kind: jax.Array
  count: jax.Array
  min_angle: jax.Array
  max_angle: jax.Array
  kept_last: jax.Array
  invalid: jax.Array
  folded: jax.Array


def report_actions(report: SweepReport) -> list[dict]:
  """Host-side: the report's actions as a list of dicts (for one, un-vmapped, report).

  Each dict has ``kind`` ('similar', 'complementary' or 'constant'), ``kept`` (tuple of unit
  indices kept by the action), ``removed`` (tuple of indices removed) and ``angle`` (degrees,
  None for constants).
  """
  r = jax.tree.map(np.asarray, report)
  if r.count.ndim:
    raise ValueError("report_actions takes one report; index a vmapped report first, e.g. "
                     "jax.tree.map(lambda a: a[k], report).")
  out = []
  for n in range(int(r.count)):
    kind, i, j = int(r.kind[n]), int(r.first[n]), int(r.second[n])
    if kind == SIMILAR:
      kept, removed = (i,), (j,)
    elif kind == COMPLEMENTARY:
      kept, removed = ((i,), (j,)) if bool(r.folded) else ((), (i, j))
    else:
      kept, removed = (), (i,)
    out.append({"kind": KIND_NAMES[kind], "kept": kept, "removed": removed,
                "angle": None if kind == CONSTANT else float(r.angle[n])})
  return out


# ----------------------------------------------------------------------------- angles


@jax.jit
def pairwise_angles(vectors: jax.Array) -> jax.Array:
  """Angles in degrees between the rows of ``vectors`` (units, dim); NaN for zero rows.

  Stable everywhere: rows are normalised, and the angle is
  ``2 * atan2(|u - v|, |u + v|)`` with the squared norms taken from the Gram matrix, so exact
  duplicates give exactly 0 and exact opposites exactly 180.
  """
  v = jnp.asarray(vectors, jnp.float32)
  zero = jnp.linalg.norm(v, axis=1) == 0
  ang = _angle_matrix(*_gram(v))
  return jnp.where(zero[:, None] | zero[None, :], jnp.nan, ang)


def _angle_matrix(g, d):
  """Symmetric (units, units) angles from the Gram matrix g and its diagonal d: the upper
  triangle mirrored, so (i, j) and (j, i) are the same float32 value."""
  ang = _angle(*_pair_terms(g, d[:, None], d[None, :]))
  idx = jnp.arange(g.shape[0])
  return jnp.where(idx[:, None] < idx[None, :], ang, ang.T)


def _gram(v):
  """Gram matrix of the normalised rows of v, and its diagonal."""
  n = jnp.linalg.norm(v, axis=1)
  u = v / jnp.where(n > 0, n, 1.0)[:, None]
  g = jnp.matmul(u, u.T, precision=jax.lax.Precision.HIGHEST)
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


# ----------------------------------------------------------------------------- the sweep


_FREE, _KEEPER, _USED = 0, 1, 2  # a unit's state during the sweep


def _pair_key(excess, is_sim):
  """uint32 keys ordering pairs by excess (descending), then similar before complementary.

  ``excess > 0`` is a finite float32, whose bit pattern is increasing in its value; one more bit
  for the kind. Comparing two keys is comparing (excess, kind) in the sweep's order; 0 means no
  pair.
  """
  bits = jax.lax.bitcast_convert_type(excess, jnp.uint32)
  return (bits << 1) | is_sim.astype(jnp.uint32)


def _key_excess(key):
  """The excess (float32) and the similar flag of a key made by ``_pair_key``."""
  return jax.lax.bitcast_convert_type(key >> 1, jnp.float32), (key & 1) == 1


_MIN_PHASE = 64  # compaction stops halving the working set below this many units


def _rounds(ang, state, sim, comp, *, use_similar, use_comp, absorb):
  """The greedy sweep as parallel rounds of locally dominant pairs (exact; see module doc).

  Each round, every free unit finds its best live partner (one masked row reduction over the
  angle matrix); pairs that are each other's best are taken together, and with ``absorb`` a
  free unit whose best partner is already a keeper is absorbed by it. The loop ends when a
  round takes nothing, which happens only when no live qualifying pair is left.

  The units still in play shrink quickly (often by half a round), so the rounds run in phases
  on working sets of h, h/2, h/4, ... units: when the units in play fit in the next size, their
  rows and columns are gathered (in index order, so ties still go to the lower index) and the
  rounds go on on that smaller matrix. The first phase reads ``ang`` itself (under ``vmap`` over
  thresholds it is shared, not copied); later phases gather a (size, size) block per threshold.

  Args:
    ang: (h, h) float32 symmetric angles (degrees).
    state: (h,) int32 initial states: ``_FREE`` for units that may take part, else ``_USED``.
    sim, comp: the thresholds; use_similar, use_comp, absorb: (traced) bools.

  Returns:
    ``(first, second, kind, angle, excess)``, (h,) each, one slot per unit: slot u holds the
    action that removed u (for a complementary pair, the higher index), with ``kind`` 0 in
    slots without one. Similar: ``first`` kept, ``second`` removed (= u). Complementary:
    ``first`` the lower index.
  """
  h = ang.shape[0]
  sizes = [h]
  while sizes[-1] // 2 >= _MIN_PHASE:
    sizes.append(sizes[-1] // 2)
  first = jnp.full((h,), -1, jnp.int32)
  kind = jnp.zeros((h,), jnp.int32)
  angle = jnp.full((h,), jnp.nan, jnp.float32)
  excess = jnp.zeros((h,), jnp.float32)
  took = jnp.asarray(True)
  for n, size in enumerate(sizes):
    nxt = sizes[n + 1] if n + 1 < len(sizes) else 0
    if size == h:
      where, sub, sub_state = jnp.arange(h, dtype=jnp.int32), ang, state
    else:  # the units in play, in index order, padded with h (nothing) to `size`
      in_play = (state == _FREE) | (absorb & (state == _KEEPER))
      where = jnp.argsort(~in_play, stable=True)[:size].astype(jnp.int32)
      where = jnp.where(in_play[where], where, h)
      safe = jnp.minimum(where, h - 1)
      sub = ang[safe[:, None], safe[None, :]]
      sub_state = jnp.where(where < h, state[safe], _USED)
    s_state, s_first, s_kind, s_angle, s_ex, took = _phase(
        sub, sub_state, took, nxt, sim, comp, use_similar=use_similar, use_comp=use_comp,
        absorb=absorb)
    # Back to unit indices (padding slots write nowhere).
    state = state.at[where].set(s_state, mode="drop")
    dst = jnp.where(s_kind > 0, where, h)
    first = first.at[dst].set(jnp.where(s_first >= 0, where[jnp.maximum(s_first, 0)], -1),
                              mode="drop")
    kind = kind.at[dst].set(s_kind, mode="drop")
    angle = angle.at[dst].set(s_angle, mode="drop")
    excess = excess.at[dst].set(s_ex, mode="drop")
  idx = jnp.arange(h, dtype=jnp.int32)
  second = jnp.where(kind > 0, idx, -1)
  return first, second, kind, angle, excess


def _phase(ang, state, took, stop_at, sim, comp, *, use_similar, use_comp, absorb):
  """Rounds on one working set until a round takes nothing or at most ``stop_at`` units are
  left in play; returns the new states, the records (local indices) and whether the last
  round took a pair."""
  h = ang.shape[0]
  idx = jnp.arange(h, dtype=jnp.int32)
  off_diag = idx[:, None] != idx[None, :]

  def col_keys(state):
    """(h, h) keys: column u holds the live qualifying pairs (v, u) of each free unit u (0
    elsewhere). Columns, not rows: reducing over the major axis is an elementwise max of
    contiguous rows, several times faster on CPU (the matrix is symmetric)."""
    free = state == _FREE
    avail = free | (absorb & (state == _KEEPER))  # similar partners: absorb lets keepers in
    ex_s, ex_c = sim - ang, ang - comp
    qs = use_similar & (ex_s > 0)
    qc = use_comp & (ex_c > 0) & ~qs
    key = jnp.where(qs & avail[:, None], _pair_key(ex_s, jnp.asarray(True)),
                    jnp.where(qc & free[:, None], _pair_key(ex_c, jnp.asarray(False)),
                              jnp.uint32(0)))
    return jnp.where(free[None, :] & off_diag, key, jnp.uint32(0))

  def in_play(state):
    return jnp.sum((state == _FREE) | (absorb & (state == _KEEPER)), dtype=jnp.int32)

  def cond(carry):
    return carry[-1] & (in_play(carry[0]) > stop_at)

  def body(carry):
    state, first, kind, angle, excess, _ = carry
    key = col_keys(state)
    best_key = jnp.max(key, axis=0)
    # The best partner: the best key, ties to the lower index (which is the lower (i, j)).
    best = jnp.min(jnp.where(key == best_key[None, :], idx[:, None], h), axis=0)
    has = best_key > 0
    b = jnp.where(has, best, 0)
    to_keeper = has & (state[b] == _KEEPER)  # absorbed by an existing keeper (absorb only)
    mutual = has & (state[b] == _FREE) & (best[b] == idx) & has[b]
    ex, is_sim = _key_excess(best_key)
    # Slot u records the action that removes u: absorbed, or the higher index of a mutual pair.
    rec = to_keeper | (mutual & (idx > b))
    state = jnp.where(to_keeper | (mutual & ~(is_sim & (idx < b))), _USED,
                      jnp.where(mutual, _KEEPER, state))
    first = jnp.where(rec, b, first)
    kind = jnp.where(rec, jnp.where(is_sim, SIMILAR, COMPLEMENTARY), kind)
    angle = jnp.where(rec, ang[idx, b], angle)
    excess = jnp.where(rec, ex, excess)
    return state, first, kind, angle, excess, jnp.any(rec)

  init = (state, jnp.full((h,), -1, jnp.int32), jnp.zeros((h,), jnp.int32),
          jnp.full((h,), jnp.nan, jnp.float32), jnp.zeros((h,), jnp.float32), took)
  return jax.lax.while_loop(cond, body, init)


def _map_when_batched(fn):
  """``fn`` (array arguments only) whose ``vmap`` runs as a loop over the batch inside the
  compiled program (``lax.map``) on CPU, and as the ordinary batched program elsewhere.

  Measured on XLA:CPU: one masked column reduction over a (1000, 1000) matrix takes 0.3 ms, but
  the same reduction batched over 19 thresholds takes 140 ms, far more than 19 single ones (the
  batched broadcast is not vectorised). Arguments that are not batched (the angle matrix, when
  only thresholds are) are shared by every iteration, not copied.
  """
  f = jax.custom_batching.custom_vmap(fn)

  @f.def_vmap
  def rule(axis_size, in_batched, *args):
    del axis_size
    if jax.default_backend() != "cpu":
      axes = [0 if b else None for b in in_batched]
      out = jax.vmap(fn, in_axes=axes)(*args)
    else:
      batched = [a for a, b in zip(args, in_batched) if b]

      def one(xs):
        it = iter(xs)
        return f(*[next(it) if b else a for a, b in zip(args, in_batched)])

      out = jax.lax.map(one, batched)
    return out, jax.tree.map(lambda _: True, out)

  return f


def _ordered_pairs(ang, ok, sim, comp, *, use_similar, use_comp, absorb):
  """See :func:`_ordered_pairs_one`; a ``vmap`` over thresholds maps over them (see
  :func:`_map_when_batched`)."""
  args = [jnp.asarray(a) for a in (ang, ok, sim, comp, use_similar, use_comp, absorb)]
  return _ordered_pairs_mapped(*args)


def _ordered_pairs_one(ang, ok, sim, comp, use_similar, use_comp, absorb):
  """The pairs a sweep takes, in the sequential sweep's order, from a symmetric angle matrix.

  Units with ``ok`` False never take part. Returns ``(first, second, kind, angle)``, (h,) each,
  the taken pairs first (``kind`` 0 after them). The greedy matching takes pairs in decreasing
  priority, so sorting the taken pairs by the same order (excess descending, similar first, then
  (lower, higher) index) lists them as the sequential walk would.
  """
  h = ang.shape[0]
  state = jnp.where(ok, _FREE, _USED).astype(jnp.int32)
  first, second, kind, angle, excess = _rounds(ang, state, sim, comp, use_similar=use_similar,
                                               use_comp=use_comp, absorb=absorb)
  taken = kind > 0
  lo, hi = jnp.minimum(first, second), jnp.maximum(first, second)
  _, _, _, _, order = jax.lax.sort(
      (jnp.where(taken, -excess, jnp.inf), kind, jnp.where(taken, lo, h), hi,
       jnp.arange(h, dtype=jnp.int32)), num_keys=4)
  return first[order], second[order], kind[order], angle[order]


_ordered_pairs_mapped = _map_when_batched(_ordered_pairs_one)


def _kept_extremes_one(ang, kept):
  """Smallest and largest angle between two kept units (NaN if fewer than two)."""
  h = ang.shape[0]
  idx = jnp.arange(h)
  m = kept[:, None] & kept[None, :] & (idx[:, None] < idx[None, :])
  low = jnp.min(jnp.where(m, ang, jnp.inf), axis=0).min()
  high = jnp.max(jnp.where(m, ang, -jnp.inf), axis=0).max()
  any_pair = jnp.sum(kept) > 1
  return jnp.where(any_pair, low, jnp.nan), jnp.where(any_pair, high, jnp.nan)


_kept_extremes = _map_when_batched(_kept_extremes_one)


def _sweep(vecs, active, is_const, const_val, mean, sim, comp, bad, *, use_similar, use_comp,
           use_const, absorb, fold, compensate):
  """The selection: returns (keep, moves, constants, report). All inputs may be traced,
  the rule flags (``use_*``, ``absorb``, ``fold``, ``compensate``) included: one compiled
  program serves every combination of them.

  ``moves = (dst, src, scale)``: row ``dst[n]`` of every consumer slice gains ``scale[n]`` times
  row ``src[n]`` (of the original rows; ``dst == h`` is no move). Equivalent to the transfer
  matrix ``I + sum_n scale[n] e_dst e_src^T`` without building it.
  """
  h = vecs.shape[0]
  f32 = jnp.float32
  use_similar, use_comp, use_const, absorb, fold, compensate = (
      jnp.asarray(f, bool) for f in (use_similar, use_comp, use_const, absorb, fold, compensate))
  vecs = jnp.where(active[:, None], vecs, 0.0)
  norm = jnp.linalg.norm(vecs, axis=1)
  g, d = _gram(vecs)
  idx = jnp.arange(h, dtype=jnp.int32)
  # One symmetric angle matrix (the upper triangle mirrored, so both units of a pair see the
  # same float32 angle), computed once and shared by every threshold under vmap.
  ang = _angle_matrix(g, d)
  const = active & is_const & ~bad & use_const
  ok = active & ~const & (norm > 0)
  n_const = jnp.sum(const, dtype=jnp.int32)

  p_first, p_second, p_kind, p_angle = _ordered_pairs(
      ang, ok & ~bad, sim, comp, use_similar=use_similar, use_comp=use_comp, absorb=absorb)
  taken = p_kind > 0
  n_pairs = jnp.sum(taken, dtype=jnp.int32)
  # Constants first, in index order; pairs follow them in the report.
  cpos = jnp.where(const, jnp.cumsum(const) - 1, h)
  pos = jnp.where(idx < n_pairs, n_const + idx, h)
  crow = jnp.stack([idx, jnp.full((h,), -1, jnp.int32), jnp.full((h,), CONSTANT, jnp.int32)], 1)
  prow = jnp.stack([p_first, p_second, p_kind], 1)
  pairs = jnp.zeros((h, 3), jnp.int32).at[cpos].set(crow, mode="drop")
  pairs = pairs.at[pos].set(prow, mode="drop")
  st_angle = jnp.full((h,), jnp.nan, f32).at[pos].set(p_angle, mode="drop")
  count = n_const + n_pairs

  # Turn the recorded actions into removals, a transfer matrix and folded constants.
  n = jnp.arange(h)
  first, second, kind = pairs[:, 0], pairs[:, 1], pairs[:, 2]
  live = n < count
  kind = jnp.where(live, kind, NONE)
  first = jnp.where(live, first, -1)
  second = jnp.where(live & (kind != CONSTANT), second, -1)
  angle = jnp.where(live & (kind != CONSTANT), st_angle, jnp.nan)
  is_s, is_c = kind == SIMILAR, kind == COMPLEMENTARY
  gi = jnp.where(is_s | is_c, first, h)  # h: dropped
  gj = jnp.where(is_s | is_c, second, h)
  t_add = jnp.where(is_s, 1.0, jnp.where(fold, -1.0, 0.0))
  t_add = jnp.where(gi < h, t_add, 0.0).astype(f32)
  removed = const | jnp.zeros((h,), bool).at[gj].set(True, mode="drop")
  consts = jnp.where(const, const_val, 0.0).astype(f32)
  removed = removed.at[jnp.where(is_c & ~fold, first, h)].set(True, mode="drop")
  if mean is not None:
    # Complementary compensation (fold or compensate); index h drops the update.
    folded = is_c & _complementary_folds(fold, compensate)
    ci = jnp.where(folded, first, h)
    cj = jnp.where(folded, second, h)
    mi, mj = mean[jnp.clip(ci, 0, h - 1)], mean[jnp.clip(cj, 0, h - 1)]
    consts = consts.at[jnp.where(fold, cj, h)].add(mi + mj, mode="drop")
    consts = consts.at[jnp.where(fold, h, ci)].add(mi, mode="drop")
    consts = consts.at[jnp.where(fold, h, cj)].add(mj, mode="drop")

  keep = active & ~removed
  empty = jnp.any(active) & ~jnp.any(keep)
  pref = active & ~const
  r = jnp.where(jnp.any(pref), jnp.argmax(pref), jnp.argmax(active))
  keep = keep.at[r].set(keep[r] | empty)
  consts = consts.at[r].set(jnp.where(empty, 0.0, consts[r]))

  kept_ok = keep & ok

  min_a, max_a = _kept_extremes(ang, kept_ok)
  report = SweepReport(first, second, angle, kind, count, min_a.astype(f32),
                       max_a.astype(f32), empty & ~bad, bad, jnp.asarray(fold, bool))
  # Bad input under jit: change nothing.
  keep = jnp.where(bad, active, keep)
  gi = jnp.where(bad, h, gi)
  consts = jnp.where(bad, 0.0, consts)
  return keep, (gi, jnp.clip(gj, 0, h - 1), t_add), consts, report


def _complementary_folds(fold, compensate):
  return fold | compensate


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
  """Adds each consumer's ``sum_j consts[j] * row_j`` (rows of ``params``) to its bias."""
  for s in group.consumers:
    if s.bias is None:
      raise ValueError(f"Group {group.name!r}: consumer {'/'.join(s.path)} has no bias path, "
                       "so constant units cannot be folded into it.")
    v = units_lib.unit_view(units_lib.get_path(params, s.path), s)
    contrib = jnp.tensordot(consts.astype(v.dtype), v, axes=(0, 0))
    contrib = contrib.reshape(-1, contrib.shape[-1]).sum(0)
    b = units_lib.get_path(out, s.bias)
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


# ----------------------------------------------------------------------------- public pruners


@functools.lru_cache(maxsize=None)
def _activation_core(g):
  """The jitted sweep for one group (shared by every factory of that group: the rule flags are
  traced arguments, so new flags never recompile)."""
  shift = _common.SHIFT[g.activation]

  def core(params, mask, acts, sim, comp, tol, flags):
    similar, complementary, constants, absorb, compensate, fold = flags
    folds = constants | (complementary & (compensate | fold))
    cfg = dict(use_similar=similar, use_comp=complementary, use_const=constants, absorb=absorb,
               fold=fold, compensate=compensate)
    a = acts.reshape(-1, g.size).T.astype(jnp.float32)
    mean = jnp.mean(a, axis=1)
    is_const = (jnp.max(a, axis=1) - jnp.min(a, axis=1)) < tol
    sim = jnp.asarray(sim, jnp.float32)
    comp = jnp.asarray(comp, jnp.float32)
    bad = ~_thresholds_ok(sim, comp, similar, complementary) | ~(tol >= 0)
    bad |= ~jnp.all(jnp.isfinite(jnp.where(mask[:, None], a, 0.0)))
    keep, moves, consts, report = _sweep(a - shift, mask, is_const, mean, mean, sim, comp,
                                         bad, **cfg)
    return _apply_moves(params, g, keep, moves, consts, folds), keep, report

  return _counted_jit(core)


def _check_bias_folds(g, *, constants: bool, compensate: bool = False, fold: bool = False):
  """Rules that fold contributions into the next layer's bias need an exact fold (a bias, and
  no zero-padded conv reading the group); otherwise say so before any work."""
  wanted = [n for n, on in (("constants", constants), ("compensate", compensate),
                            ("fold", fold)) if on]
  if wanted and not g.exact_constant_fold:
    why = ("its consumer has no bias" if any(s.bias is None for s in g.consumers) else
           "it is read by a zero-padded ('SAME') convolution, where a constant channel "
           "contributes less at the borders than inside")
    raise ValueError(
        f"Group {g.name!r} cannot fold removed units into the next bias exactly ({why}). "
        f"Pass {', '.join(f'{n}=False' for n in wanted)} (merging similar units and removing "
        "complementary pairs still work).")


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
    constant_tol=1e-6) -> (params, unit_masks, SweepReport)``. ``activations`` are the group's
    activations over the patterns, (N, units) or (N, H, W, units) (then each unit's vector is its
    N*H*W values); they must come from the params being pruned. Angles and the tolerance are
    traced. With concrete inputs bad values raise ValueError; under ``jit``/``vmap`` they leave
    everything unchanged and set ``report.invalid``.

  Note:
    Merging is exact (outputs unchanged) for exact duplicates and removing constants is exact
    when the consumer reads the activations linearly (dense layers, flatten, and conv layers
    away from 'SAME' padding borders). Through a max-pool only exact duplicates and constants
    stay exact.
  """
  g = _common.get_group(model_or_groups, group)
  groups = _common.resolve_groups(model_or_groups)
  if not (similar or complementary or constants):
    raise ValueError("All rules are off (similar, complementary, constants); turn one on.")
  _check_bias_folds(g, constants=constants, compensate=compensate, fold=fold)
  jitted, trace_count = _activation_core(g)
  flags = np.array([similar, complementary, constants, absorb, compensate, fold], bool)

  def prune(params, unit_masks, activations, similar_deg=15.0, complementary_deg=165.0,
            constant_tol=1e-6):
    mask = _common.group_mask(unit_masks, g, groups, params)
    _common.check_activation_shape(activations, g)
    _common.check_activations(activations)
    check_thresholds(similar_deg, complementary_deg, similar=similar,
                     complementary=complementary)
    _check_tol(constant_tol)
    new_params, keep, report = jitted(params, mask, jnp.asarray(activations), similar_deg,
                                      complementary_deg, constant_tol, flags)
    return new_params, _common.with_mask(unit_masks, g.name, keep), report

  prune._trace_count = trace_count  # for tests: compilations so far (not public API)
  prune.config = ("activations", g, tuple(flags.tolist()))  # same config: same sweep
  return prune


def _check_tol(tol):
  if _common.is_concrete(tol) and not float(tol) >= 0:
    raise ValueError(f"constant_tol must be >= 0, got {tol}.")


@functools.lru_cache(maxsize=None)
def _weight_core(g, source, similar, complementary, constants, absorb):
  """The jitted weight-based sweep for one group and configuration."""
  cfg = dict(use_similar=similar, use_comp=complementary, use_const=constants, absorb=absorb,
             fold=False, compensate=False)

  def core(params, mask, sim, comp, tol):
    if source == "incoming":
      v = _common.incoming_vectors(params, g)
      const_val = _common.constant_output(params, g)
    else:
      v = _common.outgoing_vectors(params, g)
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
  removed without compensation (no activations to compute a mean from).

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
  groups = _common.resolve_groups(model_or_groups)
  if source not in ("incoming", "outgoing"):
    raise ValueError(f"source must be 'incoming' or 'outgoing', got {source!r}.")
  if not (similar or complementary or constants):
    raise ValueError("All rules are off (similar, complementary, constants); turn one on.")
  _check_bias_folds(g, constants=constants)
  jitted, trace_count = _weight_core(g, source, similar, complementary, constants, absorb)

  sources = g.producers if source == "incoming" else g.consumers

  def prune(params, unit_masks, similar_deg=15.0, complementary_deg=165.0, constant_tol=1e-6):
    mask = _common.group_mask(unit_masks, g, groups, params)
    for s in sources:  # the leaves the unit vectors come from (as the activation pruner does)
      _common.check_finite(f"Weights {'/'.join(s.path)} of group {g.name!r}",
                           units_lib.get_path(params, s.path))
    check_thresholds(similar_deg, complementary_deg, similar=similar,
                     complementary=complementary)
    _check_tol(constant_tol)
    new_params, keep, report = jitted(params, mask, similar_deg, complementary_deg,
                                      constant_tol)
    return new_params, _common.with_mask(unit_masks, g.name, keep), report

  prune._trace_count = trace_count  # for tests: compilations so far (not public API)
  prune.config = ("weights", g, source, similar, complementary, constants, absorb)
  return prune


# ----------------------------------------------------------------------------- until stable


class StableReport(NamedTuple):
  """What :func:`until_stable` did.

  Attributes:
    sweeps: () int32 sweeps run, the last one (which found nothing) included.
    actions: () int32 actions over all sweeps.
    stable: () bool, True if the last sweep found no qualifying pair (False if ``max_sweeps``
      stopped it first, or if the input was bad under ``jit``).
    invalid: () bool, the first sweep's ``report.invalid``.
  """

  sweeps: jax.Array
  actions: jax.Array
  stable: jax.Array
  invalid: jax.Array


_STABLE_LOOPS = {}


def _stable_loop(prune, max_sweeps):
  """One compiled ``lax.while_loop`` of sweeps per pruner configuration (factories called
  again with the same group and options share it, as they share the sweep itself)."""
  key = (getattr(prune, "config", prune), max_sweeps)
  if key not in _STABLE_LOOPS:
    _STABLE_LOOPS[key] = _make_stable_loop(prune, max_sweeps)
  return _STABLE_LOOPS[key]


def _make_stable_loop(prune, max_sweeps):
  limit = np.iinfo(np.int32).max if max_sweeps is None else int(max_sweeps)

  def loop(params, unit_masks, first_count, args):
    def cond(c):
      return (c[2] > 0) & (c[3] < limit)

    def body(c):
      p, m, _, n, total = c
      p, m, r = prune(p, m, *args)
      return p, m, r.count, n + 1, total + r.count

    one = jnp.asarray(1, jnp.int32)
    return jax.lax.while_loop(cond, body, (params, unit_masks, first_count, one, first_count))

  return jax.jit(loop)


def until_stable(prune: Callable, params: PyTree, unit_masks, *args,
                 max_sweeps: int | None = None):
  """Repeats a distinctiveness sweep until a sweep finds no qualifying pair.

  One sweep computes the angles once, so units merged in it may leave new pairs below the
  threshold among the kept units (a kept unit's outgoing weights change, and with the default
  ``absorb=False`` a unit takes part in one action per sweep). Repeating until nothing
  qualifies is how the CNN studies prune a layer. Every sweep that acts removes at least one
  unit, so this ends after at most ``units + 1`` sweeps.

  The first sweep runs as an ordinary call (so bad concrete input raises as usual); the rest
  run as one compiled ``lax.while_loop`` (compiled once per pruner).

  Args:
    prune: a pruner from :func:`distinctiveness` or :func:`weight_distinctiveness`.
    params: the params to prune.
    unit_masks: the unit masks.
    *args: the pruner's other arguments (activations, thresholds, tolerance), the same for
      every sweep. Activations stay valid across sweeps: merging changes only outgoing weights,
      so the kept units' activations do not change.
    max_sweeps: stop after this many sweeps (None: until stable).

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
  if max_sweeps is not None and int(max_sweeps) < 1:
    raise ValueError(f"max_sweeps must be at least 1 (or None), got {max_sweeps}.")
  params, unit_masks, first = prune(params, unit_masks, *args)
  if _common.is_concrete(first.count) and int(first.count) == 0:  # stable already: no loop
    one = jnp.asarray(1, jnp.int32)
    return params, unit_masks, StableReport(one, first.count, ~first.invalid, first.invalid)
  loop = _stable_loop(prune, max_sweeps)
  params, unit_masks, last, sweeps, total = loop(params, unit_masks, first.count, args)
  return params, unit_masks, StableReport(sweeps, total, (last == 0) & ~first.invalid,
                                          first.invalid)


# ----------------------------------------------------------------------------- progressive


class ProgressiveReport(NamedTuple):
  """The trajectory of progressive distinctiveness; row 0 is the starting network.

  Rows ``[:count]`` are valid; row s is the network after s steps.

  Attributes:
    units_kept: (units,) int32 kept units.
    loss: (units,) float32 ``loss_fn(params)`` of the pruned network.
    min_angle: (units,) float32 smallest angle between kept units (NaN with fewer than two).
    unit_masks: (units, units) bool, the group's unit mask at each step.
    count: () int32 number of valid rows.
  """

  units_kept: jax.Array
  loss: jax.Array
  min_angle: jax.Array
  unit_masks: jax.Array
  count: jax.Array


def progressive_distinctiveness(model, group: str, loss_fn: Callable[[PyTree], jax.Array], *,
                                complementary: bool = False, constants: bool = True,
                                compensate: bool = False) -> Callable:
  """Removes the single most similar pair per step, down to one unit, recording the loss.

  At each step the group's activations on ``x`` are recomputed from the current params; constant
  units are removed (folded into the next bias), then the pair with the smallest angle is merged
  (lower index kept). With ``complementary=True`` the pair with the largest angle is removed
  instead when it is closer to 180 than the smallest angle is to 0 (and at least three units are
  left). Runs as one compiled ``lax.scan`` of ``units - 1`` steps; ``loss_fn`` must be a JAX
  function of the params (it sees the pruned params, removed units zeroed).

  Args:
    model: a jaxprune model (its ``activations`` method is used).
    group: the unit group's name.
    loss_fn: ``loss_fn(params) -> scalar``, e.g. the reconstruction error on the training set.
    complementary: also remove complementary pairs.
    constants: remove constant units at each step.
    compensate: fold a removed complementary pair's mean contribution into the next bias.

  Returns:
    ``run(params, unit_masks, x, constant_tol=1e-6) -> (params, unit_masks,
    ProgressiveReport)``; the returned params and masks are the final (one-unit) network.

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
  """
  g = _common.get_group(model, group)
  groups = _common.resolve_groups(model)
  _check_bias_folds(g, constants=constants, compensate=compensate)
  if not hasattr(model, "activations"):
    raise TypeError("progressive_distinctiveness needs a jaxprune model (to recompute "
                    "activations), not just its groups.")
  shift = _common.SHIFT[g.activation]
  h = g.size
  triu = np.triu(np.ones((h, h), bool), 1)

  def min_angle(ang, keep):
    pm = keep[:, None] & keep[None, :] & jnp.asarray(triu) & jnp.isfinite(ang)
    return jnp.where(jnp.any(pm), jnp.min(jnp.where(pm, ang, jnp.inf)), jnp.nan)

  def step(params, mask, x, tol):
    a = model.activations(params, x, g.name).reshape(-1, h).T.astype(jnp.float32)
    mean = jnp.mean(a, axis=1)
    const = mask & ((jnp.max(a, axis=1) - jnp.min(a, axis=1)) < tol) if constants else (
        jnp.zeros((h,), bool))
    # Keep at least one unit: never remove the last non-constant one as a constant.
    const = jnp.where(jnp.sum(mask & ~const) == 0,
                      const.at[jnp.argmax(mask)].set(False), const)
    consts = jnp.where(const, mean, 0.0)
    keep = mask & ~const
    ang = pairwise_angles(jnp.where(keep[:, None], a - shift, 0.0))
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

  def run_core(params, mask, x, tol):
    a0 = model.activations(params, x, g.name).reshape(-1, h).T.astype(jnp.float32)
    ang0 = pairwise_angles(jnp.where(mask[:, None], a0 - shift, 0.0))
    row0 = (jnp.sum(mask, dtype=jnp.int32), jnp.asarray(loss_fn(params), jnp.float32),
            min_angle(ang0, mask), mask)

    def body(carry, _):
      params, mask, count = carry
      live = jnp.sum(mask) > 1
      new_p, new_m, ma = step(params, mask, x, tol)
      params = jax.tree.map(lambda a, b: jnp.where(live, a, b), new_p, params)
      mask = jnp.where(live, new_m, mask)
      row = (jnp.sum(mask, dtype=jnp.int32), jnp.asarray(loss_fn(params), jnp.float32),
             jnp.where(live, ma, jnp.nan), mask)
      return (params, mask, count + live.astype(jnp.int32)), row

    (params, mask, count), rows = jax.lax.scan(body, (params, mask, jnp.asarray(1, jnp.int32)),
                                               None, length=h - 1)
    rows = jax.tree.map(lambda r0, r: jnp.concatenate([r0[None], r]), row0, rows)
    return params, mask, ProgressiveReport(rows[0], rows[1], rows[2], rows[3], count)

  jitted = jax.jit(run_core)

  def run(params, unit_masks, x, constant_tol=1e-6):
    mask = _common.group_mask(unit_masks, g, groups, params)
    _check_tol(constant_tol)
    params, mask, report = jitted(params, mask, x, constant_tol)
    return params, _common.with_mask(unit_masks, g.name, mask), report

  return run
