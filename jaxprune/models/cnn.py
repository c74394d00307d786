"""Convolutional networks of the SFEW studies: a LeNet-style CNN and the 4-conv + 4-dense CNN.

Both are channels-last (NHWC). Conv output channels and dense hidden neurons are unit groups;
the last conv's channels are read by a dense layer through ``flatten``, which their group
declares with a ``view`` on the dense kernel.

Example:
  >>> import jax, jaxprune
  >>> model = jaxprune.LeNet(input_shape=(90, 72, 1))
  >>> params = model.init(jax.random.key(0))
  >>> model.apply(params, jax.numpy.zeros((2, 90, 72, 1))).shape
  (2, 7)
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import flax.linen as nn

from jaxprune.models.base import Model, activation_fn, whole_number, whole_numbers
from jaxprune.models.mlp import dense_chain_groups


class _ConvNetModule(nn.Module):
  """conv layers (each optionally followed by max-pooling), flatten, dense layers, output."""

  channels: tuple[int, ...]
  kernels: tuple[int, ...]
  strides: tuple[int, ...]
  paddings: tuple[str, ...]
  pools: tuple[tuple[int, int] | None, ...]  # (window, stride) after each conv, or None
  dense: tuple[int, ...]
  out_features: int
  activation: str

  @nn.compact
  def __call__(self, x):
    act = activation_fn(self.activation)
    for i, (c, k, s, p, pool) in enumerate(zip(self.channels, self.kernels, self.strides,
                                               self.paddings, self.pools)):
      x = act(nn.Conv(c, (k, k), strides=(s, s), padding=p, name=f"conv_{i}")(x))
      self.sow("intermediates", f"conv_{i}_out", x)
      if pool is not None:
        x = nn.max_pool(x, (pool[0], pool[0]), strides=(pool[1], pool[1]))
    x = x.reshape(x.shape[0], -1)
    for i, d in enumerate(self.dense):
      x = act(nn.Dense(d, name=f"dense_{i}")(x))
      self.sow("intermediates", f"dense_{i}_out", x)
    return nn.Dense(self.out_features, name="out")(x)


def _paddings(paddings) -> tuple[str, ...]:
  """'VALID' or 'SAME' per conv (any case, as flax takes them), upper-cased: the feature-map
  arithmetic and the unit groups' flatten view follow them, so other paddings are refused."""
  if isinstance(paddings, str):
    raise ValueError(f"paddings needs one entry per conv, e.g. ('VALID', 'SAME'); got the "
                     f"string {paddings!r}.")
  out = []
  for i, p in enumerate(paddings):
    if not isinstance(p, str) or p.upper() not in ("VALID", "SAME"):
      raise ValueError(f"paddings[{i}] is {p!r}; the built-in conv nets take 'VALID' or 'SAME' "
                       "(for other paddings write your own model and jaxprune.trace it).")
    out.append(p.upper())   # 'valid' was taken for 'SAME' by the feature-map arithmetic
  return tuple(out)


def _pools(pools) -> tuple[tuple[int, int] | None, ...]:
  """None or (window, stride) per conv, as whole positive numbers."""
  if isinstance(pools, str) or not isinstance(pools, (tuple, list)):
    raise ValueError(f"pools needs one entry per conv, each None or (window, stride), e.g. "
                     f"((2, 2), None); got {pools!r}.")
  out = []
  for i, p in enumerate(pools):
    if p is None:
      out.append(None)
      continue
    if isinstance(p, str) or not isinstance(p, (tuple, list)) or len(p) != 2:
      raise ValueError(f"pools[{i}] is {p!r}; each entry is None or (window, stride), e.g. "
                       "(2, 2) for 2x2 max-pooling with stride 2.")
    w, st = (whole_number(v, f"pools[{i}][{j}]") for j, v in enumerate(p))
    if w < 1 or st < 1:
      raise ValueError(f"pools[{i}] is {p!r}; window and stride must be positive.")
    out.append((w, st))
  return tuple(out)


@dataclasses.dataclass(frozen=True)
class _ConvNet(Model):
  """Shared machinery; see :class:`LeNet` and :class:`CNN4`."""

  input_shape: tuple[int, ...] = (90, 72, 1)
  channels: tuple[int, ...] = ()
  kernels: tuple[int, ...] = ()
  strides: tuple[int, ...] = ()
  paddings: tuple[str, ...] = ()
  pools: tuple = ()
  dense: tuple[int, ...] = ()
  out_features: int = 7
  activation: str = "relu"

  def __post_init__(self):
    examples = {"input_shape": "(90, 72, 1)", "channels": "(16, 32)", "kernels": "(5, 5)",
                "strides": "(1, 1)", "dense": "(512, 128)"}
    for f, example in examples.items():   # whole numbers: 6.5 raised a flax shape error
      object.__setattr__(self, f, whole_numbers(getattr(self, f), f, example))
    object.__setattr__(self, "out_features", whole_number(self.out_features, "out_features"))
    object.__setattr__(self, "paddings", _paddings(self.paddings))
    object.__setattr__(self, "pools", _pools(self.pools))
    activation_fn(self.activation)
    n = len(self.channels)
    if n < 1:
      raise ValueError(f"{type(self).__name__} needs at least one conv layer; channels is "
                       f"{self.channels}.")
    if not (len(self.kernels) == len(self.strides) == len(self.paddings) == len(self.pools) == n):
      raise ValueError("channels, kernels, strides, paddings and pools need one entry per conv.")
    if len(self.input_shape) != 3:
      raise ValueError(f"input_shape must be (height, width, channels), got {self.input_shape}.")
    if any(c < 1 for c in self.channels + self.dense) or self.out_features < 1:
      raise ValueError(f"Layer sizes must be positive: channels={self.channels}, "
                       f"dense={self.dense}, out_features={self.out_features}.")
    if any(d < 1 for d in self.input_shape + self.kernels + self.strides):
      raise ValueError(f"input_shape, kernels and strides must be positive: input_shape="
                       f"{self.input_shape}, kernels={self.kernels}, strides={self.strides}.")
    h, w, _ = self.feature_map_shape()
    if h < 1 or w < 1:
      mh, mw = self.min_input_size()
      name = type(self).__name__
      raise ValueError(f"Input {self.input_shape} is too small for {name}: its feature map "
                       f"shrinks to nothing ({max(h, 0)}x{max(w, 0)} after the last conv "
                       f"block). {name} with these kernels, strides, paddings and pools needs "
                       f"inputs of at least {mh}x{mw} (height x width).")

  def feature_map_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of the last conv block's output (after pooling), as flatten sees it."""
    h, w = self.input_shape[:2]
    for k, s, p, pool in zip(self.kernels, self.strides, self.paddings, self.pools):
      if p == "VALID":
        h, w = (h - k) // s + 1, (w - k) // s + 1
      else:
        h, w = -(-h // s), -(-w // s)
      if pool is not None:
        h, w = (h - pool[0]) // pool[1] + 1, (w - pool[0]) // pool[1] + 1
    return h, w, self.channels[-1]

  def min_input_size(self) -> tuple[int, int]:
    """The smallest (H, W) input whose last feature map is at least 1x1, computed from the
    kernels, strides, paddings and pools (LeNet: 16x16; CNN4: 59x59)."""
    n = 1  # walk back from a 1x1 map: the smallest input giving n outputs, layer by layer
    for k, s, p, pool in reversed(list(zip(self.kernels, self.strides, self.paddings,
                                           self.pools))):
      if pool is not None:
        n = (n - 1) * pool[1] + pool[0]
      n = (n - 1) * s + (k if p == "VALID" else 1)
    return n, n

  @property
  def module(self):
    return _ConvNetModule(self.channels, self.kernels, self.strides, self.paddings, self.pools,
                          self.dense, self.out_features, self.activation)

  @property
  def groups(self):
    convs = tuple(f"conv_{i}" for i in range(len(self.channels)))
    denses = tuple(f"dense_{i}" for i in range(len(self.dense)))
    layers = convs + denses
    nexts = layers[1:] + ("out",)
    h, w, c = self.feature_map_shape()
    width = self.dense[0] if self.dense else self.out_features
    # flatten: channel c owns rows c, c + C, ... (plain rows when the map is 1x1)
    view = {convs[-1]: (h * w, c, width)} if h * w > 1 else {}
    # Conv i is read by conv i+1; a 'SAME' (zero-padded) reader makes constant folding inexact.
    padded = tuple(convs[i] for i in range(len(convs) - 1)
                   if self.paddings[i + 1] != "VALID" and self.kernels[i + 1] > 1)
    pooled = tuple(c for c, pool in zip(convs, self.pools) if pool is not None)
    groups = dense_chain_groups(convs, self.channels, nexts[:len(convs)], self.activation,
                                consumer_view=view, kind="conv", padded_consumers=padded,
                                dense_consumers=() if view else convs[-1:], max_pooled=pooled)
    groups.update(dense_chain_groups(denses, self.dense, nexts[len(convs):], self.activation))
    return groups

  def resize(self, sizes: Mapping[str, int]):
    channels, dense = list(self.channels), list(self.dense)
    # Checked: a name of no group ('hidden_0') resized dense_0, or raised an IndexError.
    for k, v in self._check_sizes(sizes).items():
      kind, i = k.split("_")
      (channels if kind == "conv" else dense)[int(i)] = int(v)
    return dataclasses.replace(self, channels=tuple(channels), dense=tuple(dense))


@dataclasses.dataclass(frozen=True)
class LeNet(_ConvNet):
  """LeNet-style CNN: conv(16, 5x5) - max-pool - conv(32, 5x5) - max-pool - dense to 7 classes.

  For single-channel images (90x72 in the kernel-importance study). 'VALID' convolutions and
  2x2 max-pooling; unit groups ``conv_0`` (16 channels) and ``conv_1`` (32 channels).
  """

  input_shape: tuple[int, ...] = (90, 72, 1)
  channels: tuple[int, ...] = (16, 32)
  kernels: tuple[int, ...] = (5, 5)
  strides: tuple[int, ...] = (1, 1)
  paddings: tuple[str, ...] = ("VALID", "VALID")
  pools: tuple = ((2, 2), (2, 2))
  dense: tuple[int, ...] = ()
  out_features: int = 7
  activation: str = "relu"


@dataclasses.dataclass(frozen=True)
class CNN4(_ConvNet):
  """The 4-conv + 4-dense CNN of the training-time distinctiveness study (227x227 RGB).

  conv 16/32/64/64 channels, kernels 11/5/3/3, strides 4/2/1/1 (the first two 'VALID', the last
  two 'SAME'), max-pooling after the 3rd conv (3x3, stride 2) and the 4th (2x2, stride 2), then
  dense 64*6*6 -> 512 -> 128 -> 64 -> 7, sigmoid activations. On 227x227 inputs the last feature
  map is exactly 6x6x64. Unit groups ``conv_0..conv_3`` and ``dense_0..dense_2``.
  """

  input_shape: tuple[int, ...] = (227, 227, 3)
  channels: tuple[int, ...] = (16, 32, 64, 64)
  kernels: tuple[int, ...] = (11, 5, 3, 3)
  strides: tuple[int, ...] = (4, 2, 1, 1)
  paddings: tuple[str, ...] = ("VALID", "VALID", "SAME", "SAME")
  pools: tuple = (None, None, (3, 2), (2, 2))
  dense: tuple[int, ...] = (512, 128, 64)
  out_features: int = 7
  activation: str = "sigmoid"
