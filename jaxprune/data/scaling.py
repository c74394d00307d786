"""Feature scaling fitted on training data only: per-feature or per-block z-scores."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from jaxprune import validate
from jaxprune.data.dataset import Dataset

__all__ = ["Standardizer", "fit_standardizer", "standardize", "standardize_split"]

Blocks = Sequence[tuple[int, int]]


class Standardizer(NamedTuple):
  """Mean and standard deviation per feature column, both shape ``(D,)``.

  A NamedTuple, so ``mean, std = fit_standardizer(x)`` also works. With
  blocks, every column of a block holds that block's one scalar mean/std.

  Example:
    >>> import numpy as np
    >>> s = fit_standardizer(np.array([[0., 10.], [2., 30.]]))
    >>> s(np.array([[1., 20.]])).tolist()
    [[0.0, 0.0]]
  """

  mean: np.ndarray
  std: np.ndarray

  def __call__(self, x: np.ndarray) -> np.ndarray:
    """Applies the scaling: ``(x - mean) / std`` as float32."""
    return standardize(x, self.mean, self.std)


_BLOCKS_HINT = ("blocks is a sequence of (start, stop) column ranges, e.g. ((0, 5), (5, 10));"
                " one block is ((0, 10),), and None scales every column on its own")


def _is_int(value) -> bool:
  return (isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)))


def _check_blocks(blocks: Blocks, num_features: int) -> list[tuple[int, int]]:
  try:
    blocks = list(blocks)
  except TypeError:
    raise ValueError(f"{_BLOCKS_HINT}; got {blocks!r}") from None
  if not blocks:
    # An empty sequence would leave every column unscaled (mean 0, std 1) without a word.
    raise ValueError(f"blocks is empty, so no column would be scaled; {_BLOCKS_HINT}")
  out = []
  seen = np.zeros(num_features, dtype=bool)
  for block in blocks:
    if _is_int(block):  # blocks=(0, 5): one pair, not a sequence of pairs
      raise ValueError(f"{_BLOCKS_HINT}; got {tuple(blocks)!r}, a single pair: for one"
                       f" block pass ({tuple(blocks)!r},)")
    if (isinstance(block, (str, bytes)) or not hasattr(block, "__len__") or len(block) != 2
        or not all(_is_int(v) for v in block)):
      raise ValueError(f"each block must be (start, stop), two ints, got {block!r};"
                       f" {_BLOCKS_HINT}")
    start, stop = int(block[0]), int(block[1])
    if not 0 <= start < stop <= num_features:
      raise ValueError(
          f"block {block!r} is not a non-empty range inside 0..{num_features}"
      )
    if seen[start:stop].any():
      raise ValueError(f"block {block!r} overlaps an earlier block")
    seen[start:stop] = True
    out.append((start, stop))
  return out


def fit_standardizer(
    x: np.ndarray, *, blocks: Blocks | None = None, eps: float = 1e-8
) -> Standardizer:
  """Fits z-score statistics on ``x`` (pass the training rows only).

  Args:
    x: ``(N, D)`` training features.
    blocks: None for one mean/std per column (the usual z-score); or a list of
      ``(start, stop)`` column ranges, each scaled by one scalar mean and std
      over all its values (e.g. ``((0, 5), (5, 10))`` for SFEW's LPQ and PHOG
      blocks; ``((0, D),)`` is a single global mean/std). Columns outside every
      block are left unscaled (mean 0, std 1).
    eps: a std below this is replaced by 1 (constant columns stay finite).

  Returns:
    A `Standardizer` ``(mean, std)``, each of shape ``(D,)``, float32.

  Example:
    >>> import numpy as np
    >>> x = np.arange(20, dtype=np.float32).reshape(4, 5)
    >>> mean, std = fit_standardizer(x, blocks=((0, 2), (2, 5)))
    >>> mean.tolist()
    [8.0, 8.0, 10.5, 10.5, 10.5]
  """
  x = np.asarray(x, dtype=np.float64)
  if x.ndim != 2 or len(x) == 0:
    raise ValueError(f"x must be a non-empty (N, D) array, got shape {x.shape}")
  validate.check_finite("x", x, "clean or impute them first (e.g. drop those rows) before "
                        "fitting the scaling.")
  d = x.shape[1]
  if blocks is None:
    mean, std = x.mean(axis=0), x.std(axis=0)
  else:
    mean, std = np.zeros(d), np.ones(d)
    for start, stop in _check_blocks(blocks, d):
      mean[start:stop] = x[:, start:stop].mean()
      std[start:stop] = x[:, start:stop].std()
  std = np.where(std < eps, 1.0, std)
  return Standardizer(mean.astype(np.float32), std.astype(np.float32))


def standardize(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """Returns ``(x - mean) / std`` as float32.

  Args:
    x: ``(N, D)`` features.
    mean: ``(D,)`` means from `fit_standardizer`.
    std: ``(D,)`` standard deviations from `fit_standardizer`.

  Returns:
    The scaled ``(N, D)`` float32 features.

  Example:
    >>> import numpy as np
    >>> standardize(np.array([[3.0]]), np.array([1.0]), np.array([2.0])).tolist()
    [[1.0]]
  """
  x = np.asarray(x, dtype=np.float32)
  mean = np.asarray(mean, dtype=np.float32)
  std = np.asarray(std, dtype=np.float32)
  if x.ndim != 2 or mean.shape != (x.shape[1],) or std.shape != mean.shape:
    raise ValueError(
        f"shapes do not fit: x {x.shape}, mean {mean.shape}, std {std.shape}"
    )
  return (x - mean) / std


def standardize_split(
    train: Dataset, test: Dataset, *, blocks: Blocks | None = None
) -> tuple[Dataset, Dataset, Standardizer]:
  """Fits the scaling on ``train`` and applies it to both datasets.

  Args:
    train: training features, ``x`` of shape ``(N, D)``.
    test: test features with the same ``D``.
    blocks: as in `fit_standardizer`; pass ``train.info.get('blocks')`` for
      per-descriptor-block scaling.

  Returns:
    ``(train, test, standardizer)`` with scaled ``x``; ``info['scaling']``
    records what was fitted where. The returned datasets have no ``refit``
    (their features are final).

  Example:
    >>> from jaxprune import data
    >>> ds = data.load_features("diabetes")
    >>> train, test = data.train_test_split(ds, test_fraction=0.2, seed=0)
    >>> train, test, scaler = data.standardize_split(train, test)
    >>> abs(float(train.x.mean())) < 1e-5
    True
  """
  for part, ds in (("training", train), ("test", test)):
    validate.check_finite(f"The {part} split's x", ds.x)
  scaler = fit_standardizer(train.x, blocks=blocks)
  kind = "per-feature z-score" if blocks is None else f"per-block z-score {tuple(blocks)}"
  note = f"{kind}, fitted on the training split ({len(train)} rows)"
  return (
      dataclasses.replace(
          train, x=scaler(train.x), info=dict(train.info, scaling=note), refit=None
      ),
      dataclasses.replace(
          test, x=scaler(test.x), info=dict(test.info, scaling=note), refit=None
      ),
      scaler,
  )
