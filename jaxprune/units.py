"""Unit groups: which parameter slices make up one neuron or channel.

A *unit* is one hidden neuron (dense layer) or one output channel (conv). Removing it touches
several parameters: its incoming kernel slice and bias, and any normalisation parameters (the
*producer* side), and the next layer's kernel rows that read it (the *consumer* side). A model
declares each prunable group once, as a :class:`UnitGroup`; everything structured (expanding
unit masks to weight masks, merging units, compaction) works from that declaration alone.

Paths are tuples of keys into the model's variables dict, e.g.
``('params', 'hidden_0', 'kernel')``.

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
from typing import Any, Literal, Mapping

import jax
import jax.numpy as jnp
import numpy as np

Path = tuple[str, ...]
PyTree = Any
Role = Literal["producer", "consumer"]
ACTIVATIONS = ("sigmoid", "tanh", "relu", "linear")


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
    padded: for a consumer, True when it is a zero-padded ('SAME') convolution: a constant
      input channel then contributes less at the borders than inside, so folding it into a
      per-channel bias is not exact (see ``UnitGroup.exact_constant_fold``).
  """

  path: Path
  axis: int
  role: Role
  view: tuple[int, ...] | None = None
  bias: Path | None = None
  padded: bool = False

  def __post_init__(self):
    if self.role not in ("producer", "consumer"):
      raise ValueError(f"Slice.role must be 'producer' or 'consumer', got {self.role!r}.")


@dataclasses.dataclass(frozen=True)
class UnitGroup:
  """A named set of units that can be pruned together, with the slices each unit owns.

  Attributes:
    name: the group's name (the key of its unit mask).
    size: number of units (neurons or channels).
    slices: every parameter slice indexed by this group's units.
    activation: the units' nonlinearity (``'sigmoid'``, ``'tanh'``, ``'relu'`` or
      ``'linear'``); distinctiveness uses it to centre activations.
    kind: ``'dense'`` for neurons, ``'conv'`` for channels.
  """

  name: str
  size: int
  slices: tuple[Slice, ...]
  activation: str = "linear"
  kind: Literal["dense", "conv"] = "dense"

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


# ----------------------------------------------------------------------------- tree paths


def get_path(tree: PyTree, path: Path) -> Any:
  """Returns ``tree[path[0]][path[1]]...``, with an error that names the missing key."""
  node = tree
  for i, k in enumerate(path):
    if not isinstance(node, Mapping) or k not in node:
      raise KeyError(
          f"Parameter path {'/'.join(path)} does not exist: no key {k!r} under "
          f"{'/'.join(path[:i]) or 'the root'}. Are these params from the same model?")
    node = node[k]
  return node


def set_path(tree: PyTree, path: Path, value: Any) -> PyTree:
  """Returns a copy of nested dict ``tree`` with the leaf at ``path`` replaced (no mutation)."""
  if not path:
    return value
  head, rest = path[0], path[1:]
  new = dict(tree)
  new[head] = set_path(tree[head], rest, value)
  return new


def _check_group_name(groups: Mapping[str, UnitGroup], name: str) -> UnitGroup:
  if name not in groups:
    raise KeyError(f"Unknown unit group {name!r}; this model's groups are {sorted(groups)}.")
  return groups[name]


# ----------------------------------------------------------------------------- unit views


def _view_shape(leaf_shape, s: Slice) -> tuple[int, ...]:
  """``s.view``, with its last axis recomputed from the leaf when it is not the unit axis (so a
  flatten consumer stays valid after the consuming layer itself was compacted)."""
  view = list(s.view)
  if s.axis % len(view) != len(view) - 1 and leaf_shape[-1] != view[-1]:
    view[-1] = leaf_shape[-1]
  return tuple(view)


def unit_view(leaf: jax.Array, s: Slice) -> jax.Array:
  """The leaf reshaped so that axis 0 indexes units: shape (units, ...)."""
  x = leaf.reshape(_view_shape(leaf.shape, s)) if s.view is not None else leaf
  return jnp.moveaxis(x, s.axis, 0)


def from_unit_view(view: jax.Array, s: Slice, leaf_shape: tuple[int, ...]) -> jax.Array:
  """Inverse of :func:`unit_view`; the unit count (axis 0 of ``view``) may have changed."""
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


def _mask_like(mask: jax.Array, leaf_shape, s: Slice) -> jax.Array:
  """Broadcasts a unit mask (units,) to the leaf's shape along the slice's axis."""
  shape = _view_shape(leaf_shape, s) if s.view is not None else leaf_shape
  ndim = len(shape)
  axis = s.axis % ndim
  bshape = [1] * ndim
  bshape[axis] = shape[axis]
  full = jnp.broadcast_to(mask.reshape(bshape), shape)
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
    groups: the model's unit groups (``model.groups``).
    unit_masks: group name -> bool vector of length ``group.size``.
    weight_masks: optional existing weight masks to combine with (logical and).

  Returns:
    Weight masks, a pytree of bool arrays shaped like ``params``.
  """
  if weight_masks is None:
    weight_masks = jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)
  out = weight_masks
  for name, m in unit_masks.items():
    g = _check_group_name(groups, name)
    m = jnp.asarray(m)
    if m.shape != (g.size,):
      raise ValueError(f"Unit mask {name!r} has shape {m.shape}; group {name!r} has {g.size} "
                       f"units, so it needs shape ({g.size},).")
    m = m.astype(bool)
    for s in g.slices:
      leaf = get_path(out, s.path)
      out = set_path(out, s.path, jnp.logical_and(leaf, _mask_like(m, leaf.shape, s)))
  return out


def compact(params: PyTree, groups: Mapping[str, UnitGroup],
            unit_masks: Mapping[str, Any]) -> PyTree:
  """Physically removes masked units: returns smaller params.

  The result, run through the model resized to the kept unit counts (see ``Model.compact``),
  gives the same outputs as the masked network. Not jit-compatible (output shapes depend on the
  mask values); the input params are not modified.

  Args:
    params: the model's variables.
    groups: the model's unit groups.
    unit_masks: group name -> bool vector; groups not named keep all their units.

  Returns:
    A new variables dict with the masked units' slices removed.
  """
  out = params
  for name in unit_masks:
    _check_group_name(groups, name)
  for name in [n for n in groups if n in unit_masks]:  # declaration order, whatever the dict's
    g, m = groups[name], unit_masks[name]
    keep = np.asarray(m).astype(bool)
    if keep.shape != (g.size,):
      raise ValueError(f"Unit mask {name!r} has shape {keep.shape}; group {name!r} has "
                       f"{g.size} units, so it needs shape ({g.size},).")
    if not keep.any():
      raise ValueError(f"Unit mask {name!r} removes every unit of the group; keep at least one "
                       "unit (a layer with no units disconnects the network).")
    idx = np.flatnonzero(keep)
    for s in g.slices:
      leaf = jnp.asarray(get_path(out, s.path))
      v = unit_view(leaf, s)[idx]
      out = set_path(out, s.path, from_unit_view(v, s, leaf.shape))
  return out


# ----------------------------------------------------------------------------- consumer algebra


def consumer_views(params: PyTree, group: UnitGroup) -> list[jax.Array]:
  """The consumer slices of ``group``, each as an array with units on axis 0."""
  return [unit_view(get_path(params, s.path), s) for s in group.consumers]


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
  """
  out = params
  for s in group.consumers:
    leaf = get_path(out, s.path)
    v = unit_view(leaf, s)
    flat = v.reshape(v.shape[0], -1)
    new = (transfer.astype(flat.dtype) @ flat).reshape(v.shape)
    out = set_path(out, s.path, from_unit_view(new, s, leaf.shape))
    if constants is not None:
      if s.bias is None:
        raise ValueError(f"Group {group.name!r}: consumer {'/'.join(s.path)} has no bias path, "
                         "so constant units cannot be folded into it.")
      # v: (units, ..., out) -> contribution (out,)
      contrib = jnp.tensordot(constants.astype(v.dtype), v, axes=(0, 0))
      contrib = contrib.reshape(-1, contrib.shape[-1]).sum(0)
      b = get_path(out, s.bias)
      out = set_path(out, s.bias, b + contrib)
  return out
