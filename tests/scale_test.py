"""Real-scale machinery at small widths: rematerialisation, the layer scan, saved bytes, model sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moraljax import config_lib
from moraljax import run_setup
from moraljax.llm import decoder
from moraljax.llm import lora
from moraljax.llm import policy as policy_lib
from moraljax.llm import sampling

# Six layers: deeper than decoder._MAX_UNROLLED_LAYERS, so the layers run in a scan.
CONFIG = dataclasses.replace(decoder.DecoderConfig.gemma2_2b(), vocab_size=96, hidden_size=32,
                             intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=4,
                             layer_types=("sliding_attention", "full_attention") * 3)


def _policy(param_dtype=jnp.float32):
    return policy_lib.init_policy(CONFIG, lora=lora.LoraConfig(rank=4, dropout=0.0), value_head_dropout=0.0,
                                  param_dtype=param_dtype, key=jax.random.key(0))


def _batch():
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, CONFIG.vocab_size, (3, 10)), jnp.int32)
    mask = jnp.asarray(np.arange(10)[None] >= np.array([[0], [2], [5]]), jnp.int32)
    return ids * mask, mask, jnp.asarray(rng.integers(3, CONFIG.vocab_size, (3, 2)), jnp.int32)


def _loss_and_grads(policy, remat):
    policy.model.remat = remat
    graphdef, trainable, frozen = policy_lib.split_policy(policy)
    ids, mask, response = _batch()

    def loss(trainable):
        out = sampling.score_responses(policy_lib.merge_policy(graphdef, trainable, frozen), ids, mask, response)
        return jnp.sum(out.logprobs) + jnp.sum(out.values)

    return jax.jit(jax.value_and_grad(loss))(trainable)


def _trainable_nonzero_b(policy):
    """LoRA B factors start at zero; give them values so every factor gets a gradient."""
    graphdef, trainable, frozen = policy_lib.split_policy(policy)
    leaves, tree = jax.tree.flatten(trainable)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [leaf + 0.1 * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
    return policy_lib.merge_policy(graphdef, jax.tree.unflatten(tree, leaves), frozen)


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_gives_the_gradients_of_no_remat(remat, assert_close_to_scale):
    policy = _trainable_nonzero_b(_policy())
    loss_plain, grads_plain = _loss_and_grads(policy, "none")
    loss_remat, grads_remat = _loss_and_grads(policy, remat)
    # Recomputation repeats the same float32 operations in another compiled
    # program (fused differently): agreement to float32 rounding on the scale
    # of each gradient (entries up to ~10 here; seen: 2e-6 apart).
    np.testing.assert_allclose(loss_remat, loss_plain, rtol=1e-6)
    jax.tree.map(assert_close_to_scale, grads_remat, grads_plain)


def test_scanned_layers_equal_the_unrolled_loop(monkeypatch):
    policy = _trainable_nonzero_b(_policy())
    ids, mask, response = _batch()
    scanned = sampling.score_responses(policy, ids, mask, response)
    monkeypatch.setattr(decoder, "_MAX_UNROLLED_LAYERS", 100)
    unrolled = sampling.score_responses(policy, ids, mask, response)
    np.testing.assert_allclose(scanned.logprobs, unrolled.logprobs, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scanned.values, unrolled.values, rtol=1e-5, atol=1e-6)


def _saved_bytes(policy, remat):
    from jax._src import ad_checkpoint

    policy.model.remat = remat
    graphdef, trainable, frozen = policy_lib.split_policy(policy)
    ids, mask, response = _batch()

    def loss(trainable, frozen):
        out = sampling.score_responses(policy_lib.merge_policy(graphdef, trainable, frozen), ids, mask, response)
        return jnp.sum(out.logprobs)

    residuals = ad_checkpoint.saved_residuals(loss, trainable, frozen)
    return sum(int(np.prod(aval.shape)) * aval.dtype.itemsize for aval, source in residuals
               if "from the argument" not in source)


def test_remat_policies_keep_fewer_bytes_and_bfloat16_keeps_half():
    policy = _policy(jnp.bfloat16)
    none, dots, full = (_saved_bytes(policy, remat) for remat in ("none", "dots", "full"))
    assert full < dots < none
    # "dots" keeps the projections' outputs in the compute dtype: in bfloat16
    # about half of what the same model keeps in float32, not float32 copies.
    assert dots < 0.6 * _saved_bytes(_policy(jnp.float32), "dots")


def test_model_axis_sharding_equals_one_device(assert_close_to_scale):
    config = config_lib.experiment_config("", reward="util")
    config.run.update(seeds=(1,), num_episodes=2, episodes_per_chunk=2)
    results = []
    for model in (1, 8):
        config.mesh.update(data=1, model=model)
        run = run_setup.build_run(config_lib.experiment_from_config_dict(config), devices=jax.devices()[:model])
        run.start_fresh()
        if model == 8:  # The base really is split over the 8 devices.
            sharded = [leaf for leaf in jax.tree.leaves(nnx.to_pure_dict(run.frozen))
                       if len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated]
            assert sharded
        results.append(run.run_chunk(2))
    (m1, s1), (m8, s8) = results
    np.testing.assert_array_equal(m1["action_type"], m8["action_type"])
    for key in s1:
        assert_close_to_scale(s8[key], s1[key], err_msg=key)
