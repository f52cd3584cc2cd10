"""One decoder for every supported family, in Flax NNX, LoRA-adaptable (``policy.py`` adds the value head).

Follows transformers' ``Gemma2ForCausalLM``, ``Gemma3ForCausalLM``,
``LlamaForCausalLM``, ``Qwen2ForCausalLM`` and ``Qwen3ForCausalLM`` so that
logits agree with them on the same Hugging Face files
(tests/decoder_test.py, tests/families_test.py). ``DecoderConfig`` says which
of their differences apply (``decoder_config.py`` has the table):

    x_0 = E[tokens] (* sqrt(D) when scale_embeddings)     (compute dtype)
    per layer l (sliding-window attention where config.layer_types says so):
      a   = Attn(n_in(x))        queries and keys RMS-normed per head when
                                 qk_norm, biases on q, k, v when qkv_bias,
                                 RoPE with the layer type's tables
      h   = x + post_attn_norm(a)                 (post_norms: Gemma)
          = x + a                                 (pre-norm only)
      m   = W_down(act(W_gate n) * W_up n),  n = pre_ffw_norm(h)
      x'  = h + post_ffw_norm(m)  or  h + m
    hidden = final_norm(x_L)                          (float32)
    logits = cap(hidden E^T)  (tied)  or  cap(hidden W_head)  (untied)
  with RMSNorm(x) = x / sqrt(mean(x^2) + eps) * (offset + w) in float32,
  attention logits cap(q.k * query_pre_attn_scalar^-1/2), cap_c(z) =
  c tanh(z / c) or the identity, act = gelu_tanh or silu, and grouped-query
  attention (each of the kv_heads key/value heads serves group_size query
  heads).

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
operands; attention has a hand-written backward pass (``attention.py``); the
rotary tables are computed once per call; callers that read only the last
few hidden states (prefill, scoring) skip the rest of the last layer
(``num_outputs``). Each of these is exact up to float rounding.

Axis legend (docs/ARCHITECTURE.md, "Axis letters"):
  B rows of one model call, T tokens of this call (the queries), S key/value
  positions (cache capacity, or T without a cache), H head dim, D model
  width, F MLP width, V vocabulary, L layers, R LoRA rank. Heads are written
  out: ``q_heads`` query heads, ``kv_heads`` key/value heads, ``group_size``
  query heads per key/value head (q_heads / kv_heads).
"""

import functools

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moraljax.llm import attention as attention_lib
from moraljax.llm import decoder_config
from moraljax.llm import lora as lora_lib

DecoderConfig = decoder_config.DecoderConfig
# Models with at most this many layers run their layer loop unrolled.
_MAX_UNROLLED_LAYERS = 4

# Rematerialisation of each decoder layer in the backward pass (``Decoder.remat``):
#   none  keep every activation the backward pass reads (fastest, most memory);
#   dots  keep the outputs of the layer's seven projections (in the compute
#         dtype, ``lora.PROJECTION_OUTPUT``), recompute the rest (norms,
#         activations, attention softmax): little extra work;
#   full  keep only the layer's input, recompute the whole layer (one more
#         forward pass of the layers in the update).
REMAT_POLICIES = decoder_config.REMAT_POLICIES


def remat_for(policy: str, num_layers: int) -> str:
    """'auto' -> 'none' for shallow (unrolled) models, 'dots' for deep ones; others pass through."""
    if policy == "auto":
        return "none" if num_layers <= _MAX_UNROLLED_LAYERS else "dots"
    if policy not in REMAT_POLICIES:
        raise ValueError(f"remat={policy!r} is not allowed; expected auto or one of {', '.join(REMAT_POLICIES)}.")
    return policy


_SLICING = (jax.lax.dynamic_slice_p, jax.lax.squeeze_p, jax.lax.reshape_p)


def _everything_but_slices(primitive, *args, **params) -> bool:
    """Remat policy "none" inside a scan: keep every value except slices of the stacked weights (and reshapes)."""
    del args, params
    return primitive not in _SLICING


def _rematerialised(step, policy: str, *, keep_slices: bool = True):
    """`step` wrapped for the backward pass by a ``REMAT_POLICIES`` name.

    With ``keep_slices=False`` slices (and reshapes) are recomputed even
    under "none", for steps that index the stacked weights themselves.
    """
    if policy == "none" and keep_slices:
        return step
    saveable = {"none": _everything_but_slices,
                "dots": jax.checkpoint_policies.save_only_these_names(lora_lib.PROJECTION_OUTPUT),
                "full": jax.checkpoint_policies.nothing_saveable}[policy]
    return jax.checkpoint(step, policy=saveable)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
    """RoPE positions of a left-padded batch: clip(cumsum(mask) - 1, 0).

    Args:
        attention_mask: [B, T], 1 for real tokens, 0 for padding.

    Returns:
        int32 [B, T]; real tokens count 0, 1, 2, ...; padding gets 0.
    """
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float, offset: float = 1.0) -> jax.Array:
    """RMSNorm: x / sqrt(mean(x^2) + eps) * (offset + w), returned in float32.

    With ``offset`` 1 (Gemma) the weight applies in float32; with 0 (Llama,
    Qwen) the normed x is rounded to the input's dtype first and multiplied
    there, as transformers does for each (the two agree in float32).

    Args:
        x: [..., D] any float dtype.
        weight: [D].
        eps: epsilon.
        offset: 1.0 (zero-centred weights) or 0.0.

    Returns:
        float32 [..., D]; callers cast back to the compute dtype where
        transformers does.
    """
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    if offset:
        return normed * (offset + weight.astype(jnp.float32))
    return (normed.astype(x.dtype) * weight.astype(x.dtype)).astype(jnp.float32)


# ----------------------------------------------------------------------------
# KV cache.


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer for a batch of sequences.

    Every leaf has the batch as axis 0, so rows can be gathered with
    ``jax.tree.map(lambda x: x[idx], cache)`` (e.g. reuse the prefix of
    prompt ``idx[b]`` for decision ``b``). Sliding-window layers keep every
    slot too (no ring buffer): the window is applied by the mask, and the
    paper's sequences (~220 tokens) are far shorter than the windows.

    Attributes:
        keys: [B, L, S, kv_heads, H] compute dtype, rotary-embedded keys by slot.
        values: [B, L, S, kv_heads, H] compute dtype.
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


def init_cache(config: DecoderConfig, batch_size: int, capacity: int, dtype: jnp.dtype) -> KVCache:
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
# layer's slice: ``Decoder.__call__`` scans over the stacked state.


class RMSNorm(nnx.Module):
    """RMSNorm with weight ``offset + scale`` (``scale`` [..., D], param dtype)."""

    def __init__(
        self, size: int, *, eps: float, offset: float, param_dtype: jnp.dtype, stack: tuple[int, ...] = ()
    ):
        self.eps = eps
        self.offset = offset
        self.scale = nnx.Param(jnp.zeros((*stack, size), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """Returns the normed ``x`` in float32."""
        if x.dtype == jnp.float32:
            return rms_norm(x, self.scale[...], self.eps, self.offset)
        # In bfloat16 the norm's float32 intermediates would be what the
        # backward pass keeps (twice the bytes of the input); recomputing them
        # from the bfloat16 input keeps only that (same values).
        return jax.checkpoint(rms_norm, static_argnums=(2, 3))(x, self.scale[...], self.eps, self.offset)


class Attention(nnx.Module):
    """Grouped-query self-attention with RoPE, optional q/k norms, biases, softcap, window."""

    def __init__(
        self,
        config: DecoderConfig,
        *,
        lora: lora_lib.LoraConfig | None,
        param_dtype: jnp.dtype,
        stack: tuple[int, ...],
    ):
        d, h = config.hidden_size, config.head_dim
        q_heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        common = dict(lora=lora, param_dtype=param_dtype, stack=stack)
        self.q_proj = lora_lib.LoRALinear(d, q_heads * h, target="q", use_bias=config.qkv_bias, **common)
        self.k_proj = lora_lib.LoRALinear(d, kv_heads * h, target="k", use_bias=config.qkv_bias, **common)
        self.v_proj = lora_lib.LoRALinear(d, kv_heads * h, target="v", use_bias=config.qkv_bias, **common)
        self.o_proj = lora_lib.LoRALinear(q_heads * h, d, target="o", **common)
        if config.qk_norm:
            norm = dict(eps=config.rms_norm_eps, offset=config.norm_offset, param_dtype=param_dtype, stack=stack)
            self.q_norm = RMSNorm(h, **norm)
            self.k_norm = RMSNorm(h, **norm)
        self.qk_norm = config.qk_norm
        self.num_heads, self.num_kv_heads, self.head_dim = q_heads, kv_heads, h
        self.query_scale = config.query_scale
        self.logit_cap = config.attn_logit_softcapping

    def _heads(self, projected: jax.Array, norm: RMSNorm | None, rotary: attention_lib.Rotary) -> jax.Array:
        """[B, T, heads * H] -> [B, T, heads, H]: per-head norm (if any), then RoPE."""
        batch, length, width = projected.shape
        heads = projected.reshape(batch, length, width // self.head_dim, self.head_dim)
        if norm is not None:
            heads = norm(heads).astype(projected.dtype)
        return attention_lib.apply_rotary(heads, rotary)

    def project_kv(
        self, x: jax.Array, rotary: attention_lib.Rotary, *, lora_enabled: bool, dropout_key: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """Keys (normed if qk_norm, rotated by the new tokens' tables) and values: [B, T, kv_heads, H] each."""
        batch, length, _ = x.shape
        keys = self.k_proj(x, lora_enabled=lora_enabled, dropout_key=dropout_key)
        values = self.v_proj(x, lora_enabled=lora_enabled, dropout_key=dropout_key)
        values = values.reshape(batch, length, self.num_kv_heads, self.head_dim)
        return self._heads(keys, self.k_norm if self.qk_norm else None, rotary), values

    def attend(
        self,
        x: jax.Array,
        rotary: attention_lib.Rotary,
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
            keys: [B, S, kv_heads, H] rotated keys (new tokens included).
            values: [B, S, kv_heads, H].
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
        group_size = self.num_heads // self.num_kv_heads
        lora_kwargs = dict(lora_enabled=lora_enabled, dropout_key=dropout_key, suffix_of=suffix_of)
        queries = self._heads(self.q_proj(x, **lora_kwargs), self.q_norm if self.qk_norm else None, rotary)
        # Query head kv * group_size + g uses kv head kv (transformers' repeat_kv).
        queries = queries.reshape(batch, length, self.num_kv_heads, group_size, self.head_dim)
        out = attention_lib.attention(queries, keys, values, allowed, self.query_scale, self.logit_cap)
        out = out.reshape(batch, length, self.num_heads * self.head_dim)
        return self.o_proj(out, **lora_kwargs)


def _activation_rounded(name: str, gate: jax.Array) -> jax.Array:
    """act(gate) evaluated in float32 and rounded once to gate's dtype."""
    gate32 = gate.astype(jnp.float32)
    activated = jax.nn.silu(gate32) if name == "silu" else jax.nn.gelu(gate32, approximate=True)
    return activated.astype(gate.dtype)


class MLP(nnx.Module):
    """Gated feed-forward: W_down(act(W_gate x) * W_up x), act = gelu_tanh or silu."""

    def __init__(
        self,
        config: DecoderConfig,
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
        self.activation = config.hidden_activation

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
        # The activation is evaluated in float32 and rounded once, as PyTorch
        # does for bfloat16 tensors (in float32 this is a no-op). Evaluated in
        # bfloat16 op by op, XLA:CPU rounds after each of its ~10 steps,
        # which is slower and less accurate.
        # In bfloat16 its float32 intermediates are recomputed in the backward
        # pass instead of saved: only the bfloat16 gate is kept.
        activate = functools.partial(_activation_rounded, self.activation)
        gate = activate(gate) if gate.dtype == jnp.float32 else jax.checkpoint(activate)(gate)
        return self.down_proj(gate * self.up_proj(x, **kwargs), **kwargs)


class DecoderLayers(nnx.Module):
    """All L decoder layers, parameters stacked on a leading L axis.

    The four norm positions keep Gemma's names; pre-norm families have only
    ``input_layernorm`` and ``pre_feedforward_layernorm`` (which their
    checkpoints call ``post_attention_layernorm``, see ``families.py``).
    """

    def __init__(
        self,
        config: DecoderConfig,
        *,
        lora: lora_lib.LoraConfig | None,
        param_dtype: jnp.dtype,
    ):
        stack = (config.num_hidden_layers,)
        norm = dict(eps=config.rms_norm_eps, offset=config.norm_offset, param_dtype=param_dtype, stack=stack)
        d = config.hidden_size
        self.input_layernorm = RMSNorm(d, **norm)
        if config.post_norms:
            self.post_attention_layernorm = RMSNorm(d, **norm)
        self.pre_feedforward_layernorm = RMSNorm(d, **norm)
        if config.post_norms:
            self.post_feedforward_layernorm = RMSNorm(d, **norm)
        self.post_norms = config.post_norms
        self.self_attn = Attention(config, lora=lora, param_dtype=param_dtype, stack=stack)
        self.mlp = MLP(config, lora=lora, param_dtype=param_dtype, stack=stack)

    def finish(
        self,
        x: jax.Array,
        normed: jax.Array,
        rotary: attention_lib.Rotary,
        keys: jax.Array,
        values: jax.Array,
        allowed: jax.Array,
        **lora_kwargs,
    ) -> jax.Array:
        """One layer's output, given its normed input and its keys and values.

        Args:
            x: [B, T, D] the layer's input (the residual stream).
            normed: ``input_layernorm(x)`` in the compute dtype.
            rotary, keys, values, allowed: as for ``Attention.attend``.
            **lora_kwargs: lora_enabled, dropout_key, suffix_of.

        Returns:
            [B, T, D] compute dtype.
        """
        dtype = x.dtype
        attn = self.self_attn.attend(normed, rotary, keys, values, allowed, **lora_kwargs)
        if self.post_norms:
            attn = self.post_attention_layernorm(attn).astype(dtype)
        x = x + attn
        mlp = self.mlp(self.pre_feedforward_layernorm(x).astype(dtype), **lora_kwargs)
        if self.post_norms:
            mlp = self.post_feedforward_layernorm(mlp).astype(dtype)
        return x + mlp


class Embedder(nnx.Module):
    """Token embedding table ``embedding`` [V, D] (param dtype)."""

    def __init__(self, vocab_size: int, hidden_size: int, *, param_dtype: jnp.dtype):
        self.embedding = nnx.Param(jnp.zeros((vocab_size, hidden_size), param_dtype))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """int [...] -> [..., D] rows of the table (unscaled)."""
        return jnp.take(self.embedding[...], tokens, axis=0)


class LMHead(nnx.Module):
    """An untied output layer ``kernel`` [D, V] (param dtype)."""

    def __init__(self, hidden_size: int, vocab_size: int, *, param_dtype: jnp.dtype):
        self.kernel = nnx.Param(jnp.zeros((hidden_size, vocab_size), param_dtype))


@flax.struct.dataclass
class _PassContext:
    """What every layer of one forward pass shares.

    Attributes:
        rotary: RoPE tables of full-attention layers (of all layers unless
            ``sliding_rotary`` is set).
        sliding_rotary: RoPE tables of sliding layers, or None.
        full_allowed: bool [B, T, S], the causal mask over real keys.
        sliding_allowed: bool [B, T, S], the same within the window.
        query_slots: int [B, T], the cache slots of the new tokens.
    """

    rotary: attention_lib.Rotary
    sliding_rotary: attention_lib.Rotary | None
    full_allowed: jax.Array
    sliding_allowed: jax.Array
    query_slots: jax.Array

    def rotary_of(self, is_sliding: jax.Array) -> attention_lib.Rotary:
        """The tables of a layer (``is_sliding`` a bool scalar)."""
        if self.sliding_rotary is None:
            return self.rotary
        return jax.tree.map(lambda local, full: jnp.where(is_sliding, local, full), self.sliding_rotary, self.rotary)


class Decoder(nnx.Module):
    """The decoder (transformers' ``<Family>Model`` plus its LM head), LoRA-adaptable.

    Attributes:
        config: the architecture.
        embed_tokens: ``embedding`` [V, D], also the LM head when tied.
        layers: ``DecoderLayers`` with [L, ...] parameters.
        norm: the final RMSNorm.
        lm_head: ``LMHead`` [D, V] when the embeddings are untied.
    """

    def __init__(
        self,
        config: DecoderConfig,
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
            raise ValueError(f"param_dtype={str(param_dtype)!r} is not allowed; expected float32 or bfloat16.")
        self.config = config
        # Static: how each layer is rematerialised (REMAT_POLICIES); set by the
        # caller that trains (run_setup.load_model), "none" otherwise.
        self.remat = "none"
        self.embed_tokens = Embedder(config.vocab_size, config.hidden_size, param_dtype=param_dtype)
        self.layers = DecoderLayers(config, lora=lora, param_dtype=param_dtype)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, offset=config.norm_offset,
                            param_dtype=param_dtype)
        if not config.tie_word_embeddings:
            self.lm_head = LMHead(config.hidden_size, config.vocab_size, param_dtype=param_dtype)

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
        chex.assert_rank([tokens, positions, attention_mask], 2)
        chex.assert_equal_shape([tokens, positions, attention_mask])
        length = tokens.shape[1]
        if num_outputs is not None and not (
            isinstance(num_outputs, int) and not isinstance(num_outputs, bool) and 1 <= num_outputs <= length
        ):
            raise ValueError(f"num_outputs={num_outputs!r} is not allowed; expected None or an int in [1, {length}].")
        x = self.embed_tokens(tokens)
        if self.config.embedding_scale is not None:
            # transformers multiplies by sqrt(D) cast to the weights' dtype.
            x = x * jnp.asarray(np.float32(self.config.embedding_scale), self.dtype)
        context, key_mask = self._pass_context(positions, attention_mask, cache)
        carry = (x, None, None) if cache is None else (x, cache.keys, cache.values)
        x, cache_keys, cache_values = self._run_layers(carry, context, lora_enabled, dropout_key, num_outputs)
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

    def _pass_context(
        self, positions: jax.Array, attention_mask: jax.Array, cache: KVCache | None
    ) -> tuple[_PassContext, jax.Array]:
        """Masks and rotary tables of one call, and the key mask [B, S] after it."""
        config = self.config
        batch, length = attention_mask.shape
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
        rotary = attention_lib.rotary_tables(positions, config.head_dim, config.rope_theta, config.rope_scaling)
        sliding_rotary = None
        if config.has_sliding_rope:
            sliding_rotary = attention_lib.rotary_tables(positions, config.head_dim, config.sliding_rope_theta)
        context = _PassContext(
            rotary=rotary,
            sliding_rotary=sliding_rotary,
            full_allowed=full_allowed,
            sliding_allowed=sliding_allowed,
            query_slots=query_slots,
        )
        return context, key_mask

    def _run_layers(self, carry, context: _PassContext, lora_enabled, dropout_key, num_outputs):
        """Runs every layer on carry = (x, cache keys or None, cache values or None)."""
        config = self.config
        length = carry[0].shape[1]
        layers_graphdef, layers_state = nnx.split(self.layers)
        xs = (layers_state, jnp.arange(config.num_hidden_layers), jnp.asarray(config.is_sliding))

        def run_layer(carry, layer_xs, outputs):
            """One decoder layer; ``outputs`` = n keeps only the last n rows."""
            x, cache_keys, cache_values = carry
            layer_state, layer_index, is_sliding = layer_xs
            layer = nnx.merge(layers_graphdef, layer_state)
            layer_key = None if dropout_key is None else jax.random.fold_in(dropout_key, layer_index)
            lora_kwargs = dict(lora_enabled=lora_enabled, dropout_key=layer_key)
            allowed = jnp.where(is_sliding, context.sliding_allowed, context.full_allowed)
            rotary = context.rotary_of(is_sliding)

            normed = layer.input_layernorm(x).astype(x.dtype)
            new_keys, new_values = layer.self_attn.project_kv(normed, rotary, **lora_kwargs)
            if cache_keys is None:
                keys, values = new_keys, new_values
            else:
                rows = jnp.arange(x.shape[0])[:, None]
                cache_keys = cache_keys.at[rows, layer_index, context.query_slots].set(new_keys)
                cache_values = cache_values.at[rows, layer_index, context.query_slots].set(new_values)
                keys, values = cache_keys[:, layer_index], cache_values[:, layer_index]
            if outputs is not None:
                start = length - outputs
                x, normed, allowed = x[:, start:], normed[:, start:], allowed[:, start:]
                rotary = jax.tree.map(lambda table: table[:, start:], rotary)
                lora_kwargs["suffix_of"] = length
            x = layer.finish(x, normed, rotary, keys, values, allowed, **lora_kwargs)
            return x, cache_keys, cache_values

        num_layers = config.num_hidden_layers
        trim_last = num_outputs is not None and num_outputs < length
        scanned = num_layers - 1 if trim_last else num_layers
        # Shallow models run as a Python loop: a scan's saved activations are
        # stacked into [L, ...] buffers, and on CPU zeroing, filling and
        # slicing those cost as much as a small layer itself. Deep models keep
        # the scan (one layer compiled once).
        if num_layers <= _MAX_UNROLLED_LAYERS:
            layer = _rematerialised(lambda carry, layer_xs: run_layer(carry, layer_xs, None), self.remat)
            for index in range(scanned):
                carry = layer(carry, jax.tree.map(lambda a, i=index: a[i], xs))
            if trim_last:
                last = _rematerialised(lambda carry, layer_xs: run_layer(carry, layer_xs, num_outputs), self.remat)
                carry = last(carry, jax.tree.map(lambda a: a[num_layers - 1], xs))
            return carry

        # Deep models read each layer's slice of the stacked weights inside
        # the rematerialised step: slicing outside it (xs[:L-1]) would copy all
        # the weights per call, and a slice the backward pass kept would be
        # stacked by the scan into a second copy of the base; the policy never
        # keeps slices, so the backward pass re-reads them by index.
        def indexed(outputs):
            def step(carry, index):
                layer_xs = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), xs)
                return run_layer(carry, layer_xs, outputs)

            return _rematerialised(step, self.remat, keep_slices=False)

        if scanned:
            layer = indexed(None)
            carry, _ = jax.lax.scan(lambda carry, index: (layer(carry, index), None), carry, jnp.arange(scanned))
        if trim_last:
            carry = indexed(num_outputs)(carry, jnp.asarray(num_layers - 1))
        return carry

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Softcapped float32 logits of hidden states (tied or untied LM head).

        Compute them only where needed: [.., V] is large for V = 256000.

        Args:
            hidden: [..., D] final-normed hidden states.

        Returns:
            float32 [..., V].
        """
        if self.config.tie_word_embeddings:
            embedding = self.embed_tokens.embedding[...]
            raw = jnp.einsum(
                "...d,vd->...v", hidden.astype(embedding.dtype), embedding, preferred_element_type=jnp.float32
            )
        else:
            kernel = self.lm_head.kernel[...]
            raw = jnp.matmul(hidden.astype(kernel.dtype), kernel, preferred_element_type=jnp.float32)
        return attention_lib.softcap(raw, self.config.final_logit_softcapping)
