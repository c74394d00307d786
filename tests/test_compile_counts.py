"""How many XLA programs a first call compiles: ``until_stable`` (every sweep, the first
included, in one program) and eager ``apply_masks`` / ``zero_masked`` (one program per tree).

Each tiny program costs about 0.03-0.8 s of compilation on a CPU; these tests count the
programs lowered (a persistent compilation cache skips the compilation, never the lowering),
and check the results against references computed the plain way, bit for bit.
"""


import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxprune
import conftest
from conftest import count_programs, host_f32, run_fresh
from jaxprune import _compile
from jaxprune import masks as masks_lib
from jaxprune.pruners import distinctiveness, until_stable, weight_distinctiveness
from jaxprune.pruners.selection import CONSTANT

def _bits(tree):
  """Leaves as (path, dtype, shape, bytes): equal only if bit for bit equal."""
  return [(jax.tree_util.keystr(k), np.asarray(x).dtype, np.shape(x), np.asarray(x).tobytes())
          for k, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _sweeps_by_hand(prune, params, unit_masks, *args, max_sweeps=None, **kwargs):
  """The reference: ordinary calls of ``prune`` until a sweep removes nothing (a sweep whose
  one action is keeping back the last, constant unit removes nothing)."""
  sweeps = actions = 0
  invalid = None
  while True:
    params, unit_masks, r = prune(params, unit_masks, *args, **kwargs)
    sweeps += 1
    invalid = bool(r.invalid) if invalid is None else invalid
    n = int(r.count)
    if bool(r.kept_last) and n == 1 and int(r.kind[0]) == CONSTANT:
      n = 0
    actions += n
    if n == 0 or sweeps == max_sweeps:
      return params, unit_masks, (sweeps, actions, n == 0 and not invalid, invalid)


def _report(rep):
  return (int(rep.sweeps), int(rep.actions), bool(rep.stable), bool(rep.invalid))


# A model of its own (odd widths): no other test compiles its programs first in this process.
@pytest.fixture(scope="module")
def net():
  model = jaxprune.MLP(in_features=5, hidden=(11,), out_features=3, activation="tanh")
  params = model.init(jax.random.key(3))
  x = np.asarray(jax.random.normal(jax.random.key(4), (23, 5)))
  acts = np.asarray(model.activations(params, x, "hidden_0"))
  return model, params, acts


def _pruner(model, by):
  if by == "weights":
    return weight_distinctiveness(model, "hidden_0", complementary=False), ()
  return distinctiveness(model, "hidden_0", complementary=False), None


def _args(by, acts, angle):
  return (angle,) if by == "weights" else (acts, angle)


@pytest.mark.parametrize("by", ["weights", "activations"])
def test_until_stable_compiles_one_program_and_equals_sweeps_by_hand(net, by):
  """The first sweep was an ordinary call (its sweep compiled alone, then again inside the
  loop, plus a few small eager programs on its report): 9-10 programs. Now one."""
  model, params, acts = net
  prune, _ = _pruner(model, by)
  ones = jaxprune.unit_masks_ones(model)
  with count_programs() as n:
    p, m, rep = until_stable(prune, params, ones, *_args(by, acts, 75.0))
    jax.block_until_ready((p, m, rep))
  assert n == [1]
  want_p, want_m, want_rep = _sweeps_by_hand(prune, params, ones, *_args(by, acts, 75.0))
  assert want_rep[0] >= 3 and want_rep[2]   # several sweeps, then stable
  assert _report(rep) == want_rep
  assert _bits(p) == _bits(want_p) and _bits(m) == _bits(want_m)
  # A first sweep that acts on nothing: one sweep, stable, the ordinary call's params.
  with count_programs() as n:
    p, m, rep = until_stable(prune, params, ones, *_args(by, acts, 1.0))
  assert n == [0]   # the same program: the angle is traced
  want_p, want_m, _ = prune(params, ones, *_args(by, acts, 1.0))
  assert _report(rep) == (1, 0, True, False)
  assert _bits(p) == _bits(want_p) and _bits(m) == _bits(want_m)


def test_until_stable_max_sweeps_and_sample_weight(net):
  model, params, acts = net
  prune, _ = _pruner(model, "activations")
  ones = jaxprune.unit_masks_ones(model)
  for kwargs in ({"max_sweeps": 2}, {"sample_weight": np.linspace(0.0, 2.0, acts.shape[0])}):
    with count_programs() as n:
      p, m, rep = until_stable(prune, params, ones, acts, 75.0, **kwargs)
    # with weights: one more, validate.check_sample_weight's jnp.asarray of the weights
    assert n == [2 if "sample_weight" in kwargs else 1]
    want_p, want_m, want_rep = _sweeps_by_hand(prune, params, ones, acts, 75.0, **kwargs)
    assert _report(rep) == want_rep
    assert _bits(p) == _bits(want_p) and _bits(m) == _bits(want_m)
    if "max_sweeps" in kwargs:
      assert want_rep[0] == 2 and not want_rep[2]   # stopped while still acting
  # A bound beyond the int32 counter is no bound (it was an OverflowError from jit).
  p, m, rep = until_stable(prune, params, ones, acts, 75.0, max_sweeps=2**40)
  want_p, want_m, want_rep = _sweeps_by_hand(prune, params, ones, acts, 75.0)
  assert _report(rep) == want_rep and _bits(m) == _bits(want_m)


def test_until_stable_params_whose_types_a_sweep_changes(net):
  """A bfloat16 bias read with a float32 kernel leaves the sweep as float32 (the constants'
  fold adds float32 contributions): the loop's carry cannot start from it, so the first sweep
  runs before the loop (in the same program), as in the ordinary first call."""
  model, params, acts = net
  params = jax.tree.map(lambda x: x, params)
  params["params"]["out"]["bias"] = params["params"]["out"]["bias"].astype(jnp.bfloat16)
  prune, _ = _pruner(model, "activations")
  ones = jaxprune.unit_masks_ones(model)
  assert prune(params, ones, acts, 75.0)[0]["params"]["out"]["bias"].dtype == jnp.float32
  p, m, rep = until_stable(prune, params, ones, acts, 75.0)
  want_p, want_m, want_rep = _sweeps_by_hand(prune, params, ones, acts, 75.0)
  assert _report(rep) == want_rep and want_rep[0] >= 3
  assert _bits(p) == _bits(want_p) and _bits(m) == _bits(want_m)


def test_until_stable_under_jit_and_vmap_equals_the_first_call_then_loop_path(net):
  """Traced thresholds and params: the same as the path a wrapper function still takes (an
  ordinary first call, then the loop)."""
  model, params, _ = net
  prune, _ = _pruner(model, "weights")
  ones = jaxprune.unit_masks_ones(model)
  wrapper = lambda *a, **k: prune(*a, **k)   # not a library pruner: the first-call path

  def run(fn):
    return jax.jit(jax.vmap(lambda p, s: until_stable(fn, p, ones, s), in_axes=(None, 0)))(
        params, jnp.asarray([1.0, 60.0, 75.0]))

  new, old = run(prune), run(wrapper)
  assert _bits(new) == _bits(old)
  assert np.asarray(new[2].sweeps).tolist()[0] == 1 and np.asarray(new[2].stable).all()


def _same_error(fn, reference):
  with pytest.raises(Exception) as want:
    reference()
  with count_programs() as n:
    with pytest.raises(type(want.value)) as got:
      fn()
  assert str(got.value) == str(want.value)
  return n[0]


def test_until_stable_bad_input_raises_the_pruners_errors_before_compiling(net):
  model, params, acts = net
  ones = jaxprune.unit_masks_ones(model)
  aprune, _ = _pruner(model, "activations")
  wprune, _ = _pruner(model, "weights")
  nan_acts = acts.copy()
  nan_acts[3, 2] = np.nan
  nan_params = jax.tree.map(np.array, params)
  nan_params["params"]["hidden_0"]["kernel"][0, 1] = np.nan
  cases = [
      (aprune, params, ones, (acts[:, :5], 40.0), {}),                 # wrong width
      (aprune, params, ones, (nan_acts, 40.0), {}),                    # NaN activations
      (aprune, params, ones, (acts, 200.0), {}),                       # threshold
      (aprune, params, ones, (acts, 40.0, 165.0, -1.0), {}),           # tolerance
      (aprune, params, ones, (acts, 40.0), {"sample_weight": np.ones(4)}),
      (aprune, params, {"hidden_0": np.ones(4, bool)}, (acts, 40.0), {}),   # mask shape
      (aprune, params, {"hidden_0": np.zeros(11, bool)}, (acts, 40.0), {}),  # keeps none
      (aprune, params, {"hiden_0": np.ones(11, bool)}, (acts, 40.0), {}),   # misspelt
      (wprune, nan_params, ones, (40.0,), {}),                         # NaN weights
      (distinctiveness(model, "hidden_0"), params, ones, (acts, 40.0, 30.0), {}),  # sim >= comp
      (wprune, params, ones, ("40",), {}),                             # a string angle
      (wprune, params, ones, (acts, 40.0, 165.0, 1e-6), {}),          # activations: no
  ]
  for prune, p, m, args, kwargs in cases:
    assert _same_error(lambda: until_stable(prune, p, m, *args, **kwargs),
                       lambda: prune(p, m, *args, **kwargs)) == 0
  with pytest.raises(TypeError, match="returned ImportanceReport as its report"):
    until_stable(jaxprune.importance_prune(model, "hidden_0"), params, ones, 2)
  with pytest.raises(ValueError, match="max_sweeps"):
    until_stable(wprune, params, ones, 40.0, max_sweeps=0)


# ----------------------------------------------------------------------------- apply_masks


def _where_by_hand(tree, masks):
  """The reference: NumPy's where leaf by leaf, in each leaf's dtype as JAX canonicalises it."""
  def one(p, m):
    dtype = jax.dtypes.canonicalize_dtype(np.asarray(p).dtype)
    return np.where(np.asarray(m), np.asarray(p, dtype), np.zeros((), dtype))
  return jax.tree.map(one, tree, masks)


def _resnet_sized_tree():
  """102 leaves of ResNet-18's kinds of shapes (odd channel counts: programs of their own)."""
  rng = np.random.default_rng(0)
  tree = {}
  for i in range(20):
    c = 7 + i
    tree[f"conv{i}"] = {"kernel": rng.normal(size=(3, 3, c, c + 1)).astype(np.float32),
                        "scale": rng.normal(size=(c + 1,)).astype(np.float32),
                        "bias": rng.normal(size=(c + 1,)).astype(np.float32),
                        "mean": rng.normal(size=(c + 1,)).astype(np.float32),
                        "var": host_f32(rng.random(size=(c + 1,)))}
  tree["dense"] = {"kernel": rng.normal(size=(27, 5)).astype(np.float32),
                   "bias": rng.normal(size=(5,)).astype(np.float32)}
  masks = jax.tree.map(lambda p: rng.random(np.shape(p)) > 0.5, tree)
  return tree, masks


def test_apply_masks_eager_is_one_program_per_tree():
  tree, masks = _resnet_sized_tree()
  assert len(jax.tree.leaves(tree)) == 102
  with count_programs() as n:
    out = jaxprune.apply_masks(tree, masks)
    jax.block_until_ready(out)
  assert n == [1]                       # was one small program per distinct leaf shape: 62
  assert _bits(out) == _bits(_where_by_hand(tree, masks))
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(out))
  other = jax.tree.map(lambda x: np.asarray(x) + 1, tree)
  with count_programs() as n:          # the same structure again: nothing new
    jaxprune.apply_masks(other, masks)
  assert n == [0]


def test_zero_masked_dtypes_and_traced_calls_unchanged():
  """Integer, bfloat16, weakly typed and NumPy float64 leaves keep the dtype (and weak type)
  the leaf-by-leaf where gave; under jit the masking is traced leaf by leaf as before."""
  tree = {"i": np.arange(6, dtype=np.int32).reshape(2, 3),
          "b": jnp.arange(4, dtype=jnp.bfloat16) + 1,
          "w": jnp.full((3,), 0.5),
          "f": np.linspace(1.0, 2.0, 5)}
  masks = {"i": np.array([[True, False, True], [False, True, False]]),
           "b": jnp.asarray([True, False, False, True]),
           "w": np.array([False, True, True]),
           "f": np.array([True, True, False, True, False])}
  got = masks_lib.zero_masked(tree, masks)
  leafwise = jax.tree.map(lambda p, m: jnp.where(m, p, jnp.zeros((), jnp.asarray(p).dtype)),
                          tree, masks)
  assert _bits(got) == _bits(_where_by_hand(tree, masks)) == _bits(leafwise)
  for k in tree:
    assert got[k].dtype == leafwise[k].dtype and got[k].weak_type == leafwise[k].weak_type, k
  jitted = jax.jit(masks_lib.zero_masked)(tree, masks)
  assert _bits(jitted) == _bits(got)
  # Errors unchanged: a bad mask is named by apply_masks' check, before any program.
  with pytest.raises(ValueError, match=r"Weight mask at \['f'\] has shape \(4,\)"):
    jaxprune.apply_masks(tree, dict(masks, f=np.ones(4, bool)))
  with pytest.raises(ValueError, match="dtype float32; masks must be bool"):
    jaxprune.apply_masks(tree, dict(masks, f=np.ones(5, np.float32)))


_TWO_DEVICES = """
import jax, jax.numpy as jnp, numpy as np, optax, jaxprune
d0, d1 = jax.devices()[:2]
params = {"a": jax.device_put(jnp.full((3, 4), 2.0), d0), "b": jax.device_put(jnp.ones(5), d1)}
masks = {"a": jax.device_put(np.arange(12).reshape(3, 4) % 3 != 0, d0),
         "b": jax.device_put(np.arange(5) != 1, d1)}
out = jaxprune.apply_masks(params, masks)
tx = jaxprune.masked_optimizer(optax.sgd(0.5), masks)
grads = jax.tree.map(jnp.ones_like, params)
updates, _ = tx.update(grads, tx.init(out), out)
new = optax.apply_updates(out, updates)
for tree in (out, new):
  print("LEAF", *(f"{k}:{list(v.devices())[0].id}:{float(v.sum())}" for k, v in tree.items()))
two = {"a": jax.device_put(jnp.arange(12.0).reshape(3, 4), d0),
       "b": jax.device_put(jnp.arange(10.0).reshape(2, 5) + 0.5, d1)}
for pruned, kept, *_ in (jaxprune.prune_to_sparsity(two, None, 0.5),
                         jaxprune.block_prune(two, None, 0.5, block=(1, 1)),
                         jaxprune.magnitude_prune(two, None, 0.5, scope="global"),
                         jaxprune.prune_to_sparsity(two, None, 0.5,
                                                    scores=jaxprune.magnitude_scores)):
  print("LEAF", *(f"{k}:{list(v.devices())[0].id}:{float(v.sum())}:"
                  f"{list(kept[k].devices())[0].id}:{int(kept[k].sum())}"
                  for k, v in pruned.items()))
sc = jaxprune.saliency_scores(two, jax.tree.map(lambda a: -2 * a, two))
print("LEAF", *(f"{k}:{list(v.devices())[0].id}:{float(v.sum())}" for k, v in sc.items()))
# Under an outer jit that closes over them, the program places them: nothing is put back.
kept = jax.jit(lambda s: jaxprune.prune_to_sparsity(two, None, s)[1])(0.5)
print("LEAF", *(f"{k}:{int(v.sum())}" for k, v in kept.items()))
# A leaf a pruner does not select (a bias) keeps its all-True mask beside it, on its device.
three = dict(two, bias=jax.device_put(jnp.ones(3), d1))
for kept in (jaxprune.block_prune(three, None, 0.5, block=(1, 1))[1],
             jaxprune.nm_prune(three, None, 1, 2, select=["b"])[1], jaxprune.ones_like(three)):
  print("LEAF", *(f"{k}:{list(v.devices())[0].id}:{v.committed}" for k, v in kept.items()))
"""


def test_leaves_placed_on_different_devices_are_zeroed_where_they_live():
  """Params placed by hand on two devices (one program cannot take them): each leaf is zeroed
  on its own device, eagerly and in the masked optimizer's eager update; the one-shot pruners
  and score helpers rank them on one device and return each where it was (they raised JAX's
  device error), also with scores given as a function, and under an outer jit."""
  lines = run_fresh(_TWO_DEVICES, "LEAF", "--xla_force_host_platform_device_count=2")
  # a: 8 of 12 entries kept, each 2.0 (16.0); b: 4 of 5 kept (4.0). One sgd(0.5) step on
  # gradients of ones: kept weights 2 -> 1.5 and 1 -> 0.5, the masked ones stay 0.
  assert lines[:2] == [["a:0:16.0", "b:1:4.0"], ["a:0:12.0", "b:1:2.0"]]
  # prune_to_sparsity, block_prune (1 x 1 blocks) and magnitude_prune rank them together
  # (global): the 11 smallest of 22 are a's 0..5 and b's 0.5..4.5; each leaf and its mask come
  # back on its own device.
  assert lines[2:6] == [["a:0:51.0:0:6", "b:1:37.5:1:5"]] * 4      # the last with callable scores
  # |w * -2w| = 2 w^2: 2 * (0^2 + ... + 11^2) and 2 * (0.5^2 + ... + 9.5^2); on their devices.
  assert lines[6] == ["a:0:1012.0", "b:1:665.0"]
  assert lines[7] == ["a:6", "b:5"]
  # The all-True masks of unselected leaves sit on their leaves' devices (they were on device 0).
  assert lines[8:11] == [["a:0:True", "b:1:True", "bias:1:True"]] * 3


def test_a_setting_of_another_type_compiles_no_new_program():
  """A Python float, an int, a NumPy and a JAX scalar of one setting were four programs (each
  its own abstract value); now each concrete setting reaches the sweep as a Python float."""
  model = jaxprune.MLP(in_features=3, hidden=(5,), out_features=2)
  params = model.init(jax.random.key(0))
  units = jaxprune.unit_masks_ones(model)
  acts = model.activations(params, jnp.ones((6, 3)), "hidden_0")
  d = distinctiveness(model, "hidden_0")
  w = weight_distinctiveness(model, "hidden_0")
  imp = jaxprune.pruners.importance_prune(model, "hidden_0")
  red = jaxprune.pruners.group_redundancy(model, "hidden_0")
  calls = [lambda v: d(params, units, acts, v, 165.0), lambda v: w(params, units, v, 165.0),
           lambda v: imp(params, units, v), lambda v: red(params, units, acts, v)]
  for call in calls:
    first = call(2.0)
    with count_programs() as n:
      others = [call(v) for v in (np.float32(2.0), 2, jnp.float32(2.0), np.int64(2))]
    assert n == [0]
    for out in others:
      assert _bits(out) == _bits(first)


@pytest.mark.skipif(conftest._MAP_LIMIT is None, reason="Linux's vm.max_map_count only")
def test_suite_releases_compiled_programs_near_the_mapping_limit(monkeypatch):
  """The suite's guard (tests/conftest.py): between test files, once the worker holds
  ``RELEASE_SHARE`` of ``vm.max_map_count`` memory mappings, the compiled programs are released
  (each XLA:CPU executable holds mappings of its own, and a worker that ran out crashed in XLA);
  within a file, or below the limit, nothing is."""
  f = jax.jit(lambda v: v * 3 + 1)
  f(jnp.ones(3))
  here, same_file, other_file = (type("Item", (), {"module": m})() for m in ("a", "a", "b"))
  monkeypatch.setattr(conftest, "_MAP_LIMIT", 2 * _compile.mappings() + 1000)   # far below
  conftest.pytest_runtest_teardown(here, other_file)
  assert f._cache_size() == 1
  monkeypatch.setattr(conftest, "_MAP_LIMIT", 2)   # every process holds more than one
  conftest.pytest_runtest_teardown(here, same_file)
  assert f._cache_size() == 1
  before = _compile.mappings()
  conftest.pytest_runtest_teardown(here, other_file)
  assert f._cache_size() == 0 and _compile.mappings() < before
  f(jnp.ones(3))
  conftest.pytest_runtest_teardown(here, None)    # the last test: released too
  assert f._cache_size() == 0


@pytest.mark.skipif(_compile.map_limit() is None, reason="Linux's vm.max_map_count only")
def test_warns_once_per_crossing_when_compiled_programs_near_the_mapping_limit(monkeypatch):
  """After a compilation that leaves the process holding more than MAPPINGS_WARN_SHARE of
  vm.max_map_count mappings, jaxprune warns with what to do; below, not. Once per crossing: not
  again while above the line, again after the process fell below it (jax.clear_caches())."""
  monkeypatch.setattr(_compile, "_WARNED", [False])
  monkeypatch.setattr(_compile, "_BUDGET", [0.0])
  monkeypatch.setattr(_compile, "_MAP_LIMIT", 10 * _compile.mappings())
  jax.jit(lambda v: v * 5 - 2)(jnp.ones(4))   # far below: nothing, and the next check later
  assert _compile._WARNED == [False] and _compile._BUDGET[0] > _compile._MAPS_PER_PROGRAM
  monkeypatch.setattr(_compile, "_MAP_LIMIT", _compile.mappings())
  monkeypatch.setattr(_compile, "_BUDGET", [0.0])
  with pytest.warns(RuntimeWarning, match=r"vm.max_map_count.*jax.clear_caches\(\)"):
    jax.jit(lambda v: v * 7 - 3)(jnp.ones(4))
  assert _compile._WARNED == [True]
  assert 0 < _compile._BUDGET[0] < 0.05 * _compile._MAP_LIMIT   # checks again soon above it
  monkeypatch.setattr(_compile, "_BUDGET", [0.0])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.jit(lambda v: v * 9 - 4)(jnp.ones(4))   # still above: no second warning
  assert _compile._WARNED == [True]
  monkeypatch.setattr(_compile, "_MAP_LIMIT", 10 * _compile.mappings())   # released: below
  monkeypatch.setattr(_compile, "_BUDGET", [0.0])
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    jax.jit(lambda v: v * 11 - 5)(jnp.ones(4))
  assert _compile._WARNED == [False]
  monkeypatch.setattr(_compile, "_MAP_LIMIT", _compile.mappings())   # crossed again: warned
  monkeypatch.setattr(_compile, "_BUDGET", [0.0])
  with pytest.warns(RuntimeWarning, match=r"vm.max_map_count"):
    jax.jit(lambda v: v * 13 - 6)(jnp.ones(4))
