"""Shared test settings: strict numerics and small helpers."""

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
  """Random unit masks for every group of ``model``, each keeping at least one unit."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, size in model.group_sizes.items():
    m = rng.random(size) < p_keep
    m[rng.integers(size)] = True
    out[name] = jax.numpy.asarray(m)
  return out


@pytest.fixture
def rng():
  return np.random.default_rng(0)
