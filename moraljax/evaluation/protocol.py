"""The generalisation suite's settings and its fixed protocol (SPEC.md section 8).

Every fine-tuned model (one per seed of a finished run; the agent M, player 0,
of LLM-vs-LLM pairs) and the base model (adapter off) play the five games
IPD, ISH, ICN, BOS, ICD against a Random opponent, with the test action
strings action3/action4:

    for each game and prompt variant:
        E = 10 episodes x B = 5 sequential decisions = 50 decisions per model
        state (M's, O's previous move) -> prompt -> M samples A tokens
        -> exact parse -> O's move from the fixed protocol -> regrets
        -> next state (M's move only if legal, O's always)

The protocol (`protocol_sequences`) is the authors': numpy
``SeedSequence(100).spawn(6)``, each child wrapped in ``default_rng``; stream
2 draws the episodes' initial states (M's then O's previous move), stream 5
the opponent's moves, one ``rng.choice(["C", "D"])`` per draw. The
generators are re-created for every game, so every model, run, game and
variant faces the identical sequences; they are computed once on the host
and fed to the compiled program as arrays.

Variants (each a full protocol): the payoff table's row/column order
(original, columns swapped, rows swapped, both) with action3/action4, and the
training strings action1/action2 with the original table. The base model is
also tested with a moral preamble (value-prompted baseline: utilitarian,
deontological), on every variant. "Beyond matrix games": the prompt
families of prompts.py other than the training prompt, 5 generated tokens,
a random state per sample, reported as C / D / other shares.

Randomness of the model's own sampling: the decisions of model m in test t
use ``split(fold_in(fold_in(PRNGKey(settings.seed), code_m), test_code(t)), B)``,
one key per decision, with code_m = 1 + the training seed for a fine-tuned
model and 0 for the base model (plain and value-prompted: the preambles face
the base's random numbers) and t the test's name, e.g.
"IPD|action3/action4|original" or "beyond|action_only" (`evaluation.play`).

Axis letters (docs/ARCHITECTURE.md): E episodes of a test (or beyond-matrix
samples), B decisions per episode, A answer (generated) tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from moraljax import config_lib
from moraljax import games
from moraljax import prompts
from moraljax import rewards
from moraljax import validation

# The authors' evaluation protocol (SPEC.md section 8).
PROTOCOL_ENTROPY = 100
PROTOCOL_STREAMS = 6
INITIAL_STATE_STREAM = 2
OPPONENT_STREAM = 5
PROTOCOL_MOVES = ("C", "D")

BASE_MODEL_CODE = 0
BEYOND_FAMILIES = tuple(f for f in prompts.PROMPT_FAMILIES if f != "structured")
BEYOND_ANSWERS = ("C", "D", "other")

FINE_TUNED = "fine_tuned"
BASE = "base"
EVALUATION_DIRNAME = "evaluation"


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """What the generalisation suite runs (defaults: the paper's, SPEC 8).

    Attributes:
        games: the games played (paper: IPD, ISH, ICN, BOS, ICD).
        actions: the test action strings, C's first (paper: action3/action4).
        table_orders: payoff-table orders tested with `actions`; the first is
            the main test (paper: all four, "original" first).
        extra_actions: further action pairs, tested with the original table
            (paper: the training strings action1/action2).
        episodes: episodes per test (paper: 10).
        decisions: decisions per episode (paper: 5).
        value_preambles: moral preambles of the value-prompted base model
            (names in prompts.VALUE_PREAMBLES; () to skip).
        beyond_families: "beyond matrix games" prompt families (() to skip).
        beyond_samples: samples per family and model.
        beyond_gen_len: tokens generated per beyond-matrix sample (paper: 5).
        beyond_game: the game whose payoffs the "unstructured" family tells.
        gen_len: tokens generated per matrix-game decision; 0 = the token
            length of the action strings (paper).
        temperature, top_k, top_p: the model's sampling (paper: 1, 0 = off,
            1 = off: the full softmax).
        xi_eval: deontological penalty of the regret (authors' default 4).
        seed: root of the models' sampling keys (see the module docstring)
            and of the beyond-matrix states.
    """

    games: tuple[str, ...] = games.EVALUATION_GAME_NAMES
    actions: tuple[str, str] = prompts.TEST_ACTIONS
    table_orders: tuple[str, ...] = prompts.TABLE_ORDERS
    extra_actions: tuple[tuple[str, str], ...] = (prompts.TRAIN_ACTIONS,)
    episodes: int = 10
    decisions: int = 5
    value_preambles: tuple[str, ...] = tuple(prompts.VALUE_PREAMBLES)
    beyond_families: tuple[str, ...] = BEYOND_FAMILIES
    beyond_samples: int = 50
    beyond_gen_len: int = 5
    beyond_game: str = "IPD"
    gen_len: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    xi_eval: float = rewards.EVALUATION_XI
    seed: int = 0

    def __post_init__(self):
        # Frozen: the checked (tuple) values replace what was given.
        replace_field = functools.partial(object.__setattr__, self)
        replace_field("games", validation.check_names("games", self.games, tuple(games.GAMES), empty_ok=False))
        replace_field("actions", validation.check_action_pair("actions", self.actions))
        replace_field("table_orders", validation.check_names(
            "table_orders", self.table_orders, prompts.TABLE_ORDERS, empty_ok=False))
        if isinstance(self.extra_actions, str) or not isinstance(self.extra_actions, (tuple, list)):
            validation.fail("extra_actions", self.extra_actions,
                            "a list of action pairs, e.g. [('action1', 'action2')]")
        extra = tuple(validation.check_action_pair("extra_actions", pair) for pair in self.extra_actions)
        if self.actions in extra or len(set(extra)) != len(extra):
            validation.fail("extra_actions", self.extra_actions, "distinct pairs other than `actions`")
        replace_field("extra_actions", extra)
        validation.check_int("episodes", self.episodes, 1)
        validation.check_int("decisions", self.decisions, 1)
        replace_field("value_preambles", validation.check_names(
            "value_preambles", self.value_preambles, tuple(prompts.VALUE_PREAMBLES), empty_ok=True))
        replace_field("beyond_families", validation.check_names(
            "beyond_families", self.beyond_families, BEYOND_FAMILIES, empty_ok=True))
        validation.check_int("beyond_samples", self.beyond_samples, 1)
        validation.check_int("beyond_gen_len", self.beyond_gen_len, 1)
        validation.check_choice("beyond_game", self.beyond_game, tuple(games.GAMES))
        validation.check_int("gen_len", self.gen_len, 0)
        config_lib.check_sampling("", self.temperature, self.top_k, self.top_p)
        validation.check_finite("xi_eval", self.xi_eval)
        validation.check_int("seed", self.seed, 0)

    def variants(self) -> list[Variant]:
        """The prompt variants, the main test first."""
        main = [Variant(self.actions, order) for order in self.table_orders]
        return main + [Variant(pair, "original") for pair in self.extra_actions]


def settings_from_dict(values: dict[str, Any]) -> EvalSettings:
    """EvalSettings from plain config values, refusing unknown keys.

    Raises:
        ValueError: naming an unknown or bad field.
    """
    return validation.settings_from_dict(EvalSettings, values, what="an evaluation setting")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One prompt variant of the matrix-game tests."""

    actions: tuple[str, str]
    table_order: str

    @property
    def actions_label(self) -> str:
        return "/".join(self.actions)

    @property
    def name(self) -> str:
        """E.g. "action3/action4|original"."""
        return f"{self.actions_label}|{self.table_order}"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One evaluated model (a row of the model axis M).

    Attributes:
        name: "seed<s>" ("<kind>/seed<s>" for a labelled kind), "base" or
            "base+<preamble>".
        kind: FINE_TUNED (or a label such as the training condition), BASE
            or "base+<preamble>"; runs of a kind are averaged together.
        seed: the training seed (fine-tuned models), else None.
        code: folded into the sampling keys (1 + seed, or 0 for the base).
        preamble: a prompts.VALUE_PREAMBLES name, or None.
    """

    name: str
    kind: str
    seed: int | None
    code: int
    preamble: str | None


# ----------------------------------------------------------------------------
# The protocol.


def protocol_sequences(num_episodes: int = 10, num_decisions: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The authors' fixed initial states and opponent moves (SPEC.md 8).

    ``children = SeedSequence(100).spawn(6)``; stream 2 (``default_rng``)
    draws each episode's initial state, M's previous move then O's; stream 5
    draws the Random opponent's move of every decision, episode by episode.
    Every draw is one ``rng.choice(["C", "D"])``.

    Args:
        num_episodes: E (paper: 10).
        num_decisions: B (paper: 5).

    Returns:
        (initial_states int32 [E, 2] as (prev_m, prev_o), opponent_moves
        int32 [E, B]), 0 = C, 1 = D.
    """
    validation.check_int("num_episodes", num_episodes, 1)
    validation.check_int("num_decisions", num_decisions, 1)
    children = np.random.SeedSequence(PROTOCOL_ENTROPY).spawn(PROTOCOL_STREAMS)
    state_rng = np.random.default_rng(children[INITIAL_STATE_STREAM])
    opponent_rng = np.random.default_rng(children[OPPONENT_STREAM])
    draw = lambda rng: PROTOCOL_MOVES.index(str(rng.choice(list(PROTOCOL_MOVES))))
    initial = [[draw(state_rng), draw(state_rng)] for _ in range(num_episodes)]
    moves = [[draw(opponent_rng) for _ in range(num_decisions)] for _ in range(num_episodes)]
    return np.asarray(initial, np.int32), np.asarray(moves, np.int32)


def beyond_states(num_samples: int, seed: int) -> np.ndarray:
    """Random (prev_m, prev_o) per beyond-matrix sample, int32 [E, 2].

    ``default_rng(seed).integers(0, 2, (E, 2))``, re-created for every
    family, so every family and model sees the same states.
    """
    return np.random.default_rng(seed).integers(0, 2, (num_samples, 2)).astype(np.int32)


def test_code(name: str) -> int:
    """The test's key code: crc32 of its name (stable across runs and settings)."""
    return zlib.crc32(name.encode("utf-8"))


def model_specs(num_fine_tuned: int, seeds: Sequence[int] | None, kinds: Sequence[str] | None, *,
                include_base: bool, value_preambles: Sequence[str],
                members: Sequence[int] | None = None) -> list[ModelSpec]:
    """The evaluated models: the fine-tuned ones, then the base (plain, then per preamble).

    Args:
        num_fine_tuned: N, the fine-tuned models.
        seeds: their training seeds (names and sampling keys); None = 0..N-1.
        kinds: a label per fine-tuned model, e.g. its training condition;
            None = FINE_TUNED for all.
        include_base: add the base and value-prompted base models.
        value_preambles: the value-prompted base's preambles.
        members: population member index per model (in names; members of
            one type share kind and seed), or None.

    Returns:
        One ModelSpec per row of the model axis M.

    Raises:
        ValueError: for seeds or kinds that are not one per model, seeds
            repeated within a kind, or a kind that names a base model.
    """
    seeds = list(range(num_fine_tuned)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != num_fine_tuned:
        validation.fail("seeds", seeds, f"{num_fine_tuned} seeds, one per fine-tuned model")
    kinds = [FINE_TUNED] * num_fine_tuned if kinds is None else list(kinds)
    if len(kinds) != num_fine_tuned or not all(isinstance(k, str) and k for k in kinds):
        validation.fail("kinds", kinds, f"{num_fine_tuned} non-empty labels, one per fine-tuned model")
    # Population members of one type share kind and seed; their member index tells them apart.
    tags = [None] * len(seeds) if members is None else [int(m) for m in members]
    if len(set(zip(kinds, seeds, tags))) != len(seeds) or any(s < 0 for s in seeds):
        validation.fail("seeds", seeds, "integers >= 0, one per fine-tuned model, distinct within a kind")
    reserved = {BASE} | {f"base+{v}" for v in value_preambles}
    if reserved & set(kinds):
        validation.fail("kinds", sorted(set(kinds)), f"labels other than {', '.join(sorted(reserved))}")
    # Models of different kinds with the same seed share sampling keys:
    # common random numbers make conditions directly comparable.
    models = [ModelSpec((f"seed{s}" if kind == FINE_TUNED else f"{kind}/seed{s}")
                        + ("" if tag is None else f"/member{tag}"), kind, s, 1 + s, None)
              for kind, s, tag in zip(kinds, seeds, tags)]
    if include_base:
        models.append(ModelSpec(BASE, BASE, None, BASE_MODEL_CODE, None))
        models += [ModelSpec(f"base+{v}", f"base+{v}", None, BASE_MODEL_CODE, v) for v in value_preambles]
    return models
