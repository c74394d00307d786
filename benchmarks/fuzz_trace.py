"""Random-model fuzzer for ``jaxprune.trace``: random models, random unit masks, exact checks.

Opt-in (not part of the suite; ``tests/test_fuzz_trace.py`` runs a few seeded models). Each model
is a plain JAX function ``fn(params, x)`` over a dict (or list) of per-block dicts of arrays,
composed of randomly chosen blocks: dense layers (plain, einsum, PyTorch layout, weight-normed,
low-rank, inside jit / checkpoint / custom_jvp, a vmapped ensemble, a (D, heads, H) kernel, a
layer applied twice and read apart, a top-1 mixture of experts), convs (NHWC and NCHW, strided,
dilated, transposed, reflect-padded, depthwise with a channel multiplier, grouped, a channel
shuffle), residual adds, concatenations (with the input, with a ones column, a layer with
itself), GLU splits (split, slices, nn.glu), gates, reshapes and flattens, layer (two-pass and
E[h^2] - E[h]^2) / RMS / L2 / group / instance / batch-like norms, a centring, pooling (also the generic ``reduce_window``), activations, attention (one or two heads, fused
qkv), scans over stacked params and RNNs over time, embeddings with position tables, a class
token, token mixing, top-k over time, a rotary embedding, a scatter into the units; possibly
with a tuple or dict of outputs. Or a Flax linen or nnx model built from a random layer list
(Dense, Conv, ConvTranspose, depthwise Conv, BatchNorm, LayerNorm, GroupNorm, InstanceNorm,
RMSNorm, WeightNorm, remat, attention, LSTM/GRU/simple RNNs, pooling, residual blocks; nnx
traced as a pure dict or as its State). For each model:

1. ``jaxprune.trace`` (from the params or from their shapes): a ``ValueError``/``TypeError`` is
   a documented refusal, anything else a finding (a model that does not run is the generator's
   fault: counted, not a finding); ``explain()`` has a line per leaf, each "not prunable (...)"
   reason is counted; the groups pass ``jaxprune.check_groups``;
2. every group gets a random unit mask keeping at least one unit and removing one (some groups
   left out, keeping theirs); the masked network (``params * expand(params, target, masks)``,
   through ``jax.jit(target.apply)``) and the compacted one (``target.compact``, then
   ``small_target.apply``) agree to float tolerance at the traced batch (and, for a share of
   the models, at batch 2 or 5), NaN on neither side;
3. the compacted params are exactly the kept entries of every sliced leaf (recomputed here from
   the groups' slices, apart from ``jaxprune.units.compact``), the other leaves are unchanged,
   the small target's groups have the kept sizes, ``uncompact`` gives back the masked params;
   a share of the compacted targets is compacted again and checked the same way;
4. ``activations`` of one group per model has the group's size last (or raises the documented
   ``ValueError``); the compacted target's are the masked network's kept units;
   ``activations_complete`` agrees with ``activations_incomplete_why``; where the group is the
   readout, zeroing its readout rows moves the output by ``activations @ rows``;
5. where that group's activations are complete (and not read by products): unit j made an exact
   duplicate of unit i (every producer slice) has i's activations, and merged into i with
   ``jaxprune.units.redistribute`` (``I + e_i e_j^T``) then masked, leaves the outputs as they
   were.

Any exception other than ``ValueError``/``TypeError`` (with a message), a mismatch, or a NaN is a
violation, printed with the model's seed: ``--replay SEED`` rebuilds and checks that model alone
(pass the same ``--x64``/``--quick``), printing its blocks, groups, ``explain()``, masks and
tracebacks. Most of the time is XLA compiling each model's programs (3 to 7 per model).

  python3 benchmarks/fuzz_trace.py --models 300 --seed 0 [--x64] [--quick] [--family nnx]
  python3 benchmarks/fuzz_trace.py --replay 17
"""

import argparse
import collections
import dataclasses
import itertools
import math
import os
import re
import sys
import time
import traceback
from typing import Any, Callable

if __name__ == "__main__":
  # Compile fast (the models are tiny; most of the time is XLA compiling them), as the suite does.
  if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()
  os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

import jaxprune
from jaxprune import units as U

BATCH = 3
OUTPUTS = 3
ACTS = ("relu", "tanh", "sigmoid", "gelu", "silu")
DN = ("NHWC", "HWIO", "NHWC")


def _act(name):
  return {"relu": jax.nn.relu, "tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid,
          "gelu": jax.nn.gelu, "silu": jax.nn.silu, "id": lambda v: v}[name]


@dataclasses.dataclass
class Model:
  """A random model: ``fn(params, x)``, its params and an example batch."""
  seed: int
  family: str            # 'plain', 'linen' or 'nnx'
  desc: str              # the blocks, in order
  fn: Callable
  params: Any
  x: Any


# ----------------------------------------------------------------------------- plain models


class _Builder:
  """Collects the params of a plain model, one sub-dict per block."""

  def __init__(self, rng, dtype):
    self.rng, self.dtype, self.params, self.n = rng, dtype, {}, 0

  def block(self, kind):
    key = f"{kind}{self.n}"
    self.n += 1
    self.params[key] = {}
    return key

  def param(self, key, name, shape, scale=None, positive=False):
    fan_in = max(1, int(np.prod(shape[:-1]))) if len(shape) > 1 else 1
    s = (1.0 / math.sqrt(fan_in)) if scale is None else scale
    a = self.rng.normal(size=shape) * s
    if positive:
      a = np.abs(a) + 0.5
    self.params[key][name] = np.asarray(a, self.dtype)
    return name

  def width(self):
    return int(self.rng.integers(2, 9))

  def act(self):
    return ACTS[int(self.rng.integers(len(ACTS)))]


def _conv(h, k, stride=1, padding="SAME", groups=1):
  return lax.conv_general_dilated(h, k, (stride, stride), padding, dimension_numbers=DN,
                                  feature_group_count=groups)


# Each block: (builder, shape) -> (f(p, h), label); shapes are found with eval_shape afterwards.

def _b_dense(b, shape, out=None, act=None):
  key = b.block("dense")
  H = out or b.width()
  w = b.param(key, "w", (shape[-1], H))
  bias = b.rng.random() < 0.8
  if bias:
    b.param(key, "b", (H,), 0.3)
  a = act or (b.act() if b.rng.random() < 0.7 else "id")
  def f(p, h):
    y = h @ p[key]["w"]
    return _act(a)(y + p[key]["b"] if bias else y)
  return f, f"dense({H},{a}{'' if bias else ',nobias'})"


def _b_einsum_dense(b, shape):
  key = b.block("ein")
  H = b.width()
  b.param(key, "w", (shape[-1], H))
  b.param(key, "b", (H,), 0.3)
  a = b.act()
  spec = "...i,ih->...h"
  def f(p, h):
    return _act(a)(jnp.einsum(spec, h, p[key]["w"]) + p[key]["b"])
  return f, f"einsum({H},{a})"


def _b_weightnorm_dense(b, shape):
  key = b.block("wn")
  H = b.width()
  b.param(key, "v", (shape[-1], H))
  b.param(key, "g", (H,), positive=True)
  b.param(key, "b", (H,), 0.3)
  a = b.act()
  def f(p, h):
    v = p[key]["v"]
    w = v / jnp.sqrt((v * v).sum(0) + 1e-12) * p[key]["g"]
    return _act(a)(h @ w + p[key]["b"])
  return f, f"weightnorm({H},{a})"


def _b_lowrank_dense(b, shape):
  key = b.block("lr")
  H, r = b.width(), int(b.rng.integers(2, 4))
  b.param(key, "A", (shape[-1], r))
  b.param(key, "B", (r, H))
  b.param(key, "b", (H,), 0.3)
  a = b.act()
  def f(p, h):
    return _act(a)(h @ (p[key]["A"] @ p[key]["B"]) + p[key]["b"])
  return f, f"lowrank({H},r{r},{a})"


def _b_act(b, shape):
  a = b.act()
  return (lambda p, h: _act(a)(h)), a


def _b_residual(b, shape):
  key = b.block("res")
  F, H = shape[-1], b.width()
  a = b.act()
  if len(shape) == 4 and b.rng.random() < 0.6:
    k = int(b.rng.choice([1, 3]))
    b.param(key, "k1", (k, k, F, H))
    b.param(key, "b1", (H,), 0.3)
    b.param(key, "k2", (1, 1, H, F))
    b.param(key, "b2", (F,), 0.3)
    def f(p, h):
      q = p[key]
      return h + _conv(_act(a)(_conv(h, q["k1"]) + q["b1"]), q["k2"]) + q["b2"]
    return f, f"res_conv({H},{a})"
  b.param(key, "w1", (F, H))
  b.param(key, "b1", (H,), 0.3)
  b.param(key, "w2", (H, F))
  post = b.rng.random() < 0.5
  def f(p, h):
    q = p[key]
    y = h + _act(a)(h @ q["w1"] + q["b1"]) @ q["w2"]
    return _act(a)(y) if post else y
  return f, f"res_mlp({H},{a}{',post' if post else ''})"


def _b_concat(b, shape):
  key = b.block("cat")
  F = shape[-1]
  H1, H2 = b.width(), b.width()
  a1, a2 = b.act(), b.act()
  with_input = b.rng.random() < 0.3
  conv = len(shape) == 4 and b.rng.random() < 0.5
  if conv:
    b.param(key, "k1", (3, 3, F, H1))
    b.param(key, "k2", (1, 1, F, H2))
  else:
    b.param(key, "w1", (F, H1))
    b.param(key, "w2", (F, H2))
  b.param(key, "b1", (H1,), 0.3)
  b.param(key, "b2", (H2,), 0.3)
  itself = b.rng.random() < 0.25       # the first layer twice (CReLU: act(y), act(-y))
  def f(p, h):
    q = p[key]
    if conv:
      y1, y2 = _conv(h, q["k1"]), _conv(h, q["k2"])
    else:
      y1, y2 = h @ q["w1"], h @ q["w2"]
    parts = [_act(a1)(y1 + q["b1"]), _act(a2)(y2 + q["b2"])]
    if itself:
      parts = [parts[0], _act(a2)(-(y1 + q["b1"]))]
    return jnp.concatenate(([h] if with_input else []) + parts, -1)
  return f, (f"concat({'conv,' if conv else ''}{H1},{H1 if itself else H2}"
             f"{',itself' if itself else ''}{',input' if with_input else ''})")


def _b_glu(b, shape):
  key = b.block("glu")
  H = b.width()
  b.param(key, "w", (shape[-1], 2 * H))
  b.param(key, "b", (2 * H,), 0.3)
  how = int(b.rng.integers(3))
  a = b.act()
  def f(p, h):
    y = h @ p[key]["w"] + p[key]["b"]
    if how == 0:
      u, g = jnp.split(y, 2, -1)
    elif how == 1:
      u, g = y[..., :H], y[..., H:]
    else:
      return jax.nn.glu(y, -1)
    return u * _act(a)(g)
  return f, f"glu({H},{['split', 'slices', 'nn.glu'][how]}{'' if how == 2 else ',' + a})"


_NORMS = ("two-pass", "fast", "rms", "l2", "centre", "linf", "sigmoid-rms")


def _norm(how, h, g, beta):
  """A norm over the last axis: a two-pass LayerNorm (a masked unit adds mean^2 to the variance:
  refused), one with E[h^2] - E[h]^2, an RMSNorm, an L2 normalisation or a centring (sums that
  a masked unit adds zero to: groups read by them), or an L-infinity normalisation (a maximum
  of values never negative: a masked unit's 0 is no maximum), or an RMSNorm of sigmoid(h) - 0.5
  (0.5 at a masked unit, shifted back to 0: a group too)."""
  if how == "sigmoid-rms":
    h = jax.nn.sigmoid(h) - 0.5
    how = "rms"
  if how == "linf":
    return h / (jnp.max(jnp.abs(h), -1, keepdims=True) + 1e-3) * g
  if how == "rms":
    return h * lax.rsqrt(jnp.mean(jnp.square(h), -1, keepdims=True) + 1e-6) * g
  if how == "l2":
    return h / (jnp.linalg.norm(h, axis=-1, keepdims=True) + 1e-3) * g
  m = h.mean(-1, keepdims=True)     # (only where it is used: a traced sum the tracer checks)
  if how == "two-pass":
    y = (h - m) / jnp.sqrt(((h - m) ** 2).mean(-1, keepdims=True) + 1e-5)
  elif how == "fast":
    y = (h - m) * lax.rsqrt(jnp.maximum(jnp.mean(h * h, -1, keepdims=True) - m * m, 0) + 1e-5)
  else:
    y = h - m
  return y * g + beta


def _b_layernorm(b, shape):
  """A norm over the units (one of _NORMS)."""
  key = b.block("ln")
  F = shape[-1]
  b.param(key, "g", (F,), positive=True)
  b.param(key, "beta", (F,), 0.3)
  how = _NORMS[int(b.rng.integers(len(_NORMS)))]
  return (lambda p, h: _norm(how, h, p[key]["g"], p[key]["beta"])), f"layernorm({how})"


def _b_batchnorm(b, shape):
  key = b.block("bn")
  F = shape[-1]
  b.param(key, "mean", (F,), 0.3)
  b.param(key, "var", (F,), positive=True)
  b.param(key, "g", (F,), positive=True)
  b.param(key, "beta", (F,), 0.3)
  def f(p, h):
    q = p[key]
    return (h - q["mean"]) / jnp.sqrt(q["var"] + 1e-5) * q["g"] + q["beta"]
  return f, "batchnorm"


def _b_groupnorm(b, shape):
  """Group norm over a map or sequence (channels split into G groups), or instance norm."""
  key = b.block("gn")
  C = shape[-1]
  divisors = [g for g in range(2, C + 1) if C % g == 0]
  if not divisors:
    b.params.pop(key)
    return _b_batchnorm(b, shape)
  G = int(b.rng.choice(divisors))
  b.param(key, "g", (C,), positive=True)
  b.param(key, "beta", (C,), 0.3)
  spatial = tuple(range(1, len(shape) - 1))
  def f(p, h):
    y = h.reshape(h.shape[:-1] + (G, C // G))
    axes = spatial + (len(shape),)
    m = y.mean(axes, keepdims=True)
    v = ((y - m) ** 2).mean(axes, keepdims=True)
    y = ((y - m) / jnp.sqrt(v + 1e-5)).reshape(h.shape)
    return y * p[key]["g"] + p[key]["beta"]
  return f, f"groupnorm(G{G}{'=C' if G == C else ''})"


def _b_conv(b, shape):
  key = b.block("conv")
  C, H = shape[-1], b.width()
  k = int(b.rng.choice([1, 2, 3]))
  pad = "SAME" if shape[1] < k + 1 or b.rng.random() < 0.6 else "VALID"
  stride = 2 if shape[1] >= 4 and b.rng.random() < 0.2 else 1
  b.param(key, "k", (k, k, C, H))
  b.param(key, "b", (H,), 0.3)
  a = b.act()
  def f(p, h):
    return _act(a)(_conv(h, p[key]["k"], stride, pad) + p[key]["b"])
  return f, f"conv({H},{k}x{k},{pad},s{stride},{a})"


def _b_depthwise(b, shape):
  key = b.block("dw")
  C = shape[-1]
  M = int(b.rng.choice([1, 1, 2]))
  b.param(key, "k", (3, 3, 1, C * M))
  b.param(key, "b", (C * M,), 0.3)
  a = b.act()
  def f(p, h):
    return _act(a)(_conv(h, p[key]["k"], groups=C) + p[key]["b"])
  return f, f"depthwise(x{M},{a})"


def _b_grouped(b, shape):
  C = shape[-1]
  divisors = [g for g in range(2, C) if C % g == 0]
  if not divisors:
    return _b_conv(b, shape)
  key = b.block("gconv")
  G = int(b.rng.choice(divisors))
  O = G * int(b.rng.integers(1, 4))
  b.param(key, "k", (3, 3, C // G, O))
  b.param(key, "b", (O,), 0.3)
  a = b.act()
  def f(p, h):
    return _act(a)(_conv(h, p[key]["k"], groups=G) + p[key]["b"])
  return f, f"grouped(G{G},{O},{a})"


def _b_pool(b, shape):
  kind = ["max", "avg"][int(b.rng.integers(2))]
  # A Python-float init gives reduce_window_max / _sum; a jnp array made inside the function
  # gives the generic reduce_window primitive (with a computation body).
  as_array = b.rng.random() < 0.3
  init, op = (-jnp.inf, lax.max) if kind == "max" else (0.0, lax.add)
  def f(p, h):
    i = jnp.asarray(init, h.dtype) if as_array else init
    y = lax.reduce_window(h, i, op, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    return y / 4.0 if kind == "avg" else y
  return f, f"{kind}pool2{',array-init' if as_array else ''}"


def _b_gated(b, shape):
  """SwiGLU-style: act(h @ W1) * (h @ W3), two kernels of one group."""
  key = b.block("gate")
  H = b.width()
  b.param(key, "w1", (shape[-1], H))
  b.param(key, "w3", (shape[-1], H))
  a = b.act()
  return (lambda p, h: _act(a)(h @ p[key]["w1"]) * (h @ p[key]["w3"])), f"gated({H},{a})"


def _b_wrapped_dense(b, shape):
  """A dense layer inside jax.jit, jax.checkpoint or a custom_jvp function."""
  key = b.block("wrap")
  H = b.width()
  b.param(key, "w", (shape[-1], H))
  b.param(key, "b", (H,), 0.3)
  how = ["jit", "checkpoint", "custom_jvp"][int(b.rng.integers(3))]
  a = b.act()

  def layer(h, w, bb):
    return _act(a)(h @ w + bb)
  if how == "jit":
    inner = jax.jit(layer)
  elif how == "checkpoint":
    inner = jax.checkpoint(layer)
  else:
    inner = jax.custom_jvp(layer)
    inner.defjvp(lambda primals, tangents: jax.jvp(layer, primals, tangents))
  return (lambda p, h: inner(h, p[key]["w"], p[key]["b"])), f"{how}(dense({H},{a}))"


def _b_leaky(b, shape):
  return (lambda p, h: jnp.where(h > 0, h, 0.1 * h)), "leaky_where"


def _b_cumsum(b, shape):
  return (lambda p, h: jnp.cumsum(h, axis=1)), "cumsum_time"


def _b_concat_ones(b, shape):
  """A dense layer concatenated with a ones column (a piece one unit wide)."""
  key = b.block("ones")
  H = b.width()
  b.param(key, "w", (shape[-1], H))
  a = b.act()
  def f(p, h):
    y = _act(a)(h @ p[key]["w"])
    return jnp.concatenate([y, jnp.ones(y.shape[:-1] + (1,), y.dtype)], -1)
  return f, f"concat_ones({H},{a})"


def _b_shuffle(b, shape):
  """A channel shuffle (ShuffleNet): (G, C/G) channels read as (C/G, G)."""
  C = shape[-1]
  gs = [g for g in range(2, C) if C % g == 0]
  if not gs:
    return _b_act(b, shape)
  G = int(b.rng.choice(gs))
  def f(p, h):
    y = h.reshape(h.shape[:-1] + (G, C // G))
    return jnp.swapaxes(y, -1, -2).reshape(h.shape)
  return f, f"shuffle(G{G})"


def _b_topk(b, shape):
  """k-max pooling over time: (B, T, F) -> (B, k, F)."""
  k = int(b.rng.integers(1, shape[1])) if shape[1] > 1 else 1
  def f(p, h):
    return jnp.swapaxes(lax.top_k(jnp.swapaxes(h, 1, 2), k)[0], 1, 2)
  return f, f"topk_time({k})"


def _b_cls_token(b, shape):
  """A learned class token tiled over the batch and put before the sequence."""
  key = b.block("cls")
  b.param(key, "cls", (1, 1, shape[-1]), 0.5)
  def f(p, h):
    return jnp.concatenate([jnp.tile(p[key]["cls"], (h.shape[0], 1, 1)), h], 1)
  return f, "cls_token"


def _b_take_time(b, shape):
  """A fixed permutation of the time steps (gather along time)."""
  idx = np.asarray(b.rng.permutation(shape[1]))
  return (lambda p, h: jnp.take(h, idx, axis=1)), "take_time"


def _b_rotary(b, shape):
  """GPT-J style rotary embedding on the units (stack of the rotated halves)."""
  F = shape[-1]
  if F % 2:
    return _b_act(b, shape)
  T = shape[1]
  ang = np.arange(T)[:, None] / (10.0 ** (np.arange(F // 2)[None] / F))
  cos, sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
  def f(p, h):
    x1, x2 = jnp.split(h, 2, -1)
    c, s = cos.astype(h.dtype), sin.astype(h.dtype)
    return jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).reshape(h.shape)
  return f, "rotary"


def _b_scatter(b, shape):
  """Zeroes the first unit (a scatter into the units' axis)."""
  return (lambda p, h: h.at[..., 0].set(0.0)), "scatter_unit0"


def _b_torch_dense(b, shape):
  """PyTorch layout: x @ W.T + b with W of shape (out, in)."""
  key = b.block("tdense")
  H = b.width()
  b.param(key, "weight", (H, shape[-1]), 1.0 / math.sqrt(shape[-1]))
  b.param(key, "bias", (H,), 0.3)
  a = b.act()
  return (lambda p, h: _act(a)(h @ p[key]["weight"].T + p[key]["bias"])), f"torch_dense({H},{a})"


def _b_nchw_conv(b, shape):
  """A conv in NCHW/OIHW layout between transposes."""
  key = b.block("nchw")
  C, H = shape[-1], b.width()
  b.param(key, "k", (H, C, 3, 3), 1.0 / math.sqrt(9 * C))
  b.param(key, "b", (H,), 0.3)
  a = b.act()
  def f(p, h):
    y = lax.conv_general_dilated(jnp.transpose(h, (0, 3, 1, 2)), p[key]["k"], (1, 1), "SAME",
                                 dimension_numbers=("NCHW", "OIHW", "NCHW"))
    return jnp.transpose(_act(a)(y + p[key]["b"][:, None, None]), (0, 2, 3, 1))
  return f, f"nchw_conv({H},{a})"


def _b_dilated_conv(b, shape):
  key = b.block("dil")
  C, H = shape[-1], b.width()
  b.param(key, "k", (2, 2, C, H))
  b.param(key, "b", (H,), 0.3)
  a = b.act()
  def f(p, h):
    y = lax.conv_general_dilated(h, p[key]["k"], (1, 1), "SAME", rhs_dilation=(2, 2),
                                 dimension_numbers=DN)
    return _act(a)(y + p[key]["b"])
  return f, f"dilated_conv({H},{a})"


def _b_conv_transpose(b, shape):
  key = b.block("convT")
  C, H = shape[-1], b.width()
  b.param(key, "k", (2, 2, C, H))
  b.param(key, "b", (H,), 0.3)
  a = b.act()
  def f(p, h):
    y = lax.conv_transpose(h, p[key]["k"], (1, 1), "SAME", dimension_numbers=DN)
    return _act(a)(y + p[key]["b"])
  return f, f"conv_transpose({H},{a})"


def _b_ensemble(b, shape):
  """A vmapped ensemble of M dense layers, averaged."""
  key = b.block("ens")
  M, H = int(b.rng.integers(2, 4)), b.width()
  b.param(key, "w", (M, shape[-1], H), 1.0 / math.sqrt(shape[-1]))
  b.param(key, "b", (M, H), 0.3)
  a = b.act()
  def f(p, h):
    ys = jax.vmap(lambda w, bb: _act(a)(h @ w + bb))(p[key]["w"], p[key]["b"])
    return ys.mean(0)
  return f, f"ensemble(M{M},{H},{a})"


def _b_shared_twice(b, shape):
  """One dense layer applied to h and to -h, read apart: f(h) @ A + f(-h) @ B."""
  key = b.block("twice")
  F, H, O = shape[-1], b.width(), b.width()
  b.param(key, "w", (F, H))
  b.param(key, "b", (H,), 0.3)
  b.param(key, "A", (H, O))
  b.param(key, "B", (H, O))
  a = b.act()
  def f(p, h):
    q = p[key]
    g = lambda v: _act(a)(v @ q["w"] + q["b"])
    return g(h) @ q["A"] + g(-h) @ q["B"]
  return f, f"shared_twice({H},{O},{a})"


def _b_heads_kernel(b, shape):
  """A (D, heads, H) kernel, its output flattened to heads * H."""
  key = b.block("heads")
  nh, H = int(b.rng.integers(2, 4)), int(b.rng.integers(2, 5))
  b.param(key, "w", (shape[-1], nh, H))
  b.param(key, "b", (nh, H), 0.3)
  a = b.act()
  def f(p, h):
    y = _act(a)(jnp.einsum("...f,fhd->...hd", h, p[key]["w"]) + p[key]["b"])
    return y.reshape(y.shape[:-2] + (nh * H,))
  return f, f"heads_kernel({nh}x{H},{a})"


def _b_moe(b, shape):
  """A top-1 mixture of experts whose kernels are gathered per example."""
  key = b.block("moe")
  F, E, H = shape[-1], int(b.rng.integers(2, 4)), b.width()
  b.param(key, "router", (F, E))
  b.param(key, "w1", (E, F, H))
  b.param(key, "w2", (E, H, F))
  a = b.act()
  def f(p, h):
    q = p[key]
    e = jnp.argmax(h @ q["router"], -1)
    z = _act(a)(jnp.einsum("bd,bdh->bh", h, q["w1"][e]))
    return h + jnp.einsum("bh,bhd->bd", z, q["w2"][e])
  return f, f"moe(E{E},{H},{a})"


def _b_reflect_conv(b, shape):
  """Reflect padding then a VALID 3x3 conv."""
  key = b.block("rconv")
  C, H = shape[-1], b.width()
  b.param(key, "k", (3, 3, C, H))
  b.param(key, "b", (H,), 0.3)
  a = b.act()
  def f(p, h):
    h = jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    return _act(a)(_conv(h, p[key]["k"], padding="VALID") + p[key]["b"])
  return f, f"reflect_conv({H},{a})"


def _b_flatten(b, shape):
  return (lambda p, h: h.reshape(h.shape[0], -1)), "flatten"


def _b_global(b, shape):
  kind = ["mean", "max"][int(b.rng.integers(2))]
  axes = tuple(range(1, len(shape) - 1))
  def f(p, h):
    return h.mean(axes) if kind == "mean" else h.max(axes)
  return f, f"global_{kind}"


def _b_to_seq(b, shape):
  """(B, F) -> (B, k, F / k): a split of the units' axis."""
  F = shape[-1]
  ks = [k for k in (2, 3) if F % k == 0 and F // k >= 2]
  if not ks:
    return _b_act(b, shape)
  k = int(b.rng.choice(ks))
  return (lambda p, h: h.reshape(h.shape[0], k, F // k)), f"to_seq({k})"


def _b_img_to_seq(b, shape):
  return (lambda p, h: h.reshape(h.shape[0], -1, h.shape[-1])), "img_to_seq"


def _b_attention(b, shape):
  key = b.block("att")
  F = shape[-1]
  heads = int(b.rng.choice([1, 1, 2]))
  d, dv, O = int(b.rng.integers(2, 5)), int(b.rng.integers(2, 5)), b.width()
  fused = heads == 1 and b.rng.random() < 0.3
  if fused:
    b.param(key, "wqkv", (F, 3 * d))
  elif heads == 1:
    b.param(key, "wq", (F, d))
    b.param(key, "wk", (F, d))
    b.param(key, "wv", (F, dv))
  else:
    b.param(key, "wq", (F, heads, d))
    b.param(key, "wk", (F, heads, d))
    b.param(key, "wv", (F, heads, dv))
  wo_shape = (d if fused else dv, O) if heads == 1 else (heads, dv, O)
  b.param(key, "wo", wo_shape)
  residual = O == F and b.rng.random() < 0.5
  def f(p, h):
    q = p[key]
    if fused:
      qq, kk, vv = jnp.split(h @ q["wqkv"], 3, -1)
    elif heads == 1:
      qq, kk, vv = h @ q["wq"], h @ q["wk"], h @ q["wv"]
    if heads == 1:
      s = jax.nn.softmax(jnp.einsum("btd,bsd->bts", qq, kk) / math.sqrt(d), -1)
      o = jnp.einsum("bts,bsd->btd", s, vv) @ q["wo"]
    else:
      qq, kk, vv = (jnp.einsum("btf,fhd->bthd", h, q[n]) for n in ("wq", "wk", "wv"))
      s = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", qq, kk) / math.sqrt(d), -1)
      o = jnp.einsum("bhts,bshd->bthd", s, vv)
      o = jnp.einsum("bthd,hdo->bto", o, q["wo"])
    return h + o if residual else o
  return f, (f"attention(h{heads},d{d},dv{dv},{O}{',fused' if fused else ''}"
             f"{',res' if residual else ''})")


def _b_scan_layers(b, shape):
  """A layer scanned over stacked params (L, F, F), residual or not; a residual one may read the
  carried stream through a norm over the units (pre-norm blocks: _NORMS, stacked scales), so
  that the zero check follows the carry."""
  key = b.block("scan")
  F = shape[-1]
  L = int(b.rng.integers(2, 4))
  b.param(key, "W", (L, F, F))
  b.param(key, "b", (L, F), 0.3)
  a = b.act()
  residual = b.rng.random() < 0.5
  how = _NORMS[int(b.rng.integers(len(_NORMS)))] if residual and b.rng.random() < 0.5 else None
  if how:
    b.param(key, "g", (L, F), positive=True)
    b.param(key, "beta", (L, F), 0.3)
  def f(p, h):
    q = p[key]
    def body(c, wb):
      w, bb, *gb = wb
      y = _act(a)((_norm(how, c, *gb) if how else c) @ w + bb)
      return (c + y if residual else y), None
    out, _ = lax.scan(body, h, (q["W"], q["b"]) + ((q["g"], q["beta"]) if how else ()))
    return out
  return f, f"scan_layers(L{L},{a}{',res' if residual else ''}{f',{how}' if how else ''})"


def _b_rnn(b, shape):
  """An Elman RNN over the sequence's time axis; returns every step (B, T, H)."""
  key = b.block("rnn")
  F, H = shape[-1], b.width()
  b.param(key, "wx", (F, H))
  b.param(key, "wh", (H, H))
  b.param(key, "b", (H,), 0.3)
  a = ["tanh", "relu"][int(b.rng.integers(2))]
  def f(p, h):
    q = p[key]
    def body(c, xt):
      c = _act(a)(xt @ q["wx"] + c @ q["wh"] + q["b"])
      return c, c
    c0 = jnp.zeros((h.shape[0], H), h.dtype)
    _, ys = lax.scan(body, c0, jnp.swapaxes(h, 0, 1))
    return jnp.swapaxes(ys, 0, 1)
  return f, f"rnn({H},{a})"


def _b_token_mix(b, shape):
  """Mixer-style: transpose (B, T, F) -> (B, F, T), a dense layer over time, back."""
  key = b.block("mix")
  T = shape[1]
  b.param(key, "w", (T, T))
  b.param(key, "b", (T,), 0.3)
  a = b.act()
  def f(p, h):
    y = _act(a)(jnp.swapaxes(h, 1, 2) @ p[key]["w"] + p[key]["b"])
    return jnp.swapaxes(y, 1, 2)
  return f, f"token_mix({a})"


def _b_scale(b, shape):
  key = b.block("scale")
  b.param(key, "s", (shape[-1],), positive=True)
  return (lambda p, h: h * p[key]["s"]), "channel_scale"


PLAIN_BLOCKS = {
    2: [(_b_dense, 6), (_b_einsum_dense, 1), (_b_weightnorm_dense, 1), (_b_lowrank_dense, 1),
        (_b_act, 1), (_b_residual, 2), (_b_concat, 2), (_b_glu, 2), (_b_layernorm, 1),
        (_b_batchnorm, 1), (_b_scan_layers, 1), (_b_to_seq, 1), (_b_scale, 1), (_b_gated, 1),
        (_b_wrapped_dense, 1), (_b_leaky, 1), (_b_concat_ones, 1), (_b_scatter, 0.3),
        (_b_torch_dense, 1), (_b_ensemble, 1), (_b_shared_twice, 1), (_b_heads_kernel, 1),
        (_b_moe, 1)],
    3: [(_b_dense, 4), (_b_residual, 1), (_b_concat, 1), (_b_glu, 1), (_b_layernorm, 1),
        (_b_groupnorm, 1), (_b_attention, 3), (_b_rnn, 2), (_b_token_mix, 1), (_b_scan_layers, 1),
        (_b_global, 1), (_b_flatten, 1), (_b_batchnorm, 1), (_b_gated, 1), (_b_cumsum, 1),
        (_b_wrapped_dense, 1), (_b_topk, 1), (_b_cls_token, 1), (_b_take_time, 1),
        (_b_rotary, 0.5), (_b_torch_dense, 1), (_b_heads_kernel, 1)],
    4: [(_b_conv, 5), (_b_depthwise, 2), (_b_grouped, 2), (_b_residual, 2), (_b_concat, 1),
        (_b_groupnorm, 2), (_b_batchnorm, 1), (_b_pool, 1), (_b_global, 1), (_b_flatten, 1),
        (_b_img_to_seq, 1), (_b_dense, 1), (_b_reflect_conv, 1), (_b_shuffle, 1),
        (_b_nchw_conv, 1), (_b_dilated_conv, 1), (_b_conv_transpose, 1)],
}


def _choose(rng, weighted):
  w = np.array([c for _, c in weighted], float)
  return weighted[int(rng.choice(len(weighted), p=w / w.sum()))][0]


def make_plain(seed: int, dtype=np.float32) -> Model:
  rng = np.random.default_rng([seed, 1])
  b = _Builder(rng, dtype)
  start = ["vec", "seq", "img", "tokens"][int(rng.choice(4, p=[0.35, 0.25, 0.3, 0.1]))]
  fs, labels = [], []
  if start == "vec":
    x = rng.normal(size=(BATCH, int(rng.integers(2, 7))))
  elif start == "seq":
    x = rng.normal(size=(BATCH, int(rng.integers(3, 6)), int(rng.integers(2, 6))))
  elif start == "img":
    s = int(rng.integers(4, 7))
    x = rng.normal(size=(BATCH, s, s, int(rng.integers(1, 4))))
  else:
    T, V, E = int(rng.integers(3, 6)), int(rng.integers(5, 10)), b.width()
    x = rng.integers(0, V, size=(BATCH, T)).astype(np.int32)
    key = b.block("emb")
    b.param(key, "table", (V, E), 1.0)
    pos = rng.random() < 0.5
    if pos:
      b.param(key, "pos", (T, E), 0.3)
    def emb(p, h, key=key, pos=pos):
      e = jnp.take(p[key]["table"], h, axis=0)
      return e + p[key]["pos"][jnp.arange(h.shape[1])] if pos else e
    fs.append(emb)
    labels.append(f"embed({E}{',pos' if pos else ''})")
  x = np.asarray(x, dtype) if start != "tokens" else x
  shape = jax.eval_shape(_compose(fs), b.params, x).shape
  for _ in range(int(rng.integers(2, 8))):
    if len(shape) == 4 and min(shape[1:3]) < 2:       # a map shrunk to 1x1: leave it
      f, label = _b_global(b, shape)
    else:
      f, label = _choose(rng, PLAIN_BLOCKS[len(shape)])(b, shape)
    fs.append(f)
    labels.append(label)
    shape = jax.eval_shape(_compose(fs), b.params, x).shape
  if len(shape) > 2:                                   # to (B, F), then the readout
    f, label = (_b_global if rng.random() < 0.6 else _b_flatten)(b, shape)
    fs.append(f)
    labels.append(label)
    shape = jax.eval_shape(_compose(fs), b.params, x).shape
  f, label = _b_dense(b, shape, out=OUTPUTS, act="id")
  fs.append(f)
  labels.append(label)
  params = {k: v for k, v in b.params.items() if v}
  params = jax.tree.map(jax.device_put, params)
  fn = _compose(fs)
  container = ["dict", "dict", "list"][int(rng.integers(3))]
  if container == "list":          # params as a list of the blocks' dicts
    keys = list(params)
    params = [params[k] for k in keys]
    fn = (lambda f, keys: lambda p, x: f(dict(zip(keys, p)), x))(fn, keys)
  outputs = ["one", "one", "tuple", "dict"][int(rng.integers(4))]
  if outputs == "tuple":           # a second output computed from the first
    fn = (lambda f: lambda p, x: (lambda y: (y, jnp.tanh(y).sum(-1)))(f(p, x)))(fn)
  elif outputs == "dict":
    fn = (lambda f: lambda p, x: (lambda y: {"logits": y, "max": y.max(-1)})(f(p, x)))(fn)
  extra = "".join(f" [{w}]" for w in (container, f"{outputs} output")
                  if w not in ("dict", "one output"))
  return Model(seed, "plain", f"{start}{tuple(x.shape)}{extra}: " + " > ".join(labels), fn,
               params, jax.device_put(x))


def _compose(fs):
  def fn(p, x):
    h = x
    for f in fs:
      h = f(p, h)
    return h
  return fn


# ----------------------------------------------------------------------------- flax models


def _flax_config(rng, kind):
  """A random layer list for a linen or nnx model: (ops, input shape)."""
  start = ["vec", "img", "seq"][int(rng.choice(3, p=[0.4, 0.4, 0.2]))]
  if start == "vec":
    shape = (BATCH, int(rng.integers(2, 7)))
  elif start == "img":
    s = int(rng.integers(4, 7))
    shape = (BATCH, s, s, int(rng.integers(1, 4)))
  else:
    shape = (BATCH, int(rng.integers(3, 6)), int(rng.integers(2, 6)))
  ops, nd, c = [], len(shape), shape[-1]
  for _ in range(int(rng.integers(2, 6))):
    w = int(rng.integers(2, 9))
    if nd == 4:
      choices = ["conv", "conv", "dwconv", "bn", "gn", "act", "maxpool", "res_conv", "convT",
                 "avgpool_same", "instnorm"]
    elif nd == 3:
      choices = ["dense", "dense", "ln", "act", "attn", "rnn", "res_dense", "rms"]
    else:
      choices = ["dense", "dense", "dense", "bn", "ln", "act", "res_dense", "remat_dense",
                 "wn_dense", "rms"]
    if kind == "nnx":
      choices = [o for o in choices if o not in ("rnn", "remat_dense", "wn_dense",
                                                 "avgpool_same", "instnorm")]
    op = choices[int(rng.integers(len(choices)))]
    if op == "maxpool" and shape[1] < 4:
      op = "act"
    if op == "gn":
      divs = [g for g in range(2, c + 1) if c % g == 0]
      if not divs:
        op = "bn"
      else:
        ops.append(("gn", int(rng.choice(divs))))
        continue
    if op in ("conv", "dense", "convT", "remat_dense", "wn_dense"):
      ops.append((op, w, ACTS[int(rng.integers(len(ACTS)))]))
      c = w
    elif op == "dwconv":
      ops.append((op, int(rng.choice([1, 2]))))
      c = c * ops[-1][1]
    elif op == "attn":
      heads = int(rng.choice([1, 2]))
      ops.append((op, heads, heads * int(rng.integers(2, 4))))
    elif op == "rnn":
      ops.append((op, w, ["lstm", "gru", "simple"][int(rng.integers(3))]))
      c = w
    elif op in ("res_conv", "res_dense"):
      ops.append((op, w, ACTS[int(rng.integers(len(ACTS)))]))
    elif op == "act":
      ops.append((op, ACTS[int(rng.integers(len(ACTS)))]))
    elif op == "maxpool":
      ops.append((op,))
      shape = (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
    else:
      ops.append((op,))
  ops.append(("head", ["mean", "flatten"][int(rng.integers(2))]))
  return tuple(ops), shape


def make_linen(seed: int, dtype=np.float32) -> Model:
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng([seed, 2])
  ops, shape = _flax_config(rng, "linen")

  class Net(nn.Module):
    cfg: tuple
    pdt: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
      for op in self.cfg:
        name = op[0]
        if name == "dense":
          x = _act(op[2])(nn.Dense(op[1])(x))
        elif name == "conv":
          x = _act(op[2])(nn.Conv(op[1], (3, 3))(x))
        elif name == "convT":
          x = _act(op[2])(nn.ConvTranspose(op[1], (3, 3), padding="SAME")(x))
        elif name == "remat_dense":
          x = _act(op[2])(nn.remat(nn.Dense)(op[1])(x))
        elif name == "wn_dense":
          x = _act(op[2])(nn.WeightNorm(nn.Dense(op[1]))(x))
        elif name == "rms":
          x = nn.RMSNorm()(x)
        elif name == "instnorm":
          x = nn.InstanceNorm()(x)
        elif name == "avgpool_same":
          x = nn.avg_pool(x, (2, 2), padding="SAME")
        elif name == "dwconv":
          c = x.shape[-1]
          x = nn.Conv(c * op[1], (3, 3), feature_group_count=c)(x)
        elif name == "bn":
          x = nn.BatchNorm(use_running_average=True)(x)
        elif name == "ln":
          x = nn.LayerNorm()(x)
        elif name == "gn":
          x = nn.GroupNorm(num_groups=op[1])(x)
        elif name == "act":
          x = _act(op[1])(x)
        elif name == "maxpool":
          x = nn.max_pool(x, (2, 2), (2, 2))
        elif name == "res_conv":
          x = x + nn.Conv(x.shape[-1], (1, 1))(_act(op[2])(nn.Conv(op[1], (3, 3))(x)))
        elif name == "res_dense":
          x = x + nn.Dense(x.shape[-1])(_act(op[2])(nn.Dense(op[1])(x)))
        elif name == "attn":
          x = nn.MultiHeadDotProductAttention(num_heads=op[1], qkv_features=op[2])(x)
        elif name == "rnn":
          cell = {"lstm": nn.LSTMCell, "gru": nn.GRUCell, "simple": nn.SimpleCell}[op[2]]
          x = nn.RNN(cell(features=op[1], param_dtype=self.pdt))(x)
        elif name == "head":
          x = x.mean(tuple(range(1, x.ndim - 1))) if op[1] == "mean" else x.reshape(
              x.shape[0], -1)
          x = nn.Dense(OUTPUTS)(x)
      return x

  net = Net(ops, jnp.float64 if dtype == np.float64 else jnp.float32)
  x = jax.device_put(np.asarray(rng.normal(size=shape), dtype))
  variables = jax.jit(net.init)(jax.random.key(seed % (2 ** 31)), x)
  if any(op[0] == "bn" for op in ops):        # running statistics away from 0 and 1
    variables = dict(variables)
    def stat(kp, a):
      v = rng.normal(size=a.shape) * 0.3
      return jax.device_put(np.asarray(np.abs(v) + 0.5 if "var" in str(kp[-1]) else v, a.dtype))
    variables["batch_stats"] = jax.tree_util.tree_map_with_path(stat, variables["batch_stats"])
  if dtype != np.float32:
    variables = jax.tree.map(lambda a: a.astype(dtype), variables)
  return Model(seed, "linen", f"linen{shape}: " + " > ".join(map(_op_label, ops)), net.apply,
               variables, x)


def _op_label(op):
  return op[0] + ("(" + ",".join(map(str, op[1:])) + ")" if len(op) > 1 else "")


def make_nnx(seed: int, dtype=np.float32) -> Model:
  from flax import nnx  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng([seed, 3])
  ops, shape = _flax_config(rng, "nnx")
  param_dtype = jnp.float64 if dtype == np.float64 else jnp.float32

  class Net(nnx.Module):
    def __init__(self, cfg, in_shape, rngs):
      self.cfg = tuple(cfg)
      c, seq = in_shape[-1], in_shape
      for i, op in enumerate(cfg):
        name, layer = op[0], None
        kw = dict(rngs=rngs, param_dtype=param_dtype)
        if name == "dense":
          layer = nnx.Linear(c, op[1], **kw)
          c = op[1]
        elif name == "conv":
          layer = nnx.Conv(c, op[1], (3, 3), **kw)
          c = op[1]
        elif name == "convT":
          layer = nnx.ConvTranspose(c, op[1], (3, 3), padding="SAME", **kw)
          c = op[1]
        elif name == "rms":
          layer = nnx.RMSNorm(c, **kw)
        elif name == "dwconv":
          layer = nnx.Conv(c, c * op[1], (3, 3), feature_group_count=c, **kw)
          c = c * op[1]
        elif name == "bn":
          layer = nnx.BatchNorm(c, use_running_average=True, **kw)
        elif name == "ln":
          layer = nnx.LayerNorm(c, **kw)
        elif name == "gn":
          layer = nnx.GroupNorm(c, num_groups=op[1], **kw)
        elif name in ("res_conv", "res_dense"):
          if name == "res_conv":
            layer = (nnx.Conv(c, op[1], (3, 3), **kw), nnx.Conv(op[1], c, (1, 1), **kw))
          else:
            layer = (nnx.Linear(c, op[1], **kw), nnx.Linear(op[1], c, **kw))
          setattr(self, f"l{i}a", layer[0])
          setattr(self, f"l{i}b", layer[1])
          continue
        elif name == "attn":
          layer = nnx.MultiHeadAttention(num_heads=op[1], in_features=c, qkv_features=op[2],
                                         decode=False, **kw)
        elif name == "head":
          n_in = c if op[1] == "mean" else int(np.prod(seq[1:-1])) * c
          layer = nnx.Linear(n_in, OUTPUTS, **kw)
        elif name == "maxpool":
          seq = (seq[0], seq[1] // 2, seq[2] // 2) + seq[3:]
        if layer is not None:
          setattr(self, f"l{i}", layer)

    def __call__(self, x):
      for i, op in enumerate(self.cfg):
        name = op[0]
        if name in ("dense", "conv", "convT"):
          x = _act(op[2])(getattr(self, f"l{i}")(x))
        elif name in ("dwconv", "bn", "ln", "gn", "rms"):
          x = getattr(self, f"l{i}")(x)
        elif name == "attn":
          x = getattr(self, f"l{i}")(x, decode=False)
        elif name == "act":
          x = _act(op[1])(x)
        elif name == "maxpool":
          x = nnx.max_pool(x, (2, 2), (2, 2))
        elif name in ("res_conv", "res_dense"):
          x = x + getattr(self, f"l{i}b")(_act(op[2])(getattr(self, f"l{i}a")(x)))
        elif name == "head":
          x = x.mean(tuple(range(1, x.ndim - 1))) if op[1] == "mean" else x.reshape(
              x.shape[0], -1)
          x = getattr(self, f"l{i}")(x)
      return x

  model = Net(ops, shape, nnx.Rngs(seed % (2 ** 31)))
  model.eval()
  graphdef, state = nnx.split(model)
  x = jax.device_put(np.asarray(rng.normal(size=shape), dtype))
  if rng.random() < 0.5:             # the route docs/any-model.md shows: a pure dict
    params = nnx.to_pure_dict(state)

    def fn(p, x):
      s = jax.tree.map(lambda a: a, state)
      nnx.replace_by_pure_dict(s, p)
      return nnx.merge(graphdef, s)(x)
    route = "pure_dict"
  else:                              # the nnx State itself
    params = state

    def fn(s, x):
      return nnx.merge(graphdef, s)(x)
    route = "State"
  return Model(seed, "nnx", f"nnx[{route}]{shape}: " + " > ".join(map(_op_label, ops)), fn,
               params, x)


FAMILIES = {"plain": make_plain, "linen": make_linen, "nnx": make_nnx}


def make_model(seed: int, family: str | None = None, dtype=np.float32) -> Model:
  """The model of ``seed``: plain JAX 70%, linen 15%, nnx 15% (or the given family)."""
  if family is None:
    r = np.random.default_rng([seed, 0]).random()
    family = "plain" if r < 0.7 else "linen" if r < 0.85 else "nnx"
  return FAMILIES[family](seed, dtype)


# ----------------------------------------------------------------------------- checks


@dataclasses.dataclass
class Result:
  seed: int
  desc: str
  family: str = ""
  groups: dict = dataclasses.field(default_factory=dict)      # name -> size
  refusal: str | None = None          # trace refused the model (documented error)
  reasons: list = dataclasses.field(default_factory=list)     # explain()'s not-prunable reasons
  violations: list = dataclasses.field(default_factory=list)  # (kind, detail)
  skipped: str | None = None          # the generator's model did not run: not a finding
  notes: list = dataclasses.field(default_factory=list)       # documented refusals after trace
  checked: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def bad(self, kind, detail):
    self.violations.append((kind, detail))


class _Skip(Exception):
  pass


def _documented(e: BaseException) -> bool:
  return isinstance(e, (ValueError, TypeError)) and bool(str(e).strip())


def _not_prunable_reasons(text: str) -> list[str]:
  """The reasons inside every ``not prunable (...)`` of explain()'s text."""
  out, i = [], 0
  while (i := text.find("not prunable (", i)) >= 0:
    j = i + len("not prunable (")
    depth, k = 1, j
    while k < len(text) and depth:
      depth += {"(": 1, ")": -1}.get(text[k], 0)
      k += 1
    inner, parts, depth, start = text[j:k - 1], [], 0, 0
    for n, ch in enumerate(inner):          # split at the "; " outside nested parentheses
      depth += {"(": 1, ")": -1}.get(ch, 0)
      if depth == 0 and inner.startswith("; ", n):
        parts.append(inner[start:n])
        start = n + 2
    out.extend(r.strip() for r in parts + [inner[start:]])
    i = k
  return out


def reason_key(reason: str, words: int = 6) -> str:
  reason = re.sub(r"'[^']*'", "'…'", reason)
  reason = re.sub(r"\([^()]*\)", "", reason)
  return " ".join(reason.replace(":", " ").split()[:words])


def _leaf(tree, path):
  return np.asarray(U.get_path(tree, path))


def unit_index(shape, s) -> tuple[int, np.ndarray]:
  """The leaf axis slice ``s`` cuts and, for each position along it, the unit it belongs to
  (-1: outside the slice's segment). Written from the Slice docs, apart from the library."""
  if s.view is None:
    axis = s.axis % len(shape)
    n = shape[axis]
    idx = np.arange(n)
    if s.segment is not None:
      start, length = s.segment
      idx = np.where((idx >= start) & (idx < start + length), idx - start, -1)
    return axis, idx
  view = list(s.view)
  if math.prod(view) != math.prod(shape):
    raise AssertionError(f"view {view} does not fit leaf {shape}")
  ax = s.axis % len(view)
  cv = np.cumprod([1] + view).tolist()
  cl = np.cumprod([1] + list(shape)).tolist()
  ks = [k for k in range(len(shape)) if cl[k] <= cv[ax] and cv[ax + 1] <= cl[k + 1]]
  k = next((k for k in ks if shape[k] > 1), ks[0])     # all of size 1: any of them
  j0 = max(j for j in range(ax + 1) if cv[j] == cl[k])
  j1 = min(j for j in range(ax + 1, len(view) + 1) if cv[j] == cl[k + 1])
  sub = view[j0:j1]
  units = np.arange(view[ax])
  if s.segment is not None:
    start, length = s.segment
    units = np.where((units >= start) & (units < start + length), units - start, -1)
  bshape = [1] * len(sub)
  bshape[ax - j0] = sub[ax - j0]
  return k, np.broadcast_to(units.reshape(bshape), sub).reshape(-1)


def expected_compaction(params, groups, unit_masks) -> dict:
  """path -> the leaf with every masked unit's entries removed (all groups)."""
  keeps: dict = {}
  for name, g in groups.items():
    if name not in unit_masks:
      continue
    keep = np.asarray(unit_masks[name], bool)
    for s in g.slices:
      shape = np.shape(U.get_path(params, s.path))
      k, idx = unit_index(shape, s)
      vec = (idx < 0) | keep[np.maximum(idx, 0)]
      d = keeps.setdefault(tuple(s.path), {})
      d[k] = d[k] & vec if k in d else vec
  out = {}
  for path, axes in keeps.items():
    leaf = _leaf(params, path)
    for k, vec in axes.items():
      leaf = np.compress(vec, leaf, axis=k)
    out[path] = leaf
  return out


def duplicate_unit(params, group, j, i):
  """Params where unit j's producer slices are copies of unit i's (numpy, host side)."""
  out = params
  for s in group.producers:
    leaf = _leaf(out, s.path).copy()
    k, idx = unit_index(leaf.shape, s)
    src, dst = np.flatnonzero(idx == i), np.flatnonzero(idx == j)
    sl_src = [slice(None)] * leaf.ndim
    sl_dst = [slice(None)] * leaf.ndim
    sl_src[k], sl_dst[k] = src, dst
    leaf[tuple(sl_dst)] = leaf[tuple(sl_src)]
    out = U.set_path(out, s.path, jax.device_put(leaf))
  return out


def _finite(a) -> bool:
  return all(np.isfinite(np.asarray(l)).all() for l in jax.tree.leaves(a))


def _close(a, b, rtol) -> tuple[bool, float]:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  if len(la) != len(lb):
    return False, math.inf
  worst = 0.0
  for x, y in zip(la, lb):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape:
      return False, math.inf
    if np.isnan(x).any() or np.isnan(y).any():
      return False, math.nan
    scale = max(1.0, float(np.abs(x).max(initial=0.0)))
    worst = max(worst, float(np.abs(x - y).max(initial=0.0)) / scale)
  return worst <= rtol, worst


def default_compact(target, params, unit_masks):
  return target.compact(params, unit_masks)


def mask_params(params, target, unit_masks):
  """``params`` times the weight masks ``jaxprune.expand`` makes (``apply_masks``' ``where``,
  on the host: ``apply_masks`` compiles a program per tree of shapes, and this runs once per
  model)."""
  wm = jaxprune.expand(params, target, unit_masks)
  return jax.tree.map(lambda p, m: jax.device_put(
      np.where(np.asarray(m), np.asarray(p), np.zeros((), np.asarray(p).dtype))), params, wm)


def check_model(model: Model, *, compact: Callable = default_compact, rtol: float | None = None,
                merge: bool = True, small_batch: float = 0.4, recompact: float = 0.3,
                activations: bool = True, verbose: bool = False) -> Result:
  """Runs every check on ``model`` and returns what it found.

  ``compact(target, params, unit_masks)`` may be replaced (the suite checks that a wrong
  compaction is caught); ``small_batch`` is the share of models also checked at batch 2 (two
  more compilations each), ``recompact`` the share whose compacted target is compacted again
  (one more); ``activations=False`` skips the activations, readout and merge checks (one or two
  compilations). The masked network runs through ``jax.jit(target.apply)`` (for a
  traced target, ``fn`` itself after shape checks), compiled once per model: the original, the
  masked, the duplicated and the merged params all have the same shapes."""
  res = Result(model.seed, model.desc, model.family)
  if rtol is None:
    rtol = 1e-9 if jax.tree.leaves(model.params)[0].dtype == np.float64 else 2e-4
  # One stream per decision, so that a seed draws the same masks whatever checks are skipped.
  r_trace, r_acts, r_masks, r_batch, r_more, r_merge = (
      np.random.default_rng([model.seed, 7, i]) for i in range(6))
  fn, params, x = model.fn, model.params, model.x

  def say(*a):
    if verbose:
      print(*a)

  def unexpected(phase, e):
    res.bad(f"{phase}-raised", f"{type(e).__name__}: {str(e)[:400]}")
    if verbose:
      traceback.print_exc()

  from_shapes = r_trace.random() < 0.2      # trace needs only shapes
  try:
    target = jaxprune.trace(fn, jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), params) if from_shapes else params, x)
  except Exception as e:  # pylint: disable=broad-except
    try:                 # a model the generator got wrong is not a finding
      out = jax.jit(fn)(params, x)
      ran = _finite(out)
    except Exception:  # pylint: disable=broad-except
      ran = False
    if not ran:
      res.skipped = "model does not run or is not finite"
    elif _documented(e) and "Could not trace" not in str(e):
      res.refusal = str(e)
    else:
      unexpected("trace", e)
    return res
  run = jax.jit(target.apply)
  try:
    out = run(params, x)
  except Exception as e:  # pylint: disable=broad-except
    try:
      jax.jit(fn)(params, x)
    except Exception:  # pylint: disable=broad-except
      res.skipped = f"model does not run: {type(e).__name__}: {str(e)[:200]}"
      return res
    unexpected("apply", e)
    return res
  if not _finite(out):
    res.skipped = "model output not finite"
    return res
  res.groups = {n: g.size for n, g in target.groups.items()}
  say("groups:", res.groups)
  try:
    text = target.explain()
    res.reasons = _not_prunable_reasons(text)
    say(text)
    if len(text.splitlines()) < len(jax.tree.leaves(params)):
      res.bad("explain", f"{len(text.splitlines())} lines for {len(jax.tree.leaves(params))} "
                         "param leaves")
  except Exception as e:  # pylint: disable=broad-except
    unexpected("explain", e)
  groups = target.groups
  try:
    jaxprune.check_groups(params, groups)      # the traced groups pass the library's own check
  except Exception as e:  # pylint: disable=broad-except
    res.bad("check_groups", f"{type(e).__name__}: {str(e)[:300]}")
  complete = {}
  for name in groups:
    try:
      complete[name] = target.activations_complete(name)
      why = target.activations_incomplete_why(name)
      if complete[name] != (why is None):
        res.bad("complete", f"{name}: activations_complete={complete[name]} but why={why!r}")
    except Exception as e:  # pylint: disable=broad-except
      unexpected("complete", e)
  if not groups:
    return res
  # activations of one group (one compilation each): the one the merge check uses, if any.
  mergeable = [n for n, g in groups.items() if g.size >= 2 and not g.read_by_products
               and complete.get(n)]
  names = mergeable or list(groups)
  readouts = []
  try:
    readouts = [n for n in names if target.readout(n) is not None]
  except Exception as e:  # pylint: disable=broad-except
    unexpected("readout", e)
  if readouts and r_acts.random() < 0.5:
    names = readouts
  act_name = names[int(r_acts.integers(len(names)))] if activations else None
  try:
    if act_name is None:
      raise _Skip()
    res.checked["activations"] += 1
    acts = target.activations(params, x, act_name)
    if np.shape(acts)[-1] != groups[act_name].size:
      res.bad("activations", f"{act_name}: shape {np.shape(acts)}, size {groups[act_name].size}")
    elif not _finite(acts):
      res.bad("activations", f"{act_name}: not finite")
    elif act_name in readouts:
      _check_readout(res, target, params, x, run, out, act_name, np.asarray(acts), rtol)
  except _Skip:
    pass
  except Exception as e:  # pylint: disable=broad-except
    if _documented(e):
      res.notes.append(f"activations({act_name}): {str(e)[:80]}")
    else:
      unexpected("activations", e)

  um = random_masks(groups, r_masks)
  if len(um) > 1 and r_masks.random() < 0.3:      # groups not named keep all their units
    um.pop(list(um)[int(r_masks.integers(len(um)))])
  say("masks:", {n: m.astype(int).tolist() for n, m in um.items()})
  try:
    masked = mask_params(params, target, um)
    ref = run(masked, x)
  except Exception as e:  # pylint: disable=broad-except
    unexpected("mask", e)
    return res
  try:
    small, small_target = compact(target, params, um)
  except Exception as e:  # pylint: disable=broad-except
    unexpected("compact", e)
    return res
  _check_small_params(res, params, small, groups, um, small_target)
  other = int(r_batch.choice([2, 5]))
  batches = (BATCH, other) if r_batch.random() < small_batch else (BATCH,)
  for b in batches:
    xb = x if b == BATCH else jax.device_put(
        np.resize(np.asarray(x), (b,) + tuple(np.shape(x)[1:])))     # the rows again, on the host
    try:
      got = small_target.apply(small, xb)
      want = ref if b == BATCH else run(masked, xb)
    except Exception as e:  # pylint: disable=broad-except
      unexpected(f"small-apply@{b}", e)
      continue
    res.checked[f"compact@{b}"] += 1
    ok, err = _close(got, want, rtol)
    if not ok:
      nan_ref, nan_got = not _finite(want), not _finite(got)
      detail = (f"masked NaN={nan_ref}, compacted NaN={nan_got}" if nan_ref or nan_got
                else f"max relative error {err:.3g}")
      culprits = [n for n in um if _mismatch_alone(target, params, xb, n, um[n], rtol)]
      res.bad(f"mismatch@{b}", f"{detail}; groups alone that differ: {culprits}")
  if (act_name in um and act_name in small_target.groups and not res.violations
      and r_more.random() < 0.5 and not any(n.startswith(f"activations({act_name})")
                                         for n in res.notes)):
    try:                 # the compacted target's activations are the masked one's kept units
      want = np.asarray(target.activations(masked, x, act_name))[..., um[act_name]]
      got = np.asarray(small_target.activations(small, x, act_name))
      res.checked["small-activations"] += 1
      ok, err = _close_cut(got, want, um, rtol)
      if not ok:
        res.bad("small-activations", f"{act_name}: the compacted target's activations are not "
                                     f"the masked network's kept units ({err:.3g})")
    except Exception as e:  # pylint: disable=broad-except
      unexpected("small-activations", e)
  if not res.violations and r_more.random() < recompact:
    _check_recompact(res, small_target, small, x, r_more, rtol)
  try:
    back = jaxprune.units.uncompact(small, params, target, um)
    for (p1, a), (_, c) in zip(jax.tree_util.tree_flatten_with_path(back)[0],
                               jax.tree_util.tree_flatten_with_path(masked)[0]):
      if not np.array_equal(np.asarray(a), np.asarray(c)):
        res.bad("uncompact", f"{U.path_str(_path_of(p1))} differs from the masked params")
        break
  except Exception as e:  # pylint: disable=broad-except
    unexpected("uncompact", e)
  if merge and act_name in mergeable:
    _check_merge(res, target, params, x, run, act_name, r_merge, rtol)
  return res


def _close_cut(got, want, um, rtol):
  """_close, where ``want``'s other axes may be another group's units (a (heads, head_dim)
  kernel's activations, shaped (..., heads, d)): axes whose sizes differ are cut by every mask
  of that size and kept count (any that matches)."""
  if got.ndim != want.ndim:
    return False, math.inf
  options = [[None]] * want.ndim
  for d in range(want.ndim - 1):
    if got.shape[d] != want.shape[d]:
      options[d] = [m for m in um.values() if m.size == want.shape[d] and m.sum() == got.shape[d]]
  best = (False, math.inf)
  for combo in itertools.islice(itertools.product(*options), 64):
    w = want
    for d, m in enumerate(combo):
      if m is not None:
        w = np.compress(m, w, axis=d)
    ok, err = _close(got, w, rtol)
    if ok:
      return ok, err
    best = min(best, (ok, err), key=lambda t: t[1] if not math.isnan(t[1]) else math.inf)
  return best


def _check_readout(res, target, params, x, run, out, name, acts, rtol):
  """``readout(name)``: the affine map to the output reads exactly the activations, so zeroing
  its rows for the group changes the output by ``acts @ rows`` (checked for a dense readout of
  (batch, units) activations into a (batch, outputs) output)."""
  s = target.readout(name)
  leaf = _leaf(params, s.path)
  outs = jax.tree.leaves(out)
  if s.view is not None or leaf.ndim != 2 or acts.ndim != 2 or len(outs) != 1 or outs[0].ndim != 2:
    return
  k, idx = unit_index(leaf.shape, s)
  zeroed = leaf.copy()
  sl = [slice(None)] * 2
  sl[k] = np.flatnonzero(idx >= 0)
  zeroed[tuple(sl)] = 0
  rows = np.moveaxis(leaf, k, 0)[np.flatnonzero(idx >= 0)]          # (units, outputs)
  res.checked["readout"] += 1
  diff = np.asarray(outs[0], np.float64) - np.asarray(
      jax.tree.leaves(run(U.set_path(params, s.path, jax.device_put(zeroed)), x))[0], np.float64)
  ok, err = _close(diff, acts.astype(np.float64) @ rows.astype(np.float64), max(rtol, 1e-4))
  if not ok:
    res.bad("readout", f"{name}: the output's part through readout {U.path_str(s.path)} is not "
                       f"activations @ rows ({err:.3g})")


def random_masks(groups, rng) -> dict:
  """A random unit mask per group: at least one unit kept, at least one removed (size > 1)."""
  um = {}
  for name, g in groups.items():
    n_keep = int(rng.integers(1, g.size)) if g.size > 1 else 1
    keep = np.zeros(g.size, bool)
    keep[rng.choice(g.size, n_keep, replace=False)] = True
    um[name] = keep
  return um


def _check_recompact(res, target, params, x, rng, rtol):
  """A compacted target compacted again ("compacting an existing target keeps its groups")."""
  groups = target.groups
  um = random_masks(groups, rng)
  try:
    masked = mask_params(params, target, um)
    want = target.apply(masked, x)
    small, small_target = target.compact(params, um)
    _check_small_params(res, params, small, groups, um, small_target, "recompact")
    got = small_target.apply(small, x)
  except Exception as e:  # pylint: disable=broad-except
    res.bad("recompact-raised", f"{type(e).__name__}: {str(e)[:300]}")
    return
  res.checked["recompact"] += 1
  ok, err = _close(got, want, rtol)
  if not ok:
    res.bad("recompact-mismatch", f"compacting the compacted target again: {err:.3g}")


def _mismatch_alone(target, params, x, name, keep, rtol) -> bool:
  """Whether compacting group ``name`` alone already differs from masking it."""
  try:
    um = {name: keep}
    small, st = target.compact(params, um)
    return not _close(st.apply(small, x), jax.jit(target.apply)(
        mask_params(params, target, um), x), rtol)[0]
  except Exception:  # pylint: disable=broad-except
    return True


def _check_small_params(res, params, small, groups, um, small_target, prefix="compact"):
  try:
    want = expected_compaction(params, groups, um)
  except Exception as e:  # pylint: disable=broad-except
    res.bad("fuzzer", f"expected_compaction failed: {type(e).__name__}: {e}")
    return
  flat_p = {_path_of(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  flat_s = {_path_of(kp): v for kp, v in jax.tree_util.tree_flatten_with_path(small)[0]}
  if flat_p.keys() != flat_s.keys():
    res.bad(f"{prefix}-structure", f"leaves {sorted(map(str, flat_p.keys() ^ flat_s.keys()))[:4]}")
    return
  for path, leaf in want.items():
    got = _leaf(small, path)
    if got.shape != leaf.shape:
      res.bad(f"{prefix}-shape", f"{U.path_str(path)}: {got.shape}, kept entries give {leaf.shape}")
    elif not np.array_equal(got, leaf):
      res.bad(f"{prefix}-values", f"{U.path_str(path)}: not the kept entries")
  for path, v in flat_p.items():         # leaves no group cuts keep their shape and values
    if path not in want and not np.array_equal(np.asarray(v), np.asarray(flat_s[path])):
      res.bad(f"{prefix}-untouched", f"{U.path_str(path)} changed though no group cuts it")
  try:
    sizes = {n: g.size for n, g in small_target.groups.items()}
    for name, m in um.items():
      if sizes.get(name) != int(m.sum()):
        res.bad(f"{prefix}-groups",
                f"{name}: small target has {sizes.get(name)}, kept {int(m.sum())}")
  except Exception as e:  # pylint: disable=broad-except
    res.bad(f"{prefix}-groups-raised", f"{type(e).__name__}: {e}")


def _path_of(kp) -> tuple:
  return tuple(U.key_of(k) for k in kp)


def _check_merge(res, target, params, x, run, name, rng, rtol):
  """Unit j made an exact copy of unit i (every producer slice), merged into i by
  ``redistribute`` (``I + e_i e_j^T``: i's outgoing rows gain j's) and masked: the outputs
  stay the duplicated model's."""
  g = target.groups[name]
  i, j = (int(v) for v in rng.choice(g.size, 2, replace=False))
  try:
    dup = duplicate_unit(params, g, j, i)
    acts = np.asarray(target.activations(dup, x, name))
    if not np.allclose(acts[..., i], acts[..., j], rtol=1e-5, atol=1e-6):
      res.bad("merge-duplicate", f"{name}: unit {j} copied from {i} (every producer slice) "
                                 "has other activations")
      return
    want = run(dup, x)
    transfer = np.eye(g.size, dtype=np.asarray(jax.tree.leaves(params)[0]).dtype)
    transfer[i, j] = 1.0
    merged = jax.jit(jaxprune.units.redistribute, static_argnums=1)(
        dup, g, jax.device_put(transfer))
    keep = np.ones(g.size, bool)
    keep[j] = False
    res.checked["merge"] += 1
    ok, err = _close(run(mask_params(merged, target, {name: keep}), x), want, rtol)
    if not ok:
      res.bad("merge", f"{name}: merging duplicate unit {j} into {i} changed the outputs "
                       f"({err:.3g})")
  except Exception as e:  # pylint: disable=broad-except
    if _documented(e):
      res.notes.append(f"merge({name}): {str(e)[:80]}")
    else:
      res.bad("merge-raised", f"{type(e).__name__}: {str(e)[:300]}")


# ----------------------------------------------------------------------------- driver


def fuzz(seeds, family=None, dtype=np.float32, progress=False, clear_every=50, **check_kw):
  """Makes and checks the model of each seed (``check_kw`` goes to :func:`check_model`)."""
  results = []
  for n, seed in enumerate(seeds):
    try:
      model = make_model(seed, family, dtype)
    except Exception as e:  # pylint: disable=broad-except
      r = Result(seed, "?")
      r.skipped = f"generator failed: {type(e).__name__}: {str(e)[:200]}"
      results.append(r)
      continue
    try:
      results.append(check_model(model, **check_kw))
    except Exception as e:  # pylint: disable=broad-except
      r = Result(seed, model.desc)
      r.bad("fuzzer-raised", f"{type(e).__name__}: {str(e)[:300]}")
      results.append(r)
    if progress and (n + 1) % 25 == 0:
      print(f"  {n + 1} models, {sum(len(r.violations) for r in results)} violations",
            flush=True)
    if clear_every and (n + 1) % clear_every == 0:
      jax.clear_caches()      # XLA:CPU keeps every program's code mapped (see tests/conftest.py)
  return results


def summary(results, seconds=None) -> str:
  lines = []
  ran = [r for r in results if not r.skipped]
  traced = [r for r in ran if r.refusal is None and not any(k == "trace-raised"
                                                            for k, _ in r.violations)]
  # plain models by input kind (vec, seq, img, tokens), flax ones by family
  fam = collections.Counter(r.desc.split("(")[0].split("[")[0].split(":")[0] for r in ran)
  n_groups = sum(len(r.groups) for r in traced)
  lines.append(f"models: {len(results)} ({len(ran)} ran; {len(results) - len(ran)} skipped as "
               f"generator faults)" + (f" in {seconds:.1f} s" if seconds is not None else ""))
  lines.append("  by input/family: " + ", ".join(f"{k} {v}" for k, v in sorted(fam.items())))
  lines.append(f"traced: {len(traced)}; groups: {n_groups} "
               f"({sum(1 for r in traced if r.groups)} models with at least one group)")
  checked = sum((r.checked for r in results), collections.Counter())
  lines.append("checks run: " + ", ".join(f"{k} {v}" for k, v in sorted(checked.items())))
  refused = collections.Counter(reason_key(r.refusal, 8) for r in ran if r.refusal)
  if refused:
    lines.append(f"trace refused {sum(refused.values())} models:")
    lines += [f"  {v:4d}  {k}" for k, v in refused.most_common()]
  reasons = collections.Counter(reason_key(x) for r in traced for x in r.reasons)
  lines.append(f"not-prunable axes by reason (explain(), first words; {sum(reasons.values())}):")
  lines += [f"  {v:4d}  {k}" for k, v in reasons.most_common(25)]
  notes = collections.Counter(reason_key(x.split(": ", 1)[1], 8) for r in traced
                              for x in r.notes)
  if notes:
    lines.append("documented refusals after tracing (activations / merges):")
    lines += [f"  {v:4d}  {k}" for k, v in notes.most_common(10)]
  skipped = collections.Counter(reason_key(r.skipped, 8) for r in results if r.skipped)
  if skipped:
    lines.append("skipped: " + "; ".join(f"{v} {k}" for k, v in skipped.most_common())
                 + " (seeds " + ", ".join(str(r.seed) for r in results if r.skipped)[:200] + ")")
  bad = [r for r in results if r.violations]
  kinds = collections.Counter(k for r in bad for k, _ in r.violations)
  lines.append(f"violations: {sum(kinds.values())} in {len(bad)} models"
               + (" (" + ", ".join(f"{k} {v}" for k, v in kinds.most_common()) + ")"
                  if kinds else ""))
  for r in bad:
    lines.append(f"  seed {r.seed}: {r.desc}")
    for k, d in r.violations:
      lines.append(f"      {k}: {d}")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", type=int, default=300)
  parser.add_argument("--seed", type=int, default=0, help="model seeds are seed*100000 + i")
  parser.add_argument("--family", choices=sorted(FAMILIES), default=None)
  parser.add_argument("--x64", action="store_true", help="float64 models, tolerance 1e-9")
  parser.add_argument("--no-merge", action="store_true", help="skip the duplicate-merge check")
  parser.add_argument("--other-batch", type=float, default=0.4, metavar="SHARE",
                      help="share of models also compared at batch 2 or 5 (default 0.4)")
  parser.add_argument("--quick", action="store_true",
                      help="trace, compact and compare only (no activations, readout, merge, "
                           "other batch or recompaction checks): about half the compilations")
  parser.add_argument("--replay", type=int, default=None, help="check one model seed, verbosely")
  args = parser.parse_args()
  if args.x64:
    jax.config.update("jax_enable_x64", True)
  dtype = np.float64 if args.x64 else np.float32
  kw = dict(merge=not args.no_merge, small_batch=args.other_batch)
  if args.quick:
    kw.update(small_batch=0.0, recompact=0.0, activations=False)
  if args.replay is not None:
    model = make_model(args.replay, args.family, dtype)
    print(f"seed {model.seed} ({model.family}): {model.desc}")
    r = check_model(model, verbose=True, **kw)
    print(summary([r]))
    return 1 if r.violations else 0
  seeds = [args.seed * 100000 + i for i in range(args.models)]
  t0 = time.perf_counter()
  results = fuzz(seeds, args.family, dtype, progress=True, **kw)
  print(summary(results, time.perf_counter() - t0))
  return 1 if any(r.violations for r in results) else 0


if __name__ == "__main__":
  sys.exit(main())
