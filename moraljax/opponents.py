"""Fixed opponents (TFT, AC, AD, Random) as pure functions of state and key.

SPEC.md section 3: TFT plays M's previous move (the state, so also the
random initial one); AC always cooperates; AD always defects; Random plays C
or D uniformly. The fifth opponent, "llm", is a second learner whose moves
come from the policy (rl/rollout.py), not from this module.

An opponent is an int32 id, i.e. data: one compiled program serves every
opponent and ``jax.vmap`` can run several at once. Functions are unbatched;
vmap at the call site.

Randomness (one key per call, split by name where more than one draw):
- ``initial_state``: ``key_prev_m`` draws M's previous move, ``key_prev_o``
  O's. Both draws happen for every opponent, so for a given key every
  opponent starts from the same M move.
- ``fixed_opponent_move``: the whole key goes to Random's single draw; the
  other opponents ignore it.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from moraljax import games

OPPONENT_NAMES = ("tft", "ac", "ad", "random", "llm")
TFT, AC, AD, RANDOM, LLM = range(len(OPPONENT_NAMES))
FIXED_OPPONENT_NAMES = OPPONENT_NAMES[:LLM]


def opponent_id(name: str) -> int:
    """Maps an opponent name to its integer id (its index in OPPONENT_NAMES).

    Args:
        name: one of ``OPPONENT_NAMES``.

    Returns:
        The id.

    Raises:
        ValueError: for an unknown name.
    """
    if not isinstance(name, str) or name not in OPPONENT_NAMES:
        raise ValueError(
            f"unknown opponent {name!r}; allowed: {', '.join(OPPONENT_NAMES)}")
    return OPPONENT_NAMES.index(name)


def _check_opponent(opponent) -> None:
    """Rejects a concrete Python id out of range (traced ids cannot be)."""
    is_host_int = isinstance(opponent, (int, np.integer))
    if is_host_int and not 0 <= opponent < len(OPPONENT_NAMES):
        raise ValueError(
            f"opponent id must be in [0, {len(OPPONENT_NAMES)}) "
            f"({', '.join(OPPONENT_NAMES)}), got {opponent}")
    chex.assert_rank(opponent, 0)


def _uniform_move(key: jax.Array) -> jax.Array:
    return jax.random.randint(key, (), 0, games.NUM_ACTIONS, dtype=jnp.int32)


# One branch per id, in OPPONENT_NAMES order; each maps (M's previous move,
# key) to O's move. Module-level functions (not closures) so the switch has
# the same jaxpr on every call and compiles once even outside jit.
def _tit_for_tat(prev_m: jax.Array, key: jax.Array) -> jax.Array:
    del key  # Deterministic.
    return jnp.asarray(prev_m, jnp.int32)


def _always_cooperate(prev_m: jax.Array, key: jax.Array) -> jax.Array:
    del prev_m, key  # Constant.
    return jnp.int32(games.C)


def _always_defect(prev_m: jax.Array, key: jax.Array) -> jax.Array:
    del prev_m, key  # Constant.
    return jnp.int32(games.D)


def _random(prev_m: jax.Array, key: jax.Array) -> jax.Array:
    del prev_m  # Ignores the state.
    return _uniform_move(key)


def _llm_placeholder(prev_m: jax.Array, key: jax.Array) -> jax.Array:
    del prev_m, key  # The rollout replaces this with the learner's move.
    return jnp.int32(games.C)


_MOVE_BRANCHES = (_tit_for_tat, _always_cooperate, _always_defect, _random,
                  _llm_placeholder)


def fixed_opponent_move(opponent: jax.Array, state: games.GameState,
                        key: jax.Array) -> jax.Array:
    """The move of a fixed opponent for the state M sees.

    tft: state.prev_m (M's last legal move); ac: C; ad: D; random: uniform
    over {C, D} from ``key``. For ``LLM`` the move comes from the second
    learner, not from here: this returns C as a defined placeholder, which
    the rollout replaces (``jnp.where(opponent == LLM, llm_move, move)``).

    Args:
        opponent: int scalar id (``opponent_id``). A traced id outside
            [0, 5) is clamped by ``lax.switch``; a Python int is checked.
        state: the current state (M's view).
        key: PRNG key, consumed by Random only.

    Returns:
        int32 scalar move, 0 = C, 1 = D.

    Raises:
        ValueError: for a concrete Python id out of range.
    """
    _check_opponent(opponent)
    return jax.lax.switch(opponent, _MOVE_BRANCHES,
                          jnp.asarray(state.prev_m, jnp.int32), key)


def initial_state(opponent: jax.Array, key: jax.Array) -> games.GameState:
    """The random state at the start of an episode (SPEC.md section 2).

    Both previous moves are uniform over {C, D}, except O's, which is C for
    AC and D for AD (a constant opponent's history is its constant move).
    For an LLM opponent both are uniform.

    Args:
        opponent: int scalar id (``opponent_id``).
        key: PRNG key, split into ``key_prev_m`` and ``key_prev_o``.

    Returns:
        The state, int32 scalars.

    Raises:
        ValueError: for a concrete Python id out of range.
    """
    _check_opponent(opponent)
    key_prev_m, key_prev_o = jax.random.split(key)
    prev_m = _uniform_move(key_prev_m)
    prev_o = _uniform_move(key_prev_o)
    prev_o = jnp.where(opponent == AC, games.C, prev_o)
    prev_o = jnp.where(opponent == AD, games.D, prev_o)
    return games.GameState(prev_m=prev_m, prev_o=prev_o.astype(jnp.int32))
