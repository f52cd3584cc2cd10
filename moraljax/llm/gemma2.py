"""Gemma-2 decoder in Flax NNX, with LoRA adapters and a value head (the policy).

Follows transformers' ``Gemma2ForCausalLM`` (Gemma Team, "Gemma 2", 2024) so
that logits agree with it on the same Hugging Face files (tests/gemma2_test.py):

    x_0 = E[tokens] * sqrt(D)                         (in the compute dtype)
    per layer l (sliding-window attention where config.layer_types says so):
      h   = x + post_attn_norm(Attn(input_norm(x)))
      x'  = h + post_ffw_norm(W_down(gelu_tanh(W_gate n) * W_up n)),
            n = pre_ffw_norm(h)
    hidden = final_norm(x_L)                          (float32)
    logits = cap_30(hidden E^T)                       (tied LM head)
  with RMSNorm(x) = x / sqrt(mean(x^2) + eps) * (1 + w) computed in float32,
  attention logits cap_50(q.k * query_pre_attn_scalar^-1/2), cap_c(z) =
  c tanh(z / c), rotary position embeddings (rope_theta) and grouped-query
  attention (K kv heads shared by N/K query heads each).

Dtype policy: the frozen parameters are bfloat16 or float32 (``param_dtype``)
and set the compute dtype of the residual stream and matmuls; norms,
attention logits, softmax, final hidden state, logits and values are float32.
LoRA factors and the value head are always float32 (see ``lora.py``).

Padding is on the LEFT. ``attention_mask`` [B, T] marks real tokens (1) and
padding (0); positions are ``clip(cumsum(mask) - 1, 0)`` as in transformers'
``generate``. The causal and sliding-window masks work on sequence slots (the
index in the padded sequence), exactly as transformers does; with left
padding a slot difference equals a position difference.

The decoder layers are stored stacked on a leading L axis and run with
``jax.lax.scan`` (one layer traced and compiled once, whatever the depth),
or as a Python loop for models of at most 4 layers.

Speed on CPU (launch/benchmark_train.py): matmuls see 2-D [rows, features]
operands; attention has a hand-written backward pass (``attention``); the
rotary tables are computed once per call; callers that read only the last
few hidden states (prefill, scoring) skip the rest of the last layer
(``num_outputs``). Each of these is exact up to float rounding.

Axis legend:
  B batch, T query length (tokens in this call), S key length (cache
  capacity, or T without a cache), N query heads, K kv heads, G query heads
  per kv head (N / K), H head dim, D model dim, F mlp dim, V vocab, L layers,
  R LoRA rank.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moraljax.llm import lora as lora_lib

SLIDING = "sliding_attention"
FULL = "full_attention"
_LAYER_TYPES = (SLIDING, FULL)
# Models with at most this many layers run their layer loop unrolled.
_MAX_UNROLLED_LAYERS = 4


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _is_positive_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
    """Architecture of a Gemma-2 model, in transformers' field names.

    Attributes:
        vocab_size: V.
        hidden_size: D.
        intermediate_size: F.
        num_hidden_layers: L.
        num_attention_heads: N.
        num_key_value_heads: K (divides N).
        head_dim: H.
        layer_types: per layer "sliding_attention" or "full_attention".
        sliding_window: window (in tokens, the query included) of sliding
            layers; None only when no layer slides.
        rope_theta: RoPE base frequency.
        rms_norm_eps: epsilon of every RMSNorm.
        query_pre_attn_scalar: queries are scaled by its -1/2 power (an int,
            as in transformers).
        attn_logit_softcapping: attention-logit cap (None: no cap).
        final_logit_softcapping: output-logit cap (None: no cap).
        max_position_embeddings: informational (RoPE has no table).
        pad_token_id, bos_token_id, eos_token_id: special token ids.
    """

    vocab_size: int = 256000
    hidden_size: int = 2304
    intermediate_size: int = 9216
    num_hidden_layers: int = 26
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    layer_types: tuple[str, ...] = tuple((SLIDING, FULL) * 13)
    sliding_window: int | None = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: int = 256
    attn_logit_softcapping: float | None = 50.0
    final_logit_softcapping: float | None = 30.0
    max_position_embeddings: int = 8192
    pad_token_id: int | None = 0
    bos_token_id: int | None = 2
    eos_token_id: int | tuple[int, ...] | None = 1

    def __post_init__(self):
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
            "query_pre_attn_scalar",
        ):
            value = getattr(self, name)
            if not _is_positive_int(value):
                raise ValueError(f"Gemma2Config.{name} must be a positive int, got {value!r}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"Gemma2Config.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})."
            )
        if self.head_dim % 2:
            raise ValueError(f"Gemma2Config.head_dim must be even for RoPE, got {self.head_dim}.")
        if not isinstance(self.layer_types, tuple) or len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"Gemma2Config.layer_types must be a tuple of {self.num_hidden_layers} entries "
                f"(num_hidden_layers), got {self.layer_types!r}."
            )
        bad = [t for t in self.layer_types if t not in _LAYER_TYPES]
        if bad:
            raise ValueError(f"Gemma2Config.layer_types has {bad}; allowed: {_LAYER_TYPES}.")
        if SLIDING in self.layer_types and not _is_positive_int(self.sliding_window):
            raise ValueError(
                f"Gemma2Config.sliding_window must be a positive int when a layer slides, "
                f"got {self.sliding_window!r}."
            )
        for name in ("rope_theta", "rms_norm_eps"):
            if not _is_positive_number(getattr(self, name)):
                raise ValueError(f"Gemma2Config.{name} must be a positive number, got {getattr(self, name)!r}.")
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and not _is_positive_number(value):
                raise ValueError(f"Gemma2Config.{name} must be a positive number or None, got {value!r}.")

    @property
    def is_sliding(self) -> tuple[bool, ...]:
        """Per layer, whether it uses sliding-window attention."""
        return tuple(t == SLIDING for t in self.layer_types)

    @classmethod
    def gemma2_2b(cls) -> "Gemma2Config":
        """google/gemma-2-2b(-it) (SPEC.md section 6)."""
        return cls()

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any]) -> "Gemma2Config":
        """Reads a transformers ``config.json`` dict (v4 or v5 spelling).

        v4 files give ``rope_theta`` at the top level; v5 files give
        ``rope_parameters = {"rope_type": "default", "rope_theta": ...}``.
        Missing ``layer_types`` means transformers' default: even layers
        (0, 2, ...) slide.

        Args:
            hf_config: the parsed config.json.

        Returns:
            The validated config.

        Raises:
            ValueError: if the dict describes something this model does not
                implement (another model_type, another activation, untied
                embeddings, attention bias, bidirectional attention, rope
                scaling) or has invalid values.
        """
        cfg = dict(hf_config)
        model_type = cfg.get("model_type", "gemma2")
        if model_type != "gemma2":
            raise ValueError(f"config model_type must be 'gemma2', got {model_type!r}.")
        activation = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        if activation != "gelu_pytorch_tanh":
            raise ValueError(f"config hidden_activation must be 'gelu_pytorch_tanh', got {activation!r}.")
        if not cfg.get("tie_word_embeddings", True):
            raise ValueError("config tie_word_embeddings must be true for Gemma-2, got False.")
        if cfg.get("attention_bias", False):
            raise ValueError("config attention_bias must be false for Gemma-2, got True.")
        if cfg.get("use_bidirectional_attention"):
            raise ValueError("config use_bidirectional_attention must be false/None, got True.")
        rope = cfg.get("rope_parameters")
        if rope is not None:
            rope_type = rope.get("rope_type", "default")
            if rope_type != "default":
                raise ValueError(f"config rope_parameters.rope_type must be 'default', got {rope_type!r}.")
            rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        else:
            if cfg.get("rope_scaling") is not None:
                raise ValueError(f"config rope_scaling must be null, got {cfg['rope_scaling']!r}.")
            rope_theta = cfg.get("rope_theta", 10000.0)
        num_layers = cfg.get("num_hidden_layers", 26)
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            layer_types = [SLIDING if i % 2 == 0 else FULL for i in range(num_layers)]
        eos = cfg.get("eos_token_id", 1)
        if isinstance(eos, list):
            eos = tuple(eos)
        hidden_size = cfg.get("hidden_size", 2304)
        num_heads = cfg.get("num_attention_heads", 8)
        head_dim = cfg.get("head_dim") or hidden_size // num_heads
        return cls(
            vocab_size=cfg.get("vocab_size", 256000),
            hidden_size=hidden_size,
            intermediate_size=cfg.get("intermediate_size", 9216),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=cfg.get("num_key_value_heads", 4),
            head_dim=head_dim,
            layer_types=tuple(layer_types),
            sliding_window=cfg.get("sliding_window", 4096),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            query_pre_attn_scalar=cfg.get("query_pre_attn_scalar", 256),
            attn_logit_softcapping=cfg.get("attn_logit_softcapping", 50.0),
            final_logit_softcapping=cfg.get("final_logit_softcapping", 30.0),
            max_position_embeddings=cfg.get("max_position_embeddings", 8192),
            pad_token_id=cfg.get("pad_token_id", 0),
            bos_token_id=cfg.get("bos_token_id", 2),
            eos_token_id=eos,
        )

    def to_hf(self, dtype: str = "float32") -> dict[str, Any]:
        """The transformers v5 ``config.json`` dict of this config.

        Args:
            dtype: the stored weights' dtype name ("float32" or "bfloat16").

        Returns:
            A JSON-serialisable dict that ``transformers.Gemma2Config`` reads.
        """
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        return {
            "architectures": ["Gemma2ForCausalLM"],
            "model_type": "gemma2",
            "dtype": dtype,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "layer_types": list(self.layer_types),
            "sliding_window": self.sliding_window,
            "rope_parameters": {"rope_type": "default", "rope_theta": float(self.rope_theta)},
            "rms_norm_eps": float(self.rms_norm_eps),
            "query_pre_attn_scalar": self.query_pre_attn_scalar,
            "attn_logit_softcapping": _float_or_none(self.attn_logit_softcapping),
            "final_logit_softcapping": _float_or_none(self.final_logit_softcapping),
            "max_position_embeddings": self.max_position_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "tie_word_embeddings": True,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
        }


# ----------------------------------------------------------------------------
# Small pure pieces.


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """RoPE positions of a left-padded batch: clip(cumsum(mask) - 1, 0).

    Args:
        attention_mask: [B, T], 1 for real tokens, 0 for padding.

    Returns:
        int32 [B, T]; real tokens count 0, 1, 2, ...; padding gets 0.
    """
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap); the identity when ``cap`` is None."""
    if cap is None:
        return x
    return cap * jnp.tanh(x / cap)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """Gemma RMSNorm in float32: x / sqrt(mean(x^2) + eps) * (1 + w).

    Args:
        x: [..., D] any float dtype.
        weight: [D] (stored zero-centred, hence the 1 +).
        eps: epsilon.

    Returns:
        float32 [..., D]; callers cast back to the compute dtype where
        transformers does.
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed * (1.0 + weight.astype(jnp.float32))


@flax.struct.dataclass
class Rotary:
    """Rotary-embedding tables of a batch of positions (shared by all layers).

    Attributes:
        cos: float32 [B, T, 1, H/2], cos(position * theta^(-2i/H)).
        sin: float32 [B, T, 1, H/2], the matching sines.
    """

    cos: jax.Array
    sin: jax.Array


def rotary_tables(positions: jax.Array, head_dim: int, theta: float) -> Rotary:
    """The ``Rotary`` tables of int [B, T] positions for heads of size ``head_dim``.

    Computed once per forward pass and kept in memory: every layer and head
    uses the same angles (see ``lora.materialize`` for why this needs doing
    on CPU).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos, sin = lora_lib.materialize(jnp.cos(angles)), lora_lib.materialize(jnp.sin(angles))
    return Rotary(cos=cos[:, :, None, :], sin=sin[:, :, None, :])


def apply_rotary(x: jax.Array, rotary: Rotary) -> jax.Array:
    """Rotary embedding with the rotate-half layout of transformers' Gemma.

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

    [B, T, K, G, H] queries -> [B*K, T*G, H] (row t * G + g); [B, S, K, H]
    keys and values -> [B*K, S, H]; bool [B, T, S] -> [B*K, T*G, S]. The
    queries of one kv head become the rows of one matrix, so logits and
    probabilities are [B*K, T*G, S] arrays whose last (contiguous) axis is the
    softmax axis. With one kv head every regrouping is a free reshape.
    """
    batch, length, kv_heads, groups, head_dim = queries.shape
    capacity = keys.shape[1]
    rows = batch * kv_heads
    q = jnp.swapaxes(queries, 1, 2).reshape(rows, length * groups, head_dim)
    k = jnp.swapaxes(keys, 1, 2).reshape(rows, capacity, head_dim)
    v = jnp.swapaxes(values, 1, 2).reshape(rows, capacity, head_dim)
    return q, k, v, _row_mask(allowed, kv_heads, groups)


def _row_mask(allowed: jax.Array, kv_heads: int, groups: int) -> jax.Array:
    """bool [B, T, S] -> [B*K, T*G, S], the layout of ``_attention_rows``."""
    batch, length, capacity = allowed.shape
    mask = jnp.broadcast_to(allowed[:, None, :, None, :], (batch, kv_heads, length, groups, capacity))
    return mask.reshape(batch * kv_heads, length * groups, capacity)


def _from_rows(rows: jax.Array, batch: int, kv_heads: int, groups: int) -> jax.Array:
    """[B*K, T*G, H] -> [B, T, K, G, H] (inverse of the query regrouping)."""
    return jnp.swapaxes(rows.reshape(batch, kv_heads, -1, groups, rows.shape[-1]), 1, 2)


def _attention_forward(queries, keys, values, allowed, query_scale, logit_cap):
    """Forward pass of ``attention``; also returns what the backward pass needs."""
    batch, length, kv_heads, groups, head_dim = queries.shape
    q, k, v, mask = _attention_rows(queries, keys, values, allowed)
    scaled = _batched_dot(q, k, 2, 2) * query_scale  # [B*K, T*G, S]
    tanh = None if logit_cap is None else jnp.tanh(scaled / logit_cap)
    capped = scaled if tanh is None else logit_cap * tanh
    # A finite floor (not -inf) keeps fully masked rows (padding queries)
    # finite: they become uniform and are never read.
    logits = jnp.where(mask, capped, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = _batched_dot(probs.astype(values.dtype), v, 2, 1)  # [B*K, T*G, H] float32
    result = _from_rows(out, batch, kv_heads, groups)
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
    """Grouped-query softmax attention with Gemma-2's logit softcap.

        z = (q . k) * query_scale,  c = cap_logit_cap(z)   (float32)
        p = softmax over allowed keys of c,  out = p v

    The backward pass is written out (FlashAttention's identities, Dao et
    al. 2022) instead of derived by autodiff:

        dp = dout v^T,  D = rowsum(dout * out) = rowsum(dp * p),
        dc = p * (dp - D),  dz = dc * (1 - tanh^2) * query_scale on allowed
        keys (0 elsewhere),  dq = dz k,  dk = dz^T q,  dv = p^T dout.

    It gives the same gradients up to float rounding but runs several times
    faster on XLA:CPU: the autodiff version transposed the [T, S] arrays
    inside elementwise fusions and reduced over them twice, which cost far
    more than the matmuls.

    Args:
        queries: [B, T, K, G, H] rotated queries (query head n = k * G + g).
        keys: [B, S, K, H] rotated keys.
        values: [B, S, K, H].
        allowed: bool [B, T, S], which keys each query may see.
        query_scale: static factor on q . k (query_pre_attn_scalar^-1/2).
        logit_cap: static softcap of the attention logits, or None.

    Returns:
        [B, T, K, G, H] in the dtype of ``values``.
    """
    return _attention_forward(queries, keys, values, allowed, query_scale, logit_cap)[0]


def _attention_bwd(query_scale, logit_cap, saved, d_result):
    q, k, v, allowed, probs, tanh, out = saved
    batch, length, kv_heads, groups, head_dim = d_result.shape
    value_dtype = v.dtype
    d_out = jnp.swapaxes(d_result, 1, 2).reshape(out.shape).astype(jnp.float32)
    mask = _row_mask(allowed, kv_heads, groups)
    row_dot = jnp.sum(d_out * out, axis=-1, keepdims=True)  # D, [B*K, T*G, 1]
    d_probs = _batched_dot(d_out.astype(value_dtype), v, 2, 2)  # [B*K, T*G, S]
    d_capped = probs * (d_probs - row_dot)
    d_scaled = d_capped if tanh is None else d_capped * (1.0 - tanh * tanh)
    d_z = jnp.where(mask, d_scaled, 0.0) * query_scale
    d_q = _batched_dot(d_z, k.astype(jnp.float32), 2, 1)  # [B*K, T*G, H]
    d_k = _batched_dot(d_z, q.astype(jnp.float32), 1, 1)  # [B*K, S, H]
    d_v = _batched_dot(probs.astype(value_dtype), d_out.astype(value_dtype), 1, 1)  # [B*K, S, H]
    d_queries = _from_rows(d_q, batch, kv_heads, groups)
    d_keys = jnp.swapaxes(d_k.reshape(batch, kv_heads, -1, head_dim), 1, 2)
    d_values = jnp.swapaxes(d_v.reshape(batch, kv_heads, -1, head_dim), 1, 2)
    return d_queries.astype(q.dtype), d_keys.astype(k.dtype), d_values.astype(value_dtype), None


attention.defvjp(_attention_forward, _attention_bwd)


# ----------------------------------------------------------------------------
# KV cache.


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for a batch of sequences.

    Every leaf has the batch as axis 0, so rows can be gathered with
    ``jax.tree.map(lambda x: x[idx], cache)`` (e.g. reuse the prefix of
    prompt ``idx[b]`` for decision ``b``). Sliding-window layers keep every
    slot too (no ring buffer): the window is applied by the mask, and the
    paper's sequences (~220 tokens) are far shorter than the 4096 window.

    Attributes:
        keys: [B, L, S, K, H] compute dtype, rotary-embedded keys by slot.
        values: [B, L, S, K, H] compute dtype.
        key_mask: bool [B, S], whether a slot holds a real (non-pad) token.
        end_index: int32 [B], slots written so far (the next write slot).
            Equal across rows in normal use; kept per row so gathers work.
        next_position: int32 [B], RoPE position of the next token (the
            number of real tokens seen so far).
    """

    keys: jax.Array
    values: jax.Array
    key_mask: jax.Array
    end_index: jax.Array
    next_position: jax.Array

    @property
    def capacity(self) -> int:
        """S, the number of slots."""
        return self.keys.shape[2]


def init_cache(config: Gemma2Config, batch_size: int, capacity: int, dtype: jnp.dtype) -> KVCache:
    """An empty cache.

    Args:
        config: the model's config.
        batch_size: B.
        capacity: S, the most tokens (padding included) it can hold.
        dtype: the model's compute dtype.

    Returns:
        A zeroed ``KVCache``.
    """
    shape = (batch_size, config.num_hidden_layers, capacity, config.num_key_value_heads, config.head_dim)
    return KVCache(
        keys=jnp.zeros(shape, dtype),
        values=jnp.zeros(shape, dtype),
        key_mask=jnp.zeros((batch_size, capacity), bool),
        end_index=jnp.zeros((batch_size,), jnp.int32),
        next_position=jnp.zeros((batch_size,), jnp.int32),
    )


# ----------------------------------------------------------------------------
# Modules. Every class below that lives inside ``DecoderLayers`` is built with
# a leading L axis on its parameters (``stack``) but its ``__call__`` sees one
# layer's slice: ``Gemma2.__call__`` scans over the stacked state.


class RMSNorm(nnx.Module):
    """Gemma RMSNorm; ``scale`` is zero-centred ([..., D], param dtype)."""

    def __init__(self, size: int, *, eps: float, param_dtype: jnp.dtype, stack: tuple[int, ...] = ()):
        self.eps = eps
        self.scale = nnx.Param(jnp.zeros((*stack, size), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the normed ``x`` in float32."""
        return rms_norm(x, self.scale[...], self.eps)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, softcapping and optional window."""

    def __init__(
        self,
        config: Gemma2Config,
        *,
        lora: lora_lib.LoraConfig | None,
        param_dtype: jnp.dtype,
        stack: tuple[int, ...],
    ):
        d, n, k, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        common = dict(lora=lora, param_dtype=param_dtype, stack=stack)
        self.q_proj = lora_lib.LoRALinear(d, n * h, target="q", **common)
        self.k_proj = lora_lib.LoRALinear(d, k * h, target="k", **common)
        self.v_proj = lora_lib.LoRALinear(d, k * h, target="v", **common)
        self.o_proj = lora_lib.LoRALinear(n * h, d, target="o", **common)
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.query_scale = config.query_pre_attn_scalar**-0.5
        self.logit_cap = config.attn_logit_softcapping

    def project_kv(
        self, x: jax.Array, rotary: Rotary, *, lora_enabled: bool, dropout_key: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """Keys (rotated by the new tokens' ``rotary`` tables) and values: [B, T, K, H] each."""
        batch, length, _ = x.shape
        keys = self.k_proj(x, lora_enabled=lora_enabled, dropout_key=dropout_key)
        values = self.v_proj(x, lora_enabled=lora_enabled, dropout_key=dropout_key)
        keys = keys.reshape(batch, length, self.num_kv_heads, self.head_dim)
        values = values.reshape(batch, length, self.num_kv_heads, self.head_dim)
        return apply_rotary(keys, rotary), values

    def attend(
        self,
        x: jax.Array,
        rotary: Rotary,
        keys: jax.Array,
        values: jax.Array,
        allowed: jax.Array,
        *,
        lora_enabled: bool,
        dropout_key: jax.Array | None,
        suffix_of: int | None = None,
    ) -> jax.Array:
        """Attention output of the queries of ``x`` over given keys/values.

        Args:
            x: [B, T, D] normed input of the new tokens.
            rotary: the rotary tables of the new tokens' positions.
            keys: [B, S, K, H] rotated keys (new tokens included).
            values: [B, S, K, H].
            allowed: bool [B, T, S], which keys each query may see.
            lora_enabled: static.
            dropout_key: per-layer key or None.
            suffix_of: static; the queries are the last T of a length-
                ``suffix_of`` input (LoRA dropout masks follow that input's,
                see ``lora.LoRALinear``); None: all of it.

        Returns:
            [B, T, D] compute dtype.
        """
        batch, length, _ = x.shape
        groups = self.num_heads // self.num_kv_heads
        lora_kwargs = dict(lora_enabled=lora_enabled, dropout_key=dropout_key, suffix_of=suffix_of)
        queries = self.q_proj(x, **lora_kwargs)
        queries = queries.reshape(batch, length, self.num_heads, self.head_dim)
        queries = apply_rotary(queries, rotary)
        # Query head n = k * G + g uses kv head k (transformers' repeat_kv).
        queries = queries.reshape(batch, length, self.num_kv_heads, groups, self.head_dim)
        out = attention(queries, keys, values, allowed, self.query_scale, self.logit_cap)
        out = out.reshape(batch, length, self.num_heads * self.head_dim)
        return self.o_proj(out, **lora_kwargs)


class MLP(nnx.Module):
    """GeGLU feed-forward: W_down(gelu_tanh(W_gate x) * W_up x)."""

    def __init__(
        self,
        config: Gemma2Config,
        *,
        lora: lora_lib.LoraConfig | None,
        param_dtype: jnp.dtype,
        stack: tuple[int, ...],
    ):
        d, f = config.hidden_size, config.intermediate_size
        common = dict(lora=lora, param_dtype=param_dtype, stack=stack)
        self.gate_proj = lora_lib.LoRALinear(d, f, target="gate", **common)
        self.up_proj = lora_lib.LoRALinear(d, f, target="up", **common)
        self.down_proj = lora_lib.LoRALinear(f, d, target="down", **common)

    def __call__(
        self,
        x: jax.Array,
        *,
        lora_enabled: bool,
        dropout_key: jax.Array | None,
        suffix_of: int | None = None,
    ) -> jax.Array:
        """[B, T, D] -> [B, T, D] in the compute dtype (``suffix_of`` as in ``Attention.attend``)."""
        kwargs = dict(lora_enabled=lora_enabled, dropout_key=dropout_key, suffix_of=suffix_of)
        gate = self.gate_proj(x, **kwargs)
        # gelu_tanh is evaluated in float32 and rounded once, as PyTorch does
        # for bfloat16 tensors (in float32 this is a no-op). Evaluated in
        # bfloat16 op by op, XLA:CPU rounds after each of its ~10 steps,
        # which is slower and less accurate.
        gate = jax.nn.gelu(gate.astype(jnp.float32), approximate=True).astype(gate.dtype)
        return self.down_proj(gate * self.up_proj(x, **kwargs), **kwargs)


class DecoderLayers(nnx.Module):
    """All L decoder layers, parameters stacked on a leading L axis."""

    def __init__(
        self,
        config: Gemma2Config,
        *,
        lora: lora_lib.LoraConfig | None,
        param_dtype: jnp.dtype,
    ):
        stack = (config.num_hidden_layers,)
        norm = dict(eps=config.rms_norm_eps, param_dtype=param_dtype, stack=stack)
        d = config.hidden_size
        self.input_layernorm = RMSNorm(d, **norm)
        self.post_attention_layernorm = RMSNorm(d, **norm)
        self.pre_feedforward_layernorm = RMSNorm(d, **norm)
        self.post_feedforward_layernorm = RMSNorm(d, **norm)
        self.self_attn = Attention(config, lora=lora, param_dtype=param_dtype, stack=stack)
        self.mlp = MLP(config, lora=lora, param_dtype=param_dtype, stack=stack)


class Embedder(nnx.Module):
    """Token embedding table ``embedding`` [V, D] (param dtype)."""

    def __init__(self, vocab_size: int, hidden_size: int, *, param_dtype: jnp.dtype):
        self.embedding = nnx.Param(jnp.zeros((vocab_size, hidden_size), param_dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """int [...] -> [..., D] rows of the table (unscaled)."""
        return jnp.take(self.embedding[...], tokens, axis=0)


class Gemma2(nnx.Module):
    """The Gemma-2 decoder (transformers' ``Gemma2Model``), LoRA-adaptable.

    Attributes:
        config: the architecture.
        embed_tokens: ``embedding`` [V, D], also the LM head (tied).
        layers: ``DecoderLayers`` with [L, ...] parameters.
        norm: the final RMSNorm.
    """

    def __init__(
        self,
        config: Gemma2Config,
        *,
        lora: lora_lib.LoraConfig | None = None,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        """Declares the model's variables, all zero.

        Fill them from a checkpoint (``checkpoints.load_hf_model``) or with
        ``random_base_state`` / ``init_policy``.

        Args:
            config: architecture.
            lora: adapter settings, or None for no adapters.
            param_dtype: dtype of the frozen weights (float32 or bfloat16).

        Raises:
            ValueError: for an unsupported ``param_dtype``.
        """
        param_dtype = jnp.dtype(param_dtype)
        if param_dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
            raise ValueError(f"param_dtype must be float32 or bfloat16, got {param_dtype}.")
        self.config = config
        self.embed_tokens = Embedder(config.vocab_size, config.hidden_size, param_dtype=param_dtype)
        self.layers = DecoderLayers(config, lora=lora, param_dtype=param_dtype)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, param_dtype=param_dtype)

    @property
    def dtype(self) -> jnp.dtype:
        """The compute dtype (that of the frozen weights)."""
        return self.embed_tokens.embedding.dtype

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        cache: KVCache | None = None,
        *,
        lora_enabled: bool = True,
        dropout_key: jax.Array | None = None,
        num_outputs: int | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        """Final-normed hidden states of new tokens, optionally through a cache.

        Without a cache the T tokens attend to each other. With a cache they
        are written to slots ``end_index .. end_index + T - 1`` and attend to
        every earlier slot too; the caller must leave room (writes past the
        capacity are dropped).

        ``num_outputs = n`` asks for the hidden states of the last n tokens
        only (what prefill and scoring read). Every layer still sees all T
        tokens, but the last layer's queries, attention output and MLP run on
        the last n only (its keys and values, and the cache, cover all T):
        for a 2-layer model that is almost half the work. The result equals
        ``hidden[:, -n:]`` of the full call up to float rounding.

        Args:
            tokens: int [B, T].
            positions: int [B, T] RoPE positions (``positions_from_mask`` for
                a left-padded prompt; ``cache.next_position + t`` after it).
            attention_mask: [B, T], 1 real token, 0 padding.
            cache: a ``KVCache`` or None.
            lora_enabled: static; False runs the frozen base (reference model).
            dropout_key: PRNG key for LoRA dropout, or None for none. Layer l
                uses ``fold_in(dropout_key, l)``.
            num_outputs: static n in [1, T], or None for all T.

        Returns:
            (hidden float32 [B, n, D] (n = T by default), the updated cache or None).

        Raises:
            ValueError: if ``num_outputs`` is not None or an int in [1, T].
        """
        config = self.config
        chex.assert_rank([tokens, positions, attention_mask], 2)
        chex.assert_equal_shape([tokens, positions, attention_mask])
        batch, length = tokens.shape
        if num_outputs is not None and not (
            isinstance(num_outputs, int) and not isinstance(num_outputs, bool) and 1 <= num_outputs <= length
        ):
            raise ValueError(f"num_outputs must be None or an int in [1, {length}] (T), got {num_outputs!r}.")
        dtype = self.dtype
        # transformers multiplies by sqrt(D) cast to the weights' dtype.
        x = self.embed_tokens(tokens) * jnp.asarray(np.float32(math.sqrt(config.hidden_size)), dtype)

        token_mask = attention_mask.astype(bool)
        rows = jnp.arange(batch)[:, None]
        if cache is None:
            query_slots = jnp.broadcast_to(jnp.arange(length), (batch, length))
            key_slots = jnp.arange(length)
            key_mask = token_mask
        else:
            chex.assert_shape(cache.key_mask, (batch, None))
            query_slots = cache.end_index[:, None] + jnp.arange(length)
            key_slots = jnp.arange(cache.capacity)
            key_mask = cache.key_mask.at[rows, query_slots].set(token_mask)
        causal = key_slots[None, None, :] <= query_slots[:, :, None]  # [B, T, S]
        full_allowed = causal & key_mask[:, None, :]
        if config.sliding_window is not None:
            in_window = query_slots[:, :, None] - key_slots[None, None, :] < config.sliding_window
            sliding_allowed = full_allowed & in_window
        else:
            sliding_allowed = full_allowed

        rotary = rotary_tables(positions, config.head_dim, config.rope_theta)
        layers_graphdef, layers_state = nnx.split(self.layers)
        xs = (layers_state, jnp.arange(config.num_hidden_layers), jnp.asarray(config.is_sliding))

        def run_layer(carry, layer_xs, outputs):
            """One decoder layer; ``outputs`` = n keeps only the last n rows."""
            x, cache_keys, cache_values = carry
            layer_state, layer_index, is_sliding = layer_xs
            layer = nnx.merge(layers_graphdef, layer_state)
            layer_key = None if dropout_key is None else jax.random.fold_in(dropout_key, layer_index)
            lora_kwargs = dict(lora_enabled=lora_enabled, dropout_key=layer_key)
            allowed = jnp.where(is_sliding, sliding_allowed, full_allowed)

            normed = layer.input_layernorm(x).astype(dtype)
            new_keys, new_values = layer.self_attn.project_kv(normed, rotary, **lora_kwargs)
            if cache_keys is None:
                keys, values = new_keys, new_values
            else:
                cache_keys = cache_keys.at[rows, layer_index, query_slots].set(new_keys)
                cache_values = cache_values.at[rows, layer_index, query_slots].set(new_values)
                keys, values = cache_keys[:, layer_index], cache_values[:, layer_index]
            query_rotary = rotary
            if outputs is not None:
                start = length - outputs
                x, normed, allowed = x[:, start:], normed[:, start:], allowed[:, start:]
                query_rotary = jax.tree.map(lambda table: table[:, start:], rotary)
                lora_kwargs["suffix_of"] = length
            attn = layer.self_attn.attend(normed, query_rotary, keys, values, allowed, **lora_kwargs)
            x = x + layer.post_attention_layernorm(attn).astype(dtype)
            mlp = layer.mlp(layer.pre_feedforward_layernorm(x).astype(dtype), **lora_kwargs)
            x = x + layer.post_feedforward_layernorm(mlp).astype(dtype)
            return x, cache_keys, cache_values

        def layer_step(carry, layer_xs):
            return run_layer(carry, layer_xs, None), None

        carry = (x, None, None) if cache is None else (x, cache.keys, cache.values)
        num_layers = config.num_hidden_layers
        trim_last = num_outputs is not None and num_outputs < length
        scanned = num_layers - 1 if trim_last else num_layers
        # Shallow models run as a Python loop: a scan's saved activations are
        # stacked into [L, ...] buffers, and on CPU zeroing, filling and
        # slicing those cost as much as a small layer itself. Deep models keep
        # the scan (one layer compiled once).
        if num_layers <= _MAX_UNROLLED_LAYERS:
            for index in range(scanned):
                carry = run_layer(carry, jax.tree.map(lambda a, i=index: a[i], xs), None)
        elif scanned:
            carry, _ = jax.lax.scan(layer_step, carry, jax.tree.map(lambda a: a[:scanned], xs))
        if trim_last:
            carry = run_layer(carry, jax.tree.map(lambda a: a[num_layers - 1], xs), num_outputs)
        x, cache_keys, cache_values = carry
        hidden = self.norm(x)

        if cache is not None:
            cache = KVCache(
                keys=cache_keys,
                values=cache_values,
                key_mask=key_mask,
                end_index=cache.end_index + length,
                next_position=positions[:, -1].astype(jnp.int32) + 1,
            )
        return hidden, cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Softcapped float32 logits of hidden states (tied LM head).

        Compute them only where needed: [.., V] is large for V = 256000.

        Args:
            hidden: [..., D] final-normed hidden states.

        Returns:
            float32 [..., V].
        """
        embedding = self.embed_tokens.embedding[...]
        raw = jnp.einsum(
            "...d,vd->...v", hidden.astype(embedding.dtype), embedding, preferred_element_type=jnp.float32
        )
        return softcap(raw, self.config.final_logit_softcapping)


@flax.struct.dataclass
class ForwardOutput:
    """Result of ``Policy.forward``.

    Attributes:
        hidden: float32 [B, T, D] final-normed hidden states (transformers'
            ``hidden_states[-1]``), input of both the LM head and value head.
        cache: the updated ``KVCache``, or None when called without one.
    """

    hidden: jax.Array
    cache: KVCache | None


class Policy(nnx.Module):
    """Gemma-2 with LoRA adapters and a value head: the PPO actor-critic.

    Attributes:
        model: the ``Gemma2`` decoder (frozen ``nnx.Param`` weights, trainable
            ``LoRAParam`` factors).
        value_head: the ``ValueHead`` (``ValueHeadParam``).
    """

    def __init__(
        self,
        config: Gemma2Config,
        *,
        lora: lora_lib.LoraConfig | None = lora_lib.LoraConfig(),
        value_head_dropout: float = 0.1,
        param_dtype: jnp.dtype = jnp.float32,
        key: jax.Array,
    ):
        """Builds a policy with fresh adapters and value head and a ZERO base.

        The frozen base comes from ``checkpoints.load_hf_model`` or
        ``random_base_state``; ``init_policy`` does the random case.

        Args:
            config: architecture.
            lora: adapter settings (paper: ``LoraConfig()``), None for none.
            value_head_dropout: TRL's ``summary_dropout_prob`` (default 0.1).
            param_dtype: dtype of the frozen weights.
            key: PRNG key of the trainable parameters (``lora.init_trainable``).
        """
        self.model = Gemma2(config, lora=lora, param_dtype=param_dtype)
        self.value_head = lora_lib.ValueHead(config.hidden_size, dropout_rate=value_head_dropout)
        nnx.update(self, lora_lib.init_trainable(self, key))

    @property
    def config(self) -> Gemma2Config:
        return self.model.config

    def forward(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        cache: KVCache | None = None,
        *,
        lora_enabled: bool = True,
        dropout_key: jax.Array | None = None,
        num_outputs: int | None = None,
    ) -> ForwardOutput:
        """Hidden states of new tokens; see ``Gemma2.__call__`` for the arguments."""
        hidden, cache = self.model(
            tokens,
            positions,
            attention_mask,
            cache,
            lora_enabled=lora_enabled,
            dropout_key=dropout_key,
            num_outputs=num_outputs,
        )
        return ForwardOutput(hidden=hidden, cache=cache)

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 [..., V] softcapped logits of ``hidden`` [..., D]."""
        return self.model.logits(hidden)

    def values(self, hidden: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """float32 [...] value-head outputs of ``hidden`` [..., D]."""
        return self.value_head(hidden, dropout_key)


# (dotted state path, shape) -> where to put that parameter (None: default device).
ShardingFn = Callable[[str, tuple[int, ...]], jax.sharding.Sharding | None]


def place(host: np.ndarray, path: str, shardings: ShardingFn | None) -> jax.Array:
    """Moves one host parameter to its devices (``shardings(path, shape)``)."""
    sharding = None if shardings is None else shardings(path, tuple(host.shape))
    return jax.device_put(host, sharding) if sharding is not None else jnp.asarray(host)


def random_base_state(
    frozen_template: nnx.State, key: jax.Array, *, shardings: ShardingFn | None = None
) -> nnx.State:
    """Random frozen weights like transformers' init: N(0, 0.02^2), norms 0.

    Drawn on the host with numpy (seeded by ``key`` and the leaf's index in
    sorted order), one leaf at a time: no XLA compilation per initialiser and
    no device copy beyond the result. For tests and benchmarks; real runs
    load a checkpoint.

    Args:
        frozen_template: the frozen state (arrays or ``ShapeDtypeStruct``s).
        key: concrete PRNG key.
        shardings: optional placement, as in ``checkpoints.load_hf_model``.

    Returns:
        A state with the template's structure, dtypes and shapes.
    """
    seed = np.asarray(jax.random.key_data(key)).astype(np.uint64).ravel().tolist()
    leaves = []
    for index, (path, variable) in enumerate(nnx.to_flat_state(frozen_template)):
        shape, dtype = tuple(variable.shape), np.dtype(variable.dtype)
        if path[-1] == "scale":  # RMSNorm weights are zero-centred.
            host = np.zeros(shape, dtype)
        else:
            rng = np.random.default_rng([*seed, index])
            host = (0.02 * rng.standard_normal(shape, np.float32)).astype(dtype)
        leaves.append((path, variable.copy(place(host, ".".join(map(str, path)), shardings))))
        del host
    return nnx.from_flat_state(leaves)


def init_policy(
    config: Gemma2Config,
    *,
    lora: lora_lib.LoraConfig | None = lora_lib.LoraConfig(),
    value_head_dropout: float = 0.1,
    param_dtype: jnp.dtype = jnp.float32,
    key: jax.Array,
    shardings: ShardingFn | None = None,
) -> Policy:
    """A policy with a random base (``random_base_state``) and fresh adapters.

    Built abstractly first, so no zero copy of the base is ever allocated.

    Args:
        config, lora, value_head_dropout, param_dtype: as for ``Policy``.
        key: concrete PRNG key; ``fold_in(key, 0)`` seeds the base and
            ``fold_in(key, 1)`` the trainable parameters. The base does not
            depend on ``lora``, so policies with and without adapters made
            from one key share it.
        shardings: optional placement of the frozen parameters.

    Returns:
        The ``Policy``.
    """
    key_base, key_trainable = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
    abstract = nnx.eval_shape(
        lambda: Policy(
            config, lora=lora, value_head_dropout=value_head_dropout, param_dtype=param_dtype, key=key_trainable
        )
    )
    graphdef, trainable_abstract, frozen_abstract = split_policy(abstract)
    frozen = random_base_state(frozen_abstract, key_base, shardings=shardings)
    trainable = jax.jit(lambda k: lora_lib.init_trainable(trainable_abstract, k))(key_trainable)
    return merge_policy(graphdef, trainable, frozen)


def split_policy(policy: Policy) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Splits a policy into (graphdef, trainable_state, frozen_state).

    The trainable state holds the LoRA factors and the value head (the
    ``lora.TRAINABLE`` filter); the frozen state holds everything else.
    Functions of these three are pure, so ``jax.vmap`` over a leading learner
    axis of the trainable state with one shared frozen state works.
    """
    graphdef, trainable, frozen = nnx.split(policy, lora_lib.TRAINABLE, ...)
    return graphdef, trainable, frozen


def merge_policy(graphdef: nnx.GraphDef, trainable_state: nnx.State, frozen_state: nnx.State) -> Policy:
    """Inverse of ``split_policy``."""
    return nnx.merge(graphdef, trainable_state, frozen_state)
