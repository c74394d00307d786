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

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from PIL import Image

from jaxprune.data.dataset import SFEW_CLASS_NAMES, Dataset
from jaxprune.data.sfew import (
    FEATURE_BLOCKS,
    FEATURES_LAYOUT,
    IMAGES_LAYOUT,
    _is_dark,
    _pair,
    _resolve_features_path,
    load_sfew_features,
    person_id,
    persons,
    scan_sfew_tree,
    unit_gray,
    upright,
)

__all__ = ["MANUAL_DOWNLOAD_INSTRUCTIONS", "Sfew", "load_sfew_tfds", "manual_fingerprint"]

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

  VERSION = tfds.core.Version("1.1.1")
  RELEASE_NOTES = {
      "1.0.0": "Features (LPQ + PHOG PCA) and images configs.",
      "1.1.0": "Frames turned as their EXIF orientation says; the manual folder's"
               " fingerprint, dark 16-bit frames and persons recorded.",
      "1.1.1": "16-bit RGB PNGs and PNGs with a transparent colour stored as plain 8-bit"
               " RGB PNGs (OpenCV, which TFDS decodes with when installed, read them"
               " wrongly).",
  }
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
    root = epath.Path(dl_manager.manual_dir)
    # What the prepared data come from, taken before reading them: load_sfew_tfds compares
    # it with the manual folder's files to find prepared data that no longer match them.
    self.info.metadata["manual_fingerprint"] = manual_fingerprint(
        self.builder_config.name, os.fspath(root))
    return {"train": self._generate_examples(root)}

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
          "person": person_id(name) or "",
      }

  def _images(self, root: epath.Path):
    items, skipped = scan_sfew_tree(os.fspath(root), on_error="raise", fix=_FIX)
    self.info.metadata["skipped"] = skipped
    dark: list[str] = []
    self.info.metadata["dark"] = dark  # filled in as the frames are read
    for i, item in enumerate(items):
      try:
        with Image.open(item.path) as im:
          im.load()  # decodes: a truncated or broken file fails here
          turned = upright(im)  # as its EXIF orientation says
          # 16-bit gray: scaled to 8 bits, not clipped
          deep = unit_gray(turned, str(item.path))
          if deep is not None:
            if _is_dark(np.asarray(turned)):
              dark.append(item.relpath)
            image = Image.fromarray(
                np.round(deep * 255.0).astype(np.uint8)).convert("RGB")
          elif turned is im and _plain_rgb_png(im, raw := item.path.read_bytes()):
            image = raw  # stored as is, no re-encoding
          else:
            image = turned.convert("RGB")  # TFDS encodes it as PNG with PIL
            # A transparent colour (RGB or palette PNGs) would be written as a tRNS chunk,
            # which OpenCV decodes as a fourth channel: the frame's colours are what count.
            image.info.pop("transparency", None)
      except Exception as e:  # PIL raises many types for bad files
        raise ValueError(
            f"{item.path}: not a readable image ({type(e).__name__}: {e}). {_FIX}"
        ) from e
      yield i, {
          "image": image,
          "label": item.label,
          "name": item.relpath,
          "person": person_id(item.path.name) or "",
      }


def _plain_rgb_png(im: Image.Image, raw: bytes) -> bool:
  """Whether ``raw`` (the file ``im`` was read from) can be stored as it is: an 8-bit RGB PNG
  without a transparent colour. PIL reads a 16-bit RGB PNG as mode RGB (8 bits), but TFDS
  decodes stored bytes with OpenCV when it is installed (the [face] extra), which keeps 16
  bits and then casts them to uint8 (their low byte: noise); and OpenCV gives an RGB PNG with
  a tRNS chunk a fourth channel. Such files are converted with PIL instead."""
  return (im.format == "PNG" and im.mode == "RGB" and "transparency" not in im.info
          # IHDR is the first chunk: bit depth at byte 24, colour type (2: RGB) at byte 25.
          and len(raw) > 25 and raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[24] == 8
          and raw[25] == 2)


_FIX = ("Remove or fix it: the TFDS builder prepares every file of the manual folder"
        " (load_sfew_images(..., on_error='skip') reads the tree directly and skips such"
        " files)")


def manual_fingerprint(config: str, manual_dir: str | os.PathLike) -> str:
  """A fingerprint of the files ``sfew/<config>`` prepares from ``manual_dir``.

  It covers, for each file the builder reads, its path relative to
  ``manual_dir``, its size and its modification time (nanoseconds): for
  ``'features'`` the ``SFEW.xlsx`` or ``SFEW.csv`` file, for ``'images'`` every
  entry of the folders in ``manual_dir`` (the class folders, and folders the
  builder reports as skipped). Recorded in the prepared data's metadata
  (``info.metadata['manual_fingerprint']``); `load_sfew_tfds` prepares the data
  again when it no longer matches the folder.

  Args:
    config: ``'features'`` or ``'images'``.
    manual_dir: the manual folder.

  Returns:
    A SHA-256 hex digest.

  Raises:
    FileNotFoundError: for ``'features'``, no SFEW file in the folder.
    ValueError: for ``'features'``, both ``SFEW.xlsx`` and ``SFEW.csv`` in it.
  """
  root = Path(manual_dir).expanduser()
  entries: list[list[Any]] = []

  def add(path: Path) -> None:
    st = path.stat()
    rel = path.relative_to(root).as_posix()
    entries.append([rel, "dir"] if path.is_dir() else [rel, st.st_size, st.st_mtime_ns])

  if config == "features":
    add(_resolve_features_path(root))
  else:
    for top in sorted(root.iterdir()):
      if top.is_dir() and not top.name.startswith((".", "__")):
        add(top)
        for entry in sorted(top.iterdir()):
          add(entry)
  blob = json.dumps({"config": config, "files": entries}, sort_keys=True)
  return hashlib.sha256(blob.encode()).hexdigest()


def load_sfew_tfds(
    config: str = "features",
    *,
    data_dir: str | os.PathLike,
    manual_dir: str | os.PathLike | None = None,
    size: tuple[int, int] | None = None,
    channels: int = 3,
) -> Dataset:
  """Builds (if needed) and reads ``sfew/<config>`` through `tfds.data_source`.

  Prepared data are reused only while they match the manual folder: a
  fingerprint of its files (`manual_fingerprint`: relative paths, sizes,
  modification times) is recorded beside the prepared data, and when the
  folder now holds other files (another ``manual_dir``, or files added,
  removed or edited) the data are prepared again, logged with absl. A manual
  folder that no longer exists cannot be compared: the prepared data are read
  as they are, with a warning.

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
    A `Dataset` like `load_sfew_features` / `load_sfew_images` give; its
    ``info`` has ``names``, ``no_person``, ``manual_dir``, ``data_dir`` and the
    prepared data's ``dropped`` (features) or ``skipped`` and ``dark`` (images).
  """
  if config not in ("features", "images"):
    raise ValueError(f"config must be 'features' or 'images', got {config!r}")
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels!r}")
  if size is not None:
    size = _pair("size", size)
  data_dir = os.path.expanduser(os.fspath(data_dir))
  manual = (os.path.join(data_dir, "downloads", "manual") if manual_dir is None
            else os.path.expanduser(os.fspath(manual_dir)))
  name = f"sfew/{config}"
  builder = tfds.builder(name, data_dir=data_dir)
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  stale = False
  if builder.is_prepared():
    if os.path.isdir(manual):
      recorded = builder.info.metadata.get("manual_fingerprint")
      if recorded != manual_fingerprint(config, manual):
        stale = True
        mode = tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS  # delete, prepare again
        logging.warning(
            "%s in %s was prepared from other files than the manual folder %s holds now"
            " (%s); preparing it again", name, builder.data_dir, manual,
            "another folder, or files added, removed or changed" if recorded else
            "no record of the files it was prepared from")
    else:
      logging.warning(
          "The manual folder %s does not exist: reading %s as it was prepared in %s,"
          " without checking it against your SFEW copy", manual, name, builder.data_dir)
  download_config = tfds.download.DownloadConfig(manual_dir=manual, download_mode=mode)
  try:
    builder.download_and_prepare(download_config=download_config)
  except AssertionError as e:  # TFDS asserts that the manual folder exists
    raise FileNotFoundError(f"{e}") from e
  except OSError as e:
    if not stale:
      raise
    raise OSError(
        f"{name} in {builder.data_dir} no longer matches the manual folder {manual} and could"
        f" not be prepared again ({type(e).__name__}: {e}). Delete {builder.data_dir}, or pass"
        " a data_dir you can write to") from e
  builder = tfds.builder(name, data_dir=data_dir)  # the prepared data as written
  source = builder.as_data_source()["train"]
  metadata = builder.info.metadata
  examples = [source[i] for i in range(len(source))]
  names = tuple(_text(e["name"]) for e in examples)
  y = np.asarray([e["label"] for e in examples], dtype=np.int32)
  groups, no_person = persons(names, f"SFEW via TFDS ({name})")
  info: dict[str, Any] = {"source": f"SFEW via TFDS ({name})",
                          "names": names, "no_person": no_person,
                          "manual_dir": manual, "data_dir": data_dir,
                          "fitted_on": "nothing"}
  if config == "features":
    x = np.stack([e["features"] for e in examples]).astype(np.float32)
    info["blocks"] = FEATURE_BLOCKS
    info["dropped"] = list(metadata.get("dropped", []))
  else:
    info["skipped"] = list(metadata.get("skipped", []))
    info["dark"] = list(metadata.get("dark", []))
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
