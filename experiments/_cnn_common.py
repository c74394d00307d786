"""Orchestration shared by the CNN study binaries (issue 7): image flags, models, caching of
trained parameters, deterministic keys, curves.

Keys, params files and their resumable caching live in ``experiments/_store.py``
(:func:`_store.config_key`, :func:`_store.save_tree` / :func:`_store.load_tree`,
``Study.cached_with_tree``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

import jaxprune
from experiments import _flags
from experiments import _report
from experiments import _store

PyTree = Any

IMAGENET_MEAN = np.asarray([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.asarray([0.229, 0.224, 0.225], np.float32)

# Published input sizes and the defaults used on this project's 2-core CPU (see the docs).
PUBLISHED_SIZE = {"lenet": (90, 72), "cnn4": (227, 227), "resnet18": (224, 224)}
IMAGE_DATA = _flags.IMAGE_DATA
QUICK_SIZE = {"lenet": (16, 16), "cnn4": (64, 64), "resnet18": (32, 32)}


# ----------------------------------------------------------------------------- sizes


def parse_size(text: str, flag: str) -> tuple[int, int]:
  """'HxW' (or 'N' for N x N) -> (H, W); a clear exit otherwise (the ``--image_size`` flag)."""
  try:
    parts = [int(p) for p in str(text).lower().split("x")]
    if len(parts) == 1:
      parts = parts * 2
    if len(parts) != 2 or min(parts) < 1:
      raise ValueError
  except ValueError:
    _flags.fail(f"--{flag}={text!r} is not an image size; write HEIGHTxWIDTH, e.g. 90x72, "
                "or one number for a square.")
  return parts[0], parts[1]


def unparse_size(size: Sequence[int]) -> str:
  """(H, W) -> 'HxW' (the ``--image_size`` flag's default)."""
  return "x".join(str(int(v)) for v in size)


def check_size(size, flag: str = "image_size") -> None:
  """Fails unless ``size`` is a pair of positive integers (an in-process ``Config``)."""
  if (not isinstance(size, (tuple, list)) or len(size) != 2
      or not all(isinstance(v, (int, np.integer)) and v >= 1 for v in size)):
    _flags.fail(f"--{flag}={size!r} is not an image size; give (HEIGHT, WIDTH), e.g. (90, 72) "
                "(on the command line 90x72).")


# ----------------------------------------------------------------------------- data, models


def check_image_data(data: str) -> None:
  """Fails when ``data`` names feature vectors (before anything is loaded or trained)."""
  if data in _flags.DATA_CHOICES and data not in IMAGE_DATA:
    _flags.fail(f"--data={data} holds feature vectors, but this study trains a CNN on "
                f"images; use --data={' or --data='.join(IMAGE_DATA)}.")


def load_images(data: str, data_path: str | None, size: tuple[int, int], channels: int, *,
                max_per_class: int | None = None, any_size: bool = False,
                on_error: str = "raise"):
  """Loads ``data`` (bundled digits images or the user's SFEW tree at ``data_path``) at
  ``size`` x ``channels``; ``max_per_class`` caps the bundled images per class (only those:
  see :func:`applied_settings`); ``any_size`` and ``on_error`` (the ``--any_size`` and
  ``--on_error`` flags) apply to the SFEW tree."""
  check_image_data(data)
  kw: dict[str, Any] = {"size": size, "channels": channels}
  if max_per_class is not None and data == "images":
    kw["max_per_class"] = max_per_class
  if data == "sfew_images":
    kw["expected_size"] = None if any_size else (576, 720)
    kw["on_error"] = on_error
  return _store.load_data(data, data_path, **kw)


def applied_settings(settings: dict[str, Any], data: str) -> dict[str, Any]:
  """The settings as applied to ``data``, for the fingerprint and results.json:
  ``max_per_class`` caps the bundled images only, so it is recorded as None for SFEW."""
  if data != "images" and "max_per_class" in settings:
    settings = {**settings, "max_per_class": None}
  return settings


def data_description(ds, data: str) -> str:
  src = ds.info.get("source", data)
  note = ""
  if data == "images":
    note = (" These are the bundled scikit-learn digits 0-6 (upscaled grayscale), a stand-in "
            "for SFEW: numbers measured on them are not SFEW results.")
  skipped = ds.info.get("skipped") or []
  if skipped:
    more = f"; and {len(skipped) - 20} more" if len(skipped) > 20 else ""
    note += (f" Skipped {len(skipped)} {'entry' if len(skipped) == 1 else 'entries'} of the "
             "tree: "
             + "; ".join(f"`{s['path']}` ({s['reason']})" for s in skipped[:20]) + more + ".")
  dark = ds.info.get("dark") or []
  if dark:
    note += (f" {len(dark)} 16-bit frame(s) hold only values below 4096 and load dark "
             "(rescale them to the full 16-bit range, or save them as 8-bit PNGs): "
             + ", ".join(f"`{n}`" for n in dark) + ".")
  no_person = ds.info.get("no_person") or []
  if no_person:
    note += (f" {len(no_person)} file name(s) carry no person id (e.g. `{no_person[0]}`), so "
             "the data have no persons and the split is stratified, not person-independent.")
  return (f"Data: `--data={data}` ({src}), {len(ds)} images of shape "
          f"{tuple(ds.x.shape[1:])}, {ds.num_classes} classes.{note}")


def imagenet_normalise(x: np.ndarray) -> np.ndarray:
  """ImageNet mean/std normalisation of RGB images in [0, 1] (channels last)."""
  return ((np.asarray(x, np.float32) - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


@dataclasses.dataclass
class Split:
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  # The persons of each part (sorted) for a person-independent split; None for a stratified
  # one (data without persons).
  persons_train: tuple | None = None
  persons_test: tuple | None = None


def split_description(split: Split, test_fraction: float, class_names=None) -> str:
  """One sentence for a report: the kind of split, the test persons and the test share as
  made (a person-independent split is 1 of round(1 / test_fraction) person folds, so its share
  differs from ``test_fraction``), and the classes the test part has no image of (a class with
  fewer images, or persons, than folds), named by ``class_names`` when given."""
  absent = sorted(set(np.unique(split.y_train).tolist()) - set(np.unique(split.y_test).tolist()))
  if absent:
    names = ", ".join(str(class_names[c]) if class_names is not None and c < len(class_names)
                      else str(c) for c in absent)
    return (_split_sentence(split, test_fraction) + f" The test part has no image of {names} "
            "(too few images or persons of it for the folds); its accuracy leaves "
            + ("that class" if len(absent) == 1 else "those classes") + " out.")
  return _split_sentence(split, test_fraction)


def _split_sentence(split: Split, test_fraction: float) -> str:
  n_train, n_test = len(split.y_train), len(split.y_test)
  share = f"{100.0 * n_test / (n_train + n_test):.0f}% test"
  if split.persons_test is None:
    return (f"Split: stratified by class (the data carry no persons): {n_train} training and "
            f"{n_test} test images ({share}, --test_fraction={test_fraction:g}).")
  shown = ", ".join(f"`{p}`" for p in split.persons_test[:10])
  more = f" and {len(split.persons_test) - 10} more" if len(split.persons_test) > 10 else ""
  folds = int(round(1.0 / test_fraction))
  return (f"Split: person-independent (no person on both sides): {n_train} training and "
          f"{n_test} test images ({share}; --test_fraction={test_fraction:g} asks for about "
          f"{100.0 * test_fraction:.0f}%: the test part is 1 of round(1/--test_fraction) = "
          f"{folds} stratified person folds, and persons are not divided); test persons "
          f"{shown}{more} ({len(split.persons_test)} of "
          f"{len(split.persons_test) + len(split.persons_train)}).")


def train_test(ds, test_fraction: float, seed: int, normalise: bool = False) -> Split:
  """A stratified split (person-independent when the data carry persons); a one-line usage
  error when the data cannot be split: naming --test_fraction, and for a person-independent
  split how persons are read from the file names and what would allow the split."""
  from experiments import _mlp_common  # pylint: disable=g-import-not-at-top
  if ds.groups is None:
    train, test = _mlp_common.train_test_or_fail(ds, test_fraction, seed)
  else:
    try:
      train, test = jaxprune.data.train_test_split(ds, test_fraction=test_fraction, seed=seed,
                                                   person_independent=True)
    except ValueError as e:
      _flags.fail(person_split_error(ds, e, test_fraction, seed))
  f = imagenet_normalise if normalise else (lambda a: a)
  persons = {}
  if ds.groups is not None:
    persons = dict(persons_train=tuple(str(p) for p in np.unique(train.groups)),
                   persons_test=tuple(str(p) for p in np.unique(test.groups)))
  return Split(f(train.x), train.y, f(test.x), test.y, **persons)


def person_split_error(ds, error: Exception, test_fraction: float, seed: int | None = None
                       ) -> str:
  """The one-line message for a person-independent split of images that failed with
  ``error`` (persons come from the file names): see ``_mlp_common.person_split_error``."""
  from experiments import _mlp_common  # pylint: disable=g-import-not-at-top
  return _mlp_common.person_split_error(
      ds, error, test_fraction, seed=seed,
      where=f"persons come from the file names ({jaxprune.data.sfew.PERSON_NAMING})",
      unnamed="if these names do not name persons, rename the files so that their last '_' "
              "field is not a number (data without persons are split stratified, not "
              "person-independently)", items="images", carrier="the file names")


def build_model(arch: str, size: tuple[int, int], channels: int, num_classes: int):
  """A model by name; a clear exit if the image size is too small for it."""
  shape = (size[0], size[1], channels)
  if arch == "resnet18" and channels != 3:   # a --channels problem, not an --image_size one
    _flags.fail(f"--channels={channels} does not fit --arch=resnet18: ResNet-18 takes RGB "
                "input; use --channels=3 (grey frames are repeated over the 3 channels).")
  try:
    if arch == "lenet":
      return jaxprune.LeNet(input_shape=shape, out_features=num_classes)
    if arch == "cnn4":
      return jaxprune.CNN4(input_shape=shape, out_features=num_classes)
    return jaxprune.ResNet18(num_classes=num_classes, input_shape=shape)
  except ValueError as e:
    _flags.fail(f"--image_size={size[0]}x{size[1]} does not fit --arch={arch}: {e}")


def conv_groups(model) -> list[str]:
  """The model's convolutional unit groups, in network order."""
  return [n for n, g in model.groups.items() if g.kind == "conv"]


def producer_kernel_paths(model, params, names: Sequence[str]) -> list[tuple[str, ...]]:
  """Param paths of the kernels (>= 2-D producer slices) of the named unit groups."""
  out = []
  for n in names:
    for s in model.groups[n].producers:
      if np.ndim(jaxprune.units.get_path(params, s.path)) >= 2 and tuple(s.path) not in out:
        out.append(tuple(s.path))
  return out


# ----------------------------------------------------------------------------- training


def train(model, params, split: Split, *, key, epochs: int, masks=None, learning_rate: float,
          batch_size: int, desc: str, log_every: int = 5) -> tuple[PyTree, dict]:
  """Masked training with test accuracy after every epoch; epoch 0 is before training.

  Always passes weight masks (all-True when none are given) so that the fine-tuning and every
  retraining share one compiled program.
  """
  from experiments import _mlp_common  # pylint: disable=g-import-not-at-top
  if masks is None:
    masks = jaxprune.ones_like(params)
  params = jaxprune.apply_masks(params, masks)
  before = jaxprune.evaluate(model, params, split.x_test, split.y_test)
  with _mlp_common.diverging_training_fails("learning_rate", learning_rate):
    new, hist = jaxprune.fit(model, params, split.x_train, split.y_train, key=key,
                             epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                             masks=masks, validation=(split.x_test, split.y_test),
                             log_every=log_every, desc=desc)
  record = {
      "train_loss": [float(v) for v in hist["loss"]],
      "train_accuracy": [float(v) for v in hist["accuracy"]],
      "test_loss": [before["loss"]] + [float(v) for v in hist["val_loss"]],
      "test_accuracy": [before["accuracy"]] + [float(v) for v in hist["val_accuracy"]],
  }
  return new, record


def first_epoch_reaching(curve: Sequence[float], target: float, tol: float = 1e-9):
  """The first epoch (1-based; index 0 of ``curve`` is before training) whose value reaches
  ``target``, or 'never'."""
  for e, v in enumerate(curve):
    if e >= 1 and v >= target - tol:
      return e
  return "never"


def plot_curves(path: str, title: str, curves: Mapping[str, Sequence[float]], *,
                ylabel: str, xlabel: str = "epoch", hline: tuple[str, float] | None = None,
                vlines: Sequence[float] = (), vlabel: str = "") -> None:
  plt = _report.pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for label, ys in curves.items():
    ax.plot(np.arange(len(ys)), ys, marker="o", markersize=3, label=label)
  if hline is not None:
    ax.axhline(hline[1], color="gray", linestyle="--", label=hline[0])
  for i, v in enumerate(vlines):
    ax.axvline(v, color="red", alpha=0.3, linestyle=":", label=vlabel if i == 0 else None)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  _report.save_figure(fig, path)
