"""The one data check every entry point that takes data runs: training, evaluation, the GA and
the activation-based pruners.

Each check runs on concrete values only (under ``jit``/``vmap`` a traced array cannot be
inspected, and is left alone), reads the inputs ``x`` where they live (a device array is not
copied to the host; labels and weights, small, are read with NumPy, so that a concrete array
closed over inside ``jit`` stays concrete) and raises ``ValueError`` with a message that names
the problem and the fix.

Example:
  >>> import numpy as np
  >>> from jaxprune import validate
  >>> validate.check_data(np.ones((4, 3), np.float32), np.array([0, 1, 2, 0]), num_classes=3)
  >>> try:
  ...   validate.check_data(np.zeros((0, 3), np.float32), np.zeros((0,), int))
  ... except ValueError as e:
  ...   print(str(e).split(';')[0])
  x is empty (0 samples)
"""

from __future__ import annotations

import math
import operator
import threading
import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = ["check_data", "check_finite", "check_key", "check_label_shape", "check_labels",
           "check_not_empty", "check_params", "check_real_scalar", "check_sample_weight",
           "is_concrete", "is_real", "one_hot_rows", "whole_number"]


def is_concrete(*xs) -> bool:
  """True if no argument (or pytree leaf) is a tracer, so its values can be checked."""
  return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(xs))


def is_real(value, *, bool_ok: bool = True) -> bool:
  """Whether ``value`` (concrete or traced, any shape) holds real numbers: integers or floats,
  and bools when ``bool_ok``; not a string (NumPy would parse ``"0.5"``), None, a complex
  number or an object."""
  if value is None or isinstance(value, (str, bytes)):
    return False
  try:
    dtype = jnp.result_type(value) if hasattr(value, "dtype") else np.asarray(value).dtype
  except (TypeError, ValueError):
    return False
  if dtype == np.bool_:
    return bool_ok
  return bool(jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))


def check_real_scalar(name: str, value, expect: str, sweep: str, *,
                      bool_ok: bool = True) -> None:
  """Raises unless ``value`` is one real number (integer or float, and bool when ``bool_ok``;
  concrete or traced): ``TypeError`` for anything else (a string, None, a complex number),
  saying it must be ``expect``; ``ValueError`` for several numbers, ending with ``sweep`` (how
  to run a sweep)."""
  if not is_real(value, bool_ok=bool_ok):
    got = (f"an array of {jnp.result_type(value)}" if hasattr(value, "dtype") else
           f"{type(value).__name__} {value!r}")
    raise TypeError(f"{name} must be {expect}, got {got}.")
  shape = tuple(value.shape) if hasattr(value, "shape") else tuple(np.shape(value))
  if shape != ():
    raise ValueError(f"{name} must be one number, got shape {shape}; {sweep}")


def whole_number(name: str, value, minimum: int | None = None) -> int:
  """``value`` as a Python int: an int (NumPy's too) or a float with no fractional part, else
  a TypeError (a bool, a string, 2.5) naming ``name``; below ``minimum``, a ValueError. Counts
  such as epochs key caches of compiled programs: a 2.0 that got in as a float was cached as
  equal to 2 and broke every later call with 2 epochs."""
  try:
    v = operator.index(value)
  except TypeError:
    v = None
    if (is_real(value, bool_ok=False) and np.ndim(value) == 0 and is_concrete(value)
        and math.isfinite(float(value)) and float(value).is_integer()):
      v = int(float(value))        # 2.0, np.float32(2), jnp.float32(2), np.array(2.0)
  if v is None or isinstance(value, (bool, np.bool_)) or getattr(value, "dtype", None) == bool:
    raise TypeError(f"{name} must be a whole number (an int), got {value!r}; pass e.g. "
                    f"{name}=int({name}).")
  if minimum is not None and v < minimum:
    raise ValueError(f"{name} must be at least {minimum}, got {v}.")
  return int(v)


_DATA_FIX = "clean or impute them first (e.g. drop those rows)."


def check_finite(name: str, x, fix: str = _DATA_FIX) -> None:
  """Raises ValueError if a concrete floating array holds NaN or infinite values; the message
  ends with ``fix`` (by default advice for data)."""
  if x is None or not is_concrete(x):
    return
  dtype = getattr(x, "dtype", None)
  if dtype is not None and not jnp.issubdtype(dtype, jnp.floating):
    return            # integers, bools, PRNG keys (an nnx state's RNG: no NumPy array exists)
  # NumPy, not jnp: a concrete array closed over inside jit must not become a tracer here.
  x = np.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return
  bad = int(np.sum(~np.isfinite(x)))
  if bad:
    raise ValueError(f"{name} holds {bad} NaN or infinite values; {fix}")


def check_not_empty(name: str, x, sample_weight=None) -> None:
  """Raises ValueError if ``x`` has no rows, or every sample weight is zero.

  Args:
    name: what to call the data in the message.
    x: the inputs; axis 0 (``axis`` of stacked runs excluded, see :func:`check_data`) counts
      the samples.
    sample_weight: optional weights; all zero means no real sample.
  """
  if np.ndim(x) == 0 or np.shape(x)[0] == 0:
    raise ValueError(f"{name} is empty (0 samples); pass at least one sample.")
  if sample_weight is not None and is_concrete(sample_weight):
    w = np.asarray(sample_weight)  # small; NumPy keeps a value closed over inside jit concrete
    if w.size == 0 or not bool(np.any(w != 0)):
      raise ValueError(f"{name} is empty: every sample weight is zero, so there is no real "
                       "sample to learn from or score; give at least one sample weight > 0.")


def check_sample_weight(sample_weight, n: int, name: str = "sample_weight"):
  """Checks per-sample weights for ``n`` samples; returns them as a float32 array.

  Sample weights give each sample's share of a weighted mean: weight 0 means the sample does not
  exist (padding), 0/1 weights act as a sample mask. They must be a vector of ``n`` finite values
  >= 0 with a positive sum (concrete values are checked; traced ones are taken as they are).
  """
  w = jnp.asarray(sample_weight, jnp.float32)
  if w.shape != (n,):
    raise ValueError(f"{name} must have shape ({n},), one weight per sample, got shape "
                     f"{tuple(w.shape)}.")
  if is_concrete(sample_weight):
    v = np.asarray(sample_weight, np.float64)
    if not np.all(np.isfinite(v)) or np.any(v < 0):
      raise ValueError(f"{name} must be finite and >= 0 (0 marks a sample that does not exist, "
                       "e.g. padding), got negative, NaN or infinite values.")
    if not np.any(v > 0):
      raise ValueError(f"{name} is all zero: no sample is left to compute anything from; give "
                       "at least one sample a weight > 0.")
  return w


def check_labels(name: str, y, num_classes: int | None = None, sample_weight=None) -> None:
  """Raises ValueError unless ``y`` holds integer labels in ``[0, num_classes)``.

  Rows whose sample weight is zero (padding) are not checked.
  """
  if y is None or not is_concrete(y, sample_weight):
    return
  # NumPy, not jnp (labels are small): a concrete array closed over inside jit must not become
  # a tracer here.
  y = np.asarray(y)
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{name} labels must be integer class indices, got "
                     f"{float_labels_fix(y)}")
  if sample_weight is not None:
    y = y[np.asarray(sample_weight) != 0]
  if num_classes is None or y.size == 0:
    return
  lo, hi = int(np.min(y)), int(np.max(y))
  if lo < 0 or hi >= num_classes:
    raise ValueError(f"{name} labels range over [{lo}, {hi}] but the model has {num_classes} "
                     f"outputs (classes); {label_range_fix(num_classes)}")


def fractional(y) -> bool:
  """Whether ``y`` holds finite values that are not all whole numbers (regression targets or
  scores, most likely; not class labels in a float dtype, nor NaN)."""
  try:
    v = np.asarray(y).astype(np.float64)
  except (TypeError, ValueError):
    return False
  return bool(np.all(np.isfinite(v)) and not np.all(np.mod(v, 1) == 0))


def float_labels_fix(y) -> str:
  """The end of the message for class labels that are not integers: whole numbers (floats of
  any width, bools) convert; NaN must be cleaned first (np.unique would make it a class);
  fractional values (regression targets, scores) map or are the wrong targets."""
  if not is_concrete(y):
    return "non-integer values; convert with y.astype(int)."
  y = np.asarray(y)
  try:
    v = y.astype(np.float64)
  except (TypeError, ValueError):
    return (f"dtype {y.dtype}; map names to indices first, e.g. np.unique(y, "
            "return_inverse=True)[1].")
  if not np.all(np.isfinite(v)):
    return (f"{int(np.sum(~np.isfinite(v)))} NaN or infinite labels; clean or impute them first "
            "(e.g. drop those rows).")
  if not fractional(y):
    return f"dtype {y.dtype}; convert with y.astype(int)."
  return (f"dtype {y.dtype} values that are not all whole numbers (regression targets, or "
          "scores?): class labels are 0..C-1; map them first, e.g. np.unique(y, "
          "return_inverse=True)[1].")


def label_range_fix(num_classes: int) -> str:
  """What to do about labels outside [0, num_classes): the range, the mapping, and for a
  one-output model the output count a softmax classifier needs."""
  hint = ("; a softmax classifier of C classes needs C outputs (out_features=2 for binary "
          "labels)" if num_classes == 1 else "")
  return (f"labels must be in [0, {num_classes - 1}]{hint}. Labels of other values (1-based, "
          "or codes like 3, 7, 9) map to 0..C-1 with np.unique(y, return_inverse=True)[1].")


def check_key(key, name: str = "key", *, single: str | None = None,
              batch_fix: str | None = None) -> None:
  """Raises TypeError unless ``key`` is a PRNG key: a typed key array (``jax.random.key``) or
  a legacy raw key (``jax.random.PRNGKey``), uint32 of shape (..., 2) (threefry) or (..., 4)
  (``rbg``); traced keys too. With ``single`` (the call's name, e.g. ``'ga.search'``) a batch
  of keys raises ValueError saying to ``jax.vmap`` the call over them, or ``batch_fix`` (what
  to do instead, for calls where that is something else)."""
  dtype = getattr(key, "dtype", None)
  typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
  raw = not typed and dtype == np.uint32 and np.ndim(key) >= 1 and np.shape(key)[-1] in (2, 4)
  if typed or raw:
    batch = tuple(np.shape(key))[:np.ndim(key) - (0 if typed else 1)]
    if single and batch:
      fix = batch_fix or (f"for several runs, vmap over them: jax.vmap(lambda k: {single}(..., "
                          f"{name}=k))(keys).")
      raise ValueError(f"{single} takes one {name}, got a batch of keys of shape {batch}; {fix}")
    return
  got = (f"{type(key).__name__} {key!r}" if dtype is None else
         f"an array of dtype {dtype} and shape {tuple(np.shape(key))}")
  raise TypeError(f"{name} must be a PRNG key made by jax.random.key(seed) (for several runs: "
                  f"jax.random.split(jax.random.key(seed), n)); got {got}.")


def check_label_shape(name: str, y, num_classes: int | None = None, *,
                      one_hot: bool = False, sample_weight=None) -> None:
  """Raises ValueError unless a classifier's labels are class indices, shape (N,).

  With ``one_hot=True`` one-hot rows (N, C) are accepted too (the column of the 1 is the label):
  C must equal ``num_classes`` (when given) and every concrete row must hold one 1 and zeros
  otherwise (a row of class scores, soft or smoothed labels, several 1s or none would turn into
  a label by an argmax that hides the problem), unless its ``sample_weight`` is 0 (padding).
  A column (N, 1) is always refused: its argmax is 0 for every row, so it would silently turn
  every label into class 0.

  Example:
    >>> import numpy as np
    >>> try:
    ...   check_label_shape("y", np.array([[0], [2], [1]]))
    ... except ValueError as e:
    ...   print(str(e).split(';')[0])
    y labels have shape (3, 1), a column
  """
  shape = tuple(np.shape(y))
  if len(shape) == 1:
    return
  if len(shape) == 2 and shape[1] == 1:
    raise ValueError(f"{name} labels have shape {shape}, a column; pass class indices of shape "
                     f"({shape[0]},): y.ravel() (or y[:, 0]).")
  if len(shape) != 2 or not one_hot:
    fix = "from one-hot rows: y.argmax(-1); " if len(shape) == 2 else ""
    raise ValueError(f"{name} labels have shape {shape}; pass integer class indices of shape "
                     f"(N,), one label per sample ({fix}labels per token or pixel need your own "
                     "loss=).")
  if num_classes is not None and shape[1] != num_classes:
    raise ValueError(f"{name} one-hot labels have {shape[1]} columns but the model has "
                     f"{num_classes} outputs (classes); give one column per class, or pass "
                     "integer class indices of shape (N,).")
  if is_concrete(y, sample_weight):
    a = np.asarray(y)
    real = np.ones(shape[0], bool) if sample_weight is None else np.asarray(sample_weight) != 0
    empty = ~np.any(a != 0, axis=-1) & real
    if np.any(empty):
      raise ValueError(f"{name} one-hot labels: {int(np.sum(empty))} row(s) all zero (first: "
                       f"row {int(np.argmax(empty))}), patterns without a class; drop those rows "
                       "(or give them sample_weight 0).")
    other = ~np.asarray(one_hot_rows(a)) & real
    if np.any(other):
      r = int(np.argmax(other))
      raise ValueError(f"{name} one-hot labels: {int(np.sum(other))} row(s) are not one-hot "
                       f"(first: row {r}, {np.array2string(a[r], precision=3, threshold=8)}); "
                       "each row must hold one 1 and zeros. For class scores or soft labels "
                       "pass the class indices you mean, e.g. y.argmax(-1).")


def one_hot_rows(y) -> Any:
  """(N,) bool: which rows of ``y`` (N, C) hold exactly one 1 and zeros elsewhere (NumPy for a
  NumPy array, else a JAX array; works under jit)."""
  xp = np if isinstance(y, np.ndarray) else jnp
  ones = xp.sum(y == 1, axis=-1)
  return xp.all((y == 0) | (y == 1), axis=-1) & (ones == 1)


def check_params(params: PyTree, name: str = "params") -> None:
  """Raises ValueError if a concrete floating leaf of ``params`` holds NaN or infinite values."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if hasattr(leaf, "dtype"):
      where = jax.tree_util.keystr(path, simple=True, separator="/")
      try:
        check_finite(f"{name}[{where}]", leaf)
      except ValueError as e:
        found = str(e).split(";")[0]   # '<name> holds N NaN or infinite values'
        raise ValueError(f"{found}. A network with such weights gives meaningless results; "
                         "train it again (lower the learning rate) or load sound weights.") from None


def check_data(x, y=None, *, sample_weight=None, num_classes: int | None = None,
               name: str = "x", runs: bool = False) -> None:
  """The shared data check: not empty, finite inputs, matching lengths, labels in range.

  Args:
    x: inputs, (N, ...) (or (R, N, ...) with ``runs=True``).
    y: optional targets; integer labels are range-checked against ``num_classes`` (given for
      classifiers), float targets (e.g. an autoencoder's) only for being finite.
    sample_weight: optional (N,) (or (R, N)) weights; all-zero means empty; rows with weight 0
      are padding and their labels are not checked.
    num_classes: the number of classes, or None to skip the range check.
    name: what to call the data in messages.
    runs: ``x`` carries a leading axis of stacked runs (each run is checked for emptiness).
  """
  if runs:
    if np.ndim(x) < 2:
      raise ValueError(f"{name} needs a leading run axis, (R, N, ...); got shape {np.shape(x)}.")
    for r in range(np.shape(x)[0]):
      check_not_empty(f"{name} of run {r}", x[r],
                      None if sample_weight is None else sample_weight[r])
  else:
    check_not_empty(name, x, sample_weight)
  check_finite(name, x)
  if y is None:
    return
  lead = 2 if runs else 1
  if np.ndim(y) < lead:
    raise ValueError(f"{_targets_of(name)} targets have shape {np.shape(y)}; pass one target "
                     f"per sample, shape {np.shape(x)[:lead]} (a single sample's label as "
                     "y[:1], not y[0]).")
  if np.shape(y)[:lead] != np.shape(x)[:lead]:
    n_x, n_y = (np.shape(x)[:lead], np.shape(y)[:lead]) if runs else (len(x), len(y))
    raise ValueError(f"{name} has {n_x} samples but its targets have {n_y}.")
  of = _targets_of(name)
  kind = getattr(np.asarray(y) if is_concrete(y) else y, "dtype", None)
  if kind is not None and not (np.issubdtype(kind, np.number) or np.issubdtype(kind, np.bool_)
                               or jnp.issubdtype(kind, jnp.number)):
    raise ValueError(f"{of} targets have dtype {kind}: class labels must be integer indices "
                     "0..C-1; map names to indices first, e.g. np.unique(y, return_inverse=True)"
                     "[1].")
  if jnp.issubdtype(jnp.result_type(y), jnp.integer):
    check_labels(of, y, num_classes, sample_weight)
  else:
    if num_classes is not None:
      check_labels(of, y, num_classes)  # raises: classifiers need integer labels
    if (sample_weight is not None and is_concrete(y, sample_weight)
        and np.shape(sample_weight) == np.shape(y)[:np.ndim(sample_weight)]):
      y = np.asarray(y)[np.asarray(sample_weight) != 0]   # a row of weight 0 does not exist
    check_finite(f"{of} targets", y)


def _targets_of(name: str) -> str:
  """How messages name the targets of the data called ``name``: the argument ``y`` for ``x``."""
  return "y" if name == "x" else f"{name}'s"


def batch_spec(x) -> jax.ShapeDtypeStruct:
  """One sample shaped like a row of ``x``, as a batch of 1 (floating inputs as float32, token
  ids kept integers): what the shape-only traces of a model run on."""
  dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
  dtype = jnp.float32 if jnp.issubdtype(dtype, jnp.floating) else dtype
  return jax.ShapeDtypeStruct((1,) + tuple(np.shape(x)[1:]), dtype)


# model -> {the abstract params and input row: the abstract outputs}; see _outputs.
_OUTPUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_OUTPUTS_LOCK = threading.Lock()
_OUTPUTS_PER_MODEL = 64


def _abstract_key(params: PyTree, spec: jax.ShapeDtypeStruct):
  """What ``jax.eval_shape(model.apply, params, spec)`` depends on besides the model: the tree
  structure, each leaf's shape, dtype and weak type, the input row, and the settings that
  change what tracing gives or refuses (x64, dtype and rank promotion). None when a leaf is not
  an array (then nothing is cached)."""
  leaves, treedef = jax.tree.flatten(params)
  if not all(isinstance(l, (np.ndarray, jax.Array)) for l in leaves):
    return None
  avals = tuple((l.shape, l.dtype, bool(getattr(l, "weak_type", False))) for l in leaves)
  settings = (bool(jax.config.jax_enable_x64), str(jax.config.jax_numpy_dtype_promotion),
              str(jax.config.jax_numpy_rank_promotion))
  return treedef, avals, spec.shape, spec.dtype, settings


def _outputs(model, params: PyTree, x):
  """The shape and dtype of the model's outputs for one sample shaped like a row of ``x``
  (no computation). Tracing the model for it cost about 5 ms per call of ``evaluate`` or
  ``fit`` on a small MLP, most of a warm ``evaluate``; so the result is kept per model (held
  weakly: a model that is garbage collected takes its entries along) and per abstract params
  and input row, as ``jax.jit`` keeps its traces: a model's equality must cover what its
  ``apply`` depends on, as for the library's compiled programs, which are kept per model too.
  A model that cannot be hashed, compared or weakly referenced is traced every time."""
  spec = batch_spec(x)
  key = _abstract_key(params, spec)
  try:
    if key is not None:
      hash(key)           # params whose structure cannot be hashed: TypeError
    with _OUTPUTS_LOCK:
      known = _OUTPUTS.get(model) if key is not None else None
      if known is not None and key in known:
        return known[key]
  except (TypeError, ValueError):  # a model that cannot be hashed, compared (an __eq__ giving
    key = None                      # an array) or weakly referenced: traced every time
  out = jax.eval_shape(model.apply, params, spec)
  if key is not None:
    try:
      with _OUTPUTS_LOCK:
        known = _OUTPUTS.setdefault(model, {})
        if len(known) >= _OUTPUTS_PER_MODEL:
          known.clear()
        known[key] = out
    except (TypeError, ValueError):   # as above
      pass
  return out


def output_shape(model, params: PyTree, x) -> tuple | None:
  """The shape of the model's outputs for a batch of one sample shaped like a row of ``x``
  (no computation); None when the model returns several outputs (a dict or tuple)."""
  out = _outputs(model, params, x)
  return tuple(out.shape) if hasattr(out, "shape") else None


def num_outputs(model, params: PyTree, x) -> int:
  """The size of the model's last output axis for inputs shaped like ``x`` (no computation)."""
  out = _outputs(model, params, x)
  if not hasattr(out, "shape"):
    raise ValueError(
        f"This model returns a {type(out).__name__} of outputs, not one array of class scores, "
        "which the built-in loss, accuracy and GA fitness need: pass your own loss= (fit, "
        "evaluate) or fitness function (ga.search), which read the outputs as they are.")
  return int(out.shape[-1])


def check_model_data(model, params: PyTree, x, y=None, *, name: str = "x",
                     sample_weight=None) -> None:
  """:func:`check_data` for a model: inputs of its shape, finite params, and for a classifier
  integer labels (or one-hot rows) within its outputs (rows of ``sample_weight`` 0 are padding:
  their labels are not checked).

  Example:
    >>> import jax, jax.numpy as jnp, jaxprune
    >>> model = jaxprune.MLP(in_features=3, hidden=(4,), out_features=2)
    >>> params = model.init(jax.random.key(0))
    >>> try:
    ...   check_model_data(model, params, jnp.ones((2, 3)), jnp.array([0, 5]))
    ... except ValueError as e:
    ...   print(str(e).split(';')[0])
    y labels range over [0, 5] but the model has 2 outputs (classes)
  """
  model.check_input(x)
  check_params(params)
  classifier = getattr(model, "task", "classification") == "classification"
  num_classes = num_outputs(model, params, x) if classifier and y is not None else None
  if classifier and y is not None and np.ndim(y) != 1:
    of = _targets_of(name)
    check_label_shape(of, y, num_classes, one_hot=True, sample_weight=sample_weight)
    check_finite(f"{of} one-hot labels", y)
    y = np.argmax(np.asarray(y), axis=-1) if is_concrete(y) else jnp.argmax(y, axis=-1)
  check_data(x, y, sample_weight=sample_weight, num_classes=num_classes, name=name)
