"""Tracing and compacting do work linear in the depth, counted, not timed: twice the layers,
about twice the steps. Each group once walked back over the whole network before it (to check
which kernels feed its activations), each site went through every parameter use, and each
chain rebuilt an index of the whole program, so a 128-layer model took seconds (a trace of 800
layers 8.8 s; 0.3 s since)."""

import jax
import jax.numpy as jnp
import pytest

import jaxprune
from jaxprune import tracing


def _mlp(p, x):
  for layer in p[:-1]:
    x = jnp.tanh(x @ layer["w"] + layer["b"])
  return x @ p[-1]["w"] + p[-1]["b"]


def _glu(p, x):
  for layer in p[:-1]:
    gate, value = jnp.split(x @ layer["w"], 2, -1)      # a fused gate-value kernel, cut
    x = x + (jax.nn.silu(gate) * value) @ layer["b"]    # b: the down projection
  return x @ p[-1]["w"]


def _steps(depth, monkeypatch, glu=False):
  """Steps of the walks back and of the union-find during a trace and a compact."""
  counts = {"back": 0, "find": 0}
  backward, find = tracing._Walker._backward, tracing._Atoms.find

  def counted_backward(self, *args, **kwargs):
    for item in backward(self, *args, **kwargs):
      counts["back"] += 1
      yield item

  def counted_find(self, a):
    counts["find"] += 1
    return find(self, a)

  monkeypatch.setattr(tracing._Walker, "_backward", counted_backward)
  monkeypatch.setattr(tracing._Atoms, "find", counted_find)
  if glu:
    params = [{"w": jnp.zeros((6, 16)), "b": jnp.zeros((8, 6))} for _ in range(depth)]
    params.append({"w": jnp.zeros((6, 3))})
  else:
    sizes = [6] + [8] * depth + [3]
    params = [{"w": jnp.zeros((a, b)), "b": jnp.zeros(b)} for a, b in zip(sizes[:-1], sizes[1:])]
  target = jaxprune.trace(_glu if glu else _mlp, params, jax.ShapeDtypeStruct((2, 6), jnp.float32))
  assert len(target.groups) == depth and all(g.size == 8 for g in target.groups.values())
  target.compact(params, {n: jnp.arange(8) != 3 for n in target.groups})
  monkeypatch.undo()
  return counts


@pytest.mark.parametrize("glu", [False, True])
def test_trace_and_compact_steps_grow_linearly_with_depth(monkeypatch, glu):
  small, big = _steps(30, monkeypatch, glu), _steps(60, monkeypatch, glu)
  for k in small:
    assert big[k] <= 2.3 * small[k], (k, small[k], big[k])
