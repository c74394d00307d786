"""The input checks' output shapes (``validate.num_outputs`` / ``output_shape``) are traced once per
model and abstract inputs: a warm ``evaluate`` traces nothing, and a change of params or input
shapes, of model, or an unhashable model still gives the right answer."""

import dataclasses
import gc
import weakref

import jax
import numpy as np

import jaxprune
from jaxprune import validate

TRACES = []


@dataclasses.dataclass(frozen=True)
class CountingMLP(jaxprune.MLP):
  """The built-in MLP, counting the times its apply runs in Python (each is a trace)."""

  def apply(self, params, x):
    TRACES.append(np.shape(x))
    return super().apply(params, x)


@dataclasses.dataclass(frozen=True)
class Linear:
  def apply(self, params, x):
    TRACES.append(np.shape(x))
    return x @ params["w"]


@dataclasses.dataclass          # eq=True without frozen: unhashable
class Unhashable:
  scale: float = 1.0

  def apply(self, params, x):
    TRACES.append(np.shape(x))
    return x @ params["w"] * self.scale


def _w(i, o):
  return {"w": np.zeros((i, o), np.float32)}


def test_a_warm_evaluate_traces_the_model_no_more():
  model = CountingMLP(in_features=5, hidden=(8,), out_features=3)
  params = model.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(20, 5)).astype(np.float32)
  y = rng.integers(0, 3, 20)
  first = jaxprune.evaluate(model, params, x, y)
  n = len(TRACES)
  assert n >= 1
  again = jaxprune.evaluate(model, params, x, y)
  assert len(TRACES) == n           # the output-shape trace was the one a warm call still made
  assert first == again


def test_the_answer_follows_the_params_and_the_input_row():
  m = Linear()
  x5 = np.zeros((4, 5), np.float32)
  assert validate.num_outputs(m, _w(5, 3), x5) == 3
  assert validate.num_outputs(m, _w(5, 4), x5) == 4          # same model, other params
  assert validate.num_outputs(m, _w(5, 3), x5) == 3          # back again: kept
  n = len(TRACES)
  assert validate.num_outputs(m, _w(5, 4), np.zeros((9, 5), np.float32)) == 4  # batch size:
  assert len(TRACES) == n                                                        # not a key
  assert validate.output_shape(Linear(), _w(5, 4), x5) == (1, 4)   # an equal model: the same
  assert len(TRACES) == n
  assert validate.output_shape(m, _w(6, 2), np.zeros((4, 6), np.float32)) == (1, 2)
  assert validate.num_outputs(m, {"w": np.zeros((5, 3), np.float16)}, x5) == 3
  assert len(TRACES) == n + 2      # another input row, and float16 params: traced


@dataclasses.dataclass(frozen=True)
class Widen:
  """Outputs as wide as the input row times the number of params leaves."""

  def apply(self, params, x):
    return jax.numpy.concatenate([x * l for l in jax.tree.leaves(params)], axis=-1)


@dataclasses.dataclass(frozen=True)
class ByName:
  """Reads "a" where the params have it, else "d": params of the same leaves in another
  structure give other outputs."""

  def apply(self, params, x):
    return x @ (params["a"] if "a" in params else params["d"])


def test_the_input_row_and_the_params_structure_are_part_of_the_key():
  m = Widen()
  one = {"a": np.ones((), np.float32)}     # arrays: the cache holds only array leaves
  assert validate.num_outputs(m, one, np.zeros((2, 5), np.float32)) == 5
  assert validate.num_outputs(m, one, np.zeros((2, 6), np.float32)) == 6
  assert validate.num_outputs(m, one, np.zeros((3, 5, 4), np.float32)) == 4
  assert validate.output_shape(m, one, np.zeros((3, 5, 4), np.float32)) == (1, 5, 4)
  two = {"a": np.ones((), np.float32), "b": np.ones((), np.float32)}
  assert validate.num_outputs(m, two, np.zeros((2, 5), np.float32)) == 10
  three = [np.ones((), np.float32)] * 3
  assert validate.num_outputs(m, three, np.zeros((2, 5), np.float32)) == 15
  x5 = np.zeros((2, 5), np.float32)
  w3, w4 = np.zeros((5, 3), np.float32), np.zeros((5, 4), np.float32)
  by_name = ByName()            # one object: a temporary's entries go with it
  assert validate.num_outputs(by_name, {"a": w3, "b": w4}, x5) == 3
  assert validate.num_outputs(by_name, {"c": w3, "d": w4}, x5) == 4   # the same leaves


def test_a_model_whose_equality_gives_an_array_is_traced_every_time():
  class EqArray:
    def __init__(self):
      self.v = np.arange(3)

    def __hash__(self):
      return 0

    def __eq__(self, other):
      return self.v == other.v

    def apply(self, params, x):
      return x @ params["w"]

  a, b = EqArray(), EqArray()    # both alive: the second's lookup compares it with the first
  assert validate.num_outputs(a, _w(5, 3), np.zeros((2, 5), np.float32)) == 3
  assert validate.num_outputs(b, _w(5, 4), np.zeros((2, 5), np.float32)) == 4


def test_an_unhashable_model_is_traced_every_time():
  m = Unhashable()
  n = len(TRACES)
  for o in (3, 3, 4):
    assert validate.num_outputs(m, _w(5, o), np.zeros((2, 5), np.float32)) == o
  assert len(TRACES) == n + 3


@dataclasses.dataclass(frozen=True)
class Tiled:
  k: int

  def apply(self, params, x):
    return jax.numpy.tile(x @ params["w"], self.k)


def test_the_cache_keeps_no_model_alive():
  m = Tiled(3)
  assert validate.num_outputs(m, _w(5, 2), np.zeros((2, 5), np.float32)) == 6
  ref = weakref.ref(m)
  del m
  gc.collect()
  assert ref() is None
