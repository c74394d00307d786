"""Tests for jaxprune.pruners.importance: scores, ranking, one-shot and iterative removal."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune.models.mlp import MLP
from jaxprune.pruners.importance import (importance_prune, importance_scores,
                                         iterative_importance)


@pytest.fixture(scope="module")
def model_params():
  model = MLP(in_features=4, hidden=(5,), out_features=2, activation="relu")
  params = model.init(jax.random.key(0))
  k = jnp.array([[1., -2., 0.5, 3., 1.],
                 [1., 2., 0.5, -3., 1.],
                 [1., 2., -0.5, 3., 1.],
                 [1., -2., 0.5, 3., -1.]])  # column norms: 2, 4, 1, 6, 2 (tie 0 and 4)
  params["params"]["hidden_0"] = dict(params["params"]["hidden_0"], kernel=k)
  return model, params


def test_scores_rms_l1_l2(model_params):
  model, params = model_params
  np.testing.assert_allclose(importance_scores(params, model, "hidden_0"), [1, 2, .5, 3, 1])
  np.testing.assert_allclose(importance_scores(params, model, "hidden_0", "l2"), [2, 4, 1, 6, 2])
  np.testing.assert_allclose(importance_scores(params, model, "hidden_0", "l1"), [4, 8, 2, 12, 4])
  # Conv: RMS over in_ch x k x k.
  cnn = jaxprune.LeNet(input_shape=(16, 16, 1))
  p = cnn.init(jax.random.key(1))
  k = np.asarray(p["params"]["conv_1"]["kernel"])
  np.testing.assert_allclose(importance_scores(p, cnn, "conv_1"),
                             np.sqrt((k ** 2).reshape(-1, 32).mean(0)), rtol=1e-5)


def test_scores_called_in_the_factories_order_say_the_params_come_first(model_params):
  model, params = model_params
  with pytest.raises(TypeError, match=r"takes \(params, target, group\): the params come first"):
    importance_scores(model, "hidden_0")
  with pytest.raises(TypeError, match="needs the group's name"):
    importance_scores(params, model)


def test_one_shot_ranking_ties_and_keep_one(model_params):
  model, params = model_params
  prune = importance_prune(model, "hidden_0")
  p2, m, res = prune(params, jaxprune.unit_masks_ones(model), 2)
  np.testing.assert_array_equal(m["hidden_0"], [0, 1, 0, 1, 1])  # 2 first, then tie 0 < 4
  assert int(res.removed) == 2 and not bool(res.kept_last)
  np.testing.assert_array_equal(p2["params"]["hidden_0"]["kernel"][:, 0], 0.0)
  np.testing.assert_array_equal(p2["params"]["out"]["kernel"][2], 0.0)
  _, m, res = prune(params, {"hidden_0": jnp.array([0, 1, 1, 1, 1], bool)}, 5)
  np.testing.assert_array_equal(m["hidden_0"], [0, 0, 0, 1, 0])
  assert bool(res.kept_last)
  with pytest.raises(ValueError, match="k must be"):
    prune(params, jaxprune.unit_masks_ones(model), 9)
  with pytest.raises(KeyError, match="hidden_0"):
    importance_prune(model, "hidden_9")
  with pytest.raises(ValueError, match="norm"):
    importance_prune(model, "hidden_0", norm="l3")


def test_iterative_stops_before_loss_rises(model_params):
  model, params = model_params
  # Loss = 1 + (number of removed units among {1, 3})^2-ish: removing 2, 0, 4 is free,
  # removing 1 raises it by 5% and 3 by 50%.
  def loss_fn(p):
    k = p["params"]["hidden_0"]["kernel"]
    gone = lambda u: jnp.all(k[:, u] == 0).astype(jnp.float32)
    return 1.0 + 0.05 * gone(1) + 0.5 * gone(3)
  run = iterative_importance(model, "hidden_0", loss_fn)
  _, m, rep = run(params, jaxprune.unit_masks_ones(model), 0.1)
  np.testing.assert_array_equal(m["hidden_0"], [0, 0, 0, 1, 0])
  assert int(rep.count) == 5
  np.testing.assert_array_equal(rep.units_kept[:5], [5, 4, 3, 2, 1])
  np.testing.assert_array_equal(rep.removed[1:5], [2, 0, 4, 1])
  np.testing.assert_allclose(rep.loss[:5], [1, 1, 1, 1, 1.05], rtol=1e-6)
  np.testing.assert_allclose(rep.min_importance[:5], [.5, 1, 1, 2, 3])
  # A tighter threshold (traced, no recompilation) stops before removing unit 1.
  _, m, rep = run(params, jaxprune.unit_masks_ones(model), 0.01)
  np.testing.assert_array_equal(m["hidden_0"], [0, 1, 0, 1, 0])
  assert int(rep.count) == 4 and float(rep.stopped_loss) == pytest.approx(1.05)
  with pytest.raises(ValueError, match="max_rise"):
    run(params, jaxprune.unit_masks_ones(model), -1.0)
  # The rise is absolute by default; relative=True scales it by the starting loss (here 2).
  loss2 = lambda p: loss_fn(p) + 1.0
  _, m_abs, _ = iterative_importance(model, "hidden_0", loss2)(
      params, jaxprune.unit_masks_ones(model), 0.04)
  _, m_rel, _ = iterative_importance(model, "hidden_0", loss2, relative=True)(
      params, jaxprune.unit_masks_ones(model), 0.04)
  np.testing.assert_array_equal(m_abs["hidden_0"], [0, 1, 0, 1, 0])  # 0.05 > 0.04: unit 1 kept
  np.testing.assert_array_equal(m_rel["hidden_0"], [0, 0, 0, 1, 0])  # 0.05 <= 0.08: removed


def test_bad_weights_counts_and_losses_raise(model_params):
  """NaN incoming weights (which would rank their unit last), a fractional k, a non-scalar loss
  and a NaN starting loss raise with the fix; a NaN loss after a removal stops the loop (it is
  not within max_rise), so a loss that breaks as units go does not prune to one unit."""
  model, params = model_params
  bad = jax.tree.map(lambda a: a, params)
  bad["params"]["hidden_0"] = dict(bad["params"]["hidden_0"],
                                   kernel=params["params"]["hidden_0"]["kernel"].at[0, 0].set(
                                       jnp.nan))
  ones = jaxprune.unit_masks_ones(model)
  with pytest.raises(ValueError, match=r"hidden_0/kernel of group 'hidden_0' holds 1 NaN"):
    importance_prune(model, "hidden_0")(bad, ones, 2)
  for k in (1.5, -1, 6, float("inf"), float("nan"), True, np.ones(2)):
    with pytest.raises(ValueError, match="whole number of units"):
      importance_prune(model, "hidden_0")(params, ones, k)
  for k in (0, 5, 2.0, np.int32(3)):  # whole numbers from 0 to the group's size pass
    importance_prune(model, "hidden_0")(params, ones, k)
  loss_fn = lambda p: jnp.sum(p["params"]["hidden_0"]["kernel"] ** 2)
  with pytest.raises(ValueError, match=r"hidden_0/kernel of group 'hidden_0' holds 1 NaN"):
    iterative_importance(model, "hidden_0", loss_fn)(bad, ones, 0.1)
  per_pattern = lambda p: p["params"]["hidden_0"]["kernel"][0]
  with pytest.raises(ValueError, match=r"scalar loss.*shape \(5,\)"):
    iterative_importance(model, "hidden_0", per_pattern)(params, ones, 0.1)
  with pytest.raises(ValueError, match="gives nan for the unpruned params"):
    iterative_importance(model, "hidden_0", lambda p: loss_fn(p) * jnp.nan)(params, ones, 0.1)
  # NaN once unit 0 is gone (the second removal; unit 2 goes first): two rows, then it stops.
  def breaks(p):
    k = p["params"]["hidden_0"]["kernel"]
    return jnp.where(jnp.all(k[:, 0] == 0), jnp.nan, 1.0)
  _, m, rep = iterative_importance(model, "hidden_0", breaks)(params, ones, 0.1)
  np.testing.assert_array_equal(m["hidden_0"], [1, 1, 0, 1, 1])
  assert int(rep.count) == 2 and np.isnan(float(rep.stopped_loss))
  # Under jit the checks that need values cannot run; the NaN stop still holds.
  _, m, rep = jax.jit(iterative_importance(model, "hidden_0", breaks))(params, ones, 0.1)
  np.testing.assert_array_equal(m["hidden_0"], [1, 1, 0, 1, 1])


def test_traced_bad_k_or_nan_kernel_changes_nothing_and_sets_invalid():
  """docs/errors.md: under jit a k that is not a whole number in [0, size], or a NaN kernel,
  changes nothing and sets report.invalid; k = size (or more than the kept units) removes all
  units but one (kept_last)."""
  model = jaxprune.MLP(in_features=4, hidden=(12,), out_features=3)
  params = model.init(jax.random.key(0))
  ones = jaxprune.unit_masks_ones(model)
  prune = jax.jit(jaxprune.importance_prune(model, "hidden_0"))
  got = {}
  for k in (-3, 0, 5, 12, 50, 2.5):
    p, m, rep = prune(params, ones, k)
    got[k] = (int(np.sum(m["hidden_0"])), bool(rep.invalid), bool(rep.kept_last))
    if bool(rep.invalid):   # nothing changed: the params come back as given
      for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
  assert got == {-3: (12, True, False), 0: (12, False, False), 5: (7, False, False),
                 12: (1, False, True), 50: (12, True, False), 2.5: (12, True, False)}
  bad = jax.tree.map(lambda a: a, params)
  bad["params"]["hidden_0"]["kernel"] = bad["params"]["hidden_0"]["kernel"].at[0, 3].set(jnp.nan)
  p, m, rep = prune(bad, ones, 4)
  assert bool(rep.invalid) and int(rep.removed) == 0 and bool(np.all(m["hidden_0"]))
  with pytest.raises(ValueError, match="NaN"):
    jaxprune.importance_prune(model, "hidden_0")(bad, ones, 4)
  with pytest.raises(ValueError, match="NaN"):
    jaxprune.importance_scores(bad, model, "hidden_0")
  # A NaN only in a unit the masks removed: the masked network is finite, so under jit the
  # one-shot pruner ranks the kept units as iterative_importance does (it refused them all).
  gone = dict(ones, hidden_0=ones["hidden_0"].at[3].set(False))
  p, m, rep = prune(bad, gone, 4)
  assert not bool(rep.invalid) and int(rep.removed) == 4 and int(np.sum(m["hidden_0"])) == 7
  _, want, _ = prune(params, gone, 4)   # unit 3's kernel is zeroed before scoring either way
  np.testing.assert_array_equal(m["hidden_0"], want["hidden_0"])
  assert np.all(np.isfinite(np.asarray(rep.scores)))


def test_importance_prune_under_x64_warns_nothing_and_ranks_as_in_float32():
  """Under jax_enable_x64 the rank scatter wrote int64 positions into an int32 array: JAX's
  FutureWarning (an error in later JAX, and today under warnings-as-errors)."""
  import warnings  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  p = {"w1": rng.normal(size=(6, 5)), "b1": np.zeros(5), "w2": rng.normal(size=(5, 3)),
       "b2": np.zeros(3)}
  f = lambda p, x: jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  x = rng.normal(size=(8, 6))
  want = np.linalg.norm(p["w1"], axis=0).argsort()[2:]     # the 3 largest L2 norms kept
  with jax.enable_x64(True), warnings.catch_warnings():
    warnings.simplefilter("error")
    t = jaxprune.trace(f, p, x)
    _, um, _ = importance_prune(t, "w1", norm="l2")(p, jaxprune.unit_masks_ones(t), 2)
  np.testing.assert_array_equal(np.flatnonzero(um["w1"]), np.sort(want))


def test_float64_kernels_rank_at_float64_and_a_nan_kernel_gets_weight_advice():
  """Scores were cast to float32: kernels of 1 + 3e-12, 1 + 1e-12, 1 + 2e-12 tied and unit 0
  was removed, not unit 1. A NaN kernel got data advice ('drop those rows')."""
  with jax.enable_x64(True):
    model = MLP(in_features=1, hidden=(3,), out_features=2)
    params = model.init(jax.random.key(0))
    k = jnp.asarray([[1 + 3e-12, 1 + 1e-12, 1 + 2e-12]], jnp.float64)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    params["params"]["hidden_0"]["kernel"] = k
    assert importance_scores(params, model, "hidden_0").dtype == jnp.float64
    _, um, _ = importance_prune(model, "hidden_0")(params, jaxprune.unit_masks_ones(model), 1)
    np.testing.assert_array_equal(um["hidden_0"], [True, False, True])
  model = MLP(in_features=4, hidden=(5,), out_features=2)
  params = model.init(jax.random.key(0))
  params["params"]["hidden_0"]["kernel"] = params["params"]["hidden_0"]["kernel"].at[0, 0].set(
      jnp.nan)
  with pytest.raises(ValueError, match="Weight leaf .* holds 1 NaN .* repair them") as e:
    importance_prune(model, "hidden_0")(params, jaxprune.unit_masks_ones(model), 1)
  assert "rows" not in str(e.value)


def test_iterative_losses_are_of_the_network_the_unit_masks_describe():
  """With another group masked in unit_masks (its units not zeroed in the params), the losses
  were those of the unmasked network: row 0 must equal the loss of expand + apply_masks."""
  model = MLP(in_features=3, hidden=(4, 5), out_features=2, activation="tanh")
  params = model.init(jax.random.key(3))
  x = jax.random.normal(jax.random.key(4), (16, 3))
  y = jax.random.normal(jax.random.key(5), (16, 2))
  loss_fn = lambda p: jnp.mean((model.apply(p, x) - y) ** 2)
  masks = dict(jaxprune.unit_masks_ones(model), hidden_0=jnp.array([1, 0, 1, 0], bool))
  masked = jaxprune.apply_masks(params, jaxprune.expand(params, model, masks))
  assert float(loss_fn(masked)) != pytest.approx(float(loss_fn(params)))
  new, m, rep = iterative_importance(model, "hidden_1", loss_fn)(params, masks, 10.0)
  assert float(rep.loss[0]) == pytest.approx(float(loss_fn(masked)), rel=1e-6)
  np.testing.assert_array_equal(m["hidden_0"], masks["hidden_0"])
  # Each row's loss is that of the masked network with the units removed so far.
  removed = rep.removed[1:int(rep.count)]
  keep = np.ones(5, bool)
  for step, u in enumerate(np.asarray(removed), start=1):
    keep[u] = False
    ref = jaxprune.apply_masks(params, jaxprune.expand(
        params, model, dict(masks, hidden_1=jnp.asarray(keep))))
    assert float(rep.loss[step]) == pytest.approx(float(loss_fn(ref)), rel=1e-5)
  assert float(loss_fn(new)) == pytest.approx(float(rep.loss[int(rep.count) - 1]), rel=1e-5)


def _self_reading_rnn():
  """A traced RNN whose unit 0 is important only through unit 2's recurrent row: its kernel
  columns (wx, wh) give scores [1.0012, 0.25, 0.025], and [0.05, 0.25, 0] once unit 2 goes."""
  def f(p, xs):
    def step(h, x):
      return jnp.tanh(x @ p["wx"] + h @ p["wh"] + p["b"]), None
    h, _ = jax.lax.scan(step, jnp.zeros((xs.shape[1], 3)), xs)
    return h @ p["o"]
  p = {"wx": jnp.array([[0.1, 0.5, 0.05]]),
       "wh": jnp.zeros((3, 3)).at[2, 0].set(2.0), "b": jnp.zeros(3), "o": jnp.ones((3, 1))}
  t = jaxprune.trace(f, p, jnp.ones((4, 2, 1)))
  return t, p, next(iter(t.groups))


def test_iterative_ranks_again_after_each_removal_in_a_group_that_reads_itself():
  """In a recurrent group a removed unit's row leaves the kept units' kernels: unit 0 falls
  below unit 1 once unit 2 is gone, so the second removal is unit 0 (the ranking of the
  network the masks describe, as importance_prune called once per unit finds it)."""
  t, p, g = _self_reading_rnn()
  ones = {g: jnp.ones(3, bool)}
  _, masks, rep = iterative_importance(t, g, lambda q: jnp.float32(0.0))(p, ones, 1.0)
  np.testing.assert_array_equal(np.asarray(rep.removed)[1:int(rep.count)], [2, 0])
  np.testing.assert_array_equal(masks[g], [False, True, False])
  np.testing.assert_allclose(np.asarray(rep.min_importance)[:3], [0.025, 0.05, 0.25],
                             rtol=1e-5)
  once = importance_prune(t, g)
  q, m, _ = once(p, ones, 1)
  np.testing.assert_array_equal(once(q, m, 1)[1][g], masks[g])


def test_one_shot_report_scores_removed_units_as_zero(model_params):
  """The report's scores are those of the network the unit masks describe, where a removed
  unit's weights are zero (as importance_scores of the masked params gives)."""
  model, params = model_params
  um = {"hidden_0": jnp.array([True, True, False, True, True])}
  _, _, rep = importance_prune(model, "hidden_0")(params, um, 1)
  masked = jaxprune.apply_masks(params, jaxprune.expand(params, model, um))
  np.testing.assert_array_equal(rep.scores, importance_scores(masked, model, "hidden_0"))
  assert float(rep.scores[2]) == 0.0
  t, p, g = _self_reading_rnn()
  _, _, rep = importance_prune(t, g)(p, {g: jnp.array([True, True, False])}, 0)
  assert float(rep.scores[2]) == 0.0


def test_a_float64_setting_under_x64_gives_the_jitted_calls_answer():
  """Each concrete setting reaches the sweep as a Python float, except a float64 one under x64:
  it stays strong, so a rise of exactly float32(0.1) against max_rise=np.float64(0.1) is
  compared in float64, eagerly as under the user's own jit (float(...) made it one answer
  eagerly and another under jit)."""
  with jax.enable_x64(True):
    model = MLP(in_features=2, hidden=(3,), out_features=1)
    params = model.init(jax.random.key(0))
    units = jaxprune.unit_masks_ones(model)

    def loss_fn(p):
      zeroed = jnp.sum(jnp.all(p["params"]["hidden_0"]["kernel"] == 0, axis=0))
      return jnp.float32(0.1) * (zeroed > 0)
    run = iterative_importance(model, "hidden_0", loss_fn)
    eager = run(params, units, np.float64(0.1))[1]["hidden_0"]
    jitted = jax.jit(run)(params, units, np.float64(0.1))[1]["hidden_0"]
    np.testing.assert_array_equal(eager, jitted)
    assert bool(np.all(eager))          # 0.1f > 0.1 in float64: the first removal rejected


def test_float64_losses_are_judged_at_float64_and_warn_nothing():
  """Under x64 with float64 params, the float64 scores were written into float32 report rows
  (JAX's FutureWarning, an error under the suite's warnings) and the loss was rounded to
  float32: rises of 1e-10 passed max_rise=0 and 5 of 6 units went."""
  with jax.enable_x64(True):
    model = MLP(in_features=4, hidden=(6,), out_features=3)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), model.init(jax.random.key(0)))
    x = jax.random.normal(jax.random.key(1), (32, 4), jnp.float64)
    y0 = model.apply(params, x)
    loss = lambda p: 1.0 + 1e-10 * jnp.sum(jnp.abs(model.apply(p, x) - y0)) / jnp.sum(
        jnp.abs(y0))
    _, masks, rep = iterative_importance(model, "hidden_0", loss)(
        params, jaxprune.unit_masks_ones(model), 0.0)
    assert bool(np.all(masks["hidden_0"])) and int(rep.count) == 1
    assert rep.loss.dtype == jnp.float64 and rep.min_importance.dtype == jnp.float64


def test_a_rise_of_exactly_max_rise_is_kept_and_reported_alike():
  """A removal whose rise equals max_rise (in float32) was rejected in the mask but written as
  accepted in the report's loss row and stopped_loss: XLA copied the rise test into each
  consumer, and copies with and without a fused multiply-add judged it apart. Each step now
  judges one stored loss; at max_rise set to the largest rise of the first j steps, at least
  j removals are kept, and the mask, the rows and loss_fn agree."""
  def mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
  rng = np.random.default_rng(2)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  p = {"w1": f32(rng.normal(size=(4, 10))), "b1": f32(rng.normal(size=10)),
       "w2": f32(rng.normal(size=(10, 3))), "b2": f32(np.zeros(3))}
  x = f32(rng.normal(size=(50, 4)))
  y = mlp(p, x) + f32(0.3 * rng.normal(size=(50, 3)))
  t = jaxprune.trace(mlp, p, x)
  loss_fn = lambda q: jnp.mean((mlp(q, x) - y) ** 2)
  um = {"w1": jnp.asarray(np.arange(10) % 4 != 3)}
  run = iterative_importance(t, "w1", loss_fn)
  _, _, free = run(p, um, 1e6)
  losses = np.asarray(free.loss, np.float32)
  for j in (1, 2, 3):
    max_rise = max(np.float32(losses[i] - losses[0]) for i in range(1, j + 1))
    q, m, rep = run(p, um, max_rise)
    count = int(rep.count)
    assert count >= j + 1
    removed = np.asarray(rep.removed)[1:count]
    want = np.asarray(um["w1"]).copy()
    want[removed] = False
    np.testing.assert_array_equal(m["w1"], want)
    np.testing.assert_array_equal(np.asarray(rep.units_kept)[:count],
                                  np.asarray(um["w1"]).sum() - np.arange(count))
    assert np.all(np.isnan(np.asarray(rep.loss)[count:]))
    assert float(loss_fn(q)) == float(rep.loss[count - 1])
    stopped = float(rep.stopped_loss)
    assert np.isnan(stopped) or np.float32(stopped - losses[0]) > max_rise
