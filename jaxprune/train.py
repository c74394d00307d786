"""Training with optax that keeps pruned weights exactly zero; evaluation; fine-tuning; rewinding.

Masked training: gradients and optimizer updates of masked weights are zeroed, and the params
are re-masked after every update, so a pruned weight stays exactly 0.0 through training, also
under Adam (whose moments of a masked weight then stay zero).

Every epoch is one compiled ``lax.scan`` over minibatches. Data may carry per-sample weights, so
that several folds of unequal size can be padded to one shape and trained together with
:func:`fit_many` (one ``vmap``\\ ped program) with exactly the same result as training each on its
own: padded samples are never drawn into a real minibatch, and a batch with no real samples
leaves the state unchanged.

Example:
  >>> import jax, jax.numpy as jnp, jaxprune
  >>> model = jaxprune.MLP(in_features=4, hidden=(8,), out_features=3)
  >>> x = jax.random.normal(jax.random.key(0), (64, 4)); y = jnp.arange(64) % 3
  >>> params, hist = jaxprune.fit(model, model.init(jax.random.key(1)), x, y,
  ...                             key=jax.random.key(2), epochs=3, progress=False)
  >>> metrics = jaxprune.evaluate(model, params, x, y)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxprune import _compile
from jaxprune import masks as masks_lib
from jaxprune import optax_pruning
from jaxprune.progress import Progress  # pylint: disable=unused-import (re-exported)
from jaxprune import validate
from jaxprune.models.base import Model
from jaxprune.models.mlp import MLP

PyTree = Any


# ----------------------------------------------------------------------------- losses


def cross_entropy(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-sample softmax cross-entropy of logits against integer labels."""
  return optax.softmax_cross_entropy_with_integer_labels(outputs, targets)


def squared_error(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Per-sample mean squared error (mean over output features)."""
  return jnp.mean(jnp.square(outputs - targets).reshape(outputs.shape[0], -1), axis=-1)


def default_loss(model: Model) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Cross-entropy for classifiers, squared error for autoencoders."""
  return squared_error if model.task == "reconstruction" else cross_entropy


def _correct(outputs, targets):
  if not (hasattr(outputs, "ndim") and hasattr(targets, "ndim")):
    # A dict or tuple of outputs (several heads): the user's loss reads them; no accuracy.
    return jnp.zeros(jax.tree.leaves(targets)[0].shape[0], jnp.float32)
  if outputs.ndim == targets.ndim + 1 and jnp.issubdtype(targets.dtype, jnp.integer):
    c = (jnp.argmax(outputs, -1) == targets).astype(jnp.float32)
    return c.reshape(c.shape[0], -1).mean(-1)   # per sample (labels per token: their mean)
  return jnp.zeros(outputs.shape[0], jnp.float32)


# ----------------------------------------------------------------------------- any target


@dataclasses.dataclass(frozen=True)
class _Adapted:
  """A traced target or a plain apply function, seen as a model by the trainer."""

  target: Any
  task: str = "classification"

  def apply(self, params: PyTree, x: jax.Array) -> jax.Array:
    fn = self.target.apply if hasattr(self.target, "apply") else self.target
    return fn(params, x)

  def apply_train(self, params: PyTree, x: jax.Array, mask=None) -> tuple[jax.Array, PyTree]:
    del mask
    return self.apply(params, x), params

  def check_input(self, x) -> None:
    check = getattr(self.target, "check_input", None)
    if check is not None:
      check(x)


def as_model(target, loss: Callable | None = None):
  """A built-in model as it is; a traced target or an apply function ``fn(params, x)`` adapted
  for training and evaluation. With a custom ``loss`` the targets need not be class labels."""
  _check_loss(loss)
  if isinstance(target, Model):
    return target
  if isinstance(target, _Adapted):
    return target
  if not (hasattr(target, "apply") or callable(target)):
    raise TypeError("Pass a pruning target (a jaxprune model or jaxprune.trace(...)) or an apply "
                    f"function fn(params, x), got {type(target).__name__}.")
  task = getattr(target, "task", "classification") if loss is None else "custom"
  return _Adapted(target, task)


def _check_loss(loss) -> None:
  """A loss is a function: a name such as ``'mse'`` failed inside the compiled step."""
  if loss is not None and not callable(loss):
    raise TypeError(f"loss must be a function (outputs, targets) -> one value per sample, "
                    f"shape (batch,); got {type(loss).__name__} {loss!r}. For the squared "
                    "error pass jaxprune.train.squared_error, for cross-entropy on integer "
                    "labels jaxprune.train.cross_entropy, or write your own, e.g. lambda o, t: "
                    "jnp.mean(jnp.abs(o - t), axis=-1).")


def _per_sample(loss, outputs, targets, batch: int) -> jax.Array:
  """``loss(outputs, targets)``, which must hold one value per sample, shape (batch,): a scalar
  (the batch's mean) or a column (batch, 1) broadcast against the sample weights into another
  number, silently (found by probing: evaluate gave 3.73 and 59.7 for a true 3.84)."""
  per = loss(outputs, targets)
  shape = tuple(jnp.shape(per))
  if shape != (batch,):
    how = ("a scalar: it averages over the batch itself, so rows of weight 0 (padding, a short "
           "last batch) would count and weights could not apply" if shape == () else
           f"shape {shape}")
    raise ValueError(f"The loss must return one value per sample, shape ({batch},) for a "
                     f"batch of {batch}; it returned {how}. Reduce every axis but the first, "
                     "e.g. jnp.mean((outputs - targets) ** 2, axis=-1), and leave the batch "
                     "axis (fit weighs and averages the samples itself).")
  return per


def _targets_as(model, loss: Callable | None):
  """``model`` as the target checks see it. A loss of the user's own (``loss=``, or a trainer's
  that is not the model's default) reads whatever targets it was written for: the built-in
  models' ``task`` no longer refuses the regression targets that such a loss trains on. A
  classifier's targets that are class labels (integers, one per sample) are still checked
  against its outputs (``'own_loss_labels'``): a class-weighted, focal or smoothed
  cross-entropy meets a label out of range as the default loss does, and gave NaN without it."""
  if loss is None or model.task == "custom" or loss is default_loss(model):
    return model
  return _Adapted(model, "own_loss_labels" if model.task == "classification" else "custom")


def _trainable(params: PyTree) -> PyTree:
  """The trained part of the variables: ``params['params']`` for Flax variables, else all."""
  return params["params"] if isinstance(params, dict) and "params" in params else params


def _with_trainable(params: PyTree, trainable: PyTree) -> PyTree:
  return {**params, "params": trainable} if isinstance(params, dict) and "params" in params \
      else trainable


# ----------------------------------------------------------------------------- checks


check_finite = validate.check_finite  # kept here for callers that imported it from train


def _check_targets(model: Model, params, x, y, name: str, one_run=None) -> None:
  """Classifier targets must be integer labels in [0, number of outputs), a vector per run
  (``one_run``: one run's targets, for the shape check of stacked runs); a reconstruction
  model's targets must be shaped like its outputs."""
  if model.task == "custom":
    return
  if model.task == "reconstruction":
    _check_reconstruction_targets(model, params, x, y if one_run is None else one_run,
                                  name if one_run is None else f"{name} of each run")
    return
  y = np.asarray(y)   # on the host: a device array would compile two reductions here
  if model.task == "own_loss_labels":   # see _targets_as: only class labels are checked
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
      try:
        validate.check_labels(name, y, validate.num_outputs(model, params, x))
      except ValueError as e:
        raise ValueError(f"{e} (Integer targets that are not class indices, e.g. counts, "
                         "reach a loss of your own as floats: y.astype(np.float32).)") from None
    return
  validate.check_label_shape(name if one_run is None else f"{name} of each run",
                             y if one_run is None else one_run)
  try:
    validate.check_labels(name, y)   # integers (the range below)
  except ValueError as e:
    if validate.fractional(y):   # regression values, most likely: how to train on them
      raise ValueError(f"{e} {_OWN_LOSS}") from None
    raise
  validate.check_labels(name, y, validate.num_outputs(model, params, x))   # the shared check


_OWN_LOSS = ("(Targets that are not class labels, e.g. regression values, train with a loss of "
             "your own, fn(outputs, targets) -> one value per sample: fit(..., loss=fn), "
             "fit_many(..., loss=fn), evaluate(..., loss=fn).)")


def _check_reconstruction_targets(model: Model, params, x, y, name: str) -> None:
  """An autoencoder is trained towards targets of its outputs' shape (its inputs, ``y = x``):
  class labels would fail inside the loss with a broadcasting error."""
  out = validate.output_shape(model, params, x)
  shape = tuple(np.shape(y))
  if out is not None and shape[1:] != out[1:]:
    raise ValueError(
        f"{name}: the targets have shape {shape} but the model's outputs have shape "
        f"{shape[:1] + out[1:]}; a reconstruction model (autoencoder) is trained to reproduce "
        "its inputs: pass the inputs as the targets (y = x), or use a classifier for labels.")


def _check_data(model: Model, x, y, name="x", params=None, y_name="y", sample_weight=None):
  """Inputs of the model's shape, not empty, finite, lengths matching; with ``params`` the
  targets too, those of rows of weight > 0 only (a row of weight 0 does not exist)."""
  model.check_input(x)
  validate.check_data(x, y, name=name, sample_weight=sample_weight)
  if params is not None:
    real = slice(None) if sample_weight is None else np.asarray(sample_weight) > 0
    _check_targets(model, params, x, np.asarray(y)[real], y_name)


def _check_start_params(params, masks=None) -> None:
  """Concrete params are finite where the masks keep them (a masked weight is zeroed before
  use): NaN weights used to train to a NaN loss blamed on the learning rate, and to evaluate
  to an accuracy of NaN logits."""
  if masks is None:
    validate.check_params(params)
    return
  validate.check_params(jax.tree.map(
      lambda p, m: np.where(np.asarray(m), np.asarray(p), 0) if validate.is_concrete(p) and
      validate.is_concrete(m) and jnp.issubdtype(jnp.result_type(p), jnp.floating) else p,
      params, masks))


def _check_no_nnx_statistics(params) -> None:
  """An nnx state holding ``BatchStat`` (or other non-``Param``) variables among the trained
  leaves: every trained leaf is trained by gradient, so the running statistics would drift with
  the optimizer (a traced target needs them in its params to find the groups through them)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  is_var = lambda x: isinstance(x, nnx.Variable)
  found = [(path, type(leaf))
           for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_var)[0]
           if is_var(leaf) and not isinstance(leaf, nnx.Param)]
  if found:
    held = [f"{jax.tree_util.keystr(path, simple=True, separator='/')} ({kind.__name__})"
            for path, kind in found]
    # the split's filter for what was found: nnx's own classes as nnx.<name>, the user's by name
    kinds = list(dict.fromkeys(
        ("nnx." if getattr(nnx, kind.__name__, None) is kind else "") + kind.__name__
        for _, kind in found))
    stat = kinds[0] if len(kinds) == 1 else f"({', '.join(kinds)})"
    own = [k for k in kinds if not k.startswith("nnx.")]
    raise ValueError(
        f"params hold {len(held)} nnx variables that are not nnx.Param: "
        f"{', '.join(held[:4])}{' ...' if len(held) > 4 else ''}. Every leaf given to train is "
        "trained by gradient, so running statistics would be changed by the optimizer. Keep "
        "them apart as the variables' 'batch_stats': graphdef, params, stats, rest = "
        f"nnx.split(model, nnx.Param, {stat}, ...); trace fn(v, x) = nnx.merge("
        "graphdef, v['params'], v['batch_stats'], rest)(x) with v = {'params': params, "
        "'batch_stats': stats} (fit trains v['params'] and carries the statistics)."
        + (f" If {', '.join(own)} should be trained, make it a subclass of nnx.Param instead."
           if own else ""))


def _check_trainable(params) -> None:
  """Every leaf is trained by gradient, so every leaf must be floating point (an nnx model's
  RNG key or counter, or a step count, cannot be), and no nnx statistics are among them."""
  bad = [f"{jax.tree_util.keystr(path, simple=True, separator='/')} ({leaf.dtype})"
         for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
         if hasattr(leaf, "dtype") and not jnp.issubdtype(leaf.dtype, jnp.inexact)]
  if bad:
    raise ValueError(
        f"params hold {len(bad)} leaves that cannot be trained by gradient: "
        f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. Pass only the floating-point "
        "weights (Flax nnx: graphdef, params, rest = nnx.split(model, nnx.Param, ...); linen: "
        "variables['params']) and close over the rest in the apply function.")
  _check_no_nnx_statistics(_trainable(params))


def _same_model(a, b) -> bool:
  """Whether two models (built-in, or adapted targets and apply functions) are the same one;
  True when it cannot be told (an ``==`` that fails)."""
  a, b = (m.target if isinstance(m, _Adapted) else m for m in (a, b))
  if a is b:
    return True
  try:
    return bool(a == b)
  except Exception:  # pylint: disable=broad-except
    return True


def _check_trainer_settings(fn: str, model, trainer, batch_size, optimizer, loss) -> None:
  """A ``trainer`` fixes the model, optimizer, loss and batch size it was built with; settings
  passed beside it that say otherwise used to be dropped without a word."""
  if trainer is None:
    return
  if not isinstance(trainer, Trainer):
    raise TypeError(f"{fn}: trainer must be a jaxprune Trainer (jaxprune.make_trainer(model, "
                    f"...)), got {type(trainer).__name__}.")
  clash = []
  if not _same_model(trainer.model, model):
    clash.append("the model")
  if optimizer is not None and optimizer is not trainer.optimizer:
    clash.append("optimizer=")
  if loss is not None and loss is not trainer.loss:
    clash.append("loss=")
  if (batch_size is not None
      and validate.whole_number("batch_size", batch_size, 1) != trainer.batch_size):
    clash.append(f"batch_size={batch_size} (the trainer's is {trainer.batch_size})")
  if clash:
    raise ValueError(f"{fn}: {', '.join(clash)} differ(s) from what trainer= was built with, "
                     "and the trainer's settings are the ones that train: pass them to "
                     f"jaxprune.make_trainer(model, batch_size=..., optimizer=..., loss=...) and "
                     f"only trainer= to {fn}, or leave trainer=None.")


def _check_callback(callback) -> None:
  """Checked before any training: a bad hook would otherwise fail after the first chunk."""
  if callback is not None and not callable(callback):
    raise TypeError(f"callback must be a function callback(epoch, state) -> None (or None), "
                    f"got {type(callback).__name__}.")


def _leading_sizes(tree) -> set:
  return {jnp.shape(l)[0] if jnp.ndim(l) else None for l in jax.tree.leaves(tree)}


def _one_run(tree) -> PyTree:
  """Shapes and dtypes of one run of a stacked tree (no computation, nothing compiled)."""
  dtype = lambda l: l.dtype if hasattr(l, "dtype") else np.result_type(l)  # as the user gave it
  return jax.tree.map(lambda l: jax.ShapeDtypeStruct(np.shape(l)[1:], dtype(l)), tree)


def _runs_one_sample(model: Model, params, spec) -> bool:
  """Whether ``model.apply(params, spec)`` traces (shapes only, nothing computed) to outputs
  with the batch axis of ``spec`` (1) leading every output array."""
  try:
    out = jax.eval_shape(model.apply, params, spec)
  except Exception:  # pylint: disable=broad-except
    return False
  return all(np.ndim(o) >= 1 and np.shape(o)[0] == 1 for o in jax.tree.leaves(out))


def _check_not_stacked(fn: str, model: Model, params, x) -> None:
  """``fit`` / ``evaluate`` take one network: params stacked with a leading run axis (as
  ``fit_many`` takes them) used to fail deep inside the model (Flax's ScopeParamShapeError) or
  the training step (a broadcasting error, for an apply function that broadcasts). Only params
  whose leaves all share one leading size R are looked at further (two shape traces, no
  computation): stacked if the model does not run on them as they are, but does on one run's
  slice ``params[r]``."""
  lead = _leading_sizes(params)
  if len(lead) != 1 or None in lead:
    return   # the common case: leaves of different leading sizes cannot be stacked runs
  spec = validate.batch_spec(x)
  if _runs_one_sample(model, params, spec) or not _runs_one_sample(model, _one_run(params), spec):
    return
  runs = next(iter(lead))
  many = "fit_many" if fn == "fit" else "evaluate_many"
  raise ValueError(
      f"{fn}: the params look stacked, with a leading run axis of {runs} on every leaf (as "
      f"{many} takes them): the model runs on one run's slice but not on the stack. {fn} "
      f"takes one network: pass one run, jax.tree.map(lambda a: a[r], params), "
      f"or use {many} for all {runs} runs at once.")


def _host(a, dtype=None) -> np.ndarray:
  """A host (NumPy) view of data for the checks: reductions and slices on a device array would
  each compile a small program on their first call. Floating data take the dtype they will
  have on the device (float64 becomes float32 unless x64 is on), so that a value beyond
  float32's range is caught as infinite by the checks; integer labels stay as given, so that
  one beyond int32's range fails the label check instead of wrapping around."""
  a = np.asarray(a, dtype)
  if np.issubdtype(a.dtype, np.floating):
    with np.errstate(over="ignore"):  # an overflow is reported by the finite check
      a = a.astype(jax.dtypes.canonicalize_dtype(a.dtype), copy=False)
  return a


def _device(a, host: np.ndarray | None = None) -> jax.Array:
  """``a`` on the device: a JAX array as it is, anything else transferred (from its ``host``
  copy when there is one). Not ``jnp.asarray``, which compiles a program per new shape."""
  if isinstance(a, jax.Array) and (host is None or a.dtype == host.dtype):
    return a
  return jax.device_put(np.asarray(a) if host is None else host)


def _batch_error(model: Model, shape) -> Exception | None:
  """The model's error for a batch of inputs of ``shape`` (None if it fits), whatever its
  dtype (a dtype the model refuses is a problem of the inputs, not of the run axis)."""
  try:
    model.check_input(np.broadcast_to(np.zeros((), np.float32), shape))  # no memory
  except (ValueError, TypeError) as e:
    return e
  return None


def _check_runs(fn: str, model: Model, params, x, y, w, w_name: str, masks, *, x_name="x",
                y_name="y") -> tuple[int, int]:
  """The leading run axis R of ``fit_many`` / ``evaluate_many`` arguments, and each run's inputs
  as :func:`fit` checks them; returns (R, N). ``x_name``, ``y_name``: what messages call the
  data (e.g. ``validation x``)."""
  lead = _leading_sizes(params)
  # Whether every slice x[r] has the shape of a batch of the model's inputs
  row_error = _batch_error(model, x.shape[1:]) if x.ndim >= 2 else None
  if x.ndim < 2 or row_error is not None:
    if row_error is not None and lead == {x.shape[0]} and (
        _batch_error(model, x.shape) is not None):
      # the run axis is there (the params' R), each run's inputs do not fit: the model's words
      raise ValueError(f"{fn}: each run's {x_name}, {x_name}[r] of shape "
                       f"{tuple(x.shape[1:])}, does not fit the model: {row_error}")
    raise ValueError(f"{fn}: {x_name} and {y_name} need a leading run axis (R, N, ...), one "
                     f"slice per run; got {x_name} of shape {tuple(x.shape)}. For one run use "
                     f"x[None], y[None] (or {fn.replace('_many', '')}); stack several with "
                     "np.stack.")
  model.check_input(x[0])  # the dtype, with fit's message
  runs, n = x.shape[:2]
  if len(lead) == 1 and None not in lead and lead != {runs}:
    raise ValueError(f"{fn}: {x_name} and {y_name} need a leading run axis (R, N, ...) with R = "
                     f"{next(iter(lead))}, the params' run axis; got {x_name} of shape "
                     f"{tuple(x.shape)} ({runs} runs).")
  if lead != {runs}:
    raise ValueError(f"{fn} needs params stacked with a leading run axis of {runs} ({x_name} has "
                     f"{runs} runs; e.g. jax.vmap(model.init)(keys)); got leading sizes "
                     f"{sorted(map(str, lead))}.")
  if y.shape[:2] != (runs, n) or w.shape != (runs, n):
    raise ValueError(f"{fn} needs {y_name} and {w_name} shaped (R, N) = ({runs}, {n}) like "
                     f"{x_name}'s leading axes ({x_name} and {y_name} need a leading run axis "
                     f"(R, N, ...)); got {y_name} {tuple(y.shape)} and {w_name} "
                     f"{tuple(w.shape)}.")
  if masks is not None:
    mlead = _leading_sizes(masks)
    if mlead != {runs}:
      raise ValueError(f"{fn}: masks need a leading run axis of R = {runs}, like params (e.g. "
                       "jax.vmap(lambda p: jaxprune.magnitude_prune(p, None, 0.5)[1])(params), "
                       f"or jax.tree.map(lambda m: jnp.stack([m] * {runs}), masks)); got leading "
                       f"sizes {sorted(map(str, mlead))}.")
    masks_lib.check_weight_masks(_one_run(params), _one_run(masks))
  return runs, n


def _check_runs_data(model: Model, params, x, y, w, w_name: str, *, x_name="x",
                     y_name="y") -> None:
  """Stacked runs' data (after :func:`_check_runs`) as :func:`evaluate` checks one run's: not
  empty, finite inputs, each run's weights finite and >= 0, the targets of rows of weight > 0."""
  runs, n = x.shape[:2]
  validate.check_data(x, y, sample_weight=w, name=x_name, runs=True)
  for r in range(runs):
    validate.check_sample_weight(w[r], n, f"{w_name} of run {r}")
  _check_targets(model, _one_run(params), x[0], y[w > 0], y_name, one_run=y[0])


def _check_validation_form(fn: str, validation, form: str) -> None:
  """``validation`` must be a tuple (or list) of 2 or 3 items; ``form`` says which."""
  if not isinstance(validation, (tuple, list)) or len(validation) not in (2, 3):
    got = (f"{len(validation)} items" if isinstance(validation, (tuple, list)) else
           f"a {type(validation).__name__}")
    raise ValueError(f"{fn}: validation must be {form}; got {got}.")


def _check_validation_runs(model: Model, params, validation, checked=None) -> tuple:
  """``fit_many``'s ``validation = (x_val, y_val[, w_val])``, each with the run axis R, checked
  per run as :func:`fit` checks its validation data (w_val: all ones when left out; the
  targets as ``checked`` sees them, see :func:`_targets_as`); returns the host arrays checked,
  one per item given."""
  _check_validation_form("fit_many", validation, "a tuple (x_val, y_val, w_val), each with a "
                         "leading run axis R (w_val: (R, N_val) sample weights, 0 for padding)")
  vx, vy = _host(validation[0]), _host(validation[1])
  vw = (_host(validation[2], np.float32) if len(validation) == 3 else
        np.ones(vx.shape[:2], np.float32))
  names = dict(x_name="validation x", y_name="validation y")
  _check_runs("fit_many", model, params, vx, vy, vw, "validation w", None, **names)
  _check_runs_data(checked or model, params, vx, vy, vw, "validation w", **names)
  return (vx, vy, vw)[:len(validation)]


def _check_batch_size(batch_size) -> int:
  return validate.whole_number("batch_size", batch_size, 1)


def _check_learning_rate(learning_rate) -> None:
  """A concrete learning rate must be finite and >= 0 (a negative one climbs the loss)."""
  if learning_rate is None:
    return
  if not validate.is_real(learning_rate, bool_ok=False):
    raise TypeError(f"learning_rate must be a number (e.g. 1e-3), or for fit_many an array of "
                    f"numbers, got {type(learning_rate).__name__} {learning_rate!r}.")
  if not validate.is_concrete(learning_rate):
    return
  lr = np.asarray(learning_rate, np.float64)
  if lr.size == 0 or not np.all(np.isfinite(lr)) or np.any(lr < 0):
    raise ValueError(f"learning_rate must be finite and >= 0, got {learning_rate}; a negative "
                     "learning rate makes training climb the loss (typical values: 1e-4 to 1e-1).")


# ----------------------------------------------------------------------------- state


def _blank_padding(y, w):
  """``y`` with the targets of weight-0 rows set to 0, so that they stay in range and finite."""
  keep = (w > 0).reshape(w.shape + (1,) * (jnp.ndim(y) - w.ndim))
  return jnp.where(keep, y, jnp.zeros_like(y))


def _weighted(w, per_sample):
  """``w * per_sample`` with weight-0 rows exactly 0 (NaN * 0 would be NaN)."""
  return jnp.where(w > 0, w * per_sample, 0.0)


def _real_rank(w):
  """Each sample's rank among the samples of weight > 0 (0, 1, ...; the index itself when every
  weight is > 0), the number its shuffling key is folded from."""
  return jnp.cumsum(w > 0, dtype=jnp.int32) - 1


class TrainState(NamedTuple):
  """Everything that changes during training."""
  params: PyTree  # the full variables dict ('params', and 'batch_stats' if any)
  opt_state: optax.OptState


@dataclasses.dataclass(frozen=True)
class Trainer:
  """Pure training functions for one model, optimizer, loss and batch size.

  Attributes:
    model: the network.
    optimizer: an optax transformation (default Adam, learning rate 1e-3).
    loss: per-sample loss ``(outputs, targets) -> (batch,)``; default by ``model.task``.
    batch_size: minibatch size.
  """

  model: Model
  optimizer: optax.GradientTransformation
  loss: Callable[[jax.Array, jax.Array], jax.Array]
  batch_size: int = 32

  def init(self, params: PyTree) -> TrainState:
    return TrainState(params, self.optimizer.init(_trainable(params)))

  def step(self, state: TrainState, masks: PyTree | None, x, y, w) -> tuple[TrainState, dict]:
    """One masked optimizer step on the weighted mean loss ``sum(w * loss) / sum(w)`` of a
    minibatch; no-op if ``sum(w) == 0``.

    Rows with weight 0 contribute exactly 0 (to the loss, its gradient and the counts) whatever
    their targets hold, e.g. an out-of-range padding label.
    """
    params = state.params
    total = jnp.sum(w)   # a weighted mean also when the weights sum below 1 (not / max(sum, 1))
    denom = jnp.where(total > 0, total, 1.0)
    y = _blank_padding(y, w)

    def objective(trainable):
      variables = _with_trainable(params, trainable)
      out, new_vars = self.model.apply_train(variables, x, mask=w > 0)
      per = _weighted(w, _per_sample(self.loss, out, y, w.shape[0]))
      correct = _weighted(w, _correct(out, y))
      return jnp.sum(per) / denom, (new_vars, jnp.sum(per), jnp.sum(correct))

    grads, (new_vars, loss_sum, correct) = jax.grad(objective, has_aux=True)(_trainable(params))
    if masks is None:
      updates, opt_state = self.optimizer.update(grads, state.opt_state, _trainable(params))
    else:  # the optimizer sees the kept weights only; masked weights stay exactly zero
      updates, opt_state = optax_pruning.masked_update(
          self.optimizer, grads, state.opt_state, _trainable(params), _trainable(masks))
    trainable = optax.apply_updates(_trainable(params), updates)
    new_params = _with_trainable(new_vars, trainable)
    if masks is not None:
      new_params = masks_lib.apply_masks(new_params, masks)
    new_state = TrainState(new_params, opt_state)
    has_data = jnp.sum(w) > 0
    new_state = jax.tree.map(lambda n, o: jnp.where(has_data, n, o), new_state, state)
    return new_state, {"loss_sum": loss_sum, "correct": correct, "count": jnp.sum(w)}

  def epoch(self, state: TrainState, masks: PyTree | None, x, y, w, key,
            rank=None) -> tuple[TrainState, dict]:
    """One pass over the data in a random order (real samples first, padding last). A batch
    size above the number of samples is one batch of all of them (the same step: rows of
    padding count 0), not a batch padded to that size. ``rank``: :func:`_real_rank` of ``w``
    (computed here when None; :meth:`epochs` computes it once for all its epochs)."""
    n = x.shape[0]
    bs = min(self.batch_size, n)
    nb = math.ceil(n / bs)
    # Each real sample's (w > 0) sort key depends only on its rank among the real samples, so
    # they come out in the same random order as without the weight-0 rows, wherever those are
    # (after them or between them); padding goes last.
    rank = _real_rank(w) if rank is None else rank
    # (float32 draws: under x64 too, so a key orders the batches as it does without it)
    u = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(key, i), (), jnp.float32))(
        rank)
    perm = jnp.argsort(jnp.where(w > 0, u, 2.0))
    pad = nb * bs - n
    idx = jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)]).reshape(nb, bs)
    valid = jnp.concatenate([jnp.ones((n,), bool), jnp.zeros((pad,), bool)])
    valid = valid.reshape(nb, bs)

    def body(st, batch):
      i, v = batch
      return self.step(st, masks, x[i], y[i], jnp.where(v, w[i], 0.0))

    state, m = jax.lax.scan(body, state, (idx, valid))
    count = jnp.sum(m["count"])
    count = jnp.where(count > 0, count, 1.0)
    return state, {"loss": jnp.sum(m["loss_sum"]) / count, "accuracy": jnp.sum(m["correct"]) / count}

  def evaluate(self, params: PyTree, x, y, w=None, *, batch_size: int = 1024) -> dict:
    """Weighted mean loss and accuracy of ``params`` on (x, y), in compiled chunks."""
    n = x.shape[0]
    w = jnp.ones((n,), jnp.float32) if w is None else w
    bs = min(batch_size, n)
    nb = math.ceil(n / bs)
    pad = nb * bs - n
    padded = lambda a: jnp.concatenate([a, jnp.zeros((pad,) + a.shape[1:], a.dtype)])
    xs, ys, ws = (padded(a).reshape((nb, bs) + a.shape[1:]) for a in (x, y, w))

    def body(acc, b):
      xb, yb, wb = b
      yb = _blank_padding(yb, wb)
      out = self.model.apply(params, xb)
      return (acc[0] + jnp.sum(_weighted(wb, _per_sample(self.loss, out, yb, wb.shape[0]))),
              acc[1] + jnp.sum(_weighted(wb, _correct(out, yb)))), None

    (ls, cs), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(())), (xs, ys, ws))
    total = jnp.sum(w)  # a weighted mean; no sample at all (sum 0) gives 0, not NaN
    count = jnp.where(total > 0, total, 1.0)
    return {"loss": ls / count, "accuracy": cs / count}

  def epochs(self, state, masks, x, y, w, key, num_epochs: int, val=None):
    """``num_epochs`` epochs as one scan; per-epoch metrics (and validation metrics)."""

    rank = _real_rank(w)   # once per chunk, not once per epoch

    def body(st, k):
      st, m = self.epoch(st, masks, x, y, w, k, rank)
      if val is not None:
        vm = self.evaluate(st.params, *val)
        m = {**m, "val_loss": vm["loss"], "val_accuracy": vm["accuracy"]}
      return st, m

    return jax.lax.scan(body, state, jax.random.split(key, num_epochs))


# The default trainers' Adam, one object for all of them (so that fit tells it from an optimizer
# of the user's). The learning rate lives in the optimizer state (inject_hyperparams), so one
# compiled program serves every learning rate, and a grid over learning rates can be vmapped.
# Only the learning rate: injected hyperparameters take the params' dtype, and in bfloat16
# Adam's b2 = 0.999 rounds to 1.0 (nu stays 0: every update NaN).
_DEFAULT_LEARNING_RATE = 1e-3
_DEFAULT_OPTIMIZER = optax.inject_hyperparams(
    optax.adam, static_args=("b1", "b2", "eps", "eps_root"))(learning_rate=_DEFAULT_LEARNING_RATE)


@functools.lru_cache(maxsize=None)
def _default_trainer(model: Model, batch_size: int, loss: Callable) -> Trainer:
  return Trainer(model, _DEFAULT_OPTIMIZER, loss, batch_size)


def make_trainer(model: Model, *, batch_size: int = 32,
                 optimizer: optax.GradientTransformation | None = None,
                 loss: Callable | None = None) -> Trainer:
  """A :class:`Trainer`; Adam with the learning rate in its state unless ``optimizer`` is given.

  Trainers with the default optimizer are cached per (model, batch size, loss), so repeated
  :func:`fit` calls reuse their compiled programs.
  """
  model = as_model(model, loss)
  batch_size = _check_batch_size(batch_size)
  if optimizer is not None:
    optax_pruning._check_tx(optimizer, "optimizer")  # pylint: disable=protected-access
  loss = loss or default_loss(model)
  if optimizer is None:
    return _default_trainer(model, batch_size, loss)
  return Trainer(model, optimizer, loss, batch_size)


def _learning_rate_to_set(trainer: Trainer, learning_rate):
  """The learning rate :func:`fit` writes into the optimizer state: the one given; when none is
  given (None), 1e-3 for the default Adam and nothing for an optimizer of the user's, which
  keeps the rate it was built with (``optax.inject_hyperparams(optax.sgd)(learning_rate=0.5)``
  trains at 0.5)."""
  if learning_rate is None and trainer.optimizer is _DEFAULT_OPTIMIZER:
    return _DEFAULT_LEARNING_RATE
  return learning_rate


_INJECTED = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def _is_injected(node) -> bool:
  return isinstance(node, _INJECTED)


def with_learning_rate(opt_state: PyTree, learning_rate) -> PyTree:
  """``opt_state`` with ``learning_rate`` written where ``optax.inject_hyperparams`` keeps it.

  The injected state is looked for anywhere in the state (the outermost transformation, or
  inside ``optax.chain``, :func:`scheduled`, :func:`gradual`, ``optax.MultiSteps``...). A rate
  that cannot be set is refused rather than ignored: an optimizer with no injected learning
  rate (``optax.sgd(0.1)``), one whose injected rate is a schedule (recomputed at every step),
  and one with several injected rates (``optax.multi_transform``).
  """
  found = [node for node in jax.tree.leaves(opt_state, is_leaf=_is_injected)
           if _is_injected(node) and "learning_rate" in node.hyperparams]
  keep = ("leave learning_rate=None to train at the rate the optimizer was built with, or "
          "build it with optax.inject_hyperparams(...)(learning_rate=<a number>)")
  if not found:
    raise ValueError("learning_rate= was given, but the optimizer keeps no learning rate in its "
                     f"state to set (optax.sgd(0.1) fixes its rate when built): {keep}.")
  if len(found) > 1:
    raise ValueError(f"learning_rate= was given, but the optimizer holds {len(found)} injected "
                     "learning rates (optax.multi_transform?), and one number cannot say which: "
                     "set them in the optimizer and leave learning_rate=None.")
  if "learning_rate" in getattr(found[0], "hyperparams_states", {}):
    raise ValueError("learning_rate= was given, but the optimizer's injected learning rate is a "
                     "schedule, recomputed at every step, so a number written into its state "
                     f"would be overwritten: {keep}.")

  def put(node):
    if not (_is_injected(node) and "learning_rate" in node.hyperparams):
      return node
    hp = dict(node.hyperparams)
    hp["learning_rate"] = jnp.asarray(learning_rate, jnp.asarray(hp["learning_rate"]).dtype)
    return node._replace(hyperparams=hp)

  return jax.tree.map(put, opt_state, is_leaf=_is_injected)


def init_state(trainer: Trainer, params: PyTree, learning_rate=None) -> TrainState:
  """The trainer's initial state, with ``learning_rate`` set (:func:`with_learning_rate`)
  unless it is None."""
  state = trainer.init(params)
  if learning_rate is not None:
    state = state._replace(opt_state=with_learning_rate(state.opt_state, learning_rate))
  return state


# ----------------------------------------------------------------------------- host drivers


@functools.lru_cache(maxsize=256)
def _compiled(trainer: Trainer, num_epochs: int, with_val: bool, many: bool):
  """A jitted (optionally vmapped) run of ``num_epochs`` epochs, cached per trainer."""

  def run(state, masks, x, y, w, key, val):
    return trainer.epochs(state, masks, x, y, w, key, num_epochs, val if with_val else None)

  fn = jax.vmap(run) if many else run
  if type(trainer.model) is MLP:   # the built-in MLP, not a subclass: see _compile.TRAIN_MLP
    return _compile.light_jit(fn, _compile.TRAIN_MLP)
  return jax.jit(fn)


@functools.lru_cache(maxsize=256)
def _compiled_start(trainer: Trainer, many: bool, num_chunks: int):
  """One small program for everything before training: the initial state (masked params, the
  optimizer state with its learning rate) and the key of each of the ``num_chunks`` compiled
  chunks (``split(key, num_chunks)``, per run when vmapped). Done eagerly, these steps would
  each compile a program of their own.

  It is a pass over the params, so on CPU it is compiled at LLVM level 1 with the older loop
  emitter (``jaxprune._compile.LEVEL_1``, as the initialisers are): less compilation than XLA's
  default. It was level 0 (0.2-0.37 s less than the default), until XLA:CPU crashed three times
  (a segmentation fault in compiling or serialising that program) in full test-suite runs, never
  at level 1, which compiles the initialisers of every test (crashes of that kind have since
  been seen at XLA's default flags too, in other programs: docs/benchmarks.md). Masks, zeros,
  copies, learning rates and key splits come out bit for bit as at the default level (tested
  with AdamW and gradient clipping); an optimizer of your own whose ``init`` multiplies and adds
  may differ in the last bit from its default compilation (a fused multiply-add)."""

  def start(params, masks, learning_rate, key):
    if masks is not None:
      params = masks_lib.apply_masks(params, masks)
    return init_state(trainer, params, learning_rate), jax.random.split(key, num_chunks)

  def start_one(params, masks, learning_rate, key):
    state, keys = start(params, masks, learning_rate, key)
    return state, tuple(keys)

  def start_many(params, masks, learning_rate, key):  # keys (R, num_chunks): chunk i, column i
    state, keys = jax.vmap(start)(params, masks, learning_rate, key)
    return state, tuple(keys[:, i] for i in range(num_chunks))

  return _compile.light_jit(start_many if many else start_one, _compile.LEVEL_1)


@functools.lru_cache(maxsize=256)
def _compiled_eval(trainer: Trainer, batch_size: int):
  return jax.jit(lambda p, x, y: trainer.evaluate(p, x, y, batch_size=batch_size))


@functools.lru_cache(maxsize=256)
def _compiled_eval_weighted(trainer: Trainer, batch_size: int, many: bool):
  """Weighted evaluation, optionally vmapped over stacked (params, masks, x, y, w)."""

  def one(params, masks, x, y, w):
    if masks is not None:
      params = masks_lib.apply_masks(params, masks)
    return trainer.evaluate(params, x, y, w, batch_size=batch_size)

  return jax.jit(jax.vmap(one) if many else one)


def _nan_advice(params: PyTree) -> str:
  """What to try after training diverged; for float16 params, their dtype first: Adam's
  ``eps`` (1e-8) and squared gradients below about 6e-8 round to 0 in float16, so its updates
  divide by zero at any learning rate."""
  usual = "lower the learning rate, check the inputs for extreme values, or standardise them."
  if any(getattr(a, "dtype", None) == jnp.float16 for a in jax.tree.leaves(params)):
    return ("the params are float16, where an optimizer's small constants and squared "
            "gradients round to 0 (Adam's eps=1e-8 does: its updates then divide by zero at "
            "any learning rate): train in float32 or bfloat16 (jax.tree.map(lambda a: "
            "a.astype(jnp.float32), params)), or pass an optimizer built for float16, e.g. "
            "optax.adam(1e-3, eps=1e-4); otherwise " + usual)
  return usual


def _run(trainer, params, masks, learning_rate, x, y, w, key, epochs, val, log_every, progress,
         desc, many, callback=None):
  chunks = []
  done = 0
  bar = Progress(epochs, desc, progress)
  nchunks = math.ceil(epochs / log_every)
  # fit_many: one key per run, split the way fit() splits its single key
  state, keys = _compiled_start(trainer, many, nchunks)(params, masks, learning_rate, key)
  for k in keys:
    n = min(log_every, epochs - done)
    state, m = _compiled(trainer, n, val is not None, many)(state, masks, x, y, w, k, val)
    done += n
    last = {kk: float(np.mean(np.asarray(v)[..., -1])) for kk, v in m.items()}
    if not all(math.isfinite(v) for v in last.values()):
      raise FloatingPointError(
          f"Training produced a NaN or infinite loss by epoch {done} ({last}); "
          f"{_nan_advice(state.params)}")
    chunks.append(m)
    bar.update(done, **last)
    if callback is not None:
      callback(done, state)
  # A chunk's loss is measured before each of its steps, so the last step is checked here: it
  # can leave NaN or infinite params behind a finite loss (a too-large step at the end).
  bad = sum(int(np.size(a) - np.count_nonzero(np.isfinite(np.asarray(a))))
            for a in jax.tree.leaves(state.params)
            if jnp.issubdtype(getattr(a, "dtype", np.int32), jnp.inexact))  # not keys, counts
  if bad:
    raise FloatingPointError(
        f"Training produced {bad} NaN or infinite parameter values by epoch {done} (its last "
        f"step, after the loss was measured); {_nan_advice(state.params)}")
  history = {k: np.concatenate([np.asarray(c[k]) for c in chunks], axis=-1) for k in chunks[0]}
  return state, history


def fit(model: Model, params: PyTree, x, y, *, key: jax.Array, epochs: int,
        batch_size: int | None = None, learning_rate: float | None = None,
        masks: PyTree | None = None,
        optimizer: optax.GradientTransformation | None = None, loss: Callable | None = None,
        validation: tuple | None = None, log_every: int = 10, progress: bool = True,
        trainer: Trainer | None = None, desc: str = "train",
        callback: Callable[[int, TrainState], None] | None = None) -> tuple[PyTree, dict]:
  """Trains ``params`` with minibatch optax updates; masked weights stay exactly zero.

  Args:
    model: the network: a built-in model, a traced target (:func:`jaxprune.trace`) or an apply
      function ``fn(params, x)``. Params may be Flax variables (``'params'`` is trained, other
      collections carried) or any pytree (all of it is trained).
    params: initial variables (not modified) of one network. Params stacked with a leading
      run axis (as :func:`fit_many` takes them) raise a ValueError that says so: pass one run,
      ``jax.tree.map(lambda a: a[r], params)``, or use :func:`fit_many`.
    x, y: training inputs and targets (labels, or the inputs themselves for autoencoders).
    key: PRNG key for shuffling.
    epochs: passes over the data.
    batch_size, learning_rate, optimizer, loss: training settings (Adam and batch size 32
      by default). With a ``loss`` of your own the targets need not be class labels. The
      optimizer's ``init`` and ``update`` both run inside compiled programs cached per
      trainer: they must be traceable.
      ``learning_rate`` left as None is 1e-3 for the default Adam; an ``optimizer`` (or
      ``trainer``) of your own keeps the learning rate it was built with. Given, it is written
      into an optimizer state that holds it (``optax.inject_hyperparams``, as the default Adam
      does); an optimizer built with a fixed rate (``optax.sgd(0.1)``) keeps its own.
    masks: optional weight masks (see :func:`jaxprune.expand`); masked weights are zeroed
      before training and stay zero.
    validation: optional ``(x_val, y_val)`` or ``(x_val, y_val, w_val)`` (sample weights, as
      in :func:`evaluate`) evaluated after every epoch.
    log_every: epochs per compiled chunk and per progress line (whole numbers, as ``epochs``
      and ``batch_size``). ``key`` is split once per chunk and each chunk's key once per
      epoch, so the shuffles depend on ``log_every`` as they do on ``batch_size``: the same
      key, epochs and ``log_every`` train the same network; another ``log_every`` shuffles
      otherwise.
    progress: print progress lines.
    trainer: a prebuilt :class:`Trainer` (reuses its compiled programs across calls); its
      model, optimizer, loss and batch size are the ones that train, and any of them passed
      here as well must agree.
    desc: the label of the progress lines.
    callback: optional hook ``callback(epoch, state) -> None`` run on the host between compiled
      chunks: after epochs ``log_every``, ``2 * log_every``, ... and after the last epoch
      (``epochs``, also when it is not a multiple of ``log_every``), with ``epoch`` the number
      of epochs done and ``state`` the :class:`TrainState` (params and optimizer state, e.g.
      masks that a pruning optimizer keeps) at that point. It cannot change training; without
      it each chunk is the same compiled program as always.

  Returns:
    ``(params, history)``; history maps ``loss``, ``accuracy`` (and ``val_loss``,
    ``val_accuracy``) to per-epoch arrays.
  """
  model = as_model(model, loss)
  epochs = validate.whole_number("epochs", epochs, 1)
  log_every = validate.whole_number("log_every", log_every, 1)
  _check_callback(callback)
  _check_trainable(params)
  _check_trainer_settings("fit", model, trainer, batch_size, optimizer, loss)
  _check_learning_rate(learning_rate)
  if learning_rate is not None and np.ndim(learning_rate) != 0:
    raise ValueError(f"fit: learning_rate must be one number, got shape "
                     f"{np.shape(learning_rate)}; to train one run per learning rate, use "
                     "fit_many (one learning rate per run).")
  validate.check_key(key, single="fit", batch_fix="to train one run per key, use fit_many "
                     "(runs stacked on a leading axis).")
  xh, yh = _host(x), _host(y)
  model.check_input(xh)
  _check_not_stacked("fit", model, params, xh)
  checked = _targets_as(model, loss if trainer is None else trainer.loss)
  _check_data(checked, xh, yh, params=params)
  if masks is not None:
    masks_lib.check_weight_masks(params, masks)  # applied in the start program
  _check_start_params(params, masks)
  trainer = trainer or make_trainer(model, batch_size=32 if batch_size is None else batch_size,
                                    optimizer=optimizer, loss=loss)
  x, y = _device(x, xh), _device(y, yh)
  w = _device(np.ones((x.shape[0],), np.float32))
  val = None
  if validation is not None:
    _check_validation_form("fit", validation, "a tuple (x_val, y_val) or (x_val, y_val, "
                           "w_val) (w_val: (N_val,) sample weights, 0 for padding)")
    vx, vy = _host(validation[0]), _host(validation[1])
    vw = None
    if len(validation) == 3:   # weighted validation metrics, as fit_many's w_val
      model.check_input(vx)
      vw = _host(validation[2], np.float32)
      validate.check_sample_weight(vw, vx.shape[0], "validation w")
    _check_data(checked, vx, vy, "validation x", params=params, y_name="validation y",
                sample_weight=vw)
    val = (_device(validation[0], vx), _device(validation[1], vy),
           _device(np.ones((vx.shape[0],), np.float32) if vw is None else vw))
  state, history = _run(trainer, params, masks, _learning_rate_to_set(trainer, learning_rate),
                        x, y, w, key, epochs, val, log_every, progress, desc, many=False,
                        callback=callback)
  return state.params, history


def fit_many(model: Model, params: PyTree, x, y, w, *, key: jax.Array, epochs: int,
             batch_size: int | None = None, learning_rate: float | None = None,
             masks: PyTree | None = None,
             optimizer: optax.GradientTransformation | None = None,
             loss: Callable | None = None, validation: tuple | None = None,
             log_every: int = 10, progress: bool = True, trainer: Trainer | None = None,
             desc: str = "train",
             callback: Callable[[int, TrainState], None] | None = None
             ) -> tuple[PyTree, dict]:
  """Trains a stack of independent runs (e.g. CV folds) as one ``vmap``\\ ped program.

  Every argument that varies per run has a leading axis R: ``params`` (stacked), ``x`` (R, N,
  ...), ``y`` (R, N, ...), ``w`` (R, N) sample weights with 0 for padding rows (whatever their
  labels), ``key`` (R keys, e.g. ``jax.random.split(key, R)``), ``masks`` (stacked, or None),
  ``learning_rate`` (scalar or (R,); None: 1e-3 for the default Adam, the optimizer's own
  for a ``trainer`` of your own, as in :func:`fit`) and ``validation`` = (x_val, y_val, w_val)
  each with axis R (checked per run as :func:`fit` checks its validation data).
  Each minibatch step descends the weighted mean ``sum(w * loss) / sum(w)`` of its batch, and
  the rows of weight 0 may be anywhere (after the real ones, or between them as in a fold given
  as a 0/1 mask): each run's result equals :func:`fit` on its rows of weight > 0 with the same
  key, to float
  rounding (batched products round differently). Adam and the model's default loss unless
  ``optimizer=`` or ``loss=`` (as in :func:`fit`) or a ``trainer=`` says otherwise.
  ``callback(epoch, state)`` is called as in :func:`fit`, with the stacked :class:`TrainState`
  (a leading run axis on every leaf).

  Returns:
    ``(params, history)`` with a leading run axis on every leaf and history array.
  """
  model = as_model(model, loss)
  epochs = validate.whole_number("epochs", epochs, 1)
  log_every = validate.whole_number("log_every", log_every, 1)
  _check_callback(callback)
  _check_trainable(params)
  _check_trainer_settings("fit_many", model, trainer, batch_size, optimizer, loss)
  xh, yh, wh = _host(x), _host(y), _host(w, np.float32)
  runs, _ = _check_runs("fit_many", model, params, xh, yh, wh, "w", masks)
  _check_start_params(params, masks)
  _check_learning_rate(learning_rate)
  validate.check_key(key)
  key_shape = jnp.shape(key)
  if not key_shape or key_shape[0] != runs:
    raise ValueError(f"fit_many needs one key per run: key of shape ({runs},), e.g. "
                     f"jax.random.split(key, {runs}); got shape {key_shape}.")
  checked = _targets_as(model, loss if trainer is None else trainer.loss)
  _check_runs_data(checked, params, xh, yh, wh, "w")
  val_host = (None if validation is None else
              _check_validation_runs(model, params, validation, checked))
  trainer = trainer or make_trainer(model, batch_size=32 if batch_size is None else batch_size,
                                    optimizer=optimizer, loss=loss)
  x, y, w = _device(x, xh), _device(y, yh), _device(w, wh)
  lr = _learning_rate_to_set(trainer, learning_rate)
  if lr is not None:
    lr = _host(lr, np.float64)   # float32 unless x64 is on (then float64 params keep every bit)
    if lr.shape not in ((), (runs,)):
      raise ValueError(f"fit_many: learning_rate must be one number or one per run, shape "
                       f"({runs},); got shape {lr.shape}.")
    lr = np.broadcast_to(lr, (runs,))
  val = None if validation is None else tuple(_device(a, h) for a, h in zip(validation, val_host))
  state, history = _run(trainer, params, masks, lr, x, y, w, key, epochs, val,
                        log_every, progress, desc, many=True, callback=callback)
  return state.params, history


def _refuse_traced(fn: str, *args) -> None:
  """Raises TypeError when an argument is traced: ``fn`` runs on the host and returns host
  numbers (a pruner's ``loss_fn`` built on it would fail deep in JAX)."""
  if not validate.is_concrete(*args):
    raise TypeError(
        f"{fn} runs on the host and returns host numbers, so it cannot run inside jax.jit, "
        "grad or vmap, nor as a pruner's loss_fn (which runs inside its compiled loop). Write "
        "the loss as a JAX function of the params instead, closing over the data, e.g. "
        "loss_fn = lambda p: jaxprune.train.cross_entropy(model.apply(p, x), y).mean() "
        "(jaxprune.train.squared_error for an autoencoder).")


def evaluate(model: Model, params: PyTree, x, y, *, masks: PyTree | None = None,
             loss: Callable | None = None, batch_size: int = 1024,
             sample_weight=None) -> dict[str, float]:
  """Mean loss and accuracy (a fraction; 0 for reconstruction tasks) of a (masked) network.

  ``model`` is a built-in model, a traced target or an apply function ``fn(params, x)``;
  ``params`` are one network's (stacked runs raise a ValueError pointing to
  :func:`evaluate_many`).

  ``sample_weight`` (N,) makes both weighted means, ``sum(w * v) / sum(w)``: a sample with
  weight 0 does not exist (padding), 0/1 weights act as a sample mask, and padded data with
  zero weights give the metrics of the unpadded data (up to float summation order). None: every
  sample counts once (the unweighted program, unchanged).

  A user-supplied ``loss`` should be one function object reused across calls: each new function
  compiles a new program.
  """
  _refuse_traced("evaluate", params, x, y, masks, sample_weight)
  model = as_model(model, loss)
  batch_size = _check_batch_size(batch_size)
  xh, yh = _host(x), _host(y)
  w = (None if sample_weight is None else
       validate.check_sample_weight(sample_weight, xh.shape[0]))
  model.check_input(xh)
  _check_not_stacked("evaluate", model, params, xh)
  _check_data(_targets_as(model, loss), xh, yh, params=params,
              sample_weight=None if w is None else np.asarray(w))
  if masks is not None:
    masks_lib.check_weight_masks(params, masks)
  _check_start_params(params, masks)
  if masks is not None:
    params = masks_lib.apply_masks(params, masks)
  trainer = make_trainer(model, loss=loss)
  x, y = _device(x, xh), _device(y, yh)
  if sample_weight is None:
    m = _compiled_eval(trainer, batch_size)(params, x, y)
  else:
    m = _compiled_eval_weighted(trainer, batch_size, False)(params, None, x, y, w)
  return {k: float(v) for k, v in m.items()}


def evaluate_many(model: Model, params: PyTree, x, y, sample_weight=None, *,
                  masks: PyTree | None = None, loss: Callable | None = None,
                  batch_size: int = 1024) -> dict[str, np.ndarray]:
  """:func:`evaluate` of a stack of R networks, each on its own data, as one vmapped program.

  The counterpart of :func:`fit_many`: every argument that varies per run has a leading axis R:
  ``params`` (stacked), ``x`` (R, N, ...), ``y`` (R, N, ...), ``sample_weight`` (R, N) with 0
  for padding rows (None: all ones), ``masks`` (stacked weight masks, or None). Runs of unequal
  size are padded to N with weight 0; each run's result equals :func:`evaluate` on its unpadded
  data (up to float summation order).

  Returns:
    ``{'loss': (R,), 'accuracy': (R,)}`` NumPy arrays (accuracy a fraction; 0 for
    reconstruction tasks).

  Example:
    >>> import jax, jax.numpy as jnp, jaxprune
    >>> model = jaxprune.MLP(in_features=4, hidden=(8,), out_features=3)
    >>> params = jax.vmap(model.init)(jax.random.split(jax.random.key(0), 2))
    >>> x = jax.random.normal(jax.random.key(1), (2, 10, 4)); y = jnp.zeros((2, 10), int)
    >>> jaxprune.evaluate_many(model, params, x, y)['accuracy'].shape
    (2,)
  """
  _refuse_traced("evaluate_many", params, x, y, masks, sample_weight)
  model = as_model(model, loss)
  batch_size = _check_batch_size(batch_size)
  xh, yh = _host(x), _host(y)
  wh = (np.ones(xh.shape[:2], np.float32) if sample_weight is None
        else _host(sample_weight, np.float32))
  _check_runs("evaluate_many", model, params, xh, yh, wh, "sample_weight", masks)
  _check_start_params(params, masks)
  _check_runs_data(_targets_as(model, loss), params, xh, yh, wh, "sample_weight")
  trainer = make_trainer(model, loss=loss)
  m = _compiled_eval_weighted(trainer, batch_size, True)(params, masks, _device(x, xh),
                                                         _device(y, yh), _device(wh))
  return {k: np.asarray(v) for k, v in m.items()}


def accuracy(model: Model, params: PyTree, x, y, *, masks: PyTree | None = None) -> float:
  """Classification accuracy in [0, 1]."""
  return evaluate(model, params, x, y, masks=masks)["accuracy"]


def rewind(params: PyTree, init_params: PyTree, masks: PyTree) -> PyTree:
  """Lottery-ticket rewinding: kept weights take their saved earlier values, pruned ones 0.

  Args:
    params: the trained params (only their structure is used; kept for symmetry with the
      literature's ``rewind(trained, initial, mask)``).
    init_params: the saved earlier params (e.g. the pretrained or initial weights).
    masks: weight masks of the pruned network (None: no masks, every weight kept, as the
      pruners read None).
  """
  if jax.tree.structure(params) != jax.tree.structure(init_params):
    raise ValueError("params and init_params have different structures: rewind needs the "
                     "saved params of the same model.")
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                          jax.tree.leaves(init_params)):
    if jnp.shape(a) != jnp.shape(b):
      raise ValueError(f"init_params{jax.tree_util.keystr(path)} has shape {jnp.shape(b)}, the "
                       f"trained params' {jnp.shape(a)}: rewind needs the saved params of the "
                       "same model (of the same sizes).")
  if masks is None:
    return init_params
  return masks_lib.apply_masks(init_params, masks)
