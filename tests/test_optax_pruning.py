"""Pruning inside a user's optax loop: keep_masked, gradual, schedules, ERK, N:M, blocks, scores."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxprune
from conftest import host_f32, linen_batch_norm_mlp, nnx_sigmoid_mlp
from jaxprune import optax_pruning as op


def _haiku_params(key=0):
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  return {"linear": {"w": jax.random.normal(k1, (8, 16)), "b": jnp.zeros(16)},
          "linear_1": {"w": jax.random.normal(k2, (16, 4)), "b": jnp.zeros(4)},
          "conv": {"w": jax.random.normal(k3, (3, 3, 2, 4)), "b": jnp.zeros(4)}}


def _mlp(params, x):
  h = jnp.tanh(x @ params["linear"]["w"] + params["linear"]["b"])
  return h @ params["linear_1"]["w"] + params["linear_1"]["b"]


def _data():
  x = jax.random.normal(jax.random.key(7), (32, 8))
  y = jax.random.normal(jax.random.key(8), (32, 4))
  return x, y


def _loss(params, x, y):
  return jnp.mean((_mlp(params, x) - y) ** 2)


def _mlp_params():
  p = _haiku_params()
  return {"linear": p["linear"], "linear_1": p["linear_1"]}


# ----------------------------------------------------------------------------- keep_masked


def test_keep_masked_holds_zeros_through_100_adamw_steps_in_a_user_loop():
  params = _mlp_params()
  _, masks = jaxprune.prune_to_sparsity(params, None, 0.6)  # default selection: the two 'w's
  assert bool(jnp.all(masks["linear"]["b"])) and not bool(jnp.all(masks["linear"]["w"]))
  tx = optax.chain(optax.adamw(1e-2, weight_decay=0.1), jaxprune.keep_masked(masks))
  traces = []

  @jax.jit
  def step(params, state, x, y):
    traces.append(1)
    loss, grads = jax.value_and_grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  x, y = _data()
  start = params  # not masked beforehand: the first update zeroes the pruned weights
  state = tx.init(params)
  for _ in range(100):
    params, state, loss = step(params, state, x, y)
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
      assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
  assert np.isfinite(float(loss)) and float(loss) < float(_loss(start, x, y))
  kept = np.asarray(masks["linear"]["w"])
  assert np.all(np.asarray(params["linear"]["w"])[kept] != np.asarray(start["linear"]["w"])[kept])
  # New masks in the state: same compiled step.
  state = (state[0], jaxprune.MaskedState(jaxprune.ones_like(masks)))
  step(params, state, x, y)
  assert len(traces) == 1
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                                   jaxprune.masks_of(state), jaxprune.ones_like(masks)))


def test_keep_masked_bad_masks_and_missing_params():
  params = _mlp_params()
  masks = jaxprune.ones_like(params)
  with pytest.raises(ValueError, match="structure of the params"):
    jaxprune.keep_masked({"linear": masks["linear"]}).init(params)
  bad = jax.tree.map(lambda m: m, masks)
  bad["linear"]["w"] = jnp.ones((8, 15), bool)
  with pytest.raises(ValueError, match="shape"):
    jaxprune.keep_masked(bad).init(params)
  tx = jaxprune.keep_masked(masks)
  with pytest.raises(ValueError, match="needs the params"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match="holds no masks"):
    jaxprune.masks_of(optax.adam(1e-3).init(params))


# ----------------------------------------------------------------------------- schedule


def test_polynomial_sparsity_formula():
  for t in (-3, 0, 1, 4, 9, 10, 20):
    tc = min(max(t, 2), 10)
    want = 0.8 + (0.1 - 0.8) * (1 - (tc - 2) / 8) ** 3
    got = float(op.polynomial_sparsity(t, final=0.8, begin_step=2, end_step=10, initial=0.1))
    assert got == pytest.approx(want, abs=1e-6)
  assert float(jax.jit(lambda t: op.polynomial_sparsity(
      t, final=0.5, begin_step=0, end_step=4, power=1))(2)) == pytest.approx(0.25)


def test_polynomial_sparsity_counts_steps_past_2_to_the_24_exactly():
  """Steps were converted to float32 before begin_step was subtracted: past 2**24 they rounded,
  and at end_step = 20,000,011 the schedule gave 0.9072 for a final 0.9 (and 0.7056 for
  0.4392 two steps in)."""
  b, e = 20_000_001, 20_000_011
  sched = lambda t: op.polynomial_sparsity(t, final=0.9, begin_step=b, end_step=e)
  for t in (b - 5, b, b + 2, b + 5, e, e + 100):
    tc = min(max(t, b), e)
    want = 0.9 * (1 - (1 - (tc - b) / (e - b)) ** 3)
    for step in (t, np.int32(t), jnp.int32(t)):
      assert float(sched(step)) == pytest.approx(want, abs=1e-6), (t, type(step))
    assert float(jax.jit(sched)(jnp.int32(t))) == pytest.approx(want, abs=1e-6)
  assert float(op.polynomial_sparsity(2**40, final=0.8, begin_step=0, end_step=2**35)) == \
      pytest.approx(0.8)


def _updates_at(begin, end, freq, t):
  return begin <= t and (((t - begin) % freq == 0 and t <= end) or t == end)


def test_gradual_follows_the_schedule_with_exact_counts_and_one_trace():
  params = _mlp_params()
  n = 8 * 16 + 16 * 4
  begin, end, freq, final = 2, 12, 3, 0.8
  tx = jaxprune.gradual(optax.adam(1e-2), sparsity=final, begin_step=begin, end_step=end,
                        frequency=freq)
  traces = []

  @jax.jit
  def step(params, state, x, y):
    traces.append(1)
    loss, grads = jax.value_and_grad(_loss)(params, x, y)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  x, y = _data()
  state = tx.init(params)
  pruned_target = 0
  prev = None
  for t in range(16):
    before = params
    params, state, loss = step(params, state, x, y)
    assert np.isfinite(float(loss))
    masks = jaxprune.masks_of(state)
    if _updates_at(begin, end, freq, t):
      tc = min(max(t, begin), end)
      s = final + (0.0 - final) * (1 - (tc - begin) / (end - begin)) ** 3
      assert abs(s * n - math.floor(s * n) - 0.5) > 1e-3  # no rounding ambiguity in the test
      pruned_target = round(s * n)
      # The weights removed at this update are the smallest |w| among those kept (reference).
      if prev is not None and pruned_target > 0:
        w = np.concatenate([np.abs(np.asarray(before[k]["w"])).ravel()
                            for k in ("linear", "linear_1")])
        kept_prev = np.concatenate([np.asarray(prev[k]["w"]).ravel() for k in ("linear", "linear_1")])
        order = np.argsort(np.where(kept_prev, w, -1.0), kind="stable")
        want = kept_prev.copy()
        want[order[(~kept_prev).sum():pruned_target]] = False
        got = np.concatenate([np.asarray(masks[k]["w"]).ravel() for k in ("linear", "linear_1")])
        np.testing.assert_array_equal(got, want)
    kept = sum(int(masks[k]["w"].sum()) for k in ("linear", "linear_1"))
    assert n - kept == pruned_target, t
    assert bool(jnp.all(masks["linear"]["b"]))
    for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)):
      assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)
    prev = masks
  assert n - kept == round(final * n)
  assert len(traces) == 1


def test_gradual_layer_scope_and_erk_map_reach_each_leaf_target():
  params = _mlp_params()
  for sparsity, scope in ((0.5, "layer"), (jaxprune.erk_sparsity(params, 0.7), None)):
    tx = jaxprune.gradual(optax.sgd(0.1), sparsity=sparsity, begin_step=0, end_step=4,
                          frequency=2, scope=scope)
    state = tx.init(params)
    p = params
    upd = jax.jit(tx.update)
    for _ in range(5):
      u, state = upd(jax.tree.map(jnp.zeros_like, p), state, p)
      p = optax.apply_updates(p, u)
    masks = jaxprune.masks_of(state)
    for k in ("linear", "linear_1"):
      s = sparsity if isinstance(sparsity, float) else sparsity[f"{k}/w"]
      size = masks[k]["w"].size
      assert size - int(masks[k]["w"].sum()) == round(np.float32(s) * size)


def test_gradual_with_saliency_scores_uses_gradients():
  params = _mlp_params()
  x, y = _data()
  grads = jax.grad(_loss)(params, x, y)
  tx = jaxprune.gradual(optax.sgd(0.0), sparsity=0.5, begin_step=0, end_step=1, frequency=1,
                        scores=jaxprune.saliency_scores)
  state = tx.init(params)
  state = state._replace(count=jnp.ones((), jnp.int32))  # straight to end_step
  _, state = tx.update(grads, state, params)
  _, want = jaxprune.prune_to_sparsity(params, None, 0.5,
                                       scores=jaxprune.snip_scores(_loss, params, x, y))
  for a, b in zip(jax.tree.leaves(jaxprune.masks_of(state)), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)


def test_gradual_with_a_score_function_of_params_alone():
  params = _mlp_params()
  # Score: distance from 1 (so weights near 1.0 are pruned first, not the smallest).
  tx = jaxprune.gradual(optax.sgd(0.0), sparsity=0.25, begin_step=0, end_step=1, frequency=1,
                        scope="layer", scores=lambda p: jax.tree.map(lambda w: jnp.abs(w - 1), p))
  state = tx.init(params)._replace(count=jnp.ones((), jnp.int32))
  _, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  w = np.abs(np.asarray(params["linear"]["w"]) - 1).ravel()
  want = np.ones(w.size, bool)
  want[np.argsort(w, kind="stable")[:round(0.25 * w.size)]] = False
  np.testing.assert_array_equal(np.asarray(jaxprune.masks_of(state)["linear"]["w"]).ravel(), want)


def test_bad_schedule_settings_raise():
  sgd = optax.sgd(0.1)
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    jaxprune.gradual(sgd, sparsity=1.0, begin_step=0, end_step=10, frequency=1)
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    jaxprune.gradual(sgd, sparsity=-0.1, begin_step=0, end_step=10, frequency=1)
  with pytest.raises(ValueError, match="greater than begin_step.*one-shot pruning at step T use "
                     "begin_step=0, end_step=T, frequency=T"):
    jaxprune.gradual(sgd, sparsity=0.5, begin_step=10, end_step=10, frequency=1)
  # scheduled has no target or initial sparsity: its own advice.
  with pytest.raises(ValueError, match="greater than begin_step.*once, at step T, pass "
                     "begin_step=T and a frequency longer"):
    jaxprune.scheduled(sgd, jaxprune.distinctiveness_pruner(
        jaxprune.MLP(in_features=2, hidden=(3,), out_features=2), "hidden_0"), begin_step=5,
        end_step=2, frequency=1)
  with pytest.raises(ValueError, match="frequency must be at least 1"):
    jaxprune.gradual(sgd, sparsity=0.5, begin_step=0, end_step=10, frequency=0)
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    jaxprune.erk_sparsity(_mlp_params(), 1.5)
  params = _mlp_params()
  tx = jaxprune.gradual(sgd, sparsity=0.5, begin_step=0, end_step=2, frequency=1,
                        scores=lambda p, g: {"linear": p["linear"]})
  with pytest.raises(ValueError, match="structure of the params"):
    tx.update(params, tx.init(params), params)
  tx = jaxprune.gradual(sgd, sparsity=0.5, begin_step=0, end_step=2, frequency=1,
                        scores=lambda p, g: jax.tree.map(lambda a: a[:1], p))
  with pytest.raises(ValueError, match="return one score per weight"):
    tx.update(params, tx.init(params), params)
  state = tx.init(params)
  with pytest.raises(ValueError, match="structure of the params"):
    tx.update(params, state._replace(masks={"linear": state.masks["linear"]}), params)


def test_masked_weights_exactly_zero_with_narrower_updates():
  """bfloat16 updates of float32 params: the update of a masked weight is -weight in float32
  (rounded to bfloat16 it left the weight at its rounding error)."""
  p = {"a": jax.random.normal(jax.random.key(0), (7, 5))}
  m = {"a": jax.random.bernoulli(jax.random.key(1), 0.4, (7, 5))}
  for tx in (optax.chain(optax.sgd(0.1), jaxprune.keep_masked(m)),
             jaxprune.masked_optimizer(optax.sgd(0.1), m)):
    u, _ = tx.update({"a": jnp.ones((7, 5), jnp.bfloat16)}, tx.init(p), p)
    q = optax.apply_updates(p, u)["a"]
    assert q.dtype == jnp.float32 and bool(jnp.all(jnp.where(m["a"], 0.0, q) == 0.0))
    kept = np.asarray(m["a"])
    assert np.all(np.asarray(q)[kept] != np.asarray(p["a"])[kept])   # the kept weights train


def test_schedule_under_inject_hyperparams_names_static_args():
  with pytest.raises(TypeError, match=r"static_args=\('begin_step', 'end_step'"):
    optax.inject_hyperparams(jaxprune.gradual)(
        optax.sgd(0.1), sparsity=0.5, begin_step=0, end_step=2, frequency=1).init(_mlp_params())
  tx = optax.inject_hyperparams(jaxprune.gradual, static_args=(
      "begin_step", "end_step", "frequency", "power"))(
          optax.sgd(0.1), sparsity=0.5, begin_step=0, end_step=2, frequency=1)
  tx.init(_mlp_params())


def test_masked_optimizer_trains_the_pruned_network():
  """The optimizer sees only the kept weights' gradients: Adafactor (factored moments) and a
  global-norm clip give the kept weights of the pruned network, i.e. of the same optimizer fed
  masked gradients; keep_masked after the optimizer does not (it still sees them all)."""
  params = _mlp_params()
  _, masks = jaxprune.prune_to_sparsity(params, None, 0.5, scope="layer")
  x, y = _data()
  grad = jax.jit(jax.grad(_loss))
  for inner in (optax.adafactor(0.05, min_dim_size_to_factor=2),   # factored moments
                optax.chain(optax.clip_by_global_norm(0.05), optax.sgd(0.1, momentum=0.9))):
    runs = {}
    for name, tx, masked_grads in (
        ("masked_optimizer", jaxprune.masked_optimizer(inner, masks), False),
        ("reference", optax.chain(inner, jaxprune.keep_masked(masks)), True),
        ("keep_masked", optax.chain(inner, jaxprune.keep_masked(masks)), False)):
      p = jaxprune.apply_masks(params, masks)   # the pruned network (dense starts: below)
      state = tx.init(p)
      for _ in range(5):
        g = grad(p, x, y)
        if masked_grads:
          g = jaxprune.apply_masks(g, masks)
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)
      runs[name] = p
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                                     runs["masked_optimizer"], runs["reference"]))
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)),
                                         runs["keep_masked"], runs["reference"]))
    for leaf, m in zip(jax.tree.leaves(runs["masked_optimizer"]), jax.tree.leaves(masks)):
      assert bool(jnp.all(jnp.where(m, 0.0, leaf) == 0.0))
  assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), jaxprune.masks_of(state),
                                   masks))
  with pytest.raises(ValueError, match="needs the params"):
    jaxprune.masked_optimizer(optax.sgd(0.1), masks).update(params, state)


def test_unstructured_pruners_refuse_nan_weights_and_negative_scores():
  """NaN/inf weights used to be kept by every unstructured pruner but magnitude_prune (a NaN's
  bit pattern ranks above every weight); signed scores were silently made magnitudes."""
  params = _mlp_params()
  params["linear"]["w"] = params["linear"]["w"].at[0, 0].set(jnp.nan).at[1, 1].set(jnp.inf)
  for prune in (lambda p: jaxprune.prune_to_sparsity(p, None, 0.5),
                lambda p: jaxprune.nm_prune(p, None, n=1, m=2),
                lambda p: jaxprune.block_prune(p, None, 0.5, block=(2, 2))):
    with pytest.raises(ValueError, match="linear/w hold 2 NaN or infinite values"):
      prune(params)
  params = _mlp_params()
  with pytest.raises(ValueError, match="linear/w hold negative values.*jnp.abs"):
    jaxprune.prune_to_sparsity(params, None, 0.5, scores=params)
  # complex scores: a float cast kept their real part (3j and -4j scored 0)
  scores = jax.tree.map(lambda a: jnp.abs(a) * 1j, params)
  with pytest.raises(TypeError, match="linear/w is complex.*jnp.abs"):
    jaxprune.prune_to_sparsity(params, None, 0.5, scores=scores)


def test_default_selection_leaves_integer_buffers_alone():
  params = {"k": jnp.arange(1.0, 17.0).reshape(4, 4), "idx": jnp.arange(16).reshape(4, 4)}
  q, m = jaxprune.prune_to_sparsity(params, None, 0.5)
  np.testing.assert_array_equal(q["idx"], params["idx"])
  assert bool(jnp.all(m["idx"])) and int(m["k"].sum()) == 8
  assert jaxprune.pruners.select_leaves(params) == (1,)   # leaves: idx, k (gradual selects so)


# ----------------------------------------------------------------------------- selection, ERK


def test_default_selection_on_haiku_dict_and_nnx_state():
  params = _haiku_params()
  assert [params_name for params_name in jaxprune.pruners.magnitude.leaf_names(params)] == [
      "conv/b", "conv/w", "linear/b", "linear/w", "linear_1/b", "linear_1/w"]
  assert jaxprune.pruners.select_leaves(params) == (1, 3, 5)
  q, m, _ = jaxprune.magnitude_prune(params, None, 0.5)
  for k in params:
    assert bool(jnp.all(m[k]["b"]))
    assert int(m[k]["w"].sum()) == params[k]["w"].size - round(0.5 * params[k]["w"].size)
  _, state = nnx.split(nnx.Linear(8, 6, rngs=nnx.Rngs(0)))
  _, ms, _ = jaxprune.magnitude_prune(state, None, 0.5)
  _, md, _ = jaxprune.magnitude_prune(nnx.to_pure_dict(state), None, 0.5)
  np.testing.assert_array_equal(ms["kernel"][...], md["kernel"])
  assert int(md["kernel"].sum()) == 24 and bool(jnp.all(md["bias"]))
  _, mg = jaxprune.prune_to_sparsity(state, None, 0.25)
  assert int(nnx.to_pure_dict(mg)["kernel"].sum()) == 36
  tx = jaxprune.gradual(optax.sgd(0.1), sparsity=0.5, begin_step=0, end_step=1, frequency=1)
  opt = tx.init(state)
  for _ in range(2):
    u, opt = tx.update(jax.tree.map(jnp.zeros_like, state), opt, state)
    state = optax.apply_updates(state, u)
  assert isinstance(state, nnx.State)
  kernel = nnx.to_pure_dict(state)["kernel"]
  np.testing.assert_array_equal(np.asarray(kernel) != 0, md["kernel"])


def test_erk_matches_the_formula_with_dense_capping():
  params = {"a": {"w": jnp.zeros((2, 3))}, "b": {"w": jnp.zeros((40, 50))},
            "c": {"w": jnp.zeros((3, 3, 16, 32))}}
  s = 0.8
  erk = jaxprune.erk_sparsity(params, s)
  shapes = {"a/w": (2, 3), "b/w": (40, 50), "c/w": (3, 3, 16, 32)}
  raw = {k: sum(v) / math.prod(v) for k, v in shapes.items()}
  assert erk["a/w"] == 0.0  # would need a density above 1: kept dense
  dense_size = 6
  others = ("b/w", "c/w")
  total = sum(math.prod(v) for v in shapes.values())
  eps = ((1 - s) * total - dense_size) / sum(raw[k] * math.prod(shapes[k]) for k in others)
  for k in others:
    assert erk[k] == pytest.approx(1 - eps * raw[k], rel=1e-12)
  kept = sum((1 - erk[k]) * math.prod(v) for k, v in shapes.items())
  assert kept == pytest.approx((1 - s) * total)
  assert jaxprune.uniform_sparsity(params, 0.3) == {k: 0.3 for k in shapes}


def test_erk_at_sparsity_0_keeps_every_leaf_dense():
  """The last leaf left came out at density 1 + 1 ulp, was made dense as 'over' 1, and nothing
  was left to solve for: 'No ERK distribution reaches sparsity 0.0' (about 2% of shapes)."""
  params = {"a": {"kernel": jnp.zeros((6, 33))}, "b": {"kernel": jnp.zeros((17, 34))},
            "c": {"kernel": jnp.zeros((30, 5))}, "d": {"kernel": jnp.zeros((9, 12))}}
  assert jaxprune.erk_sparsity(params, 0.0) == {f"{k}/kernel": 0.0 for k in "abcd"}
  rng = np.random.default_rng(0)
  for _ in range(200):
    shapes = [tuple(int(d) for d in rng.integers(1, 40, size=2)) for _ in range(4)]
    tree = {str(i): np.zeros(s, np.float32) for i, s in enumerate(shapes)}
    assert all(v == 0.0 for v in jaxprune.erk_sparsity(tree, 0.0).values())
    erk = jaxprune.erk_sparsity(tree, 1e-17)   # a leaf at density 1 + 1 ulp is dense, not over
    assert all(0.0 <= v < 1e-9 for v in erk.values()), (shapes, erk)


# ----------------------------------------------------------------------------- N:M, blocks


def test_nm_keeps_exactly_n_of_every_m_along_the_input_axis():
  params = _haiku_params(3)
  params["conv"]["w"] = jax.random.normal(jax.random.key(4), (3, 3, 8, 2))
  q, m = jaxprune.nm_prune(params, None, n=2, m=4)
  for k in ("linear", "linear_1"):
    w = np.asarray(params[k]["w"])
    mk = np.asarray(m[k]["w"])
    groups = mk.reshape(w.shape[0] // 4, 4, -1)
    assert np.all(groups.sum(axis=1) == 2)
    order = np.argsort(-np.abs(w.reshape(w.shape[0] // 4, 4, -1)), axis=1, kind="stable")
    want = np.zeros_like(groups)
    np.put_along_axis(want, order[:, :2], True, axis=1)
    np.testing.assert_array_equal(groups, want)
  conv = np.asarray(m["conv"]["w"]).reshape(3, 3, 2, 4, 2)  # groups of 4 input channels
  assert np.all(conv.sum(axis=3) == 2)
  _, m1 = jaxprune.nm_prune(params, m, n=1, m=4)  # already-masked weights count as pruned
  assert np.all(np.asarray(m1["linear"]["w"]).reshape(2, 4, -1).sum(axis=1) == 1)
  assert not np.any(np.asarray(m1["linear"]["w"]) & ~np.asarray(m["linear"]["w"]))
  np.testing.assert_array_equal(np.asarray(q["linear"]["w"]),
                                np.where(np.asarray(m["linear"]["w"]), params["linear"]["w"], 0))


def test_nm_bad_settings():
  params = _haiku_params()
  with pytest.raises(ValueError, match="must not exceed m"):
    jaxprune.nm_prune(params, None, n=3, m=2)
  with pytest.raises(ValueError, match="not a multiple of m=4"):
    jaxprune.nm_prune(params, None, n=2, m=4)  # conv has 2 inputs
  with pytest.raises(ValueError, match="not a multiple of m=3"):
    jaxprune.nm_prune(params, None, n=1, m=3, select=["linear/w"])


def test_block_prune_removes_whole_blocks_exactly():
  params = _mlp_params()
  q, m = jaxprune.block_prune(params, None, 0.5, block=(4, 4))
  blocks = {"linear": (2, 4), "linear_1": (4, 1)}
  total, kept = 0, 0
  for k, (bh, bw) in blocks.items():
    mk = np.asarray(m[k]["w"]).reshape(bh, 4, bw, 4)
    per = mk.sum(axis=(1, 3))
    assert set(np.unique(per)) <= {0, 16}
    total += bh * bw
    kept += int((per == 16).sum())
  assert total - kept == round(0.5 * total)
  with pytest.raises(ValueError, match="multiples of block"):
    jaxprune.block_prune(params, None, 0.5, block=(3, 4))


# ----------------------------------------------------------------------------- structured


def _dup_mlp():
  model = jaxprune.MLP(in_features=4, hidden=(6,), out_features=3)
  params = model.init(jax.random.key(0))
  out = params["params"]["out"]["kernel"]
  out = out.at[1].set(out[0] * 2.0)  # unit 1's outgoing vector parallel to unit 0's
  h = dict(params["params"]["hidden_0"])
  h["kernel"] = h["kernel"].at[:, 1].set(h["kernel"][:, 0])  # and the same activation
  h["bias"] = h["bias"].at[1].set(h["bias"][0])
  params = {"params": {**params["params"], "hidden_0": h,
                       "out": {**params["params"]["out"], "kernel": out}}}
  return model, params


def test_scheduled_distinctiveness_merges_inside_the_update():
  model, params = _dup_mlp()
  tx = jaxprune.scheduled(optax.sgd(0.0), jaxprune.distinctiveness_pruner(
      model, "hidden_0", similar_deg=1.0, complementary=False, constants=False),
      begin_step=1, frequency=5)
  p = params["params"]  # what a flax optimizer sees
  state = tx.init(p)
  zeros = jax.tree.map(jnp.zeros_like, p)
  upd = jax.jit(tx.update)
  u, state = upd(zeros, state, p)  # step 0: not scheduled
  assert bool(jnp.all(jaxprune.unit_masks_of(state)["hidden_0"]))
  u, state = upd(zeros, state, p)  # step 1: merge unit 1 into unit 0
  new = optax.apply_updates(p, u)
  um = np.asarray(jaxprune.unit_masks_of(state)["hidden_0"])
  np.testing.assert_array_equal(um, [True, False, True, True, True, True])
  want = np.asarray(p["out"]["kernel"][0]) * 3.0
  np.testing.assert_allclose(np.asarray(new["out"]["kernel"][0]), want, rtol=1e-6)
  assert np.all(np.asarray(new["out"]["kernel"][1]) == 0.0)
  assert np.all(np.asarray(new["hidden_0"]["kernel"][:, 1]) == 0.0)
  x = jax.random.normal(jax.random.key(3), (5, 4))
  np.testing.assert_allclose(model.apply({"params": new}, x), model.apply(params, x),
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="scheduled"):
    jaxprune.gradual(optax.sgd(0.1), sparsity=0.5, begin_step=0, end_step=2, frequency=1,
                     pruner=jaxprune.distinctiveness_pruner(model, "hidden_0"))


def test_gradual_importance_pruner_reaches_exact_unit_counts():
  model = jaxprune.LeNet(input_shape=(16, 16, 1))
  params = model.init(jax.random.key(0))
  tx = jaxprune.gradual(optax.sgd(0.0), sparsity=0.5, begin_step=0, end_step=4, frequency=2,
                        pruner=jaxprune.importance_pruner(model, "conv_0"))
  state = tx.init(params)
  upd = jax.jit(tx.update)
  size = model.groups["conv_0"].size
  zeros = jax.tree.map(jnp.zeros_like, params)
  for t in range(5):
    _, state = upd(zeros, state, params)
    um = jaxprune.unit_masks_of(state)["conv_0"]
    if t in (0, 2, 4):
      s = 0.5 - 0.5 * (1 - t / 4) ** 3
      assert size - int(um.sum()) == round(s * size)
  scores = jaxprune.importance_scores(params, model, "conv_0")
  removed = np.flatnonzero(~np.asarray(um))
  np.testing.assert_array_equal(np.sort(removed), np.sort(np.argsort(scores, stable=True)[:size // 2]))
  for a, b in zip(jax.tree.leaves(jaxprune.masks_of(state)),
                  jax.tree.leaves(jaxprune.expand(params, model, {"conv_0": um}))):
    np.testing.assert_array_equal(a, b)


def test_structured_pruners_on_the_params_collection_of_a_batchnorm_model():
  """A flax TrainState's optimizer sees variables['params']; the traced group also holds
  BatchNorm's running statistics (in 'batch_stats'), which made both structured pruners raise
  'The params do not hold the slices'. They now prune the 'params' part of the group."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.relu(nn.BatchNorm(use_running_average=True)(nn.Dense(20)(x)))
      return nn.Dense(3)(h)
  x = jax.random.normal(jax.random.key(0), (64, 10))
  variables = Net().init(jax.random.key(1), x)
  target = jaxprune.trace(Net().apply, variables, x)
  assert any(s.path[0] == "batch_stats" for s in target.groups["Dense_0"].slices)
  params = variables["params"]
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = jaxprune.gradual(optax.sgd(0.0), sparsity=0.5, begin_step=0, end_step=1, frequency=1,
                        pruner=jaxprune.importance_pruner(target, "Dense_0"))
  state = tx.init(params)
  for _ in range(2):
    _, state = jax.jit(tx.update)(zeros, state, params)
  um = np.asarray(jaxprune.unit_masks_of(state)["Dense_0"])
  assert um.sum() == 10
  m = jaxprune.masks_of(state)
  assert not np.asarray(m["Dense_0"]["kernel"])[:, ~um].any()
  assert not np.asarray(m["BatchNorm_0"]["scale"])[~um].any()
  assert not np.asarray(m["Dense_1"]["kernel"])[~um].any() and m["Dense_1"]["kernel"][um].all()

  k = params["Dense_0"]["kernel"]
  dup = {**params, "Dense_0": {**params["Dense_0"], "kernel": k.at[:, 7].set(k[:, 3])}}
  tx = jaxprune.scheduled(optax.sgd(0.0), jaxprune.distinctiveness_pruner(
      target, "Dense_0", similar_deg=1.0, complementary=False, constants=False, source="incoming"),
      begin_step=0, frequency=1)
  state = tx.init(dup)
  _, state = jax.jit(tx.update)(zeros, state, dup)      # unit 7 duplicates unit 3: merged
  assert (~np.asarray(jaxprune.unit_masks_of(state)["Dense_0"])).nonzero()[0].tolist() == [7]
  assert not np.asarray(jaxprune.masks_of(state)["Dense_0"]["kernel"])[:, 7].any()


# ----------------------------------------------------------------------------- checkpoint, FLOPs


def test_orbax_round_trip(tmp_path):
  model = jaxprune.MLP(in_features=4, hidden=(8,), out_features=3)
  params = model.init(jax.random.key(0))
  params, masks, _ = jaxprune.magnitude_prune(params, None, 0.5)
  units = {"hidden_0": jnp.arange(8) % 2 == 0}
  path = str(tmp_path / "ckpt")
  jaxprune.save_checkpoint(path, params, masks, unit_masks=units)
  p2, m2, u2 = jaxprune.load_checkpoint(path, params, with_unit_masks=True)
  for a, b in zip(jax.tree.leaves((params, masks, units)), jax.tree.leaves((p2, m2, u2))):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  p3, m3 = jaxprune.load_checkpoint(path)
  assert jax.tree.structure(p3) == jax.tree.structure(params)
  with pytest.raises(FileExistsError, match="overwrite=True"):
    jaxprune.save_checkpoint(path, params, masks)
  jaxprune.save_checkpoint(path, params, None, overwrite=True)
  assert jaxprune.load_checkpoint(path, params)[1] is None
  with pytest.raises(FileNotFoundError):
    jaxprune.load_checkpoint(str(tmp_path / "nope"))


def test_flops_report_refuses_a_batch_of_examples():
  """A batch of 5 counted every layer's FLOPs 5 times (560 for a 4-8-3 MLP's 112)."""
  model = jaxprune.MLP(in_features=4, hidden=(8,), out_features=3)
  params = model.init(jax.random.key(0))
  one = jaxprune.flops_report(model, params)["total"]["flops"]
  assert jaxprune.flops_report(model, params, jnp.ones((1, 4)))["total"]["flops"] == one
  with pytest.raises(ValueError, match=r"batch of 5 .* pass one example, x\[:1\]"):
    jaxprune.flops_report(model, params, jnp.zeros((5, 4)))


def test_flops_report_dense_masked_compacted(capsys):
  model = jaxprune.LeNet(input_shape=(16, 16, 1))
  params = model.init(jax.random.key(0))
  units = jaxprune.unit_masks_ones(model)
  units["conv_0"] = units["conv_0"].at[:4].set(False)
  masks = jaxprune.expand(params, model, units)
  rep = jaxprune.flops_report(model, params, masks=masks, unit_masks=units)
  rows = {r["name"]: r for r in rep["layers"]}
  k0 = rows["params/conv_0/kernel"]
  kh, kw, cin, cout = k0["shape"]
  out = jax.eval_shape(lambda p: model.apply_with_activations(p, jnp.zeros((1, 16, 16, 1)), ["conv_0"])[1],
                       params)["conv_0"].shape
  assert k0["flops"] == 2 * math.prod(out) * kh * kw * cin
  assert k0["masked_flops"] == k0["flops"] * (cout - 4) // cout == k0["compact_flops"]
  assert k0["compact_params"] == k0["nonzero"] == kh * kw * cin * (cout - 4)
  n_in, n_out = rows["params/out/kernel"]["shape"]
  assert rows["params/out/kernel"]["flops"] == 2 * n_in * n_out
  assert rep["total"]["params"] == sum(np.size(l) for l in jax.tree.leaves(params))
  assert rep["total"]["xla_flops"] > 0
  jaxprune.print_summary(masks, units, flops=rep)
  assert "masked FLOPs" in capsys.readouterr().out


def test_fit_trains_with_a_gradual_optimizer():
  model = jaxprune.MLP(in_features=4, hidden=(8,), out_features=3)
  x = jax.random.normal(jax.random.key(0), (64, 4))
  y = jnp.arange(64) % 3
  tx = jaxprune.gradual(optax.adam(1e-2), sparsity=0.5, begin_step=0, end_step=4, frequency=2)
  params, hist = jaxprune.fit(model, model.init(jax.random.key(1)), x, y, key=jax.random.key(2),
                              epochs=2, batch_size=16, optimizer=tx, progress=False)
  assert np.all(np.isfinite(hist["loss"]))
  kernels = [params["params"][k]["kernel"] for k in ("hidden_0", "out")]
  zeros = sum(int(np.sum(np.asarray(k) == 0.0)) for k in kernels)
  assert zeros == round(0.5 * (4 * 8 + 8 * 3))


def test_scheduled_runs_on_its_grid_only_gradual_also_at_end_step():
  """scheduled runs its pruner at begin_step + k * frequency up to end_step; an end_step off
  that grid got one more (undocumented) run, the extra step gradual takes to reach its target."""
  calls = jaxprune.StepPruner(init=lambda p: jnp.zeros((), jnp.int32),
                              prune=lambda p, m, s, g, t: (p, m, s + 1),
                              takes_sparsity=False, changes_params=True)
  p = {"w": jnp.ones((2, 2))}

  def steps(tx, read):
    st, ran, update = tx.init(p), [], jax.jit(tx.update)
    for t in range(20):
      before = read(st)
      _, st = update(jax.tree.map(jnp.zeros_like, p), st, p)
      if read(st) != before:
        ran.append(t)
    return ran

  tx = jaxprune.scheduled(optax.sgd(0.1), calls, begin_step=0, frequency=10, end_step=15)
  assert steps(tx, lambda s: int(s.pruner_state)) == [0, 10]
  tx = jaxprune.scheduled(optax.sgd(0.1), calls, begin_step=2, frequency=4, end_step=10)
  assert steps(tx, lambda s: int(s.pruner_state)) == [2, 6, 10]
  tx = jaxprune.gradual(optax.sgd(0.1), sparsity=0.5, begin_step=0, end_step=15, frequency=10,
                        select=lambda path, leaf: True)
  p = {"w": jnp.arange(1.0, 101.0).reshape(10, 10)}   # kept: 52 at step 10, 50 at step 15
  assert steps(tx, lambda s: int(jnp.sum(s.masks["w"]))) == [10, 15]   # step 0: sparsity 0


@pytest.mark.parametrize("kind", ["importance", "distinctiveness"])
def test_structured_pruners_in_nnx_optimizer_traced_on_state_or_pure_dict(kind):
  """A target traced on an nnx State names leaves through their Variables (l1/kernel/value);
  nnx.Optimizer hands the transformation plain arrays (l1/kernel). Both tracings give the
  same unit masks and params (this used to fail with 'the params do not hold the slices')."""
  x = jax.random.normal(jax.random.key(0), (32, 8))
  y = jnp.arange(32) % 3

  def train(on_state):
    net = nnx_sigmoid_mlp(0)
    if kind == "distinctiveness":   # make units 1 and 4 duplicates: a similar pair to merge
      kernel, bias = net.l1.kernel.get_value(), net.l1.bias.get_value()
      net.l1.kernel.set_value(kernel.at[:, 4].set(kernel[:, 1]))
      net.l1.bias.set_value(bias.at[4].set(bias[1]))
    graph, state = nnx.split(net, nnx.Param)
    if on_state:
      target = jaxprune.trace(lambda s, x: nnx.merge(graph, s)(x), state, x)
      assert any(s.path[-1] == "value" for s in target.groups["l1"].slices)
    else:
      def apply(p, x):
        s = jax.tree.map(lambda a: a, state)
        nnx.replace_by_pure_dict(s, p)
        return nnx.merge(graph, s)(x)
      target = jaxprune.trace(apply, nnx.to_pure_dict(state), x)
    base = optax.sgd(0.0) if kind == "distinctiveness" else optax.adam(1e-2)
    if kind == "importance":
      tx = jaxprune.gradual(base, sparsity=0.5, begin_step=0, end_step=4, frequency=2,
                            pruner=jaxprune.importance_pruner(target, "l1"))
    else:
      tx = jaxprune.scheduled(base, jaxprune.distinctiveness_pruner(target, "l1", source="incoming"),
                              begin_step=0, frequency=2)
    opt = nnx.Optimizer(net, tx, wrt=nnx.Param)

    @nnx.jit
    def step(net, opt):
      loss = lambda n: optax.softmax_cross_entropy_with_integer_labels(n(x), y).mean()
      opt.update(net, nnx.grad(loss)(net))

    for _ in range(5):
      step(net, opt)
    # an array, not nnx.Optimizer's OptArray container; the optimizer itself is searched too
    assert isinstance(jaxprune.unit_masks_of(opt)["l1"], jax.Array)
    return (np.asarray(jaxprune.unit_masks_of(opt.opt_state)["l1"]),
            np.asarray(net.l1.kernel.get_value()), np.asarray(net.l2.kernel.get_value()))

  (m_state, k1_state, k2_state), (m_dict, k1_dict, k2_dict) = train(True), train(False)
  np.testing.assert_array_equal(m_state, m_dict)
  if kind == "importance":
    assert m_state.sum() == 6
  else:
    assert not m_state[4] and m_state[1] and m_state.sum() < 12
  np.testing.assert_array_equal(k1_state, k1_dict)
  np.testing.assert_array_equal(k2_state, k2_dict)
  assert np.all(k1_state[:, ~m_state] == 0) and np.all(k2_state[~m_state] == 0)


@pytest.mark.parametrize("kind", ["importance", "distinctiveness"])
def test_structured_pruners_in_nnx_optimizer_with_batch_norm(kind):
  """A target traced on the whole nnx State (BatchStat included, as docs/any-model.md asks)
  holds the running statistics' slices, which nnx.Optimizer(wrt=nnx.Param) does not hand the
  transformation: the step pruners drop them (a removed unit's statistics are not read once
  its scale and shift are zero) instead of failing with 'the params do not hold the slices'."""
  class CNN(nnx.Module):
    def __init__(self, rngs):
      self.c1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
      self.bn1 = nnx.BatchNorm(8, rngs=rngs)
      self.l1 = nnx.Linear(8 * 36, 3, rngs=rngs)

    def __call__(self, x):
      h = nnx.relu(self.bn1(self.c1(x)))
      return self.l1(h.reshape(h.shape[0], -1))

  x = jax.random.normal(jax.random.key(0), (8, 6, 6, 3))
  y = jnp.arange(8) % 3
  net = CNN(nnx.Rngs(0))
  net.eval()
  if kind == "distinctiveness":   # filter 5 a copy of filter 1: a similar pair to merge
    kernel, bias = net.c1.kernel.get_value(), net.c1.bias.get_value()
    net.c1.kernel.set_value(kernel.at[..., 5].set(kernel[..., 1]))
    net.c1.bias.set_value(bias.at[5].set(bias[1]))
  graph, state = nnx.split(net)
  target = jaxprune.trace(lambda s, x: nnx.merge(graph, s)(x), state, x)
  assert {s.kind for s in target.groups["c1"].slices} >= {"stat", "scale", "shift"}
  if kind == "importance":
    tx = jaxprune.gradual(optax.adam(1e-2), sparsity=0.5, begin_step=0, end_step=4,
                          frequency=2, pruner=jaxprune.importance_pruner(target, "c1"))
  else:
    tx = jaxprune.scheduled(optax.sgd(0.0), jaxprune.distinctiveness_pruner(
        target, "c1", source="incoming", constants=False), begin_step=0, frequency=2)
  opt = nnx.Optimizer(net, tx, wrt=nnx.Param)
  loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()
  for _ in range(5):
    opt.update(net, nnx.grad(loss)(net))
  keep = np.asarray(jaxprune.unit_masks_of(opt.opt_state)["c1"])
  if kind == "distinctiveness":
    assert keep[1] and not keep[5]
  else:
    assert keep.sum() == 4
  for leaf in (net.c1.kernel, net.c1.bias, net.bn1.scale, net.bn1.bias):
    assert np.all(np.asarray(leaf.get_value())[..., ~keep] == 0)


def test_schedule_optimizer_and_block_settings_are_checked_up_front():
  p = {"w": jnp.arange(1., 17.).reshape(4, 4)}
  for power in (0, -1, float("nan")):
    with pytest.raises(ValueError, match="power must be a positive number"):
      jaxprune.gradual(optax.sgd(0.1), sparsity=0.5, begin_step=0, end_step=4, frequency=1,
                       power=power)
    with pytest.raises(ValueError, match="power must be a positive number"):
      jaxprune.polynomial_sparsity(2, final=0.5, begin_step=0, end_step=4, power=power)
  for make in (lambda tx: jaxprune.gradual(tx, sparsity=0.5, begin_step=0, end_step=2, frequency=1),
               lambda tx: jaxprune.masked_optimizer(tx, jaxprune.ones_like(p))):
    with pytest.raises(TypeError, match="tx must be an optax GradientTransformation.*got float"):
      make(0.1)
  for block in (2, (1.5, 2), (2, 2, 2), "22"):
    with pytest.raises(ValueError, match="block must be two positive ints"):
      jaxprune.block_prune(p, None, 0.5, block=block)
  with pytest.raises(ValueError, match=r"must be a number in \[0, 1\) \(the fraction of weights "
                                       r"removed.*got -0.1"):
    jaxprune.prune_to_sparsity(p, None, -0.1)


def test_masked_nan_weight_is_refused_at_init_not_left_in_place():
  """An update -w cannot zero a NaN or infinite masked weight (NaN + -NaN is NaN): it stayed in
  the network while masks_of said it was pruned. init now refuses, naming apply_masks."""
  p = {"w": jnp.ones((2, 2)).at[0, 0].set(jnp.inf)}
  m = {"w": jnp.ones((2, 2), bool).at[0, 0].set(False)}
  for tx in (optax.chain(optax.sgd(0.1), jaxprune.keep_masked(m)),
             jaxprune.masked_optimizer(optax.sgd(0.1), m)):
    with pytest.raises(ValueError, match=r"params\['w'\] hold 1 NaN or infinite values where the "
                                         r"masks remove.*jaxprune.apply_masks"):
      tx.init(p)
    q = jaxprune.apply_masks(p, m)
    state = tx.init(q)
    u, _ = tx.update({"w": jnp.ones((2, 2))}, state, q)
    assert float(optax.apply_updates(q, u)["w"][0, 0]) == 0.0
  # A NaN where the masks keep the weight is the user's training problem, not refused here.
  jaxprune.keep_masked(jaxprune.ones_like(p)).init(p)


def test_masks_inside_multi_transform_errors_name_the_fix_and_the_fix_works():
  params = {"l1": {"w": jnp.arange(1., 33.).reshape(8, 4), "b": jnp.ones(4)}}
  _, masks = jaxprune.prune_to_sparsity(params, None, 0.5)
  labels = {"l1": {"w": "prune", "b": "plain"}}
  for branch_masks, match in (({"l1": {"w": masks["l1"]["w"]}}, r"at \['l1'\]\['b'\] the params "
                                                                r"hold a MaskedNode"),
                              (masks, "the params hold optax.MaskedNode")):
    tx = optax.multi_transform({"prune": jaxprune.masked_optimizer(optax.adam(0.1), branch_masks),
                                "plain": optax.sgd(0.1)}, labels)
    with pytest.raises(ValueError, match=match + r".*masked_optimizer\(optax.multi_transform"):
      tx.init(params)
  # The fix the message names: masks over every leaf around the whole multi_transform.
  tx = jaxprune.masked_optimizer(optax.multi_transform(
      {"prune": optax.adam(0.1), "plain": optax.sgd(0.1)}, labels), masks)
  state, p = tx.init(params), params
  for _ in range(3):
    u, state = tx.update(jax.tree.map(jnp.ones_like, p), state, p)
    p = optax.apply_updates(p, u)
  assert np.all(np.asarray(p["l1"]["w"])[~np.asarray(masks["l1"]["w"])] == 0)
  np.testing.assert_allclose(p["l1"]["b"], 1.0 - 3 * 0.1, rtol=1e-6)


def test_inner_optimizer_sees_the_pruned_network_extra_args_and_donation():
  """From an outside probe: (1) optax's extra arguments (reduce_on_plateau's value=) were
  refused; (2) the inner optimizer got the dense params, so Adafactor/LAMB trained the kept
  weights differently from dense and pre-masked starts and schedule-free's evaluation params
  brought a pruned weight back; (3) donating the optimizer state freed the caller's masks."""
  p = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]])}
  m = {"w": jnp.array([[True, False], [True, True]])}
  g = {"w": jnp.ones((2, 2))}
  plateau = optax.chain(optax.adam(1e-2), optax.contrib.reduce_on_plateau())
  for tx in (jaxprune.masked_optimizer(plateau, m),
             jaxprune.gradual(plateau, sparsity=0.5, begin_step=0, end_step=2, frequency=1),
             optax.chain(plateau, jaxprune.keep_masked(m))):
    state = tx.init(p)
    for _ in range(2):
      u, state = tx.update(g, state, p, value=jnp.asarray(1.0))
    assert np.isfinite(np.asarray(u["w"])).all()
  for inner in (optax.adafactor(0.1), optax.lamb(0.1)):
    def one_step(p0, inner=inner):
      tx = jaxprune.masked_optimizer(inner, m)
      u, _ = tx.update(g, tx.init(p0), p0)
      return optax.apply_updates(p0, u)["w"]
    np.testing.assert_array_equal(one_step(p), one_step(jaxprune.apply_masks(p, m)))
  tx = jaxprune.masked_optimizer(optax.contrib.schedule_free_sgd(0.1), m)
  state, q = tx.init(p), p
  for _ in range(5):
    u, state = tx.update(g, state, q)
    q = optax.apply_updates(q, u)
  assert float(optax.contrib.schedule_free_eval_params(state[1], q)["w"][0, 1]) == 0.0
  masks = {"w": jnp.array([[True, False], [True, True]])}
  for tx in (jaxprune.masked_optimizer(optax.adam(0.1), masks), jaxprune.keep_masked(masks)):
    step = jax.jit(lambda st, pp, tx=tx: tx.update(g, st, pp), donate_argnums=0)
    step(tx.init(p), p)
    assert masks["w"].tolist() == [[True, False], [True, True]]   # not deleted


def test_masks_of_an_nnx_optimizer_or_train_state_fit_the_params_they_update():
  """nnx.Optimizer keeps its optax state's arrays in OptVariable containers: masks_of used to
  return those, which apply_masks and masked_optimizer refused against the model's Param state.
  A flax TrainState (or the nnx.Optimizer itself) is searched through its .opt_state."""
  net = nnx_sigmoid_mlp(0)
  params = nnx.state(net, nnx.Param)
  _, m = jaxprune.prune_to_sparsity(params, None, 0.6, scope="layer")
  for tx in (jaxprune.masked_optimizer(optax.adam(1e-2), m),
             jaxprune.keep_masked(m)):
    opt = nnx.Optimizer(net, tx, wrt=nnx.Param)
    for got in (jaxprune.masks_of(opt), jaxprune.masks_of(opt.opt_state),
                jaxprune.masks_of(opt.opt_state, like=params)):
      assert jax.tree.structure(got) == jax.tree.structure(m)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(m)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      pruned = jaxprune.apply_masks(params, got)            # refused before
      assert float(jnp.abs(pruned["l1"]["kernel"][...][~m["l1"]["kernel"][...]]).max()) == 0.0
      jaxprune.masked_optimizer(optax.sgd(0.1), got).init(params)
  with pytest.raises(ValueError, match=r"pass the nnx.Optimizer itself, or its .opt_state"):
    jaxprune.masks_of(nnx.state(opt))
  with pytest.raises(ValueError, match="like has 3"):
    jaxprune.masks_of(opt, like={"a": jnp.ones(2), "b": jnp.ones(2), "c": jnp.ones(2)})

  from flax.training import train_state
  model = jaxprune.MLP(in_features=4, hidden=(6,), out_features=3)
  variables = model.init(jax.random.key(0))
  tx = jaxprune.gradual(optax.adam(1e-2), sparsity=0.5, begin_step=0, end_step=2, frequency=1)
  ts = train_state.TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx)
  assert jax.tree.structure(jaxprune.masks_of(ts)) == jax.tree.structure(variables["params"])
  with pytest.raises(ValueError, match=r"\(dict\) holds no masks"):
    jaxprune.masks_of({"not": "an optimizer state"})


def test_masks_one_key_off_the_params_name_the_fix():
  """fit() hands an optimizer variables['params'] only: masks over the whole variables given
  to masked_optimizer inside fit were refused with advice that led back to the same masks."""
  model = jaxprune.MLP(in_features=4, hidden=(6,), out_features=3)
  variables = model.init(jax.random.key(0))
  _, m = jaxprune.prune_to_sparsity(variables, None, 0.5)
  x = np.random.default_rng(0).normal(size=(16, 4)).astype(np.float32)
  y = np.arange(16) % 3
  with pytest.raises(ValueError, match=r"under an extra key \['params'\]: pass masks\['params'\]"):
    jaxprune.fit(model, variables, x, y, key=jax.random.key(1), epochs=1, progress=False,
                 optimizer=jaxprune.masked_optimizer(optax.adam(1e-3), m))
  with pytest.raises(ValueError, match=r"without the key \['params'\]: pass \{'params': masks\}"):
    jaxprune.apply_masks(variables, m["params"])
  params, _ = jaxprune.fit(model, variables, x, y, key=jax.random.key(1), epochs=1,
                           progress=False,
                           optimizer=jaxprune.masked_optimizer(optax.adam(1e-3), m["params"]))
  kernel = params["params"]["hidden_0"]["kernel"]
  assert float(jnp.abs(kernel[~m["params"]["hidden_0"]["kernel"]]).max()) == 0.0


def test_masks_over_whole_variables_or_nnx_state_name_the_filter():
  """Masks over a model's whole variables (linen, batch_stats beside params) or whole nnx state
  (BatchStat and RNG leaves) given to an optimizer of the params alone: the message said to
  make them with expand(params, ...), which fails there too."""
  net, v, x = linen_batch_norm_mlp()
  t = jaxprune.trace(net.apply, v, x)
  wm = jaxprune.expand(v, t, jaxprune.unit_masks_ones(t))
  with pytest.raises(ValueError, match=r"beside other collections .*pass masks\['params'\]"):
    jaxprune.masked_optimizer(optax.adam(1e-3), wm).init(v["params"])
  jaxprune.masked_optimizer(optax.adam(1e-3), wm["params"]).init(v["params"])

  class M(nnx.Module):
    def __init__(self, rngs):
      self.l1, self.bn = nnx.Linear(5, 8, rngs=rngs), nnx.BatchNorm(8, rngs=rngs)
      self.do, self.l2 = nnx.Dropout(0.3, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(self.do(nnx.relu(self.bn(self.l1(x)))))

  m = M(nnx.Rngs(0))
  m.eval()
  g, state = nnx.split(m)
  t = jaxprune.trace(lambda s, x: nnx.merge(g, s)(x), state, x)
  wm = jaxprune.expand(state, t, jaxprune.unit_masks_ones(t))
  with pytest.raises(ValueError, match=r"hold every leaf of the params and more.*"
                     r"nnx\.filter_state\(masks, nnx\.Param\)"):
    jaxprune.apply_masks(nnx.state(m, nnx.Param), wm)
  jaxprune.apply_masks(nnx.state(m, nnx.Param), nnx.filter_state(wm, nnx.Param))
  with pytest.raises(ValueError, match="keeping only the leaves the params have"):
    jaxprune.apply_masks({"a": jnp.ones(2)}, {"a": jnp.ones(2, bool), "b": jnp.ones(2, bool)})


def test_float64_scores_and_low_precision_block_sums_rank_exactly():
  """Custom scores were cast to float32 (float64 ones that differ beyond its precision tied,
  and the lowest index lost), and block_prune summed bfloat16 / float16 scores in their own
  dtype (1 + 2^-9 and 1.0 tied; float16 blocks of 16 x 5000 overflowed to inf)."""
  w = np.array([[1 + 1e-12, 1.0], [1 + 2e-12, 1 + 3e-12]])
  with jax.enable_x64(True):
    p = {"a": {"kernel": jnp.asarray(w)}}
    for kw in ({}, {"scores": jax.tree.map(jnp.abs, p)}):
      _, m = jaxprune.prune_to_sparsity(p, None, 0.25, **kw)
      np.testing.assert_array_equal(np.argwhere(~np.asarray(m["a"]["kernel"])), [[0, 1]])
  for dtype, big in ((jnp.bfloat16, 2.0 ** -9), (jnp.float16, 2.0 ** -12)):
    k = np.zeros((2, 8), np.float32)
    k[0, 0], k[0, 1], k[1, 0] = 1.0, big, 1.0      # block sums 1 + big and 1.0
    _, m = jaxprune.block_prune({"k": jnp.asarray(k, dtype)}, None, 0.5, block=(1, 8))
    np.testing.assert_array_equal(np.asarray(m["k"]).all(axis=1), [True, False])
  k = np.full((2, 16), 5000.0, np.float32)
  k[1] = 4500.0
  _, m = jaxprune.block_prune({"k": jnp.asarray(k, jnp.float16)}, None, 0.5, block=(1, 16))
  np.testing.assert_array_equal(np.asarray(m["k"]).all(axis=1), [True, False])


def test_traced_sparsity_outside_0_1_prunes_nothing_and_flags_the_params():
  """Under vmap a sparsity of 1.0 or 1.5 removed every weight (and -0.5 or NaN none) with no
  sign; now nothing is removed and the pruned leaves come back NaN, like jnp.sqrt(-1.0)."""
  rng = np.random.default_rng(0)
  params = {"a": {"kernel": host_f32(rng.normal(size=(8, 8))),
                  "bias": jnp.ones(8)}}
  ss = jnp.array([0.5, 1.0, 1.5, -0.5, jnp.nan])
  for fn in (jaxprune.prune_to_sparsity,
             lambda p, m, s: jaxprune.block_prune(p, m, s, block=(2, 2))):
    p, m = jax.vmap(lambda s: fn(params, None, s))(ss)
    np.testing.assert_array_equal(np.asarray(m["a"]["kernel"]).sum(axis=(1, 2)),
                                  [32, 64, 64, 64, 64])
    nan = np.isnan(np.asarray(p["a"]["kernel"])).all(axis=(1, 2))
    np.testing.assert_array_equal(nan, [False, True, True, True, True])
    np.testing.assert_array_equal(p["a"]["bias"], np.ones((5, 8)))   # not selected: untouched
  one, _ = jax.jit(jaxprune.prune_to_sparsity)(params, None, 0.5)     # valid: no NaN
  assert np.isfinite(np.asarray(one["a"]["kernel"])).all()


def test_gradual_refuses_nan_params_and_polynomial_sparsity_its_range():
  """gradual kept a NaN weight forever (its bit pattern ranks above every finite weight);
  polynomial_sparsity returned final=1.5 or NaN as the sparsity."""
  params = {"a": {"kernel": jnp.ones((4, 4)).at[0, 0].set(jnp.nan)}}
  tx = jaxprune.gradual(optax.sgd(0.1), sparsity=0.5, begin_step=0, end_step=2, frequency=1)
  with pytest.raises(ValueError, match=r"params\['a'\]\['kernel'\] holds 1 NaN.*cannot rank"):
    tx.init(params)
  for bad in (dict(final=1.5), dict(final=float("nan")), dict(final=0.5, initial=2.0),
              dict(final=-0.1)):
    with pytest.raises(ValueError, match="must be a number in \\[0, 1\\)"):
      jaxprune.polynomial_sparsity(1, begin_step=0, end_step=4, **bad)


# ---------------------------------------------------------------------- outside probe (optax)


def _branch_params():
  k = jax.random.split(jax.random.key(11), 3)
  return {"enc": {"w": jax.random.normal(k[0], (4, 6))},
          "dec": {"w": jax.random.normal(k[1], (6, 8)), "b": jnp.ones(8)},
          "head": {"w": jax.random.normal(k[2], (8, 2))}}


def _first_k_pruner():
  """A StepPruner that removes the first ``round(s * size)`` weights of every leaf in flat
  order: an exact, cheap stand-in (no radix select to compile) for schedule tests."""
  def prune(params, masks, state, grads, target):
    del grads
    def one(m):
      k = jnp.round(jnp.float32(target) * m.size).astype(jnp.int32)
      return m & (jnp.arange(m.size).reshape(m.shape) >= k)
    return params, jax.tree.map(one, masks), state
  return op.StepPruner(lambda params: (), prune, takes_sparsity=True, changes_params=False)


def _first_k(shape, s):
  """Reference of :func:`_first_k_pruner` for one leaf (NumPy)."""
  size = math.prod(shape)
  return (np.arange(size) >= round(s * size)).reshape(shape)


def test_masks_of_and_unit_masks_of_read_nested_pruning_states():
  """(a probe's finding) masks_of and unit_masks_of read only the outermost pruning state: a
  gradual inside or around a masked_optimizer, or around another gradual, gave masks (and unit
  masks) denser than the weights the training had zeroed."""
  params = _branch_params()
  fixed = jax.tree.map(lambda a: jnp.arange(a.size).reshape(a.shape) % 2 == 0, params)
  sched = dict(sparsity=0.5, begin_step=0, end_step=1, frequency=1, pruner=_first_k_pruner())
  g = jax.tree.map(lambda a: 0.01 * jnp.ones_like(a), params)
  want = jax.tree.map(lambda m: np.asarray(m) & _first_k(m.shape, 0.5), fixed)
  for tx in (jaxprune.masked_optimizer(jaxprune.gradual(optax.sgd(0.1), **sched), fixed),
             jaxprune.gradual(jaxprune.masked_optimizer(optax.sgd(0.1), fixed), **sched)):
    p = jaxprune.apply_masks(params, fixed)
    state = tx.init(p)
    for _ in range(2):
      u, state = jax.jit(tx.update)(g, state, p)
      p = optax.apply_updates(p, u)
    got = jaxprune.masks_of(state)
    for w, m, q in zip(jax.tree.leaves(want), jax.tree.leaves(got), jax.tree.leaves(p)):
      np.testing.assert_array_equal(np.asarray(m), w)
      np.testing.assert_array_equal(np.asarray(q) != 0, w)
    # replace_masks reaches the masked_optimizer's state, nested or not; gradual's stay
    other = jax.tree.map(lambda m: jnp.arange(m.size).reshape(m.shape) % 3 != 0, fixed)
    state = jaxprune.replace_masks(state, other)
    u, state = jax.jit(tx.update)(g, state, p)
    both = jax.tree.map(lambda m: np.asarray(m) & _first_k(m.shape, 0.5), other)
    for w, m, q in zip(jax.tree.leaves(both), jax.tree.leaves(jaxprune.masks_of(state)),
                       jax.tree.leaves(optax.apply_updates(p, u))):
      np.testing.assert_array_equal(np.asarray(m), w)
      assert not np.asarray(q)[~w].any()
  # two structured pruners on a schedule, one gradual inside the other: both groups
  rng = np.random.default_rng(3)
  mlp = {k: host_f32(rng.normal(size=s)) for k, s in
         {"w1": (3, 6), "w2": (6, 4), "w3": (4, 2)}.items()}
  fn = lambda p, x: jnp.tanh(jnp.tanh(x @ p["w1"]) @ p["w2"]) @ p["w3"]
  target = jaxprune.trace(fn, mlp, host_f32(rng.normal(size=(5, 3))))
  steps = dict(sparsity=0.5, begin_step=0, end_step=1, frequency=1)
  tx = jaxprune.gradual(jaxprune.gradual(optax.sgd(0.1), pruner=jaxprune.importance_pruner(
      target, "w1"), **steps), pruner=jaxprune.importance_pruner(target, "w2"), **steps)
  state, p = tx.init(mlp), mlp
  grads = jax.tree.map(jnp.zeros_like, mlp)
  for _ in range(2):
    u, state = jax.jit(tx.update)(grads, state, p)
    p = optax.apply_updates(p, u)
  units = jaxprune.unit_masks_of(state)
  assert sorted(units) == ["w1", "w2"] and [int(units[k].sum()) for k in ("w1", "w2")] == [3, 2]
  np.testing.assert_array_equal(np.asarray(p["w1"]).any(0), np.asarray(units["w1"]))
  np.testing.assert_array_equal(np.asarray(p["w2"]).any(0), np.asarray(units["w2"]))
  np.testing.assert_array_equal(np.asarray(jaxprune.masks_of(state)["w1"]).any(0),
                                np.asarray(units["w1"]))


def test_masks_of_merges_branches_whose_labels_are_a_prefix_of_the_params():
  """(a probe's finding) with labels naming whole subtrees, two pruning branches each hold a
  MaskedNode where the other holds a dict of masks: masks_of raised (and before nested states
  were merged, returned one branch's masks, the other's as kept with like=)."""
  params = _branch_params()
  sched = dict(begin_step=0, end_step=1, frequency=1, pruner=_first_k_pruner())
  tx = optax.multi_transform({"e": jaxprune.gradual(optax.sgd(0.1), sparsity=0.5, **sched),
                              "d": jaxprune.gradual(optax.sgd(0.1), sparsity=0.75, **sched),
                              "plain": optax.sgd(0.1)},
                             {"enc": "e", "dec": "d", "head": "plain"})
  g = jax.tree.map(lambda a: 0.01 * jnp.ones_like(a), params)
  state, p = tx.init(params), params
  for _ in range(2):
    u, state = jax.jit(tx.update)(g, state, p)
    p = optax.apply_updates(p, u)
  got = jaxprune.masks_of(state, like=params)
  want = {"enc": {"w": _first_k((4, 6), 0.5)},
          "dec": {"w": _first_k((6, 8), 0.75), "b": _first_k((8,), 0.75)},
          "head": {"w": np.ones((8, 2), bool)}}
  for k, leaves in want.items():
    for leaf, w in leaves.items():
      np.testing.assert_array_equal(np.asarray(got[k][leaf]), w)
      np.testing.assert_array_equal(np.asarray(p[k][leaf]) != 0, w)
  assert isinstance(jaxprune.masks_of(state)["head"], optax.MaskedNode)


def test_masks_of_merges_every_branch_of_multi_transform():
  """masks_of returned only the first branch's masks under optax.multi_transform (the others
  as MaskedNode placeholders): jaxprune.sparsity of them reported the first branch alone and
  apply_masks refused them."""
  params = _branch_params()
  labels = {"enc": {"w": "e"}, "dec": {"w": "d", "b": "d"}, "head": {"w": "plain"}}
  sched = dict(begin_step=0, end_step=1, frequency=1, pruner=_first_k_pruner())
  tx = optax.multi_transform({"e": jaxprune.gradual(optax.adam(0.1), sparsity=0.5, **sched),
                              "d": jaxprune.gradual(optax.sgd(0.1), sparsity=0.75, **sched),
                              "plain": optax.adam(0.1)}, labels)
  g = jax.tree.map(lambda a: 0.01 * jnp.ones_like(a), params)
  step = jax.jit(lambda p, st: tx.update(g, st, p))
  state, p = tx.init(params), params
  for _ in range(2):
    u, state = step(p, state)
    p = optax.apply_updates(p, u)
  got = jaxprune.masks_of(state)
  assert isinstance(got["head"]["w"], optax.MaskedNode)        # pruned by no branch
  want = {"enc": {"w": _first_k((4, 6), 0.5)},
          "dec": {"w": _first_k((6, 8), 0.75), "b": _first_k((8,), 0.75)}}
  for k in ("enc", "dec"):
    for leaf in want[k]:
      np.testing.assert_array_equal(np.asarray(got[k][leaf]), want[k][leaf])
      np.testing.assert_array_equal(np.asarray(p[k][leaf]) == 0, ~want[k][leaf])
  full = jaxprune.masks_of(state, like=params)
  assert jax.tree.structure(full) == jax.tree.structure(params)
  assert bool(full["head"]["w"].all()) and full["head"]["w"].shape == (8, 2)
  np.testing.assert_array_equal(np.asarray(full["dec"]["w"]), want["dec"]["w"])
  assert jaxprune.sparsity(full) == pytest.approx((12 + 36 + 6) / (24 + 48 + 8 + 16))
  jaxprune.apply_masks(p, full)
  with pytest.raises(ValueError, match="masks_of.*like="):
    jaxprune.masks_of(state, like={"enc": params["enc"]})
  # optax.masked: one pruned subtree, the rest filled as kept with like=.
  tx = optax.masked(jaxprune.gradual(optax.adam(0.1), sparsity=0.5, **sched),
                    {"enc": {"w": True}, "dec": {"w": False, "b": False}, "head": {"w": False}})
  state = tx.init(params)
  for _ in range(2):
    u, state = jax.jit(tx.update)(g, state, params)
  full = jaxprune.masks_of(state, like=params)
  np.testing.assert_array_equal(np.asarray(full["enc"]["w"]), _first_k((4, 6), 0.5))
  assert all(bool(jnp.all(m)) for m in (full["dec"]["w"], full["dec"]["b"], full["head"]["w"]))
  # Labels given as a prefix of the params (optax allows it): a MaskedNode stands for a whole
  # subtree; like= filled it with one scalar True and refused its own masks.
  tx = optax.multi_transform({"e": jaxprune.gradual(optax.adam(0.1), sparsity=0.5, **sched),
                              "plain": optax.sgd(0.1)},
                             {"enc": "e", "dec": "plain", "head": "plain"})
  state = tx.init(params)
  for _ in range(2):
    u, state = jax.jit(tx.update)(g, state, params)
  with pytest.raises(ValueError, match=r"MaskedNode\(\) placeholders.*masks_of\(opt_state, "
                     r"like=params\)"):
    jaxprune.apply_masks(params, jaxprune.masks_of(state))
  full = jaxprune.masks_of(state, like=params)
  assert jax.tree.structure(full) == jax.tree.structure(params)
  np.testing.assert_array_equal(np.asarray(full["enc"]["w"]), _first_k((4, 6), 0.5))
  assert all(bool(jnp.all(m)) and m.shape == params[k][leaf].shape
             for k in ("dec", "head") for leaf, m in full[k].items())


def test_erk_power_scale_and_a_sparsity_map_naming_no_leaf_are_refused_up_front():
  """erk_sparsity returned NaN sparsities for power_scale=nan (and nonsense for negative ones);
  gradual with a sparsity map key that names no leaf failed only inside the first update."""
  params = {"a": {"w": jnp.ones((4, 4))}, "b": {"w": jnp.ones((8, 8))}}
  for bad in (float("nan"), -1.0, float("inf"), "1"):
    with pytest.raises(ValueError, match="power_scale must be a finite number >= 0"):
      jaxprune.erk_sparsity(params, 0.5, power_scale=bad)
  # power_scale=0: every leaf the same density (hand-computed), 1: ERK.
  assert jaxprune.erk_sparsity(params, 0.5, power_scale=0) == pytest.approx({"a/w": 0.5,
                                                                             "b/w": 0.5})
  assert jaxprune.erk_sparsity(params, 0.5) == pytest.approx({"a/w": 1 / 6, "b/w": 7 / 12})
  tx = jaxprune.gradual(optax.sgd(0.1), sparsity={"a/x": 0.5}, begin_step=0, end_step=2,
                        frequency=1)
  with pytest.raises(KeyError, match=r"No parameter at \['a/x'\]; available leaves"):
    tx.init(params)


def _removed(state):
  return sum(int((~m).sum()) for m in jax.tree.leaves(jaxprune.masks_of(state)))


def test_schedule_counts_the_updates_gradual_receives_multisteps_and_apply_if_finite():
  """Pins what docs/training.md says: under optax.MultiSteps(every_k_schedule=k) the schedule's
  step t is the t-th *accumulated* update (call k * (t + 1) - 1), and a step that
  optax.apply_if_finite skips does not advance it."""
  params = {"w": jax.random.normal(jax.random.key(3), (8, 8))}
  g = {"w": jnp.full((8, 8), 0.01)}
  sched = dict(sparsity=0.5, begin_step=0, end_step=2, frequency=1)
  target = [round((0.5 - 0.5 * (1 - min(t, 2) / 2) ** 3) * 64) for t in range(4)]  # 0, 28, 32
  sched["pruner"] = _first_k_pruner()
  tx = optax.MultiSteps(jaxprune.gradual(optax.sgd(0.1), **sched), every_k_schedule=3)
  state, p, seen = tx.init(params), params, []
  for _ in range(9):
    u, state = jax.jit(tx.update)(g, state, p)
    p = optax.apply_updates(p, u)
    seen.append(_removed(state))
  assert seen == [0, 0, target[0], target[0], target[0], target[1], target[1], target[1],
                  target[2]]
  np.testing.assert_array_equal(np.asarray(p["w"]) == 0, ~_first_k((8, 8), 0.5))
  tx = optax.apply_if_finite(jaxprune.gradual(optax.sgd(0.1), **sched), 5)
  state, p, seen = tx.init(params), params, []
  for i in range(4):
    u, state = jax.jit(tx.update)({"w": g["w"] * (jnp.nan if i == 1 else 1.0)}, state, p)
    p = optax.apply_updates(p, u)
    seen.append(_removed(state))
  assert seen == [target[0], target[0], target[1], target[2]]


def _gradual_zeros(tx, p, grads, steps):
  q, st, zeros = p, tx.init(p), []
  for _ in range(steps):
    u, st = tx.update(grads, st, q)
    q = optax.apply_updates(q, u)
    zeros.append(jnp.sum(q["w"] == 0))
  return jnp.stack(zeros), st


def test_gradual_takes_scores_computed_once_and_checks_them_inside_the_step():
  """Scores that exist before the step (SNIP scores computed once, as training.md shows) were
  checked by a jitted program staged inside gradual's cond, and np.asarray of its traced result
  crashed (TracerArrayConversionError) in a jitted and in an eager update alike; they are
  checked on the host now, so negative ones are refused there too."""
  p = {"w": jax.random.normal(jax.random.key(0), (8, 4)), "b": jnp.zeros(4)}
  xb = jax.random.normal(jax.random.key(1), (16, 8))
  loss = lambda q, x: jnp.mean(jnp.tanh(x @ q["w"] + q["b"]) ** 2)
  snip = jaxprune.snip_scores(loss, p, xb)
  tx = jaxprune.gradual(optax.sgd(0.0), sparsity=0.5, begin_step=0, end_step=2, frequency=1,
                        scores=lambda params: snip)
  zeros = {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)}
  jitted = jax.jit(tx.update)
  st, q = tx.init(p), p
  for _ in range(3):
    u, st = jitted(zeros, st, q)
    q = optax.apply_updates(q, u)
  kept = np.asarray(jaxprune.masks_of(st)["w"])
  order = np.argsort(np.asarray(snip["w"]).ravel(), kind="stable")   # lowest scores go
  want = np.ones(32, bool)
  want[order[:16]] = False
  np.testing.assert_array_equal(kept.ravel(), want)
  eager, _ = _gradual_zeros(tx, p, zeros, 3)
  assert eager.tolist() == [int(np.round(32 * float(jaxprune.polynomial_sparsity(
      t, final=0.5, begin_step=0, end_step=2)))) for t in range(3)] == [0, 14, 16]
  signed = jaxprune.gradual(optax.sgd(0.0), sparsity=0.5, begin_step=0, end_step=2,
                            frequency=1, scores=lambda params: p)   # concrete, signed
  with pytest.raises(ValueError, match="The scores of w hold negative values"):
    jax.jit(signed.update)(zeros, signed.init(p), p)


def test_gradual_with_a_traced_final_sparsity_outside_0_1_prunes_at_no_step():
  """training.md: a traced sparsity outside [0, 1) removes nothing. gradual checked each
  step's own target, so a final 1.5 pruned on the steps whose target was still below 1 (63 of
  64 weights) without a flag; now no step prunes, and a valid one in the same vmap is as
  before."""
  p = {"w": jax.random.normal(jax.random.key(0), (8, 8))}
  g = {"w": jnp.zeros((8, 8))}

  def run(s):
    tx = jaxprune.gradual(optax.sgd(0.1), sparsity=s, begin_step=0, end_step=10, frequency=1)
    return _gradual_zeros(tx, p, g, 11)[0]

  many = jax.vmap(run)(jnp.array([0.5, 1.5, jnp.nan]))
  np.testing.assert_array_equal(many[0], run(0.5))
  assert many[0].tolist()[-1] == 32
  assert many[1].tolist() == [0] * 11 and many[2].tolist() == [0] * 11


def test_a_per_leaf_sparsity_map_may_hold_traced_values():
  """A vmap over one leaf's sparsity in a per-leaf map failed (float() of a tracer) where a
  single traced sparsity works; each run now equals its own call, and a value outside [0, 1)
  prunes nothing in its run, as a single traced one does."""
  p = {"a": jax.random.normal(jax.random.key(0), (8, 8)),
       "b": jax.random.normal(jax.random.key(1), (8, 8))}
  g = jax.tree.map(jnp.zeros_like, p)

  def run(s):
    tx = jaxprune.gradual(optax.sgd(0.1), sparsity={"a": s, "b": 0.5}, begin_step=0,
                          end_step=4, frequency=1)
    q, st = p, tx.init(p)
    for _ in range(5):
      u, st = tx.update(g, st, q)
      q = optax.apply_updates(q, u)
    return jnp.stack([jnp.sum(q["a"] == 0), jnp.sum(q["b"] == 0)])

  many = jax.vmap(run)(jnp.array([0.25, 0.75, 1.5]))
  np.testing.assert_array_equal(many[:2], np.stack([run(0.25), run(0.75)]))
  assert many[:2].tolist() == [[16, 32], [48, 32]] and many[2].tolist() == [0, 0]
  kept = jax.vmap(lambda s: jaxprune.prune_to_sparsity(p, None, {"a": s, "b": 0.5})[1]["a"].sum())(
      jnp.array([0.25, 1.5]))
  assert kept.tolist() == [48, 64]


def test_replace_masks_prunes_again_with_the_optimizers_statistics():
  """A new keep_masked / masked_optimizer given the previous round's state trains with the
  state's masks (update never reads the new ones); replace_masks puts the new ones in: the
  newly pruned weights are exactly zero after the next step, the kept ones move as Adam with
  its carried moments moves them, masks_of reports them, and the jitted step is not traced
  again. Optax chains, a flax TrainState and an nnx.Optimizer (in place)."""
  from flax.training import train_state  # pylint: disable=import-outside-toplevel
  p = {"w": jax.random.normal(jax.random.key(0), (6, 5)), "b": jnp.arange(5.0)}
  g = jax.tree.map(lambda a: jnp.cos(a + 1.0), p)
  m1 = jaxprune.ones_like(p)
  _, m2 = jaxprune.prune_to_sparsity(p, m1, 0.5)
  traces = []
  for make in (lambda m: optax.chain(optax.adam(0.1), jaxprune.keep_masked(m)),
               lambda m: jaxprune.masked_optimizer(optax.adam(0.1), m)):
    tx = make(m1)

    @jax.jit
    def step(q, st, tx=tx):
      traces.append(1)
      u, st = tx.update(g, st, q)
      return optax.apply_updates(q, u), st

    q, st = step(p, tx.init(p))
    stale = make(m2).update(g, st, q)[0]                      # the pitfall: m1 still applies
    assert float(jnp.abs(stale["w"][~m2["w"]]).max()) > 0
    before = len(traces)
    st2 = jaxprune.replace_masks(st, m2)
    q2, st3 = step(q, st2)
    assert len(traces) == before                              # no new trace
    assert bool(jnp.all(q2["w"][~m2["w"]] == 0)) and bool(jnp.all(q2["b"][~m2["b"]] == 0))
    assert bool(jnp.all(jaxprune.masks_of(st3)["w"] == m2["w"]))
    assert bool(jnp.all(jaxprune.masks_of(st)["w"]))          # the old state is unchanged
    # The kept weights move as the same optimizer with the same moments moves them.
    q_ref, _ = step(q, st)
    np.testing.assert_array_equal(q2["w"][m2["w"]], q_ref["w"][m2["w"]])

  ts = train_state.TrainState.create(apply_fn=None, params=p,
                                     tx=jaxprune.masked_optimizer(optax.adam(0.1), m1))
  ts2 = jaxprune.replace_masks(ts, m2)
  assert bool(jnp.all(jaxprune.masks_of(ts2)["w"] == m2["w"]))
  assert bool(jnp.all(ts2.apply_gradients(grads=g).params["w"][~m2["w"]] == 0))

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.lin = nnx.Linear(6, 5, rngs=rngs)

  net = Net(nnx.Rngs(0))
  state = nnx.state(net, nnx.Param)
  ones = jaxprune.ones_like(state)
  _, half = jaxprune.prune_to_sparsity(state, ones, 0.5)
  opt = nnx.Optimizer(net, jaxprune.masked_optimizer(optax.adam(0.1), ones), wrt=nnx.Param)
  assert jaxprune.replace_masks(opt, half) is opt
  opt.update(net, jax.tree.map(jnp.ones_like, nnx.state(net, nnx.Param)))
  k, hk = net.lin.kernel.get_value(), half["lin"]["kernel"].get_value()
  assert bool(jnp.all(k[~hk] == 0)) and bool(jnp.any(k[hk] != 0))


def test_replace_masks_refuses_what_it_cannot_replace():
  p = {"w": jnp.ones((3, 2))}
  m = jaxprune.ones_like(p)
  st = jaxprune.masked_optimizer(optax.sgd(0.1), m).init(p)
  with pytest.raises(ValueError, match="shapes and dtype"):
    jaxprune.replace_masks(st, {"w": jnp.ones((2, 3), bool)})
  with pytest.raises(ValueError, match="shapes and dtype"):
    jaxprune.replace_masks(st, {"w": jnp.ones((3, 2))})               # float, not bool
  with pytest.raises(ValueError, match="holds no masks"):
    jaxprune.replace_masks(optax.adam(0.1).init(p), m)
  two = {"a": jnp.ones((3, 3)), "b": jnp.ones((3, 3))}
  st2 = jaxprune.masked_optimizer(optax.sgd(0.1), jaxprune.ones_like(two)).init(two)
  ma, mb = jnp.eye(3, dtype=bool), ~jnp.eye(3, dtype=bool)
  for wrong in ([ma, mb], {"x": ma, "y": mb}, {"b": ma, "c": mb}):    # same leaves, other keys
    with pytest.raises(ValueError, match="structure"):
      jaxprune.replace_masks(st2, wrong)
  sched = jaxprune.gradual(optax.sgd(0.1), sparsity=0.5, begin_step=0, end_step=2,
                           frequency=1)
  with pytest.raises(ValueError, match="follow their schedule"):
    jaxprune.replace_masks(sched.init(p), m)


def test_gradual_with_traced_nan_or_negative_scores_removes_nothing():
  """Scores computed inside ``gradual``'s step are traced and cannot raise. A NaN score's bit
  pattern ranked above every weight: the four NaN-scored (smallest) weights were kept and the
  four largest removed; negative scores were ranked as they were. Such a step now removes
  nothing, as a traced sparsity outside [0, 1) does; so does a jitted prune_to_sparsity."""
  p = {"w": host_f32([[0.1, -0.2, 0.3, -0.4], [0.5, -0.6, 0.7, -0.8]])}

  def removed(scores):
    tx = jaxprune.gradual(optax.sgd(0.0), sparsity=0.5, begin_step=0, end_step=1, frequency=1,
                          scores=scores)
    s, q = tx.init(p), p
    step = jax.jit(tx.update)
    for _ in range(2):
      u, s = step(jax.tree.map(jnp.ones_like, q), s, q)
      q = optax.apply_updates(q, u)
    return np.flatnonzero(~np.asarray(jaxprune.masks_of(s)["w"])).tolist()

  assert removed(lambda q: jax.tree.map(jnp.abs, q)) == [0, 1, 2, 3]
  nan_small = lambda q: jax.tree.map(lambda w: jnp.where(jnp.abs(w) < 0.45, jnp.nan, w * w), q)
  assert removed(nan_small) == []
  assert removed(lambda q: jax.tree.map(lambda w: -jnp.abs(w), q)) == []
  pruned, masks = jax.jit(
      lambda q: jaxprune.prune_to_sparsity(q, None, 0.5, scores=nan_small(q)))(p)
  assert bool(np.all(masks["w"]))
  assert np.isnan(np.asarray(pruned["w"])).all()   # flagged, as a traced sparsity of 1.5 is
  # a NaN score of a weight the masks already remove is not ranked: the step prunes
  start = {"w": jnp.asarray(np.arange(8).reshape(2, 4) != 0)}
  nan_at_0 = lambda q: {"w": jnp.abs(q["w"]).at[0, 0].set(jnp.nan)}
  pruned, masks = jax.jit(
      lambda q: jaxprune.prune_to_sparsity(q, start, 0.5, scores=nan_at_0(q)))(p)
  assert np.flatnonzero(~np.asarray(masks["w"])).tolist() == [0, 1, 2, 3]
  np.testing.assert_array_equal(pruned["w"], np.where(masks["w"], p["w"], 0))


@pytest.mark.parametrize("kind", ["masked_optimizer", "gradual"])
def test_masks_handed_out_survive_a_step_that_donates_the_state(kind):
  """``masks_of`` and ``unit_masks_of`` return copies: a jitted step with ``donate_argnums``
  on the state freed the arrays they had returned ("Array has been deleted"), so the
  documented flow (read the masks, train on, then prune_to_sparsity with them) failed."""
  p = {"w": host_f32(np.arange(1.0, 9.0).reshape(2, 4)), "b": jnp.zeros(4)}
  if kind == "gradual":
    tx = jaxprune.gradual(optax.sgd(0.1), sparsity=0.5, begin_step=0, end_step=1, frequency=1)
  else:
    tx = jaxprune.masked_optimizer(optax.sgd(0.1), {"w": p["w"] > 4, "b": jnp.ones(4, bool)})
  step = jax.jit(lambda q, s: tx.update(jax.tree.map(jnp.ones_like, q), s, q),
                 donate_argnums=(1,))
  s = tx.init(p)
  for _ in range(2):
    _, s = step(p, s)
  held = jaxprune.masks_of(s)
  want = np.array(held["w"])
  assert want.tolist() == [[False] * 4, [True] * 4]     # (gradual: the 4 smallest removed)
  _, s = step(p, s)              # donates the state that held the masks
  np.testing.assert_array_equal(held["w"], want)


def test_a_unit_group_split_over_multi_transform_branches_names_the_cause():
  """A structured pruner in one ``multi_transform`` branch whose group reaches into a leaf of
  another branch said the params were not the model's; it now names the branches and the two
  fixes."""
  rng = np.random.default_rng(0)
  p = {"w1": host_f32(rng.normal(size=(3, 4))), "b1": jnp.zeros(4),
       "w2": host_f32(rng.normal(size=(4, 2)))}
  fn = lambda q, x: jnp.tanh(x @ q["w1"] + q["b1"]) @ q["w2"]
  t = jaxprune.trace(fn, p, host_f32(rng.normal(size=(8, 3))))
  g = jaxprune.gradual(optax.sgd(0.1), sparsity=0.5, begin_step=0, end_step=1, frequency=1,
                       pruner=jaxprune.importance_pruner(t, "w1"))
  tx = optax.multi_transform({"a": g, "b": optax.sgd(0.1)}, {"w1": "a", "b1": "a", "w2": "b"})
  with pytest.raises(ValueError, match="label all of the group's leaves for its branch, or wrap "
                     "jaxprune.gradual around the whole multi_transform"):
    s = tx.init(p)
    tx.update(jax.tree.map(jnp.ones_like, p), s, p)
