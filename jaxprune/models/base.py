"""The model contract shared by every jaxprune model.

A :class:`Model` is a frozen description (layer sizes) around a Flax linen module. It is used
as pure functions over a variables pytree:

* ``init(key) -> params`` (a dict with a ``'params'`` entry, and ``'batch_stats'`` for models
  with batch norm);
* ``apply(params, x) -> outputs`` (logits for classifiers, reconstructions for autoencoders);
* ``apply_with_activations(params, x, names) -> (outputs, {name: activations})``;
* ``apply_train(params, x) -> (outputs, params)``: training-mode forward pass that also returns
  the params with updated running statistics (unchanged for models without batch norm);
* ``groups``: the model's :class:`~jaxprune.units.UnitGroup` declarations;
* ``resize(sizes) -> Model`` and ``compact(params, unit_masks) -> (params, model)``.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import _compile
from jaxprune import units as units_lib
from jaxprune import validate

PyTree = Any

# Modules sow each unit group's activations as ``sow("intermediates", name + ACT_SUFFIX, x)``.
ACT_SUFFIX = "_out"

_ACTS = {
    "sigmoid": nn.sigmoid,
    "tanh": jnp.tanh,
    "relu": nn.relu,
    "linear": lambda x: x,
}


def activation_fn(name: str):
  """The nonlinearity called ``name`` (one of sigmoid, tanh, relu, linear)."""
  if name not in _ACTS:
    raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(_ACTS)}.")
  return _ACTS[name]


def whole_number(value: Any, what: str) -> int:
  """``value`` as a Python int: an int, a NumPy integer or a float with no fractional part
  (``5.0``); a ValueError naming ``what`` for anything else (``6.5`` is not silently cut to 6,
  ``True`` is not taken for 1)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer, float, np.floating)):
    raise ValueError(f"{what} must be a whole number, got {value!r} "
                     f"({type(value).__name__}).")
  if isinstance(value, (float, np.floating)) and not float(value).is_integer():
    raise ValueError(f"{what} must be a whole number, got {value!r}: a layer has a whole "
                     f"number of units (or pixels); pass round({value!r}) or int({value!r}) "
                     "if that is meant.")
  return int(value)


def whole_numbers(values: Any, what: str, example: str) -> tuple[int, ...]:
  """``values`` (a sequence of whole numbers) as a tuple of ints; a ValueError naming ``what``
  and showing ``example`` for a single number, a string or a non-sequence."""
  if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
    one = isinstance(values, (int, np.integer, float, np.floating))
    raise ValueError(f"{what} must be a sequence with one entry per layer, e.g. {example}; got "
                     f"{values!r}" + (f": for one layer write ({values!r},)." if one else "."))
  return tuple(whole_number(v, f"{what}[{i}]") for i, v in enumerate(values))


def _find(tree: Mapping, name: str):
  """Finds ``name`` anywhere in a nested intermediates dict (sow stores a tuple)."""
  if name in tree:
    v = tree[name]
    return v[0] if isinstance(v, tuple) else v
  for v in tree.values():
    if isinstance(v, Mapping):
      r = _find(v, name)
      if r is not None:
        return r
  return None


@functools.lru_cache(maxsize=128)
def _jitted_init(model: "Model"):
  """One compiled initialiser per model description (eager flax init is slow), compiled at
  LLVM level 1 on CPU: the same params, 2-4x less compilation (``jaxprune._compile``)."""
  shape = (1,) + tuple(model.input_shape)
  return _compile.light_jit(lambda key: dict(model.module.init(key, jnp.zeros(shape,
                                                                              jnp.float32))))


@functools.lru_cache(maxsize=128)
def _jitted_apply_with_activations(model: "Model", names: tuple[str, ...]):
  """One compiled forward pass per model and group names: called eagerly, flax's apply would
  compile each of its operations as a program of its own (the main job's activations: 51
  programs in 4-6 s of compilation on 2 cores); inside a jit it is inlined as before."""

  def run(params, x):
    with model.named_shape_errors(params):
      out, state = model.module.apply(params, x, mutable=["intermediates"])
    return out, {n: _find(state["intermediates"], n + ACT_SUFFIX) for n in names}

  return jax.jit(run)


@functools.lru_cache(maxsize=128)
def _init_shapes(model: "Model") -> dict:
  """``{path: shape}`` of the variables :meth:`Model.init` makes (abstract: nothing computed)."""
  tree = jax.eval_shape(model.init, jax.random.key(0))
  return {jax.tree_util.keystr(k): tuple(v.shape)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@functools.lru_cache(maxsize=64)
def _traced(model: "Model"):
  from jaxprune import tracing  # pylint: disable=g-import-not-at-top
  params = jax.eval_shape(model.init, jax.random.key(0))
  x = jax.ShapeDtypeStruct((2,) + tuple(model.input_shape), jnp.float32)
  return tracing.trace(model.apply, params, x)


@dataclasses.dataclass(frozen=True)
class Model(abc.ABC):
  """Base class: subclasses define ``input_shape``, ``module``, ``groups`` and ``resize``."""

  task = "classification"  # or "reconstruction"

  # -- to be provided by subclasses ---------------------------------------------------------
  @property
  @abc.abstractmethod
  def input_shape(self) -> tuple[int, ...]:
    """Shape of one input (without the batch axis)."""

  @property
  @abc.abstractmethod
  def module(self) -> nn.Module:
    """The Flax linen module that computes the outputs."""

  @property
  @abc.abstractmethod
  def groups(self) -> dict[str, units_lib.UnitGroup]:
    """The prunable unit groups, by name."""

  @abc.abstractmethod
  def resize(self, sizes: Mapping[str, int]) -> "Model":
    """The same architecture with the named groups resized to ``sizes``."""

  # -- shared behaviour -------------------------------------------------------------------------
  @property
  def group_sizes(self) -> dict[str, int]:
    return {k: g.size for k, g in self.groups.items()}

  def _rebuild_hint(self, shape, convert: str = "Reshape or resize the inputs") -> str:
    """What to do about inputs of another ``shape``: ``convert`` them, or build the model for
    it where such a model can be built (an 8x8 image is too small for a LeNet: say so, not to
    build one). The model's field is named as its constructor takes it."""
    fields = ({f.name: f for f in dataclasses.fields(self) if f.init}
              if dataclasses.is_dataclass(self) else {})
    if "input_shape" in fields:
      change = {"input_shape": tuple(shape)}
    elif "in_features" in fields and len(shape) == 1:
      change = {"in_features": shape[0]}
    else:
      return f"{convert}, or build the model with input shape {shape}."
    args = ", ".join(f"{k}={v}" for k, v in change.items())
    try:
      dataclasses.replace(self, **change)
    except Exception as e:  # pylint: disable=broad-except  (any reason the constructor gives)
      return f"{convert}; no model with {args} can be built: {e}"
    return f"{convert}, or build the model with {args}."

  def check_input(self, x) -> None:
    """Raises ValueError if ``x`` is not a batch of this model's inputs."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):   # a list: "Cannot determine dtype"
      raise TypeError(f"{type(self).__name__} takes an array of inputs, got a "
                      f"{type(x).__name__}: pass jnp.asarray(x, jnp.float32).")
    shape = tuple(jnp.shape(x))
    want = self.input_shape
    if len(shape) != len(want) + 1 or shape[1:] != want:
      what = ""
      if len(want) == 3 and len(shape) == 4 and shape[1:3] == want[:2]:
        what = f" (it has {shape[-1]} channels, the model takes {want[-1]})"
      if shape == want:   # one example without its batch axis
        raise ValueError(
            f"{type(self).__name__} takes a batch of shape (N, {', '.join(map(str, want))}); got "
            f"one example of shape {shape}: add the batch axis, x[None].")
      if len(shape) != len(want) + 1:   # "build the model with input shape ()" helps no one
        raise ValueError(
            f"{type(self).__name__} takes a batch of shape (N, {', '.join(map(str, want))}), "
            f"{len(want) + 1} axes; got {len(shape)} axes, shape {shape}. Reshape the inputs "
            f"to (N, {', '.join(map(str, want))}).")
      if len(want) == 3 and len(shape) == 4 and shape[1:] == (want[2], want[0], want[1]):
        raise ValueError(      # channels first (PyTorch's NCHW): the model takes NHWC
            f"{type(self).__name__} takes a batch of shape (N, {', '.join(map(str, want))}), "
            f"channels last; got {shape}, channels first (NCHW). Transpose it: "
            "x.transpose(0, 2, 3, 1).")
      convert = "Reshape or resize the inputs"
      if what:
        tip = {(4, 3): "x[..., :3] drops an alpha channel", (1, 3): "np.repeat(x, 3, axis=-1) "
               "repeats grey", (3, 1): "x.mean(-1, keepdims=True) makes grey"}.get(
                   (shape[-1], want[-1]))
        convert = (f"Convert the inputs to {want[-1]} channel{'s' * (want[-1] != 1)}"
                   + (f" ({tip})" if tip else ""))
      raise ValueError(
          f"{type(self).__name__} takes a batch of shape (N, {', '.join(map(str, want))}); got "
          f"{shape}{what}. {self._rebuild_hint(shape[1:], convert)}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
      raise ValueError(f"Inputs must be floating point, got dtype {jnp.result_type(x)}: pass "
                       "x.astype(jnp.float32) (scaled as the model was trained, e.g. images "
                       "/ 255).")

  def _check_sizes(self, sizes: Mapping[str, Any]) -> dict[str, int]:
    """``sizes`` for :meth:`resize`: names of this model's groups, whole numbers (a KeyError
    or ValueError naming the problem otherwise)."""
    groups = self.groups
    out = {}
    for k, v in sizes.items():
      units_lib._check_group_name(groups, k)
      out[k] = whole_number(v, f"size of group {k!r}")
    return out

  def check_variables(self, params: PyTree) -> None:
    """Raises ValueError if ``params`` is not a variables dict as :meth:`init` returns it
    (``{'params': ...}``, plus ``'batch_stats'`` for models with batch norm)."""
    if not isinstance(params, Mapping):
      raise ValueError(f"{type(self).__name__} takes the variables dict that init returns "
                       f"({{'params': ...}}), got a {type(params).__name__}.")
    want = self._collections
    missing = [c for c in want if c not in params]
    if not missing:
      return
    keys = sorted(map(str, params))
    layers = [k for k in keys if k not in ("params", "batch_stats")]
    inner = ("; it looks like the inner params (layer names at the top): pass the whole "
             "variables dict, e.g. model.apply({'params': params"
             + (", 'batch_stats': batch_stats" if "batch_stats" in want else "") + "}, x)"
             if layers and "params" in missing else
             ": pass the whole variables dict that init (or load_resnet18) returns")
    raise ValueError(f"{type(self).__name__} takes a variables dict with "
                     f"{' and '.join(repr(c) for c in want)}; the one given has keys {keys}, "
                     f"without {', '.join(repr(c) for c in missing)}{inner}.")

  @contextlib.contextmanager
  def named_shape_errors(self, params: PyTree):
    """Around ``self.module.apply(params, ...)``: Flax's ``ScopeParamShapeError`` (params of a
    model of another input, output or hidden width; it said what, not what to do), and its
    ``ScopeParamNotFoundError`` (params without a layer the model has), become the ValueError of
    :meth:`_check_shapes`. Costs nothing when the params fit."""
    try:
      yield
    except (flax.errors.ScopeParamShapeError, flax.errors.ScopeParamNotFoundError):
      try:
        self._check_shapes(params)
      except ValueError as named:
        raise named from None
      raise

  def _check_shapes(self, params: PyTree) -> None:
    """Raises ValueError naming the first leaf whose shape is not the one this model makes, or
    the leaves it makes that ``params`` lacks."""
    want = _init_shapes(self)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    missing = sorted(set(want) - {jax.tree_util.keystr(path) for path, _ in flat})
    if missing:
      shown = ", ".join(f"params{k}" for k in missing[:4]) + (
          f" and {len(missing) - 4} more" if len(missing) > 4 else "")
      raise ValueError(
          f"These params do not fit {type(self).__name__}: they lack {shown}, which the model "
          "has. Pass the params of this model (model.init(key), or the ones it was trained "
          "with); the names of its leaves: jax.tree_util.tree_flatten_with_path(model.init("
          "key)).")
    for path, leaf in flat:
      key = jax.tree_util.keystr(path)
      shape = tuple(jnp.shape(leaf))
      if key in want and shape != want[key]:
        # every setting but the nonlinearity can set a leaf's size (CNN4's dense, ResNet18's
        # widths; strides and pools the first dense layer's input)
        fields = [f.name for f in dataclasses.fields(self) if f.init and f.name != "activation"
                  ] if dataclasses.is_dataclass(self) else []
        build = (f" (its {', '.join(fields)})" if fields else "")
        raise ValueError(
            f"These params do not fit {type(self).__name__}: params{key} has shape {shape}, "
            f"the model's is {want[key]}. Pass the params of this model (model.init(key), or "
            f"the ones it was trained with), or build the model with the sizes these params "
            f"have{build}; a compacted network's sizes: model.resize(sizes).")

  _collections = ("params",)   # the variables' collections apply needs (not a field)

  def init(self, key: jax.Array) -> PyTree:
    """Initial variables for this model (a dict with a ``'params'`` entry)."""
    validate.check_key(key, single="init", batch_fix=(
        "for one network per key, vmap over them: jax.vmap(model.init)(keys)."))
    return _jitted_init(self)(key)

  def apply(self, params: PyTree, x: jax.Array) -> jax.Array:
    """Inference: outputs for a batch ``x`` (logits, or reconstructions for autoencoders)."""
    self.check_input(x)
    self.check_variables(params)
    with self.named_shape_errors(params):
      return self.module.apply(params, x)

  def apply_with_activations(self, params: PyTree, x: jax.Array,
                             names: Sequence[str]) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Outputs and the activations of the named unit groups (units on the last axis)."""
    self.check_input(x)
    self.check_variables(params)
    if isinstance(names, str):   # iterating it would look up groups 'h', 'i', ...
      raise TypeError(f"names must be a sequence of group names, got the string {names!r}: "
                      f"pass ({names!r},), or call activations(params, x, {names!r}).")
    groups = self.groups
    for n in names:
      units_lib._check_group_name(groups, n)
    return _jitted_apply_with_activations(self, tuple(names))(params, x)

  def activations(self, params: PyTree, x: jax.Array, name: str) -> jax.Array:
    """The activations of unit group ``name`` on batch ``x``: (N, units) or (N, H, W, units)."""
    return self.apply_with_activations(params, x, (name,))[1][name]

  def apply_train(self, params: PyTree, x: jax.Array,
                  mask: jax.Array | None = None) -> tuple[jax.Array, PyTree]:
    """Training-mode forward pass: (outputs, params with updated running statistics).

    ``mask`` (N,) bool marks the real samples of a padded batch; models with batch statistics
    compute them over those samples only (others ignore it).
    """
    self.check_batch_mask(x, mask)
    return self.apply(params, x), params

  def check_batch_mask(self, x, mask) -> None:
    """Raises ValueError unless ``mask`` is None or a bool (or integer 0/1) vector with one
    entry per example of ``x`` (a shape check: it also works inside ``jax.jit``)."""
    if mask is None:
      return
    shape, n = tuple(jnp.shape(mask)), jnp.shape(x)[0]
    if shape != (n,):   # was a broadcasting error from inside the batch norms
      raise ValueError(f"mask must have shape ({n},), one bool per example of the batch x "
                       f"(True for the real examples of a padded batch); got shape {shape}.")
    dtype = jnp.result_type(mask)
    if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer)):
      raise ValueError(f"mask must be bool (True for the real examples), got dtype {dtype}; "
                       "threshold it, e.g. mask > 0.")

  def compact(self, params: PyTree, unit_masks: Mapping[str, Any]) -> tuple[PyTree, "Model"]:
    """Removes masked units: returns (smaller params, the resized model that runs them).

    The compacted model's outputs equal the masked model's (``apply(apply_masks(params,
    expand(...)), x)``) to float tolerance.
    """
    groups = self.groups
    small = units_lib.compact(params, groups, unit_masks)  # checks keys, shapes and dtypes
    sizes = {k: int(np.sum(np.asarray(units_lib.unit_mask(np.asarray(m), groups[k], np))))
             for k, m in unit_masks.items()}
    return small, self.resize(sizes)

  def traced(self):
    """This model as :func:`jaxprune.trace` sees it (from shapes only; cached per model)."""
    return _traced(self)

  def readout(self, name: str):
    """The consumer slice of ``name`` when its only reader is the output layer (an affine map of
    the group's activations: the GA's fast path); else None. Found by tracing, not by name."""
    declared = units_lib._check_group_name(self.groups, name)
    t = self.traced()
    same = [n for n, g in t.groups.items() if g.slices == declared.slices]
    return t.readout(same[0]) if same else None

  def explain(self) -> str:
    """Every parameter leaf with its traced group and role, or why it has none."""
    return self.traced().explain()

  def param_count(self, params: PyTree) -> int:
    return int(sum(np.size(p) for p in jax.tree.leaves(params.get("params", params))))
