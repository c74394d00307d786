"""Distinctiveness checked against an independent NumPy reference written from the DESIGN text
(the one-pair-at-a-time walk, float64 angles), and regressions found while probing it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune.pruners import (distinctiveness, pairwise_angles, report_actions, until_stable,
                              weight_distinctiveness)
from jaxprune.pruners.angles import weight_angles
from conftest import host_f32


# ----------------------------------------------------------------------------- the reference


def _ref_angles(v):
  """Degrees between the rows of v (float64), NaN for zero rows."""
  v = np.asarray(v, np.float64)
  n = np.linalg.norm(v, axis=1)
  u = v / np.where(n > 0, n, 1.0)[:, None]
  d = np.linalg.norm(u[:, None] - u[None], axis=2)
  s = np.linalg.norm(u[:, None] + u[None], axis=2)
  a = np.degrees(2 * np.arctan2(d, s))
  z = n == 0
  a[z[:, None] | z[None, :]] = np.nan
  return a


def _ref_walk(ang, ok, sim, comp, absorb=False):
  """The sequential sweep: qualifying pairs by excess (desc), similar first, then (i, j)."""
  h = ang.shape[0]
  cands = []
  for i in range(h):
    for j in range(i + 1, h):
      if ok[i] and ok[j]:
        if ang[i, j] < sim:
          cands.append((sim - ang[i, j], 0, i, j))
        elif ang[i, j] > comp:
          cands.append((ang[i, j] - comp, 1, i, j))
  cands.sort(key=lambda c: (-c[0], c[1], c[2], c[3]))
  state = ["free"] * h
  out = []
  for _, kind, i, j in cands:
    if kind == 0 and absorb:
      if "used" in (state[i], state[j]) or state[i] == state[j] == "keeper":
        continue
      keep, rem = (j, i) if state[j] == "keeper" else (i, j)
      state[keep], state[rem] = "keeper", "used"
      out.append(("similar", keep, rem))
    elif state[i] == state[j] == "free":
      state[i], state[j] = ("keeper", "used") if kind == 0 else ("used", "used")
      out.append(("similar" if kind == 0 else "complementary", i, j))
  return out


def _ref_sweep(w2, b2, acts, mask, shift, sim, comp, tol=1e-6, absorb=False, fold=False,
               compensate=False):
  """One activation sweep on a dense consumer (w2: (H, out), b2: (out,))."""
  a = np.asarray(acts, np.float64).T
  h = a.shape[0]
  v = a - shift
  v[~mask] = 0
  const = mask & (np.ptp(a, axis=1) < tol)
  ok = mask & ~const & (np.linalg.norm(v, axis=1) > 0)
  pairs = _ref_walk(_ref_angles(v), ok, sim, comp, absorb)
  mean = a.mean(axis=1)
  w, b, removed = w2.astype(np.float64).copy(), b2.astype(np.float64).copy(), ~mask.copy()
  actions = []
  for u in np.flatnonzero(const):
    b += mean[u] * w2[u]
    removed[u] = True
    actions.append(("constant", int(u), -1))
  for kind, i, j in pairs:
    actions.append((kind, i, j))
    if kind == "similar":
      w[i] += w2[j]
      removed[j] = True
    elif fold:
      w[i] -= w2[j]
      b += (mean[i] + mean[j]) * w2[j]
      removed[j] = True
    else:
      removed[i] = removed[j] = True
      if compensate:
        b += mean[i] * w2[i] + mean[j] * w2[j]
  keep = ~removed
  w[~keep] = 0
  return keep, actions, w, b


def _got(report):
  return [(a["kind"],) + (a["kept"] + a["removed"] + (-1,))[:2]
          for a in report_actions(report)]


# ----------------------------------------------------------------------------- reference checks


H, P = 10, 12  # the shared model's units and patterns (one compiled sweep for every test)


@pytest.fixture(scope="module")
def tanh_model():
  model = jaxprune.MLP(in_features=3, hidden=(H,), out_features=2, activation="tanh")
  return model, model.init(jax.random.key(0))


def test_sweep_matches_the_sequential_reference(tanh_model):
  """Duplicates, opposites, constants, noisy copies and masked units; every rule variant."""
  model, params = tanh_model
  w2 = np.asarray(params["params"]["out"]["kernel"])
  b2 = np.asarray(params["params"]["out"]["bias"])
  for seed in range(4):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(P, 3))
    acts = rng.normal(size=(P, H))
    for u in range(H):
      r = rng.integers(5)
      if r < 3:
        acts[:, u] = (-1.0) ** r * base[:, rng.integers(3)] if r < 2 else 0.3
      elif r == 3:
        acts[:, u] = base[:, rng.integers(3)] * rng.uniform(0.5, 2) + 0.05 * rng.normal(size=P)
    acts = acts.astype(np.float32)
    mask = rng.random(H) > 0.15
    masks = {"hidden_0": jnp.asarray(mask)}
    sim, comp = [(15.0, 165.0), (40.0, 140.0), (0.0, 180.0), (30.0, 150.0)][seed]
    for kw in ({}, {"absorb": True}, {"fold": True}, {"compensate": True}):
      new, m, rep = distinctiveness(model, "hidden_0", **kw)(params, masks, acts, sim, comp)
      keep, actions, w, b = _ref_sweep(w2, b2, acts, mask, 0.0, sim, comp, **kw)
      assert not bool(rep.kept_last)
      assert _got(rep) == actions, (seed, kw)
      np.testing.assert_array_equal(np.asarray(m["hidden_0"]), keep)
      np.testing.assert_allclose(new["params"]["out"]["kernel"], w, atol=1e-5)
      np.testing.assert_allclose(new["params"]["out"]["bias"], b, atol=1e-5)
      assert not np.any(np.asarray(new["params"]["hidden_0"]["kernel"])[:, ~keep])


def test_weight_sweep_matches_the_reference(tanh_model):
  model, params = tanh_model
  p = jax.tree.map(np.array, params)
  k = p["params"]["hidden_0"]["kernel"]
  k[:, 3], k[:, 5], k[:, 7] = k[:, 0], -k[:, 1], 0.0     # a duplicate, an opposite, a zero
  params = jax.tree.map(jnp.asarray, p)
  w1, b1 = k.astype(np.float64), p["params"]["hidden_0"]["bias"].astype(np.float64)
  w2 = p["params"]["out"]["kernel"].astype(np.float64)
  b2 = p["params"]["out"]["bias"].astype(np.float64)
  const = np.linalg.norm(w1.T, axis=1) < 1e-6
  pairs = _ref_walk(_ref_angles(w1.T), ~const, 15.0, 165.0)
  w, b = w2.copy(), b2.copy()
  keep = np.ones(H, bool)
  for u in np.flatnonzero(const):         # zero incoming weights: the unit outputs tanh(bias)
    keep[u] = False
    b += np.tanh(b1[u]) * w2[u]
  for kind, i, j in pairs:
    keep[j] = False
    if kind == "similar":
      w[i] += w2[j]
    else:
      keep[i] = False
  w[~keep] = 0
  new, m, rep = weight_distinctiveness(model, "hidden_0")(params, jaxprune.unit_masks_ones(model))
  assert _got(rep) == [("constant", 7, -1)] + pairs
  assert ("similar", 0, 3) in pairs and ("complementary", 1, 5) in pairs
  np.testing.assert_array_equal(np.asarray(m["hidden_0"]), keep)
  np.testing.assert_allclose(new["params"]["out"]["kernel"], w, atol=1e-6)
  np.testing.assert_allclose(new["params"]["out"]["bias"], b, atol=1e-6)


# ----------------------------------------------------------------------------- functional checks


def test_traced_plain_function_duplicates_and_fold_keep_outputs():
  """A plain JAX function over a dict: merging an exact duplicate and folding o_j = 1 - o_i
  leave the outputs unchanged; removing the complementary pair outright does not."""
  rng = np.random.default_rng(0)
  w1 = rng.normal(size=(4, 6)).astype(np.float32)
  b1 = rng.normal(size=6).astype(np.float32)
  w1[:, 3], b1[3] = w1[:, 0], b1[0]        # unit 3 = unit 0
  w1[:, 4], b1[4] = -w1[:, 1], -b1[1]      # sigmoid(-z) = 1 - sigmoid(z)
  params = {"l1": {"w": jnp.asarray(w1), "b": jnp.asarray(b1)},
            "l2": {"w": host_f32(rng.normal(size=(6, 2))),
                   "b": jnp.zeros(2)}}

  def f(p, x):
    return jax.nn.sigmoid(x @ p["l1"]["w"] + p["l1"]["b"]) @ p["l2"]["w"] + p["l2"]["b"]

  x = host_f32(rng.normal(size=(50, 4)))
  t = jaxprune.trace(f, params, x)
  acts = t.activations(params, x, "l1")
  y0 = f(params, x)
  new, m, _ = distinctiveness(t, "l1", fold=True)(params, jaxprune.unit_masks_ones(t), acts,
                                                  1.0, 179.0)
  assert np.asarray(m["l1"]).tolist() == [True, True, True, False, False, True]
  np.testing.assert_allclose(f(new, x), y0, atol=1e-5)
  new, m, _ = distinctiveness(t, "l1")(params, jaxprune.unit_masks_ones(t), acts, 1.0, 179.0)
  assert np.asarray(m["l1"]).tolist() == [True, False, True, False, False, True]
  assert float(jnp.max(jnp.abs(f(new, x) - y0))) > 1e-2


# ----------------------------------------------------------------------------- regressions


def test_until_stable_ends_when_only_a_constant_unit_is_left(tanh_model):
  """Every unit constant: the first sweep removes all but one (kept_last); the next sweep
  removes the last one and keeps it back, which changes nothing. until_stable used to repeat
  that sweep forever (2**31 times without max_sweeps)."""
  model, params = tanh_model
  acts = np.full((P, H), 0.3, np.float32)
  prune = distinctiveness(model, "hidden_0")
  two = {"hidden_0": np.arange(H) < 2}                  # two constant units in play
  new, m, rep = until_stable(prune, params, two, acts, max_sweeps=20)
  assert int(rep.sweeps) == 2 and bool(rep.stable) and int(rep.actions) == 2
  assert np.asarray(m["hidden_0"]).tolist() == [True] + [False] * (H - 1)
  # unit 1's constant output 0.3 went into the bias; unit 0 still sends its own
  w2 = np.asarray(params["params"]["out"]["kernel"])
  np.testing.assert_allclose(new["params"]["out"]["bias"],
                             np.asarray(params["params"]["out"]["bias"]) + 0.3 * w2[1],
                             atol=1e-6)
  # one constant unit from the start: nothing to do, no loop
  one = {"hidden_0": np.arange(H) == 1}
  _, m1, rep1 = until_stable(prune, params, one, acts, max_sweeps=20)
  assert int(rep1.sweeps) == 1 and int(rep1.actions) == 0 and bool(rep1.stable)
  assert np.array_equal(m1["hidden_0"], one["hidden_0"])


def test_pairwise_angles_names_a_wrong_shape():
  with pytest.raises(ValueError, match="2-D"):
    pairwise_angles(np.ones(3, np.float32))


def test_weight_angles_names_a_wrong_group():
  model = jaxprune.MLP(in_features=3, hidden=(4,), out_features=2)
  with pytest.raises(TypeError, match="UnitGroup"):
    weight_angles(model.init(jax.random.key(0)), "hidden_0")


def test_vectors_too_long_for_float32_norms_merge_nothing(tanh_model):
  """Entries of 1e19 overflow a float32 sum of squares: every vector used to normalise to zero
  and read as a duplicate of every other, so the sweep merged all units into one. Independent
  random vectors have no pair below 15 degrees (the float64 reference finds none)."""
  model, params = tanh_model
  a = np.random.default_rng(0).normal(size=(P, H))
  ang = _ref_angles(a.T)
  assert not np.any(ang[np.triu_indices(H, 1)] < 15.0)
  prune = distinctiveness(model, "hidden_0", complementary=False)
  um = jaxprune.unit_masks_ones(model)
  big = (a * 1e19).astype(np.float32)
  with pytest.raises(ValueError, match=r"Activations of 10 unit\(s\) of group 'hidden_0' .* "
                     "too large for float32"):
    prune(params, um, big)                             # concrete: refused before any work
  prune(params, um, (a * 1e17).astype(np.float32))    # large but within range: runs
  _, m, rep = jax.jit(prune)(params, um, big)          # traced: nothing changed, flagged
  assert np.asarray(m["hidden_0"]).all() and int(rep.count) == 0
  assert bool(rep.invalid)


def test_pairwise_angles_of_rows_too_long_or_too_short_for_float32_squares():
  """Two rows at 60 degrees scaled past float32's sum-of-squares range used to read 0 degrees
  (entries of 1e20: the norms overflowed), then NaN; rows of entries near 1e-20 (their squares
  flush to zero) read NaN, as zero rows. Each row is now scaled by a power of two first, so both
  give the angles of the rows at unit scale, bit for bit; inf rows and zero rows have none."""
  v = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [1.0, 1.0, 0.0]], np.float32)
  ref = np.asarray(pairwise_angles(v))
  np.testing.assert_allclose(ref[0, 1], 60.0, atol=1e-3)   # the reference
  for scale in (2.0 ** 70, 2.0 ** -70, 2.0 ** 120, 2.0 ** -120):   # exact in float32
    s = v * np.array([[scale], [scale], [1.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(pairwise_angles(s)), ref)
  for scale in (1e20, 1e-20):            # not powers of two: the rows' bits change slightly
    s = (v * np.array([[scale], [scale], [1.0]])).astype(np.float32)
    np.testing.assert_allclose(np.asarray(pairwise_angles(s)), ref, atol=0.05)
  bad = v.copy()
  bad[0, 0], bad[1] = np.inf, 0.0
  a = np.asarray(pairwise_angles(bad))
  assert np.isnan(a[:2]).all() and np.isnan(a[:, :2]).all()
  np.testing.assert_allclose(a[2, 2], 0.0)


def test_vectors_of_tiny_entries_have_their_angle_in_the_sweep():
  """A unit whose activations (or incoming weights) are a tiny multiple of another's: their
  float32 squares flush to zero, so the unit had no angle (at 1e-20) or a wrong one (3.9
  degrees at 1e-19) and was never merged. Scaled by powers of two it is a duplicate (0
  degrees), merged like one at unit scale."""
  model = jaxprune.MLP(in_features=5, hidden=(3,), out_features=2, activation="linear")
  params = model.init(jax.random.key(0))
  um = jaxprune.unit_masks_ones(model)
  base = np.array([1.0, 2.0, -1.0, 3.0, 0.5, 1.5], np.float32)
  other = np.array([0.0, 1.0, 4.0, 0.0, 2.0, 0.0], np.float32)
  prune = distinctiveness(model, "hidden_0", constants=False)
  for scale in (2.0 ** -66, 2.0 ** -70, 2.0 ** -100):
    acts = np.stack([base, base * np.float32(scale), other], 1)
    _, m, rep = prune(params, um, acts, 5.0, 175.0)
    np.testing.assert_array_equal(np.asarray(m["hidden_0"]), [True, False, True])
    assert int(rep.count) == 1 and int(rep.kind[0]) == 1 and float(rep.angle[0]) == 0.0
  k = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
  k[:, 1] = k[:, 0] * np.float32(2.0 ** -70)
  wparams = jax.tree.map(np.array, params)
  wparams["params"]["hidden_0"]["kernel"] = k
  _, m, rep = weight_distinctiveness(model, "hidden_0", source="incoming", constants=False)(
      wparams, um, 5.0, 175.0, 0.0)
  np.testing.assert_array_equal(np.asarray(m["hidden_0"]), [True, False, True])
  assert float(rep.angle[0]) == 0.0


@pytest.mark.parametrize("source", ["activations", "weights"])
def test_a_tolerance_that_is_not_one_number_is_named(tanh_model, source):
  """None, a string or an array of tolerances failed with NumPy's or jit's own message."""
  model, params = tanh_model
  masks = {"hidden_0": jnp.ones(H, bool)}
  if source == "activations":
    prune = distinctiveness(model, "hidden_0")
    acts = model.activations(params, jnp.ones((P, 3)), "hidden_0")
    call = lambda tol: prune(params, masks, acts, 15.0, 165.0, tol)
  else:
    prune = weight_distinctiveness(model, "hidden_0")
    call = lambda tol: prune(params, masks, 15.0, 165.0, tol)
  for tol in (None, "1e-6"):
    with pytest.raises(TypeError, match="constant_tol must be a number >= 0"):
      call(tol)
  with pytest.raises(ValueError, match=r"constant_tol must be one number, got shape \(2,\); "
                     "to run several tolerances, jax.vmap"):
    call(jnp.asarray([1e-6, 1e-3]))
