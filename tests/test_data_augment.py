"""Tests of jaxprune.data.augment: determinism, vmap vs loop, each transform, no recompiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import data
from jaxprune.data import augmentation

OFF = dict(flip=False, max_shift=0.0, max_scale=0.0, max_rotate_deg=0.0,
           blur_prob=0.0, brightness=0.0, contrast=0.0)


# Most tests share one shape so that the compiled program is reused.
def _images(n=8, h=8, w=8, c=1, seed=0):
  return jnp.asarray(np.random.default_rng(seed).random((n, h, w, c), np.float32))


def test_shape_dtype_range_and_determinism():
  x = _images()
  assert data.augment(_images(n=2, c=3), key=jax.random.key(0)).shape == (2, 8, 8, 3)
  key = jax.random.key(0)
  a = data.augment(x, key=key)
  b = data.augment(x, key=key)
  c = data.augment(x, key=jax.random.key(1))
  assert a.shape == x.shape and a.dtype == x.dtype
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0
  # Old-style uint32 keys work too.
  data.augment(x, key=jax.random.PRNGKey(0))


def test_all_off_is_identity():
  x = _images()
  np.testing.assert_array_equal(data.augment(x, key=jax.random.key(3), **OFF), x)


def test_flip_only_gives_original_or_mirror():
  x = _images()
  flipped = 0
  for seed in range(2):
    out = np.asarray(data.augment(x, key=jax.random.key(seed), **dict(OFF, flip=True)))
    for img, orig in zip(out, np.asarray(x)):
      if np.array_equal(img, orig[:, ::-1]):
        flipped += 1
      else:
        np.testing.assert_array_equal(img, orig)
  assert 0 < flipped < 16


def test_vmap_matches_per_image_loop():
  x = _images()
  key = jax.random.key(5)
  settings = dict(max_shift=0.2, max_scale=0.2, max_rotate_deg=30.0, blur_prob=0.5,
                  brightness=0.3, contrast=0.3)
  batch = data.augment(x, key=key, **settings)
  keys = jax.random.split(key, len(x))
  for i in range(len(x)):
    one = data.augment_image(x[i], key=keys[i], **settings)
    np.testing.assert_allclose(batch[i], one, atol=1e-5)


def test_brightness_and_contrast():
  x = _images() * 0.5 + 0.25
  key = jax.random.key(1)
  out = data.augment(x, key=key, value_range=None, **dict(OFF, brightness=0.1))
  delta = np.asarray(out - x)
  for d in delta:  # one offset per image, within +-0.1
    np.testing.assert_allclose(d, d.flat[0], atol=1e-6)
    assert abs(d.flat[0]) <= 0.1
  out = data.augment(x, key=key, value_range=None, **dict(OFF, contrast=0.5))
  np.testing.assert_allclose(out.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1e-5)
  ratio = np.asarray(out.std(axis=(1, 2, 3)) / x.std(axis=(1, 2, 3)))
  assert np.all((ratio >= 0.5 - 1e-4) & (ratio <= 1.5 + 1e-4))
  assert not np.allclose(ratio, 1.0)


def test_blur_smooths_and_keeps_constants():
  board = np.broadcast_to(
      (np.indices((8, 8)).sum(0) % 2).astype(np.float32)[None, ..., None], (8, 8, 8, 1))
  out = data.augment(jnp.asarray(board), key=jax.random.key(0), **dict(OFF, blur_prob=1.0))
  assert float(out.std()) < 0.5 * float(board.std())
  np.testing.assert_allclose(out.mean(), board.mean(), atol=0.05)
  const = jnp.full((8, 8, 8, 1), 0.3)
  np.testing.assert_allclose(
      data.augment(const, key=jax.random.key(0), **dict(OFF, blur_prob=1.0)), const,
      atol=1e-6)


def test_affine_warp_moves_content():
  x = jnp.zeros((8, 8, 8, 1)).at[:, 3:5, 3:5].set(1.0)
  out = data.augment(x, key=jax.random.key(2),
                     **dict(OFF, max_shift=0.1, max_rotate_deg=20.0, max_scale=0.2))
  assert not np.allclose(out, x)
  # A centred blob keeps roughly its mass under small moves and zooms.
  mass = np.asarray(out.sum(axis=(1, 2, 3)))
  assert np.all((mass > 4 * 0.5) & (mass < 4 * 1.6)), mass


def test_no_recompilation_when_settings_change():
  x = _images()
  data.augment(x, key=jax.random.key(0))
  before = augmentation._augment_batch_jit._cache_size()
  data.augment(x, key=jax.random.key(1), max_shift=0.3, brightness=0.0)
  data.augment(x, key=jax.random.key(2), contrast=0.7, blur_prob=1.0)
  data.augment(x, key=jax.random.key(3), flip=False, value_range=None)
  assert augmentation._augment_batch_jit._cache_size() == before


def test_inside_user_jit_and_rank_promotion():
  x = _images()
  with jax.numpy_rank_promotion("raise"):
    out = jax.jit(lambda im, k: data.augment(im, key=k, max_scale=0.3))(
        x, jax.random.key(0))
  assert out.shape == x.shape


def test_bad_inputs():
  with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
    data.augment(jnp.zeros((4, 8, 8)), key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"\(H, W, C\)"):
    data.augment_image(jnp.zeros((1, 4, 8, 8)), key=jax.random.key(0))
  with pytest.raises(ValueError, match="floating"):
    data.augment(jnp.zeros((1, 4, 4, 1), jnp.uint8), key=jax.random.key(0))
  with pytest.raises(ValueError, match="fill_mode"):
    data.augment(jnp.zeros((1, 4, 4, 1)), key=jax.random.key(0), fill_mode="edge")
  with pytest.raises(TypeError):
    data.augment(jnp.zeros((1, 4, 4, 1)), jax.random.key(0))  # key is keyword-only
