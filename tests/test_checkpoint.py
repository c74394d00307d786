"""save_checkpoint / load_checkpoint: the template decides names, shapes and dtypes; a failed
overwrite keeps the old checkpoint; mismatches and foreign checkpoints raise jaxprune errors."""

import json
import os
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune


def _params():
  return {"a": {"kernel": jnp.arange(6.).reshape(2, 3)},
          "b": {"kernel": jnp.arange(6., 12.).reshape(3, 2)}}


def _save(tmp_path, unit_masks=None, name="c"):
  params = _params()
  _, masks = jaxprune.prune_to_sparsity(params, None, 0.5, scope="layer")
  path = str(tmp_path / name)
  jaxprune.save_checkpoint(path, params, masks, unit_masks=unit_masks)
  return path, params, masks


UNITS = {"g": jnp.array([True, False, True])}
WRONG_SHAPES = {"a": {"kernel": jnp.zeros((3, 2))}, "b": {"kernel": jnp.zeros((2, 3))}}
RENAMED = {"x": {"kernel": jnp.zeros((2, 3))}, "y": {"kernel": jnp.zeros((3, 2))}}


# ----------------------------------------------------------------- the template decides (finding 1)


@pytest.mark.parametrize("units", [None, UNITS], ids=["no-unit-masks", "unit-masks"])
def test_template_with_wrong_shapes_is_refused_naming_path_and_shapes(tmp_path, units):
  path, _, _ = _save(tmp_path, units)
  with pytest.raises(ValueError) as e:
    jaxprune.load_checkpoint(path, WRONG_SHAPES)
  msg = str(e.value)
  assert "params['a']['kernel']" in msg and "(2, 3)" in msg and "(3, 2)" in msg, msg
  assert "ArrayRestoreArgs" not in msg and "strict" not in msg, msg   # orbax advice users can't use
  assert "params_template" in msg, msg                                 # says what to do


def test_a_template_that_would_lose_the_values_is_refused(tmp_path):
  """The weight masks (bool) or int params as the template: the float params loaded as True /
  0 without a word. A float dtype of the user's choice still casts."""
  path, params, masks = _save(tmp_path)
  for template, kind in ((masks, "bool"), (jax.tree.map(lambda a: a.astype(jnp.int32), params),
                                           "int32")):
    with pytest.raises(ValueError, match=rf"float32 values and the template {kind}.*weight "
                       "masks passed as the params template"):
      jaxprune.load_checkpoint(path, template)
  loaded, _ = jaxprune.load_checkpoint(path, jax.tree.map(lambda a: a.astype(jnp.bfloat16),
                                                          params))
  assert loaded["a"]["kernel"].dtype == jnp.bfloat16


@pytest.mark.parametrize("units", [None, UNITS], ids=["no-unit-masks", "unit-masks"])
def test_renamed_template_is_refused_naming_the_params_path(tmp_path, units):
  path, _, _ = _save(tmp_path, units)
  with pytest.raises(ValueError) as e:
    jaxprune.load_checkpoint(path, RENAMED)
  msg = str(e.value)
  assert "params['x']['kernel']" in msg and "not in the checkpoint" in msg, msg
  assert "['masks']" not in msg, msg                       # the params differ, not the masks
  assert "params['a']['kernel']" in msg, msg           # shows what the checkpoint does have


@pytest.mark.parametrize("units", [None, UNITS], ids=["no-unit-masks", "unit-masks"])
def test_result_takes_the_template_dtypes_and_a_wrong_nesting_is_refused(tmp_path, units):
  path, params, masks = _save(tmp_path, units)
  template = [jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)]  # other container, bf16
  with pytest.raises(ValueError):                 # a list is not the dict that was saved
    jaxprune.load_checkpoint(path, template)
  bf16 = template[0]
  p2, m2, u2 = jaxprune.load_checkpoint(path, bf16, with_unit_masks=True)
  assert jax.tree.structure(p2) == jax.tree.structure(bf16)
  for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(params)):
    assert a.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(a, np.float32), b)
  for a, b in zip(jax.tree.leaves(m2), jax.tree.leaves(masks)):
    assert a.dtype == jnp.bool_
    np.testing.assert_array_equal(a, b)
  if units is None:
    assert u2 is None
  else:
    np.testing.assert_array_equal(u2["g"], UNITS["g"])
    assert u2["g"].dtype == jnp.bool_


def test_shape_dtype_structs_are_a_template_with_unit_masks(tmp_path):
  path, params, _ = _save(tmp_path, UNITS)
  sds = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
  p2, _ = jaxprune.load_checkpoint(path, sds)
  np.testing.assert_array_equal(p2["b"]["kernel"], params["b"]["kernel"])


# ---------------------------------------------------- a failed overwrite loses nothing (finding 2)


def test_failed_overwrite_keeps_the_old_checkpoint_and_leaves_no_temp_folder(tmp_path):
  path, params, masks = _save(tmp_path, UNITS)
  # named as the caller indexes it (it read ['params']['a'], a path of no tree of theirs)
  with pytest.raises(TypeError, match=r"the leaf params\['a'\]: it is of type 'object'"):
    jaxprune.save_checkpoint(path, {"a": object()}, overwrite=True)
  assert os.listdir(tmp_path) == ["c"]
  p2, m2, u2 = jaxprune.load_checkpoint(path, params, with_unit_masks=True)
  np.testing.assert_array_equal(p2["a"]["kernel"], params["a"]["kernel"])
  np.testing.assert_array_equal(u2["g"], UNITS["g"])


def test_failure_during_the_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
  """A failure past jaxprune's own checks (inside orbax's write) is also rolled back."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path, params, _ = _save(tmp_path)

  def boom(self, *args, **kwargs):
    raise OSError("disk full")
  monkeypatch.setattr(ocp.StandardCheckpointer, "save", boom)
  with pytest.raises(OSError, match="disk full"):
    jaxprune.save_checkpoint(path, params, None, overwrite=True)
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["c"]
  assert jaxprune.load_checkpoint(path, params)[1] is not None   # still the old one, masks and all


def test_overwrite_replaces_and_leaves_only_the_checkpoint(tmp_path):
  path, params, _ = _save(tmp_path, UNITS)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    jaxprune.save_checkpoint(path, params)
  new = jax.tree.map(lambda a: a + 1, params)
  jaxprune.save_checkpoint(path, new, None, overwrite=True)
  assert os.listdir(tmp_path) == ["c"]
  p2, m2, u2 = jaxprune.load_checkpoint(path, params, with_unit_masks=True)
  np.testing.assert_array_equal(p2["a"]["kernel"], new["a"]["kernel"])
  assert m2 is None and u2 is None


def test_overwrite_through_a_symbolic_link_replaces_its_target(tmp_path):
  """A 'latest' link to a checkpoint: overwriting through it writes the target (the link used to
  be replaced by a folder, and the target silently kept the old weights)."""
  path, params, _ = _save(tmp_path)
  os.symlink(path, tmp_path / "latest")
  new = jax.tree.map(lambda a: a + 1, params)
  jaxprune.save_checkpoint(str(tmp_path / "latest"), new, None, overwrite=True)
  assert os.path.islink(tmp_path / "latest")
  for where in (path, str(tmp_path / "latest")):
    np.testing.assert_array_equal(jaxprune.load_checkpoint(where, params)[0]["b"]["kernel"],
                                  new["b"]["kernel"])
  assert sorted(os.listdir(tmp_path)) == ["c", "latest"]


def test_python_number_leaves_restore_as_jax_makes_them(tmp_path):
  path = str(tmp_path / "n")
  jaxprune.save_checkpoint(path, {"t": 1.5, "w": jnp.ones((2,))})
  out = jaxprune.load_checkpoint(path, {"t": 1.5, "w": jnp.ones((2,))})[0]
  assert out["t"].dtype == jnp.asarray(1.5).dtype and float(out["t"]) == 1.5


# ------------------------------------------------------------ not a jaxprune checkpoint (finding 3)


@pytest.mark.parametrize("with_template", [False, True])
def test_foreign_orbax_checkpoint_is_named_as_such(tmp_path, with_template):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "foreign")
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(path, {"w": jnp.ones(3)})
  ckptr.wait_until_finished()
  with pytest.raises(ValueError, match="not a jaxprune checkpoint"):
    jaxprune.load_checkpoint(path, _params() if with_template else None)


def test_folder_that_is_no_checkpoint_is_named_as_such(tmp_path):
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="not a jaxprune checkpoint"):
    jaxprune.load_checkpoint(str(tmp_path / "empty"))


def test_typed_prng_key_leaf_loads_with_its_own_params_as_template(tmp_path):
  """A typed key (jax.random.key) is stored as its key data, shape + (2,): the template check
  compared that with the key's own shape and told the user the model differed."""
  params = {"w": jnp.ones(2), "rng": jax.random.key(3)}
  path = str(tmp_path / "c")
  jaxprune.save_checkpoint(path, params)
  for template in (params, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)):
    loaded, _ = jaxprune.load_checkpoint(path, template)
    assert loaded["rng"].dtype == params["rng"].dtype
    np.testing.assert_array_equal(jax.random.key_data(loaded["rng"]),
                                  jax.random.key_data(params["rng"]))
  with pytest.raises(ValueError, match=r"\['rng'\].*shape \(2,\) uint32.*\(3,\) key"):
    jaxprune.load_checkpoint(path, {"w": jnp.ones(2), "rng": jax.random.split(params["rng"], 3)})


def test_unit_masks_are_checked_against_the_target_when_given(tmp_path):
  """Unit masks cannot be checked against params (a group's size is the model's): given the
  target, a mask of the wrong length or for no group is refused before anything is written."""
  model = jaxprune.MLP(in_features=4, hidden=(12,), out_features=3)
  params = model.init(jax.random.key(0))
  short = {"hidden_0": jnp.ones(11, bool)}
  with pytest.raises(ValueError, match=r"'hidden_0' has shape \(11,\).*needs shape \(12,\)"):
    jaxprune.save_checkpoint(str(tmp_path / "a"), params, unit_masks=short, target=model)
  with pytest.raises(KeyError, match="names no unit group"):
    jaxprune.save_checkpoint(str(tmp_path / "b"), params, unit_masks={"hidden_9": short[
        "hidden_0"]}, target=model)
  assert not os.listdir(tmp_path)                        # nothing written
  good = {"hidden_0": jnp.arange(12) % 2 == 0}
  jaxprune.save_checkpoint(str(tmp_path / "c"), params, unit_masks=good, target=model)
  loaded = jaxprune.load_checkpoint(str(tmp_path / "c"), params, with_unit_masks=True)[2]
  np.testing.assert_array_equal(np.asarray(loaded["hidden_0"]), np.asarray(good["hidden_0"]))


def test_unit_masks_given_as_lists_round_trip_as_vectors(tmp_path):
  """A unit mask given as a list of bools came back as a list of 0-d arrays (and with the
  target, failed inside jax with 'Cannot determine dtype'); it is saved as the vector it is. A
  mask that is no vector is refused before anything is written."""
  model = jaxprune.MLP(in_features=4, hidden=(8,), out_features=3)
  params = model.init(jax.random.key(0))
  given = [True] * 7 + [False]
  for name, target in (("a", None), ("b", model)):
    jaxprune.save_checkpoint(str(tmp_path / name), params, unit_masks={"hidden_0": given},
                             target=target)
    loaded = jaxprune.load_checkpoint(str(tmp_path / name), params, with_unit_masks=True)[2]
    np.testing.assert_array_equal(np.asarray(loaded["hidden_0"]), given)
    assert np.shape(loaded["hidden_0"]) == (8,)
  with pytest.raises(ValueError, match=r"Unit mask 'hidden_0' has shape \(2, 4\)"):
    jaxprune.save_checkpoint(str(tmp_path / "c"), params,
                             unit_masks={"hidden_0": np.ones((2, 4), bool)})
  assert not os.path.exists(tmp_path / "c")


def test_a_file_where_the_checkpoint_folder_belongs_is_named(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(FileNotFoundError, match=r"file is a file, not a checkpoint folder"):
    jaxprune.load_checkpoint(str(tmp_path / "file"))
  with pytest.raises(FileExistsError, match=r"Cannot make the folder .*file/sub for the "
                     r"checkpoint .*: .*file is a file"):
    jaxprune.save_checkpoint(str(tmp_path / "file" / "sub" / "ck"), _params())


# ------------------------------------------------------------------ overwrite and damaged folders


def test_overwrite_refuses_a_folder_or_file_that_is_not_a_checkpoint(tmp_path):
  """overwrite=True replaced whatever was at the path: a mistyped path deleted a folder of
  results. Now only a checkpoint or an empty folder is replaced; nothing is touched otherwise."""
  results = tmp_path / "results"
  results.mkdir()
  (results / "table.csv").write_text("1,2\n")
  with pytest.raises(FileExistsError, match=r"not a checkpoint \(it holds 1 entry: table.csv\)"):
    jaxprune.save_checkpoint(str(results), _params(), overwrite=True)
  assert (results / "table.csv").read_text() == "1,2\n"
  (tmp_path / "notes.txt").write_text("x")
  with pytest.raises(FileExistsError, match="a file, not a checkpoint folder"):
    jaxprune.save_checkpoint(str(tmp_path / "notes.txt"), _params(), overwrite=True)
  assert (tmp_path / "notes.txt").read_text() == "x"
  assert sorted(os.listdir(tmp_path)) == ["notes.txt", "results"]   # no temporary folder left
  (tmp_path / "empty").mkdir()
  jaxprune.save_checkpoint(str(tmp_path / "empty"), _params(), overwrite=True)
  np.testing.assert_array_equal(jaxprune.load_checkpoint(str(tmp_path / "empty"))[0]["a"]["kernel"],
                                _params()["a"]["kernel"])


def _data_files(path):
  return sorted(os.path.join(root, f) for root, _, files in os.walk(path)
                if os.path.basename(root) == "d" for f in files)


@pytest.mark.parametrize("damage", ["lost", "cut", "changed", "list"])
def test_damaged_checkpoint_names_the_file_before_orbax_reads_it(tmp_path, damage):
  # Orbax reading lost or garbled data fails in ways that depend on the file hit and leaves
  # asyncio errors behind ('Event loop is closed', which this suite's warning filter turns
  # into failures): the file list written at save time names the damage first.
  path, params, _ = _save(tmp_path)
  chunk = _data_files(path)[0]
  rel = os.path.relpath(chunk, path)
  if damage == "lost":
    os.remove(chunk)
    why = f"{rel} is missing"
  elif damage == "cut":
    size = os.path.getsize(chunk)
    with open(chunk, "r+b") as f:
      f.truncate(size - 1)
    why = f"{rel} has {size - 1} bytes, {size} when written"
  elif damage == "changed":
    with open(chunk, "r+b") as f:
      b = f.read(1)
      f.seek(0)
      f.write(bytes([b[0] ^ 0xFF]))
    why = f"the bytes of {rel} changed after it was written"
  else:
    with open(os.path.join(path, "jaxprune_files.json"), "w") as f:
      f.write("{")
    why = "its file list jaxprune_files.json cannot be read: JSONDecodeError"
  with pytest.raises(ValueError, match=re.escape(why) + ".*incomplete or damaged|"
                     "incomplete or damaged.*" + re.escape(why) + ".*save the checkpoint again"):
    jaxprune.load_checkpoint(path, params)
  with pytest.raises(ValueError, match=re.escape(why)):   # also without a template
    jaxprune.load_checkpoint(path)


def test_checkpoint_file_list_covers_every_file_and_old_checkpoints_still_load(tmp_path):
  path, params, masks = _save(tmp_path)
  with open(os.path.join(path, "jaxprune_files.json")) as f:
    listed = json.load(f)["files"]
  on_disk = sorted(os.path.relpath(os.path.join(r, n), path) for r, _, ns in os.walk(path)
                   for n in ns if n != "jaxprune_files.json")
  assert sorted(listed) == on_disk and len(on_disk) > 4
  for rel, (size, _) in listed.items():
    assert os.path.getsize(os.path.join(path, rel)) == size
  os.remove(os.path.join(path, "jaxprune_files.json"))  # as written before the list existed
  p2, m2 = jaxprune.load_checkpoint(path, params)
  chex.assert_trees_all_equal(p2, params)
  chex.assert_trees_all_equal(m2, masks)


def test_damaged_checkpoint_is_named_as_damaged_not_foreign(tmp_path, monkeypatch):
  path, params, _ = _save(tmp_path)
  os.remove(os.path.join(path, "jaxprune_files.json"))
  os.remove(os.path.join(path, "_METADATA"))  # no tree metadata, orbax's other files kept
  with pytest.raises(ValueError, match="is incomplete or damaged.*save the checkpoint again"):
    jaxprune.load_checkpoint(path, params)
  # Data orbax cannot read (garbage files make orbax fail inside its event loop, which leaves
  # unraisable warnings behind in the process; a failing restore stands in for them here).
  path, params, _ = _save(tmp_path, name="d")
  from jaxprune import checkpoint as ckpt_lib  # pylint: disable=import-outside-toplevel
  real = ckpt_lib._checkpointer

  class Failing:
    def __init__(self, ckptr):
      self.ckptr = ckptr

    def metadata(self, p):
      return self.ckptr.metadata(p)

    def restore(self, p, target):
      raise OSError("chunk 1 of 4: unexpected end of file")

  monkeypatch.setattr(ckpt_lib, "_checkpointer", lambda: (real()[0], Failing(real()[1])))
  with pytest.raises(ValueError, match=r"could not be read \(OSError: chunk 1 of 4.*restore the "
                                       r"folder from a copy or save the checkpoint again"):
    jaxprune.load_checkpoint(path, params)


def test_a_float64_numpy_template_keeps_float64(tmp_path):
  """A float64 NumPy template's leaves came back float32 (its dtype was canonicalised as a
  Python number's), losing 1e-12 silently; NumPy leaves keep their own dtype, Python numbers
  still take JAX's."""
  params = {"params": {"dense": {"kernel": np.array([[1.0 + 1e-12, 2.0]], np.float64),
                                 "bias": np.zeros(2, np.float64)}}}
  jaxprune.save_checkpoint(str(tmp_path / "c"), params)
  loaded, _ = jaxprune.load_checkpoint(str(tmp_path / "c"), params)
  chex.assert_trees_all_equal_dtypes(loaded, params)
  np.testing.assert_array_equal(loaded["params"]["dense"]["kernel"],
                                params["params"]["dense"]["kernel"])


def test_the_template_dtype_wins_over_the_saved_one(tmp_path):
  """Saved as JAX float32 and loaded with a NumPy float64 template, the leaves came back as
  float32 JAX arrays although the docstring promises the template's dtypes; a JAX template of
  another float dtype is cast too."""
  path = str(tmp_path / "c")
  jaxprune.save_checkpoint(path, {"w": jnp.array([1.5, 2.0]), "b": jnp.array([0.25])})
  loaded, _ = jaxprune.load_checkpoint(path, {"w": np.zeros(2, np.float64),
                                              "b": jnp.zeros(1, jnp.bfloat16)})
  assert isinstance(loaded["w"], np.ndarray) and loaded["w"].dtype == np.float64
  np.testing.assert_array_equal(loaded["w"], [1.5, 2.0])
  assert loaded["b"].dtype == jnp.bfloat16 and float(loaded["b"][0]) == 0.25
  shapes, _ = jaxprune.load_checkpoint(path, {"w": jax.ShapeDtypeStruct((2,), jnp.float16),
                                              "b": jax.ShapeDtypeStruct((1,), jnp.float32)})
  assert shapes["w"].dtype == jnp.float16 and shapes["b"].dtype == jnp.float32
