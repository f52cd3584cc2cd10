"""Prefill/decode/generate and response scoring on a tiny random policy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moraljax.llm import decoder
from moraljax.llm import lora
from moraljax.llm import policy as policy_lib
from moraljax.llm import sampling

CONFIG = decoder.DecoderConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    layer_types=("sliding_attention", "full_attention"),
    sliding_window=6,
    query_pre_attn_scalar=8,
)
GEN_LEN = 5
STATIC = ("gen_len", "temperature", "top_k", "top_p", "lora_enabled")


@pytest.fixture(scope="module")
def policy():
    built = policy_lib.init_policy(CONFIG, lora=lora.LoraConfig(rank=4), key=jax.random.key(0))
    # Larger weights than the 0.02 init, so the distributions are not flat,
    # and non-zero B factors, so the adapter matters.
    graphdef, trainable, frozen = policy_lib.split_policy(built)
    frozen = jax.tree.map(lambda x: 10.0 * x, frozen)
    flat = []
    for index, (path, variable) in enumerate(nnx.to_flat_state(trainable)):
        if path[-1] == lora.LORA_B_NAME:
            variable = variable.copy(0.5 * jax.random.normal(jax.random.key(index), variable.shape))
        flat.append((path, variable))
    return policy_lib.merge_policy(graphdef, nnx.from_flat_state(flat), frozen)


@pytest.fixture(scope="module")
def prompts():
    ids = jax.random.randint(jax.random.key(1), (3, 9), 0, CONFIG.vocab_size)
    mask = (jnp.arange(9)[None, :] >= jnp.array([[3], [0], [6]])).astype(jnp.int32)
    return ids * mask, mask


generate = nnx.jit(sampling.generate, static_argnames=STATIC)
generate_from_cache = nnx.jit(sampling.generate_from_cache, static_argnames=STATIC)
prefill = nnx.jit(sampling.prefill, static_argnames=("max_new_tokens", "lora_enabled"))
score = nnx.jit(sampling.score_responses, static_argnames=("lora_enabled",))


@nnx.jit
def _argmax_next_tokens(policy, ids, mask):
    """Greedy choice after every prefix of ``ids`` (causal: one forward)."""
    forward = policy.forward(ids, decoder.positions_from_mask(mask), mask)
    return jnp.argmax(policy.logits(forward.hidden), axis=-1).astype(jnp.int32)


def test_logprobs_and_values_match_a_full_forward(policy, prompts):
    ids, mask = prompts
    out = generate(policy, ids, mask, jax.random.key(2), gen_len=GEN_LEN)
    assert out.tokens.shape == (3, GEN_LEN) and out.tokens.dtype == jnp.int32
    assert out.logprobs.dtype == jnp.float32 and out.values.dtype == jnp.float32
    scored = score(policy, ids, mask, out.tokens)
    np.testing.assert_allclose(out.logprobs, scored.logprobs, atol=2e-5)
    np.testing.assert_allclose(out.values, scored.values, atol=2e-5)
    assert np.all(np.asarray(out.logprobs) <= 0.0)
    # Non-trivial distributions: the test would not notice an off-by-one otherwise.
    assert np.asarray(scored.entropy).mean() > 0.3
    assert np.asarray(out.logprobs).min() < -0.5


def test_top_k_one_is_greedy(policy, prompts):
    ids, mask = prompts
    out = generate(policy, ids, mask, jax.random.key(3), gen_len=GEN_LEN, top_k=1)
    # Greedy means: each token is the argmax after its prefix. Checked with
    # one cache-free forward over prompt + generated tokens.
    full_ids = jnp.concatenate([ids, out.tokens], axis=1)
    full_mask = jnp.concatenate([mask, jnp.ones_like(out.tokens)], axis=1)
    argmax = _argmax_next_tokens(policy, full_ids, full_mask)
    np.testing.assert_array_equal(out.tokens, argmax[:, ids.shape[1] - 1 : -1])
    # Another key changes nothing when greedy.
    again = generate(policy, ids, mask, jax.random.key(4), gen_len=GEN_LEN, top_k=1)
    np.testing.assert_array_equal(out.tokens, again.tokens)


def test_generation_is_deterministic_per_key(policy, prompts):
    ids, mask = prompts
    first = generate(policy, ids, mask, jax.random.key(5), gen_len=GEN_LEN)
    second = generate(policy, ids, mask, jax.random.key(5), gen_len=GEN_LEN)
    other = generate(policy, ids, mask, jax.random.key(6), gen_len=GEN_LEN)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(second)):
        np.testing.assert_array_equal(a, b)
    assert np.any(np.asarray(first.tokens) != np.asarray(other.tokens))


def test_generate_equals_prefill_then_generate_from_cache(policy, prompts):
    ids, mask = prompts
    key = jax.random.key(7)
    whole = generate(policy, ids, mask, key, gen_len=GEN_LEN)
    cache, last_hidden = prefill(policy, ids, mask, max_new_tokens=GEN_LEN - 1)
    from_cache = generate_from_cache(policy, cache, last_hidden, key, gen_len=GEN_LEN)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(from_cache)):
        np.testing.assert_array_equal(a, b)


def test_gathered_cache_rows_reuse_distinct_prefixes(policy, prompts):
    """Prefill each distinct prompt once, then gather rows per decision."""
    ids, mask = prompts
    cache, last_hidden = prefill(policy, ids, mask, max_new_tokens=GEN_LEN - 1)
    index = jnp.array([2, 0, 0, 1, 2])
    gathered = jax.tree.map(lambda x: x[index], cache)
    key = jax.random.key(8)
    from_gathered = generate_from_cache(policy, gathered, last_hidden[index], key, gen_len=GEN_LEN, top_k=1)
    direct = generate(policy, ids[index], mask[index], key, gen_len=GEN_LEN, top_k=1)
    np.testing.assert_array_equal(from_gathered.tokens, direct.tokens)
    np.testing.assert_allclose(from_gathered.logprobs, direct.logprobs, atol=1e-6)


def test_reference_model_is_the_adapter_switched_off(policy, prompts):
    ids, mask = prompts
    out = generate(policy, ids, mask, jax.random.key(9), gen_len=GEN_LEN)
    with_adapter = score(policy, ids, mask, out.tokens)
    reference = score(policy, ids, mask, out.tokens, lora_enabled=False)
    assert np.abs(np.asarray(with_adapter.logprobs - reference.logprobs)).max() > 1e-3
    graphdef, trainable, frozen = policy_lib.split_policy(policy)
    zero_b = jax.tree.map(jnp.zeros_like, trainable)  # B = 0 (and A = 0): base model
    base = policy_lib.merge_policy(graphdef, zero_b, frozen)
    np.testing.assert_allclose(reference.logprobs, score(policy=base, prompt_ids=ids, prompt_mask=mask,
                                                         response_ids=out.tokens).logprobs, atol=1e-6)


def test_score_dropout_is_keyed(policy, prompts):
    ids, mask = prompts
    response = jnp.ones((3, 2), jnp.int32)
    plain = score(policy, ids, mask, response)
    again = score(policy, ids, mask, response)
    dropped = score(policy, ids, mask, response, dropout_key=jax.random.key(10))
    np.testing.assert_array_equal(plain.logprobs, again.logprobs)
    assert np.abs(np.asarray(dropped.logprobs - plain.logprobs)).max() > 1e-4
    assert np.abs(np.asarray(dropped.values - plain.values)).max() > 1e-4


def test_sampling_with_dropout_equals_a_forward_with_the_same_key(policy, prompts):
    # TRL samples in train mode (rl/ppo.py): LoRA dropout acts while sampling.
    ids, mask = prompts
    key, dropout_key = jax.random.key(11), jax.random.key(12)
    out = generate(policy, ids, mask, key, gen_len=GEN_LEN, dropout_key=dropout_key)
    keyed = score(policy, ids, mask, out.tokens, dropout_key=dropout_key)
    plain = score(policy, ids, mask, out.tokens)
    # The masks sit at sequence positions: the same entries drop in every
    # row of the padded batch as in one scoring forward with the key.
    np.testing.assert_allclose(out.logprobs, keyed.logprobs, atol=2e-6)
    assert np.abs(np.asarray(out.logprobs - plain.logprobs)).max() > 1e-3
    other = score(policy, ids, mask, out.tokens, dropout_key=jax.random.key(13))
    assert np.abs(np.asarray(out.logprobs - other.logprobs)).max() > 1e-3
    # Generation never runs the value head in TRL: values carry the LoRA
    # dropout of the forward, not value-head dropout (the same model with a
    # dropout-free head scores them).
    _, trainable, frozen = policy_lib.split_policy(policy)
    no_head_dropout = policy_lib.init_policy(CONFIG, lora=lora.LoraConfig(rank=4), value_head_dropout=0.0,
                                             key=jax.random.key(0))
    head_graphdef, _, _ = policy_lib.split_policy(no_head_dropout)
    same_head = policy_lib.merge_policy(head_graphdef, trainable, frozen)
    np.testing.assert_allclose(out.values, score(same_head, ids, mask, out.tokens, dropout_key=dropout_key).values,
                               atol=2e-6)
    assert np.abs(np.asarray(out.values - keyed.values)).max() > 1e-4
    # Tokens are drawn with `key` alone: without dropout, the same key draws
    # from the dropout-free distribution through the KV cache.
    cached = generate(policy, ids, mask, key, gen_len=GEN_LEN)
    np.testing.assert_allclose(cached.logprobs, score(policy, ids, mask, cached.tokens).logprobs, atol=2e-5)


def test_filter_logits_by_hand():
    logits = jnp.log(jnp.array([[0.1, 0.4, 0.2, 0.3]]))
    inf = -np.inf
    np.testing.assert_array_equal(
        np.isfinite(sampling.filter_logits(logits, top_k=2)), [[False, True, False, True]]
    )
    # Descending: 0.4, 0.3, 0.2, 0.1; mass before each: 0, 0.4, 0.7, 0.9.
    np.testing.assert_array_equal(
        np.isfinite(sampling.filter_logits(logits, top_p=0.7)), [[False, True, False, True]]
    )
    np.testing.assert_array_equal(
        np.isfinite(sampling.filter_logits(logits, top_p=0.75)), [[False, True, True, True]]
    )
    np.testing.assert_array_equal(
        np.isfinite(sampling.filter_logits(logits, top_p=0.3)), [[False, True, False, False]]
    )
    np.testing.assert_allclose(sampling.filter_logits(logits), logits, rtol=1e-6)
    assert sampling.filter_logits(logits, top_k=1)[0, 0] == inf
    with pytest.raises(ValueError, match="top_p"):
        sampling.filter_logits(logits, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        sampling.filter_logits(logits, top_k=-1)
    with pytest.raises(ValueError, match="temperature"):
        sampling.sample_token(logits, jax.random.key(0), temperature=0.0)


def test_log_softmax_helpers_by_hand():
    logits = jnp.array([[0.0, math.log(3.0)]])  # probabilities 1/4, 3/4
    np.testing.assert_allclose(sampling.token_log_probs(logits, jnp.array([1])), [math.log(0.75)], rtol=1e-6)
    expected_entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    np.testing.assert_allclose(sampling.entropy(logits), [expected_entropy], rtol=1e-6)


def test_sampling_frequencies_follow_the_softmax():
    logits = jnp.log(jnp.array([[0.2, 0.5, 0.3]]))
    keys = jax.random.split(jax.random.key(11), 4000)
    draws = jax.jit(jax.vmap(lambda k: sampling.sample_token(logits, k)))(keys)[:, 0]
    frequencies = np.bincount(np.asarray(draws), minlength=3) / 4000
    np.testing.assert_allclose(frequencies, [0.2, 0.5, 0.3], atol=0.03)
