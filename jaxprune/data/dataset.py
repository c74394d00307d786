"""The `Dataset` container shared by every loader in `jaxprune.data`."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

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
      if not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError("y must hold integer class indices")
    y = y.astype(np.int32)
    class_names = tuple(str(c) for c in self.class_names)
    if len(x) != len(y):
      raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    if y.size and (y.min() < 0 or y.max() >= len(class_names)):
      raise ValueError(
          f"labels must be in 0..{len(class_names) - 1}, got"
          f" {int(y.min())}..{int(y.max())}"
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
    idx = np.asarray(indices)
    if idx.dtype == bool:
      if idx.shape != (len(self),):
        raise ValueError(f"boolean mask must have shape ({len(self)},)")
      idx = np.flatnonzero(idx)
    idx = idx.astype(np.int64).reshape(-1)
    if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
      raise IndexError(f"indices out of range for a dataset of {len(self)}")
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
  train_idx = np.asarray(train_indices, dtype=np.int64).reshape(-1)
  test_idx = np.asarray(test_indices, dtype=np.int64).reshape(-1)
  overlap = np.intersect1d(train_idx, test_idx)
  if overlap.size:
    raise ValueError(
        f"{overlap.size} rows are in both train and test, e.g. {overlap[:5]}"
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
