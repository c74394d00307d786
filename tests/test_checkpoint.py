"""save_checkpoint / load_checkpoint: the template decides names, shapes and dtypes; a failed
overwrite keeps the old checkpoint; mismatches and foreign checkpoints raise jaxprune errors."""

import os

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


# ---------------------------------------------------- a failed overwrite loses nothing (finding 2)


def test_failed_overwrite_keeps_the_old_checkpoint_and_leaves_no_temp_folder(tmp_path):
  path, params, masks = _save(tmp_path, UNITS)
  with pytest.raises((TypeError, ValueError)):
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
