"""The result store of the experiment binaries: the output folder, resumable atomic results,
locks, and a fingerprint of the data each result came from.

A study wraps every finished configuration in ``study.cached(key, fn)`` so that a run killed
at any point and started again with the same settings continues where it stopped.

Layout of ``<workdir>/<study>/``::

  results.json      every number and the settings used
  REPORT.md         a short report that embeds the tables and figures
  *.md, *.csv       tables (``experiments/_report.py``)
  *.png             figures
  cache/<fingerprint>/<key>.json   one file per finished configuration (resume)
  cache/<fingerprint>/compute_seconds.json, settings.json   run bookkeeping
  cache/outputs.json  the files above this study wrote, with their settings' fingerprint
  .lock, cache/<fingerprint>/.lock   advisory locks (see below)

Reliability (see docs/reliability.md): the fingerprint covers the settings and a content hash
of the data actually loaded; ``results.json`` is written last, so its presence means the run
finished; a damaged cache file is reported and recomputed; the study's own temporary files are
removed at start, and so are the outputs of an earlier run with other settings (only files
``cache/outputs.json`` says the study wrote, and only while they still hold what it wrote); an advisory lock per cache folder makes a second run with the same settings
wait, and one on the study folder makes a concurrent run with other settings stop with a
message instead of overwriting the first run's files.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
import zipfile
import zlib
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from experiments._flags import DATA_CHOICES
from experiments._flags import check_seed
from experiments._flags import check_workdir_outside_data
from experiments._flags import fail
from experiments._flags import normal_data_path


def config_key(seed: int, *parts: Any) -> jax.Array:
  """A PRNG key derived from the seed and a configuration's description (never from order).

  Example:
    >>> k = config_key(0, "train", 100, 0.001, 3)
  """
  key = jax.random.key(int(seed))
  for p in parts:
    key = jax.random.fold_in(key, zlib.crc32(repr(p).encode()) & 0x7FFFFFFF)
  return key


def split_seed(seed: int, run: int) -> int:
  """The data-split seed of run ``run`` of a study seeded ``seed``: ``seed * 1000 + run``
  reduced modulo 2^32 (what the splitters accept), so every ``--seed`` in [0, 2^32) works and
  a seed whose ``seed * 1000 + run`` already fits keeps exactly the split it had.

  Example:
    >>> split_seed(3, 1), split_seed(2**32 - 1, 0)
    (3001, 4294966296)
  """
  return (int(seed) * 1000 + int(run)) % 2**32


# ----------------------------------------------------------------------------- atomic files


TMP_PREFIX = ".tmp-"  # temporary files of atomic writes: .tmp-<pid>-<random><name>


def _umask() -> int:
  """The process's umask, read without changing it where the system allows (Linux)."""
  with contextlib.suppress(OSError, ValueError):
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
  os.umask(mask)
  return mask


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically: a kill never leaves a truncated file.

  The file gets the permissions a plain ``open(path, 'w')`` would give it (0666 less the
  umask), not ``mkstemp``'s private 0600.
  """
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{TMP_PREFIX}{os.getpid()}-",
                             suffix=os.path.basename(path))
  try:
    os.fchmod(fd, 0o666 & ~_umask())
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  _note_output(path, data)


def to_jsonable(x: Any) -> Any:
  """Converts numpy/jax arrays and scalars (nested in dicts, lists, tuples) to JSON values.

  Strict JSON has no NaN or infinity: NaN becomes None and +-inf becomes +-1e308, which reads
  back as a finite number. A study whose cached numbers are averaged or printed must refuse a
  non-finite metric before caching it (progressive_compression refuses an infinite test
  loss), or the summary reports the stand-in as a result."""
  if isinstance(x, Mapping):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if hasattr(x, "tolist") and callable(x.tolist):  # numpy and jax arrays / scalars
    return to_jsonable(np.asarray(x).tolist())
  if isinstance(x, float) and not math.isfinite(x):
    return None if math.isnan(x) else (1e308 if x > 0 else -1e308)
  return x


def write_json(path: str, obj: Any, *, sort_keys: bool = True) -> None:
  """Writes ``obj`` as JSON, atomically; ``sort_keys=False`` keeps the dicts' own key order
  (the cache files: a resumed step must return its dicts in the order a fresh one does)."""
  atomic_write_bytes(path, json.dumps(to_jsonable(obj), indent=1,
                                      sort_keys=sort_keys).encode())


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
  try:
    with open(path, "rb") as fh, np.load(fh) as f:
      arrays = [(name, np.asarray(f[name])) for name in f.files]
  except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError) as e:
    raise DamagedFile(path, e) from None
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


class DamagedFile(ValueError):
  """A saved file that cannot be read back (truncated or corrupted)."""

  def __init__(self, path: str, error: BaseException):
    self.path = path
    self.error = error
    super().__init__(f"{path} is damaged and cannot be read ({type(error).__name__}: {error}); "
                     "delete it to have it recomputed.")


# ----------------------------------------------------------------------------- the study


def _safe(key: str) -> str:
  return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in key)


class _Lock:
  """An advisory ``fcntl.flock`` lock on a file, held until :meth:`release` (or process exit).

  Locks are per process: a lock path already held by an earlier (finished or failed) study of
  this same process is handed over, since one process runs its studies one after another.
  """

  _held: dict[str, "_Lock"] = {}

  def __init__(self, path: str):
    self.path = os.path.abspath(path)
    self.fd: int | None = None

  def holder(self) -> str:
    with contextlib.suppress(OSError):
      with open(self.path) as f:
        return f.read().strip() or "unknown"
    return "unknown"

  def try_acquire(self, note: str = "") -> bool:
    old = _Lock._held.pop(self.path, None)
    if old is not None:
      old.release()
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      return False
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}{note}".encode())
    self.fd = fd
    _Lock._held[self.path] = self
    return True

  def release(self) -> None:
    if self.fd is not None:
      with contextlib.suppress(OSError):
        os.ftruncate(self.fd, 0)  # still ours: an unheld .lock names no process
      with contextlib.suppress(OSError):
        os.close(self.fd)  # closing the descriptor releases the flock
      self.fd = None
    if _Lock._held.get(self.path) is self:
      del _Lock._held[self.path]


def release_all_locks() -> None:
  """Releases every study lock this process holds (a run that failed after opening its study;
  the binaries call it on any error, as process exit would)."""
  for lock in list(_Lock._held.values()):  # pylint: disable=protected-access
    lock.release()


#: Seconds a run waits for another run with the same settings (None: as long as it takes).
LOCK_WAIT_S: float | None = None

#: The record of the files a study wrote in its folder (under ``cache/``).
OUTPUTS_MANIFEST = "outputs.json"

# Open studies by absolute folder, from start to :meth:`Study.release`: files written there
# through :func:`atomic_write_bytes` (tables, figures, REPORT.md, results.json, flops files)
# are recorded as the study's outputs.
_STUDY_DIRS: dict[str, "Study"] = {}


def _note_output(path: str, data: bytes) -> None:
  """Records ``path`` as an output of the open study whose folder holds it, if any."""
  study = _STUDY_DIRS.get(os.path.dirname(os.path.abspath(path)))
  if study is not None:
    study._record_output(os.path.basename(path), hashlib.sha256(data).hexdigest())  # pylint: disable=protected-access


def _file_sha256(path: str) -> str | None:
  h = hashlib.sha256()
  try:
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  except OSError:
    return None
  return h.hexdigest()

# The data loaded last through :func:`load_data` (its fingerprint record), used by a Study
# that is not given its data explicitly.
_LOADED_DATA: dict[str, Any] | None = None


def data_record(ds, name: str | None = None, path: str | None = None) -> dict[str, Any]:
  """Name, version, source, size and a SHA-256 content hash of a loaded dataset's arrays.

  The hash covers the arrays as loaded (inputs, labels, person ids, class names), so any edit
  of the source file that changes what is loaded changes it, wherever the file lives.

  Example:
    >>> from jaxprune import data
    >>> rec = data_record(data.load("features"), "features")
    >>> sorted(rec)[:6]
    ['dropped', 'duplicates', 'examples', 'name', 'no_person', 'path']
    >>> sorted(rec)[6:]
    ['persons', 'sha256', 'skipped', 'source', 'version']

  ``dropped`` (feature rows with a missing value) and ``skipped`` (entries of an image tree)
  are what the loader left out, so that a report says what its data lacked; ``duplicates`` the
  images the data hold more than once (an image name on several rows, with its ``rows``, or a
  frame in several class folders, with its ``paths``), which a split not by person can put on
  both sides. ``persons`` is the
  number of persons the file names carry (None without persons: every split is then stratified,
  not person-independent) and ``no_person`` the file names that carry no person id (SFEW copies
  only), so that a report says how the data were split.
  """
  import jaxprune  # pylint: disable=g-import-not-at-top
  h = hashlib.sha256()
  for a in (ds.x, ds.y, ds.groups):
    if a is not None:
      a = np.ascontiguousarray(a)
      h.update(f"{a.dtype.str}{a.shape}".encode())
      h.update(a.tobytes())
  h.update(json.dumps(list(ds.class_names)).encode())
  info = getattr(ds, "info", {}) or {}
  return {"name": name, "source": str(info.get("source", name)),
          "version": str(info.get("version", f"jaxprune {jaxprune.__version__}")),
          "path": os.path.abspath(os.path.expanduser(path)) if path else None,
          "examples": int(len(ds.y)),
          "sha256": h.hexdigest(),
          "dropped": [{k: _plain(v) for k, v in d.items()} for d in info.get("dropped") or []],
          "skipped": [{k: _plain(v) for k, v in d.items()} for d in info.get("skipped") or []],
          "duplicates": [{k: _plain(v) for k, v in d.items()}
                         for d in info.get("duplicates") or []],
          "persons": None if ds.groups is None else int(len(np.unique(np.asarray(ds.groups)))),
          "no_person": [str(n) for n in info.get("no_person") or []]}


def _plain(value):
  """A JSON-ready copy of a loader's report value (NumPy integers become ints, also in lists)."""
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  return value.item() if isinstance(value, np.generic) else value


def _duplicates_line(duplicates: list[dict[str, Any]], persons: Any) -> str:
  """The report's sentence on images the data hold more than once."""
  first = duplicates[0]
  where = (f"rows {', '.join(map(str, first['rows']))}" if "rows" in first else
           ", ".join(f"`{p}`" for p in first.get("paths") or []))
  split = ("the splits here are person-independent, which keep the copies (one name, one "
           "person) on one side" if persons else
           "the splits here are not by person, so the copies may land in both the training and "
           "the test part (a test example the model was trained on)")
  return (f"The data hold {len(duplicates)} image(s) more than once (e.g. `{first['name']}`: "
          f"{where}): {split}. Remove the copies from the data (listed in results.json, "
          "`data.duplicates`).")


class Study:
  """One experiment's output folder and its resumable cache.

  Args:
    name: the study's name (the subfolder of --workdir).
    settings: every setting that affects results (flags); results cached under one set of
      settings are never reused under another.
    workdir: the output root (the study writes to ``<workdir>/<name>/``).
    data: the loaded dataset (or its :func:`data_record`); its content hash joins the
      fingerprint, so changed data never reuse old results. Default: the data loaded last
      through :func:`load_data`.

  Starting a study refuses an output folder inside the SFEW image tree it reads
  (``--data=sfew_images``; the next run would read it as a class folder), checks the folder is
  writable (with a probe named per process), takes an
  advisory lock on ``cache/<fingerprint>/`` (a second run with the same settings waits for the
  first, then resumes from its cache) and one on the study folder (a concurrent run with other
  settings stops with a message), then removes leftovers of killed runs: temporary files of
  atomic writes and the previous ``results.json`` (written again, last, when this run ends).
  When the previous run in the folder had other settings, it also removes that run's outputs
  (REPORT.md, tables, figures, flops files): only files recorded in ``cache/outputs.json`` as
  written by the study and still holding the bytes it wrote, so a stale table or figure of
  other settings never sits beside the new results and no file of the user's is touched. The
  cache is kept as it is.
  """

  def __init__(self, name: str, settings: Mapping[str, Any], workdir: str = "workdir", *,
               data: Any = None):
    self.name = name
    self.settings = dict(to_jsonable(settings))
    if "data_path" in self.settings:   # SFEW/ and SFEW: one path, one fingerprint
      self.settings["data_path"] = normal_data_path(self.settings["data_path"])
    check_seed(self.settings.get("seed"))
    if data is None:
      data = _LOADED_DATA
    elif not isinstance(data, Mapping):
      data = data_record(data, self.settings.get("data"), self.settings.get("data_path"))
    self.data = None if data is None else dict(data)
    if not str(workdir).strip():
      fail("--workdir is empty. Pass the folder to write the study to (--workdir=. for the "
           "current one).")
    workdir = os.path.expanduser(str(workdir))   # --workdir=~/runs: the shell left ~ as it is
    check_workdir_outside_data(workdir, self.settings.get("data"),
                               self.settings.get("data_path"), name)
    self.dir = os.path.join(workdir, name)
    blocker = not_a_folder(self.dir)
    if blocker is not None:
      fail(f"Cannot use the work folder {self.dir!r}: {blocker!r} is a file, not a folder. "
           "Pass a writable --workdir (a folder, or a path that does not exist yet), or move that "
           "file away.")
    try:
      os.makedirs(self.dir, exist_ok=True)
      fd, probe = tempfile.mkstemp(dir=self.dir, prefix=f".write-test-{os.getpid()}-")
      os.close(fd)
      with contextlib.suppress(FileNotFoundError):  # a run starting beside us cleaned it up
        os.remove(probe)
    except OSError as e:
      fail(f"Cannot write to the work folder {self.dir!r} ({e.strerror}). Pass a writable "
           "--workdir.")
    blob = {"settings": self.settings}
    if self.data is not None:  # name, version and content hash; not the path it came from
      blob["data"] = {k: self.data.get(k) for k in ("name", "version", "sha256")}
    self.fingerprint = hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]
    self.cache_dir = os.path.join(self.dir, "cache", self.fingerprint)
    self._lock_cache = _Lock(os.path.join(self.cache_dir, ".lock"))
    self._lock_outputs = _Lock(os.path.join(self.dir, ".lock"))
    self._outputs: dict[str, str] = {}
    try:  # a damaged folder (a file where a folder belongs, or the reverse): one clear line
      os.makedirs(self.cache_dir, exist_ok=True)
      self._acquire_locks()
      self._clean_leftovers()
      write_json(os.path.join(self.cache_dir, "settings.json"),
                 {**self.settings, **({"_data": self.data} if self.data else {})})
    except OSError as e:   # (a cache folder this user may not write, as well)
      self.release()
      _folder_damaged(self.dir, e)
    _STUDY_DIRS[os.path.abspath(self.dir)] = self
    self.resumed = 0
    self._start = time.time()
    self._prior_seconds = self._read_seconds()
    self._pending_results: Mapping[str, Any] | None = None
    self._report_written = False

  # -- locks and leftovers

  def _acquire_locks(self) -> None:
    note = f", settings {self.fingerprint}"
    if not self._lock_cache.try_acquire(note):
      print(f"[{self.name}] Another run with the same settings ({self._lock_cache.holder()}) "
            f"is computing in {self.cache_dir}; waiting for it to finish, then resuming from "
            "its cache.", file=sys.stderr, flush=True)
      t0 = time.time()
      while not self._lock_cache.try_acquire(note):
        if LOCK_WAIT_S is not None and time.time() - t0 > LOCK_WAIT_S:
          fail(f"Another run with the same settings ({self._lock_cache.holder()}) still holds "
               f"{self.cache_dir} after {LOCK_WAIT_S:g} s; wait for it or stop it.")
        time.sleep(0.5)
    if not self._lock_outputs.try_acquire(note):
      holder = self._lock_outputs.holder()
      self._lock_cache.release()
      fail(f"Another run with different settings ({holder}) is writing its results to "
           f"{self.dir}; two runs there would overwrite each other's results.json and tables. "
           "Wait for it to finish, or pass another --workdir.")

  def _clean_leftovers(self) -> None:
    """Removes what killed runs left: temp files of atomic writes and stale results.json,
    and the previous run's outputs when its settings differ (:meth:`_clean_previous_outputs`;
    we hold the study folder's lock, so no other run is writing here)."""
    patterns = [os.path.join(self.dir, TMP_PREFIX + "*"), os.path.join(self.dir, ".write-test*"),
                os.path.join(self.dir, "cache", TMP_PREFIX + "*"),
                os.path.join(self.dir, "cache", "*", TMP_PREFIX + "*")]
    for pattern in patterns:
      for f in glob.glob(pattern):
        if os.path.isfile(f):
          with contextlib.suppress(FileNotFoundError):
            os.remove(f)
    with contextlib.suppress(FileNotFoundError):
      os.remove(self.path("results.json"))
    self._clean_previous_outputs()

  def _manifest_file(self) -> str:
    return os.path.join(self.dir, "cache", OUTPUTS_MANIFEST)

  def _clean_previous_outputs(self) -> None:
    """Removes the outputs of the previous run in this folder when it had other settings:
    the files ``cache/outputs.json`` lists, each only if it still holds the bytes the study
    wrote there (a file the user replaced or added is never touched). With the same settings
    the list carries on (this run writes the same files again)."""
    try:
      with open(self._manifest_file(), "rb") as f:
        manifest = json.loads(f.read().decode())
      previous = str(manifest["fingerprint"])
      files = {str(k): str(v) for k, v in dict(manifest["files"]).items()}
    except FileNotFoundError:
      return
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
      _warn(f"{self._manifest_file()} is damaged ({type(e).__name__}: {e}); the outputs of "
            "the previous run are left in place.")
      return
    if previous == self.fingerprint:
      self._outputs = files
      return
    for name, digest in files.items():
      path = self.path(name)
      if os.path.basename(name) != name or name in ("", ".", "..") or os.path.islink(path):
        continue
      if not os.path.isfile(path) or _file_sha256(path) != digest:
        continue  # gone, or no longer what the study wrote
      with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    self._outputs = {}
    self._write_manifest()

  def _write_manifest(self) -> None:
    write_json(self._manifest_file(), {"fingerprint": self.fingerprint, "files": self._outputs})

  def _record_output(self, name: str, digest: str) -> None:
    """Adds a file this study wrote in its folder to ``cache/outputs.json``."""
    if self._outputs.get(name) != digest:
      self._outputs[name] = digest
      self._write_manifest()

  def release(self) -> None:
    """Releases the study's locks (done when results.json is written) and stops recording its
    outputs (the registry of open studies would otherwise keep every finished one)."""
    if _STUDY_DIRS.get(os.path.abspath(self.dir)) is self:
      del _STUDY_DIRS[os.path.abspath(self.dir)]
    self._lock_outputs.release()
    self._lock_cache.release()

  # -- compute time

  def _seconds_file(self) -> str:
    return os.path.join(self.cache_dir, "compute_seconds.json")

  def _read_seconds(self) -> float:
    try:
      with open(self._seconds_file(), "rb") as f:
        seconds = float(json.loads(f.read().decode())["seconds"])
    except FileNotFoundError:
      return 0.0
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError, OSError):
      seconds = math.nan
    if not (math.isfinite(seconds) and seconds >= 0):  # NaN, infinite or negative: not a time
      _warn(f"{self._seconds_file()} is damaged; the compute time restarts from 0.")
      return 0.0
    return seconds

  def invocation_seconds(self) -> float:
    """Seconds since this study started (this invocation only)."""
    return time.time() - self._start

  def compute_seconds(self) -> float:
    """Total compute time of these results: earlier invocations' time up to their last cached
    step, plus this invocation's; a fully resumed run reports the time its results took."""
    return self._prior_seconds + self.invocation_seconds()

  def _save_seconds(self) -> None:
    write_json(self._seconds_file(), {"seconds": self.compute_seconds()})

  # -- cache

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

  def _read_json(self, f: str) -> tuple[bool, Any]:
    """(True, value) for a readable cache file; (False, None) if absent or damaged (removed)."""
    try:
      with open(f, "rb") as fh:
        return True, json.loads(fh.read().decode())
    except FileNotFoundError:
      return False, None
    except (ValueError, UnicodeDecodeError) as e:
      _discard_damaged(f, e)
      return False, None
    except OSError as e:  # a folder where the file belongs, an unreadable file
      _folder_damaged(self.dir, e)

  def cached(self, key: str, fn: Callable[[], Any]) -> Any:
    """Returns the saved result of ``key`` if this configuration finished before, else runs
    ``fn`` and saves its (JSON-able) result atomically before returning it. A damaged cache
    file is named on stderr and recomputed."""
    f = self.cache_file(key, ".json")
    ok, value = self._read_json(f)
    if ok:
      self.resumed += 1
      return value
    result = to_jsonable(fn())
    write_json(f, result, sort_keys=False)
    self._save_seconds()
    # Round-trip through JSON so a fresh and a resumed run return identical values (the file
    # keeps the dicts' key order, so both return their keys in the same order too).
    return json.loads(json.dumps(result))

  def cached_tree(self, key: str, fn: Callable[[], Any], template: Any = None) -> Any:
    """Like :meth:`cached` for a pytree of arrays, saved beside the JSON files as
    ``<key>-<digest>.npz``; always returns the tree read back from disk (see
    :func:`load_tree` for ``template``)."""
    path = self._tree_file(key)
    if os.path.exists(path):
      try:
        tree = load_tree(path, template)
      except DamagedFile as e:
        _discard_damaged(path, e)
      else:
        self.resumed += 1  # a step taken from the cache, as in ``cached``
        return tree
    save_tree(path, fn())
    self._save_seconds()
    return load_tree(path, template)

  def cached_with_tree(self, key: str, fn: Callable[[], tuple[Any, Any]],
                       template: Any = None) -> tuple[Any, Any]:
    """Like :meth:`cached` for a step that returns ``(pytree, record)``.

    The pytree goes to ``<key>-<digest>.npz``, written before the JSON record (which marks the
    step as finished), so a resumed run gets exactly the arrays an uninterrupted one used. The
    returned pytree is always the one read back from disk; if either file is damaged, the step
    is computed again.
    """
    path = self._tree_file(key)
    if os.path.exists(path):
      try:
        load_tree(path, template)
      except DamagedFile as e:  # the record alone cannot rebuild the arrays: redo the step
        _discard_damaged(path, e)
        with contextlib.suppress(FileNotFoundError):
          os.remove(self.cache_file(key, ".json"))

    def run():
      tree, record = fn()
      save_tree(path, tree)
      return record

    record = self.cached(key, run)
    if not os.path.exists(path):
      fail(f"The cache holds the record of step {key!r} but not its arrays ({path}); "
           f"delete {self.cache_dir} to start again.")
    return load_tree(path, template), record

  # -- outputs

  def write_results(self, results: Mapping[str, Any]) -> None:
    """Records the results; ``results.json`` is written after ``REPORT.md`` (the last output),
    so its presence means the run finished."""
    self._pending_results = results
    if self._report_written:
      self._finish()

  def _finish(self) -> None:
    # The compute time is saved by the steps that compute (``cached``, ``cached_tree``), not
    # here: a fully resumed rerun would otherwise add its own few seconds to the total each time.
    body = {"study": self.name, "settings": self.settings, "results": self._pending_results}
    if self.data is not None:
      body["data"] = self.data
    write_json(self.path("results.json"), body)
    self._pending_results = None
    self.release()

  def write_flops(self, target: Any, params: Any, masks: Any = None,
                  unit_masks: Mapping[str, Any] | None = None) -> str:
    """flops.json and flops.txt beside results.json: parameters and FLOPs per layer and in
    total, dense, masked and compacted (see ``jaxprune.flops_report``); returns the table."""
    from jaxprune import flops as flops_lib  # pylint: disable=g-import-not-at-top
    report = flops_lib.flops_report(target, params, masks=masks, unit_masks=unit_masks)
    write_json(self.path("flops.json"), report)
    text = flops_lib.format_flops(report)
    write_text(self.path("flops.txt"), text + "\n")
    return text

  def write_report(self, title: str, sections: Iterable[tuple[str, str]]) -> None:
    """REPORT.md: a title, then (heading, markdown) sections; figures as ![](file.png). A run
    section (compute time, resumed steps, data hash) and the settings close it; then
    ``results.json`` is written if the results were given."""
    parts = [f"# {title}\n"]
    for heading, body in sections:
      parts.append(f"## {heading}\n\n{body.strip()}\n")
    run = [f"Compute time: {self.compute_seconds():.0f} s in total (earlier invocations' "
           f"cached steps included); this invocation {self.invocation_seconds():.0f} s, "
           f"{self.resumed} steps taken from the cache `cache/{self.fingerprint}/`."]
    if self.data is not None:
      d = self.data
      where = f" read from `{d['path']}`" if d.get("path") else ""
      run.append(f"Data: `{d.get('name')}` ({d.get('source')}, {d.get('version')}){where}, "
                 f"{d.get('examples')} examples, SHA-256 of the loaded arrays "
                 f"`{d.get('sha256')}`.")
      no_person = d.get("no_person") or []
      if d.get("persons"):
        run.append(f"Persons: {d['persons']}, read from the file names; every split and fold "
                   "is person-independent (no person on both sides).")
      elif no_person:
        run.append(f"Persons: none. {len(no_person)} file name(s) carry no person id (e.g. "
                   f"`{no_person[0]}`; SFEW names its frames `<movie>_<frame>_<person>`), so "
                   "every split and fold is stratified by class, not person-independent.")
      for key, one, many in (("dropped", "row", "rows"), ("skipped", "entry", "entries")):
        left = d.get(key) or []
        if left:
          shown = "; ".join(
              (f"row {e['row']} ({e.get('name') or 'no name'}): {e['reason']}" if "row" in e
               else f"`{e.get('path')}` ({e.get('reason')})") for e in left[:20])
          more = f"; and {len(left) - 20} more" if len(left) > 20 else ""
          run.append(f"The loader {key} {len(left)} {one if len(left) == 1 else many}: "
                     f"{shown}{more}.")
      if d.get("duplicates"):
        run.append(_duplicates_line(d["duplicates"], d.get("persons")))
    parts.append("## Run\n\n" + "\n\n".join(run) + "\n")
    parts.append("## Settings\n\n```json\n" + json.dumps(self.settings, indent=1, sort_keys=True)
                 + "\n```\n")
    write_text(self.path("REPORT.md"), "\n".join(parts))
    self._report_written = True
    if self._pending_results is not None:
      self._finish()


def not_a_folder(path: str) -> str | None:
  """The first existing part of ``path`` (``~`` expanded) that is not a folder, or None."""
  part = os.path.abspath(os.path.expanduser(path))
  parts = []
  while True:
    parts.append(part)
    parent = os.path.dirname(part)
    if parent == part:
      break
    part = parent
  for part in reversed(parts):
    if not os.path.exists(part):
      return None
    if not os.path.isdir(part):
      return part
  return None


def error_path(error: OSError) -> str | None:
  """The path an OSError is about: a rename's target, and an atomic write's temporary file
  shown as its folder (its name means nothing to the user)."""
  where = error.filename2 or error.filename
  if where is None:
    return None
  where = os.fsdecode(where) if isinstance(where, bytes) else str(where)
  if os.path.basename(where).startswith(TMP_PREFIX):
    return os.path.dirname(where)
  return where


def _folder_damaged(folder: str, error: OSError) -> None:
  """Stops with one line naming what in a study folder cannot be used, and the fix."""
  where = error_path(error) or folder
  restart = (f"Move it away, or delete {folder!r} to start the study again (or pass another "
             "--workdir).")
  if isinstance(error, IsADirectoryError):
    fail(f"Cannot use the work folder {folder!r}: {where!r} is a folder, where the study keeps "
         f"a file. {restart}")
  if isinstance(error, (NotADirectoryError, FileExistsError)):
    fail(f"Cannot use the work folder {folder!r}: {not_a_folder(where) or where!r} is a file, "
         f"where the study keeps a folder. {restart}")
  what = error.strerror or str(error)
  if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
    fail(f"Cannot lock {where!r} ({what}): the file system of --workdir does not support file "
         "locks (fcntl.flock). Pass a --workdir on a local disk.")
  fail(f"Cannot use the work folder {folder!r}: {where!r} ({what}). Check its permissions and "
       "free space, or pass another --workdir.")


def _warn(message: str) -> None:
  print(f"Warning: {message}", file=sys.stderr, flush=True)


def _discard_damaged(path: str, error: BaseException) -> None:
  """Names a damaged cache file on stderr and removes it, so that its step is recomputed."""
  if isinstance(error, DamagedFile):  # its own message names the path and says "delete it"
    error = error.error
  _warn(f"the cache file {path} is damaged ({type(error).__name__}: {error}); removing it and "
        "computing that step again.")
  with contextlib.suppress(FileNotFoundError):
    os.remove(path)


def load_data(name: str, path: str | None, **kwargs):
  """Loads a dataset through ``jaxprune.data.load``, turning problems into clear exits."""
  from jaxprune import data as data_lib  # pylint: disable=g-import-not-at-top
  if name not in DATA_CHOICES:
    fail(f"Unknown --data={name!r}; choose one of {', '.join(DATA_CHOICES)}.")
  if name.startswith("sfew") and not path:
    fail(f"--data={name} needs --data_path pointing to your SFEW copy.")
  if path and not name.startswith("sfew"):
    # The command line refuses this pair (a flag validator); ``run`` called from Python did
    # not: it ran on the bundled data and recorded the user's path as their source.
    fail(f"--data_path={path} reads your own SFEW copy, which only --data=sfew_features "
         f"(SFEW.xlsx / .csv) or --data=sfew_images (the class-folder tree) loads; --data={name} "
         "is bundled and would be used instead. Pass data='sfew_features' or 'sfew_images' "
         "(--data on the command line), or no data_path.")
  global _LOADED_DATA
  try:
    ds = data_lib.load(name, path=path, **kwargs)
  except (FileNotFoundError, ValueError) as e:
    fail(f"Could not load --data={name}: {e}")
  _LOADED_DATA = data_record(ds, name, path)
  return ds
