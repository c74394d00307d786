"""A FLOPs and parameter report per layer and in total: dense, masked and compacted.

Per weight leaf (every leaf with ``ndim >= 2``): its parameters, its nonzeros under the weight
masks, its parameters after compaction, and the FLOPs of the contractions that read it
(``dot_general`` and ``conv_general_dilated`` in the jaxpr of ``apply`` for one example: ``2 x
output elements x contracted size``), dense and masked (dense FLOPs scaled by the leaf's kept
fraction: every weight of a dense or conv kernel is used the same number of times, up to zero
padding at borders; a contraction inside ``scan`` counts once per iteration, inside other loops
once). The total also carries XLA's own cost analysis of the compiled ``apply``
(which counts every operation, activations included).

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
_TRANSPARENT = ("convert_element_type", "reshape", "transpose", "copy", "copy_p")


def _sub_jaxprs(eqn):
  for v in eqn.params.values():
    for j in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(j, jax.extend.core.ClosedJaxpr):
        yield j.jaxpr
      elif isinstance(j, jax.extend.core.Jaxpr):
        yield j


def _walk(jaxpr, owner: dict, flops: dict, mult: int = 1) -> None:
  """Adds the FLOPs of contractions that read a param leaf to ``flops[leaf index]``."""
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    ins = [owner.get(v) if not isinstance(v, jax.extend.core.Literal) else None
           for v in eqn.invars]
    if name in _TRANSPARENT and ins and ins[0] is not None:
      owner[eqn.outvars[0]] = ins[0]
      continue
    if name in ("dot_general", "conv_general_dilated"):
      leaf = next((i for i in ins if i is not None), None)
      if leaf is not None:
        out = math.prod(eqn.outvars[0].aval.shape)
        if name == "dot_general":
          (lc, _), _ = eqn.params["dimension_numbers"]
          lhs = eqn.invars[0].aval.shape
          k = math.prod(lhs[d] for d in lc)
        else:
          rhs = eqn.invars[1].aval.shape
          out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
          k = math.prod(rhs) // rhs[out_dim]
        flops[leaf] = flops.get(leaf, 0) + mult * 2 * out * k
      continue
    subs = list(_sub_jaxprs(eqn))
    if subs:
      times = int(eqn.params.get("length", 1)) if name == "scan" else 1
      for sub in subs:
        n_in = len(sub.invars)
        inner = dict(zip(sub.invars, ins[-n_in:] if n_in <= len(ins) else ins))
        _walk(sub, {**owner, **{k: v for k, v in inner.items() if v is not None}}, flops,
              mult * times)


def leaf_flops(apply_fn: Callable, params: PyTree, x) -> dict[int, int]:
  """Leaf index (``jax.tree.leaves`` order) -> FLOPs of the contractions that read it."""
  closed = jax.make_jaxpr(lambda p: apply_fn(p, x))(params)
  owner = {v: i for i, v in enumerate(closed.jaxpr.invars)}
  flops: dict[int, int] = {}
  _walk(closed.jaxpr, owner, flops)
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
    x = jnp.asarray(x)
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
    unit_masks: with a model, the unit masks to compact with (``model.compact``).
    compacted: or ``(apply, small_params)`` of the compacted network, for any apply function.

  Returns:
    ``{'layers': [{'name', 'shape', 'params', 'nonzero', 'compact_params', 'flops',
    'masked_flops', 'compact_flops'}, ...], 'total': {same keys and 'xla_flops'}}``; compact
    entries are None without compaction.
  """
  apply_fn = model_or_apply.apply if hasattr(model_or_apply, "apply") else model_or_apply
  x = _example(model_or_apply, x)
  if masks is not None:
    masks_lib.check_weight_masks(params, masks)
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
  small_by_name, small_fl = {}, {}
  if compacted is not None:
    s_apply, s_params = compacted
    s_names = magnitude_lib.leaf_names(s_params)
    s_leaves = jax.tree.leaves(s_params)
    s_fl = leaf_flops(s_apply, s_params, x)
    small_by_name = {n: int(np.size(l)) for n, l in zip(s_names, s_leaves)}
    small_fl = {s_names[i]: f for i, f in s_fl.items()}
  rows = []
  for i, (n, leaf) in enumerate(zip(names, leaves)):
    size = int(np.size(leaf))
    nz = int(np.sum(np.asarray(mleaves[i]))) if mleaves is not None else size
    f = int(fl.get(i, 0))
    rows.append({
        "name": n, "shape": tuple(int(d) for d in np.shape(leaf)), "params": size,
        "nonzero": nz, "compact_params": small_by_name.get(n) if compacted else None,
        "flops": f, "masked_flops": int(round(f * nz / max(size, 1))),
        "compact_flops": int(small_fl.get(n, 0)) if compacted else None})
  total = {k: sum(r[k] for r in rows) for k in ("params", "nonzero", "flops", "masked_flops")}
  for k in ("compact_params", "compact_flops"):
    total[k] = sum(r[k] for r in rows) if compacted else None
  total["xla_flops"] = xla_flops(apply_fn, params, x)
  return {"layers": rows, "total": total}


def format_flops(report: Mapping[str, Any]) -> str:
  """The report as a text table (one row per leaf with FLOPs or ``ndim >= 2``, and a total)."""
  cols = ("name", "params", "nonzero", "compact_params", "flops", "masked_flops",
          "compact_flops")
  fmt = lambda v: "-" if v is None else str(v)
  rows = [[fmt(r[c]) for c in cols] for r in report["layers"]
          if r["flops"] or len(r["shape"]) >= 2]
  t = report["total"]
  rows.append(["total"] + [fmt(t[c]) for c in cols[1:]])
  header = ["layer", "params", "nonzero", "compacted", "FLOPs", "masked FLOPs",
            "compacted FLOPs"]
  widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(cols))]
  line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))
  out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
  if t.get("xla_flops") is not None:
    out.append(f"XLA cost analysis of the compiled apply (all operations): "
               f"{t['xla_flops']:.0f} FLOPs")
  return "\n".join(out)
