r"""SFEW images -> the course spreadsheet of 10 features (5 LPQ and 5 PHOG principal components).

Reads an SFEW class-folder tree (``Angry/`` ... ``Surprise/``), computes each image's LPQ and
PHOG descriptors (`jaxprune.data.features`, jit-compiled and vmapped; on GPU when there is
one), reduces each descriptor to its top 5 principal components and writes a CSV in the course
layout, which ``jaxprune.data.load_sfew_features`` (and ``--data=sfew_features`` of every MLP
study) reads back unchanged: name, label (1..7), LPQ feature 1-5, PHOG feature 1-5.

The PCA is fitted on ALL images, as the course spreadsheet was; the studies still fit their
feature scaling on training folds only. A short report beside the CSV (``<out>.report.md``)
says so and lists skipped files and frames without a detected face.

Usage:
  python -m experiments.featurize --data_path=SFEW --out=SFEW.csv
  python -m experiments.featurize --data_path=SFEW --out=SFEW.csv --crop_faces --size=128,128
  python -m experiments.featurize --data_path=SFEW --out=SFEW.csv --on_error=skip
  python -m experiments.ga_vs_distinctiveness --data=sfew_features --data_path=SFEW.csv
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import time

from absl import logging

from jaxprune import data as data_lib
from jaxprune.data import features as features_lib
from jaxprune.data import sfew as sfew_lib
from experiments import _flags
from experiments import _store

HEADER = ["", "label"] + [f"LPQ feature {i}" for i in range(1, 6)] + [
    f"PHOG feature {i}" for i in range(1, 6)]


@dataclasses.dataclass(frozen=True)
class Config:
  """The command line's settings; each field is also a flag (``_flags.define_flags``)."""
  data_path: str | None = _flags.field(
      None, "The SFEW class-folder image tree (Angry/ ... Surprise/).")
  out: str | None = _flags.field(None, "The CSV to write (e.g. SFEW.csv); replaced atomically.")
  crop_faces: bool = _flags.field(
      False, "Crop the largest Viola-Jones face before describing (needs OpenCV: pip install "
      "jaxprune[face]); frames without a face are kept whole, listed.")
  size: tuple = _flags.field(
      (576, 720), "height,width every image (or face crop) is resized to before describing; the "
      "default keeps SFEW's 720x576 frames as they are.", low=1, unique=False)
  any_size: bool = _flags.any_size_field(True)
  on_error: str = _flags.on_error_field()
  phog_bins: int = _flags.field(16, "PHOG orientation bins over 0-360 degrees (seeds: 16).")
  phog_levels: int = _flags.field(3, "Finest PHOG pyramid level L (the seeds name L=4).")
  lpq_window: int = _flags.field(7, "LPQ STFT window side.")
  lpq_decorrelate: bool = _flags.field(True, "Whiten LPQ's STFT coefficients (rho 0.9).")
  lpq_blocks: tuple = _flags.field(
      (1, 1), "rows,cols grid of LPQ histograms (4,4: the seeds' 'block size 4x4' read as a "
      "grid).", low=1, unique=False)
  batch_size: int = _flags.field(16, "Images described per compiled call.")

  def validate(self) -> None:
    """One-line usage errors for missing or impossible settings (before any work)."""
    if not self.data_path:
      _flags.fail("--data_path is required: the SFEW folder holding Angry/, Disgust/, ... "
                  "Surprise/.")
    if not self.out:
      _flags.fail("--out is required: the CSV to write, e.g. --out=SFEW.csv.")
    _flags.check_fields(self)
    for name in ("lpq_blocks", "size"):
      if len(getattr(self, name)) != 2:
        _flags.fail(f"--{name} needs 2 comma-separated values, got "
                    f"{','.join(map(str, getattr(self, name)))}.")
    _flags.check_positive(phog_bins=self.phog_bins, lpq_window=self.lpq_window,
                          batch_size=self.batch_size)
    _flags.check_positive(phog_levels=self.phog_levels, minimum=0)
    if self.lpq_window < 2:
      _flags.fail(f"--lpq_window must be at least 2, got {self.lpq_window}.")
    _check_settings(self.descriptor(), tuple(self.size))

  def descriptor(self) -> features_lib.DescriptorConfig:
    return features_lib.DescriptorConfig(
        phog_bins=self.phog_bins, phog_levels=self.phog_levels, lpq_window=self.lpq_window,
        lpq_decorrelate=self.lpq_decorrelate, lpq_blocks=tuple(self.lpq_blocks))


def _check_settings(config: features_lib.DescriptorConfig, size) -> None:
  """Fails before any work when the descriptors cannot be computed at ``size`` or give too
  few values for ``config.components`` principal components."""
  h, w = size
  window, (rows, cols) = config.lpq_window, config.lpq_blocks
  if min(h, w) < max(window, 2**config.phog_levels):
    _flags.fail(f"--size={h},{w} is too small for --lpq_window={window} and --phog_levels="
                f"{config.phog_levels}: both sides need at least "
                f"{max(window, 2**config.phog_levels)} pixels; raise --size or lower them.")
  if h - window + 1 < rows or w - window + 1 < cols:
    _flags.fail(f"--lpq_blocks={rows},{cols} does not fit --size={h},{w}: LPQ has "
                f"{h - window + 1}x{w - window + 1} codes there (--lpq_window={window}), one "
                "block needs at least one; use fewer blocks or a larger --size.")
  phog_size = config.phog_bins * sum(4**l for l in range(config.phog_levels + 1))
  if phog_size < config.components:
    _flags.fail(f"--phog_bins={config.phog_bins} and --phog_levels={config.phog_levels} give "
                f"{phog_size} PHOG values, fewer than the {config.components} principal "
                "components written; raise --phog_bins or --phog_levels.")


def _inside(path: str, folder: str) -> bool:
  """Whether ``path`` lies strictly inside ``folder`` (both absolute, symlinks resolved)."""
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return path != folder and os.path.commonpath([path, folder]) == folder


def _check_output(path: str, data_path: str | None = None) -> str:
  """Fails before any work when ``path`` cannot be written (or would land in a class folder
  of ``data_path``, where the next run would read it as a bad image file)."""
  path = os.path.abspath(os.path.expanduser(path))
  if data_path is not None:
    root = os.path.abspath(os.path.expanduser(data_path))
    if _inside(os.path.dirname(path), root):
      _flags.fail(f"--out={path} lies inside a folder of --data_path={root}: the next run "
                  "would read the CSV and its report as (bad) image files. Write it beside "
                  f"or outside the class folders, e.g. --out={os.path.join(root, 'SFEW.csv')}.")
  if os.path.isdir(path):
    _flags.fail(f"--out={path} is a folder; pass a file name such as {path}/SFEW.csv.")
  if not path.lower().endswith(".csv"):
    _flags.fail(f"--out={path}: the output is a CSV file; give it the .csv suffix.")
  folder = os.path.dirname(path)
  blocker = _store.not_a_folder(folder)
  if blocker is not None:
    _flags.fail(f"--out={path}: {blocker} is a file, not a folder; pass an --out in a folder.")
  if not os.path.isdir(folder):
    _flags.fail(f"--out={path}: the folder {folder} does not exist; create it first.")
  probe = os.path.join(folder, f".featurize-write-test-{os.getpid()}")
  try:
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    _flags.fail(f"--out={path}: cannot write to {folder} ({e.strerror}); choose a writable "
                "folder.")
  if os.path.exists(path) and not os.access(path, os.W_OK):
    _flags.fail(f"--out={path} exists and is read-only; remove it or choose another name.")
  return path


def _csv_text(names, labels, x) -> str:
  buf = io.StringIO()
  writer = csv.writer(buf, lineterminator="\n")
  writer.writerow(HEADER)
  for name, label, row in zip(names, labels, x):
    writer.writerow([name, int(label) + 1] + [repr(float(v)) for v in row])
  return buf.getvalue()


def _stretched(source_sizes, size, tolerance=0.05):
  """The ``((h, w), count)`` entries whose aspect ratio resizing to ``size`` changes by more
  than ``tolerance`` (PHOG's orientations then change: a stretched face is another face)."""
  target = size[1] / size[0]
  return [(hw, n) for hw, n in source_sizes
          if abs(math.log((hw[1] / hw[0]) / target)) > math.log1p(tolerance)]


def _stretch_note(ds) -> str | None:
  """A sentence saying how many frames resizing stretches, and the --size that would not."""
  stretched = _stretched(ds.info.get("source_sizes", ()), ds.info["size"])
  if not stretched:
    return None
  count = sum(n for _, n in stretched)
  sources = list(ds.info["source_sizes"])
  # The source size whose shape stretches the fewest images (ties: the most common one).
  (h, w), _ = min(sources, key=lambda kv: (sum(n for _, n in _stretched(sources, kv[0])),
                                           -kv[1]))
  shown = ", ".join(f"{n} of {hh}x{ww}" for (hh, ww), n in stretched[:5])
  more = "" if len(stretched) <= 5 else f" and {len(stretched) - 5} more sizes"
  size = ds.info["size"]
  fewer = sum(n for _, n in _stretched(sources, (h, w)))
  advice = (f"Pass --size with their shape, e.g. --size={h},{w} (it stretches "
            f"{fewer or 'none'} of them)." if fewer < count else
            "No --size keeps every aspect ratio here, and this one stretches the fewest: crop "
            "the images to one shape if that matters.")
  return (f"{count} of {len(ds)} images ({shown}{more}; height x width) were resized to "
          f"{size[0]}x{size[1]}, which changes their aspect ratio by more than 5 %: their "
          f"PHOG orientations are those of stretched faces. {advice}")


def _report(out, ds, info, config, seconds) -> str:
  lines = [
      "# SFEW features from images\n",
      f"- Images: {len(ds)} from `{ds.info['path']}`, written to `{out}`.",
      f"- PCA fitted on all {len(ds)} images (as the course spreadsheet was); the studies fit "
      "their feature scaling on training folds only.",
      f"- Descriptors: LPQ ({info['lpq_size']} values: window {config.lpq_window}, blocks "
      f"{config.lpq_blocks[0]}x{config.lpq_blocks[1]}, decorrelation "
      f"{'on' if config.lpq_decorrelate else 'off'}), PHOG ({info['phog_size']} values: "
      f"{config.phog_bins} bins over 0-360 degrees, levels 0..{config.phog_levels}; the seeds "
      "name L=4).",
      "- Explained variance of the 5 components: LPQ "
      + ", ".join(f"{v:.3f}" for v in info["lpq_explained_variance_ratio"]) + "; PHOG "
      + ", ".join(f"{v:.3f}" for v in info["phog_explained_variance_ratio"]) + ".",
      f"- Image size described: {ds.info['size'][0]}x{ds.info['size'][1]} (height x width); "
      f"face cropping {'on' if ds.info['crop_faces'] else 'off'}; sizes before resizing: "
      + ", ".join(f"{h}x{w} ({n})" for (h, w), n in ds.info.get("source_sizes", ())[:5])
      + (" ..." if len(ds.info.get("source_sizes", ())) > 5 else "") + ".",
      f"- Time: {seconds:.1f} s.",
  ]
  stretch = _stretch_note(ds)
  if stretch:
    lines.append(f"- **Stretched**: {stretch}")
  no_person = ds.info.get("no_person", [])
  if ds.groups is not None:
    lines.append(f"- Persons: {len(set(ds.groups.tolist()))} (the last '_' field of each file "
                 "name); the studies split by person.")
  else:
    lines.append(f"- Persons: none; {len(no_person)} file name(s) carry no person id (e.g. "
                 f"{no_person[0] if no_person else '?'}), so the studies split stratified, not "
                 f"person-independently ({sfew_lib.PERSON_NAMING}).")
  dark = ds.info.get("dark", [])
  if dark:
    lines.append(f"- Dark 16-bit frames ({len(dark)}; values below 4096 of 65535, likely 8- or "
                 "12-bit content): " + ", ".join(dark[:20]) + (" ..." if len(dark) > 20 else "")
                 + ". Rescale them to the full 16-bit range or save them as 8-bit PNGs.")
  skipped = ds.info.get("skipped", [])
  lines.append(f"\n## Skipped ({len(skipped)})\n")
  lines += [f"- {s['path']}: {s['reason']}" for s in skipped] or ["None."]
  no_face = ds.info.get("no_face", [])
  lines.append(f"\n## No face detected, kept whole ({len(no_face)})\n")
  lines += [f"- {n}" for n in no_face] or ["None." if ds.info["crop_faces"]
                                           else "Face cropping was off."]
  return "\n".join(lines) + "\n"


class _Progress:
  """Prints how many images are described, at most every ``every`` seconds (and at the end)."""

  def __init__(self, start: float, every: float = 10.0):
    self.start, self.every, self.last = start, every, start

  def __call__(self, done: int, total: int) -> None:
    now = time.time()
    if done < total and now - self.last < self.every:
      return
    self.last = now
    rate = done / max(now - self.start, 1e-9)
    left = f", about {(total - done) / rate:.0f} s left" if done < total else ""
    print(f"  described {done}/{total} images ({now - self.start:.0f} s, "
          f"{rate:.1f} images/s{left})", flush=True)


def run(data_path: str, out: str, *, config: features_lib.DescriptorConfig =
        features_lib.DescriptorConfig(), size=(576, 720), crop_faces: bool = False,
        expected_size=None, on_error: str = "raise", batch_size: int = 16) -> dict:
  """Writes the features CSV and its report; returns a summary dict."""
  out = _check_output(out, data_path)
  _check_settings(config, size)
  start = time.time()
  print(f"Reading the SFEW images in {data_path} ...", flush=True)
  try:
    ds = data_lib.load_sfew_images(data_path, size=size, channels=1, crop_faces=crop_faces,
                                   expected_size=expected_size, on_error=on_error)
  except (FileNotFoundError, ValueError, ImportError) as e:
    _flags.fail(f"Could not read the SFEW images at --data_path={data_path}: {e}")
  if len(ds) < config.components:
    _flags.fail(f"{data_path}: {len(ds)} images; 5 principal components need at least "
                f"{config.components}.")
  stretch = _stretch_note(ds)
  if stretch:
    logging.warning("%s", stretch)
  print(f"Read {len(ds)} images in {time.time() - start:.1f} s; describing them (LPQ, PHOG) in "
        f"batches of {batch_size} ...", flush=True)
  try:
    x, info = features_lib.extract_features(ds.x[..., 0], config, batch_size=batch_size,
                                            progress=_Progress(time.time()))
  except ValueError as e:   # the PCA's: identical frames, too few images for the components
    _flags.fail(f"--data_path={data_path}: {e}")
  names = [os.path.basename(n) for n in ds.info["names"]]
  _store.write_text(out, _csv_text(names, ds.y, x))
  seconds = time.time() - start
  report_path = os.path.splitext(out)[0] + ".report.md"
  _store.write_text(report_path, _report(out, ds, info, config, seconds))
  print(f"Wrote {len(ds)} rows to {out} ({seconds:.1f} s; PCA fitted on all images); "
        f"skipped {len(ds.info['skipped'])}, no face {len(ds.info['no_face'])}; "
        f"report {report_path}")
  return {"out": out, "report": report_path, "count": len(ds), "skipped": ds.info["skipped"],
          "no_face": ds.info["no_face"], "seconds": seconds, **info}


def main(argv):
  _flags.check_no_args(argv)
  c = _flags.config_from_flags(Config)
  c.validate()
  run(c.data_path, c.out, config=c.descriptor(), size=tuple(c.size), crop_faces=c.crop_faces,
      expected_size=None if c.any_size else (576, 720), on_error=c.on_error,
      batch_size=c.batch_size)


if __name__ == "__main__":
  _flags.define_flags(Config, common=False)
  _flags.run_binary(main)
