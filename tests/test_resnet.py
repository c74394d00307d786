"""Tests for jaxprune.models.resnet: ResNet-18, its unit groups, training mode and the loader."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import masks as masks_lib
from jaxprune import units as units_lib
from jaxprune.models.resnet import (BLOCK_NAMES, ResNet18, WeightsShapeError, load_resnet18,
                                    save_resnet18)

SHAPE = (32, 32, 3)


def torchvision_shapes(num_classes=1000):
  """torchvision resnet18's state-dict shapes, written out independently of the module."""
  shapes = {"conv1.weight": (64, 3, 7, 7)}

  def bn(prefix, c):
    for k in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{prefix}.{k}"] = (c,)
    shapes[f"{prefix}.num_batches_tracked"] = ()

  bn("bn1", 64)
  cin = 64
  for s, c in enumerate((64, 128, 256, 512), start=1):
    for b in range(2):
      t = f"layer{s}.{b}"
      shapes[f"{t}.conv1.weight"] = (c, cin, 3, 3)
      bn(f"{t}.bn1", c)
      shapes[f"{t}.conv2.weight"] = (c, c, 3, 3)
      bn(f"{t}.bn2", c)
      if s > 1 and b == 0:
        shapes[f"{t}.downsample.0.weight"] = (c, cin, 1, 1)
        bn(f"{t}.downsample.1", c)
      cin = c
  shapes["fc.weight"] = (num_classes, 512)
  shapes["fc.bias"] = (num_classes,)
  return shapes


def random_state_dict(seed=0, num_classes=1000):
  rng = np.random.default_rng(seed)
  sd = {}
  for k, shape in torchvision_shapes(num_classes).items():
    if k.endswith("num_batches_tracked"):
      sd[k] = np.array(7, np.int64)
    elif k.endswith("running_var"):
      sd[k] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      sd[k] = rng.normal(0.0, 0.1, shape).astype(np.float32)
  return sd


@pytest.fixture(scope="module")
def model():
  return ResNet18(input_shape=SHAPE)


@pytest.fixture(scope="module")
def x():
  return jax.random.normal(jax.random.key(1), (4,) + SHAPE)


@pytest.fixture(scope="module")
def params(model):
  return model.init(jax.random.key(0))


@pytest.fixture(scope="module")
def train_fn(model):
  return jax.jit(model.apply_train)


@pytest.fixture(scope="module")
def trained(params, train_fn, x):
  """Params after one training-mode pass, with random BN affine params: non-trivial BN."""
  _, p = train_fn(params, x)
  rng = np.random.default_rng(2)

  def perturb(path, leaf):
    names = [getattr(k, "key", None) for k in path]
    if names[-1] == "scale":
      return leaf * rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if names[-1] == "bias" and "fc" not in names:
      return leaf + rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)
    return leaf

  return {"params": jax.tree_util.tree_map_with_path(perturb, p["params"]),
          "batch_stats": p["batch_stats"]}


@pytest.fixture(scope="module")
def apply_fn(model):
  return jax.jit(model.apply)


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("resnet") / "resnet18.npz"
  sd = random_state_dict()
  np.savez(path, **sd)
  return path, sd


# ----------------------------------------------------------------------------- architecture


def test_output_shape_and_feature_map(model, params, apply_fn, x):
  assert apply_fn(params, x).shape == (4, 7)
  assert ResNet18().feature_map_shape() == (7, 7)     # 224 -> 7, as in torchvision
  assert model.feature_map_shape() == (1, 1)
  assert ResNet18(input_shape=(64, 48, 3)).feature_map_shape() == (2, 2)
  assert params["params"]["conv1"]["kernel"].shape == (7, 7, 3, 64)
  assert "bias" not in params["params"]["conv1"]
  assert params["params"]["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 64, 128)
  assert "downsample_conv" not in params["params"]["layer1_0"]
  assert "downsample_conv" not in params["params"]["layer2_1"]
  assert params["params"]["fc"]["kernel"].shape == (512, 7)
  n = model.param_count(params)
  assert n == 11_689_512 - 513 * 1000 + 513 * 7   # torchvision's count, with a 7-class head


def test_bad_configuration_and_input(model, params):
  with pytest.raises(ValueError, match="3 channels"):
    ResNet18(input_shape=(32, 32, 1))
  with pytest.raises(ValueError, match="one entry per basic block"):
    ResNet18(widths=(64,) * 7)
  with pytest.raises(ValueError, match="positive"):
    ResNet18(widths=(64, 0, 128, 128, 256, 256, 512, 512))
  with pytest.raises(ValueError, match=r"\(N, 32, 32, 3\)"):
    model.apply(params, jnp.zeros((2, 32, 32, 1)))
  with pytest.raises(KeyError, match="layer5_0"):
    model.resize({"layer5_0": 3})


def test_groups(model, params):
  groups = model.groups
  assert tuple(groups) == BLOCK_NAMES
  assert [g.size for g in groups.values()] == [64, 64, 128, 128, 256, 256, 512, 512]
  for name, g in groups.items():
    assert g.activation == "relu" and g.kind == "conv"
    assert len(g.producers) == 5 and len(g.consumers) == 1
    assert g.consumers[0].bias is None
    assert {s.path[0] for s in g.producers} == {"params", "batch_stats"}
    for s in g.slices:
      assert units_lib.unit_view(units_lib.get_path(params, s.path), s).shape[0] == g.size
  small = model.resize({"layer3_1": 5, "layer1_0": 2})
  assert small.widths == (2, 64, 128, 128, 256, 5, 512, 512)
  assert small.groups["layer3_1"].size == 5


def test_apply_train_updates_batch_stats(params, apply_fn, train_fn, x):
  logits, new = train_fn(params, x)
  assert logits.shape == (4, 7)
  assert jax.tree.structure(new) == jax.tree.structure(params)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new["params"], params["params"])
  # The stem's running mean moves by momentum 0.1 (torch) towards the batch mean.
  k = params["params"]["conv1"]["kernel"]
  h = jax.lax.conv_general_dilated(x, k, (2, 2), ((3, 3), (3, 3)),
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  old = params["batch_stats"]["bn1"]["mean"]
  np.testing.assert_allclose(new["batch_stats"]["bn1"]["mean"],
                             0.9 * old + 0.1 * h.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new["batch_stats"],
                         params["batch_stats"])
  assert all(jax.tree.leaves(changed))
  # The input is untouched and inference mode differs from training mode.
  assert np.all(np.asarray(params["batch_stats"]["bn1"]["var"]) == 1.0)
  assert not np.allclose(apply_fn(new, x), logits)


def test_activations_with_batch_stats(model, trained, apply_fn, x):
  out, acts = model.apply_with_activations(trained, x, ["layer1_0", "layer4_1"])
  np.testing.assert_allclose(out, apply_fn(trained, x), rtol=1e-5, atol=1e-5)
  assert acts["layer1_0"].shape == (4, 8, 8, 64)
  assert acts["layer4_1"].shape == (4, 1, 1, 512)
  assert float(acts["layer1_0"].min()) == 0.0 and float(acts["layer1_0"].max()) > 0.0
  with pytest.raises(KeyError, match="layer9_9"):
    model.activations(trained, x, "layer9_9")


# ----------------------------------------------------------------------------- masking / compaction


def random_unit_masks(model, seed):
  rng = np.random.default_rng(seed)
  out = {}
  for name in ("layer1_0", "layer2_0", "layer3_1", "layer4_1"):
    m = rng.random(model.groups[name].size) < 0.5
    m[rng.integers(m.size)] = True
    out[name] = jnp.asarray(m)
  return out


@pytest.mark.parametrize("seed", [0, 1])
def test_masked_equals_compacted(model, trained, apply_fn, train_fn, x, seed):
  units = random_unit_masks(model, seed)
  wmask = masks_lib.expand(trained, model, units)
  masked = masks_lib.apply_masks(trained, wmask)
  # every producer slice of a removed unit is zero, batch stats included
  removed = ~np.asarray(units["layer2_0"])
  for key in ("mean", "var"):
    assert np.all(np.asarray(masked["batch_stats"]["layer2_0"]["bn1"][key])[removed] == 0)
  assert np.all(np.asarray(masked["params"]["layer2_0"]["conv2"]["kernel"])[:, :, removed] == 0)

  small, small_model = model.compact(trained, units)
  assert small_model.groups["layer2_0"].size == int(np.sum(units["layer2_0"]))
  out_full = apply_fn(trained, x)
  out_masked = apply_fn(masked, x)
  out_small = jax.jit(small_model.apply)(small, x)
  scale = float(jnp.abs(out_masked).max())
  np.testing.assert_allclose(out_small, out_masked, atol=1e-5 * scale + 1e-6, rtol=1e-4)
  assert float(jnp.abs(out_full - out_masked).max()) > 1e-3 * scale  # the masks did something
  if seed:
    return
  # and in training mode (batch statistics), including the new running statistics; batch
  # statistics over 4 images of 1x1 maps amplify rounding, hence the looser tolerance.
  tr_masked, st_masked = train_fn(masked, x)
  tr_small, st_small = jax.jit(small_model.apply_train)(small, x)
  np.testing.assert_allclose(tr_small, tr_masked, atol=1e-4 * scale, rtol=1e-3)
  np.testing.assert_allclose(st_small["batch_stats"]["layer4_1"]["bn2"]["var"],
                             st_masked["batch_stats"]["layer4_1"]["bn2"]["var"], rtol=1e-4)


def test_compacted_shapes_match_resized_init(model, params):
  units = random_unit_masks(model, 3)
  small, small_model = model.compact(params, units)
  want = jax.eval_shape(small_model.init, jax.random.key(0))
  assert jax.tree.structure(small) == jax.tree.structure(want)
  jax.tree.map(lambda a, b: (a.shape == b.shape) or pytest.fail(f"{a.shape} != {b.shape}"),
               small, want)


# ----------------------------------------------------------------------------- loader


def test_load_converts_torchvision_layout_and_round_trips(sd_file, tmp_path, x):
  path, sd = sd_file
  p = load_resnet18(path, num_classes=1000)
  np.testing.assert_array_equal(p["params"]["conv1"]["kernel"],
                                sd["conv1.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(p["params"]["layer2_0"]["downsample_conv"]["kernel"][0, 0],
                                sd["layer2.0.downsample.0.weight"][:, :, 0, 0].T)
  np.testing.assert_array_equal(p["params"]["layer3_1"]["bn2"]["scale"], sd["layer3.1.bn2.weight"])
  np.testing.assert_array_equal(p["batch_stats"]["layer4_0"]["downsample_bn"]["var"],
                                sd["layer4.0.downsample.1.running_var"])
  np.testing.assert_array_equal(p["params"]["fc"]["kernel"], sd["fc.weight"].T)
  np.testing.assert_array_equal(p["params"]["fc"]["bias"], sd["fc.bias"])
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(p))
  m = ResNet18(num_classes=1000, input_shape=SHAPE)
  want = jax.eval_shape(m.init, jax.random.key(0))
  assert jax.tree.structure(p) == jax.tree.structure(want)

  out = tmp_path / "again.npz"
  save_resnet18(out, p)
  with np.load(out) as f:
    again = dict(f)
  assert set(again) == {k for k in sd if not k.endswith("num_batches_tracked")}
  for k, v in again.items():
    assert v.shape == sd[k].shape, k
    np.testing.assert_array_equal(v, sd[k], err_msg=k)


def test_load_new_head(sd_file):
  path, sd = sd_file
  p = load_resnet18(path, num_classes=7, key=jax.random.key(3))
  assert p["params"]["fc"]["kernel"].shape == (512, 7)
  assert p["params"]["fc"]["bias"].shape == (7,)
  assert float(jnp.std(p["params"]["fc"]["kernel"])) > 0.0
  np.testing.assert_array_equal(p["params"]["layer1_1"]["conv2"]["kernel"],
                                sd["layer1.1.conv2.weight"].transpose(2, 3, 1, 0))
  q = load_resnet18(path, num_classes=7, key=jax.random.key(4))
  assert not np.array_equal(p["params"]["fc"]["kernel"], q["params"]["fc"]["kernel"])
  with pytest.raises(ValueError, match="pass key="):
    load_resnet18(path, num_classes=7)


def test_load_compacted_file(model, params, tmp_path):
  units = random_unit_masks(model, 5)
  small, small_model = model.compact(params, units)
  path = tmp_path / "small.npz"
  save_resnet18(path, small)
  back = load_resnet18(path, num_classes=7, widths=small_model.widths)
  jax.tree.map(np.testing.assert_array_equal, back, small)
  with pytest.raises(ValueError, match="layer1_0|layer1.0.conv1.weight"):
    load_resnet18(path, num_classes=7)


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"nope\.npz.*np\.savez.*state_dict") as err:
    load_resnet18(tmp_path / "nope.npz")
  page = re.search(r"docs/[\w-]+\.md", str(err.value)).group()   # the page it names exists
  assert (pathlib.Path(__file__).resolve().parent.parent / page).is_file(), page
  sd = random_state_dict(num_classes=3)

  missing = dict(sd)
  del missing["layer3.1.bn2.running_var"]
  np.savez(tmp_path / "missing.npz", **missing)
  with pytest.raises(ValueError, match=r"missing keys: layer3\.1\.bn2\.running_var"):
    load_resnet18(tmp_path / "missing.npz", num_classes=3)

  extra = dict(sd, **{"head.weight": np.zeros(3, np.float32)})
  np.savez(tmp_path / "extra.npz", **extra)
  with pytest.raises(ValueError, match=r"unexpected keys: head\.weight"):
    load_resnet18(tmp_path / "extra.npz", num_classes=3)

  bad = dict(sd, **{"layer2.0.conv1.weight": np.zeros((128, 64, 5, 5), np.float32)})
  np.savez(tmp_path / "bad.npz", **bad)
  with pytest.raises(ValueError, match=r"layer2\.0\.conv1\.weight .*\(128, 64, 5, 5\).*"
                                        r"\(128, 64, 3, 3\)"):
    load_resnet18(tmp_path / "bad.npz", num_classes=3)

  nan = dict(sd, **{"bn1.weight": np.full(64, np.nan, np.float32)})
  np.savez(tmp_path / "nan.npz", **nan)
  with pytest.raises(ValueError, match=r"bn1\.weight .*NaN"):
    load_resnet18(tmp_path / "nan.npz", num_classes=3)

  with pytest.raises(ValueError, match="not ResNet-18 variables"):
    save_resnet18(tmp_path / "x.npz", {"params": {}})

  (tmp_path / "ckpt").mkdir()   # a folder (save_checkpoint's): it said IsADirectoryError
  with pytest.raises(ValueError, match=r"ckpt' is a folder, not an \.npz file\. A folder that "
                     r"jaxprune\.save_checkpoint wrote loads with jaxprune\.load_checkpoint"):
    load_resnet18(tmp_path / "ckpt")


def test_npz_round_trip_edges(model, params, tmp_path):
  """A name without .npz loads as numpy saved it; NaN params are refused before writing; a file
  that is not an archive, a compacted file at full widths and a seed for a key get errors that
  name the fix."""
  save_resnet18(tmp_path / "finetuned", params)           # numpy appends .npz
  back = load_resnet18(tmp_path / "finetuned", num_classes=7)
  jax.tree.map(np.testing.assert_array_equal, back, params)

  nan = jax.tree.map(lambda a: a, params)
  nan["params"]["conv1"]["kernel"] = nan["params"]["conv1"]["kernel"].at[0, 0, 0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match=r"NaN or infinite values at params/conv1/kernel "
                                       r"\(conv1\.weight\); nothing was written"):
    save_resnet18(tmp_path / "nan.npz", nan)
  assert not (tmp_path / "nan.npz").exists()

  (tmp_path / "junk.npz").write_bytes(b"not a zip")
  with pytest.raises(ValueError, match=r"junk\.npz' is not a readable \.npz archive") as err:
    load_resnet18(tmp_path / "junk.npz")
  assert "allow_pickle" not in str(err.value)

  small, small_model = model.compact(params, random_unit_masks(model, 2))
  save_resnet18(tmp_path / "small.npz", small)
  with pytest.raises(ValueError, match=re.escape(
      f"load_resnet18(path, widths={small_model.widths})")):
    load_resnet18(tmp_path / "small.npz", num_classes=7)

  with pytest.raises(TypeError, match=r"key must be a PRNG key made by jax\.random\.key"):
    load_resnet18(tmp_path / "finetuned.npz", num_classes=3, key=0)


def test_bfloat16_params_save_as_float32_and_a_raw_byte_file_is_named(tmp_path):
  """bfloat16 params were written as raw 2-byte voids (neither NumPy nor torch reads them) and
  load_resnet18 then failed inside np.isfinite; they are written as float32 (exactly), and a
  file holding arrays that are not numbers is named with the fix."""
  model = ResNet18(input_shape=SHAPE, widths=(4,) * 8)
  params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), model.init(jax.random.key(0)))
  save_resnet18(tmp_path / "bf16.npz", params)
  with np.load(tmp_path / "bf16.npz") as f:
    assert f["conv1.weight"].dtype == np.float32
  back = load_resnet18(tmp_path / "bf16.npz", num_classes=model.num_classes, widths=model.widths)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.float32))
  with np.load(tmp_path / "bf16.npz") as f:
    raw = dict(f)
  raw["conv1.weight"] = raw["conv1.weight"].astype(jnp.bfloat16)   # what the old save wrote
  np.savez(tmp_path / "raw.npz", **raw)
  with pytest.raises(ValueError, match=r"conv1\.weight .* not numbers NumPy can read"):
    load_resnet18(tmp_path / "raw.npz", num_classes=model.num_classes, widths=model.widths)


# ----------------------------------------------------------------------------- probe mends


def test_too_small_inputs_name_the_computed_minimum():
  """'too small for this network ... Use larger images' gave no size; the minimum is computed
  from the layers (and checked here against a search over sizes)."""
  from jaxprune.models.cnn import CNN4, LeNet  # pylint: disable=import-outside-toplevel

  def smallest(make):
    n = 1
    while True:
      try:
        make(n)
        return n
      except ValueError:
        n += 1

  cases = [(LeNet, 1, {}), (CNN4, 3, {}), (LeNet, 1, {"kernels": (3, 7)}),
           (CNN4, 3, {"strides": (2, 2, 1, 1)})]
  for cls, c, kw in cases:
    m = smallest(lambda n, cls=cls, c=c, kw=kw: cls(input_shape=(n, 200, c), **kw))
    assert cls(input_shape=(m, m, c), **kw).min_input_size() == (m, m), (cls, kw)
    with pytest.raises(ValueError, match=rf"too small for {cls.__name__}: .*needs inputs of "
                       rf"at least {m}x{m} \(height x width\)"):
      cls(input_shape=(m - 1, 200, c), **kw)
  assert LeNet().min_input_size() == (16, 16) and CNN4().min_input_size() == (59, 59)
  assert ResNet18(input_shape=(1, 1, 3)).feature_map_shape() == (1, 1)
  with pytest.raises(ValueError, match=r"too small for ResNet-18: .*at least 1x1"):
    ResNet18(input_shape=(0, 32, 3))


def test_negative_running_var_is_refused(tmp_path, model, params):
  """A file with a negative running_var loaded and gave NaN logits."""
  sd = random_state_dict()
  sd["layer2.1.bn1.running_var"][3] = -0.5
  np.savez(tmp_path / "neg.npz", **sd)
  with pytest.raises(ValueError, match=r"layer2\.1\.bn1\.running_var in .* holds negative "
                     r"values \(1 of 128, the smallest -0\.5\).*file is corrupt"):
    load_resnet18(tmp_path / "neg.npz", num_classes=1000)
  bad = jax.tree.map(lambda a: a, params)
  bad["batch_stats"]["bn1"]["var"] = -bad["batch_stats"]["bn1"]["var"]
  with pytest.raises(ValueError, match=r"negative running variances at batch_stats/bn1/var "
                     r"\(bn1\.running_var\); nothing was written"):
    save_resnet18(tmp_path / "neg_saved.npz", bad)
  assert not (tmp_path / "neg_saved.npz").exists()


def test_npy_files_are_named_as_single_arrays(tmp_path):
  """The '.npy' message could not be reached: np.load gave an ndarray, which the 'with' failed
  on, and the file was called an unreadable archive."""
  np.save(tmp_path / "one.npy", np.zeros(3, np.float32))
  np.save(tmp_path / "dict.npy", random_state_dict(num_classes=3))   # np.save of the dict
  for name in ("one.npy", "dict.npy"):
    with pytest.raises(ValueError, match=rf"{name}' holds a single array \(a \.npy file, as "
                       r"np\.save writes\), not an archive.*np\.savez\(path, \*\*state_dict\)"):
      load_resnet18(tmp_path / name)


def test_shape_errors_give_advice_for_their_cause(tmp_path, model, params):
  """Every shape error ended 'load_resnet18(path, widths=small_model.widths)', also for
  mistakes that have nothing to do with compaction."""
  sd = random_state_dict(num_classes=7)

  def error(**changed):
    np.savez(tmp_path / "f.npz", **dict(sd, **changed))
    with pytest.raises(ValueError) as e:
      load_resnet18(tmp_path / "f.npz", num_classes=7)
    return str(e.value)

  hwio = error(**{"layer3.1.conv1.weight": np.transpose(sd["layer3.1.conv1.weight"],
                                                        (2, 3, 1, 0))})
  assert re.search(r"layer3\.1\.conv1\.weight .* has shape \(3, 3, 256, 256\); ResNet-18 "
                   r"expects \(256, 256, 3, 3\)\. It looks like a Flax/TensorFlow HWIO kernel",
                   hwio), hwio
  bias = error(**{"fc.bias": sd["fc.bias"][:5]})
  assert "The head's bias has 5 entries but fc.weight has 7 rows" in bias, bias
  fc = error(**{"fc.weight": sd["fc.weight"].T})
  assert "It looks stored (in, out)" in fc, fc
  other = error(**{"layer3.1.conv1.weight": sd["layer3.1.conv1.weight"][:, :, :1, :1]})
  assert "does not hold torchvision's resnet18 layout" in other, other
  stem = error(**{"conv1.weight": sd["conv1.weight"][:59]})   # a residual channel removed
  assert "stem or stage (residual) channels are (59, 128, 256, 512)" in stem, stem
  for text in (hwio, bias, fc, other, stem):
    assert "widths=" not in text.split("expects")[-1], text   # no compaction advice
  # A compacted model's file: the advice names the widths it holds, and so does the error.
  small, small_model = model.compact(params, random_unit_masks(model, 3))
  save_resnet18(tmp_path / "small.npz", small)
  with pytest.raises(WeightsShapeError, match=re.escape(
      f"load_resnet18(path, widths={small_model.widths})")) as e:
    load_resnet18(tmp_path / "small.npz", num_classes=7)
  assert e.value.file_widths == small_model.widths and e.value.key.endswith("conv1.weight")
  assert "load_resnet18" not in e.value.reason


def test_save_refuses_params_compacted_through_residual_groups(tmp_path):
  """save_resnet18 wrote params whose stem/residual channels a traced target had compacted,
  and load_resnet18 then refused the file (with advice no traced target can follow)."""
  model = ResNet18(input_shape=SHAPE, widths=(4,) * 8)
  params = model.init(jax.random.key(0))
  target = model.traced()
  for group in ("conv1", "layer3_0/conv2"):    # the stem + layer1, and stage 3's residual
    keep = {n: np.ones(g.size, bool) for n, g in target.groups.items()}
    keep[group][:5] = False
    small, _ = target.compact(params, keep)
    with pytest.raises(ValueError, match=r"the stem or stage \(residual\) channels are "
                       r"\(\d+, \d+, \d+, \d+\), not ResNet-18's \(64, 128, 256, 512\).*"
                       r"nothing was written.*save_checkpoint"):
      save_resnet18(tmp_path / "residual.npz", small)
    assert not (tmp_path / "residual.npz").exists()
  # A traced block group (a block's inner width) is what ResNet18.compact does: saved, loaded.
  keep = {n: np.ones(g.size, bool) for n, g in target.groups.items()}
  keep["layer1_0/conv1"][:2] = False
  small, _ = target.compact(params, keep)
  save_resnet18(tmp_path / "block.npz", small)
  back = load_resnet18(tmp_path / "block.npz", num_classes=7, widths=(2,) + (4,) * 7)
  jax.tree.map(np.testing.assert_array_equal, back, small)
