"""Reports of the experiment binaries: Markdown/CSV tables, figures, log-axis ticks and the
progress lines with time left (``REPORT.md`` itself is ``Study.write_report`` in
``experiments/_store.py``).
"""

from __future__ import annotations

import csv
import io
import os
import sys
import threading
from typing import Any, Mapping, Sequence

from experiments import _speed
from experiments._store import atomic_write_bytes
from experiments._store import to_jsonable
from experiments._store import write_text
from jaxprune import train as train_lib


# Below a table with a column `acc_best_on_test` (the CNN studies' retraining curves).
BEST_ON_TEST_NOTE = (
    "`acc_best_on_test` is the highest test accuracy over the retraining epochs: the epoch is "
    "picked on the test split, so the figure is optimistic, a description of the curve (as the "
    "published figures show it) and not a held-out estimate; `acc_final`, the last epoch, is.")


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


def log_ticks(ax, values=None, axis: str = "x") -> None:
  """A log axis labelled in plain numbers: at the plotted ``values`` themselves (e.g. the hidden
  sizes 20, 50, 100), or at 1-2-5 steps when ``values`` is None; no minor labels (matplotlib's
  default writes overlapping ``2x10^1 3x10^1 ...``)."""
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  target = ax.xaxis if axis == "x" else ax.yaxis
  if values is None:
    target.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
  else:
    target.set_major_locator(ticker.FixedLocator(sorted({float(v) for v in values})))
  target.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
  target.set_minor_locator(ticker.NullLocator())


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


# ----------------------------------------------------------------------------- progress


class Progress(train_lib.Progress):
  """Stage / step lines with elapsed time and the time left (``progress.step(what)``); steps
  may finish on several threads (:func:`experiments._speed.run_all`)."""

  def __init__(self, total: int, stage: str = ""):
    super().__init__(total, stage, unit="")
    self._lock = threading.Lock()

  def step(self, what: str = "", n: int = 1, **metrics) -> None:
    _speed.record(self.desc, what)   # one row of the binary's closing time table
    with self._lock:
      super().step(what, n, **metrics)


def note(stage: str, what: str) -> None:
  """A progress line ``[stage] what`` on stderr inside a step (a check between epochs): unlike
  :meth:`Progress.step` it is no row of the time table, so its time stays with the step."""
  print(f"[{stage}] {what}", file=sys.stderr, flush=True)
