"""A per-unit parameter vector read by a kernel without the data: an unrolled RNN's learned
initial state (``broadcast_to(h0, (B, H)) @ Wh`` at the first step, however it is broadcast),
or a centring vector (``h @ W - mu @ W``). The kernel reads it as it reads the units, so the
vector is a per-unit parameter of the group (it was 'contracted between two computed
parameters', which left an unrolled RNN with a learned h0 with no group at all)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from conftest import assert_compacts_as_masked, host_f32, random_unit_masks

R = np.random.default_rng(3)
F, H, C, T = 3, 6, 2, 4
DROP = [1, 4]


def _arr(*shape, scale=1.0):
  return host_f32(scale * R.normal(size=shape))


STARTS = {
    "broadcast_to": ((H,), lambda h0, b: jnp.broadcast_to(h0, (b, H))),
    "tile": ((H,), lambda h0, b: jnp.tile(h0, (b, 1))),
    "repeat": ((H,), lambda h0, b: jnp.repeat(h0[None], b, axis=0)),
    "times_ones": ((H,), lambda h0, b: jnp.ones((b, 1)) * h0),
    "plus_zeros": ((H,), lambda h0, b: h0 + jnp.zeros((b, H))),
    "row_broadcast": ((1, H), lambda h0, b: jnp.broadcast_to(h0, (b, H))),
    "row_as_is": ((1, H), lambda h0, b: h0),
}


def _rnn(start):
  def fn(p, x):
    h = start(p["h0"], x.shape[0])
    for t in range(x.shape[1]):                   # unrolled in Python
      h = jnp.tanh(x[:, t] @ p["wx"] + h @ p["wh"] + p["b"])
    return h @ p["out"]
  return fn


def _params(h0_shape):
  return {"wx": _arr(F, H), "wh": _arr(H, H, scale=0.5), "b": _arr(H), "h0": _arr(*h0_shape),
          "out": _arr(H, C)}


def _drop(target, name):
  um = jaxprune.unit_masks_ones(target)
  um[name] = um[name].at[np.array(DROP)].set(False)
  return um


@pytest.mark.parametrize("how", list(STARTS))
def test_a_learned_initial_state_is_a_parameter_of_the_hidden_group(how):
  shape, start = STARTS[how]
  fn, p = _rnn(start), _params(shape)
  x = _arr(5, T, F)
  t = jaxprune.trace(fn, p, x)
  assert list(t.groups) == ["wx"]
  slices = sorted((s.path, s.axis, s.role, s.kind) for s in t.groups["wx"].slices)
  assert slices == sorted([
      (("wx",), 1, "producer", "kernel"), (("wh",), 1, "producer", "kernel"),
      (("b",), 0, "producer", "bias"), (("h0",), len(shape) - 1, "producer", "stat"),
      (("wh",), 0, "consumer", "kernel"), (("out",), 0, "consumer", "kernel")])
  small, _, _ = assert_compacts_as_masked(t, p, fn, _drop(t, "wx"), (x, x[:3]))
  assert small["h0"].shape == shape[:-1] + (H - len(DROP),)
  keep = np.setdiff1d(np.arange(H), DROP)
  np.testing.assert_array_equal(small["h0"], np.asarray(p["h0"])[..., keep])
  # The reader meets h0 at the first step, not the activations: merging by activations is
  # refused, and the reason names h0.
  assert not t.activations_complete("wx")
  assert "read parameters of the group (h0)" in t.activations_incomplete_why("wx")
  # The recurrent kernel reads h0 at the first step, not the units: no fold into a bias.
  (wh,) = [s for s in t.groups["wx"].consumers if s.path == ("wh",)]
  assert wh.padded_why.startswith("a recurrence, which reads the initial state")
  # The weight pruners work on the group (h0 is pruned with its units).
  _, um2, _ = jaxprune.importance_prune(t, "wx")(p, jaxprune.unit_masks_ones(t), 2)
  assert int(um2["wx"].sum()) == H - 2


def test_a_linen_rnn_unrolled_with_a_learned_initial_state():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h0 = self.param("h0", nn.initializers.normal(1.0), (H,))
      ih, hh = nn.Dense(H, name="ih"), nn.Dense(H, use_bias=False, name="hh")
      h = jnp.broadcast_to(h0, (x.shape[0], H))
      for t in range(x.shape[1]):
        h = jnp.tanh(ih(x[:, t]) + hh(h))
      return nn.Dense(C, name="out")(h)
  x = _arr(4, T, F)
  v = Net().init(jax.random.key(0), x)
  t = jaxprune.trace(Net().apply, v, x)
  assert list(t.groups) == ["ih"]
  small, _, _ = assert_compacts_as_masked(t, v, Net().apply, _drop(t, "ih"), (x,))
  assert small["params"]["h0"].shape == (H - len(DROP),)


def test_a_centring_vector_read_by_the_next_kernel_joins_the_group():
  """``h @ W - mu @ W`` (``(h - mu) @ W`` distributed): mu is per unit of h's group."""
  p = {"w1": _arr(F, 8), "b1": _arr(8), "mu": _arr(8), "w2": _arr(8, C)}

  def fn(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return h @ p["w2"] - p["mu"] @ p["w2"]
  x = _arr(6, F)
  t = jaxprune.trace(fn, p, x)
  assert list(t.groups) == ["w1"]
  assert (("mu",), 0, "producer", "stat") in [
      (s.path, s.axis, s.role, s.kind) for s in t.groups["w1"].slices]
  assert_compacts_as_masked(t, p, fn, _drop(t, "w1"), (x,))
  # mu acts on the units after the activations: merging by activations is refused.
  assert not t.activations_complete("w1")


def test_a_product_of_two_param_matrices_is_still_a_computed_kernel():
  """A low-rank kernel ``x @ (A @ B)``: neither factor is a per-unit vector, so ``A @ B`` is
  not read as a state (its rank axis is no group) and the units of ``x @ (A @ B)`` are."""
  p = {"a": _arr(F, 2), "b": _arr(2, 8), "w2": _arr(8, C)}

  def fn(p, x):
    return jnp.tanh(x @ (p["a"] @ p["b"])) @ p["w2"]
  x = _arr(6, F)
  t = jaxprune.trace(fn, p, x)
  assert [g.size for g in t.groups.values()] == [8]
  assert "a (3, 2): axis 0 -> not prunable (an axis of the function's inputs" in t.explain()
  assert ("axis 1 -> not prunable (contracted between two activations or two computed "
          "parameters") in t.explain().splitlines()[0]


def test_tracing_a_module_itself_without_inputs_says_how_to_call_trace():
  from flax import nnx
  model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"trace\(lambda m, x: m\(x\), model, x\)"):
    jaxprune.trace(model, _arr(4, 3))
  with pytest.raises(ValueError, match=r"trace\(model.apply, variables, x\)"):
    jaxprune.trace(nn.Dense(4), _arr(4, 3))
  with pytest.raises(ValueError, match=r"trace needs example inputs.*samples\.$"):
    jaxprune.trace(lambda p, x: x, _arr(4, 3))


def test_a_learned_query_is_a_group_of_its_own_pruned_from_weights_only():
  """Attention pooling with a learned query projected by a kernel (``query @ wq``): the
  query's features are units that wq reads (removing one removes its row of wq, exactly),
  with no kernel making them, so importance and activations refuse and say why."""
  D, Dk = 6, 5
  p = {"wk": _arr(D, Dk), "query": _arr(D), "wq": _arr(D, Dk), "wo": _arr(D, C)}

  def fn(p, x):
    q = p["query"] @ p["wq"]
    s = jax.nn.softmax((x @ p["wk"]) @ q, axis=1)
    return jnp.einsum("bt,btd->bd", s, x) @ p["wo"]
  x = _arr(4, 7, D)
  t = jaxprune.trace(fn, p, x)
  # q = query @ wq is computed from the query by a kernel: its features, contracted with
  # x @ wk's, are a group read by that product (wq's and wk's columns)
  assert {k: g.size for k, g in t.groups.items()} == {"query": D, "wq": Dk}
  assert t.groups["wq"].read_by_products
  small, _, _ = assert_compacts_as_masked(t, p, fn, _drop(t, "wq"), (x,))
  assert small["wq"].shape == small["wk"].shape == (D, Dk - len(DROP))
  small, _, _ = assert_compacts_as_masked(t, p, fn, _drop(t, "query"), (x,))
  assert small["wq"].shape == (D - len(DROP), Dk)
  with pytest.raises(ValueError, match="no producer kernel slice"):
    jaxprune.importance_prune(t, "query")(p, jaxprune.unit_masks_ones(t), 2)
  with pytest.raises(ValueError, match="no activations"):
    t.activations(p, x, "query")


@pytest.mark.parametrize("start", ["broadcast_to", "tile"])
def test_a_learned_latent_array_is_a_state_of_the_residual_stream(start):
  """A Perceiver's learned latents (N latents x D channels, broadcast to the batch) cross-attend
  to the inputs and are updated residually: channel d is latents[:, d], wo's column d (the
  residual sum) and the rows of the kernels that read the stream (wq, head). ``latents @ wq``
  was a product of two params, which blocked the channels: no group. The latent index is no
  unit (the mean reduces it)."""
  N, D, K, V = 3, 6, 4, 5
  p = {"latents": _arr(N, D), "wq": _arr(D, K), "wk": _arr(F, K), "wv": _arr(F, V),
       "wo": _arr(V, D), "head": _arr(D, C)}
  make = {"broadcast_to": lambda l, b: jnp.broadcast_to(l, (b,) + l.shape),
          "tile": lambda l, b: jnp.tile(l[None], (b, 1, 1))}[start]

  def fn(p, x):
    lat = make(p["latents"], x.shape[0])
    a = jax.nn.softmax(jnp.einsum("bnk,bmk->bnm", lat @ p["wq"], x @ p["wk"]), -1)
    lat = lat + jnp.einsum("bnm,bmv->bnv", a, x @ p["wv"]) @ p["wo"]
    return lat.mean(1) @ p["head"]
  x = _arr(2, 7, F)
  t = jaxprune.trace(fn, p, x)
  assert {k: g.size for k, g in t.groups.items()} == {"wq": K, "wv": V, "wo": D}
  # values computed from the latents without the data are states too: the query/key features
  # of (latents @ wq) . (x @ wk) are a group read by the product (they were refused as tied)
  assert t.groups["wq"].read_by_products
  assert sorted((s.path[0], s.axis, s.role) for s in t.groups["wq"].slices) == [
      ("wk", 1, "producer"), ("wq", 1, "producer")]
  for seed in range(3):
    assert_compacts_as_masked(t, p, fn, random_unit_masks(t, seed), (x,))
  assert sorted((s.path[0], s.axis, s.role, s.kind) for s in t.groups["wo"].slices) == [
      ("head", 0, "consumer", "kernel"), ("latents", 1, "producer", "stat"),
      ("wo", 1, "producer", "kernel"), ("wq", 0, "consumer", "kernel")]
  small, _, _ = assert_compacts_as_masked(t, p, fn, _drop(t, "wo"), (x, _arr(5, 7, F)))
  assert small["latents"].shape == (N, D - len(DROP)) and small["wq"].shape == (D - 2, K)
  # wq reads the latents themselves, not the residual sum: activations do not tell units apart
  assert "latents" in t.activations_incomplete_why("wo")
  pruned, um2, _ = jaxprune.importance_prune(t, "wo")(p, jaxprune.unit_masks_ones(t), 2)
  assert_compacts_as_masked(t, pruned, fn, um2, (x,))


def test_queries_through_a_block_before_the_data_enters_are_states():
  """DETR's object queries: a learned array broadcast to the batch goes through an MLP before
  any input enters, then attends to the data. The MLP's hidden units are computed from params
  alone, the same for every example; they were "contracted between two computed parameters"
  and not prunable. They are a group whose units compact exactly."""
  Q, D, Hd = 3, 6, 5
  p = {"queries": _arr(Q, D), "w1": _arr(D, Hd), "b1": _arr(Hd), "w2": _arr(Hd, D),
       "wk": _arr(F, D), "wv": _arr(F, D), "head": _arr(D, C)}

  def fn(p, x):
    q = jnp.broadcast_to(p["queries"], (x.shape[0], Q, D))
    q = jnp.tanh(q @ p["w1"] + p["b1"]) @ p["w2"]
    a = jax.nn.softmax(jnp.einsum("bqd,btd->bqt", q, x @ p["wk"]), -1)
    return jnp.einsum("bqt,btd->bqd", a, x @ p["wv"]).mean(1) @ p["head"]
  x = _arr(2, 7, F)
  t = jaxprune.trace(fn, p, x)
  # (the queries' own channels are a group read by w1's rows, as a learned query's are above)
  assert {k: g.size for k, g in t.groups.items()} == {"queries": D, "w1": Hd, "w2": D, "wv": D}
  assert t.groups["w2"].read_by_products
  small, _, _ = assert_compacts_as_masked(t, p, fn, _drop(t, "w1"), (x, _arr(4, 7, F)))
  assert small["w1"].shape == (D, Hd - len(DROP)) and small["w2"].shape == (Hd - 2, D)
