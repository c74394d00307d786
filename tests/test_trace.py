"""jaxprune.trace: unit groups traced from any JAX function, checked declarations, one
model-free path (pruners, GA, training) over traced targets."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune
from jaxprune import ga
from jaxprune import units
from conftest import (assert_compacts_as_masked, host_f32, linen_batch_norm_mlp, nnx_as_function,
                      nnx_sigmoid_mlp, random_unit_masks)

RNG = np.random.default_rng(0)


def _randn(*shape, scale=1.0):
  return host_f32(scale * RNG.standard_normal(shape))


def _perturb(tree, scale=0.1):
  """Non-trivial values everywhere (batch-norm statistics and zero biases included). In NumPy
  float32 (the same values as jnp's): eager jnp ops would compile a program per leaf shape."""
  def one(path, a):
    a = np.asarray(a) + np.asarray(_randn(*a.shape, scale=scale))
    return jax.device_put(np.abs(a) + np.float32(0.5) if "var" in jax.tree_util.keystr(path)
                          else a)
  return jax.tree_util.tree_map_with_path(one, tree)


# ----------------------------------------------------------------------------- the zoo


class _LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.sigmoid(nn.Dense(7)(x))
    x = nn.tanh(nn.Dense(6)(x))
    return nn.Dense(3)(x)  # noqa


class _LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(6, (3, 3), padding="SAME")(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(5, (3, 3), padding="VALID")(x))
    x = nn.avg_pool(x, (2, 2), (1, 1))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(8)(x))
    return nn.Dense(3)(x)


class _Residual(nn.Module):
  """Stem conv + BN, a depthwise-separable branch with BN added back (residual), head."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(8, (3, 3), padding="SAME")(x)))
    h = nn.Conv(8, (3, 3), feature_group_count=8, padding="SAME")(x)     # depthwise
    h = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Conv(6, (1, 1))(nn.relu(h))))
    h = nn.Conv(8, (3, 3), padding="SAME", use_bias=False)(h)
    x = nn.relu(x + nn.BatchNorm(use_running_average=True)(h))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(3)(x)


class _NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 8, rngs=rngs)
    self.l2 = nnx.Linear(8, 6, rngs=rngs)
    self.l3 = nnx.Linear(6, 3, rngs=rngs)

  def __call__(self, x):
    return self.l3(nnx.relu(self.l2(jax.nn.tanh(self.l1(x)))))


def _nnx_case():
  apply, params = nnx_as_function(_NnxMLP(nnx.Rngs(0)))
  return apply, _perturb(params), _randn(5, 4), {"l1": 8, "l2": 6}


def _einsum_fn(p, x):
  h = jax.nn.sigmoid(jnp.einsum("bi,ih->bh", x, p["w1"]) + p["b1"])
  h2 = jax.nn.relu(jnp.einsum("bh,hk->bk", h, p["w2"]))
  return jnp.einsum("bk,ko->bo", h2, p["w3"]) + p["b3"]


def _einsum_case():
  params = {"w1": _randn(4, 7), "b1": _randn(7), "w2": _randn(7, 5), "w3": _randn(5, 2),
            "b3": _randn(2)}
  return _einsum_fn, params, _randn(5, 4), {"w1": 7, "w2": 5}


class _Concat(nn.Module):
  """Two branches concatenated along channels, and two dense layers concatenated before the head."""

  @nn.compact
  def __call__(self, x):
    a = nn.relu(nn.Conv(4, (3, 3), padding="SAME")(x))
    b = nn.tanh(nn.Conv(5, (1, 1))(x))
    h = nn.relu(nn.Conv(6, (3, 3), padding="VALID")(jnp.concatenate([a, b], axis=-1)))
    h = h.reshape(h.shape[0], -1)
    c = nn.sigmoid(nn.Dense(7)(h))
    d = nn.relu(nn.Dense(3)(h))
    return nn.Dense(2)(jnp.concatenate([c, d], axis=1))


def _linen_case(module, shape, sizes):
  x = _randn(*shape)
  return module.apply, _perturb(module.init(jax.random.key(0), x)), x, sizes


ZOO = {
    "linen_mlp": lambda: _linen_case(_LinenMLP(), (5, 4), {"Dense_0": 7, "Dense_1": 6}),
    "linen_cnn": lambda: _linen_case(_LinenCNN(), (5, 10, 10, 2),
                                     {"Conv_0": 6, "Conv_1": 5, "Dense_0": 8}),
    "residual_bn_depthwise": lambda: _linen_case(_Residual(), (5, 8, 8, 2),
                                                 {"Conv_0": 8, "Conv_2": 6}),
    "concatenate": lambda: _linen_case(_Concat(), (5, 6, 6, 2), {
        "Conv_0": 4, "Conv_1": 5, "Conv_2": 6, "Dense_0": 7, "Dense_1": 3}),
    "nnx_mlp": _nnx_case,
    "plain_einsum": _einsum_case,
}


@pytest.fixture(scope="module", params=sorted(ZOO))
def case(request):
  fn, params, x, sizes = ZOO[request.param]()
  return request.param, fn, params, x, sizes, jaxprune.trace(fn, params, x)


def test_groups_found(case):
  _, _, _, _, sizes, target = case
  assert {n: g.size for n, g in target.groups.items()} == sizes


def test_compact_equals_masking_for_random_masks(case):
  """Property: compacting equals masking (expand + apply_masks) on random unit masks."""
  _, fn, params, x, _, target = case
  for seed in range(3):
    rng = np.random.default_rng(seed)
    um = {n: jnp.asarray(rng.random(g.size) < 0.5).at[seed % g.size].set(True)
          for n, g in target.groups.items()}
    masked = jaxprune.apply_masks(params, jaxprune.expand(params, target, um))
    want = fn(masked, x)
    small, small_target = target.compact(params, um)
    np.testing.assert_allclose(small_target.apply(small, x), want, atol=2e-5, rtol=1e-5)
    # Any batch size, and the small target's groups describe the small params.
    np.testing.assert_allclose(small_target.apply(small, x[:3]), want[:3], atol=2e-5, rtol=1e-5)
    assert {n: g.size for n, g in small_target.groups.items()} == {
        n: int(m.sum()) for n, m in um.items()}
    jaxprune.check_groups(small, small_target.groups)
    # uncompact puts the small params back where the masked ones are.
    back = units.uncompact(small, params, target.groups, um)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(masked)):
      np.testing.assert_array_equal(a, b)


def test_activations_have_units_last(case):
  _, _, params, x, _, target = case
  for name, g in target.groups.items():
    a = target.activations(params, x, name)
    assert a.shape[0] == x.shape[0] and a.shape[-1] == g.size


def test_explain_lists_every_leaf(case):
  _, _, params, _, _, target = case
  text = target.explain()
  assert len(text.splitlines()) == len(jax.tree.leaves(params))
  assert "reaches the function's outputs" in text


def test_linen_cnn_details():
  fn, params, x, _ = ZOO["linen_cnn"]()
  t = jaxprune.trace(fn, params, x)
  g = t.groups["Conv_1"]
  (consumer,) = g.consumers
  # flatten of (N, 2, 2, 5): channel c owns rows c, c + 5, ... of Dense_0's kernel
  assert consumer.path == ("params", "Dense_0", "kernel") and consumer.view == (4, 5, 8)
  assert consumer.axis == 1 and consumer.bias == ("params", "Dense_0", "bias")
  assert t.groups["Conv_0"].consumers[0].padded is False      # read by a VALID conv
  assert [s.kind for s in g.producers] == ["kernel", "bias"]
  assert t.groups["Conv_0"].activation == "relu" and t.groups["Conv_0"].kind == "conv"
  assert t.readout("Dense_0") is not None and t.readout("Conv_1") is None


def test_residual_couples_channels_and_depthwise_ties_them():
  fn, params, x, _ = ZOO["residual_bn_depthwise"]()
  t = jaxprune.trace(fn, params, x)
  paths = {s.path for s in t.groups["Conv_0"].slices}
  # stem conv, its BN (scale, shift, statistics), the depthwise conv, the branch's last conv
  # and BN (residual add), and the readers: pointwise conv and the head.
  assert {("params", "Conv_0", "kernel"), ("params", "Conv_1", "kernel"),
          ("params", "Conv_3", "kernel"), ("params", "BatchNorm_2", "scale"),
          ("batch_stats", "BatchNorm_0", "mean"), ("params", "Conv_2", "kernel"),
          ("params", "Dense_0", "kernel")} <= paths
  kinds = {s.path[-2:]: s.kind for s in t.groups["Conv_0"].slices}
  assert kinds[("BatchNorm_0", "scale")] == "scale"
  assert kinds[("BatchNorm_0", "bias")] == "shift"
  assert kinds[("BatchNorm_0", "mean")] == "stat"
  assert kinds[("Conv_0", "bias")] == "bias"


def test_concatenation_gives_each_part_a_segment():
  fn, params, x, _ = ZOO["concatenate"]()
  t = jaxprune.trace(fn, params, x)
  (c0,), (c1,) = t.groups["Conv_0"].consumers, t.groups["Conv_1"].consumers
  assert c0.path == c1.path == ("params", "Conv_2", "kernel")
  assert (c0.segment, c1.segment) == ((0, 4), (4, 5))
  assert t.groups["Dense_1"].consumers[0].segment == (7, 3)
  assert "the concatenation of group 'Conv_0' [0:4], group 'Conv_1' [4:9]" in t.explain()
  small, st = t.compact(params, {"Conv_0": jnp.array([True, False, True, False])})
  assert st.groups["Conv_1"].consumers[0].segment == (2, 5)      # offsets follow the sizes
  assert small["params"]["Conv_2"]["kernel"].shape == (3, 3, 7, 6)


def test_plain_function_activations_and_readout():
  fn, params, x, _ = _einsum_case()
  t = jaxprune.trace(fn, params, x)
  assert t.groups["w1"].activation == "sigmoid" and t.groups["w2"].activation == "relu"
  h = jax.nn.sigmoid(x @ params["w1"] + params["b1"])
  np.testing.assert_allclose(t.activations(params, x, "w1"), h, rtol=1e-6)
  assert t.readout("w2").path == ("w3",) and t.readout("w1") is None
  assert t.readout("w2").bias == ("b3",)


# ----------------------------------------------------------------------------- built-in models


BUILTINS = [
    (jaxprune.MLP(in_features=4, hidden=(6, 5), out_features=3), (2, 4)),
    (jaxprune.Autoencoder(in_features=11, hidden=(10,)), (2, 11)),
    (jaxprune.LeNet(input_shape=(30, 24, 1)), (2, 30, 24, 1)),
    (jaxprune.CNN4(input_shape=(64, 64, 1)), (2, 64, 64, 1)),
]


@pytest.mark.parametrize("model,shape", BUILTINS, ids=lambda m: type(m).__name__)
def test_traced_groups_equal_declared_groups(model, shape):
  params = jax.eval_shape(model.init, jax.random.key(0))
  t = jaxprune.trace(model.apply, params, jax.ShapeDtypeStruct(shape, jnp.float32))
  assert t.groups == model.groups          # same names, slices, views, kinds and order
  assert list(t.groups) == list(model.groups)


def test_resnet18_declared_groups_and_coupled_stages():
  model = jaxprune.ResNet18(input_shape=(8, 8, 3), widths=(4, 5, 6, 7, 8, 9, 10, 11))
  # init's shapes and scales in NumPy (He-normal kernels, unit norm scales and variances), not
  # init itself: compiling it took longer than the rest of the test.
  def like_init(path, s):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      return np.float32(np.sqrt(2.0 / np.prod(s.shape[:-1]))) * _randn(*s.shape)
    return np.full(s.shape, 1.0 if "scale" in name or "var" in name else 0.0, s.dtype)
  params = jax.tree_util.tree_map_with_path(like_init, jax.eval_shape(model.init,
                                                                      jax.random.key(0)))
  t = jaxprune.trace(model.apply, params, jnp.zeros((2, 8, 8, 3)))
  traced = list(t.groups.values())
  for g in model.groups.values():             # every block group, exactly as declared
    assert any(h.slices == g.slices and h.size == g.size for h in traced), g.name
  coupled = {n: g for n, g in t.groups.items() if n.endswith("conv2") or n == "conv1"}
  assert {n: g.size for n, g in coupled.items()} == {
      "conv1": 64, "layer2_0/conv2": 128, "layer3_0/conv2": 256, "layer4_0/conv2": 512}
  stem = {s.path for s in coupled["conv1"].producers if s.kind == "kernel"}
  assert stem == {("params", "conv1", "kernel"), ("params", "layer1_0", "conv2", "kernel"),
                  ("params", "layer1_1", "conv2", "kernel")}
  stage2 = {s.path for s in coupled["layer2_0/conv2"].producers if s.kind == "kernel"}
  assert ("params", "layer2_0", "downsample_conv", "kernel") in stage2
  assert ("params", "fc", "kernel") in {s.path for s in coupled["layer4_0/conv2"].consumers}
  # Prune the coupled stage-1 channels: compacting equals masking.
  rng = np.random.default_rng(1)
  params = _perturb(params)
  x = _randn(2, 8, 8, 3)
  um = {"conv1": jnp.asarray(rng.random(64) < 0.5).at[0].set(True)}
  # One program (eager, apply_masks compiles a multiply per leaf shape).
  want = jax.jit(lambda p, m: model.apply(jaxprune.apply_masks(p, m), x))(
      params, jaxprune.expand(params, t, um))
  small, st = t.compact(params, um)
  np.testing.assert_allclose(st.apply(small, x), want, atol=1e-4, rtol=1e-4)


def test_builtin_readout_found_from_slices():
  mlp = jaxprune.MLP(in_features=4, hidden=(6, 5), out_features=3)
  assert mlp.readout("hidden_1").path == ("params", "out", "kernel")
  assert mlp.readout("hidden_0") is None
  lenet = jaxprune.LeNet(input_shape=(30, 24, 1))
  assert lenet.readout("conv_1") is None          # read through a flatten view
  assert "params/out/kernel" in mlp.explain()


# ----------------------------------------------------------------------------- checked declarations


def _params():
  return {"params": {"a": {"kernel": jnp.ones((2, 3)), "bias": jnp.zeros(3)},
                     "b": {"kernel": jnp.ones((3, 4)), "bias": jnp.zeros(4)}}}


def _group(**changes):
  slices = [jaxprune.Slice(("params", "a", "kernel"), 1, "producer"),
            jaxprune.Slice(("params", "a", "bias"), 0, "producer", kind="bias"),
            jaxprune.Slice(("params", "b", "kernel"), 0, "consumer", bias=("params", "b", "bias"))]
  i = changes.pop("index", 0)
  if changes:
    import dataclasses  # pylint: disable=g-import-not-at-top
    slices[i] = dataclasses.replace(slices[i], **changes)
  return jaxprune.UnitGroup("h", 3, tuple(slices))


@pytest.mark.parametrize("changes,match", [
    (dict(path=("params", "a", "kernl")), "Group 'h', slice params/a/kernl.*no key 'kernl'"),
    (dict(axis=2), "Group 'h', slice params/a/kernel.*axis 2 is out of range"),
    (dict(axis=0), "axis 0 of shape \\(2, 3\\) has 2 entries but the group has 3 units"),
    (dict(index=2, view=(2, 2, 4)), "view \\(2, 2, 4\\) does not fit the leaf's shape \\(3, 4\\)"),
    (dict(index=1, kind="kernel"), "slice params/a/bias.*1-D leaf cannot be a kernel"),
    (dict(index=2, bias=("params", "c", "bias")), "its bias .*no key 'c'"),
])
def test_declaration_errors_name_group_slice_and_fix(changes, match):
  g = _group(**changes)
  with pytest.raises(ValueError, match=match):
    jaxprune.check_groups(_params(), {"h": g})
  with pytest.raises(ValueError, match=match):       # checked before any use
    jaxprune.expand(_params(), {"h": g}, {"h": jnp.ones(3, bool)})
  with pytest.raises(ValueError, match=match):
    jaxprune.compact(_params(), {"h": g}, {"h": jnp.ones(3, bool)})


def test_group_dict_key_must_be_its_name():
  with pytest.raises(ValueError, match="groups\\['x'\\] holds the group named 'h'"):
    jaxprune.check_groups(_params(), {"x": _group()})


def test_wrong_axis_no_longer_compacts_silently():
  """Out-of-range gathers used to clamp: a wrong axis gave wrong-shaped, duplicated rows."""
  g = _group(index=2, axis=1)      # (3, 4) kernel, axis 1 has 4 entries, group has 3
  with pytest.raises(ValueError, match="has 4 entries but the group has 3 units"):
    jaxprune.compact(_params(), {"h": g}, {"h": jnp.array([True, False, True])})


MLP = jaxprune.MLP(in_features=4, hidden=(6,), out_features=3)


def _mlp_params():
  return MLP.init(jax.random.key(0))


@pytest.mark.parametrize("call", [
    lambda p, um: jaxprune.expand(p, MLP, um),
    lambda p, um: jaxprune.compact(p, MLP.groups, um),
    lambda p, um: MLP.compact(p, um),
    lambda p, um: jaxprune.importance_prune(MLP, "hidden_0")(p, um, 1),
    lambda p, um: jaxprune.weight_distinctiveness(MLP, "hidden_0")(p, um),
    lambda p, um: jaxprune.distinctiveness(MLP, "hidden_0")(p, um, jnp.ones((8, 6)) * 0.3),
    lambda p, um: jaxprune.group_redundancy(MLP, "hidden_0")(p, um, jnp.ones((8, 6)) * 0.3),
])
def test_misspelt_unit_mask_key_raises_everywhere(call):
  um = {"hidden_0": jnp.ones(6, bool), "hiden_0": jnp.ones(6, bool)}
  with pytest.raises(KeyError, match="Unit mask 'hiden_0' names no unit group"):
    call(_mlp_params(), um)


def test_weight_masks_where_unit_masks_belong_say_so():
  """compact(params, expand(...)) named a params key as a unit mask with no other word."""
  p = _mlp_params()
  wm = jaxprune.expand(p, MLP, {"hidden_0": jnp.arange(6) < 3})
  hint = "These look like weight masks"
  with pytest.raises(KeyError, match=hint):
    MLP.compact(p, {"out": wm["params"]["out"]})
  with pytest.raises(ValueError, match=hint):
    MLP.compact(p, wm["params"])                               # {'hidden_0': {...}, 'out': ...}
  with pytest.raises(ValueError, match="Unit mask 'hidden_0' is a dict.*" + hint):
    MLP.compact(p, {"hidden_0": wm["params"]["hidden_0"]})
  with pytest.raises(ValueError, match=r"has shape \(4, 6\).*" + hint):
    MLP.compact(p, {"hidden_0": wm["params"]["hidden_0"]["kernel"]})


def test_flax_apply_traced_on_part_of_its_variables_says_to_pass_them_all():
  net, v, x = linen_batch_norm_mlp()
  for part in (v["params"], {"params": v["params"]}):
    with pytest.raises(jaxprune.TraceError, match="takes the whole variables dict"):
      jaxprune.trace(net.apply, part, x)


def test_unit_masks_must_be_bool_or_01_integers():
  p = _mlp_params()
  with pytest.raises(ValueError, match="dtype float32; unit masks must be bool"):
    MLP.compact(p, {"hidden_0": jnp.full(6, 0.3)})
  with pytest.raises(ValueError, match="holds \\[2\\]; an integer unit mask may hold only 0"):
    jaxprune.expand(p, MLP, {"hidden_0": jnp.array([1, 0, 2, 1, 1, 1])})
  small, m = MLP.compact(p, {"hidden_0": np.array([1, 0, 1, 1, 0, 1])})   # 0/1 ints accepted
  assert m.hidden == (4,) and small["params"]["hidden_0"]["kernel"].shape == (4, 4)


def test_expand_argument_order_is_checked():
  with pytest.raises(TypeError, match="takes \\(params, target, unit_masks\\)"):
    jaxprune.expand(MLP, _mlp_params(), jaxprune.unit_masks_ones(MLP))


# ----------------------------------------------------------------------------- bad input


def test_untraceable_function_shows_jax_first_line():
  def bad(p, x):
    return x @ p["w"]          # (5, 4) @ (3, 2)
  with pytest.raises(jaxprune.TraceError, match="Could not trace bad.*TypeError: dot_general"):
    jaxprune.trace(bad, {"w": jnp.ones((3, 2))}, jnp.ones((5, 4)))


def test_wrong_example_batch_shape():
  fn, params, _, _ = _einsum_case()
  with pytest.raises(jaxprune.TraceError, match="example inputs"):
    jaxprune.trace(fn, params, jnp.ones((5, 9)))
  with pytest.raises(ValueError, match="at least 2 samples"):
    jaxprune.trace(fn, params, jnp.ones((1, 4)))
  # An empty batch used to be accepted; the traced shapes then failed deep in a reshape.
  with pytest.raises(ValueError, match="at least 2 samples.*empty input of shape \\(0, 4\\)"):
    jaxprune.trace(fn, params, jnp.ones((0, 4)))
  t = jaxprune.trace(fn, params, jnp.ones((5, 4)))
  with pytest.raises(ValueError, match="inputs shaped \\(N, 4\\)"):
    t.check_input(jnp.ones((5, 3)))
  # One sample without its batch axis (x[0]): its features were read as the batch, and the
  # target then refused every real batch as "shaped (N)".
  mlp = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]
  with pytest.raises(ValueError, match=r"shapes \(4,\),.*none holds a batch.*x\[:2\]"):
    jaxprune.trace(mlp, params, jnp.ones((4,)))
  # An input shared by the batch (a normalisation's mean) beside the batch traces as before.
  shared = lambda p, mu, x: mlp(p, x - mu)
  t = jaxprune.trace(shared, params, jnp.ones((4,)), jnp.ones((5, 4)))
  assert t.activations(params, jnp.ones((4,)), jnp.ones((7, 4)), "w1").shape == (7, 7)


def test_an_nnx_module_where_the_function_takes_its_state_is_named():
  """fn merges a state (nnx.merge(graphdef, s)): the module itself passed as params failed in
  flax ('Incorrect number of leaves') at trace, apply and fit."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  module = nnx_sigmoid_mlp()
  graphdef, state = nnx.split(module)
  fn = lambda s, x: nnx.merge(graphdef, s)(x)
  x = jnp.ones((4, 8))
  with pytest.raises(jaxprune.TraceError, match="params is an nnx module.*nnx.split"):
    jaxprune.trace(fn, module, x)
  t = jaxprune.trace(fn, state, x)
  with pytest.raises(TypeError, match="params is an nnx module.*nnx.split"):
    t.apply(module, x)
  np.testing.assert_allclose(t.apply(state, x), module(x), rtol=1e-6)
  # the documented route with the module as params still runs
  tm = jaxprune.trace(lambda m, x: m(x), module, x)
  np.testing.assert_allclose(tm.apply(module, x), module(x), rtol=1e-6)


def test_unknown_op_marks_leaves_unprunable_with_its_name():
  def fn(p, x):
    h = jnp.tanh(x @ p["w1"])
    h = jnp.sort(h, axis=-1)                  # mixes units
    g = jax.nn.relu(x @ p["v1"])
    g = jax.lax.cumsum(g, axis=0)             # along the batch: fine
    s = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] * 2.0),
                           (0, h @ p["w2"]))[1]
    return s + g @ p["v2"]
  params = {"w1": jnp.ones((4, 5)), "w2": jnp.ones((5, 3)), "v1": jnp.ones((4, 6)),
            "v2": jnp.ones((6, 3))}
  t = jaxprune.trace(fn, params, jnp.ones((3, 4)))
  assert list(t.groups) == ["v1"]
  text = t.explain()
  assert "w1 (4, 5): " in text and "sorted along by sort" in text
  assert ("w2 (5, 3): axis 0 -> not prunable (sorted along by sort); "
          "axis 1 -> not prunable (used by while (not followed)") in text


@pytest.mark.parametrize("fast_variance", [True, False])
def test_a_layer_norm_over_the_units_is_read_by_its_statistics(fast_variance):
  """flax's LayerNorm computes the variance as E[h^2] - E[h]^2 (sums of values that are zero at
  a masked unit): the units are a group read by those sums, and the compacted target (dividing
  by the traced width) equals masking. With use_fast_variance=False the variance sums
  (h - mean)^2, a masked unit's term is mean^2: refused, naming the sum."""
  class LN(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.LayerNorm(use_fast_variance=fast_variance)(nn.Dense(6)(x)))
  x = _randn(4, 5)
  v = LN().init(jax.random.key(0), x)
  v = jax.tree.map(lambda a: a + 0.3 * _randn(*a.shape), v)     # (scale, bias not 1 and 0)
  t = jaxprune.trace(LN().apply, v, x)
  if not fast_variance:
    assert not t.groups
    assert "reduced over by reduce_sum where a masked unit is not shown to be zero" in t.explain()
    return
  # (Dense(3) is made first: Dense_0; the hidden layer is Dense_1)
  assert {n: (g.size, g.read_by_products) for n, g in t.groups.items()} == {"Dense_1": (6, True)}
  assert sorted(s.path[-2:] for s in t.groups["Dense_1"].producers) == [
      ("Dense_1", "bias"), ("Dense_1", "kernel"), ("LayerNorm_0", "bias"),
      ("LayerNorm_0", "scale")]
  for seed in range(3):
    small, _, _ = assert_compacts_as_masked(t, v, LN().apply, random_unit_masks(t, seed),
                                            (x, _randn(7, 5)))
  with pytest.raises(ValueError, match="summed over by a statistic"):
    jaxprune.distinctiveness(t, "Dense_1")
  assert "summed over by a statistic" in t.activations_incomplete_why("Dense_1")


# ----------------------------------------------------------------------------- one model-free path


@pytest.fixture(scope="module")
def traced_mlp():
  """A plain-function MLP equal to the built-in MLP, traced."""
  model = jaxprune.MLP(in_features=4, hidden=(8,), out_features=3)
  params = model.init(jax.random.key(0))

  def fn(p, x):
    h = jax.nn.sigmoid(x @ p["params"]["hidden_0"]["kernel"] + p["params"]["hidden_0"]["bias"])
    return h @ p["params"]["out"]["kernel"] + p["params"]["out"]["bias"]

  x = _randn(40, 4)
  y = jnp.asarray(RNG.integers(0, 3, 40))
  return model, params, x, y, jaxprune.trace(fn, params, x)


def test_pruners_on_traced_target_match_builtin(traced_mlp):
  model, params, x, _, t = traced_mlp
  assert t.groups == model.groups
  acts_t = t.activations(params, x, "hidden_0")
  np.testing.assert_allclose(acts_t, model.activations(params, x, "hidden_0"), rtol=1e-6)
  um = jaxprune.unit_masks_ones(t)
  for make, args in [(jaxprune.distinctiveness, (acts_t, 60.0, 120.0)),
                     (jaxprune.group_redundancy, (acts_t,)),
                     (jaxprune.importance_prune, (3,)),
                     (jaxprune.weight_distinctiveness, (60.0, 120.0))]:
    p1, m1, _ = make(t, "hidden_0")(params, um, *args)
    p2, m2, _ = make(model, "hidden_0")(params, um, *args)
    np.testing.assert_array_equal(m1["hidden_0"], m2["hidden_0"])
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
      np.testing.assert_allclose(a, b, rtol=1e-6)


def test_ga_on_traced_target_takes_fast_path(traced_mlp):
  model, params, x, y, t = traced_mlp
  assert ga.fast_path_applies(t, "hidden_0") and ga.fast_path_applies(model, "hidden_0")
  cfg = ga.GAConfig(population_size=12, hof_size=2, generations=3)
  r1 = ga.search(t, params, x, y, "hidden_0", key=jax.random.key(1), config=cfg, progress=False)
  r2 = ga.search(model, params, x, y, "hidden_0", key=jax.random.key(1), config=cfg,
                 progress=False)
  np.testing.assert_array_equal(r1.mask, r2.mask)
  assert float(r1.fitness) == pytest.approx(float(r2.fitness))
  assert 0.0 <= float(r1.accuracy) <= 1.0          # a fraction, like evaluate()


def test_fit_and_evaluate_take_a_target_or_an_apply_function(traced_mlp):
  model, params, x, y, t = traced_mlp
  kw = dict(key=jax.random.key(2), epochs=2, progress=False)
  p_model, _ = jaxprune.fit(model, params, x, y, **kw)
  p_target, _ = jaxprune.fit(t, params, x, y, **kw)
  for a, b in zip(jax.tree.leaves(p_model), jax.tree.leaves(p_target)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  e1 = jaxprune.evaluate(model, p_model, x, y)
  e2 = jaxprune.evaluate(t, p_model, x, y)
  e3 = jaxprune.evaluate(t.apply, p_model, x, y)
  assert e2 == pytest.approx(e1) and e3 == pytest.approx(e1)


def test_fit_plain_dict_params_with_custom_loss():
  fn, params, x, _ = _einsum_case()
  target = _randn(5, 2)
  mse = lambda out, y: jnp.mean((out - y) ** 2, axis=-1)
  um = {"w1": jnp.array([True, False, True, True, False, True, True])}
  t = jaxprune.trace(fn, params, x)
  wm = jaxprune.expand(params, t, um)
  trained, hist = jaxprune.fit(fn, params, x, target, key=jax.random.key(0), epochs=20,
                               loss=mse, masks=wm, learning_rate=1e-2, progress=False)
  assert hist["loss"][-1] < hist["loss"][0]
  assert float(jnp.max(jnp.abs(trained["w1"][:, 1]))) == 0.0     # pruned stays zero
  small, st = t.compact(trained, um)
  np.testing.assert_allclose(st.apply(small, x), fn(trained, x), atol=1e-5)


def test_distinctiveness_merge_is_exact_on_traced_cnn():
  """An exact duplicate channel merged by the model-free pruner leaves the outputs unchanged."""
  fn, params, x, _ = ZOO["linen_cnn"]()
  k = params["params"]["Conv_0"]["kernel"]
  b = params["params"]["Conv_0"]["bias"]
  params["params"]["Conv_0"]["kernel"] = k.at[..., 4].set(k[..., 1])
  params["params"]["Conv_0"]["bias"] = b.at[4].set(b[1])
  t = jaxprune.trace(fn, params, x)
  acts = t.activations(params, x, "Conv_0")
  prune = jaxprune.distinctiveness(t, "Conv_0", constants=False, complementary=False)
  new, um, report = prune(params, jaxprune.unit_masks_ones(t), acts, 1.0, 179.0)
  assert not bool(um["Conv_0"][4]) and int(um["Conv_0"].sum()) == 5
  del report
  np.testing.assert_allclose(t.apply(new, x), fn(params, x), atol=1e-5)
  small, st = t.compact(new, um)
  np.testing.assert_allclose(st.apply(small, x), fn(params, x), atol=1e-5)
