"""The experiment binaries' work folder (``experiments/_store.py``) probed as a user would: a
resumed step returns what a fresh one did (key order included), the report's resumed-step count
and compute time, and damaged work folders stopping with one line that names the problem."""

import errno
import fcntl
import json
import os
import re
import time

import numpy as np
import pytest
from absl import app

from experiments import _flags
from experiments import _store

DATA = {"name": "demo", "version": "1", "sha256": "0" * 64}


def _study(tmp_path, **settings):
  return _store.Study("demo", {"seed": 0, **settings}, str(tmp_path), data=DATA)


@pytest.fixture(autouse=True)
def _no_locks_left():
  yield
  _store.release_all_locks()


# ----------------------------------------------------------------------------- resume


def test_a_resumed_step_returns_its_dicts_in_the_order_a_fresh_one_did(tmp_path):
  # A record whose keys are not in sorted order, at every level (a dict in a list too):
  # before, the cache file was written with sorted keys, so a resumed run got them sorted
  # while a fresh one got them in the order the step built them, and a table or list built
  # by iterating a record came out in another order after a resume.
  record = {"layer10": {"kept": 1, "units": 2}, "layer2": {"z": 0, "a": 1},
            "rows": [{"b": 1, "a": 2}]}
  fresh = _study(tmp_path).cached("step", lambda: record)
  resumed_study = _study(tmp_path)
  resumed = resumed_study.cached("step", lambda: pytest.fail("recomputed"))
  assert resumed_study.resumed == 1
  assert list(fresh) == list(resumed) == ["layer10", "layer2", "rows"]
  assert list(resumed["layer10"]) == ["kept", "units"]
  assert list(resumed["layer2"]) == ["z", "a"]
  assert list(resumed["rows"][0]) == ["b", "a"]
  assert json.dumps(fresh) == json.dumps(resumed)  # the same bytes wherever they are written


def test_results_json_keeps_sorted_keys(tmp_path):
  s = _study(tmp_path)
  s.write_results({"b": 1, "a": 2})
  s.write_report("T", [])
  text = (tmp_path / "demo" / "results.json").read_text()
  body = json.loads(text)
  assert list(body) == sorted(body) and list(body["results"]) == ["a", "b"]


def test_a_tree_step_taken_from_the_cache_is_counted_in_the_report(tmp_path):
  # The trained networks (cached_tree) are the costly step; a resumed run said "0 steps taken
  # from the cache" although it trained nothing.
  s = _study(tmp_path)
  s.cached_tree("params", lambda: {"w": np.arange(3.0)})
  assert s.resumed == 0
  s2 = _study(tmp_path)
  tree = s2.cached_tree("params", lambda: pytest.fail("recomputed"))
  np.testing.assert_array_equal(tree["w"], [0.0, 1.0, 2.0])
  assert s2.resumed == 1
  s2.write_report("T", [])
  assert "1 steps taken from the cache" in (tmp_path / "demo" / "REPORT.md").read_text()


def test_fully_resumed_reruns_do_not_add_their_time_to_the_compute_time(tmp_path):
  first = _study(tmp_path)
  first.cached("step", lambda: time.sleep(0.2) or 1)
  time.sleep(0.2)  # work after the last cached step (tables, figures): redone by every rerun
  first.write_results({})
  first.write_report("T", [])
  priors = []
  for _ in range(2):  # reruns that compute nothing
    again = _study(tmp_path)
    assert again.cached("step", lambda: pytest.fail("recomputed")) == 1
    priors.append(again._prior_seconds)  # pylint: disable=protected-access
    time.sleep(0.2)
    again.write_results({})
    again.write_report("T", [])
  # Earlier invocations count up to their last cached step: the 0.2 s step, not the 0.2 s
  # after it, and not the reruns' own time (before, each rerun added its ~0.2 s).
  assert 0.2 <= priors[0] < 0.35 and priors[1] == priors[0]


@pytest.mark.parametrize("text", ['{"seconds": NaN}', '{"seconds": -5}',
                                  '{"seconds": Infinity}', '[3]', '\xff'])
def test_a_damaged_compute_time_restarts_from_zero(tmp_path, capsys, text):
  s = _study(tmp_path)
  s.cached("step", lambda: 1)
  s.release()
  with open(os.path.join(s.cache_dir, "compute_seconds.json"), "w", encoding="latin-1") as f:
    f.write(text)
  s2 = _study(tmp_path)
  assert s2._prior_seconds == 0.0  # pylint: disable=protected-access  # NaN, a negative or an infinite time is no time
  assert "compute_seconds.json is damaged" in capsys.readouterr().err


def test_a_damaged_tree_file_is_named_once(tmp_path, capsys):
  s = _study(tmp_path)
  s.cached_tree("t", lambda: {"w": np.ones(2)})
  path = s.cache_file("t", ".npz")
  s.release()
  open(path, "wb").close()
  s2 = _study(tmp_path)
  np.testing.assert_array_equal(s2.cached_tree("t", lambda: {"w": np.zeros(2)})["w"], [0, 0])
  err = capsys.readouterr().err
  assert err.count(path) == 1 and "computing that step again" in err
  assert "delete it" not in err  # the store removes it itself


# ----------------------------------------------------------------------------- damaged folders


def _make(tmp_path, what):
  """A work folder damaged by hand: ``what`` names the path (relative to tmp_path) made a file
  (or a folder), and returns the workdir to pass and the path the message must name."""
  study = tmp_path / "demo"
  if what == "workdir is a file":
    (tmp_path / "w").write_text("x")
    return str(tmp_path / "w"), str(tmp_path / "w")
  if what == "study folder is a file":
    study.write_text("x")
    return str(tmp_path), str(study)
  s = _study(tmp_path)
  s.cached("step", lambda: 1)
  s.release()
  if what == "cache is a file":
    for root, dirs, files in os.walk(study / "cache", topdown=False):
      for f in files:
        os.remove(os.path.join(root, f))
      for d in dirs:
        os.rmdir(os.path.join(root, d))
    os.rmdir(study / "cache")
    (study / "cache").write_text("x")
    return str(tmp_path), str(study / "cache")
  if what == ".lock is a folder":
    os.remove(study / ".lock")
    os.makedirs(study / ".lock")
    return str(tmp_path), str(study / ".lock")
  if what == "results.json is a folder":
    os.makedirs(study / "results.json")
    return str(tmp_path), str(study / "results.json")
  raise AssertionError(what)


@pytest.mark.parametrize("what", ["workdir is a file", "study folder is a file",
                                  "cache is a file", ".lock is a folder",
                                  "results.json is a folder"])
def test_a_damaged_work_folder_fails_in_one_line_naming_the_path(tmp_path, what):
  workdir, named = _make(tmp_path, what)
  with pytest.raises(app.UsageError) as e:
    _store.Study("demo", {"seed": 0}, workdir, data=DATA)
  message = str(e.value)
  assert f"'{named}' is a " in message, message
  assert "--workdir" in message and "\n" not in message
  # The failed start holds no lock: a repaired folder opens at once.
  assert not _store._Lock._held  # pylint: disable=protected-access


def test_a_step_file_that_is_a_folder_fails_in_one_line(tmp_path):
  s = _study(tmp_path)
  os.makedirs(s.cache_file("step", ".json"))
  with pytest.raises(app.UsageError, match=re.escape(
      f"'{s.cache_file('step', '.json')}' is a folder, where the study keeps a file")):
    s.cached("step", lambda: 1)


def test_a_cache_folder_this_user_may_not_write_fails_in_one_line(tmp_path, monkeypatch):
  """A finished run's cache folder made unwritable (another user's, a read-only copy): the
  lock file still opened, so the settings' write was the first to fail, with a traceback
  through atomic_write_bytes naming its temporary file. One line now names the folder."""
  s = _study(tmp_path)
  cache = s.cache_dir
  s.release()
  real = _store.tempfile.mkstemp
  def mkstemp(*args, dir=None, **kwargs):  # pylint: disable=redefined-builtin
    if os.path.samefile(dir, cache):
      raise PermissionError(errno.EACCES, "Permission denied",
                            os.path.join(dir, f"{_store.TMP_PREFIX}1-xsettings.json"))
    return real(*args, dir=dir, **kwargs)
  monkeypatch.setattr(_store.tempfile, "mkstemp", mkstemp)
  with pytest.raises(app.UsageError) as e:
    _study(tmp_path)
  assert str(e.value) == (
      f"Cannot use the work folder {os.path.dirname(os.path.dirname(cache))!r}: {cache!r} "
      "(Permission denied). Check its permissions and free space, or pass another --workdir.")
  assert not _store._Lock._held  # pylint: disable=protected-access


@pytest.mark.parametrize("error, line", [
    (PermissionError(errno.EPERM, "Operation not permitted", f"/w/s/{_store.TMP_PREFIX}7-xR.md",
                     None, "/w/s/REPORT.md"),
     "Error: Operation not permitted on '/w/s/REPORT.md'. Make it writable (or readable) for "
     "this user, or pass another --workdir (or --data_path, if it is your data)."),
    (OSError(errno.ENOSPC, "No space left on device", f"/w/s/cache/{_store.TMP_PREFIX}7-xa.npz"),
     "Error: No space left on device on '/w/s/cache'. Free disk space there (or raise the "
     "quota), or pass a --workdir on another disk."),
    (PermissionError(errno.EACCES, "Permission denied"),
     "Error: Permission denied. Make it writable"),
])
def test_a_file_the_run_may_not_write_or_a_full_disk_is_one_line(capsys, error, line):
  """Past the start's checks (REPORT.md another user's, at the end of a run; a disk that fills
  up) such errors printed a traceback. One line names the path (a rename's target; a
  temporary file's folder), exit status 1; other OSErrors stay tracebacks (bugs)."""
  def main(argv):
    raise error
  with pytest.raises(SystemExit) as e:
    _flags.one_line_usage_errors(main)(["prog"])
  assert e.value.code == 1
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(line), err
  assert err[0].endswith("run the same command again to resume from them.")
  def other(argv):
    raise FileNotFoundError(errno.ENOENT, "No such file or directory", "/w/x")
  with pytest.raises(FileNotFoundError):
    _flags.one_line_usage_errors(other)(["prog"])


def test_a_file_system_without_locks_fails_in_one_line(tmp_path, monkeypatch):
  def flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")
  monkeypatch.setattr(fcntl, "flock", flock)
  with pytest.raises(app.UsageError, match=r"does not support file locks.*local disk"):
    _study(tmp_path)
