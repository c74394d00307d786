"""Sharded GA equals the one-device GA: run in a subprocess with 4 forced CPU devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=4`` must be set before JAX is imported, so
the comparison runs in a fresh interpreter.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    import jaxprune
    from jaxprune import ga
    assert jax.device_count() == 4, jax.devices()
    assert ga.default_mesh().size == 4 and ga.default_mesh(shard=False) is None
    model = jaxprune.MLP(in_features=6, hidden=(10,), out_features=4)
    params = model.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (48, 6))
    y = jax.random.randint(jax.random.key(2), (48,), 0, 4)

    def same(a, b):
      # Everything is bit-identical except the population mean, a float sum whose reduction
      # order XLA may choose differently in the partitioned program.
      a_mean, b_mean = a.history.mean, b.history.mean
      a = a._replace(history=a.history._replace(mean=None))
      b = b._replace(history=b.history._replace(mean=None))
      return (all(np.array_equal(u, v, equal_nan=True)
                  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
              and np.allclose(a_mean, b_mean, rtol=1e-6, atol=0))

    # 18 is not a multiple of 4 (padded for evaluation); 20 is.
    for pop, fast in ((18, "auto"), (20, False)):
      cfg = ga.GAConfig(population_size=pop, hof_size=3, generations=4)
      kw = dict(key=jax.random.key(3), config=cfg, fast_path=fast)
      sharded = ga.search(model, params, x, y, "hidden_0", progress=True, **kw)
      single = ga.search(model, params, x, y, "hidden_0", progress=False, shard=False, **kw)
      assert same(sharded, single), (pop, fast)
      # Without a display the sharded run computes its history after the scan.
      quiet = ga.search(model, params, x, y, "hidden_0", progress=False, **kw)
      assert same(quiet, single) and same(quiet, sharded), (pop, fast)
      assert len(quiet.history.mean.sharding.device_set) == 4
      assert len(sharded.mask.sharding.device_set) == 4   # replicated result on every device
      assert len(single.mask.sharding.device_set) == 1
    # The evaluation really is partitioned over the 4 devices.
    S = __import__("importlib").import_module("jaxprune.ga.loop")
    fit = ga.make_fitness(model, "hidden_0")
    data = fit.prepare(params, x, y)
    lowered = S.run_program(cfg, fit, 10, ga.default_mesh(), data).lower(
        cfg, fit, 10, False, ga.default_mesh(), ga.GAHyperparams(), data, jax.random.key(0))
    hlo = lowered.compile().as_text()
    # One device scores 20 / 4 = 5 individuals x 4 outputs: a (48, 20) product, not (48, 80).
    assert "f32[48,20]{1,0} dot(" in hlo and "f32[48,80]{1,0} dot(" not in hlo, hlo[:2000]
    print("SHARDED_OK")
""")


def test_sharded_equals_unsharded():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4")
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert "SHARDED_OK" in proc.stdout
  assert "gen 4/4" in proc.stderr   # the progress bar also works on several devices
