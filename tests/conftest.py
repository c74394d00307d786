"""Shared test settings: strict numerics and small helpers."""

import csv
import json
import math
import os

import jax
import numpy as np
import pytest


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
