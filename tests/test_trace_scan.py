"""trace follows lax.scan bodies (nn.RNN, nn.scan, fori_loop with fixed bounds): a unit carried
from step to step is one unit throughout, stacked per-step params are sliced per step, and the
compacted target re-runs the scan at the new sizes and any batch size (the sequence length is
a constant of the traced program)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxprune
from conftest import assert_compacts_as_masked, host_f32

R = np.random.default_rng(0)
F, H, C, L = 5, 8, 4, 3


def _arr(*shape, scale=1.0):
  return host_f32(scale * R.normal(size=shape))


def _masked(target, params, drop):
  um = jaxprune.unit_masks_ones(target)
  for name, units in drop.items():
    um[name] = um[name].at[np.asarray(units)].set(False)
  return um, jaxprune.apply_masks(params, jaxprune.expand(params, target, um))


def _slices(group):
  return sorted((s.path, s.axis, s.role, s.kind) for s in group.slices)


STACKED = {"win": _arr(F, H), "bin": _arr(H), "w": _arr(L, H, H, scale=0.3), "b": _arr(L, H),
           "wout": _arr(H, C), "bout": _arr(C)}


def _stacked(p, x):
  """L layers with stacked params, scanned (nn.scan's layout)."""
  h = jax.nn.relu(x @ p["win"] + p["bin"])
  h, _ = lax.scan(lambda h, wb: (jax.nn.relu(h @ wb[0] + wb[1]), None), h, (p["w"], p["b"]))
  return h @ p["wout"] + p["bout"]


def _fori(p, x):
  """The same network as a fori_loop indexing the stacked params."""
  h = jax.nn.relu(x @ p["win"] + p["bin"])
  h = lax.fori_loop(0, L, lambda i, h: jax.nn.relu(h @ p["w"][i] + p["b"][i]), h)
  return h @ p["wout"] + p["bout"]


@pytest.mark.parametrize("fn", [_stacked, _fori])
def test_scanned_layers_are_one_group_with_their_stacked_slices(fn):
  x = _arr(16, F)
  t = jaxprune.trace(fn, STACKED, x)
  assert {k: g.size for k, g in t.groups.items()} == {"win": H}
  assert _slices(t.groups["win"]) == sorted([
      (("win",), 1, "producer", "kernel"), (("bin",), 0, "producer", "bias"),
      (("w",), 2, "producer", "kernel"), (("b",), 1, "producer", "bias"),
      (("w",), 1, "consumer", "kernel"), (("wout",), 0, "consumer", "kernel")])
  um, masked = _masked(t, STACKED, {"win": [0, 3, 4]})
  small, small_t = t.compact(masked, um)
  assert small["w"].shape == (L, H - 3, H - 3) and small["b"].shape == (L, H - 3)
  x2 = _arr(21, F)                                           # another batch size
  np.testing.assert_allclose(small_t.apply(small, x2), fn(masked, x2), atol=1e-5)
  pruned, um2, _ = jaxprune.importance_prune(t, "win")(STACKED, jaxprune.unit_masks_ones(t), 2)
  assert int(um2["win"].sum()) == H - 2
  assert float(jnp.abs(pruned["w"][:, ~um2["win"]]).sum()) == 0.0      # every layer's rows


RNN = {"wi": _arr(F, H), "wh": _arr(H, H, scale=0.3), "b": _arr(H), "wout": _arr(H, C),
       "bout": _arr(C)}


def _rnn(p, x):
  """An Elman RNN over (B, T, F) from a zero state; the mean hidden state feeds the output."""
  def step(h, xt):
    h = jnp.tanh(xt @ p["wi"] + h @ p["wh"] + p["b"])
    return h, h
  _, hs = lax.scan(step, jnp.zeros((x.shape[0], H)), jnp.swapaxes(x, 0, 1))
  return jnp.mean(hs, 0) @ p["wout"] + p["bout"]


def test_rnn_hidden_units_are_a_group_at_any_batch_size():
  x = _arr(16, 6, F)
  t = jaxprune.trace(_rnn, RNN, x)
  assert {k: g.size for k, g in t.groups.items()} == {"wi": H}
  assert t.groups["wi"].activation == "tanh"
  assert _slices(t.groups["wi"]) == sorted([
      (("wi",), 1, "producer", "kernel"), (("wh",), 1, "producer", "kernel"),
      (("b",), 0, "producer", "bias"), (("wh",), 0, "consumer", "kernel"),
      (("wout",), 0, "consumer", "kernel")])
  # activations inside the scan come stacked over the steps, units last
  acts = t.activations(RNN, x, "wi")
  assert acts.shape == (6, 16, H)
  def loop(p, x):                                            # the same RNN as a Python loop
    h, out = jnp.zeros((x.shape[0], H)), []
    for s in range(x.shape[1]):
      h = jnp.tanh(x[:, s] @ p["wi"] + h @ p["wh"] + p["b"])
      out.append(h)
    return jnp.stack(out)
  np.testing.assert_allclose(acts, loop(RNN, x), atol=1e-5)
  um, masked = _masked(t, RNN, {"wi": [1, 6]})
  small, small_t = t.compact(masked, um)
  assert small["wh"].shape == (H - 2, H - 2)
  x2 = _arr(5, 6, F)                                         # another batch size
  np.testing.assert_allclose(small_t.apply(small, x2), _rnn(masked, x2), atol=1e-5)
  assert small_t.activations(small, x2, "wi").shape == (6, 5, H - 2)
  with pytest.raises(ValueError, match="only the batch may change"):  # a sequence length
    small_t.apply(small, _arr(5, 9, F))                      # is a constant of the program
  # A pruner from activations reads (steps x batch) patterns. Constants cannot fold exactly
  # (the recurrent consumer has no bias of its own, and the state starts at zero).
  with pytest.raises(ValueError, match="constants=False"):
    jaxprune.distinctiveness(t, "wi")(RNN, jaxprune.unit_masks_ones(t), acts, 15.0, 165.0)
  dup = {**RNN, "wi": RNN["wi"].at[:, 5].set(RNN["wi"][:, 2]),
         "wh": RNN["wh"].at[:, 5].set(RNN["wh"][:, 2]),
         "b": RNN["b"].at[5].set(RNN["b"][2])}                 # unit 5 duplicates unit 2
  _, um3, _ = jaxprune.distinctiveness(t, "wi", constants=False)(
      dup, jaxprune.unit_masks_ones(t), t.activations(dup, x, "wi"), 1.0, 179.0)
  assert (~um3["wi"]).nonzero()[0].tolist() == [5]


@pytest.mark.parametrize("cell", ["SimpleCell", "LSTMCell", "GRUCell"])
def test_flax_rnn_cells(cell):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.RNN(getattr(nn, cell)(features=H))(x)
      return nn.Dense(C)(h[:, -1])                            # the last step
  x = _arr(16, 6, F)
  v = Net().init(jax.random.key(0), x)
  t = jaxprune.trace(Net().apply, v, x)
  assert len(t.groups) == 1
  name, g = next(iter(t.groups.items()))
  assert g.size == H and name.startswith(cell)
  um, masked = _masked(t, v, {name: [0, 2, 7]})
  small, small_t = t.compact(masked, um)
  x2 = _arr(7, 6, F)                                         # another batch size
  np.testing.assert_allclose(small_t.apply(small, x2), Net().apply(masked, x2), atol=1e-5)
  kernels = [l for l in jax.tree.leaves(small) if l.ndim == 2]
  assert all(H not in l.shape for l in kernels)              # every gate's kernel was cut


def test_units_permuted_inside_the_body_are_not_prunable():
  def rolled(p, x):
    def step(h, xt):
      return jnp.tanh(xt @ p["wi"] + h[:, ::-1] @ p["wh"] + p["b"]), None
    h, _ = lax.scan(step, jnp.zeros((x.shape[0], H)), jnp.swapaxes(x, 0, 1))
    return h @ p["wout"] + p["bout"]
  t = jaxprune.trace(rolled, RNN, _arr(4, 3, F))
  assert t.groups == {}
  assert "indexed along by rev" in t.explain()


def test_which_scanned_groups_report_the_activations_their_consumers_read():
  """An RNN's (and an LSTM's: the chain runs to h = o * tanh(c)) hidden activations are what
  the next step and the readout read; layers scanned over stacked params share one group whose
  first layer's activations are not what the later layers read."""
  assert jaxprune.trace(_rnn, RNN, _arr(4, 3, F)).activations_complete("wi")
  assert not jaxprune.trace(_stacked, STACKED, _arr(4, F)).activations_complete("win")
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(C)(nn.RNN(nn.LSTMCell(features=H))(x)[:, -1])
  x = _arr(4, 3, F)
  v = Net().init(jax.random.key(0), x)
  t = jaxprune.trace(Net().apply, v, x)
  assert t.activations_complete("LSTMCell_0/ii")
  def lstm_h(v, x):                         # the cell's output h at every step, by hand
    cell = nn.LSTMCell(features=H)
    c = cell.initialize_carry(jax.random.key(0), x[:, 0].shape)
    out = []
    for s in range(x.shape[1]):
      c, h = cell.apply({"params": v["params"]["LSTMCell_0"]}, c, x[:, s])
      out.append(h)
    return jnp.stack(out)
  np.testing.assert_allclose(t.activations(v, x, "LSTMCell_0/ii"), lstm_h(v, x), atol=1e-5)


def test_scan_over_the_batch_and_a_time_major_rnn_run_at_other_batch_sizes():
  """lax.map scans over the batch: its outputs stack along the batch (they kept the traced
  size, and the reshape after them failed at another batch size). A time-major RNN takes
  (T, B, F): its batch is axis 1, which may change (axis 0, the length, may not)."""
  p = {"w1": _arr(F, H), "b1": _arr(H), "w2": _arr(3 * H, C), "b2": _arr(C)}
  def mapped(p, x):                                          # x: (B, 3, F)
    h = lax.map(lambda xi: jnp.tanh(xi @ p["w1"] + p["b1"]), x)
    return h.reshape(x.shape[0], -1) @ p["w2"] + p["b2"]
  t = jaxprune.trace(mapped, p, _arr(8, 3, F))
  assert {k: g.size for k, g in t.groups.items()} == {"w1": H}
  um, masked = _masked(t, p, {"w1": [2, 5]})
  small, small_t = t.compact(masked, um)
  x3 = _arr(3, 3, F)
  np.testing.assert_allclose(small_t.apply(small, x3), mapped(masked, x3), atol=1e-5)

  def time_major(p, x):                                      # x: (T, B, F)
    def step(h, xt):
      h = jnp.tanh(xt @ p["wi"] + h @ p["wh"] + p["b"])
      return h, None
    h, _ = lax.scan(step, jnp.zeros((x.shape[1], H)), x)
    return h @ p["wout"] + p["bout"]
  t = jaxprune.trace(time_major, RNN, _arr(6, 16, F))
  um, masked = _masked(t, RNN, {"wi": [0]})
  small, small_t = t.compact(masked, um)
  x5 = _arr(6, 5, F)
  np.testing.assert_allclose(small_t.apply(small, x5), time_major(masked, x5), atol=1e-5)
  with pytest.raises(ValueError, match=r"inputs shaped \(6, N, 5\)"):
    small_t.apply(small, _arr(4, 5, F))


def test_a_residual_inside_the_step_and_recurrent_constant_folds_are_refused():
  """z = tanh(x W + h U + b); h = z + tanh(z S): the activations z are not the carried h, and
  following the carry back to the previous step counted S as feeding z (a merge moved the
  outputs by 1.54). A recurrent reader sees the initial state at the first step, so an LSTM's
  constant unit does not fold into its bias (the folds moved the outputs by 0.02-0.83)."""
  p = {"W": _arr(F, H), "U": _arr(H, H, scale=0.3), "b": _arr(H), "S": _arr(H, H), "V": _arr(H, C)}
  def cell(p, x):
    def step(h, xt):
      z = jnp.tanh(xt @ p["W"] + h @ p["U"] + p["b"])
      h = z + jnp.tanh(z @ p["S"])
      return h, None
    h, _ = lax.scan(step, jnp.zeros((x.shape[0], H)), jnp.swapaxes(x, 0, 1))
    return h @ p["V"]
  t = jaxprune.trace(cell, p, _arr(4, 3, F))
  assert not t.activations_complete("W")
  with pytest.raises(ValueError, match="residual addition"):
    jaxprune.distinctiveness(t, "W", constants=False)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(C)(nn.RNN(nn.LSTMCell(H, name="cell"))(x)[:, -1])
  x = _arr(4, 3, F)
  t = jaxprune.trace(Net().apply, Net().init(jax.random.key(1), x), x)
  assert not t.groups["cell/ii"].exact_constant_fold
  for make in (lambda: jaxprune.distinctiveness(t, "cell/ii"),
               lambda: jaxprune.weight_distinctiveness(t, "cell/ii")):
    with pytest.raises(ValueError, match=r"its consumers params/cell/hi/kernel, .* read it "
                       "through a recurrence"):
      make()
  with pytest.raises(ValueError, match="not exact here"):
    jaxprune.group_redundancy(t, "cell/ii")
  jaxprune.distinctiveness(t, "cell/ii", constants=False)        # merging still works


def test_an_optimized_lstm_runs_at_other_batch_sizes():
  """Its gates come from one product of kernels concatenated from params, split in four (read as
  the gates' own products since 2026-12-05: one group, as LSTMCell's), and the split lost the
  batch size, so the compacted target crashed at another batch size."""
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(C)(nn.RNN(nn.OptimizedLSTMCell(H))(x)[:, -1])
  x = _arr(8, 5, F)
  v = Net().init(jax.random.key(1), x)
  t = jaxprune.trace(Net().apply, v, x)
  assert list(t.groups) == ["OptimizedLSTMCell_0/hi"]
  small, small_t = t.compact(v, {})
  np.testing.assert_allclose(small_t.apply(small, x[:3]), Net().apply(v, x[:3]), atol=1e-6)


def test_a_learned_initial_state_makes_the_activations_incomplete():
  """A recurrent reader meets the initial state at the first step, not the activations: with
  a learned h0, units 1 and 5 of equal activations (equal incoming weights) but unequal h0
  merged moved the outputs by 0.17. The group is incomplete, naming h0, however h0 reaches
  the reader (through relu, broadcast by a product, mixed with an input, or read in the step);
  with a zero initial
  state, or a carry started from the activations themselves, the same merge is exact."""
  wx, wh, b = _arr(F, H), _arr(H, H, scale=0.5), _arr(H)
  p = {"Wx": wx.at[:, 5].set(wx[:, 1]), "Wh": wh.at[:, 5].set(wh[:, 1]),
       "b": b.at[5].set(b[1]), "h0": _arr(H), "Wo": _arr(H, C)}
  xs = _arr(6, 4, F)

  def rnn(start, read=lambda p, h, t: h):
    def fn(p, xs):
      def step(h, xt_t):
        xt, t = xt_t
        return jnp.tanh(xt @ p["Wx"] + read(p, h, t) @ p["Wh"] + p["b"]), None
      steps = (jnp.swapaxes(xs, 0, 1), jnp.arange(xs.shape[1]))
      return lax.scan(step, start(p, xs), steps)[0] @ p["Wo"]
    return fn
  learned = {
      "as_is": rnn(lambda p, xs: jnp.broadcast_to(p["h0"], (xs.shape[0], H))),
      "through_relu": rnn(lambda p, xs: jnp.broadcast_to(p["h0"], (xs.shape[0], H)),
                          lambda p, h, t: jax.nn.relu(h)),
      "ones_product": rnn(lambda p, xs: jnp.ones((xs.shape[0], 1)) @ p["h0"][None]),
      "mixed_with_input": rnn(lambda p, xs: jnp.where(xs[:, 0, :1] > 0, p["h0"], 0.0)),
      "read_in_step": rnn(lambda p, xs: jnp.zeros((xs.shape[0], H)),
                          lambda p, h, t: jnp.where(t == 0, p["h0"], h))}
  for name, fn in learned.items():
    t = jaxprune.trace(fn, p, xs)
    assert not t.activations_complete("Wx"), name
    assert "parameters of the group (h0)" in t.activations_incomplete_why("Wx"), name
  with pytest.raises(ValueError, match=r"recurrent readers \(Wh\) read parameters of the "
                     r"group \(h0\)"):
    jaxprune.distinctiveness(jaxprune.trace(learned["as_is"], p, xs), "Wx", constants=False)

  q = {k: v for k, v in p.items() if k != "h0"}
  # A carry started from the activations themselves: the reader reads them at step 0 (the
  # first version took the layer's bias for an initial state and refused the group).
  def carried(p, x):
    feat = jnp.tanh(x @ p["Wx"] + p["b"])
    return lax.scan(lambda h, _: (h * 0.5, h @ p["Wo"]), feat, None, length=3)[1].sum(0)
  tc = jaxprune.trace(carried, p, xs[:, 0])
  assert tc.activations_complete("Wx"), tc.activations_incomplete_why("Wx")
  exact = {"zero": rnn(lambda p, xs: jnp.zeros((xs.shape[0], H)))}
  for name, fn in exact.items():
    t0 = jaxprune.trace(fn, q, xs)
    assert t0.activations_complete("Wx"), name
    acts = t0.activations(q, xs, "Wx")
    merged, um, _ = jaxprune.distinctiveness(t0, "Wx", constants=False, complementary=False)(
        q, jaxprune.unit_masks_ones(t0), acts, 1e-3, 180.0)
    assert not bool(um["Wx"][5]), name
    np.testing.assert_allclose(fn(merged, xs), fn(q, xs), atol=1e-5)


BLOCKS = {"win": _arr(F, H), "w1": _arr(L, H, 12, scale=0.4), "b1": _arr(L, 12),
          "w2": _arr(L, 12, H, scale=0.4), "b2": _arr(L, H), "wout": _arr(H, C)}


def _blocks(remat):
  """L scanned blocks (a hidden layer of 12 units in each, w1 -> w2), their body checkpointed
  or not (nn.scan over nn.remat(Block))."""
  def body(h, lw):
    w1, b1, w2, b2 = lw
    return jnp.tanh(jax.nn.relu(h @ w1 + b1) @ w2 + b2), None
  step = jax.checkpoint(body) if remat else body

  def fn(p, x):
    h, _ = lax.scan(step, jnp.tanh(x @ p["win"]), (p["w1"], p["b1"], p["w2"], p["b2"]))
    return h @ p["wout"]
  return fn


@pytest.mark.parametrize("remat", [False, True])
def test_a_checkpointed_scan_body_folds_as_the_plain_one(remat):
  """A consumer inside a checkpointed body of a scan reads its units directly, not through the
  carry: its group folds constants and linear combinations exactly, as without the checkpoint
  (it was refused as 'a recurrence'). The carried stream's reader (w1, in the checkpoint) is
  still a recurrence."""
  x = _arr(16, F)
  t = jaxprune.trace(_blocks(remat), BLOCKS, x)
  g = t.groups["w1"]
  assert g.exact_constant_fold and g.exact_linear_fold
  dup = {**BLOCKS, "w1": BLOCKS["w1"].at[:, :, 7].set(BLOCKS["w1"][:, :, 3]),
         "b1": BLOCKS["b1"].at[:, 7].set(BLOCKS["b1"][:, 3])}   # unit 7 = unit 3, every layer
  acts = t.activations(dup, x, "w1")
  new, um, rep = jaxprune.group_redundancy(t, "w1")(dup, jaxprune.unit_masks_ones(t), acts,
                                                    1e-3)
  assert int(rep.count) >= 1 and not bool(um["w1"][7] and um["w1"][3])
  np.testing.assert_allclose(_blocks(remat)(new, x), _blocks(remat)(dup, x), atol=1e-4)
  small, small_t = t.compact(new, um)
  x2 = _arr(5, F)
  np.testing.assert_allclose(small_t.apply(small, x2), _blocks(remat)(new, x2), atol=1e-5)
  why = {s.path: s.padded_why for s in t.groups["win"].slices if s.role == "consumer"}
  assert "recurrence" in why[("w1",)]


def test_checkpoint_name_is_followed_as_the_value_it_names():
  """jax.ad_checkpoint.checkpoint_name (a remat policy's tag) passes its value on: the units
  it tags stay a group, with and without a policy that saves only them (it stopped every
  group: 'used by name (not followed)')."""
  from jax.ad_checkpoint import checkpoint_name  # pylint: disable=import-outside-toplevel
  p = {"w1": _arr(F, H), "b1": _arr(H), "w2": _arr(H, C), "b2": _arr(C)}

  def named(p, x):
    h = jax.nn.relu(checkpoint_name(x @ p["w1"] + p["b1"], "z"))
    return checkpoint_name(h, "h") @ p["w2"] + p["b2"]

  policy = jax.checkpoint_policies.save_only_these_names("z")
  x = _arr(16, F)
  for fn in (named, jax.checkpoint(named, policy=policy)):
    t = jaxprune.trace(fn, p, x)
    assert {k: g.size for k, g in t.groups.items()} == {"w1": H}
    assert t.groups["w1"].activation == "relu" and t.groups["w1"].exact_linear_fold
    np.testing.assert_allclose(t.activations(p, x, "w1"),
                               jax.nn.relu(x @ p["w1"] + p["b1"]), atol=1e-6)
    um, masked = _masked(t, p, {"w1": [2, 5]})
    small, small_t = t.compact(masked, um)
    np.testing.assert_allclose(small_t.apply(small, x[:5]), fn(masked, x[:5]), atol=1e-5)


def _over_units(p, x):
  """A scan whose steps are the hidden units (xs = h.T), its carry decaying plus a constant."""
  h = jnp.tanh(x @ p["win"])
  _, ys = lax.scan(lambda c, hi: (0.5 * c + hi + 1.0, c), jnp.zeros(x.shape[0]), h.T)
  return ys.T @ p["wout"]


def _over_unit_params(p, x):
  """One step per column of a kernel (xs = win.T), the carry read by the output."""
  def step(c, col):
    hi = jnp.tanh(x @ col)
    return 0.9 * c + hi + 0.1, hi
  c, hs = lax.scan(step, jnp.zeros(x.shape[0]), p["win"].T)
  return hs.T @ p["wout"] + c[:, None]


def _map_over_units(p, x):
  """lax.map over the hidden units: no carry, each step a unit's own values."""
  h = jnp.tanh(x @ p["win"])
  return lax.map(lambda hi: jnp.tanh(hi) + 1.0, h.T).T @ p["wout"]


@pytest.mark.parametrize("fn", [_over_units, _over_unit_params])
def test_a_scan_with_a_carry_over_the_units_refuses_them(fn):
  """Scanning over a group's units makes each unit a step: compacting removed the step, masking
  keeps it (its carry update still adds 1.0), so the outputs differed by up to 1.4."""
  p = {"win": _arr(F, H), "wout": _arr(H, C)}
  t = jaxprune.trace(fn, p, _arr(4, F))
  assert "win" not in t.groups
  assert "scanned over by lax.scan with a carry: each unit is a step" in t.explain()


def test_a_map_over_the_units_keeps_them_a_group():
  """Without a carry the steps are independent: a masked unit's step is read only by its
  masked rows, so the units stay a group that compacts exactly."""
  p = {"win": _arr(F, H), "wout": _arr(H, C)}
  t = jaxprune.trace(_map_over_units, p, _arr(4, F))
  assert t.groups["win"].size == H
  um, _ = _masked(t, p, {"win": [1, 5]})
  assert_compacts_as_masked(t, p, _map_over_units, um, (_arr(4, F), _arr(2, F)))
