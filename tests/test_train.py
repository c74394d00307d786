"""Masked training, evaluation, fine-tuning, rewinding, progress and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import as_users_compile
import jaxprune
from jaxprune import _compile  # pylint: disable=protected-access
from jaxprune import train

MODEL = jaxprune.MLP(in_features=6, hidden=(10,), out_features=3)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(90, 6)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 0.5).astype(np.int32)
  return x, y


@pytest.fixture(scope="module")
def params():
  return MODEL.init(jax.random.key(0))


def _masks(params):
  um = {"hidden_0": jnp.array([True, False] * 5)}
  wm = jaxprune.expand(params, MODEL, um)
  # Also prune some individual weights, unstructured.
  wm["params"]["out"]["kernel"] = wm["params"]["out"]["kernel"].at[0, 1].set(False)
  return wm


def test_training_learns_and_reports_history(data, params):
  x, y = data
  before = jaxprune.evaluate(MODEL, params, x, y)
  p, hist = jaxprune.fit(MODEL, params, x, y, key=jax.random.key(1), epochs=30,
                         learning_rate=1e-2, batch_size=16, log_every=10, progress=False,
                         validation=(x, y))
  after = jaxprune.evaluate(MODEL, p, x, y)
  assert hist["loss"].shape == (30,) and hist["val_accuracy"].shape == (30,)
  assert after["loss"] < 0.6 * before["loss"]
  assert after["accuracy"] > 0.85
  np.testing.assert_allclose(hist["val_loss"][-1], after["loss"], rtol=1e-5)


def test_masked_training_keeps_zeros_exactly(data, params):
  x, y = data
  wm = _masks(params)
  p, _ = jaxprune.fit(MODEL, params, x, y, key=jax.random.key(2), epochs=5, masks=wm,
                      learning_rate=5e-2, progress=False)
  for leaf, m, old in zip(jax.tree.leaves(p), jax.tree.leaves(wm), jax.tree.leaves(params)):
    assert np.all(np.asarray(leaf)[~np.asarray(m)] == 0.0)
    assert np.any(np.asarray(leaf)[np.asarray(m)] != np.asarray(old)[np.asarray(m)])
  # Fine-tuning a pruned network again keeps them zero too.
  p2, _ = jaxprune.fit(MODEL, p, x, y, key=jax.random.key(3), epochs=2, masks=wm,
                       progress=False)
  assert float(jnp.abs(p2["params"]["hidden_0"]["kernel"][:, 1]).sum()) == 0.0


def test_step_does_not_recompile(data, params):
  x, y = data
  trainer = jaxprune.make_trainer(MODEL, batch_size=16)
  traces = []

  def step(state, xb, yb):
    traces.append(1)
    return trainer.step(state, None, xb, yb, jnp.ones(16))

  step = jax.jit(step)
  state = trainer.init(params)
  for i in range(3):
    state, _ = step(state, x[16 * i:16 * (i + 1)], y[16 * i:16 * (i + 1)])
  assert len(traces) == 1
  # fit() reuses one compiled epoch program across calls and learning rates.
  for lr in (1e-2, 1e-3, 3e-4):
    jaxprune.fit(MODEL, params, x, y, key=jax.random.key(0), epochs=2, log_every=2,
                 learning_rate=lr, batch_size=16, progress=False)
  compiled = train._compiled(jaxprune.make_trainer(MODEL, batch_size=16), 2, False, False)
  assert compiled.active._cache_size() == 1


def test_fit_many_equals_separate_fits(data, params):
  x, y = data
  sizes, lrs = (90, 70), (1e-2, 3e-3)
  xs = np.zeros((2, 90, 6), np.float32)
  ys = np.zeros((2, 90), np.int32)
  ws = np.zeros((2, 90), np.float32)
  for r, n in enumerate(sizes):
    xs[r, :n], ys[r, :n], ws[r, :n] = x[:n], y[:n], 1.0
  keys = jax.random.split(jax.random.key(5), 2)
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), params)
  # 5 epochs in chunks of 2, 2 and 1: each chunk's key is split from the run's key in-program
  pm, hm = jaxprune.fit_many(MODEL, stacked, xs, ys, ws, key=keys, epochs=5, batch_size=16,
                             learning_rate=jnp.array(lrs), progress=False, log_every=2)
  for r, n in enumerate(sizes):
    p, h = jaxprune.fit(MODEL, params, x[:n], y[:n], key=keys[r], epochs=5, batch_size=16,
                        learning_rate=lrs[r], progress=False, log_every=2)
    np.testing.assert_allclose(hm["loss"][r], h["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b[r], rtol=1e-4, atol=1e-6), p, pm)


def _count_compiles(fn):
  """(fn's result, the number of XLA programs compiled while it ran)."""
  events = []
  listener = lambda event, duration, **kw: events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    out = jax.block_until_ready(fn())
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return out, events.count("/jax/core/compile/backend_compile_duration")


def test_fit_many_and_evaluate_many_compile_only_their_programs():
  """Checks and preparation run on the host: a first fit_many on new shapes compiles the start
  program and one training program per chunk length, nothing eager; evaluate_many one program."""
  model = jaxprune.MLP(in_features=5, hidden=(13,), out_features=4, activation="sigmoid")
  rng = np.random.default_rng(3)
  x = rng.normal(size=(3, 37, 5)).astype(np.float32)
  y = rng.integers(0, 4, size=(3, 37))
  w = (rng.random((3, 37)) > 0.2).astype(np.float32)
  keys = jax.random.split(jax.random.key(1), 3)
  params = jax.vmap(model.init)(keys)
  masks = jax.vmap(lambda p: jaxprune.magnitude_prune(p, None, 0.3)[1])(params)
  jax.block_until_ready((params, masks))
  fit = lambda epochs: jaxprune.fit_many(model, params, x, y, w, key=keys, epochs=epochs,
                                         learning_rate=np.array([1e-2, 3e-3, 1e-3]),
                                         masks=masks, log_every=2, progress=False)
  (trained, hist), n = _count_compiles(lambda: fit(4))
  assert n == 2, n  # start + the 2-epoch chunk (run twice)
  assert hist["loss"].shape == (3, 4)
  _, n = _count_compiles(lambda: fit(5))
  assert n == 2, n  # start for 3 chunks + the 1-epoch last chunk; the 2-epoch one is reused
  m, n = _count_compiles(lambda: jaxprune.evaluate_many(model, trained, x, y, w))
  assert n == 1, n
  assert m["accuracy"].shape == (3,)
  # masked weights stayed exactly zero (the start program applied the masks)
  for p, k in zip(jax.tree.leaves(trained), jax.tree.leaves(masks)):
    assert np.all(np.asarray(p)[~np.asarray(k)] == 0)


def _assert_same_bits(a, b, more_than: int):
  """Two pytrees of the same structure (more than ``more_than`` leaves, PRNG keys included)
  hold the same bits."""
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb) > more_than
  for u, v in zip(la, lb):
    if jnp.issubdtype(u.dtype, jax.dtypes.prng_key):
      u, v = jax.random.key_data(u), jax.random.key_data(v)
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="the lighter compile options are XLA:CPU's; elsewhere it is a plain jit")
def test_start_program_at_low_optimisation_gives_the_same_bits():
  """On CPU the start program is compiled with jaxprune._compile.LEVEL_1 (it is a pass over the
  params): with those options its state and keys equal the default compilation's (level 2) bit
  for bit, for one run and for vmapped runs, with weight masks, gradient clipping and AdamW
  with an injected learning rate. Both are compiled with their options named: the suite's
  XLA_FLAGS would override the library's (tests/conftest.py)."""
  model = jaxprune.MLP(in_features=5, hidden=(13,), out_features=4)
  opt = optax.chain(optax.clip_by_global_norm(1.0),
                    optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3))
  trainer = jaxprune.make_trainer(model, optimizer=opt)
  keys = jax.random.split(jax.random.key(4), 3)
  params = jax.vmap(model.init)(keys)
  params = jax.tree.map(lambda a: a * 1.37 + 0.01, params)
  masks = jax.vmap(lambda p: jaxprune.magnitude_prune(p, None, 0.4)[1])(params)
  lrs = jnp.asarray([1e-2, 3e-3, 1e-3])
  one = jax.tree.map(lambda a: a[0], (params, masks))
  for many, args in ((True, (params, masks, lrs, keys)), (False, (*one, lrs[0], keys[0]))):
    start = train._compiled_start(trainer, many, 3)    # pylint: disable=protected-access
    a = start.plain.lower(*args).compile(   # its options named (the suite's XLA_FLAGS win)
        as_users_compile(start.asked))(*args)
    b = start.plain.lower(*args).compile(   # XLA's default options
        _compile.supported(_compile.DEFAULT_LEVEL))(*args)
    _assert_same_bits(a, b, more_than=3)


@pytest.mark.skipif(jax.default_backend() != "cpu",
                    reason="the lighter compile options are XLA:CPU's; elsewhere it is a plain jit")
@pytest.mark.parametrize("activation,opt,many", [("sigmoid", "adam", True),
                                                  ("relu", "clip_adamw", False)])
def test_mlp_training_program_at_level_1_gives_the_default_bits(activation, opt, many):
  """The built-in MLP's training program compiles at LLVM level 1 on CPU (half the compilation):
  one run and vmapped runs, with weight masks, sample weights and validation data, end in
  exactly the state and history of XLA's default compilation (level 2). Both are compiled here
  with XLA's default emitters named (the suite's XLA_FLAGS ask for the older one, which alone
  changes training's last bits, see tests/conftest.py), as a user's are."""
  model = jaxprune.MLP(in_features=5, hidden=(11, 6), out_features=4, activation=activation)
  optimizer = (optax.adam(1e-2) if opt == "adam" else
               optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(3e-3)))
  trainer = jaxprune.make_trainer(model, optimizer=optimizer, batch_size=8)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 37, 5)).astype(np.float32)
  y = rng.integers(0, 4, (2, 37)).astype(np.int32)
  w = (rng.random((2, 37)) < 0.9).astype(np.float32)
  keys = jax.random.split(jax.random.key(6), 2)
  params = jax.vmap(model.init)(keys)
  masks = jax.vmap(lambda p: jaxprune.magnitude_prune(p, None, 0.3)[1])(params)
  states = jax.vmap(trainer.init)(params)
  val = (x[:, :9], y[:, :9])
  args = (states, masks, x, y, w, keys, val)
  if not many:
    args = jax.tree.map(lambda a: a[0], args)
  compiled = train._compiled(trainer, 3, True, many)   # pylint: disable=protected-access
  assert compiled.active is compiled.light
  light = as_users_compile(_compile.TRAIN_MLP)   # level 1, default emitters
  lowered = compiled.plain.lower(*args)   # traced and lowered once, compiled both ways
  a = lowered.compile(light)(*args)
  b = lowered.compile(_compile.supported(_compile.DEFAULT_LEVEL))(*args)
  _assert_same_bits(a, b, more_than=5)


def test_fit_many_checks_data_as_the_device_holds_it():
  """float64 beyond float32's range is infinite on the device: the check says so before any
  training; a per-run learning rate of the wrong length is named."""
  model = jaxprune.MLP(in_features=5, hidden=(7,), out_features=3)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 12, 5))
  y = rng.integers(0, 3, (2, 12))
  w = np.ones((2, 12), np.float32)
  keys = jax.random.split(jax.random.key(1), 2)
  params = jax.vmap(model.init)(keys)
  big = x.copy()
  big[1, 2, 3] = 1e39
  with pytest.raises(ValueError, match="NaN or infinite"):
    jaxprune.fit_many(model, params, big, y, w, key=keys, epochs=1, progress=False)
  with pytest.raises(ValueError, match="NaN or infinite"):
    jaxprune.evaluate_many(model, params, big, y, w)
  one = jax.tree.map(lambda a: a[1], params)
  with pytest.raises(ValueError, match="NaN or infinite"):
    jaxprune.fit(model, one, big[1], y[1], key=keys[1], epochs=1, progress=False)
  with pytest.raises(ValueError, match="NaN or infinite"):
    jaxprune.evaluate(model, one, big[1], y[1])
  with pytest.raises(ValueError, match=r"learning_rate must be one number or one per run"):
    jaxprune.fit_many(model, params, x, y, w, key=keys, epochs=1, progress=False,
                      learning_rate=[1e-3, 1e-2, 1e-1])
  # float64 inputs train as their float32 values did before (same params as float32 inputs)
  a, _ = jaxprune.fit_many(model, params, x, y, w, key=keys, epochs=2, progress=False)
  b, _ = jaxprune.fit_many(model, params, x.astype(np.float32), y, w, key=keys, epochs=2,
                           progress=False)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_padding_never_changes_the_real_runs_shuffle():
  # Large enough that a naive permutation of the padded length would reorder the real samples.
  model = jaxprune.MLP(in_features=3, hidden=(4,), out_features=2)
  rng = np.random.default_rng(3)
  n, padded = 1700, 1800
  x = rng.normal(size=(n, 3)).astype(np.float32)
  y = (x[:, 0] > 0).astype(np.int32)
  p0 = model.init(jax.random.key(0))
  key = jax.random.key(11)
  p, h = jaxprune.fit(model, p0, x, y, key=key, epochs=1, batch_size=64, progress=False)
  xs = np.zeros((1, padded, 3), np.float32)
  ys = np.zeros((1, padded), np.int32)
  ws = np.zeros((1, padded), np.float32)
  xs[0, :n], ys[0, :n], ws[0, :n] = x, y, 1.0
  pm, hm = jaxprune.fit_many(model, jax.tree.map(lambda a: a[None], p0), xs, ys, ws,
                             key=key[None], epochs=1, batch_size=64, progress=False)
  np.testing.assert_allclose(hm["loss"][0], h["loss"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b[0], rtol=1e-5, atol=1e-7), p, pm)


def test_batch_norm_statistics_ignore_padding_rows():
  model = jaxprune.ResNet18(num_classes=3, input_shape=(8, 8, 3))
  params = model.init(jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  mask = jnp.array([True, True, False, False])
  step = jax.jit(lambda p, x, m: model.apply_train(p, x, mask=m))   # one program for all three
  out1, new1 = step(params, x, mask)
  out2, new2 = step(params, x.at[2:].set(100.0), mask)  # only the padding rows change
  np.testing.assert_allclose(out1[:2], out2[:2], rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               new1["batch_stats"], new2["batch_stats"])
  _, unmasked = step(params, x.at[2:].set(100.0), jnp.ones(4, bool))
  assert not np.allclose(unmasked["batch_stats"]["bn1"]["mean"], new1["batch_stats"]["bn1"]["mean"])


def test_rewind_restores_kept_weights_and_zeroes_pruned(data, params):
  x, y = data
  wm = _masks(params)
  trained, _ = jaxprune.fit(MODEL, params, x, y, key=jax.random.key(1), epochs=2, masks=wm,
                            progress=False)
  r = jaxprune.rewind(trained, params, wm)
  for a, m, init in zip(jax.tree.leaves(r), jax.tree.leaves(wm), jax.tree.leaves(params)):
    a, m, init = map(np.asarray, (a, m, init))
    np.testing.assert_array_equal(a[m], init[m])
    assert np.all(a[~m] == 0)
  # None is no masks, as the pruners read it (it was refused as missing every leaf)
  assert jax.tree.all(jax.tree.map(np.array_equal, jaxprune.rewind(trained, params, None),
                                   params))


def test_autoencoder_trains_on_squared_error():
  ae = jaxprune.Autoencoder(in_features=5, hidden=(3,))
  rng = np.random.default_rng(1)
  z = rng.normal(size=(128, 2)).astype(np.float32)
  x = np.concatenate([z, z @ rng.normal(size=(2, 3)).astype(np.float32)], 1)
  p0 = ae.init(jax.random.key(0))
  p, h = jaxprune.fit(ae, p0, x, x, key=jax.random.key(1), epochs=40, learning_rate=1e-2,
                      progress=False)
  assert h["loss"][-1] < 0.3 * h["loss"][0]
  assert jaxprune.evaluate(ae, p, x, x)["accuracy"] == 0.0


def test_progress_lines(data, params, capsys):
  x, y = data
  jaxprune.fit(MODEL, params, x, y, key=jax.random.key(0), epochs=4, log_every=2,
               desc="demo", batch_size=16)
  err = capsys.readouterr().err
  assert "[demo] epoch 2/4" in err and "[demo] epoch 4/4" in err and "loss=" in err


def test_bad_input(data, params):
  x, y = data
  bad = x.copy()
  bad[3, 2] = np.nan
  with pytest.raises(ValueError, match="1 NaN or infinite"):
    jaxprune.fit(MODEL, params, bad, y, key=jax.random.key(0), epochs=1, progress=False)
  with pytest.raises(ValueError, match=r"batch of shape \(N, 6\)"):
    jaxprune.fit(MODEL, params, x[:, :5], y, key=jax.random.key(0), epochs=1, progress=False)
  with pytest.raises(ValueError, match="targets have 10"):
    jaxprune.evaluate(MODEL, params, x, y[:10])
  with pytest.raises(ValueError, match="shape"):
    wm = jaxprune.ones_like(params)
    wm["params"]["out"]["bias"] = jnp.ones(4, bool)
    jaxprune.fit(MODEL, params, x, y, key=jax.random.key(0), epochs=1, masks=wm, progress=False)
  with pytest.raises(ValueError, match=r"y labels range over \[0, 3\] but the model has 3"):
    jaxprune.fit(MODEL, params, x, np.where(y == 2, 3, y), key=jax.random.key(0), epochs=1,
                 progress=False)
  with pytest.raises(ValueError, match="y labels must be integer class indices"):
    jaxprune.evaluate(MODEL, params, x, y.astype(np.float32))
  with pytest.raises(ValueError, match=r"shape \(90, 1\), a column; .*y.ravel\(\)"):
    jaxprune.evaluate(MODEL, params, x, y[:, None])
  with pytest.raises(ValueError, match=r"shape \(90, 3\); .*y.argmax\(-1\)"):
    jaxprune.fit(MODEL, params, x, np.eye(3, dtype=np.float32)[y], key=jax.random.key(0),
                 epochs=1, progress=False)
  with pytest.raises(TypeError, match="key must be a PRNG key made by jax.random.key"):
    jaxprune.fit(MODEL, params, x, y, key=0, epochs=1, progress=False)
  with pytest.raises(TypeError, match="key must be a PRNG key"):
    MODEL.init(0)
  w = np.ones((2, 90), np.float32)
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), params)
  with pytest.raises(ValueError, match=r"y of each run labels have shape \(90, 1\), a column"):
    jaxprune.fit_many(MODEL, stacked, np.stack([x, x]), np.stack([y, y])[..., None], w,
                      key=jax.random.split(jax.random.key(0), 2), epochs=1, progress=False)
  with pytest.raises(ValueError, match="one key per run"):
    jaxprune.fit_many(MODEL, stacked, np.stack([x, x]), np.stack([y, y]), w,
                      key=jax.random.key(0), epochs=1, progress=False)
  with pytest.raises(ValueError, match=r"y and w shaped \(R, N\) = \(2, 90\)"):
    jaxprune.fit_many(MODEL, stacked, np.stack([x, x]), np.stack([y, y]), w[:, :30],
                      key=jax.random.split(jax.random.key(0), 2), epochs=1, progress=False)
  with pytest.raises(ValueError, match="stacked with a leading run axis of 2"):
    jaxprune.fit_many(MODEL, params, np.stack([x, x]), np.stack([y, y]), w,
                      key=jax.random.split(jax.random.key(0), 2), epochs=1, progress=False)
  with pytest.raises(FloatingPointError, match="lower the learning rate"):
    # A loss that diverges (here: log of a negative number) is caught at the epoch's end.
    jaxprune.fit(MODEL, params, x, y, key=jax.random.key(0), epochs=2, progress=False,
                 optimizer=optax.sgd(1e-2), loss=lambda o, t: jnp.log(o[:, 0] - 1e9))


def test_nan_params_are_named_before_training_or_evaluating(data, params):
  """NaN params trained to a NaN loss blamed on the learning rate, and evaluated to the
  accuracy of NaN logits. A NaN where the masks remove the weight is zeroed first: accepted."""
  x, y = data
  bad = jax.tree.map(lambda a: a, params)
  bad["params"]["hidden_0"]["kernel"] = bad["params"]["hidden_0"]["kernel"].at[1, 2].set(jnp.nan)
  match = r"params\[params/hidden_0/kernel\] holds 1 NaN or infinite values\. A network"
  with pytest.raises(ValueError, match=match):
    jaxprune.fit(MODEL, bad, x, y, key=jax.random.key(0), epochs=1, progress=False)
  with pytest.raises(ValueError, match=match):
    jaxprune.evaluate(MODEL, bad, x, y)
  stacked = jax.tree.map(lambda a: jnp.stack([a, a]), bad)
  xs, ys, ws = np.stack([x, x]), np.stack([y, y]), np.ones((2, len(y)), np.float32)
  with pytest.raises(ValueError, match=r"holds 2 NaN or infinite values"):
    jaxprune.fit_many(MODEL, stacked, xs, ys, ws, key=jax.random.split(jax.random.key(0), 2),
                      epochs=1, progress=False)
  with pytest.raises(ValueError, match=r"holds 2 NaN or infinite values"):
    jaxprune.evaluate_many(MODEL, stacked, xs, ys)
  masks = jaxprune.ones_like(params)
  masks["params"]["hidden_0"]["kernel"] = masks["params"]["hidden_0"]["kernel"].at[1, 2].set(False)
  clean = jaxprune.apply_masks(params, masks)
  assert jaxprune.evaluate(MODEL, bad, x, y, masks=masks) == jaxprune.evaluate(MODEL, clean, x, y)
  p, _ = jaxprune.fit(MODEL, bad, x, y, key=jax.random.key(0), epochs=1, masks=masks,
                      progress=False)
  assert all(bool(np.all(np.isfinite(np.asarray(a)))) for a in jax.tree.leaves(p))


def test_a_batch_size_above_the_data_is_one_batch_of_all_samples():
  """batch_size=4500 on 45 samples padded every step to 4500 rows (4.6x slower for the same
  step; a --batch_size=100000 quick study never finished): it is one batch of the 45, the same
  program and bits as batch_size=45."""
  model = jaxprune.MLP(in_features=4, hidden=(6,), out_features=3)
  params = model.init(jax.random.key(0))
  x = np.asarray(jax.random.normal(jax.random.key(1), (45, 4)))
  y = np.arange(45) % 3
  runs = [jaxprune.fit(model, params, x, y, key=jax.random.key(2), epochs=3, batch_size=bs,
                       progress=False)[0] for bs in (45, 4500)]
  for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  trainer = jaxprune.make_trainer(model, batch_size=4500)
  state = jaxprune.train.init_state(trainer, params)
  data = (jnp.asarray(x), jnp.asarray(y), jnp.ones(45, jnp.float32))
  jaxpr = str(jax.make_jaxpr(lambda s: trainer.epoch(s, None, *data, jax.random.key(3)))(state))
  assert "4500" not in jaxpr and "45,4]" in jaxpr.replace(" ", "")
