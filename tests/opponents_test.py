"""Tests for moraljax.opponents against SPEC.md sections 2 and 3."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moraljax import games
from moraljax import opponents

NUM_KEYS = 2000


def _state(prev_m, prev_o):
    return games.GameState(prev_m=jnp.int32(prev_m), prev_o=jnp.int32(prev_o))


def _keys(seed, count=NUM_KEYS):
    return jax.random.split(jax.random.key(seed), count)


def test_names_and_ids():
    assert opponents.OPPONENT_NAMES == ("tft", "ac", "ad", "random", "llm")
    assert opponents.FIXED_OPPONENT_NAMES == ("tft", "ac", "ad", "random")
    assert [opponents.opponent_id(n) for n in opponents.OPPONENT_NAMES] == [
        0, 1, 2, 3, 4]
    assert (opponents.TFT, opponents.AC, opponents.AD, opponents.RANDOM,
            opponents.LLM) == (0, 1, 2, 3, 4)


def test_unknown_opponent_lists_allowed():
    with pytest.raises(ValueError) as error:
        opponents.opponent_id("TFT")
    assert "unknown opponent 'TFT'" in str(error.value)
    assert "allowed: tft, ac, ad, random, llm" in str(error.value)


@pytest.mark.parametrize("bad_id", [5, -1, np.int32(7)])
def test_out_of_range_host_id_rejected(bad_id):
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=f"got {bad_id}"):
        opponents.fixed_opponent_move(bad_id, _state(0, 0), key)
    with pytest.raises(ValueError, match="opponent id must be in"):
        opponents.initial_state(bad_id, key)


# Compiled once for the whole file (a compile costs about a second here).
_batched_moves = jax.jit(jax.vmap(opponents.fixed_opponent_move,
                                  in_axes=(None, 0, 0)))
_batched_initial_states = jax.jit(jax.vmap(opponents.initial_state,
                                           in_axes=(None, 0)))


def _moves(opponent, states, keys):
    """Moves of one opponent for a batch of states and keys, under jit."""
    return np.asarray(_batched_moves(jnp.int32(opponent), states, keys))


def _all_states(repeat):
    prev_m = jnp.tile(jnp.array([0, 0, 1, 1], jnp.int32), repeat)
    prev_o = jnp.tile(jnp.array([0, 1, 0, 1], jnp.int32), repeat)
    return games.GameState(prev_m=prev_m, prev_o=prev_o)


def test_constant_opponents_and_tft_over_every_state():
    states = _all_states(NUM_KEYS // 4)
    keys = _keys(1)
    np.testing.assert_array_equal(_moves(opponents.AC, states, keys), 0)
    np.testing.assert_array_equal(_moves(opponents.AD, states, keys), 1)
    # TFT copies M's previous move, whatever O's previous move was.
    np.testing.assert_array_equal(_moves(opponents.TFT, states, keys),
                                  np.asarray(states.prev_m))
    # The LLM id is a defined placeholder (C); the rollout replaces it.
    np.testing.assert_array_equal(_moves(opponents.LLM, states, keys), 0)


def test_random_is_uniform_and_deterministic_per_key():
    states = _all_states(NUM_KEYS // 4)
    keys = _keys(2)
    moves = _moves(opponents.RANDOM, states, keys)
    assert set(moves.tolist()) == {0, 1}
    # 2000 fair coin flips: sd of the mean is 0.011, so 0.05 is > 4 sd.
    assert abs(moves.mean() - 0.5) < 0.05
    # Independent of the state: the same keys give the same moves for any
    # state, and the moves against C and against D both look fair.
    other_states = games.GameState(prev_m=1 - states.prev_m,
                                   prev_o=1 - states.prev_o)
    np.testing.assert_array_equal(
        _moves(opponents.RANDOM, other_states, keys), moves)
    np.testing.assert_array_equal(_moves(opponents.RANDOM, states, keys),
                                  moves)
    # Changing the keys changes the moves.
    assert (_moves(opponents.RANDOM, states, _keys(3)) != moves).any()


def test_eager_matches_jit():
    key = jax.random.key(4)
    jitted = jax.jit(opponents.fixed_opponent_move)
    jitted_initial_state = jax.jit(opponents.initial_state)
    for opponent in range(len(opponents.OPPONENT_NAMES)):
        for prev_m in (0, 1):
            state = _state(prev_m, 1 - prev_m)
            eager = opponents.fixed_opponent_move(opponent, state, key)
            assert eager.dtype == jnp.int32
            assert int(eager) == int(jitted(jnp.int32(opponent), state, key))
        eager_state = opponents.initial_state(opponent, key)
        jit_state = jitted_initial_state(jnp.int32(opponent), key)
        assert (int(eager_state.prev_m), int(eager_state.prev_o)) == (
            int(jit_state.prev_m), int(jit_state.prev_o))


def test_vmap_over_opponents_matches_loop():
    ids = jnp.arange(len(opponents.OPPONENT_NAMES), dtype=jnp.int32)
    state = _state(1, 0)
    key = jax.random.key(5)
    batched = jax.vmap(opponents.fixed_opponent_move, in_axes=(0, None, None))
    moves = batched(ids, state, key)
    loop = [int(opponents.fixed_opponent_move(i, state, key))
            for i in range(len(ids))]
    assert moves.tolist() == loop
    # TFT copies M's D, AC C, AD D, LLM placeholder C.
    assert [loop[i] for i in (0, 1, 2, 4)] == [1, 0, 1, 0]
    states = jax.vmap(opponents.initial_state, in_axes=(0, None))(ids, key)
    for i in range(len(ids)):
        single = opponents.initial_state(i, key)
        assert int(states.prev_m[i]) == int(single.prev_m)
        assert int(states.prev_o[i]) == int(single.prev_o)


def test_tft_over_an_episode():
    """Plays M's moves through games.step; TFT answers M's last legal move."""
    m_moves = [1, 0, 0, 1, 1, 0]
    m_legal = [True, True, False, True, False, False]
    state = _state(0, 1)  # Initial M move C.
    key = jax.random.key(6)
    answered = []
    for a_m, legal_m in zip(m_moves, m_legal):
        a_o = opponents.fixed_opponent_move(opponents.TFT, state, key)
        answered.append(int(a_o))
        state = games.step(state, a_m, a_o, legal_m, True)
    # Move i answers M's last legal move before i: initial C, then D, C,
    # (illegal: still C), D, (illegal: still D).
    assert answered == [0, 1, 0, 0, 1, 1]


def test_random_over_an_episode_with_scan():
    def decide(state, key):
        a_o = opponents.fixed_opponent_move(opponents.RANDOM, state, key)
        return games.step(state, jnp.int32(0), a_o, True, True), a_o

    keys = _keys(7, 200)
    _, moves = jax.jit(lambda s, k: jax.lax.scan(decide, s, k))(
        _state(0, 0), keys)
    _, again = jax.lax.scan(decide, _state(0, 0), keys)
    np.testing.assert_array_equal(moves, again)
    assert 70 < int(moves.sum()) < 130  # 200 fair flips, > 4 sd.


def _initial_states(opponent, keys):
    state = _batched_initial_states(jnp.int32(opponent), keys)
    return np.asarray(state.prev_m), np.asarray(state.prev_o)


def test_initial_states():
    keys = _keys(8)
    tft_m, _ = _initial_states(opponents.TFT, keys)
    for opponent in range(len(opponents.OPPONENT_NAMES)):
        prev_m, prev_o = _initial_states(opponent, keys)
        assert prev_m.dtype == np.int32 and prev_o.dtype == np.int32
        # M's previous move is uniform for every opponent and uses the same
        # draw for the same key.
        np.testing.assert_array_equal(prev_m, tft_m)
        assert abs(prev_m.mean() - 0.5) < 0.05
        if opponent == opponents.AC:
            np.testing.assert_array_equal(prev_o, 0)
        elif opponent == opponents.AD:
            np.testing.assert_array_equal(prev_o, 1)
        else:
            assert abs(prev_o.mean() - 0.5) < 0.05
            # All four states occur, about a quarter each (independent
            # draws from the two named keys).
            counts = np.bincount(2 * prev_m + prev_o, minlength=4)
            assert (np.abs(counts / len(keys) - 0.25) < 0.05).all(), counts
    prev_m_again, _ = _initial_states(opponents.TFT, keys)
    np.testing.assert_array_equal(prev_m_again, tft_m)
