"""Helpers shared by the MLP studies (GA vs distinctiveness, similarity bounds, progressive
compression, iterative pruning): stacked keys, padded cross-validation folds (sample weight 0 on
padding rows, which the library's evaluation, pruners and GA fitness take as samples that do not
exist), scores in the studies' units, and probability flags (configuration keys, params files and
list flags live in ``_common``).

Everything here is experiment orchestration; the learning and pruning live in ``jaxprune``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune
from jaxprune import data as data_lib
from jaxprune import ga
from jaxprune.ga import incremental as ga_incremental
from jaxprune.ga import loop as ga_loop
from experiments import _flags
from experiments import _store

PyTree = Any


# ----------------------------------------------------------------------------- keys


def stack_keys(keys: Sequence[jax.Array]) -> jax.Array:
  """The keys stacked on the host (``jnp.stack`` compiles a program per number of keys)."""
  keys = list(keys)
  data = np.stack([np.asarray(jax.random.key_data(k)) for k in keys])
  return jax.random.wrap_key_data(data, impl=jax.random.key_impl(keys[0]))


# ----------------------------------------------------------------------------- flags


def check_probability(name: str, value) -> None:
  if not 0.0 <= value <= 1.0:
    _flags.fail(f"--{name} must be a probability in [0, 1], got {value}.")


@contextlib.contextmanager
def diverging_training_fails(flag: str, value):
  """Turns the library's refusal of a NaN or infinite training loss (the ``FloatingPointError``
  of ``jaxprune.fit`` and ``fit_many``, whose message names the epoch and the fixes) into the
  binaries' one-line usage error, naming the learning-rate flag ``--flag`` and its ``value``
  (a number, or a list flag's values): a diverging ``--lr=1e30`` printed a traceback.

  Example:
    >>> from absl import app
    >>> try:
    ...   with diverging_training_fails("lr", 1e30):
    ...     raise FloatingPointError("Training produced a NaN or infinite loss by epoch 1.")
    ... except app.UsageError as e:
    ...   print(e)
    Training produced a NaN or infinite loss by epoch 1 (--lr=1e+30).
  """
  try:
    yield
  except FloatingPointError as e:
    shown = (",".join(f"{v:g}" for v in value) if isinstance(value, (tuple, list))
             else f"{value:g}")
    _flags.fail(f"{str(e).rstrip('.')} (--{flag}={shown}).")


# ----------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Folds:
  """Cross-validation folds, standardised on each training fold, padded to one shape.

  Attributes:
    x_tr, y_tr, w_tr: (F, Ntr, D), (F, Ntr), (F, Ntr) training folds; ``w`` is 1 for real
      rows and 0 for padding (padding rows are zeros with label 0).
    x_te, y_te, w_te: the test folds, padded the same way.
    n_tr, n_te: real sizes per fold.
  """

  x_tr: np.ndarray
  y_tr: np.ndarray
  w_tr: np.ndarray
  x_te: np.ndarray
  y_te: np.ndarray
  w_te: np.ndarray
  n_tr: tuple[int, ...]
  n_te: tuple[int, ...]

  @property
  def count(self) -> int:
    return len(self.n_tr)

  def train(self, f: int) -> tuple[np.ndarray, np.ndarray]:
    return self.x_tr[f, :self.n_tr[f]], self.y_tr[f, :self.n_tr[f]]

  def test(self, f: int) -> tuple[np.ndarray, np.ndarray]:
    return self.x_te[f, :self.n_te[f]], self.y_te[f, :self.n_te[f]]


def pad_stack(arrays: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Stacks arrays of unequal length (axis 0) with zero padding; returns (stack, weights)."""
  n = max(len(a) for a in arrays)
  out = np.zeros((len(arrays), n) + arrays[0].shape[1:], arrays[0].dtype)
  w = np.zeros((len(arrays), n), np.float32)
  for i, a in enumerate(arrays):
    out[i, :len(a)] = a
    w[i, :len(a)] = 1.0
  return out, w


def cv_folds(ds: data_lib.Dataset, n_splits: int, seed: int) -> Folds:
  """Stratified folds, person-independent when the data carry persons (``ds.groups``: every
  person's rows in one test fold); each standardised with statistics of its training part
  only."""
  parts = []
  for tr, te in _kfold_or_fail(ds, n_splits, seed):
    train, test = data_lib.split(ds, tr, te)
    train, test, _ = data_lib.standardize_split(train, test)
    parts.append((train, test))
  x_tr, w_tr = pad_stack([p[0].x for p in parts])
  y_tr, _ = pad_stack([p[0].y for p in parts])
  x_te, w_te = pad_stack([p[1].x for p in parts])
  y_te, _ = pad_stack([p[1].y for p in parts])
  return Folds(x_tr, y_tr, w_tr, x_te, y_te, w_te, tuple(len(p[0]) for p in parts),
               tuple(len(p[1]) for p in parts))


def _kfold_or_fail(ds: data_lib.Dataset, n_splits: int, seed: int):
  """``data_lib.kfold`` (person-independent when the data carry persons) with a one-line usage
  error naming --folds when the folds cannot be made: with persons, a class whose examples all
  come from persons of one test fold would have no training example there. The message gives
  the largest smaller --folds that works for these data and this seed, if any."""
  person = ds.groups is not None
  try:
    return data_lib.kfold(ds, n_splits=n_splits, seed=seed, person_independent=person)
  except ValueError as e:
    works = None
    for k in range(n_splits - 1, 1, -1):
      try:
        data_lib.kfold(ds, n_splits=k, seed=seed, person_independent=person)
      except ValueError:
        continue
      works = k
      break
    fix = (f"Lower --folds to {works} (the most that splits these data with --seed={seed})"
           if works else "No smaller --folds splits these data either: add examples of other "
           "persons for that class")
    # The library's own advice names its arguments (test_fraction, person_independent=False),
    # which the binaries do not have: keep what happened, give the flag to change.
    what = str(e).split(". Use data with")[0].rstrip(".")
    _flags.fail(f"Cannot make --folds={n_splits} cross-validation folds: {what}. {fix}.")


def _refuse_image_tree(data: str, data_path: str | None) -> None:
  """Fails, naming the fix, when --data=sfew_features is given the SFEW image tree (a folder of
  class folders) instead of the features file: the loader's own message only said that the
  folder held no SFEW.xlsx or SFEW.csv."""
  if data != "sfew_features" or not data_path:
    return
  folder = os.path.expanduser(data_path)
  if not os.path.isdir(folder):
    return
  with contextlib.suppress(OSError):
    names = os.listdir(folder)
    if any(n.lower() in ("sfew.csv", "sfew.xlsx") for n in names):
      return   # the features file is there: the loader reads it
    classes = sorted(n for n in names if n.lower() in data_lib.SFEW_CLASS_NAMES
                     and os.path.isdir(os.path.join(folder, n)))
    if classes:
      arg = data_lib.sfew.flag_arg("data_path", data_path)   # quoted: pasted into a shell
      _flags.fail(f"{arg} is the SFEW image tree (it holds the class folders "
                  f"{', '.join(classes)}), but --data=sfew_features reads the features file "
                  "(SFEW.xlsx or SFEW.csv). Compute it with python -m experiments.featurize "
                  f"{arg} --out=SFEW.csv and pass --data_path=SFEW.csv, or "
                  "give the tree to a CNN study (--data=sfew_images).")


def load_features(data: str, data_path: str | None) -> data_lib.Dataset:
  """Loads --data through ``_store.load_data``; fails clearly unless it has the 10 features
  (before loading anything when --data names images)."""
  _flags.refuse_image_data(data, "trains the MLP on the 10 features", " (python -m "
                           "experiments.featurize computes the features of an SFEW image tree)")
  _refuse_image_tree(data, data_path)
  ds = _store.load_data(data, data_path)
  if ds.x.ndim != 2 or ds.x.shape[1] != 10:
    _flags.fail(f"--data={data} has inputs of shape {ds.x.shape[1:]}; this study needs the 10 "
                "features (use --data=features, digits_features or sfew_features).")
  return ds


def train_test_or_fail(ds: data_lib.Dataset, test_fraction: float, seed: int, *,
                       person_independent: bool | None = None):
  """``data_lib.train_test_split`` with a one-line usage error (naming --test_fraction) when
  the data cannot be split; call it before opening the study's folder, so that bad input
  leaves nothing behind. Person-independent by default when the data carry persons."""
  if person_independent is None:
    person_independent = ds.groups is not None
  try:
    return data_lib.train_test_split(ds, test_fraction=test_fraction, seed=seed,
                                     person_independent=person_independent)
  except ValueError as e:
    if person_independent and ds.groups is not None:
      _flags.fail(person_split_error(
          ds, e, test_fraction, seed=seed,
          where=f"persons come from the file names ({data_lib.sfew.PERSON_NAMING})",
          unnamed="if these names do not name persons, rename them so that their last '_' "
                  "field is not a number (data without persons are split stratified)",
          carrier="the file names"))
    _flags.fail(f"Cannot split the data into training and test parts: {e} "
                f"(test_fraction is --test_fraction, now {test_fraction:g}).")


def person_split_error(ds: data_lib.Dataset, error: Exception, test_fraction: float, *,
                       where: str, unnamed: str, items: str = "examples",
                       carrier: str = "the data", seed: int | None = None) -> str:
  """The one-line message for a person-independent split that failed with ``error``: how many
  persons ``carrier`` holds, ``where`` they come from, and what the user can change
  (--test_fraction, or the data; ``unnamed``: what to do when the persons are not persons).
  A --test_fraction is suggested only where a split with it (and ``seed``) works."""
  persons, counts = np.unique(ds.groups, return_counts=True)
  p, folds = len(persons), int(round(1.0 / test_fraction))
  shown = ", ".join(f"{q}: {c} {items}" for q, c in list(zip(persons, counts))[:5])
  have = (f"{carrier} carry {p} person{'' if p == 1 else 's'} ({shown}"
          f"{', ...' if p > 5 else ''}); {where}")
  head = "Cannot split the data person-independently into training and test parts"
  if folds < 2 and p >= 2:
    # round(1/f) >= 2 for f <= 2/3; round(1/f) <= p for f >= 1/p (and a little less).
    low, high = math.ceil(100.0 / p) / 100, math.floor(200.0 / 3) / 100
    return (f"{head}: --test_fraction={test_fraction:g} is too large: the split is 1 of "
            f"round(1/--test_fraction) = {folds} person fold{'' if folds == 1 else 's'}, and it "
            f"needs at least 2 (one for testing, the rest for training). Here {have}: pass a "
            f"--test_fraction between {low:g} and {high:g}, which makes 2 to {p} folds for "
            f"these {p} persons (0.5 tests on about half of them); more persons would not "
            "help.")
  if p < 2:
    return (f"{head}: {have}. A person-independent split needs {items} of at least 2 "
            f"persons: add {items} of other persons; {unnamed}.")
  if p < folds:
    # (the split with the most folds that works for these data and this seed, not a count)
    good = data_lib.person_test_fraction(ds, seed=0 if seed is None else seed)
    fix = (f"pass --test_fraction={good[1]:g} (round(1/{good[1]:g}) = {good[0]} person folds, "
           f"which splits these data), or add {items} of other persons" if good else
           f"add {items} of other persons (no --test_fraction splits these data)")
    return (f"{head}: {have}. The split is 1 of round(1/--test_fraction) = {folds} person "
            f"folds (--test_fraction, now {test_fraction:g}), each needing persons of its own: "
            f"{fix}.")
  return (f"{head}: {error}. Here {have}. Add {items} of more persons per class, or change "
          f"--test_fraction (now {test_fraction:g}; the split is 1 of round(1/--test_fraction) "
          f"= {folds} person folds).")


def split_kind(ds: data_lib.Dataset) -> str:
  """How the studies split ``ds``, for their reports: by person when the data carry persons
  (the shares of a person split are then approximate), else stratified by class."""
  return "person-independent" if ds.groups is not None else "stratified"


def split_share(splits, test_fraction: float, by_person: bool) -> str:
  """The train/test shares the runs' splits (``[(train, test), ...]``) really have, for the
  reports: ``'80%/20%'``, a range where the runs differ, and what ``--test_fraction`` asked
  for where they are not it (a person split keeps each person whole; a stratified one rounds
  each class's share).

  Example:
    >>> split_share([(range(56), range(28))], 0.2, by_person=True)
    '67%/33% (--test_fraction=0.2 asked for about 20%; each person is kept whole)'
  """
  tests = sorted({round(100.0 * len(te) / (len(tr) + len(te))) for tr, te in splits})
  lo, hi = tests[0], tests[-1]
  shown = (f"{100 - lo}%/{lo}%" if lo == hi else f"{100 - hi}-{100 - lo}%/{lo}-{hi}%")
  if lo == hi == round(100.0 * test_fraction):
    return shown
  why = "each person is kept whole" if by_person else "each class's share is rounded"
  return (f"{shown} (--test_fraction={test_fraction:g} asked for about "
          f"{100.0 * test_fraction:.0f}%; {why})")


def check_folds(ds: data_lib.Dataset, n_splits: int, seed: int | None = None) -> None:
  """Fails clearly when the data cannot be split into ``n_splits`` stratified folds; with
  ``seed``, also when the folds of that seed cannot be made (person-independent folds where a
  class's persons all fall in one test fold), so that a study calling it before opening its
  folder leaves nothing behind."""
  counts = ds.class_counts()
  counts = counts[counts > 0]
  if len(ds) < 2 * n_splits or counts.min() < n_splits:
    # --folds is at least 2: lowering it helps only when every class has 2 examples or more.
    most = min(int(counts.min()), len(ds) // 2)
    fix = (f"Lower --folds to at most {most}." if most >= 2 else
           "No --folds can split them (the fewest is 2): add examples, at least 2 of every "
           "class.")
    _flags.fail(f"--folds={n_splits} needs at least {n_splits} examples of every class; the "
                f"data have {len(ds)} examples with class counts {ds.class_counts().tolist()}. "
                + fix)
  if ds.groups is not None:   # person-independent folds: every person in one test fold
    persons = len(np.unique(np.asarray(ds.groups)))
    if persons < n_splits:
      fix = (f"Lower --folds to at most {persons}." if persons >= 2 else
             "No --folds can split them (the fewest is 2): add examples of other persons.")
      _flags.fail(f"--folds={n_splits} person-independent folds need at least {n_splits} "
                  f"persons; the data have {persons} (persons are read from the file names, "
                  f"see docs/data.md). {fix}")
  if seed is not None:
    _kfold_or_fail(ds, n_splits, seed)


# ----------------------------------------------------------------------------- evaluation


def _percent_or_loss(model, metrics):
  """Accuracy in percent for classifiers, the mean loss (squared error) for autoencoders."""
  if model.task == "reconstruction":
    return metrics["loss"]
  return 100.0 * np.asarray(metrics["accuracy"], np.float64)


def score(model, params, x, y, w=None) -> float:
  """Accuracy in percent (classifiers) or mean squared error (autoencoders) of one network;
  ``w`` are sample weights (0 for padding rows)."""
  return float(_percent_or_loss(model, jaxprune.evaluate(model, params, x, y, sample_weight=w)))


#: Runs per evaluation call of :func:`score_many`. Every call for one model then has the same
#: shapes, so it is one compiled program however many runs a stage scores: the main job's
#: evaluations went from 44 programs (a shape per stage, hidden size and data part; 10 s of
#: compilation on 2 cores) to one per hidden size. Evaluating a run is milliseconds.
EVAL_RUNS = 20


def _check_runs(fn: str, runs: int, params, unit_masks) -> None:
  """Stacked params and unit masks must have one entry per run (chunks would cut them)."""
  got = {np.shape(a)[0] for a in jax.tree.leaves(params)}
  if unit_masks is not None:
    got.add(np.shape(unit_masks)[0])
  if got != {runs}:
    raise ValueError(f"{fn}: params and unit masks need a leading axis of {runs} runs, like "
                     f"the data; got {sorted(got)}.")


def score_many(model, params, x, y, w, *, group: str | None = None,
               unit_masks=None) -> np.ndarray:
  """:func:`score` for stacked runs (leading axis on params and data), with ``group``'s unit
  masks (R, units) applied when ``group`` is given (None: all units), as vmapped calls of
  :data:`EVAL_RUNS` runs each (the last chunk filled with copies of the last run)."""
  runs = np.shape(x)[0]
  if group is None and unit_masks is not None:
    raise ValueError("score_many: unit_masks need the group they mask (group=...).")
  _check_runs("score_many", runs, params, unit_masks)
  if group is not None and unit_masks is None:
    unit_masks = np.ones((runs, model.groups[group].size), bool)
  out = []
  for start in range(0, runs, EVAL_RUNS):
    idx = np.minimum(np.arange(start, start + EVAL_RUNS), runs - 1)
    p = jax.tree.map(lambda a: np.asarray(a)[idx], params)
    wm = None if group is None else expand_many(model, group)(p, np.asarray(unit_masks)[idx])
    m = jaxprune.evaluate_many(model, p, np.asarray(x)[idx], np.asarray(y)[idx],
                               np.asarray(w)[idx], masks=wm)
    out.append(np.asarray(_percent_or_loss(model, m))[:min(EVAL_RUNS, runs - start)])
  return np.concatenate(out)


def score_folds(model, params, folds: Folds, fold, *, group: str,
                unit_masks=None) -> tuple[np.ndarray, np.ndarray]:
  """(test, train) scores of stacked networks, run r on fold ``fold[r]``, with ``group``'s unit
  masks (R, units) applied (None: all units). Both parts go through :func:`score_many` in one
  batch, the test rows padded to the training rows' count with weight 0: one program per
  model for every stage."""
  fold = np.asarray(fold)
  runs = len(fold)
  _check_runs("score_folds", runs, params, unit_masks)
  n = max(folds.x_tr.shape[1], folds.x_te.shape[1])
  pad = lambda a: np.pad(a, [(0, 0), (0, n - a.shape[1])] + [(0, 0)] * (a.ndim - 2))
  both = lambda te, tr: np.concatenate([pad(te)[fold], pad(tr)[fold]])
  twice = lambda a: None if a is None else np.concatenate([np.asarray(a)] * 2)
  scores = score_many(model, jax.tree.map(twice, params), both(folds.x_te, folds.x_tr),
                      both(folds.y_te, folds.y_tr), both(folds.w_te, folds.w_tr), group=group,
                      unit_masks=twice(unit_masks))
  return scores[:runs], scores[runs:]


#: The GA programs go through their runs in chunks (``lax.map``) whose fitness product is
#: about this many floating-point operations: XLA:CPU runs a batched product far below its
#: GEMM rate (at H=500, 100 runs vmapped at once: 112 GFLOP/s, against 211 for one run's
#: product), while chunks much smaller pay the per-step cost of many small ops. Measured on the
#: main job's GA grid (2 cores, three turns each in one process): H=500 10.5-11.1 s wall /
#: 18.8-20.0 s CPU -> 7.4-9.4 s / 13.1-14.4 s CPU; single first runs: H=200 4.4 -> 2.7 s, H=100
#: 2.2 -> 1.8 s, H=50 1.5 -> 1.3 s; the same bits.
CHUNK_FLOPS = 3e8


def runs_per_chunk(data, population_size: int, runs: int) -> int:
  """Runs vmapped together in one chunk of :func:`ga_program`: about :data:`CHUNK_FLOPS` of
  fitness product, evened out over the chunks that needs (``ceil(runs / chunks)``), so that
  the runs padded to whole chunks add fewer than one run per chunk. All of them where the data
  is not the fast path's (activations ``h`` and readout ``w``)."""
  if not (isinstance(data, dict) and "h" in data and "w" in data):
    return runs
  n, u = data["h"].shape[-2:]
  per_run = 2.0 * n * u * data["w"].shape[-1] * population_size
  target = int(min(runs, max(1, round(CHUNK_FLOPS / per_run))))
  return -(-runs // -(-runs // target))


#: Full-evaluation work (floating-point operations, summed over the runs of one compiled
#: :func:`ga_program`) from which the binaries score children incrementally: the break-even
#: that :data:`jaxprune.ga.incremental.CPU_MIN_WORK` was measured at (its ``'auto'`` asks twice
#: that of one run, a margin for its longer compilation). Here the runs share that compilation
#: and the binaries keep it in the persistent cache. The main job's GA at H=500 (100 runs,
#: 1.4e12 operations in all) on a 2-core AVX2 machine, the rest of the job running beside it,
#: in turns with the full evaluation, cache warm: 39.6 / 42.6 -> 26.2 / 27.5 s (the whole job
#: with nothing cached: 125.5 s, as with the full evaluation).
SHARED_MIN_WORK = 1e12


def _per_run(data):
  """The shapes of one run of ``data`` (a leading run axis), as ``jax.ShapeDtypeStruct``s."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], a.dtype), data)


def incremental_for_runs(fitness, config, h: int, data):
  """``fitness`` with ``incremental=True`` where it says ``'auto'`` and the runs of ``data``
  (a leading run axis), which share one compiled :func:`ga_program`, do at least
  :data:`SHARED_MIN_WORK` of full evaluation together (``'auto'`` weighs one run alone). The
  accuracies equal the full evaluation's but for near ties of the float summation order
  (:mod:`jaxprune.ga.incremental`): in the main job at H=500, 1 run of 100 took another path."""
  if getattr(fitness, "incremental", None) != "auto":
    return fitness
  runs = jax.tree.leaves(data)[0].shape[0]
  h_act, w = fitness.incremental_data(_per_run(data))[:2]
  work = runs * ga_loop.full_work(config, h_act, w)
  if work >= SHARED_MIN_WORK and ga_incremental.applies(fitness, None, h, work=math.inf):
    return dataclasses.replace(fitness, incremental=True)
  return fitness


@functools.lru_cache(maxsize=None)
def ga_program(config, fitness, h: int, lam_per_run: bool):
  """jit(map over runs of the whole GA): ``program(data, hyper, keys)`` with a leading run axis
  on ``data`` and ``keys``, and on ``hyper.lam`` when ``lam_per_run``; built once per GA shape.
  The runs are vmapped in equal chunks of :func:`runs_per_chunk` (``lax.map``, the last run
  repeated to fill the last chunk; every run computes exactly what it computes alone).
  Compiled with the options of the library's own GA program for one run of this data
  (``jaxprune.ga.loop.RUN_OPTIONS``): XLA:CPU's older loop emitter
  (at H=500, 20 runs, compilation 2.4-3.0 -> 2.1-2.2 s, the run 3.44 -> 3.34-3.41 s), and LLVM
  level 1 where the runs evaluate in full (at H=500, 100 runs, 1.94 -> 0.88 s, the run 18.5 s
  either way); the same bits."""
  def one(d, hp, k):
    return ga.run(config, fitness, h, key=k, hyper=hp, data=d, progress=False, shard=False)

  def program(data, hyper, keys):
    lam = hyper.lam if lam_per_run else None

    def one_run(args):
      d, k, l = args
      return one(d, hyper if l is None else hyper._replace(lam=l), k)

    runs = keys.shape[0]
    chunk = runs_per_chunk(data, config.population_size, runs)
    # Whole chunks, the last run repeated (and its copies dropped): ``lax.map`` would run the
    # runs left over as a second copy of the whole GA program (vmapped over them), which
    # doubled the program's lowering and compilation (at H=200, 100 runs in chunks of 3:
    # 240 -> 128 kB of StableHLO).
    extra = -runs % chunk
    pad = lambda a: jnp.concatenate([a, jnp.repeat(a[-1:], extra, axis=0)]) if extra else a
    out = jax.lax.map(one_run, jax.tree.map(pad, (data, keys, lam)), batch_size=chunk)
    return jax.tree.map(lambda a: a[:runs], out)

  programs = ga_loop.programs_by_path(program)

  def call(data, hyper, keys):
    return programs[ga_loop.uses_incremental(config, fitness, h, None, _per_run(data))](
        data, hyper, keys)

  return call


@functools.lru_cache(maxsize=None)
def expand_many(model, group):
  """jit(vmap(expand)): weight masks of stacked params from (R, units) unit masks of ``group``."""
  return jax.jit(jax.vmap(lambda p, m: jaxprune.expand(p, model, {group: m})))


def mean_std(values) -> tuple[float, float]:
  a = np.asarray(values, np.float64)
  return float(np.mean(a)), float(np.std(a))


def pm(values, digits=2) -> str:
  m, s = mean_std(values)
  return f"{m:.{digits}f} ± {s:.{digits}f}"
