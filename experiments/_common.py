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
import dataclasses
import hashlib
import io
import json
import math
import os
import tempfile
import zlib
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from experiments import _speed
from jaxprune import train as train_lib

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
  _speed.define_flags()


def fail(message: str) -> None:
  """Stops the program with a clear message and a non-zero exit, before any long work."""
  raise app.UsageError(message)


def check_no_args(argv: Sequence[str]) -> None:
  """Fails on positional arguments (a binary takes flags only)."""
  if len(argv) > 1:
    fail(f"Unexpected arguments: {' '.join(argv[1:])}")


def parse_list(name: str, values, kind=float, *, low=None, high=None, low_open=False,
               nonempty=True, unique=True) -> tuple:
  """Parses an absl list flag into a tuple of ``kind``; clear errors via :func:`fail`.

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
  return tuple(out)


def check_positive(*, minimum: int = 1, **values) -> None:
  """Fails unless every named flag value is at least ``minimum`` (checked in order).

  Example:
    >>> check_positive(epochs=3, batch_size=32)
    >>> check_positive(folds=10, minimum=2)
  """
  for name, value in values.items():
    if value is None or value < minimum:
      fail(f"--{name} must be at least {minimum}, got {value}.")


def config_from_flags(config_cls, names: Sequence[str],
                      lists: Mapping[str, Callable[[str, Any], Any]] | None = None):
  """A study's frozen dataclass config from the flags.

  Without --quick every listed flag is read; with --quick the start is ``config_cls.quick()``
  and only the flags given on the command line replace its values. ``--seed`` is always read.

  Args:
    config_cls: the dataclass; ``config_cls()`` is the full study, ``config_cls.quick()`` the
      reduced one.
    names: flags copied as they are.
    lists: list flags, each with its parser ``parse(name, values)`` (e.g. a
      ``functools.partial`` of :func:`parse_list`); read before ``names``.
  """
  f = FLAGS
  base = config_cls.quick() if f.quick else config_cls()
  kw: dict[str, Any] = {"seed": f.seed}
  for name, parse in (lists or {}).items():
    if f[name].present or not f.quick:
      kw[name] = parse(name, f[name].value)
  for name in names:
    if f[name].present or not f.quick:
      kw[name] = f[name].value
  return dataclasses.replace(base, **kw)


def study_main(config_from_flags: Callable[[], Any], run: Callable[..., Any]):
  """The ``main(argv)`` of a binary whose study is ``run(config, data=, data_path=, workdir=)``.

  Example:
    >>> main = study_main(config_from_flags, run)  # then: define_flags(); app.run(main)
  """
  def main(argv):
    check_no_args(argv)
    _speed.enable_from_flags()
    _speed.start()
    run(config_from_flags(), data=FLAGS.data, data_path=FLAGS.data_path, workdir=FLAGS.workdir)
    table = _speed.stage_table()
    if table:
      print("\nTime per stage (wall clock, compilation included):\n" + table, flush=True)
  return main


def config_key(seed: int, *parts: Any) -> jax.Array:
  """A PRNG key derived from the seed and a configuration's description (never from order).

  Example:
    >>> k = config_key(0, "train", 100, 0.001, 3)
  """
  key = jax.random.key(int(seed))
  for p in parts:
    key = jax.random.fold_in(key, zlib.crc32(repr(p).encode()) & 0x7FFFFFFF)
  return key


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


def _leaf_name(key_path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in key_path)


def save_tree(path: str, tree: Any) -> None:
  """Saves a pytree's leaves as .npz, atomically, each named by its key path ('params/a/kernel')
  and stored in ``jax.tree.leaves`` order."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  flat = {_leaf_name(kp): np.asarray(v) for kp, v in leaves}
  if len(flat) != len(leaves):
    raise ValueError(f"Cannot save to {path}: two leaves share a name (a key holds '/').")
  buf = io.BytesIO()
  np.savez(buf, **flat)
  atomic_write_bytes(path, buf.getvalue())


def load_tree(path: str, template: Any = None) -> Any:
  """Loads what :func:`save_tree` wrote.

  Without ``template``: nested dicts of numpy arrays, rebuilt from the names. With it: the
  arrays (as jax arrays, in file order) in the structure of ``template``.
  """
  with np.load(path) as f:
    arrays = [(name, np.asarray(f[name])) for name in f.files]
  if template is None:
    out: dict = {}
    for name, a in arrays:
      node = out
      *parents, leaf = name.split("/")
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = a
    return out
  treedef = jax.tree.structure(template)
  if treedef.num_leaves != len(arrays):
    raise ValueError(f"{path} holds {len(arrays)} arrays, the model needs {treedef.num_leaves}; "
                     "delete the cache folder to start again.")
  return jax.tree.unflatten(treedef, [jnp.asarray(a) for _, a in arrays])


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


class Progress(train_lib.Progress):
  """Stage / step lines with elapsed time and the time left (``progress.step(what)``)."""

  def __init__(self, total: int, stage: str = ""):
    super().__init__(total, stage, unit="")

  def step(self, what: str = "", n: int = 1, **metrics) -> None:
    _speed.record(self.desc, what)   # one row of the binary's closing time table
    super().step(what, n, **metrics)


def _safe(key: str) -> str:
  return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in key)


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

  def cache_file(self, key: str, suffix: str) -> str:
    """``cache/<fingerprint>/<key, made safe>-<digest of key><suffix>``: distinct keys,
    distinct files."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return os.path.join(self.cache_dir, f"{_safe(key)[:80]}-{digest}{suffix}")

  def _tree_file(self, key: str) -> str:
    path = self.cache_file(key, ".npz")
    # Caches written before the .npz files were named like the .json ones: <safe key>.npz.
    legacy = os.path.join(self.cache_dir, _safe(key) + ".npz")
    return legacy if not os.path.exists(path) and os.path.exists(legacy) else path

  def cached(self, key: str, fn: Callable[[], Any]) -> Any:
    """Returns the saved result of ``key`` if this configuration finished before, else runs
    ``fn`` and saves its (JSON-able) result atomically before returning it."""
    f = self.cache_file(key, ".json")
    if os.path.exists(f):
      with open(f) as fh:
        self.resumed += 1
        return json.load(fh)
    result = to_jsonable(fn())
    write_json(f, result)
    # Round-trip through JSON so a fresh and a resumed run return identical values.
    return json.loads(json.dumps(result))

  def cached_tree(self, key: str, fn: Callable[[], Any], template: Any = None) -> Any:
    """Like :meth:`cached` for a pytree of arrays, saved beside the JSON files as
    ``<key>-<digest>.npz``; always returns the tree read back from disk (see
    :func:`load_tree` for ``template``)."""
    path = self._tree_file(key)
    if not os.path.exists(path):
      save_tree(path, fn())
    return load_tree(path, template)

  def cached_with_tree(self, key: str, fn: Callable[[], tuple[Any, Any]],
                       template: Any = None) -> tuple[Any, Any]:
    """Like :meth:`cached` for a step that returns ``(pytree, record)``.

    The pytree goes to ``<key>-<digest>.npz``, written before the JSON record (which marks the
    step as finished), so a resumed run gets exactly the arrays an uninterrupted one used. The
    returned pytree is always the one read back from disk.
    """
    path = self._tree_file(key)

    def run():
      tree, record = fn()
      save_tree(path, tree)
      return record

    record = self.cached(key, run)
    if not os.path.exists(path):
      fail(f"The cache holds the record of step {key!r} but not its arrays ({path}); "
           f"delete {self.cache_dir} to start again.")
    return load_tree(path, template), record

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
