"""The training API that experiments build on: sample-weighted evaluate, evaluate_many (one
vmapped program against a Python loop of evaluate), and the hook between training chunks."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune
from jaxprune import ga, train

MODEL = jaxprune.MLP(in_features=3, hidden=(5,), out_features=3)
AE = jaxprune.Autoencoder(in_features=3, hidden=(2,))
RNG = np.random.default_rng(0)
X = RNG.normal(size=(3, 12, 3)).astype(np.float32)           # 3 runs, padded to 12 rows
Y = RNG.integers(0, 3, size=(3, 12)).astype(np.int32)
SIZES = (12, 7, 4)
W = np.stack([(np.arange(12) < n).astype(np.float32) for n in SIZES])
PARAMS = jax.vmap(MODEL.init)(jax.random.split(jax.random.key(0), 3))
one = lambda tree, r: jax.tree.map(lambda a: a[r], tree)


def test_weighted_evaluate_equals_unpadded_and_weighted_mean():
  p = one(PARAMS, 1)
  n = SIZES[1]
  padded = jaxprune.evaluate(MODEL, p, X[1], Y[1], sample_weight=W[1])
  real = jaxprune.evaluate(MODEL, p, X[1, :n], Y[1, :n])
  assert padded["accuracy"] == pytest.approx(real["accuracy"], rel=1e-6)
  assert padded["loss"] == pytest.approx(real["loss"], rel=1e-6)
  # Fractional weights: the weighted means against NumPy.
  w = RNG.uniform(0.0, 0.3, size=12).astype(np.float32)         # sum below 1 on purpose
  out = np.asarray(MODEL.apply(p, X[1]))
  logp = out - np.log(np.sum(np.exp(out - out.max(1, keepdims=True)), 1, keepdims=True)) \
      - out.max(1, keepdims=True)
  ce = -logp[np.arange(12), Y[1]]
  correct = (out.argmax(1) == Y[1]).astype(np.float64)
  m = jaxprune.evaluate(MODEL, p, X[1], Y[1], sample_weight=w)
  assert m["loss"] == pytest.approx(np.sum(w * ce) / np.sum(w), rel=1e-5)
  assert m["accuracy"] == pytest.approx(np.sum(w * correct) / np.sum(w), rel=1e-5)
  # None keeps the unweighted program; all-ones weights agree with it.
  ones = jaxprune.evaluate(MODEL, p, X[1], Y[1], sample_weight=np.ones(12, np.float32))
  plain = jaxprune.evaluate(MODEL, p, X[1], Y[1])
  assert ones == pytest.approx(plain, rel=1e-6)


def test_sample_weight_errors():
  p = one(PARAMS, 0)
  with pytest.raises(ValueError, match="shape"):
    jaxprune.evaluate(MODEL, p, X[0], Y[0], sample_weight=np.ones(5))
  with pytest.raises(ValueError, match=">= 0"):
    jaxprune.evaluate(MODEL, p, X[0], Y[0], sample_weight=-np.ones(12))
  with pytest.raises(ValueError, match="all zero"):
    jaxprune.evaluate(MODEL, p, X[0], Y[0], sample_weight=np.zeros(12))


def test_evaluate_many_equals_loop_of_evaluate():
  masks = jax.vmap(lambda p, k: jaxprune.magnitude_prune(p, None, 0.5)[1])(PARAMS, jnp.arange(3))
  many = jaxprune.evaluate_many(MODEL, PARAMS, X, Y, W, masks=masks)
  for r, n in enumerate(SIZES):
    ref = jaxprune.evaluate(MODEL, one(PARAMS, r), X[r, :n], Y[r, :n], masks=one(masks, r))
    assert many["accuracy"][r] == pytest.approx(ref["accuracy"], rel=1e-6)
    assert many["loss"][r] == pytest.approx(ref["loss"], rel=1e-6)
  # Reconstruction (targets are the inputs), no weights: all rows count.
  ae = jax.vmap(AE.init)(jax.random.split(jax.random.key(1), 3))
  many = jaxprune.evaluate_many(AE, ae, X, X)
  for r in range(3):
    ref = jaxprune.evaluate(AE, one(ae, r), X[r], X[r])
    assert many["loss"][r] == pytest.approx(ref["loss"], rel=1e-6)
    assert many["accuracy"][r] == 0.0
  with pytest.raises(ValueError, match="leading run axis"):
    jaxprune.evaluate_many(MODEL, one(PARAMS, 0), X, Y)
  with pytest.raises(ValueError, match=r"\(R, N\)"):
    jaxprune.evaluate_many(MODEL, PARAMS, X, Y[:, :5])


def test_fit_callback_epochs_and_states():
  p0 = one(PARAMS, 0)
  seen = []
  key = jax.random.key(3)
  params, hist = jaxprune.fit(MODEL, p0, X[0], Y[0], key=key, epochs=5, log_every=2,
                              batch_size=4, progress=False,
                              callback=lambda e, st: seen.append((e, st)))
  assert [e for e, _ in seen] == [2, 4, 5]
  assert all(isinstance(st, train.TrainState) for _, st in seen)
  for a, b in zip(jax.tree.leaves(seen[-1][1].params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  # The state at epoch 2 is the first chunk: fit splits its key into one key per chunk.
  trainer = jaxprune.make_trainer(MODEL, batch_size=4)
  state = train.init_state(trainer, p0, 1e-3)
  w = jnp.ones((12,), jnp.float32)
  x, y = jnp.asarray(X[0]), jnp.asarray(Y[0])
  ref, _ = jax.jit(lambda s, k: trainer.epochs(s, None, x, y, w, k, 2))(
      state, jax.random.split(key, 3)[0])
  for a, b in zip(jax.tree.leaves(seen[0][1].params), jax.tree.leaves(ref.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # The hook does not change training.
  again, hist2 = jaxprune.fit(MODEL, p0, X[0], Y[0], key=key, epochs=5, log_every=2,
                              batch_size=4, progress=False)
  for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(hist["loss"], hist2["loss"])


def test_fit_many_callback_gets_stacked_state():
  seen = []
  params, _ = jaxprune.fit_many(MODEL, PARAMS, X, Y, W, key=jax.random.split(jax.random.key(4), 3),
                                epochs=3, log_every=3, batch_size=4, progress=False,
                                callback=lambda e, st: seen.append((e, st)))
  assert [e for e, _ in seen] == [3]
  for a, b in zip(jax.tree.leaves(seen[0][1].params), jax.tree.leaves(params)):
    assert a.shape[0] == 3
    np.testing.assert_array_equal(a, b)


def test_padding_rows_with_out_of_range_labels_contribute_nothing():
  # Padding rows (weight 0) may hold anything: a label of 99 must not turn the loss into NaN.
  bad_y = np.where(W > 0, Y, 99).astype(np.int32)
  keys = jax.random.split(jax.random.key(5), 3)
  clean = jaxprune.evaluate_many(MODEL, PARAMS, X, Y, W)
  dirty = jaxprune.evaluate_many(MODEL, PARAMS, X, bad_y, W)
  for k in ("loss", "accuracy"):
    np.testing.assert_array_equal(dirty[k], clean[k])
  kw = dict(key=keys, epochs=2, log_every=2, batch_size=4, progress=False)
  p_clean, h_clean = jaxprune.fit_many(MODEL, PARAMS, X, Y, W, **kw)
  p_dirty, h_dirty = jaxprune.fit_many(MODEL, PARAMS, X, bad_y, W, **kw)
  for a, b in zip(jax.tree.leaves(p_dirty), jax.tree.leaves(p_clean)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(h_dirty["loss"], h_clean["loss"])
  # Each run still equals fit on its unpadded data.
  n = SIZES[2]
  p2, _ = jaxprune.fit(MODEL, one(PARAMS, 2), X[2, :n], Y[2, :n], key=keys[2], epochs=2,
                       log_every=2, batch_size=4, progress=False)
  for a, b in zip(jax.tree.leaves(one(p_dirty, 2)), jax.tree.leaves(p2)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_error_messages_name_the_problem():
  p0 = one(PARAMS, 0)
  # Label errors name y (not x).
  with pytest.raises(ValueError, match=r"^y labels range over \[7, 7\]"):
    jaxprune.fit(MODEL, p0, X[0], np.full(12, 7), key=jax.random.key(0), epochs=1,
                 progress=False)
  with pytest.raises(ValueError, match=r"^validation y labels range"):
    jaxprune.fit(MODEL, p0, X[0], Y[0], key=jax.random.key(0), epochs=1, progress=False,
                 validation=(X[1], np.full(12, -1)))
  # Unstacked x: a missing run axis, said as such.
  keys = jax.random.split(jax.random.key(0), 3)
  for call in (lambda: jaxprune.evaluate_many(MODEL, PARAMS, X[0], Y[0]),
               lambda: jaxprune.fit_many(MODEL, PARAMS, X[0], Y[0], W[0], key=keys, epochs=1,
                                         progress=False),
               lambda: jaxprune.evaluate_many(MODEL, PARAMS, X[:2], Y[:2])):
    with pytest.raises(ValueError, match=r"x and y need a leading run axis \(R, N, \.\.\.\)"):
      call()
  # The run axis there, each run's inputs too narrow: the model's message, not the run axis.
  narrow = X[..., :-1]
  for call in (lambda: jaxprune.evaluate_many(MODEL, PARAMS, narrow, Y),
               lambda: jaxprune.fit_many(MODEL, PARAMS, narrow, Y, W, key=keys, epochs=1,
                                         progress=False)):
    with pytest.raises(ValueError, match=re.escape(
        f"each run's x, x[r] of shape {narrow.shape[1:]}, does not fit the model: MLP takes a "
        f"batch of shape (N, {X.shape[-1]}); got {narrow.shape[1:]}")):
      call()
  # Masks without the run axis.
  masks = jaxprune.magnitude_prune(p0, None, 0.5)[1]
  for call in (lambda: jaxprune.evaluate_many(MODEL, PARAMS, X, Y, masks=masks),
               lambda: jaxprune.fit_many(MODEL, PARAMS, X, Y, W, key=keys, epochs=1,
                                         masks=masks, progress=False)):
    with pytest.raises(ValueError, match="masks need a leading run axis of R = 3"):
      call()
  # A callback that is not callable fails before any training.
  with pytest.raises(TypeError, match="callback must be a function"):
    jaxprune.fit(MODEL, p0, X[0], Y[0], key=jax.random.key(0), epochs=1, progress=False,
                 callback=5)
  with pytest.raises(TypeError, match="callback must be a function"):
    jaxprune.fit_many(MODEL, PARAMS, X, Y, W, key=keys, epochs=1, progress=False,
                      callback="print")


def test_labels_per_token_train_with_a_custom_loss():
  """Per-token integer labels (N, T) with outputs (N, T, C): the built-in loss refuses them
  naming loss=, and a custom per-sample loss trains; accuracy is the samples' mean token
  accuracy."""
  import optax  # pylint: disable=import-outside-toplevel
  p = {"w": jax.random.normal(jax.random.key(0), (4, 3))}
  f = lambda p, x: x @ p["w"]
  x = jax.random.normal(jax.random.key(1), (8, 5, 4))
  y = jax.random.randint(jax.random.key(2), (8, 5), 0, 3)
  with pytest.raises(ValueError, match=r"shape \(8, 5\).*your own loss="):
    jaxprune.fit(f, p, x, y, key=jax.random.key(0), epochs=1, progress=False)
  loss = lambda out, t: optax.softmax_cross_entropy_with_integer_labels(out, t).mean(-1)
  q, _ = jaxprune.fit(f, p, x, y, key=jax.random.key(0), epochs=2, progress=False, loss=loss)
  got = jaxprune.evaluate(f, q, x, y, loss=loss)["accuracy"]
  want = float(jnp.mean(jnp.argmax(f(q, x), -1) == y))
  assert got == pytest.approx(want, abs=1e-6)


def test_default_optimizer_trains_bfloat16_params_like_plain_adam():
  """Injected hyperparameters take the params' dtype: in bfloat16 Adam's b2 = 0.999 became 1.0,
  every update was NaN, and fit blamed the learning rate. Only the learning rate is injected
  now, so the default trainer steps exactly as optax.adam does."""
  x = jax.random.normal(jax.random.key(0), (64, 4))
  y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0)
  fn = lambda p, a: jnp.tanh(a.astype(p["w1"].dtype) @ p["w1"]) @ p["w2"]
  params = {"w1": jax.random.normal(jax.random.key(1), (4, 8), jnp.bfloat16),
            "w2": jax.random.normal(jax.random.key(2), (8, 3), jnp.bfloat16)}
  kw = dict(key=jax.random.key(3), epochs=5, progress=False)
  ours, hist = jaxprune.fit(fn, params, x, y, **kw)
  plain, _ = jaxprune.fit(fn, params, x, y, optimizer=optax.adam(1e-3), **kw)
  assert np.isfinite(hist["loss"]).all()
  for a, b, p in zip(jax.tree.leaves(ours), jax.tree.leaves(plain), jax.tree.leaves(params)):
    assert a.dtype == jnp.bfloat16
    assert not np.array_equal(np.asarray(a, np.float32), np.asarray(p, np.float32))
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_evaluate_ignores_the_labels_of_weight_zero_rows():
  """evaluate(sample_weight=w) refused padding rows' labels (evaluate_many, fit_many and the GA
  took them): a row of weight 0 does not exist, so its label is not checked."""
  model = jaxprune.MLP(in_features=4, hidden=(8,), out_features=3)
  params = model.init(jax.random.key(1))
  x = jax.random.normal(jax.random.key(0), (40, 4))
  y = (jnp.arange(40) % 3).at[30:].set(99)
  w = np.r_[np.ones(30), np.zeros(10)].astype(np.float32)
  assert jaxprune.evaluate(model, params, x, y, sample_weight=w) == pytest.approx(
      jaxprune.evaluate(model, params, x[:30], y[:30]), rel=1e-6)
  with pytest.raises(ValueError, match=r"range over \[0, 99\]"):
    jaxprune.evaluate(model, params, x, y.at[3].set(99), sample_weight=w)
  with pytest.raises(ValueError, match=r"range over \[0, 99\]"):
    jaxprune.evaluate(model, params, x, y)


def test_a_user_optimizer_keeps_its_injected_learning_rate():
  """fit's default learning rate overwrote the rate of any optimizer state holding one:
  optax.inject_hyperparams(optax.sgd)(learning_rate=0.5) trained at 1e-3. Now the user's
  optimizer keeps its rate unless learning_rate= is given; the default Adam still gets 1e-3."""
  p0 = one(PARAMS, 0)
  kw = dict(key=jax.random.key(2), epochs=2, batch_size=4, progress=False)
  run = lambda **k: jax.tree.leaves(jaxprune.fit(MODEL, p0, X[0], Y[0], **kw, **k)[0])
  # One object per optimizer: trainers made with the same object share their compiled programs
  # (the learning rate is state, not part of the program).
  injected = optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
  sgd_half, sgd_small = optax.sgd(0.5), optax.sgd(1e-3)
  ours = run(optimizer=injected)
  for a, b, c in zip(ours, run(optimizer=sgd_half), run(optimizer=sgd_small)):
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
  # Given explicitly, the learning rate is written into the optimizer's state.
  for a, b in zip(run(optimizer=injected, learning_rate=1e-3), run(optimizer=sgd_small)):
    np.testing.assert_array_equal(a, b)
  # The default Adam: no learning_rate is 1e-3, bit for bit.
  for a, b in zip(run(), run(learning_rate=1e-3)):
    np.testing.assert_array_equal(a, b)
  # fit_many with a trainer of the user's keeps its rate too; per-run rates still apply.
  keys = jax.random.split(jax.random.key(4), 3)
  many = lambda opt, **k: jax.tree.leaves(jaxprune.fit_many(
      MODEL, PARAMS, X, Y, W, key=keys, epochs=2, progress=False,
      trainer=jaxprune.make_trainer(MODEL, batch_size=4, optimizer=opt), **k)[0])
  many_half = many(sgd_half)
  for a, b in zip(many(injected), many_half):
    np.testing.assert_array_equal(a, b)
  lrs = np.array([0.5, 1e-3, 0.5], np.float32)
  for a, b, c in zip(many(injected, learning_rate=lrs), many_half, many(sgd_small)):
    a, b, c = np.asarray(a), np.asarray(b), np.asarray(c)
    np.testing.assert_array_equal(a[[0, 2]], b[[0, 2]])
    np.testing.assert_array_equal(a[1], c[1])


def test_a_learning_rate_that_cannot_be_set_is_refused_and_a_nested_one_is_set():
  """learning_rate= was silently ignored unless the outermost state was injected: an optimizer
  built with a fixed rate, or with inject_hyperparams inside a chain, scheduled or MultiSteps,
  trained at its own rate whatever was asked. A nested injected rate is now set; a rate with
  nowhere to go (none injected, a schedule, several) is refused."""
  p0 = one(PARAMS, 0)
  kw = dict(key=jax.random.key(2), epochs=2, batch_size=4, progress=False)
  run = lambda **k: jax.tree.leaves(jaxprune.fit(MODEL, p0, X[0], Y[0], **kw, **k)[0])
  injected = lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)
  clip = lambda: optax.clip_by_global_norm(1.0)
  for a, b in zip(run(optimizer=optax.chain(clip(), injected()), learning_rate=0.05),
                  run(optimizer=optax.chain(clip(), optax.sgd(0.05)))):
    np.testing.assert_array_equal(a, b)
  pruner = jaxprune.distinctiveness_pruner(MODEL, "hidden_0", similar_deg=15.0,
                                           complementary=False, constants=False,
                                           source="outgoing")
  for a, b in zip(
      run(optimizer=jaxprune.scheduled(injected(), pruner, begin_step=1, frequency=2),
          learning_rate=0.05),
      run(optimizer=jaxprune.scheduled(optax.sgd(0.05), pruner, begin_step=1, frequency=2))):
    np.testing.assert_array_equal(a, b)
  ms = train.with_learning_rate(optax.MultiSteps(injected(), 2).init(p0["params"]), 0.05)
  assert float(ms.inner_opt_state.hyperparams["learning_rate"]) == np.float32(0.05)
  with pytest.raises(ValueError, match="keeps no learning rate.*inject_hyperparams"):
    run(optimizer=optax.sgd(0.1), learning_rate=0.05)
  schedule = optax.linear_schedule(0.1, 0.0, 10)
  with pytest.raises(ValueError, match="is a schedule"):
    run(optimizer=optax.inject_hyperparams(optax.sgd)(learning_rate=schedule), learning_rate=0.05)
  two = optax.multi_transform({"a": injected(), "b": injected()},
                              {"hidden_0": "a", "out": "b"})
  with pytest.raises(ValueError, match="2 injected learning rates"):
    run(optimizer=two, learning_rate=0.05)
  run(optimizer=two)   # without learning_rate= it trains at its own rates
  keys = jax.random.split(jax.random.key(4), 3)
  with pytest.raises(ValueError, match="keeps no learning rate"):
    jaxprune.fit_many(MODEL, PARAMS, X, Y, W, key=keys, epochs=1, progress=False,
                      trainer=jaxprune.make_trainer(MODEL, batch_size=4,
                                                    optimizer=optax.sgd(0.1)),
                      learning_rate=np.full(3, 0.05, np.float32))


def test_fit_many_checks_each_runs_sample_weights():
  """Negative weights were accepted (that run never trained) and NaN or infinite ones ended
  in a FloatingPointError blaming the learning rate; evaluate_many refused them."""
  keys = jax.random.split(jax.random.key(0), 3)
  for bad in (-1.0, np.nan, np.inf):
    w = W.copy()
    w[1, 2] = bad
    with pytest.raises(ValueError, match=r"^w of run 1 must be finite and >= 0"):
      jaxprune.fit_many(MODEL, PARAMS, X, Y, w, key=keys, epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"^sample_weight of run 1 must be finite and >= 0"):
      jaxprune.evaluate_many(MODEL, PARAMS, X, Y, w)


def test_fit_many_checks_validation_data_per_run():
  """fit_many took any validation data (an out-of-range label or NaN inputs ended in a
  FloatingPointError blaming the learning rate); fit checked its own."""
  keys = jax.random.split(jax.random.key(0), 3)
  fit = lambda val: jaxprune.fit_many(MODEL, PARAMS, X, Y, W, key=keys, epochs=1,
                                      progress=False, validation=val)
  bad_y = Y.copy()
  bad_y[1, 0] = 7
  with pytest.raises(ValueError, match=r"^validation y labels range over \[0, 7\]"):
    fit((X, bad_y, W))
  nan_x = X.copy()
  nan_x[2, 0, 1] = np.nan
  with pytest.raises(ValueError, match=r"^validation x holds 1 NaN or infinite values"):
    fit((nan_x, Y, W))
  with pytest.raises(ValueError, match=r"^validation w of run 0 must be finite and >= 0"):
    fit((X, Y, -W))
  with pytest.raises(ValueError, match=r"validation x and validation y need a leading run axis"):
    fit((X[0], Y[0], W[0]))
  with pytest.raises(ValueError, match=r"validation y and validation w shaped \(R, N\)"):
    fit((X, Y[:, :5], W))
  with pytest.raises(ValueError, match=r"validation must be a tuple \(x_val, y_val, w_val\)"):
    fit((X,))
  # Valid data, with or without weights (all ones), trains as before.
  _, h = fit((X, Y))
  assert h["val_loss"].shape == (3, 1)


def test_integer_inputs_of_stacked_runs_get_fits_message():
  """Integer x of shape (R, N, F) was said to lack its run axis."""
  keys = jax.random.split(jax.random.key(0), 3)
  match = r"Inputs must be floating point, got dtype int.*x\.astype\(jnp\.float32\)"
  xi = np.ones(X.shape, int)
  with pytest.raises(ValueError, match=match):
    jaxprune.fit_many(MODEL, PARAMS, xi, Y, W, key=keys, epochs=1, progress=False)
  with pytest.raises(ValueError, match=match):
    jaxprune.evaluate_many(MODEL, PARAMS, xi, Y, W)
  with pytest.raises(ValueError, match=match):
    jaxprune.fit(MODEL, one(PARAMS, 0), xi[0], Y[0], key=keys[0], epochs=1, progress=False)


def test_evaluate_batch_size_and_autoencoder_targets_are_checked():
  """evaluate(batch_size=0) raised ZeroDivisionError (-1: a reshape error); an autoencoder
  given class labels as targets failed with a broadcasting error inside the loss."""
  p0 = one(PARAMS, 0)
  for bs in (0, -1):
    with pytest.raises(ValueError, match=f"batch_size must be at least 1, got {bs}"):
      jaxprune.evaluate(MODEL, p0, X[0], Y[0], batch_size=bs)
    with pytest.raises(ValueError, match=f"batch_size must be at least 1, got {bs}"):
      jaxprune.evaluate_many(MODEL, PARAMS, X, Y, W, batch_size=bs)
  ae = AE.init(jax.random.key(1))
  match = (r"^y: the targets have shape \(12,\) but the model's outputs have shape \(12, 3\); "
           r".*\(y = x\)")
  with pytest.raises(ValueError, match=match):
    jaxprune.fit(AE, ae, X[0], Y[0], key=jax.random.key(0), epochs=1, progress=False)
  with pytest.raises(ValueError, match=match):
    jaxprune.evaluate(AE, ae, X[0], Y[0])
  with pytest.raises(ValueError, match=r"^validation y: the targets have shape \(12,\)"):
    jaxprune.fit(AE, ae, X[0], X[0], key=jax.random.key(0), epochs=1, progress=False,
                 validation=(X[1], Y[1]))
  stacked = jax.vmap(AE.init)(jax.random.split(jax.random.key(1), 3))
  with pytest.raises(ValueError, match=r"^y of each run: the targets have shape \(12,\)"):
    jaxprune.fit_many(AE, stacked, X, Y, W, key=jax.random.split(jax.random.key(0), 3),
                      epochs=1, progress=False)
  with pytest.raises(ValueError, match=r"^y of each run: the targets have shape \(12, 2\)"):
    jaxprune.evaluate_many(AE, stacked, X, X[..., :2])


def test_a_last_step_that_leaves_nan_params_raises():
  """The loss is measured before each step: a run whose last step went to NaN returned NaN
  params without a word."""
  model = jaxprune.MLP(in_features=5, hidden=(7,), out_features=3)
  x = np.asarray(jax.random.normal(jax.random.key(0), (20, 5)))
  y = np.arange(20) % 3
  with pytest.raises(FloatingPointError, match="NaN or infinite parameter values by epoch 1"):
    jaxprune.fit(model, model.init(jax.random.key(1)), x, y, key=jax.random.key(2), epochs=1,
                 batch_size=20, optimizer=optax.sgd(float("inf")), progress=False)


def test_bad_optimizer_log_every_labels_and_rewind_sizes_are_named():
  model = jaxprune.MLP(in_features=5, hidden=(7,), out_features=3)
  p = model.init(jax.random.key(1))
  x, y = np.zeros((8, 5), np.float32), np.arange(8) % 3
  fit = lambda **kw: jaxprune.fit(model, p, x, kw.pop("y", y), key=jax.random.key(0), epochs=1,
                                  progress=False, **kw)
  with pytest.raises(TypeError, match="optimizer must be an optax GradientTransformation.*str"):
    fit(optimizer="adam")
  with pytest.raises(TypeError, match=r"a factory: call it, e\.g\. optax\.adam\(1e-3\)"):
    fit(optimizer=optax.adam)
  for bad in (0, -3):
    with pytest.raises(ValueError, match=f"log_every must be at least 1, got {bad}"):
      fit(log_every=bad)
  with pytest.raises(ValueError, match=r"dtype <U1: class labels must be integer indices"):
    fit(y=np.array(["a"] * 8))
  big = jaxprune.MLP(in_features=5, hidden=(9,), out_features=3).init(jax.random.key(0))
  with pytest.raises(ValueError, match=r"init_params\['params'\]\['hidden_0'\]\['bias'\] "
                     r"has shape \(9,\), the trained params' \(7,\)"):
    jaxprune.rewind(p, big, jaxprune.ones_like(p))


def test_label_mistakes_of_a_first_time_user_get_the_fix():
  """Found on scikit-learn data: one row's label passed as y[0] failed inside the check with
  'len() of unsized object'; fractional labels were told to .astype(int) (which truncates
  them); codes like 3, 7, 9 and a one-output model for binary labels got no way out."""
  model = jaxprune.MLP(in_features=5, hidden=(7,), out_features=3)
  p = model.init(jax.random.key(1))
  x, y = np.zeros((8, 5), np.float32), np.arange(8) % 3
  with pytest.raises(ValueError, match=r"shape \(\); pass one target per sample, shape \(1,\)"
                     r".*y\[:1\], not y\[0\]"):
    jaxprune.evaluate(model, p, x[:1], y[0])
  with pytest.raises(ValueError, match="not all whole numbers"):
    jaxprune.evaluate(model, p, x, y + 0.5)
  for dtype in (np.float64, bool, jnp.bfloat16):      # whole values of any dtype convert
    with pytest.raises(ValueError, match=r"; convert with y.astype\(int\)"):
      jaxprune.evaluate(model, p, x, (y % 2).astype(dtype))
  with pytest.raises(ValueError, match="2 NaN or infinite labels; clean"):   # not np.unique:
    ga.search(model, p, x, np.where(y == 2, np.nan, y), "hidden_0",  # NaN would become a class
              key=jax.random.key(0), progress=False)
  with pytest.raises(ValueError, match=r"range over \[3, 9\].*np.unique\(y, return_inverse"):
    jaxprune.evaluate(model, p, x, np.array([3, 7, 9, 3, 7, 9, 3, 7]))
  one = jaxprune.MLP(in_features=5, hidden=(7,), out_features=1)
  with pytest.raises(ValueError, match=r"out_features=2 for binary labels"):
    jaxprune.fit(one, one.init(jax.random.key(0)), x, y % 2, key=jax.random.key(0), epochs=1,
                 progress=False)


def _mse(outputs, targets):
  return jnp.mean(jnp.square(outputs - targets), axis=-1)


def test_a_loss_of_your_own_trains_a_built_in_model_on_targets_that_are_not_labels():
  """fit's docs say a loss of your own takes targets that are not class labels; a built-in
  classifier's label check refused them anyway (its task), loss= or a trainer's loss beside it.
  Now fit, fit_many, evaluate and evaluate_many check them only with the model's default loss,
  and train and score as the same model given as an apply function does."""
  model = jaxprune.MLP(in_features=4, hidden=(8,), out_features=2)
  params = model.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(24, 4)).astype(np.float32)
  t = np.stack([x[:, 0] - x[:, 1], 0.5 * x[:, 2]], 1).astype(np.float32)   # regression
  kw = dict(key=jax.random.key(1), epochs=4, batch_size=8, progress=False)
  trained, hist = jaxprune.fit(model, params, x, t, loss=_mse, **kw)
  assert hist["loss"][-1] < hist["loss"][0]
  assert np.all(np.asarray(hist["accuracy"]) == 0)        # no labels: no accuracy
  by_fn, _ = jaxprune.fit(model.apply, params, x, t, loss=_mse, **kw)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               trained, by_fn)
  trainer = jaxprune.make_trainer(model, batch_size=8, loss=_mse)
  via_trainer, _ = jaxprune.fit(model, params, x, t, trainer=trainer, **{
      k: v for k, v in kw.items() if k != "batch_size"})
  jax.tree.map(np.testing.assert_array_equal, via_trainer, trained)
  want = float(np.mean(np.square(np.asarray(model.apply(trained, x)) - t)))
  got = jaxprune.evaluate(model, trained, x, t, loss=_mse)
  assert got["loss"] == pytest.approx(want, rel=1e-5) and got["accuracy"] == 0
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), params)
  many, _ = jaxprune.fit_many(model, stacked, np.stack([x, x]), np.stack([t, t]),
                              np.ones((2, 24), np.float32), key=jax.random.split(kw["key"], 2),
                              epochs=4, trainer=trainer, progress=False,
                              validation=(np.stack([x, x]), np.stack([t, t]),
                                          np.ones((2, 24), np.float32)))
  assert all(np.isfinite(a).all() for a in jax.tree.leaves(many))
  m = jaxprune.evaluate_many(model, many, np.stack([x, x]), np.stack([t, t]), loss=_mse)
  each = [float(np.mean(np.square(np.asarray(model.apply(jax.tree.map(lambda a: a[r], many), x))
                                  - t))) for r in range(2)]
  np.testing.assert_allclose(m["loss"], each, rtol=1e-5)
  # fit_many of an apply function with a trainer of that loss (its runs' targets were refused)
  fn_trainer = jaxprune.make_trainer(model.apply, batch_size=8, loss=_mse)
  by_fn_many, _ = jaxprune.fit_many(model.apply, stacked, np.stack([x, x]), np.stack([t, t]),
                                    np.ones((2, 24), np.float32),
                                    key=jax.random.split(kw["key"], 2), epochs=4,
                                    trainer=fn_trainer, progress=False)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               by_fn_many, many)
  # Class labels (integers, one per sample) meet a loss of your own with the range check still:
  # a class-weighted cross-entropy gave NaN for a label out of range, and fit blamed the rate.
  labels = np.arange(24) % 2
  labels[0] = 2
  weighted = lambda o, yy: train.cross_entropy(o, yy) * jnp.array([1.0, 2.0])[yy]
  for call in (lambda: jaxprune.evaluate(model, params, x, labels, loss=weighted),
               lambda: jaxprune.fit(model, params, x, labels, loss=weighted, **kw)):
    with pytest.raises(ValueError, match=r"y labels range over \[0, 2\] but the model has 2 .*"
                       r"counts.*as floats"):
      call()
  ok = jaxprune.evaluate(model, params, x, labels % 2, loss=weighted)
  assert np.isfinite(ok["loss"]) and ok["accuracy"] > 0
  # The model's own loss still checks them, given or by default.
  for extra in ({}, {"loss": train.cross_entropy}):
    with pytest.raises(ValueError, match=r"y labels have shape \(24, 2\)"):
      jaxprune.fit(model, params, x, t, **kw, **extra)
    with pytest.raises(ValueError, match=r"y labels have shape \(24, 2\)"):
      jaxprune.evaluate(model, params, x, t, **extra)
  with pytest.raises(ValueError, match="labels"):
    jaxprune.fit_many(model, stacked, np.stack([x, x]), np.stack([t, t]),
                      np.ones((2, 24), np.float32), key=jax.random.split(kw["key"], 2),
                      epochs=1, progress=False)


def test_a_loss_must_be_a_function_of_one_value_per_sample():
  """A loss returning the batch's mean (a scalar) or a column (B, 1) was broadcast against the
  sample weights into other numbers without a word (3.73 and 59.7 for a true 3.84), and a name
  such as loss='mse' (which a docstring suggested) failed inside the compiled step."""
  model = jaxprune.MLP(in_features=3, hidden=(4,), out_features=1)
  params = model.init(jax.random.key(0))
  x = np.random.default_rng(0).normal(size=(10, 3)).astype(np.float32)
  t = x[:, :1] - x[:, 1:2]
  scalar = lambda o, tt: jnp.mean((o - tt) ** 2)
  column = lambda o, tt: (o - tt) ** 2
  kw = dict(key=jax.random.key(1), epochs=1, batch_size=4, progress=False)
  for fn, said in ((scalar, r"it returned a scalar"), (column, r"it returned shape \(4, 1\)")):
    with pytest.raises(ValueError, match=r"one value per sample, shape \(4,\) for a batch of 4; "
                       + said):
      jaxprune.fit(model, params, x, t, loss=fn, **kw)
    with pytest.raises(ValueError, match=r"one value per sample, shape \(10,\)"):
      jaxprune.evaluate(model, params, x, t, loss=fn)
  for call in (lambda: jaxprune.make_trainer(model, loss="mse"),
               lambda: jaxprune.fit(model, params, x, t, loss="mse", **kw),
               lambda: jaxprune.evaluate(model, params, x, t, loss="mse")):
    with pytest.raises(TypeError, match=r"loss must be a function .* got str 'mse'.*"
                       r"jaxprune.train.squared_error"):
      call()


def test_fit_many_takes_optimizer_and_loss_as_fit_does_and_padding_targets_may_be_nan():
  """fit_many had no loss= or optimizer= (a bare TypeError), while the label error it gave for
  regression targets told the user to pass loss=; and a NaN target in a row of weight 0, which
  the docs say does not exist, was refused."""
  model = jaxprune.MLP(in_features=3, hidden=(4,), out_features=2)
  params = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 2))
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 12, 3)).astype(np.float32)
  t = np.concatenate([x[..., :1] * 2, x[..., 1:2]], -1)
  w = np.ones((2, 12), np.float32)
  w[1, 9:] = 0
  with pytest.raises(ValueError, match=r"y labels must be integer class indices.*regression "
                     r"targets.*fit_many\(\.\.\., loss=fn\)"):
    jaxprune.fit_many(model, params, x, t[..., 0], w, key=jax.random.split(jax.random.key(2), 2),
                      epochs=1, progress=False)
  tx = optax.sgd(0.05)
  kw = dict(key=jax.random.split(jax.random.key(2), 2), epochs=3, progress=False)
  direct, hist = jaxprune.fit_many(model, params, x, t, w, optimizer=tx, loss=_mse,
                                   batch_size=4, **kw)
  trainer = jaxprune.make_trainer(model, batch_size=4, optimizer=tx, loss=_mse)
  via, hist2 = jaxprune.fit_many(model, params, x, t, w, trainer=trainer, **kw)
  jax.tree.map(np.testing.assert_array_equal, direct, via)
  np.testing.assert_array_equal(hist["loss"], hist2["loss"])
  with pytest.raises(ValueError, match="loss= differ"):
    jaxprune.fit_many(model, params, x, t, w, trainer=trainer, loss=lambda o, tt: _mse(o, tt),
                      **kw)
  nan_pad = t.copy()
  nan_pad[1, 9:] = np.nan
  padded, _ = jaxprune.fit_many(model, params, x, nan_pad, w, trainer=trainer, **kw)
  jax.tree.map(np.testing.assert_array_equal, padded, via)
  one = jax.tree.map(lambda a: a[1], via)
  got = jaxprune.evaluate(model, one, x[1], nan_pad[1], loss=_mse, sample_weight=w[1])
  want = jaxprune.evaluate(model, one, x[1, :9], t[1, :9], loss=_mse)
  assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
  nan_pad[1, 0] = np.nan   # a row of weight 1: refused
  with pytest.raises(ValueError, match="NaN or infinite"):
    jaxprune.evaluate(model, one, x[1], nan_pad[1], loss=_mse, sample_weight=w[1])


def test_evaluate_inside_a_compiled_loss_is_named_with_the_fix():
  """A pruner's loss_fn built on evaluate (a host function) failed with JAX's
  ConcretizationTypeError deep in the pruner's loop; under jit too."""
  p = one(PARAMS, 0)
  loss = lambda q: jaxprune.evaluate(MODEL, q, X[0], Y[0])["loss"]
  assert np.isfinite(loss(p))                    # fine on the host
  for run in (lambda: jax.jit(loss)(p),
              lambda: jaxprune.pruners.iterative_importance(MODEL, "hidden_0", loss)(
                  p, jaxprune.unit_masks_ones(MODEL), 0.1),
              lambda: jax.jit(lambda q: jaxprune.evaluate_many(MODEL, q, X, Y)["loss"])(
                  PARAMS)):
    with pytest.raises(TypeError, match="runs on the host.*train.cross_entropy"):
      run()


def test_learning_rates_that_are_not_numbers_are_refused():
  """A string was parsed by NumPy: fit failed inside jit, fit_many trained at 0.01 silently;
  True trained at a rate of 1."""
  p = one(PARAMS, 0)
  for lr in ("0.01", True, 1e-3 + 0j):
    with pytest.raises(TypeError, match="learning_rate must be a number"):
      jaxprune.fit(MODEL, p, X[0], Y[0], key=jax.random.key(0), epochs=1, learning_rate=lr,
                   progress=False)
  with pytest.raises(TypeError, match="learning_rate must be a number"):
    jaxprune.fit_many(MODEL, PARAMS, X, Y, W, key=jax.random.split(jax.random.key(0), 3),
                      epochs=1, learning_rate=np.array(["0.01"] * 3), progress=False)


def test_float16_divergence_names_the_dtype_not_only_the_learning_rate():
  """Adam's eps (1e-8) rounds to 0 in float16: training diverged at any learning rate while
  the message advised a lower one."""
  p16 = jax.tree.map(lambda a: a.astype(jnp.float16), one(PARAMS, 0))
  with pytest.raises(FloatingPointError, match="params are float16.*eps=1e-4"):
    jaxprune.fit(MODEL, p16, X[0].astype(np.float16), Y[0], key=jax.random.key(0), epochs=3,
                 batch_size=4, progress=False)


def test_a_variable_class_of_the_users_own_is_named_in_the_split_it_needs():
  """fit's advice named only nnx.BatchStat: followed for a Variable class of the user's own,
  the class stayed in the closed-over rest and the group disappeared."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  class Gain(nnx.Variable):
    pass

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.a, self.g = nnx.Linear(3, 4, rngs=rngs), Gain(jnp.linspace(0.5, 1.5, 4))
      self.out = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
      return self.out(nnx.relu(self.a(x)) * self.g[...])

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))
  t = jaxprune.trace(lambda s, x: nnx.merge(graphdef, s)(x), state, X[0])
  with pytest.raises(ValueError, match=r"nnx.split\(model, nnx.Param, Gain, \.\.\.\).*If Gain "
                     "should be trained, make it a subclass of nnx.Param"):
    jaxprune.fit(t, state, X[0], Y[0], key=jax.random.key(0), epochs=1, progress=False)
