"""Tests of the SFEW loaders and the TFDS builder, on tiny files written here.

The files follow the SFEW layouts: a spreadsheet/CSV (image name, label, 5 LPQ,
5 PHOG, one row with a missing PHOG value, as in SFEW) and a class-folder tree
of PNG frames.
"""

import csv
import logging
import sys
import types

import numpy as np
import openpyxl
import pytest
from PIL import Image

from conftest import FakeCascade
from jaxprune import data

HEADER = [None, "label"] + [f"LPQ feature {i}" for i in range(1, 6)] + [
    f"PHOG feature {i}" for i in range(1, 6)]
COUNTS = [4, 3, 4, 4, 4, 4, 4]  # disgust is smaller, as in SFEW
MISSING_ROW = COUNTS[0] + COUNTS[1] + 1  # a fear row, 0-based among data rows
MISSING_COL = 9  # PHOG feature 3
FOLDERS = ["Angry", "disgust", "FEAR", "Happy", "neutral", "Sad", "SURPRISE"]
H, W = 12, 15


def _rows(seed=0):
  rng = np.random.default_rng(seed)
  rows = []
  for label, n in enumerate(COUNTS):
    for j in range(n):
      person = (label * 3 + j) % 9 + 1
      name = f"Movie{label}_{j:09d}_{person:08d}.mat"
      rows.append([name, label + 1, *rng.normal(2.0, 3.0, 5).tolist(),
                   *rng.normal(-1.0, 0.5, 5).tolist()])
  rows[MISSING_ROW][MISSING_COL] = None
  return rows


def write_csv(path, rows, header=HEADER):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    if header is not None:
      writer.writerow(["" if h is None else h for h in header])
    for row in rows:
      writer.writerow(["" if v is None else v for v in row])
  return path


def write_xlsx(path, rows, header=HEADER, sheets=("SFEW.csv",)):
  book = openpyxl.Workbook()
  book.remove(book.active)
  for title in sheets:
    sheet = book.create_sheet(title)
    if header is not None:
      sheet.append(header)
    for row in rows:
      sheet.append(row)
  book.save(path)
  return path


def write_tree(root, counts=(3, 2, 3, 3, 3, 3, 3), size=(H, W), box=False, seed=0):
  rng = np.random.default_rng(seed)
  root.mkdir(parents=True, exist_ok=True)
  for label, (folder, n) in enumerate(zip(FOLDERS, counts)):
    (root / folder).mkdir(exist_ok=True)
    for j in range(n):
      pixels = rng.integers(0, 200, size=(*size, 3), dtype=np.uint8)
      if box and j % 2 == 0:
        pixels[2:7, 3:9] = 255  # the "face" the fake detector finds
      name = f"Movie{label}_{j:09d}_{(label + j) % 4 + 1:08d}.png"
      Image.fromarray(pixels).save(root / folder / name)
  return root


@pytest.fixture
def csv_file(tmp_path):
  return write_csv(tmp_path / "SFEW.csv", _rows())


@pytest.fixture
def xlsx_file(tmp_path):
  return write_xlsx(tmp_path / "SFEW.xlsx", _rows())


@pytest.fixture
def tree(tmp_path):
  return write_tree(tmp_path / "sfew")


# ---------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------


def _check_features(ds, rows):
  kept = [r for i, r in enumerate(rows) if i != MISSING_ROW]
  assert len(ds) == sum(COUNTS) - 1 and ds.x.shape == (len(kept), 10)
  expected_counts = list(COUNTS)
  expected_counts[2] -= 1
  assert ds.class_counts().tolist() == expected_counts
  np.testing.assert_array_equal(ds.y, [r[1] - 1 for r in kept])
  np.testing.assert_allclose(ds.x, np.array([r[2:] for r in kept], np.float32),
                             rtol=1e-6)
  assert ds.info["names"] == tuple(r[0] for r in kept)
  np.testing.assert_array_equal(ds.groups, [r[0].split("_")[-1][:-4] for r in kept])
  assert ds.class_names == data.SFEW_CLASS_NAMES
  assert ds.info["num_dropped"] == 1
  (dropped,) = ds.info["dropped"]
  assert dropped["row"] == MISSING_ROW + 2  # header is row 1
  assert dropped["name"] == rows[MISSING_ROW][0]
  assert "PHOG feature 3" in dropped["reason"]
  assert ds.info["blocks"] == ((0, 5), (5, 10))


def test_csv_and_xlsx_load_the_same(csv_file, xlsx_file, caplog):
  rows = _rows()
  with caplog.at_level(logging.WARNING):
    from_csv = data.load_sfew_features(csv_file)
  assert "dropped 1 row" in caplog.text and rows[MISSING_ROW][0] in caplog.text
  from_xlsx = data.load_sfew_features(xlsx_file)
  _check_features(from_csv, rows)
  _check_features(from_xlsx, rows)
  np.testing.assert_array_equal(from_csv.x, from_xlsx.x)


def test_a_formula_without_its_value_is_named_not_read_as_a_missing_cell(tmp_path):
  """A workbook written by openpyxl or pandas stores formulas without their values: such a
  cell read as empty, so its row was dropped as 'missing LPQ feature 4' (and a workbook of
  formulas failed with 'no complete rows'). The cell and the fix are named now; a missing
  value that is no formula still drops its row."""
  rows = _rows()
  rows[2][5] = "=0.5*4"
  path = write_xlsx(tmp_path / "f.xlsx", rows)
  with pytest.raises(ValueError, match=r"f.xlsx: cell F4 holds a formula \(=0.5\*4\) but no "
                     "value: .* Open it in Excel or LibreOffice and save it"):
    data.load_sfew_features(path)
  rows[2][5] = 2.0
  _check_features(data.load_sfew_features(write_xlsx(tmp_path / "g.xlsx", rows)), rows)


def test_folder_path_and_dispatch(xlsx_file):
  ds = data.load_sfew_features(xlsx_file.parent)
  assert ds.info["path"].endswith("SFEW.xlsx")
  assert len(data.load("sfew_features", path=xlsx_file.parent)) == len(ds)


def test_normalisation_statistics(csv_file):
  ds = data.load_sfew_features(csv_file)
  train, test = data.train_test_split(ds, test_fraction=0.25, seed=0)
  # Per descriptor block: one scalar mean/std for LPQ and one for PHOG.
  tr, te, scaler = data.standardize_split(train, test, blocks=ds.info["blocks"])
  np.testing.assert_allclose(scaler.mean[:5], train.x[:, :5].mean(), rtol=1e-5)
  np.testing.assert_allclose(scaler.std[5:], train.x[:, 5:].std(), rtol=1e-5)
  for block in (slice(0, 5), slice(5, 10)):
    assert abs(tr.x[:, block].mean()) < 1e-5
    assert abs(tr.x[:, block].std() - 1) < 1e-5
  np.testing.assert_allclose(te.x, (test.x - scaler.mean) / scaler.std, rtol=1e-5)
  # Global per-feature z-score.
  tr, _, _ = data.standardize_split(train, test)
  np.testing.assert_allclose(tr.x.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(tr.x.std(0), 1, atol=1e-4)


def test_person_independent_split_of_sfew(csv_file):
  ds = data.load_sfew_features(csv_file)
  for tr, te in data.kfold(ds, n_splits=3, seed=0, person_independent=True):
    assert not set(ds.groups[tr]) & set(ds.groups[te])


def test_labels_as_class_names_and_headerless(tmp_path):
  rows = _rows()
  for row in rows:
    row[1] = data.SFEW_CLASS_NAMES[row[1] - 1].upper() if row[1] % 2 else \
        data.SFEW_CLASS_NAMES[row[1] - 1].capitalize()
  ds = data.load_sfew_features(write_csv(tmp_path / "names.csv", rows))
  _check_features(ds, _rows())
  ds = data.load_sfew_features(write_csv(tmp_path / "bare.csv", _rows(), header=None))
  assert len(ds) == sum(COUNTS) - 1 and ds.info["header"] is None
  assert ds.info["dropped"][0]["row"] == MISSING_ROW + 1


def test_a_feature_beyond_float32_is_refused_not_loaded_as_infinity(tmp_path):
  """1e40 is a finite float64 but infinity in the float32 features: it loaded as inf, and
  standardising failed later naming no cell."""
  rows = _rows()
  rows[2][4] = "1e40"
  path = write_csv(tmp_path / "big.csv", rows)
  with pytest.raises(ValueError, match=r"row 4 .*column 5 \(LPQ feature 3\): '1e40' is not a "
                     r"finite number in float32"):
    data.load_sfew_features(path)
  rows[2][4] = "3e38"   # within range: loads
  assert np.isfinite(data.load_sfew_features(write_csv(tmp_path / "ok.csv", rows)).x).all()


@pytest.mark.parametrize("strict", [True, False])
def test_headerless_file_with_a_typo_in_its_first_row(tmp_path, strict):
  rows = _rows()
  rows[0][4] = "0.1x"  # LPQ feature 3 of the first data row
  path = write_csv(tmp_path / "bare.csv", rows, header=None)
  with pytest.raises(ValueError, match=r"row 1 \(Movie0_\S+\), column 5 \(LPQ feature 3\): "
                     r"'0.1x' is not a finite number"):
    data.load_sfew_features(path, strict_header=strict)
  with pytest.raises(ValueError, match=r"row 2 .*column 5 \(LPQ feature 3\): '0.1x'"):
    data.load_sfew_features(write_csv(tmp_path / "h.csv", rows), strict_header=strict)
  renamed = [None, "y"] + [f"f{i}" for i in range(10)]  # other names: still a header
  ds = data.load_sfew_features(write_csv(tmp_path / "r.csv", _rows(), header=renamed),
                               strict_header=False)
  assert len(ds) == sum(COUNTS) - 1 and ds.info["header"][1] == "y"
  partly_numeric = ["img", "emo"] + [f"lpq{i}" for i in range(1, 6)] + [str(i) for i in range(1, 6)]
  ds = data.load_sfew_features(write_csv(tmp_path / "p.csv", _rows(), header=partly_numeric),
                               strict_header=False)
  assert len(ds) == sum(COUNTS) - 1 and ds.info["header"][1] == "emo"
  rows = _rows()
  rows[0][1] = "angy"  # a misspelt label in a headerless file's first row: a data row
  with pytest.raises(ValueError, match=r"row 1 .*'angy'"):
    data.load_sfew_features(write_csv(tmp_path / "l.csv", rows, header=None),
                            strict_header=strict)


def test_blank_rows_and_trailing_columns_are_reported(tmp_path):
  rows = _rows()
  rows.insert(3, [None] * 12)
  rows = [r + [None] for r in rows]
  ds = data.load_sfew_features(write_xlsx(tmp_path / "SFEW.xlsx", rows,
                                          header=HEADER + [None]))
  assert len(ds) == sum(COUNTS) - 1 and ds.info["blank_rows"] == [5]


def test_sheet_choice(tmp_path):
  path = write_xlsx(tmp_path / "two.xlsx", _rows(), sheets=("notes", "SFEW.csv"))
  assert len(data.load_sfew_features(path)) == sum(COUNTS) - 1
  path = write_xlsx(tmp_path / "amb.xlsx", _rows(), sheets=("a", "b"))
  with pytest.raises(ValueError, match=r"pass sheet=\.\.\. to load_sfew_features.*binaries"
                     r".*named SFEW or SFEW.csv.*as --data_path"):
    data.load_sfew_features(path)
  assert len(data.load_sfew_features(path, sheet="b")) == sum(COUNTS) - 1
  with pytest.raises(ValueError, match="no sheet 'c'"):
    data.load_sfew_features(path, sheet="c")


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"SFEW.xlsx.*LPQ feature"):
    data.load_sfew_features(tmp_path / "SFEW.xlsx")
  with pytest.raises(FileNotFoundError, match="No SFEW.xlsx or SFEW.csv"):
    data.load_sfew_features(tmp_path)


def test_missing_and_extra_columns(tmp_path):
  rows = [r[:11] for r in _rows()]
  path = write_csv(tmp_path / "short.csv", rows, header=HEADER[:11])
  with pytest.raises(ValueError, match=r"short.csv: missing columns: found 11"):
    data.load_sfew_features(path)
  rows = [r + [1.0] for r in _rows()]
  path = write_csv(tmp_path / "long.csv", rows, header=HEADER + ["extra"])
  with pytest.raises(ValueError, match="unexpected extra columns"):
    data.load_sfew_features(path)


def test_misnamed_columns(tmp_path):
  header = list(HEADER)
  header[6], header[7] = header[7], header[6]  # LPQ 5 and PHOG 1 swapped
  path = write_xlsx(tmp_path / "SFEW.xlsx", _rows(), header=header)
  with pytest.raises(ValueError, match=r"column 7 is 'PHOG feature 1', expected LPQ"):
    data.load_sfew_features(path)
  assert len(data.load_sfew_features(path, strict_header=False)) == sum(COUNTS) - 1
  header = list(HEADER)
  header[1] = "lable"
  path = write_csv(tmp_path / "lable.csv", _rows(), header=header)
  with pytest.raises(ValueError, match="column 2 is 'lable'"):
    data.load_sfew_features(path)
  header = list(HEADER)
  header[4] = "LPQ feature 9"
  path = write_csv(tmp_path / "num.csv", _rows(), header=header)
  with pytest.raises(ValueError, match="expected LPQ feature 3"):
    data.load_sfew_features(path)


@pytest.mark.parametrize("label", [8, 0, "contempt", 2.5])
def test_unknown_label(tmp_path, label):
  rows = _rows()
  rows[5][1] = label
  path = write_xlsx(tmp_path / "SFEW.xlsx", rows)
  with pytest.raises(ValueError, match=rf"row 7 \({rows[5][0]}\): unknown label"):
    data.load_sfew_features(path)


def test_non_numeric_feature(tmp_path):
  rows = _rows()
  rows[2][4] = "abc"
  path = write_csv(tmp_path / "SFEW.csv", rows)
  with pytest.raises(ValueError, match=r"row 4 .*column 5 \(LPQ feature 3\): 'abc'"):
    data.load_sfew_features(path)


def test_feature_file_errors_name_the_fix(tmp_path):
  """A Latin-1 export, decimal commas and Excel's #N/A (a missing value: dropped)."""
  rows = _rows()
  rows[0][0] = "Amélie_000000001_00000001.mat"
  latin = tmp_path / "latin.csv"
  write_csv(tmp_path / "u.csv", rows)
  latin.write_bytes((tmp_path / "u.csv").read_text(encoding="utf-8").encode("latin-1"))
  with pytest.raises(ValueError, match="not a UTF-8 text CSV.*save it again as UTF-8"):
    data.load_sfew_features(latin)
  rows = _rows()
  rows[2][4] = "0,1257"
  with pytest.raises(ValueError, match=r"'0,1257' is not a finite number; it has a decimal comma"):
    data.load_sfew_features(write_csv(tmp_path / "comma.csv", rows))
  rows = _rows()
  rows[2][4] = "#N/A"
  ds = data.load_sfew_features(write_csv(tmp_path / "na.csv", rows))
  assert 4 in {d["row"] for d in ds.info["dropped"]}


def test_empty_class(tmp_path):
  rows = [r for r in _rows() if r[1] != 2]
  path = write_csv(tmp_path / "SFEW.csv", rows)
  with pytest.raises(ValueError, match="class\\(es\\) disgust"):
    data.load_sfew_features(path)


def test_missing_label_and_name_are_dropped(tmp_path):
  rows = _rows()
  rows[0][1] = None
  rows[1][0] = None
  ds = data.load_sfew_features(write_csv(tmp_path / "SFEW.csv", rows))
  reasons = {d["row"]: d["reason"] for d in ds.info["dropped"]}
  assert reasons[2] == "missing label" and reasons[3] == "missing image name"
  assert len(ds) == sum(COUNTS) - 3


def test_bad_files(tmp_path):
  bad = tmp_path / "SFEW.xlsx"
  bad.write_text("not a workbook")
  with pytest.raises(ValueError, match="not a readable .xlsx"):
    data.load_sfew_features(bad)
  other = tmp_path / "SFEW.json"
  other.write_text("{}")
  with pytest.raises(ValueError, match="expected a .xlsx or .csv"):
    data.load_sfew_features(other)
  empty = tmp_path / "empty.csv"
  empty.write_text("")
  with pytest.raises(ValueError, match="empty"):
    data.load_sfew_features(empty)


def test_person_id_and_parse_label():
  assert data.person_id("Movie_000519240_00000005.mat") == "00000005"
  assert data.person_id("Angry/Movie_1_00000007.png") == "00000007"
  assert data.parse_label(1) == 0 and data.parse_label("7") == 6
  assert data.parse_label(" neutral ") == 4 and data.parse_label(3.0) == 2
  assert data.parse_label(True) is None and data.parse_label("x") is None


def test_header_error_gives_a_fix_a_binary_user_can_apply(tmp_path, capsys):
  """The header error said only 'pass strict_header=False', which no binary flag offers."""
  header = list(HEADER)
  header[1] = "Class label"
  path = write_csv(tmp_path / "SFEW.csv", _rows(), header=header)
  with pytest.raises(ValueError, match=r"column 2 is 'Class label'.*rename the header cells "
                     r"\(column 2 to 'label'.*'LPQ feature 1'.*'PHOG feature 5'\) or delete "
                     r"the header row; in Python, load_sfew_features\(\.\.\., "
                     r"strict_header=False\)"):
    data.load_sfew_features(path)
  # Both fixes work: the renamed header, and no header at all.
  header[1] = "label"
  assert len(data.load_sfew_features(write_csv(tmp_path / "a.csv", _rows(), header=header))) \
      == sum(COUNTS) - 1
  assert len(data.load_sfew_features(write_csv(tmp_path / "b.csv", _rows(), header=None))) \
      == sum(COUNTS) - 1


def test_folder_with_both_xlsx_and_csv_is_ambiguous(tmp_path):
  """A folder holding SFEW.xlsx and SFEW.csv silently loaded the workbook."""
  write_xlsx(tmp_path / "SFEW.xlsx", _rows())
  write_csv(tmp_path / "sfew.csv", _rows(seed=1))
  with pytest.raises(ValueError, match=r"holds SFEW.xlsx and sfew.csv.*ambiguous.*Pass the "
                     r"path of the file to read"):
    data.load_sfew_features(tmp_path)
  with pytest.raises(ValueError, match="ambiguous"):
    data.load("sfew_features", path=tmp_path)
  assert data.load_sfew_features(tmp_path / "sfew.csv").info["path"].endswith("sfew.csv")


def test_names_without_persons_give_no_groups(tmp_path, caplog):
  """Names outside SFEW's <movie>_<frame>_<person> naming gave nonsense persons (every
  'Angry1_face.png' was person 'face'), so a person-independent split found one person."""
  assert data.person_id("Angry1_face.png") is None
  assert data.person_id("smile.jpg") is None and data.person_id("0001.png") is None
  assert data.person_id("img_0001.png") == "0001"
  rows = _rows()
  for k, row in enumerate(rows):
    row[0] = f"face{k}_{'happy' if k % 2 else 'x'}.mat"
  with caplog.at_level(logging.WARNING):
    ds = data.load_sfew_features(write_csv(tmp_path / "a.csv", rows))
  assert ds.groups is None and len(ds.info["no_person"]) == len(ds)
  assert "carry no person id" in caplog.text and "face0_x.mat" in caplog.text
  with pytest.raises(ValueError, match="person ids"):
    data.train_test_split(ds, test_fraction=0.25, seed=0, person_independent=True)
  data.train_test_split(ds, test_fraction=0.25, seed=0)  # stratified
  rows = _rows()
  rows[0][0] = "odd_name.mat"  # one name without a person: no persons at all
  ds = data.load_sfew_features(write_csv(tmp_path / "b.csv", rows))
  assert ds.groups is None and ds.info["no_person"] == ["odd_name.mat"]
  assert data.load_sfew_features(write_csv(tmp_path / "c.csv", _rows())).info["no_person"] == []


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_image_tree(tree, channels):
  ds = data.load_sfew_images(tree, size=(8, 6), channels=channels,
                             expected_size=(H, W))
  assert ds.x.shape == (20, 8, 6, channels) and ds.x.dtype == np.float32
  assert ds.class_counts().tolist() == [3, 2, 3, 3, 3, 3, 3]
  assert 0.0 <= ds.x.min() and ds.x.max() <= 1.0
  assert ds.info["names"][3] == "disgust/Movie1_000000000_00000002.png"
  assert ds.groups[3] == "00000002"
  assert ds.info["skipped"] == [] and ds.info["no_face"] == []
  # Pixel values: the resize of the file as PIL does it, in [0, 1].
  with Image.open(tree / "Angry" / "Movie0_000000000_00000001.png") as im:
    ref = im.convert("L" if channels == 1 else "RGB").resize(
        (6, 8), Image.Resampling.BILINEAR)
  np.testing.assert_allclose(ds.x[0].squeeze(-1) if channels == 1 else ds.x[0],
                             np.asarray(ref) / 255.0, atol=1e-6)


def test_image_tree_deterministic_and_dispatch(tree):
  a = data.load_sfew_images(tree, size=(5, 5), expected_size=None)
  b = data.load("sfew_images", path=tree, size=(5, 5), expected_size=None,
                num_threads=1)
  np.testing.assert_array_equal(a.x, b.x)
  np.testing.assert_array_equal(a.y, b.y)


def test_unexpected_image_size(tree):
  with pytest.raises(ValueError, match=r"Angry/Movie0_000000000_00000001.png: image is"
                     r" 12x15 \(height x width\), expected 576x720"):
    data.load_sfew_images(tree, size=(8, 8))
  write_tree(tree, counts=(1, 0, 0, 0, 0, 0, 0), size=(10, 10), seed=1)
  # Overwrote Angry's first file with a 10x10 frame.
  with pytest.raises(ValueError, match="10x10"):
    data.load_sfew_images(tree, size=(8, 8), expected_size=(H, W))
  ds = data.load_sfew_images(tree, size=(8, 8), expected_size=(H, W), on_error="skip")
  assert len(ds) == 19 and "10x10" in ds.info["skipped"][0]["reason"]


def test_non_image_and_unreadable_files(tree, caplog):
  (tree / "Angry" / "notes.txt").write_text("hello")
  with pytest.raises(ValueError, match=r"Angry/notes.txt: not an image file"):
    data.load_sfew_images(tree, size=(8, 8), expected_size=None)
  (tree / "Angry" / "notes.txt").unlink()
  (tree / "Sad" / "broken.png").write_bytes(b"\x89PNG not really")
  with pytest.raises(ValueError, match=r"Sad/broken.png: not a readable image"):
    data.load_sfew_images(tree, size=(8, 8), expected_size=None)
  (tree / "Angry" / "notes.txt").write_text("hello")
  with caplog.at_level(logging.WARNING):
    ds = data.load_sfew_images(tree, size=(8, 8), expected_size=None, on_error="skip")
  assert len(ds) == 20 and ds.info["num_skipped"] == 2
  assert {s["path"] for s in ds.info["skipped"]} == {"Angry/notes.txt", "Sad/broken.png"}
  assert "skipped 2 entries" in caplog.text


def test_hidden_and_stray_entries_are_reported(tree):
  (tree / ".DS_Store").write_bytes(b"x")
  (tree / "SFEW.xlsx").write_bytes(b"x")
  (tree / "Happy" / ".hidden.png").write_bytes(b"x")
  (tree / "Happy" / "extra").mkdir()
  (tree / "Sad" / "Thumbs.db").write_bytes(b"x")       # hidden on Windows, no leading dot
  (tree / "Angry" / "desktop.ini").write_bytes(b"x")
  ds = data.load_sfew_images(tree, size=(8, 8), expected_size=None)
  assert len(ds) == 20
  reasons = {s["path"]: s["reason"] for s in ds.info["skipped"]}
  assert reasons == {
      ".DS_Store": "hidden entry",
      "SFEW.xlsx": "file beside the class folders",
      "Happy/.hidden.png": "hidden entry",
      "Happy/extra": "sub-folder inside a class folder",
      "Sad/Thumbs.db": "hidden entry",
      "Angry/desktop.ini": "hidden entry",
  }


def test_tree_layout_errors(tmp_path, tree):
  with pytest.raises(FileNotFoundError, match=r"is not a folder.*Angry, Disgust"):
    data.load_sfew_images(tmp_path / "nowhere", size=(8, 8))
  (tree / "Contempt").mkdir()
  with pytest.raises(ValueError, match="folder 'Contempt' is not a class"):
    data.load_sfew_images(tree, size=(8, 8), expected_size=None)
  assert len(data.load_sfew_images(tree, size=(8, 8), expected_size=None,
                                   on_error="skip")) == 20
  (tree / "Contempt").rmdir()
  (tree / "ANGRY").mkdir()
  with pytest.raises(ValueError, match="two folders for class 'angry'.*merge them"):
    data.load_sfew_images(tree, size=(8, 8), expected_size=None)
  (tree / "ANGRY").rmdir()
  for f in (tree / "Sad").iterdir():
    f.unlink()
  with pytest.raises(ValueError, match="empty class.*put this class's images there"):
    data.load_sfew_images(tree, size=(8, 8), expected_size=None)
  (tree / "Sad").rmdir()
  with pytest.raises(FileNotFoundError, match="no folder for class\\(es\\) sad"):
    data.load_sfew_images(tree, size=(8, 8), expected_size=None)


def test_nested_train_and_val_parts_name_the_path_to_pass(tmp_path):
  write_tree(tmp_path / "SFEW" / "Train")
  write_tree(tmp_path / "SFEW" / "Val")
  with pytest.raises(ValueError, match=r"'Train' is not a class.*Train/ holds class folders"
                     r" itself: pass .*SFEW/Train as the path \(--data_path="):
    data.load_sfew_images(tmp_path / "SFEW", size=(8, 8), expected_size=None)
  with pytest.raises(FileNotFoundError, match=r"no folder for class.*pass .*SFEW/Train.*"
                     r"pass .*SFEW/Val"):
    data.load_sfew_images(tmp_path / "SFEW", size=(8, 8), expected_size=None,
                          on_error="skip")
  assert len(data.load_sfew_images(tmp_path / "SFEW" / "Train", size=(8, 8),
                                   expected_size=None)) == 20


def test_image_argument_errors(tree):
  with pytest.raises(ValueError, match="channels"):
    data.load_sfew_images(tree, size=(8, 8), channels=4)
  with pytest.raises(ValueError, match="size"):
    data.load_sfew_images(tree, size=(8, 0))
  # One number, a float, a string: the message names the form (12 used to fail in len()).
  for size in (12, (8.5, 8), "88", (8, 8, 1)):
    with pytest.raises(ValueError, match=r"size must be \(height, width\), two positive ints"):
      data.load_sfew_images(tree, size=size)
  with pytest.raises(ValueError, match=r"expected_size must be \(height, width\)"):
    data.load_sfew_images(tree, size=(8, 8), expected_size=576)
  with pytest.raises(ValueError, match="on_error"):
    data.load_sfew_images(tree, size=(8, 8), on_error="ignore")


def test_crop_faces_without_opencv(tree, monkeypatch):
  monkeypatch.setitem(sys.modules, "cv2", None)  # makes `import cv2` fail
  with pytest.raises(ImportError, match=r"pip install jaxprune\[face\]"):
    data.load_sfew_images(tree, size=(8, 8), crop_faces=True)


def test_crop_faces_with_opencv_5(tree, monkeypatch):
  """OpenCV 5 has no CascadeClassifier: say which version to install."""
  monkeypatch.setitem(sys.modules, "cv2", types.SimpleNamespace(__version__="5.0.0"))
  with pytest.raises(ImportError, match=r"OpenCV 5.0.0 .*opencv-python-headless>=4.8,<5"):
    data.load_sfew_images(tree, size=(8, 8), crop_faces=True)


def test_crop_faces_with_a_detector(tmp_path, monkeypatch):
  """A stand-in for OpenCV's cascade that 'detects' the white box."""
  monkeypatch.setattr(FakeCascade, "paths", [])
  fake = types.SimpleNamespace(CascadeClassifier=FakeCascade,
                               data=types.SimpleNamespace(haarcascades="cascades/"))
  monkeypatch.setitem(sys.modules, "cv2", fake)
  tree = write_tree(tmp_path / "faces", box=True)
  ds = data.load_sfew_images(tree, size=(5, 6), crop_faces=True, expected_size=None)
  assert FakeCascade.paths[-1] == "cascades/haarcascade_frontalface_default.xml"
  assert len(ds.info["no_face"]) == 7  # the second frame of every class
  face = ds.info["names"].index("Angry/Movie0_000000000_00000001.png")
  np.testing.assert_allclose(ds.x[face], 1.0)  # the white box, cropped exactly
  whole = ds.info["names"].index("Angry/Movie0_000000001_00000002.png")
  assert ds.info["names"][whole] in ds.info["no_face"]
  assert ds.x[whole].max() < 1.0


def test_names_without_persons_in_an_image_tree(tmp_path):
  root = write_tree(tmp_path / "faces")
  for f in sorted(root.glob("*/*.png")):
    f.rename(f.with_name(f"{f.parent.name}{f.stem[-1]}_face.png"))
  ds = data.load_sfew_images(root, size=(4, 4), expected_size=None)
  assert ds.groups is None and len(ds.info["no_person"]) == 20
  assert "Angry/Angry1_face.png" in ds.info["no_person"]


def test_exif_orientation_is_applied(tmp_path):
  """A JPEG whose EXIF says 'rotate 180' (as phones write them) loaded as stored, upside
  down; viewers, and now the loaders, turn it first."""
  root = write_tree(tmp_path / "exif", counts=(1,) * 7)
  ramp = np.tile(np.arange(W, dtype=np.uint8)[None, :] * 16, (H, 1))
  exif = Image.Exif()
  exif[0x0112] = 3  # rotate 180
  Image.fromarray(ramp).save(root / "Angry" / "Movie9_000000001_00000009.jpg",
                             exif=exif.tobytes(), quality=100)
  exif[0x0112] = 6  # rotate 90 clockwise: the stored 12x15 frame is shown 15x12
  Image.fromarray(ramp).save(root / "Sad" / "Movie9_000000002_00000009.jpg",
                             exif=exif.tobytes(), quality=100)
  ds = data.load_sfew_images(root, size=(H, W), expected_size=None, num_threads=1)
  row = ds.x[ds.info["names"].index("Angry/Movie9_000000001_00000009.jpg"), :, :, 0]
  np.testing.assert_allclose(row * 255, ramp[:, ::-1], atol=3)  # turned: bright on the left
  with pytest.raises(ValueError, match=r"Sad/Movie9_000000002_00000009.jpg: image is 15x12"):
    data.load_sfew_images(root, size=(H, W), expected_size=(H, W))


def write_gray_tree(root, depth, size=(H, W), seed=0):
  """One gray frame per class: 8-bit, or the same picture at 16 bits (x 257)."""
  rng = np.random.default_rng(seed)
  for label, folder in enumerate(FOLDERS):
    (root / folder).mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=size).astype(np.uint8)
    pixels[0, 0], pixels[0, 1] = 0, 255
    image = Image.fromarray(pixels if depth == 8 else pixels.astype(np.uint16) * 257)
    suffix = ".tif" if depth == "tiff" else ".png"
    image.save(root / folder / f"Movie{label}_000000000_0000000{label + 1}{suffix}")
  return root


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("depth", [16, "tiff"])
def test_16bit_frames_load_like_their_8bit_version(tmp_path, depth, channels):
  eight = write_gray_tree(tmp_path / "eight", 8)
  deep = write_gray_tree(tmp_path / "deep", depth)
  with Image.open(next((deep / "Angry").iterdir())) as im:
    assert im.mode.startswith("I;16")  # what PIL makes of 16-bit PNG and TIFF
  kw = dict(channels=channels, expected_size=None)
  a = data.load_sfew_images(eight, size=(H, W), **kw)
  b = data.load_sfew_images(deep, size=(H, W), **kw)
  np.testing.assert_array_equal(a.x, b.x)  # no resizing: exactly the same values
  assert b.x.max() == 1.0 and b.x.mean() < 0.75  # not clipped to white
  a = data.load_sfew_images(eight, size=(5, 7), **kw)
  b = data.load_sfew_images(deep, size=(5, 7), **kw)
  np.testing.assert_allclose(a.x, b.x, atol=1 / 255)  # 8 bits round after resizing


def test_16bit_frame_with_8bit_content_warns_that_it_loads_dark(tmp_path):
  root = write_gray_tree(tmp_path / "low", 8)
  for f in root.glob("*/*.png"):  # 8-bit values in a 16-bit container
    with Image.open(f) as im:
      Image.fromarray(np.asarray(im).astype(np.uint16)).save(f)
  with pytest.warns(UserWarning, match="values only up to 255 of 65535, so it loads dark"):
    ds = data.load_sfew_images(root, size=(H, W), expected_size=None, num_threads=1)
  assert ds.x.max() == np.float32(255 / 65535)


def test_dark_16bit_frames_are_named_and_listed(tmp_path):
  """The 'loads dark' warning did not say which file; such frames are now named in it and
  listed in info['dark'] (which the binaries' report shows)."""
  root = write_gray_tree(tmp_path / "low", 8)
  dark = root / "Sad" / "Movie5_000000000_00000006.png"
  with Image.open(dark) as im:
    Image.fromarray(np.asarray(im).astype(np.uint16) * 16).save(dark)  # 12-bit content
  with pytest.warns(UserWarning, match=r"Sad/Movie5_000000000_00000006.png: 16-bit frame "
                    r"holding values only up to 4080 of 65535"):
    ds = data.load_sfew_images(root, size=(H, W), expected_size=None)
  assert ds.info["dark"] == ["Sad/Movie5_000000000_00000006.png"]
  assert data.load_sfew_images(write_gray_tree(tmp_path / "ok", 16), size=(H, W),
                               expected_size=None).info["dark"] == []


def test_32bit_frames_in_16bit_range_load_and_others_are_refused(tmp_path):
  eight = data.load_sfew_images(write_gray_tree(tmp_path / "eight", 8), size=(H, W),
                                expected_size=None)
  root = write_gray_tree(tmp_path / "int", 8)
  for f in root.glob("*/*.png"):  # 32-bit integer TIFFs holding 16-bit values
    with Image.open(f) as im:
      Image.fromarray(np.asarray(im).astype(np.int32) * 257).save(f.with_suffix(".tif"))
    f.unlink()
  with Image.open(next((root / "Angry").iterdir())) as im:
    assert im.mode == "I"
  ds = data.load_sfew_images(root, size=(H, W), expected_size=None)
  np.testing.assert_array_equal(ds.x, eight.x)
  Image.fromarray(np.full((H, W), 70000, np.int32)).save(root / "Sad" / "big.tif")
  with pytest.raises(ValueError, match=r"Sad/.*mode I\) with values 70000\.\.70000.*"
                     r"8-bit or 16-bit PNG.*on_error='skip'"):
    data.load_sfew_images(root, size=(H, W), expected_size=None)
  Image.fromarray(np.full((H, W), 0.5, np.float32)).save(root / "Happy" / "float.tif")
  ds = data.load_sfew_images(root, size=(H, W), expected_size=None, on_error="skip",
                             num_threads=1)
  reasons = " ".join(s["reason"] for s in ds.info["skipped"])
  assert len(ds) == 7 and "mode F" in reasons and "mode I" in reasons


# ---------------------------------------------------------------------------
# TFDS builder
# ---------------------------------------------------------------------------

tfds = pytest.importorskip("tensorflow_datasets")


def _source(config, data_dir, manual_dir):
  from jaxprune.data import sfew_tfds  # registers 'sfew'
  del sfew_tfds
  return tfds.data_source(
      f"sfew/{config}", data_dir=str(data_dir),
      download_and_prepare_kwargs={
          "download_config": tfds.download.DownloadConfig(manual_dir=str(manual_dir))})


def test_tfds_features_build_and_read(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  write_xlsx(manual / "SFEW.xlsx", _rows())
  source = _source("features", tmp_path / "tfds", manual)["train"]
  direct = data.load_sfew_features(manual)
  assert len(source) == len(direct) == sum(COUNTS) - 1
  got = sorted((source[i]["name"].decode(), source[i]["label"],
                tuple(source[i]["features"])) for i in range(len(source)))
  want = sorted(zip(direct.info["names"], direct.y.tolist(), map(tuple, direct.x)))
  for (n1, l1, f1), (n2, l2, f2) in zip(got, want):
    assert n1 == n2 and l1 == l2
    np.testing.assert_allclose(f1, f2, rtol=1e-6)
  builder = tfds.builder("sfew/features", data_dir=str(tmp_path / "tfds"))
  assert builder.info.metadata["dropped"][0]["name"] == _rows()[MISSING_ROW][0]
  assert list(builder.info.splits["train"].filenames)[0].endswith(
      ".array_record-00000-of-00001")
  assert "tensorflow" not in sys.modules  # built and read without TensorFlow
  # Read back through the helper, as a Dataset.
  from jaxprune.data import sfew_tfds
  ds = sfew_tfds.load_sfew_tfds("features", data_dir=tmp_path / "tfds",
                                manual_dir=manual)
  order = np.argsort(ds.info["names"])
  np.testing.assert_allclose(ds.x[order], direct.x[np.argsort(direct.info["names"])],
                             rtol=1e-6)
  assert ds.info["blocks"] == data.FEATURE_BLOCKS


def test_tfds_images_build_and_read(tmp_path):
  manual = write_tree(tmp_path / "manual")
  write_xlsx(manual / "SFEW.xlsx", _rows())  # both forms may share the folder
  source = _source("images", tmp_path / "tfds", manual)["train"]
  assert len(source) == 20
  example = source[0]
  assert example["image"].shape == (H, W, 3) and example["image"].dtype == np.uint8
  from jaxprune.data import sfew_tfds
  ds = sfew_tfds.load_sfew_tfds("images", data_dir=tmp_path / "tfds", size=(8, 6),
                                channels=1, manual_dir=manual)
  direct = data.load_sfew_images(manual, size=(8, 6), expected_size=None)
  order_a, order_b = np.argsort(ds.info["names"]), np.argsort(direct.info["names"])
  np.testing.assert_array_equal(ds.y[order_a], direct.y[order_b])
  np.testing.assert_allclose(ds.x[order_a], direct.x[order_b], atol=1e-6)
  np.testing.assert_array_equal(ds.groups[order_a], direct.groups[order_b])
  builder = tfds.builder("sfew/images", data_dir=str(tmp_path / "tfds"))
  assert {"path": "SFEW.xlsx", "reason": "file beside the class folders"} in \
      builder.info.metadata["skipped"]


def test_tfds_missing_manual_files(tmp_path):
  with pytest.raises(AssertionError, match="SFEW.xlsx"):  # TFDS: empty manual dir
    _source("features", tmp_path / "tfds", tmp_path / "nothing")
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "readme.txt").write_text("x")
  with pytest.raises(FileNotFoundError, match="No SFEW.xlsx or SFEW.csv"):
    _source("features", tmp_path / "tfds2", manual)
  with pytest.raises(FileNotFoundError, match="no folder for class"):
    _source("images", tmp_path / "tfds3", manual)


def test_tfds_loader_errors_name_a_fix_it_has(tmp_path):
  """A missing manual folder (TFDS asserts), a bad file (the advice was on_error='skip',
  which the builder does not take) and frames of several sizes with size=None (a bare NumPy
  stacking error)."""
  from jaxprune.data import sfew_tfds
  with pytest.raises(FileNotFoundError, match="SFEW"):
    sfew_tfds.load_sfew_tfds("features", data_dir=tmp_path / "t0", manual_dir=tmp_path / "none")
  bad = write_tree(tmp_path / "bad")
  (bad / "Angry" / "notes.txt").write_text("x")
  with pytest.raises(ValueError, match="notes.txt: not an image.*builder prepares every file") as e:
    sfew_tfds.load_sfew_tfds("images", data_dir=tmp_path / "t1", manual_dir=bad)
  assert "--on_error" not in str(e.value)
  mixed = write_tree(tmp_path / "mixed")
  Image.fromarray(np.zeros((7, 5, 3), np.uint8)).save(mixed / "Happy" / "Movie3_small_00000009.png")
  with pytest.raises(ValueError, match=r"2 sizes .*7x5 .*12x15 .*pass size=\(height, width\)"):
    sfew_tfds.load_sfew_tfds("images", data_dir=tmp_path / "t2", manual_dir=mixed)
  ds = sfew_tfds.load_sfew_tfds("images", data_dir=tmp_path / "t2", manual_dir=mixed, size=(6, 4))
  assert ds.x.shape == (21, 6, 4, 3)


def test_tfds_registration_and_instructions():
  from jaxprune.data import sfew_tfds
  assert "sfew" in tfds.list_builders(with_community_datasets=False)
  text = sfew_tfds.Sfew.MANUAL_DOWNLOAD_INSTRUCTIONS
  for needle in ("SFEW.xlsx", "SFEW.csv", "<manual_dir>/Angry/", "Surprise"):
    assert needle in text
  assert [c.name for c in sfew_tfds.Sfew.BUILDER_CONFIGS] == ["features", "images"]


def test_tfds_prepared_data_follow_the_manual_folder(tmp_path, caplog):
  """Once a data_dir was prepared, another manual_dir or edited files in the same folder were
  ignored: load_sfew_tfds returned the first copy's data."""
  from jaxprune.data import sfew_tfds
  first = write_tree(tmp_path / "first")
  other = write_tree(tmp_path / "other", counts=(2,) * 7, seed=1)
  kw = dict(data_dir=tmp_path / "tfds", size=(4, 4))
  assert len(sfew_tfds.load_sfew_tfds("images", manual_dir=first, **kw)) == 20
  with caplog.at_level(logging.WARNING):
    ds = sfew_tfds.load_sfew_tfds("images", manual_dir=other, **kw)
  assert len(ds) == 14 and "preparing it again" in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):  # unchanged: reused, not prepared again
    assert len(sfew_tfds.load_sfew_tfds("images", manual_dir=other, **kw)) == 14
  assert "preparing it again" not in caplog.text
  Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(
      other / "Sad" / "Movie5_000000009_00000009.png")  # a file added
  assert len(sfew_tfds.load_sfew_tfds("images", manual_dir=other, **kw)) == 15
  # An edited spreadsheet, in the same folder, for the features config.
  manual = tmp_path / "manual"
  manual.mkdir()
  path = write_csv(manual / "SFEW.csv", _rows())
  a = sfew_tfds.load_sfew_tfds("features", data_dir=tmp_path / "tfds", manual_dir=manual)
  rows = _rows()
  rows[0][2] = 123.0
  write_csv(path, rows)
  b = sfew_tfds.load_sfew_tfds("features", data_dir=tmp_path / "tfds", manual_dir=manual)
  name = rows[0][0]
  assert a.x[a.info["names"].index(name), 0] != 123.0
  assert b.x[b.info["names"].index(name), 0] == 123.0
  builder = tfds.builder("sfew/features", data_dir=str(tmp_path / "tfds"))
  assert builder.info.metadata["manual_fingerprint"] == sfew_tfds.manual_fingerprint(
      "features", manual)
  # A manual folder that is gone cannot be compared: the prepared data are read, with a warning.
  path.unlink()
  manual.rmdir()
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    c = sfew_tfds.load_sfew_tfds("features", data_dir=tmp_path / "tfds", manual_dir=manual)
  assert len(c) == len(b) and "does not exist" in caplog.text


def test_tfds_checks_size_first_and_reads_like_the_direct_loader(tmp_path):
  """size=(0, 5) was only refused after the data had been prepared; EXIF orientation was
  ignored; dark 16-bit frames and files without persons were not listed."""
  from jaxprune.data import sfew_tfds
  manual = write_tree(tmp_path / "manual")
  with pytest.raises(ValueError, match=r"size must be \(height, width\)"):
    sfew_tfds.load_sfew_tfds("images", data_dir=tmp_path / "tfds", manual_dir=manual,
                             size=(0, 5))
  assert not (tmp_path / "tfds").exists()  # nothing prepared
  ramp = np.tile(np.arange(W, dtype=np.uint8)[None, :] * 16, (H, 1))
  exif = Image.Exif()
  exif[0x0112] = 3  # rotate 180
  Image.fromarray(np.stack([ramp] * 3, -1)).save(manual / "Angry" / "phone_shot.png",
                                                  exif=exif.tobytes())
  Image.fromarray(ramp.astype(np.uint16)).save(manual / "Sad" / "Movie5_000000009_00000009.png")
  with pytest.warns(UserWarning, match="Movie5_000000009_00000009.png: 16-bit frame"):
    ds = sfew_tfds.load_sfew_tfds("images", data_dir=tmp_path / "tfds", manual_dir=manual,
                                  size=(H, W), channels=1)
  with pytest.warns(UserWarning, match="loads dark"):
    direct = data.load_sfew_images(manual, size=(H, W), expected_size=None)
  order_a, order_b = np.argsort(ds.info["names"]), np.argsort(direct.info["names"])
  np.testing.assert_allclose(ds.x[order_a], direct.x[order_b], atol=1 / 255 + 1e-6)
  row = ds.x[ds.info["names"].index("Angry/phone_shot.png"), :, :, 0]
  np.testing.assert_allclose(row * 255, ramp[:, ::-1], atol=1)  # turned as EXIF says
  assert ds.info["dark"] == direct.info["dark"] == ["Sad/Movie5_000000009_00000009.png"]
  assert ds.groups is None and direct.groups is None  # phone_shot.png names no person
  assert ds.info["no_person"] == direct.info["no_person"] == ["Angry/phone_shot.png"]


@pytest.mark.parametrize("num_threads", [1, 4])
def test_rows_keep_their_pixels_when_files_are_skipped(tmp_path, num_threads):
  root = write_tree(tmp_path / "SFEW")
  (root / "FEAR" / "Movie2_000000001_00000004.png").write_bytes(b"not a png")  # in the middle
  write_tree(root, counts=(0, 0, 0, 0, 0, 2, 0), size=(9, 15), seed=3)  # two smaller frames
  ds = data.load_sfew_images(root, size=(6, 5), expected_size=None, on_error="skip",
                             num_threads=num_threads)
  assert len(ds) == 19 and [s["path"] for s in ds.info["skipped"]] == [
      "FEAR/Movie2_000000001_00000004.png"]
  for name, x in zip(ds.info["names"], ds.x):  # each row: its own file, as PIL resizes it
    with Image.open(root / name) as im:
      ref = np.asarray(im.convert("L").resize((5, 6), Image.Resampling.BILINEAR)) / 255.0
    np.testing.assert_allclose(x[..., 0], ref, atol=1e-6)
  assert ds.info["source_sizes"] == (((H, W), 17), ((9, 15), 2))
