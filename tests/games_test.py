"""Tests for moraljax.games against the tables of SPEC.md section 1."""

import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moraljax import games

# SPEC.md section 1, typed out again here (not imported from games.py):
# game -> {(M action, O action): (payoff_M, payoff_O)}.
SPEC_TABLE = {
    "IPD": {("C", "C"): (3, 3), ("C", "D"): (0, 4),
            ("D", "C"): (4, 0), ("D", "D"): (1, 1)},
    "ISH": {("C", "C"): (4, 4), ("C", "D"): (0, 3),
            ("D", "C"): (3, 0), ("D", "D"): (1, 1)},
    "ICN": {("C", "C"): (2, 2), ("C", "D"): (1, 4),
            ("D", "C"): (4, 1), ("D", "D"): (0, 0)},
    "BOS": {("C", "C"): (3, 2), ("C", "D"): (0, 0),
            ("D", "C"): (0, 0), ("D", "D"): (2, 3)},
    "ICD": {("C", "C"): (1, 1), ("C", "D"): (0, 0),
            ("D", "C"): (0, 0), ("D", "D"): (4, 4)},
    "IVD": {("C", "C"): (3, 3), ("C", "D"): (1, 4),
            ("D", "C"): (4, 1), ("D", "D"): (0, 0)},
}
SPEC_UTILITARIAN_MAX = {"IPD": 6, "ISH": 8, "ICN": 5, "BOS": 5, "ICD": 8,
                        "IVD": 6}
INDEX = {"C": 0, "D": 1}
CELLS = list(itertools.product("CD", repeat=2))


def test_action_constants():
    assert (games.C, games.D) == (0, 1)
    assert games.ACTION_NAMES == ("C", "D")


def test_registry_names():
    assert games.GAME_NAMES == ("IPD", "ISH", "ICN", "BOS", "ICD", "IVD")
    assert games.EVALUATION_GAME_NAMES == ("IPD", "ISH", "ICN", "BOS", "ICD")
    assert set(games.GAME_NAMES) <= set(games.GAMES)


@pytest.mark.parametrize("name", list(SPEC_TABLE))
def test_every_cell_matches_spec(name):
    game = games.get_game(name)
    assert game is games.GAMES[name]
    assert game.payoffs.shape == (2, 2, 2)
    assert game.payoffs.dtype == jnp.float32
    for a_m, a_o in CELLS:
        p_m, p_o = games.payoffs_for(game, INDEX[a_m], INDEX[a_o])
        assert (float(p_m), float(p_o)) == SPEC_TABLE[name][(a_m, a_o)], (
            name, a_m, a_o)


@pytest.mark.parametrize("name", list(SPEC_UTILITARIAN_MAX))
def test_utilitarian_max(name):
    assert float(games.utilitarian_max(games.get_game(name))) == (
        SPEC_UTILITARIAN_MAX[name])


def test_get_game_unknown_lists_allowed():
    with pytest.raises(ValueError) as error:
        games.get_game("XYZ")
    message = str(error.value)
    assert "unknown game 'XYZ'" in message
    assert "allowed: IPD, ISH, ICN, BOS, ICD, IVD" in message
    with pytest.raises(ValueError, match="unknown game 'ipd'"):
        games.get_game("ipd")  # Names are case-sensitive.


def test_games_mapping_is_read_only():
    with pytest.raises(TypeError):
        games.GAMES["NEW"] = games.get_game("IPD")


@pytest.mark.parametrize("payoffs,fragment", [
    (np.zeros((2, 2)), "shape (2, 2)"),
    (np.zeros((2, 2, 3)), "shape (2, 2, 3)"),
    (np.zeros((1, 2, 2, 2)), "shape (1, 2, 2, 2)"),
    ([[(3, 3), (0, 4)], [(4, 0), (1, float("nan"))]], "nan"),
    ([[(3, 3), (0, 4)], [(4, 0), (1, float("inf"))]], "inf"),
    (np.full((2, 2, 2), 1e39), "inf"),  # Finite in float64, not in float32.
    (np.zeros((2, 2, 2), bool), "dtype bool"),
    (np.full((2, 2, 2), "a"), "real numbers"),
])
def test_make_game_rejects_bad_payoffs(payoffs, fragment):
    with pytest.raises(ValueError) as error:
        games.make_game(payoffs)
    message = str(error.value)
    assert "payoffs" in message
    assert fragment in message
    assert "allowed:" in message and "(2, 2, 2)" in message


def test_make_game_accepts_ints_as_float32():
    game = games.make_game([[(1, 2), (3, 4)], [(5, 6), (7, 8)]])
    assert game.payoffs.dtype == jnp.float32
    np.testing.assert_array_equal(game.payoffs[1, 0], [5.0, 6.0])


def test_register_game():
    name = "TEST_ASYMMETRIC"
    try:
        game = games.register_game(name, [[(1, 2), (3, 4)], [(5, 6), (7, 8)]])
        assert games.get_game(name) is game
        assert name in games.GAMES
        assert float(games.utilitarian_max(game)) == 15.0
        with pytest.raises(ValueError, match="already registered"):
            games.register_game(name, np.zeros((2, 2, 2)))
        games.register_game(name, np.ones((2, 2, 2)), overwrite=True)
        assert float(games.get_game(name).payoffs[0, 0, 0]) == 1.0
        with pytest.raises(ValueError, match=name):
            games.get_game("nope")  # Lists the user game among allowed.
    finally:
        games._registry.pop(name, None)
    assert name not in games.GAMES


def test_register_game_refuses_paper_names_and_bad_input():
    with pytest.raises(ValueError, match="'IPD' is one of the paper's"):
        games.register_game("IPD", np.zeros((2, 2, 2)), overwrite=True)
    with pytest.raises(ValueError, match="non-empty string"):
        games.register_game("", np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="payoffs"):
        games.register_game("TEST_BAD", np.zeros((2, 2)))
    assert "TEST_BAD" not in games.GAMES


def test_opponent_view_swaps_players():
    # Bach-or-Stravinsky is asymmetric: O prefers (D, D).
    view = games.opponent_view(games.get_game("BOS"))
    for a_o, a_m in CELLS:
        p_m, p_o = SPEC_TABLE["BOS"][(a_m, a_o)]
        got = games.payoffs_for(view, INDEX[a_o], INDEX[a_m])
        assert tuple(map(float, got)) == (p_o, p_m)
    np.testing.assert_array_equal(
        view.payoffs, [[(2, 3), (0, 0)], [(0, 0), (3, 2)]])


def test_swap_players():
    state = games.GameState(prev_m=jnp.int32(1), prev_o=jnp.int32(0))
    swapped = games.swap_players(state)
    assert (int(swapped.prev_m), int(swapped.prev_o)) == (0, 1)


def test_stack_games_and_vmap_matches_loop():
    stacked = games.stack_games([games.get_game(n) for n in games.GAME_NAMES])
    assert stacked.payoffs.shape == (6, 2, 2, 2)
    a_m = jnp.array([0, 1, 1, 0, 1, 0], jnp.int32)
    a_o = jnp.array([1, 0, 1, 0, 1, 1], jnp.int32)
    p_m, p_o = jax.jit(jax.vmap(games.payoffs_for))(stacked, a_m, a_o)
    maxima = jax.vmap(games.utilitarian_max)(stacked)
    for i, name in enumerate(games.GAME_NAMES):
        expected = SPEC_TABLE[name][("CD"[a_m[i]], "CD"[a_o[i]])]
        assert (float(p_m[i]), float(p_o[i])) == expected
        assert float(maxima[i]) == SPEC_UTILITARIAN_MAX[name]
    with pytest.raises(ValueError, match="at least one"):
        games.stack_games([])


def test_one_compile_serves_every_game():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def lookup(game, a_m, a_o):
        return games.payoffs_for(game, a_m, a_o)

    for name in games.GAME_NAMES:
        for a_m, a_o in CELLS:
            got = lookup(games.get_game(name), jnp.int32(INDEX[a_m]),
                         jnp.int32(INDEX[a_o]))
            assert tuple(map(float, got)) == SPEC_TABLE[name][(a_m, a_o)]


def _expected_step(prev_m, prev_o, a_m, a_o, legal_m, legal_o):
    """SPEC.md section 2 written as plain Python."""
    next_m = a_m if legal_m else prev_m
    next_o = a_o if legal_o else prev_o
    return next_m, next_o


def test_step_exhaustive_jit_and_eager():
    jitted = jax.jit(games.step)
    for prev_m, prev_o, a_m, a_o, legal_m, legal_o in itertools.product(
            (0, 1), (0, 1), (0, 1), (0, 1), (False, True), (False, True)):
        state = games.GameState(prev_m=jnp.int32(prev_m),
                                prev_o=jnp.int32(prev_o))
        args = (jnp.int32(a_m), jnp.int32(a_o), jnp.bool_(legal_m),
                jnp.bool_(legal_o))
        expected = _expected_step(prev_m, prev_o, a_m, a_o, legal_m, legal_o)
        for fn in (games.step, jitted):
            new = fn(state, *args)
            assert new.prev_m.dtype == jnp.int32
            assert new.prev_o.dtype == jnp.int32
            assert (int(new.prev_m), int(new.prev_o)) == expected


def test_step_keeps_last_legal_moves_over_a_sequence():
    # M: D (legal), C (illegal), C (legal), D (illegal).
    # O (LLM): C (legal), D (illegal), D (legal), C (legal).
    sequence = [(1, 0, True, True), (0, 1, False, False),
                (0, 1, True, True), (1, 0, False, True)]
    expected = [(1, 0), (1, 0), (0, 1), (0, 0)]
    state = games.GameState(prev_m=jnp.int32(0), prev_o=jnp.int32(1))
    for (a_m, a_o, legal_m, legal_o), want in zip(sequence, expected):
        state = games.step(state, a_m, a_o, legal_m, legal_o)
        assert (int(state.prev_m), int(state.prev_o)) == want


# SPEC.md section 8, typed out: (M's action, legal, O's previous move) ->
# action type name.
ACTION_TYPES = {
    ("C", True, "C"): "C|C", ("C", True, "D"): "C|D",
    ("D", True, "C"): "D|C", ("D", True, "D"): "D|D",
    ("C", False, "C"): "illegal|C", ("D", False, "C"): "illegal|C",
    ("C", False, "D"): "illegal|D", ("D", False, "D"): "illegal|D",
}


def test_action_type_table():
    assert games.ACTION_TYPE_NAMES == (
        "C|C", "C|D", "D|C", "D|D", "illegal|C", "illegal|D")
    jitted = jax.jit(games.action_type)
    for (a_m, legal, prev_o), name in ACTION_TYPES.items():
        for fn in (games.action_type, jitted):
            index = fn(jnp.int32(INDEX[a_m]), jnp.bool_(legal),
                       jnp.int32(INDEX[prev_o]))
            assert index.dtype == jnp.int32
            assert games.ACTION_TYPE_NAMES[int(index)] == name


def test_action_type_vmapped():
    keys = list(ACTION_TYPES)
    a_m = jnp.array([INDEX[k[0]] for k in keys])
    legal = jnp.array([k[1] for k in keys])
    prev_o = jnp.array([INDEX[k[2]] for k in keys])
    indices = jax.vmap(games.action_type)(a_m, legal, prev_o)
    assert [games.ACTION_TYPE_NAMES[i] for i in indices.tolist()] == [
        ACTION_TYPES[k] for k in keys]


def test_shape_checks():
    with pytest.raises(AssertionError):
        games.payoffs_for(games.get_game("IPD"), jnp.zeros(2, jnp.int32), 0)
    with pytest.raises(AssertionError):
        games.utilitarian_max(games.stack_games([games.get_game("IPD")]))
