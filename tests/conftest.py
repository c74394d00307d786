"""Shared test settings: the suite's XLA:CPU compilation level, strict numerics, small helpers.

The suite compiles every XLA:CPU program at LLVM optimisation level 1 instead of XLA's default
2 (``XLA_FLAGS=--xla_backend_optimization_level=1``, set here before JAX starts its backend, and
inherited by the tests' subprocesses). Most of the suite's time is compilation of programs that
then run for milliseconds, and level 1 compiles them about a fifth faster. Levels 1 and 2
computed the same bits in every program measured (both contract ``a * b + c`` into a fused
multiply-add; docs/benchmarks.md), so what the tests assert holds at the users' level too; the
tests that compare compilation levels name level 2 explicitly
(``jaxprune._compile.DEFAULT_LEVEL``). To run the suite at the default level, set the flag
yourself: ``XLA_FLAGS=--xla_backend_optimization_level=2 python3 -m pytest -q -n 2``.
"""

import csv
import json
import math
import os
import tempfile

SUITE_LEVEL = "--xla_backend_optimization_level=1"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {SUITE_LEVEL}".strip()

import jax  # pylint: disable=wrong-import-position
import numpy as np
import pytest


@pytest.fixture(autouse=True)
def _temporary_files_in_tmp_path(tmp_path, monkeypatch):
  """``tempfile.mkdtemp()`` and friends write under the test's ``tmp_path``, which pytest
  cleans up, not into /tmp: the docs pages and docstring examples make folders there, and
  TFDS leaves an empty ``tmp*tfds`` folder each time it builds an unprepared dataset."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture
def strict_rank():
  """Implicit rank promotion raises (as in chex/equinox suites): catches broadcasting bugs.

  Use with ``pytestmark = pytest.mark.usefixtures("strict_rank")``.
  """
  with jax.numpy_rank_promotion("raise"):
    yield


def random_unit_masks(model, seed, p_keep=0.5):
  """Random unit masks for every group of ``model``, each keeping at least one unit, in a random
  dict order (results must not depend on it)."""
  rng = np.random.default_rng(seed)
  out = {}
  names = list(model.group_sizes)
  for i in rng.permutation(len(names)):
    name, size = names[i], model.group_sizes[names[i]]
    m = rng.random(size) < p_keep
    m[rng.integers(size)] = True
    out[name] = jax.numpy.asarray(m)
  return out


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def nnx_as_function(module, *filters):
  """An nnx module as a plain JAX function over a dict of arrays, the route docs/any-model.md
  shows: ``(apply(params, x), params)`` with ``params = nnx.to_pure_dict(state)``. With
  ``filters`` (e.g. ``nnx.Param``) only those variables are params; the rest is closed over."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  graphdef, state, *rest = nnx.split(module, *filters, ...) if filters else nnx.split(module)

  def apply(p, x):
    s = jax.tree.map(lambda a: a, state)      # a copy to fill in
    nnx.replace_by_pure_dict(s, p)
    return nnx.merge(graphdef, s, *rest)(x)

  return apply, nnx.to_pure_dict(state)


def csv_rows(path):
  """The rows of a CSV table written by a study, as dicts of strings."""
  with open(path) as f:
    return list(csv.DictReader(f))


def study_results(workdir, study):
  """A study's ``results.json`` under ``workdir``."""
  with open(os.path.join(workdir, study, "results.json")) as f:
    return json.load(f)


def all_finite(x):
  """True when no float nested in ``x`` (dicts and lists) is NaN or infinite."""
  if isinstance(x, dict):
    return all(all_finite(v) for v in x.values())
  if isinstance(x, list):
    return all(all_finite(v) for v in x)
  return not isinstance(x, float) or math.isfinite(x)


class FakeCascade:
  """A stand-in for OpenCV's ``CascadeClassifier`` that 'detects' the white box of a frame
  (its pixels equal to 255); ``FakeCascade.paths`` records the cascade files it was given."""

  paths: list = []

  def __init__(self, path):
    FakeCascade.paths.append(path)

  def empty(self):
    return False

  def detectMultiScale(self, gray, **kwargs):  # pylint: disable=invalid-name
    del kwargs
    rows, cols = np.nonzero(gray == 255)
    if not rows.size:
      return ()
    return np.array([[cols.min(), rows.min(), cols.max() - cols.min() + 1,
                      rows.max() - rows.min() + 1]])
