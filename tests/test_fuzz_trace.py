"""A smoke run of the random-model fuzzer for ``jaxprune.trace`` (``benchmarks/fuzz_trace.py``,
opt-in: ``python3 benchmarks/fuzz_trace.py --models 300``): a few seeded random models trace,
compact to exactly the kept entries and compute what the masked network does; and the checker
does catch a compaction that drops other units than the masks say."""

import collections
import importlib
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import host_f32

BENCH = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"

# Plain JAX models of every input kind, and linen and nnx ones (see make_model's families).
SEEDS = (1, 2, 3, 4, 6, 8, 10, 13, 15, 17, 18, 21, 25, 33, 37)


@pytest.fixture(scope="module")
def fuzz():
  sys.path.insert(0, str(BENCH))
  try:
    yield importlib.import_module("fuzz_trace")
  finally:
    sys.path.remove(str(BENCH))


def test_seeded_random_models_have_no_violations(fuzz):
  results = fuzz.fuzz(SEEDS, clear_every=0)
  assert [r.skipped for r in results if r.skipped] == []       # the generator's models run
  assert [r for r in results if r.violations] == [], fuzz.summary(results)
  assert {r.family for r in results} == {"plain", "linen", "nnx"}
  assert sum(len(r.groups) for r in results) >= len(SEEDS)
  checked = sum((r.checked for r in results), collections.Counter())
  assert checked["compact@3"] >= 10 and checked["merge"] >= 3


def _mlp_model(fuzz):
  rng = np.random.default_rng(0)
  params = {"w1": host_f32(rng.normal(size=(4, 6))), "b1": host_f32(rng.normal(size=6)),
            "w2": host_f32(rng.normal(size=(6, 3))), "b2": host_f32(rng.normal(size=3))}

  def fn(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  return fuzz.Model(0, "plain", "mlp", fn, params, host_f32(rng.normal(size=(3, 4))))


def test_a_compaction_that_drops_other_units_is_a_violation(fuzz):
  model = _mlp_model(fuzz)
  assert fuzz.check_model(model).violations == []

  def wrong(target, params, unit_masks):    # the kept count is right, the units are not
    return target.compact(params, {n: np.roll(m, 1) for n, m in unit_masks.items()})

  kinds = {k for k, _ in fuzz.check_model(model, compact=wrong, merge=False).violations}
  assert {"compact-values", "mismatch@3"} <= kinds


def test_a_merge_check_sees_a_merge_that_changes_the_outputs(fuzz, monkeypatch):
  """A duplicate merged through the wrong rows (the transfer matrix transposed: j's row gets
  i's, and j is then removed) changes the outputs, and the check says so."""
  model = _mlp_model(fuzz)
  real = fuzz.jaxprune.units.redistribute

  def transposed(params, group, transfer, constants=None):
    return real(params, group, transfer.T, constants)
  monkeypatch.setattr(fuzz.jaxprune.units, "redistribute", transposed)
  assert [k for k, _ in fuzz.check_model(model).violations] == ["merge"]
