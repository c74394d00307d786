"""Pruning targets traced from any JAX function: unit groups found, not declared.

``trace(fn, params, *example_args)`` walks the jaxpr of ``fn(params, *example_args)`` and follows
every axis of every parameter leaf through the computation, the way Torch-Pruning's dependency
graph does for PyTorch modules. Each axis of each intermediate value is described by *atoms*
(a flatten merges several atoms into one axis; a consumer kernel read through a flatten is split
into the same atoms). Operations tie atoms together with a union-find:

* elementwise ops (bias add, batch-norm scale/shift/statistics, activations) tie the axes of their
  operands (size-1 axes broadcast and tie nothing);
* ``dot_general`` and ``conv_general_dilated`` tie the contracted axes of their two operands; the
  kernel's free axis becomes the output's axis (a depthwise conv ties input and output channels);
* residual additions tie the channels of several layers into one coupled group;
* a kernel computed from params alone (a weight norm ``w / norm(w, axis=0)``, a standardised
  kernel, ``w * 0.5``) makes the contraction that reads it the producer of the units that the
  params' axes are tied to; the axes it contracts are not prunable;
* ``reshape`` regroups atoms (flatten) and ``transpose`` permutes them;
* pooling and reductions over *other* axes keep the unit axis; sub-jaxprs (``jit``,
  ``custom_jvp``/``custom_vjp`` calls, ``remat``) are followed.

A class of tied atoms is a *unit group* when parameter leaves produce it (kernel columns, biases,
norm parameters), at least one kernel reads (contracts) it against the activations, and nothing
mixes its units or lets them escape: classes that reach the function's outputs or inputs, are
reduced over (e.g. layer-norm statistics), sliced, sorted, concatenated, tied to a constant of
fixed shape, or touched by an op this module does not follow are *not prunable*, and
:meth:`TracedTarget.explain` says why for every parameter leaf. Removing a unit of a group then
removes exactly its slices, and the compacted network computes what the masked one does.

The compacted network runs through the same computation: :class:`TracedTarget` re-evaluates the
traced program at the new unit counts (shapes inside the program, e.g. a ``reshape``'s sizes or
a depthwise conv's group count, are recomputed from the atoms), so no module is rewritten.

Example:
  >>> import jax, jax.numpy as jnp, jaxprune
  >>> def mlp(p, x):
  ...   h = jnp.tanh(x @ p['w1'] + p['b1'])
  ...   return h @ p['w2'] + p['b2']
  >>> params = {'w1': jnp.ones((3, 5)), 'b1': jnp.zeros(5), 'w2': jnp.ones((5, 2)),
  ...           'b2': jnp.zeros(2)}
  >>> target = jaxprune.trace(mlp, params, jnp.zeros((4, 3)))
  >>> list(target.groups), target.groups['w1'].size
  (['w1'], 5)
  >>> small, small_target = target.compact(params, {'w1': jnp.array([1, 0, 1, 1, 0], bool)})
  >>> small['w1'].shape, small_target.apply(small, jnp.zeros((4, 3))).shape
  ((3, 3), (4, 2))
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.extend as jex
import jax.numpy as jnp
from jax import lax
import numpy as np

from jaxprune import _unfuse
from jaxprune import units as units_lib

PyTree = Any
Path = units_lib.Path

# ----------------------------------------------------------------------------- primitive tables

_ELEMENTWISE = frozenset("""
abs acos acosh add and asin asinh atan atan2 atanh cbrt ceil clamp complex conj convert_element_type copy
copy_p cos cosh digamma div eq erf erf_inv erfc exp exp2 expm1 floor ge gt imag integer_pow
is_finite le lgamma log log1p logistic lt max min mul ne neg nextafter not or pow real
reduce_precision rem round rsqrt select_n sign sin sinh sqrt square stop_gradient sub tan
tanh xor
optimization_barrier sharding_constraint name
""".split())
_REDUCTIONS = frozenset("reduce_sum reduce_max reduce_min reduce_prod reduce_and reduce_or "
                        "reduce_xor argmax argmin".split())
_CUMULATIVE = frozenset("cumsum cumprod cummax cummin cumlogsumexp".split())
_WINDOWED = frozenset("reduce_window_sum reduce_window_max reduce_window_min reduce_window".split())
# Call-like primitives whose body is followed, by the name of the param that holds it.
_CALLS = {"pjit": "jaxpr", "jit": "jaxpr", "closed_call": "call_jaxpr", "core_call": "call_jaxpr",
          "custom_jvp_call": "call_jaxpr", "custom_vjp_call": "call_jaxpr",
          "custom_vjp_call_jaxpr": "fun_jaxpr", "remat": "jaxpr", "remat2": "jaxpr",
          "checkpoint": "jaxpr"}
# Ops that only move a value's axes (a unit stays a unit, elementwise).
_LAYOUT_OPS = frozenset(("transpose", "copy", "copy_p"))
# Ops through which a kernel computed from a param stays that param times a scalar (moves,
# casts, a sign): see _Walker._scaled.
_SCALED_MOVES = frozenset("reshape broadcast_in_dim transpose squeeze expand_dims "
                          "convert_element_type copy copy_p neg".split())

# Ops after which each position of a map is still where it was, in row-major order (no flip,
# roll, shift, transpose or gather), or that reduce positions (pooling: the count then differs,
# which no later op in this set restores): see _Walker.keeps_positions.
_KEEPS_POSITIONS = (_ELEMENTWISE | _REDUCTIONS | _WINDOWED
                    | frozenset("reshape squeeze expand_dims".split()))

# Collections that linen's apply(..., mutable=[...]) returns updated (see trace's note).
_RETURNED_VARIABLES = frozenset(("batch_stats", "intermediates", "cache"))


class TraceError(ValueError):
  """``fn`` could not be traced with the example arguments."""


# ----------------------------------------------------------------------------- atoms


class _Atoms:
  """Union-find over axis atoms with sizes; classes carry the reasons they cannot be pruned.

  An atom can be *refined* into several smaller atoms (a consumer kernel's rows read through a
  flatten become (positions, channels)); refining an atom refines its whole class alike.
  """

  def __init__(self):
    self.parent: list[int] = []
    self.size: list[int] = []
    self.members: dict[int, list[int]] = {}
    self.blocked: dict[int, list[str]] = {}
    self.refined: dict[int, tuple[int, ...]] = {}
    # Classes that hold an axis of a parameter (kept through unions and refinements).
    self.of_param: set[int] = set()

  def new(self, size: int, blocked: str | None = None) -> int:
    a = len(self.parent)
    self.parent.append(a)
    self.size.append(int(size))
    self.members[a] = [a]
    self.blocked[a] = [blocked] if blocked else []
    return a

  def find(self, a: int) -> int:
    root = a
    while self.parent[root] != root:
      root = self.parent[root]
    while self.parent[a] != root:
      self.parent[a], a = root, self.parent[a]
    return root

  def union(self, a: int, b: int) -> None:
    ra, rb = self.find(a), self.find(b)
    if ra == rb:
      return
    if len(self.members[ra]) < len(self.members[rb]):
      ra, rb = rb, ra
    self.parent[rb] = ra
    self.members[ra].extend(self.members.pop(rb))
    self.blocked[ra].extend(self.blocked.pop(rb))
    if rb in self.of_param:
      self.of_param.discard(rb)
      self.of_param.add(ra)

  def block(self, a: int, reason: str) -> None:
    for leaf in self.expand((a,)):
      r = self.find(leaf)
      if reason not in self.blocked[r]:
        self.blocked[r].append(reason)

  def expand(self, atoms: Sequence[int]) -> tuple[int, ...]:
    out = []
    for a in atoms:
      if a in self.refined:
        out.extend(self.expand(self.refined[a]))
      else:
        out.append(a)
    return tuple(out)

  def refine(self, a: int, factors: Sequence[int]) -> None:
    """Splits atom ``a`` (and every atom of its class) into atoms of sizes ``factors``."""
    r = self.find(a)
    reasons = list(self.blocked[r])
    of_param = r in self.of_param
    first = None
    for m in list(self.members[r]):
      subs = tuple(self.new(f) for f in factors)
      self.refined[m] = subs
      if first is None:
        first = subs
      else:
        for s, f in zip(subs, first):
          self.union(s, f)
    for s in first:
      for why in reasons:
        self.block(s, why)
      if of_param:
        self.of_param.add(self.find(s))

  def unify(self, xs: Sequence[int], ys: Sequence[int], reason: str) -> bool:
    """Ties two axes given as atom lists of the same total size (refining where needed)."""
    xs = [a for a in self.expand(xs) if self.size[a] > 1]
    ys = [a for a in self.expand(ys) if self.size[a] > 1]
    i = j = 0
    while i < len(xs) and j < len(ys):
      if xs[i] in self.refined:
        xs[i:i + 1] = [a for a in self.expand((xs[i],)) if self.size[a] > 1]
        continue
      if ys[j] in self.refined:
        ys[j:j + 1] = [a for a in self.expand((ys[j],)) if self.size[a] > 1]
        continue
      a, b = xs[i], ys[j]
      sa, sb = self.size[a], self.size[b]
      if sa == sb:
        self.union(a, b)
        i, j = i + 1, j + 1
      elif sa > sb and sa % sb == 0:
        self.refine(a, (sb, sa // sb))
      elif sb > sa and sb % sa == 0:
        self.refine(b, (sa, sb // sa))
      else:
        for c in xs[i:] + ys[j:]:
          self.block(c, reason)
        return False
    return True


# ----------------------------------------------------------------------------- the walk


@dataclasses.dataclass
class _Use:
  """How a parameter leaf axis is used: read by a kernel contraction, or produced."""
  leaf: int
  axis: int
  role: str          # 'producer' or 'consumer'
  kind: str          # 'kernel', 'bias', 'scale', 'shift', 'stat'
  where: tuple       # eqn path of the op that decided it (program order)
  # For a param that a contraction's kernel is computed from (a weight norm w / |w|, a
  # standardised kernel (w - mean) / std, w * 0.5): the ops that compute it, in words.
  computed: str = ""


@dataclasses.dataclass
class _Contraction:
  path: tuple
  kernel: int                # leaf index of the kernel
  kernel_var: Any            # the kernel operand (for readout checks)
  stream_var: Any            # the activation operand
  out_var: Any
  conv: bool
  padded: bool
  out_axes: tuple = ()       # the kernel's leaf axes that are the contraction's outputs
  padded_why: str = ""       # what makes it padded, in words (Slice.padded_why)
  # A kernel computed from params (see _Walker._computed_kernel): the ops, in words ('' for a
  # kernel read as it is); ``scaled``: it is the leaf times a scalar common to all its entries.
  computed: str = ""
  scaled: bool = False


# Why a consumer is padded (Slice.padded_why), besides a zero-padded convolution.
_DILATED_CONV = ("an input-dilated (transposed) convolution, where a constant channel adds less "
                 "between inputs than at them")
_GROUPED_CONV = ("a grouped convolution, where each group reads its own channel of a unit with "
                 "the unit's row, so a unit's constant is one value per group")
_GROWING_CONV = ("a convolution whose zero padding makes its output larger than its input (a "
                 "transposed convolution, 'VALID' included, pads by its kernel size minus one), "
                 "where a constant channel adds less at the borders than elsewhere")
_RECURRENCE = "a recurrence, which reads the initial state, not the units, at the first step"
_MUTUAL = ("a product of two activations (q @ k.T) or a sum over the units (an RMSNorm's or an "
           "L2 norm's sum of squares, a mean) also reads the units: a unit's term there is its "
           "own value (times itself on the other side), which no bias or sum of kernel rows "
           "reproduces")
_CHANGES_CONSTANTS = ("an op that is not known to pass a constant on unchanged (a sum, a zero "
                      "pad, an average that counts padding, a scaling or an attention-weighted "
                      "sum; an interpolating resize and a padded average over the real "
                      "positions only do pass it, but are not recognised)")


def _reduced_by(name: str) -> str:
  return (f"reduced over by {name}: a statistic across this axis, such as a softmax's maximum or "
          "an argmax over the units, reads all its entries together" + (
              " (a maximum of values never negative and zero where a unit's params are, as "
              "max(|h|) or the maximum of relu features, is followed)"
              if name == "reduce_max" else ""))


_SUMMED = ("reduced over by reduce_sum where a masked unit is not shown to be zero: a statistic "
           "across this axis, such as a LayerNorm's variance of y - mean or a softmax's sum of "
           "exp over the units, reads all its entries together (a sum of values that are zero "
           "where a unit's params are, as an RMSNorm's or an L2 norm's sum of squares, is "
           "followed)")


_READ_TWICE = ("a product of the units with themselves (each unit read at two places, as in "
               "h[:, :, None] * h[:, None, :] or einsum('bi,bj,ijk->bk', h, h, W)), where a "
               "constant unit's rows still read the other units")

_AT_SEVERAL_OFFSETS = ("a concatenation that holds the units at several offsets (a GNN's "
                       "h[senders] and h[receivers], CReLU's relu(h) and relu(-h)), where a "
                       "constant unit's value may differ from one offset to the next")

_CONST_VALUES_MAX = 1 << 16   # the most entries of a closed-over constant whose values are read
_CLOSED_OVER = ("tied to an array fn closes over (not in params); pass per-unit variables such "
                "as batch statistics in params (linen: the whole variables; nnx: graphdef, "
                "params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...) and "
                "v = {'params': params, 'batch_stats': stats}, see docs/any-model.md)")


_CLOSED_OVER_INDEX = ("tied to an array of integers or booleans fn closes over (a fixed "
                      "permutation, selection or mask of the units, h[:, perm], which has the "
                      "traced number of entries and would not follow a pruned layer)")


_POSITIONS = ("a convolution's or pooling's output positions (their number follows the "
              "input's size)")


def _computed_why(how: str) -> str:
  """Why the axis a kernel computed from params contracts is not prunable, in words."""
  return (f"read by a kernel computed from params (by {how}), not by the params themselves: "
          "removing a row of the params does not remove that row of the kernel")


def _computed_reader_why(how: str) -> str:
  """Why a consumer whose kernel is computed from params does not take a fold, in words."""
  return (f"{units_lib.COMPUTED_READER} (by {how}), whose rows are not the params' rows: a "
          "removed unit's constant times the params' rows is not what it adds")


def _padded_conv_why(eqn) -> str:
  """Why a zero-padded convolution (no input dilation) does not pass a constant channel on as
  one value, in words: 'SAME' padding, other explicit padding, or padding that makes the output
  larger than the input (a transposed convolution, which pads by its kernel size minus one)."""
  dn, p = eqn.params["dimension_numbers"], eqn.params
  in_shape, k_shape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  out_shape = eqn.outvars[0].aval.shape
  pads = tuple(tuple(int(v) for v in pad) for pad in p["padding"])
  same = True
  for i, (ld, kd, od) in enumerate(zip(dn.lhs_spec[2:], dn.rhs_spec[2:], dn.out_spec[2:])):
    if out_shape[od] > in_shape[ld]:
      return _GROWING_CONV
    stride = (p.get("window_strides") or (1,) * len(pads))[i]
    dil = (p.get("rhs_dilation") or (1,) * len(pads))[i]
    n, k = in_shape[ld], (k_shape[kd] - 1) * dil + 1
    total = max((-(-n // stride) - 1) * stride + k - n, 0)
    same = same and pads[i] == (total // 2, total - total // 2)
  if same:
    return units_lib.ZERO_PADDED_CONV
  return (f"a zero-padded convolution (padding {pads}), where a constant channel adds less at "
          "the borders than elsewhere")


_ZERO_MOVES = ("broadcast_in_dim", "convert_element_type", "reshape", "squeeze", "transpose",
               "copy", "copy_p")


def _makes_zeros(eqn, zeros: set) -> bool:
  """Whether ``eqn`` makes an array of zeros from a literal 0 (``jnp.zeros``,
  ``jnp.zeros_like``, an nnx cell's ``initialize_carry``) or moves one."""
  if eqn.primitive.name not in _ZERO_MOVES or not eqn.invars:
    return False
  v = eqn.invars[0]
  if isinstance(v, jex.core.Literal):
    return eqn.primitive.name == "broadcast_in_dim" and not np.any(np.asarray(v.val))
  return v in zeros


def _makes_state(eqn, zeros: set, origin: dict, states: set, producer_of: dict) -> bool:
  """Whether ``eqn`` makes a *learned state*: a parameter (a per-unit vector, an RNN's learned
  ``h0``; or an array, a Perceiver's latents ``(N, D)``) broadcast along axes of no leaf
  (``jnp.broadcast_to(h0, (B, H))``, ``jnp.tile``, ``jnp.repeat``, ``h0 + jnp.zeros((B, H))``,
  ``jnp.ones((B, 1)) * h0``)
  or moved, without the function's inputs. A kernel reads it as it reads the units (see
  ``_kernel_operand``)."""
  name = eqn.primitive.name
  ins = [v for v in eqn.invars if not isinstance(v, jex.core.Literal)]
  learned = lambda v: v in states or (
      v in origin and any(d > 1 for d in v.aval.shape))
  if name in _ZERO_MOVES + ("tile", "expand_dims") and ins and ins[0] is eqn.invars[0]:
    return learned(ins[0])
  if name == "add" and len(ins) == 2:
    return any(learned(a) and b in zeros for a, b in (ins, ins[::-1]))
  if name == "mul" and len(ins) == 2:
    return any(learned(a) and _ones(b, producer_of) for a, b in (ins, ins[::-1]))
  return False


def _ones(v, producer_of: dict) -> bool:
  """Whether ``v`` is an array of ones broadcast from a literal (``jnp.ones((B, 1))``)."""
  eqn = producer_of.get(v, (None, None))[1]
  return (eqn is not None and eqn.primitive.name == "broadcast_in_dim"
          and isinstance(eqn.invars[0], jex.core.Literal) and np.all(
              np.asarray(eqn.invars[0].val) == 1))


class _Walker:
  """Walks a closed jaxpr once, giving every value's axes as atom lists."""

  def __init__(self, num_params: int):
    self.atoms = _Atoms()
    self.num_params = num_params
    self.shapes: dict[tuple, list] = {}       # eqn path -> atoms of each output (for resizing)
    self.origin: dict[Any, tuple] = {}         # var -> (leaf, axis map) for pure layout of a leaf
    self.stream: set = set()                   # vars that depend on the non-param arguments
    self.zeros: set = set()                    # arrays of zeros made in the function
    self.states: set = set()                   # learned states (_makes_state)
    # Computed from a learned state by a kernel without the data, and what is computed from
    # that (a Perceiver's latents @ wq, DETR's queries through a block before the data enter):
    # activations, read by kernels and products as such, not kernels computed from params.
    self.derived: set = set()
    # Atoms contracted between two activations (q @ k.T): (atoms, eqn path) per contracted pair
    self.mutual: list[tuple] = []
    # Atoms summed over by reduce_sum (an RMSNorm's or an L2 norm's sum of squares, a mean over
    # the units): (atoms, eqn path, axis) per summed axis; see _classify
    self.summed: list[tuple] = []
    # ... and by reduce_max (an L-infinity norm, CBAM's maximum over the channels): kept where
    # the values are zero at a masked unit and never negative, so a masked unit's 0 is no maximum
    self.maxed: list[tuple] = []
    self.unit_axes_at: dict | None = None      # eqn path -> its summed axes of units (_unit_axes)
    self.stat_calls: dict = {}                 # _stat_call's answers, per call and inputs
    self.contractions: list[_Contraction] = []
    self._contractions_at = (0, {})   # (how many are indexed, path -> contractions there)
    self._literal_made: dict = {}     # scope -> _literal_made of its jaxpr
    self.uses: dict[tuple[int, int], _Use] = {}
    self.tied: set[tuple[int, int]] = set()     # (leaf, axis) both producer and consumer
    self.first_use: dict[int, tuple] = {}      # leaf -> (kind, path) of its first arithmetic use
    self.equal_parts: set = set()              # outputs of a cut into equal parts (_equal_parts)
    self.parts_taken: dict = {}   # (scope, var, axis) -> (parts, indices read, its atoms)
    self.users: dict[Any, list] = {}           # var -> [(path, eqn)] in its own jaxpr
    self.producer_of: dict[Any, tuple] = {}    # var -> (path, eqn) that computes it
    self.invar_atoms: list = []
    self.out_vars: list = []
    self.scoped_env: dict = {}
    self.concat: dict[int, list] = {}          # concatenation atom -> its parts' atoms
    self.concat_of: dict[int, list] = {}       # class root -> [(part root, offset, length)]
    self._concat_parts: dict | None = None
    self.repeated_parts: set = set()           # part roots at several offsets of one of them
    self.jaxpr_at: dict[tuple, Any] = {}       # scope (path of the calling eqn) -> its jaxpr
    self._eqn_index: dict[tuple, dict] = {}    # scope -> {outvar: eqn index} (eqn_index)
    self.const_values: dict = {}   # closed-over constant (constvar) -> its value (_note_consts)

  # -- helpers ---------------------------------------------------------------------------------
  def fresh(self, shape, blocked=None):
    return tuple((self.atoms.new(d, blocked),) for d in shape)

  def walk(self, closed, param_leaves, arg_leaves):
    jaxpr = closed.jaxpr
    env = {}
    for i, (v, leaf) in enumerate(zip(jaxpr.invars, param_leaves + arg_leaves)):
      ax = self.fresh(np.shape(leaf))
      env[v] = ax
      self.invar_atoms.append(ax)
      if i < self.num_params:
        self.origin[v] = (i, tuple(range(len(ax))))
        self.atoms.of_param.update(a[0] for a in ax)
      else:
        self.stream.add(v)
        for a in ax:
          self.atoms.block(a[0], "an axis of the function's inputs")
    self._note_consts(jaxpr.constvars, closed.consts)
    for v in jaxpr.constvars:
      env[v] = self.fresh(v.aval.shape, _CLOSED_OVER if jnp.issubdtype(
          v.aval.dtype, jnp.inexact) else _CLOSED_OVER_INDEX)
    self._walk(jaxpr, env, ())
    self._block_untaken_parts()
    for ax in (self._read(env, v) for v in jaxpr.outvars):
      for atoms in ax:
        for a in atoms:
          self.atoms.block(a, "reaches the function's outputs")
    self.out_vars = list(jaxpr.outvars)
    self.env = env

  def _note_consts(self, constvars, consts):
    """Keeps the values of small closed-over numeric constants (a jax scalar ``C`` in
    ``exp(h) - C``) for :func:`_constant_values`; a tracer's (``trace`` called under a
    transform), a PRNG key's, a deleted array's or a large array's are not kept."""
    for v, c in zip(constvars, consts):
      if (_numeric(v.aval.dtype) and not isinstance(c, jax.core.Tracer)
          and np.size(c) <= _CONST_VALUES_MAX
          and not (isinstance(c, jax.Array) and c.is_deleted())):
        self.const_values[v] = np.asarray(c)

  def _read(self, env, v):
    if isinstance(v, jex.core.Literal):
      return self.fresh(np.shape(v.val), "tied to a constant array of fixed shape")
    return env[v]

  def _walk(self, jaxpr, env, scope):
    self.jaxpr_at[scope] = jaxpr
    for k, eqn in enumerate(jaxpr.eqns):
      path = scope + (k,)
      for v in eqn.invars:
        if not isinstance(v, jex.core.Literal):
          self.users.setdefault(v, []).append((path, eqn))
      for v in eqn.outvars:
        self.producer_of[v] = (path, eqn)
      ins = [self._read(env, v) for v in eqn.invars]
      if any(not isinstance(v, jex.core.Literal) and v in self.stream for v in eqn.invars):
        self.stream.update(eqn.outvars)
      elif _makes_zeros(eqn, self.zeros):
        self.zeros.update(eqn.outvars)
      elif _makes_state(eqn, self.zeros, self.origin, self.states, self.producer_of):
        self.states.update(eqn.outvars)
      elif eqn.primitive.name not in ("scan", "while", "cond") and any(
          not isinstance(v, jex.core.Literal) and v in self.derived for v in eqn.invars):
        self.derived.update(eqn.outvars)
      outs = self._eqn(eqn, ins, env, path)
      self.shapes[path] = outs
      for v, ax in zip(eqn.outvars, outs):
        env[v] = ax
        self.scoped_env[(scope, v)] = ax
      self._track_origin(eqn, path)

  # -- parameter provenance --------------------------------------------------------------------
  def _track_origin(self, eqn, path):
    name = eqn.primitive.name
    srcs = [(i, v) for i, v in enumerate(eqn.invars)
            if not isinstance(v, jex.core.Literal) and v in self.origin]
    if not srcs:
      return
    if name in ("reshape", "broadcast_in_dim", "convert_element_type", "squeeze", "copy",
                "copy_p") and len(eqn.invars) >= 1 and srcs[0][0] == 0:
      leaf, amap = self.origin[eqn.invars[0]]
      in_shape = eqn.invars[0].aval.shape
      out_shape = eqn.outvars[0].aval.shape
      big_in = [a for a, d in zip(amap, in_shape) if d > 1]
      big_out = [d for d in out_shape if d > 1]
      if [d for d in in_shape if d > 1] == big_out:  # only size-1 axes added or removed
        it = iter(big_in)
        self.origin[eqn.outvars[0]] = (leaf, tuple(next(it) if d > 1 else None
                                                   for d in out_shape))
      return
    if name == "transpose":
      leaf, amap = self.origin[eqn.invars[0]]
      self.origin[eqn.outvars[0]] = (leaf, tuple(amap[p] for p in eqn.params["permutation"]))
      return
    if name == "rev":   # a flipped kernel (ConvTranspose(transpose_kernel=True)): the flipped
      leaf, amap = self.origin[eqn.invars[0]]      # (window) axes lose their leaf axes
      flipped = set(eqn.params["dimensions"])
      self.origin[eqn.outvars[0]] = (leaf, tuple(None if d in flipped else a
                                                 for d, a in enumerate(amap)))
      return
    if name in ("slice", "split") and srcs[0][0] == 0 and all(
        v in self.equal_parts for v in eqn.outvars):
      # A param cut into equal parts (a fused kernel's gate and value, w[:, :H] and w[:, H:]):
      # unit i of every part is one atom of the leaf's axis, so each part reads that axis.
      for v in eqn.outvars:
        self.origin[v] = self.origin[eqn.invars[0]]
      return
    if name in ("dynamic_slice", "slice") and srcs[0][0] == 0 and all(
        isinstance(w, jex.core.Literal) or w not in self.stream for w in eqn.invars[1:]):
      # One layer of stacked params, w[i] (a fori_loop's body): the axes taken whole keep
      # their leaf axes; the indexed one (size 1, squeezed next) has none.
      leaf, amap = self.origin[eqn.invars[0]]
      in_shape, out_shape = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
      self.origin[eqn.outvars[0]] = (leaf, tuple(a if o == n else None for a, o, n in zip(
          amap, out_shape, in_shape)))
      return
    if name in ("dot_general", "conv_general_dilated"):
      return  # recorded as contractions
    for i, v in srcs:
      leaf = self.origin[v][0]
      if leaf in self.first_use:
        continue
      others = [w for w in eqn.invars if w is not v]
      on_stream = any(not isinstance(w, jex.core.Literal) and w in self.stream for w in others)
      if eqn.outvars[0] in self.states:       # broadcast into a learned state (ones * h0)
        kind = "stat"
      elif name == "add" and on_stream:
        direct = any(self._contracted(w) for w in others)
        kind = "bias" if direct else "shift"
      elif name == "mul":
        kind = "scale"
      else:
        kind = "stat"
      self.first_use[leaf] = (kind, path)

  def _contracted(self, v, depth: int = 8) -> bool:
    """True if ``v`` is a kernel contraction's output, or a sum of them (``x @ W + h @ U``,
    an RNN's pre-activation): a parameter added to it is a bias."""
    if isinstance(v, jex.core.Literal) or v not in self.producer_of or depth == 0:
      return False
    eqn = self.producer_of[v][1]
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      return True
    if eqn.primitive.name in _LAYOUT_OPS:               # vmap puts the batch axis in front
      return self._contracted(eqn.invars[0], depth - 1)
    return eqn.primitive.name == "add" and all(self._contracted(w, depth - 1)
                                               for w in eqn.invars)

  def _backward(self, scope: tuple, var, descend: bool):
    """Walks back from ``var`` (in the jaxpr at ``scope``) over what it depends on within one
    scan step: yields ``(path, eqn)`` for each equation, and ``(None, body)`` on reaching a
    scan's carry (``body``: that scan's body scope; the previous step's value is not
    followed). ``descend``: also into the
    bodies of called and scanned equations. A body's input leads back to the call site it was
    entered from (a body shared by two calls, like ``jax.nn.relu``'s, is not mixed up)."""
    seen, stack = set(), [(scope, var)]
    while stack:
      scope, v = stack.pop()
      if isinstance(v, jex.core.Literal) or (scope, v) in seen:
        continue
      seen.add((scope, v))
      jaxpr, index = self.jaxpr_at[scope], self.eqn_index(scope)
      if v in index:
        k = index[v]
        eqn, path = jaxpr.eqns[k], scope + (k,)
        yield path, eqn
        sub = _body(eqn) if descend else None
        if sub is not None and path in self.jaxpr_at:
          stack.append((path, sub.outvars[eqn.outvars.index(v)]))
        stack.extend((scope, w) for w in eqn.invars)
      elif scope and v in jaxpr.invars:          # a body's input: back to its call site
        eqn = self.jaxpr_at[scope[:-1]].eqns[scope[-1]]
        i = jaxpr.invars.index(v)
        if eqn.primitive.name == "scan":
          nc, nk = eqn.params["num_consts"], eqn.params["num_carry"]
          if nc <= i < nc + nk:
            yield None, scope
          stack.append((scope[:-1], eqn.invars[i]))
        else:
          stack.append((scope[:-1], eqn.invars[len(eqn.invars) - len(jaxpr.invars) + i]))

  def eqn_index(self, scope: tuple) -> dict:
    """``{outvar: index of the equation that makes it}`` of the jaxpr at ``scope``."""
    if scope not in self._eqn_index:
      self._eqn_index[scope] = {o: k for k, e in enumerate(self.jaxpr_at[scope].eqns)
                                for o in e.outvars}
    return self._eqn_index[scope]

  def literal_made(self, scope: tuple) -> dict:
    """:func:`_literal_made` of the jaxpr at ``scope``, worked out once."""
    if scope not in self._literal_made:
      self._literal_made[scope] = _literal_made(self.jaxpr_at[scope])
    return self._literal_made[scope]

  def reaches_all(self, scope: tuple, var, paths) -> bool:
    """Whether ``var`` depends, within one step, on every equation at ``paths``: the walk back
    stops once all are found (they are near ``var``: its own layer's), so a deep network is not
    walked back whole for each group."""
    need = set(paths)
    for path, _ in self._backward(scope, var, descend=True):
      if not need:
        break
      need.discard(path)
    return not need

  def contractions_at(self, path) -> list:
    """The kernel contractions recorded at ``path`` (the equation there), in their order."""
    indexed, by_path = self._contractions_at
    for c in self.contractions[indexed:]:     # those recorded since the last call
      by_path.setdefault(c.path, []).append(c)
    self._contractions_at = (len(self.contractions), by_path)
    return by_path.get(path, [])

  def acting_points(self, leaf: int) -> set:
    """Paths of the equations where parameter ``leaf`` first meets the values computed from the
    function's inputs: followed forward through what it computes with other params and
    constants alone (a reshape, a broadcast, ``rsqrt(var + eps) * scale``) into followed calls'
    and scans' bodies. A bias acts at its add, a kernel at its contraction."""
    top = self.jaxpr_at[()]
    if leaf >= len(top.invars):
      return set()
    found, seen, stack = set(), set(), [((), top.invars[leaf])]
    while stack:
      scope, v = stack.pop()
      if isinstance(v, jex.core.Literal) or (scope, v) in seen:
        continue
      seen.add((scope, v))
      jaxpr = self.jaxpr_at[scope]
      if scope and v in jaxpr.outvars:       # out of a followed call or scan
        parent = self.jaxpr_at[scope[:-1]].eqns[scope[-1]]
        stack += [(scope[:-1], parent.outvars[j]) for j, o in enumerate(jaxpr.outvars)
                  if o is v]
      for path, eqn in self.users_in(scope, v):
        if path in self.jaxpr_at:            # into a followed call's or scan's body
          inner = self.jaxpr_at[path]
          off = len(eqn.invars) - len(inner.invars)
          stack += [(path, inner.invars[i - off]) for i, u in enumerate(eqn.invars)
                    if u is v and i >= off]
          continue
        if any(not isinstance(u, jex.core.Literal) and u in self.stream for u in eqn.invars):
          found.add(path)
        else:
          stack += [(scope, o) for o in eqn.outvars]
    return found

  def reads_carry(self, scope: tuple, var, root=None) -> bool:
    """Whether ``var`` depends on the carry of a scan it is computed in: a recurrent reader,
    whose input at the first step is the initial state, not the units' values (so a constant
    unit's contribution cannot be folded into its bias). With ``root``, only a carry that
    holds those units counts (an RNN's hidden state; not the residual stream of layers
    scanned over stacked params, whose units each step computes anew)."""
    # The bodies of the scans whose carry ``var`` reads: the scan around ``scope`` or one
    # further out (``var`` inside a checkpointed or jitted call in the scan's body).
    if not scope:              # the top level has no carry, and the walk stays there
      return False
    bodies = {body for path, body in self._backward(scope, var, descend=False) if path is None}
    if not bodies:
      return False
    if root is None:
      return True
    A = self.atoms
    for body in bodies:
      scan = self.jaxpr_at[body[:-1]].eqns[body[-1]]
      nc, nk = scan.params["num_consts"], scan.params["num_carry"]
      for v in self.jaxpr_at[body].invars[nc:nc + nk]:
        ax = self.scoped_env.get((body, v))
        if ax is None or any(A.find(a) == root for atoms in ax for a in A.expand(atoms)):
          return True
    return False

  def users_in(self, scope: tuple, v) -> list:
    """``(path, eqn)`` of the equations that read ``v`` in the jaxpr at ``scope`` (a body shared
    by several calls, like ``jax.nn.relu``'s, has the users of every call site)."""
    return [(path, eqn) for path, eqn in self.users.get(v, []) if path[:-1] == scope]

  def _along_units(self, scope, v, eqn, root) -> bool:
    """Whether ``eqn`` (a concatenation reading ``v``) concatenates along the group's units."""
    ax = self.scoped_env.get((scope, v)) if scope else self.env.get(v)
    if ax is None:
      return False
    A = self.atoms
    return any(A.find(a) == root for a in A.expand(ax[eqn.params["dimension"]]))

  def _hops(self, sc: tuple, v) -> tuple[list, list]:
    """Where ``v`` (in the jaxpr at ``sc``) flows without an op of its own: ``(passes,
    users)``. ``passes`` are ``(scope, var, call)`` for the outputs of the followed call whose
    body returns ``v`` and for the inputs of followed calls' (and scans') bodies that ``v`` is
    passed to (``call``: that call's equation); ``users`` are ``(path, eqn)`` of the other
    equations that read ``v``."""
    passes, users = [], []
    jaxpr = self.jaxpr_at[sc]
    if sc and v in jaxpr.outvars:          # out of a followed call or scan
      parent = self.jaxpr_at[sc[:-1]].eqns[sc[-1]]
      passes += [(sc[:-1], parent.outvars[j], parent)
                 for j, o in enumerate(jaxpr.outvars) if o is v]
    for path, eqn in self.users_in(sc, v):
      if path in self.jaxpr_at:            # into a followed call's or scan's body
        inner = self.jaxpr_at[path]
        off = len(eqn.invars) - len(inner.invars)
        passes += [(path, inner.invars[i - off], eqn)
                   for i, w in enumerate(eqn.invars) if w is v and i >= off]
      else:
        users.append((path, eqn))
    return passes, users

  def reads(self, scope: tuple, var, con, root) -> str:
    """How the consumer contraction ``con`` reads ``var`` (a group's activations): ``'ok'``
    when every op between is linear and passes a constant unit on unchanged (moves,
    selections, a mean: a sum divided by its count, average pooling without padding);
    ``'max'`` when some take a max or min (max pooling: a constant still passes, a linear
    combination of units does not); ``'changed'`` otherwise (a sum, a zero pad, an average
    counting its padding, a scaling, an added value, attention weights), where folding a
    constant unit into ``con``'s bias would not be exact."""
    status = {(scope, var): "ok"}            # 'ok', 'max', 'changed', or ('sum', count, base)
    stack, reached = [(scope, var)], None
    joins = {}     # concatenations along time or space, checked once every piece is reached
    while True:
      if not stack:
        # A concatenation along other axes than the units' passes a constant on only if every
        # piece carries the units (reflect padding: flipped slices of the value itself); a
        # piece never reached holds other values (zeros as causal padding). Checked after the
        # walk: a piece computed inside a call (jnp.pad's flip) is reached after the join.
        for (sc, path), eqn in joins.items():
          if any(isinstance(u, jex.core.Literal) or (sc, u) not in status for u in eqn.invars):
            for o in eqn.outvars:
              stack += self._mark(status, sc, o, "changed")
        if not stack:
          break
      sc, v = stack.pop()
      st = status[(sc, v)]
      passes, users = self._hops(sc, v)
      for nsc, nv, _ in passes:
        stack += self._mark(status, nsc, nv, st)
      for path, eqn in users:
        if path == con.path:
          reached = _worse(reached or "ok", st)
          continue
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
          continue                           # another reader: its own check
        out = _constant_step(eqn, v, st)
        if eqn.primitive.name == "stack" or (
            eqn.primitive.name == "concatenate" and not self._along_units(sc, v, eqn, root)):
          joins[(sc, path)] = eqn
        for o in eqn.outvars:
          stack += self._mark(status, sc, o, out)
    return reached or "changed"

  def keeps_positions(self, scope: tuple, var, con) -> bool:
    """Whether the consumer contraction ``con`` reads ``var`` (a group's activations) with its
    positions in their own row-major order: every op between only casts, reshapes or acts
    elementwise (followed through calls), so a flatten's row p is the activations' position p;
    or reduces positions (pooling, whose count of positions then differs from the map's).
    False through a flip, a roll or shift, a transpose, a gather, an upsampling or a scan."""
    moved = {(scope, var): False}
    stack, reached = [(scope, var)], False
    while stack:
      sc, v = stack.pop()
      mv = moved[(sc, v)]
      passes, users = self._hops(sc, v)
      nxt = [(nsc, nv, mv or call.primitive.name == "scan") for nsc, nv, call in passes]
      for path, eqn in users:
        if path == con.path:
          reached |= mv
          continue
        if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
          continue                           # another reader
        # a broadcast that only adds axes of size 1 keeps positions; one that repeats a value
        # over positions (an upsampling) does not
        step = mv or not (eqn.primitive.name in _KEEPS_POSITIONS or (
            eqn.primitive.name == "broadcast_in_dim"
            and math.prod(eqn.outvars[0].aval.shape) == math.prod(v.aval.shape)))
        nxt += [(sc, o, step) for o in eqn.outvars]
      for a, b, m in nxt:
        if (a, b) not in moved or (m and not moved[(a, b)]):
          moved[(a, b)] = moved.get((a, b), False) or m
          stack.append((a, b))
    return not reached

  @staticmethod
  def _mark(status, scope, v, st):
    """Records ``st`` for ``v`` (the worse of two paths' statuses); the node if it changed."""
    key = (scope, v)
    old = status.get(key)
    new = st if old is None else _worse(old, st)
    if new == old:
      return []
    status[key] = new
    return [key]

  def through_layout(self, v):
    """``v``, or the end of the chain of layout-only ops (transposes, copies) that is its only
    use (a ``vmap``ped layer transposes its contraction before the bias is added)."""
    while True:
      users = self.users.get(v, [])
      if len(users) != 1 or users[0][1].primitive.name not in _LAYOUT_OPS:
        return v
      v = users[0][1].outvars[0]

  # -- one equation ----------------------------------------------------------------------------
  def _eqn(self, eqn, ins, env, path):
    name = eqn.primitive.name
    A = self.atoms
    out_shapes = [tuple(v.aval.shape) if hasattr(v.aval, "shape") else () for v in eqn.outvars]

    if name in _CALLS:
      inner, consts = _call_body(eqn)
      if inner is not None:
        self._note_consts(inner.constvars, consts)
        ienv = {}
        n_in = len(inner.invars)
        for v, ax in zip(inner.invars, ins[len(ins) - n_in:]):
          ienv[v] = ax
          self.scoped_env[(path, v)] = ax     # the body's inputs, as its ops' outputs are
        for v in inner.constvars:
          ienv[v] = self.fresh(v.aval.shape, "tied to a constant array of fixed shape")
        # Parameter provenance and activation dependence flow into the body.
        for v, w in zip(inner.invars, eqn.invars[len(eqn.invars) - n_in:]):
          if not isinstance(w, jex.core.Literal):
            if w in self.origin:
              self.origin[v] = self.origin[w]
            if w in self.stream:
              self.stream.add(v)
            if w in self.zeros:
              self.zeros.add(v)
            if w in self.states:
              self.states.add(v)
        self._walk(inner, ienv, path)
        outs = [self._read(ienv, v) for v in inner.outvars]
        for made in (self.zeros, self.states):
          made.update(v for v, w in zip(eqn.outvars, inner.outvars)
                      if not isinstance(w, jex.core.Literal) and w in made)
        for v, w in zip(eqn.outvars, inner.outvars):
          if not isinstance(w, jex.core.Literal) and w in self.origin:
            self.origin[v] = self.origin[w]
        return outs

    if name == "scan":
      return self._scan(eqn, ins, path)

    if name in _ELEMENTWISE:
      outs = []
      for shape in out_shapes:
        ax = []
        for d, size in enumerate(shape):
          cands = [x[d] for x in ins if len(x) == len(shape) and math.prod(
              A.size[a] for a in A.expand(x[d])) == size and size > 1]
          if not cands:
            ax.append((A.new(size),))
            continue
          for c in cands[1:]:
            A.unify(cands[0], c, f"tied unevenly by {name}")
          ax.append(cands[0])
        outs.append(tuple(ax))
      return outs

    if name == "broadcast_in_dim":
      (x,), shape, dims = ins[:1], eqn.params["shape"], eqn.params["broadcast_dimensions"]
      ax = [None] * len(shape)
      for k, d in enumerate(dims):
        if x[k] and math.prod(A.size[a] for a in A.expand(x[k])) == shape[d] and shape[d] > 1:
          ax[d] = x[k]
      return [tuple(a if a is not None else (A.new(shape[d]),) for d, a in enumerate(ax))]

    if name == "tile":
      # jnp.tile over axes of size 1 (a ViT's class token, jnp.tile(cls, (n, 1, 1))) is a
      # broadcast; repeating an axis of size > 1 puts each unit at several offsets: opaque.
      (x,), reps, in_shape = ins[:1], eqn.params["reps"], eqn.invars[0].aval.shape
      if any(r > 1 and n > 1 for r, n in zip(reps, in_shape)):
        return self._opaque(eqn, ins, out_shapes, "repeated by tile")
      return [tuple(x[d] if r == 1 and n > 1 else (A.new(out_shapes[0][d]),)
                    for d, (r, n) in enumerate(zip(reps, in_shape)))]

    if name == "reshape":
      if eqn.params.get("dimensions") is not None:
        return self._opaque(eqn, ins, out_shapes, "used by a reshape with a transpose")
      out = self._reshape(ins[0], out_shapes[0])
      if out is None:
        return [self._reshape_in_part(eqn, ins[0], out_shapes[0],
                                      "split unevenly by a reshape")]
      return [out]

    if name == "transpose":
      return [tuple(ins[0][p] for p in eqn.params["permutation"])]

    if name == "squeeze":
      dims = {d % len(ins[0]) for d in eqn.params["dimensions"]}
      return [tuple(a for d, a in enumerate(ins[0]) if d not in dims)]

    if name == "expand_dims":
      dims = set(eqn.params["dimensions"])
      it = iter(ins[0])
      return [tuple((A.new(1),) if d in dims else next(it) for d in range(len(out_shapes[0])))]

    if name == "dot_general":
      return [self._dot(eqn, ins, path)]

    if name == "conv_general_dilated":
      return [self._conv(eqn, ins, path)]

    if name == "reduce":   # lax.reduce with a combining function of its own, over scalars
      axes, n = set(eqn.params["dimensions"]), len(eqn.outvars)
      for other in ins[1:n]:                 # its operands are read together, entry by entry
        for d in range(len(ins[0])):
          A.unify(ins[0][d], other[d], "reduced together unevenly")
      for d in axes:
        for a in ins[0][d]:
          A.block(a, "reduced over by reduce (lax.reduce): its function reads all the entries "
                  "of this axis together")
      return [tuple(a for d, a in enumerate(ins[0]) if d not in axes)] * n

    if name in _REDUCTIONS:
      axes = set(eqn.params["axes"])
      for d in axes:
        if name == "reduce_sum":   # a unit's term goes when it is zero: _classify decides
          self.summed.append((ins[0][d], path, d))
          continue
        if name == "reduce_max":   # a unit's 0 is no maximum of values >= 0: _classify decides
          self.maxed.append((ins[0][d], path, d))
          continue
        for a in ins[0][d]:
          A.block(a, _reduced_by(name))
      return [tuple(a for d, a in enumerate(ins[0]) if d not in axes)]

    if name in _CUMULATIVE:
      d = eqn.params["axis"]
      for a in ins[0][d]:
        A.block(a, f"accumulated along by {name}")
      return [ins[0]]

    if name in _WINDOWED:
      x = ins[0]
      win, strides = eqn.params["window_dimensions"], eqn.params["window_strides"]
      pad = eqn.params.get("padding", ((0, 0),) * len(x))
      out = []
      for d, size in enumerate(out_shapes[0]):
        if win[d] == 1 and strides[d] == 1 and tuple(pad[d]) == (0, 0):
          out.append(x[d])
        else:
          for a in x[d]:
            A.block(a, f"pooled over by {name}")
          out.append((A.new(size, _POSITIONS),))
      outs = [tuple(out)] * len(out_shapes)
      return outs

    if name in ("concatenate", "stack"):
      if name == "stack":
        # jnp.stack (a primitive of its own in newer JAX; older JAX writes it so) is the
        # concatenation of its inputs, each given a new axis of size 1 at ``axis``.
        dim = eqn.params["axis"]
        ins = [x[:dim] + ((A.new(1),),) + x[dim:] for x in ins]
        widths = [1] * len(ins)
      else:
        dim = eqn.params["dimension"]
        widths = [v.aval.shape[dim] for v in eqn.invars]
      out = list(self._same_except(ins, out_shapes, {dim}, "concatenate")[0])
      # Zero-width pieces hold nothing (jnp.pad's 'edge' mode concatenates some).
      pieces = [tuple(x[dim]) for x, n in zip(ins, widths) if n > 0]
      if len(pieces) == 1:     # the one piece with entries is the output (the batch of an
        out[dim] = pieces[0]   # input padded in 'edge' mode stays the batch)
        return [tuple(out)]
      c = A.new(out_shapes[0][dim])
      self.concat[c] = pieces
      out[dim] = (c,)
      return [tuple(out)]

    if name == "slice" and _only_empty_uses(self.jaxpr_at[path[:-1]], eqn.outvars[0]):
      # jnp.pad's 'edge' mode slices the first and last entry of every axis and broadcasts
      # the ones it does not pad to width 0: no value of them is used, nothing is tied.
      return [self.fresh(out_shapes[0])]

    if name in ("slice", "pad", "dynamic_slice", "rev", "dynamic_update_slice"):
      x = ins[0]
      changed = {d for d in range(len(x))
                 if math.prod(A.size[a] for a in A.expand(x[d])) != out_shapes[0][d]}
      if name == "slice" and len(changed) == 1 and not any(
          s not in (None, 1) for s in eqn.params.get("strides") or ()):
        (d,) = changed
        n, start = out_shapes[0][d], eqn.params["start_indices"][d]
        size = eqn.invars[0].aval.shape[d]
        if n and start % n == 0 and size % n == 0:
          parts = self._equal_parts(x, eqn.invars[0].aval.shape, d, [n] * (size // n))
          if parts is not None:
            self.equal_parts.update(eqn.outvars)
            self._take_parts(path, eqn.invars[0], d, size // n, {start // n: eqn.outvars[0]},
                             x[d])
            return [parts]
      if name == "pad":
        changed |= {d for d, (lo, hi, interior) in enumerate(eqn.params["padding_config"])
                    if lo or hi or interior}
      if name == "rev":
        changed |= set(eqn.params["dimensions"])
      if name == "dynamic_update_slice":
        upd = ins[1]
        size = lambda ax: math.prod(A.size[a] for a in A.expand(ax))
        changed |= {d for d in range(len(x)) if size(upd[d]) != size(x[d])}
        for d in set(range(len(x))) - changed:   # the update's whole axes are the operand's
          A.unify(x[d], upd[d], "tied unevenly by dynamic_update_slice")
        for d in changed:
          for a in upd[d]:
            A.block(a, "indexed along by dynamic_update_slice")
      for d in changed:
        for a in x[d]:
          A.block(a, f"indexed along by {name}")
      return self._same_except(ins[:1], out_shapes, changed, name)

    if name == "iota":
      # Only its dimension counts (0, 1, 2, ...); along the others it is a broadcast, which an
      # argsort's sort ties to the operand's axes (its batch, its units).
      d = eqn.params.get("dimension", 0)
      return [tuple((A.new(n, "indexed along by iota" if k == d else None),)
                    for k, n in enumerate(out_shapes[0]))]

    if name == "split":
      d = eqn.params["axis"]
      parts = self._equal_parts(ins[0], eqn.invars[0].aval.shape, d, eqn.params["sizes"])
      if parts is not None:
        self.equal_parts.update(eqn.outvars)
        self._take_parts(path, eqn.invars[0], d, len(eqn.outvars), dict(enumerate(eqn.outvars)),
                         ins[0][d])
        return [parts] * len(eqn.params["sizes"])
      for a in ins[0][d]:
        A.block(a, "split by split")
      return [tuple((A.new(n, "split by split"),) if k == d else ax
                    for k, ax in enumerate(ins[0])) for n in eqn.params["sizes"]]

    if name == "gather":
      return self._gather(eqn, ins, out_shapes, path)

    if name in _SCATTERS:
      return self._scatter(eqn, ins, out_shapes)

    if name in ("sort", "argsort"):
      d = eqn.params["dimension"]
      for x in ins[1:]:        # sorted together: one permutation moves every operand's entries
        for k in range(len(x)):
          A.unify(ins[0][k], x[k], "sorted together with another operand")
      for x in ins:
        for a in x[d]:
          A.block(a, f"sorted along by {name}")
      return [tuple(x) for x in ins][:len(out_shapes)]

    if name == "top_k":
      # k-max pooling (the k largest over time, per unit): the ranked axis is blocked, as a
      # sort's is; the others (batch, units) pass to both outputs, the k axis is new.
      x, d = ins[0], eqn.params.get("axis", len(ins[0]) - 1) % len(ins[0])
      for a in x[d]:
        A.block(a, "ranked along by top_k")
      out = tuple((A.new(out_shapes[0][d]),) if k == d else ax for k, ax in enumerate(x))
      return [out, out]

    if name == "shard_map":
      return self._opaque(eqn, ins, out_shapes, "used by shard_map (not followed: trace the "
                          "per-device function inside it, which computes the same model)")
    return self._opaque(eqn, ins, out_shapes, f"used by {name} (not followed)")

  def _scan(self, eqn, ins, path):
    """``lax.scan`` (``nn.scan``, ``nn.RNN``, ``fori_loop`` with fixed bounds): the body is
    walked once; its constants are the call's, each ``xs`` loses its leading (scanned) axis,
    and each carry is tied to what the body returns for it, so a unit carried from step to
    step (an RNN's hidden unit, a layer scanned over its stacked params) is one unit
    throughout. Every ``ys`` gains a new leading axis."""
    A = self.atoms
    closed = eqn.params["jaxpr"]
    inner = closed.jaxpr
    nc, nk = eqn.params["num_consts"], eqn.params["num_carry"]
    inner_ins = list(ins[:nc + nk]) + [x[1:] for x in ins[nc + nk:]]
    ienv = dict(zip(inner.invars, inner_ins))
    for v, ax in ienv.items():
      self.scoped_env[(path, v)] = ax      # the body's inputs, as its ops' outputs are
    self._note_consts(inner.constvars, closed.consts)
    for v in inner.constvars:
      ienv[v] = self.fresh(v.aval.shape, "tied to a constant array of fixed shape")
    # Which body inputs depend on the function's inputs: a carry does once any step makes it
    # so (an RNN's zero initial state, after the first step); a loop counter does not.
    flags = [not isinstance(w, jex.core.Literal) and w in self.stream for w in eqn.invars]
    while True:
      out = _depends(inner, flags)[:nk]
      new = flags[:nc] + [f or o for f, o in zip(flags[nc:nc + nk], out)] + flags[nc + nk:]
      if new == flags:
        break
      flags = new
    for i, (v, w) in enumerate(zip(inner.invars, eqn.invars)):
      if flags[i]:
        self.stream.add(v)
      if (not isinstance(w, jex.core.Literal) and w in self.origin
          and not nc <= i < nc + nk):           # a parameter (stacked: its rows, per step)
        leaf, amap = self.origin[w]
        self.origin[v] = (leaf, amap[1:] if i >= nc + nk else amap)
    self._walk(inner, ienv, path)
    outs = [self._read(ienv, v) for v in inner.outvars]
    for k in range(nk):
      for a, b in zip(inner_ins[nc + k], outs[k]):
        A.unify(a, b, "carried unevenly by scan")
    # The ys stack along the scanned axis: the xs' leading axis (the batch, for lax.map), or a
    # new one of the scan's length.
    leads = [x[0] for x in ins[nc + nk:]]
    for other in leads[1:]:
      A.unify(leads[0], other, "scanned unevenly")
    if nk and leads:   # units as steps: removing one removes a step whose carry the next reads
      for a in leads[0]:
        A.block(a, "scanned over by lax.scan with a carry: each unit is a step, and removing "
                "one removes a step that changes the carry the later steps read (masking "
                "keeps the step)")
    lead = leads[0] if leads else (A.new(eqn.params["length"]),)
    return outs[:nk] + [(lead,) + tuple(y) for y in outs[nk:]]

  def _gather(self, eqn, ins, out_shapes, path):
    """A lookup (``nn.Embed``, ``jnp.take``, a nearest-neighbour resize): an operand axis that
    each gathered slice takes whole (a resize's batch and channels) is followed into the output;
    the axes indexed into are not (opaque). The output's other axes are the indices' batch axes
    (so the target runs at any batch size)."""
    A = self.atoms
    dn = eqn.params["dimension_numbers"]
    x, shape, sizes = ins[0], eqn.invars[0].aval.shape, eqn.params["slice_sizes"]
    skipped = set(dn.collapsed_slice_dims) | set(getattr(dn, "operand_batching_dims", ()))
    kept = [d for d in range(len(x)) if d not in skipped]       # in order, the offset dims
    through = {o: d for d, o in zip(kept, dn.offset_dims) if sizes[d] == shape[d]}
    table = not isinstance(eqn.invars[0], jex.core.Literal) and eqn.invars[0] in self.origin
    if table:
      # A lookup in a parameter table (nn.Embed) is a product with one-hot rows: the axes each
      # lookup takes whole (the features) are the table's units, the table their kernel.
      leaf, amap = self.origin[eqn.invars[0]]
      for d in through.values():
        if amap[d] is not None:
          use = self.uses.setdefault((leaf, amap[d]),
                                     _Use(leaf, amap[d], "producer", "kernel", path))
          if use.role != "producer":     # a tied embedding read by its own attend first
            self.tied.add((leaf, amap[d]))
    reason = "gathered from by gather (not followed)"
    # Batching dims (jnp.take_along_axis: out[b, k, u] = h[b, i[b, k, u], u]) pair an operand
    # axis with an axis of the indices, element by element: each unit stays a unit.
    paired = {} if table else dict(zip(getattr(dn, "operand_batching_dims", ()),
                                       getattr(dn, "start_indices_batching_dims", ())))
    for od, id_ in paired.items():
      A.unify(x[od], ins[1][id_], "tied unevenly by gather")
    for d, ax in enumerate(x):
      if d not in through.values() and d not in paired:
        for a in ax:
          A.block(a, reason)
    for k, axis in enumerate(ins[1]):
      if k not in paired.values():
        for a in axis:
          A.block(a, reason)
    for ax in ins[2:]:
      for axis in ax:
        for a in axis:
          A.block(a, reason)
    out = list(self.fresh(out_shapes[0], reason))
    for o, d in through.items():
      out[o] = x[d]
    idx = ins[1]
    batch_in = [ax for k, ax in enumerate(idx) if k != len(idx) - 1]   # index vector last
    batch_out = [d for d in range(len(out_shapes[0])) if d not in dn.offset_dims]
    if len(batch_in) == len(batch_out):
      for d, ax in zip(batch_out, batch_in):
        if math.prod(A.size[a] for a in A.expand(ax)) == out_shapes[0][d]:
          out[d] = ax
    return [tuple(out)]

  def _scatter(self, eqn, ins, out_shapes):
    """A write into an array (``h.at[:, 1:3].set(0.0)``, ``segment_sum`` over a graph's
    nodes): an operand axis that every update window covers whole (the units, the batch) is
    tied to the update's axis and passes to the output; the axes written into at the indices
    (the operand's indexed axes, the update's scatter axes, the indices) are not followed."""
    A = self.atoms
    name, dn = eqn.primitive.name, eqn.params["dimension_numbers"]
    x, upd = ins[0], ins[2]
    shape, ushape = eqn.invars[0].aval.shape, eqn.invars[2].aval.shape
    skipped = set(dn.inserted_window_dims) | set(getattr(dn, "operand_batching_dims", ()))
    window = [d for d in range(len(x)) if d not in skipped]   # in order, the update window dims
    through = {d: u for d, u in zip(window, dn.update_window_dims)
               if ushape[u] == shape[d] and d not in dn.scatter_dims_to_operand_dims}
    reason = f"written into by {name}"
    for d, ax in enumerate(x):
      if d in through:
        A.unify(ax, upd[through[d]], f"tied unevenly by {name}")
      else:
        for a in ax:
          A.block(a, reason)
    for u, ax in enumerate(upd):
      if u not in through.values():
        for a in ax:
          A.block(a, reason)
    for ax in ins[1]:
      for a in ax:
        A.block(a, reason)
    return [tuple(x)]

  def _same_except(self, ins, out_shapes, dims, name):
    A = self.atoms
    out = []
    for d, size in enumerate(out_shapes[0]):
      if d in dims:
        out.append((A.new(size, f"indexed along by {name}"),))
        continue
      cands = [x[d] for x in ins if len(x) > d and math.prod(
          A.size[a] for a in A.expand(x[d])) == size and size > 1]
      for c in cands[1:]:
        A.unify(cands[0], c, f"tied unevenly by {name}")
      out.append(cands[0] if cands else (A.new(size),))
    return [tuple(out)] * len(out_shapes)

  def _reshape(self, x, out_shape):
    """Regroups the input's atoms into the output's axes (row-major); None if it cannot."""
    A = self.atoms
    flat = [a for ax in x for a in A.expand(ax) if A.size[a] > 1]
    out, i = [], 0
    for size in out_shape:
      if size <= 1:     # an axis of 0 keeps its 0 (jnp.pad's 'edge' mode makes such pieces)
        out.append((A.new(size),))
        continue
      group, prod = [], 1
      while prod < size:
        if i >= len(flat):
          return None
        a = flat[i]
        if a in A.refined:
          flat[i:i + 1] = [b for b in A.expand((a,)) if A.size[b] > 1]
          continue
        s, need = A.size[a], size // prod
        if size % prod == 0 and s <= need and need % s == 0:
          group.append(a)
          prod *= s
          i += 1
        elif size % prod == 0 and s > need and s % need == 0:
          A.refine(a, (need, s // need))
          flat[i:i + 1] = list(A.refined[a])
        else:
          return None
      out.append(tuple(group))
    return tuple(out)

  def _take_parts(self, path, var, d, k, outs, atoms):
    """Records a cut of ``var``'s axis ``d`` into ``k`` equal parts; ``outs``: ``{j: the value
    of part j}`` for the parts this cut takes."""
    entry = self.parts_taken.setdefault((path[:-1], var, d), (k, [], atoms))
    entry[1].extend(outs.items())

  def _block_untaken_parts(self):
    """A value (a kernel) cut into equal parts of which some are never read: unit ``i`` would
    own the unread parts' entries too (their weights would count in its scores and folds), so
    the axis is not prunable. Run after the walk, when every reader is known."""
    for (scope, _, _), (k, outs, atoms) in self.parts_taken.items():
      body = self.jaxpr_at[scope]
      read = {j for j, o in outs if not isinstance(o, jex.core.DropVar)
              and (o in self.users or any(o is v for v in body.outvars))}
      if len(read) < k:
        for a in atoms:
          self.atoms.block(a, "cut into equal parts of which only some are read")

  def _equal_parts(self, x, shape, d, sizes):
    """Axis ``d`` cut into equal parts (``jnp.split``, ``h[:, :H]`` and ``h[:, H:]``): read as a
    reshape of the axis to (parts, size) followed by indexing the parts axis, so unit ``i`` of
    every part is one atom (a GLU's gate and value, an LSTM's four fused gates). The atoms of
    the axis are refined alike (a fused kernel's columns ``i, H + i, ...``: a view); the parts
    axis is blocked. None when the parts differ in size or the axis does not factor so."""
    k, n = len(sizes), sizes[0] if sizes else 0
    if k < 2 or n < 2 or any(s != n for s in sizes):
      return None
    # Only an axis that parameters produce (a fused kernel's columns): a cut of the batch or
    # of time steps stays an index, as it was.
    A = self.atoms
    if not all(A.find(a) in A.of_param for a in A.expand(x[d]) if A.size[a] > 1):
      return None
    out = self._reshape(x, tuple(shape[:d]) + (k, n) + tuple(shape[d + 1:]))
    if out is None:
      return None
    for a in out[d]:
      self.atoms.block(a, "indexed along by split")
    return tuple(x[:d]) + (out[d + 1],) + tuple(x[d + 1:])

  def _reshape_in_part(self, eqn, x, out_shape, reason):
    """A reshape whose axes do not regroup the input's atoms (``(B, 6)`` read as ``(B, 2, 3)``
    where the 6 are 3 channels x 2 outputs): the leading and trailing axes it leaves as they
    are keep their atoms (the batch's, so the re-evaluated program follows its size), and only
    the axes in between are blocked, their outputs fresh."""
    in_shape = tuple(eqn.invars[0].aval.shape)
    n = min(len(in_shape), len(out_shape))
    lo = 0
    while lo < n and in_shape[lo] == out_shape[lo]:
      lo += 1
    hi = 0
    while hi < n - lo and in_shape[-1 - hi] == out_shape[-1 - hi]:
      hi += 1
    for ax in x[lo:len(x) - hi]:
      for a in ax:
        self.atoms.block(a, reason)
    mid = self.fresh(out_shape[lo:len(out_shape) - hi], reason)
    return tuple(x[:lo]) + tuple(mid) + tuple(x[len(x) - hi:])

  def _opaque(self, eqn, ins, out_shapes, reason):
    for x in ins:
      for ax in x:
        for a in ax:
          self.atoms.block(a, reason)
    return [self.fresh(s, reason) for s in out_shapes]

  # -- contractions ----------------------------------------------------------------------------
  def _kernel_operand(self, eqn):
    """(kernel index in invars, leaf, axis map) if one operand is a pure parameter leaf and the
    other depends on the inputs, or is an array of zeros made in the function, or a learned
    state (``_makes_state``), read by a kernel of two or more axes of its leaf (an unrolled
    RNN's initial state, ``jnp.zeros((B, H)) @ w_h``, ``jnp.broadcast_to(h0, (B, H)) @ w_h``
    or a ``(1, H)`` param ``h0 @ w_h``: it reads the units as every later step does, and its
    shape is recomputed from its atoms);
    else None. Other arrays made from literals (``jnp.eye(n) @ w``, a basis times
    coefficients) compute a kernel rather than read units."""
    a, b = eqn.invars[:2]
    for idx, (k, x) in enumerate(((a, b), (b, a))):
      if (not isinstance(k, jex.core.Literal) and k in self.origin
          and not isinstance(x, jex.core.Literal)
          and (x in self.stream or x in self.zeros or x in self.states
               or x in self.derived or (
              # a param vector as it is, read by a matrix (not coefficients of a basis of
              # kernels, einsum('k,kio->io', c, basis), which computes a kernel)
              x in self.origin and sum(d > 1 for d in x.aval.shape) == 1
              and len(self.origin[k][1]) == 2))
          and k not in self.stream):
        leaf, amap = self.origin[k]
        if x not in self.stream and (len(amap) < 2 or None in amap):
          continue
        return idx, leaf, amap
    return None

  def _record(self, eqn, path, kernel_pos, leaf, amap, consumer_axes, producer_axes, conv,
              padded):
    stream_var = eqn.invars[1 - kernel_pos]
    self.contractions.append(_Contraction(
        path, leaf, eqn.invars[kernel_pos], stream_var, eqn.outvars[0], conv, bool(padded),
        tuple(amap[d] for d in producer_axes if amap[d] is not None), padded or ""))
    for axes, role in ((consumer_axes, "consumer"), (producer_axes, "producer")):
      for d in axes:
        if amap[d] is not None:
          use = self.uses.setdefault((leaf, amap[d]), _Use(leaf, amap[d], role, "kernel", path))
          if use.role != role:      # tied weights: one kernel axis produces and reads units
            self.tied.add((leaf, amap[d]))

  def concat_parts(self) -> dict:
    """class root -> the roots of its parts, for each concatenation (once walked; cached)."""
    if self._concat_parts is None:
      self._concat_parts = {c: {p for p, _, _ in ps} for c, ps in self.concat_of.items()}
    return self._concat_parts

  # -- kernels computed from params ------------------------------------------------------------
  def _definition(self, scope: tuple, v):
    """Where ``v`` (in the jaxpr at ``scope``) is computed: ``('eqn', path, eqn)``, or
    ``('in', outer scope, operand)`` for the input of a followed call's body (its call site's
    operand, or a scan's constant); None for anything else (a top-level input, a closed-over
    constant, a scan's carry or ``xs``)."""
    jaxpr, index = self.jaxpr_at[scope], self.eqn_index(scope)
    if v in index:
      return "eqn", scope + (index[v],), jaxpr.eqns[index[v]]
    if scope and v in jaxpr.invars:
      eqn = self.jaxpr_at[scope[:-1]].eqns[scope[-1]]
      i = jaxpr.invars.index(v)
      if eqn.primitive.name == "scan":
        return ("in", scope[:-1], eqn.invars[i]) if i < eqn.params["num_consts"] else None
      return "in", scope[:-1], eqn.invars[len(eqn.invars) - len(jaxpr.invars) + i]
    return None

  def _param_cone(self, scope: tuple, var):
    """``(leaves, eqns)``: the parameter leaves (as read, after layout ops: ``self.origin``)
    and the equations ``var`` is computed from, when it is computed from params and constants
    alone; None when it also depends on the inputs or on what tracing does not follow back (a
    scan's carry)."""
    leaves, eqns, seen, stack = set(), [], set(), [(scope, var)]
    while stack:
      sc, v = stack.pop()
      if isinstance(v, jex.core.Literal) or (sc, v) in seen:
        continue
      seen.add((sc, v))
      if v in self.origin:
        leaves.add(self.origin[v][0])
        continue
      if v in self.stream:
        return None
      where = self._definition(sc, v)
      if where is None:
        if v in self.jaxpr_at[sc].constvars:   # a closed-over constant
          continue
        return None
      if where[0] == "in":
        stack.append(where[1:])
        continue
      _, path, eqn = where
      eqns.append((path, eqn))
      stack.extend((sc, u) for u in eqn.invars)
    return leaves, sorted(eqns, key=lambda pe: pe[0])

  def _rows_linear(self, scope: tuple, k, atoms) -> bool:
    """Whether kernel ``k`` (computed from params, at ``scope``) is linear in the rows of the
    leaves that hold ``atoms`` (the axis a contraction reads with it) and depends on them in no
    other way: each row of ``k`` is a sum of those leaves' rows, moved and times factors that
    do not depend on them (``w * 0.5``, an equalized learning rate's ``w / sqrt(fan_in)``,
    ``w * s[None, :]``, a merged LoRA's ``w + a @ b``). Removing or merging a unit is then
    removing or merging those rows; a norm over the rows, a nonlinearity, a product of two of
    them or a sum with a value they do not hold is not."""
    A = self.atoms
    roots = {A.find(a) for a in A.expand(atoms) if A.size[a] > 1}
    if not roots:
      return False
    cone = self._param_cone(scope, k)
    if not cone:
      return False
    seeds = {leaf for leaf in cone[0] if any(
        A.find(a) in roots for ax in self.invar_atoms[leaf] for a in A.expand(ax))}
    memo: dict = {}

    def row_axes(sc, v):           # the axes of v that hold the rows
      ax = self.scoped_env.get((sc, v))
      if ax is None and v in self.origin:
        ax = self.invar_atoms[self.origin[v][0]]
      return {d for d, x in enumerate(ax or ()) if any(A.find(a) in roots for a in A.expand(x))}

    # 'N': not from the rows; 'L': linear in them; 'Z': zero where they are, not linear
    # (w * w, |w|); 'S': a sum over the rows of such values (a weight norm's ||w|| over its
    # input axis), which a removed row leaves as it is; None: other. L times or over S is L:
    # removing a row is exact there, merging two is not (the sum of squares changes), which
    # _classify's check of that sum (a reduce_sum over the units) records.
    zero_kept = ("square", "abs", "sqrt", "integer_pow", "pow")

    def state(sc, v, depth=0):
      if isinstance(v, jex.core.Literal):
        return "N"
      if (sc, v) in memo:
        return memo[(sc, v)]
      if depth > 256:
        return None
      if v in self.origin:
        out = "L" if self.origin[v][0] in seeds else "N"
      else:
        where = self._definition(sc, v)
        if where is None:
          out = "N" if v in self.jaxpr_at[sc].constvars else None
        elif where[0] == "in":
          out = state(where[1], where[2], depth + 1)
        else:
          eqn = where[2]
          body = _call_body(eqn)[0]
          ins = [] if body is not None else [state(sc, u, depth + 1) for u in eqn.invars]
          name, lin = eqn.primitive.name, ins.count("L")
          kinds = set(ins)
          if body is not None:         # a nested call (jnp.linalg.norm's): its output's state
            out = state(where[1], body.outvars[list(eqn.outvars).index(v)], depth + 1)
          elif None in ins:
            out = None
          elif kinds <= {"N", "S"}:    # not from the rows, or a row statistic and constants
            out = "N" if "S" not in kinds else (
                "S" if name in _ELEMENTWISE or name in _SCALED_MOVES else None)
          elif name == "reduce_sum":   # summed over the rows: a statistic; over others: kept
            out = ("S" if row_axes(sc, eqn.invars[0]) & set(eqn.params["axes"]) else ins[0])
          elif "Z" in kinds:
            positive = (name != "integer_pow" or eqn.params["y"] > 0) and (
                name != "pow" or (isinstance(eqn.invars[1], jex.core.Literal)
                                  and bool(np.all(np.asarray(eqn.invars[1].val) > 0))))
            out = ("Z" if (name in _SCALED_MOVES or name in zero_kept) and positive
                   or name == "mul" and "S" not in kinds else None)
          elif name in _SCALED_MOVES or name in ("reduce_precision", "real", "imag", "conj"):
            out = "L"
          elif name == "mul" and lin == 2 and len(ins) == 2:   # w * w, elementwise
            out = "Z"
          elif name in ("mul", "dot_general"):
            out = "L" if lin == 1 else None
          elif name in ("square", "abs") or (name == "integer_pow" and eqn.params["y"] > 0):
            out = "Z"
          elif name == "div":
            out = "L" if ins in (["L", "N"], ["L", "S"]) else None
          elif name in ("add", "sub", "add_any", "complex"):   # complex(wr, wi): wr + i wi
            out = "L" if lin == len(ins) else None
          else:
            out = None
      memo[(sc, v)] = out
      return out

    return state(scope, k) == "L"

  def _scaled(self, scope: tuple, v, leaf: int, depth: int = 64) -> bool:
    """Whether ``v`` is parameter ``leaf`` (moved, cast, negated) times scalars computed from
    params and constants alone (``w * 0.5``, ``w / s`` for a scalar param ``s``): a kernel
    whose units' weight vectors keep their angles and the order of their norms."""
    if depth == 0 or isinstance(v, jex.core.Literal):
      return False
    if v in self.origin:
      return self.origin[v][0] == leaf
    where = self._definition(scope, v)
    if where is None:
      return False
    if where[0] == "in":
      return self._scaled(where[1], where[2], leaf, depth - 1)
    eqn = where[2]
    name = eqn.primitive.name
    if name in _SCALED_MOVES:
      return self._scaled(scope, eqn.invars[0], leaf, depth - 1)
    if name in ("mul", "div"):
      a, b = eqn.invars
      if self._scaled(scope, a, leaf, depth - 1) and self._scalar(scope, b, leaf):
        return True
      return (name == "mul" and self._scaled(scope, b, leaf, depth - 1)
              and self._scalar(scope, a, leaf))
    return False

  def _scalar(self, scope: tuple, v, leaf: int) -> bool:
    """Whether ``v`` is one number computed from params and constants alone, without ``leaf``."""
    if isinstance(v, jex.core.Literal):
      return np.size(v.val) == 1
    if math.prod(getattr(v.aval, "shape", ())) != 1:
      return False
    cone = self._param_cone(scope, v)
    return cone is not None and leaf not in cone[0]

  def _computed_kernel(self, eqn, path, ins, conv: bool):
    """A contraction whose kernel operand is computed from params alone (a weight norm
    ``w / norm(w, axis=0)``, a standardised kernel ``(w - mean) / std``, ``w * 0.5``) and whose
    other operand depends on the inputs: ``(kernel index in invars, {leaf: {operand axis: leaf
    axis}} for the leaves whose axes are tied to the operand's, the leaf whose axes all are
    (None unless exactly one), the ops that compute it in words, whether it is that leaf times
    scalars)``; None otherwise."""
    A = self.atoms
    scope = path[:-1]
    for pos in ((1,) if conv else (0, 1)):
      k, x = eqn.invars[pos], eqn.invars[1 - pos]
      if (isinstance(k, jex.core.Literal) or isinstance(x, jex.core.Literal)
          or x not in self.stream or k in self.stream or k in self.origin or k in self.derived):
        continue
      cone = self._param_cone(scope, k)
      if not cone or not cone[0]:
        continue
      leaves, eqns = cone
      roots = lambda atoms: tuple(A.find(a) for a in A.expand(atoms) if A.size[a] > 1)
      kax = [roots(ax) for ax in ins[pos]]
      maps = {}
      for leaf in sorted(leaves):
        lax = [roots(ax) for ax in self.invar_atoms[leaf]]
        m = {d: lax.index(r) for d, r in enumerate(kax) if r and lax.count(r) == 1}
        if m:
          maps[leaf] = m
      full = [leaf for leaf, m in maps.items() if len(m) == sum(1 for r in kax if r)]
      kernel = full[0] if len(full) == 1 else None
      names = []
      for _, e in eqns:
        if not any(jnp.issubdtype(getattr(o.aval, "dtype", np.int32), jnp.inexact)
                   for o in e.outvars):
          continue        # index arithmetic (jnp's wrap of negative indices), not the kernel's
        n = e.primitive.name
        n = str(e.params.get("name", n)) if n in _CALLS else n
        if n not in _SCALED_MOVES and n not in names:
          names.append(n)
      scaled = kernel is not None and self._scaled(scope, k, kernel)
      return pos, maps, kernel, ", ".join(names) or "a reshape", scaled
    return None

  @staticmethod
  def _computed_leaf(comp, producer_axes):
    """The leaf a contraction with a computed kernel (``comp``) is recorded under: the kernel's
    own leaf, or one that holds an output axis of it; None if none does."""
    _, maps, kernel, _, _ = comp
    return kernel if kernel is not None else next(
        (l for l, m in maps.items() if any(d in m for d in producer_axes)), None)

  def _record_computed(self, eqn, path, comp, producer_axes, conv, padded, window_axes=(),
                       consumer_axes=()):
    """Records a contraction whose kernel is computed from params (``_computed_kernel``): the
    leaves' axes tied to its output axes produce its units, as kind ``'kernel'`` when the
    kernel is one leaf times scalars and ``'scale'`` otherwise (a weight-normed kernel's raw
    weights are not its weights, so weight-based pruners must not read them as a kernel). The
    leaves' axes tied to ``consumer_axes`` (the axes it contracts, where the kernel is linear in
    their rows: ``_rows_linear``) read the units it contracts; other contracted axes stay
    blocked."""
    pos, maps, kernel, how, scaled = comp
    leaf = self._computed_leaf(comp, producer_axes)
    if leaf is None:
      return
    m = maps[leaf]
    self.contractions.append(_Contraction(
        path, leaf, eqn.invars[pos], eqn.invars[1 - pos], eqn.outvars[0], conv, bool(padded),
        tuple(m[d] for d in producer_axes if d in m), padded or "", computed=how, scaled=scaled))
    for l, lm in maps.items():
      for d in producer_axes:
        if d in lm:
          kind = "kernel" if scaled and l == kernel else "scale"
          use = self.uses.setdefault((l, lm[d]), _Use(l, lm[d], "producer", kind, path, how))
          if use.role == "consumer":
            self.tied.add((l, lm[d]))
      for d in consumer_axes:     # (kind 'scale' unless its rows are the kernel's, scaled)
        if d in lm:
          kind = "kernel" if scaled and l == kernel else "scale"
          use = self.uses.setdefault((l, lm[d]), _Use(l, lm[d], "consumer", kind, path, how))
          if use.role == "producer":
            self.tied.add((l, lm[d]))
      if l == kernel:
        for d in window_axes:
          if d in lm:
            self.uses.setdefault((l, lm[d]), _Use(l, lm[d], "window", "kernel", path, how))


  def _dot(self, eqn, ins, path):
    A = self.atoms
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = ins
    kern = self._kernel_operand(eqn)
    comp = self._computed_kernel(eqn, path, ins, conv=False) if kern is None else None
    why = (_computed_why(comp[3]) if comp is not None else
           "contracted between two activations or two computed parameters")
    # A product of two activations (attention's q @ k.T, a Gram matrix): a unit's term of the
    # sum goes when it is zeroed on either side, so the contracted units are not blocked here;
    # _classify takes them as a group only if kernels make them (see _MUTUAL).
    mutual = kern is None and comp is None and all(
        not isinstance(v, jex.core.Literal) and (v in self.stream or v in self.derived)
        for v in eqn.invars[:2])
    if kern is not None and eqn.invars[1 - kern[0]] not in self.stream:
      self.derived.update(eqn.outvars)        # a kernel reading a learned state
    lfree = [d for d in range(len(lhs)) if d not in lc and d not in lb]
    rfree = [d for d in range(len(rhs)) if d not in rc and d not in rb]
    # A computed kernel linear in the rows it contracts (w * 0.5, w + a @ b) reads the units
    # as the params' rows: they are tied, not blocked.
    rows = comp is not None and self._computed_leaf(
        comp, (*lfree, *lb) if comp[0] == 0 else (*rfree, *rb)) is not None and all(
        self._rows_linear(path[:-1], eqn.invars[comp[0]], ins[comp[0]][d])
        for d in (lc if comp[0] == 0 else rc))
    for i, j in zip(lc, rc):
      if kern is None and not mutual and not rows:
        for a in lhs[i] + rhs[j]:
          A.block(a, why)
      A.unify(lhs[i], rhs[j], "contracted unevenly")
      if mutual:
        self.mutual.append((lhs[i], path))
    for i, j in zip(lb, rb):
      A.unify(lhs[i], rhs[j], "batched unevenly")
    if kern is not None:
      pos, leaf, amap = kern
      contracted, batch, free = (lc, lb, lfree) if pos == 0 else (rc, rb, rfree)
      self._record(eqn, path, pos, leaf, amap, contracted, tuple(free) + tuple(batch), False,
                   False)
    elif comp is not None:
      batch, free = (lb, lfree) if comp[0] == 0 else (rb, rfree)
      self._record_computed(eqn, path, comp, tuple(free) + tuple(batch), False, False,
                            consumer_axes=tuple(lc if comp[0] == 0 else rc) if rows else ())
    return tuple([lhs[d] for d in lb] + [lhs[d] for d in lfree] + [rhs[d] for d in rfree])

  def _conv(self, eqn, ins, path):
    A = self.atoms
    dn = eqn.params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    lhs, rhs = ins
    out_shape = eqn.outvars[0].aval.shape
    groups = eqn.params["feature_group_count"]
    kern = self._kernel_operand(eqn)
    comp = self._computed_kernel(eqn, path, ins, conv=True) if kern is None else None
    cin, cout = lhs_spec[1], rhs_spec[0]
    out = [None] * len(out_shape)
    out[out_spec[0]] = lhs[lhs_spec[0]]
    rhs_in = rhs_spec[1]
    if eqn.params["batch_group_count"] != 1:
      return self._opaque(eqn, ins, [out_shape], "a batch-grouped convolution")[0]
    one_in = groups > 1 and eqn.invars[1].aval.shape[rhs_in] == 1   # a channel per group
    depthwise = one_in and eqn.invars[1].aval.shape[cout] == groups
    # A channel multiplier (M outputs per input channel; also the identity kernel of
    # conv_general_dilated_patches, nn.ConvLocal's patches): output c * M + m reads input c.
    multiplier = one_in and not depthwise
    rows = (groups == 1 and comp is not None and self._computed_leaf(comp, (cout,)) is not None
            and self._rows_linear(path[:-1], eqn.invars[1], rhs[rhs_in]))
    if groups == 1:
      if kern is None and not rows:
        for a in lhs[cin] + rhs[rhs_in]:
          A.block(a, _computed_why(comp[3]) if comp is not None else
                  "convolved between two activations or computed parameters")
      A.unify(lhs[cin], rhs[rhs_in], "contracted unevenly")
      out[out_spec[1]] = rhs[cout]
    elif depthwise:
      A.unify(lhs[cin], rhs[cout], "a depthwise convolution")
      out[out_spec[1]] = lhs[cin]
    elif multiplier:
      m = A.new(eqn.invars[1].aval.shape[cout] // groups,
                "a channel multiplier's index (the outputs of each input channel)")
      A.unify(rhs[cout], tuple(lhs[cin]) + (m,), "a channel multiplier")
      out[out_spec[1]] = rhs[cout]
    elif kern is not None and kern[0] == 1:
      # G groups: input channel g * Cg + i is row i of group g's kernel, output channel
      # g * Kg + j its column g * Kg + j. Unit i of every group is one unit (each group keeps as
      # many channels as the others, Torch-Pruning's rule), and so is output j; the group
      # index is none.
      why = "a grouped convolution's group index (feature_group_count > 1)"
      kg = eqn.invars[1].aval.shape[cout] // groups
      A.unify(lhs[cin], (A.new(groups, why),) + tuple(rhs[rhs_in]), "a grouped convolution")
      A.unify(rhs[cout], (A.new(groups, why), A.new(kg)), "a grouped convolution")
      out[out_spec[1]] = rhs[cout]
    else:
      why = "a grouped convolution (feature_group_count > 1) of computed kernels"
      for a in lhs[cin] + rhs[cout]:
        A.block(a, why)
      # Its output channels too: they would otherwise form a group of the bias alone.
      out[out_spec[1]] = (A.new(out_shape[out_spec[1]], blocked=why),)
    for d in out_spec[2:]:
      # The output's positions: their number follows the input's size, so a param that holds
      # a value per position (a position embedding, ConvLocal's kernel) has none to prune.
      out[d] = (A.new(out_shape[d], _POSITIONS),)
    spatial = [rhs_spec[d] for d in range(2, len(rhs_spec))]
    if (kern is not None and kern[0] == 1) or comp is not None:
      ksize = [eqn.invars[1].aval.shape[d] for d in spatial]
      # A constant input contributes less where the window meets zeros: padding, or the zeros
      # an input dilation (a transposed conv) inserts between inputs.
      dilated = any(d != 1 for d in (eqn.params.get("lhs_dilation") or ()))
      padded = any(k > 1 for k in ksize) and (
          any(tuple(p) != (0, 0) for p in eqn.params["padding"]) or dilated)
      if padded:
        padded = _DILATED_CONV if dilated else _padded_conv_why(eqn)
    if comp is not None and (groups == 1 or one_in):
      self._record_computed(eqn, path, comp, (cout,), True, padded, spatial,
                            consumer_axes=(rhs_in,) if rows else ())
    elif kern is not None and kern[0] == 1:
      _, leaf, amap = kern
      if groups == 1:
        self._record(eqn, path, 1, leaf, amap, (rhs_in,), (cout,), True, padded)
      elif one_in:
        self._record(eqn, path, 1, leaf, amap, (), (cout,), True, padded)
      else:
        self._record(eqn, path, 1, leaf, amap, (rhs_in,), (cout,), True, _GROUPED_CONV)
      for d in spatial:
        if amap[d] is not None:
          self.uses.setdefault((leaf, amap[d]), _Use(leaf, amap[d], "window", "kernel", path))
    elif kern is not None:
      for a in lhs[cin]:
        A.block(a, "a convolution with the activations as its kernel")
    return tuple(out)


# ----------------------------------------------------------------------------- targets


def _leaf_paths(params) -> list[Path | None]:
  """Each leaf's path (dict keys, list or tuple indices, attribute names; None where a
  custom pytree node gives no addressable key)."""
  paths = []
  for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [units_lib.key_of(k) for k in kp]
    paths.append(None if any(k is None for k in keys) else tuple(keys))
  return paths


def _readout_terms(w, c) -> tuple[Any, bool]:
  """``(var, extra)``: where a top-level contraction's output ends after the terms added to it
  that depend on params and constants alone, not on the contraction's own kernel (a bias
  ``+ b``, ``+ b + c``, ``- 0.5``), and whether there is more than one param read as it is
  (the terms a slice records as its bias)."""
  out, extra, first = c.out_var, False, True
  while True:
    nxt = w.users.get(out, [])
    if len(nxt) != 1:
      return out, extra
    eqn = nxt[0][1]
    name = eqn.primitive.name
    others = [v for v in eqn.invars if v is not out]
    if (name not in ("add", "sub") or len(others) != 1
        or (name == "sub" and eqn.invars[0] is not out)):
      return out, extra
    v = others[0]
    if not isinstance(v, jex.core.Literal):
      cone = w._param_cone((), v)   # pylint: disable=protected-access
      if cone is None or c.kernel in cone[0]:
        return out, extra
    if not (first and name == "add" and not isinstance(v, jex.core.Literal) and v in w.origin):
      extra = True
    first, out = False, eqn.outvars[0]


def _shape(leaf) -> tuple[int, ...]:
  return tuple(leaf.shape) if hasattr(leaf, "shape") else tuple(np.shape(leaf))


@dataclasses.dataclass(frozen=True)
class _GroupSite:
  name: str
  root: int
  activation: str
  kind: str
  order: tuple
  scope: tuple                   # where the activation value lives
  act_var: Any
  act_axes: tuple                # its atoms per axis
  readout: bool
  # The activations depend on every kernel that produces the group (not so for a group coupled
  # by a residual addition, or an LSTM's gates: consumers read another value).
  complete: bool = True
  # A unit with zero incoming weights outputs activation(bias): nothing but a bias acts
  # between the kernel and the nonlinearity (no norm, scalar scale, temperature, constant).
  plain: bool = True
  # When not complete: (joined, the kernels, the producers) that _incomplete_why puts in words.
  incomplete: tuple = ()
  # The readout's output gets more than one param read as it is (a recorded bias): a second
  # term, a literal, a sum of params (``h @ w + b + c``); the GA reads them from the function.
  readout_extra: bool = False
  # Its units are also contracted between two activations (attention's q @ k.T) or summed over
  # where a masked unit is zero (an RMSNorm's sum of squares): where, as a program path (None
  # if not).
  mutual: Any = None


@dataclasses.dataclass(frozen=True, eq=False)
class _Analysis:
  """Everything a traced target needs, independent of the unit counts."""
  closed: Any                    # the ClosedJaxpr of fn over flat leaves
  in_treedef: Any                # of (params, args)
  out_treedef: Any
  num_params: int
  walker: Any
  leaf_paths: tuple
  sites: tuple                   # _GroupSite per group, in program order
  uses: dict                     # (leaf, axis) -> _Use (all param leaf axes)
  explain_lines: tuple
  arg_shapes: tuple              # example shapes of the argument leaves
  arg_batch: tuple = ()          # per argument leaf: the axes that may change (the batch)
  lead_of_params: bool = False   # the first output's leading axis is a param's (its classes)


def _call_body(eqn):
  """``(open jaxpr, its consts)`` of a followed call (``_CALLS``), or ``(None, ())``."""
  sub = eqn.params.get(_CALLS.get(eqn.primitive.name, ""), None)
  if sub is None:
    return None, ()
  return (sub.jaxpr, sub.consts) if hasattr(sub, "jaxpr") else (sub, ())


def _body(eqn):
  """The (open) jaxpr of a followed call or scan, or None."""
  if eqn.primitive.name == "scan":
    return eqn.params["jaxpr"].jaxpr
  return _call_body(eqn)[0]


# Ops of an activation chain that keep it linear in the units (a bias, a scale, moves).
_LINEAR_CHAIN = frozenset("""
add sub mul neg div convert_element_type reshape broadcast_in_dim squeeze expand_dims copy copy_p
transpose name optimization_barrier sharding_constraint reduce_precision
""".split())

# Writes at indices, followed by _Walker._scatter.
_SCATTERS = frozenset("scatter scatter-add scatter_add scatter-mul scatter_mul scatter-min "
                      "scatter_min scatter-max scatter_max".split())

# Ops that pass every value on (linear, and a constant stays that constant) ...
_KEEPS_CONSTANTS = frozenset("""
broadcast_in_dim concatenate convert_element_type copy copy_p dynamic_slice expand_dims gather
reduce_precision reshape rev slice squeeze transpose optimization_barrier sharding_constraint
name stop_gradient tile stack
""".split())
_SUM_MOVES = frozenset("reshape broadcast_in_dim expand_dims squeeze convert_element_type copy "
                       "copy_p transpose".split())
# ... and ops that keep a constant but not a linear combination of units (max pooling).
_MAX_OPS = frozenset("reduce_max reduce_min reduce_window_max reduce_window_min".split())


def _worse(a, b):
  """The worse of two statuses of :meth:`_Walker.reads`; two that differ where one is a
  pending sum (not divided by its count yet) are ``'changed'``."""
  if a == b:
    return a
  order = {"ok": 0, "max": 1}
  return max(a, b, key=order.get) if a in order and b in order else "changed"


def _constant_step(eqn, v, st):
  """The status of ``eqn``'s outputs when its input ``v`` has status ``st`` (see
  :meth:`_Walker.reads`)."""
  name = eqn.primitive.name
  if isinstance(st, tuple):                  # a sum: a constant again once divided by its count
    if name in _SUM_MOVES:                   # mean(..., keepdims=True): reshaped, then divided
      return st
    other = [w for w in eqn.invars if w is not v]
    if (name in ("div", "mul") and len(other) == 1 and isinstance(other[0], jex.core.Literal)
        and (name == "mul" or eqn.invars[0] is v)):
      k = float(np.asarray(other[0].val))
      if np.isclose(k if name == "div" else 1.0 / k if k else 0.0, st[1], rtol=1e-6):
        return st[2]
    return "changed"
  if st not in ("ok", "max"):
    return st
  if name == "gather" and "FILL" in str(eqn.params.get("mode")).upper():
    return "changed"                         # an index out of range reads the fill value
  if name in _KEEPS_CONSTANTS:
    return st
  if name in _MAX_OPS:
    return "max"
  if name == "pad":
    return st if all(lo <= 0 and hi <= 0 and not interior
                     for lo, hi, interior in eqn.params["padding_config"]) else "changed"
  if name == "reduce_sum":
    shape = eqn.invars[0].aval.shape
    return ("sum", float(math.prod(shape[d] for d in eqn.params["axes"])), st)
  if name == "reduce_window_sum" and all(
      lo == 0 and hi == 0 for lo, hi in eqn.params["padding"]) and all(
          d == 1 for d in eqn.params["base_dilation"]):
    return ("sum", float(math.prod(eqn.params["window_dimensions"])), st)
  return "changed"


def _depends(jaxpr, flags) -> list[bool]:
  """Which outputs of ``jaxpr`` depend on the inputs flagged True (any input of an equation
  taints all its outputs)."""
  tainted = {v for v, f in zip(jaxpr.invars, flags) if f}
  for eqn in jaxpr.eqns:
    if any(not isinstance(v, jex.core.Literal) and v in tainted for v in eqn.invars):
      tainted.update(eqn.outvars)
  return [not isinstance(v, jex.core.Literal) and v in tainted for v in jaxpr.outvars]


def _is_scalar_broadcast(eqn) -> bool:
  """A scalar made into an array (``jnp.where(h > 0, h, 0.0)``): no unit axes to follow."""
  return eqn.primitive.name == "broadcast_in_dim" and not eqn.invars[0].aval.shape


def _is_elementwise_call(eqn) -> bool:
  inner, _ = _call_body(eqn)
  if inner is None:
    return False
  return all(e.primitive.name in _ELEMENTWISE or _is_scalar_broadcast(e)
             or _is_elementwise_call(e) for e in inner.eqns)


def _admissible(eqn, live_ins) -> bool:
  """An op that keeps a value unit by unit: a layout op, or an elementwise op (or a call of
  only elementwise ops) whose output has the shape of each unit-carrying input."""
  if eqn.primitive.name in _LAYOUT_OPS:
    return True
  if not (eqn.primitive.name in _ELEMENTWISE or _is_elementwise_call(eqn)):
    return False
  if any(jnp.issubdtype(o.aval.dtype, jnp.complexfloating) for o in eqn.outvars):
    return False          # lax.complex: the activations stay the real values before it
  shapes = {tuple(v.aval.shape) for v in live_ins}
  return len(eqn.outvars) == 1 and shapes == {tuple(eqn.outvars[0].aval.shape)}


def _axis_roots(w: _Walker, scope: tuple, v):
  """Per axis of ``v``: the classes of its atoms larger than 1, or None when ``v`` has no
  recorded axes."""
  ax = w.scoped_env.get((scope, v))
  if ax is None:
    return None
  A = w.atoms
  return [[A.find(a) for a in A.expand(atoms) if A.size[a] > 1] for atoms in ax]


_UNIT_MOVES = frozenset("reshape split slice squeeze dynamic_slice expand_dims".split())


def _keeps_units(w: _Walker, scope: tuple, eqn, root) -> bool:
  """Whether ``eqn`` moves values without mixing the units of class ``root``, so each unit's
  values stay that unit's: a reshape that keeps the units one atom, in and out (it adds or drops
  size-1 axes, splits or merges other axes, or regroups the units' axis with others: a group
  norm's (B, groups, channels per group) back to (B, channels)); a split (or slice) of the
  units' axis into equal parts, each part holding every unit once (a GLU's gate and value, an
  LSTM's fused gates); or a move of the units' own axis, an index into other axes."""
  name = eqn.primitive.name
  if root is None or name not in _UNIT_MOVES or (name != "split" and len(eqn.outvars) != 1):
    return False
  roots = lambda v: _axis_roots(w, scope, v)

  def once(v):
    r = roots(v)
    return r is not None and sum(x.count(root) for x in r) == 1

  def whole(v):
    return once(v) and [root] in roots(v)

  if name == "reshape":          # a reshape only relabels positions
    return once(eqn.invars[0]) and once(eqn.outvars[0])
  if name in ("split", "slice") and once(eqn.invars[0]) and [root] not in roots(eqn.invars[0]):
    # Equal parts of the units' axis (see _Walker._equal_parts): unit i of each part is unit i.
    return all(whole(o) for o in eqn.outvars)
  # A move of the units' own axis, or an index into other axes (a part of a GLU's (B, 2, H),
  # a strided map): each unit's values stay that unit's.
  return whole(eqn.invars[0]) and whole(eqn.outvars[0])


def _unitwise_call(w: _Walker, scope: tuple, k: int, eqn, root) -> bool:
  """Whether ``eqn`` (equation ``k`` of ``scope``) is a followed call whose body only keeps
  values unit by unit (elementwise ops, moves, and cuts into equal parts that keep the units:
  ``jax.nn.glu``, a jitted activation), so the activations run on through it."""
  inner, _ = _call_body(eqn)
  if inner is None or root is None or len(eqn.outvars) != 1:
    return False
  iscope = scope + (k,)
  for j, e in enumerate(inner.eqns):
    live = [v for v in e.invars if not isinstance(v, jex.core.Literal)]
    if not (_admissible(e, live) or _is_scalar_broadcast(e)
            or _keeps_units(w, iscope, e, root) or _unitwise_call(w, iscope, j, e, root)):
      return False
  return True


_STAT_REDUCTIONS = frozenset(("reduce_sum", "reduce_max", "reduce_min"))


def _per_unit_stat(w: _Walker, scope: tuple, eqn, live, stats: set, root, k=None) -> bool:
  """Whether ``eqn`` computes or applies statistics of each unit over its own values alone
  (instance norm, GroupNorm: a mean and a variance over space and the group's channels, for
  each unit): a sum, max or min over axes other than the units', a move or broadcast of such a
  statistic (``stats``: the chain's values computed from statistics alone), an elementwise
  op that broadcasts one back onto the units' values, or a followed call (equation ``k`` of
  ``scope``) that computes one (:func:`_stat_call`: ``jnp.var``, ``jnp.std``). Each unit's
  values then stay a function of that unit's own values and params, as for a bias or an
  activation."""
  if root is None or len(eqn.outvars) != 1:
    return False
  if _call_body(eqn)[0] is not None:
    return k is not None and _stat_call(w, scope, k, eqn, live, stats, root) is not None

  def axis_of_units(v):
    """The axis that holds the units, or None (also when they are on several axes). The axis
    may hold other atoms beside them, each unit then owning several entries of it: GroupNorm's
    channels read as (groups, channels per group), each norm group a unit."""
    roots = _axis_roots(w, scope, v)
    if roots is None or sum(r.count(root) for r in roots) != 1:
      return None
    return next(d for d, r in enumerate(roots) if root in r)

  out = eqn.outvars[0]
  if axis_of_units(out) is None or any(axis_of_units(v) is None for v in live):
    return False
  name = eqn.primitive.name
  if name in _STAT_REDUCTIONS:
    return len(live) == 1 and axis_of_units(live[0]) not in eqn.params["axes"]
  if name in ("broadcast_in_dim", "reshape", "squeeze", "expand_dims"):
    return len(live) == 1 and live[0] in stats
  if name not in _ELEMENTWISE:
    return False
  shape = tuple(out.aval.shape)
  return all(tuple(v.aval.shape) == shape or (
      v in stats and len(v.aval.shape) == len(shape) and all(
          d in (1, n) for d, n in zip(v.aval.shape, shape))) for v in live)


def _stat_call(w: _Walker, scope: tuple, k: int, eqn, live, stats, root) -> str | None:
  """Whether ``eqn``, equation ``k`` of ``scope``, is a followed call with one output that
  keeps each unit a function of its own values, with statistics over the other axes on the
  way: every op of its body that reads the chain's ``live`` values is one
  :func:`_per_unit_stat` allows or an elementwise op on the units' values, and ops on other
  values alone (the count it divides by) are left as they are. ``'stat'`` when it returns a
  statistic (``jnp.var``, ``jnp.std``: a nested call around a mean and a sum of squares over
  the other axes), ``'value'`` when it returns the units' values (``jax.nn.softmax`` over
  time), None when it is not such a call."""
  inner, _ = _call_body(eqn)
  if inner is None or root is None or len(eqn.outvars) != 1 or not live:
    return None
  # Asked again for the same call (by _per_unit_stat, then for its output's kind): remembered,
  # so that calls nested in calls are walked once each, not twice per level.
  cache = w.stat_calls
  key = (scope, k, root, tuple((not isinstance(v, jex.core.Literal) and v in live,
                                not isinstance(v, jex.core.Literal) and v in stats)
                               for v in eqn.invars))
  if key not in cache:
    cache[key] = _stat_call_walk(w, scope, k, eqn, inner, live, stats, root)
  return cache[key]


def _stat_call_walk(w: _Walker, scope: tuple, k: int, eqn, inner, live, stats, root):
  """:func:`_stat_call`'s walk of the call's body."""
  iscope = scope + (k,)
  values, istats = set(), {}
  for o, i in zip(eqn.invars, inner.invars):
    if not isinstance(o, jex.core.Literal) and o in live:
      if o in stats:
        istats[i] = {i}
      else:
        values.add(i)
  for j, e in enumerate(inner.eqns):
    elive = [v for v in e.invars if not isinstance(v, jex.core.Literal)
             and (v in values or v in istats)]
    if not elive:
      continue                                   # the count, a fill value: not the units'
    if not (_per_unit_stat(w, iscope, e, elive, istats, root, j) or _admissible(e, elive)):
      return None
    if (e.primitive.name in _STAT_REDUCTIONS or all(v in istats for v in elive) or (
        _call_body(e)[0] is not None
        and _stat_call(w, iscope, j, e, elive, istats, root) == "stat")):
      istats.update((o, set()) for o in e.outvars)
    else:
      values.update(e.outvars)
  out = inner.outvars[0]
  if isinstance(out, jex.core.Literal):
    return None
  return "stat" if out in istats else "value" if out in values else None


def _activation_chain(w: _Walker, scope: tuple, start, root=None):
  """The activation chain of :func:`_chain`; where it does not join (a normalisation reads the
  units' values twice: for its statistics and to normalise them), again with per-unit
  statistics followed (:func:`_per_unit_stat`), taken when every branch then joins."""
  *found, stat_read = _chain(w, scope, start, root, False)
  if not found[2] and stat_read:
    *again, _ = _chain(w, scope, start, root, True)
    if again[2]:
      return tuple(again)
  return tuple(found)


def _chain(w: _Walker, scope: tuple, start, root, stats: bool):
  """Where a kernel's output becomes what its readers read, and the nonlinearity on the way.

  Follows, in program order, every op that keeps the value unit by unit (adding the bias,
  normalising with per-unit params, the nonlinearity, a residual addition), also where the
  value branches and joins again (``gelu``, ``x * sigmoid(x)``, ``where(x > 0, x, a * x)`` read
  their input several times), and reshapes that keep the units on an axis of their own
  (:func:`_keeps_units`, given the group's class ``root``), up to the first other reader.
  Returns ``(var, activation, joined, plain)``: the last value that every path went through,
  its nonlinearity (see :func:`_identify`), whether every branch ends there (False when a
  reader takes a value before the join, e.g. ``relu(h) @ W2 + h @ W3``: then no one value is
  what all readers read), and whether the function follows the kernel with at most a bias
  added before it.
  """
  jaxpr = w.jaxpr_at[scope]
  outs = jaxpr.outvars
  parent = w.jaxpr_at[scope[:-1]].eqns[scope[-1]] if scope else None
  if parent is not None and parent.primitive.name == "scan":
    # A carry is read by the next step's ops, the ones this walk follows within the step (an
    # LSTM's cell state), so only the ys, and a final carry read after the scan, are readers.
    nk = parent.params["num_carry"]
    outs = [v for j, v in enumerate(outs)
            if j >= nk or w.users_in(scope[:-1], parent.outvars[j])]
  n_out = {}
  for v in outs:
    if not isinstance(v, jex.core.Literal):
      n_out[v] = n_out.get(v, 0) + 1

  def users(v):
    return [path[-1] for path, _ in w.users_in(scope, v)]

  def readers(v):
    return len(users(v)) + n_out.get(v, 0)

  remaining = {start: readers(start)}
  pending = set(users(start))
  done, joins = [], [(start, 0)]
  # With ``stats``: values computed from per-unit statistics alone, and the values of the
  # chain those statistics are of.
  stat_vars: dict = {}
  stopped = None
  while pending:
    k = min(pending)
    pending.discard(k)
    eqn = jaxpr.eqns[k]
    live = [v for v in eqn.invars if not isinstance(v, jex.core.Literal) and v in remaining]
    unitwise = _unitwise_call(w, scope, k, eqn, root)
    if not (_admissible(eqn, live) or _keeps_units(w, scope, eqn, root) or unitwise
            or (stats and _per_unit_stat(w, scope, eqn, live, stat_vars, root, k))):
      stopped = k
      break
    if stats and (eqn.primitive.name in _STAT_REDUCTIONS or (
        live and all(v in stat_vars for v in live)) or (
            not unitwise and _call_body(eqn)[0] is not None
            and _stat_call(w, scope, k, eqn, live, stat_vars, root) == "stat")):
      src = set().union(*(stat_vars[v] if v in stat_vars else {v} for v in live))
      stat_vars.update((o, src) for o in eqn.outvars)
    for v in live:
      remaining[v] -= 1
      if remaining[v] == 0:
        del remaining[v]
    done.append(eqn)
    for o in eqn.outvars:
      if readers(o):
        remaining[o] = readers(o)
        pending.update(users(o))
    if len(remaining) == 1 and next(iter(remaining)) not in stat_vars:
      joins.append((next(iter(remaining)), len(done)))
  var, n = joins[-1]
  tag, i = _identify(jaxpr, joins, done[:n], w.literal_made(scope))
  if tag == "linear" and _gated(w, scope, jaxpr, start, done[:n]):
    tag = "other"       # silu(x W1) * (x W3): a product of two activations, not no function
  # A zero-weight unit outputs act(bias) when only a parameter is added before the function.
  plain = i == 0 or (i == 1 and done[0].primitive.name == "add" and any(
      not isinstance(v, jex.core.Literal) and v in w.origin for v in done[0].invars))
  # Joined: every branch ends at var, and no op that would have gone on from var is left
  # unread (h @ W3 before relu(h) @ W2 in program order reads h and relu(h)).
  # With ``stats``, statistics left unread by the chain are readers of var (average pooling
  # after an instance norm), if they are statistics of var alone.
  left = {v for v in remaining if not (v in stat_vars and stat_vars[v] <= {var})}
  # Branches that only cut var into parts and move them (qkv.reshape(B, T, 3, H, D)[:, :, i],
  # as jnp.split(qkv, 3, -1), which the chain does not follow, stops at qkv) read var itself.
  # Each part must go straight into products: a part scaled or shifted first (by any value,
  # a column of its own reader's kernel included) passes on other values than var's.
  def cut_into_products(v) -> bool:
    """Whether every path from ``v`` only cuts and moves it into products (the walk stops at
    the first product, in program order, so later cuts may not have been reached yet)."""
    stack, seen = [v], set()
    while stack:
      u = stack.pop()
      if u in seen:
        continue
      seen.add(u)
      if n_out.get(u):
        return False
      for k in users(u):
        e = jaxpr.eqns[k]
        if e.primitive.name in _UNIT_MOVES or e.primitive.name in _LAYOUT_OPS:
          stack.extend(e.outvars)
        elif e.primitive.name not in ("dot_general", "conv_general_dilated"):
          return False
    return True

  parts_of_var = bool(left) and bool(done[n:]) and cut_into_products(var)
  joined = parts_of_var or (left == {var} or (not left and bool(remaining))) and not any(
      _admissible(jaxpr.eqns[k], [v for v in jaxpr.eqns[k].invars if v is var])
      or _keeps_units(w, scope, jaxpr.eqns[k], root)
      or _unitwise_call(w, scope, k, jaxpr.eqns[k], root)
      or (stats and _per_unit_stat(w, scope, jaxpr.eqns[k],
                                   [v for v in jaxpr.eqns[k].invars if v is var], stat_vars,
                                   root, k)) for k in pending)
  # Whether a reduction reads the chain's values where it stops (a normalisation's statistics:
  # worth following them, see _activation_chain).
  stat_read = not joined and root is not None and not stats and any(
      jaxpr.eqns[k].primitive.name in _STAT_REDUCTIONS or _call_body(jaxpr.eqns[k])[0] is not None
      for k in pending | ({stopped} if stopped is not None else set()))
  return var, tag, joined, plain, stat_read


def _gated(w: _Walker, scope: tuple, jaxpr, start, eqns) -> bool:
  """Whether one of the chain's ``eqns`` does more than add a value computed from the inputs
  that does not depend on the chain's own values: a gate (SwiGLU's ``silu(x W1) * (x W3)``, an
  LSTM's ``o * tanh(c)``) multiplies the units by other activations, so the units are not the
  identity of their pre-activation ('linear'). A residual sum (``add``, ``sub``) and a
  normalisation by the units' own statistics (batch norm in training mode) are not gates."""
  # What depends on start, among the equations from start's to the chain's last (the others
  # cannot feed the chain: the equations are in program order).
  index = w.eqn_index(scope)
  lo = index.get(start, 0)
  hi = max((index[e.outvars[0]] for e in eqns), default=-1)
  tainted = {start}
  for e in jaxpr.eqns[lo:hi + 1]:
    if any(not isinstance(v, jex.core.Literal) and v in tainted for v in e.invars):
      tainted.update(e.outvars)
  for e in eqns:
    if e.primitive.name in ("add", "sub") or e.primitive.name in _LAYOUT_OPS:
      continue
    if any(not isinstance(v, jex.core.Literal) and v in w.stream and v not in tainted
           for v in e.invars):
      return True
  return False


def _np_logistic(x):
  return 1.0 / (1.0 + np.exp(-x))


#: Elementwise ops evaluated with NumPy on the grid of :func:`_identify` (float32/64 only), so
#: identifying a layer's nonlinearity compiles no XLA program (a first ``ga.search`` stays one
#: compiled program); other ops, and other dtypes, run as JAX ops.
_NUMPY_OPS = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide,
    "neg": np.negative, "max": np.maximum, "min": np.minimum, "exp": np.exp, "log": np.log,
    "log1p": np.log1p, "expm1": np.expm1, "tanh": np.tanh, "logistic": _np_logistic,
    "abs": np.abs, "sqrt": np.sqrt, "sign": np.sign, "square": np.square,
    "rsqrt": lambda x: 1.0 / np.sqrt(x), "integer_pow": lambda x, *, y: x ** y,
    "pow": np.power, "gt": np.greater, "ge": np.greater_equal, "lt": np.less,
    "le": np.less_equal, "eq": np.equal, "ne": np.not_equal,
    "select_n": lambda p, *cases: np.choose(np.asarray(p, np.int32), cases),
    "convert_element_type": lambda x, *, new_dtype, **_: np.asarray(x, new_dtype),
}
_NUMPY_DTYPES = (np.dtype(np.float32), np.dtype(np.float64), np.dtype(np.bool_))


def _numpy_op(eqn, invals):
  """``eqn`` on the grid with NumPy, or None where :data:`_NUMPY_OPS` does not cover it."""
  f = _NUMPY_OPS.get(eqn.primitive.name)
  if f is None or eqn.primitive.multiple_results:
    return None
  dtypes = [np.dtype(v.aval.dtype) for v in list(eqn.invars) + list(eqn.outvars)]
  if any(d not in _NUMPY_DTYPES for d in dtypes):
    return None
  params = {k: eqn.params[k] for k in ("y", "new_dtype") if k in eqn.params}
  with np.errstate(all="ignore"):   # exp(1e6) is inf, as in XLA
    # in the op's own dtypes: a literal 2.0 is a float32 operand of a float32 op, as in XLA
    args = [np.asarray(v, var.aval.dtype) for v, var in zip(invals, eqn.invars)]
    return np.asarray(f(*args, **params), eqn.outvars[0].aval.dtype)


def _run_eqns(eqns, env: dict, flat: tuple | None = None) -> dict:
  """Evaluates ``eqns`` (plain ops and calls of them) on the values in ``env``; ``flat``: the
  shape of a vector of values evaluated in place of the layer's own shape (layout ops are
  skipped, scalars broadcast to it)."""
  read = lambda v: v.val if isinstance(v, jex.core.Literal) else env[v]
  for eqn in eqns:
    invals = [read(v) for v in eqn.invars]
    inner, consts = _call_body(eqn)
    if inner is not None:
      sub = dict(zip(inner.constvars, consts))
      sub.update(zip(inner.invars, invals[len(invals) - len(inner.invars):]))
      sub = _run_eqns(inner.eqns, sub, flat)
      outs = [v.val if isinstance(v, jex.core.Literal) else sub[v] for v in inner.outvars]
    elif flat is not None and (eqn.primitive.name in _LAYOUT_OPS or (
        eqn.primitive.name in _UNIT_MOVES and np.size(invals[0]) == math.prod(flat))):
      # a move or an index of the chain's own values too (each part of a cut: the grid)
      outs = invals[:1] * len(eqn.outvars)
    elif flat is not None and _is_scalar_broadcast(eqn):   # a where's 0.0: as long as the grid
      outs = [np.broadcast_to(np.asarray(invals[0]), flat)]
    elif flat is not None and (out := _numpy_op(eqn, invals)) is not None:
      outs = [out]
    else:
      outs = eqn.primitive.bind(*invals, **eqn.params)
      outs = outs if eqn.primitive.multiple_results else [outs]
    env.update(zip(eqn.outvars, outs))
  return env


_REFERENCE = {"sigmoid": _np_logistic, "tanh": np.tanh, "relu": lambda z: np.maximum(z, 0.0),
              "linear": lambda z: z}   # NumPy: compared on the grid without compiling anything


def _literal_made(jaxpr) -> dict:
  """The arrays of ``jaxpr`` made from literals alone (a where's 0.0): ``{var: its eqn}``."""
  made = {}
  for e in jaxpr.eqns:
    if (all(isinstance(v, jex.core.Literal) or v in made for v in e.invars)
        and not _call_body(e)[0]):
      made.update((o, e) for o in e.outvars)
  return made


def _identify(jaxpr, joins, eqns, made) -> tuple[str, int]:
  """The nonlinearity that ends a chain: the function of one variable computed after the last
  op that reads anything else (a bias, a norm's params, another layer), evaluated on a grid
  and compared with sigmoid, tanh, relu and the identity; ``'other'`` (``gelu``, ``silu``, a
  scaled sigmoid ...) when it is none of them. So ``1 / (1 + exp(-z))`` is a sigmoid however it
  is written. Also returns where that function starts in ``eqns``. ``made``: the arrays of
  ``jaxpr`` made from literals (:func:`_literal_made`)."""
  var = joins[-1][0]
  for entry, i in joins:                     # the earliest join after which only it is read
    tail = eqns[i:]
    inside = {entry} | {o for e in tail for o in e.outvars}
    if all(isinstance(v, jex.core.Literal) or v in inside or v in made
           for e in tail for v in e.invars):
      break
  need, stack = set(), [v for e in tail for v in e.invars]
  while stack:                               # the literal-made arrays this tail reads
    v = stack.pop()
    if not isinstance(v, jex.core.Literal) and v in made and made[v] not in need:
      need.add(made[v])
      stack.extend(made[v].invars)
  tail = [e for e in jaxpr.eqns if e in need] + list(tail)
  if not tail:
    # Only the last join is read alone: the chain is the identity, a bias, a scale, unless a
    # function in it also reads a value of its own (a learned per-unit swish beta or
    # threshold, relu(z) * gamma): then it is none of the named functions (it was 'linear').
    if any(e.primitive.name not in _LINEAR_CHAIN for e in eqns):
      return "other", len(eqns)
    return "linear", i
  dtype = entry.aval.dtype
  if jnp.issubdtype(dtype, jnp.complexfloating):   # complex units (abs(h @ complex kernel))
    return "other", i                              # are none of the real nonlinearities
  if jnp.issubdtype(dtype, jnp.floating):    # wide, so a clip at 20 is not a relu
    grid = np.concatenate([np.linspace(-8.0, 8.0, 58), [-1e6, -1e3, -64.0, 64.0, 1e3, 1e6]])
  else:                                      # an integer chain (a quantised layer)
    grid = np.arange(-32, 32)
  with np.errstate(over="ignore"):            # float16: +-1e6 is inf, as JAX would make it
    grid = grid.astype(np.dtype(dtype))        # NumPy (ml_dtypes for bfloat16): nothing compiled
  out = None
  with jax.ensure_compile_time_eval():
    try:         # on 64 points: ops of scalars and literals run at any shape (and compile once)
      out = _run_eqns(tail, {entry: grid}, flat=grid.shape)[var]
      with np.errstate(over="ignore"):        # a float64 chain's 2**1e3: inf in float32
        out = np.asarray(out, np.float32)
      out = out if out.shape == grid.shape else None
    except Exception:  # pylint: disable=broad-except
      out = None
  if out is None:    # ops of the layer's own shape (an iota): not compared
    return "other", i
  grid = grid.astype(np.float32)
  narrow = [jnp.finfo(v.aval.dtype).bits for e in tail for v in e.outvars
            if jnp.issubdtype(v.aval.dtype, jnp.floating)]
  tol = 1e-2 if min(narrow, default=32) < 32 else 1e-5
  for name, f in _REFERENCE.items():
    with np.errstate(over="ignore"):
      want = np.asarray(f(grid))
    if np.allclose(out, want, atol=tol, rtol=tol):
      return name, i
  return "other", i


def _classify(w: _Walker, leaf_paths, num_params, env):
  """Unit groups (class roots with producers and consumers and nothing blocking them)."""
  A = w.atoms
  _resolve_concats(w)
  uses = dict(w.uses)
  for leaf in range(num_params):
    kind, where = w.first_use.get(leaf, ("stat", (1 << 30,)))
    for axis, ax in enumerate(w.invar_atoms[leaf]):
      if (leaf, axis) not in uses:
        uses[(leaf, axis)] = _Use(leaf, axis, "producer", kind, where)
  members: dict[int, list] = {}
  for (leaf, axis), use in uses.items():
    if use.role == "window":
      continue
    for a in A.expand(w.invar_atoms[leaf][axis]):
      if A.size[a] > 1:
        members.setdefault(A.find(a), []).append(use)
  for root, parts in w.concat_of.items():       # a concatenation's readers read each part
    for part in dict.fromkeys(q for q, _, n in parts if n > 1):    # (once, at every offset)
      members.setdefault(part, []).extend(members.get(root, []))
  mutual_at: dict[int, set] = {}    # class root -> where two activations contract it
  for atoms, path in w.mutual:
    for a in A.expand(atoms):
      if A.size[a] > 1:
        mutual_at.setdefault(A.find(a), set()).add(path)
  # Summed over (a mean, an RMSNorm's or an L2 norm's sum of squares): a statistic of the
  # example that a masked unit leaves as it is, and the compacted network too (a mean's divisor
  # is the traced width, a literal of the program), only where the summed value is zero at
  # that unit. Then a unit's term is read as by a product (merges and folds cannot keep it);
  # otherwise (a LayerNorm's variance of y - mean, a softmax's sum of exp) it blocks the units.
  read_by_sums = set()
  # _zero_when_masked's answers per class, shared by its calls in program order: a deep
  # residual stream's later norms find the earlier ones' answers (no deep recursion)
  zero_memo: dict[int, dict] = {}
  def read_by(records, why, never_negative=False):
    at: dict[int, set] = {}
    for atoms, path, _ in records:
      for a in A.expand(atoms):
        if A.size[a] > 1:
          at.setdefault(A.find(a), set()).add(path)
    for root, paths in at.items():   # (a concatenation summed over: each part on its own)
      for r in [p for p, _, _ in w.concat_of[root]] if root in w.concat_of else [root]:
        if all(_zero_when_masked(w, path[:-1], _eqn_at(w, path).invars[0], r,
                                 memo=zero_memo.setdefault(r, {}))
               and (not never_negative or _never_negative(w, path[:-1],
                                                          _eqn_at(w, path).invars[0]))
               for path in sorted(paths)):
          mutual_at.setdefault(r, set()).update(paths)
          read_by_sums.add(r)
        else:
          A.block(r, why)
  read_by(w.summed, _SUMMED)
  # A maximum over the units: the same, where the values are also never negative (a masked
  # unit's 0 then changes no maximum; an all-masked group is no group compact makes).
  read_by(w.maxed, _reduced_by("reduce_max"), never_negative=True)
  mutual = {root: min(paths) for root, paths in mutual_at.items()}   # (the first, named)
  reasons: dict[int, list[str]] = {}
  sites, taken = [], {}
  # Groups read by a sum over their units are named after the others (a vmapped ensemble's
  # members, summed by its mean, after the members' hidden units), so that adding them does not
  # rename a group.
  for root, us in sorted(members.items(), key=lambda item: item[0] in read_by_sums):
    why = list(A.blocked[root])
    if root in w.concat_of:
      why.append("a concatenation of other groups (each part is pruned as its own group)")
    producers = [u for u in us if u.role == "producer"]
    consumers = [u for u in us if u.role == "consumer"]
    tied = [u for u in us if (u.leaf, u.axis) in w.tied]
    if tied:
      names = sorted({units_lib.path_str(leaf_paths[u.leaf]) for u in tied
                      if leaf_paths[u.leaf] is not None})
      why.append(f"tied weights: one kernel axis ({', '.join(names) or 'a leaf without a path'}) "
                 "both produces and reads these units (a tied autoencoder's W and W.T, an "
                 "embedding read back by attend), which pruning by groups does not support")
    elif not consumers and root not in mutual:
      why.append("no kernel reads these units")
    if not producers:
      why.append("no parameter produces these units")
    elif root in mutual and not any(u.kind == "kernel" or u.computed for u in producers):
      why.append("contracted between two activations that no kernel makes")
    elif root in mutual and not all(_zero_when_masked(w, path[:-1], v, root,
                                                      memo=zero_memo.setdefault(root, {}))
                                    for path in sorted(mutual_at[root])
                                    for v in _eqn_at(w, path).invars[:2]):
      why.append("contracted between two activations that are not zero where a unit's params "
                 "are (a sigmoid, an exp, or a shift such as elu(h) + 1 or h + 1.0 before the "
                 "product): a masked unit would still add a term there, which compacting it "
                 "drops")
    if any(leaf_paths[u.leaf] is None for u in us):
      why.append("a leaf on this axis has no addressable path (a custom pytree node)")
    if why:
      reasons[root] = why
      continue
    # Kernels: read as they are, or computed from params (a weight norm): the contraction
    # whose output the units are, either way.
    kernels = sorted((u for u in producers if u.kind == "kernel" or u.computed),
                     key=lambda u: u.where)
    first = kernels[0] if kernels else min(producers, key=lambda u: u.where)
    con = next((c for c in w.contractions_at(first.where)
                if c.kernel == first.leaf or c.computed), None)
    if con is not None and con.computed:     # named after the leaf the kernel is computed from
      first = next((u for u in kernels if u.where == con.path and u.leaf == con.kernel), first)
    name = _name(leaf_paths[first.leaf], first.axis, taken)
    taken[name] = tuple(leaf_paths[first.leaf])
    activation, scope, var = "linear", (), None
    joined, plain = True, True
    if con is not None:
      scope = con.path[:-1]
      var, activation, joined, plain = _activation_chain(w, scope, con.out_var, root)
      while scope and joined:   # a layer inside a call (nn.remat, jit) whose output goes on
        parent = w.jaxpr_at[scope[:-1]].eqns[scope[-1]]
        inner = w.jaxpr_at[scope].outvars
        if (parent.primitive.name == "scan" or sum(o is var for o in inner) != 1
            or w.users_in(scope, var)):
          break
        out = parent.outvars[next(j for j, o in enumerate(inner) if o is var)]
        var2, act2, joined, plain2 = _activation_chain(w, scope[:-1], out, root)
        scope, var = scope[:-1], var2
        if var2 is not out:
          plain = plain and activation == "linear" and plain2   # the function is act2's alone
          activation = act2
    readout = readout_extra = False
    if con is not None and len(consumers) == 1 and scope == ():
      c = w.contractions_at(consumers[0].where)[0]
      out, readout_extra = _readout_terms(w, c)
      # (N, units) read by a (units, outputs) kernel: not a conv layer's (N, positions x
      # channels) flattened, whose rows are positions of a unit
      readout = (not c.conv and not c.computed and c.stream_var is var and c.path[:-1] == () and
                 len(var.aval.shape) == 2 and var.aval.shape[1] == w.atoms.size[root] and
                 any(out is o for o in w.out_vars) and len(c.kernel_var.aval.shape) == 2)
    # A kernel computed from params (other than one param times a scalar): a unit whose
    # params are zero does not output act(bias) (w / norm(w) is not zero, or is NaN).
    if any(u.computed and u.kind != "kernel" for u in producers):
      plain = False
    act_axes = env.get((scope, var)) if var is not None else None
    # Complete: every kernel of the group feeds var, and every parameter of the group acts
    # before it (a per-unit shift or scale acting later treats units with equal activations
    # differently: merging them would change the outputs).
    # Nor is it complete when a consumer reads a parameter of the group directly: a recurrent
    # reader meets a learned initial state (h0) at the first step, not the activations.
    complete = (joined and var is not None and w.reaches_all(
        scope, var, {u.where for u in kernels}.union(
            *(w.acting_points(leaf) for leaf in {u.leaf for u in producers})))
        and not _initial_states(w, scope, var, producers, consumers)
        and root not in mutual)
    # Why not complete: worked out when asked (TracedTarget.activations_incomplete_why).
    why = () if complete else (joined, tuple(kernels), tuple(producers), tuple(consumers))
    sites.append(_GroupSite(name, root, activation, "conv" if con is not None and con.conv
                            else "dense", first.where, scope, var, act_axes, readout, complete,
                            plain, why, readout_extra=readout and readout_extra,
                            mutual=mutual.get(root)))
  sites.sort(key=lambda s: s.order)
  return tuple(sites), uses, reasons


# Ops that keep a zero input zero, whatever the dtype (moves, reductions over other axes,
# slices, and elementwise ops with f(0) = 0: used where NumPy does not compute the op).
_ZERO_KEEPING = frozenset("""
neg tanh sin sinh asinh atan atanh tan erf expm1 log1p sign abs sqrt cbrt integer_pow square
reduce_precision convert_element_type reshape broadcast_in_dim squeeze expand_dims copy copy_p
transpose reduce_sum reduce_max reduce_min cumsum slice split dynamic_slice rev
name optimization_barrier sharding_constraint stop_gradient real imag
""".split())
# Ops that pass on the one value a masked unit's entries hold, whatever it is (moves, maxima
# and minima over other axes, running ones too); sums over other axes pass on a zero alone
# (_ZERO_KEEPING).
_VALUE_MOVES = frozenset("""
reshape broadcast_in_dim squeeze expand_dims copy copy_p transpose reduce_max reduce_min slice
split dynamic_slice rev name optimization_barrier sharding_constraint stop_gradient cummax cummin
""".split())
# Elementwise ops whose IEEE results are correctly rounded, so that NumPy and XLA compute the same
# bits (on values that are not subnormal: XLA:CPU flushes those to zero); products and
# quotients are taken only where exact, so that none differs when XLA fuses it into a sum.
_EXACT_OPS = frozenset("""add add_any sub neg abs max min sign floor ceil gt ge lt le eq ne and
or not convert_element_type""".split())
_EXACT_PRODUCTS = frozenset("mul div square integer_pow".split())
_COMPARISONS = frozenset("gt ge lt le eq ne".split())
_MASKED_OPS = {**{n: f for n, f in _NUMPY_OPS.items() if n in _EXACT_OPS | _EXACT_PRODUCTS},
               "add_any": np.add, "floor": np.floor, "ceil": np.ceil, "and": np.logical_and,
               "or": np.logical_or, "not": np.logical_not}
# Other functions at the points where every implementation's value is exact: exp(0) = 1,
# sigmoid(0) = 0.5, cos(0) = 1; log(0) and rsqrt(0) are infinite (NaN below: 0 times them is).
_SPECIAL_VALUES = {
    "exp": {0: 1}, "exp2": {0: 1}, "log": {1: 0, 0: np.nan}, "log1p": {0: 0}, "expm1": {0: 0},
    "logistic": {0: 0.5}, "tanh": {0: 0}, "sin": {0: 0}, "cos": {0: 1}, "tan": {0: 0},
    "sinh": {0: 0}, "cosh": {0: 1}, "asinh": {0: 0}, "acosh": {1: 0}, "atan": {0: 0},
    "atanh": {0: 0}, "asin": {0: 0}, "acos": {1: 0}, "erf": {0: 0}, "erfc": {0: 1},
    "sqrt": {0: 0, 1: 1}, "rsqrt": {1: 1, 0: np.nan}, "cbrt": {0: 0, 1: 1},
}


def _is_float(dtype) -> bool:
  return bool(jnp.issubdtype(dtype, jnp.floating))     # (bfloat16 too)


def _subnormal(x) -> bool:
  x = np.asarray(x)
  return _is_float(x.dtype) and 0 < abs(float(x)) < float(jnp.finfo(x.dtype).tiny)


def _exact_product(name: str, args, r, params) -> bool:
  """Whether ``r`` is the exact product (quotient, power) of the finite numbers ``args``."""
  vals = [float(a) for a in args]
  a, out = fractions.Fraction(vals[0]), fractions.Fraction(float(r))
  if name == "mul":
    return a * fractions.Fraction(vals[1]) == out
  if name == "div":
    return vals[1] != 0 and a / fractions.Fraction(vals[1]) == out
  y = 2 if name == "square" else params["y"]
  return (a != 0 or y >= 0) and a ** y == out


def _exact_op(eqn, vals):
  """``eqn`` computed on ``vals`` (the operands' values) where its result is exact, so that XLA
  computes the same bits: :data:`_EXACT_OPS` and exact products and quotients (computed in
  float64 and taken where the result is representable, which is exact for bfloat16 and float16,
  however XLA rounds between ops), and :data:`_SPECIAL_VALUES`, on values that are not
  subnormal; None otherwise (complex values too). Each value is one number: a constant's
  entries are a scalar literal's, moved. A value computed to be infinite is NaN here, whatever
  its sign (XLA may take -0.0 for 0.0 and give -inf for inf): never zero, and compared with
  nothing; a constant's inf is itself (``max(-inf, h)``)."""
  name, out_dtype = eqn.primitive.name, eqn.outvars[0].aval.dtype
  vals = [_uniform(np.asarray(v, u.aval.dtype)) for v, u in zip(vals, eqn.invars)]
  if any(v is None or jnp.issubdtype(v.dtype, jnp.complexfloating) for v in vals) or not (
      _is_float(out_dtype) or np.dtype(out_dtype) == np.bool_):
    return None
  nan = np.asarray(np.nan, out_dtype) if _is_float(out_dtype) else None
  if any(_is_float(v.dtype) and np.isnan(float(v)) for v in vals):
    return None if name in _COMPARISONS else nan
  if any(map(_subnormal, vals)):
    return None
  if name in _SPECIAL_VALUES:
    a = float(vals[0])
    if a not in _SPECIAL_VALUES[name]:
      return None
    out = _SPECIAL_VALUES[name][a]
    # (f(-0.0) = -0.0 for the odd functions, and sqrt)
    return np.asarray(vals[0] if out == 0 and a == 0 else out, out_dtype)
  if name == "pow":                   # 0 ** y = 0 (y > 0), x ** 0 = 1, 1 ** y = 1
    x, y = map(float, vals)
    if y == 0 or x == 1:
      return np.ones((), out_dtype)
    return np.zeros((), out_dtype) if x == 0 and y > 0 else None
  f = _MASKED_OPS.get(name)
  if f is None:
    return None
  params = {k: eqn.params[k] for k in ("y",) if k in eqn.params}
  wide = [np.asarray(v, np.float64) if _is_float(v.dtype) else v for v in vals]
  with np.errstate(all="ignore"):
    r64 = (np.asarray(wide[0], np.float64 if _is_float(out_dtype) else np.bool_)
           if name == "convert_element_type" else np.asarray(f(*wide, **params)))
  if r64.dtype == np.bool_:
    return r64
  with np.errstate(all="ignore"):
    r = np.asarray(r64, out_dtype)
  if not (np.isfinite(r64) and np.isfinite(float(r))):   # (x / 0, an overflow)
    return nan
  if float(r) != float(r64) and name not in _EXACT_PRODUCTS:
    return None                       # (a sum or a cast rounded: XLA may round it elsewhere)
  if _subnormal(r) or name in _EXACT_PRODUCTS and not _exact_product(name, vals, r, params):
    return None
  return r


def _gathered(eqn, c):
  """The value a ``gather`` passes on from an operand whose value at a masked unit is ``c``: an
  index out of range reads its fill value (``mode='fill'``, ``jnp.take``'s default), so ``c``
  only where that is ``c`` too, or NaN (NaN at every unit there: a sum over the units is NaN
  with or without the unit)."""
  if c is None or eqn.params["mode"] != lax.GatherScatterMode.FILL_OR_DROP:
    return c
  fill = eqn.params["fill_value"]
  if fill is None:                    # (NaN for floats; other dtypes: an extreme value)
    fill = np.nan if np.issubdtype(eqn.outvars[0].aval.dtype, np.inexact) else None
  return c if fill is not None and (np.isnan(fill) or c == fill) else None


def _numeric(dtype) -> bool:
  """Whether ``dtype`` holds numbers (bfloat16 and the other ml_dtypes too; not a PRNG key's)."""
  return bool(jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_))


def _wide(c):
  """The one value ``c`` in float64, or complex128 where it is complex (for NaN and inf)."""
  c = np.asarray(c)
  return c.astype(np.complex128 if c.dtype.kind == "c" else np.float64)


def _is_finite(c) -> bool:
  """Whether the one value ``c`` is finite (a complex one: both its parts)."""
  return bool(np.isfinite(_wide(c)))


def _is_nan(c) -> bool:
  """Whether the one value ``c`` is NaN (a complex one: either of its parts)."""
  return bool(np.isnan(_wide(c)))


def _uniform(c):
  """The one value of the array ``c`` (a 0-d array; NaN where every entry is), or None where
  ``c`` is None, empty or holds more than one value."""
  if c is None or np.size(c) == 0:
    return None
  c = np.asarray(c)
  first = c.reshape(-1)[0]
  if c.dtype.kind in "fc" and np.isnan(first):
    return np.asarray(first) if np.all(np.isnan(c)) else None
  return np.asarray(first) if np.all(c == first) else None


def _held_axes(w: _Walker, scope: tuple, v, root: int) -> set:
  """The axes of ``v`` (at ``scope``) that hold the units of class ``root`` (or a concatenation
  of them with others)."""
  if isinstance(v, jex.core.Literal):
    return set()
  A, parts = w.atoms, w.concat_parts()
  ax = w.scoped_env.get((scope, v))
  if ax is None and v in w.origin and v in w.jaxpr_at[()].invars:
    ax = w.invar_atoms[w.origin[v][0]]
  return {d for d, x in enumerate(ax or ()) if any(
      A.find(a) == root or root in parts.get(A.find(a), ()) for a in A.expand(x))}


def _zero_when_masked(w: _Walker, scope: tuple, var, root: int, depth: int = 0, memo=None) -> bool:
  """Whether ``var`` (at ``scope``) is zero at a unit of class ``root`` whose params are zeroed
  (masked): :func:`_masked_value` is 0. A group read by a product of two activations
  (``q @ k.T``) has no consumer rows to zero, so masking a unit equals removing it only then:
  ``sigmoid(h) @ sigmoid(g).T`` or ``(elu(q) + 1) @ ...`` add a term for a masked unit; a sum
  over the units (a norm's) likewise."""
  v = _masked_value(w, scope, var, root, depth, memo)
  return v is not None and v == 0


def _masked_value(w: _Walker, scope: tuple, var, root: int, depth: int = 0, memo=None):
  """The one value (a 0-d array in ``var``'s dtype) that ``var`` (at ``scope``) holds at every
  entry of a unit of class ``root`` whose params are zeroed (masked), or None where that is not
  shown: a param holding the units is 0 there; products with it are 0 where the other factor is
  finite (:func:`_finite_when_masked`); elementwise ops of values known there and of constants
  are computed where XLA computes the same bits (:func:`_exact_op`: ``exp(h)`` is 1, so
  ``exp(h) - 1.0`` is 0 again; ``sigmoid(h) - 0.5`` and ``1 - cos(h)`` too); moves pass a value
  on, sums over other axes a zero (or NaN); a contraction's output is 0 where the operand
  holding the units on an axis it keeps is; a scan's carry holds its initial value by induction
  (:func:`_scan_input_value`)."""
  memo = {} if memo is None else memo
  if isinstance(var, jex.core.Literal):
    return _uniform(np.asarray(var.val, var.aval.dtype))
  key = (scope, var)
  if key in memo:
    return memo[key]
  memo[key] = None                     # (a cycle, or too deep: not shown; a few Python frames
  if depth > 160:                      # per level, within Python's limit)
    return None
  value = lambda sc, v: _masked_value(w, sc, v, root, depth + 1, memo)
  is_zero = lambda sc, v: (c := value(sc, v)) is not None and c == 0
  held = lambda sc, v: _held_axes(w, sc, v, root)

  def operand(sc, v):                  # its value at a masked unit, or a constant's values
    c = value(sc, v)
    return _constant_values(w, sc, v) if c is None and not held(sc, v) else c

  axes = held(scope, var)
  if not axes:                         # no axis of the units: a constant's one value (jnp.where
    out = _uniform(_constant_values(w, scope, var))   # passes its 0.0 into a jit)
  elif var in w.origin:                # a param holding them: masking zeroes it there
    out = np.zeros((), var.aval.dtype)
  elif len(axes) > 1:                  # the units on two axes (an outer product h_i g(h_j)):
    out = None                         # zero along one is not shown zero along the other
  else:
    where = w._definition(scope, var)
    if where is None:                  # an input, a scan's carry or xs, a closed-over constant
      out = _scan_input_value(w, scope, var, root, depth, memo)
    elif where[0] == "in":
      out = value(where[1], where[2])
    else:
      _, path, eqn = where
      name, ins = eqn.primitive.name, eqn.invars
      body = _call_body(eqn)[0]
      out = None
      if body is not None:
        out = value(path, body.outvars[list(eqn.outvars).index(var)])
      elif name == "scan":              # a final carry (its value at every step: its body
        j, nc = list(eqn.outvars).index(var), eqn.params["num_consts"]   # input's), or ys
        inner = _body(eqn)
        out = value(path, inner.invars[nc + j] if j < eqn.params["num_carry"] else
                    inner.outvars[j])
      elif name in ("dot_general", "conv_general_dilated"):   # zero where an operand holding
        if name == "dot_general":       # the units on an axis it keeps is zero (a kernel's
          (lc, rc), _ = eqn.params["dimension_numbers"]     # output channels); NaN (not
          kept = [held(scope, u) - set(c) for u, c in zip(ins, (lc, rc))]   # finite) where
        else:                           # one is NaN
          kept = [set(), {eqn.params["dimension_numbers"].rhs_spec[0]} & held(scope, ins[1])]
        vals = [value(scope, u) if k else None for u, k in zip(ins, kept)]
        if any(c is not None and c == 0 and _finite_when_masked(   # a zero times the other
            w, scope, ins[1 - i], root, depth + 1, memo) for i, c in enumerate(vals)):
          out = np.zeros((), var.aval.dtype)       # operand's entries: 0 where they are finite
        elif any(c is not None and _is_nan(c) for c in vals):
          out = np.asarray(np.nan, var.aval.dtype)
      elif name in ("concatenate", "pad"):   # (a concatenation's parts that hold the units:
        vals = [value(scope, u) for u in ins   # along them, the others are other units)
                if name == "pad" or held(scope, u)]
        if vals and all(c is not None and c == vals[0] for c in vals):
          out = vals[0]
      elif name == "select_n":          # the case chosen at a masked unit, where the
        pick = _uniform(operand(scope, ins[0]))   # predicate compares a value known there
        cases = ins[1:] if pick is None else [ins[1 + int(pick)]]   # with constants
        vals = [value(scope, u) for u in cases]
        if all(c is not None and c == vals[0] for c in vals):
          out = vals[0]
      elif name == "gather":
        out = _gathered(eqn, value(scope, ins[0]))
      elif name == "sort":              # along another axis: a masked unit's rows hold its
        k = list(eqn.outvars).index(var)   # one value, in any order
        if eqn.params["dimension"] not in held(scope, ins[k]):
          out = value(scope, ins[k])
      elif name in _MASKED_OPS or name in _SPECIAL_VALUES or name == "pow":
        vals = [operand(scope, u) for u in ins]      # elementwise: computed on the values
        if all(c is not None for c in vals):         # where exact (XLA's bits too)
          out = _uniform(_exact_op(eqn, vals))
        one = [None if c is None else _uniform(c) for c in vals]
        def finite(i):                 # known finite, or finite by how it is made
          if vals[i] is None:
            return _finite_when_masked(w, scope, ins[i], root, depth + 1, memo)
          return one[i] is not None and _is_finite(one[i])
        if out is None and name == "mul" and any(c is not None and c == 0 for c in one) and (
            finite(0) and finite(1)):
          out = np.zeros((), var.aval.dtype)         # zero times a finite value
        elif out is None and name == "div" and one[0] is not None and one[0] == 0 and (
            not held(scope, ins[1]) if vals[1] is None else finite(1) and one[1] != 0):
          out = np.zeros((), var.aval.dtype)         # zero over a statistic of the example
      if out is None and name in _VALUE_MOVES and not (   # (the maximum of nothing: -inf)
          name in ("reduce_max", "reduce_min") and 0 in ins[0].aval.shape):
        out = value(scope, ins[0])
      if out is None and name in ("reduce_sum", "cumsum"):   # NaN (not finite) summed over
        c = value(scope, ins[0])                             # other axes
        out = c if c is not None and _is_nan(c) else None
      if (out is None and name in _ZERO_KEEPING and is_zero(scope, ins[0])
          and not (name == "integer_pow" and eqn.params["y"] <= 0)):
        out = np.zeros((), var.aval.dtype)
  memo[key] = out
  return out


# Ops whose output is finite where their operands are (select_n: its cases), barring an
# overflow: sums, products, bounded functions, moves, contractions.
_FINITE_KEEPING = frozenset("""
add add_any sub neg mul max min select_n clamp tanh logistic sin cos erf atan sign floor ceil abs
square integer_pow reduce_sum reduce_max reduce_min cumsum dot_general conv_general_dilated
concatenate pad convert_element_type reduce_precision
""".split()) | _VALUE_MOVES


def _exact_cast(c, dtype):
  """The values ``c`` cast to ``dtype`` where the cast changes none of them (``2.0`` to int32,
  ``1`` to bool), or None: a cast that rounds (``1.5`` to int32, ``0.5`` to bool, ``1.001`` to
  bfloat16) may round otherwise in XLA."""
  if c is None or not _numeric(dtype) or not _numeric((c := np.asarray(c)).dtype):
    return None
  with np.errstate(all="ignore"), warnings.catch_warnings():
    warnings.simplefilter("ignore")   # (NumPy's ComplexWarning, a NaN cast to an integer)
    out = c.astype(dtype)
    back = out.astype(c.dtype)
  same = back == c
  if jnp.issubdtype(c.dtype, jnp.inexact) and jnp.issubdtype(dtype, jnp.inexact):
    same |= np.isnan(back) & np.isnan(c)
  return out if bool(np.all(same)) else None


def _fixed_values(w: _Walker, var):
  """The values of a literal or of a closed-over constant whose values are kept, or None."""
  if isinstance(var, jex.core.Literal):
    return np.asarray(var.val)
  return w.const_values.get(var)


def _made_by(w: _Walker, scope: tuple, var):
  """Where ``var`` (at ``scope``) is made, through followed calls (from a body's input to its
  call site's operand, from a call's output into its body): ``(scope, var, eqn)``, ``eqn`` the
  primitive equation making ``var`` at ``scope``, or None for a literal, an input, a scan's
  carry or ``xs``, or a closed-over constant."""
  for _ in range(256):
    if isinstance(var, jex.core.Literal):
      break
    where = w._definition(scope, var)
    if where is None:
      break
    if where[0] == "in":
      scope, var = where[1], where[2]
      continue
    _, path, eqn = where
    body = _call_body(eqn)[0]
    if body is None:
      return scope, var, eqn
    scope, var = path, body.outvars[list(eqn.outvars).index(var)]
  return scope, var, None


def _finite_when_masked(w: _Walker, scope: tuple, var, root: int, depth: int, memo) -> bool:
  """Whether ``var`` is finite at a masked unit of class ``root``, where :func:`_masked_value`
  does not know its value: a param, a statistic of the example (no axis of the units, the same
  at every unit) and ops of finite values that keep them finite (:data:`_FINITE_KEEPING`), so
  that 0 times it is 0 (``0 * log(0)`` and ``0 * sqrt(-1e-6)`` are NaN)."""
  key = ("finite", scope, var)
  if isinstance(var, jex.core.Literal) or key in memo:
    return isinstance(var, jex.core.Literal) or memo[key]
  memo[key] = False
  if depth > 160:
    return False
  c = _masked_value(w, scope, var, root, depth + 1, memo)
  if c is not None:
    out = _is_finite(c)
  elif not _held_axes(w, scope, var, root) or var in w.origin:
    out = True
  else:
    sc, made, eqn = _made_by(w, scope, var)
    if eqn is None:
      out = isinstance(made, jex.core.Literal)
    else:
      name = eqn.primitive.name
      ins = eqn.invars[1:] if name == "select_n" else eqn.invars
      out = (name in _FINITE_KEEPING and not (name == "integer_pow" and eqn.params["y"] < 0)
             and all(_finite_when_masked(w, sc, u, root, depth + 1, memo) for u in ins))
  memo[key] = out
  return out


# Ops that keep a constant's values (a literal passed on, reshaped); casts: _exact_cast.
_CONSTANT_MOVES = frozenset("""broadcast_in_dim reshape squeeze expand_dims copy copy_p
""".split())

def _constant_values(w: _Walker, scope: tuple, var, depth: int = 0):
  """The values (in any shape) of ``var`` when it is made from literals of the program and
  small closed-over constants alone (a jax scalar ``C`` the function closes over): passed on by
  moves and into followed calls (jnp's ``where`` and ``clip`` take their scalars as operands of
  a jitted body), and by elementwise ops where :func:`_exact_op` computes them (``2.0 * 0.5``
  in the function; not ``jnp.log(2.0)``); None otherwise."""
  literal = isinstance(var, jex.core.Literal)
  where = w._definition(scope, var) if not literal and depth < 64 else None
  if where is None:
    return _fixed_values(w, var)
  if where[0] == "in":
    return _constant_values(w, where[1], where[2], depth + 1)
  eqn = where[2]
  if eqn.primitive.name in _CONSTANT_MOVES:
    return _constant_values(w, scope, eqn.invars[0], depth + 1)
  if eqn.primitive.name == "convert_element_type":
    return _exact_cast(_constant_values(w, scope, eqn.invars[0], depth + 1),
                       eqn.outvars[0].aval.dtype)
  name = eqn.primitive.name
  if name in _MASKED_OPS or name in _SPECIAL_VALUES or name == "pow":
    vals = [_constant_values(w, scope, u, depth + 1) for u in eqn.invars]
    if all(c is not None for c in vals):
      return _exact_op(eqn, vals)
  return None


# Ops whose output is never negative, whatever their input; and ops that keep a value never
# negative (moves, sums, maxima).
_NON_NEGATIVE = frozenset("abs square exp exp2 sqrt rsqrt logistic".split())
_KEEPS_NON_NEGATIVE = frozenset("""
reduce_precision reshape broadcast_in_dim squeeze expand_dims copy copy_p
transpose reduce_sum reduce_max reduce_min slice dynamic_slice gather rev name
optimization_barrier sharding_constraint
""".split())


def _never_negative(w: _Walker, scope: tuple, var, depth: int = 0) -> bool:
  """Whether ``var`` (at ``scope``) is never negative by how it is made: ``abs``, a square, an
  even power, ``relu``'s ``max(h, 0)``, ``exp``, ``sigmoid``, sums and products of such values
  and moves of them, also inside followed calls (``jax.nn.relu``'s ``custom_jvp``)."""
  dtype = var.aval.dtype
  if jnp.issubdtype(dtype, jnp.unsignedinteger) or jnp.issubdtype(dtype, jnp.bool_):
    return True                        # (no value of the dtype is negative)
  if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.signedinteger)):
    return False                       # (a complex value has no sign; a PRNG key no number)
  scope, var, eqn = _made_by(w, scope, var)
  if eqn is None and (c := _fixed_values(w, var)) is not None:
    return bool(np.all(c >= 0))
  if eqn is None or depth > 64:
    return False
  name, ins = eqn.primitive.name, eqn.invars
  nonneg = lambda v: _never_negative(w, scope, v, depth + 1)
  if jnp.issubdtype(dtype, jnp.signedinteger) and name in _WRAPS:
    return False                       # integers wrap: abs(-128) and 100 * 2 in int8 are < 0
  if name == "convert_element_type":
    return _cast_keeps_sign(ins[0].aval.dtype, dtype) and nonneg(ins[0])
  if name in _NON_NEGATIVE:
    return True
  if name == "integer_pow":
    return eqn.params["y"] % 2 == 0
  if name == "mul":
    return ins[0] is ins[1] or all(nonneg(u) for u in ins)
  if name == "max":
    return any(nonneg(u) for u in ins)
  if name in ("add", "add_any", "min", "div", "concatenate", "select_n"):
    return all(nonneg(u) for u in (ins[1:] if name == "select_n" else ins))
  if name == "pad":
    return all(nonneg(u) for u in ins)
  return name in _KEEPS_NON_NEGATIVE and nonneg(ins[0])


# Ops that can make a negative integer of values never negative: they wrap on overflow (a sum,
# a product, ``abs`` of the most negative value), and XLA's integer division by zero is -1.
_WRAPS = frozenset("abs square integer_pow mul add add_any div reduce_sum".split())


def _cast_keeps_sign(source, target) -> bool:
  """Whether casting a value never negative from ``source`` to the signed or float ``target``
  keeps it so: to a float, and from a bool or an integer the target holds (int8 to int16,
  uint8 to int16; not int32 to int8, which wraps, nor uint32 to int32); not from a float
  to an integer, which overflows as XLA rounds out-of-range values."""
  if jnp.issubdtype(target, jnp.floating) or jnp.issubdtype(source, jnp.bool_):
    return True
  if not jnp.issubdtype(source, jnp.integer):
    return False
  bits = jnp.iinfo(source).bits, jnp.iinfo(target).bits
  return bits[0] < bits[1] or (jnp.issubdtype(source, jnp.signedinteger) and bits[0] <= bits[1])


_ASSUMED = "assumed"   # a memo's entry: the carries assumed zero in its context


def _scan_input_value(w: _Walker, scope: tuple, var, root: int, depth: int, memo):
  """``_masked_value`` for an input of a scan's body (``var`` at ``scope``; None for any other
  input): a slice of ``xs`` holds the stacked operand's value; a carry holds its initial value at
  every step by induction, where the body returns it with that value whenever it had it. That
  is checked with a memo of its own that assumes it (and the carries assumed around it), since
  the values on the way to it are pending in ``memo``; what it concludes joins ``memo`` only
  when it holds."""
  if not scope or var not in w.jaxpr_at[scope].invars:
    return None
  eqn = w.jaxpr_at[scope[:-1]].eqns[scope[-1]]
  if eqn.primitive.name != "scan":
    return None
  i = w.jaxpr_at[scope].invars.index(var)
  nc, nk = eqn.params["num_consts"], eqn.params["num_carry"]
  init = _masked_value(w, scope[:-1], eqn.invars[i], root, depth + 1, memo)
  if init is None or i >= nc + nk:     # xs (or not shown)
    return init
  assumed = {**memo.get(_ASSUMED, {}), (scope, var): init}
  fresh = {**assumed, _ASSUMED: assumed}
  back = _masked_value(w, scope, w.jaxpr_at[scope].outvars[i - nc], root, depth + 1, fresh)
  if back is None or not np.array_equal(back, init):
    return None
  del fresh[_ASSUMED]
  memo.update(fresh)
  return init


def _initial_states(w: _Walker, scope, var, producers, consumers) -> list:
  """The group's non-kernel parameters that a consumer contraction reads at the first step of
  a scan in place of the units' activations ``var`` (at ``scope``): a learned initial state
  (``h0``) that goes into the start of the carry the reader reads (as it is or through ops:
  ``relu(h) @ Wh``, ``ones @ h0``, ``where(first, h0, 0)``), or that the step reads itself
  (``where(t == 0, h0, h) @ Wh``), or that an unrolled loop's first step reads
  (``broadcast_to(h0, (B, H)) @ Wh``: a learned state, ``_makes_state``). The walk back from the reader stops at the activations
  themselves (a carry started from them is read as they are), at another layer's output (a
  contraction of the data), and at another loop; a carry the readers do not read (an LSTM's
  ``c0``) does not count."""
  candidates = {u.leaf: u for u in producers if u.kind != "kernel" and not u.computed}
  if not candidates or var is None:
    return []
  top = w.jaxpr_at[()].invars
  found = set()
  for u in consumers:
    con = next(iter(w.contractions_at(u.where)), None)
    if con is None or (not con.path[:-1] and con.stream_var in w.stream):
      continue        # a reader outside any loop body (but an unrolled RNN's first step)
    stack, seen = [(con.path[:-1], con.stream_var)], set()
    while stack:
      sc, v = stack.pop()
      if isinstance(v, jex.core.Literal) or (sc, v) in seen or (sc, v) == (scope, var):
        continue                                  # (the activations: what it should read)
      seen.add((sc, v))
      if not sc and v in top:
        found.add(top.index(v))                  # a parameter read at the first step
        continue
      jaxpr = w.jaxpr_at[sc]
      if sc and v in jaxpr.invars:               # a body's input: back to its call site (a
        eqn = w.jaxpr_at[sc[:-1]].eqns[sc[-1]]   # scan's carry: to its start)
        i = jaxpr.invars.index(v)
        off = 0 if eqn.primitive.name == "scan" else len(eqn.invars) - len(jaxpr.invars)
        stack.append((sc[:-1], eqn.invars[off + i]))
        continue
      eqn = next((e for e in jaxpr.eqns if v in e.outvars), None)
      if eqn is None or eqn.primitive.name in ("scan", "while") or (
          eqn.primitive.name in ("dot_general", "conv_general_dilated") and v in w.stream):
        continue                                 # another loop, or a layer applied to the data
      stack.extend((sc, x) for x in eqn.invars)  # (a product of params builds a start: ones @ h0)
  return [candidates[leaf] for leaf in sorted(found & set(candidates))]


def _incomplete_why(w: _Walker, leaf_paths, scope, var, joined, kernels, producers,
                    consumers=()) -> str:
  """Why a group's activations (``var``) are not what its consumers read, naming the params
  that act on its units after them (see ``TracedTarget.activations_incomplete_why``)."""
  if var is None:
    return "no kernel contraction makes its units, so there are no activations to compare"
  name = lambda leaf: units_lib.path_str(leaf_paths[leaf])
  parts = []
  initial = _initial_states(w, scope, var, producers, consumers)
  if initial:
    readers = [name(u.leaf) for u in consumers if _initial_states(w, scope, var, initial, [u])]
    params = ", ".join(dict.fromkeys(name(u.leaf) for u in initial))
    parts.append(f"its recurrent readers ({', '.join(dict.fromkeys(readers))}) read "
                 f"parameters of the group ({params}) "
                 "beside the activations (a learned initial state at the first step, or a "
                 "per-unit value added to what they read), so two units with equal activations "
                 "can pass on different values")
  if not joined:
    parts.append("its readers read it at different points (as in relu(h) @ W2 + "
                 "h @ W3), or a statistic that the tracer does not follow reads its units, "
                 "so no one value is what they all read")
  # What var depends on within one step: the kernels (their contractions) and the points where
  # the group's params meet the data that act before it.
  before = {path for path, _ in w._backward(scope, var, descend=True) if path is not None}
  late = [u for u in kernels if u.where not in before]
  depthwise, other = [], []
  for u in late:
    eqn = _eqn_at(w, u.where)
    if (eqn is not None and eqn.primitive.name == "conv_general_dilated"
        and eqn.params["feature_group_count"] > 1):
      depthwise.append(name(u.leaf))
    elif name(u.leaf) not in other:
      other.append(name(u.leaf))
  if depthwise:
    parts.append(f"a depthwise or grouped convolution ({', '.join(dict.fromkeys(depthwise))}:"
                 " feature_group_count > 1, each channel read by its own kernel) acts on its "
                 "units after the activations, so two channels with equal activations still "
                 "pass on different values")
  if other:
    parts.append(f"other kernels ({', '.join(other)}) act on its units after the activations "
                 "(a residual addition couples it with other layers, a gate scales it, or "
                 "layers scanned over stacked params share it)")
  kernel_leaves = {u.leaf for u in late}
  after = [name(u.leaf) for u in producers if u.leaf not in kernel_leaves
           and not w.acting_points(u.leaf) <= before]
  if after and late:
    parts.append(f"per-unit parameters ({', '.join(dict.fromkeys(after))}) also act after "
                 "them")
  elif after:
    parts.append(f"per-unit parameters of the group ({', '.join(dict.fromkeys(after))}) act "
                 "on its units after the activations (as b in tanh(h.mean(1) + b), or a "
                 "layer applied again to another input)")
  return "; ".join(parts) or ("other kernels or parameters act on its units after the "
                              "activations")


def _eqn_at(w: _Walker, path: tuple):
  """The equation at ``path`` (a scope and an index), or None."""
  jaxpr = w.jaxpr_at.get(path[:-1])
  return None if jaxpr is None or path[-1] >= len(jaxpr.eqns) else jaxpr.eqns[path[-1]]


def _resolve_concats(w: _Walker) -> None:
  """Which groups each concatenation holds, and at which offsets; what blocks a concatenation
  blocks its parts."""
  A = w.atoms
  for c, parts in w.concat.items():
    part_atoms = [[a for a in A.expand(p) if A.size[a] > 1] for p in parts]
    if c in A.refined or any(len(p) > 1 for p in part_atoms):
      # The concatenation's width is its parts' widths: with the parts blocked, no part of it
      # (a GroupNorm's norm groups over it, the rows a consumer reads of it) can shrink either.
      for a in [c] + [a for p in part_atoms for a in p]:
        A.block(a, "concatenated and then split (into norm groups, a channel shuffle's or a "
                "grouped convolution's groups), or concatenated along a flattened axis")
      continue
    entries, offset = [], 0
    for p, atoms in zip(parts, part_atoms):
      size = math.prod(A.size[a] for a in A.expand(p))
      # A piece one unit wide (an input channel, a ones column, a scalar head) is no group,
      # but it is kept as an entry: the offsets and the total width count it.
      entries.append((A.find((atoms or A.expand(p))[0]), offset, size))
      offset += size
    root = A.find(c)
    if root in w.concat_of and w.concat_of[root] != entries:
      for r, _, _ in entries + w.concat_of[root]:
        A.block(r, "tied to concatenations of different layouts")
    w.concat_of[root] = entries

  def flat(root, seen):
    """A concatenation's parts, with each part that is itself a concatenation (a DenseNet
    block's running feature map) replaced by its own parts, at their offsets."""
    out = []
    for part, offset, length in w.concat_of[root]:
      p = A.find(part)
      if p in w.concat_of and p not in seen:
        out.extend((q, offset + o, n) for q, o, n in flat(p, seen | {p}))
      else:
        out.append((part, offset, length))
    return out

  nested = {r: flat(r, {r}) for r in w.concat_of}
  # A part at several offsets of one concatenation (a GNN's h[senders] and h[receivers], CReLU's
  # relu(h) and relu(-h)): its group has a consumer slice at each offset; folds are refused
  # there (_AT_SEVERAL_OFFSETS).
  for entries in nested.values():
    roots = [A.find(q) for q, _, _ in entries]
    w.repeated_parts.update(r for r in roots if roots.count(r) > 1)
  w.concat_of = nested
  for root, entries in w.concat_of.items():
    for why in list(A.blocked[A.find(root)]):
      for part, _, _ in entries:
        A.block(part, why)


def _name(path: Path, axis: int, taken: Mapping[str, tuple]) -> str:
  """A group's name: the path of the layer that holds its first kernel (the leaf's path less
  its own key: ``Conv_0``, ``blocks/0``). Where another group of the same layer has that name,
  one made by another leaf is named after that leaf (``blocks/0/w2`` for a plain dict layer
  with two kernels ``w1`` and ``w2``), a second group of one leaf after its axis
  (``blocks/0:2``), a third of that axis ``blocks/0:2.3``. ``taken``: the names given so far,
  each to the path of its leaf."""
  leaf_path = tuple(path)
  path = [str(k) for k in path]
  if len(path) > 2 and path[-1] == "value":      # an nnx State: layer/kernel/value
    path = path[:-1]
  strip = lambda parts: parts[1:] if len(parts) > 1 and parts[0] == "params" else parts
  layer = list(path[:-1])
  # A top-level param of a linen module (self.param('w', ...): params/w) is its own layer.
  name = "/".join(strip(layer if layer and layer != ["params"] else list(path)))
  if name not in taken:
    return name
  full = "/".join(strip(list(path)))
  if taken[name] != leaf_path and full not in taken:
    return full
  # A third group of one axis (grouped-query attention's query kernel: kv group, query head
  # within it, feature) is named after its place among them: name:axis.3, ...
  base, n = f"{name}:{axis}", 2
  name = base
  while name in taken:
    n += 1
    name = f"{base}.{n}"
  return name


def _draws_random(jaxpr) -> bool:
  """Whether the program (or a call or scan inside it) draws random bits."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("random_bits", "threefry2x32"):
      return True
    inner = _body(eqn)
    if inner is not None and _draws_random(inner):
      return True
  return False


def _computed_role(u: _Use) -> str:
  """What a slice of a kernel computed from params is, in words (explain())."""
  if u.role == "consumer":
    return (f"the kernel it reads with is computed from it ({u.computed}), linear in its rows "
            "(or scaled by a sum over them, as a weight norm over its input axis: then merges "
            "are refused): removing or merging a unit removes or merges its rows; folds of a "
            "removed unit into the next bias are refused" + (
                "" if u.kind == "kernel" else "; its rows are not the units' outgoing weights, "
                "so weight_distinctiveness(source='outgoing') refuses the group"))
  if u.kind == "kernel":
    return (f"the kernel is this param times a scalar ({u.computed}): the units' incoming "
            "weights keep their angles and the order of their norms")
  return (f"a kernel is computed from it ({u.computed}), as a weight norm or a weight "
          "standardisation computes one, so its slices are not the units' incoming weights "
          "and the pruners from incoming weights (importance_prune, "
          "weight_distinctiveness(source='incoming')) do not read them, refusing a group with "
          "no other kernel slice; activations and outgoing weights work")


def _explain(w: _Walker, leaf_paths, leaves, sites, uses, reasons) -> tuple[str, ...]:
  A = w.atoms
  by_root = {s.root: s.name for s in sites}
  products = {s.root for s in sites if s.mutual is not None}
  lines = []
  for leaf, path in enumerate(leaf_paths):
    label = units_lib.path_str(path) if path is not None else f"leaf {leaf}"
    parts = []
    for axis, ax in enumerate(w.invar_atoms[leaf]):
      atoms = [a for a in A.expand(ax) if A.size[a] > 1]
      descs = []
      for a in atoms:
        r, u = A.find(a), uses.get((leaf, axis))
        if r in by_root and u.computed:
          descs.append(f"group {by_root[r]!r} ({u.role}, {u.kind}: {_computed_role(u)})")
        elif r in by_root:
          descs.append(f"group {by_root[r]!r} ({u.role}, {u.kind}"
                       + ("; its units are also read by a product of two activations or a sum "
                          "over them: q @ k.T, an RMSNorm)" if r in products else ")"))
        elif r in w.concat_of and all(p in by_root or n == 1 for p, _, n in w.concat_of[r]):
          descs.append("the concatenation of " + ", ".join(
              f"group {by_root[p]!r} [{o}:{o + n}]" if p in by_root else f"a fixed unit [{o}]"
              for p, o, n in w.concat_of[r]) + f" ({u.role}, {u.kind})")
        elif u is not None and u.role == "window":
          descs.append("a convolution window axis")
        else:
          why = "; ".join(dict.fromkeys(reasons.get(r, ["not a unit axis"])))
          descs.append(f"not prunable ({why})")
      if len(atoms) == 1:
        parts.append(f"axis {axis} -> {descs[0]}")
      elif atoms:
        split = " x ".join(str(A.size[a]) for a in atoms)
        parts.append(f"axis {axis} (read as {split}) -> " + ", ".join(
            f"[{A.size[a]}] {d}" for a, d in zip(atoms, descs)))
    lines.append(f"{label} {_shape(leaves[leaf])}: " + ("; ".join(parts) or "no axis of size > 1"))
  return tuple(lines)


def _sizes_from_inputs(an: _Analysis, leaves, known_sizes=None, traced=False) -> dict[int, int]:
  """Class sizes that make the traced program fit these inputs (params and arguments).

  ``known_sizes``: sizes already known by root (a compacted target's groups), which pin the axes
  that a group only shares with other factors of one leaf axis (GroupNorm's groups x channels).
  ``traced``: ``known_sizes`` are the traced sizes (an uncompacted target pins its params' axes
  to them), which a mismatch names as such."""
  A = an.walker.atoms
  eqs = []
  for i, (ax_list, leaf) in enumerate(zip(an.walker.invar_atoms, leaves)):
    shape = _shape(leaf)
    if len(shape) != len(ax_list):
      raise ValueError(f"{_leaf_name(an, i)} has shape {shape} but the traced function took "
                       f"rank {len(ax_list)} there. Pass params of this target (or of its "
                       "compact()) and inputs shaped like the example's.")
    for d, (ax, n) in enumerate(zip(ax_list, shape)):
      eqs.append(([A.find(a) for a in A.expand(ax)], int(n), (i, d)))
  known: dict[int, int] = dict(known_sizes or {})
  source: dict[int, tuple] = {}     # root -> the (leaf, axis) its size was read from
  progress = True
  while progress:
    progress = False
    for roots, n, where in eqs:
      unknown = {r for r in roots if r not in known}
      if len(unknown) == 1:
        r = unknown.pop()
        prod = math.prod(known[x] for x in roots if x in known)
        if roots.count(r) == 1 and prod and n % prod == 0:
          known[r] = n // prod
          source[r] = where
          progress = True
  for root, parts in an.walker.concat_of.items():
    total = sum(known.get(p, A.size[p]) for p, _, _ in parts)
    if root not in known:
      known[root] = total
    elif known[root] != total:
      raise ValueError(f"These params do not fit the traced computation: a layer reads "
                       f"{known[root]} concatenated units but its parts have {total}. Compact "
                       "every group with target.compact so that readers and parts agree.")
  size = lambda r: known.get(r, A.size[r])
  for roots, n, (i, d) in eqs:
    want = math.prod(size(r) for r in roots)
    if want != n:
      read = [source[r] for r in roots if r in source and source[r][0] != i]
      if read:
        why = (f", the size that {_leaf_name(an, read[0][0])} axis {read[0][1]} gives the same "
               "axis of the computation")
      elif not traced and any(r in (known_sizes or {}) for r in roots):
        why = ", this compacted target's size (pass the params compact() returned with it)"
      else:
        why = ", as traced"
      example = " (the example's shape: compact() keeps it)" if i >= an.num_params else ""
      raise ValueError(
          f"These params/inputs do not fit the traced computation: {_leaf_name(an, i)}"
          f"{example} has size {n} on axis {d}, where the computation needs {want}{why}. Pass "
          "params of this target (or of its compact()) and inputs shaped like the example's "
          "(any batch size), or trace again with these params.")
  return known


def _leaf_name(an: "_Analysis", i: int) -> str:
  """Leaf ``i`` of (params, inputs) as a user reads it: ``params['Dense_0']['kernel']`` or
  ``input 0``."""
  if i >= an.num_params:
    return f"input {i - an.num_params}"
  path = an.leaf_paths[i]
  return "params" + ("".join(f"[{k!r}]" for k in path) if path is not None else f" leaf {i}")


def _new_shape(A: _Atoms, sizes: dict, axes) -> tuple[int, ...]:
  return tuple(math.prod(sizes.get(A.find(a), A.size[a]) for a in A.expand(ax)) for ax in axes)


def _holds_program(value) -> bool:
  """True for a (closed) jaxpr that reads arrays, or a tuple or list holding one (``cond``'s
  branches). A body over scalars alone (a scatter's ``update_jaxpr``, the combining function of
  a generic ``reduce_window`` or ``lax.reduce``) has no shapes to keep."""
  if isinstance(value, (tuple, list)):
    return any(_holds_program(v) for v in value)
  if isinstance(value, jex.core.ClosedJaxpr):
    value = value.jaxpr
  return isinstance(value, jex.core.Jaxpr) and any(
      getattr(v.aval, "shape", ()) != () for v in value.invars)


def _check_unfollowed_shapes(eqn, invals) -> None:
  """A sub-program that :func:`trace` does not follow (``while_loop``, ``cond``) keeps the
  shapes it was traced with; a clear error instead of XLA's when they changed."""
  if not any(_holds_program(v) for v in eqn.params.values()):
    return
  got = [tuple(np.shape(a)) for a in invals]
  want = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
  if got != want:
    raise TraceError(
        f"The traced function calls {eqn.primitive.name} (a while_loop or cond), whose body "
        f"jaxprune.trace does not follow, so it keeps the shapes it was "
        f"traced with: {want}, here {got}. This target runs only at the example's batch size "
        "and uncompacted sizes around that call: pass inputs of the example's batch size, or "
        "keep the loop out of the traced forward pass (unroll it in Python).")


def _raise_mismatch(eqn, invals, error):
  """An op that fails at the new sizes: one of its inputs kept a size of the example (made
  without reading the inputs, like a dropout mask drawn from a fixed key); a TraceError that
  says so, instead of the op's own message."""
  got = [tuple(np.shape(a)) for a in invals]
  want = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
  if got == want:
    raise error
  raise TraceError(
      f"{eqn.primitive.name} was traced with inputs of shapes {want} and gets {got} here: one "
      "of them kept the example's size because it was made without reading the inputs (a "
      "dropout mask drawn from a fixed key, an array of the batch size made with jnp.zeros), "
      "so this target runs only at the example's batch size and unpruned sizes there. Make "
      "such arrays from the input's shape (x.shape[0]), leave dropout out of the traced "
      f"function (deterministic=True), or pass inputs of the example's size. ({error})"
  ) from error


def _only_empty_uses(jaxpr, v) -> bool:
  """Whether ``v`` is used in ``jaxpr`` only to make arrays with no entries (and is not one of
  its outputs): jnp.pad's 'edge' mode slices the first and last entry of every axis, the
  batch's and the units' too, and broadcasts the ones it does not pad to width 0."""
  if any(v is o for o in jaxpr.outvars):
    return False
  uses = [e for e in jaxpr.eqns if any(v is w for w in e.invars)]
  return bool(uses) and all(any(0 in tuple(getattr(o.aval, "shape", ())) for o in u.outvars)
                            for u in uses)


def _raise_partial_slice(eqn, d: int, was: int, now: int):
  """A slice that took part of an axis whose size changed (``h[1:] - h[:-1]`` or
  ``jnp.roll`` along the batch): its bounds were traced as numbers, so whether they count from
  the start or from the end is lost, and re-running them at the new size would give rows of
  the traced count silently."""
  raise TraceError(
      f"The traced function slices axis {d} (of size {was} when traced, {now} here) in part, "
      f"with bounds {eqn.params['start_indices'][d]}:{eqn.params['limit_indices'][d]} fixed "
      "when traced (e.g. h[1:] - h[:-1] or jnp.roll along the batch), so it cannot be re-run "
      "at another size of that axis. Pass inputs of the example's batch size to this target.")


def _check_not_broadcast(eqn, operand, shape) -> None:
  """An axis that was not broadcast when traced must not be broadcast now: that happens when
  the tracer lost a size (an op it does not follow) and rebuilt it at the traced size."""
  was_in, was_out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
  now_in = np.shape(operand)
  for k, d in enumerate(eqn.params["broadcast_dimensions"]):
    if was_in[k] == was_out[d] and now_in[k] != shape[d]:
      raise TraceError(
          f"An axis of size {now_in[k]} (traced at {was_in[k]}) reaches a broadcast to the "
          f"traced size {was_out[d]}: the size was lost through an op the tracer does not "
          "follow (see target.explain()), so this target runs only at the example's sizes "
          "there. Pass inputs of the example's batch size.")


def _batch_axes(w: _Walker, num_params: int, jaxpr) -> tuple[tuple, bool]:
  """Per argument leaf, its batch axes: those tied to the first output's leading axis (a
  time-major RNN's input (T, B, F) has its batch on axis 1); axis 0 where none is. And whether
  that leading axis is a parameter's axis (the classes of an output laid out (classes, N)): its
  size is then known, whatever it was when traced, so it is not rows made from the batch size
  as a number."""
  A = w.atoms
  out = w.env.get(jaxpr.outvars[0]) if jaxpr.outvars and not isinstance(
      jaxpr.outvars[0], jex.core.Literal) else None
  roots = lambda atoms: {A.find(a) for a in A.expand(atoms)}
  batch = roots(out[0]) if out else set()
  axes = []
  for ax in w.invar_atoms[num_params:]:
    tied = tuple(d for d, atoms in enumerate(ax) if roots(atoms) & batch)
    axes.append(tied or ((0,) if ax else ()))
  params = set().union(*(roots(ax) for leaf in w.invar_atoms[:num_params] for ax in leaf))
  return tuple(axes), bool(batch) and batch <= params


def _check_batch_reaches_outputs(w: _Walker, num_params: int, jaxpr) -> None:
  """Raises ValueError when every axis of every input is a parameter's axis (contracted with
  a kernel) and none reaches an axis of the outputs (some output having axes): no input holds
  a batch. The example was one sample without its batch axis (``x[0]``), whose features the
  first kernel reads as if they were the batch. (An input shared by the batch, such as a
  normalisation's mean, passes beside a batched one; a batch axis that an op resizes or
  reduces, a padding or a loop, is not a parameter's axis, and passes too.)"""
  A = w.atoms
  roots = lambda atoms: {A.find(a) for a in A.expand(atoms)}
  outs = [w.env.get(v) for v in jaxpr.outvars if not isinstance(v, jex.core.Literal)]
  out_roots = set().union(*(roots(atoms) for ax in outs if ax for atoms in ax))
  axes = [atoms for leaf in w.invar_atoms[num_params:] for atoms in leaf]
  params = set().union(*(roots(atoms) for leaf in w.invar_atoms[:num_params] for atoms in leaf))
  if (not out_roots or not axes or any(roots(atoms) & out_roots for atoms in axes)
      or not all(roots(atoms) & params for atoms in axes)):
    return
  shapes = ", ".join(str(tuple(v.aval.shape)) for v in jaxpr.invars[num_params:])
  raise ValueError(
      f"The example inputs have shapes {shapes}, and no axis of theirs reaches the function's "
      "outputs (each is contracted with a parameter), so none holds a batch: they look like "
      "one sample without its batch axis. Trace with a batch of at least 2 samples, e.g. "
      "trace(fn, params, x[:2]) rather than x[0]; the batch is the input axis that the "
      "outputs keep.")


def _unit_axes(an: _Analysis, path: tuple) -> set:
  """The axes of a group's units that the reduce_sum at ``path`` sums over (a mean over the
  units, an RMSNorm's: pruned, they keep the traced width as the divisor, as masking does)."""
  w = an.walker
  if w.unit_axes_at is None:           # (worked out once per traced target)
    A, roots, parts = w.atoms, {s.root for s in an.sites}, w.concat_parts()
    w.unit_axes_at = {}
    for atoms, p, d in w.summed:       # (of a group, or a concatenation with one)
      if any(A.find(a) in roots or parts.get(A.find(a), set()) & roots
             for a in A.expand(atoms)):
        w.unit_axes_at.setdefault(p, set()).add(d)
  return w.unit_axes_at.get(path, set())


def _check_batch_mean(eqn, invals, users, unit_axes=frozenset()) -> None:
  """A sum over an axis whose size changed (other than ``unit_axes``), then scaled by a constant
  (``jnp.mean``, ``jnp.var``: batch statistics), keeps dividing by the traced size: an error
  instead of a wrong value. (Sums, maxima, cumulative sums over the batch are right at any
  batch size.)"""
  was, now = eqn.invars[0].aval.shape, np.shape(invals[0])
  changed = [d for d in eqn.params["axes"] if was[d] != now[d] and d not in unit_axes]
  if not changed:
    return
  v = eqn.outvars[0]
  for _ in range(8):                  # through the broadcasts and conversions before the scaling
    uses = [u for _, u in users.get(v, [])]
    if any(u.primitive.name in ("div", "mul") and any(isinstance(w, jex.core.Literal)
                                                      for w in u.invars) for u in uses):
      raise TraceError(
          f"The traced function averages over an axis of size {was[changed[0]]} when traced, "
          f"here {now[changed[0]]} (a mean over the batch: batch statistics, e.g. BatchNorm in "
          "training mode), and would keep dividing by the traced size. Pass inputs of the "
          "example's batch size to this target, or trace the model in inference mode.")
    if len(uses) != 1 or uses[0].primitive.name not in (
        "convert_element_type", "broadcast_in_dim", "reshape", "squeeze", "expand_dims"):
      return
    v = uses[0].outvars[0]


def _evaluate(an: _Analysis, sizes: dict, leaves, capture: frozenset = frozenset()):
  """Runs the traced program on ``leaves`` with every shape recomputed from ``sizes``."""
  A = an.walker.atoms
  captured = {}

  def run(jaxpr, consts, args, scope):
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    read = lambda v: v.val if isinstance(v, jex.core.Literal) else env[v]
    for k, eqn in enumerate(jaxpr.eqns):
      path = scope + (k,)
      invals = [read(v) for v in eqn.invars]
      name = eqn.primitive.name
      inner, consts = _call_body(eqn)
      if inner is not None:
        outs = run(inner, consts, invals[len(invals) - len(inner.invars):], path)
      elif name == "scan":
        outs = scan(eqn, invals, path)
      else:
        _check_unfollowed_shapes(eqn, invals)
        if name == "reduce_sum":
          _check_batch_mean(eqn, invals, an.walker.users, _unit_axes(an, path))
        params = dict(eqn.params)
        if name in ("broadcast_in_dim", "iota"):
          params["shape"] = _new_shape(A, sizes, an.walker.shapes[path][0])
          if name == "broadcast_in_dim":
            _check_not_broadcast(eqn, invals[0], params["shape"])
        elif name == "reshape":
          params["new_sizes"] = _new_shape(A, sizes, an.walker.shapes[path][0])
        elif name == "tile":        # a tile of size-1 axes: repeated to the new output's sizes
          new, now = _new_shape(A, sizes, an.walker.shapes[path][0]), np.shape(invals[0])
          params["reps"] = tuple(m // n if n and m % n == 0 else r
                                 for m, n, r in zip(new, now, params["reps"]))
        elif name in ("slice", "dynamic_slice"):
          # An axis taken whole when traced (x[:, -1] keeps the batch and the units) is taken
          # whole at the new sizes.
          was, now = eqn.invars[0].aval.shape, np.shape(invals[0])
          if name == "slice":
            whole = [s0 == 0 and l0 == n and (params.get("strides") is None
                                              or params["strides"][d] == 1)
                     for d, (s0, l0, n) in enumerate(zip(params["start_indices"],
                                                         params["limit_indices"], was))]
            params["limit_indices"] = tuple(now[d] if w else l0 for d, (w, l0) in enumerate(
                zip(whole, params["limit_indices"])))
            # One of equal parts of the units' axis (h[:, H:]): the same part of the new axis.
            new = _new_shape(A, sizes, an.walker.shapes[path][0])
            starts, limits = list(params["start_indices"]), list(params["limit_indices"])
            for d, (s0, n) in enumerate(zip(starts, eqn.outvars[0].aval.shape)):
              if not whole[d] and new[d] != n and was[d] % n == 0 and s0 % n == 0:
                starts[d], limits[d] = s0 // n * new[d], (s0 // n + 1) * new[d]
              elif not whole[d] and now[d] != was[d]:
                if not _only_empty_uses(jaxpr, eqn.outvars[0]):
                  _raise_partial_slice(eqn, d, was[d], now[d])
                starts[d], limits[d] = 0, min(limits[d] - starts[d], now[d])  # unused rows
            params["start_indices"], params["limit_indices"] = tuple(starts), tuple(limits)
          else:
            params["slice_sizes"] = tuple(now[d] if sz == was[d] else sz
                                          for d, sz in enumerate(params["slice_sizes"]))
        elif name == "split":       # equal parts (of the units, of the batch) stay equal parts
          d, k = params["axis"], len(params["sizes"])
          now = np.shape(invals[0])[d]
          if len(set(params["sizes"])) == 1 and now % k == 0:
            params["sizes"] = (now // k,) * k
        elif name == "gather":      # likewise an operand axis gathered whole (see _gather)
          was, now = eqn.invars[0].aval.shape, np.shape(invals[0])
          params["slice_sizes"] = tuple(now[d] if sz == was[d] else sz
                                        for d, sz in enumerate(params["slice_sizes"]))
        elif name == "conv_general_dilated" and params["feature_group_count"] > 1:
          dn = params["dimension_numbers"]
          per = np.shape(invals[1])[dn.rhs_spec[1]]
          params["feature_group_count"] = np.shape(invals[0])[dn.lhs_spec[1]] // per
        try:
          outs = eqn.primitive.bind(*invals, **params)
        except (TypeError, ValueError) as e:
          _raise_mismatch(eqn, invals, e)
        if not eqn.primitive.multiple_results:
          outs = [outs]
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
        if (scope, v) in capture:
          captured[(scope, v)] = o
    return [read(v) for v in jaxpr.outvars]

  def scan(eqn, invals, path):
    """``lax.scan`` of the body re-evaluated at the new sizes; values captured inside the body
    come out stacked along the scanned axis, like its ``ys``."""
    p, closed = eqn.params, eqn.params["jaxpr"]
    nc, nk = p["num_consts"], p["num_carry"]
    consts, init, xs = invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
    inside = [key for key in capture if key[0][:len(path)] == path]

    def body(carry, x):
      outs = run(closed.jaxpr, closed.consts, list(consts) + list(carry) + list(x), path)
      return list(outs[:nk]), (list(outs[nk:]), [captured.pop(key) for key in inside])

    carry, (ys, stacked) = lax.scan(body, list(init), list(xs),
                                    length=None if xs else p["length"], reverse=p["reverse"],
                                    unroll=p["unroll"])
    captured.update(zip(inside, stacked))
    return list(carry) + list(ys)

  outs = run(an.closed.jaxpr, an.closed.consts, list(leaves), ())
  return outs, captured


class TracedTarget:
  """A pruning target made by :func:`trace`: ``groups``, ``apply``, ``activations``,
  ``compact``, ``readout`` and ``explain``.

  Instances compare and hash by identity, so jitted functions and caches keyed on a target work.
  """

  task = "classification"

  def __init__(self, analysis: _Analysis, sizes: dict, fn: Callable | None,
               group_sizes: Mapping[int, int] | None = None):
    self._an = analysis
    self._sizes = sizes
    # Sizes of the compacted groups (by root): they pin axes that the leaves alone leave open
    # (GroupNorm's channels per group, a factor of one leaf axis with the group).
    self._group_sizes = dict(group_sizes or {})
    self._fn = fn
    self._module_params = False   # traced with an nnx module as its params (set by trace)
    # An uncompacted target runs ``fn`` itself, which may accept params and inputs of other
    # sizes: its params' axes are pinned to the traced sizes, checked on the host (by shapes,
    # once per set of shapes) before ``fn`` runs, as the compacted target's program checks them.
    A = analysis.walker.atoms
    self._traced_sizes = {} if fn is None else {
        A.find(a): A.size[A.find(a)] for ax in analysis.walker.invar_atoms[:analysis.num_params]
        for atoms in ax for a in A.expand(atoms)}
    self._fitting_shapes: set = set()
    self._eval = jax.jit(self._eval_leaves, static_argnums=(0,))
    # activations(): the capture with its units moved last, in one program per group and shapes
    self._acts = jax.jit(self._activation_leaves, static_argnums=(0,))
    self._groups = self._make_groups()

  # -- the pruning-target interface --------------------------------------------------------------
  @property
  def groups(self) -> dict[str, units_lib.UnitGroup]:
    """The prunable unit groups, by name, in program order."""
    return dict(self._groups)

  def apply(self, params: PyTree, *args) -> Any:
    """The traced function on ``params`` (this target's sizes) and inputs (any batch size)."""
    if self._fn is not None:
      self._leaves(params, args)     # host-side shape checks only: fn runs the user's code
      if _is_nnx_module(params) and not self._module_params:
        raise TypeError(_MODULE_AS_STATE)
      return self._fn(params, *args)
    leaves = self._flat(params, args)
    outs, _ = self._eval(frozenset(), *leaves)
    self._check_batch_followed(leaves[self._an.num_params:], outs)
    return jax.tree.unflatten(self._an.out_treedef, outs)

  def _check_batch_followed(self, args, outs) -> None:
    """At another batch size, the first output's leading axis (the batch when traced) must
    follow it: one that keeps the traced size was made from the batch size as a number
    (``num_segments=x.shape[0]``, ``jnp.zeros((n, ...))`` with ``n`` read from a shape), and
    would give rows of the traced count, silently. A leading axis that is a param's (the
    classes of a ``(classes, N)`` output) has its own size and is not checked."""
    an = self._an
    traced = an.closed.out_avals[0].shape if an.closed.out_avals else ()
    if not outs or not traced or not np.shape(outs[0]) or an.lead_of_params:
      return
    for i, x in enumerate(args):
      for d in (an.arg_batch[i] if an.arg_batch else ()):
        was, now = an.arg_shapes[i][d], np.shape(x)[d]
        if was != now and traced[0] == was and np.shape(outs[0])[0] == was:
          raise TraceError(
              f"At a batch of {now} (input {i}, axis {d}; traced with {was}) the function's "
              f"first output keeps {was} rows: it was made from the batch size as a number "
              "(num_segments=x.shape[0], an array of x.shape[0] rows made apart from x, in your "
              "code or inside a layer: flax's nn.RNN with seq_lengths indexes with "
              "jnp.arange(batch)), which is a constant of the traced program. Pass inputs of "
              "the example's batch size to this target, or trace it again at this size.")

  def check_input(self, x) -> None:
    """Raises ValueError unless ``x`` is shaped like the example's first input (any batch)."""
    if self._an.arg_shapes:
      self._check_arg_shape(0, x)

  def _check_arg_shape(self, i: int, x) -> None:
    """Argument leaf ``i`` must have the example's shape except on its batch axes: sizes the
    program was traced with (a sequence length, an image size) are constants of it."""
    want, got = tuple(self._an.arg_shapes[i]), tuple(np.shape(x))
    batch = self._an.arg_batch[i] if self._an.arg_batch else (0,)
    if len(got) != len(want) or any(g != n for d, (g, n) in enumerate(zip(got, want))
                                    if d not in batch):
      like = ", ".join("N" if d in batch else str(n) for d, n in enumerate(want))
      axes = " and ".join(str(d) for d in batch) or "none"
      raise ValueError(
          f"Input {i} has shape {got}; this traced target takes inputs shaped ({like}) like its "
          "example: only the batch may change (sizes the program was traced with, such as a "
          "sequence length or an image size, are constants of it). Trace again with an example "
          f"of this shape. (The batch was read as axis {axes} of this input: the input axis "
          "that becomes the leading axis of the function's first output, else axis 0; a "
          "function whose outputs put the batch last, like W @ x with x of shape (features, N), "
          "runs at the example's batch size only.)")

  def activations(self, params: PyTree, *args_and_name) -> jax.Array:
    """``activations(params, *args, name)``: a group's activations, units on the last axis.

    The value is the end of the chain of elementwise ops after the group's first kernel (a
    param, or a kernel computed from params such as a weight norm's) (after bias,
    normalisation and the nonlinearity, also through reshapes that keep the units on an axis
    of their own; before pooling or the next layer).

    Raises:
      ValueError: no kernel contraction makes the group's units (per-unit params alone do).
    """
    *args, name = args_and_name
    if not isinstance(name, str):
      raise TypeError(f"activations(params, *inputs, name): the last argument must be the name "
                      f"of a group ({sorted(self._groups)}), got a {type(name).__name__}.")
    site = self._site(name)
    if site.act_var is None and any(s.role == "producer" and s.kind == "kernel"
                                    for s in self._groups[name].slices):
      raise ValueError(
          f"Group {name!r} has no activations that trace can capture: its units are looked up "
          "in a parameter table (nn.Embed, jnp.take of a param), not made by a kernel "
          "contraction, so there is no value after a kernel to compare. Prune it from its "
          f"weights: importance_prune(target, {name!r}), weight_distinctiveness(target, "
          f"{name!r}) (the table's columns are its incoming weights, source='outgoing' the "
          "next layer's rows), or magnitude_prune.")
    if site.act_var is None:
      raise ValueError(
          f"Group {name!r} has no activations that trace can capture: activations are taken "
          "where the elementwise ops after a group's kernel end, and no kernel contraction, "
          "read as a param or computed from params, makes its units (per-unit parameters "
          "alone do, as in tanh(x.sum(1, keepdims=True) * a + b); see target.explain()). "
          f"Prune it from its outgoing weights (weight_distinctiveness(target, {name!r}, "
          "source='outgoing')) or with magnitude_prune.")
    return self._acts(name, *self._flat(params, tuple(args)))

  def compact(self, params: PyTree, unit_masks: Mapping[str, Any]) -> tuple[PyTree, "TracedTarget"]:
    """Removes masked units: ``(smaller params, the target that runs them)``; the small target's
    outputs equal the masked network's to float tolerance."""
    small = units_lib.compact(params, self._groups, unit_masks)
    leaves = jax.tree.leaves(small) + [jax.ShapeDtypeStruct(s, jnp.float32)
                                       for s in self._an.arg_shapes]
    A = self._an.walker.atoms
    kept = {**self._group_sizes, **{A.find(self._site(name).root): int(np.sum(np.asarray(m)))
                                    for name, m in unit_masks.items() if name in self._groups}}
    return small, TracedTarget(self._an, _sizes_from_inputs(self._an, leaves, kept), None, kept)

  def readout(self, name: str) -> units_lib.Slice | None:
    """The group's consumer slice when its only reader is the affine map to the output and reads
    exactly the group's activations (the GA's one-product fast path applies); else None."""
    site = self._site(name)
    if not site.readout:
      return None
    s = self._groups[name].consumers[0]
    # (more than the recorded bias is added: no bias recorded here, so the GA reads what the
    # function adds, jaxprune.ga.fitness.readout_bias)
    return dataclasses.replace(s, bias=None) if site.readout_extra else s

  def explain(self) -> str:
    """One line per parameter leaf: the group and role of each axis, or why it has none."""
    return "\n".join(self._an.explain_lines)

  def __repr__(self):
    return (f"TracedTarget(groups={ {k: g.size for k, g in self._groups.items()} })")

  # -- internals --------------------------------------------------------------------------------
  def activations_complete(self, name: str) -> bool:
    """Whether ``activations(..., name)`` is what the group's consumers read: False when other
    kernels add into the units after it (a residual addition couples the group; an LSTM's
    output mixes four gates), when readers read the units at different points
    (``relu(h) @ W2 + h @ W3``), or when a parameter of the group acts after it (a per-unit
    shift after a mean over time; a layer applied again, ``f(x1) @ W2 + f(x2) @ W3``). Pruners
    from activations
    refuse such a group."""
    return self._site(name).complete

  def activations_incomplete_why(self, name: str) -> str | None:
    """Why ``activations(..., name)`` is not what the group's consumers read, naming the params
    that act on its units after the activations (a depthwise conv's kernel, the other layers
    of a residual sum, a late per-unit shift); None when it is (``activations_complete``)."""
    site = self._site(name)
    if site.complete:
      return None
    an = self._an
    if site.mutual is None:
      return _incomplete_why(an.walker, an.leaf_paths, site.scope, site.act_var,
                             *site.incomplete)
    eqn = _eqn_at(an.walker, site.mutual)
    shapes = " and ".join(str(v.aval.shape) for v in eqn.invars[:2])
    if eqn.primitive.name == "reduce_sum" and eqn.invars[0] not in an.walker.stream:
      read = (f"summed over by a statistic of a kernel normalised over its rows (a weight norm; "
              f"here reduce_sum of {shapes}): a unit's row adds its squares there")
    elif eqn.primitive.name == "reduce_sum":
      read = (f"summed over by a statistic of each example (an RMSNorm's or an L2 norm's sum of "
              f"squares, a mean; here reduce_sum of {shapes}): a unit's term there is its own "
              "value or its square")
    else:
      read = (f"contracted between two activations (as q @ k.T; here {shapes}): a unit's term "
              "there is the product of its values on the two sides")
    return (f"its units are {read}, so two units of equal activations cannot be merged into one "
            "and no activations are what that statistic or product reads; prune it by removing "
            "units (importance_prune, magnitude_prune, ga.search)")

  def _site(self, name):
    for s in self._an.sites:
      if s.name == name:
        return s
    raise KeyError(f"Unknown unit group {name!r}; this target's groups are "
                   f"{list(self._groups)}.")

  def _flat(self, params, args):
    return self._check_dtypes(self._leaves(params, args))

  def _leaves(self, params, args):
    """The leaves of (params, args), checked by shape: their number, the inputs' non-batch axes
    and, on an uncompacted target, the params' sizes against the traced ones."""
    leaves = jax.tree.leaves((params, args))
    an = self._an
    n = an.num_params + len(an.arg_shapes)
    if len(leaves) != n:
      raise ValueError(f"Expected params and inputs with {n} array leaves in all (as in the "
                       f"traced example), got {len(leaves)}.")
    for i, leaf in enumerate(leaves[an.num_params:]):
      self._check_arg_shape(i, leaf)
    if self._fn is not None:
      # The params only (the inputs' batch is fn's to handle: a per-pattern param tied to the
      # traced batch still broadcasts against a batch of one, as fn does).
      shapes = tuple(_shape(leaf) for leaf in leaves[:an.num_params])
      if shapes not in self._fitting_shapes:
        _sizes_from_inputs(an, leaves[:an.num_params], self._traced_sizes, traced=True)
        self._fitting_shapes.add(shapes)
    return leaves

  def _check_dtypes(self, leaves):
    """The traced program runs at the example's dtypes. A params leaf of another dtype (bf16
    params on a float32 trace) is refused by name; an input of another numeric dtype is cast
    to the traced one when that is floating (as ``x @ w`` would promote it), else refused."""
    an, out = self._an, list(leaves)
    for i, (leaf, var) in enumerate(zip(leaves, an.closed.jaxpr.invars)):
      want = var.aval.dtype
      have = getattr(leaf, "dtype", None)
      if jax.dtypes.issubdtype(want, jax.dtypes.extended) or (
          have is not None and jax.dtypes.issubdtype(have, jax.dtypes.extended)):
        continue   # typed PRNG keys: their own errors
      have = jax.dtypes.canonicalize_dtype(have if have is not None else np.result_type(leaf))
      if have == want:
        continue
      if i >= an.num_params and jnp.issubdtype(want, jnp.floating) and (
          jnp.issubdtype(have, jnp.number) or have == jnp.bool_):
        out[i] = jnp.asarray(leaf, want)
        continue
      fix = ("trace again with params of this dtype (jaxprune.trace(fn, params, *example_inputs)), "
             f"or cast them: jax.tree.map(lambda a: a.astype(jnp.{want}), params)"
             if i < an.num_params else f"pass {want} inputs, as traced")
      raise TypeError(f"{_leaf_name(an, i)} is {have} but this target was traced with {want} "
                      f"there, and runs the traced program at its dtypes: {fix}.")
    return out

  def _eval_leaves(self, capture, *leaves):
    sizes = _sizes_from_inputs(self._an, leaves, self._group_sizes)
    return _evaluate(self._an, sizes, leaves, capture)

  def _activation_leaves(self, name, *leaves):
    site = self._site(name)
    key = (site.scope, site.act_var)
    _, cap = self._eval_leaves(frozenset({key}), *leaves)
    return self._units_last(cap[key], site, leaves)

  def _size(self, root):
    return self._sizes.get(root, self._an.walker.atoms.size[root])

  def _units_last(self, value, site, leaves):
    A = self._an.walker.atoms
    # As apply() and compact(): a compacted group's size pins the axes it shares with other
    # factors of one leaf axis (GroupNorm's groups x channels per group).
    sizes = _sizes_from_inputs(self._an, leaves, self._group_sizes)
    # Inside a scan body the value comes stacked over the scanned steps: leading axes.
    shape = np.shape(value)
    lead = tuple(shape[:len(shape) - len(site.act_axes)])
    # Only the axis that holds the units is split into its atoms (a flattened (positions,
    # channels) axis, GroupNorm's (groups, channels per group)); every other axis keeps the
    # size the value has (a Mixer's tokens stay one axis, not the patch grid they came from).
    dims, unit_dim = [], None
    for d, ax in enumerate(site.act_axes):
      atoms = A.expand(ax)
      roots = [A.find(a) for a in atoms]
      if site.root not in roots:
        dims.append(shape[len(lead) + d])
        continue
      for a, r in zip(atoms, roots):
        if r == site.root:
          unit_dim = len(dims)
        dims.append(sizes.get(r, A.size[a]))
    return jnp.moveaxis(jnp.reshape(value, lead + tuple(dims)), len(lead) + unit_dim, -1)

  def _make_groups(self):
    an, w = self._an, self._an.walker
    A = w.atoms
    rank = {"kernel": 0, "scale": 1, "bias": 2, "shift": 2, "stat": 3}
    order = lambda u: (0 if u.role == "producer" else 1,
                       rank.get(u.kind, 4) if u.role == "producer" else 0, u.where, u.leaf, u.axis)
    # Each use's classes, worked out once, and the uses that hold each class (a deep network's
    # sites would otherwise each go through every use).
    uses = [u for u in sorted(an.uses.values(), key=order) if u.role != "window"]
    roots_of, uses_of = [], {}
    for i, use in enumerate(uses):
      roots = [A.find(a) for a in A.expand(w.invar_atoms[use.leaf][use.axis]) if A.size[a] > 1]
      roots_of.append(roots)
      for r in roots:
        uses_of.setdefault(r, set()).add(i)
    holders_of = {}                  # a part's class -> {concatenation's class: its entries}
    for r, parts in w.concat_of.items():
      for k, p in enumerate(parts):
        holders_of.setdefault(p[0], {}).setdefault(r, []).append(k)
    groups = {}
    for site in an.sites:
      slices = []
      holders = holders_of.get(site.root, {})
      found = set(uses_of.get(site.root, ())).union(*(uses_of.get(r, ()) for r in holders))
      for i in sorted(found):
        use, roots = uses[i], roots_of[i]
        # Every place the units sit on this leaf axis: a layer read on two axes of one
        # flattened product (h[:, :, None] * h[:, None, :], flattened) owns a slice at each.
        places = [pos for pos, r in enumerate(roots) if r == site.root or r in holders]
        twice = self._read_twice(site, holders, use)
        for pos in places:        # (a part at several offsets of a concatenation: each)
          for k in holders.get(roots[pos], [None]):
            slices.append(self._slice(site, use, roots, pos, twice, k))
      groups[site.name] = units_lib.UnitGroup(site.name, self._size(site.root), tuple(slices),
                                              activation=site.activation, kind=site.kind,
                                              act_of_bias=site.plain,
                                              read_by_products=site.mutual is not None)
    return groups

  def _read_twice(self, site, holders, use) -> bool:
    """Whether ``use``'s leaf reads the group's units at more than one place (two atoms of one
    axis, or two axes: the kernel of ``einsum('bi,bj,ijk->bk', h, h, W)``)."""
    if use.role != "consumer":
      return False
    an, w = self._an, self._an.walker
    A = w.atoms
    count = sum(1 for d, ax in enumerate(w.invar_atoms[use.leaf])
                if an.uses.get((use.leaf, d)) is not None
                and an.uses[(use.leaf, d)].role == "consumer"
                for a in A.expand(ax)
                if A.size[a] > 1 and (A.find(a) == site.root or A.find(a) in holders))
    return count > 1

  def _slice(self, site, use, roots, pos, twice, part=None) -> units_lib.Slice:
    """The slice of ``use``'s leaf that holds the group's units at atom ``pos`` of its axis
    (``roots``: the class of each atom of the axis), at entry ``part`` of the concatenation
    that atom is, if it is one."""
    an, w = self._an, self._an.walker
    A = w.atoms
    segment, unit_root = None, roots[pos]
    if unit_root != site.root:                   # a part of a concatenation
      parts = w.concat_of[unit_root]
      segment = (sum(self._size(p[0]) for p in parts[:part]), self._size(site.root))
    view, axis = None, use.axis
    if len(roots) > 1:
      sizes = [self._size(r) for r in roots]
      leaf_shape = list(_new_shape(A, self._sizes, w.invar_atoms[use.leaf]))
      before, after = sizes[:pos], sizes[pos + 1:]
      parts = ([math.prod(before)] if before else []) + [sizes[pos]] + (
          [math.prod(after)] if after else [])
      view = tuple(leaf_shape[:use.axis] + parts + leaf_shape[use.axis + 1:])
      axis = use.axis + (1 if before else 0)
    bias, why, out_axes, max_pooled = None, "", None, False
    if use.role == "consumer":
      con = w.contractions_at(use.where)[0]
      bias, why = self._consumer_bias(con), con.padded_why
      if not why and site.mutual is not None:
        why = _MUTUAL
      if not why and con.computed:
        why = _computed_reader_why(con.computed)
      if con.computed and use.leaf != con.kernel:   # (a LoRA factor's rows: no outputs there)
        bias = None
      out_axes = self._bias_ordered(con)
      # A recurrent reader sees the initial state at the first step, not the units' values:
      # a constant unit's contribution does not fold into its bias exactly either.
      if not why and w.reads_carry(con.path[:-1], con.stream_var, site.root):
        why = _RECURRENCE
      # So does an unrolled one: its first product reads a state made without the data.
      if not why and con.stream_var not in w.stream:
        why = _RECURRENCE
      # A reader of products of units (each unit at two places): a constant unit's rows
      # still read the other units.
      if not why and twice:
        why = _READ_TWICE
      if not why and site.root in w.repeated_parts and unit_root != site.root:
        why = _AT_SEVERAL_OFFSETS
      # What it reads must carry a constant unit as that constant (not a sum of it), and
      # for linear folds a linear combination of units as that combination (not a max).
      reads = ("ok" if site.act_var is None
               else w.reads(site.scope, site.act_var, con, site.root))
      if not why and reads not in ("ok", "max"):
        why = _CHANGES_CONSTANTS
      max_pooled = reads == "max"
      in_order = site.act_var is None or w.keeps_positions(site.scope, site.act_var, con)
    else:
      in_order = True
    return units_lib.Slice(an.leaf_paths[use.leaf], axis, use.role, view=view, bias=bias,
                           padded=bool(why), kind=use.kind, segment=segment,
                           out_axes=out_axes, max_pooled=max_pooled,
                           padded_why=why or None, positions_in_order=in_order)

  def _consumer_bias_leaf(self, con):
    """The params leaf added to the contraction's output, when it holds a value per output (an
    axis for each of the kernel's output axes longer than 1), so that a unit's per-output
    contribution can be folded into it; None otherwise (a scalar offset, or a bias shared
    across heads, cannot hold it)."""
    w = self._an.walker
    out = w.through_layout(con.out_var)
    for _ in range(4):   # through sums with other values first: (x + h @ W) + b, a residual
      users = w.users.get(out, [])
      if len(users) != 1 or users[0][1].primitive.name != "add":
        return None
      add = users[0][1]
      others = [v for v in add.invars if v is not out]
      if len(others) != 1 or isinstance(others[0], jex.core.Literal):
        return None
      v = others[0]
      if v in w.origin and v not in w.stream:
        leaf = w.origin[v][0]
        bias_keys = {self._atom_key(leaf, d) for d in range(len(w.invar_atoms[leaf]))}
        if all(not k or k in bias_keys
               for k in (self._atom_key(con.kernel, a) for a in con.out_axes)):
          return leaf
        return None
      if tuple(add.outvars[0].aval.shape) != tuple(out.aval.shape):
        return None      # a sum that broadcasts the output: no longer one value per output
      out = w.through_layout(add.outvars[0])
    return None

  def _atom_key(self, leaf, axis):
    """The atoms (longer than 1) of ``leaf``'s ``axis``: equal for axes of one extent."""
    w = self._an.walker
    A = w.atoms
    return tuple(A.find(a) for a in A.expand(w.invar_atoms[leaf][axis]) if A.size[a] > 1)

  def _consumer_bias(self, con):
    leaf = self._consumer_bias_leaf(con)
    return None if leaf is None else self._an.leaf_paths[leaf]

  def _bias_ordered(self, con):
    """The kernel's output axes in the order of its bias's axes (a vmapped ensemble's kernel
    (members, in, out) contracts to (members, batch, out) but a transposed layout may not), by
    matching their atoms; the contraction's output order when they do not all match. None when
    they are the kernel's last axes in order: what a declared slice leaves implicit (so traced
    and declared groups are equal, and equal groups fold the same way)."""
    axes = self._bias_order(con)
    rank = len(self._an.walker.invar_atoms[con.kernel])
    # () stays (): a vector readout has no output axis, and its kernel's last axis may be the
    # positions of a flattened map (``h.reshape(n, -1) @ w + b`` with a scalar b)
    return None if axes and axes == tuple(range(rank - len(axes), rank)) else axes

  def _bias_order(self, con):
    w = self._an.walker
    leaf = self._consumer_bias_leaf(con)
    if leaf is None or len(con.out_axes) < 2:
      return con.out_axes
    key = self._atom_key
    bias_keys = [key(leaf, d) for d in range(len(w.invar_atoms[leaf]))]
    bias_keys = [k for k in bias_keys if k]
    pos = {}
    for a in con.out_axes:
      k = key(con.kernel, a)
      if k not in bias_keys or k in pos.values():
        return con.out_axes
      pos[a] = k
    return tuple(sorted(con.out_axes, key=lambda a: bias_keys.index(pos[a])))


_MODULE_HINTS = {
    "linen": ("fn is the linen module {name} itself, which cannot run unbound on params: "
              "trace its apply function, trace(model.apply, variables, x)."),
    "nnx": ("fn is the nnx module {name} itself, called as fn(params, x): trace a function "
            "of its state, graphdef, state = nnx.split(model); trace(lambda s, x: "
            "nnx.merge(graphdef, s)(x), state, x) (see docs/any-model.md), or "
            "trace(lambda m, x: m(x), model, x)."),
}


_MODULE_AS_STATE = (
    "params is an nnx module, where this function takes the module's state (it merges it: "
    "nnx.merge(graphdef, state)). Pass the state: graphdef, state = nnx.split(model), and "
    "give state as the params (to trace the module itself, trace lambda m, x: m(x) with the "
    "module as params; see docs/any-model.md).")


def _is_nnx_module(x) -> bool:
  """Whether ``x`` is an nnx module instance (flax imported only if it is loaded already)."""
  return not isinstance(x, type) and _flax_module_kind(x) == "nnx" and hasattr(x, "__call__")


def _flax_module_kind(fn) -> str | None:
  """``'linen'`` or ``'nnx'`` when ``fn`` is a Flax module or its class (passed where its apply
  function belongs: the failed trace then says what to pass); None otherwise. Read from the
  class's module path, so flax is not imported here."""
  for cls in (fn if isinstance(fn, type) else type(fn)).__mro__:   # an instance or the class
    mod = getattr(cls, "__module__", "") or ""
    if mod.startswith("flax.linen"):
      return "linen"
    if mod.startswith("flax.nnx"):
      return "nnx"
  return None


def trace(fn: Callable, params: PyTree, *example_args) -> TracedTarget:
  """A pruning target for any JAX function ``fn(params, *args)``, its unit groups found by
  following every parameter axis through ``fn``'s jaxpr.

  Args:
    fn: the model: a linen ``module.apply``, a function over an nnx model's state (see
      ``docs/any-model.md``), or any function of a params pytree (nested dicts of arrays) and
      inputs.
    params: the params (arrays or ``jax.ShapeDtypeStruct`` values: tracing needs only shapes).
    *example_args: example inputs, with a batch of at least 2 (a batch of 1 cannot be told
      apart from broadcast axes).

  Returns:
    A :class:`TracedTarget`.

  Raises:
    TraceError: ``fn`` fails on the example arguments (the message shows JAX's first line).
  """
  if not callable(fn):
    raise TypeError(f"trace takes a function fn(params, *args), got {type(fn).__name__}.")
  if not example_args:
    kind = _flax_module_kind(fn)
    raise ValueError(
        "trace needs example inputs: trace(fn, params, x) with a batch x of at least 2 samples"
        + (": " + _MODULE_HINTS[kind].format(name=fn.__name__ + " class" if isinstance(
            fn, type) else type(fn).__name__) if kind else "."))
  param_leaves = jax.tree.leaves(params)
  if not param_leaves:
    raise ValueError("params has no array leaves; pass the model's parameters.")
  arg_leaves = jax.tree.leaves(example_args)
  for leaf in arg_leaves:
    shape = _shape(leaf)
    if shape and shape[0] == 1:
      raise ValueError(f"Use an example batch of at least 2 samples (got an input of shape "
                       f"{shape}): with one sample the batch axis cannot be told apart from "
                       "broadcast axes.")
    if shape and shape[0] == 0:
      raise ValueError(f"Use an example batch of at least 2 samples (got an empty input of "
                       f"shape {shape}): an empty batch has no activations to trace, and "
                       "shapes traced from it do not fit real batches.")
  flat, in_treedef = jax.tree.flatten((params, example_args))

  def flat_fn(*leaves):
    p, args = jax.tree.unflatten(in_treedef, leaves)
    return fn(p, *args)

  avals = [jax.ShapeDtypeStruct(_shape(l), l.dtype if hasattr(l, "dtype") else
                                np.asarray(l).dtype) for l in flat]
  try:
    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*avals)
  except Exception as e:  # pylint: disable=broad-except
    lines = [l for l in str(e).strip().splitlines() if l.strip()]
    first = lines[0] if lines else ""
    hint = ("check that the function runs on these params and that the example inputs have the "
            "shape the model expects.")
    if isinstance(e, jax.errors.ConcretizationTypeError):
      hint = ("every example argument is traced as an array: pass Python settings (a train "
              "flag, a mode) by closing over them, e.g. trace(functools.partial(model.apply, "
              "train=False), params, x) or trace(lambda p, x: fn(p, x, False), params, x).")
    elif _is_nnx_module(params) and "number of leaves" in first:   # nnx.merge met a module
      hint = _MODULE_AS_STATE
    elif kind := _flax_module_kind(fn):
      name = fn.__name__ + " class" if isinstance(fn, type) else type(fn).__name__
      hint = _MODULE_HINTS[kind].format(name=name)
    elif type(e).__name__ == "ScopeCollectionNotFound":
      hint = ("a flax module's apply takes the whole variables dict that model.init returned "
              "({'params': ..., 'batch_stats': ...}), not variables['params'] or a part of it: "
              "trace(model.apply, variables, x); the pruners then take and return the same "
              "variables dict.")
    elif type(e).__name__ == "TraceContextError" and "Rng" in first:
      hint = ("the model draws random numbers from its nnx.Rngs while it runs (nnx.RNN's "
              "initial carry does, in eval mode too; Dropout in training mode), which advances "
              "their count: trace the whole state, graphdef, state = nnx.split(model) and "
              "trace(lambda s, x: nnx.merge(graphdef, s)(x), state, x), so that the Rngs are "
              "traced with the params; or call model.eval() where that stops the draws.")
    elif type(e).__name__ == "TraceContextError":
      hint = ("an nnx model in training mode (Dropout, or a BatchNorm that updates its "
              "statistics) changes its own state while traced: call model.eval() before "
              "nnx.split, so that it runs as a function of its params.")
    raise TraceError(
        f"Could not trace {getattr(fn, '__name__', 'fn')}(params, *example_args): "
        f"{type(e).__name__}: {first} -- {hint}") from e
  closed = _unfuse.unfuse(closed)   # a fused kernel concatenated from params: its layers
  w = _Walker(len(param_leaves))
  w.walk(closed, avals[:len(param_leaves)], avals[len(param_leaves):])
  env = {((), v): ax for v, ax in w.env.items()}
  env.update(w.scoped_env)
  leaf_paths = tuple(_leaf_paths(params))
  sites, uses, reasons = _classify(w, leaf_paths, len(param_leaves), env)
  lines = _explain(w, leaf_paths, avals, sites, uses, reasons)
  if _draws_random(closed.jaxpr):
    lines += ("note: the function draws random numbers (random_bits): a dropout in training "
              "mode ties its random mask to the units it drops, and they are not followed "
              "through it; trace the model in evaluation mode (nnx: model.eval(); linen: "
              "deterministic=True). Noise drawn in the units' shape on purpose (a VAE's "
              "sampled latent: mu + sigma * eps) fixes their number the same way, so those "
              "units are not prunable (the axes 'used by bitcast_convert_type' and other "
              "random-bit ops).",)
  returned = sorted({units_lib.path_str([units_lib.key_of(k) for k in kp][:i + 1])
                     for kp, _ in jax.tree_util.tree_flatten_with_path(out_shape)[0]
                     for i, k in enumerate(kp) if units_lib.key_of(k) in _RETURNED_VARIABLES})
  if returned:
    lines += (f"note: the function returns updated variables (at output {', '.join(returned)}; linen's "
              "apply(..., mutable=[...]) returns (outputs, updates)): their per-unit values "
              "reach the function's outputs, so no unit they hold is prunable. Trace the "
              "prediction alone, e.g. trace(lambda v, x: module.apply(v, x, train=True, "
              "mutable=['batch_stats'])[0], variables, x), or the model in inference mode.",)
  _check_batch_reaches_outputs(w, len(param_leaves), closed.jaxpr)
  an = _Analysis(closed, in_treedef, jax.tree.structure(out_shape), len(param_leaves), w,
                 leaf_paths, sites, uses, lines,
                 tuple(_shape(l) for l in avals[len(param_leaves):]),
                 *_batch_axes(w, len(param_leaves), closed.jaxpr))
  sizes = {}
  target = TracedTarget(an, sizes, fn)
  target._module_params = _is_nnx_module(params)  # pylint: disable=protected-access
  return target
