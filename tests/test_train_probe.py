"""fit and fit_many against an independent per-run optax loop written from the docs, and the
input checks found missing by probing them as an outside user.

These cases ran in a pytest process of their own for a while (four suite runs had lost a
worker to a segmentation fault inside XLA:CPU at the same point, while compiling a fit start
program for one of them). The cause was the worker, not these cases: it had used up Linux's
memory mappings (``vm.max_map_count``), which the suite now guards against between test files
(``conftest.pytest_runtest_teardown``). So they run in the suite's workers again, sharing its
compiled programs: about 19 s for the separate process, 13 s for the cases alone."""

import functools
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxprune

MODEL = jaxprune.MLP(in_features=4, hidden=(6,), out_features=3)
RNG = np.random.default_rng(0)
X = RNG.normal(size=(13, 4)).astype(np.float32)
Y = RNG.integers(0, 3, 13).astype(np.int32)
one = lambda tree, r: jax.tree.map(lambda a: a[r], tree)


def _zero(tree, masks):
  return tree if masks is None else jax.tree.map(lambda a, m: jnp.where(m, a, 0), tree, masks)


@jax.jit
def _uniforms(key, count):
  return jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(key, j)))(count)


@functools.partial(jax.jit, static_argnames="tx")
def _reference_step(p, opt, xb, yb, wb, masks, *, tx):
  def loss(tp):
    ce = optax.softmax_cross_entropy_with_integer_labels(MODEL.apply({"params": tp}, xb), yb)
    return jnp.sum(wb * ce) / jnp.sum(wb)
  kept = None if masks is None else masks["params"]
  g = _zero(jax.grad(loss)(p["params"]), kept)
  upd, opt = tx.update(g, opt, p["params"])
  return _zero({"params": optax.apply_updates(p["params"], _zero(upd, kept))}, masks), opt


def _reference_fit(params, x, y, w, key, *, epochs, batch_size, tx, log_every=10, masks=None,
                   learning_rate=None):
  """The documented training loop, by hand: the key split into one key per chunk of
  ``log_every`` epochs and each chunk's key into one per epoch; an epoch visits the samples of
  weight > 0 sorted by ``uniform(fold_in(epoch_key, rank))`` (rank: the sample's position among
  them) in minibatches of ``batch_size``, the last one smaller; each step descends the weighted
  mean cross-entropy of its batch; masked gradients, updates and params are zero.
  ``learning_rate``: written into ``tx``'s injected hyperparameters (one compiled step serves
  every rate)."""
  p = _zero(params, masks)
  opt = tx.init(p["params"])
  if learning_rate is not None:
    opt.hyperparams["learning_rate"] = jnp.asarray(learning_rate, jnp.float32)
  real = np.flatnonzero(w > 0)
  chunks = math.ceil(epochs / log_every)
  for c, ckey in enumerate(jax.random.split(key, chunks)):
    for ekey in jax.random.split(ckey, min(log_every, epochs - c * log_every)):
      order = real[np.argsort(np.asarray(_uniforms(ekey, jnp.arange(len(real)))), kind="stable")]
      for s in range(0, len(order), batch_size):
        b = order[s:s + batch_size]
        wb = np.pad(w[b], (0, batch_size - len(b)))   # rows of weight 0: one shape, one compile
        b = np.pad(b, (0, batch_size - len(b)))
        p, opt = _reference_step(p, opt, x[b], y[b], wb, masks, tx=tx)
  return p


def _close(a, b, rtol=1e-5, atol=1e-6):
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


def test_fit_matches_a_plain_optax_loop_with_masks_schedule_clipping_and_weight_decay():
  """fit with a user optimizer (clipping, AdamW with weight decay on a warmup-cosine schedule)
  and weight masks, 13 samples in batches of 5 (the last one of 3), 3 epochs in chunks of 2."""
  tx = optax.chain(optax.clip_by_global_norm(0.5),
                   optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-2, 2, 9),
                               weight_decay=0.5))
  p0 = MODEL.init(jax.random.key(1))
  masks = jaxprune.magnitude_prune(p0, None, 0.5)[1]
  key = jax.random.key(2)
  got, _ = jaxprune.fit(MODEL, p0, X, Y, key=key, epochs=3, batch_size=5, log_every=2,
                        optimizer=tx, masks=masks, progress=False)
  ref = _reference_fit(p0, X, Y, np.ones(13, np.float32), key, epochs=3, batch_size=5, tx=tx,
                       log_every=2, masks=masks)
  _close(got, ref)
  for a, m in zip(jax.tree.leaves(got), jax.tree.leaves(masks)):   # weight decay included
    assert np.all(np.asarray(a)[~np.asarray(m)] == 0.0)


def test_zero_weight_rows_between_real_rows_train_as_if_dropped():
  """A run's weight-0 rows may sit anywhere (a fold as a 0/1 mask over shared data): its real
  rows are shuffled as the unpadded data would be. The shuffle used to depend on the row's
  index, so rows of weight 0 between real ones reordered the rest: fit_many then disagreed with
  fit on the dropped data with the same key. Per-run learning rates and masks too."""
  sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
  trainer = jaxprune.make_trainer(MODEL, batch_size=4, optimizer=sgd)
  params = jax.vmap(MODEL.init)(jax.random.split(jax.random.key(1), 2))
  masks = jax.vmap(lambda p: jaxprune.magnitude_prune(p, None, 0.5)[1])(params)
  w = np.ones((2, 13), np.float32)
  w[1, 2:6] = 0.0
  keys = jax.random.split(jax.random.key(3), 2)
  lrs = (0.1, 0.03)
  got, _ = jaxprune.fit_many(MODEL, params, np.stack([X, X]), np.stack([Y, Y]), w, key=keys,
                             epochs=2, trainer=trainer, learning_rate=np.array(lrs),
                             masks=masks, progress=False)
  for r in range(2):
    ref = _reference_fit(one(params, r), X, Y, w[r], keys[r], epochs=2, batch_size=4,
                         tx=sgd, learning_rate=lrs[r], masks=one(masks, r))
    _close(one(got, r), ref)


def test_fractional_sample_weights_train_on_the_weighted_mean():
  """Scaling every sample weight by 0.1 leaves the weighted mean, and so SGD's steps, as they
  were. A step divided by max(sum(w), 1), so batches whose weights summed below 1 took steps
  10 times too small."""
  trainer = jaxprune.make_trainer(MODEL, batch_size=5, optimizer=optax.sgd(0.5))
  params = jax.vmap(MODEL.init)(jax.random.split(jax.random.key(1), 2))
  w = np.stack([np.ones(13), np.full(13, 0.1)]).astype(np.float32)
  key = jax.random.key(4)
  got, hist = jaxprune.fit_many(MODEL, jax.tree.map(lambda a: jnp.stack([a[0], a[0]]), params),
                                np.stack([X, X]), np.stack([Y, Y]), w, key=jnp.stack([key, key]),
                                epochs=1, trainer=trainer, progress=False)
  _close(one(got, 1), one(got, 0))
  np.testing.assert_allclose(hist["loss"][1], hist["loss"][0], rtol=1e-5)
  ref = _reference_fit(one(params, 0), X, Y, w[1], key, epochs=1, batch_size=5,
                       tx=optax.sgd(0.5))
  _close(one(got, 1), ref)


def test_epochs_and_batch_sizes_must_be_whole_numbers_and_do_not_poison_the_cache():
  """epochs=2.0 was cached as equal to 2 with a broken program: it failed, and so did every
  later fit of 2 epochs in the process; batch_size=2.5 trained silently at 2."""
  p0 = MODEL.init(jax.random.key(1))
  fit = lambda **kw: jaxprune.fit(MODEL, p0, X, Y, key=jax.random.key(0), progress=False,
                                  **{"epochs": 2, "batch_size": 4, **kw})[0]
  a = fit(epochs=2.0)
  b = fit(epochs=np.int64(2), log_every=np.int64(10))
  _close(a, b, rtol=0, atol=0)
  with pytest.raises(TypeError, match=r"batch_size must be a whole number \(an int\), got 2\.5"):
    fit(batch_size=2.5)
  with pytest.raises(TypeError, match="epochs must be a whole number"):
    fit(epochs=1.5)
  with pytest.raises(TypeError, match="log_every must be a whole number"):
    fit(log_every="2")
  m = jaxprune.evaluate(MODEL, p0, X, Y, batch_size=4.0)
  assert m == jaxprune.evaluate(MODEL, p0, X, Y, batch_size=4)


def test_fit_validation_weights_count_as_in_fit_many():
  """fit's validation=(x, y, w) ignored w (fit_many's form): weight-0 rows counted."""
  p0 = MODEL.init(jax.random.key(1))
  vw = (np.arange(13) % 3 != 0).astype(np.float32)
  fit = lambda val: jaxprune.fit(MODEL, p0, X, Y, key=jax.random.key(0), epochs=2,
                                 batch_size=8, validation=val, progress=False)[1]
  weighted = fit((X, Y, vw))
  dropped = fit((X[vw > 0], Y[vw > 0]))
  np.testing.assert_allclose(weighted["val_loss"], dropped["val_loss"], rtol=1e-6)
  np.testing.assert_allclose(weighted["val_accuracy"], dropped["val_accuracy"], rtol=1e-6)
  with pytest.raises(ValueError, match=r"validation must be a tuple \(x_val, y_val\)"):
    fit((X,))
  with pytest.raises(ValueError, match="validation w must have shape"):
    fit((X, Y, vw[:5]))


def test_fit_refuses_what_belongs_to_fit_many_and_trainer_clashes():
  p0 = MODEL.init(jax.random.key(1))
  fit = lambda **kw: jaxprune.fit(MODEL, p0, X, Y, progress=False,
                                  **{"key": jax.random.key(0), "epochs": 1, **kw})
  with pytest.raises(ValueError, match=r"fit takes one key.*shape \(2,\).*use fit_many"):
    fit(key=jax.random.split(jax.random.key(0), 2))
  with pytest.raises(ValueError, match=r"fit takes one key.*shape \(3,\)"):
    fit(key=jax.random.split(jax.random.PRNGKey(0), 3))
  with pytest.raises(ValueError, match=r"learning_rate must be one number.*use fit_many"):
    fit(learning_rate=np.array([1e-3, 1e-2]))
  trainer = jaxprune.make_trainer(MODEL, batch_size=8)
  with pytest.raises(ValueError, match=r"optimizer= differ\(s\) from what trainer= was built"):
    fit(trainer=trainer, optimizer=optax.sgd(0.1))
  with pytest.raises(ValueError, match=r"batch_size=4 \(the trainer's is 8\)"):
    fit(trainer=trainer, batch_size=4)
  with pytest.raises(ValueError, match=r"batch_size=32 \(the trainer's is 8\)"):
    fit(trainer=trainer, batch_size=32)                   # the old default: was dropped
  other = jaxprune.MLP(in_features=4, hidden=(7,), out_features=3)
  with pytest.raises(ValueError, match="the model differ"):
    fit(trainer=jaxprune.make_trainer(other))
  params = jax.vmap(MODEL.init)(jax.random.split(jax.random.key(1), 2))
  with pytest.raises(ValueError, match=r"batch_size=4 \(the trainer's is 8\)"):
    jaxprune.fit_many(MODEL, params, np.stack([X, X]), np.stack([Y, Y]), np.ones((2, 13)),
                      key=jax.random.split(jax.random.key(0), 2), epochs=1, batch_size=4,
                      trainer=trainer, progress=False)


def test_fit_many_keeps_a_float64_learning_rate_under_x64():
  """Per-run learning rates were cast to float32 before reaching float64 params. Run in a
  process of its own, which starts with x64 off and compiles only this case's programs."""
  code = ("import sys; sys.path.insert(0, 'tests'); import test_train_probe as m; "
          "m.float64_learning_rate_check()")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=300, check=False, cwd=os.path.dirname(os.path.dirname(
                            os.path.abspath(__file__))))
  assert done.returncode == 0, done.stderr[-3000:]


def float64_learning_rate_check():
  """The body of the test above, in a fresh process."""
  with jax.enable_x64(True):
    p0 = jax.tree.map(lambda a: a.astype(jnp.float64), MODEL.init(jax.random.key(1)))
    x, lr, key = X.astype(np.float64), 0.1 / 3, jax.random.key(5)
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    trainer = jaxprune.make_trainer(MODEL, batch_size=13, optimizer=tx)
    got, _ = jaxprune.fit_many(MODEL, jax.tree.map(lambda a: a[None], p0), x[None], Y[None],
                               np.ones((1, 13)), key=key[None], epochs=1, trainer=trainer,
                               learning_rate=[lr], progress=False)
    ref = _reference_fit(p0, x, Y, np.ones(13), key, epochs=1, batch_size=13,
                         tx=optax.sgd(lr))
    assert {a.dtype for a in jax.tree.leaves(got)} == {np.dtype(np.float64)}
    _close(one(got, 0), ref, rtol=1e-13, atol=1e-15)


def test_fit_and_evaluate_name_stacked_params_and_point_to_fit_many():
  """Params stacked with a leading run axis (fit_many's form) given to fit or evaluate failed
  inside Flax with ScopeParamShapeError, which names neither the run axis nor the fix."""
  params = jax.vmap(MODEL.init)(jax.random.split(jax.random.key(1), 3))
  with pytest.raises(ValueError, match=r"fit: the params look stacked, with a leading run axis "
                     r"of 3.*a\[r\].*fit_many"):
    jaxprune.fit(MODEL, params, X, Y, key=jax.random.key(0), epochs=1, progress=False)
  with pytest.raises(ValueError, match=r"evaluate: the params look stacked.*evaluate_many"):
    jaxprune.evaluate(MODEL, params, X, Y)


def test_fit_refuses_stacked_params_that_an_apply_function_would_broadcast():
  """An apply function x @ w with stacked w (R, 4, 2) broadcasts to (R, N, 2) outputs: fit
  failed inside its compiled step with "mul got incompatible shapes for broadcasting: (13,),
  (3,)", which points at neither the params nor fit_many."""
  apply = lambda p, x: x @ p["w"]
  loss = lambda out, y: jnp.mean((out - y) ** 2, axis=-1)
  w = jnp.asarray(RNG.normal(size=(3, 4, 2)), jnp.float32)
  y = RNG.normal(size=(13, 2)).astype(np.float32)
  with pytest.raises(ValueError, match=r"fit: the params look stacked.*of 3"):
    jaxprune.fit(apply, {"w": w}, X, y, key=jax.random.key(0), epochs=1, loss=loss,
                 progress=False)
  # one run's params train as always
  got, _ = jaxprune.fit(apply, {"w": w[0]}, X, y, key=jax.random.key(0), epochs=1, loss=loss,
                        progress=False, batch_size=13, optimizer=optax.sgd(0.1))
  grad = 2 * X.T @ (X @ np.asarray(w[0]) - y) / (13 * 2)   # the gradient of the mean, by hand
  np.testing.assert_allclose(np.asarray(got["w"]), np.asarray(w[0]) - 0.1 * grad, rtol=1e-5,
                             atol=1e-6)


def test_unstacked_params_whose_leaves_share_a_leading_size_are_not_taken_for_runs():
  """An MLP 4-4-4 has every leaf of leading size 4, like 4 stacked runs: it must still train and
  evaluate (the check traces the model before blaming a run axis)."""
  model = jaxprune.MLP(in_features=4, hidden=(4,), out_features=4)
  p0 = model.init(jax.random.key(1))
  y = RNG.integers(0, 4, 13).astype(np.int32)
  assert {np.shape(a)[0] for a in jax.tree.leaves(p0)} == {4}
  want = np.mean(np.argmax(np.asarray(model.apply(p0, X)), -1) == y)
  assert jaxprune.evaluate(model, p0, X, y)["accuracy"] == pytest.approx(want)
  jaxprune.fit(model, p0, X, y, key=jax.random.key(0), epochs=1, progress=False)
