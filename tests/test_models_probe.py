"""The built-in models against independent references: NumPy forward passes written from the
documented architectures, hand counts of parameters, the traced unit groups, torchvision's
state-dict layout; and the errors for bad configurations and bad inputs."""

import dataclasses
import re

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from numpy.lib.stride_tricks import sliding_window_view

import jaxprune
from jaxprune.models.resnet import load_resnet18
from test_resnet import random_state_dict   # torchvision keys and shapes, written out there

# ----------------------------------------------------------------------------- NumPy references

_ACT = {"sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)), "tanh": np.tanh,
        "relu": lambda z: np.maximum(z, 0.0), "linear": lambda z: z}


def _conv(x, k, stride, pads):
  """NHWC x, HWIO k, explicit ((top, bottom), (left, right)) zero padding."""
  x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  win = sliding_window_view(x, k.shape[:2], axis=(1, 2))[:, ::stride, ::stride]
  return np.tensordot(win, k, axes=([3, 4, 5], [2, 0, 1]))   # (n, h, w, c, i, j) . (i, j, c, o)


def _same(n, k, s):
  """TensorFlow/XLA 'SAME': ceil(n / s) outputs, the extra padding at the end."""
  total = max((-(-n // s) - 1) * s + k - n, 0)
  return total // 2, total - total // 2


def _max_pool(x, w, s, pad=0):
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
  return sliding_window_view(x, (w, w), axis=(1, 2))[:, ::s, ::s].max(axis=(-2, -1))


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _mlp_ref(p, x, n_hidden, act):
  for i in range(n_hidden):
    x = _ACT[act](x @ p[f"hidden_{i}"]["kernel"] + p[f"hidden_{i}"]["bias"])
  return x @ p["out"]["kernel"] + p["out"]["bias"]


def _convnet_ref(p, x, m):
  act = _ACT[m.activation]
  for i, (k, s, pad, pool) in enumerate(zip(m.kernels, m.strides, m.paddings, m.pools)):
    pads = (((0, 0), (0, 0)) if pad == "VALID" else
            (_same(x.shape[1], k, s), _same(x.shape[2], k, s)))
    x = act(_conv(x, p[f"conv_{i}"]["kernel"], s, pads) + p[f"conv_{i}"]["bias"])
    if pool is not None:
      x = _max_pool(x, *pool)
  x = x.reshape(len(x), -1)      # NHWC flatten: (h, w, c) row-major
  for i in range(len(m.dense)):
    x = act(x @ p[f"dense_{i}"]["kernel"] + p[f"dense_{i}"]["bias"])
  return x @ p["out"]["kernel"] + p["out"]["bias"]


def _resnet_ref(v, x, train):
  """torchvision's resnet18 (NHWC); train: batch statistics (biased variance), and the
  running averages updated with torch's momentum 0.1."""
  P, S, new = v["params"], v["batch_stats"], {}
  relu = _ACT["relu"]

  def bn(h, where):
    pp, st = P, S
    for k in where:
      pp, st = pp[k], st[k]
    if train:
      mu, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
      new[where] = (0.9 * st["mean"] + 0.1 * mu, 0.9 * st["var"] + 0.1 * var)
    else:
      mu, var = st["mean"], st["var"]
    return (h - mu) / np.sqrt(var + 1e-5) * pp["scale"] + pp["bias"]

  x = relu(bn(_conv(x, P["conv1"]["kernel"], 2, ((3, 3), (3, 3))), ("bn1",)))
  x = _max_pool(x, 3, 2, pad=1)
  for stage in range(4):
    for b in range(2):
      n, stride = f"layer{stage + 1}_{b}", (2 if stage and not b else 1)
      h = relu(bn(_conv(x, P[n]["conv1"]["kernel"], stride, ((1, 1), (1, 1))), (n, "bn1")))
      h = bn(_conv(h, P[n]["conv2"]["kernel"], 1, ((1, 1), (1, 1))), (n, "bn2"))
      if stage and not b:
        x = bn(_conv(x, P[n]["downsample_conv"]["kernel"], stride, ((0, 0), (0, 0))),
               (n, "downsample_bn"))
      x = relu(h + x)
  return x.mean((1, 2)) @ P["fc"]["kernel"] + P["fc"]["bias"], new


def _random_variables(model, seed):
  """Random variables of ``model``'s shapes (from ``jax.eval_shape``: nothing compiled), of
  unit scale (variances in [0.5, 2]): no zero biases, non-trivial batch norms."""
  rng = np.random.default_rng(seed)

  def one(path, a):
    if jax.tree_util.keystr(path).endswith("['var']"):
      return rng.uniform(0.5, 2.0, a.shape).astype(np.float32)
    fan = np.prod(a.shape[:-1]) if len(a.shape) > 1 else 4
    return (rng.standard_normal(a.shape) * np.sqrt(2.0 / fan)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(one, jax.eval_shape(model.init, jax.random.key(0)))


# ----------------------------------------------------------------------------- forward passes


@pytest.mark.parametrize("act", ["sigmoid", "tanh", "relu"])
def test_mlp_forward_matches_numpy(act):
  m = jaxprune.MLP(in_features=5, hidden=(6, 4), out_features=3, activation=act)
  v = _random_variables(m, 1)
  x = np.random.default_rng(2).standard_normal((7, 5)).astype(np.float32)
  np.testing.assert_allclose(m.apply(v, x), _mlp_ref(_f64(v["params"]), x, 2, act),
                             atol=1e-5, rtol=1e-5)


def test_autoencoder_is_n_h_n_with_a_linear_output():
  m = jaxprune.Autoencoder(in_features=5, hidden=(3,))
  v = _random_variables(m, 3)
  x = np.random.default_rng(4).standard_normal((4, 5)).astype(np.float32)
  assert m.apply(v, x).shape == (4, 5)
  np.testing.assert_allclose(m.apply(v, x), _mlp_ref(_f64(v["params"]), x, 1, "sigmoid"),
                             atol=1e-5, rtol=1e-5)


def test_autoencoder_refuses_another_output_size():
  with pytest.raises(ValueError, match=r"reconstructs its input.*out_features=4.*jaxprune.MLP"):
    jaxprune.Autoencoder(in_features=5, hidden=(3,), out_features=4)
  assert jaxprune.Autoencoder(in_features=5, hidden=(3,), out_features=5).out_features == 5
  assert jaxprune.Autoencoder(in_features=5, hidden=(3,)).resize({"hidden_0": 2}).out_features == 5
  # out_features follows in_features through dataclasses.replace (it is no init field)
  grown = dataclasses.replace(jaxprune.Autoencoder(in_features=5, hidden=(3,)), in_features=8)
  assert (grown.in_features, grown.out_features, grown.hidden) == (8, 8, (3,))
  assert jaxprune.Autoencoder(5, (3,), 5, "tanh") == jaxprune.Autoencoder(
      in_features=5, hidden=(3,), activation="tanh")


@pytest.mark.parametrize("model", [
    jaxprune.LeNet(input_shape=(23, 21, 2), channels=(3, 4), activation="sigmoid"),
    # odd sizes: 'SAME' with stride > 1 pads more at the end; 'VALID' drops the remainder
    jaxprune.CNN4(input_shape=(67, 61, 3), channels=(3, 4, 5, 2), dense=(6, 5, 4)),
], ids=["lenet", "cnn4"])
def test_conv_nets_forward_match_numpy(model):
  v = _random_variables(model, 5)
  x = np.random.default_rng(6).standard_normal((3,) + model.input_shape).astype(np.float32)
  np.testing.assert_allclose(model.apply(v, x), _convnet_ref(_f64(v["params"]), x, model),
                             atol=2e-5, rtol=2e-5)


def test_resnet18_forward_and_batch_stats_match_numpy():
  m = jaxprune.ResNet18(num_classes=5, input_shape=(33, 29, 3), widths=(4, 5) * 4)
  v = _random_variables(m, 7)
  x = np.random.default_rng(8).standard_normal((4, 33, 29, 3)).astype(np.float32)
  got, (out, new) = jax.jit(lambda v, x: (m.apply(v, x), m.apply_train(v, x)))(v, x)
  want, _ = _resnet_ref(_f64(v), x.astype(np.float64), train=False)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
  want, stats = _resnet_ref(_f64(v), x.astype(np.float64), train=True)
  np.testing.assert_allclose(out, want, atol=5e-5, rtol=5e-5)
  assert len(stats) == 20   # stem + 8 blocks x 2 + 3 downsamples
  for where, (mean, var) in stats.items():
    node = new["batch_stats"]
    for k in where:
      node = node[k]
    np.testing.assert_allclose(node["mean"], mean, atol=1e-5, err_msg=str(where))
    np.testing.assert_allclose(node["var"], var, atol=1e-5, err_msg=str(where))


# ----------------------------------------------------------------------------- groups, compact

_SMALL = [
    jaxprune.MLP(in_features=5, hidden=(6, 4), out_features=3),
    jaxprune.LeNet(input_shape=(20, 18, 1), channels=(3, 4)),
    jaxprune.LeNet(input_shape=(16, 16, 1), channels=(3, 4)),   # 1x1 map: plain rows, no view
    jaxprune.CNN4(input_shape=(67, 61, 3), channels=(3, 4, 5, 2), dense=(6, 5, 4)),
]


# (tests/test_trace.py compares square-input LeNet and CNN4; ResNet-18's block groups there too)
@pytest.mark.parametrize("model", _SMALL[2:], ids=["lenet_1x1", "cnn4_67x61"])
def test_declared_groups_are_the_traced_groups(model):
  params = jax.eval_shape(model.init, jax.random.key(0))
  traced = jaxprune.trace(model.apply, params, jnp.zeros((2,) + model.input_shape))
  assert set(traced.groups) == set(model.groups)
  for name, g in model.groups.items():
    t = traced.groups[name]
    assert (t.size, t.activation, t.kind) == (g.size, g.activation, g.kind), name
    assert set(t.slices) == set(g.slices), name   # path, axis, role, view, bias, padded ...


def _count(m):
  """Trainable weights of an MLP or conv net, from its sizes by hand."""
  if isinstance(m, jaxprune.MLP):
    sizes = (m.in_features,) + m.hidden + (m.out_features,)
    return sum(a * b + b for a, b in zip(sizes, sizes[1:]))
  n, cin = 0, m.input_shape[2]
  for c, k in zip(m.channels, m.kernels):
    n, cin = n + k * k * cin * c + c, c
  h, w, c = m.feature_map_shape()
  sizes = (h * w * c,) + m.dense + (m.out_features,)
  return n + sum(a * b + b for a, b in zip(sizes, sizes[1:]))


@pytest.mark.parametrize("model", _SMALL, ids=["mlp", "lenet", "lenet_1x1", "cnn4"])
def test_compact_keeping_one_unit_per_group_equals_the_masked_model(model):
  v = _random_variables(model, 9)
  rng = np.random.default_rng(10)
  x = rng.standard_normal((3,) + model.input_shape).astype(np.float32)
  units = {}
  for n, g in model.groups.items():
    units[n] = np.zeros(g.size, bool)
    units[n][rng.integers(g.size)] = True
  masked = jaxprune.apply_masks(v, jaxprune.expand(v, model, units))
  small, small_model = model.compact(v, units)
  assert small_model.group_sizes == {n: 1 for n in model.groups}
  np.testing.assert_allclose(small_model.apply(small, x), model.apply(masked, x), atol=1e-5)
  assert small_model.param_count(small) == _count(small_model)
  assert model.param_count(v) == _count(model)


def test_resnet18_parameter_counts_by_hand():
  def block(cin, c, down):
    return 9 * cin * c + 9 * c * c + 4 * c + (cin * c + 2 * c if down else 0)

  body = 7 * 7 * 3 * 64 + 2 * 64                          # stem conv + bn
  body += 2 * block(64, 64, False)
  for cin, c in ((64, 128), (128, 256), (256, 512)):
    body += block(cin, c, True) + block(c, c, False)
  # mean and var of every batch norm: stem, 4 in stage 1, 5 (with the downsample's) in 2-4
  stats = 2 * (64 + 4 * 64 + 5 * 128 + 5 * 256 + 5 * 512)
  assert body + 512 * 1000 + 1000 == 11_689_512          # docs/resnet.md (torchvision's)
  assert body + 512 * 7 + 7 == 11_180_103
  assert stats == 9_600 and body + 512 * 7 + 7 + stats == 11_189_703
  shapes = jax.eval_shape(jaxprune.ResNet18(input_shape=(32, 32, 3)).init, jax.random.key(0))
  sizes = lambda t: sum(int(np.prod(a.shape)) for a in jax.tree.leaves(t))
  assert sizes(shapes["params"]) == 11_180_103
  assert sizes(shapes["batch_stats"]) == 9_600


# ----------------------------------------------------------------------------- pretrained weights


def test_load_resnet18_puts_every_tensor_where_it_belongs(tmp_path):
  sd = random_state_dict(11)
  np.savez(tmp_path / "r.npz", **sd)
  v = load_resnet18(tmp_path / "r.npz", num_classes=1000)
  leaf_of = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
  seen = 0
  for k, a in sd.items():
    parts = k.split(".")
    if parts[-1] == "num_batches_tracked":
      continue
    if parts[0] == "fc":
      got = v["params"]["fc"]["kernel" if parts[1] == "weight" else "bias"]
      want = a.T if parts[1] == "weight" else a          # (out, in) -> (in, out)
    else:
      mod = [f"{parts[0]}_{parts[1]}"] + parts[2:-1] if parts[0].startswith("layer") else parts[:-1]
      if "downsample" in mod:                            # downsample.0 / .1 -> conv / bn
        mod = mod[:1] + ["downsample_conv" if mod[-1] == "0" else "downsample_bn"]
      if a.ndim == 4:
        coll, leaf, want = "params", "kernel", a.transpose(2, 3, 1, 0)   # OIHW -> HWIO
      else:
        coll, leaf, want = ("batch_stats" if "running" in parts[-1] else "params",
                            leaf_of[parts[-1]], a)
      got = v[coll]
      for m in mod:
        got = got[m]
      got = got[leaf]
    np.testing.assert_array_equal(np.asarray(got), want, err_msg=k)
    seen += 1
  assert seen == len(jax.tree.leaves(v)) == 102     # every loaded leaf checked


# ----------------------------------------------------------------------------- fixed bugs


def test_resize_refuses_names_of_no_group():
  mlp = jaxprune.MLP(in_features=5, hidden=(6, 4), out_features=3)
  # was: MLP.resize({'conv_0': 3}) resized hidden_0, CNN4.resize({'hidden_0': 3}) dense_0
  with pytest.raises(KeyError, match=r"Unknown unit group 'conv_0'.*\['hidden_0', 'hidden_1'\]"):
    mlp.resize({"conv_0": 3})
  with pytest.raises(KeyError, match="Unknown unit group 'hidden_5'"):   # was an IndexError
    mlp.resize({"hidden_5": 3})
  cnn = jaxprune.CNN4(input_shape=(67, 61, 3), channels=(3, 4, 5, 2), dense=(6, 5, 4))
  for bad in ("hidden_0", "layer1_0", "conv_4", "dense_3"):
    with pytest.raises(KeyError, match=f"Unknown unit group '{bad}'"):
      cnn.resize({bad: 3})
  assert mlp.resize({"hidden_1": 2}).hidden == (6, 2)
  assert cnn.resize({"dense_1": 2, "conv_0": 1}).dense == (6, 2, 4)


def test_sizes_must_be_whole_numbers():
  mlp = jaxprune.MLP(in_features=5, hidden=(6,), out_features=3)
  # were cut silently: hidden 6.5 -> 6, resize 2.7 -> 2, widths 3.7 -> 3, input 32.5 -> 32
  with pytest.raises(ValueError, match=r"hidden\[0\] must be a whole number, got 6.5"):
    jaxprune.MLP(in_features=5, hidden=(6.5,), out_features=3)
  with pytest.raises(ValueError, match=r"size of group 'hidden_0' must be a whole number"):
    mlp.resize({"hidden_0": 2.7})
  with pytest.raises(ValueError, match=r"widths\[0\] must be a whole number, got 3.7"):
    jaxprune.ResNet18(widths=(3.7,) * 8)
  with pytest.raises(ValueError, match=r"input_shape\[0\] must be a whole number, got 32.5"):
    jaxprune.ResNet18(input_shape=(32.5, 32, 3))
  with pytest.raises(ValueError, match=r"hidden\[0\] must be a whole number, got True"):
    jaxprune.MLP(hidden=(True,))
  with pytest.raises(ValueError, match=r"hidden must be a sequence .* for one layer write \(6,\)"):
    jaxprune.MLP(hidden=6)                                  # was "'int' object is not iterable"
  # whole floats and NumPy integers are sizes (in_features=5.0 was a flax shape error)
  m = jaxprune.MLP(in_features=5.0, hidden=(np.int64(6),), out_features=np.int32(3))
  assert (m.in_features, m.hidden, m.out_features) == (5, (6,), 3)
  assert all(type(d) is int for d in (m.in_features, m.out_features) + m.hidden)
  lenet = jaxprune.LeNet(input_shape=(20.0, 18, 1), channels=(3.0, 4))
  assert lenet.input_shape == (20, 18, 1) and lenet.channels == (3, 4)
  assert jaxprune.ResNet18(num_classes=7.0).num_classes == 7


def test_lowercase_paddings_are_read_as_flax_reads_them():
  # flax takes 'valid'; the feature-map arithmetic took it for 'SAME', so the flatten view was
  # (20, 4, 7) on an (8, 7) kernel and expand raised.
  low = jaxprune.LeNet(input_shape=(20, 18, 1), channels=(3, 4), paddings=("valid", "valid"))
  up = jaxprune.LeNet(input_shape=(20, 18, 1), channels=(3, 4))
  assert low.paddings == ("VALID", "VALID")
  assert low.feature_map_shape() == (2, 1, 4)            # 20x18 -5+1-> 16x14 /2-> 8x7 -> 4x3 /2
  assert low.groups == up.groups
  with pytest.raises(ValueError, match=r"paddings\[0\] is 'CIRCULAR'; .* 'VALID' or 'SAME'"):
    jaxprune.LeNet(paddings=("CIRCULAR", "VALID"))
  with pytest.raises(ValueError, match=r"paddings\[1\] is 2"):
    jaxprune.LeNet(paddings=("VALID", 2))


def test_conv_net_configuration_errors_name_the_field():
  with pytest.raises(ValueError, match=r"pools\[0\] is 2; each entry is None or \(window, "):
    jaxprune.LeNet(pools=(2, 2))                           # was "'int' object is not iterable"
  with pytest.raises(ValueError, match=r"kernels and strides must be positive.*kernels=\(0, 5\)"):
    jaxprune.LeNet(kernels=(0, 5))                         # was accepted
  with pytest.raises(ValueError, match=r"strides=\(0, 1\)"):
    jaxprune.LeNet(strides=(0, 1))                         # was a ZeroDivisionError
  with pytest.raises(ValueError, match="at least one conv layer"):
    jaxprune.LeNet(channels=(), kernels=(), strides=(), paddings=(), pools=())


def test_apply_names_a_missing_variables_collection():
  m = jaxprune.MLP(in_features=5, hidden=(6,), out_features=3)
  v = m.init(jax.random.key(0))
  x = jnp.zeros((2, 5))
  # was flax's "Tried to access "kernel" from collection "params" ... the collection is empty"
  with pytest.raises(ValueError, match=r"without 'params'; it looks like the inner params"):
    m.apply(v["params"], x)
  with pytest.raises(ValueError, match=r"without 'params'"):
    m.activations(v["params"], x, "hidden_0")
  with pytest.raises(TypeError, match=r"pass \('hidden_0',\), or call activations"):
    m.apply_with_activations(v, x, "hidden_0")               # was "Unknown unit group 'h'"
  with pytest.raises(TypeError, match=r"takes an array of inputs, got a list"):
    m.apply(v, [[0.0] * 5])                                  # was "Cannot determine dtype"
  r = jaxprune.ResNet18(input_shape=(32, 32, 3))
  shapes = jax.eval_shape(r.init, jax.random.key(0))
  with pytest.raises(ValueError, match=r"'params' and 'batch_stats'.* without 'batch_stats'"):
    r.apply({"params": shapes["params"]}, jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match=r"without 'batch_stats'"):
    r.apply_train({"params": shapes["params"]}, jnp.zeros((1, 32, 32, 3)))


def test_apply_train_checks_the_batch_mask():
  r = jaxprune.ResNet18(input_shape=(16, 16, 3), widths=(4,) * 8)
  shapes = jax.eval_shape(r.init, jax.random.key(0))
  x = jnp.zeros((4, 16, 16, 3))
  # was "Incompatible types for broadcasting: input type=bool[3,1,1,1] ..." from a batch norm
  with pytest.raises(ValueError, match=r"mask must have shape \(4,\), one bool per example .* "
                                       r"got shape \(3,\)"):
    jax.eval_shape(r.apply_train, shapes, x, jnp.ones(3, bool))
  with pytest.raises(ValueError, match=r"got shape \(4, 1\)"):
    jax.eval_shape(r.apply_train, shapes, x, jnp.ones((4, 1), bool))
  with pytest.raises(ValueError, match=r"mask must be bool .* got dtype float32"):
    jax.eval_shape(r.apply_train, shapes, x, jnp.ones(4))   # was taken as where(mask != 0)
  out, _ = jax.eval_shape(r.apply_train, shapes, x, jnp.ones(4, bool))
  assert out.shape == (4, 7)
  mlp = jaxprune.MLP(in_features=3, hidden=(4,), out_features=2)   # ignores it, checks it
  with pytest.raises(ValueError, match=r"mask must have shape \(5,\)"):
    mlp.apply_train(jax.eval_shape(mlp.init, jax.random.key(0)), jnp.zeros((5, 3)),
                    jnp.ones(4, bool))


def test_load_resnet18_names_a_key_prefix(tmp_path):
  sd = random_state_dict(12)
  np.savez(tmp_path / "dp.npz", **{"module." + k: v for k, v in sd.items()})   # nn.DataParallel
  # was only the two lists of 102 keys each (8 shown) and the advice to re-create the file
  with pytest.raises(ValueError, match=r"Every expected key is there under the prefix "
                                       r"'module\.' .*{k\.removeprefix\('module\.'\)"):
    load_resnet18(tmp_path / "dp.npz", num_classes=1000)
  del sd["fc.bias"]
  np.savez(tmp_path / "m.npz", **sd)
  with pytest.raises(ValueError, match=r"missing keys: fc\.bias; unexpected keys: none\. Make it "
                                       r"once") as e:
    load_resnet18(tmp_path / "m.npz", num_classes=1000)
  assert "prefix" not in str(e.value)


def test_load_resnet18_refuses_values_float32_cannot_hold(tmp_path):
  sd = random_state_dict(13)
  sd["layer2.1.conv2.weight"] = sd["layer2.1.conv2.weight"].astype(np.float64)
  sd["layer2.1.conv2.weight"][0, 0, 0, 0] = 1e39      # finite in the file, inf as float32
  np.savez(tmp_path / "big.npz", **sd)
  # was loaded as an infinite weight (every output NaN or inf), with no error
  with pytest.raises(ValueError, match=r"layer2\.1\.conv2\.weight .* beyond float32's range "
                                       r"\(the largest magnitude 1e\+39"):
    load_resnet18(tmp_path / "big.npz", num_classes=1000)
  sd["layer2.1.conv2.weight"][0, 0, 0, 0] = 0.5        # float64 within range loads, rounded
  np.savez(tmp_path / "ok.npz", **sd)
  v = load_resnet18(tmp_path / "ok.npz", num_classes=1000)
  k = v["params"]["layer2_1"]["conv2"]["kernel"]
  assert k.dtype == jnp.float32
  np.testing.assert_array_equal(k, sd["layer2.1.conv2.weight"].astype(np.float32)
                                .transpose(2, 3, 1, 0))


def test_params_without_a_layer_of_the_model_name_the_leaves_they_lack():
  """Params without the output layer failed inside Flax (ScopeParamNotFoundError: 'Could not
  find parameter named "kernel" in scope "/out"'), in apply and in everything built on it."""
  model = jaxprune.MLP(in_features=6, hidden=(5,), out_features=3)
  params = model.init(jax.random.key(0))
  lacking = {"params": {"hidden_0": params["params"]["hidden_0"]}}
  x = jnp.ones((2, 6))
  for call in (lambda: model.apply(lacking, x), lambda: jax.jit(model.apply)(lacking, x),
               lambda: jaxprune.evaluate(model, lacking, x, jnp.arange(2))):
    with pytest.raises(ValueError, match=re.escape(
        "These params do not fit MLP: they lack params['params']['out']['bias'], "
        "params['params']['out']['kernel'], which the model has.")):
      call()


def test_params_of_other_dense_sizes_name_the_setting_that_sets_them():
  """CNN4 params of other dense sizes were told to rebuild the model with its input_shape,
  channels or out_features, never with dense (nor ResNet18's with widths): every setting but
  the nonlinearity is named."""
  model = jaxprune.CNN4(input_shape=(64, 64, 1), channels=(2, 2, 2, 2), dense=(6, 5, 4))
  other = dataclasses.replace(model, dense=(3, 5, 4)).init(jax.random.key(0))
  with pytest.raises(ValueError, match=re.escape(
      "the model's is (6,). Pass the params of this model (model.init(key), or the ones it was "
      "trained with), or build the model with the sizes these params have (its input_shape, "
      "channels, kernels, strides, paddings, pools, dense, out_features);")):
    model.apply(other, jnp.ones((1, 64, 64, 1)))


@pytest.mark.parametrize("other", [dict(out_features=5), dict(in_features=8)],
                         ids=["outputs", "inputs"])
def test_params_of_a_model_of_another_width_are_refused_naming_leaf_and_fix(other):
  """Params of an MLP with another output (or input) width failed inside Flax with its
  ScopeParamShapeError in apply, fit, evaluate, activations and the GA, with no word on what
  to do; every one of them now names the leaf, both shapes and the fix."""
  model = jaxprune.MLP(in_features=6, hidden=(12,), out_features=3)
  params = dataclasses.replace(model, **other).init(jax.random.key(0))
  x = jnp.ones((4, 6))
  y = jnp.arange(4) % 3
  leaf = (r"params\['params'\]\['out'\]\['bias'\] has shape \(5,\), the model's is \(3,\)"
          if "out_features" in other else
          r"params\['params'\]\['hidden_0'\]\['kernel'\] has shape \(8, 12\), the model's is "
          r"\(6, 12\)")
  calls = [lambda: model.apply(params, x), lambda: model.activations(params, x, "hidden_0"),
           lambda: jaxprune.evaluate(model, params, x, y),
           lambda: jaxprune.fit(model, params, x, y, key=jax.random.key(1), epochs=1,
                                progress=False),
           lambda: jaxprune.ga.search(model, params, x, y, "hidden_0", key=jax.random.key(1),
                                      config=jaxprune.ga.GAConfig(population_size=8,
                                                                  generations=1),
                                      progress=False),
           lambda: jax.jit(model.apply)(params, x)]
  for call in calls:
    with pytest.raises(ValueError, match=r"These params do not fit MLP: " + leaf +
                       r".*model.init\(key\).*\(its in_features, hidden, out_features\)"):
      call()
