"""Saving and loading params and their masks together, with orbax-checkpoint.

One checkpoint folder holds ``{'params': ..., 'masks': ...}`` (weight masks as bool arrays, and
optionally unit masks), so a pruned network is restored with the masks that keep it pruned.

Example:
  >>> import tempfile, os, jax, jaxprune
  >>> model = jaxprune.MLP(in_features=4, hidden=(8,), out_features=3)
  >>> params = model.init(jax.random.key(0))
  >>> params, masks, _ = jaxprune.magnitude_prune(params, None, 0.5)
  >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
  >>> jaxprune.save_checkpoint(path, params, masks)
  >>> params2, masks2 = jaxprune.load_checkpoint(path, params)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np

from jaxprune import masks as masks_lib

PyTree = Any


def _checkpointer():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (heavy; on first use)
  return ocp, ocp.StandardCheckpointer()


def _check_leaves(tree: PyTree) -> None:
  """Raises a TypeError naming the first leaf orbax cannot write (before anything is written)."""
  for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not isinstance(x, (jax.Array, np.ndarray, np.generic, int, float)) and not hasattr(
        x, "__array__"):
      raise TypeError(f"Cannot checkpoint the leaf at {jax.tree_util.keystr(k)}: it is of type "
                      f"{type(x).__name__!r}; every leaf must be an array or a number.")


def save_checkpoint(path: str, params: PyTree, masks: PyTree | None = None, *,
                    unit_masks: dict | None = None, overwrite: bool = False) -> None:
  """Saves params, their weight masks (and unit masks) in one orbax checkpoint at ``path``.

  The checkpoint is written to a temporary folder beside ``path`` and moved into place only once
  it is complete, so a save that fails leaves whatever was at ``path`` (with ``overwrite``, the old
  checkpoint) as it was, and no partial folder behind.

  Args:
    path: a folder (created; must not exist unless ``overwrite``).
    params: the params pytree.
    masks: weight masks (bool pytree like ``params``), or None.
    unit_masks: optional ``{group: bool vector}``.
    overwrite: replace an existing checkpoint (only after the new one is written).
  """
  if masks is not None:
    masks_lib.check_weight_masks(params, masks)
  path = os.path.abspath(path)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it or choose a new "
                          "path.")
  tree = {"params": params}
  if masks is not None:
    tree["masks"] = masks
  if unit_masks:
    tree["unit_masks"] = dict(unit_masks)
  _check_leaves(tree)
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  # Orbax writes (and, on failure, may leave its own *.orbax-checkpoint-tmp folder) inside a
  # private sibling folder, so nothing at ``path`` is touched until the new checkpoint is whole.
  work = tempfile.mkdtemp(prefix=f".{name}.jaxprune-tmp-", dir=parent)
  try:
    new = os.path.join(work, "ckpt")
    _, ckptr = _checkpointer()
    ckptr.save(new, tree)
    ckptr.wait_until_finished()
    old = None
    if os.path.lexists(path):
      old = os.path.join(work, "old")
      os.replace(path, old)
    try:
      os.replace(new, path)
    except BaseException:
      if old is not None:
        os.replace(old, path)  # put the old checkpoint back
      raise
  finally:
    shutil.rmtree(work, ignore_errors=True)  # the old checkpoint (after success) or the debris


def load_checkpoint(path: str, params_template: PyTree | None = None, *,
                    with_unit_masks: bool = False):
  """Loads what :func:`save_checkpoint` wrote.

  Args:
    path: the checkpoint folder.
    params_template: params of the same model (or ``jax.ShapeDtypeStruct``\\ s): the result gets
      exactly its structure, shapes and dtypes (containers included); None returns nested dicts.
    with_unit_masks: also return the unit masks (None if none were saved).

  Returns:
    ``(params, masks)`` (masks None if none were saved), or ``(params, masks, unit_masks)``.
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No checkpoint at {path}; save one with "
                            "jaxprune.save_checkpoint(path, params, masks).")
  ocp, ckptr = _checkpointer()
  meta = ckptr.metadata(path)
  keys = set(getattr(meta, "item_metadata", meta) or ())
  target = None
  if params_template is not None:
    sds = jax.tree.map(ocp.utils.to_shape_dtype_struct, params_template)
    target = {"params": sds}
    if "masks" in keys:
      target["masks"] = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, np.bool_), sds)
    if "unit_masks" in keys:
      target = None  # unit masks' shapes are not known from the params: restore as saved
  tree = ckptr.restore(path, target)
  params, masks = tree["params"], tree.get("masks")
  if params_template is not None and target is None:
    treedef = jax.tree.structure(params_template)
    params = jax.tree.unflatten(treedef, jax.tree.leaves(params))
    if masks is not None:
      masks = jax.tree.unflatten(treedef, jax.tree.leaves(masks))
  if masks is not None:
    masks_lib.check_weight_masks(params, masks)
  if with_unit_masks:
    return params, masks, tree.get("unit_masks")
  return params, masks
