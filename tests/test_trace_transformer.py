"""A small transformer an outside user brings, pruned end to end through ``jaxprune.trace``.

Pre-LN blocks (LayerNorm -> multi-head attention -> residual; LayerNorm -> SwiGLU MLP ->
residual; mean over time -> classifier) written five ways: linen with a fused qkv Dense(3E) and a
fused gate/value Dense(2H) cut by ``jnp.split``; linen Llama style (separate q, k, v, gate, up);
nnx with the fused kernels; plain JAX over a dict, two blocks in a Python loop with the fused
kernels cut by slices ``h[..., :H]``/``h[..., H:]``; the same with ``lax.scan`` over stacked
params. Every check compares with an independent NumPy forward pass (``_ref_forward``) or a
hand count, never with numbers the library computed."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxprune
from conftest import assert_compacts_as_masked, host_f32, random_unit_masks

D, T, B, E, NH, H, C, L = 16, 8, 32, 16, 2, 24, 5, 2
DH = E // NH
EPS = 1e-6


# ----------------------------------------------------------------------------- reference


def _np_ln(h, s, b):
  m = h.mean(-1, keepdims=True)
  v = ((h - m) ** 2).mean(-1, keepdims=True)
  return (h - m) / np.sqrt(v + EPS) * s + b


def _np_block(p, x):
  """One block in float64 NumPy from a reference-layout dict; returns (out, mlp activations)."""
  h = _np_ln(x, p["ln1_s"], p["ln1_b"])
  qkv = h @ p["wqkv"] + p["bqkv"]
  q, k, v = (qkv[..., i * E:(i + 1) * E].reshape(x.shape[0], T, NH, DH) for i in range(3))
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(DH)
  a = np.exp(s - s.max(-1, keepdims=True))
  a = a / a.sum(-1, keepdims=True)
  o = np.einsum("bhqk,bkhd->bqhd", a, v).reshape(x.shape[0], T, E)
  x = x + o @ p["wo"] + p["bo"]
  h = _np_ln(x, p["ln2_s"], p["ln2_b"])
  gu = h @ p["w1"] + p["b1"]
  g, u = gu[..., :H], gu[..., H:]
  act = g / (1 + np.exp(-g)) * u
  return x + act @ p["w2"] + p["b2"], act


def _ref_forward(blocks, head, x):
  """(logits, [mlp activations per block]) in float64."""
  x = np.asarray(x, np.float64)
  acts = []
  for p in blocks:
    x, a = _np_block(p, x)
    acts.append(a)
  return x.mean(1) @ head[0] + head[1], acts


def _np(a):
  return np.asarray(a, np.float64)


# ----------------------------------------------------------------------------- models


class LinenBlock(nn.Module):
  fused: bool = True

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(epsilon=EPS, name="ln1")(x)
    if self.fused:
      q, k, v = jnp.split(nn.Dense(3 * E, name="qkv")(h), 3, -1)
    else:
      q, k, v = (nn.Dense(E, name=n)(h) for n in ("q", "k", "v"))
    heads = lambda a: a.reshape(a.shape[0], T, NH, DH)
    q, k, v = heads(q), heads(k), heads(v)
    a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(DH), -1)
    o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(x.shape[0], T, E)
    x = x + nn.Dense(D, name="o")(o)
    h = nn.LayerNorm(epsilon=EPS, name="ln2")(x)
    if self.fused:
      g, u = jnp.split(nn.Dense(2 * H, name="gu")(h), 2, -1)
    else:
      g, u = nn.Dense(H, name="gate")(h), nn.Dense(H, name="up")(h)
    x = x + nn.Dense(D, name="down")(nn.silu(g) * u)
    return nn.Dense(C, name="head")(x.mean(1))


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.ln1 = nnx.LayerNorm(D, epsilon=EPS, rngs=rngs)
    self.ln2 = nnx.LayerNorm(D, epsilon=EPS, rngs=rngs)
    self.qkv = nnx.Linear(D, 3 * E, rngs=rngs)
    self.o = nnx.Linear(E, D, rngs=rngs)
    self.gu = nnx.Linear(D, 2 * H, rngs=rngs)
    self.down = nnx.Linear(H, D, rngs=rngs)
    self.head = nnx.Linear(D, C, rngs=rngs)

  def __call__(self, x):
    q, k, v = jnp.split(self.qkv(self.ln1(x)), 3, -1)
    heads = lambda a: a.reshape(a.shape[0], a.shape[1], NH, -1)
    o = nnx.dot_product_attention(heads(q), heads(k), heads(v))
    x = x + self.o(o.reshape(x.shape[0], x.shape[1], -1))
    g, u = jnp.split(self.gu(self.ln2(x)), 2, -1)
    x = x + self.down(nnx.silu(g) * u)
    return self.head(x.mean(1))


def _plain_block(p, x):
  h = _np_ln_jnp(x, p["ln1_s"], p["ln1_b"])
  qkv = h @ p["wqkv"] + p["bqkv"]
  q, k, v = qkv[..., :E], qkv[..., E:2 * E], qkv[..., 2 * E:]
  heads = lambda a: a.reshape(a.shape[0], T, NH, -1)
  q, k, v = heads(q), heads(k), heads(v)
  a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(DH), -1)
  o = jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(x.shape[0], T, -1)
  x = x + o @ p["wo"] + p["bo"]
  gu = _np_ln_jnp(x, p["ln2_s"], p["ln2_b"]) @ p["w1"] + p["b1"]
  g, u = gu[..., :H], gu[..., H:]
  return x + (jax.nn.silu(g) * u) @ p["w2"] + p["b2"]


def _np_ln_jnp(h, s, b):
  m = h.mean(-1, keepdims=True)
  v = ((h - m) ** 2).mean(-1, keepdims=True)
  return (h - m) / jnp.sqrt(v + EPS) * s + b


def _plain_params(rng):
  f = lambda *s: host_f32(rng.normal(size=s) / np.sqrt(s[0]))
  b = lambda n: host_f32(0.1 * rng.normal(size=n))
  return {"ln1_s": 1 + b(D), "ln1_b": b(D), "wqkv": f(D, 3 * E), "bqkv": b(3 * E),
          "wo": f(E, D), "bo": b(D), "ln2_s": 1 + b(D), "ln2_b": b(D),
          "w1": f(D, 2 * H), "b1": b(2 * H), "w2": f(H, D), "b2": b(D)}


def plain_loop(p, x):
  for bp in p["blocks"]:
    x = _plain_block(bp, x)
  return x.mean(1) @ p["wh"] + p["bh"]


def plain_scan(p, x):
  x, _ = jax.lax.scan(lambda c, bp: (_plain_block(bp, c), None), x, p["blocks"])
  return x.mean(1) @ p["wh"] + p["bh"]


# ------------------------------------------------ each model's params in the reference layout


def _linen_to_ref(params, fused):
  p = params["params"]
  d = lambda n: (_np(p[n]["kernel"]), _np(p[n]["bias"]))
  r = {"ln1_s": _np(p["ln1"]["scale"]), "ln1_b": _np(p["ln1"]["bias"]),
       "ln2_s": _np(p["ln2"]["scale"]), "ln2_b": _np(p["ln2"]["bias"])}
  r["wo"], r["bo"] = d("o")
  r["w2"], r["b2"] = d("down")
  if fused:
    r["wqkv"], r["bqkv"] = d("qkv")
    r["w1"], r["b1"] = d("gu")
  else:
    r["wqkv"] = np.concatenate([d(n)[0] for n in "qkv"], 1)
    r["bqkv"] = np.concatenate([d(n)[1] for n in "qkv"])
    r["w1"] = np.concatenate([d("gate")[0], d("up")[0]], 1)
    r["b1"] = np.concatenate([d("gate")[1], d("up")[1]])
  return [r], d("head")


def _linen_set_mlp(params, fused, layers):
  """Params with the MLP's (w1, b1) replaced (reference layout: gate | value columns)."""
  (w1, b1), = layers
  p = jax.tree.map(lambda a: a, params)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  if fused:
    p["params"]["gu"] = {"kernel": f32(w1), "bias": f32(b1)}
  else:
    p["params"]["gate"] = {"kernel": f32(w1[:, :H]), "bias": f32(b1[:H])}
    p["params"]["up"] = {"kernel": f32(w1[:, H:]), "bias": f32(b1[H:])}
  return p


def _nnx_to_ref(state):
  g = lambda n, leaf: _np(state[n][leaf][...])
  r = {"ln1_s": g("ln1", "scale"), "ln1_b": g("ln1", "bias"),
       "ln2_s": g("ln2", "scale"), "ln2_b": g("ln2", "bias"),
       "wqkv": g("qkv", "kernel"), "bqkv": g("qkv", "bias"), "wo": g("o", "kernel"),
       "bo": g("o", "bias"), "w1": g("gu", "kernel"), "b1": g("gu", "bias"),
       "w2": g("down", "kernel"), "b2": g("down", "bias")}
  return [r], (g("head", "kernel"), g("head", "bias"))


def _nnx_set_mlp(state, layers):
  (w1, b1), = layers
  s = jax.tree.map(lambda a: a, state)
  s["gu"]["kernel"][...] = jnp.asarray(w1, jnp.float32)
  s["gu"]["bias"][...] = jnp.asarray(b1, jnp.float32)
  return s


def _plain_to_ref(p, stacked):
  blocks = ([jax.tree.map(lambda a: _np(a[i]), p["blocks"]) for i in range(L)] if stacked
            else [jax.tree.map(_np, bp) for bp in p["blocks"]])
  return blocks, (_np(p["wh"]), _np(p["bh"]))


def _plain_set_mlp(p, stacked, layers):
  p = jax.tree.map(lambda a: a, p)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  if stacked:
    p["blocks"] = {**p["blocks"], "w1": f32(np.stack([w for w, _ in layers])),
                   "b1": f32(np.stack([b for _, b in layers]))}
  else:
    p["blocks"] = [{**bp, "w1": f32(w), "b1": f32(b)} for bp, (w, b) in zip(p["blocks"], layers)]
  return p


class Case:
  """One traced model: its function, params, target and the reference-layout accessors."""

  def __init__(self, name, fn, params, to_ref, set_mlp, mlp_groups, head_groups, qk_groups):
    self.name, self.fn, self.params = name, fn, params
    self.to_ref, self.set_mlp = to_ref, set_mlp
    self.target = jaxprune.trace(fn, params, X)
    # group name -> the reference blocks it covers (one; all L when scanned).
    self.mlp_groups, self.head_groups = mlp_groups, head_groups
    # group name -> (reference blocks, the qkv parts it spans): the query/key feature d of
    # every head (with v's when one fused kernel holds q, k and v: the same column of each part)
    self.qk_groups = qk_groups


X = jax.random.normal(jax.random.key(0), (B, T, D))
Y = jax.random.randint(jax.random.key(1), (B,), 0, C)


def _make_cases():
  cases = {}
  m = LinenBlock(True)
  p = m.init(jax.random.key(2), X)
  cases["linen_fused"] = Case("linen_fused", m.apply, p, lambda q: _linen_to_ref(q, True),
                              lambda q, ls: _linen_set_mlp(q, True, ls), {"gu": [0]}, {"qkv": [0]},
                              {"qkv:1": ([0], (0, 1, 2))})
  m = LinenBlock(False)
  p = m.init(jax.random.key(3), X)
  cases["linen_llama"] = Case("linen_llama", m.apply, p, lambda q: _linen_to_ref(q, False),
                              lambda q, ls: _linen_set_mlp(q, False, ls), {"gate": [0]},
                              {"q": [0], "v": [0]}, {"q:1": ([0], (0, 1))})
  graphdef, state, rest = nnx.split(NnxBlock(nnx.Rngs(4)), nnx.Param, ...)
  cases["nnx_fused"] = Case("nnx_fused", lambda s, x: nnx.merge(graphdef, s, rest)(x), state,
                            _nnx_to_ref, _nnx_set_mlp, {"gu": [0]}, {"qkv": [0]},
                            {"qkv:1": ([0], (0, 1, 2))})
  rng = np.random.default_rng(5)
  p = {"blocks": [_plain_params(rng) for _ in range(L)],
       "wh": host_f32(rng.normal(size=(D, C)) / 4), "bh": jnp.zeros(C)}
  cases["plain_loop"] = Case("plain_loop", plain_loop, p, lambda q: _plain_to_ref(q, False),
                             lambda q, ls: _plain_set_mlp(q, False, ls),
                             {"blocks/0/w1": [0], "blocks/1/w1": [1]},
                             {"blocks/0": [0], "blocks/1": [1]},
                             {"blocks/0:1": ([0], (0, 1, 2)), "blocks/1:1": ([1], (0, 1, 2))})
  p = {"blocks": jax.tree.map(lambda *a: jnp.stack(a), *[_plain_params(rng) for _ in range(L)]),
       "wh": host_f32(rng.normal(size=(D, C)) / 4), "bh": jnp.zeros(C)}
  cases["plain_scan"] = Case("plain_scan", plain_scan, p, lambda q: _plain_to_ref(q, True),
                             lambda q, ls: _plain_set_mlp(q, True, ls), {"blocks/w1": [0, 1]},
                             {"blocks": [0, 1]}, {"blocks:2": ([0, 1], (0, 1, 2))})
  return cases


_CASES = {}


def _case(name):
  if not _CASES:
    _CASES.update(_make_cases())
  return _CASES[name]


NAMES = ["linen_fused", "linen_llama", "nnx_fused", "plain_loop", "plain_scan"]


@pytest.fixture(scope="module", params=NAMES)
def case(request):
  return _case(request.param)


def _mlp_layers(case, params):
  blocks, _ = case.to_ref(params)
  return [(b["w1"].copy(), b["b1"].copy()) for b in blocks]


# ----------------------------------------------------------------------------- tests


def test_reference_matches_models(case):
  """The NumPy reference computes what each model computes (so it can judge the rest)."""
  blocks, head = case.to_ref(case.params)
  want, _ = _ref_forward(blocks, head, X)
  np.testing.assert_allclose(case.fn(case.params, X), want, atol=2e-5)


def test_groups_are_mlp_units_and_heads(case):
  sizes = {n: g.size for n, g in case.target.groups.items()}
  want = ({n: H for n in case.mlp_groups} | {n: NH for n in case.head_groups}
          | {n: DH for n in case.qk_groups})
  if case.name == "linen_llama":
    want["v"] = DH              # v's head dimension, shared by the heads, is a group too
  assert sizes == want
  assert {n for n, g in case.target.groups.items() if g.read_by_products} == set(case.qk_groups)
  for n in case.mlp_groups:
    assert case.target.groups[n].activation == "other"          # silu(g) * u
    assert case.target.activations_complete(n)


def _ones(target):
  return jaxprune.unit_masks_ones(target)


def _assert_zeroed(full, mref, spans, qkv_cols, wo_rows, name):
  """The masked reference blocks equal the full ones but for q/k/v columns ``qkv_cols`` and the
  output projection's rows ``wo_rows``, zeroed in the blocks ``spans``."""
  for i, (bf, bm) in enumerate(zip(full[0], mref[0])):
    for k in bf:
      want = bf[k].copy()
      if i in spans:
        if k in ("wqkv", "bqkv"):
          want[..., qkv_cols] = 0
        if k == "wo":
          want[list(wo_rows)] = 0
      np.testing.assert_array_equal(bm[k], want, err_msg=f"{name} {k} block {i}")


def test_expand_zeroes_exactly_the_unit(case):
  """Removing MLP unit j zeroes gate column j, value column H + j, their biases and row j of
  the down projection, in every block the group spans, and nothing else; removing head h
  zeroes q, k and v's columns h * DH .. and the output projection's rows of that head."""
  tg, p = case.target, case.params
  for name, blocks in case.mlp_groups.items():
    um = _ones(tg)
    um[name] = um[name].at[3].set(False)
    masked = jaxprune.apply_masks(p, jaxprune.expand(p, tg, um))
    full, mref = case.to_ref(p), case.to_ref(masked)
    for i, (bf, bm) in enumerate(zip(full[0], mref[0])):
      for k in bf:
        want = bf[k].copy()
        if i in blocks:
          if k in ("w1", "b1"):
            want[..., [3, H + 3]] = 0
          if k == "w2":
            want[3] = 0
        np.testing.assert_array_equal(bm[k], want, err_msg=f"{name} {k} block {i}")
  for name, spans in case.head_groups.items():
    if tg.groups[name].size != NH:
      continue
    um = _ones(tg)
    um[name] = um[name].at[1].set(False)
    masked = jaxprune.apply_masks(p, jaxprune.expand(p, tg, um))
    cols = [part * E + DH + d for part in range(3) for d in range(DH)]
    _assert_zeroed(case.to_ref(p), case.to_ref(masked), spans, cols, range(DH, 2 * DH), name)


def test_query_key_features_are_removed_exactly(case):
  """Removing query/key feature 3 zeroes column 3 of every head in q and k (and in v, with the
  output projection's rows, when one fused kernel cuts q, k and v into equal parts), nothing
  else; the compacted model computes what the float64 NumPy forward pass computes on the
  masked weights. Merging such units is refused: a unit's term in q @ k.T is a product."""
  tg, p = case.target, case.params
  for name, (spans, parts) in case.qk_groups.items():
    um = _ones(tg)
    um[name] = um[name].at[3].set(False)
    masked = jaxprune.apply_masks(p, jaxprune.expand(p, tg, um))
    mref = case.to_ref(masked)
    cols = [part * E + h * DH + 3 for part in parts for h in range(NH)]
    wo_rows = [h * DH + 3 for h in range(NH)] if 2 in parts else []
    _assert_zeroed(case.to_ref(p), mref, spans, cols, wo_rows, name)
    small, small_tg = tg.compact(p, um)
    ref, _ = _ref_forward(*mref, X)
    np.testing.assert_allclose(small_tg.apply(small, X), ref, atol=2e-5, err_msg=name)
    with pytest.raises(ValueError, match="contracted between two activations"):
      jaxprune.weight_distinctiveness(tg, name)
    with pytest.raises(ValueError, match="contracted between two activations"):
      jaxprune.distinctiveness(tg, name)
    _, kept, _ = jaxprune.importance_prune(tg, name)(p, _ones(tg), 2)
    assert int(kept[name].sum()) == DH - 2


def test_compact_equals_masked(case):
  tg, p = case.target, case.params
  rng = np.random.default_rng(7)
  for i, (name, g) in enumerate(tg.groups.items()):
    um = _ones(tg)
    keep = rng.random(g.size) < 0.5
    keep[0], keep[-1] = True, False
    um[name] = jnp.asarray(keep)
    masked = jaxprune.apply_masks(p, jaxprune.expand(p, tg, um))
    small, small_tg = tg.compact(masked, um)
    xb = X if i % 2 else X[:7]          # the traced batch size and another, alternately
    np.testing.assert_allclose(small_tg.apply(small, xb), case.fn(masked, xb), atol=2e-5,
                               err_msg=name)


def test_mlp_activations_are_silu_gate_times_value(case):
  blocks, head = case.to_ref(case.params)
  _, acts = _ref_forward(blocks, head, X)
  for name, idx in case.mlp_groups.items():
    got = case.target.activations(case.params, X, name)
    want = np.stack([acts[i] for i in idx]) if len(idx) > 1 else acts[idx[0]]
    np.testing.assert_allclose(got, want, atol=2e-5, err_msg=name)


def _with_copy(case, name, i, j, value_scale=1.0):
  """Params where MLP unit j of group ``name`` copies unit i (gate and value columns and
  biases); its value column and bias times ``value_scale``."""
  layers = _mlp_layers(case, case.params)
  for b in case.mlp_groups[name]:
    w, bias = layers[b]
    w[:, j], bias[j] = w[:, i], bias[i]
    w[:, H + j], bias[H + j] = value_scale * w[:, H + i], value_scale * bias[H + i]
  return case.set_mlp(case.params, layers)


def _last_mlp(case):
  """The last block's MLP group (the one that reads every block before it)."""
  return list(case.mlp_groups)[-1:]


def _merge_duplicate(case, **options):
  tg = case.target
  for name in _last_mlp(case):
    p = _with_copy(case, name, 2, 9)
    before = case.fn(p, X)
    acts = tg.activations(p, X, name)
    prune = jaxprune.distinctiveness(tg, name, complementary=False, **options)
    p2, um, _ = prune(p, _ones(tg), acts, 0.5, 180.0)
    assert np.flatnonzero(~np.asarray(um[name])).tolist() == [9], name
    np.testing.assert_allclose(case.fn(p2, X), before, atol=2e-5)
    small, small_tg = tg.compact(p2, um)
    np.testing.assert_allclose(small_tg.apply(small, X[:5]), before[:5], atol=2e-5)


def test_distinctiveness_merges_an_exact_duplicate(case):
  _merge_duplicate(case, constants=False)


def test_distinctiveness_with_constants_folds_into_the_down_bias(case):
  """The default rules (constants on) also run: the down projection's bias takes the folds."""
  _merge_duplicate(case)


def test_weight_distinctiveness(case):
  """Incoming vectors are a unit's gate and value columns (biases left out): a copied unit is
  at 0 degrees and merged; the constant rule is refused (silu(g) * u of a zero-weight unit is
  not act(bias)) with the way out named."""
  tg = case.target
  for name in _last_mlp(case):
    p = _with_copy(case, name, 2, 9)
    with pytest.raises(ValueError, match="constants=False"):
      jaxprune.weight_distinctiveness(tg, name)
    prune = jaxprune.weight_distinctiveness(tg, name, constants=False, complementary=False)
    p2, um, _ = prune(p, _ones(tg), 0.5, 180.0)
    assert np.flatnonzero(~np.asarray(um[name])).tolist() == [9], name
    # A copy's activations equal its original's, so the merge is exact here.
    np.testing.assert_allclose(case.fn(p2, X), case.fn(p, X), atol=2e-5)


def test_importance_scores_are_rms_of_gate_and_value_columns(case):
  tg = case.target
  for name, idx in case.mlp_groups.items():
    layers = _mlp_layers(case, case.params)
    w = np.concatenate([np.concatenate([layers[b][0][:, :H], layers[b][0][:, H:]], 0)
                        for b in idx], 0)                       # (rows of every block, H)
    want = np.sqrt((w ** 2).mean(0))
    _, um, rep = jaxprune.importance_prune(tg, name)(case.params, _ones(tg), 5)
    np.testing.assert_allclose(rep.scores, want, rtol=1e-5)
    assert set(np.flatnonzero(~np.asarray(um[name]))) == set(np.argsort(want, kind="stable")[:5])


def test_group_redundancy_removes_a_scaled_copy_exactly(case):
  """Unit 9 = 2 x unit 2 (gate copied, value doubled): rebuilt exactly from unit 2, so it goes
  and the outputs stay."""
  tg = case.target
  for name in _last_mlp(case):
    p = _with_copy(case, name, 2, 9, value_scale=2.0)
    acts = tg.activations(p, X, name)
    p2, um, _ = jaxprune.group_redundancy(tg, name)(p, _ones(tg), acts, 1e-4)
    removed = np.flatnonzero(~np.asarray(um[name])).tolist()
    assert removed in ([9], [2]), (name, removed)
    np.testing.assert_allclose(case.fn(p2, X), case.fn(p, X), atol=5e-5)


def test_pruners_from_activations_refuse_attention_heads(case):
  """A head's q, k and v reach the output through softmax attention: a linear rebuild of one
  head from others is not exact there, and a constant head's fold is refused."""
  tg = case.target
  for name in case.head_groups:
    with pytest.raises(ValueError, match="not exact|read other values"):
      jaxprune.group_redundancy(tg, name)
    # Fused qkv: the head's activations are its q, k and v (complete), and the fold through
    # attention is refused; separate q, k, v: the activations are q's alone (incomplete).
    with pytest.raises(ValueError, match="constants=False|read other values"):
      jaxprune.distinctiveness(tg, name)


def test_fit_trains_with_masked_units_held_at_zero(case):
  tg = case.target
  name = next(iter(case.mlp_groups))
  um = _ones(tg)
  um[name] = jnp.arange(H) % 3 != 0
  wm = jaxprune.expand(case.params, tg, um)
  p = jaxprune.apply_masks(case.params, wm)
  p2, hist = jaxprune.fit(tg, p, X, Y, key=jax.random.key(8), epochs=3, batch_size=32,
                          learning_rate=1e-2, masks=wm, progress=False)
  loss = np.asarray(hist["loss"])
  assert loss[-1] < loss[0]
  for leaf, m in zip(jax.tree.leaves(p2), jax.tree.leaves(wm)):
    assert not np.any(np.asarray(leaf)[~np.asarray(m)])


def test_flops_of_the_mlp_match_a_hand_count(case):
  tg = case.target
  name, idx = next(iter(case.mlp_groups.items()))
  um = _ones(tg)
  keep = np.arange(H) % 3 != 0
  um[name] = jnp.asarray(keep)
  kept = int(keep.sum())
  rep = jaxprune.flops_report(tg, case.params, X[:1], unit_masks=um)
  steps = len(idx)
  # Per example: the gate and value products, 2 x T x D x 2H; the down projection 2 x T x H x D.
  up_dense, down_dense = 2 * T * D * 2 * H * steps, 2 * T * H * D * steps
  up_small, down_small = 2 * T * D * 2 * kept * steps, 2 * T * kept * D * steps
  rows = {r["name"]: r for r in rep["layers"]}
  if case.name in ("linen_fused", "nnx_fused"):
    pre = "params/" if case.name == "linen_fused" else ""
    up, down = [rows[f"{pre}gu/kernel"]], rows[f"{pre}down/kernel"]
  elif case.name == "linen_llama":
    up = [rows["params/gate/kernel"], rows["params/up/kernel"]]
    down = rows["params/down/kernel"]
  elif case.name == "plain_loop":
    up, down = [rows["blocks/0/w1"]], rows["blocks/0/w2"]
  else:
    up, down = [rows["blocks/w1"]], rows["blocks/w2"]
  assert sum(r["flops"] for r in up) == up_dense
  assert down["flops"] == down_dense
  assert sum(r["masked_flops"] for r in up) == up_small
  assert sum(r["compact_flops"] for r in up) == up_small
  assert down["compact_flops"] == down_small
  # The compacted network, traced again, counts the same.
  masked = jaxprune.apply_masks(case.params, jaxprune.expand(case.params, tg, um))
  small, small_tg = tg.compact(masked, um)
  rep2 = jaxprune.flops_report(small_tg, small, X[:1])
  rows2 = {r["name"]: r for r in rep2["layers"]}
  assert sum(rows2[r["name"]]["flops"] for r in up) == up_small
  assert rows2[down["name"]]["flops"] == down_small


# ----------------------------------------------------------------------------- heads

FUSED = ["linen_fused", "nnx_fused", "plain_loop", "plain_scan"]


def _copy_head(params, src, dst):
  """Params where head ``dst`` of every fused qkv kernel and bias copies head ``src``."""
  def f(path, a):
    s = jax.tree_util.keystr(path)
    if "qkv" not in s:
      return a
    a = np.array(a)
    for part in range(3):
      a[..., part * E + dst * DH:part * E + (dst + 1) * DH] = \
          a[..., part * E + src * DH:part * E + (src + 1) * DH]
    return jnp.asarray(a)
  return jax.tree_util.tree_map_with_path(f, params)


@pytest.mark.parametrize("name", FUSED)
def test_heads_activations_are_q_k_v_heads_last(name):
  """A fused qkv head's activations: its q, k and v values, (..., 3, DH, heads)."""
  case = _case(name)
  blocks, _ = case.to_ref(case.params)
  x = np.asarray(X, np.float64)
  want = []
  for b in blocks:
    qkv = _np_ln(x, b["ln1_s"], b["ln1_b"]) @ b["wqkv"] + b["bqkv"]
    want.append(np.moveaxis(qkv.reshape(B, T, 3, NH, DH), 3, -1))
    x, _ = _np_block(b, x)
  for hg, idx in case.head_groups.items():
    got = case.target.activations(case.params, X, hg)
    w = np.stack([want[i] for i in idx]) if len(idx) > 1 else want[idx[0]]
    np.testing.assert_allclose(got, w, atol=2e-5)


@pytest.mark.parametrize("name", FUSED)
def test_duplicate_head_is_merged_exactly(name):
  """Head 1 a copy of head 0: both the activation and the weight angle are 0, and merging it
  (its output projection rows added to head 0's) leaves the outputs unchanged."""
  case = _case(name)
  tg = case.target
  p = _copy_head(case.params, 0, 1)
  before = case.fn(p, X)
  for hg in list(case.head_groups)[-1:]:
    acts = tg.activations(p, X, hg)
    p2, um, _ = jaxprune.distinctiveness(tg, hg, constants=False, complementary=False)(
        p, _ones(tg), acts, 0.5, 180.0)
    assert np.asarray(um[hg]).tolist() == [True, False]
    np.testing.assert_allclose(case.fn(p2, X), before, atol=2e-5)
    p3, um, _ = jaxprune.weight_distinctiveness(tg, hg, constants=False, complementary=False)(
        p, _ones(tg), 0.5, 180.0)
    assert np.asarray(um[hg]).tolist() == [True, False]
    small, small_tg = tg.compact(p3, um)
    np.testing.assert_allclose(small_tg.apply(small, X[:3]), before[:3], atol=2e-5)


@pytest.mark.parametrize("name", FUSED)
def test_head_importance_is_rms_of_its_q_k_v_columns(name):
  case = _case(name)
  blocks, _ = case.to_ref(case.params)
  for hg, idx in case.head_groups.items():
    w = np.concatenate([blocks[i]["wqkv"] for i in idx], 0)
    want = [np.sqrt((w[:, [pt * E + h * DH + d for pt in range(3) for d in range(DH)]] ** 2)
                    .mean()) for h in range(NH)]
    _, um, rep = jaxprune.importance_prune(case.target, hg)(case.params, _ones(case.target), 1)
    np.testing.assert_allclose(rep.scores, want, rtol=1e-5)
    assert int(np.flatnonzero(~np.asarray(um[hg]))[0]) == int(np.argmin(want))


def test_every_group_at_once_then_again_on_the_small_target(case):
  """Heads and MLP units cut together; the small target's activations are the kept columns of
  the masked network's; compacting the small target again equals masking the original with
  the combined masks; uncompact puts the masked params back."""
  tg, p = case.target, case.params
  rng = np.random.default_rng(11)
  um = {n: jnp.asarray(np.r_[True, rng.random(g.size - 1) < 0.6]) for n, g in tg.groups.items()}
  masked = jaxprune.apply_masks(p, jaxprune.expand(p, tg, um))
  small, small_tg = tg.compact(masked, um)
  np.testing.assert_allclose(small_tg.apply(small, X[:5]), case.fn(masked, X[:5]), atol=2e-5)
  blocks, head = case.to_ref(masked)
  _, acts = _ref_forward(blocks, head, X)
  name, idx = next(iter(case.mlp_groups.items()))
  keep = np.asarray(um[name])
  want = (np.stack([acts[i] for i in idx]) if len(idx) > 1 else acts[idx[0]])[..., keep]
  np.testing.assert_allclose(small_tg.activations(small, X, name), want, atol=2e-5)
  um2 = jaxprune.unit_masks_ones(small_tg)
  um2[name] = jnp.arange(int(keep.sum())) % 2 == 0
  small2, small_tg2 = small_tg.compact(small, um2)
  both = dict(um)
  kept = np.flatnonzero(keep)[np.asarray(um2[name])]
  both[name] = jnp.asarray(np.isin(np.arange(H), kept))
  masked2 = jaxprune.apply_masks(p, jaxprune.expand(p, tg, both))
  np.testing.assert_allclose(small_tg2.apply(small2, X[:5]), case.fn(masked2, X[:5]), atol=2e-5)
  back = jaxprune.uncompact(small, p, tg, um)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(masked)):
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- bugs left open


def _glu_params():
  r = np.random.default_rng(0)
  f = lambda *s: host_f32(r.normal(size=s))
  p = {"w1": f(6, 16), "b1": f(16), "w2": f(8, 3), "b2": f(3)}
  w1, b1 = np.array(p["w1"]), np.array(p["b1"])
  for c0, c1 in ((0, 1), (8, 9)):           # unit 1's gate and value: twice unit 0's
    w1[:, c1], b1[c1] = 2 * w1[:, c0], 2 * b1[c0]
  return {**p, "w1": jnp.asarray(w1), "b1": jnp.asarray(b1)}, f(40, 6)


def _glu_halves(p, x):
  h = x @ p["w1"] + p["b1"]
  return (jax.nn.silu(h[:, :8]) * h[:, 8:]) @ p["w2"] + p["b2"]


def _glu_reshaped(p, x):
  h = (x @ p["w1"] + p["b1"]).reshape(x.shape[0], 2, 8)
  return (jax.nn.silu(h[:, 0]) * h[:, 1]) @ p["w2"] + p["b2"]


@pytest.mark.parametrize("fn", [
    _glu_halves,
    _glu_reshaped,   # a GLU cut by reshape to (B, 2, H) and indexing: was the dense output
])
def test_glu_activations_whichever_way_the_kernel_is_cut(fn):
  p, x = _glu_params()
  tg = jaxprune.trace(fn, p, x)
  h = np.asarray(x @ p["w1"] + p["b1"], np.float64)
  want = h[:, :8] / (1 + np.exp(-h[:, :8])) * h[:, 8:]
  acts = tg.activations(p, x, "w1")
  assert acts.shape == want.shape
  np.testing.assert_allclose(acts, want, atol=1e-4)
  assert tg.groups["w1"].activation == "other"
  # Unit 1 is not parallel to unit 0 in silu(g) * u: a 0.5-degree merge leaves every unit.
  _, um, _ = jaxprune.distinctiveness(tg, "w1", constants=False, complementary=False)(
      p, jaxprune.unit_masks_ones(tg), acts, 0.5, 180.0)
  assert np.asarray(um["w1"]).all()


def _residual_mlp(bias_inside):
  def fn(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return x + (h @ p["w2"] + p["b2"]) if bias_inside else x + h @ p["w2"] + p["b2"]
  return fn


@pytest.mark.parametrize("bias_inside", [
    True,
    False,   # (x + h @ w2) + b2: b2 was not found as w2's bias
])
def test_bias_added_after_a_residual_sum_is_the_consumers_bias(bias_inside):
  r = np.random.default_rng(1)
  p = {"w1": host_f32(r.normal(size=(4, 6))), "b1": jnp.zeros(6),
       "w2": host_f32(r.normal(size=(6, 4))), "b2": jnp.zeros(4)}
  x = host_f32(r.normal(size=(10, 4)))
  tg = jaxprune.trace(_residual_mlp(bias_inside), p, x)
  consumer, = tg.groups["w1"].consumers
  assert consumer.bias == ("b2",)
  assert tg.groups["w1"].exact_constant_fold


# ---------------------------------------------------------------- grouped-query attention


def _gqa(repeat):
  """4 query heads sharing 2 kv heads (Llama 2/3's grouped-query attention), the kv heads read
  by a grouped einsum or repeated to the query heads' count (``jnp.repeat``)."""
  nq, nkv, dh = 4, 2, 3

  def fn(p, x):
    b, t, _ = x.shape
    q = (x @ p["wq"]).reshape(b, t, nkv, nq // nkv, dh)
    k = (x @ p["wk"]).reshape(b, t, nkv, dh)
    v = (x @ p["wv"]).reshape(b, t, nkv, dh)
    if repeat:
      q = q.reshape(b, t, nq, dh)
      k, v = (jnp.repeat(a, nq // nkv, axis=2) for a in (k, v))
      a = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k) / np.sqrt(dh), -1)
      o = jnp.einsum("bhts,bshd->bthd", a, v)
    else:
      a = jax.nn.softmax(jnp.einsum("btkgd,bskd->bkgts", q, k) / np.sqrt(dh), -1)
      o = jnp.einsum("bkgts,bskd->btkgd", a, v)
    return (o.reshape(b, t, nq * dh) @ p["wo"]).mean(1) @ p["head"]

  rng = np.random.default_rng(3)
  shapes = {"wq": (6, nq * dh), "wk": (6, nkv * dh), "wv": (6, nkv * dh), "wo": (nq * dh, 6),
            "head": (6, 2)}
  p = {n: jnp.asarray(rng.normal(size=s), jnp.float32) for n, s in shapes.items()}
  return fn, p, jnp.asarray(rng.normal(size=(3, 5, 6)), jnp.float32)


@pytest.mark.parametrize("repeat", [False, True], ids=["grouped_einsum", "repeat"])
def test_grouped_query_attention_has_a_group_for_each_axis_of_the_query_kernel(repeat):
  # The query kernel's columns are (kv group, query head within it, feature): three groups of
  # one leaf axis, each with a name of its own (two shared "wq:1" once, and every compact failed).
  fn, p, x = _gqa(repeat)
  t = jaxprune.trace(fn, p, x)
  slices = {n: sorted((s.path[0], s.axis, s.role) for s in g.slices) for n, g in t.groups.items()}
  assert {n: g.size for n, g in t.groups.items()} == {
      "wq": 2, "wq:1": 2, "wq:1.3": 3, "wv": 3, "wo": 6}
  assert slices["wq"] == [("wk", 1, "producer"), ("wo", 0, "consumer"),
                          ("wq", 1, "producer"), ("wv", 1, "producer")]
  assert slices["wq:1"] == [("wo", 1, "consumer"), ("wq", 2, "producer")]
  assert slices["wq:1.3"] == [("wk", 2, "producer"), ("wq", 2, "producer")]
  assert t.groups["wq:1.3"].read_by_products
  assert len(set(t.groups)) == len(t._an.sites)        # no two groups share a name
  for seed in range(5):
    um = random_unit_masks(t, seed)
    small, _, _ = assert_compacts_as_masked(t, p, fn, um, (x,), rtol=1e-4, atol=1e-5)
    kept = {n: int(np.sum(m)) for n, m in um.items()}
    assert small["wk"].shape == (6, kept["wq"] * kept["wq:1.3"])
    assert small["wq"].shape == (6, kept["wq"] * kept["wq:1"] * kept["wq:1.3"])
