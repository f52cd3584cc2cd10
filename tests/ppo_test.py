"""Tests for the PPO modules (moraljax.rl.ppo_settings, ppo_advantages,
ppo_loss and ppo) against numbers worked out by hand.

Expected values are written out literally (derivations in the comments),
never recomputed with the code under test.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from moraljax.rl import ppo
from moraljax.rl import ppo_advantages
from moraljax.rl import ppo_loss
from moraljax.rl import ppo_settings

EPS32 = float(np.finfo(np.float32).eps)


# --------------------------------------------------------------------------
# Running moments and score normalisation.


def test_running_moments_match_all_scores_seen_so_far():
    batches = [np.array([1.0, 2.0, 3.0, 4.0, 5.0]),
               np.array([0.0, 0.0, 10.0]),
               np.array([-2.0, 7.0])]
    # (mean, population var, unbiased std) of the concatenation so far.
    expected_running = [(3.0, 2.0, 1.5811388),
                        (3.125, 9.609375, 3.3139316),
                        (3.0, 11.8, 3.6209268)]
    # (mean, unbiased std) of each batch alone.
    expected_batch = [(3.0, 1.5811388), (3.3333333, 5.7735027),
                      (2.5, 6.3639610)]
    moments = ppo_advantages.init_running_moments()
    seen = []
    for scores, running, batch in zip(batches, expected_running,
                                      expected_batch):
        moments, batch_mean, batch_std = ppo_advantages.update_running_moments(
            moments, jnp.asarray(scores, jnp.float32))
        seen.extend(scores)
        np.testing.assert_allclose(
            [moments.mean, moments.var, moments.std], running, rtol=1e-5)
        np.testing.assert_allclose([batch_mean, batch_std], batch, rtol=1e-5)
        # Independent check with numpy over everything seen.
        np.testing.assert_allclose(
            [moments.mean, moments.var, moments.std],
            [np.mean(seen), np.var(seen), np.std(seen, ddof=1)], rtol=1e-5)
        assert moments.count == pytest.approx(len(seen))


def test_initial_moments():
    moments = ppo_advantages.init_running_moments()
    assert float(moments.mean) == 0.0
    assert float(moments.var) == 1.0
    assert float(moments.std) == 1.0
    assert float(moments.count) == pytest.approx(1e-24)


def test_normalise_scores_after_update():
    moments, _, _ = ppo_advantages.update_running_moments(
        ppo_advantages.init_running_moments(), jnp.array([1.0, 2.0, 3.0, 4.0, 5.0]))
    # mean 3, std sqrt(2.5) = 1.5811388: (x - 3) / (1.5811388 + eps).
    np.testing.assert_allclose(
        ppo_advantages.normalise_scores(moments, jnp.array([1.0, 2.0, 3.0, 4.0, 5.0])),
        [-1.2649110, -0.6324555, 0.0, 0.6324555, 1.2649110], rtol=1e-6)
    # Without the mean: x / (std + eps).
    np.testing.assert_allclose(
        ppo_advantages.normalise_scores(moments, jnp.array([3.0, -1.5811388]),
                                        use_norm=False), [1.8973666, -1.0], rtol=1e-6)
    # Optional clip.
    np.testing.assert_allclose(
        ppo_advantages.normalise_scores(moments, jnp.array([1.0, 5.0]), clip=1.0),
        [-1.0, 1.0])
    # eps is float32 machine epsilon: with std exactly 1 (initial moments)
    # 1 / (1 + eps) is one ulp below 1 in float32.
    out = ppo_advantages.normalise_scores(ppo_advantages.init_running_moments(), jnp.array([1.0]))
    assert float(out[0]) == np.float32(1.0) / (np.float32(1.0) + EPS32)
    assert float(out[0]) < 1.0


def test_running_moments_reject_single_score():
    with pytest.raises(ValueError, match="at least 2"):
        ppo_advantages.update_running_moments(
            ppo_advantages.init_running_moments(), jnp.array([1.0]))


# --------------------------------------------------------------------------
# KL controller.


def test_adaptive_kl_controller_by_hand():
    controller = ppo_advantages.init_kl_controller(ppo_settings.PPOConfig())
    np.testing.assert_allclose(controller.beta, 0.2)
    # kl 9, target 6: err = 9/6 - 1 = 0.5 -> clipped to 0.2;
    # beta = 0.2 * (1 + 0.2 * 5 / 10000) = 0.20002.
    up = ppo_advantages.update_kl_controller(controller, jnp.float32(9.0), 5)
    np.testing.assert_allclose(up.beta, 0.20002, rtol=1e-6)
    # kl 0: err = -1 -> clipped to -0.2; beta = 0.2 * (1 - 0.0001) = 0.19998.
    down = ppo_advantages.update_kl_controller(controller, jnp.float32(0.0), 5)
    np.testing.assert_allclose(down.beta, 0.19998, rtol=1e-6)
    # kl 6.6: err = 0.1 inside the clip; beta = 0.2 * (1 + 0.1 * 5 / 1e4).
    inside = ppo_advantages.update_kl_controller(controller, jnp.float32(6.6), 5)
    np.testing.assert_allclose(inside.beta, 0.20001, rtol=1e-6)
    # Two steps compound: 0.20002 * 1.0001 = 0.200040002.
    twice = ppo_advantages.update_kl_controller(up, jnp.float32(100.0), 5)
    np.testing.assert_allclose(twice.beta, 0.200040002, rtol=1e-6)


def test_fixed_kl_controller_unchanged():
    controller = ppo_advantages.init_kl_controller(ppo_settings.PPOConfig(adaptive_kl=False))
    for kl in (0.0, 6.0, 50.0):
        out = ppo_advantages.update_kl_controller(controller, jnp.float32(kl), 5)
        assert float(out.beta) == float(controller.beta)


# --------------------------------------------------------------------------
# Rewards, GAE, whitening, KL estimates.


def test_kl_shaped_rewards_by_hand():
    scores = jnp.array([2.0, -1.0])
    logprobs = jnp.array([[-1.0, -2.0], [-0.5, -0.5]])
    ref_logprobs = jnp.array([[-1.5, -1.0], [-0.5, -1.0]])
    # logp - ref = [[0.5, -1], [0, 0.5]]; times -0.5 = [[-0.25, 0.5],
    # [0, -0.25]]; scores added on the last token.
    rewards = ppo_advantages.kl_shaped_rewards(scores, logprobs, ref_logprobs, 0.5)
    np.testing.assert_allclose(rewards, [[-0.25, 2.5], [0.0, -1.25]])


def test_gae_two_tokens_by_hand():
    rewards = jnp.array([[0.5, 2.0], [-1.0, 0.0]])
    values = jnp.array([[1.0, 0.5], [0.0, 2.0]])
    # Row 0: A1 = 2 - 0.5 = 1.5; delta0 = 0.5 + 0.5 - 1 = 0;
    #        A0 = 0 + 0.95 * 1.5 = 1.425.
    # Row 1: A1 = 0 - 2 = -2; delta0 = -1 + 2 - 0 = 1;
    #        A0 = 1 + 0.95 * -2 = -0.9.
    advantages, returns = ppo_advantages.gae(rewards, values, gamma=1.0, lam=0.95)
    np.testing.assert_allclose(advantages, [[1.425, 1.5], [-0.9, -2.0]],
                               rtol=1e-6)
    np.testing.assert_allclose(returns, [[2.425, 2.0], [-0.9, 0.0]],
                               rtol=1e-6)


def test_gae_with_discount():
    # gamma 0.5, lam 0.5, row 0 above: A1 = 1.5;
    # delta0 = 0.5 + 0.5 * 0.5 - 1 = -0.25; A0 = -0.25 + 0.25 * 1.5 = 0.125.
    advantages, returns = ppo_advantages.gae(jnp.array([[0.5, 2.0]]),
                                             jnp.array([[1.0, 0.5]]), gamma=0.5,
                                             lam=0.5)
    np.testing.assert_allclose(advantages, [[0.125, 1.5]], rtol=1e-6)
    np.testing.assert_allclose(returns, [[1.125, 2.0]], rtol=1e-6)


def test_gae_three_tokens_bootstraps_zero():
    # r = [0, 0, 1], V = [0, 0, 0]: A2 = 1, A1 = 0.95, A0 = 0.9025.
    advantages, _ = ppo_advantages.gae(jnp.array([[0.0, 0.0, 1.0]]), jnp.zeros((1, 3)))
    np.testing.assert_allclose(advantages, [[0.9025, 0.95, 1.0]], rtol=1e-6)


def test_whiten_by_hand():
    x = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    # mean 2.5; unbiased var = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3;
    # (x - 2.5) / sqrt(5/3 + 1e-8).
    expected = [[-1.161895, -0.3872983], [0.3872983, 1.161895]]
    np.testing.assert_allclose(ppo_advantages.whiten(x), expected, rtol=1e-6)
    np.testing.assert_allclose(ppo_advantages.whiten(x, shift_mean=False),
                                          np.array(expected) + 2.5, rtol=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        ppo_advantages.whiten(jnp.array([1.0]))


def test_kl_estimates_by_hand():
    logprobs = jnp.array([[-1.0, -2.0], [-0.5, -0.5]])
    ref_logprobs = jnp.array([[-1.5, -1.0], [-0.5, -1.0]])
    est = ppo_advantages.kl_estimates(logprobs, ref_logprobs)
    # logp - ref = [[0.5, -1], [0, 0.5]]: k1 = 0 / 4 = 0; sums [-0.5, 0.5].
    np.testing.assert_allclose(est.k1, 0.0, atol=1e-7)
    np.testing.assert_allclose(est.k1_per_sequence, [-0.5, 0.5])
    # k3 terms exp(-d) - 1 + d: d=0.5: 0.1065307; d=-1: 0.7182818; d=0: 0.
    # mean = (2 * 0.1065307 + 0.7182818) / 4 = 0.2328358.
    np.testing.assert_allclose(est.k3, 0.2328358, rtol=1e-6)


# --------------------------------------------------------------------------
# Losses.

LOG_15 = math.log(1.5)
LOG_05 = math.log(0.5)
OLD_LOGPROBS = np.array([[-1.0, -1.0], [-2.0, -2.0]], np.float32)
LOGPROBS = OLD_LOGPROBS + np.array([[LOG_15, LOG_15], [LOG_05, LOG_05]],
                                   np.float32)
ADVANTAGES = np.array([[1.0, -1.0], [1.0, -1.0]], np.float32)
OLD_VALUES = np.array([[0.0, 0.0], [1.0, 1.0]], np.float32)
VALUES = np.array([[0.5, 0.1], [1.0, 0.7]], np.float32)
RETURNS = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)


def test_ppo_losses_by_hand():
    loss, stats = ppo_loss.ppo_losses(LOGPROBS, VALUES, OLD_LOGPROBS, OLD_VALUES,
                                      ADVANTAGES, RETURNS)
    # Ratios [[1.5, 1.5], [0.5, 0.5]], clip to [0.8, 1.2]:
    #  (1.5, A=+1): max(-1.5, -1.2) = -1.2   clipped term binds
    #  (1.5, A=-1): max( 1.5,  1.2) =  1.5
    #  (0.5, A=+1): max(-0.5, -0.8) = -0.5
    #  (0.5, A=-1): max( 0.5,  0.8) =  0.8   clipped term binds
    # policy = 0.6 / 4 = 0.15, clipfrac = 2 / 4.
    # Values: Vclip = clip(V, Vold +- 0.2) = [[0.2, 0.1], [1.0, 0.8]];
    # (V-R)^2 = [[.25, .01], [0, .49]]; (Vclip-R)^2 = [[.64, .01], [0, .64]];
    # max = [[.64, .01], [0, .64]] -> value = 0.5 * 1.29 / 4 = 0.16125;
    # value_clipfrac = 2 / 4; value_error = 0.75 / 4 = 0.1875.
    # total = 0.15 + 0.1 * 0.16125 = 0.166125.
    np.testing.assert_allclose(loss, 0.166125, rtol=1e-5)
    expected = {
        "policy_loss": 0.15, "value_loss": 0.16125, "total_loss": 0.166125,
        "clipfrac": 0.5, "value_clipfrac": 0.5, "value_error": 0.1875,
        "ratio_mean": 1.0, "ratio_threshold_hit": 0.0,
        # 0.5 * mean(log r ^ 2) = 0.25 * (log(1.5)^2 + log(0.5)^2).
        "approx_kl": 0.1612137,
        # mean(-log r) = -(log 1.5 + log 0.5) / 2.
        "policy_kl": 0.1438410,
    }
    for name, value in expected.items():
        np.testing.assert_allclose(stats[name], value, rtol=1e-5, atol=1e-7,
                                   err_msg=name)


def test_ppo_losses_gradient_zero_where_clipped():
    def policy_loss(logprobs):
        return ppo_loss.ppo_losses(logprobs, VALUES, OLD_LOGPROBS, OLD_VALUES,
                                   ADVANTAGES, RETURNS)[0]

    def value_loss(values):
        return ppo_loss.ppo_losses(LOGPROBS, values, OLD_LOGPROBS, OLD_VALUES,
                                   ADVANTAGES, RETURNS)[0]

    # Unclipped tokens: d/dlogp (-A * r / 4) = -A * r / 4:
    #  (1.5, A=-1) -> 0.375;  (0.5, A=+1) -> -0.125.
    np.testing.assert_allclose(jax.grad(policy_loss)(LOGPROBS),
                               [[0.0, 0.375], [-0.125, 0.0]], rtol=1e-5)
    # Value: 0.1 * 0.5 / 4 * 2 (V - R) where the unclipped term wins
    # ([0, 1] and [1, 0]), 0 where the clipped one wins:
    # [0,1]: 0.025 * (0.1 - 0) = 0.0025; [1,0]: 0.025 * 0 = 0.
    np.testing.assert_allclose(jax.grad(value_loss)(VALUES),
                               [[0.0, 0.0025], [0.0, 0.0]], atol=1e-7)


def test_ppo_losses_ratio_threshold_zeroes_loss_and_gradient():
    logprobs = OLD_LOGPROBS + math.log(11.0)  # mean ratio 11 > 10.
    loss, stats = ppo_loss.ppo_losses(logprobs, VALUES, OLD_LOGPROBS, OLD_VALUES,
                                      ADVANTAGES, RETURNS)
    assert float(loss) == 0.0
    assert float(stats["policy_loss"]) == 0.0
    assert float(stats["value_loss"]) == 0.0
    assert float(stats["ratio_threshold_hit"]) == 1.0
    np.testing.assert_allclose(stats["ratio_mean"], 11.0, rtol=1e-5)
    grads = jax.grad(lambda lp, v: ppo_loss.ppo_losses(
        lp, v, OLD_LOGPROBS, OLD_VALUES, ADVANTAGES, RETURNS)[0],
        argnums=(0, 1))(logprobs, VALUES)
    for grad in grads:
        assert not np.any(np.asarray(grad))
    # A higher threshold lets the same minibatch through.
    loss, _ = ppo_loss.ppo_losses(logprobs, VALUES, OLD_LOGPROBS, OLD_VALUES,
                                  ADVANTAGES, RETURNS, ratio_threshold=20.0)
    assert float(loss) != 0.0


# --------------------------------------------------------------------------
# The update driver on a toy linear-softmax policy.

NUM_FEATURES, NUM_ACTIONS, BATCH, LENGTH = 3, 4, 4, 2


def toy_forward(params, minibatch, dropout_key, *, rate):
    """Linear softmax policy and linear value head, dropout on features.

    A None dropout_key means no dropout (the LossFn contract)."""
    features = minibatch["features"]  # [b, L, F]
    if rate > 0 and dropout_key is not None:
        keep = jax.random.bernoulli(dropout_key, 1.0 - rate, features.shape)
        features = jnp.where(keep, features / (1.0 - rate), 0.0)
    logits = features @ params["w"] + params["b"]
    log_policy = jax.nn.log_softmax(logits)
    logprobs = jnp.take_along_axis(
        log_policy, minibatch["actions"][..., None], axis=-1)[..., 0]
    values = features @ params["v"]
    entropy = -jnp.mean(jnp.sum(jnp.exp(log_policy) * log_policy, -1))
    return logprobs, values, {"entropy": entropy}


def toy_problem(seed=0):
    """Params and a full PPO batch for the toy policy (numpy-drawn)."""
    rng = np.random.default_rng(seed)
    params = {
        "w": jnp.asarray(rng.normal(size=(NUM_FEATURES, NUM_ACTIONS)),
                         jnp.float32),
        "b": jnp.zeros((NUM_ACTIONS,), jnp.float32),
        "v": jnp.asarray(0.1 * rng.normal(size=(NUM_FEATURES,)),
                         jnp.float32),
    }
    extras = {
        "features": jnp.asarray(
            rng.normal(size=(BATCH, LENGTH, NUM_FEATURES)), jnp.float32),
        "actions": jnp.asarray(
            rng.integers(0, NUM_ACTIONS, size=(BATCH, LENGTH)), jnp.int32),
    }
    old_logprobs, old_values, _ = jax.jit(
        functools.partial(toy_forward, rate=0.0))(params, extras, None)
    advantages = rng.normal(size=(BATCH, LENGTH))
    advantages = (advantages - advantages.mean()) / advantages.std(ddof=1)
    returns = old_values + jnp.asarray(rng.normal(size=(BATCH, LENGTH)),
                                       jnp.float32)
    batch = {**extras, "old_logprobs": old_logprobs,
             "old_values": old_values,
             "advantages": jnp.asarray(advantages, jnp.float32),
             "returns": returns}
    return params, batch


# The behavioural tests run the driver jitted (fast); eager == jit is tested
# below.
jit_update = jax.jit(ppo.ppo_update, static_argnums=(0, 3, 6),
                     static_argnames=("stochastic",))
jit_step = jax.jit(ppo.ppo_step, static_argnums=(0, 3),
                   static_argnames=("cfg", "stochastic"))
jit_schedule = jax.jit(ppo.make_update_schedule, static_argnums=(1, 2))


@functools.cache
def toy_loss_fn(rate, cfg):
    """One loss_fn object per (rate, cfg), so jit caches hit across tests."""
    return ppo_loss.make_loss_fn(functools.partial(toy_forward, rate=rate), cfg)


@functools.cache
def optimizer_for(cfg):
    return ppo_settings.make_optimizer(cfg)


def adam_count(opt_state):
    return int(optax.tree_utils.tree_get(opt_state, "count"))


def assert_trees_close(a, b, **kwargs):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kwargs),
                 a, b)


PAPER = ppo_settings.PPOConfig(learning_rate=1e-2)
PAPER_DROPOUT_IN_UPDATE = ppo_settings.PPOConfig(learning_rate=1e-2,
                                                 dropout_in_update=True)


@functools.partial(jax.jit, static_argnums=(0, 1))
def reference_update(loss_fn, learning_rate, params, batch, schedule):
    """Plain unrolled loops: for each step, average the K passes' gradients
    (all at the same params), then one optax.adam update."""
    adam = optax.adam(learning_rate)
    adam_state = adam.init(params)
    steps, per_step = schedule.indices.shape[:2]
    per_pass_grads = []
    for step in range(steps):
        grads = []
        for k in range(per_step):
            rows = schedule.indices[step, k]
            minibatch = jax.tree.map(lambda x: x[rows], batch)
            grads.append(jax.grad(lambda p: loss_fn(
                p, minibatch, schedule.dropout_keys[step, k])[0])(params))
        mean_grad = jax.tree.map(lambda *g: sum(g) / per_step, *grads)
        updates, adam_state = adam.update(mean_grad, adam_state, params)
        params = optax.apply_updates(params, updates)
        per_pass_grads.extend(grads)
    return params, per_pass_grads


def test_paper_mode_is_one_adam_step_on_mean_of_per_key_gradients():
    # With dropout in the update (not TRL's default): 4 different gradients.
    cfg = PAPER_DROPOUT_IN_UPDATE
    params, batch = toy_problem()
    loss_fn = toy_loss_fn(0.5, cfg)
    optimizer = optimizer_for(cfg)
    key = jax.random.key(7)
    new_params, opt_state, stats = jit_update(
        loss_fn, params, optimizer.init(params), optimizer, batch, key, cfg)
    assert adam_count(opt_state) == 1

    # Reference: the 4 passes' rows and dropout keys, 4 gradients at the
    # SAME params, averaged, then one optax.adam update.
    schedule = jit_schedule(key, BATCH, cfg)
    assert schedule.indices.shape == (1, 4, BATCH)
    expected, grads = reference_update(loss_fn, 1e-2, params, batch,
                                       schedule)
    assert_trees_close(new_params, expected, rtol=1e-5, atol=1e-7)
    # Different dropout keys really give different gradients, so the
    # average is not just one of them.
    assert not np.allclose(grads[0]["w"], grads[1]["w"])
    assert set(stats) >= {"policy_loss", "value_loss", "entropy",
                          "grad_norm", "clipfrac"}


def test_paper_mode_deterministic_shortcut_is_single_gradient():
    params, batch = toy_problem()
    loss_fn = toy_loss_fn(0.0, PAPER_DROPOUT_IN_UPDATE)
    optimizer = optimizer_for(PAPER)
    key = jax.random.key(3)
    shortcut = jit_update(loss_fn, params, optimizer.init(params),
                          optimizer, batch, key, PAPER_DROPOUT_IN_UPDATE,
                          stochastic=False)
    # All 4 passes, each at the same params (dropout keys ignored: rate 0).
    full = jit_update(loss_fn, params, optimizer.init(params), optimizer,
                      batch, key, PAPER_DROPOUT_IN_UPDATE, stochastic=True)
    assert adam_count(shortcut.opt_state) == adam_count(full.opt_state) == 1
    assert_trees_close(shortcut.params, full.params, rtol=1e-5, atol=1e-7)
    # Equal to one gradient on the unpermuted full batch and one Adam step.
    one_pass = ppo.UpdateSchedule(
        indices=jnp.arange(BATCH).reshape(1, 1, BATCH),
        dropout_keys=jax.random.split(key, 1).reshape(1, 1))
    expected, _ = reference_update(loss_fn, 1e-2, params, batch, one_pass)
    assert_trees_close(shortcut.params, expected, rtol=1e-5, atol=1e-7)
    # At unchanged params the ratio is 1 and nothing clips.
    np.testing.assert_allclose(full.stats["ratio_mean"], 1.0, rtol=1e-6)
    assert float(full.stats["clipfrac"]) == 0.0


def test_paper_mode_default_is_one_dropout_free_gradient():
    # TRL 0.9.x runs the update's forward in eval mode (rl/ppo.py): with the
    # default dropout_in_update=False a loss whose model HAS dropout (rate
    # 0.5) gets no key, and the 4 accumulated passes are one gradient.
    params, batch = toy_problem()
    optimizer = optimizer_for(PAPER)
    key = jax.random.key(3)
    args = (params, optimizer.init(params), optimizer, batch, key, PAPER)
    with_dropout = toy_loss_fn(0.5, PAPER)
    without_dropout = toy_loss_fn(0.0, PAPER)
    # Dropout does not enter the program at all, so the two are one program
    # and agree bit for bit.
    lowered = [jit_update.lower(fn, *args).as_text()
               for fn in (with_dropout, without_dropout)]
    assert lowered[0] == lowered[1]
    result = jit_update(with_dropout, *args)
    dropout_free = jit_update(without_dropout, *args)
    jax.tree.map(np.testing.assert_array_equal, result, dropout_free)
    assert adam_count(result.opt_state) == 1
    # ... one dropout-free gradient on the unpermuted batch, one Adam step.
    one_pass = ppo.UpdateSchedule(
        indices=jnp.arange(BATCH).reshape(1, 1, BATCH),
        dropout_keys=jax.random.split(key, 1).reshape(1, 1))
    expected, _ = reference_update(without_dropout, 1e-2, params, batch,
                                   one_pass)
    assert_trees_close(result.params, expected, rtol=1e-5, atol=1e-7)
    # With dropout in the gradient the result is another one.
    keyed = jit_update(with_dropout, params, optimizer.init(params),
                       optimizer, batch, key, PAPER_DROPOUT_IN_UPDATE)
    assert np.abs(np.asarray(keyed.params["w"] - result.params["w"])).max() > 1e-4


@pytest.mark.parametrize("dropout_in_update", [False, True])
@pytest.mark.parametrize("mode", ["paper", "standard"])
def test_dropout_key_reaches_loss_only_when_asked(mode, dropout_in_update):
    cfg = ppo_settings.PPOConfig(mode=mode, gradient_accumulation_steps=(
        4 if mode == "paper" else 1), dropout_in_update=dropout_in_update)
    params, batch = toy_problem()
    seen = []

    def loss_fn(params, minibatch, dropout_key):
        seen.append(dropout_key)  # At trace time: None or a traced key.
        return toy_loss_fn(0.5, cfg)(params, minibatch, dropout_key)

    optimizer = optimizer_for(cfg)
    ppo.ppo_update(loss_fn, params, optimizer.init(params), optimizer, batch,
                   jax.random.key(0), cfg)
    assert seen
    assert all((key is None) != dropout_in_update for key in seen)


STANDARD = ppo_settings.PPOConfig(mode="standard", learning_rate=0.5, ppo_epochs=2,
                                  num_minibatches=2, gradient_accumulation_steps=1)


def test_standard_mode_steps_every_pass_and_matches_python_loop():
    params, batch = toy_problem()
    loss_fn = toy_loss_fn(0.0, STANDARD)
    optimizer = optimizer_for(STANDARD)
    key = jax.random.key(11)
    result = jit_update(loss_fn, params, optimizer.init(params),
                        optimizer, batch, key, STANDARD)
    assert adam_count(result.opt_state) == 4
    # After the first step the ratio leaves 1, and with lr 0.5 clipping acts.
    assert abs(float(result.stats["ratio_mean"]) - 1.0) > 1e-3
    assert float(result.stats["clipfrac"]) > 0.0
    assert float(result.stats["approx_kl"]) > 0.0

    schedule = jit_schedule(key, BATCH, STANDARD)
    assert schedule.indices.shape == (4, 1, 2)
    # Each epoch's two minibatches cover every row exactly once.
    for epoch in range(2):
        rows = np.sort(np.ravel(schedule.indices[2 * epoch:2 * epoch + 2]))
        np.testing.assert_array_equal(rows, np.arange(BATCH))
    expected, _ = reference_update(loss_fn, 0.5, params, batch, schedule)
    assert_trees_close(result.params, expected, rtol=1e-5, atol=1e-6)


def test_standard_mode_gradient_accumulation():
    params, batch = toy_problem()
    cfg = ppo_settings.PPOConfig(mode="standard", learning_rate=0.1, ppo_epochs=2,
                                 num_minibatches=2, gradient_accumulation_steps=2,
                                 dropout_in_update=True)
    loss_fn = toy_loss_fn(0.3, cfg)
    optimizer = optimizer_for(cfg)
    key = jax.random.key(2)
    result = jit_update(loss_fn, params, optimizer.init(params),
                        optimizer, batch, key, cfg)
    assert adam_count(result.opt_state) == 2  # 4 passes / 2
    schedule = jit_schedule(key, BATCH, cfg)
    assert schedule.indices.shape == (2, 2, 2)
    expected, _ = reference_update(loss_fn, 0.1, params, batch, schedule)
    assert_trees_close(result.params, expected, rtol=1e-5, atol=1e-6)


def test_update_rejects_indivisible_batch():
    params, batch = toy_problem()
    cfg = ppo_settings.PPOConfig(mode="standard", num_minibatches=3, ppo_epochs=1,
                                 gradient_accumulation_steps=1)
    loss_fn = toy_loss_fn(0.0, cfg)
    optimizer = optimizer_for(cfg)
    with pytest.raises(ValueError, match="num_minibatches"):
        jit_update(loss_fn, params, optimizer.init(params), optimizer,
                       batch, jax.random.key(0), cfg)


def test_max_grad_norm_clips_before_adam():
    cfg = ppo_settings.PPOConfig(max_grad_norm=1.0)
    optimizer = optimizer_for(cfg)
    params = {"x": jnp.zeros(2)}
    state = optimizer.init(params)
    # Adam's first step is lr * sign-like; clipping shows in the moments:
    # the first moment is 0.1 * clipped grad = 0.1 * [0.6, 0.8].
    _, state = optimizer.update({"x": jnp.array([3.0, 4.0])}, state, params)
    np.testing.assert_allclose(optax.tree_utils.tree_get(state, "mu")["x"],
                               [0.06, 0.08], rtol=1e-6)


# --------------------------------------------------------------------------
# The whole step.


def make_step_inputs():
    params, toy_batch = toy_problem()
    extras = {"features": toy_batch["features"][:2],
              "actions": toy_batch["actions"][:2]}
    old_logprobs = jnp.array([[-1.0, -2.0], [-0.5, -1.5]])
    return params, extras, dict(
        scores=jnp.array([1.0, 3.0]),
        old_logprobs=old_logprobs,
        ref_logprobs=old_logprobs,  # KL 0.
        old_values=jnp.array([[0.1, 0.2], [0.3, 0.4]]))


def recording_loss_fn(params, minibatch, dropout_key):
    """Reports sums of what ppo_step fed in, plus a real loss."""
    loss, stats = toy_loss_fn(0.0, PAPER)(params, minibatch, dropout_key)
    return loss, {**stats,
                  "seen_returns_sum": jnp.sum(minibatch["returns"]),
                  "seen_returns_sq_sum": jnp.sum(minibatch["returns"] ** 2),
                  "seen_advantages_sq_sum": jnp.sum(
                      minibatch["advantages"] ** 2)}


def test_ppo_step_by_hand():
    params, extras, arrays = make_step_inputs()
    optimizer = optimizer_for(PAPER)
    result = jit_step(
        recording_loss_fn, params, optimizer.init(params), optimizer,
        ppo_advantages.init_running_moments(), ppo_advantages.init_kl_controller(PAPER), extras,
        key=jax.random.key(0), cfg=PAPER, **arrays)
    stats = result.stats
    # Scores [1, 3]: moments mean 2, std sqrt(2); normalised +-0.7071067.
    np.testing.assert_allclose(result.moments.mean, 2.0)
    np.testing.assert_allclose(result.moments.std, 1.4142135, rtol=1e-6)
    np.testing.assert_allclose(
        [stats["score_norm_mean"], stats["score_norm_std"]], [0.0, 1.0],
        atol=1e-6)
    # KL 0: rewards [[0, -0.7071], [0, 0.7071]]; with V = [[.1, .2], [.3, .4]]
    # A = [[-0.7617514, -0.9071067], [0.3917514, 0.3071067]] (mean -0.2425),
    # returns = A + V, summing to 0.03.
    np.testing.assert_allclose(stats["advantages_mean"], -0.2425, rtol=1e-5)
    np.testing.assert_allclose(stats["seen_returns_sum"], 0.03, atol=1e-5)
    # Sums are blind to where the +-score lands; squares are not:
    # 0.6617514^2 + 0.7071067^2 + 0.6917514^2 + 0.7071067^2.
    np.testing.assert_allclose(stats["seen_returns_sq_sum"], 1.9164347,
                               rtol=1e-5)
    # Advantages whitened over all 4 tokens: sum of squares = n - 1 = 3.
    np.testing.assert_allclose(stats["seen_advantages_sq_sum"], 3.0,
                               rtol=1e-5)
    # Rewards used beta 0.2; then kl 0 -> err -0.2 ->
    # beta = 0.2 * (1 - 0.2 * 2 / 10000) = 0.199992.
    np.testing.assert_allclose(stats["beta"], 0.2)
    np.testing.assert_allclose(result.kl_controller.beta, 0.199992,
                               rtol=1e-6)
    assert float(stats["kl"]) == 0.0
    # Sampled entropy: mean of -sum old_logprobs = (3 + 2) / 2.
    np.testing.assert_allclose(stats["entropy_sampled"], 2.5)
    assert adam_count(result.opt_state) == 1
    assert "entropy" in stats


def test_ppo_step_kl_enters_rewards_and_controller():
    params, extras, arrays = make_step_inputs()
    # Per-sequence KL sums 9 for both decisions -> controller input 9 ->
    # err clipped to 0.2 -> beta = 0.2 * (1 + 0.2 * 2 / 10000) = 0.200008.
    arrays["ref_logprobs"] = arrays["old_logprobs"] - 4.5
    optimizer = optimizer_for(PAPER)
    result = jit_step(
        recording_loss_fn, params, optimizer.init(params), optimizer,
        ppo_advantages.init_running_moments(), ppo_advantages.init_kl_controller(PAPER), extras,
        key=jax.random.key(0), cfg=PAPER, **arrays)
    np.testing.assert_allclose(result.stats["kl"], 9.0)
    np.testing.assert_allclose(result.stats["kl_k1"], 4.5)
    # k3 per token: exp(-4.5) - 1 + 4.5 = 3.5111090.
    np.testing.assert_allclose(result.stats["kl_k3"], 3.5111090, rtol=1e-6)
    np.testing.assert_allclose(result.kl_controller.beta, 0.200008,
                               rtol=1e-6)
    # Non-score reward, TRL's token mean: -0.2 * 4.5 = -0.9 (the sequence
    # sum would be -1.8). The penalty adds -0.9 to every token's reward,
    # which moves A1 by -0.9 and A0 by -0.9 * (1 + 0.95): returns sum =
    # 0.03 - 0.9 * 2.95 * 2 rows = -5.28.
    np.testing.assert_allclose(result.stats["mean_non_score_reward"], -0.9,
                               rtol=1e-6)
    assert "non_score_reward" not in result.stats
    np.testing.assert_allclose(result.stats["seen_returns_sum"], -5.28,
                               rtol=1e-5)


def test_ppo_step_rejects_reserved_keys():
    params, extras, arrays = make_step_inputs()
    optimizer = optimizer_for(PAPER)
    with pytest.raises(ValueError, match="reserved"):
        ppo.ppo_step(recording_loss_fn, params, optimizer.init(params),
                     optimizer, ppo_advantages.init_running_moments(),
                     ppo_advantages.init_kl_controller(PAPER),
                     {**extras, "advantages": arrays["old_values"]},
                     key=jax.random.key(0), cfg=PAPER, **arrays)


# --------------------------------------------------------------------------
# jit agrees with eager.


def test_pure_functions_jit_equal_eager():
    logprobs = jnp.array([[-1.0, -2.0], [-0.5, -0.5]])
    ref = jnp.array([[-1.5, -1.0], [-0.5, -1.0]])
    values = jnp.array([[1.0, 0.5], [0.0, 2.0]])
    scores = jnp.array([2.0, -1.0])
    moments = ppo_advantages.init_running_moments()
    cases = [
        (ppo_advantages.update_running_moments, (moments, scores)),
        (ppo_advantages.normalise_scores, (moments, scores)),
        (ppo_advantages.kl_shaped_rewards, (scores, logprobs, ref, 0.5)),
        (ppo_advantages.gae, (values, values)),
        (ppo_advantages.whiten, (values,)),
        (ppo_advantages.kl_estimates, (logprobs, ref)),
        (ppo_advantages.update_kl_controller,
         (ppo_advantages.init_kl_controller(PAPER), jnp.float32(7.0), 5)),
        (ppo_loss.ppo_losses, (LOGPROBS, VALUES, OLD_LOGPROBS, OLD_VALUES,
                               ADVANTAGES, RETURNS)),
    ]
    for fn, args in cases:
        assert_trees_close(jax.jit(fn)(*args), fn(*args), rtol=1e-6,
                           atol=1e-7)


def test_step_jit_equals_eager():
    # Standard mode runs the same scans as paper mode, with S > 1 steps.
    cfg = STANDARD
    params, extras, arrays = make_step_inputs()
    loss_fn = toy_loss_fn(0.3, cfg)
    # Four decisions, so each epoch has two minibatches of two.
    extras = jax.tree.map(lambda x: jnp.concatenate([x, x]), extras)
    arrays = jax.tree.map(lambda x: jnp.concatenate([x, x + 0.5]), arrays)
    optimizer = optimizer_for(cfg)
    inputs = (params, optimizer.init(params), ppo_advantages.init_running_moments(),
              ppo_advantages.init_kl_controller(cfg), extras, arrays,
                         jax.random.key(5))

    def step(params, opt_state, moments, controller, extras, arrays, key):
        return ppo.ppo_step(loss_fn, params, opt_state, optimizer, moments,
                            controller, extras, key=key, cfg=cfg, **arrays)

    eager = step(*inputs)
    jitted_step = jax.jit(step)
    jitted = jitted_step(*inputs)
    assert_trees_close(jitted, eager, rtol=1e-5, atol=1e-6)
    # Deterministic: same inputs, same outputs.
    assert_trees_close(jitted_step(*inputs), jitted, rtol=0, atol=0)


# --------------------------------------------------------------------------
# Config validation.


def test_config_defaults_are_the_papers():
    cfg = ppo_settings.PPOConfig()
    assert (cfg.learning_rate, cfg.ppo_epochs, cfg.num_minibatches,
            cfg.gradient_accumulation_steps) == (1.41e-5, 4, 1, 4)
    assert (cfg.init_kl_coef, cfg.kl_target, cfg.kl_horizon) == (
        0.2, 6.0, 10000)
    assert cfg.mode == "paper" and cfg.score_clip is None
    assert cfg.dropout_in_update is False  # TRL: eval-mode update forward.
    assert cfg.backward_passes == 4 and cfg.optimizer_steps == 1
    assert cfg.mini_batch_size(5) == 5


@pytest.mark.parametrize("field, value", [
    ("learning_rate", 0.0),
    ("learning_rate", -1e-5),
    ("learning_rate", True),
    ("learning_rate", float("nan")),
    ("adam_b1", 1.0),
    ("adam_b2", -0.1),
    ("adam_eps", 0.0),
    ("gamma", 1.5),
    ("lam", -0.1),
    ("cliprange", 0.0),
    ("cliprange_value", -0.2),
    ("vf_coef", -0.1),
    ("ppo_epochs", 0),
    ("ppo_epochs", 4.0),
    ("num_minibatches", 0),
    ("gradient_accumulation_steps", 0),
    ("init_kl_coef", -0.2),
    ("adaptive_kl", 1),
    ("kl_target", 0.0),
    ("kl_horizon", -1),
    ("use_score_scaling", "yes"),
    ("use_score_norm", None),
    ("score_clip", 0.0),
    ("ratio_threshold", 0.0),
    ("max_grad_norm", -1.0),
    ("dropout_in_update", 1),
    ("mode", "fast"),
])
def test_config_rejects_bad_field(field, value):
    # The project's one format, naming the field as configs write it.
    with pytest.raises(ValueError) as info:
        ppo_settings.PPOConfig(**{field: value})
    assert str(info.value).startswith(
        f"ppo.{field}={value!r} is not allowed; expected ")


def test_config_mode_constraints():
    with pytest.raises(ValueError, match=re.escape(
            "ppo.gradient_accumulation_steps=1 is not allowed; expected "
            "ppo_epochs * num_minibatches = 4 * 1 = 4 in mode 'paper'")):
        ppo_settings.PPOConfig(gradient_accumulation_steps=1)
    with pytest.raises(ValueError, match=re.escape(
            "ppo.gradient_accumulation_steps=2 is not allowed; expected a "
            "divisor of ppo_epochs * num_minibatches = 3 * 1 = 3")):
        ppo_settings.PPOConfig(mode="standard", ppo_epochs=3,
                               gradient_accumulation_steps=2)
    ppo_settings.PPOConfig(mode="standard", ppo_epochs=4, gradient_accumulation_steps=2)
    ppo_settings.PPOConfig(ppo_epochs=2, num_minibatches=2)  # paper: 2 * 2 == 4.
    with pytest.raises(ValueError, match=re.escape(
            "ppo.num_minibatches=2 is not allowed; expected a divisor of the "
            "batch size 5")):
        ppo_settings.PPOConfig(ppo_epochs=2, num_minibatches=2).mini_batch_size(5)
