"""Reliability (issue 14): no stale results, no silent nonsense, no tracebacks, nothing left
half-written.

Library checks run in-process on tiny shapes; the experiment machinery (``experiments/_store``,
``_flags``) is tested on its own and through short command lines (flags only, no training).
"""

import json
import os
import re
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app
from absl import flags

import jaxprune
from jaxprune import ga
from jaxprune import validate
from experiments import _flags
from experiments import _store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = jaxprune.MLP(in_features=4, hidden=(6,), out_features=3)
PARAMS = MODEL.init(jax.random.key(0))
X = jax.random.normal(jax.random.key(1), (12, 4))
Y = jnp.arange(12) % 3
TINY_GA = ga.GAConfig(population_size=6, hof_size=1, tournament_size=2, generations=1)


def _search(params=PARAMS, x=X, y=Y):
  return ga.search(MODEL, params, x, y, "hidden_0", key=jax.random.key(0), config=TINY_GA,
                   progress=False)


def _py(code, *, cwd=ROOT, timeout=180):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


# ----------------------------------------------------------------------------- 2: shared check


def test_ga_search_rejects_garbage():
  with pytest.raises(ValueError, match="NaN or infinite"):
    _search(x=jnp.full_like(X, jnp.nan))
  nan_params = jax.tree.map(lambda a: a, PARAMS)
  nan_params["params"]["hidden_0"]["kernel"] = nan_params["params"]["hidden_0"]["kernel"].at[
      0, 0].set(jnp.nan)
  with pytest.raises(ValueError, match=r"params\[params/hidden_0/kernel\] holds 1 NaN"):
    _search(params=nan_params)
  with pytest.raises(ValueError, match=r"labels range over \[0, 3\] but the model has 3"):
    _search(y=Y.at[0].set(3))
  with pytest.raises(ValueError, match=r"labels range over \[-1, 2\]"):
    _search(y=Y.at[0].set(-1))
  with pytest.raises(ValueError, match="integer class indices"):
    _search(y=Y.astype(jnp.float32))
  assert _search().mask.shape == (6,)  # clean data still run


def test_every_entry_point_uses_the_one_shared_check(monkeypatch):
  calls = []
  real = validate.check_data

  def spy(*args, **kwargs):
    calls.append(kwargs.get("name", "x"))
    return real(*args, **kwargs)

  monkeypatch.setattr(validate, "check_data", spy)
  jaxprune.evaluate(MODEL, PARAMS, X, Y)
  assert len(calls) == 1
  jaxprune.fit(MODEL, PARAMS, X, Y, key=jax.random.key(0), epochs=1, progress=False)
  assert len(calls) == 2
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), PARAMS)
  jaxprune.fit_many(MODEL, stacked, jnp.stack([X, X]), jnp.stack([Y, Y]), jnp.ones((2, 12)),
                    key=jax.random.split(jax.random.key(0), 2), epochs=1, progress=False)
  assert len(calls) == 3
  _search()
  assert len(calls) == 4


# ----------------------------------------------------------------------------- 6: empty data


def test_empty_data_raise_a_clear_error():
  empty_x, empty_y = jnp.zeros((0, 4)), jnp.zeros((0,), jnp.int32)
  with pytest.raises(ValueError, match="x is empty"):
    jaxprune.fit(MODEL, PARAMS, empty_x, empty_y, key=jax.random.key(0), epochs=1,
                 progress=False)
  with pytest.raises(ValueError, match="x is empty"):
    jaxprune.evaluate(MODEL, PARAMS, empty_x, empty_y)
  with pytest.raises(ValueError, match="x is empty"):
    _search(x=empty_x, y=empty_y)
  prune = jaxprune.distinctiveness(MODEL, "hidden_0")
  with pytest.raises(ValueError, match="Activations is empty"):
    prune(PARAMS, {}, jnp.zeros((0, 6)))
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), PARAMS)
  w = jnp.ones((2, 12)).at[1].set(0.0)  # run 1 has no real sample
  with pytest.raises(ValueError, match="x of run 1 is empty: every sample weight is zero"):
    jaxprune.fit_many(MODEL, stacked, jnp.stack([X, X]), jnp.stack([Y, Y]), w,
                      key=jax.random.split(jax.random.key(0), 2), epochs=1, progress=False)


# ----------------------------------------------------------------------------- 10: small items


@pytest.mark.parametrize("lr", [-1e-3, float("nan"), float("inf")])
def test_fit_rejects_a_negative_or_non_finite_learning_rate(lr):
  with pytest.raises(ValueError, match="learning_rate must be finite and >= 0"):
    jaxprune.fit(MODEL, PARAMS, X, Y, key=jax.random.key(0), epochs=1, learning_rate=lr,
                 progress=False)
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), PARAMS)
  with pytest.raises(ValueError, match="learning_rate must be finite and >= 0"):
    jaxprune.fit_many(MODEL, stacked, jnp.stack([X, X]), jnp.stack([Y, Y]), jnp.ones((2, 12)),
                      key=jax.random.split(jax.random.key(0), 2), epochs=1,
                      learning_rate=jnp.asarray([1e-3, lr]), progress=False)


def test_magnitude_prune_traced_fraction_outside_unit_interval_removes_nothing():
  params = {"params": {"a": {"kernel": jnp.arange(1.0, 9.0).reshape(2, 4)}}}
  kept = jax.jit(lambda f: jaxprune.magnitude_prune(params, None, f)[1]["params"]["a"]["kernel"])
  assert int(kept(0.5).sum()) == 4  # in range: the 4 smallest go
  assert int(kept(1.0).sum()) == 0
  for bad in (1.5, -0.5, float("nan"), float("inf")):
    np.testing.assert_array_equal(kept(bad), np.ones((2, 4), bool), err_msg=str(bad))
  with pytest.raises(ValueError, match="in \\[0, 1\\]"):  # concrete: still an error
    jaxprune.magnitude_prune(params, None, 1.5)


# ----------------------------------------------------------------------------- 1: data fingerprint


def _write_sfew(folder, seed):
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from test_data_sfew import _rows, write_csv  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  return write_csv(os.path.join(folder, "SFEW.csv"), _rows(seed))


def test_changed_data_never_reuse_cached_results(tmp_path, monkeypatch):
  """The same flags (a relative --data_path) on edited data, or the same relative path resolved
  from another folder, get a fresh cache folder; the report records the data's hash."""
  a, b = tmp_path / "a", tmp_path / "b"
  _write_sfew(str(a), seed=0)
  _write_sfew(str(b), seed=1)
  settings = {"data": "sfew_features", "data_path": "SFEW.csv", "seed": 0}
  work = str(tmp_path / "work")

  def study():
    ds = _store.load_data("sfew_features", "SFEW.csv")
    return _store.Study("s", settings, work, data=ds)

  monkeypatch.chdir(a)
  first = study()
  value = first.cached("step", lambda: {"v": 1})
  first.write_results({"v": value})
  first.write_report("T", [])
  res = json.loads((tmp_path / "work" / "s" / "results.json").read_text())
  assert res["data"]["sha256"] == first.data["sha256"] and len(res["data"]["sha256"]) == 64
  assert res["data"]["path"] == str(a / "SFEW.csv")
  assert first.data["sha256"] in (tmp_path / "work" / "s" / "REPORT.md").read_text()
  monkeypatch.chdir(b)  # same flags, other file
  other = study()
  assert other.fingerprint != first.fingerprint
  assert other.cached("step", lambda: {"v": 2}) == {"v": 2}  # computed afresh
  monkeypatch.chdir(a)
  again = study()  # same content again: the old cache is used
  assert again.fingerprint == first.fingerprint and again.cached("step", None) == {"v": 1}
  # Editing the file in place changes the fingerprint too.
  _write_sfew(str(a), seed=2)
  assert study().fingerprint not in (first.fingerprint, other.fingerprint)


def test_study_defaults_to_the_data_loaded_last(tmp_path):
  ds = _store.load_data("features", None)
  rec = _store.data_record(ds, "features")
  s = _store.Study("d", {"seed": 0}, str(tmp_path))
  assert s.data["sha256"] == rec["sha256"]


# ----------------------------------------------------------------------------- 5: no tracebacks


def test_seed_outside_range_fails_before_writing(tmp_path):
  for seed in (-1, 2**32):
    with pytest.raises(app.UsageError, match=r"--seed must be an integer in \[0, 2\^32\)"):
      _store.Study("s", {"seed": seed}, str(tmp_path))
  assert not os.path.exists(tmp_path / "s")


def test_damaged_cache_files_are_named_and_recomputed(tmp_path, capsys):
  s = _store.Study("c", {"seed": 0}, str(tmp_path))
  s.cached("rec", lambda: {"a": 1})
  s.cached_tree("tree", lambda: {"w": np.arange(3.0)})
  s.cached_with_tree("both", lambda: ({"w": np.ones(2)}, {"b": 2}))
  files = {os.path.basename(f): f for f in
           (s.cache_file(k, ext) for k, ext in [("rec", ".json"), ("tree", ".npz"),
                                                ("both", ".npz")])}
  for f in files.values():
    with open(f, "rb") as fh:
      data = fh.read()
    with open(f, "wb") as fh:
      fh.write(data[:len(data) // 2])  # truncated
  s2 = _store.Study("c", {"seed": 0}, str(tmp_path))
  assert s2.cached("rec", lambda: {"a": 10}) == {"a": 10}
  np.testing.assert_array_equal(s2.cached_tree("tree", lambda: {"w": np.arange(4.0)})["w"],
                                np.arange(4.0))
  tree, rec = s2.cached_with_tree("both", lambda: ({"w": np.zeros(2)}, {"b": 3}))
  assert rec == {"b": 3} and tree["w"].tolist() == [0.0, 0.0]
  err = capsys.readouterr().err
  for name in files:
    assert f"{name} is damaged" in err, err


def _spawn_binary(module, *args, cwd=ROOT):
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  return subprocess.Popen([sys.executable, "-m", f"experiments.{module}", *args], cwd=cwd,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_binaries_give_one_line_errors_not_tracebacks(tmp_path):
  cases = {  # one process per binary kind; the flag parsing itself is tested in-process below
      "features_to_cnn": ("kernel_importance", ["--data=features"],
                          "--data=features holds feature vectors"),
      "seed_large": ("lottery_ticket", ["--quick", f"--seed={2**32}"], "--seed must be"),
      "mlp_usage": ("similarity_bounds", ["--quick", "--data=sfew_features"], "--data_path"),
      "pretrained_lenet": ("percentile_vs_distinctiveness",
                           ["--arch=lenet", "--pretrained=/no/such/file.npz"], "--pretrained"),
      "bad_layer": ("training_time_distinctiveness", ["--quick", "--layer=conv_0"],
                    "not a dense unit group"),
  }
  procs = {n: _spawn_binary(m, f"--workdir={tmp_path}", *a) for n, (m, a, _) in cases.items()}
  for name, p in procs.items():
    _, stderr = p.communicate(timeout=300)
    msg = cases[name][2]
    assert p.returncode != 0, name
    assert msg in stderr and "Traceback" not in stderr, (name, stderr[-2000:])
    assert "flags:" not in stderr and len(stderr.strip().splitlines()) <= 3, (name, stderr)
    assert "--help" in stderr, (name, stderr)
  assert not list(tmp_path.rglob("settings.json"))  # nothing left behind by the failures


# ----------------------------------------------------------------------------- 7: --quick


def _flags_config(module, *argv):
  """The Config a binary's command line gives (its flags on a fresh FlagValues, no process)."""
  fv = flags.FlagValues()
  _flags.define_flags(module.Config, default_data="images", flag_values=fv)
  fv(["prog", *argv])
  return _flags.config_from_flags(module.Config, fv)


def test_explicit_flags_win_over_quick_defaults():
  from experiments import kernel_importance as ki  # pylint: disable=g-import-not-at-top
  from experiments import lottery_ticket as lt  # pylint: disable=g-import-not-at-top
  from experiments import training_time_distinctiveness as ttd  # pylint: disable=g-import-not-at-top
  s = _flags_config(ki, "--quick", "--epochs=5", "--image_size=20x18")
  q = _flags_config(ki, "--quick")
  assert (s.epochs, s.image_size, q.epochs, q.image_size) == (5, (20, 18), 2, (16, 16))
  assert q == ki.Config.quick() and s.max_per_class == q.max_per_class == 8
  assert _flags_config(ki) == ki.Config()  # no flags: the published study
  s = _flags_config(lt, "--quick", "--finetune_epochs=3", "--image_size=20x20")
  assert (s.finetune_epochs, s.retrain_epochs, s.image_size) == (3, 2, (20, 20))
  s = _flags_config(lt, "--quick", "--arch=cnn4")  # the quick size follows the arch
  assert s.image_size == (64, 64) and s.resolved().channels == 3
  s = _flags_config(ttd, "--quick", "--epochs=6", "--folds=3")
  assert (s.epochs, s.folds, s.check_every) == (6, 3, 2)


LIST = "comma separated list of strings"  # absl's name of a DEFINE_list flag's type


def test_generated_flags_keep_names_types_and_defaults():
  """The flags made from each Config field: the documented names, types and defaults."""
  from experiments import kernel_importance as ki  # pylint: disable=g-import-not-at-top
  from experiments import percentile_vs_distinctiveness as pvd  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  _flags.define_flags(pvd.Config, default_data="images", flag_values=fv)
  kinds = {n: (fv[n].flag_type(), fv[n].default) for n in
           ("arch", "pretrained", "image_size", "channels", "retrain_epochs", "learning_rate",
            "angles", "groups", "seed", "quick", "data", "workdir")}
  assert kinds == {
      "arch": ("string enum", "auto"), "pretrained": ("string", None), "image_size": ("string", None),
      "channels": ("int", None), "retrain_epochs": ("int", None), "learning_rate": ("float", 1e-3),
      "angles": (LIST, ["45.0", "50.0"]), "groups": (LIST, []), "seed": ("int", 0),
      "quick": ("bool", False), "data": ("string", "images"), "workdir": ("string", "workdir")}
  assert "closer than this are merged" in fv["angles"].help
  fv = flags.FlagValues()
  _flags.define_flags(ki.Config, default_data="images", flag_values=fv)
  assert fv["image_size"].default == "30x24" and fv["norm"].flag_type() == "string enum"
  assert fv["relative"].flag_type() == "bool"
  # Key flags of the module that defined them (a binary's __main__): --help lists them all.
  key = {f.name for f in fv.get_key_flags_for_module(sys.modules[__name__])}
  assert {"norm", "image_size", "max_rise", "workdir", "seed", "quick"} <= key
  with pytest.raises(app.UsageError, match="--angles: values must be <= 180.0"):
    _flags_config(pvd, "--angles=45,200")
  with pytest.raises(app.UsageError, match="not an image size"):
    _flags_config(ki, "--image_size=big")
  with pytest.raises(flags.IllegalFlagValueError, match="--seed must be an integer"):
    _flags_config(ki, "--quick", "--seed=-1")
  from experiments import ga_vs_distinctiveness as gvd  # pylint: disable=g-import-not-at-top
  with pytest.raises(app.UsageError, match="--lrs: 'x' is not a valid float"):
    _flags_config(gvd, "--quick", "--lrs=0.1,x")
  assert _flags_config(gvd, "--quick", "--compare_redundancy_tols=").compare_redundancy_tols == ()


# ----------------------------------------------------------------------------- 8: leftovers


def test_leftovers_of_a_killed_run_are_cleaned_and_results_come_last(tmp_path):
  folder = tmp_path / "k"
  cache = folder / "cache" / "old"
  cache.mkdir(parents=True)
  orphans = [folder / ".tmp-999999-abcREPORT.md", cache / ".tmp-abcx.json"]
  for f in orphans:
    f.write_text("half")
  (folder / "results.json").write_text("{}")  # killed after results.json, before REPORT.md
  s = _store.Study("k", {"seed": 0}, str(tmp_path))
  assert not any(f.exists() for f in orphans)
  assert not (folder / "results.json").exists()  # an unfinished run has no results.json
  s.write_results({"v": 1})
  assert not (folder / "results.json").exists()  # still unfinished: the report comes first
  s.write_report("T", [])
  assert json.loads((folder / "results.json").read_text())["results"] == {"v": 1}


def test_resumed_run_reports_the_total_compute_time(tmp_path):
  s = _store.Study("t", {"seed": 0}, str(tmp_path))
  s.cached("slow", lambda: time.sleep(1.2) or 1)
  s.write_results({})
  s.write_report("T", [])
  s2 = _store.Study("t", {"seed": 0}, str(tmp_path))
  assert s2.cached("slow", None) == 1 and s2.resumed == 1
  assert s2.compute_seconds() - s2.invocation_seconds() >= 1.2  # the first run's time, kept
  s2.write_results({})
  s2.write_report("T", [])
  report = (tmp_path / "t" / "REPORT.md").read_text()
  total = int(re.search(r"Compute time: (\d+) s in total", report).group(1))
  assert 1 <= total <= s2.compute_seconds() + 0.5 and "1 steps taken from the cache" in report


# ----------------------------------------------------------------------------- 9: concurrency


def test_write_probe_is_per_process(tmp_path):
  (tmp_path / "p").mkdir()
  (tmp_path / "p" / ".write-test").mkdir()  # another run's probe in the way
  _store.Study("p", {"seed": 0}, str(tmp_path))


DATA = {"name": "demo", "version": "1", "sha256": "0" * 64}


def test_concurrent_runs_wait_or_refuse(tmp_path, monkeypatch):
  """A run holding the study: one with other settings stops with a message; one with the same
  settings waits (here: gives up after 1 s), then proceeds once the first has finished."""
  held, release = tmp_path / "held", tmp_path / "release"
  log = open(tmp_path / "child.log", "w")  # pylint: disable=consider-using-with
  child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      import os, time
      from experiments import _store
      s = _store.Study("c", {{"seed": 0}}, {str(tmp_path)!r}, data={DATA!r})
      open({str(held)!r}, "w").close()
      t0 = time.time()
      while not os.path.exists({str(release)!r}) and time.time() - t0 < 120:
        time.sleep(0.1)
      s.write_results({{"who": "first"}})
      s.write_report("T", [])
  """)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stderr=log)
  try:
    t0 = time.time()
    while not held.exists():
      assert child.poll() is None, (tmp_path / "child.log").read_text()
      assert time.time() - t0 < 120
      time.sleep(0.1)
    with pytest.raises(app.UsageError, match="Another run with different settings"):
      _store.Study("c", {"seed": 1}, str(tmp_path), data=DATA)
    monkeypatch.setattr(_store, "LOCK_WAIT_S", 1.0)
    with pytest.raises(app.UsageError, match="Another run with the same settings .*still holds"):
      _store.Study("c", {"seed": 0}, str(tmp_path), data=DATA)
    release.touch()
    monkeypatch.setattr(_store, "LOCK_WAIT_S", 120.0)
    s = _store.Study("c", {"seed": 0}, str(tmp_path), data=DATA)  # waits for the first run to end
    assert child.wait(timeout=120) == 0
    s.write_results({"who": "second"})
    s.write_report("T", [])
  finally:
    release.touch()
    child.wait(timeout=120)
    log.close()
  res = json.loads((tmp_path / "c" / "results.json").read_text())
  assert res["results"] == {"who": "second"}


def test_kill_9_leaves_no_stale_lock_and_the_rerun_resumes(tmp_path, monkeypatch):
  """A run killed with SIGKILL while it holds the locks, after one cached step and during a
  write: the rerun takes the locks at once, resumes the step and removes the orphan."""
  ready = tmp_path / "ready"
  child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
      import os, time
      from experiments import _store
      s = _store.Study("k9", {{"seed": 0}}, {str(tmp_path)!r}, data={DATA!r})
      s.cached("done", lambda: {{"v": 1}})
      open(os.path.join(s.dir, ".tmp-%d-xREPORT.md" % os.getpid()), "w").write("half")
      open({str(ready)!r}, "w").close()
      time.sleep(120)
  """)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  try:
    t0 = time.time()
    while not ready.exists():
      assert child.poll() is None and time.time() - t0 < 120
      time.sleep(0.1)
  finally:
    child.kill()  # SIGKILL
    child.wait(timeout=60)
  monkeypatch.setattr(_store, "LOCK_WAIT_S", 30.0)  # fail, not hang, if a lock outlived the kill
  s = _store.Study("k9", {"seed": 0}, str(tmp_path), data=DATA)  # no wait: the lock died too
  assert s.cached("done", None) == {"v": 1} and s.resumed == 1
  assert not list((tmp_path / "k9").glob(".tmp-*"))
