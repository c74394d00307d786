"""SFEW loaders: the LPQ/PHOG feature spreadsheet and the class-folder image tree.

SFEW (Static Facial Expressions in the Wild) has 675 movie frames in 7 classes
(`SFEW_CLASS_NAMES`). Users bring their own licensed copy, in one of two forms:

* features: ``SFEW.xlsx`` (one sheet, possibly named ``SFEW.csv``) or a CSV
  export; one row per image: the image name (header may be empty), the label
  (1 angry ... 7 surprise, or a class name), 5 LPQ principal components, then
  5 PHOG principal components. Rows with missing values are dropped and
  reported (SFEW has one fear image without PHOG features, leaving 674).
* images: a folder per class (``Angry/``, ``Disgust/`` ... any letter case)
  of 720x576 frames.

Nothing is lost silently: dropped rows and skipped files are listed in the
returned ``Dataset.info`` (``dropped``, ``skipped``) and logged with absl.
"""

from __future__ import annotations

import codecs
import concurrent.futures
import csv
import dataclasses
import difflib
import math
import os
import re
import shlex
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
from absl import logging
from PIL import ExifTags, Image, ImageOps

from jaxprune.data.dataset import SFEW_CLASS_NAMES, Dataset, check_images_fit

__all__ = [
    "FEATURE_BLOCKS",
    "FEATURES_LAYOUT",
    "IMAGES_LAYOUT",
    "load_sfew_features",
    "load_sfew_images",
    "parse_label",
    "person_id",
    "persons",
    "scan_sfew_tree",
    "unit_gray",
    "upright",
]

#: Column ranges of SFEW's two descriptor blocks in ``x``: LPQ, then PHOG.
FEATURE_BLOCKS: tuple[tuple[int, int], ...] = ((0, 5), (5, 10))

#: What the features loader expects, quoted in its errors.
FEATURES_LAYOUT = (
    "SFEW features: a file SFEW.xlsx (one sheet, e.g. named 'SFEW.csv') or"
    " SFEW.csv with 12 columns: image name (header may be empty), label"
    " (1 angry, 2 disgust, 3 fear, 4 happy, 5 neutral, 6 sad, 7 surprise, or"
    " the class name), LPQ feature 1..5, PHOG feature 1..5; one row per image"
)

#: What the images loader expects, quoted in its errors.
IMAGES_LAYOUT = (
    "SFEW images: a folder holding one sub-folder per class, named Angry,"
    " Disgust, Fear, Happy, Neutral, Sad, Surprise (any letter case), each"
    " holding that class's frames (.png/.jpg, 720x576)"
)

_LABEL_HEADERS = ("label", "labels", "class", "emotion", "expression", "target")
_MISSING = ("", "nan", "na", "n/a", "#n/a", "null", "none", "?", "-")
# Files the operating system writes into folders (hidden on Windows, though their names do not
# start with a dot): skipped like hidden entries.
_SYSTEM_FILES = ("thumbs.db", "ehthumbs.db", "desktop.ini")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif",
                   ".ppm", ".pgm")
_NUM_COLUMNS = 12
_FACE_HINT = "pip install jaxprune[face]"

OnError = Literal["raise", "skip"]


#: How SFEW's file names carry persons, quoted in messages.
PERSON_NAMING = ("SFEW names its frames <movie>_<frame>_<person>, e.g."
                 " Movie_000519240_00000005.png is person 00000005: the person is the"
                 " last '_' field of the file name (without its extension), a number")


def person_id(name: str) -> str | None:
  """The person id of an SFEW image name: the last ``_`` field of its stem, a number.

  SFEW names its frames ``<movie>_<frame>_<person>``. A name without ``_``, or
  whose last ``_`` field is not all digits (``Angry1_face.png``, ``smile.jpg``),
  names no person: None.

  Example:
    >>> person_id("Movie_000519240_00000005.mat")
    '00000005'
    >>> person_id("Angry1_face.png") is None
    True
  """
  stem = os.path.splitext(os.path.basename(str(name).strip()))[0]
  if "_" not in stem:
    return None
  last = stem.rsplit("_", 1)[-1]
  return last if re.fullmatch(r"[0-9]+", last) else None


def persons(names: Sequence[str], where: str = "SFEW") -> tuple[np.ndarray | None, list[str]]:
  """The person ids of ``names`` (`person_id`), or None when some name carries none.

  Persons are all or nothing: a person-independent split cannot place a row of
  unknown person, and names that do not follow SFEW's naming would give
  nonsense persons. So when any name has no person id the data have no persons
  (``groups=None``: splits are stratified, not person-independent), which is
  logged with absl naming such a file.

  Returns:
    ``(groups, no_person)``: the ``(N,)`` array of person ids or None, and the
    names that carry no person id.

  Example:
    >>> persons(["a_1_00000002.png", "b_7_00000003.png"])[0].tolist()
    ['00000002', '00000003']
    >>> persons(["a_1_00000002.png", "Angry1_face.png"])
    (None, ['Angry1_face.png'])
  """
  ids = [person_id(n) for n in names]
  missing = [str(n) for n, p in zip(names, ids) if p is None]
  if missing:
    logging.warning(
        "%s: %d of %d file names carry no person id (e.g. %s; %s), so the data have no"
        " persons: splits are stratified, not person-independent", where, len(missing),
        len(ids), missing[0], PERSON_NAMING)
    return None, missing
  return np.asarray(ids), []


def parse_label(value: Any) -> int | None:
  """Maps an SFEW label to a class index 0..6; None if it is not a label.

  Accepts 1..7 (as int, float or string) and class names (any case).

  Example:
    >>> parse_label(3), parse_label("Surprise"), parse_label(9)
    (2, 6, None)
  """
  if isinstance(value, bool):
    return None
  if isinstance(value, (int, float, np.integer, np.floating)):
    if math.isfinite(value) and float(value).is_integer() and 1 <= value <= 7:
      return int(value) - 1
    return None
  text = str(value).strip().lower()
  if text in SFEW_CLASS_NAMES:
    return SFEW_CLASS_NAMES.index(text)
  try:
    number = float(text)
  except ValueError:
    return None
  return parse_label(number)


# ----------------------------------------------------------------------------
# Features
# ----------------------------------------------------------------------------


def _resolve_features_path(path: str | os.PathLike) -> Path:
  path = Path(path).expanduser()
  if path.is_dir():
    candidates = sorted(p for p in path.iterdir()
                        if p.is_file() and p.name.lower() in ("sfew.xlsx", "sfew.csv"))
    if len(candidates) > 1:
      raise ValueError(
          f"The folder {path} holds {' and '.join(p.name for p in candidates)}: which one to"
          " read is ambiguous. Pass the path of the file to read (e.g."
          f" {flag_arg('data_path', candidates[-1])} for the binaries), or keep only one of them in"
          " the folder (the TFDS builder's manual folder must hold one)")
    if candidates:
      return candidates[0]
    others = sorted(p.name for p in path.iterdir()
                    if p.is_file() and not p.name.startswith((".", "~$"))
                    and p.suffix.lower() in (".xlsx", ".xlsm", ".csv", ".tsv", ".txt"))
    hint = ("" if not others else
            f" It holds {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}: pass the"
            f" path of the file to read (e.g. {flag_arg('data_path', path / others[0])} for the"
            " binaries), or rename it SFEW.xlsx or SFEW.csv.")
    hint += _image_tree_hint(path)
    raise FileNotFoundError(
        f"No SFEW.xlsx or SFEW.csv in the folder {path}.{hint} Expected: "
        f"{FEATURES_LAYOUT}."
    )
  if not path.exists():
    raise FileNotFoundError(
        f"{path} does not exist. Expected: {FEATURES_LAYOUT} (pass the file or"
        " its folder)."
    )
  return path


def _image_tree_hint(folder: Path) -> str:
  """What to do when the features loader is given an SFEW image tree (a folder of class
  folders, or of parts holding them): load it as images, or compute its features first."""
  trees = _class_trees(folder, depth=1)
  if not trees:
    return ""
  if trees == [folder]:
    where, load = "it holds class folders", "load it"
  else:
    where = f"its part(s) {', '.join(t.name for t in trees[:4])} hold class folders"
    load = f"load one part at a time ({flag_arg('data_path', trees[0])})"
  return (f" The folder looks like an SFEW image tree ({where}): {load} with"
          " --data=sfew_images (load_sfew_images in Python), or compute its features first with"
          f" python -m experiments.featurize {flag_arg('data_path', trees[0])} --out=SFEW.csv"
          " and pass that file.")


def _read_xlsx(path: Path, sheet: str | None) -> list[list[Any]]:
  import openpyxl  # pylint: disable=g-import-not-at-top

  try:
    with warnings.catch_warnings():
      # openpyxl warns about styles/extensions it does not read; irrelevant here.
      warnings.filterwarnings("ignore", category=UserWarning, module="openpyxl")
      book = openpyxl.load_workbook(path, read_only=True, data_only=True)
  except Exception as e:  # zipfile.BadZipFile, KeyError, InvalidFileException
    raise ValueError(f"{path}: not a readable .xlsx workbook ({e})") from e
  try:
    names = book.sheetnames
    if sheet is not None:
      if sheet not in names:
        raise ValueError(f"{path}: no sheet {sheet!r}; sheets are {names}")
      chosen = sheet
    elif len(names) == 1:
      chosen = names[0]
    else:
      preferred = [n for n in names if n.lower() in ("sfew.csv", "sfew")]
      if len(preferred) != 1:
        raise ValueError(
            f"{path} has sheets {names}; pass sheet=... to load_sfew_features to"
            " choose one. The experiment binaries read a workbook's only sheet,"
            " or the one named SFEW or SFEW.csv: rename that sheet, or export it"
            " as SFEW.csv and pass the CSV as --data_path"
        )
      chosen = preferred[0]
    sheet_ = book[chosen]
    # Read-only mode believes the sheet's stored dimension (its used range, e.g. A1:L676);
    # some writers store a wrong one (A1:A1, or fewer rows), and rows or columns outside it
    # would be cut off without a word. Forget it: every row and cell in the file is read.
    sheet_.reset_dimensions()
    rows = [list(row) for row in sheet_.iter_rows(values_only=True)]
  finally:
    book.close()
  if any(v is None for row in rows for v in row):
    _check_no_unsaved_formulas(path, chosen, rows)
  return rows


def _check_no_unsaved_formulas(path: Path, sheet: str, rows: list[list[Any]]) -> None:
  """Refuses a formula whose value the workbook does not hold: a file written by a program
  that does not compute formulas (openpyxl, pandas) stores none, and such a cell would read
  as empty (its row dropped as missing a value)."""
  import openpyxl  # pylint: disable=g-import-not-at-top

  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=UserWarning, module="openpyxl")
    book = openpyxl.load_workbook(path, read_only=True, data_only=False)
  try:
    sheet_ = book[sheet]
    sheet_.reset_dimensions()
    for r, row in enumerate(sheet_.iter_rows()):
      for c, cell in enumerate(row):
        value = cell.value
        if r < len(rows) and c < len(rows[r]) and rows[r][c] is not None:
          continue
        formula = value if isinstance(value, str) and value.startswith("=") else getattr(
            value, "text", None)   # an array formula
        if formula:
          raise ValueError(
              f"{path}: cell {cell.coordinate} holds a formula ({formula}) but no value: the "
              "workbook was saved by a program that does not compute formulas (openpyxl, "
              "pandas), so the cell would read as empty. Open it in Excel or LibreOffice and "
              "save it (which stores the values), or export it as CSV.")
  finally:
    book.close()


def _read_csv(path: Path) -> list[list[Any]]:
  """The rows of a CSV (or tab-separated) text file: UTF-8, or UTF-16 with its byte-order
  mark, which is what Excel's "Unicode Text" export writes (tab-separated)."""
  raw = path.read_bytes()
  encoding = "utf-16" if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else "utf-8-sig"
  try:
    text = raw.decode(encoding)
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not a UTF-8 text CSV file ({e}); save it again as UTF-8"
                     " (in Excel: Save As, 'CSV UTF-8'), or pass the .xlsx workbook") from e
  try:
    dialect = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
  except csv.Error:
    dialect = csv.excel
  lines = text.splitlines()
  delimiter = _best_delimiter(lines[:50], dialect)
  return [list(row) for row in csv.reader(lines, dialect, delimiter=delimiter)]


def _best_delimiter(lines: list[str], dialect: Any) -> str:
  """The delimiter that splits the most of ``lines`` into the 12 expected fields; the sniffed
  one on a tie. ``csv.Sniffer`` picks ',' for a European export (';' between fields, a decimal
  comma in each number: 10 commas and 11 semicolons a line), which splits no line into 12."""
  def fits(delimiter: str) -> int:
    rows = csv.reader(lines, dialect, delimiter=delimiter)
    return sum(1 for row in rows if len(row) == _NUM_COLUMNS)
  sniffed = dialect.delimiter
  best = max((",", ";", "\t"), key=fits)
  return best if fits(best) > fits(sniffed) else sniffed


def _is_empty(value: Any) -> bool:
  if value is None:
    return True
  if isinstance(value, float) and math.isnan(value):
    return True
  return isinstance(value, str) and value.strip().lower() in _MISSING


def _finite_float(value: Any) -> float | None:
  """``value`` as a finite float, or None when it is not a number (or is NaN or infinite)."""
  if isinstance(value, bool):
    return None
  try:
    number = float(value)
  except (TypeError, ValueError):
    return None
  return number if math.isfinite(number) else None


def _as_float(value: Any) -> float | None:
  """A finite float, NaN for a missing value, or None when not a number (or one too large for
  the float32 features it becomes: 1e40 would load as infinity)."""
  if _is_empty(value):
    return math.nan
  number = _finite_float(value)
  return None if number is None or _too_large(number) else number


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _too_large(value: Any) -> bool:
  """Whether ``value`` is a finite number beyond float32's range."""
  number = _finite_float(value)
  return number is not None and abs(number) > _FLOAT32_MAX


def _decimal_comma(value: Any) -> bool:
  """Whether ``value`` is text that is a number once its comma is a point ('0,3456')."""
  return isinstance(value, str) and _as_float(value.replace(",", ".")) is not None


def _number_like(value: Any) -> bool:
  """Whether ``value`` is a number, or one written with a decimal comma ('0,3456'): a data
  cell, not a header name (the decimal comma is reported when the row is read)."""
  return _as_float(value) is not None or _decimal_comma(value)


def _column_name(header: list[Any] | None, c: int) -> str:
  """The name of 0-based column ``c``: the header's, else the layout's."""
  if header is not None and not _is_empty(header[c]):
    return str(header[c]).strip()
  return ("image name", "label")[c] if c < 2 else (
      "LPQ feature %d" % (c - 1) if c < 7 else "PHOG feature %d" % (c - 6))


def _names_columns(row: list[Any]) -> bool:
  """Whether ``row`` is clearly a header: a cell naming the label column, followed by at least
  five more cells of text (the feature names)."""
  cells = ["" if _is_empty(v) else str(v).strip().lower() for v in row]
  for c, cell in enumerate(cells):
    if cell in _LABEL_HEADERS:
      names = [v for v in row[c + 1:] if not _is_empty(v) and not _number_like(v)]
      return len(names) >= 5
  return False


def _is_title(row: list[Any]) -> bool:
  """Whether ``row`` is a title (or blank) row above a table: at most one cell, not a number."""
  cells = [v for v in row if not _is_empty(v)]
  return len(cells) <= 1 and not any(_number_like(v) for v in cells)


#: How many rows above a header are searched for it (a title, a note, a blank row).
_HEADER_SEARCH_ROWS = 5


def _rows_above_header(rows: list[list[Any]], path: Path) -> int:
  """How many rows above the header to skip: 0 when the first row is the header or data; the
  title rows above a header found in the first few rows (logged). Other rows above a header
  (notes, data) are a ValueError saying to delete them."""
  if not rows or _looks_like_header(rows[0]):
    return 0
  found = next((i for i in range(1, min(len(rows), _HEADER_SEARCH_ROWS + 1))
                if _names_columns(rows[i])), None)
  if found is None:
    return 0
  shown = [("" if _is_empty(v) else str(v).strip()) for v in rows[found]]
  above = "row 1 above it holds" if found == 1 else f"rows 1-{found} above it hold"
  if all(_is_title(r) for r in rows[:found]):
    logging.warning("SFEW features %s: the header is row %d; skipped the title row(s) above it",
                    path.name, found + 1)
    return found
  raise ValueError(
      f"{path}: row {found + 1} looks like the header ({', '.join(shown)}), but {above}"
      " other cells (notes, or data): delete the row(s) above the header, so that the header"
      f" is the first row. Expected: {FEATURES_LAYOUT}.")


def _leading_empty_columns(rows: list[list[Any]]) -> int:
  """How many leading columns to drop: those empty in every row (a table that starts in column
  B or later), as long as more than the 12 columns remain to read."""
  width = max((len(r) for r in rows), default=0)
  lead = 0
  while width - lead > _NUM_COLUMNS and all(_is_empty(r[lead]) for r in rows):
    lead += 1
  return lead


def _column(c: int) -> str:
  """The spreadsheet letters of 0-based column ``c``: 0 is 'A', 26 'AA'."""
  letters = ""
  c += 1
  while c:
    c, r = divmod(c - 1, 26)
    letters = chr(ord("A") + r) + letters
  return letters


def _short_rows_hint(data: list[list[Any]], lengths: list[int], header: list[Any] | None,
                     header_length: int | None) -> str:
  """Why no row is complete when some column is empty in every row: every row one cell short
  of the header (a column lost on export), or a column without a value anywhere."""
  rows = [r for r in data if not all(_is_empty(v) for v in r)]
  empty = [c for c in range(_NUM_COLUMNS) if rows and all(_is_empty(r[c]) for r in rows)]
  if not empty:
    return ""
  which = ", ".join(f"column {c + 1} ({_column_name(header, c)})" for c in empty)
  cells = sorted({n for n, r in zip(lengths, data) if not all(_is_empty(v) for v in r)})
  if header_length is not None and len(cells) == 1 and cells[0] < header_length:
    return (f": every row has {cells[0]} cells where the header names {header_length}, so no"
            f" row has a value for {which}. A column was lost when the file was written (or"
            " the header names one too many): write the file again with all 12 columns, one"
            " cell under each header cell")
  return (f": {which} {'is' if len(empty) == 1 else 'are'} empty in every row, so every row is"
          " dropped as missing a value. Fill in the column, or write the file again with all"
          " 12 columns in order")


def _looks_like_header(row: list[Any]) -> bool:
  """Whether the first row is a header: its label cell names a label column; or it is not a
  label and some feature cell is text (a header with other names, some of them numbers); or
  most of its non-empty feature cells are text. A row of numbers with one bad cell (a typo such
  as '0.1x', or a misspelt label) is a data row, so that its bad value is reported rather than
  the row being taken as a header (and silently lost, or blamed on misnamed columns)."""
  label = None if len(row) < 2 or _is_empty(row[1]) else row[1]
  if label is not None and str(label).strip().lower() in _LABEL_HEADERS:
    return True
  cells = [v for v in row[2:] if not _is_empty(v)]
  text = sum(1 for v in cells if not _number_like(v))
  if label is not None and parse_label(label) is None and text:
    return True
  return text > len(cells) - text


def _stray_cells_hint(rows: list[list[Any]], row0: int = 0, col0: int = 0) -> str:
  """Where the cells beyond the 12 columns are, when only some rows have them (a note typed
  beside a row): the file is then right but for those cells, and they are what to delete.
  ``row0`` and ``col0``: the rows and columns above and left of ``rows`` in the sheet."""
  stray = [(i, c) for i, r in enumerate(rows) for c in range(_NUM_COLUMNS, len(r))
           if not _is_empty(r[c])]
  numbers = sorted({i + 1 + row0 for i, _ in stray})
  if not numbers or len(numbers) > len(rows) // 2:
    return ""
  row, column = stray[0]
  shown = ", ".join(map(str, numbers[:5])) + (", ..." if len(numbers) > 5 else "")
  return (f"; only row(s) {shown} of {len(rows)} have cells beyond column"
          f" {_NUM_COLUMNS + col0} (row {row + 1 + row0}, column {column + 1 + col0}:"
          f" {rows[row][column]!r}): delete those cells")


def _label_hint(value: Any) -> str:
  """A fix for an unknown label that is a known mistake: 0 (labels counted from 0)."""
  if _finite_float(value) == 0:
    return (". SFEW numbers its classes from 1 (1 angry ... 7 surprise); a label 0 means the"
            " file counts them from 0 (0 angry ... 6 surprise): add 1 to every label, or"
            " write the class names instead")
  return ""


def _check_header(header: list[Any], path: Path, col0: int = 0) -> None:
  """Checks the header's names; ``col0``: the empty columns left of the table in the sheet
  (its column numbers in messages are the sheet's)."""
  def text(c: int) -> str:
    return "" if header[c] is None else str(header[c]).strip()

  problems = []
  if text(1).lower() not in _LABEL_HEADERS:
    problems.append(
        f"column {2 + col0} is {text(1)!r}, expected the label column (one of"
        f" {', '.join(_LABEL_HEADERS)})"
    )
  for c in range(2, _NUM_COLUMNS):
    kind, k = ("LPQ", c - 1) if c < 7 else ("PHOG", c - 6)
    name = text(c)
    number = re.search(r"(\d+)\s*$", name)
    if kind.lower() not in name.lower() or (number and int(number.group(1)) != k):
      problems.append(f"column {c + 1 + col0} is {name!r}, expected {kind} feature {k}")
  if problems:
    raise ValueError(
        f"{path}: misnamed or misplaced columns: " + "; ".join(problems) +
        f". Expected: {FEATURES_LAYOUT}. If the columns are in this order and only their"
        f" names differ, rename the header cells (column {2 + col0} to 'label', columns"
        f" {3 + col0}-{7 + col0} to 'LPQ feature 1' .. 'LPQ feature 5', columns"
        f" {8 + col0}-{12 + col0} to 'PHOG feature 1' .. 'PHOG feature 5') or delete the"
        " header row; in Python, load_sfew_features(..., strict_header=False) reads other"
        " names by position."
    )


def _labels_and_empty_classes(ys) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """int32 labels, examples per SFEW class, and the names of the classes without any."""
  y = np.asarray(ys, dtype=np.int32)
  counts = np.bincount(y, minlength=len(SFEW_CLASS_NAMES))
  return y, counts, [SFEW_CLASS_NAMES[k] for k in np.flatnonzero(counts == 0)]


def load_sfew_features(
    path: str | os.PathLike,
    *,
    sheet: str | None = None,
    strict_header: bool = True,
) -> Dataset:
  """Loads SFEW's LPQ and PHOG features from ``SFEW.xlsx`` or a CSV export.

  Rows with a missing value are dropped, logged and listed in
  ``info['dropped']`` (row number as a spreadsheet shows it, image name,
  reason). The features are returned unscaled: scale them with
  `standardize_split` (``blocks=info['blocks']`` for per-block scaling) so that
  the statistics come from the training split only.

  Args:
    path: the ``.xlsx`` or ``.csv`` file, or a folder holding ``SFEW.xlsx`` or
      ``SFEW.csv``.
    sheet: the sheet to read when a workbook has several.
    strict_header: check the header names (label, LPQ 1..5, PHOG 1..5); set
      False to read a file with other column names by position.

  Returns:
    A `Dataset`: ``x`` ``(N, 10)`` (LPQ 1-5, PHOG 1-5), ``y`` in 0..6,
    ``groups`` the person ids (`persons`: the last field of each image name;
    None when some name carries none), and ``info`` with ``names``,
    ``blocks``, ``dropped``, ``num_dropped``, ``blank_rows``, ``duplicates``
    (image names on more than one row, with their rows), ``no_person``.

  Raises:
    FileNotFoundError: the file (or a SFEW file in the folder) is missing.
    ValueError: wrong columns, an unknown label, a non-numeric feature or an
      empty class, naming the file, row and column.

  Example:
    >>> from jaxprune import data
    >>> ds = data.load_sfew_features("SFEW.xlsx")  # doctest: +SKIP
    >>> len(ds), ds.info["num_dropped"]  # doctest: +SKIP
    (674, 1)
  """
  path = _resolve_features_path(path)
  suffix = path.suffix.lower()
  if suffix in (".xlsx", ".xlsm"):
    rows = _read_xlsx(path, sheet)
  elif suffix in (".csv", ".txt", ".tsv"):
    rows = _read_csv(path)
  else:
    raise ValueError(f"{path}: expected a .xlsx or .csv file. {FEATURES_LAYOUT}.")
  if not rows:
    raise ValueError(f"{path} is empty. Expected: {FEATURES_LAYOUT}.")

  lengths = [len(r) for r in rows]  # cells per row as written (a CSV's rows may differ)
  # Trailing columns that are empty everywhere (spreadsheet artefacts) go.
  width = max(lengths)
  rows = [list(r) + [None] * (width - len(r)) for r in rows]
  while width and all(_is_empty(r[width - 1]) for r in rows):
    width -= 1
  rows = [r[:width] for r in rows]
  # A title above the header goes (other rows above it are refused), then leading columns that
  # are empty everywhere (a table that starts in column B); messages keep the sheet's numbers.
  top = _rows_above_header(rows, path)
  rows, lengths = rows[top:], lengths[top:]
  lead = _leading_empty_columns(rows)
  if lead:
    logging.warning("SFEW features %s: %s empty in every row; the table is read from column"
                    " %s", path.name, "column A is" if lead == 1 else
                    f"columns A-{_column(lead - 1)} are", _column(lead))
    rows, lengths, width = [r[lead:] for r in rows], [n - lead for n in lengths], width - lead

  has_header = _looks_like_header(rows[0])
  header = rows[0] if has_header else None
  if width != _NUM_COLUMNS:
    shown = f" (header {header})" if header is not None else ""
    what = "missing columns" if width < _NUM_COLUMNS else "unexpected extra columns"
    raise ValueError(
        f"{path}: {what}: found {width} columns, expected {_NUM_COLUMNS}{shown}"
        f"{_stray_cells_hint(rows, top, lead)}. Expected: {FEATURES_LAYOUT}."
    )
  if header is not None and strict_header:
    _check_header(header, path, lead)

  first = top + (2 if has_header else 1)  # spreadsheet row number of the first data row
  data_rows = rows[1 if has_header else 0:]
  xs, ys, names, dropped, blank = [], [], [], [], []
  rows_of: dict[str, list[int]] = {}  # the rows of each image name, to find repeated ones
  for offset, row in enumerate(data_rows):
    row_no = first + offset
    if all(_is_empty(v) for v in row):
      blank.append(row_no)
      continue
    name = "" if _is_empty(row[0]) else str(row[0]).strip()
    reasons = []
    if not name:
      reasons.append("missing image name")
    label = None
    if _is_empty(row[1]):
      reasons.append("missing label")
    else:
      label = parse_label(row[1])
      if label is None:
        raise ValueError(
            f"{path}, row {row_no} ({name or 'no name'}): unknown label"
            f" {row[1]!r}; expected 1..7 or one of {', '.join(SFEW_CLASS_NAMES)}"
            + _label_hint(row[1])
        )
    values = []
    for c in range(2, _NUM_COLUMNS):
      number = _as_float(row[c])
      if number is None:
        comma = _decimal_comma(row[c])
        raise ValueError(
            f"{path}, row {row_no} ({name or 'no name'}), column {c + 1 + lead}"
            f" ({_column_name(header, c)}): {row[c]!r} is not a finite number"
            + (" in float32 (the features' type; at most 3.4e38 in size)"
               if _too_large(row[c]) else "")
            + ("; it has a decimal comma: save the file with decimal points (or pass the"
               " .xlsx workbook)" if comma else
               "; fix that cell, or leave it empty to drop the row")
        )
      if math.isnan(number):
        reasons.append(f"missing {_column_name(header, c)}")
      values.append(number)
    if reasons:
      dropped.append({"row": row_no, "name": name, "reason": ", ".join(reasons)})
      continue
    xs.append(values)
    ys.append(label)
    names.append(name)
    rows_of.setdefault(name, []).append(row_no)

  if not ys:
    hint = _short_rows_hint(data_rows, lengths[1 if has_header else 0:], header,
                            lengths[0] if has_header else None)
    raise ValueError(f"{path}: no complete rows{hint}. Expected: {FEATURES_LAYOUT}.")
  y, counts, empty = _labels_and_empty_classes(ys)
  if empty:
    raise ValueError(
        f"{path}: no complete rows for class(es) {', '.join(empty)} (counts per"
        f" class {dict(zip(SFEW_CLASS_NAMES, counts.tolist()))}); every class"
        " needs examples"
    )
  if dropped:
    logging.warning(
        "SFEW features %s: dropped %d row(s) with missing values: %s",
        path.name, len(dropped),
        "; ".join(f"row {d['row']} {d['name']}: {d['reason']}" for d in dropped[:10]),
    )
  duplicates = [{"name": n, "rows": r} for n, r in rows_of.items() if len(r) > 1]
  if duplicates:
    # One image on two rows can land in both parts of a stratified split (a test example the
    # model was trained on); person-independent splits keep them together.
    logging.warning(
        "SFEW features %s: %d image name(s) appear on more than one row (e.g. %s on rows %s):"
        " a stratified split can put copies of one image in both the training and the test"
        " part; remove the repeated rows (listed in info['duplicates'])", path.name,
        len(duplicates), duplicates[0]["name"], ", ".join(map(str, duplicates[0]["rows"])))
  groups, no_person = persons(names, f"SFEW features {path.name}")
  info = {
      "source": f"SFEW features ({path.name})",
      "path": str(path),
      "header": None if header is None else tuple(
          "" if _is_empty(h) else str(h).strip() for h in header),
      "names": tuple(names),
      "blocks": FEATURE_BLOCKS,
      "dropped": dropped,
      "num_dropped": len(dropped),
      "blank_rows": blank,
      "duplicates": duplicates,
      "no_person": no_person,
      "fitted_on": "nothing (raw PCA scores from the file; scale them on the"
      " training split with standardize_split)",
  }
  return Dataset(np.asarray(xs, dtype=np.float32), y, SFEW_CLASS_NAMES,
                 groups=groups, info=info)


# ----------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageItem:
  """One image file of the SFEW tree."""

  path: Path
  relpath: str  # "<ClassFolder>/<file>", as reported in errors and info
  label: int


_SKIP_FIX = ("Remove or fix it, or skip such files with on_error='skip' (--on_error=skip on"
             " the command line of experiments.featurize and the CNN studies); they are then"
             " listed.")


def _problem(message: str, relpath: str, on_error: OnError,
             skipped: list[dict[str, str]], fix: str = _SKIP_FIX) -> None:
  if on_error == "raise":
    raise ValueError(f"{message}. {fix}")
  skipped.append({"path": relpath, "reason": message})


def flag_arg(name: str, value: Any) -> str:
  """``--name=value`` as a shell reads it back: quoted when ``value`` holds spaces or other
  characters a shell would split or expand (a path the user may paste into a command line).

  Example:
    >>> flag_arg("data_path", "/data/my SFEW/Train")
    "--data_path='/data/my SFEW/Train'"
    >>> flag_arg("data_path", "/data/SFEW")
    '--data_path=/data/SFEW'
  """
  return f"--{name}={shlex.quote(str(value))}"


def _holds_classes(folder: Path) -> bool:
  """Whether ``folder`` holds at least one class folder (any letter case)."""
  try:
    return any(e.is_dir() and e.name.strip().lower() in SFEW_CLASS_NAMES
               for e in folder.iterdir())
  except OSError:
    return False


def _class_trees(folder: Path, depth: int = 1) -> list[Path]:
  """The folders at most ``depth`` levels down from ``folder`` (itself included) that hold
  class folders: where an SFEW copy's parts are (``SFEW 2.0/Train``, ``SFEW 2.0/Val``)."""
  if _holds_classes(folder):
    return [folder]
  if depth <= 0:
    return []
  try:
    subs = sorted(e for e in folder.iterdir() if e.is_dir() and not e.name.startswith((".", "__")))
  except OSError:
    return []
  return [t for e in subs for t in _class_trees(e, depth - 1)]


def _nested_hint(folder: Path) -> str:
  """A hint when ``folder`` holds class folders itself (SFEW's Train/ and Val/ parts), or one
  level further down (an unpacked ``SFEW 2.0/`` holding ``Train/`` and ``Val/``)."""
  trees = _class_trees(folder, depth=1)
  if not trees:
    return ""
  if trees == [folder]:
    return (f"; {folder.name}/ holds class folders itself: pass {folder} as the path"
            f" ({flag_arg('data_path', folder)} for the binaries), one part at a time")
  shown = ", ".join(str(t) for t in trees[:4])
  several = len(trees) > 1
  return (f"; {folder.name}/ holds the class folders one level down, in {shown}: pass "
          + ("one of them" if several else "it") + f" as the path (e.g. "
          f"{flag_arg('data_path', trees[0])} for the binaries)"
          + (", one part at a time" if several else ""))


#: Other names of SFEW's classes, as other facial-expression data sets name their folders
#: (FER-2013, RAF-DB, CK+, AffectNet): a folder so named is a class folder misnamed, not a
#: stray folder to skip.
_CLASS_SYNONYMS = {
    "anger": "angry", "angered": "angry", "disgusted": "disgust", "fearful": "fear",
    "afraid": "fear", "scared": "fear", "happiness": "happy", "joy": "happy",
    "sadness": "sad", "surprised": "surprise", "neutrality": "neutral",
}


def _class_like(name: str) -> int | None:
  """The class a folder name that is not a class name stands for, or None: a synonym
  (``Anger``, ``Happiness``), a misspelling (``Suprise``) or a numbered name (``3_Fear``)."""
  key = re.sub(r"^[\d\W_]+", "", name.strip().lower())  # "3_fear", "01 - Fear"
  key = _CLASS_SYNONYMS.get(key, key)
  if key in SFEW_CLASS_NAMES:
    return SFEW_CLASS_NAMES.index(key)
  close = difflib.get_close_matches(key, SFEW_CLASS_NAMES, n=1, cutoff=0.8)
  return SFEW_CLASS_NAMES.index(close[0]) if close else None


def _not_a_tree_hint(path: Path) -> str:
  """What a ``path`` that is not a folder probably is, and what to pass instead."""
  suffix = path.suffix.lower()
  if path.is_file() and suffix in (".csv", ".xlsx", ".xlsm", ".tsv", ".txt"):
    return (" but a file; a features file (SFEW.xlsx or SFEW.csv) is read with"
            " --data=sfew_features by the MLP studies (load_sfew_features in Python), the"
            " image tree is the folder holding Angry/, Disgust/, ...")
  if path.is_file() and suffix in _IMAGE_SUFFIXES:
    tree = path.resolve().parent.parent
    return (f" but an image; pass the folder that holds the class folders, e.g. {tree}"
            f" ({flag_arg('data_path', tree)} for the binaries)")
  if not path.exists():
    return " (it does not exist)"
  return ""


def _broken_link(entry: Path) -> str | None:
  """For a symbolic link whose target does not exist: ' (to TARGET, which does not exist)'
  (the words to follow 'broken link' in a message); None for anything else."""
  if not entry.is_symlink() or entry.exists():
    return None
  try:
    target = os.readlink(entry)
  except OSError:
    return " (its target cannot be read)"
  return f" (to {target}, which does not exist)"


def scan_sfew_tree(
    root: str | os.PathLike, *, on_error: OnError = "raise", fix: str | None = None
) -> tuple[list[ImageItem], list[dict[str, str]]]:
  """Lists the images of an SFEW class-folder tree, checking its layout.

  Hidden entries (a leading dot, and Windows' ``Thumbs.db`` and
  ``desktop.ini``), files beside the class folders and sub-folders inside them
  are skipped and reported. A file without an image extension in a class
  folder is an error (or skipped with ``on_error='skip'``).

  Args:
    root: the folder holding the class folders.
    on_error: ``'raise'`` or ``'skip'`` for files that are not images.
    fix: what the error for such a file advises (None: skipping them with
      ``on_error='skip'``; a caller without that option says its own).

  Returns:
    ``(items, skipped)``: the image files sorted by class then name, and the
    skipped entries as ``{'path', 'reason'}`` dicts.

  Raises:
    FileNotFoundError: ``root`` or a class folder is missing.
    ValueError: duplicate or empty class folders, non-image files.
  """
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  root = Path(root).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(f"{root} is not a folder{_not_a_tree_hint(root)}. Expected:"
                            f" {IMAGES_LAYOUT}.")
  skipped: list[dict[str, str]] = []
  folders: dict[int, Path] = {}
  others: list[Path] = []  # folders that are not named after a class
  for entry in sorted(root.iterdir()):
    if entry.name.startswith(".") or entry.name.startswith("__"):
      skipped.append({"path": entry.name, "reason": "hidden entry"})
      continue
    broken = _broken_link(entry)
    if broken is not None and entry.name.strip().lower() in SFEW_CLASS_NAMES:
      raise FileNotFoundError(
          f"{root}: the class folder {entry.name!r} is a broken link{broken}: point the link"
          " at the folder that holds this class's images, or replace it with that folder")
    if broken is not None:
      skipped.append({"path": entry.name, "reason": f"broken link{broken}"})
      continue
    if not entry.is_dir():
      skipped.append({"path": entry.name, "reason": "file beside the class folders"})
      continue
    key = entry.name.strip().lower()
    if key not in SFEW_CLASS_NAMES:
      others.append(entry)
      continue
    label = SFEW_CLASS_NAMES.index(key)
    if label in folders:
      raise ValueError(
          f"{root}: two folders for class {key!r}: {folders[label].name!r} and"
          f" {entry.name!r}; merge them into one folder (folder names are"
          " matched without regard to case)"
      )
    folders[label] = entry
  for entry in others:
    message = (f"{entry}: folder {entry.name!r} is not a class"
               f" (SFEW has these seven: {', '.join(SFEW_CLASS_NAMES)})")
    like = _class_like(entry.name)
    if like is not None and like not in folders:
      # Skipping it would only fail later for the class it holds; renaming is the fix.
      proper = SFEW_CLASS_NAMES[like].capitalize()
      raise ValueError(
          f"{message}, and there is no {proper} folder: {entry.name!r} looks like the class"
          f" {proper} misnamed; rename the folder to {proper} (class folders are named"
          f" {', '.join(c.capitalize() for c in SFEW_CLASS_NAMES)}, in any letter case)")
    hint = _nested_hint(entry)
    if hint and on_error == "raise":  # a Train/ or Val/ part: skipping is not the fix
      raise ValueError(message + hint)
    _problem(message, entry.name, on_error, skipped,
             fix or _SKIP_FIX.replace("such files", "such folders and files"))
  missing = [SFEW_CLASS_NAMES[k] for k in range(len(SFEW_CLASS_NAMES))
             if k not in folders]
  if missing:
    nested = "".join(_nested_hint(e) for e in sorted(root.iterdir())
                     if e.is_dir() and not e.name.startswith("."))
    archives = [e.name for e in sorted(root.iterdir()) if e.is_file()
                and e.name.lower().endswith((".zip", ".tar", ".tar.gz", ".tgz", ".7z", ".rar"))]
    if not folders and archives:
      nested += (f"; it holds the archive(s) {', '.join(archives[:3])}: unpack the class"
                 " folders first and pass the folder that holds them")
    sheets = [e.name for e in sorted(root.iterdir()) if e.is_file()
              and e.name.lower() in ("sfew.csv", "sfew.xlsx")]
    if not folders and sheets:
      nested += (f"; it holds {' and '.join(sheets)}, the features file: the MLP studies read"
                 " it with --data=sfew_features (load_sfew_features in Python)")
    if not folders and root.name.strip().lower() in SFEW_CLASS_NAMES:
      # The path of one class folder (SFEW/Angry) instead of the folder holding all seven.
      parent = root.resolve().parent
      nested += (f"; {root.name}/ is itself a class folder: pass the folder that holds all"
                 f" seven, {parent} ({flag_arg('data_path', parent)} for the binaries)")
    raise FileNotFoundError(
        f"{root}: no folder for class(es) {', '.join(missing)}{nested}. Expected:"
        f" {IMAGES_LAYOUT}."
    )
  items: list[ImageItem] = []
  for label in range(len(SFEW_CLASS_NAMES)):
    folder = folders[label]
    count = 0
    for entry in sorted(folder.iterdir()):
      rel = f"{folder.name}/{entry.name}"
      broken = _broken_link(entry)
      if entry.name.startswith(".") or entry.name.lower() in _SYSTEM_FILES:
        skipped.append({"path": rel, "reason": "hidden entry"})
      elif broken is not None:
        _problem(f"{entry}: broken link{broken}", rel, on_error, skipped,
                 fix or _SKIP_FIX.replace("Remove or fix it", "Fix the link or remove it"))
      elif entry.is_dir():
        skipped.append({"path": rel, "reason": "sub-folder inside a class folder"})
      elif entry.suffix.lower() not in _IMAGE_SUFFIXES:
        _problem(f"{entry}: not an image file (expected one of"
                 f" {', '.join(_IMAGE_SUFFIXES)})", rel, on_error, skipped, fix or _SKIP_FIX)
      else:
        items.append(ImageItem(entry, rel, label))
        count += 1
    if count == 0:
      inner = [e.name for e in sorted(folder.iterdir())
               if e.is_dir() and not e.name.startswith(".")]
      where = ("" if not inner else
               f" (it holds only the sub-folder(s) {', '.join(inner[:3])}, which are not read:"
               " move their images up into the class folder)")
      raise ValueError(f"{folder}: class folder without images (empty class){where}; every"
                       " class needs images: put this class's images there, or use a copy of"
                       " SFEW that has all seven classes")
  return items, skipped


def _load_cv2() -> Any:
  try:
    import cv2  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "crop_faces=True needs OpenCV for the Viola-Jones face detector; install"
        f" it with: {_FACE_HINT}"
    ) from e
  return cv2


def _face_detector() -> Any:
  cv2 = _load_cv2()
  if not hasattr(cv2, "CascadeClassifier") or not hasattr(cv2, "data"):
    # OpenCV 5 moved the Haar cascades out of the main package.
    raise ImportError(
        f"OpenCV {getattr(cv2, '__version__', '?')} has no Haar cascade face"
        " detector (cv2.CascadeClassifier); OpenCV 5 dropped it. Install"
        " OpenCV 4: pip install 'opencv-python-headless>=4.8,<5'"
    )
  cascade_path = cv2.data.haarcascades + "haarcascade_frontalface_default.xml"
  cascade = cv2.CascadeClassifier(cascade_path)
  if cascade.empty():
    raise RuntimeError(f"OpenCV could not load the face cascade {cascade_path}")
  return cascade


def _face_box(image: Image.Image, cascade: Any) -> tuple[int, int, int, int] | None:
  """The box of the largest frontal face (Viola-Jones); None when none is found."""
  if image.mode == "F":  # a high-bit-depth frame, scaled to [0, 1]: detect on 8 bits
    gray = np.round(np.asarray(image, np.float32) * 255.0).astype(np.uint8)
  else:
    gray = np.asarray(image.convert("L"), dtype=np.uint8)
  faces = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=5,
                                   minSize=(30, 30))
  if len(faces) == 0:
    return None
  x, y, w, h = max((tuple(int(v) for v in f) for f in faces),
                   key=lambda f: f[2] * f[3])
  return (x, y, x + w, y + h)


#: PIL modes of 16-bit grayscale frames (16-bit PNG and TIFF).
_MODES_16BIT = ("I;16", "I;16L", "I;16B", "I;16N")


class BitDepthError(ValueError):
  """A frame whose pixel values have no defined white level (see `unit_gray`)."""


#: A 16-bit frame whose values all lie below this (12 bits) loads dark (see `unit_gray`).
_DARK_BELOW = 4096


def upright(im: Image.Image) -> Image.Image:
  """``im`` turned as its EXIF Orientation tag says; ``im`` itself when it has none.

  Phones and cameras store a frame as the sensor read it and record the turn in
  EXIF; viewers apply it, and so does every SFEW reader here (PIL's
  ``ImageOps.exif_transpose``). A tag that cannot be read counts as none.

  Example:
    >>> import numpy as np
    >>> from PIL import Image
    >>> im = Image.fromarray(np.zeros((2, 3), np.uint8))
    >>> upright(im) is im
    True
  """
  try:
    orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
  except Exception:  # pylint: disable=broad-except  # a damaged EXIF block: no turn
    return im
  if orientation in (None, 1):
    return im
  return ImageOps.exif_transpose(im)


def unit_gray(im: Image.Image, name: str | None = None) -> np.ndarray | None:
  """A high-bit-depth grayscale image as float32 in [0, 1]; None for 8-bit modes.

  ``convert('L')`` would clip such values at 255 (a 16-bit frame turns almost
  white), so they are scaled by their real bit depth instead: 16-bit modes
  (``I;16*``) by 1/65535; 32-bit integer mode ``I`` (how some readers return
  16-bit PNGs) by 1/65535 when every value lies in 0..65535. Other ``I``
  images and 32-bit float (``F``) images have no defined white level and
  raise ValueError saying to save the frame as an 8- or 16-bit PNG. A 16-bit frame whose
  values all fit in 12 bits (below 4096: likely 8- or 12-bit content in a 16-bit container, as
  some cameras write it) warns that it loads dark (PNG's sBIT chunk, which would say so, is not
  read by PIL); the warning names the frame as ``name`` (a path) when given.

  Example:
    >>> import numpy as np
    >>> from PIL import Image
    >>> unit_gray(Image.fromarray(np.array([[0, 65535]], np.uint16))).tolist()
    [[0.0, 1.0]]
  """
  mode = im.mode
  if mode not in _MODES_16BIT + ("I", "F"):
    return None
  a = np.asarray(im)
  if mode == "F":
    raise BitDepthError(
        "32-bit floating-point image (PIL mode F): its white level is"
        " undefined; save it as an 8-bit or 16-bit PNG")
  if mode == "I" and a.size and (a.min() < 0 or a.max() > 65535):
    raise BitDepthError(
        f"32-bit integer image (PIL mode I) with values {a.min()}..{a.max()},"
        " outside the 16-bit range 0..65535: its white level is undefined;"
        " save it as an 8-bit or 16-bit PNG")
  if _is_dark(a):
    warnings.warn(
        f"{name or 'A 16-bit frame'}: 16-bit frame holding values only up to {int(a.max())}"
        " of 65535, so it loads dark (scaled by 1/65535). If its content is 8- or 12-bit,"
        " rescale it to the full 16-bit range or save it as an 8-bit PNG first.",
        stacklevel=2)
  return a.astype(np.float32) / np.float32(65535.0)


def _is_dark(values: np.ndarray) -> bool:
  """Whether 16-bit ``values`` (integers) all lie below 4096: 8- or 12-bit content."""
  return bool(values.size) and int(values.max()) < _DARK_BELOW


def _read_image(
    item: ImageItem,
    size: tuple[int, int],
    mode: str,
    expected_size: tuple[int, int] | None,
    cascade: Any,
) -> tuple[np.ndarray | None, str | None, bool, bool, tuple[int, int] | None]:
  """Returns (image or None, problem or None, face found, a dark 16-bit frame, the
  ``(height, width)`` resized: the frame's, or its face crop's; None for a problem).

  Frames are first turned as their EXIF orientation says (`upright`). 8-bit frames are converted to ``mode`` ('L' or 'RGB'), resized and divided
  by 255; 16-bit grayscale frames (`unit_gray`) are scaled by 1/65535 and
  resized as float images (gray repeated for RGB), so both give the same
  values for the same picture.
  """
  dark = False
  try:
    with Image.open(item.path) as im:
      im.load()
      turned = upright(im)
      deep = unit_gray(turned, str(item.path))
      dark = deep is not None and _is_dark(np.asarray(turned))
      image = Image.fromarray(deep, mode="F") if deep is not None else turned.convert(mode)
  except BitDepthError as e:
    return None, f"{item.path}: {e}", True, False, None
  except Exception as e:  # PIL raises many types for bad files
    return (None, f"{item.path}: not a readable image ({type(e).__name__}: {e})", True, False,
            None)
  if expected_size is not None and image.size != (expected_size[1], expected_size[0]):
    return None, (
        f"{item.path}: image is {image.size[1]}x{image.size[0]} (height x"
        f" width), expected {expected_size[0]}x{expected_size[1]} (pass"
        " expected_size=None, or --any_size on the command line, to accept any"
        " size)"
    ), True, False, None
  found = True
  if cascade is not None:
    box = _face_box(image, cascade)
    found = box is not None
    if box is not None:
      image = image.crop(box)
  source = (image.size[1], image.size[0])
  image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
  if image.mode == "F":
    array = np.asarray(image, dtype=np.float32)
    if mode == "RGB":
      array = np.repeat(array[..., None], 3, axis=-1)
  else:
    array = np.asarray(image, dtype=np.float32) / 255.0
  if array.ndim == 2:
    array = array[..., None]
  return array, None, found, dark, source


def _skipped_lines(entries: Sequence[dict[str, str]], limit: int = 5) -> str:
  """Skipped entries as lines ``  path: reason`` (the first ``limit``, then ``  and N more``);
  a reason that starts with the file's full path has it cut (the path leads the line).

  Example:
    >>> print(_skipped_lines([{"path": "Sad/a.png", "reason": "/d/Sad/a.png: not an image"}]))
      Sad/a.png: not an image
  """
  def reason(e: dict[str, str]) -> str:
    head, sep, tail = str(e["reason"]).partition(": ")
    return tail if sep and head.endswith(str(e["path"])) else str(e["reason"])
  lines = [f"  {e['path']}: {reason(e)}" for e in entries[:limit]]
  if len(entries) > limit:
    lines.append(f"  and {len(entries) - limit} more")
  return "\n".join(lines)


def _unreadable_class_message(root: Any, empty: list[str],
                              skipped: list[dict[str, str]]) -> str:
  """The error for classes left without images once their unreadable files were skipped: the
  skipped files of those classes first (as lines), and the fix."""
  def folder_class(e: dict[str, str]) -> str:
    return str(e["path"]).split("/", 1)[0].strip().lower()
  theirs = [e for e in skipped if folder_class(e) in empty and e["reason"] != "hidden entry"]
  what = (f"all {len(theirs)} of their files were skipped" if theirs else
          f"{len(skipped)} entries were skipped")
  return (f"{root}: no readable images for class(es) {', '.join(empty)}: {what}. Every class"
          " needs images: replace these files with readable frames (e.g. open and save them"
          " again as PNG or JPEG), or add other images of the class. Skipped:\n"
          + _skipped_lines(theirs or skipped))


def _pair(name: str, value) -> tuple[int, int]:
  """``(height, width)`` as two positive ints, or a ValueError naming ``name``."""
  ok = isinstance(value, (tuple, list)) and len(value) == 2
  if ok:
    try:
      ok = all(not isinstance(v, bool) and int(v) == v and v >= 1 for v in value)
    except (TypeError, ValueError):
      ok = False
  if not ok:
    raise ValueError(f"{name} must be (height, width), two positive ints, e.g. (90, 72); "
                     f"got {value!r}")
  return int(value[0]), int(value[1])


def load_sfew_images(
    root: str | os.PathLike,
    *,
    size: Sequence[int] = (90, 72),
    channels: int = 1,
    crop_faces: bool = False,
    expected_size: Sequence[int] | None = (576, 720),
    on_error: OnError = "raise",
    num_threads: int = 8,
) -> Dataset:
  """Loads the SFEW class-folder image tree, resized to a model's input size.

  Args:
    root: the folder holding ``Angry/``, ``Disgust/`` ... (any letter case).
    size: output ``(height, width)``, e.g. ``(90, 72)`` for LeNet or
      ``(227, 227)`` for the 4-conv CNN.
    channels: 1 (grayscale) or 3 (RGB).
    crop_faces: crop the largest face found by OpenCV's Viola-Jones Haar
      cascade before resizing (needs ``pip install jaxprune[face]``); frames
      without a detected face are kept whole and listed in ``info['no_face']``.
    expected_size: the ``(height, width)`` every frame must have (SFEW's
      720x576 frames by default); None accepts any size.
    on_error: ``'raise'`` (default) stops at the first non-image, unreadable or
      wrongly sized file with a ValueError naming it; ``'skip'`` skips such
      files and lists them in ``info['skipped']``.
    num_threads: threads that decode images in parallel.

  Returns:
    A `Dataset` with ``x`` ``(N, h, w, channels)`` float32 in [0, 1], ``y`` in
    0..6, ``groups`` the person ids (`persons`: the last ``_`` field of each
    file name; None when some name carries none), and ``info`` with ``names``
    (``Class/file`` paths), ``skipped``, ``no_face``, ``dark`` (16-bit frames
    that load dark, see `unit_gray`), ``no_person`` and ``source_sizes`` (the
    ``(height, width)`` of the frames, or of their face crops, before resizing
    to ``size``, with how many have it: ``(((h, w), count), ...)``, most common
    first).

  Raises:
    FileNotFoundError: ``root`` or a class folder is missing.
    ValueError: bad files (see ``on_error``) or an empty class.
    ImportError: ``crop_faces=True`` without OpenCV.

  Example:
    >>> from jaxprune import data
    >>> ds = data.load_sfew_images("SFEW/", size=(90, 72))  # doctest: +SKIP
    >>> ds.x.shape  # doctest: +SKIP
    (675, 90, 72, 1)
  """
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels!r}")
  size = _pair("size", size)
  if expected_size is not None:
    expected_size = _pair("expected_size", expected_size)
  cascade = _face_detector() if crop_faces else None
  items, skipped = scan_sfew_tree(root, on_error=on_error)
  mode = "L" if channels == 1 else "RGB"
  check_images_fit(len(items), size, channels,
                   fix="pass a smaller size, e.g. size=(90, 72) (--image_size=90x72 in the CNN"
                   " studies)")
  # Each frame goes straight into its row: holding the frames in a list and stacking them
  # would need twice the memory (2.3 GB instead of 1.2 GB for 675 frames at 720x576).
  out = np.empty((len(items), size[0], size[1], channels), np.float32)

  def read(i: int):
    array, *rest = _read_image(items[i], size, mode, expected_size, cascade)
    if array is not None:
      out[i] = array
    return rest

  if cascade is None and num_threads > 1:
    with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
      results = list(pool.map(read, range(len(items))))
  else:
    results = [read(i) for i in range(len(items))]

  keep, ys, names, no_face, dark = [], [], [], [], []
  sources: dict[tuple[int, int], int] = {}
  for i, (item, (problem, found, is_dark, source)) in enumerate(zip(items, results)):
    if problem is not None:
      _problem(problem, item.relpath, on_error, skipped)
      continue
    keep.append(i)
    sources[source] = sources.get(source, 0) + 1
    ys.append(item.label)
    names.append(item.relpath)
    if not found:
      no_face.append(item.relpath)
    if is_dark:
      dark.append(item.relpath)
  y, _, empty = _labels_and_empty_classes(ys)
  if empty:
    raise ValueError(_unreadable_class_message(root, empty, skipped))
  if skipped:
    logging.warning(
        "SFEW images %s: skipped %d entr%s: %s", root, len(skipped),
        "y" if len(skipped) == 1 else "ies",
        "; ".join(f"{s['path']} ({s['reason']})" for s in skipped[:10]),
    )
  if no_face:
    logging.warning("SFEW images: no face found in %d frame(s), kept whole: %s",
                    len(no_face), ", ".join(no_face[:10]))
  if dark:
    logging.warning("SFEW images: %d 16-bit frame(s) hold only values below 4096 and load"
                    " dark: %s", len(dark), ", ".join(dark[:10]))
  # One frame file name in two class folders (a copy made by mistake): two rows with other
  # labels, which a stratified split can put on both sides, as repeated feature rows.
  folders_of: dict[str, list[str]] = {}
  for n in names:
    folders_of.setdefault(os.path.basename(n), []).append(n)
  duplicates = [{"name": b, "paths": ps} for b, ps in folders_of.items() if len(ps) > 1]
  if duplicates:
    logging.warning(
        "SFEW images %s: %d frame name(s) appear in more than one class folder (e.g. %s): a "
        "frame has one expression, and a stratified split can put the copies in both the "
        "training and the test part; remove the copies (listed in info['duplicates'])", root,
        len(duplicates), ", ".join(duplicates[0]["paths"]))
  groups, no_person = persons(names, f"SFEW images {root}")
  info = {
      "source": "SFEW images",
      "path": str(root),
      "names": tuple(names),
      "duplicates": duplicates,
      "size": size,
      "source_sizes": tuple(sorted(sources.items(), key=lambda kv: (-kv[1], kv[0]))),
      "channels": channels,
      "crop_faces": crop_faces,
      "no_face": no_face,
      "dark": dark,
      "no_person": no_person,
      "skipped": skipped,
      "num_skipped": len(skipped),
      "fitted_on": "nothing",
  }
  x = out if len(keep) == len(items) else out[np.asarray(keep, np.intp)]
  return Dataset(x, y, SFEW_CLASS_NAMES, groups=groups, info=info)
