"""Multilayer perceptrons and the n-H-n autoencoder.

Example:
  >>> import jax, jaxprune
  >>> model = jaxprune.MLP(in_features=10, hidden=(100,), out_features=7)
  >>> params = model.init(jax.random.key(0))
  >>> logits = model.apply(params, jax.numpy.zeros((4, 10)))
  >>> logits.shape
  (4, 7)
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import flax.linen as nn

from jaxprune.models.base import Model, activation_fn, whole_number, whole_numbers
from jaxprune.units import ZERO_PADDED_CONV, Slice, UnitGroup


class _MLPModule(nn.Module):
  hidden: tuple[int, ...]
  out_features: int
  activation: str

  @nn.compact
  def __call__(self, x):
    act = activation_fn(self.activation)
    for i, h in enumerate(self.hidden):
      x = act(nn.Dense(h, name=f"hidden_{i}")(x))
      self.sow("intermediates", f"hidden_{i}_out", x)
    return nn.Dense(self.out_features, name="out")(x)


def dense_chain_groups(layer_names: tuple[str, ...], sizes: tuple[int, ...],
                       next_names: tuple[str, ...], activation: str,
                       group_names: tuple[str, ...] | None = None,
                       consumer_view: dict[str, tuple[int, ...]] | None = None,
                       kind: str = "dense",
                       padded_consumers: tuple[str, ...] = (),
                       dense_consumers: tuple[str, ...] = (),
                       max_pooled: tuple[str, ...] = ()) -> dict[str, UnitGroup]:
  """Unit groups for a chain of layers: layer i's outputs are read by layer ``next_names[i]``.

  Each group owns its layer's kernel columns (the last axis: 1 of a dense (in, out) kernel, 3 of
  a conv (kh, kw, in, out) kernel) and bias, and the consumer layer's kernel rows (the input
  axis: 0 of a dense kernel, 2 of a conv kernel, 1 of a dense kernel read through flatten with
  ``view=(H*W, C, out)``). Conv groups are read by the next conv, except one with a view.
  Groups named in ``padded_consumers`` are read by a zero-padded convolution, and conv groups
  named in ``dense_consumers`` by a dense layer without a view (a 1x1 map flattened); groups
  named in ``max_pooled`` are read through max pooling.
  """
  group_names = group_names or layer_names
  consumer_view = consumer_view or {}
  groups = {}
  for name, layer, size, nxt in zip(group_names, layer_names, sizes, next_names):
    view = consumer_view.get(name)
    conv = kind == "conv"
    groups[name] = UnitGroup(
        name=name, size=size, activation=activation, kind=kind,
        slices=(
            Slice(("params", layer, "kernel"), axis=3 if conv else 1, role="producer"),
            Slice(("params", layer, "bias"), axis=0, role="producer", kind="bias"),
            Slice(("params", nxt, "kernel"),
                  axis=1 if view else (2 if conv and name not in dense_consumers else 0),
                  role="consumer", view=view, bias=("params", nxt, "bias"),
                  padded=name in padded_consumers, max_pooled=name in max_pooled,
                  padded_why=ZERO_PADDED_CONV if name in padded_consumers else None),
        ))
  return groups


@dataclasses.dataclass(frozen=True)
class MLP(Model):
  """A dense network: ``in_features -> hidden[0] -> ... -> out_features`` (logits).

  Hidden layers use ``activation`` (sigmoid, tanh or relu); the output is linear (logits; softmax
  is applied by the loss or :func:`jax.nn.softmax`). Unit groups are ``hidden_0``, ``hidden_1``...

  Attributes:
    in_features: input dimension (10 for the SFEW features).
    hidden: hidden layer sizes, e.g. ``(100,)`` for the 10-100-7 network.
    out_features: number of classes (7).
    activation: hidden nonlinearity.
  """

  in_features: int = 10
  hidden: tuple[int, ...] = (10,)
  out_features: int = 7
  activation: str = "sigmoid"

  def __post_init__(self):
    object.__setattr__(self, "hidden", whole_numbers(self.hidden, "hidden", "(100,)"))
    for f in ("in_features", "out_features"):   # 5.0 -> 5; 6.5 raises (was a flax shape error)
      object.__setattr__(self, f, whole_number(getattr(self, f), f))
    activation_fn(self.activation)
    if any(h < 1 for h in self.hidden) or self.in_features < 1 or self.out_features < 1:
      raise ValueError(f"Layer sizes must be positive, got in={self.in_features}, "
                       f"hidden={self.hidden}, out={self.out_features}.")

  @property
  def input_shape(self):
    return (self.in_features,)

  @property
  def module(self):
    return _MLPModule(self.hidden, self.out_features, self.activation)

  @property
  def groups(self):
    names = tuple(f"hidden_{i}" for i in range(len(self.hidden)))
    return dense_chain_groups(names, self.hidden, names[1:] + ("out",), self.activation)

  def resize(self, sizes: Mapping[str, int]) -> "MLP":
    hidden = list(self.hidden)
    # Checked: a name of no group resized hidden_0 ('conv_0') or raised an IndexError.
    for k, v in self._check_sizes(sizes).items():
      hidden[int(k.split("_")[1])] = int(v)
    return dataclasses.replace(self, hidden=tuple(hidden))


@dataclasses.dataclass(frozen=True, init=False)
class Autoencoder(MLP):
  """An n-H-n autoencoder: sigmoid hidden layer, linear output of the input's size.

  The progressive compression study uses 10-10-10 (the 10 features). ``jaxprune.fit`` trains it
  towards its inputs (``y = x``) with the squared error, the default loss of models whose
  ``task`` is ``'reconstruction'`` (``jaxprune.train.squared_error``).
  ``out_features`` is always ``in_features``; giving another value raises.
  """

  task = "reconstruction"
  in_features: int = 11
  hidden: tuple[int, ...] = (10,)
  # Not an init field, so dataclasses.replace(model, in_features=...) makes it follow.
  out_features: int = dataclasses.field(default=-1, init=False)
  activation: str = "sigmoid"

  def __init__(self, in_features: int = 11, hidden: tuple[int, ...] = (10,),
               out_features: int | None = None, activation: str = "sigmoid"):
    if out_features is not None and out_features != in_features:
      raise ValueError(
          f"An Autoencoder reconstructs its input, so its output size is in_features "
          f"({in_features!r}); got out_features={out_features!r}. Leave out_features "
          "out, or use jaxprune.MLP for another output size.")
    for name, value in (("in_features", in_features), ("hidden", hidden),
                        ("out_features", in_features), ("activation", activation)):
      object.__setattr__(self, name, value)
    self.__post_init__()   # MLP's checks (a bad in_features raises there)

