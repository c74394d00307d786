"""Probe tests of a user's own SFEW copy as the binaries meet it: misnamed class folders, parts
one level further down, paths with spaces, files where a folder belongs, 0-based labels, Excel's
UTF-16 export, sizes beyond memory and the flags that name the data (tiny files written here;
no program is compiled)."""

import codecs

import numpy as np
import pytest
from absl import app
from absl import flags
from PIL import Image

from experiments import _flags
from jaxprune import data
from jaxprune.data import dataset as dataset_lib

CLASSES = ["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"]


def _tree(root, folders=CLASSES, per_class=2):
  """A tiny SFEW tree: ``per_class`` 6x5 RGB frames in each folder, every name with a person."""
  rng = np.random.default_rng(0)
  for k, folder in enumerate(folders):
    (root / folder).mkdir(parents=True)
    for j in range(per_class):
      pixels = rng.integers(0, 255, size=(6, 5, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(root / folder / f"Movie_{k}{j}_{j:08d}.png")
  return root


def _load(root, **kw):
  return data.load_sfew_images(root, size=(4, 4), expected_size=None, **kw)


def _csv(path, labels, encoding="utf-8", sep=","):
  header = ["", "label"] + [f"LPQ feature {i}" for i in range(1, 6)] + [
      f"PHOG feature {i}" for i in range(1, 6)]
  rows = [header] + [[f"Movie_{i}_{i:08d}.mat", str(y)] + [f"{0.1 * (i + c):.2f}"
                                                            for c in range(10)]
                     for i, y in enumerate(labels)]
  path.write_bytes("".join(sep.join(r) + "\r\n" for r in rows).encode(encoding))
  return path


# ----------------------------------------------------------------------------- image trees


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_misnamed_class_folder_is_named_with_its_rename_not_skipped(tmp_path, on_error):
  for name, proper in (("Suprise", "Surprise"), ("Anger", "Angry"), ("3_fear", "Fear")):
    root = tmp_path / name
    _tree(root, [name if c == proper else c for c in CLASSES])
    # Skipping it would only fail later with 'no folder for class ...', naming no folder.
    with pytest.raises(ValueError, match=rf"folder '{name}' is not a class.*no {proper} folder:"
                       rf" '{name}' looks like the class {proper} misnamed; rename the folder"
                       rf" to {proper}"):
      _load(root, on_error=on_error)
  # Beside the class it resembles, such a folder is a stray folder, skipped as before.
  root = _tree(tmp_path / "both", CLASSES + ["Surprised"])
  assert [s["path"] for s in _load(root, on_error="skip").info["skipped"]] == ["Surprised"]


def test_parts_one_level_down_are_named_with_a_quoted_path(tmp_path):
  # An unpacked 'SFEW 2.0/' holding Train/ and Val/, passed by its parent.
  top = tmp_path / "my data"
  _tree(top / "SFEW 2.0" / "Train")
  _tree(top / "SFEW 2.0" / "Val")
  train = top / "SFEW 2.0" / "Train"
  quoted = f"--data_path='{train}'"  # pasted into a shell, one argument
  with pytest.raises(ValueError, match=r"SFEW 2\.0/ holds the class folders one level down, in"
                     rf" {train}, {top / 'SFEW 2.0' / 'Val'}: pass one of them as the path"
                     rf" \(e\.g\. {quoted} for the binaries\)"):
    _load(top)
  with pytest.raises(FileNotFoundError, match=rf"no folder for class.*e\.g\. {quoted}"):
    _load(top, on_error="skip")
  assert len(_load(train)) == 14
  # One level only: SFEW 2.0/Train itself is named as before, quoted.
  with pytest.raises(ValueError, match=rf"Train/ holds class folders itself: pass {train} as"
                     rf" the path \({quoted} for the binaries\)"):
    _load(top / "SFEW 2.0")


def test_a_class_folder_with_only_sub_folders_says_to_move_them_up(tmp_path):
  root = _tree(tmp_path / "SFEW")
  (root / "Sad" / "frames").mkdir()
  for f in list((root / "Sad").glob("*.png")):
    f.rename(root / "Sad" / "frames" / f.name)
  with pytest.raises(ValueError, match=r"Sad: class folder without images \(empty class\) \(it"
                     r" holds only the sub-folder\(s\) frames, which are not read: move their"
                     r" images up into the class folder\)"):
    _load(root)


def test_a_file_passed_as_the_tree_says_what_to_pass(tmp_path):
  root = _tree(tmp_path / "SFEW")
  features = _csv(tmp_path / "SFEW.csv", range(1, 8))
  with pytest.raises(FileNotFoundError, match=r"SFEW\.csv is not a folder but a file; a features"
                     r" file \(SFEW\.xlsx or SFEW\.csv\) is read with --data=sfew_features"):
    _load(features)
  frame = next((root / "Angry").iterdir())
  with pytest.raises(FileNotFoundError, match=rf"is not a folder but an image; pass the folder"
                     rf" that holds the class folders, e\.g\. {root} \(--data_path={root} "):
    _load(frame)
  with pytest.raises(FileNotFoundError, match=r"nowhere is not a folder \(it does not exist\)"):
    _load(tmp_path / "nowhere")


def test_images_beyond_memory_are_refused_before_they_are_made(tmp_path, monkeypatch):
  root = _tree(tmp_path / "SFEW")
  monkeypatch.setattr(dataset_lib, "_memory_bytes", lambda: 2**20)  # a 1 MiB machine
  # 14 frames of 128x128x3 float32: 2.6 MiB.
  with pytest.raises(ValueError, match=r"14 images of 128x128x3 take 0\.0 GiB as float32, more"
                     r" than this machine's 0\.0 GiB of memory: pass a smaller size, e\.g\."
                     r" size=\(90, 72\) \(--image_size=90x72 in the CNN studies\)"):
    data.load_sfew_images(root, size=(128, 128), channels=3, expected_size=None)
  assert data.load_sfew_images(root, size=(8, 8), expected_size=None).x.shape == (14, 8, 8, 1)
  with pytest.raises(ValueError, match=r"56 images of 128x128x1 take .*or keep fewer images with"
                     r" max_per_class \(--max_per_class\)"):
    data.load_images(size=(128, 128), channels=1, max_per_class=8)
  assert data.load_images(size=(8, 8), channels=1, max_per_class=8).x.shape == (56, 8, 8, 1)


# ----------------------------------------------------------------------------- feature files


def test_zero_based_labels_say_to_add_one_and_utf16_exports_load(tmp_path):
  with pytest.raises(ValueError, match=r"row 2 .*unknown label '0'; .* a label 0 means the file"
                     r" counts them from 0 \(0 angry \.\.\. 6 surprise\): add 1 to every label"):
    data.load_sfew_features(_csv(tmp_path / "zero.csv", range(7)))
  with pytest.raises(ValueError, match=r"unknown label '9'; expected 1\.\.7 or one of angry, "
                     r"disgust, fear, happy, neutral, sad, surprise$"):
    data.load_sfew_features(_csv(tmp_path / "nine.csv", [9] + list(range(2, 8))))
  # Excel's "Unicode Text" export: UTF-16 with its byte-order mark, tab-separated.
  labels = list(range(1, 8)) * 2
  plain = data.load_sfew_features(_csv(tmp_path / "a.csv", labels))
  for encoding, bom in (("utf-16-le", codecs.BOM_UTF16_LE), ("utf-16-be", codecs.BOM_UTF16_BE)):
    path = _csv(tmp_path / f"{encoding}.txt", labels, encoding=encoding, sep="\t")
    path.write_bytes(bom + path.read_bytes())
    ds = data.load_sfew_features(path)
    np.testing.assert_array_equal(ds.x, plain.x)
    assert ds.y.tolist() == plain.y.tolist() == [k % 7 for k in range(14)]
    assert ds.info["names"] == plain.info["names"]


def test_a_note_beside_one_row_is_named_as_the_cells_to_delete(tmp_path):
  path = _csv(tmp_path / "note.csv", list(range(1, 8)) * 2)
  lines = path.read_text().splitlines()
  noted = lines[:5] + [lines[5] + ",check this one"] + lines[6:]  # on spreadsheet row 6
  path.write_text("\n".join(noted) + "\n")
  with pytest.raises(ValueError, match=r"found 13 columns, expected 12 \(header .*\); only row\(s\)"
                     r" 6 of 15 have cells beyond column 12 \(row 6, column 13: 'check this"
                     r" one'\): delete those cells\. Expected"):
    data.load_sfew_features(path)
  # A 13th column on every row is a layout problem: no rows are named.
  path.write_text("".join(line + ",x\n" for line in lines))
  with pytest.raises(ValueError, match=r"found 13 columns, expected 12 \(header [^)]*\)\."
                     r" Expected"):
    data.load_sfew_features(path)


# ----------------------------------------------------------------------------- flags


def test_words_split_off_an_unquoted_path_are_shown_quoted():
  path = "/data/my SFEW é/Train"
  line = ["prog", "--quick", "--data_path=/data/my", "SFEW", "é/Train", "--workdir=w"]
  with pytest.raises(app.UsageError, match=r"^Unexpected arguments: SFEW é/Train\. They continue"
                     r" --data_path=/data/my: the shell splits a value at spaces, so quote it:"
                     rf" --data_path='{path}'$"):
    _flags.check_no_args(["prog", "SFEW", "é/Train"], line)
  line = ["prog", "--data_path", "/data/my", "SFEW", "é/Train"]
  with pytest.raises(app.UsageError, match=rf"continue --data_path /data/my: .* --data_path="
                     rf"'{path}'$"):
    _flags.check_no_args(["prog", "SFEW", "é/Train"], line)
  with pytest.raises(app.UsageError, match=r"^Unexpected arguments: extra$"):
    _flags.check_no_args(["prog", "extra"], ["prog", "--quick", "extra"])
  _flags.check_no_args(["prog"], line)


def test_a_data_path_with_a_misspelt_data_name_reaches_the_unknown_data_error(tmp_path):
  def parse(*args):
    fv = flags.FlagValues()
    _flags.define_common_flags("features", fv)
    fv(["prog", *args])
    return fv

  # Not 'Add --data=sfew_features' to a user who gave --data=SFEW_features: the load names
  # the valid choices instead.
  assert parse("--data=SFEW_features", "--data_path=x.csv").data == "SFEW_features"
  with pytest.raises(flags.IllegalFlagValueError, match="Add --data=sfew_features"):
    parse("--data=features", "--data_path=x.csv")
  # The suggested --workdir outside an image tree is quoted when it holds a space.
  tree = tmp_path / "my data" / "SFEW"
  work = tmp_path / "my data" / "work"
  with pytest.raises(app.UsageError, match=rf"\(e\.g\. --workdir='{work}'\)\.$"):
    _flags.check_workdir_outside_data(str(tree / "out"), "sfew_images", str(tree))
