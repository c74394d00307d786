"""Unit groups: views, expand, compact and the consumer algebra on hand-built params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune import units
from jaxprune.units import Slice, UnitGroup
from conftest import host_f32

pytestmark = pytest.mark.usefixtures("strict_rank")


def _params():
  a = jnp.arange(6.0).reshape(2, 3)  # producer kernel (in=2, units=3)
  b = jnp.arange(12.0).reshape(3, 4)  # consumer kernel (units=3, out=4)
  return {"params": {"a": {"kernel": a, "bias": jnp.array([1.0, 2.0, 3.0])},
                     "b": {"kernel": b, "bias": jnp.zeros(4)}}}


GROUP = UnitGroup("h", 3, (
    Slice(("params", "a", "kernel"), axis=-1, role="producer"),
    Slice(("params", "a", "bias"), axis=0, role="producer", kind="bias"),
    Slice(("params", "b", "kernel"), axis=-2, role="consumer", bias=("params", "b", "bias")),
))


def test_expand_marks_every_slice_of_removed_unit():
  p = _params()
  m = units.expand(p, {"h": GROUP}, {"h": jnp.array([True, False, True])})
  np.testing.assert_array_equal(m["params"]["a"]["kernel"], [[1, 0, 1], [1, 0, 1]])
  np.testing.assert_array_equal(m["params"]["a"]["bias"], [1, 0, 1])
  np.testing.assert_array_equal(m["params"]["b"]["kernel"][1], [0, 0, 0, 0])
  assert np.asarray(m["params"]["b"]["kernel"])[[0, 2]].all()
  assert m["params"]["b"]["bias"].all()


def test_compact_removes_exact_slices_and_does_not_mutate():
  p = _params()
  before = np.asarray(p["params"]["b"]["kernel"]).copy()
  small = units.compact(p, {"h": GROUP}, {"h": np.array([True, False, True])})
  np.testing.assert_array_equal(small["params"]["a"]["kernel"], [[0, 2], [3, 5]])
  np.testing.assert_array_equal(small["params"]["b"]["kernel"], before[[0, 2]])
  np.testing.assert_array_equal(p["params"]["b"]["kernel"], before)


def test_compact_and_uncompact_keep_each_leaf_kind_and_dtype():
  # NumPy float64 params (x64 off): every leaf, cut or not, stays a float64 NumPy array; jax
  # arrays stay jax arrays. (Cut leaves used to come back as float32 jax arrays next to uncut
  # float64 NumPy ones.)
  import jax
  host = jax.tree.map(lambda a: np.asarray(a, np.float64), _params())
  keep = {"h": np.array([True, False, True])}
  small = units.compact(host, {"h": GROUP}, keep)
  for leaf in jax.tree.leaves(small):
    assert type(leaf) is np.ndarray and leaf.dtype == np.float64
  back = units.uncompact(small, host, {"h": GROUP}, keep)
  for leaf, full in zip(jax.tree.leaves(back), jax.tree.leaves(host)):
    assert type(leaf) is np.ndarray and leaf.dtype == np.float64 and leaf.shape == full.shape
  np.testing.assert_array_equal(back["params"]["a"]["kernel"], [[0, 0, 2], [3, 0, 5]])
  dev = units.compact(_params(), {"h": GROUP}, keep)
  assert all(isinstance(leaf, jax.Array) and leaf.dtype == jnp.float32
             for leaf in jax.tree.leaves(dev))
  # uncompact also runs under a caller's jit (the masks are concrete there).
  jitted = jax.jit(lambda sp: units.uncompact(sp, _params(), {"h": GROUP}, keep))(dev)
  np.testing.assert_array_equal(jitted["params"]["b"]["kernel"][1], np.zeros(4))
  np.testing.assert_array_equal(jitted["params"]["b"]["kernel"][2], _params()["params"]["b"]["kernel"][2])


def test_flatten_view_channel_owns_strided_rows():
  # A dense layer after flatten of a (2 positions, 3 channels) map: rows c, c+3 are channel c.
  k = jnp.arange(6.0 * 2).reshape(6, 2)
  p = {"params": {"d": {"kernel": k}}}
  s = Slice(("params", "d", "kernel"), axis=1, role="consumer", view=(2, 3, 2))
  g = UnitGroup("c", 3, (s,), kind="conv")
  small = units.compact(p, {"c": g}, {"c": np.array([False, True, False])})
  np.testing.assert_array_equal(small["params"]["d"]["kernel"], np.asarray(k)[[1, 4]])
  m = units.expand(p, {"c": g}, {"c": jnp.array([False, True, False])})
  np.testing.assert_array_equal(m["params"]["d"]["kernel"][:, 0], [0, 1, 0, 0, 1, 0])


def test_flatten_view_with_single_position():
  k = jnp.arange(6.0).reshape(3, 2)
  s = Slice(("params", "d", "kernel"), axis=1, role="consumer", view=(1, 3, 2))
  g = UnitGroup("c", 3, (s,))
  small = units.compact({"params": {"d": {"kernel": k}}}, {"c": g}, {"c": np.array([1, 0, 1])})
  np.testing.assert_array_equal(small["params"]["d"]["kernel"], np.asarray(k)[[0, 2]])


def test_redistribute_merge_and_constant_folding():
  p = _params()
  t = jnp.eye(3).at[0, 2].add(1.0)  # merge unit 2 into unit 0
  out = units.redistribute(p, GROUP, t, constants=jnp.array([0.0, 0.5, 0.0]))
  b = np.asarray(p["params"]["b"]["kernel"])
  np.testing.assert_allclose(out["params"]["b"]["kernel"][0], b[0] + b[2])
  np.testing.assert_allclose(out["params"]["b"]["kernel"][1:], b[1:])
  np.testing.assert_allclose(out["params"]["b"]["bias"], 0.5 * b[1])


def test_errors_name_the_problem():
  p = _params()
  with pytest.raises(KeyError, match="Unit mask 'nope' names no unit group.*\\['h'\\]") as e:
    units.expand(p, {"h": GROUP}, {"nope": jnp.ones(3, bool)})
  assert "found no unit group" not in str(e.value)
  # (a probe's finding) a model traced in training mode has no groups: say where to look
  with pytest.raises(KeyError, match="found no unit group: target.explain\\(\\).*evaluation mode"):
    units.expand(p, {}, {"h": jnp.ones(3, bool)})
  with pytest.raises(ValueError, match="needs shape \\(3,\\)"):
    units.expand(p, {"h": GROUP}, {"h": jnp.ones(4, bool)})
  with pytest.raises(ValueError, match="removes every unit"):
    units.compact(p, {"h": GROUP}, {"h": np.zeros(3, bool)})
  with pytest.raises(KeyError, match="params/zz/kernel does not exist"):
    units.get_path(p, ("params", "zz", "kernel"))
  with pytest.raises(ValueError, match="role"):
    Slice(("a",), 0, role="input")


def test_constant_fold_is_exact_for_valid_conv_consumer_and_flagged_for_same():
  import jax
  import jaxprune
  model = jaxprune.LeNet(input_shape=(20, 16, 1))
  params = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (3, 20, 16, 1))
  g = model.groups["conv_0"]
  # Make channel 3 constant (zero kernel, bias 0.7: relu(0.7) = 0.7 everywhere), fold, remove.
  k = params["params"]["conv_0"]["kernel"].at[..., 3].set(0.0)
  b = params["params"]["conv_0"]["bias"].at[3].set(0.7)
  params = units.set_path(units.set_path(params, ("params", "conv_0", "kernel"), k),
                          ("params", "conv_0", "bias"), b)
  folded = units.redistribute(params, g, jnp.eye(16), constants=jnp.zeros(16).at[3].set(0.7))
  keep = jnp.ones(16, bool).at[3].set(False)
  masked = jaxprune.apply_masks(folded, jaxprune.expand(folded, model, {"conv_0": keep}))
  np.testing.assert_allclose(model.apply(masked, x), model.apply(params, x), rtol=1e-5, atol=1e-5)
  assert g.exact_constant_fold
  cnn = jaxprune.CNN4()
  assert not cnn.groups["conv_1"].exact_constant_fold  # read by a zero-padded 'SAME' conv
  assert cnn.groups["conv_3"].exact_constant_fold and cnn.groups["dense_0"].exact_constant_fold


def test_compact_and_uncompact_take_the_target_as_well_as_its_groups():
  """jaxprune.compact / uncompact(..., model, masks) failed with "argument of type 'MLP' is
  not iterable"; they read the target's groups now, as expand takes a target."""
  import jax
  import jaxprune
  model = jaxprune.MLP(in_features=3, hidden=(5,), out_features=2)
  params = model.init(jax.random.key(0))
  keep = {"hidden_0": jnp.array([True, False, True, True, False])}
  small = jaxprune.compact(params, model, keep)
  assert small["params"]["hidden_0"]["kernel"].shape == (3, 3)
  by_target = units.uncompact(small, params, model, keep)
  by_groups = units.uncompact(small, params, model.groups, keep)
  for a, b in zip(jax.tree.leaves(by_target), jax.tree.leaves(by_groups)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert by_target["params"]["hidden_0"]["kernel"].shape == (3, 5)
  # Params where the target belongs: the error names the function and the fix (it was a
  # KeyError saying "this model's groups are ['params']").
  for name, call in (("compact", lambda: jaxprune.compact(params, params, keep)),
                     ("uncompact", lambda: units.uncompact(small, params, params, keep)),
                     ("compact", lambda: units.compact(params, [model], keep))):
    with pytest.raises(TypeError, match=f"^{name} takes a pruning target.*"):
      call()


def test_uncompact_checks_the_small_params_against_the_masks():
  """Unit masks other than compact's raised NumPy's 'could not be broadcast' (more units kept)
  or returned params still small (no masks): both now name the leaf and the fix."""
  import jax
  import jaxprune
  model = jaxprune.MLP(in_features=5, hidden=(6,), out_features=3)
  params = model.init(jax.random.key(0))
  keep = {"hidden_0": np.array([1, 0, 1, 1, 0, 1], bool)}
  small = jaxprune.compact(params, model, keep)
  back = units.uncompact(small, params, model, keep)
  assert jax.tree.map(np.shape, back) == jax.tree.map(np.shape, params)
  with pytest.raises(ValueError, match=r"small_params leaf params/hidden_0/kernel has shape "
                     r"\(5, 4\), but these unit masks keep \(5, 5\).*given to compact"):
    units.uncompact(small, params, model, {"hidden_0": np.array([1, 1, 1, 1, 0, 1], bool)})
  with pytest.raises(ValueError, match=r"leaf params/hidden_0/bias comes back "
                     r"with shape \(4,\), not params' \(6,\)"):
    units.uncompact(small, params, model, {})
  with pytest.raises(ValueError, match="small_params hold 3 leaves, params 4"):
    no_bias = {"params": {**small["params"], "out": {"kernel": small["params"]["out"]["kernel"]}}}
    units.uncompact(no_bias, params, model, keep)


def test_bias_contribution_with_outputs_first_and_a_scalar_bias():
  """A declared OIHW consumer (outputs first) with an (O,) bias takes the contribution summed
  over its window; a scalar bias cannot take a contribution with several outputs."""
  import jax.numpy as jnp
  k = host_f32(np.random.default_rng(0).normal(size=(3, 4, 2, 2)))
  s = units.Slice(("k",), axis=1, role="consumer", bias=("b",))
  c = jnp.array([0.0, 1.0, 0.0, 0.0])
  got = units.bias_contribution(c, units.unit_view(k, s), (3,), s, k)
  np.testing.assert_allclose(got, np.asarray(k)[:, 1].sum((1, 2)), rtol=1e-6)
  dense = jnp.ones((4, 5))
  d = units.Slice(("w",), axis=0, role="consumer", bias=("c",))
  with pytest.raises(ValueError, match=r"bias of shape \(\) does not match"):
    units.bias_contribution(c, units.unit_view(dense, d), (), d, dense)
  np.testing.assert_allclose(units.bias_contribution(c, units.unit_view(dense[:, :1], d), (), d,
                                                     dense[:, :1]), 1.0)   # one output


def test_a_float_unit_mask_is_refused_naming_its_own_dtype():
  with pytest.raises(ValueError, match="has dtype float64; unit masks must be bool"):
    units.bool_unit_mask(np.array([0.0, 1.0]), "g")   # not 'float32' (JAX's canonical dtype)
  assert units.bool_unit_mask(np.array([0, 1, 1]), "g").tolist() == [False, True, True]
  # strings and objects: JAX's own "not a valid JAX array type" named no mask
  for mask, shown in ((np.array(list("101")), "<U1"), (["a", "b"], "<U1"),
                      (np.array([None, 1], object), "object")):
    with pytest.raises(ValueError, match=f"Unit mask 'g' has dtype {shown}; unit masks must be "
                       "bool"):
      units.bool_unit_mask(mask, "g")


def test_unit_masks_as_python_sequences_work_everywhere_compact_takes_them():
  """expand and check_unit_masks raised JAX's raw 'Cannot determine dtype' for a list or tuple
  that compact and count_units took."""
  model = jaxprune.MLP(in_features=3, hidden=(5,), out_features=2)
  params = model.init(jax.random.key(0))
  want = jaxprune.expand(params, model, {"hidden_0": np.array([True, False, True, True, True])})
  for mask in ([True, False, True, True, True], (1, 0, 1, 1, 1)):
    jaxprune.check_unit_masks(model, {"hidden_0": mask})
    got = jaxprune.expand(params, model, {"hidden_0": mask})
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  with pytest.raises(ValueError, match="holds \\[2\\]; an integer unit mask may hold only 0 and 1"):
    jaxprune.expand(params, model, {"hidden_0": [1, 2, 1, 1, 1]})
  with pytest.raises(ValueError, match="has dtype float64; unit masks must be bool"):
    jaxprune.check_unit_masks(model, {"hidden_0": [1.0, 0.0, 1.0, 1.0, 1.0]})
