"""End-to-end tests of the MLP study binaries in --quick mode, resume, and bad input.

The binaries define their absl flags only when run as programs, so several can be imported
in one process; the studies are run in-process through ``run(Config, ...)`` (sharing compiled
programs), and so are the command lines' errors (their flags parsed on a fresh FlagValues).
"""

import functools
import glob
import json
import math
import os
import re

import numpy as np
import pytest
from absl import app

from conftest import all_finite, csv_rows, study_results
from experiments import _store
from experiments import _mlp_common as mc
from experiments import ga_vs_distinctiveness as gvd
from experiments import progressive_compression as pc
from experiments import similarity_bounds as sb


def _read(path):
  with open(path) as f:
    return f.read()


# ----------------------------------------------------------------------------- GA vs distinctiveness


@pytest.fixture(scope="module")
def gvd_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("gvd"))
  gvd.run(gvd.Config.quick(), workdir=workdir, workers=1)   # every step in turn
  return workdir


def test_ga_vs_distinctiveness_outputs(gvd_run):
  cfg = gvd.Config.quick()
  folder = os.path.join(gvd_run, gvd.STUDY)
  for name in ("results.json", "REPORT.md", "baseline.png", "sweep.png",
               "comparison_accuracy.png", "comparison_hidden.png"):
    assert os.path.getsize(os.path.join(folder, name)) > 0, name
  base = csv_rows(os.path.join(folder, "baseline.csv"))
  assert len(base) == len(cfg.lrs) * len(cfg.hidden)
  sweep = csv_rows(os.path.join(folder, "sweep.csv"))
  assert [float(r["angle_deg"]) for r in sweep] == [0.0, 30.0, 60.0, 90.0]
  assert all(r["invalid"] == "False" for r in sweep)
  kept = [float(r["kept_fraction_mean"]) for r in sweep]
  assert kept[0] == 1.0 and all(0 < k <= 1 for k in kept)
  assert all(a >= b for a, b in zip(kept, kept[1:]))  # wider bounds never keep more units
  ga_rows = csv_rows(os.path.join(folder, "ga.csv"))
  assert len(ga_rows) == len(cfg.ga_hidden) * 2 * len(cfg.ga_lambdas)
  comp = csv_rows(os.path.join(folder, "comparison.csv"))
  assert [r["method"] for r in comp] == ["unpruned", "distinctiveness 15", "distinctiveness 45",
                                         "GA eq5 lambda 0", "GA eq5 lambda 50",
                                         "group redundancy 0.1"]
  res = study_results(gvd_run, gvd.STUDY)
  assert all_finite(res)
  s = res["results"]["summary"]
  for r in s["baseline"] + s["ga"] + s["comparison"]:
    for k, v in r.items():
      if k.startswith(("test_acc", "train_acc")) and k.endswith("mean"):
        assert 0 <= v <= 100
  for r in s["ga"]:
    assert 1 <= r["kept_mean"] <= r["H"]
  # GA with lambda 0 under eq. 5 keeps no fewer units than with lambda 50 on average.
  ga0 = [r for r in s["ga"] if r["fitness"] == "eq5" and r["lambda"] == 0.0][0]
  ga50 = [r for r in s["ga"] if r["fitness"] == "eq5" and r["lambda"] == 50.0][0]
  assert ga0["kept_mean"] >= ga50["kept_mean"]
  # Unpruned accuracy in the comparison is the baseline's at --prune_lr.
  b = [r for r in s["baseline"] if r["lr"] == cfg.prune_lr and r["H"] == 8][0]
  assert comp and float(comp[0]["test_acc_mean"]) == pytest.approx(b["test_acc_mean"])
  report = _read(os.path.join(folder, "REPORT.md"))
  assert "![](sweep.png)" in report and "stand-in" in report
  red = [r for r in s["comparison"] if r["method"] == "group redundancy 0.1"][0]
  assert 1 <= red["hidden_mean"] <= 8 and 0 <= red["test_acc_mean"] <= 100
  assert "## Defaults and the seeds" in report and "`--prune_lr=0.01`: as published" in report


def test_ga_vs_distinctiveness_resume_is_identical(gvd_run, tmp_path, monkeypatch):
  """A run stopped after the distinctiveness stage and restarted ends identical, and steps
  computed two at a time (workers=2) give exactly the numbers of steps computed in turn."""
  workdir = str(tmp_path)
  calls = []

  def boom(*args, **kwargs):
    calls.append(1)
    raise KeyboardInterrupt("killed")

  monkeypatch.setattr(gvd, "ga_hidden", boom)
  with pytest.raises(KeyboardInterrupt):
    gvd.run(gvd.Config.quick(), workdir=workdir)
  assert calls and not os.path.exists(os.path.join(workdir, gvd.STUDY, "results.json"))
  monkeypatch.undo()
  gvd.run(gvd.Config.quick(), workdir=workdir, workers=2)
  assert study_results(workdir, gvd.STUDY) == study_results(gvd_run, gvd.STUDY)
  # Restarting a finished run recomputes nothing and gives the same file again.
  before = _read(os.path.join(workdir, gvd.STUDY, "results.json"))
  # Its report gives the compute time of the cached results, not this invocation's few seconds
  # (recorded with the cache; set to a value no quick run takes, so a fast machine can tell).
  [seconds_file] = glob.glob(os.path.join(workdir, gvd.STUDY, "**", "compute_seconds.json"),
                             recursive=True)
  with open(seconds_file, "w") as f:
    json.dump({"seconds": 5000.0}, f)
  gvd.run(gvd.Config.quick(), workdir=workdir)
  assert _read(os.path.join(workdir, gvd.STUDY, "results.json")) == before
  report = _read(os.path.join(workdir, gvd.STUDY, "REPORT.md"))
  # one total, the run section's (a second, taken before the tables and figures, said less)
  assert len(re.findall(r"Compute time", report)) == 1
  total = re.search(r"Compute time: (\d+) s in total \(earlier invocations' cached steps "
                    r"included\)", report)
  assert total and 5000 <= int(total.group(1)) < 5100, total
  assert "Wall time of this invocation" not in report


@pytest.mark.parametrize("kw, match", [
    (dict(prune_lr=0.5), "prune_lr"),
    (dict(ga_hidden=(16,)), "ga_hidden"),
    (dict(similar_deg=170.0), "similar_deg"),
    (dict(ga_population=2), "ga_population"),
    (dict(ga_mutation=1.5), "ga_mutation"),
    (dict(sweep_step=math.inf), "sweep_step"),   # ran everything, then a TypeError
])
def test_ga_vs_distinctiveness_contradictory_settings(kw, match, tmp_path):
  with pytest.raises(app.UsageError, match=match):
    gvd.run(gvd.Config.quick(**kw), workdir=str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, gvd.STUDY))  # before any work


def test_a_sweep_row_reads_its_own_pair_not_one_with_the_same_similar_angle():
  """--similar_deg=90 --complementary_deg=100: the 90-degree sweep row (90 / 90, run as 90 /
  90 + one float step) took the (90, 100) pair's results, listed first with the same similar
  angle."""
  cfg = gvd.Config.quick(similar_deg=90.0, complementary_deg=100.0, sweep_hidden=8,
                         dist_hidden=(8,), sweep_step=30.0, sweep_max=90.0)
  pairs = cfg.angle_pairs(8)
  nudged = float(np.nextafter(np.float32(90), np.float32(180)))
  assert pairs[0] == (90.0, 100.0) and (90.0, nudged) in pairs
  assert gvd._pair_index(pairs, 90.0, 90.0) == pairs.index((90.0, nudged))
  assert gvd._pair_index(pairs, 90.0, 100.0) == 0
  assert gvd._pair_index(pairs, 30.0, 150.0) == pairs.index((30.0, 150.0))
  with pytest.raises(KeyError):
    gvd._pair_index(pairs, 90.0, 120.0)


def test_bad_data_and_workdir(tmp_path):
  cfg = gvd.Config.quick()
  with pytest.raises(app.UsageError, match="Unknown --data"):
    gvd.run(cfg, data="nope", workdir=str(tmp_path))
  with pytest.raises(app.UsageError, match="--data_path"):
    gvd.run(cfg, data="sfew_features", workdir=str(tmp_path))
  with pytest.raises(app.UsageError, match="Could not load"):
    gvd.run(cfg, data="sfew_features", data_path=str(tmp_path / "missing.xlsx"),
            workdir=str(tmp_path))
  bad = tmp_path / "SFEW.csv"
  bad.write_text("this,is\nnot,sfew\n")
  with pytest.raises(app.UsageError, match="Could not load"):
    sb.run(sb.Config.quick(), data="sfew_features", data_path=str(bad), workdir=str(tmp_path))
  with pytest.raises(app.UsageError, match="10 features"):
    sb.run(sb.Config.quick(), data="images", workdir=str(tmp_path))
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(app.UsageError, match="workdir"):
    pc.run(pc.Config.quick(), workdir=str(blocker))


def _tiny_sfew_csv(path, per_class):
  rng = np.random.default_rng(0)
  lines = [",label," + ",".join([f"LPQ feature {i}" for i in range(1, 6)]
                                + [f"PHOG feature {i}" for i in range(1, 6)])]
  for label in range(1, 8):
    for j in range(per_class[label - 1]):
      # names without a person id (last field not a number): a stratified split's errors
      lines.append(f"M{label}_{j}_x.mat,{label}," + ",".join(map(str, rng.normal(size=10))))
  path.write_text("\n".join(lines) + "\n")
  return str(path)


@pytest.mark.parametrize("study", [sb, pc])
@pytest.mark.parametrize("per_class, match", [
    ((2,) * 7, r"test part would hold 3 examples, fewer than one per class.*raise "
               r"test_fraction \(test_fraction is --test_fraction, now 0.2\)"),
    ((3, 1, 3, 3, 3, 3, 3), r"class 'disgust' has 1 example"),
])
def test_unsplittable_data_fail_before_the_study_folder(study, per_class, match, tmp_path):
  path = _tiny_sfew_csv(tmp_path / "SFEW.csv", per_class)
  with pytest.raises(app.UsageError, match=r"^Cannot split the data .*" + match):
    study.run(study.Config.quick(), data="sfew_features", data_path=path,
              workdir=str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")  # no folder, .lock or cache left behind


@pytest.mark.parametrize("module, default_data, args, match", [
    ("ga_vs_distinctiveness", "features", ["--lrs=0.01,abc"], "--lrs"),
    ("similarity_bounds", "features", ["--data=sfew_features"], "--data_path"),
    ("kernel_importance", "images", ["--data_path=SFEW.csv"], "Add --data=sfew_features or"),
    ("progressive_compression", "features", ["--hidden=1"], "--hidden"),
])
def test_command_line_errors(module, default_data, args, match, tmp_path):
  """A binary's command line (its flags as its ``__main__`` defines them, on a fresh
  FlagValues, then ``run``) fails with the message. In-process: that the binaries print such
  errors as one line, without a traceback, is checked by spawning them in
  tests/test_reliability.py."""
  import importlib  # pylint: disable=import-outside-toplevel
  from absl import flags  # pylint: disable=import-outside-toplevel
  from experiments import _flags  # pylint: disable=import-outside-toplevel
  mod = importlib.import_module(f"experiments.{module}")
  fv = flags.FlagValues()
  _flags.define_flags(mod.Config, default_data=default_data, flag_values=fv)
  with pytest.raises((app.UsageError, flags.Error), match=re.escape(match)):
    fv(["prog", "--quick", f"--workdir={tmp_path}", *args])
    mod.run(_flags.config_from_flags(mod.Config, fv), fv.workdir, data=fv.data,
            data_path=fv.data_path)
  assert not list(tmp_path.rglob("settings.json"))  # failed before any work


# ----------------------------------------------------------------------------- similarity bounds


def test_similarity_bounds_outputs(tmp_path):
  cfg = sb.Config.quick()
  sb.run(cfg, workdir=str(tmp_path))
  folder = os.path.join(tmp_path, sb.STUDY)
  assert os.path.getsize(os.path.join(folder, "angles.png")) > 0
  rows = csv_rows(os.path.join(folder, "summary.csv"))
  assert len(rows) == 4 * len(cfg.hidden)
  assert [(r["rule"], float(r["threshold_deg"])) for r in rows[::len(cfg.hidden)]] == [
      ("similar", 45.0), ("complementary", 140.0), ("similar", 15.0), ("complementary", 165.0)]
  res = study_results(str(tmp_path), sb.STUDY)["results"]
  assert all_finite(res)
  for net in res["networks"]:
    angles = np.asarray(net["angles"])
    assert len(angles) == net["H"] * (net["H"] - 1) // 2
    assert 0 <= net["test_acc_before"] <= 100
    for ex in net["experiments"]:
      n = len(ex["pairs"])
      assert n <= ex["qualifying_pairs"]
      assert (n > 0) == (ex["qualifying_pairs"] > 0)  # someone acts if any pair qualifies
      removed_per_pair = 1 if ex["rule"] == "similar" else 2
      assert ex["hidden_after"] == net["H"] - removed_per_pair * n
      for p in ex["pairs"]:
        if ex["rule"] == "similar":
          assert p["angle"] < ex["threshold"]
        else:
          assert p["angle"] > ex["threshold"]
      if n == 0:
        assert ex["test_acc_after"] == net["test_acc_before"]
  pairs = csv_rows(os.path.join(folder, "pairs.csv"))
  assert pairs and all(r["angle_deg"] or r["note"].startswith("no pair") for r in pairs)


# ----------------------------------------------------------------------------- progressive


def test_progressive_compression_outputs(tmp_path):
  cfg = pc.Config.quick()
  pc.run(cfg, workdir=str(tmp_path))
  folder = os.path.join(tmp_path, pc.STUDY)
  assert os.path.getsize(os.path.join(folder, "progressive.png")) > 0
  res = study_results(str(tmp_path), pc.STUDY)["results"]
  for run in res["runs"]:
    kept = run["units_kept"]
    assert kept[0] == cfg.hidden and kept[-1] == 1
    assert all(a > b for a, b in zip(kept, kept[1:]))
    assert all(l > 0 and math.isfinite(l) for l in run["train_loss"] + run["test_loss"])
    assert run["min_angle"][-1] is None  # one unit left: no angle
  steps = csv_rows(os.path.join(folder, "steps.csv"))
  assert len(steps) == sum(len(r["units_kept"]) for r in res["runs"])
  assert res["final"]["units_final"] == [1] * cfg.runs


# ----------------------------------------------------------------------------- helpers


@functools.lru_cache(maxsize=None)
def _stacked_mlps():
  """A 10-6-7 MLP and 41 random inits of it stacked (NumPy): tests take the first R runs, so
  that one vmapped initialiser is compiled for every run count (one per count took 1.2 s)."""
  import jax
  import jaxprune
  model = jaxprune.MLP(in_features=10, hidden=(6,), out_features=7)
  params = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 41))
  return model, jax.tree.map(np.asarray, params)


@functools.lru_cache(maxsize=None)
def _jitted_apply():
  import jax
  return jax.jit(_stacked_mlps()[0].apply)


def _first_runs(runs):
  import jax
  model, params = _stacked_mlps()
  return model, jax.tree.map(lambda a: a[:runs], params)


def test_padded_scores_match_unpadded():
  import jax
  model, params = _first_runs(2)
  x = np.asarray(jax.random.normal(jax.random.key(1), (13, 10)))
  y = np.arange(13) % 7
  xp, w = mc.pad_stack([x, x[:5]])
  yp, _ = mc.pad_stack([y, y[:5]])
  got = mc.score_many(model, params, xp, yp, w)
  for r, n in enumerate((13, 5)):
    p = jax.tree.map(lambda a: a[r], params)
    want = 100 * float(np.mean(np.argmax(model.apply(p, x[:n]), -1) == y[:n]))
    assert got[r] == pytest.approx(want, rel=1e-6)
    assert mc.score(model, p, xp[r], yp[r], w[r]) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("runs", [1, 20, 23, 41])
def test_chunked_scores_match_one_call_per_run(runs):
  """score_many's chunks of EVAL_RUNS (last one filled with copies) and score_folds's padded
  test rows give every run the score it gets alone, unit masks applied."""
  import jax
  import jaxprune
  model, params = _first_runs(runs)
  rng = np.random.default_rng(runs)
  x_tr, w_tr = mc.pad_stack([rng.normal(size=(n, 10)).astype(np.float32) for n in (30, 27, 29)])
  y_tr, _ = mc.pad_stack([rng.integers(0, 7, n) for n in (30, 27, 29)])
  x_te, w_te = mc.pad_stack([rng.normal(size=(n, 10)).astype(np.float32) for n in (9, 8, 9)])
  y_te, _ = mc.pad_stack([rng.integers(0, 7, n) for n in (9, 8, 9)])
  folds = mc.Folds(x_tr, y_tr, w_tr, x_te, y_te, w_te, (30, 27, 29), (9, 8, 9))
  fold = rng.integers(0, 3, runs)
  units = rng.random((runs, 6)) < 0.6
  test, train = mc.score_folds(model, params, folds, fold, group="hidden_0", unit_masks=units)
  plain = mc.score_many(model, params, x_tr[fold], y_tr[fold], w_tr[fold])
  with pytest.raises(ValueError, match="need the group"):
    mc.score_many(model, params, x_tr[fold], y_tr[fold], w_tr[fold], unit_masks=units)
  with pytest.raises(ValueError, match=f"leading axis of {runs + 1} runs"):
    mc.score_many(model, params, x_tr[np.r_[fold, 0]], y_tr[np.r_[fold, 0]],
                  w_tr[np.r_[fold, 0]])
  with pytest.raises(ValueError, match=f"leading axis of {runs} runs"):
    mc.score_folds(model, params, folds, fold, group="hidden_0", unit_masks=units[:-1])
  assert test.shape == train.shape == plain.shape == (runs,)
  apply = _jitted_apply()
  for r in range(runs):
    p = jax.tree.map(lambda a: a[r], params)
    masked = jaxprune.apply_masks(p, jaxprune.expand(p, model, {"hidden_0": units[r]}))
    for got, (x, y), q in ((test[r], folds.test(fold[r]), masked),
                              (train[r], folds.train(fold[r]), masked),
                              (plain[r], folds.train(fold[r]), p)):
      # rows of zeros up to 30 (one compiled forward pass for every part), then cut off
      logits = apply(q, np.pad(x, [(0, 30 - len(x)), (0, 0)]))[:len(x)]
      want = 100 * float(np.mean(np.argmax(logits, -1) == y))
      assert got == pytest.approx(want, rel=1e-6)


def test_stacked_keys_are_the_keys():
  import jax
  keys = [_store.config_key(0, "t", i) for i in range(5)]
  got = mc.stack_keys(keys)
  assert got.shape == (5,) and jax.dtypes.issubdtype(got.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(got),
                                np.stack([jax.random.key_data(k) for k in keys]))


def test_params_npz_roundtrip_and_keys(tmp_path):
  p = {"params": {"a": {"kernel": np.arange(6.0).reshape(2, 3)}, "b": np.ones(2)}}
  _store.save_tree(str(tmp_path / "p.npz"), p)
  q = _store.load_tree(str(tmp_path / "p.npz"))
  np.testing.assert_array_equal(q["params"]["a"]["kernel"], p["params"]["a"]["kernel"])
  import jax
  a = jax.random.key_data(_store.config_key(0, "x", 1))
  assert np.array_equal(a, jax.random.key_data(_store.config_key(0, "x", 1)))
  assert not np.array_equal(a, jax.random.key_data(_store.config_key(0, "x", 2)))


def test_padded_distinctiveness_equals_per_fold_library_call():
  """prune_folds (padded, one program) == the library's call on each unpadded fold, with and
  without a constant unit (which takes the exact per-fold path)."""
  import jax
  import jax.numpy as jnp
  import jaxprune
  from jaxprune.pruners import distinctiveness
  from jaxprune import data as data_lib
  model = jaxprune.MLP(in_features=10, hidden=(12,), out_features=7)
  folds = mc.cv_folds(data_lib.load("features"), 3, 0)
  assert len(set(folds.n_tr)) > 1  # really padded
  params = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 3))
  # Two near-duplicate units (a similar pair); fold 1 gets a constant unit (zero kernel).
  k = params["params"]["hidden_0"]["kernel"]
  k = k.at[..., 1].set(k[..., 0] * 1.01).at[1, :, 5].set(0.0)
  params["params"]["hidden_0"]["kernel"] = k
  sims, comps = jnp.asarray([15.0, 60.0]), jnp.asarray([165.0, 120.0])
  new_p, masks, report = gvd.prune_folds(model, params, folds, sims, comps)
  lib = jax.vmap(distinctiveness(model, "hidden_0"), in_axes=(None, None, None, 0, 0))
  for f in range(3):
    p = jax.tree.map(lambda a: a[f], params)
    x, _ = folds.train(f)
    want_p, want_m, want_r = lib(p, jaxprune.unit_masks_ones(model),
                                 model.activations(p, jnp.asarray(x), "hidden_0"), sims, comps)
    np.testing.assert_array_equal(masks["hidden_0"][f], want_m["hidden_0"])
    np.testing.assert_array_equal(report.kind[f], want_r.kind)
    for a, b in zip(jax.tree.leaves(jax.tree.map(lambda a: a[f], new_p)),
                    jax.tree.leaves(want_p)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert int(np.sum(np.asarray(report.kind[1]) == 3)) == 2  # the constant unit, both angles
  assert not np.any(np.asarray(report.kind[0]) == 3)
  assert np.all(np.any(np.asarray(report.kind[:, 0]) == 1, axis=-1))  # similar pair at 15 deg


def _tiny_ga_stage(seed):
  """A 3-6-3 MLP, its per-run fitness (fast path, weighted), a small GA config, and 12 patterns
  drawn from ``rng`` (returned for further draws)."""
  import jaxprune
  from jaxprune import ga
  model = jaxprune.MLP(in_features=3, hidden=(6,), out_features=3)
  fitness = ga.AccuracyFitness(model, "hidden_0", "per_run", fast=True, weighted=True)
  config = ga.GAConfig(population_size=8, hof_size=2, tournament_size=3, generations=3)
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(12, 3)).astype(np.float32)
  return model, fitness, config, x, rng.integers(0, 3, 12), rng


def test_ga_program_chunks_give_each_run_its_own_result(monkeypatch):
  """The studies' GA program maps its runs in chunks (lax.map): 5 runs in 3 chunks of 2 (the last
  run repeated to fill the last chunk) give every run exactly what ga.run computes for it
  alone, and the program holds the GA once (lax.map would run a short last chunk as a second
  copy of it, which doubled lowering and compilation)."""
  import jax
  import jax.numpy as jnp
  from jaxprune import ga
  model, fitness, config, x, y, rng = _tiny_ga_stage(0)
  w = (rng.random(12) > 0.2).astype(np.float32)
  params = [model.init(jax.random.key(f)) for f in range(5)]
  data = [fitness.prepare(p, x, y, sample_weight=w, penalty="ratio" if f % 2 else "count")
          for f, p in enumerate(params)]
  lam = jnp.asarray([0.0, 10.0, 25.0, 50.0, 100.0], jnp.float32)
  keys = jax.random.split(jax.random.key(7), 5)
  hyper = ga.GAHyperparams(crossover_prob=0.8, mutation_prob=0.2, bit_flip_prob=0.1, lam=lam)
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *data)
  # one run's product: 2 * 12 patterns * 6 units * 3 outputs * 8 individuals = 3456 operations
  assert mc.runs_per_chunk(stacked, 8, 5) == 5           # small runs: all vmapped at once
  monkeypatch.setattr(mc, "CHUNK_FLOPS", 3456.0)
  assert mc.runs_per_chunk(stacked, 8, 5) == 1
  assert mc.runs_per_chunk({"params": 0, "x": 0}, 8, 5) == 5   # not the fast path: all at once
  monkeypatch.setattr(mc, "CHUNK_FLOPS", 4 * 3456.0)
  assert mc.runs_per_chunk(stacked, 8, 5) == 3           # 2 chunks of 4 evened out to 3
  monkeypatch.setattr(mc, "CHUNK_FLOPS", 2 * 3456.0)
  assert mc.runs_per_chunk(stacked, 8, 5) == 2
  program = mc.ga_program(config, fitness, 6, True)
  outer = jax.make_jaxpr(program)(stacked, hyper, keys).jaxpr
  (call,) = [e for e in outer.eqns if e.primitive.name in ("pjit", "jit")]
  scans = [e for e in call.params["jaxpr"].jaxpr.eqns if e.primitive.name == "scan"]
  assert len(scans) == 1 and scans[0].params["length"] == 3   # the chunks; no second GA copy
  state, _ = program(stacked, hyper, keys)
  for r in range(5):
    alone, _ = ga.run(config, fitness, 6, key=keys[r], hyper=hyper._replace(lam=lam[r]),
                      data=data[r], progress=False, shard=False)
    np.testing.assert_array_equal(np.asarray(state.hof[r]), np.asarray(alone.hof))
    np.testing.assert_array_equal(np.asarray(state.hof_fitness[r]), np.asarray(alone.hof_fitness))


def test_ga_stages_score_incrementally_when_their_runs_together_pay_for_it(monkeypatch):
  """A stage's runs share one compiled GA program, so the binaries weigh their summed
  full-evaluation work (``mc.SHARED_MIN_WORK``) where ``'auto'`` weighs one run's: at or above
  it the fitness asks for the incremental evaluation (the unit and backend conditions of
  ``'auto'`` still hold), and every run then gets what ga.run computes for it alone with that
  fitness. An explicit ``incremental`` is left as it is."""
  import dataclasses
  import jax
  import jax.numpy as jnp
  from jaxprune import ga
  from jaxprune.ga import incremental, loop
  model, fitness, config, x, y, _ = _tiny_ga_stage(1)
  data = [fitness.prepare(model.init(jax.random.key(f)), x, y, penalty="ratio")
          for f in range(3)]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *data)
  work = 3 * 2.0 * (3 + 1) * 8 * 6 * 12 * 3   # runs * 2 (G + 1) P U N O
  monkeypatch.setattr(mc, "SHARED_MIN_WORK", work)
  assert mc.incremental_for_runs(fitness, config, 6, stacked).incremental == "auto"  # 6 units
  monkeypatch.setattr(incremental, "MIN_UNITS", 6)
  fit = mc.incremental_for_runs(fitness, config, 6, stacked)
  assert fit.incremental is True and fit == dataclasses.replace(fitness, incremental=True)
  for explicit in (False, True):
    own = dataclasses.replace(fitness, incremental=explicit)
    assert mc.incremental_for_runs(own, config, 6, stacked) is own
  monkeypatch.setattr(mc, "SHARED_MIN_WORK", work + 1)
  assert mc.incremental_for_runs(fitness, config, 6, stacked).incremental == "auto"
  assert loop.uses_incremental(config, fit, 6, None, data[0])
  keys = jax.random.split(jax.random.key(3), 3)
  hyper = ga.GAHyperparams(lam=jnp.asarray([0.0, 10.0, 50.0], jnp.float32))
  state, _ = mc.ga_program(config, fit, 6, True)(stacked, hyper, keys)
  for r in range(3):
    alone, _ = ga.run(config, fit, 6, key=keys[r], hyper=hyper._replace(lam=hyper.lam[r]),
                      data=data[r], progress=False, shard=False)
    np.testing.assert_array_equal(np.asarray(state.hof[r]), np.asarray(alone.hof))
    np.testing.assert_array_equal(np.asarray(state.hof_fitness[r]), np.asarray(alone.hof_fitness))


def test_mlp_studies_split_by_person_when_the_data_carry_persons():
  """docs/data.md promises person-independent splits when the data carry persons; the MLP
  studies' folds and train/test splits were stratified only (17 of 20 persons on both sides)."""
  from jaxprune import data  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  persons = np.repeat(np.arange(20), 7)                       # 20 persons x 7 expressions
  x = rng.normal(size=(140, 10)).astype(np.float32)
  x[:, 0] = persons          # feature 0 names the person (standardised per fold, still 1:1)
  ds = data.Dataset(x, np.tile(np.arange(7), 20), tuple("abcdefg"),
                    groups=persons.astype(str))
  folds = mc.cv_folds(ds, 5, seed=0)
  for f in range(5):
    train = set(folds.x_tr[f, :folds.n_tr[f], 0].tolist())
    test = set(folds.x_te[f, :folds.n_te[f], 0].tolist())
    assert len(test) == folds.n_te[f] // 7 and not train & test
  tr, te = mc.train_test_or_fail(ds, 0.2, seed=0)
  assert not set(tr.groups) & set(te.groups)
  mc.check_folds(ds, 5)
  nine = data.Dataset(x, ds.y, ds.class_names, groups=(persons % 9).astype(str))
  with pytest.raises(app.UsageError, match="person-independent folds need at least 10 persons"):
    mc.check_folds(nine, 10)          # 20 examples per class: enough for 10 stratified folds
