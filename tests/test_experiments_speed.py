"""experiments/_speed.py: the persistent compilation cache and the per-stage time table."""

import os
import subprocess
import sys
import textwrap

import pytest

from experiments import _speed

SCRIPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from experiments import _speed
    hits, compiles = [], []
    jax.monitoring.register_event_listener(
        lambda e, **k: hits.append(e) if e == "/jax/compilation_cache/cache_hits" else None)
    jax.monitoring.register_event_duration_secs_listener(
        lambda e, d, **k: compiles.append(e)
        if e == "/jax/core/compile/backend_compile_duration" else None)
    path = _speed.enable_compilation_cache(sys.argv[1], enabled=sys.argv[2] == "on")
    f = jax.jit(lambda x: jnp.tanh(x) @ x.T + 17.0)
    f(jnp.ones((5, 3))).block_until_ready()
    print("RESULT", path, len(hits), len(compiles))
""")


def _run(folder, mode):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", SCRIPT, str(folder), mode], capture_output=True,
                       text=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__)),
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  return [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1].split()[1:]


def test_compilation_cache_second_process_loads_instead_of_compiling(tmp_path):
  cache = tmp_path / "xla"
  path, hits, compiles = _run(cache, "on")
  assert path == str(cache) and int(hits) == 0 and int(compiles) >= 1
  assert any(cache.iterdir())                       # the program was written
  _, hits, compiles = _run(cache, "on")
  # A fresh process loads every program (the compile event also times a cache load).
  assert int(hits) >= 1 and int(hits) == int(compiles)
  off = tmp_path / "off"
  path, hits, _ = _run(off, "off")
  assert path == "None" and int(hits) == 0 and not off.exists()


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  assert _speed.default_cache_dir() == os.path.join(str(tmp_path), "jaxprune", "xla")
  monkeypatch.delenv("XDG_CACHE_HOME")
  assert _speed.default_cache_dir().endswith(os.path.join(".cache", "jaxprune", "xla"))


def test_stage_table_rows_and_total(monkeypatch):
  clock = iter([10.0, 12.5, 13.0, 20.0, 21.0, 30.0])
  monkeypatch.setattr(_speed, "_clock", lambda: next(clock))
  _speed.start()
  _speed.record("1/2 train", "H=10")
  _speed.record("1/2 train", "H=20")
  _speed.record("2/2 GA", "")
  table = _speed.stage_table().splitlines()
  assert table[0].split() == ["stage", "seconds"]
  rows = [l.rsplit(None, 1) for l in table[2:5]]
  assert rows == [["1/2 train H=10", "2.5"], ["1/2 train H=20", "0.5"], ["2/2 GA", "7.0"]]
  assert table[-2].split() == ["total", "10.0"]
  assert table[-1].split() == ["wall", "clock", "11.0"]   # start() to the table
  _speed.start()
  assert _speed.stage_table() == ""


def test_binaries_run_openblas_single_threaded_unless_told_otherwise():
  # OpenBLAS reads OPENBLAS_NUM_THREADS when it loads: importing the experiments package (first,
  # as `python -m experiments.<study>` does) must set it before numpy is imported.
  code = ("import os, sys; import experiments; assert 'numpy' not in sys.modules; "
          "print(os.environ['OPENBLAS_NUM_THREADS'])")
  root = os.path.dirname(os.path.dirname(__file__))
  for preset, want in ((None, "1"), ("2", "2")):
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if preset:
      env["OPENBLAS_NUM_THREADS"] = preset
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=root, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == want


def test_run_all_keeps_order_and_times_each_step_on_its_own_clock():
  import threading
  started = threading.Barrier(2, timeout=30)

  def step(i):
    def call():
      if i < 2:
        started.wait()   # both first steps run at once, on two threads
      _speed.record("s", f"step {i}")
      return i * i
    return call

  _speed.start()
  assert _speed.run_all([step(i) for i in range(5)], workers=2) == [0, 1, 4, 9, 16]
  rows = [l.rsplit(None, 1)[0] for l in _speed.stage_table().splitlines()[2:7]]
  assert sorted(rows) == [f"s step {i}" for i in range(5)]
  # one worker: in order on this thread, no pool
  seen = []
  assert _speed.run_all([lambda i=i: seen.append(threading.current_thread()) or i
                         for i in range(3)], workers=1) == [0, 1, 2]
  assert seen == [threading.main_thread()] * 3


def test_run_all_raises_the_first_error_and_skips_steps_not_started():
  ran = []

  def boom():
    raise RuntimeError("step failed")

  calls = [boom] + [lambda i=i: ran.append(i) for i in range(50)]
  with pytest.raises(RuntimeError, match="step failed"):
    _speed.run_all(calls, workers=1)
  assert ran == []
  with pytest.raises(RuntimeError, match="step failed"):
    _speed.run_all(calls, workers=2)
  with pytest.raises(ValueError, match="workers must be at least 1"):
    _speed.run_all(calls, workers=0)


def test_ctrl_c_says_what_it_waits_for_and_how_to_resume(capsys):
  """Ctrl-C used to end a binary with a KeyboardInterrupt traceback after the running steps
  finished, without a word while it waited; now run_all says what it waits for and the
  binary's wrapper says how to resume, exit status 130."""
  import threading
  from experiments import _flags
  started, release = threading.Event(), threading.Event()

  def interrupted():
    started.wait(10)   # the other step is running when Ctrl-C arrives
    raise KeyboardInterrupt

  def running():
    started.set()
    release.wait(10)
    return "done"

  def main(argv):
    del argv
    timer = threading.Timer(0.3, release.set)
    timer.start()
    return _speed.run_all([interrupted, running], workers=2)

  with pytest.raises(SystemExit) as e:
    _flags.one_line_usage_errors(main)(["prog"])
  assert e.value.code == 130
  err = capsys.readouterr().err
  assert "waiting for the 1 step(s) now running to finish" in err
  assert "run the same command again to resume" in err and "Traceback" not in err
