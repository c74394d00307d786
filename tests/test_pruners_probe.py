"""Magnitude, random and importance pruners against independent NumPy references written from
the design's semantics (not from the code), and the input checks found missing by probing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune.pruners import (importance_prune, importance_scores, iterative_importance,
                              magnitude_prune, random_prune)
from jaxprune.pruners import magnitude as magnitude_lib
from conftest import host_f32


def _ref_magnitude(leaves, masks, fraction, scope):
  """DESIGN: remove round(fraction x remaining) kept weights with the smallest |w| (remaining
  excludes weights already pruned); ties by tree order, then flat index; half-to-even rounding
  of the float32 product."""
  ws = [np.abs(np.asarray(w, np.float64)).ravel() for w in leaves]
  ms = [np.asarray(m, bool).ravel().copy() for m in masks]

  def one_scope(ws, ms):
    w, m = np.concatenate(ws), np.concatenate(ms)
    k = int(np.round(np.float32(fraction) * np.float32(m.sum())))
    order = [i for i in sorted(range(w.size), key=lambda i: (w[i], i)) if m[i]]
    m[order[:k]] = False
    return np.split(m, np.cumsum([x.size for x in ws])[:-1])

  if scope == "global":
    return one_scope(ws, ms)
  return [one_scope([w], [m])[0] for w, m in zip(ws, ms)]


def test_magnitude_matches_a_numpy_reference_on_ties_equal_layers_and_masks():
  """Random and hand-built cases: many ties (small integers, zeros), a layer of all-equal
  weights, magnitudes over 60 decades, already-masked weights, fractions 0 and 1, both scopes."""
  rng = np.random.default_rng(0)
  shapes = [(5, 7), (3, 3), (2, 4)]
  kinds = [lambda s: rng.normal(size=s),
           lambda s: rng.integers(-3, 4, size=s).astype(float),
           lambda s: np.full(s, -0.7),
           lambda s: rng.normal(size=s) * 10.0 ** rng.integers(-30, 30, size=s)]
  for trial in range(8):
    ws = [kinds[(trial + i) % 4](s).astype(np.float32) for i, s in enumerate(shapes)]
    ms = [rng.random(s) < (1.0, 0.6, 0.15)[trial % 3] for s in shapes]
    fraction = (0.0, 1.0, 0.5, 1 / 3, 0.25, 0.05, 0.999, float(rng.random()))[trial % 8]
    p = {f"l{i}": jnp.asarray(w) for i, w in enumerate(ws)}
    wm = {f"l{i}": jnp.asarray(m) for i, m in enumerate(ms)}
    for scope in ("layer", "global"):
      q, got, rep = magnitude_prune(p, wm, fraction, scope=scope)
      want = _ref_magnitude(ws, ms, fraction, scope)
      for i, w in enumerate(want):
        np.testing.assert_array_equal(np.asarray(got[f"l{i}"]).ravel(), w)
        np.testing.assert_array_equal(np.asarray(q[f"l{i}"]).ravel(),
                                      np.where(w, ws[i].ravel(), 0.0))
      removed = [m.ravel() & ~w for m, w in zip(ms, want)]
      assert rep.removed.tolist() == [int(r.sum()) for r in removed]
      assert rep.kept.tolist() == [int(w.sum()) for w in want]


def test_random_prune_counts_uniform_reproducible_and_blind_to_magnitudes():
  # Weights that grow with position: magnitude would take the smallest; random spreads its
  # removals evenly (each block of 200 loses about its share, 3 standard errors allowed).
  p = {"a": jnp.arange(200.0).reshape(4, 50), "b": jnp.arange(2000.0).reshape(40, 50)}
  _, ms, rep = random_prune(p, None, 0.3, key=jax.random.key(5))
  assert rep.removed.tolist() == [60, 600]
  np.testing.assert_allclose((~np.asarray(ms["b"])).reshape(10, 200).mean(1), 0.3, atol=0.1)
  # Global scope: one total over layers of very different sizes, each weight alike.
  _, ms, rep = random_prune(p, None, 0.5, key=jax.random.key(7), scope="global")
  assert int(rep.count) == 1100 == int((~ms["a"]).sum() + (~ms["b"]).sum())
  np.testing.assert_allclose([float((~ms["a"]).mean()), float((~ms["b"]).mean())], 0.5, atol=0.11)
  # The same key gives the same mask whatever the weights; only kept weights are removed.
  rng = np.random.default_rng(1)
  w = {"a": host_f32(rng.normal(size=(4, 5)))}
  pre = {"a": jnp.asarray(rng.random((4, 5)) < 0.5)}
  m1 = random_prune(w, pre, 0.5, key=jax.random.key(3))[1]["a"]
  m2 = random_prune(jax.tree.map(lambda a: 100 * a + 1, w), pre, 0.5, key=jax.random.key(3))[1]["a"]
  np.testing.assert_array_equal(m1, m2)
  assert not np.any(np.asarray(m1) & ~np.asarray(pre["a"]))
  n = int(pre["a"].sum())
  assert int(m1.sum()) == n - int(np.round(np.float32(0.5) * np.float32(n)))


def test_complex_weights_are_ranked_by_modulus():
  """A selected complex leaf was cast to float32 before |w|, which keeps the real part: 3j and
  -4j ranked as 0 and were removed before 1 and 2."""
  c = jnp.array([[3j, 1 + 0j, 0.5j], [2, 0.1, -4j]], jnp.complex64)
  _, m, rep = magnitude_prune({"c": c}, None, 0.5, select=["c"])
  assert rep.threshold.dtype == jnp.float32 and rep.threshold.tolist() == [1.0]   # the cut |1|
  modulus = np.abs(np.asarray(c)).ravel()
  want = np.ones(6, bool)
  want[np.argsort(modulus, kind="stable")[:3]] = False      # 0.1, 0.5j, 1
  np.testing.assert_array_equal(np.asarray(m["c"]).ravel(), want)


def test_fraction_one_removes_every_weight_beyond_float32_counts():
  """remaining = 2**24 + 1 rounds to 2**24 in float32: a fraction of 1 left one weight kept.
  (The count is checked directly: a scope that large is too slow for a unit test.)"""
  big = jnp.int32(2 ** 24 + 1)
  assert int(magnitude_lib._n_remove(1.0, big, True)) == 2 ** 24 + 1
  # Never more than is left (float32(2**24 + 3) is 2**24 + 4).
  odd = jnp.int32(2 ** 24 + 3)
  assert int(magnitude_lib._n_remove(1.0, odd, True)) == 2 ** 24 + 3
  assert int(magnitude_lib._n_remove(0.9999999, odd, True)) <= 2 ** 24 + 3
  assert int(magnitude_lib._n_remove(1.0, odd, False)) == 0


def test_fraction_must_be_one_number():
  """A list or array of fractions failed inside the compiled core with JAX's broadcasting or
  'Pred must be a scalar' errors; a string or None with numpy's ufunc error."""
  p = {"a": jnp.ones((4, 5))}
  for bad in (np.array([0.5]), jnp.array([0.5, 0.2]), [0.5, 0.2]):
    with pytest.raises(ValueError, match="fraction must be one number.*vmap"):
      magnitude_prune(p, None, bad)
  for bad in ("0.5", None, 0.5j):
    with pytest.raises(TypeError, match="fraction must be a"):
      random_prune(p, None, bad, key=jax.random.key(0))
  assert int(magnitude_prune(p, None, np.float32(0.5))[2].count) == 10


def test_select_one_path_string():
  """select='params/dense/kernel' was read as a list of one-letter paths."""
  p = {"params": {"dense": {"kernel": jnp.arange(1.0, 7.0).reshape(2, 3)},
                  "out": {"kernel": jnp.ones((3, 2))}}}
  _, m, rep = magnitude_prune(p, None, 0.5, select="params/dense/kernel")
  np.testing.assert_array_equal(m["params"]["dense"]["kernel"], [[0, 0, 0], [1, 1, 1]])
  assert bool(np.all(m["params"]["out"]["kernel"])) and rep.kept.tolist() == [3]


def _plain_target():
  rng = np.random.default_rng(2)
  p = {"w1": rng.normal(size=(6, 7)).astype(np.float32), "b1": np.zeros(7, np.float32),
       "w2": rng.normal(size=(7, 3)).astype(np.float32), "b2": np.zeros(3, np.float32)}
  f = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  x = rng.normal(size=(16, 6)).astype(np.float32)
  return f, p, x


def test_importance_on_a_traced_plain_function_matches_numpy():
  """Scores from the kernel columns; one-shot removal of the k least important kept units
  (ties to the lower index, one kept); the iterative loop against a NumPy walk of the same
  order with the loss evaluated on the pruned network."""
  f, p, x = _plain_target()
  t = jaxprune.trace(f, p, x)
  w = p["w1"].astype(np.float64)
  refs = {"rms": np.sqrt((w ** 2).mean(0)), "l1": np.abs(w).sum(0), "l2": np.sqrt((w ** 2).sum(0))}
  for norm, want in refs.items():
    np.testing.assert_allclose(importance_scores(p, t, "w1", norm), want, rtol=1e-6)
  s = refs["rms"]
  rng = np.random.default_rng(3)
  prune = importance_prune(t, "w1")
  for _ in range(4):
    mask = rng.random(7) < 0.7
    mask[rng.integers(7)] = True
    k = int(rng.integers(0, 8))
    order = [u for u in sorted(range(7), key=lambda u: (s[u], u)) if mask[u]]
    want = mask.copy()
    want[order[:min(k, len(order) - 1)]] = False
    _, um, _ = prune(p, {"w1": jnp.asarray(mask)}, k)
    np.testing.assert_array_equal(um["w1"], want)

  y = f(p, x)
  loss = lambda q: jnp.mean((f(q, x) - y) ** 2)

  def walk(max_rise):
    def value(m):
      q = dict(p, w1=p["w1"] * m[None], b1=p["b1"] * m, w2=p["w2"] * m[:, None])
      return float(loss(q))
    m = np.ones(7, bool)
    l0 = value(m)
    for u in np.argsort(s, kind="stable"):
      if m.sum() == 1:
        break
      n = m.copy()
      n[u] = False
      if not value(n) - l0 <= max_rise:
        break
      m = n
    return m, value(m) - l0

  run = iterative_importance(t, "w1", loss)
  rises = [0.0, 0.2, 0.5, 10.0]
  _, vm, vrep = jax.vmap(run, in_axes=(None, None, 0))(p, jaxprune.unit_masks_ones(t),
                                                      jnp.asarray(rises))
  for i, r in enumerate(rises):
    want, rise = walk(r)
    _, um, rep = run(p, jaxprune.unit_masks_ones(t), r)
    np.testing.assert_array_equal(um["w1"], want)
    np.testing.assert_array_equal(vm["w1"][i], want)
    assert rise <= r
    n = int(rep.count)
    assert n == 8 - want.sum() and float(rep.loss[n - 1] - rep.loss[0]) <= r


def test_iterative_importance_refuses_bad_max_rise_and_loss_fn():
  """A list of thresholds, a string or None failed with float()'s or jit's raw TypeError; a loss
  that is not a function failed at the first call with "'float' object is not callable"."""
  f, p, x = _plain_target()
  t = jaxprune.trace(f, p, x)
  run = iterative_importance(t, "w1", lambda q: jnp.mean(f(q, x) ** 2))
  ones = jaxprune.unit_masks_ones(t)
  for bad in (jnp.array([0.1, 0.2]), np.array([0.1])):
    with pytest.raises(ValueError, match="max_rise must be one number.*vmap"):
      run(p, ones, bad)
  for bad in ("0.1", None):
    with pytest.raises(TypeError, match="max_rise must be a number"):
      run(p, ones, bad)
  with pytest.raises(ValueError, match="max_rise must be >= 0"):
    run(p, ones, float("nan"))
  with pytest.raises(TypeError, match="loss_fn must be a function"):
    iterative_importance(t, "w1", 3.0)
