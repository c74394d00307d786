"""Models users bring that the tracer once got wrong (found by probing as a user would): each
either gets correct groups (compact equals masking) or is reported not prunable, with the
reason; and the errors name the problem."""

import typing

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from conftest import (assert_compacts_as_masked, host_f32, nnx_as_function, nnx_sigmoid_mlp,
                      random_unit_masks)

R = np.random.default_rng(0)


def _arr(*shape):
  return host_f32(R.normal(size=shape))


def _compact_equals_masked(target, params, x, fn, drop):
  um = jaxprune.unit_masks_ones(target)
  for name, units in drop.items():
    um[name] = um[name].at[np.asarray(units)].set(False)
  masked = jaxprune.apply_masks(params, jaxprune.expand(params, target, um))
  small, small_target = target.compact(masked, um)
  np.testing.assert_allclose(small_target.apply(small, x), fn(masked, x), atol=1e-5)
  return small


def test_a_layer_concatenated_with_itself_has_a_consumer_slice_at_each_offset():
  """CReLU, concat([relu(h), relu(-h)]): each unit is read at two offsets. It was once a group
  that masked only the first (a 'removed' unit still drove the output), then refused; now the
  group has the reader's rows at both offsets, and compacting removes both."""
  def crelu(p, x):
    h = x @ p["w1"] + p["b1"]
    h = jnp.concatenate([jax.nn.relu(h), jax.nn.relu(-h)], -1)
    return h @ p["w2"] + p["b2"]
  p = {"w1": _arr(5, 8), "b1": _arr(8), "w2": _arr(16, 3), "b2": _arr(3)}
  x = _arr(32, 5)
  t = jaxprune.trace(crelu, p, x)
  (w2a, w2b) = t.groups["w1"].consumers
  assert (w2a.path, w2a.segment, w2b.path, w2b.segment) == (("w2",), (0, 8), ("w2",), (8, 8))
  assert "several offsets" in w2a.padded_why          # (no folds: relu(c) and relu(-c) differ)
  small = _compact_equals_masked(t, p, x, crelu, {"w1": [1, 6]})
  assert small["w2"].shape == (12, 3)
  np.testing.assert_array_equal(small["w2"], np.asarray(p["w2"])[
      [i for i in range(16) if i % 8 not in (1, 6)]])
  assert not t.activations_complete("w1")      # (its readers read relu(h) and relu(-h))


def test_a_message_passing_layer_reads_senders_and_receivers_of_one_layer():
  """A GNN edge model concatenates the node layer's values at the senders and the receivers
  (jraph's GraphNetwork, EdgeConv's [x_i, x_j - x_i]): the node layer's units sit at two
  offsets of the edge kernel's rows, both removed with the unit; the edge layer is a group."""
  n, e = 6, 10
  snd, rcv = jnp.asarray(R.integers(0, n, e)), jnp.asarray(R.integers(0, n, e))
  p = {"wn": _arr(3, 5), "bn": _arr(5), "we": _arr(2 * 5 + 2, 4), "be": _arr(4),
       "wo": _arr(5 + 4, 2)}

  def gnn(p, x):
    h = jnp.tanh(x @ p["wn"] + p["bn"])
    m = jax.nn.relu(jnp.concatenate([h[snd], h[rcv] - h[snd], jnp.ones((e, 2))], -1) @ p["we"]
                    + p["be"])
    agg = jax.ops.segment_sum(m, rcv, num_segments=x.shape[0])
    return jnp.concatenate([h, agg], -1) @ p["wo"]
  x = _arr(n, 3)
  t = jaxprune.trace(gnn, p, x)
  assert {k: g.size for k, g in t.groups.items()} == {"wn": 5, "we": 4}
  assert sorted((s.path, s.segment) for s in t.groups["wn"].consumers) == [
      (("we",), (0, 5)), (("we",), (5, 5)), (("wo",), (0, 5))]
  small = _compact_equals_masked(t, p, x, gnn, {"wn": [0, 3], "we": [2]})
  assert small["we"].shape == (3 + 3 + 2, 3) and small["wo"].shape == (3 + 3, 2)
  for seed in range(3):
    assert_compacts_as_masked(t, p, gnn, random_unit_masks(t, seed), (x,), atol=1e-5)
  # merging equal units is exact at both offsets (their rows added at each), folding refused
  assert t.activations_complete("wn")
  assert all("several offsets" in c.padded_why for c in t.groups["wn"].consumers
             if c.path == ("we",))
  with pytest.raises(ValueError, match="cannot fold removed units"):
    jaxprune.distinctiveness(t, "wn")
  dup = {**p, "wn": p["wn"].at[:, 4].set(p["wn"][:, 1]), "bn": p["bn"].at[4].set(p["bn"][1])}
  merged, um, _ = jaxprune.distinctiveness(t, "wn", constants=False, complementary=False)(
      dup, jaxprune.unit_masks_ones(t), t.activations(dup, x, "wn"), 1e-3)
  assert np.flatnonzero(~np.asarray(um["wn"])).tolist() == [4]
  small, small_t = t.compact(merged, um)
  np.testing.assert_allclose(small_t.apply(small, x), gnn(dup, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups,features", [(2, 8), (8, 16)])   # grouped; depthwise x2
def test_grouped_convolution_output_is_not_a_bias_only_group(groups, features):
  """A grouped conv (2 groups) makes unit i channel i of every group, on both sides (since
  2026-12-07; it blocked them before): each group keeps as many channels as the others. A
  depthwise conv with a channel multiplier (8 groups of 1 channel, 2 outputs each)
  passes the channels before it on: Conv_0's units own 2 outputs each (since 2026-12-05)."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(8, (3, 3))(x))
      x = nn.relu(nn.Conv(features, (3, 3), feature_group_count=groups)(x))
      x = nn.relu(nn.Conv(6, (1, 1))(x))
      return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))
  x = _arr(4, 6, 6, 3)
  v = Net().init(jax.random.key(1), x)
  t = jaxprune.trace(Net().apply, v, x)
  if groups == 2:
    assert {n: g.size for n, g in t.groups.items()} == {"Conv_0": 4, "Conv_1": 4, "Conv_2": 6}
    assert ("Conv_1/bias (8,): axis 0 (read as 2 x 4) -> [2] not prunable (a grouped "
            "convolution's group index" in t.explain())
    _compact_equals_masked(t, v, x, Net().apply,
                           {"Conv_0": [1], "Conv_1": [0, 3], "Conv_2": [0, 3]})
    return
  assert set(t.groups) == {"Conv_0", "Conv_2"}
  assert "Conv_1/bias (16,): axis 0 (read as 8 x 2) -> [8] group 'Conv_0'" in t.explain()
  _compact_equals_masked(t, v, x, Net().apply, {"Conv_0": [1, 6], "Conv_2": [0, 3]})


def test_group_norm_groups_are_units_and_compact():
  """GroupNorm splits the channels into (groups, channels per group): a unit is a norm group
  (its view of the conv kernel was once rejected by check_groups, and compact could not size
  the channels within a group)."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.GroupNorm(num_groups=2)(nn.Conv(8, (3, 3))(x)))
      x = nn.relu(nn.Conv(6, (3, 3))(x))
      return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))
  x = _arr(4, 6, 6, 3)
  v = Net().init(jax.random.key(1), x)
  t = jaxprune.trace(Net().apply, v, x)
  # (and the channel within a norm group, Conv_0:3: the norm's sums over a group's channels
  # read it, E[h] and E[h^2], a masked channel adding zero to both)
  assert {k: g.size for k, g in t.groups.items()} == {"Conv_0": 2, "Conv_1": 6, "Conv_0:3": 4}
  assert t.groups["Conv_0:3"].read_by_products and not t.groups["Conv_0"].read_by_products
  jaxprune.check_groups(v, t.groups)
  small = _compact_equals_masked(t, v, x, Net().apply, {"Conv_0": [1], "Conv_1": [2]})
  assert small["params"]["Conv_0"]["kernel"].shape == (3, 3, 3, 4)
  assert small["params"]["GroupNorm_0"]["scale"].shape == (4,)
  small = _compact_equals_masked(t, v, x, Net().apply, {"Conv_0": [0], "Conv_0:3": [1, 2]})
  assert small["params"]["GroupNorm_0"]["scale"].shape == (2,)


def test_group_norm_groups_prune_again_after_compaction():
  """activations() on a compacted target sized the leaves without the compacted groups' sizes,
  so a GroupNorm group (a unit is (groups, channels per group) of one channel axis) could not
  be sized and raised 'bias has size 4 on axis 0, where the computation needs 8'. Prune,
  compact, read the small target's activations and prune again, for every group."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.GroupNorm(num_groups=4)(nn.Conv(8, (3, 3), padding="VALID")(x)))
      x = nn.relu(nn.Conv(5, (1, 1))(x))
      return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))
  x = _arr(6, 5, 5, 2)
  net = Net()
  v = net.init(jax.random.key(1), x)
  t = jaxprune.trace(net.apply, v, x)
  assert {k: g.size for k, g in t.groups.items()} == {"Conv_0": 4, "Conv_1": 5, "Conv_0:3": 2}
  for name in ("Conv_0", "Conv_1"):      # (Conv_0:3's 2 units cannot lose 2)
    params, target = v, t
    for _ in range(2):        # prune -> compact -> activations of the small target -> prune
      acts = target.activations(params, x, name)
      assert acts.shape[-1] == target.groups[name].size
      um = jaxprune.unit_masks_ones(target)
      um[name] = um[name].at[0].set(False)
      masked = jaxprune.apply_masks(params, jaxprune.expand(params, target, um))
      params, small_target = target.compact(masked, um)
      np.testing.assert_allclose(small_target.apply(params, x), target.apply(masked, x),
                                 atol=1e-5)
      target = small_target
    assert target.groups[name].size == t.groups[name].size - 2
    acts = target.activations(params, x, name)
    ones = jaxprune.unit_masks_ones(target)
    if target.activations_complete(name):
      new, um, _ = jaxprune.distinctiveness(target, name, constants=False)(
          params, ones, acts, 90.0, 179.0)
    else:                     # the norm acts after these activations: prune from weights
      new, um, _ = jaxprune.importance_prune(target, name)(params, ones, 1)
    assert int(np.sum(um[name])) < target.groups[name].size
    small, st = target.compact(new, um)
    masked = jaxprune.apply_masks(new, jaxprune.expand(new, target, um))
    np.testing.assert_allclose(st.apply(small, x), target.apply(masked, x), atol=1e-5)


_PRODUCTS = {   # a layer read on two axes of one product, flattened or not
    "outer, flattened": lambda h, w2: (h[:, :, None] * h[:, None, :]).reshape(
        h.shape[0], -1) @ w2.reshape(-1, w2.shape[-1]),
    "pairwise difference, flattened": lambda h, w2: (h[:, :, None] - h[:, None, :]).reshape(
        h.shape[0], -1) @ w2.reshape(-1, w2.shape[-1]),
    "einsum": lambda h, w2: jnp.einsum("bi,bj,ijk->bk", h, h, w2),
}


@pytest.mark.parametrize("case", sorted(_PRODUCTS))
def test_a_layer_read_on_two_axes_of_one_product_owns_both(case):
  """o = (h[:, :, None] * h[:, None, :]).reshape(B, -1) @ w2: the group held w2's rows (k, .)
  but not (., k), so the masked network still read a removed unit (0.48 off the network
  without it), merging exact duplicates moved the outputs by 0.38 and compact failed. Each
  place a unit sits on the leaf is a slice; masked, removed and compacted agree, merging a
  duplicate is exact, and constant folds are refused with the reason."""
  n = 5
  product = _PRODUCTS[case]
  flat = case != "einsum"

  def f(p, x):
    return product(jax.nn.sigmoid(x @ p["w1"] + p["b1"]), p["w2"]) + p["b2"]

  rng = np.random.default_rng(0)
  p = {"w1": rng.normal(size=(6, n)), "b1": rng.normal(size=n),
       "w2": rng.normal(size=(n * n, 3) if flat else (n, n, 3)), "b2": rng.normal(size=3)}
  p = jax.tree.map(lambda a: jnp.asarray(a * 0.5, jnp.float32), p)
  x = _arr(16, 6)
  t = jaxprune.trace(f, p, x)
  g = t.groups["w1"]
  assert [s.path for s in g.consumers] == [("w2",), ("w2",)]
  keep = np.array([1, 1, 0, 1, 1], bool)
  um = {"w1": jnp.asarray(keep)}
  masked = jaxprune.apply_masks(p, jaxprune.expand(p, t, um))
  w2 = np.asarray(p["w2"]).reshape(n, n, 3)[keep][:, keep]     # the network without unit 2
  removed = {"w1": p["w1"][:, keep], "b1": p["b1"][keep], "b2": p["b2"],
             "w2": jnp.asarray(w2.reshape(-1, 3) if flat else w2)}
  np.testing.assert_allclose(f(masked, x), f(removed, x), atol=1e-5)
  small, st = t.compact(masked, um)
  assert small["w2"].shape == removed["w2"].shape
  np.testing.assert_allclose(st.apply(small, x), f(masked, x), atol=1e-5)
  # unit 1 an exact copy of unit 0: merging it leaves the outputs as they were
  dup = dict(p, w1=p["w1"].at[:, 1].set(p["w1"][:, 0]), b1=p["b1"].at[1].set(p["b1"][0]))
  new, um2, _ = jaxprune.distinctiveness(t, "w1", complementary=False, constants=False)(
      dup, jaxprune.unit_masks_ones(t), t.activations(dup, x, "w1"), 1.0, 179.0)
  assert np.asarray(um2["w1"]).tolist() == [True, False, True, True, True]
  np.testing.assert_allclose(f(new, x), f(dup, x), atol=1e-5)
  small, st = t.compact(new, um2)
  np.testing.assert_allclose(st.apply(small, x), f(dup, x), atol=1e-5)
  # a constant unit's rows (k, j) still read unit j: no fold into the bias
  assert not g.exact_constant_fold
  for make in (lambda: jaxprune.distinctiveness(t, "w1"),
               lambda: jaxprune.group_redundancy(t, "w1")):
    with pytest.raises(ValueError, match=r"its consumer w2 reads it through a product of the "
                                         r"units with themselves"):
      make()


def test_bias_free_consumer_with_constants_off():
  """The documented fix for a consumer without a bias, constants=False, works for the
  activation pruner too (the jitted sweep used to refuse the group)."""
  def mlp(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"]
  p, x = {"w1": _arr(10, 20), "w2": _arr(20, 3)}, _arr(64, 10)
  t = jaxprune.trace(mlp, p, x)
  with pytest.raises(ValueError, match="constants=False"):
    jaxprune.distinctiveness(t, "w1")
  prune = jaxprune.distinctiveness(t, "w1", constants=False)
  new, um, rep = prune(p, jaxprune.unit_masks_ones(t), t.activations(p, x, "w1"), 60.0, 120.0)
  kinds = np.asarray(rep.kind)[:int(rep.count)]   # a similar merge removes 1, a pair 2
  assert 0 < int(um["w1"].sum()) < 20
  assert int(np.sum(np.where(kinds == 1, 1, 2))) == 20 - int(um["w1"].sum())


def test_checkpointed_layer_is_followed_and_while_loop_says_it_keeps_its_shapes():
  def layer(h, w, b):
    return jax.nn.relu(h @ w + b)
  p = {"w1": _arr(10, 8), "b1": _arr(8), "w2": _arr(8, 6), "b2": _arr(6), "w3": _arr(6, 3),
       "b3": _arr(3)}
  x = _arr(32, 10)

  def ckpt(p, x):
    h = jax.checkpoint(layer)(x, p["w1"], p["b1"])
    return layer(h, p["w2"], p["b2"]) @ p["w3"] + p["b3"]
  t = jaxprune.trace(ckpt, p, x)
  assert {k: g.size for k, g in t.groups.items()} == {"w1": 8, "w2": 6}
  assert t.activations(p, x[:5], "w1").shape == (5, 8)
  _compact_equals_masked(t, p, x, ckpt, {"w1": [0, 5], "w2": [1]})

  def looped(p, x):
    h = layer(x, p["w1"], p["b1"])
    h = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] * 0.9), (0, h))[1]
    return layer(h, p["w2"], p["b2"]) @ p["w3"] + p["b3"]
  t = jaxprune.trace(looped, p, x)
  assert t.activations(p, x, "w2").shape == (32, 6)
  with pytest.raises(jaxprune.TraceError, match="while .* does not follow.*example's batch size"):
    t.activations(p, x[:5], "w2")


def test_key_and_counter_leaves_trace_and_fit_names_them():
  """An nnx model with Dropout holds an RNG key and a counter in its state: trace carries them;
  fit, which trains every leaf, names them and the fix."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(10, 16, rngs=rngs)
      self.drop = nnx.Dropout(0.5, deterministic=True, rngs=rngs)
      self.l2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(self.drop(nnx.relu(self.l1(x))))

  apply, p = nnx_as_function(MLP(nnx.Rngs(0)))
  x = _arr(8, 10)
  t = jaxprune.trace(apply, p, x)
  assert set(t.groups) == {"l1"}
  _compact_equals_masked(t, p, x, apply, {"l1": [0, 7]})
  with pytest.raises(ValueError, match=r"2 leaves that cannot be trained.*drop/rngs/key.*nnx\.Param"):
    jaxprune.fit(t, p, x, jnp.zeros((8,), jnp.int32), key=jax.random.key(0), epochs=1,
                 progress=False)
  # The GA checks the params for NaNs: it tried to read the key leaf as a NumPy array.
  res = jaxprune.ga.search(t, p, x, jnp.arange(8) % 3, "l1", key=jax.random.key(1),
                           config=jaxprune.ga.GAConfig(population_size=8, generations=1),
                           progress=False)
  assert res.mask.shape == (16,)


class _Layer(typing.NamedTuple):
  w: jax.Array
  b: jax.Array


def _container_cases():
  """The same 5-8-6-3 MLP with its params in the containers users write: (params, apply,
  expected group sizes by name)."""
  w1, b1, w2, b2, w3, b3 = _arr(5, 8), _arr(8), _arr(8, 6), _arr(6), _arr(6, 3), _arr(3)

  def mlp(l1, l2, l3, x):
    return jax.nn.relu(jax.nn.relu(x @ l1[0] + l1[1]) @ l2[0] + l2[1]) @ l3[0] + l3[1]

  from flax import nnx  # pylint: disable=import-outside-toplevel
  seq = nnx.Sequential(nnx.Linear(5, 8, rngs=nnx.Rngs(0)), nnx.relu,
                       nnx.Linear(8, 6, rngs=nnx.Rngs(1)), nnx.relu,
                       nnx.Linear(6, 3, rngs=nnx.Rngs(2)))
  seq_fn, seq_params = nnx_as_function(seq)
  graphdef, state = nnx.split(seq)
  return {
      # the JAX tutorials' list of (w, b) tuples
      "list of tuples": ([(w1, b1), (w2, b2), (w3, b3)], lambda p, x: mlp(*p, x),
                         {"0": 8, "1": 6}),
      "list of dicts": ([{"w": w1, "b": b1}, {"w": w2, "b": b2}, {"w": w3, "b": b3}],
                        lambda p, x: mlp(*[(l["w"], l["b"]) for l in p], x), {"0": 8, "1": 6}),
      "flat tuple": ((w1, b1, w2, b2, w3, b3),
                     lambda p, x: mlp(p[0:2], p[2:4], p[4:6], x), {"0": 8, "2": 6}),
      "NamedTuples": ({"l1": _Layer(w1, b1), "l2": _Layer(w2, b2), "l3": _Layer(w3, b3)},
                      lambda p, x: mlp(p["l1"], p["l2"], p["l3"], x), {"l1": 8, "l2": 6}),
      # nnx.Sequential: its layers are keyed 0, 2, 4 (ints); once traced, then failed in
      # compact with "no key '0' under layers"
      "nnx Sequential (pure dict)": (seq_params, seq_fn, {"layers/0": 8, "layers/2": 6}),
      "nnx Sequential (State)": (state, lambda s, x: nnx.merge(graphdef, s)(x),
                                 {"layers/0": 8, "layers/2": 6}),
  }


@pytest.mark.parametrize("case", list(_container_cases()))
def test_params_in_lists_tuples_namedtuples_and_int_keyed_dicts(case):
  """Groups are found, and masks, compaction and a pruner work, whatever containers hold the
  params (lists and tuples used to give no groups; int keys broke compact)."""
  params, fn, sizes = _container_cases()[case]
  x = _arr(32, 5)
  t = jaxprune.trace(fn, params, x)
  assert {k: g.size for k, g in t.groups.items()} == sizes
  first, second = sorted(sizes, key=lambda k: -sizes[k])
  small = _compact_equals_masked(t, params, x, fn, {first: [1, 4], second: [0]})
  assert jax.tree.structure(small) == jax.tree.structure(params)   # containers kept
  shapes = sorted(tuple(l.shape) for l in jax.tree.leaves(small))
  assert shapes == sorted([(5, 6), (6,), (6, 5), (5,), (5, 3), (3,)])
  # A pruner writes into the same containers: the 3 smallest-norm units of the first group.
  pruned, um, _ = jaxprune.importance_prune(t, first)(params, jaxprune.unit_masks_ones(t), 3)
  assert jax.tree.structure(pruned) == jax.tree.structure(params)
  assert int(np.sum(um[first])) == sizes[first] - 3
  np.testing.assert_allclose(fn(pruned, x), fn(jaxprune.apply_masks(
      params, jaxprune.expand(params, t, um)), x), atol=1e-5)


def test_batch_statistics_at_another_batch_size_raise_instead_of_a_wrong_value():
  """A mean over the batch divides by the traced batch size (a constant of the program): the
  compacted target gave outputs off by 0.35 at another batch size; now it says why."""
  def bn(p, x):
    h = x @ p["w1"]
    h = (h - h.mean(0)) / jnp.sqrt(h.var(0) + 1e-5)            # batch statistics
    return jax.nn.relu(h) @ p["w2"]
  p = {"w1": _arr(5, 8), "w2": _arr(8, 3)}
  x = _arr(16, 5)
  t = jaxprune.trace(bn, p, x)
  small = _compact_equals_masked(t, p, x, bn, {"w1": [0, 2]})   # the traced batch size: exact
  _, small_t = t.compact(p, {"w1": jnp.arange(8) > 1})
  with pytest.raises(jaxprune.TraceError, match="averages over an axis of size 16 .* here 19"):
    small_t.apply(small, _arr(19, 5))

  def running(p, x):                     # a sum, a cumulative sum and a max over the batch are
    h = jax.nn.relu(x @ p["w1"])         # right at any batch size: no false alarm
    h = h + jnp.cumsum(h, axis=0) + jnp.max(h, axis=0) + jnp.sum(h, axis=0)
    return h @ p["w2"]
  t = jaxprune.trace(running, p, x)
  um = {"w1": jnp.arange(8) > 1}
  masked = jaxprune.apply_masks(p, jaxprune.expand(p, t, um))
  small, small_t = t.compact(masked, um)
  x5 = _arr(5, 5)
  np.testing.assert_allclose(small_t.apply(small, x5), running(masked, x5), atol=1e-5)


def _constant_unit_removed_exactly(fn, p, x, group, unit, **kw):
  """Makes ``unit`` of ``group`` constant (zero incoming weights, a bias), removes it with
  distinctiveness and returns how much the outputs moved."""
  t = jaxprune.trace(fn, p, x)
  g = t.groups[group]
  kern = next(s for s in g.producers if s.kind == "kernel")
  bias = next(s for s in g.producers if s.kind == "bias")
  leaf = jaxprune.units.get_path(p, kern.path)
  p = jaxprune.units.set_path(p, kern.path, jnp.moveaxis(
      jnp.moveaxis(leaf, kern.axis, 0).at[unit].set(0.0), 0, kern.axis))
  b = jaxprune.units.get_path(p, bias.path)
  p = jaxprune.units.set_path(p, bias.path, jnp.moveaxis(
      jnp.moveaxis(b, bias.axis, 0).at[unit].set(0.3), 0, bias.axis))
  p2, um, rep = jaxprune.distinctiveness(t, group, **kw)(
      p, jaxprune.unit_masks_ones(t), t.activations(p, x, group), 1.0, 179.0)
  assert not bool(um[group][unit]) and int(np.sum(~np.asarray(um[group]))) == 1
  return float(jnp.max(jnp.abs(fn(p2, x) - fn(p, x))))


def test_constant_folds_keep_the_bias_axes_of_the_consumer():
  """A consumer bias with more axes than the outputs (per head (heads, out); a vmapped
  ensemble's (members, out)) gets each head's own contribution: the fold summed over the heads
  and moved the outputs by 1.28."""
  x = _arr(64, 10)
  heads = {"w1": _arr(10, 20), "b1": _arr(20), "w2": _arr(20, 4, 3), "b2": _arr(4, 3)}
  def per_head(p, x):
    return jnp.einsum("bh,hko->bko", jnp.tanh(x @ p["w1"] + p["b1"]), p["w2"]) + p["b2"]
  assert _constant_unit_removed_exactly(per_head, heads, x, "w1", 7) < 1e-5

  def layer(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  ens = {"w1": _arr(10, 20), "b1": _arr(20), "w2": _arr(5, 20, 3), "b2": _arr(5, 3)}
  def ensemble(p, x):      # one hidden layer shared, five output heads vmapped
    return jax.vmap(lambda w2, b2: layer({**p, "w2": w2, "b2": b2}, x))(p["w2"], p["b2"])
  assert _constant_unit_removed_exactly(ensemble, ens, x, "w1", 4) < 1e-5


def test_input_dilated_convolution_does_not_claim_an_exact_fold():
  """Between dilated inputs the window sees inserted zeros, so a constant channel's
  contribution varies by position: folding it moved the output by 0.17."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.tanh(nn.Conv(6, (1, 1), name="prod")(x))
      h = nn.Conv(4, (2, 2), input_dilation=(2, 2), padding=((0, 0), (0, 0)))(h)
      return nn.Dense(2)(h.reshape(h.shape[0], -1))
  x = _arr(8, 6, 6, 2)
  v = Net().init(jax.random.key(1), x)
  t = jaxprune.trace(Net().apply, v, x)
  assert not t.groups["prod"].exact_constant_fold
  with pytest.raises(ValueError, match="input-dilated"):
    jaxprune.distinctiveness(t, "prod")


def test_activations_of_a_vmapped_ensemble_follow_the_transpose_after_the_contraction():
  """vmap transposes the members' contraction before the bias is added: activations stopped at
  the raw contraction (no bias, no sigmoid, 'linear'), so distinctiveness saw other vectors."""
  x = _arr(64, 10)
  pe = {"w1": _arr(5, 10, 20), "b1": _arr(5, 20), "w2": _arr(5, 20, 3), "b2": _arr(5, 3)}
  def single(p, x):
    return jax.nn.sigmoid(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  ens = lambda p, x: jax.vmap(single, in_axes=(0, None))(p, x).mean(0)
  t = jaxprune.trace(ens, pe, x)
  # (the members are a group too, summed by the mean, named after the hidden units: w1:0)
  assert {n: (g.size, g.read_by_products) for n, g in t.groups.items()} == {
      "w1": (20, False), "w1:0": (5, True)}
  _compact_equals_masked(t, pe, x, ens, {"w1:0": [1, 3], "w1": [0, 7]})
  assert t.groups["w1"].activation == "sigmoid"
  assert {s.kind for s in t.groups["w1"].producers} == {"kernel", "bias"}
  true = jax.vmap(lambda p: jax.nn.sigmoid(x @ p["w1"] + p["b1"]))(pe)       # (5, 64, 20)
  np.testing.assert_allclose(t.activations(pe, x, "w1"), true, atol=1e-6)
  assert all(s.bias == ("b2",) for s in t.groups["w1"].consumers)


def test_nested_concatenation_densenet_block():
  """A concatenation that is itself part of a later one (a DenseNet block's running map): the
  outer reader's rows for the inner parts were missing from their groups (a 'removed' unit
  still reached the output) and compact failed ('reads 12 concatenated units but its parts
  have 11')."""
  p = {"wa": _arr(3, 4), "wb": _arr(7, 5), "wo": _arr(12, 2)}
  def dense(p, x):
    h = jnp.concatenate([x, jnp.tanh(x @ p["wa"])], -1)        # 3 + 4
    h = jnp.concatenate([h, jnp.tanh(h @ p["wb"])], -1)        # 7 + 5
    return h @ p["wo"]
  x = _arr(8, 3)
  t = jaxprune.trace(dense, p, x)
  assert {k: g.size for k, g in t.groups.items()} == {"wa": 4, "wb": 5}
  assert sorted((s.path, s.segment) for s in t.groups["wa"].consumers) == [
      (("wb",), (3, 4)), (("wo",), (3, 4))]
  small = _compact_equals_masked(t, p, x, dense, {"wa": [1], "wb": [0, 4]})
  assert small["wo"].shape == (9, 2) and small["wb"].shape == (6, 3)

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = jnp.concatenate([x, nn.relu(nn.Conv(4, (3, 3))(x))], -1)
      h = jnp.concatenate([h, nn.relu(nn.Conv(5, (3, 3))(h))], -1)
      h = jnp.concatenate([nn.relu(nn.Conv(6, (1, 1))(h)), h], -1)
      return nn.Dense(2)(h.mean((1, 2)))
  xi = _arr(4, 6, 6, 3)
  v = Block().init(jax.random.key(0), xi)
  t = jaxprune.trace(Block().apply, v, xi)
  assert {k: g.size for k, g in t.groups.items()} == {"Conv_0": 4, "Conv_1": 5, "Conv_2": 6}
  _compact_equals_masked(t, v, xi, Block().apply, {"Conv_0": [0, 3], "Conv_1": [2], "Conv_2": [5]})


def test_model_with_a_dict_of_outputs_trains_with_its_own_loss():
  """fit and evaluate with the user's loss crashed reading .ndim of the dict ('accuracy' is 0,
  as for reconstruction); without one, fit, evaluate and the GA say what to pass."""
  import optax  # pylint: disable=import-outside-toplevel

  class TwoHeads(nn.Module):
    @nn.compact
    def __call__(self, x):
      a = nn.relu(nn.Dense(7)(x))
      return {"cls": nn.Dense(3)(a), "reg": nn.Dense(1)(a)}
  x, y = _arr(32, 10), jnp.arange(32) % 3
  m = TwoHeads()
  p = m.init(jax.random.key(2), x)
  t = jaxprune.trace(m.apply, p, x)
  loss = lambda out, y: optax.softmax_cross_entropy_with_integer_labels(out["cls"], y)
  p2, hist = jaxprune.fit(t, p, x, y, key=jax.random.key(3), epochs=3, loss=loss,
                          progress=False)
  assert hist["loss"][-1] < hist["loss"][0]
  res = jaxprune.evaluate(t, p2, x, y, loss=loss)
  assert res["accuracy"] == 0.0 and abs(res["loss"] - float(loss(m.apply(p2, x), y).mean())) < 1e-5
  for call in (lambda: jaxprune.evaluate(t, p, x, y),
               lambda: jaxprune.ga.search(t, p, x, y, "Dense_0", key=jax.random.key(1),
                                          progress=False)):
    with pytest.raises(ValueError, match="returns a dict of outputs.*loss=.*fitness"):
      call()


def test_errors_for_a_static_flag_a_missing_group_name_and_several_ga_inputs():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train):
      h = nn.relu(nn.Dense(6)(x))
      if train:                                   # a Python flag: must be static
        h = h * 0.5
      return nn.Dense(3)(h)
  x = _arr(8, 4)
  v = Net().init(jax.random.key(0), x, False)
  with pytest.raises(jaxprune.TraceError, match="functools.partial"):
    jaxprune.trace(Net().apply, v, x, False)
  t = jaxprune.trace(lambda p, x: Net().apply(p, x, False), v, x)
  with pytest.raises(TypeError, match="last argument must be the name of a group"):
    t.activations(v, x)                         # the name forgotten: x is not a group
  with pytest.raises(ValueError, match="one input array x.*fitness function"):
    jaxprune.ga.search(t, v, (x, x), jnp.arange(8) % 3, list(t.groups)[0],
                       key=jax.random.key(1), progress=False)


def test_activation_pruners_refuse_a_residual_coupled_group():
  """A residual addition couples two layers' units into one group whose activations are the
  first layer's, while the next layer reads the sum: distinctiveness merged 'duplicates' at
  angle 0 and moved the outputs by 23.5."""
  p = {"w0": _arr(10, 6), "b0": _arr(6), "w1": _arr(6, 6), "b1": _arr(6), "wo": _arr(6, 3),
       "bo": _arr(3)}
  def res(p, x):
    h = x @ p["w0"] + p["b0"]
    s = h + jax.nn.relu(h @ p["w1"] + p["b1"])
    return jax.nn.relu(s) @ p["wo"] + p["bo"]
  t = jaxprune.trace(res, p, _arr(64, 10))
  assert list(t.groups) == ["w0"] and not t.activations_complete("w0")
  for make in (lambda: jaxprune.distinctiveness(t, "w0", constants=False),
               lambda: jaxprune.group_redundancy(t, "w0"),
               lambda: jaxprune.pruners.progressive_distinctiveness(
                   t, "w0", lambda q: jnp.sum(res(q, _arr(4, 10))), constants=False)):
    with pytest.raises(ValueError, match="residual addition couples it.*from weights"):
      make()
  jaxprune.weight_distinctiveness(t, "w0", constants=False)      # from weights: allowed
  mlp = jaxprune.MLP(in_features=4, hidden=(5, 6), out_features=3)
  t = jaxprune.trace(mlp.apply, mlp.init(jax.random.key(0)), _arr(8, 4))
  assert all(t.activations_complete(g) for g in t.groups)


def test_constant_fold_into_a_pytorch_layout_conv_uses_its_output_axis():
  """An OIHW kernel with 3 outputs and a 3x3 window: matching the bias by size took the window's
  last axis for the outputs and moved the outputs by 3.16; trace now records the output axis."""
  from jax import lax  # pylint: disable=import-outside-toplevel

  def conv(x, w):                                  # NCHW / OIHW, VALID padding
    return lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                    dimension_numbers=("NCHW", "OIHW", "NCHW"))
  p = {"w1": _arr(6, 2, 3, 3), "b1": _arr(6), "w2": _arr(3, 6, 3, 3), "b2": _arr(3)}
  def torch_net(p, x):
    h = jax.nn.relu(conv(x, p["w1"]) + p["b1"][None, :, None, None])
    return conv(h, p["w2"]) + p["b2"][None, :, None, None]
  x = _arr(8, 2, 9, 9)
  t = jaxprune.trace(torch_net, p, x)
  assert [s.out_axes for s in t.groups["w1"].consumers] == [(0,)]
  assert _constant_unit_removed_exactly(torch_net, p, x, "w1", 2) < 1e-4


def test_positions_and_token_embeddings_at_other_batch_sizes():
  """jnp.arange crashed trace (iota's output was not a list); an embedding lookup (gather)
  lost the batch size, so the target crashed at batch 3 and silently returned 8 rows at
  batch 1."""
  p = {"w1": _arr(4, 5), "w2": _arr(5, 2)}
  def positional(p, x):
    return jnp.tanh((x + jnp.arange(x.shape[1], dtype=x.dtype)) @ p["w1"]) @ p["w2"]
  t = jaxprune.trace(positional, p, _arr(3, 4))
  _compact_equals_masked(t, p, _arr(3, 4), positional, {"w1": [1]})

  class Net(nn.Module):
    @nn.compact
    def __call__(self, tok):
      h = nn.LayerNorm()(nn.Embed(20, 16)(tok))
      h = nn.relu(nn.Dense(12)(h))
      return nn.Dense(3)(h.mean(1))
  tok = jax.random.randint(jax.random.key(0), (8, 6), 0, 20)
  v = Net().init(jax.random.key(1), tok)
  t = jaxprune.trace(Net().apply, v, tok)
  # (the embedding's columns are a group too, read by the LayerNorm's sums)
  assert set(t.groups) == {"Dense_0", "Embed_0"}
  um = {"Dense_0": jnp.arange(12) > 2, "Embed_0": jnp.arange(16) % 3 > 0}
  masked = jaxprune.apply_masks(v, jaxprune.expand(v, t, um))
  small, small_t = t.compact(masked, um)
  for b in (3, 1):
    np.testing.assert_allclose(small_t.apply(small, tok[:b]), Net().apply(masked, tok[:b]),
                               atol=1e-5)
  assert t.activations(v, tok[:3], "Dense_0").shape == (3, 6, 12)


def test_a_size_lost_through_an_unfollowed_op_raises_instead_of_broadcasting():
  """An op the tracer does not follow (here an FFT) loses the batch size; a later broadcast
  would then be rebuilt at the traced size (silently, at batch 1)."""
  p = {"w1": _arr(4, 5), "w2": _arr(5, 2)}
  def spectral(p, x):
    h = jnp.fft.fft(x).real
    h = jnp.broadcast_to(h[:, None, :], (h.shape[0], 3, h.shape[1])).sum(1)
    return jnp.tanh(h @ p["w1"]) @ p["w2"]
  t = jaxprune.trace(spectral, p, _arr(8, 4))
  small, small_t = t.compact(p, {"w1": jnp.arange(5) > 0})
  for b in (3, 1):
    with pytest.raises(jaxprune.TraceError, match="reaches a broadcast to the traced size 8"):
      small_t.apply(small, _arr(b, 4))


def _one_layer(act):
  def fn(p, x):
    return act(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  return fn


_ONE = {"w1": _arr(4, 6), "b1": _arr(6), "w2": _arr(6, 3), "b2": _arr(3)}

_ACTS = [  # (activation, the tag the tracer must give it)
    (jax.nn.relu, "relu"), (lambda z: jnp.maximum(z, 0.0), "relu"),
    (jax.nn.sigmoid, "sigmoid"), (lambda z: 1.0 / (1.0 + jnp.exp(-z)), "sigmoid"),
    (lambda z: 0.5 * jnp.tanh(z / 2) + 0.5, "sigmoid"), (jnp.tanh, "tanh"),
    (lambda z: z, "linear"), (jax.nn.relu6, "other"), (jax.nn.hard_sigmoid, "other"),
    (jax.nn.gelu, "other"), (jax.nn.silu, "other"), (jax.nn.elu, "other"),
    (jax.nn.hard_tanh, "other"), (lambda z: z * jax.nn.sigmoid(z), "other"),
    (lambda z: jnp.where(z > 0, z, 0.1 * z), "other"), (lambda z: z * z, "other")]


@pytest.mark.parametrize("k", range(len(_ACTS)))
def test_activations_follow_a_nonlinearity_that_reads_its_input_twice(k):
  """gelu, silu, elu, where(...) read the pre-activation several times: the activations are
  taken where the branches join (they were the pre-activation, so a constant unit's fold moved
  the outputs by 0.06 and group redundancy by 1.0), and the tag names the function, found by
  evaluating it (a hand-written sigmoid is a sigmoid, so distinctiveness shifts it)."""
  act, tag = _ACTS[k]
  fn, x = _one_layer(act), _arr(32, 4)
  t = jaxprune.trace(fn, _ONE, x)
  assert t.groups["w1"].activation == tag and t.activations_complete("w1")
  np.testing.assert_allclose(t.activations(_ONE, x, "w1"), act(x @ _ONE["w1"] + _ONE["b1"]),
                             atol=1e-6, rtol=1e-6)   # z * z reaches 19: float32's ulp there


def test_constant_gelu_unit_folds_exactly_and_weight_constants_are_refused():
  p = jax.tree.map(np.array, _ONE)
  p["w1"][:, 2] = 0.0                                   # unit 2 outputs gelu(b1[2]) always
  fn, x = _one_layer(jax.nn.gelu), _arr(32, 4)
  t = jaxprune.trace(fn, p, x)
  new, um, _ = jaxprune.distinctiveness(t, "w1")(p, jaxprune.unit_masks_ones(t),
                                                 t.activations(p, x, "w1"), 1.0, 179.0)
  assert not bool(um["w1"][2])
  np.testing.assert_allclose(fn(new, x), fn(p, x), atol=1e-5)
  new, um, _ = jaxprune.group_redundancy(t, "w1")(p, jaxprune.unit_masks_ones(t),
                                                  t.activations(p, x, "w1"), 1e-4)
  assert np.flatnonzero(~np.asarray(um["w1"])).tolist() == [2]
  np.testing.assert_allclose(fn(new, x), fn(p, x), atol=1e-5)
  # From weights, act(bias) is not what a zero-weight gelu unit outputs: refused, with the fix.
  with pytest.raises(ValueError, match="not one of sigmoid.*'other'.*constants=False"):
    jaxprune.weight_distinctiveness(t, "w1")
  jaxprune.weight_distinctiveness(t, "w1", constants=False)


def test_weight_constants_refused_after_a_norm_or_a_residual():
  def bn(p, x):
    h = (x @ p["w1"] + p["b1"]) * p["scale"] + p["shift"]
    return jax.nn.relu(h) @ p["w2"] + p["b2"]

  def residual(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    h = h + jax.nn.relu(h @ p["wr"] + p["br"])
    return h @ p["w2"] + p["b2"]

  x = _arr(8, 4)
  t = jaxprune.trace(bn, dict(_ONE, scale=_arr(6), shift=_arr(6)), x)
  with pytest.raises(ValueError, match="a normalisation, a scale"):
    jaxprune.weight_distinctiveness(t, "w1")
  t = jaxprune.trace(residual, dict(_ONE, wr=_arr(6, 6), br=_arr(6)), x)
  with pytest.raises(ValueError, match="constants=False"):   # the residual adds to the units
    jaxprune.weight_distinctiveness(t, "w1")

  def branches(p, x):                                         # two kernels make each unit
    h = jax.nn.relu(x @ p["w1"] + p["b1"]) + jax.nn.relu(x @ p["wr"] + p["br"])
    return h @ p["w2"] + p["b2"]

  t = jaxprune.trace(branches, dict(_ONE, wr=_arr(4, 6), br=_arr(6)), x)
  assert t.groups["w1"].exact_constant_fold
  with pytest.raises(ValueError, match="2 kernels produce"):
    jaxprune.weight_distinctiveness(t, "w1")

  def shared(p, x):             # one layer applied to two inputs, its outputs summed: a unit
    enc = lambda xi: jax.nn.relu(xi @ p["w1"] + p["b1"])   # with zero weights outputs 2 relu(b)
    return (enc(x) + enc(2 * x)) @ p["w2"] + p["b2"]

  t = jaxprune.trace(shared, _ONE, x)
  with pytest.raises(ValueError, match="applied twice and its outputs summed.*constants=False"):
    jaxprune.weight_distinctiveness(t, "w1")


def test_a_group_read_before_and_after_its_nonlinearity_is_incomplete():
  def fn(p, x):
    h = x @ p["w1"] + p["b1"]
    return jax.nn.relu(h) @ p["w2"] + h @ p["w3"]

  p = dict(_ONE, w3=_arr(6, 3))
  t = jaxprune.trace(fn, p, _arr(8, 4))
  assert not t.activations_complete("w1")
  with pytest.raises(ValueError, match="read it at different points"):
    jaxprune.distinctiveness(t, "w1")


def test_a_gather_that_takes_the_batch_whole_runs_at_other_batch_sizes():
  """A nearest-neighbour resize and jnp.take along time gather slices that keep the batch and
  the units whole: at another batch size the target returned the traced batch's rows (3 of 5);
  now those axes are followed through, and the units before the gather are a group."""
  class Up(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Conv(4, (3, 3), name="c0")(x))
      h = jax.image.resize(h, (h.shape[0], 8, 8, 4), "nearest")
      h = nn.relu(nn.Conv(5, (3, 3), name="c1")(h))
      return nn.Dense(2)(h.mean(axis=(1, 2)))

  def seq(p, x):
    h = jnp.tanh(x @ p["w1"])
    h = jnp.take(h, jnp.array([0, 2, 4]), axis=1)
    return h.reshape(h.shape[0], -1) @ p["w2"]

  m = Up()
  p = m.init(jax.random.key(2), _arr(3, 4, 4, 1))
  t = jaxprune.trace(m.apply, p, _arr(3, 4, 4, 1))
  assert set(t.groups) == {"c0", "c1"}
  _compact_equals_masked(t, p, _arr(5, 4, 4, 1), m.apply, {"c0": [1], "c1": [0, 3]})
  assert t.activations(p, _arr(5, 4, 4, 1), "c0").shape == (5, 4, 4, 4)
  p = {"w1": _arr(3, 6), "w2": _arr(18, 2)}
  t = jaxprune.trace(seq, p, _arr(2, 5, 3))
  _compact_equals_masked(t, p, _arr(4, 5, 3), seq, {"w1": [1, 4]})


def test_token_model_trains_evaluates_and_searches():
  """Integer inputs (token ids): fit, evaluate and ga.search read the model's output size with
  the input's own dtype (a float32 stand-in crashed nn.Embed)."""
  class M(nn.Module):
    @nn.compact
    def __call__(self, tok):
      x = nn.Embed(20, 8)(tok).mean(axis=1)
      return nn.Dense(3)(nn.tanh(nn.Dense(6, name="hid")(x)))

  tok = jnp.asarray(R.integers(0, 20, size=(8, 5)))
  m = M()
  p = m.init(jax.random.key(0), tok)
  t = jaxprune.trace(m.apply, p, tok)
  y = jnp.argmax(m.apply(p, tok), -1)
  assert float(jaxprune.evaluate(t, p, tok, y)["accuracy"]) == 1.0
  res = jaxprune.ga.search(t, p, tok, y, "hid", key=jax.random.key(0), progress=False,
                           config=jaxprune.ga.GAConfig(population_size=6, hof_size=2,
                                                       generations=2))
  assert res.mask.shape == (6,)
  new, _ = jaxprune.fit(t, p, tok, y, key=jax.random.key(1), epochs=1, progress=False)
  assert jax.tree.structure(new) == jax.tree.structure(p)


def _pooled(pool):
  def fn(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])                  # (B, T, units)
    return pool(h) @ p["w2"] + p["b2"]
  return fn


_POOLS = {  # how the consumer reads the units; whether a constant unit reaches it unchanged
    "mean over time": (lambda h: h.mean(1), True),
    "max over time": (lambda h: h.max(1), True),
    "last step": (lambda h: h[:, -1], True),
    "average pooling, no padding": (
        lambda h: nn.avg_pool(h, (2,), (1,), "VALID").mean(1), True),
    "sum over time": (lambda h: h.sum(1), False),
    "zero pad, then mean": (lambda h: jnp.pad(h, ((0, 0), (1, 1), (0, 0))).mean(1), False),
    "average pooling counting its padding": (
        lambda h: nn.avg_pool(h, (3,), (1,), "SAME").mean(1), False),
    "scaled": (lambda h: 2.0 * h.max(1), False),
    "mean, keepdims": (lambda h: h.mean(1, keepdims=True)[:, 0], True),
    "(1 / T) * sum": (lambda h: (1 / 5) * h.sum(1), True),
    "causal zeros, concatenated": (
        lambda h: jnp.concatenate([jnp.zeros_like(h[:, :2]), h], 1).mean(1), False),
    "sigmoid attention weights": (
        lambda h: (jax.nn.sigmoid(jnp.arange(25.0).reshape(5, 5) / 9 - 1) @ h)[:, 0], False),
}


@pytest.mark.parametrize("case", sorted(_POOLS))
def test_constant_folds_only_through_ops_that_pass_a_constant_on(case):
  """A constant unit is folded into the consumer's bias as the constant itself: exact through a
  mean, a max or a selection; not through a sum (the outputs moved by 0.23), a zero pad or an
  average counting padding (0.03-0.5), a scaling or attention weights that do not sum to 1
  (1.0), where the fold is now refused."""
  pool, exact = _POOLS[case]
  p = jax.tree.map(np.array, _ONE)
  p["w1"][:, 2] = 0.0
  fn, x = _pooled(pool), _arr(8, 5, 4)
  t = jaxprune.trace(fn, p, x)
  assert t.groups["w1"].exact_constant_fold == exact
  if not exact:
    with pytest.raises(ValueError, match="not known to pass a constant on"):
      jaxprune.distinctiveness(t, "w1")
    return
  new, um, _ = jaxprune.distinctiveness(t, "w1", similar=False, complementary=False)(
      p, jaxprune.unit_masks_ones(t), t.activations(p, x, "w1"))
  assert np.flatnonzero(~np.asarray(um["w1"])).tolist() == [2]
  np.testing.assert_allclose(fn(new, x), fn(p, x), atol=1e-5)


def test_transposed_conv_with_a_flipped_kernel_is_a_producer():
  """ConvTranspose(transpose_kernel=True) flips its kernel (rev) before the convolution: the
  kernel was taken for a computed value, so activations raised a bare KeyError and the weight
  pruners found no kernel."""
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.ConvTranspose(4, (3, 3), padding="VALID", transpose_kernel=True,
                                   name="up")(x))
      return nn.Dense(2)(h.reshape(h.shape[0], -1))

  x = _arr(3, 4, 4, 2)
  m = M()
  p = m.init(jax.random.key(1), x)
  t = jaxprune.trace(m.apply, p, x)
  kinds = {s.path[-1]: s.kind for s in t.groups["up"].producers}
  assert kinds == {"kernel": "kernel", "bias": "bias"}
  acts = t.activations(p, x, "up")
  assert acts.shape == (3, 6, 6, 4)
  jaxprune.importance_prune(t, "up")(p, jaxprune.unit_masks_ones(t), 1)
  _compact_equals_masked(t, p, _arr(5, 4, 4, 2), m.apply, {"up": [1]})


@pytest.mark.parametrize("reader,why", [
    (lambda: nn.Conv(3, (3, 3), padding="SAME", name="next"),
     r"its consumer params/next/kernel reads it through a zero-padded \('SAME'\) convolution"),
    (lambda: nn.ConvTranspose(3, (3, 3), strides=(2, 2), padding="VALID", name="next"),
     r"its consumer params/next/kernel reads it through an input-dilated \(transposed\) "
     r"convolution"),
    # a stride-1 transposed conv pads by kernel - 1: it was called a 'SAME' convolution
    (lambda: nn.ConvTranspose(3, (3, 3), padding="VALID", name="next"),
     r"its consumer params/next/kernel reads it through a convolution whose zero padding "
     r"makes its output larger than its input \(a transposed convolution, 'VALID' included"),
    (lambda: nn.Conv(3, (3, 3), padding=((1, 0), (0, 2)), name="next"),
     r"its consumer params/next/kernel reads it through a zero-padded convolution \(padding "
     r"\(\(1, 0\), \(0, 2\)\)\)"),
])
def test_refused_folds_name_the_reader_and_what_it_is(reader, why):
  """A fold that cannot be exact is refused with the consumer that stops it and why, not a list
  of every possible cause."""
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Conv(4, (1, 1), name="c")(x))
      h = reader()(h)
      return nn.Dense(2)(h.reshape(h.shape[0], -1))

  x = _arr(2, 5, 5, 2)
  m = M()
  p = m.init(jax.random.key(1), x)
  t = jaxprune.trace(m.apply, p, x)
  for make in (lambda: jaxprune.distinctiveness(t, "c"),
               lambda: jaxprune.group_redundancy(t, "c")):
    with pytest.raises(ValueError, match=why) as e:
      make()
    assert "recurrence" not in str(e.value)


@pytest.mark.parametrize("pad", ["REFLECT", "CIRCULAR", "symmetric"])
def test_constants_fold_exactly_through_reflect_and_circular_padding(pad):
  """Reflect padding copies values of the map itself, so a constant channel stays that
  constant, as circular padding does; it was refused as 'an op that does not pass a constant
  on unchanged' (the flipped pieces, computed inside a call, were reached after the
  concatenation that joins them). Zeros concatenated as padding are still refused."""
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Conv(4, (3, 3), padding="VALID", name="c")(x))
      if pad == "symmetric":
        h = nn.Conv(3, (3, 3), padding="VALID", name="next")(
            jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="symmetric"))
      else:
        h = nn.Conv(3, (3, 3), padding=pad, name="next")(h)
      return nn.Dense(2)(h.reshape(h.shape[0], -1))

  x = _arr(4, 8, 8, 2)
  m = M()
  v = m.init(jax.random.key(1), x)
  v["params"]["c"]["kernel"] = v["params"]["c"]["kernel"].at[..., 2].set(0.0)
  v["params"]["c"]["bias"] = v["params"]["c"]["bias"].at[2].set(0.3)   # channel 2: relu(0.3)
  t = jaxprune.trace(m.apply, v, x)
  assert t.groups["c"].exact_constant_fold
  new, um, _ = jaxprune.distinctiveness(t, "c", similar=False, complementary=False)(
      v, jaxprune.unit_masks_ones(t), t.activations(v, x, "c"))
  assert np.flatnonzero(~np.asarray(um["c"])).tolist() == [2]
  np.testing.assert_allclose(m.apply(new, x), m.apply(v, x), atol=1e-5)
  small, st = t.compact(new, um)
  np.testing.assert_allclose(st.apply(small, x), m.apply(new, x), atol=1e-5)


@pytest.mark.parametrize("case", ["scalar offset", "bias shared by heads", "(1, C) bias",
                                  "one output, scalar bias"])
def test_only_a_bias_with_a_value_per_output_takes_folded_constants(case):
  """A params value added after the consumer is its bias only when it holds a value for each
  output: a shared scalar offset, or one bias shared by every head, cannot take a removed
  unit's per-output contribution (it was folded into them, moving the outputs by 0.85), so
  folds are refused up front; a (1, C) bias, or a scalar for a single output, takes them
  exactly."""
  rng = np.random.default_rng(0)
  outs = 1 if case == "one output, scalar bias" else 4
  p = {"w1": rng.normal(size=(6, 10)).astype(np.float32), "b1": np.zeros(10, np.float32)}
  p["w1"][:, 2], p["b1"][2] = 0.0, 0.7                  # unit 2 is constant: tanh(0.7)
  if case == "bias shared by heads":
    p["w2"] = rng.normal(size=(10, 3, outs)).astype(np.float32)
    p["c"] = np.full((outs,), 0.3, np.float32)
    head = lambda p, h: jnp.einsum("bu,uho->bho", h, p["w2"]) + p["c"]
  else:
    p["w2"] = rng.normal(size=(10, outs)).astype(np.float32)
    p["c"] = np.full((1, outs) if case == "(1, C) bias" else (), 0.3, np.float32)
    head = lambda p, h: h @ p["w2"] + p["c"]

  def f(p, x):
    return jnp.tanh(head(p, jnp.tanh(x @ p["w1"] + p["b1"])))

  x = _arr(60, 6)
  t = jaxprune.trace(f, p, x)
  um = jaxprune.unit_masks_ones(t)
  acts = t.activations(p, x, "w1")
  exact = case in ("(1, C) bias", "one output, scalar bias")
  assert t.groups["w1"].exact_constant_fold == exact
  if not exact:
    for make in (lambda: jaxprune.distinctiveness(t, "w1"),
                 lambda: jaxprune.group_redundancy(t, "w1")):
      with pytest.raises(ValueError, match="its consumer w2 adds no bias with a value for each"):
        make()
    return
  new, um2, _ = jaxprune.distinctiveness(t, "w1", similar=False, complementary=False)(
      p, um, acts)
  assert np.flatnonzero(~np.asarray(um2["w1"])).tolist() == [2]
  np.testing.assert_allclose(f(new, x), f(p, x), atol=1e-6)
  new, um3, _ = jaxprune.group_redundancy(t, "w1")(p, um, acts, 1e-4)
  assert not bool(um3["w1"][2])
  np.testing.assert_allclose(f(new, x), f(p, x), atol=1e-5)


@pytest.mark.parametrize("mode", ["edge", "reflect", "wrap", "constant"])
def test_padding_modes_between_layers_trace(mode):
  """jnp.pad's 'edge' mode concatenates zero-width pieces (slices of every axis broadcast to
  size 0), which made trace fail with an IndexError, and then left the group unprunable (the
  unused slices of the units read as cuts). They hold nothing and are skipped: every mode
  gives a group whose compacted network computes the masked one's outputs."""
  rng = np.random.default_rng(0)
  p = {"w1": rng.normal(size=(4, 6)).astype(np.float32), "b1": np.zeros(6, np.float32),
       "w2": rng.normal(size=(6, 3)).astype(np.float32)}

  def f(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return (jnp.pad(h, ((0, 0), (1, 1), (0, 0)), mode=mode) @ p["w2"]).mean(1)

  x = _arr(5, 7, 4)
  t = jaxprune.trace(f, p, x)
  assert t.groups["w1"].size == 6
  um = {"w1": np.array([1, 0, 1, 1, 0, 1], bool)}
  small, st = t.compact(p, um)
  masked = jaxprune.apply_masks(p, jaxprune.expand(p, t, um))
  np.testing.assert_allclose(st.apply(small, x), f(masked, x), atol=1e-5)


def test_dropout_mask_from_a_fixed_key_at_another_batch_size_says_why():
  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dropout(0.5, deterministic=False)(nn.relu(nn.Dense(6)(x)))
      return nn.Dense(2)(nn.relu(nn.Dense(5)(h)))

  m, x = M(), _arr(4, 3)
  p = m.init(jax.random.key(1), x)
  t = jaxprune.trace(lambda p, x: m.apply(p, x, rngs={"dropout": jax.random.key(3)}), p, x)
  assert [g.size for g in t.groups.values()] == [5]   # the 6 units meet the fixed mask
  small, small_target = t.compact(p, jaxprune.unit_masks_ones(t))
  with pytest.raises(jaxprune.TraceError, match="dropout mask drawn from a fixed key"):
    small_target.apply(small, _arr(7, 3))


def test_ga_fast_path_on_a_gelu_layer_scores_the_masked_network():
  """With the activations at gelu's output, the GA's one-product fast path applies to a gelu
  layer, and the accuracy it reports is that of the masked network."""
  fn, x = _one_layer(jax.nn.gelu), _arr(64, 4)
  y = jnp.argmax(fn(_ONE, x) + 0.3 * _arr(64, 3), -1)
  t = jaxprune.trace(fn, _ONE, x)
  assert jaxprune.ga.fast_path_applies(t, "w1")
  res = jaxprune.ga.search(t, _ONE, x, y, "w1", key=jax.random.key(0), progress=False,
                           config=jaxprune.ga.GAConfig(population_size=10, hof_size=2,
                                                       generations=4))
  um = {"w1": jnp.asarray(res.mask, bool)}
  masked = jaxprune.apply_masks(_ONE, jaxprune.expand(_ONE, t, um))
  assert float(res.accuracy) == pytest.approx(float(jnp.mean(jnp.argmax(fn(masked, x), -1) == y)))


def test_linear_folds_are_refused_through_max_pooling():
  """A max passes a constant unit on but not a linear combination of units: group redundancy
  (and distinctiveness' fold) moved the outputs through a max over time, so they refuse it;
  constants still fold, and a mean keeps all three."""
  w1 = np.array(_ONE["w1"])
  w1[:, 4] = w1[:, 0] + 0.5 * w1[:, 1]                   # unit 4 = unit 0 + 0.5 unit 1
  p = dict(_ONE, w1=jnp.asarray(w1), b1=jnp.zeros(6))

  def fn(pool):
    return lambda p, x: pool(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

  x = _arr(16, 5, 4)
  t = jaxprune.trace(fn(lambda h: h.max(1)), p, x)
  g = t.groups["w1"]
  assert g.exact_constant_fold and not g.exact_linear_fold
  assert [s.max_pooled for s in g.consumers] == [True]
  with pytest.raises(ValueError, match="max pooling"):
    jaxprune.group_redundancy(t, "w1")
  with pytest.raises(ValueError, match="Pass fold=False"):
    jaxprune.distinctiveness(t, "w1", fold=True)
  jaxprune.distinctiveness(t, "w1")                      # constants still fold exactly
  mean = fn(lambda h: h.mean(1))
  t = jaxprune.trace(mean, p, x)
  assert t.groups["w1"].exact_linear_fold
  new, um, _ = jaxprune.group_redundancy(t, "w1")(p, jaxprune.unit_masks_ones(t),
                                                  t.activations(p, x, "w1"), 1e-4, 1)
  assert int((~np.asarray(um["w1"])).sum()) == 1
  np.testing.assert_allclose(mean(new, x), mean(p, x), atol=1e-4)


def test_review_cases_of_the_activation_analysis():
  """Cases an independent review of the activation analysis found (each failed before)."""
  x = _arr(16, 4)
  # A reader of h placed before relu(h) in program order: still two reading points.
  def rev_order(p, x):
    h = x @ p["w1"] + p["b1"]
    y3 = h @ p["w3"]
    return jax.nn.relu(h) @ p["w2"] + y3
  t = jaxprune.trace(rev_order, dict(_ONE, w3=_arr(6, 3)), x)
  assert not t.activations_complete("w1")
  # A layer inside a jitted call, its nonlinearity outside: activations after the sigmoid.
  dense = jax.jit(lambda w, b, h: h @ w + b)
  outside = lambda p, x: jax.nn.sigmoid(dense(p["w1"], p["b1"], x)) @ p["w2"] + p["b2"]
  t = jaxprune.trace(outside, _ONE, x)
  assert t.groups["w1"].activation == "sigmoid" and t.activations_complete("w1")
  np.testing.assert_allclose(t.activations(_ONE, x, "w1"),
                             jax.nn.sigmoid(x @ _ONE["w1"] + _ONE["b1"]), atol=1e-6)
  # A cast to bfloat16 before the sigmoid keeps the tag (the tolerance is the narrowest dtype's).
  bf = lambda p, x: jax.nn.sigmoid((x @ p["w1"] + p["b1"]).astype(jnp.bfloat16)).astype(
      jnp.float32) @ p["w2"] + p["b2"]
  assert jaxprune.trace(bf, _ONE, x).groups["w1"].activation == "sigmoid"
  # An integer chain (a quantised layer) traces.
  q = lambda p, x: jnp.maximum(jax.lax.dot(x, p["w1"], preferred_element_type=jnp.int32),
                               0).astype(jnp.float32) @ p["w2"]
  pq = {"w1": jnp.asarray(R.integers(-3, 3, (4, 6)), jnp.int8), "w2": _arr(6, 3)}
  t = jaxprune.trace(q, pq, jnp.asarray(R.integers(-3, 3, (8, 4)), jnp.int8))
  assert t.groups["w1"].activation == "relu"
  # A clip at 20 is not a relu; a scalar temperature makes act(bias) wrong for weight folds.
  clip = lambda p, x: jnp.clip(x @ p["w1"] + p["b1"], 0.0, 20.0) @ p["w2"] + p["b2"]
  assert jaxprune.trace(clip, _ONE, x).groups["w1"].activation == "other"
  temp = lambda p, x: jax.nn.sigmoid((x @ p["w1"] + p["b1"]) * p["s"]) @ p["w2"] + p["b2"]
  t = jaxprune.trace(temp, dict(_ONE, s=jnp.float32(2.0)), x)
  assert t.groups["w1"].activation == "sigmoid" and not t.groups["w1"].act_of_bias
  with pytest.raises(ValueError, match="a scale, a constant"):
    jaxprune.weight_distinctiveness(t, "w1")


def test_tied_embedding_table_is_not_a_group():
  """Gathering whole rows of a parameter table (nn.Embed) does not pass the table's feature
  axis through: a tied embedding (emb.attend) made a group whose merge moved the outputs by
  0.24."""
  class Tied(nn.Module):
    @nn.compact
    def __call__(self, tok):
      emb = nn.Embed(20, 8)
      h = nn.relu(nn.Dense(16)(emb(tok)))
      return emb.attend(nn.Dense(8)(h).mean(1))

  tok = jnp.asarray(R.integers(0, 20, size=(6, 5)))
  m = Tied()
  p = m.init(jax.random.key(0), tok)
  t = jaxprune.trace(m.apply, p, tok)
  assert [g.size for g in t.groups.values()] == [16]


def test_an_embedding_s_features_are_units_with_the_table_as_their_kernel():
  """A lookup in a table is a product with one-hot rows: the features of nn.Embed (and of a
  position table looked up with arange, added to it) are one group whose kernels are the
  tables' columns, so compaction cuts them and the next kernel's rows, exactly, and the weight
  pruners read the columns as incoming weights. It used to be no group (the table's axes were
  opaque). A tied table (attend) stays refused, whichever use comes first."""
  class Bag(nn.Module):
    attend_first: bool = False

    @nn.compact
    def __call__(self, tok):
      emb = nn.Embed(20, 6, name="tok")
      if self.attend_first:                         # logits read through the same table
        tied = emb.attend(jnp.tanh(jnp.repeat(tok[:, :1], 6, 1).astype(jnp.float32)))[:, :3]
      e = emb(tok)
      e = (e + nn.Embed(tok.shape[1], 6, name="pos")(jnp.arange(tok.shape[1]))).mean(1)
      out = nn.Dense(3, name="head")(nn.tanh(nn.Dense(5, name="hid")(e)))
      return out + tied if self.attend_first else out

  tok = jnp.asarray(R.integers(0, 20, size=(6, 5)))
  m = Bag()
  p = m.init(jax.random.key(0), tok)
  t = jaxprune.trace(m.apply, p, tok)
  assert {n: g.size for n, g in t.groups.items()} == {"tok": 6, "hid": 5}
  assert {(s.path[-2:], s.axis, s.role) for s in t.groups["tok"].slices} == {
      (("tok", "embedding"), 1, "producer"), (("pos", "embedding"), 1, "producer"),
      (("hid", "kernel"), 0, "consumer")}
  p2, um, _ = jaxprune.importance_prune(t, "tok")(p, jaxprune.unit_masks_ones(t), 2)
  norms = np.linalg.norm(np.concatenate([np.asarray(p["params"]["tok"]["embedding"]),
                                         np.asarray(p["params"]["pos"]["embedding"])]), axis=0)
  assert np.asarray(um["tok"]).tolist() == (norms > np.sort(norms)[1]).tolist()
  small, small_t = t.compact(p2, um)
  assert small["params"]["pos"]["embedding"].shape == (5, 4)
  for tt in (tok, jnp.asarray(R.integers(0, 20, size=(9, 5)))):
    np.testing.assert_allclose(small_t.apply(small, tt), m.apply(p2, tt), atol=1e-5)
  with pytest.raises(ValueError, match="looked up in a parameter table"):
    t.activations(p, tok, "tok")
  tied = Bag(attend_first=True)
  t = jaxprune.trace(tied.apply, tied.init(jax.random.key(0), tok), tok)
  assert "tok" not in t.groups
  assert "tied weights: one kernel axis (params/tok/embedding)" in t.explain()


def test_a_kernel_gathered_from_a_param_names_the_gather_alone():
  """``x @ w[idx].T``: the reason names the ops that compute the kernel (by gather), not jnp's
  index arithmetic on idx (it read 'by lt, add, select_n, gather')."""
  p = {"w": jnp.ones((4, 5)), "w2": jnp.ones((4, 2))}
  idx = np.array([2, 0, 1, 3])
  t = jaxprune.trace(lambda p, x: jnp.tanh(x @ p["w"][idx].T) @ p["w2"], p, jnp.ones((3, 5)))
  assert "computed from params (by gather)," in t.explain()


def test_activation_tags_of_float16_layers_and_float_literals_without_warnings():
  """The 64-point grid reaches +-1e6, which overflows float16, and a literal 2.0 in a float32
  op is a float32 operand: identifying the nonlinearity raises no warning (the suite turns
  warnings into errors) and tags a float16 sigmoid as one."""
  for dt in (jnp.float32, jnp.float16, jnp.bfloat16):
    p = {"w1": jnp.ones((3, 4), dt) * jnp.arange(4, dtype=dt), "w2": jnp.ones((4, 2), dt)}
    x = jnp.ones((5, 3), dt)
    sig = jaxprune.trace(lambda p, x: jax.nn.sigmoid(x @ p["w1"]) @ p["w2"], p, x)
    assert sig.groups["w1"].activation == "sigmoid", dt
    two = jaxprune.trace(lambda p, x: jnp.power(2.0, x @ p["w1"]) @ p["w2"], p, x)
    assert two.groups["w1"].activation == "other", dt


def test_weight_distinctiveness_incoming_without_constants_on_gelu_and_multi_axis_bias():
  """constants=False needs no constant output act(bias): a gelu layer and a DenseGeneral whose
  units each have several biases prune from incoming weights; with constants=True both are
  refused with errors that name constants=False (the 2-D bias was a bare reshape TypeError)."""

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.gelu(nn.Dense(16, name="fc")(x))
      g = nn.relu(nn.DenseGeneral((2, 4), name="heads")(x))
      return nn.Dense(3, name="out")(h) + nn.DenseGeneral(3, axis=(-2, -1), name="out2")(g)

  x = jax.random.normal(jax.random.key(0), (32, 5))
  params = M().init(jax.random.key(1), x)
  fc = params["params"]["fc"]
  # unit 5 duplicates unit 2 from incoming weights: the sweep merges it
  params["params"]["fc"] = {"kernel": fc["kernel"].at[:, 5].set(fc["kernel"][:, 2]),
                            "bias": fc["bias"].at[5].set(fc["bias"][2])}
  t = jaxprune.trace(M().apply, params, x)
  ones = jaxprune.unit_masks_ones(t)
  _, masks, _ = jaxprune.weight_distinctiveness(t, "fc", source="incoming", constants=False)(
      params, ones, 1.0, 180.0)
  assert not bool(masks["fc"][5]) and bool(masks["fc"][2])
  jaxprune.weight_distinctiveness(t, "heads", source="incoming", constants=False)(
      params, ones, 30.0, 150.0)
  for name in ("fc", "heads"):
    with pytest.raises(ValueError, match="constants=False"):
      jaxprune.weight_distinctiveness(t, name, source="incoming", constants=True)(
          params, ones, 30.0, 150.0)


def test_constant_unit_folds_into_a_one_output_head():
  """A Dense(1) regression head: a constant hidden unit folds into its (1,) bias exactly (the
  size-1 output axis was dropped on the bias's side only, so every fold, and distinctiveness even
  with constants=False, was refused)."""

  class Regressor(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1, name="out")(nn.tanh(nn.Dense(8, name="hidden")(x)))

  x = jax.random.normal(jax.random.key(0), (32, 4))
  params = Regressor().init(jax.random.key(2), x)
  hid = params["params"]["hidden"]
  params["params"]["hidden"] = {"kernel": hid["kernel"].at[:, 3].set(0.0),
                                "bias": hid["bias"].at[3].set(0.7)}   # unit 3 outputs tanh(0.7)
  t = jaxprune.trace(Regressor().apply, params, x)
  acts = t.activations(params, x, "hidden")
  new, masks, _ = jaxprune.distinctiveness(t, "hidden", similar=False, complementary=False)(
      params, jaxprune.unit_masks_ones(t), acts, 15.0, 165.0)
  assert np.asarray(masks["hidden"]).tolist() == [True] * 3 + [False] + [True] * 4
  np.testing.assert_allclose(Regressor().apply(new, x), Regressor().apply(params, x), atol=1e-5)
  jaxprune.distinctiveness(t, "hidden", constants=False)(
      params, jaxprune.unit_masks_ones(t), acts, 15.0, 165.0)


def test_constant_channel_folds_into_a_vector_readout_of_a_flattened_map():
  """``h.reshape(n, -1) @ w + b`` with w a vector and b a scalar: the view's last axis is the
  map's positions, not outputs, and the fold was refused ("bias of shape () does not match")."""
  def fn(p, x):
    y = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.sigmoid(y + p["kb"])
    return h.reshape(h.shape[0], -1) @ p["w"] + p["b"]

  rng = np.random.default_rng(0)
  k, kb = rng.normal(size=(3, 3, 2, 5)), rng.normal(size=5)
  k[..., 2], kb[2] = 0.0, 0.4                                   # channel 2 is sigmoid(0.4)
  p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32),
                   {"k": k, "kb": kb, "w": rng.normal(size=80), "b": np.zeros(())})
  x = host_f32(rng.normal(size=(20, 6, 6, 2)))
  t = jaxprune.trace(fn, p, x)
  new, masks, _ = jaxprune.distinctiveness(t, "k")(p, jaxprune.unit_masks_ones(t),
                                                     t.activations(p, x, "k"))
  np.testing.assert_array_equal(masks["k"], [True, True, False, True, True])
  assert new["b"].shape == ()
  np.testing.assert_allclose(t.apply(new, x), t.apply(p, x), atol=5e-6)


@pytest.mark.parametrize("layout", ["members_first", "transposed"])
def test_constant_unit_folds_into_a_batched_ensemble_head(layout):
  """A shared hidden layer read by a vmapped ensemble of heads (kernel (members, in, out), bias
  (members, out)): the contraction's outputs were recorded as (out, members), so the fold
  compared (3, 5) with the (5, 3) bias and every fold was refused with advice (constants=False)
  distinctiveness cannot honour. A transposed layout (bias (out, members)) folds too."""
  def f(p, x):
    h = jax.nn.sigmoid(x @ p["w1"] + p["b1"])
    hs = jnp.broadcast_to(h, (5,) + h.shape)
    if layout == "members_first":
      return jax.vmap(lambda k, b, a: a @ k + b)(p["w2"], p["b2"], hs)     # (5, N, 3)
    return jnp.einsum("enh,eho->noe", hs, p["w2"]) + p["b2"]               # (N, 3, 5)

  p = {"w1": _arr(4, 6).at[:, 2].set(0.0), "b1": _arr(6), "w2": _arr(5, 6, 3),
       "b2": _arr(5, 3) if layout == "members_first" else _arr(3, 5)}
  x = _arr(16, 4)
  t = jaxprune.trace(f, p, x)
  acts = t.activations(p, x, "w1")
  new, masks, _ = jaxprune.distinctiveness(t, "w1", similar=False, complementary=False)(
      p, jaxprune.unit_masks_ones(t), acts)
  assert np.asarray(masks["w1"]).tolist() == [True, True, False, True, True, True]
  np.testing.assert_allclose(f(new, x), f(p, x), atol=1e-5)
  new, masks, _ = jaxprune.group_redundancy(t, "w1")(p, jaxprune.unit_masks_ones(t), acts,
                                                     float("inf"), 1)
  assert not np.asarray(masks["w1"])[2]
  np.testing.assert_allclose(f(new, x), f(p, x), atol=1e-4)


def test_nnx_batch_statistics_closed_over_are_named_as_the_reason():
  """An nnx model split with nnx.Param alone closes over its BatchNorm statistics: every group
  is lost, and explain() said only 'a constant array'; it names the fix, which recovers them."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(6, 8, rngs=rngs)
      self.bn = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
      self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.bn(self.l1(x))))

  net, x = Net(nnx.Rngs(0)), _arr(8, 6)
  for split, groups in ((nnx.Param, set()), ((nnx.Param, nnx.BatchStat), {"l1"})):
    fn, p = nnx_as_function(net, split)
    t = jaxprune.trace(fn, p, x)
    assert set(t.groups) == groups
    if not groups:
      assert "nnx.BatchStat" in t.explain() and "closes over" in t.explain()


def _joined(p, x, piece):
  h = jax.nn.relu(x @ p["w1"] + p["b1"])
  one = {"input-column": x[:, :1], "ones-column": jnp.ones((x.shape[0], 1)),
         "scalar-head": h @ p["v"]}[piece]
  joined = jnp.concatenate([one, h] if piece == "input-column" else [h, one], -1)
  return joined @ p["w2"] + p["b2"]


@pytest.mark.parametrize("piece", ["input-column", "ones-column", "scalar-head"])
def test_a_one_unit_piece_joined_to_a_layer(piece):
  """A piece one unit wide in a concatenation with a group was dropped from the layout: the
  group was found, then activations and compact raised ('reads 9 concatenated units but its
  parts have 8') even on the unpruned params."""
  p = {"w1": _arr(10, 8), "b1": _arr(8), "w2": _arr(9, 3), "b2": _arr(3), "v": _arr(8, 1)}
  fn = lambda p, x: _joined(p, x, piece)
  x = _arr(16, 10)
  t = jaxprune.trace(fn, p, x)
  assert set(t.groups) == {"w1"}
  np.testing.assert_allclose(t.activations(p, x, "w1"), jax.nn.relu(x @ p["w1"] + p["b1"]),
                             atol=1e-6)
  small = _compact_equals_masked(t, p, x, fn, {"w1": [0, 4, 7]})
  assert small["w1"].shape == (10, 5) and small["w2"].shape == (6, 3)


def test_grayscale_input_skip_into_a_conv_and_a_shift_along_time():
  class UNet(nn.Module):     # a U-Net style skip: the 1-channel image joins the features
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Conv(6, (3, 3))(x))
      h = nn.relu(nn.Conv(5, (3, 3))(jnp.concatenate([h, x], -1)))
      return nn.Dense(3)(h.reshape(h.shape[0], -1))
  x = _arr(2, 8, 8, 1)
  v = UNet().init(jax.random.key(0), x)
  t = jaxprune.trace(UNet().apply, v, x)
  assert set(t.groups) == {"Conv_0", "Conv_1"}
  small = _compact_equals_masked(t, v, x, UNet().apply, {"Conv_0": [1, 5], "Conv_1": [0]})
  assert small["params"]["Conv_1"]["kernel"].shape == (3, 3, 5, 4)

  def shifted(p, x):          # (B, T, F): each step sees the previous step's units
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    return jnp.concatenate([jnp.zeros_like(h[:, :1]), h[:, :-1]], 1) @ p["w2"]
  p = {"w1": _arr(4, 6), "b1": _arr(6), "w2": _arr(6, 3)}
  x = _arr(2, 5, 4)
  t = jaxprune.trace(shifted, p, x)
  _compact_equals_masked(t, p, x, shifted, {"w1": [2]})


def test_tied_autoencoder_says_its_weights_are_tied():
  """h = sigmoid(x W + b), y = h W.T + c: W's unit axis produces and reads the units. It is not
  a group, and the reason said 'no kernel reads these units', which is false."""
  p = {"W": _arr(6, 4), "b": jnp.zeros(4), "c": jnp.zeros(6)}
  t = jaxprune.trace(lambda p, x: jax.nn.sigmoid(x @ p["W"] + p["b"]) @ p["W"].T + p["c"], p,
                     _arr(8, 6))
  assert not t.groups
  line = next(s for s in t.explain().splitlines() if s.startswith("W "))
  assert "axis 1 -> not prunable (tied weights" in line and "no kernel reads" not in line


def test_target_traced_on_nnx_state_reads_the_plain_arrays_too():
  """Its paths end in a Variable's 'value' (l1/kernel/value); every entry point also reads the
  same tree of plain arrays (nnx.to_pure_dict, or the State nnx.Optimizer hands an optax
  transformation), with the same results (this was a KeyError)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  graph, state = nnx.split(nnx_sigmoid_mlp(0), nnx.Param)
  x = jax.random.normal(jax.random.key(0), (16, 8))
  target = jaxprune.trace(lambda s, x: nnx.merge(graph, s)(x), state, x)
  assert target.groups["l1"].slices[0].path[-1] == "value"
  pure = nnx.to_pure_dict(state)
  um = {"l1": jnp.arange(12) % 3 != 0}
  same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  same(jaxprune.expand(pure, target, um), nnx.to_pure_dict(jaxprune.expand(state, target, um)))
  small, _ = target.compact(pure, um)
  same(small, nnx.to_pure_dict(target.compact(state, um)[0]))
  assert small["l1"]["kernel"].shape == (8, 8)
  prune = jaxprune.importance_prune(target, "l1")
  p_pure, m_pure, _ = prune(pure, jaxprune.unit_masks_ones(target), 5)
  p_state, m_state, _ = prune(state, jaxprune.unit_masks_ones(target), 5)
  np.testing.assert_array_equal(m_pure["l1"], m_state["l1"])
  same(p_pure, nnx.to_pure_dict(p_state))
  assert isinstance(p_pure, dict) and int(np.sum(m_pure["l1"])) == 7


def _three_dense():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Dense(16, name="a")(x))
      return nn.Dense(4, name="c")(nn.sigmoid(nn.Dense(12, name="b")(h)))
  net = Net()
  x = _arr(8, 10)
  return net, net.init(jax.random.key(0), x), x


def test_params_of_another_dtype_are_named_and_inputs_are_cast():
  """The traced program runs at the example's dtypes: bf16 params on a float32 trace used to
  fail with lax's 'add requires arguments to have the same dtypes', or (at another batch size)
  with an error blaming a dropout mask; now the leaf and both dtypes are named. Inputs of
  another numeric dtype are cast, as x @ w would promote them."""
  net, v, x = _three_dense()
  t = jaxprune.trace(net.apply, v, x)
  bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), v)
  for xx in (x, _arr(32, 10)):
    with pytest.raises(TypeError, match=r"params\['params'\]\['a'\]\['bias'\] is bfloat16 but "
                                        r"this target was traced with float32.*a\.astype"):
      t.activations(bf16, xx, "a")
  want = t.activations(v, x[:5], "a")
  for dtype in (np.float64, np.float16, np.int32):
    xx = np.asarray(x[:5]).astype(dtype)
    np.testing.assert_allclose(t.activations(v, xx, "a"),
                               t.activations(v, jnp.asarray(xx.astype(np.float32)), "a"),
                               rtol=1e-6)
  np.testing.assert_allclose(t.activations(v, np.asarray(x[:5], np.float64), "a"), want,
                             rtol=1e-6)

  def embed(p, tokens):
    return jnp.take(p["emb"], tokens, axis=0).sum(1) @ p["w"]
  pe = {"emb": _arr(20, 6), "w": _arr(6, 3)}
  te = jaxprune.trace(embed, pe, jnp.zeros((4, 5), jnp.int32))
  small, st = te.compact(pe, jaxprune.unit_masks_ones(te))   # runs the traced program
  assert st.apply(small, jnp.zeros((2, 5), jnp.int32)).shape == (2, 3)
  with pytest.raises(TypeError, match="input 0 is float32 but this target was traced with int32"):
    st.apply(small, jnp.zeros((4, 5), jnp.float32))


def test_params_that_do_not_fit_name_the_leaf_and_where_the_size_comes_from():
  net, v, x = _three_dense()
  t = jaxprune.trace(net.apply, v, x)
  wide = {"params": {**v["params"], "a": {"kernel": _arr(11, 16), "bias": _arr(16)}}}
  um = jaxprune.unit_masks_ones(t)
  with pytest.raises(ValueError, match=r"input 0 \(the example's shape.*has size 10 on axis 1, "
                                       r"where the computation needs 11, the size that "
                                       r"params\['params'\]\['a'\]\['kernel'\] axis 0 gives"):
    t.compact(wide, um)
  um["b"] = um["b"].at[0].set(False)
  small, st = t.compact(v, um)
  assert st.apply(small, x[:3]).shape == (3, 4)
  with pytest.raises(ValueError, match=r"params\['params'\]\['b'\]\['bias'\] has size 12 on "
                                       r"axis 0, where the computation needs 11, this compacted "
                                       r"target's size \(pass the params compact\(\) returned"):
    st.apply(v, x[:3])


def _traced_mlp():
  def f(p, x):
    h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
    return h @ p["l2"]["w"] + p["l2"]["b"]
  p = {"l1": {"w": _arr(3, 6), "b": _arr(6)}, "l2": {"w": _arr(6, 2), "b": _arr(2)}}
  x = _arr(8, 3)
  return f, p, x, jaxprune.trace(f, p, x)


_OTHER_WIDTH = (r"params\['l1'\]\['b'\] has size 5 on axis 0, where the computation needs 6, "
                r"as traced\. Pass params of this target")


def test_an_uncompacted_traced_target_refuses_params_of_another_width():
  """t.apply on a target straight from trace called fn directly, so params of another width gave
  outputs; activations took them too (as (8, 5) activations)."""
  f, p, x, t = _traced_mlp()
  bad = {"l1": {"w": _arr(3, 5), "b": _arr(5)}, "l2": {"w": _arr(5, 2), "b": _arr(2)}}
  with pytest.raises(ValueError, match=_OTHER_WIDTH):
    t.apply(bad, x)
  with pytest.raises(ValueError, match=_OTHER_WIDTH):
    t.activations(bad, x, "l1")
  with pytest.raises(ValueError, match=r"params\['l2'\]\['b'\] has size 3 on axis 0, where "
                                       r"the computation needs 2, as traced"):  # not a group
    t.apply({**p, "l2": {"w": _arr(6, 2), "b": _arr(3)}}, x)
  with pytest.raises(ValueError, match="Expected params and inputs with 5 array leaves"):
    t.apply(p, x, x)
  np.testing.assert_allclose(t.apply(p, x[:3]), f(p, x[:3]), rtol=1e-6)
  half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)     # dtypes: as fn takes them
  assert t.apply(half, x).dtype == f(half, x).dtype


def test_an_uncompacted_traced_target_refuses_inputs_of_other_non_batch_sizes():
  """An input of another width gave JAX's raw TypeError; another sequence length ran in apply
  while activations on it raised."""
  _, p, _, t = _traced_mlp()
  with pytest.raises(ValueError, match=r"Input 0 has shape \(8, 4\).*shaped \(N, 3\)"):
    t.apply(p, _arr(8, 4))

  def seq(p, x):                                  # x (N, T, 3); a mean over time
    return jnp.tanh(x @ p["w"] + p["b"]).mean(1) @ p["v"]
  q = {"w": _arr(3, 4), "b": _arr(4), "v": _arr(4, 2)}
  ts = jaxprune.trace(seq, q, _arr(4, 5, 3))
  np.testing.assert_allclose(ts.apply(q, _arr(2, 5, 3) * 0 + 1), seq(q, jnp.ones((2, 5, 3))),
                             rtol=1e-6)
  for call in (lambda x7: ts.apply(q, x7), lambda x7: ts.activations(q, x7, "w")):
    with pytest.raises(ValueError, match=r"Input 0 has shape \(4, 7, 3\).*shaped \(N, 5, 3\)"):
      call(_arr(4, 7, 3))


def test_an_uncompacted_traced_target_checks_shapes_under_jit_and_vmap():
  """The checks read shapes on the host, so apply still runs under jit and vmap (a population
  of params, a stack of batches: per example, the traced shapes), as the compacted one does."""
  f, p, x, t = _traced_mlp()
  np.testing.assert_allclose(jax.jit(t.apply)(p, x), f(p, x), rtol=1e-6)
  # A vmapped product is a batched matmul, which may sum in another order (on an AVX-512
  # machine one output near 0.013 of outputs up to 3.4 differed by 4.8e-7): float rounding.
  pop = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), p)
  np.testing.assert_allclose(jax.vmap(t.apply, (0, None))(pop, x)[1],
                             f(jax.tree.map(lambda a: 2 * a, p), x), rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(jax.vmap(t.apply, (None, 0))(p, jnp.stack([x, -x]))[1], f(p, -x),
                             rtol=1e-6, atol=1e-5)
  bad = {**p, "l1": {"w": _arr(3, 5), "b": _arr(5)}, "l2": {"w": _arr(5, 2), "b": _arr(2)}}
  with pytest.raises(ValueError, match=_OTHER_WIDTH):
    jax.jit(t.apply)(bad, x)
  with pytest.raises(ValueError, match=r"Input 0 has shape \(3,\)"):   # as the compacted one
    jax.vmap(t.apply, (None, 0))(p, x)


def test_dropout_in_training_mode_is_named_by_explain():
  """An nnx Dropout left in training mode ties its random mask to the hidden units: no group,
  and explain() used to say only 'used by bitcast_convert_type (not followed)'."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(8, 12, rngs=rngs)
      self.drop = nnx.Dropout(0.5, rngs=rngs)
      self.l2 = nnx.Linear(12, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(self.drop(nnx.relu(self.l1(x))))

  net = Net(nnx.Rngs(0))
  apply, params = nnx_as_function(net)
  t = jaxprune.trace(apply, params, _arr(4, 8))
  assert not t.groups
  assert "draws random numbers (random_bits)" in t.explain()
  assert "model.eval()" in t.explain().splitlines()[-1]
  net.eval()
  apply, params = nnx_as_function(net)
  t = jaxprune.trace(apply, params, _arr(4, 8))
  assert list(t.groups) == ["l1"] and "random" not in t.explain()


def test_batch_last_function_says_which_axis_was_taken_as_the_batch():
  f = lambda p, x: p["W2"] @ jax.nn.relu(p["W1"] @ x + p["b1"][:, None]) + p["b2"][:, None]
  p = {"W1": _arr(16, 10), "b1": _arr(16), "W2": _arr(3, 16), "b2": _arr(3)}
  t = jaxprune.trace(f, p, _arr(10, 8))
  small, st = t.compact(p, jaxprune.unit_masks_ones(t))
  np.testing.assert_allclose(st.apply(small, _arr(10, 8) * 0 + 1), f(p, jnp.ones((10, 8))),
                             rtol=1e-5)
  with pytest.raises(ValueError, match=r"shaped \(N, 8\).*The batch was read as axis 0 of this "
                                       r"input.*runs at the example's batch size only"):
    st.apply(small, _arr(10, 5))


def test_a_per_unit_parameter_after_the_activations_moves_them_or_refuses():
  """tanh(h.reshape(B, 5, 1) + b3.reshape(1, 5, 1)): the reshape ended the activation chain,
  so a per-unit shift acted after the reported activations. Two units with equal activations
  but different b3 were merged by distinctiveness (outputs off by 0.19) while the group said
  its activations were complete. The chain now follows a reshape that keeps the units on an
  axis of their own (activations after the shift and tanh); where it cannot go on (a mean over
  time before the shift; a layer applied to two inputs read apart), the group reports
  incomplete activations and is refused."""
  rng = np.random.default_rng(0)
  P = lambda *s: host_f32(rng.normal(size=s) * 0.5)
  x = jax.random.normal(jax.random.key(0), (64, 6))
  p = {"w1": P(6, 5), "b1": P(5), "b3": P(5), "w2": P(5, 3), "b2": P(3)}

  def shifted(p, x):
    h = jax.nn.sigmoid(x @ p["w1"] + p["b1"])
    o = jnp.tanh(h.reshape(h.shape[0], 5, 1) + p["b3"].reshape(1, 5, 1))
    return o.reshape(h.shape[0], 5) @ p["w2"] + p["b2"]

  t = jaxprune.trace(shifted, p, x)
  assert list(t.groups) == ["w1"] and t.activations_complete("w1")
  assert t.groups["w1"].activation == "tanh"
  dup = lambda p, j: dict(p, w1=p["w1"].at[:, 1].set(p["w1"][:, 0]),
                          b1=p["b1"].at[1].set(p["b1"][0]), b3=p["b3"].at[1].set(p["b3"][j]))
  for p2, merged in ((dup(p, 1), False), (dup(p, 0), True)):   # b3 differs / b3 equal too
    acts = t.activations(p2, x, "w1")
    np.testing.assert_allclose(acts.reshape(64, 5), shifted(dict(
        p2, w2=jnp.eye(5), b2=jnp.zeros(5)), x), atol=1e-6)
    new, um, _ = jaxprune.distinctiveness(t, "w1", complementary=False, constants=False)(
        p2, jaxprune.unit_masks_ones(t), acts, 1.0, 179.0)
    assert bool(um["w1"][1]) is not merged
    np.testing.assert_allclose(shifted(new, x), shifted(p2, x), atol=1e-5)
    _compact_equals_masked(t, new, x, shifted, {"w1": [1]} if merged else {})

  def pooled(p, x):                                  # x: (batch, steps, features)
    h = jax.nn.sigmoid(x @ p["w1"] + p["b1"])
    return jnp.tanh(h.mean(axis=1) + p["b3"]) @ p["w2"] + p["b2"]

  xs = jax.random.normal(jax.random.key(1), (32, 4, 6))
  t = jaxprune.trace(pooled, p, xs)
  assert list(t.groups) == ["w1"] and not t.activations_complete("w1")
  p2 = dup(p, 1)
  acts = t.activations(p2, xs, "w1")
  np.testing.assert_allclose(acts[..., 0], acts[..., 1])
  with pytest.raises(ValueError, match="other values than the activations"):
    jaxprune.distinctiveness(t, "w1", complementary=False, constants=False)(
        p2, jaxprune.unit_masks_ones(t), acts, 1.0, 179.0)
  with pytest.raises(ValueError, match="other values than the activations"):
    jaxprune.group_redundancy(t, "w1")(p2, jaxprune.unit_masks_ones(t), acts)
  new, um, _ = jaxprune.importance_prune(t, "w1")(p2, jaxprune.unit_masks_ones(t), 1)
  assert int(np.sum(um["w1"])) == 4

  def twice(p, x):                                   # one layer applied to two inputs, read apart
    f = lambda z: jax.nn.sigmoid(z @ p["w1"] + p["b1"])
    return f(x) @ p["w2"] + f(x * x) @ p["w3"] + p["b2"]

  t = jaxprune.trace(twice, dict(p, w3=P(5, 3)), x)
  assert list(t.groups) == ["w1"] and not t.activations_complete("w1")


def _weight_norm(w):
  return w / jnp.sqrt(jnp.sum(w * w, axis=0, keepdims=True) + 1e-12)


def _weight_normed_mlp(p, x):
  h = jax.nn.relu(x @ p["w1"] + p["b1"])
  g = jnp.tanh(h @ _weight_norm(p["w2"]) + p["b2"])
  return g @ p["w3"] + p["b3"]


def _weight_normed_by_hand(p, x, keep, merge=None):
  """The weight-normed MLP in NumPy with only the units ``keep`` of its middle layer; ``merge``
  (i, j): unit j's outgoing row added to unit i's first (distinctiveness' merge)."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  w3 = p["w3"].copy()
  if merge:
    w3[merge[0]] += w3[merge[1]]
  h = np.maximum(np.asarray(x, np.float64) @ p["w1"] + p["b1"], 0)
  w = p["w2"][:, keep]
  g = np.tanh(h @ (w / np.sqrt((w * w).sum(0, keepdims=True) + 1e-12)) + p["b2"][keep])
  return g @ w3[keep] + p["b3"], g


def test_weight_normed_kernel_has_activations_and_is_not_read_as_incoming_weights():
  """h @ (w2 / norm(w2, axis=0)): the group w2 was found, but activations() raised a bare
  KeyError ((), None) (no activation site: w2 is not the contraction's kernel operand itself,
  and its tag was 'linear' though a tanh follows). The contraction whose kernel is computed from
  w2 is now the group's site. w2's slices are not the units' incoming weights (a per-unit
  1 / norm scales them), so they are not kind 'kernel': importance would rank units by norms
  that the network never sees, and weight-based pruners refuse."""
  def repro(p, x):                                   # the probe's repro, no epsilon
    w = p["w2"] / jnp.linalg.norm(p["w2"], axis=0, keepdims=True)
    return jnp.tanh(jax.nn.relu(x @ p["w1"] + p["b1"]) @ w + p["b2"]) @ p["w3"] + p["b3"]
  rng = np.random.default_rng(0)
  P = lambda *s: host_f32(rng.normal(size=s))
  p = {"w1": P(5, 8), "b1": P(8), "w2": P(8, 6), "b2": P(6), "w3": P(6, 3), "b3": P(3)}
  x = P(64, 5)
  t = jaxprune.trace(repro, p, x)
  # (w1's units are a group too, read through w2 / ||w2|| over its rows: removal only)
  assert list(t.groups) == ["w1", "w2"] and t.activations_complete("w2")
  assert t.groups["w1"].read_by_products
  np.testing.assert_allclose(t.activations(p, x, "w2"),
                             _weight_normed_by_hand(p, x, list(range(6)))[1], atol=1e-5)

  t = jaxprune.trace(_weight_normed_mlp, p, x)
  g = t.groups["w2"]
  assert (g.kind, g.activation, g.act_of_bias) == ("dense", "tanh", False)
  assert [(s.path, s.kind) for s in g.producers] == [(("w2",), "scale"), (("b2",), "bias")]
  assert "w2 (8, 6): axis 0 -> group 'w1' (consumer, scale: the kernel it reads with" in t.explain()
  assert "group 'w2' (producer, scale: a kernel is computed from it (mul, reduce_sum" in t.explain()
  for prune, args in ((jaxprune.importance_prune(t, "w2"), (1,)),
                      (jaxprune.weight_distinctiveness(t, "w2", constants=False), (1.0, 179.0))):
    with pytest.raises(ValueError, match=r"no producer kernel slice .*of kind bias, scale\)\. "
                       r"Where the units' kernel is computed from params"):
      prune(p, jaxprune.unit_masks_ones(t), *args)
  with pytest.raises(ValueError, match="does not output act"):       # the constant rule
    jaxprune.weight_distinctiveness(t, "w2")


def test_weight_normed_duplicates_are_merged_from_activations():
  """The activation pruners now run on a weight-normed group: unit 3 has twice unit 1's raw
  weights (the same normed kernel) and its bias; distinctiveness merges it, and the result is
  the network without unit 3 whose outgoing row went to unit 1 (a NumPy forward pass)."""
  rng = np.random.default_rng(0)
  P = lambda *s: host_f32(rng.normal(size=s))
  p = {"w1": P(5, 8), "b1": P(8), "w2": P(8, 6), "b2": P(6), "w3": P(6, 3), "b3": P(3)}
  x = P(64, 5)
  t = jaxprune.trace(_weight_normed_mlp, p, x)
  w2, b2 = np.array(p["w2"]), np.array(p["b2"])
  w2[:, 3], b2[3] = 2.0 * w2[:, 1], b2[1]
  p2 = dict(p, w2=jnp.asarray(w2), b2=jnp.asarray(b2))
  acts = t.activations(p2, x, "w2")
  np.testing.assert_allclose(acts, _weight_normed_by_hand(p2, x, list(range(6)))[1], atol=1e-5)
  new, um, _ = jaxprune.distinctiveness(t, "w2", constants=False, complementary=False)(
      p2, jaxprune.unit_masks_ones(t), acts, 1.0, 179.0)
  assert np.flatnonzero(~np.asarray(um["w2"])).tolist() == [3]
  merged = _weight_normed_by_hand(p2, x, [0, 1, 2, 4, 5], merge=(1, 3))[0]
  np.testing.assert_allclose(merged, _weight_normed_by_hand(p2, x, list(range(6)))[0],
                             atol=1e-5)                  # an exact duplicate: nothing changes
  small, small_t = t.compact(new, um)
  np.testing.assert_allclose(small_t.apply(small, x), merged, atol=1e-5)
  np.testing.assert_allclose(small["w3"][1], p2["w3"][1] + p2["w3"][3], atol=1e-6)


def test_weight_standardised_conv_is_its_contractions_group():
  """A weight-standardised conv's kernel was listed as a 'stat', its group said kind 'dense'
  and activation 'linear' (the relu after it was missed), and activations() raised a bare
  KeyError. The group now takes its kind, nonlinearity and activations from the convolution
  that reads the computed kernel; its raw kernel is no incoming weights ('scale')."""
  class WSConv(nn.Module):                           # (w - mean) / std over (kh, kw, in)
    @nn.compact
    def __call__(self, x):
      w = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], 5))
      w = (w - w.mean((0, 1, 2), keepdims=True)) / (w.std((0, 1, 2), keepdims=True) + 1e-5)
      h = lax.conv_general_dilated(x, w, (1, 1), "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
      return h + self.param("bias", nn.initializers.normal(0.5), (5,))

  class WS(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Conv(4, (3, 3), padding="VALID", name="c1")(x))
      h = nn.relu(WSConv(name="ws")(x))
      return nn.Dense(3, name="out")(h.mean((1, 2)))

  from jax import lax
  x = _arr(6, 7, 7, 2)
  v = {"params": {"c1": {"kernel": _arr(3, 3, 2, 4), "bias": _arr(4)},
                  "ws": {"kernel": _arr(3, 3, 4, 5), "bias": _arr(5)},
                  "out": {"kernel": _arr(5, 3), "bias": _arr(3)}}}
  t = jaxprune.trace(WS().apply, v, x)
  assert list(t.groups) == ["ws"]   # the standardisation reduces over c1's channels
  g = t.groups["ws"]
  assert (g.kind, g.activation) == ("conv", "relu") and t.activations_complete("ws")
  assert [(s.path[-1], s.kind) for s in g.producers] == [("kernel", "scale"), ("bias", "bias")]
  pv = v["params"]
  w = np.asarray(pv["ws"]["kernel"], np.float64)
  w = (w - w.mean((0, 1, 2), keepdims=True)) / (w.std((0, 1, 2), keepdims=True) + 1e-5)
  h = jax.nn.relu(lax.conv_general_dilated(x, pv["c1"]["kernel"], (1, 1), "VALID",
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"))
                  + pv["c1"]["bias"])
  want = jax.nn.relu(lax.conv_general_dilated(h, jnp.asarray(w, jnp.float32), (1, 1), "VALID",
                                              dimension_numbers=("NHWC", "HWIO", "NHWC"))
                     + pv["ws"]["bias"])
  np.testing.assert_allclose(t.activations(v, x, "ws"), want, atol=1e-4)
  _compact_equals_masked(t, v, x, WS().apply, {"ws": [2]})
  with pytest.raises(ValueError, match="no producer kernel slice"):
    jaxprune.importance_prune(t, "ws")(v, jaxprune.unit_masks_ones(t), 1)


def test_linen_weight_norm_is_its_contractions_group():
  """nn.WeightNorm(nn.Dense): its kernel was listed as a 'scale' of a group with no activation
  site (activations() raised a bare KeyError) and tag 'linear' before a relu."""
  class WN(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.Dense(8, name="d1")(x))
      return nn.Dense(3, name="out")(nn.relu(nn.WeightNorm(nn.Dense(6), name="wn")(h)))

  x = _arr(64, 5)
  v = {"params": {"d1": {"kernel": _arr(5, 8), "bias": _arr(8)},
                  "Dense_0": {"kernel": _arr(8, 6), "bias": _arr(6)},
                  "wn": {"Dense_0/kernel/scale": _arr(6)},
                  "out": {"kernel": _arr(6, 3), "bias": _arr(3)}}}
  assert jax.tree.structure(v) == jax.tree.structure(jax.eval_shape(
      WN().init, jax.random.key(1), x))
  t = jaxprune.trace(WN().apply, v, x)
  (d1, name) = t.groups         # (d1's units are read through the kernel's norm over its rows)
  assert d1 == "d1" and t.groups[d1].read_by_products
  g = t.groups[name]
  assert (g.kind, g.activation) == ("dense", "relu") and t.activations_complete(name)
  assert [s.kind for s in g.producers] == ["scale", "scale", "bias"]
  pv = v["params"]
  vk, scale = pv["Dense_0"]["kernel"], pv["wn"]["Dense_0/kernel/scale"]
  h = jax.nn.relu(x @ pv["d1"]["kernel"] + pv["d1"]["bias"])
  kern = vk / jnp.sqrt(jnp.sum(vk * vk, 0) + 1e-12) * scale
  np.testing.assert_allclose(t.activations(v, x, name),
                             jax.nn.relu(h @ kern + pv["Dense_0"]["bias"]), atol=1e-5)
  _compact_equals_masked(t, v, x, WN().apply, {name: [1, 4]})


def test_a_kernel_times_a_constant_is_read_as_a_kernel():
  """x @ (w1 * 0.5) (an equalised learning rate): the kernel is w1 times a scalar, so w1's
  columns keep their angles and the order of their norms: w1 is kind 'kernel' and the
  weight-based pruners give what they give on the effective kernel (here they refused: no
  kernel slice; activations raised a bare KeyError)."""
  def scaled(p, x):
    return jnp.tanh(x @ (p["w1"] * 0.5) + p["b1"]) @ p["w2"] + p["b2"]

  def by_hand(p, x, keep, fold=None):
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    b2 = p["b2"] + (np.tanh(p["b1"][fold]) * p["w2"][fold] if fold is not None else 0.0)
    g = np.tanh(np.asarray(x, np.float64) @ (0.5 * p["w1"][:, keep]) + p["b1"][keep])
    return g @ p["w2"][keep] + b2, g

  rng = np.random.default_rng(1)
  P = lambda *s: host_f32(rng.normal(size=s))
  p = {"w1": P(5, 7), "b1": P(7), "w2": P(7, 3), "b2": P(3)}
  x = P(64, 5)
  t = jaxprune.trace(scaled, p, x)
  g = t.groups["w1"]
  assert [(s.path, s.kind) for s in g.producers] == [(("w1",), "kernel"), (("b1",), "bias")]
  assert g.activation == "tanh" and g.act_of_bias and t.activations_complete("w1")
  np.testing.assert_allclose(t.activations(p, x, "w1"), by_hand(p, x, range(7))[1], atol=1e-5)
  new, um, rep = jaxprune.importance_prune(t, "w1")(p, jaxprune.unit_masks_ones(t), 2)
  effective = np.sqrt(np.mean((0.5 * np.asarray(p["w1"])) ** 2, axis=0))
  removed = np.flatnonzero(~np.asarray(um["w1"])).tolist()
  assert removed == sorted(np.argsort(effective)[:2].tolist())
  np.testing.assert_allclose(scaled(new, x), by_hand(
      p, x, [k for k in range(7) if k not in removed])[0], atol=1e-5)
  w1 = np.array(p["w1"])
  w1[:, 4] = 0.0
  p0 = dict(p, w1=jnp.asarray(w1))                   # unit 4 outputs tanh(b1[4]): folded
  new, um, _ = jaxprune.weight_distinctiveness(t, "w1", similar=False, complementary=False)(
      p0, jaxprune.unit_masks_ones(t), 1.0, 179.0)
  assert np.flatnonzero(~np.asarray(um["w1"])).tolist() == [4]
  np.testing.assert_allclose(scaled(new, x), by_hand(p0, x, [0, 1, 2, 3, 5, 6], fold=4)[0],
                             atol=1e-5)


def test_a_gated_unit_is_tagged_other_not_linear():
  """silu(x W1) * (x W3) (SwiGLU) was tagged 'linear', which the docs give as no
  nonlinearity: a product with another layer's activations is 'other'. The folds are decided by
  the consumers as before (allowed from activations), the weight-based constant rule stays
  refused; a sum of kernels and batch statistics keep 'linear'."""
  def swiglu(p, x):
    return (jax.nn.silu(x @ p["w1"] + p["b1"]) * (x @ p["w3"] + p["b3"])) @ p["w2"] + p["b2"]

  rng = np.random.default_rng(2)
  P = lambda *s: host_f32(rng.normal(size=s))
  p = {"w1": P(5, 6), "b1": P(6), "w3": P(5, 6), "b3": P(6), "w2": P(6, 3), "b2": P(3)}
  x = P(64, 5)
  t = jaxprune.trace(swiglu, p, x)
  g = t.groups["w1"]
  assert g.activation == "other" and not g.act_of_bias and g.exact_linear_fold
  np.testing.assert_allclose(t.activations(p, x, "w1"), jax.nn.silu(x @ p["w1"] + p["b1"]) * (
      x @ p["w3"] + p["b3"]), atol=1e-5)
  jaxprune.distinctiveness(t, "w1", compensate=True)  # folds from activations: allowed, as before
  jaxprune.distinctiveness(t, "w1", fold=True)
  jaxprune.group_redundancy(t, "w1")
  with pytest.raises(ValueError, match="does not output act"):   # refused, as before
    jaxprune.weight_distinctiveness(t, "w1")

  def bilinear(p, x):
    return ((x @ p["w1"]) * (x @ p["w3"])) @ p["w2"]

  def summed(p, x):                      # two kernels summed: no gate
    return (x @ p["w1"] + p["b1"] + x @ p["w3"]) @ p["w2"]

  assert jaxprune.trace(bilinear, p, x).groups["w1"].activation == "other"
  assert jaxprune.trace(summed, p, x).groups["w1"].activation == "linear"


def test_activations_of_a_group_no_kernel_makes_say_why():
  """Units made by per-unit parameters alone, tanh(x.sum(1, keepdims=True) * a + b): no kernel
  contraction computes them, so there is no activation site; activations() raised a bare
  KeyError ((), None), now a ValueError naming the group and what to use instead."""
  def f(p, x):
    return jnp.tanh(x.sum(1, keepdims=True) * p["a"] + p["b"]) @ p["w"] + p["c"]

  p = {"a": _arr(6), "b": _arr(6), "w": _arr(6, 3), "c": _arr(3)}
  x = _arr(16, 5)
  t = jaxprune.trace(f, p, x)
  assert list(t.groups) == ["a"] and not t.activations_complete("a")
  with pytest.raises(ValueError, match="Group 'a' has no activations that trace can capture"):
    t.activations(p, x, "a")
  _compact_equals_masked(t, p, x, f, {"a": [1, 4]})


# -- a unit axis cut into equal parts: fused GLU and LSTM kernels --------------------------------

def _glu_split(p, x):          # one kernel for gate and value, cut in two (T5, PaLM-style MLPs)
  g, u = jnp.split(x @ p["wi"] + p["bi"], 2, axis=-1)
  return (jax.nn.silu(g) * u) @ p["wo"] + p["bo"]


def _glu_sliced(p, x):         # the same, cut by slicing
  h = x @ p["wi"] + p["bi"]
  n = h.shape[-1] // 2
  return (jax.nn.silu(h[:, :n]) * h[:, n:]) @ p["wo"] + p["bo"]


def _glu_params(d=5, h=6, o=3):
  return {"wi": _arr(d, 2 * h), "bi": _arr(2 * h), "wo": _arr(h, o), "bo": _arr(o)}


@pytest.mark.parametrize("fn", [_glu_split, _glu_sliced], ids=["split", "slices"])
def test_fused_glu_unit_i_owns_columns_i_and_h_plus_i(fn):
  """A fused GLU kernel (D, 2H) cut into gate and value: unit i is columns i and H + i of the
  kernel and the bias, and row i of the reader. Both were not prunable ('split by split')."""
  p, x = _glu_params(), _arr(16, 5)
  t = jaxprune.trace(fn, p, x)
  assert list(t.groups) == ["wi"]
  g = t.groups["wi"]
  assert g.size == 6 and g.activation == "other" and t.activations_complete("wi")
  assert {(s.path, s.role, s.kind) for s in g.slices} == {
      (("wi",), "producer", "kernel"), (("bi",), "producer", "bias"),
      (("wo",), "consumer", "kernel")}
  h = np.asarray(x @ p["wi"] + p["bi"])
  want = h[:, :6] / (1 + np.exp(-h[:, :6])) * h[:, 6:]            # silu(gate) * value
  np.testing.assert_allclose(t.activations(p, x, "wi"), want, rtol=1e-5, atol=1e-6)
  um = jaxprune.unit_masks_ones(t)
  um["wi"] = um["wi"].at[np.asarray([1, 4])].set(False)
  m = jaxprune.expand(p, t, um)
  keep = np.ones(12, bool)
  keep[[1, 4, 7, 10]] = False
  np.testing.assert_array_equal(np.asarray(m["wi"]), np.broadcast_to(keep, (5, 12)))
  np.testing.assert_array_equal(np.asarray(m["bi"]), keep)
  small = _compact_equals_masked(t, p, x, fn, {"wi": [1, 4]})
  np.testing.assert_array_equal(small["wi"], np.asarray(p["wi"])[:, keep])
  np.testing.assert_array_equal(small["wo"], np.asarray(p["wo"])[[0, 2, 3, 5]])
  xb = _arr(9, 5)                                    # another batch size, compacted sizes
  small_t = t.compact(jaxprune.apply_masks(p, m), um)[1]
  np.testing.assert_allclose(small_t.apply(small, xb), fn(jaxprune.apply_masks(p, m), xb),
                             atol=1e-5)


def _glu_param_split(p, x):    # the kernel cut before the product: w1, w2 = jnp.split(w, 2, 1)
  wg, wu = jnp.split(p["wi"], 2, axis=1)
  bg, bu = jnp.split(p["bi"], 2)
  return (jax.nn.silu(x @ wg + bg) * (x @ wu + bu)) @ p["wo"] + p["bo"]


def _glu_param_sliced(p, x):   # the same, by slicing the params
  n = p["wi"].shape[1] // 2
  g = x @ p["wi"][:, :n] + p["bi"][:n]
  return (jax.nn.silu(g) * (x @ p["wi"][:, n:] + p["bi"][n:])) @ p["wo"] + p["bo"]


@pytest.mark.parametrize("fn", [_glu_param_split, _glu_param_sliced], ids=["split", "slices"])
def test_a_kernel_cut_into_equal_parts_before_its_products_is_a_kernel(fn):
  """The fused GLU kernel cut before the products (x @ w[:, :H], x @ w[:, H:]) was grouped
  right but labelled a statistic ('stat'), so importance_prune and weight_distinctiveness
  refused the group and activations found no contraction. It is the kernel it is when cut
  after the product: the same slices, activations, scores and masks as _glu_split."""
  p, x = _glu_params(), _arr(16, 5)
  t, ref = jaxprune.trace(fn, p, x), jaxprune.trace(_glu_split, p, x)
  assert list(t.groups) == ["wi"] and t.activations_complete("wi")
  assert t.groups["wi"].slices == ref.groups["wi"].slices
  np.testing.assert_allclose(t.activations(p, x, "wi"), ref.activations(p, x, "wi"),
                             rtol=1e-5, atol=1e-6)
  um = jaxprune.unit_masks_ones(t)
  scores = jaxprune.importance_scores(p, t, "wi")
  np.testing.assert_array_equal(scores, jaxprune.importance_scores(p, ref, "wi"))
  w = np.asarray(p["wi"])
  np.testing.assert_allclose(scores, np.sqrt(np.mean(np.concatenate([w[:, :6], w[:, 6:]]) ** 2,
                                                     axis=0)), rtol=1e-6)
  _, m, _ = jaxprune.importance_prune(t, "wi")(p, um, 2)
  np.testing.assert_array_equal(m["wi"], np.argsort(np.argsort(scores)) >= 2)
  _compact_equals_masked(t, p, x, fn, {"wi": [1, 4]})


def test_two_layers_from_halves_of_one_param_prune_by_weights_not_by_activations():
  """Each half of one param the kernel of its own layer (tanh(x @ w[:, :H]) and
  relu(x @ w[:, H:]), read by their own consumers): unit i is column i of both halves. Its
  kernel is a kernel (importance runs); its activations are two values, so pruners from
  activations refuse the group rather than read the first layer's alone."""
  def halves(p, x):
    return (jnp.tanh(x @ p["w"][:, :4]) @ p["a"] + jax.nn.relu(x @ p["w"][:, 4:]) @ p["c"]
            + p["bo"])
  p = {"w": _arr(5, 8), "a": _arr(4, 2), "c": _arr(4, 2), "bo": _arr(2)}
  x = _arr(16, 5)
  t = jaxprune.trace(halves, p, x)
  assert {(s.path, s.role, s.kind) for s in t.groups["w"].slices} == {
      (("w",), "producer", "kernel"), (("a",), "consumer", "kernel"),
      (("c",), "consumer", "kernel")}
  w = np.asarray(p["w"])
  np.testing.assert_allclose(jaxprune.importance_scores(p, t, "w"),
                             np.sqrt(np.mean(np.concatenate([w[:, :4], w[:, 4:]]) ** 2, axis=0)),
                             rtol=1e-6)
  assert not t.activations_complete("w")
  with pytest.raises(ValueError, match="consumers read other values than the activations"):
    jaxprune.distinctiveness(t, "w")(p, jaxprune.unit_masks_ones(t), t.activations(p, x, "w"))
  _compact_equals_masked(t, p, x, halves, {"w": [0, 3]})


def test_fused_glu_duplicate_unit_is_merged_exactly():
  """Unit 4 a copy of unit 1 (gate and value columns, biases): distinctiveness merges it into
  unit 1 (its outgoing row added to unit 1's) and the outputs do not move."""
  p, x = _glu_params(), _arr(32, 5)
  for col in (0, 6):
    p["wi"] = p["wi"].at[:, col + 4].set(p["wi"][:, col + 1])
    p["bi"] = p["bi"].at[col + 4].set(p["bi"][col + 1])
  t = jaxprune.trace(_glu_split, p, x)
  p2, um, _ = jaxprune.distinctiveness(t, "wi", complementary=False, constants=False)(
      p, jaxprune.unit_masks_ones(t), t.activations(p, x, "wi"), 1.0, 179.0)
  np.testing.assert_array_equal(np.asarray(um["wi"]), [True] * 4 + [False, True])
  np.testing.assert_allclose(p2["wo"][1], p["wo"][1] + p["wo"][4], rtol=1e-6)
  masked = jaxprune.apply_masks(p2, jaxprune.expand(p2, t, um))
  np.testing.assert_allclose(_glu_split(masked, x), _glu_split(p, x), atol=1e-5)


def test_fused_lstm_gates_cut_in_four_are_one_group_of_hidden_units():
  """A hand-written LSTM with one kernel for its four gates (flax's OptimizedLSTMCell computes
  its kernel by concatenating params, which stays not prunable): hidden unit i is columns
  i, H + i, 2H + i, 3H + i of both kernels and the bias, row i of the recurrent kernel and of
  the readout; compact equals masking."""
  def lstm(p, xs):
    def step(carry, x):
      h, c = carry
      i, f, g, o = jnp.split(x @ p["wx"] + h @ p["wh"] + p["b"], 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      return (h, c), h
    z = jnp.zeros((xs.shape[0], p["wh"].shape[0]), xs.dtype)
    (h, _), _ = jax.lax.scan(step, (z, z), jnp.swapaxes(xs, 0, 1))
    return h @ p["out"]

  p = {"wx": _arr(5, 24), "wh": _arr(6, 24), "b": _arr(24), "out": _arr(6, 3)}
  xs = _arr(3, 7, 5)
  t = jaxprune.trace(lstm, p, xs)
  assert list(t.groups) == ["wx"] and t.groups["wx"].size == 6
  um = jaxprune.unit_masks_ones(t)
  um["wx"] = um["wx"].at[2].set(False)
  m = jaxprune.expand(p, t, um)
  cols = np.ones(24, bool)
  cols[[2, 8, 14, 20]] = False
  np.testing.assert_array_equal(np.asarray(m["b"]), cols)
  np.testing.assert_array_equal(np.asarray(m["wh"]), np.outer(np.arange(6) != 2, cols))
  small = _compact_equals_masked(t, p, xs, lstm, {"wx": [2]})
  assert small["wh"].shape == (5, 20) and small["out"].shape == (5, 3)


def test_unequal_cuts_and_cuts_of_the_batch_stay_as_they_were():
  """Only equal parts of an axis that parameters produce are read as units: an uneven cut of a
  kernel's columns is not prunable (with the reason), and a split of the batch keeps working
  at another batch size."""
  def uneven(p, x):
    h = x @ p["wi"]
    return jnp.tanh(h[:, :3]) @ p["d1"] + h[:, 3:] @ p["d2"]

  t = jaxprune.trace(uneven, {"wi": _arr(5, 12), "d1": _arr(3, 2), "d2": _arr(9, 2)},
                     _arr(4, 5))
  assert not t.groups and "indexed along by slice" in t.explain()

  def halves(p, x):                   # a batch cut in two (pairs of examples)
    a, b = jnp.split(jnp.tanh(x @ p["w1"]), 2, axis=0)
    return (a - b) @ p["w2"]

  p = {"w1": _arr(5, 6), "w2": _arr(6, 3)}
  t = jaxprune.trace(halves, p, _arr(4, 5))
  assert list(t.groups) == ["w1"]
  x8 = _arr(8, 5)
  np.testing.assert_allclose(t.apply(p, x8), halves(p, x8), atol=1e-6)
  _compact_equals_masked(t, p, x8, halves, {"w1": [0, 3]})


def test_glu_inside_a_jitted_call_and_a_conv_glu_run_their_activations_through():
  """jax.nn.glu is a jitted call holding the cut: the activations run on through its body (they
  stopped before it, at the kernel's output, and were reported complete); a conv's channels cut
  in two are one group likewise."""
  def nn_glu(p, x):
    return jax.nn.glu(x @ p["wi"] + p["bi"]) @ p["wo"]

  p, x = _glu_params(), _arr(16, 5)
  t = jaxprune.trace(nn_glu, p, x)
  assert t.groups["wi"].activation == "other" and t.activations_complete("wi")
  h = np.asarray(x @ p["wi"] + p["bi"])
  np.testing.assert_allclose(t.activations(p, x, "wi"), h[:, :6] / (1 + np.exp(-h[:, 6:])),
                             rtol=1e-5, atol=1e-6)
  _compact_equals_masked(t, p, x, nn_glu, {"wi": [0, 5]})

  def conv_glu(p, x):
    h = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    a, b = jnp.split(h, 2, axis=-1)
    return (a * jax.nn.sigmoid(b)).mean((1, 2)) @ p["w"]

  pc, xc = {"k": _arr(3, 3, 2, 8), "w": _arr(4, 3)}, _arr(4, 6, 6, 2)
  t = jaxprune.trace(conv_glu, pc, xc)
  assert list(t.groups) == ["k"] and t.groups["k"].size == 4
  small = _compact_equals_masked(t, pc, xc, conv_glu, {"k": [1]})
  assert small["k"].shape == (3, 3, 2, 6)
