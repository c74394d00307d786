"""First calls of the optax-side tools compile one program, not one per op and leaf shape.

Eager jnp on concrete arrays compiles a small XLA program per new shape (5-30 ms each): the
default ``|w|`` scores, block sums, and the pruning wrappers' counters and masks ran that way. The
counts use shapes no other test uses (or a fresh process, for programs any earlier caller may
already have compiled), and the results are compared with references built independently or
the old way (eager ops).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxprune
from conftest import FRESH_COUNTER, count_programs, host_f32, run_fresh

def _count(fn):
  with count_programs() as n:
    out = jax.block_until_ready(fn())
  return out, n[0]


def _params(seed, shapes):
  rng = np.random.default_rng(seed)
  return {f"l{i}": {"kernel": host_f32(rng.standard_normal(s)), "bias": host_f32(np.zeros(s[-1]))}
          for i, s in enumerate(shapes)}


def test_prune_to_sparsity_default_scores_in_one_program_and_exact():
  # Shapes of this test's own: two programs (scores and checks; selection and zeroing), not
  # one more |w| program per kernel shape.
  params = _params(0, [(9, 17), (17, 21), (21, 3)])
  (p, m), n = _count(lambda: jaxprune.prune_to_sparsity(params, None, 0.6))
  assert n == 2, n
  # Reference: global, round(0.6 * N) smallest |w| over the kernels removed.
  names = sorted(params)
  w = np.concatenate([np.asarray(params[k]["kernel"]).ravel() for k in names])
  order = np.argsort(np.abs(w), kind="stable")
  keep = np.ones(w.size, bool)
  keep[order[:int(np.round(np.float32(0.6) * np.float32(w.size)))]] = False
  got = np.concatenate([np.asarray(m[k]["kernel"]).ravel() for k in names])
  assert np.array_equal(got, keep)
  for k in names:
    assert np.asarray(m[k]["bias"]).all()
    assert np.array_equal(np.asarray(p[k]["kernel"]),
                          np.where(np.asarray(m[k]["kernel"]), np.asarray(params[k]["kernel"]), 0))
  # The traced path (a traced sparsity) agrees bit for bit.
  tm = jax.jit(lambda s: jaxprune.prune_to_sparsity(params, None, s)[1])(0.6)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(tm), jax.tree.leaves(m)))


def test_prune_to_sparsity_default_scores_still_refuse_nan_where_kept():
  params = _params(1, [(5, 6)])
  bad = dict(params, l0=dict(params["l0"], kernel=params["l0"]["kernel"].at[2, 3].set(jnp.nan)))
  try:
    jaxprune.prune_to_sparsity(bad, None, 0.5)
  except ValueError as e:
    assert "1 NaN or infinite" in str(e) and "l0/kernel" in str(e)
  else:
    raise AssertionError("NaN weights were ranked")
  masks = jaxprune.ones_like(bad)
  masks["l0"]["kernel"] = masks["l0"]["kernel"].at[2, 3].set(False)
  _, m = jaxprune.prune_to_sparsity(bad, masks, 0.5)   # removed already: not ranked
  assert not bool(m["l0"]["kernel"][2, 3])


def test_score_helpers_compile_one_program_per_tree():
  params = _params(5, [(7, 19), (19, 23), (23, 2)])
  grads = jax.tree.map(lambda a: -2.0 * a + 1.0, params)
  got, n = _count(lambda: jaxprune.magnitude_scores(params))
  assert n == 1, n
  assert all(np.array_equal(g, np.abs(np.asarray(a)))
             for g, a in zip(jax.tree.leaves(got), jax.tree.leaves(params)))
  got, n = _count(lambda: jaxprune.saliency_scores(params, grads))
  assert n == 1, n
  assert all(np.array_equal(s, np.abs(np.asarray(a) * np.asarray(g))) for s, a, g in zip(
      jax.tree.leaves(got), jax.tree.leaves(params), jax.tree.leaves(grads)))


def test_block_prune_in_one_program_and_matches_a_numpy_reference():
  params = _params(2, [(12, 10), (10, 6)])
  rng = np.random.default_rng(3)
  masks = jax.tree.map(lambda p: jax.device_put(rng.random(np.shape(p)) > 0.2), params)
  (p, m), n = _count(lambda: jaxprune.block_prune(params, masks, 0.5, block=(2, 2)))
  assert n <= 3, n
  # Reference: a block's score is the sum of its kept |w|; the round(0.5 * blocks) lowest-scored
  # blocks are removed over both kernels (no ties with random weights).
  blocks = []
  for k in sorted(params):
    w, mk = np.abs(np.asarray(params[k]["kernel"])), np.asarray(masks[k]["kernel"])
    r, c = w.shape
    for i in range(0, r, 2):
      for j in range(0, c, 2):
        blocks.append((np.float32(np.where(mk, w, 0)[i:i + 2, j:j + 2].sum()), k, i, j))
  removed = sorted(blocks, key=lambda b: b[0])[:int(np.round(0.5 * len(blocks)))]
  want = {k: np.asarray(masks[k]["kernel"]).copy() for k in params}
  for _, k, i, j in removed:
    want[k][i:i + 2, j:j + 2] = False
  for k in params:
    assert np.array_equal(np.asarray(m[k]["kernel"]), want[k]), k
    assert np.array_equal(np.asarray(m[k]["bias"]), np.asarray(masks[k]["bias"]))
    assert np.array_equal(np.asarray(p[k]["kernel"]),
                          np.where(want[k], np.asarray(params[k]["kernel"]), 0))


_FRESH = FRESH_COUNTER + """
import jax.numpy as jnp, numpy as np, optax, jaxprune
model = jaxprune.MLP(in_features=7, hidden=(13, 11), out_features=5)
params = model.init(jax.random.key(0))["params"]
masks = jax.tree.map(lambda p: jax.device_put(np.asarray(p) > 0), params)
jax.block_until_ready((params, masks))

def same(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return (jax.tree.structure(a) == jax.tree.structure(b) and all(
      type(x) is type(y) and x.dtype == y.dtype and x.weak_type == y.weak_type
      and x._committed == y._committed and np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(la, lb)))

counts = []
gst, n = count(lambda: jaxprune.gradual(optax.sgd(0.1), sparsity=0.5, begin_step=0,
                                        end_step=4, frequency=1).init(params))
counts.append(n)   # the count is put on the device from the host; sgd's state is empty
ist, n = count(lambda: jaxprune.gradual(
    optax.sgd(0.1), sparsity=0.5, begin_step=0, end_step=4, frequency=1,
    pruner=jaxprune.importance_pruner(model, "hidden_0")).init(params))
counts.append(n)   # so are the unit masks
print("COUNTS", *counts)
# The old way: eager ops.
assert same(gst.inner_state, optax.sgd(0.1).init(params)), "gradual init"
assert same(gst.count, jnp.zeros((), jnp.int32)) and same(ist.count, jnp.zeros((), jnp.int32))
assert same(gst.masks, jax.tree.map(lambda p: jnp.ones(p.shape, bool), params))
assert same(ist.pruner_state, {"hidden_0": jnp.ones((13,), bool)})
# Under an outer jit (tracers take the traced way) the state is the same.
jgst = jax.jit(jaxprune.gradual(optax.sgd(0.1), sparsity=0.5, begin_step=0, end_step=4,
                                frequency=1).init)(params)
assert jax.tree.structure(jgst) == jax.tree.structure(gst)
assert all(np.array_equal(a, b) and a.dtype == b.dtype and a.weak_type == b.weak_type
           for a, b in zip(jax.tree.leaves(jgst), jax.tree.leaves(gst)))
"""


def test_gradual_inits_compile_nothing_of_their_own_in_a_fresh_process():
  """gradual's init compiles nothing of its own (its count and an importance pruner's unit
  masks are put on the device from the host); states identical to the eager ops'."""
  assert run_fresh(_FRESH, "COUNTS") == [["0", "0"]]   # (a failed assert there fails here)


def test_optimizer_init_keeps_python_values_in_the_state():
  # An init returning Python values and closed-over arrays: the state keeps them as they are.
  const = jnp.arange(3.0)
  tx = optax.GradientTransformation(lambda p: {"n": 0, "c": const, "z": jnp.zeros(())},
                                    lambda u, s, p=None: (u, s))
  params = _params(4, [(3, 4)])
  masks = jaxprune.ones_like(params)
  st = jaxprune.masked_optimizer(tx, masks).init(params)[1]
  assert st["n"] == 0 and type(st["n"]) is int and st["c"] is const
  st = jaxprune.gradual(tx, sparsity=0.5, begin_step=0, end_step=2, frequency=1).init(params)
  assert type(st.inner_state["n"]) is int and st.inner_state["c"] is const
