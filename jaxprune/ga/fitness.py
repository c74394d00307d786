"""GA fitness: data in, scores out. The seeds' eq. 5 / eq. 6 accuracy fitness (one-product fast
path when the group feeds the output directly; incremental evaluation), and user functions."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxprune import masks as masks_lib
from jaxprune import units as units_lib
from jaxprune import validate
from jaxprune.ga import operators as ops
from jaxprune.ga.strategy import GAHyperparams

PyTree = Any
FitnessFn = Callable[[jax.Array, PyTree, "GAHyperparams"], jax.Array]


# ----------------------------------------------------------------------------- fitness


#: Eq. 5 scales a ``lam`` above this by ``2**-64`` before ``lam * kept`` (see :func:`penalized`).
_LAM_SCALE_ABOVE = 2.0 ** 64


def penalized(accuracy: jax.Array, kept: jax.Array, num_units: int, lam,
              penalty: str) -> jax.Array:
  """Eq. 5 (``'ratio'``: ``acc - lam * kept / num_units``) or eq. 6 (``'count'``:
  ``acc - lam * kept``); ``accuracy`` in percent.

  Eq. 5 is computed in that order (``lam * kept`` first, then the division), and without its
  overflow: a ``lam`` above ``2**64`` is multiplied by ``2**-64`` first and the quotient by
  ``2**64`` after, which is exact (powers of two), so every ``lam`` gets the float that
  ``lam * kept / num_units`` rounds to with no exponent limit (``lam=1e38`` with 10 of 20
  units kept: ``-5e37``, not ``-inf``); an ordinary ``lam`` gets the same bits as before.
  Eq. 6 overflows only where its value itself is beyond float32.
  """
  kept = jnp.asarray(kept, jnp.float32)
  if penalty == "ratio":
    big = jnp.abs(lam) > _LAM_SCALE_ABOVE
    scaled = jnp.where(big, lam * 2.0 ** -64, lam) * kept / num_units
    return accuracy - jnp.where(big, scaled * 2.0 ** 64, scaled)
  if penalty == "count":
    return accuracy - lam * kept
  raise ValueError(f"penalty must be 'ratio' (eq. 5) or 'count' (eq. 6), got {penalty!r}.")


def readout_slice(target, group: str):
  """The group's consumer slice if the target's output is an affine function of ``group``'s
  activations, read directly (the GA's fast path); else None.

  That holds when the group's only consumer is the last linear map before the output, reading
  exactly the group's activations (the last hidden layer of an MLP, the last dense layer of a
  CNN). It is found from the target's traced computation (``target.readout``), never from layer
  names.
  """
  units_lib._check_group_name(_groups_of(target), group)
  readout = getattr(target, "readout", None)
  return readout(group) if readout is not None else None


def readout_bias(target, params: PyTree, x: jax.Array, s, outputs: int) -> jax.Array:
  """What the readout adds to ``H @ W`` (the fast path's ``b``), as the target's function adds
  it: (outputs,) when it is the same for every pattern, else (N, outputs).

  ``s`` is the group's readout slice (:func:`readout_slice`). A bias leaf recorded on it
  (``s.bias``: its output axis matched to the kernel's, see ``units.Slice``) is brought to
  (outputs,): a leaf of one value (a scalar, a (1, 1) bias) is broadcast to every output, one
  of ``outputs`` values along one axis (a (1, C) bias, a (C, 1) bias transposed) is reshaped.
  Anything else (no bias recorded although the function may add one: a scalar the trace
  does not record, a flipped or indexed vector; a leaf of another shape: a per-pattern
  (N, C) "bias", a row of a larger leaf) is read from the function itself: its output with the
  readout kernel zeroed is exactly what it adds, ``0 + B``, pattern by pattern (one forward
  pass; a readout without bias gives zeros).
  """
  if s.bias is not None:
    leaf = jnp.asarray(units_lib.get_path(params, s.bias))
    if leaf.size == 1:
      return jnp.broadcast_to(leaf.reshape(()), (outputs,))
    if [d for d in leaf.shape if d != 1] == [outputs]:
      return leaf.reshape(outputs)
  kernel = units_lib.get_path(params, s.path)
  zeroed = units_lib.set_path(params, s.path, jnp.zeros_like(kernel))
  b = jnp.asarray(target.apply(zeroed, x))
  return b.reshape(b.shape[0], -1)


def fast_path_applies(target, group: str) -> bool:
  """True if :func:`readout_slice` finds the one-product fast path for ``group``."""
  return readout_slice(target, group) is not None


def _groups_of(target):
  groups = target.groups if hasattr(target, "groups") else None
  if not isinstance(groups, Mapping):
    raise TypeError("The GA needs a pruning target (a jaxprune model or jaxprune.trace(...)), got "
                    f"{type(target).__name__}.")
  return groups


def _labels(y: jax.Array, sample_weight=None) -> jax.Array:
  # a column (N, 1) is not one-hot; all-zero one-hot rows are refused unless their weight is 0
  validate.check_label_shape("y", y, one_hot=True, sample_weight=sample_weight)
  y = jnp.asarray(y)
  if y.ndim == 2:
    y = jnp.argmax(y, axis=-1)
  if y.ndim != 1 or not jnp.issubdtype(y.dtype, jnp.integer):
    raise ValueError(f"Labels must be integer class indices of shape (N,) (or one-hot (N, C)); "
                     f"got shape {tuple(y.shape)} and dtype {y.dtype}.")
  return y


def _pow2(k: jax.Array) -> jax.Array:
  """``2.0 ** k`` as float32, exactly, for integers ``k`` in [-126, 127] (from its bits)."""
  return lax.bitcast_convert_type((k + 127) << 23, jnp.float32)


def scale_weights(w: jax.Array) -> jax.Array:
  """``w * 2**k`` exactly, inside a program, with ``k`` such that the largest ``|w|`` lies in
  [1, 2) (below 1 if it is subnormal): a weighted mean of the result is the weighted mean of
  ``w``, without its sums overflowing (``1e37`` per pattern) or vanishing (subnormal weights
  such as ``1e-40``, which XLA:CPU flushes to 0 in arithmetic).

  Scaling by a power of two changes no significant bit, so for weights that neither overflow
  nor underflow every sum of the weighted mean is the same float times ``2**k``, and the mean
  the same float: results at ordinary scales keep their bits. Computed from the bits
  (exponent and significand as integers), so subnormal inputs are read as they are. A weight
  below ``2**-126`` times the largest becomes 0 (it cannot change a float32 mean). Weights
  with a NaN or an infinity, and weights of another dtype than float32 (``prepare`` makes
  float32 weights), are returned as they are.
  """
  w = jnp.asarray(w)
  if w.dtype != jnp.float32:
    return w
  bits = lax.bitcast_convert_type(w, jnp.int32)
  mag = bits & 0x7FFFFFFF
  field = mag >> 23                                   # biased exponent (0: zero, subnormal)
  sig = jnp.where(field > 0, (mag & 0x7FFFFF) | 0x800000, mag & 0x7FFFFF)   # < 2**24: exact
  top = jnp.maximum(jnp.max(field, initial=0), 1)
  d = jnp.maximum(field, 1) - top                     # <= 0
  # |w| * 2**(127 - top) = sig * 2**-23 * 2**d, each product exact where it is normal
  s = sig.astype(jnp.float32) * jnp.float32(2.0 ** -23) * _pow2(jnp.maximum(d, -126))
  s = jnp.where(d < -126, jnp.float32(0), s)
  s = jnp.where(bits < 0, -s, s)
  return jnp.where(jnp.all(field < 255), s, w)


def host_sample_weight(sample_weight, n: int) -> jax.Array:
  """:func:`jaxprune.validate.check_sample_weight`, for the GA's weighted accuracy: concrete
  weights are first scaled by a power of two (in float64, exactly) so that the largest lies in
  [1, 2), so that weights the check accepts keep their ratios in float32 (float64 weights of
  ``1e-50`` or ``1e300`` would round to 0 or ``inf``); traced weights are scaled inside the
  program (:func:`scale_weights`)."""
  if sample_weight is not None and validate.is_concrete(sample_weight):
    v = np.asarray(sample_weight)
    if v.dtype.kind in "biuf" and v.ndim == 1 and v.size:
      v = v.astype(np.float64)
      top = np.max(np.abs(v)) if np.all(np.isfinite(v)) else 0.0
      if top > 0 and np.all(v >= 0):
        sample_weight = np.ldexp(v, 1 - np.frexp(top)[1])   # exact: a power of two
  return validate.check_sample_weight(sample_weight, n)


def nonzero_weights(w: jax.Array) -> jax.Array:
  """(N,) bool, inside a program: ``w != 0`` as the host computes it (float32 weights are read
  from their bits: XLA:CPU compares a subnormal weight such as ``1e-40`` as 0)."""
  w = jnp.asarray(w)
  if w.dtype != jnp.float32:
    return w != 0
  return (lax.bitcast_convert_type(w, jnp.int32) & 0x7FFFFFFF) != 0


def nonfinite_rows(h: jax.Array, sample_weight=None, xp=jnp) -> jax.Array:
  """() bool: a NaN or infinite activation in a pattern that counts (weight > 0); inside a
  program (``xp=jnp``) or on concrete values on the host (``xp=np``: nothing to compile)."""
  h = xp.asarray(h)
  bad = ~xp.all(xp.isfinite(h.reshape(h.shape[0], -1)), axis=1)
  if sample_weight is not None:   # (the host compares subnormal weights as nonzero itself)
    bad = bad & (nonzero_weights(sample_weight) if xp is jnp
                 else np.asarray(sample_weight).reshape(-1) != 0)
  return xp.any(bad)


def nonfinite_activations_message(group: str) -> str:
  """Why a GA cannot score masks of ``group``, and the fix."""
  return (f"The activations of group {group!r} on x hold NaN or infinite values, though x "
          "and the params are finite (a unit overflows): a removed unit's inf * 0 is NaN in "
          "every output, so no mask can be scored. Bring the inputs to a moderate scale "
          "(standardize x) or repair the params (trained to overflow?); see "
          f"model.activations(params, x, {group!r}).")


def weights_unusable(w: jax.Array) -> jax.Array:
  """() bool, inside a program: what :func:`jaxprune.validate.check_sample_weight` refuses
  (a weight that is NaN, infinite or negative, or none above 0), read from the bits so that
  subnormal weights (which XLA:CPU compares as 0) are judged as on the host."""
  w = jnp.asarray(w)
  if w.dtype != jnp.float32:
    return ~jnp.all(jnp.isfinite(w) & (w >= 0)) | ~jnp.any(w > 0)
  bits = lax.bitcast_convert_type(w, jnp.int32)
  negative = (bits < 0) & ((bits & 0x7FFFFFFF) != 0)    # -0.0 is not negative
  return ~jnp.all(jnp.isfinite(w)) | jnp.any(negative) | ~jnp.any(bits > 0)


def weighted_percent(correct: jax.Array, w: jax.Array | None, scale: float = 100.0) -> jax.Array:
  """Accuracy in percent over axis 0 of ``correct``; weighted by ``w`` (N,) when given
  (``scale=1.0``: a fraction, rounded once; unweighted, the same float as
  :func:`jaxprune.evaluate` gives, where a percent divided by 100 can be an ulp off; weighted,
  the sums below run in their own order, so it can differ from evaluate's by an ulp or two).

  The weights are scaled first (:func:`scale_weights`: by a power of two, exactly), so that
  the mean does not depend on their scale: weights of ``1e37`` or ``1e-40`` per pattern give
  the accuracy of weights of 1, to the bit."""
  correct = correct.astype(jnp.float32)
  if w is None:
    return scale * jnp.mean(correct, axis=0)
  # Sums in one fixed order, so that the full and the incremental evaluation (other layouts,
  # other fusions) give the same float whatever the weights.
  w = scale_weights(w).reshape((-1,) + (1,) * (correct.ndim - 1))
  return scale * (ops.ordered_sum(w * correct) / ops.ordered_sum(w))


@dataclasses.dataclass(frozen=True)
class AccuracyFitness:
  """Training accuracy in percent of the masked network, minus a size penalty.

  ``penalty='ratio'`` is eq. 5 (``acc - lam * N_kept / N_initial``), ``'count'`` eq. 6
  (``acc - lam * N_kept``), ``None`` the accuracy alone, and ``'per_run'`` either equation
  chosen by the data (``prepare(..., penalty='ratio' | 'count')``), so that runs of both
  equations share one vmapped program.

  ``weighted=True`` makes the accuracy a weighted mean over the patterns with the sample weights
  given to ``prepare`` (a pattern of weight 0 does not exist: training folds of unequal size
  padded to one shape score exactly as their real patterns, to float rounding); its sums are
  added in one fixed order, so the incremental evaluation gives the same floats as the full
  one. ``fast=True`` scores the population
  from activations computed once (see :func:`fast_path_applies`), as one matrix product
  ``H @ W_all`` with ``W_all[:, p*O:(p+1)*O] = mask[p][:, None] * W_out``, plus the readout's
  bias as the function adds it (:func:`readout_bias`); ``fast=False`` runs
  the full masked forward pass for each individual (``vmap``). On the fast path,
  ``incremental`` lets :func:`run` score children from their parents' logits
  (:mod:`jaxprune.ga.incremental`): ``'auto'`` (the default) on CPU, from
  ``incremental.MIN_UNITS`` units on, for long runs (elsewhere the full evaluation), True
  always, False never (full evaluation); logits below 32 bits (bfloat16, float16 params and
  inputs) are always evaluated in full (:func:`jaxprune.ga.incremental.exact_dtype`).
  Sample weights are scaled by a power of two before use (:func:`scale_weights`), so the
  weighted accuracy does not depend on their scale.

  Use ``prepare(params, x, y)`` to build the ``data`` argument (:func:`jaxprune.ga.run`
  checks it with :meth:`check_data`).
  """

  #: Each individual is scored on its own (a sharded run may pad the population, see
  #: :func:`jaxprune.ga.loop.scores_rows_independently`).
  per_individual: ClassVar[bool] = True

  model: Any
  group: str
  penalty: str | None = "ratio"
  fast: bool = False
  incremental: bool | str = "auto"
  weighted: bool = False

  def __post_init__(self):
    if self.penalty not in ("ratio", "count", "per_run", None):
      raise ValueError(f"penalty must be 'ratio' (eq. 5), 'count' (eq. 6), 'per_run' or None, "
                       f"got {self.penalty!r}.")

  def prepare(self, params: PyTree, x: jax.Array, y: jax.Array, *, sample_weight=None,
              penalty: str | None = None) -> PyTree:
    """The ``data`` of one run: the network's arrays, the labels, and (``weighted``) the
    sample weights (None: all ones); ``penalty`` ('ratio' or 'count') picks the equation of a
    ``'per_run'`` fitness. Concrete data are checked as :func:`jaxprune.ga.search` checks
    them (labels within the model's outputs, finite inputs and params, matching lengths), so
    ``run`` never scores data that ``search`` refuses."""
    y = _labels(y, sample_weight)
    check = getattr(self.model, "check_input", None)
    if check is not None:
      check(x)
    if y.shape[0] != jnp.shape(x)[0]:
      raise ValueError(f"x has {jnp.shape(x)[0]} patterns but y has {y.shape[0]} labels.")
    if check is not None and validate.is_concrete(params, x, y):   # (search checked already)
      validate.check_model_data(self.model, params, x, y, sample_weight=sample_weight)
    extra = {}
    if sample_weight is not None and not self.weighted:
      raise ValueError("sample_weight needs a weighted fitness: AccuracyFitness(..., "
                       "weighted=True).")
    if self.weighted:
      n = y.shape[0]
      extra["sample_weight"] = (jnp.ones((n,), jnp.float32) if sample_weight is None else
                                host_sample_weight(sample_weight, n))
    if (penalty is None) != (self.penalty != "per_run"):
      raise ValueError("prepare(..., penalty='ratio' | 'count') goes with penalty='per_run' "
                       f"(and only with it); this fitness has penalty={self.penalty!r}.")
    if penalty is not None:
      if penalty not in ("ratio", "count"):
        raise ValueError(f"penalty must be 'ratio' (eq. 5) or 'count' (eq. 6), got {penalty!r}.")
      extra["count_penalty"] = jnp.asarray(penalty == "count")
    if not self.fast:
      return {"params": params, "x": jnp.asarray(x), "y": y, **extra}
    s = readout_slice(self.model, self.group)
    h = self.model.activations(params, x, self.group)
    w = units_lib.unit_view(units_lib.get_path(params, s.path), s)      # (units, outputs)
    w = w.reshape(w.shape[0], -1)
    if validate.is_concrete(h, sample_weight) and nonfinite_rows(h, sample_weight, np):
      raise ValueError(nonfinite_activations_message(self.group))
    return {"h": h.reshape(h.shape[0], -1), "w": w,
            "b": readout_bias(self.model, params, x, s, w.shape[-1]), "y": y, **extra}

  def check_data(self, data: PyTree, num_units: int) -> None:
    """Raises ValueError unless ``data`` is what :meth:`prepare` makes for this fitness and
    ``num_units`` (the chromosome's length, :func:`jaxprune.ga.run`'s argument) is the group's
    size. Reads only keys and shapes (``data`` may be traced or abstract)."""
    need = ("h", "w", "b", "y") if self.fast else ("params", "x", "y")
    if self.weighted:
      need += ("sample_weight",)
    if self.penalty == "per_run":
      need += ("count_penalty",)
    if not isinstance(data, Mapping) or any(k not in data for k in need):
      got = (f"a dict with keys {sorted(data)}" if isinstance(data, Mapping) else
             "data=None" if data is None else f"a {type(data).__name__}")
      raise ValueError(
          f"This AccuracyFitness (fast={self.fast}, weighted={self.weighted}, "
          f"penalty={self.penalty!r}) scores the data its prepare() makes, a dict with keys "
          f"{list(need)}; got {got}. Pass data=fitness.prepare(params, x, y"
          f"{', sample_weight=w' if self.weighted else ''}"
          f"{', penalty=...' if self.penalty == 'per_run' else ''}) with this same fitness "
          "object.")
    units = (int(jnp.shape(data["w"])[0]) if self.fast else
             _groups_of(self.model)[self.group].size)
    if int(num_units) != units:
      raise ValueError(f"num_units is {num_units} but group {self.group!r} of this fitness has "
                       f"{units} units (the chromosome has one bit per unit): pass "
                       f"num_units={units}.")

  def accuracy(self, population: jax.Array, data: PyTree, scale: float = 100.0) -> jax.Array:
    """(P,) training accuracy in percent of each mask of the population (``scale=1.0``: as a
    fraction, see :func:`weighted_percent`)."""
    y = data["y"]
    if self.fast:
      h, w, b = data["h"], data["w"], data["b"]
      p, (u, o) = population.shape[0], w.shape
      w_all = population.T.astype(w.dtype)[:, :, None] * w[:, None, :]   # (U, P, O)
      # b: (O,) the same for every pattern, or (N, O) (see readout_bias)
      logits = (h @ w_all.reshape(u, p * o)).reshape(h.shape[0], p, o) + (
          b[None, None, :] if b.ndim == 1 else b[:, None, :])
      correct = jnp.argmax(logits, axis=-1) == y[:, None]                 # (N, P)
      return weighted_percent(correct, data.get("sample_weight"), scale)

    def one(mask):
      wm = masks_lib.expand(data["params"], self.model, {self.group: mask})
      logits = self.model.apply(masks_lib.apply_masks(data["params"], wm), data["x"])
      return weighted_percent(jnp.argmax(logits, axis=-1) == y, data.get("sample_weight"),
                              scale)

    return jax.vmap(one)(population)

  def incremental_data(self, data: PyTree) -> tuple[jax.Array, ...]:
    """``(h, w, b, y)`` of the fast path, for :mod:`jaxprune.ga.incremental`, and
    ``sample_weight`` last when the fitness is weighted."""
    if not self.fast:
      raise ValueError("Incremental evaluation needs the fast path (fast=True).")
    if self.weighted:
      return data["h"], data["w"], data["b"], data["y"], data["sample_weight"]
    return data["h"], data["w"], data["b"], data["y"]

  def unit_activation(self) -> str:
    """The group's nonlinearity (``'sigmoid'``, ``'relu'``, ..., ``'other'``)."""
    return _groups_of(self.model)[self.group].activation

  def from_accuracy(self, accuracy: jax.Array, population: jax.Array, data: PyTree,
                    hyper: GAHyperparams) -> jax.Array:
    """The fitness of each individual given its accuracy (the size penalty, if any)."""
    if self.penalty is None:
      return accuracy
    kept = jnp.sum(population, axis=1, dtype=jnp.int32)
    if self.penalty == "per_run":
      units = population.shape[1]
      return jnp.where(data["count_penalty"], penalized(accuracy, kept, units, hyper.lam, "count"),
                       penalized(accuracy, kept, units, hyper.lam, "ratio"))
    return penalized(accuracy, kept, population.shape[1], hyper.lam, self.penalty)

  def __call__(self, population: jax.Array, data: PyTree, hyper: GAHyperparams) -> jax.Array:
    return self.from_accuracy(self.accuracy(population, data), population, data, hyper)


@dataclasses.dataclass(frozen=True, eq=False)
class UserFitness:
  """A user function ``fn(params, mask) -> scalar`` scored over the population with ``vmap``.

  Compiled runs are cached by it: by the function's own equality where it is hashable (a bound
  method fetched again is the same fitness), by identity where it is not (a callable object
  that defines ``__eq__`` without ``__hash__``).
  """

  fn: Callable[[PyTree, jax.Array], jax.Array]
  per_individual: ClassVar[bool] = True   # vmapped over the rows (see AccuracyFitness)

  def _key(self):
    try:
      hash(self.fn)
      return (True, self.fn)
    except TypeError:
      return (False, id(self.fn))

  def __eq__(self, other):
    if not isinstance(other, UserFitness):
      return NotImplemented
    a, b = self._key(), other._key()
    return a == b if a[0] and b[0] else self.fn is other.fn

  def __hash__(self):
    return hash(self._key())

  def __call__(self, population: jax.Array, data: PyTree, hyper: GAHyperparams) -> jax.Array:
    del hyper
    return jax.vmap(lambda m: jnp.asarray(self.fn(data, m), jnp.float32))(population)


_FITNESS = {"eq5": "ratio", "eq6": "count", "accuracy": None}


def make_fitness(model, group: str, fitness: str | Callable = "eq5",
                 fast_path: bool | str = "auto",
                 incremental: bool | str = "auto") -> AccuracyFitness | UserFitness:
  """The fitness object :func:`search` uses (hashable, so compiled runs are reused)."""
  if incremental not in (True, False, "auto") or isinstance(incremental, (int, float)) and (
      not isinstance(incremental, bool)):
    raise ValueError(f"incremental must be 'auto', True or False, got {incremental!r}.")
  if not (fast_path is True or fast_path is False or
          (isinstance(fast_path, str) and fast_path == "auto")):
    # (checked for a fitness function too, which takes no fast path: a typo is not ignored)
    raise ValueError(f"fast_path must be 'auto', True or False, got {fast_path!r}.")
  g = units_lib._check_group_name(_groups_of(model), group)
  if callable(fitness):
    return UserFitness(fitness)
  if fitness not in _FITNESS:
    raise ValueError(f"fitness must be 'eq5', 'eq6', 'accuracy' or a function "
                     f"(params, mask) -> scalar; got {fitness!r}.")
  if getattr(model, "task", "classification") != "classification":
    raise ValueError(f"Fitness {fitness!r} scores classification accuracy, but this "
                     f"{type(model).__name__} does {model.task}; pass a function "
                     "(params, mask) -> scalar instead.")
  applies = fast_path_applies(model, g.name)
  if fast_path == "auto":
    fast = applies
  elif fast_path is True:
    if not applies:
      raise ValueError(f"fast_path=True needs a group read only by the output layer "
                       f"(e.g. the last hidden layer) through that layer's own kernel; "
                       f"{group!r} is not{_why_no_readout(g)}. Use fast_path='auto'.")
    fast = True
  elif fast_path is False:
    fast = False
  else:
    raise ValueError(f"fast_path must be 'auto', True or False, got {fast_path!r}.")
  return AccuracyFitness(model, group, _FITNESS[fitness], fast, incremental)


def _why_no_readout(g) -> str:
  """What keeps a group that only the output layer reads off the fast path, in words."""
  if g.read_by_products:
    return (" (its units are also read by a product of two activations or a sum over the "
            "units: q @ k.T, an RMSNorm's sum of squares)")
  computed = [s for s in g.consumers if units_lib.reads_computed(s)]
  if computed and len(g.consumers) == 1:
    return (" (the output layer reads it through a kernel computed from params, "
            f"{units_lib.path_str(computed[0].path)}: not the rows the fast path would use)")
  return ""
