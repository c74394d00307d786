"""The fine-tuned CNN shared by ``percentile_vs_distinctiveness`` and ``lottery_ticket``: their
common settings (:class:`Config`, which each study's ``Config`` extends), the data and model
(:func:`prepare`) and the cached fine-tuning (:func:`finetune`).

ResNet-18, as published: from ``--pretrained=PATH`` (torchvision weights as .npz, ImageNet
normalisation, a new head for the 7 classes) when given, otherwise trained from scratch at 16x16
(the bundled images are 8x8 digits upsampled; a CPU budget of 15 minutes per study). The smaller
CNNs stay available with ``--arch=lenet`` or ``--arch=cnn4``; ``--quick`` uses LeNet, or
ResNet-18 when ``--pretrained`` is given (those weights are ResNet-18's). The initial weights
(pretrained, or the from-scratch initialisation) are what the lottery-ticket study rewinds to.
The weights file enters the settings (and so the cache fingerprint) by its name and the SHA-256
of its bytes: another file of the same name, or the file rewritten, is a new setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Callable

import jaxprune
from jaxprune.models.resnet import WeightsShapeError
from experiments import _cnn_common as cc
from experiments import _flags
from experiments import _store

# Defaults chosen so that each study runs in under 15 minutes on a 2-core CPU (see the docs);
# the published sizes (90x72 LeNet, 224x224 ResNet-18, 227x227 CNN4) are all allowed by flag.
DEFAULT_SIZE = {"lenet": (30, 24), "cnn4": (64, 64), "resnet18": (224, 224)}
# ResNet-18 trained from scratch (no --pretrained) on the CPU. Measured on the 2-core CPU (load
# 5, batch 32): a training step takes 0.38 s at 16x16 and 1.25 s at 32x32; the study's epochs at
# 32x32 would take over half an hour. 16x16 keeps 4x4 maps in the first stage and 1x1 in the last.
SCRATCH_RESNET_SIZE = (16, 16)
# (fine-tuning, retraining) epochs when not given: ResNet-18 from scratch is shortened to fit
# the 15-minute budget (its training accuracy is above 97% after 10 epochs on the bundled data).
DEFAULT_EPOCHS = {"lenet": (15, 25), "cnn4": (15, 25), "resnet18": (15, 25),
                  "resnet18_scratch": (10, 10)}
DEFAULT_CHANNELS = {"lenet": 1, "cnn4": 3, "resnet18": 3}
ARCHS = ("auto", "lenet", "cnn4", "resnet18")


def resolve_arch(arch: str, pretrained: str | None) -> str:
  """'auto' -> resnet18 (the published network; pretrained when weights are given, else from
  scratch); other names unchanged."""
  del pretrained  # ResNet-18 either way
  return "resnet18" if arch == "auto" else arch


def default_epochs(arch: str, pretrained: str | None) -> tuple[int, int]:
  """``(finetune_epochs, retrain_epochs)`` used when the config leaves them ``None``."""
  key = "resnet18_scratch" if arch == "resnet18" and not pretrained else arch
  return DEFAULT_EPOCHS[key]


@dataclasses.dataclass(frozen=True)
class Config:
  """The settings of the fine-tuned network and its retraining (every field is also a flag)."""
  arch: str = _flags.field(
      "auto", "Network: 'auto' = resnet18, as published (--pretrained weights when given, "
      "else trained from scratch); 'lenet' = the LeNet-style CNN and 'cnn4' = the 4-conv CNN, "
      "both from scratch (--quick uses lenet, or resnet18 with --pretrained).", choices=ARCHS)
  pretrained: str | None = _flags.field(
      None, "Path to torchvision ResNet-18 ImageNet weights as .npz (docs/resnet.md shows how to "
      "make it); fine-tuned with a new 7-class head.")
  image_size: tuple | None = _flags.field(
      None, "Input HEIGHTxWIDTH. Default per arch: lenet 30x24 (published 90x72), cnn4 64x64 "
      "(published 227x227), resnet18 224x224 (published) with --pretrained and 16x16 from "
      "scratch. Smaller than published by default on CPU to fit the time budget.",
      parse=cc.parse_size, unparse=cc.unparse_size)
  channels: int | None = _flags.field(
      None, "Image channels, 1 or 3. Default: lenet 1, others 3 (gray images are repeated as "
      "RGB).")
  finetune_epochs: int | None = _flags.field(
      None, "Epochs of fine-tuning (or training from scratch). Default 15, and 10 for ResNet-18 "
      "from scratch (time budget).")
  retrain_epochs: int | None = _flags.field(
      None, "Epochs of retraining after pruning. Default 25, and 10 for ResNet-18 from scratch "
      "(time budget).")
  batch_size: int = _flags.field(32, "Minibatch size.")
  learning_rate: float = _flags.field(1e-3, "Adam learning rate (fine-tuning and retraining).")
  test_fraction: float = _flags.field(0.2, "Share of the images held out for testing.")
  max_per_class: int | None = _flags.field(
      None, "At most this many bundled images per class (--data=images only; the quick run "
      "uses 8).")
  any_size: bool = _flags.any_size_field(False)
  on_error: str = _flags.on_error_field()
  seed: int = _flags.field(0, "Random seed.")

  @classmethod
  def quick(cls, **kw):
    """The smoke run: LeNet (unless ``arch`` is given; ResNet-18 when ``pretrained`` weights
    are, since they are ResNet-18's), 2 + 2 epochs on 8 images per class at a small per-arch
    size."""
    base = dict(arch="auto" if kw.get("pretrained") else "lenet", finetune_epochs=2,
                retrain_epochs=2, max_per_class=8)
    base.update(kw)
    if base.get("image_size") is None:
      arch = resolve_arch(base.get("arch", "auto"), base.get("pretrained"))
      base["image_size"] = cc.QUICK_SIZE.get(arch)
    return cls(**base)

  def resolved(self):
    """This config with ``arch``, ``image_size`` and ``channels`` made concrete."""
    arch = resolve_arch(self.arch, self.pretrained)
    size = self.image_size
    if size is None:
      size = SCRATCH_RESNET_SIZE if arch == "resnet18" and not self.pretrained else (
          DEFAULT_SIZE.get(arch))
    channels = DEFAULT_CHANNELS.get(arch) if self.channels is None else self.channels
    epochs = default_epochs(arch, self.pretrained) if arch in ARCHS else (None, None)
    return dataclasses.replace(
        self, arch=arch, image_size=None if size is None else tuple(size), channels=channels,
        finetune_epochs=epochs[0] if self.finetune_epochs is None else self.finetune_epochs,
        retrain_epochs=epochs[1] if self.retrain_epochs is None else self.retrain_epochs)

  def validate(self) -> None:
    """One-line usage errors for impossible settings (before any work)."""
    _flags.check_fields(self)
    arch = resolve_arch(self.arch, self.pretrained)
    if self.pretrained and arch != "resnet18":
      _flags.fail(f"--pretrained loads ResNet-18 weights, but --arch={self.arch}; use "
                  "--arch=auto or --arch=resnet18, or drop --pretrained.")
    if self.pretrained and not os.path.isfile(self.pretrained):
      _flags.fail(f"--pretrained={self.pretrained!r} is not a file; make the .npz as shown in "
                  "docs/resnet.md.")
    if self.image_size is not None:
      cc.check_size(self.image_size)
    channels = self.resolved().channels
    if channels not in (1, 3):
      _flags.fail(f"--channels must be 1 or 3, got {channels}.")
    if arch == "resnet18" and channels != 3:
      net = "--arch=resnet18" if self.arch == arch else f"ResNet-18 (--arch={self.arch})"
      other = "" if self.pretrained else ", or --arch=lenet for single-channel images"
      _flags.fail(f"--channels={channels} does not fit {net}: ResNet-18 takes RGB input; use "
                  f"--channels=3 (grey frames are repeated over the 3 channels){other}.")
    r = self.resolved()
    _flags.check_positive(finetune_epochs=r.finetune_epochs, retrain_epochs=r.retrain_epochs,
                          batch_size=self.batch_size)
    if self.max_per_class is not None:
      _flags.check_positive(max_per_class=self.max_per_class)
    if not 0.0 < self.test_fraction < 1.0:
      _flags.fail(f"--test_fraction must lie strictly between 0 and 1, got {self.test_fraction}.")
    _flags.check_finite("learning_rate", self.learning_rate, positive=True)

  def settings(self, data: str, data_path: str | None) -> dict[str, Any]:
    """What the results depend on, for the cache fingerprint and results.json: the resolved
    config and the data. The weights file enters by its name and the SHA-256 of its bytes
    (``pretrained_sha256``), not its folder: the same file moved resumes, another file of the
    same name or the file rewritten in place starts afresh."""
    s = dataclasses.asdict(self.resolved())
    s["pretrained"] = os.path.basename(self.pretrained) if self.pretrained else None
    if self.pretrained:
      s["pretrained_sha256"] = file_sha256(self.pretrained)
    return cc.applied_settings({**s, "data": data, "data_path": data_path}, data)


def file_sha256(path: str) -> str:
  """The SHA-256 of a file's bytes (read in 1 MiB blocks; about 0.1 s for ResNet-18's 45 MB);
  a one-line usage error when it cannot be read."""
  h = hashlib.sha256()
  try:
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  except OSError as e:
    _flags.fail(f"Could not read --pretrained={path!r}: {e.strerror or e}.")
  return h.hexdigest()


@dataclasses.dataclass
class Setup:
  config: Config  # resolved
  model: Any
  split: cc.Split
  init_params: Any
  description: str  # data and model, for the report


def prepare(config: Config, data: str, data_path: str | None) -> Setup:
  """Loads the data and builds the model and its initial (pretrained or random) weights."""
  c = config.resolved()
  size, channels = c.image_size, c.channels
  ds = cc.load_images(data, data_path, size, channels, max_per_class=c.max_per_class,
                      any_size=c.any_size, on_error=c.on_error)
  split = cc.train_test(ds, c.test_fraction, c.seed, normalise=bool(c.pretrained))
  model = cc.build_model(c.arch, size, channels, ds.num_classes)
  if c.pretrained:
    try:
      init = jaxprune.load_resnet18(c.pretrained, num_classes=ds.num_classes,
                                    key=_store.config_key(c.seed, "head"))
    except WeightsShapeError as e:
      if e.file_widths is None:   # the library's advice is about how the file was written
        _flags.fail(f"Could not load --pretrained={c.pretrained!r}: {e}")
      _flags.fail(f"Could not load --pretrained={c.pretrained!r}: {e.reason} The file holds a "
                  f"compacted ResNet-18 (block widths {e.file_widths}), but --pretrained needs "
                  "uncompacted torchvision resnet18 weights (the studies fine-tune and prune "
                  "the full network); make them as docs/resnet.md shows.")
    except (FileNotFoundError, ValueError, KeyError) as e:
      _flags.fail(f"Could not load --pretrained={c.pretrained!r}: {e}")
    how = (f"ResNet-18 from ImageNet weights (`{os.path.basename(c.pretrained)}`, SHA-256 "
           f"`{file_sha256(c.pretrained)[:16]}...`, ImageNet normalisation, new "
           f"{ds.num_classes}-class head), fine-tuned")
  else:
    init = model.init(_store.config_key(c.seed, "init"))
    how = f"{type(model).__name__} trained from scratch (no --pretrained given)"
  desc = (f"{cc.data_description(ds, data)} "
          f"{cc.split_description(split, c.test_fraction, ds.class_names)} "
          f"Model: {how} on {size[0]}x{size[1]}x{channels} inputs.")
  if c.arch != "resnet18":
    desc += (f" The published study used ResNet-18 (the default); this run used the smaller "
             f"network of --arch={c.arch}"
             + (" (which --quick sets when no --arch is given)." if c.arch == "lenet" else "."))
  elif not c.pretrained:
    desc += (" The published study fine-tuned ImageNet-pretrained ResNet-18 at 224x224; without "
             "--pretrained weights it is trained from scratch here, at 16x16 by default (the "
             "bundled images are 8x8 digits upsampled) and for 10 + 10 epochs by default, so "
             "that the study runs within 15 minutes on a 2-core CPU.")
  return Setup(c, model, split, init, desc)


def start(config: Config, name: str, workdir: str, data: str, data_path: str | None,
          check: Callable[[Setup], None] | None = None) -> tuple[Setup, _store.Study]:
  """The opening of both studies' ``run``: validates the config and the data choice, loads
  the data and the model (:func:`prepare`), runs the study's own ``check(setup)``, and only
  then opens the study's work folder (bad input leaves nothing behind)."""
  config.validate()
  cc.check_image_data(data)
  setup = prepare(config, data, data_path)
  if check is not None:
    check(setup)
  return setup, _store.Study(name, config.settings(data, data_path), workdir)


def finetune(study: _store.Study, setup: Setup):
  """The fine-tuned network (cached with its parameters) and its record."""
  c = setup.config

  def run():
    return cc.train(setup.model, setup.init_params, setup.split,
                    key=_store.config_key(c.seed, "finetune"), epochs=c.finetune_epochs,
                    learning_rate=c.learning_rate, batch_size=c.batch_size, desc="fine-tune")

  return study.cached_with_tree("finetune", run, setup.init_params)
