"""Users' own SFEW files as spreadsheets and file managers write them, and what the binaries
report of them: a European CSV export, rows a cell short, a table that starts in column B or
under a title, broken links, unreadable classes, the wrong kind of path, repeated images, and
--data_path spelt with a trailing slash. Every file is written here, small."""

import csv
import json
import os
import re

import numpy as np
import openpyxl
import pytest
from PIL import Image

from jaxprune import data

HEADER = [None, "label"] + [f"LPQ feature {i}" for i in range(1, 6)] + [
    f"PHOG feature {i}" for i in range(1, 6)]
CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]


def _rows(per_class=3):
  rng = np.random.default_rng(0)
  return [[f"Movie{c}_{j:09d}_{j % 3 + 1:08d}.mat", c + 1,
           *np.round(rng.normal(c * 0.3, 1.0, 10), 4).tolist()]
          for c in range(7) for j in range(per_class)]


def _write_csv(path, rows, header=HEADER, delimiter=","):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, delimiter=delimiter)
    for row in ([header] if header is not None else []) + rows:
      writer.writerow(["" if v is None else v for v in row])
  return path


def _write_xlsx(path, rows):
  book = openpyxl.Workbook()
  sheet = book.active
  for row in rows:
    sheet.append(row)
  book.save(path)
  return path


def _european(row):
  """A row as Excel writes it in a locale with decimal commas (';' between its cells)."""
  return [str(v).replace(".", ",") if isinstance(v, float) else v for v in row]


def _tree(root, per_class=2):
  rng = np.random.default_rng(0)
  for c, name in enumerate(CLASSES):
    (root / name).mkdir(parents=True)
    for j in range(per_class):
      Image.fromarray(rng.integers(0, 255, (8, 10), dtype=np.uint8)).save(
          root / name / f"Movie{c}_{j:09d}_{j + 1:08d}.png")
  return root


# ----------------------------------------------------------------------------- 1: European CSV


@pytest.mark.parametrize("header", [HEADER, None])
def test_semicolon_csv_with_decimal_commas_names_the_decimal_comma(tmp_path, header):
  """Without a header every line has 10 commas and 11 semicolons: csv.Sniffer chose ',' and the
  error called the first data row a header of 11 columns. Now ';' (which gives the 12 fields)
  is chosen, and the file gets the decimal-comma message a file with a header got."""
  path = _write_csv(tmp_path / "SFEW.csv", [_european(r) for r in _rows()], header, ";")
  first = 2 if header else 1
  with pytest.raises(ValueError, match=rf"row {first} \(Movie0_000000000_00000001\.mat\), "
                     r"column 3 \(LPQ feature 1\): '[-0-9]+,[0-9]+' is not a finite number; it "
                     r"has a decimal comma: save the file with decimal points"):
    data.load_sfew_features(path)


def test_semicolon_csv_with_decimal_points_and_no_header_loads(tmp_path):
  rows = _rows()
  ds = data.load_sfew_features(_write_csv(tmp_path / "SFEW.csv", rows, None, ";"))
  np.testing.assert_allclose(ds.x, np.asarray([r[2:] for r in rows], np.float32))


# ----------------------------------------------------------------------------- 2: a cell short


def test_rows_one_cell_short_of_the_header_name_the_missing_column(tmp_path):
  """It said only 'no complete rows'."""
  path = _write_csv(tmp_path / "SFEW.csv", [r[:11] for r in _rows()])
  with pytest.raises(ValueError, match=r"no complete rows: every row has 11 cells where the "
                     r"header names 12, so no row has a value for column 12 \(PHOG feature 5\)"
                     r".*write the file again with all 12 columns"):
    data.load_sfew_features(path)


def test_a_column_empty_in_every_row_is_named(tmp_path):
  rows = _rows()
  for r in rows:
    r[4] = None
  book = _write_xlsx(tmp_path / "SFEW.xlsx", [HEADER] + rows)
  with pytest.raises(ValueError, match=r"no complete rows: column 5 \(LPQ feature 3\) is empty "
                     r"in every row"):
    data.load_sfew_features(book)


# ----------------------------------------------------------------------------- 3, 4: placement


def test_xlsx_table_starting_in_column_b_loads_as_from_column_a(tmp_path):
  """It said 'unexpected extra columns: found 13'."""
  rows = _rows()
  plain = data.load_sfew_features(_write_xlsx(tmp_path / "a.xlsx", [HEADER] + rows))
  shifted = data.load_sfew_features(
      _write_xlsx(tmp_path / "b.xlsx", [[None] + r for r in [HEADER] + rows]))
  np.testing.assert_array_equal(plain.x, shifted.x)
  np.testing.assert_array_equal(plain.y, shifted.y)
  # Messages name the sheet's columns: LPQ feature 1 is column 4 there.
  rows[2][2] = "0.1x"
  with pytest.raises(ValueError, match=r"row 4 \(.*\), column 4 \(LPQ feature 1\): '0.1x'"):
    data.load_sfew_features(_write_xlsx(tmp_path / "c.xlsx",
                                        [[None] + r for r in [HEADER] + rows]))


@pytest.mark.parametrize("kind", ["xlsx", "csv"])
def test_a_title_row_above_the_header_is_skipped(tmp_path, kind):
  """It said 'row 2 (no name): unknown label 'label''."""
  rows = _rows()
  rows[4][9] = None   # dropped: reported by its row in the sheet (title, header, rows 0-4)
  table = [["SFEW features (LPQ, PHOG)"] + [None] * 11, HEADER] + rows
  if kind == "xlsx":
    path = _write_xlsx(tmp_path / "SFEW.xlsx", table)
  else:
    path = _write_csv(tmp_path / "SFEW.csv", table[1:], header=table[0])
  ds = data.load_sfew_features(path)
  assert len(ds) == len(rows) - 1
  assert ds.info["dropped"][0]["row"] == 7
  assert ds.info["header"][1] == "label"


def test_other_rows_above_the_header_say_to_delete_them(tmp_path):
  table = [["exported by", "me", "2024"], [None], HEADER] + _rows()
  with pytest.raises(ValueError, match=r"row 3 looks like the header \(, label, LPQ feature 1"
                     r".*rows 1-2 above it hold other cells.*delete the row\(s\) above the "
                     r"header"):
    data.load_sfew_features(_write_xlsx(tmp_path / "SFEW.xlsx", table))


# ----------------------------------------------------------------------------- 7: broken links


def test_a_class_folder_that_is_a_broken_link_is_named(tmp_path):
  """It said 'no folder for class(es) happy' and counted the link as a file."""
  root = _tree(tmp_path / "SFEW")
  for f in (root / "Happy").iterdir():
    f.unlink()
  (root / "Happy").rmdir()
  (root / "Happy").symlink_to(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=r"the class folder 'Happy' is a broken link \(to "
                     r".*nowhere, which does not exist\): point the link at the folder"):
    data.load_sfew_images(root, size=(8, 8), expected_size=None)


def test_a_broken_link_inside_a_class_folder_is_skipped_as_such(tmp_path):
  root = _tree(tmp_path / "SFEW")
  (root / "Sad" / "Movie5_000000009_00000009.png").symlink_to(tmp_path / "gone.png")
  ds = data.load_sfew_images(root, size=(8, 8), expected_size=None, on_error="skip")
  assert [s["path"] for s in ds.info["skipped"]] == ["Sad/Movie5_000000009_00000009.png"]
  assert "broken link (to" in ds.info["skipped"][0]["reason"]


# ----------------------------------------------------------------------------- 8: messages


def test_a_class_without_readable_images_lists_its_files_as_lines(tmp_path):
  """--on_error=skip with every Happy file unreadable printed Python dicts."""
  root = _tree(tmp_path / "SFEW", per_class=7)
  for f in (root / "Happy").iterdir():
    f.write_bytes(b"not an image")
  with pytest.raises(ValueError) as e:
    data.load_sfew_images(root, size=(8, 8), expected_size=None, on_error="skip")
  message = str(e.value)
  assert "{'path'" not in message
  assert "no readable images for class(es) happy: all 7 of their files were skipped" in message
  assert "replace these files with readable frames" in message
  lines = message.split("\n")[1:]
  assert len(lines) == 6 and lines[-1] == "  and 2 more"
  assert re.fullmatch(r"  Happy/Movie3_000000000_00000001\.png: not a readable image \(.*\)",
                      lines[0])


def test_features_loader_given_an_image_tree_suggests_images_or_featurize(tmp_path):
  """It said only 'No SFEW.xlsx or SFEW.csv in the folder', also for progressive_compression,
  which does not check the path as the other MLP studies do."""
  tree = _tree(tmp_path / "SFEW")
  with pytest.raises(FileNotFoundError, match=r"looks like an SFEW image tree \(it holds class "
                     r"folders\): load it with --data=sfew_images .*python -m "
                     r"experiments\.featurize --data_path=.*SFEW --out=SFEW\.csv"):
    data.load("sfew_features", path=tree)
  _tree(tmp_path / "SFEW 2.0" / "Train")
  with pytest.raises(FileNotFoundError, match=r"its part\(s\) Train hold class folders\): load "
                     r"one part at a time \(--data_path='.*SFEW 2.0/Train'\)"):
    data.load("sfew_features", path=tmp_path / "SFEW 2.0")


def test_images_loader_given_a_features_folder_suggests_sfew_features(tmp_path):
  (tmp_path / "feat").mkdir()
  _write_csv(tmp_path / "feat" / "SFEW.csv", _rows())
  with pytest.raises(FileNotFoundError, match=r"it holds SFEW\.csv, the features file: the MLP "
                     r"studies read it with --data=sfew_features"):
    data.load("sfew_images", path=tmp_path / "feat")


def test_cnn_report_lists_at_most_20_skipped_entries():
  from experiments import _cnn_common as cc  # pylint: disable=import-outside-toplevel
  skipped = [{"path": f"Sad/{i}.txt", "reason": "not an image file"} for i in range(25)]
  ds = data.Dataset(np.zeros((2, 4, 4, 1), np.float32), [0, 1], ("a", "b"),
                    info={"source": "SFEW images", "skipped": skipped})
  text = cc.data_description(ds, "sfew_images")
  assert "Skipped 25 entries of the tree: " in text
  assert "`Sad/19.txt`" in text and "`Sad/20.txt`" not in text
  assert "(not an image file); and 5 more." in text


# ----------------------------------------------------------------------------- 5: repeated images


@pytest.mark.parametrize("persons", [False, True])
def test_report_and_results_name_repeated_images(tmp_path, persons):
  """info['duplicates'] was only logged: REPORT.md and results.json never said it."""
  from experiments import _store  # pylint: disable=import-outside-toplevel
  rows = _rows()
  rows.append(list(rows[3]))   # row 23 repeats row 5
  if not persons:
    for r in rows:
      r[0] = r[0].replace(".mat", "_x.mat")
  ds = data.load_sfew_features(_write_csv(tmp_path / "SFEW.csv", rows))
  assert (ds.groups is not None) == persons
  s = _store.Study("rep", {"data": "sfew_features"}, str(tmp_path / "w"), data=ds)
  s.write_results({})
  s.write_report("T", [])
  text = (tmp_path / "w" / "rep" / "REPORT.md").read_text()
  name = rows[3][0]
  assert f"The data hold 1 image(s) more than once (e.g. `{name}`: rows 5, 23)" in text
  if persons:
    assert "person-independent, which keep the copies (one name, one person) on one side" in text
  else:
    assert ("not by person, so the copies may land in both the training and the test part"
            in text)
  results = json.loads((tmp_path / "w" / "rep" / "results.json").read_text())
  assert results["data"]["duplicates"] == [{"name": name, "rows": [5, 23]}]


# ----------------------------------------------------------------------------- 6: the time table


def test_training_time_checks_are_lines_not_rows_of_the_time_table(tmp_path, capsys):
  """Each check was a stage row named with raw floats ('min angle 19.247135162353516'), and took
  the fold's training time away from the fold's row."""
  from experiments import _speed  # pylint: disable=import-outside-toplevel
  from experiments import training_time_distinctiveness as ttd  # pylint: disable=import-outside-toplevel
  _speed.start()
  ttd.run(ttd.Config.quick(max_per_class=3, epochs=2, check_every=1, image_size=(59, 59)),
          str(tmp_path))
  rows = [line.rsplit(None, 1)[0] for line in _speed.stage_table().splitlines()[2:-3]]
  assert rows == [f"training_time_distinctiveness fold {f}/2 {v}"
                  for f in (1, 2) for v in ("no_pruning", "pruning")]
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("[fold check")]
  assert len(lines) == 4
  assert all(re.fullmatch(r"\[fold check, epoch 1\] min angle \d+\.\d, max angle \d+\.\d, "
                          r"kept \d+/64", l) for l in lines), lines


def test_check_line_rounds_the_angles():
  from experiments import training_time_distinctiveness as ttd  # pylint: disable=import-outside-toplevel
  assert ttd.check_line({"min_angle": None, "max_angle": None}, 1, 64) == (
      "min angle none, max angle none, kept 1/64")


# ----------------------------------------------------------------------------- 9: one path


def test_a_trailing_slash_on_data_path_keeps_the_cache(tmp_path):
  """--data_path=.../SFEW/ and .../SFEW gave two fingerprints: the rerun recomputed."""
  from experiments import _store  # pylint: disable=import-outside-toplevel
  ds = data.Dataset(np.zeros((4, 2), np.float32), np.arange(4) % 2, ("a", "b"))
  tree = str(tmp_path / "SFEW")
  studies = []
  for i, path in enumerate([tree, tree + "/", tree + "//", str(tmp_path / "." / "SFEW")]):
    s = _store.Study("st", {"data": "sfew_images", "data_path": path}, str(tmp_path / f"w{i}"),
                     data=ds)
    studies.append(s)
    s.release()
  assert len({s.fingerprint for s in studies}) == 1
  assert all(s.settings["data_path"] == tree for s in studies)
  studies[1].write_report("T", [])
  text = (tmp_path / "w1" / "st" / "REPORT.md").read_text()
  assert f'"data_path": "{tree}"' in text
