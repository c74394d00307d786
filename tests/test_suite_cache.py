"""The suite's shared compilation cache (tests/conftest.py) survives an entry another worker is
still writing: JAX writes entries without a lock, and a truncated one is compiled again."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest


def _program():
  """A new function object each call, the same program: jit's in-memory caches miss, so the
  compilation is looked up in the persistent cache."""
  def _suite_cache_probe(x):                    # a program no other test compiles
    return jnp.sin(x) * 3.25 + 1.75
  return _suite_cache_probe


def test_a_truncated_cache_entry_is_compiled_again_not_an_error():
  folder = os.environ.get("JAXPRUNE_SUITE_XLA_CACHE", "off")
  if folder == "off":
    pytest.skip("the suite's compilation cache is off")
  jax.jit(_program())(jnp.ones(13)).block_until_ready()
  entries = [p for p in glob.glob(os.path.join(folder, "jit__suite_cache_probe-*"))
             if not p.endswith("atime")]
  assert entries
  for path in entries:                          # as a reader sees a half-written entry
    with open(path, "rb") as f:
      data = f.read()
    with open(path, "wb") as f:
      f.write(data[: len(data) // 2])
  np.testing.assert_allclose(jax.jit(_program())(jnp.ones(13)), np.sin(1.0) * 3.25 + 1.75,
                             rtol=1e-6)
