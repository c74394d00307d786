"""Models: shapes, unit groups, activations, masked == compacted, bad input."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from conftest import as_users_compile, random_unit_masks

pytestmark = pytest.mark.usefixtures("strict_rank")

SMALL_MODELS = {
    "mlp": jaxprune.MLP(in_features=10, hidden=(12, 9), out_features=7, activation="tanh"),
    "mlp_relu": jaxprune.MLP(in_features=10, hidden=(15,), out_features=7, activation="relu"),
    "autoencoder": jaxprune.Autoencoder(in_features=11, hidden=(10,)),
    "lenet": jaxprune.LeNet(input_shape=(20, 16, 1)),
    "cnn4": jaxprune.CNN4(input_shape=(67, 67, 3), channels=(4, 6, 8, 8), dense=(12, 10, 9)),
}


@pytest.fixture(scope="module")
def built():
  out = {}
  for i, (name, m) in enumerate(SMALL_MODELS.items()):
    p = m.init(jax.random.key(i))
    x = jax.random.normal(jax.random.key(100 + i), (5,) + m.input_shape)
    out[name] = (m, p, x)
  return out


@pytest.mark.parametrize("model,in_shape,out_dim", [
    (jaxprune.MLP(in_features=10, hidden=(1000,), out_features=7), (10,), 7),
    (jaxprune.MLP(in_features=10, hidden=(10, 20, 30), out_features=7), (10,), 7),
    (jaxprune.Autoencoder(in_features=11, hidden=(10,)), (11,), 11),
    (jaxprune.LeNet(), (90, 72, 1), 7),
    (jaxprune.CNN4(), (227, 227, 3), 7),
])
def test_published_shapes(model, in_shape, out_dim):
  params = jax.eval_shape(model.init, jax.random.key(0))
  out = jax.eval_shape(model.apply, params, jax.ShapeDtypeStruct((2,) + in_shape, jnp.float32))
  assert out.shape == (2, out_dim)


def test_published_layer_sizes():
  p = jax.eval_shape(jaxprune.CNN4().init, jax.random.key(0))["params"]
  assert p["dense_0"]["kernel"].shape == (64 * 6 * 6, 512)
  assert [p[f"conv_{i}"]["kernel"].shape for i in range(4)] == [
      (11, 11, 3, 16), (5, 5, 16, 32), (3, 3, 32, 64), (3, 3, 64, 64)]
  assert [p[f"dense_{i}"]["kernel"].shape[1] for i in range(3)] + [p["out"]["kernel"].shape[1]] == [
      512, 128, 64, 7]
  lp = jax.eval_shape(jaxprune.LeNet().init, jax.random.key(0))["params"]
  assert lp["conv_0"]["kernel"].shape == (5, 5, 1, 16)
  assert lp["conv_1"]["kernel"].shape == (5, 5, 16, 32)
  assert lp["out"]["kernel"].shape == (19 * 15 * 32, 7)
  assert jaxprune.MLP(hidden=(100,)).group_sizes == {"hidden_0": 100}


@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_activations_of_every_group(built, name):
  m, p, x = built[name]
  out, acts = m.apply_with_activations(p, x, list(m.groups))
  # One compiled program against another: a few float32 ulps apart where they fuse otherwise
  # (a GPU's elementwise functions did).
  np.testing.assert_allclose(out, m.apply(p, x), rtol=1e-5, atol=1e-6)
  for g, a in acts.items():
    assert a.shape[0] == 5 and a.shape[-1] == m.groups[g].size
  if m.activation == "sigmoid":
    assert all(float(jnp.min(a)) >= 0.0 and float(jnp.max(a)) <= 1.0 for a in acts.values())
  if name == "mlp":  # activations equal the layer computed by hand
    h0 = jnp.tanh(x @ p["params"]["hidden_0"]["kernel"] + p["params"]["hidden_0"]["bias"][None])
    np.testing.assert_allclose(acts["hidden_0"], h0, rtol=1e-5, atol=1e-6)


def test_eager_activations_are_one_compiled_program():
  """Called eagerly, a forward pass with activations compiles one program per new shape (not
  one per flax operation), and gives what it gives inside a jit and under vmap."""
  m = jaxprune.MLP(in_features=3, hidden=(9, 4), out_features=2, activation="sigmoid")
  p = m.init(jax.random.key(0))
  x = np.asarray(jax.random.normal(jax.random.key(1), (17, 3)))
  events = []
  listener = lambda event, duration, **kw: events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    out, acts = m.apply_with_activations(p, x, ["hidden_0", "hidden_1"])
    again = m.activations(p, x, "hidden_1")          # other names: a second program
    for _ in range(3):                               # the same calls again: none
      m.apply_with_activations(p, x, ("hidden_0", "hidden_1"))
      m.activations(p, x, "hidden_1")
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  compiles = [e for e in events if e == "/jax/core/compile/backend_compile_duration"]
  assert len(compiles) == 2, events
  np.testing.assert_array_equal(again, acts["hidden_1"])
  inside = jax.jit(lambda p, x: m.apply_with_activations(p, x, ["hidden_0", "hidden_1"]))(p, x)
  jax.tree.map(np.testing.assert_array_equal, (out, acts), inside)
  stacked = jax.tree.map(lambda a: np.stack([a, 2 * a]), p)
  batched = jax.vmap(lambda q: m.activations(q, x, "hidden_0"))(stacked)
  np.testing.assert_allclose(batched[0], acts["hidden_0"], rtol=1e-6)
  np.testing.assert_allclose(batched[1], m.activations(jax.tree.map(lambda a: 2 * a, p), x,
                                                       "hidden_0"), rtol=1e-6)


@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_expand_of_all_ones_is_all_ones(built, name):
  m, p, _ = built[name]
  wm = jaxprune.expand(p, m, jaxprune.unit_masks_ones(m))
  assert all(bool(jnp.all(l)) for l in jax.tree.leaves(wm))
  assert jax.tree.structure(wm) == jax.tree.structure(p)


@pytest.mark.parametrize("name", list(SMALL_MODELS))
@hypothesis.settings(max_examples=4, deadline=None, derandomize=True)
@hypothesis.given(seed=st.integers(0, 2**31 - 1), p_keep=st.floats(0.05, 0.95))
def test_masked_equals_compacted(built, name, seed, p_keep):
  m, p, x = built[name]
  um = random_unit_masks(m, seed, p_keep)
  masked = m.apply(jaxprune.apply_masks(p, jaxprune.expand(p, m, um)), x)
  small, small_model = m.compact(p, um)
  np.testing.assert_allclose(small_model.apply(small, x), masked, rtol=1e-4, atol=1e-5)
  assert small_model.group_sizes == {k: int(v.sum()) for k, v in um.items()}
  want = jax.eval_shape(small_model.init, jax.random.key(0))
  assert jax.tree.map(jnp.shape, small) == jax.tree.map(lambda s: s.shape, want)


def test_compact_does_not_modify_params(built):
  m, p, _ = built["mlp"]
  before = jax.tree.map(np.array, p)
  m.compact(p, random_unit_masks(m, 0))
  jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, p))


def test_bad_input_errors(built):
  m, p, _ = built["lenet"]
  with pytest.raises(ValueError, match="it has 3 channels, the model takes 1"):
    m.apply(p, jnp.zeros((2, 20, 16, 3)))
  mlp, mp, _ = built["mlp"]
  with pytest.raises(ValueError, match=r"batch of shape \(N, 10\); got \(2, 9\)"):
    mlp.apply(mp, jnp.zeros((2, 9)))
  with pytest.raises(ValueError, match=r"floating point, got dtype int32: pass x.astype"):
    mlp.apply(mp, jnp.zeros((2, 10), jnp.int32))
  with pytest.raises(ValueError, match=r"one example of shape \(10,\): add the batch axis"):
    mlp.apply(mp, jnp.zeros((10,)))   # said "build the model with input shape ()"
  with pytest.raises(ValueError, match=r"2 axes; got 1 axes, shape \(7,\)"):
    mlp.apply(mp, jnp.zeros((7,)))     # said "build the model with input shape ()"
  # channels first: it said to build the model with input shape (1, 20, 16), which fails
  with pytest.raises(ValueError, match=r"channels first \(NCHW\). Transpose it: x.transpose"):
    m.apply(p, jnp.zeros((2, 1, 20, 16)))
  with pytest.raises(ValueError, match=r"compact changes the shapes .* traced"):
    jax.jit(lambda u: mlp.compact(mp, {"hidden_0": u})[0])(
        jnp.ones(mlp.groups["hidden_0"].size, bool))   # was NumPy's TracerArrayConversionError
  with pytest.raises(KeyError, match="Unknown unit group 'conv_9'"):
    m.activations(p, jnp.zeros((2, 20, 16, 1)), "conv_9")
  with pytest.raises(ValueError, match="Unknown activation"):
    jaxprune.MLP(activation="swish")
  with pytest.raises(ValueError, match="too small"):
    jaxprune.LeNet(input_shape=(8, 8, 1))
  # 8x8 digits: it said to build the model with input shape (8, 8, 1), which the line above
  # refuses; a size that can be built is still offered
  with pytest.raises(ValueError, match=r"got \(2, 8, 8, 1\). Reshape or resize the inputs; no "
                     r"model with input_shape=\(8, 8, 1\) can be built: .*at least 16x16"):
    m.apply(p, jnp.zeros((2, 8, 8, 1)))
  with pytest.raises(ValueError, match=r"or build the model with input_shape=\(24, 24, 1\)"):
    m.apply(p, jnp.zeros((2, 24, 24, 1)))
  # the review: an MLP was told to build with input shape (9,), which its constructor does not
  # take; channels are converted, not resized
  with pytest.raises(ValueError, match=r"or build the model with in_features=9\."):
    mlp.apply(mp, jnp.zeros((2, 9)))
  with pytest.raises(ValueError, match=r"Convert the inputs to 1 channel \(x.mean\(-1, "
                     r"keepdims=True\) makes grey\), or build the model with input_shape="):
    m.apply(p, jnp.zeros((2, 20, 16, 3)))
  with pytest.raises(ValueError, match="removes every unit"):
    mlp.compact(mp, {"hidden_0": jnp.zeros(12, bool)})


def test_init_compiled_lightly_gives_the_default_bits():
  """model.init is compiled at LLVM level 1 on CPU (jaxprune._compile): with no XLA_FLAGS, eagerly
  and under vmap it gives exactly the params of the default compilation (level 2), which a
  user's jit around it compiles. (An MLP here, to keep the suite short; CNN4's and ResNet-18's
  initialisers were checked the same way when the level was chosen, docs/benchmarks.md.) The
  suite names its own level in XLA_FLAGS, which every program then compiles at
  (tests/conftest.py), so the light compilations are made here with their options named, and
  the three routes at the suite's flags are checked against each other."""
  from jaxprune import _compile  # pylint: disable=import-outside-toplevel
  from jaxprune.models import base  # pylint: disable=import-outside-toplevel
  keys = jax.random.split(jax.random.key(11), 3)
  model = jaxprune.MLP(in_features=6, hidden=(9, 5), out_features=3)
  reference = jax.jit(jax.vmap(lambda k: dict(model.module.init(k, jnp.zeros((1, 6))))))
  default = reference.lower(keys).compile(   # XLA's default options
      _compile.supported(_compile.DEFAULT_LEVEL))(keys)
  init = base._jitted_init(model)            # pylint: disable=protected-access
  assert init.asked == _compile.LEVEL_1
  light = as_users_compile(init.asked)
  one = init.plain
  got = {"eager": jax.tree.map(lambda *a: jnp.stack(a),
                               *[one.lower(k).compile(light)(k) for k in keys]),
         "vmap": jax.jit(jax.vmap(one)).lower(keys).compile(light)(keys)}
  # Eager, vmapped and inside a user's jit, at the suite's flags: the same params.
  routes = [jax.tree.map(lambda *a: jnp.stack(a), *[model.init(k) for k in keys]),
            jax.vmap(model.init)(keys), jax.jit(jax.vmap(model.init))(keys)]
  for params in routes[1:]:
    for u, v in zip(jax.tree.leaves(params), jax.tree.leaves(routes[0])):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  for how, params in got.items():
    assert jax.tree.structure(params) == jax.tree.structure(default), how
    for u, v in zip(jax.tree.leaves(params), jax.tree.leaves(default)):
      np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=how)


def test_light_jit_leaves_out_options_this_jaxlib_does_not_know():
  """A later XLA may drop an option (the older loop emitter, say): the program then compiles
  without it instead of failing."""
  from jaxprune import _compile  # pylint: disable=import-outside-toplevel
  level = {"xla_backend_optimization_level": 1}
  unknown = {"xla_cpu_no_such_option_in_any_jaxlib": True}
  assert _compile.supported({**unknown, **level}) == level
  f = _compile.light_jit(lambda x: x * 2.0 + 1.0, {**level, **unknown})
  np.testing.assert_array_equal(np.asarray(f(jnp.arange(3.0))), [1.0, 3.0, 5.0])
  np.testing.assert_array_equal(np.asarray(f(jnp.arange(4.0))), [1.0, 3.0, 5.0, 7.0])
  # Ahead-of-time compilation too (the benchmarks' and the sharding test's route; jax 0.11's
  # XLA:CPU refused the older emitter's option there).
  g = _compile.light_jit(lambda x: x - 1.0, {**level, **unknown})
  np.testing.assert_array_equal(np.asarray(g.lower(jnp.arange(2.0)).compile()(jnp.arange(2.0))),
                                [-1.0, 0.0])


def test_light_jit_leaves_the_options_xla_flags_names_to_the_user(monkeypatch, tmp_path):
  """An option named in XLA_FLAGS is the user's (a per-program option would override it):
  light_jit leaves it out and keeps the others. XLA_FLAGS is read when the program is first
  used, not when it is made (XLA reads it when its backend starts, after ``import jaxprune``
  for a user who sets it in Python); a value that does not start with '-' names a file of
  flags, as XLA reads it."""
  from jaxprune import _compile  # pylint: disable=import-outside-toplevel
  fn = lambda x: x * 2.0 + 1.0
  flagfile = tmp_path / "flags"
  flagfile.write_text("--xla_cpu_use_fusion_emitters=true\n")
  for flags, kept in [
      ("", _compile.LEVEL_1),
      ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false", {}),
      (" --xla_force_host_platform_device_count=2\t--xla_cpu_use_fusion_emitters",
       {"xla_backend_optimization_level": 1}),
      ("--xla_backend_optimization_level_other=3", _compile.LEVEL_1),
      (str(flagfile), {"xla_backend_optimization_level": 1})]:
    f = _compile.light_jit(fn, _compile.LEVEL_1)   # made before XLA_FLAGS is set: not read yet
    with monkeypatch.context() as m:
      m.setenv("XLA_FLAGS", flags)
      options = f.options                          # first use: read now
    assert f.asked == _compile.LEVEL_1
    assert _compile.supported(options) == _compile.supported(kept), flags
    np.testing.assert_array_equal(np.asarray(f(jnp.arange(3.0))), [1.0, 3.0, 5.0])
    assert f.options == options                    # fixed once read
  monkeypatch.setenv("XLA_FLAGS", "")
  assert _compile.user_options() == frozenset()


def test_light_jit_raises_the_programs_own_errors():
  from jaxprune import _compile  # pylint: disable=import-outside-toplevel

  def bad(x):
    raise ValueError("the program's own message")

  for call in (lambda: _compile.light_jit(bad)(1.0),
               lambda: jax.jit(lambda x: _compile.light_jit(bad)(x))(1.0)):
    with pytest.raises(ValueError, match="the program's own message"):
      call()
