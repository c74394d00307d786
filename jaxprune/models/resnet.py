"""ResNet-18 (torchvision-compatible) with prunable basic-block channels and a weight loader.

The architecture, padding and batch-norm settings match ``torchvision.models.resnet18``, so
weights converted from a torchvision state dict give torchvision's outputs (channels-last NHWC
inputs here, NCHW there). Pretrained weights come from a local ``.npz`` file holding the
torchvision state dict (docs/resnet.md shows the one-off conversion); nothing is
downloaded at run time.

Unit groups: one per basic block, ``layer1_0``, ``layer1_1``, ..., ``layer4_1``: the output
channels of the block's first 3x3 conv with its batch norm (producers), read by the block's
second conv (consumer). Every other channel (the stem, each block's second conv, the
downsample path) is tied to others by a residual addition and is not pruned.

Example:
  >>> import jax, jaxprune
  >>> model = jaxprune.models.ResNet18(num_classes=7, input_shape=(64, 64, 3))
  >>> params = model.init(jax.random.key(0))
  >>> model.apply(params, jax.numpy.zeros((2, 64, 64, 3))).shape
  (2, 7)
  >>> model.groups['layer2_0'].size
  128
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import validate
from jaxprune.models.base import ACT_SUFFIX, Model, whole_number, whole_numbers
from jaxprune.units import ZERO_PADDED_CONV, Slice, UnitGroup, get_path

PyTree = Any

STAGES = (64, 128, 256, 512)
BLOCKS_PER_STAGE = 2
BLOCK_NAMES = tuple(f"layer{s + 1}_{b}" for s in range(len(STAGES))
                    for b in range(BLOCKS_PER_STAGE))
DEFAULT_WIDTHS = tuple(c for c in STAGES for _ in range(BLOCKS_PER_STAGE))

# torchvision's batch norm: momentum 0.1 on the new value, i.e. 0.9 on the running value.
_BN = dict(momentum=0.9, epsilon=1e-5)
# torchvision initialises convs with kaiming_normal_(mode='fan_out', nonlinearity='relu').
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

_CONVERT_HINT = ("Make it once, with torch and torchvision: np.savez(path, **{k: v.numpy() "
                 "for k, v in resnet18(weights=ResNet18_Weights.IMAGENET1K_V1)"
                 ".state_dict().items()}) "
                 "(docs/resnet.md).")


def _conv(features: int, kernel: int, stride: int, padding: int, name: str) -> nn.Conv:
  p = ((padding, padding), (padding, padding))
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=p,
                 use_bias=False, kernel_init=_CONV_INIT, name=name)


class _BasicBlock(nn.Module):
  """torchvision's BasicBlock: conv3x3-BN-ReLU-conv3x3-BN (+ downsample) + skip, ReLU."""

  width: int      # output channels of conv1 (the prunable units)
  features: int   # output channels of the block (tied to the skip path)
  stride: int

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    bn = lambda name, v: nn.BatchNorm(use_running_average=not train, name=name, **_BN)(
        v, mask=None if mask is None else jnp.broadcast_to(mask[:, None, None, None], v.shape))
    h = _conv(self.width, 3, self.stride, 1, "conv1")(x)
    h = nn.relu(bn("bn1", h))
    self.sow("intermediates", self.name + ACT_SUFFIX, h)
    h = _conv(self.features, 3, 1, 1, "conv2")(h)
    h = bn("bn2", h)
    if self.stride != 1 or x.shape[-1] != self.features:
      x = _conv(self.features, 1, self.stride, 0, "downsample_conv")(x)
      x = bn("downsample_bn", x)
    return nn.relu(h + x)


class _ResNet18Module(nn.Module):
  widths: tuple[int, ...]
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False, mask=None):
    """``mask`` (N,) bool: in training mode, batch statistics use only these samples."""
    x = _conv(64, 7, 2, 3, "conv1")(x)
    m = None if mask is None else jnp.broadcast_to(mask[:, None, None, None], x.shape)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn1", **_BN)(x, mask=m))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    i = 0
    for s, features in enumerate(STAGES):
      for b in range(BLOCKS_PER_STAGE):
        stride = 2 if (s > 0 and b == 0) else 1
        x = _BasicBlock(self.widths[i], features, stride, name=BLOCK_NAMES[i])(x, train, mask)
        i += 1
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)


def _conv_out(n: int, kernel: int, stride: int, padding: int) -> int:
  return (n + 2 * padding - kernel) // stride + 1


# (kernel, stride, padding) of every step that shrinks the feature map: the stem conv, the
# max-pool and the first 3x3 conv of the stride-2 blocks of stages 2-4 (their 1x1 downsample
# gives the same size).
_SHRINKING = ((7, 2, 3), (3, 2, 1), (3, 2, 1), (3, 2, 1), (3, 2, 1))


@dataclasses.dataclass(frozen=True)
class ResNet18(Model):
  """ResNet-18 as in torchvision (channels-last), with one unit group per basic block.

  Stem: conv 7x7/2 (padding 3, no bias), batch norm, ReLU, max-pool 3x3/2 (padding 1). Four
  stages of two basic blocks (64, 128, 256, 512 channels; the first block of stages 2-4 has
  stride 2 and a 1x1 conv + batch-norm downsample), global average pooling, dense head. Batch
  norm uses momentum 0.9 (torch's 0.1) and epsilon 1e-5.

  ``apply`` runs batch norm on its running averages (inference); ``apply_train`` uses batch
  statistics and returns the updated running averages.

  Attributes:
    num_classes: outputs of the dense head (7 expressions by default; 1000 for ImageNet).
    input_shape: (height, width, 3); anything that survives the five stride-2 steps (>= 1x1
      feature maps; 224x224 for ImageNet weights, 32x32 or 64x64 for quick tests).
    widths: output channels of the first conv of each of the 8 basic blocks (the prunable
      units), in the order of :data:`BLOCK_NAMES`; ``resize``/``compact`` change them.
  """

  num_classes: int = 7
  input_shape: tuple[int, ...] = (224, 224, 3)
  widths: tuple[int, ...] = DEFAULT_WIDTHS

  def __post_init__(self):
    # Whole numbers: int() cut widths=3.7 to 3 and input 32.5 to 32; num_classes=7.0 raised a
    # flax shape error.
    object.__setattr__(self, "input_shape",
                       whole_numbers(self.input_shape, "input_shape", "(224, 224, 3)"))
    object.__setattr__(self, "widths", whole_numbers(self.widths, "widths", str(DEFAULT_WIDTHS)))
    object.__setattr__(self, "num_classes", whole_number(self.num_classes, "num_classes"))
    if len(self.widths) != len(BLOCK_NAMES):
      raise ValueError(f"widths needs one entry per basic block ({len(BLOCK_NAMES)}: "
                       f"{', '.join(BLOCK_NAMES)}), got {len(self.widths)}.")
    if any(w < 1 for w in self.widths) or self.num_classes < 1:
      raise ValueError(f"Sizes must be positive: widths={self.widths}, "
                       f"num_classes={self.num_classes}.")
    if len(self.input_shape) != 3:
      raise ValueError(f"input_shape must be (height, width, channels), got {self.input_shape}.")
    if self.input_shape[2] != 3:
      raise ValueError(f"ResNet-18 takes RGB images (3 channels); input_shape has "
                       f"{self.input_shape[2]}. Repeat grey images over 3 channels.")
    h, w = self.feature_map_shape()
    if h < 1 or w < 1:
      mh, mw = self.min_input_size()
      raise ValueError(f"Input {self.input_shape} is too small for ResNet-18: its feature map "
                       f"shrinks to nothing ({max(h, 0)}x{max(w, 0)} after the last stage). "
                       f"ResNet-18 needs inputs of at least {mh}x{mw} (height x width).")

  def feature_map_shape(self) -> tuple[int, int]:
    """(H, W) of the last stage's feature map, before global average pooling."""
    dims = []
    for n in self.input_shape[:2]:
      for kernel, stride, padding in _SHRINKING:
        n = _conv_out(n, kernel, stride, padding)
      dims.append(n)
    return tuple(dims)

  def min_input_size(self) -> tuple[int, int]:
    """The smallest (H, W) input whose last feature map is at least 1x1 (computed from the
    stem, the max-pool and the stride-2 blocks)."""
    n = 1  # walk back from a 1x1 map: the smallest input giving n outputs, layer by layer
    for kernel, stride, padding in reversed(_SHRINKING):
      n = max(1, (n - 1) * stride + kernel - 2 * padding)
    return n, n

  _collections = ("params", "batch_stats")   # checked by apply (not a field)

  @property
  def module(self):
    return _ResNet18Module(self.widths, self.num_classes)

  @property
  def groups(self) -> dict[str, UnitGroup]:
    groups = {}
    for name, width in zip(BLOCK_NAMES, self.widths):
      groups[name] = UnitGroup(
          name=name, size=width, activation="relu", kind="conv",
          slices=(
              Slice(("params", name, "conv1", "kernel"), axis=3, role="producer"),
              Slice(("params", name, "bn1", "scale"), axis=0, role="producer", kind="scale"),
              Slice(("params", name, "bn1", "bias"), axis=0, role="producer", kind="shift"),
              Slice(("batch_stats", name, "bn1", "mean"), axis=0, role="producer", kind="stat"),
              Slice(("batch_stats", name, "bn1", "var"), axis=0, role="producer", kind="stat"),
              # conv2 (3x3, zero-padded) has no bias (batch norm follows), so nothing can be
              # folded into it.
              Slice(("params", name, "conv2", "kernel"), axis=2, role="consumer", bias=None,
                    padded=True, padded_why=ZERO_PADDED_CONV),
          ))
    return groups

  def resize(self, sizes: Mapping[str, int]) -> "ResNet18":
    widths = list(self.widths)
    for k, v in sizes.items():
      if k not in BLOCK_NAMES:
        raise KeyError(f"Unknown unit group {k!r}; ResNet-18's groups are {list(BLOCK_NAMES)}.")
      widths[BLOCK_NAMES.index(k)] = whole_number(v, f"size of group {k!r}")
    return dataclasses.replace(self, widths=tuple(widths))

  def init(self, key: jax.Array) -> PyTree:
    """Initial variables ``{'params': ..., 'batch_stats': ...}`` (one compiled initialiser per
    model configuration, as for every model)."""
    return super().init(key)

  def apply_train(self, params: PyTree, x: jax.Array,
                  mask: jax.Array | None = None) -> tuple[jax.Array, PyTree]:
    """Training-mode pass: batch statistics in every batch norm.

    ``mask`` (N,) bool limits the batch statistics to the marked samples (padding rows of a
    minibatch are left out, so padded and unpadded training agree). It must mark at least one
    sample: statistics over none are NaN.

    Returns:
      ``(logits, params)`` where ``params`` is the input variables with ``'batch_stats'``
      replaced by the updated running averages (the input is not modified).
    """
    self.check_input(x)
    self.check_variables(params)
    self.check_batch_mask(x, mask)
    with self.named_shape_errors(params):
      out, state = self.module.apply(params, x, train=True, mask=mask, mutable=["batch_stats"])
    new = dict(params)
    new["batch_stats"] = state["batch_stats"]
    return out, new


# ----------------------------------------------------------------------------- torchvision layout


def _layout(widths: Sequence[int] = DEFAULT_WIDTHS, num_classes: int = 1000):
  """(torch key, flax path, kind, torch shape) for each tensor of torchvision's resnet18.

  ``kind`` is 'conv' (OIHW <-> HWIO), 'fc' ((out, in) <-> (in, out)) or 'vec'. Shapes are for
  a model with the given inner ``widths`` and head size.
  """
  rows = [("conv1.weight", ("params", "conv1", "kernel"), "conv", (STAGES[0], 3, 7, 7))]

  def bn(tk, mod, c):
    return [(f"{tk}.weight", ("params",) + mod + ("scale",), "vec", (c,)),
            (f"{tk}.bias", ("params",) + mod + ("bias",), "vec", (c,)),
            (f"{tk}.running_mean", ("batch_stats",) + mod + ("mean",), "vec", (c,)),
            (f"{tk}.running_var", ("batch_stats",) + mod + ("var",), "vec", (c,))]

  rows += bn("bn1", ("bn1",), STAGES[0])
  cin = STAGES[0]
  for i, (name, width) in enumerate(zip(BLOCK_NAMES, widths)):
    s, b = name[len("layer"):].split("_")
    t, cout = f"layer{s}.{b}", STAGES[i // BLOCKS_PER_STAGE]
    rows.append((f"{t}.conv1.weight", ("params", name, "conv1", "kernel"), "conv",
                 (width, cin, 3, 3)))
    rows += bn(f"{t}.bn1", (name, "bn1"), width)
    rows.append((f"{t}.conv2.weight", ("params", name, "conv2", "kernel"), "conv",
                 (cout, width, 3, 3)))
    rows += bn(f"{t}.bn2", (name, "bn2"), cout)
    if cin != cout:
      rows.append((f"{t}.downsample.0.weight", ("params", name, "downsample_conv", "kernel"),
                   "conv", (cout, cin, 1, 1)))
      rows += bn(f"{t}.downsample.1", (name, "downsample_bn"), cout)
    cin = cout
  rows += [("fc.weight", ("params", "fc", "kernel"), "fc", (num_classes, STAGES[-1])),
           ("fc.bias", ("params", "fc", "bias"), "vec", (num_classes,))]
  return rows


def _to_flax(kind: str, a: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return np.transpose(a, (2, 3, 1, 0))
  if kind == "fc":
    return a.T
  return a


def _to_torch(kind: str, a: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return np.transpose(a, (3, 2, 0, 1))
  if kind == "fc":
    return a.T
  return a


def _names(keys, limit: int = 8) -> str:
  keys = sorted(keys)
  more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(keys[:limit]) + more


class WeightsShapeError(ValueError):
  """A tensor of a weights file has the wrong shape (raised by :func:`load_resnet18`).

  Attributes:
    key: the state-dict key.
    reason: the message without the advice (what is wrong, not what to do).
    file_widths: the blocks' inner widths the file holds when it is complete at those widths
      (saved from a model compacted by :meth:`ResNet18.compact`), else None.
  """

  def __init__(self, message: str, *, key: str, reason: str,
               file_widths: tuple[int, ...] | None):
    super().__init__(message)
    self.key, self.reason, self.file_widths = key, reason, file_widths


def _not_readable(path: str, why: str) -> ValueError:
  return ValueError(f"{path!r} is not a readable .npz archive of arrays ({why}); write it "
                    f"with np.savez(path, **state_dict) or jaxprune.save_resnet18. "
                    f"{_CONVERT_HINT}")


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """The arrays of an ``.npz`` (``num_batches_tracked`` left out); a ValueError naming the
  problem for anything else (a ``.npy`` file, a pickle, a cut-short archive)."""
  single = ValueError(f"{path!r} holds a single array (a .npy file, as np.save writes), not an "
                      "archive of the state dict's tensors; write it with "
                      f"np.savez(path, **state_dict). {_CONVERT_HINT}")
  try:
    f = np.load(path, allow_pickle=False)
  except Exception as e:  # not a zip archive nor an array file, or an object array
    if os.path.isdir(path):
      raise ValueError(
          f"{path!r} is a folder, not an .npz file. A folder that jaxprune.save_checkpoint "
          "wrote loads with jaxprune.load_checkpoint(path, model.init(key)); load_resnet18 "
          "reads the .npz that jaxprune.save_resnet18 or np.savez(path, **state_dict) writes. "
          f"{_CONVERT_HINT}") from None
    try:
      with open(path, "rb") as head:
        npy = head.read(len(np.lib.format.MAGIC_PREFIX)) == np.lib.format.MAGIC_PREFIX
    except OSError:
      npy = False
    if npy:   # e.g. np.save(path, state_dict): one pickled object
      raise single from None
    why = ("numpy finds no zip archive there and would read it as a pickle, which is never "
           "loaded" if "pickle" in str(e) else f"{type(e).__name__}: {e}")
    raise _not_readable(path, why) from None
  if not isinstance(f, np.lib.npyio.NpzFile):   # np.load of a .npy file gives one array
    raise single
  try:
    with f:
      return {k: np.asarray(f[k]) for k in f.files if not k.endswith("num_batches_tracked")}
  except Exception as e:  # a cut-short or damaged member
    raise _not_readable(path, f"{type(e).__name__}: {e}") from None


def _prefix_hint(unexpected: set[str], wanted: set[str]) -> str:
  """Advice when every wanted key is in the file under one prefix (``module.`` from
  ``nn.DataParallel``, ``model.`` or ``backbone.`` from a wrapper module), else ''."""
  for u in sorted(unexpected):
    for w in wanted:
      if len(u) > len(w) and u.endswith("." + w):
        p = u[:len(u) - len(w)]
        if wanted <= {k[len(p):] for k in unexpected if k.startswith(p)}:
          return (f"Every expected key is there under the prefix {p!r} (as nn.DataParallel "
                  "or a wrapper module saves them): write the file without it, e.g. "
                  f"np.savez(path, **{{k.removeprefix({p!r}): v for k, v in sd.items()}}).")
  return ""


def _file_widths(sd: Mapping[str, np.ndarray]) -> tuple[int, ...] | None:
  """The blocks' inner widths a state dict holds (rows of each block's conv1), if readable."""
  out = []
  for name in BLOCK_NAMES:
    s, b = name[len("layer"):].split("_")
    w = sd.get(f"layer{s}.{b}.conv1.weight")
    if w is None or w.ndim != 4 or w.shape[0] < 1:
      return None
    out.append(int(w.shape[0]))
  return tuple(out)


def _shape_advice(sd, tk: str, kind: str, found: tuple, expected: tuple,
                  widths: Sequence[int], file_classes: int) -> tuple[str, tuple | None]:
  """(what to do, the file's block widths when it is a compacted model's file) for tensor
  ``tk`` of shape ``found`` where ``expected`` was wanted."""
  if kind == "conv" and found == (expected[2], expected[3], expected[1], expected[0]):
    return ("It looks like a Flax/TensorFlow HWIO kernel (height, width, in, out); torchvision "
            "stores conv weights OIHW (out, in, height, width): transpose it with "
            "np.transpose(kernel, (3, 2, 0, 1)) (save_resnet18 converts Flax params).", None)
  if tk == "fc.bias":
    return (f"The head's bias has {found[0] if found else 0} entries but fc.weight has "
            f"{file_classes} rows (classes): both must come from the same layer.", None)
  file_widths = _file_widths(sd)
  if (file_widths is not None and file_widths != tuple(widths)
      and all(tuple(sd[k].shape) == shp for k, _, _, shp in _layout(file_widths, file_classes))):
    return (f"The file holds a ResNet-18 whose blocks have inner widths {file_widths} (as "
            "saved from a model compacted by ResNet18.compact); load it with those widths: "
            f"load_resnet18(path, widths={file_widths}).", file_widths)
  stages = _file_stages(sd)
  if stages is not None and stages != STAGES:
    return (f"Its stem or stage (residual) channels are {stages}, not torchvision's {STAGES}, "
            "as in params compacted through a traced residual group "
            "(model.traced().compact); ResNet18 and load_resnet18 only vary the blocks' inner "
            "widths. Keep such params with jaxprune.save_checkpoint.", None)
  return ("The file does not hold torchvision's resnet18 layout; re-create it from the "
          "torchvision state dict (docs/resnet.md).", None)


def _file_stages(sd: Mapping[str, np.ndarray]) -> tuple[int, ...] | None:
  """The output channels of the stem and of each stage's blocks, as the file holds them."""
  out = []
  for key in ("conv1.weight",) + tuple(f"layer{s + 1}.0.conv2.weight"
                                       for s in range(1, len(STAGES))):
    w = sd.get(key)
    if w is None or w.ndim != 4:
      return None
    out.append(int(w.shape[0]))
  return tuple(out)


def load_resnet18(path: str | os.PathLike, *, num_classes: int = 7,
                  key: jax.Array | None = None,
                  widths: Sequence[int] = DEFAULT_WIDTHS) -> PyTree:
  """Variables for :class:`ResNet18` from an ``.npz`` of torchvision's resnet18 state dict.

  Conv weights (OIHW) become HWIO kernels; batch-norm ``weight``/``bias`` become
  ``scale``/``bias`` under ``'params'`` and ``running_mean``/``running_var`` become
  ``mean``/``var`` under ``'batch_stats'``; ``fc.weight`` (out, in) becomes the head's (in, out)
  kernel. ``num_batches_tracked`` entries are ignored. Nothing is downloaded.

  If ``num_classes`` differs from the file's head (1000 for ImageNet weights), the head is
  freshly initialised from ``key`` with the initialiser :meth:`ResNet18.init` uses (for
  fine-tuning on a new task); every other weight is loaded.

  Example:
    >>> params = load_resnet18('resnet18_imagenet.npz', num_classes=7,
    ...                        key=jax.random.key(0))  # doctest: +SKIP
    >>> ResNet18(num_classes=7).apply(params, images)  # doctest: +SKIP

  Args:
    path: the ``.npz`` file (docs/resnet.md says how to make it).
    num_classes: outputs of the model the params are for.
    key: PRNG key for a fresh head; required when ``num_classes`` differs from the file's.
    widths: the basic blocks' inner widths, for files saved from a compacted model.

  Returns:
    A variables dict ``{'params': ..., 'batch_stats': ...}`` (float32).

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: the file is not an ``.npz`` archive of arrays (e.g. a ``.npy`` file), keys are
      missing or unexpected, values are not finite, or a running variance is negative.
    WeightsShapeError: (a ValueError) a tensor has the wrong shape; the message says what the
      shape suggests (a compacted model's file and the widths to load it with, HWIO kernels,
      stem or residual channels that no ResNet-18 has).
  """
  spec = ResNet18(num_classes=num_classes, widths=widths)   # validates both (whole numbers)
  widths, num_classes = spec.widths, spec.num_classes
  if key is not None:
    validate.check_key(key)
  path = os.fspath(path)
  if not os.path.exists(path) and os.path.exists(path + ".npz"):
    path += ".npz"   # np.savez (and save_resnet18) append the suffix to a name without it
  if not os.path.exists(path):
    raise FileNotFoundError(f"No ResNet-18 weights file at {path!r}. {_CONVERT_HINT}")
  sd = _read_npz(path)
  layout = _layout(widths)
  wanted = {row[0] for row in layout}
  missing, unexpected = wanted - set(sd), set(sd) - wanted
  if missing or unexpected:
    raise ValueError(
        f"{path!r} is not a torchvision resnet18 state dict: missing keys: "
        f"{_names(missing) or 'none'}; unexpected keys: {_names(unexpected) or 'none'}. "
        f"{_prefix_hint(unexpected, wanted) or _CONVERT_HINT}")
  fc = sd["fc.weight"]
  if fc.ndim != 2 or (fc.shape[0] == STAGES[-1] and fc.shape[1] != STAGES[-1]):
    reason = (f"fc.weight in {path!r} has shape {fc.shape}; ResNet-18 expects (classes, "
              f"{STAGES[-1]}).")
    advice = ("It looks stored (in, out), as a Flax or TensorFlow dense kernel is, where "
              "torchvision stores nn.Linear weights (out, in): write its transpose "
              "(save_resnet18 converts Flax params)." if fc.ndim == 2 else
              "Re-create the file from the torchvision state dict (docs/resnet.md).")
    raise WeightsShapeError(f"{reason} {advice}", key="fc.weight", reason=reason,
                            file_widths=None)
  file_classes = int(fc.shape[0])
  for tk, _, kind, shape in _layout(widths, file_classes):
    found = tuple(sd[tk].shape)
    if found != shape:
      net = ("ResNet-18" if tuple(widths) == DEFAULT_WIDTHS
             else f"ResNet-18 with widths={tuple(widths)}")
      reason = f"{tk} in {path!r} has shape {found}; {net} expects {shape}."
      advice, file_widths = _shape_advice(sd, tk, kind, found, shape, widths, file_classes)
      raise WeightsShapeError(f"{reason} {advice}", key=tk, reason=reason,
                              file_widths=file_widths)
    if sd[tk].dtype.kind not in "fiub":
      raise ValueError(f"{tk} in {path!r} holds {sd[tk].dtype} values, not numbers NumPy can "
                       "read (e.g. bfloat16 written as raw bytes); write the state dict with "
                       "float32 arrays, e.g. {k: v.float().numpy() for k, v in sd.items()}.")
    given = sd[tk]
    with np.errstate(over="ignore"):   # checked below, on the float32 values that are loaded
      sd[tk] = np.asarray(given, np.float32)
    if not np.all(np.isfinite(sd[tk])):
      if np.all(np.isfinite(given)):   # e.g. float64 1e39: was loaded as inf
        raise ValueError(f"{tk} in {path!r} holds values beyond float32's range (the largest "
                         f"magnitude {float(np.max(np.abs(given))):g}; float32 ends at "
                         "3.4e38), which would load as infinite; the file is corrupt. "
                         "Re-create it from the torchvision state dict.")
      raise ValueError(f"{tk} in {path!r} contains NaN or infinite values; the file is "
                       "corrupt. Re-create it from the torchvision state dict.")
    if tk.endswith(".running_var") and np.any(sd[tk] < 0):
      neg = sd[tk] < 0
      raise ValueError(f"{tk} in {path!r} holds negative values ({int(neg.sum())} of "
                       f"{neg.size}, the smallest {float(sd[tk].min()):g}); a batch norm's "
                       "running variance is never negative (its square root would give NaN "
                       "outputs), so the file is corrupt. Re-create it from the torchvision "
                       "state dict.")
  new_head = num_classes != file_classes
  if new_head and key is None:
    raise ValueError(f"{path!r} has a {file_classes}-class head but num_classes={num_classes}: "
                     "pass key=jax.random.key(...) to initialise a new head.")
  variables: dict = {}  # built fresh here, so filling it in place touches no user data
  for tk, fpath, kind, _ in layout:
    if new_head and tk.startswith("fc."):
      continue
    node = variables
    for k in fpath[:-1]:
      node = node.setdefault(k, {})
    node[fpath[-1]] = jnp.asarray(_to_flax(kind, sd[tk]), jnp.float32)
  if new_head:
    head = nn.Dense(num_classes).init(key, jnp.zeros((1, STAGES[-1]), jnp.float32))["params"]
    variables["params"]["fc"] = dict(head)
  return variables


def save_resnet18(path: str | os.PathLike, params: PyTree) -> None:
  """Writes ResNet-18 variables as an ``.npz`` in torchvision's state-dict layout.

  The inverse of :func:`load_resnet18` (``num_batches_tracked`` entries are not written;
  ``torch``'s ``load_state_dict`` fills them in). Params compacted by
  :meth:`ResNet18.compact` are written with their smaller block widths; load them with
  ``load_resnet18(..., widths=model.widths)`` (in torch, into a model built with those widths).
  Params whose stem or stage (residual) channels were compacted, through a traced target's
  residual groups, are refused before anything is written: no ResNet-18 layout holds them
  (keep them with :func:`jaxprune.save_checkpoint`).

  Example:
    >>> save_resnet18('finetuned.npz', params)  # doctest: +SKIP
    >>> # in torch: model.load_state_dict({k: torch.from_numpy(v)
    >>> #                                  for k, v in np.load('finetuned.npz').items()})

  Args:
    path: the file to write (``.npz`` is appended by numpy if missing).
    params: variables of a :class:`ResNet18` (``'params'`` and ``'batch_stats'``); bfloat16
      and other dtypes ``.npz`` cannot hold are written as float32 (exactly).

  Raises:
    ValueError: the params are not ResNet-18 variables (a missing leaf, a stem or stage
      channel count other than torchvision's), or hold NaN, infinite values or negative
      running variances; nothing is written then.
  """
  rows, out = _layout(), {}
  for tk, fpath, kind, shape in rows:
    try:
      leaf = get_path(params, fpath)
    except KeyError as e:
      raise ValueError(f"params are not ResNet-18 variables: {e.args[0]}") from None
    leaf = np.asarray(leaf)
    if leaf.ndim != len(shape):
      raise ValueError(f"params at {'/'.join(fpath)} ({tk}) have shape {leaf.shape}; "
                       f"ResNet-18 has a {len(shape)}-D array there. Nothing was written.")
    if leaf.dtype.kind not in "fiub":   # bfloat16 and other ml_dtypes: npz stores raw bytes
      leaf = leaf.astype(np.float32)    # exact; torch loads float32 (torch.from_numpy)
    out[tk] = np.ascontiguousarray(_to_torch(kind, leaf))
  # The shapes load_resnet18 reads back: block widths and head size from the params; the stem
  # and stage (residual) channels fixed at torchvision's.
  widths, classes = _file_widths(out) or DEFAULT_WIDTHS, int(out["fc.weight"].shape[0])
  for tk, fpath, kind, shape in _layout(widths, classes):
    if tuple(out[tk].shape) != shape:
      stages = _file_stages(out)
      why = (f"the stem or stage (residual) channels are {stages}, not ResNet-18's {STAGES} "
             "(params compacted through a traced residual group, e.g. by "
             "model.traced().compact, remove channels tied by residual additions)"
             if stages != STAGES else "they do not form a ResNet-18")
      raise ValueError(f"params at {'/'.join(fpath)} ({tk}) have the torch shape "
                       f"{tuple(out[tk].shape)} where a ResNet-18 with block widths {widths} "
                       f"has {shape}: {why}. Neither load_resnet18 nor torchvision's resnet18 "
                       "could read such a file, so nothing was written; keep these params with "
                       "jaxprune.save_checkpoint (ResNet18.compact changes only the blocks' "
                       "inner widths, which save_resnet18 writes).")
  for tk, fpath, _, _ in rows:   # load_resnet18 would refuse the file
    if not np.all(np.isfinite(out[tk])):
      raise ValueError(f"params hold NaN or infinite values at {'/'.join(fpath)} ({tk}); "
                       "nothing was written. Save finite params (e.g. from before training "
                       "diverged).")
    if tk.endswith(".running_var") and np.any(out[tk] < 0):
      raise ValueError(f"params hold negative running variances at {'/'.join(fpath)} ({tk}); "
                       "nothing was written. A batch norm's variance is never negative: "
                       "these statistics are damaged.")
  np.savez(path, **out)
