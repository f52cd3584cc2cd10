"""The decoder in depth on Gemma 2: parity with transformers, caches, bfloat16, partial outputs.

Every family's parity is checked in tests/families_test.py; here the
decoder's machinery is checked on Gemma 2, the family with the most
features at once (sandwich norms, both softcaps, sliding windows). A tiny
random Gemma2ForCausalLM is saved with ``save_pretrained`` (once as
one file, once sharded) and loaded through ``checkpoints.load_hf_model``.
The batches are left-padded and longer than the sliding window; the norm
weights are randomised (transformers initialises them to zero) and the
softcaps are small enough to bind.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from moraljax.llm import checkpoints
from moraljax.llm import decoder
from moraljax.llm import lora
from moraljax.llm import policy as policy_lib
from moraljax.llm import sampling

VOCAB = 200
WINDOW = 8
LAYER_TYPES = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]


def _hf_config(**overrides):
    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        sliding_window=WINDOW,
        layer_types=LAYER_TYPES,
        # Small caps and large weights so that both tanh caps bind.
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
        query_pre_attn_scalar=16,
        initializer_range=0.2,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
        attn_implementation="eager",
    )
    kwargs.update(overrides)
    return transformers.Gemma2Config(**kwargs)


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(_hf_config()).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.normal_(0.0, 0.5)
    return model


@pytest.fixture(scope="module")
def checkpoint_dirs(hf_model, tmp_path_factory):
    single = tmp_path_factory.mktemp("single")
    sharded = tmp_path_factory.mktemp("sharded")
    hf_model.save_pretrained(single)
    hf_model.save_pretrained(sharded, max_shard_size="100KB")
    return single, sharded


@pytest.fixture(scope="module")
def policy(checkpoint_dirs):
    loaded, _ = checkpoints.load_hf_model(checkpoint_dirs[0], key=jax.random.key(0))
    return loaded


def _left_padded_batch(seed, batch, length, pads):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (batch, length))
    mask = (np.arange(length)[None, :] >= np.asarray(pads)[:, None]).astype(np.int64)
    return ids * mask, mask


def _hf_logits(model, ids, mask):
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        )
    return out.logits.numpy()


@nnx.jit
def _forward_logits(policy, ids, mask):
    out = policy.forward(ids, decoder.positions_from_mask(mask), mask, lora_enabled=False)
    return policy.logits(out.hidden)


def _our_logits(policy, ids, mask):
    return np.asarray(_forward_logits(policy, jnp.asarray(ids), jnp.asarray(mask)))


def _with_config(policy, config):
    """The same weights under another config (e.g. without a softcap)."""
    abstract = nnx.eval_shape(lambda: policy_lib.Policy(config, key=jax.random.key(0)))
    graphdef = nnx.graphdef(abstract)
    return nnx.merge(graphdef, nnx.state(policy))


def test_sharded_checkpoint_really_has_shards(checkpoint_dirs):
    index = json.loads((checkpoint_dirs[1] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (checkpoint_dirs[1] / "model.safetensors").exists()


@pytest.mark.parametrize("which", ["single", "sharded"])
def test_logits_match_transformers_on_left_padded_batch(hf_model, checkpoint_dirs, which):
    directory = dict(single=checkpoint_dirs[0], sharded=checkpoint_dirs[1])[which]
    loaded, config = checkpoints.load_hf_model(directory, key=jax.random.key(0))
    assert config.layer_types == tuple(LAYER_TYPES)
    ids, mask = _left_padded_batch(0, batch=3, length=20, pads=[5, 11, 0])
    ours = _our_logits(loaded, ids, mask)
    theirs = _hf_logits(hf_model, ids, mask)
    valid = mask.astype(bool)
    assert ours.shape == (3, 20, VOCAB)
    np.testing.assert_array_less(np.abs(ours - theirs)[valid].max(), 1e-4)


def test_softcaps_bind(policy):
    """Without either cap the logits change, so both caps were active above."""
    ids, mask = _left_padded_batch(1, batch=2, length=20, pads=[3, 0])
    capped = _our_logits(policy, ids, mask)
    valid = mask.astype(bool)
    no_final = _with_config(policy, dataclasses.replace(policy.config, final_logit_softcapping=None))
    raw = _our_logits(no_final, ids, mask)
    assert np.abs(raw[valid]).max() > 1.5 * 3.0
    no_attn = _with_config(policy, dataclasses.replace(policy.config, attn_logit_softcapping=None))
    assert np.abs(_our_logits(no_attn, ids, mask) - capped)[valid].max() > 1e-2


def test_sliding_window_matters(policy):
    """With an unbounded window the logits beyond the window change."""
    ids, mask = _left_padded_batch(2, batch=1, length=20, pads=[0])
    wide = _with_config(policy, dataclasses.replace(policy.config, sliding_window=1000))
    diff = np.abs(_our_logits(wide, ids, mask) - _our_logits(policy, ids, mask))[0]
    np.testing.assert_allclose(diff[:WINDOW], 0.0, atol=1e-6)
    assert diff[WINDOW:].max() > 1e-3


def test_greedy_generation_matches_transformers(hf_model, policy):
    ids, mask = _left_padded_batch(3, batch=3, length=12, pads=[4, 0, 9])
    with torch.no_grad():
        hf_out = hf_model.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=8,
            min_new_tokens=8,
            do_sample=False,
            pad_token_id=0,
        )
    hf_tokens = hf_out[:, ids.shape[1] :].numpy()
    generate = nnx.jit(sampling.generate, static_argnames=("gen_len", "top_k", "lora_enabled"))
    ours = generate(policy, jnp.asarray(ids), jnp.asarray(mask), jax.random.key(0), gen_len=8, top_k=1)
    np.testing.assert_array_equal(np.asarray(ours.tokens), hf_tokens)
    # min_new_tokens only masks EOS; greedy never picked it, so it never acted.
    assert not np.any(hf_tokens == 1)


def test_kv_cache_decode_equals_full_forward(policy):
    """Prefill + one-token decode steps (past the window) = one full forward."""
    ids, mask = _left_padded_batch(4, batch=2, length=16, pads=[3, 0])
    prompt_len, steps = 10, 6
    prompt_ids, prompt_mask = jnp.asarray(ids[:, :prompt_len]), jnp.asarray(mask[:, :prompt_len])
    prefill = nnx.jit(sampling.prefill, static_argnames=("max_new_tokens", "lora_enabled"))
    decode_step = nnx.jit(sampling.decode_step, static_argnames=("lora_enabled",))
    cache, hidden = prefill(policy, prompt_ids, prompt_mask, max_new_tokens=steps, lora_enabled=False)
    decoded = [hidden]
    for step in range(steps):
        cache, hidden = decode_step(policy, cache, jnp.asarray(ids[:, prompt_len + step]), lora_enabled=False)
        decoded.append(hidden)
    decoded = np.stack(decoded[:-1], axis=1)  # hidden of tokens prompt_len-1 .. 14

    full_mask = jnp.asarray(mask)
    full = policy.forward(jnp.asarray(ids), decoder.positions_from_mask(full_mask), full_mask, lora_enabled=False)
    expected = np.asarray(full.hidden[:, prompt_len - 1 : prompt_len - 1 + steps])
    np.testing.assert_allclose(decoded, expected, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(cache.end_index), [16, 16])
    np.testing.assert_array_equal(np.asarray(cache.next_position), [13, 16])


def test_bfloat16_weights_stay_close(checkpoint_dirs, policy):
    bf16, _ = checkpoints.load_hf_model(checkpoint_dirs[0], param_dtype=jnp.bfloat16, key=jax.random.key(0))
    assert bf16.model.layers.self_attn.q_proj.kernel[...].dtype == jnp.bfloat16
    ids, mask = _left_padded_batch(5, batch=2, length=12, pads=[2, 0])
    ours16 = _our_logits(bf16, ids, mask)
    assert ours16.dtype == np.float32
    diff = np.abs(ours16 - _our_logits(policy, ids, mask))[mask.astype(bool)]
    assert diff.max() < 0.3  # bf16 rounding of weights and activations only


def test_positions_from_mask():
    mask = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    np.testing.assert_array_equal(
        decoder.positions_from_mask(mask), [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4], [0, 0, 0, 0, 0]]
    )


def test_rms_norm_by_hand():
    x = jnp.array([[3.0, 4.0]])
    # mean(x^2) = 12.5; x / sqrt(12.5) * (1 + [0, 1]) (Gemma), or * [0.5, 2] (Llama, Qwen).
    np.testing.assert_allclose(
        decoder.rms_norm(x, jnp.array([0.0, 1.0]), 0.0), [[3 / 12.5**0.5, 8 / 12.5**0.5]], rtol=1e-6
    )
    np.testing.assert_allclose(
        decoder.rms_norm(x, jnp.array([0.5, 2.0]), 0.0, offset=0.0), [[1.5 / 12.5**0.5, 8 / 12.5**0.5]], rtol=1e-6
    )
    # Without the offset the weight applies in the input's dtype, like transformers' LlamaRMSNorm.
    bf16 = decoder.rms_norm(x.astype(jnp.bfloat16), jnp.array([0.3, 0.7], jnp.bfloat16), 0.0, offset=0.0)
    normed = (x / 12.5**0.5).astype(jnp.bfloat16)
    np.testing.assert_array_equal(bf16, (normed * jnp.array([0.3, 0.7], jnp.bfloat16)).astype(jnp.float32))


def _adapted_policy(num_layers):
    """A random policy with non-zero adapters (fresh ones are exact no-ops)."""
    config = decoder.DecoderConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=4,
        layer_types=tuple(["sliding_attention", "full_attention"] * num_layers)[:num_layers],
        sliding_window=3, query_pre_attn_scalar=4,
    )
    lora_config = lora.LoraConfig(rank=2, alpha=4.0, dropout=0.3)
    policy = policy_lib.init_policy(config, lora=lora_config, value_head_dropout=0.0, key=jax.random.key(1))
    trainable = nnx.state(policy, lora.TRAINABLE)
    noise = jax.random.normal(jax.random.key(2), (sum(x.size for x in jax.tree.leaves(trainable)),))
    leaves, offset = [], 0
    for leaf in jax.tree.leaves(trainable):
        leaves.append(leaf + 0.3 * noise[offset : offset + leaf.size].reshape(leaf.shape))
        offset += leaf.size
    nnx.update(policy, jax.tree.unflatten(jax.tree.structure(trainable), leaves))
    return policy


@pytest.mark.parametrize("num_layers", [2, 5])  # a Python loop and a scan over layers
def test_num_outputs_gives_the_last_hidden_states_of_the_full_forward(num_layers):
    policy = _adapted_policy(num_layers)
    ids, mask = _left_padded_batch(7, batch=3, length=9, pads=[0, 4, 2])
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    positions = decoder.positions_from_mask(mask)
    dropout_key = jax.random.key(3)

    @nnx.jit(static_argnames="num_outputs")
    def forward(policy, num_outputs, cache=None):
        out = policy.forward(ids, positions, mask, cache, dropout_key=dropout_key, num_outputs=num_outputs)
        return out.hidden, out.cache

    full, _ = forward(policy, None)
    for n in (1, 3, 9):
        tail, _ = forward(policy, n)
        assert tail.shape == (3, n, 16)
        np.testing.assert_allclose(tail, full[:, -n:], rtol=1e-5, atol=1e-5)
    # Through a cache (prefill), every token's keys and values are still written.
    cache = decoder.init_cache(policy.config, 3, 11, jnp.float32)
    full_hidden, full_cache = forward(policy, None, cache)
    last_hidden, last_cache = forward(policy, 1, cache)
    np.testing.assert_allclose(last_hidden, full_hidden[:, -1:], rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(last_cache), jax.tree.leaves(full_cache)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="num_outputs"):
        policy.forward(ids, positions, mask, num_outputs=10)
