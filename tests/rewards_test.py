"""Tests for moraljax.rewards against SPEC.md sections 5 and 8.

Expected values are typed out by hand (IPD, BOS, ICD) or derived here from a
literal copy of the SPEC payoff table with plain Python if-statements, never
with the module's own component/weight formula.
"""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moraljax import games
from moraljax import rewards

C, D = 0, 1
NAMES = ("game", "deont", "util", "game_deont")

# (a_m, a_o, prev_o) -> (game, deont, util, game_deont), xi = 3, all legal.
# Worked out by hand from SPEC.md tables 1 and 5.
HAND_TABLES = {
    "IPD": {
        (C, C, C): (3, 0, 6, 3),
        (C, C, D): (3, 0, 6, 3),
        (C, D, C): (0, 0, 4, 0),
        (C, D, D): (0, 0, 4, 0),
        (D, C, C): (4, -3, 4, 1),
        (D, C, D): (4, 0, 4, 4),
        (D, D, C): (1, -3, 2, -2),
        (D, D, D): (1, 0, 2, 1),
    },
    "BOS": {
        (C, C, C): (3, 0, 5, 3),
        (C, C, D): (3, 0, 5, 3),
        (C, D, C): (0, 0, 0, 0),
        (C, D, D): (0, 0, 0, 0),
        (D, C, C): (0, -3, 0, -3),
        (D, C, D): (0, 0, 0, 0),
        (D, D, C): (2, -3, 5, -1),
        (D, D, D): (2, 0, 5, 2),
    },
    "ICD": {
        (C, C, C): (1, 0, 2, 1),
        (C, C, D): (1, 0, 2, 1),
        (C, D, C): (0, 0, 0, 0),
        (C, D, D): (0, 0, 0, 0),
        (D, C, C): (0, -3, 0, -3),
        (D, C, D): (0, 0, 0, 0),
        (D, D, C): (4, -3, 8, 1),
        (D, D, D): (4, 0, 8, 4),
    },
}

# SPEC.md section 1 again, literal: game -> [[(pm, po) for a_o] for a_m].
SPEC_PAYOFFS = {
    "IPD": [[(3, 3), (0, 4)], [(4, 0), (1, 1)]],
    "ISH": [[(4, 4), (0, 3)], [(3, 0), (1, 1)]],
    "ICN": [[(2, 2), (1, 4)], [(4, 1), (0, 0)]],
    "BOS": [[(3, 2), (0, 0)], [(0, 0), (2, 3)]],
    "ICD": [[(1, 1), (0, 0)], [(0, 0), (4, 4)]],
    "IVD": [[(3, 3), (1, 4)], [(4, 1), (0, 0)]],
}
SPEC_UTILITARIAN_MAX = {"IPD": 6, "ISH": 8, "ICN": 5, "BOS": 5, "ICD": 8}


def _expected_legal(name, game, a_m, a_o, prev_o, xi=3.0):
    """Table 1 of the paper, one reward at a time, in plain Python."""
    p_m, p_o = SPEC_PAYOFFS[game][a_m][a_o]
    defects_on_cooperator = a_m == D and prev_o == C
    if name == "game":
        return p_m
    if name == "deont":
        return -xi if defects_on_cooperator else 0.0
    if name == "util":
        return p_m + p_o
    if name == "game_deont":
        return p_m - xi if defects_on_cooperator else p_m
    raise AssertionError(name)


def _expected(name, game, a_m, a_o, prev_o, legal_m, legal_o, paper=True):
    """SPEC.md section 5 including illegal M and the LLM-opponent quirks."""
    if not legal_m:
        return -6.0
    if legal_o:
        return _expected_legal(name, game, a_m, a_o, prev_o)
    if paper and name == "util":
        return 0.0
    if paper and name == "game_deont":
        return -6.0
    # O's last legal move is prev_o.
    return _expected_legal(name, game, a_m, prev_o, prev_o)


def test_hand_tables_agree_with_independent_expectation():
    # Guards the hand-typed tables themselves.
    for game, table in HAND_TABLES.items():
        for (a_m, a_o, prev_o), values in table.items():
            assert values == tuple(
                _expected_legal(n, game, a_m, a_o, prev_o) for n in NAMES)


# Every combination, evaluated in one compiled call.
COMBOS = list(itertools.product(
    SPEC_PAYOFFS, range(len(NAMES)), (C, D), (C, D), (C, D),
    (False, True), (False, True)))


def _spec_stack(paper):
    return rewards.stack_reward_specs([
        rewards.reward_spec(n, paper_opponent_illegal=paper) for n in NAMES])


@jax.jit
def _batched_reward(specs, stacked_games, reward_index, game_index, a_m, a_o,
                    prev_o, legal_m, legal_o):
    def one(r, g, *args):
        spec = jax.tree.map(lambda x: x[r], specs)
        game = jax.tree.map(lambda x: x[g], stacked_games)
        return rewards.moral_reward(spec, game, *args)
    return jax.vmap(one)(reward_index, game_index, a_m, a_o, prev_o,
                         legal_m, legal_o)


def _evaluate_all(paper):
    game_names = list(SPEC_PAYOFFS)
    stacked = games.stack_games([games.get_game(g) for g in game_names])
    columns = list(zip(*COMBOS))
    args = [jnp.array(columns[1]),
            jnp.array([game_names.index(g) for g in columns[0]])]
    args += [jnp.array(c, jnp.int32) for c in columns[2:5]]
    args += [jnp.array(c, jnp.bool_) for c in columns[5:]]
    return np.asarray(_batched_reward(_spec_stack(paper), stacked, *args))


@pytest.mark.parametrize("paper", [True, False])
def test_every_game_cell_state_reward_and_legality(paper):
    got = _evaluate_all(paper)
    assert len(got) == 6 * 4 * 8 * 4
    for value, combo in zip(got, COMBOS):
        game, r, a_m, a_o, prev_o, legal_m, legal_o = combo
        want = _expected(NAMES[r], game, a_m, a_o, prev_o, legal_m, legal_o,
                         paper)
        assert value == want, (combo, paper)
        if legal_m and legal_o and game in HAND_TABLES:
            assert value == HAND_TABLES[game][(a_m, a_o, prev_o)][r], combo


# IPD with an illegal LLM opponent, typed by hand: (a_m, prev_o) ->
# (game, deont, util, game_deont); a_o is ignored.
IPD_OPPONENT_ILLEGAL_PAPER = {
    (C, C): (3, 0, 0, -6),
    (C, D): (0, 0, 0, -6),
    (D, C): (4, -3, 0, -6),
    (D, D): (1, 0, 0, -6),
}
IPD_OPPONENT_ILLEGAL_LAST_LEGAL = {
    (C, C): (3, 0, 6, 3),
    (C, D): (0, 0, 4, 0),
    (D, C): (4, -3, 4, 1),
    (D, D): (1, 0, 2, 1),
}


@pytest.mark.parametrize("paper,table", [
    (True, IPD_OPPONENT_ILLEGAL_PAPER),
    (False, IPD_OPPONENT_ILLEGAL_LAST_LEGAL)])
def test_opponent_illegal_ipd_by_hand(paper, table):
    game = games.get_game("IPD")
    for (a_m, prev_o), values in table.items():
        for a_o in (C, D):
            got = rewards.all_rewards(game, a_m, a_o, prev_o, True, False,
                                      paper_opponent_illegal=paper)
            assert tuple(float(got[n]) for n in NAMES) == values
            # M illegal wins over O illegal.
            got = rewards.all_rewards(game, a_m, a_o, prev_o, False, False,
                                      paper_opponent_illegal=paper)
            assert all(float(got[n]) == -6.0 for n in NAMES)


def test_opponent_illegal_values_as_data():
    paper = {n: float(rewards.reward_spec(n).opponent_illegal_value)
             for n in NAMES}
    assert math.isnan(paper["game"]) and math.isnan(paper["deont"])
    assert paper["util"] == 0.0 and paper["game_deont"] == -6.0
    for n in NAMES:
        spec = rewards.reward_spec(n, paper_opponent_illegal=False)
        assert math.isnan(float(spec.opponent_illegal_value))
    assert math.isnan(float(
        rewards.mixture([1, 1, 1]).opponent_illegal_value))


def test_named_spec_fields():
    expected_weights = {"game": [1, 0, 0], "deont": [0, 1, 0],
                        "util": [0, 0, 1], "game_deont": [1, 1, 0]}
    assert rewards.PAPER_REWARD_NAMES == NAMES == rewards.REWARD_NAMES[:4]
    for name, weights in expected_weights.items():
        spec = rewards.reward_spec(name)
        np.testing.assert_array_equal(spec.weights[:3], weights)
        np.testing.assert_array_equal(spec.weights[3:], 0.0)
        assert spec.weights.dtype == jnp.float32
        assert float(spec.xi) == 3.0
        assert float(spec.illegal_penalty) == -6.0


def test_xi_and_illegal_penalty_are_honoured():
    ipd = games.get_game("IPD")
    deont = rewards.reward_spec("deont", xi=5.0, illegal_penalty=-10.0)
    assert float(rewards.moral_reward(deont, ipd, D, C, C, True, True)) == -5
    assert float(rewards.moral_reward(deont, ipd, D, C, D, True, True)) == 0
    assert float(rewards.moral_reward(deont, ipd, C, C, C, False, True)) == -10
    game_deont = rewards.reward_spec("game_deont", xi=0.5)
    # IPD (D, D) after O's C: 1 - 0.5.
    assert float(rewards.moral_reward(game_deont, ipd, D, D, C, True,
                                      True)) == 0.5


def test_mixture_by_hand():
    ipd = games.get_game("IPD")
    spec = rewards.mixture([0.5, 2.0, 0.25])
    # IPD (D, C) after O's C: 0.5 * 4 + 2 * (-3) + 0.25 * 4 = -3.
    assert float(rewards.moral_reward(spec, ipd, D, C, C, True, True)) == -3.0
    # (C, C): 0.5 * 3 + 0 + 0.25 * 6 = 3.
    assert float(rewards.moral_reward(spec, ipd, C, C, D, True, True)) == 3.0
    # O illegal: a_o := prev_o = D; (C, D): 0.5 * 0 + 0 + 0.25 * 4 = 1.
    assert float(rewards.moral_reward(spec, ipd, C, C, D, True, False)) == 1.0
    assert float(rewards.moral_reward(spec, ipd, C, C, D, False, True)) == -6


def test_reward_components_by_hand():
    ish = games.get_game("ISH")
    # ISH (D, C): (3, 0); after O's C with xi 2: (3, -2, 3).
    # (game, deont, util, altruist, equality, inequality, kindness, aggressiveness)
    np.testing.assert_array_equal(
        rewards.reward_components(ish, D, C, C, 2.0), [3.0, -2.0, 3.0, 0.0, 0.0, 1.0, 0.0, 2.0])
    np.testing.assert_array_equal(
        rewards.reward_components(ish, C, D, C, 2.0), [0.0, 0.0, 3.0, 3.0, 0.0, 1.0, 2.0, 0.0])
    assert rewards.COMPONENT_NAMES[:3] == ("game", "deont", "util")


def test_all_rewards_matches_moral_reward_under_jit():
    icn = games.get_game("ICN")
    jitted = jax.jit(rewards.all_rewards)
    for a_m, a_o, prev_o in itertools.product((C, D), repeat=3):
        got = jitted(icn, a_m, a_o, prev_o, True, True)
        assert set(got) == set(rewards.REWARD_NAMES)
        for n in NAMES:
            assert float(got[n]) == _expected_legal(n, "ICN", a_m, a_o, prev_o)


def test_eager_equals_jit():
    ipd = games.get_game("IPD")
    jitted = jax.jit(rewards.moral_reward)
    for name in NAMES:
        spec = rewards.reward_spec(name)
        for a_m, a_o, prev_o, legal_m, legal_o in itertools.product(
                (C, D), (C, D), (C, D), (False, True), (False, True)):
            args = (jnp.int32(a_m), jnp.int32(a_o), jnp.int32(prev_o),
                    jnp.bool_(legal_m), jnp.bool_(legal_o))
            eager = rewards.moral_reward(spec, ipd, *args)
            compiled = jitted(spec, ipd, *args)
            assert eager.dtype == jnp.float32 and eager.shape == ()
            assert float(eager) == float(compiled)


def test_vmap_over_games_and_specs_matches_loop():
    game_list = [games.get_game(g) for g in games.GAME_NAMES]
    spec_list = [rewards.reward_spec(n) for n in NAMES] + [
        rewards.mixture([0.3, -1.0, 2.0], xi=4.0)]
    stacked_games = games.stack_games(game_list)
    stacked_specs = rewards.stack_reward_specs(spec_list)
    a_m, a_o, prev_o = D, C, C
    over_both = jax.jit(jax.vmap(
        jax.vmap(rewards.moral_reward,
                 in_axes=(None, 0, None, None, None, None, None)),
        in_axes=(0, None, None, None, None, None, None)))
    got = over_both(stacked_specs, stacked_games, a_m, a_o, prev_o, True,
                    True)
    assert got.shape == (len(spec_list), len(game_list))
    for i, spec in enumerate(spec_list):
        for j, game in enumerate(game_list):
            want = rewards.moral_reward(spec, game, a_m, a_o, prev_o, True,
                                        True)
            np.testing.assert_allclose(got[i, j], want, rtol=1e-6)
    # Mixture on IPD (D, C) after C, xi 4: 0.3 * 4 - 1 * (-4) + 2 * 4 = 13.2.
    np.testing.assert_allclose(got[4, 0], 13.2, rtol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        rewards.stack_reward_specs([])


def test_one_compile_serves_every_reward_and_game():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def reward(spec, game):
        return rewards.moral_reward(spec, game, jnp.int32(D), jnp.int32(D),
                                    jnp.int32(C), jnp.bool_(True),
                                    jnp.bool_(True))

    for name in NAMES:
        for game in SPEC_PAYOFFS:
            got = reward(rewards.reward_spec(name), games.get_game(game))
            assert float(got) == _expected_legal(name, game, D, D, C)


def test_deontological_regret_known_cases():
    cases = {
        # (a_m, prev_o, legal_m): regret at xi_eval 4.
        (D, C, True): 4.0,
        (D, D, True): 0.0,
        (C, C, True): 0.0,
        (C, D, True): 0.0,
        (C, C, False): 6.0,
        (D, D, False): 6.0,
    }
    jitted = jax.jit(rewards.deontological_regret)
    for (a_m, prev_o, legal_m), want in cases.items():
        assert float(rewards.deontological_regret(a_m, prev_o, legal_m)) == (
            want)
        assert float(jitted(a_m, prev_o, legal_m)) == want
    assert float(rewards.deontological_regret(D, C, True, xi_eval=3.0)) == 3


def test_utilitarian_regret_known_cases():
    cases = [
        # (game, a_m, a_o, legal_m, regret) = (U_max - R_Ut) / (U_max + 6).
        ("IPD", C, C, True, 0.0),
        ("IPD", D, D, True, 4 / 12),
        ("IPD", C, D, True, 2 / 12),
        ("IPD", D, C, False, 1.0),
        ("ICD", C, C, True, 6 / 14),
        ("ICD", D, D, True, 0.0),
        ("ICN", C, C, True, 1 / 11),
        ("ICN", D, D, True, 5 / 11),
        ("BOS", C, D, True, 5 / 11),
        ("ISH", D, C, True, 5 / 14),
    ]
    for game, a_m, a_o, legal_m, want in cases:
        got = rewards.utilitarian_regret(games.get_game(game), a_m, a_o,
                                         legal_m)
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=game)


def test_utilitarian_regret_range_and_vmap():
    names = list(SPEC_UTILITARIAN_MAX)
    stacked = games.stack_games([games.get_game(g) for g in names])
    for a_m, a_o, legal_m in itertools.product((C, D), (C, D),
                                               (False, True)):
        got = jax.vmap(rewards.utilitarian_regret,
                       in_axes=(0, None, None, None))(stacked, a_m, a_o,
                                                       legal_m)
        for g, value in zip(names, np.asarray(got)):
            p_m, p_o = SPEC_PAYOFFS[g][a_m][a_o]
            u_max = SPEC_UTILITARIAN_MAX[g]
            r_ut = p_m + p_o if legal_m else -6
            np.testing.assert_allclose(value, (u_max - r_ut) / (u_max + 6),
                                       rtol=1e-6)
            assert 0.0 <= value <= 1.0


def test_unknown_reward_lists_allowed():
    with pytest.raises(ValueError) as error:
        rewards.reward_spec("selfish")
    message = str(error.value)
    assert "unknown reward 'selfish'" in message
    assert "allowed: game, deont, util, game_deont" in message


@pytest.mark.parametrize("kwargs,fragments", [
    (dict(xi=float("nan")), ["xi", "nan", "finite"]),
    (dict(xi=float("inf")), ["xi", "inf", "finite"]),
    (dict(xi="3"), ["xi", "'3'", "real numbers"]),
    (dict(xi=True), ["xi", "True", "real numbers"]),
    (dict(xi=[3.0]), ["xi", "shape ()", "shape (1,)"]),
    (dict(illegal_penalty=float("-inf")), ["illegal_penalty", "-inf"]),
    (dict(illegal_penalty=1e39), ["illegal_penalty", "inf", "finite"]),
    (dict(paper_opponent_illegal=1), ["paper_opponent_illegal", "True"]),
])
def test_reward_spec_rejects_bad_values(kwargs, fragments):
    with pytest.raises(ValueError) as error:
        rewards.reward_spec("game", **kwargs)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "allowed:" in message


@pytest.mark.parametrize("weights,fragments", [
    ([1.0, 0.0], ["weights", "shape (8,)", "shape (2,)", "or 3"]),
    ([[1.0, 0.0, 0.0]], ["weights", "shape (8,)", "shape (1, 3)"]),
    ([1.0, float("nan"), 0.0], ["weights", "nan", "finite"]),
    ([True, False, False], ["weights", "bool"]),
    (["a", "b", "c"], ["weights", "real numbers"]),
])
def test_mixture_rejects_bad_weights(weights, fragments):
    with pytest.raises(ValueError) as error:
        rewards.mixture(weights)
    message = str(error.value)
    for fragment in fragments:
        assert fragment in message, message
    assert "game" in message and "util" in message  # Names the components.
    with pytest.raises(ValueError, match="xi must be finite"):
        rewards.mixture([1.0, 0.0, 0.0], xi=float("nan"))


# ---------------------------------------------------------------------------
# The authors' wider reward set (SPEC.md section 10), xi = 3, beta = 0.5.

WIDER = ("virtue_equality", "virtue_inequality", "virtue_kindness", "virtue_aggressiveness",
         "virtue_mixed", "altruist", "anti_util", "anti_altruist")

# (a_m, a_o) -> values in WIDER order, worked out by hand from the SPEC 1
# payoffs; the (0, 0) cells (ICN, BOS, ICD, IVD) give equality 1, inequality 0.
WIDER_HAND_TABLES = {
    "IPD": {(C, C): (1, 0, 3, 0, 1.0, 3, -6, -3), (C, D): (0, 1, 3, 0, 0.5, 4, -4, -4),
            (D, C): (0, 1, 0, 3, 0.0, 0, -4, 0), (D, D): (1, 0, 0, 3, 0.5, 1, -2, -1)},
    "ISH": {(C, C): (1, 0, 3, 0, 1.0, 4, -8, -4), (C, D): (0, 1, 3, 0, 0.5, 3, -3, -3),
            (D, C): (0, 1, 0, 3, 0.0, 0, -3, 0), (D, D): (1, 0, 0, 3, 0.5, 1, -2, -1)},
    "ICN": {(C, C): (1, 0, 3, 0, 1.0, 2, -4, -2), (C, D): (0.4, 0.6, 3, 0, 0.7, 4, -5, -4),
            (D, C): (0.4, 0.6, 0, 3, 0.2, 1, -5, -1), (D, D): (1, 0, 0, 3, 0.5, 0, 0, 0)},
    "BOS": {(C, C): (0.8, 0.2, 3, 0, 0.9, 2, -5, -2), (C, D): (1, 0, 3, 0, 1.0, 0, 0, 0),
            (D, C): (1, 0, 0, 3, 0.5, 0, 0, 0), (D, D): (0.8, 0.2, 0, 3, 0.4, 3, -5, -3)},
    "ICD": {(C, C): (1, 0, 3, 0, 1.0, 1, -2, -1), (C, D): (1, 0, 3, 0, 1.0, 0, 0, 0),
            (D, C): (1, 0, 0, 3, 0.5, 0, 0, 0), (D, D): (1, 0, 0, 3, 0.5, 4, -8, -4)},
    "IVD": {(C, C): (1, 0, 3, 0, 1.0, 3, -6, -3), (C, D): (0.4, 0.6, 3, 0, 0.7, 4, -5, -4),
            (D, C): (0.4, 0.6, 0, 3, 0.2, 1, -5, -1), (D, D): (1, 0, 0, 3, 0.5, 0, 0, 0)},
}
# malicious_deont depends on (a_m, prev_o) only, the same in every game.
MALICIOUS_DEONT_BY_HAND = {(C, C): 0, (C, D): 0, (D, C): 3, (D, D): 0}


def _expected_wider(name, game, a_m, a_o, prev_o, xi=3.0, beta=0.5):
    """SPEC.md section 10, one reward at a time, in plain Python."""
    p_m, p_o = SPEC_PAYOFFS[game][a_m][a_o]
    total = p_m + p_o
    inequality = 0.0 if total == 0 else abs(p_m - p_o) / total
    kindness = xi if a_m == C else 0.0
    return {
        "virtue_equality": 1.0 - inequality,
        "virtue_inequality": inequality,
        "virtue_kindness": kindness,
        "virtue_aggressiveness": xi if a_m == D else 0.0,
        "virtue_mixed": beta * (1.0 - inequality) + (1.0 - beta) * kindness / xi,
        "altruist": p_o,
        "anti_util": -total,
        "anti_altruist": -p_o,
        "malicious_deont": xi if (a_m == D and prev_o == C) else 0.0,
    }[name]


def test_wider_hand_tables_agree_with_independent_expectation():
    assert set(WIDER_HAND_TABLES) == set(games.GAME_NAMES) == set(SPEC_PAYOFFS)
    for game, table in WIDER_HAND_TABLES.items():
        for (a_m, a_o), values in table.items():
            for name, value in zip(WIDER, values):
                assert _expected_wider(name, game, a_m, a_o, C) == pytest.approx(value), (game, name)
            for prev_o in (C, D):
                assert _expected_wider("malicious_deont", game, a_m, a_o, prev_o) == (
                    MALICIOUS_DEONT_BY_HAND[(a_m, prev_o)])


@jax.jit
def _wider_rewards(game, a_m, a_o, prev_o, legal_m, legal_o):
    return rewards.all_rewards(game, a_m, a_o, prev_o, legal_m, legal_o)


@pytest.mark.parametrize("game_name", sorted(WIDER_HAND_TABLES))
def test_wider_rewards_on_every_cell_and_state(game_name):
    game = games.get_game(game_name)
    for (a_m, a_o), values in WIDER_HAND_TABLES[game_name].items():
        for prev_o in (C, D):
            got = _wider_rewards(game, a_m, a_o, prev_o, True, True)
            for name, value in zip(WIDER, values):
                np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-7,
                                           err_msg=f"{game_name} {name} {(a_m, a_o, prev_o)}")
            assert float(got["malicious_deont"]) == MALICIOUS_DEONT_BY_HAND[(a_m, prev_o)]
            # The paper's rewards are unchanged by the wider component set.
            for name in NAMES:
                assert float(got[name]) == _expected_legal(name, game_name, a_m, a_o, prev_o)
            # Illegal M: R_illegal for every type.
            illegal = _wider_rewards(game, a_m, a_o, prev_o, False, True)
            assert all(float(v) == -6.0 for v in illegal.values())
            # Illegal LLM opponent: the wider set uses O's last legal move (prev_o).
            opponent_illegal = _wider_rewards(game, a_m, a_o, prev_o, True, False)
            for name, value in zip(WIDER, WIDER_HAND_TABLES[game_name][(a_m, prev_o)]):
                np.testing.assert_allclose(opponent_illegal[name], value, rtol=1e-6, atol=1e-7)


def test_virtue_mixed_beta_and_xi():
    icn = games.get_game("ICN")
    spec = rewards.reward_spec("virtue_mixed", beta=0.25)
    # ICN (C, D) = (1, 4): 0.25 * 0.4 + 0.75 * 1 = 0.85.
    np.testing.assert_allclose(rewards.moral_reward(spec, icn, C, D, C, True, True), 0.85, rtol=1e-6)
    # kindness / xi is 1 whatever xi is.
    spec = rewards.reward_spec("virtue_mixed", xi=5.0, beta=0.0)
    np.testing.assert_allclose(rewards.moral_reward(spec, icn, C, C, C, True, True), 1.0, rtol=1e-6)
    kindness = rewards.reward_spec("virtue_kindness", xi=5.0)
    assert float(rewards.moral_reward(kindness, icn, C, D, D, True, True)) == 5.0
    with pytest.raises(ValueError, match="xi must be nonzero"):
        rewards.reward_spec("virtue_mixed", xi=0.0)
    with pytest.raises(ValueError, match="beta"):
        rewards.reward_spec("virtue_mixed", beta=float("nan"))


def test_full_mixture_weights_every_component():
    bos = games.get_game("BOS")
    # BOS (D, D) = (2, 3) after O's C, xi 3: components
    # (2, -3, 5, 3, 0.8, 0.2, 0, 3).
    weights = [1, 1, 1, 1, 10, 10, 1, 1]
    spec = rewards.mixture(weights)
    np.testing.assert_allclose(rewards.moral_reward(spec, bos, D, D, C, True, True),
                               2 - 3 + 5 + 3 + 8 + 2 + 0 + 3, rtol=1e-6)
    assert rewards.mixture([1, 0, 0]).weights.shape == (rewards.NUM_COMPONENTS,)


def test_decision_metrics_names_every_reward():
    ipd = games.get_game("IPD")
    out = jax.jit(rewards.decision_metrics)(ipd, jnp.int32(D), jnp.int32(C), jnp.int32(C), jnp.bool_(True),
                                            rewards.named_reward_specs())
    assert set(out["named_rewards"]) == {f"reward_{n}" for n in rewards.REWARD_NAMES}
    assert float(out["named_rewards"]["reward_malicious_deont"]) == 3.0
    assert float(out["named_rewards"]["reward_virtue_aggressiveness"]) == 3.0


def test_decision_metrics_use_the_given_settings():
    """The named rewards follow xi, the illegal penalty and beta of the specs they are given."""
    ipd = games.get_game("IPD")
    metrics = jax.jit(rewards.decision_metrics)
    specs = rewards.named_reward_specs(xi=5.0, illegal_penalty=-2.0, beta=0.25)
    out = metrics(ipd, jnp.int32(D), jnp.int32(C), jnp.int32(C), jnp.bool_(True), specs)["named_rewards"]
    assert float(out["reward_deont"]) == -5.0
    assert float(out["reward_game_deont"]) == float(out["reward_game"]) - 5.0
    assert float(out["reward_virtue_aggressiveness"]) == 5.0
    illegal = metrics(ipd, jnp.int32(-1), jnp.int32(C), jnp.int32(C), jnp.bool_(True), specs)["named_rewards"]
    assert {float(v) for v in illegal.values()} == {-2.0}
    cooperate = metrics(ipd, jnp.int32(C), jnp.int32(C), jnp.int32(C), jnp.bool_(True), specs)["named_rewards"]
    # beta * equality + (1 - beta) / xi * kindness = 0.25 * 1 + 0.75 / 5 * 5.
    np.testing.assert_allclose(float(cooperate["reward_virtue_mixed"]), 1.0, rtol=1e-6)
    # xi = 0: virtue_mixed keeps its equality term only (kindness / xi is undefined).
    zero = metrics(ipd, jnp.int32(C), jnp.int32(C), jnp.int32(C), jnp.bool_(True),
                   rewards.named_reward_specs(xi=0.0, beta=0.25))["named_rewards"]
    assert float(zero["reward_virtue_mixed"]) == 0.25
    assert set(rewards.SHORT_NAMES) == set(rewards.REWARD_NAMES)
