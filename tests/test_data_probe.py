"""Probe tests of the data layer: row indices, scaling blocks, sizes, clipping ranges, and the
errors for an SFEW path that points one level too deep (tiny files written here)."""

import numpy as np
import pytest
from PIL import Image

from jaxprune import data

CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]


def _tiny(n=10):
  names = [f"Movie_{i:03d}_{i % 5:08d}.png" for i in range(n)]
  return data.Dataset(np.arange(n, dtype=np.float32)[:, None], np.arange(n) % 2, ("a", "b"),
                      info={"names": names})


# ----------------------------------------------------------------------------- row indices


def test_split_sees_negative_indices_as_the_rows_they_name():
  ds = _tiny()
  # -10 is row 0 of 10: a test part holding it is not held out from a train part with row 0.
  with pytest.raises(ValueError, match=r"in both train and test, e\.g\. rows \[0\]"):
    data.split(ds, np.arange(9), [-10])
  with pytest.raises(ValueError, match="in both train and test"):
    data.cross_validate(lambda tr, te, f: {"n": len(te)}, ds,
                        folds=[(np.arange(0, 9), np.array([-10]))])
  # Disjoint negative indices are fine and pick the rows NumPy would.
  train, test = data.split(ds, [0, 1, 2], [-1, -2])
  assert test.x.ravel().tolist() == [9.0, 8.0]
  assert test.info["names"] == ("Movie_009_00000004.png", "Movie_008_00000003.png")
  assert train.x.ravel().tolist() == [0.0, 1.0, 2.0]


def test_split_of_digits_features_refits_on_the_rows_negative_indices_name():
  ds = data.load_features("digits")
  n = len(ds)
  train_pos, test_pos = np.arange(0, n - 200), np.arange(n - 200, n)
  a_tr, a_te = data.split(ds, train_pos, test_pos)
  b_tr, b_te = data.split(ds, train_pos - n, test_pos - n)   # the same rows, counted from the end
  np.testing.assert_array_equal(a_tr.x, b_tr.x)
  np.testing.assert_array_equal(a_te.x, b_te.x)


def test_split_accepts_boolean_masks():
  ds = _tiny()
  mask = np.arange(10) < 7
  train, test = data.split(ds, mask, ~mask)
  assert train.x.ravel().tolist() == list(range(7))
  assert test.x.ravel().tolist() == [7.0, 8.0, 9.0]


def test_fractional_indices_are_refused_not_truncated():
  ds = _tiny()
  with pytest.raises(IndexError, match=r"whole row numbers.*0\.7"):
    ds.subset(np.array([0.7, 2.9]))   # used to give rows 0 and 2 without a word
  with pytest.raises(IndexError, match="whole row numbers"):
    data.split(ds, [0.5, 1.0], [3.0])
  # Whole numbers stored as floats, and empty index lists, still work.
  assert ds.subset(np.array([0.0, 2.0])).x.ravel().tolist() == [0.0, 2.0]
  assert len(ds.subset([])) == 0
  with pytest.raises(IndexError, match="out of range"):
    ds.subset([10])


# ----------------------------------------------------------------------------- scaling blocks


def test_one_block_given_as_a_bare_pair_gets_a_clear_error():
  x = np.arange(30.0).reshape(3, 10)
  with pytest.raises(ValueError, match=r"single pair: for one block pass \(\(0, 5\),\)"):
    data.fit_standardizer(x, blocks=(0, 5))
  with pytest.raises(ValueError, match="two ints"):
    data.fit_standardizer(x, blocks=((0, 5.5),))


def test_empty_blocks_are_refused_rather_than_scaling_nothing():
  x = np.random.default_rng(0).normal(3.0, 2.0, (20, 4))
  with pytest.raises(ValueError, match="blocks is empty"):
    data.fit_standardizer(x, blocks=())
  train = data.Dataset(x, np.arange(20) % 2, ("a", "b"))
  with pytest.raises(ValueError, match="blocks is empty"):
    data.standardize_split(train, train, blocks=[])
  # Blocks as lists (e.g. read back from JSON) still scale: each block by its own scalar.
  mean, std = data.fit_standardizer(x, blocks=[[0, 2], [2, 4]])
  np.testing.assert_allclose(mean, np.repeat([x[:, :2].mean(), x[:, 2:].mean()], 2), rtol=1e-6)
  np.testing.assert_allclose(std, np.repeat([x[:, :2].std(), x[:, 2:].std()], 2), rtol=1e-6)


# ----------------------------------------------------------------------------- bundled sizes


@pytest.mark.parametrize("size", [None, 16, (16,), ("16", 16), (16, 0), (True, 8)])
def test_bundled_images_bad_size_names_the_setting(size):
  with pytest.raises(ValueError, match=r"size must be \(height, width\), two positive ints"):
    data.load_images(size=size)


def test_bundled_images_bad_max_per_class_names_the_setting():
  with pytest.raises(ValueError, match="max_per_class must be a positive int"):
    data.load_images(size=(8, 8), max_per_class=2.5)
  assert data.load_images(size=(8, 8), max_per_class=np.int64(2)).x.shape == (14, 8, 8, 1)


def test_resize_images_wrong_rank_names_the_layout():
  with pytest.raises(ValueError, match=r"\(N, H, W, C\).*\(8, 8\)"):
    data.resize_images(np.ones((8, 8), np.float32), (4, 4))


# ----------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("value_range", [(1.0, 0.0), (0.5, 0.5), (0.0, float("nan"))])
def test_augment_refuses_a_reversed_value_range(value_range):
  import jax  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).random((2, 5, 4, 1)).astype(np.float32)
  # jnp.clip(x, 1, 0) sets every pixel to 0: a silent blank batch.
  with pytest.raises(ValueError, match="low < high"):
    data.augment(x, key=jax.random.key(0), value_range=value_range)
  with pytest.raises(ValueError, match="low < high"):
    data.augment_image(x[0], key=jax.random.key(0), value_range=value_range)


# ----------------------------------------------------------------------------- SFEW paths


def _tree(root):
  rng = np.random.default_rng(0)
  for k, c in enumerate(CLASSES):
    (root / c).mkdir(parents=True)
    for i in range(2):
      Image.fromarray(rng.integers(0, 256, (6, 5), dtype=np.uint8)).save(
          root / c / f"Movie_{k:03d}_{i:08d}.png")
  return root


def test_sfew_images_path_of_one_class_folder_names_the_parent(tmp_path):
  root = _tree(tmp_path / "SFEW")
  with pytest.raises(FileNotFoundError,
                     match=r"Angry/ is itself a class folder: pass the folder that holds"):
    data.load_sfew_images(root / "Angry", expected_size=None)
  try:
    data.load_sfew_images(root / "Angry", expected_size=None)
  except FileNotFoundError as e:
    assert f"--data_path={root.resolve()} " in str(e)
  # The parent loads.
  assert len(data.load_sfew_images(root, size=(6, 5), expected_size=None)) == 14


def test_a_frame_copied_into_a_second_class_folder_is_reported(tmp_path, caplog):
  """One frame in two class folders loaded as two rows with other labels without a word (the
  features loader reports repeated image names): it is logged and listed in
  info['duplicates']."""
  root = _tree(tmp_path / "SFEW")
  clean = data.load_sfew_images(root, size=(6, 5), expected_size=None)
  assert clean.info["duplicates"] == []
  (root / "Sad" / "Movie_000_00000001.png").write_bytes(
      (root / "Angry" / "Movie_000_00000001.png").read_bytes())
  with caplog.at_level("WARNING"):
    ds = data.load_sfew_images(root, size=(6, 5), expected_size=None)
  assert len(ds) == 15
  assert ds.info["duplicates"] == [{"name": "Movie_000_00000001.png",
                                    "paths": ["Angry/Movie_000_00000001.png",
                                              "Sad/Movie_000_00000001.png"]}]
  assert "more than one class folder" in caplog.text


def test_sfew_features_folder_with_another_file_name_names_it(tmp_path):
  (tmp_path / "SFEW_features.xlsx").write_bytes(b"PK")
  (tmp_path / "notes.md").write_text("x")
  with pytest.raises(FileNotFoundError, match=r"It holds SFEW_features\.xlsx: pass the path"):
    data.load_sfew_features(tmp_path)


# ----------------------------------------------------------------------------- TFDS images


def _png_rgb16(path, rgb16):
  """Writes ``rgb16`` ((h, w, 3) uint16) as a 48-bit RGB PNG, by hand (PIL cannot write one)."""
  import struct  # pylint: disable=g-import-not-at-top
  import zlib  # pylint: disable=g-import-not-at-top

  def chunk(kind, body):
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

  h, w, _ = rgb16.shape
  rows = b"".join(b"\x00" + rgb16[r].astype(">u2").tobytes() for r in range(h))
  ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)   # 16 bits, colour type 2 (RGB)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                   + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _png_chunks(raw):
  """The chunk types of a PNG file, in order."""
  import struct  # pylint: disable=g-import-not-at-top
  kinds, at = [], 8
  while at < len(raw):
    (length,) = struct.unpack(">I", raw[at:at + 4])
    kinds.append(raw[at + 4:at + 8])
    at += 12 + length
  return kinds


def test_tfds_images_stores_deep_or_transparent_rgb_pngs_as_plain_8_bit_rgb(tmp_path):
  """TFDS decodes the stored bytes with OpenCV when it is installed (the [face] extra): a
  48-bit RGB PNG stored as it is decodes to its 16-bit values cast to uint8 (the low byte,
  noise), and an RGB PNG with a tRNS chunk to 4 channels. So only plain 8-bit RGB PNGs may be
  stored as they are: every stored frame must be one, with the frame's values."""
  import io  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from jaxprune.data import sfew_tfds  # pylint: disable=g-import-not-at-top
  manual = _tree(tmp_path / "manual")
  rng = np.random.default_rng(3)
  deep = rng.integers(0, 65536, (6, 5, 3)).astype(np.uint16)
  _png_rgb16(manual / "Angry" / "Movie_000_00000000.png", deep)
  plain = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
  Image.fromarray(plain).save(manual / "Happy" / "Movie_003_00000000.png",
                              transparency=(1, 2, 3))
  ds = sfew_tfds.load_sfew_tfds("images", data_dir=tmp_path / "tfds", manual_dir=manual)
  assert len(ds) == 14
  source = tfds.builder("sfew/images", data_dir=tmp_path / "tfds").as_data_source(
      decoders={"image": tfds.decode.SkipDecoding()})["train"]
  stored = {}
  for i in range(len(source)):
    e = source[i]
    raw = e["image"]
    assert raw[24] == 8 and raw[25] == 2, "not an 8-bit RGB PNG"   # IHDR bit depth, colour type
    assert b"tRNS" not in _png_chunks(raw)
    name = e["name"].decode() if isinstance(e["name"], bytes) else e["name"]
    stored[name] = np.asarray(Image.open(io.BytesIO(raw)), np.float64)
  # The 16-bit frame holds its values in 8 bits (within one step of 255 / 65535 scaling).
  np.testing.assert_allclose(stored["Angry/Movie_000_00000000.png"], deep * (255.0 / 65535.0),
                             atol=1.0)
  np.testing.assert_array_equal(stored["Happy/Movie_003_00000000.png"], plain)


def test_augment_with_a_batch_of_keys_says_to_pass_one():
  import jax  # pylint: disable=g-import-not-at-top
  x = np.zeros((3, 5, 4, 1), np.float32)
  for keys in (jax.random.split(jax.random.key(0), 3), jax.random.split(jax.random.PRNGKey(0), 3)):
    with pytest.raises(ValueError, match=r"augment takes one key, got a batch of keys.*pass a single key"):
      data.augment(x, key=keys)
  with pytest.raises(ValueError, match="augment_image takes one key.*jax.vmap augment_image"):
    data.augment_image(x[0], key=jax.random.split(jax.random.key(0), 3))
  with pytest.raises(TypeError, match=r"key must be a PRNG key made by jax.random.key"):
    data.augment(x, key=0)
  # (One key, typed or raw, and augment_image vmapped over keys work: test_data_augment.py.)


# ----------------------------------------------------------------------------- SFEW features


def test_repeated_image_names_are_reported(tmp_path, caplog):
  header = ",".join(["name", "label"] + [f"LPQ feature {i}" for i in range(1, 6)]
                    + [f"PHOG feature {i}" for i in range(1, 6)])
  lines = [header]
  for k in range(7):
    for i in range(2):
      lines.append(f"Movie_{k}_{i:08d}.mat,{k + 1}," + ",".join(["0.5"] * 10))
  lines.append(lines[3])   # the row of Movie_1_00000000.mat again (spreadsheet rows 4 and 16)
  path = tmp_path / "SFEW.csv"
  path.write_text("\n".join(lines) + "\n")
  with caplog.at_level("WARNING"):
    ds = data.load_sfew_features(path)
  assert len(ds) == 15   # kept: the loader reports, the user decides
  assert ds.info["duplicates"] == [{"name": "Movie_1_00000000.mat", "rows": [4, 16]}]
  assert "more than one row" in caplog.text and "Movie_1_00000000.mat" in caplog.text
  path.write_text("\n".join(lines[:-1]) + "\n")
  assert data.load_sfew_features(path).info["duplicates"] == []


# ----------------------------------------------------------------------------- LPQ


def _lpq_codes_conv2(img, window, decorrelate):
  """The reference code's LPQ codes, written from its description: separable 'valid'
  *convolutions* (MATLAB's conv2) with w0 = 1 and w1 = exp(-2 pi i x / window) at the four
  frequencies, then (optionally) the whitening of a rho = 0.9 Markov model, and the signs."""
  from scipy.signal import convolve2d  # pylint: disable=g-import-not-at-top
  x = np.arange(window) - (window - 1) / 2
  w0 = np.ones(window, complex)
  w1 = np.exp(-2j * np.pi * x / window)
  pairs = [(w0, w1), (w1, w0), (w1, w1), (w1, np.conj(w1))]   # (vertical, horizontal)
  resp = []
  for wy, wx in pairs:
    f = convolve2d(convolve2d(img, wy[:, None], "valid"), wx[None, :], "valid")
    resp += [f.real, f.imag]
  resp = np.stack(resp, -1)
  if decorrelate:
    yy, xx = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
    pts = np.stack([yy.ravel(), xx.ravel()], 1)
    cov = 0.9 ** np.sqrt(((pts[:, None] - pts[None]) ** 2).sum(-1))
    m = np.stack(sum([[np.outer(wy, wx).real.ravel(), np.outer(wy, wx).imag.ravel()]
                      for wy, wx in pairs], []))
    a = np.diag(1 + 1e-6 * np.arange(7, -1, -1))
    _, _, vt = np.linalg.svd(a @ (m @ cov @ m.T) @ a)
    resp = resp @ vt.T
  return ((resp > 0) * (2 ** np.arange(8))).sum(-1)


@pytest.mark.parametrize("decorrelate", [False, True])
def test_lpq_codes_are_the_conv2_reference_codes_up_to_a_fixed_relabelling(decorrelate):
  from jaxprune.data import features  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  images = rng.random((2, 16, 13)).astype(np.float32)
  mine = np.asarray(features.lpq_codes(images, window=5, decorrelate=decorrelate))
  ref = np.stack([_lpq_codes_conv2(im.astype(np.float64), 5, decorrelate) for im in images])
  relabel = np.unique(mine ^ ref)
  assert relabel.size == 1, relabel    # one XOR constant for every pixel of every image
  hist_mine = np.stack([np.bincount(c.ravel(), minlength=256) for c in mine])
  hist_ref = np.stack([np.bincount(c.ravel() ^ relabel[0], minlength=256) for c in ref])
  np.testing.assert_array_equal(hist_mine, hist_ref)   # the same histogram, bins permuted


def _with_dimension(src, dst, ref):
  """Copies the workbook ``src`` to ``dst`` with its first sheet's stored dimension set to
  ``ref`` (as some writers store a wrong used range)."""
  import re  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
    for item in zin.infolist():
      body = zin.read(item.filename)
      if item.filename == "xl/worksheets/sheet1.xml":
        text, n = re.subn(r'<dimension ref="[^"]*"', f'<dimension ref="{ref}"', body.decode())
        assert n == 1
        body = text.encode()
      zout.writestr(item, body)


@pytest.mark.parametrize("ref", ["A1:L20", "A1:A1", "A1:F29"])
def test_xlsx_with_a_wrong_stored_dimension_loads_every_row_and_column(tmp_path, ref):
  import openpyxl  # pylint: disable=g-import-not-at-top
  book = openpyxl.Workbook()
  sheet = book.active
  sheet.append([None, "label"] + [f"LPQ feature {i}" for i in range(1, 6)]
               + [f"PHOG feature {i}" for i in range(1, 6)])
  expected = {}
  for r in range(28):   # classes in turn, so that any first rows hold every class
    name, values = f"Movie_{r:03d}_{r % 5:08d}.mat", [r + j / 16 for j in range(10)]
    sheet.append([name, r % 7 + 1] + values)
    expected[name] = (r % 7, values)
  book.save(tmp_path / "good.xlsx")
  _with_dimension(tmp_path / "good.xlsx", tmp_path / "SFEW.xlsx", ref)
  # A1:L20 cut the sheet to 19 data rows (all seven classes: no error, 9 rows lost silently);
  # A1:A1 and A1:F29 to fewer columns (a valid file refused as missing columns).
  ds = data.load_sfew_features(tmp_path / "SFEW.xlsx")
  assert len(ds) == 28 and ds.info["dropped"] == []
  for i, name in enumerate(ds.info["names"]):
    assert ds.y[i] == expected[name][0]
    np.testing.assert_array_equal(ds.x[i], np.float32(expected[name][1]))


def test_sfew_images_folder_holding_only_an_archive_says_to_unpack_it(tmp_path):
  (tmp_path / "SFEW.zip").write_bytes(b"PK\x03\x04")
  with pytest.raises(FileNotFoundError, match=r"archive\(s\) SFEW\.zip: unpack the class folders"):
    data.load_sfew_images(tmp_path)


def test_stratified_split_refuses_a_training_part_without_a_rare_class():
  """98 examples of class 0 and 2 of class 1 at test_fraction=0.8: the training part of 20 holds
  2 examples in total (one per class is possible) but class 1's share is 20 * 2 / 100 = 0.4,
  rounded to 0, so it had no training example and no error was raised."""
  y = np.repeat([0, 1], [98, 2])
  with pytest.raises(ValueError, match=r"training part of 20 examples has no example of class 1 "
                     r"\(2 of 100 examples\).*smaller test_fraction \(a test_fraction from 0\.02 "
                     r"to 0\.49 gives every class a training example\)"):
    data.train_test_split(y, test_fraction=0.8, seed=0)
  # the bounds, by hand: 2 test examples (one per class) need ceil(100 f) >= 2; class 1's share
  # n_train * 2 / 100 must reach 1, so n_train >= 51
  for f in (0.02, 0.3, 0.49):
    for seed in range(4):
      train, test = data.train_test_split(y, test_fraction=f, seed=seed)
      assert set(y[train].tolist()) == {0, 1}
      assert len(test) == int(np.ceil(f * 100)) and len(train) + len(test) == 100


def test_kfold_refuses_a_class_of_one_example():
  """A class with one example sits in one test fold, whose training part then lacks it (only
  scikit-learn's warning said so); two examples put it in every training part."""
  y = np.r_[np.repeat([0, 1], 10), 2]
  ds = data.Dataset(np.zeros((21, 2), np.float32), y, ["a", "b", "rare"])
  with pytest.raises(ValueError, match=r"class 'rare' has one example only, so the fold that "
                     r"tests it trains a model that never sees it"):
    data.kfold(ds, n_splits=5, seed=0)
  y2 = np.r_[y, 2]
  for train, _ in data.kfold(y2, n_splits=2, seed=0):
    assert set(y2[train]) == {0, 1, 2}
