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
import io
import os
import time

from absl import flags

from jaxprune import data as data_lib
from jaxprune.data import features as features_lib
from experiments import _flags
from experiments import _store

FLAGS = flags.FLAGS

HEADER = ["", "label"] + [f"LPQ feature {i}" for i in range(1, 6)] + [
    f"PHOG feature {i}" for i in range(1, 6)]


def define_flags() -> None:
  flags.DEFINE_string("data_path", None, "The SFEW class-folder image tree (Angry/ ... Surprise/).")
  flags.DEFINE_string("out", None, "The CSV to write (e.g. SFEW.csv); replaced atomically.")
  flags.DEFINE_bool("crop_faces", False,
                    "Crop the largest Viola-Jones face before describing (needs OpenCV: "
                    "pip install jaxprune[face]); frames without a face are kept whole, listed.")
  flags.DEFINE_list("size", ["576", "720"],
                    "height,width every image (or face crop) is resized to before describing; "
                    "the default keeps SFEW's 720x576 frames as they are.")
  flags.DEFINE_bool("any_size", True, "Accept frames of any size (False: require 720x576).")
  flags.DEFINE_enum("on_error", "raise", ["raise", "skip"],
                    "An unreadable or non-image file: 'raise' stops naming it; 'skip' skips it "
                    "and lists it in the report.")
  flags.DEFINE_integer("phog_bins", 16, "PHOG orientation bins over 0-360 degrees (seeds: 16).")
  flags.DEFINE_integer("phog_levels", 3, "Finest PHOG pyramid level L (the seeds name L=4).")
  flags.DEFINE_integer("lpq_window", 7, "LPQ STFT window side.")
  flags.DEFINE_bool("lpq_decorrelate", True, "Whiten LPQ's STFT coefficients (rho 0.9).")
  flags.DEFINE_list("lpq_blocks", ["1", "1"],
                    "rows,cols grid of LPQ histograms (4,4: the seeds' 'block size 4x4' read "
                    "as a grid).")
  flags.DEFINE_integer("batch_size", 16, "Images described per compiled call.")


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


def _ints(name, values, count):
  parsed = _flags.parse_list(name, values, int, low=1, unique=False)
  if len(parsed) != count:
    _flags.fail(f"--{name} needs {count} comma-separated values, got {values}.")
  return parsed


def main(argv):
  _flags.check_no_args(argv)
  if not FLAGS.data_path:
    _flags.fail("--data_path is required: the SFEW folder holding Angry/, Disgust/, ... "
                 "Surprise/.")
  if not FLAGS.out:
    _flags.fail("--out is required: the CSV to write, e.g. --out=SFEW.csv.")
  _flags.check_positive(phog_bins=FLAGS.phog_bins, lpq_window=FLAGS.lpq_window,
                         batch_size=FLAGS.batch_size)
  _flags.check_positive(phog_levels=FLAGS.phog_levels, minimum=0)
  if FLAGS.lpq_window < 2:
    _flags.fail(f"--lpq_window must be at least 2, got {FLAGS.lpq_window}.")
  config = features_lib.DescriptorConfig(
      phog_bins=FLAGS.phog_bins, phog_levels=FLAGS.phog_levels, lpq_window=FLAGS.lpq_window,
      lpq_decorrelate=FLAGS.lpq_decorrelate,
      lpq_blocks=_ints("lpq_blocks", FLAGS.lpq_blocks, 2))
  size = _ints("size", FLAGS.size, 2)
  if min(size) < max(config.lpq_window, 2**config.phog_levels):
    _flags.fail(f"--size={size[0]},{size[1]} is too small for --lpq_window="
                 f"{config.lpq_window} and --phog_levels={config.phog_levels}.")
  run(FLAGS.data_path, FLAGS.out, config=config, size=size, crop_faces=FLAGS.crop_faces,
      expected_size=None if FLAGS.any_size else (576, 720), on_error=FLAGS.on_error, batch_size=FLAGS.batch_size)


if __name__ == "__main__":
  define_flags()
  _flags.run_binary(main)
