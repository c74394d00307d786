"""A TensorFlow Datasets builder for SFEW (manual download), usable without TensorFlow.

Importing this module registers the builder ``'sfew'`` with TFDS, with two
configs:

* ``'sfew/features'``: the LPQ/PHOG features from ``SFEW.xlsx`` or
  ``SFEW.csv`` (rows with missing values are dropped and recorded in the
  dataset's metadata, ``info.metadata['dropped']``);
* ``'sfew/images'``: the frames of the class-folder tree, as RGB PNG.

The builder writes ``array_record`` files by default, so building and reading
need no TensorFlow (TFDS's image encoding for a PIL image, its array_record
writer and `tfds.data_source` are TF-free; only ``tfds.load``/`tf.data`
pipelines need TF):

Example:
  >>> import tensorflow_datasets as tfds
  >>> import jaxprune.data.sfew_tfds  # registers 'sfew'
  >>> source = tfds.data_source(  # doctest: +SKIP
  ...     "sfew/features", data_dir="path/to/tensorflow_datasets",
  ...     download_and_prepare_kwargs={"download_config":
  ...         tfds.download.DownloadConfig(manual_dir="path/to/sfew_manual")})
  >>> source["train"][0]["features"].shape  # doctest: +SKIP
  (10,)
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from jaxprune.data.dataset import SFEW_CLASS_NAMES, Dataset
from jaxprune.data.sfew import (
    FEATURE_BLOCKS,
    FEATURES_LAYOUT,
    IMAGES_LAYOUT,
    load_sfew_features,
    person_id,
    scan_sfew_tree,
    unit_gray,
)

__all__ = ["MANUAL_DOWNLOAD_INSTRUCTIONS", "Sfew", "load_sfew_tfds"]

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
SFEW is licensed: request it from its authors and place your copy in the
manual directory (by default <data_dir>/downloads/manual/, or the folder you
pass as tfds.download.DownloadConfig(manual_dir=...)):

* for 'sfew/features': <manual_dir>/SFEW.xlsx (one sheet, e.g. named
  'SFEW.csv'), or <manual_dir>/SFEW.csv exported from it.
  {FEATURES_LAYOUT}.
* for 'sfew/images': the class folders directly in <manual_dir>:
  <manual_dir>/Angry/*.png, <manual_dir>/Disgust/*.png, <manual_dir>/Fear/,
  <manual_dir>/Happy/, <manual_dir>/Neutral/, <manual_dir>/Sad/,
  <manual_dir>/Surprise/ (folder names in any letter case).
  {IMAGES_LAYOUT}.

Both may share one manual directory (SFEW.xlsx beside the class folders).
"""

_CITATION = """\
@inproceedings{dhall2011static,
  title={Static facial expression analysis in tough conditions: Data,
         evaluation protocol and benchmark},
  author={Dhall, Abhinav and Goecke, Roland and Lucey, Simon and Gedeon, Tom},
  booktitle={IEEE International Conference on Computer Vision Workshops
             (ICCV Workshops)},
  pages={2106--2112},
  year={2011}
}
"""


class Sfew(tfds.core.GeneratorBasedBuilder):
  """SFEW: Static Facial Expressions in the Wild (7 classes, manual download)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Features (LPQ + PHOG PCA) and images configs."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(
          name="features",
          description="5 LPQ and 5 PHOG principal components per image.",
      ),
      tfds.core.BuilderConfig(
          name="images", description="The movie frames, RGB, native size."
      ),
  ]

  # TFDS derives `code_path` via `importlib_resources`, which is not a
  # dependency of tensorflow-datasets; this module's own path is the answer.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def __init__(self, *, file_format: Any = None, **kwargs: Any):
    # array_record by default: written and read without TensorFlow.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    labels = tfds.features.ClassLabel(names=list(SFEW_CLASS_NAMES))
    if self.builder_config.name == "features":
      features = tfds.features.FeaturesDict({
          "features": tfds.features.Tensor(shape=(10,), dtype=np.float32),
          "label": labels,
          "name": tfds.features.Text(),
          "person": tfds.features.Text(),
      })
      supervised = ("features", "label")
    else:
      features = tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": labels,
          "name": tfds.features.Text(),
          "person": tfds.features.Text(),
      })
      supervised = ("image", "label")
    # DatasetInfo directly (not dataset_info_from_configs): no metadata files
    # are looked up beside this module.
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Static Facial Expressions in the Wild: 675 movie frames in 7"
            " expression classes (angry, disgust, fear, happy, neutral, sad,"
            " surprise). Features: 5 LPQ + 5 PHOG principal components."
        ),
        features=features,
        supervised_keys=supervised,
        citation=_CITATION,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    return {"train": self._generate_examples(epath.Path(dl_manager.manual_dir))}

  def _generate_examples(self, root: epath.Path):
    if self.builder_config.name == "features":
      return self._features(root)
    return self._images(root)

  def _features(self, root: epath.Path):
    dataset = load_sfew_features(os.fspath(root))
    self.info.metadata["dropped"] = dataset.info["dropped"]
    self.info.metadata["source_file"] = os.path.basename(dataset.info["path"])
    for i in range(len(dataset)):
      name = dataset.info["names"][i]
      yield i, {
          "features": dataset.x[i],
          "label": int(dataset.y[i]),
          "name": name,
          "person": person_id(name),
      }

  def _images(self, root: epath.Path):
    items, skipped = scan_sfew_tree(os.fspath(root), on_error="raise", fix=_FIX)
    self.info.metadata["skipped"] = skipped
    for i, item in enumerate(items):
      try:
        with Image.open(item.path) as im:
          im.load()  # decodes: a truncated or broken file fails here
          deep = unit_gray(im)  # 16-bit gray: scaled to 8 bits, not clipped
          if deep is not None:
            image = Image.fromarray(
                np.round(deep * 255.0).astype(np.uint8)).convert("RGB")
          elif im.format == "PNG" and im.mode == "RGB":
            image = item.path.read_bytes()  # stored as is, no re-encoding
          else:
            image = im.convert("RGB")  # TFDS encodes it as PNG with PIL
      except Exception as e:  # PIL raises many types for bad files
        raise ValueError(
            f"{item.path}: not a readable image ({type(e).__name__}: {e}). {_FIX}"
        ) from e
      yield i, {
          "image": image,
          "label": item.label,
          "name": item.relpath,
          "person": person_id(item.path.name),
      }


_FIX = ("Remove or fix it: the TFDS builder prepares every file of the manual folder"
        " (load_sfew_images(..., on_error='skip') reads the tree directly and skips such"
        " files)")


def load_sfew_tfds(
    config: str = "features",
    *,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    size: tuple[int, int] | None = None,
    channels: int = 3,
) -> Dataset:
  """Builds (if needed) and reads ``sfew/<config>`` through `tfds.data_source`.

  Args:
    config: ``'features'`` or ``'images'``.
    data_dir: the TFDS data directory (where the prepared files go).
    manual_dir: where the user placed SFEW (see `MANUAL_DOWNLOAD_INSTRUCTIONS`);
      default ``<data_dir>/downloads/manual``.
    size: for images, the output ``(height, width)`` (bilinear, as in
      `load_sfew_images`); None keeps the native size (all frames must then
      share one size).
    channels: for images, 1 (grayscale, PIL's ``L`` conversion) or 3.

  Returns:
    A `Dataset` like `load_sfew_features` / `load_sfew_images` give.
  """
  if config not in ("features", "images"):
    raise ValueError(f"config must be 'features' or 'images', got {config!r}")
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels!r}")
  download_config = tfds.download.DownloadConfig(
      manual_dir=None if manual_dir is None else os.path.expanduser(manual_dir))
  try:
    source = tfds.data_source(
        f"sfew/{config}",
        data_dir=os.path.expanduser(data_dir),
        download_and_prepare_kwargs={"download_config": download_config},
    )["train"]
  except AssertionError as e:  # TFDS asserts that the manual folder exists
    raise FileNotFoundError(str(e)) from e
  examples = [source[i] for i in range(len(source))]
  names = tuple(_text(e["name"]) for e in examples)
  y = np.asarray([e["label"] for e in examples], dtype=np.int32)
  groups = np.asarray([_text(e["person"]) for e in examples])
  info: dict[str, Any] = {"source": f"SFEW via TFDS (sfew/{config})",
                          "names": names, "fitted_on": "nothing"}
  if config == "features":
    x = np.stack([e["features"] for e in examples]).astype(np.float32)
    info["blocks"] = FEATURE_BLOCKS
  else:
    mode = "L" if channels == 1 else "RGB"
    images = []
    for e in examples:
      image = Image.fromarray(np.asarray(e["image"], dtype=np.uint8)).convert(mode)
      if size is not None:
        image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
      array = np.asarray(image, dtype=np.float32) / 255.0
      images.append(array[..., None] if array.ndim == 2 else array)
    shapes = sorted({a.shape[:2] for a in images})
    if len(shapes) > 1:
      first = {a.shape[:2]: n for a, n in zip(images, names)}
      shown = ", ".join(f"{h}x{w} ({first[(h, w)]})" for h, w in shapes[:3])
      raise ValueError(
          f"sfew/images holds frames of {len(shapes)} sizes (height x width: {shown}"
          f"{', ...' if len(shapes) > 3 else ''}); pass size=(height, width) to"
          " resize them all")
    x = np.stack(images)
  return Dataset(x, y, SFEW_CLASS_NAMES, groups=groups, info=info)


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
