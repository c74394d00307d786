"""Tests of the PHOG and LPQ descriptors through the properties that define them."""

import itertools

import jax
import numpy as np
import pytest

import jaxprune
from jaxprune import data
from jaxprune.data import features


def _gauss_blur(img, sigma):
  """A centrally symmetric (Gaussian) blur with reflected borders, in NumPy."""
  t = np.arange(-3, 4)
  k = np.exp(-t**2 / (2 * sigma**2))
  k /= k.sum()
  p = np.pad(img, 3, mode="reflect")
  p = np.apply_along_axis(lambda v: np.convolve(v, k, "valid"), 0, p)
  return np.apply_along_axis(lambda v: np.convolve(v, k, "valid"), 1, p).astype(np.float32)


def _texture(seed, n=64):
  """A few random oriented gratings: images that differ in content from seed to seed."""
  r = np.random.default_rng(seed)
  yy, xx = np.mgrid[:n, :n]
  img = np.zeros((n, n))
  for _ in range(3):
    th, f = r.uniform(0, np.pi), r.uniform(0.03, 0.2)
    img += r.uniform(0.3, 1) * np.sin(2 * np.pi * f * (np.cos(th) * xx + np.sin(th) * yy)
                                      + r.uniform(0, 6))
  return img.astype(np.float32)


def _phog_reference(img, bins, levels):
  """PHOG by plain loops over pixels and cells (unnormalised)."""
  h, w = img.shape
  p = np.pad(img.astype(np.float64), 1, mode="edge")
  out = []
  for level in range(levels + 1):
    n = 2**level
    hist = np.zeros((n, n, bins))
    for i in range(h):
      for j in range(w):
        gx = 0.5 * (p[i + 1, j + 2] - p[i + 1, j])
        gy = 0.5 * (p[i + 2, j + 1] - p[i, j + 1])
        angle = np.degrees(np.arctan2(gy, gx)) % 360.0
        b = min(int(angle * bins / 360.0), bins - 1)
        hist[i * n // h, j * n // w, b] += np.hypot(gx, gy)
    out.append(hist.ravel())
  return np.concatenate(out)


def _lpq_codes_reference(img, window):
  """LPQ codes (no decorrelation) from the STFT written out with complex exponentials."""
  r = (window - 1) / 2
  a = 1.0 / window
  offs = np.arange(window) - r
  # (horizontal, vertical); the fourth is the reference code's w1' * conj(w1), i.e. (-a, a).
  freqs = [(a, 0.0), (0.0, a), (a, a), (-a, a)]
  h, w = img.shape
  img = img - img.mean()
  codes = np.zeros((h - window + 1, w - window + 1), np.int64)
  for i in range(codes.shape[0]):
    for j in range(codes.shape[1]):
      patch = img[i:i + window, j:j + window]
      bit = 0
      for u, v in freqs:
        f = np.sum(patch * np.exp(-2j * np.pi * (u * offs[None, :] + v * offs[:, None])))
        codes[i, j] |= (f.real > 0) << bit
        codes[i, j] |= (f.imag > 0) << (bit + 1)
        bit += 2
  return codes


# ----------------------------------------------------------------------------- PHOG


@pytest.mark.parametrize("kind,expected_bins", [
    ("dark_to_light_right", (0,)),  # gradient points right: 0 degrees
    ("light_to_dark_right", (8,)),  # 180 degrees
    ("dark_to_light_down", (4,)),   # y grows downwards: 90 degrees
    ("vertical_line", (0, 8)),      # a thin bright line: both sides, opposite bins
    ("horizontal_line", (4, 12)),
])
def test_phog_straight_edge_falls_in_one_bin_and_its_opposite(kind, expected_bins):
  img = np.zeros((16, 20), np.float32)
  if kind == "dark_to_light_right":
    img[:, 9:] = 1.0
  elif kind == "light_to_dark_right":
    img[:, :9] = 1.0
  elif kind == "dark_to_light_down":
    img[7:, :] = 1.0
  elif kind == "vertical_line":
    img[:, 9] = 1.0
  else:
    img[7, :] = 1.0
  h = np.asarray(features.phog(img[None], levels=2, normalize=False))[0]
  per_bin = h.reshape(-1, 16).sum(axis=0)
  assert set(np.flatnonzero(per_bin)) == set(expected_bins)
  if len(expected_bins) == 2:
    np.testing.assert_allclose(per_bin[expected_bins[0]], per_bin[expected_bins[1]])
  normed = np.asarray(features.phog(img[None], levels=2))[0]
  np.testing.assert_allclose(normed.sum(), 1.0, rtol=1e-5)


def test_phog_levels_are_sums_of_their_cells():
  img = np.random.default_rng(0).random((13, 17)).astype(np.float32)
  h = np.asarray(features.phog(img[None], levels=2, normalize=False))[0]
  l0, l1, l2 = h[:16], h[16:80].reshape(2, 2, 16), h[80:].reshape(4, 4, 16)
  np.testing.assert_allclose(l0, l1.sum(axis=(0, 1)), rtol=1e-5)
  np.testing.assert_allclose(l1, l2.reshape(2, 2, 2, 2, 16).sum(axis=(1, 3)), rtol=1e-5)
  assert h.shape == (16 * (1 + 4 + 16),)


def test_phog_matches_a_loop_reference_and_vmap_matches_one_at_a_time():
  images = np.random.default_rng(1).random((3, 11, 9)).astype(np.float32)
  batch = np.asarray(features.phog(images, bins=8, levels=2, normalize=False))
  for k in range(3):
    np.testing.assert_allclose(batch[k], _phog_reference(images[k], 8, 2), rtol=1e-4, atol=1e-6)
    single = np.asarray(features.phog(images[k:k + 1], bins=8, levels=2, normalize=False))[0]
    np.testing.assert_allclose(batch[k], single, rtol=1e-6)


def test_phog_rejects_bad_input():
  with pytest.raises(ValueError, match="too small"):
    features.phog(np.zeros((1, 4, 4), np.float32), levels=3)
  with pytest.raises(ValueError, match=r"\(N, H, W\)"):
    features.phog(np.zeros((4, 4), np.float32))
  with pytest.raises(ValueError, match="NaN"):
    features.phog(np.full((1, 8, 8), np.nan, np.float32))


# ----------------------------------------------------------------------------- LPQ


def test_lpq_of_a_constant_image_is_a_single_code():
  for value in (0.0, 0.37, 200.0):
    h = np.asarray(features.lpq(np.full((2, 20, 18, 3), value, np.float32), blocks=(4, 4)))
    for block in h.reshape(2 * 16, 256):
      assert np.count_nonzero(block) == 1
      np.testing.assert_allclose(block.sum(), 1.0)


def test_lpq_is_blur_invariant_but_tells_different_images_apart():
  images = np.stack([_texture(s) for s in range(6)])
  blurred = np.stack([_gauss_blur(im, 0.7) for im in images])
  a, b = np.asarray(features.lpq(images)), np.asarray(features.lpq(blurred))
  same = np.abs(a - b).sum(axis=1)
  different = [np.abs(a[i] - a[j]).sum() for i, j in itertools.combinations(range(6), 2)]
  assert same.max() < 0.3 * min(different), (same, sorted(different))


def test_lpq_codes_match_the_written_out_stft():
  img = np.random.default_rng(2).random((12, 11)).astype(np.float32)
  codes = np.asarray(features.lpq_codes(img[None], window=5, decorrelate=False))[0]
  np.testing.assert_array_equal(codes, _lpq_codes_reference(img, 5))
  counts = np.asarray(features.lpq(img[None], window=5, decorrelate=False, normalize=False))[0]
  np.testing.assert_array_equal(counts, np.bincount(codes.ravel(), minlength=256))


def test_lpq_blocks_and_vmap_agree_with_one_image_at_a_time():
  images = np.random.default_rng(3).random((3, 23, 21)).astype(np.float32)
  h = np.asarray(features.lpq(images, blocks=(4, 4), normalize=False))
  codes = np.asarray(features.lpq_codes(images))
  rows, cols = codes.shape[1:]
  for k in range(3):
    expected = []
    for by in range(4):
      for bx in range(4):
        block = codes[k][(np.arange(rows) * 4 // rows) == by][:, (np.arange(cols) * 4 // cols) == bx]
        expected.append(np.bincount(block.ravel(), minlength=256))
    np.testing.assert_array_equal(h[k], np.concatenate(expected))
    single = np.asarray(features.lpq(images[k:k + 1], blocks=(4, 4), normalize=False))[0]
    np.testing.assert_array_equal(h[k], single)


def test_lpq_rejects_bad_input():
  with pytest.raises(ValueError, match="smaller than the LPQ window"):
    features.lpq(np.zeros((1, 5, 9), np.float32))
  with pytest.raises(ValueError, match="blocks"):
    features.lpq(np.zeros((1, 9, 9), np.float32), blocks=(0, 1))
  with pytest.raises(ValueError, match="cannot fill"):
    features.lpq(np.zeros((1, 9, 9), np.float32), blocks=(4, 4))


# ----------------------------------------------------------------------------- features


def test_features_of_the_bundled_images_are_finite_and_learnable():
  ds = data.load_images(size=(24, 24), max_per_class=30)
  x, info = features.extract_features(ds.x, batch_size=64)
  assert x.shape == (len(ds), 10) and np.all(np.isfinite(x))
  assert info["lpq_size"] == 256 and info["phog_size"] == 16 * 85
  assert info["fitted_on"] == f"all {len(ds)} images"
  feats = data.Dataset(x, ds.y, ds.class_names)
  train, test = data.train_test_split(feats, test_fraction=0.3, seed=0)
  train, test, _ = data.standardize_split(train, test)
  model = jaxprune.MLP(in_features=10, hidden=(20,), out_features=7)
  params = model.init(jax.random.key(0))
  params, _ = jaxprune.fit(model, params, train.x, train.y, key=jax.random.key(1), epochs=150,
                           learning_rate=0.01, progress=False)
  acc = jaxprune.accuracy(model, params, test.x, test.y)
  assert acc > 2.0 / 7.0, acc  # chance is 1/7


def test_extract_features_needs_enough_images():
  with pytest.raises(ValueError, match="at least 5 images"):
    features.extract_features(np.random.default_rng(0).random((3, 16, 16)).astype(np.float32))


def test_identical_images_have_no_principal_components_to_fit():
  """Identical frames (all black): scikit-learn's PCA divided 0 by 0, so every feature was 0 and
  the explained variance NaN, without a word. One image that differs is enough."""
  with pytest.raises(ValueError, match=r"All 6 images have the same descriptor \(identical "
                     "frames"):
    features.extract_features(np.zeros((6, 16, 16), np.float32))
  descriptors = np.ones((6, 4))
  with pytest.raises(ValueError, match="same descriptor"):
    features.fit_pca(descriptors, 2)
  descriptors[3, 1] = 2.0
  assert features.fit_pca(descriptors, 2).explained_variance_ratio_[0] == 1.0


def test_describe_reports_progress_after_every_batch():
  images = np.random.default_rng(0).random((11, 16, 16), dtype=np.float32)
  calls = []
  lpq_d, phog_d = features.describe(images, batch_size=4,
                                    progress=lambda done, total: calls.append((done, total)))
  assert calls == [(4, 11), (8, 11), (11, 11)]
  assert lpq_d.shape == (11, 256) and phog_d.shape == (11, 1360)
