"""Probes of three study binaries (lottery_ticket, similarity_bounds, kernel_importance) as an
outside user would run them: what they report checked against hand-built cases and plain NumPy,
their edges (one fraction, bounds that take every pair or none, a threshold that removes every
kernel) and their one-line errors for bad settings."""

import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import app

import jaxprune
from experiments import _cnn_common as cc
from experiments import _cnn_finetune as ft
from experiments import kernel_importance as ki
from experiments import lottery_ticket as lt
from experiments import similarity_bounds as sb
from conftest import host_f32


# ----------------------------------------------------------------------------- lottery_ticket


def test_lottery_prune_and_rewind_against_numpy():
  """Per kernel, round(fraction x size) weights pruned, the smallest |w| of the trained
  weights (ties included: equal magnitudes still give the exact count), biases kept; the
  rewound weights are the initial ones where kept and 0 where pruned; random pruning removes
  the same counts."""
  rng = np.random.default_rng(0)
  trained = {"a": {"kernel": host_f32(rng.normal(size=(4, 5))),
                   "bias": jnp.ones(5)},
             "b": {"kernel": jnp.full((5, 3), 0.5, jnp.float32).at[0, 0].set(-2.0),  # ties
                   "bias": jnp.zeros(3)}}
  init = jax.tree.map(lambda a: a + 10.0, trained)
  for frac in (0.0, 0.3, 0.5, 1.0):
    for method in lt.METHODS:
      rewound, masks = lt.prune_and_rewind(method, trained, init, frac, key=jax.random.key(1))
      for layer in ("a", "b"):
        w = np.asarray(trained[layer]["kernel"])
        m = np.asarray(masks[layer]["kernel"], bool)
        assert (~m).sum() == round(frac * w.size), (method, frac, layer)
        if method == "magnitude" and 0 < (~m).sum() < m.size:
          assert np.abs(w[~m]).max() <= np.abs(w[m]).min()
        assert np.asarray(masks[layer]["bias"], bool).all()
        r = np.asarray(rewound[layer]["kernel"])
        np.testing.assert_array_equal(r[m], np.asarray(init[layer]["kernel"])[m])
        assert np.all(r[~m] == 0)
        np.testing.assert_array_equal(rewound[layer]["bias"], init[layer]["bias"])
  # the one weight of magnitude 2 in the tied layer is the last one a magnitude mask prunes
  _, masks = lt.prune_and_rewind("magnitude", trained, init, 14 / 15, key=jax.random.key(1))
  assert np.argwhere(np.asarray(masks["b"]["kernel"])).tolist() == [[0, 0]]


def test_lottery_figure_names():
  """The default fractions keep their figure names; fractions the flags tell apart (6
  significant digits) get figures of their own."""
  assert [lt.figure_name(f) for f in (0.2, 0.5, 0.7, 0.9)] == [
      "lottery_20pct.png", "lottery_50pct.png", "lottery_70pct.png", "lottery_90pct.png"]
  assert lt.figure_name(0.0) == "lottery_0pct.png" and lt.figure_name(1.0) == "lottery_100pct.png"
  assert lt.figure_name(0.201) == "lottery_20.1pct.png"
  close = (0.2, 0.201, 0.204, 0.001, 0.004, 0.123456, 0.123457)
  assert len({lt.figure_name(f) for f in close}) == len(close)


def test_lottery_close_fractions_each_get_their_figure(tmp_path, monkeypatch):
  """--fractions=0.2,0.201 (or 0.001,0.004) named both figures lottery_20pct.png (round(100 x
  fraction)): the second overwrote the first, and REPORT.md showed it twice. The data, model
  and training are stand-ins here: what is checked is the figures and the report."""
  def fake_train(model, params, split, **kw):
    del model, split
    n = kw["epochs"] + 1
    return params, {"test_accuracy": [0.1 * (i + 1) for i in range(n)],
                    "test_loss": [1.0] * n, "train_accuracy": [0.5] * (n - 1),
                    "train_loss": [1.0] * (n - 1)}

  monkeypatch.setattr(ft, "prepare", lambda config, data, data_path: ft.Setup(
      config.resolved(), None, None, {"w": jnp.ones(4)}, "Stand-in set-up."))
  monkeypatch.setattr(cc, "train", fake_train)
  monkeypatch.setattr(cc, "plot_curves", lambda path, *a, **kw: open(path, "wb").close())
  monkeypatch.setattr(ft, "finetune", lambda study, setup: fake_train(
      setup.model, setup.init_params, setup.split, epochs=setup.config.finetune_epochs))
  monkeypatch.setattr(lt, "prune_and_rewind", lambda method, trained, init, frac, key: (
      init, jaxprune.ones_like(init)))
  cfg = lt.Config.quick(fractions=(0.2, 0.201), finetune_epochs=1,
                        retrain_epochs=1)
  lt.run(cfg, str(tmp_path))
  folder = tmp_path / lt.STUDY
  figures = sorted(f for f in os.listdir(folder) if f.endswith(".png"))
  assert len(figures) == 2, figures
  report = (folder / "REPORT.md").read_text()
  assert all(report.count(f"![]({f})") == 1 for f in figures), report


# ----------------------------------------------------------------------------- similarity_bounds


@pytest.mark.parametrize("kw, match", [
    (dict(hidden=(6, 6)), r"^--hidden lists a value twice"),
    (dict(hidden=()), r"^--hidden needs at least one value"),
    (dict(hidden=(6.5,)), r"^--hidden must be whole numbers"),
    (dict(hidden=(1, 6)), r"^--hidden sizes must be at least 2"),
    (dict(runs=2.5), r"^--runs must be a whole number"),
])
def test_similarity_bounds_settings_from_python_fail_before_the_folder(kw, match, tmp_path):
  """From Python, Config.validate skipped the list checks the flags make: hidden=(6, 6) ran
  two copies of one network, hidden=() crashed in max() after opening the work folder, and
  hidden=(6.5,) trained 6 units."""
  work = tmp_path / "w"
  with pytest.raises(app.UsageError, match=match):
    sb.run(sb.Config.quick(**kw), str(work))
  assert not work.exists()


def _hand_net(w1, b1, w2):
  """A 10-H-7 sigmoid MLP's params from hidden weights over feature 0 only."""
  h = len(w1)
  kernel = np.zeros((10, h), np.float32)
  kernel[0] = w1
  return {"params": {"hidden_0": {"kernel": jnp.asarray(kernel),
                                  "bias": jnp.asarray(b1, jnp.float32)},
                     "out": {"kernel": jnp.asarray(w2, jnp.float32),
                             "bias": jnp.zeros(7, jnp.float32)}}}


def _split(n=40, seed=0):
  rng = np.random.default_rng(seed)
  part = lambda: types.SimpleNamespace(x=rng.normal(size=(n, 10)).astype(np.float32),
                                       y=rng.integers(0, 7, n))
  return part(), part()


def test_similarity_bounds_pairs_and_accuracy_of_a_hand_built_network():
  """Units 0 and 1 are exact duplicates (angle 0), unit 2 is their complement (o = 1 - o_0,
  angle 180 with both), unit 3 is another slope. Similar at 45: the duplicate pair merges,
  keeping 0, and the outputs are exactly those before, so the accuracy is unchanged.
  Complementary at 170: one of (0, 2), (1, 2) at 180 degrees, then nothing (a unit acts once):
  the lower pair (0, 2) is removed."""
  rng = np.random.default_rng(1)
  w2 = rng.normal(size=(4, 7))
  params = _hand_net([1.5, 1.5, -1.5, 0.4], [0.2, 0.2, -0.2, -0.3], w2)
  train, test = _split()
  cfg = sb.Config.quick(similar_deg=45.0, complementary_deg=170.0, default_similar_deg=1.0,
                        default_complementary_deg=179.0)
  out = sb.prune_one(cfg, 4, 0, params, (train, test))
  # independent angles
  a = 1 / (1 + np.exp(-(train.x[:, :1] * np.array([1.5, 1.5, -1.5, 0.4]) +
                        np.array([0.2, 0.2, -0.2, -0.3])))) - 0.5
  cos = a.T @ a / np.outer(np.linalg.norm(a, axis=0), np.linalg.norm(a, axis=0))
  ang = np.degrees(np.arccos(np.clip(cos, -1, 1)))[np.triu_indices(4, 1)]
  np.testing.assert_allclose(out["angles"], ang, atol=0.05)
  sim45, comp170, sim1, comp179 = out["experiments"]
  assert [(p["kept"], p["removed"]) for p in sim45["pairs"]] == [([0], [1])]
  assert sim45["hidden_after"] == 3
  assert sim45["test_acc_after"] == pytest.approx(out["test_acc_before"])
  assert [(p["kept"], p["removed"]) for p in comp170["pairs"]] == [([], [0, 2])]
  assert comp170["qualifying_pairs"] == 2 and comp170["hidden_after"] == 2
  assert [(p["kept"], p["removed"]) for p in sim1["pairs"]] == [([0], [1])]   # angle 0 < 1
  assert comp179["qualifying_pairs"] == 2                                      # 180 > 179
  logits = (1 / (1 + np.exp(-(test.x @ np.asarray(params["params"]["hidden_0"]["kernel"]) +
                              np.asarray(params["params"]["hidden_0"]["bias"])))))
  keep = [1, 3]
  acc = 100 * np.mean(np.argmax(logits[:, keep] @ w2[keep], 1) == test.y)
  assert comp170["test_acc_after"] == pytest.approx(acc, abs=1e-4)


def test_similarity_bounds_say_when_the_last_unit_is_kept():
  """Two complementary pairs, (0, 1) and (2, 3), both at 180 degrees: complementary at 170
  would remove all four units, but a sweep never empties the layer, so unit 0 stays. The pair
  table listed it as the kept unit of a complementary pair with no word of why (the report
  says complementary removes both)."""
  params = _hand_net([1.0, -1.0, 0.3, -0.3], [0.1, -0.1, 0.5, -0.5], np.ones((4, 7)))
  cfg = sb.Config.quick(hidden=(4,), runs=1, complementary_deg=170.0)
  out = sb.prune_one(cfg, 4, 0, params, _split())
  comp = out["experiments"][1]
  assert comp["rule"] == "complementary" and comp["hidden_after"] == 1
  assert [(p["kept"], p["removed"]) for p in comp["pairs"]] == [([0], [1]), ([], [2, 3])]
  _, pair_rows = sb.summarise(cfg, [out])
  rows = [r for r in pair_rows if r["rule"] == "complementary" and r["threshold_deg"] == 170.0]
  assert [r["kept"] for r in rows] == ["0", "-"]
  assert "last" in rows[0]["note"] and rows[1]["note"] == "", rows


# ----------------------------------------------------------------------------- kernel_importance


def test_kernel_importance_too_small_image_fails_in_validate():
  """--image_size=8x10 failed only after the images were read, naming --arch=lenet, a flag
  this binary does not have."""
  with pytest.raises(app.UsageError, match=r"^--image_size=8x10 is too small for the study's "
                     r"LeNet-style CNN: .*at least 16x16") as e:
    ki.Config.quick(image_size=(8, 10)).validate()
  assert "--arch" not in str(e.value)
  ki.Config.quick(image_size=(16, 16)).validate()


def test_kernel_importance_stop_reason():
  """The report says why the removals stopped: a rejected removal, the last kernel (the
  library never removes it, so a threshold no loss passes stops at one kernel with no
  rejected loss), or a NaN loss."""
  rows = [{"units_kept": 3}, {"units_kept": 2}]
  assert "would raise the training loss to 2.5, past the limit 2.1" in ki.stop_reason(
      rows, 2.5, 2.1)
  assert "last kernel" in ki.stop_reason(rows + [{"units_kept": 1}], None, 2.1)
  assert "NaN" in ki.stop_reason(rows, None, 2.1)
