"""Images per second of the SFEW descriptors (LPQ and PHOG) on SFEW-sized frames.

675 grayscale frames of 720x576 (SFEW's size; random pixels: the cost does not depend on the
content), described in batches by `jaxprune.data.features.describe` (both descriptors,
jit-compiled and vmapped), after one untimed batch that compiles. Prints images per second for
LPQ alone, PHOG alone and both, with the machine's load. Run:
python benchmarks/features.py [--quick] [--batch_size=16]
"""

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _timing import load_line  # noqa: E402
from jaxprune.data import features  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--quick", action="store_true", help="32 frames instead of 675")
  parser.add_argument("--batch_size", type=int, default=16)
  args = parser.parse_args()
  n, b = (32 if args.quick else 675), args.batch_size
  frames = np.random.default_rng(0).random((n, 576, 720), dtype=np.float32)
  print(f"{n} frames of 720x576, batch {b}, {jax.default_backend()}; {load_line()}")
  cfg = features.DescriptorConfig()
  for name, fn in (
      ("LPQ (7x7, decorrelated, 1x1 block)", lambda x: features.lpq(x)),
      ("PHOG (16 bins, levels 0-3)", lambda x: features.phog(x)),
  ):
    jax.block_until_ready(fn(frames[:b]))  # compile
    t = time.perf_counter()
    for s in range(0, n - n % b, b):
      jax.block_until_ready(fn(frames[s:s + b]))
    done = n - n % b
    print(f"  {name}: {done / (time.perf_counter() - t):.1f} images/s")
  features.describe(frames[:b], cfg, batch_size=b)  # compile
  t = time.perf_counter()
  features.describe(frames, cfg, batch_size=b)
  sec = time.perf_counter() - t
  print(f"  both (describe, incl. host copies): {n / sec:.1f} images/s ({sec:.1f} s for {n}); "
        f"{load_line()}")


if __name__ == "__main__":
  main()
