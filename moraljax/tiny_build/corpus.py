"""What the tiny model is trained on: every prompt moraljax renders, and held-out recall questions.

``all_prompt_specs`` lists every distinct user text of every game, side,
action pair, table order, prompt family and value preamble;
``recall_prompt_specs`` the auxiliary questions about the previous moves;
``tokenizer_corpus`` the texts the tokenizer's merges are learnt from.
"""

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from moraljax import games
from moraljax import prompts

# Short answers of the kind chat models give when they ignore a format; they
# put tokens such as "I", "choose" and "**" into the vocabulary, which the
# base model's illegal answers use.
_CHATTY_ANSWERS = ("I choose {a}.", "I would choose {a}.", "choose {a}",
                   "**{a}**", "Action: {a}", "{a}")


def _pair_texts(actions: tuple[str, str]) -> list[str]:
    return [answer.format(a=action) for answer in _CHATTY_ANSWERS
            for action in actions]


def _payoff_tables() -> list[np.ndarray]:
    """Every distinct payoff table an agent sees: each game from both sides."""
    tables = []
    for name in games.GAME_NAMES:
        game = games.GAMES[name]
        for view in (game, games.opponent_view(game)):
            table = np.asarray(view.payoffs)
            if not any(np.array_equal(table, seen) for seen in tables):
                tables.append(table)
    return tables


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """One prompt the base model is trained on (a user text and its actions).

    Attributes:
        text: the user text (before the chat template).
        actions: (C string, D string) named in it.
        family: the prompt family (``prompts.PROMPT_FAMILIES``, or one of
            ``RECALL_QUESTIONS``).
        answer: None for a decision prompt (the answer distribution of the
            module docstring); for a recall prompt the index of the action
            whose string is the only correct answer.
    """

    text: str
    actions: tuple[str, str]
    family: str
    answer: int | None = None


def all_prompt_specs(
        *,
        action_pairs: Sequence[tuple[str, str]] = (prompts.TRAIN_ACTIONS,
                                                   prompts.TEST_ACTIONS),
        families: Sequence[str] = prompts.PROMPT_FAMILIES,
        preambles: Sequence[str | None] = (
            None, *prompts.VALUE_PREAMBLES.values()),
        payoff_tables: Sequence[np.ndarray] | None = None,
) -> list[PromptSpec]:
    """Every distinct prompt moraljax renders, without duplicates.

    Args:
        action_pairs: action-string pairs (C, D).
        families: prompt families; "structured" uses every table order.
        preambles: None (no preamble) and/or value preambles.
        payoff_tables: [2, 2, 2] tables; None means every game of
            ``games.GAME_NAMES`` from both players' sides.

    Returns:
        The prompts, in a fixed order (first occurrence of each text).
    """
    if payoff_tables is None:
        payoff_tables = _payoff_tables()
    specs, seen = [], set()
    for actions, family, preamble, payoffs in itertools.product(
            action_pairs, families, preambles, payoff_tables):
        orders = (prompts.TABLE_ORDERS if family == "structured" else
                  ("original",))
        for table_order in orders:
            for text in prompts.render_all(
                    payoffs, family=family, actions=actions,
                    table_order=table_order, preamble=preamble):
                if text not in seen:
                    seen.add(text)
                    specs.append(PromptSpec(text, tuple(actions), family))
    return specs


# Held-out questions about the state, asked in place of the decision
# question of the structured prompt. They are auxiliary training tasks only
# (no moraljax prompt family asks them): answering them forces the base to
# read "Last time, you played X and they played Y" and to keep the two
# action digits apart in its embeddings, which is what a LoRA adapter needs
# to learn state-dependent policies (see ``lora_probe``).
_DECISION_QUESTION = ("What action would you take in order to achieve the "
                      "highest possible score in points?")
# (prev_m, prev_o, first_option, first_answer) of each row of a prompt
# table: ``prompts.prompt_index`` counts them in this (binary) order.
INDEX_BITS = tuple(itertools.product((0, 1), repeat=4))
RECALL_QUESTIONS = {
    "recall_opponent": "Which action did A play last time?",
    "recall_self": "Which action did you play last time?",
}


def recall_prompt_specs(
        *,
        action_pairs: Sequence[tuple[str, str]] = (prompts.TRAIN_ACTIONS,
                                                   prompts.TEST_ACTIONS),
        payoff_tables: Sequence[np.ndarray] | None = None,
) -> list[PromptSpec]:
    """Structured prompts that ask for a previous move instead of a decision.

    Args:
        action_pairs: action-string pairs (C, D).
        payoff_tables: [2, 2, 2] tables; None means every game from both
            sides.

    Returns:
        One prompt per question, pair, table, table order and prompt index;
        ``answer`` is O's previous move for "recall_opponent" and M's for
        "recall_self".
    """
    if payoff_tables is None:
        payoff_tables = _payoff_tables()
    specs = []
    for family, question in RECALL_QUESTIONS.items():
        for actions, payoffs, table_order in itertools.product(
                action_pairs, payoff_tables, prompts.TABLE_ORDERS):
            texts = prompts.render_all_structured(
                payoffs, actions=actions, table_order=table_order)
            for (prev_m, prev_o, _, _), text in zip(INDEX_BITS, texts):
                if text.count(_DECISION_QUESTION) != 1:
                    raise ValueError(
                        "the structured prompt no longer holds the decision "
                        f"question {_DECISION_QUESTION!r}; update "
                        "recall_prompt_specs")
                specs.append(PromptSpec(
                    text.replace(_DECISION_QUESTION, question),
                    tuple(actions), family,
                    prev_o if family == "recall_opponent" else prev_m))
    return specs


def tokenizer_corpus(specs: Sequence[PromptSpec]) -> list[str]:
    """Texts the BPE merges are learnt from (special tokens left out).

    Each prompt appears as the chat template lays it out (its segments
    between special tokens), with one legal answer; a few chatty answers of
    each action pair follow.

    Args:
        specs: the prompts.

    Returns:
        The corpus.
    """
    # The chat template's special tokens split a prompt into "user\n" + text,
    # "\n" and "model\n"; merges never cross them.
    texts = []
    for spec in specs:
        texts.extend([f"user\n{spec.text.strip()}", "\n", "model\n",
                      spec.actions[0]])
    for actions in sorted({spec.actions for spec in specs}):
        texts.extend(_pair_texts(actions))
    return texts


