"""On-the-fly image augmentation in JAX: jit-compiled, vmapped, deterministic per key.

Each image of a batch gets its own random horizontal flip, shift-scale-rotate
(one affine warp with `jax.scipy.ndimage.map_coordinates`), optional 3x3 blur,
and brightness and contrast jitter. All settings but ``fill_mode`` are traced,
so changing them does not recompile. Both functions can be called inside a user's `jax.jit`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.scipy import ndimage

from jaxprune import validate

__all__ = ["augment", "augment_image"]

_FILL_MODES = ("nearest", "constant", "reflect", "mirror", "wrap")


def _blur3(image: jax.Array) -> jax.Array:
  """3x3 binomial blur ([1, 2, 1] / 4 each way), edges replicated."""
  h, w = image.shape[0], image.shape[1]
  p = jnp.pad(image, ((1, 1), (0, 0), (0, 0)), mode="edge")
  image = 0.25 * p[:h] + 0.5 * p[1:h + 1] + 0.25 * p[2:h + 2]
  p = jnp.pad(image, ((0, 0), (1, 1), (0, 0)), mode="edge")
  return 0.25 * p[:, :w] + 0.5 * p[:, 1:w + 1] + 0.25 * p[:, 2:w + 2]


def _augment_one(
    image: jax.Array,
    key: jax.Array,
    max_shift: jax.Array,
    max_scale: jax.Array,
    max_rotate_deg: jax.Array,
    blur_prob: jax.Array,
    brightness: jax.Array,
    contrast: jax.Array,
    flip_prob: jax.Array,
    low: jax.Array,
    high: jax.Array,
    *,
    fill_mode: str,
) -> jax.Array:
  h, w, _ = image.shape
  dtype = image.dtype
  # One draw of 8 uniforms (a single threefry call keeps compilation quick).
  u = jax.random.uniform(key, (8,), dtype)
  sym = 2.0 * u - 1.0  # uniform in [-1, 1)
  shift_r = sym[0] * max_shift * h
  shift_c = sym[1] * max_shift * w
  scale = 1.0 + sym[2] * max_scale
  angle = jnp.deg2rad(sym[3] * max_rotate_deg)
  do_flip = u[4] < flip_prob

  # Output pixel q maps back to source p = R^T (q - centre - shift) / scale + centre,
  # then through the flip (the flip is applied to the input first).
  cr, cc = (h - 1) / 2.0, (w - 1) / 2.0
  rows, cols = jnp.meshgrid(jnp.arange(h, dtype=dtype), jnp.arange(w, dtype=dtype),
                            indexing="ij")
  dr = rows - cr - shift_r
  dc = cols - cc - shift_c
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  src_r = (cos * dr + sin * dc) / scale + cr
  src_c = (-sin * dr + cos * dc) / scale + cc
  src_c = jnp.where(do_flip, (w - 1) - src_c, src_c)
  warp = jax.vmap(
      lambda ch: ndimage.map_coordinates(ch, [src_r, src_c], order=1,
                                         mode=fill_mode),
      in_axes=2, out_axes=2)
  image = warp(image)

  do_blur = u[5] < blur_prob
  image = jnp.where(do_blur, _blur3(image), image)

  mean = jnp.mean(image, axis=(0, 1), keepdims=True)
  factor = 1.0 + sym[6] * contrast
  delta = sym[7] * brightness
  # (image - mean) * factor + mean, written so that factor 1 is exact.
  image = image * factor + mean * (1.0 - factor) + delta
  return jnp.clip(image, low, high).astype(dtype)


def _check(images: jax.Array, rank: int, fill_mode: str,
           value_range: tuple[float, float] | None) -> None:
  if images.ndim != rank:
    layout = "(N, H, W, C)" if rank == 4 else "(H, W, C)"
    raise ValueError(f"images must be {layout}, got shape {images.shape}")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images must be floating point, got {images.dtype}")
  if fill_mode not in _FILL_MODES:
    raise ValueError(f"fill_mode must be one of {_FILL_MODES}, got {fill_mode!r}")
  if value_range is not None and len(value_range) != 2:
    raise ValueError(f"value_range must be (low, high) or None, got {value_range}")
  if value_range is not None:
    try:  # concrete bounds only: traced ones (inside a caller's jit) cannot be checked
      low, high = float(value_range[0]), float(value_range[1])
    except (TypeError, jax.errors.ConcretizationTypeError):
      return
    if not low < high:
      # Clipping to (high, low) would set every pixel to one value without a word.
      raise ValueError(f"value_range must be (low, high) with low < high, got {value_range};"
                       " e.g. (0.0, 1.0) for images in [0, 1], or None for no clipping")


def _check_key(key, what: str) -> None:
  """One random key (JAX's own errors for a batch of keys or a plain int name its internals)."""
  validate.check_key(key, single=what, batch_fix=(
      "pass a single key, e.g. key=jax.random.key(step); each image of the batch gets its own "
      "draw from it (image i uses jax.random.split(key, N)[i])" if what == "augment" else
      "for several images use augment, or jax.vmap augment_image over the keys"))


@functools.partial(jax.jit, static_argnames="fill_mode")
def _augment_one_jit(image, key, settings, *, fill_mode):
  return _augment_one(image, key, *settings, fill_mode=fill_mode)


@functools.partial(jax.jit, static_argnames="fill_mode")
def _augment_batch_jit(images, key, settings, *, fill_mode):
  keys = jax.random.split(key, images.shape[0])
  one = functools.partial(_augment_one, fill_mode=fill_mode)
  return jax.vmap(one, in_axes=(0, 0) + (None,) * len(settings))(
      images, keys, *settings)


def _settings(flip, max_shift, max_scale, max_rotate_deg, blur_prob, brightness,
              contrast, value_range) -> tuple[jax.Array, ...]:
  # All settings become traced float32 scalars, so that changing any of them
  # (or leaving it at its default) never recompiles; only fill_mode is static.
  if value_range is None:
    low, high = -jnp.inf, jnp.inf
  else:
    low, high = value_range
  flip_prob = jnp.where(jnp.asarray(flip), 0.5, 0.0)
  values = (max_shift, max_scale, max_rotate_deg, blur_prob, brightness, contrast,
            flip_prob, low, high)
  return tuple(jnp.asarray(v, dtype=jnp.float32) for v in values)


def _prepare(images, rank, flip, max_shift, max_scale, max_rotate_deg, blur_prob,
             brightness, contrast, fill_mode, value_range):
  """Checked images of ``rank`` dims (weak typing dropped: one compile) and traced settings."""
  images = jnp.asarray(images)
  images = jnp.asarray(images, dtype=images.dtype)
  _check(images, rank, fill_mode, value_range)
  return images, _settings(flip, max_shift, max_scale, max_rotate_deg, blur_prob,
                           brightness, contrast, value_range)


def augment_image(
    image: jax.Array,
    *,
    key: jax.Array,
    flip: bool = True,
    max_shift: float = 0.1,
    max_scale: float = 0.1,
    max_rotate_deg: float = 15.0,
    blur_prob: float = 0.2,
    brightness: float = 0.2,
    contrast: float = 0.2,
    fill_mode: str = "nearest",
    value_range: tuple[float, float] | None = (0.0, 1.0),
) -> jax.Array:
  """Augments one ``(H, W, C)`` image; see `augment` for the arguments."""
  _check_key(key, "augment_image")
  image, settings = _prepare(image, 3, flip, max_shift, max_scale, max_rotate_deg,
                             blur_prob, brightness, contrast, fill_mode, value_range)
  return _augment_one_jit(image, key, settings, fill_mode=fill_mode)


def augment(
    images: jax.Array,
    *,
    key: jax.Array,
    flip: bool = True,
    max_shift: float = 0.1,
    max_scale: float = 0.1,
    max_rotate_deg: float = 15.0,
    blur_prob: float = 0.2,
    brightness: float = 0.2,
    contrast: float = 0.2,
    fill_mode: str = "nearest",
    value_range: tuple[float, float] | None = (0.0, 1.0),
) -> jax.Array:
  """Randomly augments a batch of images, each with its own draw.

  Image ``i`` uses ``jax.random.split(key, N)[i]``, so the result is
  deterministic for a key and equals `augment_image` on that image and key.

  Args:
    images: ``(N, H, W, C)`` float images (NHWC), values in ``value_range``.
    key: a JAX random key (keyword-only).
    flip: random horizontal flip with probability 0.5.
    max_shift: largest shift, as a fraction of height (rows) and width (cols).
    max_scale: zoom drawn from ``1 +- max_scale``.
    max_rotate_deg: rotation drawn from ``+- max_rotate_deg`` degrees.
    blur_prob: probability of a 3x3 binomial blur.
    brightness: added offset drawn from ``+- brightness``.
    contrast: contrast factor drawn from ``1 +- contrast`` (around each
      channel's mean).
    fill_mode: how the warp fills pixels from outside the image (static):
      ``'nearest'``, ``'constant'`` (zeros), ``'reflect'``, ``'mirror'`` or
      ``'wrap'``.
    value_range: clip the result to ``(low, high)``; None leaves it unclipped.

  Returns:
    The augmented images, same shape and dtype. All settings at 0 and
    ``flip=False`` return the images unchanged (up to the clip).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.zeros((4, 90, 72, 1))
    >>> augment(x, key=jax.random.key(0)).shape
    (4, 90, 72, 1)
  """
  _check_key(key, "augment")
  images, settings = _prepare(images, 4, flip, max_shift, max_scale, max_rotate_deg,
                              blur_prob, brightness, contrast, fill_mode, value_range)
  return _augment_batch_jit(images, key, settings, fill_mode=fill_mode)
