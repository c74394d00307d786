"""SFEW's image descriptors in JAX: PHOG and LPQ, and their top principal components.

The seeds' MLP studies use 10 features per face image: the top 5 principal
components of an LPQ descriptor and the top 5 of a PHOG descriptor. This module
computes both descriptors from images, jit-compiled and vmapped over a batch of
images (so they run on a GPU when there is one), and reduces them with PCA.

* **PHOG** (pyramid of histograms of oriented gradients, Bosch et al. 2007):
  gradients by central differences (edge-replicated borders); each pixel votes
  its gradient magnitude into one of ``bins`` orientation bins over 0-360
  degrees (the seeds' 16 bins; bin ``b`` holds ``[b, b + 1) * 360 / bins``
  degrees, angle measured with x to the right and y down the image). Pyramid
  level ``l`` splits the image into ``2^l x 2^l`` cells; the histograms of all
  cells of levels 0..``levels`` are concatenated (level 0 first, cells in
  row-major order) and normalised to sum 1. The seeds name ``L = 4``; the default
  here is ``levels=3`` (1360 values instead of 5456; the finest 16x16 cells of
  L = 4 hold only a few gradients on a face crop) and ``levels=4`` reproduces
  the seeds' setting.
* **LPQ** (local phase quantisation, Ojansivu and Heikkila 2008): a short-term
  Fourier transform over a ``window x window`` neighbourhood (default 7x7) at
  the four lowest non-zero frequencies ``(a, 0), (0, a), (a, a), (-a, a)`` (x, y) with
  ``a = 1 / window``, as in the reference code; the signs of the 8 real and imaginary parts make an 8-bit
  code per pixel ('valid' positions only) and a 256-bin histogram, normalised to
  sum 1. ``decorrelate=True`` (the default, as in the reference code) whitens
  the 8 coefficients under a Markov image model (correlation ``rho = 0.9``)
  before quantising. The seeds' "block size 4x4" is read as a grid of blocks:
  ``blocks=(4, 4)`` computes one histogram per block of a 4x4 grid and
  concatenates them (4096 values); the default ``(1, 1)`` is one histogram of
  the whole image. (The other reading, a 4x4 STFT window, is ``window=4``.)
  The STFT here is a correlation (the window's offsets weighted by
  ``exp(-2 pi i u.d)``); the reference code convolves (``conv2``), which gives the
  complex conjugate of each response. So every code is the reference code's code
  XOR one constant of the window (with or without decorrelation), and a histogram
  is the reference's with its 256 bins permuted: the same information, the
  same principal components up to their signs.

Blur invariance is LPQ's reason to exist: a centrally symmetric blur multiplies
the spectrum by a real, (for a Gaussian) positive factor, which leaves the
phase at the low frequencies unchanged, so the codes of an image and of its
blurred copy mostly agree.

Example:
  >>> import numpy as np
  >>> from jaxprune.data import features
  >>> images = np.random.default_rng(0).random((3, 32, 24), dtype=np.float32)
  >>> features.phog(images).shape, features.lpq(images).shape
  ((3, 1360), (3, 256))
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DescriptorConfig",
    "describe",
    "extract_features",
    "fit_pca",
    "lpq",
    "lpq_codes",
    "phog",
    "to_gray",
]


# ----------------------------------------------------------------------------- input


def to_gray(images: Any) -> np.ndarray:
  """``(N, H, W)`` float32 grayscale from ``(N, H, W)`` or ``(N, H, W, C)`` images.

  RGB is weighted by ITU-R 601 luma (0.299, 0.587, 0.114); one channel is taken
  as is; any other channel count is averaged.
  """
  x = np.asarray(images, dtype=np.float32)
  if x.ndim == 4:
    if x.shape[-1] == 3:
      x = x @ np.asarray([0.299, 0.587, 0.114], np.float32)
    else:
      x = x.mean(axis=-1)
  if x.ndim != 3:
    raise ValueError(
        f"images must be (N, H, W) or (N, H, W, C), got shape {x.shape}; pass a batch"
        " (add a leading axis for one image)"
    )
  if not np.all(np.isfinite(x)):
    raise ValueError("images contain NaN or infinite values; check the image loader")
  return x


def _cell_index(n: int, cells: int) -> jax.Array:
  """The cell (0..cells-1) of each of ``n`` positions when split into ``cells`` parts."""
  return (jnp.arange(n) * cells) // n


# ----------------------------------------------------------------------------- PHOG


def _phog_one(image: jax.Array, bins: int, levels: int, normalize: bool) -> jax.Array:
  padded = jnp.pad(image, 1, mode="edge")
  gx = 0.5 * (padded[1:-1, 2:] - padded[1:-1, :-2])
  gy = 0.5 * (padded[2:, 1:-1] - padded[:-2, 1:-1])
  magnitude = jnp.sqrt(gx * gx + gy * gy)
  angle = jnp.mod(jnp.degrees(jnp.arctan2(gy, gx)), 360.0)
  b = jnp.clip(jnp.floor(angle * (bins / 360.0)).astype(jnp.int32), 0, bins - 1)
  h, w = image.shape
  cells = 2**levels
  row = _cell_index(h, cells)[:, None]
  col = _cell_index(w, cells)[None, :]
  index = (row * cells + col) * bins + b
  finest = jnp.zeros(cells * cells * bins, jnp.float32).at[index.ravel()].add(
      magnitude.ravel())
  finest = finest.reshape(cells, cells, bins)
  pyramid = [finest]
  for _ in range(levels):
    g = pyramid[0]
    n = g.shape[0] // 2
    pyramid.insert(0, g.reshape(n, 2, n, 2, bins).sum(axis=(1, 3)))
  out = jnp.concatenate([p.ravel() for p in pyramid])
  if normalize:
    out = out / jnp.maximum(out.sum(), jnp.finfo(jnp.float32).tiny)
  return out


@functools.partial(jax.jit, static_argnames=("bins", "levels", "normalize"))
def _phog_batch(images, bins, levels, normalize):
  return jax.vmap(lambda im: _phog_one(im, bins, levels, normalize))(images)


def phog(images: Any, *, bins: int = 16, levels: int = 3, normalize: bool = True) -> jax.Array:
  """PHOG descriptors of a batch of images (jit-compiled, vmapped).

  Args:
    images: ``(N, H, W)`` or ``(N, H, W, C)`` (converted with `to_gray`).
    bins: orientation bins over 0-360 degrees (16 in the seeds).
    levels: the finest pyramid level ``L`` (cells ``2^L x 2^L``); 3 by default,
      the seeds name 4.
    normalize: divide the concatenated histograms by their sum (an all-flat
      image stays all zeros); False returns the raw magnitude sums.

  Returns:
    ``(N, bins * sum_l 4^l)`` float32: level 0's histogram, then level 1's
    4 cells (row-major), and so on.

  Example:
    >>> import numpy as np
    >>> edge = np.zeros((1, 8, 8), np.float32); edge[:, :, 4:] = 1.0
    >>> h = phog(edge, levels=0)  # a dark-to-light vertical edge: gradient at 0 degrees
    >>> int(np.argmax(h[0])), float(h[0, 0])
    (0, 1.0)
  """
  _check_positive("bins", bins)
  if int(levels) != levels or levels < 0:
    raise ValueError(f"levels must be a non-negative int, got {levels!r}")
  x = to_gray(images)
  if min(x.shape[1:]) < 2**levels:
    raise ValueError(
        f"images of {x.shape[1]}x{x.shape[2]} are too small for PHOG level {levels}"
        f" ({2**levels}x{2**levels} cells); lower levels or use larger images"
    )
  return _phog_batch(jnp.asarray(x), int(bins), int(levels), bool(normalize))


# ----------------------------------------------------------------------------- LPQ


_LPQ_RHO = 0.90


@functools.lru_cache(maxsize=None)
def _lpq_filters(window: int, decorrelate: bool) -> tuple[np.ndarray, np.ndarray]:
  """The 8 real STFT filters ``(window, window, 8)`` and the whitening matrix ``(8, 8)``."""
  r = (window - 1) / 2.0
  x = np.arange(window) - r
  a = 1.0 / window
  w0 = np.ones(window, np.complex128)
  w1 = np.exp(-2j * np.pi * a * x)
  w2 = np.conj(w1)
  # q[y, x] at (horizontal, vertical) frequencies (a, 0), (0, a), (a, a), (-a, a): the
  # reference code's w0'*w1, w1'*w0, w1'*w1, w1'*conj(w1).
  complex_filters = [np.outer(w0, w1), np.outer(w1, w0), np.outer(w1, w1), np.outer(w1, w2)]
  real = []
  for q in complex_filters:
    real.extend([q.real, q.imag])
  filters = np.stack(real, axis=-1)  # (window, window, 8)
  if not decorrelate:
    return filters.astype(np.float32), np.eye(8, dtype=np.float32)
  yy, xx = np.meshgrid(np.arange(window), np.arange(window), indexing="ij")
  points = np.stack([yy.ravel(), xx.ravel()], axis=1).astype(np.float64)
  dist = np.sqrt(((points[:, None, :] - points[None, :, :])**2).sum(-1))
  cov = _LPQ_RHO**dist
  m = filters.reshape(-1, 8).T  # (8, window^2)
  d = m @ cov @ m.T
  # The reference code's tiny diagonal scaling breaks ties between equal singular values.
  s = np.diag(1.0 + 1e-6 * np.arange(8, 0, -1) - 1e-6)
  _, _, vt = np.linalg.svd(s @ d @ s)
  return filters.astype(np.float32), vt.astype(np.float32)


def _taps(x: jax.Array, weights: np.ndarray, axis: int) -> jax.Array:
  """'valid' correlation of ``x`` with a 1-D filter along ``axis`` (shifted slices, fused)."""
  n = len(weights)
  size = x.shape[axis] - n + 1
  out = None
  for k, w in enumerate(weights):
    term = jax.lax.slice_in_dim(x, k, k + size, axis=axis) * float(w)
    out = term if out is None else out + term
  return out


def _lpq_codes_one(image: jax.Array, window: int, whiten: jax.Array) -> jax.Array:
  # Subtracting the mean changes no response in exact arithmetic (the filters have no DC
  # part) and makes a constant image give exact zeros, hence the single code 0.
  image = image - jnp.mean(image)
  x = np.arange(window) - (window - 1) / 2.0
  box = np.ones(window)
  cos, sin = np.cos(2 * np.pi * x / window), -np.sin(2 * np.pi * x / window)  # w1 = cos + i sin
  # The four STFT filters are outer products, so they separate: 3 horizontal passes
  # (box, cos, sin), then 8 vertical ones, instead of 8 full window x window correlations.
  a0, ac, as_ = (_taps(image, w, 1) for w in (box, cos, sin))
  v = lambda w, a: _taps(a, w, 0)
  f1 = (v(box, ac), v(box, as_))                      # w0(y) w1(x)
  f2 = (v(cos, a0), v(sin, a0))                       # w1(y) w0(x)
  cc, ss, cs, sc = v(cos, ac), v(sin, as_), v(cos, as_), v(sin, ac)
  f3 = (cc - ss, cs + sc)                             # w1(y) w1(x)
  f4 = (cc + ss, sc - cs)                             # w1(y) conj(w1(x))
  resp = jnp.stack([*f1, *f2, *f3, *f4], axis=-1)
  resp = jnp.matmul(resp, whiten.T, precision=jax.lax.Precision.HIGHEST)
  weights = (2 ** jnp.arange(8)).astype(jnp.int32)
  return jnp.sum((resp > 0).astype(jnp.int32) * weights, axis=-1)


def _lpq_one(image, window, whiten, blocks, normalize):
  codes = _lpq_codes_one(image, window, whiten)
  h, w = codes.shape
  by, bx = blocks
  row = _cell_index(h, by)[:, None]
  col = _cell_index(w, bx)[None, :]
  index = (row * bx + col) * 256 + codes
  hist = jnp.zeros(by * bx * 256, jnp.float32).at[index.ravel()].add(1.0)
  hist = hist.reshape(by * bx, 256)
  if normalize:
    hist = hist / jnp.maximum(hist.sum(axis=1, keepdims=True), 1.0)
  return hist.ravel()


@functools.partial(jax.jit, static_argnames=("window", "blocks", "normalize"))
def _lpq_batch(images, window, whiten, blocks, normalize):
  return jax.vmap(lambda im: _lpq_one(im, window, whiten, blocks, normalize))(images)


@functools.partial(jax.jit, static_argnames=("window",))
def _lpq_codes_batch(images, window, whiten):
  return jax.vmap(lambda im: _lpq_codes_one(im, window, whiten))(images)


def _lpq_setup(images, window, decorrelate):
  _check_positive("window", window)
  if window < 2:
    raise ValueError(f"window must be at least 2, got {window}")
  x = to_gray(images)
  if min(x.shape[1:]) < window:
    raise ValueError(
        f"images of {x.shape[1]}x{x.shape[2]} are smaller than the LPQ window"
        f" {window}x{window}; lower window or use larger images"
    )
  _, whiten = _lpq_filters(int(window), bool(decorrelate))
  return jnp.asarray(x), int(window), jnp.asarray(whiten)


def lpq_codes(images: Any, *, window: int = 7, decorrelate: bool = True) -> jax.Array:
  """The 8-bit LPQ code (0..255) of every 'valid' pixel: ``(N, H - window + 1, W - window + 1)``."""
  return _lpq_codes_batch(*_lpq_setup(images, window, decorrelate))


def lpq(
    images: Any,
    *,
    window: int = 7,
    decorrelate: bool = True,
    blocks: Sequence[int] = (1, 1),
    normalize: bool = True,
) -> jax.Array:
  """LPQ descriptors of a batch of images (jit-compiled, vmapped).

  Args:
    images: ``(N, H, W)`` or ``(N, H, W, C)`` (converted with `to_gray`).
    window: side of the local STFT window (7 in the reference code).
    decorrelate: whiten the 8 STFT coefficients before quantising (rho 0.9).
    blocks: ``(rows, cols)`` grid of blocks, one 256-bin histogram each; ``(1, 1)``
      (the default) is one histogram for the image, ``(4, 4)`` the seeds' "block
      size 4x4" read as a grid.
    normalize: each block's histogram sums to 1; False returns code counts.

  Returns:
    ``(N, 256 * rows * cols)`` float32, blocks in row-major order.

  Example:
    >>> import numpy as np
    >>> h = lpq(np.full((1, 16, 16), 0.5, np.float32))  # a constant image: one code
    >>> int(np.count_nonzero(h[0])), float(h[0, 0])
    (1, 1.0)
  """
  blocks = tuple(int(b) for b in blocks)
  if len(blocks) != 2 or min(blocks) < 1:
    raise ValueError(f"blocks must be (rows, cols) positive ints, got {blocks!r}")
  x, window, whiten = _lpq_setup(images, window, decorrelate)
  valid = (x.shape[1] - window + 1, x.shape[2] - window + 1)
  if valid[0] < blocks[0] or valid[1] < blocks[1]:
    raise ValueError(f"{valid[0]}x{valid[1]} LPQ codes cannot fill {blocks[0]}x{blocks[1]}"
                     " blocks; use fewer blocks or larger images")
  return _lpq_batch(x, window, whiten, blocks, bool(normalize))


def _check_positive(name, value):
  if int(value) != value or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")


# ----------------------------------------------------------------------------- pipeline


@dataclasses.dataclass(frozen=True)
class DescriptorConfig:
  """Settings of both descriptors (the defaults follow the seeds, see the module doc).

  Attributes:
    phog_bins: PHOG orientation bins over 0-360 degrees.
    phog_levels: finest PHOG pyramid level (3; the seeds name 4).
    lpq_window: LPQ STFT window side.
    lpq_decorrelate: whiten LPQ's STFT coefficients.
    lpq_blocks: LPQ histogram grid ``(rows, cols)``.
    components: principal components kept per descriptor.
  """

  phog_bins: int = 16
  phog_levels: int = 3
  lpq_window: int = 7
  lpq_decorrelate: bool = True
  lpq_blocks: tuple[int, int] = (1, 1)
  components: int = 5


def describe(
    images: Any, config: DescriptorConfig = DescriptorConfig(), *, batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """LPQ and PHOG descriptors of ``images``, computed ``batch_size`` images at a time.

  Args:
    images: ``(N, H, W)`` or ``(N, H, W, C)`` (converted with `to_gray`).
    config: the descriptors' settings.
    batch_size: images per compiled call.
    progress: called as ``progress(done, total)`` after each batch (e.g. to print
      how far a long run is); None: silent.

  Returns:
    ``(lpq, phog)`` as NumPy float32 arrays, one row per image.
  """
  _check_positive("batch_size", batch_size)
  x = to_gray(images)
  lpqs, phogs = [], []
  for start in range(0, len(x), batch_size):
    chunk = x[start:start + batch_size]
    if len(chunk) < batch_size and len(x) > batch_size:
      # Pad the last chunk to the batch shape: one compilation for the whole set.
      chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:],
                                              chunk.dtype)])
    n = min(batch_size, len(x) - start)
    lpqs.append(np.asarray(lpq(chunk, window=config.lpq_window,
                               decorrelate=config.lpq_decorrelate,
                               blocks=config.lpq_blocks))[:n])
    phogs.append(np.asarray(phog(chunk, bins=config.phog_bins,
                                 levels=config.phog_levels))[:n])
    if progress is not None:
      progress(start + n, len(x))
  return np.concatenate(lpqs), np.concatenate(phogs)


def fit_pca(descriptors: np.ndarray, components: int, *, seed: int = 0):
  """Fits scikit-learn's PCA to ``descriptors`` (one row per image); returns it."""
  from sklearn.decomposition import PCA  # pylint: disable=g-import-not-at-top
  descriptors = np.asarray(descriptors, np.float64)
  limit = min(descriptors.shape)
  if components > limit:
    raise ValueError(
        f"{components} principal components need at least {components} images and"
        f" descriptor values; got {descriptors.shape[0]} images of {descriptors.shape[1]}"
        " values"
    )
  if not np.any(descriptors != descriptors[:1]):
    # scikit-learn would divide 0 by 0 (explained variance NaN, every feature 0)
    raise ValueError(
        f"All {descriptors.shape[0]} images have the same descriptor (identical frames, such as"
        " all-black ones): there is no variance for principal components to find. Check that"
        " the images load as intended (open a few), or remove the blank ones."
    )
  return PCA(n_components=components, random_state=seed).fit(descriptors)


def extract_features(
    images: Any, config: DescriptorConfig = DescriptorConfig(), *, batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
  """The seeds' 10 features: top principal components of LPQ, then of PHOG.

  The PCA of each descriptor is fitted on all ``images`` (as the course
  spreadsheet was); the studies still fit their scaling on training folds only.

  ``progress`` is passed to `describe` (``progress(done, total)`` after each
  batch).

  Returns:
    ``(features, info)``: ``(N, 2 * components)`` float32 (LPQ components
    first), and ``info`` with each PCA's explained variance ratio and the
    descriptor sizes.

  Example:
    >>> import numpy as np
    >>> images = np.random.default_rng(0).random((12, 24, 24), dtype=np.float32)
    >>> x, info = extract_features(images)
    >>> x.shape
    (12, 10)
  """
  lpq_d, phog_d = describe(images, config, batch_size=batch_size, progress=progress)
  parts, info = [], {"fitted_on": f"all {len(lpq_d)} images",
                     "config": dataclasses.asdict(config)}
  for name, d in (("lpq", lpq_d), ("phog", phog_d)):
    pca = fit_pca(d, config.components)
    parts.append(pca.transform(np.asarray(d, np.float64)).astype(np.float32))
    info[f"{name}_size"] = int(d.shape[1])
    info[f"{name}_explained_variance_ratio"] = [float(v) for v in pca.explained_variance_ratio_]
  return np.concatenate(parts, axis=1), info
