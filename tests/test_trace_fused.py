"""Fused kernels concatenated from params (flax's ``OptimizedLSTMCell``: four gates' kernels
concatenated into one product, then split into the gates again): the tracer reads them as the
layers they are (``jaxprune/_unfuse.py``), so the cell prunes as ``LSTMCell`` does. References:
``LSTMCell`` on the same params, and masking the uncompacted network."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune import _unfuse
from conftest import host_f32

H, D, T = 6, 3, 5


class _Net(nn.Module):
  cell: type = nn.LSTMCell
  dtype: object = None

  @nn.compact
  def __call__(self, x):
    kw = {} if self.dtype is None else {"dtype": self.dtype}
    h = nn.RNN(self.cell(H, name="cell", **kw), name="rnn")(x)
    return nn.Dense(3, name="head")(h[:, -1])


def _slices(t):
  (g,) = t.groups.values()
  return {(s.path, s.axis, s.role, s.view) for s in g.slices}


def _setup(seed=0):
  x = jax.random.normal(jax.random.key(seed + 1), (4, T, D))
  v = _Net(nn.LSTMCell).init(jax.random.key(seed), x)
  # Random biases (init's are 0) so that a wrong bias slice shows.
  v = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(jax.random.key(seed + 2), a.shape), v)
  return x, v


def test_optimized_lstm_cell_has_the_group_of_lstm_cell_and_compacts_exactly():
  x, v = _setup()
  plain, fused = _Net(nn.LSTMCell), _Net(nn.OptimizedLSTMCell)
  np.testing.assert_allclose(fused.apply(v, x), plain.apply(v, x), atol=1e-5)
  tp, tf = jaxprune.trace(plain.apply, v, x), jaxprune.trace(fused.apply, v, x)
  assert len(tf.groups) == 1 and _slices(tf) == _slices(tp)
  (name,) = tf.groups
  assert tf.activations_complete(name)
  np.testing.assert_allclose(tf.activations(v, x, name),
                             tp.activations(v, x, next(iter(tp.groups))), atol=1e-5)
  keep = jnp.asarray([True, False, True, True, False, True])
  masked = jaxprune.apply_masks(v, jaxprune.expand(v, tf, {name: keep}))
  small, small_t = tf.compact(masked, {name: keep})
  assert small["params"]["cell"]["hf"]["kernel"].shape == (4, 4)
  assert small["params"]["cell"]["ii"]["kernel"].shape == (D, 4)
  assert small["params"]["head"]["kernel"].shape == (4, 3)
  for xx in (x, jax.random.normal(jax.random.key(9), (7, T, D))):
    np.testing.assert_allclose(small_t.apply(small, xx), fused.apply(masked, xx), atol=1e-5)


def test_a_repeated_unit_of_an_optimized_lstm_merges_exactly():
  """Unit 4 repeats unit 1 in every gate (kernels, biases) and in its recurrent rows: their
  hidden states are equal at every step, so distinctiveness merges 4 into 1 and the outputs
  stay the same."""
  x, v = _setup(3)
  cell = dict(v["params"]["cell"])
  for k, leaf in cell.items():
    leaf = dict(leaf)
    leaf["kernel"] = leaf["kernel"].at[:, 4].set(leaf["kernel"][:, 1])
    if k.startswith("h"):
      # Rows of units 1 and 4 read equal states: give unit 1's row their sum, unit 4's row 0.
      kr = leaf["kernel"]
      leaf["kernel"] = kr.at[1].set(kr[1] + kr[4]).at[4].set(0.0)
      leaf["bias"] = leaf["bias"].at[4].set(leaf["bias"][1])
    cell[k] = leaf
  v = {"params": {**v["params"], "cell": cell}}
  fused = _Net(nn.OptimizedLSTMCell)
  t = jaxprune.trace(fused.apply, v, x)
  (name,) = t.groups
  acts = t.activations(v, x, name)
  np.testing.assert_allclose(acts[..., 4], acts[..., 1], atol=1e-6)
  p2, um, _ = jaxprune.distinctiveness(t, name, complementary=False, constants=False)(
      v, jaxprune.unit_masks_ones(t), acts, 1.0, 179.0)
  assert np.asarray(um[name]).tolist() == [True] * 4 + [False, True]
  np.testing.assert_allclose(fused.apply(p2, x), fused.apply(v, x), atol=1e-5)


def test_optimized_lstm_cell_in_bfloat16_is_traced_too():
  """With dtype=bfloat16 the concatenated kernel is converted before the product."""
  x, v = _setup()
  t = jaxprune.trace(_Net(nn.OptimizedLSTMCell, jnp.bfloat16).apply, v, x)
  assert len(t.groups) == 1 and next(iter(t.groups.values())).size == H


@pytest.mark.parametrize("cut", ["split", "slices"])
def test_a_fused_kernel_written_by_hand_prunes_each_half_as_one_unit(cut):
  """concat([Wa, Wb], 1) and concat([ba, bb]): one product, cut into a GLU's value and gate by
  jnp.split or by slices y[:, :H], y[:, H:]. Unit i of both halves is one unit; compacting
  equals masking at any batch size."""
  rng = np.random.default_rng(0)
  p = {k: host_f32(rng.normal(size=s)) for k, s in
       {"wa": (D, H), "wb": (D, H), "ba": (H,), "bb": (H,), "w2": (H, 2)}.items()}

  def fn(p, x):
    y = x @ jnp.concatenate([p["wa"], p["wb"]], 1) + jnp.concatenate([p["ba"], p["bb"]])
    a, b = jnp.split(y, 2, axis=-1) if cut == "split" else (y[:, :H], y[:, H:])
    return (a * jax.nn.sigmoid(b)) @ p["w2"]

  x = host_f32(rng.normal(size=(5, D)))
  t = jaxprune.trace(fn, p, x)
  (g,) = t.groups.values()
  assert {(s.path, s.axis, s.role) for s in g.slices} == {
      (("wa",), 1, "producer"), (("wb",), 1, "producer"), (("ba",), 0, "producer"),
      (("bb",), 0, "producer"), (("w2",), 0, "consumer")}
  keep = jnp.asarray([False, True, True, False, True, True])
  masked = jaxprune.apply_masks(p, jaxprune.expand(p, t, {g.name: keep}))
  small, small_t = t.compact(masked, {g.name: keep})
  assert small["wa"].shape == (D, 4) and small["bb"].shape == (4,)
  for xx in (x, x[:2], host_f32(rng.normal(size=(9, D)))):
    np.testing.assert_allclose(small_t.apply(small, xx), fn(masked, xx), atol=1e-5)


@pytest.mark.parametrize("case", ["unequal_cut", "concat_of_activations", "no_split"])
def test_programs_without_the_pattern_are_left_as_they_are(case):
  """A split at other cuts than the concatenation's, a concatenation of activations (DenseNet),
  or no split at all: the program is returned unchanged (the same object)."""
  w = jnp.ones((D, 4))

  def fn(x):
    if case == "unequal_cut":
      y = x @ jnp.concatenate([w, w], 1)
      return jnp.split(y, [3], axis=-1)[0]
    if case == "concat_of_activations":
      h = jnp.concatenate([x @ w, jnp.tanh(x @ w)], 1)
      return jnp.split(h, 2, axis=0)[0]
    return x @ jnp.concatenate([w, w], 1)

  closed = jax.make_jaxpr(fn)(jnp.ones((4, D)))
  assert _unfuse.unfuse(closed) is closed
