"""Start-up speed and time accounting shared by the experiment binaries.

* :func:`enable_compilation_cache`: JAX's persistent compilation cache
  (``jax_compilation_cache_dir``) under the user's cache folder, ``$XDG_CACHE_HOME/jaxprune/xla``
  (``~/.cache/jaxprune/xla`` by default), so that a rerun of a study, in a fresh process, loads
  its compiled programs instead of compiling them again. ``--nocompilation_cache`` turns it
  off; ``--compilation_cache_dir`` moves it.
* :func:`record` / :func:`stage_table`: the wall time of each stage of a run (the binaries'
  ``Progress.step`` calls record one row each), printed as a table at the end of a run.
"""

from __future__ import annotations

import os
import time

import jax
from absl import flags

FLAGS = flags.FLAGS

_STAGES: list[tuple[str, str, float]] = []
_clock = time.perf_counter   # the stage clock (a test replaces it)
_LAST = {"t": None}


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


def start() -> None:
  """Starts a run's stage clock (and forgets earlier stages)."""
  _STAGES.clear()
  _LAST["t"] = _clock()


def record(stage: str, what: str) -> None:
  """Records that ``what`` of ``stage`` finished now (its time: since the previous record)."""
  now = _clock()
  if _LAST["t"] is None:
    _LAST["t"] = now
  _STAGES.append((stage, what, now - _LAST["t"]))
  _LAST["t"] = now


def stage_table() -> str:
  """The recorded stages as a fixed-width table with a total line ('' if none)."""
  if not _STAGES:
    return ""
  width = max(len(f"{s} {w}".strip()) for s, w, _ in _STAGES)
  width = max(width, len("total"))
  lines = [f"{'stage':<{width}}  {'seconds':>8}", "-" * (width + 10)]
  lines += [f"{f'{s} {w}'.strip():<{width}}  {t:8.1f}" for s, w, t in _STAGES]
  lines += ["-" * (width + 10), f"{'total':<{width}}  {sum(t for _, _, t in _STAGES):8.1f}"]
  return "\n".join(lines)
