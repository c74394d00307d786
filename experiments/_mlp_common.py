"""Helpers shared by the MLP studies (GA vs distinctiveness, similarity bounds, progressive
compression): configuration keys, padded cross-validation folds, vmapped evaluation, params
files, a GA fitness for padded folds, and list flags.

Everything here is experiment orchestration; the learning and pruning live in ``jaxprune``.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jaxprune
from jaxprune import data as data_lib
from jaxprune.ga.search import AccuracyFitness
from experiments import _common

PyTree = Any


# ----------------------------------------------------------------------------- keys


def config_key(seed: int, *parts) -> jax.Array:
  """A PRNG key derived from the seed and a configuration's description (never from order).

  Example:
    >>> k = config_key(0, "train", 100, 0.001, 3)
  """
  key = jax.random.key(int(seed))
  for p in parts:
    key = jax.random.fold_in(key, zlib.crc32(repr(p).encode()) & 0x7FFFFFFF)
  return key


def stack_keys(keys: Sequence[jax.Array]) -> jax.Array:
  return jnp.stack(list(keys))


# ----------------------------------------------------------------------------- flags


def parse_list(name: str, values, kind=float, *, low=None, high=None, low_open=False,
               nonempty=True) -> tuple:
  """Parses an absl list flag into a tuple of ``kind``; clear errors via ``_common.fail``."""
  out = []
  for v in values or ():
    try:
      x = kind(v)
    except (TypeError, ValueError):
      _common.fail(f"--{name}: {v!r} is not a valid {kind.__name__}.")
    if isinstance(x, float) and not math.isfinite(x):
      _common.fail(f"--{name}: values must be finite, got {v!r}.")
    if low is not None and (x <= low if low_open else x < low):
      _common.fail(f"--{name}: values must be {'>' if low_open else '>='} {low}, got {v!r}.")
    if high is not None and x > high:
      _common.fail(f"--{name}: values must be <= {high}, got {v!r}.")
    out.append(x)
  if nonempty and not out:
    _common.fail(f"--{name} needs at least one value.")
  if len(set(out)) != len(out):
    _common.fail(f"--{name} lists a value twice: {values}.")
  return tuple(out)


def check_positive(name: str, value, minimum=1) -> None:
  if value is None or value < minimum:
    _common.fail(f"--{name} must be at least {minimum}, got {value}.")


def check_probability(name: str, value) -> None:
  if not 0.0 <= value <= 1.0:
    _common.fail(f"--{name} must be a probability in [0, 1], got {value}.")


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
  """Stratified folds; each standardised with statistics of its training part only."""
  parts = []
  for tr, te in data_lib.kfold(ds, n_splits=n_splits, seed=seed):
    train, test = data_lib.split(ds, tr, te)
    train, test, _ = data_lib.standardize_split(train, test)
    parts.append((train, test))
  x_tr, w_tr = pad_stack([p[0].x for p in parts])
  y_tr, _ = pad_stack([p[0].y for p in parts])
  x_te, w_te = pad_stack([p[1].x for p in parts])
  y_te, _ = pad_stack([p[1].y for p in parts])
  return Folds(x_tr, y_tr, w_tr, x_te, y_te, w_te, tuple(len(p[0]) for p in parts),
               tuple(len(p[1]) for p in parts))


def check_folds(ds: data_lib.Dataset, n_splits: int) -> None:
  """Fails clearly when the data cannot be split into ``n_splits`` stratified folds."""
  counts = ds.class_counts()
  counts = counts[counts > 0]
  if len(ds) < 2 * n_splits or counts.min() < n_splits:
    _common.fail(f"--folds={n_splits} needs at least {n_splits} examples of every class; the "
                 f"data have {len(ds)} examples with class counts {ds.class_counts().tolist()}. "
                 "Lower --folds.")


# ----------------------------------------------------------------------------- evaluation


@functools.lru_cache(maxsize=None)
def _eval_fn(model):
  def one(params, x, y, w):
    out = model.module.apply(params, x)
    if model.task == "reconstruction":
      per = jnp.mean(jnp.square(out - x), axis=-1)
      return jnp.sum(w * per) / jnp.maximum(jnp.sum(w), 1.0)
    correct = (jnp.argmax(out, -1) == y).astype(jnp.float32)
    return 100.0 * jnp.sum(w * correct) / jnp.maximum(jnp.sum(w), 1.0)
  return jax.jit(one), jax.jit(jax.vmap(one))


def score(model, params, x, y, w=None) -> float:
  """Accuracy in percent (classifiers) or mean squared error (autoencoders) of one network."""
  w = np.ones(len(x), np.float32) if w is None else w
  return float(_eval_fn(model)[0](params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(w)))


def score_many(model, params, x, y, w) -> np.ndarray:
  """:func:`score` for stacked runs (leading axis on params and data) as one vmapped call."""
  return np.asarray(_eval_fn(model)[1](params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(w)))


@functools.lru_cache(maxsize=None)
def _masked_eval_fn(model, group):
  def one(params, mask, x, y, w):
    wm = jaxprune.expand(model, params, {group: mask})
    return _eval_fn(model)[0](jaxprune.apply_masks(params, wm), x, y, w)
  return jax.jit(jax.vmap(one))


def score_masked_many(model, group, params, masks, x, y, w) -> np.ndarray:
  """Accuracy (percent) of stacked networks with their ``group`` unit masks applied."""
  return np.asarray(_masked_eval_fn(model, group)(params, jnp.asarray(masks), jnp.asarray(x),
                                                  jnp.asarray(y), jnp.asarray(w)))


def mean_std(values) -> tuple[float, float]:
  a = np.asarray(values, np.float64)
  return float(np.mean(a)), float(np.std(a))


def pm(values, digits=2) -> str:
  m, s = mean_std(values)
  return f"{m:.{digits}f} ± {s:.{digits}f}"


# ----------------------------------------------------------------------------- params files


def save_params(path: str, params: PyTree) -> None:
  """Saves a params pytree (nested dicts of arrays) as .npz, atomically."""
  flat = {"/".join(str(getattr(k, "key", k)) for k in kp): np.asarray(v)
          for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  buf = io.BytesIO()
  np.savez(buf, **flat)
  _common.atomic_write_bytes(path, buf.getvalue())


def load_params(path: str) -> PyTree:
  """Loads what :func:`save_params` wrote (nested dicts of numpy arrays)."""
  out: dict = {}
  with np.load(path) as f:
    for name in f.files:
      node = out
      *parents, leaf = name.split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = np.asarray(f[name])
  return out


def cached_params(study: _common.Study, key: str, fn) -> PyTree:
  """Like ``study.cached`` for a params pytree, saved as ``cache/<fp>/<key>.npz``."""
  path = os.path.join(study.cache_dir, key + ".npz")
  if not os.path.exists(path):
    save_params(path, jax.tree.map(np.asarray, fn()))
  return load_params(path)


# ----------------------------------------------------------------------------- GA on padded folds


@dataclasses.dataclass(frozen=True)
class PaddedFitness:
  """GA fitness (eq. 5 or eq. 6 per run) on a training fold padded to a common length.

  Uses ``jaxprune.ga``'s one-product fast path for the accuracy; padded rows carry label -1
  (never correct) and ``data['scale'] = N_padded / N_real`` turns the accuracy over the padded
  fold into the accuracy over its real rows exactly. ``data['eq6']`` selects eq. 6
  (``acc - lam * kept``) over eq. 5 (``acc - lam * kept / units``) for this run, so both
  equations and every lambda run in one vmapped program.
  """

  base: AccuracyFitness

  def __call__(self, population, data, hyper):
    acc = self.base.accuracy(population, data) * data["scale"]
    kept = jnp.sum(population, axis=1).astype(jnp.float32)
    units = population.shape[1]
    return acc - jnp.where(data["eq6"], hyper.lam * kept, hyper.lam * kept / units)


def padded_fitness_data(model, group, params, x, y, w) -> dict:
  """The GA's data for one padded training fold (fast path: activations computed once)."""
  base = AccuracyFitness(model, group, None, True)
  y = np.where(np.asarray(w) > 0, np.asarray(y), -1).astype(np.int32)
  d = base.prepare(params, jnp.asarray(x), jnp.asarray(y))
  d["scale"] = jnp.asarray(len(w) / max(float(np.sum(w)), 1.0), jnp.float32)
  return d
