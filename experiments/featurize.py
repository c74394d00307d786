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
import os
import time

from jaxprune import data as data_lib
from jaxprune.data import features as features_lib
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
    if min(self.size) < max(self.lpq_window, 2**self.phog_levels):
      _flags.fail(f"--size={self.size[0]},{self.size[1]} is too small for --lpq_window="
                  f"{self.lpq_window} and --phog_levels={self.phog_levels}.")

  def descriptor(self) -> features_lib.DescriptorConfig:
    return features_lib.DescriptorConfig(
        phog_bins=self.phog_bins, phog_levels=self.phog_levels, lpq_window=self.lpq_window,
        lpq_decorrelate=self.lpq_decorrelate, lpq_blocks=tuple(self.lpq_blocks))


def _check_output(path: str) -> str:
  """Fails before any work when ``path`` cannot be written."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(path):
    _flags.fail(f"--out={path} is a folder; pass a file name such as {path}/SFEW.csv.")
  if not path.lower().endswith(".csv"):
    _flags.fail(f"--out={path}: the output is a CSV file; give it the .csv suffix.")
  folder = os.path.dirname(path)
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
      f"face cropping {'on' if ds.info['crop_faces'] else 'off'}.",
      f"- Time: {seconds:.1f} s.",
  ]
  skipped = ds.info.get("skipped", [])
  lines.append(f"\n## Skipped ({len(skipped)})\n")
  lines += [f"- {s['path']}: {s['reason']}" for s in skipped] or ["None."]
  no_face = ds.info.get("no_face", [])
  lines.append(f"\n## No face detected, kept whole ({len(no_face)})\n")
  lines += [f"- {n}" for n in no_face] or ["None." if ds.info["crop_faces"]
                                           else "Face cropping was off."]
  return "\n".join(lines) + "\n"


def run(data_path: str, out: str, *, config: features_lib.DescriptorConfig =
        features_lib.DescriptorConfig(), size=(576, 720), crop_faces: bool = False,
        expected_size=None, on_error: str = "raise", batch_size: int = 16) -> dict:
  """Writes the features CSV and its report; returns a summary dict."""
  out = _check_output(out)
  start = time.time()
  try:
    ds = data_lib.load_sfew_images(data_path, size=size, channels=1, crop_faces=crop_faces,
                                   expected_size=expected_size, on_error=on_error)
  except (FileNotFoundError, ValueError, ImportError) as e:
    _flags.fail(f"Could not read the SFEW images at --data_path={data_path}: {e}")
  if len(ds) < config.components:
    _flags.fail(f"{data_path}: {len(ds)} images; 5 principal components need at least "
                f"{config.components}.")
  x, info = features_lib.extract_features(ds.x[..., 0], config, batch_size=batch_size)
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
