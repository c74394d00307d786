"""The `Dataset` container shared by every loader in `jaxprune.data`."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxprune import validate

__all__ = ["PER_ROW_INFO", "SFEW_CLASS_NAMES", "Dataset", "split"]

#: The seven SFEW expression classes, in label order (SFEW label 1 is index 0).
SFEW_CLASS_NAMES: tuple[str, ...] = (
    "angry",
    "disgust",
    "fear",
    "happy",
    "neutral",
    "sad",
    "surprise",
)

#: The ``info`` entries that hold one value per row, in row order (the loaders' ``names``:
#: each row's image name). `Dataset.subset` (and so `split` and every split helper) indexes
#: them with the rows; every other entry describes the load as a whole (``source``,
#: ``dropped``, ``skipped``, ``no_face``, ...) and is copied as it is.
PER_ROW_INFO: tuple[str, ...] = ("names",)

# A `refit` function: given training-row indices, returns x for every row,
# with the dataset's learned feature transform (e.g. a PCA) fitted on those
# rows only.
Refit = Callable[[np.ndarray], np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """An in-memory labelled dataset: inputs, integer labels and metadata.

  Attributes:
    x: float32 inputs, features ``(N, D)`` or images ``(N, H, W, C)`` (NHWC).
    y: int32 labels in ``0 .. len(class_names) - 1``, shape ``(N,)``.
    class_names: one name per class, in label order.
    groups: optional ``(N,)`` array of person ids (used by person-independent
      splits), or None when the source has no person information.
    info: metadata: ``source``, and for loaders that can drop or skip items,
      ``dropped``/``skipped`` lists (never silently lost), ``blocks`` (the
      descriptor blocks of a feature vector), and what was fitted where. The
      entries named in `PER_ROW_INFO` (``names``) hold one value per row and
      are indexed with the rows by `subset`; the others describe the whole
      load and are copied as they are.
    refit: None, or a function ``train_indices -> x`` that recomputes every
      row's features with the learned transform (e.g. the digits PCA) fitted
      on ``train_indices`` only. `split` uses it so that nothing is fitted on
      test rows.

  Example:
    >>> import numpy as np
    >>> ds = Dataset(np.zeros((4, 2)), np.array([0, 1, 0, 1]), ("a", "b"))
    >>> len(ds), ds.x.dtype, ds.subset([1, 3]).y.tolist()
    (4, dtype('float32'), [1, 1])
  """

  x: np.ndarray
  y: np.ndarray
  class_names: tuple[str, ...]
  groups: np.ndarray | None = None
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  refit: Refit | None = None

  def __post_init__(self) -> None:
    x = np.asarray(self.x, dtype=np.float32)
    y = np.asarray(self.y)
    if y.ndim != 1:
      raise ValueError(f"y must be 1-D, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
      try:
        v = y.astype(np.float64)
      except (TypeError, ValueError):
        raise ValueError(f"y has dtype {y.dtype}: class labels must be integer indices 0..C-1; "
                         "map names to indices first, e.g. names, y = np.unique(y, "
                         "return_inverse=True), and pass class_names=tuple(names).") from None
      if not np.all(np.equal(np.mod(v, 1), 0)):   # NaN or fractional: the fix for each
        raise ValueError(f"y must hold integer class indices, got {validate.float_labels_fix(y)}")
    y = y.astype(np.int32)
    class_names = tuple(str(c) for c in self.class_names)
    if len(x) != len(y):
      raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    if y.size and (y.min() < 0 or y.max() >= len(class_names)):
      raise ValueError(
          f"labels must be in 0..{len(class_names) - 1}, got"
          f" {int(y.min())}..{int(y.max())}; labels of other values (1-based, or codes like"
          " 3, 7, 9) map to 0..C-1 with np.unique(y, return_inverse=True)[1]"
      )
    groups = None if self.groups is None else np.asarray(self.groups)
    if groups is not None and groups.shape != y.shape:
      raise ValueError(f"groups has shape {groups.shape}, expected {y.shape}")
    info = dict(self.info)
    for key in PER_ROW_INFO:
      if key in info and info[key] is not None:
        info[key] = tuple(info[key])
        if len(info[key]) != len(y):
          raise ValueError(f"info[{key!r}] holds one value per row, but has"
                           f" {len(info[key])} values for {len(y)} rows")
    object.__setattr__(self, "x", x)
    object.__setattr__(self, "y", y)
    object.__setattr__(self, "class_names", class_names)
    object.__setattr__(self, "groups", groups)
    object.__setattr__(self, "info", info)

  def __len__(self) -> int:
    return len(self.y)

  def __repr__(self) -> str:
    source = self.info.get("source", "?")
    return (
        f"Dataset(source={source!r}, x={self.x.shape}, "
        f"classes={len(self.class_names)}, counts={self.class_counts().tolist()})"
    )

  @property
  def num_classes(self) -> int:
    """The number of classes (``len(class_names)``)."""
    return len(self.class_names)

  def class_counts(self) -> np.ndarray:
    """Examples per class, shape ``(num_classes,)``."""
    return np.bincount(self.y, minlength=self.num_classes)

  def subset(self, indices: Sequence[int] | np.ndarray) -> Dataset:
    """The rows at ``indices`` (integer indices or a boolean mask), in order.

    ``info`` is copied, its per-row entries (`PER_ROW_INFO`: ``names``)
    indexed with the rows; a ``refit`` function is carried over so that a
    subset can itself be split without fitting on its test rows.

    Args:
      indices: integer row indices or a boolean mask of length ``len(self)``.

    Returns:
      A new `Dataset` with the selected rows.
    """
    idx = _row_indices(indices, len(self))
    parent_refit = self.refit

    def refit(train: np.ndarray) -> np.ndarray:
      return parent_refit(idx[np.asarray(train, dtype=np.int64)])[idx]

    info = dict(self.info)
    for key in PER_ROW_INFO:
      if info.get(key) is not None:
        info[key] = tuple(info[key][i] for i in idx)
    return dataclasses.replace(
        self,
        x=self.x[idx],
        y=self.y[idx],
        groups=None if self.groups is None else self.groups[idx],
        info=info,
        refit=None if parent_refit is None else refit,
    )


def _row_indices(indices: Sequence[int] | np.ndarray, n: int, what: str = "indices"
                 ) -> np.ndarray:
  """``indices`` (integers, negative ones counted from the end, or a boolean mask of length
  ``n``) as non-negative int64 row numbers; an IndexError for rows out of range or indices
  that are not whole numbers (a float such as 2.9 would otherwise be cut to row 2)."""
  idx = np.asarray(indices)
  if idx.dtype == bool:
    if idx.shape != (n,):
      raise ValueError(f"boolean mask must have shape ({n},), got {idx.shape}")
    return np.flatnonzero(idx).astype(np.int64)
  idx = idx.reshape(-1)
  if idx.size and not np.issubdtype(idx.dtype, np.integer):
    try:
      fractional = np.mod(idx.astype(np.float64), 1.0) != 0.0
    except (TypeError, ValueError):
      raise IndexError(f"{what} must be ints or a boolean mask, got {idx.dtype}") from None
    if fractional.any():
      raise IndexError(f"{what} must be whole row numbers (ints) or a boolean mask, got"
                       f" {idx[fractional][0].item()!r}; round or cast them to int first")
  idx = idx.astype(np.int64)
  if idx.size and (idx.min() < -n or idx.max() >= n):
    raise IndexError(f"{what} out of range for a dataset of {n} rows: they run from"
                     f" {idx.min()} to {idx.max()}")
  # Negative indices count from the end: as row numbers, -1 and n - 1 are the same row.
  return np.where(idx < 0, idx + n, idx)


def split(
    dataset: Dataset,
    train_indices: Sequence[int] | np.ndarray,
    test_indices: Sequence[int] | np.ndarray,
) -> tuple[Dataset, Dataset]:
  """Splits ``dataset`` into (train, test), fitting learned features on train.

  For a dataset with a ``refit`` function (the digits features, whose PCA is
  learned) the features of both parts are recomputed with the transform fitted
  on the training rows only, and ``info['fitted_on']`` says so. Other datasets
  are simply subset. Scaling is separate: see `standardize_split`.

  Args:
    dataset: the dataset to split.
    train_indices: row indices of the training part.
    test_indices: row indices of the test part.

  Returns:
    ``(train, test)`` datasets.

  Example:
    >>> from jaxprune import data
    >>> ds = data.load_features("digits")
    >>> tr, te = data.kfold(ds.y, n_splits=5, seed=0)[0]
    >>> train, test = data.split(ds, tr, te)
    >>> train.info["fitted_on"]
    'training split'
  """
  # As row numbers (negative ones counted from the end), so that the overlap check sees
  # that -1 and len(dataset) - 1 are the same row.
  train_idx = _row_indices(train_indices, len(dataset), "train_indices")
  test_idx = _row_indices(test_indices, len(dataset), "test_indices")
  overlap = np.intersect1d(train_idx, test_idx)
  if overlap.size:
    raise ValueError(
        f"{overlap.size} row{'s are' if overlap.size > 1 else ' is'} in both train and"
        f" test, e.g. rows {overlap[:5].tolist()} (negative indices count from the end):"
        " the test part would not be held out; pass disjoint train and test indices"
    )
  train = dataset.subset(train_idx)
  test = dataset.subset(test_idx)
  if dataset.refit is not None:
    x = dataset.refit(train_idx)
    train = dataclasses.replace(train, x=x[train_idx],
                                info=dict(train.info, fitted_on="training split"))
    test = dataclasses.replace(test, x=x[test_idx],
                               info=dict(test.info, fitted_on="training split"))
  return train, test


def _memory_bytes() -> int | None:
  """This machine's physical memory in bytes; None where the system does not say."""
  try:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  except (AttributeError, OSError, ValueError):
    return None


def check_images_fit(count: int, size: tuple[int, int], channels: int, fix: str) -> None:
  """Raises a ValueError when ``count`` float32 images of ``size`` and ``channels`` would take
  more than this machine's memory, before any is made: numpy would stop with a MemoryError
  traceback or, where memory is overcommitted, the system would kill the process half-way
  (a mistyped size such as 9000x7200 for 90x72). ``fix`` says what to change.

  Example:
    >>> check_images_fit(675, (90, 72), 1, fix="pass a smaller size")
  """
  need = count * size[0] * size[1] * channels * 4
  total = _memory_bytes()
  if total and need > total:
    raise ValueError(
        f"{count} images of {size[0]}x{size[1]}x{channels} take {need / 2**30:.1f} GiB as"
        f" float32, more than this machine's {total / 2**30:.1f} GiB of memory: {fix}")
