"""Prompt tables: every distinct prompt of a game, chat-templated and tokenised.

A game's prompt is a function of four bits (M's previous move, O's previous
move, which action string is named first in the question, which first in the
answer format), so a game has 16 prompts (``prompts.prompt_index``). They are
wrapped in the tokenizer's chat template, tokenised and LEFT-padded into a
``PromptTable`` [P, T]; inside jit a prompt is its row index.

Axis letters (docs/ARCHITECTURE.md): G games, P prompts of one game (16),
T prompt tokens.
"""

from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from moraljax import prompts
from moraljax import validation

# Gemma's chat template in its essentials: <bos>, one turn per message with
# the content trimmed (Gemma's real template trims too), and the model turn
# opened when a generation prompt is requested. The built-in tiny model ships
# this template; tests use it for their toy tokenizers.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")



def apply_chat_template(tokenizer, user_text: str) -> str:
    """Wraps a user text as one user turn, generation prompt appended.

    No system prompt (SPEC.md section 4). For Gemma the result is
    "<bos><start_of_turn>user\\n{text}<end_of_turn>\\n<start_of_turn>model\\n".

    Args:
        tokenizer: a transformers tokenizer with a chat template.
        user_text: the prompt.

    Returns:
        The templated string; tokenise it without adding special tokens.

    Raises:
        ValueError: if the tokenizer has no chat template.
    """
    if not getattr(tokenizer, "chat_template", None):
        validation.fail(
            "tokenizer.chat_template", getattr(tokenizer, "chat_template", None),
            f"a chat template ({type(tokenizer).__name__} has none): an instruction-tuned model's "
            "tokenizer, or set e.g. prompt_tables.GEMMA_CHAT_TEMPLATE")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": user_text}], tokenize=False,
        add_generation_prompt=True)


def _pad_id(tokenizer) -> int:
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if pad_id is None:
        validation.fail("tokenizer.pad_token_id", pad_id,
                        f"a pad token to left-pad prompt tables ({type(tokenizer).__name__} has none)")
    return int(pad_id)


@flax.struct.dataclass
class PromptTable:
    """Tokenised prompts, left-padded, one row per ``prompt_index``.

    Left padding puts every prompt's last token in the last column, so the
    first generated token always follows column T - 1. Positions of real
    tokens are ``cumsum(mask) - 1``.

    Attributes:
        ids: int32 [P, T] (or [G, P, T] after ``stack_prompt_tables``), pad
            id in the padding.
        mask: int32, same shape, 1 on prompt tokens, 0 on padding.
    """

    ids: jax.Array
    mask: jax.Array


def tokenize_prompts(tokenizer, user_texts: Sequence[str], *,
                     pad_to: int | None = None) -> PromptTable:
    """Chat-templates, tokenises and left-pads prompts into a table.

    Args:
        tokenizer: a transformers tokenizer with a chat template and a pad
            token.
        user_texts: the user texts, in table-row order.
        pad_to: the table width T; None means the longest prompt. Lets
            several games or variants share one T.

    Returns:
        PromptTable with ids/mask [len(user_texts), T].

    Raises:
        ValueError: without a chat template or pad token, for no texts, or
            if a prompt is longer than ``pad_to``.
    """
    pad_id = _pad_id(tokenizer)
    if len(user_texts) == 0:
        validation.fail("user_texts", user_texts, "at least one prompt")
    # The template writes its own <bos>; adding special tokens would double it.
    token_lists = [
        tokenizer.encode(apply_chat_template(tokenizer, text),
                         add_special_tokens=False) for text in user_texts]
    longest = max(len(tokens) for tokens in token_lists)
    if pad_to is None:
        width = longest
    else:
        if isinstance(pad_to, bool) or not isinstance(pad_to, int):
            validation.fail("pad_to", pad_to, "an int or None")
        if pad_to < longest:
            validation.fail("pad_to", pad_to, f"at least the longest prompt's length, {longest} tokens")
        width = pad_to
    ids = np.full((len(token_lists), width), pad_id, np.int32)
    mask = np.zeros((len(token_lists), width), np.int32)
    for row, tokens in enumerate(token_lists):
        if tokens:
            ids[row, width - len(tokens):] = tokens
            mask[row, width - len(tokens):] = 1
    return PromptTable(ids=jnp.asarray(ids), mask=jnp.asarray(mask))


def build_prompt_table(tokenizer, payoffs, *,
                       actions: Sequence[str] = prompts.TRAIN_ACTIONS,
                       table_order: str = "original",
                       family: str = "structured",
                       preamble: str | None = None,
                       pad_to: int | None = None) -> PromptTable:
    """Renders and tokenises all 16 prompts of one game.

    Row ``prompt_index(prev_m, prev_o, first_option, first_answer)`` holds
    that prompt; ``prompts.render_all(...)`` with the same arguments gives the texts.

    Args:
        tokenizer: a transformers tokenizer with a chat template and a pad
            token.
        payoffs: [2, 2, 2] array, payoffs[a_m, a_o] = (p_m, p_o).
        actions: (C string, D string).
        table_order: one of ``prompts.TABLE_ORDERS``.
        family: one of ``prompts.PROMPT_FAMILIES``.
        preamble: optional value preamble.
        pad_to: common width T, see ``tokenize_prompts``.

    Returns:
        PromptTable [16, T].

    Raises:
        ValueError: as ``prompts.render_all`` and ``tokenize_prompts``.
    """
    texts = prompts.render_all(payoffs, family=family, actions=actions,
                       table_order=table_order, preamble=preamble)
    return tokenize_prompts(tokenizer, texts, pad_to=pad_to)


def stack_prompt_tables(tables: Sequence[PromptTable], pad_id: int
                        ) -> PromptTable:
    """Stacks per-game tables into one [G, P, T] table.

    Narrower tables get more left padding, so every prompt still ends in the
    last column.

    Args:
        tables: tables [P, T_g] with the same P.
        pad_id: the tokenizer's pad id, for the added padding.

    Returns:
        PromptTable [G, P, max T_g].

    Raises:
        ValueError: for no tables, tables that are not [P, T] or whose P
            differ.
    """
    if len(tables) == 0:
        validation.fail("tables", tables, "at least one PromptTable")
    shapes = [tuple(table.ids.shape) for table in tables]
    if any(len(shape) != 2 for shape in shapes) or len(
            {shape[0] for shape in shapes}) != 1:
        validation.fail("table shapes", shapes, "[P, T] tables with the same P")
    width = max(shape[1] for shape in shapes)

    def left_pad(array, value):
        return jnp.pad(array, ((0, 0), (width - array.shape[1], 0)),
                       constant_values=value)

    return PromptTable(
        ids=jnp.stack([left_pad(table.ids, pad_id) for table in tables]),
        mask=jnp.stack([left_pad(table.mask, 0) for table in tables]))


