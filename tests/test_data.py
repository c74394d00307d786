"""Tests of jaxprune.data: the Dataset container, scaling, bundled data, `load`."""

import dataclasses
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from jaxprune import data

# ---------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------


def _toy(n=14):
  rng = np.random.default_rng(0)
  return data.Dataset(rng.normal(size=(n, 3)), np.arange(n) % 7,
                      tuple("abcdefg"), groups=np.arange(n) // 2,
                      info={"source": "toy"})


def test_dataset_casts_and_validates():
  ds = _toy()
  assert ds.x.dtype == np.float32 and ds.y.dtype == np.int32
  assert len(ds) == 14 and ds.num_classes == 7
  assert ds.class_counts().tolist() == [2] * 7
  assert "toy" in repr(ds)
  with pytest.raises(ValueError, match="rows"):
    data.Dataset(np.zeros((3, 2)), np.zeros(4, int), ("a",))
  with pytest.raises(ValueError, match="labels must be in 0..1"):
    data.Dataset(np.zeros((2, 2)), np.array([0, 2]), ("a", "b"))
  with pytest.raises(ValueError, match="integer"):
    data.Dataset(np.zeros((2, 2)), np.array([0.5, 1.0]), ("a", "b"))
  with pytest.raises(ValueError, match="1 NaN or infinite labels; clean or impute"):
    data.Dataset(np.zeros((2, 2)), np.array([0.0, np.nan]), ("a", "b"))
  with pytest.raises(ValueError, match="groups"):
    data.Dataset(np.zeros((2, 2)), np.array([0, 1]), ("a", "b"), groups=[1])
  # found by a user on scikit-learn data: names and codes as labels get the mapping that works
  names = np.array(["setosa", "versicolor", "setosa"])
  with pytest.raises(ValueError, match=r"dtype <U10.*np.unique\(y, return_inverse=True\)"):
    data.Dataset(np.zeros((3, 2)), names, ("setosa", "versicolor"))
  with pytest.raises(ValueError, match=r"got 3..9; .*np.unique\(y, return_inverse=True\)\[1\]"):
    data.Dataset(np.zeros((3, 2)), np.array([3, 7, 9]), ("a", "b", "c"))
  # whole numbers in an object array (a pandas nullable column's .to_numpy()) are still labels
  assert data.Dataset(np.zeros((3, 2)), np.array([0, 1, 1], object), ("a", "b")).y.tolist() \
      == [0, 1, 1]
  kept, y = np.unique(names, return_inverse=True)
  assert data.Dataset(np.zeros((3, 2)), y, tuple(kept)).y.tolist() == [0, 1, 0]


def test_standardize_split_names_nan_in_either_split():
  ds = _toy()
  train, test = data.split(ds, np.arange(10), np.arange(10, 14))
  for part, which in (("training", train), ("test", test)):
    x = np.array(which.x)
    x[1, 0] = np.nan
    bad = dataclasses.replace(which, x=x)
    pair = (bad, test) if part == "training" else (train, bad)
    with pytest.raises(ValueError, match=f"The {part} split's x holds 1 NaN.*impute"):
      data.standardize_split(*pair)


def test_per_row_info_follows_the_rows_of_subsets_and_splits():
  """info['names'] listed every row of the whole dataset after subset/split, so test.info
  ['names'][0] named another image than test row 0."""
  assert data.PER_ROW_INFO == ("names",)
  ds = _toy()
  names = tuple(f"img_{i}.png" for i in range(len(ds)))
  ds = data.Dataset(ds.x, ds.y, ds.class_names, groups=ds.groups,
                    info={"source": "toy", "names": list(names), "skipped": ["a", "b"]})
  assert ds.info["names"] == names  # stored as a tuple
  sub = ds.subset([5, 2, 9])
  assert sub.info["names"] == ("img_5.png", "img_2.png", "img_9.png")
  assert sub.info["skipped"] == ["a", "b"]  # describes the load: copied as it is
  assert ds.subset(ds.y == 3).info["names"] == ("img_3.png", "img_10.png")
  assert sub.subset([2]).info["names"] == ("img_9.png",)
  train, test = data.train_test_split(ds, test_fraction=0.5, seed=0)
  for part in (train, test):
    assert len(part.info["names"]) == len(part)
    for i, name in enumerate(part.info["names"]):  # the row's own name
      row = names.index(name)
      np.testing.assert_array_equal(part.x[i], ds.x[row])
  with pytest.raises(ValueError, match=r"info\['names'\] holds one value per row"):
    data.Dataset(ds.x, ds.y, ds.class_names, info={"names": names[:3]})
  # A dataset with a learned transform (refit) keeps its per-row entries too.
  digits = data.load_features("digits")
  digits = data.Dataset(digits.x, digits.y, digits.class_names,
                        info=dict(digits.info, names=[str(i) for i in range(len(digits))]),
                        refit=digits.refit)
  tr, te = data.split(digits, np.arange(0, 100), np.arange(100, 150))
  assert tr.info["names"] == tuple(map(str, range(100)))
  assert te.info["names"] == tuple(map(str, range(100, 150)))
  assert te.info["fitted_on"] == "training split"


def test_dataset_is_frozen():
  ds = _toy()
  with pytest.raises(AttributeError):
    ds.x = np.zeros(1)  # type: ignore[misc]


def test_subset_indices_and_mask():
  ds = _toy()
  sub = ds.subset([3, 1])
  np.testing.assert_array_equal(sub.x, ds.x[[3, 1]])
  np.testing.assert_array_equal(sub.y, [3, 1])
  np.testing.assert_array_equal(sub.groups, [1, 0])
  assert sub.info == ds.info and sub.info is not ds.info
  masked = ds.subset(ds.y == 2)
  np.testing.assert_array_equal(masked.y, [2, 2])
  with pytest.raises(IndexError):
    ds.subset([99])
  with pytest.raises(ValueError, match="boolean mask"):
    ds.subset(np.ones(3, bool))


def test_split_rejects_overlap():
  with pytest.raises(ValueError, match="both train and test"):
    data.split(_toy(), [0, 1, 2], [2, 3])


# ---------------------------------------------------------------------------
# Scaling
# ---------------------------------------------------------------------------


def test_per_feature_standardizer():
  rng = np.random.default_rng(1)
  x = rng.normal(3.0, 2.0, size=(50, 4)) * np.array([1, 10, 100, 0.1])
  mean, std = data.fit_standardizer(x)
  np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5)
  np.testing.assert_allclose(std, x.std(0), rtol=1e-5)
  z = data.standardize(x, mean, std)
  assert z.dtype == np.float32
  np.testing.assert_allclose(z.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(z.std(0), 1, atol=1e-5)


def test_block_standardizer_uses_one_scalar_per_block():
  rng = np.random.default_rng(2)
  x = np.concatenate([rng.normal(5, 3, (40, 5)), rng.normal(-1, 0.5, (40, 5))], 1)
  s = data.fit_standardizer(x, blocks=data.FEATURE_BLOCKS)
  np.testing.assert_allclose(s.mean[:5], x[:, :5].mean(), rtol=1e-5)
  np.testing.assert_allclose(s.mean[5:], x[:, 5:].mean(), rtol=1e-5)
  np.testing.assert_allclose(s.std[:5], x[:, :5].std(), rtol=1e-5)
  np.testing.assert_allclose(s.std[5:], x[:, 5:].std(), rtol=1e-5)
  z = s(x)
  assert abs(z[:, :5].mean()) < 1e-5 and abs(z[:, :5].std() - 1) < 1e-5
  assert abs(z[:, 5:].mean()) < 1e-5 and abs(z[:, 5:].std() - 1) < 1e-5
  # A single global block: one scalar for everything.
  g = data.fit_standardizer(x, blocks=((0, 10),))
  assert np.unique(g.mean).size == 1 and np.unique(g.std).size == 1


def test_standardizer_edge_cases():
  x = np.array([[1.0, 2.0, 3.0], [1.0, 4.0, 5.0]])
  mean, std = data.fit_standardizer(x, blocks=((1, 3),))
  assert mean[0] == 0 and std[0] == 1  # column outside every block: unscaled
  const = data.fit_standardizer(np.ones((5, 2)))
  np.testing.assert_array_equal(const.std, [1, 1])
  for bad in [((0, 4),), ((2, 1),), ((0, 2), (1, 3)), ((0,),)]:
    with pytest.raises(ValueError):
      data.fit_standardizer(x, blocks=bad)
  with pytest.raises(ValueError, match="NaN"):
    data.fit_standardizer(np.array([[np.nan, 1.0]]))
  with pytest.raises(ValueError, match="shapes"):
    data.standardize(x, mean[:2], std[:2])


def test_standardize_split_fits_on_train_only():
  ds = data.load_features("diabetes")
  train, test = data.train_test_split(ds, test_fraction=0.25, seed=3)
  train_s, test_s, scaler = data.standardize_split(train, test)
  np.testing.assert_allclose(scaler.mean, train.x.mean(0), rtol=1e-4)
  np.testing.assert_allclose(train_s.x.mean(0), 0, atol=1e-4)
  np.testing.assert_allclose(test_s.x, (test.x - train.x.mean(0)) / train.x.std(0),
                             rtol=1e-4, atol=1e-4)
  assert not np.allclose(test_s.x.mean(0), 0, atol=1e-3)
  assert "training split" in train_s.info["scaling"]
  assert train_s.refit is None


# ---------------------------------------------------------------------------
# Bundled data
# ---------------------------------------------------------------------------


def test_diabetes_features():
  ds = data.load_features("diabetes")
  assert ds.x.shape == (442, 10) and ds.x.dtype == np.float32
  assert ds.num_classes == 7 and set(np.unique(ds.y)) == set(range(7))
  counts = ds.class_counts()
  assert counts.sum() == 442 and counts.min() >= 58 and counts.max() <= 68
  assert ds.groups is None and "stand-in" in ds.info["source"]
  assert ds.refit is None
  # Raw clinical features (age in years), not pre-scaled on all the data.
  assert ds.x[:, 0].max() > 50


def test_digits_features_refit_on_train_only():
  ds = data.load_features("digits")
  assert ds.x.shape == (1264, 10) and ds.num_classes == 7
  assert ds.info["blocks"] == ((0, 5), (5, 10))
  counts = ds.class_counts()
  assert counts.min() >= 170 and counts.max() <= 190
  train, test = data.train_test_split(ds, test_fraction=0.3, seed=0)
  assert train.info["fitted_on"] == "training split"
  # PCA centres on the mean of the rows it was fitted on: the training rows.
  np.testing.assert_allclose(train.x.mean(0), 0, atol=1e-4)
  assert np.abs(test.x.mean(0)).max() > 1e-3
  # Different from the all-rows fit (the same rows, as indices), and deterministic.
  tr_idx, te_idx = data.train_test_split(ds.y, test_fraction=0.3, seed=0)
  np.testing.assert_array_equal(train.y, ds.y[tr_idx])
  assert not np.allclose(train.x, ds.x[tr_idx], atol=1e-3)
  np.testing.assert_allclose(test.x, ds.refit(tr_idx)[te_idx], atol=1e-6)
  train2, _ = data.train_test_split(ds, test_fraction=0.3, seed=0)
  np.testing.assert_array_equal(train.x, train2.x)


def test_digits_refit_through_subset():
  ds = data.load_features("digits")
  sub = ds.subset(np.arange(0, 1264, 2))
  tr, te = data.kfold(sub.y, n_splits=4, seed=1)[0]
  train, test = data.split(sub, tr, te)
  # Same as refitting the parent on the corresponding parent rows.
  parent_rows = np.arange(0, 1264, 2)
  direct = ds.refit(parent_rows[tr])
  np.testing.assert_allclose(train.x, direct[parent_rows[tr]], atol=1e-5)
  np.testing.assert_allclose(test.x, direct[parent_rows[te]], atol=1e-5)


def test_bundled_difficulty_regimes():
  """Diabetes bins are hard (~30%), digits features easy (~97%)."""
  accs = {}
  for name in ("diabetes", "digits"):
    ds = data.load_features(name)
    train, test = data.train_test_split(ds, test_fraction=0.25, seed=0)
    train, test, _ = data.standardize_split(train, test)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", ConvergenceWarning)
      clf = LogisticRegression(max_iter=500).fit(train.x, train.y)
    accs[name] = clf.score(test.x, test.y)
  assert 0.18 < accs["diabetes"] < 0.45, accs
  assert accs["digits"] > 0.9, accs


@pytest.mark.parametrize("size,channels", [((90, 72), 1), ((227, 227), 3), ((8, 8), 1)])
def test_digits_images(size, channels):
  ds = data.load_images("digits", size=size, channels=channels, max_per_class=2)
  assert ds.x.shape == (14, *size, channels) and ds.x.dtype == np.float32
  assert ds.class_counts().tolist() == [2] * 7
  assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0 and ds.x.max() > 0.5
  if channels == 3:
    np.testing.assert_array_equal(ds.x[..., 0], ds.x[..., 2])


def test_digits_images_full_and_native():
  ds = data.load_images(size=(8, 8))
  assert ds.x.shape == (1264, 8, 8, 1)
  assert ds.class_counts().min() >= 170


def test_bundled_bad_arguments():
  with pytest.raises(ValueError, match="diabetes"):
    data.load_features("iris")
  with pytest.raises(ValueError, match="channels"):
    data.load_images(size=(8, 8), channels=2)
  with pytest.raises(ValueError, match="size"):
    data.load_images(size=(8,))
  with pytest.raises(ValueError, match="digits"):
    data.load_images("cifar", size=(8, 8))
  with pytest.raises(ValueError, match="max_per_class"):
    data.load_images(size=(8, 8), max_per_class=0)


# ---------------------------------------------------------------------------
# load()
# ---------------------------------------------------------------------------


def test_load_dispatch():
  assert data.load("features").x.shape == (442, 10)
  assert data.load("digits_features").x.shape == (1264, 10)
  assert data.load("images", size=(12, 10), channels=3,
                   max_per_class=1).x.shape == (7, 12, 10, 3)
  assert set(data.NAMES) == {"features", "digits_features", "images",
                             "sfew_features", "sfew_images"}


def test_load_errors():
  with pytest.raises(ValueError, match="valid names: features, digits_features"):
    data.load("mnist")
  for name in ("sfew_features", "sfew_images"):
    with pytest.raises(ValueError, match="--data_path"):
      data.load(name)
  with pytest.raises(FileNotFoundError, match="SFEW.xlsx"):
    data.load("sfew_features", path="/nonexistent/SFEW.xlsx")
  with pytest.raises(FileNotFoundError, match="Angry"):
    data.load("sfew_images", path="/nonexistent/sfew")
