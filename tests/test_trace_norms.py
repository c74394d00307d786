"""Norms over the units: a statistic of each example summed over the units (an RMSNorm's mean of
squares, an L2 norm, flax's LayerNorm with its E[h^2] - E[h]^2 variance) keeps the units a group
where every summed value is zero at a masked unit; compacting equals masking (the mean's divisor
is the traced width). They were refused as 'reduced over by reduce_sum', which left a pre-norm
transformer's residual stream and any L2-normalised embedding with no group."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune import ga
from jaxprune.units import get_path
from conftest import assert_compacts_as_masked, host_f32, random_unit_masks, rms_norm

R = np.random.default_rng(11)
V, D, T = 11, 8, 5


def _arr(*shape):
  return host_f32(R.normal(size=shape))


class _Block(nn.Module):
  norm: str

  @nn.compact
  def __call__(self, x):
    norm = nn.RMSNorm if self.norm == "rms" else nn.LayerNorm
    h = norm()(x)
    q, k, v = (nn.Dense(6, name=n)(h) for n in ("q", "k", "v"))
    a = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / 6 ** 0.5, -1)
    x = x + nn.Dense(D, name="o")(jnp.einsum("bts,bsd->btd", a, v))
    return x + nn.Dense(D, name="down")(nn.silu(nn.Dense(2 * D, name="up")(norm()(x))))


class _LM(nn.Module):
  norm: str

  @nn.compact
  def __call__(self, tok):
    x = nn.Embed(V, D, name="embed")(tok)
    for i in range(2):
      x = _Block(self.norm, name=f"block{i}")(x)
    norm = nn.RMSNorm if self.norm == "rms" else nn.LayerNorm
    return nn.Dense(V, name="lm_head")(norm(name="final")(x))


def _lm(norm):
  tok = jnp.asarray(R.integers(0, V, (4, T)))
  m = _LM(norm)
  v = m.init(jax.random.key(0), tok)
  v = jax.tree.map(lambda a: a + 0.2 * _arr(*a.shape), v)        # no scale at 1, no bias at 0
  return m.apply, v, tok, jaxprune.trace(m.apply, v, tok)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_a_pre_norm_transformer_residual_stream_is_a_group_that_compacts_exactly(norm):
  fn, v, tok, t = _lm(norm)
  g = t.groups["embed"]
  assert g.size == D and g.read_by_products
  producers = {"/".join(s.path[1:]) for s in g.producers}
  assert {"embed/embedding", "block0/o/kernel", "block1/down/kernel", "final/scale"} <= producers
  assert {"/".join(s.path[1:]) for s in g.consumers} == {
      f"block{i}/{n}/kernel" for i in (0, 1) for n in ("q", "k", "v", "up")} | {
          "lm_head/kernel"}
  # the heads' features and MLP hidden units are groups as before
  assert {"block0/up", "block1/up", "block0/q"} <= set(t.groups)
  other = jnp.asarray(R.integers(0, V, (7, T)))
  for seed in range(3):
    small, small_t, _ = assert_compacts_as_masked(t, v, fn, random_unit_masks(t, seed),
                                                  (tok, other), atol=1e-5)
  um = jaxprune.unit_masks_ones(t)
  um["embed"] = um["embed"].at[np.array([0, 5])].set(False)
  small, _, _ = assert_compacts_as_masked(t, v, fn, um, (tok,), atol=1e-5)
  assert small["params"]["embed"]["embedding"].shape == (V, D - 2)
  assert small["params"]["final"]["scale"].shape == (D - 2,)


def test_the_residual_stream_is_pruned_by_removing_units_and_never_merged():
  fn, v, tok, t = _lm("rms")
  pruned, um, _ = jaxprune.importance_prune(t, "embed")(v, jaxprune.unit_masks_ones(t), 3)
  assert int(um["embed"].sum()) == D - 3
  assert_compacts_as_masked(t, pruned, fn, um, (tok,), atol=1e-5)
  for make in (lambda: jaxprune.distinctiveness(t, "embed"),
               lambda: jaxprune.weight_distinctiveness(t, "embed")):
    with pytest.raises(ValueError, match="summed over by a statistic of each example"):
      make()
  assert "summed over by a statistic of each example" in t.activations_incomplete_why("embed")
  assert "read by a product of two activations or a sum over them" in t.explain()


def test_the_ga_scores_an_l2_normalised_layer_as_its_masked_network():
  """The norm rescales the kept units by a statistic of the mask: no one-product fast path; the
  GA's accuracy is the masked network's."""
  p = {"w1": _arr(4, 7), "b1": _arr(7), "w2": _arr(7, 3)}

  def fn(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return (h / (jnp.linalg.norm(h, axis=-1, keepdims=True) + 1e-6)) @ p["w2"]
  x, y = _arr(60, 4), jnp.asarray(R.integers(0, 3, 60))
  t = jaxprune.trace(fn, p, x)
  assert t.groups["w1"].read_by_products and t.readout("w1") is None
  res = ga.search(t, p, x, y, "w1", key=jax.random.key(0), progress=False,
                  config=ga.GAConfig(population_size=8, hof_size=2, tournament_size=2,
                                     generations=3))
  masked = jaxprune.apply_masks(p, jaxprune.expand(p, t, {"w1": jnp.asarray(res.mask)}))
  assert float(res.accuracy) == pytest.approx(
      float(jnp.mean(jnp.argmax(fn(masked, x), -1) == y)), abs=1e-6)


def test_a_mean_over_the_units_keeps_the_traced_width_at_any_batch_size():
  """A mean over the units divides by the traced width in the compacted program, as masking
  does; at another batch size it is not taken for a batch statistic (which raises there)."""
  p = {"w1": _arr(4, 6), "w2": _arr(6, 2)}

  def fn(p, x):
    h = jax.nn.relu(x @ p["w1"])
    return (h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)) @ p["w2"]
  t = jaxprune.trace(fn, p, _arr(5, 4))
  um = {"w1": jnp.asarray([True, False, True, True, False, True])}
  small, small_t, masked = assert_compacts_as_masked(t, p, fn, um, (_arr(5, 4), _arr(2, 4)))
  x3 = _arr(3, 4)
  np.testing.assert_allclose(small_t.apply(small, x3), fn(masked, x3), rtol=1e-5, atol=1e-6)
  h = jax.nn.relu(x3 @ small["w1"])                    # a 4-unit RMSNorm divides by 4, not 6
  rebuilt = (h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)) @ small["w2"]
  assert not np.allclose(rebuilt, fn(masked, x3), atol=1e-3)


def test_a_deep_residual_stream_is_traced_without_deep_recursion():
  """Each norm's check that the stream is zero at a masked unit walked back to the embedding
  alone: quadratic in the depth, and a RecursionError at 260 blocks. The checks share their
  answers in program order."""
  n, d = 260, 4
  r = np.random.default_rng(0)
  p = {"emb": host_f32(r.normal(size=(7, d))), "head": host_f32(r.normal(size=(d, 7))),
       "blocks": [{"g": host_f32(1 + 0.1 * r.normal(size=d)),
                   "w": host_f32(0.1 * r.normal(size=(d, d)))} for _ in range(n)]}

  def fn(p, tok):
    x = p["emb"][tok]
    for b in p["blocks"]:
      x = x + (x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * b["g"]) @ b["w"]
    return x @ p["head"]
  t = jaxprune.trace(fn, p, jnp.zeros((2, 3), jnp.int32))
  assert t.groups["emb"].size == d and t.groups["emb"].read_by_products
  assert len(t.groups["emb"].slices) == 3 * n + 2      # (g, w's rows and columns per block)


@pytest.mark.parametrize("pairs", [40, 130])
def test_a_long_chain_of_ops_before_a_norm_is_followed_or_refused_without_a_recursion_error(
    pairs):
  """A chain of 130 ``exp(h) - 1`` pairs before an RMSNorm raised a RecursionError (a probe's
  finding): the check follows 160 ops back at most and refuses the units beyond that."""
  def fn(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    for _ in range(pairs):
      h = jnp.exp(h) - 1.0
    return rms_norm(h) @ p["w2"]
  p = {"w1": 0.3 * _arr(5, D), "b1": 0.1 * _arr(D), "w2": _arr(D, 3)}
  t = jaxprune.trace(fn, p, _arr(4, 5))
  if pairs < 80:
    assert t.groups["w1"].read_by_products
    assert_compacts_as_masked(t, p, fn, random_unit_masks(t, 0), (_arr(4, 5),), atol=1e-5)
  else:
    assert "w1" not in t.groups
    assert "reduced over by reduce_sum where a masked unit is not shown to be zero" in t.explain()


def test_a_reader_normalised_over_its_rows_keeps_the_layer_before_it_a_group():
  """flax's WeightNorm (||w|| over the kernel's input axis), ArcFace's class weights
  (w / ||w||_0, with the features L2-normalised too) and a Frobenius norm: a masked unit's row
  is zero and adds nothing to the norm, so removing it is exact; merging two rows changes the
  norm, so merges are refused. A norm of each row (over the outputs) is not: a masked row would
  be 0 / 0."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.tanh(nn.Dense(6, name="d1")(x))
      return nn.Dense(3)(nn.relu(nn.WeightNorm(nn.Dense(5, name="d2"))(h)))
  x = _arr(5, 4)
  v = Net().init(jax.random.key(0), x)
  v = jax.tree.map(lambda a: a + 0.3 * _arr(*a.shape), v)
  t = jaxprune.trace(Net().apply, v, x)
  assert {n: (g.size, g.read_by_products) for n, g in t.groups.items()} == {
      "d1": (6, True), "d2": (5, False)}
  for seed in range(3):
    assert_compacts_as_masked(t, v, Net().apply, random_unit_masks(t, seed), (x, x[:2]))
  with pytest.raises(ValueError, match="summed over by a statistic"):
    jaxprune.distinctiveness(t, "d1")
  assert "a kernel normalised over its rows" in t.activations_incomplete_why("d1")

  p = {"w1": _arr(4, 6), "b1": _arr(6), "w2": _arr(6, 3)}
  unit = lambda a, axis: a / jnp.linalg.norm(a, axis=axis, keepdims=True)
  readers = {
      "arcface": lambda p, h: unit(h, -1) @ unit(p["w2"], 0),
      "frobenius": lambda p, h: h @ (p["w2"] / jnp.sqrt(jnp.sum(p["w2"] ** 2))),
      "each_row": lambda p, h: h @ (p["w2"] / (jnp.linalg.norm(p["w2"], axis=1, keepdims=True)
                                               + 1e-3)),
  }
  for name, read in readers.items():
    fn = lambda p, x, read=read: read(p, jnp.tanh(x @ p["w1"] + p["b1"]))
    t = jaxprune.trace(fn, p, x)
    if name == "each_row":
      assert not t.groups
      continue
    assert t.groups["w1"].read_by_products, name
    for seed in range(3):
      assert_compacts_as_masked(t, p, fn, random_unit_masks(t, seed), (x, x[:2]))


_L, _H = 3, 10
_STACKED = {"win": _arr(5, D), "s": 1 + 0.1 * _arr(_L, D), "w1": _arr(_L, D, _H) / 3,
            "b1": 0.1 * _arr(_L, _H), "w2": _arr(_L, _H, D) / 3, "b2": 0.1 * _arr(_L, D),
            "sf": 1 + 0.1 * _arr(D), "wout": _arr(D, 3)}


def _scanned_stream(p, x):
  """Pre-RMSNorm blocks over params stacked along a leading axis, the stream as the carry."""
  def block(h, lp):
    s, w1, b1, w2, b2 = lp
    return h + jax.nn.gelu(rms_norm(h, s) @ w1 + b1) @ w2 + b2, None
  h, _ = jax.lax.scan(block, x @ p["win"], tuple(p[k] for k in ("s", "w1", "b1", "w2", "b2")))
  return rms_norm(h, p["sf"]) @ p["wout"]


def _rnn_states(p, xs):
  """A tanh RNN over time (xs: batch, time, features); every step's state (the scan's ys)
  RMS-normalised before the readout."""
  def step(h, x):
    h = jnp.tanh(x @ p["wx"] + h @ p["wh"] + p["b"])
    return h, h
  _, hs = jax.lax.scan(step, jnp.zeros((xs.shape[0], D)), jnp.swapaxes(xs, 0, 1))
  return rms_norm(jnp.swapaxes(hs, 0, 1), p["s"]) @ p["wout"]


_RNN = {"wx": _arr(5, D), "wh": 0.3 * _arr(D, D), "b": 0.1 * _arr(D), "s": 1 + 0.1 * _arr(D),
        "wout": _arr(D, 3)}


class _ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    y = nn.Dense(D)(nn.gelu(nn.Dense(_H)(nn.LayerNorm()(h))))
    return h + y, None


class _ScannedLM(nn.Module):
  """flax: nn.scan over nn.remat(block), params stacked on axis 0, LayerNorms in the blocks."""
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(D, name="embed")(x)
    h, _ = nn.scan(nn.remat(_ScanBlock), variable_axes={"params": 0},
                   split_rngs={"params": True}, length=_L)(name="blocks")(h, None)
    return nn.Dense(3, name="head")(nn.LayerNorm(name="final")(h))


def _scanned_lm():
  m = _ScannedLM()
  v = m.init(jax.random.key(0), _arr(4, 5))
  return m.apply, jax.tree.map(lambda a: a + 0.2 * _arr(*a.shape), v)


SCAN_SLICES = {   # (role, path, axis): the stacked params' unit axes come after the layer axis
    "lax_scan_layers": [("consumer", "w1", 1), ("consumer", "wout", 0), ("producer", "b2", 1),
                        ("producer", "s", 1), ("producer", "sf", 0), ("producer", "w2", 2),
                        ("producer", "win", 1)],
    "nn_scan_remat_layers": sorted(
        [("consumer", "params/blocks/Dense_1/kernel", 1), ("consumer", "params/head/kernel", 0)]
        + [("producer", f"params/{n}", a) for n, a in (
            ("blocks/Dense_0/bias", 1), ("blocks/Dense_0/kernel", 2),
            ("blocks/LayerNorm_0/bias", 1), ("blocks/LayerNorm_0/scale", 1),
            ("embed/bias", 0), ("embed/kernel", 1), ("final/bias", 0), ("final/scale", 0))]),
    "rnn_states": [("consumer", "wh", 0), ("consumer", "wout", 0), ("producer", "b", 0),
                   ("producer", "s", 0), ("producer", "wh", 1), ("producer", "wx", 1)]}


@pytest.mark.parametrize("case", sorted(SCAN_SLICES))
def test_a_stream_carried_through_a_scan_is_a_group_that_compacts_exactly(case):
  """The zero check follows a scan's carry by induction (zero at the start, and the body returns
  it zero whenever it was), its ``xs`` to the stacked params and its ``ys`` into the body: a
  stream carried through layers scanned over stacked params (``lax.scan``, flax's ``nn.scan``
  over ``nn.remat``) and an RNN's states normalised after the scan were refused as 'reduced over
  by reduce_sum' although masking a unit keeps it zero at every step."""
  if case == "lax_scan_layers":
    fn, p, x, x2, name = _scanned_stream, _STACKED, _arr(4, 5), _arr(7, 5), "win"
  elif case == "nn_scan_remat_layers":
    (fn, p), x, x2, name = _scanned_lm(), _arr(4, 5), _arr(7, 5), "embed"
  else:
    fn, p, x, x2, name = _rnn_states, _RNN, _arr(4, 6, 5), _arr(3, 6, 5), "wx"
  t = jaxprune.trace(fn, p, x)
  g = t.groups[name]
  assert g.size == D and g.read_by_products
  assert sorted((s.role, "/".join(s.path), s.axis) for s in g.slices) == SCAN_SLICES[case]
  for seed in range(2):
    assert_compacts_as_masked(t, p, fn, random_unit_masks(t, seed), (x, x2), atol=1e-5)
  pruned, um, _ = jaxprune.importance_prune(t, name)(p, jaxprune.unit_masks_ones(t), 3)
  assert int(um[name].sum()) == D - 3
  small, _, masked = assert_compacts_as_masked(t, pruned, fn, um, (x2,), atol=1e-5)
  assert not np.allclose(fn(masked, x2), fn(p, x2), atol=1e-3)   # the units did something
  for sl in g.slices:
    assert np.shape(get_path(small, sl.path))[sl.axis] == D - 3, sl.path


def _two_pass_rms(h, s):
  c = h - jnp.mean(h, -1, keepdims=True)
  return c * jax.lax.rsqrt(jnp.mean(c * c, -1, keepdims=True) + 1e-6) * s


@pytest.mark.parametrize("case", ["start_not_zero", "constant_added_in_the_body",
                                  "a_sum_over_the_units_added_back", "two_pass_norm_in_the_body"])
def test_a_scan_carry_not_shown_zero_at_every_step_refuses_the_stream(case):
  """The induction needs both ends: a start zero at a masked unit, and a body that keeps it zero
  (a sum over the units broadcast back onto the stream makes a masked unit nonzero from the
  second step on, though it is zero at the first)."""
  def fn(p, x):
    def block(h, lp):
      s, w1, b1, w2, b2 = lp
      norm = _two_pass_rms if case == "two_pass_norm_in_the_body" else rms_norm
      y = jax.nn.gelu(norm(h, s) @ w1 + b1) @ w2 + b2
      if case == "constant_added_in_the_body":
        y = y + 0.5
      if case == "a_sum_over_the_units_added_back":
        y = y + 0.1 * jnp.tanh(h).sum(-1, keepdims=True)
      return h + y, None
    h0 = x @ p["win"] + (1.0 if case == "start_not_zero" else 0.0)
    h, _ = jax.lax.scan(block, h0, tuple(p[k] for k in ("s", "w1", "b1", "w2", "b2")))
    return rms_norm(h, p["sf"]) @ p["wout"]
  t = jaxprune.trace(fn, _STACKED, _arr(4, 5))
  assert "win" not in t.groups and "w1" in t.groups
  assert "reduced over by reduce_sum where a masked unit is not shown to be zero" in t.explain()


def _product_state(p, xs, decay=1.0):
  """A state multiplied by exp(x_t @ w + b) at each step from ones (xs: batch, time, features),
  normalised as its shift from 1 (scaled by ``decay`` at each step too)."""
  def step(c, x):
    return decay * c * jnp.exp(x @ p["w"] + p["b"]), None
  c, _ = jax.lax.scan(step, jnp.ones((xs.shape[0], D)), jnp.swapaxes(xs, 0, 1))
  return rms_norm(c - 1.0) @ p["wout"]


_PRODUCT = {"w": 0.2 * _arr(5, D), "b": 0.1 * _arr(D), "wout": _arr(D, 3)}


def test_a_carry_held_at_a_constant_other_than_zero_is_followed_by_induction():
  """A masked unit's value is followed as a constant, not only zero: the product state starts at
  1 and is multiplied by exp(0) = 1 at every step, so its shift from 1 is zero there and the
  norm over it keeps ``w``'s units a group. Decayed by 0.9 at each step it is 0.9 ** t there,
  no one value, and the group is refused."""
  x, x2 = _arr(4, 6, 5), _arr(3, 6, 5)
  t = jaxprune.trace(_product_state, _PRODUCT, x)
  assert t.groups["w"].size == D
  for seed in range(2):
    assert_compacts_as_masked(t, _PRODUCT, _product_state, random_unit_masks(t, seed), (x, x2),
                              atol=1e-5)
  decayed = lambda p, xs: _product_state(p, xs, 0.9)
  t = jaxprune.trace(decayed, _PRODUCT, x)
  assert "w" not in t.groups
  assert "reduced over by reduce_sum where a masked unit is not shown to be zero" in t.explain()


def _linf(p, x):
  """A layer L-infinity normalised over its units."""
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  return (h / (jnp.max(jnp.abs(h), -1, keepdims=True) + 1e-6)) @ p["w2"]


def _cbam_spatial(p, x):
  """relu conv features (NHWC) reweighted by CBAM's spatial attention: a 3x3 conv over the mean
  and the maximum across the channels, a sigmoid."""
  conv = lambda h, k: jax.lax.conv_general_dilated(h, k, (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  h = jax.nn.relu(conv(x, p["k1"]) + p["c1"])
  stats = jnp.concatenate([h.mean(-1, keepdims=True), h.max(-1, keepdims=True)], -1)
  h = h * jax.nn.sigmoid(conv(stats, p["ks"]))
  return conv(h, p["k2"]).mean((1, 2))


_MAXED = {
    "linf": (_linf, {"w1": _arr(4, 7), "b1": _arr(7), "w2": _arr(7, 3)}, "w1",
             lambda n: _arr(n, 4)),
    "cbam_spatial": (_cbam_spatial, {"k1": _arr(3, 3, 2, 6), "c1": 0.5 * _arr(6),
                                     "ks": _arr(3, 3, 2, 1), "k2": _arr(3, 3, 6, 4)}, "k1",
                     lambda n: _arr(n, 5, 5, 2)),
}


@pytest.mark.parametrize("case", sorted(_MAXED))
def test_a_maximum_over_units_never_negative_keeps_them_a_group(case):
  """reduce_max over the units blocked them ('a softmax's maximum'); where the values are never
  negative and zero at a masked unit (max(|h|), the maximum of relu features), a masked unit's 0
  is no maximum, so the compacted network's maximum over the kept units is the masked one's."""
  fn, p, name, xs = _MAXED[case]
  t = jaxprune.trace(fn, p, xs(5))
  assert t.groups[name].read_by_products
  for seed in range(3):
    assert_compacts_as_masked(t, p, fn, random_unit_masks(t, seed), (xs(5), xs(2)), atol=1e-5)
  pruned, um, _ = jaxprune.importance_prune(t, name)(p, jaxprune.unit_masks_ones(t), 2)
  _, _, masked = assert_compacts_as_masked(t, pruned, fn, um, (xs(3),), atol=1e-5)
  assert not np.allclose(fn(masked, xs(3)), fn(p, xs(3)), atol=1e-3)


@pytest.mark.parametrize("values", ["tanh", "minus_relu", "softmax"])
def test_a_maximum_over_units_that_can_be_negative_refuses_them(values):
  """A masked unit's 0 is the maximum of an example whose kept values are all negative: refused,
  naming the reduce_max."""
  p = {"w1": _arr(4, 7), "w2": _arr(7, 3)}

  def fn(p, x):
    z = x @ p["w1"]
    if values == "softmax":
      return jax.nn.softmax(z, -1) @ p["w2"]
    h = jnp.tanh(z) if values == "tanh" else -jax.nn.relu(z)
    return (h - jnp.max(h, -1, keepdims=True)) @ p["w2"]
  t = jaxprune.trace(fn, p, _arr(5, 4))
  assert "w1" not in t.groups
  assert "reduced over by reduce_max" in t.explain()


class _BiLSTM(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Bidirectional(nn.RNN(nn.LSTMCell(6)), nn.RNN(nn.LSTMCell(5)))(x)
    return nn.Dense(3)(nn.LayerNorm()(h))


def _concat_rms(p, x):
  h = jnp.concatenate([jnp.tanh(x @ p["w1"]), jnp.exp(x @ p["w2"]), x], -1)
  return rms_norm(h, p["s"]) @ p["w3"]


def test_a_norm_over_a_concatenation_keeps_each_part_zero_at_a_masked_unit():
  """A sum over a concatenation is the sum of its parts': each part whose values are zero at a
  masked unit stays a group (a bidirectional RNN's two directions under one LayerNorm; both
  refused before), a part that is not (exp(0) = 1) is refused on its own."""
  m = _BiLSTM()
  x = _arr(4, T, 5)
  v = jax.tree.map(lambda a: a + 0.2 * _arr(*a.shape), m.init(jax.random.key(0), x))
  t = jaxprune.trace(m.apply, v, x)
  assert {n: g.size for n, g in t.groups.items()} == {
      "LSTMCell_0/ii": 6, "LSTMCell_1/ii": 5}
  for seed in range(2):
    assert_compacts_as_masked(t, v, m.apply, random_unit_masks(t, seed), (x, _arr(2, T, 5)),
                              atol=1e-5)

  p = {"w1": _arr(5, 6), "w2": _arr(5, 4), "s": 1 + 0.1 * _arr(15), "w3": _arr(15, 3)}
  t = jaxprune.trace(_concat_rms, p, _arr(4, 5))
  assert set(t.groups) == {"w1"} and t.groups["w1"].read_by_products
  assert "not shown to be zero" in next(l for l in t.explain().splitlines() if l.startswith("w2"))
  pruned, um, _ = jaxprune.importance_prune(t, "w1")(p, jaxprune.unit_masks_ones(t), 2)
  small, _, _ = assert_compacts_as_masked(t, pruned, _concat_rms, um, (_arr(4, 5), _arr(7, 5)),
                                          atol=1e-5)
  assert small["s"].shape == (13,) and small["w3"].shape == (13, 3)
