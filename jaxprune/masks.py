"""Weight masks and unit masks as pytrees: create, check, apply, count, summarise.

* A **weight mask** has the structure of the params, with a bool array of the same shape at
  every leaf (never ``None``): True keeps the weight.
* A **unit mask** is a dict from a unit group's name to a bool vector, one entry per unit.

Example:
  >>> import jax, jaxprune
  >>> model = jaxprune.MLP(in_features=10, hidden=(20,), out_features=7)
  >>> params = model.init(jax.random.key(0))
  >>> units = jaxprune.unit_masks_ones(model)
  >>> units['hidden_0'] = units['hidden_0'].at[:5].set(False)
  >>> wmask = jaxprune.expand(params, model, units)
  >>> kept, total = jaxprune.count_weights(wmask)
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import units as units_lib

groups_of = units_lib.groups_of   # in units: compact and uncompact resolve targets too

PyTree = Any


def host_built(like: PyTree, value: np.ndarray) -> jax.Array:
  """``value`` (built on the host) as a device array: ``jnp.ones`` / ``jnp.zeros`` would compile
  small XLA programs per new shape on a first call. When ``like`` holds a tracer (inside a
  trace: ``jit``, ``vmap``, an optimizer's traced init) it is built the traced way."""
  if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(like)):
    return jnp.asarray(value)
  return jax.device_put(value)


def ones_like(params: PyTree) -> PyTree:
  """All-True weight masks with the structure and shapes of ``params``; each mask of a param
  placed on purpose (a committed array: sharded over devices, or put on one) is placed as its
  param is, so the masks of leaves a pruner leaves alone sit with them too."""
  leaves = jax.tree.leaves(params)
  bad = next((x for x in leaves if not (hasattr(x, "shape") or isinstance(
      x, (int, float, complex, np.generic)))), None)
  if bad is not None:
    raise TypeError(
        f"ones_like takes params (a pytree of arrays) and gives their weight masks; it got "
        f"a leaf of type {type(bad).__name__}. For a model's unit masks use "
        "jaxprune.unit_masks_ones(model); for weight masks pass the params, "
        "jaxprune.ones_like(params).")
  tracer = next((x for x in leaves if isinstance(x, jax.core.Tracer)), None)   # looked for once

  def one(p):
    value = np.ones(np.shape(p), dtype=bool)
    if tracer is None and isinstance(p, jax.Array) and p.committed:
      return jax.device_put(value, p.sharding)
    return host_built(() if tracer is None else tracer, value)

  return jax.tree.map(one, params)


def unit_masks_ones(model_or_groups) -> dict[str, jax.Array]:
  """All-True unit masks, one bool vector per unit group of a model."""
  groups = groups_of(model_or_groups, "unit_masks_ones",
                     " For weight masks of params use jaxprune.ones_like(params).")
  return {name: host_built((), np.ones((g.size,), dtype=bool)) for name, g in groups.items()}


def _is_target(x) -> bool:
  return hasattr(x, "groups") or (isinstance(x, Mapping) and bool(x) and all(
      isinstance(v, units_lib.UnitGroup) for v in x.values()))


_MASKED_NODE_FIX = ("inside optax.multi_transform or optax.masked each branch sees "
                    "optax.MaskedNode() for the other branches' leaves: wrap the whole optimizer, "
                    "jaxprune.masked_optimizer(optax.multi_transform(...), masks), or put "
                    "optax.MaskedNode() at the same places in the masks")


def _is_array_leaf(x) -> bool:
  """A pytree leaf (an array), not a node: not ``None``, an empty container or a node type."""
  treedef = jax.tree.structure(x)
  return treedef.num_nodes == 1 and treedef.num_leaves == 1


def _node_children(node) -> list:
  """One level of a pytree node: its ``(key, child)`` pairs, leafless children (``None``, an
  empty container, ``optax.MaskedNode()``) included."""
  return jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)[0]


def _leafless_difference(path: tuple, params_child, masks_child) -> str:
  """The message for a node without leaves (None, ``optax.MaskedNode()``, an empty dict) that
  one tree holds at ``path`` and the other lacks (``_MISSING``)."""
  where = jax.tree_util.keystr(path)
  if masks_child is _MISSING:
    what = _kind(params_child)
    hint = f" ({_MASKED_NODE_FIX})" if what == "MaskedNode" else ""
    return (f"at {where} the params hold a {what}, which has no leaves, and the masks "
            f"nothing; give the masks the same node there{hint}")
  what = _kind(masks_child)
  return (f"at {where} the masks hold a {what}, which has no leaves, and the params "
          "nothing; remove it from the masks")


_MISSING = object()


def _kind(x) -> str:
  return "None" if x is None else type(x).__name__


def _a_kind(x) -> str:
  """``x``'s type with its article: 'a dict', 'an OrderedDict', 'None'."""
  kind = _kind(x)
  return kind if x is None else f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"


def _container_difference(params: PyTree, masks: PyTree) -> str:
  """Where two trees with the same leaf paths differ, breadth first: the first node of another
  type (a flax ``FrozenDict`` against a ``dict``, an nnx ``State`` against its pure dict), or
  the first leafless child (``None``, ``optax.MaskedNode()``, an empty container) one holds
  and the other lacks, in a dict, a list, a tuple or any other pytree node."""
  pending = [((), params, masks)]
  while pending:
    path, p, m = pending.pop(0)
    if _is_array_leaf(p) and _is_array_leaf(m):   # a jax against a NumPy array: same structure
      continue
    if type(p) is not type(m):
      where = jax.tree_util.keystr(path) or "the root"
      return (f"at {where} the params are {_a_kind(p)} but the masks {_a_kind(m)}; build "
              "the masks in the params' container types")
    if isinstance(p, Mapping):
      for k in p:
        if k not in m:
          return _leafless_difference(path + (jax.tree_util.DictKey(k),), p[k], _MISSING)
      for k in m:
        if k not in p:
          return _leafless_difference(path + (jax.tree_util.DictKey(k),), _MISSING, m[k])
      pending.extend((path + (jax.tree_util.DictKey(k),), p[k], m[k]) for k in p)
      continue
    p_children, m_children = dict(_node_children(p)), dict(_node_children(m))
    for k, child in p_children.items():   # k: a key path one key long
      if k not in m_children:   # e.g. a tuple's trailing None the masks' shorter tuple lacks
        return _leafless_difference(path + k, child, _MISSING)
    for k, child in m_children.items():
      if k not in p_children:
        return _leafless_difference(path + k, _MISSING, child)
    if (jax.tree.structure(p, is_leaf=lambda x: x is not p)
        != jax.tree.structure(m, is_leaf=lambda x: x is not m)):
      where = jax.tree_util.keystr(path) or "the root"
      return (f"at {where} the params' and the masks' {type(p).__name__} nodes differ in their "
              "static (non-array) fields; build the masks from the params, e.g. "
              "jaxprune.ones_like(params)")
    pending.extend((path + k, child, m_children[k]) for k, child in p_children.items())
  return "the same leaves in different containers"


def _nnx_variable_hint(missing: list, extra: list) -> str:
  """When one tree holds nnx Variables where the other holds their plain arrays (the same paths
  but for a trailing ``.value``: an ``nnx.State`` against ``nnx.to_pure_dict``): the fix."""
  def bare(paths):
    if not paths or not all(p and isinstance(p[-1], jax.tree_util.GetAttrKey)
                            and p[-1].name == "value" for p in paths):
      return None
    return {p[:-1] for p in paths}
  if missing and bare(missing) == set(extra):
    return ("The params are nnx Variables (an nnx.State, as nnx.Optimizer holds them) and the "
            "masks plain arrays (nnx.to_pure_dict): make the masks from that same state, "
            "jaxprune.ones_like(state) (e.g. state = nnx.state(model, nnx.Param)), or pass "
            "plain-dict params too")
  if extra and bare(extra) == set(missing):
    return ("The masks are nnx Variables (an nnx.State) and the params plain arrays: make the "
            "masks from the plain params (jaxprune.ones_like(params)), or convert them with "
            "nnx.to_pure_dict(masks)")
  return ""


def _unit_mask_hint(params, masks) -> str:
  """When ``masks`` look like unit masks (a flat dict of 1-D masks, one per group, none of
  them the shape of a params entry of its key; a traced target's groups are named after their
  kernels' keys): how to make weight masks of them, else ''."""
  if (not isinstance(masks, Mapping) or not masks or not isinstance(params, Mapping)
      or not all(hasattr(m, "shape") and len(m.shape) == 1 for m in masks.values())
      or any(k in params and tuple(jnp.shape(params[k])) == tuple(m.shape)
             for k, m in masks.items() if not isinstance(params.get(k), Mapping))):
    return ""
  return ("These look like unit masks (group name -> one bool per unit); weight masks hold one "
          "bool per weight, in the params' structure: make them with "
          "jaxprune.expand(params, target, unit_masks)")


def _nesting_hint(missing: list, extra: list, masks: Any = None) -> str:
  """When the masks hold exactly the params' leaves one key deeper (masks over a flax model's
  whole variables, given where only ``variables['params']`` is seen, as by an optimizer inside
  :func:`jaxprune.fit`; also beside other collections such as ``batch_stats``), one key
  shallower, or every leaf of the params and more (masks over an nnx model's whole state given
  to an optimizer of its ``nnx.Param`` state): the fix, else ''."""
  if missing and len(extra) > len(missing):
    # masks over a linen model's whole variables: the params' leaves under 'params', other
    # collections (batch statistics) beside them
    for head in {p[0] for p in extra}:
      if {p[1:] for p in extra if p[0] == head} == set(missing):
        k = getattr(head, "key", getattr(head, "idx", getattr(head, "name", head)))
        return (f"The masks hold the params' leaves under an extra key "
                f"{jax.tree_util.keystr((head,))}, beside other collections (masks made over a "
                f"model's whole variables): pass masks[{k!r}] (an optimizer sees only "
                "variables['params'], the trained collection)")
  if not missing and extra:
    # masks over an nnx model's whole state (batch statistics, RNG counts) given where only its
    # nnx.Param state is seen
    fix = ("nnx.filter_state(masks, nnx.Param) for an nnx.Optimizer(..., wrt=nnx.Param)"
           if type(masks).__name__ == "State" else "keeping only the leaves the params have")
    return ("The masks hold every leaf of the params and more: masks made over more than these "
            "params (e.g. over a model's whole state, batch statistics or RNG state included, "
            f"given where only its trained params are seen); filter them to the params, {fix}")
  if not missing or len(missing) != len(extra):
    return ""
  for deeper, shallower, fix in ((extra, missing, "pass masks[{k!r}] (an optimizer given to "
                                  "jaxprune.fit, or a TrainState's, sees only "
                                  "variables['params'], the trained collection)"),
                                 (missing, extra, "pass {{{k!r}: masks}}")):
    heads = {p[0] for p in deeper}
    if len(heads) == 1 and {p[1:] for p in deeper} == set(shallower):
      (head,) = heads
      k = getattr(head, "key", getattr(head, "idx", getattr(head, "name", head)))
      where = "under an extra" if deeper is extra else "without the"
      return (f"The masks hold the params' leaves {where} key {jax.tree_util.keystr((head,))}: "
              + fix.format(k=k))
  return ""


def check_weight_masks(params: PyTree, masks: PyTree) -> None:
  """Raises a ValueError that names the problem if ``masks`` does not fit ``params``.

  Checks the tree structure, each leaf's shape and that each leaf is boolean.
  Works on concrete or traced arrays (only shapes and dtypes are inspected).
  """
  p_paths = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  try:
    m_flat = jax.tree_util.tree_flatten_with_path(masks)[0]
  except Exception as e:  # pragma: no cover - defensive
    raise ValueError(f"Weight masks are not a pytree: {e}") from e
  m_paths = dict(m_flat)
  if (isinstance(masks, (int, float, np.number)) or getattr(masks, "shape", None) == ()) \
      and jax.tree.structure(params) != jax.tree.structure(masks):
    raise ValueError(
        f"Weight masks are one number ({masks!r}), not a pytree of bool arrays shaped like the "
        "params. A number here is usually a setting given in the masks' place: pass the masks "
        "(or None for all-keep masks) second and the setting by name, e.g. "
        "magnitude_prune(params, None, fraction=0.5).")
  if jax.tree.structure(params) != jax.tree.structure(masks):
    missing_keys = [k for k in p_paths if k not in m_paths]
    extra_keys = [k for k in m_paths if k not in p_paths]
    missing = [jax.tree_util.keystr(k) for k in missing_keys]
    extra = [jax.tree_util.keystr(k) for k in extra_keys]
    why = (f"missing leaves: {missing[:5] or 'none'}; unexpected leaves: {extra[:5] or 'none'}"
           if missing or extra else _container_difference(params, masks))
    hint = (_nesting_hint(missing_keys, extra_keys, masks)
            or _nnx_variable_hint(missing_keys, extra_keys) or _unit_mask_hint(params, masks))
    node = lambda x: type(x).__name__ == "MaskedNode"
    if extra and any(node(x) for x in jax.tree.leaves(params, is_leaf=node)):
      why += f"; the params hold optax.MaskedNode() placeholders ({_MASKED_NODE_FIX})"
    elif missing and any(node(x) for x in jax.tree.leaves(masks, is_leaf=node)):
      why += ("; the masks hold optax.MaskedNode() placeholders where no branch of an "
              "optax.multi_transform prunes: take them with jaxprune.masks_of(opt_state, "
              "like=params), which makes those places all-True masks")
    raise ValueError(
        f"Weight masks do not have the structure of the params ({why}"
        + (f"). {hint}." if hint else "). Create them with jaxprune.ones_like(params) or "
           "jaxprune.expand(params, model, ...)."))
  for k, p in p_paths.items():
    m = m_paths[k]
    if m is None or not hasattr(m, "shape"):
      raise ValueError(f"Weight mask at {jax.tree_util.keystr(k)} is {m!r}; every leaf must be a "
                       "bool array (never None).")
    if tuple(m.shape) != tuple(jnp.shape(p)):
      raise ValueError(f"Weight mask at {jax.tree_util.keystr(k)} has shape {tuple(m.shape)} but "
                       f"the parameter has shape {tuple(jnp.shape(p))}.")
    if m.dtype != jnp.bool_:
      swapped = (" If it holds weights, the params and the masks may be swapped: the params come "
                 "first, then the masks." if jnp.issubdtype(m.dtype, jnp.inexact) else "")
      raise ValueError(f"Weight mask at {jax.tree_util.keystr(k)} has dtype {m.dtype}; masks must "
                       f"be bool (use mask.astype(bool) for 0/1 masks).{swapped}")


def check_unit_masks(model_or_groups, unit_masks: Mapping[str, Any], *,
                     allow_empty: bool = False) -> None:
  """Raises if a unit mask names an unknown group, has the wrong shape or dtype, or is empty."""
  groups = groups_of(model_or_groups)
  if not isinstance(unit_masks, Mapping):
    raise ValueError(f"Unit masks must be a dict from group name to bool vector, got "
                     f"{type(unit_masks).__name__}.")
  units_lib.check_mask_keys(groups, unit_masks)
  for name, m in unit_masks.items():
    units_lib.unit_mask(m, groups[name], np)  # a check: nothing compiled
    if not allow_empty and not isinstance(m, jax.core.Tracer) and not bool(np.any(m)):
      raise ValueError(f"Unit mask {name!r} removes every unit of the group; keep at least one.")


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
  """Zeroes the masked weights: ``where(mask, param, 0)`` leaf by leaf. Jit-compatible.

  Raises ValueError (see :func:`check_weight_masks`) if the masks do not fit the params, rather
  than broadcasting a wrong-shaped or non-bool mask silently.
  """
  check_weight_masks(params, masks)
  return zero_masked(params, masks)


def zero_masked(tree: PyTree, masks: PyTree) -> PyTree:
  """:func:`apply_masks` without the check, for callers that checked the masks once already
  (an optimizer step zeroes both the gradients and the params it hands on).

  Called eagerly on arrays (no tracer among the leaves), the whole tree is zeroed by one
  compiled program per tree structure, shapes and dtypes (``_zero_masked_jit``) instead of one
  small program per leaf shape, unless its leaves live on different devices (each is zeroed
  where it lives); under ``jit``/``vmap`` it is the same ``where`` leaf by leaf.
  """
  leaves = jax.tree.leaves(tree) + jax.tree.leaves(masks)
  if leaves and all(isinstance(x, (np.ndarray, jax.Array)) and not isinstance(x, jax.core.Tracer)
                    for x in leaves) and _one_device_set(leaves):
    return _zero_masked_jit(tree, masks)
  return _zero_masked_leaves(tree, masks)


def _one_device_set(leaves) -> bool:
  """Whether the device arrays among ``leaves`` all live on the same devices (one program can
  take them); leaves placed by hand on different devices are zeroed each where it lives."""
  return len({frozenset(x.sharding.device_set) for x in leaves
              if isinstance(x, jax.Array)}) <= 1


def on_one_device(*trees):
  """``trees`` with every array moved to one device of the first array (its lowest id) when
  their arrays live on different device sets (params placed by hand on several devices, which
  no one compiled program takes), else None. A pruner that ranks weights across leaves then
  runs there, and :func:`placed_like` puts its outputs back where the inputs were."""
  arrays = [x for x in jax.tree.leaves(trees)
            if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer)]
  if _one_device_set(arrays):
    return None
  device = min(arrays[0].devices(), key=lambda d: d.id)
  return jax.tree.map(lambda x: jax.device_put(x, device) if isinstance(x, jax.Array) else x,
                      trees)


def placed_like(out: PyTree, like: PyTree) -> PyTree:
  """``out`` with each array placed as the matching leaf of ``like`` is (values traced inside
  an outer ``jit`` stay where that program puts them)."""
  return jax.tree.map(
      lambda o, l: jax.device_put(o, l.sharding) if isinstance(l, jax.Array) and not isinstance(
          o, jax.core.Tracer) and not isinstance(l, jax.core.Tracer) else o, out, like)


def _zero_masked_leaves(tree: PyTree, masks: PyTree) -> PyTree:
  return jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), jnp.asarray(p).dtype)),
                      tree, masks)


_zero_masked_jit = jax.jit(_zero_masked_leaves)


def expand(params: PyTree, target, unit_masks: Mapping[str, Any],
           weight_masks: PyTree | None = None, *, allow_empty: bool = False) -> PyTree:
  """Weight masks that remove the units masked out in ``unit_masks`` (see ``units.expand``).

  Arguments come in the library's one order, ``(params, target, unit_masks)``; ``target`` is
  a built-in model, a traced target or a groups dict. Every group is checked against
  ``params``, and a unit-mask key that names no group raises. A concrete unit mask that removes
  every unit of a group raises (a layer with no units cuts the network), unless
  ``allow_empty``; traced masks (inside ``jit``/``vmap``, e.g. a GA population) are not checked.
  """
  if _is_target(params) and not _is_target(target):
    raise TypeError("jaxprune.expand takes (params, target, unit_masks): the params come first. "
                    "Swap the first two arguments.")
  groups = groups_of(target, "jaxprune.expand")
  units_lib.check_mask_keys(groups, unit_masks)   # a dict, every key a group: before the rest
  for name, m in unit_masks.items():
    # np.asarray: a unit mask is one small vector; np.any on a jax Array would compile a
    # reduction program.
    if (not allow_empty and not isinstance(m, jax.core.Tracer) and np.size(m)
        and not np.any(np.asarray(m))):
      units_lib.unit_mask(m, groups[name], np)   # a wrong shape or dtype is the error to name
      raise ValueError(f"Unit mask {name!r} removes every unit of the group; keep at least one "
                       "unit (or pass allow_empty=True to mask the whole layer on purpose).")
  if weight_masks is not None:
    check_weight_masks(params, weight_masks)
  return units_lib.expand(params, groups, unit_masks, weight_masks)


def count_units(unit_masks: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
  """Group name -> (kept, total) of concrete unit masks (bool vectors, or integer 0/1 ones)."""
  if not isinstance(unit_masks, Mapping):
    raise ValueError(f"count_units takes unit masks, a dict from group name to bool vector; "
                     f"got {type(unit_masks).__name__}.")
  out = {}
  for k, m in unit_masks.items():
    if isinstance(m, jax.core.Tracer):
      raise TypeError(f"count_units counts concrete unit masks, but unit mask {k!r} is traced "
                      "(inside jax.jit or jax.vmap). Call it outside the transformation, on the "
                      "masks it returns; inside, jnp.sum(mask) counts the kept units.")
    if np.ndim(m) != 1:
      raise ValueError(f"Unit mask {k!r} has shape {np.shape(m)}; a unit mask is a vector, one "
                       "entry per unit of its group.")
    m = units_lib.bool_unit_mask(np.asarray(m), k, np)
    out[k] = (int(np.sum(m)), int(np.size(m)))
  return out


def _check_mask_leaves(masks: PyTree, fn: str) -> None:
  """Every leaf of a weight mask is a bool array, and there is at least one (params passed
  where masks belong used to give a 'sparsity' of -2.0, an empty tree 100%)."""
  flat = jax.tree_util.tree_flatten_with_path(masks)[0]
  if not flat:
    raise ValueError(f"{fn} got a tree with no leaves; pass weight masks (a bool pytree like "
                     "the params, e.g. from jaxprune.ones_like(params) or a pruner).")
  for k, m in flat:
    dtype = getattr(m, "dtype", None)
    if dtype is None or dtype != jnp.bool_:
      raise TypeError(f"{fn} takes weight masks (bool leaves); the leaf at "
                      f"{jax.tree_util.keystr(k)} is {dtype if dtype is not None else type(m).__name__}"
                      ". Pass the masks (e.g. the second output of a pruner), not the params, or "
                      "mask.astype(bool).")


def count_weights(masks: PyTree) -> tuple[int, int]:
  """(kept, total) over every leaf of a weight mask (bool leaves). Under ``jit``/``vmap``
  (traced masks) ``kept`` is a traced int32 scalar; ``total`` is always an int."""
  _check_mask_leaves(masks, "count_weights")
  return _counts(masks)


def _counts(masks: PyTree) -> tuple[int, int]:
  leaves = jax.tree.leaves(masks)
  total = int(sum(int(np.size(m)) for m in leaves))
  if any(isinstance(m, jax.core.Tracer) for m in leaves):   # inside jit / vmap
    return sum((jnp.sum(m, dtype=jnp.int32) for m in leaves), jnp.int32(0)), total
  return int(sum(int(np.sum(np.asarray(m))) for m in leaves)), total


def _removed_fraction(kept: int, total: int) -> float:
  """``1 - kept / total``; 0.0 when there are no weights (an empty leaf: 0 of 0 removed)."""
  return 1.0 - kept / total if total else 0.0


def sparsity(masks: PyTree) -> float:
  """Fraction of weights removed (``masks``: bool leaves); a traced float32 scalar under
  ``jit``/``vmap``.

  Empty (size-0) leaves hold no weights: they count as 0 of 0, so a tree of only empty leaves
  has sparsity 0.0 (nothing was pruned), not 1.0.
  """
  _check_mask_leaves(masks, "sparsity")
  kept, total = _counts(masks)
  return _removed_fraction(kept, total)


def summary(masks: PyTree, unit_masks: Mapping[str, Any] | None = None) -> str:
  """A per-layer table of kept weights and sparsity (and kept units per group, if given).

  An empty (size-0) leaf has no weights: its row reads 0 kept of 0, sparsity 0.0% (as
  :func:`sparsity`), not 100%.
  """
  _check_mask_leaves(masks, "summary")
  traced = [k for k, m in jax.tree_util.tree_flatten_with_path(masks)[0]
            if isinstance(m, jax.core.Tracer)]
  if traced:
    raise TypeError(f"summary makes a text table from concrete masks, but the leaf at "
                    f"{jax.tree_util.keystr(traced[0])} is traced (inside jax.jit or jax.vmap). "
                    "Call it outside the jitted function, on the masks it returns; inside, "
                    "jaxprune.sparsity and jaxprune.count_weights work on traced masks.")
  rows = []
  for path, m in jax.tree_util.tree_flatten_with_path(masks)[0]:
    name = units_lib.path_str([k if k is not None else "?" for k in map(units_lib.key_of, path)])
    kept, total = int(np.sum(np.asarray(m))), int(np.size(m))
    rows.append((name, f"{tuple(np.shape(m))}", f"{kept}", f"{total}",
                 f"{100.0 * _removed_fraction(kept, total):.1f}%"))
  kept, total = _counts(masks)
  rows.append(("total", "", f"{kept}", f"{total}",
               f"{100.0 * _removed_fraction(kept, total):.1f}%"))
  header = ("layer", "shape", "kept", "total", "sparsity")
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
  fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))
  lines = [fmt(header), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows]
  if unit_masks:
    lines.append("")
    for name, (k, t) in count_units(unit_masks).items():
      lines.append(f"units {name}: {k}/{t} kept "
                   f"({100.0 * _removed_fraction(k, t):.1f}% removed)")
  return "\n".join(lines)


def print_summary(masks: PyTree, unit_masks: Mapping[str, Any] | None = None, *,
                  flops: Mapping[str, Any] | None = None) -> None:
  """Prints :func:`summary`, then the FLOPs table of ``flops`` (a
  :func:`jaxprune.flops_report`) if given."""
  print(summary(masks, unit_masks))
  if flops is not None:
    from jaxprune import flops as flops_lib  # pylint: disable=g-import-not-at-top (cycle)
    print()
    print(flops_lib.format_flops(flops))
