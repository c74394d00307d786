"""What every experiment binary shares: flags, the output folder, resumable atomic results,
progress with time left, tables, figures and the report.

A binary stays thin: it defines its flags, validates them with :func:`fail` before any long
work, and wraps every finished configuration in ``store.cached(key, fn)`` so that a run killed
at any point and started again with the same flags continues where it stopped.

Layout of ``--workdir/<study>/``::

  results.json      every number and the settings used
  REPORT.md         a short report that embeds the tables and figures
  *.md, *.csv       tables
  *.png             figures
  cache/<fingerprint>/<key>.json   one file per finished configuration (resume)
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
from absl import app
from absl import flags
from absl import logging

FLAGS = flags.FLAGS

DATA_CHOICES = ("features", "digits_features", "images", "sfew_features", "sfew_images")


def define_common_flags(default_data: str) -> None:
  """Defines --workdir, --data, --data_path, --seed and --quick."""
  flags.DEFINE_string("workdir", "workdir", "Folder for outputs; results go to WORKDIR/<study>/.")
  flags.DEFINE_string(
      "data", default_data,
      "Dataset: 'features' (bundled diabetes stand-in, 10 features, 7 classes), "
      "'digits_features' (easy bundled contrast), 'images' (bundled digits images), "
      "'sfew_features' or 'sfew_images' (your own SFEW copy, with --data_path).")
  flags.DEFINE_string("data_path", None,
                      "Path to SFEW.xlsx / SFEW.csv (sfew_features) or the class-folder image "
                      "tree (sfew_images).")
  flags.DEFINE_integer("seed", 0, "Random seed; a run is deterministic for a seed.")
  flags.DEFINE_bool("quick", False, "A reduced run for tests and smoke checks (seconds).")


def fail(message: str) -> None:
  """Stops the program with a clear message and a non-zero exit, before any long work."""
  raise app.UsageError(message)


# ----------------------------------------------------------------------------- atomic files


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically: a kill never leaves a truncated file."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def to_jsonable(x: Any) -> Any:
  """Converts numpy/jax arrays and scalars (nested in dicts, lists, tuples) to JSON values."""
  if isinstance(x, Mapping):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if hasattr(x, "tolist") and callable(x.tolist):  # numpy and jax arrays / scalars
    return to_jsonable(np.asarray(x).tolist())
  if isinstance(x, float) and not math.isfinite(x):
    return None if math.isnan(x) else (1e308 if x > 0 else -1e308)
  return x


def write_json(path: str, obj: Any) -> None:
  atomic_write_bytes(path, json.dumps(to_jsonable(obj), indent=1, sort_keys=True).encode())


def write_text(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode())


def save_figure(fig, path: str) -> None:
  """Saves a matplotlib figure as PNG, atomically, and closes it."""
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
  plt.close(fig)
  atomic_write_bytes(path, buf.getvalue())


def pyplot():
  """matplotlib.pyplot with a non-interactive backend (no display needed)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


# ----------------------------------------------------------------------------- tables


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
  columns = list(columns or (rows[0].keys() if rows else []))
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
  lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def write_table(folder: str, name: str, rows: Sequence[Mapping[str, Any]],
                columns: Sequence[str] | None = None) -> str:
  """Writes ``name.md`` and ``name.csv``; returns the Markdown."""
  columns = list(columns or (rows[0].keys() if rows else []))
  md = markdown_table(rows, columns)
  write_text(os.path.join(folder, name + ".md"), md)
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
  w.writeheader()
  for r in rows:
    w.writerow({c: to_jsonable(r.get(c, "")) for c in columns})
  write_text(os.path.join(folder, name + ".csv"), buf.getvalue())
  return md


# ----------------------------------------------------------------------------- the study


class Progress:
  """Stage / step lines with elapsed time and an estimate of the time left."""

  def __init__(self, total: int, stage: str = ""):
    self.total, self.stage, self.done, self.start = max(total, 1), stage, 0, time.time()

  def step(self, what: str, n: int = 1) -> None:
    self.done += n
    el = time.time() - self.start
    left = el / self.done * (self.total - self.done)
    msg = f"[{self.stage}] {self.done}/{self.total} {what} ({el:.0f}s elapsed, ~{left:.0f}s left)"
    logging.info(msg)
    print(msg, file=sys.stderr, flush=True)


class Study:
  """One experiment's output folder and its resumable cache.

  Args:
    name: the study's name (the subfolder of --workdir).
    settings: every setting that affects results (flags); results cached under one set of
      settings are never reused under another.
  """

  def __init__(self, name: str, settings: Mapping[str, Any], workdir: str | None = None):
    self.name = name
    self.settings = dict(to_jsonable(settings))
    self.dir = os.path.join(workdir if workdir is not None else FLAGS.workdir, name)
    try:
      os.makedirs(self.dir, exist_ok=True)
      probe = os.path.join(self.dir, ".write-test")
      with open(probe, "w") as f:
        f.write("ok")
      os.remove(probe)
    except OSError as e:
      fail(f"Cannot write to the work folder {self.dir!r} ({e.strerror}). Pass a writable "
           "--workdir.")
    blob = json.dumps(self.settings, sort_keys=True).encode()
    self.fingerprint = hashlib.sha256(blob).hexdigest()[:12]
    self.cache_dir = os.path.join(self.dir, "cache", self.fingerprint)
    os.makedirs(self.cache_dir, exist_ok=True)
    write_json(os.path.join(self.cache_dir, "settings.json"), self.settings)
    self.resumed = 0

  def path(self, filename: str) -> str:
    return os.path.join(self.dir, filename)

  def cached(self, key: str, fn: Callable[[], Any]) -> Any:
    """Returns the saved result of ``key`` if this configuration finished before, else runs
    ``fn`` and saves its (JSON-able) result atomically before returning it."""
    safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in key)[:80]
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]  # distinct keys, distinct files
    f = os.path.join(self.cache_dir, f"{safe}-{digest}.json")
    if os.path.exists(f):
      with open(f) as fh:
        self.resumed += 1
        return json.load(fh)
    result = to_jsonable(fn())
    write_json(f, result)
    # Round-trip through JSON so a fresh and a resumed run return identical values.
    return json.loads(json.dumps(result))

  def write_results(self, results: Mapping[str, Any]) -> None:
    write_json(self.path("results.json"), {"study": self.name, "settings": self.settings,
                                           "results": results})

  def write_report(self, title: str, sections: Iterable[tuple[str, str]]) -> None:
    """REPORT.md: a title, then (heading, markdown) sections; figures as ![](file.png)."""
    parts = [f"# {title}\n"]
    for heading, body in sections:
      parts.append(f"## {heading}\n\n{body.strip()}\n")
    parts.append("## Settings\n\n```json\n" + json.dumps(self.settings, indent=1, sort_keys=True)
                 + "\n```\n")
    write_text(self.path("REPORT.md"), "\n".join(parts))


def load_data(name: str, path: str | None, **kwargs):
  """Loads a dataset through ``jaxprune.data.load``, turning problems into clear exits."""
  from jaxprune import data as data_lib  # pylint: disable=g-import-not-at-top
  if name not in DATA_CHOICES:
    fail(f"Unknown --data={name!r}; choose one of {', '.join(DATA_CHOICES)}.")
  if name.startswith("sfew") and not path:
    fail(f"--data={name} needs --data_path pointing to your SFEW copy.")
  try:
    return data_lib.load(name, path=path, **kwargs)
  except (FileNotFoundError, ValueError) as e:
    fail(f"Could not load --data={name}: {e}")
