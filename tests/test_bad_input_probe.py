"""Settings of the wrong Python type, as a hurried user passes them: each is refused before any
work with a TypeError or ValueError that names the setting (NumPy had parsed strings such as
'0.5' silently, or failed with its own message)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune
from jaxprune import pruners

MODEL = jaxprune.MLP(in_features=3, hidden=(4,), out_features=2)
PARAMS = MODEL.init(jax.random.key(0))
UNITS = jaxprune.unit_masks_ones(MODEL)
ACTS = jnp.ones((6, 4))


def test_angles_sparsities_and_powers_given_as_strings():
  prune = pruners.distinctiveness(MODEL, "hidden_0")
  with pytest.raises(TypeError, match="similar_deg must be an angle in degrees.*str '15'"):
    prune(PARAMS, UNITS, ACTS, "15", 165.0)
  with pytest.raises(TypeError, match="complementary_deg must be an angle.*bool True"):
    pruners.weight_distinctiveness(MODEL, "hidden_0")(PARAMS, UNITS, 15.0, True)
  with pytest.raises(TypeError, match="sparsity must be a number in \\[0, 1\\).*'0.5'"):
    jaxprune.prune_to_sparsity(PARAMS, None, "0.5")
  with pytest.raises(TypeError, match="sparsity must be a number in \\[0, 1\\)"):
    jaxprune.gradual(optax.sgd(0.1), sparsity="0.5", begin_step=0, end_step=1, frequency=1)
  with pytest.raises(TypeError, match="power must be a positive number.*'3'"):
    jaxprune.polynomial_sparsity(1, final=0.5, begin_step=0, end_step=4, power="3")


def test_counts_group_names_and_keys():
  with pytest.raises(ValueError, match="k must be a whole number.*got '2'"):
    pruners.importance_prune(MODEL, "hidden_0")(PARAMS, UNITS, "2")
  with pytest.raises(TypeError, match="max_sweeps must be a whole number.*2.5"):
    pruners.until_stable(pruners.distinctiveness(MODEL, "hidden_0"), PARAMS, UNITS, ACTS,
                         max_sweeps=2.5)
  with pytest.raises(TypeError, match="max_sweeps must be a whole number.*2.5"):
    jaxprune.distinctiveness_pruner(MODEL, "hidden_0", max_sweeps=2.5)
  # the unit masks where the group's name belongs: unhashable type 'dict' from units.py
  with pytest.raises(TypeError, match="group is named by a string.*got a dict.*unit masks go "
                     "to the pruner it returns"):
    pruners.distinctiveness(MODEL, UNITS)
  with pytest.raises(TypeError, match="ones_like takes params.*type MLP.*unit_masks_ones"):
    jaxprune.ones_like(MODEL)
  keys = jax.random.split(jax.random.key(1), 3)
  with pytest.raises(ValueError, match="random_prune takes one key.*jax.vmap"):
    pruners.random_prune(PARAMS, None, 0.5, key=keys)
  with pytest.raises(ValueError, match=r"init takes one key.*jax.vmap\(model.init\)\(keys\)"):
    MODEL.init(keys)
  stacked = jax.vmap(MODEL.init)(keys)          # the fix the message gives
  assert stacked["params"]["hidden_0"]["kernel"].shape == (3, 3, 4)
  assert np.asarray(jaxprune.ones_like({"a": 1.0, "b": jnp.ones(2)})["b"]).all()
