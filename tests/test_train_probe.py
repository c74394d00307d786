"""fit and fit_many against an independent per-run optax loop (tests/train_probe_cases.py), run
in a pytest process of their own.

Four full suite runs (2026-12-05) lost an xdist worker to a segmentation fault inside XLA:CPU
while it compiled, serialised or deserialised a fit start program for one of these cases, at
the same point of the run each time; the cases alone never crashed (several runs, in any
order). In a process of their own they run as they do alone, and a crash there fails this test
with its output instead of taking a worker, and the tests queued on it, down."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_training_probe_cases_pass_in_a_process_of_their_own():
  env = dict(os.environ, JAXPRUNE_SUITE_XLA_CACHE="off")
  done = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
       "-n", "0", os.path.join("tests", "train_probe_cases.py")],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
  assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
  assert " passed" in done.stdout and "failed" not in done.stdout, done.stdout[-2000:]
