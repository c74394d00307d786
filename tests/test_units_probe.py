"""Unit algebra against hand-written NumPy references, and the errors bad input gets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune.units import Slice, UnitGroup, compact, expand, redistribute, uncompact

RNG = np.random.default_rng(0)


def _f32(*shape):
  return RNG.normal(size=shape).astype(np.float32)


def _concat_flatten_net():
  """Two branches a (3 channels) and b (4 channels) concatenated into a 6-position map,
  flattened (row p * 7 + c) into a dense layer of 5 outputs, which is itself group 'o'."""
  params = {"a": {"kernel": _f32(2, 3)}, "b": {"kernel": _f32(2, 4)},
            "d": {"kernel": _f32(42, 5), "bias": _f32(5)}}
  view = (6, 7, 5)
  groups = {
      "a": UnitGroup("a", 3, (Slice(("a", "kernel"), 1, "producer"),
                              Slice(("d", "kernel"), 1, "consumer", view=view, segment=(0, 3),
                                    bias=("d", "bias")))),
      "b": UnitGroup("b", 4, (Slice(("b", "kernel"), 1, "producer"),
                              Slice(("d", "kernel"), 1, "consumer", view=view, segment=(3, 4),
                                    bias=("d", "bias")))),
      "o": UnitGroup("o", 5, (Slice(("d", "kernel"), 1, "producer"),
                              Slice(("d", "bias"), 0, "producer", kind="bias"))),
  }
  return params, groups


def test_expand_compact_uncompact_match_hand_indexing_for_views_segments_and_two_groups():
  params, groups = _concat_flatten_net()
  um = {"a": np.array([1, 0, 1], bool), "b": np.array([0, 1, 1, 0], bool),
        "o": np.array([1, 1, 0, 1, 0], bool)}
  channel_kept = np.concatenate([um["a"], um["b"]])
  rows = np.array([channel_kept[r % 7] for r in range(42)])     # row r reads channel r % 7
  ref = rows[:, None] & um["o"][None, :]
  w = expand(params, groups, um)
  np.testing.assert_array_equal(np.asarray(w["d"]["kernel"]), ref)
  np.testing.assert_array_equal(np.asarray(w["d"]["bias"]), um["o"])
  small = compact(params, groups, um)
  np.testing.assert_array_equal(small["d"]["kernel"], params["d"]["kernel"][rows][:, um["o"]])
  back = uncompact(small, params, groups, um)
  np.testing.assert_array_equal(back["d"]["kernel"], np.where(ref, params["d"]["kernel"], 0))
  # the same under jit (traced unit masks take the jnp path)
  wj = jax.jit(lambda u: expand(params, groups, u))(jax.tree.map(jnp.asarray, um))
  np.testing.assert_array_equal(np.asarray(wj["d"]["kernel"]), ref)


def test_redistribute_through_a_view_and_segment_matches_a_numpy_loop():
  params, groups = _concat_flatten_net()
  g = groups["b"]
  c = _f32(4)
  transfer = np.eye(4, dtype=np.float32)
  transfer[0, 2] = 1.0                       # unit 2's outgoing rows are added to unit 0's
  out = redistribute(params, g, jnp.asarray(transfer), jnp.asarray(c))
  kernel = params["d"]["kernel"]
  want_k, want_b = kernel.astype(np.float64), params["d"]["bias"].astype(np.float64)
  for p in range(6):
    want_k[p * 7 + 3] += kernel[p * 7 + 3 + 2]
    for u in range(4):
      want_b = want_b + c[u] * kernel[p * 7 + 3 + u]
  np.testing.assert_allclose(np.asarray(out["d"]["kernel"]), want_k, atol=1e-6)
  np.testing.assert_allclose(np.asarray(out["d"]["bias"]), want_b, atol=1e-5)


def test_merging_a_duplicate_and_folding_a_constant_leave_outputs_unchanged():
  """A conv map (2 x 3 positions, 4 channels) flattened into a dense layer: channel 3 is an
  exact copy of channel 1, channel 2 is constant; merging and folding keep the outputs."""
  k, b = _f32(5, 4), _f32(4)
  k[:, 3], b[3] = k[:, 1], b[1]
  k[:, 2] = 0.0
  params = {"c": {"kernel": k, "bias": b}, "d": {"kernel": _f32(24, 3), "bias": _f32(3)}}
  g = UnitGroup("c", 4, (Slice(("c", "kernel"), 1, "producer"),
                         Slice(("c", "bias"), 0, "producer", kind="bias"),
                         Slice(("d", "kernel"), 1, "consumer", view=(6, 4, 3),
                               bias=("d", "bias"))), activation="tanh", kind="conv")

  def net(p, x):                                   # x: (batch, 6 positions, 5 inputs)
    h = jnp.tanh(x @ p["c"]["kernel"] + p["c"]["bias"])
    return h.reshape(x.shape[0], -1) @ p["d"]["kernel"] + p["d"]["bias"]

  x = jnp.asarray(_f32(3, 6, 5))
  transfer = np.eye(4, dtype=np.float32)
  transfer[1, 3] = 1.0
  consts = np.array([0.0, 0.0, np.tanh(b[2]), 0.0], np.float32)
  merged = redistribute(params, g, jnp.asarray(transfer), jnp.asarray(consts))
  keep = {"c": np.array([True, True, False, False])}
  masked = jaxprune.apply_masks(merged, expand(merged, {"c": g}, keep))
  np.testing.assert_allclose(net(masked, x), net(params, x), atol=1e-5)


def test_expand_refuses_unit_masks_that_are_not_a_dict():
  params, groups = _concat_flatten_net()
  with pytest.raises(TypeError, match="must be a dict from group name"):
    jaxprune.expand(params, groups, [np.ones(3, bool)])


def test_expand_names_a_wrong_key_or_dtype_before_calling_an_all_zero_mask_empty():
  params, groups = _concat_flatten_net()
  with pytest.raises(KeyError, match="'x' names no unit group"):
    jaxprune.expand(params, groups, {"x": np.zeros(3, bool)})
  with pytest.raises(ValueError, match="has dtype float64"):
    jaxprune.expand(params, groups, {"a": np.zeros(3)})
  with pytest.raises(ValueError, match=r"needs shape \(3,\)"):
    jaxprune.expand(params, groups, {"a": np.zeros(2, bool)})
  with pytest.raises(ValueError, match="removes every unit"):
    jaxprune.expand(params, groups, {"a": np.zeros(3, bool)})


def test_redistribute_refuses_transfer_and_constants_of_the_wrong_shape():
  params, groups = _concat_flatten_net()
  g = groups["b"]
  # a (units, k) table of constants was summed over k silently
  with pytest.raises(ValueError, match=r"constants has shape \(4, 2\).*needs shape \(4,\)"):
    redistribute(params, g, jnp.eye(4), jnp.ones((4, 2)))
  with pytest.raises(ValueError, match=r"constants has shape \(\)"):
    redistribute(params, g, jnp.eye(4), jnp.float32(1.0))
  # a batch of transfers was broadcast silently
  with pytest.raises(ValueError, match=r"transfer has shape \(1, 4, 4\).*needs shape \(4, 4\)"):
    redistribute(params, g, jnp.eye(4)[None])
  with pytest.raises(ValueError, match=r"transfer has shape \(5, 5\)"):
    redistribute(params, g, jnp.eye(5))


def test_redistribute_names_params_that_no_longer_fit_the_group():
  params, groups = _concat_flatten_net()
  wider = {**params, "b": {"kernel": _f32(2, 6)}}
  with pytest.raises(ValueError, match="has 6 entries but the group has 4 units.*trace again"):
    redistribute(wider, groups["b"], jnp.eye(4))
  with pytest.raises(ValueError, match="trace again"):
    compact(wider, groups, {"b": np.ones(4, bool)})


def test_a_slice_listed_twice_is_refused_not_moved_twice():
  params = {"a": _f32(2, 4), "k": _f32(4, 3), "b": np.zeros(3, np.float32)}
  consumer = Slice(("k",), 0, "consumer", bias=("b",))
  g = UnitGroup("h", 4, (Slice(("a",), 1, "producer"), consumer, consumer))
  with pytest.raises(ValueError, match="lists these entries.*twice"):
    redistribute(params, g, jnp.eye(4), jnp.ones(4))
  # the same leaf at two axes (a unit read on both axes of a product) is two slices, not one
  sq = {"a": _f32(2, 4), "k": _f32(4, 4, 3), "b": np.zeros(3, np.float32)}
  g2 = UnitGroup("h", 4, (Slice(("a",), 1, "producer"), Slice(("k",), 0, "consumer"),
                          Slice(("k",), 1, "consumer")))
  out = redistribute(sq, g2, jnp.eye(4))
  np.testing.assert_allclose(np.asarray(out["k"]), sq["k"])


def test_count_units_under_jit_says_it_needs_concrete_masks():
  with pytest.raises(TypeError, match="count_units counts concrete unit masks"):
    jax.jit(lambda u: jaxprune.count_units(u)["h"][0])({"h": jnp.ones(4, bool)})


def test_counts_of_a_coupled_group_match_a_hand_count():
  """A residual group: two producers (kernel and bias each) and three consumers, counted once
  per unit in count_units and once per weight in count_weights and sparsity."""
  shapes = {"p0k": (4, 6), "p0b": (6,), "p1k": (5, 6), "p1b": (6,),
            "c0": (6, 5), "c1": (6, 4), "c2": (6, 3)}
  params = {k: np.ones(s, np.float32) for k, s in shapes.items()}
  slices = [Slice((k,), 1 if k.endswith("k") else 0, "producer",
                  kind="kernel" if k.endswith("k") else "bias")
            for k in ("p0k", "p0b", "p1k", "p1b")]
  slices += [Slice((k,), 0, "consumer") for k in ("c0", "c1", "c2")]
  g = UnitGroup("r", 6, tuple(slices))
  um = {"r": np.array([1, 1, 0, 1, 0, 1], bool)}
  w = jaxprune.expand(params, {"r": g}, um)
  total = sum(int(np.prod(s)) for s in shapes.values())          # 138
  removed = 2 * (4 + 1 + 5 + 1 + 5 + 4 + 3)                       # per unit: its slices' entries
  assert jaxprune.count_weights(w) == (total - removed, total)
  assert jaxprune.sparsity(w) == pytest.approx(removed / total)
  assert jaxprune.count_units(um) == {"r": (4, 6)}
  assert "units r: 4/6 kept" in jaxprune.summary(w, um)


def test_compact_under_jit_with_closed_over_masks_cuts_in_the_program():
  """compact under a caller's jit (params traced, unit masks closed over) was np.asarray of a
  tracer (a TracerArrayConversionError) while uncompact works there; it now cuts the traced
  leaves in the program, equal to the eager cut, and traced masks are still refused clearly."""
  model = jaxprune.MLP(in_features=4, hidden=(5,), out_features=3)
  params = model.init(jax.random.key(0))
  um = {"hidden_0": jnp.array([True, False, True, True, False])}
  small, small_model = model.compact(params, um)
  jitted = jax.jit(lambda p: model.compact(p, um)[0])(params)
  jax.tree.map(np.testing.assert_array_equal, jitted, small)
  x = jnp.ones((2, 4))
  np.testing.assert_array_equal(small_model.apply(jitted, x), small_model.apply(small, x))
  fn = lambda p, xx: jnp.tanh(xx @ p["w1"]) @ p["w2"]
  p = {"w1": jnp.arange(20.0).reshape(4, 5), "w2": jnp.arange(15.0).reshape(5, 3)}
  target = jaxprune.trace(fn, p, x)
  (g,) = target.groups
  tum = {g: um["hidden_0"]}
  jax.tree.map(np.testing.assert_array_equal, jax.jit(lambda q: target.compact(q, tum)[0])(p),
               target.compact(p, tum)[0])
  with pytest.raises(ValueError, match="compact changes the shapes of the params"):
    jax.jit(lambda q, m: model.compact(q, m)[0])(params, um)
