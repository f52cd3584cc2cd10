"""Moral rewards (Table 1 of the paper, SPEC.md 10) and moral regrets (SPEC 5, 8).

Notation: a_m = M's action now, a_o = O's action now, prev_o = O's previous
move (the state shown in M's prompt), (p_m, p_o) = the game's payoffs of
(a_m, a_o). Every reward is built from the components

    game           = p_m
    deont          = -xi  if a_m = D and prev_o = C,  else 0
    util           = p_m + p_o
    altruist       = p_o
    equality       = 1 - |p_m - p_o| / (p_m + p_o)   (1 when p_m + p_o = 0)
    inequality     = |p_m - p_o| / (p_m + p_o)       (0 when p_m + p_o = 0)
    kindness       = xi  if a_m = C,  else 0
    aggressiveness = xi  if a_m = D,  else 0

weighted by ``RewardSpec.weights`` (the paper's three first, then the
authors' wider set of IJCAI 2023 / AIES 2024, SPEC 10):

    game (Selfish)         game                      payoff_M
    deont                  deont                     -xi for defecting against a cooperator
    util                   util                      payoff_M + payoff_O
    game_deont             game + deont              payoff_M - xi (same condition)
    virtue_equality        equality
    virtue_kindness        kindness
    virtue_mixed           beta * equality + (1 - beta) / xi * kindness
    altruist               altruist                  payoff_O
    anti_util              -util
    malicious_deont        -deont                    +xi for defecting against a cooperator
    virtue_inequality      inequality
    virtue_aggressiveness  aggressiveness
    anti_altruist          -altruist

When p_m + p_o = 0 (the (0, 0) cells of ICN, BOS and ICD) both players got
the same, so equality is 1 and inequality 0. Every reward is R_illegal = -6
when M's output is illegal. A reward is
data (a pytree of arrays), so one compiled program serves every reward type
and a sweep can ``jax.vmap`` over reward types and weighted mixtures
(``stack_reward_specs``). Functions are unbatched; vmap at the call site.
"""

from collections.abc import Sequence

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from moraljax import games

# The paper's four rewards (Table 1), then the authors' wider set (SPEC 10).
PAPER_REWARD_NAMES = ("game", "deont", "util", "game_deont")
REWARD_NAMES = PAPER_REWARD_NAMES + (
    "virtue_equality", "virtue_kindness", "virtue_mixed", "altruist", "anti_util",
    "malicious_deont", "virtue_inequality", "virtue_aggressiveness", "anti_altruist")
# The paper's three components first: a 3-weight mixture keeps its meaning.
PAPER_COMPONENT_NAMES = ("game", "deont", "util")
COMPONENT_NAMES = PAPER_COMPONENT_NAMES + (
    "altruist", "equality", "inequality", "kindness", "aggressiveness")
NUM_COMPONENTS = len(COMPONENT_NAMES)

# The AIES 2024 paper's short type labels (and short ones for the rest), for
# figures and tables of populations.
SHORT_NAMES = {
    "game": "S", "util": "UT", "anti_util": "aUT", "deont": "DE", "malicious_deont": "mDE",
    "virtue_equality": "VEe", "virtue_inequality": "VIe", "virtue_kindness": "VEk",
    "virtue_aggressiveness": "Vagg", "virtue_mixed": "VEm", "altruist": "A",
    "anti_altruist": "aA", "game_deont": "S+DE",
}

# Components named by each reward with a fixed weight (virtue_mixed depends
# on beta and xi: `_named_weights`).
_NAMED_COMPONENTS = {
    "game": {"game": 1.0},
    "deont": {"deont": 1.0},
    "util": {"util": 1.0},
    "game_deont": {"game": 1.0, "deont": 1.0},
    "virtue_equality": {"equality": 1.0},
    "virtue_kindness": {"kindness": 1.0},
    "altruist": {"altruist": 1.0},
    "anti_util": {"util": -1.0},
    "malicious_deont": {"deont": -1.0},
    "virtue_inequality": {"inequality": 1.0},
    "virtue_aggressiveness": {"aggressiveness": 1.0},
    "anti_altruist": {"altruist": -1.0},
}
VIRTUE_MIXED_BETA = 0.5


def _named_weights(name: str, xi: float, beta: float) -> tuple[float, ...]:
    """The component weights of reward `name` (float64 host numbers)."""
    if name == "virtue_mixed":
        # kindness / xi is 1 when M cooperates: the (1 - beta) share is on a 0..1 scale.
        if isinstance(xi, (int, float)) and not isinstance(xi, bool) and xi == 0:
            raise ValueError("xi must be nonzero for virtue_mixed (it divides kindness), got 0; "
                             "allowed: a finite nonzero number")
        named = {"equality": beta, "kindness": (1.0 - beta) / xi}
    else:
        named = _NAMED_COMPONENTS[name]
    return tuple(float(named.get(component, 0.0)) for component in COMPONENT_NAMES)

# What M gets when an LLM opponent's output is illegal, in the authors' code
# (SPEC.md section 5). NaN means "compute the components with a_o := prev_o",
# O's last legal move; a number means "M gets exactly this". The -6 of
# Game+De is the authors' literal, kept even if illegal_penalty is changed.
USE_LAST_LEGAL_MOVE = float("nan")
# The wider set (not in the paper's code) uses O's last legal move.
_PAPER_OPPONENT_ILLEGAL = {
    "game": USE_LAST_LEGAL_MOVE,
    "deont": USE_LAST_LEGAL_MOVE,
    "util": 0.0,
    "game_deont": -6.0,
}

TRAINING_XI = 3.0
EVALUATION_XI = 4.0
ILLEGAL_PENALTY = -6.0


@flax.struct.dataclass
class RewardSpec:
    """One reward function as data.

    Attributes:
        weights: float32 [NUM_COMPONENTS], weights of ``COMPONENT_NAMES``.
        xi: float32 scalar, the deontological penalty size (3 in training).
        illegal_penalty: float32 scalar, M's reward for an illegal output.
        opponent_illegal_value: float32 scalar, M's reward when O's output is
            illegal (LLM opponents only). NaN: use the ordinary reward with
            a_o := prev_o (O's last legal move); finite: exactly this value.
    """

    weights: jax.Array
    xi: jax.Array
    illegal_penalty: jax.Array
    opponent_illegal_value: jax.Array


def _make_spec(weights, xi, illegal_penalty, opponent_illegal_value
               ) -> RewardSpec:
    return RewardSpec(
        weights=games.validated_float32(
            "weights", weights, (NUM_COMPONENTS,),
            f"{NUM_COMPONENTS} finite numbers, the weights of "
            f"{COMPONENT_NAMES} (or {len(PAPER_COMPONENT_NAMES)}, those of "
            f"{PAPER_COMPONENT_NAMES})"),
        xi=games.validated_float32("xi", xi, (), "a finite number"),
        illegal_penalty=games.validated_float32(
            "illegal_penalty", illegal_penalty, (), "a finite number"),
        opponent_illegal_value=jnp.float32(opponent_illegal_value))


def _deontological_penalty(a_m: jax.Array, prev_o: jax.Array,
                           xi: jax.Array) -> jax.Array:
    """-xi if M defected against an opponent who last cooperated, else 0."""
    defected_on_cooperator = (a_m == games.D) & (prev_o == games.C)
    return jnp.where(defected_on_cooperator, -jnp.asarray(xi, jnp.float32),
                     jnp.float32(0.0))


def reward_spec(name: str, *, xi: float = TRAINING_XI,
                illegal_penalty: float = ILLEGAL_PENALTY,
                paper_opponent_illegal: bool = True,
                beta: float = VIRTUE_MIXED_BETA) -> RewardSpec:
    """The named reward of Table 1 of the paper or of SPEC 10.

    Args:
        name: one of ``REWARD_NAMES``.
        xi: deontological penalty size (paper: 3 in training); also the
            size of the kindness and aggressiveness rewards.
        illegal_penalty: M's reward for an illegal output (paper: -6).
        paper_opponent_illegal: when an LLM opponent is illegal, reproduce
            the authors' code (Game and De: O's last legal move; Ut: 0;
            Game+De: -6). False: every reward uses O's last legal move.
        beta: virtue_mixed's weight on equality (unused by other rewards).

    Returns:
        The reward as a ``RewardSpec``.

    Raises:
        ValueError: for an unknown name, a non-finite xi / illegal_penalty /
            beta, or xi = 0 for virtue_mixed.
    """
    if not isinstance(name, str) or name not in REWARD_NAMES:
        raise ValueError(
            f"unknown reward {name!r}; allowed: {', '.join(REWARD_NAMES)}")
    if not isinstance(paper_opponent_illegal, bool):
        raise ValueError(
            "paper_opponent_illegal must be a bool, got "
            f"{paper_opponent_illegal!r}; allowed: True, False")
    games.validated_float32("beta", beta, (), "a finite number")
    games.validated_float32("xi", xi, (), "a finite number")
    opponent_illegal_value = (
        _PAPER_OPPONENT_ILLEGAL.get(name, USE_LAST_LEGAL_MOVE)
        if paper_opponent_illegal else USE_LAST_LEGAL_MOVE)
    return _make_spec(_named_weights(name, float(xi), float(beta)), xi,
                      illegal_penalty, opponent_illegal_value)


def mixture(weights, *, xi: float = TRAINING_XI,
            illegal_penalty: float = ILLEGAL_PENALTY) -> RewardSpec:
    """A weighted mixture of the components (``COMPONENT_NAMES``).

    When an LLM opponent is illegal, a mixture uses O's last legal move.

    Args:
        weights: finite numbers, the weights of ``COMPONENT_NAMES``; three
            numbers weigh only the paper's (game, deont, util).
        xi: deontological penalty size.
        illegal_penalty: M's reward for an illegal output.

    Returns:
        The reward as a ``RewardSpec``.

    Raises:
        ValueError: for weights of another shape or non-finite values.
    """
    num_paper = len(PAPER_COMPONENT_NAMES)
    if np.shape(weights) == (num_paper,):
        paper = games.validated_float32(
            "weights", weights, (num_paper,), f"finite numbers, the weights of {COMPONENT_NAMES}")
        weights = jnp.concatenate([paper, jnp.zeros(NUM_COMPONENTS - num_paper, jnp.float32)])
    return _make_spec(weights, xi, illegal_penalty, USE_LAST_LEGAL_MOVE)


def stack_reward_specs(specs: Sequence[RewardSpec]) -> RewardSpec:
    """Stacks rewards along a new leading axis, for ``jax.vmap`` over rewards.

    Raises:
        ValueError: if ``specs`` is empty.
    """
    if len(specs) == 0:
        raise ValueError("specs must hold at least one RewardSpec, got none")
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *specs)


def reward_components(game: games.MatrixGame, a_m: jax.Array,
                      a_o: jax.Array, prev_o: jax.Array, xi: jax.Array
                      ) -> jax.Array:
    """The reward components of one legal decision (``COMPONENT_NAMES``).

    (p_m,  -xi * [a_m = D and prev_o = C],  p_m + p_o,  p_o,
     1 - |p_m - p_o| / (p_m + p_o),  |p_m - p_o| / (p_m + p_o),
     xi * [a_m = C],  xi * [a_m = D]), the equality terms taking 1 and 0
    when p_m + p_o = 0 (both players got the same: nothing).

    Args:
        game: an unbatched game.
        a_m: int scalar, M's action.
        a_o: int scalar, O's action.
        prev_o: int scalar, O's previous move (the state M saw).
        xi: float scalar, deontological penalty size.

    Returns:
        float32 [NUM_COMPONENTS] in ``COMPONENT_NAMES`` order.
    """
    chex.assert_rank([prev_o, xi], 0)
    p_m, p_o = games.payoffs_for(game, a_m, a_o)
    deont = _deontological_penalty(a_m, prev_o, xi)
    total = p_m + p_o
    nothing = total == 0
    # The safe denominator keeps the unused branch finite (no NaN in grads or where).
    inequality = jnp.where(nothing, 0.0, jnp.abs(p_m - p_o) / jnp.where(nothing, 1.0, total))
    xi = jnp.asarray(xi, jnp.float32)
    zero = jnp.float32(0.0)
    kindness = jnp.where(a_m == games.C, xi, zero)
    aggressiveness = jnp.where(a_m == games.D, xi, zero)
    return jnp.stack([p_m, deont, total, p_o, 1.0 - inequality, inequality,
                      kindness, aggressiveness]).astype(jnp.float32)


def moral_reward(spec: RewardSpec, game: games.MatrixGame, a_m: jax.Array,
                 a_o: jax.Array, prev_o: jax.Array, legal_m: jax.Array,
                 legal_o: jax.Array) -> jax.Array:
    """M's reward for one decision (Table 1 of the paper; SPEC.md section 5).

    R = illegal_penalty                        if M is illegal, else
        weights . components(a_m, a_o)         if O is legal, else
        opponent_illegal_value                 if that is finite, else
        weights . components(a_m, prev_o)      (O's last legal move).

    Args:
        spec: an unbatched reward.
        game: an unbatched game.
        a_m: int scalar, M's action (ignored when illegal).
        a_o: int scalar, O's action (ignored when illegal).
        prev_o: int scalar, O's previous move (the state M saw), which is
            also O's last legal move.
        legal_m: bool scalar.
        legal_o: bool scalar; always True for fixed opponents.

    Returns:
        float32 scalar.
    """
    chex.assert_shape(spec.weights, (NUM_COMPONENTS,))
    chex.assert_rank([spec.xi, spec.illegal_penalty,
                      spec.opponent_illegal_value, legal_m, legal_o], 0)
    # O's state only updates on legal moves, so prev_o is its last legal one.
    a_o_used = jnp.where(legal_o, a_o, prev_o)
    components = reward_components(game, a_m, a_o_used, prev_o, spec.xi)
    weighted = jnp.dot(spec.weights, components)
    fixed_value = spec.opponent_illegal_value
    opponent_illegal = jnp.where(jnp.isnan(fixed_value), weighted,
                                 fixed_value)
    legal_reward = jnp.where(legal_o, weighted, opponent_illegal)
    return jnp.where(legal_m, legal_reward,
                     spec.illegal_penalty).astype(jnp.float32)


def named_reward_specs(*, xi: float = TRAINING_XI, illegal_penalty: float = ILLEGAL_PENALTY,
                       paper_opponent_illegal: bool = True,
                       beta: float = VIRTUE_MIXED_BETA) -> RewardSpec:
    """Every named reward with one set of settings, stacked [R] in ``REWARD_NAMES`` order.

    What the metrics record next to the training reward: a run's named
    rewards use the run's xi, illegal penalty and beta (``reward_spec``).
    virtue_mixed divides kindness by xi; with xi = 0 (where kindness is 0
    too) its entry keeps only the equality term, beta * equality.
    """
    specs = []
    for name in REWARD_NAMES:
        if name == "virtue_mixed" and float(xi) == 0.0:
            weights = tuple(float(beta) if c == "equality" else 0.0 for c in COMPONENT_NAMES)
            specs.append(_make_spec(weights, xi, illegal_penalty, USE_LAST_LEGAL_MOVE))
        else:
            specs.append(reward_spec(name, xi=xi, illegal_penalty=illegal_penalty,
                                     paper_opponent_illegal=paper_opponent_illegal, beta=beta))
    return stack_reward_specs(specs)


def rewards_of_specs(specs: RewardSpec, game: games.MatrixGame, a_m: jax.Array, a_o: jax.Array,
                     prev_o: jax.Array, legal_m: jax.Array, legal_o: jax.Array) -> dict[str, jax.Array]:
    """Every named reward of one decision from ``named_reward_specs`` [R] (data or constants).

    Returns:
        {name: float32 scalar} for each name in ``REWARD_NAMES``.
    """
    chex.assert_axis_dimension(specs.weights, 0, len(REWARD_NAMES))
    return {
        name: moral_reward(jax.tree.map(lambda x, r=r: x[r], specs), game, a_m, a_o, prev_o, legal_m, legal_o)
        for r, name in enumerate(REWARD_NAMES)
    }


def all_rewards(game: games.MatrixGame, a_m: jax.Array, a_o: jax.Array,
                prev_o: jax.Array, legal_m: jax.Array, legal_o: jax.Array,
                *, xi: float = TRAINING_XI,
                illegal_penalty: float = ILLEGAL_PENALTY,
                paper_opponent_illegal: bool = True,
                beta: float = VIRTUE_MIXED_BETA) -> dict[str, jax.Array]:
    """Every named reward of one decision, with host-constant settings.

    Args:
        game, a_m, a_o, prev_o, legal_m, legal_o: as for ``moral_reward``.
        xi, illegal_penalty, paper_opponent_illegal, beta: host constants,
            as for ``reward_spec``.

    Returns:
        {name: float32 scalar} for each name in ``REWARD_NAMES``.
    """
    specs = named_reward_specs(xi=xi, illegal_penalty=illegal_penalty,
                               paper_opponent_illegal=paper_opponent_illegal, beta=beta)
    return rewards_of_specs(specs, game, a_m, a_o, prev_o, legal_m, legal_o)


def decision_metrics(game: games.MatrixGame, action: jax.Array, a_o: jax.Array,
                     prev_o: jax.Array, legal_o: jax.Array, named_specs: RewardSpec,
                     *, xi_eval: float = EVALUATION_XI) -> dict[str, jax.Array]:
    """What is recorded of one decision: named rewards, regrets, action type.

    Shared by training and evaluation (rl/rollout.py ``decision_step``).

    Args:
        game: an unbatched game (M's side).
        action: int scalar, M's parsed action (0 = C, 1 = D, -1 = illegal).
        a_o: int scalar, O's move.
        prev_o: int scalar, O's previous move (the state M saw).
        legal_o: bool scalar; always True for fixed opponents.
        named_specs: ``named_reward_specs`` [R]: the settings (xi, illegal
            penalty, beta) of the named rewards.
        xi_eval: deontological penalty of the regret.

    Returns:
        {named_rewards: {reward_<name>: scalar for every name in
        REWARD_NAMES}, regret_deont, regret_util, action_type}.
    """
    legal = action >= 0
    a_m = jnp.maximum(action, 0)  # Any move; unused when illegal.
    named = rewards_of_specs(named_specs, game, a_m, a_o, prev_o, legal, legal_o)
    return dict(
        named_rewards={f"reward_{name}": value for name, value in named.items()},
        regret_deont=deontological_regret(a_m, prev_o, legal, xi_eval),
        regret_util=utilitarian_regret(game, a_m, a_o, legal),
        action_type=games.action_type(a_m, legal, prev_o),
    )


def deontological_regret(a_m: jax.Array, prev_o: jax.Array,
                         legal_m: jax.Array, xi_eval: float = EVALUATION_XI,
                         illegal_penalty: float = ILLEGAL_PENALTY
                         ) -> jax.Array:
    """Deontological regret = 0 - R_De (SPEC.md section 8).

    xi_eval if M defected against a cooperator (4 with the authors'
    evaluation default), -illegal_penalty (6) if M was illegal, else 0.

    Args:
        a_m: int scalar, M's action (ignored when illegal).
        prev_o: int scalar, O's previous move (the state M saw).
        legal_m: bool scalar.
        xi_eval: deontological penalty size at evaluation.
        illegal_penalty: R_De of an illegal output.

    Returns:
        float32 scalar in [0, max(xi_eval, -illegal_penalty)].
    """
    chex.assert_rank([a_m, prev_o, legal_m], 0)
    r_deont = jnp.where(legal_m, _deontological_penalty(a_m, prev_o, xi_eval),
                        jnp.float32(illegal_penalty))
    return (0.0 - r_deont).astype(jnp.float32)


def utilitarian_regret(game: games.MatrixGame, a_m: jax.Array,
                       a_o: jax.Array, legal_m: jax.Array,
                       illegal_penalty: float = ILLEGAL_PENALTY
                       ) -> jax.Array:
    """Normalised utilitarian regret (SPEC.md section 8).

    (U_max - R_Ut) / (U_max - illegal_penalty), with R_Ut = p_m + p_o, or
    illegal_penalty if M was illegal; i.e. (U_max - R_Ut) / (U_max + 6) in
    paper mode, in [0, 1] and 1 when illegal.

    Args:
        game: an unbatched game.
        a_m: int scalar, M's action (ignored when illegal).
        a_o: int scalar, O's action.
        legal_m: bool scalar.
        illegal_penalty: R_Ut of an illegal output.

    Returns:
        float32 scalar.
    """
    chex.assert_rank(legal_m, 0)
    p_m, p_o = games.payoffs_for(game, a_m, a_o)
    r_util = jnp.where(legal_m, p_m + p_o, jnp.float32(illegal_penalty))
    u_max = games.utilitarian_max(game)
    return ((u_max - r_util) / (u_max - illegal_penalty)).astype(jnp.float32)
