"""Weight masks and unit masks: creation, checks, application, counting, summaries."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune

pytestmark = pytest.mark.usefixtures("strict_rank")

MODEL = jaxprune.MLP(in_features=4, hidden=(6,), out_features=3)


@pytest.fixture(scope="module")
def params():
  return MODEL.init(jax.random.key(0))


def test_ones_and_counts(params):
  wm = jaxprune.ones_like(params)
  assert jaxprune.count_weights(wm) == (4 * 6 + 6 + 6 * 3 + 3,) * 2
  um = jaxprune.unit_masks_ones(MODEL)
  assert jaxprune.count_units(um) == {"hidden_0": (6, 6)}
  assert jaxprune.sparsity(wm) == 0.0


def test_expand_counts_and_apply(params):
  um = {"hidden_0": jnp.array([True, False, True, True, False, True])}
  wm = jaxprune.expand(params, MODEL, um)
  # Two units removed: 2 kernel columns of 4, 2 biases, 2 rows of 3 outgoing weights.
  assert jaxprune.count_weights(wm) == (51 - 2 * (4 + 1 + 3), 51)
  masked = jaxprune.apply_masks(params, wm)
  assert float(jnp.abs(masked["params"]["hidden_0"]["kernel"][:, 1]).sum()) == 0.0
  np.testing.assert_array_equal(masked["params"]["out"]["bias"], params["params"]["out"]["bias"])
  text = jaxprune.summary(wm, um)
  assert "params/hidden_0/kernel" in text and "33.3%" in text and "units hidden_0: 4/6" in text


def test_expand_is_jittable_and_combines_with_existing(params):
  base = jax.tree.map(lambda m: m.at[..., 0].set(False) if m.ndim == 2 else m,
                      jaxprune.ones_like(params))
  f = jax.jit(lambda um: jaxprune.expand(params, MODEL, um, base))
  wm = f({"hidden_0": jnp.array([False] + [True] * 5)})
  assert not bool(wm["params"]["hidden_0"]["kernel"][:, 0].any())
  assert not bool(wm["params"]["out"]["kernel"][:, 0].any())  # from base
  assert not bool(wm["params"]["out"]["kernel"][0].any())  # from the unit mask


def test_check_weight_masks_errors(params):
  good = jaxprune.ones_like(params)
  jaxprune.check_weight_masks(params, good)
  bad_shape = jax.tree.map(lambda m: m, good)
  bad_shape["params"]["out"]["kernel"] = jnp.ones((6, 4), bool)
  with pytest.raises(ValueError, match=r"\['params'\]\['out'\]\['kernel'\] has shape \(6, 4\)"):
    jaxprune.check_weight_masks(params, bad_shape)
  with pytest.raises(ValueError, match="dtype float32.*bool"):
    jaxprune.check_weight_masks(params, jax.tree.map(lambda m: m.astype(jnp.float32), good))
  missing = {"params": {"hidden_0": good["params"]["hidden_0"]}}
  with pytest.raises(ValueError, match="structure of the params.*missing leaves"):
    jaxprune.check_weight_masks(params, missing)
  with_none = {"params": {**good["params"], "out": {"kernel": None, "bias": good["params"]["out"]["bias"]}}}
  with pytest.raises(ValueError, match="structure of the params.*missing leaves.*out.*kernel"):
    jaxprune.check_weight_masks(params, with_none)
  from flax.core import freeze  # pylint: disable=import-outside-toplevel
  frozen = {"params": freeze(good["params"])}   # same leaves, another container
  with pytest.raises(ValueError, match=r"at \['params'\] the params are a dict but the masks a "
                     "FrozenDict"):
    jaxprune.check_weight_masks(params, frozen)
  import collections  # pylint: disable=import-outside-toplevel
  ordered = {"params": collections.OrderedDict(good["params"])}
  with pytest.raises(ValueError, match=r"the params are a dict but the masks an OrderedDict"):
    jaxprune.check_weight_masks(params, ordered)
  # apply_masks checks too, instead of broadcasting a wrong mask silently.
  with pytest.raises(ValueError, match="has shape \\(6, 4\\)"):
    jaxprune.apply_masks(params, bad_shape)
  with pytest.raises(ValueError, match="removes every unit"):
    jaxprune.expand(params, MODEL, {"hidden_0": jnp.zeros(6, bool)})
  empty = jaxprune.expand(params, MODEL, {"hidden_0": jnp.zeros(6, bool)}, allow_empty=True)
  assert not bool(empty["params"]["out"]["kernel"].any())


def test_check_unit_masks_errors():
  with pytest.raises(KeyError, match="names no unit group"):
    jaxprune.check_unit_masks(MODEL, {"hidden_1": jnp.ones(6, bool)})
  with pytest.raises(ValueError, match="has shape \\(5,\\); group 'hidden_0' has 6"):
    jaxprune.check_unit_masks(MODEL, {"hidden_0": jnp.ones(5, bool)})
  jaxprune.check_unit_masks(MODEL, {"hidden_0": jnp.ones(6, jnp.int32)})   # 0/1 ints are fine
  with pytest.raises(ValueError, match="an integer unit mask may hold only 0 and 1"):
    jaxprune.check_unit_masks(MODEL, {"hidden_0": 2 * jnp.ones(6, jnp.int32)})
  with pytest.raises(ValueError, match="dtype float32"):
    jaxprune.check_unit_masks(MODEL, {"hidden_0": jnp.ones(6, jnp.float32)})
  with pytest.raises(ValueError, match="removes every unit"):
    jaxprune.check_unit_masks(MODEL, {"hidden_0": jnp.zeros(6, bool)})


def test_summary_names_list_and_attribute_paths():
  """Rows are named by the path keys (indices and attribute names as they are), not by the
  reprs of jax's key objects ('[0]', '.w')."""
  import collections  # pylint: disable=import-outside-toplevel
  layer = collections.namedtuple("Layer", "w b")
  masks = [layer(np.ones((2, 3), bool), np.ones(3, bool)), {"k": np.zeros((3, 1), bool)}]
  rows = [line.split()[0] for line in jaxprune.summary(masks).splitlines()[2:]]
  assert rows == ["0/w", "0/b", "1/k", "total"]


def test_counts_and_summaries_refuse_what_is_not_a_weight_mask(params):
  """Params where masks belong gave a 'sparsity' of -2.0 (and kept counts that were sums of
  weights); an empty tree gave 100%."""
  for fn in (jaxprune.sparsity, jaxprune.summary, jaxprune.count_weights):
    with pytest.raises(TypeError, match=r"takes weight masks \(bool leaves\); the leaf at "
                                        r"\['params'\]\['hidden_0'\]\['bias'\] is float32"):
      fn(params)
    with pytest.raises(ValueError, match="got a tree with no leaves"):
      fn({})
  with pytest.raises(TypeError, match="takes a pruning target.*not params.*ones_like"):
    jaxprune.unit_masks_ones(params)
  assert jaxprune.sparsity({"w": np.array([True, False, False, False])}) == 0.75


def test_unit_masks_given_as_weight_masks_point_to_expand():
  model = jaxprune.MLP(in_features=4, hidden=(6,), out_features=3)
  params = model.init(jax.random.key(0))
  um = jaxprune.unit_masks_ones(model)
  x, y = np.ones((4, 4), np.float32), np.arange(4) % 3
  for call in (lambda: jaxprune.apply_masks(params, um),
               lambda: jaxprune.evaluate(model, params, x, y, masks=um)):
    with pytest.raises(ValueError, match=r"These look like unit masks .*jaxprune\.expand\("
                       r"params, target, unit_masks\)"):
      call()
  # A traced target's groups are named after their kernels' keys: still unit masks.
  f = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"][None]) @ p["w2"]
  flat = {"w1": jnp.ones((4, 6)), "b1": jnp.zeros(6), "w2": jnp.ones((6, 2))}
  t = jaxprune.trace(f, flat, jnp.ones((3, 4)))
  with pytest.raises(ValueError, match="These look like unit masks"):
    jaxprune.apply_masks(flat, jaxprune.unit_masks_ones(t))
  # Weight masks of another structure get the general advice, not the unit-mask hint.
  with pytest.raises(ValueError, match="ones_like") as e:
    jaxprune.apply_masks(params, {"params": {"out": jaxprune.ones_like(params)["params"]["out"]}})
  assert "unit masks" not in str(e.value)


def test_nnx_state_against_plain_dict_masks_says_which_is_which():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from conftest import nnx_sigmoid_mlp  # pylint: disable=import-outside-toplevel
  state = nnx.state(nnx_sigmoid_mlp(), nnx.Param)
  plain = nnx.to_pure_dict(state)
  with pytest.raises(ValueError, match=r"The params are nnx Variables .* and the masks plain "
                     r"arrays .*make the masks from that same state, jaxprune\.ones_like\("
                     r"state\)"):
    jaxprune.apply_masks(state, jaxprune.ones_like(plain))
  with pytest.raises(ValueError, match=r"The masks are nnx Variables .* and the params plain "
                     r"arrays"):
    jaxprune.apply_masks(plain, jaxprune.ones_like(state))


def test_structure_errors_name_where_a_sequence_or_node_lacks_a_leafless_entry():
  """Masks whose tuple lacked the params' trailing None said only 'the same leaves in different
  containers' (lists and tuples of other lengths were not walked): the message names the path
  of the first entry one tree holds and the other lacks, in any pytree node."""
  import collections  # pylint: disable=import-outside-toplevel
  w, b = jnp.ones((4, 5)), jnp.ones((4, 5), bool)
  cases = [({"a": (w, None), "b": jnp.ones(3)}, {"a": (b,), "b": jnp.ones(3, bool)},
            r"at \['a'\]\[1\] the params hold a None, which has no leaves, and the masks "
            "nothing; give the masks the same node there"),
           ({"a": [w]}, {"a": [np.ones((4, 5), bool), None, ()]},   # NumPy against jax leaves
            r"at \['a'\]\[1\] the masks hold a None, which has no leaves, and the params "
            "nothing; remove it from the masks"),
           ({"a": (w, [None])}, {"a": (b, [])}, r"at \['a'\]\[1\]\[0\] the params hold a None")]
  layer = collections.namedtuple("Layer", "w extra")
  cases.append(([layer(w, None)], [layer(b, ())],
                r"at \[0\]\.extra the params are None but the masks a tuple"))
  for p, m, match in cases:
    with pytest.raises(ValueError, match=match):
      jaxprune.check_weight_masks(p, m)
    with pytest.raises(ValueError, match=match):
      jaxprune.apply_masks(p, m)


def test_empty_leaves_count_as_zero_of_zero():
  """An empty (size-0) leaf holds no weights: it was reported 100% sparse, and a tree of only
  empty leaves had sparsity 1.0; it counts as 0 of 0 removed (0.0, 0.0%), documented in
  docs/concepts.md, and leaves the other counts as they were."""
  empty = jnp.zeros((0, 5), bool)
  assert jaxprune.sparsity({"empty": empty}) == 0.0
  assert jaxprune.sparsity({"w": np.array([True, False, False, False]), "empty": empty}) == 0.75
  assert jaxprune.count_weights({"w": jnp.ones((2, 2), bool), "empty": empty}) == (4, 4)
  rows = {r.split()[0]: r.split()[1:] for r in jaxprune.summary(
      {"w": np.array([[True, False], [True, True]]), "empty": empty}).splitlines()[2:]}
  assert rows["empty"] == ["(0,", "5)", "0", "0", "0.0%"]
  assert rows["w"] == ["(2,", "2)", "3", "4", "25.0%"]
  assert rows["total"] == ["3", "4", "25.0%"]
  only_empty = jaxprune.summary({"empty": empty}).splitlines()
  assert only_empty[-1].split() == ["total", "0", "0", "0.0%"]


def test_params_and_targets_swapped_are_named():
  """Params passed where the model belongs (a structured pruner) used to give 'this model's
  groups are ['params']' (the dict taken as groups), and a model passed where params belong
  (magnitude_prune) 'the selection picks no parameter leaf'."""
  model = jaxprune.MLP(in_features=4, hidden=(6,), out_features=3)
  params = model.init(jax.random.key(0))
  for make in (jaxprune.importance_prune, jaxprune.distinctiveness,
               jaxprune.pruners.group_redundancy):
    with pytest.raises(TypeError, match=r"A structured pruner takes a pruning target.*not "
                                        r"params: pass the model"):
      make(params, "hidden_0")
  for prune in (jaxprune.magnitude_prune, jaxprune.random_prune):
    kw = {"key": jax.random.key(1)} if prune is jaxprune.random_prune else {}
    with pytest.raises(TypeError, match=r"Got a pruning target \(MLP\) where params belong"):
      prune(model, None, 0.5, **kw)


def test_count_units_refuses_masks_that_are_not_bool_or_0_1():
  """count_units summed whatever it was given: [2, 2, 1, 0] was '5 of 4 kept' (summary printed
  -25% removed) and float probabilities were summed and truncated."""
  assert jaxprune.count_units({"h": np.array([1, 0, 1, 1])}) == {"h": (3, 4)}
  assert jaxprune.count_units({"h": jnp.array([True, False])}) == {"h": (1, 2)}
  with pytest.raises(ValueError, match=r"holds \[2\]"):
    jaxprune.count_units({"h": np.array([2, 2, 1, 0])})
  with pytest.raises(ValueError, match="dtype float32.*mask > 0.5"):
    jaxprune.count_units({"h": jnp.array([0.3, 0.9, 0.2, 0.6])})
  with pytest.raises(ValueError, match=r"shape \(2, 2\)"):
    jaxprune.count_units({"h": np.ones((2, 2), bool)})
