"""Shared test settings: the suite's XLA:CPU compilation flags, strict numerics, small helpers.

Most of the suite's time is XLA:CPU compiling programs that then run for milliseconds
(measured with JAX's compile-duration events: 1,123 of 1,866 worker-seconds at level 1 below,
9,499 compilations). So the suite compiles with three XLA flags, set here before JAX starts its
backend and inherited by the tests' subprocesses:

* ``--xla_backend_optimization_level=0`` (XLA's default is 2): LLVM barely optimises. On an
  AVX2 machine (2026-12-06) the suite's compilation went from 1,123 s at level 1 to 587 s, its
  worker time from 1,866 to 1,310 s and its wall time from 971 to 568 s; a tiny eager op
  compiles in 14 ms instead of 22, a group redundancy program in 0.5 s instead of 1.5. Level 0
  does not contract ``a * b + c`` into a fused multiply-add, so its floats can end in other
  last bits than levels 1 and 2 (which computed the same bits in the initialisers, the GA and
  MLP training, docs/benchmarks.md). Every program compiles at this one level, the library's
  lighter per-program options included: jaxprune leaves out the options ``XLA_FLAGS`` names
  (``jaxprune._compile``), so programs compare bit for bit. The tests that check those options
  give the default bits compile both sides with the options named. (This includes ``fit``'s
  start program, which left level 0 in the library after XLA:CPU crashed compiling it in suite
  runs; such crashes were seen at XLA's default flags too, and one core dump showed their
  cause: the worker had used up Linux's memory mappings, see ``pytest_runtest_teardown``.)
* ``--xla_cpu_use_fusion_emitters=false``: XLA:CPU emits its fused loops with its older
  emitter instead of the MLIR fusion emitters, a third less compilation (a tiny eager op 0.04
  -> 0.026 s; the GA search program at H=100 1.6 -> 1.1 s) with the same bits in the GA, the
  initialisers and ``tanh``, but not everywhere: programs the library compiles with XLA's
  default emitter (training, the pruners) can end in other low bits in the suite (a few epochs of a
  small MLP with Adam: 3-273 of about 400 values), so tests of those compare with tolerances or
  within one compilation; the whole suite passes both ways. Only added where this jaxlib
  knows the flag (an unknown flag in ``XLA_FLAGS`` aborts the process): a subprocess tries it
  once, and the answer travels to the test workers in the environment.

* ``--xla_cpu_parallel_codegen_split_count=1`` (XLA's default splits each module into 32
  parts compiled on a thread pool): one part per module. A compilation alone takes longer in
  wall time (it no longer uses the second core), but the suite's two workers keep both cores
  busy already, and the parts' repeated set-up work goes: two compile-bound test files under
  ``-n 2``, alternating, 157.7 / 150.9 -> 134.2 / 133.1 user-seconds (83.7 / 80.4 -> 73.8 /
  71.6 s); the whole suite 666 -> 606 s in one pair of runs, every test passing. How a module is cut for code generation does not change what its kernels
  compute. Only added where this jaxlib knows the flag, as the emitter flag.

What the tests assert holds at the users' default flags too; the tests that compare
compilation options compile their reference with XLA's defaults named per program
(``jaxprune._compile.DEFAULT_LEVEL``: level 2 and the fusion emitters; a per-program option
overrides ``XLA_FLAGS``, which a training program's run time confirms). To run the
suite as users compile (XLA's defaults and the library's own per-program options),
``JAXPRUNE_SUITE_FLAGS=default python3 -m pytest -q -n 2`` adds none of the three flags; flags
you set in ``XLA_FLAGS`` are kept either way (and the library's per-program options give way to
them).

On a GPU, JAX's default precision for float32 products rounds their operands on the tensor
cores (TF32 on NVIDIA), about 1e-3 relative: there, on an H200, 31 of 422 library tests failed,
29 of them on float32 tolerances (masked against compacted networks, merged units, exact fits,
and 2 of 1,240 incremental GA accuracies); under 'highest', 3 of 389 (two tolerances too tight for
fused against unfused elementwise functions, since widened, and an angle the GPU sums in
another order, since allowed 0.1 degrees there). So the suite sets
``JAX_DEFAULT_MATMUL_PRECISION=highest`` unless it is set already (XLA:CPU computes float32
products in float32 either way); set it to ``default`` to run the suite at a GPU's default.
"""

import contextlib
import csv
import gc
import json
import math
import os
import subprocess
import sys
import tempfile

SUITE_LEVEL = "--xla_backend_optimization_level=0"
SUITE_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
SUITE_SPLIT = "--xla_cpu_parallel_codegen_split_count=1"


def _xla_accepts(flags: list[str]) -> set[str]:
  """Which of ``flags`` this jaxlib's XLA starts with in ``XLA_FLAGS`` (one short subprocess
  each, run side by side: an unknown flag aborts its process)."""
  code = "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"
  procs = {f: subprocess.Popen([sys.executable, "-c", code],
                               env=dict(os.environ, XLA_FLAGS=f, JAX_PLATFORMS="cpu"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
           for f in flags}
  return {f for f, p in procs.items() if p.wait(timeout=120) == 0}


def _suite_flags() -> str:
  flags = os.environ.get("XLA_FLAGS", "")
  if os.environ.get("JAXPRUNE_SUITE_FLAGS") == "default":   # compile as users do (see above)
    return flags
  if "xla_backend_optimization_level" not in flags:
    flags = f"{flags} {SUITE_LEVEL}"
  wanted = [f for f in (SUITE_EMITTERS, SUITE_SPLIT) if f.split("=")[0].lstrip("-") not in flags]
  accepted = _xla_accepts(wanted) if wanted else set()
  flags = " ".join([flags] + [f for f in wanted if f in accepted])
  return flags.strip()


os.environ["XLA_FLAGS"] = _suite_flags()
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # pylint: disable=wrong-import-position
import numpy as np
import pytest

from jaxprune import _compile  # pylint: disable=wrong-import-position
import jaxprune  # pylint: disable=wrong-import-position

_CACHE_ENV = "JAXPRUNE_SUITE_XLA_CACHE"


def _suite_cache() -> str | None:
  """A persistent compilation cache for this run of the suite, shared by the xdist workers.

  Many tests compile programs another test (or the other worker) already compiled: the same
  HLO from a fresh closure or model object, which jit's in-memory caches cannot recognise.
  JAX's persistent cache is keyed on the program and the compile options, so they are loaded
  instead. A fresh folder per run (made by the controller, removed at its end), so nothing
  is reused from an earlier run. ``JAXPRUNE_SUITE_XLA_CACHE=off`` turns it off.

  JAX writes an entry without a lock (``write_bytes``; it locks only when the cache has a size
  limit, which needs the ``filelock`` package): a worker that reads an entry the other is still
  writing gets a truncated zlib stream, warns "Error reading persistent compilation cache
  entry" and compiles the program itself (a truncated stream never decompresses). That
  warning is ignored in ``pyproject.toml``: with warnings as errors it failed a run at
  collection, when both workers compile the same small programs at once."""
  path = os.environ.get(_CACHE_ENV)
  if path == "off":
    return None
  if not path:
    path = tempfile.mkdtemp(prefix="jaxprune-suite-xla-")
    os.environ[_CACHE_ENV] = path   # inherited by the workers
    os.environ[_CACHE_ENV + "_OWNER"] = str(os.getpid())
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path


_SUITE_CACHE = _suite_cache()


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  if _SUITE_CACHE and os.environ.get(_CACHE_ENV + "_OWNER") == str(os.getpid()):
    import shutil  # pylint: disable=import-outside-toplevel
    shutil.rmtree(_SUITE_CACHE, ignore_errors=True)


def as_users_compile(options: dict) -> dict:
  """A program's own compile options (``LightJit.asked``) on top of XLA's defaults, less those
  this jaxlib does not know: how the library compiles it for a user with no ``XLA_FLAGS``. The
  suite names its level in ``XLA_FLAGS``, which every program then compiles at, so tests of
  those options compile with them named: ``lowered.compile(as_users_compile(p.asked))``."""
  return _compile.supported({**_compile.DEFAULT_LEVEL, **options})


_MAP_LIMIT = _compile.map_limit()

#: The share of ``vm.max_map_count`` past which a worker releases its programs. Measured
#: (2026-12-06): at the suite's flags one test file added at most 7,586 mappings
#: (test_ga_search) and a worker that never released would end near 42,000; at the users' flags
#: (``JAXPRUNE_SUITE_FLAGS=default``) at most 14,639 (the same file), and with this share the
#: workers peaked at 44,739 and 47,476. 0.65 (42,594 at the default limit) leaves 22,900 for the
#: file that crosses it, and the suite's own runs then seldom release: each release costs about
#: 7 s (freeing some 5,000 programs, 1.3 ms each) plus loading again the programs still needed.
#: At a half, each worker released once in both runs measured.
RELEASE_SHARE = 0.65


def pytest_runtest_teardown(item, nextitem):
  """Releases the compiled programs between test files once the worker holds
  :data:`RELEASE_SHARE` of Linux's memory mappings (``vm.max_map_count``, 65,530 by default).
  Every XLA:CPU executable keeps its code in mappings of its own (at XLA's default flags a
  ``ga.search`` on a new model shape costs about 290, a ``fit`` 250), and JAX keeps every
  executable it compiled: a worker that compiled a few thousand programs ran out, and XLA then
  crashed compiling the next one (segmentation faults in 3 of 3 whole runs at the users' flags;
  the core dump held 65,531 mappings). ``jax.clear_caches()`` frees them; programs needed again
  load from the suite's persistent cache. Not inside a file, whose tests may count the programs
  they compile."""
  if (_MAP_LIMIT and (nextitem is None or nextitem.module is not item.module)
      and _compile.mappings() > RELEASE_SHARE * _MAP_LIMIT):
    jax.clear_caches()
    gc.collect()


_LOWERED = [0]


def _count_lowering(name, *_, **__):
  if name == "/jax/core/compile/jaxpr_to_mlir_module_duration":
    _LOWERED[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_lowering)


@contextlib.contextmanager
def count_programs():
  """Counts the XLA programs lowered inside the block: ``with count_programs() as n: ...``,
  then ``n == [k]``. Each is compiled or loaded from the suite's persistent cache (which skips
  the compilation, never the lowering), so the count is the same either way."""
  got = []
  start = _LOWERED[0]
  yield got
  got.append(_LOWERED[0] - start)


# The lines a script run by run_fresh starts with to count programs: ``count(fn)`` returns
# ``(fn()'s result, the programs lowered while it ran)``.
FRESH_COUNTER = """
import jax
_lowered = [0]
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *a, **k: _lowered.__setitem__(0, _lowered[0] + (
        name == "/jax/core/compile/jaxpr_to_mlir_module_duration")))

def count(fn):
  start = _lowered[0]
  out = jax.block_until_ready(fn())
  return out, _lowered[0] - start
"""


def run_fresh(script: str, tag: str, xla_flags: str = "") -> list[list[str]]:
  """Runs ``script`` in a fresh Python process without the suite's compilation cache (so
  nothing an earlier test compiled is there), with ``xla_flags`` added, and returns the
  fields after ``tag`` of each line of its output that starts with it. A failed script fails
  the test with the end of its error output."""
  env = dict(os.environ, JAXPRUNE_SUITE_XLA_CACHE="off",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip())
  out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return [l.split()[1:] for l in out.stdout.splitlines() if l.split()[:1] == [tag]]


@pytest.fixture(autouse=True)
def _temporary_files_in_tmp_path(tmp_path, monkeypatch):
  """``tempfile.mkdtemp()`` and friends write under the test's ``tmp_path``, which pytest
  cleans up, not into /tmp: the docs pages and docstring examples make folders there, and
  TFDS leaves an empty ``tmp*tfds`` folder each time it builds an unprepared dataset."""
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


@pytest.fixture
def strict_rank():
  """Implicit rank promotion raises (as in chex/equinox suites): catches broadcasting bugs.

  Use with ``pytestmark = pytest.mark.usefixtures("strict_rank")``.
  """
  with jax.numpy_rank_promotion("raise"):
    yield


def random_unit_masks(model, seed, p_keep=0.5):
  """Random unit masks for every group of ``model`` (a built-in model or a traced target; ``seed``
  an int or a NumPy Generator), each keeping at least one unit, in a random dict order (results
  must not depend on it)."""
  rng = np.random.default_rng(seed)
  sizes = {n: g.size for n, g in model.groups.items()}
  out = {}
  names = list(sizes)
  for i in rng.permutation(len(names)):
    name, size = names[i], sizes[names[i]]
    m = rng.random(size) < p_keep
    m[rng.integers(size)] = True
    out[name] = jax.numpy.asarray(m)
  return out


def assert_compacts_as_masked(target, params, fn, unit_masks, xs, *, rtol=1e-5, atol=1e-6):
  """Compacts ``params`` under ``unit_masks`` and asserts the small model's output equals ``fn``
  on the masked params (expand + apply_masks) for every input in ``xs`` (batch sizes other than
  the traced one belong there); returns (small params, small target, masked params)."""
  small, small_t = target.compact(params, unit_masks)
  masked = jaxprune.apply_masks(params, jaxprune.expand(params, target, unit_masks))
  for x in xs:
    np.testing.assert_allclose(small_t.apply(small, x), fn(masked, x), rtol=rtol, atol=atol,
                               err_msg=f"batch of {np.shape(x)[0]}")
  return small, small_t, masked


def rms_norm(h, scale=1.0):
  """An RMSNorm over the last axis, for test models."""
  return h * jax.lax.rsqrt(jax.numpy.mean(h * h, -1, keepdims=True) + 1e-6) * scale


def host_f32(a) -> jax.Array:
  """``a`` (NumPy or nested lists) as a float32 JAX array, without compiling a program.

  With jax 0.10 on CPU, ``jnp.asarray(a, jnp.float32)`` of a float64 NumPy array compiles a
  ``convert_element_type`` program for each new shape, and ``jnp.asarray`` of a float32 one an
  identity ``stage`` program; ``jax.device_put`` of the cast array compiles none and gives the
  same bits (NumPy and XLA both round float64 to the nearest float32, ties to even). The library
  moves host arrays the same way for the same reason (``train._device``, ``masks.host_built``)."""
  return jax.device_put(np.asarray(a, np.float32))


@pytest.fixture
def rng():
  return np.random.default_rng(0)


def nnx_as_function(module, *filters):
  """An nnx module as a plain JAX function over a dict of arrays, the route docs/any-model.md
  shows: ``(apply(params, x), params)`` with ``params = nnx.to_pure_dict(state)``. With
  ``filters`` (e.g. ``nnx.Param``) only those variables are params; the rest is closed over."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  graphdef, state, *rest = nnx.split(module, *filters, ...) if filters else nnx.split(module)

  def apply(p, x):
    s = jax.tree.map(lambda a: a, state)      # a copy to fill in
    nnx.replace_by_pure_dict(s, p)
    return nnx.merge(graphdef, s, *rest)(x)

  return apply, nnx.to_pure_dict(state)


def linen_batch_norm_mlp():
  """A linen 5 -> 8 (batch norm, relu) -> 3 module, its variables (``params`` and
  ``batch_stats``) and an example input: ``(module, variables, x)``."""
  from flax import linen as nn  # pylint: disable=import-outside-toplevel

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.relu(nn.BatchNorm(use_running_average=True)(nn.Dense(8)(x))))

  x = jax.numpy.ones((4, 5))
  return Net(), Net().init(jax.random.key(0), x), x


def nnx_sigmoid_mlp(seed=0):
  """A small nnx module, 8 -> 12 (sigmoid) -> 3, with its hidden layer ``l1``: the shape of the
  tests that trace an nnx ``State`` and train it with ``nnx.Optimizer``."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(8, 12, rngs=rngs)
      self.l2 = nnx.Linear(12, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.sigmoid(self.l1(x)))

  return Net(nnx.Rngs(seed))


def csv_rows(path):
  """The rows of a CSV table written by a study, as dicts of strings."""
  with open(path) as f:
    return list(csv.DictReader(f))


def study_results(workdir, study):
  """A study's ``results.json`` under ``workdir``."""
  with open(os.path.join(workdir, study, "results.json")) as f:
    return json.load(f)


def all_finite(x):
  """True when no float nested in ``x`` (dicts and lists) is NaN or infinite."""
  if isinstance(x, dict):
    return all(all_finite(v) for v in x.values())
  if isinstance(x, list):
    return all(all_finite(v) for v in x)
  return not isinstance(x, float) or math.isfinite(x)


class FakeCascade:
  """A stand-in for OpenCV's ``CascadeClassifier`` that 'detects' the white box of a frame
  (its pixels equal to 255); ``FakeCascade.paths`` records the cascade files it was given."""

  paths: list = []

  def __init__(self, path):
    FakeCascade.paths.append(path)

  def empty(self):
    return False

  def detectMultiScale(self, gray, **kwargs):  # pylint: disable=invalid-name
    del kwargs
    rows, cols = np.nonzero(gray == 255)
    if not rows.size:
      return ()
    return np.array([[cols.min(), rows.min(), cols.max() - cols.min() + 1,
                      rows.max() - rows.min() + 1]])


def sfew_tree(root, per_class, size=(20, 16)):
  """A small SFEW-like tree: frames of ``size`` (not SFEW's 720x576), person j+1 for frame j."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for label, folder in enumerate(["Angry", "Disgust", "Fear", "Happy", "Neutral", "Sad",
                                  "Surprise"]):
    (root / folder).mkdir(parents=True)
    for j in range(per_class):
      pixels = rng.integers(0, 256, size=size, dtype=np.uint8)
      Image.fromarray(pixels).save(root / folder / f"Movie{label}_{j:09d}_{j + 1:08d}.png")
  return root
