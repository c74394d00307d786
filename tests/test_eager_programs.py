"""The small eager XLA programs a first call compiles for host-side preparation: none.

Each eager jnp operation on concrete inputs (``jnp.ones``, ``jnp.asarray`` of a NumPy array, a
dtype conversion, ``jnp.array(copy=True)``) compiles a tiny program per new shape (5-30 ms
each). These tests count the programs lowered by first calls on shapes no other test uses (a
persistent compilation cache skips the compilation, never the lowering, so they are counted
either way), and compare the results with references built independently.
"""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune
from conftest import FRESH_COUNTER, count_programs, run_fresh
from jaxprune.pruners import redundancy as redundancy_lib

@pytest.fixture(scope="module")
def net():
  # Odd widths of its own: no other test compiles these shapes first in this process.
  model = jaxprune.MLP(in_features=7, hidden=(13,), out_features=5)
  params = model.init(jax.random.key(11))
  x = np.asarray(jax.random.normal(jax.random.key(12), (29, 7)))
  acts = np.asarray(model.activations(params, x, "hidden_0"))
  return model, params, x, acts


def test_unit_masks_ones_compiles_nothing():
  model = jaxprune.MLP(in_features=3, hidden=(17, 19), out_features=2)
  with count_programs() as n:
    um = jaxprune.unit_masks_ones(model)
  assert n == [0]
  assert sorted(um) == ["hidden_0", "hidden_1"]
  for name, size in (("hidden_0", 17), ("hidden_1", 19)):
    assert isinstance(um[name], jax.Array) and um[name].dtype == np.bool_
    assert not um[name].weak_type and np.array_equal(np.asarray(um[name]), np.ones(size, bool))


def test_ones_like_compiles_nothing_and_traces_under_jit():
  params = {"a": np.zeros((23, 3), np.float32), "b": {"c": jnp.zeros((31,))}, "s": 2.0}
  with count_programs() as n:
    ones = jaxprune.ones_like(params)
  assert n == [0]
  for got, shape in ((ones["a"], (23, 3)), (ones["b"]["c"], (31,)), (ones["s"], ())):
    assert isinstance(got, jax.Array) and got.dtype == np.bool_ and not got.weak_type
    assert np.array_equal(np.asarray(got), np.ones(shape, bool))
  # Under jit (tracers) the masks are built inside the trace.
  traced = jax.jit(jaxprune.ones_like)({"a": jnp.zeros((2, 3))})
  assert np.array_equal(np.asarray(traced["a"]), np.ones((2, 3), bool))


_FRESH = FRESH_COUNTER + """
import numpy as np, jaxprune
model = jaxprune.MLP(in_features=7, hidden=(13,), out_features=5)
params = model.init(jax.random.key(11))
um = {"hidden_0": jax.device_put(np.arange(13) % 4 != 0)}
print("COUNTS", count(lambda: jaxprune.magnitude_prune(params, None, 0.37))[1],
      count(lambda: jaxprune.expand(params, model, um))[1])
"""


def test_conversions_every_caller_shares_are_not_compiled_in_a_fresh_process():
  """The conversion of a concrete fraction (magnitude_prune) and the check of a device unit
  mask (expand) are programs any earlier call in a process may have compiled already, so they
  are counted in a fresh one: the pruning program alone, and nothing for expand."""
  assert run_fresh(_FRESH, "COUNTS") == [["1", "0"]]


def test_magnitude_prune_matches_a_per_layer_reference(net):
  _, params, _, _ = net
  fraction = 0.37
  p, m, _ = jaxprune.magnitude_prune(params, None, fraction)
  # Reference: per layer, round(fraction * count) smallest |w| of each selected leaf removed.
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    mask = jax.tree_util.tree_flatten_with_path(m)[0]
    got = dict((jax.tree_util.keystr(k), np.asarray(v)) for k, v in mask)[
        jax.tree_util.keystr(path)]
    w = np.asarray(leaf)
    if w.ndim < 2:
      continue
    k = int(np.round(np.float32(fraction) * np.float32(w.size)))
    order = np.argsort(np.abs(w).ravel(), kind="stable")
    want = np.ones(w.size, bool)
    want[order[:k]] = False
    assert np.array_equal(got.ravel(), want)
  # A traced fraction still works (the jnp path).
  f = jax.jit(lambda fr: jaxprune.magnitude_prune(params, None, fr)[1])(fraction)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(f), jax.tree.leaves(m)))


def test_host_count_matches_the_traced_conversion():
  h = 13
  traced = jax.jit(lambda v: jnp.where(v == jnp.floor(v), jnp.clip(v, -1, h), -1)
                   .astype(jnp.int32))
  for v in (0, 3, 13, 40, 2**31 - 1, np.int64(5), np.uint8(7), 0.0, 4.0, 13.0, 1e30, np.inf,
            np.float64(2.0**40), np.float32(6.0), True):
    got = redundancy_lib._host_count(v, h)
    if np.issubdtype(np.asarray(v).dtype, np.floating):
      want = np.asarray(traced(jnp.asarray(v)))
    else:   # the traced path passes an integer on as it is; any limit >= h removes alike
      want = min(int(np.asarray(jnp.asarray(v).astype(jnp.int32))), h)
    assert got.dtype == np.int32 and got.shape == () and int(got) == int(want), v
  # an integer beyond int32 is no limit, as inf (it wrapped to 0 on the device: nothing removed)
  for big in (np.int64(2**40), np.uint64(2**63), 2**70):
    got = redundancy_lib._host_count(big, h)
    assert got.dtype == np.int32 and int(got) == h


def test_group_redundancy_compiles_only_its_program_and_matches_traced(net):
  model, params, _, acts = net
  acts = acts.copy()
  acts[:, 4] = 2.0 * acts[:, 1] - acts[:, 7]      # unit 4 is a combination of 1 and 7
  prune = jaxprune.group_redundancy(model, "hidden_0")
  um = jaxprune.unit_masks_ones(model)
  with count_programs() as n:
    p, m, rep = prune(params, um, acts, 1e-4, 2)
  assert n == [1]
  # one of the three dependent units goes (any of them is the other two combined), no other
  removed = np.flatnonzero(~np.asarray(m["hidden_0"])).tolist()
  assert int(rep.count) == 1 and len(removed) == 1 and removed[0] in (1, 4, 7), removed
  # The same call with everything traced (the jnp path) gives the same bits.
  tp, tm, trep = jax.jit(lambda a, mr: prune(params, um, a, 1e-4, mr))(acts, 2)
  for a, b in zip(jax.tree.leaves((p, m, rep)), jax.tree.leaves((tp, tm, trep))):
    assert np.asarray(a).dtype == np.asarray(b).dtype
    assert np.array_equal(np.asarray(a), np.asarray(b), equal_nan=True)
  # A float max_remove and no limit go the host way too, with the same results.
  with count_programs() as n:
    p2, m2, _ = prune(params, um, acts, 1e-4, 2.0)
    p3, m3, _ = prune(params, um, acts, 1e-4, np.inf)
    p4, m4, _ = prune(params, um, acts, 1e-4)
  assert n == [0]
  assert np.array_equal(np.asarray(m2["hidden_0"]), np.asarray(m["hidden_0"]))
  assert np.array_equal(np.asarray(m3["hidden_0"]), np.asarray(m4["hidden_0"]))
  with pytest.raises(ValueError, match="max_remove must be a whole number"):
    prune(params, um, acts, 1e-4, 1.5)
  # A limit beyond int32 is no limit (np.int64(2**40) removed nothing: it wrapped to 0).
  _, m5, rep5 = prune(params, um, acts, 1e-4, np.int64(2**40))
  assert int(rep5.count) == 1 and np.array_equal(np.asarray(m5["hidden_0"]),
                                                  np.asarray(m4["hidden_0"]))


def test_flops_report_numpy_example_compiles_only_its_program(net):
  model, params, x, _ = net
  with count_programs() as n:
    rep = jaxprune.flops_report(model, params, x[:1])
  assert n == [1]
  # The same report as from a device array (the jnp path), and 2*in*out per kernel.
  assert rep == jaxprune.flops_report(model, params, jnp.asarray(x[:1]))
  kernels = {tuple(layer["shape"]): layer["flops"] for layer in rep["layers"]
             if len(layer["shape"]) == 2}
  assert kernels == {(7, 13): 2 * 7 * 13, (13, 5): 2 * 13 * 5}


def test_masked_optimizer_init_copies_masks_without_programs(net):
  _, params, _, _ = net
  masks = jax.tree.map(lambda p: jax.device_put(np.asarray(p) > 0), params)
  tx = jaxprune.masked_optimizer(optax.sgd(0.1), masks)
  with count_programs() as n:
    state = tx.init(params)
  assert n[0] <= 1   # at most apply_masks' one program for the tree; no copy program per mask
  got = jaxprune.masks_of(state)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(masks)):
    assert np.array_equal(np.asarray(a), np.asarray(b)) and a.dtype == b.dtype
    assert a.unsafe_buffer_pointer() != b.unsafe_buffer_pointer()   # the state's own copy


def test_expand_of_device_unit_masks(net):
  model, params, _, _ = net
  um = {"hidden_0": jax.device_put(np.arange(13) % 4 != 0)}
  wm = jaxprune.expand(params, model, um)   # (compiles nothing: counted in a fresh process)
  keep = np.arange(13) % 4 != 0
  assert np.array_equal(np.asarray(wm["params"]["hidden_0"]["kernel"]), np.broadcast_to(keep, (7, 13)))
  assert np.array_equal(np.asarray(wm["params"]["out"]["kernel"]),
                        np.broadcast_to(keep[:, None], (13, 5)))
  with pytest.raises(ValueError, match="removes every unit"):
    jaxprune.expand(params, model, {"hidden_0": jax.device_put(np.zeros(13, bool))})
