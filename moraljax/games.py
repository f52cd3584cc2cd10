"""Two-player 2x2 matrix games, their registry and the memory-1 game state.

The agent M is the row player, the opponent O the column player. Action
index 0 is C (cooperate), 1 is D (defect); SPEC.md section 1.

A game's payoffs are data, not static configuration: ``MatrixGame`` is a
pytree holding one float32 array ``payoffs[a_m, a_o] = (p_m, p_o)``, so one
compiled program serves every game and ``jax.vmap`` can run several games at
once (``stack_games`` builds the leading game axis).

Every function here is written for a single (unbatched) decision and traces
under ``jax.jit`` and ``jax.vmap``; batch at the call site.

Axis legend: ``payoffs`` is [A_m, A_o, P] with A_m = M's action (2),
A_o = O's action (2) and P = whose payoff (0 = M, 1 = O).
"""

from collections.abc import Mapping, Sequence
import types

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

C = 0
D = 1
ACTION_NAMES = ("C", "D")
NUM_ACTIONS = 2

PAYOFF_SHAPE = (NUM_ACTIONS, NUM_ACTIONS, 2)


@flax.struct.dataclass
class MatrixGame:
    """A 2x2 two-player game as data.

    Attributes:
        payoffs: float32 [2, 2, 2] (or [G, 2, 2, 2] after ``stack_games``);
            ``payoffs[a_m, a_o] = (p_m, p_o)``, M the row player, O the
            column player.
    """

    payoffs: jax.Array


@flax.struct.dataclass
class GameState:
    """Memory-1 state: both players' previous moves (SPEC.md section 2).

    Attributes:
        prev_m: int32 scalar, M's previous move (0 = C, 1 = D). It is M's
            last LEGAL move, since illegal outputs do not update it.
        prev_o: int32 scalar, O's previous move (O's last legal move).
    """

    prev_m: jax.Array
    prev_o: jax.Array


def validated_float32(field: str, value, shape: tuple[int, ...],
                      allowed: str) -> jax.Array:
    """Checks host real numbers of an exact shape; returns them as float32.

    Shared by the constructors of games and rewards: nothing is silently
    coerced (bools, strings and wrong shapes are refused) and values that
    are not finite in float32 are refused after the cast.

    Args:
        field: the name used in error messages.
        value: array-like, concrete (not traced).
        shape: the required shape.
        allowed: description of allowed values for error messages.

    Returns:
        float32 array of ``shape``.

    Raises:
        ValueError: naming ``field``, the bad value and ``allowed``.
    """
    array = np.asarray(value)
    is_real = (np.issubdtype(array.dtype, np.integer)
               or np.issubdtype(array.dtype, np.floating))
    if array.dtype == np.bool_ or not is_real:
        raise ValueError(
            f"{field} must be real numbers, got {value!r} (dtype "
            f"{array.dtype}); allowed: {allowed}")
    if array.shape != shape:
        raise ValueError(
            f"{field} must have shape {shape}, got shape {array.shape}; "
            f"allowed: {allowed}")
    # Cast first so a float64 too large for float32 is caught as inf too;
    # the overflow is reported by the error below, not as a warning.
    with np.errstate(over="ignore"):
        array = array.astype(np.float32)
    if not np.all(np.isfinite(array)):
        raise ValueError(
            f"{field} must be finite, got {array.tolist()}; allowed: "
            f"{allowed}")
    return jnp.asarray(array)


def make_game(payoffs) -> MatrixGame:
    """Builds a validated ``MatrixGame`` from host data.

    Args:
        payoffs: array-like of real numbers, shape exactly (2, 2, 2), with
            ``payoffs[a_m][a_o] = (p_m, p_o)``. Must be concrete (not traced).

    Returns:
        The game with float32 payoffs.

    Raises:
        ValueError: if payoffs is not numeric, has another shape, or holds a
            value that is not finite in float32.
    """
    return MatrixGame(payoffs=validated_float32(
        "payoffs", payoffs, PAYOFF_SHAPE,
        "finite numbers of shape (2, 2, 2) with payoffs[a_m][a_o] = "
        "(p_m, p_o)"))


# SPEC.md section 1, cells in the order (C,C), (C,D), (D,C), (D,D).
_PAPER_GAMES = {
    "IPD": [[(3, 3), (0, 4)], [(4, 0), (1, 1)]],  # prisoner's dilemma
    "ISH": [[(4, 4), (0, 3)], [(3, 0), (1, 1)]],  # stag hunt
    "ICN": [[(2, 2), (1, 4)], [(4, 1), (0, 0)]],  # chicken
    "BOS": [[(3, 2), (0, 0)], [(0, 0), (2, 3)]],  # bach or stravinsky
    "ICD": [[(1, 1), (0, 0)], [(0, 0), (4, 4)]],  # defective coordination
    "IVD": [[(3, 3), (1, 4)], [(4, 1), (0, 0)]],  # defined, not evaluated
}

# The paper's games, in SPEC.md order. Games added by ``register_game`` are
# found through ``GAMES`` / ``get_game`` but do not change this tuple.
GAME_NAMES = tuple(_PAPER_GAMES)
# The five games of the generalisation test (SPEC.md section 8).
EVALUATION_GAME_NAMES = ("IPD", "ISH", "ICN", "BOS", "ICD")

_registry: dict[str, MatrixGame] = {
    name: make_game(table) for name, table in _PAPER_GAMES.items()}
# Read-only view: games are added through ``register_game`` so that they are
# validated.
GAMES: Mapping[str, MatrixGame] = types.MappingProxyType(_registry)


def get_game(name: str) -> MatrixGame:
    """Returns the registered game called ``name``.

    Args:
        name: a key of ``GAMES``: the paper's IPD, ISH, ICN, BOS, ICD, IVD,
            or a game added with ``register_game``.

    Returns:
        The game.

    Raises:
        ValueError: if no game of that name is registered.
    """
    if not isinstance(name, str) or name not in _registry:
        raise ValueError(
            f"unknown game {name!r}; allowed: {', '.join(_registry)}")
    return _registry[name]


def register_game(name: str, payoffs, *, overwrite: bool = False
                  ) -> MatrixGame:
    """Validates a user-defined game and adds it to ``GAMES``.

    Args:
        name: non-empty name for the game.
        payoffs: see ``make_game``.
        overwrite: allow replacing an earlier user game of the same name. The
            paper's games can never be replaced: paper mode depends on them.

    Returns:
        The registered game.

    Raises:
        ValueError: for an empty or non-string name, a name already taken,
            or invalid payoffs.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"game name must be a non-empty string, got {name!r}")
    if name in _PAPER_GAMES:
        raise ValueError(
            f"game name {name!r} is one of the paper's games and cannot be "
            f"replaced; allowed: a name other than {', '.join(_PAPER_GAMES)}")
    if name in _registry and not overwrite:
        raise ValueError(
            f"game name {name!r} is already registered; allowed: a new "
            "name, or overwrite=True")
    game = make_game(payoffs)
    _registry[name] = game
    return game


def stack_games(games: Sequence[MatrixGame]) -> MatrixGame:
    """Stacks games along a new leading axis, for ``jax.vmap`` over games.

    Args:
        games: one or more unbatched games.

    Returns:
        A ``MatrixGame`` with payoffs [G, 2, 2, 2].

    Raises:
        ValueError: if ``games`` is empty.
    """
    if len(games) == 0:
        raise ValueError("games must hold at least one MatrixGame, got none")
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *games)


def payoffs_for(game: MatrixGame, a_m: jax.Array, a_o: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
    """Looks up the payoffs of one joint action.

    Args:
        game: an unbatched game.
        a_m: int scalar, M's action (0 = C, 1 = D).
        a_o: int scalar, O's action. Out-of-range indices clamp, as jnp
            indexing does; callers pass parsed actions only.

    Returns:
        (p_m, p_o): float32 scalars ``payoffs[a_m, a_o, 0]`` and
        ``payoffs[a_m, a_o, 1]``.
    """
    chex.assert_shape(game.payoffs, PAYOFF_SHAPE)
    chex.assert_rank([a_m, a_o], 0)
    cell = game.payoffs[a_m, a_o]
    return cell[0], cell[1]


def utilitarian_max(game: MatrixGame) -> jax.Array:
    """Best collective payoff, U_max = max over cells of (p_m + p_o).

    Used by the utilitarian regret (SPEC.md section 8): IPD 6, ISH 8, ICN 5,
    BOS 5, ICD 8 (IVD 6).

    Args:
        game: an unbatched game.

    Returns:
        float32 scalar.
    """
    chex.assert_shape(game.payoffs, PAYOFF_SHAPE)
    return jnp.max(jnp.sum(game.payoffs, axis=-1))


def opponent_view(game: MatrixGame) -> MatrixGame:
    """The same game as seen by O, who becomes the row player.

    An LLM opponent sees the prompt from its own side and is trained on its
    own payoffs (SPEC.md section 3):
    ``opponent_view(game).payoffs[a_o, a_m] = (p_o, p_m)``.

    Args:
        game: an unbatched game.

    Returns:
        The game with players swapped.
    """
    chex.assert_shape(game.payoffs, PAYOFF_SHAPE)
    return MatrixGame(payoffs=jnp.flip(jnp.swapaxes(game.payoffs, 0, 1), -1))


def swap_players(state: GameState) -> GameState:
    """The state as seen by O: its own previous move becomes ``prev_m``."""
    return GameState(prev_m=state.prev_o, prev_o=state.prev_m)


def step(state: GameState, a_m: jax.Array, a_o: jax.Array,
         legal_m: jax.Array, legal_o: jax.Array) -> GameState:
    """Updates the memory-1 state after one decision (SPEC.md section 2).

    prev_m' = a_m if legal_m else prev_m;  prev_o' = a_o if legal_o else
    prev_o. Fixed opponents always pass ``legal_o=True``; an LLM opponent's
    previous move updates only when its output was legal, like M's.

    Args:
        state: the state M saw for this decision.
        a_m: int scalar, M's parsed action (ignored when illegal).
        a_o: int scalar, O's action (ignored when illegal).
        legal_m: bool scalar, whether M's output parsed to an action.
        legal_o: bool scalar, whether O's output parsed to an action.

    Returns:
        The next state, int32 scalars.
    """
    chex.assert_rank([a_m, a_o, legal_m, legal_o], 0)
    return GameState(
        prev_m=jnp.where(legal_m, a_m, state.prev_m).astype(jnp.int32),
        prev_o=jnp.where(legal_o, a_o, state.prev_o).astype(jnp.int32))


# Action type of one decision for the training metrics (SPEC.md section 8):
# "M's action | O's previous move", the latter being the state M saw.
ACTION_TYPE_NAMES = ("C|C", "C|D", "D|C", "D|D", "illegal|C", "illegal|D")


def action_type(a_m: jax.Array, legal_m: jax.Array, prev_o: jax.Array
                ) -> jax.Array:
    """Index into ``ACTION_TYPE_NAMES`` of one decision.

    type = 2 * a_m + prev_o if legal_m, else 4 + prev_o.

    Args:
        a_m: int scalar, M's parsed action (ignored when illegal).
        legal_m: bool scalar.
        prev_o: int scalar, O's previous move in the state M saw.

    Returns:
        int32 scalar in [0, 6).
    """
    chex.assert_rank([a_m, legal_m, prev_o], 0)
    a_m = jnp.asarray(a_m, jnp.int32)
    prev_o = jnp.asarray(prev_o, jnp.int32)
    legal_type = NUM_ACTIONS * a_m + prev_o
    illegal_type = NUM_ACTIONS * NUM_ACTIONS + prev_o
    return jnp.where(legal_m, legal_type, illegal_type).astype(jnp.int32)
