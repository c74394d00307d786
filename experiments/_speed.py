"""Start-up speed and time accounting shared by the experiment binaries.

* :func:`enable_compilation_cache`: JAX's persistent compilation cache
  (``jax_compilation_cache_dir``) under the user's cache folder, ``$XDG_CACHE_HOME/jaxprune/xla``
  (``~/.cache/jaxprune/xla`` by default), so that a rerun of a study, in a fresh process, loads
  its compiled programs instead of compiling them again. ``--nocompilation_cache`` turns it
  off; ``--compilation_cache_dir`` moves it.
* :func:`record` / :func:`stage_table`: the wall time of each stage of a run (the binaries'
  ``Progress.step`` calls record one row each), printed as a table at the end of a run.
* :func:`run_all`: a study's independent steps (other hidden sizes, other folds) on several
  threads at once (``--workers``). On XLA:CPU most of a study's programs keep one core busy
  (small batched products, LAPACK calls, while loops), so two programs at once use two cores.
  Each program computes exactly what it computes alone: the results do not depend on
  ``--workers`` (tested bit for bit).
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import threading
import time
from typing import Callable, Sequence, TypeVar

import jax
from absl import flags

FLAGS = flags.FLAGS
T = TypeVar("T")

_STAGES: list[tuple[str, str, float]] = []
_clock = time.perf_counter   # the stage clock (a test replaces it)
_START = {"t": None}          # when the run's clock started (start())
_LOCK = threading.Lock()
_THREAD = threading.local()   # each thread's own stage clock: .last, the time of its last mark
MAX_DEFAULT_WORKERS = 4


def default_cache_dir() -> str:
  """``$XDG_CACHE_HOME/jaxprune/xla``, or ``~/.cache/jaxprune/xla``."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "jaxprune", "xla")


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines --compilation_cache and --compilation_cache_dir (once)."""
  if "compilation_cache" in flag_values:
    return
  flags.DEFINE_bool("compilation_cache", True,
                    "Keep compiled XLA programs on disk (JAX's persistent compilation cache), so "
                    "that a rerun skips compilation.", flag_values=flag_values)
  flags.DEFINE_string("compilation_cache_dir", None,
                      f"Folder of the compilation cache (default {default_cache_dir()}).",
                      flag_values=flag_values)
  flags.DEFINE_integer("workers", None,
                       "Independent steps computed at once, each on its own thread (the hidden "
                       "sizes and folds of ga_vs_distinctiveness); default: the number of CPU "
                       f"cores, at most {MAX_DEFAULT_WORKERS}. 1 runs them one after another. "
                       "The results do not depend on it.", lower_bound=1,
                       flag_values=flag_values)


def enable_compilation_cache(path: str | None = None, enabled: bool = True) -> str | None:
  """Turns on JAX's persistent compilation cache in ``path``; returns the folder (or None).

  Every program is cached, however fast it compiled (JAX's defaults skip programs that compile
  in under a second, which are most of a study's).
  """
  if not enabled:
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  path = path or default_cache_dir()
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


def enable_from_flags() -> str | None:
  """:func:`enable_compilation_cache` as the flags say (defaults when they are not defined)."""
  if "compilation_cache" not in FLAGS or not FLAGS.is_parsed():
    return enable_compilation_cache()
  return enable_compilation_cache(FLAGS.compilation_cache_dir, FLAGS.compilation_cache)


def default_workers() -> int:
  """The number of CPU cores, at most ``MAX_DEFAULT_WORKERS``."""
  return max(1, min(os.cpu_count() or 1, MAX_DEFAULT_WORKERS))


def workers_from_flags() -> int:
  """``--workers`` when the flags are parsed and it is given, else :func:`default_workers`."""
  if "workers" in FLAGS and FLAGS.is_parsed() and FLAGS.workers is not None:
    return FLAGS.workers
  return default_workers()


def run_all(calls: Sequence[Callable[[], T]], workers: int | None = None) -> list[T]:
  """Calls each of ``calls`` (independent steps) on up to ``workers`` threads; their results
  in order.

  ``workers`` None: :func:`workers_from_flags`; 1: one after another, in order, on this thread.
  Give the longest steps first (they start first). The first exception is raised once the
  steps already running have ended; steps not yet started are not run. Inside a worker thread
  the stage clock of :func:`record` starts when the step starts, so each row of the stage table
  is the time of its own step.
  """
  calls = list(calls)
  workers = workers_from_flags() if workers is None else int(workers)
  if workers < 1:
    raise ValueError(f"workers must be at least 1, got {workers}.")
  if workers == 1 or len(calls) <= 1:
    return [c() for c in calls]

  def timed(call):
    _THREAD.last = _clock()
    return call()

  with concurrent.futures.ThreadPoolExecutor(min(workers, len(calls))) as pool:
    futures = [pool.submit(timed, c) for c in calls]
    try:
      return [f.result() for f in futures]
    except BaseException as e:
      for f in futures:
        f.cancel()
      running = sum(f.running() for f in futures)
      if isinstance(e, KeyboardInterrupt) and running:
        print(f"\nStopping: waiting for the {running} step(s) now running to finish (their "
              "results are saved; computations already running in XLA cannot be cut short).",
              file=sys.stderr, flush=True)
      raise


def start() -> None:
  """Starts a run's stage clock on this thread (and forgets earlier stages)."""
  with _LOCK:
    _STAGES.clear()
    _THREAD.last = _START["t"] = _clock()


def record(stage: str, what: str) -> None:
  """Records that ``what`` of ``stage`` finished now. Its time: since this thread's previous
  mark (:func:`start`, the previous record, or in a :func:`run_all` step the step's start);
  0 on a thread with no mark yet."""
  now = _clock()
  last = getattr(_THREAD, "last", None)
  _THREAD.last = now
  with _LOCK:
    _STAGES.append((stage, what, now - (now if last is None else last)))


def stage_table() -> str:
  """The recorded stages as a fixed-width table ('' if none): a row per step, their total and
  the wall-clock time since :func:`start` (less than the total when steps ran at once)."""
  with _LOCK:
    stages = list(_STAGES)
    began = _START["t"]
  if not stages:
    return ""
  width = max(len(f"{s} {w}".strip()) for s, w, _ in stages)
  width = max(width, len("wall clock"))
  lines = [f"{'stage':<{width}}  {'seconds':>8}", "-" * (width + 10)]
  lines += [f"{f'{s} {w}'.strip():<{width}}  {t:8.1f}" for s, w, t in stages]
  lines += ["-" * (width + 10), f"{'total':<{width}}  {sum(t for _, _, t in stages):8.1f}"]
  if began is not None:
    lines.append(f"{'wall clock':<{width}}  {_clock() - began:8.1f}")
  return "\n".join(lines)
