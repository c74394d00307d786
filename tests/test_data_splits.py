"""Tests of jaxprune.data splits: stratification, determinism, persons, cross_validate."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import data

# SFEW's class sizes: 75 disgust, 100 of each other class.
SFEW_Y = np.repeat(np.arange(7), [100, 75, 100, 100, 100, 100, 100])


def _persons(y, num_persons=40, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(num_persons, size=len(y)).astype(str)


def _assert_partition(folds, n):
  tests = np.concatenate([te for _, te in folds])
  np.testing.assert_array_equal(np.sort(tests), np.arange(n))
  for tr, te in folds:
    assert np.intersect1d(tr, te).size == 0
    assert len(tr) + len(te) == n


@pytest.mark.parametrize("y", [SFEW_Y, data.load_features("diabetes").y],
                         ids=["sfew", "diabetes"])
@pytest.mark.parametrize("n_splits", [10, 5])
def test_kfold_stratified_within_one_sample(y, n_splits):
  folds = data.kfold(y, n_splits=n_splits, seed=0)
  assert len(folds) == n_splits
  _assert_partition(folds, len(y))
  counts = np.stack([np.bincount(y[te], minlength=7) for _, te in folds])
  total = np.bincount(y, minlength=7)
  # Every fold keeps each class's proportion to within one sample.
  assert np.all(counts >= np.floor(total / n_splits))
  assert np.all(counts <= np.ceil(total / n_splits))


def test_kfold_deterministic_for_seed():
  a = data.kfold(SFEW_Y, n_splits=10, seed=7)
  b = data.kfold(SFEW_Y, n_splits=10, seed=7)
  c = data.kfold(SFEW_Y, n_splits=10, seed=8)
  for (tr1, te1), (tr2, te2) in zip(a, b):
    np.testing.assert_array_equal(tr1, tr2)
    np.testing.assert_array_equal(te1, te2)
  assert any(not np.array_equal(x[1], z[1]) for x, z in zip(a, c))


def test_kfold_accepts_dataset_and_rejects_bad_n():
  ds = data.load_features("diabetes")
  folds = data.kfold(ds, n_splits=5, seed=0)
  np.testing.assert_array_equal(folds[0][1], data.kfold(ds.y, n_splits=5, seed=0)[0][1])
  with pytest.raises(ValueError, match="n_splits"):
    data.kfold(ds, n_splits=1, seed=0)


def test_train_test_split_stratified_and_deterministic():
  tr, te = data.train_test_split(SFEW_Y, test_fraction=0.2, seed=0)
  assert len(te) == 135 and len(tr) == 540
  np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), np.arange(675))
  expected = np.bincount(SFEW_Y) * 0.2
  assert np.all(np.abs(np.bincount(SFEW_Y[te]) - expected) <= 1)
  tr2, te2 = data.train_test_split(SFEW_Y, test_fraction=0.2, seed=0)
  np.testing.assert_array_equal(te, te2)
  _, te3 = data.train_test_split(SFEW_Y, test_fraction=0.2, seed=1)
  assert not np.array_equal(te, te3)
  with pytest.raises(ValueError, match="test_fraction"):
    data.train_test_split(SFEW_Y, test_fraction=1.5, seed=0)


def test_train_test_split_of_dataset_returns_datasets():
  ds = data.load_features("diabetes")
  train, test = data.train_test_split(ds, test_fraction=0.2, seed=0)
  assert isinstance(train, data.Dataset) and len(train) + len(test) == 442
  tr, te = data.train_test_split(ds.y, test_fraction=0.2, seed=0)
  np.testing.assert_array_equal(train.x, ds.x[tr])
  np.testing.assert_array_equal(test.y, ds.y[te])


def test_person_independent_folds_and_split():
  groups = _persons(SFEW_Y)
  ds = data.Dataset(np.zeros((len(SFEW_Y), 2)), SFEW_Y, data.SFEW_CLASS_NAMES,
                    groups=groups)
  folds = data.kfold(ds, n_splits=5, seed=0, person_independent=True)
  _assert_partition(folds, len(SFEW_Y))
  for tr, te in folds:
    assert not set(groups[tr]) & set(groups[te])
  same = data.kfold(SFEW_Y, n_splits=5, seed=0, groups=groups)
  for (_, a), (_, b) in zip(folds, same):
    np.testing.assert_array_equal(a, b)
  train, test = data.train_test_split(ds, test_fraction=0.2, seed=0,
                                      person_independent=True)
  assert not set(train.groups) & set(test.groups)
  assert 0.1 < len(test) / len(ds) < 0.3
  assert len(np.unique(test.y)) == 7  # stratified over persons


def test_person_independent_split_without_a_class_to_train_on_raises():
  """One person per class: the persons in the test part take their classes with them, and
  the training part had none of them (silently: a model never saw 'fear' or 'sad')."""
  y = np.repeat(np.arange(7), 6)
  ds = data.Dataset(np.zeros((42, 2)), y, data.SFEW_CLASS_NAMES,
                    groups=np.repeat([f"p{c}" for c in range(7)], 6))
  with pytest.raises(ValueError, match=r"split has no training example of classes 'fear', "
                     r"'sad'.*person_independent=False"):
    data.train_test_split(ds, test_fraction=0.2, seed=0, person_independent=True)
  with pytest.raises(ValueError, match=r"fold 1 of 5 has no training example of"):
    data.kfold(ds, n_splits=5, seed=0, person_independent=True)
  # Two persons per class: every training part keeps every class.
  two = data.Dataset(ds.x, y, data.SFEW_CLASS_NAMES,
                     groups=np.asarray([f"p{c}{i // 3}" for c, i in zip(y, range(42))]))
  for tr, _ in data.kfold(two, n_splits=2, seed=0, person_independent=True):
    assert len(np.unique(y[tr])) == 7


@pytest.mark.parametrize("seed,fewer", [(0, True), (1, False), (5, True)])
def test_person_test_fraction_is_the_most_folds_that_split(seed, fewer):
  """The fraction returned splits these data by person with its seed, and no larger number of
  folds (up to the largest class count or the number of persons) does. Class 'c' comes from
  one person: with seeds 0 and 5 the most folds put that person in the first test part (its
  training part has no 'c'), so fewer folds are returned."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, 40)
  groups = np.where(y == 2, 9, rng.integers(0, 8, 40))
  ds = data.Dataset(np.zeros((40, 2)), y, ("a", "b", "c"), groups=groups)
  folds, fraction = data.person_test_fraction(ds, seed=seed)
  assert int(round(1.0 / fraction)) == folds >= 2
  train, test = data.train_test_split(ds, test_fraction=fraction, seed=seed,
                                      person_independent=True)
  assert not set(train.groups) & set(test.groups)
  top = min(np.bincount(y).max(), len(np.unique(groups)))
  assert (folds < top) is fewer
  for more in range(folds + 1, top + 1):
    with pytest.raises(ValueError):
      data.train_test_split(ds, test_fraction=1.0 / more, seed=seed, person_independent=True)
  # Labels and person ids given apart: the same answer.
  assert data.person_test_fraction(y, seed=seed, groups=groups) == (folds, fraction)


def test_person_test_fraction_without_a_split_or_persons():
  y = np.repeat(np.arange(3), 4)
  assert data.person_test_fraction(y, groups=np.zeros(12, int)) is None   # one person
  with pytest.raises(ValueError, match="person ids"):
    data.person_test_fraction(data.load_features("diabetes"))


def test_person_independent_errors():
  ds = data.load_features("diabetes")
  with pytest.raises(ValueError, match="person ids"):
    data.train_test_split(ds, test_fraction=0.2, seed=0, person_independent=True)
  with pytest.raises(ValueError, match="person ids"):
    data.kfold(ds.y, n_splits=5, seed=0, person_independent=True)
  with pytest.raises(ValueError, match="persons"):
    data.kfold(ds.y, n_splits=5, seed=0, groups=np.arange(442) % 3)
  with pytest.raises(ValueError, match="groups has shape"):
    data.kfold(ds.y, n_splits=5, seed=0, groups=np.arange(3))
  with pytest.raises(ValueError, match="too large"):
    data.train_test_split(SFEW_Y, test_fraction=0.7, seed=0, groups=_persons(SFEW_Y))


def test_cross_validate_reports_mean_and_std():
  ds = data.load_features("diabetes")
  seen = []

  def fn(train, test, fold):
    seen.append((fold, len(train), len(test)))
    guess = train.class_counts().argmax()
    return {"accuracy": float((test.y == guess).mean()), "n_test": len(test),
            "jax_metric": jnp.asarray(fold, jnp.float32)}

  cv = data.cross_validate(fn, ds, n_splits=5, seed=0)
  assert [s[0] for s in seen] == [0, 1, 2, 3, 4]
  assert sum(s[2] for s in seen) == 442
  acc = np.array([m["accuracy"] for m in cv.per_fold])
  assert cv.mean["accuracy"] == pytest.approx(acc.mean())
  assert cv.std["accuracy"] == pytest.approx(acc.std())
  assert cv.mean["jax_metric"] == pytest.approx(2.0)
  assert cv.std["jax_metric"] == pytest.approx(np.std(np.arange(5)))
  sample = data.cross_validate(fn, ds, n_splits=5, seed=0, ddof=1)
  assert sample.std["accuracy"] == pytest.approx(acc.std(ddof=1))
  assert "accuracy" in cv.summary() and "5 folds" in cv.summary()
  for (tr, te), (tr2, te2) in zip(cv.folds, data.kfold(ds, n_splits=5, seed=0)):
    np.testing.assert_array_equal(te, te2)


def test_cross_validate_uses_split_and_explicit_folds():
  ds = data.load_features("digits")
  folds = data.kfold(ds, n_splits=3, seed=0)

  def fn(train, test, fold):
    assert train.info["fitted_on"] == "training split"
    return {"train_mean": float(np.abs(train.x.mean(0)).max())}

  cv = data.cross_validate(fn, ds, folds=folds)
  assert len(cv.per_fold) == 3 and cv.mean["train_mean"] < 1e-4


def test_cross_validate_bad_metrics():
  ds = data.load_features("diabetes")
  with pytest.raises(ValueError, match="must be a number"):
    data.cross_validate(lambda tr, te, f: {"v": np.zeros(3)}, ds, n_splits=2, seed=0)
  with pytest.raises(ValueError, match="dict of metrics"):
    data.cross_validate(lambda tr, te, f: 0.5, ds, n_splits=2, seed=0)
  with pytest.raises(ValueError, match="fold 1 returned metrics"):
    data.cross_validate(lambda tr, te, f: {f"m{f}": 1.0}, ds, n_splits=2, seed=0)


def test_impossible_splits_say_what_to_change():
  y = np.repeat(np.arange(7), 2)
  with pytest.raises(ValueError, match=r"test part would hold 3 examples.*raise test_fraction"):
    data.train_test_split(y, test_fraction=0.2)
  with pytest.raises(ValueError, match=r"class 2 has 1 example.*more examples per class"):
    data.train_test_split(np.array([0, 0, 1, 1, 2, 0, 1]), test_fraction=0.5)
  with pytest.raises(ValueError, match=r"person-independent.*= 5 stratified person folds.*"
                     r"more examples per class or a larger test_fraction"):
    data.train_test_split(y, test_fraction=0.2, groups=np.arange(14))
  with pytest.raises(ValueError, match=r"cannot make 5 stratified folds.*fewer folds"):
    data.kfold(y, n_splits=5)


def test_split_hints_suggest_only_fractions_that_split_the_data():
  """One example per class: the hint was 'a larger test_fraction (at most 0.5)', and 0.5
  failed the same way. Hints are now computed for the data, and what they name works."""
  one_each = np.arange(7)
  for fraction in (0.2, 0.5):
    with pytest.raises(ValueError, match=r"too few examples per class: a person-independent "
                       r"split needs at least 2 examples in some class") as e:
      data.train_test_split(one_each, test_fraction=fraction, groups=np.arange(7))
    assert "larger test_fraction" not in str(e.value)
  # Two per class: the suggested test_fraction makes the split.
  y = np.repeat(np.arange(7), 2)
  with pytest.raises(ValueError, match=r"or test_fraction=0.5 \(round\(1/0.5\) = 2 person "
                     r"folds\), which splits these data"):
    data.train_test_split(y, test_fraction=0.2, groups=np.arange(14))
  data.train_test_split(y, test_fraction=0.5, groups=np.arange(14))
  # Three per class at 0.1: 3 folds (0.33), the fraction nearest the request that works.
  y3 = np.repeat(np.arange(7), 3)
  with pytest.raises(ValueError, match=r"or test_fraction=0.33 \(round\(1/0.33\) = 3"):
    data.train_test_split(y3, test_fraction=0.1, groups=np.arange(21))
  data.train_test_split(y3, test_fraction=0.33, groups=np.arange(21))
  # One person: no test_fraction can help, and none is suggested.
  with pytest.raises(ValueError, match=r"no larger test_fraction splits these data") as e:
    data.train_test_split(y, test_fraction=0.2, groups=np.zeros(14))
  assert "or a larger test_fraction" not in str(e.value)
  # Stratified: the range given is exactly what works (to two decimals).
  with pytest.raises(ValueError, match=r"one per class \(a test_fraction from 0.43 to 0.5 "
                     r"splits these data\)\. Use more examples per class or raise test_fraction"):
    data.train_test_split(y, test_fraction=0.2)
  for f in (0.43, 0.5):
    data.train_test_split(y, test_fraction=f)
  for f in (0.42, 0.51):
    with pytest.raises(ValueError, match=r"from 0.43 to 0.5"):
      data.train_test_split(y, test_fraction=f)


def test_fold_hints_do_not_suggest_impossible_fold_counts():
  with pytest.raises(ValueError, match=r"too few examples per class for any folds: use at "
                     r"least 2 examples in some class") as e:
    data.kfold(np.arange(7), n_splits=3)
  assert "fewer folds" not in str(e.value)
  with pytest.raises(ValueError, match=r"fewer folds \(at most 2\)"):
    data.kfold(np.repeat(np.arange(7), 2), n_splits=3)
  data.kfold(np.repeat(np.arange(7), 2), n_splits=2)
  with pytest.raises(ValueError, match=r"only 1 person.*more persons \(at least 2, for 2 "
                     r"folds, the fewest\)") as e:
    data.kfold(np.repeat(np.arange(7), 3), n_splits=3, groups=np.zeros(21))
  assert "fewer folds" not in str(e.value)


def test_a_class_with_fewer_examples_than_folds_splits_without_sklearn_s_warning():
  """Allowed (a test part need not hold every class): scikit-learn's UserWarning about it
  leaked into the binaries' output (and fails here, where warnings are errors)."""
  y = np.array([0] * 10 + [1] * 10 + [2] * 2)
  folds = data.kfold(y, n_splits=5, seed=0)
  assert sorted(np.concatenate([te for _, te in folds]).tolist()) == list(range(22))
  groups = np.arange(22) % 7
  folds = data.kfold(y, n_splits=5, seed=0, groups=groups, person_independent=True)
  assert sorted(np.concatenate([te for _, te in folds]).tolist()) == list(range(22))


def test_cnn_reports_name_the_classes_their_test_part_lacks():
  from experiments import _cnn_common  # pylint: disable=import-outside-toplevel
  split = _cnn_common.Split(np.zeros((5, 1)), np.array([0, 1, 2, 2, 1]), np.zeros((2, 1)),
                            np.array([0, 1]))
  text = _cnn_common.split_description(split, 0.2, ("angry", "happy", "fear"))
  assert "The test part has no image of fear" in text and "leaves that class out" in text
  assert "no image of" not in _cnn_common.split_description(  # every class tested
      _cnn_common.Split(np.zeros((2, 1)), np.array([0, 1]), np.zeros((2, 1)), np.array([1, 0])),
      0.5)
