"""Tests for jaxprune.pruners.magnitude: exact counts, ties, repeated calls, random baseline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
from jaxprune.pruners.magnitude import magnitude_prune, random_prune, select_leaves


def _tree(key=0):
  k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
  return {"params": {
      "conv": {"kernel": jax.random.normal(k1, (3, 3, 2, 4)), "bias": jnp.ones(4)},
      "dense": {"kernel": jax.random.normal(k2, (36, 10)), "bias": jnp.ones(10)},
      "out": {"kernel": jax.random.normal(k3, (10, 3)), "bias": jnp.ones(3)}}}


def _numpy_layer(w, keep, fraction):
  """Reference: remove round(f * remaining) smallest |w| among kept, ties by flat index."""
  w, keep = np.asarray(w).ravel(), np.asarray(keep).ravel().copy()
  k = int(np.round(np.float32(fraction) * np.float32(keep.sum())))
  order = np.lexsort((np.arange(w.size), np.abs(w)))
  order = order[keep[order]]
  keep[order[:k]] = False
  return keep


def test_exact_counts_per_layer_and_repeated():
  p = _tree()
  m = None
  ref = {n: np.ones(np.shape(p["params"][n]["kernel"]), bool).ravel()
         for n in ("conv", "dense", "out")}
  for _ in range(3):
    q, m, _ = magnitude_prune(p, m, 0.3)
    for n in ref:
      ref[n] = _numpy_layer(p["params"][n]["kernel"], ref[n], 0.3)
      np.testing.assert_array_equal(np.asarray(m["params"][n]["kernel"]).ravel(), ref[n])
      np.testing.assert_array_equal(m["params"][n]["bias"], True)  # biases untouched
  # 72 -> 50 -> 35 -> 24 kept in conv (remove round(0.3 x remaining) each time)
  assert int(m["params"]["conv"]["kernel"].sum()) == 72 - 22 - 15 - 10 == 25
  # Pruned weights are zero in the returned params, others unchanged.
  w = p["params"]["dense"]["kernel"]
  np.testing.assert_array_equal(q["params"]["dense"]["kernel"],
                                np.where(m["params"]["dense"]["kernel"], w, 0.0))


def test_global_counts_and_threshold():
  p = _tree(1)
  q, m, _ = magnitude_prune(p, None, 0.6, scope="global")
  ws = [np.asarray(p["params"][n]["kernel"]).ravel() for n in ("conv", "dense", "out")]
  ms = [np.asarray(m["params"][n]["kernel"]).ravel() for n in ("conv", "dense", "out")]
  allw, allm = np.concatenate(ws), np.concatenate(ms)
  assert allm.size - allm.sum() == round(0.6 * allw.size)
  assert np.abs(allw[~allm]).max() <= np.abs(allw[allm]).min()
  # Repeated global call prunes 0.6 of what is left.
  _, m2, _ = magnitude_prune(p, m, 0.6, scope="global")
  kept = int(sum(np.sum(m2["params"][n]["kernel"]) for n in ("conv", "dense", "out")))
  assert kept == allm.sum() - round(0.6 * allm.sum())


def test_ties_broken_by_position_exact_count():
  p = {"params": {"a": {"kernel": jnp.array([[3., 1., 2.], [1., 5., 0.5]])},
                  "b": {"kernel": jnp.ones((2, 2))}}}
  _, m, _ = magnitude_prune(p, None, 0.5, scope="global")  # remove 5 of 10: 0.5 then four 1s
  np.testing.assert_array_equal(m["params"]["a"]["kernel"], [[1, 0, 1], [0, 1, 0]])
  np.testing.assert_array_equal(m["params"]["b"]["kernel"], [[0, 0], [1, 1]])
  _, m, _ = magnitude_prune(p, None, 0.5)
  np.testing.assert_array_equal(m["params"]["b"]["kernel"], [[0, 0], [1, 1]])
  _, m, _ = magnitude_prune(p, None, 0.0)
  assert all(bool(np.all(x)) for x in jax.tree.leaves(m))
  _, m, _ = magnitude_prune(p, None, 1.0, scope="global")
  assert not any(bool(np.any(x)) for x in jax.tree.leaves(m))


def test_random_same_counts_and_key_dependence():
  p = _tree(2)
  _, mm, _ = magnitude_prune(p, None, 0.45)
  _, r1, _ = random_prune(p, None, 0.45, key=jax.random.key(1))
  _, r2, _ = random_prune(p, None, 0.45, key=jax.random.key(2))
  for n in ("conv", "dense", "out"):
    assert int(r1["params"][n]["kernel"].sum()) == int(mm["params"][n]["kernel"].sum())
  assert not np.array_equal(r1["params"]["dense"]["kernel"], r2["params"]["dense"]["kernel"])
  assert not np.array_equal(r1["params"]["dense"]["kernel"], mm["params"]["dense"]["kernel"])
  _, rg, _ = random_prune(p, None, 0.45, key=jax.random.key(1), scope="global")
  total = sum(np.size(p["params"][n]["kernel"]) for n in ("conv", "dense", "out"))
  kept = sum(int(rg["params"][n]["kernel"].sum()) for n in ("conv", "dense", "out"))
  assert total - kept == round(0.45 * total)


def test_select_and_vmap_over_fractions():
  p = _tree(3)
  assert len(select_leaves(p)) == 3
  _, m, _ = magnitude_prune(p, None, 0.5, select=["params/dense/kernel", ("params", "out", "bias")])
  assert bool(np.all(m["params"]["conv"]["kernel"]))
  assert int(m["params"]["out"]["bias"].sum()) == 1  # 3 -> remove round(1.5) = 2
  _, m, _ = magnitude_prune(p, None, 0.5, select=lambda path, leaf: path[1] == "conv")
  assert int(m["params"]["conv"]["kernel"].sum()) == 36 and int(m["params"]["conv"]["bias"].sum()) == 2
  fr = jnp.array([0.1, 0.5, 0.9])
  _, vm, _ = jax.vmap(lambda f: magnitude_prune(p, None, f, scope="global"))(fr)
  for n, f in enumerate(fr):
    _, lm, _ = magnitude_prune(p, None, float(f), scope="global")
    for a, b in zip(jax.tree.leaves(vm), jax.tree.leaves(lm)):
      np.testing.assert_array_equal(a[n], b)


def test_select_by_int_keys_and_indices():
  """Params keyed by ints (an nnx Sequential's layers) or held in lists are selected by the
  keys as they are, or by their 'a/0/b' names."""
  k = jnp.arange(12.0).reshape(3, 4)
  p = {"layers": {0: {"kernel": k}, 2: {"kernel": k + 1}}, "extra": [k, k]}
  for sel in ([("layers", 2, "kernel"), ("extra", 1)], ["layers/2/kernel", "extra/1"]):
    _, m, _ = magnitude_prune(p, None, 0.5, select=sel)
    assert bool(np.all(m["layers"][0]["kernel"])) and bool(np.all(m["extra"][0]))
    assert int(m["layers"][2]["kernel"].sum()) == 6 and int(m["extra"][1].sum()) == 6


def test_report_on_hand_built_arrays():
  p = {"params": {"a": {"kernel": jnp.array([[3., 1., 2.], [1., 5., 0.5]])},
                  "b": {"kernel": jnp.array([[2., 4.], [-6., 8.]])}}}
  # Per layer: a loses 0.5 and both 1s (cut 1), b loses 2 and 4 (cut 4).
  _, m, rep = magnitude_prune(p, None, 0.5)
  assert rep.kept.tolist() == [3, 2] and rep.removed.tolist() == [3, 2]
  assert rep.threshold.tolist() == [1.0, 4.0] and int(rep.count) == 5
  # Again on what is left: a removes round(1.5) = 2 of (3, 2, 5), b 1 of (-6, 8).
  _, m, rep = magnitude_prune(p, m, 0.5)
  assert rep.kept.tolist() == [1, 1] and rep.removed.tolist() == [2, 1]
  assert rep.threshold.tolist() == [3.0, 6.0] and int(rep.count) == 3
  # Global: the 5 smallest of all 10 are 0.5, 1, 1, 2 (a) and 2 (b): one shared cut.
  _, _, rep = magnitude_prune(p, None, 0.5, scope="global")
  assert rep.kept.tolist() == [2, 3] and rep.removed.tolist() == [4, 1]
  assert rep.threshold.tolist() == [2.0, 2.0] and int(rep.count) == 5
  # Nothing removed: no cut.
  _, _, rep = magnitude_prune(p, None, 0.0)
  assert rep.removed.tolist() == [0, 0] and np.isnan(rep.threshold).all()
  # Random: the same counts; its cut is a uniform score in [0, 1).
  _, rm, rep = random_prune(p, None, 0.5, key=jax.random.key(0))
  assert rep.kept.tolist() == [3, 2] and rep.removed.tolist() == [3, 2]
  assert bool(np.all((rep.threshold >= 0) & (rep.threshold < 1)))
  # The report counts agree with the masks, also under vmap over the fraction.
  _, vm, vrep = jax.vmap(lambda f: magnitude_prune(p, None, f))(jnp.array([0.25, 0.75]))
  for i in range(2):
    assert vrep.kept[i].tolist() == [int(vm["params"]["a"]["kernel"][i].sum()),
                                     int(vm["params"]["b"]["kernel"][i].sum())]


def test_bad_input():
  p = _tree()
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    magnitude_prune(p, None, 1.5)
  with pytest.raises(ValueError, match=r"\[0, 1\]"):
    random_prune(p, None, -0.1, key=jax.random.key(0))
  with pytest.raises(ValueError, match="scope"):
    magnitude_prune(p, None, 0.1, scope="model")
  with pytest.raises(KeyError, match="No parameter"):
    magnitude_prune(p, None, 0.1, select=["params/nope/kernel"])
  with pytest.raises(ValueError, match="structure"):
    magnitude_prune(p, {"params": {}}, 0.1)
  bad = jax.tree.map(lambda a: a, p)
  bad["params"]["out"] = dict(bad["params"]["out"], kernel=p["params"]["out"]["kernel"].at[0, 0].set(jnp.nan))
  with pytest.raises(ValueError, match="NaN"):
    magnitude_prune(bad, None, 0.1)


def test_default_selection_leaves_2d_biases_alone():
  """A DenseGeneral's bias is 2-D: the default selection (ndim >= 2) pruned half of it; biases
  and norm params are not weights, whatever their rank."""
  import flax.linen as nn
  m = nn.DenseGeneral(features=(2, 3))
  p = m.init(jax.random.key(0), jnp.ones((1, 4)))
  assert p["params"]["bias"].shape == (2, 3)
  new, masks, _ = magnitude_prune(p, jax.tree.map(lambda l: jnp.ones(l.shape, bool), p), 0.5)
  assert bool(masks["params"]["bias"].all()) and not bool(masks["params"]["kernel"].all())


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_float64_weights_rank_at_full_precision(scope):
  """Under jax_enable_x64 float64 weights were ranked through float32 bit patterns: weights
  differing beyond float32 precision tied, and position, not magnitude, chose the cut."""
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    # Magnitudes 1 + j * 1e-12 in a shuffled order: all equal in float32.
    p = {"a": {"kernel": 1.0 + rng.permutation(12).reshape(3, 4) * 1e-12},
         "b": {"kernel": -(1.0 + (12 + rng.permutation(6)).reshape(2, 3) * 1e-12)}}
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), p)
    for fraction in (0.25, 0.5, 0.75):
      q, m, rep = magnitude_prune(p, None, fraction, scope=scope)
      if scope == "layer":
        for n in ("a", "b"):
          want = _numpy_layer(p[n]["kernel"], np.ones(p[n]["kernel"].shape, bool), fraction)
          np.testing.assert_array_equal(np.asarray(m[n]["kernel"]).ravel(), want)
      else:
        w = np.concatenate([np.asarray(p[n]["kernel"]).ravel() for n in ("a", "b")])
        keep = np.concatenate([np.asarray(m[n]["kernel"]).ravel() for n in ("a", "b")])
        assert keep.size - keep.sum() == round(fraction * 18)
        assert np.abs(w[~keep]).max() < np.abs(w[keep]).min()
      assert q["a"]["kernel"].dtype == jnp.float64
      # The cut in float64 too: rounded to float32 it read 1.0, above the kept weights.
      assert rep.threshold.dtype == jnp.float64
      for n, cut in zip(("a", "b"), np.asarray(rep.threshold)):
        w, keep = np.abs(np.asarray(p[n]["kernel"])), np.asarray(m[n]["kernel"])
        if scope == "layer":
          assert cut == w[~keep].max()
        assert (w[keep] >= cut).all() and cut < 1.0 + 18e-12


def test_invalid_traced_fractions_remove_nothing():
  """docs/errors.md: under vmap/jit a fraction outside [0, 1] or NaN cannot raise; it removes
  nothing (every mask all True), while the valid fractions beside it prune as eagerly."""
  model = jaxprune.MLP(in_features=4, hidden=(12,), out_features=3)
  params = model.init(jax.random.key(0))
  fractions = jnp.asarray([0.2, -0.5, 1.5, jnp.nan])
  masks, reports = jax.vmap(lambda f: magnitude_prune(params, None, f)[1:])(fractions)
  for i in (1, 2, 3):
    assert all(bool(np.all(np.asarray(m[i]))) for m in jax.tree.leaves(masks))
  np.testing.assert_array_equal(reports.invalid, [False, True, True, True])
  np.testing.assert_array_equal(reports.count[1:], [0, 0, 0])
  # NaN weights cannot raise under jit either: nothing removed, invalid set (eagerly: ValueError).
  bad = jax.tree.map(lambda a: a, params)
  bad["params"]["hidden_0"]["kernel"] = bad["params"]["hidden_0"]["kernel"].at[1, 2].set(jnp.nan)
  _, m, rep = jax.jit(lambda p: magnitude_prune(p, None, 0.5))(bad)
  assert bool(rep.invalid) and int(rep.count) == 0
  assert all(bool(np.all(np.asarray(leaf))) for leaf in jax.tree.leaves(m))
  assert not bool(magnitude_prune(params, None, 0.5)[2].invalid)
  with pytest.raises(ValueError, match="NaN or infinite"):
    magnitude_prune(bad, None, 0.5)
  eager = magnitude_prune(params, None, 0.2)[1]
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(masks)):
    np.testing.assert_array_equal(a, b[0])
  assert not all(bool(np.all(np.asarray(m))) for m in jax.tree.leaves(eager))


def test_nan_weight_the_masks_already_remove_is_not_ranked():
  """A NaN where the masks already remove the weight is not ranked (the pruners refused it and
  advised select=, which would drop the whole layer); the result is that of any finite value
  there, with the weight zeroed. A NaN the masks keep still raises."""
  import jaxprune
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(8, 8)).astype(np.float32)
  masks = {"d": {"kernel": jnp.asarray(rng.random((8, 8)) > 0.3).at[0, 0].set(False)}}
  nan = {"d": {"kernel": jnp.asarray(kernel).at[0, 0].set(jnp.nan)}}
  finite = {"d": {"kernel": jnp.asarray(kernel).at[0, 0].set(123.0)}}
  calls = [lambda p: magnitude_prune(p, masks, 0.5)[:2],
           lambda p: magnitude_prune(p, masks, 0.5, scope="global")[:2],
           lambda p: jaxprune.prune_to_sparsity(p, masks, 0.6),
           lambda p: jaxprune.prune_to_sparsity(p, masks, 0.6, scope="layer"),
           lambda p: jaxprune.nm_prune(p, masks, 2, 4),
           lambda p: jaxprune.block_prune(p, masks, 0.5, block=(2, 2))]
  for call in calls:
    (p_nan, m_nan), (p_fin, m_fin) = call(nan), call(finite)
    for a, b in ((m_nan, m_fin), (p_nan, p_fin)):
      np.testing.assert_array_equal(np.asarray(a["d"]["kernel"]), np.asarray(b["d"]["kernel"]))
    assert float(p_nan["d"]["kernel"][0, 0]) == 0.0
  # masks traced (inside jit) with concrete scores: the check looks at every weight
  scores = {"d": {"kernel": np.abs(kernel)}}
  traced = jax.jit(lambda m: jaxprune.prune_to_sparsity(finite, m, 0.6, scores=scores)[1])(masks)
  np.testing.assert_array_equal(np.asarray(traced["d"]["kernel"]), np.asarray(
      jaxprune.prune_to_sparsity(finite, masks, 0.6, scores=scores)[1]["d"]["kernel"]))
  kept_nan = {"d": {"kernel": jnp.asarray(kernel).at[1, 1].set(jnp.nan)}}
  kept = {"d": {"kernel": masks["d"]["kernel"].at[1, 1].set(True)}}
  for call in (lambda: magnitude_prune(kept_nan, kept, 0.5),
               lambda: jaxprune.prune_to_sparsity(kept_nan, kept, 0.6)):
    with pytest.raises(ValueError, match="where the masks keep weights"):
      call()


def _mixed_dtype_tree():
  """Leaves of four float dtypes: large float32 weights, small float64 ones, bfloat16 and
  float16 between them, float32 subnormals between float64 ones, and values equal across
  dtypes (0.5 and 3.0: ties broken by tree order)."""
  return {"a32": jnp.array([[10., -20., 0.5], [30., 1e-40, 40.]], jnp.float32),
          "b64": jnp.array([[0.1, -0.2], [0.3, 0.4], [1e-41, 1e-39], [0.5, 3.0]], jnp.float64),
          "c16": jnp.array([[1., 2.], [-50., 60.]], jnp.bfloat16),
          "d16": jnp.array([[3., 0.5], [70., 0.05]], jnp.float16)}


def test_global_ranking_across_float_dtypes_under_x64():
  """Under jax_enable_x64 a global scope over float32 and float64 leaves compared the float32
  bit patterns, cast to int64, with the float64 ones: every float32 weight ranked below every
  float64 weight (the large float32 weights were removed, the small float64 ones kept, the
  threshold 0). The ranking is by |w| across every float dtype, ties by tree order then flat
  index, for magnitude_prune and prune_to_sparsity; random_prune removes the same counts."""
  with jax.enable_x64(True):
    p = _mixed_dtype_tree()
    leaves = jax.tree.leaves(p)
    w = np.abs(np.concatenate([np.asarray(l, np.float64).ravel() for l in leaves]))
    order = np.lexsort((np.arange(w.size), w))   # numpy widens subnormals exactly
    for fraction in (0.05, 0.25, 0.45, 0.5, 0.75):   # the cut: 0.05 between subnormals,
                                                      # 0.45 among the three 0.5s
      k = int(np.round(np.float32(fraction) * np.float32(w.size)))
      want = np.ones(w.size, bool)
      want[order[:k]] = False
      _, m, rep = magnitude_prune(p, None, fraction, scope="global")
      got = np.concatenate([np.asarray(l).ravel() for l in jax.tree.leaves(m)])
      np.testing.assert_array_equal(got, want)
      if w[order[k - 1]] >= np.finfo(np.float32).tiny:   # (XLA flushes a subnormal cut to 0)
        assert rep.threshold.dtype == jnp.float64   # a float64 leaf in scope: the cut in float64
        np.testing.assert_array_equal(rep.threshold, w[order[k - 1]])
      _, m2 = jaxprune.prune_to_sparsity(p, None, fraction)
      got2 = np.concatenate([np.asarray(l).ravel() for l in jax.tree.leaves(m2)])
      np.testing.assert_array_equal(got2, want)
      _, m3, rep3 = random_prune(p, None, fraction, key=jax.random.key(1), scope="global")
      assert int(rep3.count) == k == sum(int((~np.asarray(l)).sum())
                                         for l in jax.tree.leaves(m3))
    # The reported case: removing half (11 of 22) takes every weight below 1 (the three 0.5s
    # tie at the cut); the float32 weights of 10 or more stay, the small float64 ones go.
    _, m, rep = magnitude_prune(p, None, 0.5, scope="global")
    np.testing.assert_array_equal(m["a32"], [[True, True, False], [True, False, True]])
    np.testing.assert_array_equal(m["b64"], [[False] * 2] * 3 + [[False, True]])
    np.testing.assert_array_equal(rep.threshold, 0.5)


@pytest.mark.parametrize("sort_max", [0, 1 << 15], ids=["histograms", "sort"])
def test_both_selection_paths_remove_the_k_smallest_with_ties_to_the_lower_index(
    monkeypatch, sort_max):
  """Few weights are selected by one sort, many by two histogram passes (``_SORT_MAX``): both
  must remove exactly the k smallest kept weights, ties going to the lower flat index, against
  a NumPy stable sort. Values share their high 16 bits (the histograms' first pass) and repeat
  exactly (ties at the cut)."""
  from jaxprune.pruners import magnitude as mag  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(mag, "_SORT_MAX", sort_max)
  rng = np.random.default_rng(7)
  base = np.float32(0.75)
  shapes = [(6, 5), (7,), (3, 4)]
  vals = [np.where(rng.random(s) < 0.4, base,   # exact ties
                   np.nextafter(base, np.float32(1), dtype=np.float32)
                   * (1 + rng.integers(0, 40, s) * np.float32(2 ** -20))).astype(np.float32)
          for s in shapes]
  keep = [rng.random(s) < 0.8 for s in shapes]
  bits = [mag._bits(jnp.asarray(v)) for v in vals]
  flat_v = np.concatenate([v.reshape(-1) for v in vals])
  flat_k = np.concatenate([k.reshape(-1) for k in keep])
  order = np.lexsort((np.arange(flat_v.size), flat_v, ~flat_k))   # not kept last, then value
  run = jax.jit(lambda k: mag._remove_smallest_and_cut(bits, [jnp.asarray(m) for m in keep], k))
  for k in (0, 1, 5, 17, int(flat_k.sum())):
    removed, cut = run(jnp.int32(k))
    want = np.zeros(flat_v.size, bool)
    want[order[:k]] = True
    np.testing.assert_array_equal(np.concatenate([np.asarray(r).reshape(-1) for r in removed]),
                                  want)
    if k:
      assert float(cut) == flat_v[order[k - 1]]
    else:
      assert np.isnan(float(cut))
  # A size-0 leaf beside a real one (the sort of no weight has no cut): nothing of it removed.
  p = {"v": jnp.asarray(vals[0]), "w": jnp.zeros((0, 3))}
  for scope in ("layer", "global"):
    m = magnitude_prune(p, None, 0.5, scope=scope)[1]
    assert m["w"].shape == (0, 3) and int(m["v"].sum()) == vals[0].size - round(0.5 * 30)


def test_random_masks_batch_order_and_ga_draws_are_the_same_under_x64():
  """Under x64 the uniform draws were float64: the same key gave other random masks (36 of 72
  weights), another batch order in fit and another GA population. They are float32 draws now."""
  from jaxprune import ga  # pylint: disable=import-outside-toplevel
  model = jaxprune.MLP(in_features=3, hidden=(6,), out_features=2)
  x = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
  y = np.arange(12) % 2

  def run():
    params = model.init(jax.random.key(0))
    _, masks, _ = jaxprune.pruners.random_prune(params, None, 0.5, key=jax.random.key(1))
    trained, _ = jaxprune.fit(model, params, x, y, key=jax.random.key(2), epochs=1,
                              batch_size=4, progress=False)
    cfg = ga.GAConfig(population_size=6, hof_size=1, generations=1)
    pop = ga.initial_population(cfg, 6, key=jax.random.key(3))
    return masks, trained, pop, ga.mutate(jax.random.key(4), pop, 1.0, 0.5)
  off = run()
  with jax.enable_x64(True):
    on = run()
  for a, b in zip(jax.tree.leaves((off[0], off[2], off[3])), jax.tree.leaves((on[0], on[2],
                                                                             on[3]))):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(off[1]), jax.tree.leaves(on[1])):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_layer_threshold_of_a_subnormal_float32_cut_under_x64_and_wide_integer_leaves():
  """Under x64 with a float64 leaf in the selection, a float32 leaf's subnormal cut was
  reported as 0 (its float32 -> float64 conversion flushed it; the masks were right): it is
  widened through its bits now, as the global scope does. An int32 leaf chosen with select=
  was ranked by its float32 value (16777217 removed before 16777216): wide integers are
  refused, narrow ones (exact in float32) ranked."""
  with jax.enable_x64(True):
    p = {"d": jnp.asarray([[1.0, 2.0], [3.0, 4.0]], jnp.float64),
         "f": jnp.asarray([[1e-40, 1.0], [0.5, 2.0]], jnp.float32)}
    _, m, rep = magnitude_prune(p, None, 0.25, scope="layer")
    assert rep.threshold.dtype == jnp.float64
    np.testing.assert_array_equal(rep.threshold, [1.0, np.float64(np.float32(1e-40))])
    assert rep.threshold[1] > 0
    np.testing.assert_array_equal(m["f"], [[False, True], [True, True]])
    _, _, rep = magnitude_prune(p, None, 0.0, scope="layer")   # nothing removed: NaN cuts
    assert np.all(np.isnan(np.asarray(rep.threshold)))
  big = {"w": jnp.asarray([[16777217, 16777216]], jnp.int32)}
  with pytest.raises(ValueError, match=r"2\*\*24.*w \(int32\)"):
    magnitude_prune(big, None, 0.5, select="w")
  with pytest.raises(ValueError, match=r"2\*\*24.*w \(int32\)"):
    jaxprune.prune_to_sparsity(big, None, 0.5, select="w")
  for dtype in (jnp.int16, jnp.int32):   # values float32 holds exactly: ranked exactly
    small = {"w": jnp.asarray([[-300, 2, 7, -1]], dtype)}
    _, m, _ = magnitude_prune(small, None, 0.5, select="w")
    np.testing.assert_array_equal(m["w"], [[True, False, True, False]])
    _, m = jaxprune.prune_to_sparsity(small, None, 0.5, select="w")
    np.testing.assert_array_equal(m["w"], [[True, False, True, False]])
  # integer scores traced inside gradual's update (unreadable there) rank as float32 values
  import optax  # pylint: disable=import-outside-toplevel
  params = {"w": jnp.arange(1.0, 17.0).reshape(4, 4)}
  tx = jaxprune.gradual(optax.sgd(0.0), sparsity=0.5, begin_step=0, end_step=2, frequency=1,
                        scores=lambda p, g: jax.tree.map(lambda w: w.astype(jnp.int32), p))
  st = tx.init(params)
  for _ in range(3):   # past the schedule's end: half removed, the smallest scores first
    _, st = tx.update(jax.tree.map(jnp.zeros_like, params), st, params)
  np.testing.assert_array_equal(np.asarray(jaxprune.masks_of(st)["w"]).ravel(),
                                np.arange(16) >= 8)


def test_swapped_or_misplaced_arguments_are_named():
  """A float tree in the masks' place said only 'use mask.astype(bool)', which turns params
  into masks; a number there said 'unexpected leaves: ['']'."""
  p = _tree()
  with pytest.raises(ValueError, match="swapped"):
    magnitude_prune(jax.tree.map(lambda a: a != 0, p), p, 0.5)
  with pytest.raises(ValueError, match="one number.*fraction=0.5"):
    magnitude_prune(p, 0.5)
  with pytest.raises(ValueError, match="swapped"):
    jaxprune.rewind(p, p, p)


def test_counts_round_the_decimal_fraction_half_to_even():
  """round(fraction x remaining) of the fraction as written: float32 holds 0.59 as 0.58999997,
  so 0.59 x 50 = 29.5 computed as 29.499998 removed 29 (and 0.3 x 95 = 28.5 removed 29), where
  the decimal product rounds half to even to 30 (28). Every fraction k/100 at 1..1000 weights
  and k/1000 at 1..2048 against exact decimal arithmetic, large counts as float32 rounds them;
  then the pruners' own counts, one call and a vmapped sweep."""
  from fractions import Fraction
  from jaxprune.pruners import _common
  fr = np.arange(1, 100) / 100
  n = np.arange(1, 1001)
  got = np.asarray(jax.jit(jax.vmap(jax.vmap(_common.round_count, (None, 0)), (0, None)))(
      fr, n))
  want = np.array([[round(Fraction(k, 100) * int(m)) for m in n] for k in range(1, 100)])
  assert np.array_equal(got, want), np.argwhere(got != want)[:5]
  fr3 = np.arange(1, 1000) / 1000                           # 3 decimals, products below 2048
  n3 = np.arange(1, 2049)
  got = np.asarray(jax.jit(jax.vmap(jax.vmap(_common.round_count, (None, 0)), (0, None)))(
      fr3, n3))
  k3, m3 = np.meshgrid(np.arange(1, 1000), n3, indexing="ij")
  twice = 2 * k3 * m3                                        # 2000 x the exact product
  want = twice // 2000 + ((twice % 2000 > 1000) | ((twice % 2000 == 1000) & (twice // 2000 % 2
                                                                              == 1)))
  assert np.array_equal(got, want), np.argwhere(got != want)[:5]
  # large counts keep the float32 product's rounding (a snap there moved 1,048,577.25 to .5)
  for f, m, count in [(0.75, 1_398_103, 1_048_577), (0.25, 4_194_307, 1_048_577),
                      (0.5, 5_000_002, 2_500_001), (0.5, 4097, 2048), (0.5, 4099, 2050)]:
    assert int(_common.round_count(f, m)) == count
  for f, m, removed in [(0.59, 50, 30), (0.3, 95, 28), (0.7, 45, 32), (0.14, 75, 10)]:
    w = {"k": jnp.arange(1, m + 1, dtype=jnp.float32).reshape(m, 1)}
    assert int(magnitude_prune(w, None, f)[2].count) == removed
    assert int(random_prune(w, None, f, key=jax.random.key(0))[2].count) == removed
    sweep = jax.vmap(lambda q: magnitude_prune(w, None, q)[2].count)(jnp.asarray([f, 0.5]))
    assert sweep.tolist() == [removed, round(m / 2)]
