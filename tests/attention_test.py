"""Attention math: the hand-written backward pass, rotary tables and RoPE scalings."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers import modeling_rope_utils

from moraljax.llm import attention
from moraljax.llm import decoder_config
from moraljax.llm import lora


def test_softcap_by_hand():
    np.testing.assert_allclose(attention.softcap(jnp.array([0.0, 100.0]), 2.0), [0.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(attention.softcap(jnp.array([1.0]), None), [1.0])
    np.testing.assert_allclose(attention.softcap(jnp.array([1.0]), 2.0), [2.0 * math.tanh(0.5)], rtol=1e-6)


def _textbook_attention(queries, keys, values, allowed, query_scale, logit_cap):
    """Attention written plainly, for autodiff to differentiate."""
    logits = jnp.einsum("btkgh,bskh->bkgts", queries, keys) * query_scale
    logits = attention.softcap(logits, logit_cap)
    logits = jnp.where(allowed[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bkgts,bskh->btkgh", probs, values)


@pytest.mark.parametrize("logit_cap", [1.5, None])
def test_attention_hand_written_backward_matches_autodiff(logit_cap):
    batch, length, capacity, kv_heads, groups, head_dim = 2, 5, 7, 2, 3, 4
    key_q, key_k, key_v, key_mask, key_w = jax.random.split(jax.random.key(0), 5)
    queries = 2.0 * jax.random.normal(key_q, (batch, length, kv_heads, groups, head_dim))
    keys = jax.random.normal(key_k, (batch, capacity, kv_heads, head_dim))
    values = jax.random.normal(key_v, (batch, capacity, kv_heads, head_dim))
    allowed = jax.random.bernoulli(key_mask, 0.6, (batch, length, capacity))
    allowed = allowed.at[0, 1].set(False)  # a fully masked (padding) query
    weights = jax.random.normal(key_w, queries.shape)

    def loss(fn):
        return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, allowed, 0.7, logit_cap)) * weights)

    ours = jax.jit(jax.value_and_grad(loss(attention.attention), argnums=(0, 1, 2)))(queries, keys, values)
    theirs = jax.jit(jax.value_and_grad(loss(_textbook_attention), argnums=(0, 1, 2)))(queries, keys, values)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-5)
    for got, want in zip(ours[1], theirs[1]):
        assert np.abs(np.asarray(want)).max() > 1e-3  # the gradient is not trivially zero
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # The masked query's row gets no gradient, as through jnp.where.
    np.testing.assert_array_equal(ours[1][0][0, 1], 0.0)


def test_rotary_tables_are_cos_and_sin_kept_bit_exact():
    # The identity product that pins a table in memory changes no bit.
    table = jax.random.normal(jax.random.key(0), (3, 7, 16)) * jnp.logspace(-30, 30, 16)
    np.testing.assert_array_equal(jax.jit(lora.compute_once)(table), table)
    positions = jnp.array([[0, 0, 1, 2, 30], [0, 1, 2, 3, 4]])

    @jax.jit
    def tables_and_formula(positions):
        inv_freq = 1.0 / (500.0 ** (jnp.arange(0, 16, 2, dtype=jnp.float32) / 16))
        angles = positions.astype(jnp.float32)[..., None] * inv_freq
        return attention.rotary_tables(positions, 16, 500.0), jnp.cos(angles), jnp.sin(angles)

    tables, cos, sin = tables_and_formula(positions)
    assert tables.cos.shape == (2, 5, 1, 8)
    np.testing.assert_allclose(tables.cos[:, :, 0], cos, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(tables.sin[:, :, 0], sin, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "rope_parameters",
    [
        # Llama 3.2's values, with a short original context so that the
        # 64-wide head has frequencies in all three bands.
        {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 8.0},
    ],
    ids=["llama3", "linear"],
)
def test_rope_scaling_matches_transformers(rope_parameters):
    head_dim = 64
    config = transformers.LlamaConfig(
        hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim, max_position_embeddings=4096,
        rope_parameters=dict(rope_parameters),
    )
    init = modeling_rope_utils.ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]]
    theirs, attention_factor = init(config, torch.device("cpu"))
    assert attention_factor == 1.0  # cos and sin are not rescaled for these types
    fields = {k: v for k, v in rope_parameters.items() if k not in ("rope_theta",)}
    scaling = decoder_config.RopeScaling(**fields)
    ours = attention.inverse_frequencies(head_dim, rope_parameters["rope_theta"], scaling)
    plain = attention.inverse_frequencies(head_dim, rope_parameters["rope_theta"])
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-6)
    # The scaling changes the low frequencies and keeps the highest.
    assert np.abs(np.asarray(ours) / np.asarray(plain) - 1).max() > 0.5
    if rope_parameters["rope_type"] == "llama3":
        assert ours[0] == plain[0]
        smoothed = (np.asarray(ours) != np.asarray(plain)) & (np.asarray(ours) != np.asarray(plain) / 32.0)
        assert smoothed.any()  # some frequency lies in the interpolated band
