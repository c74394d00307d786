"""Lighter XLA:CPU compilation for programs that run briefly next to their compilation.

An initialiser or a set-up pass runs for milliseconds but XLA:CPU compiles it at its default
LLVM optimisation level (2) for up to seconds: 14 s for a ResNet-18 initialiser of small,
distinct widths, 3.5 s for CNN4's. At level 1 the same programs compile 2-4x faster and
computed the same bits in every program measured: level 1 still contracts ``a * b + c`` into
one fused multiply-add, as level 2 does (docs/benchmarks.md; an observation on this CPU that
the tests check for an MLP's initialiser, not a guarantee of XLA's). Level 0 compiles faster
still but does not contract, so float results can differ in the last bit; it is only for
programs without float arithmetic to contract (copies, masks, zeros, integer key splits).

JAX allows per-program options only on a top-level ``jax.jit``. :func:`light_jit` therefore
compiles with them when it is called eagerly (or under ``vmap``) on CPU, and as a plain jit
when it is traced inside another jit, or on other backends. Nesting is recognised by the
``ValueError`` JAX raises for it (its message names ``compiler_options``); should a later JAX
word it otherwise, calls inside a jit would raise, which tests/test_models.py would show.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

DEFAULT_LEVEL = {"xla_backend_optimization_level": 2}   # XLA:CPU's default
LEVEL_1 = {"xla_backend_optimization_level": 1}   # same bits as the default level
LEVEL_0 = {"xla_backend_optimization_level": 0}   # no multiply-add contraction


class LightJit:
  """``jax.jit(fn)`` compiled with ``options`` where JAX allows it (see the module doc)."""

  def __init__(self, fn: Callable, options: dict[str, Any], **jit_kwargs):
    self.light = jax.jit(fn, compiler_options=dict(options), **jit_kwargs)
    self.plain = jax.jit(fn, **jit_kwargs)

  def __call__(self, *args, **kwargs):
    if jax.default_backend() != "cpu":
      return self.plain(*args, **kwargs)
    try:
      return self.light(*args, **kwargs)
    except ValueError as e:   # traced inside another jit: options are not allowed there
      if "compiler_options" not in str(e):
        raise
      return self.plain(*args, **kwargs)


def light_jit(fn: Callable, options: dict[str, Any] = LEVEL_1, **jit_kwargs) -> LightJit:
  """A jit of ``fn`` compiled at a lower LLVM level on CPU (``LEVEL_1`` keeps the bits)."""
  return LightJit(fn, options, **jit_kwargs)
