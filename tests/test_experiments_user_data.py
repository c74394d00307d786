"""The experiment binaries on a user's own SFEW copy: hand-made tiny copies (a features CSV,
an image tree), bad input failing in one line before the study's folder is opened, and the
report saying which data were read and how they were split."""

import os

import numpy as np
import pytest
from absl import app

from experiments import _mlp_common as mc
from experiments import _store
from experiments import ga_vs_distinctiveness as gvd
from experiments import iterative_pruning as ip
from jaxprune import data as data_lib

HEADER = ",label," + ",".join([f"LPQ feature {i}" for i in range(1, 6)]
                              + [f"PHOG feature {i}" for i in range(1, 6)])


def _features_csv(path, persons_of):
  """A features CSV in SFEW's layout: 6 rows per class, ``persons_of(label, j)`` the person
  id written into row j's image name (None: a name without one)."""
  rng = np.random.default_rng(0)
  lines = [HEADER]
  for label in range(1, 8):
    for j in range(6):
      p = persons_of(label, j)
      name = f"Movie_{label}{j:03d}_{p:08d}.mat" if p is not None else f"M{label}_{j}_x.mat"
      lines.append(f"{name},{label}," + ",".join(f"{v:.5f}" for v in rng.normal(size=10)))
  path.write_text("\n".join(lines) + "\n")
  return str(path)


def _image_tree(root):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  for name in ("Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad", "Surprise"):
    os.makedirs(root / name)
    for j in range(2):
      Image.fromarray((rng.random((20, 24)) * 255).astype(np.uint8)).save(
          root / name / f"Movie_{j:03d}_{j:08d}.png")
  return str(root)


# ----------------------------------------------------------------------------- folds


def test_person_folds_without_a_class_fail_in_one_line_before_the_study(tmp_path):
  """Every 'fear' row comes from one person, so a person-independent fold holding that person
  has no fear example to train on, whatever the seed or --folds. The library's ValueError
  used to escape as a traceback from ``cv_folds``, after the study's folder was opened."""
  path = _features_csv(tmp_path / "SFEW.csv", lambda label, j: 99 if label == 3 else j % 3)
  ds = _store.load_data("sfew_features", path)
  assert sorted(set(ds.groups[ds.y == 2].tolist())) == ["00000099"]   # the hand-built case
  match = (r"^Cannot make --folds=2 cross-validation folds: .*no training example of class "
           r"'fear'.* No smaller --folds splits these data either")
  with pytest.raises(app.UsageError, match=match):
    mc.check_folds(ds, 2, seed=0)            # before a study opens its folder
  with pytest.raises(app.UsageError, match=match) as e:
    mc.cv_folds(ds, 2, seed=0)               # and never a traceback
  # The library's advice names arguments the binaries do not have.
  text = str(e.value)
  assert "test_fraction" not in text and "person_independent" not in text and "\n" not in text


@pytest.mark.parametrize("study", [gvd, ip], ids=["ga_vs_distinctiveness", "iterative"])
def test_studies_check_their_seeds_folds_before_opening_their_folder(study, tmp_path):
  """The studies call check_folds with their seed: the impossible folds stop them before the
  work folder exists (it used to hold a settings.json and a lock after the traceback)."""
  path = _features_csv(tmp_path / "SFEW.csv", lambda label, j: 99 if label == 3 else j % 3)
  work = tmp_path / "w"
  cfg = study.Config.quick()
  cfg = type(cfg)(**{**cfg.__dict__, "folds": 2})
  with pytest.raises(app.UsageError, match=r"^Cannot make --folds=2 cross-validation folds"):
    study.run(cfg, str(work), data="sfew_features", data_path=path)
  assert not work.exists()


def test_split_kind_names_person_splits():
  x = np.zeros((4, 10), np.float32)
  y = np.array([0, 1, 0, 1])
  names = ("a", "b")
  assert mc.split_kind(data_lib.Dataset(x, y, names)) == "stratified"
  assert mc.split_kind(data_lib.Dataset(x, y, names, groups=np.array(["p", "p", "q", "q"]))) == (
      "person-independent")


def test_folds_of_a_seed_that_work_pass_the_check(tmp_path):
  path = _features_csv(tmp_path / "SFEW.csv", lambda label, j: j % 3)   # 3 persons, all classes
  ds = _store.load_data("sfew_features", path)
  mc.check_folds(ds, 3, seed=0)
  folds = mc.cv_folds(ds, 3, seed=0)
  # Independent reference: the persons of each test fold are disjoint from its training part.
  for f, (tr, te) in enumerate(data_lib.kfold(ds, n_splits=3, seed=0, person_independent=True)):
    assert not set(ds.groups[tr].tolist()) & set(ds.groups[te].tolist())
    assert folds.n_te[f] == len(te) and folds.n_tr[f] == len(tr)


# ----------------------------------------------------------------------------- wrong kind of path


def test_image_tree_given_to_an_mlp_study_names_featurize(tmp_path):
  tree = _image_tree(tmp_path / "SFEW")
  work = tmp_path / "w"
  with pytest.raises(app.UsageError, match=r"^--data_path=.*SFEW is the SFEW image tree .*"
                     r"python -m experiments\.featurize --data_path=.*--data=sfew_images\)\.$"):
    gvd.run(gvd.Config.quick(), str(work), data="sfew_features", data_path=tree)
  assert not work.exists()
  # A path with a space is quoted, so that the suggested command can be pasted into a shell.
  spaced = _image_tree(tmp_path / "my SFEW")
  with pytest.raises(app.UsageError, match=r"^--data_path='.*/my SFEW' is the SFEW image tree "
                     r".*python -m experiments\.featurize --data_path='.*/my SFEW' --out="):
    gvd.run(gvd.Config.quick(), str(work), data="sfew_features", data_path=spaced)
  # A folder that holds the features file beside the class folders still loads it.
  _features_csv(tmp_path / "SFEW" / "SFEW.csv", lambda label, j: j % 3)
  assert len(mc.load_features("sfew_features", tree)) == 42


# ----------------------------------------------------------------------------- the report


def _report(tmp_path, ds, path):
  s = _store.Study("rep", {"data": "sfew_features", "data_path": path}, str(tmp_path / "w"),
                   data=ds)
  s.write_report("T", [("X", "x")])
  with open(os.path.join(s.dir, "REPORT.md")) as f:
    return f.read(), s.data


def test_report_names_the_users_file_and_how_persons_split_it(tmp_path):
  path = _features_csv(tmp_path / "SFEW.csv", lambda label, j: j % 3)
  ds = _store.load_data("sfew_features", path)
  text, record = _report(tmp_path, ds, path)
  assert f"read from `{os.path.abspath(path)}`" in text
  assert record["persons"] == 3 and record["no_person"] == []
  assert "Persons: 3, read from the file names; every split and fold is person-independent" \
      in text


def test_report_names_files_without_persons(tmp_path):
  path = _features_csv(tmp_path / "SFEW.csv", lambda label, j: None if label == 5 else j)
  ds = _store.load_data("sfew_features", path)
  assert ds.groups is None
  text, record = _report(tmp_path, ds, path)
  assert record["persons"] is None and len(record["no_person"]) == 6
  assert ("Persons: none. 6 file name(s) carry no person id (e.g. `M5_0_x.mat`" in text
          and "stratified by class, not person-independent" in text)


def test_bundled_data_report_says_nothing_of_persons(tmp_path):
  ds = data_lib.load("features")
  s = _store.Study("rep", {"data": "features"}, str(tmp_path), data=ds)
  s.write_report("T", [])
  with open(os.path.join(s.dir, "REPORT.md")) as f:
    text = f.read()
  assert "Persons" not in text and "read from" not in text


# ----------------------------------------------------------------------------- the store


def test_probe_removed_by_a_run_starting_beside_it_is_no_write_error(tmp_path, monkeypatch):
  """A second run cleans ``.write-test*`` leftovers when it starts; a run whose probe it removed
  between creating and removing it stopped with 'Cannot write to the work folder'."""
  real = _store.tempfile.mkstemp

  def mkstemp(*args, **kwargs):
    fd, name = real(*args, **kwargs)
    if ".write-test" in os.path.basename(name):
      os.remove(name)          # what the other run's cleaning does
    return fd, name

  monkeypatch.setattr(_store.tempfile, "mkstemp", mkstemp)
  s = _store.Study("probe", {"seed": 0}, str(tmp_path))
  assert os.path.isdir(s.dir)
  s.release()


def test_a_data_path_with_bundled_data_is_refused_from_python(tmp_path):
  """``run(config, data='features', data_path=...)`` (the command line refuses the pair) ran on
  the bundled diabetes data and recorded the user's file as the data's path."""
  path = _features_csv(tmp_path / "SFEW.csv", lambda label, j: j % 3)
  work = tmp_path / "w"
  with pytest.raises(app.UsageError, match=r"^--data_path=.* only --data=sfew_features .*"
                     r"--data=features is bundled"):
    gvd.run(gvd.Config.quick(), str(work), data="features", data_path=path)
  assert not work.exists()
