"""Unit groups: which parameter slices make up one neuron or channel.

A *unit* is one hidden neuron (dense layer) or one output channel (conv). Removing it touches
several parameters: its incoming kernel slice and bias, and any normalisation parameters (the
*producer* side), and the next layer's kernel rows that read it (the *consumer* side). A model
declares each prunable group once, as a :class:`UnitGroup`; everything structured (expanding
unit masks to weight masks, merging units, compaction) works from that declaration alone.

Paths are tuples of keys into the model's variables, e.g. ``('params', 'hidden_0', 'kernel')``:
dict keys (of any type: an nnx ``Sequential``'s layers are ``0, 1, ...``), list or tuple
indices, and attribute names (a NamedTuple's fields), as ``jax.tree_util`` names them.

Example:
  >>> import jax.numpy as jnp
  >>> g = UnitGroup('h', 3, (
  ...     Slice(('params', 'a', 'kernel'), axis=1, role='producer'),
  ...     Slice(('params', 'b', 'kernel'), axis=0, role='consumer', bias=('params', 'b', 'bias'))))
  >>> params = {'params': {'a': {'kernel': jnp.ones((2, 3))},
  ...                      'b': {'kernel': jnp.ones((3, 4)), 'bias': jnp.zeros(4)}}}
  >>> small = compact(params, {'h': g}, {'h': jnp.array([True, False, True])})
  >>> small['params']['b']['kernel'].shape
  (2, 4)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Path = tuple[Any, ...]   # dict keys, list/tuple indices, attribute names
PyTree = Any
Role = Literal["producer", "consumer"]
ACTIVATIONS = ("sigmoid", "tanh", "relu", "linear", "other")
# What a slice is: a kernel (weights contracted with activations), a bias added to a kernel's
# output, or a normalisation's scale, shift or statistic (running mean and variance).
SLICE_KINDS = ("kernel", "bias", "scale", "shift", "stat")
# A padded consumer's reason (Slice.padded_why) for a zero-padded convolution.
ZERO_PADDED_CONV = ("a zero-padded ('SAME') convolution, where a constant channel adds less at "
                    "the borders than elsewhere")


@dataclasses.dataclass(frozen=True)
class Slice:
  """One parameter slice that belongs to every unit of a group.

  Attributes:
    path: keys from the root of the variables dict to the leaf.
    axis: the axis of the leaf (after ``view``) that indexes units.
    role: ``'producer'`` (computes the unit: kernel columns, bias, norm scale) or
      ``'consumer'`` (reads the unit: the next layer's kernel rows).
    view: optional shape to reshape the leaf to before indexing ``axis``. A dense layer after
      ``flatten`` of an (H, W, C) map has a kernel of shape (H*W*C, out); with
      ``view=(H*W, C, out)`` and ``axis=1`` channel c owns rows c, c+C, c+2C, ...
    bias: for a consumer, the path of the consuming layer's bias, so that a removed unit's
      constant contribution can be folded into it.
    padded: for a consumer, True when a constant unit's contribution varies with the position
      or the step: a zero-padded ('SAME') or input-dilated (transposed) convolution (less at the
      borders, or between inputs), a recurrent reader (the initial state at the first
      step), or a reader through an op that changes a constant (a sum, a zero pad, an
      average counting padding, a scaling), so folding it into a bias is not exact (see
      ``UnitGroup.exact_constant_fold``).
    padded_why: for a padded consumer, what it reads the units through, in words, for the
      errors that refuse a fold (``trace`` records it; the built-in models say "a zero-padded
      ('SAME') convolution"). None: the errors list every possible cause. Not compared.
    kind: what the slice is: ``'kernel'`` (weights contracted with activations: a producer's
      columns or a consumer's rows), ``'bias'`` (added to the producer kernel's output),
      ``'scale'``, ``'shift'`` or ``'stat'`` (a normalisation's scale, shift, or running
      statistic). Pruners read kernels and biases by kind, never by name.
    segment: for a leaf that several groups share along one axis (a layer reading the
      concatenation of two layers' outputs), ``(start, length)``: this group's units are entries
      ``start .. start + length - 1`` of the (viewed) axis. None: the whole axis.
    out_axes: for a consumer, the leaf's axes that are the consuming layer's outputs, in the
      order of its bias's axes (``trace`` records them where they are not the last axes: (0,)
      for a PyTorch-layout OIHW conv kernel, (0, 2) for a vmapped ensemble's (members, in, out)
      kernel). None: the outputs are the last axes in order (Flax and JAX layouts).
    max_pooled: for a consumer, True when it reads the units through a maximum or minimum (max
      pooling): a constant unit reaches it unchanged, but a linear combination of units does
      not, so redistributing a unit's weights over others (``group_redundancy``,
      distinctiveness' ``fold``) is not exact (see ``UnitGroup.exact_linear_fold``).
    positions_in_order: for a consumer, False when it reads the units' map with its positions
      moved (a flip, a roll, a transpose or a gather between the activations and a flatten):
      then its rows of position p do not read the activations' position p, and values per
      position (``compensate``'s means) are averaged over the positions before they are folded
      (see :func:`bias_contribution`). ``trace`` records it; declared slices keep True.
  """

  path: Path
  axis: int
  role: Role
  view: tuple[int, ...] | None = None
  bias: Path | None = None
  padded: bool = False
  kind: str = "kernel"
  segment: tuple[int, int] | None = None
  max_pooled: bool = False
  # Compared: groups are cache keys of the jitted pruners, and the axes decide the fold.
  out_axes: tuple[int, ...] | None = None
  positions_in_order: bool = True
  padded_why: str | None = dataclasses.field(default=None, compare=False)

  def __post_init__(self):
    if self.role not in ("producer", "consumer"):
      raise ValueError(f"Slice.role must be 'producer' or 'consumer', got {self.role!r}.")
    if self.kind not in SLICE_KINDS:
      raise ValueError(f"Slice.kind must be one of {SLICE_KINDS}, got {self.kind!r}.")
    object.__setattr__(self, "path", tuple(self.path))
    if self.view is not None:
      object.__setattr__(self, "view", tuple(int(d) for d in self.view))
    if self.bias is not None:
      object.__setattr__(self, "bias", tuple(self.bias))
    if self.out_axes is not None:
      object.__setattr__(self, "out_axes", tuple(int(a) for a in self.out_axes))
    if self.segment is not None:
      start, length = (int(v) for v in self.segment)
      if start < 0 or length < 1:
        raise ValueError(f"Slice.segment must be (start >= 0, length >= 1), got {self.segment}.")
      object.__setattr__(self, "segment", (start, length))


@dataclasses.dataclass(frozen=True)
class UnitGroup:
  """A named set of units that can be pruned together, with the slices each unit owns.

  Attributes:
    name: the group's name (the key of its unit mask).
    size: number of units (neurons or channels).
    slices: every parameter slice indexed by this group's units.
    activation: the units' nonlinearity (``'sigmoid'``, ``'tanh'``, ``'relu'``, ``'linear'``,
      or ``'other'`` for any other, like ``gelu``); distinctiveness uses it to centre
      activations (sigmoid outputs are shifted by -0.5), and the weight-based constant rule to
      find a unit's output from its bias (which it cannot for ``'other'``).
    kind: ``'dense'`` for neurons, ``'conv'`` for channels.
    act_of_bias: whether a unit with zero incoming weights outputs ``activation(bias)``:
      nothing but the bias acts between the kernel and the nonlinearity (``trace`` sets it
      False after a norm, a scalar scale, a temperature, a closed-over constant).
    read_by_products: whether the units are also contracted between two activations
      (attention's ``q @ k.T``: a query/key feature, the same index on both sides) or summed
      over by a statistic of each example that a removed unit leaves as it is (an RMSNorm's or
      an L2 norm's sum of squares, a mean over the units). Such a group may have no consumer
      kernel at all; removing a unit is exact, merging or folding one is not (a unit's term
      is the product of its two sides, or its own value), so the pruners that merge or fold
      refuse it.
  """

  name: str
  size: int
  slices: tuple[Slice, ...]
  activation: str = "linear"
  kind: Literal["dense", "conv"] = "dense"
  # Not compared: a declaration leaves it implicit (its norm slices already say as much).
  act_of_bias: bool = dataclasses.field(default=True, compare=False)
  read_by_products: bool = dataclasses.field(default=False, compare=False)

  @property
  def producers(self) -> tuple[Slice, ...]:
    return tuple(s for s in self.slices if s.role == "producer")

  @property
  def consumers(self) -> tuple[Slice, ...]:
    return tuple(s for s in self.slices if s.role == "consumer")

  @property
  def exact_constant_fold(self) -> bool:
    """Whether a constant unit's contribution can be folded exactly into the next biases:
    every consumer has a bias and none is a zero-padded convolution."""
    return all(s.bias is not None and not s.padded for s in self.consumers)

  @property
  def exact_linear_fold(self) -> bool:
    """Whether a unit that is a linear combination of others plus a constant can be removed
    exactly by adding its outgoing weights to theirs and the constant to the next biases:
    ``exact_constant_fold``, and no consumer reads the units through a max or min."""
    return self.exact_constant_fold and not any(s.max_pooled for s in self.consumers)


# ----------------------------------------------------------------------------- tree paths


def path_str(path: Path) -> str:
  """``'a/0/kernel'``: a path written for messages and names."""
  return "/".join(str(k) for k in path)


def _has_child(node: Any, k: Any) -> bool:
  if isinstance(node, Mapping):
    return k in node
  if isinstance(k, int) and not isinstance(k, bool):
    return isinstance(node, (list, tuple)) and -len(node) <= k < len(node)
  if not isinstance(k, str) or isinstance(node, (list, np.ndarray, jax.Array)):
    return False
  if isinstance(node, tuple):
    return k in getattr(node, "_fields", ())                      # a NamedTuple's field
  if k == "value" and hasattr(node, "get_value"):                 # an nnx Variable
    return True
  return hasattr(node, k)


def _child(node: Any, k: Any) -> Any:
  if isinstance(node, Mapping) or isinstance(k, int):
    return node[k]
  if k == "value" and hasattr(node, "get_value"):     # an nnx Variable ('.value' is deprecated)
    return node.get_value()
  return getattr(node, k)


def _is_value_of_array(node: Any, path: Path, i: int) -> bool:
  """Whether ``path[i]`` is a final ``'value'`` reached at an array: a path traced through an
  nnx ``Variable`` (``l1/kernel/value``) read in the same tree holding plain arrays (the
  ``State`` an ``nnx.Optimizer`` hands its transformation, or ``nnx.to_pure_dict``)."""
  return (i == len(path) - 1 and path[i] == "value"
          and isinstance(node, (jax.Array, np.ndarray, jax.core.Tracer)))


def get_path(tree: PyTree, path: Path) -> Any:
  """Returns ``tree[path[0]][path[1]]...``, with an error that names the missing key.

  A key indexes a mapping (any key type), a list or tuple (an int) or an attribute (a
  str: a NamedTuple's field, a dataclass's, an nnx ``Variable``'s ``value``), as in the paths
  of ``jax.tree_util.tree_flatten_with_path``. A final ``value`` reached at an array is that
  array, so a target traced on an nnx ``State`` also reads the same tree of plain arrays.
  """
  node = tree
  for i, k in enumerate(path):
    if _is_value_of_array(node, path, i):
      return node
    if not _has_child(node, k):
      raise KeyError(
          f"Parameter path {path_str(path)} does not exist: no key {k!r} under "
          f"{path_str(path[:i]) or 'the root'}. Are these params from the same model?")
    node = _child(node, k)
  return node


def key_of(entry: Any) -> Any:
  """A ``jax.tree_util`` key-path entry as a path key: a dict key, a list or tuple index, or
  an attribute name (None: not addressable, e.g. a custom node's flattened index)."""
  if isinstance(entry, jax.tree_util.DictKey):
    return entry.key
  if isinstance(entry, jax.tree_util.SequenceKey):
    return entry.idx
  if isinstance(entry, jax.tree_util.GetAttrKey):
    return entry.name
  return None


def set_path(tree: PyTree, path: Path, value: Any) -> PyTree:
  """Returns a copy of ``tree`` with the leaf at ``path`` replaced (no mutation). The tree is
  rebuilt from its own structure, so every container keeps its type (dicts, lists, tuples,
  NamedTuples, an nnx ``State`` and its ``Variable`` s) and the other leaves are shared."""
  path = tuple(path)
  if not path:
    return value
  if path[-1] == "value" and len(path) > 1:
    try:
      if _is_value_of_array(get_path(tree, path[:-1]), path, len(path) - 1):
        return set_path(tree, path[:-1], value)   # the array itself (see _is_value_of_array)
    except KeyError:
      pass
  head = path[0]
  if type(tree) is dict and head in tree:                       # the common case, directly
    return {**tree, head: set_path(tree[head], path[1:], value)}
  if type(tree) in (list, tuple) and isinstance(head, int) and -len(tree) <= head < len(tree):
    new = list(tree)
    new[head] = set_path(tree[head], path[1:], value)
    return type(tree)(new)
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  for i, (kp, _) in enumerate(flat):
    if tuple(key_of(k) for k in kp) == path:
      leaves = [leaf for _, leaf in flat]
      leaves[i] = value
      return jax.tree_util.tree_unflatten(treedef, leaves)
  get_path(tree, path)                    # raises the error that names the missing key
  raise KeyError(f"Parameter path {path_str(path)} is not a leaf of these params.")


def _check_group_name(groups: Mapping[str, UnitGroup], name: str) -> UnitGroup:
  if not isinstance(name, str):
    what = (f"a {type(name).__name__} (unit masks?)" if isinstance(name, Mapping) else
            f"{type(name).__name__} {name!r}")
    raise TypeError(f"The group is named by a string, one of {sorted(groups)}; got {what}. "
                    "A pruner factory takes (target, group name), e.g. distinctiveness(model, "
                    "'hidden_0'); the unit masks go to the pruner it returns.")
  if name not in groups:
    raise KeyError(f"Unknown unit group {name!r}; this model's groups are {sorted(groups)}.")
  return groups[name]


_WEIGHT_MASKS_HINT = (" These look like weight masks (the params' structure, one bool per "
                      "weight): pass unit masks, one bool vector per group, e.g. from "
                      "jaxprune.unit_masks_ones(target) or a pruner.")


_NO_GROUPS = (" The trace found no unit group: target.explain() says why for each param axis "
              "(a model traced in training mode, with a dropout drawing random numbers, has "
              "none: trace it in evaluation mode, nnx: model.eval(), linen: deterministic=True).")


def check_mask_keys(groups: Mapping[str, UnitGroup], unit_masks: Mapping[str, Any]) -> None:
  """Raises KeyError if a unit mask names no group (a misspelt key never passes silently), and
  ValueError if one is a dict (weight masks given where unit masks belong)."""
  if not isinstance(unit_masks, Mapping):
    raise TypeError(f"Unit masks must be a dict from group name to bool vector, got "
                    f"{type(unit_masks).__name__}.")
  weightlike = any(isinstance(v, Mapping) for v in unit_masks.values())
  for name in unit_masks:
    if name not in groups:
      raise KeyError(f"Unit mask {name!r} names no unit group; this model's groups are "
                     f"{sorted(groups)}. Fix the key (unit_masks_ones(target) lists them)."
                     + (_WEIGHT_MASKS_HINT if weightlike else "") + ("" if groups else _NO_GROUPS))
    if isinstance(unit_masks[name], Mapping):
      raise ValueError(f"Unit mask {name!r} is a {type(unit_masks[name]).__name__}, not a bool "
                       f"vector of the group's {groups[name].size} units." + _WEIGHT_MASKS_HINT)


def unit_mask(mask: Any, group: UnitGroup, xp=jnp) -> jax.Array:
  """``mask`` checked as the unit mask of ``group`` and returned as a bool vector.

  A unit mask is a bool vector of length ``group.size``; an integer vector of 0s and 1s is
  accepted (checked when its values are concrete). Anything else (floats such as 0.3, other
  integers, a wrong shape) raises ValueError. ``xp=np`` returns a NumPy vector for a concrete
  mask (nothing is compiled; a traced one stays a JAX array).
  """
  if isinstance(mask, (list, tuple)):   # a Python sequence, as compact and count_units take
    mask = np.asarray(mask)
  shape = tuple(jnp.shape(mask))
  if shape != (group.size,):
    raise ValueError(f"Unit mask {group.name!r} has shape {shape}; group {group.name!r} has "
                     f"{group.size} units, so it needs shape ({group.size},)."
                     + (_WEIGHT_MASKS_HINT if len(shape) > 1 else ""))
  return bool_unit_mask(mask, group.name, xp)


def bool_unit_mask(mask: Any, name: str, xp=jnp) -> jax.Array:
  """The dtype and value half of :func:`unit_mask` (no group to check the length against):
  ``mask`` as a bool array, an integer one of 0s and 1s converted, anything else refused."""
  if isinstance(mask, jax.core.Tracer):
    xp = jnp
  if isinstance(mask, (list, tuple)):   # a Python sequence, as compact and count_units take
    mask = np.asarray(mask)
  given = mask.dtype if hasattr(mask, "dtype") else np.asarray(mask).dtype
  if isinstance(given, np.dtype) and given.kind in "OSUV":   # JAX's TypeError named no mask
    raise ValueError(f"Unit mask {name!r} has dtype {given}; unit masks must be bool (or "
                     "integer 0/1): one True per unit kept, e.g. np.array([True, False, True]).")
  dtype = jnp.result_type(mask)
  if dtype == jnp.bool_:
    return xp.asarray(mask)
  if jnp.issubdtype(dtype, jnp.integer):
    if not isinstance(mask, jax.core.Tracer):
      bad = np.setdiff1d(np.unique(np.asarray(mask)), [0, 1])
      if bad.size:
        raise ValueError(f"Unit mask {name!r} holds {bad[:5].tolist()}; an integer unit "
                         "mask may hold only 0 and 1 (better: use a bool mask).")
    return xp.asarray(mask).astype(bool)
  shown = getattr(mask, "dtype", dtype)   # a NumPy float64 mask is named float64, not float32
  raise ValueError(f"Unit mask {name!r} has dtype {shown}; unit masks must be bool (or "
                   "integer 0/1). Threshold it yourself, e.g. mask > 0.5, if that is meant.")


def _refines(shape: Sequence[int], view: Sequence[int]) -> bool:
  """Whether ``view`` only splits axes of ``shape`` (every boundary of ``shape`` is one of
  ``view``'s)."""
  cum_view = set(np.cumprod([1] + list(view)).tolist())
  return all(c in cum_view for c in np.cumprod([1] + list(shape)).tolist())


_OTHER_PARAMS = (" If the group is a model's or a traced target's (jaxprune.trace), these params "
                 "are not the ones it was built or traced with: pass those, or trace again with "
                 "these params.")


def check_group(params: PyTree, group: UnitGroup, fix: str | None = None) -> None:
  """Raises ValueError, naming the group, the slice and the fix, unless ``group`` fits ``params``.

  Checks that every slice's path exists, that its ``view`` only splits the leaf's axes, that its
  axis is in range and indexes exactly ``group.size`` entries, that no slice is listed twice,
  that producer kernels have two or more dimensions (a consumer's may be a vector: the readout
  ``h @ v`` of a one-output head), and that a consumer's bias path exists. Only
  shapes are read (works under jit).
  ``fix``: the advice that ends every message, in place of the advice for a hand-declared group
  (a caller that checks params against a model's own groups knows the fix is in the params).
  """
  if not isinstance(group, UnitGroup):
    raise TypeError(f"Expected a UnitGroup, got {type(group).__name__}.")
  if group.size < 1:
    raise ValueError(f"Group {group.name!r} has size {group.size}; a group needs units.")
  if not group.slices:
    raise ValueError(f"Group {group.name!r} has no slices; declare at least its producer and "
                     "consumer slices.")

  def fail(what: str, advice: str, changed: bool = False):
    # changed: the params may have other sizes than the groups' model or trace was made for
    raise ValueError(f"{what} {fix or advice + (_OTHER_PARAMS if changed else '')}")

  seen = set()
  for s in group.slices:
    where = f"Group {group.name!r}, slice {path_str(s.path)} ({s.role}, {s.kind})"
    try:
      leaf = get_path(params, s.path)
    except KeyError as e:
      fail(f"{where}: {e.args[0]}", "Fix the slice's path.")
    shape = tuple(jnp.shape(leaf))
    indexed = shape
    if s.view is not None:
      indexed = _view_shape(shape, s) if len(s.view) else s.view
      if int(np.prod(indexed)) != int(np.prod(shape)) or not _refines(shape, indexed):
        fail(f"{where}: view {s.view} does not fit the leaf's shape {shape}; a view may only "
             "split the leaf's axes (same total size).", "For a dense layer after flatten of "
             "(H, W, C), use view=(H*W, C, out) with axis=1.", changed=True)
    if not -len(indexed) <= s.axis < len(indexed):
      fail(f"{where}: axis {s.axis} is out of range for shape {indexed}.",
           f"Use an axis in [{-len(indexed)}, {len(indexed)}).")
    if s.segment is not None:
      start, length = s.segment
      if start + length > indexed[s.axis] or length != group.size:
        fail(f"{where}: segment {s.segment} of axis {s.axis} (shape {indexed}) must lie inside "
             f"the axis and hold the group's {group.size} units.", "Fix the segment.")
    elif indexed[s.axis] != group.size:
      fail(f"{where}: axis {s.axis} of shape {indexed} has {indexed[s.axis]} entries but the "
           f"group has {group.size} units.", "Fix the axis (or the group size, or the view).",
           changed=True)
    entries = (s.path, tuple(indexed), s.axis % len(indexed), s.segment)
    if entries in seen:   # merging and folding would add the unit's weights twice
      fail(f"{where}: the group lists these entries (axis {s.axis}"
           + (f", view {s.view}" if s.view is not None else "")
           + (f", segment {s.segment}" if s.segment is not None else "") + ") twice.",
           "Declare each slice once.")
    seen.add(entries)
    if s.kind == "kernel" and len(shape) < (2 if s.role == "producer" else 1):
      fail(f"{where}: a {len(shape)}-D leaf cannot be a kernel.",
           "Declare kind='bias' (or 'scale', 'shift', 'stat').")
    if s.bias is not None:
      try:
        get_path(params, s.bias)
      except KeyError as e:
        fail(f"{where}: its bias {e.args[0]}", "Fix the slice's bias path (or None).")


def check_groups(params: PyTree, groups: Mapping[str, UnitGroup]) -> None:
  """Checks every group against ``params`` (see :func:`check_group`) and that each dict key is
  its group's name."""
  if not isinstance(groups, Mapping):
    raise TypeError(f"groups must be a dict from name to UnitGroup, got "
                    f"{type(groups).__name__}.")
  for key, g in groups.items():
    if not isinstance(g, UnitGroup):
      raise TypeError(f"groups[{key!r}] is a {type(g).__name__}, not a UnitGroup.")
    if key != g.name:
      raise ValueError(f"groups[{key!r}] holds the group named {g.name!r}; key each group by "
                       "its name, e.g. {g.name: g for g in my_groups}.")
    check_group(params, g)


# ----------------------------------------------------------------------------- unit views


def _view_shape(leaf_shape, s: Slice) -> tuple[int, ...]:
  """``s.view``, with its last axis recomputed from the leaf when it is not the unit axis (so a
  flatten consumer stays valid after the consuming layer itself was compacted)."""
  view = list(s.view)
  if (s.axis % len(view) != len(view) - 1 and leaf_shape[-1] != view[-1]
      and math.prod(view[:-1]) == math.prod(leaf_shape[:-1])):  # the view keeps the last axis
    view[-1] = leaf_shape[-1]
  return tuple(view)


def unit_view(leaf: jax.Array, s: Slice) -> jax.Array:
  """The leaf reshaped so that axis 0 indexes the group's units: shape (units, ...)."""
  x = leaf.reshape(_view_shape(leaf.shape, s)) if s.view is not None else leaf
  x = jnp.moveaxis(x, s.axis, 0)
  if s.segment is not None:
    x = x[s.segment[0]:s.segment[0] + s.segment[1]]
  return x


def from_unit_view(view: jax.Array, s: Slice, leaf: Any) -> jax.Array:
  """Inverse of :func:`unit_view`: ``leaf`` (an array, or its shape) with the units' entries
  replaced by ``view``. The unit count (axis 0 of ``view``) may change unless ``s`` has a
  segment, which needs the array itself to splice into."""
  leaf_shape = tuple(jnp.shape(leaf)) if not isinstance(leaf, tuple) else leaf
  if s.segment is not None:
    if isinstance(leaf, tuple):
      raise ValueError("from_unit_view of a segment slice needs the leaf array, not its shape.")
    full = unit_view(leaf, dataclasses.replace(s, segment=None))
    start, length = s.segment
    if view.shape[0] != length:
      raise ValueError(f"A segment slice keeps its {length} units here; got {view.shape[0]}.")
    view = full.at[start:start + length].set(view.astype(full.dtype))
  x = jnp.moveaxis(view, 0, s.axis)
  if s.view is None:
    return x
  shape = _view_shape(leaf_shape, s)
  axis = s.axis % len(shape)
  old_units = shape[axis]
  # The leaf axis that holds the unit axis is the first whose running size covers it.
  covered = int(np.prod(shape[:axis + 1]))
  running = np.cumprod(leaf_shape)
  k = int(np.searchsorted(running, covered))
  new_shape = list(leaf_shape)
  new_shape[k] = leaf_shape[k] // old_units * view.shape[0]
  return x.reshape(new_shape)


def _segment_mask(mask, s: Slice, axis_size: int, xp=jnp):
  """A unit mask placed at the slice's segment of an axis (True elsewhere)."""
  if s.segment is None:
    return mask
  start, length = s.segment
  return xp.concatenate([xp.ones((start,), bool), mask,
                         xp.ones((axis_size - start - length,), bool)])


def _mask_like(mask: jax.Array, leaf_shape, s: Slice, xp=jnp) -> jax.Array:
  """Broadcasts a unit mask (units,) to the leaf's shape along the slice's axis."""
  shape = _view_shape(leaf_shape, s) if s.view is not None else leaf_shape
  ndim = len(shape)
  axis = s.axis % ndim
  mask = _segment_mask(mask, s, shape[axis], xp)
  bshape = [1] * ndim
  bshape[axis] = shape[axis]
  full = xp.broadcast_to(mask.reshape(bshape), shape)
  return full.reshape(leaf_shape)


# ----------------------------------------------------------------------------- expand / compact


def expand(params: PyTree, groups: Mapping[str, UnitGroup], unit_masks: Mapping[str, jax.Array],
           weight_masks: PyTree | None = None) -> PyTree:
  """Turns unit masks into weight masks (bool leaves with the structure of ``params``).

  A removed unit has every slice it owns set to False, producer and consumer alike, so the
  masked network computes exactly what the compacted one does. Groups not named in
  ``unit_masks`` are left as they are. Jit-compatible.

  Args:
    params: the model's variables.
    groups: the model's unit groups (``target.groups``); checked against ``params``.
    unit_masks: group name -> bool vector of length ``group.size``.
    weight_masks: optional existing weight masks to combine with (logical and).

  Returns:
    Weight masks, a pytree of bool arrays shaped like ``params``.
  """
  check_mask_keys(groups, unit_masks)
  # Concrete masks are combined on the host (bool operations, exact) and moved to the device
  # once: eager jnp operations would each compile a small program per new shape.
  concrete = not any(isinstance(l, jax.core.Tracer)
                     for l in jax.tree.leaves((unit_masks, weight_masks)))
  xp = np if concrete else jnp
  if weight_masks is None:
    weight_masks = jax.tree.map(lambda p: xp.ones(np.shape(p), bool), params)
  elif concrete:
    weight_masks = jax.tree.map(np.asarray, weight_masks)
  out = weight_masks
  for name, m in unit_masks.items():
    g = groups[name]
    check_group(params, g)
    m = unit_mask(m, g, xp)
    for s in g.slices:
      leaf = get_path(out, s.path)
      out = set_path(out, s.path, xp.logical_and(leaf, _mask_like(m, leaf.shape, s, xp)))
  return jax.device_put(out) if concrete else out


def _axis_keep(leaf_shape: tuple[int, ...], s: Slice, keep: np.ndarray) -> tuple[int, np.ndarray]:
  """The leaf axis a slice indexes and which of its entries ``keep`` keeps (a view's unit axis
  lies inside one leaf axis; the other view axes in it repeat the pattern)."""
  if s.view is None:
    axis = s.axis % len(leaf_shape)
    return axis, _segment_mask(keep, s, leaf_shape[axis], np)
  view = list(_view_shape(leaf_shape, s))
  ax = s.axis % len(view)
  cum_view = np.cumprod([1] + view).tolist()
  cum_leaf = np.cumprod([1] + list(leaf_shape)).tolist()
  lo, hi = cum_view[ax], cum_view[ax + 1]
  k = next(k for k in range(len(leaf_shape)) if cum_leaf[k] <= lo and cum_leaf[k + 1] >= hi)
  j0 = max(j for j in range(ax + 1) if cum_view[j] == cum_leaf[k])
  j1 = min(j for j in range(ax + 1, len(view) + 1) if cum_view[j] == cum_leaf[k + 1])
  sub = view[j0:j1]
  keep = _segment_mask(keep, s, view[ax], np)
  bshape = [1] * len(sub)
  bshape[ax - j0] = sub[ax - j0]
  return k, np.broadcast_to(keep.reshape(bshape), sub).reshape(-1)


def groups_of(model_or_groups, who: str = "This function",
              hint: str = "") -> Mapping[str, UnitGroup]:
  """A target's ``groups`` (built-in model or traced), or the groups mapping itself; a
  TypeError naming ``who`` for anything else (params passed where the model belongs)."""
  groups = model_or_groups.groups if hasattr(model_or_groups, "groups") else model_or_groups
  if not isinstance(groups, Mapping):
    raise TypeError(f"{who} takes a pruning target (a jaxprune model, or jaxprune.trace(fn, "
                    f"params, x)) or its `groups` dict (name -> UnitGroup), got "
                    f"{type(model_or_groups).__name__}.{hint}")
  if not all(isinstance(g, UnitGroup) for g in groups.values()):
    raise TypeError(f"{who} takes a pruning target (a jaxprune model, or jaxprune.trace(fn, "
                    "params, x)) or its `groups` dict (name -> UnitGroup), not params: pass the "
                    f"model (or trace your function) first.{hint}")
  return groups


def _kept_indices(params: PyTree, groups: Mapping[str, UnitGroup],
                  unit_masks: Mapping[str, Any], who: str) -> dict[Path, dict[int, np.ndarray]]:
  """For every leaf a group touches: leaf axis -> the indices kept along it (all groups).
  ``groups`` may also be a target (a model or traced target): its ``.groups`` are read."""
  groups = groups_of(groups, who)
  check_mask_keys(groups, unit_masks)
  keeps: dict[Path, dict[int, np.ndarray]] = {}
  for name in groups:
    if name not in unit_masks:
      continue
    g = groups[name]
    check_group(params, g)
    if isinstance(unit_masks[name], jax.core.Tracer):
      raise ValueError(f"{who} changes the shapes of the params, so it runs on the host with "
                       f"concrete unit masks, but unit mask {name!r} is traced (inside jax.jit "
                       f"or vmap). Call {who} outside the transformation, on the masks a jitted "
                       "pruner returned.")
    keep = unit_mask(np.asarray(unit_masks[name]), g, np)
    if not keep.any():
      raise ValueError(f"Unit mask {name!r} removes every unit of the group; keep at least one "
                       "unit (a layer with no units disconnects the network).")
    for s in g.slices:
      shape = tuple(jnp.shape(get_path(params, s.path)))
      axis, k = _axis_keep(shape, s, keep)
      axes = keeps.setdefault(s.path, {})
      axes[axis] = axes[axis] & k if axis in axes else k
  return {p: {a: np.flatnonzero(k) for a, k in axes.items()} for p, axes in keeps.items()}


def compact(params: PyTree, groups: Mapping[str, UnitGroup],
            unit_masks: Mapping[str, Any]) -> PyTree:
  """Physically removes masked units: returns smaller params.

  The result, run through the target resized to the kept unit counts (``target.compact``),
  gives the same outputs as the masked network. Every leaf is cut once, along each axis that
  any group indexes, so the result does not depend on the groups' order. The output shapes
  depend on the mask values, so the unit masks must be concrete; under ``jax.jit`` with masks
  closed over, traced params are cut inside the program. The input params are not modified.

  Args:
    params: the model's variables.
    groups: the model's unit groups (or the target, whose ``.groups`` are read); checked
      against ``params``.
    unit_masks: group name -> bool vector; groups not named keep all their units.

  Returns:
    A new variables dict with the masked units' slices removed.
  """
  out = params
  for path, axes in _kept_indices(params, groups, unit_masks, "compact").items():
    given = get_path(params, path)
    if isinstance(given, jax.core.Tracer):   # under a caller's jit (masks concrete): in the
      leaf = given                           # program, as uncompact does (it was np.asarray
      for axis, idx in axes.items():         # of a tracer, a TracerArrayConversionError)
        leaf = jnp.take(leaf, jnp.asarray(idx), axis=axis)
      out = set_path(out, path, leaf)
      continue
    leaf = np.asarray(given)         # cut on the host: an eager jnp.take would
    for axis, idx in axes.items():   # compile a program per leaf shape
      leaf = np.take(leaf, idx, axis=axis)
    out = set_path(out, path, _same_kind(given, leaf))
  return out


def _same_kind(given: Any, host: np.ndarray) -> Any:
  """``host`` as the kind of array ``given`` was: a jax array stays a jax array (on the default
  device), anything else comes back as NumPy, so a cut leaf keeps its type and dtype (a float64
  NumPy leaf is not turned into float32 when x64 is off, next to uncut float64 leaves)."""
  return jax.device_put(host) if isinstance(given, jax.Array) else host


def uncompact(small_params: PyTree, params: PyTree, groups: Mapping[str, UnitGroup],
              unit_masks: Mapping[str, Any]) -> PyTree:
  """The inverse of :func:`compact`: compacted params put back at full size, with zeros in the
  removed units' slices (e.g. to continue with masks after fine-tuning the small network).

  Args:
    small_params: what ``compact(params, groups, unit_masks)`` returned (values may differ).
    params: the full-size params (only shapes and structure are read for the cut leaves).
    groups, unit_masks: as given to :func:`compact` (``groups`` may also be the target, a
      model or traced target, whose ``.groups`` are read).

  Returns:
    Params shaped like ``params``: uncut leaves from ``small_params``, cut ones scattered back.
  """
  out = small_params
  for path, axes in _kept_indices(params, groups, unit_masks, "uncompact").items():
    given = get_path(small_params, path)
    full = tuple(jnp.shape(get_path(params, path)))
    index = tuple(np.ix_(*[axes.get(a, np.arange(n)) for a, n in enumerate(full)]))
    want = tuple(len(axes.get(a, range(n))) for a, n in enumerate(full))
    if tuple(jnp.shape(given)) != want:
      raise ValueError(
          f"uncompact: small_params leaf {path_str(path)} has shape {tuple(jnp.shape(given))}, "
          f"but these unit masks keep {want} of its full shape {full}. Pass the unit masks that "
          "were given to compact (and the small params it returned).")
    if isinstance(given, jax.core.Tracer):   # under a caller's jit (masks concrete)
      out = set_path(out, path, jnp.zeros(full, given.dtype).at[index].set(given))
      continue
    small = np.asarray(given)
    leaf = np.zeros(full, small.dtype)   # on the host, as compact
    leaf[index] = small
    out = set_path(out, path, _same_kind(given, leaf))
  _check_shaped_like(out, params)
  return out


def _check_shaped_like(out: PyTree, params: PyTree) -> None:
  """uncompact's result must be shaped like ``params`` leaf by leaf; else name the first leaf
  that is not (unit masks other than compact's leave a leaf small)."""
  got = jax.tree_util.tree_flatten_with_path(out)[0]
  ref = jax.tree_util.tree_flatten_with_path(params)[0]
  if len(got) != len(ref):
    raise ValueError(f"uncompact: small_params hold {len(got)} leaves, params {len(ref)}. Pass "
                     "the params that compact returned, and the full-size params they came "
                     "from.")
  for (kp, a), (_, b) in zip(got, ref):
    if tuple(jnp.shape(a)) != tuple(jnp.shape(b)):
      raise ValueError(
          f"uncompact: leaf {path_str([key_of(k) for k in kp])} comes back with shape "
          f"{tuple(jnp.shape(a))}, not params' {tuple(jnp.shape(b))}: the unit masks do not "
          "cut it as compact did. Pass the unit masks that were given to compact.")


# ----------------------------------------------------------------------------- consumer algebra


def consumer_views(params: PyTree, group: UnitGroup) -> list[jax.Array]:
  """The consumer slices of ``group``, each as an array with units on axis 0."""
  return [unit_view(get_path(params, s.path), s) for s in group.consumers]


# How a traced consumer slice's padded_why begins when the kernel it reads with is computed
# from params (h @ (w * 0.5), w + a @ b): its rows are not the kernel's rows.
COMPUTED_READER = "a kernel computed from params"


def reads_computed(s: Slice) -> bool:
  """Whether consumer slice ``s`` reads through a kernel computed from its params (see
  ``COMPUTED_READER``): a fold of a constant times its rows is not what the unit adds."""
  return (s.padded_why or "").startswith(COMPUTED_READER)


def redistribute(params: PyTree, group: UnitGroup, transfer: jax.Array,
                 constants: jax.Array | None = None) -> PyTree:
  """Applies a linear change to what the next layer reads from ``group``. Jit-compatible.

  Every consumer slice (units on axis 0) becomes ``transfer @ slice``: row i of the new slice is
  ``sum_j transfer[i, j] * row_j``. Merging unit j into unit i is ``transfer = I + e_i e_j^T``;
  least-squares redistribution uses the fitted coefficients.

  If ``constants`` (units,) is given, each consumer's bias gains ``sum_j constants[j] * row_j``
  summed over the non-output axes (kernel positions, flattened positions): the contribution a unit
  with constant output ``constants[j]`` makes, folded into the bias so the unit can be removed.

  Args:
    params: the model's variables.
    group: the unit group whose outgoing weights change.
    transfer: (units, units) matrix.
    constants: optional (units,) vector of constant activations to fold into biases.

  Returns:
    New params; the input is not modified.

  Raises:
    ValueError: ``group`` does not fit ``params`` (see :func:`check_group`), or ``transfer`` is
      not (units, units) or ``constants`` not (units,); the group's units are also read by a
      product of two activations or a sum over the units (``read_by_products``: no rows to
      move a unit's part onto);
      ``constants`` with a consumer that reads through a kernel computed from params (its rows
      times a constant are not what the unit adds).
  """
  check_group(params, group)
  if group.read_by_products:
    raise ValueError(f"redistribute: group {group.name!r}'s units are also read by a product of "
                     "two activations (q @ k.T) or a sum over the units (an RMSNorm's sum of "
                     "squares), where a unit's term is the product of its two sides or its own "
                     "value: no change of the next layer's rows moves it onto other units. "
                     "Remove its units instead (importance_prune, magnitude_prune, ga.search).")
  computed = [path_str(s.path) for s in group.consumers if reads_computed(s)]
  if constants is not None and computed:
    raise ValueError(f"redistribute: group {group.name!r}'s consumer {computed[0]} reads it "
                     "through a kernel computed from params (target.explain() names the ops), "
                     "so a constant times the params' rows is not what a unit adds and cannot "
                     "be folded into the bias. Pass constants=None (moving rows with transfer "
                     "is exact there: the kernel is linear in them).")
  n = group.size
  if tuple(jnp.shape(transfer)) != (n, n):
    raise ValueError(f"redistribute: transfer has shape {tuple(jnp.shape(transfer))}; group "
                     f"{group.name!r} has {n} units, so it needs shape ({n}, {n}) (row i: how "
                     "much of each unit's outgoing weights unit i receives; jnp.eye(n) changes "
                     "nothing).")
  if constants is not None and tuple(jnp.shape(constants)) != (n,):
    raise ValueError(f"redistribute: constants has shape {tuple(jnp.shape(constants))}; group "
                     f"{group.name!r} has {n} units, so it needs shape ({n},): one constant "
                     "output per unit (0 for a unit that is not folded).")
  out = params
  for s in group.consumers:
    leaf = get_path(out, s.path)
    v = unit_view(leaf, s)
    flat = v.reshape(v.shape[0], -1)
    new = (transfer.astype(flat.dtype) @ flat).reshape(v.shape)
    out = set_path(out, s.path, from_unit_view(new, s, leaf))
    if constants is not None:
      if s.bias is None:
        raise ValueError(f"Group {group.name!r}: consumer {path_str(s.path)} has no bias path, "
                         "so constant units cannot be folded into it.")
      b = get_path(out, s.bias)
      out = set_path(out, s.bias, b + bias_contribution(constants, v, jnp.shape(b), s, leaf))
  return out


def bias_contribution(constants: jax.Array, view: jax.Array, bias_shape, s: Slice | None = None,
                      leaf: Any = None) -> jax.Array:
  """What units of constant output ``constants`` (units,) add to a consumer's output, in the
  shape of its bias: ``sum_j constants[j] * view[j]`` summed over the kernel axes the bias does
  not have (kernel positions, flattened positions), keeping the output axes (and e.g. heads or
  ensemble members of a (heads, out) bias).

  ``constants`` may also be (units, P): a value per unit and position of the units' map (P =
  the positions of one example, e.g. H*W). Where the axes summed above are P positions (a
  dense layer after a flatten reads each position with its own rows), position p meets the
  rows of position p (when ``s.positions_in_order``: nothing moved the positions on the way);
  elsewhere (a conv reading every position with one kernel, a pooling) each unit's mean over
  the positions is used, as a (units,) constant.

  ``view`` is the consumer slice ``s``'s :func:`unit_view` of ``leaf`` (units first). The
  output axes are ``s.out_axes`` when the slice records them (traced groups); otherwise the
  bias's axes are matched to the view's from the last (outputs last, as in Flax and JAX).
  """
  constants = jnp.asarray(constants)
  per_position = constants.ndim == 2
  if per_position:                    # (units, P): the per-position values; first their means
    contrib = jnp.tensordot(jnp.mean(constants, axis=1).astype(view.dtype), view, axes=(0, 0))
  else:
    contrib = jnp.tensordot(constants.astype(view.dtype), view, axes=(0, 0))
  bias_shape = tuple(bias_shape)
  want = [d for d in bias_shape if d != 1]
  if s is not None and s.out_axes is not None and leaf is not None:
    keep = [_view_axis(tuple(jnp.shape(leaf)), s, a) for a in s.out_axes]
  else:
    keep, j = [], len(want) - 1
    for i in range(contrib.ndim - 1, -1, -1):
      if j >= 0 and contrib.shape[i] == want[j]:
        keep.append(i)
        j -= 1
    keep = keep[::-1]
  # size-1 axes broadcast (a Dense(1) head's (1,) bias): compare without them on both sides;
  # a bias of one value (a scalar) holds no output axis: with outputs last (declared slices) it
  # cannot take a contribution whose last axis is longer than 1
  scalar_bias = not want and (s is None or s.out_axes is None)
  if [contrib.shape[i] for i in keep if contrib.shape[i] != 1] != want or (
      scalar_bias and contrib.ndim and contrib.shape[-1] != 1):
    raise ValueError(f"A consumer's bias of shape {bias_shape} does not match the output axes "
                     f"of its kernel's unit rows {tuple(contrib.shape)}, so constants cannot be "
                     "folded into it; pass constants=False.")
  summed_axes = tuple(d for d in range(contrib.ndim) if d not in keep)
  if (per_position and (s is None or s.positions_in_order)
      and math.prod(contrib.shape[d] for d in summed_axes) == constants.shape[1] > 1):
    # The consumer reads position p of each unit with its own weights (a dense layer after a
    # flatten, a 'VALID' conv whose kernel covers the map): each position's value meets the
    # rows of that position, in the order of the view (the flatten's order).
    rows = jnp.moveaxis(view, [1 + d for d in summed_axes], list(range(1, 1 + len(summed_axes))))
    rows = rows.reshape((view.shape[0], constants.shape[1]) + rows.shape[1 + len(summed_axes):])
    summed = jnp.tensordot(constants.astype(view.dtype), rows, axes=((0, 1), (0, 1)))
  else:
    summed = jnp.sum(contrib, axis=summed_axes)
  order = tuple(int(i) for i in np.argsort(np.argsort(keep)))   # back to the order of keep
  return jnp.transpose(summed, order).reshape(bias_shape)


def _view_axis(leaf_shape: tuple[int, ...], s: Slice, axis: int) -> int:
  """Where leaf axis ``axis`` (not the units') sits in ``tensordot(c, unit_view(leaf, s))``."""
  j, rank = axis, len(leaf_shape)
  if s.view is not None:                       # the units' leaf axis may be split into several
    view = _view_shape(leaf_shape, s)
    cum_leaf = np.cumprod([1] + list(leaf_shape)).tolist()
    cum_view = np.cumprod([1] + list(view)).tolist()
    j = next(v for v in range(len(view)) if cum_view[v] == cum_leaf[axis]
             and cum_view[v + 1] == cum_leaf[axis + 1])
    rank = len(view)
  return j if j < s.axis % rank else j - 1
