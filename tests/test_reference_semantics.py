"""Differential tests: jaxprune's pruners against plain-NumPy references written from the text.

Every reference here is derived from the semantics in DESIGN.md ("Pruner semantics"),
docs/pruners.md and docs/distinctiveness.md, not from jaxprune's code, so an outside reviewer's
own implementation of those pages should agree with both. Cases are seeded and small (one
compiled sweep per family, reused across many cases) and include exact ties, duplicates,
constant units, exact complements o_j = 1 - o_i, thresholds exactly at an angle, and units or
weights pruned before the call.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import host_f32
import jaxprune
from jaxprune import ga
from jaxprune.pruners import (distinctiveness, importance_prune, importance_scores,
                              iterative_importance, magnitude_prune, random_prune, until_stable,
                              weight_distinctiveness)

P, H = 8, 6          # patterns and units of the shared distinctiveness cases
IN, OUT = 3, 2       # the shared MLP's inputs and outputs
GRID = 1024.0        # activations on a 1/1024 grid: shifts and complements are exact

SIMILAR, COMPLEMENTARY, CONSTANT = 1, 2, 3


# ----------------------------------------------------------------------------- references


def ref_angle(u, v):
  """Angle in degrees between two nonzero vectors, in float64 by the stable half-angle form
  (exact 0 for duplicates, exact 180 for opposites)."""
  u = np.asarray(u, np.float64) / np.linalg.norm(u)
  v = np.asarray(v, np.float64) / np.linalg.norm(v)
  return math.degrees(2.0 * math.atan2(np.linalg.norm(u - v), np.linalg.norm(u + v)))


def ref_sweep(vecs, alive, sim_deg, comp_deg, *, const=None, similar=True, complementary=True,
              absorb=False, fold=False):
  """One distinctiveness sweep, as the docs define it, walked pair by pair.

  Args:
    vecs: (P, U) the units' vectors (already shifted where the pruner shifts).
    alive: (U,) bool, units not pruned before the sweep.
    sim_deg, comp_deg: strict thresholds.
    const: (U,) bool, the units the constant rule removes (None: the rule is off).
    similar, complementary, absorb, fold: the rule switches (with fold a complementary pair
      removes only j; i has taken part, so it takes no further action and absorbs nothing).

  Returns:
    (actions, state, kept_back): actions as (kind, first, second) in report order; state per
    unit: 'free', 'keeper', 'folded', 'removed' or 'masked'; kept_back the unit kept by the
    keep-one rule (or None).
  """
  u = vecs.shape[1]
  state = ["free" if a else "masked" for a in alive]
  actions = []
  const = np.zeros(u, bool) if const is None else const & alive
  for k in range(u):                                   # constants first, in index order
    if const[k]:
      state[k] = "removed"
      actions.append((CONSTANT, k, -1))
  norms = np.linalg.norm(vecs, axis=0)
  play = [k for k in range(u) if state[k] == "free" and norms[k] > 0]
  pairs = []
  for i, j in itertools.combinations(play, 2):
    a = ref_angle(vecs[:, i], vecs[:, j])
    if similar and a < sim_deg:
      pairs.append((float(np.float32(sim_deg) - np.float32(a)), SIMILAR, i, j))
    if complementary and a > comp_deg:
      pairs.append((float(np.float32(a) - np.float32(comp_deg)), COMPLEMENTARY, i, j))
  # most extreme first; ties: similar before complementary, then the lower (i, j)
  pairs.sort(key=lambda t: (-t[0], t[1], t[2], t[3]))
  for _, kind, i, j in pairs:
    si, sj = state[i], state[j]
    if kind == COMPLEMENTARY or not absorb:
      if si == "free" and sj == "free":
        if kind == SIMILAR:
          state[i], state[j] = "keeper", "removed"
        else:
          state[i], state[j] = ("folded" if fold else "removed"), "removed"
        actions.append((kind, i, j))
    else:                                              # absorb: a keeper takes a free unit
      if {si, sj} - {"free", "keeper"} or (si == "keeper" and sj == "keeper"):
        continue
      keep, drop = (j, i) if sj == "keeper" else (i, j)
      state[keep], state[drop] = "keeper", "removed"
      actions.append((kind, keep, drop))
  kept_back = None
  if any(alive) and all(s in ("removed", "masked") for s in state):   # keep one
    by_pair = sorted(k for _, i, j in actions for k in (i, j) if k >= 0 and not const[k])
    kept_back = by_pair[0] if by_pair else int(np.flatnonzero(const)[0])
  return actions, state, kept_back


def ref_apply(params, actions, state, kept_back, out_acts, *, compensate=False, fold=False):
  """The params after a sweep of the hidden group of a one-hidden-layer MLP.

  Similar: the kept unit's outgoing weights gain the removed unit's. Complementary: both go
  (compensate: both units' mean contributions join the next bias; fold: only j goes, its
  outgoing weights are subtracted from i's and mean(o_i + o_j) times them join the bias).
  Constant: its (unshifted) constant output times its outgoing weights joins the bias. Every
  weight read is the network's before the sweep. A unit kept back by the keep-one rule keeps
  its own weights and folds nothing of its own.
  """
  p = jax.tree.map(lambda a: np.array(a, np.float64), params)
  w2, b2 = p["params"]["out"]["kernel"], p["params"]["out"]["bias"]
  w2_0 = w2.copy()
  mean = out_acts.mean(axis=0)
  removed = {k for k, s in enumerate(state) if s == "removed"}
  for kind, i, j in actions:
    if kind == CONSTANT:
      if i != kept_back:
        b2 += mean[i] * w2_0[i]
    elif kind == SIMILAR:
      w2[i] += w2_0[j]
    elif fold:
      w2[i] -= w2_0[j]
      b2 += (mean[i] + mean[j]) * w2_0[j]
    elif compensate:
      b2 += sum(mean[k] * w2_0[k] for k in (i, j) if k != kept_back)
  removed.discard(kept_back)
  for r in removed:
    p["params"]["hidden_0"]["kernel"][:, r] = 0.0
    p["params"]["hidden_0"]["bias"][r] = 0.0
    w2[r] = 0.0
  keep = np.array([s != "masked" and k not in removed for k, s in enumerate(state)])
  return p, keep


def ref_kept_angles(vecs, keep):
  """(min, max) angle among kept units with a nonzero vector (NaN if no pair)."""
  ks = [k for k in np.flatnonzero(keep) if np.linalg.norm(vecs[:, k]) > 0]
  a = [ref_angle(vecs[:, i], vecs[:, j]) for i, j in itertools.combinations(ks, 2)]
  return (min(a), max(a)) if a else (math.nan, math.nan)


# ----------------------------------------------------------------------------- case building


def _zero_units(params, dead, group="hidden_0", consumer="out"):
  """Params as an earlier prune leaves them: the dead units' slices zeroed."""
  p = jax.tree.map(np.array, params)
  for r in np.flatnonzero(dead):
    p["params"][group]["kernel"][..., r] = 0.0
    p["params"][group]["bias"][r] = 0.0
    p["params"][consumer]["kernel"][r] = 0.0
  return p


def _random_vectors(rng):
  """(P, H) vectors on the grid with duplicates, exact opposites, constants, zero vectors and
  near-duplicates among random ones."""
  v = rng.integers(-400, 401, size=(P, H)) / GRID
  for k in range(1, H):
    j, r = int(rng.integers(0, k)), rng.random()
    if r < 0.2:
      v[:, k] = v[:, j]                                          # exact duplicate
    elif r < 0.35:
      v[:, k] = -v[:, j]                                         # exact opposite (1 - o)
    elif r < 0.45:
      v[:, k] = rng.integers(-400, 401) / GRID                   # constant
    elif r < 0.5:
      v[:, k] = 0.0                                              # zero (sigmoid at 0.5)
    elif r < 0.65:
      v[:, k] = v[:, j] + rng.integers(-12, 13, size=P) / GRID   # near duplicate
  return v


def _ambiguous(vecs, alive, const, sim_deg, comp_deg):
  """True if float32 rounding could decide the case: an inexact angle within 0.05 degrees of
  a threshold, or two qualifying pairs whose excesses differ by less than 1e-3 without being
  exact copies of each other (exact duplicates give identical Gram entries)."""
  norms = np.linalg.norm(vecs, axis=0)
  play = [k for k in range(vecs.shape[1]) if alive[k] and not const[k] and norms[k] > 0]
  found = []
  for i, j in itertools.combinations(play, 2):
    a = ref_angle(vecs[:, i], vecs[:, j])
    exact = a in (0.0, 180.0)
    if not exact and min(abs(a - sim_deg), abs(a - comp_deg)) < 0.05:
      return True
    if a < sim_deg:
      found.append((sim_deg - a, SIMILAR, exact, (vecs[:, i].tobytes(), vecs[:, j].tobytes())))
    if a > comp_deg:
      found.append((a - comp_deg, COMPLEMENTARY, exact,
                    (vecs[:, i].tobytes(), vecs[:, j].tobytes())))
  for (e1, k1, x1, c1), (e2, k2, x2, c2) in itertools.combinations(found, 2):
    if abs(e1 - e2) < 1e-3 and not (x1 and x2) and not (e1 == e2 and k1 == k2 and c1 == c2):
      return True
  return False


THRESHOLDS = [(15.0, 165.0), (0.0, 180.0), (45.0, 140.0), (90.0, 179.0), (30.0, 150.0),
              (60.0, 120.0), (90.0, 90.0001), (89.0, 90.0)]
OPTIONS = [dict(), dict(absorb=True), dict(compensate=True), dict(fold=True),
           dict(complementary=False), dict(similar=False), dict(constants=False),
           dict(absorb=True, constants=False), dict(absorb=True, fold=True)]


def _check_against_reference(prune, opts, params, masks, acts, sim_deg, comp_deg, shift, tag):
  """Runs the pruner and the reference on one case and compares masks, report and params."""
  vecs = np.asarray(acts, np.float64) - (0.5 if shift else 0.0)
  alive = np.asarray(masks["hidden_0"])
  const = None
  if opts.get("constants", True):
    const = np.ptp(np.asarray(acts, np.float64), axis=0) < 1e-6
  actions, state, kept_back = ref_sweep(
      vecs, alive, sim_deg, comp_deg, const=const, similar=opts.get("similar", True),
      complementary=opts.get("complementary", True), absorb=opts.get("absorb", False),
      fold=opts.get("fold", False))
  want, keep = ref_apply(params, actions, state, kept_back, np.asarray(acts, np.float64),
                         compensate=opts.get("compensate", False), fold=opts.get("fold", False))
  got, new_masks, rep = prune(params, masks, acts, sim_deg, comp_deg)
  n = int(rep.count)
  np.testing.assert_array_equal(np.asarray(new_masks["hidden_0"]), keep, err_msg=tag)
  assert [(int(k), int(a), int(b)) for k, a, b in
          zip(rep.kind[:n], rep.first[:n], rep.second[:n])] == actions, tag
  assert bool(rep.kept_last) == (kept_back is not None), tag
  for path in (("hidden_0", "kernel"), ("hidden_0", "bias"), ("out", "kernel"), ("out", "bias")):
    np.testing.assert_allclose(np.asarray(got["params"][path[0]][path[1]]),
                               want["params"][path[0]][path[1]], atol=1e-6, err_msg=f"{tag} {path}")
  lo, hi = ref_kept_angles(vecs, keep)
  np.testing.assert_allclose([float(rep.min_angle), float(rep.max_angle)], [lo, hi], atol=0.05,
                             err_msg=tag)


@pytest.fixture(scope="module")
def mlp():
  model = jaxprune.MLP(in_features=IN, hidden=(H,), out_features=OUT)        # sigmoid
  params = jax.tree.map(np.asarray, model.init(jax.random.key(0)))
  return model, params


# ----------------------------------------------------------------------------- 1. activations


def _tie_cases():
  """Hand-built cases with exact ties: (shifted vectors, alive, sim, comp, options)."""
  e = np.eye(P)[:, :4] * (256 / GRID)
  cases = []
  # u0, u1 = u0 (0 degrees), u2 = -u0 (180): equal excess 15 both ways, similar goes first.
  cases.append((np.c_[e[:, 0], e[:, 0], -e[:, 0], e[:, 1], e[:, 2], e[:, 3]], None, 15., 165.,
                dict()))
  # the same with complementary first when the similar pair is masked out
  cases.append((np.c_[e[:, 0], e[:, 0], -e[:, 0], e[:, 1], e[:, 2], e[:, 3]],
                np.array([1, 0, 1, 1, 1, 1], bool), 15., 165., dict()))
  # thresholds exactly at the angles: 0 is not < 0, 180 not > 180, 90 not < 90
  cases.append((np.c_[e[:, 0], e[:, 0], -e[:, 0], e[:, 1], e[:, 1], -e[:, 1]], None, 0., 180.,
                dict()))
  cases.append((np.c_[e[:, 0], e[:, 1], e[:, 2], e[:, 3], e[:, 0] + e[:, 1], -e[:, 0]], None,
                90., 179., dict()))
  # three copies: one merge without absorb, two with absorb (the keeper absorbs both)
  trio = np.c_[e[:, 0], e[:, 0], e[:, 0], e[:, 1], -e[:, 1], e[:, 2]]
  cases += [(trio, None, 15., 165., dict()), (trio, None, 15., 165., dict(absorb=True)),
            (trio, None, 15., 165., dict(fold=True)),
            (trio, None, 15., 165., dict(compensate=True))]
  # absorb where the keeper has the higher index (docs/distinctiveness.md's example, in 2-D)
  d = np.radians([-12.0, 0.0, 6.0])
  plane = np.zeros((P, H))
  plane[0, :3], plane[1, :3] = 0.3 * np.cos(d), 0.3 * np.sin(d)
  plane[2:, 3:] = np.eye(P - 2)[:, :3] * 0.25
  cases += [(plane, None, 15., 165., dict(absorb=True)), (plane, None, 15., 165., dict())]
  # fold keeps unit 0 of the complementary pair (0, 1) taken first (excess 15); it has taken
  # part, so with absorb it neither absorbs unit 2 (5 degrees) nor is absorbed by keeper 2
  fan = np.zeros((P, H))
  fan[0, :2] = 0.25, -0.25
  for k, deg in ((2, 5.0), (3, 1.0)):
    fan[:2, k] = 0.25 * np.cos(np.radians(deg)), 0.25 * np.sin(np.radians(deg))
  fan[2:, 4:] = np.eye(P - 2)[:, :2] * 0.25
  fan2 = fan.copy()
  fan2[:2, 3] = 0.25 * np.cos(np.radians(9.0)), 0.25 * np.sin(np.radians(9.0))
  cases += [(fan, None, 15., 165., dict(absorb=True, fold=True)),
            (fan2, None, 15., 165., dict(absorb=True, fold=True)),
            (fan2, None, 15., 165., dict(absorb=True))]
  # every unit removed: complementary pairs and a constant; the lowest pair unit is kept back
  allgo = np.c_[e[:, 0], -e[:, 0], e[:, 1], -e[:, 1], np.full(P, 0.125), e[:, 2] * 0]
  cases += [(allgo, None, 15., 165., dict()), (allgo, None, 15., 165., dict(compensate=True)),
            (np.c_[np.full((P, 3), 0.125), np.full((P, 3), -0.25)], None, 15., 165., dict())]
  return cases


def test_activation_distinctiveness_matches_numpy_reference(mlp):
  """Masks, actions, report angles and params of one sweep agree with the NumPy walk on hand-
  built ties and boundaries and on 120 seeded random sigmoid cases, for every option set."""
  model, params0 = mlp
  prunes = [distinctiveness(model, "hidden_0", **o) for o in OPTIONS]
  rng = np.random.default_rng(0)
  checked = 0
  for t, (vecs, alive, sim_deg, comp_deg, opts) in enumerate(_tie_cases()):
    alive = np.ones(H, bool) if alive is None else alive
    params = _zero_units(params0, ~alive)
    acts = (0.5 + vecs).astype(np.float32)
    _check_against_reference(prunes[OPTIONS.index(opts)], opts, params,
                             {"hidden_0": jnp.asarray(alive)}, acts, sim_deg, comp_deg, True,
                             f"tie case {t}")
    checked += 1
  for case in range(400):
    vecs = _random_vectors(rng)
    alive = rng.random(H) > 0.15
    sim_deg, comp_deg = THRESHOLDS[case % len(THRESHOLDS)]
    opts = OPTIONS[(case // len(THRESHOLDS)) % len(OPTIONS)]
    const = (np.ptp(vecs, axis=0) < 1e-6 if opts.get("constants", True) else np.zeros(H, bool))
    if alive.sum() < 2 or _ambiguous(vecs, alive, const, sim_deg, comp_deg):
      continue
    params = _zero_units(params0, ~alive)
    out = rng.normal(size=(H, OUT)).astype(np.float32)
    params["params"]["out"]["kernel"] = out * alive[:, None]
    acts = (0.5 + vecs).astype(np.float32)
    _check_against_reference(prunes[OPTIONS.index(opts)], opts, params,
                             {"hidden_0": jnp.asarray(alive)}, acts, sim_deg, comp_deg, True,
                             f"random case {case} {opts} {sim_deg}/{comp_deg}")
    checked += 1
    if checked >= 130:
      break
  assert checked >= 130
  # tanh units: the same sweep on unshifted activations
  tanh = jaxprune.MLP(in_features=IN, hidden=(H,), out_features=OUT, activation="tanh")
  tprunes = {i: distinctiveness(tanh, "hidden_0", **OPTIONS[i]) for i in (0, 1, 3)}
  done = 0
  while done < 20:
    vecs, alive = _random_vectors(rng), rng.random(H) > 0.15
    sim_deg, comp_deg = THRESHOLDS[done % len(THRESHOLDS)]
    opts = OPTIONS[(0, 1, 3)[done % 3]]
    if alive.sum() < 2 or _ambiguous(vecs, alive, np.ptp(vecs, axis=0) < 1e-6, sim_deg,
                                     comp_deg):
      continue
    _check_against_reference(tprunes[OPTIONS.index(opts)], opts, _zero_units(params0, ~alive),
                             {"hidden_0": jnp.asarray(alive)}, vecs.astype(np.float32),
                             sim_deg, comp_deg, False, f"tanh case {done} {opts}")
    done += 1


def test_activation_distinctiveness_float64_matches_reference(mlp):
  """Under jax_enable_x64, float64 params and activations give the reference's masks, actions
  and float64 params (tie cases and seeded random cases, one option set per case)."""
  model, params0 = mlp
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    prunes = {i: distinctiveness(model, "hidden_0", **OPTIONS[i]) for i in (0, 1, 3)}
    cases = [(v, a, s, c, o) for v, a, s, c, o in _tie_cases()
             if OPTIONS.index(o) in prunes][:5]
    while len(cases) < 10:
      vecs, alive = _random_vectors(rng), rng.random(H) > 0.15
      sim_deg, comp_deg = THRESHOLDS[len(cases) % len(THRESHOLDS)]
      if alive.sum() >= 2 and not _ambiguous(vecs, alive, np.ptp(vecs, axis=0) < 1e-6, sim_deg,
                                             comp_deg):
        cases.append((vecs, alive, sim_deg, comp_deg, OPTIONS[(0, 1, 3)[len(cases) % 3]]))
    for t, (vecs, alive, sim_deg, comp_deg, opts) in enumerate(cases):
      alive = np.ones(H, bool) if alive is None else alive
      params = jax.tree.map(lambda a: a.astype(np.float64), _zero_units(params0, ~alive))
      _check_against_reference(prunes[OPTIONS.index(opts)], opts, params,
                               {"hidden_0": jnp.asarray(alive)}, 0.5 + vecs, sim_deg, comp_deg,
                               True, f"x64 case {t}")
      got, _, _ = prunes[OPTIONS.index(opts)](params, {"hidden_0": jnp.asarray(alive)},
                                              0.5 + vecs, sim_deg, comp_deg)
      assert got["params"]["out"]["kernel"].dtype == jnp.float64


def test_distinctiveness_keeps_outputs_of_duplicates_constants_and_folded_complements(mlp):
  """On a real network: merging an exact duplicate and folding a constant leave the outputs
  unchanged (default options), and `fold` removes a complement o_5 = 1 - o_2 exactly; the
  params equal the reference's."""
  model, params0 = mlp
  rng = np.random.default_rng(2)
  p = jax.tree.map(np.array, params0)
  k, b = p["params"]["hidden_0"]["kernel"], p["params"]["hidden_0"]["bias"]
  k[:] = rng.normal(size=k.shape) * 2
  b[:] = rng.normal(size=b.shape)
  k[:, 1], b[1] = k[:, 0], b[0]                  # unit 1 duplicates unit 0
  k[:, 3] = 0.0                                  # unit 3 is constant sigmoid(b3)
  k[:, 5], b[5] = -k[:, 2], -b[2]                # unit 5 = 1 - unit 2
  p["params"]["out"]["bias"][:] = rng.normal(size=OUT)
  x = rng.normal(size=(40, IN)).astype(np.float32)
  acts = np.asarray(model.activations(p, x, "hidden_0"))
  y0 = np.asarray(model.apply(p, x))
  for opts, keep in ((dict(complementary=False), [1, 0, 1, 0, 1, 1]),
                     (dict(fold=True), [1, 0, 1, 0, 1, 0])):
    prune = distinctiveness(model, "hidden_0", **opts)
    got, masks, _ = prune(p, jaxprune.unit_masks_ones(model), acts, 15.0, 165.0)
    assert np.asarray(masks["hidden_0"]).tolist() == [bool(v) for v in keep], opts
    np.testing.assert_allclose(np.asarray(model.apply(got, x)), y0, atol=2e-6, err_msg=str(opts))
    vecs = acts.astype(np.float64) - 0.5
    const = np.ptp(acts, axis=0) < 1e-6
    actions, state, kb = ref_sweep(vecs, np.ones(H, bool), 15.0, 165.0, const=const,
                                   complementary=opts.get("complementary", True),
                                   fold=opts.get("fold", False))
    want, _ = ref_apply(p, actions, state, kb, acts.astype(np.float64),
                        fold=opts.get("fold", False))
    np.testing.assert_allclose(np.asarray(got["params"]["out"]["bias"]),
                               want["params"]["out"]["bias"], atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["params"]["out"]["kernel"]),
                               want["params"]["out"]["kernel"], atol=1e-6)

  # conv channels: each channel's vector is its N*H*W values (relu, no shift); a duplicate
  # channel is merged into the lower one through the pool and flatten, outputs unchanged
  lenet = jaxprune.LeNet(input_shape=(10, 10, 1), channels=(4, 3), kernels=(3, 3))
  lp = jax.tree.map(np.array, lenet.init(jax.random.key(5)))
  lp["params"]["conv_1"]["kernel"][..., 2] = lp["params"]["conv_1"]["kernel"][..., 0]
  lp["params"]["conv_1"]["bias"][2] = lp["params"]["conv_1"]["bias"][0]
  xc = rng.normal(size=(6, 10, 10, 1)).astype(np.float32)
  acts = np.asarray(lenet.activations(lp, xc, "conv_1"))
  vecs = acts.reshape(-1, 3).astype(np.float64)
  actions, _, _ = ref_sweep(vecs, np.ones(3, bool), 15.0, 165.0,
                            const=np.ptp(vecs, axis=0) < 1e-6)
  got, masks, rep = distinctiveness(lenet, "conv_1")(lp, jaxprune.unit_masks_ones(lenet), acts,
                                                     15.0, 165.0)
  n = int(rep.count)
  assert actions == [(SIMILAR, 0, 2)]
  assert [(int(a), int(b), int(c)) for a, b, c in
          zip(rep.kind[:n], rep.first[:n], rep.second[:n])] == actions
  np.testing.assert_allclose(np.asarray(lenet.apply(got, xc)), np.asarray(lenet.apply(lp, xc)),
                             atol=1e-6)


# ----------------------------------------------------------------------------- 2. weights


def test_weight_distinctiveness_matches_reference():
  """Weight-based sweeps (incoming kernel columns, outgoing rows, LeNet conv filters flattened;
  no shift; zero-norm vectors are the constants) agree with the reference walk on seeded cases."""
  model = jaxprune.MLP(in_features=P, hidden=(H,), out_features=P)
  base = jax.tree.map(np.asarray, model.init(jax.random.key(3)))
  rng = np.random.default_rng(4)
  checked = {"incoming": 0, "outgoing": 0}
  prunes = {(s, a): weight_distinctiveness(model, "hidden_0", source=s, absorb=a)
            for s in checked for a in (False, True)}
  for case in range(200):
    source = ("incoming", "outgoing")[case % 2]
    absorb = bool(case // 2 % 3 == 2)
    vecs = _random_vectors(rng)
    const = np.linalg.norm(vecs, axis=0) < 1e-6
    alive = rng.random(H) > 0.15
    sim_deg, comp_deg = THRESHOLDS[case % len(THRESHOLDS)]
    if alive.sum() < 2 or _ambiguous(vecs, alive, const, sim_deg, comp_deg):
      continue
    p = jax.tree.map(np.array, base)
    p["params"]["hidden_0"]["bias"][:] = rng.normal(size=H)
    if source == "incoming":
      p["params"]["hidden_0"]["kernel"][:] = vecs
    else:
      p["params"]["out"]["kernel"][:] = vecs.T
    p = jax.tree.map(lambda a: a.astype(np.float32), _zero_units(p, ~alive))
    actions, state, kb = ref_sweep(vecs, alive, sim_deg, comp_deg, const=const, absorb=absorb)
    # a unit with zero incoming weights outputs sigmoid(bias) everywhere
    level = 1.0 / (1.0 + np.exp(-p["params"]["hidden_0"]["bias"].astype(np.float64)))
    want, keep = ref_apply(p, actions, state, kb, level[None, :])
    got, masks, rep = prunes[source, absorb](p, {"hidden_0": jnp.asarray(alive)}, sim_deg,
                                             comp_deg)
    tag = f"{source} case {case} absorb={absorb} {sim_deg}/{comp_deg}"
    n = int(rep.count)
    np.testing.assert_array_equal(np.asarray(masks["hidden_0"]), keep, err_msg=tag)
    assert [(int(a), int(b), int(c)) for a, b, c in
            zip(rep.kind[:n], rep.first[:n], rep.second[:n])] == actions, tag
    for layer, name in itertools.product(("hidden_0", "out"), ("kernel", "bias")):
      np.testing.assert_allclose(np.asarray(got["params"][layer][name]),
                                 want["params"][layer][name], atol=1e-6, err_msg=tag)
    checked[source] += 1
  assert min(checked.values()) >= 30, checked

  # LeNet conv_0: each channel's vector is its 3x3x1 filter; merges add conv_1's input slices
  lenet = jaxprune.LeNet(input_shape=(10, 10, 1), channels=(4, 3), kernels=(3, 3))
  lp = jax.tree.map(np.array, lenet.init(jax.random.key(5)))
  f = rng.integers(-400, 401, size=(9, 4)) / GRID
  f[:, 2] = f[:, 0]                                      # duplicate filter
  f[:, 3] = -f[:, 1]                                     # opposite filter
  lp["params"]["conv_0"]["kernel"][:] = f.reshape(3, 3, 1, 4)
  actions, state, kb = ref_sweep(f, np.ones(4, bool), 15.0, 165.0,
                                 const=np.linalg.norm(f, axis=0) < 1e-6)
  got, masks, rep = weight_distinctiveness(lenet, "conv_0")(
      jax.tree.map(jnp.asarray, lp), jaxprune.unit_masks_ones(lenet), 15.0, 165.0)
  assert actions == [(SIMILAR, 0, 2), (COMPLEMENTARY, 1, 3)]
  assert [(int(a), int(b), int(c)) for a, b, c in
          zip(rep.kind[:2], rep.first[:2], rep.second[:2])] == actions
  assert np.asarray(masks["conv_0"]).tolist() == [True, False, False, False]
  k1 = lp["params"]["conv_1"]["kernel"].copy()
  k1[:, :, 0] += k1[:, :, 2]
  k1[:, :, 1:] = 0.0
  np.testing.assert_allclose(np.asarray(got["params"]["conv_1"]["kernel"]), k1, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(got["params"]["conv_0"]["kernel"])[..., 1:], 0.0)
  np.testing.assert_array_equal(np.asarray(got["params"]["conv_0"]["bias"])[1:], 0.0)


# ----------------------------------------------------------------------------- 3. magnitude


_NOT_PRUNED = ("bias", "scale", "mean", "var", "offset")


def _selected(path, leaf):
  """The default selection: floating-point leaves of rank >= 2 not named like a bias or a norm
  parameter."""
  name = str(getattr(path[-1], "key", path[-1]))
  return (np.issubdtype(np.asarray(leaf).dtype, np.floating) and np.ndim(leaf) >= 2 and
          name not in _NOT_PRUNED)


def ref_magnitude(leaves, masks, fraction, scope):
  """New masks, per-leaf removed counts and thresholds: remove round(fraction x remaining) kept
  weights of smallest |w| (remaining = weights still kept; round half to even, in float32),
  ties by position (leaf order, then flat index); per leaf, or once over all leaves."""
  new = [np.array(m, bool) for m in masks]

  def count(remaining):
    return int(np.rint(np.float32(fraction) * np.float32(remaining)))

  def cut(members, n):
    # members: (|w|, leaf, flat index) of kept weights; the n smallest go
    members.sort()
    for _, li, fi in members[:n]:
      new[li].flat[fi] = False
    return members[n - 1][0] if n else math.nan

  thresholds = []
  kept = [[(abs(float(w.flat[i])), li, i) for i in np.flatnonzero(m)]
          for li, (w, m) in enumerate(zip(leaves, masks))]
  if scope == "layer":
    thresholds = [cut(k, count(len(k))) for k in kept]
  else:
    allk = [x for k in kept for x in k]
    thresholds = [cut(allk, count(len(allk)))] * len(leaves)
  removed = [int(np.sum(m) - np.sum(n)) for m, n in zip(masks, new)]
  return new, removed, thresholds


def _magnitude_params(rng):
  """Leaves of several ranks with many tied magnitudes, a rank-2 norm `scale`, an integer table
  and biases (the last three are not pruned by default)."""
  def ints(*shape):
    return (rng.integers(-6, 7, size=shape) / 4.0).astype(np.float32)
  return {"conv": {"kernel": ints(3, 3, 2, 2), "bias": ints(2)},
          "dense": {"kernel": ints(5, 4), "bias": ints(4)},
          "norm": {"scale": ints(2, 3), "offset": ints(2, 3)},
          "table": {"index": rng.integers(0, 5, size=(3, 3)).astype(np.int32)},
          "z_out": {"kernel": ints(4, 3)}}


def test_magnitude_and_random_prune_match_reference():
  """magnitude_prune's masks, params, report and counts agree with the reference over fractions
  whose product with the remaining count lands on .5, repeated calls (each prunes a fraction of
  what is left, already-pruned weights excluded even when they are not zero), per-layer and
  global scope, and a chosen set of layers; random_prune removes the same counts among kept
  weights; rewind gives the kept weights their earlier values."""
  rng = np.random.default_rng(6)
  params = _magnitude_params(rng)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  sel = [i for i, (path, leaf) in enumerate(flat) if _selected(path, leaf)]
  assert len(sel) == 3
  for scope, fractions in (("layer", (0.25, 0.3, 0.5, 1 / 6, 0.0, 1.0)),
                           ("global", (0.125, 0.3, 0.7, 1.0))):
    p = params
    masks = jax.tree.map(lambda a: np.ones(np.shape(a), bool), params)
    masks["dense"]["kernel"][0, :2] = False          # pruned earlier, weights left nonzero
    masks["z_out"]["kernel"][1] = False
    for step, fraction in enumerate(fractions):
      leaves = [np.asarray(l) for l in jax.tree.leaves(p)]
      mleaves = [np.asarray(m) for m in jax.tree.leaves(masks)]
      want, removed, thr = ref_magnitude([leaves[i] for i in sel], [mleaves[i] for i in sel],
                                         fraction, scope)
      got_p, got_m, rep = magnitude_prune(p, masks, fraction, scope=scope)
      tag = f"{scope} step {step} fraction {fraction}"
      gm = [np.asarray(m) for m in jax.tree.leaves(got_m)]
      gp = [np.asarray(l) for l in jax.tree.leaves(got_p)]
      for k, i in enumerate(sel):
        np.testing.assert_array_equal(gm[i], want[k], err_msg=tag)
        np.testing.assert_array_equal(gp[i], np.where(want[k], leaves[i], 0.0), err_msg=tag)
      for i in set(range(len(leaves))) - set(sel):
        np.testing.assert_array_equal(gm[i], mleaves[i], err_msg=tag)   # untouched
        np.testing.assert_array_equal(gp[i], leaves[i], err_msg=tag)
      assert np.asarray(rep.removed).tolist() == removed, tag
      assert np.asarray(rep.kept).tolist() == [int(w.sum()) for w in want], tag
      assert int(rep.count) == sum(removed), tag
      np.testing.assert_array_equal(np.asarray(rep.threshold), np.float32(thr), err_msg=tag)
      # random pruning: the same counts (per leaf with scope='layer'), only among kept weights
      _, rm, rrep = random_prune(p, masks, fraction, key=jax.random.key(step), scope=scope)
      rleaves = [np.asarray(m) for m in jax.tree.leaves(rm)]
      for k, i in enumerate(sel):
        assert not np.any(rleaves[i] & ~mleaves[i]), tag
      rcounts = [int(mleaves[i].sum() - rleaves[i].sum()) for i in sel]
      if scope == "layer":
        assert rcounts == removed, tag
      assert sum(rcounts) == sum(removed) == int(rrep.count), tag
      p, masks = got_p, jax.tree.map(np.asarray, got_m)

  # a chosen set of layers: only `dense/kernel` and the rank-1 `dense/bias` are ranked
  masks = jax.tree.map(lambda a: np.ones(np.shape(a), bool), params)
  got_p, got_m, rep = magnitude_prune(params, masks, 0.5, scope="global",
                                      select=["dense/kernel", "dense/bias"])
  d = [params["dense"]["bias"], params["dense"]["kernel"]]           # tree order: bias first
  want, removed, _ = ref_magnitude(d, [np.ones(a.shape, bool) for a in d], 0.5, "global")
  np.testing.assert_array_equal(np.asarray(got_m["dense"]["bias"]), want[0])
  np.testing.assert_array_equal(np.asarray(got_m["dense"]["kernel"]), want[1])
  assert np.asarray(rep.removed).tolist() == removed
  np.testing.assert_array_equal(np.asarray(got_m["conv"]["kernel"]), True)

  # lottery-ticket rewinding: kept weights take the saved values, pruned ones 0
  init = jax.tree.map(lambda a: (a * 3 + 1).astype(a.dtype), params)
  rew = jaxprune.rewind(got_p, init, got_m)
  for r, i, m in zip(jax.tree.leaves(rew), jax.tree.leaves(init), jax.tree.leaves(got_m)):
    np.testing.assert_array_equal(np.asarray(r), np.where(np.asarray(m), np.asarray(i), 0))


# ----------------------------------------------------------------------------- 4. importance


def ref_importance(kernel, norm):
  """Per unit (last axis) score of its incoming kernel weights: RMS sqrt(mean a^2) (Luan's I),
  the L1 norm sum |a| or the L2 norm sqrt(sum a^2)."""
  a = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
  return {"rms": np.sqrt(np.mean(a ** 2, axis=0)), "l1": np.sum(np.abs(a), axis=0),
          "l2": np.sqrt(np.sum(a ** 2, axis=0))}[norm]


def test_importance_scores_and_prune_match_reference(mlp):
  """Scores (rms / l1 / l2, dense columns and conv filters) and importance_prune's choice (k
  least important kept units, ties to the lower index, one unit always kept) agree with the
  reference, with removed units' slices zeroed."""
  model, params0 = mlp
  rng = np.random.default_rng(7)
  p = jax.tree.map(np.array, params0)
  k = (rng.integers(-4, 5, size=(IN, H)) / 4.0).astype(np.float32)
  k[:, 4] = -k[:, 1][::-1]                              # the same scores as unit 1: a tie
  p["params"]["hidden_0"]["kernel"][:] = k
  p["params"]["hidden_0"]["bias"][:] = 5.0              # biases are not part of the score
  for norm in ("rms", "l1", "l2"):
    np.testing.assert_allclose(np.asarray(importance_scores(p, model, "hidden_0", norm=norm)),
                               ref_importance(k, norm), rtol=1e-6, err_msg=norm)
  lenet = jaxprune.LeNet(input_shape=(10, 10, 1), channels=(4, 3), kernels=(3, 3))
  lp = lenet.init(jax.random.key(8))
  np.testing.assert_allclose(np.asarray(importance_scores(lp, lenet, "conv_1")),
                             ref_importance(np.asarray(lp["params"]["conv_1"]["kernel"]), "rms"),
                             rtol=1e-6)
  scores = ref_importance(k, "rms")
  prune = importance_prune(model, "hidden_0")
  for alive, n in (([1] * H, 2), ([1, 0, 1, 1, 1, 0], 2), ([1] * H, 0), ([1, 1, 0, 1, 1, 1], 6)):
    alive = np.array(alive, bool)
    pz = _zero_units(p, ~alive)
    order = sorted(np.flatnonzero(alive), key=lambda u: (scores[u], u))
    drop = order[:min(n, len(order) - 1)]               # at least one unit is kept
    want = alive.copy()
    want[drop] = False
    got, masks, rep = prune(pz, {"hidden_0": jnp.asarray(alive)}, n)
    tag = f"alive {alive.astype(int)} k={n}"
    np.testing.assert_array_equal(np.asarray(masks["hidden_0"]), want, err_msg=tag)
    assert int(rep.removed) == len(drop), tag
    assert bool(rep.kept_last) == (n >= alive.sum()), tag
    np.testing.assert_array_equal(np.asarray(got["params"]["hidden_0"]["kernel"]),
                                  np.where(want, pz["params"]["hidden_0"]["kernel"], 0), tag)
    np.testing.assert_array_equal(np.asarray(got["params"]["out"]["kernel"]),
                                  np.where(want[:, None], pz["params"]["out"]["kernel"], 0), tag)


def test_weight_pruners_see_the_network_the_masks_of_other_groups_describe():
  """A removed unit of the layer before keeps its row in this group's kernel until something
  zeroes it. weight_distinctiveness and importance_prune ignored it being removed, unlike
  iterative_importance: hidden_1's units 0 and 1 are duplicates only without that row, and
  their importance order flips with it. Every pruner from weights now gives what it gives on
  the masked params (apply_masks(params, expand(params, model, unit_masks))), and returns
  those params."""
  model = jaxprune.MLP(in_features=4, hidden=(3, 3), out_features=2)
  p = jax.tree.map(np.array, model.init(jax.random.key(0)))
  um = {"hidden_0": jnp.asarray([True, True, False]), "hidden_1": jnp.ones(3, bool)}
  tree_equal = lambda a, b: jax.tree.all(jax.tree.map(np.array_equal, a, b))
  dup = np.array([[1., 1., .3], [2., 2., -1.], [5., -5., .7]], np.float32)  # row 2: removed unit
  rank = np.array([[1., 2., 1.2], [1., 2., 1.2], [5., 0., 0.]], np.float32)
  for prune, kernel, args, want in (
      (weight_distinctiveness(model, "hidden_1"), dup, (15.0, 165.0), [1, 0, 1]),
      (importance_prune(model, "hidden_1"), rank, (1,), [0, 1, 1])):
    p["params"]["hidden_1"]["kernel"] = kernel
    masked = jaxprune.apply_masks(p, jaxprune.expand(p, model, um))
    out, ref = prune(p, um, *args), prune(masked, um, *args)
    assert tree_equal(out[0], ref[0]) and tree_equal(out[1], ref[1])
    assert np.asarray(out[1]["hidden_1"]).astype(int).tolist() == want
  # the other direction (outgoing vectors read the next group's masks) and until_stable
  um2 = {"hidden_0": jnp.ones(3, bool), "hidden_1": jnp.asarray([True, False, True])}
  p["params"]["hidden_1"]["kernel"] = np.array([[1., 9., 2.], [1., -7., 2.], [3., 0., 1.]],
                                               np.float32)   # rows 0 and 1 equal but column 1
  masked2 = jaxprune.apply_masks(p, jaxprune.expand(p, model, um2))
  wd = weight_distinctiveness(model, "hidden_0", source="outgoing", constants=False)
  out = wd(p, um2, 15.0, 165.0)
  assert np.asarray(out[1]["hidden_0"]).astype(int).tolist() == [1, 0, 1]
  assert tree_equal(out[0], wd(masked2, um2, 15.0, 165.0)[0])
  st = until_stable(wd, p, um2, 15.0, 165.0)
  assert tree_equal(st[:2], until_stable(wd, masked2, um2, 15.0, 165.0)[:2])
  assert np.asarray(st[1]["hidden_0"]).astype(int).tolist() == [1, 0, 1]

  # A layer that reads and feeds the same group keeps rows of the group's own removed units
  # (found by review: unit 0's row of w1 made unit 1 the most important)
  def selfcoupled(q, x):
    h = x @ q["w0"]
    h = h + jnp.tanh(h @ q["w1"])
    return h @ q["w2"]

  q = {"w0": jnp.ones((2, 3)), "w1": jnp.array([[0., 9., 0.], [0., 1., 0.], [0., 0., 1.]]),
       "w2": jnp.ones((3, 2))}
  t = jaxprune.trace(selfcoupled, q, jnp.ones((4, 2)))
  (g,) = t.groups
  um3 = {g: jnp.asarray([False, True, True])}
  ref = jaxprune.apply_masks(q, jaxprune.expand(q, t, um3))
  for prune, args in ((importance_prune(t, g), (1,)), (weight_distinctiveness(
      t, g, constants=False, complementary=False), (50.0,))):
    out, want = prune(q, um3, *args), prune(ref, um3, *args)
    assert tree_equal(out[:2], want[:2])
  assert np.asarray(importance_prune(t, g)(q, um3, 1)[1][g]).tolist() == [False, False, True]


def test_importance_of_huge_and_tiny_weights_and_the_plain_formula_s_bits():
  """Squares of float32 weights of 1e19 and more overflowed: every score inf, importance_prune
  changed nothing (invalid) and iterative_importance removed units in index order. Scaled by a
  power of two per unit, the scores are the true RMS / L2 there and for tiny weights, and the
  plain formula's bits elsewhere."""
  model = jaxprune.MLP(in_features=4, hidden=(3,), out_features=2)
  um = jaxprune.unit_masks_ones(model)
  p = model.init(jax.random.key(0))
  for scale in (1e19, 1e-25):
    k = np.array([[3., 1., 2.]] * 4, np.float32) * np.float32(scale)
    p["params"]["hidden_0"]["kernel"] = jnp.asarray(k)
    for norm in ("rms", "l2"):
      np.testing.assert_allclose(np.asarray(importance_scores(p, model, "hidden_0", norm=norm)),
                                 ref_importance(k.astype(np.float64), norm), rtol=1e-6)
    _, masks, rep = importance_prune(model, "hidden_0")(p, um, 1)
    assert np.asarray(masks["hidden_0"]).tolist() == [True, False, True]
    assert not bool(rep.invalid)
    _, _, rep = iterative_importance(model, "hidden_0", lambda q: jnp.float32(0.0))(p, um, 0.1)
    assert np.asarray(rep.removed)[1:int(rep.count)].tolist() == [1, 2]
  rng = np.random.default_rng(3)
  for _ in range(5):
    p["params"]["hidden_0"]["kernel"] = host_f32(
        rng.normal(size=(4, 3)) * 10.0 ** rng.integers(-3, 4, size=3))
    plain = jnp.sqrt(jnp.mean(p["params"]["hidden_0"]["kernel"] ** 2, axis=0))
    np.testing.assert_array_equal(importance_scores(p, model, "hidden_0"), plain)


def test_iterative_importance_flags_bad_traced_input_and_changes_nothing(mlp):
  """Under jit NaN kernels, a NaN or negative max_rise and a non-finite starting loss cannot
  raise: the run used to rank NaN scores or stop without a word. It now removes nothing,
  returns the params as given and sets report.invalid (concrete values still raise)."""
  model, params = mlp
  um = jaxprune.unit_masks_ones(model)
  x = jnp.ones((4, IN))
  good = lambda q: jnp.mean(model.apply(q, x) ** 2)
  nan_kernel = jax.tree.map(np.array, params)
  nan_kernel["params"]["hidden_0"]["kernel"][0, 1] = np.nan
  for p, loss, rise in ((params, good, jnp.nan), (params, good, -1.0),
                        (nan_kernel, lambda q: jnp.float32(0.0), 0.1),
                        (params, lambda q: jnp.float32(jnp.inf), 0.1)):
    run = iterative_importance(model, "hidden_0", loss)
    out, masks, rep = jax.jit(run)(p, um, rise)
    assert bool(rep.invalid) and int(rep.count) == 1
    assert bool(jnp.all(masks["hidden_0"]))
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b, equal_nan=True), out, p))
  _, masks, rep = jax.jit(iterative_importance(model, "hidden_0", good))(params, um, 10.0)
  assert not bool(rep.invalid) and int(rep.count) == H and int(masks["hidden_0"].sum()) == 1


def test_iterative_importance_stops_at_the_exact_step(mlp):
  """Hand-built: removing unit u raises the loss by exactly r_u (dyadic, so float32 is exact);
  the loop removes units in order of importance and stops before the cumulative rise exceeds
  max_rise (a rise equal to max_rise is allowed; relative=True scales it by |loss0|)."""
  model, params0 = mlp
  p = jax.tree.map(np.array, params0)
  rms = np.array([0.5, 0.75, 2.0, 0.25, 1.0, 0.5])     # units 0 and 5 tie: 0 goes first
  p["params"]["hidden_0"]["kernel"][:] = rms[None, :]   # RMS of a constant column is its value
  rise = np.array([0.03125, 0.0625, 0.5, 0.03125, 0.125, 0.03125])
  p["params"]["out"]["kernel"][:] = 0.0
  p["params"]["out"]["kernel"][:, 0] = rise
  loss = lambda q: 8.0 - jnp.sum(jnp.abs(q["params"]["out"]["kernel"]))
  loss0 = 8.0 - rise.sum()
  order = [3, 0, 5, 1, 4, 2]                              # by (importance, index)
  cum = np.cumsum(rise[order])                            # 1/32, 2/32, 3/32, 5/32, 9/32, ...
  run = iterative_importance(model, "hidden_0", loss)
  run_relative = iterative_importance(model, "hidden_0", loss, relative=True)
  for max_rise, relative, n in ((0.09375, False, 3), (0.1, False, 3), (0.09, False, 2),
                                (0.0, False, 0), (0.28125, False, 5), (1.0, False, 5),
                                (0.1 / loss0, True, 3)):
    _, masks, rep = (run_relative if relative else run)(p, jaxprune.unit_masks_ones(model),
                                                        np.float32(max_rise))
    tag = f"max_rise={max_rise} relative={relative}"
    want = np.ones(H, bool)
    want[order[:n]] = False
    np.testing.assert_array_equal(np.asarray(masks["hidden_0"]), want, err_msg=tag)
    assert int(rep.count) == n + 1, tag                   # row 0 is the start
    assert np.asarray(rep.removed[1:n + 1]).tolist() == order[:n], tag
    assert np.asarray(rep.units_kept[:n + 1]).tolist() == list(range(H, H - n - 1, -1)), tag
    np.testing.assert_allclose(np.asarray(rep.loss[:n + 1]), loss0 + np.r_[0, cum[:n]],
                               rtol=0, atol=1e-6, err_msg=tag)
    stopped = loss0 + cum[n] if n < H - 1 else math.nan
    np.testing.assert_allclose(float(rep.stopped_loss), stopped, atol=1e-6, err_msg=tag)

  # a unit masked before the call: the start is the masked network, and the unit never returns
  alive = np.array([1, 1, 1, 0, 1, 1], bool)
  _, masks, rep = run(p, {"hidden_0": jnp.asarray(alive)}, 0.09375)
  start = loss0 + rise[3]
  assert np.asarray(rep.removed[1:int(rep.count)]).tolist() == [0, 5]   # 2/32, 3/32; 5/32 no
  np.testing.assert_allclose(float(rep.loss[0]), start, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(masks["hidden_0"]), [0, 1, 1, 0, 1, 0])


# ----------------------------------------------------------------------------- 5. GA fitness


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def test_ga_fitness_eq5_eq6_match_numpy_evaluation():
  """eq. 5 (accuracy in percent - lam * kept / initial) and eq. 6 (- lam * kept) of given masks,
  on the fast path (last hidden layer) and the full forward path (first of two layers), equal a
  NumPy forward pass of the masked network."""
  rng = np.random.default_rng(9)
  x = rng.normal(size=(30, 4)).astype(np.float32)
  y = rng.integers(0, 3, size=30).astype(np.int32)
  pop = rng.random((10, H)) < 0.5
  pop[0], pop[1] = False, True
  for hidden, group in (((H,), "hidden_0"), ((H, 5), "hidden_0")):
    model = jaxprune.MLP(in_features=4, hidden=hidden, out_features=3)
    params = jax.tree.map(np.asarray, model.init(jax.random.key(10)))
    ps = params["params"]

    def forward(mask, ps=ps, hidden=hidden):
      h = _sigmoid(x.astype(np.float64) @ ps["hidden_0"]["kernel"] + ps["hidden_0"]["bias"])
      h = h * mask
      if len(hidden) == 2:
        h = _sigmoid(h @ ps["hidden_1"]["kernel"] + ps["hidden_1"]["bias"])
      return h @ ps["out"]["kernel"] + ps["out"]["bias"]

    acc = np.array([100.0 * np.mean(np.argmax(forward(m), axis=1) == y) for m in pop])
    kept = pop.sum(axis=1)
    for eq, lam, want in (("eq5", 10.0, acc - 10.0 * kept / H), ("eq6", 2.5, acc - 2.5 * kept)):
      fit = ga.make_fitness(model, group, eq)
      assert fit.fast == (len(hidden) == 1)
      got = fit(jnp.asarray(pop), fit.prepare(params, x, y), ga.GAHyperparams(lam=lam))
      np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4,
                                 err_msg=f"{hidden} {eq}")
