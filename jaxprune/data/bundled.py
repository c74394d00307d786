"""Bundled default data: real datasets that ship inside scikit-learn (no download).

They are stand-ins for SFEW with the same task shape (7 classes; 10 features in
two descriptor blocks of 5, or small grayscale images), so every study runs
with nothing downloaded:

* ``load_features('diabetes')`` (the default feature data): scikit-learn's
  diabetes data, 10 clinical features of 442 patients; disease progression one
  year on is binned into 7 equal-count classes (quantile bins). A hard task,
  like SFEW's features: a sigmoid MLP reaches roughly 25-32% test accuracy.
* ``load_features('digits')``: handwritten digits 0-6 (1264 8x8 images); the
  top and the bottom half of each image are each reduced to 5 principal
  components (two blocks of 5, like SFEW's LPQ and PHOG blocks). An easy
  task: about 97% test accuracy.
* ``load_images('digits', size=(h, w), channels=c)`` (the default image data):
  the same digits 0-6 as grayscale images in [0, 1], resized to any size.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl
from sklearn import datasets as sk_datasets
from sklearn.decomposition import PCA

from jaxprune.data.dataset import Dataset, check_images_fit

__all__ = ["FEATURE_NAMES", "load_features", "load_images"]

#: Names accepted by `load_features`.
FEATURE_NAMES: tuple[str, ...] = ("diabetes", "digits")

_NUM_CLASSES = 7
_DIGITS_BLOCKS = ((0, 5), (5, 10))


def _diabetes() -> Dataset:
  x, target = sk_datasets.load_diabetes(return_X_y=True, scaled=False)
  # Quantile bin edges over all targets: this defines the labels (like SFEW's
  # annotation), it is not a feature transform, so it is the same for every
  # split. Ties stay in one bin, so counts are close to, not exactly, equal.
  edges = np.quantile(target, np.linspace(0.0, 1.0, _NUM_CLASSES + 1)[1:-1])
  y = np.digitize(target, edges)
  names = tuple(
      f"q{k + 1}: {target[y == k].min():g}-{target[y == k].max():g}"
      for k in range(_NUM_CLASSES)
  )
  info = {
      "source": "scikit-learn diabetes (bundled stand-in for SFEW features)",
      "feature_names": tuple(sk_datasets.load_diabetes().feature_names),
      "label": "disease progression after one year, 7 quantile bins over all 442"
      " patients",
      "bin_edges": tuple(float(e) for e in edges),
      "blocks": None,
      "fitted_on": "nothing (raw clinical features; scale them on the training"
      " split with standardize_split)",
      "dropped": [],
  }
  return Dataset(x, y, names, info=info)


def _digits_pca(pixels: np.ndarray, fit_rows: np.ndarray) -> np.ndarray:
  """Top-half and bottom-half PCA (5 components each), fitted on ``fit_rows``."""
  out = []
  # Tiny matrices: one BLAS thread is fastest and avoids stalls on busy hosts.
  with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
    for half in (pixels[:, :4, :], pixels[:, 4:, :]):
      flat = half.reshape(len(half), -1)
      pca = PCA(n_components=5, svd_solver="full").fit(flat[fit_rows])
      out.append(pca.transform(flat))
  return np.concatenate(out, axis=1).astype(np.float32)


def _digits_images() -> tuple[np.ndarray, np.ndarray]:
  digits = sk_datasets.load_digits()
  keep = digits.target < _NUM_CLASSES
  images = (digits.images[keep] / 16.0).astype(np.float32)
  return images, digits.target[keep]


def _digits_features() -> Dataset:
  images, y = _digits_images()

  def refit(train: np.ndarray) -> np.ndarray:
    return _digits_pca(images, np.asarray(train, dtype=np.int64))

  info = {
      "source": "scikit-learn digits 0-6 (bundled stand-in for SFEW features)",
      "features": "5 PCA components of the top half, 5 of the bottom half",
      "blocks": _DIGITS_BLOCKS,
      "fitted_on": "all rows (transductive); jaxprune.data.split,"
      " train_test_split and cross_validate refit the PCA on the training"
      " split only",
      "dropped": [],
  }
  x = refit(np.arange(len(y)))
  return Dataset(x, y, tuple(str(k) for k in range(_NUM_CLASSES)), info=info,
                 refit=refit)


def load_features(name: str = "diabetes") -> Dataset:
  """Loads a bundled feature dataset (10 features, 7 classes, no download).

  Args:
    name: ``'diabetes'`` (hard, the default) or ``'digits'`` (easy).

  Returns:
    A `Dataset` with ``x`` of shape ``(N, 10)``, unscaled: fit the scaling on
    the training split (`standardize_split`). For ``'digits'`` the PCA is
    refitted on the training rows by `split`/`train_test_split`/
    `cross_validate` (``info['fitted_on']``).

  Example:
    >>> from jaxprune import data
    >>> ds = data.load_features("diabetes")
    >>> ds.x.shape, ds.num_classes
    ((442, 10), 7)
  """
  if name == "diabetes":
    return _diabetes()
  if name == "digits":
    return _digits_features()
  raise ValueError(f"unknown feature dataset {name!r}; valid: {FEATURE_NAMES}")


def resize_images(
    images: np.ndarray, size: tuple[int, int], *, chunk: int = 256
) -> np.ndarray:
  """Bilinear resize of ``(N, H, W, C)`` float images to ``size = (h, w)``.

  Uses `jax.image.resize` (antialiased when shrinking) in chunks of ``chunk``
  images to bound memory.

  Example:
    >>> import numpy as np
    >>> resize_images(np.ones((2, 8, 8, 1), np.float32), (16, 12)).shape
    (2, 16, 12, 1)
  """
  images = np.asarray(images, dtype=np.float32)
  h, w = _check_size(size)
  if images.ndim != 4:
    raise ValueError(f"images must be (N, H, W, C) (channels last), got shape {images.shape};"
                     " add a leading axis for one image, a trailing one for grayscale")
  n, _, _, c = images.shape
  if images.shape[1:3] == (h, w):
    return images
  out = np.empty((n, h, w, c), dtype=np.float32)
  fn = jax.jit(lambda im: jax.image.resize(im, (im.shape[0], h, w, c), "linear"))
  for start in range(0, n, chunk):
    out[start:start + chunk] = np.asarray(fn(jnp.asarray(images[start:start + chunk])))
  return out


def _check_size(size: Sequence[int]) -> tuple[int, int]:
  try:
    ok = (len(size) == 2 and not isinstance(size, (str, bytes))
          and all(not isinstance(s, (bool, np.bool_)) and int(s) == s and s >= 1
                  for s in size))
  except (TypeError, ValueError):  # size=None or 16 (no len), ("16", 16), ...
    ok = False
  if not ok:
    raise ValueError(f"size must be (height, width), two positive ints, e.g. (90, 72);"
                     f" got {size!r}")
  return int(size[0]), int(size[1])


def load_images(
    name: str = "digits",
    *,
    size: tuple[int, int] = (8, 8),
    channels: int = 1,
    max_per_class: int | None = None,
) -> Dataset:
  """Loads the bundled image dataset: digits 0-6 as small grayscale images.

  Args:
    name: ``'digits'`` (the only bundled image set).
    size: output ``(height, width)``, e.g. ``(90, 72)`` for LeNet or
      ``(227, 227)`` for the 4-conv CNN. The 8x8 originals are upsampled
      bilinearly.
    channels: 1 (grayscale) or 3 (the gray value repeated as RGB).
    max_per_class: keep at most this many images per class (the first ones),
      for quick runs; at 227x227x3 all 1264 images take about 0.8 GB.

  Returns:
    A `Dataset` with ``x`` of shape ``(N, h, w, channels)`` in [0, 1].

  Example:
    >>> from jaxprune import data
    >>> ds = data.load_images(size=(90, 72), channels=1, max_per_class=2)
    >>> ds.x.shape
    (14, 90, 72, 1)
  """
  if name != "digits":
    raise ValueError(f"unknown image dataset {name!r}; valid: ('digits',)")
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels!r}")
  h, w = _check_size(size)
  images, y = _digits_images()
  if max_per_class is not None:
    if (isinstance(max_per_class, (bool, np.bool_))
        or not isinstance(max_per_class, (int, np.integer)) or max_per_class < 1):
      raise ValueError(f"max_per_class must be a positive int (or None for all images),"
                       f" got {max_per_class!r}")
    keep = np.concatenate(
        [np.flatnonzero(y == k)[:max_per_class] for k in range(_NUM_CLASSES)]
    )
    keep.sort()
    images, y = images[keep], y[keep]
  check_images_fit(len(y), (h, w), channels,
                   fix="pass a smaller size, e.g. size=(90, 72) (--image_size=90x72 in the CNN"
                   " studies), or keep fewer images with max_per_class (--max_per_class)")
  x = resize_images(images[..., None], (h, w))
  if channels == 3:
    x = np.repeat(x, 3, axis=-1)
  info = {
      "source": "scikit-learn digits 0-6 as images (bundled stand-in for SFEW"
      " images)",
      "original_size": (8, 8),
      "size": (h, w),
      "channels": channels,
      "fitted_on": "nothing",
      "skipped": [],
  }
  return Dataset(x, y, tuple(str(k) for k in range(_NUM_CLASSES)), info=info)
