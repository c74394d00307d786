"""End-to-end tests of the CNN studies in their quick configuration, resume, rewinding, bad
input.

The four studies run in-process through ``run(Config.quick(), workdir)`` (sharing compiled
programs); their command lines (flags generated from the same ``Config``, one-line errors) are
checked in tests/test_reliability.py.
"""

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app

import jaxprune
from conftest import all_finite, csv_rows, sfew_tree as _sfew_tree, study_results
from experiments import _cnn_common as cc
from experiments import _store
from experiments import kernel_importance as ki
from experiments import lottery_ticket as lt
from experiments import percentile_vs_distinctiveness as pvd
from experiments import training_time_distinctiveness as ttd

PVD, LT, TTD, KI = ("percentile_vs_distinctiveness", "lottery_ticket",
                    "training_time_distinctiveness", "kernel_importance")
# The training-time study on 4 images per class and 3 epochs (its quick run: 6 and 4): the same
# one check per fold (after epoch 2), 4.5 s against 5.9 s with its programs compiled.
CONFIGS = {PVD: (pvd, pvd.Config.quick(angles=(45.0, 85.0))), LT: (lt, lt.Config.quick()),
           TTD: (ttd, ttd.Config.quick(max_per_class=4, epochs=3)), KI: (ki, ki.Config.quick())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("cnn"))
  for name, (module, config) in CONFIGS.items():
    returned = module.run(config, workdir)
    assert _store.to_jsonable(returned) == study_results(workdir, name)["results"], name
  return workdir


def _read(path):
  with open(path) as f:
    return f.read()


def _check_report(folder, pngs):
  with open(os.path.join(folder, "REPORT.md")) as f:
    report = f.read()
  assert "stand-in for SFEW" in report
  for png in pngs:
    assert os.path.getsize(os.path.join(folder, png)) > 1000
    assert f"![]({png})" in report


# ----------------------------------------------------------------------------- studies


def test_percentile_vs_distinctiveness(runs):
  folder = os.path.join(runs, PVD)
  _check_report(folder, ["retrain_45deg.png", "retrain_85deg.png"])
  res = study_results(runs, PVD)
  assert all_finite(res) and res["settings"]["angles"] == [45.0, 85.0]
  fr = csv_rows(os.path.join(folder, "layer_fractions.csv"))
  mins, search = res["results"]["min_angles"], res["results"]["angle_search"]
  assert set(mins) == {"conv_0", "conv_1"} and all(0 <= v <= 180 for v in mins.values())
  at45 = [r for r in fr if r["angle_deg"] == "45.0"]
  if min(mins.values()) > 45:  # no two filters closer than 45 degrees: nothing to merge
    assert all(float(r["fraction_pruned"]) == 0 for r in at45)
  run_angles = [45.0, 85.0]
  if search is not None:  # 45 found nothing: the first angle pruning >= 20% is run as well
    assert all(float(r["fraction_pruned"]) == 0 for r in at45)
    a = search["angle"]
    assert search["fraction"] >= 0.2 and search["tried"][f"{a:g}"] == search["fraction"]
    assert all(f < 0.2 for k, f in search["tried"].items() if float(k) < a)
    assert str(int(a) - 1) in search["tried"] or a - 1 <= 45
    run_angles += [a] if a not in run_angles else []
    assert "finds nothing on this network" in _read(os.path.join(folder, "REPORT.md"))
  assert [(r["angle_deg"], r["layer"]) for r in fr] == [
      (f"{a}", layer) for a in run_angles for layer in ("conv_0", "conv_1")]
  for r in fr:
    assert int(r["kept"]) == round(int(r["units"]) * (1 - float(r["fraction_pruned"])))
  a85 = res["results"]["angles"]["85"]
  fmax = max(v["fraction_pruned"] for v in a85["distinctiveness"]["layers"].values())
  assert fmax > 0.3 and a85["fraction"] == fmax  # 85 degrees merges many filters
  kept, total = a85["magnitude"]["weights_kept"]
  assert kept < total
  acc = csv_rows(os.path.join(folder, "accuracy.csv"))
  assert len(acc) == 3 * len(run_angles) and {r["method"] for r in acc} == {"distinctiveness", "magnitude",
                                                          "unpruned"}
  for r in acc:
    for k in ("acc_after_pruning", "acc_final", "acc_best_on_test"):
      assert 0.0 <= float(r[k]) <= 1.0
  # The peak of the test curve is labelled as picked on the test split, in the table and report.
  for row in res["results"]["summary"]["accuracy"]:
    rec = res["results"]["angles"][f"{row['angle_deg']:g}"]
    curve = (rec["magnitude"] if row["method"] == "magnitude" else
             rec["distinctiveness"] if row["method"] == "distinctiveness" else
             res["results"]["unpruned"])["test_accuracy"]
    assert row["acc_best_on_test"] == max(curve[1:]) and row["acc_final"] == curve[-1]
  assert "picked on the test split" in _read(os.path.join(folder, "REPORT.md"))
  for m in ("distinctiveness", "magnitude"):
    assert len(a85[m]["test_accuracy"]) == res["settings"]["retrain_epochs"] + 1


def test_lottery_ticket(runs):
  folder = os.path.join(runs, LT)
  _check_report(folder, [f"lottery_{p}pct.png" for p in (20, 50, 70, 90)])
  res = study_results(runs, LT)
  assert all_finite(res)
  rows = csv_rows(os.path.join(folder, "lottery.csv"))
  assert [(r["fraction"], r["method"]) for r in rows] == [
      (f, m) for f in ("0.2", "0.5", "0.7", "0.9") for m in ("magnitude", "random")]
  epochs = res["settings"]["retrain_epochs"]
  for row in res["results"]["summary"]["lottery"]:
    curve = res["results"]["fractions"][f"{row['fraction']:g}"][row["method"]]["test_accuracy"]
    assert row["acc_best_on_test"] == max(curve[1:]) and row["acc_final"] == curve[-1]
  assert "picked on the test split" in _read(os.path.join(folder, "REPORT.md"))
  for r in rows:
    assert r["first_epoch_reaching_unpruned"] in {"never"} | {str(e) for e in range(1, epochs + 1)}
  kept = [res["results"]["fractions"][f]["magnitude"]["weights_kept"] for f in ("0.2", "0.9")]
  assert kept[0] > kept[1]
  for f, recs in res["results"]["fractions"].items():
    assert recs["magnitude"]["weights_kept"] == recs["random"]["weights_kept"]  # same counts
    target = res["results"]["unpruned_test_accuracy"]
    for rec in recs.values():
      assert rec["first_epoch_reaching_unpruned"] == cc.first_epoch_reaching(
          rec["test_accuracy"], target)


def test_training_time_distinctiveness_keeps_pruned_weights_zero(runs):
  folder = os.path.join(runs, TTD)
  _check_report(folder, ["loss_curves.png", "units_kept.png"])
  res = study_results(runs, TTD)
  s = res["settings"]
  acc = csv_rows(os.path.join(folder, "validation_accuracy.csv"))
  assert [r["fold"] for r in acc] == [str(f + 1) for f in range(s["folds"])] + ["mean"]
  checks = csv_rows(os.path.join(folder, "checks.csv"))
  assert len(checks) == 2 * s["folds"] * ((s["epochs"] - 1) // s["check_every"])
  for r in checks:
    assert 0.0 <= float(r["min_angle"]) <= float(r["max_angle"]) <= 180.0
  model = jaxprune.CNN4(input_shape=tuple(s["image_size"]) + (s["channels"],))
  template = model.init(jax.random.key(0))
  for f, rec in enumerate(res["results"]["folds"]["pruning"]):
    assert sum(c["pruned_now"] for c in rec["checks"]) > 0  # something was pruned
    assert rec["final_max_abs_masked"] == 0.0
    assert len(rec["train_loss"]) == s["epochs"]
    mask = np.asarray(rec["final_unit_mask"])
    assert mask.sum() == rec["final_units_kept"] < 64
    npz = glob.glob(os.path.join(folder, "cache", "*", f"pruning_fold{f}-*.npz"))
    assert len(npz) == 1
    final = _store.load_tree(npz[0], template)
    wm = jaxprune.expand(final, model, {s["layer"]: jnp.asarray(mask)})
    for p, m in zip(jax.tree.leaves(final), jax.tree.leaves(wm)):
      assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
    # Without pruning the same positions hold non-zero weights: the zeros come from the masks.
    npz_free = glob.glob(os.path.join(folder, "cache", "*", f"no_pruning_fold{f}-*.npz"))[0]
    free = _store.load_tree(npz_free, template)
    assert np.abs(np.asarray(free["params"]["out"]["kernel"])[~mask]).min() > 0
    assert np.all(np.asarray(final["params"]["out"]["kernel"])[~mask] == 0.0)
  for rec in res["results"]["folds"]["no_pruning"]:
    assert rec["final_units_kept"] == 64 and all(c["pruned_now"] == 0 for c in rec["checks"])


def test_kernel_importance(runs):
  folder = os.path.join(runs, KI)
  _check_report(folder, ["pruning_steps.png"])
  assert "Split: stratified by class (the data carry no persons)" in _read(
      os.path.join(folder, "REPORT.md"))
  res = study_results(runs, KI)
  steps = res["results"]["steps"]
  rows = csv_rows(os.path.join(folder, "pruning_steps.csv"))
  assert len(rows) == len(steps) and [int(r["pruned"]) for r in rows] == list(range(len(rows)))
  assert [int(r["units_kept"]) for r in rows] == [16 - i for i in range(len(rows))]
  loss0 = steps[0]["train_loss"]
  for st in steps:
    assert st["train_loss"] <= loss0 + 0.1 + 1e-5
    assert 0.0 <= st["train_accuracy"] <= 1.0
  imps = [st["min_importance"] for st in steps]
  assert imps == sorted(imps)
  if res["results"]["rejected_loss"] is not None:
    assert res["results"]["rejected_loss"] > loss0 + 0.1 - 1e-5
  assert sum(res["results"]["unit_mask"]) == steps[-1]["units_kept"]
  tab = csv_rows(os.path.join(folder, "test_before_after.csv"))
  assert [r["network"] for r in tab] == ["before pruning", "after pruning"]
  # The data's content hash is recorded beside the results and in the report (it is part of
  # the cache fingerprint, so changed data never reuse these results).
  assert res["data"]["name"] == "images" and len(res["data"]["sha256"]) == 64
  with open(os.path.join(folder, "REPORT.md")) as f:
    assert res["data"]["sha256"] in f.read()


def test_resume_gives_identical_results(runs, tmp_path):
  """A run interrupted before its fine-tuning and its last configuration were saved, then
  restarted, ends with the same results.json as the uninterrupted run."""
  src = os.path.join(runs, LT)
  dst = os.path.join(str(tmp_path), LT)
  shutil.copytree(src, dst)
  [cache] = [d for d in glob.glob(os.path.join(dst, "cache", "*")) if os.path.isdir(d)]
  gone = [f for f in os.listdir(cache) if f.startswith(("finetune", "random_0.9"))]
  assert len(gone) >= 3  # finetune .json and .npz, random_0.9 .json
  for f in gone:
    os.remove(os.path.join(cache, f))
  os.remove(os.path.join(dst, "results.json"))
  lt.run(lt.Config.quick(), str(tmp_path))
  assert study_results(str(tmp_path), LT) == study_results(runs, LT)


# ----------------------------------------------------------------------------- code paths


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_rewind_restores_initial_weights_for_kept_positions(method):
  model = jaxprune.LeNet(input_shape=(16, 16, 1))
  init = model.init(jax.random.key(0))
  trained = jax.tree.map(lambda a: a + 0.5 * jax.random.normal(jax.random.key(1), a.shape), init)
  rewound, masks = lt.prune_and_rewind(method, trained, init, 0.5, key=jax.random.key(2))
  kernels = 0
  for path, r in jax.tree_util.tree_flatten_with_path(rewound)[0]:
    i = np.asarray(_at(init, path))
    m = np.asarray(_at(masks, path))
    r = np.asarray(r)
    np.testing.assert_array_equal(r[m], i[m])
    assert np.all(r[~m] == 0.0)
    if path[-1].key == "kernel":
      kernels += 1
      assert abs(m.mean() - 0.5) < 0.01  # half of each kernel pruned
    else:
      assert m.all()  # biases kept
  assert kernels == 3
  with pytest.raises(ValueError, match="method must be"):
    lt.prune_and_rewind("bogus", trained, init, 0.5, key=jax.random.key(2))


def _at(tree, path):
  for k in path:
    tree = tree[k.key]
  return tree


def test_helpers():
  assert cc.first_epoch_reaching([0.9, 0.5, 0.8, 0.95], 0.8) == 2  # epoch 0 never counts
  assert cc.first_epoch_reaching([0.9, 0.5], 0.8) == "never"
  assert cc.parse_size("90x72", "image_size") == (90, 72)
  assert cc.parse_size("64", "image_size") == (64, 64)
  with pytest.raises(app.UsageError, match="HEIGHTxWIDTH"):
    cc.parse_size("9x", "image_size")
  k1, k2 = _store.config_key(0, "retrain", 0.5), _store.config_key(0, "retrain", 0.7)
  assert not np.array_equal(jax.random.key_data(k1), jax.random.key_data(k2))
  np.testing.assert_array_equal(jax.random.key_data(k1),
                                jax.random.key_data(_store.config_key(0, "retrain", 0.5)))


def test_bad_settings_fail_clearly_before_any_work(tmp_path):
  missing = os.path.join(str(tmp_path), "no_such_folder")
  cases = [
      (ki, ki.Config.quick(), {"data": "nope"}, "Unknown --data='nope'"),
      (pvd, pvd.Config.quick(), {"data": "features"}, "--data=features holds feature vectors"),
      (ttd, ttd.Config.quick(), {"data": "sfew_images"}, "needs --data_path"),
      (lt, lt.Config.quick(), {"data": "sfew_images", "data_path": missing}, "Could not load"),
      (pvd, pvd.Config(arch="lenet", pretrained=missing), {}, "--pretrained"),
      (pvd, pvd.Config(pretrained=missing), {}, "is not a file"),
      (ki, ki.Config(image_size=(0, 5)), {}, "not an image size"),
      (ki, ki.Config.quick(norm="l3"), {}, "--norm='l3' is not one of"),
      (ki, ki.Config.quick(test_fraction=1.0), {}, "--test_fraction must lie strictly"),
      (ttd, ttd.Config.quick(layer="conv_0"), {}, "not a dense unit group"),
      (ttd, ttd.Config.quick(channels=2), {}, "--channels must be 1 or 3"),
      (lt, lt.Config.quick(fractions=(0.5, 1.5)), {}, "--fractions: values must be <= 1.0"),
      (lt, lt.Config.quick(seed=2**32), {}, "--seed must be an integer"),
      (pvd, pvd.Config.quick(angles=()), {}, "--angles needs at least one value"),
      (pvd, pvd.Config.quick(groups=("dense_0",)), {}, "not conv unit groups"),
  ]
  for module, config, kw, msg in cases:
    with pytest.raises(app.UsageError, match=msg.replace("(", r"\(").replace(")", r"\)")):
      module.run(config, str(tmp_path), **kw)
  assert not list(tmp_path.rglob("settings.json"))  # nothing written by the failures


# ----------------------------------------------------------------------------- ResNet-18 default


def test_resnet18_is_the_default_network_with_a_cpu_budget():
  c = pvd.Config().resolved()
  assert (c.arch, c.image_size, c.channels) == ("resnet18", (16, 16), 3)
  assert (c.finetune_epochs, c.retrain_epochs) == (10, 10)          # from scratch, shortened
  assert lt.Config().resolved().arch == "resnet18"
  lenet = pvd.Config(arch="lenet").resolved()
  assert (lenet.image_size, lenet.finetune_epochs, lenet.retrain_epochs) == ((30, 24), 15, 25)
  given = pvd.Config(retrain_epochs=3).resolved()                    # a given value wins
  assert (given.finetune_epochs, given.retrain_epochs) == (10, 3)
  assert pvd.Config.quick().resolved().arch == "lenet"               # the smoke run
  with pytest.raises(app.UsageError, match="retrain_epochs"):
    pvd.Config(retrain_epochs=0).validate()


def test_filter_merging_on_resnet18_bias_free_blocks():
  """ResNet's block convs have no bias (batch norm follows): similar-only merging must work."""
  # tests/test_resnet.py's network (the same initialiser: compiled once for the suite)
  model = jaxprune.ResNet18(input_shape=(32, 32, 3))
  params = model.init(jax.random.key(0))
  g = "layer1_0"
  new, umasks, wmasks = pvd.distinctiveness_prune(model, params, [g], 89.0)
  kept = np.asarray(umasks[g])
  assert 0 < kept.sum() < model.groups[g].size           # random filters: some closer than 89
  frac = pvd.layer_fractions(model, umasks)[g]
  assert frac["kept"] == kept.sum() and frac["units"] == model.groups[g].size
  conv1 = np.asarray(new["params"][g]["conv1"]["kernel"])
  conv2 = np.asarray(new["params"][g]["conv2"]["kernel"])
  assert not conv1[..., ~kept].any() and not conv2[:, :, ~kept, :].any()
  masked = jaxprune.apply_masks(new, wmasks)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(masked), jax.tree.leaves(new)))


# ----------------------------------------------------------------------------- the SFEW tree


def test_cnn_binaries_have_the_sfew_tree_flags():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from experiments import _flags  # pylint: disable=g-import-not-at-top
  from experiments import featurize  # pylint: disable=g-import-not-at-top
  for module in (ki, lt, pvd, ttd, featurize):
    fv = flags.FlagValues()
    _flags.define_flags(module.Config, flag_values=fv, common=module is not featurize)
    assert fv["on_error"].help.endswith(featurize.Config.__dataclass_fields__[
        "on_error"].metadata["help"]), module.__name__  # one definition, shared
    assert "any_size" in fv, module.__name__


def test_sfew_frames_of_any_size_and_bad_files_through_the_flags(tmp_path):
  tree = _sfew_tree(tmp_path / "SFEW", per_class=5)
  (tree / "Sad" / "notes.txt").write_text("not an image")
  work = str(tmp_path / "w")
  kw = dict(data="sfew_images", data_path=str(tree))
  with pytest.raises(app.UsageError, match=r"expected 576x720 .*--any_size"):
    ki.run(ki.Config.quick(on_error="skip"), work, **kw)
  with pytest.raises(app.UsageError, match=r"notes.txt: not an image file.*--on_error=skip"):
    ki.run(ki.Config.quick(any_size=True), work, **kw)
  assert not os.path.exists(work)
  ki.run(ki.Config.quick(any_size=True, on_error="skip", epochs=1), work, **kw)
  saved = study_results(work, KI)
  assert saved["data"]["examples"] == 35
  assert saved["settings"]["max_per_class"] is None  # only caps the bundled images
  assert "`Sad/notes.txt` (" in _read(os.path.join(work, KI, "REPORT.md"))


def test_too_few_sfew_frames_per_class_name_the_flag(tmp_path):
  tree = _sfew_tree(tmp_path / "SFEW", per_class=2)  # persons 00000001 and 00000002
  with pytest.raises(app.UsageError, match=r"person-independently.*2 persons.*persons come "
                     r"from the file names.*last '_' field.*1 of round\(1/--test_fraction\) = "
                     r"5 person folds \(--test_fraction, now 0.2\).*--test_fraction=0.5 "
                     r"\(round\(1/0.5\) = 2 person folds, which splits these data\)"):
    ki.run(ki.Config.quick(any_size=True), str(tmp_path / "w"), data="sfew_images",
           data_path=str(tree))
  assert not os.path.exists(tmp_path / "w")


def _rename(tree, name):
  for k, f in enumerate(sorted(tree.glob("*/*.png"))):
    f.rename(f.with_name(name(f, k)))
  return tree


def test_person_split_error_says_where_persons_come_from(tmp_path):
  """One person ('Movie_..._00000001.png' everywhere): the error suggested --test_fraction,
  which cannot help, and did not say how persons are read."""
  one = _rename(_sfew_tree(tmp_path / "one", per_class=3), lambda f, k: f"M_{k}_00000001.png")
  ds = cc.load_images("sfew_images", str(one), (8, 8), 1, any_size=True)
  with pytest.raises(app.UsageError, match=r"the file names carry 1 person \(00000001: 21 "
                     r"images\); persons come from the file names \(SFEW names its frames "
                     r"<movie>_<frame>_<person>.*at least 2 persons: add images of other "
                     r"persons") as e:
    cc.train_test(ds, 0.2, 0)
  assert "larger test_fraction" not in str(e.value)
  # Names outside SFEW's naming carry no persons (they gave one person 'face'): stratified.
  face = _rename(_sfew_tree(tmp_path / "face", per_class=3),
                 lambda f, k: f"{f.parent.name}{k}_face.png")
  ds = cc.load_images("sfew_images", str(face), (8, 8), 1, any_size=True)
  assert ds.groups is None
  split = cc.train_test(ds, 0.34, 0)
  assert np.bincount(split.y_test, minlength=7).min() >= 1  # stratified
  assert "carry no person id (e.g. `Angry/Angry0_face.png`)" in cc.data_description(
      ds, "sfew_images")


def test_workdir_inside_the_image_tree_is_refused_before_anything_is_written(tmp_path):
  """--workdir inside --data_path's tree: the first run wrote its study folder into the tree,
  and the rerun read it as a class folder (the error told the user to remove it)."""
  tree = _sfew_tree(tmp_path / "SFEW", per_class=5)
  before = sorted(p.name for p in tree.iterdir())
  for workdir in (tree, tree / "runs", tmp_path / "link"):
    if workdir.name == "link":
      workdir.symlink_to(tree)
    with pytest.raises(app.UsageError, match=r"--workdir=.* would put the study's folder "
                       r"\(.*kernel_importance\) inside --data_path=.*pass a --workdir outside "
                       r"the image tree"):
      ki.run(ki.Config.quick(any_size=True), str(workdir), data="sfew_images",
             data_path=str(tree))
  assert sorted(p.name for p in tree.iterdir()) == before  # nothing written into the tree
  # The study's folder itself passed as the image tree (data_path = workdir/<study>).
  study_dir = tmp_path / "w" / KI
  shutil.copytree(tree, study_dir)
  with pytest.raises(app.UsageError, match="would put the study's folder"):
    ki.run(ki.Config.quick(any_size=True), str(tmp_path / "w"), data="sfew_images",
           data_path=str(study_dir))
  assert sorted(p.name for p in study_dir.iterdir()) == before
  # Beside the tree, and with the feature data, is fine.
  from experiments import _flags  # pylint: disable=import-outside-toplevel
  _flags.check_workdir_outside_data(str(tmp_path / "work"), "sfew_images", str(tree), KI)
  _flags.check_workdir_outside_data(str(tmp_path), "sfew_images", str(tree), KI)
  _flags.check_workdir_outside_data(str(tree), "sfew_features", str(tree), KI)


def test_training_time_folds_it_cannot_make_name_only_what_its_flags_change(tmp_path):
  """A class with one image: the binary's message suggested fewer folds (2 already failed), a
  smaller test_fraction and person_independent=False (it has neither flag); it now gives the
  MLP studies' one-line message, that no --folds splits these data and what to add."""
  tree = _sfew_tree(tmp_path / "SFEW", per_class=4)
  for extra in sorted((tree / "Fear").iterdir())[1:]:
    extra.unlink()
  work = str(tmp_path / "w")
  with pytest.raises(app.UsageError, match=r"--folds=2 needs at least 2 examples of every "
                     r"class.*No --folds can split them \(the fewest is 2\): add examples") as e:
    ttd.run(ttd.Config.quick(any_size=True), work, data="sfew_images", data_path=str(tree))
  assert "test_fraction" not in str(e.value) and "person_independent" not in str(e.value)
  assert not os.path.exists(work)
