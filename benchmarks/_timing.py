"""Timing helpers shared by the benchmarks: compile first, then the median of repeats."""

import os
import statistics
import time

import jax


def call_times(fn, *args, repeats: int = 20, min_time: float = 0.2,
               warmup: bool = True) -> list[float]:
  """Seconds of each timed call of ``fn(*args)`` (waited on with ``block_until_ready``).

  One untimed warm-up (compile) call first unless ``warmup=False``; then at least ``repeats``
  calls, more (up to 1000) until ``min_time`` seconds have passed.

  Example:
    >>> ts = call_times(jax.jit(lambda x: x + 1), 1.0, repeats=5, min_time=0.0)
    >>> len(ts)
    5
  """
  if warmup:
    jax.block_until_ready(fn(*args))
  times = []
  start = time.perf_counter()
  while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 1000):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return times


def median_time(fn, *args, repeats: int = 20, min_time: float = 0.2,
                warmup: bool = True) -> float:
  """Median seconds per call of ``fn(*args)``; see :func:`call_times`."""
  return statistics.median(call_times(fn, *args, repeats=repeats, min_time=min_time,
                                      warmup=warmup))


def load_line() -> str:
  """The machine's 1-minute load average and CPU count, to print beside the timings."""
  return f"load average (1 min) {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


class CompileClock:
  """XLA compilations (``programs``, and ``seconds['xla']``) and tracing and lowering seconds
  (``seconds['trace']``, ``seconds['lower']``) while active, from ``jax.monitoring`` events.

  Example:
    >>> x = jax.block_until_ready(jax.numpy.ones(7))
    >>> with CompileClock() as c:
    ...   _ = jax.block_until_ready(jax.jit(lambda v: v * 3 + 1)(x))
    >>> c.programs
    1
  """

  EVENTS = {"/jax/core/compile/backend_compile_duration": "xla",
            "/jax/core/compile/jaxpr_trace_duration": "trace",
            "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower"}

  def __init__(self):
    self.programs, self.seconds = 0, {"xla": 0.0, "trace": 0.0, "lower": 0.0}

  def __call__(self, event, duration, **kwargs):
    del kwargs
    if event in self.EVENTS:
      self.seconds[self.EVENTS[event]] += duration
      self.programs += event.endswith("backend_compile_duration")

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)
