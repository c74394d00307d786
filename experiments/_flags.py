"""Command lines of the experiment binaries: flags generated from a study's ``Config``.

Every study is a frozen dataclass ``Config`` (``Config()`` the published study,
``Config.quick()`` the smoke run) and ``run(config, workdir, *, data=, data_path=)``. Its flags
are not written by hand: :func:`define_flags` makes one absl flag per ``Config`` field, with the
field's name, its type (int, float, bool, str, an enum when the field names ``choices``, a
comma-separated list for tuples), its default and the help text of :func:`field`. The common
flags (``--workdir``, ``--data``, ``--data_path``, ``--seed``, ``--quick`` and the compilation
cache's) come with them. :func:`config_from_flags` turns the parsed flags back into a
``Config``: ``--quick`` starts from ``Config.quick()`` and flags given on the command line win.

Usage errors (:func:`fail`) print one line and a hint to run ``--help`` (exit status 2), never
a traceback or absl's page of flag help.

A binary's tail::

  def main(argv):
    _flags.run_main(argv, Config, run)


  if __name__ == "__main__":
    _flags.define_flags(Config, default_data="features")
    _flags.run_binary(main)
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import shlex
import sys
from typing import Any, Callable, Sequence

from absl import app
from absl import flags

from experiments import _speed

FLAGS = flags.FLAGS
# The flags this module defines for a study belong to the module that asks for them (the
# binary's __main__), so that ``--help`` lists them, as when a binary wrote them by hand.
flags.disclaim_key_flags()

DATA_CHOICES = ("features", "digits_features", "images", "sfew_features", "sfew_images")
IMAGE_DATA = ("images", "sfew_images")  # the --data choices that hold images
BUNDLED_DATA = tuple(d for d in DATA_CHOICES if not d.startswith("sfew_"))  # need no path
SEED_LIMIT = 2**32
#: Flags every binary defines itself; a Config field of one of these names (``seed``) is set
#: from it rather than getting a second flag.
COMMON = ("workdir", "data", "data_path", "seed", "quick")


# ----------------------------------------------------------------------------- errors


def fail(message: str) -> None:
  """Stops the program with a clear message and a non-zero exit, before any long work."""
  raise app.UsageError(message)


def check_finite(name: str, value: float, *, positive: bool = False) -> None:
  """Fails unless the scalar flag ``--name`` is a finite number (``positive``: also > 0). NaN
  and infinity parse as floats; a learning rate or a penalty of either would only fail, or give
  meaningless results, after the study had started writing."""
  if not (math.isfinite(value) and (value > 0 or not positive)):
    fail(f"--{name} must be a {'positive ' if positive else ''}finite number, got {value}.")


def refuse_image_data(data: str, needs: str, hint: str = "") -> None:
  """Fails when ``data`` names images but the study ``needs`` feature vectors (before an image
  tree is loaded only to be refused)."""
  if data in IMAGE_DATA:
    fail(f"--data={data} holds images, but this study {needs}; use --data=features, "
         f"digits_features or sfew_features{hint}.")


def normal_data_path(path: str | None) -> str | None:
  """``--data_path`` as one spelling of its path: ``~`` expanded, trailing slashes, ``.`` and
  ``..`` parts and doubled slashes folded (``os.path.normpath``; links are not resolved), so that
  ``SFEW/`` and ``SFEW`` share a cache fingerprint. Anything that is not a non-empty string is
  returned as it is.

  Example:
    >>> normal_data_path("data/SFEW/"), normal_data_path("./data//SFEW")
    ('data/SFEW', 'data/SFEW')
  """
  if not isinstance(path, str) or not path.strip():
    return path
  return os.path.normpath(os.path.expanduser(path))


def _inside(path: str, folder: str) -> bool:
  """Whether ``path`` is ``folder`` or lies inside it (``~`` expanded, links resolved)."""
  path = os.path.realpath(os.path.expanduser(path))
  folder = os.path.realpath(os.path.expanduser(folder))
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_workdir_outside_data(workdir: str, data: str | None, data_path: str | None,
                               study: str | None = None) -> None:
  """Fails when the study's output folder (``<workdir>/<study>``; with ``study`` None, anything
  under ``workdir``) would lie inside the SFEW image tree ``data_path``: the next run would read
  that folder as a class folder. Called before anything is loaded or written."""
  if data not in IMAGE_DATA or not data_path or not str(workdir).strip():
    return
  out = os.path.join(workdir, study) if study else workdir
  if _inside(out, data_path):
    shown = os.path.join(workdir, study or "<study>")
    tree = os.path.abspath(os.path.expanduser(data_path))
    fail(f"--workdir={workdir} would put the study's folder ({shown}) inside "
         f"--data_path={data_path}, the SFEW image tree, where the next run would read it as a "
         "class folder; pass a --workdir outside the image tree (e.g. "
         f"--workdir={shlex.quote(os.path.join(os.path.dirname(tree), 'work'))}).")


def one_line_usage_errors(main: Callable[[Sequence[str]], Any]) -> Callable[[Sequence[str]], Any]:
  """Wraps a binary's ``main`` so that a usage error (:func:`fail`) prints one line and a hint to
  run ``--help`` (exit status 2) instead of absl's page of flag help before the message, a
  file the run may not write or read, or a full disk, one line naming the path (exit status
  1), and Ctrl-C prints how to resume (exit status 130) instead of a traceback."""
  def wrapped(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      print(f"Error: {e}\nRun {_program(argv)} --help to see the flags.", file=sys.stderr,
            flush=True)
      sys.exit(2)
    except OSError as e:
      if not (isinstance(e, PermissionError) or e.errno in _DISK_ERRNOS):
        raise
      print(f"Error: {_os_error_line(e)}", file=sys.stderr, flush=True)
      sys.exit(1)
    except KeyboardInterrupt:
      print("\nInterrupted. Every step that finished is saved in the workdir; run the same "
            "command again to resume from them.", file=sys.stderr, flush=True)
      sys.exit(130)
  return wrapped


# A read-only file system, a full disk or quota: the machine's state, not a bug (one line).
_DISK_ERRNOS = frozenset((errno.EROFS, errno.ENOSPC, errno.EDQUOT))


def _os_error_line(e: OSError) -> str:
  """One line for a file the run may not write or read, or a disk that is full: the path (the
  final one of a rename, a temporary file's folder), what the system said, and the fix."""
  from experiments import _store  # pylint: disable=g-import-not-at-top (it imports this module)
  where = _store.error_path(e)
  what = e.strerror or str(e)
  shown = f" on {where!r}" if where is not None else ""
  if e.errno in (errno.ENOSPC, errno.EDQUOT):
    fix = "Free disk space there (or raise the quota), or pass a --workdir on another disk."
  else:
    fix = ("Make it writable (or readable) for this user, or pass another --workdir (or "
           "--data_path, if it is your data).")
  return (f"{what}{shown}. {fix} Every step that finished is saved; run the same command again "
          "to resume from them.")


def _program(argv: Sequence[str]) -> str:
  """How the user started this binary: ``python -m experiments.x`` or the script's name."""
  spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  if spec is not None and spec.name:
    return f"python -m {spec.name}"
  return os.path.basename(argv[0]) if argv else "the program"


def run_binary(main: Callable[[Sequence[str]], Any]) -> None:
  """``app.run(main)`` with one-line usage errors (the ``if __name__ == '__main__'`` of every
  binary)."""
  app.run(one_line_usage_errors(main))


def check_no_args(argv: Sequence[str], command_line: Sequence[str] | None = None) -> None:
  """Fails on positional arguments (a binary takes flags only). ``command_line`` (default
  ``sys.argv``) is the command as typed: when the stray words continue a flag's value (a path
  with a space, unquoted), the error shows the value quoted."""
  if len(argv) > 1:
    fail(f"Unexpected arguments: {' '.join(argv[1:])}"
         f"{split_value_hint(argv[1:], sys.argv if command_line is None else command_line)}")


def split_value_hint(extra: Sequence[str], command_line: Sequence[str]) -> str:
  """A hint when the stray words ``extra`` follow a flag's value on ``command_line``: the shell
  split an unquoted value with spaces (``--data_path=/data/my SFEW``), so the flag got only
  its first word. '' when they follow no flag value.

  Example:
    >>> split_value_hint(["SFEW"], ["prog", "--data_path=/data/my", "SFEW", "--quick"])[-40:]
    "so quote it: --data_path='/data/my SFEW'"
    >>> split_value_hint(["x"], ["prog", "--quick", "x"])
    ''
  """
  words = list(command_line)
  for i in range(1, len(words) - len(extra) + 1):
    if words[i:i + len(extra)] != list(extra):
      continue
    before = words[i - 1]
    if before.startswith("--") and "=" in before:
      name, value = before[2:].split("=", 1)
      shown = before
    elif i >= 3 and words[i - 2].startswith("--") and "=" not in words[i - 2]:
      name, value = words[i - 2][2:], before
      shown = f"{words[i - 2]} {before}"
    else:
      continue
    whole = " ".join([value, *extra])
    return (f". They continue {shown}: the shell splits a value at spaces, so quote it: "
            f"--{name}={shlex.quote(whole)}")
  return ""


# ----------------------------------------------------------------------------- value checks


def parse_list(name: str, values, kind=float, *, low=None, high=None, low_open=False,
               nonempty=True, unique=True) -> tuple:
  """Parses a list flag (or checks a tuple setting) into a tuple of ``kind``; clear errors via
  :func:`fail`.

  Example:
    >>> parse_list("angles", ["15", "45"], float, low=0.0, high=90.0)
    (15.0, 45.0)
  """
  out = []
  for v in values or ():
    try:
      x = kind(v)
    except (TypeError, ValueError):
      fail(f"--{name}: {v!r} is not a valid {kind.__name__}.")
    if isinstance(x, float) and not math.isfinite(x):
      fail(f"--{name}: values must be finite, got {v!r}.")
    if low is not None and (x <= low if low_open else x < low):
      fail(f"--{name}: values must be {'>' if low_open else '>='} {low}, got {v!r}.")
    if high is not None and x > high:
      fail(f"--{name}: values must be <= {high}, got {v!r}.")
    out.append(x)
  if nonempty and not out:
    fail(f"--{name} needs at least one value.")
  if unique and len(set(out)) != len(out):
    fail(f"--{name} lists a value twice: {values}.")
  if unique:
    # Float settings name cached steps, results keys, table rows and figures by ``f"{x:g}"``:
    # two values equal to 6 significant digits would share one cached result.
    shown = {}
    for x in out:
      if isinstance(x, float) and shown.setdefault(f"{x:g}", x) != x:
        fail(f"--{name}: {shown[f'{x:g}']!r} and {x!r} agree to 6 significant digits (both "
             f"{x:g}), the precision the results are keyed and shown by; give values that "
             "differ within 6 significant digits.")
  return tuple(out)


def check_positive(*, minimum: int = 1, **values) -> None:
  """Fails unless every named setting is at least ``minimum`` (checked in order).

  Example:
    >>> check_positive(epochs=3, batch_size=32)
    >>> check_positive(folds=10, minimum=2)
  """
  for name, value in values.items():
    if value is None or value < minimum:
      fail(f"--{name} must be at least {minimum}, got {value}.")


def check_fields(config) -> None:
  """Checks every field of a ``Config`` against what :func:`field` declared: list bounds
  (:func:`parse_list` with the field's ``list_opts``) and ``choices``; the same one-line
  messages as the command line's, and ``seed`` in [0, 2^32). A study's ``validate`` calls it
  first."""
  for f in dataclasses.fields(config):
    if f.name == "seed":
      check_seed(config.seed)
    meta = f.metadata
    value = getattr(config, f.name)
    if "list_opts" in meta:
      parse_list(f.name, value, **meta["list_opts"])
    if meta.get("choices") is not None and value not in meta["choices"]:
      fail(f"--{f.name}={value!r} is not one of {', '.join(map(str, meta['choices']))}.")


def check_seed(seed) -> None:
  """Fails unless ``seed`` is an integer in [0, 2^32)."""
  if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                           or not 0 <= seed < SEED_LIMIT):
    fail(f"--seed must be an integer in [0, 2^32) = [0, {SEED_LIMIT}), got {seed!r}.")


# ----------------------------------------------------------------------------- Config -> flags


def field(default: Any, help: str, *, choices: Sequence[str] | None = None,  # pylint: disable=redefined-builtin
          kind: type | None = None, parse: Callable[[str, str], Any] | None = None,
          unparse: Callable[[Any], str] | None = None, **list_opts) -> Any:
  """A ``Config`` field with the help text of its flag (one source for both).

  Args:
    default: the published study's value (also the flag's default).
    help: the flag's help text.
    choices: for a str field, the allowed values (the flag is an enum).
    kind: for a tuple field, the element type (default: the type of the default's first
      element, else float).
    parse: for a field whose flag is a string in its own syntax (``--image_size=30x24``),
      ``parse(text, name) -> value``; ``unparse(value) -> text`` gives the flag's default.
    **list_opts: for a tuple field, bounds passed to :func:`parse_list` (``low``, ``high``,
      ``low_open``, ``nonempty``, ``unique``).
  """
  meta: dict[str, Any] = {"help": help}
  if choices is not None:
    meta["choices"] = tuple(choices)
  if parse is not None:
    meta["parse"], meta["unparse"] = parse, unparse or str
  if isinstance(default, tuple) and parse is None:
    if kind is None:
      kind = type(default[0]) if default else float
    meta["list_opts"] = {"kind": kind, **list_opts}
  return dataclasses.field(default=default, metadata=meta)


def any_size_field(default: bool) -> Any:
  """The ``--any_size`` field of a binary that reads the SFEW image tree (one help text for
  experiments.featurize and the CNN studies)."""
  return field(default, "Accept SFEW frames of any size (False: every frame must be 720x576, "
               "as in SFEW; --data=sfew_images and experiments.featurize).")


ON_ERROR_CHOICES = ("raise", "skip")


def on_error_field() -> Any:
  """The ``--on_error`` field of a binary that reads the SFEW image tree."""
  return field("raise", "A non-image, unreadable or (without --any_size) wrongly sized file in "
               "the SFEW tree: 'raise' stops naming it; 'skip' skips it and lists it in the "
               "report.", choices=ON_ERROR_CHOICES)


def _base_type(f: dataclasses.Field) -> str:
  """'int', 'float', 'bool', 'str' or 'tuple' from a field's annotation (a string under
  ``from __future__ import annotations``), ``X | None`` read as X."""
  t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
  t = t.replace("Optional[", "").replace(" ", "")
  parts = [p for p in t.split("|") if p != "None"]
  return parts[0].split("[")[0] if parts else "str"


def define_flags(config_cls, *, default_data: str = "features", common: bool = True,
                 flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines one flag per field of ``config_cls`` (name, type, default and help from the field;
  see :func:`field`) and, unless ``common`` is False (a tool that is not a study), the common
  flags of a study (:func:`define_common_flags`)."""
  if common:
    define_common_flags(default_data, flag_values)
  for f in dataclasses.fields(config_cls):
    if common and f.name in COMMON:
      continue
    meta, default, name = f.metadata, f.default, f.name
    help_text = meta.get("help")
    if not help_text:
      raise ValueError(f"{config_cls.__name__}.{name} has no help text; declare it with "
                       "_flags.field(default, help).")
    t = _base_type(f)
    if "parse" in meta:
      flags.DEFINE_string(name, None if default is None else meta["unparse"](default), help_text,
                          flag_values=flag_values)
    elif "list_opts" in meta or t == "tuple":
      flags.DEFINE_list(name, [str(v) for v in default], help_text, flag_values=flag_values)
    elif meta.get("choices") is not None:
      flags.DEFINE_enum(name, default, list(meta["choices"]), help_text, flag_values=flag_values)
    elif t == "bool":
      flags.DEFINE_bool(name, default, help_text, flag_values=flag_values)
    elif t == "int":
      flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)
    elif t == "float":
      flags.DEFINE_float(name, default, help_text, flag_values=flag_values)
    elif t == "str":
      flags.DEFINE_string(name, default, help_text, flag_values=flag_values)
    else:
      raise TypeError(f"{config_cls.__name__}.{name}: no flag for a field of type {f.type}.")


def define_common_flags(default_data: str, flag_values: flags.FlagValues = FLAGS) -> None:
  """Defines --workdir, --data, --data_path, --seed and --quick (and the compilation cache's)."""
  fv = flag_values
  flags.DEFINE_string("workdir", "workdir", "Folder for outputs; results go to WORKDIR/<study>/.",
                      flag_values=fv)
  flags.DEFINE_string(
      "data", default_data,
      "Dataset: 'features' (bundled diabetes stand-in, 10 features, 7 classes), "
      "'digits_features' (easy bundled contrast), 'images' (bundled digits images), "
      "'sfew_features' or 'sfew_images' (your own SFEW copy, with --data_path).", flag_values=fv)
  flags.DEFINE_string("data_path", None,
                      "Path to SFEW.xlsx / SFEW.csv (sfew_features) or the class-folder image "
                      "tree (sfew_images).", flag_values=fv)
  flags.register_multi_flags_validator(
      ["data", "data_path"],
      # Only a bundled name is refused here; an unknown one (SFEW_features) gets the clearer
      # "Unknown --data" error, which lists the names, when the data are loaded.
      lambda f: f["data_path"] is None or f["data"] not in BUNDLED_DATA,
      message="--data_path reads your own SFEW copy, which only --data=sfew_features (SFEW.xlsx "
              "/ .csv) or --data=sfew_images (the class-folder tree) loads; the bundled data "
              "would be used instead. Add --data=sfew_features or --data=sfew_images.",
      flag_values=fv)
  flags.DEFINE_integer("seed", 0, f"Random seed in [0, {SEED_LIMIT}); a run is deterministic "
                       "for a seed.", flag_values=fv)
  flags.register_validator("seed", lambda v: v is not None and 0 <= v < SEED_LIMIT,
                           message=f"--seed must be an integer in [0, 2^32) = [0, {SEED_LIMIT}).",
                           flag_values=fv)
  flags.DEFINE_bool("quick", False, "A reduced run for tests and smoke checks (seconds); flags "
                    "given explicitly still win over its reduced defaults.", flag_values=fv)
  _speed.define_flags(fv)


def config_from_flags(config_cls, flag_values: flags.FlagValues = FLAGS):
  """The study's ``Config`` from parsed flags: ``config_cls.quick(**given)`` under ``--quick``,
  else ``config_cls(**given)``, where ``given`` holds the flags given on the command line (an
  explicit flag always wins over --quick's reduced value). List flags are parsed and
  range-checked here, with one-line errors.

  Example:
    >>> from absl import flags
    >>> from experiments import similarity_bounds as sb
    >>> fv = flags.FlagValues()
    >>> define_flags(sb.Config, default_data="features", flag_values=fv)
    >>> _ = fv(["prog", "--quick", "--epochs=5", "--hidden=4,8"])
    >>> config_from_flags(sb.Config, fv) == sb.Config.quick(epochs=5, hidden=(4, 8))
    True
  """
  fv = flag_values
  given: dict[str, Any] = {}
  for f in dataclasses.fields(config_cls):
    if f.name not in fv or not fv[f.name].present:
      continue
    value, meta = fv[f.name].value, f.metadata
    if "parse" in meta:
      value = None if value is None else meta["parse"](value, f.name)
    elif "list_opts" in meta:
      value = parse_list(f.name, value, **meta["list_opts"])
    given[f.name] = value
  if "quick" in fv and fv["quick"].value:
    return config_cls.quick(**given)
  return config_cls(**given)


def run_main(argv: Sequence[str], config_cls, run: Callable[..., Any]) -> Any:
  """The body of a study binary's ``main``: flags -> ``Config`` -> ``run(config, workdir,
  data=, data_path=)``, with the compilation cache and the closing time-per-stage table.

  Every ``Config`` has the classmethod ``quick(**overrides)`` (the smoke run) and ``run``
  validates the config first (``config.validate()``), so bad settings stop before any work.
  """
  check_no_args(argv)
  check_workdir_outside_data(FLAGS.workdir, FLAGS.data, FLAGS.data_path)
  config = config_from_flags(config_cls)
  _speed.enable_from_flags()
  _speed.start()
  try:
    out = run(config, FLAGS.workdir, data=FLAGS.data, data_path=FLAGS.data_path)
  except BaseException:
    from experiments import _store  # pylint: disable=g-import-not-at-top
    _store.release_all_locks()  # a failed run leaves no held lock behind, even in-process
    raise
  table = _speed.stage_table()
  if table:
    print("\nTime per stage (wall clock, compilation included):\n" + table, flush=True)
  return out
