"""Fused kernels made by concatenating params, split back into their layers before tracing.

Flax's ``OptimizedLSTMCell`` computes its four gates with one product: it concatenates the
gates' kernels ``(D, H)`` into ``(D, 4H)``, multiplies, adds the concatenated biases and splits
the result into the four gates again. For the tracer that is a kernel computed from params
(by ``concatenate``), whose rows no param owns, and a concatenation split again: no unit of the
cell is prunable, though ``LSTMCell``, the same function, is.

:func:`unfuse` rewrites such a program into the product per piece, which it equals exactly (each
output column is the same dot product): a concatenation is kept unmade while what reads it works
piece by piece (a product along a free axis of its kernel, a reshape that only adds or drops
size-1 axes, a broadcast, a dtype conversion, an elementwise op with a concatenation of the same
cut or with a value broadcast along the cut), and a ``split`` at the concatenation's own cuts
(or a slice of exactly one piece) takes the pieces back. Anything else reads the concatenation
made. Only programs (and the bodies of ``jit`` and ``scan`` calls in them) where a split takes
pieces back are rewritten; all others are returned as they are.
"""

from __future__ import annotations

import dataclasses

import jax
from jax import lax
import jax.extend as jex

_ELEMENTWISE2 = frozenset("add sub mul div max min".split())
_BODIES = {"pjit": "jaxpr", "jit": "jaxpr", "scan": "jaxpr", "closed_call": "call_jaxpr"}


@dataclasses.dataclass
class _Concat:
  """``lax.concatenate(pieces, dim)``, not yet made."""
  pieces: list
  dim: int

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(p.shape[self.dim] for p in self.pieces)


def _made(x):
  """``x``, with a concatenation not yet made made (each reader that needs it whole)."""
  return lax.concatenate(x.pieces, x.dim) if isinstance(x, _Concat) else x


def _subjaxprs(jaxpr):
  for eqn in jaxpr.eqns:
    key = _BODIES.get(eqn.primitive.name)
    body = eqn.params.get(key) if key else None
    if body is not None:
      yield body.jaxpr if hasattr(body, "jaxpr") else body


def _may_apply(jaxpr) -> bool:
  """Whether a concatenation and a split both occur in one (sub)program: the pattern's sign."""
  names = {e.primitive.name for e in jaxpr.eqns}
  return ("concatenate" in names and ("split" in names or "slice" in names)) or any(
      _may_apply(j) for j in _subjaxprs(jaxpr))


def unfuse(closed):
  """``closed`` (a ClosedJaxpr) with products of concatenated kernels made piece by piece and
  split back at their cuts; ``closed`` itself when it has none."""
  if not _may_apply(closed.jaxpr):
    return closed
  taken = [0]

  def run(*args):
    return _eval(closed.jaxpr, closed.consts, args, taken)

  avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
  try:
    new = jax.make_jaxpr(run)(*avals)
  except Exception:  # pylint: disable=broad-except
    # An op this interpreter cannot replay (a primitive whose params do not bind again): the
    # program as traced, read as before (its fused kernels stay unprunable).
    return closed
  return new if taken[0] else closed


def _eval(jaxpr, consts, args, taken) -> list:
  """Runs ``jaxpr`` (under ``make_jaxpr``) with concatenations kept unmade; ``taken[0]`` counts
  the rewrites that took pieces back."""
  env: dict = {}

  def read(v):
    return v.val if isinstance(v, jex.core.Literal) else env[v]

  env.update(zip(jaxpr.constvars, consts))
  env.update(zip(jaxpr.invars, args))
  for eqn in jaxpr.eqns:
    outs = _step(eqn, [read(v) for v in eqn.invars], taken)
    for v, x in zip(eqn.outvars, outs):
      if not isinstance(v, jex.core.DropVar):
        env[v] = x
  return [_made(read(v)) for v in jaxpr.outvars]


def _bind(eqn, ins, params=None):
  p = eqn.primitive
  out = p.bind(*[_made(x) for x in ins], **p.get_bind_params(params or eqn.params))
  return list(out) if p.multiple_results else [out]


def _step(eqn, ins, taken) -> list:
  """One equation's outputs: a concatenation kept unmade, an op made piece by piece, or the op
  as it was (a jit or scan body rewritten when it holds the pattern)."""
  name, params = eqn.primitive.name, eqn.params
  if name == "concatenate" and len(ins) > 1:
    return [_Concat([_made(x) for x in ins], params["dimension"])]
  cat = [x for x in ins if isinstance(x, _Concat)]
  if not cat:
    key = _BODIES.get(name)
    body = params.get(key) if key else None
    if body is not None and hasattr(body, "jaxpr"):
      new = unfuse(body)
      if new is not body and not new.consts:
        taken[0] += 1
        return _bind(eqn, ins, {**params, key: new})
    return _bind(eqn, ins)
  out = _piecewise(eqn, ins, cat[0])
  if out is not None:
    if name in ("split", "slice"):
      taken[0] += 1
    return out
  return _bind(eqn, ins)


def _piecewise(eqn, ins, c: _Concat) -> list | None:
  """The op made piece by piece (a list of outputs), or None when it cannot be."""
  name, params = eqn.primitive.name, eqn.params
  if name == "split" and ins[0] is c:
    if params["axis"] == c.dim and tuple(params["sizes"]) == c.sizes:
      return list(c.pieces)
    return None
  if name == "slice" and ins[0] is c and not any(s not in (None, 1) for s in
                                                  params.get("strides") or ()):
    start, limit = params["start_indices"], params["limit_indices"]
    shape = c.pieces[0].shape
    if any((start[d], limit[d]) != (0, shape[d]) for d in range(len(shape)) if d != c.dim):
      return None
    bounds = [sum(c.sizes[:k]) for k in range(len(c.sizes) + 1)]
    for k in range(len(c.pieces)):               # exactly one piece: h[:, :H], h[:, H:2 * H]
      if (start[c.dim], limit[c.dim]) == (bounds[k], bounds[k + 1]):
        return [c.pieces[k]]
    return None
  if name == "dot_general" and ins[1] is c and not isinstance(ins[0], _Concat):
    (lc, rc), (lb, rb) = params["dimension_numbers"]
    if c.dim in rc or c.dim in rb:
      return None
    lhs_free = len(ins[0].shape) - len(lc) - len(lb)
    rhs_free = [d for d in range(len(c.pieces[0].shape)) if d not in rc and d not in rb]
    dim = len(lb) + lhs_free + rhs_free.index(c.dim)
    return [_Concat([_bind(eqn, [ins[0], p])[0] for p in c.pieces], dim)]
  if name == "convert_element_type" and ins[0] is c:
    return [_Concat([_bind(eqn, [p])[0] for p in c.pieces], c.dim)]
  if name == "reshape" and ins[0] is c and params.get("dimensions") is None:
    old, new = c.pieces[0].shape, tuple(params["new_sizes"])
    whole = sum(c.sizes)
    kept_old = [d for d, n in enumerate(old) if (n if d != c.dim else whole) != 1]
    kept_new = [d for d, n in enumerate(new) if n != 1]
    sizes = lambda ds, shape: [shape[d] for d in ds]
    full_old = list(old[:c.dim]) + [whole] + list(old[c.dim + 1:])
    if (c.dim not in kept_old or sizes(kept_old, full_old) != sizes(kept_new, new)):
      return None
    dim = kept_new[kept_old.index(c.dim)]
    pieces = [lax.reshape(p, new[:dim] + (p.shape[c.dim],) + new[dim + 1:]) for p in c.pieces]
    return [_Concat(pieces, dim)]
  if name == "broadcast_in_dim" and ins[0] is c and len(ins) == 1:
    shape, bdims = tuple(params["shape"]), tuple(params["broadcast_dimensions"])
    dim = bdims[c.dim]
    if shape[dim] != sum(c.sizes):
      return None
    return [_Concat([lax.broadcast_in_dim(p, shape[:dim] + (p.shape[c.dim],) + shape[dim + 1:],
                                          bdims) for p in c.pieces], dim)]
  if name in _ELEMENTWISE2:
    rank = len(eqn.outvars[0].aval.shape)
    per = []
    for x in ins:
      if isinstance(x, _Concat):
        if x.dim != c.dim or x.sizes != c.sizes or len(x.pieces[0].shape) != rank:
          return None
        per.append(x.pieces)
      elif jax.numpy.ndim(x) == 0 or (jax.numpy.ndim(x) == rank and x.shape[c.dim] == 1):
        per.append([x] * len(c.pieces))
      else:
        return None
    return [_Concat([_bind(eqn, list(xs))[0] for xs in zip(*per)], c.dim)]
  return None
