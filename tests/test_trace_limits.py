"""Limits of ``jaxprune.trace`` an outside user hits: the shape of activations read through a
reshape of other axes, why a group's activations are refused, instance and group norms (flax's
GroupNorm with one or several channels per group, and by hand) before the activations, and the
names of groups in plain-JAX layer lists. References are hand-written NumPy loops or
hand-built cases with known answers."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from conftest import host_f32

_RNG = np.random.default_rng(0)


def _arr(*shape, scale=1.0):
  return host_f32(scale * _RNG.normal(size=shape))


# ------------------------------------------------------- activations keep non-unit axes whole

def test_activations_keep_a_token_axis_made_by_a_reshape_whole():
  """Tokens made from a patch grid ((B, 4, 4, D) -> (B, 16, D)), then a per-token hidden layer:
  its activations are (B, 16, H), as the function computes them, not (B, 4, 4, H)."""
  def fn(p, x):                                   # x: (B, 4, 4, 3)
    tok = (x @ p["w0"] + p["b0"]).reshape(x.shape[0], -1, 5)          # (B, 16, 5)
    h = jnp.tanh(tok @ p["w1"] + p["b1"])                              # (B, 16, 7)
    return (h @ p["w2"]).mean(1) + p["b2"]

  p = {"w0": _arr(3, 5), "b0": _arr(5), "w1": _arr(5, 7), "b1": _arr(7), "w2": _arr(7, 2),
       "b2": _arr(2)}
  x = _arr(6, 4, 4, 3)
  t = jaxprune.trace(fn, p, x)
  assert t.groups["w1"].size == 7
  got = np.asarray(t.activations(p, x[:3], "w1"))
  xn, pn = np.asarray(x[:3], np.float64), {k: np.asarray(v, np.float64) for k, v in p.items()}
  want = np.empty((3, 16, 7))
  for b in range(3):
    for i in range(4):
      for j in range(4):
        tok = xn[b, i, j] @ pn["w0"] + pn["b0"]
        want[b, i * 4 + j] = np.tanh(tok @ pn["w1"] + pn["b1"])
  assert got.shape == (3, 16, 7)
  np.testing.assert_allclose(got, want, atol=1e-5)


# ------------------------------------------------------------- why activations are refused

class _Inverted(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(6, (1, 1), name="expand")(x))
    h = nn.Conv(6, (3, 3), feature_group_count=6, padding="VALID", name="dw")(h)
    return nn.Dense(2, name="head")(nn.relu(h).mean(axis=(1, 2)))


def test_refusal_reason_names_the_depthwise_conv_after_the_activations():
  m = _Inverted()
  x = _arr(4, 6, 6, 3)
  v = jax.tree.map(lambda s: _arr(*s.shape), jax.eval_shape(m.init, jax.random.key(0), x))
  t = jaxprune.trace(m.apply, v, x)
  assert not t.activations_complete("expand")
  why = t.activations_incomplete_why("expand")
  assert "depthwise" in why and "params/dw/kernel" in why


def test_refusal_reason_for_two_read_points_and_a_residual():
  def two_points(p, x):
    h = x @ p["w1"] + p["b1"]
    return jax.nn.relu(h) @ p["w2"] + h @ p["w3"]

  p = {"w1": _arr(4, 6), "b1": _arr(6), "w2": _arr(6, 3), "w3": _arr(6, 3)}
  t = jaxprune.trace(two_points, p, _arr(8, 4))
  assert "read it at different points" in t.activations_incomplete_why("w1")

  def residual(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    h = h + jnp.tanh(h @ p["w2"] + p["b2"])
    return h @ p["w3"]

  p = {"w1": _arr(4, 6), "b1": _arr(6), "w2": _arr(6, 6), "b2": _arr(6), "w3": _arr(6, 3)}
  t = jaxprune.trace(residual, p, _arr(8, 4))
  (name,) = t.groups
  assert "w2" in t.activations_incomplete_why(name)


# ------------------------------------------------------------------ instance norm (GroupNorm)

C = 4


class _GNNet(nn.Module):
  groups: int = C
  channels: int = C

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(self.channels, (3, 3), padding="VALID", name="c1")(x)
    h = nn.relu(nn.GroupNorm(num_groups=self.groups, name="gn")(h))
    h = nn.Conv(3, (3, 3), padding="VALID", name="c2")(h)
    return nn.Dense(2, name="head")(h.mean(axis=(1, 2)))


def _gn_params(groups):
  """The module, params (init's shapes, random values: no norm parameter at its initial
  constant) and inputs."""
  m = _GNNet(groups)
  x = _arr(5, 7, 7, 2)
  shapes = jax.eval_shape(m.init, jax.random.key(1), x)
  v = jax.tree.map(lambda s: jnp.asarray(0.4 * _RNG.normal(size=s.shape) + 0.2, s.dtype), shapes)
  return m, v, x


def _np_conv_valid(x, k, b):
  """A 'VALID' 2-D convolution, NHWC with an HWIO kernel, as a loop."""
  kh, kw, _, co = k.shape
  B, H, W, _ = x.shape
  out = np.zeros((B, H - kh + 1, W - kw + 1, co))
  for i in range(H - kh + 1):
    for j in range(W - kw + 1):
      out[:, i, j] = np.einsum("bhwc,hwco->bo", x[:, i:i + kh, j:j + kw], k)
  return out + b


def test_instance_norm_activations_are_after_the_norm():
  m, v, x = _gn_params(C)
  t = jaxprune.trace(m.apply, v, x)
  assert t.activations_complete("c1") and t.groups["c1"].activation == "relu"
  assert t.activations_incomplete_why("c1") is None
  pn = jax.tree.map(lambda a: np.asarray(a, np.float64), v)["params"]
  h = _np_conv_valid(np.asarray(x, np.float64), pn["c1"]["kernel"], pn["c1"]["bias"])
  want = np.empty_like(h)
  for b in range(h.shape[0]):
    for c in range(C):                     # each channel by its own mean and variance
      z = h[b, :, :, c]
      z = (z - z.mean()) / np.sqrt(z.var() + 1e-6)
      want[b, :, :, c] = np.maximum(z * pn["gn"]["scale"][c] + pn["gn"]["bias"][c], 0.0)
  got = np.asarray(t.activations(v, x, "c1"))
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-4)


def _check_repeated_channels_merge(m, p, x, dst, src, keep, twin):
  """Channels ``dst`` of conv ``c1`` and norm ``gn`` repeat channels ``src``: the unit that holds
  them has the activations of unit ``twin``, distinctiveness merges them to the unit mask
  ``keep`` with the outputs unchanged, and the compacted network computes the same."""
  c1, gn = dict(p["params"]["c1"]), dict(p["params"]["gn"])
  c1["kernel"] = c1["kernel"].at[..., dst].set(c1["kernel"][..., src])
  for leaf, key in ((c1, "bias"), (gn, "scale"), (gn, "bias")):
    leaf[key] = leaf[key].at[dst].set(leaf[key][src])
  p = {"params": {**p["params"], "c1": c1, "gn": gn}}
  t = jaxprune.trace(m.apply, p, x)
  acts = t.activations(p, x, "c1")
  gone = keep.index(False)
  np.testing.assert_array_equal(np.asarray(acts[..., gone]), np.asarray(acts[..., twin]))
  p2, um, _ = jaxprune.distinctiveness(t, "c1", complementary=False, constants=False)(
      p, jaxprune.unit_masks_ones(t), acts, 1.0, 179.0)
  assert np.asarray(um["c1"]).tolist() == keep
  apply = jax.jit(m.apply)
  np.testing.assert_allclose(apply(p2, x), apply(p, x), atol=1e-5)
  small, small_t = t.compact(p2, um)
  assert small["params"]["gn"]["scale"].shape == (p["params"]["gn"]["scale"].shape[0]
                                                  * (len(keep) - 1) // len(keep),)
  np.testing.assert_allclose(small_t.apply(small, x), apply(p, x), atol=1e-5)
  return acts


def test_instance_norm_duplicate_channel_is_merged_exactly():
  m, v, x = _gn_params(C)
  _check_repeated_channels_merge(m, v, x, np.array([3]), np.array([1]),
                                 [True, True, True, False], twin=1)


def test_group_norm_with_several_channels_per_group_activations_and_exact_merge():
  """Flax's GroupNorm with 2 channels per group (statistics over space and the group's channels,
  broadcast back onto the channels by jnp.repeat): each norm group is one unit whose values are
  its 2 channels, so its activations are after the norm and the ReLU, (B, H, W, 2, groups),
  as a NumPy loop computes them, and a norm group that repeats another channel for channel
  merges exactly. The chain stopped at the repeat (a unit spread over an axis with its
  channels), so the activation pruners refused the group."""
  m, v, x = _gn_params(2)
  t = jaxprune.trace(m.apply, v, x)
  assert t.groups["c1"].size == 2
  assert t.activations_complete("c1") and t.groups["c1"].activation == "relu"
  pn = jax.tree.map(lambda a: np.asarray(a, np.float64), v)["params"]
  h = _np_conv_valid(np.asarray(x, np.float64), pn["c1"]["kernel"], pn["c1"]["bias"])
  want = np.empty(h.shape[:3] + (2, 2))
  for b in range(h.shape[0]):
    for g in range(2):                     # each group by the mean and variance of its channels
      z = h[b, :, :, 2 * g:2 * g + 2]
      z = (z - z.mean()) / np.sqrt(z.var() + 1e-6)
      want[b, :, :, :, g] = np.maximum(
          z * pn["gn"]["scale"][2 * g:2 * g + 2] + pn["gn"]["bias"][2 * g:2 * g + 2], 0.0)
  np.testing.assert_allclose(np.asarray(t.activations(v, x, "c1")), want, atol=1e-4)

  m = _GNNet(3, channels=6)                # 6 channels: group 2 repeats group 0
  shapes = jax.eval_shape(m.init, jax.random.key(1), x)
  p = jax.tree.map(lambda s: jnp.asarray(0.4 * _RNG.normal(size=s.shape) + 0.2, s.dtype), shapes)
  acts = _check_repeated_channels_merge(m, p, x, np.arange(4, 6), np.arange(2),
                                        [True, True, False], twin=0)
  assert acts.shape[-2:] == (2, 3)


def test_a_group_norm_over_interleaved_channels_merges_exactly():
  """A hand-written group norm whose groups interleave: channels read as (channels per group,
  groups), group g owning channels g, G + g, ... Each unit's statistics are of its own
  channels, so its activations (B, 2, groups) are after the norm, as NumPy computes them, and a
  unit that repeats another channel for channel merges exactly."""
  G, cpg, eps = 3, 2, 1e-5

  def fn(p, x):
    h = x @ p["w1"] + p["b1"]                                      # (B, cpg * G)
    g = h.reshape(x.shape[0], cpg, G)
    m = g.mean(1, keepdims=True)
    var = ((g - m) ** 2).mean(1, keepdims=True)
    h = ((g - m) / jnp.sqrt(var + eps)).reshape(x.shape[0], cpg * G)
    return jnp.tanh(h * p["s"] + p["t"]) @ p["w2"] + p["b2"]

  p = {"w1": _arr(4, cpg * G), "b1": _arr(cpg * G), "s": _arr(cpg * G), "t": _arr(cpg * G),
       "w2": _arr(cpg * G, 2), "b2": _arr(2)}
  x = _arr(9, 4)
  t = jaxprune.trace(fn, p, x)
  assert t.groups["w1"].size == G and t.activations_complete("w1")
  pn = {k: np.asarray(a, np.float64) for k, a in p.items()}
  h = (np.asarray(x, np.float64) @ pn["w1"] + pn["b1"]).reshape(9, cpg, G)
  z = (h - h.mean(1, keepdims=True)) / np.sqrt(h.var(1, keepdims=True) + eps)
  want = np.tanh(z * pn["s"].reshape(cpg, G) + pn["t"].reshape(cpg, G))
  np.testing.assert_allclose(np.asarray(t.activations(p, x, "w1")), want, atol=1e-5)

  cols = np.arange(cpg) * G                # unit 2 (columns 2, 5) repeats unit 0 (0, 3)
  p = {k: (a.at[..., cols + 2].set(a[..., cols]) if k in ("w1", "b1", "s", "t") else a)
       for k, a in p.items()}
  acts = t.activations(p, x, "w1")
  np.testing.assert_array_equal(np.asarray(acts[..., 2]), np.asarray(acts[..., 0]))
  p2, um, _ = jaxprune.distinctiveness(t, "w1", complementary=False, constants=False)(
      p, jaxprune.unit_masks_ones(t), acts, 1.0, 179.0)
  assert np.asarray(um["w1"]).tolist() == [True, True, False]
  np.testing.assert_allclose(fn(p2, x), fn(p, x), atol=1e-5)
  small, small_t = t.compact(p2, um)
  assert small["w2"].shape == (cpg * 2, 2)
  np.testing.assert_allclose(small_t.apply(small, x), fn(p, x), atol=1e-5)


def test_instance_norm_then_average_pooling_into_the_head():
  """Instance norm, ReLU, a mean over space and a dense head: the mean is the head's way of
  reading the units, not part of their activations."""
  def fn(p, x):
    h = jnp.einsum("bhwc,cd->bhwd", x, p["w1"]) + p["b1"]
    mu = h.mean(axis=(1, 2), keepdims=True)
    var = ((h - mu) ** 2).mean(axis=(1, 2), keepdims=True)
    h = jax.nn.relu((h - mu) / jnp.sqrt(var + 1e-5) * p["s"] + p["t"])
    return h.mean(axis=(1, 2)) @ p["w2"] + p["b2"]

  p = {"w1": _arr(3, 5), "b1": _arr(5), "s": _arr(5), "t": _arr(5), "w2": _arr(5, 2),
       "b2": _arr(2)}
  x = _arr(4, 5, 5, 3)
  t = jaxprune.trace(fn, p, x)
  assert t.activations_complete("w1")
  xn, pn = np.asarray(x, np.float64), {k: np.asarray(a, np.float64) for k, a in p.items()}
  h = xn @ pn["w1"] + pn["b1"]
  mu, var = h.mean(axis=(1, 2), keepdims=True), h.var(axis=(1, 2), keepdims=True)
  want = np.maximum((h - mu) / np.sqrt(var + 1e-5) * pn["s"] + pn["t"], 0.0)
  np.testing.assert_allclose(np.asarray(t.activations(p, x, "w1")), want, atol=1e-4)


def test_statistics_in_nested_calls_are_followed_and_exact():
  """jnp.var and jnp.std are nested calls (as is a jitted helper): the chain follows a call that
  computes a statistic of each unit over the other axes, so the norm's activations are the
  same as with plain reductions and a duplicate unit merges exactly. A variance over the units
  (a LayerNorm written with jnp.var) mixes them: no group."""
  def fn(p, x, how):
    y = x @ p["w1"] + p["b1"]
    m = y.mean(1, keepdims=True)
    if how == "var":
      z = (y - m) / jnp.sqrt(y.var(1, keepdims=True) + 1e-5)
    elif how == "std":
      z = (y - m) / (y.std(1, keepdims=True) + 1e-5)
    elif how == "jit_max":
      z = jax.jit(lambda v: v.max(1, keepdims=True))(y) - y      # >= 0
    else:
      z = (y - m) / jnp.sqrt(((y - m) ** 2).mean(1, keepdims=True) + 1e-5)
    return jax.nn.relu(z).mean(1) @ p["w2"]

  p, x = {"w1": _arr(4, 6), "b1": _arr(6), "w2": _arr(6, 2)}, _arr(3, 5, 4)
  plain = jaxprune.trace(lambda p, x: fn(p, x, "plain"), p, x)
  q = dict(p, b1=p["b1"].at[4].set(p["b1"][1]), w1=p["w1"].at[:, 4].set(p["w1"][:, 1]))
  for how in ("var", "std", "jit_max"):
    t = jaxprune.trace(lambda p, x, how=how: fn(p, x, how), p, x)
    assert t.activations_complete("w1") and t.activations_incomplete_why("w1") is None, how
    if how == "var":                  # the same norm as the plain one
      np.testing.assert_allclose(t.activations(p, x, "w1"), plain.activations(p, x, "w1"),
                                 atol=1e-5)
    acts = t.activations(q, x, "w1")
    q2, um, _ = jaxprune.distinctiveness(t, "w1", complementary=False, constants=False)(
        q, jaxprune.unit_masks_ones(t), acts, 1.0, 179.0)
    assert np.asarray(um["w1"]).tolist() == [True] * 4 + [False, True], how
    np.testing.assert_allclose(fn(q2, x, how), fn(q, x, how), atol=1e-5)

  def layer_norm(p, x):
    y = x @ p["w1"] + p["b1"]
    z = (y - y.mean(-1, keepdims=True)) / jnp.sqrt(y.var(-1, keepdims=True) + 1e-5)
    return jax.nn.relu(z).mean(1) @ p["w2"]
  assert "w1" not in jaxprune.trace(layer_norm, p, x).groups

  def batch_norm(p, x, nested):          # batch statistics: per unit, over the batch
    z = x @ p["w1"] + p["b1"]
    m = z.mean(0)
    v = z.var(0) if nested else ((z - m) ** 2).mean(0)
    return ((z - m) / jnp.sqrt(v + 1e-5)) @ p["w2"]
  got = [(t.groups["w1"].activation, t.activations_complete("w1")) for t in (
      jaxprune.trace(lambda p, x, n=n: batch_norm(p, x, n), p, _arr(16, 4)) for n in (1, 0))]
  assert got[0] == got[1] == ("other", True), got


# ---------------------------------------------------------------- plain-JAX group names

def _two_kernel_blocks(p, x):
  for blk in p["blocks"]:
    x = jnp.tanh(jnp.tanh(x @ blk["w1"] + blk["b1"]) @ blk["w2"] + blk["b2"])
  return x @ p["head"]


def test_a_layer_list_with_two_kernels_a_layer_names_each_kernel():
  blocks = [{"w1": _arr(4, 6), "b1": _arr(6), "w2": _arr(6, 5), "b2": _arr(5)},
            {"w1": _arr(5, 7), "b1": _arr(7), "w2": _arr(7, 4), "b2": _arr(4)}]
  p = {"blocks": blocks, "head": _arr(4, 3)}
  t = jaxprune.trace(_two_kernel_blocks, p, _arr(8, 4))
  sizes = {n: g.size for n, g in t.groups.items()}
  assert sizes == {"blocks/0": 6, "blocks/0/w2": 5, "blocks/1": 7, "blocks/1/w2": 4}
  producer = lambda n: {s.path for s in t.groups[n].producers if s.kind == "kernel"}
  assert producer("blocks/0/w2") == {("blocks", 0, "w2")}
  assert producer("blocks/1") == {("blocks", 1, "w1")}
  # The same layers in a dict of dicts: the same names, keyed by the dict's keys.
  pd = {"blocks": {"a": blocks[0], "b": blocks[1]}, "head": p["head"]}
  td = jaxprune.trace(lambda q, x: _two_kernel_blocks(
      {"blocks": list(q["blocks"].values()), "head": q["head"]}, x), pd, _arr(8, 4))
  assert list(td.groups) == ["blocks/a", "blocks/a/w2", "blocks/b", "blocks/b/w2"]


def test_one_kernel_a_layer_keeps_the_layer_names():
  layers = [{"w": _arr(4, 6), "b": _arr(6)}, {"w": _arr(6, 5), "b": _arr(5)},
            {"w": _arr(5, 3), "b": _arr(3)}]

  def fn(p, x):
    for layer in p["layers"][:-1]:
      x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ p["layers"][-1]["w"] + p["layers"][-1]["b"]

  t = jaxprune.trace(fn, {"layers": layers}, _arr(8, 4))
  assert list(t.groups) == ["layers/0", "layers/1"]


def test_a_dict_layer_with_two_kernels_names_the_second_by_its_key():
  def fn(p, x):
    h = jnp.tanh(x @ p["l"]["w0"])
    g = jnp.tanh(h @ p["l"]["w"] + p["l"]["b"])
    return g @ p["out"]

  p = {"l": {"w0": _arr(4, 6), "w": _arr(6, 5), "b": _arr(5)}, "out": _arr(5, 2)}
  t = jaxprune.trace(fn, p, _arr(8, 4))
  assert list(t.groups) == ["l", "l/w"]


def test_a_second_group_of_one_kernel_is_named_by_its_axis():
  """Two groups made by one leaf (a kernel (D, 3, 5) with two unit axes) keep 'name:axis'."""
  def fn(p, x):
    h = jnp.tanh(jnp.einsum("bd,dgh->bgh", x, p["l"]["w"]) + p["l"]["b"])
    return jnp.einsum("bgh,ghk->bk", h, p["out"])

  p = {"l": {"w": _arr(4, 3, 5), "b": _arr(3, 5)}, "out": _arr(3, 5, 2)}
  t = jaxprune.trace(fn, p, _arr(8, 4))
  assert {n: g.size for n, g in t.groups.items()} == {"l": 3, "l:2": 5}


def test_refusals_of_a_fixed_permutation_and_of_shard_map_say_what_to_do():
  """A closed-over index array (``h[:, perm]``) is no per-unit variable to pass in params, and a
  model inside ``shard_map`` is traced through the per-device function it wraps."""
  from jax.sharding import Mesh, PartitionSpec as PS
  try:
    from jax import shard_map
  except ImportError:                                    # older JAX
    from jax.experimental.shard_map import shard_map
  p = {"w1": _arr(6, 5), "b1": _arr(5), "w2": _arr(5, 2)}
  x = _arr(8, 6)
  perm = np.array([4, 2, 0, 1, 3])
  t = jaxprune.trace(lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"])[:, perm] @ p["w2"], p, x)
  line = next(l for l in t.explain().splitlines() if l.startswith("w2 "))
  assert "a fixed permutation, selection or mask of the units" in line
  assert "batch statistics" not in line

  def inner(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
  mesh = Mesh(np.array(jax.devices()[:1]), ("d",))
  sharded = lambda p, x: shard_map(inner, mesh=mesh, in_specs=(PS(), PS("d")),
                                   out_specs=PS("d"))(p, x)
  assert not jaxprune.trace(sharded, p, x).groups
  assert "trace the per-device function inside it" in jaxprune.trace(sharded, p, x).explain()
  assert list(jaxprune.trace(inner, p, x).groups) == ["w1"]
