"""Mends of the fine-tuned CNN studies' set-up (experiments/_cnn_finetune.py, _cnn_common.py)
found by a probe of the ResNet-18 path: the --pretrained weights in the cache fingerprint,
--quick with --pretrained, --channels with ResNet-18, a compacted --pretrained file, the
--test_fraction advice of a person split and the split in the report.

Nothing here trains: each test stops at ``validate``, ``prepare`` or ``start``, on tiny images.
"""

import dataclasses
import hashlib
import os
import shutil

import numpy as np
import pytest
from absl import app
from absl import flags

from conftest import sfew_tree as _sfew_tree
from experiments import _cnn_common as cc
from experiments import _cnn_finetune as ft
from experiments import _flags
from experiments import _store
from experiments import lottery_ticket as lt
from jaxprune.models.resnet import DEFAULT_WIDTHS, _layout


def _state_dict(seed=0, num_classes=7, widths=None):
  """A random torchvision-layout resnet18 state dict (numpy only: no model, no JAX)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for tk, _, _, shape in _layout(widths or DEFAULT_WIDTHS, num_classes):
    if tk.endswith("running_var"):
      sd[tk] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      sd[tk] = rng.normal(0.0, 0.05, shape).astype(np.float32)
  return sd


def _weights(path, seed=0, **kw):
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez(path, **_state_dict(seed, **kw))
  return str(path)


def _fingerprint(config, workdir):
  """The cache fingerprint of ``config``'s study (the data record given: nothing is loaded)."""
  study = _store.Study(lt.STUDY, config.settings("images", None), str(workdir),
                       data={"name": "images", "version": "test", "sha256": "0" * 64})
  study.release()
  return study.fingerprint, study.settings


# ----------------------------------------------------------------------------- 1: --pretrained


def test_pretrained_weights_enter_the_fingerprint_by_content(tmp_path):
  """Two weights files of the same name (or one rewritten in place) shared one fingerprint: the
  second run took every step from the first one's cache and wrote its results.json. (The
  settings read the file's bytes only, so any bytes do here.)"""
  for d, text in (("a", b"weights A"), ("b", b"weights B")):
    (tmp_path / d).mkdir()
    (tmp_path / d / "resnet18.npz").write_bytes(text)
  a, b = str(tmp_path / "a" / "resnet18.npz"), str(tmp_path / "b" / "resnet18.npz")
  work = tmp_path / "work"
  fa, sa = _fingerprint(lt.Config.quick(pretrained=a), work)
  fb, sb = _fingerprint(lt.Config.quick(pretrained=b), work)
  assert sa["pretrained"] == sb["pretrained"] == "resnet18.npz"
  assert sa["pretrained_sha256"] == hashlib.sha256(b"weights A").hexdigest()
  assert sb["pretrained_sha256"] != sa["pretrained_sha256"] and fa != fb
  # Unchanged (or moved) file: the same settings, so a rerun resumes.
  moved = tmp_path / "c" / "resnet18.npz"
  moved.parent.mkdir()
  shutil.copy(a, moved)
  assert _fingerprint(lt.Config.quick(pretrained=a), work)[0] == fa
  assert _fingerprint(lt.Config.quick(pretrained=str(moved)), work)[0] == fa
  # Rewritten in place under the same name: a new setting.
  (tmp_path / "a" / "resnet18.npz").write_bytes(b"weights C")
  assert _fingerprint(lt.Config.quick(pretrained=a), work)[0] not in (fa, fb)
  # Without --pretrained the settings are what they were (no new key, old caches still hit).
  assert "pretrained_sha256" not in lt.Config.quick().settings("images", None)


def test_pretrained_hash_is_in_the_report_description(tmp_path):
  path = _weights(tmp_path / "resnet18.npz")
  setup = ft.prepare(lt.Config.quick(pretrained=path, arch="resnet18", image_size=(8, 8)),
                     "images", None)
  digest = hashlib.sha256((tmp_path / "resnet18.npz").read_bytes()).hexdigest()
  assert f"`resnet18.npz`, SHA-256 `{digest[:16]}...`" in setup.description


# ----------------------------------------------------------------------------- 2: --quick


def test_quick_with_pretrained_keeps_resnet18(tmp_path):
  """--quick --pretrained=FILE (no --arch) was refused as '--arch=lenet', never passed."""
  path = _weights(tmp_path / "resnet18.npz")
  fv = flags.FlagValues()
  _flags.define_flags(lt.Config, flag_values=fv)
  fv(["prog", "--quick", f"--pretrained={path}"])
  config = _flags.config_from_flags(lt.Config, fv)
  config.validate()
  r = config.resolved()
  assert (r.arch, r.image_size, r.channels) == ("resnet18", cc.QUICK_SIZE["resnet18"], 3)
  assert (r.finetune_epochs, r.retrain_epochs) == (2, 2)
  assert lt.Config.quick().resolved().arch == "lenet"        # without weights: LeNet
  assert "resnet18 with --pretrained" in fv["arch"].help
  with pytest.raises(app.UsageError, match=r"but --arch=lenet; use --arch=auto"):
    lt.Config.quick(pretrained=path, arch="lenet").validate()  # an explicit choice is kept


# ----------------------------------------------------------------------------- 3: --channels


def test_resnet18_with_one_channel_names_channels_before_loading(tmp_path):
  """--arch=resnet18 --channels=1 was blamed on --image_size, after every image was loaded."""
  missing = str(tmp_path / "no_such_tree")   # loading it would fail: validate() comes first
  for config, net in ((lt.Config.quick(arch="resnet18", channels=1), "--arch=resnet18"),
                      (lt.Config(channels=1), r"ResNet-18 \(--arch=auto\)")):
    with pytest.raises(app.UsageError, match=rf"--channels=1 does not fit {net}: ResNet-18 "
                       r"takes RGB input; use --channels=3") as e:
      lt.run(config, str(tmp_path / "w"), data="sfew_images", data_path=missing)
    assert "--image_size" not in str(e.value)
  assert not os.path.exists(tmp_path / "w")
  lt.Config.quick(channels=1).validate()                     # LeNet takes grey images
  with pytest.raises(app.UsageError, match="--channels=1 does not fit --arch=resnet18"):
    cc.build_model("resnet18", (8, 8), 1, 7)                  # the library-level guard too


# ----------------------------------------------------------------------------- 4: shapes


def test_compacted_pretrained_file_gets_advice_a_binary_user_can_follow(tmp_path):
  """A compacted model's file as --pretrained ended with 'load_resnet18(path,
  widths=small_model.widths)', which the binaries cannot pass."""
  widths = tuple(w // 2 for w in DEFAULT_WIDTHS)
  path = _weights(tmp_path / "small.npz", widths=widths)
  config = lt.Config.quick(pretrained=path, arch="resnet18", image_size=(8, 8))
  with pytest.raises(app.UsageError, match=r"layer1\.0\.conv1\.weight .* has shape "
                     r"\(32, 64, 3, 3\); ResNet-18 expects \(64, 64, 3, 3\)\. The file holds a "
                     r"compacted ResNet-18 \(block widths \(32, 32, 64, 64, 128, 128, 256, 256\)"
                     r"\), but --pretrained needs uncompacted torchvision resnet18 weights") as e:
    ft.prepare(config, "images", None)
  assert "load_resnet18(" not in str(e.value) and "widths=" not in str(e.value)
  # A shape error of another cause keeps the library's advice (about how the file was made).
  sd = _state_dict()
  sd["layer3.1.conv1.weight"] = np.transpose(sd["layer3.1.conv1.weight"], (2, 3, 1, 0))
  np.savez(tmp_path / "hwio.npz", **sd)
  with pytest.raises(app.UsageError, match=r"looks like a Flax/TensorFlow HWIO kernel") as e:
    ft.prepare(dataclasses.replace(config, pretrained=str(tmp_path / "hwio.npz")), "images",
               None)
  assert "load_resnet18(" not in str(e.value)


# ----------------------------------------------------------------------------- 8, 9: the split


def test_too_large_test_fraction_for_a_person_split_says_which_values_work(tmp_path):
  """--test_fraction=0.9 (1 person fold) was told to add persons, which cannot help, and was
  given no value that works."""
  tree = _sfew_tree(tmp_path / "SFEW", per_class=6)   # 6 persons, one frame per class each
  ds = cc.load_images("sfew_images", str(tree), (8, 8), 1, any_size=True)
  for fraction in (0.9, 0.7):
    with pytest.raises(app.UsageError, match=rf"--test_fraction={fraction:g} is too large: the "
                       r"split is 1 of round\(1/--test_fraction\) = 1 person fold, and it needs "
                       r"at least 2.*6 persons.*pass a --test_fraction between 0\.17 and 0\.66.*"
                       r"more persons would not help") as e:
      cc.train_test(ds, fraction, 0)
    assert "Add images of more persons" not in str(e.value)
  for fraction in (0.17, 0.66):                         # the bounds it names both work
    split = cc.train_test(ds, fraction, 0)
    assert not set(split.persons_test) & set(split.persons_train)


def test_report_says_the_split_is_person_independent_and_its_test_share(tmp_path):
  """REPORT.md said '28 training and 14 test images' only: not that the split kept persons
  apart, nor why the test share (33%) was not --test_fraction's 20%."""
  tree = _sfew_tree(tmp_path / "SFEW", per_class=6)
  setup = ft.prepare(lt.Config.quick(any_size=True), "sfew_images", str(tree))
  assert setup.split.persons_test == ("00000005", "00000006")   # 1 of 5 folds: 2 persons
  assert len(setup.split.persons_train) == 4
  assert ("Split: person-independent (no person on both sides): 28 training and 14 test images "
          "(33% test; --test_fraction=0.2 asks for about 20%: the test part is 1 of "
          "round(1/--test_fraction) = 5 stratified person folds, and persons are not divided); "
          "test persons `00000005`, `00000006` (2 of 6).") in setup.description
  bundled = ft.prepare(lt.Config.quick(), "images", None)      # no persons: stratified
  assert bundled.split.persons_test is None
  assert "Split: stratified by class (the data carry no persons): " in bundled.description
  assert "person-independent" not in bundled.description
