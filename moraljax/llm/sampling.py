"""Prefill, fixed-length decoding with a KV cache, and response scoring.

Everything here is a pure function of a ``Policy`` (merge it from its
states inside ``jax.jit``/``jax.vmap``) and traces under jit with static
lengths. Generation never stops early: exactly ``gen_len`` tokens are drawn
(the agent's answer is parsed from them afterwards), as in the paper's
``max_new_tokens`` generation without EOS handling inside the batch.

Conventions shared with the PPO code (TRL 0.9 ``PPOTrainer``):
- log-probabilities are ``log_softmax`` of the float32, temperature-1
  logits at the chosen tokens (``token_log_probs``; training uses the same
  function, so behaviour and update log-probs agree bit for bit in float32);
- the value of generated token i is the value head at the position whose
  output predicts token i (the last prompt token for i = 0);
- dropout masks are a function of (key, row, position in the prompt +
  response sequence, feature): ``generate`` with a ``dropout_key`` and
  ``score_responses`` with the same key drop the same entries, so a
  sampled answer's log-probs can be recomputed exactly.

Axis legend (docs/ARCHITECTURE.md, "Axis letters"): B rows of one model call,
T prompt tokens, A answer tokens (generated or scored per row; gen_len), D
model width, V vocabulary.
"""

import chex
import flax.struct
import jax
import jax.numpy as jnp

from moraljax.llm import decoder
from moraljax.llm import policy as policy_lib


@flax.struct.dataclass
class GenerateOutput:
    """Result of ``generate``.

    Attributes:
        tokens: int32 [B, A] sampled tokens.
        logprobs: float32 [B, A] log p(token) under the temperature-1 policy.
        values: float32 [B, A] value-head outputs (TRL convention, above).
    """

    tokens: jax.Array
    logprobs: jax.Array
    values: jax.Array


@flax.struct.dataclass
class ScoreOutput:
    """Result of ``score_responses``.

    Attributes:
        logprobs: float32 [B, A] log p(response token).
        values: float32 [B, A] values at the positions predicting each token.
        entropy: float32 [B, A] entropy of each predictive distribution.
    """

    logprobs: jax.Array
    values: jax.Array
    entropy: jax.Array


def log_softmax(logits: jax.Array) -> jax.Array:
    """float32 log-probabilities over the last axis: the one log-softmax of moraljax."""
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def token_log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log softmax(logits)[token].

    Args:
        logits: [..., V].
        tokens: int [...].

    Returns:
        float32 [...].
    """
    log_probs = log_softmax(logits)
    return jnp.take_along_axis(log_probs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def entropy(logits: jax.Array) -> jax.Array:
    """H = -sum_v p_v log p_v of softmax(logits), float32 [...] from [..., V]."""
    log_probs = log_softmax(logits)
    return -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Masks logits outside the top-k and/or nucleus (top-p) sets with -inf.

    Top-k keeps the k largest logits (ties at the k-th value are kept).
    Top-p keeps the smallest set of most likely tokens whose probability
    reaches ``top_p``: token i (in descending order) is kept when the mass of
    the tokens before it is below ``top_p``; the most likely is always kept.

    Args:
        logits: float [..., V].
        top_k: static; 0 disables.
        top_p: in (0, 1]; 1 disables.

    Returns:
        [..., V] float32 logits with the removed entries at -inf.

    Raises:
        ValueError: for a negative ``top_k`` or ``top_p`` outside (0, 1].
    """
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables), got {top_k}.")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    logits = logits.astype(jnp.float32)
    if top_k > 0 and top_k < logits.shape[-1]:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        kept = mass_before < top_p
        threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_token(
    logits: jax.Array, key: jax.Array, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
    """Draws one token per row.

    Args:
        logits: float [B, V].
        key: PRNG key.
        temperature: > 0; the filtered logits are divided by it.
        top_k: static; 0 disables.
        top_p: nucleus mass; 1 disables.

    Returns:
        int32 [B].

    Raises:
        ValueError: for temperature <= 0 (use top_k=1 for greedy decoding).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (use top_k=1 for greedy), got {temperature}.")
    filtered = filter_logits(logits, top_k=top_k, top_p=top_p)
    return jax.random.categorical(key, filtered / temperature, axis=-1).astype(jnp.int32)


def prefill(
    policy: policy_lib.Policy,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    max_new_tokens: int,
    *,
    lora_enabled: bool = True,
) -> tuple[decoder.KVCache, jax.Array]:
    """Runs left-padded prompts through the model into a fresh cache.

    Args:
        policy: the policy.
        prompt_ids: int [B, T], left-padded.
        prompt_mask: [B, T], 1 for real tokens.
        max_new_tokens: static; room left in the cache for tokens after the
            prompt (capacity T + max_new_tokens).
        lora_enabled: static; False for the reference model.

    Returns:
        (cache, last_hidden float32 [B, D] of the last prompt token).
    """
    chex.assert_rank([prompt_ids, prompt_mask], 2)
    chex.assert_equal_shape([prompt_ids, prompt_mask])
    batch, length = prompt_ids.shape
    cache = decoder.init_cache(policy.config, batch, length + max_new_tokens, policy.model.dtype)
    positions = decoder.positions_from_mask(prompt_mask)
    out = policy.forward(prompt_ids, positions, prompt_mask, cache, lora_enabled=lora_enabled, num_outputs=1)
    return out.cache, out.hidden[:, -1]


def decode_step(
    policy: policy_lib.Policy, cache: decoder.KVCache, tokens: jax.Array, *, lora_enabled: bool = True
) -> tuple[decoder.KVCache, jax.Array]:
    """Feeds one token per row through the cache.

    Args:
        policy: the policy.
        cache: cache with at least one free slot.
        tokens: int [B], the tokens to append.
        lora_enabled: static.

    Returns:
        (updated cache, hidden float32 [B, D] of the appended tokens).
    """
    chex.assert_rank(tokens, 1)
    step_tokens = tokens[:, None]
    positions = cache.next_position[:, None]
    out = policy.forward(step_tokens, positions, jnp.ones_like(step_tokens), cache, lora_enabled=lora_enabled)
    return out.cache, out.hidden[:, 0]


def generate_from_cache(
    policy: policy_lib.Policy,
    cache: decoder.KVCache,
    last_hidden: jax.Array,
    key: jax.Array,
    gen_len: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    lora_enabled: bool = True,
) -> GenerateOutput:
    """Samples exactly ``gen_len`` tokens after a prefilled prefix.

    Token i is drawn with ``fold_in(key, i)``; the cache needs
    ``gen_len - 1`` free slots (the last token is never fed back).

    Args:
        policy: the policy.
        cache: the prefix's cache (e.g. from ``prefill``, or rows gathered
            from one).
        last_hidden: float32 [B, D], hidden state of the prefix's last token.
        key: PRNG key.
        gen_len: static A, the number of tokens, >= 1.
        temperature, top_k, top_p: sampling settings (paper: 1, 0, 1).
        lora_enabled: static.

    Returns:
        ``GenerateOutput`` with [B, A] arrays.

    Raises:
        ValueError: if ``gen_len`` < 1.
    """
    if gen_len < 1:
        raise ValueError(f"gen_len must be >= 1, got {gen_len}.")
    chex.assert_rank(last_hidden, 2)

    def emit(hidden, step):
        logits = policy.logits(hidden)
        token = sample_token(
            logits, jax.random.fold_in(key, step), temperature=temperature, top_k=top_k, top_p=top_p
        )
        return token, token_log_probs(logits, token), policy.values(hidden)

    def step_fn(carry, step):
        cache, hidden = carry
        token, logprob, value = emit(hidden, step)
        cache, hidden = decode_step(policy, cache, token, lora_enabled=lora_enabled)
        return (cache, hidden), (token, logprob, value)

    (_, hidden), (tokens, logprobs, values) = jax.lax.scan(
        step_fn, (cache, last_hidden), jnp.arange(gen_len - 1)
    )
    last_token, last_logprob, last_value = emit(hidden, gen_len - 1)

    def with_last(stacked, last):  # [A-1, B] + [B] -> [B, A]
        return jnp.concatenate([stacked, last[None]], axis=0).T

    return GenerateOutput(
        tokens=with_last(tokens, last_token),
        logprobs=with_last(logprobs, last_logprob),
        values=with_last(values, last_value),
    )


def generate(
    policy: policy_lib.Policy,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    gen_len: int,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    lora_enabled: bool = True,
    dropout_key: jax.Array | None = None,
) -> GenerateOutput:
    """``prefill`` then ``generate_from_cache``: exactly ``gen_len`` tokens.

    With a ``dropout_key`` the model samples as TRL's does in train mode
    (LoRA dropout on, rl/ppo.py): every token is drawn from a full forward
    of prompt + response (``_generate_with_dropout``), whose dropout masks
    are those of ``score_responses`` with the same key.

    Args:
        policy: the policy.
        prompt_ids: int [B, T] left-padded prompts.
        prompt_mask: [B, T].
        key: PRNG key of the token draws.
        gen_len: static A, the number of tokens.
        temperature, top_k, top_p: sampling settings (paper: 1, 0, 1).
        lora_enabled: static.
        dropout_key: None for no dropout (the KV-cached path); otherwise
            split like ``score_responses``' key, of which the LoRA half is
            used (TRL's generation never runs the value head, so the values
            returned are computed without value-head dropout).

    Returns:
        ``GenerateOutput``.
    """
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, lora_enabled=lora_enabled)
    if dropout_key is not None:
        return _generate_with_dropout(policy, prompt_ids, prompt_mask, key, gen_len, dropout_key, **settings)
    # The last token is never fed back: gen_len - 1 free slots suffice.
    cache, last_hidden = prefill(policy, prompt_ids, prompt_mask, gen_len - 1, lora_enabled=lora_enabled)
    return generate_from_cache(policy, cache, last_hidden, key, gen_len, **settings)


def _generate_with_dropout(
    policy: policy_lib.Policy,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    key: jax.Array,
    gen_len: int,
    dropout_key: jax.Array,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    lora_enabled: bool,
) -> GenerateOutput:
    """Samples ``gen_len`` tokens, each from a full forward with dropout.

    Step i runs the [B, T + gen_len] sequence of ``score_responses`` (the
    tokens not drawn yet are placeholders, invisible to the positions read
    by causality) with its dropout key and reads the output predicting
    token i. Same shapes, same key: the same masks, so the log-probs equal
    ``score_responses(..., dropout_key)`` of the drawn tokens. Without a KV
    cache this costs gen_len full forwards instead of one prefill and
    gen_len - 1 single-token steps (2 forwards of T + 2 tokens instead of
    T + 1 token-forwards for the paper's 2 tokens); a cached version needs
    the model's decode step to place its dropout rows at their sequence
    positions.
    """
    if gen_len < 1:
        raise ValueError(f"gen_len must be >= 1, got {gen_len}.")
    key_model, _ = jax.random.split(dropout_key)
    batch = prompt_ids.shape[0]
    response = jnp.zeros((batch, gen_len), prompt_ids.dtype)
    mask = jnp.concatenate([prompt_mask, jnp.ones_like(response, dtype=prompt_mask.dtype)], axis=1)
    positions = decoder.positions_from_mask(mask)
    tokens, logprobs, values = [], [], []
    for step in range(gen_len):  # 2 in the paper: unrolled.
        out = policy.forward(
            jnp.concatenate([prompt_ids, response], axis=1),
            positions,
            mask,
            lora_enabled=lora_enabled,
            dropout_key=key_model,
            num_outputs=gen_len + 1,
        )
        hidden = out.hidden[:, step]
        logits = policy.logits(hidden)
        token = sample_token(
            logits, jax.random.fold_in(key, step), temperature=temperature, top_k=top_k, top_p=top_p
        )
        response = response.at[:, step].set(token.astype(response.dtype))
        tokens.append(token)
        logprobs.append(token_log_probs(logits, token))
        values.append(policy.values(hidden))
    stack = lambda arrays: jnp.stack(arrays, axis=1)
    return GenerateOutput(tokens=stack(tokens), logprobs=stack(logprobs), values=stack(values))


def score_responses(
    policy: policy_lib.Policy,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    response_ids: jax.Array,
    *,
    lora_enabled: bool = True,
    dropout_key: jax.Array | None = None,
) -> ScoreOutput:
    """Log-probs, values and entropies of given responses (one full forward).

    Differentiable; used by the PPO update, for the dropout-free old
    log-probs and values of sampled answers, and for the reference
    log-probs (``lora_enabled=False``). Logits are computed only at
    the A positions that predict response tokens.

    Args:
        policy: the policy.
        prompt_ids: int [B, T] left-padded prompts.
        prompt_mask: [B, T].
        response_ids: int [B, A] (all real tokens).
        lora_enabled: static.
        dropout_key: None for no dropout; otherwise split into a LoRA-dropout
            key and a value-head-dropout key.

    Returns:
        ``ScoreOutput`` with [B, A] arrays.
    """
    chex.assert_rank([prompt_ids, prompt_mask, response_ids], 2)
    chex.assert_equal_shape([prompt_ids, prompt_mask])
    chex.assert_equal_shape_prefix([prompt_ids, response_ids], 1)
    response_len = response_ids.shape[1]
    tokens = jnp.concatenate([prompt_ids, response_ids.astype(prompt_ids.dtype)], axis=1)
    mask = jnp.concatenate([prompt_mask, jnp.ones_like(response_ids, dtype=prompt_mask.dtype)], axis=1)
    if dropout_key is None:
        key_model = key_value = None
    else:
        key_model, key_value = jax.random.split(dropout_key)
    # Only the positions that predict response tokens are read: the last
    # response_len + 1 outputs, less the final token's.
    out = policy.forward(
        tokens,
        decoder.positions_from_mask(mask),
        mask,
        lora_enabled=lora_enabled,
        dropout_key=key_model,
        num_outputs=response_len + 1,
    )
    hidden = out.hidden[:, :response_len]
    logits = policy.logits(hidden)
    return ScoreOutput(
        logprobs=token_log_probs(logits, response_ids),
        values=policy.values(hidden, key_value),
        entropy=entropy(logits),
    )
