"""Attention math of the decoder: rotary position embeddings and softmax attention.

Pure functions of arrays, shared by every model family (``decoder.py``):

- RoPE (Su et al., 2021) in the rotate-half layout of transformers' Gemma,
  Llama and Qwen code, with an optional rescaling of its frequencies
  (``decoder_config.RopeScaling``: linear, or Llama 3's);
- grouped-query softmax attention with an optional tanh cap on its logits
  (Gemma 2) and a hand-written backward pass (``attention``).

Axis legend (docs/ARCHITECTURE.md, "Axis letters"):
  B rows of one model call, T query tokens (this call's), S key/value
  positions, H head dim. Heads are written out: ``kv_heads`` key/value heads,
  each shared by ``group_size`` query heads (q_heads = kv_heads * group_size;
  query head kv * group_size + g reads kv head kv).
"""

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp

from moraljax.llm import decoder_config
from moraljax.llm import lora as lora_lib


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap); the identity when ``cap`` is None."""
    if cap is None:
        return x
    return cap * jnp.tanh(x / cap)


# ----------------------------------------------------------------------------
# Rotary position embeddings.


@flax.struct.dataclass
class Rotary:
    """Rotary-embedding tables of a batch of positions (shared by all layers of a type).

    Attributes:
        cos: float32 [B, T, 1, H/2], cos(position * inverse frequency i).
        sin: float32 [B, T, 1, H/2], the matching sines.
    """

    cos: jax.Array
    sin: jax.Array


def inverse_frequencies(
    head_dim: int, theta: float, scaling: decoder_config.RopeScaling | None = None
) -> jax.Array:
    """RoPE's inverse frequencies theta^(-2i/H), i < H/2, rescaled as ``scaling`` says.

    Llama 3's rescaling (``_compute_llama3_parameters`` in transformers)
    compares each frequency's wavelength 2 pi / f with the pre-training
    context C = original_max_position_embeddings: wavelengths below
    C / high_freq_factor keep f, those above C / low_freq_factor become
    f / factor, and those in between interpolate with
    s = (C / wavelength - low) / (high - low):  (1 - s) f / factor + s f.

    Returns:
        float32 [H/2].
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    context = scaling.original_max_position_embeddings
    low, high = scaling.low_freq_factor, scaling.high_freq_factor
    wavelength = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelength > context / low, inv_freq / scaling.factor, inv_freq)
    smooth = (context / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = ~(wavelength < context / high) & ~(wavelength > context / low)
    return jnp.where(is_medium, smoothed, scaled)


def rotary_tables(
    positions: jax.Array, head_dim: int, theta: float, scaling: decoder_config.RopeScaling | None = None
) -> Rotary:
    """The ``Rotary`` tables of int [B, T] positions for heads of size ``head_dim``.

    Computed once per forward pass and kept in memory: every layer and head
    uses the same angles (see ``lora.compute_once`` for why this needs doing
    on CPU).
    """
    inv_freq = inverse_frequencies(head_dim, theta, scaling)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos, sin = lora_lib.compute_once(jnp.cos(angles)), lora_lib.compute_once(jnp.sin(angles))
    return Rotary(cos=cos[:, :, None, :], sin=sin[:, :, None, :])


def apply_rotary(x: jax.Array, rotary: Rotary) -> jax.Array:
    """Rotary embedding with the rotate-half layout of transformers' models.

    Rotates [B, T, heads, H] by the tables of its positions; computed in
    float32, returned in the dtype of ``x``.
    """
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    cos, sin = rotary.cos, rotary.sin
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


# ----------------------------------------------------------------------------
# Attention core, with a hand-written backward pass.


def _batched_dot(lhs: jax.Array, rhs: jax.Array, lhs_contract: int, rhs_contract: int) -> jax.Array:
    """float32 dot over one axis of each operand, batched over axis 0 of both."""
    dims = (((lhs_contract,), (rhs_contract,)), ((0,), (0,)))
    return jax.lax.dot_general(lhs, rhs, dims, preferred_element_type=jnp.float32)


def _attention_rows(queries, keys, values, allowed):
    """Regroups the operands so that every matmul is a batched 2-D matmul.

    [B, T, kv_heads, group_size, H] queries -> [B*kv_heads, T*group_size, H]
    (row t * group_size + g); [B, S, kv_heads, H] keys and values ->
    [B*kv_heads, S, H]; bool [B, T, S] -> [B*kv_heads, T*group_size, S]. The
    queries of one kv head become the rows of one matrix, so logits and
    probabilities are [B*kv_heads, T*group_size, S] arrays whose last
    (contiguous) axis is the softmax axis. With one kv head every regrouping
    is a free reshape.
    """
    batch, length, kv_heads, group_size, head_dim = queries.shape
    capacity = keys.shape[1]
    rows = batch * kv_heads
    q = jnp.swapaxes(queries, 1, 2).reshape(rows, length * group_size, head_dim)
    k = jnp.swapaxes(keys, 1, 2).reshape(rows, capacity, head_dim)
    v = jnp.swapaxes(values, 1, 2).reshape(rows, capacity, head_dim)
    return q, k, v, _row_mask(allowed, kv_heads, group_size)


def _row_mask(allowed: jax.Array, kv_heads: int, group_size: int) -> jax.Array:
    """bool [B, T, S] -> [B*kv_heads, T*group_size, S], the layout of ``_attention_rows``."""
    batch, length, capacity = allowed.shape
    mask = jnp.broadcast_to(allowed[:, None, :, None, :], (batch, kv_heads, length, group_size, capacity))
    return mask.reshape(batch * kv_heads, length * group_size, capacity)


def _from_rows(rows: jax.Array, batch: int, kv_heads: int, group_size: int) -> jax.Array:
    """[B*kv_heads, T*group_size, H] -> [B, T, kv_heads, group_size, H] (inverse of the query regrouping)."""
    return jnp.swapaxes(rows.reshape(batch, kv_heads, -1, group_size, rows.shape[-1]), 1, 2)


def _attention_forward(queries, keys, values, allowed, query_scale, logit_cap):
    """Forward pass of ``attention``; also returns what the backward pass needs."""
    batch, length, kv_heads, group_size, head_dim = queries.shape
    q, k, v, mask = _attention_rows(queries, keys, values, allowed)
    scaled = _batched_dot(q, k, 2, 2) * query_scale  # [B*kv_heads, T*group_size, S]
    tanh = None if logit_cap is None else jnp.tanh(scaled / logit_cap)
    capped = scaled if tanh is None else logit_cap * tanh
    # A finite floor (not -inf) keeps fully masked rows (padding queries)
    # finite: they become uniform and are never read.
    logits = jnp.where(mask, capped, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = _batched_dot(probs.astype(values.dtype), v, 2, 1)  # [B*kv_heads, T*group_size, H] float32
    result = _from_rows(out, batch, kv_heads, group_size)
    return result.astype(values.dtype), (q, k, v, allowed, probs, tanh, out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def attention(
    queries: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    allowed: jax.Array,
    query_scale: float,
    logit_cap: float | None,
) -> jax.Array:
    """Grouped-query softmax attention with an optional logit softcap (Gemma 2).

        z = (q . k) * query_scale,  c = cap_logit_cap(z)   (float32)
        p = softmax over allowed keys of c,  out = p v

    The backward pass is written out (FlashAttention's identities, Dao et
    al. 2022) instead of derived by autodiff:

        dp = dout v^T,  row_dot = rowsum(dout * out) = rowsum(dp * p),
        dc = p * (dp - row_dot),  dz = dc * (1 - tanh^2) * query_scale on allowed
        keys (0 elsewhere),  dq = dz k,  dk = dz^T q,  dv = p^T dout.

    It gives the same gradients up to float rounding but runs several times
    faster on XLA:CPU: the autodiff version transposed the [T, S] arrays
    inside elementwise fusions and reduced over them twice, which cost far
    more than the matmuls.

    Args:
        queries: [B, T, kv_heads, group_size, H] rotated queries (query head
            kv * group_size + g at [:, :, kv, g]).
        keys: [B, S, kv_heads, H] rotated keys.
        values: [B, S, kv_heads, H].
        allowed: bool [B, T, S], which keys each query may see.
        query_scale: static factor on q . k (``DecoderConfig.query_scale``).
        logit_cap: static softcap of the attention logits, or None.

    Returns:
        [B, T, kv_heads, group_size, H] in the dtype of ``values``.
    """
    return _attention_forward(queries, keys, values, allowed, query_scale, logit_cap)[0]


def _attention_bwd(query_scale, logit_cap, saved, d_result):
    q, k, v, allowed, probs, tanh, out = saved
    batch, length, kv_heads, group_size, head_dim = d_result.shape
    value_dtype = v.dtype
    d_out = jnp.swapaxes(d_result, 1, 2).reshape(out.shape).astype(jnp.float32)
    mask = _row_mask(allowed, kv_heads, group_size)
    row_dot = jnp.sum(d_out * out, axis=-1, keepdims=True)  # [B*kv_heads, T*group_size, 1]
    d_probs = _batched_dot(d_out.astype(value_dtype), v, 2, 2)  # [B*kv_heads, T*group_size, S]
    d_capped = probs * (d_probs - row_dot)
    d_scaled = d_capped if tanh is None else d_capped * (1.0 - tanh * tanh)
    d_z = jnp.where(mask, d_scaled, 0.0) * query_scale
    d_q = _batched_dot(d_z, k.astype(jnp.float32), 2, 1)  # [B*kv_heads, T*group_size, H]
    d_k = _batched_dot(d_z, q.astype(jnp.float32), 1, 1)  # [B*kv_heads, S, H]
    d_v = _batched_dot(probs.astype(value_dtype), d_out.astype(value_dtype), 1, 1)  # [B*kv_heads, S, H]
    d_queries = _from_rows(d_q, batch, kv_heads, group_size)
    d_keys = jnp.swapaxes(d_k.reshape(batch, kv_heads, -1, head_dim), 1, 2)
    d_values = jnp.swapaxes(d_v.reshape(batch, kv_heads, -1, head_dim), 1, 2)
    return d_queries.astype(q.dtype), d_keys.astype(k.dtype), d_values.astype(value_dtype), None


attention.defvjp(_attention_forward, _attention_bwd)


