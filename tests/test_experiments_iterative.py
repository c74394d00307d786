"""The iterative-pruning study in --quick mode, in-process: outputs, matched targets, resume."""

import os

import numpy as np
import pytest
from absl import app

from conftest import all_finite, csv_rows, study_results
from experiments import iterative_pruning as ip


@pytest.fixture(scope="module")
def ip_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("ip"))
  ip.run(ip.Config.quick(), workdir=workdir, workers=1)   # every run pruned in turn
  return workdir


def test_outputs_and_matched_targets(ip_run):
  cfg = ip.Config.quick()
  folder = os.path.join(ip_run, ip.STUDY)
  for name in ("results.json", "REPORT.md", "accuracy.csv", "unpruned.csv", "all_H6.png",
               *(f"{p}.png" for p in ip.PRUNERS)):
    assert os.path.getsize(os.path.join(folder, name)) > 0, name
  res = study_results(ip_run, ip.STUDY)
  assert all_finite(res)
  rows = csv_rows(os.path.join(folder, "accuracy.csv"))
  assert len(rows) == len(ip.PRUNERS) * 2 * 2 * len(cfg.targets)
  assert cfg.kept(6) == [3, 2]
  for r in rows:
    target = int(r["target"])
    assert 0 <= float(r["kept_mean"]) <= target  # GA and distinctiveness may overshoot
    if r["pruner"] in ("importance", "group_redundancy"):  # these stop exactly at the target
      assert float(r["kept_mean"]) == target and float(r["kept_std"]) == 0
    assert 0 <= float(r["test_acc_mean"]) <= 100
  # One-shot prunes the same trained network in both retraining modes: same pruned accuracy.
  for p in ip.PRUNERS:
    for t in cfg.kept(6):
      pair = [r for r in rows if r["pruner"] == p and r["schedule"] == "one-shot" and
              int(r["target"]) == t]
      assert len(pair) == 2 and pair[0]["test_acc_pruned_mean"] == pair[1]["test_acc_pruned_mean"]
      assert pair[0]["kept_mean"] == pair[1]["kept_mean"]
  # Iterative rounds never bring a unit back.
  recs = [r for r in res["results"]["per_fold"]["6"]["records"] if r["schedule"] == "iterative"]
  assert [r["t"] for r in recs] == [1, 2]
  assert np.all(np.asarray(recs[1]["kept"]) <= np.asarray(recs[0]["kept"]))
  report = _read(os.path.join(folder, "REPORT.md"))
  assert "![](all_H6.png)" in report and "## Defaults and the seeds" in report


def _read(path):
  with open(path) as f:
    return f.read()


def test_resume_is_identical(ip_run):
  before = _read(os.path.join(ip_run, ip.STUDY, "results.json"))
  ip.run(ip.Config.quick(), workdir=ip_run)  # everything comes from the cache
  assert _read(os.path.join(ip_run, ip.STUDY, "results.json")) == before


def test_runs_pruned_at_once_give_the_same_numbers(ip_run, tmp_path, monkeypatch):
  """Two workers, and each distinct run pruned once (the one-shot finetune and rewind runs of
  a fold share their pruning): exactly the numbers of every run pruned in turn."""
  calls = []
  real = ip.prune_runs

  def counting(cfg, model, pruner, params, masks, folds, run_folds, target, key_parts,
               workers=None):
    calls.append((key_parts[1], pruner, len(run_folds), workers))
    return real(cfg, model, pruner, params, masks, folds, run_folds, target, key_parts, workers)

  monkeypatch.setattr(ip, "prune_runs", counting)
  ip.run(ip.Config.quick(), workdir=str(tmp_path), workers=2)
  assert study_results(str(tmp_path), ip.STUDY) == study_results(ip_run, ip.STUDY)
  assert calls and all(w == 2 for *_, w in calls)


def test_identical_runs_are_pruned_once(monkeypatch):
  """prune_runs calls the pruner once per distinct (fold, network, mask)."""
  cfg = ip.Config.quick()
  model = ip._model(6)
  ds = ip.mc.load_features("features", None)
  folds = ip.mc.cv_folds(ds, cfg.folds, cfg.seed)
  import jax
  params = jax.vmap(model.init)(ip.mc.stack_keys([jax.random.key(0)] * 2 + [jax.random.key(1)]))
  masks = np.ones((3, 6), bool)
  seen = []
  real = ip._importance

  def spy(m):
    prune = real(m)
    def wrapped(p, um, k):
      seen.append(k)
      return prune(p, um, k)
    return wrapped

  monkeypatch.setattr(ip, "_importance", spy)
  p, m, _ = ip.prune_runs(cfg, model, "importance", params, masks, folds, [0, 0, 0], 3,
                          ("x",), workers=1)
  assert len(seen) == 2  # runs 0 and 1 are the same network on the same fold
  assert m.sum(1).tolist() == [3, 3, 3] and (m[0] == m[1]).all()
  for a in jax.tree.leaves(p):
    np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(a)[1])


@pytest.mark.parametrize("kw,match", [
    ({"targets": (0.3, 0.6)}, "must decrease"),
    ({"targets": (0.5, 0.49)}, "same kept count twice"),
    ({"pruners": ("magnitude",)}, "unknown"),
    ({"hidden": (1,)}, "at least 2"),
])
def test_bad_settings_fail_before_any_work(kw, match, tmp_path):
  with pytest.raises(app.UsageError, match=match):
    ip.run(ip.Config.quick(**kw), workdir=str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, ip.STUDY))
