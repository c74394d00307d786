"""A FLOPs and parameter report per layer and in total: dense, masked and compacted.

Per weight leaf (every leaf with ``ndim >= 2``): its parameters, its nonzeros under the weight
masks, its parameters after compaction, and the FLOPs of the contractions that read it
(``dot_general`` and ``conv_general_dilated`` in the jaxpr of ``apply`` for one example: ``2 x
output elements x contracted size``), dense and masked (dense FLOPs scaled by the leaf's kept
fraction: every weight of a dense or conv kernel is used the same number of times, up to zero
padding at borders). A contraction reads a leaf also through what ``apply`` computes from the
leaf alone: a transpose, a cast, a slice of stacked layers' weights, ``where(mask, w, 0)``
(``jaxprune.apply_masks`` inside ``apply``). A transposed convolution (``lhs_dilation``) does not
count the taps on the zeros inserted between its inputs. A contraction inside ``scan`` counts
once per iteration, inside a ``while_loop`` (a ``fori_loop`` with traced bounds) once, inside a
``cond`` or ``switch`` as on the branch that reads the leaf most. Contractions between two
activations (attention scores) read no leaf and are not in the per-leaf counts. The total also
carries XLA's own cost analysis of the compiled ``apply`` (which counts every operation,
activations included, and no taps on padding).

Example:
  >>> import jax, jaxprune
  >>> model = jaxprune.MLP(in_features=4, hidden=(8,), out_features=3)
  >>> params = model.init(jax.random.key(0))
  >>> report = jaxprune.flops_report(model, params)
  >>> report['total']['flops']
  112
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import masks as masks_lib
from jaxprune.pruners import magnitude as magnitude_lib

PyTree = Any
_CONTRACTIONS = ("dot_general", "conv_general_dilated")
_LOOPS_AND_BRANCHES = ("scan", "while", "cond")


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for j in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(j, jax.extend.core.ClosedJaxpr):
        yield j.jaxpr
      elif isinstance(j, jax.extend.core.Jaxpr):
        yield j


def _conv_flops(eqn) -> int:
  """``2 x output elements x contracted size`` of a ``conv_general_dilated``, less the taps
  that land on the zeros an ``lhs_dilation`` (transposed convolution) inserts between inputs;
  taps on zero padding at the borders count, as for any convolution."""
  dn = eqn.params["dimension_numbers"]
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  n_cout = out[dn.out_spec[0]] * out[dn.out_spec[1]]          # batch x output features
  taps = rhs[dn.rhs_spec[1]]                                   # input features per group
  ld = eqn.params.get("lhs_dilation") or (1,) * (len(rhs) - 2)
  rd = eqn.params.get("rhs_dilation") or (1,) * (len(rhs) - 2)
  strides = eqn.params["window_strides"]
  pads = eqn.params["padding"]
  for i in range(len(rhs) - 2):
    o, k = out[dn.out_spec[2 + i]], rhs[dn.rhs_spec[2 + i]]
    if ld[i] == 1:
      taps *= o * k
    else:  # input position of output o, tap t in the dilated, padded input: o*s + t*rd - lo
      lo = pads[i][0] if isinstance(pads[i], (tuple, list)) else 0
      pos = np.add.outer(np.arange(o) * strides[i], np.arange(k) * rd[i]) - lo
      taps *= int(np.sum(pos % ld[i] == 0))
  return 2 * n_cout * taps


def _is_literal(v) -> bool:
  return isinstance(v, jax.extend.core.Literal)


def _walk(jaxpr, owner: dict, data: set, flops: dict, mult: int = 1,
          sizes: Mapping[int, int] | None = None) -> None:
  """Adds the FLOPs of contractions that read a param leaf to ``flops[leaf index]``.

  ``owner`` maps a variable to the param leaf it is computed from without the input (the leaf
  itself, or any view or elementwise function of it: a transpose, a cast, a slice of a stacked
  leaf, ``where(mask, w, 0)``; of several leaves, the largest: ``scale * kernel`` is the
  kernel's); ``data`` holds the variables that depend on the input; ``sizes``: leaf -> size.
  """
  sizes = sizes or {}
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    ins = [None if _is_literal(v) else owner.get(v) for v in eqn.invars]
    dat = [False if _is_literal(v) else v in data for v in eqn.invars]
    if name in _CONTRACTIONS:
      lhs, rhs = ins[0], ins[1]
      leaf = rhs if rhs is not None else lhs   # x @ w, conv(x, kernel): the weight is rhs
      if leaf is not None:
        if name == "dot_general":
          (lc, _), _ = eqn.params["dimension_numbers"]
          lshape = eqn.invars[0].aval.shape
          f = 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lshape[d] for d in lc)
        else:
          f = _conv_flops(eqn)
        flops[leaf] = flops.get(leaf, 0) + mult * f
      if any(dat):
        data.update(eqn.outvars)
      continue
    subs = list(_sub_jaxprs(eqn))
    if not subs:
      if any(dat):
        data.update(eqn.outvars)
      else:
        owned = [i for i in ins if i is not None]
        if owned:
          leaf = max(owned, key=lambda i: sizes.get(i, 0))   # the first of the largest
          for v in eqn.outvars:
            owner[v] = leaf
      continue
    times = int(eqn.params.get("length", 1)) if name == "scan" else 1
    # a call (jit, checkpoint, custom_jvp/vjp): one sub-jaxpr, operands and results one to one
    is_call = (name not in _LOOPS_AND_BRANCHES and len(subs) == 1
               and len(subs[0].invars) == len(eqn.invars)
               and len(subs[0].outvars) == len(eqn.outvars))
    branch_flops = []
    for sub in subs:
      pos = _operand_positions(eqn, sub)
      inner = {k: ins[i] for k, i in zip(sub.invars, pos) if ins[i] is not None}
      inner_data = {k for k, i in zip(sub.invars, pos) if dat[i]}
      sub_owner, sub_data = {**owner, **inner}, set(data) | inner_data
      target = {} if name == "cond" else flops
      _walk(sub, sub_owner, sub_data, target, mult * times, sizes)
      if name == "cond":
        branch_flops.append(target)
      if is_call:
        for o, so in zip(eqn.outvars, sub.outvars):
          if _is_literal(so):
            continue
          if so in sub_data:
            data.add(o)
          elif sub_owner.get(so) is not None:
            owner[o] = sub_owner[so]
    if branch_flops:  # one branch runs: each leaf's FLOPs on the branch that uses it most
      for leaf in set().union(*branch_flops):
        flops[leaf] = flops.get(leaf, 0) + max(b.get(leaf, 0) for b in branch_flops)
    if not is_call and any(dat):
      data.update(eqn.outvars)


def _operand_positions(eqn, sub) -> list[int]:
  """For each input of ``sub``, the position of the operand of ``eqn`` that feeds it."""
  n_ops, n_in = len(eqn.invars), len(sub.invars)
  if eqn.primitive.name == "while":   # operands: cond consts, body consts, carry
    cn, bn = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
    consts = range(cn) if sub is eqn.params["cond_jaxpr"].jaxpr else range(cn, cn + bn)
    return list(consts) + list(range(cn + bn, n_ops))
  if n_in <= n_ops:                   # scan (consts, carry, xs), cond (index first), calls
    return list(range(n_ops - n_in, n_ops))
  return list(range(n_ops))


def leaf_flops(apply_fn: Callable, params: PyTree, x) -> dict[int, int]:
  """Leaf index (``jax.tree.leaves`` order) -> FLOPs of the contractions that read it."""
  n = len(jax.tree.leaves(params))
  try:
    closed = jax.make_jaxpr(apply_fn)(params, x)
    data = set(closed.jaxpr.invars[n:])
  except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
          jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError):
    # apply reads the input's values on the host: trace it as a constant
    closed = jax.make_jaxpr(lambda p: apply_fn(p, x))(params)
    data = set(closed.jaxpr.constvars)
  owner = {v: i for i, v in enumerate(closed.jaxpr.invars[:n])}
  flops: dict[int, int] = {}
  sizes = {i: int(np.size(l)) for i, l in enumerate(jax.tree.leaves(params))}
  _walk(closed.jaxpr, owner, data, flops, sizes=sizes)
  return flops


def xla_flops(apply_fn: Callable, params: PyTree, x) -> float | None:
  """XLA's cost analysis of the compiled ``apply_fn(params, x)``: total FLOPs (or None)."""
  try:
    cost = jax.jit(apply_fn).lower(params, x).compile().cost_analysis()
  except Exception:  # pylint: disable=broad-except  (backends without cost analysis)
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return None if not cost or "flops" not in cost else float(cost["flops"])


def _example(model_or_apply, x):
  shape = getattr(model_or_apply, "input_shape", None)
  if x is not None:
    # A NumPy array is put on the device as it is (jnp.asarray would compile a staging program
    # for it; the dtype is the same canonical one).
    x = jax.device_put(x) if isinstance(x, np.ndarray) else jnp.asarray(x)
    if shape is not None and x.ndim == len(shape) + 1 and x.shape[0] != 1:
      raise ValueError(f"flops_report counts the FLOPs of one example, but x holds a batch of "
                       f"{x.shape[0]} (shape {tuple(x.shape)}), which would count them "
                       f"{x.shape[0]} times: pass one example, x[:1].")
    return x
  if shape is None:
    raise ValueError("Pass an example input x (one example, with its batch axis: shape "
                     "(1, ...)) when the model has no input_shape.")
  return jnp.zeros((1,) + tuple(shape), jnp.float32)


def flops_report(model_or_apply, params: PyTree, x=None, masks: PyTree | None = None, *,
                 unit_masks: Mapping[str, Any] | None = None,
                 compacted: tuple[Callable, PyTree] | None = None) -> dict:
  """Per weight leaf and in total: parameters and FLOPs, dense, masked and compacted.

  Args:
    model_or_apply: a jaxprune model (or any pruning target with ``apply``, ``input_shape`` and
      ``compact``) or an ``apply(params, x)`` function.
    params: the params.
    x: one example input with a batch axis of 1 (default zeros of ``model.input_shape``).
    masks: weight masks (default: none, all kept).
    unit_masks: with a model (or traced target), the unit masks to compact with
      (``model.compact``). They also count in the masked columns: expanded to weight masks
      (:func:`jaxprune.expand`) and combined with ``masks`` (logical and), so ``nonzero`` and
      ``masked_flops`` leave out the removed units' weights as the compacted counts do.
    compacted: or ``(apply, small_params)`` of the compacted network, for any apply function.

  Returns:
    ``{'layers': [{'name', 'shape', 'params', 'nonzero', 'compact_params', 'flops',
    'masked_flops', 'compact_flops'}, ...], 'total': {same keys and 'xla_flops'}}``; compact
    entries are None without compaction.
  """
  if hasattr(params, "apply") or hasattr(params, "groups"):
    raise TypeError(f"flops_report got a {type(params).__name__} where the params belong: call "
                    "flops_report(model, params, ...), the model first.")
  apply_fn = model_or_apply.apply if hasattr(model_or_apply, "apply") else model_or_apply
  x = _example(model_or_apply, x)
  if masks is not None:
    masks_lib.check_weight_masks(params, masks)
  if unit_masks is not None:
    if not hasattr(model_or_apply, "groups"):
      raise ValueError("unit_masks needs a model with unit groups (a jaxprune model or "
                       "jaxprune.trace(...)); for a plain apply function pass the weight masks "
                       "as masks= (and the compacted network as compacted=(small_apply, "
                       "small_params)).")
    # the masked counts are those of the network without the removed units, as compaction's
    # (an empty group is the compaction's to refuse, with its own message)
    masks = masks_lib.expand(params, model_or_apply, unit_masks, masks, allow_empty=True)
  if unit_masks is not None and compacted is None:
    if not hasattr(model_or_apply, "compact"):
      raise ValueError("unit_masks needs a model with compact(); for a plain apply function "
                       "pass compacted=(small_apply, small_params).")
    small, small_model = model_or_apply.compact(params, unit_masks)
    compacted = (small_model.apply, small)
  names = magnitude_lib.leaf_names(params)
  leaves = jax.tree.leaves(params)
  mleaves = jax.tree.leaves(masks) if masks is not None else None
  fl = leaf_flops(apply_fn, params, x)
  small_by_name, small_fl, small_shape = {}, {}, {}
  if compacted is not None:
    s_apply, s_params = compacted
    s_names = magnitude_lib.leaf_names(s_params)
    s_leaves = jax.tree.leaves(s_params)
    s_fl = leaf_flops(s_apply, s_params, x)
    small_by_name = {n: int(np.size(l)) for n, l in zip(s_names, s_leaves)}
    small_shape = {n: tuple(int(d) for d in np.shape(l)) for n, l in zip(s_names, s_leaves)}
    small_fl = {s_names[i]: f for i, f in s_fl.items()}
  rows = []
  for i, (n, leaf) in enumerate(zip(names, leaves)):
    size = int(np.size(leaf))
    nz = int(np.sum(np.asarray(mleaves[i]))) if mleaves is not None else size
    f = int(fl.get(i, 0))
    rows.append({   # a leaf that compaction removed altogether keeps 0 parameters
        "name": n, "shape": tuple(int(d) for d in np.shape(leaf)), "params": size,
        "nonzero": nz, "compact_params": small_by_name.get(n, 0) if compacted else None,
        "flops": f, "masked_flops": int(round(f * nz / max(size, 1))),
        "compact_flops": int(small_fl.get(n, 0)) if compacted else None})
  for n in small_by_name.keys() - set(names):   # leaves only the compacted params hold
    rows.append({"name": n, "shape": small_shape[n], "params": 0, "nonzero": 0,
                 "compact_params": small_by_name[n], "flops": 0, "masked_flops": 0,
                 "compact_flops": int(small_fl.get(n, 0))})
  total = {k: sum(r[k] for r in rows) for k in ("params", "nonzero", "flops", "masked_flops")}
  for k in ("compact_params", "compact_flops"):
    total[k] = sum(r[k] for r in rows) if compacted else None
  total["xla_flops"] = xla_flops(apply_fn, params, x)
  return {"layers": rows, "total": total}


def format_flops(report: Mapping[str, Any]) -> str:
  """The report as a text table: one row per leaf with FLOPs or ``ndim >= 2``, one row that sums
  the other leaves (biases, norm parameters), and the total, so the columns add up."""
  cols = ("name", "params", "nonzero", "compact_params", "flops", "masked_flops",
          "compact_flops")
  fmt = lambda v: "-" if v is None else str(v)
  shown = lambda r: r["flops"] or len(r["shape"]) >= 2 or r["params"] == 0
  rows = [[fmt(r[c]) for c in cols] for r in report["layers"] if shown(r)]
  rest = [r for r in report["layers"] if not shown(r)]
  t = report["total"]
  if rest:
    rows.append([f"other leaves ({len(rest)}: biases, norms)"] + [
        fmt(None if t[c] is None else sum(r[c] for r in rest)) for c in cols[1:]])
  rows.append(["total"] + [fmt(t[c]) for c in cols[1:]])
  header = ["layer", "params", "nonzero", "compacted", "FLOPs", "masked FLOPs",
            "compacted FLOPs"]
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(cols))]
  line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip()
  out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
  if t.get("xla_flops") is not None:
    out.append(f"XLA cost analysis of the compiled apply (all operations): "
               f"{t['xla_flops']:.0f} FLOPs")
  return "\n".join(out)
