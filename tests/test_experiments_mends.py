"""Mends of the experiment binaries, tested through their pure parts (Config.validate, the
split-seed helper, the figure title, the Study's cleanup of an earlier run's outputs); one
quick binary run (progressive_compression) checks a seed the old split seed refused and the
returned results end to end."""

import json
import os

import numpy as np
import pytest
from absl import app

from jaxprune import data as data_lib
from experiments import _mlp_common as mc
from experiments import _report
from experiments import _store
from experiments import percentile_vs_distinctiveness as pv
from experiments import progressive_compression as pc
from experiments import similarity_bounds as sb
from experiments import training_time_distinctiveness as ttd

BIG_SEED = 4294968  # the smallest seed whose seed * 1000 no longer fits in 32 bits


# ----------------------------------------------------------------------------- split seeds


def test_split_seed_keeps_todays_splits_and_accepts_every_seed():
  for seed, r in ((0, 0), (0, 2), (7, 1), (4294967, 295)):
    assert _store.split_seed(seed, r) == seed * 1000 + r  # unchanged where it worked
  for seed in (BIG_SEED, 2**31, 2**32 - 1):
    for r in (0, 1, 999):
      assert 0 <= _store.split_seed(seed, r) < 2**32
      assert _store.split_seed(seed, r) == (seed * 1000 + r) % 2**32


@pytest.mark.parametrize("study", [sb, pc])
def test_splits_accept_a_large_seed_and_keep_seed_0(study):
  """--seed=4294968 stopped with an error blaming --test_fraction (the split seed overflowed)."""
  ds = mc.load_features("features", None)
  cfg = study.Config.quick(seed=BIG_SEED)
  cfg.validate()
  splits = study._splits(ds, cfg)  # pylint: disable=protected-access
  assert len(splits) == cfg.runs
  # Seed 0 keeps exactly the split it had (seed * 1000 + run).
  got = study._splits(ds, study.Config.quick(seed=0))  # pylint: disable=protected-access
  for r, split in enumerate(got):
    train, test = mc.train_test_or_fail(ds, cfg.test_fraction, r)
    train, test, _ = data_lib.standardize_split(train, test)
    x_train, x_test = (s.x if hasattr(s, "x") else s for s in split)
    np.testing.assert_array_equal(x_train, train.x)
    np.testing.assert_array_equal(x_test, test.x)
  with pytest.raises(app.UsageError, match="--seed"):
    study.Config.quick(seed=2**32).validate()


def test_progressive_compression_large_seed_returns_its_results(tmp_path):
  """The one binary run: a large seed works, and run returns all of results.json's results
  (it returned only summary and final)."""
  out = pc.run(pc.Config.quick(seed=BIG_SEED, runs=1), str(tmp_path))
  with open(os.path.join(tmp_path, pc.STUDY, "results.json")) as f:
    written = json.load(f)
  assert written["settings"]["seed"] == BIG_SEED
  assert json.loads(json.dumps(_store.to_jsonable(out))) == written["results"]
  assert {"summary", "steps", "final", "runs", "data"} <= set(out)


# ----------------------------------------------------------------------------- similarity bounds


def test_similarity_bounds_title_follows_the_flags():
  assert sb.figure_title(sb.Config()) == (
      "Pairwise angles (dashed: 45/140, dotted: 15/165)")
  cfg = sb.Config(similar_deg=30, complementary_deg=120, default_similar_deg=10.5,
                  default_complementary_deg=170)
  assert sb.figure_title(cfg) == "Pairwise angles (dashed: 30/120, dotted: 10.5/170)"


def test_similarity_bounds_run_returns_results_and_titles_its_figure(tmp_path, monkeypatch):
  """run() with training and pruning stubbed (no JAX work): it returns what results.json holds,
  and the figure drawn carries the flags' bounds."""
  cfg = sb.Config.quick(similar_deg=30, complementary_deg=120)

  def fake_prune(c, h, r, params, split):
    del params, split
    return {"H": h, "run": r, "test_acc_before": 50.0, "train_acc_before": 60.0,
            "min_angle": 20.0, "max_angle": 150.0, "angles": [20.0, 90.0, 150.0],
            "experiments": [{"rule": rule, "threshold": thr, "pairs": [], "qualifying_pairs": 0,
                             "hidden_after": h, "test_acc_after": 50.0, "train_acc_after": 60.0}
                            for rule, thr in c.experiments()]}

  monkeypatch.setattr(sb, "train_all", lambda c, splits, study: {
      (h, r): None for h in c.hidden for r in range(c.runs)})
  monkeypatch.setattr(sb, "prune_one", fake_prune)
  titles = []
  save = _report.save_figure

  def capture(fig, path):
    titles.append(fig.axes[0].get_title())
    save(fig, path)

  monkeypatch.setattr(_report, "save_figure", capture)
  out = sb.run(cfg, str(tmp_path))
  with open(os.path.join(tmp_path, sb.STUDY, "results.json")) as f:
    assert json.load(f)["results"] == json.loads(json.dumps(_store.to_jsonable(out)))
  assert {"summary", "pairs", "networks", "data"} <= set(out)
  assert titles == ["Pairwise angles (dashed: 30/120, dotted: 15/165)"]


# ----------------------------------------------------------------------------- Config.validate


def test_check_every_must_be_below_epochs():
  ttd.Config().validate()
  ttd.Config.quick().validate()  # epochs 4, a check every 2
  for cfg in (ttd.Config(check_every=30), ttd.Config(check_every=100),
              ttd.Config.quick(check_every=4), ttd.Config.quick(epochs=2)):
    with pytest.raises(app.UsageError) as e:
      cfg.validate()
    message = str(e.value)
    assert "--check_every" in message and "--epochs" in message and "\n" not in message


def test_percentile_angles_must_be_distinct():
  pv.Config.quick(angles=(45.0, 50.0)).validate()
  with pytest.raises(app.UsageError, match="--angles lists a value twice"):
    pv.Config.quick(angles=(45.0, 45.0)).validate()


def test_cnn_study_lists_must_be_distinct():
  """A group or fraction given twice ran (or reported) the same setting twice."""
  from experiments import lottery_ticket as lt
  pv.Config.quick(groups=("conv_0", "conv_1")).validate()
  with pytest.raises(app.UsageError, match="--groups lists a value twice"):
    pv.Config.quick(groups=("conv_0", "conv_0")).validate()
  lt.Config.quick(fractions=(0.2, 0.5)).validate()
  with pytest.raises(app.UsageError, match="--fractions lists a value twice"):
    lt.Config.quick(fractions=(0.5, 0.5)).validate()
  # Values equal to 6 significant digits shared one cached run and one results key (f"{x:g}"):
  # the second angle reported the first one's 16 kept filters where it keeps 15 alone.
  pv.Config.quick(angles=(56.2583, 56.2584)).validate()
  with pytest.raises(app.UsageError, match="agree to 6 significant digits"):
    pv.Config.quick(angles=(56.2583, 56.25834)).validate()
  with pytest.raises(app.UsageError, match="--fractions: 0.5 and 0.5000001 agree"):
    lt.Config.quick(fractions=(0.5, 0.5000001)).validate()


# ----------------------------------------------------------------------------- stale outputs


DATA = {"name": "features", "version": "test", "sha256": "0" * 64}


def _finish(study, extra_files=()):
  for name in extra_files:
    _store.atomic_write_bytes(study.path(name), name.encode())
  _report.write_table(study.dir, "table", [{"a": study.settings["x"]}])
  study.write_results({"x": study.settings["x"]})
  study.write_report("t", [])


def test_other_settings_remove_only_the_previous_runs_own_outputs(tmp_path):
  """A rerun with other settings left REPORT.md, tables and figures of the old run beside its
  own; now they go, but never a file the study did not write (or that was edited since)."""
  folder = tmp_path / "toy"
  _finish(_store.Study("toy", {"x": 1, "seed": 0}, str(tmp_path), data=DATA),
          ["a.png", "b.png", "edited.png"])
  (folder / "mine.md").write_text("the user's notes")
  (folder / "edited.png").write_bytes(b"edited by the user")
  first_cache = sorted(p.name for p in (folder / "cache").iterdir())

  # Same settings: nothing is removed (the run rewrites the same files).
  same = _store.Study("toy", {"x": 1, "seed": 0}, str(tmp_path), data=DATA)
  assert {"a.png", "b.png", "REPORT.md", "table.md", "table.csv"} <= {
      p.name for p in folder.iterdir()}
  same.release()

  study = _store.Study("toy", {"x": 2, "seed": 0}, str(tmp_path), data=DATA)
  names = {p.name for p in folder.iterdir()}
  assert not names & {"a.png", "b.png", "REPORT.md", "table.md", "table.csv", "results.json"}
  assert {"mine.md", "edited.png", "cache"} <= names
  assert (folder / "edited.png").read_bytes() == b"edited by the user"
  assert set(first_cache) <= {p.name for p in (folder / "cache").iterdir()}  # caches kept
  _finish(study, ["c.png"])
  assert {"c.png", "REPORT.md", "table.md", "results.json"} <= {p.name for p in folder.iterdir()}

  # Back to the first settings: the second run's outputs go in turn.
  back = _store.Study("toy", {"x": 1, "seed": 0}, str(tmp_path), data=DATA)
  assert not {"c.png", "REPORT.md", "table.md"} & {p.name for p in folder.iterdir()}
  back.release()


def test_folder_without_a_record_of_outputs_is_left_alone(tmp_path):
  """A folder from before the record (or someone else's files): nothing is removed."""
  folder = tmp_path / "toy"
  folder.mkdir()
  for name in ("REPORT.md", "old.png", "summary.csv"):
    (folder / name).write_text(name)
  study = _store.Study("toy", {"x": 3, "seed": 0}, str(tmp_path), data=DATA)
  assert {"REPORT.md", "old.png", "summary.csv"} <= {p.name for p in folder.iterdir()}
  study.release()
  (folder / "cache" / "outputs.json").write_text("not json")
  study = _store.Study("toy", {"x": 4, "seed": 0}, str(tmp_path), data=DATA)
  assert {"REPORT.md", "old.png", "summary.csv"} <= {p.name for p in folder.iterdir()}
  study.release()
  assert np.all([(folder / n).read_text() == n for n in ("REPORT.md", "old.png")])
