"""Grouped convolutions (``feature_group_count`` = G, as in ResNeXt and ShuffleNet) traced from
a plain JAX function: unit ``i`` of the layer before is channel ``i`` of every group (one row of
the grouped kernel, read by each group with its own columns), and unit ``j`` of the grouped
conv is output ``j`` of every group, so each group keeps as many channels as the others.
Compaction is checked against a NumPy grouped convolution in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from conftest import host_f32

G, C0, K = 2, 8, 6        # groups, channels into the grouped conv (4 per group), its outputs


def _conv(x, w, groups=1):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=groups,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def fn(p, x):
  h = jax.nn.relu(_conv(x, p["c0"]) + p["b0"])
  h = jax.nn.relu(_conv(h, p["gc"], G) + p["gb"])
  return _conv(h, p["c2"]).mean((1, 2))


def _params(seed=0):
  r = np.random.default_rng(seed)
  return {"c0": host_f32(r.normal(size=(3, 3, 3, C0)) / 3), "b0": host_f32(r.normal(size=C0) / 4),
          "gc": host_f32(r.normal(size=(3, 3, C0 // G, K)) / 4),
          "gb": host_f32(r.normal(size=K) / 4), "c2": host_f32(r.normal(size=(1, 1, K, 5)))}


def _np_conv(x, w, groups=1):
  """'SAME' 2-D convolution, NHWC x HWIO, in float64 NumPy, with ``groups`` feature groups."""
  kh, kw, cin_g, cout = w.shape
  xp = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  n, h, wd, _ = x.shape
  out = np.zeros((n, h, wd, cout))
  per_out = cout // groups
  for g in range(groups):
    xs = xp[..., g * cin_g:(g + 1) * cin_g]
    ws = w[..., g * per_out:(g + 1) * per_out]
    for a in range(kh):
      for b in range(kw):
        out[..., g * per_out:(g + 1) * per_out] += xs[:, a:a + h, b:b + wd] @ ws[a, b]
  return out


def _np_fn(p, x):
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  h = np.maximum(_np_conv(np.asarray(x, np.float64), p["c0"]) + p["b0"], 0)
  h = np.maximum(_np_conv(h, p["gc"], G) + p["gb"], 0)
  return _np_conv(h, p["c2"]).mean((1, 2))


X = host_f32(np.random.default_rng(1).normal(size=(4, 6, 6, 3)))


def test_units_are_the_same_channel_of_every_group():
  target = jaxprune.trace(fn, _params(), X)
  assert sorted(target.groups) == ["c0", "gc"]
  c0, gc = target.groups["c0"], target.groups["gc"]
  assert c0.size == C0 // G and gc.size == K // G
  slices = lambda g: {(s.path[-1], s.axis, s.role, s.view) for s in g.slices}
  assert slices(c0) == {("c0", 4, "producer", (3, 3, 3, G, C0 // G)),
                        ("b0", 1, "producer", (G, C0 // G)), ("gc", 2, "consumer", None)}
  assert slices(gc) == {("gc", 4, "producer", (3, 3, C0 // G, G, K // G)),
                        ("gb", 1, "producer", (G, K // G)),
                        ("c2", 3, "consumer", (1, 1, G, K // G, 5))}
  assert "grouped convolution's group index" in target.explain()


@pytest.mark.parametrize("um", [{"c0": [True, False, True, False]},
                                {"gc": [False, True, True]},
                                {"c0": [False, True, True, True], "gc": [True, True, False]}])
def test_compact_removes_the_unit_from_every_group(um):
  p = _params()
  um = {k: jnp.asarray(v) for k, v in um.items()}
  target = jaxprune.trace(fn, p, X)
  small, small_target = target.compact(p, um)
  # by hand: unit i of c0 is channels i and 4 + i of c0/b0 and row i of the grouped kernel;
  # unit j of gc is columns j and 3 + j of gc/gb and rows j and 3 + j of c2
  keep0 = np.tile(np.asarray(um.get("c0", np.ones(C0 // G, bool))), G)
  rows = np.asarray(um.get("c0", np.ones(C0 // G, bool)))
  keepg = np.tile(np.asarray(um.get("gc", np.ones(K // G, bool))), G)
  hand = {"c0": np.asarray(p["c0"])[..., keep0], "b0": np.asarray(p["b0"])[keep0],
          "gc": np.asarray(p["gc"])[:, :, rows][..., keepg], "gb": np.asarray(p["gb"])[keepg],
          "c2": np.asarray(p["c2"])[:, :, keepg]}
  for k in hand:
    np.testing.assert_array_equal(small[k], hand[k])
  ref = _np_fn(hand, X)
  np.testing.assert_allclose(small_target.apply(small, X), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(fn(small, X), ref, rtol=1e-5, atol=1e-5)   # the user's own fn
  masked = jaxprune.apply_masks(p, jaxprune.expand(p, target, um))
  np.testing.assert_allclose(fn(masked, X), ref, rtol=1e-5, atol=1e-5)


def test_an_exact_duplicate_unit_merges_and_the_outputs_stay():
  p = _params()
  for c in (1, 1 + C0 // G):                   # unit 1 copies unit 0 in both groups
    p["c0"] = p["c0"].at[..., c].set(p["c0"][..., c - 1])
    p["b0"] = p["b0"].at[c].set(p["b0"][c - 1])
  target = jaxprune.trace(fn, p, X)
  acts = target.activations(p, X, "c0")
  new, um, _ = jaxprune.distinctiveness(target, "c0", complementary=False, constants=False)(
      p, jaxprune.unit_masks_ones(target), acts, 1.0, 179.0)
  assert np.asarray(um["c0"]).tolist() == [True, False, True, True]
  small, small_target = target.compact(new, um)
  np.testing.assert_allclose(small_target.apply(small, X), _np_fn(p, X), rtol=1e-4, atol=1e-5)


def test_pruners_from_weights_compact_exactly_and_folds_are_refused():
  p = _params()
  target = jaxprune.trace(fn, p, X)
  ones = jaxprune.unit_masks_ones(target)
  for name in ("c0", "gc"):
    new, um, _ = jaxprune.importance_prune(target, name)(p, ones, 1)
    small, small_target = target.compact(new, um)
    np.testing.assert_allclose(small_target.apply(small, X),
                               fn(jaxprune.apply_masks(new, jaxprune.expand(new, target, um)), X),
                               rtol=1e-5, atol=1e-5)
  acts = target.activations(p, X, "c0")
  with pytest.raises(ValueError, match="grouped convolution"):
    jaxprune.distinctiveness(target, "c0")(p, ones, acts, 30.0, 150.0)
  with pytest.raises(ValueError, match="grouped convolution"):
    jaxprune.group_redundancy(target, "c0")(p, ones, acts)
