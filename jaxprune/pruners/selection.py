"""Distinctiveness selection: unit vectors -> the sweep's actions, as exact parallel rounds of
locally dominant pairs (see :mod:`jaxprune.pruners.distinctiveness_pruning` for the semantics)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune.pruners.angles import _angle_matrix, _blocked_gram, _gram

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
      outside [0, 180] or ``similar_deg >= complementary_deg``) or a unit's vector is too long
      for a float32 norm (entries of about 1e19 and more): nothing was changed.
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
  None for constants). When the sweep kept its last unit (``report.kept_last``), the action
  that would have removed it lists it as kept, like the unit mask, and has ``kept_last: True``.
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
  if bool(r.kept_last) and out:
    # The sweep kept one unit it would have removed (the lowest-index non-constant one, else
    # the lowest-index one): its action lists it as kept, as the mask does.
    pairs = [u for a in out if a["kind"] != "constant" for u in a["removed"]]
    last = min(pairs) if pairs else min(u for a in out for u in a["removed"])
    for a in out:
      if last in a["removed"]:
        a["removed"] = tuple(u for u in a["removed"] if u != last)
        a["kept"] = tuple(sorted(a["kept"] + (last,)))
        a["kept_last"] = True
        break
  return out


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
           use_const, absorb, fold, compensate, blocked=False):
  """The selection: returns (keep, moves, constants, report). All inputs may be traced,
  the rule flags (``use_*``, ``absorb``, ``fold``, ``compensate``) included: one compiled
  program serves every combination of them.

  ``moves = (dst, src, scale)``: row ``dst[n]`` of every consumer slice gains ``scale[n]`` times
  row ``src[n]`` (of the original rows; ``dst == h`` is no move). Equivalent to the transfer
  matrix ``I + sum_n scale[n] e_dst e_src^T`` without building it.

  ``blocked=True`` sums the Gram matrix in fixed-size blocks of the vector axis
  (:func:`jaxprune.pruners.angles._blocked_gram`), so zero entries appended to every vector
  (patterns of sample weight 0) leave the angles bit-for-bit unchanged.

  ``const_val`` and ``mean`` are (h,), or (h, P) with a value per position of a unit's map
  (the returned constants then have that shape too; see :func:`jaxprune.units.bias_contribution`).
  """
  h = vecs.shape[0]
  f32 = jnp.float32
  use_similar, use_comp, use_const, absorb, fold, compensate = (
      jnp.asarray(f, bool) for f in (use_similar, use_comp, use_const, absorb, fold, compensate))
  vecs = jnp.where(active[:, None], vecs, 0.0)
  norm = jnp.linalg.norm(vecs, axis=1)
  # A vector too long for a float32 norm (entries ~1e19 and up) would normalise to zero and
  # read as a duplicate of every other such vector: refuse it rather than merge them all.
  bad = bad | jnp.any(jnp.isinf(norm))
  # A vector has an angle when it has a normal entry: a tiny one (entries near 1e-20, whose
  # squares flush to zero) has one too, the Gram matrix scales each vector first.
  has_angle = jnp.max(jnp.abs(vecs), axis=1) >= jnp.finfo(vecs.dtype).tiny
  g, d = _blocked_gram(vecs) if blocked else _gram(vecs)
  idx = jnp.arange(h, dtype=jnp.int32)
  # One symmetric angle matrix (the upper triangle mirrored, so both units of a pair see the
  # same float32 angle), computed once and shared by every threshold under vmap.
  ang = _angle_matrix(g, d)
  const = active & is_const & ~bad & use_const
  ok = active & ~const & has_angle
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
  # A unit's folded value: (h,), or (h, P) with a value per position (activation sweeps).
  col = (lambda v: v[:, None]) if jnp.ndim(const_val) == 2 else (lambda v: v)
  consts = jnp.where(col(const), const_val, 0.0).astype(f32)
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
