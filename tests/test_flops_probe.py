"""Probes of jaxprune.flops against FLOP counts written by hand from the shapes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune import flops as flops_lib


def _by_name(report):
  return {r["name"]: r for r in report["layers"]}


def _named_flops(apply, params, x):
  """Leaf name -> FLOPs without the XLA compile that flops_report adds."""
  from jaxprune.pruners import magnitude  # pylint: disable=g-import-not-at-top
  names = magnitude.leaf_names(params)
  got = flops_lib.leaf_flops(apply, params, x)
  return {n: {"flops": got.get(i, 0)} for i, n in enumerate(names)}


def _mlp():
  model = jaxprune.MLP(in_features=4, hidden=(8,), out_features=3)
  return model, model.init(jax.random.key(0))


def test_flax_convs_and_dense_general_match_hand_counts():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):                                               # 16x16x3
      x = nn.Conv(8, (3, 3), strides=(2, 2), padding="SAME", name="c1")(x)  # 8x8x8
      x = nn.Conv(8, (3, 3), padding="VALID", kernel_dilation=(2, 2), name="c2")(x)  # 4x4x8
      x = nn.Conv(8, (3, 3), padding=1, feature_group_count=4, name="c3")(x)  # 4x4x8
      return nn.DenseGeneral((2, 3), name="dg")(x)                          # 4x4x2x3

  x = jnp.ones((1, 16, 16, 3))
  params = Net().init(jax.random.key(0), x)
  rows = _named_flops(Net().apply, params, x)
  assert rows["params/c1/kernel"]["flops"] == 2 * (8 * 8 * 8) * (3 * 3 * 3)
  assert rows["params/c2/kernel"]["flops"] == 2 * (4 * 4 * 8) * (3 * 3 * 8)
  assert rows["params/c3/kernel"]["flops"] == 2 * (4 * 4 * 8) * (3 * 3 * 2)  # 8 in / 4 groups
  assert rows["params/dg/kernel"]["flops"] == 2 * (4 * 4 * 6) * 8
  assert all(r["flops"] == 0 for n, r in rows.items() if n.endswith("bias"))


@pytest.mark.parametrize("stride", [2, 3])
def test_conv_transpose_does_not_count_the_inserted_zeros(stride):
  """Stride = kernel, VALID: every input pixel meets every kernel tap once, so the work is
  2 x input pixels x taps x in x out; the zeros between inputs were counted (stride^2 x more)."""
  x = jnp.ones((1, 4, 5, 8))
  layer = nn.ConvTranspose(4, (stride, stride), strides=(stride, stride), padding="VALID")
  params = layer.init(jax.random.key(0), x)
  assert layer.apply(params, x).shape == (1, 4 * stride, 5 * stride, 4)
  got = flops_lib.leaf_flops(layer.apply, params, x)
  kernel = [i for i, l in enumerate(jax.tree.leaves(params)) if l.ndim == 4]
  assert got == {kernel[0]: 2 * (4 * 5) * (stride * stride) * 8 * 4}


def test_cond_counts_the_branch_that_runs_not_both():
  def apply(p, x):
    return jax.lax.cond(x.sum() > 0, lambda h: h @ p["w"], lambda h: -(h @ p["w"]), x)
  assert flops_lib.leaf_flops(apply, {"w": jnp.ones((4, 5))}, jnp.ones((1, 4))) == {0: 2 * 4 * 5}


def test_switch_takes_each_leafs_most_expensive_branch():
  def apply(p, x):
    return jax.lax.switch(jnp.int32(x.sum() > 0),
                          [lambda h: h @ p["a"] @ p["b"], lambda h: h @ p["a"] @ p["a"] @ p["b"]],
                          x)
  got = flops_lib.leaf_flops(apply, {"a": jnp.ones((4, 4)), "b": jnp.ones((4, 2))},
                             jnp.ones((1, 4)))
  assert got == {0: 2 * (2 * 16), 1: 2 * 8}   # a twice on branch 1; b once on either


def test_masks_applied_inside_apply_still_count():
  """apply(apply_masks(params, masks), x) read the kernels through where(): 0 FLOPs."""
  model, params = _mlp()
  masks = jaxprune.ones_like(params)
  rep = flops_lib.flops_report(lambda p, x: model.apply(jaxprune.apply_masks(p, masks), x),
                               params, jnp.ones((1, 4)))
  rows = _by_name(rep)
  assert rows["params/hidden_0/kernel"]["flops"] == 2 * 4 * 8
  assert rows["params/out/kernel"]["flops"] == 2 * 8 * 3
  assert rep["total"]["flops"] == 112


def test_views_of_a_leaf_count_transpose_squeeze_slice_and_stacked_layers():
  x = jnp.ones((1, 4))
  stacked = {"w": jnp.ones((3, 4, 4))}

  def loop(p, h):
    for i in range(3):
      h = h @ p["w"][i]
    return h

  assert flops_lib.leaf_flops(loop, stacked, x) == {0: 3 * 2 * 16}
  fori = lambda p, h: jax.lax.fori_loop(0, 3, lambda i, a: a @ p["w"][i], h)
  assert flops_lib.leaf_flops(fori, stacked, x) == {0: 3 * 2 * 16}
  assert flops_lib.leaf_flops(lambda p, h: h @ jnp.squeeze(p["w"][:1], 0), stacked, x) == {
      0: 2 * 16}
  assert flops_lib.leaf_flops(lambda p, h: h @ p["w"][0, :, :2], stacked, x) == {0: 2 * 8}
  assert flops_lib.leaf_flops(lambda p, h: (p["w"][0].T @ h.T).T, stacked, x) == {0: 2 * 16}


def test_a_kernel_scaled_by_a_smaller_leaf_keeps_its_flops():
  def folded(p, x):                      # batch norm folded into the conv kernel
    k = (p["scale"] / jnp.sqrt(p["var"] + 1e-5)) * p["kernel"]
    return jax.lax.conv_general_dilated(x, k, (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
  params = {"kernel": jnp.ones((3, 3, 2, 4)), "scale": jnp.ones(4), "var": jnp.ones(4)}
  got = flops_lib.leaf_flops(folded, params, jnp.ones((1, 5, 5, 2)))
  assert got == {0: 2 * (3 * 3 * 4) * (3 * 3 * 2)}


def test_input_added_to_a_leaf_does_not_take_the_next_layers_flops():
  def apply(p, x):                       # a positional table the shape of x, then a dense layer
    return (x + p["pos"][: x.shape[0]]) @ p["w"]
  got = flops_lib.leaf_flops(apply, {"pos": jnp.ones((7, 4)), "w": jnp.ones((4, 3))},
                             jnp.ones((5, 4)))
  assert got == {1: 2 * 5 * 4 * 3}


def test_scan_layer_twice_and_attention():
  class Cell(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      return jnp.tanh(nn.Dense(4, name="d")(h)), None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):                # x: (1, 5, 4)
      h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8, out_features=4,
                                          name="att")(x)
      d = nn.Dense(4, name="twice")
      h = d(d(h[:, 0]))
      h, _ = nn.scan(Cell, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)(name="s")(h, None)
      return h

  x = jnp.ones((1, 5, 4))
  params = Net().init(jax.random.key(0), x)
  rows = _named_flops(Net().apply, params, x)
  for k in ("query", "key", "value"):
    assert rows[f"params/att/{k}/kernel"]["flops"] == 2 * 5 * 4 * 8
  assert rows["params/att/out/kernel"]["flops"] == 2 * 5 * 8 * 4
  assert rows["params/twice/kernel"]["flops"] == 2 * (2 * 4 * 4)
  assert rows["params/s/d/kernel"]["flops"] == 3 * (2 * 4 * 4)   # once per iteration


def test_tied_embedding_counts_its_attend():
  class Tied(nn.Module):
    @nn.compact
    def __call__(self, ids):
      emb = nn.Embed(10, 4, name="emb")
      return emb.attend(nn.Dense(4, name="d")(emb(ids)))

  ids = jnp.array([[1, 2, 3]])
  tparams = Tied().init(jax.random.key(0), ids)
  rows = _by_name(flops_lib.flops_report(Tied().apply, tparams, ids))
  assert rows["params/d/kernel"]["flops"] == 2 * 3 * 4 * 4
  assert rows["params/emb/embedding"]["flops"] == 2 * 3 * 4 * 10


def test_masked_report_whole_unit_and_whole_leaf_removed():
  model, params = _mlp()
  masks = jaxprune.ones_like(params)
  p = masks["params"]
  p["hidden_0"]["kernel"] = p["hidden_0"]["kernel"].at[:, 2].set(False)   # unit 2's inputs
  p["hidden_0"]["bias"] = p["hidden_0"]["bias"].at[2].set(False)
  p["out"]["kernel"] = jnp.zeros((8, 3), bool)                            # every weight
  rows = _by_name(flops_lib.flops_report(model, params, masks=masks))
  hid, out = rows["params/hidden_0/kernel"], rows["params/out/kernel"]
  assert (hid["nonzero"], hid["masked_flops"]) == (28, 2 * 4 * 7)
  assert (out["nonzero"], out["masked_flops"]) == (0, 0)
  assert rows["params/hidden_0/bias"]["nonzero"] == 7


def test_dtypes_do_not_change_counts():
  model, params = _mlp()
  for dt in (jnp.bfloat16, jnp.float16):
    rep = flops_lib.flops_report(model, jax.tree.map(lambda a: a.astype(dt), params))
    assert (rep["total"]["flops"], rep["total"]["params"]) == (112, 67)


def test_compacted_params_under_other_names_are_counted_not_a_crash():
  """A compacted network whose leaves have other names raised TypeError (None + int)."""
  model, params = _mlp()
  small = {"k": jnp.ones((4, 3))}
  rep = flops_lib.flops_report(model.apply, params, jnp.ones((1, 4)),
                               compacted=(lambda p, x: x @ p["k"], small))
  assert rep["total"]["compact_params"] == 12
  assert rep["total"]["compact_flops"] == 2 * 4 * 3
  rows = _by_name(rep)
  assert rows["params/out/kernel"]["compact_params"] == 0
  assert rows["k"]["params"] == 0 and rows["k"]["compact_params"] == 12


def test_compacted_report_matches_the_models_compaction():
  model, params = _mlp()
  units = {"hidden_0": jnp.arange(8) % 4 != 0}            # keeps 6 of 8
  rep = flops_lib.flops_report(model, params, unit_masks=units)
  small, _ = model.compact(params, units)
  assert rep["total"]["compact_params"] == sum(np.size(l) for l in jax.tree.leaves(small))
  assert rep["total"]["compact_params"] == 4 * 6 + 6 + 6 * 3 + 3
  assert rep["total"]["compact_flops"] == 2 * (4 * 6 + 6 * 3)


def _table_numbers(text):
  lines = text.splitlines()[2:]
  body = [l for l in lines if not l.startswith("XLA")]
  parse = lambda l: [int(c) for c in l.split()[-6:]]
  return [parse(l) for l in body[:-1]], parse(body[-1])


def test_format_flops_columns_add_up_to_the_total():
  """The table hid the bias rows, so its params and nonzero columns did not add up."""
  model, params = _mlp()
  units = {"hidden_0": jnp.arange(8) < 5}
  rep = flops_lib.flops_report(model, params, masks=jaxprune.expand(params, model, units),
                               unit_masks=units)
  text = flops_lib.format_flops(rep)
  rows, total = _table_numbers(text)
  assert [sum(c) for c in zip(*rows)] == total
  assert total[0] == 4 * 8 + 8 + 8 * 3 + 3


def test_params_in_the_models_place_is_a_clear_error():
  model, params = _mlp()
  with pytest.raises(TypeError, match=r"model first"):
    flops_lib.flops_report(params, model)


def test_mismatched_masks_name_the_leaf():
  model, params = _mlp()
  bad = jax.tree.map(lambda a: a[..., :1], jaxprune.ones_like(params))
  with pytest.raises(ValueError, match=r"hidden_0.*has shape"):
    flops_lib.flops_report(model, params, masks=bad)


def test_unit_masks_alone_count_in_the_masked_columns():
  """A 4-8-3 MLP with 3 of its 8 hidden units removed by unit masks (no weight masks): the
  masked counts were the dense ones (67 parameters, 112 FLOPs) while compaction counted 43 and
  70. By hand, 5 hidden units: 4*5 + 5 + 5*3 + 3 = 43 parameters, 2 * (4*5 + 5*3) = 70 FLOPs."""
  model, params = _mlp()
  units = jaxprune.unit_masks_ones(model)
  units["hidden_0"] = units["hidden_0"].at[:3].set(False)
  total = jaxprune.flops_report(model, params, unit_masks=units)["total"]
  assert (total["params"], total["flops"]) == (4 * 8 + 8 + 8 * 3 + 3, 2 * (4 * 8 + 8 * 3))
  assert total["nonzero"] == total["compact_params"] == 43
  assert total["masked_flops"] == total["compact_flops"] == 70
  # with weight masks as well, both count (logical and): the output kernel's row of hidden
  # unit 7 removed by hand takes another 3 weights and 6 FLOPs
  wm = jax.tree.map(lambda a: np.ones(np.shape(a), bool), params)
  wm["params"]["out"]["kernel"][7] = False
  total = jaxprune.flops_report(model, params, masks=wm, unit_masks=units)["total"]
  assert (total["nonzero"], total["masked_flops"]) == (40, 64)


def test_unit_masks_with_a_plain_apply_function_name_the_fix():
  model, params = _mlp()
  units = jaxprune.unit_masks_ones(model)
  with pytest.raises(ValueError, match=r"unit_masks needs a model with unit groups.*masks="):
    jaxprune.flops_report(model.apply, params, jnp.zeros((1, 4)), unit_masks=units,
                          compacted=(model.apply, params))
