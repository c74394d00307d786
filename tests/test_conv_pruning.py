"""Weight-based distinctiveness on convs without biases (ResNet-style conv -> norm blocks)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from conftest import host_f32


def _net(params, x):
  """Two bias-free 3x3 convs with a ReLU between them, then a global mean."""
  dn = ("NHWC", "HWIO", "NHWC")
  h = jax.lax.conv_general_dilated(x, params["c1"], (1, 1), "SAME", dimension_numbers=dn)
  h = jax.nn.relu(h)
  h = jax.lax.conv_general_dilated(h, params["c2"], (1, 1), "SAME", dimension_numbers=dn)
  return h.mean(axis=(1, 2))


def _setup():
  rng = np.random.default_rng(0)
  c1 = rng.normal(size=(3, 3, 2, 5)).astype(np.float32)
  c1[..., 3] = c1[..., 1]             # filter 3 duplicates filter 1: angle 0
  params = {"c1": jnp.asarray(c1), "c2": host_f32(rng.normal(size=(3, 3, 5, 4)))}
  x = host_f32(rng.normal(size=(2, 6, 6, 2)))
  target = jaxprune.trace(_net, params, x)
  (group,) = [g for g in target.groups.values() if g.size == 5]
  return params, x, target, group.name


def test_similar_only_merge_on_bias_free_consumer_is_exact():
  params, x, target, g = _setup()
  prune = jaxprune.weight_distinctiveness(target, g, similar=True, complementary=False,
                                          constants=False)
  new, masks, report = prune(params, jaxprune.unit_masks_ones(target), 1.0, 180.0)
  kept = np.asarray(masks[g])
  assert kept.sum() == 4 and not kept[1:4:2].all()        # one of the duplicates went
  gone = int(np.flatnonzero(~kept)[0])
  assert not np.any(np.asarray(new["c1"])[..., gone])     # its slices are zero
  assert not np.any(np.asarray(new["c2"])[:, :, gone, :])
  np.testing.assert_allclose(target.apply(new, x), target.apply(params, x), rtol=1e-5, atol=1e-5)


def test_constants_on_bias_free_consumer_is_refused_at_construction():
  _, _, target, g = _setup()
  with pytest.raises(ValueError, match="bias"):
    jaxprune.weight_distinctiveness(target, g, constants=True)
