"""Saving and loading params and their masks together, with orbax-checkpoint.

One checkpoint folder holds ``{'params': ..., 'masks': ...}`` (weight masks as bool arrays, and
optionally unit masks), so a pruned network is restored with the masks that keep it pruned.
Beside orbax's files, ``jaxprune_files.json`` lists every file with its size and CRC-32, so a
checkpoint whose files were lost, cut short or changed after it was written is named as damaged
(which file, how) before orbax reads anything: orbax itself fails on such data in ways that
depend on which file is hit, and leaves asyncio errors behind in the process.

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

import json
import os
import shutil
import tempfile
import zlib
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import masks as masks_lib
from jaxprune import units as units_lib

PyTree = Any


def _checkpointer():
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top  (heavy; on first use)
  return ocp, ocp.StandardCheckpointer()


def _where(k) -> str:
  """A leaf of the saved ``{'params': ..., 'masks': ..., 'unit_masks': ...}`` named as the
  caller indexes it: ``params['o']`` (the argument, then the keys within it)."""
  return _name(k[0]) + jax.tree_util.keystr(tuple(k[1:]))


def _check_leaves(tree: PyTree) -> None:
  """Raises naming the first leaf orbax cannot write, or two leaves it would store under one
  name (before anything is written)."""
  named = {}
  for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if not isinstance(x, (jax.Array, np.ndarray, np.generic, int, float)) and not hasattr(
        x, "__array__"):
      raise TypeError(f"Cannot checkpoint the leaf {_where(k)}: it is of type "
                      f"{type(x).__name__!r}; every leaf must be an array or a number.")
    if isinstance(x, jax.core.Tracer):
      raise TypeError(f"Cannot checkpoint the leaf {_where(k)}: it is a traced value (a save "
                      "inside jax.jit, vmap or grad has no values to write). Call "
                      "save_checkpoint outside the transformed function, on the values it "
                      "returns.")
    if isinstance(x, jax.Array) and x.is_deleted():
      raise ValueError(f"Cannot checkpoint the leaf {_where(k)}: the array has been deleted "
                       "(donated to a jitted call, or .delete()d). Save the values the call "
                       "returned instead.")
    kind = getattr(x, "dtype", None)
    kind = np.asarray(x).dtype if kind is None else kind
    if not (jax.dtypes.issubdtype(kind, jax.dtypes.prng_key) or jnp.issubdtype(kind, jnp.number)
            or jnp.issubdtype(kind, jnp.bool_)):
      raise TypeError(f"Cannot checkpoint the leaf {_where(k)}: its dtype {kind} is not a "
                      "number (orbax-checkpoint stores bool, integer, float and complex "
                      "arrays). Leave it out of what you save, or encode it as numbers.")
    if not isinstance(x, (int, float)) and 0 in tuple(np.shape(x)):
      raise ValueError(f"Cannot checkpoint the leaf {_where(k)}: it has shape "
                       f"{tuple(np.shape(x))}, no elements, and orbax-checkpoint cannot store an "
                       "empty array. Leave it out of what you save and rebuild it after loading "
                       "(it holds no values).")
    # orbax names a leaf by its keys joined with '.': {'a.b': x} and {'a': {'b': y}} would be
    # one entry, and both would load as the same values.
    name = ".".join(_name(p) for p in k)
    if name in named:
      raise ValueError(f"Cannot checkpoint both {_where(named[name])} and "
                       f"{_where(k)}: orbax stores a leaf under its keys joined "
                       f"with '.', and both are {name!r}, so one would overwrite the other. "
                       "Rename a key so that no key with a '.' spells another leaf's path.")
    named[name] = k


def save_checkpoint(path: str, params: PyTree, masks: PyTree | None = None, *,
                    unit_masks: dict | None = None, overwrite: bool = False,
                    target=None) -> None:
  """Saves params, their weight masks (and unit masks) in one orbax checkpoint at ``path``.

  The checkpoint is written to a temporary folder beside ``path`` and moved into place only once
  it is complete, so a save that fails leaves whatever was at ``path`` (with ``overwrite``, the old
  checkpoint) as it was, and no partial folder behind. A process killed while saving leaves a
  ``.NAME.jaxprune-tmp-*`` folder beside it: with ``NAME`` in place it is debris and can be
  deleted; killed with ``overwrite`` between moving the old checkpoint aside and moving the new
  one in (two renames), ``NAME`` is missing and that folder holds both, the old one in ``old``
  and the complete new one in ``ckpt``: move either back to ``NAME`` first. A ``path`` that is
  a symbolic link is written through: the link's target is replaced. One process writes the
  checkpoint.

  Args:
    path: a folder (created; must not exist unless ``overwrite``).
    params: the params pytree.
    masks: weight masks (bool pytree like ``params``), or None.
    unit_masks: optional ``{group: bool vector}``.
    overwrite: replace an existing checkpoint (only after the new one is written); a folder
      that holds anything but a checkpoint, or a file, is refused (FileExistsError).
    target: the model (or ``jaxprune.trace(...)`` target) the masks belong to; when given,
      each unit mask is checked against its group (a name it lacks, a wrong length) before
      anything is written. Without it only the weight masks can be checked (against params).
  """
  if masks is not None:
    masks_lib.check_weight_masks(params, masks)
  if unit_masks:   # vectors as arrays (a list of bools would be saved as a list of scalars)
    unit_masks = {k: v if hasattr(v, "shape") else np.asarray(v) for k, v in unit_masks.items()}
    for k, v in unit_masks.items():
      if np.ndim(v) != 1:
        raise ValueError(f"Unit mask {k!r} has shape {tuple(np.shape(v))}; a unit mask is a "
                         "vector with one bool per unit of its group.")
    # bool, or integer 0/1 saved as the bool mask it means (it loaded back as int32); float
    # scores refused
    unit_masks = {k: v if v.dtype == np.bool_ else units_lib.bool_unit_mask(v, k, np)
                  for k, v in unit_masks.items()}
  if target is not None and unit_masks:
    masks_lib.check_unit_masks(target, unit_masks, allow_empty=True)
  # through a link ('latest' -> 'step_N'): replace its target
  path = os.path.realpath(os.path.expanduser(path))
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f"{path} exists; pass overwrite=True to replace it or choose a new "
                          "path.")
  try:
    cwd = os.path.realpath(os.getcwd())
  except FileNotFoundError:   # the working folder is gone: it cannot be the path
    cwd = None
  if cwd is not None and (cwd == path or cwd.startswith(path.rstrip(os.sep) + os.sep)):
    raise ValueError(f"{path} is this process's working folder or holds it; replacing it would "
                     "leave the process in a deleted folder (every relative path failing "
                     "after). Save into a sub-folder, e.g. save_checkpoint('ckpt', ...).")
  _check_replaceable(path)
  tree = {"params": params}
  if masks is not None:
    tree["masks"] = masks
  if unit_masks:
    tree["unit_masks"] = dict(unit_masks)
  _check_leaves(tree)
  parent, name = os.path.split(path)
  try:
    os.makedirs(parent, exist_ok=True)
  except (FileExistsError, NotADirectoryError) as e:
    blocker = parent
    while not os.path.exists(blocker) and os.path.dirname(blocker) != blocker:
      blocker = os.path.dirname(blocker)   # the nearest existing ancestor: a file
    raise FileExistsError(f"Cannot make the folder {parent} for the checkpoint {path}: "
                          f"{blocker} is a file. Choose a path under a folder.") from e
  # Orbax writes (and, on failure, may leave its own *.orbax-checkpoint-tmp folder) inside a
  # private sibling folder, so nothing at ``path`` is touched until the new checkpoint is whole.
  work = tempfile.mkdtemp(prefix=f".{name}.jaxprune-tmp-", dir=parent)
  try:
    new = os.path.join(work, "ckpt")
    _, ckptr = _checkpointer()
    ckptr.save(new, tree)
    ckptr.wait_until_finished()
    _write_manifest(new)
    old = None
    if os.path.lexists(path):
      if not overwrite:  # made by someone else while we wrote
        raise FileExistsError(f"{path} appeared while saving; pass overwrite=True to replace it "
                              "or choose a new path.")
      _check_replaceable(path)
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


# Files orbax writes at the top of a checkpoint folder (any of its formats).
_ORBAX_FILES = ("_CHECKPOINT_METADATA", "_METADATA", "manifest.ocdbt", "commit_success.txt")
# jaxprune's list of the checkpoint's files: {relative path: [size in bytes, CRC-32]}.
_MANIFEST = "jaxprune_files.json"


def _crc32(file: str) -> int:
  crc = 0
  with open(file, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      crc = zlib.crc32(chunk, crc)
  return crc


def _files(folder: str) -> list:
  """Every file under ``folder``, as sorted paths relative to it (the manifest left out)."""
  out = []
  for root, _, names in os.walk(folder):
    for n in names:
      rel = os.path.relpath(os.path.join(root, n), folder)
      if rel != _MANIFEST:
        out.append(rel)
  return sorted(out)


def _write_manifest(folder: str) -> None:
  files = {rel: [os.path.getsize(os.path.join(folder, rel)), _crc32(os.path.join(folder, rel))]
           for rel in _files(folder)}
  with open(os.path.join(folder, _MANIFEST), "w") as f:
    json.dump({"format": 1, "files": files}, f, indent=0, sort_keys=True)


def _check_manifest(path: str) -> None:
  """Raises the 'incomplete or damaged' ValueError naming the first file that is missing, of
  another size or with other bytes than when the checkpoint was written. A checkpoint without
  the manifest (written by another program, or by jaxprune before it kept one) is not checked."""
  file = os.path.join(path, _MANIFEST)
  if not os.path.exists(file):
    return
  try:
    with open(file) as f:
      files = json.load(f)["files"]
    listed = {str(rel): (int(size), int(crc)) for rel, (size, crc) in files.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise ValueError(_damaged(path, f"its file list {_MANIFEST} cannot be read: "
                                    f"{type(e).__name__}: {e}")) from e
  for rel, (size, crc) in sorted(listed.items()):
    here = os.path.join(path, rel)
    if not os.path.isfile(here):
      raise ValueError(_damaged(path, f"{rel} is missing"))
    have = os.path.getsize(here)
    if have != size:
      raise ValueError(_damaged(path, f"{rel} has {have} bytes, {size} when written"))
    if _crc32(here) != crc:
      raise ValueError(_damaged(path, f"the bytes of {rel} changed after it was written"))


def _check_replaceable(path: str) -> None:
  """``overwrite=True`` replaces a checkpoint or an empty folder, nothing else: a mistyped path
  must not delete a folder of results."""
  if not os.path.lexists(path):
    return
  if os.path.isdir(path):
    entries = sorted(os.listdir(path))
    if not entries or any(f in entries for f in _ORBAX_FILES):
      return
    shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
    n = len(entries)
    what = f"a folder that is not a checkpoint (it holds {n} entr{'y' if n == 1 else 'ies'}: {shown})"
  else:
    what = "a file, not a checkpoint folder"
  raise FileExistsError(f"{path} is {what}; overwrite=True only replaces a checkpoint (or an "
                        "empty folder). Choose another path, or move it away yourself.")


def _damaged(path: str, why: str) -> str:
  return (f"The checkpoint at {path} is incomplete or damaged ({why}): files were lost or cut "
          "short after it was written. Restore the folder from a copy, or save the checkpoint "
          "again.")


def _name(k) -> str:
  """One key of a pytree path as orbax names it in a checkpoint."""
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _leafless(x) -> bool:
  """A node without leaves that orbax keeps in a checkpoint's structure: None or an empty
  dict, list or tuple (a template must have one where the checkpoint has one)."""
  return x is None or (isinstance(x, (Mapping, list, tuple)) and not x)


def _flat(tree: PyTree, prefix: str, is_leaf=None) -> dict:
  """``{names: (display path, leaf)}`` for the leaves of ``tree``, shown as ``prefix[...]``."""
  return {tuple(_name(k) for k in ks): (prefix + jax.tree_util.keystr(ks), x)
          for ks, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]}


def _describe(x) -> str:
  if _leafless(x):
    return "None" if x is None else f"an empty {type(x).__name__}"
  return f"shape {tuple(np.shape(x))} {np.result_type(x) if not hasattr(x, 'dtype') else x.dtype}"


def _stored_shape(x) -> tuple:
  """The shape a leaf has in a checkpoint: a typed PRNG key (``jax.random.key``) is stored as
  its key data, with the implementation's trailing axis (``(2,)`` for threefry)."""
  dtype = getattr(x, "dtype", None)
  if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
    return tuple(jax.eval_shape(jax.random.key_data, x).shape)
  return tuple(np.shape(x))


def _check_template(path: str, saved: PyTree, template: PyTree) -> dict:
  """Raises a ValueError naming the first leaf where ``template`` and the saved params differ in
  name or shape (dtypes may differ: the restored leaves are cast to the template's), or where
  the cast would lose values whatever they are (:func:`_lossy_cast`). Returns the leaves whose
  integers go to a type of a narrower range, to check by value after loading:
  ``{names: (shown, restored dtype, template dtype)}`` (:func:`_narrowing`)."""
  narrow = {}
  have = _flat(saved, "params", is_leaf=_leafless)
  want = _flat(template, "params", is_leaf=_leafless)
  fix = ("Pass as params_template the params of the model that was saved (same names and shapes; "
         "dtypes may differ and are cast), or params_template=None to load it as saved.")
  for names, (shown, t) in want.items():
    if names not in have:
      listed = ", ".join(s for s, _ in list(have.values())[:4]) + (", ..." if len(have) > 4 else "")
      raise ValueError(f"The checkpoint at {path} does not fit the params template: {shown} is in "
                       f"the template but not in the checkpoint (which has {listed}). "
                       f"{_nnx_hint(names, have) or fix}")
    s_shown, s = have[names]
    if _leafless(s) and _leafless(t):   # None and an empty container alike: no values
      continue
    if _leafless(s) or _leafless(t) or tuple(s.shape) != _stored_shape(t):
      size = ""
      if not (_leafless(s) or _leafless(t)) and len(s.shape) == len(_stored_shape(t)):
        smaller = all(a <= b for a, b in zip(_stored_shape(t), s.shape))
        larger = all(a >= b for a, b in zip(_stored_shape(t), s.shape))
        if smaller:
          size = (" The template is smaller along an axis, as compacted params are: pruned params "
                  "are saved at full size (with their masks); load them with the full model's "
                  "template, then compact (model.compact(params, unit_masks)).")
        elif larger:
          size = (" The template is larger along an axis: the checkpoint may hold compacted "
                  "params; pass the compacted model's params as the template.")
      raise ValueError(f"The checkpoint at {path} does not fit the params template: at {shown} the "
                       f"checkpoint has {_describe(s)}, the template {_describe(t)}.{size} {fix}")
    lossy = _lossy_cast(s, t)
    if lossy:
      raise ValueError(f"The checkpoint at {path} does not fit the params template: at {shown} the "
                       f"checkpoint has {lossy}, which casting to the template's dtype would lose "
                       "(weight masks passed as the params template?). Pass the params of the "
                       "model that was saved as params_template (a float dtype of your choice "
                       "casts), or params_template=None to load it as saved.")
    dtypes = _narrowing(s, t)
    if dtypes:
      narrow[names] = (shown, *dtypes)
  for names, (shown, s) in have.items():
    if names not in want:
      what = f" ({_describe(s)})" if _leafless(s) else ""
      raise ValueError(f"The checkpoint at {path} does not fit the params template: it has "
                       f"{shown}{what}, which the template lacks. {fix}")
  return narrow


def _lossy_cast(saved, template) -> str:
  """'' when the saved leaf's values survive a cast to the template leaf's dtype as the
  template asks (a float width of the user's choice: bfloat16 params from float32 ones);
  else what would be lost whatever the values: floating values cast to a bool or integer
  template (weight masks given as the params template turn every weight into True), complex
  values to a real one (the imaginary parts). Integers cast to a narrower type are checked by
  value (:func:`_narrowing`)."""
  have = getattr(saved, "dtype", None)
  want = _abstract(template).dtype
  if have is None or jax.dtypes.issubdtype(want, jax.dtypes.prng_key):
    return ""
  if jnp.issubdtype(have, jnp.complexfloating) and not jnp.issubdtype(want, jnp.complexfloating):
    return f"{have} values and the template {want} (their imaginary parts)"
  if jnp.issubdtype(have, jnp.inexact) and not jnp.issubdtype(want, jnp.inexact):
    return f"{have} values and the template {want}"
  return ""


def _narrowing(saved, template) -> tuple | None:
  """``(restored dtype, template dtype)`` when saved integers go to a bool or integer template
  leaf of a narrower range (int32 into uint8: 300 would load as 44), else None. They are
  restored as JAX holds the saved dtype (int64 is int32 with x64 off, as it would load anyway)
  and checked by value before the cast; a Python int saved as int64 loads into an int32
  template as before."""
  have = getattr(saved, "dtype", None)
  if have is None or not jnp.issubdtype(have, jnp.integer):
    return None
  want = _abstract(template).dtype
  if jax.dtypes.issubdtype(want, jax.dtypes.prng_key):   # key data, stored as integers
    return None
  if not isinstance(template, (np.ndarray, np.generic)):
    want = jax.dtypes.canonicalize_dtype(want)
  held = jax.dtypes.canonicalize_dtype(have)
  if want == jnp.bool_:
    return held, want
  if jnp.issubdtype(want, jnp.integer):
    h, w = jnp.iinfo(held), jnp.iinfo(want)
    if w.min > h.min or w.max < h.max:
      return held, want
  return None


def _check_narrowed(path: str, params: PyTree, narrow: dict) -> None:
  """Raises naming the first leaf of ``narrow`` whose restored integers its template's dtype
  cannot hold."""
  for names, (shown, value) in _flat(params, "params").items():
    if names not in narrow:
      continue
    _, held, want = narrow[names]
    v = np.asarray(value)
    if not v.size:
      continue
    lo, hi = (0, 1) if want == jnp.bool_ else (jnp.iinfo(want).min, jnp.iinfo(want).max)
    if v.min() < lo or v.max() > hi:
      raise ValueError(
          f"The checkpoint at {path} does not fit the params template: at {shown} the "
          f"checkpoint has {held} values from {v.min()} to {v.max()}, which the template's "
          f"{want} cannot hold (they would wrap). Pass a template of the saved integer type "
          f"({held}; a NumPy array keeps it), or params_template=None to load it as saved.")


def _nnx_hint(names: tuple, have: dict) -> str:
  """The fix when a flax nnx ``State`` (whose leaves sit one ``value`` deeper, in their
  Variables) meets the same params saved as its pure dict, or the other way round; else ''."""
  if names[-1:] == ("value",) and names[:-1] in have:
    return ("The checkpoint holds plain arrays where the template (an nnx State) holds "
            "Variables: it was saved from nnx.to_pure_dict(state). Load it with "
            "nnx.to_pure_dict(state) as params_template, then "
            "nnx.replace_by_pure_dict(state, params).")
  if names + ("value",) in have:
    return ("The checkpoint holds nnx Variables (their arrays one 'value' deeper) where the "
            "template holds plain arrays: it was saved from an nnx State. Pass that State "
            "(e.g. nnx.state(model, nnx.Param)) as params_template.")
  return ""


def _abstract(x):
  """A restore target for one template leaf: its shape and dtype (and sharding, if it has one)."""
  if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
  if isinstance(x, (np.ndarray, np.generic)):   # NumPy keeps its own dtype (float64 included)
    return jax.ShapeDtypeStruct(np.shape(x), x.dtype)
  # a Python number: its dtype as JAX would make it (float32 unless x64 is on)
  return jax.ShapeDtypeStruct(np.shape(x), jax.dtypes.canonicalize_dtype(np.result_type(x)))


def _as_template(value, template):
  """A restored leaf in its template leaf's dtype and kind: orbax restores saved float32 as a JAX
  array even for a NumPy float64 template (JAX cannot hold float64 with x64 off), and a leaf
  saved from NumPy as a NumPy array even for a ``ShapeDtypeStruct`` template. Any template leaf
  but a NumPy one (a JAX array, a ``ShapeDtypeStruct``, a Python number) gives a JAX array."""
  if isinstance(template, (np.ndarray, np.generic)):
    return np.asarray(value, template.dtype)
  want = _abstract(template).dtype
  value = _device(value, getattr(template, "sharding", None))
  return value if value.dtype == want else value.astype(want)


def _device(value, sharding=None) -> jax.Array:
  """``value`` as a JAX array (on ``sharding`` when given), not copied when it is one."""
  if isinstance(value, jax.Array):
    return value if sharding is None or value.sharding == sharding else (
        jax.device_put(value, sharding))
  return jax.device_put(np.asarray(value), sharding)


def _mask_as_template(mask, template):
  """A restored weight mask of the kind of its params' template leaf (see :func:`_as_template`):
  orbax restores a leaf as the kind it was saved as (masks saved as JAX arrays came back as JAX
  arrays for a NumPy template, and NumPy masks for a JAX one)."""
  if isinstance(template, (np.ndarray, np.generic)):
    return np.asarray(mask, np.bool_)
  return _device(mask, getattr(template, "sharding", None))


def load_checkpoint(path: str, params_template: PyTree | None = None, *,
                    with_unit_masks: bool = False):
  """Loads what :func:`save_checkpoint` wrote.

  Args:
    path: the checkpoint folder.
    params_template: params of the same model (or ``jax.ShapeDtypeStruct``\\ s): the result gets
      exactly its structure, shapes and dtypes (containers included; saved values are cast to its
      dtypes), and the kind of its leaves, whatever kind was saved: a NumPy leaf loads as a NumPy
      array, any other (a JAX array, a ``ShapeDtypeStruct``, a Python number) as a JAX array (on
      its sharding, if it has one); each weight mask takes the kind of its params leaf, and the
      unit masks are NumPy arrays when every template leaf is one, else JAX arrays. None returns
      nested dicts as saved. Names and shapes must match the saved params, else a ValueError
      names the first leaf that differs.
    with_unit_masks: also return the unit masks (None if none were saved).

  Returns:
    ``(params, masks)`` (masks None if none were saved), or ``(params, masks, unit_masks)``.

  Raises:
    ValueError: the folder is not a jaxprune checkpoint, the template does not fit, or a file
      listed in its ``jaxprune_files.json`` is missing, of another size or changed (checked
      before orbax reads anything; a checkpoint without that list is read unchecked).
  """
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isfile(path):
    raise FileNotFoundError(f"{path} is a file, not a checkpoint folder; pass the folder "
                            "jaxprune.save_checkpoint(path, params, masks) wrote.")
  if not os.path.isdir(path):
    raise FileNotFoundError(f"No checkpoint at {path}; save one with "
                            "jaxprune.save_checkpoint(path, params, masks).")
  _check_manifest(path)
  _, ckptr = _checkpointer()
  not_ours = (f"{path} is not a jaxprune checkpoint (one written by "
              "jaxprune.save_checkpoint(path, params, masks), holding 'params' and optionally "
              "'masks' and 'unit_masks')")
  try:
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
  except Exception as e:  # no orbax metadata there at all
    raise ValueError(f"{not_ours}: orbax cannot read its metadata "
                     f"({type(e).__name__}: {e}).") from e
  if meta is None and any(os.path.exists(os.path.join(path, f)) for f in _ORBAX_FILES):
    raise ValueError(_damaged(path, "orbax finds its files but no metadata of the saved tree"))
  if not isinstance(meta, dict) or "params" not in meta:
    found = f"it holds {sorted(meta)}" if isinstance(meta, dict) else "orbax finds no metadata"
    raise ValueError(f"{not_ours}: {found}.")
  target = None
  if params_template is not None:
    narrow = _check_template(path, meta["params"], params_template)

    def restore_as(ks, t):   # narrowing integers: restored as saved, checked, then cast
      a = _abstract(t)
      got = narrow.get(tuple(_name(k) for k in ks))
      return a if got is None else jax.ShapeDtypeStruct(a.shape, got[1], sharding=a.sharding)
    sds = jax.tree_util.tree_map_with_path(restore_as, params_template)
    target = {"params": sds}
    if "masks" in meta:
      if _flat(meta["masks"], "params").keys() != _flat(meta["params"], "params").keys():
        raise ValueError(f"{not_ours}: its 'masks' do not have the names of its 'params'.")
      target["masks"] = jax.tree.map(
          lambda s: jax.ShapeDtypeStruct(s.shape, np.bool_, sharding=s.sharding), sds)
    if "unit_masks" in meta:  # their shapes come from the checkpoint: they are not in the params
      target["unit_masks"] = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), meta["unit_masks"])
  try:
    tree = ckptr.restore(path, target)
  except Exception as e:  # metadata readable, data not: most often lost or cut-short files
    raise ValueError(f"The checkpoint at {path} could not be read ({type(e).__name__}: {e}). "
                     "If its files were lost or cut short after it was written, restore the "
                     "folder from a copy or save the checkpoint again.") from e
  params, masks, units = tree["params"], tree.get("masks"), tree.get("unit_masks")
  if params_template is not None:
    _check_narrowed(path, params, narrow)
    params = jax.tree.map(_as_template, params, params_template)
    if masks is not None:
      masks = jax.tree.map(_mask_as_template, masks, params_template)
    if units is not None:
      numpy = all(isinstance(t, (np.ndarray, np.generic))
                  for t in jax.tree.leaves(params_template))
      units = {k: np.asarray(v) if numpy else _device(v) for k, v in units.items()}
  if masks is not None:
    masks_lib.check_weight_masks(params, masks)
  if with_unit_masks:
    return params, masks, units
  return params, masks
