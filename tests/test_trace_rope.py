"""Attention heads under rotary position embeddings, however the rotation is written.

The same multi-head attention with RoPE written four ways: rotating halves (``concatenate``);
rotating pairs ``(2i, 2i + 1)`` with ``jnp.stack`` (GPT-J; a primitive of its own in newer JAX);
the same pairs with a concatenation of size-1 axes (how older JAX writes ``jnp.stack``); and the
pairs as complex numbers (``lax.complex``, ``.real``, ``.imag``; the Llama reference). Each must
give the heads as one group, and masking a head must equal a NumPy forward pass in float64 that
leaves the head out."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune

B, T, D, NH, DH = 3, 5, 16, 4, 4
_FREQS = 1.0 / (100.0 ** (np.arange(0, DH, 2) / DH))
_ANGLES = np.arange(T)[:, None] * _FREQS[None]           # (T, DH / 2)


def _rope_half(x):
  cos, sin = jnp.cos(_ANGLES)[:, None], jnp.sin(_ANGLES)[:, None]
  a, b = x[..., :DH // 2], x[..., DH // 2:]
  return jnp.concatenate([a * cos - b * sin, a * sin + b * cos], -1)


def _rope_stack(x):
  cos, sin = jnp.cos(_ANGLES)[:, None], jnp.sin(_ANGLES)[:, None]
  a, b = x[..., 0::2], x[..., 1::2]
  return jnp.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(x.shape)


def _rope_stack_as_concat(x):
  cos, sin = jnp.cos(_ANGLES)[:, None], jnp.sin(_ANGLES)[:, None]
  a, b = x[..., 0::2], x[..., 1::2]
  r, i = a * cos - b * sin, a * sin + b * cos
  return jax.lax.concatenate([r[..., None], i[..., None]], r.ndim).reshape(x.shape)


def _rope_complex(x):
  rot = jnp.exp(1j * jnp.asarray(_ANGLES))[:, None]
  z = jax.lax.complex(x[..., 0::2], x[..., 1::2]) * rot
  return jnp.stack([z.real, z.imag], -1).reshape(x.shape)


ROPES = {"half": _rope_half, "stack": _rope_stack, "stack_as_concat": _rope_stack_as_concat,
         "complex": _rope_complex}


def _attention(rope):
  def fn(p, x):
    heads = lambda w: (x @ w).reshape(x.shape[0], T, NH, DH)
    q, k, v = rope(heads(p["wq"])), rope(heads(p["wk"])), heads(p["wv"])
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(DH)
    o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)
    return o.reshape(x.shape[0], T, NH * DH) @ p["wo"]
  return fn


def _np_rope(x, kind):
  """One head's ``(B, T, DH)`` rotated."""
  cos, sin = np.cos(_ANGLES), np.sin(_ANGLES)
  if kind == "half":
    a, b = x[..., :DH // 2], x[..., DH // 2:]
    return np.concatenate([a * cos - b * sin, a * sin + b * cos], -1)
  out = np.empty_like(x)
  a, b = x[..., 0::2], x[..., 1::2]
  out[..., 0::2], out[..., 1::2] = a * cos - b * sin, a * sin + b * cos
  return out


def _np_attention(p, x, kind, kept):
  """float64 NumPy: the sum over the kept heads of each head's attention output times its rows
  of ``wo``."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  x = np.asarray(x, np.float64)
  y = 0.0
  for h in np.flatnonzero(kept):
    cols = slice(h * DH, (h + 1) * DH)
    q, k, v = (_np_rope(x @ p[w][:, cols], kind) if w != "wv" else x @ p[w][:, cols]
               for w in ("wq", "wk", "wv"))
    s = np.einsum("bqd,bkd->bqk", q, k) / np.sqrt(DH)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    y = y + np.einsum("bqk,bkd->bqd", a, v) @ p["wo"][cols]
  return y


def _params():
  ks = jax.random.split(jax.random.key(0), 4)
  return {w: jax.random.normal(k, (D, NH * DH) if w != "wo" else (NH * DH, D)) / 4
          for w, k in zip(("wq", "wk", "wv", "wo"), ks)}


def _heads(target):
  """The group of the heads: the one of size NH that spans all four kernels."""
  found = [n for n, g in target.groups.items()
           if g.size == NH and {s.path[-1] for s in g.slices} == {"wq", "wk", "wv", "wo"}]
  assert len(found) == 1, (list(target.groups), target.explain())
  return found[0]


@pytest.mark.parametrize("kind", list(ROPES))
def test_heads_are_one_group_and_masking_one_leaves_it_out(kind):
  p, x = _params(), jax.random.normal(jax.random.key(1), (B, T, D))
  fn = _attention(ROPES[kind])
  pairs = "half" if kind == "half" else "pairs"
  np.testing.assert_allclose(fn(p, x), _np_attention(p, x, pairs, np.ones(NH)),
                             rtol=2e-5, atol=2e-5)
  target = jaxprune.trace(fn, p, x)
  name = _heads(target)
  kept = np.array([True, False, True, True])
  ref = _np_attention(p, x, pairs, kept)
  masked = jaxprune.apply_masks(p, jaxprune.expand(p, target, {name: jnp.asarray(kept)}))
  np.testing.assert_allclose(fn(masked, x), ref, rtol=2e-5, atol=2e-5)
  small, small_target = target.compact(p, {name: jnp.asarray(kept)})
  assert small["wq"].shape == (D, 3 * DH) and small["wo"].shape == (3 * DH, D)
  np.testing.assert_allclose(small_target.apply(small, x), ref, rtol=2e-5, atol=2e-5)


def test_stack_is_read_as_older_jax_writes_it():
  """``jnp.stack`` and its concatenation of size-1 axes give the same groups and slices."""
  p, x = _params(), jax.random.normal(jax.random.key(1), (B, T, D))
  a = jaxprune.trace(_attention(_rope_stack), p, x)
  b = jaxprune.trace(_attention(_rope_stack_as_concat), p, x)
  assert {n: (g.size, g.slices) for n, g in a.groups.items()} == {
      n: (g.size, g.slices) for n, g in b.groups.items()}


def test_stack_along_the_units_ties_them_to_both_pieces():
  """Units stacked with another layer's units (``jnp.stack([h1, h2], 1)``, then a kernel over
  both) are one group: unit i of both layers is read by the same rows."""
  k = jax.random.split(jax.random.key(2), 3)
  p = {"w1": jax.random.normal(k[0], (D, 6)), "w2": jax.random.normal(k[1], (D, 6)),
       "w3": jax.random.normal(k[2], (2, 6, 3))}

  def fn(p, x):
    h = jnp.stack([jnp.tanh(x @ p["w1"]), jnp.tanh(x @ p["w2"])], 1)      # (B, 2, 6)
    return jnp.einsum("bsu,suo->bo", h, p["w3"])

  x = jax.random.normal(jax.random.key(3), (8, D))
  target = jaxprune.trace(fn, p, x)
  (name,) = target.groups
  assert {s.path[-1] for s in target.groups[name].slices} == {"w1", "w2", "w3"}
  kept = jnp.arange(6) != 4
  small, small_target = target.compact(p, {name: kept})
  ref = np.tanh(np.asarray(x) @ np.asarray(p["w1"])[:, kept]) @ np.asarray(p["w3"])[0][kept] + \
      np.tanh(np.asarray(x) @ np.asarray(p["w2"])[:, kept]) @ np.asarray(p["w3"])[1][kept]
  np.testing.assert_allclose(small_target.apply(small, x), ref, rtol=1e-5, atol=1e-5)


def _fused(cut):
  def fn(p, x):
    qkv = x @ p["w"]
    if cut == "split":
      q, k, v = (a.reshape(x.shape[0], T, NH, DH) for a in jnp.split(qkv, 3, -1))
    else:
      r = qkv.reshape(x.shape[0], T, 3, NH, DH)
      q, k, v = r[:, :, 0], r[:, :, 1], r[:, :, 2]
    s = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(DH), -1)
    return jnp.einsum("bhts,bshd->bthd", s, v).reshape(x.shape[0], T, NH * DH) @ p["o"]
  return fn


@pytest.mark.parametrize("cut", ["split", "reshape_and_index"])
def test_fused_qkv_heads_merge_exactly_whichever_way_qkv_is_cut(cut):
  """``qkv.reshape(B, T, 3, H, D)[:, :, i]`` cuts the product as ``jnp.split`` does: both give
  the heads complete activations (they were incomplete for the first), so a head that copies
  another merges into it with the outputs unchanged."""
  p, x = _params(), jax.random.normal(jax.random.key(1), (B, T, D))
  w = jnp.concatenate([p["wq"], p["wk"], p["wv"]], 1)
  for part in range(3):                        # head 2 copies head 0 in q, k and v
    cols = part * NH * DH
    w = w.at[:, cols + 2 * DH:cols + 3 * DH].set(w[:, cols:cols + DH])
  params = {"w": w, "o": p["wo"]}
  fn = _fused(cut)
  target = jaxprune.trace(fn, params, x)
  name = [n for n, g in target.groups.items() if g.size == NH][0]
  assert target.activations_complete(name)
  acts = target.activations(params, x, name)
  new, um, _ = jaxprune.distinctiveness(target, name, complementary=False, constants=False)(
      params, jaxprune.unit_masks_ones(target), acts, 1.0, 179.0)
  assert np.asarray(um[name]).tolist() == [True, True, False, True]
  small, small_target = target.compact(new, um)
  np.testing.assert_allclose(small_target.apply(small, x), fn(params, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cut", ["slices", "split"])
@pytest.mark.parametrize("between", ["scale", "shift"])
def test_a_part_changed_before_its_product_leaves_the_group_incomplete(cut, between):
  """Parts count as the value itself only when each goes straight into a product: one part
  scaled or shifted per unit first (here by a column of a reader's kernel, after the other
  part's product in program order) passes on other values, so a merge of two units with
  equal activations would change the outputs."""
  H = 4
  r = np.random.default_rng(0)
  p = {k: jnp.asarray(r.normal(size=s), jnp.float32)
       for k, s in (("w", (3, 2 * H)), ("b", (2 * H,)), ("A", (H, 2)), ("C", (H, 2)))}

  def fn(p, x):
    h = jax.nn.relu(x @ p["w"] + p["b"])
    a, c = (h[:, :H], h[:, H:]) if cut == "slices" else jnp.split(h, 2, -1)
    y = a @ p["A"]
    c = c * p["C"][:, 0] if between == "scale" else c + p["A"][:, 1]
    return y + c @ p["C"]

  target = jaxprune.trace(fn, p, jnp.asarray(r.normal(size=(5, 3)), jnp.float32))
  assert list(target.groups) == ["w"]
  assert not target.activations_complete("w")


def test_two_layers_paired_as_complex_numbers_keep_real_activations():
  """``lax.complex(x @ wa + ba, x @ wb + bb)`` ties the two layers' units: the chain stops
  before the complex value, so the activations are real (they were complex64, which the pruners
  then refused with wrong advice) and, with two kernels meeting after them, incomplete; the
  pruners from weights compact exactly. No ComplexWarning from the nonlinearity's grid."""
  import warnings
  r = np.random.default_rng(3)
  p = {k: jnp.asarray(r.normal(size=s), jnp.float32)
       for k, s in (("wa", (3, 4)), ("ba", (4,)), ("wb", (3, 4)), ("bb", (4,)), ("A", (4, 2)))}

  def fn(p, x):
    z = jax.lax.complex(x @ p["wa"] + p["ba"], x @ p["wb"] + p["bb"])
    return (z @ p["A"].astype(jnp.complex64)).real

  x = jnp.asarray(r.normal(size=(6, 3)), jnp.float32)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    target = jaxprune.trace(fn, p, x)
  assert list(target.groups) == ["wa"] and not target.activations_complete("wa")
  assert target.activations(p, x, "wa").dtype == jnp.float32
  new, um, _ = jaxprune.importance_prune(target, "wa")(p, jaxprune.unit_masks_ones(target), 1)
  small, small_target = target.compact(new, um)
  np.testing.assert_allclose(small_target.apply(small, x), fn(new, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cut", ["slices", "split", "three_slices", "reshape_and_index",
                                 "relu_on_one_part"])
def test_parts_read_straight_by_products_are_the_value_and_a_duplicate_merges(cut):
  """``h[:, :H] @ A + h[:, H:] @ B`` reads h as ``jnp.split`` does (the walk stops at the first
  product in program order, before the second cut: it was incomplete), so a unit that copies
  another in every part merges with the outputs unchanged; a nonlinearity on one part keeps
  the group incomplete."""
  H, k = 4, 3 if cut == "three_slices" else 2
  r = np.random.default_rng(5)
  p = {"w": jnp.asarray(r.normal(size=(6, k * H)), jnp.float32),
       "b": jnp.asarray(r.normal(size=(k * H,)), jnp.float32),
       "A": jnp.asarray(r.normal(size=(k, H, 3)), jnp.float32)}
  for part in range(k):                        # unit 1 copies unit 0 in every part
    p["w"] = p["w"].at[:, part * H + 1].set(p["w"][:, part * H])
    p["b"] = p["b"].at[part * H + 1].set(p["b"][part * H])

  def part(h, i):          # cut where it is read: a cut, a product, the next cut, ...
    if cut == "split":
      return jnp.split(h, k, -1)[i]
    if cut == "reshape_and_index":
      return h.reshape(-1, k, H)[:, i]
    q = h[:, i * H:(i + 1) * H]
    return jax.nn.relu(q) if cut == "relu_on_one_part" and i == 1 else q

  def fn(p, x):
    h = jnp.tanh(x @ p["w"] + p["b"])
    y = part(h, 0) @ p["A"][0]
    for i in range(1, k):
      y = y + part(h, i) @ p["A"][i]
    return y

  x = jnp.asarray(r.normal(size=(8, 6)), jnp.float32)
  target = jaxprune.trace(fn, p, x)
  assert list(target.groups) == ["w"]
  if cut == "relu_on_one_part":
    assert not target.activations_complete("w")
    return
  assert target.activations_complete("w")
  new, um, _ = jaxprune.distinctiveness(target, "w", complementary=False, constants=False)(
      p, jaxprune.unit_masks_ones(target), target.activations(p, x, "w"), 1.0, 179.0)
  assert np.asarray(um["w"]).tolist() == [True, False, True, True]
  small, small_target = target.compact(new, um)
  np.testing.assert_allclose(small_target.apply(small, x), fn(p, x), rtol=1e-5, atol=1e-5)
