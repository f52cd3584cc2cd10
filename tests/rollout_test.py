"""Episodes on device follow SPEC.md section 2 exactly (built-in tiny model)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moraljax import config_lib
from moraljax import run_setup
from moraljax.llm import lora
from moraljax.llm import policy as policy_lib
from moraljax.llm import sampling
from moraljax.rl import reference as reference_lib
from moraljax.rl import rollout

# IPD payoffs (SPEC 1), [a_m][a_o] -> (p_m, p_o).
IPD = {(0, 0): (3, 3), (0, 1): (0, 4), (1, 0): (4, 0), (1, 1): (1, 1)}


@pytest.fixture(scope="module")
def episodes():
    """Learners vs TFT, AC, AD, Random and an LLM pair; 8 episodes of 5 decisions."""
    config = config_lib.experiment_config("", reward="util")
    config.run.seeds = (7,)
    config.run.num_episodes = 8
    cfg = config_lib.experiment_from_config_dict(config)
    conditions = [
        config_lib.Condition(reward=config_lib.RewardSettings(name=name), opponent=opponent)
        for name, opponent in [("util", "tft"), ("game", "ac"), ("deont", "ad"), ("game_deont", "random"),
                               ("util", "llm")]
    ]
    run = run_setup.build_run(cfg, conditions=conditions)
    run.start_fresh()
    fn = jax.jit(
        lambda learners, episode: rollout.rollout_episode(
            run.graphdef, run.frozen, learners.trainable, run.env, run.setup,
            jnp.full_like(learners.episode, episode),
            jax.vmap(jax.random.fold_in)(learners.key, jnp.full_like(learners.episode, episode)),
            batch_size=5, settings=run.sampling_settings,
        )
    )
    records = [jax.device_get(fn(run.learners, e)) for e in range(8)]
    stacked = jax.tree.map(lambda *xs: np.stack(xs), *records)  # [E, N, B]
    return run, stacked


def test_some_answers_are_legal(episodes):
    _, d = episodes
    legal = (d.action >= 0).mean()
    assert 0.3 < legal < 1.0  # The tiny base answers legally mostly, not always.


def test_fixed_opponents_move_by_their_rule(episodes):
    _, d = episodes
    np.testing.assert_array_equal(d.opponent_action[:, 0], d.prev_m[:, 0])  # TFT copies M's last move.
    assert (d.opponent_action[:, 1] == 0).all() and (d.opponent_action[:, 2] == 1).all()
    assert 0.2 < d.opponent_action[:, 3].mean() < 0.8  # Random.
    assert d.opponent_legal[:, :4].all()
    # Initial states: AC's previous move is always C, AD's always D.
    assert (d.prev_o[:, 1, 0] == 0).all() and (d.prev_o[:, 2, 0] == 1).all()


def test_state_updates_only_on_legal_moves(episodes):
    _, d = episodes
    legal = d.action[..., :-1] >= 0
    expected_m = np.where(legal, d.action[..., :-1], d.prev_m[..., :-1])
    np.testing.assert_array_equal(d.prev_m[..., 1:], expected_m)
    expected_o = np.where(d.opponent_legal[..., :-1], d.opponent_action[..., :-1], d.prev_o[..., :-1])
    np.testing.assert_array_equal(d.prev_o[..., 1:], expected_o)


def test_llm_pair_sees_each_other(episodes):
    _, d = episodes
    m, o = 4, 5  # The pair's learner indices.
    np.testing.assert_array_equal(d.prev_m[:, m, 0], d.prev_o[:, o, 0])
    np.testing.assert_array_equal(d.prev_o[:, m, 0], d.prev_m[:, o, 0])
    np.testing.assert_array_equal(d.opponent_legal[:, m], d.action[:, o] >= 0)
    np.testing.assert_array_equal(d.opponent_legal[:, o], d.action[:, m] >= 0)
    both = (d.action[:, m] >= 0) & (d.action[:, o] >= 0)
    np.testing.assert_array_equal(d.opponent_action[:, m][both], d.action[:, o][both])


def test_rewards_match_the_payoff_table(episodes):
    _, d = episodes
    names = ["util", "game", "deont", "game_deont"]
    for n, name in enumerate(names):
        for e, b in np.ndindex(d.action.shape[0], d.action.shape[2]):
            a_m, a_o, prev_o = d.action[e, n, b], d.opponent_action[e, n, b], d.prev_o[e, n, b]
            if a_m < 0:
                expected = -6.0
            else:
                p_m, p_o = IPD[(a_m, a_o)]
                deont = -3.0 if (a_m == 1 and prev_o == 0) else 0.0
                expected = {"util": p_m + p_o, "game": p_m, "deont": deont, "game_deont": p_m + deont}[name]
            assert d.reward[e, n, b] == expected, (name, e, b)


def test_option_orders_are_random(episodes):
    _, d = episodes
    index = d.prompt_row % 16
    assert 0.3 < (index % 2).mean() < 0.7  # first_answer bit
    assert 0.3 < ((index // 2) % 2).mean() < 0.7  # first_option bit


def test_cached_reference_equals_a_full_forward(episodes):
    run, d = episodes
    rows = jnp.asarray(d.prompt_row[0].reshape(-1))
    tokens = jnp.asarray(d.tokens[0].reshape(-1, run.sampling_settings.gen_len))
    prefix = reference_lib.reference_prefix(run.reference_graphdef, run.frozen, run.env.prompts,
                                            run.sampling_settings.gen_len)
    cached = reference_lib.reference_logprobs(prefix, run.frozen, rows, tokens)
    # The reference is the policy with its adapter off (any learner's).
    policy = policy_lib.merge_policy(run.graphdef, jax.tree.map(lambda x: x[0], run.learners.trainable), run.frozen)
    full = sampling.score_responses(
        policy, run.env.prompts.ids[rows], run.env.prompts.mask[rows], tokens, lora_enabled=False
    ).logprobs
    np.testing.assert_allclose(cached, full, atol=2e-5)


def test_behaviour_logprobs_equal_a_full_forward(episodes):
    run, d = episodes
    n = 0
    trainable = jax.tree.map(lambda x: x[n], run.learners.trainable)
    policy = policy_lib.merge_policy(run.graphdef, trainable, run.frozen)
    rows = jnp.asarray(d.prompt_row[0, n])
    full = sampling.score_responses(
        policy, run.env.prompts.ids[rows], run.env.prompts.mask[rows], jnp.asarray(d.tokens[0, n])
    )
    np.testing.assert_allclose(d.logprobs[0, n], full.logprobs, atol=2e-5)
    np.testing.assert_allclose(d.values[0, n], full.values, atol=2e-5)


def with_random_lora_b(trainable, scale=0.3):
    """Non-zero B factors: a fresh adapter (B = 0) would make LoRA dropout moot."""
    flat = []
    for index, (path, variable) in enumerate(nnx.to_flat_state(trainable)):
        if path[-1] == lora.LORA_B_NAME:
            variable = variable.copy(scale * jax.random.normal(jax.random.key(index), variable.shape))
        flat.append((path, variable))
    return nnx.from_flat_state(flat)


@pytest.fixture(scope="module")
def dropout_episode():
    """One episode with the paper's dropout (LoRA 0.05, value head 0.1), two learners."""
    config = config_lib.experiment_config("", reward="util")
    config.run.seeds = (7, 8)
    config.lora.dropout = 0.05
    config.model.value_head_dropout = 0.1
    run = run_setup.build_run(config_lib.experiment_from_config_dict(config))
    run.start_fresh()
    assert run.sampling_settings.dropout
    trainable = with_random_lora_b(run.learners.trainable)
    keys = jax.vmap(jax.random.fold_in)(run.learners.key, run.learners.episode)
    decisions = jax.jit(
        lambda trainable, keys: rollout.rollout_episode(
            run.graphdef, run.frozen, trainable, run.env, run.setup, run.learners.episode, keys,
            batch_size=5, settings=run.sampling_settings,
        )
    )(trainable, keys)
    return run, trainable, keys, jax.device_get(decisions)


def test_old_logprobs_are_a_dropout_free_forward_not_the_sampling_ones(dropout_episode):
    # TRL: old log-probs and values come from batched_forward_pass in eval
    # mode, sampling from the model in train mode (rl/ppo.py).
    run, trainable, _, d = dropout_episode
    for n in range(2):
        policy = policy_lib.merge_policy(run.graphdef, jax.tree.map(lambda x, n=n: x[n], trainable), run.frozen)
        rows = jnp.asarray(d.prompt_row[n])
        plain = sampling.score_responses(
            policy, run.env.prompts.ids[rows], run.env.prompts.mask[rows], jnp.asarray(d.tokens[n])
        )
        np.testing.assert_allclose(d.logprobs[n], plain.logprobs, atol=2e-5)
        np.testing.assert_allclose(d.values[n], plain.values, atol=2e-5)
    assert np.abs(d.sampling_logprobs - d.logprobs).max() > 1e-2


def test_sampling_logprobs_are_a_forward_with_the_decisions_dropout_key(dropout_episode):
    # Decision b of learner n samples with the dropout half of its sampling
    # key (rollout_episode's key derivation), in every episode.
    run, trainable, keys, d = dropout_episode
    n, batch = 1, 5
    _, key_steps = jax.random.split(keys[n])
    policy = policy_lib.merge_policy(run.graphdef, jax.tree.map(lambda x: x[n], trainable), run.frozen)
    for b, key_step in enumerate(jax.random.split(key_steps, batch)):
        key_sample = jax.random.split(key_step, 4)[2]
        _, key_dropout = jax.random.split(key_sample)
        row = int(d.prompt_row[n, b])
        keyed = sampling.score_responses(
            policy, run.env.prompts.ids[row][None], run.env.prompts.mask[row][None],
            jnp.asarray(d.tokens[n, b])[None], dropout_key=key_dropout,
        )
        np.testing.assert_allclose(d.sampling_logprobs[n, b], keyed.logprobs[0], atol=2e-5)
