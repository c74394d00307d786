"""User models probed from the outside (each written by hand, as a user would bring it): the
unit groups are the slices a careful user expects, and compaction gives the network that
masking does, with the hand-computed smaller params."""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from conftest import host_f32

R = np.random.default_rng(0)


def _arr(*shape):
  return host_f32(R.normal(size=shape))


def _slices(group):
  return {(jaxprune.units.path_str(s.path), s.axis, s.role, s.segment) for s in group.slices}


def _masked_and_small(target, params, um):
  masked = jaxprune.apply_masks(params, jaxprune.expand(params, target, um))
  small, small_target = target.compact(masked, um)
  return masked, small, small_target


def test_concatenation_plus_a_projection_cuts_the_projection_by_segment():
  """concat([a, b]) + x @ wc: each branch owns its segment of the projection's columns."""
  def fn(p, x):
    a = jax.nn.relu(x @ p["wa"] + p["ba"])
    b = jax.nn.relu(x @ p["wb"] + p["bb"])
    h = jax.nn.relu(jnp.concatenate([a, b], -1) + x @ p["wc"] + p["bc"])
    return h @ p["wo"] + p["bo"]
  p = {"wa": _arr(4, 6), "ba": _arr(6), "wb": _arr(4, 5), "bb": _arr(5), "wc": _arr(4, 11),
       "bc": _arr(11), "wo": _arr(11, 3), "bo": _arr(3)}
  x = _arr(5, 4)
  t = jaxprune.trace(fn, p, x)
  assert {k: g.size for k, g in t.groups.items()} == {"wa": 6, "wb": 5}
  assert {("wc", 1, "producer", (6, 5)), ("bc", 0, "producer", (6, 5)),
          ("wo", 0, "consumer", (6, 5))} <= _slices(t.groups["wb"])
  keep_a, keep_b = np.array([1, 0, 1, 1, 0, 1], bool), np.array([0, 1, 1, 0, 1], bool)
  masked, small, st = _masked_and_small(t, p, {"wa": keep_a, "wb": keep_b})
  cols = np.flatnonzero(np.concatenate([keep_a, keep_b]))
  np.testing.assert_array_equal(small["wc"], np.asarray(p["wc"])[:, cols])
  np.testing.assert_array_equal(small["wo"], np.asarray(p["wo"])[cols])
  np.testing.assert_allclose(st.apply(small, x[:3]), fn(masked, x[:3]),
                             atol=1e-5)


def test_pytorch_layout_depthwise_conv_joins_the_group_it_reads():
  """NCHW/OIHW: a depthwise conv's (C, 1, kh, kw) kernel is cut with the channels it reads."""
  dn = ("NCHW", "OIHW", "NCHW")
  def fn(p, x):
    conv = lambda h, k, g=1: jax.lax.conv_general_dilated(h, k, (1, 1), "SAME",
                                                          dimension_numbers=dn,
                                                          feature_group_count=g)
    h = jax.nn.relu(conv(x, p["k1"]) + p["b1"][:, None, None])
    h = jax.nn.relu(conv(h, p["dw"], 6) + p["bdw"][:, None, None])
    return h.mean((2, 3)) @ p["w"]
  p = {"k1": _arr(6, 2, 3, 3), "b1": _arr(6), "dw": _arr(6, 1, 3, 3), "bdw": _arr(6),
       "w": _arr(6, 3)}
  x = _arr(3, 2, 5, 5)
  t = jaxprune.trace(fn, p, x)
  assert list(t.groups) == ["k1"]
  assert _slices(t.groups["k1"]) == {("k1", 0, "producer", None), ("dw", 0, "producer", None),
                                     ("b1", 0, "producer", None), ("bdw", 0, "producer", None),
                                     ("w", 0, "consumer", None)}
  keep = np.array([1, 1, 0, 1, 0, 1], bool)
  masked, small, st = _masked_and_small(t, p, {"k1": keep})
  np.testing.assert_array_equal(small["dw"], np.asarray(p["dw"])[keep])
  np.testing.assert_allclose(st.apply(small, x[:2]), fn(masked, x[:2]), atol=1e-5)


def test_nnx_scan_over_stacked_residual_blocks():
  """nnx.vmap-made blocks run by nnx.scan: the residual stream is one group through every
  block (stacked kernels' columns and rows), each block's hidden layer another."""
  class Block(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(6, 10, rngs=rngs)
      self.l2 = nnx.Linear(10, 6, rngs=rngs)
    def __call__(self, h):
      return h + self.l2(nnx.relu(self.l1(h)))

  @nnx.vmap(in_axes=0, out_axes=0)
  def make(key):
    return Block(nnx.Rngs(key))

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.inp = nnx.Linear(4, 6, rngs=rngs)
      self.blocks = make(jax.random.split(jax.random.key(0), 3))
      self.out = nnx.Linear(6, 2, rngs=rngs)
    def __call__(self, x):
      @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
      def step(h, blk):
        return blk(h)
      return self.out(step(self.inp(x), self.blocks))

  graph, state = nnx.split(nnx.jit(lambda: Net(nnx.Rngs(1)))())
  fn = lambda s, x: nnx.merge(graph, s)(x)
  x = _arr(5, 4)
  t = jaxprune.trace(fn, state, x)
  assert {k: g.size for k, g in t.groups.items()} == {"inp": 6, "blocks/l1": 10}
  assert {("blocks/l2/kernel/value", 2, "producer", None),
          ("blocks/l1/kernel/value", 1, "consumer", None),
          ("out/kernel/value", 0, "consumer", None)} <= _slices(t.groups["inp"])
  keep_s, keep_h = np.arange(6) % 2 == 0, np.arange(10) < 7
  masked, small, st = _masked_and_small(t, state, {"inp": keep_s, "blocks/l1": keep_h})
  l1 = np.asarray(state["blocks"]["l1"]["kernel"].get_value())
  np.testing.assert_array_equal(small["blocks"]["l1"]["kernel"].get_value(),
                                l1[:, keep_s][:, :, keep_h])
  np.testing.assert_allclose(st.apply(small, x[:2]), jax.jit(fn)(masked, x[:2]), atol=1e-5)


def test_instance_norm_layer_compacts_and_its_activations_are_after_the_norm():
  """Conv -> GroupNorm(group_size=1) -> relu: the norm's scale and shift are the channels'
  producers; each channel is normalised by its own statistics, so the activations are taken
  after the norm (what the next conv reads) and pruners from activations apply."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.GroupNorm(num_groups=None, group_size=1)(nn.Conv(5, (3, 3))(x)))
      return nn.Dense(2)(nn.relu(nn.Conv(4, (3, 3))(h)).mean((1, 2)))
  x = _arr(3, 5, 5, 2)
  v = jax.jit(Net().init)(jax.random.key(0), x)
  t = jaxprune.trace(Net().apply, v, x)
  assert {k: g.size for k, g in t.groups.items()} == {"Conv_0": 5, "Conv_1": 4}
  assert {("params/GroupNorm_0/scale", 0, "producer", None),
          ("params/GroupNorm_0/bias", 0, "producer", None)} <= _slices(t.groups["Conv_0"])
  assert t.activations_complete("Conv_0") and t.groups["Conv_0"].activation == "relu"
  keep = np.array([1, 0, 1, 1, 0], bool)
  masked, small, st = _masked_and_small(t, v, {"Conv_0": keep})
  np.testing.assert_array_equal(small["params"]["GroupNorm_0"]["scale"],
                                np.asarray(v["params"]["GroupNorm_0"]["scale"])[keep])
  np.testing.assert_allclose(st.apply(small, x[:2]), jax.jit(Net().apply)(masked, x[:2]), atol=1e-5)


def test_training_mode_apply_that_returns_updated_batch_stats_says_what_to_trace():
  """apply(..., mutable=['batch_stats']) returns (outputs, updates): the updated statistics
  reach the outputs, so every group through them is lost; explain() says what to trace."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.BatchNorm(use_running_average=False)(nn.Dense(6)(x)))
      return nn.Dense(2)(h)
  x = _arr(4, 3)
  v = jax.jit(Net().init)(jax.random.key(0), x)
  t = jaxprune.trace(lambda v, x: Net().apply(v, x, mutable=["batch_stats"]), v, x)
  assert t.groups == {}
  assert "returns updated variables (at output 1/batch_stats" in t.explain()
  assert "[0]" in t.explain()
  t = jaxprune.trace(lambda v, x: Net().apply(v, x, mutable=["batch_stats"])[0], v, x)
  assert {k: g.size for k, g in t.groups.items()} == {"Dense_0": 6}
  assert "updated variables" not in t.explain()


def test_unrolled_rnn_from_a_zero_state_is_one_group_at_any_batch_size():
  """h = jnp.zeros((B, H)); a Python loop of tanh(x_t @ wx + h @ wh + b): the first step's
  zeros @ wh reads the units as every later step does (it blocked them, 'contracted between
  two activations', and the model had no group)."""
  def fn(p, x):
    h = jnp.zeros((x.shape[0], p["wh"].shape[0]))
    for t in range(x.shape[1]):
      h = jnp.tanh(x[:, t] @ p["wx"] + h @ p["wh"] + p["b"])
    return h @ p["wo"] + p["bo"]
  p = {"wx": _arr(3, 5), "wh": _arr(5, 5), "b": _arr(5), "wo": _arr(5, 2), "bo": _arr(2)}
  x = _arr(4, 3, 3)
  t = jaxprune.trace(fn, p, x)
  assert {k: g.size for k, g in t.groups.items()} == {"wx": 5}
  assert _slices(t.groups["wx"]) == {("wx", 1, "producer", None), ("wh", 1, "producer", None),
                                     ("b", 0, "producer", None), ("wh", 0, "consumer", None),
                                     ("wo", 0, "consumer", None)}
  keep = np.array([1, 0, 1, 1, 0], bool)
  masked, small, st = _masked_and_small(t, p, {"wx": keep})
  np.testing.assert_array_equal(small["wh"], np.asarray(p["wh"])[keep][:, keep])
  np.testing.assert_allclose(st.apply(small, x[:2]), fn(masked, x[:2]), atol=1e-5)


def test_a_vector_readout_is_a_consumer_kernel_the_pruners_use():
  """A one-output head h @ v with v of shape (H,): v is the group's consumer kernel, which
  check_group refused ('a 1-D leaf cannot be a kernel'), so every use of the target failed; a
  constant unit folds into the scalar bias exactly."""
  def fn(p, x):
    return jax.nn.relu(x @ p["w"] + p["b"]) @ p["v"] + p["c"]
  p = {"w": _arr(3, 4).at[:, 2].set(0.0), "b": jnp.array([2.0, 2.5, 0.7, 3.0]),
       "v": _arr(4), "c": jnp.float32(0.5)}
  x = _arr(6, 3)
  t = jaxprune.trace(fn, p, x)
  assert _slices(t.groups["w"]) == {("w", 1, "producer", None), ("b", 0, "producer", None),
                                    ("v", 0, "consumer", None)}
  acts = t.activations(p, x, "w")
  p2, um, _ = jaxprune.distinctiveness(t, "w", similar=False, complementary=False)(
      p, jaxprune.unit_masks_ones(t), acts)
  assert np.asarray(um["w"]).tolist() == [True, True, False, True]
  np.testing.assert_allclose(p2["c"], 0.5 + 0.7 * p["v"][2], rtol=1e-6)
  small, st = t.compact(p2, um)
  assert small["v"].shape == (3,)
  np.testing.assert_allclose(st.apply(small, x[:2]), fn(p, x[:2]), atol=1e-5)


def test_a_flax_module_passed_as_fn_says_to_trace_its_apply():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(x)
  x = _arr(2, 3)
  with pytest.raises(jaxprune.TraceError, match=r"linen module Net itself.*trace\(model\.apply"):
    jaxprune.trace(Net(), Net().init(jax.random.key(0), x), x)
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  with pytest.raises(jaxprune.TraceError, match=r"nnx module Linear itself.*nnx\.split\(model\)"):
    jaxprune.trace(model, nnx.state(model), x)
  with pytest.raises(jaxprune.TraceError, match=r"linen module Net class itself"):
    jaxprune.trace(Net, Net().init(jax.random.key(0), x), x)     # the class, not an instance


def test_a_vae_latent_is_not_prunable_and_explain_names_the_noise():
  def vae(p, x):
    h = jnp.tanh(x @ p["we"] + p["be"])
    mu, logv = h @ p["wm"], h @ p["wv"]
    z = mu + jnp.exp(0.5 * logv) * jax.random.normal(jax.random.key(0), mu.shape)
    return jnp.tanh(z @ p["wd"] + p["bd"]) @ p["wo"]
  p = {"we": _arr(6, 8), "be": _arr(8), "wm": _arr(8, 3), "wv": _arr(8, 3), "wd": _arr(3, 5),
       "bd": _arr(5), "wo": _arr(5, 6)}
  t = jaxprune.trace(vae, p, _arr(4, 6))
  assert {n: g.size for n, g in t.groups.items()} == {"we": 8, "wd": 5}   # not the latent's 3
  assert "a VAE's sampled latent" in t.explain()


def test_a_function_that_reads_a_learned_value_of_its_own_is_other_not_linear():
  """A swish with a learned per-unit beta, a learned threshold and a scale after a relu are
  functions of the units and a parameter: 'other' (they were named 'linear', the identity),
  and the weight-based constant rule is refused; a bias, a per-unit scale and the identity
  stay 'linear'."""
  p = {"w1": _arr(6, 10), "b1": _arr(10), "beta": _arr(10), "w2": _arr(10, 3), "b2": _arr(3)}
  x = _arr(16, 6)
  z = lambda p, x: x @ p["w1"] + p["b1"]
  cases = {
      "other": [lambda p, x: z(p, x) * jax.nn.sigmoid(p["beta"] * z(p, x)),   # learned swish
                lambda p, x: jnp.where(z(p, x) > p["beta"], z(p, x), 0.0),    # a threshold
                lambda p, x: jax.nn.relu(z(p, x)) * p["beta"]],               # LayerScale
      "linear": [lambda p, x: z(p, x), lambda p, x: z(p, x) * p["beta"],
                 lambda p, x: (x @ p["w1"]) * p["beta"] + p["b1"]]}
  for want, fns in cases.items():
    for act in fns:
      fn = lambda p, x, act=act: act(p, x) @ p["w2"] + p["b2"]
      t = jaxprune.trace(fn, p, x)
      assert t.groups["w1"].activation == want
      if want == "other":
        np.testing.assert_allclose(t.activations(p, x, "w1"), act(p, x), atol=1e-6)
        with pytest.raises(ValueError, match="does not output act.bias. here"):
          jaxprune.weight_distinctiveness(t, "w1", similar=False, complementary=False)


def _conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _group_norm(x, groups):
  n, h, w, c = x.shape
  y = x.reshape(n, h, w, groups, c // groups)
  m = y.mean((1, 2, 4), keepdims=True)
  v = ((y - m) ** 2).mean((1, 2, 4), keepdims=True)
  return ((y - m) / jnp.sqrt(v + 1e-5)).reshape(n, h, w, c)


@pytest.mark.parametrize("where", ["over_the_concatenation", "on_a_piece_then_gated"])
def test_a_group_norm_meeting_a_concatenation_leaves_no_group_without_producers(where):
  """Norm groups cut across a concatenation (or a piece's channels cut into norm groups) tie
  the concatenation's width to convs that cannot shrink: its norm params, gates and readers must
  not form a group of their own, whose compaction would cut them and not the convs."""
  p = {"a": _arr(3, 3, 3, 5), "b": _arr(3, 3, 3, 3), "scale": _arr(8), "shift": _arr(8),
       "s1": _arr(8, 3), "s2": _arr(3, 8), "c": _arr(1, 1, 8, 4)}

  def fn(p, x):
    a, b = _conv(x, p["a"]), _conv(x, p["b"])
    if where == "over_the_concatenation":
      h = _group_norm(jnp.concatenate([a, b], -1), 2) * p["scale"] + p["shift"]
    else:
      h = jnp.concatenate([_group_norm(a[..., :4], 2), a[..., 4:], b], -1) * p["scale"]
      h = h * jax.nn.sigmoid(jax.nn.relu(h.mean((1, 2)) @ p["s1"]) @ p["s2"])[:, None, None]
    return jax.nn.relu(_conv(jax.nn.relu(h), p["c"])).mean((1, 2))

  x = _arr(4, 6, 6, 3)
  target = jaxprune.trace(fn, p, x)
  for name, g in target.groups.items():   # any group reported compacts to the masked network
    um = {name: jnp.arange(g.size) != 1}
    masked, small, small_target = _masked_and_small(target, p, um)
    np.testing.assert_allclose(small_target.apply(small, x), fn(masked, x), rtol=1e-5, atol=1e-5)
  width = {("scale", 0), ("shift", 0), ("s1", 0), ("s2", 1), ("c", 2)}   # the concatenation's
  assert not [s for g in target.groups.values() for s in g.slices
              if (s.path[-1], s.axis) in width], target.groups
  assert "concatenated and then split" in [l for l in target.explain().splitlines()
                                           if l.startswith("scale ")][0]


@pytest.mark.parametrize("cut", ["slice_of_kernel", "split_of_kernel", "slice_of_values"])
def test_a_cut_into_equal_parts_with_a_part_never_read_is_not_prunable(cut):
  """``h @ A[:H]`` with ``A`` of 2H rows (or ``jnp.split`` keeping one half, or ``h2[:, :H]``
  of a product of 2H columns): unit i owned the unread half's entry too, so distinctiveness
  folded a constant unit's value times both rows into the bias (the output moved by 1.19).
  The axis is now refused, and explain() says why."""
  H = 4
  p = {"w1": _arr(3, H), "b1": _arr(H), "A": _arr(2 * H, 2), "w2": _arr(3, 2 * H),
       "bo": _arr(2)}

  def fn(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    if cut == "slice_of_kernel":
      return h @ p["A"][:H] + p["bo"]
    if cut == "split_of_kernel":
      top, _ = jnp.split(p["A"], 2, 0)
      return h @ top + p["bo"]
    g = jnp.tanh(x @ p["w2"])[:, :H]
    return g @ p["A"][:H] + h @ p["A"][H:] + p["bo"]

  target = jaxprune.trace(fn, p, _arr(5, 3))
  assert not target.groups, target.groups
  assert "cut into equal parts of which only some are read" in target.explain()
