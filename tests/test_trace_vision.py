"""Modern vision models an outside user brings, pruned end to end through ``jaxprune.trace``:
a ConvNeXt-style block (depthwise 7x7, LayerNorm, inverted MLP, layer scale, residual), an
MLP-Mixer layer (token mixing on the transposed tensor), an nnx CNN with BatchNorm and
deterministic Dropout split with ``(nnx.Param, nnx.BatchStat)``, and a MobileNet-style inverted
residual with squeeze-and-excitation. Each model is traced once (module-level fixtures); the
groups, compaction, activations, pruners, training and FLOPs are checked against hand-written
references."""

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from conftest import assert_compacts_as_masked, host_f32, random_unit_masks

C = 8                      # ConvNeXt / MobileNet residual channels
D, HT, HC = 8, 12, 16      # Mixer: channels, token-MLP and channel-MLP hidden units
E, S = 24, 6               # MobileNet: expanded channels, SE bottleneck


class ConvNeXt(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(C, (2, 2), strides=(2, 2), name="stem")(x)
    h = nn.Conv(C, (7, 7), padding="SAME", feature_group_count=C, name="dw")(x)
    h = nn.LayerNorm(name="ln")(h)
    h = nn.Dense(C, name="pw2")(nn.gelu(nn.Dense(4 * C, name="pw1")(h)))
    gamma = self.param("gamma", nn.initializers.constant(0.5), (C,))
    x = x + gamma * h
    return nn.Dense(5, name="head")(x.mean(axis=(1, 2)))


class Mixer(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(D, (4, 4), strides=(4, 4), name="patch")(x)
    x = x.reshape(x.shape[0], -1, D)                               # (B, T, D)
    y = nn.LayerNorm(name="ln1")(x).transpose(0, 2, 1)             # (B, D, T)
    y = nn.Dense(x.shape[1], name="tok2")(nn.gelu(nn.Dense(HT, name="tok1")(y)))
    x = x + y.transpose(0, 2, 1)
    y = nn.LayerNorm(name="ln2")(x)
    x = x + nn.Dense(D, name="ch2")(nn.gelu(nn.Dense(HC, name="ch1")(y)))
    return nn.Dense(5, name="head")(nn.LayerNorm(name="ln3")(x).mean(axis=1))


class MBBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu6(nn.Conv(C, (3, 3), name="stem")(x))
    h = nn.relu6(nn.Conv(E, (1, 1), name="expand")(x))
    h = nn.relu6(nn.Conv(E, (3, 3), feature_group_count=E, name="dw")(h))
    s = nn.relu(nn.Dense(S, name="se1")(h.mean(axis=(1, 2))))
    s = nn.sigmoid(nn.Dense(E, name="se2")(s))
    x = x + nn.Conv(C, (1, 1), name="project")(h * s[:, None, None, :])
    return nn.Dense(5, name="head")(x.mean(axis=(1, 2)))


class NNXCNN(nnx.Module):
  def __init__(self, rngs):
    self.c1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.c2 = nnx.Conv(8, 12, (3, 3), padding="VALID", rngs=rngs)
    self.bn2 = nnx.BatchNorm(12, rngs=rngs)
    self.out = nnx.Linear(12, 5, rngs=rngs)

  def __call__(self, x):
    x = self.drop(nnx.relu(self.bn1(self.c1(x))))
    x = nnx.relu(self.bn2(self.c2(x)))
    return self.out(x.mean(axis=(1, 2)))


X = jax.random.normal(jax.random.key(0), (16, 16, 16, 3))
X5 = jax.random.normal(jax.random.key(5), (5, 16, 16, 3))
Y = jax.random.randint(jax.random.key(3), (16,), 0, 5)


def _linen(module):
  v = jax.jit(module.init)(jax.random.key(1), X)
  # Perturbed so that no bias, norm parameter or layer scale sits at its initial constant.
  leaves, tree = jax.tree.flatten(v)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  v = jax.tree.unflatten(tree, [a + 0.2 * jax.random.normal(k, a.shape)
                                for a, k in zip(leaves, keys)])
  return module.apply, v


def _nnx():
  model = NNXCNN(nnx.Rngs(0))
  model.eval()
  graphdef, state, rest = nnx.split(model, (nnx.Param, nnx.BatchStat), ...)
  p = nnx.to_pure_dict(state)
  rng = np.random.default_rng(1)
  for bn, n in (("bn1", 8), ("bn2", 12)):
    for leaf in ("mean", "bias"):
      p[bn][leaf] = host_f32(rng.normal(size=n))
    p[bn]["var"] = host_f32(rng.uniform(0.5, 2.0, size=n))
    p[bn]["scale"] = host_f32(rng.uniform(0.5, 1.5, size=n))

  def apply(params, x):
    s = jax.tree.map(lambda a: a, state)
    nnx.replace_by_pure_dict(s, params)
    return nnx.merge(graphdef, s, rest)(x)
  return apply, p


_CACHE = {}


def _model(name):
  """(fn, params, target) of one model, traced once per test session."""
  if name not in _CACHE:
    fn, v = {"convnext": lambda: _linen(ConvNeXt()), "mixer": lambda: _linen(Mixer()),
             "mobilenet": lambda: _linen(MBBlock()), "nnx": _nnx}[name]()
    _CACHE[name] = (jax.jit(fn), v, jaxprune.trace(fn, v, X))
  return _CACHE[name]


@pytest.fixture(scope="module")
def convnext():
  return _model("convnext")


@pytest.fixture(scope="module")
def mixer():
  return _model("mixer")


@pytest.fixture(scope="module")
def mobilenet():
  return _model("mobilenet")


@pytest.fixture(scope="module")
def nnx_cnn():
  return _model("nnx")


# ---------------------------------------------------------------- hand-written references

def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _conv(x, k, b, stride=1, pad="SAME", groups=1):
  """A direct NHWC/HWIO convolution in float64 NumPy (an independent reference)."""
  kh, kw, cin_g, cout = k.shape
  n = x.shape[0]
  if pad == "SAME":
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    x = np.pad(x, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
  oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
  out = np.zeros((n, oh, ow, cout))
  per = cout // groups
  for g in range(groups):
    xs = x[..., g * cin_g:(g + 1) * cin_g]
    for i in range(kh):
      for j in range(kw):
        patch = xs[:, i:i + stride * oh:stride, j:j + stride * ow:stride, :]
        out[..., g * per:(g + 1) * per] += patch @ k[i, j, :, g * per:(g + 1) * per]
  return out + b


def _ln(x, q, eps=1e-6):
  m = x.mean(-1, keepdims=True)
  return (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + eps) * q["scale"] + q["bias"]


def _gelu(z):   # Flax's default (tanh) approximation
  return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))


def _hand_activations(name, v, x):
  x = np.asarray(x, np.float64)
  if name == "nnx":
    p = _np(v)
    bn = lambda h, q: (h - q["mean"]) / np.sqrt(q["var"] + 1e-5) * q["scale"] + q["bias"]
    c1 = np.maximum(bn(_conv(x, p["c1"]["kernel"], p["c1"]["bias"]), p["bn1"]), 0)
    c2 = np.maximum(bn(_conv(c1, p["c2"]["kernel"], p["c2"]["bias"], pad="VALID"), p["bn2"]), 0)
    return {"c1": c1, "c2": c2}
  p = _np(v["params"])
  if name == "convnext":
    s = _conv(x, p["stem"]["kernel"], p["stem"]["bias"], 2, "VALID")
    h = _ln(_conv(s, p["dw"]["kernel"], p["dw"]["bias"], groups=C), p["ln"])
    return {"pw1": _gelu(h @ p["pw1"]["kernel"] + p["pw1"]["bias"])}
  if name == "mixer":
    t = _conv(x, p["patch"]["kernel"], p["patch"]["bias"], 4, "VALID").reshape(len(x), -1, D)
    tok1 = _gelu(_ln(t, p["ln1"]).transpose(0, 2, 1) @ p["tok1"]["kernel"] + p["tok1"]["bias"])
    t = t + (tok1 @ p["tok2"]["kernel"] + p["tok2"]["bias"]).transpose(0, 2, 1)
    return {"tok1": tok1, "ch1": _gelu(_ln(t, p["ln2"]) @ p["ch1"]["kernel"] + p["ch1"]["bias"])}
  relu6 = lambda z: np.clip(z, 0, 6)
  stem = relu6(_conv(x, p["stem"]["kernel"], p["stem"]["bias"]))
  expand = relu6(_conv(stem, p["expand"]["kernel"], p["expand"]["bias"]))
  dw = relu6(_conv(expand, p["dw"]["kernel"], p["dw"]["bias"], groups=E))
  se1 = np.maximum(dw.mean((1, 2)) @ p["se1"]["kernel"] + p["se1"]["bias"], 0)
  return {"stem": stem, "expand": expand, "se1": se1}


_GROUPS = {
    "convnext": {"pw1": 4 * C},
    "mixer": {"tok1": HT, "ch1": HC},
    "nnx": {"c1": 8, "c2": 12},
    "mobilenet": {"stem": C, "expand": E, "se1": S},
}
_CASES = [(m, g) for m, groups in _GROUPS.items() for g in groups]
# Groups whose activations are what their consumers read (not coupled by a residual addition or
# passed through a second per-channel kernel such as a depthwise conv or an SE gate).
_COMPLETE = {"pw1", "tok1", "ch1", "c1", "c2", "se1"}


def _explain(target):
  return dict(line.split(" ", 1) for line in target.explain().splitlines())


def _slices(target, name):
  return {("/".join(s.path), s.axis, s.role, s.kind) for s in target.groups[name].slices}


# ------------------------------------------------------------------------------- the groups

def test_convnext_finds_the_inverted_mlp_and_the_normalised_residual_stream(convnext):
  fn, v, t = convnext
  assert {k: g.size for k, g in t.groups.items()} == {**_GROUPS["convnext"], "stem": C}
  assert _slices(t, "pw1") == {("params/pw1/kernel", 1, "producer", "kernel"),
                               ("params/pw1/bias", 0, "producer", "bias"),
                               ("params/pw2/kernel", 0, "consumer", "kernel")}
  assert t.groups["pw1"].activation == "other" and t.activations_complete("pw1")
  # The stem, depthwise conv, LayerNorm, layer scale and pw2 share the residual channels; the
  # LayerNorm's sums (E[h], E[h^2]) read them, and a masked channel adds zero to both.
  assert t.groups["stem"].read_by_products
  assert {(path, role) for path, _, role, _ in _slices(t, "stem")} == {
      (f"params/{n}", "producer") for n in (
          "stem/kernel", "stem/bias", "dw/kernel", "dw/bias", "ln/scale", "ln/bias", "gamma",
          "pw2/kernel", "pw2/bias")} | {("params/pw1/kernel", "consumer"),
                                       ("params/head/kernel", "consumer")}
  for seed in range(2):
    assert_compacts_as_masked(t, v, fn, random_unit_masks(t, seed), (X, X5), atol=1e-5)


def test_mixer_finds_the_token_and_channel_mlp_hidden_units(mixer):
  _, _, t = mixer
  assert {k: g.size for k, g in t.groups.items()} == _GROUPS["mixer"]
  assert _slices(t, "tok1") == {("params/tok1/kernel", 1, "producer", "kernel"),
                                ("params/tok1/bias", 0, "producer", "bias"),
                                ("params/tok2/kernel", 0, "consumer", "kernel")}
  assert _slices(t, "ch1") == {("params/ch1/kernel", 1, "producer", "kernel"),
                               ("params/ch1/bias", 0, "producer", "bias"),
                               ("params/ch2/kernel", 0, "consumer", "kernel")}
  ex = _explain(t)
  # Tokens come from the input image: the token axis is not prunable.
  assert "not prunable" in ex["params/tok2/bias"]
  assert "not prunable" in ex["params/patch/bias"]


def test_nnx_cnn_groups_own_their_batch_norm_parameters_and_statistics(nnx_cnn):
  _, _, t = nnx_cnn
  assert {k: g.size for k, g in t.groups.items()} == _GROUPS["nnx"]
  for conv, bn, nxt, nxt_axis in (("c1", "bn1", "c2/kernel", 2), ("c2", "bn2", "out/kernel", 0)):
    assert _slices(t, conv) == {
        (f"{conv}/kernel", 3, "producer", "kernel"), (f"{conv}/bias", 0, "producer", "bias"),
        (f"{bn}/scale", 0, "producer", "scale"), (f"{bn}/bias", 0, "producer", "shift"),
        (f"{bn}/mean", 0, "producer", "stat"), (f"{bn}/var", 0, "producer", "stat"),
        (nxt, nxt_axis, "consumer", "kernel")}
    assert t.groups[conv].activation == "relu" and t.activations_complete(conv)


def test_mobilenet_expand_channels_run_through_the_depthwise_conv_and_the_se_gate(mobilenet):
  _, _, t = mobilenet
  assert {k: g.size for k, g in t.groups.items()} == _GROUPS["mobilenet"]
  assert _slices(t, "expand") == {
      ("params/expand/kernel", 3, "producer", "kernel"),
      ("params/expand/bias", 0, "producer", "bias"),
      ("params/dw/kernel", 3, "producer", "kernel"), ("params/dw/bias", 0, "producer", "bias"),
      ("params/se2/kernel", 1, "producer", "kernel"), ("params/se2/bias", 0, "producer", "bias"),
      ("params/se1/kernel", 0, "consumer", "kernel"),
      ("params/project/kernel", 2, "consumer", "kernel")}
  assert _slices(t, "se1") == {("params/se1/kernel", 1, "producer", "kernel"),
                               ("params/se1/bias", 0, "producer", "bias"),
                               ("params/se2/kernel", 0, "consumer", "kernel")}
  # The stem's channels are coupled with the projection by the residual addition.
  assert ("params/project/kernel", 3, "producer", "kernel") in _slices(t, "stem")
  assert ("params/head/kernel", 0, "consumer", "kernel") in _slices(t, "stem")
  assert t.groups["se1"].activation == "relu" and t.activations_complete("se1")
  assert not t.activations_complete("stem") and not t.activations_complete("expand")


# --------------------------------------------------------------------- compact == masked

@pytest.mark.parametrize("model,group", _CASES + [(m, None) for m in _GROUPS])
def test_compact_equals_the_masked_model_at_two_batch_sizes(model, group):
  fn, v, t = _model(model)
  rng = np.random.default_rng(hash((model, group)) % 2 ** 32)
  um = jaxprune.unit_masks_ones(t)
  for name in ([group] if group else list(t.groups)):     # None: every group at once
    keep = rng.random(t.groups[name].size) < 0.6
    keep[rng.integers(len(keep))] = True
    um[name] = jnp.asarray(keep)
  masked = jaxprune.apply_masks(v, jaxprune.expand(v, t, um))
  small, small_t = t.compact(masked, um)
  for name in t.groups:
    assert small_t.groups[name].size == int(np.sum(um[name]))
  for x in (X, X5):
    np.testing.assert_allclose(small_t.apply(small, x), fn(masked, x), atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------------------ activations

@pytest.mark.parametrize("model,group", _CASES)
def test_activations_equal_a_hand_recomputation(model, group):
  _, v, t = _model(model)
  want = _hand_activations(model, v, X5)[group]
  got = np.asarray(t.activations(v, X5, group))
  assert got.shape[-1] == t.groups[group].size
  np.testing.assert_allclose(got.reshape(want.shape), want, atol=2e-5, rtol=1e-4)


def test_mixer_channel_mlp_activations_keep_the_token_axis(mixer):
  _, v, t = mixer
  assert t.activations(v, X5, "ch1").shape == (5, 16, HC)


# ------------------------------------------------------------------------------- pruners

def _duplicate(v, group, i, j):
  """Params where unit j's producer slices are copies of unit i's: an exact duplicate."""
  prod = {tuple(s.path): s.axis for s in group.slices if s.role == "producer"}

  def f(path, a):
    key = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path)
    if key not in prod:
      return a
    ax = prod[key]
    idx = [slice(None)] * a.ndim
    idx[ax] = j
    return a.at[tuple(idx)].set(jnp.take(a, i, axis=ax))
  return jax.tree_util.tree_map_with_path(f, v)


@pytest.mark.parametrize("model,group", _CASES)
def test_distinctiveness_merges_an_exact_duplicate_or_refuses(model, group):
  fn, v, t = _model(model)
  # Unit 3 copied into unit 1 (se1's units 0-2 are dead ReLUs on these inputs: all-zero
  # activations have no angle, so copy a live unit).
  vd = _duplicate(v, t.groups[group], 3, 1)
  um = jaxprune.unit_masks_ones(t)
  acts = t.activations(vd, X, group)
  assert np.ptp(np.asarray(acts[..., 3])) > 0
  np.testing.assert_array_equal(acts[..., 1], acts[..., 3])
  if group not in _COMPLETE:
    with pytest.raises(ValueError, match="consumers read other values than the activations"):
      jaxprune.distinctiveness(t, group, constants=False)
    return
  p2, um2, rep = jaxprune.distinctiveness(t, group, constants=False)(vd, um, acts, 1.0, 179.0)
  assert np.flatnonzero(~np.asarray(um2[group])).tolist() == [3]
  assert jaxprune.pruners.report_actions(rep)[0]["kept"] == (1,)
  np.testing.assert_allclose(fn(p2, X), fn(vd, X), atol=2e-5, rtol=1e-5)
  # And the pruned network compacts to the same function.
  small, small_t = t.compact(p2, um2)
  np.testing.assert_allclose(small_t.apply(small, X5), fn(vd, X5), atol=2e-5, rtol=1e-5)


def test_refusal_for_an_expand_conv_names_the_depthwise_conv(mobilenet):
  _, _, t = mobilenet
  with pytest.raises(ValueError) as e:
    jaxprune.distinctiveness(t, "expand", constants=False)
  assert "depthwise" in str(e.value) and "params/dw/kernel" in str(e.value)


@pytest.mark.parametrize("model,group,unit", [("convnext", "pw1", 5), ("mixer", "tok1", 2),
                                              ("mobilenet", "se1", 2)])
def test_a_constant_unit_folds_into_the_next_bias_exactly(model, group, unit):
  """A unit whose incoming weights are zero outputs act(bias) everywhere; removing it and
  folding that constant into the consumer's bias leaves the outputs unchanged."""
  fn, v, t = _model(model)
  p = jax.tree.map(lambda a: a, v)
  p["params"][group]["kernel"] = p["params"][group]["kernel"].at[:, unit].set(0.0)
  p["params"][group]["bias"] = p["params"][group]["bias"].at[unit].set(0.7)
  um = jaxprune.unit_masks_ones(t)
  acts = t.activations(p, X, group)
  p2, um2, _ = jaxprune.distinctiveness(t, group, similar=False, complementary=False)(
      p, um, acts, 1.0, 179.0)
  assert not bool(um2[group][unit])
  np.testing.assert_allclose(fn(p2, X), fn(p, X), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("model,group", _CASES)
def test_weight_distinctiveness_merges_an_exact_duplicate(model, group):
  fn, v, t = _model(model)
  vd = _duplicate(v, t.groups[group], 1, 3)
  um = jaxprune.unit_masks_ones(t)
  p2, um2, _ = jaxprune.weight_distinctiveness(t, group, source="incoming", constants=False)(
      vd, um, 1.0, 179.0)
  assert np.flatnonzero(~np.asarray(um2[group])).tolist() == [3]
  np.testing.assert_allclose(fn(p2, X5), fn(vd, X5), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("model,group,why", [
    ("convnext", "pw1", "it is 'other'"), ("mixer", "ch1", "it is 'other'"),
    ("nnx", "c1", "a normalisation"), ("mobilenet", "expand", "cannot fold removed units")])
def test_weight_constants_are_refused_with_the_reason(model, group, why):
  _, _, t = _model(model)
  with pytest.raises(ValueError, match="constants=False") as e:
    jaxprune.weight_distinctiveness(t, group, source="incoming")
  assert why in str(e.value)


@pytest.mark.parametrize("model,group", [("convnext", "pw1"), ("mixer", "tok1"),
                                         ("nnx", "c2"), ("mobilenet", "se1")])
def test_importance_prune_removes_the_lowest_rms_incoming_kernels(model, group):
  fn, v, t = _model(model)
  prod = [s for s in t.groups[group].slices if s.role == "producer" and s.kind == "kernel"]
  assert len(prod) == 1
  leaf = v
  for k in prod[0].path:
    leaf = leaf[k]
  n = leaf.shape[prod[0].axis]
  w = np.moveaxis(np.asarray(leaf, np.float64), prod[0].axis, -1).reshape(-1, n)
  rms = np.sqrt((w ** 2).mean(0))
  um = jaxprune.unit_masks_ones(t)
  p2, um2, rep = jaxprune.importance_prune(t, group)(v, um, 2)
  np.testing.assert_allclose(rep.scores, rms, rtol=1e-5)
  removed = set(np.flatnonzero(~np.asarray(um2[group])).tolist())
  assert removed == set(np.argsort(rms)[:2].tolist())
  masked = jaxprune.apply_masks(v, jaxprune.expand(v, t, um2))
  np.testing.assert_allclose(fn(p2, X5), fn(masked, X5), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("model", list(_GROUPS))
def test_magnitude_prune_removes_the_smallest_kernel_weights(model):
  _, v, _ = _model(model)
  p2, wm, rep = jaxprune.magnitude_prune(v, None, 0.25)
  kernels = [a for a in jax.tree.leaves(v) if a.ndim >= 2]
  for a, r in zip(kernels, np.asarray(rep.removed)):
    assert r == int(np.round(0.25 * a.size))
  for a, b, m in zip(jax.tree.leaves(v), jax.tree.leaves(p2), jax.tree.leaves(wm)):
    a, b, m = np.asarray(a), np.asarray(b), np.asarray(m)
    if a.ndim < 2:
      assert m.all() and np.array_equal(a, b)
      continue
    assert np.abs(a[~m]).max() <= np.abs(a[m]).min()
    assert np.array_equal(b, np.where(m, a, 0))


# ------------------------------------------------------------------------- training, FLOPs

def test_fit_keeps_removed_units_at_zero(mobilenet):
  _, v, t = mobilenet
  um = jaxprune.unit_masks_ones(t)
  um["expand"] = um["expand"].at[jnp.array([0, 5, 7])].set(False)
  um["se1"] = um["se1"].at[2].set(False)
  wm = jaxprune.expand(v, t, um)
  p2, hist = jaxprune.fit(t, v, X, Y, key=jax.random.key(0), epochs=2, masks=wm,
                          batch_size=8, progress=False)
  assert np.isfinite(hist["loss"]).all()
  for a, b, m in zip(jax.tree.leaves(v), jax.tree.leaves(p2), jax.tree.leaves(wm)):
    m = np.asarray(m)
    assert (np.asarray(b)[~m] == 0).all()
    if m.any() and np.asarray(a).ndim >= 2:
      assert not np.array_equal(np.asarray(a)[m], np.asarray(b)[m])   # the rest trains


def test_fit_refuses_batch_statistics_as_weights_and_keeps_them_apart():
  """fit trains every leaf it is given: an nnx state with BatchStat variables among them had its
  running statistics moved by Adam (bn1.var 0.9 -> 2.3). It is refused, naming them; split
  apart as 'batch_stats' (the documented form), they stay as they were while the rest trains."""
  model = NNXCNN(nnx.Rngs(0))
  model.eval()
  graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  both = nnx.split(model, (nnx.Param, nnx.BatchStat), ...)[1]
  t_both = jaxprune.trace(lambda s, x: nnx.merge(graphdef, s, rest)(x), both, X)
  # the split the message shows is the one below, which also takes the Dropout's RNG state
  # (two filters alone refuse it as a non-empty remainder)
  with pytest.raises(ValueError, match=r"nnx variables that are not nnx.Param: bn1/mean "
                     r"\(BatchStat\).*'batch_stats'.*nnx.split\(model, nnx.Param, "
                     r"nnx.BatchStat, \.\.\.\).*v\['batch_stats'\], rest\)"):
    jaxprune.fit(t_both, both, X, Y, key=jax.random.key(0), epochs=1, progress=False)
  v = {"params": params, "batch_stats": stats}
  t = jaxprune.trace(lambda v, x: nnx.merge(graphdef, v["params"], v["batch_stats"], rest)(x),
                     v, X)
  assert {"c1", "c2"} <= set(t.groups)        # the groups run through the statistics
  v2, hist = jaxprune.fit(t, v, X, Y, key=jax.random.key(0), epochs=2, batch_size=8,
                          progress=False)
  for a, b in zip(jax.tree.leaves(v2["batch_stats"]), jax.tree.leaves(stats)):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(v2["params"]["c1"]["kernel"], params["c1"]["kernel"])
  assert hist["loss"][-1] < hist["loss"][0]


def test_flops_of_a_convnext_block_dense_and_compacted_match_a_hand_count(convnext):
  _, v, t = convnext
  um = jaxprune.unit_masks_ones(t)
  um["pw1"] = jnp.asarray(np.arange(4 * C) % 3 == 0)
  k = int(np.sum(um["pw1"]))
  rep = jaxprune.flops_report(t, v, X[:1], unit_masks=um)
  rows = {r["name"]: r for r in rep["layers"]}
  pos = 8 * 8                                        # the 16x16 input after the 2x2/2 stem
  hand = {"params/stem/kernel": (2 * pos * C * 2 * 2 * 3,) * 2,
          "params/dw/kernel": (2 * pos * C * 7 * 7,) * 2,        # padding taps included
          "params/pw1/kernel": (2 * pos * 4 * C * C, 2 * pos * k * C),
          "params/pw2/kernel": (2 * pos * C * 4 * C, 2 * pos * C * k),
          "params/head/kernel": (2 * 5 * C,) * 2}
  for name, (dense, compact) in hand.items():
    assert (rows[name]["flops"], rows[name]["compact_flops"], rows[name]["masked_flops"]) == \
        (dense, compact, compact), name
  assert rep["total"]["flops"] == sum(d for d, _ in hand.values())
  assert rep["total"]["compact_flops"] == sum(c for _, c in hand.values())
  n_params = sum(int(np.size(a)) for a in jax.tree.leaves(v))
  assert rep["total"]["params"] == n_params
  assert rep["total"]["compact_params"] == n_params - (4 * C - k) * (C + 1 + C)


def test_an_nnx_model_in_training_mode_gets_a_hint_to_call_eval():
  model = NNXCNN(nnx.Rngs(0))                     # model.eval() forgotten
  graphdef, state, rest = nnx.split(model, (nnx.Param, nnx.BatchStat), ...)

  def apply(params, x):
    return nnx.merge(graphdef, params, rest)(x)
  with pytest.raises(jaxprune.TraceError) as e:
    jaxprune.trace(apply, state, X)
  assert "eval()" in str(e.value)


class ConvNeXtBN(nn.Module):
  """Two ConvNeXt blocks with BatchNorm instead of LayerNorm: nothing reduces over the residual
  channels, so the stem, both depthwise convs, norms, layer scales and pw2 outputs are one
  coupled group, read by both pw1s and the head."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(C, (2, 2), strides=(2, 2), name="stem")(x)
    for i in range(2):
      h = nn.Conv(C, (7, 7), padding="SAME", feature_group_count=C, name=f"dw{i}")(x)
      h = nn.BatchNorm(use_running_average=True, name=f"bn{i}")(h)
      h = nn.Dense(C, name=f"pw2_{i}")(nn.gelu(nn.Dense(4 * C, name=f"pw1_{i}")(h)))
      x = x + self.param(f"gamma{i}", nn.initializers.constant(0.5), (C,)) * h
    return nn.Dense(5, name="head")(x.mean(axis=(1, 2)))


def test_batch_norm_convnext_couples_the_residual_channels_through_depthwise_convs():
  fn, v = _linen(ConvNeXtBN())
  v["batch_stats"] = jax.tree.map(lambda a: jnp.abs(a) + 0.5, v["batch_stats"])
  t = jaxprune.trace(fn, v, X)
  assert {k: g.size for k, g in t.groups.items()} == {"stem": C, "pw1_0": 4 * C, "pw1_1": 4 * C}
  stem = _slices(t, "stem")
  for i in range(2):
    assert {(f"params/dw{i}/kernel", 3, "producer", "kernel"),
            (f"params/gamma{i}", 0, "producer", "scale"),
            (f"batch_stats/bn{i}/var", 0, "producer", "stat"),
            (f"params/pw2_{i}/kernel", 1, "producer", "kernel"),
            (f"params/pw1_{i}/kernel", 0, "consumer", "kernel")} <= stem
  assert not t.activations_complete("stem")
  rng = np.random.default_rng(3)
  um = {k: jnp.asarray(np.r_[True, rng.random(g.size - 1) < 0.5]) for k, g in t.groups.items()}
  masked = jaxprune.apply_masks(v, jaxprune.expand(v, t, um))
  small, small_t = t.compact(masked, um)
  assert small["params"]["dw1"]["kernel"].shape == (7, 7, 1, int(um["stem"].sum()))
  np.testing.assert_allclose(small_t.apply(small, X5), fn(masked, X5), atol=2e-5, rtol=1e-5)


def test_a_convolution_s_output_positions_are_no_group():
  """A param with a value per output position of a conv or a pooling (a position embedding
  added before the flatten, ConvLocal's per-position kernel): the positions made groups of
  their own ('params' and 'params:1', 'local:0' and 'local:1'), whose compaction failed (the
  patches, computed from the input, keep every position). Their number follows the input's
  size, so they are blocked: only the channels are groups, and they compact exactly."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Conv(4, (3, 3), padding="VALID", name="conv")(x)
      h = nn.relu(h + self.param("pos", nn.initializers.normal(1.0), h.shape[1:]))
      h = nn.avg_pool(h, (2, 2), (2, 2))
      h = h + self.param("pooled_pos", nn.initializers.normal(1.0), h.shape[1:])
      g = nn.tanh(nn.ConvLocal(5, (3, 3), strides=(3, 3), padding="VALID", name="local")(x))
      flat = lambda a: a.reshape(a.shape[0], -1)
      return nn.Dense(3, name="head")(flat(h)) + nn.Dense(3, name="head2")(flat(g))

  x = jax.random.normal(jax.random.key(1), (4, 10, 10, 3))
  m = Net()
  v = m.init(jax.random.key(0), x)
  t = jaxprune.trace(m.apply, v, x)
  assert {n: g.size for n, g in t.groups.items()} == {"conv": 4, "local": 5}
  assert "output positions" in [l for l in t.explain().splitlines() if "params/pos " in l][0]
  um = {"conv": jnp.asarray([True, False, True, False]),
        "local": jnp.asarray([False, True, True, False, True])}
  masked = jaxprune.apply_masks(v, jaxprune.expand(v, t, um))
  small, small_t = t.compact(masked, um)
  assert small["params"]["pos"].shape == (8, 8, 2)
  assert small["params"]["local"]["kernel"].shape == (3, 3, 27, 3)
  for xx in (x, jax.random.normal(jax.random.key(2), (6, 10, 10, 3))):
    np.testing.assert_allclose(small_t.apply(small, xx), m.apply(masked, xx), atol=1e-5)


def test_a_top_level_param_s_group_is_named_after_it():
  """A linen module's own param (self.param('mix', ...), at params/mix) named its group
  'params', the collection; it is named 'mix'."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = jnp.tanh(x @ self.param("mix", nn.initializers.normal(1.0), (3, 4)))
      return nn.Dense(2, name="head")(h)

  x = jnp.ones((5, 3))
  m = Net()
  t = jaxprune.trace(m.apply, m.init(jax.random.key(0), x), x)
  assert list(t.groups) == ["mix"]


def test_a_channel_multiplier_and_conv_local_patches_keep_the_channels_before_them():
  """A conv with one input channel per group and M outputs each (a depthwise conv with a
  channel multiplier, and the identity kernel with which nn.ConvLocal cuts its patches): output
  c * M + m reads input c alone, so the channels before it are a group whose units own M
  outputs each. Both were refused as "a grouped convolution". Compacting equals masking; a
  repeated channel merges exactly before ConvLocal (its patches kernel is a constant), while
  the multiplier's kernel, one per channel, still refuses merging, as a depthwise conv's does."""
  class Net(nn.Module):
    multiplier: bool = True

    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Conv(4, (3, 3), padding="VALID", name="c1")(x))
      b = nn.ConvLocal(3, (3, 3), padding="VALID", name="local")(h)
      out = nn.Dense(2, name="head2")(nn.tanh(b).mean((1, 2)))
      if self.multiplier:
        a = nn.Conv(8, (3, 3), feature_group_count=4, name="mult")(h)      # M = 2
        out = out + nn.Dense(2, name="head")(nn.tanh(a).mean((1, 2)))
      return out

  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  for multiplier in (True, False):
    m = Net(multiplier)
    v = m.init(jax.random.key(0), x)
    c1 = dict(v["params"]["c1"])                         # channel 3 repeats channel 1
    c1["kernel"] = c1["kernel"].at[..., 3].set(c1["kernel"][..., 1])
    c1["bias"] = c1["bias"].at[3].set(c1["bias"][1])
    v = {"params": {**v["params"], "c1": c1}}
    t = jaxprune.trace(m.apply, v, x)
    # mult's outputs are c1's units, M = 2 each (its multiplier index is not a unit)
    assert {n: g.size for n, g in t.groups.items()} == {"c1": 4, "local": 3}
    um = {"c1": jnp.asarray([True, False, True, True]),
          "local": jnp.asarray([True, False, True])}
    masked = jaxprune.apply_masks(v, jaxprune.expand(v, t, um))
    small, small_t = t.compact(masked, um)
    assert small["params"]["local"]["kernel"].shape == (4, 4, 27, 2)
    if multiplier:
      assert small["params"]["mult"]["kernel"].shape == (3, 3, 1, 6)
      for xx in (x, jax.random.normal(jax.random.key(2), (6, 8, 8, 3))):
        np.testing.assert_allclose(small_t.apply(small, xx), m.apply(masked, xx), atol=1e-5)
      with pytest.raises(ValueError, match="a depthwise or grouped convolution"):
        jaxprune.distinctiveness(t, "c1", constants=False)
      continue
    acts = t.activations(v, x, "c1")
    p2, um2, _ = jaxprune.distinctiveness(t, "c1", complementary=False, constants=False)(
        v, jaxprune.unit_masks_ones(t), acts, 1.0, 179.0)
    assert np.asarray(um2["c1"]).tolist() == [True, True, True, False]
    np.testing.assert_allclose(m.apply(p2, x), m.apply(v, x), atol=1e-5)
    small, small_t = t.compact(p2, um2)
    np.testing.assert_allclose(small_t.apply(small, x), m.apply(v, x), atol=1e-5)


def test_weight_distinctiveness_reads_a_weight_normed_depthwise_kernel_after_the_units():
  """Conv c1 then a weight-normed depthwise conv (a kernel computed from params, recorded as a
  'scale' of c1's units). Channel 3 of c1 repeats channel 1: while the depthwise kernels of
  the two differ, incoming weight distinctiveness must not merge them (it did, moving the
  outputs by 0.27); once they are equal too, the merge is exact."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Conv(4, (3, 3), padding="VALID", name="c1")(x))
      h = nn.WeightNorm(nn.Conv(4, (3, 3), feature_group_count=4, name="dw"))(h)
      return nn.Dense(2, name="head")(nn.relu(h).mean((1, 2)))

  x = jax.random.normal(jax.random.key(1), (4, 9, 9, 3))
  m = Net()
  v = m.init(jax.random.key(0), x)
  c1 = dict(v["params"]["c1"])
  c1["kernel"] = c1["kernel"].at[..., 3].set(c1["kernel"][..., 1])
  c1["bias"] = c1["bias"].at[3].set(c1["bias"][1])
  v = {"params": {**v["params"], "c1": c1}}
  t = jaxprune.trace(m.apply, v, x)
  prune = jaxprune.weight_distinctiveness(t, "c1", constants=False, complementary=False)
  _, um, _ = prune(v, jaxprune.unit_masks_ones(t), 1.0, 179.0)
  assert np.asarray(um["c1"]).tolist() == [True] * 4
  dw = dict(v["params"]["dw"])                 # (WeightNorm's scales start equal: ones)
  dw["kernel"] = dw["kernel"].at[..., 3].set(dw["kernel"][..., 1])
  dw["bias"] = dw["bias"].at[3].set(dw["bias"][1])
  same = {"params": {**v["params"], "dw": dw}}
  p2, um, _ = prune(same, jaxprune.unit_masks_ones(t), 1.0, 179.0)
  assert np.asarray(um["c1"]).tolist() == [True, True, True, False]
  np.testing.assert_allclose(m.apply(p2, x), m.apply(same, x), atol=1e-5)
