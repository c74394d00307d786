"""Pruning inside other people's training loops, as docs/masked-training.md and training.md promise.

Written the way Flax and optax users write their loops (a linen ``TrainState`` or an
``nnx.Optimizer``, a hand-written ``jax.jit(step)`` with ``donate_argnums``, ``lax.scan`` over
steps, the common optax wrappers, bfloat16 params, an orbax checkpoint in the middle of
training), and on params sharded over two CPU devices (one subprocess, since the device count
is fixed when JAX starts). Each check is exact: masked weights are 0.0 at every step, the
schedule's counts are the documented ``round(s_t * N)``, a resumed run is bitwise the
uninterrupted one, the second step lowers no program (on two devices: none after the second,
as for plain optax, whose first step meets its state's placement on one device).
"""

import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from flax.training import train_state

import jaxprune
from conftest import count_programs


class _Net(nn.Module):
  """Two dense layers. linen names modules in construction order: the output layer (built first)
  is ``Dense_0`` (16 x 3), the hidden layer ``Dense_1`` (6 x 16)."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))


_X = jax.random.normal(jax.random.key(0), (32, 6))
_Y = jnp.arange(32) % 3
_PARAMS = _Net().init(jax.random.key(1), _X[:1])["params"]
_KERNELS = 6 * 16 + 16 * 3


def _loss(params, x, y):
  logits = _Net().apply({"params": params}, x.astype(jax.tree.leaves(params)[0].dtype))
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _train_step(state, x, y):
  return state.apply_gradients(grads=jax.grad(_loss)(state.params, x, y))


def _copy(tree):
  """Fresh buffers: a step jitted with ``donate_argnums`` frees the state it is given."""
  return jax.tree.map(jnp.copy, tree)


def _masked_nonzero(params, masks) -> int:
  return sum(int(np.sum(np.asarray(p.astype(jnp.float32))[~np.asarray(m)] != 0))
             for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)))


def _kernel_zeros(masks) -> int:
  return sum(int(np.sum(~np.asarray(m))) for m in jax.tree.leaves(masks) if np.ndim(m) == 2)


def _bitwise(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      np.asarray(u).dtype == np.asarray(v).dtype and np.array_equal(u, v) for u, v in zip(la, lb))


def test_fixed_masks_stay_zero_under_every_common_optax_wrapper_bf16_and_donation():
  _, masks = jaxprune.prune_to_sparsity(_PARAMS, None, 0.5, scope="layer")
  labels = jax.tree.map(lambda a: "k" if a.ndim == 2 else "b", _PARAMS)
  optimizers = {
      "adamw": lambda: optax.adamw(1e-2, weight_decay=0.1),
      "nesterov": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
      "clip_adam": lambda: optax.chain(optax.clip_by_global_norm(0.1), optax.adam(1e-2)),
      "multi": lambda: optax.multi_transform(
          {"k": optax.adam(1e-2), "b": optax.sgd(0.1, momentum=0.9)}, labels),
      "inject": lambda: optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2,
                                                             weight_decay=0.1),
      "multisteps": lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2),
      "finite": lambda: optax.apply_if_finite(optax.adam(1e-2), 3),
  }
  wrappers = {"keep": lambda tx: optax.chain(tx, jaxprune.keep_masked(masks)),
              "masked": lambda tx: jaxprune.masked_optimizer(tx, masks)}
  f32, bf16 = jnp.float32, jnp.bfloat16
  cases = [("adamw", "keep", f32), ("adamw", "masked", f32), ("nesterov", "masked", f32),
           ("clip_adam", "keep", f32), ("clip_adam", "masked", f32), ("multi", "masked", f32),
           ("inject", "keep", f32), ("multisteps", "keep", f32), ("finite", "masked", f32),
           ("adamw", "keep", bf16), ("nesterov", "masked", bf16)]
  for name, wrap, dtype in cases:
    tx = wrappers[wrap](optimizers[name]())
    state = train_state.TrainState.create(
        apply_fn=None, params=_copy(jax.tree.map(lambda a: a.astype(dtype), _PARAMS)), tx=tx)
    step = jax.jit(_train_step, donate_argnums=0)
    lowered = []
    for _ in range(4):
      with count_programs() as n:
        state = step(state, _X, _Y)
      lowered.append(n[0])
      # Zero from the first step on: keep_masked / masked_optimizer sit outside MultiSteps and
      # apply_if_finite here, so the first applied update is the first call's.
      assert _masked_nonzero(state.params, masks) == 0, (name, wrap, dtype)
    assert lowered == [1, 0, 0, 0], (name, wrap, dtype, lowered)
    assert {a.dtype for a in jax.tree.leaves(state.params)} == {jnp.dtype(dtype)}
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(state.params))
    assert _bitwise(jaxprune.masks_of(state), masks)   # the user's masks survived donation
    if wrap == "masked" and name in ("adamw", "clip_adam", "finite"):
      # The inner optimizer never saw a masked weight's gradient: its moments there are 0.
      mu = [s.mu for s in jax.tree.leaves(
          state.opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]
      assert len(mu) == 1 and _masked_nonzero(mu[0], masks) == 0, name


def test_gradual_in_a_train_state_schedule_scan_orbax_resume_and_one_program(tmp_path):
  tx = jaxprune.gradual(
      optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1)),
      sparsity=0.75, begin_step=2, end_step=8, frequency=2)
  create = lambda p: train_state.TrainState.create(apply_fn=None, params=p, tx=tx)
  step = jax.jit(_train_step)
  # The documented counts round(s_t * 144) at t = 2, 4, 6, 8: s_t = 0, 0.5278, 0.7222, 0.75.
  expected = [round(float(jaxprune.polynomial_sparsity(t, final=0.75, begin_step=2, end_step=8))
                    * _KERNELS) for t in (2, 4, 6, 8)]
  assert expected == [0, 76, 104, 108]
  state, zeros, lowered = create(_PARAMS), [], []
  for i in range(12):
    with count_programs() as n:
      state = step(state, _X, _Y)
    lowered.append(n[0])
    masks = jaxprune.masks_of(state)
    zeros.append(_kernel_zeros(masks))
    assert _masked_nonzero(state.params, masks) == 0, i
    if i == 4:
      middle = state
  assert lowered == [1] + [0] * 11
  # Update t (call t + 1) prunes with the params it is handed: the counts change at t = 4, 6, 8.
  assert zeros == [0, 0, 0, 0, 76, 76, 104, 104, 108, 108, 108, 108]
  full = state

  # orbax in the middle of training, restored into an abstract state from eval_shape.
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", middle)
  checkpointer.wait_until_finished()
  abstract = jax.eval_shape(create, _PARAMS)
  restored = checkpointer.restore(tmp_path / "ckpt", abstract)
  assert _bitwise(restored.opt_state, middle.opt_state)
  assert int(restored.opt_state.count) == 5
  for _ in range(7):
    restored = step(restored, _X, _Y)
  assert _bitwise(restored.params, full.params) and _bitwise(restored.opt_state, full.opt_state)

  # The same 12 steps as one lax.scan: the same masks, the same count.
  scanned = jax.jit(lambda s: jax.lax.scan(lambda c, _: (_train_step(c, _X, _Y), None), s,
                                           None, length=12)[0])(create(_PARAMS))
  assert _bitwise(jaxprune.masks_of(scanned), jaxprune.masks_of(full))
  assert int(scanned.opt_state.count) == 12
  assert _masked_nonzero(scanned.params, jaxprune.masks_of(scanned)) == 0
  for a, b in zip(jax.tree.leaves(scanned.params), jax.tree.leaves(full.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_gradual_under_nnx_multisteps_and_apply_if_finite_counts_optimizer_steps():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(6, 16, rngs=rngs)
      self.l2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.l1(x)))

  schedule = dict(sparsity=0.5, begin_step=1, end_step=3, frequency=1)
  net = Net(nnx.Rngs(0))
  opt = nnx.Optimizer(net, optax.MultiSteps(jaxprune.gradual(optax.adam(1e-2), **schedule),
                                            every_k_schedule=3), wrt=nnx.Param)

  @nnx.jit(donate_argnums=(0, 1))
  def nnx_step(net, opt, x, y):
    grads = nnx.grad(lambda n: optax.softmax_cross_entropy_with_integer_labels(n(x), y).mean())(
        net)
    opt.update(net, grads)

  zeros, lowered = [], []
  for _ in range(12):
    with count_programs() as n:
      nnx_step(net, opt, _X, _Y)
    lowered.append(n[0])
    masks = jaxprune.masks_of(opt)
    zeros.append(_kernel_zeros(masks))
    assert _masked_nonzero(nnx.state(net, nnx.Param), masks) == 0
  assert lowered == [1] + [0] * 11
  # gradual's update t is call 3 (t + 1) - 1: t = 2 (call 8) prunes round(0.4375 * 144) = 63,
  # t = 3 (call 11) reaches round(0.5 * 144) = 72.
  assert zeros == [0] * 8 + [63] * 3 + [72]

  # apply_if_finite: a skipped (non-finite) step does not advance the schedule.
  tx = optax.apply_if_finite(jaxprune.gradual(optax.adam(1e-2), **schedule), 5)

  @jax.jit
  def scaled_step(p, s, scale):
    g = jax.tree.map(lambda a: a * scale, jax.grad(_loss)(p, _X, _Y))
    u, s = tx.update(g, s, p)
    return optax.apply_updates(p, u), s

  p, s, zeros = _PARAMS, tx.init(_PARAMS), []
  for scale in (1.0, np.nan, 1.0, np.inf, 1.0, 1.0):
    p, s = scaled_step(p, s, jnp.float32(scale))
    zeros.append(_kernel_zeros(jaxprune.masks_of(s)))
    assert all(bool(jnp.all(jnp.isfinite(a))) for a in jax.tree.leaves(p))
    assert _masked_nonzero(p, jaxprune.masks_of(s)) == 0
  assert zeros == [0, 0, 0, 0, 63, 72] and int(s.inner_state.count) == 4


_TWO_DEVICES = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxprune
    from jaxprune import ga
    assert jax.device_count() == 2, jax.devices()
    lowered = [0]
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, *a, **k: lowered.__setitem__(0, lowered[0] + (
            name == "/jax/core/compile/jaxpr_to_mlir_module_duration")))
    mesh = Mesh(np.array(jax.devices()), ("d",))
    model = jaxprune.MLP(in_features=6, hidden=(8,), out_features=4)
    one = model.init(jax.random.key(0))
    kernel, bias = one["params"]["hidden_0"]["kernel"], one["params"]["hidden_0"]["bias"]
    one["params"]["hidden_0"]["kernel"] = kernel.at[:, 5].set(kernel[:, 1])   # a duplicate
    one["params"]["hidden_0"]["bias"] = bias.at[5].set(bias[1])
    x = jax.random.normal(jax.random.key(1), (64, 6))
    y = jax.random.randint(jax.random.key(2), (64,), 0, 4)
    # Tensor-parallel params (units split over the devices), data-parallel inputs.
    two = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(
        mesh, P(*([None] * (a.ndim - 1) + ["d"])))), one)
    x2 = jax.device_put(x, NamedSharding(mesh, P("d")))

    def same(a, b):
      la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
      return len(la) == len(lb) and all(np.array_equal(u, v, equal_nan=True)
                                        for u, v in zip(la, lb))

    units = jaxprune.unit_masks_ones(model)
    pruners = {
        "magnitude": lambda p, x: jaxprune.magnitude_prune(p, None, 0.5),
        "magnitude_global": lambda p, x: jaxprune.magnitude_prune(p, None, 0.5, scope="global"),
        "random": lambda p, x: jaxprune.random_prune(p, None, 0.5, key=jax.random.key(3)),
        "to_sparsity": lambda p, x: jaxprune.prune_to_sparsity(p, None, 0.5),
        "block": lambda p, x: jaxprune.block_prune(p, None, 0.5, block=(2, 2)),
        "nm": lambda p, x: jaxprune.nm_prune(p, None, n=2, m=4, select=["params/out/kernel"]),
        "importance": lambda p, x: jaxprune.importance_prune(model, "hidden_0")(p, units, 3),
        "distinctiveness": lambda p, x: jaxprune.distinctiveness(model, "hidden_0")(
            p, units, model.activations(p, x, "hidden_0"), 60.0, 120.0),
        "weight_distinctiveness": lambda p, x: jaxprune.weight_distinctiveness(
            model, "hidden_0")(p, units, 60.0, 120.0),
    }

    def on_both(tree):
      return all(len(l.sharding.device_set) == 2 for l in jax.tree.leaves(tree))

    for name, prune in pruners.items():
      a, b = prune(one, x), prune(two, x2)
      assert same(a, b), name
      # Every param, and the mask of every leaf the pruner selects (the kernels), stays sharded.
      kept = (b[1] if name in ("importance", "distinctiveness", "weight_distinctiveness") else
              b[1]["params"]["out"]["kernel"] if name == "nm" else
              [m for m, p in zip(jax.tree.leaves(b[1]), jax.tree.leaves(b[0])) if p.ndim == 2])
      assert on_both(b[0]) and on_both(kept), name
    _, merged, _ = pruners["distinctiveness"](two, x2)
    assert not bool(merged["hidden_0"][5]) and bool(merged["hidden_0"][1])   # duplicate merged

    config = ga.GAConfig(population_size=8, generations=3)
    kw = dict(key=jax.random.key(5), config=config, progress=False)
    single = ga.search(model, one, x, y, "hidden_0", shard=False, **kw)
    for params, data in ((two, x), (two, x2)):
      # Every field but the population mean, a float sum XLA may order otherwise when sharded.
      got = ga.search(model, params, data, y, "hidden_0", **kw)
      assert same(got._replace(history=got.history._replace(mean=None)),
                  single._replace(history=single.history._replace(mean=None)))
      np.testing.assert_allclose(got.history.mean, single.history.mean, rtol=1e-6)

    # A user's jitted step on the sharded params: gradual prunes at its first update (from the
    # same params on one device or two: the same masks), and after the step that meets the
    # sharded outputs nothing more is lowered, as for plain optax.adam.
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply(p, x2), y).mean()
    counts, results = {}, {}
    for name, tx in (("adam", optax.adam(1e-2)),
                     ("gradual", jaxprune.gradual(optax.adamw(1e-2, weight_decay=0.1),
                                                  sparsity=0.5, initial_sparsity=0.5,
                                                  begin_step=0, end_step=1, frequency=1))):
      @jax.jit
      def step(p, s):
        updates, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, updates), s
      for where, p in (("one", one), ("two", two))[name == "adam":]:
        s, per = tx.init(p), []
        for _ in range(5):
          start = lowered[0]
          p, s = step(p, s)
          per.append(lowered[0] - start)
        counts[name, where], results[name, where] = per, (p, s)
    assert counts["gradual", "two"] == counts["adam", "two"], counts
    assert sum(counts["gradual", "two"][2:]) == 0, counts
    p, s = results["gradual", "two"]
    masks = jaxprune.masks_of(s)
    assert same(masks, jaxprune.masks_of(results["gradual", "one"][1]))
    assert sum(int(np.sum(~np.asarray(m))) for m in jax.tree.leaves(masks)) == 40   # of 80
    assert all(int(np.sum(np.asarray(a)[~np.asarray(m)] != 0)) == 0
               for a, m in zip(jax.tree.leaves(p), jax.tree.leaves(masks)))
    assert all(len(a.sharding.device_set) == 2 for a in jax.tree.leaves(p))
    print("TWO_DEVICES_OK", counts)
""")


def test_pruners_ga_and_gradual_on_params_sharded_over_two_devices():
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAXPRUNE_SUITE_XLA_CACHE="off")
  env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
  proc = subprocess.run([sys.executable, "-c", _TWO_DEVICES], env=env, capture_output=True,
                        text=True, timeout=600, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "TWO_DEVICES_OK" in proc.stdout, proc.stdout[-3000:]
