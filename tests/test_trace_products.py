"""Units contracted between two activations (attention's ``q @ k.T``, a Gram matrix ``h @ h.T``):
a unit's term of the sum goes when it is zeroed on either side, so the contracted units are a
group (``read_by_products``) that compacts exactly; merging or folding one cannot keep its term
(a product of its two sides), so those pruners refuse it. The transformer and ViT tests check
the query/key features of real attention blocks against NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from conftest import assert_compacts_as_masked, host_f32

R = np.random.default_rng(11)
F, H, C = 5, 6, 3


def _arr(*shape, scale=1.0):
  return host_f32(scale * R.normal(size=shape))


P = {"w1": _arr(F, H), "b1": _arr(H), "w2": _arr(H, C), "b2": _arr(C)}


def _gram(p, x):
  """Self-attention whose scores are the hidden units' Gram matrix: the units are read by the
  product of two activations and by the readout kernel."""
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  s = jax.nn.softmax(jnp.einsum("bth,bsh->bts", h, h), -1)
  return jnp.einsum("bts,bsh->bth", s, h).mean(1) @ p["w2"] + p["b2"]


X = _arr(4, 7, F)


def test_a_gram_matrix_keeps_its_units_a_group_that_compacts_exactly():
  t = jaxprune.trace(_gram, P, X)
  g = t.groups["w1"]
  assert g.read_by_products
  um = jaxprune.unit_masks_ones(t)
  um["w1"] = um["w1"].at[np.array([1, 4])].set(False)
  small, small_t = t.compact(P, um)
  assert small["w1"].shape == (F, H - 2) and small["w2"].shape == (H - 2, C)
  masked = jaxprune.apply_masks(P, jaxprune.expand(P, t, um))
  for xb in (X, X[:3]):
    np.testing.assert_allclose(small_t.apply(small, xb), _gram(masked, xb), rtol=1e-5,
                               atol=1e-6)
  # The readout kernel cannot take a removed unit's constant: its term in the scores is gone.
  (w2,) = [s for s in g.consumers if s.path == ("w2",)]
  assert "a product of two activations" in w2.padded_why
  assert not g.exact_constant_fold
  assert "contracted between two activations" in t.activations_incomplete_why("w1")
  assert ("axis 1 -> group 'w1' (producer, kernel; its units are also read by a product of "
          "two activations or a sum over them: q @ k.T, an RMSNorm)") in t.explain()


@pytest.mark.parametrize("make", [
    lambda t: jaxprune.distinctiveness(t, "w1"),
    lambda t: jaxprune.weight_distinctiveness(t, "w1"),
    lambda t: jaxprune.group_redundancy(t, "w1"),
    lambda t: jaxprune.progressive_distinctiveness(t, "w1", lambda p: 0.0),
    lambda t: jaxprune.distinctiveness_pruner(t, "w1"),
])
def test_pruners_that_merge_or_fold_refuse_it(make):
  t = jaxprune.trace(_gram, P, X)
  with pytest.raises(ValueError, match=r"contracted between two activations .* importance_prune"):
    make(t)


def test_removing_units_works_and_a_merge_would_not_have_been_exact():
  """Unit 5 is made an exact copy of unit 0: a merge (0 takes 5's outgoing weights) keeps the
  readout's sum but not the Gram term h_0^2 + h_5^2, which is why merges are refused; removal
  by importance keeps compaction exact."""
  p = dict(P, w1=P["w1"].at[:, 5].set(P["w1"][:, 0]), b1=P["b1"].at[5].set(P["b1"][0]))
  merged = dict(p, w1=p["w1"].at[:, 5].set(0.0), b1=p["b1"].at[5].set(0.0),
                w2=p["w2"].at[0].add(p["w2"][5]).at[5].set(0.0))
  assert float(jnp.max(jnp.abs(_gram(merged, X) - _gram(p, X)))) > 1e-3
  t = jaxprune.trace(_gram, p, X)
  p2, um, _ = jaxprune.importance_prune(t, "w1")(p, jaxprune.unit_masks_ones(t), 2)
  small, small_t = t.compact(p2, um)
  np.testing.assert_allclose(small_t.apply(small, X),
                             _gram(jaxprune.apply_masks(p2, jaxprune.expand(p2, t, um)), X),
                             rtol=1e-5, atol=1e-6)


def test_a_product_of_an_activation_and_the_input_stays_refused():
  """``(x @ w1) @ x.T``-style scores contract the units with the input's features: the input's
  axis is no unit, so the class is not prunable, as before."""
  p = {"w1": _arr(F, F), "w2": _arr(F, C)}

  def fn(p, x):
    s = jax.nn.softmax(jnp.einsum("btf,bsf->bts", jnp.tanh(x @ p["w1"]), x), -1)
    return jnp.einsum("bts,bsf->btf", s, x).mean(1) @ p["w2"]
  t = jaxprune.trace(fn, p, X)
  assert not t.groups
  assert "w1 (5, 5): axis 0 -> not prunable" in t.explain()


def _feature_map_attention(phi):
  """Attention scores ``phi(q) @ phi(k).T`` of features q = x @ wq + bq, k = x @ wk + bk."""
  def fn(p, x):
    q, k = phi(x @ p["wq"] + p["bq"]), phi(x @ p["wk"] + p["bk"])
    s = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) * x[..., :1], -1)
    return jnp.einsum("bts,bsf->btf", s, x @ p["wv"]).mean(1) @ p["wo"]
  return fn


PA = {"wq": _arr(F, H), "bq": _arr(H), "wk": _arr(F, H), "bk": _arr(H), "wv": _arr(F, 4),
      "wo": _arr(4, C)}


@pytest.mark.parametrize("phi", [lambda h: h, jax.nn.relu, jnp.tanh, jax.nn.gelu, jax.nn.silu,
                                 lambda h: 0.5 * h, lambda h: h ** 2])
def test_features_that_are_zero_where_masked_are_a_group(phi):
  fn = _feature_map_attention(phi)
  t = jaxprune.trace(fn, PA, X)
  assert t.groups["wq"].read_by_products
  um = jaxprune.unit_masks_ones(t)
  um["wq"] = um["wq"].at[np.array([0, 2, 3])].set(False)
  small, small_t = t.compact(PA, um)
  masked = jaxprune.apply_masks(PA, jaxprune.expand(PA, t, um))
  np.testing.assert_allclose(small_t.apply(small, X), fn(masked, X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("phi", [jax.nn.sigmoid, lambda h: jax.nn.elu(h) + 1.0,
                                 lambda h: h + 1.0, jnp.exp, lambda h: h ** 0])
def test_features_not_zero_where_masked_stay_refused(phi):
  """A masked unit's features are phi(0) (its kernel column and bias are zero): with phi(0) != 0
  (a sigmoid, linear attention's elu + 1, a shift) it still adds phi(0)**2 (times the data) to
  every score, which compacting drops (the outputs moved by up to 13)."""
  t = jaxprune.trace(_feature_map_attention(phi), PA, X)
  assert "wq" not in t.groups
  assert "not zero where a unit's params are" in t.explain()


def test_a_top1_mixture_of_gathered_experts_compacts_exactly():
  """Experts' kernels gathered per example (``w1[e]`` with ``e`` the router's argmax) are read
  by products of two values that depend on the inputs: the residual stream and the experts'
  hidden units are groups read by products, and removing their units is exact."""
  D, E, Hh = 6, 3, 8
  p = {"w0": _arr(4, D), "b0": _arr(D), "router": _arr(D, E), "w1": _arr(E, D, Hh),
       "b1": _arr(E, Hh), "w2": _arr(E, Hh, D), "wo": _arr(D, C)}

  def fn(p, x):
    h = jax.nn.relu(x @ p["w0"] + p["b0"])
    e = jnp.argmax(h @ p["router"], -1)
    u = jax.nn.relu(jnp.einsum("bd,bdh->bh", h, p["w1"][e]) + p["b1"][e])
    return (h + jnp.einsum("bh,bhd->bd", u, p["w2"][e])) @ p["wo"]
  x = _arr(10, 4)
  t = jaxprune.trace(fn, p, x)
  assert {n: (g.size, g.read_by_products) for n, g in t.groups.items()} == {
      "w0": (D, True), "w1": (Hh, True)}
  for name in t.groups:
    um = jaxprune.unit_masks_ones(t)
    um[name] = um[name].at[np.array([1, 4])].set(False)
    assert_compacts_as_masked(t, p, fn, um, (x, x[:5]), atol=1e-5)


def test_redistribute_refuses_a_group_read_by_products():
  t = jaxprune.trace(_gram, P, X)
  with pytest.raises(ValueError, match="read by a product of two activations"):
    jaxprune.units.redistribute(P, t.groups["w1"], jnp.eye(H))
