"""Partner selection in a population (issue 13; docs/POPULATIONS.md, SPEC 10).

With `population.matching = "selection"`, every episode starts with a
selection step for every member (the selector):

    k candidates drawn at random among the other members
    -> the selection prompt names them, each with its last move
    -> the selector answers a name (sampled like an action, gen_len tokens)
    -> parsed in jit by the action matcher built over the members' names;
       a name that is not one of the k shown is illegal
    -> pairs are formed (`resolve_pairs`), then the game is played as with
       random matching.

The prompt table holds one row per (ordered candidates, their last moves):
row = candidate_index * 3^k + move_index, where candidate_index reads the k
member numbers as digits in base `size` and move_index the k move codes (0 no
legal move yet, 1 the C string, 2 the D string) in base 3. Rows with a
repeated member are rendered but never shown.

A member's last move is its parsed answer in the last decision of its last
episode (chunk_lib.LearnerState.last_move): C, D, or none (illegal, or before
its first episode).

Axis letters (docs/ARCHITECTURE.md): populations and their members are written
out (`size` members per population); k candidates shown to each selector.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from moraljax import action_matcher
from moraljax import prompt_tables

# Move codes of the selection prompt, from a parsed move (-1 none, 0 C, 1 D) + 1.
NUM_MOVE_CODES = 3


def member_names(prefix: str, size: int) -> tuple[str, ...]:
    """The names of a population's members in the selection prompt: prefix + member number."""
    return tuple(f"{prefix}{member}" for member in range(size))


def render_selection_prompt(candidates: Sequence[tuple[str, int]], actions: Sequence[str]) -> str:
    """The selection prompt's user text (docs/POPULATIONS.md gives it verbatim).

    Args:
        candidates: (name, move code) of each shown candidate, in the order shown.
        actions: the game's (C string, D string), as in its prompts.

    Returns:
        The text.
    """
    moves = ("no valid move yet", f"last played {actions[0]}", f"last played {actions[1]}")
    lines = "".join(f"{name}: {moves[code]}\n" for name, code in candidates)
    return f"Choose who you play the next game with. Available players:\n{lines}Answer with one player's name only."


def selection_texts(names: Sequence[str], num_candidates: int, actions: Sequence[str]) -> list[str]:
    """Every selection prompt, in row order (see the module docstring)."""
    texts = []
    for members in itertools.product(range(len(names)), repeat=num_candidates):
        for codes in itertools.product(range(NUM_MOVE_CODES), repeat=num_candidates):
            texts.append(render_selection_prompt([(names[m], c) for m, c in zip(members, codes)], actions))
    return texts


def selection_row(candidates: jax.Array, last_moves: jax.Array, size: int) -> jax.Array:
    """Row of the selection table: int32 [...] from [..., k] local member numbers and parsed moves (-1/0/1)."""
    num_candidates = candidates.shape[-1]
    member_weights = size ** jnp.arange(num_candidates - 1, -1, -1)
    move_weights = NUM_MOVE_CODES ** jnp.arange(num_candidates - 1, -1, -1)
    member_index = jnp.sum(candidates * member_weights, axis=-1)
    move_index = jnp.sum((last_moves + 1) * move_weights, axis=-1)
    return (member_index * NUM_MOVE_CODES ** num_candidates + move_index).astype(jnp.int32)


def draw_candidates(key: jax.Array, member: jax.Array, size: int, num_candidates: int) -> jax.Array:
    """k distinct other members (local numbers), uniformly at random, in random order.

    Args:
        key: one PRNG key.
        member: int32, the selector's local number.
        size: static, members per population.
        num_candidates: static k <= size - 1.

    Returns:
        int32 [k].
    """
    others = jax.random.permutation(key, size - 1)[:num_candidates]
    return (others + (others >= member)).astype(jnp.int32)


def resolve_pairs(order: jax.Array, choice: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pairs one population's members from their choices (the collision rule).

    Members take turns in `order` (a fresh random permutation each episode).
    A member still unpaired at its turn whose choice is legal and still
    unpaired is paired with it and plays as player 0 (M), its choice as
    player 1. Members left unpaired after all turns (their choice was illegal
    or already taken, and nobody took them) are paired with each other in
    `order`: the 1st with the 2nd left, the 3rd with the 4th, ..., the
    earlier one as player 0.

    Args:
        order: int32 [size] a permutation of the local member numbers.
        choice: int32 [size] each member's legal choice (local number), -1 if illegal.

    Returns:
        (partner int32 [size] local numbers, player int32 [size] 0/1, honoured
        bool [size]: the member plays the partner it chose).
    """
    size = order.shape[0]

    def turn(t, carry):
        partner, player = carry
        member = order[t]
        wanted = choice[member]
        free = (partner[member] < 0) & (wanted >= 0) & (partner[jnp.maximum(wanted, 0)] < 0)
        target = jnp.where(free, wanted, size)  # Index `size` is out of bounds: dropped.
        partner = partner.at[jnp.where(free, member, size)].set(wanted, mode="drop")
        partner = partner.at[target].set(member, mode="drop")
        player = player.at[target].set(1, mode="drop")
        return partner, player

    empty = jnp.full((size,), -1, jnp.int32)
    partner, player = jax.lax.fori_loop(0, size, turn, (empty, jnp.zeros((size,), jnp.int32)))
    paired = partner >= 0
    # The unpaired, in turn order, come first (their number is even: the size is even).
    rest = order[jnp.argsort(paired[order], stable=True)]
    slots = jnp.arange(size)
    rest_partner = jnp.zeros_like(partner).at[rest].set(rest[slots ^ 1])
    rest_player = jnp.zeros_like(player).at[rest].set(slots % 2)
    honoured = paired & (partner == choice)
    return (jnp.where(paired, partner, rest_partner).astype(jnp.int32),
            jnp.where(paired, player, rest_player).astype(jnp.int32), honoured)


def build_selection_table(tokenizer, names: Sequence[str], num_candidates: int, actions: Sequence[str],
                          gen_len: int) -> tuple[prompt_tables.PromptTable, action_matcher.ActionMatcher]:
    """The selection prompts [(3P)^k, T] and the matcher that parses an answer into a member number.

    Raises:
        ValueError: one line, when a name does not fit in gen_len tokens.
    """
    longest = action_matcher.action_token_length(tokenizer, names)
    if longest > gen_len:
        raise ValueError(
            f"population.name_prefix={names[0][:-1]!r} is not allowed; expected names"
            f" ({names[0]} .. {names[-1]}) of at most {gen_len} tokens (the answer length), got {longest}")
    table = prompt_tables.tokenize_prompts(tokenizer, selection_texts(names, num_candidates, actions))
    return table, action_matcher.build_action_matcher(tokenizer, names, gen_len)

