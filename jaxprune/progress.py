"""Progress lines for long work: training epochs, experiment stages and folds."""

from __future__ import annotations

import sys
import time


class Progress:
  """Progress lines on stderr: step counts, metrics and the time left.

  Shared by training (``unit='epoch'``) and the experiment binaries (stages and folds). Each
  line is printed once (not also through absl logging, which the binaries show on stderr too).
  """

  def __init__(self, total: int, desc: str = "train", enabled: bool = True, unit: str = "epoch"):
    self.total, self.desc, self.enabled = max(int(total), 1), desc, enabled
    self.unit, self.done, self.start = unit, 0, time.time()

  def update(self, done: int, what: str = "", **metrics) -> None:
    """Reports that ``done`` of ``total`` steps are finished."""
    self.done = done
    if not self.enabled:
      return
    el = time.time() - self.start
    # Nothing done yet (a GA's generation 0): no rate to tell the time left from.
    left = f", ~{el / done * (self.total - done):.0f}s left" if done > 0 else ""
    parts = [f"[{self.desc}]", f"{self.unit} {done}/{self.total}" if self.unit else
             f"{done}/{self.total}", what, " ".join(f"{k}={v:.4g}" for k, v in metrics.items()),
             f"({el:.0f}s elapsed{left})"]
    print(" ".join(p for p in parts if p), file=sys.stderr, flush=True)

  def step(self, what: str = "", n: int = 1, **metrics) -> None:
    """Reports ``n`` more finished steps."""
    self.update(self.done + n, what, **metrics)
