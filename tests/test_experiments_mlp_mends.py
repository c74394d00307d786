"""Mends of the MLP studies (a probe of progressive compression, training-time
distinctiveness, iterative pruning and similarity bounds): an infinite test loss is refused
instead of cached as 1e308 and averaged into a finite-looking number; the GA of
iterative_pruning never returns a network without hidden units; split and fold errors suggest
only fixes that work for the data; a diverging learning rate is a one-line error, not a
traceback."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app

import jaxprune
from jaxprune import data as data_lib
from jaxprune import ga
from jaxprune.ga.fitness import AccuracyFitness
from experiments import _flags
from experiments import _mlp_common as mc
from experiments import _store
from experiments import ga_vs_distinctiveness as gvd
from experiments import iterative_pruning as ip
from experiments import progressive_compression as pc
from experiments import similarity_bounds as sb
from experiments import training_time_distinctiveness as ttd

HEADER = (["name", "label"] + [f"LPQ feature {i}" for i in range(1, 6)]
          + [f"PHOG feature {i}" for i in range(1, 6)])


def _write_sfew_csv(path, x, y):
  """An SFEW features CSV: one person per row (the name's last field)."""
  lines = [",".join(HEADER)]
  for i, (row, label) in enumerate(zip(x, y)):
    lines.append(",".join([f"Movie_{i:09d}_{i:08d}.mat", str(int(label))]
                          + [repr(float(v)) for v in row]))
  path.write_text("\n".join(lines) + "\n")
  return str(path)


# ----------------------------------------------------------------------------- 1: test loss


@pytest.fixture(scope="module")
def huge_csv(tmp_path_factory):
  """35 rows of N(0, 1) features (5 per class) with feature 3 of one row of run 0's test part
  set to 1e30: finite in float32, but its standardised square is not."""
  folder = tmp_path_factory.mktemp("huge")
  rng = np.random.default_rng(0)
  x, y = rng.normal(size=(35, 10)), np.repeat(np.arange(1, 8), 5)
  path = _write_sfew_csv(folder / "ok.csv", x, y)
  ds = _store.load_data("sfew_features", path)
  cfg = pc.Config.quick(runs=1)
  _, test = mc.train_test_or_fail(ds, cfg.test_fraction, _store.split_seed(cfg.seed, 0))
  row = list(ds.info["names"]).index(test.info["names"][0])
  x[row, 2] = 1e30
  return _write_sfew_csv(folder / "huge.csv", x, y), ds.info["names"][row]


def _cached_runs(workdir):
  return glob.glob(os.path.join(workdir, pc.STUDY, "cache", "*", "progressive_run*.json"))


def test_progressive_refuses_an_infinite_test_loss_before_caching_it(huge_csv, tmp_path):
  """The test MSE overflowed float32; the cache wrote inf as 1e308 and REPORT.md printed the
  mean of 1e308 and 1.6 as a 300-digit 'mean ± inf'."""
  path, name = huge_csv
  work = str(tmp_path)
  with pytest.raises(app.UsageError, match=(
      rf"Run 0's test reconstruction loss is not finite: test example {name} has feature 3 "
      r"\(LPQ feature 3\) = 1e\+30, [0-9.]+e\+30 after standardising on the training part, "
      r"and its squared reconstruction error overflows float32.*fix or remove that value")):
    pc.run(pc.Config.quick(runs=1), work, data="sfew_features", data_path=path)
  assert not _cached_runs(work)          # nothing cached for the run
  assert not os.path.exists(os.path.join(work, pc.STUDY, "results.json"))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the old figure
def test_progressive_refuses_an_infinity_cached_before_the_check(huge_csv, tmp_path,
                                                                 monkeypatch):
  """A run cached by the old code (inf written as 1e308) is refused when read back."""
  path, _ = huge_csv
  work = str(tmp_path)
  with monkeypatch.context() as m:
    m.setattr(pc, "_finite", lambda values: True)   # the old code: no check
    out = pc.run(pc.Config.quick(runs=1), work, data="sfew_features", data_path=path)
  with open(_cached_runs(work)[0]) as f:
    cached = json.load(f)
  assert cached["test_loss"][0] == 1e308 and out["final"]["test_loss_unpruned"][0] == 1e308
  with pytest.raises(app.UsageError, match=r"test reconstruction loss is not finite: test "
                     r"example .* has feature 3 \(LPQ feature 3\) = 1e\+30"):
    pc.run(pc.Config.quick(runs=1), work, data="sfew_features", data_path=path)


def test_finite_treats_the_json_stand_ins_as_not_finite():
  assert pc._finite([1.0, 2.5])  # pylint: disable=protected-access
  for bad in ([1.0, float("inf")], [1.0, None], [1e308], [-1e308], [float("nan")]):
    assert not pc._finite(bad), bad  # pylint: disable=protected-access


# ----------------------------------------------------------------------------- 2: GA, 0 units


def _ga_setup(h=6, runs=2):
  ds = data_lib.load_features("diabetes")
  folds = mc.cv_folds(ds, 2, 0)
  model = ip._model(h)  # pylint: disable=protected-access
  keys = mc.stack_keys([jax.random.key(r) for r in range(runs)])
  params = jax.vmap(model.init)(keys)
  return model, params, folds


def test_target_fitness_scores_an_empty_mask_lowest_and_the_others_as_before():
  model, params, folds = _ga_setup(runs=1)
  fitness = ip.TargetFitness(AccuracyFitness(model, ip.GROUP, None, fast=True, weighted=True))
  data = fitness.base.prepare(jax.tree.map(lambda a: a[0], params), folds.x_tr[0],
                              folds.y_tr[0], sample_weight=folds.w_tr[0])
  data["mask"] = jnp.asarray([True] * 5 + [False])
  data["target"] = jnp.float32(2)
  pop = jnp.asarray([[0] * 6, [0] * 5 + [1], [1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 1]], bool)
  hyper = ga.GAHyperparams(lam=50.0)
  got = np.asarray(fitness(pop, data, hyper))
  assert got[0] == -np.inf and got[1] == -np.inf   # no unit, or only a removed one
  masked = pop & data["mask"][None, :]   # the others: eq. 5 and the over-target cost
  kept = jnp.sum(masked, axis=1).astype(jnp.float32)
  want = (fitness.base.accuracy(masked, data) - 50.0 * kept / 6
          - ip.OVER_TARGET_COST * jnp.maximum(kept - 2.0, 0.0))
  np.testing.assert_allclose(got[2:], np.asarray(want)[2:], rtol=1e-6)
  assert np.all(np.isfinite(got[2:]))


def test_ga_pruner_keeps_at_least_one_unit():
  """At H=6 eq. 5 charges 50/6 = 8.3 points per unit: the GA returned the empty mask (the
  --quick run's iterative GA kept 0 units at target 2 in every fold)."""
  model, params, folds = _ga_setup()
  cfg = ip.Config.quick(ga_population=20, ga_generations=5)
  masks = np.ones((2, 6), bool)
  p, new_masks, _ = ip.prune_runs(cfg, model, "ga", params, masks, folds, [0, 1], 2, ("t",))
  kept = new_masks.sum(1)
  assert np.all(kept >= 1) and np.all(kept <= 2), kept
  kernel = np.asarray(p["params"]["hidden_0"]["kernel"])   # removed units are zero
  assert np.all(kernel[~new_masks[:, None, :].repeat(10, 1)] == 0)


def test_ga_run_that_saw_only_empty_masks_keeps_its_units(monkeypatch):
  model, params, folds = _ga_setup()

  class State:
    hof = np.zeros((2, 5, 6), bool)   # every mask the search kept is empty

  monkeypatch.setattr(mc, "ga_program", lambda *a: (lambda data, hyper, keys: (State, None)))
  masks = np.asarray([[1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1]], bool)
  _, new_masks, _ = ip.prune_runs(ip.Config.quick(), model, "ga", params, masks, folds, [0, 1],
                                  1, ("t",))
  np.testing.assert_array_equal(new_masks, masks)


# ----------------------------------------------------------------------------- 3: split hints


def test_one_example_per_class_does_not_suggest_a_test_fraction(tmp_path):
  """7 rows, one per class and person: the hint was 'a larger test_fraction (at most 0.5)',
  and --test_fraction=0.5 failed with the same message."""
  x = np.random.default_rng(0).normal(size=(7, 10))
  path = _write_sfew_csv(tmp_path / "tiny.csv", x, np.arange(1, 8))
  for fraction in (0.2, 0.5):
    with pytest.raises(app.UsageError, match=r"too few examples per class: a "
                       r"person-independent split needs at least 2 examples in some class") as e:
      pc.run(pc.Config.quick(test_fraction=fraction), str(tmp_path / "w"),
             data="sfew_features", data_path=path)
    assert "larger test_fraction" not in str(e.value)
  assert not os.path.exists(tmp_path / "w")


def test_fold_hints_name_only_fold_counts_that_work():
  one_each = data_lib.Dataset(np.zeros((7, 10)), np.arange(7), tuple("abcdefg"))
  with pytest.raises(app.UsageError, match=r"No --folds can split them \(the fewest is 2\)") as e:
    mc.check_folds(one_each, 2)
  assert "Lower --folds" not in str(e.value)
  three_each = data_lib.Dataset(np.zeros((21, 10)), np.repeat(np.arange(7), 3), tuple("abcdefg"))
  with pytest.raises(app.UsageError, match=r"Lower --folds to at most 3\."):
    mc.check_folds(three_each, 5)
  mc.check_folds(three_each, 3)   # the suggestion works
  with pytest.raises(ValueError, match=r"too few examples per class for any folds") as e:
    data_lib.kfold(np.arange(7), n_splits=2)
  assert "fewer folds" not in str(e.value)


# ----------------------------------------------------------------------------- 4: diverging lr


def test_diverging_learning_rate_is_a_one_line_error(tmp_path, capsys):
  """--lr=1e30 printed a traceback ending in FloatingPointError."""
  def main(argv):
    del argv
    pc.run(pc.Config.quick(lr=1e30, epochs=1, runs=1), str(tmp_path))

  with pytest.raises(SystemExit) as e:
    _flags.one_line_usage_errors(main)(["prog"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert err[0].startswith("Error: Training produced a NaN or infinite loss by epoch 1 ")
  assert "lower the learning rate" in err[0] and err[0].endswith("(--lr=1e+30).")
  assert len(err) == 2 and "Traceback" not in err[1]


def _diverges(*args, **kwargs):
  del args, kwargs
  raise FloatingPointError("Training produced a NaN or infinite loss by epoch 1 ({'loss': "
                           "nan}); lower the learning rate.")


@pytest.mark.parametrize("study,cfg,flag", [
    (pc, pc.Config.quick(), "--lr=0.001"),
    (sb, sb.Config.quick(), "--lr=0.001"),
    (ip, ip.Config.quick(), "--lr=0.01"),
    (gvd, gvd.Config.quick(), "--lrs=0.01,0.001"),
])
def test_every_mlp_study_reports_a_diverging_training_in_one_line(study, cfg, flag, tmp_path,
                                                                  monkeypatch):
  monkeypatch.setattr(jaxprune, "fit_many", _diverges)
  with pytest.raises(app.UsageError, match=rf"NaN or infinite loss by epoch 1 .*lower the "
                     rf"learning rate \({flag}\)\.$"):
    study.run(cfg, str(tmp_path))


def test_training_time_distinctiveness_reports_a_diverging_training_in_one_line(
    tmp_path, monkeypatch):
  monkeypatch.setattr(jaxprune, "fit", _diverges)
  with pytest.raises(app.UsageError, match=r"NaN or infinite loss .*\(--learning_rate=0.003\)"):
    ttd.run(ttd.Config.quick(), str(tmp_path))


def test_cnn_studies_report_a_diverging_training_in_one_line(tmp_path, monkeypatch):
  """The CNN studies' training (experiments._cnn_common.train, under every CNN binary) printed a
  traceback for a diverging --learning_rate too."""
  from experiments import kernel_importance as ki  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jaxprune, "fit", _diverges)
  with pytest.raises(app.UsageError, match=r"NaN or infinite loss .*\(--learning_rate=0.001\)"):
    ki.run(ki.Config.quick(), str(tmp_path))
