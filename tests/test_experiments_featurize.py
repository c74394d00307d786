"""The featurize binary: SFEW image tree -> course CSV, read back by load_sfew_features."""

import os
import subprocess
import sys
import types

import numpy as np
import pytest
from absl import app
from PIL import Image

from conftest import FakeCascade
from jaxprune import data
from jaxprune.data import features
from experiments import featurize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDERS = ["Angry", "disgust", "FEAR", "Happy", "neutral", "Sad", "SURPRISE"]
CONFIG = features.DescriptorConfig(phog_levels=2)
SIZE = (24, 20)


def _tree(root, per_class=3, box=False):
  """An SFEW-like tree of the bundled digit images (class k = digit k), saved as PNG."""
  ds = data.load_images(size=(30, 26), max_per_class=per_class)
  root.mkdir(parents=True, exist_ok=True)
  for folder in FOLDERS:
    (root / folder).mkdir(exist_ok=True)
  counts = [0] * 7
  for img, label in zip(ds.x, ds.y):
    pixels = (img[..., 0] * 200).astype(np.uint8)
    j = counts[label]
    counts[label] += 1
    if box and j % 2 == 0:
      pixels[3:20, 4:18] = 255
    name = f"Movie{label}_{j:09d}_{(label + j) % 4 + 1:08d}.png"
    Image.fromarray(pixels).save(root / FOLDERS[label] / name)
  return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  return _tree(tmp_path_factory.mktemp("sfew") / "SFEW")


def _read(path):
  with open(path) as f:
    return f.read()


def _run(tree, out, **kw):
  kw = {"config": CONFIG, "size": SIZE, "batch_size": 8, **kw}
  return featurize.run(str(tree), str(out), **kw)


def test_csv_round_trips_through_load_sfew_features(tree, tmp_path):
  out = tmp_path / "SFEW.csv"
  result = _run(tree, out)
  ds = data.load_sfew_features(out)
  assert len(ds) == 21 and ds.x.shape == (21, 10) and np.all(np.isfinite(ds.x))
  images = data.load_sfew_images(tree, size=SIZE, expected_size=None)
  expected, _ = features.extract_features(images.x[..., 0], CONFIG, batch_size=8)
  np.testing.assert_array_equal(ds.x, expected)  # written with repr: read back exactly
  np.testing.assert_array_equal(ds.y, images.y)
  assert list(ds.info["names"]) == [os.path.basename(n) for n in images.info["names"]]
  np.testing.assert_array_equal(ds.groups, images.groups)
  assert ds.info["num_dropped"] == 0
  report = _read(result["report"])
  assert "PCA fitted on all 21 images" in report and "Skipped (0)" in report


def test_bad_files_are_named_or_skipped_and_listed(tmp_path):
  root = _tree(tmp_path / "SFEW", per_class=2)
  (root / "Happy" / "notes.txt").write_text("not an image")
  (root / "Sad" / "broken.png").write_bytes(b"not a png")
  with pytest.raises(app.UsageError, match="notes.txt: not an image file"):
    _run(root, tmp_path / "a.csv")
  (root / "Happy" / "notes.txt").unlink()
  with pytest.raises(app.UsageError, match="broken.png: not a readable image"):
    _run(root, tmp_path / "a.csv")
  (root / "Happy" / "notes.txt").write_text("not an image")
  result = _run(root, tmp_path / "a.csv", on_error="skip")
  assert sorted(s["path"] for s in result["skipped"]) == ["Happy/notes.txt", "Sad/broken.png"]
  assert len(data.load_sfew_features(tmp_path / "a.csv")) == 14
  report = _read(result["report"])
  assert "Skipped (2)" in report and "Sad/broken.png" in report


def test_missing_or_empty_class_folders_fail(tmp_path):
  root = _tree(tmp_path / "SFEW", per_class=1)
  for f in (root / "Sad").iterdir():
    f.unlink()
  with pytest.raises(app.UsageError, match="class folder without images"):
    _run(root, tmp_path / "a.csv")
  (root / "Sad").rmdir()
  with pytest.raises(app.UsageError, match="no folder for class"):
    _run(root, tmp_path / "a.csv")
  assert not (tmp_path / "a.csv").exists()


def test_unwritable_output_fails_before_reading_any_image(tmp_path):
  missing = tmp_path / "no_such_tree"  # would fail too, but only after the output check
  with pytest.raises(app.UsageError, match="does not exist; create it first"):
    _run(missing, tmp_path / "no" / "SFEW.csv")
  with pytest.raises(app.UsageError, match="is a folder"):
    _run(missing, tmp_path)
  (tmp_path / "afile").write_text("")   # a file where a folder of the path belongs
  with pytest.raises(app.UsageError, match=f"{tmp_path / 'afile'} is a file, not a folder"):
    _run(missing, tmp_path / "afile" / "sub" / "SFEW.csv")
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    if not os.access(locked, os.W_OK):  # root ignores permissions
      with pytest.raises(app.UsageError, match="cannot write"):
        _run(missing, locked / "SFEW.csv")
  finally:
    locked.chmod(0o700)




@pytest.fixture
def fake_cv2(monkeypatch):
  monkeypatch.setitem(sys.modules, "cv2", types.SimpleNamespace(
      CascadeClassifier=FakeCascade, data=types.SimpleNamespace(haarcascades="")))


def test_frames_without_a_face_are_kept_whole_and_listed(tmp_path, fake_cv2):
  root = _tree(tmp_path / "SFEW", per_class=2, box=True)
  result = _run(root, tmp_path / "faces.csv", crop_faces=True)
  assert result["count"] == 14 and len(result["no_face"]) == 7  # every second frame
  assert "No face detected, kept whole (7)" in _read(result["report"])


def test_16bit_frames_give_the_features_of_their_8bit_version(tmp_path, fake_cv2):
  eight = _tree(tmp_path / "SFEW8", per_class=2, box=True)
  deep = tmp_path / "SFEW16"
  for f in eight.glob("*/*.png"):
    (deep / f.parent.name).mkdir(parents=True, exist_ok=True)
    with Image.open(f) as im:
      Image.fromarray(np.asarray(im).astype(np.uint16) * 257).save(deep / f.parent.name / f.name)
  for crop in (False, True):  # native size: no resizing, so exactly the same pixels
    kw = dict(size=(30, 26), crop_faces=crop)
    a = _run(eight, tmp_path / f"a{crop}.csv", **kw)
    b = _run(deep, tmp_path / f"b{crop}.csv", **kw)
    assert _read(a["out"]) == _read(b["out"]) and a["no_face"] == b["no_face"]


def test_command_line(tree, tmp_path):
  out = tmp_path / "cli.csv"
  cmd = [sys.executable, "-m", "experiments.featurize", f"--data_path={tree}", f"--out={out}",
         "--size=24,20", "--phog_levels=2", "--batch_size=8"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Wrote 21 rows" in proc.stdout
  assert len(data.load_sfew_features(out)) == 21
  bad = subprocess.run(cmd[:5] + ["--lpq_blocks=4"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, check=False)
  assert bad.returncode != 0 and "--lpq_blocks needs 2 comma-separated values" in bad.stderr
  assert "Traceback" not in bad.stderr


def test_impossible_descriptor_settings_fail_before_reading_any_image(tmp_path):
  missing = tmp_path / "no_such_tree"  # reading it would fail with another message
  out = tmp_path / "SFEW.csv"
  too_many_blocks = features.DescriptorConfig(phog_levels=2, lpq_blocks=(19, 2))  # 18 rows
  with pytest.raises(app.UsageError, match=r"--lpq_blocks=19,2 does not fit --size=24,20"):
    _run(missing, out, config=too_many_blocks)
  too_few_phog = features.DescriptorConfig(phog_bins=4, phog_levels=0)  # 4 values < 5 PCs
  with pytest.raises(app.UsageError, match=r"give 4 PHOG values, fewer than the 5"):
    _run(missing, out, config=too_few_phog)
  with pytest.raises(app.UsageError, match=r"--size=6,20 is too small"):
    _run(missing, out, size=(6, 20))
  assert not out.exists()


def test_identical_frames_stop_in_one_line_and_write_nothing(tmp_path):
  """Every frame alike (all black): the run wrote all-zero features and a report of NaN
  explained variances, and said nothing."""
  root = tmp_path / "SFEW"
  for k, folder in enumerate(FOLDERS):
    (root / folder).mkdir(parents=True)
    for j in range(2):
      Image.fromarray(np.zeros((30, 26), np.uint8)).save(
          root / folder / f"Movie{k}_{j:09d}_{k + 1:08d}.png")
  with pytest.raises(app.UsageError, match=f"--data_path={root}: All 14 images have the same "
                     "descriptor"):
    _run(root, tmp_path / "SFEW.csv")
  assert not (tmp_path / "SFEW.csv").exists()


def test_output_inside_a_class_folder_is_refused_before_reading(tmp_path):
  root = _tree(tmp_path / "SFEW", per_class=1)
  with pytest.raises(app.UsageError, match=r"lies inside a folder of --data_path"):
    _run(root, root / "Happy" / "SFEW.csv")
  assert not (root / "Happy" / "SFEW.csv").exists()
  # Beside the class folders it is fine: the next run skips it and lists it.
  _run(root, root / "SFEW.csv")
  again = _run(root, root / "SFEW.csv")
  assert {"SFEW.csv", "SFEW.report.md"} <= {s["path"] for s in again["skipped"]}


def test_progress_is_printed_while_describing(tree, tmp_path, capsys):
  _run(tree, tmp_path / "p.csv")
  printed = capsys.readouterr().out
  assert "Reading the SFEW images" in printed and "Read 21 images" in printed
  assert "described 21/21 images" in printed


def test_report_names_stretched_frames_and_persons(tree, tmp_path):
  # The tree's frames are 30x26 (height x width): 24x20 keeps their shape within 5 %.
  report = _read(_run(tree, tmp_path / "a.csv")["report"])
  assert "Stretched" not in report and "sizes before resizing: 30x26 (21)" in report
  persons = {(k + j) % 4 + 1 for k in range(7) for j in range(3)}
  assert f"Persons: {len(persons)} " in report
  # 20x20 squeezes their width / height ratio from 0.87 to 1.
  report = _read(_run(tree, tmp_path / "b.csv", size=(20, 20))["report"])
  assert "**Stretched**: 21 of 21 images (21 of 30x26" in report
  assert "--size=30,26" in report
  root = _tree(tmp_path / "SFEW", per_class=1)
  next((root / "Sad").iterdir()).rename(root / "Sad" / "smile.png")
  report = _read(_run(root, tmp_path / "c.csv")["report"])
  assert "Persons: none; 1 file name(s) carry no person id (e.g. Sad/smile.png)" in report


def test_stretch_advice_names_a_size_that_stretches_fewer_or_says_none_does():
  """Three shapes of 14 images each at --size=48,60 (the shape of one of them): the advice was
  --size=48,60, the size already passed."""
  class _Data:
    info = {"source_sizes": [((64, 80), 14), ((48, 60), 14), ((70, 70), 14)], "size": (48, 60)}

    def __len__(self):
      return 42

  note = featurize._stretch_note(_Data())
  assert note.startswith("14 of 42 images (14 of 70x70") and "--size=" not in note
  assert "No --size keeps every aspect ratio here" in note
  _Data.info = dict(_Data.info, size=(70, 70))
  assert "e.g. --size=64,80 (it stretches 14 of them)" in featurize._stretch_note(_Data())
