"""Pruning inside anyone's optax training loop, sparsity schedules and the unstructured toolbox.

* :func:`keep_masked` is an ``optax.GradientTransformation`` to chain after any optimizer: masked
  weights stay exactly zero in the user's own jitted step (weight decay included).
* :func:`gradual` wraps an optimizer into one that prunes while it trains: the weight masks live
  in its state (read them with :func:`masks_of`) and are recomputed from the current params every
  ``frequency`` steps between ``begin_step`` and ``end_step``, with the sparsity of Zhu and Gupta's
  polynomial schedule (:func:`polynomial_sparsity`). Newly pruned weights are zeroed by the
  updates themselves, so ``optax.apply_updates`` stays the only way params change. Everything is
  traced once: masks are state, the mask update is a ``lax.cond``.
* :func:`scheduled` runs a structured pruner on a schedule through the same mechanism:
  :func:`distinctiveness_pruner` (merge similar units every k steps) or :func:`importance_pruner`
  (remove the least important units, on the polynomial schedule via ``gradual(pruner=...)``).
* Unstructured tools over any params pytree (flax, haiku-style ``{'w', 'b'}``, plain dicts, an nnx
  ``State``): the default selection is every floating-point leaf with ``ndim >= 2``; per-leaf
  sparsity maps with :func:`uniform_sparsity` and :func:`erk_sparsity` (Evci et al. 2020);
  :func:`prune_to_sparsity` with custom scores (:func:`saliency_scores` for ``|w * g|``,
  :func:`snip_scores` from a batch);
  N:M sparsity (:func:`nm_prune`) and block sparsity (:func:`block_prune`).

Counts are exact everywhere: a target sparsity ``s`` over ``N`` weights removes ``round(s * N)``
(round half to even, in float32), selected by the exact radix select of
:mod:`jaxprune.pruners.magnitude` (ties go to the lower flat index).

Example:
  >>> import jax, jax.numpy as jnp, optax, jaxprune
  >>> params = {'w': jnp.arange(1., 7.).reshape(2, 3), 'b': jnp.ones(3)}
  >>> tx = jaxprune.gradual(optax.sgd(0.1), sparsity=0.5, begin_step=0, end_step=2, frequency=1)
  >>> state = tx.init(params)
  >>> for _ in range(3):
  ...   updates, state = tx.update(jax.tree.map(jnp.zeros_like, params), state, params)
  ...   params = optax.apply_updates(params, updates)
  >>> params['w'].tolist()
  [[0.0, 0.0, 0.0], [4.0, 5.0, 6.0]]
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import masks as masks_lib
from jaxprune import units as units_lib
from jaxprune import validate
from jaxprune.pruners import _common
from jaxprune.pruners import importance as importance_lib
from jaxprune.pruners import magnitude as magnitude_lib
from jaxprune.pruners.angles import check_thresholds
from jaxprune.pruners.distinctiveness_pruning import weight_distinctiveness

PyTree = Any
Select = Sequence | Callable | None


# ----------------------------------------------------------------------------- checks


def _check_sparsity(name: str, value) -> None:
  """A sparsity is a number (TypeError for a string, which NumPy would parse); a concrete one
  must lie in [0, 1)."""
  if not validate.is_real(value, bool_ok=False):
    raise TypeError(f"{name} must be a number in [0, 1) (the fraction of weights removed, e.g. "
                    f"0.9), got {type(value).__name__} {value!r}.")
  if not _common.is_concrete(value):
    return
  v = np.asarray(value, np.float64)
  if v.ndim or not np.isfinite(v) or not 0.0 <= float(v) < 1.0:
    raise ValueError(f"{name} must be a number in [0, 1) (the fraction of weights removed; "
                     f"e.g. 0.9 keeps 10%, 1.0 would remove every weight), got {value!r}.")


def _check_power(power) -> None:
  """A concrete schedule exponent must be a positive number: with ``power <= 0`` the schedule
  would stay at its initial sparsity (or jump to infinity) instead of reaching the final one."""
  if not validate.is_real(power, bool_ok=False):
    raise TypeError(f"power must be a positive number (3 in Zhu and Gupta's schedule), got "
                    f"{type(power).__name__} {power!r}.")
  if not _common.is_concrete(power):
    return
  v = np.asarray(power, np.float64)
  if v.ndim or not np.isfinite(v) or float(v) <= 0:
    raise ValueError(f"power must be a positive number (3 in Zhu and Gupta's schedule, 1 for "
                     f"equal steps), got {power!r}; with power <= 0 the sparsity would not "
                     "reach its final value at end_step.")


def _check_tx(tx, name: str = "tx") -> None:
  """Raises TypeError unless ``tx`` is an optax GradientTransformation (``init`` and
  ``update``); a name (``"adam"``) or an uncalled factory (``optax.adam``) would otherwise fail
  inside the first compiled program with an AttributeError."""
  if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
    made = " (a factory: call it, e.g. optax.adam(1e-3))" if callable(tx) else ""
    raise TypeError(f"{name} must be an optax GradientTransformation (e.g. optax.adam(1e-3)), "
                    f"got {type(tx).__name__} {tx!r}{made}.")


_STATIC = ("the schedule is static; under optax.inject_hyperparams pass static_args=("
           "'begin_step', 'end_step', 'frequency', 'power')")


_ONE_SHOT = {"gradual": "; for one-shot pruning at step T use begin_step=0, end_step=T, "
                         "frequency=T",
             "scheduled": "; to run the pruner once, at step T, pass begin_step=T and a "
                          "frequency longer than the rest of training (end_step may be left "
                          "out)",
             "schedule": ""}


def _check_schedule(begin_step, end_step, frequency, *, end_required: bool,
                    caller: str = "schedule") -> None:
  for name, v in (("begin_step", begin_step), ("frequency", frequency)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
      raise TypeError(f"{name} must be an int, got {v!r} ({_STATIC}).")
  if begin_step < 0:
    raise ValueError(f"begin_step must be >= 0, got {begin_step}.")
  if frequency < 1:
    raise ValueError(f"frequency must be at least 1 (update the masks every `frequency` steps), "
                     f"got {frequency}.")
  if end_step is None:
    if end_required:
      raise ValueError("end_step is required: the step at which the final sparsity is reached.")
    return
  if not isinstance(end_step, (int, np.integer)) or isinstance(end_step, bool):
    raise TypeError(f"end_step must be an int, got {end_step!r} ({_STATIC}).")
  if end_step <= begin_step:
    raise ValueError(f"end_step ({end_step}) must be greater than begin_step ({begin_step})"
                     f"{_ONE_SHOT[caller]}.")


def _sparsity_map_or_float(sparsity, name="sparsity"):
  """Checks a float or a ``{'a/b/c': float}`` map and returns it (floats as Python floats)."""
  if isinstance(sparsity, Mapping):
    if not sparsity:
      raise ValueError(f"{name} is an empty map; give at least one leaf ('a/b/c': value).")
    for k, v in sparsity.items():
      _check_sparsity(f"{name}[{k!r}]", v)
    # (a traced value, under vmap or jit, stays as it is, as a single float does)
    return {str(k): float(v) if _common.is_concrete(v) else v for k, v in sparsity.items()}
  _check_sparsity(name, sparsity)
  return sparsity if not _common.is_concrete(sparsity) else float(sparsity)


# ----------------------------------------------------------------------------- keep_masked


class MaskedState(NamedTuple):
  """State of :func:`keep_masked`: the weight masks (bool pytree like the params)."""

  masks: PyTree


def _masked_updates(updates: PyTree, masks: PyTree, params: PyTree) -> PyTree:
  """``where(mask, update, -param)``: after ``apply_updates`` masked weights are exactly 0.

  In the wider of the two dtypes: ``-param`` rounded to narrower updates (bfloat16 updates of
  float32 params) would leave a masked weight at its rounding error."""
  def one(u, m, p):
    dt = jnp.promote_types(jnp.result_type(u), jnp.result_type(p))
    return jnp.where(m, jnp.asarray(u, dt), -jnp.asarray(p, dt))
  return jax.tree.map(one, updates, masks, params)


def masked_update(tx: optax.GradientTransformation, grads: PyTree, tx_state: optax.OptState,
                  params: PyTree, masks: PyTree, **extra_args) -> tuple[PyTree, optax.OptState]:
  """One step of ``tx`` on the pruned network: ``tx`` sees the masked weights' gradients and
  the weights themselves as zeros (optimizers that read the params, like LAMB's trust ratio,
  Adafactor's scale or schedule-free's averages, see the pruned network), and the masked
  weights' updates are ``-weight`` after it. Extra arguments (``value=`` for
  ``reduce_on_plateau``, ``value_fn=`` for L-BFGS) pass on to ``tx``. The step of
  :func:`masked_optimizer` and of :func:`jaxprune.fit` with masks (both check the masks
  against the params first; the gradients are checked here)."""
  inner, tx_state = optax.with_extra_args_support(tx).update(
      masks_lib.apply_masks(grads, masks), tx_state, masks_lib.zero_masked(params, masks),
      **extra_args)
  return _masked_updates(inner, masks, params), tx_state


def _own_copy(masks: PyTree) -> PyTree:
  """The masks as arrays of the optimizer state's own: a caller that donates the state
  (``jax.jit(step, donate_argnums=...)``) must not free the masks it passed in."""
  # A concrete array is copied by the runtime (``jnp.array(m, copy=True)`` would compile a copy
  # program per new shape); a tracer or anything else takes the jnp path.
  def copy(m):
    if isinstance(m, jax.Array) and not isinstance(m, jax.core.Tracer):
      return jax.device_put(m, may_alias=False)
    return jnp.array(m, copy=True)
  return jax.tree.map(copy, masks)


def _need_params(name: str, params) -> None:
  if params is None:
    raise ValueError(f"{name} needs the params: call tx.update(grads, opt_state, params) (it "
                     "sets the update of a pruned weight to -weight, so that the weight becomes "
                     "exactly zero).")


def _check_masked_finite(params, weight_masks, fn: str) -> None:
  """A masked weight is zeroed by the update ``-w``, which cannot cancel NaN or infinity
  (``w + (-w)`` is NaN): refuse such concrete params at ``init``, naming the fix."""
  for (k, p), m in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                       jax.tree.leaves(weight_masks)):
    if not (_common.is_concrete(p, m) and jnp.issubdtype(jnp.result_type(p), jnp.floating)):
      continue
    bad = int(np.sum(~np.asarray(m) & ~np.isfinite(np.asarray(p))))
    if bad:
      raise ValueError(f"{fn}: params{jax.tree_util.keystr(k)} hold {bad} NaN or infinite "
                       "values where the masks remove weights; the update that zeroes a masked "
                       "weight (-w) cannot cancel them. Apply the masks once first: "
                       "params = jaxprune.apply_masks(params, masks).")


def keep_masked(weight_masks: PyTree) -> optax.GradientTransformation:
  """Keeps masked weights exactly zero; chain it after any optimizer.

  ``optax.chain(optax.adamw(1e-3), keep_masked(masks))``: the update of a kept weight passes
  unchanged, the update of a masked weight is ``-weight``, so after ``optax.apply_updates`` every
  masked weight is exactly 0.0, whatever the optimizer did (momentum, weight decay). The masks
  live in the state (:func:`masks_of` reads them; :func:`replace_masks` puts new ones in, without
  compiling again: ``update`` reads the state's masks, not the ones given here). It must
  be the chain's last transformation (one after it would rescale the ``-weight``). The optimizer
  before it still sees the masked weights' gradients: for optimizers that combine elements
  (``clip_by_global_norm``, ``adafactor``) use :func:`masked_optimizer`, which trains exactly the
  pruned network.

  Args:
    weight_masks: bool pytree with the structure and shapes of the params (True keeps).

  Returns:
    An ``optax.GradientTransformation``; ``init`` raises ValueError if the masks do not fit the
    params, or if concrete params hold NaN or infinite values where the masks remove weights
    (apply the masks first); ``update`` needs ``params``.
  """

  def init_fn(params):
    masks_lib.check_weight_masks(params, weight_masks)
    _check_masked_finite(params, weight_masks, "keep_masked")
    return MaskedState(_own_copy(weight_masks))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args   # (value=, grad=, ... of the optimizers chained before it)
    _need_params("keep_masked", params)
    masks_lib.check_weight_masks(params, state.masks)
    return _masked_updates(updates, state.masks, params), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def masked_optimizer(tx: optax.GradientTransformation,
                     weight_masks: PyTree) -> optax.GradientTransformation:
  """``tx`` training only the kept weights, as :func:`jaxprune.fit` and :func:`gradual` do.

  The gradients of masked weights are zeroed before ``tx`` sees them, so its statistics
  (moments, a global-norm clip, Adafactor's factored second moments) are those of the pruned
  network, and their updates are ``-weight`` after it (masked weights exactly 0.0, as with
  :func:`keep_masked`). ``optax.chain(tx, keep_masked(m))`` gives the same kept weights for
  element-wise optimizers (SGD, momentum, Adam, AdamW), but not for those that combine elements
  (``clip_by_global_norm``, ``adafactor``), which still see the masked weights' gradients there.
  Wrapped in ``optax.MultiSteps`` the first update applied is the k-th call's: start from
  ``apply_masks(params, weight_masks)`` to have the masked weights zero throughout.

  Args:
    tx: any optax optimizer.
    weight_masks: bool pytree with the structure and shapes of the params (True keeps).

  Returns:
    An ``optax.GradientTransformation`` whose state is ``(MaskedState(masks), tx's state)``
    (:func:`masks_of` reads the masks, :func:`replace_masks` replaces them: ``update`` reads
    the state's masks, not ``weight_masks``); ``update`` needs ``params``.

  Example:
    >>> import jax.numpy as jnp, optax, jaxprune
    >>> params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]])}
    >>> masks = {"w": jnp.array([[True, False], [True, True]])}
    >>> tx = jaxprune.masked_optimizer(optax.adafactor(0.1), masks)
    >>> state = tx.init(params)
    >>> updates, state = tx.update({"w": jnp.ones((2, 2))}, state, params)
    >>> optax.apply_updates(params, updates)["w"][0, 1]
    Array(0., dtype=float32)
  """

  _check_tx(tx)

  def init_fn(params):
    masks_lib.check_weight_masks(params, weight_masks)
    _check_masked_finite(params, weight_masks, "masked_optimizer")
    return (MaskedState(_own_copy(weight_masks)),
            tx.init(masks_lib.apply_masks(params, weight_masks)))

  def update_fn(updates, state, params=None, **extra_args):
    _need_params("masked_optimizer", params)
    masked, inner_state = state
    masks_lib.check_weight_masks(params, masked.masks)
    out, inner_state = masked_update(tx, updates, inner_state, params, masked.masks,
                                     **extra_args)
    return out, (masked, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# ----------------------------------------------------------------------------- schedule


def polynomial_sparsity(step, *, final, begin_step: int, end_step: int, initial=0.0,
                        power=3):
  """Zhu and Gupta's schedule ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0))^power``.

  ``initial`` before ``begin_step`` (``t0``), ``final`` from ``end_step`` (``t1``) on. Jit-safe
  (``step`` may be traced); float32.

  Example:
    >>> round(float(polynomial_sparsity(5, final=0.8, begin_step=0, end_step=10)), 6)
    0.7
  """
  _check_schedule(begin_step, end_step, 1, end_required=True)
  _check_power(power)
  _check_sparsity("final", final)
  _check_sparsity("initial", initial)
  # Steps since begin_step counted in integers: in float32 a step above 2**24 rounds, and
  # end_step gave 0.9072 for a final 0.9 at 2e7 (below 2**24 the bits are the same).
  if isinstance(step, (int, np.integer)) and not isinstance(step, bool):   # any size
    d = jnp.float32(min(max(int(step), begin_step), end_step) - begin_step)
  elif jnp.issubdtype(jnp.result_type(step), jnp.integer):
    d = (jnp.clip(step, begin_step, end_step) - begin_step).astype(jnp.float32)
  else:
    d = jnp.clip(jnp.asarray(step, jnp.float32), begin_step, end_step) - jnp.float32(begin_step)
  x = d / jnp.float32(end_step - begin_step)
  decay = (1.0 - x) ** power
  sf = jnp.asarray(final, jnp.float32)
  return sf + (jnp.asarray(initial, jnp.float32) - sf) * decay


def _is_update_step(count, begin_step, end_step, frequency, at_end):
  """Steps ``begin_step + k * frequency`` up to ``end_step``, and ``end_step`` itself when
  ``at_end`` (gradual's schedule reaches its target there; scheduled's grid alone)."""
  on = (count >= begin_step) & ((count - begin_step) % frequency == 0)
  if end_step is None:
    return on
  return (on & (count <= end_step)) | (at_end & (count == end_step))


# ----------------------------------------------------------------------------- pruners on a schedule


class StepPruner(NamedTuple):
  """A pruner that :func:`gradual` or :func:`scheduled` calls inside the optimizer's update.

  Attributes:
    init: ``params -> state`` (e.g. unit masks).
    prune: ``(params, weight_masks, state, grads, sparsity) -> (params, weight_masks, state)``;
      ``sparsity`` is the scheduled target (None under :func:`scheduled`). Jit-safe.
    takes_sparsity: whether it needs a scheduled sparsity (:func:`gradual`) or decides its own
      counts (:func:`scheduled`).
    changes_params: whether ``prune`` returns changed params (e.g. merged units); the change
      is then added to the update.
  """

  init: Callable[[PyTree], PyTree]
  prune: Callable[..., tuple[PyTree, PyTree, PyTree]]
  takes_sparsity: bool
  changes_params: bool


class PruningState(NamedTuple):
  """State of :func:`gradual` and :func:`scheduled`.

  Attributes:
    count: number of updates so far (int32).
    masks: the current weight masks (bool pytree like the params).
    pruner_state: the pruner's own state (unit masks for structured pruners, else ``()``).
    inner_state: the wrapped optimizer's state.
  """

  count: jax.Array
  masks: PyTree
  pruner_state: PyTree
  inner_state: optax.OptState


def _wrap(tx: optax.GradientTransformation, pruner: StepPruner, target_fn, begin_step, end_step,
          frequency, at_end: bool) -> optax.GradientTransformation:
  _check_tx(tx)

  def init_fn(params):
    for k, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
      validate.check_finite(f"gradual/scheduled: params{jax.tree_util.keystr(k)}", leaf,
                            "a pruner cannot rank NaN (a NaN weight would be kept forever). "
                            "Repair them (e.g. load the params from before training "
                            "diverged).")
    return PruningState(masks_lib.host_built(params, np.zeros((), np.int32)),
                        masks_lib.ones_like(params), pruner.init(params), tx.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    _need_params("gradual/scheduled", params)
    masks_lib.check_weight_masks(params, state.masks)
    count = state.count
    now = _is_update_step(count, begin_step, end_step, frequency, at_end)
    target = None if target_fn is None else target_fn(count)

    if pruner.changes_params:
      def do(op):
        return pruner.prune(op[0], op[1], op[2], updates, target)
      new_params, masks, pstate = jax.lax.cond(now, do, lambda op: op,
                                               (params, state.masks, state.pruner_state))
    else:
      def do_masks(op):
        _, m, s = pruner.prune(params, op[0], op[1], updates, target)
        return m, s
      masks, pstate = jax.lax.cond(now, do_masks, lambda op: op,
                                   (state.masks, state.pruner_state))
      new_params = None
    grads = masks_lib.apply_masks(updates, masks)   # (params and masks were checked above)
    inner, inner_state = optax.with_extra_args_support(tx).update(
        grads, state.inner_state, masks_lib.zero_masked(params, masks), **extra_args)
    if new_params is not None:
      inner = jax.tree.map(lambda u, n, p: u + (n - p).astype(u.dtype), inner, new_params, params)
    out = _masked_updates(inner, masks, params)
    return out, PruningState(optax.safe_int32_increment(count), masks, pstate, inner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gradual(tx: optax.GradientTransformation, *, sparsity, begin_step: int, end_step: int,
            frequency: int, scope: str | None = None, power=3, initial_sparsity=0.0,
            scores: Callable | None = None, select: Select = None,
            pruner: StepPruner | None = None) -> optax.GradientTransformation:
  """Wraps ``tx`` into an optimizer that prunes while it trains (Zhu and Gupta 2017).

  At update ``t`` (the ``t``-th call of this transformation's ``update``, from 0: under
  ``optax.MultiSteps`` one per accumulated step, and a step that ``optax.apply_if_finite``
  skips is not counted) with ``t = begin_step + k * frequency <= end_step`` and at
  ``t = end_step``, the masks are recomputed from the params passed to ``update``: the
  smallest-scored kept weights are removed until ``round(s_t * N)`` of the ``N`` selected
  weights are pruned, with ``s_t`` from :func:`polynomial_sparsity`. Pruned
  weights stay pruned. The target is reached exactly at ``end_step``. Gradients of pruned weights
  are zeroed before ``tx`` sees them, and the returned updates zero the pruned weights.

  One-shot pruning at step T is ``begin_step=0, end_step=T, frequency=T``; iterative pruning in k
  equal steps is ``power=1, frequency=(end_step - begin_step) // k`` when ``end_step -
  begin_step`` is a multiple of k (otherwise a last, smaller step comes at ``end_step``).

  Args:
    tx: the optimizer to wrap.
    sparsity: final sparsity in [0, 1): a float (over all selected leaves with ``scope='global'``,
      or per leaf with ``scope='layer'``), or a per-leaf map ``{'a/b/c': s}`` (see
      :func:`erk_sparsity`, :func:`uniform_sparsity`; its keys are the selection). With a
      structured ``pruner``, the fraction of the group's units.
    begin_step, end_step, frequency: the schedule (ints; ``end_step > begin_step``,
      ``frequency >= 1``).
    scope: ``'global'`` (default for a float) or ``'layer'``; a map is always per leaf.
    power: the schedule's exponent (3 in the paper).
    initial_sparsity: ``s_i``, the sparsity at ``begin_step`` (default 0).
    scores: optional ``scores(params, grads)`` or ``scores(params)`` returning a pytree like
      params of non-negative saliencies (larger is kept); default ``|params|``. E.g.
      :func:`saliency_scores` for ``|w * g|`` with each step's gradients.
    select: which leaves (default every floating-point leaf with ``ndim >= 2``; see
      :func:`jaxprune.pruners.select_leaves`).
    pruner: a structured :class:`StepPruner` instead (e.g. :func:`importance_pruner`).

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`PruningState`.
  """
  _check_schedule(begin_step, end_step, frequency, end_required=True, caller="gradual")
  _check_power(power)
  _check_sparsity("initial_sparsity", initial_sparsity)
  sparsity = _sparsity_map_or_float(sparsity)
  finals = list(sparsity.values()) if isinstance(sparsity, Mapping) else [sparsity]
  if _common.is_concrete(finals, initial_sparsity) and any(
      float(initial_sparsity) > float(f) for f in finals):
    raise ValueError(f"initial_sparsity ({initial_sparsity}) exceeds the final sparsity "
                     f"{sparsity}; pruned weights are never restored, so it must be smaller.")
  if pruner is None:
    pruner = unstructured_pruner(sparsity, scope=scope, scores=scores, select=select)
  else:
    if not isinstance(pruner, StepPruner):
      raise TypeError(f"pruner must be a jaxprune StepPruner, got {type(pruner).__name__}.")
    if not pruner.takes_sparsity:
      raise ValueError("This pruner decides its own counts (e.g. distinctiveness_pruner); run "
                       "it with jaxprune.scheduled(tx, pruner, ...) instead of gradual.")
    if scope is not None or scores is not None or select is not None:
      raise ValueError("scope, scores and select apply to unstructured pruning; a structured "
                       "pruner carries its own settings.")

  def target_fn(count):
    def one(s):
      s_t = polynomial_sparsity(count, final=s, begin_step=begin_step, end_step=end_step,
                                initial=initial_sparsity, power=power)
      # A traced final sparsity outside [0, 1) (refused when concrete) makes every step's
      # target NaN, so no step prunes: the early steps' targets were inside [0, 1) and pruned
      # towards it (a final 1.5 left 63 of 64 weights pruned, unflagged).
      return jnp.where(_sparsity_ok(s), s_t, jnp.nan)
    return jax.tree.map(one, sparsity)

  return _wrap(tx, pruner, target_fn, begin_step, end_step, frequency, at_end=True)


def scheduled(tx: optax.GradientTransformation, pruner: StepPruner, *, begin_step: int,
              frequency: int, end_step: int | None = None) -> optax.GradientTransformation:
  """Wraps ``tx`` to run a pruner that decides its own counts every ``frequency`` steps.

  The pruner runs inside the update at steps ``begin_step + k * frequency`` (up to ``end_step``
  when given, and not at ``end_step`` unless it is one of them: unlike :func:`gradual`, there is
  no target to reach there); e.g. :func:`distinctiveness_pruner` merges similar units each
  time. Masks live in the state as under :func:`gradual`.
  """
  _check_schedule(begin_step, end_step, frequency, end_required=False, caller="scheduled")
  if not isinstance(pruner, StepPruner):
    raise TypeError(f"pruner must be a jaxprune StepPruner, got {type(pruner).__name__}.")
  if pruner.takes_sparsity:
    raise ValueError("This pruner needs a sparsity schedule; use jaxprune.gradual(tx, "
                     "sparsity=..., pruner=pruner, ...).")
  return _wrap(tx, pruner, None, begin_step, end_step, frequency, at_end=False)


def _states(opt_state, classes) -> list:
  """Every state of ``classes`` in ``opt_state`` (through ``optax.chain`` tuples and other
  nested containers), outermost first; found ones, and a :class:`PruningState`, are not
  searched inside."""
  if isinstance(opt_state, classes):
    return [opt_state]
  if isinstance(opt_state, PruningState):
    return []
  children = (opt_state.values() if isinstance(opt_state, Mapping) else
              opt_state if isinstance(opt_state, (tuple, list)) else ())
  return [s for c in children for s in _states(c, classes)]


def _holder_state(opt_state):
  """The optimizer state of a flax ``TrainState`` or an ``nnx.Optimizer`` (their
  ``.opt_state``); anything else as it is."""
  if not isinstance(opt_state, (Mapping, tuple, list)) and hasattr(opt_state, "opt_state"):
    return opt_state.opt_state
  return opt_state


def _nnx_opt_types():
  try:
    from flax.nnx.training import optimizer as nnx_optimizer
  except ImportError:  # pragma: no cover - flax without nnx
    return None
  return nnx_optimizer.OptState, nnx_optimizer.OptVariable


def _from_nnx_optimizer(tree, like=None):
  """Masks as the user built them from a state that ``nnx.Optimizer`` stored: it keeps every
  array of its optax state in an ``OptVariable`` (from a variable such as ``nnx.Param``) or
  ``OptArray`` container, which ``apply_masks`` and ``masked_optimizer`` would refuse against
  the model's ``nnx.Param`` state. ``OptVariable`` becomes ``nnx.Param`` (the optimizer's usual
  ``wrt``), ``OptArray`` its plain array; with ``like`` (the state the optimizer updates) the
  masks take ``like``'s containers instead."""
  types = _nnx_opt_types()
  if types is None:
    return tree
  opt_state_cls, opt_variable_cls = types
  is_opt = lambda x: isinstance(x, opt_state_cls)
  if not any(is_opt(x) for x in jax.tree.leaves(tree, is_leaf=is_opt)):
    return tree
  if like is not None:
    values = [x.get_value() if is_opt(x) else x for x in jax.tree.leaves(tree, is_leaf=is_opt)]
    n = len(jax.tree.leaves(like))
    if len(values) != n:
      raise ValueError(f"masks_of(..., like=): the optimizer's masks have {len(values)} leaves "
                       f"but like has {n}; pass the state the optimizer updates "
                       "(nnx.state(model, wrt)).")
    out = jax.tree.unflatten(jax.tree.structure(like), values)
    masks_lib.check_weight_masks(like, out)
    return out
  from flax import nnx

  def unwrap(x):
    if isinstance(x, opt_variable_cls):
      return nnx.Param(x.get_value())
    return x.get_value() if is_opt(x) else x

  return jax.tree.map(unwrap, tree, is_leaf=is_opt)


_is_masked_node = lambda x: isinstance(x, optax.MaskedNode)


def _has_masked_node(tree) -> bool:
  return any(_is_masked_node(x) for x in jax.tree.leaves(tree, is_leaf=_is_masked_node))


def _fill_masked_nodes(masks: PyTree, like: PyTree) -> PyTree:
  """``MaskedNode()`` places (leaves no branch prunes) as all-True masks shaped like ``like``."""
  try:
    # (a MaskedNode may stand for a whole subtree: multi_transform's labels may be a prefix)
    ones = lambda p: jax.tree.map(lambda x: jnp.ones(jnp.shape(x), bool), p)
    filled = jax.tree.map(lambda m, p: ones(p) if _is_masked_node(m) else m,
                          masks, like, is_leaf=_is_masked_node)
  except ValueError as e:
    raise ValueError("masks_of(..., like=): the optimizer's masks do not have the structure of "
                     f"like ({e}); pass the params the optimizer updates.") from None
  masks_lib.check_weight_masks(like, filled)
  return filled


def masks_of(opt_state, *, like: PyTree | None = None) -> PyTree:
  """The weight masks held by a :func:`gradual`, :func:`scheduled`, :func:`keep_masked` or
  :func:`masked_optimizer` state (searched through ``optax.chain`` tuples and other nested
  states).

  ``opt_state`` may also be a flax ``TrainState`` or an ``nnx.Optimizer`` (their
  ``.opt_state`` is searched). ``nnx.Optimizer`` stores its state's arrays in its own
  containers; the masks come back in ``nnx.Param`` containers, or in the containers of
  ``like`` when given (the state the optimizer updates, ``nnx.state(model, wrt)``: pass it when
  ``wrt`` is not ``nnx.Param``), so they fit ``apply_masks`` and ``masked_optimizer``.

  Inside ``optax.multi_transform`` (or ``optax.masked``) each branch prunes its own leaves and
  sees ``optax.MaskedNode()`` at the others: the masks of every branch are merged into one
  tree; leaves that no branch prunes stay ``MaskedNode()``, or become all-True masks with
  ``like=params``, so that the result fits the params. Nested states (a ``gradual`` around or
  inside a ``masked_optimizer``, or around another ``gradual``) are merged too: a weight any
  of them removes is removed."""
  state = _holder_state(opt_state)
  found = _nested_states(state, (PruningState, MaskedState))
  if not found:
    hint = (" (nnx.state(optimizer) turns the optimizer's state into plain dicts: pass the "
            "nnx.Optimizer itself, or its .opt_state)" if type(opt_state).__name__ == "State"
            else "")
    raise ValueError(f"This optimizer state ({type(opt_state).__name__}) holds no masks{hint}; "
                     "build the optimizer with jaxprune.gradual, jaxprune.scheduled, "
                     "jaxprune.keep_masked or jaxprune.masked_optimizer.")
  masks = found[0].masks
  for other in found[1:]:
    masks = _both(masks, other.masks)
  # Copies: a step that donates the state (jax.jit(step, donate_argnums=...)) must not free
  # the masks handed out here, as it does not free those passed in (_own_copy).
  if like is not None and _has_masked_node(masks):
    return _own_copy(_fill_masked_nodes(_from_nnx_optimizer(masks), like))
  return _own_copy(_from_nnx_optimizer(masks, like))


def _nested_states(opt_state, classes) -> list:
  """Every state of ``classes`` in ``opt_state``, outermost first, those nested in another's
  optimizer state too (a :func:`gradual` wrapping a :func:`masked_optimizer` or another
  ``gradual``)."""
  out = []
  for s in _states(opt_state, classes + (PruningState,)):
    if isinstance(s, classes):
      out.append(s)
    if isinstance(s, PruningState):
      out += _nested_states(s.inner_state, classes)
  return out


def _both(a: PyTree, b: PyTree) -> PyTree:
  """Two states' masks as one: a weight either removes is removed; ``optax.MaskedNode()`` (a
  place the state's ``optax.multi_transform`` branch does not prune, a leaf or a whole subtree
  where the labels are a prefix of the params) takes the other's."""
  if _is_masked_node(a):
    return b
  if _is_masked_node(b):
    return a
  kids_a, node_a = jax.tree.flatten(a, is_leaf=lambda x: x is not a)   # one level down
  kids_b, node_b = jax.tree.flatten(b, is_leaf=lambda x: x is not b)
  if jax.tree_util.treedef_is_leaf(node_a) and jax.tree_util.treedef_is_leaf(node_b):
    return a & b
  if node_a != node_b:
    raise ValueError(f"masks_of: this optimizer state holds masks of two structures that do not "
                     f"fit together ({node_a} and {node_b}); read each pruning state's .masks.")
  return jax.tree.unflatten(node_a, [_both(x, y) for x, y in zip(kids_a, kids_b)])


def _mask_paths(tree) -> list[str]:
  """The key paths of ``tree``'s mask leaves (an nnx ``Variable`` is one leaf: plain arrays
  and ``nnx.Param`` containers of the same masks have the same paths)."""
  is_var = lambda x: hasattr(x, "get_value") and not isinstance(x, jax.Array)
  return [jax.tree_util.keystr(k)
          for k, _ in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_var)[0]]


def replace_masks(opt_state, weight_masks: PyTree):
  """``opt_state`` with the masks of its :func:`keep_masked` / :func:`masked_optimizer` state
  replaced by ``weight_masks``: prune again between rounds of training and keep the
  optimizer's statistics (Adam's moments), without compiling the training step again.

  ``update`` reads the masks held in the state, not those the transformation was built with:
  ``masked_optimizer(tx, new_masks).update(grads, old_state, params)`` trains with the old
  masks (the new ones are read only by ``init``). Use this instead::

    opt_state = jaxprune.replace_masks(opt_state, new_masks)

  ``opt_state`` may be an optax state (an ``optax.chain`` tuple or any nesting of tuples,
  lists and dicts; a new state is returned, the given one is left as it was), a flax
  ``TrainState`` (a new one is returned) or an ``nnx.Optimizer`` (changed in place and
  returned). ``weight_masks`` must have the structure and shapes of the masks held (the
  params'); plain arrays or the ``nnx.State`` of ``nnx.Param`` containers that ``apply_masks``
  takes. Every ``MaskedState`` of the state takes them, those nested in a :func:`gradual` /
  :func:`scheduled` state's optimizer too. The masks of :func:`gradual` and
  :func:`scheduled` follow their schedule and are not replaced (a ValueError when the state
  holds only those, or holds masks of several ``optax.multi_transform`` branches)."""
  holder, state = opt_state, _holder_state(opt_state)
  found = _nested_states(state, (MaskedState,))
  if not found:
    on_schedule = bool(_states(state, (PruningState,)))
    what = ("only the masks of jaxprune.gradual or jaxprune.scheduled, which follow their "
            "schedule" if on_schedule else "no masks")
    resume = (" To resume such a run from a checkpoint, save its whole optimizer state and "
              "restore it into a fresh tx.init(params) (orbax; docs/training.md, 'Resuming a "
              "run on a schedule'); to train on with masks of your own, build "
              "jaxprune.masked_optimizer(tx, masks).") if on_schedule else ""
    raise ValueError(f"replace_masks: this optimizer state ({type(opt_state).__name__}) holds "
                     f"{what}; it replaces the masks of jaxprune.keep_masked and "
                     f"jaxprune.masked_optimizer.{resume}")
  new_leaves = jax.tree.leaves(weight_masks)
  for held in found:
    if _has_masked_node(held.masks):
      raise ValueError("replace_masks: these masks belong to one branch of optax.multi_transform "
                       "(other leaves are optax.MaskedNode()); build the optimizer again with "
                       "the new masks, or replace that branch's state yourself.")
    held_masks = _from_nnx_optimizer(held.masks)
    old = jax.tree.leaves(held_masks)
    held_paths, new_paths = _mask_paths(held_masks), _mask_paths(weight_masks)
    if held_paths != new_paths:
      raise ValueError(f"replace_masks: the new masks must have the held masks' structure: their "
                       f"leaves are {new_paths[:4]}{'...' if len(new_paths) > 4 else ''}, the "
                       f"held ones {held_paths[:4]}{'...' if len(held_paths) > 4 else ''}.")
    if len(old) != len(new_leaves) or any(
        np.shape(a) != np.shape(b) or jnp.result_type(b) != jnp.bool_
        for a, b in zip(old, new_leaves)):
      got = [(tuple(np.shape(b)), str(jnp.result_type(b))) for b in new_leaves]
      want = [(tuple(np.shape(a)), "bool") for a in old]
      raise ValueError(f"replace_masks: the new masks must have the held masks' leaves, shapes "
                       f"and dtype (bool): got {got[:4]}{'...' if len(got) > 4 else ''}, held "
                       f"{want[:4]}{'...' if len(want) > 4 else ''}.")
  types = _nnx_opt_types()
  is_opt = (lambda x: isinstance(x, types[0])) if types else (lambda x: False)
  if any(is_opt(x) for x in jax.tree.leaves(found[0].masks, is_leaf=is_opt)):
    for held in found:                          # nnx.Optimizer: its containers, in place
      for var, new in zip(jax.tree.leaves(held.masks, is_leaf=is_opt), new_leaves):
        var.set_value(_own_copy(new))
    return holder

  copies = jax.tree.unflatten(jax.tree.structure(found[0].masks), new_leaves)

  def swap(s):
    if isinstance(s, MaskedState):
      return MaskedState(_own_copy(copies))
    if isinstance(s, PruningState):             # (its own masks follow its schedule)
      return s._replace(inner_state=swap(s.inner_state))
    if isinstance(s, tuple):
      kids = [swap(c) for c in s]
      return type(s)(*kids) if hasattr(s, "_fields") else tuple(kids)
    if isinstance(s, list):
      return [swap(c) for c in s]
    if isinstance(s, Mapping):
      return type(s)({k: swap(v) for k, v in s.items()})
    return s

  if holder is not state:                       # a flax TrainState
    return holder.replace(opt_state=swap(state))
  return swap(state)


def unit_masks_of(opt_state) -> dict:
  """The unit masks of a structured pruner's state inside a :func:`gradual` or
  :func:`scheduled` state (or a ``TrainState`` / ``nnx.Optimizer`` holding one): of every such
  state, nested or in ``optax.multi_transform`` branches (a group two of them prune keeps the
  units both keep)."""
  found = [s.pruner_state for s in _nested_states(_holder_state(opt_state), (PruningState,))
           if isinstance(s.pruner_state, Mapping)]
  if not found:
    raise ValueError("This optimizer state holds no unit masks; build the optimizer with a "
                     "structured pruner (jaxprune.importance_pruner, "
                     "jaxprune.distinctiveness_pruner).")
  units = {}
  found = _own_copy(found)      # (copies: a donating step must not free what is handed out)
  for held in found:            # (several gradual states, nested or in branches: every group;
    for g, m in _from_nnx_optimizer(dict(held)).items():   # a unit either removes is removed)
      units[g] = units[g] & m if g in units else m
  return units


# ----------------------------------------------------------------------------- unstructured core


def _selection(params, sparsity, select):
  """(selected leaf indices, per-leaf target or None)."""
  if isinstance(sparsity, Mapping):
    if select is not None:
      raise ValueError("A per-leaf sparsity map selects its own leaves; do not pass select=.")
    idx = magnitude_lib.select_leaves(params, list(sparsity))
    names = magnitude_lib.leaf_names(params)
    return idx, [sparsity[names[i]] for i in idx]
  return magnitude_lib.select_leaves(params, select), None


def _call_scores(fn, params, grads):
  """``fn(params, grads)``, or ``fn(params)`` for a function of the params alone."""
  try:
    sig = inspect.signature(fn)
    sig.bind(params, grads)
  except TypeError:
    return fn(params)
  except ValueError:  # no signature (some builtins): assume (params, grads)
    pass
  return fn(params, grads)


def _check_scores(sc, params, selected, given: bool, keep=None) -> None:
  """Concrete scores must be finite where ``keep`` (the selected leaves' masks; None: all)
  keeps weights (a NaN's bit pattern would rank above every weight, so NaN weights were always
  kept; one the masks already remove is not ranked) and, when the user gave them,
  non-negative (they are compared as magnitudes). Traced scores (inside ``gradual``) cannot
  raise: a step whose scores are not so removes nothing (:func:`_scores_ok`)."""
  if not validate.is_concrete(sc):
    return
  if keep is None or not validate.is_concrete(keep):   # traced masks: check every weight
    keep = [True] * len(sc)
  # Run now, also inside a traced step (gradual's lax.cond, a jit), where the check of
  # concrete scores (SNIP scores computed once) was staged into the step and unreadable.
  with jax.ensure_compile_time_eval():
    problems = _score_problems(sc, keep)
  _raise_score_problems(problems, params, selected, given)


def _raise_score_problems(problems, params, selected, given: bool) -> None:
  """Raises for the first leaf :func:`_problems_of` flags (see :func:`_check_scores`)."""
  bad, negative = (np.asarray(a) for a in problems)  # two small vectors
  names = magnitude_lib.leaf_names(params)
  what = "scores" if given else "Parameters"
  for i, b, n in zip(selected, bad, negative):
    if b:
      raise ValueError(f"{what} of {names[i]} hold {int(b)} NaN or infinite values where the "
                       "masks keep weights; the ranking is undefined there. Fix them, remove "
                       "those weights with the masks, or exclude that leaf with select=.")
    if given and n:
      raise ValueError(f"The scores of {names[i]} hold negative values; scores are magnitudes "
                       "(larger kept), >= 0: pass their absolute values (jnp.abs).")


def _problems_of(sc, keep):
  """Per score leaf: how many values are not finite where ``keep`` is True, and whether any is
  negative (reduced where the scores live: a device array is not copied to the host)."""
  return (jnp.stack([jnp.sum(~jnp.isfinite(s) & k) for s, k in zip(sc, keep)]),
          jnp.stack([jnp.any(s < 0) for s in sc]))


_score_problems = jax.jit(_problems_of)


@jax.jit
def _abs_scores(leaves, keep):
  """``|w|`` of the selected leaves and their :func:`_problems_of`, in one program (eager
  ``jnp.abs`` would compile one small program per leaf shape first)."""
  sc = [jnp.abs(x) for x in leaves]
  return sc, _problems_of(sc, keep)


def _score_leaves(scores, params, grads, selected, masks=None):
  """One score array per selected leaf (``|w|`` by default), checked (see
  :func:`_check_scores`; only where ``masks`` keep weights)."""
  leaves = jax.tree.leaves(params)
  keep = None if masks is None else [jax.tree.leaves(masks)[i] for i in selected]
  names = magnitude_lib.leaf_names(params)
  if scores is None:
    chosen = [leaves[i] for i in selected]
    magnitude_lib.check_integer_scores([(names[i], leaves[i]) for i in selected])
    if not validate.is_concrete(chosen):   # traced (inside gradual): the jnp path, unchecked
      return [jnp.abs(x) for x in chosen]
    if keep is None or not validate.is_concrete(keep):
      keep = [True] * len(chosen)
    out, problems = _abs_scores(chosen, keep)
    if validate.is_concrete(problems):   # (inside an outer trace they are traced: unchecked)
      _raise_score_problems(problems, params, selected, False)
    return out
  tree = _call_scores(scores, params, grads) if callable(scores) else scores
  if jax.tree.structure(tree) != jax.tree.structure(params):
    raise ValueError("The scores must be a pytree with the structure of the params (one score "
                     f"per weight); got {jax.tree.structure(tree)} for params "
                     f"{jax.tree.structure(params)}.")
  sl = jax.tree.leaves(tree)
  for i in selected:
    if tuple(jnp.shape(sl[i])) != tuple(jnp.shape(leaves[i])):
      name = magnitude_lib.leaf_names(params)[i]
      raise ValueError(f"The score of {name} has shape {tuple(jnp.shape(sl[i]))} but the "
                       f"parameter has shape {tuple(jnp.shape(leaves[i]))}; return one score per "
                       "weight.")
  for i in selected:
    if jnp.iscomplexobj(sl[i]):   # a float cast would keep the real part alone
      name = magnitude_lib.leaf_names(params)[i]
      raise TypeError(f"The score of {name} is complex ({jnp.result_type(sl[i])}); scores must "
                      "be real (larger kept): return jnp.abs(z) or jnp.real(z), whichever is "
                      "meant.")
  magnitude_lib.check_integer_scores([(f"the score of {names[i]}", sl[i]) for i in selected],
                                     "Pruning by scores")
  out = [_wide(sl[i]) for i in selected]
  _check_scores(out, params, selected, True, keep)
  return out


def _wide(x) -> jax.Array:
  """``x`` as float32, or float64 if it is float64 (under x64: a float32 cast would tie scores
  that differ beyond its precision); bfloat16 / float16 widened (their sums round and
  overflow)."""
  x = jnp.asarray(x)
  return x if x.dtype == jnp.float64 else x.astype(jnp.float32)


def _n_target(s, n: int):
  return _common.round_count(s, n)


def _to_sparsity(masks, scores, target, per_leaf, selected, scope):
  """New masks with ``round(s * N)`` of the selected weights removed (never restoring one)."""
  mleaves, treedef = jax.tree.flatten(masks)
  keep = [mleaves[i] for i in selected]
  bits = [magnitude_lib._bits(s) for s in scores]
  if per_leaf is not None or scope == "layer":
    targets = per_leaf if per_leaf is not None else [target] * len(selected)
    removed = []
    for b, m, s in zip(bits, keep, targets):
      k = _n_target(s, m.size) - (m.size - jnp.sum(m, dtype=jnp.int32))
      removed.append(magnitude_lib._remove_smallest([b], [m], jnp.maximum(k, 0))[0])
  else:
    total = sum(m.size for m in keep)
    kept = sum(jnp.sum(m, dtype=jnp.int32) for m in keep)
    k = _n_target(target, total) - (total - kept)
    removed = magnitude_lib._remove_smallest(bits, keep, jnp.maximum(k, 0))
  ok = _valid_targets(target, per_leaf)   # traced values outside [0, 1): nothing removed
  ok = ok & _scores_ok(scores, keep)      # traced NaN, infinite or negative scores: the same
  new = list(mleaves)
  for i, r in zip(selected, removed):
    new[i] = mleaves[i] & ~(r & ok)
  return jax.tree.unflatten(treedef, new)


def _scores_ok(scores, keep) -> jax.Array:
  """Whether every score of a weight the masks keep is a finite, non-negative number.
  Concrete scores were refused on the host (:func:`_check_scores`); traced ones (inside
  ``gradual``, or a jitted ``prune_to_sparsity``) remove nothing when one is not: a NaN's bit
  pattern would rank above every weight, so it was kept while the largest weights went."""
  ok = jnp.bool_(True)
  for s, m in zip(scores, keep):
    ok = ok & jnp.all(~m | (jnp.isfinite(s) & (s >= 0)))
  return ok


def _valid_targets(target, per_leaf) -> jax.Array:
  """Whether every sparsity target is a finite number in [0, 1) (concrete ones were checked
  on the host; traced ones are checked here)."""
  values = [target] if per_leaf is None else list(per_leaf)
  ok = jnp.bool_(True)
  for s in values:
    ok = ok & jnp.all(_sparsity_ok(s))
  return ok


def _sparsity_ok(s) -> jax.Array:
  """Elementwise: a finite sparsity in [0, 1) (as float32)."""
  s = jnp.asarray(s, jnp.float32)
  return jnp.isfinite(s) & (s >= 0) & (s < 1)


def _flag_invalid(params, sparsity, per_leaf, selected, scores=(), masks=None):
  """Pruned ``params`` with the selected leaves NaN when a traced sparsity is not in [0, 1),
  or traced ``scores`` (of the selected leaves) fail :func:`_scores_ok` where ``masks`` keep
  weights (either prunes nothing): there is no report to carry the flag, as ``jnp.sqrt(-1.0)``
  is NaN. Concrete values were refused on the host and leave ``params`` as they are."""
  values = [sparsity] if per_leaf is None else list(per_leaf)
  traced_scores = not all(_common.is_concrete(s) for s in scores)
  if all(_common.is_concrete(v) for v in values) and not traced_scores:
    return params
  ok = _valid_targets(sparsity if per_leaf is None else 0.0, per_leaf)
  if traced_scores:
    mleaves = jax.tree.leaves(masks)
    ok = ok & _scores_ok(scores, [mleaves[i] for i in selected])
  leaves, treedef = jax.tree.flatten(params)
  for i in selected:
    leaves[i] = jnp.where(ok, leaves[i], jnp.nan)
  return jax.tree.unflatten(treedef, leaves)


def _check_scope(scope, sparsity):
  if scope not in (None, "global", "layer"):
    raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}.")
  if isinstance(sparsity, Mapping) and scope == "global":
    raise ValueError("A per-leaf sparsity map sets each leaf's own sparsity; use scope='layer' "
                     "(or leave scope unset), or pass one float for a global target.")
  return scope or "global"


def unstructured_pruner(sparsity, *, scope: str | None = None, scores: Callable | None = None,
                        select: Select = None) -> StepPruner:
  """The default pruner of :func:`gradual`: exact-count unstructured pruning by score."""
  sparsity = _sparsity_map_or_float(sparsity)
  scope = _check_scope(scope, sparsity)
  if scores is not None and not callable(scores):
    raise TypeError("scores must be a function scores(params, grads) or scores(params) -> "
                    "pytree like params.")

  def prune(params, masks, state, grads, target):
    selected, _ = _selection(params, sparsity, select)
    sc = _score_leaves(scores, params, grads, selected)
    if isinstance(target, Mapping):
      names = magnitude_lib.leaf_names(params)
      per_leaf = [target[names[i]] for i in selected]
    else:
      per_leaf = None
    return params, _to_sparsity(masks, sc, target, per_leaf, selected, scope), state

  def init(params):
    _selection(params, sparsity, select)   # a map key or select= naming no leaf: refused here
    return ()

  return StepPruner(init, prune, takes_sparsity=True, changes_params=False)


def prune_to_sparsity(params: PyTree, weight_masks: PyTree | None = None, sparsity=0.5, *,
                      scores: PyTree | None = None, scope: str | None = None,
                      select: Select = None) -> tuple[PyTree, PyTree]:
  """One-shot pruning to a target sparsity: ``round(s * N)`` of the selected weights removed.

  Args:
    params: any params pytree.
    weight_masks: current masks (None: all kept); pruned weights stay pruned.
    sparsity: a float in [0, 1) or a per-leaf map (see :func:`erk_sparsity`).
    scores: None (``|w|``) or a pytree like params of non-negative scores (larger kept), e.g.
      :func:`saliency_scores` or :func:`snip_scores`.
    scope: ``'global'`` (default) or ``'layer'``.
    select: which leaves (default: every floating-point leaf with ``ndim >= 2``).

  Returns:
    ``(params with pruned weights zeroed, weight_masks)``. Leaves placed by hand on different
    devices are ranked together on the first leaf's device and returned where they were.
  """
  out = _ranked_on_one_device(prune_to_sparsity, params, weight_masks, scores, sparsity,
                              scope=scope, select=select)
  if out is not None:
    return out
  sparsity = _sparsity_map_or_float(sparsity)
  scope = _check_scope(scope, sparsity)
  masks = masks_lib.ones_like(params) if weight_masks is None else weight_masks
  masks_lib.check_weight_masks(params, masks)
  selected, per_leaf = _selection(params, sparsity, select)
  sc = _score_leaves(scores, params, None, selected, masks)
  pruned, new = _TO_SPARSITY_ZEROED(params, masks, sc, sparsity if per_leaf is None else 0.0,
                                    None if per_leaf is None else tuple(per_leaf),
                                    selected=selected, scope=scope)
  return _flag_invalid(pruned, sparsity, per_leaf, selected, sc, masks), new


def _ranked_on_one_device(prune, params, weight_masks, scores, *args, **kwargs):
  """``prune(params, weight_masks, *args, scores=..., **kwargs)`` on one device, its outputs
  placed back like the params, when the leaves were placed by hand on different devices
  (:func:`jaxprune.masks.on_one_device`); None when they were not. Scores given as a function
  are called there."""
  moved = masks_lib.on_one_device(params, weight_masks, None if callable(scores) else scores)
  if moved is None:
    return None
  out = prune(*moved[:2], *args, scores=scores if callable(scores) else moved[2], **kwargs)
  return masks_lib.placed_like(out, (params, params))


def _to_sparsity_zeroed(params, masks, scores, target, per_leaf, *, selected, scope):
  """The new masks and the params zeroed by them, in one program (the zeroing is the same
  ``where`` as :func:`jaxprune.masks.apply_masks`)."""
  new = _to_sparsity(masks, scores, target, None if per_leaf is None else list(per_leaf),
                     selected, scope)
  return masks_lib.zero_masked(params, new), new


_TO_SPARSITY_ZEROED = jax.jit(_to_sparsity_zeroed, static_argnames=("selected", "scope"))


# ----------------------------------------------------------------------------- distributions


def uniform_sparsity(params: PyTree, sparsity: float, *, select: Select = None) -> dict:
  """``{'a/b/c': sparsity}`` for every selected leaf (default: every floating-point leaf with
  ndim >= 2)."""
  _check_sparsity("sparsity", sparsity)
  names = magnitude_lib.leaf_names(params)
  return {names[i]: float(sparsity) for i in magnitude_lib.select_leaves(params, select)}


def erk_sparsity(params: PyTree, sparsity: float, *, select: Select = None,
                 power_scale: float = 1.0) -> dict:
  """Per-leaf sparsities of the Erdos-Renyi-Kernel distribution (Evci et al. 2020, RigL).

  Each selected leaf keeps a density proportional to ``(sum(shape) / prod(shape)) ** power_scale``
  (``(n_in + n_out + k_h + k_w) / (n_in n_out k_h k_w)`` for a conv kernel), scaled by one
  ``epsilon`` so that the total number of kept weights is ``(1 - sparsity) * N``. A leaf whose
  density would exceed 1 is kept dense and epsilon is solved again over the others (the standard
  rescaling).

  Returns:
    ``{'a/b/c': leaf sparsity}``, to pass as ``sparsity=`` to :func:`gradual` or
    :func:`prune_to_sparsity`.
  """
  _check_sparsity("sparsity", sparsity)
  if (isinstance(power_scale, bool) or not isinstance(power_scale, (int, float, np.number))
      or not math.isfinite(power_scale) or power_scale < 0):
    raise ValueError(f"power_scale must be a finite number >= 0 (1 is ERK, 0 gives every leaf "
                     f"the same sparsity), got {power_scale!r}.")
  names = magnitude_lib.leaf_names(params)
  leaves = jax.tree.leaves(params)
  sel = magnitude_lib.select_leaves(params, select)
  shapes = {names[i]: tuple(int(d) for d in jnp.shape(leaves[i])) for i in sel}
  if sparsity == 0:   # every leaf dense (solving for epsilon would give 1e-16 here and there)
    return {n: 0.0 for n in shapes}
  raw = {n: (sum(s) / math.prod(s)) ** power_scale for n, s in shapes.items()}
  dense: set[str] = set()
  while True:
    rhs, divisor = 0.0, 0.0
    for n, s in shapes.items():
      size = math.prod(s)
      if n in dense:
        rhs -= size * sparsity
      else:
        rhs += size * (1.0 - sparsity)
        divisor += raw[n] * size
    if divisor == 0.0:
      raise ValueError(f"No ERK distribution reaches sparsity {sparsity} over these leaves.")
    eps = rhs / divisor
    # (a leaf at density 1 can come out a rounding above it: 1 + 1e-16 is dense, not over)
    over = [n for n in shapes if n not in dense and eps * raw[n] > 1.0 + 1e-9]
    if not over:
      break
    top = max(raw[n] for n in over)
    dense |= {n for n in over if raw[n] == top}
  return {n: 0.0 if n in dense else float(max(1.0 - eps * raw[n], 0.0)) for n in shapes}


# ----------------------------------------------------------------------------- scores


def magnitude_scores(params: PyTree, grads: PyTree | None = None) -> PyTree:
  """``|w|`` (the default score)."""
  del grads
  moved = masks_lib.on_one_device(params)
  if moved is not None:   # leaves placed by hand on several devices
    return masks_lib.placed_like(_abs_tree(*moved), params)
  return _abs_tree(params)


def saliency_scores(params: PyTree, grads: PyTree) -> PyTree:
  """``|w * g|``: first-order saliency (SNIP's connection sensitivity for a batch's gradients).

  Pass as ``scores=saliency_scores`` to :func:`gradual` (it receives each step's gradients).
  """
  if grads is None:
    raise ValueError("saliency_scores needs gradients; under gradual they are each step's "
                     "gradients, one-shot use snip_scores(loss_fn, params, *batch).")
  moved = masks_lib.on_one_device(params, grads)
  if moved is not None:   # leaves placed by hand on several devices
    return masks_lib.placed_like(_abs_product(*moved), params)
  return _abs_product(params, grads)


# One compiled program per tree (eager jax.tree.map would compile one per leaf shape); under an
# outer jit or vmap they are traced into it as the same ops.
_abs_tree = jax.jit(lambda params: jax.tree.map(jnp.abs, params))
_abs_product = jax.jit(lambda params, grads: jax.tree.map(lambda w, g: jnp.abs(w * g), params,
                                                          grads))


def snip_scores(loss_fn: Callable, params: PyTree, *batch) -> PyTree:
  """SNIP saliency from a batch: ``|w * d loss_fn(params, *batch) / dw|`` (Lee et al. 2019)."""
  return saliency_scores(params, jax.grad(loss_fn)(params, *batch))


# ----------------------------------------------------------------------------- N:M and blocks


def _nm_leaf(score, mask, n, m, axis):
  s = jnp.where(mask, score, -jnp.inf)
  x = jnp.moveaxis(s, axis, -1)
  g = x.reshape(x.shape[:-1] + (x.shape[-1] // m, m))
  order = jnp.argsort(-g, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1, stable=True)
  keep = (rank < n).reshape(x.shape)
  return jnp.moveaxis(keep, -1, axis) & mask


_NM = jax.jit(lambda scores, masks, *, n, m, axis: [_nm_leaf(s, k, n, m, axis)
                                                    for s, k in zip(scores, masks)],
              static_argnames=("n", "m", "axis"))


def nm_prune(params: PyTree, weight_masks: PyTree | None = None, n: int = 2, m: int = 4, *,
             scores: PyTree | None = None, select: Select = None,
             axis: int = -2) -> tuple[PyTree, PyTree]:
  """N:M sparsity: in every group of ``m`` consecutive weights along the input axis, the ``n``
  largest-scored are kept (2:4 is what sparse tensor cores run).

  The input axis is ``-2`` of a flax/haiku kernel (``(in, out)``, ``(kh, kw, in, out)``). Weights
  already masked count as pruned (so a group may keep fewer than ``n``). Ties go to the lower
  index.

  Returns:
    ``(params with pruned weights zeroed, weight_masks)``.
  """
  for name, v in (("n", n), ("m", m)):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
      raise ValueError(f"{name} must be a positive int, got {v!r}.")
  if n > m:
    raise ValueError(f"n ({n}) must not exceed m ({m}): N:M keeps n of every m weights.")
  masks = masks_lib.ones_like(params) if weight_masks is None else weight_masks
  masks_lib.check_weight_masks(params, masks)
  selected = magnitude_lib.select_leaves(params, select)
  names = magnitude_lib.leaf_names(params)
  leaves = jax.tree.leaves(params)
  for i in selected:
    shape = jnp.shape(leaves[i])
    if not -len(shape) <= axis < len(shape):
      raise ValueError(f"{names[i]} has shape {shape}: no axis {axis}; pass axis= or select=.")
    if shape[axis] % m:
      raise ValueError(f"{names[i]} has {shape[axis]} inputs along axis {axis}, not a multiple "
                       f"of m={m}; choose m dividing it or exclude the leaf with select=.")
  sc = _score_leaves(scores, params, None, selected, masks)
  mleaves, treedef = jax.tree.flatten(masks)
  kept = _NM(sc, [mleaves[i] for i in selected], n=int(n), m=int(m), axis=int(axis))
  for i, k in zip(selected, kept):
    mleaves[i] = k
  new = jax.tree.unflatten(treedef, mleaves)
  return masks_lib.apply_masks(params, new), new


def _block_view(x, bh, bw):
  """(..., H, W) -> (..., H/bh, W/bw) block sums."""
  s = x.shape
  return x.reshape(s[:-2] + (s[-2] // bh, bh, s[-1] // bw, bw)).sum(axis=(-3, -1))


def _unblock(b, bh, bw):
  return jnp.repeat(jnp.repeat(b, bh, axis=-2), bw, axis=-1)


def _block_masks(keep, sc, target, per_leaf, bh, bw, scope):
  """The selected leaves' new masks: ``round(s * blocks)`` blocks removed by block score."""
  bscores = [_block_view(jnp.where(m, _wide(s), 0.0), bh, bw)   # summed in float32+
             for m, s in zip(keep, sc)]
  bkeep = [_block_view(m.astype(jnp.int32), bh, bw) > 0 for m in keep]
  new_b = _to_sparsity(bkeep, bscores, target, None if per_leaf is None else list(per_leaf),
                       tuple(range(len(keep))), scope)
  return [m & _unblock(b, bh, bw) for m, b in zip(keep, new_b)]


# One program (eagerly, each reshape, sum, comparison and repeat compiled its own per shape).
_BLOCKS = jax.jit(_block_masks, static_argnames=("bh", "bw", "scope"))


def block_prune(params: PyTree, weight_masks: PyTree | None = None, sparsity=0.5, *,
                block: tuple[int, int] = (4, 4), scores: PyTree | None = None,
                scope: str | None = None, select: Select = None) -> tuple[PyTree, PyTree]:
  """Block sparsity: whole ``block`` tiles of the last two axes (``(in, out)``) are removed.

  A block's score is the sum of its kept weights' scores (``|w|`` by default);
  ``round(s * blocks)`` blocks are removed, globally or per leaf, exactly. A block with any
  weight already masked counts as kept until removed as a whole.

  Returns:
    ``(params with pruned weights zeroed, weight_masks)``. Leaves placed by hand on different
    devices are ranked together on the first leaf's device and returned where they were.
  """
  out = _ranked_on_one_device(block_prune, params, weight_masks, scores, sparsity, block=block,
                              scope=scope, select=select)
  if out is not None:
    return out
  sparsity = _sparsity_map_or_float(sparsity)
  scope = _check_scope(scope, sparsity)
  if (not isinstance(block, (tuple, list)) or len(block) != 2
      or not all(isinstance(b, (int, np.integer)) and not isinstance(b, bool) for b in block)):
    raise ValueError(f"block must be two positive ints (rows, columns of the last two axes), "
                     f"e.g. block=(4, 4); got {block!r}.")
  bh, bw = (int(b) for b in block)
  if bh < 1 or bw < 1:
    raise ValueError(f"block must be two positive ints, got {block}.")
  masks = masks_lib.ones_like(params) if weight_masks is None else weight_masks
  masks_lib.check_weight_masks(params, masks)
  selected, per_leaf = _selection(params, sparsity, select)
  names = magnitude_lib.leaf_names(params)
  leaves = jax.tree.leaves(params)
  for i in selected:
    shape = jnp.shape(leaves[i])
    if len(shape) < 2 or shape[-2] % bh or shape[-1] % bw:
      raise ValueError(f"{names[i]} has shape {shape}; its last two axes must be multiples of "
                       f"block={block}. Choose a block that divides them or exclude it with "
                       "select=.")
  sc = _score_leaves(scores, params, None, selected, masks)
  mleaves, treedef = jax.tree.flatten(masks)
  kept = _BLOCKS([mleaves[i] for i in selected], sc, sparsity if per_leaf is None else 0.0,
                 None if per_leaf is None else tuple(per_leaf), bh=bh, bw=bw, scope=scope)
  for i, k in zip(selected, kept):
    mleaves[i] = k
  new = jax.tree.unflatten(treedef, mleaves)
  return _flag_invalid(masks_lib.apply_masks(params, new), sparsity, per_leaf, selected), new


# ----------------------------------------------------------------------------- structured pruners


def _filtered(group: units_lib.UnitGroup, keep) -> units_lib.UnitGroup:
  """``group`` with the slices ``keep(slice)`` accepts (all of them when it accepts none)."""
  slices = tuple(s for s in group.slices if keep(s))
  if len(slices) == len(group.slices) or not slices:
    return group
  return dataclasses.replace(group, slices=slices)


def _params_only(group: units_lib.UnitGroup) -> units_lib.UnitGroup:
  """``group`` without its slices outside the ``'params'`` collection (BatchNorm's running
  statistics in ``'batch_stats'``), for an optimizer that sees ``variables['params']``: the
  statistics of a removed unit are not read once its scale and shift are masked."""
  return _filtered(group, lambda s: s.path[:1] == ("params",))


def _without_stats(group: units_lib.UnitGroup) -> units_lib.UnitGroup:
  """``group`` without its running-statistics slices (kind ``'stat'``), for an optimizer that
  sees only the trainable variables of a tree that also held them: ``nnx.Optimizer(...,
  wrt=nnx.Param)`` on a target traced from the whole ``nnx.State`` (BatchStat included)."""
  return _filtered(group, lambda s: s.kind != "stat")


def _variants(group: units_lib.UnitGroup):
  """``(wrap, unwrap, group)`` for each tree a step pruner may be given: the tree the group's
  paths are rooted in; a flax ``variables['params']`` (wrapped back under ``'params'``, the
  group's other collections dropped); the trainable variables alone (its statistics dropped)."""
  same = lambda t: t
  return ((same, same, group),
          (lambda t: {"params": t} if isinstance(t, Mapping) else None, lambda t: t["params"],
           _params_only(group)),
          (same, same, _without_stats(group)))


def _rooted(params, group: units_lib.UnitGroup):
  """(tree the group's paths resolve in, unwrap, the group as it applies there), from
  :func:`_variants`. (A target traced on an nnx ``State`` also reads the plain arrays
  ``nnx.Optimizer`` passes: ``units.get_path``.)"""
  def resolves(tree, g):
    if tree is None:
      return False
    try:
      for s in g.slices:
        if _is_masked_node(units_lib.get_path(tree, s.path)):  # another branch's leaf
          return False
      return True
    except KeyError:
      return False

  for wrap, unwrap, used in _variants(group):
    tree = wrap(params)
    if resolves(tree, used):
      return tree, unwrap, used
  if _has_masked_node(params):
    raise ValueError(
        f"Unit group {group.name!r} has slices in params this optimizer does not see "
        f"({[units_lib.path_str(s.path) for s in group.slices]}: an optax.multi_transform "
        "branch sees optax.MaskedNode() at the leaves of the other branches). A structured "
        "pruner needs every slice of its group: label all of the group's leaves for its "
        "branch, or wrap jaxprune.gradual around the whole multi_transform.")
  raise ValueError(f"The params do not hold the slices of unit group {group.name!r} "
                   f"({[units_lib.path_str(s.path) for s in group.slices]}); pass the params of the model "
                   "whose groups these are (the variables dict, its 'params' collection, or an "
                   "nnx model's Param state).")


def _per_variant(group: units_lib.UnitGroup, make):
  """``make(group)`` for each variant of the group (:func:`_variants`), by the group
  :func:`_rooted` returns (built once each, so each compiles once)."""
  built = {}
  for _, _, used in _variants(group):
    if used not in built:
      built[used] = make(used)
  return lambda used: built[used]


def _unit_state(g):
  return lambda params: {g.name: masks_lib.host_built(params, np.ones((g.size,), bool))}


def importance_pruner(model_or_groups, group: str, *, norm: str = "rms") -> StepPruner:
  """Importance-norm pruning of a unit group (Luan) for :func:`gradual`: at each update the
  least important units are removed until ``round(s_t * size)`` are gone (at least one kept).

  ``gradual(tx, sparsity=0.5, pruner=importance_pruner(model, 'conv_1'), ...)``.
  """
  g = _common.get_group(model_or_groups, group)
  prune_units = _per_variant(g, lambda v: importance_lib.importance_prune({v.name: v}, v.name,
                                                                        norm=norm))

  def prune(params, masks, state, grads, target):
    del grads
    p, unwrap, used = _rooted(params, g)
    m, _, _ = _rooted(masks, g)
    mask = state[g.name]
    k = _n_target(target, g.size) - (g.size - jnp.sum(mask, dtype=jnp.int32))
    _, umasks, _ = prune_units(used)(p, state, jnp.maximum(k, 0))
    return params, unwrap(units_lib.expand(p, {g.name: used}, umasks, m)), umasks

  return StepPruner(_unit_state(g), prune, takes_sparsity=True, changes_params=False)


def distinctiveness_pruner(model_or_groups, group: str, *, similar_deg=15.0,
                           complementary_deg=165.0, source: str = "outgoing",
                           similar: bool = True, complementary: bool = True,
                           constants: bool = True, absorb: bool = False,
                           max_sweeps: int | None = None) -> StepPruner:
  """Weight distinctiveness of a unit group (Gedeon; Zheng; Dixit) for :func:`scheduled`.

  At each update, sweeps of :func:`jaxprune.weight_distinctiveness` run until no pair of kept
  units qualifies (at most ``max_sweeps``, default the group size): similar units are merged
  (the removed unit's outgoing weights added to the kept one's, through the update), and the
  removed units are masked for the rest of training.
  """
  g = _common.get_group(model_or_groups, group)
  sweeps = _per_variant(g, lambda v: weight_distinctiveness(
      {v.name: v}, v.name, source=source, similar=similar, complementary=complementary,
      constants=constants, absorb=absorb))
  check_thresholds(similar_deg, complementary_deg, similar=similar, complementary=complementary)
  limit = g.size if max_sweeps is None else validate.whole_number("max_sweeps", max_sweeps)
  if limit < 1:
    raise ValueError(f"max_sweeps must be at least 1, got {max_sweeps}.")

  def prune(params, masks, state, grads, target):
    del grads, target
    p, unwrap, used = _rooted(params, g)
    m, _, _ = _rooted(masks, g)
    sweep = sweeps(used)

    def body(carry):
      i, _, q, um = carry
      q, um, report = sweep(q, um, similar_deg, complementary_deg)
      return i + 1, report.count, q, um

    _, _, p, um = jax.lax.while_loop(lambda c: (c[0] < limit) & (c[1] > 0), body,
                                     (jnp.zeros((), jnp.int32), jnp.ones((), jnp.int32), p,
                                      dict(state)))
    m = units_lib.expand(p, {g.name: used}, um, m)
    return unwrap(masks_lib.apply_masks(p, m)), unwrap(m), um

  return StepPruner(_unit_state(g), prune, takes_sparsity=False, changes_params=True)
