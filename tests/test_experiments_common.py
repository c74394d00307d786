"""The experiment infrastructure: atomic files, resumable cache, tables, clear failures."""

import json
import os
import re

import numpy as np
import pytest
from absl import app

from experiments import _mlp_common
from experiments import _report
from experiments import _store


def test_atomic_write_leaves_no_partial_file(tmp_path):
  path = tmp_path / "a.json"
  _store.write_json(str(path), {"x": np.arange(3), "y": np.float32(0.5)})
  assert json.loads(path.read_text()) == {"x": [0, 1, 2], "y": 0.5}

  # A write that fails half-way (here: text where bytes are expected, after the temporary file
  # was created) leaves the previous file intact and no temporary file behind.
  with pytest.raises(TypeError):
    _store.atomic_write_bytes(str(path), "not bytes")
  assert json.loads(path.read_text()) == {"x": [0, 1, 2], "y": 0.5}  # old content intact
  assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temp file left behind


def test_cached_runs_once_per_settings_and_resumes(tmp_path):
  calls = []

  def work():
    calls.append(1)
    return {"acc": np.array([0.25, 0.5])}

  s = _store.Study("demo", {"lr": 0.1}, workdir=str(tmp_path))
  first = s.cached("cfg lr=0.1/fold 0", work)
  s2 = _store.Study("demo", {"lr": 0.1}, workdir=str(tmp_path))
  again = s2.cached("cfg lr=0.1/fold 0", work)
  assert first == again == {"acc": [0.25, 0.5]} and len(calls) == 1 and s2.resumed == 1
  other = _store.Study("demo", {"lr": 0.2}, workdir=str(tmp_path))
  other.cached("cfg lr=0.1/fold 0", work)
  assert len(calls) == 2 and other.fingerprint != s.fingerprint


def test_tables_and_report(tmp_path):
  rows = [{"H": 10, "acc": 0.123456}, {"H": 20, "acc": 0.5}]
  md = _report.write_table(str(tmp_path), "t", rows)
  assert md.splitlines()[0] == "| H | acc |" and "| 10 | 0.1235 |" in md
  assert (tmp_path / "t.csv").read_text().splitlines() == ["H,acc", "10,0.123456", "20,0.5"]
  s = _store.Study("rep", {"a": 1}, workdir=str(tmp_path))
  s.write_report("Title", [("Table", md), ("Figure", "![](f.png)")])
  text = (tmp_path / "rep" / "REPORT.md").read_text()
  assert text.startswith("# Title") and "## Figure" in text and '"a": 1' in text


def test_unwritable_workdir_and_unknown_data_fail_clearly(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  with pytest.raises(app.UsageError, match="Pass a writable --workdir"):
    _store.Study("x", {}, workdir=str(blocker))
  with pytest.raises(app.UsageError, match=r"--workdir is empty.*--workdir=\. for the current"):
    _store.Study("x", {}, workdir="")   # it wrote the study into the current folder
  with pytest.raises(app.UsageError, match="Unknown --data='mnist'"):
    _store.load_data("mnist", None)
  with pytest.raises(app.UsageError, match="needs --data_path"):
    _store.load_data("sfew_features", None)
  with pytest.raises(app.UsageError, match="Could not load --data=sfew_features"):
    _store.load_data("sfew_features", str(tmp_path / "missing.xlsx"))
  assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_output_files_honour_the_umask(tmp_path, umask):
  old = os.umask(umask)
  try:
    _store.write_text(str(tmp_path / "t.md"), "x")
    _store.save_tree(str(tmp_path / "p.npz"), {"a": np.zeros(2)})
    _store.write_text(str(tmp_path / "t.md"), "replaced")  # a replaced file too
    with open(tmp_path / "plain", "w") as f:  # what a plain open gives
      f.write("x")
  finally:
    os.umask(old)
  want = 0o666 & ~umask
  assert (tmp_path / "plain").stat().st_mode & 0o777 == want
  for name in ("t.md", "p.npz"):
    assert (tmp_path / name).stat().st_mode & 0o777 == want, name


def _locked(path) -> bool:
  """Whether some open file description holds the flock on ``path``."""
  import fcntl  # pylint: disable=g-import-not-at-top
  fd = os.open(path, os.O_RDWR)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return False
  except BlockingIOError:
    return True
  finally:
    os.close(fd)


def test_a_failed_run_releases_its_locks(tmp_path, monkeypatch):
  from experiments import _flags  # pylint: disable=import-outside-toplevel
  made = {}

  def failing_run(config, workdir, **kw):
    del config, kw
    made["study"] = _store.Study("fails", {"a": 1}, workdir=workdir)
    lock = tmp_path / "fails" / ".lock"
    assert _locked(lock) and lock.read_text().startswith(f"pid {os.getpid()}")
    raise RuntimeError("boom")

  monkeypatch.setattr(_flags, "config_from_flags", lambda cls: None)
  monkeypatch.setattr(_flags, "FLAGS", type("F", (), {"workdir": str(tmp_path), "data": None,
                                                      "data_path": None})())
  monkeypatch.setattr(_flags._speed, "enable_from_flags", lambda: None)
  with pytest.raises(RuntimeError, match="boom"):
    _flags.run_main(["binary"], None, failing_run)
  lock = tmp_path / "fails" / ".lock"
  assert not _locked(lock) and not _locked(os.path.join(made["study"].cache_dir, ".lock"))
  assert lock.read_text() == ""  # an unheld lock file names no process


def test_feature_studies_refuse_image_data_before_loading_it(tmp_path):
  """--data=sfew_images on an MLP study loaded the whole tree first and then failed on the
  frame size, advising --any_size, a flag these binaries do not have."""
  from experiments import _mlp_common  # pylint: disable=import-outside-toplevel
  from experiments import progressive_compression  # pylint: disable=import-outside-toplevel
  tree = tmp_path / "no_such_tree"            # never read: the check comes first
  with pytest.raises(app.UsageError, match="holds images.*sfew_features.*featurize"):
    _mlp_common.load_features("sfew_images", str(tree))
  with pytest.raises(app.UsageError, match="holds images.*sfew_features"):
    progressive_compression.run(progressive_compression.Config.quick(), str(tmp_path / "w"),
                                data="images")
  assert not (tmp_path / "w").exists()


def test_report_and_results_say_what_the_loader_left_out(tmp_path):
  """A feature row dropped for a NaN was recorded only in the log: REPORT.md and results.json
  said '69 examples' and nothing of the row left out."""
  from jaxprune import data  # pylint: disable=import-outside-toplevel
  ds = data.Dataset(np.zeros((6, 2), np.float32), np.arange(6) % 2, ("a", "b"), info={
      "source": "test", "dropped": [{"row": np.int64(4), "name": "x.mat",
                                     "reason": "missing PHOG feature 3"}],
      "skipped": [{"path": "Sad/Thumbs.db", "reason": "hidden entry"}]})
  s = _store.Study("rep", {"a": 1}, workdir=str(tmp_path), data=ds)
  s.write_report("Title", [("Table", "x")])
  text = (tmp_path / "rep" / "REPORT.md").read_text()
  assert "The loader dropped 1 row: row 4 (x.mat): missing PHOG feature 3." in text
  assert "The loader skipped 1 entry: `Sad/Thumbs.db` (hidden entry)." in text
  record = _store.data_record(ds, "test")
  assert record["dropped"] == [{"row": 4, "name": "x.mat", "reason": "missing PHOG feature 3"}]
  json.dumps(record)


def test_data_path_without_an_sfew_dataset_is_refused():
  """--data_path alone used to run on the bundled data (results.json then recorded the user's
  path beside the bundled name)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from experiments import _flags, similarity_bounds as sb  # pylint: disable=import-outside-toplevel
  fv = flags.FlagValues()
  _flags.define_flags(sb.Config, default_data="features", flag_values=fv)
  with pytest.raises(flags.IllegalFlagValueError, match="only --data=sfew_features"):
    fv(["prog", "--data_path=/my/SFEW.csv"])
  fv2 = flags.FlagValues()
  _flags.define_flags(sb.Config, default_data="features", flag_values=fv2)
  fv2(["prog", "--data_path=/my/SFEW.csv", "--data=sfew_features"])
  assert fv2.data_path == "/my/SFEW.csv"


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0, 0.0])
def test_learning_rates_and_penalties_must_be_finite(value):
  """--lr=inf passed the 'positive' check (inf > 0) and failed with a traceback after the study
  had written its lock and settings; --ga_lambda=nan ran a GA on NaN fitness and exited 0. Both
  are usage errors now, raised by validate() before anything is written."""
  import dataclasses
  import importlib
  studies = {"iterative_pruning": "lr", "kernel_importance": "learning_rate",
             "progressive_compression": "lr", "similarity_bounds": "lr",
             "training_time_distinctiveness": "learning_rate", "lottery_ticket": "learning_rate"}
  for name, flag in studies.items():
    config = importlib.import_module(f"experiments.{name}").Config()
    with pytest.raises(app.UsageError, match=f"--{flag} must be a positive finite number"):
      dataclasses.replace(config, **{flag: value}).validate()
  if not (abs(value) < float("inf") and value >= 0):   # 0 is a valid penalty
    config = importlib.import_module("experiments.iterative_pruning").Config(ga_lambda=value)
    with pytest.raises(app.UsageError, match="--ga_lambda must be"):
      config.validate()


def _tiny_tree(root, per_class=3):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  for label, folder in enumerate(["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad",
                                  "Surprise"]):
    (root / folder).mkdir(parents=True)
    for j in range(per_class):
      Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(
          root / folder / f"Movie{label}_{j:09d}_{j + 1:08d}.png")
  return root


def test_workdir_inside_the_image_tree_is_refused_on_the_command_line(tmp_path):
  """The rerun of a binary whose --workdir lay inside --data_path read the study folder as a
  class folder and told the user to remove it; the binary now stops first, in one line, naming
  both flags, before loading or writing anything."""
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  tree = _tiny_tree(tmp_path / "SFEW")
  (tree / "kernel_importance").mkdir()  # left by a run from before this check
  before = sorted(p.name for p in tree.iterdir())
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
  out = subprocess.run(
      [sys.executable, "-m", "experiments.kernel_importance", "--quick", "--any_size",
       "--data=sfew_images", f"--data_path={tree}", f"--workdir={tree}"],
      cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 2, out.stderr
  error = [line for line in out.stderr.splitlines() if line.startswith("Error:")]
  assert len(error) == 1 and "--workdir=" in error[0] and "--data_path=" in error[0]
  assert "not a class" not in out.stderr and "pass a --workdir outside" in error[0]
  assert sorted(p.name for p in tree.iterdir()) == before


def test_data_path_with_a_tilde_is_recorded_expanded(tmp_path, monkeypatch):
  """--data_path=~/x was recorded in results.json as <cwd>/~/x."""
  from jaxprune import data  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.chdir(tmp_path)
  ds = data.Dataset(np.zeros((4, 2), np.float32), np.arange(4) % 2, ("a", "b"))
  record = _store.data_record(ds, "sfew_features", "~/x/SFEW.csv")
  assert record["path"] == os.path.join(str(tmp_path), "x", "SFEW.csv")
  s = _store.Study("tilde", {"data": "sfew_features", "data_path": "~/x/SFEW.csv"},
                   workdir=str(tmp_path / "w"), data=ds)
  assert s.data["path"] == os.path.join(str(tmp_path), "x", "SFEW.csv")
  s = _store.Study("tilde", {"data": "features"}, workdir="~/runs", data=ds)   # --workdir=~/runs
  assert s.dir == os.path.join(str(tmp_path), "runs", "tilde") and os.path.isdir(s.dir)
  assert not os.path.exists(tmp_path / "~")


def test_report_lists_dark_frames_and_missing_persons():
  from jaxprune import data  # pylint: disable=import-outside-toplevel
  from experiments import _cnn_common as cc  # pylint: disable=import-outside-toplevel
  ds = data.Dataset(np.zeros((2, 4, 4, 1), np.float32), [0, 1], ("a", "b"), info={
      "source": "SFEW images", "dark": ["Sad/x_1_00000002.png"], "no_person": ["Angry/a.png"]})
  text = cc.data_description(ds, "sfew_images")
  assert "1 16-bit frame(s) hold only values below 4096 and load dark" in text
  assert "`Sad/x_1_00000002.png`" in text and "e.g. `Angry/a.png`" in text


def test_feature_studies_person_split_names_the_test_fraction_flag():
  """3 persons and --test_fraction=0.2 (5 person folds): the MLP studies' message named
  'fewer folds' and 'person_independent=False', which are no flags of theirs; it now says
  which --test_fraction works, as the image studies' message does."""
  from experiments import _mlp_common as mc   # pylint: disable=import-outside-toplevel
  import jaxprune   # pylint: disable=import-outside-toplevel
  x = np.random.default_rng(0).normal(size=(30, 10)).astype(np.float32)
  ds = jaxprune.data.Dataset(x, np.arange(30) % 7, [str(i) for i in range(7)],
                             groups=np.arange(30) % 3)
  with pytest.raises(app.UsageError, match=r"the file names carry 3 persons \(0: 10 examples, "
                     r".*persons come from the file names.*5 person folds \(--test_fraction, "
                     r"now 0\.2\).*pass --test_fraction=0\.33 \(round\(1/0\.33\) = 3 person "
                     r"folds, which splits these data\)") as e:
    mc.train_test_or_fail(ds, 0.2, 0)
  assert "person_independent" not in str(e.value) and "fewer folds" not in str(e.value)
  train, test = mc.train_test_or_fail(ds, 0.33, 0)
  assert not set(train.groups.tolist()) & set(test.groups.tolist())
  # 4 persons: ceil(100 / 4) / 100 = 0.25 was suggested and failed too (a class with fewer
  # than 4 examples); the fraction suggested now is one whose split was tried and works.
  y = np.repeat(np.arange(7), 3)[:20]
  ds = jaxprune.data.Dataset(x[:20], y, [str(i) for i in range(7)],
                             groups=np.array([f"{i % 4 + 1:08d}" for i in range(20)]))
  with pytest.raises(app.UsageError, match=r"--test_fraction=(\S+) \(round") as e:
    mc.train_test_or_fail(ds, 0.2, 0)
  suggested = float(re.search(r"--test_fraction=(\S+) \(round", str(e.value)).group(1))
  assert suggested != 0.25
  train, test = mc.train_test_or_fail(ds, suggested, 0)
  assert not set(train.groups.tolist()) & set(test.groups.tolist())


def test_reports_give_the_split_shares_the_runs_have():
  """A person split of 84 rows (6 persons) has 28 test rows: the reports said '80%/20%'."""
  share = _mlp_common.split_share
  assert share([(range(80), range(20))] * 3, 0.2, by_person=False) == "80%/20%"
  assert share([(range(56), range(28))], 0.2, by_person=True) == (
      "67%/33% (--test_fraction=0.2 asked for about 20%; each person is kept whole)")
  assert share([(range(80), range(20)), (range(79), range(21))], 0.2, by_person=False) == (
      "79-80%/20-21% (--test_fraction=0.2 asked for about 20%; each class's share is rounded)")
