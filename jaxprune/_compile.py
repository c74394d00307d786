"""Lighter XLA:CPU compilation for programs that run briefly next to their compilation.

An initialiser or a set-up pass runs for milliseconds but XLA:CPU compiles it at its default
LLVM optimisation level (2) for up to seconds: 14 s for a ResNet-18 initialiser of small,
distinct widths, 3.5 s for CNN4's. At level 1 these programs compile 2-4x faster and computed
the same bits in every initialiser measured: level 1 still contracts ``a * b + c`` into one
fused multiply-add, as level 2 does (docs/benchmarks.md; an observation on this CPU that the
tests check for an MLP's initialiser, not a guarantee of XLA's; see below for programs where it
differs). Level 0 compiles faster still but does not contract, so float results can differ in
the last bit; it is only for programs without float arithmetic to contract (copies, masks,
zeros, integer key splits).

XLA:CPU also has two emitters for its fused elementwise loops: the MLIR fusion emitters (its
default) and the older LLVM IR emitter (``xla_cpu_use_fusion_emitters=False``), which compiles
about a third faster (the GA search program at H=100: 1.6 -> 1.1 s; a tiny eager op 0.040 ->
0.026 s) and gave the same bits in the GA (H=100 and H=1000, full and incremental), the
initialisers and the main job's training grids, but not in every program: a few epochs of small
MLPs with Adam ended 3-273 of about 400 values with other low bits. Its code is not always as
fast either: the GA ran at the same speed at H=1000 and 4-8% slower at H=100, the training
program 1.3-1.7x slower. So it is chosen per program. :data:`FAST` asks for it at XLA's default
LLVM level: the incremental GA's programs, whose first call is mostly compilation, use it
(level 1 ran them 9-70% slower); the GA's full-evaluation programs, the initialisers and the
set-up passes add it to a lower level (:data:`LEVEL_1`; for the GA half the XLA time, the same
run time, and the bits, which their tests check). Level 1 is not the
same bits everywhere either: it kept them in the initialisers, the GA and MLP training, but a
ResNet-18 trained to other bits and ``evaluate_many``'s loss and accuracy sums came out
otherwise (measured; the cause is not traced). So the built-in MLP's training program compiles
at level 1 (:data:`TRAIN_MLP`: half the compilation, the same run time, and the default bits in
every case measured: the main job's grids at H = 20, 100 and 1000, 24 small MLPs with Adam,
AdamW and clipping, and the cases ``tests/test_train.py`` checks, all with cross-entropy; other
losses and optimizers are not measured, and may end a few last bits apart from a default
compilation, as any change of compilation may), while other models' training (subclasses of
the MLP included) keeps XLA's defaults, as do the evaluation programs and the pruners (the
older emitter changed a distinctiveness sweep's bits).

JAX allows per-program options only on a top-level ``jax.jit``. :func:`light_jit` therefore
compiles with them when it is called eagerly (or under ``vmap``) on CPU, and as a plain jit
when it is traced inside another jit, or on other backends. Nesting is recognised by the
``ValueError`` JAX raises for it (its message names ``compiler_options``); should a later JAX
word it otherwise, calls inside a jit would raise, which tests/test_models.py would show. An
option this jaxlib does not know (``No such compile option``, as a later XLA may drop the older
emitter) is then left out (:func:`supported`), never an error.

An option you name in ``XLA_FLAGS`` is yours: a per-program option would override it for that
program, so :func:`light_jit` leaves out every option that ``XLA_FLAGS`` names
(:func:`user_options`), read when the program is first used. With
``XLA_FLAGS=--xla_backend_optimization_level=0`` every program compiles at level 0, the
initialisers and the GA's included (the emitter still differs per program unless you name it
too). The test suite names both, so its programs compare bit for bit (tests/conftest.py).

Every XLA:CPU executable also holds memory mappings of its own, and JAX keeps every executable
a process compiled; Linux allows a process ``vm.max_map_count`` of them (65,530 by default).
XLA aborts compiling when they run out, with no word of why, so when a compilation brings the
process past :data:`MAPPINGS_WARN_SHARE` of the limit jaxprune warns, saying what to do
(docs/reliability.md): once per crossing, again only after the process fell back below the line.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from typing import Any, Callable

import jax
import numpy as np

_EMITTER = "xla_cpu_use_fusion_emitters"

DEFAULT_LEVEL = {"xla_backend_optimization_level": 2, _EMITTER: True}   # XLA:CPU's defaults
FAST = {_EMITTER: False}          # the older loop emitter: faster compilation (bits: see above)
LEVEL_1 = {"xla_backend_optimization_level": 1, **FAST}   # initialisers: the default bits
TRAIN_MLP = {"xla_backend_optimization_level": 1}   # the built-in MLP's training program


@functools.lru_cache(maxsize=None)
def _known(name: str, value: Any) -> bool:
  """Whether this jaxlib's XLA:CPU accepts the compile option ``name=value`` (one tiny
  compilation, once per process)."""
  try:
    jax.jit(lambda v: v + 1, compiler_options={name: value}).lower(np.float32(0)).compile()
  except jax.errors.JaxRuntimeError as e:
    if "No such compile option" in str(e):
      return False
    raise
  return True


def user_options() -> frozenset[str]:
  """The XLA options that ``XLA_FLAGS`` names now, which :func:`light_jit` leaves to the user:
  ``--name=value`` and ``--name``, written in the variable or, as XLA reads a value that does
  not start with ``-``, in the file it names."""
  text = os.environ.get("XLA_FLAGS", "")
  if text.strip() and not text.lstrip().startswith("-"):
    try:
      with open(text.strip()) as f:
        text = f.read()
    except OSError:
      text = ""
  return frozenset(re.findall(r"(?:^|\s)--(xla_\w+)", text))


def supported(options: dict[str, Any]) -> dict[str, Any]:
  """``options`` without those this jaxlib does not know."""
  return {k: v for k, v in options.items() if _known(k, v)}


class LightJit:
  """``jax.jit(fn)`` compiled with ``options`` where JAX allows it (see the module doc).

  ``asked`` holds the options as given; which of them ``XLA_FLAGS`` leaves to the library is
  read when the program is first called or lowered (XLA reads ``XLA_FLAGS`` when its backend
  starts, which is after ``import jaxprune`` for a user who sets it in Python), and
  :attr:`options` are then the ones it compiles with."""

  def __init__(self, fn: Callable, options: dict[str, Any], **jit_kwargs):
    self._fn, self._jit_kwargs = fn, jit_kwargs
    self.asked = dict(options)
    self.plain = jax.jit(fn, **jit_kwargs)
    self._light = None   # (the jit, its options), replaced whole: threads read it

  def _made(self, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    self._light = (jax.jit(self._fn, compiler_options=dict(options), **self._jit_kwargs),
                   dict(options))
    return self._light

  def _current(self) -> tuple[Any, dict[str, Any]]:
    light = self._light
    if light is None:   # made on first use, see the class doc
      light = self._made({k: v for k, v in self.asked.items() if k not in user_options()})
    return light

  @property
  def light(self):
    """The jit compiled with :attr:`options`."""
    return self._current()[0]

  @property
  def options(self) -> dict[str, Any]:
    """The options :attr:`light` compiles with."""
    return dict(self._current()[1])

  @property
  def active(self):
    """The jit that an eager call on this backend uses."""
    return self.light if jax.default_backend() == "cpu" else self.plain

  def lower(self, *args, **kwargs):
    """``lower`` of :attr:`active`, with the options this jaxlib knows (:func:`supported`), so
    that its ``compile`` works where a later XLA has dropped one (jax 0.11's XLA:CPU no longer
    knows ``xla_cpu_use_fusion_emitters``)."""
    if jax.default_backend() != "cpu":
      return self.plain.lower(*args, **kwargs)
    return self._known_options_only().lower(*args, **kwargs)

  def _known_options_only(self):
    light, options = self._current()
    known = supported(options)
    return light if known == options else self._made(known)[0]

  def __call__(self, *args, **kwargs):
    if jax.default_backend() != "cpu":
      return self.plain(*args, **kwargs)
    try:
      return self.light(*args, **kwargs)
    except ValueError as e:   # traced inside another jit: options are not allowed there
      if "compiler_options" not in str(e):
        raise
      return self.plain(*args, **kwargs)
    except jax.errors.JaxRuntimeError as e:   # an option this jaxlib does not know
      if "No such compile option" not in str(e):
        raise
      return self._known_options_only()(*args, **kwargs)


def light_jit(fn: Callable, options: dict[str, Any] = LEVEL_1, **jit_kwargs) -> LightJit:
  """A jit of ``fn`` compiled with lighter ``options`` on CPU (``LEVEL_1``, ``FAST``), less those
  that ``XLA_FLAGS`` names (:func:`user_options`); whether they keep the default bits depends
  on the program (see the module doc): test it."""
  return LightJit(fn, options, **jit_kwargs)


# ----------------------------------------------------------------------------- memory mappings


def map_limit() -> int | None:
  """Linux's limit on a process's memory mappings (``vm.max_map_count``); None elsewhere."""
  try:
    with open("/proc/sys/vm/max_map_count", encoding="ascii") as f:
      return int(f.read())
  except (OSError, ValueError):
    return None


def mappings() -> int | None:
  """The memory mappings this process holds now (Linux); None elsewhere."""
  try:
    with open("/proc/self/maps", "rb", buffering=0) as f:
      return f.readall().count(b"\n")
  except OSError:
    return None


#: After a compilation (or a load from the persistent cache) that leaves the process holding
#: more than this share of :func:`map_limit` memory mappings, jaxprune warns, once per crossing:
#: a process that falls back below the line (``jax.clear_caches()``) is warned again when it
#: next crosses it. At XLA's default flags a ``ga.search`` on a new model shape adds about 290
#: mappings and a ``fit`` about 250, so this leaves room for a few dozen more before XLA would
#: abort.
MAPPINGS_WARN_SHARE = 0.8

#: Bounds on the mappings one compilation (or load from the persistent cache) adds, to space
#: the checks: reading ``/proc/self/maps`` costs 0.5-2 us per mapping (0.8 ms at 450, 18 ms
#: at 40,000). Measured at XLA's default flags: a ResNet-18's training program about 900
#: mappings (6.6 s compiling, 0.6 s loading), a tiny eager op 3 (10-20 ms). A check comes once
#: the compilations since the last one may have used half the headroom left to the warning;
#: above the line, once they may have added a tenth of the mappings the limit leaves beyond it
#: (about 1,300 at the default limit), to notice a release (``jax.clear_caches()``).
_MAPS_PER_PROGRAM = 400
_MAPS_PER_SECOND = 2000

_MAP_LIMIT = map_limit()
_WARNED = [False]   # warned since the process last held fewer mappings than the line
_BUDGET = [0.0]     # mappings the compilations may add before the next check


def _warn_near_map_limit(event: str, duration: float, **_) -> None:
  """A JAX duration listener: the warning of the module docstring's last paragraph."""
  if event != "/jax/core/compile/backend_compile_duration" or not _MAP_LIMIT:
    return
  _BUDGET[0] -= _MAPS_PER_PROGRAM + _MAPS_PER_SECOND * duration
  if _BUDGET[0] > 0:
    return
  held = mappings()
  if held is None:
    return
  line = MAPPINGS_WARN_SHARE * _MAP_LIMIT
  if held <= line:
    _WARNED[0] = False   # below the line again (or still): the next crossing warns
    _BUDGET[0] = (line - held) / 2
    return
  _BUDGET[0] = (_MAP_LIMIT - line) / 10
  if _WARNED[0]:
    return
  _WARNED[0] = True
  warnings.warn(
      f"This process holds {held:,} memory mappings, {100 * held / _MAP_LIMIT:.0f}% of Linux's "
      f"limit (vm.max_map_count = {_MAP_LIMIT:,}): every program XLA:CPU compiled keeps some, "
      "and JAX keeps every program, so XLA will abort compiling when they run out ('LLVM ERROR: "
      "Unable to allocate section memory!', or a segmentation fault). Call jax.clear_caches() "
      "to release the compiled programs (they compile again when next needed), or raise the "
      "limit (sudo sysctl -w vm.max_map_count=262144); see docs/reliability.md.",
      RuntimeWarning, stacklevel=2)


jax.monitoring.register_event_duration_secs_listener(_warn_near_map_limit)
