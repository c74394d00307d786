"""A layer read through a kernel computed from params (an equalized learning rate's
``w / sqrt(fan_in)``, ``w * 0.5``, a per-output scale ``w * s``, a merged LoRA ``w + a @ b``,
a dequantised ``codes * scale``): the kernel is linear in the rows it reads the units with, so
removing or merging a unit removes or merges those rows, and the layer before stays a group.
Folding a removed unit's constant into the next bias would use the params' rows, not the
kernel's, so folds are refused. A kernel not linear in its rows (``tanh(w)``, ``w * w``,
``w + s``, a weight norm) still leaves the units not prunable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from conftest import assert_compacts_as_masked, host_f32, random_unit_masks

R = np.random.default_rng(5)
F, H, C = 5, 8, 3


def _arr(*shape, scale=1.0):
  return host_f32(scale * R.normal(size=shape))


BASE = {"w1": _arr(F, H), "b1": _arr(H), "w2": _arr(H, C), "b2": _arr(C), "s2": _arr(C),
        "a": _arr(H, 2), "b": _arr(2, C), "coef": _arr(4), "basis": _arr(4, H, C)}
# Unit 5 a copy of unit 1: merging them must leave the outputs as they are.
BASE["w1"] = BASE["w1"].at[:, 5].set(BASE["w1"][:, 1])
BASE["b1"] = BASE["b1"].at[5].set(BASE["b1"][1])

LINEAR = {
    "times_a_scalar": lambda p, h: h @ (p["w2"] * 0.5),
    "equalized_lr": lambda p, h: h @ (p["w2"] / np.sqrt(H)),
    "per_output_scale": lambda p, h: h @ (p["w2"] * p["s2"]),
    "merged_lora": lambda p, h: h @ (p["w2"] + p["a"] @ p["b"]),
    "transposed": lambda p, h: jnp.einsum("bh,ch->bc", h, (p["w2"] * 2.0).T),
    # a learned mixture of a basis of kernels (the coefficients' axis is no unit)
    "basis_mixture": lambda p, h: h @ jnp.einsum("k,kio->io", p["coef"], p["basis"]),
}
READERS = {"merged_lora": {"w2", "a"}, "basis_mixture": {"basis"}}
NOT_LINEAR = {
    "tanh": lambda p, h: h @ jnp.tanh(p["w2"]),
    "squared": lambda p, h: h @ (p["w2"] * p["w2"]),
    "plus_a_row": lambda p, h: h @ (p["w2"] + p["s2"]),
    # (a norm over the rows, w2 / ||w2||_0, keeps the units: test_trace_norms.py; a norm of
    # each row is not linear in it, and a masked row would be 0 / 0)
    "row_norm": lambda p, h: h @ (p["w2"] / jnp.sqrt((p["w2"] ** 2).sum(1, keepdims=True)
                                                      + 1e-12)),
}


def _net(read):
  def fn(p, x):
    return read(p, jax.nn.sigmoid(x @ p["w1"] + p["b1"])) + p["b2"]
  return fn


X = _arr(6, F)


@pytest.mark.parametrize("name", list(LINEAR))
def test_a_kernel_linear_in_its_rows_reads_the_units(name):
  fn = _net(LINEAR[name])
  t = jaxprune.trace(fn, BASE, X)
  assert list(t.groups) == ["w1"]
  g = t.groups["w1"]
  readers = {s.path[0] for s in g.consumers}
  assert readers == READERS.get(name, {"w2"})
  um = jaxprune.unit_masks_ones(t)
  um["w1"] = um["w1"].at[np.array([0, 3])].set(False)
  small, small_t = t.compact(BASE, um)
  assert small["w2"].shape == ((H - 2, C) if "w2" in readers else (H, C))
  masked = jaxprune.apply_masks(BASE, jaxprune.expand(BASE, t, um))
  for xb in (X, X[:4]):
    np.testing.assert_allclose(small_t.apply(small, xb), fn(masked, xb), rtol=1e-5, atol=1e-6)
  # Merging the copy into unit 1 adds its rows: exact, as the kernel is linear in them.
  acts = t.activations(BASE, X, "w1")
  merged, kept, _ = jaxprune.distinctiveness(t, "w1", constants=False, complementary=False)(
      BASE, jaxprune.unit_masks_ones(t), acts, 1e-3, 180.0)
  assert np.flatnonzero(~np.asarray(kept["w1"])).tolist() == [5]
  np.testing.assert_allclose(fn(merged, X), fn(BASE, X), rtol=1e-5, atol=1e-5)
  # A constant's fold would add its value times the params' rows, not the kernel's: refused.
  assert all("a kernel computed from params" in s.padded_why for s in g.consumers)
  with pytest.raises(ValueError, match="through a kernel computed from params"):
    jaxprune.distinctiveness(t, "w1")
  assert t.readout("w1") is None        # the GA's readout shortcut reads the params' rows


@pytest.mark.parametrize("name", list(NOT_LINEAR))
def test_a_kernel_not_linear_in_its_rows_leaves_the_units_not_prunable(name):
  t = jaxprune.trace(_net(NOT_LINEAR[name]), BASE, X)
  assert "w1" not in t.groups
  assert "w2 (8, 3): axis 0 -> not prunable" in t.explain()


def test_an_equalized_learning_rate_cnn_keeps_its_channel_groups():
  """StyleGAN/ProGAN's equalized learning rate: every kernel is scaled by 1 / sqrt(fan_in) where
  it is used, convs and the dense head alike."""
  p = {"k1": _arr(3, 3, 2, 6), "c1": _arr(6), "k2": _arr(3, 3, 6, 4), "c2": _arr(4),
       "wd": _arr(4, C)}

  def fn(p, x):
    conv = lambda h, k: jax.lax.conv_general_dilated(
        h, k / np.sqrt(np.prod(k.shape[:3])), (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jax.nn.relu(conv(x, p["k1"]) + p["c1"])
    h = jax.nn.relu(conv(h, p["k2"]) + p["c2"])
    return h.mean((1, 2)) @ (p["wd"] / 2.0)
  x = _arr(4, 8, 8, 2)
  t = jaxprune.trace(fn, p, x)
  assert {n: g.size for n, g in t.groups.items()} == {"k1": 6, "k2": 4}
  for name in t.groups:
    um = jaxprune.unit_masks_ones(t)
    um[name] = um[name].at[np.array([1, 2])].set(False)
    assert_compacts_as_masked(t, p, fn, um, (x,))


@pytest.mark.parametrize("name", list(LINEAR))
def test_outgoing_weights_are_the_params_rows_only_for_a_scaled_kernel(name):
  """Outgoing angles on the raw rows of ``w2 * s`` (s = [1, 100, 1]) put two units 90 degrees
  apart at 1.15 degrees, and merged them (outputs moved by 2.0): only a kernel that is its
  param times scalars keeps the rows' angles, so the others are refused."""
  t = jaxprune.trace(_net(LINEAR[name]), BASE, X)
  scaled = name in ("times_a_scalar", "equalized_lr", "transposed")
  assert {s.kind for s in t.groups["w1"].consumers} == ({"kernel"} if scaled else {"scale"})
  if scaled:
    assert jaxprune.pruners.weight_angles(BASE, t.groups["w1"], source="outgoing").shape == (H, H)
    jaxprune.weight_distinctiveness(t, "w1", source="outgoing", constants=False)(
        BASE, jaxprune.unit_masks_ones(t))
  else:
    with pytest.raises(ValueError, match="the params' rows are not the units' outgoing"):
      jaxprune.pruners.weight_angles(BASE, t.groups["w1"], source="outgoing")
    with pytest.raises(ValueError, match="the params' rows are not the units' outgoing"):
      jaxprune.weight_distinctiveness(t, "w1", source="outgoing", constants=False)(
          BASE, jaxprune.unit_masks_ones(t))


def test_redistribute_moves_rows_but_does_not_fold_constants_through_a_computed_kernel():
  """A constant of 0.7 folded with the raw rows of ``w2 * 0.5`` moved the outputs by 0.02."""
  fn = _net(LINEAR["times_a_scalar"])
  t = jaxprune.trace(fn, BASE, X)
  g = t.groups["w1"]
  merge = jnp.eye(H).at[1, 5].set(1.0)
  moved = jaxprune.units.redistribute(BASE, g, merge)
  keep = jaxprune.unit_masks_ones(t)
  keep["w1"] = keep["w1"].at[5].set(False)
  np.testing.assert_allclose(fn(jaxprune.apply_masks(moved, jaxprune.expand(moved, t, keep)), X),
                             fn(BASE, X), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="through a kernel computed from params"):
    jaxprune.units.redistribute(BASE, g, jnp.eye(H), constants=jnp.zeros(H).at[5].set(0.7))


def test_the_ga_fast_path_names_a_computed_readout():
  from jaxprune import ga
  t = jaxprune.trace(_net(LINEAR["equalized_lr"]), BASE, X)
  y = jnp.asarray(R.integers(0, C, len(X)))
  with pytest.raises(ValueError, match="reads it through a kernel computed from params, w2"):
    ga.search(t, BASE, X, y, "w1", key=jax.random.key(0), fast_path=True,
              config=ga.GAConfig(population_size=8, generations=1), progress=False)


def test_refusals_of_computed_kernels_name_only_ways_that_work():
  """Per-output scales on both layers: importance's refusal named group_redundancy and outgoing
  weights, both refused there; a LoRA-computed first kernel's constant rule said '0 kernels
  produce its units (a residual addition ...)'."""
  p = dict(BASE, s1=_arr(H) + 1.0)

  def both(p, x):
    return jnp.tanh(x @ (p["w1"] * p["s1"]) + p["b1"]) @ (p["w2"] * p["s2"]) + p["b2"]
  t = jaxprune.trace(both, p, X)
  with pytest.raises(ValueError, match=r"prune such a group from activations \(distinctiveness "
                     r"with constants=False\) or by magnitude \(magnitude_prune\) or with "
                     r"ga.search\."):
    jaxprune.importance_prune(t, "w1")(p, jaxprune.unit_masks_ones(t), 3)
  jaxprune.distinctiveness(t, "w1", constants=False)(
      p, jaxprune.unit_masks_ones(t), t.activations(p, X, "w1"), 60.0, 120.0)

  q = dict(BASE, a1=_arr(F, 2), c1=_arr(2, H))

  def lora_in(p, x):
    return jnp.tanh(x @ (p["w1"] + p["a1"] @ p["c1"]) + p["b1"]) @ p["w2"] + p["b2"]
  with pytest.raises(ValueError, match="its kernel is computed from params"):
    jaxprune.weight_distinctiveness(jaxprune.trace(lora_in, q, X), "w1")


def test_a_complex_kernel_assembled_from_two_params_reads_their_rows():
  """``h @ lax.complex(wr, wi)`` (an LRU's or S4D's input kernel): row i of the complex kernel
  is complex(wr[i], wi[i]), so the layer before stays a group whose consumers are the rows of
  wr and wi (it was blocked as a kernel not linear in its rows), and tracing raised NumPy's
  ComplexWarning naming the complex units' nonlinearity."""
  import warnings
  p = {"w1": _arr(5, 6), "b1": _arr(6), "wr": _arr(6, 4), "wi": _arr(6, 4), "w3": _arr(4, 3)}

  def fn(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    y = h.astype(jnp.complex64) @ jax.lax.complex(p["wr"], p["wi"])
    return jnp.abs(y) @ p["w3"]
  x = _arr(7, 5)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    t = jaxprune.trace(fn, p, x)
  assert {n: g.size for n, g in t.groups.items()} == {"w1": 6, "wi": 4}
  assert sorted((s.path[0], s.axis, s.role) for s in t.groups["w1"].consumers) == [
      ("wi", 0, "consumer"), ("wr", 0, "consumer")]
  assert t.groups["wi"].activation == "other"
  for _ in range(4):
    um = random_unit_masks(t, R)
    small, _, _ = assert_compacts_as_masked(t, p, fn, um, (x,), atol=1e-5)
    assert small["wr"].shape == small["wi"].shape == (int(um["w1"].sum()), int(um["wi"].sum()))
  # a complex kernel with a value of no row (wr + i c, c a constant) is not linear in them
  c = jnp.ones((6, 4))
  t2 = jaxprune.trace(lambda p, x: jnp.abs(jnp.tanh(x @ p["w1"] + p["b1"]).astype(
      jnp.complex64) @ jax.lax.complex(p["wr"], c)) @ p["w3"], p, x)
  assert "w1" not in t2.groups
