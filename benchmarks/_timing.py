"""Timing helpers shared by the benchmarks: compile first, then the median of repeats."""

import statistics
import time

import jax


def median_time(fn, *args, repeats: int = 20, min_time: float = 0.2) -> float:
  """Median seconds per call of ``fn(*args)`` after one warm-up (compile) call."""
  jax.block_until_ready(fn(*args))
  times = []
  start = time.perf_counter()
  while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 1000):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)
