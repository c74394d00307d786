"""A sweep of ``jaxprune.trace`` over the JAX ops real models use. Each case is a tiny plain-JAX
model ``op(tanh(x @ w1 + b1)) @ w2 + b2`` with ONE op under test, applied along a non-unit axis
(time, batch) or along the units. The outcome is exact either way: the group is found and the
compacted target computes what masking does (at the example's batch size and at another; at
another sequence length it refuses), or the layer is refused with the reason the op gives.
The sweep's findings, fixed, are in ``_FIXED`` (wrong answers at another batch size, groups
accepted that failed to compact, needless refusals)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jaxprune
from conftest import assert_compacts_as_masked, host_f32, rms_norm

B, T, D, H, O = 4, 5, 3, 6, 2
BT, BD = (B, T, D), (B, D)


def _arr(rng, *shape):
  return host_f32(rng.normal(size=shape))


def _plain(op, shape):
  """``op`` between a tanh layer ``w1`` and a readout ``w2``, at input ``shape``."""
  def fn(p, x):
    return op(jnp.tanh(x @ p["w1"] + p["b1"])) @ p["w2"] + p["b2"]

  def make(rng):
    out = jax.eval_shape(op, jax.ShapeDtypeStruct(shape[:-1] + (H,), jnp.float32))
    return {"w1": _arr(rng, D, H), "b1": _arr(rng, H), "w2": _arr(rng, out.shape[-1], O),
            "b2": _arr(rng, O)}
  return fn, make, shape


def _conv(kind):
  """A 1-D conv over time reading the units as input channels: its own group ``k`` too."""
  dn = ("NWC", "WIO", "NWC")
  conv = {
      "same": lambda h, k: lax.conv_general_dilated(h, k, (1,), "SAME", dimension_numbers=dn),
      "rhs_dilated": lambda h, k: lax.conv_general_dilated(
          h, k, (1,), ((2, 2),), rhs_dilation=(2,), dimension_numbers=dn),
      "lhs_dilated": lambda h, k: lax.conv_general_dilated(
          h, k, (1,), ((1, 1),), lhs_dilation=(2,), dimension_numbers=dn),
      "transpose": lambda h, k: lax.conv_transpose(h, k, (2,), "SAME", dimension_numbers=dn),
  }[kind]

  def fn(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return jnp.tanh(conv(h, p["k"]) + p["bk"]) @ p["w2"] + p["b2"]

  def make(rng):
    return {"w1": _arr(rng, D, H), "b1": _arr(rng, H), "k": _arr(rng, 3, H, 5),
            "bk": _arr(rng, 5), "w2": _arr(rng, 5, O), "b2": _arr(rng, O)}
  return fn, make, BT


def _causal_attention(p, x):
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  q, k, v = h @ p["wq"], h @ p["wk"], h @ p["wv"]
  s = jnp.einsum("btd,bsd->bts", q, k)
  s = jnp.where(jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool)), s, -1e9)
  return jnp.einsum("bts,bsd->btd", jax.nn.softmax(s, -1), v) @ p["w2"] + p["b2"]


def _attention_params(rng):
  return {"w1": _arr(rng, D, H), "b1": _arr(rng, H), "wq": _arr(rng, H, 4),
          "wk": _arr(rng, H, 4), "wv": _arr(rng, H, 5), "w2": _arr(rng, 5, O), "b2": _arr(rng, O)}


_ONE, _HALF, _NEAR_ONE = jnp.float32(1.0), jnp.float32(0.5), jnp.float32(0.9)
_TWO, _ONE_AND_HALF = jnp.float32(2.0), jnp.float32(1.5)
_I_INF = jnp.complex64(complex(1, np.inf))
_KEY = jax.random.key(0)
_TIME_KEYS = jnp.asarray(np.arange(T, 0, -1, dtype=np.float32)[:, None])   # (T, 1)


def _sorted_by_another_layer(p, x):
  """h sorted along time by another layer's g: one permutation moves both, so a unit of h is
  one of g (the two layers' units were two groups, and masking one moved the other's)."""
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  g = jnp.tanh(x @ p["w3"] + p["b3"])
  return lax.sort((g, h), dimension=1, num_keys=1)[1] @ p["w2"] + g @ p["w4"] + p["b2"]


def _two_layer_params(rng):
  return {"w1": _arr(rng, D, H), "b1": _arr(rng, H), "w3": _arr(rng, D, H), "b3": _arr(rng, H),
          "w2": _arr(rng, H, O), "w4": _arr(rng, H, O), "b2": _arr(rng, O)}

_SENDERS, _RECEIVERS = np.array([0, 1, 2, 3, 0, 2]), np.array([1, 2, 3, 0, 2, 0])


def _message_passing(p, x):
  """A graph layer over the nodes (axis 0): each node sums its neighbours' hidden units."""
  h = jnp.tanh(x @ p["w1"] + p["b1"])
  agg = jax.ops.segment_sum(h[_SENDERS], _RECEIVERS, num_segments=x.shape[0])
  return agg @ p["w2"] + p["b2"]


def _graph_params(rng):
  return {"w1": _arr(rng, D, H), "b1": _arr(rng, H), "w2": _arr(rng, H, O), "b2": _arr(rng, O)}


@jax.custom_vjp
def _sin_vjp(h):
  return jnp.sin(h)


_sin_vjp.defvjp(lambda h: (jnp.sin(h), h), lambda h, g: (g * jnp.cos(h),))


@jax.custom_jvp
def _double_tanh(h):
  return 2 * jnp.tanh(h)


_double_tanh.defjvp(lambda p, t: (_double_tanh(p[0]), 2 * t[0] * (1 - jnp.tanh(p[0]) ** 2)))

def _complex_rms(z):
  return z / jnp.sqrt(jnp.mean(jnp.abs(z) ** 2, -1, keepdims=True) + 1e-6)


_IDX_T, _IDX_U = jnp.array([4, 0, 2]), jnp.array([5, 0, 2, 1])


def _along_time(idx, h):
  return jnp.broadcast_to(idx[None, :, None], (h.shape[0], idx.shape[0], h.shape[2]))


# Cases following the layer: name -> (model, groups found).
_FOLLOWED = {
    # sums over the units of values that are zero where a unit's params are (a norm's statistic
    # of each example: a removed unit leaves it as it is, the mean's divisor the traced width)
    "l2_norm_units": (_plain(
        lambda h: h / (jnp.linalg.norm(h, axis=-1, keepdims=True) + 1e-3), BT), {"w1"}),
    "rms_norm_units": (_plain(
        lambda h: h * lax.rsqrt(jnp.mean(jnp.square(h), -1, keepdims=True) + 1e-6), BT), {"w1"}),
    "relu6_rms_norm_units": (_plain(lambda h: jax.nn.relu6(h) * lax.rsqrt(
        jnp.mean(jnp.square(jax.nn.relu6(h)), -1, keepdims=True) + 1e-6), BT), {"w1"}),
    "power_l2_norm_units": (_plain(
        lambda h: h / jnp.sqrt(jnp.sum(jnp.power(h, 2.0), -1, keepdims=True) + 1e-3), BT),
        {"w1"}),
    "mean_centred_units": (_plain(lambda h: h - h.mean(-1, keepdims=True), BT), {"w1"}),
    # zero kept at zero through jnp's jitted helpers, whose scalars are operands, not literals:
    # a clip's bounds, where(h > 0, h, 0.0), and cases a predicate on h never picks at h = 0
    "where_rms_norm_units": (_plain(lambda h: rms_norm(jnp.where(h > 0, h, 0.0)), BT), {"w1"}),
    "clip_rms_norm_units": (_plain(lambda h: rms_norm(jnp.clip(h, -0.5, 0.5)), BT), {"w1"}),
    "hard_tanh_rms_norm_units": (_plain(lambda h: rms_norm(jax.nn.hard_tanh(3 * h)), BT), {"w1"}),
    "elu_rms_norm_units": (_plain(lambda h: rms_norm(jax.nn.elu(h)), BT), {"w1"}),
    "where_picks_h_at_zero_rms_units": (_plain(lambda h: rms_norm(jnp.where(h < 0.2, h, 5.0)), BT),
                                        {"w1"}),
    # values known at a masked unit, shifted back to zero there: exp(0) - 1, sigmoid(0) - 0.5,
    # 1 - cos(0) (through a stop_gradient too); a where whose predicate compares such a value
    # with a constant; a take along time whose out-of-range indices read NaN (jnp's default)
    "exp_minus_one_rms_units": (_plain(lambda h: rms_norm(jnp.exp(h) - 1.0), BT), {"w1"}),
    "stop_gradient_exp_minus_one_rms_units": (_plain(
        lambda h: rms_norm(lax.stop_gradient(jnp.exp(h)) - 1.0), BT), {"w1"}),
    "take_time_rms_units": (_plain(lambda h: rms_norm(jnp.take(h, _IDX_T, axis=1)), BT), {"w1"}),
    # bfloat16 and float16 layers with a bias (0 + 0 in their dtype), relu and exp(h) - 1
    "bfloat16_bias_rms_units": (_plain(lambda h: rms_norm(
        (h.astype(jnp.bfloat16) + jnp.zeros((), jnp.bfloat16)).astype(jnp.float32)), BT), {"w1"}),
    "float16_relu_exp_minus_one_rms_units": (_plain(lambda h: rms_norm(
        jnp.exp(jax.nn.relu(h.astype(jnp.float16))) - 1).astype(jnp.float32), BT), {"w1"}),
    "centred_sigmoid_rms_units": (_plain(lambda h: rms_norm(jax.nn.sigmoid(h) - 0.5), BT),
                                  {"w1"}),
    "one_minus_cos_rms_units": (_plain(lambda h: rms_norm(1.0 - jnp.cos(h)), BT), {"w1"}),
    "where_on_exp_picks_h_rms_units": (_plain(
        lambda h: rms_norm(jnp.where(jnp.exp(h) > 0.5, h, 3.0)), BT), {"w1"}),
    # jax scalars the model closes over (constvars of its program), read as literals are
    "exp_minus_closed_over_one_rms_units": (_plain(lambda h: rms_norm(jnp.exp(h) - _ONE), BT),
                                            {"w1"}),
    "exp_minus_closed_over_one_in_jit_rms_units": (_plain(
        jax.jit(lambda h: rms_norm(jnp.exp(h) - 2 * _HALF)), BT), {"w1"}),
    # (a closed-over PRNG key has no values to read: a fixed dropout along time, before a norm)
    "closed_over_key_dropout_time_rms_units": (_plain(lambda h: rms_norm(
        h * jax.random.bernoulli(_KEY, 0.5, (T, 1)).astype(h.dtype)), BT), {"w1"}),
    # a cast of a closed-over constant that changes no value (2.0 to int32 and back)
    "exp_times_two_minus_its_int_cast_rms_units": (_plain(lambda h: rms_norm(
        jnp.exp(h) * _TWO - _TWO.astype(jnp.int32).astype(jnp.float32)), BT), {"w1"}),
    "bfloat16_clip_rms_units": (_plain(lambda h: rms_norm(
        jnp.clip(h.astype(jnp.bfloat16), 0, 6).astype(jnp.float32)), BT), {"w1"}),
    "bfloat16_min_with_cast_of_closed_over_one_rms_units": (_plain(lambda h: rms_norm(
        jnp.minimum(h.astype(jnp.bfloat16), _ONE.astype(jnp.bfloat16)).astype(jnp.float32)), BT),
        {"w1"}),
    # sorts and running maxima along time keep a masked unit's one value (its rows, reordered)
    "sort_time_rms_units": (_plain(lambda h: rms_norm(jnp.sort(h, 1)), BT), {"w1"}),
    "sort_by_exp_time_rms_units": (_plain(lambda h: rms_norm(
        lax.sort((jnp.exp(h), h), dimension=1, num_keys=1)[1]), BT), {"w1"}),
    "cummin_exp_minus_one_time_rms_units": (_plain(
        lambda h: rms_norm(lax.cummin(jnp.exp(h), 1) - 1.0), BT), {"w1"}),
    # a maximum of values never negative: a masked unit's 0 is no maximum
    "linf_norm_units": (_plain(lambda h: h / (jnp.max(jnp.abs(h), -1, keepdims=True) + 1e-3),
                               BT), {"w1"}),
    "linf_norm_of_relu_times_closed_over_scalar_units": (_plain(lambda h: (lambda a: a / (
        jnp.max(a, -1, keepdims=True) + 1e-3))(jax.nn.relu(h) * _HALF), BT), {"w1"}),
    # a product with the units on a batch axis of a contraction is 0 at a masked unit where the
    # other factor is finite (exp(0) is); a cast to a float keeps relu's values never negative
    "einsum_zero_times_exp_rms_units": (_plain(lambda h: rms_norm(jnp.einsum(
        "bth,bthk->bthk", h, jnp.exp(h)[..., None] * jnp.ones((1, 1, 1, 2))).sum(-1)), BT),
        {"w1"}),
    "linf_norm_of_relu_cast_to_float16_units": (_plain(lambda h: h / (jnp.max(
        jax.nn.relu(h).astype(jnp.float16), -1, keepdims=True).astype(jnp.float32) + 1), BT),
        {"w1"}),
    "linf_norm_of_uint8_cast_to_int16_units": (_plain(lambda h: h / (jnp.max((jax.nn.relu(
        h) * 250).astype(jnp.uint8).astype(jnp.int16), -1, keepdims=True).astype(jnp.float32)
        + 1), BT), {"w1"}),
    # (jax.nn.standardize's and flax's LayerNorm's variance is E[h^2] - E[h]^2: two such sums)
    "layer_norm_units": (_plain(lambda h: jax.nn.standardize(h, -1), BT), {"w1"}),
    "cumsum_time": (_plain(lambda h: jnp.cumsum(h, 1), BT), {"w1"}),
    "cumsum_batch": (_plain(lambda h: jnp.cumsum(h, 0), BD), {"w1"}),
    "cumprod_time": (_plain(lambda h: jnp.cumprod(h, 1), BT), {"w1"}),
    "cummax_time": (_plain(lambda h: lax.cummax(h, 1), BT), {"w1"}),
    "cumlogsumexp_time": (_plain(lambda h: lax.cumlogsumexp(h, 1), BT), {"w1"}),
    "sort_time": (_plain(lambda h: jnp.sort(h, 1), BT), {"w1"}),
    "sort_batch": (_plain(lambda h: jnp.sort(h, 0), BD), {"w1"}),
    "top_k_time": (_plain(lambda h: lax.top_k(jnp.swapaxes(h, 1, 2), 2)[0].reshape(
        h.shape[0], -1), BT), {"w1"}),
    "pad_zero_time": (_plain(lambda h: jnp.pad(h, ((0, 0), (1, 2), (0, 0))), BT), {"w1"}),
    "pad_zero_batch": (_plain(lambda h: jnp.pad(h, ((1, 0), (0, 0))), BD), {"w1"}),
    "pad_reflect_time": (_plain(lambda h: jnp.pad(h, ((0, 0), (1, 2), (0, 0)), "reflect"), BT),
                         {"w1"}),
    "pad_wrap_time": (_plain(lambda h: jnp.pad(h, ((0, 0), (1, 2), (0, 0)), "wrap"), BT), {"w1"}),
    "roll_time": (_plain(lambda h: jnp.roll(h, 1, 1), BT), {"w1"}),
    "flip_time": (_plain(lambda h: jnp.flip(h, 1), BT), {"w1"}),
    "flip_batch": (_plain(lambda h: jnp.flip(h, 0), BD), {"w1"}),
    "repeat_time": (_plain(lambda h: jnp.repeat(h, 2, 1), BT), {"w1"}),
    "repeat_units": (_plain(lambda h: jnp.repeat(h, 2, -1), BT), {"w1"}),
    "slice_time": (_plain(lambda h: h[:, 1:] - h[:, :-1], BT), {"w1"}),
    "take_time": (_plain(lambda h: jnp.take(h, _IDX_T, axis=1), BT), {"w1"}),
    "fancy_index_time": (_plain(lambda h: h[:, _IDX_T], BT), {"w1"}),
    "fancy_index_batch": (_plain(lambda h: h[jnp.array([3, 0, 1])], BD), {"w1"}),
    "dynamic_slice_time": (_plain(lambda h: lax.dynamic_slice_in_dim(h, 1, 3, 1), BT), {"w1"}),
    "dynamic_update_slice_time": (_plain(lambda h: lax.dynamic_update_slice_in_dim(
        h, 2 * h[:, :2], 1, 1), BT), {"w1"}),
    "where_data": (_plain(lambda h: jnp.where(h > 0.1, h, 0.0), BT), {"w1"}),
    "where_time_mask": (_plain(lambda h: jnp.where(
        jnp.arange(h.shape[1])[None, :, None] < 3, h, 0.0), BT), {"w1"}),
    "clip": (_plain(lambda h: jnp.clip(h, -0.5, 0.5), BT), {"w1"}),
    "select_n": (_plain(lambda h: lax.select_n(h > 0, h, -h), BT), {"w1"}),
    "reduce_precision": (_plain(lambda h: lax.reduce_precision(h, 5, 10), BT), {"w1"}),
    "avg_pool_time": (_plain(lambda h: lax.reduce_window(
        h, 0.0, lax.add, (1, 2, 1), (1, 2, 1), "VALID") / 2, BT), {"w1"}),
    "max_pool_time": (_plain(lambda h: lax.reduce_window(
        h, -jnp.inf, lax.max, (1, 3, 1), (1, 1, 1), "SAME"), BT), {"w1"}),
    "einsum_batch_dims": (_plain(lambda h: jnp.einsum("bth,bsh->bth", h, h), BT), {"w1"}),
    "norm_time": (_plain(lambda h: h / (jnp.linalg.norm(h, axis=1, keepdims=True) + 1e-3), BT),
                  {"w1"}),
    "softmax_time": (_plain(lambda h: jax.nn.softmax(h, 1), BT), {"w1"}),
    "log_softmax_time": (_plain(lambda h: jax.nn.log_softmax(h, 1), BT), {"w1"}),
    "one_hot_argmax_time": (_plain(lambda h: jax.nn.one_hot(
        jnp.argmax(h, 1), h.shape[1], axis=1) * h, BT), {"w1"}),
    "outer": (_plain(lambda h: jax.vmap(jnp.outer)(h, h).reshape(h.shape[0], -1), BD), {"w1"}),
    "kron": (_plain(lambda h: jax.vmap(jnp.kron)(h, h), BD), {"w1"}),
    "stop_gradient": (_plain(lax.stop_gradient, BT), {"w1"}),
    "checkpoint": (_plain(jax.checkpoint(lambda h: jnp.sin(h) * h), BT), {"w1"}),
    "fori_loop": (_plain(lambda h: lax.fori_loop(0, 3, lambda i, a: jnp.tanh(a) + a, h), BT),
                  {"w1"}),
    "relu": (_plain(jax.nn.relu, BT), {"w1"}),
    "gelu": (_plain(jax.nn.gelu, BT), {"w1"}),
    "silu": (_plain(jax.nn.silu, BT), {"w1"}),
    "custom_vjp": (_plain(_sin_vjp, BT), {"w1"}),
    "custom_jvp": (_plain(_double_tanh, BT), {"w1"}),
    "conv_same": (_conv("same"), {"w1", "k"}),
    "conv_rhs_dilated": (_conv("rhs_dilated"), {"w1", "k"}),
    "conv_lhs_dilated": (_conv("lhs_dilated"), {"w1", "k"}),
    "conv_transpose": (_conv("transpose"), {"w1", "k"}),
    "causal_attention": ((_causal_attention, _attention_params, BT), {"w1", "wq", "wv"}),
}

_NOT_ZERO = "reduced over by reduce_sum where a masked unit is not shown to be zero"

# Cases refusing the layer: name -> (model, what explain() says of w1's units).
_REFUSED = {
    "cumsum_units": (_plain(lambda h: jnp.cumsum(h, -1), BT), "accumulated along by cumsum"),
    "cumprod_units": (_plain(lambda h: jnp.cumprod(h, -1), BT), "accumulated along by cumprod"),
    "cummax_units": (_plain(lambda h: lax.cummax(h, 2), BT), "accumulated along by cummax"),
    "cumlogsumexp_units": (_plain(lambda h: lax.cumlogsumexp(h, 2), BT),
                           "accumulated along by cumlogsumexp"),
    "sort_units": (_plain(lambda h: jnp.sort(h, -1), BT), "sorted along by sort"),
    "argsort_units": (_plain(lambda h: jnp.take_along_axis(h, jnp.argsort(h, -1), -1), BT),
                      "sorted along by sort"),
    "pad_zero_units": (_plain(lambda h: jnp.pad(h, ((0, 0), (0, 0), (1, 2))), BT),
                       "indexed along by pad"),
    "pad_edge_units": (_plain(lambda h: jnp.pad(h, ((0, 0), (0, 0), (1, 2)), "edge"), BT),
                       "indexed along by slice"),
    "pad_reflect_units": (_plain(lambda h: jnp.pad(h, ((0, 0), (0, 0), (1, 2)), "reflect"), BT),
                          "indexed along by slice"),
    "roll_units": (_plain(lambda h: jnp.roll(h, 1, -1), BT), "indexed along by slice"),
    "flip_units": (_plain(lambda h: jnp.flip(h, -1), BT), "indexed along by rev"),
    "tile_time": (_plain(lambda h: jnp.tile(h, (1, 2, 1)), BT), "repeated by tile"),
    "tile_units": (_plain(lambda h: jnp.tile(h, (1, 1, 2)), BT), "repeated by tile"),
    "take_units": (_plain(lambda h: jnp.take(h, _IDX_U, axis=2), BT), "gathered from by gather"),
    "fancy_index_units": (_plain(lambda h: h[..., _IDX_U], BT), "gathered from by gather"),
    "dynamic_slice_units": (_plain(lambda h: lax.dynamic_slice_in_dim(h, 1, 3, 2), BT),
                            "indexed along by dynamic_slice"),
    "scatter_set_units": (_plain(lambda h: h.at[..., 1:3].set(0.0), BT), "written into by scatter"),
    "scatter_add_units": (_plain(lambda h: h.at[..., jnp.array([0, 0, 3])].add(1.0), BT),
                          "written into by scatter-add"),
    "where_units_mask": (_plain(lambda h: jnp.where(jnp.arange(h.shape[2]) < 3, h, 0.0), BT),
                         "indexed along by iota"),
    "max_pool_units": (_plain(lambda h: lax.reduce_window(
        h, -jnp.inf, lax.max, (1, 1, 2), (1, 1, 2), "VALID"), BT), "pooled over by"),
    "reduce_own_function_units": (_plain(lambda h: lax.reduce(
        h, jnp.asarray(0.0, h.dtype), lambda a, b: a + b * b, (2,))[..., None], BT),
        "reduced over by reduce (lax.reduce)"),
    # a variance of h - mean: a masked unit's term is mean ** 2, which compacting drops
    "two_pass_layer_norm_units": (_plain(lambda h: (h - h.mean(-1, keepdims=True)) * lax.rsqrt(
        jnp.mean(jnp.square(h - h.mean(-1, keepdims=True)), -1, keepdims=True) + 1e-5), BT),
        _NOT_ZERO),
    # an outer product h_i * sigmoid(h_j) summed over j: h is zero at a masked i, not at a
    # masked j (sigmoid(0) = 0.5), so a masked unit adds 0.5 * h_i (it was followed: 2.2 off)
    "outer_product_units": (_plain(
        lambda h: (h[..., :, None] * jax.nn.sigmoid(h)[..., None, :]).sum(-1), BT),
        _NOT_ZERO),
    # jnp.where(h < -0.2, h, 5.0) picks 5.0 at h = 0: a masked unit adds 25 to the sum
    "where_picks_a_constant_at_zero_rms_units": (_plain(
        lambda h: rms_norm(jnp.where(h < -0.2, h, 5.0)), BT), _NOT_ZERO),
    # values known at a masked unit but not zero there: sigmoid(0) - 0.4, cos(0), a where
    # picking 3.0 where exp(0) = 1 > 0.5, and h / |h|, which is 0 / 0 there
    "off_centre_sigmoid_rms_units": (_plain(lambda h: rms_norm(jax.nn.sigmoid(h) - 0.4), BT),
                                     _NOT_ZERO),
    "cos_rms_units": (_plain(lambda h: rms_norm(jnp.cos(h)), BT), _NOT_ZERO),
    "where_on_exp_picks_a_constant_rms_units": (_plain(
        lambda h: rms_norm(jnp.where(jnp.exp(h) > 1.5, h, 3.0)), BT), _NOT_ZERO),
    "zero_over_zero_rms_units": (_plain(lambda h: rms_norm(h / jnp.abs(h)), BT), _NOT_ZERO),
    # (found by a probe: all were offered, compacting off by 0.2-3 from masking) a take whose
    # out-of-range index reads 1.0; values NumPy computes to 0 where XLA gives 1e-8, which sign
    # or a comparison turns into +-1: tanh(0.3) in and out of a jit, a subnormal XLA flushes;
    # 0 times log(0) = -inf, and 0 over a value that may be 0 (NaN in the masked network)
    "take_fill_one_time_rms_units": (_plain(lambda h: rms_norm(
        h.at[:, jnp.array([0, 7, 2])].get(mode="fill", fill_value=1.0)), BT), _NOT_ZERO),
    "sign_of_shifted_tanh_rms_units": (_plain(
        lambda h: rms_norm(jnp.sign(jnp.tanh(h + 0.3) - jnp.tanh(0.3))), BT), _NOT_ZERO),
    "where_on_shifted_tanh_rms_units": (_plain(lambda h: rms_norm(
        jnp.where(jnp.tanh(h + 0.3) >= float(np.tanh(np.float32(0.3))), 0.0, 1.0)), BT),
        _NOT_ZERO),
    "sign_of_subnormal_shift_rms_units": (_plain(lambda h: rms_norm(jnp.sign(
        (h + 1e-40) * 1e30 - float(np.float32(1e-40) * np.float32(1e30)))), BT), _NOT_ZERO),
    "zero_times_log_zero_rms_units": (_plain(lambda h: rms_norm(h * jnp.log(jnp.abs(h))), BT),
                                      _NOT_ZERO),
    # (a second probe) 0 times a value not known at a masked unit but infinite or NaN there
    "zero_times_sqrt_of_negative_rms_units": (_plain(
        lambda h: rms_norm(h * jnp.sqrt(h * h - 1e-6)), BT), _NOT_ZERO),
    "zero_times_lgamma_rms_units": (_plain(lambda h: rms_norm(h * lax.lgamma(h)), BT), _NOT_ZERO),
    "zero_times_overflowing_exp_rms_units": (_plain(
        lambda h: rms_norm(h * jnp.exp(88.8 - 1000.0 * h * h)), BT), _NOT_ZERO),
    "zero_over_maybe_zero_rms_units": (_plain(lambda h: rms_norm(
        h / (jnp.abs(h) + jax.nn.relu(h.sum(-1, keepdims=True)))), BT), _NOT_ZERO),
    # (a third probe) 0 times a negative power of a value zero there; an overflow at a masked
    # unit in float32 (it raised in trace); the maximum of an empty slice is -inf, not exp(0)
    "zero_times_negative_power_rms_units": (_plain(
        lambda h: rms_norm(h * (jnp.sin(h + 1.5707964) - 1.0) ** -2), BT), _NOT_ZERO),
    "overflow_at_a_masked_unit_rms_units": (_plain(
        lambda h: rms_norm(jnp.exp(h) * 1e38 * 10.0 - 1), BT), _NOT_ZERO),
    "max_of_empty_slice_rms_units": (_plain(lambda h: rms_norm(jnp.clip(lax.reduce_max(
        jnp.exp(h)[:, :0], (1,)), -5, 5)[:, None, :] - 1 + 0 * h), BT), _NOT_ZERO),
    # (a running product along time is not followed, though exp(0) ** t - 1 is 0 too)
    "cumprod_exp_minus_one_time_rms_units": (_plain(
        lambda h: rms_norm(jnp.cumprod(jnp.exp(h), 1) - 1.0), BT), _NOT_ZERO),
    # a cast that rounds (1.5 to int32 is 1) was read as the value it casts (a probe's finding)
    "exp_times_one_and_half_minus_its_int_cast_rms_units": (_plain(lambda h: rms_norm(
        jnp.exp(h) * _ONE_AND_HALF - _ONE_AND_HALF.astype(jnp.int32).astype(jnp.float32)), BT),
        _NOT_ZERO),
    # 0 * (1 + inf i) is NaN, though its real part is finite (a probe's finding)
    "zero_times_complex_inf_rms_units": (_plain(lambda h: rms_norm(
        jnp.tanh(jnp.imag(h.astype(jnp.complex64) * _I_INF))), BT), _NOT_ZERO),
    "exp_minus_closed_over_near_one_rms_units": (_plain(
        lambda h: rms_norm(jnp.exp(h) - _NEAR_ONE), BT), _NOT_ZERO),
    "linf_norm_of_relu_times_closed_over_negative_units": (_plain(lambda h: (lambda a: a / (
        jnp.max(a, -1, keepdims=True) + 1e-3))(jax.nn.relu(h) * (_HALF - 1)), BT),
        "reduced over by reduce_max"),
    # (a probe's findings) a contraction keeping the units on a batch axis took 0 * log(0) as
    # 0 (an einsum, a dot_general: the masked network was NaN everywhere); an integer cast that
    # wraps (|h| * 200 cast to int8: 150 is -106) was taken to keep abs never negative, so a
    # masked unit's 0 became the maximum (6.8 off)
    "dot_general_zero_times_log_zero_rms_units": (_plain(lambda h: rms_norm(lax.dot_general(
        h[..., None], jnp.log(jnp.abs(h))[..., None], (((3,), (3,)), ((0, 1, 2), (0, 1, 2))))),
        BT), _NOT_ZERO),
    "einsum_zero_times_log_zero_rms_units": (_plain(lambda h: rms_norm(jnp.einsum(
        "bth,bthk->bthk", h, jnp.log(jnp.abs(h))[..., None] * jnp.ones((1, 1, 1, 2))).sum(-1)),
        BT), _NOT_ZERO),
    "linf_norm_of_wrapped_int_cast_units": (_plain(lambda h: h / (jnp.abs(jnp.max(
        (jnp.abs(h) * 200).astype(jnp.int32).astype(jnp.int8), -1, keepdims=True)).astype(
            jnp.float32) + 1), BT), "reduced over by reduce_max"),
    # (and an integer product that wraps: 250 * 250 in int16 is -3036)
    "linf_norm_of_int16_square_that_wraps_units": (_plain(lambda h: (lambda u: h / (jnp.max(
        u * u, -1, keepdims=True).astype(jnp.float32) + 1))((jax.nn.relu(h) * 250).astype(
            jnp.uint8).astype(jnp.int16)), BT), "reduced over by reduce_max"),
    "max_of_tanh_units": (_plain(lambda h: h - jnp.max(h, -1, keepdims=True), BT),
                          "reduced over by reduce_max"),
    "sum_of_exp_units": (_plain(lambda h: h / jnp.exp(h).sum(-1, keepdims=True), BT), _NOT_ZERO),
    "softmax_units": (_plain(lambda h: jax.nn.softmax(h, -1), BT), "reduced over by reduce_max"),
    "log_softmax_units": (_plain(lambda h: jax.nn.log_softmax(h, -1), BT),
                          "reduced over by reduce_max"),
    "one_hot_argmax_units": (_plain(lambda h: jax.nn.one_hot(jnp.argmax(h, -1), h.shape[-1]) * h,
                                    BT), "reduced over by argmax"),
    "cond": (_plain(lambda h: lax.cond(h.sum() > 0, lambda a: 2 * a, lambda a: -a, h), BT),
             "used by cond (not followed)"),
    "switch": (_plain(lambda h: lax.switch((h.sum() > 0).astype(jnp.int32),
                                           [lambda a: 2 * a, lambda a: -a], h), BT),
               "used by cond (not followed)"),
    "while_loop": (_plain(lambda h: lax.while_loop(
        lambda c: c[0] < 3, lambda c: (c[0] + 1, jnp.tanh(c[1])), (0, h))[1], BT),
        "used by while (not followed)"),
}


# Found by this sweep and fixed: a slice of the batch kept its traced bounds at another batch
# size (the compacted target returned the traced count of rows, silently), and
# dynamic_update_slice did not tie its update's axes to the operand's (the group was accepted
# and its compacted target raised; or, writing h into a buffer, the units were lost).
_SLICED = r"slices axis 0 \(of size 4 when traced, 7"
_ROWS = r"At a batch of 7 \(input 0, axis 0; traced with 4\) the function's first output keeps 4"
_FIXED = {   # name: (model, groups, the TraceError at another batch size, or None: it runs)
    "slice_batch": (_plain(lambda h: h[1:] - h[:-1], BD), {"w1"}, _SLICED),
    # an empty slice of the time axis raised a ZeroDivisionError in trace (a probe's finding)
    "empty_slice_time": (_plain(lambda h: h[:, :0].sum(1, keepdims=True) + h, BT), {"w1"}, None),
    # complex values, and a NaN cast to an integer, raised in trace (a second probe's findings)
    "complex_exp_minus_one_rms_units": (_plain(lambda h: jnp.real(_complex_rms(
        jnp.exp(h.astype(jnp.complex64)) - 1)), BT), set(), None),
    "int_cast_of_inf_rms_units": (_plain(lambda h: rms_norm(
        jnp.tanh(h) + (1.0 / h).astype(jnp.int32)), BT), set(), None),
    # a sort's operands are sorted together (a probe's findings): sorted by another layer, the
    # two layers were two groups and compact paired the wrong units; by keys broadcast from a
    # constant, compact raised (the keys kept the traced width)
    "sorted_by_another_layer_time": ((_sorted_by_another_layer, _two_layer_params, BT), {"w1"},
                                     None),
    "sorted_by_constant_keys_time": (_plain(lambda h: lax.sort(
        (jnp.broadcast_to(_TIME_KEYS, h.shape), h), dimension=1, num_keys=1)[1], BT), {"w1"},
        None),
    "roll_batch": (_plain(lambda h: jnp.roll(h, 1, 0), BD), {"w1"}, _SLICED),
    "dynamic_update_slice_zeros_time": (_plain(
        lambda h: lax.dynamic_update_slice_in_dim(h, jnp.zeros_like(h[:, :2]), 1, 1), BT),
        {"w1"}, None),
    "dynamic_update_slice_into_buffer_time": (_plain(
        lambda h: lax.dynamic_update_slice_in_dim(
            jnp.zeros(h.shape[:1] + (7,) + h.shape[2:]), h, 1, 1), BT), {"w1"}, None),
    # scatter (h.at[...].set) and scatter-add (segment_sum) were refused even along time or
    # the nodes; the units, written whole, are followed now. A graph's num_segments=x.shape[0]
    # is a number of the traced program: at another node count the output kept 4 rows.
    "scatter_set_time": (_plain(lambda h: h.at[:, 1:3].set(0.0), BT), {"w1"}, None),
    "segment_sum_nodes": ((_message_passing, _graph_params, BD), {"w1"}, _ROWS),
    # take_along_axis pairs the batch and the units of h and the indices (gather's batching
    # dims), which were refused: each unit stays a unit.
    "take_along_axis_time": (_plain(
        lambda h: jnp.take_along_axis(h, _along_time(_IDX_T, h), 1), BT), {"w1"}, None),
    # jnp.pad's 'edge' mode slices the first and last entry of every axis (the units' too)
    # and broadcasts the ones it does not pad to width 0: those unused slices were read as
    # cuts of the units, so edge padding along time was refused.
    "pad_edge_time": (_plain(lambda h: jnp.pad(h, ((0, 0), (1, 2), (0, 0)), "edge"), BT),
                      {"w1"}, None),
    # A reduce_window or lax.reduce whose init value is an array made in the function is the
    # generic primitive with a body over scalars: the group was offered and its compacted
    # target refused to run (the body was taken for a loop keeping its shapes); lax.reduce
    # was not followed at all. Both are followed now; over the units they are refused.
    "reduce_window_array_init_time": (_plain(lambda h: lax.reduce_window(
        h, jnp.asarray(0.0, h.dtype), lax.add, (1, 2, 1), (1, 2, 1), "VALID"), BT), {"w1"}, None),
    "reduce_window_array_init_max_time": (_plain(lambda h: lax.reduce_window(
        h, jnp.asarray(-jnp.inf, h.dtype), lax.max, (1, 3, 1), (1, 1, 1), "SAME"), BT),
        {"w1"}, None),
    "reduce_own_function_time": (_plain(lambda h: lax.reduce(
        h, jnp.asarray(0.0, h.dtype), lambda a, b: a + b * b, (1,)), BT), {"w1"}, None),
    "reduce_two_operands_time": (_plain(lambda h: lax.reduce(
        (h, 2 * h), (jnp.asarray(0.0, h.dtype), jnp.asarray(-jnp.inf, h.dtype)),
        lambda a, b: (a[0] + b[0], jnp.maximum(a[1], b[1])), (1,))[1], BT), {"w1"}, None),
    "take_along_axis_of_its_own_order_time": (_plain(
        lambda h: jnp.take_along_axis(h, jnp.argsort(h, 1), 1)[:, -1], BT), {"w1"}, None),
}



def _traced(name, model):
  fn, make, shape = model
  rng = np.random.default_rng(sum(map(ord, name)))
  p, x = make(rng), _arr(rng, *shape)
  return fn, p, x, jaxprune.trace(fn, p, x), rng


def _check_compact_equals_masking(name, model, groups):
  """Every group masked at random (about half kept): the compacted target equals masking at the
  example's batch size and at another; at another sequence length it refuses."""
  fn, p, x, t, rng = _traced(name, model)
  assert set(t.groups) == groups, t.explain()
  um = jaxprune.unit_masks_ones(t)
  for g, grp in t.groups.items():
    um[g] = jnp.asarray(rng.permutation(grp.size) < grp.size // 2)
  small, small_t, _ = assert_compacts_as_masked(
      t, p, fn, um, (x, _arr(rng, x.shape[0] + 3, *x.shape[1:])), atol=1e-5)
  if len(x.shape) == 3:      # another sequence length: refused, as every input axis but the batch
    with pytest.raises(ValueError, match="only the batch may change"):
      small_t.apply(small, _arr(rng, x.shape[0], x.shape[1] + 2, x.shape[2]))


@pytest.mark.parametrize("name", list(_FOLLOWED))
def test_op_keeps_the_layer_and_compact_equals_masking(name):
  model, groups = _FOLLOWED[name]
  _check_compact_equals_masking(name, model, groups)


@pytest.mark.parametrize("name", list(_REFUSED))
def test_op_refuses_the_layer_and_says_why(name):
  model, why = _REFUSED[name]
  t = _traced(name, model)[3]
  assert "w1" not in t.groups
  (line,) = [l for l in t.explain().splitlines() if l.startswith("w1 ")]
  assert why in line.split("axis 1 ->")[1], line


@pytest.mark.parametrize("name", list(_FIXED))
def test_fixed_findings(name):
  """Slicing the batch in part, or an output made from the batch size as a number, raises at
  another batch size (it gave rows of the traced count); dynamic_update_slice and scatter tie
  their update to the operand, so the group is kept and compacts (it raised, or was lost)."""
  model, groups, error = _FIXED[name]
  if error is None:
    _check_compact_equals_masking(name, model, groups)
    return
  fn, p, x, t, rng = _traced(name, model)
  assert set(t.groups) == groups
  um = {g: jnp.asarray(rng.permutation(grp.size) < grp.size // 2) for g, grp in t.groups.items()}
  small, small_t, _ = assert_compacts_as_masked(t, p, fn, um, (x,), atol=1e-5)
  with pytest.raises(jaxprune.TraceError, match=error):
    small_t.apply(small, _arr(rng, 7, D))


def test_an_input_padded_in_edge_mode_compacts_and_runs_at_any_batch_size():
  """A conv net whose input is padded in 'edge' mode (PyTorch's replicate padding): its
  compacted target failed with a TraceError even at the example's batch size (a reshape to an
  axis of 0 read it as 1), and the batch's unused edge slices would have kept its size."""
  rng = np.random.default_rng(3)
  p = {"w1": _arr(rng, 3, 3, 2, 4), "w2": _arr(rng, 4, 2)}

  def fn(p, x):
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), "edge")
    h = lax.conv_general_dilated(x, p["w1"], (1, 1), "VALID",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.tanh(h).mean((1, 2)) @ p["w2"]

  x = _arr(rng, 4, 6, 6, 2)
  t = jaxprune.trace(fn, p, x)
  assert set(t.groups) == {"w1"}
  assert_compacts_as_masked(t, p, fn, {"w1": jnp.asarray([True, False, True, False])},
                            (x, x[:3], _arr(rng, 9, 6, 6, 2)), atol=1e-5)


def test_an_output_with_the_batch_on_a_later_axis_runs_at_any_batch_size():
  """A first output laid out (classes, N), traced with as many examples as classes: its leading
  axis had the traced batch's size by chance, and the batch check refused every other batch
  size (it took the classes for rows made from the batch size as a number). The leading axis
  is the readout's columns, a param's axis, so its size is known. An output of N rows made
  from the batch size as a number, with the batch on its axis 1, still raises."""
  rng = np.random.default_rng(4)
  p = {"w1": _arr(rng, D, H), "w2": _arr(rng, H, 4)}

  def fn(p, x):
    return (jnp.tanh(x @ p["w1"]) @ p["w2"]).T

  x = _arr(rng, 4, D)
  t = jaxprune.trace(fn, p, x)
  assert set(t.groups) == {"w1"}
  um = {"w1": jnp.asarray([True, False, True, True, False, True])}
  masked = jaxprune.apply_masks(p, jaxprune.expand(p, t, um))
  small, small_t = t.compact(masked, um)
  for xx in (x, x[:3], _arr(rng, 9, D)):
    np.testing.assert_allclose(t.apply(masked, xx), fn(masked, xx), atol=1e-5)
    np.testing.assert_allclose(small_t.apply(small, xx), fn(masked, xx), atol=1e-5)

  def rows_of_the_batch_size(p, x):
    h = jnp.tanh(x @ p["w1"])
    s = jax.ops.segment_sum(h, jnp.argmax(x, axis=1), num_segments=x.shape[0])
    return (s @ p["w1"].T @ p["w1"]) @ h.T                   # (N as a number, N)

  t = jaxprune.trace(rows_of_the_batch_size, p, x)
  small, small_t = t.compact(p, {})
  np.testing.assert_allclose(small_t.apply(small, x), rows_of_the_batch_size(p, x), atol=1e-5)
  with pytest.raises(jaxprune.TraceError, match="first output keeps 4 rows"):
    small_t.apply(small, _arr(rng, 7, D))


def test_a_reshape_across_a_layers_atoms_keeps_the_batch_axis():
  """(B, 6) read as (B, 2, 3) where the 6 are (3 heads x 2) or a depthwise conv's (3 channels
  x 2 outputs): the axes were refused as units (rightly), but every axis of the reshape got
  fresh atoms, the batch's too, so the re-evaluated program kept the traced batch and failed in
  XLA's verifier at any other batch size (the compacted target and ``activations`` alike)."""
  rng = np.random.default_rng(0)

  def heads(p, x):
    h = jnp.tanh(jnp.einsum("bf,fhd->bhd", x, p["k"])).reshape(x.shape[0], 6)
    return jnp.tanh(h.reshape(x.shape[0], 2, 3).mean(-1) @ p["w1"] + p["b1"]) @ p["w2"]

  def multiplier(p, x):
    h = lax.conv_general_dilated(x, p["dw"], (1, 1), "SAME", feature_group_count=3,
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))   # (B, 4, 4, 6)
    z = h.reshape(h.shape[:-1] + (2, 3)).mean((1, 2, 4))
    return jnp.tanh(z @ p["w1"] + p["b1"]) @ p["w2"]

  for fn, extra, shape in [(heads, {"k": _arr(rng, 4, 3, 2)}, (4,)),
                           (multiplier, {"dw": _arr(rng, 3, 3, 1, 6)}, (4, 4, 3))]:
    p = {**extra, "w1": _arr(rng, 2, 5), "b1": _arr(rng, 5), "w2": _arr(rng, 5, 3)}
    t = jaxprune.trace(fn, p, _arr(rng, 3, *shape))
    assert set(t.groups) == {"w1"}
    assert "split unevenly by a reshape" in t.explain()
    xs = [_arr(rng, b, *shape) for b in (3, 5, 1)]
    assert_compacts_as_masked(t, p, fn, {"w1": jnp.asarray([True, False, True, True, False])},
                              xs, atol=1e-5)
    for x in xs:
      assert t.activations(p, x, "w1").shape == (x.shape[0], 5)


def test_a_deleted_closed_over_array_leaves_trace_to_run():
  """trace read the values of every closed-over constant, and a deleted (or donated) one made
  it raise 'Array has been deleted' (a probe's finding); its values are not read now."""
  rng = np.random.default_rng(5)
  gone = jnp.ones(1) * 2.0
  gone.delete()
  fn, make, shape = _plain(lambda h: jnp.exp(h) - gone, BT)
  t = jaxprune.trace(fn, make(rng), _arr(rng, *shape))
  assert set(t.groups) == {"w1"}
