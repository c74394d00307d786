"""Probes of checkpoint.py and masks.py as an outside user meets them: exact round trips, and
clear errors (naming the leaf and the fix) where orbax would fail obscurely or lose data."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune


def _leftovers(folder):
  return sorted(os.listdir(folder))


def test_keys_whose_dotted_names_collide_are_refused_not_merged(tmp_path):
  # orbax names leaves by their keys joined with '.': {'a.b'} and {'a': {'b'}} were one entry,
  # and both loaded as the zeros (the ones were lost without a word).
  params = {"a.b": jnp.ones(2), "a": {"b": jnp.zeros(2)}}
  with pytest.raises(ValueError, match=r"both params\['a'\]\['b'\] and params\['a\.b'\]"
                     r".*Rename a key"):
    jaxprune.save_checkpoint(str(tmp_path / "c"), params)
  assert _leftovers(tmp_path) == []
  # a dotted key that spells no other leaf's path still round-trips exactly
  ok = {"a.b": jnp.array([1.0, 2.0]), "c": jnp.array([3.0])}
  jaxprune.save_checkpoint(str(tmp_path / "ok"), ok)
  back, _ = jaxprune.load_checkpoint(str(tmp_path / "ok"), ok)
  assert np.array_equal(back["a.b"], [1.0, 2.0]) and np.array_equal(back["c"], [3.0])


def test_a_size_zero_leaf_is_refused_before_anything_is_written(tmp_path):
  params = {"s": jnp.zeros((0, 3)), "w": jnp.ones(2)}
  with pytest.raises(ValueError, match=r"leaf params\['s'\]: it has shape \(0, 3\).*empty array"):
    jaxprune.save_checkpoint(str(tmp_path / "c"), params)
  assert _leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def with_none(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("ck") / "c")
  params = {"a": [jnp.arange(3.0)], "n": None, "e": {}}
  jaxprune.save_checkpoint(path, params, {"a": [jnp.array([True, False, True])], "n": None,
                                           "e": {}})
  return path


@pytest.mark.parametrize("template, named", [
    ({"a": [jnp.ones(3)], "e": {}}, r"it has params\['n'\] \(None\), which the template lacks"),
    ({"a": [jnp.ones(3)], "n": None}, r"params\['e'\] \(an empty dict\)"),
    ({"a": [jnp.ones(3), None], "n": None, "e": {}}, r"params\['a'\]\[1\] is in the template"),
    ({"a": [jnp.ones(3)], "n": jnp.ones(2), "e": {}}, r"at params\['n'\] the checkpoint has None"),
])
def test_a_template_that_differs_in_a_leafless_node_is_named_not_called_damaged(
    with_none, template, named):
  # These failed inside orbax's restore, reported as files "lost or cut short".
  with pytest.raises(ValueError, match="does not fit the params template") as e:
    jaxprune.load_checkpoint(with_none, template)
  assert "cut short" not in str(e.value)
  import re
  assert re.search(named, str(e.value)), str(e.value)


def test_a_compacted_template_for_full_size_params_says_to_compact_after_loading(with_none):
  with pytest.raises(ValueError, match=r"smaller along an axis, as compacted params are.*"
                     r"then compact"):
    jaxprune.load_checkpoint(with_none, {"a": [jnp.ones(2)], "n": None, "e": {}})
  with pytest.raises(ValueError, match="larger along an axis: the checkpoint may hold compacted"):
    jaxprune.load_checkpoint(with_none, {"a": [jnp.ones(5)], "n": None, "e": {}})


def test_a_leafless_node_loads_with_its_template_exactly(with_none):
  params, masks = jaxprune.load_checkpoint(with_none, {"a": [jnp.ones(3)], "n": None, "e": {}})
  assert params["n"] is None and params["e"] == {} and masks["n"] is None
  assert np.array_equal(params["a"][0], [0.0, 1.0, 2.0])
  assert masks["a"][0].tolist() == [True, False, True]


def test_nnx_state_against_its_pure_dict_says_how_to_load(tmp_path):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  net = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  state = nnx.state(net, nnx.Param)
  pure = str(tmp_path / "pure")
  jaxprune.save_checkpoint(pure, nnx.to_pure_dict(state))
  with pytest.raises(ValueError, match=r"saved from nnx\.to_pure_dict.*replace_by_pure_dict"):
    jaxprune.load_checkpoint(pure, state)
  # the advice works: the values come back into another network
  other = nnx.Linear(3, 2, rngs=nnx.Rngs(1))
  st = nnx.state(other, nnx.Param)
  params, _ = jaxprune.load_checkpoint(pure, nnx.to_pure_dict(st))
  nnx.replace_by_pure_dict(st, params)
  nnx.update(other, st)
  assert np.array_equal(other.kernel[...], net.kernel[...])
  whole = str(tmp_path / "state")
  jaxprune.save_checkpoint(whole, state)
  with pytest.raises(ValueError, match=r"saved from an nnx State.*Pass that State"):
    jaxprune.load_checkpoint(whole, nnx.to_pure_dict(state))


def test_a_path_under_the_home_folder_is_expanded(tmp_path, monkeypatch):
  home, work = tmp_path / "home", tmp_path / "work"
  home.mkdir()
  work.mkdir()
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.chdir(work)
  params = {"w": jnp.array([1.0, -2.0])}
  jaxprune.save_checkpoint("~/ck", params)
  assert _leftovers(work) == [] and "ck" in _leftovers(home)   # not a folder named '~'
  back, _ = jaxprune.load_checkpoint("~/ck", params)
  assert np.array_equal(back["w"], [1.0, -2.0])


def test_unit_masks_of_float_scores_are_refused_without_a_target(tmp_path):
  with pytest.raises(ValueError, match="Unit mask 'g' has dtype.*bool"):
    jaxprune.save_checkpoint(str(tmp_path / "c"), {"w": jnp.ones(2)},
                             unit_masks={"g": np.array([0.2, 1.0])})
  assert _leftovers(tmp_path) == []


def test_integer_unit_masks_of_0_and_1_load_back_as_the_bool_masks_they_mean(tmp_path):
  """Save accepts integer 0/1 unit masks (as every unit-mask function does), but they loaded
  back as int32 vectors, which other code reads as indices or counts."""
  params = {"w": jnp.ones(3)}
  jaxprune.save_checkpoint(str(tmp_path / "c"), params,
                           unit_masks={"g": np.array([1, 0, 1], np.int32),
                                       "h": jnp.array([0, 1], jnp.uint8),
                                       "b": jnp.array([True, False])})
  _, _, units = jaxprune.load_checkpoint(str(tmp_path / "c"), params, with_unit_masks=True)
  for k, want in (("g", [True, False, True]), ("h", [False, True]), ("b", [True, False])):
    assert units[k].dtype == np.bool_, (k, units[k].dtype)
    np.testing.assert_array_equal(units[k], want)
  with pytest.raises(ValueError, match="may hold only 0 and 1"):
    jaxprune.save_checkpoint(str(tmp_path / "d"), params, unit_masks={"g": np.array([2, 0])})
  with pytest.raises(ValueError, match="has dtype key<fry>; unit masks must be bool"):
    jaxprune.save_checkpoint(str(tmp_path / "e"), params,  # np.dtype() refused it: TypeError
                             unit_masks={"g": jax.random.split(jax.random.key(0), 2)})


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.int32, jnp.uint8, np.bool_])
def test_leaves_of_every_dtype_round_trip_exactly(tmp_path, dtype):
  params = {"w": jnp.arange(6).reshape(2, 3).astype(dtype), "s": jnp.asarray(3).astype(dtype)}
  masks = {"w": jnp.array([[True, False, True], [False, True, False]]), "s": jnp.array(True)}
  jaxprune.save_checkpoint(str(tmp_path / "c"), params, masks)
  for template in (params, None):
    back, m = jaxprune.load_checkpoint(str(tmp_path / "c"), template)
    for k in params:
      assert back[k].dtype == params[k].dtype
      assert np.array_equal(np.asarray(back[k]), np.asarray(params[k]))
      assert np.array_equal(np.asarray(m[k]), np.asarray(masks[k]))


def test_a_float64_numpy_leaf_round_trips_without_loss(tmp_path):
  params = {"w": np.array([1.0 + 2.0 ** -40, np.pi])}
  jaxprune.save_checkpoint(str(tmp_path / "c"), params)
  back, _ = jaxprune.load_checkpoint(str(tmp_path / "c"), params)
  assert back["w"].dtype == np.float64 and np.array_equal(back["w"], params["w"])


@pytest.mark.parametrize("saved_as", [np.asarray, jnp.asarray])
def test_loaded_leaves_take_the_template_leafs_kind_masks_and_unit_masks_too(tmp_path, saved_as):
  """Orbax restores a leaf as the kind it was saved as: masks saved from JAX loaded as JAX arrays
  into a NumPy template (NumPy masks into a JAX one), and params saved from NumPy as NumPy arrays
  for a ShapeDtypeStruct template. Each leaf now takes its template leaf's kind."""
  params = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}
  masks = {"w": np.array([[True, False, True], [False, True, True]]),
           "b": np.array([True, False, True])}
  units = {"g": np.array([True, False])}
  path = str(tmp_path / "c")
  jaxprune.save_checkpoint(path, jax.tree.map(saved_as, params), jax.tree.map(saved_as, masks),
                           unit_masks=jax.tree.map(saved_as, units))
  sds = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  mixed = {"w": params["w"], "b": jnp.asarray(params["b"])}
  for template, kind in ((params, {"w": np.ndarray, "b": np.ndarray, "g": np.ndarray}),
                         (jax.tree.map(jnp.asarray, params),
                          {"w": jax.Array, "b": jax.Array, "g": jax.Array}),
                         (sds, {"w": jax.Array, "b": jax.Array, "g": jax.Array}),
                         (mixed, {"w": np.ndarray, "b": jax.Array, "g": jax.Array})):
    p, m, u = jaxprune.load_checkpoint(path, template, with_unit_masks=True)
    for k in ("w", "b"):
      assert isinstance(p[k], kind[k]) and isinstance(m[k], kind[k]), (k, type(p[k]), type(m[k]))
      assert np.array_equal(np.asarray(p[k]), params[k]) and p[k].dtype == np.float32
      assert np.array_equal(np.asarray(m[k]), masks[k]) and m[k].dtype == np.bool_
    assert isinstance(u["g"], kind["g"]) and np.array_equal(np.asarray(u["g"]), units["g"])


def _reference_counts(masks):
  kept = total = 0
  for m in jax.tree.leaves(masks):
    for v in np.asarray(m).ravel():
      kept += int(bool(v))
      total += 1
  return kept, total


def test_sparsity_and_count_weights_work_under_jit_and_vmap():
  masks = {"w": jnp.array([[True, False], [False, False]]), "b": jnp.array([False, True, True])}
  kept, total = _reference_counts(masks)   # 3 of 7
  assert (kept, total) == (3, 7)
  assert float(jax.jit(jaxprune.sparsity)(masks)) == pytest.approx(1 - 3 / 7, abs=1e-6)
  k, t = jax.jit(jaxprune.count_weights)(masks)
  assert (int(k), int(t)) == (3, 7)
  population = jax.tree.map(lambda x: jnp.stack([x, ~x, jnp.ones_like(x)]), masks)
  per_member = jax.vmap(jaxprune.sparsity)(population)
  want = [1 - _reference_counts(jax.tree.map(lambda x, i=i: x[i], population))[0] / 7
          for i in range(3)]
  np.testing.assert_allclose(np.asarray(per_member), want, atol=1e-6)
  assert jaxprune.sparsity(masks) == 1 - 3 / 7   # outside jit: a Python float, as before
  assert jaxprune.count_weights(jax.tree.map(np.asarray, masks)) == (3, 7)


def test_summary_under_jit_says_to_call_it_outside():
  masks = {"w": jnp.array([True, False])}
  with pytest.raises(TypeError, match=r"\['w'\] is traced.*outside the jitted function"):
    jax.jit(jaxprune.summary)(masks)


def test_apply_masks_matches_a_hand_loop_for_numpy_and_jax_masks_and_under_vmap():
  params = {"w": jnp.array([[1.0, -2.0], [3.0, 4.0]]), "b": jnp.array([5.0, 6.0])}
  masks = {"w": np.array([[True, False], [False, True]]), "b": np.array([False, True])}

  def by_hand(p, m):
    out = np.array(p, dtype=np.float32)
    for i in np.ndindex(out.shape):
      if not m[i]:
        out[i] = 0.0
    return out

  for mk in (masks, jax.tree.map(jnp.asarray, masks)):
    got = jax.jit(jaxprune.apply_masks)(params, mk)
    for k in params:
      assert np.array_equal(np.asarray(got[k]), by_hand(params[k], masks[k]))
  stacked = jax.tree.map(lambda m: jnp.stack([m, ~m]), masks)
  got = jax.vmap(jaxprune.apply_masks, in_axes=(None, 0))(params, stacked)
  for k in params:
    assert np.array_equal(np.asarray(got[k][1]), by_hand(params[k], ~masks[k]))


def test_leaves_orbax_cannot_write_are_refused_before_anything_is_written(tmp_path):
  """A traced leaf (a save inside jit), a deleted array and string or object leaves failed
  inside orbax, whose threads then left a .NAME.jaxprune-tmp-* folder beside the path."""
  def attempt(params, name):
    jaxprune.save_checkpoint(str(tmp_path / name), params)

  with pytest.raises(TypeError, match=r"params\['w'\]: it is a traced value.*outside"):
    jax.jit(lambda p: attempt(p, "traced") or p)({"w": jnp.ones(3)})
  gone = jnp.ones(3)
  gone.delete()
  with pytest.raises(ValueError, match=r"params\['w'\]: the array has been deleted"):
    attempt({"w": gone}, "deleted")
  for name, leaf in (("strings", np.array(["a", "b"])),
                     ("objects", np.array([object()], dtype=object))):
    with pytest.raises(TypeError, match=r"params\['w'\]: its dtype .* is not a number"):
      attempt({"w": leaf}, name)
  assert _leftovers(tmp_path) == []
  attempt({"w": jnp.ones(2, jnp.bfloat16), "k": jax.random.key(0)}, "ok")   # still written
  assert _leftovers(tmp_path) == ["ok"]


def test_a_template_dtype_that_would_change_the_values_is_refused(tmp_path):
  """int -> bool, int32 -> uint8 (300 loaded as 44) and complex -> float (the imaginary part
  dropped) loaded without a word: refused, integers by their values (a Python int saved as
  int64 loads into its own int32 template, as do values a narrower type holds); a float dtype
  of the user's choice and a wider integer type still cast."""
  path = str(tmp_path / "c")
  saved = {"i": jnp.array([0, 1, 2, 300], jnp.int32), "c": jnp.array([1 + 2j, 3j], jnp.complex64)}
  jaxprune.save_checkpoint(path, saved)
  for leaf, template in (("i", jnp.zeros(4, bool)), ("i", jnp.zeros(4, jnp.uint8)),
                         ("i", np.zeros(4, np.int8)), ("c", jnp.zeros(2, jnp.float32))):
    with pytest.raises(ValueError, match=rf"at params\['{leaf}'\] the checkpoint has"):
      jaxprune.load_checkpoint(path, dict(saved, **{leaf: template}))
  back, _ = jaxprune.load_checkpoint(path, dict(saved, i=jnp.zeros(4, jnp.int16)))
  assert back["i"].dtype == jnp.int16 and back["i"].tolist() == [0, 1, 2, 300]
  small = {"w": jnp.ones(2), "step": 3, "idx": np.arange(3), "flags": jnp.array([0, 1, 1])}
  jaxprune.save_checkpoint(str(tmp_path / "s"), small)
  back, _ = jaxprune.load_checkpoint(str(tmp_path / "s"), dict(
      small, idx=jnp.arange(3), flags=jnp.zeros(3, bool)))
  assert int(back["step"]) == 3 and back["idx"].tolist() == [0, 1, 2]
  assert back["flags"].dtype == jnp.bool_ and back["flags"].tolist() == [False, True, True]
  with jax.enable_x64(True):
    back, _ = jaxprune.load_checkpoint(path, {"i": np.zeros(4, np.int64),
                                              "c": np.zeros(2, np.complex128)})
  assert back["i"].dtype == np.int64 and back["i"].tolist() == [0, 1, 2, 300]
  assert back["c"].tolist() == [1 + 2j, 3j]


def test_overwriting_the_working_folder_is_refused(tmp_path, monkeypatch):
  """save_checkpoint('.', overwrite=True) in an empty working folder replaced it: the
  checkpoint landed, and the process was left in a deleted folder."""
  run = tmp_path / "run"
  run.mkdir()
  monkeypatch.chdir(run)
  for path in (".", str(tmp_path)):
    with pytest.raises(ValueError, match="working folder or holds it"):
      jaxprune.save_checkpoint(path, {"w": jnp.ones(3)}, overwrite=True)
  assert os.getcwd() == str(run) and _leftovers(run) == []
  jaxprune.save_checkpoint("ckpt", {"w": jnp.ones(3)})   # a sub-folder of it is fine
  assert _leftovers(run) == ["ckpt"]
  gone = tmp_path / "gone"   # a working folder deleted under the process: an absolute path saves
  gone.mkdir()
  monkeypatch.chdir(gone)
  gone.rmdir()
  jaxprune.save_checkpoint(str(tmp_path / "abs"), {"w": jnp.ones(3)})
  assert (tmp_path / "abs").is_dir()
