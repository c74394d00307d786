"""The fine-tuned CNN shared by ``percentile_vs_distinctiveness`` and ``lottery_ticket``.

ResNet-18 from ``--pretrained=PATH`` (torchvision weights as .npz, ImageNet normalisation, a new
head for the 7 classes) when given; otherwise a smaller CNN (``--arch``, LeNet-style by default)
trained from scratch. The initial weights (pretrained, or the from-scratch initialisation) are
what the lottery-ticket study rewinds to.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from absl import flags

import jaxprune
from experiments import _cnn_common as cc
from experiments import _common

FLAGS = flags.FLAGS

# Defaults chosen so that each study runs in under 15 minutes on a 2-core CPU (see the docs);
# the published sizes (90x72 LeNet, 224x224 ResNet-18, 227x227 CNN4) are all allowed by flag.
DEFAULT_SIZE = {"lenet": (30, 24), "cnn4": (64, 64), "resnet18": (224, 224)}
# ResNet-18 trained from scratch (no --pretrained) on the CPU: the smallest size it takes.
SCRATCH_RESNET_SIZE = (32, 32)
DEFAULT_CHANNELS = {"lenet": 1, "cnn4": 3, "resnet18": 3}
QUICK = {"max_per_class": 8, "finetune_epochs": 2, "retrain_epochs": 2}


def define_flags() -> None:
  _common.define_common_flags("images")
  flags.DEFINE_enum("arch", "auto", ["auto", "lenet", "cnn4", "resnet18"],
                    "Network: 'auto' = resnet18 when --pretrained is given, else lenet (the "
                    "LeNet-style CNN trained from scratch); 'cnn4' = the 4-conv CNN from scratch; "
                    "'resnet18' without --pretrained trains ResNet-18 from scratch.")
  flags.DEFINE_string("pretrained", None,
                      "Path to torchvision ResNet-18 ImageNet weights as .npz (docs/resnet.md "
                      "shows how to make it); fine-tuned with a new "
                      "7-class head.")
  flags.DEFINE_string("image_size", None,
                      "Input HEIGHTxWIDTH. Default per arch: lenet 30x24 (published 90x72), "
                      "cnn4 64x64 (published 227x227), resnet18 224x224 (published) with "
                      "--pretrained and 32x32 from scratch. Smaller "
                      "than published by default on CPU to fit the time budget.")
  flags.DEFINE_integer("channels", None, "Image channels, 1 or 3. Default: lenet 1, others 3 "
                       "(gray images are repeated as RGB).")
  flags.DEFINE_integer("finetune_epochs", 15, "Epochs of fine-tuning (or training from scratch).")
  flags.DEFINE_integer("retrain_epochs", 25, "Epochs of retraining after pruning.")
  flags.DEFINE_integer("batch_size", 32, "Minibatch size.")
  flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate (fine-tuning and retraining).")
  flags.DEFINE_float("test_fraction", 0.2, "Share of the images held out for testing.")


def settings() -> dict[str, Any]:
  """Validated settings (every flag that affects results); exits cleanly on bad flags."""
  arch = FLAGS.arch
  if arch == "auto":
    arch = "resnet18" if FLAGS.pretrained else "lenet"
  if FLAGS.pretrained and arch != "resnet18":
    _common.fail(f"--pretrained loads ResNet-18 weights, but --arch={FLAGS.arch}; use "
                 "--arch=auto or --arch=resnet18, or drop --pretrained.")
  if FLAGS.pretrained and not os.path.isfile(FLAGS.pretrained):
    _common.fail(f"--pretrained={FLAGS.pretrained!r} is not a file; make the .npz as shown in "
                 "docs/resnet.md.")
  if FLAGS.quick and not FLAGS["image_size"].present:
    size = cc.QUICK_SIZE[arch]
  elif FLAGS.image_size:
    size = cc.parse_size(FLAGS.image_size, "image_size")
  elif arch == "resnet18" and not FLAGS.pretrained:
    size = SCRATCH_RESNET_SIZE
  else:
    size = DEFAULT_SIZE[arch]
  channels = FLAGS.channels if FLAGS.channels is not None else DEFAULT_CHANNELS[arch]
  if channels not in (1, 3):
    _common.fail(f"--channels must be 1 or 3, got {channels}.")
  if FLAGS.pretrained and channels != 3:
    _common.fail("--pretrained ResNet-18 weights need RGB input: use --channels=3.")
  _common.check_positive(finetune_epochs=FLAGS.finetune_epochs,
                         retrain_epochs=FLAGS.retrain_epochs, batch_size=FLAGS.batch_size)
  if not 0.0 < FLAGS.test_fraction < 1.0:
    _common.fail(f"--test_fraction must lie strictly between 0 and 1, got {FLAGS.test_fraction}.")
  if not FLAGS.learning_rate > 0:
    _common.fail(f"--learning_rate must be positive, got {FLAGS.learning_rate}.")
  return {
      "data": FLAGS.data, "data_path": FLAGS.data_path, "seed": FLAGS.seed, "quick": FLAGS.quick,
      "arch": arch, "pretrained": os.path.basename(FLAGS.pretrained) if FLAGS.pretrained else None,
      "image_size": list(size), "channels": channels,
      "finetune_epochs": _common.quick_or_flag("finetune_epochs", QUICK["finetune_epochs"]),
      "retrain_epochs": _common.quick_or_flag("retrain_epochs", QUICK["retrain_epochs"]),
      "batch_size": FLAGS.batch_size, "learning_rate": FLAGS.learning_rate,
      "test_fraction": FLAGS.test_fraction,
  }


@dataclasses.dataclass
class Setup:
  settings: dict
  model: Any
  split: cc.Split
  init_params: Any
  description: str  # data and model, for the report


def prepare(s: dict) -> Setup:
  """Loads the data and builds the model and its initial (pretrained or random) weights."""
  size, channels = tuple(s["image_size"]), s["channels"]
  ds = cc.load_images(size, channels, max_per_class=QUICK["max_per_class"] if s["quick"] else None)
  split = cc.train_test(ds, s["test_fraction"], s["seed"], normalise=bool(s["pretrained"]))
  model = cc.build_model(s["arch"], size, channels, ds.num_classes)
  if FLAGS.pretrained:
    try:
      init = jaxprune.load_resnet18(FLAGS.pretrained, num_classes=ds.num_classes,
                                    key=_common.config_key(s["seed"], "head"))
    except (FileNotFoundError, ValueError, KeyError) as e:
      _common.fail(f"Could not load --pretrained={FLAGS.pretrained!r}: {e}")
    how = (f"ResNet-18 from ImageNet weights (`{s['pretrained']}`, ImageNet normalisation, new "
           f"{ds.num_classes}-class head), fine-tuned")
  else:
    init = model.init(_common.config_key(s["seed"], "init"))
    how = f"{type(model).__name__} trained from scratch (no --pretrained given)"
  desc = (f"{cc.data_description(ds)} Model: {how} on {size[0]}x{size[1]}x{channels} inputs; "
          f"{len(split.y_train)} training and {len(split.y_test)} test images.")
  if s["arch"] != "resnet18":
    desc += (" The published study used ResNet-18; this default differs because ResNet-18 "
             "trained from scratch, even at 32x32, cost about 85 s of CPU time per epoch over "
             "~1000 images on the project's 2-core CPU (measured), hours for the study's "
             "epochs. `--arch=resnet18` (32x32 from scratch) or `--pretrained` runs it.")
  return Setup(s, model, split, init, desc)


def finetune(study: _common.Study, setup: Setup):
  """The fine-tuned network (cached with its parameters) and its record."""
  s = setup.settings

  def run():
    return cc.train(setup.model, setup.init_params, setup.split,
                    key=_common.config_key(s["seed"], "finetune"), epochs=s["finetune_epochs"],
                    learning_rate=s["learning_rate"], batch_size=s["batch_size"],
                    desc="fine-tune")

  return study.cached_with_tree("finetune", run, setup.init_params)
