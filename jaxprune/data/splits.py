"""Stratified splits, k-fold cross-validation and a cross-validation runner.

The splitting itself is scikit-learn's (`StratifiedShuffleSplit`,
`StratifiedKFold`, `StratifiedGroupKFold`), seeded so that a seed always gives
the same indices. Person-independent splits keep every person (the ``groups``
of a dataset: for SFEW the last field of the image name) on one side only.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, overload

import numpy as np
from absl import logging
from sklearn import model_selection

from jaxprune.data.dataset import Dataset, split

__all__ = ["CrossValidation", "cross_validate", "kfold", "person_test_fraction",
           "train_test_split"]

Indices = np.ndarray
Fold = tuple[np.ndarray, np.ndarray]


def _labels_and_groups(
    data: Dataset | Sequence[int] | np.ndarray,
    groups: Sequence[Any] | np.ndarray | None,
    person_independent: bool,
) -> tuple[np.ndarray, np.ndarray | None]:
  y = data.y if isinstance(data, Dataset) else np.asarray(data)
  if y.ndim != 1 or len(y) == 0:
    raise ValueError(f"labels must be a non-empty 1-D array, got shape {y.shape}")
  if groups is None and person_independent:
    groups = data.groups if isinstance(data, Dataset) else None
    if groups is None:
      raise ValueError(
          "person_independent=True needs person ids: a Dataset with groups"
          " (the SFEW loaders set them from the image names) or groups=..."
          " ; the bundled stand-in datasets have none"
      )
  if groups is not None:
    groups = np.asarray(groups)
    if groups.shape != y.shape:
      raise ValueError(f"groups has shape {groups.shape}, labels {y.shape}")
  return y, groups


def _check_fraction(test_fraction: float) -> None:
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")


def _class_name(data, label) -> str:
  names = getattr(data, "class_names", None)
  if names is not None and 0 <= int(label) < len(names):
    return repr(names[int(label)])
  return str(label)


def _fractions_shown(ok: Callable[[float], bool]) -> tuple[float, float] | None:
  """The smallest and largest test fractions for which ``ok`` holds, among the
  fractions with two decimals (then three, ... six, for very large data); None
  when none does. ``ok`` must hold on one interval of fractions, as the size
  checks below do."""
  for digits in range(2, 7):
    scale = 10 ** digits
    good = [i / scale for i in range(1, scale) if ok(i / scale)]
    if good:
      return good[0], good[-1]
  return None


def _stratified_parts_ok(n: int, k: int, test_fraction: float) -> bool:
  """Whether a stratified split of ``n`` examples in ``k`` classes (each with
  at least 2) gives both parts one example per class at ``test_fraction``."""
  n_test = int(math.ceil(test_fraction * n))
  return k <= n_test and n - n_test >= k


def _person_fraction(data, y: np.ndarray, groups: np.ndarray,
                     seed: int | None) -> tuple[int, float] | None:
  """``(folds, test_fraction)`` of the person-independent split of these data
  with the most folds (the smallest test part) that works, or None: numbers
  of folds from the largest class count down to 2 (at most 20 of them), each
  tried with ``seed`` through the checks of `train_test_split` (enough
  examples and persons, every class in the training part). ``test_fraction``
  is the shortest decimal whose ``round(1 / f)`` gives the folds."""
  persons = len(np.unique(groups))
  top = min(int(np.unique(y, return_counts=True)[1].max()), persons)
  for k in sorted(set(range(top, max(top - 20, 1), -1)) | ({2} if top >= 2 else set()),
                  reverse=True):
    try:
      folds = _folds(y, k, 0 if seed is None else seed, groups)
      _check_person_parts(data, y, folds[:1], "split")
    except ValueError:
      continue
    return k, next(v for v in (round(1.0 / k, d) for d in range(2, 8))
                   if int(round(1.0 / v)) == k)
  return None


def person_test_fraction(data: Dataset | Sequence[int] | np.ndarray, *, seed: int = 0,
                         groups: Sequence[Any] | np.ndarray | None = None
                         ) -> tuple[int, float] | None:
  """The person-independent split with the smallest test part that these data allow.

  A person-independent train/test split is the first of ``round(1 / test_fraction)``
  stratified person folds, and which numbers of folds work depends on how the persons and
  classes fall (each fold needs persons of its own, and the training part an example of
  every class). This tries them with ``seed``, from the most (the largest class count, or
  the number of persons if smaller) down to 2, as `train_test_split` would split.

  Args:
    data: a `Dataset` with person ids (``groups``), or the labels ``y``.
    seed: the seed the split will use (the folds depend on it).
    groups: person ids, one per example (for labels, or to override the dataset's).

  Returns:
    ``(folds, test_fraction)``, ``test_fraction`` the shortest decimal whose
    ``round(1 / test_fraction)`` is ``folds``; ``train_test_split(data,
    test_fraction=test_fraction, seed=seed, person_independent=True)`` then succeeds. None
    when no number of folds splits these data (one person; every class photographed from
    one person).

  Example:
    >>> import numpy as np
    >>> y = np.repeat(np.arange(3), 4)           # 3 classes of 4 examples
    >>> persons = np.tile(np.arange(4), 3)       # 4 persons, one example of each class
    >>> person_test_fraction(y, groups=persons)
    (4, 0.25)
    >>> person_test_fraction(y, groups=np.zeros(12, int)) is None   # one person
    True
  """
  y, groups = _labels_and_groups(data, groups, True)
  return _person_fraction(data, y, groups, seed)


def _check_split(data, y: np.ndarray, test_fraction: float,
                 groups: np.ndarray | None, seed: int | None = None) -> None:
  """Raises a ValueError saying what to change when a split is impossible.

  scikit-learn's own errors name its internals ("n_splits=5 cannot be greater
  than the number of members in each class"); these name the data and the
  settings a caller controls, and suggest only changes that would work for
  these data (computed, not a fixed hint).
  """
  labels, counts = np.unique(y, return_counts=True)
  shown = ", ".join(f"{_class_name(data, l)}: {c}" for l, c in zip(labels, counts))
  if groups is None:
    n, k = len(y), len(labels)
    n_test = int(math.ceil(test_fraction * n))
    smallest = int(np.argmin(counts))
    if counts[smallest] < 2:
      raise ValueError(
          f"cannot make a stratified train/test split: class"
          f" {_class_name(data, labels[smallest])} has {counts[smallest]} example"
          f" (examples per class: {shown}); every class needs at least 2, one"
          " for each part. Use more examples per class")
    if n_test < k or n - n_test < k:
      # Every class has 2 examples or more, so n >= 2k and some fraction works.
      part, fix = (("test", "raise test_fraction") if n_test < k else
                   ("training", "lower test_fraction"))
      span = _fractions_shown(lambda f: _stratified_parts_ok(n, k, f))
      works = ("" if span is None else
               f" (test_fraction={span[0]:g} splits these data)" if span[0] == span[1] else
               f" (a test_fraction from {span[0]:g} to {span[1]:g} splits these data)")
      raise ValueError(
          f"cannot make a stratified train/test split of {n} examples in {k}"
          f" classes with test_fraction={test_fraction:g}: the {part} part would"
          f" hold {n_test if n_test < k else n - n_test} examples, fewer than"
          f" one per class{works}. Use more examples per class or {fix}")
  else:
    folds = int(round(1.0 / test_fraction))
    if counts.max() < folds:
      head = (f"cannot make a person-independent split with test_fraction="
              f"{test_fraction:g}: it is the first of round(1/test_fraction) ="
              f" {folds} stratified person folds, which needs at least {folds}"
              f" examples in some class, and every class has fewer (examples per"
              f" class: {shown})")
      good = _person_fraction(data, y, groups, seed)
      if good:
        k, f = good
        raise ValueError(
            f"{head}. Use more examples per class or a larger test_fraction:"
            f" at least {folds} examples in some class, or test_fraction={f:g}"
            f" (round(1/{f:g}) = {k} person folds), which splits these data")
      m = int(counts.max())
      try:   # a stratified split instead: suggested only where it would work
        _check_split(data, y, test_fraction, None)
        stratified = "; or use person_independent=False (a stratified split)"
      except ValueError:
        stratified = ""
      if m < 2:
        need = ("at least 2 examples in some class at test_fraction=0.5 (2"
                " person folds, the fewest)")
        if folds > 2:
          need += (f", and at least {folds} at test_fraction={test_fraction:g}"
                   f" ({folds} person folds)")
        raise ValueError(
            f"{head}. The data have too few examples per class: a"
            f" person-independent split needs {need}. Use more examples per"
            f" class{stratified}")
      raise ValueError(
          f"{head}. Use more examples per class (at least {folds} in some"
          f" class): no larger test_fraction splits these data (with"
          f" {2 if m == 2 else f'2 to {m}'} person folds there are fewer persons"
          " than folds, or some class has no training example), so they also"
          f" need more persons per class{stratified}")


@overload
def train_test_split(
    data: Dataset, *, test_fraction: float = ..., seed: int = ...,
    person_independent: bool = ..., groups: Any = ...
) -> tuple[Dataset, Dataset]: ...


@overload
def train_test_split(
    data: Sequence[int] | np.ndarray, *, test_fraction: float = ...,
    seed: int = ..., person_independent: bool = ..., groups: Any = ...
) -> tuple[Indices, Indices]: ...


def train_test_split(
    data,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    person_independent: bool = False,
    groups=None,
):
  """A stratified train/test split, deterministic for a seed.

  Args:
    data: a `Dataset`, or the labels ``y`` alone.
    test_fraction: the share of examples in the test part. With
      ``person_independent`` the split is the first fold of a stratified group
      k-fold with ``k = round(1 / test_fraction)``, so the share is about
      ``1 / k`` (persons are not divisible).
    seed: the random seed.
    person_independent: keep every person on one side only (no person in both
      parts); persons are ``groups`` or the dataset's ``groups``.
    groups: person ids, one per example (optional).

  Returns:
    For a `Dataset`: ``(train, test)`` datasets (made with `split`, so learned
    features such as the digits PCA are fitted on ``train`` only). For labels:
    ``(train_indices, test_indices)``, each sorted.

  Example:
    >>> import numpy as np
    >>> y = np.repeat(np.arange(7), 10)
    >>> train, test = train_test_split(y, test_fraction=0.2, seed=0)
    >>> len(train), len(test), np.bincount(y[test]).tolist()
    (56, 14, [2, 2, 2, 2, 2, 2, 2])
  """
  _check_fraction(test_fraction)
  y, groups = _labels_and_groups(data, groups, person_independent)
  if groups is None:
    splitter = model_selection.StratifiedShuffleSplit(
        n_splits=1, test_size=test_fraction, random_state=seed)
    _check_split(data, y, test_fraction, None)
    train, test = next(splitter.split(np.zeros(len(y)), y))
    _check_stratified_training_part(data, y, train, test_fraction)
  else:
    k = int(round(1.0 / test_fraction))
    if k < 2:
      raise ValueError(
          f"test_fraction={test_fraction} is too large for a person-independent"
          " split (it is made as 1 of round(1/test_fraction) folds)"
      )
    _check_split(data, y, test_fraction, groups, seed)
    train, test = _folds(y, k, seed, groups)[0]
    _check_person_parts(data, y, [(train, test)], "split")
  train, test = np.sort(train), np.sort(test)
  if isinstance(data, Dataset):
    return split(data, train, test)
  return train, test


def _check_stratified_training_part(data, y: np.ndarray, train: np.ndarray,
                                    test_fraction: float) -> None:
  """Raises a ValueError when a stratified training part lacks a class.

  `_check_split` checks the totals only. scikit-learn shares the training part
  out among the classes in proportion to their counts, so at a large
  ``test_fraction`` a rare class (2 examples of 100 at 0.75) can get no
  training example although the part holds one per class in total; a model
  trained on it never sees that class. Its share is at least one when
  ``n_train * count > n`` (the floor of ``n_train * count / n``; strict, so
  float rounding cannot take it below 1), which is what the suggested
  fractions guarantee for the rarest class.
  """
  labels, counts = np.unique(y, return_counts=True)
  missing = np.setdiff1d(labels, np.unique(y[train]))
  if not missing.size:
    return
  n, k, rarest = len(y), len(labels), int(counts.min())
  one = missing.size == 1
  names = ", ".join(
      f"{_class_name(data, l)} ({int(counts[labels == l][0])} of {n} examples)"
      for l in missing)
  span = _fractions_shown(
      lambda f: _stratified_parts_ok(n, k, f)
      and (n - int(math.ceil(f * n))) * rarest > n)
  works = ("" if span is None else
           f" (test_fraction={span[0]:g} gives every class a training example)"
           if span[0] == span[1] else
           f" (a test_fraction from {span[0]:g} to {span[1]:g} gives every class"
           " a training example)")
  raise ValueError(
      f"cannot make a stratified train/test split with test_fraction="
      f"{test_fraction:g}: its training part of {len(train)} examples has no"
      f" example of {'class' if one else 'classes'} {names}, so a model"
      f" trained on it would never see {'it' if one else 'them'} (every class"
      f" gets a share of the training part in proportion to its count, and a"
      f" rare class's share can round to 0). Use a smaller test_fraction{works} or more examples of"
      f" {'that class' if one else 'those classes'}")


def _check_person_parts(data, y: np.ndarray, folds: Sequence[Fold],
                        what: str) -> None:
  """Raises a ValueError when a person-independent training part lacks a class.

  Persons are not divisible: a class whose examples all come from persons of
  one test part has none left to train on, and a model never sees it.
  """
  labels = np.unique(y)
  for i, (train, _) in enumerate(folds):
    missing = np.setdiff1d(labels, np.unique(y[train]))
    if missing.size:
      names = ", ".join(_class_name(data, l) for l in missing)
      where = what if len(folds) == 1 else f"{what} {i + 1} of {len(folds)}"
      one = missing.size == 1
      raise ValueError(
          f"the person-independent {where} has no training example of"
          f" {'class' if one else 'classes'} {names}: every example of"
          f" {'it' if one else 'them'} comes from persons in the test part"
          f" (persons per class decide this split, not examples). Use data with"
          f" more persons per class, fewer folds or a smaller test_fraction, or"
          f" person_independent=False")


def _folds(y: np.ndarray, n_splits: int, seed: int,
           groups: np.ndarray | None) -> list[Fold]:
  if n_splits < 2:
    raise ValueError(f"n_splits must be at least 2, got {n_splits}")
  counts = np.unique(y, return_counts=True)[1]
  if counts.max() < n_splits:
    # n_splits is at least 2: fewer folds help only when some class has 2 or more.
    fix = (f"Use more examples per class or fewer folds (at most {counts.max()})"
           if counts.max() >= 2 else
           "The data have too few examples per class for any folds: use at least"
           " 2 examples in some class (2 folds, the fewest)")
    raise ValueError(
        f"cannot make {n_splits} stratified folds: every class has fewer than"
        f" {n_splits} examples (the largest has {counts.max()}). {fix}")
  x = np.zeros(len(y))
  if groups is None:
    splitter = model_selection.StratifiedKFold(
        n_splits=n_splits, shuffle=True, random_state=seed)
    it = splitter.split(x, y)
  else:
    num_groups = len(np.unique(groups))
    if num_groups < n_splits:
      fix = (" Use data with more persons, fewer folds (at most"
             f" {num_groups}; a person-independent train/test split is 1 of"
             " round(1/test_fraction) folds: a larger test_fraction), or"
             " person_independent=False" if num_groups >= 2 else
             " Use data with more persons (at least 2, for 2 folds, the fewest),"
             " or person_independent=False")
      raise ValueError(
          f"only {num_groups} person{'' if num_groups == 1 else 's'} (groups) for"
          f" {n_splits} person-independent folds: every fold needs persons of its"
          f" own.{fix}"
      )
    splitter = model_selection.StratifiedGroupKFold(
        n_splits=n_splits, shuffle=True, random_state=seed)
    it = splitter.split(x, y, groups)
  with warnings.catch_warnings():
    # A class with fewer examples than folds is allowed (the test parts are not held to hold
    # every class, as the docs say): scikit-learn's warning about it is not the caller's news.
    warnings.filterwarnings("ignore", message="The least populated class in y has only",
                            category=UserWarning)
    return [(np.sort(tr), np.sort(te)) for tr, te in it]


def kfold(
    data: Dataset | Sequence[int] | np.ndarray,
    *,
    n_splits: int = 10,
    seed: int = 0,
    groups: Sequence[Any] | np.ndarray | None = None,
    person_independent: bool = False,
) -> list[Fold]:
  """Stratified k-fold indices (e.g. 10-fold or 5-fold), deterministic for a seed.

  Every example is in exactly one test fold; each class's count per test fold
  differs by at most one between folds (`StratifiedKFold`). With persons (the
  ``groups`` argument, or ``person_independent=True`` with a `Dataset` that
  has groups) `StratifiedGroupKFold` keeps each person in one fold only.

  Args:
    data: a `Dataset`, or the labels ``y``.
    n_splits: the number of folds.
    seed: the random seed.
    groups: person ids, one per example.
    person_independent: use the dataset's groups as persons.

  Returns:
    A list of ``n_splits`` pairs ``(train_indices, test_indices)``, sorted.
    Use `split` to turn a pair into datasets.

  Example:
    >>> import numpy as np
    >>> folds = kfold(np.repeat(np.arange(7), 10), n_splits=5, seed=0)
    >>> len(folds), [len(te) for _, te in folds]
    (5, [14, 14, 14, 14, 14])
  """
  y, groups = _labels_and_groups(data, groups, person_independent)
  if groups is None and n_splits >= 2 and np.unique(y, return_counts=True)[1].max() >= n_splits:
    # (else _folds names the fold count); before scikit-learn, which only warns
    _check_no_single_example_class(data, y, n_splits)
  folds = _folds(y, n_splits, seed, groups)
  if groups is not None:
    _check_person_parts(data, y, folds, "fold")
  return folds


def _check_no_single_example_class(data, y: np.ndarray, n_splits: int) -> None:
  """A class of one example is in one test fold, so that fold trains without it (scikit-learn
  only warns): a ValueError naming the class, as a train/test split whose training part lacks
  a class gets one."""
  labels, counts = np.unique(y, return_counts=True)
  single = labels[counts == 1]
  if not single.size:
    return
  one = single.size == 1
  names = ", ".join(_class_name(data, l) for l in single)
  raise ValueError(
      f"cannot make {n_splits} stratified folds whose training parts all hold every class:"
      f" {'class' if one else 'classes'} {names} {'has' if one else 'have'} one example"
      f" only, so the fold that tests {'it' if one else 'each'} trains a model that never sees"
      f" {'it' if one else 'them'}. Add examples of {'that class' if one else 'those classes'}"
      f" (2 or more each), or leave {'it' if one else 'them'} out of the data")


@dataclasses.dataclass(frozen=True, eq=False)
class CrossValidation:
  """The result of `cross_validate`.

  Attributes:
    per_fold: each fold's metrics, in fold order.
    mean: the mean of each metric over folds.
    std: the standard deviation of each metric over folds (``ddof`` as asked,
      population std by default, like ``np.std``).
    folds: the ``(train_indices, test_indices)`` of each fold.
  """

  per_fold: tuple[dict[str, float], ...]
  mean: dict[str, float]
  std: dict[str, float]
  folds: tuple[Fold, ...] = dataclasses.field(repr=False, default=())

  def summary(self) -> str:
    """One line per metric: ``name: mean +- std (n folds)``."""
    n = len(self.per_fold)
    return "\n".join(
        f"{k}: {self.mean[k]:.4g} +- {self.std[k]:.4g} ({n} folds)" for k in self.mean
    )


def _scalar(value: Any, name: str, fold: int) -> float:
  array = np.asarray(value)
  if array.size != 1 or not np.issubdtype(array.dtype, np.number):
    raise ValueError(
        f"fold {fold}: metric {name!r} must be a number, got {type(value).__name__}"
        f" of shape {array.shape}"
    )
  return float(array.reshape(()))


def cross_validate(
    fn: Callable[[Dataset, Dataset, int], Mapping[str, Any]],
    dataset: Dataset,
    *,
    n_splits: int = 10,
    seed: int = 0,
    person_independent: bool = False,
    folds: Sequence[Fold] | None = None,
    ddof: int = 0,
) -> CrossValidation:
  """Runs a train-and-evaluate function on every fold; mean and std per metric.

  Each fold's datasets are made with `split` (learned features such as the
  digits PCA are fitted on the fold's training part); scale them inside ``fn``
  with `standardize_split` so scaling is fitted on training data too.

  Args:
    fn: ``fn(train, test, fold) -> {metric: number}``; every fold must return
      the same metric names.
    dataset: the data to cross-validate on.
    n_splits: number of stratified folds (10 and 5 are the usual choices).
    seed: seed of the fold assignment.
    person_independent: person-independent folds (the dataset's groups).
    folds: explicit ``(train_indices, test_indices)`` pairs, overriding
      ``n_splits``/``seed``/``person_independent``.
    ddof: delta degrees of freedom of the std (0: population, 1: sample).

  Returns:
    A `CrossValidation` with per-fold metrics and their mean and std.

  Example:
    >>> from jaxprune import data
    >>> ds = data.load_features("diabetes")
    >>> def majority(train, test, fold):
    ...   guess = train.class_counts().argmax()
    ...   return {"accuracy": float((test.y == guess).mean())}
    >>> cv = data.cross_validate(majority, ds, n_splits=5, seed=0)
    >>> sorted(cv.mean)
    ['accuracy']
  """
  if folds is None:
    folds = kfold(dataset, n_splits=n_splits, seed=seed,
                  person_independent=person_independent)
  folds = tuple((np.asarray(tr), np.asarray(te)) for tr, te in folds)
  if not folds:
    raise ValueError("no folds to run")
  per_fold: list[dict[str, float]] = []
  for i, (train_idx, test_idx) in enumerate(folds):
    train, test = split(dataset, train_idx, test_idx)
    result = fn(train, test, i)
    if not isinstance(result, Mapping):
      raise ValueError(
          f"fold {i}: fn must return a dict of metrics, got {type(result).__name__}"
      )
    metrics = {str(k): _scalar(v, str(k), i) for k, v in result.items()}
    if per_fold and metrics.keys() != per_fold[0].keys():
      raise ValueError(
          f"fold {i} returned metrics {sorted(metrics)}, fold 0 returned"
          f" {sorted(per_fold[0])}"
      )
    logging.info("cross_validate fold %d/%d: %s", i + 1, len(folds), metrics)
    per_fold.append(metrics)
  names = list(per_fold[0])
  table = np.array([[m[k] for k in names] for m in per_fold], dtype=np.float64)
  std = table.std(axis=0, ddof=ddof) if len(per_fold) > ddof else np.full(len(names), np.nan)
  return CrossValidation(
      per_fold=tuple(per_fold),
      mean=dict(zip(names, table.mean(axis=0).tolist())),
      std=dict(zip(names, np.asarray(std).tolist())),
      folds=folds,
  )
