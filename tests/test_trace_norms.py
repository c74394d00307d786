"""Norms over the units: a statistic of each example summed over the units (an RMSNorm's mean of
squares, an L2 norm, flax's LayerNorm with its E[h^2] - E[h]^2 variance) keeps the units a group
where every summed value is zero at a masked unit; compacting equals masking (the mean's divisor
is the traced width). They were refused as 'reduced over by reduce_sum', which left a pre-norm
transformer's residual stream and any L2-normalised embedding with no group."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune import ga
from conftest import assert_compacts_as_masked, host_f32, random_unit_masks

R = np.random.default_rng(11)
V, D, T = 11, 8, 5


def _arr(*shape):
  return host_f32(R.normal(size=shape))


class _Block(nn.Module):
  norm: str

  @nn.compact
  def __call__(self, x):
    norm = nn.RMSNorm if self.norm == "rms" else nn.LayerNorm
    h = norm()(x)
    q, k, v = (nn.Dense(6, name=n)(h) for n in ("q", "k", "v"))
    a = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / 6 ** 0.5, -1)
    x = x + nn.Dense(D, name="o")(jnp.einsum("bts,bsd->btd", a, v))
    return x + nn.Dense(D, name="down")(nn.silu(nn.Dense(2 * D, name="up")(norm()(x))))


class _LM(nn.Module):
  norm: str

  @nn.compact
  def __call__(self, tok):
    x = nn.Embed(V, D, name="embed")(tok)
    for i in range(2):
      x = _Block(self.norm, name=f"block{i}")(x)
    norm = nn.RMSNorm if self.norm == "rms" else nn.LayerNorm
    return nn.Dense(V, name="lm_head")(norm(name="final")(x))


def _lm(norm):
  tok = jnp.asarray(R.integers(0, V, (4, T)))
  m = _LM(norm)
  v = m.init(jax.random.key(0), tok)
  v = jax.tree.map(lambda a: a + 0.2 * _arr(*a.shape), v)        # no scale at 1, no bias at 0
  return m.apply, v, tok, jaxprune.trace(m.apply, v, tok)


@pytest.mark.parametrize("norm", ["rms", "layer"])
def test_a_pre_norm_transformer_residual_stream_is_a_group_that_compacts_exactly(norm):
  fn, v, tok, t = _lm(norm)
  g = t.groups["embed"]
  assert g.size == D and g.read_by_products
  producers = {"/".join(s.path[1:]) for s in g.producers}
  assert {"embed/embedding", "block0/o/kernel", "block1/down/kernel", "final/scale"} <= producers
  assert {"/".join(s.path[1:]) for s in g.consumers} == {
      f"block{i}/{n}/kernel" for i in (0, 1) for n in ("q", "k", "v", "up")} | {
          "lm_head/kernel"}
  # the heads' features and MLP hidden units are groups as before
  assert {"block0/up", "block1/up", "block0/q"} <= set(t.groups)
  other = jnp.asarray(R.integers(0, V, (7, T)))
  for seed in range(3):
    small, small_t, _ = assert_compacts_as_masked(t, v, fn, random_unit_masks(t, seed),
                                                  (tok, other), atol=1e-5)
  um = jaxprune.unit_masks_ones(t)
  um["embed"] = um["embed"].at[np.array([0, 5])].set(False)
  small, _, _ = assert_compacts_as_masked(t, v, fn, um, (tok,), atol=1e-5)
  assert small["params"]["embed"]["embedding"].shape == (V, D - 2)
  assert small["params"]["final"]["scale"].shape == (D - 2,)


def test_the_residual_stream_is_pruned_by_removing_units_and_never_merged():
  fn, v, tok, t = _lm("rms")
  pruned, um, _ = jaxprune.importance_prune(t, "embed")(v, jaxprune.unit_masks_ones(t), 3)
  assert int(um["embed"].sum()) == D - 3
  assert_compacts_as_masked(t, pruned, fn, um, (tok,), atol=1e-5)
  for make in (lambda: jaxprune.distinctiveness(t, "embed"),
               lambda: jaxprune.weight_distinctiveness(t, "embed")):
    with pytest.raises(ValueError, match="summed over by a statistic of each example"):
      make()
  assert "summed over by a statistic of each example" in t.activations_incomplete_why("embed")
  assert "read by a product of two activations or a sum over them" in t.explain()


def test_the_ga_scores_an_l2_normalised_layer_as_its_masked_network():
  """The norm rescales the kept units by a statistic of the mask: no one-product fast path; the
  GA's accuracy is the masked network's."""
  p = {"w1": _arr(4, 7), "b1": _arr(7), "w2": _arr(7, 3)}

  def fn(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return (h / (jnp.linalg.norm(h, axis=-1, keepdims=True) + 1e-6)) @ p["w2"]
  x, y = _arr(60, 4), jnp.asarray(R.integers(0, 3, 60))
  t = jaxprune.trace(fn, p, x)
  assert t.groups["w1"].read_by_products and t.readout("w1") is None
  res = ga.search(t, p, x, y, "w1", key=jax.random.key(0), progress=False,
                  config=ga.GAConfig(population_size=8, hof_size=2, tournament_size=2,
                                     generations=3))
  masked = jaxprune.apply_masks(p, jaxprune.expand(p, t, {"w1": jnp.asarray(res.mask)}))
  assert float(res.accuracy) == pytest.approx(
      float(jnp.mean(jnp.argmax(fn(masked, x), -1) == y)), abs=1e-6)


def test_a_mean_over_the_units_keeps_the_traced_width_at_any_batch_size():
  """A mean over the units divides by the traced width in the compacted program, as masking
  does; at another batch size it is not taken for a batch statistic (which raises there)."""
  p = {"w1": _arr(4, 6), "w2": _arr(6, 2)}

  def fn(p, x):
    h = jax.nn.relu(x @ p["w1"])
    return (h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)) @ p["w2"]
  t = jaxprune.trace(fn, p, _arr(5, 4))
  um = {"w1": jnp.asarray([True, False, True, True, False, True])}
  small, small_t, masked = assert_compacts_as_masked(t, p, fn, um, (_arr(5, 4), _arr(2, 4)))
  x3 = _arr(3, 4)
  np.testing.assert_allclose(small_t.apply(small, x3), fn(masked, x3), rtol=1e-5, atol=1e-6)
  h = jax.nn.relu(x3 @ small["w1"])                    # a 4-unit RMSNorm divides by 4, not 6
  rebuilt = (h * jax.lax.rsqrt(jnp.mean(h * h, -1, keepdims=True) + 1e-6)) @ small["w2"]
  assert not np.allclose(rebuilt, fn(masked, x3), atol=1e-3)


def test_a_deep_residual_stream_is_traced_without_deep_recursion():
  """Each norm's check that the stream is zero at a masked unit walked back to the embedding
  alone: quadratic in the depth, and a RecursionError at 260 blocks. The checks share their
  answers in program order."""
  n, d = 260, 4
  r = np.random.default_rng(0)
  p = {"emb": host_f32(r.normal(size=(7, d))), "head": host_f32(r.normal(size=(d, 7))),
       "blocks": [{"g": host_f32(1 + 0.1 * r.normal(size=d)),
                   "w": host_f32(0.1 * r.normal(size=(d, d)))} for _ in range(n)]}

  def fn(p, tok):
    x = p["emb"][tok]
    for b in p["blocks"]:
      x = x + (x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * b["g"]) @ b["w"]
    return x @ p["head"]
  t = jaxprune.trace(fn, p, jnp.zeros((2, 3), jnp.int32))
  assert t.groups["emb"].size == d and t.groups["emb"].read_by_products
  assert len(t.groups["emb"].slices) == 3 * n + 2      # (g, w's rows and columns per block)


def test_a_reader_normalised_over_its_rows_keeps_the_layer_before_it_a_group():
  """flax's WeightNorm (||w|| over the kernel's input axis), ArcFace's class weights
  (w / ||w||_0, with the features L2-normalised too) and a Frobenius norm: a masked unit's row
  is zero and adds nothing to the norm, so removing it is exact; merging two rows changes the
  norm, so merges are refused. A norm of each row (over the outputs) is not: a masked row would
  be 0 / 0."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.tanh(nn.Dense(6, name="d1")(x))
      return nn.Dense(3)(nn.relu(nn.WeightNorm(nn.Dense(5, name="d2"))(h)))
  x = _arr(5, 4)
  v = Net().init(jax.random.key(0), x)
  v = jax.tree.map(lambda a: a + 0.3 * _arr(*a.shape), v)
  t = jaxprune.trace(Net().apply, v, x)
  assert {n: (g.size, g.read_by_products) for n, g in t.groups.items()} == {
      "d1": (6, True), "d2": (5, False)}
  for seed in range(3):
    assert_compacts_as_masked(t, v, Net().apply, random_unit_masks(t, seed), (x, x[:2]))
  with pytest.raises(ValueError, match="summed over by a statistic"):
    jaxprune.distinctiveness(t, "d1")
  assert "a kernel normalised over its rows" in t.activations_incomplete_why("d1")

  p = {"w1": _arr(4, 6), "b1": _arr(6), "w2": _arr(6, 3)}
  unit = lambda a, axis: a / jnp.linalg.norm(a, axis=axis, keepdims=True)
  readers = {
      "arcface": lambda p, h: unit(h, -1) @ unit(p["w2"], 0),
      "frobenius": lambda p, h: h @ (p["w2"] / jnp.sqrt(jnp.sum(p["w2"] ** 2))),
      "each_row": lambda p, h: h @ (p["w2"] / (jnp.linalg.norm(p["w2"], axis=1, keepdims=True)
                                               + 1e-3)),
  }
  for name, read in readers.items():
    fn = lambda p, x, read=read: read(p, jnp.tanh(x @ p["w1"] + p["b1"]))
    t = jaxprune.trace(fn, p, x)
    if name == "each_row":
      assert not t.groups
      continue
    assert t.groups["w1"].read_by_products, name
    for seed in range(3):
      assert_compacts_as_masked(t, p, fn, random_unit_masks(t, seed), (x, x[:2]))
