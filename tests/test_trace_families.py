"""Model families outside users bring that the other trace tests do not cover, traced and pruned
end to end: a U-Net (skip concatenation, strided transposed conv), a ViT written with linen's
MultiHeadDotProductAttention and a cls token, a GRU cell written by hand under ``lax.scan``,
an nnx text classifier (Embed, masked mean pooling), a graph convolution network (adjacency @
X @ W) and a graph attention layer, a WaveNet-style 1-D audio net (dilated causal convs, gated
tanh * sigmoid cut from one kernel, residual and skip sums), an SE-ResNet block (the excitation
scales the residual stream), a siamese encoder (one layer applied to two inputs), ALBERT-style
layer sharing, maxout, a mixture of experts, a pixel-shuffle upsampler, a channel shuffle and
an nnx GRU.

Each model: a random half mask on every group at once, ``expand`` + ``apply_masks`` against
``compact`` (same outputs, also at another batch size; every sliced leaf cut to the kept
units' share); then ``importance_prune`` and, where the activations are new to the suite,
activation ``distinctiveness`` on one group, compacted again. Refusals are checked for the
reason the pruner or ``explain()`` gives. ``jnp.tile`` of size-1 axes (a ViT's class token) is
followed as a broadcast, and an nnx.RNN's closed-over Rngs get a hint that names them (both
were found here: the tile was opaque, the hint said to call ``model.eval()``)."""

import fractions
import re

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune import units
from conftest import host_f32

R = np.random.default_rng(0)


def _arr(*shape, scale=0.5):
  return host_f32(R.normal(size=shape) * scale)


def _perturbed(variables):
  """Moves every float leaf off its initial value (no bias or norm parameter at a constant);
  host noise, so that no program is compiled per leaf shape."""
  return jax.tree.map(lambda a: jnp.asarray(a + 0.2 * R.normal(size=a.shape), a.dtype),
                      variables)


def _random_like(path, shape):
  if len(shape.shape) >= 2:                                # kernels: fan-in scaled
    return R.normal(size=shape.shape) / np.sqrt(np.prod(shape.shape[:-1]))
  return (units.key_of(path[-1]) == "scale") + 0.2 * R.normal(size=shape.shape)  # biases, norms


def _linen(module, x):
  """(apply, variables) with random values of the init's shapes: ``eval_shape`` compiles
  nothing, where ``init`` costs a compilation or hundreds of dispatches."""
  shapes = jax.eval_shape(module.init, jax.random.key(1), x)
  return module.apply, jax.tree_util.tree_map_with_path(
      lambda path, sd: jnp.asarray(_random_like(path, sd), sd.dtype), shapes)


def _count(tree):
  return sum(int(np.prod(np.shape(a))) for a in jax.tree.leaves(tree))


def _half_mask(size, seed):
  """About half the units, at least one kept and one removed."""
  m = np.random.default_rng(seed).random(size) < 0.5
  m[0], m[-1] = True, False
  return jnp.asarray(m)


def _compact_matches_masking(target, jfn, params, um, xs):
  """Compacting equals masking on every input in ``xs``; returns the small params."""
  masked = jaxprune.apply_masks(params, jaxprune.expand(params, target, um))
  small, small_target = target.compact(masked, um)
  for x in xs:
    np.testing.assert_allclose(small_target.apply(small, x), jfn(masked, x), atol=2e-5,
                               rtol=1e-5)
  assert {n: g.size for n, g in small_target.groups.items()} == {
      n: int(np.sum(m)) for n, m in um.items()}
  return small


def _leaf_axis(leaf_shape, sl):
  """The leaf axis that holds the slice's axis (a ``view`` splits leaf axes into factors)."""
  if sl.view is None:
    return sl.axis
  ends = np.cumprod(sl.view)
  bounds = np.cumprod(leaf_shape)
  return int(np.searchsorted(bounds, ends[sl.axis]))


def _expected_shapes(params, groups, um):
  """Each sliced leaf's shape after compaction, from the slices alone: a segment loses the
  removed units, a whole axis (or a factor of it, through a view) keeps ``kept / size`` of
  its entries."""
  shapes = {}
  for g in groups.values():
    kept = int(np.sum(um[g.name]))
    for sl in sorted(g.slices, key=lambda sl: sl.segment is None):     # segments first
      leaf_shape = np.shape(units.get_path(params, sl.path))
      shape = shapes.setdefault(sl.path, [fractions.Fraction(n) for n in leaf_shape])
      axis = _leaf_axis(leaf_shape, sl)
      if sl.segment is not None:
        shape[axis] -= g.size - kept
      else:
        shape[axis] *= fractions.Fraction(kept, g.size)
  assert all(n.denominator == 1 for shape in shapes.values() for n in shape), shapes
  return {path: tuple(int(n) for n in shape) for path, shape in shapes.items()}


def _every_group(target, jfn, params, xs):
  """Every group at once, each with a random half mask: compact == masked at every input in
  ``xs``, and every leaf a group slices is cut to exactly the kept units' share."""
  um = {name: _half_mask(g.size, k) for k, (name, g) in enumerate(target.groups.items())}
  small = _compact_matches_masking(target, jfn, params, um, xs)
  want = _expected_shapes(params, target.groups, um)
  assert {path: np.shape(units.get_path(small, path)) for path in want} == want
  assert _count(small) < _count(params)


def _pruners(target, jfn, params, x, name, distinct=True):
  """importance_prune (half the units) and, where the activations are new to the suite,
  activation distinctiveness (a compilation of its own, ~1 s), each compacted."""
  ones = jaxprune.unit_masks_ones(target)
  size = target.groups[name].size
  p1, um1, _ = jaxprune.importance_prune(target, name)(params, ones, size // 2)
  assert int(um1[name].sum()) == size - size // 2
  _compact_matches_masking(target, jfn, p1, um1, [x])
  acts = target.activations(params, x, name)
  assert acts.shape[-1] == size
  if distinct:
    p2, um2, _ = jaxprune.distinctiveness(target, name, constants=False)(
        params, ones, acts, 60.0, 120.0)
    _compact_matches_masking(target, jfn, p2, um2, [x])
  return acts


def _sizes(target):
  return {n: g.size for n, g in target.groups.items()}


def _paths(target, name, role):
  return {"/".join(map(str, s.path)) for s in target.groups[name].slices if s.role == role}


# ------------------------------------------------------------------------------------- U-Net


class UNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    e1 = nn.relu(nn.Conv(6, (3, 3), name="enc1")(x))                       # 8x8
    e2 = nn.relu(nn.Conv(10, (3, 3), name="enc2")(nn.max_pool(e1, (2, 2), (2, 2))))
    u = nn.ConvTranspose(6, (2, 2), strides=(2, 2), name="up")(e2)          # back to 8x8
    h = nn.relu(nn.Conv(8, (3, 3), name="dec")(jnp.concatenate([u, e1], axis=-1)))
    return nn.Conv(2, (1, 1), name="out")(h)


def test_unet_skip_concatenation_and_transposed_conv():
  x = _arr(4, 8, 8, 3, scale=1.0)
  fn, v = _linen(UNet(), x)
  t = jaxprune.trace(fn, v, x)
  assert _sizes(t) == {"enc1": 6, "enc2": 10, "up": 6, "dec": 8}
  # dec reads the upsampled channels and the skip as two segments of one kernel axis.
  (dec_in,) = [s for s in t.groups["up"].consumers if s.path[-2] == "dec"]
  (skip_in,) = [s for s in t.groups["enc1"].consumers if s.path[-2] == "dec"]
  assert (dec_in.segment, skip_in.segment) == ((0, 6), (6, 6))     # (offset, length)
  assert _paths(t, "enc2", "consumer") == {"params/up/kernel"}
  jfn = jax.jit(fn)
  _every_group(t, jfn, v, [x, x[:2]])
  assert _pruners(t, jfn, v, x, "enc2").shape == (4, 4, 4, 10)


# --------------------------------------------------------------------------------------- ViT

VD, NH = 8, 2


class ViT(nn.Module):
  """Patch embedding conv, cls token, learned positions, pre-LN attention and MLP."""
  tile: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(VD, (4, 4), strides=(4, 4), name="patch")(x)
    b = x.shape[0]
    x = x.reshape(b, -1, VD)
    cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, VD))
    cls = jnp.tile(cls, (b, 1, 1)) if self.tile else jnp.broadcast_to(cls, (b, 1, VD))
    x = jnp.concatenate([cls, x], axis=1)
    x = x + self.param("pos", nn.initializers.normal(0.02), (1, x.shape[1], VD))
    h = nn.LayerNorm(name="ln1")(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=NH, qkv_features=12, name="attn")(h, h)
    h = nn.LayerNorm(name="ln2")(x)
    x = x + nn.Dense(VD, name="fc2")(nn.gelu(nn.Dense(4 * VD, name="fc1")(h)))
    return nn.Dense(3, name="head")(nn.LayerNorm(name="lnf")(x)[:, 0])


XV = jax.random.normal(jax.random.key(0), (4, 8, 8, 3))


def test_vit_heads_value_dims_and_mlp_units():
  fn, v = _linen(ViT(), XV)
  t = jaxprune.trace(fn, v, XV)
  # Heads (q, k, v and out per head), the value's head dimension, the query/key features
  # (contracted by q @ k.T), the MLP's hidden units, and the residual stream (the patch conv's
  # channels, the cls token's, the positions', every LayerNorm's scale and shift), read by the
  # LayerNorms' statistics (sums of values zero at a masked channel).
  assert _sizes(t) == {"patch": VD, "attn/query": NH, "attn/value": 6, "attn/query:2": 6,
                       "fc1": 4 * VD}
  assert t.groups["patch"].read_by_products
  assert _paths(t, "patch", "producer") == {"params/patch/kernel", "params/patch/bias",
                                            "params/cls", "params/pos", "params/attn/out/kernel",
                                            "params/attn/out/bias", "params/fc2/kernel",
                                            "params/fc2/bias"} | {
      f"params/{n}/{k}" for n in ("ln1", "ln2", "lnf") for k in ("scale", "bias")}
  assert _paths(t, "attn/query:2", "producer") == {
      f"params/attn/{n}/{k}" for n in ("query", "key") for k in ("kernel", "bias")}
  assert _paths(t, "attn/query:2", "consumer") == set()
  assert _paths(t, "attn/query", "producer") == {
      f"params/attn/{n}/{k}" for n in ("query", "key", "value") for k in ("kernel", "bias")}
  assert _paths(t, "attn/value", "consumer") == {"params/attn/out/kernel"}
  jfn = jax.jit(fn)
  _every_group(t, jfn, v, [XV, XV[:2]])
  assert _pruners(t, jfn, v, XV, "fc1", distinct=False).shape == (4, 5, 4 * VD)


def test_vit_with_a_tiled_cls_token_runs_at_another_batch_size():
  m = ViT(tile=True)
  fn, v = _linen(m, XV)
  t = jaxprune.trace(fn, v, XV)
  assert t.activations(v, XV[:2], "fc1").shape == (2, 5, 4 * VD)
  um = jaxprune.unit_masks_ones(t)
  um["fc1"] = _half_mask(4 * VD, 0)
  _compact_matches_masking(t, jax.jit(fn), v, um, [XV[:2]])


def _vit_without_norms(p, x, tile):
  b = x.shape[0]
  t = jax.lax.conv_general_dilated(x, p["patch"], (4, 4), "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")).reshape(b, -1, VD)
  cls = jnp.tile(p["cls"], (b, 1, 1)) if tile else jnp.broadcast_to(p["cls"], (b, 1, VD))
  t = jnp.concatenate([cls, t], 1) + p["pos"]
  q, k, v = jnp.split(t @ p["wqkv"], 3, -1)
  a = jax.nn.softmax(jnp.einsum("bqd,bkd->bqk", q, k) / 3.0, -1)
  t = t + jnp.einsum("bqk,bkd->bqd", a, v) @ p["wo"]
  t = t + jax.nn.gelu(t @ p["w1"] + p["b1"]) @ p["w2"]
  return t[:, 0] @ p["wh"]


_VIT_PLAIN = {k: _arr(*s) for k, s in dict(
    patch=(4, 4, 3, VD), cls=(1, 1, VD), pos=(1, 5, VD), wqkv=(VD, 18), wo=(6, VD),
    w1=(VD, 16), b1=(16,), w2=(16, VD), wh=(VD, 3)).items()}


def test_vit_without_norms_couples_the_stream_with_cls_and_positions():
  fn = lambda p, x: _vit_without_norms(p, x, tile=False)
  t = jaxprune.trace(fn, _VIT_PLAIN, XV)
  assert _sizes(t) == {"patch": VD, "w1": 16, "wqkv": 6}      # (q/k/v feature j: one unit)
  assert _paths(t, "patch", "producer") == {"patch", "cls", "pos", "wo", "w2"}
  _every_group(t, jax.jit(fn), _VIT_PLAIN, [XV, XV[:2]])


def test_a_tiled_cls_token_leaves_the_residual_stream_prunable():
  t = jaxprune.trace(lambda p, x: _vit_without_norms(p, x, tile=True), _VIT_PLAIN, XV)
  assert _sizes(t) == {"patch": VD, "w1": 16, "wqkv": 6}


# ------------------------------------------------------------------------- GRU under lax.scan

GF, GH = 3, 10


def _gru(p, x):                                  # x: (batch, steps, features)
  def step(h, xt):
    z = jax.nn.sigmoid(xt @ p["wz"] + h @ p["uz"] + p["bz"])
    r = jax.nn.sigmoid(xt @ p["wr"] + h @ p["ur"] + p["br"])
    n = jnp.tanh(xt @ p["wn"] + r * (h @ p["un"] + p["bun"]) + p["bn"])
    h = (1 - z) * n + z * h
    return h, h
  h, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], GH), x.dtype), x.transpose(1, 0, 2))
  return h @ p["wo"] + p["bo"]


def test_hand_written_gru_under_scan_is_one_group():
  p = {k: _arr(*s) for k, s in dict(
      wz=(GF, GH), uz=(GH, GH), bz=(GH,), wr=(GF, GH), ur=(GH, GH), br=(GH,), wn=(GF, GH),
      un=(GH, GH), bun=(GH,), bn=(GH,), wo=(GH, 2), bo=(2,)).items()}
  x = _arr(6, 5, GF, scale=1.0)
  t = jaxprune.trace(_gru, p, x)
  assert _sizes(t) == {"wz": GH}
  assert _paths(t, "wz", "producer") == {"wz", "uz", "bz", "wr", "ur", "br", "wn", "un",
                                         "bun", "bn"}
  assert _paths(t, "wz", "consumer") == {"uz", "ur", "un", "wo"}
  jfn = jax.jit(_gru)
  _every_group(t, jfn, p, [x, x[:3]])
  assert _pruners(t, jfn, p, x, "wz").shape == (5, 6, GH)     # (steps, batch, units)
  with pytest.raises(ValueError, match="constants=False"):
    jaxprune.distinctiveness(t, "wz")(p, jaxprune.unit_masks_ones(t),
                                      t.activations(p, x, "wz"), 15.0, 165.0)


# ------------------------------------------------------------------ nnx text classifier


class TextClassifier(nnx.Module):
  def __init__(self, rngs):
    self.emb = nnx.Embed(30, 8, rngs=rngs)
    self.l1 = nnx.Linear(8, 16, rngs=rngs)
    self.l2 = nnx.Linear(16, 3, rngs=rngs)

  def __call__(self, tok):
    keep = (tok > 0).astype(jnp.float32)[..., None]           # token 0 is padding
    e = (self.emb(tok) * keep).sum(1) / jnp.maximum(keep.sum(1), 1.0)
    return self.l2(nnx.relu(self.l1(e)))


def test_nnx_text_classifier_with_masked_mean_pooling():
  graphdef, state = nnx.split(TextClassifier(nnx.Rngs(0)))
  p = _perturbed(nnx.to_pure_dict(state))

  def fn(params, tok):
    s = jax.tree.map(lambda a: a, state)
    nnx.replace_by_pure_dict(s, params)
    return nnx.merge(graphdef, s)(tok)

  tok = jnp.asarray(R.integers(0, 30, size=(6, 7)))
  t = jaxprune.trace(fn, p, tok)
  assert _sizes(t) == {"emb": 8, "l1": 16}            # the embedding's features are units
  jfn = jax.jit(fn)
  _every_group(t, jfn, p, [tok, tok[:2]])
  _pruners(t, jfn, p, tok, "l1", distinct=False)


# ------------------------------------------------------------------------------ graph networks

GN, GFI = 7, 5


def _gcn(p, inputs):
  adj, x = inputs                                        # (B, N, N), (B, N, F)
  h = jax.nn.relu(adj @ x @ p["w1"] + p["b1"])
  h = jax.nn.relu(jnp.einsum("bij,bjf->bif", adj, h) @ p["w2"] + p["b2"])
  return h.mean(1) @ p["w3"] + p["b3"]


def _gat(p, inputs):
  adj, x = inputs
  h = x @ p["w1"]
  e = jax.nn.leaky_relu((h @ p["a1"])[:, :, None] + (h @ p["a2"])[:, None, :], 0.2)
  alpha = jax.nn.softmax(jnp.where(adj > 0, e, -1e9), -1)
  h = jax.nn.elu(alpha @ h + p["b1"])
  return h.mean(1) @ p["w2"] + p["b2"]


def test_graph_convolution_and_graph_attention():
  adj = host_f32(R.random((5, GN, GN)) < 0.4) + jnp.eye(GN)
  adj = adj / adj.sum(-1, keepdims=True)
  inputs = (adj, _arr(5, GN, GFI, scale=1.0))
  p = {k: _arr(*s) for k, s in dict(w1=(GFI, 12), b1=(12,), w2=(12, 9), b2=(9,), w3=(9, 2),
                                    b3=(2,)).items()}
  t = jaxprune.trace(_gcn, p, inputs)
  assert _sizes(t) == {"w1": 12, "w2": 9}
  jfn = jax.jit(_gcn)
  _every_group(t, jfn, p, [inputs])
  assert _pruners(t, jfn, p, inputs, "w1").shape == (5, GN, 12)

  # Graph attention: the attention vectors a1, a2 read the units as consumers; the bias comes
  # after the node aggregation, which depends on the units themselves.
  q = {k: _arr(*s) for k, s in dict(w1=(4, 10), a1=(10,), a2=(10,), b1=(10,), w2=(10, 3),
                                    b2=(3,)).items()}
  inputs = (adj, _arr(5, GN, 4, scale=1.0))
  t = jaxprune.trace(_gat, q, inputs)
  assert _sizes(t) == {"w1": 10}
  assert _paths(t, "w1", "consumer") == {"a1", "a2", "w2"}
  jfn = jax.jit(_gat)
  _every_group(t, jfn, q, [inputs])
  ones = jaxprune.unit_masks_ones(t)
  q1, um1, _ = jaxprune.importance_prune(t, "w1")(q, ones, 5)
  _compact_matches_masking(t, jfn, q1, um1, [inputs])
  with pytest.raises(ValueError, match=r"per-unit parameters of the group \(b1\) act on its "
                                       r"units after the activations"):
    jaxprune.distinctiveness(t, "w1", constants=False)(
        q, ones, t.activations(q, inputs, "w1"), 60.0, 120.0)


# --------------------------------------------------------------------------- 1-D audio nets


class WaveNet(nn.Module):
  @nn.compact
  def __call__(self, x):                                   # (batch, time, 1)
    h = nn.Conv(8, (1,), name="inp")(x)
    skip = 0.0
    for i, d in enumerate((1, 2, 4)):
      z = nn.Conv(12, (2,), kernel_dilation=(d,), padding="CAUSAL", name=f"dil{i}")(h)
      a, b = jnp.split(z, 2, -1)
      g = jnp.tanh(a) * nn.sigmoid(b)
      h = h + nn.Conv(8, (1,), name=f"res{i}")(g)
      skip = skip + nn.Conv(5, (1,), name=f"skip{i}")(g)
    s = nn.relu(nn.Conv(7, (3,), kernel_dilation=(2,), padding="VALID", name="post")(
        nn.relu(skip)))
    return nn.Dense(3, name="head")(s.max(1))


def test_wavenet_gates_residual_and_skip_sums():
  x = _arr(4, 32, 1, scale=1.0)
  fn, v = _linen(WaveNet(), x)
  t = jaxprune.trace(fn, v, x)
  assert _sizes(t) == {"inp": 8, "dil0": 6, "skip0": 5, "dil1": 6, "dil2": 6, "post": 7}
  # The residual stream and the skip sum are each one coupled group.
  assert {s.path[-2] for s in t.groups["inp"].producers} == {"inp", "res0", "res1", "res2"}
  assert {s.path[-2] for s in t.groups["skip0"].producers} == {"skip0", "skip1", "skip2"}
  # Gate unit i owns columns i and 6 + i of its dilated conv's kernel.
  (kernel,) = [s for s in t.groups["dil1"].producers if s.path[-1] == "kernel"]
  assert kernel.view is not None
  jfn = jax.jit(fn)
  _every_group(t, jfn, v, [x, x[:2]])
  assert _pruners(t, jfn, v, x, "dil1").shape == (4, 32, 6)


# ------------------------------------------------------------------- SE on the residual stream


class SEResBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name="stem")(x))
    h = nn.relu(nn.Conv(12, (3, 3), name="c1")(x))
    h = nn.Conv(8, (3, 3), name="c2")(h)
    s = nn.relu(nn.Dense(4, name="se1")(h.mean((1, 2))))
    s = nn.sigmoid(nn.Dense(8, name="se2")(s))
    x = nn.relu(x + h * s[:, None, None, :])
    return nn.Dense(3, name="head")(x.mean((1, 2)))


def test_squeeze_excitation_on_the_residual_branch():
  x = _arr(4, 6, 6, 3, scale=1.0)
  fn, v = _linen(SEResBlock(), x)
  t = jaxprune.trace(fn, v, x)
  assert _sizes(t) == {"stem": 8, "c1": 12, "se1": 4}
  # The excitation's outputs scale the residual channels: se2 produces the coupled group.
  assert {s.path[-2] for s in t.groups["stem"].producers} == {"stem", "c2", "se2"}
  jfn = jax.jit(fn)
  _every_group(t, jfn, v, [x, x[:2]])
  _pruners(t, jfn, v, x, "c1", distinct=False)


# --------------------------------------------------------------- shared layers, two inputs


def _siamese(p, x):                                       # x: (batch, 2, features)
  f = lambda z: jax.nn.relu(z @ p["w1"] + p["b1"])
  return jnp.abs(f(x[:, 0]) - f(x[:, 1])) @ p["w2"] + p["b2"]


def _albert(p, x):                                        # one layer applied three times
  h = x @ p["w0"] + p["b0"]
  for _ in range(3):
    h = jnp.tanh(h @ p["w"] + p["b"])
  return h @ p["wh"] + p["bh"]


def test_siamese_encoder_and_albert_style_sharing():
  p = {k: _arr(*s) for k, s in dict(w1=(5, 12), b1=(12,), w2=(12, 2), b2=(2,)).items()}
  x = _arr(6, 2, 5, scale=1.0)
  t = jaxprune.trace(_siamese, p, x)
  assert _sizes(t) == {"w1": 12}
  jfn = jax.jit(_siamese)
  _every_group(t, jfn, p, [x, x[:3]])
  acts = _pruners(t, jfn, p, x, "w1")
  # The activations are what the readout reads: |h1 - h2|.
  h = lambda z: jax.nn.relu(z @ p["w1"] + p["b1"])
  np.testing.assert_allclose(acts, jnp.abs(h(x[:, 0]) - h(x[:, 1])), atol=1e-6)

  q = {k: _arr(*s) for k, s in dict(w0=(5, 9), b0=(9,), w=(9, 9), b=(9,), wh=(9, 2),
                                    bh=(2,)).items()}
  t = jaxprune.trace(_albert, q, x[:, 0])
  assert _sizes(t) == {"w0": 9}
  assert {(s.path[0], s.axis) for s in t.groups["w0"].slices if s.role == "consumer"} == {
      ("w", 0), ("wh", 0)}
  assert {(s.path[0], s.axis) for s in t.groups["w0"].producers} == {
      ("w0", 1), ("b0", 0), ("w", 1), ("b", 0)}
  jfn = jax.jit(_albert)
  _every_group(t, jfn, q, [x[:, 0], x[:3, 0]])
  with pytest.raises(ValueError, match=r"other kernels \(w\) act on its units after the "
                                       r"activations"):
    jaxprune.distinctiveness(t, "w0", constants=False)(
        q, jaxprune.unit_masks_ones(t), t.activations(q, x[:, 0], "w0"), 60.0, 120.0)


# ------------------------------------------------------------- maxout, mixture of experts

K = 3


def _maxout(p, x):                             # 6 units, each the max of 3 linear pieces
  return (x @ p["w1"] + p["b1"]).reshape(x.shape[0], 6, K).max(-1) @ p["w2"] + p["b2"]


def _moe(p, x):                                # 3 experts' params stacked, a softmax gate
  g = jax.nn.softmax(x @ p["wg"], -1)
  h = jax.nn.relu(jnp.einsum("bd,edh->beh", x, p["w1"]) + p["b1"])
  return jnp.einsum("be,beo->bo", g, jnp.einsum("beh,eho->beo", h, p["w2"]) + p["b2"])


def test_maxout_units_and_expert_hidden_units():
  x = _arr(8, 5, scale=1.0)
  p = {k: _arr(*s) for k, s in dict(w1=(5, 6 * K), b1=(6 * K,), w2=(6, 2), b2=(2,)).items()}
  t = jaxprune.trace(_maxout, p, x)
  assert _sizes(t) == {"w1": 6}                 # unit i owns columns K*i .. K*i + K - 1
  jfn = jax.jit(_maxout)
  _every_group(t, jfn, p, [x, x[:3]])
  # Its activations are the pieces (units last), what a merge must find equal.
  np.testing.assert_allclose(_pruners(t, jfn, p, x, "w1", distinct=False),
                             (x @ p["w1"] + p["b1"]).reshape(8, 6, K).transpose(0, 2, 1),
                             atol=1e-6)
  with pytest.raises(ValueError, match="read through a max or min"):
    jaxprune.distinctiveness(t, "w1", fold=True)

  q = {k: _arr(*s) for k, s in dict(wg=(5, 3), w1=(3, 5, 8), b1=(3, 8), w2=(3, 8, 2),
                                    b2=(3, 2)).items()}
  t = jaxprune.trace(_moe, q, x)
  # Hidden unit j of every expert is one unit; the experts' axis is mixed by the gate.
  assert _sizes(t) == {"w1": 8}
  assert {(s.path[0], s.axis) for s in t.groups["w1"].slices} == {("w1", 2), ("b1", 1),
                                                                   ("w2", 1)}
  jfn = jax.jit(_moe)
  _every_group(t, jfn, q, [x, x[:3]])
  assert _pruners(t, jfn, q, x, "w1", distinct=False).shape == (8, 3, 8)


# ------------------------------------------------------------------ channel rearrangements


class PixelShuffle(nn.Module):
  torch_order: bool = False

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(6, (3, 3), name="c1")(x))
    h = nn.Conv(16, (3, 3), name="c2")(h)                 # 4 channels x a 2x2 shuffle
    b, hh, ww, _ = h.shape
    if self.torch_order:                                  # PyTorch's (C, r, r) channel order
      h = h.reshape(b, hh, ww, 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    else:
      h = h.reshape(b, hh, ww, 2, 2, 4).transpose(0, 1, 3, 2, 4, 5)
    h = nn.relu(h.reshape(b, 2 * hh, 2 * ww, 4))
    return nn.Conv(1, (3, 3), name="out")(h)


class ChannelShuffle(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Conv(6, (1, 1), name="c1")(x))
    b, hh, ww, c = h.shape
    h = h.reshape(b, hh, ww, 2, c // 2).transpose(0, 1, 2, 4, 3).reshape(b, hh, ww, c)
    h = nn.relu(nn.Conv(5, (3, 3), name="c2")(h))
    return nn.Dense(2, name="head")(h.mean((1, 2)))


@pytest.mark.parametrize("torch_order", [False, True])
def test_pixel_shuffle_channels_own_their_sub_pixel_columns(torch_order):
  x = _arr(3, 4, 4, 2, scale=1.0)
  fn, v = _linen(PixelShuffle(torch_order), x)
  t = jaxprune.trace(fn, v, x)
  assert _sizes(t) == {"c1": 6, "c2": 4}
  jfn = jax.jit(fn)
  _every_group(t, jfn, v, [x, x[:2]])
  um = jaxprune.unit_masks_ones(t)
  um["c2"] = jnp.array([True, False, True, False])
  small = _compact_matches_masking(t, jfn, v, um, [x])
  assert small["params"]["c2"]["kernel"].shape == (3, 3, 6, 8)
  assert small["params"]["out"]["kernel"].shape == (3, 3, 2, 1)
  _pruners(t, jfn, v, x, "c2", distinct=not torch_order)


def test_channel_shuffle_splits_the_channels_into_its_two_factors():
  """A shuffle between two plain convs is a permutation, but the tracer reads its reshape
  (2, 3) as two factor groups (as it does GroupNorm's): removing a unit of 'c1' removes a
  block of 3 channels, of 'c1:3' a block of 2. Both compact exactly, alone or together."""
  x = _arr(3, 4, 4, 2, scale=1.0)
  fn, v = _linen(ChannelShuffle(), x)
  t = jaxprune.trace(fn, v, x)
  assert _sizes(t) == {"c1": 2, "c1:3": 3, "c2": 5}
  jfn = jax.jit(fn)
  _every_group(t, jfn, v, [x, x[:2]])
  um = {"c1": jnp.array([True, False]), "c1:3": jnp.array([True, False, True]),
        "c2": jnp.ones(5, bool)}
  small = _compact_matches_masking(t, jfn, v, um, [x])
  assert small["params"]["c1"]["kernel"].shape == (1, 1, 2, 2)
  assert small["params"]["c2"]["kernel"].shape == (3, 3, 2, 5)


# ---------------------------------------------------------------------------------- nnx GRU


class NnxGRU(nnx.Module):
  def __init__(self, rngs):
    self.rnn = nnx.RNN(nnx.GRUCell(3, 10, rngs=rngs), rngs=rngs)
    self.out = nnx.Linear(10, 2, rngs=rngs)

  def __call__(self, x):
    return self.out(self.rnn(x)[:, -1])


XS = jax.random.normal(jax.random.key(4), (4, 5, 3))


def test_nnx_rnn_traced_with_its_rng_state():
  """nnx.RNN draws its initial carry from its Rngs: trace the whole state."""
  model = NnxGRU(nnx.Rngs(0))
  model.eval()
  graphdef, state = nnx.split(model)
  fn = lambda s, x: nnx.merge(graphdef, s)(x)
  t = jaxprune.trace(fn, state, XS)
  assert _sizes(t) == {"rnn/cell/dense_i": 10}
  um = jaxprune.unit_masks_ones(t)
  um["rnn/cell/dense_i"] = _half_mask(10, 0)
  small = _compact_matches_masking(t, jax.jit(fn), state, um, [XS, XS[:2]])
  kept = int(um["rnn/cell/dense_i"].sum())
  assert small["rnn"]["cell"]["dense_h"]["kernel"][...].shape == (kept, 3 * kept)


def test_nnx_rnn_with_its_rngs_closed_over_gets_a_hint_that_names_them():
  model = NnxGRU(nnx.Rngs(0))
  model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  with pytest.raises(jaxprune.TraceError) as e:
    jaxprune.trace(lambda s, x: nnx.merge(graphdef, s, rest)(x), params, XS)
  hint = str(e.value).split(" -- ", 1)[1]
  assert re.search(r"rngs", hint, re.IGNORECASE)


def test_a_tile_that_repeats_the_units_keeps_them_out_of_every_group():
  """``jnp.tile`` of an axis of size > 1 puts each unit at several offsets (a concatenation
  with itself is followed; a tile is not): that layer is refused, with the reason named, while a tile of size-1 axes (above) is
  followed as a broadcast."""
  r = np.random.default_rng(0)
  p = {"w1": host_f32(r.normal(size=(3, 4))),
       "w2": host_f32(r.normal(size=(8, 2))),
       "v1": host_f32(r.normal(size=(3, 4))),
       "v2": host_f32(r.normal(size=(4, 2)))}
  x = host_f32(r.normal(size=(5, 3)))

  def fn(p, x):
    rep = jnp.tile(jnp.tanh(x @ p["w1"]), (1, 2)) @ p["w2"]            # units repeated
    one = jnp.tile(jnp.tanh(x @ p["v1"])[:, None, :], (1, 3, 1)).mean(1) @ p["v2"]
    return rep + one

  t = jaxprune.trace(fn, p, x)
  assert _sizes(t) == {"v1": 4}
  assert "repeated by tile" in t.explain()
  um = {"v1": _half_mask(4, 1)}
  _compact_matches_masking(t, jax.jit(fn), p, um, [x, x[:2]])


def test_k_max_pooling_over_time_is_followed_and_top_k_over_the_units_is_refused():
  """``lax.top_k`` ranks along its last axis: k-max pooling over time (a text CNN's) keeps each
  unit a unit (it was refused as 'not followed'); ranking across the units mixes them."""
  r = np.random.default_rng(1)
  p = {"w1": host_f32(r.normal(size=(3, 6))),
       "w2": host_f32(r.normal(size=(6, 2))),
       "v1": host_f32(r.normal(size=(3, 5))),
       "v2": host_f32(r.normal(size=(2, 2)))}
  x = host_f32(r.normal(size=(4, 7, 3)))        # (batch, time, features)

  def fn(p, x):
    h = jnp.swapaxes(jnp.tanh(x @ p["w1"]), 1, 2)               # (B, units, T)
    kmax = jax.lax.top_k(h, 3)[0].mean(-1) @ p["w2"]            # 3 largest over time, per unit
    g = jnp.tanh(x @ p["v1"]).mean(1)                           # (B, 5)
    return kmax + jax.lax.top_k(g, 2)[0] @ p["v2"]              # 2 largest units: mixed

  t = jaxprune.trace(fn, p, x)
  assert _sizes(t) == {"w1": 6}
  assert "ranked along by top_k" in t.explain()
  _compact_matches_masking(t, jax.jit(fn), p, {"w1": _half_mask(6, 2)}, [x, x[:2]])
